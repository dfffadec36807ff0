//! iptables mode's periodic resync in a real kernel (a private network
//! namespace, iptables-nft): a resync with no drift sends no restore,
//! including after a delta; drift made with `iptables` behind its back (a
//! rule deleted in a Service chain, a rule added to one, an endpoint chain
//! deleted, a stray chain of ours, our jump deleted) is repaired in one
//! restore that rewrites only those chains; another program's chains and
//! rules stay as they were. Needs root.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use crate::common::netns::in_private_netns;
use crate::common::resync::{program, run};

use kwp::dataplane::Dataplane;
use kwp::dataplane::iptables::IptablesDataplane;
use kwp::dataplane::iptables::kernel::parse_save;
use kwp::model::ServicePortName;
use kwp::plan::{Fragment, Item};

const SERVICES: usize = 200;

fn chain(table: &str, name: &str, rules: Vec<String>) -> Item {
    Item::IptablesChain {
        ipv6: false,
        table: table.into(),
        name: name.into(),
        rules,
    }
}

fn base() -> Fragment {
    let mark = "0x4000";
    Fragment {
        items: vec![
            chain("nat", "KWP-SERVICES", vec!["-j KWP-SERVICE-IPS".into()]),
            chain("nat", "KWP-SERVICE-IPS", vec![]),
            chain(
                "nat",
                "KWP-MARK-MASQ",
                vec![format!("-j MARK --or-mark {mark}")],
            ),
            chain(
                "nat",
                "KWP-POSTROUTING",
                vec![
                    format!("-m mark ! --mark {mark}/{mark} -j RETURN"),
                    format!("-j MARK --xor-mark {mark}"),
                    "-j MASQUERADE --random-fully".into(),
                ],
            ),
            chain("filter", "KWP-SERVICES", vec![]),
        ]
        .into(),
    }
}

/// Service `n` shaped as the iptables plugin renders one: a commented
/// dispatch rule, a random pick over `eps` endpoints (with ClientIP
/// affinity's `recent` rules when `affinity`), each endpoint's hairpin
/// mark and DNAT; `moved` changes endpoint 0.
fn service(n: usize, eps: usize, moved: bool, affinity: bool) -> Fragment {
    let comment = format!("-m comment --comment t/s{n}:p");
    let svc = format!("KWP-SVC-{n}");
    let ip = format!("10.96.{}.{}", n / 250, n % 250 + 1);
    let mut items = vec![chain(
        "nat",
        "KWP-SERVICE-IPS",
        vec![format!(
            "{comment} -d {ip}/32 -p tcp -m tcp --dport 80 -j {svc}"
        )],
    )];
    let endpoint = |e: usize| {
        let host = if e == 0 && moved { 200 } else { e + 1 };
        format!("10.244.{}.{host}", n % 250)
    };
    let mut pick = Vec::new();
    for e in (0..eps).filter(|_| affinity) {
        pick.push(format!(
            "{comment} -m recent --rcheck --seconds 10800 --reap --name KWP-SEP-{n}-{e} --mask 255.255.255.255 --rsource -j KWP-SEP-{n}-{e}"
        ));
    }
    for e in 0..eps {
        let left = eps - e;
        let jump = format!("-j KWP-SEP-{n}-{e}");
        pick.push(if left > 1 {
            let p = 1.0 / left as f64;
            format!("{comment} -m statistic --mode random --probability {p:.11} {jump}")
        } else {
            format!("{comment} {jump}")
        });
        items.push(chain(
            "nat",
            &format!("KWP-SEP-{n}-{e}"),
            vec![
                format!(
                    "{comment} -s {}/32 -j KWP-MARK-MASQ",
                    endpoint(e)
                ),
                if affinity {
                    format!(
                        "{comment} -p tcp -m recent --set --name KWP-SEP-{n}-{e} --mask 255.255.255.255 --rsource -m tcp -j DNAT --to-destination {}:8080",
                        endpoint(e)
                    )
                } else {
                    format!(
                        "{comment} -p tcp -m tcp -j DNAT --to-destination {}:8080",
                        endpoint(e)
                    )
                },
            ],
        ));
    }
    items.push(chain("nat", &svc, pick));
    Fragment {
        items: items.into(),
    }
}

fn name(n: usize) -> ServicePortName {
    crate::common::resync::name(n, "p")
}

fn iptables(args: &str) {
    run("iptables-nft", args);
}

/// `iptables-nft-save -t table`, parsed: chain -> rules.
fn save(table: &str) -> BTreeMap<String, Vec<String>> {
    parse_save(&run("iptables-nft-save", &format!("-t {table}")))
}

#[test]
fn resync_compares_with_the_kernel_and_repairs_only_drift() {
    // iptables, started from the namespace's thread, works in it.
    in_private_netns(in_namespace);
}

fn in_namespace() {
    // Another program's rules, there before us.
    iptables("-t nat -N FOREIGN");
    iptables("-t nat -A FOREIGN -s 192.0.2.0/24 -j RETURN");
    iptables("-t nat -A PREROUTING -j FOREIGN");
    iptables("-t filter -A INPUT -p tcp --dport 22 -j ACCEPT");

    let mut dp = IptablesDataplane::new();
    let fragments: Vec<Fragment> = (0..SERVICES)
        .map(|n| service(n, 2 + n % 3, false, n % 2 == 0))
        .collect();
    program(&mut dp, &base(), &fragments, "p");
    let programmed = dp.restores;

    // No drift: the resync reads the kernel and writes nothing.
    let started = std::time::Instant::now();
    dp.resync().expect("resync");
    eprintln!("resync over {SERVICES} Services: {:?}", started.elapsed());
    dp.resync().expect("resync");
    assert_eq!(dp.restores, programmed, "a clean resync sent a restore");
    assert_eq!(dp.compares, 0, "nothing written since: nothing to read");
    // Another program writes elsewhere: our tables are read and compared.
    iptables("-t mangle -N ELSEWHERE");
    dp.resync().expect("resync");
    dp.await_compare().expect("compare");
    assert_eq!((dp.restores, dp.compares), (programmed, 1));

    // One endpoint moves: one delta, learned; the resync after it is clean.
    dp.apply(
        None,
        &[(name(7), Some(&service(7, 2 + 7 % 3, true, false)))],
    )
    .expect("delta");
    assert_eq!(dp.restores, programmed + 1);
    dp.resync().expect("resync");
    assert_eq!(dp.restores, programmed + 1, "resync after a change wrote");
    assert_eq!(dp.compares, 1, "the delta was learned: nothing to read");
    let (nat, filter) = (save("nat"), save("filter"));

    // Drift behind our back.
    iptables("-t nat -D KWP-SVC-3 1");
    iptables("-t nat -I KWP-SVC-4 1 -j RETURN");
    iptables("-t nat -F KWP-SVC-5");
    iptables("-t nat -F KWP-SEP-5-1");
    iptables("-t nat -X KWP-SEP-5-1");
    iptables("-t nat -N KWP-STRAY");
    iptables("-t nat -D PREROUTING -j KWP-SERVICES");
    dp.resync().expect("repair");
    dp.await_compare().expect("repair");
    assert_eq!(dp.restores, programmed + 2, "one repair restore: nat");
    assert_eq!((dp.compares, dp.repairs), (2, 1));
    assert_eq!(save("nat"), nat, "nat as before the drift");
    assert_eq!(save("filter"), filter, "filter untouched");
    // Clean again, and known to be.
    dp.resync().expect("resync");
    assert_eq!((dp.restores, dp.compares), (programmed + 2, 2));
    // Another program's rules were never touched.
    let nat = save("nat");
    assert_eq!(nat["FOREIGN"], ["-s 192.0.2.0/24 -j RETURN"]);
    assert!(nat["PREROUTING"].contains(&"-j FOREIGN".to_string()));
    assert!(save("filter")["INPUT"].contains(&"-p tcp -m tcp --dport 22 -j ACCEPT".to_string()));

    // Changes while a compare's reads are out (they run on a thread of
    // their own): applied at once, not taken for drift whether the reads
    // saw them or not, and drift elsewhere still repaired.
    let drifted = nat["KWP-SVC-6"].clone();
    iptables("-t nat -D KWP-SVC-6 1");
    dp.resync().expect("resync");
    assert!(dp.comparing(), "the compare's reads run off the loop");
    let restores = dp.restores;
    let changes = [
        (8, Some(service(8, 2, true, true))),
        (SERVICES, Some(service(SERVICES, 3, false, false))),
        (9, None),
    ];
    for (n, fragment) in &changes {
        dp.apply(None, &[(name(*n), fragment.as_ref())])
            .expect("delta");
    }
    assert_eq!(dp.restores, restores + 3);
    dp.await_compare().expect("repair");
    assert_eq!(
        (dp.restores, dp.repairs),
        (restores + 4, 2),
        "one repair: nat"
    );
    let nat = save("nat");
    assert_eq!(nat["KWP-SVC-6"], drifted);
    assert_eq!(nat["KWP-SVC-8"].len(), 4, "affinity rules and picks of 2");
    assert!(nat.contains_key(&format!("KWP-SVC-{SERVICES}")));
    assert!(!nat.contains_key("KWP-SVC-9"));
    assert!(!nat.keys().any(|c| c.starts_with("KWP-SEP-9-")));
    // What the compare, its repair and the deltas learned is all there is.
    dp.resync().expect("resync");
    assert_eq!(
        (dp.restores, dp.compares, dp.comparing()),
        (restores + 4, 3, false)
    );
}

/// Not a test: the cost of one periodic resync at KWP_RESYNC_SERVICES
/// (10,000) Services without drift: with nothing written since (the
/// generation unchanged), after another program wrote elsewhere (every
/// chain read and compared: with the reads on the loop as before, and on
/// a thread), then the latency of changes arriving while such a compare
/// runs, and the full reconcile every resync was before (reached through
/// the canary, as after a flush; it also reads every chain back; skipped
/// with KWP_RESYNC_FULL=0), alternated KWP_RESYNC_ROUNDS (3) times; wall
/// time and CPU seconds (this process and its restores), medians.
/// `cargo test --test e2e ipt_resync::resync_cost -- --ignored --nocapture`
#[test]
#[ignore = "a measurement, minutes long"]
fn resync_cost_at_10k_services() {
    in_private_netns(measure);
}

fn cpu_seconds() -> f64 {
    let mut total = 0.0;
    for who in [libc::RUSAGE_SELF, libc::RUSAGE_CHILDREN] {
        // SAFETY: getrusage(2) into a zeroed struct we own.
        let mut u: libc::rusage = unsafe { std::mem::zeroed() };
        unsafe { libc::getrusage(who, &mut u) };
        for t in [u.ru_utime, u.ru_stime] {
            total += t.tv_sec as f64 + t.tv_usec as f64 / 1e6;
        }
    }
    total
}

fn measure() {
    let env = |name: &str, default: usize| {
        std::env::var(name)
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(default)
    };
    let (n, rounds) = (
        env("KWP_RESYNC_SERVICES", 10_000),
        env("KWP_RESYNC_ROUNDS", 3),
    );
    let mut dp = IptablesDataplane::new();
    let fragments: Vec<Fragment> = (0..n)
        .map(|i| service(i, 3 + i % 5, false, false))
        .collect();
    let (cpu, started) = (cpu_seconds(), std::time::Instant::now());
    program(&mut dp, &base(), &fragments, "p");
    eprintln!(
        "{n} Services programmed: {:.1} s, {:.1} CPU s",
        started.elapsed().as_secs_f64(),
        cpu_seconds() - cpu
    );
    let timed = |dp: &mut IptablesDataplane, what: &str, run: &dyn Fn(&mut IptablesDataplane)| {
        let (cpu, started) = (cpu_seconds(), std::time::Instant::now());
        run(dp);
        let (wall, cpu) = (started.elapsed().as_secs_f64(), cpu_seconds() - cpu);
        eprintln!("{what}: {wall:.3} s wall, {cpu:.3} CPU s");
        (wall, cpu)
    };
    let (mut unchanged, mut full) = (Vec::new(), Vec::new());
    let with_full = env("KWP_RESYNC_FULL", 1) == 1;
    // Per way of comparing (reads on the loop as before, on a thread):
    // the compare alone, and the latencies of changes beside one.
    let ways = [
        ("reads on the loop (before)", true),
        ("reads on a thread", false),
    ];
    let mut compare = [Vec::new(), Vec::new()];
    let mut latencies = [Vec::new(), Vec::new()];
    // And the same changes with no compare, for reference.
    let mut quiet = Vec::new();
    let mut moved = std::collections::BTreeSet::new();
    for round in 0..rounds {
        unchanged.push(timed(&mut dp, "resync, nothing written by anyone", &|dp| {
            dp.resync().expect("resync")
        }));
        for (i, (way, on_the_loop)) in ways.iter().enumerate() {
            dp.compare_on_the_loop(*on_the_loop);
            // Another program writes elsewhere: every chain is read.
            iptables(&format!("-t mangle -N ELSEWHERE-{round}-{i}"));
            let restores = dp.restores;
            compare[i].push(timed(&mut dp, &format!("compare, {way}"), &|dp| {
                dp.resync().expect("resync");
                dp.await_compare().expect("compare")
            }));
            assert_eq!(dp.restores, restores, "a clean resync restored");
            let span = Duration::from_secs_f64(compare[i].last().map_or(5.0, |c| c.0).max(5.0));
            let round = round * 3 + i;
            let mut l = changes_during_compare(&mut dp, round, n, span, true, &mut moved);
            eprintln!("{way}: {} changes, slowest {:?}", l.len(), l.iter().max());
            latencies[i].append(&mut l);
        }
        let span = Duration::from_secs_f64(compare[1].last().map_or(5.0, |c| c.0).max(5.0));
        let round = round * 3 + 2;
        quiet.extend(changes_during_compare(
            &mut dp, round, n, span, false, &mut moved,
        ));
        if !with_full {
            continue;
        }
        full.push(timed(&mut dp, "full reconcile (the old resync)", &|dp| {
            iptables("-t nat -F KWP-PROXY-CANARY");
            assert!(dp.repair_drift().expect("full reconcile"));
        }));
    }
    let median = |v: &mut Vec<(f64, f64)>| {
        let mut walls: Vec<f64> = v.iter().map(|x| x.0).collect();
        let mut cpus: Vec<f64> = v.iter().map(|x| x.1).collect();
        walls.sort_by(f64::total_cmp);
        cpus.sort_by(f64::total_cmp);
        (walls[walls.len() / 2], cpus[cpus.len() / 2])
    };
    let u = median(&mut unchanged);
    eprintln!(
        "{n} Services, medians of {rounds} (s wall / CPU s): nothing written {:.3} / {:.3}",
        u.0, u.1
    );
    for (i, (way, _)) in ways.iter().enumerate() {
        let c = median(&mut compare[i]);
        let l = &mut latencies[i];
        l.sort();
        eprintln!(
            "{way}: compare {:.3} / {:.3}; {} changes beside compares, latency p50 {:?}, max {:?}",
            c.0,
            c.1,
            l.len(),
            l.get(l.len() / 2),
            l.last()
        );
    }
    quiet.sort();
    eprintln!(
        "no compare: {} changes, latency p50 {:?}, max {:?}",
        quiet.len(),
        quiet.get(quiet.len() / 2),
        quiet.last()
    );
    if !full.is_empty() {
        let f = median(&mut full);
        eprintln!("full reconcile, with its read-back {:.3} / {:.3}", f.0, f.1);
    }
}

/// A change's latency while a compare runs: another program writes (so
/// the resync compares; not if `!foreign_write`, for reference), then one
/// endpoint moves every 500 ms for `span`
/// (another thread, as the source would), while this thread runs as the
/// sync loop does: the resync first, then whatever changes are queued
/// applied in one batch, drift checks between. Latency: arrival to its
/// restore done.
fn changes_during_compare(
    dp: &mut IptablesDataplane,
    round: usize,
    n: usize,
    span: Duration,
    foreign_write: bool,
    moved: &mut std::collections::BTreeSet<usize>,
) -> Vec<Duration> {
    use std::sync::mpsc::RecvTimeoutError;
    const GAP: Duration = Duration::from_millis(500);
    if foreign_write {
        iptables(&format!("-t mangle -N CHANGES-{round}"));
    }
    let (tx, rx) = std::sync::mpsc::channel::<(usize, Instant)>();
    let sender = std::thread::spawn(move || {
        let start = Instant::now();
        let mut k = 0;
        while start.elapsed() < span {
            std::thread::sleep(GAP);
            if tx.send((k, Instant::now())).is_err() {
                break;
            }
            k += 1;
        }
    });
    let started = Instant::now();
    dp.resync().expect("resync");
    eprintln!("resync returned after {:?}", started.elapsed());
    let mut latencies = Vec::new();
    loop {
        let first = match rx.recv_timeout(Duration::from_millis(100)) {
            Ok(change) => change,
            Err(RecvTimeoutError::Timeout) => {
                dp.repair_drift().expect("drift check");
                continue;
            }
            Err(RecvTimeoutError::Disconnected) => break,
        };
        let batch: Vec<(usize, Instant)> = std::iter::once(first).chain(rx.try_iter()).collect();
        let fragments: Vec<(usize, Fragment)> = batch
            .iter()
            .map(|(k, _)| {
                let svc = (round * 1009 + k * 13 + 1) % n;
                let now_moved = moved.insert(svc) || !moved.remove(&svc);
                (svc, service(svc, 3 + svc % 5, now_moved, false))
            })
            .collect();
        let changed: Vec<(ServicePortName, Option<&Fragment>)> =
            fragments.iter().map(|(i, f)| (name(*i), Some(f))).collect();
        dp.apply(None, &changed).expect("delta");
        latencies.extend(batch.iter().map(|(_, arrived)| arrived.elapsed()));
    }
    sender.join().expect("sender");
    dp.await_compare().expect("compare");
    let cost = dp.last_compare;
    if !foreign_write {
        return latencies;
    }
    eprintln!(
        "the compare beside them: {:.3} s start to end ({:.3} s of it on the loop), reads {:.3} s wall / {:.3} CPU s (reading thread)",
        cost.wall.as_secs_f64(),
        cost.on_the_loop.as_secs_f64(),
        cost.read_wall.as_secs_f64(),
        cost.read_cpu.as_secs_f64()
    );
    latencies
}
