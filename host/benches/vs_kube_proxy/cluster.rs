//! What the bench writes through the API: the namespace and Node, N
//! Services with one EndpointSlice each, and the changes it times.

use anyhow::{Context, Result};
use futures::StreamExt;
use k8s_openapi::api::core::v1::{Namespace, Node, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::api::{Api, DeleteParams, Patch, PatchParams, PostParams};
use serde_json::json;

pub const NAMESPACE: &str = "bench";
pub const NODE: &str = "node-1";

pub async fn client(kubeconfig: &std::path::Path) -> Result<kube::Client> {
    let kc = kube::config::Kubeconfig::read_from(kubeconfig)?;
    let config = kube::Config::from_custom_kubeconfig(kc, &Default::default()).await?;
    Ok(kube::Client::try_from(config)?)
}

pub async fn setup(client: &kube::Client) -> Result<()> {
    let pp = PostParams::default();
    let ns: Namespace = serde_json::from_value(json!({"metadata": {"name": NAMESPACE}}))?;
    Api::<Namespace>::all(client.clone())
        .create(&pp, &ns)
        .await?;
    let node: Node = serde_json::from_value(json!({
        "metadata": {"name": NODE},
        "status": {"addresses": [{"type": "InternalIP", "address": "10.0.0.1"}]},
    }))?;
    Api::<Node>::all(client.clone()).create(&pp, &node).await?;
    Ok(())
}

/// Endpoints of Service `s`: 3 to 7, so Services span several slot counts.
fn endpoints(s: usize, first: Option<&str>) -> serde_json::Value {
    let eps: Vec<serde_json::Value> = (0..3 + s % 5)
        .map(|e| {
            let idx = s * 8 + e;
            let ip = match first {
                Some(ip) if e == 0 => ip.to_string(),
                _ => format!(
                    "172.{}.{}.{}",
                    16 + (idx >> 16) % 16,
                    (idx >> 8) % 256,
                    idx % 256
                ),
            };
            json!({"addresses": [ip], "conditions": {"ready": true}, "nodeName": NODE})
        })
        .collect();
    serde_json::Value::Array(eps)
}

fn slice(s: usize, first: Option<&str>) -> Result<EndpointSlice> {
    Ok(serde_json::from_value(json!({
        "metadata": {"name": format!("s{s}-1"), "labels": {"kubernetes.io/service-name": format!("s{s}")}},
        "addressType": "IPv4",
        "ports": [{"name": "http", "port": 8080, "protocol": "TCP"}],
        "endpoints": endpoints(s, first),
    }))?)
}

fn service(s: usize) -> Result<Service> {
    Ok(serde_json::from_value(json!({
        "metadata": {"name": format!("s{s}")},
        "spec": {"ports": [{"name": "http", "port": 80, "targetPort": 8080}]},
    }))?)
}

/// Services `from..to`, each with its EndpointSlice, 16 requests at a time.
pub async fn create(client: &kube::Client, from: usize, to: usize) -> Result<()> {
    let services: Api<Service> = Api::namespaced(client.clone(), NAMESPACE);
    let slices: Api<EndpointSlice> = Api::namespaced(client.clone(), NAMESPACE);
    let results: Vec<Result<()>> = futures::stream::iter(from..to)
        .map(|s| {
            let (services, slices) = (services.clone(), slices.clone());
            async move {
                let pp = PostParams::default();
                services
                    .create(&pp, &service(s)?)
                    .await
                    .with_context(|| format!("Service s{s}"))?;
                slices
                    .create(&pp, &slice(s, None)?)
                    .await
                    .with_context(|| format!("EndpointSlice s{s}-1"))?;
                Ok(())
            }
        })
        .buffer_unordered(16)
        .collect()
        .await;
    results.into_iter().collect()
}

/// Moves endpoint 0 of Service `s` to `ip`.
pub async fn move_endpoint(client: &kube::Client, s: usize, ip: &str) -> Result<()> {
    let slices: Api<EndpointSlice> = Api::namespaced(client.clone(), NAMESPACE);
    let patch = json!({"endpoints": endpoints(s, Some(ip))});
    slices
        .patch(
            &format!("s{s}-1"),
            &PatchParams::default(),
            &Patch::Merge(&patch),
        )
        .await
        .with_context(|| format!("patching EndpointSlice s{s}-1"))?;
    Ok(())
}

/// Creates Service `s` whose EndpointSlice is already there (written
/// first, so a proxy never sees it without endpoints), returning its
/// cluster IP once the Service write has returned.
pub async fn add_service(client: &kube::Client, s: usize) -> Result<std::net::Ipv4Addr> {
    let services: Api<Service> = Api::namespaced(client.clone(), NAMESPACE);
    let slices: Api<EndpointSlice> = Api::namespaced(client.clone(), NAMESPACE);
    let pp = PostParams::default();
    slices
        .create(&pp, &slice(s, None)?)
        .await
        .with_context(|| format!("EndpointSlice s{s}-1"))?;
    // The slice alone changes nothing, yet starts a sync; past the
    // proxies' minSyncPeriod (1 s) the Service's sync is not held back.
    tokio::time::sleep(std::time::Duration::from_secs(2)).await;
    let created = services
        .create(&pp, &service(s)?)
        .await
        .with_context(|| format!("Service s{s}"))?;
    let ip = created
        .spec
        .and_then(|spec| spec.cluster_ip)
        .with_context(|| format!("Service s{s} without a cluster IP"))?;
    ip.parse()
        .with_context(|| format!("cluster IP {ip} of Service s{s}"))
}

/// Deletes Service `s` (the write timed) and then its EndpointSlice.
pub async fn delete_service(client: &kube::Client, s: usize) -> Result<()> {
    let services: Api<Service> = Api::namespaced(client.clone(), NAMESPACE);
    services
        .delete(&format!("s{s}"), &DeleteParams::default())
        .await
        .with_context(|| format!("deleting Service s{s}"))?;
    Ok(())
}

pub async fn delete_slice(client: &kube::Client, s: usize) -> Result<()> {
    let slices: Api<EndpointSlice> = Api::namespaced(client.clone(), NAMESPACE);
    slices
        .delete(&format!("s{s}-1"), &DeleteParams::default())
        .await
        .with_context(|| format!("deleting EndpointSlice s{s}-1"))?;
    Ok(())
}
