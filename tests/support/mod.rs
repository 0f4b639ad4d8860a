//! Support shared by pct's integration tests: every test binary does `mod support;`.
//!
//! - [`lab`]: the one guest launcher ([`lab::Guest`], over tools/lab/run-guest.sh);
//! - [`oracle`]: the guest's own view of its page cache (pct-oracle);
//! - [`profile`]: kernels, the lab's profiles, pahole as the independent oracle;
//! - [`migrate`]: `pct-migrate` processes and migrations between two lab guests;
//! - [`stream`]: firmware-only guests with a patterned RAM file, for real QEMU streams;
//! - [`blockmap`]: lab disk images and debugfs as the independent oracle;
//! - [`disk`]: qemu-img, qemu-io and loop devices, for the disk reader's formats;
//! - [`oldguest`]: synthetic RAM of kernels laid out by a profile (radix trees, whole guests).
#![allow(dead_code)]

pub mod blockmap;
pub mod disk;
pub mod lab;
pub mod migrate;
pub mod oldguest;
pub mod oracle;
pub mod profile;
pub mod stream;

use std::path::PathBuf;
use std::process::{Command, Output};

/// The repository (the crate's manifest directory).
pub fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// Runs `cmd` to its end and returns its output; panics, naming `what` and with the
/// command's stderr, when it cannot start or does not succeed.
pub fn run_ok(cmd: &mut Command, what: &str) -> Output {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("{what}: cannot run: {e}"));
    assert!(
        out.status.success(),
        "{what}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// xorshift64*: reproducible pseudo-random numbers (garbage, incompressible pages); the
/// crate's own generator, [`pct::migrate::replay::xorshift`].
pub fn rng(seed: u64) -> impl FnMut() -> u64 {
    pct::migrate::replay::xorshift(seed)
}
