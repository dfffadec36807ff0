//! `--source kubernetes`: watches the API server like upstream kube-proxy:
//! Services and EndpointSlices with upstream's label selector (not those
//! handed to another proxy, not headless: the API server filters them, so
//! they cost this node nothing), and this node's Node object. Watch errors, 410 Gone and
//! API-server restarts are retried with backoff and a relist; meanwhile the
//! rules in force stay as they are. Objects that vanished while the watch
//! was down are deleted when the relist completes.
//!
//! The initial list streams over the watch itself (`sendInitialEvents`, the
//! API server's WatchList feature, on by default since Kubernetes 1.32): the
//! API server sends the objects from its watch cache one by one instead of
//! building one large LIST response, which is what it costs when every node
//! relists at once. An API server that refuses it (the feature gate off,
//! older than 1.27, an etcd without progress notifications) is listed in
//! pages of 500 instead, for the rest of the process.

use std::collections::BTreeSet;
use std::fmt::Debug;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use anyhow::{Context, Result};
use futures::StreamExt;
use k8s_openapi::api::core::v1::{Node, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::runtime::WatchStreamExt;
use kube::runtime::watcher::{self, Event};
use kube::{Api, Client, Resource};
use serde::de::DeserializeOwned;
use tokio::sync::mpsc;

use super::{Kind, Object, SourceEvent};
use crate::model::ObjectKey;
use crate::state::convert::{LABEL_HEADLESS, LABEL_SERVICE_PROXY_NAME};

/// A client from `kubeconfig` if given, else in-cluster or `~/.kube/config`.
pub async fn client(kubeconfig: Option<&PathBuf>) -> Result<Client> {
    let config = match kubeconfig {
        Some(path) => {
            let kc = kube::config::Kubeconfig::read_from(path)
                .with_context(|| format!("reading kubeconfig {}", path.display()))?;
            kube::Config::from_custom_kubeconfig(kc, &kube::config::KubeConfigOptions::default())
                .await
                .context("loading kubeconfig")?
        }
        None => kube::Config::infer()
            .await
            .context("no kubeconfig given and no in-cluster service account")?,
    };
    Client::try_from(with_timeouts(config)?).context("creating the API client")
}

/// How long one read from the API server may wait (issue 14): a request
/// whose answer stalls (a hung API server, a list that sent its headers and
/// nothing more) fails after this and is retried with the watch's backoff,
/// instead of holding that watch for ever (kube-rs sets no read timeout; its
/// watcher only notices a silent watch stream after 295 s, and a stalled
/// list never). A healthy watch is never this quiet: the API server sends
/// a bookmark about every minute (kube-rs asks for them). client-go's
/// equivalent is its HTTP/2 health check (a ping after 30 s of silence,
/// failing the connection 15 s later). `KWP_API_READ_TIMEOUT` (e.g. `10s`)
/// overrides it, for tests.
pub const API_READ_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(120);

/// `config` with kwp's client timeouts: connect as kube-rs does (30 s,
/// TCP and TLS), reads bounded by [`API_READ_TIMEOUT`], counted from when
/// the request was written (not from when a pooled connection went idle).
fn with_timeouts(mut config: kube::Config) -> Result<kube::Config> {
    let read = match std::env::var("KWP_API_READ_TIMEOUT") {
        Ok(v) => crate::config::parse_duration(&v)
            .map_err(|e| anyhow::anyhow!("KWP_API_READ_TIMEOUT: {e}"))?,
        Err(_) => API_READ_TIMEOUT,
    };
    config.read_timeout = Some(read);
    config.reset_reader_on_write = true;
    Ok(config)
}

/// Watches until `tx` closes. `errors` counts watch errors (a metric).
pub async fn run(
    client: Client,
    node_name: String,
    tx: mpsc::Sender<SourceEvent>,
    errors: Arc<AtomicU64>,
) {
    tokio::spawn(announce_start(client.clone(), node_name.clone()));
    // Upstream's informers list both kinds with this selector; the
    // EndpointSlice controller copies both labels onto a Service's slices.
    let selector = format!("!{LABEL_SERVICE_PROXY_NAME},!{LABEL_HEADLESS}");
    let services = watcher::Config::default().labels(&selector);
    let slices = watcher::Config::default().labels(&selector);
    let node = watcher::Config::default().fields(&format!("metadata.name={node_name}"));
    tokio::join!(
        watch(
            Api::<Service>::all(client.clone()),
            services,
            Kind::Service,
            Object::Service,
            tx.clone(),
            errors.clone()
        ),
        watch(
            Api::<EndpointSlice>::all(client.clone()),
            slices,
            Kind::EndpointSlice,
            Object::Slice,
            tx.clone(),
            errors.clone()
        ),
        watch(
            Api::<Node>::all(client),
            node,
            Kind::Node,
            Object::Node,
            tx,
            errors
        ),
    );
}

/// Records a `Starting` event on this node, as upstream kube-proxy does at
/// start (action `StartKubeProxy`). Best effort: retried a few times while
/// the API server is unreachable, never fatal.
async fn announce_start(client: Client, node_name: String) {
    use k8s_openapi::api::core::v1::ObjectReference;
    use kube::runtime::events::{Event as KubeEvent, EventType, Recorder, Reporter};
    let reporter = Reporter {
        controller: "kube-wasm-proxy".into(),
        instance: Some(format!("kube-wasm-proxy-{node_name}")),
    };
    let recorder = Recorder::new(client, reporter);
    // Upstream refers to the Node by name, with its name as UID.
    let node = ObjectReference {
        api_version: Some("v1".into()),
        kind: Some("Node".into()),
        name: Some(node_name.clone()),
        uid: Some(node_name),
        ..Default::default()
    };
    let event = KubeEvent {
        type_: EventType::Normal,
        reason: "Starting".into(),
        note: None,
        action: "StartKubeProxy".into(),
        secondary: None,
    };
    let mut delay = std::time::Duration::from_secs(1);
    for _ in 0..6 {
        match recorder.publish(&event, &node).await {
            Ok(()) => return,
            Err(e) => tracing::warn!(error = %e, "could not record the Starting event; retrying"),
        }
        tokio::time::sleep(delay).await;
        delay *= 2;
    }
}

async fn watch<K>(
    api: Api<K>,
    config: watcher::Config,
    kind: Kind,
    wrap: fn(K) -> Object,
    tx: mpsc::Sender<SourceEvent>,
    errors: Arc<AtomicU64>,
) where
    K: Resource + Clone + Debug + DeserializeOwned + Send + 'static,
{
    let mut known: BTreeSet<ObjectKey> = BTreeSet::new();
    let mut listing: Option<BTreeSet<ObjectKey>> = None;
    let mut listed_once = false;
    let mut streaming = true;
    let mut stream = watcher::watcher(api.clone(), config.clone().streaming_lists())
        .default_backoff()
        .boxed();
    while let Some(event) = stream.next().await {
        if let Err(e) = &event
            && streaming
            && !listed_once
            && refuses_streaming_lists(e)
        {
            streaming = false;
            tracing::info!(?kind, error = %e, "the API server does not stream initial lists; listing in pages");
            listing = None;
            stream = watcher::watcher(api.clone(), config.clone())
                .default_backoff()
                .boxed();
            continue;
        }
        let out = match event {
            Ok(Event::Apply(obj)) => {
                known.insert(ObjectKey::of(obj.meta()));
                vec![SourceEvent::Apply(wrap(obj))]
            }
            Ok(Event::Delete(obj)) => {
                let key = ObjectKey::of(obj.meta());
                known.remove(&key);
                vec![SourceEvent::Delete(kind, key)]
            }
            Ok(Event::Init) => {
                listing = Some(BTreeSet::new());
                Vec::new()
            }
            Ok(Event::InitApply(obj)) => {
                let key = ObjectKey::of(obj.meta());
                listing
                    .get_or_insert_with(BTreeSet::new)
                    .insert(key.clone());
                known.insert(key);
                vec![SourceEvent::Apply(wrap(obj))]
            }
            Ok(Event::InitDone) => {
                // The relist is the whole truth: anything else is gone.
                listed_once = true;
                let listed = listing.take().unwrap_or_default();
                let gone: Vec<_> = known.difference(&listed).cloned().collect();
                known = listed;
                let mut out: Vec<SourceEvent> = gone
                    .into_iter()
                    .map(|k| SourceEvent::Delete(kind, k))
                    .collect();
                out.push(SourceEvent::Synced(kind));
                out
            }
            Err(e) => {
                errors.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(?kind, error = %e, "watch failed; retrying with backoff, rules stay in force");
                Vec::new()
            }
        };
        for event in out {
            if tx.send(event).await.is_err() {
                return;
            }
        }
    }
}

/// Whether the API server itself answered a streaming initial list with an
/// error: 422 with the WatchList feature gate off, 400 from a server that
/// does not know `sendInitialEvents`, 500 when its etcd cannot send progress
/// notifications (older than 3.4.31 / 3.5.13), or anything else it refuses.
/// As client-go's reflector does, the proxy then lists instead: making
/// progress beats waiting for a feature the server may never offer. Errors
/// of the connection itself (refused, reset, TLS) are retried as they are.
fn refuses_streaming_lists(error: &watcher::Error) -> bool {
    matches!(
        error,
        watcher::Error::WatchStartFailed(kube::Error::Api(_))
            | watcher::Error::WatchFailed(kube::Error::Api(_))
            | watcher::Error::WatchError(_)
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use kube::core::Status;

    fn status(code: u16) -> Box<Status> {
        Box::new(Status::failure("refused", "Invalid").with_code(code))
    }

    #[test]
    fn an_answer_of_the_api_server_means_listing_and_a_broken_connection_does_not() {
        for code in [400, 403, 422, 429, 500, 503] {
            assert!(refuses_streaming_lists(&watcher::Error::WatchStartFailed(
                kube::Error::Api(status(code))
            )));
            assert!(refuses_streaming_lists(&watcher::Error::WatchError(
                status(code)
            )));
        }
        let refused = std::io::Error::from(std::io::ErrorKind::ConnectionRefused);
        assert!(!refuses_streaming_lists(&watcher::Error::WatchStartFailed(
            kube::Error::ReadEvents(refused)
        )));
        assert!(!refuses_streaming_lists(&watcher::Error::NoResourceVersion));
    }
}
