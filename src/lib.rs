//! pct: page-cache teleportation for live migration of Linux VMs.
//!
//! The crate follows the pipeline, left to right:
//!
//! ```text
//! vmlinux ─▶ profile ─┐
//! guest RAM ─▶ memory ─▶ kernel (locate) ─▶ walk ─▶ blockmap ─▶ cachemap ─▶ migrate ─▶ report
//! ```
//!
//! Modules appear here as they land; each owns one stage and says so at its top.

pub mod blockmap;
pub mod cachemap;
pub mod introspect;
pub mod kernel;
pub mod memory;
pub mod migrate;
pub mod profile;
pub mod qemu;
/// Old path of [`qemu::monitor`], kept while callers move.
pub use qemu::monitor as qmp;
pub mod report;
pub mod walk;
