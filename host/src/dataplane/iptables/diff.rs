//! `--dry-run` in iptables mode: what a sync would change in the kernel.
//! The plan is restored into a scratch network namespace and saved back,
//! so both sides are in `iptables-save`'s normal form (it reorders
//! matches and quotes comments) and compare line by line.

use std::collections::BTreeSet;
use std::io::Write;
use std::process::Command;

use anyhow::{Context, Result, bail};

use super::kernel::{Backend, IptablesKernel, IptablesProcess, parse_save};
use super::{PREFIX, TABLES, contributions, full_scripts};
use crate::dataplane::FragmentKey;
use crate::plan::Fragment;

/// `+ ` lines the kernel lacks and `- ` lines it has beyond the plan, for
/// our chains and our jumps, per family and table.
pub fn diff_against_kernel(plan: &crate::plan::Plan) -> Result<String> {
    let keyed: Vec<(FragmentKey, &Fragment)> = std::iter::once((None, &plan.base))
        .chain(plan.services.iter().map(|(n, f)| (Some(n.clone()), f)))
        .collect();
    let want = contributions(keyed.iter().map(|(k, f)| (k, *f)))?;
    let scratch = format!("kwp-dry-run-ipt-{}", std::process::id());
    let ip = |args: &[&str]| Command::new("ip").args(args).output().context("running ip");
    let out = ip(&["netns", "add", &scratch])?;
    if !out.status.success() {
        bail!(
            "cannot create a scratch network namespace: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    let result = (|| -> Result<String> {
        let backend = Backend::detect();
        let mut kernel = IptablesProcess { backend };
        let mut text = String::new();
        for (script_key, script) in full_scripts(&want, &Default::default()) {
            let (ipv6, table) = &script_key;
            let tool = if *ipv6 {
                "ip6tables-restore"
            } else {
                "iptables-restore"
            };
            let mut child = Command::new("ip")
                .args(["netns", "exec", &scratch, tool, "--noflush"])
                .stdin(std::process::Stdio::piped())
                .stderr(std::process::Stdio::piped())
                .spawn()
                .context("restoring the plan in the scratch namespace")?;
            child
                .stdin
                .take()
                .context("stdin")?
                .write_all(script.as_bytes())?;
            let done = child.wait_with_output()?;
            if !done.status.success() {
                bail!(
                    "the plan's {table} table is refused: {}",
                    String::from_utf8_lossy(&done.stderr).trim()
                );
            }
        }
        for (ipv6, table) in TABLES {
            let save = if *ipv6 {
                "ip6tables-save"
            } else {
                "iptables-save"
            };
            let wanted = Command::new("ip")
                .args(["netns", "exec", &scratch, save, "-t", table])
                .output()
                .context("saving the scratch namespace")?;
            let ours = |text: &str| -> BTreeSet<String> {
                parse_save(text)
                    .into_iter()
                    .flat_map(|(chain, rules)| rules.into_iter().map(move |r| (chain.clone(), r)))
                    .filter(|(chain, rule)| chain.starts_with(PREFIX) || rule.contains(PREFIX))
                    .map(|(chain, rule)| format!("-A {chain} {rule}"))
                    .collect()
            };
            let wanted = ours(&String::from_utf8_lossy(&wanted.stdout));
            let have = ours(&kernel.save(*ipv6, table)?);
            let family = if *ipv6 { "ip6tables" } else { "iptables" };
            for line in wanted.difference(&have) {
                text.push_str(&format!("+ {family} -t {table} {line}\n"));
            }
            for line in have.difference(&wanted) {
                text.push_str(&format!("- {family} -t {table} {line}\n"));
            }
        }
        Ok(text)
    })();
    let _ = ip(&["netns", "delete", &scratch]);
    result
}
