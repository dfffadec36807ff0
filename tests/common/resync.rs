//! What the kernel resync tests of both kernel modes share
//! (`ipt_resync`, `nft_resync`): Services named by number, programmed
//! all at once into a dataplane, and a tool run in the test's namespace
//! whose failure fails the test (drift made behind the dataplane's back).

use std::process::Command;

use kwp::dataplane::Dataplane;
use kwp::model::{Protocol, ServicePortName};
use kwp::plan::Fragment;

/// `t/s<n>`, TCP, port named `port`.
pub fn name(n: usize, port: &str) -> ServicePortName {
    ServicePortName {
        namespace: "t".into(),
        name: format!("s{n}").into(),
        port: port.into(),
        protocol: Protocol::Tcp,
    }
}

/// The first sync: `base` and Service `n` as `fragments[n]`, none refused.
pub fn program(dp: &mut dyn Dataplane, base: &Fragment, fragments: &[Fragment], port: &str) {
    let changed: Vec<(ServicePortName, Option<&Fragment>)> = (fragments.iter().enumerate())
        .map(|(n, f)| (name(n, port), Some(f)))
        .collect();
    let applied = dp.apply(Some(base), &changed).expect("first sync");
    assert!(applied.refused.is_empty(), "{:?}", applied.refused);
}

/// Runs `tool` with `args` (split on spaces); its stdout. Fails the test
/// if it fails.
pub fn run(tool: &str, args: &str) -> String {
    let out = Command::new(tool)
        .args(args.split(' '))
        .output()
        .unwrap_or_else(|e| panic!("{tool} runs: {e}"));
    assert!(
        out.status.success(),
        "{tool} {args}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}
