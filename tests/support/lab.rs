//! The lab's guest launcher: real Debian guests (or, with [`GuestSpec::bare`], SeaBIOS
//! alone) under QEMU, started by `tools/lab/run-guest.sh`, which holds the QEMU command
//! line.
//!
//! A [`Guest`] owns its QEMU process and its RAM file in /dev/shm: dropping it (also while
//! a failing test unwinds) kills QEMU and removes both, and QEMU is started with a
//! parent-death signal so it dies with the test process too.

use super::oracle::Oracle;
use super::repo;
use pct::qemu::Qmp;
use serde_json::{json, Value};
use std::io::Write;
use std::os::unix::net::UnixStream;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// What to boot.
#[derive(Clone, Debug)]
pub struct GuestSpec {
    pub workload: &'static str,
    pub fileset: Option<&'static str>,
    pub layout: &'static str,
    pub flavour: &'static str,
    pub mem_mib: u32,
    /// vCPUs (`--smp`); under TCG each runs on a host thread of its own (MTTCG).
    pub smp: u32,
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
    /// Firmware (SeaBIOS) only: no kernel, disks, serial port or vmcoreinfo (`--bare`).
    pub bare: bool,
    /// QEMU's accelerator; `None`: `$PCT_ACCEL`, else tcg.
    pub accel: Option<&'static str>,
    /// The guest's `-uuid`.
    pub uuid: Option<&'static str>,
    /// Writes the RAM file before QEMU starts, which then runs on its contents.
    pub ram_init: Option<fn(&Path)>,
    /// Keep one QMP connection (on qmp.sock) for the guest's life. Without it each QMP call
    /// is a short session of its own, and the monitor is free for others between calls.
    pub hold_qmp: bool,
    /// Another QEMU (a prefix from tools/lab/fetch-qemu.sh) instead of the system's.
    pub qemu: Option<PathBuf>,
    /// The machine type [default: run-guest.sh's, pc-i440fx-7.2].
    pub machine: Option<&'static str>,
    /// The kernel's Debian suite [default: run-guest.sh's, bookworm].
    pub suite: Option<&'static str>,
    /// More guest kernel command-line arguments (`--append`).
    pub append: Option<&'static str>,
}

impl GuestSpec {
    pub fn new(workload: &'static str) -> GuestSpec {
        GuestSpec {
            workload,
            fileset: None,
            layout: "plain",
            flavour: "cloud-amd64",
            mem_mib: 1024,
            smp: 1,
            disk: None,
            incoming: false,
            paused: false,
            cpu: None,
            anon_ram: false,
            bare: false,
            accel: None,
            uuid: None,
            ram_init: None,
            hold_qmp: true,
            qemu: None,
            machine: None,
            suite: None,
            append: None,
        }
    }

    /// A firmware-only guest with `mem_mib` of RAM, paused.
    pub fn bare(mem_mib: u32) -> GuestSpec {
        GuestSpec {
            mem_mib,
            bare: true,
            paused: true,
            ..GuestSpec::new("idle")
        }
    }

    /// With `n` vCPUs.
    pub fn smp(mut self, n: u32) -> GuestSpec {
        self.smp = n;
        self
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

/// Starts `tools/lab/run-guest.sh` for `spec` in `dir`, guest RAM in /dev/shm/`name`, with
/// QEMU's output in `dir` and a parent-death signal. The caller owns the process.
fn spawn_run_guest(spec: &GuestSpec, dir: &Path, name: &str) -> Child {
    let accel = spec.accel.map_or_else(
        || std::env::var("PCT_ACCEL").unwrap_or_else(|_| "tcg".into()),
        str::to_owned,
    );
    let mut cmd = Command::new("bash");
    cmd.arg(repo().join("tools/lab/run-guest.sh"))
        .arg("--dir")
        .arg(dir)
        .args(["--workload", spec.workload, "--layout", spec.layout])
        .args(["--flavour", spec.flavour, "--accel", &accel, "--name", name])
        .args(["--mem", &spec.mem_mib.to_string()])
        .args(["--smp", &spec.smp.to_string()]);
    let options = [
        ("--fileset", spec.fileset),
        ("--cpu", spec.cpu),
        ("--uuid", spec.uuid),
        ("--machine", spec.machine),
        ("--suite", spec.suite),
        ("--append", spec.append),
    ];
    for (option, value) in options {
        if let Some(v) = value {
            cmd.args([option, v]);
        }
    }
    if let Some(d) = &spec.disk {
        cmd.arg("--disk").arg(d);
    }
    // Named even when it is the system's, so that PCT_QEMU (the scripts' switch) leaves the
    // suite's guests alone.
    match &spec.qemu {
        Some(q) => cmd.arg("--qemu").arg(q),
        None => cmd.args(["--qemu", "system"]),
    };
    let flags = [
        ("--incoming", spec.incoming),
        ("--paused", spec.paused),
        ("--anon-ram", spec.anon_ram),
        ("--bare", spec.bare),
    ];
    cmd.args(flags.iter().filter(|(_, on)| *on).map(|(f, _)| f));
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

/// A running lab guest.
pub struct Guest {
    pub spec: GuestSpec,
    pub dir: tempfile::TempDir,
    pub ram_path: PathBuf,
    child: Child,
    /// The held QMP connection ([`GuestSpec::hold_qmp`]).
    qmp: Option<Mutex<Qmp>>,
    booted: Instant,
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
        // From here on, `guard` kills QEMU and removes the RAM file if starting fails.
        let mut guard = Partial {
            child: None,
            ram: Some(ram_path.clone()),
        };
        if let Some(init) = spec.ram_init {
            init(&ram_path);
        }
        let child = guard
            .child
            .insert(spawn_run_guest(&spec, dir.path(), &name));
        let started = Instant::now();
        // The first start may build the kernel, initramfs and disk (minutes).
        let qmp_path = dir.path().join("qmp.sock");
        let qmp = loop {
            if qmp_path.exists() {
                if !spec.hold_qmp {
                    break None;
                }
                match Qmp::connect(&qmp_path, Duration::from_secs(5)) {
                    Ok(q) => break Some(Mutex::new(q)),
                    Err(e) if started.elapsed() > Duration::from_secs(900) => {
                        panic!("QMP: {e}\n{}", log_tail(dir.path()))
                    }
                    Err(_) => {}
                }
            }
            if let Some(st) = child.try_wait().unwrap() {
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
            std::thread::sleep(Duration::from_millis(50));
        };
        let child = guard.child.take().unwrap();
        guard.ram = None;
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

    /// The monitor the guest's QMP calls use (with [`GuestSpec::hold_qmp`], only they).
    pub fn qmp_path(&self) -> PathBuf {
        self.path("qmp.sock")
    }

    /// Runs a QMP command (`args` null: none); panics if it fails.
    pub fn exec(&self, cmd: &str, args: Value) -> Value {
        let args = (!args.is_null()).then_some(args);
        let run = |q: &mut Qmp| q.execute(cmd, args);
        let res =
            match &self.qmp {
                Some(held) => run(&mut held.lock().unwrap_or_else(|e| e.into_inner())),
                None => run(&mut Qmp::connect(&self.qmp_path(), Duration::from_secs(10))
                    .expect("QMP connect")),
            };
        res.unwrap_or_else(|e| panic!("QMP {cmd}: {e}"))
    }

    /// QEMU's run state (`running`, `paused`, `postmigrate`…).
    pub fn status(&self) -> String {
        let v = self.exec("query-status", Value::Null);
        v["status"].as_str().unwrap_or("?").to_owned()
    }

    pub fn stop(&self) {
        self.exec("stop", Value::Null);
    }

    pub fn cont(&self) {
        self.exec("cont", Value::Null);
    }

    /// Writes an ELF core with QEMU's `dump-guest-memory` (synchronous).
    pub fn dump_elf(&self, path: &Path, paging: bool) {
        let protocol = format!("file:{}", path.display());
        self.exec(
            "dump-guest-memory",
            json!({ "paging": paging, "protocol": protocol }),
        );
    }

    pub fn serial_log(&self) -> String {
        std::fs::read_to_string(self.path("serial.log")).unwrap_or_default()
    }

    /// Waits until the serial log holds a line starting with `marker` after byte `skip`;
    /// panics with the log's tail if the guest reports an error, QEMU exits, or `timeout`
    /// passes.
    pub fn wait_serial(&mut self, skip: usize, marker: &str, timeout: Duration) -> String {
        let start = Instant::now();
        loop {
            let log = self.serial_log();
            if let Some(tail) = log.get(skip..) {
                // Whole lines only: the UART writes the log a character at a time, so its
                // last line may still be growing.
                let done = tail.rfind('\n').map_or("", |end| &tail[..end]);
                if let Some(line) = done.lines().find(|l| l.starts_with(marker)) {
                    return line.trim_end().to_owned();
                }
                if let Some(err) = done.lines().find(|l| l.starts_with("PCT-ERROR")) {
                    panic!("guest reported: {err}\n{}", self.log_tail());
                }
            }
            if let Ok(Some(st)) = self.child.try_wait() {
                panic!("QEMU exited with {st}\n{}", self.log_tail());
            }
            assert!(
                start.elapsed() < timeout,
                "no '{marker}' within {timeout:?}\n{}",
                self.log_tail()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Waits for the ready marker; returns the time since QEMU started.
    pub fn wait_ready(&mut self) -> Duration {
        self.wait_serial(0, "PCT-READY", Duration::from_secs(300));
        self.booted.elapsed()
    }

    /// Sends a command line to the guest init and waits for its answer marker.
    ///
    /// The socket is closed as soon as the line is written: while a client is connected,
    /// QEMU also sends it everything the guest prints, one byte per socket write, and a
    /// client that never reads fills its socket buffer within a few hundred characters
    /// (each byte is charged a whole buffer's overhead). QEMU's UART then stops
    /// transmitting and the guest blocks on its console. QEMU reads what was written
    /// before it sees the close.
    pub fn command(&mut self, cmd: &str, answer: &str, timeout: Duration) -> String {
        let skip = self.serial_log().len();
        let mut s = UnixStream::connect(self.path("serial.sock")).expect("serial socket");
        s.write_all(format!("{cmd}\n").as_bytes())
            .expect("serial write");
        drop(s);
        let t = Instant::now();
        let line = self.wait_serial(skip, answer, timeout);
        eprintln!(
            "lab: '{cmd}' answered in {:.1} s",
            t.elapsed().as_secs_f64()
        );
        line
    }

    /// Copies the raw guest RAM file (the memory-backend-file) to `path`.
    pub fn copy_ram(&self, path: &Path) {
        std::fs::copy(&self.ram_path, path).expect("copy guest RAM file");
    }

    /// Reads what the guest's pct-oracle last wrote.
    /// A file holding the guest's RAM as guest-physical bytes from 0: its RAM file, or,
    /// for anonymous RAM, what QEMU's own `pmemsave` writes (a stopped guest's, whole).
    pub fn ram_file(&self) -> PathBuf {
        if !self.spec.anon_ram {
            return self.ram_path.clone();
        }
        let path = self.path("ram.pmemsave");
        let size = u64::from(self.spec.mem_mib) << 20;
        self.exec(
            "pmemsave",
            serde_json::json!({"val": 0, "size": size, "filename": path}),
        );
        path
    }

    pub fn oracle(&self) -> Oracle {
        let raw = std::fs::read(self.path("oracle.img")).expect("oracle.img");
        Oracle::parse(&raw).expect("parse oracle output")
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// True while QEMU runs.
    pub fn alive(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    /// Waits for QEMU to exit by itself.
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<ExitStatus> {
        let start = Instant::now();
        while start.elapsed() < timeout {
            if let Ok(Some(st)) = self.child.try_wait() {
                return Some(st);
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        None
    }

    pub fn log_tail(&self) -> String {
        log_tail(self.dir.path())
    }
}

/// Kills QEMU and removes its RAM file if `Guest::start` fails half-way.
struct Partial {
    child: Option<Child>,
    ram: Option<PathBuf>,
}

impl Drop for Partial {
    fn drop(&mut self) {
        if let Some(c) = self.child.as_mut() {
            let _ = c.kill();
            let _ = c.wait();
        }
        if let Some(ram) = &self.ram {
            let _ = std::fs::remove_file(ram);
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
fn log_tail(dir: &Path) -> String {
    let mut s = String::new();
    for f in ["qemu.err", "qemu.out", "serial.log"] {
        let text = std::fs::read_to_string(dir.join(f)).unwrap_or_default();
        let beats = text.lines().filter(|l| l.contains("HEARTBEAT"));
        let (count, last) = beats.fold((0, ""), |(n, _), l| (n + 1, l));
        let lines: Vec<&str> = text.lines().filter(|l| !l.contains("HEARTBEAT")).collect();
        let from = lines.len().saturating_sub(25);
        s += &format!("--- {f} ---\n{}\n", lines[from..].join("\n"));
        if count > 0 {
            s += &format!("({count} heartbeat lines left out, the last '{last}')\n");
        }
    }
    s
}
