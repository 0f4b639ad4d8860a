//! The release matrix for migration: Debian 11 (5.10), 12 (6.1) and 13 (6.12) cloud guests
//! (and Debian 13's amd64 flavour, ext4 as a module)
//! on QEMU 7.2 (the system's) and QEMU 10.0 (bookworm-backports', unpacked beside it by
//! tools/lab/fetch-qemu.sh), and a guest moved from QEMU 7.2 to 10.0 with its machine type
//! (pc-i440fx-7.2) kept, as operators move VMs off the hosts they upgrade. Each migration
//! runs through pct with its defaults and the profile built from that kernel's vmlinux: the
//! destination's RAM equals the stopped source's but for elided free pages, the apache set's
//! pages are teleported, and the guest re-verifies its files at the destination. Each cell
//! prints its bytes on pct's wire against the bytes of QEMU's own stream in the same
//! migration (what stock QEMU sends for it): the README's matrix.

mod support;

use std::path::PathBuf;
use std::process::Command;
use std::sync::{Mutex, OnceLock};
use std::time::Duration;
use support::lab::{have_qemu, GuestSpec};
use support::migrate::*;
use support::profile::lab_profile_of;

static ONE_AT_A_TIME: Mutex<()> = Mutex::new(());

#[derive(Debug, Clone, Copy)]
enum Qemu {
    /// The system's QEMU 7.2.
    V7_2,
    /// QEMU 10.0 from bookworm-backports.
    V10_0,
}

impl Qemu {
    /// The `--qemu` prefix of run-guest.sh (`None`: the system's).
    fn prefix(self) -> Option<PathBuf> {
        static PREFIX: OnceLock<PathBuf> = OnceLock::new();
        match self {
            Qemu::V7_2 => None,
            Qemu::V10_0 => Some(
                PREFIX
                    .get_or_init(|| {
                        let out = support::run_ok(
                            Command::new("bash")
                                .arg(support::repo().join("tools/lab/fetch-qemu.sh")),
                            "tools/lab/fetch-qemu.sh",
                        );
                        PathBuf::from(String::from_utf8_lossy(&out.stdout).trim())
                    })
                    .clone(),
            ),
        }
    }
}

/// One cell: an apache guest of Debian `suite`'s cloud kernel on `src`, migrated by pct
/// into `dst`.
fn cell(suite: &'static str, src: Qemu, dst: Qemu) {
    cell_of("cloud-amd64", suite, src, dst)
}

/// [`cell`] with a kernel flavour of the suite (`amd64`: ext4 as a module).
fn cell_of(flavour: &'static str, suite: &'static str, src: Qemu, dst: Qemu) {
    if !have_qemu() {
        return;
    }
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|p| p.into_inner());
    let spec = GuestSpec {
        suite: Some(suite),
        flavour,
        qemu: src.prefix(),
        ..GuestSpec::new("apache").layout("mini", "plain")
    };
    let (source, mut dest, disk) = pair_to(&spec, |d| GuestSpec {
        qemu: dst.prefix(),
        ..d
    });
    let (path, profile) = lab_profile_of(flavour, suite);
    let how = How {
        extra: &[],
        via: None,
        record: None,
        tls: None,
        receiver_extra: &[],
        profile: ProfileChoice::Given(path),
    };
    let run = migrate_with(&source, &dest, &disk, &how);
    assert!(run.sender.status.success(), "sender failed");
    assert!(run.receiver.status.success(), "receiver failed");
    let s = run.summary.clone().expect("JSON summary");
    assert_eq!(s["result"], "completed");
    assert_eq!(source.status(), "postmigrate");
    let free = assert_identical_with(&source, &dest, &profile);
    let n = |k: &str| s["pages"][k].as_u64().unwrap_or(0);
    // 128 files x 300 KB are cached: most of it must have been teleported and verified.
    assert!(
        n("teleported") > 9000,
        "only {} pages teleported",
        n("teleported")
    );
    assert_eq!(n("verified") + n("fallen_back"), n("teleported"));
    let (wire, stream) = (s["wire"]["total"].as_u64(), s["stream_bytes"].as_u64());
    let (wire, stream) = (wire.expect("wire bytes"), stream.expect("stream bytes"));
    assert!(
        wire < stream / 4,
        "{wire} B on the wire for a {stream} B stream"
    );
    eprintln!(
        "Debian {suite} {flavour} on QEMU {src:?} -> {dst:?}: {} pages teleported, {} fell back, {} \
         elided ({free} free pages zero at the destination); {:.1} MB on the wire for QEMU's \
         {:.1} MB stream: {:.3}x",
        n("teleported"),
        n("fallen_back"),
        n("elided"),
        wire as f64 / 1e6,
        stream as f64 / 1e6,
        wire as f64 / stream as f64
    );
    // The source (and its run directory, which holds the destination's disk) stays until
    // the end: QEMU 10 opens the destination's disk when the guest is continued, not when
    // QEMU starts.
    dest.cont();
    let line = dest.command("verify", "PCT-VERIFY-", Duration::from_secs(120));
    assert!(line.starts_with("PCT-VERIFY-OK"), "{line}");
}

#[test]
fn debian11_on_qemu72() {
    cell("bullseye", Qemu::V7_2, Qemu::V7_2);
}

#[test]
fn debian11_on_qemu10() {
    cell("bullseye", Qemu::V10_0, Qemu::V10_0);
}

/// Also in tests/migrate_lab.rs (the web fileset, the switchover check's assertions); here
/// for the matrix's figures on the same guest as every other cell.
#[test]
fn debian12_on_qemu72() {
    cell("bookworm", Qemu::V7_2, Qemu::V7_2);
}

#[test]
fn debian12_on_qemu10() {
    cell("bookworm", Qemu::V10_0, Qemu::V10_0);
}

#[test]
fn debian12_from_qemu72_to_qemu10() {
    cell("bookworm", Qemu::V7_2, Qemu::V10_0);
}

#[test]
fn debian13_on_qemu72() {
    cell("trixie", Qemu::V7_2, Qemu::V7_2);
}

#[test]
fn debian13_on_qemu10() {
    cell("trixie", Qemu::V10_0, Qemu::V10_0);
}

/// Debian 13's `amd64` flavour (ext4 as a module: its types from ext4.ko's debug info).
#[test]
fn debian13_amd64_on_qemu10() {
    cell_of("amd64", "trixie", Qemu::V10_0, Qemu::V10_0);
}
