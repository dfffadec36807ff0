//! The image and the DaemonSet without a container runtime: the files
//! `deploy/stage.sh` lays out (what `deploy/Dockerfile` copies into the
//! image), started with the DaemonSet's own command, arguments and
//! environment, the ConfigMap's files and a service-account token where the
//! pod would mount them, and only the capabilities the DaemonSet grants;
//! against a real kube-apiserver, in a network namespace of its own.

use crate::common;

use std::path::{Path, PathBuf};
use std::process::Command;

use common::Logs;
use common::apiserver::repo_root;
use common::daemonset::{
    self, PLACEHOLDER_SERVER, Pod, SERVICE_ACCOUNT_DIR, deploy_file, image_path, wait_for,
};
use common::netns::Netns;

/// Lays out the image's files from this build with deploy/stage.sh.
fn stage(out: &Path) {
    let binary = PathBuf::from(env!("CARGO_BIN_EXE_kube-wasm-proxy"));
    // <target>/<profile>/kube-wasm-proxy
    let target = binary.parent().and_then(Path::parent).unwrap();
    let status = Command::new("bash")
        .arg(repo_root().join("deploy/stage.sh"))
        .arg("--no-build")
        .arg(out)
        .env("KWP_BINARY", &binary)
        .env("CARGO_TARGET_DIR", target)
        .status()
        .expect("running deploy/stage.sh");
    assert!(status.success(), "deploy/stage.sh failed");
}

#[test]
fn the_staged_image_runs_as_the_daemonset_says_and_gets_ready() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    let out = root.join("out");
    stage(&out);

    // Every plugin crate is in the image, under the name the flags use.
    let mut want: Vec<String> = std::fs::read_dir(repo_root().join("plugins"))
        .unwrap()
        .filter_map(|e| {
            let manifest = std::fs::read_to_string(e.ok()?.path().join("Cargo.toml")).ok()?;
            let name = manifest
                .lines()
                .find_map(|l| l.strip_prefix("name = \"kwp-plugin-"))?;
            Some(format!("{}.wasm", name.trim_end_matches('"')))
        })
        .collect();
    let mut staged: Vec<String> = std::fs::read_dir(out.join("plugins"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    want.sort();
    staged.sort();
    assert!(want.len() >= 7, "plugin crates found: {want:?}");
    assert_eq!(staged, want, "plugins in the image");

    // Image paths, from the Dockerfile; pod paths, from the DaemonSet.
    let dockerfile = deploy_file("Dockerfile");
    let image_binary = image_path(&dockerfile, "/out/bin/kube-wasm-proxy");
    let image_plugins = image_path(&dockerfile, "/out/plugins");
    let pod = Pod::load();
    let config_mount = pod.config_mount();

    // The control plane, the RBAC, this node.
    let cp = common::apiserver::ControlPlane::start();
    let admin = cp.admin();
    daemonset::install_rbac_and_node(&admin, "node-1");

    // The pod's files: the ConfigMap's keys and a projected token.
    let (config_dir, sa_dir) = (root.join("config"), root.join("serviceaccount"));
    daemonset::write_service_account(&sa_dir, &cp, &admin);
    let s = |p: &Path| p.display().to_string();
    let rewrite = |text: &str| -> String {
        text.replace(&image_binary, &s(&out.join("bin/kube-wasm-proxy")))
            .replace(&image_plugins, &s(&out.join("plugins")))
            .replace(&config_mount, &s(&config_dir))
            .replace(SERVICE_ACCOUNT_DIR, &s(&sa_dir))
            // docs/deploy.md: set `server` to the API server's address.
            .replace(PLACEHOLDER_SERVER, &cp.url)
    };
    daemonset::write_configmap(&config_dir, rewrite);

    // The container's command line, with $(VAR) expanded as the kubelet does.
    let command = pod.command_line("node-1");
    assert_eq!(
        command[0], image_binary,
        "the DaemonSet runs the binary the image has"
    );
    let command: Vec<String> = command.iter().map(|a| rewrite(a)).collect();
    for arg in &command[1..] {
        assert!(
            !arg.contains("/usr/") && !arg.contains("/var/"),
            "{arg} points at a path neither the image nor a mount provides"
        );
    }

    // Only the capabilities the DaemonSet adds, and no new privileges.
    let caps = pod.capabilities();
    let bounding = caps
        .iter()
        .map(|c| format!(",+{}", c.to_lowercase()))
        .collect::<String>();
    let ns = Netns::new("kwp-image");
    let forward = ns.forward_loopback(cp.port());
    let mut args = vec![
        format!("--bounding-set=-all{bounding}"),
        "--no-new-privs".into(),
    ];
    args.extend(command);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let mut proxy = ns.spawn("setpriv", &args);
    let logs = Logs::capture(&mut proxy);

    // The readiness and liveness probes, as the kubelet sends them.
    let probe = |name: &str| -> u16 {
        let url = pod.probe_url(name);
        ns.sh(&format!(
            "curl -s -o /dev/null --max-time 2 -w '%{{http_code}}' {url} || true"
        ))
        .trim()
        .parse()
        .unwrap_or(0)
    };
    wait_for(&mut proxy, &logs, "readiness (/healthz 200)", || {
        probe("readinessProbe") == 200
    });
    assert_eq!(probe("livenessProbe"), 200);
    // `ip netns exec` and setpriv exec in place: this is the proxy itself.
    let status = std::fs::read_to_string(format!("/proc/{}/status", proxy.id())).unwrap();
    let cap = |field: &str| {
        let hex = status
            .lines()
            .find_map(|l| l.strip_prefix(field))
            .unwrap()
            .trim();
        u64::from_str_radix(hex, 16).unwrap()
    };
    const NET_ADMIN_AND_NET_RAW: u64 = (1 << 12) | (1 << 13);
    assert_eq!(cap("CapBnd:"), NET_ADMIN_AND_NET_RAW, "{status}");
    assert_eq!(cap("CapEff:") & !NET_ADMIN_AND_NET_RAW, 0, "{status}");

    // It programs the kernel from the API, with the image's plugin files.
    daemonset::create_web_service(&admin, "10.96.0.77", "10.244.1.5");
    wait_for(&mut proxy, &logs, "the Service in the kernel", || {
        ns.sh("nft list table ip kube-wasm-proxy 2>/dev/null || true")
            .contains("10.96.0.77")
    });
    let text = logs.text();
    for plugin in ["nftables.wasm", "round-robin.wasm"] {
        let path = s(&out.join("plugins").join(plugin));
        assert!(
            text.contains(&path),
            "{plugin} was not loaded from the image's plugin directory:\n{text}"
        );
    }
    assert!(!text.contains("ERROR"), "the proxy logged errors:\n{text}");
    let _ = proxy.kill();
    let _ = proxy.wait();
    drop(forward);
}
