//! `--dry-run`'s diff: what applying a plan would change in the kernel,
//! printed by nft itself on both sides.

use std::collections::{BTreeMap, BTreeSet};
use std::io::Write;
use std::process::{Command, Stdio};

use anyhow::{Context, Result, bail};

use super::kernel::Listing;
use super::script::Script;
use super::wanted::Wanted;

/// `--dry-run`: what applying `plan` would change in the kernel. The plan is
/// applied to a scratch network namespace so that both sides are printed by
/// nft itself, then the listings are compared line by line within each
/// chain, set and map.
pub fn diff_against_kernel(table: &str, plan: &crate::plan::Plan) -> Result<String> {
    let want = Wanted::of(std::iter::once(&plan.base).chain(plan.services.values()))?;
    let script = Script::new(table).full(&want, &Listing::default());
    let scratch = format!("kwp-dry-run-{}", std::process::id());
    let run = |args: &[&str]| {
        Command::new("ip")
            .args(args)
            .output()
            .context("running ip (iproute2)")
    };
    let out = run(&["netns", "add", &scratch])?;
    if !out.status.success() {
        bail!(
            "cannot create a scratch network namespace: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    let wanted = (|| -> Result<String> {
        let mut child = Command::new("ip")
            .args(["netns", "exec", &scratch, "nft", "-f", "-"])
            .stdin(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()?;
        child
            .stdin
            .take()
            .context("stdin")?
            .write_all(script.as_bytes())?;
        let out = child.wait_with_output()?;
        if !out.status.success() {
            bail!(
                "nft refused the plan: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        let mut listing = String::new();
        for family in ["ip", "ip6"] {
            listing.push_str(&String::from_utf8_lossy(
                &run(&[
                    "netns", "exec", &scratch, "nft", "list", "table", family, table,
                ])?
                .stdout,
            ));
        }
        Ok(listing)
    })();
    let _ = run(&["netns", "delete", &scratch]);
    let wanted = wanted?;
    let mut current = String::new();
    for family in ["ip", "ip6"] {
        let out = Command::new("nft")
            .args(["list", "table", family, table])
            .output()
            .context("running nft")?;
        if out.status.success() {
            current.push_str(&String::from_utf8_lossy(&out.stdout));
        }
    }
    Ok(diff_listings(&current, &wanted))
}

/// Lines (with the block they belong to) only in `old` (-) or only in `new` (+).
fn diff_listings(old: &str, new: &str) -> String {
    fn lines(text: &str) -> Vec<(String, String)> {
        let mut table = String::new();
        let mut block = String::new();
        let mut out = Vec::new();
        let mut in_elements = false;
        for line in text
            .lines()
            .map(str::trim)
            .filter(|l| !l.is_empty() && *l != "}")
        {
            // Set and map elements print as `elements = { a, b,` over
            // several lines: one diff line per element.
            if let Some(rest) = line.strip_prefix("elements = {") {
                in_elements = true;
                out.extend(split_elements(rest).map(|e| (block.clone(), e)));
            } else if in_elements {
                out.extend(split_elements(line).map(|e| (block.clone(), e)));
            } else {
                if let Some(t) = line.strip_prefix("table ") {
                    table = t.trim_end_matches('{').trim().to_string();
                } else if line.ends_with('{') {
                    block = format!("{table}: {}", line.trim_end_matches('{').trim());
                }
                out.push((block.clone(), line.to_string()));
            }
            if in_elements && line.ends_with('}') {
                in_elements = false;
            }
        }
        out
    }
    let (old, new) = (lines(old), lines(new));
    let old_set: BTreeSet<&(String, String)> = old.iter().collect();
    let new_set: BTreeSet<&(String, String)> = new.iter().collect();
    let mut by_block: BTreeMap<&str, Vec<String>> = BTreeMap::new();
    for l in old.iter().filter(|l| !new_set.contains(l)) {
        by_block
            .entry(&l.0)
            .or_default()
            .push(format!("-   {}", l.1));
    }
    for l in new.iter().filter(|l| !old_set.contains(l)) {
        by_block
            .entry(&l.0)
            .or_default()
            .push(format!("+   {}", l.1));
    }
    if by_block.is_empty() {
        return "# no changes: the kernel already holds this plan\n".into();
    }
    let (adds, dels) = by_block.values().flatten().fold((0, 0), |(a, d), l| {
        if l.starts_with('+') {
            (a + 1, d)
        } else {
            (a, d + 1)
        }
    });
    let mut out = format!("# {adds} lines to add, {dels} to remove\n");
    for (block, lines) in by_block {
        out.push_str(&format!("{block}\n"));
        for l in lines {
            out.push_str(&l);
            out.push('\n');
        }
    }
    out
}

fn split_elements(text: &str) -> impl Iterator<Item = String> + '_ {
    text.trim_end_matches('}')
        .split(", ")
        .map(|e| e.trim().trim_end_matches(',').trim().to_string())
        .filter(|e| !e.is_empty())
}

#[cfg(test)]
mod tests {
    #[test]
    fn listing_diffs_are_per_block() {
        let old = "table ip t {\n\tchain a {\n\t\tjump b\n\t}\n\tchain c {\n\t\taccept\n\t}\n\tmap m {\n\t\telements = { 1 : goto a,\n\t\t\t     2 : goto c }\n\t}\n}\n";
        let new = "table ip t {\n\tchain a {\n\t\tjump b\n\t\tdrop\n\t}\n\tmap m {\n\t\telements = { 1 : goto a }\n\t}\n}\n";
        let d = super::diff_listings(old, new);
        assert!(d.contains("ip t: chain a\n+   drop"), "{d}");
        assert!(
            d.contains("ip t: chain c\n-   chain c {\n-   accept"),
            "{d}"
        );
        assert!(
            d.contains("ip t: map m\n-   2 : goto c"),
            "one line per element: {d}"
        );
        assert_eq!(
            super::diff_listings(new, new),
            "# no changes: the kernel already holds this plan\n"
        );
    }
}
