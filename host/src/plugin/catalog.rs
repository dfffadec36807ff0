//! Finding plugins: by path, by name in the plugin directory, or among the
//! plugins bundled into the binary.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};

/// Where a plugin's bytes came from, for logs and `/configz`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum PluginSource {
    File(PathBuf),
    Bundled(String),
}

impl std::fmt::Display for PluginSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            PluginSource::File(p) => write!(f, "{}", p.display()),
            PluginSource::Bundled(n) => write!(f, "bundled:{n}"),
        }
    }
}

#[derive(Clone, Debug)]
pub struct Catalog {
    dir: Option<PathBuf>,
}

impl Catalog {
    /// `dir` is `--plugin-dir`; without it, `plugins/` next to the binary is
    /// used when it exists.
    pub fn new(dir: Option<PathBuf>) -> Self {
        let dir = dir.or_else(|| {
            let exe = std::env::current_exe().ok()?;
            let candidate = exe.parent()?.join("plugins");
            candidate.is_dir().then_some(candidate)
        });
        Self { dir }
    }

    pub fn dir(&self) -> Option<&Path> {
        self.dir.as_deref()
    }

    /// Resolves `name_or_path`: a path (contains `/` or ends in `.wasm`),
    /// else `<dir>/<name>.wasm`, else a bundled plugin.
    pub fn load(&self, name_or_path: &str) -> Result<(PluginSource, Vec<u8>)> {
        if name_or_path.contains('/') || name_or_path.ends_with(".wasm") {
            let path = PathBuf::from(name_or_path);
            let bytes = std::fs::read(&path)
                .with_context(|| format!("reading plugin {}", path.display()))?;
            return Ok((PluginSource::File(path), bytes));
        }
        if let Some(dir) = &self.dir {
            let path = dir.join(format!("{name_or_path}.wasm"));
            if path.exists() {
                let bytes = std::fs::read(&path)
                    .with_context(|| format!("reading plugin {}", path.display()))?;
                return Ok((PluginSource::File(path), bytes));
            }
        }
        if let Some((name, bytes)) = kwp_plugins_bundle::bundled().find(|(n, _)| n == name_or_path)
        {
            return Ok((PluginSource::Bundled(name), bytes.to_vec()));
        }
        let bundled: Vec<String> = kwp_plugins_bundle::bundled().map(|(n, _)| n).collect();
        bail!(
            "no plugin named {name_or_path:?} (looked in {} and among the bundled plugins: {})",
            self.dir
                .as_ref()
                .map_or("no plugin directory".into(), |d| d.display().to_string()),
            bundled.join(", ")
        )
    }
}
