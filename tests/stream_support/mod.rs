//! Test support for the stream tests: throw-away QEMU 7.2 instances whose guest RAM is a
//! file in /dev/shm, cleaned up (process killed, files removed) even when a test fails.

#![allow(dead_code)]

use pct::qmp::Qmp;
use serde_json::{json, Value};
use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

/// Guest RAM of the test VMs, in MiB.
pub const RAM_MB: u64 = 128;
pub const PAGE: usize = 4096;

static COUNTER: AtomicU32 = AtomicU32::new(0);

/// A name unique to this process and call: `pct-test-<pid>-<n>-<tag>`.
pub fn unique(tag: &str) -> String {
    let n = COUNTER.fetch_add(1, Ordering::SeqCst);
    format!("pct-test-{}-{n}-{tag}", std::process::id())
}

/// True if QEMU can be run here. Without it the calling test fails, unless
/// `PCT_ALLOW_SKIP` is set: then it returns false and the test skips, saying so.
pub fn have_qemu() -> bool {
    let ok = Command::new("qemu-system-x86_64")
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if !ok {
        // tools/test.sh installs QEMU: its absence is a broken setup, not a reason to pass.
        assert!(
            std::env::var_os("PCT_ALLOW_SKIP").is_some(),
            "qemu-system-x86_64 is not available: run tools/lab/ensure-host.sh (set PCT_ALLOW_SKIP=1 to skip)"
        );
        eprintln!("qemu-system-x86_64 not available: skipping");
    }
    ok
}

/// Files removed on drop.
pub struct TempFiles(pub Vec<PathBuf>);

impl TempFiles {
    pub fn new() -> TempFiles {
        TempFiles(Vec::new())
    }

    /// A fresh path under `dir`, removed on drop.
    pub fn path(&mut self, dir: &str, tag: &str) -> PathBuf {
        let p = Path::new(dir).join(unique(tag));
        self.0.push(p.clone());
        p
    }
}

impl Drop for TempFiles {
    fn drop(&mut self) {
        for p in &self.0 {
            let _ = std::fs::remove_file(p);
        }
    }
}

/// A running QEMU, killed and cleaned up on drop.
pub struct Vm {
    child: Child,
    pub qmp: Qmp,
    pub ram: PathBuf,
    _files: TempFiles,
}

impl Vm {
    /// Starts a paused `pc-i440fx-7.2` TCG guest (SeaBIOS only) whose RAM is the file `ram`
    /// (created sparse if absent, or used with its contents). `incoming`: `-incoming defer`.
    pub fn start(ram: &Path, incoming: bool) -> Vm {
        Vm::start_with(ram, incoming, &[])
    }

    /// [`Vm::start`] with extra QEMU arguments.
    pub fn start_with(ram: &Path, incoming: bool, extra: &[&str]) -> Vm {
        let mut files = TempFiles::new();
        let qmp_path = files.path("/tmp", "qmp.sock");
        files.0.push(ram.to_owned());
        let mut cmd = Command::new("qemu-system-x86_64");
        cmd.args([
            "-accel",
            "tcg",
            "-machine",
            "pc-i440fx-7.2,memory-backend=ram0",
        ])
        .args([
            "-m",
            &format!("{RAM_MB}M"),
            "-nodefaults",
            "-display",
            "none",
            "-S",
        ])
        .arg("-object")
        .arg(format!(
            "memory-backend-file,id=ram0,size={RAM_MB}M,mem-path={},share=on",
            ram.display()
        ))
        .arg("-qmp")
        .arg(format!("unix:{},server=on,wait=off", qmp_path.display()))
        .stdin(Stdio::null())
        .stdout(Stdio::null());
        if incoming {
            cmd.args(["-incoming", "defer"]);
        }
        cmd.args(extra);
        let child = cmd.spawn().expect("spawn qemu-system-x86_64");
        // From here on, `guard` kills QEMU if connecting fails.
        let mut guard = KillOnDrop(Some(child));
        let qmp = Qmp::connect(&qmp_path, Duration::from_secs(20)).expect("QMP connect");
        let child = guard.0.take().expect("child");
        Vm {
            child,
            qmp,
            ram: ram.to_owned(),
            _files: files,
        }
    }

    pub fn exec(&mut self, cmd: &str, args: Value) -> Value {
        let args = if args.is_null() { None } else { Some(args) };
        self.qmp
            .execute(cmd, args)
            .unwrap_or_else(|e| panic!("QMP {cmd}: {e}"))
    }

    /// Polls `query-migrate` until `completed`; panics on `failed` or timeout.
    pub fn wait_migration(&mut self, timeout: Duration) -> Value {
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
    pub fn migrate(&mut self, uri: &str) {
        self.exec(
            "migrate-set-parameters",
            json!({ "max-bandwidth": 1u64 << 30 }),
        );
        self.exec("migrate", json!({ "uri": uri }));
    }
}

impl Drop for Vm {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

struct KillOnDrop(Option<Child>);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        if let Some(c) = &mut self.0 {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// Deterministic bytes (xorshift64*), for incompressible page contents.
pub fn pseudo_random(seed: u64, out: &mut [u8]) {
    let mut x = seed | 1;
    for chunk in out.chunks_mut(8) {
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        let v = x.wrapping_mul(0x2545_f491_4f6c_dd1d).to_le_bytes();
        chunk.copy_from_slice(&v[..chunk.len()]);
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
    use std::io::{Seek, SeekFrom};
    f.seek(SeekFrom::Start(RANDOM_AT)).expect("seek");
    f.write_all(&random).expect("write RAM file");
    f.seek(SeekFrom::Start(FILL_AT)).expect("seek");
    f.write_all(&vec![0xab; FILL_LEN]).expect("write RAM file");
}

/// Starts a source VM on a patterned RAM file, lets SeaBIOS run for `run`, and returns it
/// (running; `migrate` stops it at the end).
pub fn patterned_source(files: &mut TempFiles, run: Duration) -> Vm {
    let ram = files.path("/dev/shm", "src-ram");
    make_source_ram(&ram);
    let mut vm = Vm::start(&ram, false);
    vm.exec("cont", Value::Null);
    std::thread::sleep(run);
    vm
}
