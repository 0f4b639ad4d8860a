//! Support for the migration tests: `pct-migrate` processes, and migrations between two
//! lab guests ([`Guest`]s that hold no QMP connection of their own, so `pct-migrate` can
//! own the QMP socket while it migrates). Everything is killed and removed on drop, also
//! when a test fails: QEMU and pct processes (with a parent-death signal as a second
//! line), RAM files in /dev/shm, run directories.

use super::lab::{die_with_parent, Guest, GuestSpec};
use super::profile::lab_profile;
use super::repo;
use pct::profile::Profile;
use serde_json::Value;
use std::io::{Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

pub const PAGE: usize = 4096;

/// A `pct-migrate` process, killed on drop if still running.
pub struct Pct {
    child: Option<Child>,
    pub what: &'static str,
}

impl Pct {
    pub fn spawn(what: &'static str, args: &[&str]) -> Pct {
        Self::spawn_env(what, args, &[])
    }

    /// [`spawn`](Self::spawn) with extra environment variables.
    pub fn spawn_env(what: &'static str, args: &[&str], env: &[(&str, &Path)]) -> Pct {
        Self::spawn_cmd(
            what,
            Command::new(env!("CARGO_BIN_EXE_pct-migrate")),
            args,
            env,
        )
    }

    /// [`spawn`](Self::spawn) inside the network namespace `netns` (`ip netns exec`).
    pub fn spawn_in(netns: &str, what: &'static str, args: &[&str]) -> Pct {
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", netns, env!("CARGO_BIN_EXE_pct-migrate")]);
        Self::spawn_cmd(what, cmd, args, &[])
    }

    fn spawn_cmd(
        what: &'static str,
        mut cmd: Command,
        args: &[&str],
        env: &[(&str, &Path)],
    ) -> Pct {
        cmd.args(args)
            .envs(env.iter().map(|(k, v)| (k, v.as_os_str())))
            .current_dir(repo())
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        die_with_parent(&mut cmd);
        Pct {
            child: Some(cmd.spawn().expect("spawn pct-migrate")),
            what,
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().map_or(0, |c| c.id())
    }

    /// Waits for the exit (killing it after `timeout`) and returns its output.
    pub fn wait(mut self, timeout: Duration) -> Output {
        let mut child = self.child.take().expect("child");
        let start = Instant::now();
        // Drain the pipes in threads so a chatty child never blocks.
        let mut out = child.stdout.take().expect("stdout");
        let mut err = child.stderr.take().expect("stderr");
        let o = std::thread::spawn(move || {
            let mut v = Vec::new();
            let _ = out.read_to_end(&mut v);
            v
        });
        let e = std::thread::spawn(move || {
            let mut v = Vec::new();
            let _ = err.read_to_end(&mut v);
            v
        });
        let status = loop {
            if let Ok(Some(st)) = child.try_wait() {
                break st;
            }
            if start.elapsed() > timeout {
                let _ = child.kill();
                let st = child.wait().expect("wait");
                eprintln!("{} killed after {timeout:?}", self.what);
                break st;
            }
            std::thread::sleep(Duration::from_millis(50));
        };
        Output {
            status,
            stdout: o.join().unwrap_or_default(),
            stderr: e.join().unwrap_or_default(),
        }
    }
}

impl Drop for Pct {
    fn drop(&mut self) {
        if let Some(c) = self.child.as_mut() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// Waits until something listens on `port` (any IPv4 address) of network namespace
/// `netns` (`None`: this one), from /proc/net/tcp: pct's proxy, before QEMU is told to
/// connect there (a test connection would be taken for QEMU's).
pub fn wait_listening(netns: Option<&str>, port: u16, timeout: Duration) {
    let want = format!(":{port:04X}");
    let start = Instant::now();
    while start.elapsed() < timeout {
        let tcp = match netns {
            None => std::fs::read_to_string("/proc/net/tcp").unwrap_or_default(),
            Some(ns) => Command::new("ip")
                .args(["netns", "exec", ns, "cat", "/proc/net/tcp"])
                .output()
                .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
                .unwrap_or_default(),
        };
        if tcp.lines().any(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            f.len() > 3 && f[1].ends_with(&want) && f[3] == "0A"
        }) {
            return;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    panic!("nothing listens on port {port} after {timeout:?}");
}

/// A TCP relay between the sender and the receiver, on localhost: it counts the bytes it
/// forwards from the sender and cuts the connection in both directions after `cut_after`
/// of them, or when told to ([`Relay::cut_now`]).
#[derive(Clone, Default)]
pub struct Relay {
    /// Bytes forwarded sender → receiver so far.
    pub forwarded: Arc<AtomicU64>,
    /// Set once the relay has cut the connection.
    pub was_cut: Arc<AtomicBool>,
    sockets: Arc<Mutex<Vec<TcpStream>>>,
    cut_after: Option<u64>,
}

impl Relay {
    pub fn new(cut_after: Option<u64>) -> Relay {
        Relay {
            cut_after,
            ..Relay::default()
        }
    }

    /// Cuts the connection now (both directions); what was in flight is lost.
    pub fn cut_now(&self) {
        for s in self
            .sockets
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
        {
            let _ = s.shutdown(Shutdown::Both);
        }
        self.was_cut.store(true, Ordering::SeqCst);
    }

    /// For [`How::via`]: given the receiver's port, starts relaying to it (one connection)
    /// and returns the port the sender is to use.
    pub fn via(&self) -> impl Fn(u16) -> u16 + '_ {
        move |to: u16| {
            let l = TcpListener::bind("127.0.0.1:0").expect("relay bind");
            let port = l.local_addr().expect("addr").port();
            let relay = self.clone();
            std::thread::spawn(move || relay.serve(l, to));
            port
        }
    }

    fn serve(self, l: TcpListener, to: u16) {
        let Ok((a, _)) = l.accept() else { return };
        // The receiver may not listen yet.
        let mut tries = 0;
        let b = loop {
            match TcpStream::connect(("127.0.0.1", to)) {
                Ok(b) => break b,
                Err(_) if tries < 200 => tries += 1,
                Err(_) => return,
            }
            std::thread::sleep(Duration::from_millis(50));
        };
        let (Ok(a2), Ok(b2)) = (a.try_clone(), b.try_clone()) else {
            return;
        };
        if let (Ok(x), Ok(y)) = (a.try_clone(), b.try_clone()) {
            self.sockets
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .extend([x, y]);
        }
        // Receiver → sender: a plain copy.
        std::thread::spawn(move || {
            let (mut from, mut to) = (b2, a2);
            let mut buf = vec![0u8; 64 << 10];
            while let Ok(n) = from.read(&mut buf) {
                if n == 0 || to.write_all(&buf[..n]).is_err() {
                    break;
                }
            }
        });
        let (mut from, mut to) = (a, b);
        let mut buf = vec![0u8; 64 << 10];
        while let Ok(n) = from.read(&mut buf) {
            if n == 0 || to.write_all(&buf[..n]).is_err() {
                break;
            }
            let seen = self.forwarded.fetch_add(n as u64, Ordering::SeqCst) + n as u64;
            if self.cut_after.is_some_and(|c| seen >= c) {
                self.cut_now();
                return;
            }
        }
        let _ = from.shutdown(Shutdown::Both);
        let _ = to.shutdown(Shutdown::Both);
    }
}

/// Certificates for the link: `pct-migrate keygen --out DIR HOST…`; returns each host's
/// `--tls-dir`, in the order given.
pub fn keygen(dir: &Path, hosts: &[&str]) -> Vec<String> {
    let out = Command::new(env!("CARGO_BIN_EXE_pct-migrate"))
        .args(["keygen", "--out"])
        .arg(dir)
        .args(hosts)
        .output()
        .expect("pct-migrate keygen");
    assert!(out.status.success(), "keygen: {}", text(&out.stderr));
    hosts
        .iter()
        .map(|h| dir.join(h).to_str().expect("path").to_owned())
        .collect()
}

/// A free TCP port on localhost.
pub fn free_port() -> u16 {
    let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    l.local_addr().expect("addr").port()
}

pub fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

/// Compares two RAM files page by page; returns the differing page numbers and their
/// count.
pub fn diff_pages(a: &Path, b: &Path) -> (Vec<u64>, u64) {
    let mut fa = std::fs::File::open(a).expect("RAM a");
    let mut fb = std::fs::File::open(b).expect("RAM b");
    let (la, lb) = (
        fa.metadata().expect("len").len(),
        fb.metadata().expect("len").len(),
    );
    assert_eq!(la, lb, "RAM files differ in size");
    let chunk = 4 << 20;
    let (mut ba, mut bb) = (vec![0u8; chunk], vec![0u8; chunk]);
    let (mut first, mut count, mut page) = (Vec::new(), 0u64, 0u64);
    let mut left = la as usize;
    while left > 0 {
        let n = left.min(chunk);
        fa.read_exact(&mut ba[..n]).expect("read a");
        fb.read_exact(&mut bb[..n]).expect("read b");
        for (pa, pb) in ba[..n].chunks(PAGE).zip(bb[..n].chunks(PAGE)) {
            if pa != pb {
                count += 1;
                first.push(page);
            }
            page += 1;
        }
        left -= n;
    }
    (first, count)
}

/// Of the pages `pages` where the destination RAM `dst` differs from the stopped source
/// `src`, those that free-page elision explains: zero at the destination and free in the
/// source's buddy allocator (`is_free_buddy_page` on the source's `struct page` array, the
/// walk tests/scan_lab.rs checks against drgn's free lists). Returns (explained, the rest).
/// `profile` is the source kernel's.
pub fn free_page_diffs(
    src: &Path,
    dst: &Path,
    pages: &[u64],
    profile: &Profile,
) -> (u64, Vec<u64>) {
    use pct::kernel::Kernel;
    use pct::memory::GuestMemory;
    use pct::walk::buddy::Buddy;
    if pages.is_empty() {
        return (0, Vec::new());
    }
    let s = GuestMemory::open(src).expect("map the source RAM");
    let d = GuestMemory::open(dst).expect("map the destination RAM");
    let k = Kernel::locate(&s, profile).expect("locate the source kernel");
    let buddy = Buddy::new(&k).expect("buddy allocator marks");
    let (mut free, mut rest) = (0, Vec::new());
    for &p in pages {
        let zero = d
            .slice(p * PAGE as u64, PAGE as u64)
            .is_ok_and(|b| b.iter().all(|&x| x == 0));
        if zero && buddy.is_free_buddy_page(p).unwrap_or(false) {
            free += 1;
        } else {
            rest.push(p);
        }
    }
    (free, rest)
}

/// The destination's RAM equals the stopped source's, except for pages that free-page
/// elision sent as zero pages and that are still free in the source (the kernel never reads
/// a free page's bytes; `profile` is the source kernel's, to read its `struct page` array).
/// Returns how many such pages differ.
pub fn assert_identical_with(src: &Guest, dst: &Guest, profile: &Profile) -> u64 {
    let (src_ram, dst_ram) = (src.ram_file(), dst.ram_file());
    let (differ, _) = diff_pages(&src_ram, &dst_ram);
    let (free, first) = free_page_diffs(&src_ram, &dst_ram, &differ, profile);
    let count = first.len();
    if count > 0 {
        // With PCT_TEST_RECORD_DIR set, keep both RAM files next to the stream records
        // (`pct-migrate inspect-stream REC --against RAM`).
        if let Some(dir) = std::env::var_os("PCT_TEST_RECORD_DIR") {
            for (vm, side) in [(src, "src"), (dst, "dst")] {
                let name = vm
                    .ram_path
                    .file_name()
                    .map(|n| n.to_string_lossy().into_owned());
                let to = std::path::Path::new(&dir)
                    .join(format!("{}.{side}.ram", name.unwrap_or_default()));
                let _ = std::fs::copy(vm.ram_file(), to);
            }
        }
    }
    assert_eq!(
        count,
        0,
        "{count} pages of destination RAM differ from the source (besides {free} free \
         pages, zero at the destination), first {:?}; differing bytes (page: offset src \
         dst): {}",
        &first[..count.min(20)],
        describe_diffs(&src_ram, &dst_ram, &first)
    );
    free
}

/// For a few differing pages, where and how they differ (a page-table A/D bit, a word…).
fn describe_diffs(a: &std::path::Path, b: &std::path::Path, pages: &[u64]) -> String {
    use std::os::unix::fs::FileExt;
    let (Ok(fa), Ok(fb)) = (std::fs::File::open(a), std::fs::File::open(b)) else {
        return "unreadable".into();
    };
    let mut out = Vec::new();
    for &p in pages.iter().take(4) {
        let (mut x, mut y) = (vec![0u8; 4096], vec![0u8; 4096]);
        if fa.read_exact_at(&mut x, p * 4096).is_err()
            || fb.read_exact_at(&mut y, p * 4096).is_err()
        {
            continue;
        }
        let d: Vec<String> = (0..4096)
            .filter(|&i| x[i] != y[i])
            .take(6)
            .map(|i| format!("{i:#x}:{:02x}/{:02x}", x[i], y[i]))
            .collect();
        let n = (0..4096).filter(|&i| x[i] != y[i]).count();
        // The same short hash `pct-migrate inspect-stream` prints for PAGE records.
        let h = |b: &[u8]| {
            let h = blake3::hash(b);
            h.as_bytes()[..8]
                .iter()
                .map(|x| format!("{x:02x}"))
                .collect::<String>()
        };
        out.push(format!(
            "pfn {p}: {n} bytes [{}] src {} dst {}",
            d.join(" "),
            h(&x),
            h(&y)
        ));
    }
    out.join("; ")
}

/// One migration between two lab guests, through two `pct-migrate` processes.
pub struct Run {
    pub sender_pid: u32,
    pub receiver_pid: u32,
    pub sender: Output,
    pub receiver: Output,
    pub summary: Option<Value>,
}

/// Migrates `src` into `dst` (which must be `-incoming defer`); `extra` are sender flags;
/// `via` optionally puts a relay between sender and receiver (returns the port to use).
pub fn migrate(
    src: &Guest,
    dst: &Guest,
    disk: &Path,
    extra: &[&str],
    via: Option<&dyn Fn(u16) -> u16>,
) -> Run {
    // PCT_TEST_RECORD_DIR=DIR keeps both sides' copies of the stream there (for
    // `pct-migrate inspect-stream` after a failure).
    let dir = std::env::var_os("PCT_TEST_RECORD_DIR").map(PathBuf::from);
    let how = How {
        extra,
        via,
        record: dir.as_deref(),
        tls: None,
        receiver_extra: &[],
        profile: ProfileChoice::Lab,
    };
    migrate_with(src, dst, disk, &how)
}

/// How [`migrate_with`] migrates.
pub struct How<'a> {
    /// Extra sender flags.
    pub extra: &'a [&'a str],
    /// A relay between sender and receiver: given the receiver's port, returns the one the
    /// sender is to use.
    pub via: Option<&'a dyn Fn(u16) -> u16>,
    /// Both pct processes record the stream into this directory (see [`stream_records`]).
    pub record: Option<&'a Path>,
    /// The sender's profile.
    pub profile: ProfileChoice,
    /// `--tls-dir` of the receiver and of the sender; `None`: `--insecure-plaintext`.
    pub tls: Option<(String, String)>,
    /// Extra receiver flags.
    pub receiver_extra: &'a [&'a str],
}

/// The stream records [`migrate_with`] asks for in `dir`: the sender's (what the source
/// QEMU sent) and the receiver's (what the destination QEMU got).
pub fn stream_records(src: &Guest, dir: &Path) -> (PathBuf, PathBuf) {
    let tag = src
        .ram_path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned());
    let tag = tag.unwrap_or_default();
    let p = |side: &str| dir.join(format!("{tag}.{side}.stream"));
    (p("src"), p("dst"))
}

/// Which profile the sender uses.
pub enum ProfileChoice {
    /// `--profile` with the lab kernel's profile (built from its vmlinux).
    Lab,
    /// `--profile` with this profile.
    Given(PathBuf),
    /// No `--profile`, no shipped profile (`PCT_PROFILES` an empty directory) and an empty
    /// cache in `dir` (`PCT_PROFILE_CACHE`): the sender builds one from the guest's memory.
    FromMemory { dir: PathBuf },
}

/// Where the two pct processes of a migration run and meet: the receiver listens on
/// `listen`, the sender sends to `to` (the receiver, or a relay in front of it), each
/// optionally inside a network namespace.
pub struct Net {
    pub listen: String,
    pub to: String,
    pub sender_netns: Option<String>,
    pub receiver_netns: Option<String>,
}

impl Net {
    /// Both on localhost; `via` optionally puts a relay in front of the receiver.
    pub fn local(via: Option<&dyn Fn(u16) -> u16>) -> Net {
        let port = free_port();
        let to_port = via.map_or(port, |f| f(port));
        Net {
            listen: format!("127.0.0.1:{port}"),
            to: format!("127.0.0.1:{to_port}"),
            sender_netns: None,
            receiver_netns: None,
        }
    }
}

/// The two pct processes of a migration of `src` into `dst` (which must be `-incoming
/// defer`), started as `how` and `net` say: (sender, receiver).
pub fn spawn_migration<'a>(
    src: &Guest,
    dst: &Guest,
    disk: &Path,
    how: &'a How<'a>,
    net: &'a Net,
) -> (Pct, Pct) {
    let How {
        extra,
        via: _,
        record,
        profile: choice,
        tls,
        receiver_extra,
    } = how;
    let (recv_link, send_link) = match tls {
        Some((r, s)) => (["--tls-dir", r.as_str()], ["--tls-dir", s.as_str()]),
        None => (["--insecure-plaintext", ""], ["--insecure-plaintext", ""]),
    };
    let link = |a: [&'a str; 2]| a.into_iter().filter(|x| !x.is_empty());
    let dst_qmp = dst.qmp_path();
    let record = record.map(|d| stream_records(src, d));
    let mut rargs = vec![
        "receive",
        "--listen",
        &net.listen,
        "--qmp",
        dst_qmp.to_str().expect("path"),
        "--disk",
        disk.to_str().expect("path"),
        "--json",
    ];
    rargs.extend(link(recv_link));
    rargs.extend_from_slice(receiver_extra);
    if let Some((_, d)) = &record {
        rargs.extend(["--record-stream", d.to_str().expect("path")]);
    }
    let receiver = match &net.receiver_netns {
        None => Pct::spawn("receiver", &rargs),
        Some(ns) => Pct::spawn_in(ns, "receiver", &rargs),
    };
    let src_qmp = src.qmp_path();
    let lab = lab_profile("cloud-amd64").0;
    let mut args = match choice {
        ProfileChoice::Lab => vec!["--profile", lab.to_str().expect("path")],
        ProfileChoice::Given(p) => vec!["--profile", p.to_str().expect("path")],
        ProfileChoice::FromMemory { .. } => vec![],
    };
    args.extend([
        "--qmp",
        src_qmp.to_str().expect("path"),
        "--to",
        &net.to,
        "--json",
    ]);
    args.extend(link(send_link));
    args.extend_from_slice(extra);
    if let Some((s, _)) = &record {
        args.extend(["--record-stream", s.to_str().expect("path")]);
    }
    let (shipped, cache);
    let env: Vec<(&str, &Path)> = match choice {
        ProfileChoice::Lab | ProfileChoice::Given(_) => vec![],
        ProfileChoice::FromMemory { dir } => {
            (shipped, cache) = (dir.join("shipped"), dir.join("cache"));
            std::fs::create_dir_all(&shipped).expect("empty profiles directory");
            vec![("PCT_PROFILES", &shipped), ("PCT_PROFILE_CACHE", &cache)]
        }
    };
    let sender = match &net.sender_netns {
        None => Pct::spawn_env("sender", &args, &env),
        Some(ns) => {
            assert!(env.is_empty(), "no environment through ip netns exec");
            Pct::spawn_in(ns, "sender", &args)
        }
    };
    (sender, receiver)
}

/// Waits for both pct processes of a migration and prints what they said.
pub fn finish_migration(sender: Pct, receiver: Pct) -> Run {
    let (sender_pid, receiver_pid) = (sender.pid(), receiver.pid());
    let sender = sender.wait(Duration::from_secs(300));
    let receiver = receiver.wait(Duration::from_secs(60));
    let summary = serde_json::from_slice(&sender.stdout).ok();
    eprintln!(
        "sender: {}\n{}\nreceiver: {}\n{}{}",
        sender.status,
        text(&sender.stderr),
        receiver.status,
        text(&receiver.stdout),
        text(&receiver.stderr)
    );
    if let Some(s) = &summary {
        eprintln!("{}", serde_json::to_string_pretty(s).unwrap_or_default());
    }
    Run {
        sender_pid,
        receiver_pid,
        sender,
        receiver,
        summary,
    }
}

/// Migrates `src` into `dst` (which must be `-incoming defer`) as `how` says.
pub fn migrate_with(src: &Guest, dst: &Guest, disk: &Path, how: &How) -> Run {
    let net = Net::local(how.via);
    let (sender, receiver) = spawn_migration(src, dst, disk, how, &net);
    finish_migration(sender, receiver)
}

/// Source and destination guests for `spec`, the source ready; the destination runs on a
/// copy of the source's disk taken after a guest `sync` (the "mirrored" disk), returned
/// with it.
pub fn pair(spec: &GuestSpec) -> (Guest, Guest, PathBuf) {
    pair_to(spec, |d| d)
}

/// [`pair`], the destination's spec changed by `dst` (another QEMU, say).
pub fn pair_to(
    spec: &GuestSpec,
    dst: impl FnOnce(GuestSpec) -> GuestSpec,
) -> (Guest, Guest, PathBuf) {
    let spec = GuestSpec {
        hold_qmp: false,
        ..spec.clone()
    };
    let mut src = Guest::start(spec.clone());
    src.wait_ready();
    // What the guest has written so far reaches its disk before the copy, as it would
    // reach a mirror: a page cleaned by writeback after the copy would be stale there.
    let line = src.command("sync", "PCT-SYNCED", Duration::from_secs(60));
    assert!(line.starts_with("PCT-SYNCED"), "{line}");
    let disk = src.path("dst-disk.img");
    let st = Command::new("cp")
        .args(["--sparse=always"])
        .arg(src.path("disk.img"))
        .arg(&disk)
        .status()
        .expect("cp");
    assert!(st.success(), "copying the disk");
    let dst = Guest::start(dst(spec.destination(&disk)));
    (src, dst, disk)
}

/// A tbf-shaped link between two network namespaces (tools/netns.sh): NAME-a at 10.77.0.1
/// and NAME-b at 10.77.0.2; removed on drop.
pub struct NetnsLink {
    name: String,
}

impl NetnsLink {
    pub fn up(name: &str, rate: &str) -> NetnsLink {
        let link = NetnsLink {
            name: name.to_owned(),
        };
        link.netns(&["up", name, rate]);
        link
    }

    pub fn netns(&self, args: &[&str]) -> String {
        let out = Command::new("bash")
            .arg(repo().join("tools/netns.sh"))
            .args(args)
            .output()
            .expect("tools/netns.sh");
        assert!(
            out.status.success(),
            "tools/netns.sh {args:?}: {}",
            text(&out.stderr)
        );
        text(&out.stdout)
    }

    pub fn rate(&self, rate: &str) {
        self.netns(&["rate", &self.name, rate]);
    }

    /// Bytes sent so far by end `side` (a or b).
    pub fn sent(&self, side: &str) -> u64 {
        self.netns(&["bytes", &self.name, side])
            .trim()
            .parse()
            .unwrap_or(0)
    }
}

impl Drop for NetnsLink {
    fn drop(&mut self) {
        let _ = Command::new("bash")
            .arg(repo().join("tools/netns.sh"))
            .args(["down", &self.name])
            .status();
    }
}

/// The socket directories (`SockDir`) that the pct processes `sender_pid` and
/// `receiver_pid` left in the temporary directory.
pub fn sock_dirs_left(sender_pid: u32, receiver_pid: u32) -> Vec<String> {
    let prefixes = [
        format!("pct-migrate-src-{sender_pid}-"),
        format!("pct-migrate-dst-{receiver_pid}-"),
    ];
    std::fs::read_dir(std::env::temp_dir())
        .map(|d| {
            d.filter_map(|e| e.ok())
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .filter(|n| prefixes.iter().any(|p| n.starts_with(p)))
                .collect()
        })
        .unwrap_or_default()
}

/// Each line of `out` as JSON.
pub fn json_lines(out: &[u8]) -> Vec<Value> {
    text(out)
        .lines()
        .map(|l| serde_json::from_str(l).expect("a JSON line"))
        .collect()
}

/// An evacuation that ended and the receiver service it went through: waits for the
/// service, prints both, asserts both succeeded, and returns the evacuation's JSON events,
/// the service's JSON reports and its log.
pub fn finish_evacuation(evacuation: Output, service: Pct) -> (Vec<Value>, Vec<Value>, String) {
    let served = service.wait(Duration::from_secs(120));
    let log = text(&served.stderr);
    eprintln!(
        "evacuate: {}\n{}\nservice: {}\n{log}",
        evacuation.status,
        text(&evacuation.stderr),
        served.status
    );
    assert!(evacuation.status.success() && served.status.success());
    (
        json_lines(&evacuation.stdout),
        json_lines(&served.stdout),
        log,
    )
}
