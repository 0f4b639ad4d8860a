//! pct-migrate end to end on real lab guests: two QEMU 7.2 under TCG, two `pct-migrate`
//! processes over TCP on localhost.
//!
//! - the destination's RAM right after the migration (kept paused, `-S`) is bit-identical
//!   to the source's (paused by QEMU at completion), page by page;
//! - the migrated guest keeps running: its files re-read and check out;
//! - a stale destination disk still yields a bit-identical guest, through fallbacks;
//! - the receiver restores as well from a qcow2 overlay or a block device as from a raw
//!   disk copy (and a stale qcow2 overlay falls back as a stale raw disk does);
//! - cutting the TCP connection mid-migration leaves the source running, both pct
//!   processes and the destination QEMU exit with an error, nothing is left behind.
//!
//! The tests share two CPU cores with everything else: they run one at a time, on the
//! `mini` fileset.

mod support;

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::Ordering;
use std::sync::{Mutex, MutexGuard};
use std::time::Duration;
use support::disk::{qemu_img, qemu_io, Loop};
use support::lab::{have_qemu, Guest, GuestSpec};
use support::migrate::*;
use support::profile::lab_profile;
use support::run_ok;

static ONE_AT_A_TIME: Mutex<()> = Mutex::new(());

fn serial() -> MutexGuard<'static, ()> {
    ONE_AT_A_TIME.lock().unwrap_or_else(|p| p.into_inner())
}

/// Source and destination guests of `workload` on the disk FILESET/LAYOUT ([`pair`]), and
/// the guard that runs the tests one at a time; `None` (the test skips) without QEMU.
fn lab_pair(
    workload: &'static str,
    fileset: &'static str,
    layout: &'static str,
) -> Option<(MutexGuard<'static, ()>, Guest, Guest, PathBuf)> {
    lab_pair_of(GuestSpec::new(workload).layout(fileset, layout))
}

/// [`lab_pair`] of any guest.
fn lab_pair_of(spec: GuestSpec) -> Option<(MutexGuard<'static, ()>, Guest, Guest, PathBuf)> {
    if !have_qemu() {
        return None;
    }
    let one = serial();
    let (src, dst, disk) = pair(&spec);
    Some((one, src, dst, disk))
}

/// The sender's JSON summary of a migration both pct processes report a success.
fn succeeded(run: &Run) -> serde_json::Value {
    assert!(run.sender.status.success(), "sender failed");
    assert!(run.receiver.status.success(), "receiver failed");
    run.summary.clone().expect("JSON summary")
}

fn u(v: &serde_json::Value, path: &[&str]) -> u64 {
    path.iter()
        .fold(v, |v, k| &v[*k])
        .as_u64()
        .unwrap_or_else(|| panic!("summary has no {path:?}: {v}"))
}

/// [`assert_identical_with`] the lab kernel's profile.
fn assert_identical(src: &Guest, dst: &Guest) -> u64 {
    assert_identical_with(src, dst, &lab_profile("cloud-amd64").1)
}

/// The main invariant, on the apache guest: bit-identical RAM, references used, the guest
/// runs on and its files check out.
#[test]
fn apache_bit_identical_and_keeps_running() {
    apache_case(1);
}

/// The same with 2 vCPUs: under TCG they run as parallel host threads (MTTCG), writing
/// guest memory at the same time as QEMU's dirty tracking and pct's walk read it.
#[test]
fn apache_two_vcpus() {
    apache_case(2);
}

fn apache_case(smp: u32) {
    let Some((_one, src, mut dst, disk)) =
        lab_pair_of(GuestSpec::new("apache").layout("mini", "plain").smp(smp))
    else {
        return;
    };
    let run = migrate(&src, &dst, &disk, &[], None);
    let s = succeeded(&run);
    assert_eq!(s["result"], "completed");
    assert_eq!(src.status(), "postmigrate");
    assert_eq!(dst.status(), "paused");
    assert_identical(&src, &dst);

    // 128 files x 300 KB are cached: most of it must have been teleported and verified.
    let teleported = u(&s, &["pages", "teleported"]);
    assert!(teleported > 9000, "only {teleported} pages teleported");
    assert!(u(&s, &["pages", "verified"]) + u(&s, &["pages", "fallen_back"]) == teleported);
    assert!(s["reference_bytes_per_page"].as_f64().unwrap_or(99.0) < 4.0);
    assert!(u(&s, &["wire", "total"]) < u(&s, &["stream_bytes"]) / 2);
    // A TCG guest: the switchover check ran over all of its RAM, and hashed during the
    // downtime only the pages QEMU's process touched since the baseline (the guest is
    // mostly idle: far fewer than its 262144).
    assert_eq!(u(&s, &["switchover_check", "pages_checked"]), 262_144);
    assert_eq!(s["switchover_check"]["scope"], "touched", "{s}");
    let hashed = u(&s, &["switchover_check", "pages_hashed"]);
    assert!(hashed > 0 && hashed < 262_144 / 2, "{hashed} pages hashed");
    eprintln!(
        "apache, {smp} vCPU(s): {teleported} pages teleported, {} fell back; switchover check \
         hashed {hashed} pages in the downtime, re-sent {}",
        u(&s, &["pages", "fallen_back"]),
        u(&s, &["switchover_check", "pages_resent"])
    );

    // The guest resumes at the destination and re-reads its files from its (page) cache.
    drop(src);
    dst.cont();
    let line = dst.command("verify", "PCT-VERIFY-", Duration::from_secs(120));
    assert!(line.starts_with("PCT-VERIFY-OK"), "{line}");
    let skip = dst.serial_log().len();
    dst.wait_serial(skip, "PCT-HEARTBEAT", Duration::from_secs(30));
}

/// Guest RAM as QEMU's and libvirt's default has it: anonymous memory of QEMU's process,
/// no RAM file. pct reads it through /proc/PID/mem (the pages the walkers need, copied in
/// as they read them, for the map; the stopped guest's whole RAM, piece by piece, for the
/// switchover check). Bit-identical (compared through QEMU's own `pmemsave`), with as many
/// pages teleported as the same guest with a shared RAM file, migrated in the same test,
/// within 3 %; pct holds less than a tenth of the guest's RAM.
#[test]
fn apache_with_anonymous_ram() {
    let mut teleported = Vec::new();
    for anon in [false, true] {
        let mut spec = GuestSpec::new("apache").layout("mini", "plain");
        spec.anon_ram = anon;
        let ram_bytes = u64::from(spec.mem_mib) << 20;
        let Some((_one, src, mut dst, disk)) = lab_pair_of(spec) else {
            return;
        };
        let run = migrate(&src, &dst, &disk, &[], None);
        let s = succeeded(&run);
        assert_eq!(s["result"], "completed");
        assert_identical(&src, &dst);
        let n = u(&s, &["pages", "teleported"]);
        eprintln!(
            "apache, anonymous RAM {anon}: {n} pages teleported, {} fell back, map taken in \
             {:.2} s; switchover check: scope {}, {} pages hashed in {:.0} ms (reading {} ms), \
             {} re-sent",
            u(&s, &["pages", "fallen_back"]),
            s["time"]["scan_s"].as_f64().unwrap_or(f64::NAN),
            s["switchover_check"]["scope"],
            u(&s, &["switchover_check", "pages_hashed"]),
            s["switchover_check"]["hash_time"]
                .as_f64()
                .unwrap_or(f64::NAN),
            s["switchover_check"]["read_time"],
            u(&s, &["switchover_check", "pages_resent"]),
        );
        if anon {
            let scope = s["switchover_check"]["scope"].as_str().unwrap_or("");
            assert!(scope.contains("anonymous"), "{scope}");
            assert!(s["switchover_check"]["read_time"].as_f64().is_some(), "{s}");
            let copied = u(&s, &["ram_copied_bytes"]);
            eprintln!(
                "anonymous RAM: {:.1} MB of {} MiB copied into pct for the map",
                copied as f64 / 1e6,
                ram_bytes >> 20
            );
            assert!(
                copied > 0 && copied < ram_bytes / 10,
                "{copied} of {ram_bytes}"
            );
        }
        teleported.push(n);
        drop(src);
        dst.cont();
        let line = dst.command("verify", "PCT-VERIFY-", Duration::from_secs(120));
        assert!(line.starts_with("PCT-VERIFY-OK"), "{line}");
    }
    let (file, anon) = (teleported[0] as f64, teleported[1] as f64);
    assert!(
        (anon - file).abs() <= 0.03 * file,
        "teleported: {file} with a RAM file, {anon} with anonymous RAM"
    );
}

/// The db guest (fsync'ed writes throughout) with anonymous RAM: bit-identical.
#[test]
fn db_with_anonymous_ram() {
    let mut spec = GuestSpec::new("db").layout("db", "plain");
    spec.anon_ram = true;
    db_case(spec);
}

/// Free-page elision on an aged guest (400 MB of random data went through its memory and
/// was freed) that keeps allocating, writing and freeing memory while it migrates. Every
/// page that differs at the destination is zero there and free in the stopped source; each
/// elided page was sent again by QEMU, re-sent at the switchover, or left zero; the guest
/// runs on at the destination and its files check out.
#[test]
fn aged_guest_elides_free_pages_while_churning() {
    let Some((_one, mut src, mut dst, disk)) = lab_pair("aged", "mini", "plain") else {
        return;
    };
    src.command("churn", "PCT-CHURNING", Duration::from_secs(30));
    let run = migrate(&src, &dst, &disk, &[], None);
    let s = succeeded(&run);
    let free = assert_identical(&src, &dst);
    let e = &s["free_elision"];
    let elided = u(e, &["pages_elided"]);
    let (again, resent, zero) = (
        u(e, &["pages_sent_again"]),
        u(e, &["pages_resent"]),
        u(e, &["pages_left_zero"]),
    );
    eprintln!(
        "aged: {} free at the map, {elided} elided, {again} sent again by QEMU, {resent} \
         re-sent at the switchover, {zero} left zero ({free} differ at the destination); \
         wire {} B of a {} B stream",
        u(e, &["free_at_map"]),
        u(&s, &["wire", "total"]),
        u(&s, &["stream_bytes"])
    );
    // Hundreds of MB of stale free pages: most of them elided.
    assert!(elided > 50_000, "only {elided} pages elided: {e}");
    assert_eq!(u(&s, &["pages", "elided"]), elided);
    assert_eq!(again + resent + zero, elided, "{e}");
    assert!(free <= zero, "{free} pages differ, {zero} were left zero");
    // The churn takes free pages in use: some elided pages must have come back.
    assert!(again + resent > 0, "no elided page was taken in use: {e}");

    drop(src);
    dst.cont();
    let line = dst.command("verify", "PCT-VERIFY-", Duration::from_secs(120));
    assert!(line.starts_with("PCT-VERIFY-OK"), "{line}");
}

/// An idle guest: bit-identical, and the destination QEMU got the source's stream byte
/// for byte (both pct processes record it).
#[test]
fn idle_bit_identical_with_a_profile_from_memory() {
    let Some((_one, src, mut dst, disk)) = lab_pair("idle", "mini", "plain") else {
        return;
    };
    // No --profile and none shipped or cached: the sender builds it from the guest's memory.
    let profiles = tempfile::tempdir().expect("temporary directory");
    let choice = ProfileChoice::FromMemory {
        dir: profiles.path().to_owned(),
    };
    let how = How {
        extra: &[],
        via: None,
        record: Some(src.dir.path()),
        tls: None,
        receiver_extra: &[],
        profile: choice,
    };
    let run = migrate_with(&src, &dst, &disk, &how);
    let s = succeeded(&run);
    let err = String::from_utf8_lossy(&run.sender.stderr);
    assert!(
        err.contains("using profile built from the guest's memory"),
        "the sender did not build its profile from memory: {err}"
    );
    assert_eq!(s["result"], "completed");
    assert_identical(&src, &dst);

    // Invariant 2 at the byte level: the destination QEMU got exactly the source's stream.
    let (sent, got) = stream_records(&src, src.dir.path());
    let (first, count) = diff_pages(&sent, &got);
    assert_eq!(
        count,
        0,
        "the streams differ in 4 KiB blocks {:?}",
        &first[..first.len().min(20)]
    );
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_pct-migrate"))
        .arg("inspect-stream")
        .arg(&got)
        .output()
        .expect("pct-migrate inspect-stream");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{text}");
    let pages = u(&s, &["pages", "sent"]) + u(&s, &["pages", "teleported"]);
    // An elided free page reaches QEMU as a ZERO record.
    let zero = u(&s, &["pages", "zero"]) + u(&s, &["pages", "elided"]);
    assert!(
        text.contains(&format!(" {pages} PAGE records, {zero} ZERO records")),
        "inspect-stream disagrees with the summary ({pages} pages, {zero} zero): {text}"
    );
    // An idle guest caches little (its special files, metadata): some of it teleports.
    let teleported = u(&s, &["pages", "teleported"]);
    assert!(teleported > 100, "only {teleported} pages teleported");
    assert_eq!(u(&s, &["pages", "fallen_back"]), 0);
    drop(src);
    dst.cont();
    let line = dst.command("verify", "PCT-VERIFY-", Duration::from_secs(120));
    assert!(line.starts_with("PCT-VERIFY-OK"), "{line}");
}

/// A guest write that QEMU's dirty tracking does not see (made here through
/// /proc/PID/mem, into QEMU's own mapping of guest RAM, after QEMU sent that page) still
/// reaches the destination: the switchover check re-sends it. QEMU 7.2 under TCG loses
/// real guest writes the same way, only not on demand; like those, this one passes
/// through QEMU's page tables. The page is below 1 MiB, which Linux reserves and leaves
/// alone.
#[test]
fn switchover_check_resends_a_write_qemu_did_not_see() {
    const PFN: u64 = 0x60;
    let Some((_one, src, dst, disk)) = lab_pair("idle", "mini", "plain") else {
        return;
    };
    let pattern: Vec<u8> = (0..4096u32)
        .map(|i| (i.wrapping_mul(131) >> 3) as u8)
        .collect();
    let monitor = src.path("qmp-pct.sock");
    let mem = format!("/proc/{}/mem", src.pid());
    let pat = pattern.clone();
    // Once QEMU has sent the first 20 MB of the stream (the first pass goes up from page 0),
    // write the page behind QEMU's back; report whether the migration was still going.
    let writer = std::thread::spawn(move || -> Result<String, String> {
        use std::os::unix::fs::FileExt;
        let start = std::time::Instant::now();
        let mut qmp = loop {
            match pct::qemu::Qmp::connect(&monitor, Duration::from_secs(5)) {
                Ok(q) => break q,
                Err(e) if start.elapsed() > Duration::from_secs(60) => return Err(e.to_string()),
                Err(_) => std::thread::sleep(Duration::from_millis(20)),
            }
        };
        loop {
            let m = qmp
                .execute("query-migrate", None)
                .map_err(|e| e.to_string())?;
            let sent = m["ram"]["transferred"].as_u64().unwrap_or(0);
            if m["status"] == "active" && sent > 20 << 20 {
                // "Host virtual address for 0x60000 (pc.ram) is 0x7f…"
                let hva = qmp
                    .hmp(&format!("gpa2hva {:#x}", PFN * 4096))
                    .map_err(|e| e.to_string())?;
                let hva = hva
                    .trim()
                    .rsplit_once(" 0x")
                    .and_then(|(_, h)| u64::from_str_radix(h, 16).ok())
                    .ok_or(format!("gpa2hva answered {hva}"))?;
                let f = std::fs::OpenOptions::new()
                    .write(true)
                    .open(&mem)
                    .map_err(|e| e.to_string())?;
                f.write_all_at(&pat, hva).map_err(|e| e.to_string())?;
                let after = qmp
                    .execute("query-migrate", None)
                    .map_err(|e| e.to_string())?;
                return Ok(after["status"].as_str().unwrap_or("?").to_owned());
            }
            if start.elapsed() > Duration::from_secs(120) || m["status"] == "completed" {
                return Err(format!("never saw the migration past 20 MB: {m}"));
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    });
    let run = migrate(&src, &dst, &disk, &[], None);
    let status = writer.join().expect("writer thread");
    assert_eq!(
        status.as_deref(),
        Ok("active"),
        "the write did not land mid-migration"
    );
    let s = succeeded(&run);
    assert_identical(&src, &dst);
    assert!(
        u(&s, &["switchover_check", "pages_resent"]) >= 1,
        "the switchover check re-sent nothing: {s}"
    );
    let mut page = vec![0u8; 4096];
    std::fs::File::open(&dst.ram_path)
        .and_then(|mut f| {
            use std::io::Seek;
            f.seek(std::io::SeekFrom::Start(PFN * 4096))?;
            f.read_exact(&mut page)
        })
        .expect("read the destination page");
    assert!(page == pattern, "the destination lacks the write");
}

/// A destination disk that is out of sync (some teleported blocks overwritten) on a
/// partitioned disk: the hash catches every stale page, the sender's originals replace
/// them, the guest is still bit-identical.
#[test]
fn stale_destination_disk_falls_back_bit_identical() {
    let Some((_one, src, dst, disk)) = lab_pair("apache", "mini", "part") else {
        return;
    };

    // Corrupt one page of every 40th run of the cache map on the destination disk.
    let blocks = one_block_of_every(&src, 40);
    let f = std::fs::OpenOptions::new()
        .write(true)
        .open(&disk)
        .expect("open destination disk");
    for &off in &blocks {
        use std::os::unix::fs::FileExt;
        f.write_all_at(&[0xa5; 4096], off)
            .expect("overwrite a block");
    }
    drop(f);
    let s = succeeded(&migrate(&src, &dst, &disk, &[], None));
    assert_stale_fell_back(&src, &dst, &s, blocks.len() as u64);
}

/// The disk offset of the first block of every `n`th run of the source's cache map, as
/// the sender will see it.
fn one_block_of_every(src: &Guest, n: usize) -> Vec<u64> {
    let mem = pct::qemu::ram::open_live(&src.qmp_path()).expect("map source RAM");
    let (_, profile) = support::profile::lab_profile("cloud-amd64");
    let (map, _) = pct::introspect::scan(&mem, &profile, None, Default::default()).expect("scan");
    assert!(map.runs.len() > n, "cache map has {} runs", map.runs.len());
    map.runs.iter().step_by(n).map(|r| r.disk_offset).collect()
}

/// `stale` pages of the destination disk did not match: the migration is bit-identical
/// all the same, and those pages, not their whole runs, fell back.
fn assert_stale_fell_back(src: &Guest, dst: &Guest, s: &serde_json::Value, stale: u64) {
    assert_identical(src, dst);
    let fallen = u(s, &["pages", "fallen_back"]);
    eprintln!(
        "stale disk: {stale} stale pages, {fallen} fell back, {} teleported, fallback {} B, protocol {} B",
        u(s, &["pages", "teleported"]),
        u(s, &["wire", "fallback"]),
        u(s, &["wire", "protocol"])
    );
    assert!(fallen >= stale, "{stale} stale pages, {fallen} fell back");
    // A failed run hash is narrowed down by per-page hashes: the stale pages fall back,
    // not their whole runs (a 4 KiB overwrite touches at most two pages).
    assert!(
        fallen <= 2 * stale,
        "{stale} stale pages, {fallen} fell back"
    );
    assert!(u(s, &["wire", "fallback"]) > 0);
    assert!(u(s, &["pages", "verified"]) > 5000);
}

/// The same with the receiver reading a qcow2 overlay (issue 15, part 5: a disk still
/// being mirrored): over the raw disk copy, one block of every 40th run rewritten in the
/// overlay with other bytes. Those pages fall back; the guest is bit-identical.
#[test]
fn stale_qcow2_overlay_falls_back_bit_identical() {
    let Some((_one, src, dst, disk)) = lab_pair("apache", "mini", "part") else {
        return;
    };
    let blocks = one_block_of_every(&src, 40);
    let overlay = overlay_on(&disk, &disk, "stale.qcow2");
    let writes: Vec<String> = blocks
        .iter()
        .map(|o| format!("write -P 0xa5 {o} 4k"))
        .collect();
    let writes: Vec<&str> = writes.iter().map(String::as_str).collect();
    qemu_io(dir_of(&disk), "qcow2", "stale.qcow2", &writes);
    let s = succeeded(&migrate(&src, &dst, &overlay, &[], None));
    assert_stale_fell_back(&src, &dst, &s, blocks.len() as u64);
}

fn dir_of(p: &Path) -> &Path {
    p.parent().expect("a file in a directory")
}

/// A qcow2 overlay `name` (beside `disk`) on the raw backing file `backing`, as large as
/// `disk`. Made with `-u`: the destination QEMU has the disk open.
fn overlay_on(disk: &Path, backing: &Path, name: &str) -> PathBuf {
    let size = std::fs::metadata(disk).expect("disk").len().to_string();
    let backing = backing.display();
    let args = format!("create -u -f qcow2 -b {backing} -F raw {name} {size}");
    qemu_img(dir_of(disk), &args);
    dir_of(disk).join(name)
}

/// Issue 15, part 4: the receiver reads the destination's disk as real VMs keep it. The
/// apache guest migrated three times, one pair of guests at a time, the receiver's
/// `--disk` (format probed) being
/// - the raw disk copy (the reference);
/// - a qcow2 overlay whose backing file is a copy of the disk that is stale in one block
///   of every 20th run of the cache map, and whose own clusters hold the disk's bytes
///   there (`qemu-img rebase` onto the stale copy writes them): the overlay reads as the
///   disk, its backing file alone would not;
/// - a loop block device over the disk copy (sized by its ioctl).
///
/// Each migration is bit-identical, restores every teleported page with no fallback,
/// teleports as many pages as the raw case within 5 %, and the guest's files verify after
/// it resumes. (The destination QEMU itself runs on the raw copy in all three.)
#[test]
fn destination_disk_as_qcow2_overlay_or_loop_device() {
    if !have_qemu() {
        return;
    }
    let raw = disk_case("raw", |_, disk| (disk.to_path_buf(), None));
    let qcow2 = disk_case("qcow2 overlay", |src, disk| {
        let base = dir_of(disk).join("stale-base.img");
        std::fs::copy(disk, &base).expect("copy the disk");
        let f = std::fs::OpenOptions::new()
            .write(true)
            .open(&base)
            .expect("open the copy");
        let blocks = one_block_of_every(src, 20);
        for &off in &blocks {
            use std::os::unix::fs::FileExt;
            f.write_all_at(&[0x5a; 4096], off)
                .expect("overwrite a block");
        }
        drop(f);
        let overlay = overlay_on(disk, disk, "dst.qcow2");
        let args = "rebase -U -f qcow2 -b stale-base.img -F raw dst.qcow2";
        qemu_img(dir_of(disk), args);
        // The overlay holds data clusters of its own (what the stale copy lacks).
        let map = run_ok(
            Command::new("qemu-img")
                .args(["map", "-U", "--output=json", "-f", "qcow2"])
                .arg(&overlay),
            "qemu-img map",
        );
        let map: serde_json::Value = serde_json::from_slice(&map.stdout).expect("map JSON");
        let own = map
            .as_array()
            .expect("map entries")
            .iter()
            .filter(|e| e["depth"] == 0 && e["data"] == true)
            .count();
        assert!(own > 0, "the overlay has no clusters of its own: {map}");
        eprintln!(
            "qcow2 overlay: {} stale blocks in its backing file, {own} extents of its own",
            blocks.len()
        );
        (overlay, None)
    });
    let block = disk_case("loop device", |_, disk| {
        let dev = Loop::attach(disk);
        (dev.0.clone(), Some(dev))
    });
    eprintln!("teleported pages: raw {raw}, qcow2 overlay {qcow2}, loop device {block}");
    for (what, n) in [("qcow2 overlay", qcow2), ("loop device", block)] {
        let off = n.abs_diff(raw) as f64 / raw as f64;
        assert!(
            off < 0.05,
            "{what}: {n} pages teleported against {raw} from the raw disk"
        );
    }
}

/// One migration of the apache guest, the receiver reading the disk `prepare` makes
/// from the destination's raw disk copy (and a guard to keep until the end); returns the
/// pages teleported.
fn disk_case(what: &str, prepare: impl FnOnce(&Guest, &Path) -> (PathBuf, Option<Loop>)) -> u64 {
    let Some((_one, src, mut dst, disk)) = lab_pair("apache", "mini", "plain") else {
        panic!("no QEMU");
    };
    let (recv_disk, _guard) = prepare(&src, &disk);
    let s = succeeded(&migrate(&src, &dst, &recv_disk, &[], None));
    assert_identical(&src, &dst);
    let teleported = u(&s, &["pages", "teleported"]);
    let fallen = u(&s, &["pages", "fallen_back"]);
    eprintln!(
        "{what} ({}): {teleported} pages teleported, {} verified, {fallen} fell back, \
         restore {} s, {} MB/s",
        recv_disk.display(),
        u(&s, &["pages", "verified"]),
        s["time"]["restore_s"],
        s["restore_mb_per_s"]
    );
    assert!(
        teleported > 9000,
        "{what}: only {teleported} pages teleported"
    );
    assert_eq!(fallen, 0, "{what}: pages fell back");
    assert_eq!(u(&s, &["pages", "verified"]), teleported, "{what}");
    drop(src);
    dst.cont();
    let line = dst.command("verify", "PCT-VERIFY-", Duration::from_secs(120));
    assert!(line.starts_with("PCT-VERIFY-OK"), "{what}: {line}");
    teleported
}

/// A relay between sender and receiver that cuts both connections once `cut_after` bytes
/// went from the sender to the receiver.
/// Cutting the link mid-migration: the source keeps running unchanged, the destination
/// QEMU and both pct processes exit with an error, no socket directories are left.
#[test]
fn cut_link_leaves_source_running() {
    let Some((_one, mut src, mut dst, disk)) = lab_pair("apache", "mini", "plain") else {
        return;
    };
    let relay = Relay::new(Some(8 << 20));
    // Slow enough that 8 MB is well inside the migration.
    let run = migrate(
        &src,
        &dst,
        &disk,
        &["--bandwidth", "40mbit"],
        Some(&relay.via()),
    );
    assert!(
        relay.was_cut.load(Ordering::SeqCst),
        "the relay never cut the link"
    );
    assert!(!run.sender.status.success(), "the sender reported success");
    assert!(
        !run.receiver.status.success(),
        "the receiver reported success"
    );
    let serr = text(&run.sender.stderr);
    assert!(serr.contains("error:"), "sender said: {serr}");
    assert!(
        serr.contains("source guest is running"),
        "sender said: {serr}"
    );
    let rerr = text(&run.receiver.stderr);
    assert!(rerr.contains("error:"), "receiver said: {rerr}");

    // The source runs on, its workload answers, its files check out.
    assert_eq!(src.status(), "running");
    let skip = src.serial_log().len();
    src.wait_serial(skip, "PCT-HEARTBEAT", Duration::from_secs(30));
    let line = src.command("verify", "PCT-VERIFY-", Duration::from_secs(120));
    assert!(line.starts_with("PCT-VERIFY-OK"), "{line}");

    // The destination QEMU gave up by itself.
    let st = dst.wait_exit(Duration::from_secs(30));
    assert!(
        st.is_some_and(|s| !s.success()),
        "destination QEMU still running or exited cleanly: {st:?}"
    );
    // No socket directories of either pct process are left.
    let left = sock_dirs_left(run.sender_pid, run.receiver_pid);
    assert!(left.is_empty(), "left behind: {left:?}");
}

/// The db workload keeps writing (fsync'ed random writes) during the migration: pages are
/// re-sent by QEMU, the disk copy taken before the migration goes stale under it. Still
/// bit-identical; with the disk brought up to date (the mirror catching up), the database
/// runs on at the destination.
#[test]
fn db_bit_identical_while_writing() {
    db_case(GuestSpec::new("db").layout("db", "plain"));
}

/// The same with 2 vCPUs (MTTCG): the database writes while the other vCPU runs too.
#[test]
fn db_two_vcpus() {
    db_case(GuestSpec::new("db").layout("db", "plain").smp(2));
}

fn db_case(spec: GuestSpec) {
    let (smp, anon) = (spec.smp, spec.anon_ram);
    let Some((_one, src, mut dst, disk)) = lab_pair_of(spec) else {
        return;
    };
    let run = migrate(&src, &dst, &disk, &[], None);
    let s = succeeded(&run);
    assert_identical(&src, &dst);
    assert!(u(&s, &["pages", "teleported"]) > 20_000, "{s}");
    eprintln!(
        "db, {smp} vCPU(s), anonymous RAM {anon}: {} fell back of {} teleported, fallback {} B, \
         protocol {} B, {} pages re-sent at switchover (reading RAM: {} ms)",
        u(&s, &["pages", "fallen_back"]),
        u(&s, &["pages", "teleported"]),
        u(&s, &["wire", "fallback"]),
        u(&s, &["wire", "protocol"]),
        u(&s, &["switchover_check", "pages_resent"]),
        s["switchover_check"]["read_time"],
    );

    // The mirror catches up (the source is stopped), then the guest resumes.
    std::fs::copy(src.path("disk.img"), &disk).expect("sync the destination disk");
    drop(src);
    let skip = dst.serial_log().len();
    dst.cont();
    dst.wait_serial(skip, "PCT-DB ops=", Duration::from_secs(60));
}
