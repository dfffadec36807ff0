use std::time::Duration;

use clap::Parser;

use super::values::{go_duration, parse_duration};
use super::*;

fn flags(args: &[&str]) -> Flags {
    Cli::parse_from(std::iter::once("kube-wasm-proxy").chain(args.iter().copied())).flags
}

/// Flags for a valid node name, so that tests do not depend on the
/// machine's hostname.
fn resolve(args: &[&str]) -> Result<Settings> {
    let mut all = vec!["--hostname-override", "node-a"];
    all.extend_from_slice(args);
    Settings::resolve(&flags(&all))
}

/// The full error text (with its context) of a refused configuration.
fn error(args: &[&str]) -> String {
    match resolve(args) {
        Ok(s) => panic!("{args:?} was accepted: {s:?}"),
        Err(e) => format!("{e:#}"),
    }
}

fn config_file(body: &str) -> (tempfile::TempDir, String) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("config.yaml");
    std::fs::write(
        &path,
        format!(
            "apiVersion: kubeproxy.config.k8s.io/v1alpha1\nkind: KubeProxyConfiguration\n{body}"
        ),
    )
    .unwrap();
    let path = path.to_str().unwrap().to_string();
    (dir, path)
}

#[test]
fn durations_parse_like_go() {
    assert_eq!(parse_duration("1s"), Ok(Duration::from_secs(1)));
    assert_eq!(parse_duration("1m30s"), Ok(Duration::from_secs(90)));
    assert_eq!(parse_duration("250ms"), Ok(Duration::from_millis(250)));
    assert_eq!(parse_duration("1.5h"), Ok(Duration::from_secs(5400)));
    assert_eq!(parse_duration("0"), Ok(Duration::ZERO));
    assert!(parse_duration("5").is_err());
    assert!(parse_duration("5d").is_err());
    assert!(parse_duration("-1s").is_err());
    assert!(parse_duration("1..5s").is_err());
}

#[test]
fn huge_durations_are_errors_not_panics() {
    let err = parse_duration("99999999999999999999h").unwrap_err();
    assert!(err.contains("too long"), "{err}");
    assert!(
        parse_duration("2562048h").is_err(),
        "beyond Go's int64 nanoseconds"
    );
    assert!(parse_duration("2562047h").is_ok());
    let err = error(&["--sync-period", "100000h"]);
    assert!(
        err.contains("--sync-period") && err.contains("at most 24h"),
        "{err}"
    );
}

#[test]
fn durations_print_like_go() {
    assert_eq!(go_duration(Duration::ZERO), "0s");
    assert_eq!(go_duration(Duration::from_secs(30)), "30s");
    assert_eq!(go_duration(Duration::from_secs(90)), "1m30s");
    assert_eq!(go_duration(Duration::from_secs(3600)), "1h0m0s");
    assert_eq!(go_duration(Duration::from_millis(1500)), "1.5s");
    assert_eq!(go_duration(Duration::from_millis(250)), "250ms");
}

#[test]
fn sync_periods_are_range_checked() {
    let err = error(&["--sync-period", "0s"]);
    assert!(
        err.contains("--sync-period: must be greater than 0"),
        "{err}"
    );
    let err = error(&["--min-sync-period", "1m", "--sync-period", "1s"]);
    assert!(
        err.contains("--min-sync-period") && err.contains("longer than --sync-period"),
        "{err}"
    );
    for body in ["syncPeriod: 0s\n", "syncPeriod: \"0\"\n", "syncPeriod: 0\n"] {
        let (_dir, path) = config_file(body);
        let err = error(&["--config", &path]);
        assert!(err.contains("syncPeriod"), "{body}: {err}");
    }
    let (_dir, path) = config_file("mode: nftables\nnftables:\n  syncPeriod: 25h\n");
    let err = error(&["--config", &path]);
    assert!(
        err.contains("nftables.syncPeriod 25h0m0s: must be at most 24h"),
        "{err}"
    );
    assert!(resolve(&["--sync-period", "24h"]).is_ok());
}

#[test]
fn cluster_cidrs_are_typed_and_named() {
    for bad in [
        "10.244.0.0/33",
        "not-a-cidr",
        "10.244.0.0/16 } accept #",
        "10.244.0.0",
        "10.0.0.0/+8",
    ] {
        let err = error(&["--cluster-cidr", bad]);
        assert!(err.starts_with("--cluster-cidr: "), "{bad}: {err}");
    }
    let err = error(&["--cluster-cidr", "10.0.0.0/8,10.1.0.0/16"]);
    assert!(err.contains("one IPv4 and one IPv6"), "{err}");
    let s = resolve(&["--cluster-cidr", "10.244.0.0/16, fd00::/64"]).unwrap();
    assert_eq!(
        s.detect_local,
        DetectLocal::ClusterCidr(vec![
            "10.244.0.0/16".parse().unwrap(),
            "fd00::/64".parse().unwrap()
        ])
    );
    let (_dir, path) = config_file("clusterCIDR: 10.244.0.0/99\n");
    let err = error(&["--config", &path]);
    assert!(
        err.contains("clusterCIDR: ") && err.contains(&path),
        "{err}"
    );
    let err = error(&["--nodeport-addresses", "10.0.0.0/8,zz"]);
    assert!(err.starts_with("--nodeport-addresses: "), "{err}");
}

#[test]
fn interface_names_follow_linux_rules() {
    let bridge = |name: &str| {
        resolve(&[
            "--detect-local-mode",
            "BridgeInterface",
            "--pod-bridge-interface",
            name,
        ])
    };
    for bad in [
        "br0\" accept #",
        "",
        "br 0",
        "a/b",
        "a:b",
        "..",
        "sixteen-chars-xx",
        "br*",
        "br\\0",
    ] {
        let err = format!("{:#}", bridge(bad).unwrap_err());
        assert!(
            err.starts_with("--pod-bridge-interface: "),
            "{bad:?}: {err}"
        );
    }
    assert_eq!(
        bridge("fifteen-chars-x").unwrap().detect_local,
        DetectLocal::BridgeInterface("fifteen-chars-x".into())
    );
    let prefix = |p: &str| {
        resolve(&[
            "--detect-local-mode",
            "InterfaceNamePrefix",
            "--pod-interface-name-prefix",
            p,
        ])
    };
    assert!(prefix("veth").is_ok());
    let err = format!("{:#}", prefix("fifteen-chars-x").unwrap_err());
    assert!(err.contains("at most 14"), "{err}");
    let (_dir, path) = config_file(
        "detectLocalMode: BridgeInterface\ndetectLocal: {bridgeInterface: 'br0\" accept'}\n",
    );
    let err = error(&["--config", &path]);
    assert!(err.contains("detectLocal.bridgeInterface: "), "{err}");
}

#[test]
fn hostname_must_be_a_node_name() {
    for bad in ["node_a", "-node", "node a", "a..b", &"x".repeat(254)] {
        let flag = format!("--hostname-override={bad}");
        let err = format!("{:#}", Settings::resolve(&flags(&[&flag])).unwrap_err());
        assert!(err.starts_with("--hostname-override: "), "{bad:?}: {err}");
    }
    let s = Settings::resolve(&flags(&["--hostname-override", " Node-A.example "])).unwrap();
    assert_eq!(s.hostname, "node-a.example");
    let (_dir, path) = config_file("hostnameOverride: 'bad;name'\n");
    let err = format!(
        "{:#}",
        Settings::resolve(&flags(&["--config", &path])).unwrap_err()
    );
    assert!(err.contains("hostnameOverride: "), "{err}");
}

#[test]
fn flags_of_another_mode_are_errors() {
    let err = error(&["--proxy-mode", "nftables", "--no-redirect"]);
    assert!(
        err.contains("--no-redirect applies to --proxy-mode userspace only"),
        "{err}"
    );
    let err = error(&[
        "--proxy-mode",
        "nftables",
        "--userspace-bind-address",
        "127.0.0.2",
    ]);
    assert!(err.contains("--userspace-bind-address"), "{err}");
    let err = error(&["--pod-bridge-interface", "br0"]);
    assert!(err.contains("--pod-bridge-interface applies to"), "{err}");
    assert!(resolve(&["--proxy-mode", "userspace", "--no-redirect"]).is_ok());
}

#[test]
fn bind_addresses_need_a_port() {
    let err = error(&["--healthz-bind-address", "0.0.0.0:0"]);
    assert!(err.starts_with("--healthz-bind-address: "), "{err}");
    let err = error(&["--metrics-bind-address", "localhost"]);
    assert!(err.starts_with("--metrics-bind-address: "), "{err}");
    let s = resolve(&["--healthz-bind-address", ":10256"]).unwrap();
    assert_eq!(
        s.healthz_bind_address,
        Some("0.0.0.0:10256".parse().unwrap())
    );
}

#[test]
fn iptables_section_goes_to_the_plugin_with_defaults() {
    let (_dir, path) = config_file("mode: iptables\n");
    let s = resolve(&["--config", &path]).unwrap();
    let extra: serde_json::Value = serde_json::from_str(&s.mode_extra).unwrap();
    assert_eq!(
        extra,
        serde_json::json!({"masqueradeBit": 14, "masqueradeAll": false, "localhostNodePorts": true,
            "syncPeriod": "30s", "minSyncPeriod": "1s", "nodePortAddresses": []})
    );
    let (_dir, path) = config_file(
        "mode: iptables\niptables:\n  masqueradeBit: 3\n  masqueradeAll: true\n  localhostNodePorts: false\n  \
         syncPeriod: 1m\n  minSyncPeriod: 5s\n",
    );
    let s = resolve(&["--config", &path]).unwrap();
    assert!(s.masquerade_all);
    assert_eq!(s.sync_period, Duration::from_secs(60));
    let extra: serde_json::Value = serde_json::from_str(&s.mode_extra).unwrap();
    assert_eq!(
        extra,
        serde_json::json!({"masqueradeBit": 3, "masqueradeAll": true, "localhostNodePorts": false,
            "syncPeriod": "1m0s", "minSyncPeriod": "5s", "nodePortAddresses": []})
    );
    // "primary" and CIDRs reach the plugin as given: unset means every
    // local address in iptables mode, "primary" the node's IPs.
    for (given, list) in [
        ("primary", serde_json::json!(["primary"])),
        (
            "10.0.0.0/8,fd00::/64",
            serde_json::json!(["10.0.0.0/8", "fd00::/64"]),
        ),
    ] {
        let (_dir, path) = config_file("mode: iptables\n");
        let s = resolve(&["--config", &path, "--nodeport-addresses", given]).unwrap();
        let extra: serde_json::Value = serde_json::from_str(&s.mode_extra).unwrap();
        assert_eq!(extra["nodePortAddresses"], list, "{given}");
    }
    let (_dir, path) = config_file("mode: iptables\n");
    let s = resolve(&["--config", &path, "--iptables-localhost-nodeports=false"]).unwrap();
    let extra: serde_json::Value = serde_json::from_str(&s.mode_extra).unwrap();
    assert_eq!(
        extra["localhostNodePorts"], false,
        "the flag overrides the file"
    );
    for mode in ["nftables", "userspace"] {
        let err =
            resolve(&["--proxy-mode", mode, "--iptables-localhost-nodeports=false"]).unwrap_err();
        assert!(
            format!("{err:#}").contains("iptables only"),
            "{mode}: {err:#}"
        );
    }
    for (body, field) in [
        ("iptables: {masqueradeBit: 32}\n", "iptables.masqueradeBit"),
        ("iptables: {masqueradeBit: -1}\n", "iptables.masqueradeBit"),
        (
            "iptables: {masqueradeAll: yes-please}\n",
            "iptables.masqueradeAll",
        ),
        (
            "iptables: {localhostNodePorts: 1}\n",
            "iptables.localhostNodePorts",
        ),
        (
            "mode: iptables\niptables: {syncPeriod: 0s}\n",
            "iptables.syncPeriod",
        ),
    ] {
        let (_dir, path) = config_file(body);
        let err = error(&["--config", &path]);
        assert!(err.contains(field), "{body}: {err}");
    }
}

#[test]
fn ipvs_section_goes_to_the_plugin_with_defaults() {
    let (_dir, path) = config_file("mode: ipvs\n");
    let s = resolve(&["--config", &path]).unwrap();
    let extra: serde_json::Value = serde_json::from_str(&s.mode_extra).unwrap();
    assert_eq!(
        extra,
        serde_json::json!({"scheduler": "rr", "excludeCIDRs": [], "strictARP": false,
            "tcpTimeout": "0s", "tcpFinTimeout": "0s", "udpTimeout": "0s",
            "syncPeriod": "30s", "minSyncPeriod": "1s"})
    );
    let (_dir, path) = config_file(
        "mode: ipvs\nipvs:\n  scheduler: mh\n  excludeCIDRs: [10.0.0.0/8, 'fd00::/64']\n  strictARP: true\n  \
         tcpTimeout: 15m\n  tcpFinTimeout: 30s\n  udpTimeout: 300ms\n",
    );
    let s = resolve(&["--config", &path]).unwrap();
    let extra: serde_json::Value = serde_json::from_str(&s.mode_extra).unwrap();
    assert_eq!(extra["scheduler"], "mh");
    assert_eq!(
        extra["excludeCIDRs"],
        serde_json::json!(["10.0.0.0/8", "fd00::/64"])
    );
    assert_eq!(extra["strictARP"], true);
    assert_eq!(extra["tcpTimeout"], "15m0s");
    assert_eq!(extra["tcpFinTimeout"], "30s");
    assert_eq!(extra["udpTimeout"], "300ms");
    for (body, field) in [
        ("ipvs: {scheduler: fastest}\n", "ipvs.scheduler"),
        ("ipvs: {excludeCIDRs: [10.0.0.0/33]}\n", "ipvs.excludeCIDRs"),
        ("ipvs: {excludeCIDRs: 10.0.0.0/8}\n", "ipvs.excludeCIDRs"),
        ("ipvs: {strictARP: 'on'}\n", "ipvs.strictARP"),
        (
            "ipvs: {tcpTimeout: 99999999999999999999h}\n",
            "ipvs.tcpTimeout",
        ),
        ("ipvs: {udpTimeout: 30}\n", "ipvs.udpTimeout"),
        ("ipvs: {tcpFinTimeout: -1s}\n", "ipvs.tcpFinTimeout"),
    ] {
        let (_dir, path) = config_file(&format!("mode: ipvs\n{body}"));
        let err = error(&["--config", &path]);
        assert!(err.contains(field), "{body}: {err}");
    }
    // Other modes get an empty object and ignore the ipvs section, as upstream.
    let (_dir, path) = config_file("mode: nftables\nipvs: {scheduler: fastest}\n");
    assert_eq!(resolve(&["--config", &path]).unwrap().mode_extra, "{}");
}

#[test]
fn config_file_is_read_and_flags_win() {
    let (_dir, path) = config_file(
        "mode: nftables\nhostnameOverride: Node-A\nclusterCIDR: 10.244.0.0/16,fd00::/64\n\
         metricsBindAddress: 127.0.0.1:19249\nnftables:\n  masqueradeAll: true\n  syncPeriod: 45s\n  \
         minSyncPeriod: 2s\nsomethingNew: 1\n",
    );
    let config = path.as_str();
    let s = Settings::resolve(&flags(&["--config", config])).unwrap();
    assert_eq!(s.mode, ProxyMode::Nftables);
    assert_eq!(s.hostname, "node-a");
    assert!(s.masquerade_all);
    assert_eq!(s.sync_period, Duration::from_secs(45));
    assert_eq!(s.min_sync_period, Duration::from_secs(2));
    assert_eq!(s.mode_extra, "{}");
    let cidrs: Vec<Cidr> = vec![
        "10.244.0.0/16".parse().unwrap(),
        "fd00::/64".parse().unwrap(),
    ];
    assert_eq!(s.cluster_cidrs, cidrs);
    assert_eq!(s.detect_local, DetectLocal::ClusterCidr(cidrs));
    assert_eq!(
        s.metrics_bind_address,
        Some("127.0.0.1:19249".parse().unwrap())
    );
    assert_eq!(
        s.healthz_bind_address,
        Some("0.0.0.0:10256".parse().unwrap())
    );

    let s = Settings::resolve(&flags(&[
        "--config",
        config,
        "--proxy-mode",
        "userspace",
        "--sync-period",
        "10s",
    ]))
    .unwrap();
    assert_eq!(s.mode, ProxyMode::Userspace);
    assert_eq!(s.sync_period, Duration::from_secs(10));
}

#[test]
fn detect_local_modes_follow_upstream() {
    let s = resolve(&[]).unwrap();
    assert_eq!(
        s.detect_local,
        DetectLocal::None,
        "no cluster CIDR, no detection"
    );
    let s = resolve(&[
        "--detect-local-mode",
        "BridgeInterface",
        "--pod-bridge-interface",
        "cni0",
    ])
    .unwrap();
    assert_eq!(s.detect_local, DetectLocal::BridgeInterface("cni0".into()));
    let s = resolve(&["--detect-local-mode", "NodeCIDR"]).unwrap();
    assert_eq!(s.detect_local, DetectLocal::NodeCidr);
    let err = error(&["--detect-local-mode", "InterfaceNamePrefix"]);
    assert!(err.contains("needs --pod-interface-name-prefix"), "{err}");
    assert!(error(&["--detect-local-mode", "Bogus"]).contains("detectLocalMode"));
    let s = resolve(&["--nodeport-addresses", "10.0.0.0/8, 192.0.2.0/24"]).unwrap();
    assert_eq!(s.node_port_addresses.len(), 2);
    assert!(
        resolve(&["--nodeport-addresses", "primary"])
            .unwrap()
            .node_port_addresses
            .is_empty()
    );
    assert!(resolve(&["--nodeport-addresses", "primary,10.0.0.0/8"]).is_err());
}

#[test]
fn bad_config_is_a_clear_error() {
    let (_dir, path) = config_file("");
    std::fs::write(&path, "kind: Pod\n").unwrap();
    let err = error(&["--config", &path]);
    assert!(err.contains("expected KubeProxyConfiguration"), "{err}");
    let (_dir, path) = config_file("mode: fastest\n");
    assert!(error(&["--config", &path]).contains("mode: unknown proxy mode"));
    let (_dir, path) = config_file("clusterCIDR: [10.0.0.0/8]\n");
    assert!(error(&["--config", &path]).contains("clusterCIDR: expected a string"));
}

#[test]
fn the_node_port_range_is_for_the_file_source_and_parsed() {
    let file = |extra: &[&str]| {
        let mut args = vec!["--source", "file:/tmp/x"];
        args.extend_from_slice(extra);
        resolve(&args)
    };
    assert_eq!(file(&[]).unwrap().node_port_range, Some(30000..=32767));
    assert_eq!(
        file(&["--service-node-port-range", "20000-20100"])
            .unwrap()
            .node_port_range,
        Some(20000..=20100)
    );
    for bad in ["0-100", "300-200", "1-70000", "a-b"] {
        let err = file(&["--service-node-port-range", bad]).unwrap_err();
        assert!(
            format!("{err:#}").contains("--service-node-port-range"),
            "{bad}: {err:#}"
        );
    }
    assert!(error(&["--service-node-port-range", "30000-32767"]).contains("--source file:"));
}
