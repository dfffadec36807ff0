//! The source directory on disk: a bounded walk that only looks at
//! metadata, and a bounded read of one regular file.
//!
//! - Directory symlinks are followed once: a visited set of (device,
//!   inode) makes `loop -> .` or two links to one directory cost one read.
//! - The walk stops at [`MAX_DEPTH`] levels and [`MAX_FILES`] files.
//! - Only regular files are read: a FIFO, a device or a symlink to one
//!   (`/dev/zero`) is reported by path, never opened for reading; files are
//!   opened non-blocking and checked again on the open descriptor, so a
//!   file swapped for a FIFO between the walk and the read cannot stall.
//! - At most [`MAX_FILE_BYTES`] are read.

use std::collections::{BTreeMap, HashSet};
use std::io::Read;
use std::os::unix::fs::{FileTypeExt, MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};

pub const MAX_FILE_BYTES: u64 = 8 << 20;
/// Directory levels below the source directory that are read.
pub const MAX_DEPTH: usize = 16;
/// Files (with a YAML or JSON name) read in the whole tree.
pub const MAX_FILES: usize = 100_000;

/// What identifies one version of a file without reading it: a rewrite in
/// place changes size, mtime or ctime; an atomic rename changes the inode.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Fingerprint {
    dev: u64,
    ino: u64,
    size: u64,
    mtime: (i64, i64),
    ctime: (i64, i64),
}

impl Fingerprint {
    fn of(meta: &std::fs::Metadata) -> Self {
        Self {
            dev: meta.dev(),
            ino: meta.ino(),
            size: meta.size(),
            mtime: (meta.mtime(), meta.mtime_nsec()),
            ctime: (meta.ctime(), meta.ctime_nsec()),
        }
    }

    /// How long ago the file was last written (zero if in the future).
    pub fn age(&self) -> std::time::Duration {
        let written = std::time::UNIX_EPOCH
            + std::time::Duration::new(self.mtime.0.max(0) as u64, self.mtime.1 as u32);
        std::time::SystemTime::now()
            .duration_since(written)
            .unwrap_or_default()
    }
}

/// One walk of the source directory.
#[derive(Debug, Default)]
pub struct Listing {
    /// Every file with a YAML or JSON name: its fingerprint, or why it is
    /// not read (not a regular file, too large, dangling link).
    pub files: BTreeMap<PathBuf, Result<Fingerprint, String>>,
    /// Directories that could not be read or were too deep: files below
    /// them keep their last contents.
    pub unread: Vec<(PathBuf, String)>,
    /// Every directory read (each once), for change notifications.
    pub dirs: Vec<PathBuf>,
}

impl Listing {
    /// Whether `path` was below a directory this walk could not read.
    pub fn under_unread(&self, path: &Path) -> bool {
        self.unread.iter().any(|(d, _)| path.starts_with(d))
    }
}

fn wanted_name(name: &str) -> bool {
    !name.starts_with('.') // editors' and atomic writers' temporary files
        && (name.ends_with(".yaml") || name.ends_with(".yml") || name.ends_with(".json"))
}

fn kind_of(ft: std::fs::FileType) -> &'static str {
    if ft.is_fifo() {
        "a FIFO"
    } else if ft.is_char_device() {
        "a character device"
    } else if ft.is_block_device() {
        "a block device"
    } else if ft.is_socket() {
        "a socket"
    } else if ft.is_dir() {
        "a directory"
    } else {
        "not a regular file"
    }
}

/// Why a file of this metadata is not read, if it is not.
fn refusal(meta: &std::fs::Metadata) -> Option<String> {
    if !meta.is_file() {
        return Some(format!(
            "{} (only regular files are read)",
            kind_of(meta.file_type())
        ));
    }
    (meta.len() > MAX_FILE_BYTES).then(|| {
        format!(
            "{} bytes, over the limit of {MAX_FILE_BYTES} bytes",
            meta.len()
        )
    })
}

/// Walks `root`; an error only if `root` itself cannot be read.
pub fn walk(root: &Path) -> Result<Listing> {
    let root_meta = std::fs::metadata(root)?;
    if !root_meta.is_dir() {
        bail!("not a directory");
    }
    let mut out = Listing::default();
    let mut visited = HashSet::new();
    let mut stack = vec![(root.to_path_buf(), 0usize)];
    while let Some((dir, depth)) = stack.pop() {
        let meta = match std::fs::metadata(&dir) {
            Ok(m) => m,
            Err(e) => {
                out.unread.push((dir, e.to_string()));
                continue;
            }
        };
        if !visited.insert((meta.dev(), meta.ino())) {
            tracing::debug!(dir = %dir.display(), "directory already read (a symlink loop or a second link)");
            continue;
        }
        let entries = match std::fs::read_dir(&dir) {
            Ok(e) => {
                out.dirs.push(dir.clone());
                e
            }
            Err(e) => {
                out.unread.push((dir, e.to_string()));
                continue;
            }
        };
        for entry in entries {
            let entry = match entry {
                Ok(e) => e,
                Err(e) => {
                    out.unread.push((dir.clone(), e.to_string()));
                    break;
                }
            };
            let path = entry.path();
            let name = entry.file_name();
            let name = name.to_string_lossy();
            if name.starts_with('.') {
                continue;
            }
            let Ok(ft) = entry.file_type() else { continue };
            // Follow symlinks with stat (never open) to learn the target.
            let meta = if ft.is_symlink() {
                std::fs::metadata(&path)
            } else {
                entry.metadata()
            };
            let is_dir = meta.as_ref().is_ok_and(|m| m.is_dir());
            if is_dir {
                if depth + 1 > MAX_DEPTH {
                    out.unread.push((
                        path,
                        format!("deeper than {MAX_DEPTH} levels below the source directory"),
                    ));
                } else {
                    stack.push((path, depth + 1));
                }
                continue;
            }
            if !wanted_name(&name) {
                continue;
            }
            if out.files.len() >= MAX_FILES {
                out.unread
                    .push((dir.clone(), format!("more than {MAX_FILES} files")));
                break;
            }
            let file = match meta {
                Ok(m) => refusal(&m).map_or(Ok(Fingerprint::of(&m)), Err),
                Err(e) => Err(format!("cannot stat: {e}")),
            };
            out.files.insert(path, file);
        }
    }
    Ok(out)
}

/// Reads a regular file of at most [`MAX_FILE_BYTES`] if it still has the
/// fingerprint `expected`; `Ok(None)` if it changed (it is being written).
pub fn read(path: &Path, expected: Fingerprint) -> Result<Option<String>> {
    // Non-blocking: opening a FIFO put in place since the walk must not wait
    // for a writer.
    let mut file = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK | libc::O_CLOEXEC)
        .open(path)
        .context("cannot open")?;
    let before = file.metadata().context("cannot stat")?;
    if let Some(why) = refusal(&before) {
        bail!("{why}");
    }
    if Fingerprint::of(&before) != expected {
        return Ok(None);
    }
    let mut bytes = Vec::with_capacity(before.len() as usize);
    (&mut file)
        .take(MAX_FILE_BYTES + 1)
        .read_to_end(&mut bytes)
        .context("cannot read")?;
    let after = file.metadata().context("cannot stat")?;
    if Fingerprint::of(&after) != expected || bytes.len() as u64 != after.len() {
        return Ok(None);
    }
    String::from_utf8(bytes).map(Some).context("not UTF-8 text")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fingerprint(l: &Listing, p: &Path) -> Fingerprint {
        l.files[p].clone().unwrap()
    }

    #[test]
    fn special_files_are_listed_with_a_reason_and_never_read() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        std::fs::write(d.join("ok.yaml"), "a: 1\n").unwrap();
        std::os::unix::fs::symlink("/dev/zero", d.join("zero.yaml")).unwrap();
        std::os::unix::fs::symlink("/nonexistent", d.join("dangling.yaml")).unwrap();
        let fifo = std::ffi::CString::new(d.join("fifo.yaml").to_str().unwrap()).unwrap();
        assert_eq!(unsafe { libc::mkfifo(fifo.as_ptr(), 0o600) }, 0);
        let big = std::fs::File::create(d.join("big.yaml")).unwrap();
        big.set_len(MAX_FILE_BYTES + 1).unwrap();
        std::fs::write(d.join("notes.txt"), "ignored").unwrap();

        let l = walk(d).unwrap();
        assert_eq!(l.files.len(), 5, "{l:?}");
        let why = |n: &str| l.files[&d.join(n)].clone().unwrap_err();
        assert!(why("zero.yaml").contains("a character device"));
        assert!(why("fifo.yaml").contains("a FIFO"));
        assert!(why("big.yaml").contains("over the limit of 8388608 bytes"));
        assert!(why("dangling.yaml").contains("cannot stat"));
        let ok = d.join("ok.yaml");
        assert_eq!(
            read(&ok, fingerprint(&l, &ok)).unwrap().as_deref(),
            Some("a: 1\n")
        );
    }

    #[test]
    fn a_file_swapped_for_a_fifo_or_device_after_the_walk_is_refused_without_blocking() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("x.yaml");
        std::fs::write(&p, "a: 1\n").unwrap();
        let fp = fingerprint(&walk(dir.path()).unwrap(), &p);
        std::fs::remove_file(&p).unwrap();
        std::os::unix::fs::symlink("/dev/zero", &p).unwrap();
        let e = read(&p, fp).unwrap_err();
        assert!(format!("{e:#}").contains("character device"), "{e:#}");
        std::fs::remove_file(&p).unwrap();
        let c = std::ffi::CString::new(p.to_str().unwrap()).unwrap();
        assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
        let e = read(&p, fp).unwrap_err();
        assert!(format!("{e:#}").contains("FIFO"), "{e:#}");
    }

    #[test]
    fn a_changed_file_is_not_read() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("x.yaml");
        std::fs::write(&p, "a: 1\n").unwrap();
        let fp = fingerprint(&walk(dir.path()).unwrap(), &p);
        std::fs::write(&p, "a: 12\n").unwrap();
        assert_eq!(read(&p, fp).unwrap(), None);
    }

    #[test]
    fn symlink_loops_are_read_once_and_depth_is_bounded() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        std::fs::write(d.join("a.yaml"), "a: 1\n").unwrap();
        std::os::unix::fs::symlink(".", d.join("loop")).unwrap();
        std::os::unix::fs::symlink(d, d.join("loop2")).unwrap();
        std::fs::create_dir(d.join("sub")).unwrap();
        std::os::unix::fs::symlink("..", d.join("sub/up")).unwrap();
        std::fs::write(d.join("sub/b.yaml"), "b: 1\n").unwrap();
        let started = std::time::Instant::now();
        let l = walk(d).unwrap();
        assert!(started.elapsed() < std::time::Duration::from_millis(200));
        let mut names: Vec<_> = l.files.keys().map(|p| p.file_name().unwrap()).collect();
        names.sort();
        assert_eq!(names, ["a.yaml", "b.yaml"], "{l:?}");

        let mut deep = d.join("deep");
        for _ in 0..MAX_DEPTH + 2 {
            deep = deep.join("d");
        }
        std::fs::create_dir_all(&deep).unwrap();
        std::fs::write(deep.join("c.yaml"), "c: 1\n").unwrap();
        let l = walk(d).unwrap();
        assert_eq!(l.files.len(), 2);
        assert!(l.under_unread(&deep.join("c.yaml")), "{:?}", l.unread);
    }
}
