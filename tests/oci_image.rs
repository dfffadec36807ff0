//! The real OCI image, built by `deploy/build-image.sh` (buildah, FROM
//! scratch, daemonless) from this build's binary, and run by podman + crun
//! the way the DaemonSet runs it: the host network (here a network
//! namespace of the test's own), only the capabilities the DaemonSet adds,
//! a read-only root filesystem, the DaemonSet's mounts, environment,
//! command and arguments, and a service-account token and CA of the real
//! kube-apiserver. The probes answer, a Service created through the API
//! becomes nftables rules in the namespace, and a connection to it
//! reaches its endpoint. `deploy/Dockerfile` is checked to install the
//! same programs.

use crate::common;

use std::collections::BTreeSet;
use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::Logs;
use common::apiserver::{ControlPlane, repo_root};
use common::daemonset::{self, PLACEHOLDER_SERVER, Pod, Source, deploy_file, image_path};
use common::netns::Netns;

/// Larger means something unintended went in (a debug binary not stripped,
/// a library tree): the image is ~51 MiB with the release binary.
const IMAGE_SIZE_BUDGET: u64 = 128 << 20;

/// `TOOLS=(...)` of deploy/build-image.sh: the programs it copies.
fn build_script_tools() -> Vec<String> {
    let script = deploy_file("build-image.sh");
    let start = script.find("\nTOOLS=(").expect("TOOLS=( in build-image.sh") + 8;
    let end = start + script[start..].find(')').expect("TOOLS closes");
    script[start..end]
        .split_whitespace()
        .map(str::to_string)
        .collect()
}

/// The Debian package that installs `path` (dpkg knows merged-/usr paths
/// by their old names: /usr/bin/ip is /bin/ip to it).
fn debian_package(path: &str) -> String {
    for candidate in [path, path.strip_prefix("/usr").unwrap_or(path)] {
        let out = Command::new("dpkg").args(["-S", candidate]).output();
        if let Some(out) = out.ok().filter(|o| o.status.success()) {
            let text = String::from_utf8_lossy(&out.stdout);
            return text
                .split(':')
                .next()
                .unwrap_or_default()
                .trim()
                .to_string();
        }
    }
    panic!("no Debian package installs {path}")
}

#[test]
fn the_dockerfile_installs_what_build_image_copies() {
    let dockerfile = deploy_file("Dockerfile");
    let script = deploy_file("build-image.sh");
    // The same binary and plugin paths.
    for (from, var) in [
        ("/out/bin/kube-wasm-proxy", "BINARY_PATH"),
        ("/out/plugins", "PLUGIN_DIR"),
    ] {
        let in_script = script
            .lines()
            .find_map(|l| l.strip_prefix(&format!("{var}=")))
            .unwrap_or_else(|| panic!("no {var}= in build-image.sh"));
        assert_eq!(image_path(&dockerfile, from), in_script, "{var}");
    }
    // The same programs: the packages of the files the script copies are
    // the packages the Dockerfile installs.
    let mut copied: BTreeSet<String> = build_script_tools()
        .iter()
        .map(|t| debian_package(t))
        .collect();
    if script.contains("/etc/ssl/certs/ca-certificates.crt") {
        copied.insert("ca-certificates".into());
    }
    let install = dockerfile
        .split("--no-install-recommends")
        .nth(1)
        .expect("apt-get install --no-install-recommends in the Dockerfile");
    let installed: BTreeSet<String> = install
        .split(';')
        .next()
        .unwrap_or_default()
        .split_whitespace()
        .filter(|w| *w != "\\")
        .map(str::to_string)
        .collect();
    assert_eq!(
        copied, installed,
        "deploy/build-image.sh copies the programs of these packages, deploy/Dockerfile installs those"
    );
    for program in ["nft", "iptables", "conntrack"] {
        assert!(
            script.contains(program),
            "build-image.sh does not mention {program}"
        );
    }
}

/// podman (and buildah) on containers-storage of the test's own, so that
/// tests and users do not see each other's images.
struct Storage {
    root: PathBuf,
    runroot: PathBuf,
}

impl Storage {
    fn flags(&self) -> Vec<String> {
        vec![
            "--root".into(),
            self.root.display().to_string(),
            "--runroot".into(),
            self.runroot.display().to_string(),
        ]
    }

    /// podman with this storage, in a private mount namespace where the
    /// cgroup v2 hierarchy of this hybrid-cgroup machine is hidden (crun
    /// refuses hybrid mode), with no events log and cgroupfs (no systemd).
    fn podman(&self, args: &[&str]) -> Command {
        let mut cmd = Command::new("unshare");
        cmd.args(["--mount", "--propagation", "private", "sh", "-c"])
            .arg(
                "if mountpoint -q /sys/fs/cgroup/unified; then umount /sys/fs/cgroup/unified; fi; \
                 exec podman \"$@\"",
            )
            .arg("sh")
            .args(self.flags())
            .args([
                "--runtime",
                "crun",
                "--cgroup-manager",
                "cgroupfs",
                "--events-backend",
                "none",
            ])
            .args(args);
        cmd
    }
}

/// Kills the container if the test ends early (the podman run in its own
/// mount namespace then removes it and exits).
struct KillOnDrop<'a>(&'a Storage, &'a str);

impl Drop for KillOnDrop<'_> {
    fn drop(&mut self) {
        let _ = self
            .0
            .podman(&["kill", "--signal", "KILL", self.1])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
    }
}

/// Runs deploy/build-image.sh on this build's binary; returns the printed
/// IMAGE, SIZE and the time it took.
fn build_image(storage: &Storage) -> (String, u64, Duration) {
    let binary = PathBuf::from(env!("CARGO_BIN_EXE_kube-wasm-proxy"));
    // <target>/<profile>/kube-wasm-proxy: the plugins are in <target>.
    let target = binary.parent().and_then(Path::parent).expect("target dir");
    let started = Instant::now();
    let out = Command::new("bash")
        .arg(repo_root().join("deploy/build-image.sh"))
        .arg("--binary")
        .arg(&binary)
        .args(storage.flags())
        .env("CARGO_TARGET_DIR", target)
        .stderr(Stdio::inherit())
        .output()
        .expect("running deploy/build-image.sh");
    let took = started.elapsed();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "build-image.sh failed: {text}");
    let value = |key: &str| {
        text.lines()
            .find_map(|l| l.strip_prefix(key)?.strip_prefix('='))
            .unwrap_or_else(|| panic!("build-image.sh printed no {key}=: {text}"))
            .to_string()
    };
    (value("IMAGE"), value("SIZE").parse().expect("SIZE"), took)
}

/// `podman run` arguments for the DaemonSet's container: security
/// context, environment, mounts (hostPaths under `host`, the ConfigMap from
/// `config_dir`, the service account from `sa_dir`).
fn run_args(pod: &Pod, host: &Path, config_dir: &Path, sa_dir: &Path) -> Vec<String> {
    let sc = &pod.container["securityContext"];
    assert_eq!(sc["privileged"], false, "the DaemonSet is not privileged");
    let mut args: Vec<String> = vec!["--cap-drop=all".into()];
    for cap in pod.capabilities() {
        args.push(format!("--cap-add={cap}"));
    }
    if sc["allowPrivilegeEscalation"] == false {
        args.push("--security-opt=no-new-privileges".into());
    }
    if sc["readOnlyRootFilesystem"] == true {
        // A pod's read-only root has no tmpfs podman would add by default.
        args.extend(["--read-only".into(), "--read-only-tmpfs=false".into()]);
    }
    if let Some(uid) = sc["runAsUser"].as_u64() {
        args.push(format!("--user={uid}"));
    }
    for (name, value) in pod.env("node-1") {
        args.push(format!("--env={name}={value}"));
    }
    let bind = |src: &Path, dst: &str, ro: bool| {
        format!("--mount=type=bind,src={},dst={dst},ro={ro}", src.display())
    };
    for m in pod.mounts() {
        match &m.source {
            Source::ConfigMap(name) if name == "kube-wasm-proxy" => {
                args.push(bind(config_dir, &m.path, m.read_only))
            }
            Source::ConfigMap(name) => panic!("mount {}: unknown ConfigMap {name}", m.name),
            Source::HostPath { path, file } => {
                // The node's path, under a directory of the test's own.
                let src = host.join(path.trim_start_matches('/'));
                if *file {
                    std::fs::create_dir_all(src.parent().unwrap()).unwrap();
                    std::fs::write(&src, "").unwrap();
                } else {
                    std::fs::create_dir_all(&src).unwrap();
                }
                args.push(bind(&src, &m.path, m.read_only));
            }
            Source::EmptyDir { memory, size_limit } => {
                assert!(memory, "mount {}: only memory emptyDirs are known", m.name);
                let size = size_limit
                    .as_deref()
                    .map(|s| format!(",size={}", s.trim_end_matches("i").to_lowercase()))
                    .unwrap_or_default();
                args.push(format!("--tmpfs={}:rw{size}", m.path));
            }
        }
    }
    args.push(bind(sa_dir, daemonset::SERVICE_ACCOUNT_DIR, true));
    args
}

#[test]
fn the_image_runs_under_podman_as_the_daemonset_runs_it() {
    let dir = tempfile::tempdir_in("/var/tmp").unwrap();
    let root = dir.path();
    let storage = Storage {
        root: root.join("storage"),
        runroot: root.join("run"),
    };
    let (image, size, took) = build_image(&storage);
    eprintln!(
        "oci_image: {image}: {size} bytes ({:.1} MiB, one layer, debug binary without DWARF), built in {:.1} s",
        size as f64 / 1048576.0,
        took.as_secs_f64()
    );
    let pod = Pod::load();
    assert_eq!(
        image,
        pod.image(),
        "the image is tagged as the DaemonSet names it"
    );
    assert!(size < IMAGE_SIZE_BUDGET, "the image is {size} bytes");

    // The image's own config: what the Dockerfile declares.
    let out = storage
        .podman(&["image", "inspect", "--format", "{{json .Config}}", &image])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let config: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let dockerfile = deploy_file("Dockerfile");
    let binary = image_path(&dockerfile, "/out/bin/kube-wasm-proxy");
    assert_eq!(config["Entrypoint"], serde_json::json!([binary]));
    assert!(
        dockerfile.contains("EXPOSE 10256") && config["ExposedPorts"].get("10256/tcp").is_some(),
        "{config}"
    );

    // The cluster: RBAC, this node, the pod's token and configuration.
    let cp = ControlPlane::start();
    let admin = cp.admin();
    daemonset::install_rbac_and_node(&admin, "node-1");
    let (config_dir, sa_dir) = (root.join("config"), root.join("serviceaccount"));
    daemonset::write_service_account(&sa_dir, &cp, &admin);
    // docs/deploy.md: set `server` to the API server's address.
    daemonset::write_configmap(&config_dir, |text| {
        text.replace(PLACEHOLDER_SERVER, &cp.url)
    });

    // The node: a namespace with the API server on its loopback, an
    // address for the Service's endpoint and a route for cluster IPs.
    let ns = Netns::new("kwp-oci");
    let _forward = ns.forward_loopback(cp.port());
    ns.sh("ip link add node0 type veth peer name node0-peer \
           && ip link set node0-peer up && ip link set node0 up \
           && ip addr add 10.244.1.5/24 dev node0 && ip route add default dev node0");
    let backend = ns
        .run_in(|| TcpListener::bind("10.244.1.5:8080"))
        .expect("backend listens");
    std::thread::spawn(move || {
        for mut conn in backend.incoming().flatten() {
            let _ = conn.write_all(b"web-1\n");
        }
    });

    // podman run, as the kubelet would start the container.
    let command = pod.command_line("node-1");
    let name = format!("kwp-oci-{}", std::process::id());
    let nofile = {
        let mut limit = libc::rlimit {
            rlim_cur: 0,
            rlim_max: 0,
        };
        assert_eq!(
            unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) },
            0
        );
        limit.rlim_max
    };
    let mut args: Vec<String> = vec![
        "run".into(),
        "--rm".into(),
        "--pull=never".into(),
        format!("--name={name}"),
        format!("--network=ns:/run/netns/{}", ns.name),
        // crun sets every rlimit podman asks for, and this machine's root
        // lacks CAP_SYS_RESOURCE: podman's defaults are refused. Open files
        // as this process may have them; nproc at 32768 (measured: 65536
        // and this machine's own 96555 are refused, 32768 is not).
        format!("--ulimit=nofile={nofile}:{nofile}"),
        "--ulimit=nproc=32768:32768".into(),
    ];
    args.extend(run_args(&pod, &root.join("host"), &config_dir, &sa_dir));
    args.push(format!("--entrypoint={}", command[0]));
    args.push(image.clone());
    args.extend(command[1..].iter().cloned());
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let mut proxy: Child = storage
        .podman(&args)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("podman run");
    let logs = Logs::capture(&mut proxy);
    let _stop_on_panic = KillOnDrop(&storage, &name);

    let get = |url: &str| -> (u16, String) {
        let out = ns.sh(&format!(
            "curl -s --max-time 2 -w '\\n%{{http_code}}' {url} || true"
        ));
        let (body, code) = out.trim_end().rsplit_once('\n').unwrap_or(("", out.trim()));
        (code.trim().parse().unwrap_or(0), body.to_string())
    };
    let readiness = pod.probe_url("readinessProbe");
    daemonset::wait_for(&mut proxy, &logs, "readiness (/healthz 200)", || {
        get(&readiness).0 == 200
    });
    assert_eq!(get(&pod.probe_url("livenessProbe")).0, 200, "liveness");
    let (code, metrics) = get("http://127.0.0.1:10249/metrics");
    assert_eq!(code, 200, "metrics: {metrics}");
    assert!(
        metrics.contains("kubeproxy_sync_proxy_rules_last_timestamp_seconds"),
        "{metrics}"
    );

    // The container's process has the DaemonSet's capabilities and no more.
    let out = storage
        .podman(&["inspect", "--format", "{{.State.Pid}}", &name])
        .output()
        .unwrap();
    let pid = String::from_utf8_lossy(&out.stdout).trim().to_string();
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_else(|e| panic!("the container's process {pid:?}: {e}"));
    let cap = |field: &str| {
        let hex = status.lines().find_map(|l| l.strip_prefix(field)).unwrap();
        u64::from_str_radix(hex.trim(), 16).unwrap()
    };
    const NET_ADMIN_AND_NET_RAW: u64 = (1 << 12) | (1 << 13);
    assert_eq!(cap("CapBnd:"), NET_ADMIN_AND_NET_RAW, "{status}");
    assert_eq!(cap("CapEff:"), NET_ADMIN_AND_NET_RAW, "{status}");
    assert!(status.contains("NoNewPrivs:\t1"), "{status}");

    // A Service through the API becomes rules and carries a connection.
    daemonset::create_web_service(&admin, "10.96.0.77", "10.244.1.5");
    daemonset::wait_for(&mut proxy, &logs, "the Service in the kernel", || {
        ns.sh("nft list table ip kube-wasm-proxy 2>/dev/null || true")
            .contains("10.96.0.77")
    });
    let answer = ns.run_in(|| -> std::io::Result<String> {
        let mut conn =
            TcpStream::connect_timeout(&"10.96.0.77:80".parse().unwrap(), Duration::from_secs(5))?;
        conn.set_read_timeout(Some(Duration::from_secs(5)))?;
        let mut answer = String::new();
        conn.read_to_string(&mut answer)?;
        Ok(answer)
    });
    assert_eq!(
        answer.as_ref().map(|a| a.trim()).ok(),
        Some("web-1"),
        "a connection to the Service's cluster IP: {answer:?}; rules:\n{}\nlogs:\n{}",
        ns.sh("nft list ruleset"),
        logs.text()
    );
    let text = logs.text();
    let plugins = pod
        .command_line("node-1")
        .iter()
        .find_map(|a| a.strip_prefix("--plugin-dir=").map(str::to_string))
        .expect("--plugin-dir in the DaemonSet");
    for plugin in ["nftables.wasm", "round-robin.wasm"] {
        assert!(
            text.contains(&format!("{plugins}/{plugin}")),
            "{plugin} was not loaded from the image's plugin directory:\n{text}"
        );
    }
    assert!(!text.contains("ERROR"), "the proxy logged errors:\n{text}");

    // SIGTERM, as the kubelet stops it: podman passes it on, the proxy
    // exits 0 within the grace period and podman removes the container.
    unsafe { libc::kill(proxy.id() as i32, libc::SIGTERM) };
    let grace = pod.spec["terminationGracePeriodSeconds"]
        .as_u64()
        .unwrap_or(30);
    let stopped = common::poll::until(Duration::from_secs(grace), || {
        proxy.try_wait().ok().flatten().is_some()
    });
    assert!(
        stopped,
        "the container did not stop within {grace} s:\n{}",
        logs.text()
    );
    let status = proxy.wait().unwrap();
    assert!(
        status.success(),
        "the container exited {status}:\n{}",
        logs.text()
    );
}
