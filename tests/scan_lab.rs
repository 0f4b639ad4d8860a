//! Agentless introspection on real lab guests: the cache map of each disk layout is
//! checked against the disk image byte for byte, against the guest's own oracle, against
//! the filesystem's own block map (debugfs), against drgn, and against pct's second,
//! independent pass (the linear struct page scan).

mod support;

use pct::cachemap::CacheMap;
use pct::introspect::{scan, ScanOptions};
use pct::kernel::Kernel;
use pct::memory::GuestMemory;
use pct::profile::Profile;
use pct::report::ScanReport;
use pct::walk::buddy::FreePageInit;
use std::collections::{BTreeSet, HashMap};
use std::process::Command;
use std::time::{Duration, Instant};
use support::lab::{Guest, GuestSpec};
use support::oracle::Oracle;
use support::profile::{kernel_dir, kernel_dir_of, lab_profile, lab_profile_of};
use support::{repo, run_ok};

/// The profile of the default (cloud-amd64) guest kernel.
fn profile() -> Profile {
    lab_profile("cloud-amd64").1
}

/// The profile of a guest's own kernel (its flavour and Debian suite).
fn profile_of(spec: &GuestSpec) -> Profile {
    lab_profile_of(spec.flavour, spec.suite.unwrap_or("bookworm")).1
}

/// Boots a guest, lets it settle, stops it, and scans its RAM file (with verify and
/// cross-check) with its kernel's profile.
fn boot_and_scan(spec: GuestSpec) -> (Guest, CacheMap, ScanReport, Oracle) {
    let p = profile_of(&spec);
    let mut g = Guest::start(spec);
    g.wait_ready();
    let oracle = g.oracle();
    g.stop();
    let mem = GuestMemory::open(&g.ram_path).expect("map guest RAM");
    let disk = pct::disk::Disk::open(g.path("disk.img"), pct::disk::DiskFormat::Raw).unwrap();
    let opts = ScanOptions {
        cross_check: true,
        verify: true,
        free_pages: false,
    };
    let (map, report) = scan(&mem, &p, Some(&disk), opts).expect("scan");
    (g, map, report, oracle)
}

fn pfns_in_map(map: &CacheMap) -> HashMap<u64, (Option<u64>, Option<u64>)> {
    let mut m = HashMap::new();
    for r in &map.runs {
        for i in 0..r.len / 4096 {
            m.insert(
                r.gpa / 4096 + i,
                (r.ino, r.file_offset.map(|o| o + i * 4096)),
            );
        }
    }
    m
}

/// Partition start of the lab disk in bytes (the `part` layout puts it at sector 63).
fn part_start(layout: &str) -> u64 {
    if layout == "part" {
        63 * 512
    } else {
        0
    }
}

/// Every property the cache map must have, on one layout of the default kernel.
fn check_layout(layout: &'static str) {
    check_guest(GuestSpec::new("apache").layout("mini", layout));
}

/// Every property the cache map of an apache guest must have; returns the stopped guest
/// and its map for further checks.
fn check_guest(spec: GuestSpec) -> (Guest, CacheMap) {
    let layout = spec.layout;
    let (g, map, report, oracle) = boot_and_scan(spec);
    eprintln!(
        "scan {layout}: {} restorable in {} runs, walk {:.1} ms, total {:.1} ms",
        report.restorable_bytes, report.runs, report.timings_ms["walk"], report.timings_ms["total"]
    );

    // 1. Every run byte-matches the disk image.
    let v = report.verify.as_ref().unwrap();
    assert!(v.matching_pages > 0);
    assert_eq!(
        (v.mismatching_pages, v.unreadable_runs),
        (0, 0),
        "{layout}: verify failed: {v:?}"
    );
    assert!(
        report.problems.is_empty(),
        "{layout}: walk problems {:?}",
        report.problems
    );

    // 2. The linear struct page scan finds the same page-cache pages as the tree walk.
    let cc = report.cross_check.as_ref().unwrap();
    assert!(cc.agrees(), "{layout}: cross-check disagrees: {cc:?}");

    // 3. The map is sorted and its runs do not overlap.
    for w in map.runs.windows(2) {
        assert!(
            w[0].gpa + w[0].len <= w[1].gpa,
            "{layout}: runs overlap or unsorted"
        );
    }

    // 4. Coverage of what the guest itself reports as clean, disk-backed file pages.
    let in_map = pfns_in_map(&map);
    let mut want = 0;
    let mut found = 0;
    for f in oracle
        .files
        .iter()
        .filter(|f| f.path.starts_with("/mnt/www/"))
    {
        for p in f.pages.iter().filter(|p| p.is_clean_file_page()) {
            want += 1;
            if in_map.get(&p.pfn) == Some(&(Some(f.ino), Some(p.index * 4096))) {
                found += 1;
            }
        }
    }
    let coverage = found as f64 / want as f64;
    eprintln!("scan {layout}: coverage of the guest's clean file pages {found}/{want}");
    assert!(
        want >= 128 * 75 && coverage >= 0.99,
        "{layout}: coverage {coverage:.4} ({found}/{want})"
    );

    // 5. Never in the map: tmpfs, dirty, unwritten (fallocated) and hole pages.
    let never = |path: &str, pred: &dyn Fn(u64) -> bool| {
        let f = oracle
            .file(path)
            .unwrap_or_else(|| panic!("{layout}: {path} not in oracle"));
        for p in f.pages.iter().filter(|p| pred(p.index)) {
            assert!(
                !in_map.contains_key(&p.pfn),
                "{layout}: {path} page {} is in the map",
                p.index
            );
        }
    };
    never("/tmpfs/copy", &|_| true);
    never("/mnt/special/dirty", &|_| true);
    // sparse: data at pages 0..16, 128..160 and 511; holes elsewhere
    never("/mnt/special/sparse", &|i| {
        !(i < 16 || (128..160).contains(&i) || i == 511)
    });
    if layout != "noextent" {
        // falloc: the first 256 pages were written after fallocate (dirty), the rest unwritten
        never("/mnt/special/falloc", &|_| true);
    }
    let sparse = oracle.file("/mnt/special/sparse").unwrap();
    let sparse_data = sparse
        .pages
        .iter()
        .filter(|p| p.index < 16 || (128..160).contains(&p.index) || p.index == 511)
        .filter(|p| in_map.contains_key(&p.pfn))
        .count();
    assert_eq!(
        sparse_data, 49,
        "{layout}: sparse file data pages in the map"
    );

    // The file deleted while held open keeps its page cache and its name, marked deleted.
    let held = oracle
        .files
        .iter()
        .find(|f| f.path.starts_with("/proc/"))
        .expect("deleted-but-open file");
    let run = map
        .runs
        .iter()
        .find(|r| r.ino == Some(held.ino))
        .expect("deleted file in the map");
    assert_eq!(
        run.path.as_deref(),
        Some("/special/delme (deleted)"),
        "{layout}"
    );

    // The partial last page (10000 bytes: page 2 holds 1808 of them, then zeros) is in
    // the map with 4 KiB blocks, where the disk block holds exactly the page.
    let tail = oracle
        .file("/mnt/special/tail")
        .expect("tail file in oracle");
    let last = tail
        .pages
        .iter()
        .find(|p| p.index == 2)
        .expect("last page of the tail file cached");
    let want_tail = !matches!(layout, "bs1k" | "bs2k");
    assert_eq!(
        in_map.contains_key(&last.pfn),
        want_tail,
        "{layout}: partial last page in the map"
    );

    // 6. The filesystem agrees: each run's first block belongs to the inode it names,
    //    at that file offset (debugfs bmap), for every file run.
    let img = format!(
        "{}?offset={}",
        g.path("disk.img").display(),
        part_start(layout)
    );
    let bs = match layout {
        "bs1k" => 1024,
        "bs2k" => 2048,
        _ => 4096,
    };
    let mut cmds = String::new();
    let mut expect = Vec::new();
    for r in map.runs.iter().filter(|r| r.ino.is_some()) {
        let (ino, off) = (r.ino.unwrap(), r.file_offset.unwrap());
        cmds += &format!("bmap <{ino}> {}\n", off / bs);
        expect.push((r.disk_offset - part_start(layout)) / bs);
    }
    let cmdfile = g.path("bmap.cmd");
    std::fs::write(&cmdfile, cmds).unwrap();
    let out = Command::new("debugfs")
        .arg("-f")
        .arg(&cmdfile)
        .arg(&img)
        .output()
        .unwrap();
    let got: Vec<u64> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter(|l| !l.starts_with("debugfs"))
        .filter_map(|l| l.trim().parse().ok())
        .collect();
    assert_eq!(
        got.len(),
        expect.len(),
        "{layout}: debugfs answered {} of {} bmaps",
        got.len(),
        expect.len()
    );
    assert_eq!(
        got, expect,
        "{layout}: the map disagrees with the filesystem's block map"
    );
    (g, map)
}

/// One kernel of the release matrix (Debian 11's 5.10, 13's 6.12), with the profile built
/// from its own vmlinux: every property of [`check_guest`] (disk bytes, cross-check, the
/// guest's own coverage, debugfs), and drgn's page set on the same ELF core.
fn check_kernel(flavour: &'static str, suite: &'static str) {
    let mut spec = GuestSpec::new("apache").layout("mini", "plain");
    spec.flavour = flavour;
    spec.suite = Some(suite);
    let p = profile_of(&spec);
    let (g, _) = check_guest(spec);
    let core = g.path("core.elf");
    g.dump_elf(&core, false);
    let vmlinux = kernel_dir_of(flavour, suite)
        .expect("the lab kernel")
        .join("vmlinux");
    let drgn = drgn_page_frames(&core, &vmlinux);
    let ours = pct_page_frames(&mem_of(&g), &p);
    let common = drgn.intersection(&ours).count();
    let union = drgn.union(&ours).count();
    eprintln!(
        "Debian {suite} {flavour}: drgn {} page frames on vda, pct {}, {common} in common; \
         only drgn: {:?}; only pct: {:?}",
        drgn.len(),
        ours.len(),
        drgn.difference(&ours).take(8).collect::<Vec<_>>(),
        ours.difference(&drgn).take(8).collect::<Vec<_>>(),
    );
    assert!(drgn.len() > 9000, "drgn found {} page frames", drgn.len());
    assert!(
        common as f64 >= 0.99 * union as f64,
        "pct and drgn agree on {common} of {union} page frames"
    );
    assert_eq!(
        common,
        ours.len(),
        "pct found page frames drgn does not know"
    );
}

/// A guest with 2 vCPUs (parallel host threads under TCG): per-CPU page lists and
/// counters, the same map properties.
#[test]
fn two_vcpus() {
    check_guest(GuestSpec::new("apache").layout("mini", "plain").smp(2));
}

#[test]
fn debian11_kernel() {
    check_kernel("cloud-amd64", "bullseye");
}

/// Debian 11's 5.10 places a partition through `bd_part->start_sect` (the `hd_struct`),
/// not `bd_start_sect`: the partitioned layout (partition at sector 63) on that kernel.
#[test]
fn debian11_partitioned() {
    let mut spec = GuestSpec::new("apache").layout("mini", "part");
    spec.suite = Some("bullseye");
    let p = profile_of(&spec);
    assert!(
        p.offset("block_device", "bd_start_sect").is_none()
            && p.offset("block_device", "bd_part").is_some(),
        "5.10 has bd_part and no bd_start_sect"
    );
    check_guest(spec);
}

#[test]
fn debian13_kernel() {
    check_kernel("cloud-amd64", "trixie");
}

/// Debian 13's `amd64` flavour: ext4 is a module, its types from ext4.ko's debug info.
#[test]
fn debian13_amd64_kernel() {
    check_kernel("amd64", "trixie");
}

/// drgn's page frames of the page cache on `vda` (files and the block device), walked with
/// its own helpers on an ELF core (tools/drgn-pagecache.py).
fn drgn_page_frames(core: &std::path::Path, vmlinux: &std::path::Path) -> BTreeSet<u64> {
    let mut drgn = Command::new("python3");
    drgn.arg(repo().join("tools/drgn-pagecache.py"))
        .arg(core)
        .arg(vmlinux)
        .arg("vda");
    let out = run_ok(&mut drgn, "drgn failed");
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| l.split_whitespace().nth(2)?.parse().ok())
        .collect()
}

/// pct's page frames of the page cache on `vda`, in any state.
fn pct_page_frames(mem: &GuestMemory, p: &Profile) -> BTreeSet<u64> {
    let k = Kernel::locate(mem, p).expect("locate the kernel");
    let walk = pct::walk::fs::walk_page_cache(&k).expect("walk the page cache");
    let vda = walk
        .super_blocks
        .iter()
        .position(|s| s.id == "vda")
        .expect("vda mounted");
    walk.inodes
        .iter()
        .filter(|i| i.sb == vda)
        .flat_map(|i| i.pages.iter().map(|p| p.pfn))
        .collect()
}

#[test]
fn layout_plain() {
    check_layout("plain")
}
#[test]
fn layout_partitioned() {
    check_layout("part")
}
#[test]
fn layout_1k_blocks() {
    check_layout("bs1k")
}
#[test]
fn layout_2k_blocks() {
    check_layout("bs2k")
}
#[test]
fn layout_no_extents() {
    check_layout("noextent")
}

/// The ext4-as-a-module flavour (types from ext4.ko's debug info, addresses in module
/// space) and a guest running 5-level paging (`-cpu max,la57=on`).
#[test]
fn amd64_flavour_and_five_level_paging() {
    let mut amd64 = GuestSpec::new("apache").layout("mini", "plain");
    amd64.flavour = "amd64";
    let mut la57 = GuestSpec::new("apache").layout("mini", "plain");
    la57.cpu = Some("max,la57=on");
    for (spec, levels) in [(amd64, 4), (la57, 5)] {
        let label = format!("{}/{:?}", spec.flavour, spec.cpu);
        let p = lab_profile(spec.flavour).1;
        let mut g = Guest::start(spec);
        g.wait_ready();
        g.stop();
        let mem = mem_of(&g);
        let k = Kernel::locate(&mem, &p).expect("locate");
        assert_eq!(k.loc.levels, levels, "{label}: paging levels");
        let disk = pct::disk::Disk::open(g.path("disk.img"), pct::disk::DiskFormat::Raw).unwrap();
        let opts = ScanOptions {
            cross_check: true,
            verify: true,
            free_pages: false,
        };
        let (map, report) = scan(&mem, &p, Some(&disk), opts).expect("scan");
        let v = report.verify.unwrap();
        eprintln!("{label}: {} restorable, verify {v:?}", map.bytes());
        assert!(
            map.bytes() > 128 * 300 * 1024,
            "{label}: the web files are not in the map"
        );
        assert_eq!((v.mismatching_pages, v.unreadable_runs), (0, 0), "{label}");
        assert!(report.cross_check.unwrap().agrees(), "{label}");
    }
}

/// A QEMU without a shared RAM file: `--qmp` reads guest RAM through /proc/PID/mem, only
/// the pages the walk needs (and `--verify` compares): pct's own memory stays far below
/// the guest's 1 GiB.
#[test]
fn live_qemu_with_anonymous_ram() {
    let mut spec = GuestSpec::new("apache").layout("mini", "plain");
    spec.anon_ram = true;
    let mut g = Guest::start(spec);
    g.wait_ready();
    let bin = env!("CARGO_BIN_EXE_pct-introspect");
    let out = Command::new(bin)
        .args(["scan", "--format", "json", "--verify"])
        .arg("--qmp")
        .arg(g.path("qmp-pct.sock"))
        .arg("--disk")
        .arg(g.path("disk.img"))
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    // The guest runs during the walk: a page written meanwhile may mismatch (exit 2),
    // but the scan must work and nearly everything must match.
    assert!(out.status.code().is_some_and(|c| c == 0 || c == 2), "{err}");
    let json: serde_json::Value = serde_json::from_slice(&out.stdout).expect("JSON report");
    assert!(
        json["source"].as_str().unwrap_or("").contains("/proc/"),
        "{}",
        json["source"]
    );
    let matching = json["verify"]["matching_pages"].as_u64().unwrap();
    let mismatching = json["verify"]["mismatching_pages"].as_u64().unwrap();
    let rss_anon = json["rss_anon_kib"].as_u64().expect("rss_anon_kib") << 10;
    eprintln!(
        "anonymous RAM: {matching} pages match, {mismatching} mismatch; pct's anonymous \
         memory {:.1} MB",
        rss_anon as f64 / 1e6
    );
    assert!(rss_anon < 128 << 20, "pct held {rss_anon} bytes");
    assert!(matching >= 128 * 75, "{matching} pages match");
    assert!(
        mismatching * 100 <= matching,
        "{mismatching} mismatching pages"
    );
    g.stop();
}

/// Without VMCOREINFO (older kernels), the banner and init_task find the same kernel.
#[test]
fn banner_fallback_finds_the_same_kernel() {
    let mut g = Guest::start(GuestSpec::new("idle").layout("mini", "plain"));
    g.wait_ready();
    g.stop();
    let p = profile();
    let mem = mem_of(&g);
    let a = Kernel::locate(&mem, &p).unwrap();
    let b = Kernel::locate_by_banner(&mem, &p).expect("banner fallback");
    assert_eq!(b.loc.method, pct::kernel::LocatedBy::BannerAndInitTask);
    assert_eq!(
        (
            a.loc.virt_offset,
            a.loc.phys_base,
            a.loc.page_offset_base,
            a.loc.vmemmap_base,
            a.loc.pgd
        ),
        (
            b.loc.virt_offset,
            b.loc.phys_base,
            b.loc.page_offset_base,
            b.loc.vmemmap_base,
            b.loc.pgd
        )
    );
}

/// The three memory sources give the same map: raw RAM file, ELF core, live QEMU (QMP).
/// And drgn, walking the same ELF core with its own helpers, finds the same page frames.
#[test]
fn sources_agree_and_drgn_agrees() {
    let (g, raw_map, report, _) = boot_and_scan(GuestSpec::new("apache").layout("mini", "plain"));
    let core = g.path("core.elf");
    g.dump_elf(&core, false);
    let p = profile();

    let disk = pct::disk::Disk::open(g.path("disk.img"), pct::disk::DiskFormat::Raw).unwrap();
    let elf = GuestMemory::open(&core).expect("open ELF core");
    assert!(
        elf.vmcoreinfo().is_some(),
        "the ELF core carries no VMCOREINFO"
    );
    let (elf_map, elf_report) =
        scan(&elf, &p, Some(&disk), ScanOptions::default()).expect("scan ELF core");
    assert_eq!(
        elf_report.kernel.located_by,
        pct::kernel::LocatedBy::VmcoreinfoNote
    );
    same_runs(&raw_map, &elf_map, "ELF core");

    let live = pct::qemu::ram::open_live(&g.path("qmp-pct.sock")).expect("map live QEMU RAM");
    let (live_map, _) =
        scan(&live, &p, Some(&disk), ScanOptions::default()).expect("scan live QEMU");
    same_runs(&raw_map, &live_map, "live QEMU");

    // A profile without ext4's private types (as imported Volatility 2 profiles are):
    // the block map then comes from the on-disk inodes, and must be the same.
    let mut no_ext4 = p.clone();
    no_ext4.types.remove("ext4_inode_info");
    let (ondisk_map, _) = scan(&mem_of(&g), &no_ext4, Some(&disk), ScanOptions::default())
        .expect("scan without ext4 types");
    same_runs(&raw_map, &ondisk_map, "on-disk inodes");

    // drgn (from PyPI) as the independent oracle.
    let vmlinux = kernel_dir("cloud-amd64")
        .expect("the lab kernel")
        .join("vmlinux");
    let drgn = drgn_page_frames(&core, &vmlinux);
    let ours = pct_page_frames(&mem_of(&g), &p);
    eprintln!(
        "drgn: {} page frames on vda, pct: {}",
        drgn.len(),
        ours.len()
    );
    assert!(drgn.len() > 9000);
    assert_eq!(drgn, ours, "pct and drgn find different page frames");

    // Free pages: pct's `PageBuddy` scan of the struct page array against drgn's walk of
    // the buddy allocator's own free lists, block by block, on the same ELF core.
    let mut drgn = Command::new("python3");
    drgn.arg(repo().join("tools/drgn-freepages.py"))
        .arg(&core)
        .arg(&vmlinux);
    let out = run_ok(&mut drgn, "drgn failed");
    let drgn: BTreeSet<(u64, u32)> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| {
            let mut f = l.split_whitespace();
            Some((f.next()?.parse().ok()?, f.next()?.parse().ok()?))
        })
        .collect();
    let k = Kernel::locate(&elf, &p).unwrap();
    let scan = pct::walk::page_scan::for_each_page(&k, &BTreeSet::new()).unwrap();
    let ours: BTreeSet<(u64, u32)> = scan.free.iter().map(|b| (b.pfn, b.order)).collect();
    let frames = |s: &BTreeSet<(u64, u32)>| s.iter().map(|&(_, o)| 1u64 << o).sum::<u64>();
    eprintln!(
        "free: drgn {} blocks ({} frames), pct {} blocks ({} frames, {} not zero)",
        drgn.len(),
        frames(&drgn),
        ours.len(),
        frames(&ours),
        report.census.as_ref().map_or(0, |c| c.free_not_zero)
    );
    // A 1 GiB guest after boot and a web fileset read has hundreds of MB free.
    assert!(frames(&drgn) > 20_000, "{} free frames", frames(&drgn));
    assert_eq!(drgn, ours, "pct and drgn find different free blocks");
    assert_eq!(scan.census.free, frames(&ours));
    // The lab kernel boots without init_on_free, and is built without page poisoning
    // (no `_page_poisoning_enabled`): free pages keep their stale bytes.
    let off = FreePageInit {
        init_on_free: Some(false),
        poisoning: Some(false),
    };
    assert_eq!(report.free_page_init, Some(off));
}

/// `init_on_free=1` on the guest's command line: pct reads the kernel's static key as on,
/// and the guest's free pages are indeed zero (the census reads every one of them).
#[test]
fn init_on_free_is_read_from_the_guest() {
    let spec = GuestSpec {
        append: Some("init_on_free=1"),
        ..GuestSpec::new("idle")
    };
    let (_g, _, report, _) = boot_and_scan(spec);
    let on = FreePageInit {
        init_on_free: Some(true),
        poisoning: Some(false),
    };
    assert_eq!(report.free_page_init, Some(on));
    let c = report.census.as_ref().expect("census");
    eprintln!(
        "init_on_free=1: {} free frames, {} not zero",
        c.free, c.free_not_zero
    );
    assert!(c.free > 100_000, "{} free frames", c.free);
    // Not zero only where the kernel wrote into a free page since (none, or very few).
    assert!(c.free_not_zero * 1000 < c.free, "{c:?}");
    let text = report.to_text();
    assert!(text.contains("init_on_free on"), "{text}");
}

fn mem_of(g: &Guest) -> GuestMemory {
    GuestMemory::open(&g.ram_path).expect("map guest RAM")
}

fn same_runs(a: &CacheMap, b: &CacheMap, what: &str) {
    let first = a.runs.iter().zip(&b.runs).position(|(x, y)| x != y);
    assert!(
        a.runs.len() == b.runs.len() && first.is_none(),
        "{what} and the raw RAM file give different maps: {} vs {} runs, first difference {:?} vs {:?}",
        a.runs.len(),
        b.runs.len(),
        first.map(|i| &a.runs[i]),
        first.map(|i| &b.runs[i]),
    );
}

/// The `pct-introspect scan` command: text and JSON reports, the JSON-lines map.
#[test]
fn scan_command_reports_and_writes_map() {
    let (g, map, _, _) = boot_and_scan(GuestSpec::new("apache").layout("mini", "plain"));
    let bin = env!("CARGO_BIN_EXE_pct-introspect");
    let mapfile = g.path("map.jsonl");
    let mut scan = Command::new(bin);
    scan.args(["scan", "--format", "json", "--verify", "--cross-check"])
        .arg("--memory")
        .arg(&g.ram_path)
        .arg("--disk")
        .arg(g.path("disk.img"))
        .arg("--map-out")
        .arg(&mapfile);
    let out = run_ok(&mut scan, "pct-introspect scan");
    let json: serde_json::Value = serde_json::from_slice(&out.stdout).expect("JSON report");
    assert_eq!(json["restorable_bytes"].as_u64(), Some(map.bytes()));
    assert_eq!(json["verify"]["mismatching_pages"].as_u64(), Some(0));
    let lines: Vec<serde_json::Value> = std::fs::read_to_string(&mapfile)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), map.runs.len());
    for (l, r) in lines.iter().zip(&map.runs) {
        assert_eq!(l["gpa"].as_u64(), Some(r.gpa));
        assert_eq!(l["disk_offset"].as_u64(), Some(r.disk_offset));
        assert_eq!(l["len"].as_u64(), Some(r.len));
        assert_eq!(l["ino"].as_u64(), r.ino);
        assert_eq!(l["file_offset"].as_u64(), r.file_offset);
    }
    // Without --profile the profile matching the image's build-id is picked from the
    // profiles directory ($PCT_PROFILES: here the lab's cache, not the shipped profiles).
    let (lab, _) = lab_profile("cloud-amd64");
    let out = Command::new(bin)
        .arg("scan")
        .arg("--memory")
        .arg(&g.ram_path)
        .env("PCT_PROFILES", lab.parent().expect("cache directory"))
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{err}");
    assert!(
        text.contains("restorable") && text.contains("Mbit/s"),
        "{text}"
    );
}

/// Hostile memory: random bytes, a wrong profile, corrupted kernel structures.
#[test]
fn hostile_memory() {
    let dir = tempfile::tempdir().unwrap();
    let p = profile();

    // Random bytes: a clear error, quickly.
    let rnd = dir.path().join("random.ram");
    let mut bytes = vec![0u8; 64 << 20];
    let mut x: u64 = 0x9e3779b97f4a7c15;
    for b in bytes.iter_mut() {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        *b = x as u8;
    }
    std::fs::write(&rnd, &bytes).unwrap();
    let mem = GuestMemory::open(&rnd).unwrap();
    let t = Instant::now();
    let e = scan(&mem, &p, None, ScanOptions::default()).expect_err("random bytes must not scan");
    assert!(e.to_string().contains("could not be found"), "{e}");
    assert!(t.elapsed() < Duration::from_secs(10));

    // A truncated file is refused with a reason.
    let trunc = dir.path().join("trunc.ram");
    std::fs::write(&trunc, &bytes[..4097]).unwrap();
    let e = GuestMemory::open(&trunc).err().expect("truncated");
    assert!(e.to_string().contains("truncated"), "{e}");

    // A real guest with the wrong profile (another flavour's kernel of the same version):
    // refused, naming both kernels (what the message suggests doing is not checked here).
    let (_, wrong) = lab_profile("amd64");
    let mut g = Guest::start(GuestSpec::new("idle").layout("mini", "plain"));
    g.wait_ready();
    g.stop();
    let ram = dir.path().join("guest.ram");
    g.copy_ram(&ram);
    drop(g);
    let mem = GuestMemory::open(&ram).unwrap();
    let e = scan(&mem, &wrong, None, ScanOptions::default()).expect_err("wrong profile");
    let msg = e.to_string();
    for part in [&wrong.kernel.release, &p.kernel.release, &p.kernel.build_id] {
        let part = part.as_deref().expect("the lab profiles name their kernel");
        assert!(msg.contains(part), "the error does not name {part}: {msg}");
    }

    // Corrupted structures: overwrite words of the inodes and page-cache nodes the walk
    // visits with garbage (self-pointers, huge values, random pointers) and rescan.
    let k = Kernel::locate(&mem, &p).unwrap();
    let walk = pct::walk::fs::walk_page_cache(&k).unwrap();
    let targets: Vec<u64> = walk
        .inodes
        .iter()
        .filter_map(|i| k.va_to_pa(i.va))
        .chain(walk.super_blocks.iter().filter_map(|s| k.va_to_pa(s.va)))
        .collect();
    drop(k);
    drop(mem);
    let base = std::fs::read(&ram).unwrap();
    for round in 0..40u64 {
        let mut img = base.clone();
        for (n, &pa) in targets.iter().enumerate() {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            if x % 3 != round % 3 {
                continue;
            }
            let off = (pa + (x >> 8) % 1024) as usize & !7;
            let word: u64 = match (x >> 20) % 4 {
                0 => pa + 0xffff_8880_0000_0000, // plausible direct-map self pointer
                1 => u64::MAX,
                2 => x,
                _ => n as u64,
            };
            if let Some(s) = img.get_mut(off..off + 8) {
                s.copy_from_slice(&word.to_le_bytes());
            }
        }
        let path = dir.path().join("corrupt.ram");
        std::fs::write(&path, &img).unwrap();
        let mem = GuestMemory::open(&path).unwrap();
        let t = Instant::now();
        let r = scan(
            &mem,
            &p,
            None,
            ScanOptions {
                cross_check: true,
                verify: false,
                free_pages: false,
            },
        );
        assert!(
            t.elapsed() < Duration::from_secs(20),
            "round {round}: took {:?}",
            t.elapsed()
        );
        if let Ok((map, _)) = r {
            // Whatever survives must still be a well-formed map.
            for w in map.runs.windows(2) {
                assert!(w[0].gpa + w[0].len <= w[1].gpa);
            }
        }
    }
}
