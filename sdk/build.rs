// wit-bindgen reads wit/ (the contract this crate ships) at compile time; make cargo rebuild when it changes.
fn main() {
    println!("cargo:rerun-if-changed=wit");
}
