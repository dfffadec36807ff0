//! Proxier tests with purpose-built mode components (host/test-programs).

use super::*;
use crate::plan::PlanError;

/// A proxier (no dataplane) running `bytes` as the mode `name`.
fn proxier(name: &str, bytes: &[u8], extra: &str) -> Proxier {
    proxier_over(name, bytes, extra, Box::new(crate::dataplane::NoDataplane))
}

/// A proxier running `bytes` as the mode `name`, applying to `dataplane`.
fn proxier_over(name: &str, bytes: &[u8], extra: &str, dataplane: Box<dyn Dataplane>) -> Proxier {
    let runtime = Runtime::new(crate::plugin::Limits::default()).unwrap();
    proxier_in(runtime, name, bytes, extra, dataplane)
}

/// A proxier whose plugins run in `runtime`.
pub(super) fn proxier_in(
    runtime: Arc<Runtime>,
    name: &str,
    bytes: &[u8],
    extra: &str,
    dataplane: Box<dyn Dataplane>,
) -> Proxier {
    let component = runtime.compile(bytes).unwrap();
    let settings = ModeSettings {
        table: Rules::default().nft_table,
        extra: extra.into(),
        ..ModeSettings::default()
    };
    let mode = Mode::new(runtime.clone(), name, &component, settings.clone()).unwrap();
    Proxier::new(
        runtime,
        Catalog::new(None),
        mode,
        settings,
        "round-robin",
        None,
        dataplane,
    )
    .unwrap()
}

/// Services `namespace/name` with cluster IPs 10.0.0.1, .2, ...
fn set_services(state: &mut ClusterState, services: &[&str]) {
    let objects: Vec<k8s_openapi::api::core::v1::Service> = services
        .iter()
        .enumerate()
        .map(|(i, key)| {
            let (ns, name) = key.split_once('/').unwrap();
            serde_yaml_ng::from_str(&format!(
                "metadata: {{name: {name}, namespace: {ns}}}\nspec: {{clusterIP: 10.0.0.{}, ports: [{{port: 80}}]}}\n",
                i + 1
            ))
            .unwrap()
        })
        .collect();
    state.replace_all(&objects, &[], None);
}

/// `proxier` synced once over `services`.
fn synced(mut proxier: Proxier, services: &[&str]) -> (Proxier, ClusterState, Result<()>) {
    let mut state = ClusterState::new("n");
    set_services(&mut state, services);
    let changes = state.take_changes();
    let result = proxier.sync(changes, &state);
    (proxier, state, result)
}

/// A proxier whose mode is the test program `mode`, over one Service.
fn sync_with_mode(mode: &str) -> (Proxier, ClusterState) {
    let p = proxier(mode, kwp_test_programs_artifacts::program(mode), "");
    let (p, state, result) = synced(p, &["t/web"]);
    result.unwrap();
    (p, state)
}

#[test]
fn a_plan_naming_a_foreign_table_is_refused_and_nothing_is_applied() {
    let (proxier, _) = sync_with_mode("foreign_table");
    assert_eq!(proxier.stats.failed_services, 1);
    assert!(
        proxier.plan().services.is_empty(),
        "the refused fragment must not be in the plan"
    );
    let fragment = Fragment {
        items: vec![crate::plan::Item::NftChain {
            family: crate::plan::NftFamily::Inet,
            table: "filter".into(),
            name: "input".into(),
            hook: None,
            rules: vec![],
        }]
        .into(),
    };
    assert!(matches!(
        fragment.validate(&Rules::default()),
        Err(PlanError::ForeignTable(..))
    ));
}

#[test]
fn a_render_that_never_returns_is_stopped_and_refused() {
    let (proxier, _) = sync_with_mode("render_loops");
    assert_eq!(proxier.stats.failed_services, 1);
    assert!(proxier.plan().services.is_empty());
    let stats = proxier.plugin_stats();
    let mode = stats.iter().find(|(n, _)| n == "render_loops").unwrap();
    assert_eq!(
        mode.1
            .deadline_hits
            .load(std::sync::atomic::Ordering::Relaxed),
        1
    );
}

#[test]
fn an_oversized_plan_is_refused_and_retried() {
    let (mut proxier, state) = sync_with_mode("oversized_plan");
    assert_eq!(proxier.stats.failed_services, 1);
    assert!(proxier.plan().services.is_empty());
    // Kept for retry on the next sync (and refused again).
    proxier.sync(Changes::default(), &state).unwrap();
    assert_eq!(proxier.stats.failed_services, 2);
}

/// A proxier running the bundled nftables mode (no kernel) over `services`
/// (`namespace/name` each), synced once.
fn nftables_proxier(services: &[&str]) -> (Proxier, ClusterState) {
    let (_, bytes) = Catalog::new(None).load("nftables").unwrap();
    let (p, state, result) = synced(proxier("nftables", &bytes, ""), services);
    result.unwrap();
    (p, state)
}

/// Swaps the test program `mode_breaks_after_probe` in as the nftables mode.
fn reload_breaking_mode(proxier: &mut Proxier) -> crate::plugin::PluginDigest {
    let bytes = kwp_test_programs_artifacts::program("mode_breaks_after_probe");
    let candidate = crate::plugin::reload::Candidate {
        name: "nftables".into(),
        component: proxier.runtime.compile(bytes).unwrap(),
        digest: crate::plugin::PluginDigest([7; 32]),
        kind: crate::plugin::PluginKind::Mode,
    };
    proxier.reload_policy(&candidate);
    candidate.digest
}

fn counter(c: &std::sync::atomic::AtomicU64) -> u64 {
    c.load(std::sync::atomic::Ordering::Relaxed)
}

/// The rules nftables renders for every Service, as the plan holds them.
fn nft_rules(proxier: &Proxier) -> String {
    format!("{:?}", proxier.plan().services)
}

#[test]
fn a_reloaded_mode_that_fails_its_first_sync_is_rolled_back_at_once() {
    let (mut proxier, state) = nftables_proxier(&["render-fails/web"]);
    let before = nft_rules(&proxier);
    assert!(before.contains("10.0.0.1"), "{before}");
    let digest = reload_breaking_mode(&mut proxier);
    assert_eq!(counter(&proxier.runtime.reloads.reloads), 1);

    // The sync that renders everything with the new version fails, so the
    // same sync goes back to the previous one and renders with it.
    proxier.sync(Changes::default(), &state).unwrap();
    assert_eq!(counter(&proxier.runtime.reloads.rollbacks), 1);
    assert!(proxier.runtime.is_quarantined(&digest));
    assert_eq!(nft_rules(&proxier), before, "the previous version's rules");
    assert!(proxier.failed.is_empty(), "{:?}", proxier.failed);
}

#[test]
fn a_reloaded_mode_that_fails_later_in_probation_is_rolled_back_after_three_failures() {
    let (mut proxier, mut state) = nftables_proxier(&["ok/web"]);
    let digest = reload_breaking_mode(&mut proxier);
    // Its first sync succeeds: the new version is in use.
    proxier.sync(Changes::default(), &state).unwrap();
    assert!(nft_rules(&proxier).contains("svc-"), "new version in use");
    assert_eq!(counter(&proxier.runtime.reloads.rollbacks), 0);

    // A new Service it cannot render: a failure each sync (retried).
    set_services(&mut state, &["ok/web", "render-fails/db"]);
    let changes = state.take_changes();
    proxier.sync(changes, &state).unwrap();
    proxier.sync(Changes::default(), &state).unwrap();
    assert_eq!(
        counter(&proxier.runtime.reloads.rollbacks),
        0,
        "two failures"
    );
    proxier.sync(Changes::default(), &state).unwrap();
    assert_eq!(counter(&proxier.runtime.reloads.rollbacks), 1, "the third");
    assert!(proxier.runtime.is_quarantined(&digest));
    let rules = nft_rules(&proxier);
    assert!(!rules.contains("svc-"), "previous version back: {rules}");
    assert!(rules.contains("10.0.0.2"), "and db rendered by it: {rules}");
}

#[test]
fn a_base_that_fails_to_render_keeps_the_old_base_and_is_retried_while_services_sync() {
    let bytes = kwp_test_programs_artifacts::program("mode_breaks_after_probe");
    let (mut proxier, state, result) = synced(proxier("breaks", bytes, "base-fails"), &["ok/web"]);
    let err = result.unwrap_err();
    assert!(
        format!("{err:#}").contains("base broken on purpose"),
        "{err:#}"
    );
    assert!(proxier.base_dirty, "the base is retried");
    assert!(
        nft_rules(&proxier).contains("svc-"),
        "services synced anyway"
    );
    // Fixed: the next sync renders the base.
    proxier.mode_settings.extra.clear();
    proxier.sync(Changes::default(), &state).unwrap();
    assert!(!proxier.base_dirty);
}

/// The bundled nftables mode applying to an in-memory kernel.
pub(super) fn nftables_over_fake() -> (Proxier, crate::dataplane::nftables::fake::FakeNft) {
    use crate::dataplane::nftables::{NftDataplane, fake::FakeNft};
    let (_, bytes) = Catalog::new(None).load("nftables").unwrap();
    let fake = FakeNft::default();
    let dataplane = NftDataplane::with_kernel(&Rules::default().nft_table, Box::new(fake.clone()));
    (
        proxier_over("nftables", &bytes, "", Box::new(dataplane)),
        fake,
    )
}

/// An EndpointSlice giving Service `t/name` one endpoint at `ip`:8080.
fn slice(name: &str, ip: &str) -> k8s_openapi::api::discovery::v1::EndpointSlice {
    serde_yaml_ng::from_str(&format!(
        "metadata: {{name: {name}-1, namespace: t, labels: {{kubernetes.io/service-name: {name}}}}}\naddressType: IPv4\nports: [{{port: 8080}}]\nendpoints: [{{addresses: ['{ip}']}}]\n"
    ))
    .unwrap()
}

/// A Service `t/name` on `ip`:80 created at `created`.
fn service_at(name: &str, ip: &str, created: &str) -> k8s_openapi::api::core::v1::Service {
    serde_yaml_ng::from_str(&format!(
        "metadata: {{name: {name}, namespace: t, creationTimestamp: '{created}'}}\nspec: {{clusterIP: {ip}, ports: [{{port: 80}}]}}\n"
    ))
    .unwrap()
}

#[test]
fn a_service_the_kernel_refuses_fails_alone_and_is_retried() {
    let (mut proxier, fake) = nftables_over_fake();
    let when = "2025-01-01T00:00:00Z";
    let mut state = ClusterState::new("n");
    state.replace_all(
        &[
            service_at("a", "10.0.0.1", when),
            service_at("b", "10.0.0.2", when),
            service_at("c", "10.0.0.3", when),
        ],
        &[
            slice("a", "10.1.0.1"),
            slice("b", "10.1.0.2"),
            slice("c", "10.1.0.3"),
        ],
        None,
    );
    // The kernel refuses anything about b's endpoint.
    fake.refuse("10.1.0.2");
    let changes = state.take_changes();
    proxier
        .sync(changes, &state)
        .expect("one refused Service does not fail the sync");
    assert_eq!(proxier.stats.failed_services, 1);
    assert!(proxier.needs_retry());
    assert!(
        !proxier.plan().services.keys().any(|n| &*n.name == "b"),
        "the plan follows the kernel"
    );
    let kernel = fake.dump();
    assert!(
        kernel.contains("10.1.0.1") && kernel.contains("10.1.0.3") && !kernel.contains("10.0.0.2"),
        "{kernel}"
    );
    // The kernel takes it now: the retry (a sync with no changes) lands it.
    fake.accept_all();
    proxier.sync(Changes::default(), &state).unwrap();
    assert!(fake.dump().contains("10.1.0.2"));
    assert!(!proxier.needs_retry());
}

#[test]
fn services_sharing_a_cluster_ip_program_the_older_one_and_the_rest() {
    let (mut proxier, fake) = nftables_over_fake();
    let mut state = ClusterState::new("n");
    state.replace_all(
        &[
            service_at("young", "10.0.0.1", "2025-01-01T00:00:00Z"),
            service_at("old", "10.0.0.1", "2024-01-01T00:00:00Z"),
            service_at("other", "10.0.0.3", "2025-01-01T00:00:00Z"),
        ],
        &[
            slice("young", "10.1.0.2"),
            slice("old", "10.1.0.1"),
            slice("other", "10.1.0.3"),
        ],
        None,
    );
    let changes = state.take_changes();
    proxier
        .sync(changes, &state)
        .expect("a conflict does not fail the sync");
    assert_eq!(proxier.stats.failed_services, 0);
    let kernel = fake.dump();
    assert!(
        kernel.contains("10.1.0.1") && kernel.contains("10.1.0.3"),
        "{kernel}"
    );
    assert!(
        !kernel.contains("10.1.0.2"),
        "the younger Service is not programmed: {kernel}"
    );
    // The owner goes: the younger one is programmed in the same sync.
    state.delete_service(&crate::model::ObjectKey::new("t", "old"));
    let changes = state.take_changes();
    proxier.sync(changes, &state).unwrap();
    let kernel = fake.dump();
    assert!(
        kernel.contains("10.1.0.2") && !kernel.contains("10.1.0.1"),
        "{kernel}"
    );
}

#[test]
fn policy_instances_nobody_uses_are_dropped() {
    let (mut proxier, _) = nftables_over_fake();
    let mut state = ClusterState::new("n");
    let annotated = |i: usize| -> k8s_openapi::api::core::v1::Service {
        serde_yaml_ng::from_str(&format!(
            "metadata: {{name: s{i}, namespace: t, annotations: {{kube-wasm-proxy.io/lb-policy: weighted, kube-wasm-proxy.io/lb-policy-config: '10.9.0.{i}=2'}}}}\nspec: {{clusterIP: 10.0.1.{i}, ports: [{{port: 80}}]}}\n"
        ))
        .unwrap()
    };
    let services: Vec<_> = (1..=20).map(annotated).collect();
    state.replace_all(&services, &[], None);
    let changes = state.take_changes();
    proxier.sync(changes, &state).unwrap();
    assert_eq!(
        proxier.policies.len(),
        21,
        "one per config, and the default"
    );
    state.replace_all(&[], &[], None);
    let changes = state.take_changes();
    proxier.sync(changes, &state).unwrap();
    assert_eq!(proxier.policies.len(), 1, "only the default is kept");
    assert_eq!(
        proxier.plugin_stats().len(),
        2,
        "mode and default policy series"
    );
}

#[test]
fn inspect_follows_each_service_through_refusal_retry_and_removal() {
    let (mut proxier, fake) = nftables_over_fake();
    let when = "2025-01-01T00:00:00Z";
    let mut state = ClusterState::new("n");
    let services = [
        service_at("a", "10.0.0.1", when),
        service_at("b", "10.0.0.2", when),
    ];
    state.replace_all(
        &services,
        &[slice("a", "10.1.0.1"), slice("b", "10.1.0.2")],
        None,
    );
    fake.refuse("10.1.0.2");
    proxier.sync(state.take_changes(), &state).unwrap();
    let shown = |p: &Proxier| -> Vec<crate::inspect::ServiceInfo> {
        serde_json::from_str(&p.inspect.json()).unwrap()
    };
    let (_, round_robin) = Catalog::new(None).load("round-robin").unwrap();
    let digest = format!("sha256:{}", crate::plugin::PluginDigest::of(&round_robin));
    let now = shown(&proxier);
    assert_eq!(now.len(), 2, "{now:?}");
    let a = &now[0];
    assert_eq!(
        (a.service.as_str(), a.policy.as_str(), a.plugin.as_str()),
        ("t/a/tcp", "round-robin", "bundled:round-robin")
    );
    assert_eq!((a.endpoints, a.last_sync.as_str()), (1, "ok"));
    assert_eq!(a.digest, digest);
    let in_kernel = fake.dump();
    assert!(a.rules > 0 && in_kernel.matches("10.1.0.1").count() <= a.rules);
    assert!(
        now[1].last_sync.starts_with("error: ") && now[1].last_sync.contains("refused"),
        "{:?}",
        now[1]
    );
    fake.accept_all();
    proxier.sync(Changes::default(), &state).unwrap();
    assert_eq!(shown(&proxier)[1].last_sync, "ok");
    state.replace_all(&services[..1], &[slice("a", "10.1.0.1")], None);
    proxier.sync(state.take_changes(), &state).unwrap();
    let left: Vec<String> = shown(&proxier).into_iter().map(|s| s.service).collect();
    assert_eq!(left, ["t/a/tcp"]);
}

#[test]
fn the_plan_explains_its_fragments_only_when_asked() {
    // `--dry-run` prints why each fragment looks as it does; otherwise the
    // text is not kept (at 50k Services it was ~12 MiB).
    let (quiet, _) = nftables_proxier(&["t/web"]);
    assert_eq!(quiet.plan().services.len(), 1);
    assert!(
        quiet.plan().context.is_empty(),
        "{:?}",
        quiet.plan().context
    );
    let (_, bytes) = Catalog::new(None).load("nftables").unwrap();
    let mut explained = proxier("nftables", &bytes, "");
    explained.explain_plan();
    let (explained, _, result) = synced(explained, &["t/web"]);
    result.unwrap();
    let context: Vec<&String> = explained.plan().context.values().collect();
    assert!(
        context.len() == 1 && context[0].starts_with("policy round-robin"),
        "{context:?}"
    );
}
