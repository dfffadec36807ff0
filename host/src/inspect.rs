//! `kube-wasm-proxy inspect`: what the running proxy does, Service port by
//! Service port: the policy it chose, that plugin's source and digest, the
//! endpoint count, the last sync's result for it and how many rules it has.
//!
//! The proxier keeps the record, updated only for the Service ports each
//! sync touches (so it costs nothing at 50k Services and one change); the
//! metrics server serves it as JSON at `/inspect`, and the subcommand reads
//! it there. The metrics port, not a new socket: it is already served,
//! bound to 127.0.0.1 by default (like upstream's `/configz`, which shows
//! as much), reachable with `kubectl exec` into the pod or a port-forward,
//! and it needs no socket file shared between processes or mounted.

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{Context, Result, bail};
use serde::{Deserialize, Serialize};

use crate::model::ServicePortName;
use crate::plan::{Fragment, Item};

/// One Service port as the proxy handles it.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ServiceInfo {
    /// `namespace/name:port/protocol`.
    pub service: String,
    /// The policy instance (`name` or `name[config]`).
    pub policy: String,
    /// Where the policy plugin came from (`bundled:round-robin`, a path).
    pub plugin: String,
    /// The plugin's sha256, as loaded or last hot-reloaded.
    pub digest: String,
    /// Endpoints the policy balances over (ready ones, or serving
    /// terminating ones when none is ready).
    pub endpoints: usize,
    /// `ok`, or the last error (its last good rules stay in force).
    pub last_sync: String,
    /// Kernel rules: each rule of a chain, each set element, virtual or
    /// real server, listener.
    pub rules: usize,
}

/// What the registry keeps of one Service port: a [`ServiceInfo`] without
/// its text. The policy, plugin and digest are shared with every other
/// Service port using that policy, and the name and "ok" are written only
/// when `/inspect` is read (at 10k Services the spelled-out record was
/// 5 MiB of the heap, measured with heaptrack).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Record {
    /// The policy instance's label (`name` or `name[config]`).
    pub policy: Arc<str>,
    pub plugin: Arc<str>,
    /// `sha256:<hex>`.
    pub digest: Arc<str>,
    pub endpoints: usize,
    pub rules: usize,
}

#[derive(Debug)]
struct Entry {
    facts: Record,
    /// The last sync's error; `None` is "ok".
    error: Option<String>,
}

/// The proxier's record, shared with the metrics server.
#[derive(Clone, Default)]
pub struct Registry(Arc<Mutex<BTreeMap<ServicePortName, Entry>>>);

impl Registry {
    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeMap<ServicePortName, Entry>> {
        self.0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// `name` synced with these facts.
    pub fn synced(&self, name: &ServicePortName, facts: Record) {
        self.lock()
            .insert(name.clone(), Entry { facts, error: None });
    }

    /// `name` failed this sync; what else is known of it stays.
    pub fn failed(&self, name: &ServicePortName, error: &anyhow::Error) {
        let mut services = self.lock();
        let entry = services.entry(name.clone()).or_insert_with(|| Entry {
            facts: Record::default(),
            error: None,
        });
        entry.error = Some(format!("error: {error:#}"));
    }

    pub fn removed(&self, name: &ServicePortName) {
        self.lock().remove(name);
    }

    /// Everything, as `/inspect` serves it.
    pub fn json(&self) -> String {
        let services: Vec<ServiceInfo> = self
            .lock()
            .iter()
            .map(|(name, Entry { facts, error })| ServiceInfo {
                service: name.to_string(),
                policy: facts.policy.to_string(),
                plugin: facts.plugin.to_string(),
                digest: facts.digest.to_string(),
                endpoints: facts.endpoints,
                last_sync: error.clone().unwrap_or_else(|| "ok".into()),
                rules: facts.rules,
            })
            .collect();
        serde_json::to_string(&services).unwrap_or_else(|_| "[]".into())
    }
}

/// Rules of a fragment, counted as the kernel holds them.
pub fn rule_count(fragment: &Fragment) -> usize {
    fragment
        .items
        .iter()
        .map(|item| match item {
            Item::NftChain { rules, .. } | Item::IptablesChain { rules, .. } => rules.len(),
            Item::NftSet { .. } => 0,
            _ => 1,
        })
        .sum()
}

/// GET `/inspect` from the metrics server at `address` (HTTP/1.0, so the
/// answer ends with the connection).
pub fn fetch(address: &str) -> Result<Vec<ServiceInfo>> {
    let addr: std::net::SocketAddr =
        crate::config::values::bind_address(address, "--address")?.context("--address: empty")?;
    let mut conn = std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(5))
        .with_context(|| {
            format!(
                "connecting to the proxy's metrics server at {addr} \
                 (is kube-wasm-proxy running, with --metrics-bind-address {addr}?)"
            )
        })?;
    conn.set_read_timeout(Some(Duration::from_secs(10)))?;
    conn.write_all(format!("GET /inspect HTTP/1.0\r\nHost: {addr}\r\n\r\n").as_bytes())?;
    let mut answer = Vec::new();
    conn.read_to_end(&mut answer)
        .with_context(|| format!("reading from {addr}"))?;
    let text = String::from_utf8_lossy(&answer);
    let (head, body) = text
        .split_once("\r\n\r\n")
        .with_context(|| format!("{addr} answered no HTTP"))?;
    let status = head.lines().next().unwrap_or_default();
    if !status.contains(" 200 ") {
        bail!("{addr} answered {status:?} to /inspect (an older kube-wasm-proxy?)");
    }
    serde_json::from_str(body).with_context(|| format!("parsing /inspect from {addr}"))
}

/// A table for people, one Service port a line.
pub fn table(services: &[ServiceInfo]) -> String {
    let header = [
        "SERVICE",
        "POLICY",
        "PLUGIN",
        "DIGEST",
        "ENDPOINTS",
        "RULES",
        "LAST SYNC",
    ];
    let rows: Vec<[String; 7]> = services
        .iter()
        .map(|s| {
            [
                s.service.clone(),
                s.policy.clone(),
                s.plugin.clone(),
                // sha256:<12 hex>, as image digests are shortened.
                s.digest.chars().take(19).collect(),
                s.endpoints.to_string(),
                s.rules.to_string(),
                s.last_sync.clone(),
            ]
        })
        .collect();
    let mut widths = header.map(str::len);
    for row in &rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.len());
        }
    }
    let line = |cells: &[&str]| {
        let mut out = String::new();
        for (i, cell) in cells.iter().enumerate() {
            if i + 1 == cells.len() {
                out.push_str(cell);
            } else {
                out.push_str(&format!("{cell:<w$}  ", w = widths[i]));
            }
        }
        out.push('\n');
        out
    };
    let mut out = line(&header);
    for row in &rows {
        out.push_str(&line(&row.each_ref().map(String::as_str)));
    }
    out
}

/// `kube-wasm-proxy inspect`.
pub fn run(address: &str, json: bool) -> Result<()> {
    let services = fetch(address)?;
    if json {
        println!("{}", serde_json::to_string_pretty(&services)?);
    } else {
        print!("{}", table(&services));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn name(s: &str) -> ServicePortName {
        ServicePortName {
            namespace: "shop".into(),
            name: s.into(),
            port: "http".into(),
            protocol: crate::model::Protocol::Tcp,
        }
    }

    #[test]
    fn the_registry_keeps_facts_through_a_failure_and_forgets_removed_services() {
        let r = Registry::default();
        let facts = Record {
            policy: "maglev".into(),
            plugin: "bundled:maglev".into(),
            digest: "sha256:ab".into(),
            endpoints: 3,
            rules: 7,
        };
        let info = ServiceInfo {
            service: "shop/web:http/tcp".into(),
            policy: "maglev".into(),
            plugin: "bundled:maglev".into(),
            digest: "sha256:ab".into(),
            endpoints: 3,
            last_sync: "ok".into(),
            rules: 7,
        };
        r.synced(&name("web"), facts.clone());
        assert_eq!(
            serde_json::from_str::<Vec<ServiceInfo>>(&r.json()).unwrap(),
            [info.clone()]
        );
        r.failed(&name("web"), &anyhow::anyhow!("the kernel said no"));
        r.failed(&name("new"), &anyhow::anyhow!("cannot render"));
        let got: Vec<ServiceInfo> = serde_json::from_str(&r.json()).unwrap();
        assert_eq!(got.len(), 2);
        assert_eq!(got[0].service, "shop/new:http/tcp");
        assert_eq!(got[0].last_sync, "error: cannot render");
        assert_eq!(
            got[1],
            ServiceInfo {
                last_sync: "error: the kernel said no".into(),
                ..info
            }
        );
        r.removed(&name("web"));
        r.removed(&name("new"));
        assert_eq!(r.json(), "[]");
    }

    #[test]
    fn the_table_aligns_columns_and_shortens_digests() {
        let t = table(&[ServiceInfo {
            service: "a/b:p".into(),
            policy: "round-robin".into(),
            plugin: "bundled:round-robin".into(),
            digest: format!("sha256:{}", "f".repeat(64)),
            endpoints: 2,
            last_sync: "ok".into(),
            rules: 5,
        }]);
        let lines: Vec<&str> = t.lines().collect();
        assert_eq!(lines.len(), 2);
        assert!(lines[1].contains("sha256:ffffffffffff "), "{t}");
        let col = |l: &str| l.find("ENDPOINTS").or_else(|| l.find(" 2 ").map(|i| i + 1));
        assert_eq!(col(lines[0]), col(lines[1]), "{t}");
    }
}
