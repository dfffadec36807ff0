//! `--source file:DIR`: Kubernetes YAML or JSON files (Service,
//! EndpointSlice, Node, or a `kind: List` of them, as `kubectl get -o yaml`
//! prints), followed by polling the directory.
//!
//! The source runs on a thread of its own ([`FileSource::spawn`]), never on
//! the event loop that serves health, metrics and signals, and sends each
//! changed file's objects to the sync loop, with what the file no longer
//! holds; it keeps only the keys (`held`), not the objects.
//!
//! - `disk`: the bounded walk (metadata only) and the bounded read.
//! - `parse`: YAML within depth and node-count limits -> objects.
//! - `held`: which file holds which objects, and this node's Node.
//! - `watch`: inotify says when to scan; an idle tree is scanned only
//!   every [`RESCAN`].
//!
//! A file is read only once it has settled (its size, times and inode were
//! the same at two scans at least [`SETTLE`] apart, or it was last written
//! longer ago than that), so a file rewritten in place is not read half
//! written. A file that cannot be read or parsed is reported once with its
//! path and reason, counted, and its last good objects stay in force.

mod disk;
mod held;
pub(crate) mod parse;
mod watch;

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::Node;
use tokio::sync::mpsc;

pub use disk::{MAX_FILE_BYTES, MAX_FILES};
pub use parse::{Objects, parse_objects};

use super::{Kind, Object, SourceEvent};
use disk::Fingerprint;

/// The sync loop is gone (its receiver closed).
#[derive(Debug, PartialEq, Eq)]
pub struct Closed;

/// Where a scan sends its events.
pub type Sink<'a> = &'a mut dyn FnMut(SourceEvent) -> Result<(), Closed>;

/// How often the directory is scanned (metadata only) while a file is
/// settling, the directory is missing, or inotify is unavailable; also the
/// shortest gap between two scans.
pub const POLL_INTERVAL: Duration = Duration::from_millis(200);
/// How often an idle tree is scanned anyway (what inotify cannot see: the
/// target of a file symlink outside the tree, a queue overflow).
pub const RESCAN: Duration = Duration::from_secs(5);
/// How long a changed file must stay unchanged before it is read.
pub const SETTLE: Duration = Duration::from_millis(200);

/// Directory state between scans.
pub struct FileSource {
    dir: PathBuf,
    node_name: String,
    /// Which objects each file's last good contents hold.
    held: held::Held,
    /// The Node last sent (`None`: none, or none yet).
    sent_node: Option<Node>,
    /// The fingerprint each file had when last read (good or not).
    handled: HashMap<PathBuf, Fingerprint>,
    /// Changed files waiting to settle: the fingerprint and when first seen.
    settling: HashMap<PathBuf, (Fingerprint, Instant)>,
    /// Files refused without reading (special, too large), with the reason
    /// last reported.
    refused: HashMap<PathBuf, String>,
    /// Problems with the directory itself or its subdirectories, as last
    /// reported (each is logged when it appears and when it clears).
    dir_problems: BTreeMap<PathBuf, String>,
    /// Whether every file was read once and `Synced` sent (even for an
    /// empty directory: the sync loop waits for it).
    sent: bool,
    /// How long a changed file must stay unchanged ([`SETTLE`]).
    settle: Duration,
    /// The directories the last scan read (to watch).
    dirs: Vec<PathBuf>,
    /// Errors reported so far (`kwp_source_errors_total`).
    pub errors: Arc<AtomicU64>,
    /// Files read so far (`kwp_source_files_read_total`): a scan's cost
    /// is in what it reads, so an idle scan reads none.
    pub files_read: Arc<AtomicU64>,
}

impl FileSource {
    pub fn new(dir: &Path, node_name: &str) -> Self {
        Self {
            dir: dir.into(),
            node_name: node_name.into(),
            held: held::Held::default(),
            sent_node: None,
            handled: HashMap::new(),
            settling: HashMap::new(),
            refused: HashMap::new(),
            dir_problems: BTreeMap::new(),
            sent: false,
            settle: SETTLE,
            dirs: Vec::new(),
            errors: Arc::default(),
            files_read: Arc::default(),
        }
    }

    fn count_error(&self) {
        self.errors.fetch_add(1, Ordering::Relaxed);
    }

    /// Scans the directory and sends what changed: one batch per file
    /// read or gone, this node's Node when it changed, and, once every file
    /// has been read (none still settling), `Synced` for every kind. Files
    /// still settling are read by a later scan.
    pub fn scan(&mut self, send: Sink<'_>) -> Result<(), Closed> {
        let listing = match disk::walk(&self.dir) {
            Ok(l) => l,
            Err(e) => {
                // Missing or unreadable: said once, until it changes; the
                // last good objects stay in force meanwhile.
                let why = format!("{e:#}");
                if self.dir_problems.get(&self.dir) != Some(&why) {
                    tracing::error!(dir = %self.dir.display(), error = why, "cannot read the source directory; keeping the last objects read and waiting for it");
                    self.count_error();
                    self.dir_problems.insert(self.dir.clone(), why);
                }
                return Ok(());
            }
        };
        self.report_dir_problems(&listing);
        self.dirs = listing.dirs.clone();
        let mut reread = Vec::new();
        for (path, file) in &listing.files {
            let fingerprint = match file {
                Ok(f) => *f,
                Err(why) => {
                    self.refuse(path, why);
                    continue;
                }
            };
            self.refused.remove(path);
            if self.handled.get(path) == Some(&fingerprint) {
                self.settling.remove(path);
                continue;
            }
            if !self.settled(path, fingerprint) {
                continue;
            }
            reread.extend(self.read(path, fingerprint, send)?);
        }
        // Files gone (but not those below a directory this walk could not
        // read: a transient error must not remove their objects).
        let keep = |p: &PathBuf| listing.files.contains_key(p) || listing.under_unread(p);
        let gone: Vec<PathBuf> = self.held.paths().filter(|p| !keep(p)).cloned().collect();
        for path in gone {
            if let Some(update) = self.held.remove(&path) {
                send(update.batch)?;
                reread.extend(update.reread);
            }
        }
        self.handled.retain(|p, _| keep(p));
        self.settling.retain(|p, _| keep(p));
        self.refused.retain(|p, _| keep(p));
        // A file another one held an object with: its version is in force
        // again. (Read as it is now; a re-read drops nothing, so this ends.)
        reread.sort();
        reread.dedup();
        for path in reread {
            // Unless it changed since: then it is read once settled.
            if let Some(Ok(fingerprint)) = listing.files.get(&path)
                && self.handled.get(&path) == Some(fingerprint)
            {
                self.read(&path, *fingerprint, send)?;
            }
        }
        if self.held.node() != self.sent_node.as_ref() {
            self.sent_node = self.held.node().cloned();
            send(match &self.sent_node {
                Some(node) => SourceEvent::Apply(Object::Node(node.clone())),
                None => SourceEvent::Delete(
                    Kind::Node,
                    crate::model::ObjectKey::new("", &self.node_name),
                ),
            })?;
        }
        // The first sync waits for every file: it is a full reconcile, and
        // a set missing a file still settling (one renamed into place just
        // before a restart) would delete that file's Services' rules from
        // the kernel until the next scan.
        if !self.sent && self.settling.is_empty() {
            self.sent = true;
            for kind in [Kind::Service, Kind::EndpointSlice, Kind::Node] {
                send(SourceEvent::Synced(kind))?;
            }
        }
        Ok(())
    }

    /// Reads and parses one file and sends its objects; the files to read
    /// again (they hold an object this one dropped).
    fn read(
        &mut self,
        path: &Path,
        fingerprint: Fingerprint,
        send: Sink<'_>,
    ) -> Result<Vec<PathBuf>, Closed> {
        self.files_read.fetch_add(1, Ordering::Relaxed);
        let mut reread = Vec::new();
        match disk::read(path, fingerprint) {
            Ok(None) => {
                // Changed while read: wait for it to settle again.
                self.settling
                    .insert(path.to_path_buf(), (fingerprint, Instant::now()));
                return Ok(reread);
            }
            Ok(Some(text)) => match parse_objects(&text) {
                Ok(objects) => {
                    tracing::debug!(path = %path.display(), services = objects.services.len(), slices = objects.slices.len(), "read file");
                    drop(text);
                    let update = self.held.replace(path, objects, &self.node_name);
                    send(update.batch)?;
                    reread = update.reread;
                }
                Err(e) => self.file_error(path, &e),
            },
            Err(e) => self.file_error(path, &e),
        }
        self.settling.remove(path);
        self.handled.insert(path.to_path_buf(), fingerprint);
        Ok(reread)
    }

    /// Reads everything once, now, without waiting for files to settle
    /// (`--dry-run`, benchmarks); an error if the directory cannot be read.
    pub fn read_now(&mut self, send: Sink<'_>) -> anyhow::Result<()> {
        use anyhow::Context;
        disk::walk(&self.dir).with_context(|| format!("reading {}", self.dir.display()))?;
        self.settle = Duration::ZERO;
        self.scan(send)
            .map_err(|Closed| anyhow::anyhow!("the sync loop is gone"))
    }

    /// Whether a changed file may be read now.
    fn settled(&mut self, path: &Path, fingerprint: Fingerprint) -> bool {
        if fingerprint.age() >= self.settle {
            return true;
        }
        match self.settling.get(path) {
            Some((f, since)) if *f == fingerprint => since.elapsed() >= self.settle,
            _ => {
                self.settling
                    .insert(path.to_path_buf(), (fingerprint, Instant::now()));
                false
            }
        }
    }

    fn file_error(&self, path: &Path, e: &anyhow::Error) {
        self.count_error();
        tracing::error!(path = %path.display(), error = format!("{e:#}"), "skipping file; its last good objects stay in force");
    }

    fn refuse(&mut self, path: &Path, why: &str) {
        if self.refused.get(path).map(String::as_str) != Some(why) {
            self.count_error();
            tracing::error!(path = %path.display(), error = why, "not reading file; its last good objects stay in force");
            self.refused.insert(path.to_path_buf(), why.to_string());
        }
    }

    fn report_dir_problems(&mut self, listing: &disk::Listing) {
        if let Some(why) = self.dir_problems.remove(&self.dir) {
            tracing::info!(dir = %self.dir.display(), was = why, "source directory readable again");
        }
        let now: BTreeMap<PathBuf, String> = listing.unread.iter().cloned().collect();
        for (dir, why) in &now {
            if self.dir_problems.get(dir) != Some(why) {
                self.count_error();
                tracing::error!(dir = %dir.display(), error = why, "not reading directory; files below it keep their last objects");
            }
        }
        for dir in self.dir_problems.keys().filter(|d| !now.contains_key(*d)) {
            tracing::info!(dir = %dir.display(), "directory readable again");
        }
        self.dir_problems = now;
    }

    /// Polls on a thread of its own until the receiver is gone, sending an
    /// event whenever the directory changes and counting errors in
    /// `errors`. The thread never holds up shutdown: nothing joins it.
    pub fn spawn(
        mut self,
        tx: mpsc::Sender<SourceEvent>,
        errors: Arc<AtomicU64>,
        files_read: Arc<AtomicU64>,
    ) -> std::io::Result<std::thread::JoinHandle<()>> {
        self.errors = errors;
        self.files_read = files_read;
        std::thread::Builder::new()
            .name("kwp-file-source".into())
            .spawn(move || {
                let watch = watch::Watch::new();
                loop {
                    let started = Instant::now();
                    let mut send = |event| tx.blocking_send(event).map_err(|_| Closed);
                    if self.scan(&mut send).is_err() {
                        return;
                    }
                    if tx.is_closed() {
                        return;
                    }
                    // Poll while something is pending; otherwise sleep until
                    // inotify says something changed, or the slow rescan.
                    let busy =
                        !self.settling.is_empty() || self.dir_problems.contains_key(&self.dir);
                    match &watch {
                        Some(w) if !busy => {
                            w.add(&self.dirs);
                            w.wait(RESCAN);
                        }
                        _ => {}
                    }
                    // At most one scan per POLL_INTERVAL, however busy the writers.
                    std::thread::sleep(POLL_INTERVAL.saturating_sub(started.elapsed()));
                    if let Some(w) = &watch {
                        w.drain();
                    }
                }
            })
    }
}

#[cfg(test)]
mod tests;
