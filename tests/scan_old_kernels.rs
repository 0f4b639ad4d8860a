//! The whole scan path on kernels older than anything that can be booted here: synthetic
//! guests laid out by the imported Volatility 2 profiles (Debian 2.6.32, 3.2, 4.9) with
//! tests/support/oldguest.rs, whose page cache holds the real bytes of files of a real
//! ext4 image (mkfs.ext4 -d), scanned by the real CLI. debugfs, not pct, says where each
//! file block lies on the disk.

mod support;

use pct::kernel::{Kernel, LocatedBy, Location};
use pct::memory::GuestMemory;
use pct::profile::Profile;
use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use support::oldguest::{CachedPage, GuestFs, GuestInode, OldGuest, PageKind};
use support::{repo, rng, run_ok};

const PROFILES: [&str; 3] = ["debian-2.6.32.json", "debian-3.2.json", "debian-4.9.json"];

fn profile(name: &str) -> Profile {
    Profile::load(&repo().join("profiles").join(name)).unwrap()
}

/// One mapped page: (pfn, inode, file offset, disk offset).
type Mapped = (u64, u64, u64, u64);

/// A real ext4 image and what debugfs says of its files.
struct Disk {
    _dir: tempfile::TempDir,
    img: PathBuf,
    bytes: Vec<u8>,
    /// name → (inode number, size, physical block of each logical block).
    files: BTreeMap<&'static str, (u64, u64, Vec<u64>)>,
}

fn debugfs(img: &Path, req: &str) -> String {
    let out = run_ok(
        Command::new("debugfs").arg("-R").arg(req).arg(img),
        &format!("debugfs -R '{req}'"),
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn make_disk() -> Disk {
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("src");
    std::fs::create_dir(&src).unwrap();
    let mut r = rng(0x01d_4e7);
    let mut random = |n: usize| (0..n).map(|_| r() as u8).collect::<Vec<u8>>();
    let sizes = [("a.bin", 40960), ("c.bin", 300 * 1024), ("t.txt", 5000)];
    for (name, size) in sizes {
        std::fs::write(src.join(name), random(size)).unwrap();
    }
    let img = dir.path().join("disk.img");
    run_ok(
        Command::new("mkfs.ext4")
            .args(["-q", "-F", "-b", "4096", "-d"])
            .arg(&src)
            .arg(&img)
            .arg("16M"),
        "mkfs.ext4 -d",
    );
    let mut files = BTreeMap::new();
    for (name, size) in sizes {
        let stat = debugfs(&img, &format!("stat /{name}"));
        let ino: u64 = stat
            .split_whitespace()
            .skip_while(|w| *w != "Inode:")
            .nth(1)
            .and_then(|w| w.parse().ok())
            .unwrap_or_else(|| panic!("no inode number in debugfs stat: {stat}"));
        let blocks = (0..(size as u64).div_ceil(4096))
            .map(|l| {
                let b = debugfs(&img, &format!("bmap /{name} {l}"));
                b.trim()
                    .parse::<u64>()
                    .unwrap_or_else(|_| panic!("bmap: {b}"))
            })
            .collect();
        files.insert(name, (ino, size as u64, blocks));
    }
    let bytes = std::fs::read(&img).unwrap();
    Disk {
        _dir: dir,
        img,
        bytes,
        files,
    }
}

/// The page cache the guests hold: (file, index, state).
const CACHE: &[(&str, u64, PageKind)] = &[
    ("a.bin", 0, PageKind::Clean),
    ("a.bin", 1, PageKind::Clean),
    ("a.bin", 2, PageKind::Clean),
    ("a.bin", 3, PageKind::Dirty),
    ("a.bin", 4, PageKind::Writeback),
    ("a.bin", 5, PageKind::Locked),
    ("a.bin", 6, PageKind::NotUptodate),
    ("a.bin", 7, PageKind::Clean),
    ("a.bin", 9, PageKind::Clean),
    // Indices 64 and 70 need a two-level tree.
    ("c.bin", 0, PageKind::Clean),
    ("c.bin", 1, PageKind::Clean),
    ("c.bin", 64, PageKind::Clean),
    ("c.bin", 70, PageKind::Clean),
    // The page holding EOF: its disk block, zeros after the file's bytes.
    ("t.txt", 0, PageKind::Clean),
    ("t.txt", 1, PageKind::Clean),
];

/// A guest of `g`'s kernel caching [`CACHE`] of `disk`, plus a tmpfs page; its RAM file
/// and the pages a correct scan maps.
fn guest(g: &OldGuest, disk: &Disk, dir: &Path) -> (PathBuf, BTreeSet<Mapped>) {
    let mut expected = BTreeSet::new();
    let mut inodes: BTreeMap<&str, GuestInode> = BTreeMap::new();
    // Frames handed out downwards from 60 MiB, so RAM order is not file order.
    let mut next_pfn = (60 << 20) / 4096;
    for &(name, index, kind) in CACHE {
        let (ino, size, blocks) = &disk.files[name];
        let pblk = blocks[index as usize];
        let on_disk = &disk.bytes[(pblk * 4096) as usize..(pblk * 4096 + 4096) as usize];
        let bytes = match kind {
            PageKind::Clean => on_disk.to_vec(),
            PageKind::NotUptodate => vec![0; 4096],
            // Written in RAM, not yet on the disk.
            _ => on_disk.iter().map(|b| !b).collect(),
        };
        next_pfn -= 3;
        if kind == PageKind::Clean {
            expected.insert((next_pfn, *ino, index * 4096, pblk * 4096));
        }
        inodes
            .entry(name)
            .or_insert_with(|| GuestInode {
                ino: *ino,
                size: *size,
                mode: 0o100644,
                pages: Vec::new(),
            })
            .pages
            .push(CachedPage {
                index,
                pfn: next_pfn,
                kind,
                bytes,
            });
    }
    let tmpfs = GuestFs {
        fs_type: "tmpfs",
        id: "tmpfs",
        bdev: false,
        blocksize_bits: 12,
        inodes: vec![GuestInode {
            ino: 1234,
            size: 4096,
            mode: 0o100600,
            pages: vec![CachedPage {
                index: 0,
                pfn: next_pfn - 3,
                kind: PageKind::Shmem,
                bytes: vec![0x5a; 4096],
            }],
        }],
    };
    let ext4 = GuestFs {
        fs_type: "ext4",
        id: "vda",
        bdev: true,
        blocksize_bits: 12,
        inodes: inodes.into_values().collect(),
    };
    let ram = g.build(&[ext4, tmpfs]);
    let path = dir.join("ram");
    std::fs::write(&path, ram).unwrap();
    (path, expected)
}

fn scan(profile: &Path, mem: &Path, disk: &Path, extra: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_pct-introspect"))
        .arg("scan")
        .arg("--profile")
        .arg(profile)
        .arg("--memory")
        .arg(mem)
        .arg("--disk")
        .arg(disk)
        .arg("--verify")
        .args(extra)
        .output()
        .unwrap()
}

/// Runs the JSON scan with a map file: (report, mapped pages).
fn scan_json(profile: &Path, mem: &Path, disk: &Path) -> (serde_json::Value, BTreeSet<Mapped>) {
    let map = mem.with_extension("map.jsonl");
    let out = scan(
        profile,
        mem,
        disk,
        &[
            "--cross-check",
            "--format",
            "json",
            "--map-out",
            map.to_str().unwrap(),
        ],
    );
    assert!(
        out.status.success(),
        "scan with {}: {}",
        profile.display(),
        String::from_utf8_lossy(&out.stderr)
    );
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let mut pages = BTreeSet::new();
    for line in std::fs::read_to_string(&map).unwrap().lines() {
        let r: serde_json::Value = serde_json::from_str(line).unwrap();
        let n = |k: &str| r[k].as_u64().unwrap_or_else(|| panic!("{k} in {line}"));
        for i in 0..n("len") / 4096 {
            pages.insert((
                n("gpa") / 4096 + i,
                n("ino"),
                n("file_offset") + i * 4096,
                n("disk_offset") + i * 4096,
            ));
        }
    }
    (report, pages)
}

#[test]
fn old_kernels_map_exactly_their_clean_pages() {
    let disk = make_disk();
    for name in PROFILES {
        let p = profile(name);
        let dir = tempfile::tempdir().unwrap();
        let (mem, expected) = guest(&OldGuest::new(&p), &disk, dir.path());
        let path = repo().join("profiles").join(name);
        let (report, mapped) = scan_json(&path, &mem, &disk.img);
        assert_eq!(mapped, expected, "{name}: the map");
        let clean = CACHE.iter().filter(|c| c.2 == PageKind::Clean).count();
        assert_eq!(expected.len(), clean, "{name}");
        assert_eq!(
            report["kernel"]["located_by"], "vmcoreinfo_in_ram",
            "{name}"
        );
        assert_eq!(
            report["kernel"]["release"],
            p.kernel.release.as_deref().unwrap()
        );
        let v = &report["verify"];
        assert_eq!(v["matching_pages"], clean, "{name}: {v}");
        assert_eq!(v["mismatching_pages"], 0, "{name}: {v}");
        let by_state = &report["excluded"]["by_state"];
        for state in ["dirty", "writeback", "locked", "not_uptodate", "shmem"] {
            assert_eq!(by_state[state], 1, "{name}: {state} in {by_state}");
        }
        let cc = &report["cross_check"];
        assert_eq!(cc["tree_pages"], 16, "{name}: {cc}");
        assert_eq!(cc["only_in_tree"], 0, "{name}: {cc}");
        assert_eq!(cc["only_in_linear_scan"], 0, "{name}: {cc}");
        assert!(report.get("pageflag_overrides").is_none(), "{name}");
        // The text report of the same scan.
        let out = scan(&path, &mem, &disk.img, &[]);
        assert!(out.status.success(), "{name}");
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(
            text.contains(p.kernel.release.as_deref().unwrap()),
            "{text}"
        );
        eprintln!(
            "{name}: {} pages mapped and verified, {} runs",
            mapped.len(),
            report["runs"]
        );
    }
}

/// Writes `p` with `PG_head` set to `bit` (a wrong number) to `dir`.
fn with_wrong_head(p: &Profile, bit: i64, dir: &Path) -> PathBuf {
    let mut q = p.clone();
    q.enums
        .get_mut("pageflags")
        .unwrap()
        .values
        .insert("PG_head".into(), bit);
    let path = dir.join("wrong-head.json");
    std::fs::write(&path, q.to_json()).unwrap();
    path
}

/// 4.9 publishes NUMBER(PG_head_mask): a profile with a wrong PG_head (here PG_uptodate's
/// bit, which would make every cached page look like a large folio) is corrected by it,
/// and the report says so. 2.6.32 publishes no PG_head_mask: the same mistake leaves its
/// map empty, never wrong.
#[test]
fn vmcoreinfo_page_flags_override_the_profile() {
    let disk = make_disk();
    let dir = tempfile::tempdir().unwrap();
    let p = profile("debian-4.9.json");
    let uptodate = p.enum_value("pageflags", "PG_uptodate").unwrap();
    let (mem, expected) = guest(&OldGuest::new(&p), &disk, dir.path());
    let wrong = with_wrong_head(&p, uptodate, dir.path());
    let (report, mapped) = scan_json(&wrong, &mem, &disk.img);
    assert_eq!(mapped, expected);
    let o = &report["pageflag_overrides"];
    assert_eq!(
        o,
        &serde_json::json!([{"flag": "PG_head", "profile": uptodate, "vmcoreinfo": 14}]),
    );
    let text = String::from_utf8_lossy(&scan(&wrong, &mem, &disk.img, &[]).stdout).into_owned();
    assert!(
        text.contains("overrides the profile: PG_head 3 -> 14"),
        "{text}"
    );

    let dir = tempfile::tempdir().unwrap();
    let p = profile("debian-2.6.32.json");
    let (mem, _) = guest(&OldGuest::new(&p), &disk, dir.path());
    let wrong = with_wrong_head(&p, uptodate, dir.path());
    let (report, mapped) = scan_json(&wrong, &mem, &disk.img);
    assert!(mapped.is_empty(), "{mapped:?}");
    assert!(report.get("pageflag_overrides").is_none());
    // Every up-to-date page, the ext4 files' and the tmpfs page, now reads as the head of a
    // large folio whose tails do not bear it out: each is refused as inconsistent.
    let uptodate_pages = CACHE
        .iter()
        .filter(|c| c.2 != PageKind::NotUptodate)
        .count();
    assert_eq!(
        report["excluded"]["by_state"]["inconsistent"],
        uptodate_pages + 1,
        "{}",
        report["excluded"]
    );
}

/// Another old profile on the same image: a clear error, whether the note names another
/// release or (a rebuilt kernel) the same one; and forced past the checks onto the wrong
/// layout, the walk maps no page that is not one of the image's clean pages.
#[test]
fn another_old_profile_gives_an_error_never_wrong_pages() {
    let disk = make_disk();
    let p32 = profile("debian-2.6.32.json");
    let p3 = profile("debian-3.2.json");
    let dir = tempfile::tempdir().unwrap();
    let (mem, _) = guest(&OldGuest::new(&p32), &disk, dir.path());
    let path3 = repo().join("profiles/debian-3.2.json");
    let out = scan(&path3, &mem, &disk.img, &[]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("the profile is for 3.2.0-4-amd64 (build-id ?) but the memory image holds 2.6.32-5-amd64"),
        "{err}"
    );

    // The 2.6.32 layout behind a note that claims 3.2.0-4-amd64.
    let mut g = OldGuest::new(&p32);
    g.release = "3.2.0-4-amd64".into();
    let dir2 = tempfile::tempdir().unwrap();
    let (lying, _) = guest(&g, &disk, dir2.path());
    let out = scan(&path3, &lying, &disk.img, &[]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("another build of this release"), "{err}");

    // Past every check: each profile's walk over each other image.
    for (image_profile, walk_profile) in
        [(&p32, &p3), (&p3, &p32), (&profile("debian-4.9.json"), &p3)]
    {
        let g = OldGuest::new(image_profile);
        let dir = tempfile::tempdir().unwrap();
        let (mem_path, expected) = guest(&g, &disk, dir.path());
        let mem = GuestMemory::open(&mem_path).unwrap();
        let k = Kernel {
            mem: &mem,
            profile: walk_profile,
            loc: Location {
                method: LocatedBy::VmcoreinfoInRam,
                release: None,
                build_id: None,
                virt_offset: g.kernel_offset.unwrap_or(0),
                phys_base: g.phys_base,
                page_offset_base: g.pob,
                vmemmap_base: g.vmemmap,
                pgd: g.symbol_pa("init_top_pgt"),
                levels: 4,
            },
        };
        let disk_file = pct::disk::Disk::open(&disk.img, pct::disk::DiskFormat::Raw).unwrap();
        let mapped: BTreeSet<(u64, u64)> = match pct::walk::fs::walk_page_cache(&k) {
            Ok(walk) => pct::cachemap::build(&k, &walk, Some(&disk_file))
                .runs
                .iter()
                .flat_map(|r| {
                    (0..r.len / 4096).map(move |i| (r.gpa / 4096 + i, r.disk_offset + i * 4096))
                })
                .collect(),
            Err(_) => BTreeSet::new(),
        };
        let right: BTreeSet<(u64, u64)> = expected.iter().map(|m| (m.0, m.3)).collect();
        assert!(
            mapped.is_subset(&right),
            "wrong pages mapped with the wrong profile: {:?}",
            mapped.difference(&right).collect::<Vec<_>>()
        );
        eprintln!(
            "{} image, {} profile forced: {} pages mapped (all right ones)",
            image_profile.kernel.release.as_deref().unwrap(),
            walk_profile.kernel.release.as_deref().unwrap(),
            mapped.len()
        );
    }
}
