//! Talking to the test API server: `Client` (one identity: admin, a
//! service account) over `kube::Client`, the same client the proxy uses;
//! blocking calls for the tests, on one shared tokio runtime.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Mutex, OnceLock};
use std::time::Duration;

use serde_json::{Value, json};

/// Runs `future` on the client's runtime and waits for it. Spawned rather
/// than `block_on`, so that a test may call the client from inside a runtime
/// of its own (blocking that thread, never nesting runtimes).
fn on_runtime<T: Send + 'static>(
    future: impl std::future::Future<Output = T> + Send + 'static,
) -> T {
    let (tx, rx) = std::sync::mpsc::sync_channel(1);
    runtime().spawn(async move {
        let _ = tx.send(future.await);
    });
    rx.recv()
        .expect("the API client's runtime dropped a request")
}

/// The runtime every blocking call runs its request on.
fn runtime() -> &'static tokio::runtime::Runtime {
    static RUNTIME: OnceLock<tokio::runtime::Runtime> = OnceLock::new();
    RUNTIME.get_or_init(|| {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .expect("a tokio runtime for the API client")
    })
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
    /// One request; `body` is (content type, bytes). Panics when no HTTP
    /// answer came.
    pub fn request(&self, method: &str, path: &str, body: Option<(&str, &str)>) -> Response {
        self.try_request(method, path, body)
            .unwrap_or_else(|e| panic!("{method} {path}: {e}"))
    }

    /// One request through `kube::Client` (the client the proxy itself
    /// uses: TLS against the test CA, the bearer token); Err only when no
    /// HTTP answer came within a minute. Any status is an answer.
    pub fn try_request(
        &self,
        method: &str,
        path: &str,
        body: Option<(&str, &str)>,
    ) -> Result<Response, String> {
        let client = self.kube_client()?;
        let mut request = http::Request::builder()
            .method(method)
            .uri(path)
            .header(http::header::ACCEPT, "application/json");
        if let Some((content_type, _)) = body {
            request = request.header(http::header::CONTENT_TYPE, content_type);
        }
        let bytes = body
            .map(|(_, data)| data.as_bytes().to_vec())
            .unwrap_or_default();
        let request = request
            .body(kube::client::Body::from(bytes))
            .map_err(|e| format!("building the request: {e}"))?;
        on_runtime(async move {
            let answer = async {
                let response = client.send(request).await.map_err(|e| e.to_string())?;
                let status = response.status().as_u16();
                let body = response
                    .into_body()
                    .collect_bytes()
                    .await
                    .map_err(|e| format!("reading the body: {e}"))?;
                Ok(Response {
                    status,
                    body: String::from_utf8_lossy(&body).into_owned(),
                })
            };
            tokio::time::timeout(Duration::from_secs(60), answer)
                .await
                .map_err(|_| "no answer within 60 s".to_string())?
        })
    }

    /// One `kube::Client` per API server and identity, kept for the
    /// process (a client holds a connection pool).
    fn kube_client(&self) -> Result<kube::Client, String> {
        static CLIENTS: OnceLock<Mutex<HashMap<(String, Option<String>), kube::Client>>> =
            OnceLock::new();
        let key = (self.url.clone(), self.token.clone());
        let mut clients = CLIENTS.get_or_init(Mutex::default).lock().unwrap();
        if let Some(client) = clients.get(&key) {
            return Ok(client.clone());
        }
        let url = self
            .url
            .parse()
            .map_err(|e| format!("API server URL {}: {e}", self.url))?;
        let mut config = kube::Config::new(url);
        config.root_cert_file = Some(self.ca_file.clone());
        config.default_retry = false;
        if let Some(token) = &self.token {
            let value = format!("Bearer {token}")
                .parse()
                .map_err(|e| format!("token is not a header value: {e}"))?;
            config.headers.push((http::header::AUTHORIZATION, value));
        }
        // The client's tower stack spawns onto the runtime it is built in.
        let client = on_runtime(async move { kube::Client::try_from(config) })
            .map_err(|e| format!("kube client for {}: {e}", self.url))?;
        clients.insert(key, client.clone());
        Ok(client)
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
        let obj: serde_yaml_ng::Value =
            serde_yaml_ng::from_str(yaml).unwrap_or_else(|e| panic!("not YAML ({e}):\n{yaml}"));
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
    docs.retain(|d| serde_yaml_ng::from_str::<serde_yaml_ng::Value>(d).is_ok_and(|v| !v.is_null()));
    docs
}
