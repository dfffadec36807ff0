//! `--source file:DIR`: Kubernetes YAML or JSON files (Service,
//! EndpointSlice, Node, or a `kind: List` of them, as `kubectl get -o yaml`
//! prints), followed by polling the directory.
//!
//! A file that fails to parse is reported with its path and reason and its
//! previous good contents stay in force, so a half-written or broken file
//! never removes rules.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use anyhow::{Context, Result, bail};
use k8s_openapi::api::core::v1::{Node, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use serde::Deserialize;
use tokio::sync::mpsc;

use super::SourceEvent;

/// How often the directory is scanned for changes.
pub const POLL_INTERVAL: Duration = Duration::from_millis(200);

/// The objects found in one file.
#[derive(Clone, Debug, Default)]
pub struct Objects {
    pub services: Vec<Service>,
    pub slices: Vec<EndpointSlice>,
    pub nodes: Vec<Node>,
}

/// Parses one file's documents. Unknown kinds are ignored (a directory
/// may hold Deployments too); a known kind that does not parse is an error.
pub fn parse_objects(text: &str) -> Result<Objects> {
    let mut out = Objects::default();
    for (i, doc) in serde_yaml::Deserializer::from_str(text).enumerate() {
        let value =
            serde_yaml::Value::deserialize(doc).with_context(|| format!("document {}", i + 1))?;
        if value.is_null() {
            continue;
        }
        add_object(value, &mut out).with_context(|| format!("document {}", i + 1))?;
    }
    Ok(out)
}

fn add_object(value: serde_yaml::Value, out: &mut Objects) -> Result<()> {
    let kind = value
        .get("kind")
        .and_then(|k| k.as_str())
        .unwrap_or_default()
        .to_string();
    match kind.as_str() {
        "Service" => out
            .services
            .push(serde_yaml::from_value(value).context("invalid Service")?),
        "EndpointSlice" => out
            .slices
            .push(serde_yaml::from_value(value).context("invalid EndpointSlice")?),
        "Node" => out
            .nodes
            .push(serde_yaml::from_value(value).context("invalid Node")?),
        "List" | "ServiceList" | "EndpointSliceList" | "NodeList" => {
            let serde_yaml::Value::Mapping(mut map) = value else {
                bail!("invalid {kind}")
            };
            let items = map.remove("items").unwrap_or_default();
            let serde_yaml::Value::Sequence(items) = items else {
                bail!("{kind} without items")
            };
            for (i, mut item) in items.into_iter().enumerate() {
                // Typed lists may leave out each item's kind.
                if let (Some(kind), serde_yaml::Value::Mapping(m)) = (
                    kind.strip_suffix("List").filter(|k| !k.is_empty()),
                    &mut item,
                ) {
                    m.entry("kind".into()).or_insert(kind.into());
                }
                add_object(item, out).with_context(|| format!("item {i}"))?;
            }
        }
        "" => bail!("object without kind"),
        _ => {}
    }
    Ok(())
}

/// (modified time, size): a file is re-read only when this changes.
type Fingerprint = (SystemTime, u64);

/// Directory state between scans.
pub struct FileSource {
    dir: PathBuf,
    node_name: String,
    files: BTreeMap<PathBuf, (Fingerprint, Objects)>,
    /// Files that failed to parse at their current fingerprint.
    broken: BTreeMap<PathBuf, Fingerprint>,
    /// Parse errors reported so far (exported as a metric).
    pub errors: u64,
}

impl FileSource {
    pub fn new(dir: &Path, node_name: &str) -> Self {
        Self {
            dir: dir.into(),
            node_name: node_name.into(),
            files: BTreeMap::new(),
            broken: BTreeMap::new(),
            errors: 0,
        }
    }

    /// Scans the directory; `Some` with the complete object set if anything changed.
    pub fn scan(&mut self) -> Result<Option<SourceEvent>> {
        let mut seen = Vec::new();
        let mut changed = false;
        for path in list_files(&self.dir)? {
            let Ok(meta) = std::fs::metadata(&path) else {
                continue;
            };
            let fingerprint = (
                meta.modified().unwrap_or(SystemTime::UNIX_EPOCH),
                meta.len(),
            );
            seen.push(path.clone());
            if self
                .files
                .get(&path)
                .is_some_and(|(f, _)| *f == fingerprint)
                || self.broken.get(&path) == Some(&fingerprint)
            {
                continue;
            }
            match std::fs::read_to_string(&path)
                .map_err(anyhow::Error::from)
                .and_then(|t| parse_objects(&t))
            {
                Ok(objects) => {
                    self.broken.remove(&path);
                    self.files.insert(path, (fingerprint, objects));
                    changed = true;
                }
                Err(e) => {
                    self.errors += 1;
                    tracing::error!(path = %path.display(), error = format!("{e:#}"), "skipping malformed file; its last good contents stay in force");
                    self.broken.insert(path, fingerprint);
                }
            }
        }
        let before = self.files.len();
        self.files.retain(|p, _| seen.contains(p));
        self.broken.retain(|p, _| seen.contains(p));
        changed |= self.files.len() != before;
        Ok(changed.then(|| self.event()))
    }

    fn event(&self) -> SourceEvent {
        let mut services = Vec::new();
        let mut slices = Vec::new();
        let mut node = None;
        for (_, objects) in self.files.values() {
            services.extend(objects.services.iter().cloned());
            slices.extend(objects.slices.iter().cloned());
            node = node.or_else(|| {
                objects
                    .nodes
                    .iter()
                    .find(|n| n.metadata.name.as_deref() == Some(self.node_name.as_str()))
                    .cloned()
            });
        }
        SourceEvent::Full {
            services,
            slices,
            node,
        }
    }

    /// Polls forever, sending an event whenever the directory changes.
    pub async fn run(mut self, tx: mpsc::Sender<SourceEvent>) {
        let mut ticker = tokio::time::interval(POLL_INTERVAL);
        loop {
            ticker.tick().await;
            match self.scan() {
                Ok(Some(event)) => {
                    if tx.send(event).await.is_err() {
                        return;
                    }
                }
                Ok(None) => {}
                Err(e) => {
                    tracing::error!(dir = %self.dir.display(), error = format!("{e:#}"), "cannot scan source directory")
                }
            }
        }
    }
}

fn list_files(dir: &Path) -> Result<Vec<PathBuf>> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for entry in std::fs::read_dir(&d).with_context(|| format!("reading {}", d.display()))? {
            let path = entry?.path();
            let name = path
                .file_name()
                .and_then(|n| n.to_str())
                .unwrap_or_default();
            if name.starts_with('.') {
                continue; // editors' and atomic writers' temporary files
            }
            if path.is_dir() {
                stack.push(path);
            } else if name.ends_with(".yaml") || name.ends_with(".yml") || name.ends_with(".json") {
                out.push(path);
            }
        }
    }
    out.sort();
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_lists_multi_documents_and_ignores_other_kinds() {
        let text = "apiVersion: v1\nkind: List\nitems:\n- apiVersion: v1\n  kind: Service\n  metadata: {name: a}\n  spec: {clusterIP: 10.0.0.1, ports: [{port: 80}]}\n\
                    ---\napiVersion: apps/v1\nkind: Deployment\nmetadata: {name: d}\n---\n\
                    apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata: {name: a-1, labels: {kubernetes.io/service-name: a}}\naddressType: IPv4\nendpoints: []\n";
        let o = parse_objects(text).unwrap();
        assert_eq!(o.services.len(), 1);
        assert_eq!(o.slices.len(), 1);
    }

    #[test]
    fn malformed_file_keeps_its_last_good_contents() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("svc.yaml");
        std::fs::write(
            &f,
            "kind: Service\nmetadata: {name: a}\nspec: {clusterIP: 10.0.0.1}\n",
        )
        .unwrap();
        let mut src = FileSource::new(dir.path(), "n");
        let Some(SourceEvent::Full { services, .. }) = src.scan().unwrap() else {
            panic!("no event")
        };
        assert_eq!(services.len(), 1);

        std::fs::write(
            &f,
            "kind: Service\nmetadata: {name: a}\nspec: {ports: notalist}\n",
        )
        .unwrap();
        assert!(
            src.scan().unwrap().is_none(),
            "a broken file must not change the state"
        );
        assert_eq!(src.errors, 1);
        assert!(src.scan().unwrap().is_none());
        assert_eq!(src.errors, 1, "the same broken contents are reported once");

        std::fs::remove_file(&f).unwrap();
        let Some(SourceEvent::Full { services, .. }) = src.scan().unwrap() else {
            panic!("no event")
        };
        assert!(services.is_empty(), "deleting the file removes its objects");
    }
}
