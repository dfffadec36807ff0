//! The `kubernetes` source asks the API server only for the EndpointSlices
//! upstream kube-proxy watches: not those of headless Services
//! (`service.kubernetes.io/headless`) nor of Services handed to another
//! proxy (`service.kubernetes.io/service-proxy-name`). Against a real
//! kube-apiserver: such slices never reach the proxy, at the initial list
//! or later, and a slice that gains the label is deleted from its view.

use crate::common::apiserver;

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::Duration;

use kwp::source::{Kind, Object, SourceEvent};
use serde_json::json;

const NS: &str = "selector";

fn slice(name: &str, labels: serde_json::Value) -> serde_json::Value {
    json!({
        "apiVersion": "discovery.k8s.io/v1",
        "kind": "EndpointSlice",
        "metadata": {"name": name, "namespace": NS, "labels": labels},
        "addressType": "IPv4",
        "ports": [{"port": 8080, "protocol": "TCP"}],
        "endpoints": [{"addresses": ["10.1.0.1"], "conditions": {"ready": true}}],
    })
}

fn create(admin: &apiserver::Client, name: &str, extra: (&str, &str)) {
    let mut labels = json!({"kubernetes.io/service-name": name});
    if !extra.0.is_empty() {
        labels[extra.0] = json!(extra.1);
    }
    admin
        .post(
            &format!("/apis/discovery.k8s.io/v1/namespaces/{NS}/endpointslices"),
            &slice(name, labels),
        )
        .expect_ok(name);
}

/// The next EndpointSlice event: (applied or deleted, slice name), or
/// `Synced` as ("synced", "").
async fn next_slice_event(
    rx: &mut tokio::sync::mpsc::Receiver<SourceEvent>,
) -> (&'static str, String) {
    loop {
        let event = tokio::time::timeout(Duration::from_secs(60), rx.recv())
            .await
            .expect("an event within 60 s")
            .expect("the source runs");
        match event {
            SourceEvent::Apply(Object::Slice(s)) => {
                return ("apply", s.metadata.name.unwrap_or_default());
            }
            SourceEvent::Delete(Kind::EndpointSlice, key) => return ("delete", key.name),
            SourceEvent::Synced(Kind::EndpointSlice) => return ("synced", String::new()),
            _ => {}
        }
    }
}

#[test]
fn slices_of_headless_and_other_proxies_services_are_not_watched() {
    let cp = apiserver::ControlPlane::start();
    let admin = cp.admin();
    admin.ensure_namespace(NS);
    create(&admin, "plain", ("", ""));
    create(&admin, "headless", ("service.kubernetes.io/headless", ""));
    create(
        &admin,
        "other",
        ("service.kubernetes.io/service-proxy-name", "other-proxy"),
    );
    let dir = tempfile::tempdir().unwrap();
    let kubeconfig = dir.path().join("kubeconfig");
    cp.write_kubeconfig(&kubeconfig, &cp.admin_token);

    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let client = kwp::source::kubernetes::client(Some(&kubeconfig))
            .await
            .unwrap();
        let (tx, mut rx) = tokio::sync::mpsc::channel(64);
        let errors = Arc::new(std::sync::atomic::AtomicU64::new(0));
        tokio::spawn(kwp::source::kubernetes::run(client, "n1".into(), tx, errors));

        // The initial list: only the plain slice.
        let mut listed = BTreeSet::new();
        loop {
            match next_slice_event(&mut rx).await {
                ("synced", _) => break,
                (_, name) => {
                    listed.insert(name);
                }
            }
        }
        assert_eq!(listed, BTreeSet::from(["plain".to_string()]));

        // Later: a headless slice is created before a plain one; only the
        // plain one arrives.
        create(&admin, "headless-2", ("service.kubernetes.io/headless", ""));
        create(&admin, "plain-2", ("", ""));
        assert_eq!(
            next_slice_event(&mut rx).await,
            ("apply", "plain-2".to_string())
        );

        // A slice handed to another proxy leaves this proxy's view.
        admin
            .merge_patch(
                &format!("/apis/discovery.k8s.io/v1/namespaces/{NS}/endpointslices/plain"),
                &json!({"metadata": {"labels": {"service.kubernetes.io/service-proxy-name": "other-proxy"}}}),
            )
            .expect_ok("label plain");
        assert_eq!(
            next_slice_event(&mut rx).await,
            ("delete", "plain".to_string())
        );
    });
}
