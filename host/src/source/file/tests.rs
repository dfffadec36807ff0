use super::*;

fn services(event: Option<SourceEvent>) -> Vec<String> {
    let Some(SourceEvent::Full { services, .. }) = event else {
        panic!("no event")
    };
    services
        .into_iter()
        .map(|s| s.metadata.name.unwrap_or_default())
        .collect()
}

fn svc(name: &str, port: u16) -> String {
    format!(
        "kind: Service\nmetadata: {{name: {name}, namespace: t}}\nspec: {{clusterIP: 10.0.0.1, ports: [{{port: {port}}}]}}\n---\n"
    )
}

/// Scans until something is sent (files settle), at most ~2 s.
fn scan_settled(src: &mut FileSource) -> Option<SourceEvent> {
    for _ in 0..40 {
        if let Some(e) = src.scan() {
            return Some(e);
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
    assert_eq!(services(scan_settled(&mut src)), ["a"]);

    std::fs::write(
        &f,
        "kind: Service\nmetadata: {name: a}\nspec: {ports: notalist}\n",
    )
    .unwrap();
    assert!(
        scan_settled(&mut src).is_none(),
        "a broken file must not change the state"
    );
    assert_eq!(src.errors.load(Ordering::Relaxed), 1);
    assert!(src.scan().is_none());
    assert_eq!(
        src.errors.load(Ordering::Relaxed),
        1,
        "the same broken contents are reported once"
    );

    std::fs::remove_file(&f).unwrap();
    assert!(
        services(src.scan()).is_empty(),
        "deleting the file removes its objects"
    );
}

#[test]
fn a_file_being_written_is_read_only_once_it_settles() {
    let dir = tempfile::tempdir().unwrap();
    let f = dir.path().join("svc.yaml");
    std::fs::write(&f, svc("a", 80) + &svc("b", 80)).unwrap();
    let mut src = FileSource::new(dir.path(), "n");
    assert_eq!(services(scan_settled(&mut src)), ["a", "b"]);

    // A writer rewrites the file in place in pieces, 50 ms apart: the
    // first half alone parses (only "a") and must never be taken.
    let full = svc("a", 81) + &svc("b", 81);
    let (head, tail) = full.split_at(full.len() / 2 + 10);
    let mut w = std::fs::File::create(&f).unwrap();
    use std::io::Write;
    let mut seen = Vec::new();
    for piece in [head, tail] {
        w.write_all(piece.as_bytes()).unwrap();
        for _ in 0..3 {
            if let Some(e) = src.scan() {
                seen.push(services(Some(e)));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
    drop(w);
    if let Some(e) = scan_settled(&mut src) {
        seen.push(services(Some(e)));
    }
    assert_eq!(seen, [["a", "b"]], "only the complete file is read");
    assert_eq!(src.errors.load(Ordering::Relaxed), 0);
}

#[test]
fn a_missing_directory_is_reported_once_and_its_appearance_is_read() {
    let parent = tempfile::tempdir().unwrap();
    let dir = parent.path().join("objects");
    let mut src = FileSource::new(&dir, "n");
    for _ in 0..20 {
        assert!(src.scan().is_none());
    }
    assert_eq!(src.errors.load(Ordering::Relaxed), 1);
    std::fs::create_dir(&dir).unwrap();
    std::fs::write(dir.join("s.yaml"), svc("a", 80)).unwrap();
    assert_eq!(services(scan_settled(&mut src)), ["a"]);
    // Gone again: the objects stay, one more error.
    std::fs::remove_dir_all(&dir).unwrap();
    for _ in 0..5 {
        assert!(src.scan().is_none());
    }
    assert_eq!(src.errors.load(Ordering::Relaxed), 2);
}

#[test]
fn an_empty_directory_sends_one_empty_set() {
    let dir = tempfile::tempdir().unwrap();
    let mut src = FileSource::new(dir.path(), "n");
    assert!(services(src.scan()).is_empty());
    assert!(src.scan().is_none());
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
    let first = scan_settled(&mut src);
    assert_eq!(services(first).len(), 5000);

    assert_eq!(src.files_read.load(Ordering::Relaxed), 5000);

    // Idle scans look at metadata only: they read no file. (How long they
    // take is a benchmark's business, not a timed test's.)
    for _ in 0..10 {
        assert!(src.scan().is_none());
    }
    assert_eq!(
        src.files_read.load(Ordering::Relaxed),
        5000,
        "an idle scan read files"
    );

    std::fs::write(dir.path().join("new.yaml"), svc("new", 80)).unwrap();
    let names = services(scan_settled(&mut src));
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
    // An old file and one renamed into place just now, as before a restart.
    let old = std::time::SystemTime::now() - std::time::Duration::from_secs(60);
    std::fs::File::options()
        .write(true)
        .open(dir.path().join("node.yaml"))
        .unwrap()
        .set_modified(old)
        .unwrap();
    std::fs::write(dir.path().join("a.yaml"), svc("a", 80)).unwrap();
    assert!(src.scan().is_none(), "a first set without a.yaml was sent");
    assert_eq!(services(scan_settled(&mut src)), ["a"]);
}
