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

    /// Resolves what the operator configured (`--lb-policy`, the mode): a
    /// path (contains `/` or ends in `.wasm`), else a name as [`Self::load_named`].
    pub fn load(&self, name_or_path: &str) -> Result<(PluginSource, Vec<u8>)> {
        if name_or_path.contains('/') || name_or_path.ends_with(".wasm") {
            let path = PathBuf::from(name_or_path);
            let bytes = read_plugin(&path)?;
            return Ok((PluginSource::File(path), bytes));
        }
        self.load_named(name_or_path)
    }

    /// Resolves a plugin name, as a Service's annotation gives it: never a
    /// path (anyone who can create a Service could make the privileged
    /// agent open any file), only `<dir>/<name>.wasm`, else a bundled plugin.
    pub fn load_named(&self, name: &str) -> Result<(PluginSource, Vec<u8>)> {
        check_plugin_name(name)?;
        if let Some(dir) = &self.dir {
            let path = dir.join(format!("{name}.wasm"));
            if path.exists() {
                let bytes = read_plugin(&path)?;
                return Ok((PluginSource::File(path), bytes));
            }
        }
        if let Some((name, bytes)) = kwp_plugins_bundle::bundled().find(|(n, _)| n == name) {
            return Ok((PluginSource::Bundled(name), bytes.to_vec()));
        }
        let bundled: Vec<String> = kwp_plugins_bundle::bundled().map(|(n, _)| n).collect();
        bail!(
            "no plugin named {name:?} (looked in {} and among the bundled plugins: {})",
            self.dir
                .as_ref()
                .map_or("no plugin directory".into(), |d| d.display().to_string()),
            bundled.join(", ")
        )
    }
}

/// The largest plugin file read (the bundled ones are ~64 KiB to ~300 KiB).
pub const MAX_PLUGIN_BYTES: u64 = 64 << 20;

/// A plugin name: lowercase letters, digits and '-', at most 63 (a DNS
/// label, so it is also a file name and a metric label as it is).
pub fn check_plugin_name(name: &str) -> Result<()> {
    let ok = !name.is_empty()
        && name.len() <= 63
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !name.starts_with('-');
    if !ok {
        bail!("{name:?} is not a plugin name (lowercase letters, digits and '-', at most 63)");
    }
    Ok(())
}

/// Reads a plugin file: a regular file (after symlinks) of bounded size,
/// so a FIFO, a device or a huge file cannot stall or swell the agent.
pub fn read_plugin(path: &Path) -> Result<Vec<u8>> {
    use std::io::Read;
    use std::os::unix::fs::OpenOptionsExt;
    // Non-blocking, so that opening a FIFO returns at once (and is then
    // refused as not a regular file) instead of waiting for a writer.
    let file = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK)
        .open(path)
        .with_context(|| format!("opening plugin {}", path.display()))?;
    let meta = file
        .metadata()
        .with_context(|| format!("reading plugin {}", path.display()))?;
    if !meta.is_file() {
        bail!("plugin {} is not a regular file", path.display());
    }
    let mut bytes = Vec::new();
    file.take(MAX_PLUGIN_BYTES + 1)
        .read_to_end(&mut bytes)
        .with_context(|| format!("reading plugin {}", path.display()))?;
    if bytes.len() as u64 > MAX_PLUGIN_BYTES {
        bail!(
            "plugin {} is larger than {} MiB",
            path.display(),
            MAX_PLUGIN_BYTES >> 20
        );
    }
    Ok(bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn annotations_name_plugins_never_files() {
        let catalog = Catalog::new(None);
        for bad in ["/etc/passwd", "../x", "x.wasm", "Maglev", "a/b", "", "-x"] {
            let e = catalog.load_named(bad).unwrap_err();
            assert!(
                format!("{e:#}").contains("not a plugin name"),
                "{bad}: {e:#}"
            );
        }
        assert!(catalog.load_named("maglev").is_ok());
    }

    #[test]
    fn only_bounded_regular_files_are_read() {
        let dir = tempfile::tempdir().unwrap();
        // A FIFO would block a plain read forever.
        let fifo = dir.path().join("fifo.wasm");
        let c = std::ffi::CString::new(fifo.to_str().unwrap()).unwrap();
        // SAFETY: a valid NUL-terminated path.
        assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
        let e = read_plugin(&fifo).unwrap_err();
        assert!(format!("{e:#}").contains("not a regular file"), "{e:#}");
        let e = read_plugin(Path::new("/dev/zero")).unwrap_err();
        assert!(format!("{e:#}").contains("not a regular file"), "{e:#}");
        let catalog = Catalog::new(Some(dir.path().into()));
        assert!(catalog.load_named("fifo").is_err());
    }
}
