//! The file source never stalls or takes the node down: special files,
//! deeply nested YAML, symlink loops, files rewritten in place, a missing
//! directory and SIGTERM while busy, with the real binary in nftables mode
//! in a namespace cluster and real packets (docs/reliability.md).

use crate::common;

use std::net::SocketAddr;
use std::path::Path;
use std::time::{Duration, Instant};

use common::node_proxy::{CONFIG, Proxy, addr, eventually, http_get, service, start_full};
use common::topology::{Cluster, ContinuousClient, Outcome, tcp_from};
use common::write;

const HEALTHZ: &str = "127.0.0.1:10256";
const METRICS: &str = "127.0.0.1:10249";

/// Starts the proxy on a directory holding the node and `objects`, with
/// health and metrics served.
fn start(c: &Cluster, objects: &str) -> Proxy {
    start_with(c, objects, &[])
}

fn start_with(c: &Cluster, objects: &str, extra: &[&str]) -> Proxy {
    let mut args = vec![
        "--healthz-bind-address",
        HEALTHZ,
        "--metrics-bind-address",
        METRICS,
    ];
    args.extend_from_slice(extra);
    start_full(c, objects, CONFIG, &Cluster::node_yaml(), &args)
}

fn svc(c: &Cluster, name: &str, ip: &str) -> String {
    service(c, name, ip, "", &["pod-a"], "TCP")
}

fn answers(c: &Cluster, ip: &str) -> bool {
    matches!(tcp_from(&c.client, addr(ip, 80)), Outcome::Answered(..))
}

/// `/healthz` status and how long it took to answer.
fn healthz(c: &Cluster) -> (u16, Duration) {
    let started = Instant::now();
    let (status, _) = http_get(&c.node, HEALTHZ.parse().unwrap(), "/healthz");
    (status, started.elapsed())
}

fn metric(c: &Cluster, name: &str) -> f64 {
    let (_, body) = http_get(&c.node, METRICS.parse().unwrap(), "/metrics");
    body.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.trim().parse().ok())
        .unwrap_or(f64::NAN)
}

fn mkfifo(path: &Path) {
    let c = std::ffi::CString::new(path.to_str().unwrap()).unwrap();
    assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
}

/// Resident memory of a process, in MiB.
fn rss_mib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .unwrap_or(0)
        / 1024
}

/// CPU time (user + system) of a process so far.
fn cpu_time(pid: u32) -> Duration {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let fields: Vec<&str> = stat
        .rsplit_once(')')
        .map(|(_, rest)| rest.split_whitespace().collect())
        .unwrap_or_default();
    let ticks: u64 = fields
        .get(11..13)
        .map(|f| f.iter().filter_map(|t| t.parse::<u64>().ok()).sum())
        .unwrap_or(0);
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as u64;
    Duration::from_millis(ticks * 1000 / hz.max(1))
}

/// Deeply nested flow sequences: libyaml's scanner is quadratic in depth.
fn deeply_nested() -> String {
    "x: ".to_string() + &"[".repeat(4 << 20)
}

#[test]
fn special_files_are_skipped_by_name_and_everything_else_is_programmed() {
    let c = Cluster::new("fsspec");
    let p = start(&c, &svc(&c, "good", "10.96.5.1"));
    std::os::unix::fs::symlink("/dev/zero", p.dir.join("zero.yaml")).unwrap();
    mkfifo(&p.dir.join("fifo.yaml"));
    write(&p.dir, "new.yaml", &svc(&c, "new", "10.96.5.3"));
    eventually("the new Service answers", || answers(&c, "10.96.5.3"));
    assert!(answers(&c, "10.96.5.1"));
    let logs = p.logs.text();
    for (file, why) in [("zero.yaml", "a character device"), ("fifo.yaml", "a FIFO")] {
        assert!(
            logs.lines().any(|l| l.contains(file) && l.contains(why)),
            "no error naming {file}: {logs}"
        );
    }
    // A FIFO appearing later is refused too, and a new Service still goes in.
    mkfifo(&p.dir.join("late-fifo.yaml"));
    write(&p.dir, "more.yaml", &svc(&c, "more", "10.96.5.2"));
    eventually("the later Service answers", || answers(&c, "10.96.5.2"));
    assert_eq!(healthz(&c).0, 200);
    assert!(metric(&c, "kwp_source_errors_total") >= 3.0);
    let rss = rss_mib(p.child.id());
    assert!(rss < 200, "{rss} MiB resident: /dev/zero was read");
    let logs = p.logs.text();
    assert_eq!(
        logs.matches("zero.yaml").count(),
        1,
        "a refused file is reported once: {logs}"
    );
}

#[test]
fn deeply_nested_yaml_neither_stalls_health_nor_holds_back_other_services() {
    let c = Cluster::new("fsdeep");
    let p = start(&c, &svc(&c, "good", "10.96.6.1"));
    eventually("the good Service answers", || answers(&c, "10.96.6.1"));
    write(&p.dir, "deep.yaml", &deeply_nested());
    std::thread::sleep(Duration::from_millis(300));
    write(&p.dir, "later.yaml", &svc(&c, "later", "10.96.6.2"));
    let started = Instant::now();
    let mut programmed = None;
    while started.elapsed() < Duration::from_secs(5) {
        let (status, took) = healthz(&c);
        assert!(
            status == 200 && took < Duration::from_secs(1),
            "/healthz: {status} after {took:?}"
        );
        if programmed.is_none() && answers(&c, "10.96.6.2") {
            programmed = Some(started.elapsed());
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let programmed = programmed.expect("the Service written after the nested file was programmed");
    assert!(programmed < Duration::from_secs(3), "took {programmed:?}");
    let logs = p.logs.text();
    assert!(
        logs.lines()
            .any(|l| l.contains("deep.yaml") && l.contains("nested deeper than 64")),
        "{logs}"
    );
    assert!(answers(&c, "10.96.6.1"));
}

#[test]
fn symlink_loops_are_read_once_and_cost_nothing_at_idle() {
    let c = Cluster::new("fsloop");
    let p = start(&c, "");
    let d = &p.dir;
    std::os::unix::fs::symlink(".", d.join("loop")).unwrap();
    std::os::unix::fs::symlink(".", d.join("again")).unwrap();
    std::fs::create_dir(d.join("sub")).unwrap();
    std::os::unix::fs::symlink("..", d.join("sub/up")).unwrap();
    write(&d.join("sub"), "good.yaml", &svc(&c, "good", "10.96.7.1"));
    eventually("the Service below the loops answers", || {
        answers(&c, "10.96.7.1")
    });
    let pid = p.child.id();
    let before = cpu_time(pid);
    std::thread::sleep(Duration::from_secs(3));
    let used = cpu_time(pid) - before;
    assert!(
        used < Duration::from_millis(300),
        "{used:?} of CPU in 3 s at idle"
    );
    let (status, took) = healthz(&c);
    assert!(status == 200 && took < Duration::from_secs(1));
    // Read once: one Service, no duplicate frontends from loop/sub/good.yaml.
    assert_eq!(metric(&c, "kwp_frontend_conflicts"), 0.0);
}

#[test]
fn a_file_rewritten_in_place_is_never_read_half_written() {
    let c = Cluster::new("fshalf");
    // Each version differs (a comment), so every rewrite is a change to
    // read; the objects stay the same, so nothing needs reprogramming.
    let both = |v: usize| {
        svc(&c, "a", "10.96.8.1") + &svc(&c, "b", "10.96.8.2") + &format!("# version {v}\n")
    };
    let p = start(&c, "");
    write(&p.dir, "ab.yaml", &both(0));
    let b: SocketAddr = addr("10.96.8.2", 80);
    eventually("b answers", || answers(&c, "10.96.8.2"));
    let changes = "kubeproxy_sync_proxy_rules_service_changes_total";
    let changes_before = metric(&c, changes);
    let client = ContinuousClient::start(&c.client, b);
    // Rewrite in place, as `cat > file` or an editor without rename does:
    // truncate, write the first Service, pause, write the second. The first
    // half alone is valid YAML without b.
    let head_len = svc(&c, "a", "10.96.8.1").len();
    // The source takes a file once it has been unchanged for 200 ms. The
    // writer pauses 120 ms between the halves; on a loaded machine that
    // pause can stretch past 200 ms, and then the half file has settled
    // and is rightly read. Such rewrites are counted and allowed for (two
    // changes each: b goes and comes back); twelve must be clean.
    let (mut clean, mut stretched) = (0, 0);
    for v in 1..=40 {
        use std::io::Write;
        if clean == 12 {
            break;
        }
        let text = both(v);
        let mut f = std::fs::File::create(p.dir.join("ab.yaml")).unwrap();
        f.write_all(&text.as_bytes()[..head_len]).unwrap();
        let paused = Instant::now();
        std::thread::sleep(Duration::from_millis(120));
        f.write_all(&text.as_bytes()[head_len..]).unwrap();
        if paused.elapsed() < Duration::from_millis(180) {
            clean += 1;
        } else {
            stretched += 1;
        }
        drop(f);
        std::thread::sleep(Duration::from_millis(150));
    }
    assert_eq!(clean, 12, "{stretched} pauses stretched past 180 ms");
    std::thread::sleep(Duration::from_millis(500));
    let (ok, failed) = client.stop();
    // Read half-written, b would be deleted and added back (a change each
    // time) and connections to it would fail while it is gone.
    let half_reads = metric(&c, changes) - changes_before;
    assert!(
        half_reads <= 2.0 * f64::from(stretched),
        "Services changed {half_reads} times with {stretched} stretched pauses: a half-written file was read\n{}",
        p.logs.text()
    );
    assert!(ok > 20, "only {ok} connections");
    // A rare lone SYN timeout (about 1 in 5,000 under load) was seen with
    // no change programmed at all; a half-read file fails hundreds.
    assert!(
        stretched > 0 || failed.len() * 1000 <= ok + failed.len(),
        "{} of {} connections to b failed: {failed:?}",
        failed.len(),
        ok + failed.len(),
    );
}

#[test]
fn a_missing_directory_is_reported_once_and_read_when_it_is_back() {
    let c = Cluster::new("fsmiss");
    let p = start(&c, &svc(&c, "good", "10.96.9.1"));
    eventually("the Service answers", || answers(&c, "10.96.9.1"));
    let errors = metric(&c, "kwp_source_errors_total");
    let away = p.dir.with_file_name("away");
    std::fs::rename(&p.dir, &away).unwrap();
    std::thread::sleep(Duration::from_secs(2));
    let logs = p.logs.text();
    assert_eq!(
        logs.matches("cannot read the source directory").count(),
        1,
        "{logs}"
    );
    assert_eq!(metric(&c, "kwp_source_errors_total"), errors + 1.0);
    assert!(answers(&c, "10.96.9.1"), "the last objects stay in force");
    assert_eq!(healthz(&c).0, 200);
    write(&away, "more.yaml", &svc(&c, "more", "10.96.9.2"));
    std::fs::rename(&away, &p.dir).unwrap();
    eventually("the new Service answers", || answers(&c, "10.96.9.2"));
    let logs = p.logs.text();
    assert_eq!(logs.matches("source directory readable again").count(), 1);
    assert_eq!(metric(&c, "kwp_source_errors_total"), errors + 1.0);
}

#[test]
fn sigterm_exits_within_two_seconds_while_the_source_is_busy() {
    let c = Cluster::new("fsterm");
    let mut p = start(&c, &svc(&c, "good", "10.96.10.1"));
    eventually("the Service answers", || answers(&c, "10.96.10.1"));
    // Keep the source busy: a nested file and a large file rewritten
    // again and again.
    write(&p.dir, "deep.yaml", &deeply_nested());
    let big = format!("items: [{}]\n", "1,".repeat(3 << 20));
    for i in 0..3 {
        write(&p.dir, &format!("big{i}.yaml"), &big);
        std::thread::sleep(Duration::from_millis(150));
    }
    unsafe { libc::kill(p.child.id() as i32, libc::SIGTERM) };
    let started = Instant::now();
    let status = loop {
        if let Some(status) = p.child.try_wait().unwrap() {
            break status;
        }
        assert!(
            started.elapsed() < Duration::from_secs(2),
            "still running 2 s after SIGTERM"
        );
        std::thread::sleep(Duration::from_millis(20));
    };
    assert!(status.success(), "{status:?}: {}", p.logs.text());
}

#[test]
fn five_thousand_files_are_read_once_idle_reads_none_and_a_new_one_is_one_read() {
    let c = Cluster::new("fs5k");
    // No periodic resync during the check: only the source scans.
    let p = start_with(&c, "", &["--sync-period", "1h"]);
    let read = "kwp_source_files_read_total";
    // The Node and the (empty) objects file are there from the start.
    eventually("the initial files read", || metric(&c, read) >= 2.0);
    let initial = metric(&c, read);
    for i in 0..5000 {
        let ip = format!("10.97.{}.{}", i / 250, i % 250 + 1);
        write(
            &p.dir,
            &format!("s{i:04}.yaml"),
            &svc(&c, &format!("s{i:04}"), &ip),
        );
    }
    // Reading and programming 5,000 files takes ~5 s here, 15 s and more
    // beside other heavy tests on 2 loaded cores: the wait is generous,
    // since what is asserted is the count of reads.
    common::poll::eventually_within(
        "the last of 5,000 Services answers",
        Duration::from_secs(60),
        || answers(&c, "10.97.19.250"),
    );
    // The source's cost is in what it reads: counted, not timed (how fast
    // is the benchmarks' business). Idle scans of an unchanged tree (inotify
    // wakes the source, a slow rescan every 5 s) read nothing; polling every
    // 200 ms used to re-read whole files, and a new Service waited 208 s.
    eventually("all 5,000 files read", || {
        metric(&c, read) >= initial + 5000.0
    });
    let settled = metric(&c, read);
    assert_eq!(settled, initial + 5000.0, "a file was read twice");
    // Longer than the slow rescan, so at least one full idle scan ran.
    std::thread::sleep(Duration::from_secs(6));
    assert_eq!(metric(&c, read), settled, "an idle scan read files");

    write(&p.dir, "new.yaml", &svc(&c, "new", "10.96.11.1"));
    eventually("the new Service answers", || answers(&c, "10.96.11.1"));
    assert_eq!(metric(&c, read), settled + 1.0, "a new file cost a rescan");
}
