//! Proxier tests with purpose-built mode components (host/test-programs).

use super::*;
use crate::plan::PlanError;

/// A proxier (no dataplane) running `bytes` as the mode `name`.
fn proxier(name: &str, bytes: &[u8], extra: &str) -> Proxier {
    let runtime = Runtime::new(crate::plugin::Limits::default()).unwrap();
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
        Arc::default(),
        Box::new(NoDataplane),
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
            serde_yaml::from_str(&format!(
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
fn reload_breaking_mode(proxier: &mut Proxier) -> [u8; 32] {
    let bytes = kwp_test_programs_artifacts::program("mode_breaks_after_probe");
    let candidate = crate::plugin::reload::Candidate {
        name: "nftables".into(),
        component: proxier.runtime.compile(bytes).unwrap(),
        digest: [7; 32],
        is_mode: true,
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
