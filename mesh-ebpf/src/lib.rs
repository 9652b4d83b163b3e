//! Empty on purpose: see the `[lib]` note in Cargo.toml. The programs are in main.rs.
#![no_std]
