//! Lab helpers for the integration tests: boot real Debian guests under QEMU.
//!
//! A [`Guest`] owns its QEMU process and its RAM file in /dev/shm: dropping it
//! (also while a failing test unwinds) kills QEMU and removes both, and QEMU is
//! started with a parent-death signal so it dies with the test process too.
//! The QEMU command line itself lives in `tools/lab/run-guest.sh`.

#![allow(dead_code)]

use pct::qmp::Qmp;
use serde_json::json;
use std::io::Write;
use std::os::unix::net::UnixStream;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// The fetched default (cloud-amd64) kernel's directory (fetching it if needed).
pub fn kernel_dir() -> PathBuf {
    crate::common::profile::kernel_dir("cloud-amd64")
        .expect("tools/lab/fetch-kernel.sh cloud-amd64 gives the kernel directory")
}

/// What to boot.
#[derive(Clone, Debug)]
pub struct GuestSpec {
    pub workload: &'static str,
    pub fileset: Option<&'static str>,
    pub layout: &'static str,
    pub flavour: &'static str,
    pub mem_mib: u32,
    /// Use this disk image instead of a fresh copy of the lab master.
    pub disk: Option<PathBuf>,
    /// Wait for an incoming migration (`-incoming defer`).
    pub incoming: bool,
    /// Start with the CPUs stopped (`-S`).
    pub paused: bool,
    /// QEMU `-cpu` model (e.g. `max,la57=on` for 5-level paging).
    pub cpu: Option<&'static str>,
    /// Anonymous guest RAM (no shared file: pct must copy it through /proc/PID/mem).
    pub anon_ram: bool,
}

impl GuestSpec {
    pub fn new(workload: &'static str) -> GuestSpec {
        GuestSpec {
            workload,
            fileset: None,
            layout: "plain",
            flavour: "cloud-amd64",
            mem_mib: 1024,
            disk: None,
            incoming: false,
            paused: false,
            cpu: None,
            anon_ram: false,
        }
    }
    pub fn layout(mut self, fileset: &'static str, layout: &'static str) -> GuestSpec {
        self.fileset = Some(fileset);
        self.layout = layout;
        self
    }

    /// A migration target for this guest, on `disk`, kept paused after the migration.
    pub fn destination(&self, disk: &Path) -> GuestSpec {
        GuestSpec {
            disk: Some(disk.to_owned()),
            incoming: true,
            paused: true,
            ..self.clone()
        }
    }
}

/// Starts `tools/lab/run-guest.sh` for `spec` in `dir`, guest RAM in /dev/shm/`name`, with
/// QEMU's output in `dir` and a parent-death signal. The caller owns the process.
pub fn spawn_run_guest(spec: &GuestSpec, dir: &Path, name: &str) -> Child {
    let mut cmd = Command::new("bash");
    cmd.arg(repo().join("tools/lab/run-guest.sh"))
        .arg("--dir")
        .arg(dir)
        .args(["--workload", spec.workload, "--layout", spec.layout])
        .args([
            "--flavour",
            spec.flavour,
            "--accel",
            &accel(),
            "--name",
            name,
        ])
        .args(["--mem", &spec.mem_mib.to_string()]);
    if let Some(fs) = spec.fileset {
        cmd.args(["--fileset", fs]);
    }
    if let Some(d) = &spec.disk {
        cmd.arg("--disk").arg(d);
    }
    if spec.incoming {
        cmd.arg("--incoming");
    }
    if spec.paused {
        cmd.arg("--paused");
    }
    if spec.anon_ram {
        cmd.arg("--anon-ram");
    }
    if let Some(cpu) = spec.cpu {
        cmd.args(["--cpu", cpu]);
    }
    cmd.stdin(Stdio::null())
        .stdout(std::fs::File::create(dir.join("qemu.out")).expect("qemu.out"))
        .stderr(std::fs::File::create(dir.join("qemu.err")).expect("qemu.err"));
    die_with_parent(&mut cmd);
    cmd.spawn().expect("spawn tools/lab/run-guest.sh")
}

/// Gives the process `cmd` starts a parent-death signal (SIGKILL): it cannot outlive the
/// test process, even one killed without unwinding.
pub fn die_with_parent(cmd: &mut Command) {
    // SAFETY: prctl(PR_SET_PDEATHSIG) is async-signal-safe and touches no Rust state.
    unsafe {
        cmd.pre_exec(|| {
            libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
            Ok(())
        });
    }
}

/// Waits until the serial log in run directory `dir` holds a line starting with `marker`
/// after byte `skip`; panics with the log's tail if the guest reports an error, its QEMU
/// (`child`) exits, or `timeout` passes.
pub fn wait_serial(
    dir: &Path,
    child: &mut Child,
    skip: usize,
    marker: &str,
    timeout: Duration,
) -> String {
    let start = Instant::now();
    loop {
        let log = std::fs::read_to_string(dir.join("serial.log")).unwrap_or_default();
        if let Some(tail) = log.get(skip..) {
            if let Some(line) = tail.lines().find(|l| l.starts_with(marker)) {
                return line.to_owned();
            }
            if let Some(err) = tail.lines().find(|l| l.starts_with("PCT-ERROR")) {
                panic!("guest reported: {err}\n{}", log_tail(dir));
            }
        }
        if let Ok(Some(st)) = child.try_wait() {
            panic!("QEMU exited with {st}\n{}", log_tail(dir));
        }
        assert!(
            start.elapsed() < timeout,
            "no '{marker}' within {timeout:?}\n{}",
            log_tail(dir)
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// A running lab guest.
pub struct Guest {
    pub spec: GuestSpec,
    pub dir: tempfile::TempDir,
    pub ram_path: PathBuf,
    child: Child,
    pub qmp: Qmp,
    booted: Instant,
}

fn accel() -> String {
    std::env::var("PCT_ACCEL").unwrap_or_else(|_| "tcg".into())
}

impl Guest {
    pub fn start(spec: GuestSpec) -> Guest {
        let dir = tempfile::Builder::new()
            .prefix("pct-lab-")
            .tempdir()
            .expect("temporary directory for the guest");
        let name = format!(
            "pct-lab-{}-{}",
            std::process::id(),
            dir.path().file_name().unwrap().to_string_lossy()
        );
        let ram_path = PathBuf::from(format!("/dev/shm/{name}"));
        let child = spawn_run_guest(&spec, dir.path(), &name);
        let started = Instant::now();
        // The first start may build the kernel, initramfs and disk (minutes).
        let qmp_path = dir.path().join("qmp.sock");
        let mut guard = Partial {
            child: Some(child),
            ram: ram_path.clone(),
        };
        let qmp = loop {
            if qmp_path.exists() {
                match Qmp::connect(&qmp_path, Duration::from_secs(5)) {
                    Ok(q) => break q,
                    Err(e) if started.elapsed() > Duration::from_secs(900) => {
                        panic!("QMP: {e}\n{}", log_tail(dir.path()))
                    }
                    Err(_) => {}
                }
            }
            if let Some(st) = guard.child.as_mut().unwrap().try_wait().unwrap() {
                panic!(
                    "QEMU/run-guest.sh exited with {st}\n{}",
                    log_tail(dir.path())
                );
            }
            assert!(
                started.elapsed() < Duration::from_secs(900),
                "no QMP socket after 900 s\n{}",
                log_tail(dir.path())
            );
            std::thread::sleep(Duration::from_millis(100));
        };
        let child = guard.child.take().unwrap();
        Guest {
            spec,
            dir,
            ram_path,
            child,
            qmp,
            booted: Instant::now(),
        }
    }

    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    pub fn serial_log(&self) -> String {
        std::fs::read_to_string(self.path("serial.log")).unwrap_or_default()
    }

    /// Waits until the serial log holds a line starting with `marker` (after `skip` bytes).
    pub fn wait_serial_from(&mut self, skip: usize, marker: &str, timeout: Duration) -> String {
        wait_serial(self.dir.path(), &mut self.child, skip, marker, timeout)
    }

    /// Waits for the ready marker; returns the time since QEMU started.
    pub fn wait_ready(&mut self) -> Duration {
        self.wait_serial_from(0, "PCT-READY", Duration::from_secs(300));
        self.booted.elapsed()
    }

    /// Sends a command line to the guest init and waits for its answer marker.
    pub fn command(&mut self, cmd: &str, answer: &str, timeout: Duration) -> String {
        let skip = self.serial_log().len();
        let mut s = UnixStream::connect(self.path("serial.sock")).expect("serial socket");
        s.write_all(format!("{cmd}\n").as_bytes()).unwrap();
        let line = self.wait_serial_from(skip, answer, timeout);
        drop(s);
        line
    }

    pub fn stop(&mut self) {
        self.qmp.execute("stop", None).expect("QMP stop");
    }

    pub fn cont(&mut self) {
        self.qmp.execute("cont", None).expect("QMP cont");
    }

    /// Writes an ELF core with QEMU's `dump-guest-memory` (synchronous).
    pub fn dump_elf(&mut self, path: &Path, paging: bool) {
        self.qmp
            .execute(
                "dump-guest-memory",
                Some(json!({ "paging": paging, "protocol": format!("file:{}", path.display()) })),
            )
            .expect("dump-guest-memory");
    }

    /// Copies the raw guest RAM file (the memory-backend-file) to `path`.
    pub fn copy_ram(&self, path: &Path) {
        std::fs::copy(&self.ram_path, path).expect("copy guest RAM file");
    }

    /// Reads what the guest's pct-oracle last wrote.
    pub fn oracle(&self) -> crate::common::oracle::Oracle {
        let raw = std::fs::read(self.path("oracle.img")).expect("oracle.img");
        crate::common::oracle::Oracle::parse(&raw).expect("parse oracle output")
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }
}

/// Kills QEMU and removes its RAM file if `Guest::start` fails half-way.
struct Partial {
    child: Option<Child>,
    ram: PathBuf,
}

impl Drop for Partial {
    fn drop(&mut self) {
        if let Some(c) = self.child.as_mut() {
            let _ = c.kill();
            let _ = c.wait();
            let _ = std::fs::remove_file(&self.ram);
        }
    }
}

impl Drop for Guest {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_file(&self.ram_path);
        if std::env::var_os("PCT_KEEP_LAB").is_some() {
            eprintln!("lab: keeping {}", self.dir.path().display());
            self.dir.disable_cleanup(true);
        }
    }
}

/// The last lines of QEMU's output and the guest's serial log in run directory `dir`.
pub fn log_tail(dir: &Path) -> String {
    let mut s = String::new();
    for f in ["qemu.err", "qemu.out", "serial.log"] {
        let text = std::fs::read_to_string(dir.join(f)).unwrap_or_default();
        let lines: Vec<&str> = text.lines().filter(|l| !l.contains("HEARTBEAT")).collect();
        let from = lines.len().saturating_sub(25);
        s += &format!("--- {f} ---\n{}\n", lines[from..].join("\n"));
    }
    s
}
