//! Shared helpers for pct's integration tests (each test file does `mod common;`).
#![allow(dead_code)]
pub mod lab;
pub mod oracle;
