//! A real Kubernetes control plane for the tests: etcd and kube-apiserver
//! on loopback, with RBAC (and Node) authorization, service-account tokens,
//! a static admin token and a throwaway CA. Dropping the `ControlPlane`
//! stops both processes and deletes their data.
//!
//! The binaries come from `scripts/control-plane.sh` (etcd from Debian,
//! kube-apiserver and kube-proxy built once per machine from the Go module
//! k8s.io/kubernetes at a pinned version, cached outside the clone). The API
//! is spoken through `kube::Client` (common/api_client.rs).
//!
//! ```ignore
//! let cp = ControlPlane::start();
//! let admin = cp.admin();
//! admin.apply(yaml, Apply::DRY_RUN).expect_ok("dry run");
//! let token = admin.service_account_token("kube-system", "kube-wasm-proxy");
//! let sa = cp.client(&token);
//! assert_eq!(sa.get("/api/v1/services").status, 200);
//! ```

use std::io::Write;
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::sync::{Mutex, OnceLock};
use std::time::Duration;

use serde_json::Value;

// Re-exported for the tests; the benchmark that includes this file by path
// uses only `Client`.
#[allow(unused_imports)]
pub use super::api_client::{Apply, Client, yaml_documents};

/// Paths of the control-plane binaries.
#[derive(Debug, Clone)]
pub struct Binaries {
    pub etcd: PathBuf,
    pub kube_apiserver: PathBuf,
    pub kube_proxy: PathBuf,
}

/// The repository's root (the tests' crate is `host/`).
pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("repository root")
        .to_path_buf()
}

/// Runs `scripts/control-plane.sh` once per test process: installs etcd
/// and builds kube-apiserver and kube-proxy if this machine has not yet
/// (minutes, once), then returns where they are.
pub fn binaries() -> &'static Binaries {
    static BINARIES: OnceLock<Binaries> = OnceLock::new();
    BINARIES.get_or_init(|| {
        let script = repo_root().join("scripts/control-plane.sh");
        let out = Command::new("bash")
            .arg(&script)
            .stdin(Stdio::null())
            .stderr(Stdio::inherit())
            .output()
            .unwrap_or_else(|e| panic!("running {}: {e}", script.display()));
        assert!(
            out.status.success(),
            "{} failed ({}); see its output above",
            script.display(),
            out.status
        );
        let text = String::from_utf8_lossy(&out.stdout);
        let find = |name: &str| -> PathBuf {
            text.lines()
                .find_map(|l| l.strip_prefix(name).and_then(|r| r.strip_prefix('=')))
                .map(PathBuf::from)
                .unwrap_or_else(|| panic!("{} printed no {name}=: {text}", script.display()))
        };
        Binaries {
            etcd: find("ETCD"),
            kube_apiserver: find("KUBE_APISERVER"),
            kube_proxy: find("KUBE_PROXY"),
        }
    })
}

/// The pinned Kubernetes version (`KUBE_VERSION` in the script), e.g. `v1.34.12`.
pub fn kube_version() -> String {
    let script = std::fs::read_to_string(repo_root().join("scripts/control-plane.sh"))
        .expect("read control-plane.sh");
    script
        .lines()
        .find_map(|l| l.strip_prefix("KUBE_VERSION="))
        .map(|v| v.trim().trim_matches('"').to_string())
        .expect("KUBE_VERSION= in control-plane.sh")
}

/// A running etcd and kube-apiserver.
pub struct ControlPlane {
    /// `https://127.0.0.1:PORT`
    pub url: String,
    /// A bearer token of `admin` in group `system:masters`.
    pub admin_token: String,
    /// The CA that signed the serving certificate; also the client CA.
    pub ca_file: PathBuf,
    pub ca_key: PathBuf,
    /// `http://127.0.0.1:PORT`
    pub etcd_url: String,
    /// Everything the two processes own: certificates, keys, logs, etcd's data.
    pub dir: PathBuf,
    secure_port: u16,
    apiserver_flags: Vec<String>,
    _tmp: tempfile::TempDir,
    _slot: super::slots::Slot,
    etcd: Option<Child>,
    apiserver: Option<Child>,
}

/// The service-account issuer the API server is started with.
pub const SERVICE_ACCOUNT_ISSUER: &str = "https://kubernetes.default.svc.cluster.local";
/// The Service cluster-IP range the API server is started with.
pub const SERVICE_CLUSTER_IP_RANGE: &str = "10.96.0.0/16";

impl ControlPlane {
    /// Starts etcd and kube-apiserver on free loopback ports and waits until
    /// the API server is ready (`/readyz`). Panics with the logs if not.
    pub fn start() -> Self {
        Self::start_with(&[])
    }

    /// Like `start`, with more kube-apiserver flags (kept across restarts).
    pub fn start_with(apiserver_flags: &[&str]) -> Self {
        let bins = binaries();
        let flags: Vec<String> = apiserver_flags.iter().map(|f| f.to_string()).collect();
        let mut last = String::new();
        // A port picked free may be taken before the server binds it; retry.
        for _ in 0..3 {
            match Self::try_start(bins, &flags) {
                Ok(cp) => return cp,
                Err(e) if e.contains("address already in use") => last = e,
                Err(e) => panic!("control plane did not start: {e}"),
            }
        }
        panic!("control plane did not start: {last}");
    }

    fn try_start(bins: &Binaries, apiserver_flags: &[String]) -> Result<Self, String> {
        let slot = super::slots::CONTROL_PLANES.take();
        // etcd fsyncs every write; on tmpfs that costs nothing.
        let base = Path::new("/dev/shm");
        let tmp = if base.is_dir() {
            tempfile::Builder::new()
                .prefix("kwp-control-plane-")
                .tempdir_in(base)
        } else {
            tempfile::Builder::new()
                .prefix("kwp-control-plane-")
                .tempdir()
        }
        .map_err(|e| format!("temp dir: {e}"))?;
        let dir = tmp.path().to_path_buf();
        let admin_token = random_token();
        make_pki(&dir)?;
        std::fs::write(
            dir.join("tokens.csv"),
            format!("{admin_token},admin,admin-uid,\"system:masters\"\n"),
        )
        .map_err(|e| e.to_string())?;

        let [client_port, peer_port, secure_port] = free_ports();
        let etcd_url = format!("http://127.0.0.1:{client_port}");
        let peer_url = format!("http://127.0.0.1:{peer_port}");
        let mut etcd = Command::new(&bins.etcd);
        etcd.args([
            "--name",
            "kwp-test",
            "--logger",
            "zap",
            "--log-level",
            "warn",
        ])
        .arg("--data-dir")
        .arg(dir.join("etcd"))
        .args([
            "--listen-client-urls",
            &etcd_url,
            "--advertise-client-urls",
            &etcd_url,
        ])
        .args([
            "--listen-peer-urls",
            &peer_url,
            "--initial-advertise-peer-urls",
            &peer_url,
        ])
        .arg(format!("--initial-cluster=kwp-test={peer_url}"));
        let etcd = spawn_logged(etcd, &dir.join("etcd.log"))?;
        let mut cp = ControlPlane {
            url: format!("https://127.0.0.1:{secure_port}"),
            admin_token,
            ca_file: dir.join("ca.crt"),
            ca_key: dir.join("ca.key"),
            etcd_url,
            dir: dir.clone(),
            _tmp: tmp,
            _slot: slot,
            secure_port,
            apiserver_flags: apiserver_flags.to_vec(),
            etcd: Some(etcd),
            apiserver: None,
        };
        wait_for_port(
            client_port,
            Duration::from_secs(30),
            cp.etcd.as_mut().unwrap(),
        )
        .map_err(|e| format!("etcd: {e}\n{}", cp.etcd_log()))?;

        cp.spawn_apiserver()?;
        cp.wait_ready(Duration::from_secs(90))?;
        Ok(cp)
    }

    /// Starts kube-apiserver (again) on its port, logging to the same file.
    fn spawn_apiserver(&mut self) -> Result<(), String> {
        let bins = binaries();
        let p = |f: &str| self.dir.join(f).display().to_string();
        let mut api = Command::new(&bins.kube_apiserver);
        api.arg(format!("--etcd-servers={}", self.etcd_url))
            .arg(format!("--secure-port={}", self.secure_port))
            .args(["--bind-address=127.0.0.1", "--advertise-address=127.0.0.1"])
            .arg(format!("--tls-cert-file={}", p("serving.crt")))
            .arg(format!("--tls-private-key-file={}", p("serving.key")))
            .arg(format!("--client-ca-file={}", p("ca.crt")))
            .arg(format!("--token-auth-file={}", p("tokens.csv")))
            .arg(format!("--cert-dir={}", p("certs")))
            .args([
                "--authorization-mode=Node,RBAC",
                "--enable-admission-plugins=NodeRestriction",
            ])
            .arg(format!("--service-account-issuer={SERVICE_ACCOUNT_ISSUER}"))
            .arg(format!("--service-account-key-file={}", p("sa.pub")))
            .arg(format!(
                "--service-account-signing-key-file={}",
                p("sa.key")
            ))
            .arg(format!(
                "--service-cluster-ip-range={SERVICE_CLUSTER_IP_RANGE}"
            ))
            // The `kubernetes` Service's Endpoints may not be on loopback.
            .args([
                "--endpoint-reconciler-type=none",
                "--allow-privileged=true",
                "--profiling=false",
            ])
            .args(&self.apiserver_flags);
        self.apiserver = Some(spawn_logged(api, &self.dir.join("kube-apiserver.log"))?);
        Ok(())
    }

    /// Stops kube-apiserver (SIGTERM, as a control-plane upgrade does);
    /// etcd and everything stored stay.
    pub fn stop_apiserver(&mut self) {
        if let Some(child) = self.apiserver.take() {
            stop(child);
        }
    }

    /// Starts kube-apiserver again on the same port and waits until ready.
    pub fn start_apiserver(&mut self) {
        assert!(self.apiserver.is_none(), "kube-apiserver is running");
        self.spawn_apiserver()
            .and_then(|()| self.wait_ready(Duration::from_secs(90)))
            .unwrap_or_else(|e| panic!("kube-apiserver did not come back: {e}"));
    }

    /// Compacts etcd's history up to now, as kube-apiserver does every few
    /// minutes: a watch from an older resourceVersion then gets 410 Gone
    /// (when the API server reads etcd directly, `--watch-cache=false`).
    pub fn compact_etcd(&self) {
        let post = |path: &str, body: &str| -> Value {
            let addr = self.etcd_url.trim_start_matches("http://");
            // HTTP/1.0: etcd's JSON gateway then answers without chunking,
            // so the body is everything after the head.
            let answer = (|| -> std::io::Result<String> {
                let mut stream = TcpStream::connect(addr)?;
                stream.set_read_timeout(Some(Duration::from_secs(10)))?;
                write!(
                    stream,
                    "POST {path} HTTP/1.0\r\nHost: {addr}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
                    body.len()
                )?;
                let mut text = String::new();
                std::io::Read::read_to_string(&mut stream, &mut text)?;
                Ok(text)
            })()
            .unwrap_or_else(|e| panic!("etcd {path}: {e}"));
            let (head, json) = answer.split_once("\r\n\r\n").unwrap_or((&answer, ""));
            assert!(
                head.starts_with("HTTP/1.0 200") || head.starts_with("HTTP/1.1 200"),
                "etcd {path}: {head}"
            );
            serde_json::from_str(json).unwrap_or_else(|e| panic!("etcd {path}: {e}: {json}"))
        };
        // The current revision is in every answer's header.
        let head = post("/v3/kv/range", r#"{"key": "AA==", "count_only": true}"#);
        let revision = head["header"]["revision"]
            .as_str()
            .unwrap_or_else(|| panic!("no revision in {head}"));
        let done = post(
            "/v3/kv/compaction",
            &format!(r#"{{"revision": "{revision}", "physical": true}}"#),
        );
        assert!(done.get("header").is_some(), "compaction failed: {done}");
    }

    /// The API server's port, on 127.0.0.1.
    pub fn port(&self) -> u16 {
        self.secure_port
    }

    fn wait_ready(&mut self, timeout: Duration) -> Result<(), String> {
        let mut exited = None;
        let mut last = Err(String::new());
        let ready = super::poll::until(timeout, || {
            exited = self.apiserver.as_mut().unwrap().try_wait().ok().flatten();
            last = self.admin().try_request("GET", "/readyz", None);
            exited.is_some() || last.as_ref().is_ok_and(|r| r.status == 200)
        });
        if let Some(status) = exited {
            return Err(format!(
                "kube-apiserver exited ({status}):\n{}",
                self.apiserver_log()
            ));
        }
        if !ready {
            let why = match last {
                Ok(r) => self.admin().get("/readyz?verbose").body + &r.body,
                Err(e) => e,
            };
            return Err(format!(
                "kube-apiserver not ready after {timeout:?}: {why}\n{}",
                self.apiserver_log()
            ));
        }
        Ok(())
    }

    /// A client with the admin token.
    pub fn admin(&self) -> Client {
        self.client(&self.admin_token)
    }

    /// A client with this bearer token.
    pub fn client(&self, token: &str) -> Client {
        Client {
            url: self.url.clone(),
            ca_file: self.ca_file.clone(),
            token: Some(token.to_string()),
        }
    }

    /// A client that presents no credentials.
    pub fn anonymous(&self) -> Client {
        Client {
            url: self.url.clone(),
            ca_file: self.ca_file.clone(),
            token: None,
        }
    }

    /// Writes a kubeconfig that reaches this API server with `token`.
    pub fn write_kubeconfig(&self, path: &Path, token: &str) {
        std::fs::write(
            path,
            kubeconfig(&self.url, &self.ca_file, &format!("token: {token}")),
        )
        .expect("write kubeconfig");
    }

    /// Writes a kubeconfig that reads its token from `token_file` (as a pod's
    /// projected service-account token is read).
    pub fn write_kubeconfig_token_file(&self, path: &Path, token_file: &Path) {
        let user = format!("tokenFile: {}", token_file.display());
        std::fs::write(path, kubeconfig(&self.url, &self.ca_file, &user))
            .expect("write kubeconfig");
    }

    /// A client certificate and key for `user` in `groups`, signed by the
    /// client CA (e.g. `system:node:NAME` in `system:nodes` for the Node
    /// authorizer). Returns (cert, key) paths.
    pub fn client_cert(&self, user: &str, groups: &[&str]) -> (PathBuf, PathBuf) {
        let stem = user.replace(|c: char| !c.is_ascii_alphanumeric(), "_");
        let (cert, key, csr) = (
            self.dir.join(format!("{stem}.crt")),
            self.dir.join(format!("{stem}.key")),
            self.dir.join(format!("{stem}.csr")),
        );
        let subject: String = groups
            .iter()
            .map(|g| format!("/O={g}"))
            .chain([format!("/CN={user}")])
            .collect();
        let ext = self.dir.join(format!("{stem}.ext"));
        std::fs::write(&ext, "basicConstraints=CA:FALSE\nkeyUsage=digitalSignature,keyEncipherment\nextendedKeyUsage=clientAuth\n").unwrap();
        openssl(&[
            "req",
            "-new",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-keyout",
            s(&key),
            "-out",
            s(&csr),
            "-subj",
            &subject,
        ])
        .unwrap();
        openssl(&[
            "x509",
            "-req",
            "-in",
            s(&csr),
            "-CA",
            s(&self.ca_file),
            "-CAkey",
            s(&self.ca_key),
            "-CAcreateserial",
            "-days",
            "2",
            "-out",
            s(&cert),
            "-extfile",
            s(&ext),
        ])
        .unwrap();
        (cert, key)
    }

    pub fn apiserver_log(&self) -> String {
        tail(&self.dir.join("kube-apiserver.log"), 60)
    }

    pub fn etcd_log(&self) -> String {
        tail(&self.dir.join("etcd.log"), 40)
    }
}

impl Drop for ControlPlane {
    fn drop(&mut self) {
        // The API server first, so it does not log etcd going away.
        for child in [self.apiserver.take(), self.etcd.take()]
            .into_iter()
            .flatten()
        {
            stop(child);
        }
    }
}

/// Ends a child: SIGTERM, then SIGKILL if it is still there after 10 s.
fn stop(mut child: Child) {
    unsafe { libc::kill(child.id() as libc::pid_t, libc::SIGTERM) };
    if super::poll::until(Duration::from_secs(10), || {
        child.try_wait().ok().flatten().is_some()
    }) {
        return;
    }
    let _ = child.kill();
    let _ = child.wait();
}

/// A kubeconfig for `url` trusting `ca`, with `user` (a `token:` or
/// `tokenFile:` line).
pub fn kubeconfig(url: &str, ca: &Path, user: &str) -> String {
    format!(
        "apiVersion: v1\nkind: Config\nclusters:\n- name: kwp-test\n  cluster:\n    server: {url}\n    certificate-authority: {}\n\
         users:\n- name: kwp-test\n  user:\n    {user}\ncontexts:\n- name: kwp-test\n  context:\n    cluster: kwp-test\n    user: kwp-test\n\
         current-context: kwp-test\n",
        ca.display()
    )
}

fn s(p: &Path) -> &str {
    p.to_str().expect("UTF-8 path")
}

fn openssl(args: &[&str]) -> Result<(), String> {
    let out = Command::new("openssl")
        .args(args)
        .stdin(Stdio::null())
        .output()
        .map_err(|e| format!("running openssl: {e}"))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "openssl {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        ))
    }
}

/// A CA, a serving certificate for 127.0.0.1 signed by it, and the
/// service-account signing key pair.
fn make_pki(dir: &Path) -> Result<(), String> {
    let f = |n: &str| dir.join(n);
    openssl(&[
        "req",
        "-x509",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-keyout",
        s(&f("ca.key")),
        "-out",
        s(&f("ca.crt")),
        "-days",
        "2",
        "-subj",
        "/CN=kwp-test-ca",
    ])?;
    std::fs::write(
        f("serving.ext"),
        "basicConstraints=CA:FALSE\nkeyUsage=digitalSignature,keyEncipherment\nextendedKeyUsage=serverAuth\n\
         subjectAltName=IP:127.0.0.1,DNS:localhost,DNS:kubernetes,DNS:kubernetes.default,DNS:kubernetes.default.svc\n",
    )
    .map_err(|e| e.to_string())?;
    openssl(&[
        "req",
        "-new",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-keyout",
        s(&f("serving.key")),
        "-out",
        s(&f("serving.csr")),
        "-subj",
        "/CN=kube-apiserver",
    ])?;
    openssl(&[
        "x509",
        "-req",
        "-in",
        s(&f("serving.csr")),
        "-CA",
        s(&f("ca.crt")),
        "-CAkey",
        s(&f("ca.key")),
        "-CAcreateserial",
        "-days",
        "2",
        "-out",
        s(&f("serving.crt")),
        "-extfile",
        s(&f("serving.ext")),
    ])?;
    openssl(&["genrsa", "-out", s(&f("sa.key")), "2048"])?;
    openssl(&[
        "rsa",
        "-in",
        s(&f("sa.key")),
        "-pubout",
        "-out",
        s(&f("sa.pub")),
    ])?;
    Ok(())
}

fn random_token() -> String {
    let mut bytes = [0u8; 16];
    let mut file = std::fs::File::open("/dev/urandom").expect("/dev/urandom");
    std::io::Read::read_exact(&mut file, &mut bytes).expect("random bytes");
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Three distinct ports that were free a moment ago.
fn free_ports() -> [u16; 3] {
    let listeners: Vec<TcpListener> = (0..3)
        .map(|_| TcpListener::bind("127.0.0.1:0").expect("bind"))
        .collect();
    let ports: Vec<u16> = listeners
        .iter()
        .map(|l| l.local_addr().unwrap().port())
        .collect();
    [ports[0], ports[1], ports[2]]
}

fn wait_for_port(port: u16, timeout: Duration, child: &mut Child) -> Result<(), String> {
    let addr = SocketAddr::from(([127, 0, 0, 1], port));
    let mut exited = None;
    let up = super::poll::until(timeout, || {
        exited = child.try_wait().ok().flatten();
        exited.is_some() || TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_ok()
    });
    match exited {
        Some(status) => Err(format!("exited ({status})")),
        None if up => Ok(()),
        None => Err(format!("nothing listens on {addr} after {timeout:?}")),
    }
}

fn tail(path: &Path, lines: usize) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let all: Vec<&str> = text.lines().collect();
    let from = all.len().saturating_sub(lines);
    format!(
        "--- last lines of {} ---\n{}",
        path.display(),
        all[from..].join("\n")
    )
}

/// Starts `cmd` with stdout and stderr to `log`. The child gets SIGKILL if
/// this test process dies without dropping its `ControlPlane`: children are
/// forked by one thread that lives as long as the process, since
/// PR_SET_PDEATHSIG fires when the forking *thread* ends.
fn spawn_logged(mut cmd: Command, log: &Path) -> Result<Child, String> {
    let file = std::fs::File::create(log).map_err(|e| format!("{}: {e}", log.display()))?;
    let err = file.try_clone().map_err(|e| e.to_string())?;
    cmd.stdin(Stdio::null()).stdout(file).stderr(err);
    unsafe {
        cmd.pre_exec(|| {
            libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
            Ok(())
        });
    }
    type Job = (Command, mpsc::Sender<std::io::Result<Child>>);
    static SPAWNER: OnceLock<Mutex<mpsc::Sender<Job>>> = OnceLock::new();
    let spawner = SPAWNER.get_or_init(|| {
        let (tx, rx) = mpsc::channel::<Job>();
        std::thread::Builder::new()
            .name("control-plane-spawner".into())
            .spawn(move || {
                for (mut cmd, reply) in rx {
                    let _ = reply.send(cmd.spawn());
                }
            })
            .expect("spawner thread");
        Mutex::new(tx)
    });
    let program = cmd.get_program().to_string_lossy().into_owned();
    let (reply, answer) = mpsc::channel();
    spawner
        .lock()
        .unwrap()
        .send((cmd, reply))
        .expect("spawner alive");
    answer
        .recv()
        .expect("spawner answers")
        .map_err(|e| format!("starting {program}: {e}"))
}
