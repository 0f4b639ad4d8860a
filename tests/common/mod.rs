//! Shared helpers for pct's integration tests (each test file does `mod common;`).
#![allow(dead_code)]
pub mod lab;
pub mod oracle;
/// Kernels and their profiles (the lab's profile: `profile::lab_profile`), shared with the
/// profile tests.
#[path = "../profile_common/mod.rs"]
pub mod profile;
