//! Large folios on a real guest: Debian 13's 6.12 kernel reads XFS files into large
//! folios (its ext4 does not make them), and a tmpfs mounted `huge=always` holds PMD-sized
//! shmem folios. The map must hold every page of the clean XFS folios, byte for byte as
//! on the disk, at the blocks XFS's own tools (xfs_db) give; the tmpfs folios must stay
//! out; the linear struct page scan must agree with the tree walk; and the guest's own
//! view (pagemap, kpageflags) must show the same folios at the same frames.

mod support;

use pct::introspect::{scan, ScanOptions};
use pct::kernel::Kernel;
use pct::memory::GuestMemory;
use pct::walk::page::PageState;
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::process::Command;
use support::lab::{Guest, GuestSpec};
use support::profile::kernel_dir_of;
use support::run_ok;

/// /proc/kpageflags bits of compound pages (include/uapi/linux/kernel-page-flags.h).
const KPF_COMPOUND_HEAD: u64 = 1 << 15;
const KPF_COMPOUND_TAIL: u64 = 1 << 16;

/// Partition 2 (XFS) of the xfs layout: sfdisk's view of the disk.
fn partition(disk: &std::path::Path, n: usize) -> (u64, u64) {
    let out = run_ok(Command::new("sfdisk").arg("-d").arg(disk), "sfdisk -d");
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let line = text
        .lines()
        .find(|l| {
            l.split(':')
                .next()
                .unwrap()
                .trim()
                .ends_with(&format!("img{n}"))
        })
        .unwrap_or_else(|| panic!("no partition {n} in {text}"));
    let num = |key: &str| -> u64 {
        let v = line.split(key).nth(1).unwrap();
        v.trim_start_matches(['=', ' '])
            .split(',')
            .next()
            .unwrap()
            .trim()
            .parse()
            .unwrap()
    };
    (num("start"), num("size"))
}

/// `xfs_db` on the XFS image `img`: `(startoff, fsblock AG, AG block, count, flag)` of
/// each data-fork extent of inode `ino`.
fn xfs_db_bmap(img: &std::path::Path, ino: u64) -> Vec<(u64, u64, u64, u64, u64)> {
    let out = run_ok(
        Command::new("xfs_db")
            .args(["-r", "-c", &format!("inode {ino}"), "-c", "bmap"])
            .arg(img),
        "xfs_db bmap",
    );
    // "data offset 0 startblock 32792 (1/24) count 1024 flag 0"
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| {
            let w: Vec<&str> = l.split_whitespace().collect();
            if w.first() != Some(&"data") {
                return None;
            }
            let (ag, agbno) = w[5].trim_matches(['(', ')']).split_once('/')?;
            Some((
                w[2].parse().ok()?,
                ag.parse().ok()?,
                agbno.parse().ok()?,
                w[7].parse().ok()?,
                w[9].parse().ok()?,
            ))
        })
        .collect()
}

fn xfs_db_sb(img: &std::path::Path, field: &str) -> u64 {
    let out = run_ok(
        Command::new("xfs_db")
            .args(["-r", "-c", "sb 0", "-c", &format!("p {field}")])
            .arg(img),
        "xfs_db sb",
    );
    let text = String::from_utf8_lossy(&out.stdout);
    text.split('=').nth(1).unwrap().trim().parse().unwrap()
}

/// The 6.12 guest kernel's profile, built here from its vmlinux with this tree's manifest
/// (the shared profile cache is keyed by build-id only, and may hold one built from an
/// older manifest without the folio fields this test is about).
fn profile_612() -> pct::profile::Profile {
    let kdir = kernel_dir_of("cloud-amd64", "trixie").expect("the trixie kernel");
    let opts = pct::profile::BuildOptions {
        modules: Vec::new(),
        method: pct::profile::DebugFormat::Auto,
    };
    let p = pct::profile::build_profile(&kdir.join("vmlinux"), &opts).expect("profile");
    // The folio's size has three witnesses besides the tree here: the tail pages, the
    // order (low byte of folio._flags_1 from 6.6) and folio._folio_nr_pages.
    for f in ["_flags_1", "_folio_nr_pages"] {
        assert!(
            p.offset("folio", f).is_some(),
            "the 6.12 profile lacks folio.{f}"
        );
    }
    p
}

#[test]
fn xfs_large_folios_are_mapped_and_huge_tmpfs_is_not() {
    let profile = profile_612();
    let spec = GuestSpec {
        suite: Some("trixie"),
        ..GuestSpec::new("apache").layout("mini", "xfs")
    };
    let mut g = Guest::start(spec);
    g.wait_ready();
    assert!(
        g.serial_log().contains("PCT-XFS /dev/vda2"),
        "the guest did not mount its XFS partition\n{}",
        g.log_tail()
    );
    let oracle = g.oracle();
    g.stop();
    let mem = GuestMemory::open(&g.ram_path).expect("map guest RAM");
    let disk_path = g.path("disk.img");
    let disk = pct::disk::Disk::open(&disk_path, pct::disk::DiskFormat::Raw).unwrap();
    let opts = ScanOptions {
        cross_check: true,
        verify: true,
        free_pages: false,
    };
    let (map, report) = scan(&mem, &profile, Some(&disk), opts).expect("scan");
    eprintln!("large folios: {:?}", report.large_folios);
    eprintln!("excluded: {:?}", report.excluded);

    // 1. Every run byte-matches the disk; the linear scan agrees with the tree walk.
    let v = report.verify.as_ref().unwrap();
    eprintln!("verify: {v:?}");
    assert!(v.matching_pages > 0);
    assert_eq!((v.mismatching_pages, v.unreadable_runs), (0, 0), "{v:?}");
    let cc = report.cross_check.as_ref().unwrap();
    eprintln!("cross-check: {cc:?}");
    assert!(cc.agrees(), "cross-check disagrees: {cc:?}");
    assert!(
        report.problems.is_empty(),
        "walk problems: {:?}",
        report.problems
    );
    assert!(
        report.excluded.failed_inodes.is_empty(),
        "{:?}",
        report.excluded
    );

    // 2. The walk's large folios: on XFS (clean, order >= 2) and on the huge tmpfs.
    let k = Kernel::locate(&mem, &profile).unwrap();
    let walk = pct::walk::fs::walk_page_cache(&k).unwrap();
    let sb_of = |ty: &str, id: Option<&str>| {
        walk.super_blocks
            .iter()
            .position(|s| s.fs_type == ty && id.is_none_or(|i| s.id == i))
            .unwrap_or_else(|| panic!("no {ty} super_block"))
    };
    let xfs = sb_of("xfs", Some("vda2"));
    let in_map: HashMap<u64, (Option<u64>, Option<u64>, u64)> = map
        .runs
        .iter()
        .flat_map(|r| {
            (0..r.len / 4096).map(move |i| {
                (
                    r.gpa / 4096 + i,
                    (
                        r.ino,
                        r.file_offset.map(|o| o + i * 4096),
                        r.disk_offset + i * 4096,
                    ),
                )
            })
        })
        .collect();
    let mut xfs_folios: BTreeMap<u8, u64> = BTreeMap::new();
    let mut xfs_heads = BTreeSet::new();
    let (mut folio_pages, mut folio_pages_mapped) = (0u64, 0u64);
    let mut shmem_folios: BTreeMap<u8, u64> = BTreeMap::new();
    let mut shmem_pfns = BTreeSet::new();
    for ic in &walk.inodes {
        for p in ic.pages.iter().filter(|p| p.order > 0) {
            let head = p.index % (1 << p.order) == 0;
            if ic.sb == xfs && !ic.is_bdev {
                assert_eq!(p.state, PageState::Clean, "XFS folio page {p:?}");
                if head {
                    *xfs_folios.entry(p.order).or_default() += 1;
                    xfs_heads.insert(p.pfn);
                }
                folio_pages += 1;
                if in_map.get(&p.pfn).map(|m| (m.0, m.1))
                    == Some((Some(ic.ino), Some(p.index * 4096)))
                {
                    folio_pages_mapped += 1;
                }
            }
            if p.state == PageState::Shmem {
                shmem_pfns.insert(p.pfn);
                if head {
                    *shmem_folios.entry(p.order).or_default() += 1;
                }
            }
        }
    }
    eprintln!(
        "XFS large folios by order {xfs_folios:?}: {folio_pages} pages, {folio_pages_mapped} \
         in the map; shmem large folios by order {shmem_folios:?}"
    );
    let big: u64 = xfs_folios.range(2..).map(|(_, n)| n).sum();
    assert!(
        big >= 16,
        "too few XFS folios of order >= 2: {xfs_folios:?}"
    );
    // Every page of every clean XFS folio is in the map, at its file offset (the files
    // are contiguous on the disk, written by mkfs.xfs).
    assert_eq!(
        folio_pages_mapped, folio_pages,
        "XFS folio pages in the map"
    );
    // Runs span folios: a run longer than any one folio of the order the walk saw most.
    let xfs_runs: Vec<_> = map.runs.iter().filter(|r| r.dev == "vda2").collect();
    let longest = xfs_runs.iter().map(|r| r.len).max().unwrap_or(0);
    assert!(longest >= 64 * 4096, "longest XFS run {longest} bytes");
    // The huge tmpfs: PMD-sized folios, none of their pages in the map.
    assert!(
        shmem_folios.get(&9).copied().unwrap_or(0) >= 2,
        "no PMD-sized shmem folios: {shmem_folios:?}"
    );
    assert!(shmem_pfns.iter().all(|pfn| !in_map.contains_key(pfn)));

    // 3. The guest's own view: the XFS files' pages at the same frames, its compound
    //    heads exactly the walk's folio heads; the huge tmpfs file not in the map.
    let mut oracle_heads = BTreeSet::new();
    let mut oracle_pages = 0;
    for f in oracle.files.iter().filter(|f| f.path.starts_with("/xfs/")) {
        for p in &f.pages {
            oracle_pages += 1;
            assert_eq!(
                in_map.get(&p.pfn).map(|m| (m.0, m.1)),
                Some((Some(f.ino), Some(p.index * 4096))),
                "{} page {} (frame {:#x}) is not in the map where the guest has it",
                f.path,
                p.index,
                p.pfn
            );
            if p.flags & KPF_COMPOUND_HEAD != 0 {
                oracle_heads.insert(p.pfn);
            }
        }
    }
    eprintln!(
        "guest: {oracle_pages} XFS pages, {} compound heads",
        oracle_heads.len()
    );
    assert_eq!(
        oracle_heads, xfs_heads,
        "compound heads: the guest and pct differ"
    );
    let fill = oracle
        .file("/hugetmp/fill")
        .expect("/hugetmp/fill in the oracle");
    assert_eq!(
        fill.pages.len(),
        4096,
        "the huge tmpfs file is not all resident"
    );
    assert!(fill.pages.iter().all(|p| !in_map.contains_key(&p.pfn)));
    let in_huge = fill
        .pages
        .iter()
        .filter(|p| {
            shmem_pfns.contains(&p.pfn) && p.flags & (KPF_COMPOUND_HEAD | KPF_COMPOUND_TAIL) != 0
        })
        .count();
    assert!(
        in_huge >= 1024,
        "{in_huge} pages of /hugetmp/fill in large shmem folios"
    );

    // 4. XFS's own block map (xfs_db on a copy of the partition) agrees with every run.
    let (start, size) = partition(&disk_path, 2);
    assert_eq!(walk.super_blocks[xfs].part_start, start * 512);
    let img = g.path("xfs.img");
    run_ok(
        Command::new("dd")
            .arg(format!("if={}", disk_path.display()))
            .arg(format!("of={}", img.display()))
            .args(["bs=512", &format!("skip={start}"), &format!("count={size}")])
            .args(["conv=sparse", "status=none"]),
        "dd the XFS partition",
    );
    let agblocks = xfs_db_sb(&img, "agblocks");
    let mut bmaps = HashMap::new();
    let mut checked = 0;
    for r in &xfs_runs {
        let ino = r.ino.expect("XFS runs are file runs");
        let ext = bmaps.entry(ino).or_insert_with(|| xfs_db_bmap(&img, ino));
        for i in 0..r.len / 4096 {
            let blk = (r.file_offset.unwrap() / 4096) + i;
            let e = ext
                .iter()
                .find(|e| e.0 <= blk && blk < e.0 + e.3)
                .unwrap_or_else(|| panic!("inode {ino} block {blk}: no extent in {ext:?}"));
            assert_eq!(e.4, 0, "inode {ino} block {blk} is in an unwritten extent");
            let disk_block = e.1 * agblocks + e.2 + (blk - e.0);
            assert_eq!(
                r.disk_offset + i * 4096,
                start * 512 + disk_block * 4096,
                "inode {ino} block {blk}: pct and xfs_db disagree"
            );
            checked += 1;
        }
    }
    eprintln!(
        "xfs_db agrees on {checked} pages of {} XFS runs",
        xfs_runs.len()
    );
    assert!(checked as u64 >= folio_pages);

    // 5. The ext4 partition next to it is mapped as before.
    let ext4 = sb_of("ext4", Some("vda1"));
    let ext4_bytes: u64 = map
        .runs
        .iter()
        .filter(|r| r.dev == "vda1")
        .map(|r| r.len)
        .sum();
    eprintln!("ext4 on vda1: {ext4_bytes} bytes in the map");
    assert_eq!(walk.super_blocks[ext4].part_start, 2048 * 512);
    assert!(ext4_bytes >= 128 * 300 * 1024, "{ext4_bytes}");

    // 6. Hostile memory: one tail page of an XFS folio names another head, and another
    //    folio's order byte (folio._flags_1) says one order more. Both folios are refused
    //    (their heads marked inconsistent, problems named), none of their pages map,
    //    every other page still does, and the cross-check sees the tails left out.
    let mut heads = walk
        .inodes
        .iter()
        .filter(|ic| ic.sb == xfs)
        .flat_map(|ic| ic.pages.iter().copied())
        .filter(|p| p.order >= 3 && p.index % (1 << p.order) == 0);
    let (victim, victim2) = (heads.next().unwrap(), heads.next().unwrap());
    let pages = pct::walk::page::Pages::new(&k).unwrap();
    let order_off = pages.folio.order.expect("the profile places the order");
    let ch_off = profile.offset("page", "compound_head").unwrap();
    let pa = |va: u64| k.va_to_pa(va).expect("struct page in guest memory");
    let patches = [
        (
            pa(pages.pfn_to_page(victim.pfn + 1) + ch_off),
            (pages.pfn_to_page(victim.pfn + 64) | 1)
                .to_le_bytes()
                .to_vec(),
        ),
        (
            pa(pages.pfn_to_page(victim2.pfn) + order_off),
            vec![victim2.order + 1],
        ),
    ];
    drop(k);
    let bad = g.path("corrupt.ram");
    std::fs::copy(&g.ram_path, &bad).unwrap();
    {
        use std::os::unix::fs::FileExt;
        let f = std::fs::OpenOptions::new().write(true).open(&bad).unwrap();
        for (at, bytes) in &patches {
            f.write_all_at(bytes, *at).unwrap();
        }
    }
    let bad_mem = GuestMemory::open(&bad).unwrap();
    let (bad_map, bad_report) = scan(&bad_mem, &profile, Some(&disk), opts).expect("scan");
    let bad_in_map: BTreeSet<u64> = bad_map
        .runs
        .iter()
        .flat_map(|r| (0..r.len / 4096).map(move |i| r.gpa / 4096 + i))
        .collect();
    eprintln!(
        "corrupted a tail of the folio at frame {:#x} and the order of the one at {:#x}: \
         problems {:?}",
        victim.pfn, victim2.pfn, bad_report.problems
    );
    let mut gone = 0;
    for v in [victim, victim2] {
        let n = 1u64 << v.order;
        assert!((v.pfn..v.pfn + n).all(|pfn| !bad_in_map.contains(&pfn)));
        let named = format!("folio at index {}, frame {:#x}", v.index, v.pfn);
        assert!(
            bad_report.problems.iter().any(|p| p.contains(&named)),
            "{named} not among the problems"
        );
        gone += n;
    }
    assert_eq!(bad_in_map.len() as u64, in_map.len() as u64 - gone);
    let bad_v = bad_report.verify.as_ref().unwrap();
    assert_eq!((bad_v.mismatching_pages, bad_v.unreadable_runs), (0, 0));
    assert!(!bad_report.cross_check.as_ref().unwrap().agrees());
    std::fs::remove_file(&bad).unwrap();
}
