use super::*;

/// What the sync loop holds after the events sent so far.
#[derive(Default)]
struct Seen {
    services: std::collections::BTreeSet<String>,
    node: Option<String>,
    synced: bool,
}

impl Seen {
    fn apply(&mut self, event: SourceEvent) {
        match event {
            SourceEvent::Batch { deleted, applied } => {
                for (kind, key) in deleted {
                    assert_eq!(kind, Kind::Service);
                    self.services.remove(&key.name);
                }
                for object in applied {
                    let Object::Service(s) = object else {
                        panic!("not a Service")
                    };
                    self.services.insert(s.metadata.name.unwrap_or_default());
                }
            }
            SourceEvent::Apply(Object::Node(n)) => self.node = n.metadata.name,
            SourceEvent::Delete(Kind::Node, _) => self.node = None,
            SourceEvent::Synced(_) => self.synced = true,
            other => panic!("unexpected {other:?}"),
        }
    }

    /// One scan; whether it sent anything.
    fn scan(&mut self, src: &mut FileSource) -> bool {
        let mut sent = false;
        src.scan(&mut |event| {
            sent = true;
            self.apply(event);
            Ok(())
        })
        .unwrap();
        sent
    }

    fn services(&self) -> Vec<String> {
        self.services.iter().cloned().collect()
    }
}

/// Scans a new source until the first complete set is sent; its Services.
fn first_set(src: &mut FileSource, seen: &mut Seen) -> Vec<String> {
    for _ in 0..40 {
        seen.scan(src);
        if seen.synced {
            return seen.services();
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    panic!("no complete set")
}

fn svc(name: &str, port: u16) -> String {
    format!(
        "kind: Service\nmetadata: {{name: {name}, namespace: t}}\nspec: {{clusterIP: 10.0.0.1, ports: [{{port: {port}}}]}}\n---\n"
    )
}

/// Scans until something is sent (files settle), at most ~2 s; the
/// Services then.
fn scan_settled(src: &mut FileSource, seen: &mut Seen) -> Option<Vec<String>> {
    for _ in 0..40 {
        if seen.scan(src) {
            return Some(seen.services());
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    None
}

#[test]
fn malformed_file_keeps_its_last_good_contents_and_is_reported_once() {
    let dir = tempfile::tempdir().unwrap();
    let f = dir.path().join("svc.yaml");
    std::fs::write(&f, svc("a", 80)).unwrap();
    let mut src = FileSource::new(dir.path(), "n");
    let mut seen = Seen::default();
    assert_eq!(first_set(&mut src, &mut seen), ["a"]);

    std::fs::write(
        &f,
        "kind: Service\nmetadata: {name: a}\nspec: {ports: notalist}\n",
    )
    .unwrap();
    assert!(
        scan_settled(&mut src, &mut seen).is_none(),
        "a broken file must not change the state"
    );
    assert_eq!(src.errors.load(Ordering::Relaxed), 1);
    assert!(!seen.scan(&mut src));
    assert_eq!(
        src.errors.load(Ordering::Relaxed),
        1,
        "the same broken contents are reported once"
    );

    std::fs::remove_file(&f).unwrap();
    assert!(seen.scan(&mut src));
    assert!(
        seen.services().is_empty(),
        "deleting the file removes its objects"
    );
}

#[test]
fn a_file_being_written_is_read_only_once_it_settles() {
    let dir = tempfile::tempdir().unwrap();
    let f = dir.path().join("svc.yaml");
    std::fs::write(&f, svc("a", 80) + &svc("b", 80)).unwrap();
    let mut src = FileSource::new(dir.path(), "n");
    let mut seen = Seen::default();
    assert_eq!(first_set(&mut src, &mut seen), ["a", "b"]);

    // A writer rewrites the file in place in pieces, 50 ms apart: the
    // first half alone parses (only "a") and must never be taken.
    let full = svc("a", 81) + &svc("b", 81);
    let (head, tail) = full.split_at(full.len() / 2 + 10);
    let mut w = std::fs::File::create(&f).unwrap();
    use std::io::Write;
    let mut sets = Vec::new();
    for piece in [head, tail] {
        w.write_all(piece.as_bytes()).unwrap();
        for _ in 0..3 {
            if seen.scan(&mut src) {
                sets.push(seen.services());
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
    drop(w);
    sets.extend(scan_settled(&mut src, &mut seen));
    assert_eq!(sets, [["a", "b"]], "only the complete file is read");
    assert_eq!(src.errors.load(Ordering::Relaxed), 0);
}

#[test]
fn a_missing_directory_is_reported_once_and_its_appearance_is_read() {
    let parent = tempfile::tempdir().unwrap();
    let dir = parent.path().join("objects");
    let mut src = FileSource::new(&dir, "n");
    let mut seen = Seen::default();
    for _ in 0..20 {
        assert!(!seen.scan(&mut src));
    }
    assert_eq!(src.errors.load(Ordering::Relaxed), 1);
    std::fs::create_dir(&dir).unwrap();
    std::fs::write(dir.join("s.yaml"), svc("a", 80)).unwrap();
    assert_eq!(first_set(&mut src, &mut seen), ["a"]);
    // Gone again: the objects stay, one more error.
    std::fs::remove_dir_all(&dir).unwrap();
    for _ in 0..5 {
        assert!(!seen.scan(&mut src));
    }
    assert_eq!(src.errors.load(Ordering::Relaxed), 2);
}

#[test]
fn an_empty_directory_sends_one_empty_set() {
    let dir = tempfile::tempdir().unwrap();
    let mut src = FileSource::new(dir.path(), "n");
    let mut seen = Seen::default();
    assert!(seen.scan(&mut src));
    assert!(seen.synced && seen.services().is_empty());
    assert!(!seen.scan(&mut src));
}

#[test]
fn five_thousand_files_are_read_once_and_idle_scans_read_nothing() {
    let dir = tempfile::tempdir().unwrap();
    for i in 0..5000 {
        std::fs::write(
            dir.path().join(format!("s{i:04}.yaml")),
            svc(&format!("s{i:04}"), 80),
        )
        .unwrap();
    }
    let mut src = FileSource::new(dir.path(), "n");
    let mut seen = Seen::default();
    assert_eq!(first_set(&mut src, &mut seen).len(), 5000);

    assert_eq!(src.files_read.load(Ordering::Relaxed), 5000);

    // Idle scans look at metadata only: they read no file. (How long they
    // take is a benchmark's business, not a timed test's.)
    for _ in 0..10 {
        assert!(!seen.scan(&mut src));
    }
    assert_eq!(
        src.files_read.load(Ordering::Relaxed),
        5000,
        "an idle scan read files"
    );

    std::fs::write(dir.path().join("new.yaml"), svc("new", 80)).unwrap();
    let names = scan_settled(&mut src, &mut seen).unwrap();
    assert_eq!(names.len(), 5001);
    assert_eq!(
        src.files_read.load(Ordering::Relaxed),
        5001,
        "a new file costs one read, not a rescan"
    );
}

#[test]
fn the_first_object_set_waits_for_every_file_to_settle() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("node.yaml"), "").unwrap();
    let mut src = FileSource::new(dir.path(), "n");
    let mut seen = Seen::default();
    // An old file and one renamed into place just now, as before a restart.
    let old = std::time::SystemTime::now() - std::time::Duration::from_secs(60);
    std::fs::File::options()
        .write(true)
        .open(dir.path().join("node.yaml"))
        .unwrap()
        .set_modified(old)
        .unwrap();
    std::fs::write(dir.path().join("a.yaml"), svc("a", 80)).unwrap();
    seen.scan(&mut src);
    assert!(!seen.synced, "a first set without a.yaml was complete");
    assert_eq!(first_set(&mut src, &mut seen), ["a"]);
}

/// Files hold keys, not objects: what a changed or removed file no longer
/// holds is deleted, unless another file holds it; this node's Node comes
/// from the first file that has it.
#[test]
fn a_changed_file_sends_its_objects_and_what_it_dropped() {
    let dir = tempfile::tempdir().unwrap();
    let node = "kind: Node\nmetadata: {name: n}\n---\n";
    std::fs::write(dir.path().join("a.yaml"), svc("a", 80) + &svc("b", 80)).unwrap();
    std::fs::write(dir.path().join("b.yaml"), svc("b", 80) + node).unwrap();
    let mut src = FileSource::new(dir.path(), "n");
    src.settle = Duration::ZERO;
    let mut seen = Seen::default();
    assert_eq!(first_set(&mut src, &mut seen), ["a", "b"]);
    assert_eq!(seen.node.as_deref(), Some("n"));

    // b is still in b.yaml: not deleted, and b.yaml read again (its
    // version in force).
    std::fs::write(dir.path().join("a.yaml"), svc("a", 81)).unwrap();
    let read = src.files_read.load(Ordering::Relaxed);
    assert_eq!(scan_settled(&mut src, &mut seen).unwrap(), ["a", "b"]);
    assert_eq!(src.files_read.load(Ordering::Relaxed), read + 2);

    std::fs::remove_file(dir.path().join("b.yaml")).unwrap();
    assert_eq!(scan_settled(&mut src, &mut seen).unwrap(), ["a"]);
    assert_eq!(seen.node, None, "the Node's file is gone");
}
