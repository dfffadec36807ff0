//! Runs test cases inside a VM whose kernel has IPVS (scripts/ipvs-vm.sh).
//!
//! The same test executable runs on both sides. On the host, the first case
//! to ask boots ONE VM that runs this executable again (all its cases, one
//! thread), with the kwp binary, `ip`, `nft` and `conntrack` at their host
//! paths; every host case then reports what its twin in the guest printed.
//! In the guest (`KWP_IPVS_VM_GUEST=1`), a case runs for real against a
//! namespace cluster (common/topology.rs) and one shared proxy in IPVS mode.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;
use std::time::{Duration, Instant};

/// What the guest printed for each case: (passed, seconds, its output).
pub struct VmRun {
    pub log: String,
    pub boot_secs: Option<f64>,
    pub cases: BTreeMap<String, (bool, f64, String)>,
    pub total: Duration,
}

pub fn in_guest() -> bool {
    std::env::var_os("KWP_IPVS_VM_GUEST").is_some()
}

/// Runs `body` in the guest, or asserts on the host that it passed there.
/// On a host that cannot run the VM at all, says so and returns.
pub fn case(name: &str, body: impl FnOnce()) {
    if in_guest() {
        return in_the_guest(name, body);
    }
    report(name, vm_run());
}

/// Like `case`, for a case that boots a VM of its own (a long soak, run
/// with `--ignored`): the guest runs only it, with `env` (`NAME=value`).
pub fn alone(name: &str, env: &[String], body: impl FnOnce()) {
    if in_guest() {
        return in_the_guest(name, body);
    }
    let filter = format!("{}{name}", cases_module());
    let run = boot(&filter, &["--ignored", "--exact"], env, true);
    report(name, run.as_ref());
}

fn in_the_guest(name: &str, body: impl FnOnce()) {
    println!("KWP-CASE-BEGIN {name}");
    let started = Instant::now();
    let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(body));
    let secs = started.elapsed().as_secs_f64();
    if result.is_err() {
        println!("--- proxy log (tail) ---\n{}", super::guest::log_tail());
    }
    let verdict = if result.is_ok() { "ok" } else { "FAILED" };
    println!("KWP-CASE-END {name} {verdict} {secs:.1}");
    if let Err(panic) = result {
        std::panic::resume_unwind(panic);
    }
}

fn report(name: &str, run: Option<&VmRun>) {
    let Some(run) = run else {
        eprintln!("SKIPPED {name}: this machine cannot run the IPVS VM (see the message above)");
        return;
    };
    match run.cases.get(name) {
        Some((true, secs, out)) => eprintln!(
            "{name}: passed in the VM in {secs:.1} s (boot {:.1} s, whole VM {:.1} s)\n{}",
            run.boot_secs.unwrap_or(f64::NAN),
            run.total.as_secs_f64(),
            // What a soak measured.
            out.lines()
                .filter(|l| l.starts_with("soak"))
                .collect::<Vec<_>>()
                .join("\n")
        ),
        Some((false, _, out)) => panic!("{name} failed in the VM:\n{out}"),
        None => panic!(
            "{name} never finished in the VM (crash or timeout); console:\n{}",
            run.log
        ),
    }
}

/// Boots the VM once for all cases of this executable.
fn vm_run() -> Option<&'static VmRun> {
    static RUN: OnceLock<Option<VmRun>> = OnceLock::new();
    RUN.get_or_init(|| {
        // KWP_IPVS_VM_CASES: the start of case names (while working on one case).
        let only = std::env::var("KWP_IPVS_VM_CASES").unwrap_or_default();
        let api = super::soak::SHORT.starts_with(&only);
        boot(&format!("{}{only}", cases_module()), &[], &[], api)
    })
    .as_ref()
}

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("workspace root")
        .to_path_buf()
}

/// A host program's path (`ip`, `nft`, ...), installing nothing: the suite's
/// script installs the packages.
fn host_program(name: &str) -> String {
    for dir in ["/usr/sbin", "/sbin", "/usr/bin", "/bin"] {
        let path = format!("{dir}/{name}");
        if Path::new(&path).exists() {
            return path;
        }
    }
    panic!("{name} is not installed on the host (scripts/test.sh installs it)");
}

/// Boots a VM that runs this executable's cases matching `filter`; with
/// `api`, a kube-apiserver on the host's loopback that the guest reaches
/// through its NIC (the churn soak's).
fn boot(filter: &str, args: &[&str], env: &[String], api: bool) -> Option<VmRun> {
    if !cfg!(target_arch = "x86_64") {
        eprintln!(
            "SKIPPED: the IPVS VM runs this host's x86_64 executables; this host is not x86_64"
        );
        return None;
    }
    let me = std::env::current_exe().expect("own executable");
    let mut files = vec![
        env!("CARGO_BIN_EXE_kube-wasm-proxy").to_string(),
        host_program("ip"),
        host_program("nft"),
        host_program("conntrack"),
    ];
    let mut env = env.to_vec();
    // Held until the VM is done.
    let host_api = if api {
        super::soak::HostApi::start()
    } else {
        None
    };
    if let Some(host_api) = &host_api {
        files.extend(host_api.files());
        env.extend(host_api.env());
    }
    let started = Instant::now();
    let out = Command::new(root().join("scripts/ipvs-vm.sh"))
        .arg(&me)
        .args(["--test-threads=1", "--nocapture", filter])
        .args(args)
        .env("KWP_IPVS_VM_FILES", files.join(" "))
        .env("KWP_IPVS_VM_ENV", env.join(" "))
        .env("KWP_IPVS_VM_NET", if api { "1" } else { "0" })
        .env("KWP_IPVS_VM_MEM", "2048")
        .env("KWP_IPVS_VM_SMP", "2")
        .env(
            "KWP_IPVS_VM_TIMEOUT",
            std::env::var("KWP_IPVS_VM_TIMEOUT").unwrap_or_else(|_| "900".into()),
        )
        .output()
        .expect("run scripts/ipvs-vm.sh");
    drop(host_api);
    if out.status.code() == Some(77) {
        eprintln!(
            "SKIPPED: this machine cannot run the IPVS VM: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        return None;
    }
    let log = String::from_utf8_lossy(&out.stdout).into_owned();
    let total = started.elapsed();
    let saved = std::env::temp_dir().join("kwp-ipvs-vm-console.log");
    let _ = std::fs::write(&saved, &log);
    eprintln!(
        "the IPVS VM ran for {:.1} s; its console is in {}",
        total.as_secs_f64(),
        saved.display()
    );
    Some(parse(log, total))
}

/// The cases' module as libtest names it (`ipvs_vm::`), so the guest runs
/// only them out of the whole e2e crate.
fn cases_module() -> String {
    let path: Vec<&str> = module_path!().split("::").collect();
    path[1..path.len() - 1]
        .iter()
        .map(|m| format!("{m}::"))
        .collect()
}

/// Splits the console into cases by their markers.
fn parse(log: String, total: Duration) -> VmRun {
    let boot_secs = log
        .lines()
        .find_map(|l| l.trim().strip_prefix("KWP-VM-BOOTED "))
        .and_then(|s| s.parse().ok());
    let mut cases = BTreeMap::new();
    let mut current: Option<(String, String)> = None;
    for line in log.lines() {
        // libtest prints "test <name> ... " with no newline before a case's output.
        let marker = |m: &str| line.find(m).map(|at| &line[at + m.len()..]);
        if let Some(name) = marker("KWP-CASE-BEGIN ") {
            current = Some((name.trim().to_string(), String::new()));
        } else if let Some(rest) = marker("KWP-CASE-END ") {
            let mut words = rest.split_whitespace();
            let (name, verdict, secs) = (words.next(), words.next(), words.next());
            if let (Some(name), Some((_, out))) = (name, current.take()) {
                let secs = secs.and_then(|s| s.parse().ok()).unwrap_or(f64::NAN);
                cases.insert(name.to_string(), (verdict == Some("ok"), secs, out));
            }
        } else if let Some((_, out)) = current.as_mut() {
            out.push_str(line);
            out.push('\n');
        }
    }
    VmRun {
        log,
        boot_secs,
        cases,
        total,
    }
}

#[test]
fn the_case_markers_are_parsed_and_a_failed_or_missing_case_is_not_a_pass() {
    let log = "KWP-VM-BOOTED 7.5\ntest a ... KWP-CASE-BEGIN a\nhello\nKWP-CASE-END a ok 1.5\n\
               KWP-CASE-BEGIN b\npanicked at x\nKWP-CASE-END b FAILED 2.0\nKWP-CASE-BEGIN c\n";
    let run = parse(log.into(), Duration::ZERO);
    assert_eq!(run.boot_secs, Some(7.5));
    assert_eq!(run.cases["a"], (true, 1.5, "hello\n".into()));
    assert!(!run.cases["b"].0 && run.cases["b"].2.contains("panicked"));
    assert!(!run.cases.contains_key("c"));
}
