//! Plugin-runtime tests against real guest components: the bundled plugins
//! and the misbehaving programs of `host/test-programs`.

use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use kwp_test_programs_artifacts::program;

use super::policy::{BackendPlan, Policy};
use super::*;
use crate::model::Endpoint;

fn runtime() -> Arc<Runtime> {
    Runtime::new(Limits {
        call_timeout: Duration::from_millis(50),
        per_element: Duration::from_micros(50),
        memory_bytes: 16 << 20,
    })
    .unwrap()
}

fn policy(rt: &Arc<Runtime>, name: &str, config: &str) -> anyhow::Result<Policy> {
    let component = rt.compile(program(name))?;
    Policy::new(rt.clone(), name, &component, config)
}

fn endpoints(n: u8) -> Vec<Endpoint> {
    (1..=n)
        .map(|i| Endpoint {
            ip: [10, 0, 0, i].into(),
            port: 80,
            ready: true,
            serving: true,
            terminating: false,
            node_name: None,
            zone: None,
            zone_hints: Box::default(),
            node_hints: Box::default(),
            is_local: false,
        })
        .collect()
}

const CLIENT: std::net::IpAddr = std::net::IpAddr::V4(std::net::Ipv4Addr::new(192, 0, 2, 1));

#[test]
fn an_instances_linear_memory_is_counted() {
    // Wasm memory never shrinks and heap profiles miss it: the count is
    // how a benchmark sees it (docs/performance.md).
    let rt = runtime();
    let mut p = policy(&rt, "pick_first", "").unwrap();
    p.set_endpoints(1, &endpoints(3)).unwrap();
    let bytes = p.stats().memory_bytes.load(Ordering::Relaxed);
    assert!(bytes >= 64 << 10, "at least one Wasm page, counted {bytes}");
}

#[test]
fn a_working_plugin_answers_and_is_compiled_once() {
    let rt = runtime();
    let mut p = policy(&rt, "pick_first", "").unwrap();
    assert_eq!(p.pick(1, CLIENT, 1000).unwrap(), None, "no endpoints yet");
    p.set_endpoints(1, &endpoints(3)).unwrap();
    assert_eq!(p.pick(1, CLIENT, 1000).unwrap(), Some(0));
    assert_eq!(p.plan(1).unwrap(), BackendPlan::Weights(vec![1, 1, 1]));
    p.remove_service(1).unwrap();
    assert_eq!(p.pick(1, CLIENT, 1000).unwrap(), None);

    let _again = policy(&rt, "pick_first", "").unwrap();
    assert_eq!(rt.compiled_count(), 1, "same bytes, one compilation");
}

#[test]
fn configure_errors_refuse_the_plugin() {
    let rt = runtime();
    let err = policy(&rt, "pick_first", "fail")
        .err()
        .expect("configure error must refuse the plugin");
    assert!(format!("{err:#}").contains("configured to fail"), "{err:#}");
}

#[test]
fn an_infinite_loop_is_stopped_by_the_deadline() {
    let rt = runtime();
    let mut p = policy(&rt, "pick_loops", "").unwrap();
    p.set_endpoints(1, &endpoints(2)).unwrap();
    let started = Instant::now();
    let err = p.pick(1, CLIENT, 1).unwrap_err();
    assert!(matches!(err, PluginError::Deadline { .. }), "{err}");
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "took {:?}",
        started.elapsed()
    );
    let stats = p.stats();
    assert_eq!(stats.deadline_hits.load(Ordering::Relaxed), 1);
    // The instance was discarded; the next call runs on a fresh one with the endpoints replayed.
    assert_eq!(p.plan(1).unwrap(), BackendPlan::Weights(vec![1, 1]));
    assert_eq!(stats.instantiations.load(Ordering::Relaxed), 2);
}

/// A guest waiting on a WASI clock runs no Wasm, so the epoch never fires:
/// the call must still end at its deadline, on a plain thread and on a
/// tokio worker (the data path's), and the plugin is then treated like any
/// faulty one (instance discarded, counted, the next call on a fresh one).
#[test]
fn a_guest_blocked_on_a_clock_ends_as_a_deadline_error_promptly() {
    fn check() {
        let rt = runtime();
        let deadline = rt.limits().call_timeout;
        let mut p = policy(&rt, "pick_sleeps", "").unwrap();
        p.set_endpoints(1, &endpoints(2)).unwrap();
        let started = Instant::now();
        let err = p.pick(1, CLIENT, 1).unwrap_err();
        let took = started.elapsed();
        match &err {
            PluginError::Deadline { plugin, call, .. } => {
                assert_eq!((plugin.as_str(), *call), ("pick_sleeps", "pick"))
            }
            other => panic!("expected a deadline error, got {other}"),
        }
        // The guest sleeps 10 s; the bound leaves room for a loaded machine.
        assert!(
            took >= deadline && took < 2 * deadline + Duration::from_millis(400),
            "took {took:?} for a {deadline:?} deadline"
        );
        let stats = p.stats();
        assert_eq!(stats.deadline_hits.load(Ordering::Relaxed), 1);
        assert_eq!(p.plan(1).unwrap(), BackendPlan::Weights(vec![1, 1]));
        assert_eq!(stats.instantiations.load(Ordering::Relaxed), 2);
    }
    check();
    let tokio = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    tokio
        .block_on(tokio.spawn(async { check() }))
        .expect("on a tokio worker too");
}

#[test]
fn a_memory_bomb_is_stopped_by_the_cap() {
    // A generous deadline: on a loaded machine growing to the cap can take
    // longer than the 50 ms the other tests allow, and this test is about
    // the cap stopping it.
    let rt = Runtime::new(Limits {
        call_timeout: Duration::from_secs(10),
        ..runtime().limits().clone()
    })
    .unwrap();
    let mut p = policy(&rt, "memory_bomb", "").unwrap();
    p.set_endpoints(1, &endpoints(1)).unwrap();
    let err = p.pick(1, CLIENT, 1).unwrap_err();
    assert!(
        matches!(err, PluginError::Memory { limit_mib: 16, .. }),
        "{err}"
    );
    assert_eq!(p.stats().memory_hits.load(Ordering::Relaxed), 1);
    assert_eq!(
        p.plan(1).unwrap(),
        BackendPlan::Weights(vec![1]),
        "fresh instance serves the next call"
    );
}

#[test]
fn a_panic_discards_the_instance_and_the_next_call_works() {
    let rt = runtime();
    let mut p = policy(&rt, "pick_panics", "").unwrap();
    p.set_endpoints(4, &endpoints(2)).unwrap();
    let err = p.pick(4, CLIENT, 13).unwrap_err();
    match &err {
        PluginError::Trap { reason, .. } => {
            assert!(reason.contains("deliberate panic"), "{reason}")
        }
        other => panic!("expected a trap, got {other}"),
    }
    // Some(0), not None: the new instance was given the endpoints again.
    assert_eq!(p.pick(4, CLIENT, 14).unwrap(), Some(0));
    let stats = p.stats();
    assert_eq!(stats.instantiations.load(Ordering::Relaxed), 2);
    assert_eq!(stats.traps.load(Ordering::Relaxed), 1);
}

#[test]
fn a_service_that_makes_the_instance_trap_fails_alone() {
    let rt = runtime();
    let mut p = policy(&rt, "traps_on_many_endpoints", "").unwrap();
    p.set_endpoints(1, &endpoints(3)).unwrap();
    assert!(p.set_endpoints(2, &endpoints(101)).is_err());
    // Every later call runs on a fresh instance; Service 1 is replayed into
    // it, Service 2 (which would trap the replay) only when it is used.
    for _ in 0..3 {
        assert_eq!(p.pick(1, CLIENT, 1).unwrap(), Some(0));
        assert_eq!(p.plan(1).unwrap(), BackendPlan::Weights(vec![1, 1, 1]));
        assert!(p.plan(2).is_err(), "the poisoned Service still fails");
    }
    p.remove_service(2).unwrap();
    assert_eq!(p.pick(1, CLIENT, 1).unwrap(), Some(0));
}

#[test]
fn plugins_get_no_filesystem_environment_or_network() {
    let rt = runtime();
    let probe = policy(&rt, "sandbox_probe", "");
    assert!(probe.is_ok(), "{:#}", probe.err().unwrap());
}

#[test]
fn mode_plugins_load_and_the_wrong_world_is_refused() {
    let rt = runtime();
    let catalog = Catalog::new(None);
    let (_, bytes) = catalog.load("userspace").unwrap();
    let component = rt.compile(&bytes).unwrap();
    let mode = mode::Mode::new(
        rt.clone(),
        "userspace",
        &component,
        mode::ModeSettings::default(),
    );
    assert!(mode.is_ok(), "{:?}", mode.err());
    // A policy component is not a proxy mode: refused with a clear error.
    let (_, rr) = catalog.load("round-robin").unwrap();
    let err = mode::Mode::new(
        rt.clone(),
        "round-robin",
        &rt.compile(&rr).unwrap(),
        mode::ModeSettings::default(),
    )
    .err()
    .unwrap();
    let msg = format!("{err:#}");
    assert!(
        msg.contains(&format!(
            "proxy-mode world of {}",
            contract::package("mode")
        )) && msg.contains(&contract::interface(PluginKind::Policy)),
        "{msg}"
    );
    assert!(catalog.load("no-such-plugin").is_err());
}

#[test]
fn bundled_policies_spread_connections_through_the_host() {
    let rt = runtime();
    let catalog = Catalog::new(None);
    for name in ["round-robin", "random"] {
        let (_, bytes) = catalog.load(name).unwrap();
        let mut p = Policy::new(rt.clone(), name, &rt.compile(&bytes).unwrap(), "").unwrap();
        p.set_endpoints(9, &endpoints(4)).unwrap();
        let mut counts = [0u32; 4];
        for port in 0..4000u16 {
            counts[p.pick(9, CLIENT, port).unwrap().unwrap() as usize] += 1;
        }
        for c in counts {
            assert!((800..1200).contains(&c), "{name}: {counts:?}");
        }
    }
}

/// A policy of another `kwp:policy` version, and one of the single
/// `kwp:proxy` package every plugin used before the contract was split:
/// both refused, naming the version expected and the one found.
#[test]
fn a_component_of_another_wit_version_is_refused_clearly() {
    let rt = runtime();
    for (name, found) in [
        ("wrong_wit_version", "kwp:policy/policy@0.0.9"),
        ("pre_split_contract", "kwp:proxy/policy@0.2.0"),
    ] {
        let kind = rt.kind_of(&rt.compile(program(name)).unwrap());
        assert_eq!(kind.unwrap(), PluginKind::Policy, "{name}");
        let err = policy(&rt, name, "").err().expect("must be refused");
        let msg = format!("{err:#}");
        let expected = contract::interface(PluginKind::Policy);
        assert!(
            msg.contains(&format!(
                "built against {found}, this host speaks {expected}"
            )),
            "{msg}"
        );
    }
}

/// A mode built against the previous `kwp:mode` (0.3.0: no short-circuit
/// set), as a mode from an older kwp-sdk is: refused at load and as a
/// reload candidate, naming the version found and the one expected.
#[test]
fn a_mode_of_the_previous_mode_contract_is_refused_clearly() {
    let rt = runtime();
    let name = "mode_contract_v0_3";
    let component = rt.compile(program(name)).unwrap();
    assert_eq!(rt.kind_of(&component).unwrap(), PluginKind::Mode);
    let expected = contract::interface(PluginKind::Mode);
    let wanted = format!("built against kwp:mode/mode@0.3.0, this host speaks {expected}");
    let err = mode::Mode::new(rt.clone(), name, &component, mode::ModeSettings::default())
        .err()
        .expect("must be refused");
    let msg = format!("{err:#}");
    assert!(msg.contains(&wanted), "{msg}");
    let err = reload::prepare(&rt, name, program(name))
        .err()
        .expect("must be refused as a reload candidate");
    let msg = format!("{err:#}");
    assert!(msg.contains(&wanted), "{msg}");
}

#[test]
fn a_component_missing_an_export_is_refused_clearly() {
    let rt = runtime();
    let err = policy(&rt, "missing_export", "")
        .err()
        .expect("must be refused");
    let msg = format!("{err:#}");
    assert!(
        msg.contains("does not implement") && msg.contains("pick"),
        "{msg}"
    );
}

#[test]
fn reload_candidates_are_checked_before_use() {
    let rt = runtime();
    for bad in [
        "wrong_wit_version",
        "pre_split_contract",
        "missing_export",
        "pick_loops",
        "pick_sleeps",
        "memory_bomb",
    ] {
        assert!(
            reload::prepare(&rt, bad, program(bad)).is_err(),
            "{bad} passed the reload checks"
        );
    }
    let good = reload::prepare(&rt, "pick_first", program("pick_first")).unwrap();
    rt.quarantine(good.digest);
    let err = reload::prepare(&rt, "pick_first", program("pick_first"))
        .err()
        .unwrap();
    assert!(format!("{err:#}").contains("quarantined"));
}

#[test]
fn a_plan_that_never_returns_is_stopped_by_the_deadline() {
    let rt = runtime();
    let mut p = policy(&rt, "plan_loops", "").unwrap();
    p.set_endpoints(1, &endpoints(2)).unwrap();
    assert!(matches!(
        p.plan(1).unwrap_err(),
        PluginError::Deadline { .. }
    ));
    assert_eq!(
        p.pick(1, CLIENT, 1).unwrap(),
        Some(0),
        "the next call works on a fresh instance"
    );
}

/// Every guest in `host/test-programs/examples` exists to be run by a host
/// test; one that no test names is dead weight or a forgotten case.
#[test]
fn every_test_program_is_used_by_a_test() {
    fn read_rs(dir: &std::path::Path, into: &mut String) {
        for entry in std::fs::read_dir(dir).unwrap().flatten() {
            let path = entry.path();
            if path.is_dir() {
                read_rs(&path, into);
            } else if path.extension().is_some_and(|e| e == "rs") {
                into.push_str(&std::fs::read_to_string(&path).unwrap());
            }
        }
    }
    let host = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    let mut sources = String::new();
    read_rs(&host.join("src"), &mut sources);
    read_rs(&host.join("../tests"), &mut sources);
    let unused: Vec<&str> = kwp_test_programs_artifacts::names()
        .filter(|name| !sources.contains(&format!("\"{name}\"")))
        .collect();
    assert!(unused.is_empty(), "test programs no test runs: {unused:?}");
}

#[test]
fn a_plugin_kind_comes_from_its_exports_not_its_file_name() {
    let rt = runtime();
    let (_, nftables) = Catalog::new(None).load("nftables").unwrap();
    let mode = reload::prepare(&rt, "my-own-mode", &nftables).unwrap();
    assert_eq!(mode.kind, PluginKind::Mode);
    let policy = reload::prepare(&rt, "nftables", program("pick_first")).unwrap();
    assert_eq!(policy.kind, PluginKind::Policy);
}

/// The data path calls policies on tokio's workers; a guest that panics
/// there writes its message to stderr through WASI, which must not take the
/// host down (WASI's sync bindings entered the runtime for it): it is a
/// trap like any other, with the guest's own words.
#[test]
fn a_guest_panic_on_an_async_worker_is_a_trap_with_its_message() {
    let tokio = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .build()
        .unwrap();
    let err = tokio
        .block_on(async {
            tokio::spawn(async {
                let rt = runtime();
                let mut p = policy(&rt, "pick_panics", "").unwrap();
                p.set_endpoints(4, &endpoints(2)).unwrap();
                p.pick(4, CLIENT, 13).unwrap_err()
            })
            .await
        })
        .expect("the host must not panic under the call");
    match err {
        PluginError::Trap { reason, .. } => {
            assert!(reason.contains("deliberate panic"), "{reason}")
        }
        other => panic!("expected a trap, got {other}"),
    }
}
