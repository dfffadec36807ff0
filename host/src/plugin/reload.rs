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

/// What identifies one version of a plugin file: the file the name leads
/// to (device, inode, following symlinks), its mtime and size.
type Fingerprint = (u64, u64, SystemTime, u64);

/// Polls the plugin directory for replaced files.
pub struct Watcher {
    dir: PathBuf,
    seen: BTreeMap<PathBuf, Fingerprint>,
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
    /// Names are followed through symlinks: a mounted ConfigMap's
    /// `my-policy.wasm` is a link to `..data/my-policy.wasm`, and the
    /// kubelet updates it by swapping `..data` to a new directory, so only
    /// the file behind the link changes (a new inode, maybe the same size
    /// and mtime).
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
            if stem.starts_with("..") {
                continue; // the kubelet's own entries
            }
            let Ok(meta) = std::fs::metadata(&path) else {
                continue; // a dangling link, mid-swap: seen next time
            };
            let print = (
                std::os::unix::fs::MetadataExt::dev(&meta),
                std::os::unix::fs::MetadataExt::ino(&meta),
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

#[cfg(test)]
mod tests {
    use std::os::unix::fs::symlink;

    use super::*;

    /// Writes `files` the way the kubelet's atomic writer updates a mounted
    /// ConfigMap: a new `..<timestamp>` directory, a `..data_tmp` symlink to
    /// it renamed over `..data`, the old directory removed. The visible
    /// names are symlinks through `..data`, made once.
    fn kubelet_update(dir: &Path, stamp: &str, files: &[(&str, &[u8])]) {
        let versioned = dir.join(format!("..{stamp}"));
        std::fs::create_dir(&versioned).unwrap();
        for (name, bytes) in files {
            std::fs::write(versioned.join(name), bytes).unwrap();
        }
        let old = std::fs::read_link(dir.join("..data")).ok();
        symlink(format!("..{stamp}"), dir.join("..data_tmp")).unwrap();
        std::fs::rename(dir.join("..data_tmp"), dir.join("..data")).unwrap();
        for (name, _) in files {
            let visible = dir.join(name);
            if std::fs::symlink_metadata(&visible).is_err() {
                symlink(format!("..data/{name}"), &visible).unwrap();
            }
        }
        if let Some(old) = old {
            std::fs::remove_dir_all(dir.join(old)).unwrap();
        }
    }

    #[test]
    fn a_configmap_update_through_the_data_symlink_is_seen() {
        let dir = tempfile::tempdir().unwrap();
        // Same size and, within the clock's resolution, the same mtime:
        // only the file behind the link is new.
        kubelet_update(
            dir.path(),
            "2026_12_05_08_00_00.000000001",
            &[("my-policy.wasm", b"one")],
        );
        let mut watcher = Watcher::new(dir.path());
        assert!(watcher.changed().is_empty(), "nothing changed yet");
        kubelet_update(
            dir.path(),
            "2026_12_05_08_01_00.000000002",
            &[("my-policy.wasm", b"two")],
        );
        let changed = watcher.changed();
        assert_eq!(
            changed,
            vec![("my-policy".to_string(), dir.path().join("my-policy.wasm"))]
        );
        assert_eq!(std::fs::read(&changed[0].1).unwrap(), b"two");
        assert!(watcher.changed().is_empty(), "seen once");
        // The kubelet's own entries are never plugins.
        assert!(
            changed.iter().all(|(n, _)| !n.starts_with("..")),
            "{changed:?}"
        );
    }
}
