use kwp_wasm_build::{Guest, build, write_table};

/// Every file in `host/test-programs/examples` is a test program: the list
/// is read from there, never written by hand (a host test checks that each
/// one is used by a test).
fn main() {
    // Read at run time: a build script binary is reused by clones at other
    // paths (the target directory is shared), so a path compiled in with
    // env! can name a clone that is gone.
    let manifest = std::env::var("CARGO_MANIFEST_DIR").expect("cargo sets CARGO_MANIFEST_DIR");
    let examples = std::path::Path::new(&manifest).join("../examples");
    let mut names: Vec<String> = std::fs::read_dir(&examples)
        .expect("host/test-programs/examples")
        .flatten()
        .filter_map(|e| {
            let path = e.path();
            let stem = path.file_stem()?.to_str()?.to_string();
            path.extension().is_some_and(|x| x == "rs").then_some(stem)
        })
        .collect();
    names.sort();
    let built = build(&[Guest::Examples("kwp-test-programs")]);
    let wanted: Vec<&str> = names.iter().map(String::as_str).collect();
    write_table("programs.rs", &built, &wanted);
}
