//! A real Kubernetes control plane for the tests: etcd and kube-apiserver
//! on loopback, with RBAC (and Node) authorization, service-account tokens,
//! a static admin token and a throwaway CA. Dropping the `ControlPlane`
//! stops both processes and deletes their data.
//!
//! The binaries come from `scripts/control-plane.sh` (etcd from Debian,
//! kube-apiserver and kube-proxy built once per machine from the Go module
//! k8s.io/kubernetes at a pinned version, cached outside the clone). The API
//! is spoken over HTTPS with `curl`, so no Kubernetes client crate is needed.
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

use serde_json::{Value, json};

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
            let out = Command::new("curl")
                .args(["-sS", "--max-time", "10", "-X", "POST", "--data", body])
                .arg(format!("{}{path}", self.etcd_url))
                .output()
                .expect("curl");
            assert!(
                out.status.success(),
                "etcd {path}: {}",
                String::from_utf8_lossy(&out.stderr)
            );
            serde_json::from_slice(&out.stdout).unwrap_or_else(|e| panic!("etcd {path}: {e}"))
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

/// An HTTP answer.
#[derive(Debug, Clone)]
pub struct Response {
    pub status: u16,
    pub body: String,
}

impl Response {
    pub fn ok(&self) -> bool {
        (200..300).contains(&self.status)
    }

    pub fn json(&self) -> Value {
        serde_json::from_str(&self.body).unwrap_or_else(|e| panic!("not JSON ({e}): {}", self.body))
    }

    /// Panics with `what`, the status and the body unless 2xx; returns the JSON.
    #[track_caller]
    pub fn expect_ok(&self, what: &str) -> Value {
        assert!(self.ok(), "{what}: HTTP {}: {}", self.status, self.body);
        self.json()
    }
}

/// How to send an object with `Client::apply`.
#[derive(Debug, Clone, Copy)]
pub struct Apply {
    /// `dryRun=All`: validated and admitted, not stored.
    pub dry_run: bool,
    /// `fieldValidation=Strict`: unknown or duplicate fields are errors.
    pub strict: bool,
}

impl Apply {
    pub const DRY_RUN: Apply = Apply {
        dry_run: true,
        strict: true,
    };
    pub const FOR_REAL: Apply = Apply {
        dry_run: false,
        strict: true,
    };
}

/// Talks to the API server as one identity.
#[derive(Debug, Clone)]
pub struct Client {
    pub url: String,
    pub ca_file: PathBuf,
    pub token: Option<String>,
}

/// Field manager of everything the tests apply.
pub const FIELD_MANAGER: &str = "kwp-tests";

impl Client {
    /// One request; `body` is (content type, bytes). Panics if curl fails.
    pub fn request(&self, method: &str, path: &str, body: Option<(&str, &str)>) -> Response {
        self.try_request(method, path, body)
            .unwrap_or_else(|e| panic!("{method} {path}: {e}"))
    }

    /// One request; Err only when no HTTP answer came (curl's error).
    pub fn try_request(
        &self,
        method: &str,
        path: &str,
        body: Option<(&str, &str)>,
    ) -> Result<Response, String> {
        let mut cmd = Command::new("curl");
        cmd.args(["-sS", "--max-time", "60", "-X", method, "--cacert"])
            .arg(&self.ca_file);
        cmd.args(["-H", "Accept: application/json", "-w", "\n%{http_code}"]);
        if let Some(token) = &self.token {
            cmd.args(["-H", &format!("Authorization: Bearer {token}")]);
        }
        if let Some((content_type, _)) = body {
            cmd.args([
                "-H",
                &format!("Content-Type: {content_type}"),
                "--data-binary",
                "@-",
            ]);
        }
        cmd.arg(format!("{}{path}", self.url));
        cmd.stdin(if body.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
        let mut child = cmd
            .spawn()
            .map_err(|e| format!("running curl (Debian package curl): {e}"))?;
        if let Some((_, data)) = body {
            let mut stdin = child.stdin.take().unwrap();
            let data = data.to_string();
            std::thread::spawn(move || {
                let _ = stdin.write_all(data.as_bytes());
            });
        }
        let out = child.wait_with_output().map_err(|e| e.to_string())?;
        if !out.status.success() {
            return Err(format!(
                "curl {}: {}",
                out.status,
                String::from_utf8_lossy(&out.stderr).trim()
            ));
        }
        let text = String::from_utf8_lossy(&out.stdout);
        let (body, code) = text.rsplit_once('\n').ok_or("curl printed no status")?;
        Ok(Response {
            status: code
                .trim()
                .parse()
                .map_err(|_| format!("bad status {code:?}"))?,
            body: body.to_string(),
        })
    }

    pub fn get(&self, path: &str) -> Response {
        self.request("GET", path, None)
    }

    pub fn delete(&self, path: &str) -> Response {
        self.request("DELETE", path, None)
    }

    pub fn post(&self, path: &str, body: &Value) -> Response {
        self.request("POST", path, Some(("application/json", &body.to_string())))
    }

    pub fn put(&self, path: &str, body: &Value) -> Response {
        self.request("PUT", path, Some(("application/json", &body.to_string())))
    }

    /// A JSON merge patch.
    pub fn merge_patch(&self, path: &str, body: &Value) -> Response {
        self.request(
            "PATCH",
            path,
            Some(("application/merge-patch+json", &body.to_string())),
        )
    }

    /// POST a YAML object (create) to `path`.
    pub fn post_yaml(&self, path: &str, yaml: &str) -> Response {
        self.request("POST", path, Some(("application/yaml", yaml)))
    }

    /// Server-side apply of one YAML (or JSON) object, wherever its
    /// apiVersion, kind, namespace and name say it lives.
    pub fn apply(&self, yaml: &str, how: Apply) -> Response {
        let obj: serde_yaml::Value =
            serde_yaml::from_str(yaml).unwrap_or_else(|e| panic!("not YAML ({e}):\n{yaml}"));
        let field = |k: &str| {
            obj.get(k)
                .and_then(|v| v.as_str())
                .unwrap_or_else(|| panic!("object has no {k}:\n{yaml}"))
                .to_string()
        };
        let meta = |k: &str| {
            obj.get("metadata")
                .and_then(|m| m.get(k))
                .and_then(|v| v.as_str())
                .map(str::to_string)
        };
        let name = meta("name").unwrap_or_else(|| panic!("object has no metadata.name:\n{yaml}"));
        let path = self.object_path(
            &field("apiVersion"),
            &field("kind"),
            meta("namespace").as_deref(),
            Some(&name),
        );
        let mut query = format!("fieldManager={FIELD_MANAGER}&force=true");
        if how.dry_run {
            query.push_str("&dryRun=All");
        }
        if how.strict {
            query.push_str("&fieldValidation=Strict");
        }
        self.request(
            "PATCH",
            &format!("{path}?{query}"),
            Some(("application/apply-patch+yaml", yaml)),
        )
    }

    /// The REST path of a kind's collection or of one object, found with
    /// discovery. A namespaced kind without a namespace is in `default`.
    pub fn object_path(
        &self,
        api_version: &str,
        kind: &str,
        namespace: Option<&str>,
        name: Option<&str>,
    ) -> String {
        let base = if api_version.contains('/') {
            format!("/apis/{api_version}")
        } else {
            format!("/api/{api_version}")
        };
        let list = self
            .get(&base)
            .expect_ok(&format!("discovery of {api_version}"));
        let resource = list["resources"]
            .as_array()
            .into_iter()
            .flatten()
            .find(|r| r["kind"] == kind && !r["name"].as_str().unwrap_or("/").contains('/'))
            .unwrap_or_else(|| panic!("the API server serves no kind {kind} in {api_version}"));
        let mut path = base;
        if resource["namespaced"].as_bool() == Some(true) {
            path.push_str(&format!("/namespaces/{}", namespace.unwrap_or("default")));
        }
        path.push('/');
        path.push_str(resource["name"].as_str().unwrap());
        if let Some(name) = name {
            path.push('/');
            path.push_str(name);
        }
        path
    }

    /// Creates the namespace unless it exists, and waits until it is there.
    pub fn ensure_namespace(&self, name: &str) {
        let r = self.post(
            "/api/v1/namespaces",
            &json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": name}}),
        );
        assert!(
            r.ok() || r.status == 409,
            "creating namespace {name}: HTTP {}: {}",
            r.status,
            r.body
        );
        super::poll::eventually_within(
            &format!("namespace {name} to appear"),
            Duration::from_secs(20),
            || self.get(&format!("/api/v1/namespaces/{name}")).status == 200,
        );
    }

    /// A token for a ServiceAccount (TokenRequest API), valid for an hour.
    pub fn service_account_token(&self, namespace: &str, name: &str) -> String {
        let body = json!({"apiVersion": "authentication.k8s.io/v1", "kind": "TokenRequest", "spec": {"expirationSeconds": 3600}});
        let r = self.post(
            &format!("/api/v1/namespaces/{namespace}/serviceaccounts/{name}/token"),
            &body,
        );
        r.expect_ok(&format!("token for {namespace}/{name}"))["status"]["token"]
            .as_str()
            .expect("status.token")
            .to_string()
    }

    /// Whether this identity may `verb` `resource` (`services`, or with a
    /// subresource `nodes/status`), by SelfSubjectAccessReview. `namespace`
    /// None asks cluster-wide.
    pub fn can(&self, verb: &str, group: &str, resource: &str, namespace: Option<&str>) -> bool {
        let (resource, subresource) = resource.split_once('/').unwrap_or((resource, ""));
        let mut attrs =
            json!({"verb": verb, "group": group, "resource": resource, "subresource": subresource});
        if let Some(ns) = namespace {
            attrs["namespace"] = json!(ns);
        }
        let body = json!({"apiVersion": "authorization.k8s.io/v1", "kind": "SelfSubjectAccessReview", "spec": {"resourceAttributes": attrs}});
        let r = self.post(
            "/apis/authorization.k8s.io/v1/selfsubjectaccessreviews",
            &body,
        );
        r.expect_ok("SelfSubjectAccessReview")["status"]["allowed"]
            .as_bool()
            .unwrap_or(false)
    }

    /// Who the API server takes this client for (SelfSubjectReview).
    pub fn whoami(&self) -> Value {
        let body = json!({"apiVersion": "authentication.k8s.io/v1", "kind": "SelfSubjectReview"});
        self.post("/apis/authentication.k8s.io/v1/selfsubjectreviews", &body)
            .expect_ok("SelfSubjectReview")["status"]["userInfo"]
            .clone()
    }
}

/// The documents of a multi-document YAML text (`---` lines), without the
/// empty or comment-only ones.
pub fn yaml_documents(text: &str) -> Vec<String> {
    let mut docs = vec![String::new()];
    for line in text.lines() {
        if line.trim_end() == "---" || line.starts_with("--- ") {
            docs.push(String::new());
        } else {
            let doc = docs.last_mut().unwrap();
            doc.push_str(line);
            doc.push('\n');
        }
    }
    docs.retain(|d| serde_yaml::from_str::<serde_yaml::Value>(d).is_ok_and(|v| !v.is_null()));
    docs
}

fn kubeconfig(url: &str, ca: &Path, user: &str) -> String {
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
