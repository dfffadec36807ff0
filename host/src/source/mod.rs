//! Sources of cluster state. Each source sends complete or incremental
//! object sets to the sync loop.

pub mod file;
pub mod kubernetes;

use k8s_openapi::api::core::v1::{Node, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
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
    /// The complete current set of objects (the file source).
    Full {
        services: Vec<Service>,
        slices: Vec<EndpointSlice>,
        node: Option<Node>,
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
