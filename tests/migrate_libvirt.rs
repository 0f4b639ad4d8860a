//! A migration that real libvirt drives, through pct: two libvirt daemons on two "hosts"
//! (network and mount namespaces of their own, distinct host UUIDs, a veth link between
//! them; tools/lab/libvirt.sh), a TCG domain of the lab's kernel and disk under the first,
//! and `virsh migrate --live --migrateuri tcp://127.0.0.1:PORT` to the second. On the
//! source host `pct-migrate proxy` listens on that port; on the destination host
//! `pct-migrate receive --qemu-incoming` feeds the QEMU that libvirt started listening on
//! the same port there, over mutual TLS. libvirt owns both QEMUs' monitors; pct has none.
//!
//! Checked: libvirt reports success and the domain runs on at the destination; the
//! destination's RAM equals the source's at pause (both QEMUs keep guest RAM in files,
//! `memory_backing_dir`, kept by a hard link past the source QEMU's exit); pages were
//! teleported; the guest re-verifies its files at the destination.
//!
//! Needs root (namespaces, libvirtd); libvirt itself is installed by
//! tools/lab/ensure-host.sh. Everything (daemons, QEMUs, namespaces, files) is removed on
//! drop, also when the test fails.

mod support;

use serde_json::Value;
use std::io::Write;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, Instant};
use support::blockmap::image;
use support::lab::{die_with_parent, have_qemu};
use support::migrate::*;
use support::profile::lab_profile;
use support::{repo, run_ok};

/// Two libvirt daemons (tools/lab/libvirt.sh), taken down on drop.
struct Libvirt {
    dir: PathBuf,
    netns: String,
}

impl Libvirt {
    fn up(dir: &Path) -> Libvirt {
        let netns = format!("lv{}", std::process::id() % 100_000);
        let lab = Libvirt {
            dir: dir.to_owned(),
            netns: netns.clone(),
        };
        let mut cmd = Command::new("bash");
        cmd.arg(repo().join("tools/lab/libvirt.sh"))
            .arg("up")
            .arg(dir)
            .arg(&netns);
        run_ok(&mut cmd, "tools/lab/libvirt.sh up");
        lab
    }

    /// `virsh` on daemon `side` (a or b).
    fn virsh(&self, side: &str, args: &[&str]) -> Output {
        let mut cmd = Command::new("bash");
        cmd.arg(repo().join("tools/lab/libvirt.sh"))
            .arg("virsh")
            .arg(&self.dir)
            .arg(side)
            .args(args);
        die_with_parent(&mut cmd);
        cmd.output().expect("virsh")
    }

    fn virsh_ok(&self, side: &str, args: &[&str]) -> String {
        let out = self.virsh(side, args);
        assert!(
            out.status.success(),
            "virsh {args:?} on {side}: {}{}",
            text(&out.stdout),
            text(&out.stderr)
        );
        text(&out.stdout)
    }

    /// The domain XML for a guest whose disk, oracle disk and serial console are in `dir`.
    fn xml(&self, uuid: &str, dir: &Path) -> PathBuf {
        let p = |f: &str| dir.join(f).to_string_lossy().into_owned();
        let mut cmd = Command::new("bash");
        cmd.arg(repo().join("tools/lab/libvirt.sh")).args([
            "xml",
            "pct-lv",
            uuid,
            "apache",
            &p("disk.img"),
            &p("oracle.img"),
            &p(""),
        ]);
        let out = run_ok(&mut cmd, "tools/lab/libvirt.sh xml");
        let path = dir.join("domain.xml");
        std::fs::write(&path, &out.stdout).expect("domain XML");
        path
    }

    /// The RAM file of the running domain under daemon `side` (its memory_backing_dir).
    fn ram_file(&self, side: &str) -> PathBuf {
        let root = self.dir.join(side).join("ram/libvirt/qemu");
        let dom = std::fs::read_dir(&root)
            .unwrap_or_else(|e| panic!("{}: {e}", root.display()))
            .flatten()
            .find(|e| e.file_name().to_string_lossy().ends_with("-pct-lv"))
            .expect("the domain's RAM directory");
        dom.path().join("pc.ram")
    }
}

impl Drop for Libvirt {
    fn drop(&mut self) {
        let _ = Command::new("bash")
            .arg(repo().join("tools/lab/libvirt.sh"))
            .arg("down")
            .arg(&self.dir)
            .status();
    }
}

/// Waits for a line starting with `marker` in the serial log of the guest whose console
/// is in `dir`, after byte `skip`; returns it.
fn wait_serial(dir: &Path, skip: usize, marker: &str, timeout: Duration) -> String {
    let start = Instant::now();
    loop {
        let log = std::fs::read_to_string(dir.join("serial.log")).unwrap_or_default();
        if let Some(line) = log
            .get(skip..)
            .and_then(|t| t.lines().find(|l| l.starts_with(marker)))
        {
            return line.to_owned();
        }
        assert!(
            start.elapsed() < timeout,
            "no {marker} after {timeout:?}; serial log ends: {}",
            &log[log.len().saturating_sub(2000)..]
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// Sends a command to the guest's init over its serial console and waits for its answer.
fn serial_command(dir: &Path, cmd: &str, answer: &str, timeout: Duration) -> String {
    let skip = std::fs::read_to_string(dir.join("serial.log"))
        .unwrap_or_default()
        .len();
    let mut s = UnixStream::connect(dir.join("serial.sock")).expect("serial socket");
    s.write_all(format!("{cmd}\n").as_bytes())
        .expect("serial write");
    wait_serial(dir, skip, answer, timeout)
}

fn is_root() -> bool {
    std::fs::read_to_string("/proc/self/status")
        .unwrap_or_default()
        .lines()
        .any(|l| l.starts_with("Uid:") && l.split_whitespace().nth(1) == Some("0"))
}

#[test]
fn virsh_migrate_through_pct() {
    if !have_qemu() {
        return;
    }
    assert!(
        is_root(),
        "the libvirt test needs root (network namespaces, libvirtd)"
    );
    let tmp = tempfile::Builder::new()
        .prefix("pct-libvirt-")
        .tempdir()
        .expect("tempdir");
    let lv = Libvirt::up(tmp.path());
    let (src, dst) = (tmp.path().join("src"), tmp.path().join("dst"));
    for d in [&src, &dst] {
        std::fs::create_dir_all(d).expect("mkdir");
        let oracle = std::fs::File::create(d.join("oracle.img")).expect("oracle disk");
        oracle.set_len(64 << 20).expect("oracle size");
    }
    let st = Command::new("cp")
        .arg("--sparse=always")
        .arg(image("mini", "plain"))
        .arg(src.join("disk.img"))
        .status()
        .expect("cp");
    assert!(st.success());
    let uuid = "6b1d3f52-8c0e-4a57-9a34-5b7c2e0d9f11";
    let src_xml = lv.xml(uuid, &src);
    let dst_xml = lv.xml(uuid, &dst);
    lv.virsh_ok("a", &["create", src_xml.to_str().expect("path")]);
    wait_serial(&src, 0, "PCT-READY", Duration::from_secs(120));
    // The source QEMU's RAM file outlives it through this link.
    let src_ram = tmp.path().join("src.ram");
    std::fs::hard_link(lv.ram_file("a"), &src_ram).expect("link the source's RAM file");
    // The destination disk: a copy after a guest `sync`, as a mirror would hold it.
    let line = serial_command(&src, "sync", "PCT-SYNCED", Duration::from_secs(60));
    assert!(line.starts_with("PCT-SYNCED"), "{line}");
    let st = Command::new("cp")
        .arg("--sparse=always")
        .arg(src.join("disk.img"))
        .arg(dst.join("disk.img"))
        .status()
        .expect("cp");
    assert!(st.success());

    let (ns_a, ns_b) = (format!("{}-a", lv.netns), format!("{}-b", lv.netns));
    // Mutual TLS between the hosts, as a deployment has it: the receiver is dialled as
    // 10.77.0.2.
    let tls = keygen(&tmp.path().join("pki"), &["10.77.0.2", "source-host"]);
    let (qemu_port, recv_port) = (49_160u16, 7_000u16);
    let receiver = Pct::spawn_in(
        &ns_b,
        "receiver",
        &[
            "receive",
            "--listen",
            &format!("10.77.0.2:{recv_port}"),
            "--qemu-incoming",
            &format!("127.0.0.1:{qemu_port}"),
            "--disk",
            dst.join("disk.img").to_str().expect("path"),
            "--json",
            "--tls-dir",
            &tls[0],
        ],
    );
    let profile = lab_profile("cloud-amd64");
    let proxy = Pct::spawn_in(
        &ns_a,
        "proxy",
        &[
            "proxy",
            "--listen",
            &format!("127.0.0.1:{qemu_port}"),
            "--to",
            &format!("10.77.0.2:{recv_port}"),
            "--profile",
            profile.0.to_str().expect("path"),
            "--json",
            "--tls-dir",
            &tls[1],
        ],
    );
    wait_listening(Some(&ns_a), qemu_port, Duration::from_secs(30));
    let dest_uri = format!(
        "qemu+unix:///system?socket={}",
        tmp.path().join("b/sock/libvirt-sock").display()
    );
    let t = Instant::now();
    let migrated = lv.virsh(
        "a",
        &[
            "migrate",
            "--live",
            "--unsafe",
            "--suspend",
            "--verbose",
            "--xml",
            dst_xml.to_str().expect("path"),
            "pct-lv",
            &dest_uri,
            "--migrateuri",
            &format!("tcp://127.0.0.1:{qemu_port}"),
            "--listen-address",
            "127.0.0.1",
        ],
    );
    let virsh_s = t.elapsed().as_secs_f64();
    let proxy = proxy.wait(Duration::from_secs(60));
    let receiver = receiver.wait(Duration::from_secs(60));
    eprintln!(
        "virsh migrate: {} in {virsh_s:.1} s\n{}{}\nproxy: {}\n{}\nreceiver: {}\n{}{}",
        migrated.status,
        text(&migrated.stdout),
        text(&migrated.stderr),
        proxy.status,
        text(&proxy.stderr),
        receiver.status,
        text(&receiver.stdout),
        text(&receiver.stderr)
    );
    assert!(migrated.status.success(), "virsh migrate failed");
    assert!(proxy.status.success() && receiver.status.success());
    let s: Value = serde_json::from_slice(&proxy.stdout).expect("proxy's JSON summary");
    eprintln!("{}", serde_json::to_string_pretty(&s).unwrap_or_default());

    // libvirt's view: gone from the source, paused (--suspend) at the destination.
    assert!(!lv
        .virsh_ok("a", &["list", "--all", "--name"])
        .contains("pct-lv"));
    let state = lv.virsh_ok("b", &["domstate", "pct-lv"]);
    assert_eq!(state.trim(), "paused", "{state}");

    // The destination's RAM is the source's at pause, page for page.
    let dst_ram = lv.ram_file("b");
    let (differ, _) = diff_pages(&src_ram, &dst_ram);
    let pages = std::fs::metadata(&dst_ram).expect("RAM file").len() / 4096;
    assert!(
        differ.is_empty(),
        "{} of {pages} pages differ, first {:?}",
        differ.len(),
        &differ[..differ.len().min(20)]
    );
    let teleported = s["pages"]["teleported"].as_u64().expect("teleported");
    assert!(teleported > 9000, "only {teleported} pages teleported");
    assert_eq!(
        s["pages"]["verified"].as_u64().unwrap_or(0),
        teleported,
        "a synced disk copy restores every page"
    );
    eprintln!(
        "virsh migrate through pct: {virsh_s:.1} s; {teleported} pages teleported; wire {} of \
         stream {} bytes; {pages} pages of RAM identical",
        s["wire"]["total"], s["stream_bytes"]
    );

    // The guest resumes at the destination and re-reads its files.
    lv.virsh_ok("b", &["resume", "pct-lv"]);
    let line = serial_command(&dst, "verify", "PCT-VERIFY-", Duration::from_secs(120));
    assert!(line.starts_with("PCT-VERIFY-OK"), "{line}");
}
