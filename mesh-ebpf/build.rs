//! Rebuild when bpf-linker changes (e.g. after `cargo xtask setup` rebuilt it
//! against another LLVM), since cargo cannot see that dependency.
fn main() {
    match which::which("bpf-linker") {
        Ok(path) => println!("cargo:rerun-if-changed={}", path.display()),
        Err(_) => println!("cargo:warning=bpf-linker not found: run `cargo xtask setup`"),
    }
}
