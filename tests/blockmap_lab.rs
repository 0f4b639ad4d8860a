//! blockmap against real ext4 images from the lab (tools/lab/build-disk.sh), with
//! debugfs as the independent oracle: for every layout (4 KiB / 1 KiB / 2 KiB blocks,
//! partitioned, block-mapped) every page's mapping is checked against `debugfs bmap` for
//! each of its blocks and its disk bytes against `debugfs cat`.

mod support;

use pct::blockmap::extent::Ext4ExtentHeader;
use pct::blockmap::inode::EXT4_EXTENTS_FL;
use pct::blockmap::{
    BlockMapper, Ext4Volume, MapKind, MapOptions, PageMapper, PageState, Unrestorable, PAGE_SIZE,
};
use std::path::Path;
use support::blockmap::*;

const SPECIALS: [&str; 5] = [
    "/special/sparse",
    "/special/frag",
    "/special/delme",
    "/special/totmpfs",
    "/SHA256SUMS",
];

fn files() -> Vec<String> {
    let mut v: Vec<String> = ["000", "001", "002", "063", "127"]
        .iter()
        .map(|n| format!("/www/file{n}.bin"))
        .collect();
    v.extend(SPECIALS.iter().map(|s| s.to_string()));
    v
}

/// What the page should be, from debugfs's block map of the file.
fn expected(vol: &Ext4Volume, size: u64, oracle: &[u64], page: u64) -> PageState {
    let start = page * PAGE_SIZE;
    if start >= size {
        return PageState::Unrestorable(Unrestorable::BeyondEof);
    }
    if size - start < PAGE_SIZE {
        return PageState::Unrestorable(Unrestorable::PartialEof);
    }
    let bs = u64::from(vol.block_size);
    let blocks = &oracle[(start / bs) as usize..((start + PAGE_SIZE) / bs) as usize];
    if blocks.contains(&0) {
        return PageState::Unrestorable(Unrestorable::Hole);
    }
    if blocks.windows(2).any(|w| w[1] != w[0] + 1) {
        return PageState::Unrestorable(Unrestorable::Discontiguous);
    }
    PageState::Restorable {
        disk_offset: vol.partition_start + blocks[0] * bs,
    }
}

struct Tally {
    restorable: u64,
    discontiguous: u64,
    holes: u64,
}

fn check_file(img: &Path, vol: &Ext4Volume, path: &str, tally: &mut Tally) {
    let fs = open_fs(img);
    let inode = fs.inode_at(path).expect("inode").as_ext4_inode();
    let content = cat(img, path);
    assert_eq!(
        content.len() as u64,
        inode.i_size,
        "{path}: i_size vs debugfs cat"
    );
    let bs = u64::from(vol.block_size);
    let nblk = inode.i_size.div_ceil(bs);
    let lblks: Vec<u64> = (0..nblk).collect();
    let oracle = bmap(img, path, &lblks);

    // Block level: every logical block as debugfs maps it.
    let mut bm = BlockMapper::new(vol, &inode, fs.source()).expect("block mapper");
    for (&l, &want) in lblks.iter().zip(&oracle) {
        let got = bm.map(l).expect("map block");
        assert!(got.contains(l) && got.len >= 1);
        assert_eq!(got.pblk_of(l).unwrap_or(0), want, "{path}: lblk {l}");
    }

    // Page level: every page, plus two past EOF.
    let npages = inode.i_size.div_ceil(PAGE_SIZE) + 2;
    let mut pm = PageMapper::new(vol, &inode, fs.source(), MapOptions::default()).expect("mapper");
    for p in 0..npages {
        let got = pm.page(p).expect("map page");
        assert_eq!(
            got,
            expected(vol, inode.i_size, &oracle, p),
            "{path}: page {p}"
        );
        match got {
            PageState::Restorable { disk_offset } => {
                let at = (p * PAGE_SIZE) as usize;
                let disk = disk_bytes(img, disk_offset, PAGE_SIZE as usize);
                assert!(
                    disk == content[at..at + 4096],
                    "{path}: page {p} bytes differ"
                );
                tally.restorable += 1;
            }
            PageState::Unrestorable(Unrestorable::Discontiguous) => tally.discontiguous += 1,
            PageState::Unrestorable(Unrestorable::Hole) => {
                let at = (p * PAGE_SIZE) as usize;
                assert!(
                    content[at..at + 4096].iter().all(|&b| b == 0),
                    "{path}: hole page {p} not zeros"
                );
                tally.holes += 1;
            }
            _ => {}
        }
    }

    // The run form agrees with the page form, and its reads are bounded by the tree.
    let mut pm = PageMapper::new(vol, &inode, fs.source(), MapOptions::default()).expect("mapper");
    let map = pm.map_pages(0..npages).expect("map_pages");
    let mut n = 0;
    for r in &map.runs {
        for i in 0..r.pages {
            let want = expected(vol, inode.i_size, &oracle, r.page + i);
            let disk_offset = r.disk_offset + i * PAGE_SIZE;
            assert_eq!(
                want,
                PageState::Restorable { disk_offset },
                "{path}: run {r:?}"
            );
            n += 1;
        }
    }
    assert_eq!(n + map.unrestorable.len() as u64, npages);
    for w in map.runs.windows(2) {
        assert!(
            w[1].page != w[0].page + w[0].pages
                || w[1].disk_offset != w[0].disk_offset + w[0].bytes(),
            "{path}: adjacent runs not joined"
        );
    }
    let meta_blocks = nblk.div_ceil(bs / 4) + 4; // generous: indirect blocks of the file
    assert!(
        u64::from(map.block_reads) <= meta_blocks,
        "{path}: {} reads",
        map.block_reads
    );
}

fn check_layout(layout: &str) {
    let img = image("mini", layout);
    let fs = open_fs(&img);
    let vol = fs.volume();
    let want_bs = match layout {
        "bs1k" => 1024,
        "bs2k" => 2048,
        _ => 4096,
    };
    assert_eq!(vol.block_size, want_bs);
    assert_eq!(
        vol.partition_start,
        if layout == "part" { 63 * 512 } else { 0 }
    );
    let mut t = Tally {
        restorable: 0,
        discontiguous: 0,
        holes: 0,
    };
    for f in files() {
        check_file(&img, &vol, &f, &mut t);
    }
    eprintln!(
        "{layout}: {} restorable, {} discontiguous, {} hole pages",
        t.restorable, t.discontiguous, t.holes
    );
    assert!(t.restorable > 5 * 75, "{layout}: the www files map");
    // sparse has 112 + 351 hole pages of 4 KiB.
    assert!(t.holes >= 463, "{layout}: sparse holes");
    if want_bs < 4096 {
        assert!(
            t.discontiguous > 0,
            "{layout}: frag's blocks interleave with fillers"
        );
    }
}

#[test]
fn plain() {
    check_layout("plain");
}

#[test]
fn part() {
    check_layout("part");
}

#[test]
fn bs1k() {
    check_layout("bs1k");
}

#[test]
fn bs2k() {
    check_layout("bs2k");
}

#[test]
fn noextent() {
    check_layout("noextent");
}

/// /special/frag has an extent tree of depth >= 1 in every extent layout, and mapping
/// the whole file reads each tree block once, not once per page.
#[test]
fn frag_index_tree() {
    for layout in ["plain", "part", "bs1k", "bs2k"] {
        let img = image("mini", layout);
        let fs = open_fs(&img);
        let inode = fs.inode_at("/special/frag").expect("frag").as_ext4_inode();
        assert!(inode.has_flag(EXT4_EXTENTS_FL));
        let h = Ext4ExtentHeader::parse(&inode.i_block).expect("header");
        assert!(h.eh_depth >= 1, "{layout}: frag depth {}", h.eh_depth);
        let npages = inode.i_size / PAGE_SIZE;
        let mut pm = PageMapper::new(&fs.volume(), &inode, fs.source(), MapOptions::default())
            .expect("mapper");
        let map = pm.map_pages(0..npages).expect("map");
        // One leaf per root index entry at most (depth 1): eh_entries reads.
        assert!(map.block_reads >= 1 && u32::from(h.eh_entries) >= map.block_reads);
        eprintln!(
            "{layout}: frag depth {} entries {}: {} reads for {npages} pages, {} runs, {} unrestorable",
            h.eh_depth,
            h.eh_entries,
            map.block_reads,
            map.runs.len(),
            map.unrestorable.len()
        );
    }
}

/// /special/sparse: data, hole, data, hole, one block (pages 0..16, 128..160, 511).
#[test]
fn sparse_holes() {
    for layout in LAYOUTS {
        let img = image("mini", layout);
        let fs = open_fs(&img);
        let inode = fs
            .inode_at("/special/sparse")
            .expect("sparse")
            .as_ext4_inode();
        assert_eq!(inode.i_size, 512 * PAGE_SIZE);
        let mut pm = PageMapper::new(&fs.volume(), &inode, fs.source(), MapOptions::default())
            .expect("mapper");
        let map = pm.map_pages(0..512).expect("map");
        let data = |p: u64| p < 16 || (128..160).contains(&p) || p == 511;
        for &(p, why) in &map.unrestorable {
            assert!(!data(p), "{layout}: data page {p} unrestorable: {why:?}");
            assert_eq!(why, Unrestorable::Hole, "{layout}: page {p}");
        }
        assert_eq!(map.restorable_pages(), 16 + 32 + 1, "{layout}");
    }
}

/// The partial last page (/SHA256SUMS): excluded by default; with `tail_page` its disk
/// part equals the file's bytes followed by zeros.
#[test]
fn tail_page() {
    for layout in LAYOUTS {
        let img = image("mini", layout);
        let fs = open_fs(&img);
        let inode = fs.inode_at("/SHA256SUMS").expect("sums").as_ext4_inode();
        let content = cat(&img, "/SHA256SUMS");
        assert!(!inode.i_size.is_multiple_of(PAGE_SIZE));
        let last = inode.i_size / PAGE_SIZE;
        let vol = fs.volume();
        let mut pm =
            PageMapper::new(&vol, &inode, fs.source(), MapOptions::default()).expect("mapper");
        assert_eq!(
            pm.page(last).expect("page"),
            PageState::Unrestorable(Unrestorable::PartialEof)
        );
        let opts = MapOptions {
            tail_page: true,
            ..MapOptions::default()
        };
        let mut pm = PageMapper::new(&vol, &inode, fs.source(), opts).expect("mapper");
        let (off, n) = match pm.page(last).expect("page") {
            PageState::Restorable { disk_offset } => (disk_offset, PAGE_SIZE as usize),
            PageState::Tail {
                disk_offset,
                disk_bytes,
            } => (disk_offset, disk_bytes as usize),
            other => panic!("{layout}: tail page {other:?}"),
        };
        let mut want = content[(last * PAGE_SIZE) as usize..].to_vec();
        want.resize(n, 0);
        assert!(disk_bytes(&img, off, n) == want, "{layout}: tail bytes");
        if vol.block_size == 4096 {
            assert_eq!(n, 4096);
        }
    }
}

/// The on-disk reader agrees with debugfs `icheck`: the first block of each file belongs
/// to that file's inode.
#[test]
fn icheck_agrees() {
    for layout in LAYOUTS {
        let img = image("mini", layout);
        let fs = open_fs(&img);
        for path in files() {
            let ino = fs.lookup(&path).expect("lookup");
            let inode = fs.read_inode(ino).expect("inode").as_ext4_inode();
            let mut bm = BlockMapper::new(&fs.volume(), &inode, fs.source()).expect("mapper");
            let MapKind::Mapped { pblk } = bm.map(0).expect("map").kind else {
                panic!("{layout} {path}: block 0 unmapped");
            };
            let out =
                String::from_utf8_lossy(&debugfs(&img, &format!("icheck {pblk}"))).to_string();
            let want = format!("{pblk}\t{ino}");
            assert!(out.contains(&want), "{layout} {path}: icheck {pblk}: {out}");
        }
    }
}

/// An unwritten extent (debugfs `fallocate` on a copy of the image) is not restorable.
#[test]
fn unwritten_extent() {
    let img = image("mini", "plain");
    let dir = tempfile::tempdir().expect("tempdir");
    let copy = dir.path().join("disk.img");
    let ok = std::process::Command::new("cp")
        .args(["--sparse=always"])
        .arg(&img)
        .arg(&copy)
        .status()
        .expect("cp");
    assert!(ok.success());
    let cmds = dir.path().join("cmds");
    std::fs::write(
        &cmds,
        "write /dev/null /special/prealloc\n\
         fallocate /special/prealloc 0 63\n\
         sif /special/prealloc size 262144\n",
    )
    .expect("commands");
    let ok = std::process::Command::new("debugfs")
        .args(["-w", "-f"])
        .arg(&cmds)
        .arg(&copy)
        .output()
        .expect("debugfs");
    assert!(ok.status.success());
    let stat = String::from_utf8_lossy(&debugfs(&copy, "stat /special/prealloc")).to_string();
    assert!(
        stat.contains("[u]"),
        "debugfs made no unwritten extent: {stat}"
    );

    let fs = open_fs(&copy);
    let inode = fs
        .inode_at("/special/prealloc")
        .expect("prealloc")
        .as_ext4_inode();
    let mut bm = BlockMapper::new(&fs.volume(), &inode, fs.source()).expect("mapper");
    let ext = bm.map(0).expect("map");
    assert!(
        matches!(ext.kind, MapKind::Unwritten { .. }) && ext.len == 64,
        "{ext:?}"
    );
    let mut pm =
        PageMapper::new(&fs.volume(), &inode, fs.source(), MapOptions::default()).expect("mapper");
    let map = pm.map_pages(0..64).expect("map");
    assert!(map.runs.is_empty());
    assert_eq!(map.unrestorable.len(), 64);
    assert!(map
        .unrestorable
        .iter()
        .all(|&(_, w)| w == Unrestorable::Unwritten));
}
