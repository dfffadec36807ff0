//! Sources of cluster state. Each source sends what changed to the sync
//! loop, object by object (the API server) or file by file (files); neither
//! keeps the objects it sent: the state holds their converted records.

pub mod file;
pub mod kubernetes;

use k8s_openapi::api::core::v1::{Node, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Kind {
    Service,
    EndpointSlice,
    Node,
}

#[derive(Debug)]
pub enum Object {
    Service(Service),
    Slice(EndpointSlice),
    Node(Node),
}

/// What a source reports.
#[derive(Debug)]
pub enum SourceEvent {
    /// Objects gone and objects added or changed, applied together (the
    /// file source: one file's objects, changed or not, and what it no
    /// longer holds).
    Batch {
        deleted: Vec<(Kind, crate::model::ObjectKey)>,
        applied: Vec<Object>,
    },
    /// One object added or changed (the kubernetes source).
    Apply(Object),
    /// One object gone: its kind and key.
    Delete(Kind, crate::model::ObjectKey),
    /// The first (or a re-) listing of a kind is complete.
    Synced(Kind),
}

/// Where state comes from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Spec {
    File(std::path::PathBuf),
    Kubernetes,
}

/// Parses `--source`: `file:DIR` or `kubernetes`.
pub fn parse(spec: &str) -> anyhow::Result<Spec> {
    match spec.split_once(':') {
        Some(("file", dir)) if !dir.is_empty() => Ok(Spec::File(dir.into())),
        None if spec == "kubernetes" => Ok(Spec::Kubernetes),
        _ => anyhow::bail!("unknown --source {spec:?}: expected file:DIR or kubernetes"),
    }
}
