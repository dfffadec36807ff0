// wit-bindgen reads ../wit at compile time; make cargo rebuild when it changes.
fn main() {
    println!("cargo:rerun-if-changed=../wit");
}
