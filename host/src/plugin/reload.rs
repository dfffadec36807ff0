//! Hot reload of plugins: a replaced `<name>.wasm` in the plugin
//! directory (or SIGHUP) is compiled and probed away from the sync path,
//! and only a candidate that passes is handed to the sync loop to swap in.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::SystemTime;

use anyhow::{Context, Result, bail};
use wasmtime::component::Component;

use super::policy::Policy;
use super::{PluginDigest, PluginKind, Runtime};

/// A new plugin version that passed its checks.
pub struct Candidate {
    pub name: String,
    pub component: Component,
    pub digest: PluginDigest,
    pub kind: PluginKind,
}

/// Compiles `bytes` as plugin `name` and runs the checks a reload needs:
/// not quarantined, one world of our WIT version (its kind comes from what
/// it exports), `configure` accepts the empty config, and a probe with
/// sample inputs completes under the deadline with sane answers.
pub fn prepare(runtime: &Arc<Runtime>, name: &str, bytes: &[u8]) -> Result<Candidate> {
    let digest = PluginDigest::of(bytes);
    if runtime.is_quarantined(&digest) {
        bail!("this version of {name} was rolled back before and is quarantined");
    }
    let component = runtime.compile(bytes)?;
    let kind = runtime.kind_of(&component)?;
    if kind == PluginKind::Mode {
        let settings = super::mode::ModeSettings {
            table: crate::plan::Rules::default().nft_table,
            ..Default::default()
        };
        let mut probe = super::mode::Mode::new(runtime.clone(), name, &component, settings)?;
        probe.probe(&crate::plan::Rules::default())?;
    } else {
        let mut probe = Policy::new(runtime.clone(), name, &component, "")?;
        probe.probe().context("probe with sample endpoints")?;
    }
    Ok(Candidate {
        name: name.into(),
        component,
        digest,
        kind,
    })
}

/// Polls the plugin directory for replaced files.
pub struct Watcher {
    dir: PathBuf,
    seen: BTreeMap<PathBuf, (SystemTime, u64)>,
}

impl Watcher {
    /// Starts from what is there now: only later changes count.
    pub fn new(dir: &Path) -> Self {
        let mut w = Self {
            dir: dir.into(),
            seen: BTreeMap::new(),
        };
        w.changed();
        w
    }

    /// `(plugin name, path)` of every `.wasm` file that changed since the
    /// last call. Atomic renames into place show up as a new mtime/inode.
    pub fn changed(&mut self) -> Vec<(String, PathBuf)> {
        let mut out = Vec::new();
        let Ok(entries) = std::fs::read_dir(&self.dir) else {
            return out;
        };
        for entry in entries.flatten() {
            let path = entry.path();
            let (Some(stem), Some("wasm")) = (
                path.file_stem().and_then(|s| s.to_str()),
                path.extension().and_then(|e| e.to_str()),
            ) else {
                continue;
            };
            let Ok(meta) = entry.metadata() else { continue };
            let print = (
                meta.modified().unwrap_or(SystemTime::UNIX_EPOCH),
                meta.len(),
            );
            if self.seen.insert(path.clone(), print) != Some(print) {
                out.push((stem.to_string(), path));
            }
        }
        out
    }

    /// SIGHUP: treat every file as changed.
    pub fn forget(&mut self) {
        self.seen.clear();
    }
}

/// Reads, compiles and checks one changed file, counting rejections.
pub fn candidate_from_file(runtime: &Arc<Runtime>, name: &str, path: &Path) -> Option<Candidate> {
    let result = super::catalog::read_plugin(path).and_then(|bytes| prepare(runtime, name, &bytes));
    match result {
        Ok(c) => Some(c),
        Err(e) => {
            runtime.reloads.rejections.fetch_add(1, Ordering::Relaxed);
            tracing::error!(plugin = name, path = %path.display(), error = format!("{e:#}"), "reload rejected; the current version stays");
            None
        }
    }
}
