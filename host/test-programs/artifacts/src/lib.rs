//! Test guest components (see `host/test-programs/examples`), compiled by
//! this crate's build script.

const TABLE: &[(&str, &[u8])] = include!(concat!(env!("OUT_DIR"), "/programs.rs"));

/// The component bytes of test program `name`.
pub fn program(name: &str) -> &'static [u8] {
    TABLE
        .iter()
        .find(|(n, _)| *n == name)
        .map(|(_, b)| *b)
        .unwrap_or_else(|| panic!("no test program {name}"))
}

/// The names of every test program.
pub fn names() -> impl Iterator<Item = &'static str> {
    TABLE.iter().map(|(n, _)| *n)
}
