//! Sources of cluster state. Each source sends complete or incremental
//! object sets to the sync loop.

pub mod file;

use k8s_openapi::api::core::v1::{Node, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;

/// What a source reports.
#[derive(Debug)]
pub enum SourceEvent {
    /// The complete current set of objects.
    Full { services: Vec<Service>, slices: Vec<EndpointSlice>, node: Option<Node> },
}

/// Parses `file:DIR` (more kinds come with the kubernetes source).
pub fn parse(spec: &str) -> anyhow::Result<std::path::PathBuf> {
    match spec.split_once(':') {
        Some(("file", dir)) if !dir.is_empty() => Ok(dir.into()),
        _ => anyhow::bail!("unknown --source {spec:?}: expected file:DIR"),
    }
}
