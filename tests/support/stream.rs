//! Support for the stream tests: firmware-only lab guests ([`GuestSpec::bare`]: a paused
//! `pc-i440fx-7.2` TCG guest running SeaBIOS) whose RAM file in /dev/shm carries a known
//! pattern, and their migrations through QMP.

use super::lab::{Guest, GuestSpec};
use super::rng;
use serde_json::{json, Value};
use std::fs::File;
use std::io::{Seek, SeekFrom, Write};
use std::path::Path;
use std::time::{Duration, Instant};

/// Guest RAM of the test VMs, in MiB.
pub const RAM_MB: u64 = 128;
pub const PAGE: usize = 4096;

/// The stream tests' guest: SeaBIOS alone under TCG, [`RAM_MB`] of RAM, paused; its RAM is
/// zero (a fresh file) unless `ram_init` fills it.
pub fn firmware_guest() -> GuestSpec {
    GuestSpec {
        accel: Some("tcg"),
        ..GuestSpec::bare(RAM_MB as u32)
    }
}

impl Guest {
    /// Polls `query-migrate` until `completed`; panics on `failed` or timeout.
    pub fn wait_migration(&self, timeout: Duration) -> Value {
        let start = Instant::now();
        loop {
            let st = self.exec("query-migrate", Value::Null);
            match st.get("status").and_then(Value::as_str) {
                Some("completed") => return st,
                Some("failed") | Some("cancelled") => panic!("migration failed: {st}"),
                _ => {}
            }
            assert!(start.elapsed() < timeout, "migration timed out: {st}");
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Starts an outgoing migration to `uri` with sane test parameters.
    pub fn migrate(&self, uri: &str) {
        self.exec(
            "migrate-set-parameters",
            json!({ "max-bandwidth": 1u64 << 30 }),
        );
        self.exec("migrate", json!({ "uri": uri }));
    }
}

/// Deterministic bytes (xorshift64*), for incompressible page contents.
pub fn pseudo_random(seed: u64, out: &mut [u8]) {
    let mut next = rng(seed);
    for chunk in out.chunks_mut(8) {
        chunk.copy_from_slice(&next().to_le_bytes()[..chunk.len()]);
    }
}

/// Offsets (in ram0) of the test pattern: 1 MiB of pseudo-random bytes at 16 MiB, 64 KiB of
/// 0xab at 32 MiB (not zero: must be sent as PAGE), zeros elsewhere.
pub const RANDOM_AT: u64 = 16 << 20;
pub const RANDOM_LEN: usize = 1 << 20;
pub const FILL_AT: u64 = 32 << 20;
pub const FILL_LEN: usize = 64 << 10;

/// Creates the source RAM file with the test pattern.
pub fn make_source_ram(path: &Path) {
    let mut f = File::create(path).expect("create RAM file");
    f.set_len(RAM_MB << 20).expect("size RAM file");
    let mut random = vec![0u8; RANDOM_LEN];
    pseudo_random(0x5eed, &mut random);
    f.seek(SeekFrom::Start(RANDOM_AT)).expect("seek");
    f.write_all(&random).expect("write RAM file");
    f.seek(SeekFrom::Start(FILL_AT)).expect("seek");
    f.write_all(&vec![0xab; FILL_LEN]).expect("write RAM file");
}

/// A firmware guest on the patterned RAM file ([`make_source_ram`]), still paused.
pub fn patterned_guest() -> GuestSpec {
    GuestSpec {
        ram_init: Some(make_source_ram),
        ..firmware_guest()
    }
}

/// Starts a source VM on a patterned RAM file, lets SeaBIOS run for `run`, and returns it
/// (running; `migrate` stops it at the end).
pub fn patterned_source(run: Duration) -> Guest {
    patterned_source_of(patterned_guest(), run)
}

/// [`patterned_source`] of `spec` (e.g. another QEMU or machine type).
pub fn patterned_source_of(spec: GuestSpec, run: Duration) -> Guest {
    let vm = Guest::start(spec);
    vm.cont();
    std::thread::sleep(run);
    vm
}

/// A complete real stream (to a file) from a patterned source that ran for `run`, and the
/// source's guest RAM once the migration completed: (stream, RAM). The VM and its files
/// are gone when this returns.
pub fn capture_stream(run: Duration) -> (Vec<u8>, Vec<u8>) {
    capture_stream_of(patterned_guest(), run)
}

/// [`capture_stream`] from a source started as `spec`.
pub fn capture_stream_of(spec: GuestSpec, run: Duration) -> (Vec<u8>, Vec<u8>) {
    let dir = tempfile::tempdir().expect("temporary directory");
    let out = dir.path().join("stream.bin");
    let src = patterned_source_of(spec, run);
    src.migrate(&format!("exec:cat > {}", out.display()));
    src.wait_migration(Duration::from_secs(120));
    // The source is stopped now ("postmigrate"): its RAM is what was sent last.
    let ram = std::fs::read(&src.ram_path).expect("read source RAM");
    let stream = std::fs::read(&out).expect("read stream");
    (stream, ram)
}
