//! blockmap on hostile input: corrupted `i_data` (random bytes, bad headers, huge depth),
//! index blocks that point at themselves, pointers past the filesystem, mutated leaves,
//! self-referencing indirect blocks. Metadata blocks come from a real lab image, with
//! chosen blocks replaced (an overlay), never from a mock of the mapper. Every case must
//! end in an error or an unrestorable page, never a panic, within bounded reads and time.

mod support;

use pct::blockmap::inode::{EXT4_EXTENTS_FL, EXT4_INLINE_DATA_FL};
use pct::blockmap::{
    BlockMapError, BlockSource, Ext4Inode, Ext4Volume, ImageFile, MapOptions, NodeAt, PageMapper,
    PageState, Unrestorable,
};
use std::collections::HashMap;
use std::time::{Duration, Instant};
use support::blockmap::*;

/// The image with some blocks replaced.
struct Overlay<'a> {
    base: &'a ImageFile,
    blocks: HashMap<u64, Vec<u8>>,
}

impl BlockSource for Overlay<'_> {
    fn read_block(&self, pblk: u64, buf: &mut [u8]) -> std::io::Result<()> {
        match self.blocks.get(&pblk) {
            Some(b) => {
                buf.copy_from_slice(&b[..buf.len()]);
                Ok(())
            }
            None => self.base.read_block(pblk, buf),
        }
    }
}

/// xorshift64*: deterministic noise without a dependency.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
    fn fill(&mut self, b: &mut [u8]) {
        for x in b {
            *x = self.next() as u8;
        }
    }
}

fn header(entries: u16, max: u16, depth: u16) -> Vec<u8> {
    let mut h = Vec::with_capacity(12);
    h.extend_from_slice(&0xF30Au16.to_le_bytes());
    h.extend_from_slice(&entries.to_le_bytes());
    h.extend_from_slice(&max.to_le_bytes());
    h.extend_from_slice(&depth.to_le_bytes());
    h.extend_from_slice(&0u32.to_le_bytes());
    h
}

fn idx(block: u32, leaf: u64) -> Vec<u8> {
    let mut e = Vec::with_capacity(12);
    e.extend_from_slice(&block.to_le_bytes());
    e.extend_from_slice(&(leaf as u32).to_le_bytes());
    e.extend_from_slice(&((leaf >> 32) as u16).to_le_bytes());
    e.extend_from_slice(&0u16.to_le_bytes());
    e
}

fn extent(block: u32, len: u16, start: u64) -> Vec<u8> {
    let mut e = Vec::with_capacity(12);
    e.extend_from_slice(&block.to_le_bytes());
    e.extend_from_slice(&len.to_le_bytes());
    e.extend_from_slice(&((start >> 32) as u16).to_le_bytes());
    e.extend_from_slice(&(start as u32).to_le_bytes());
    e
}

fn root(parts: &[Vec<u8>]) -> [u8; 60] {
    let mut r = [0u8; 60];
    let flat: Vec<u8> = parts.concat();
    r[..flat.len()].copy_from_slice(&flat);
    r
}

fn block(bs: u32, parts: &[Vec<u8>]) -> Vec<u8> {
    let mut b = parts.concat();
    b.resize(bs as usize, 0);
    b
}

fn ext_inode(i_block: [u8; 60], i_size: u64) -> Ext4Inode {
    Ext4Inode {
        ino: 4242,
        i_flags: EXT4_EXTENTS_FL,
        i_size,
        i_block,
    }
}

fn plain() -> (ImageFile, Ext4Volume, Ext4Inode) {
    let img = image("mini", "plain");
    let fs = open_fs(&img);
    let frag = fs.inode_at("/special/frag").expect("frag").as_ext4_inode();
    (ImageFile::open(&img, 0).expect("image"), fs.volume(), frag)
}

fn map_all<S: BlockSource + ?Sized>(
    vol: &Ext4Volume,
    inode: &Ext4Inode,
    src: &S,
    pages: u64,
) -> Result<Vec<PageState>, BlockMapError> {
    let mut pm = PageMapper::new(vol, inode, src, MapOptions::default())?;
    (0..pages).map(|p| pm.page(p)).collect()
}

fn root_error(r: Result<Vec<PageState>, BlockMapError>) -> &'static str {
    match r {
        Err(BlockMapError::ExtentNode {
            at: NodeAt::Root,
            why,
            ..
        }) => why,
        other => panic!("want a root error, got {other:?}"),
    }
}

#[test]
fn bad_root_headers() {
    let (img, vol, _) = plain();
    let size = 1 << 20;
    let ok = extent(0, 8, 20000);
    let cases: Vec<(&str, [u8; 60])> = vec![
        ("magic", {
            let mut r = root(&[header(1, 4, 0), ok.clone()]);
            r[0] = 0x0B;
            r
        }),
        ("entries > max", root(&[header(3, 2, 0), ok.clone()])),
        (
            "max too big for i_block",
            root(&[header(1, 5, 0), ok.clone()]),
        ),
        ("max 0", root(&[header(0, 0, 0)])),
        ("depth 6", root(&[header(1, 4, 6), idx(0, 20000)])),
        ("depth 65535", root(&[header(1, 4, 0xFFFF), idx(0, 20000)])),
        ("index without entries", root(&[header(0, 4, 1)])),
        (
            "zero-length extent",
            root(&[header(1, 4, 0), extent(0, 0, 20000)]),
        ),
        (
            "overlapping extents",
            root(&[header(2, 4, 0), extent(0, 8, 20000), extent(4, 8, 21000)]),
        ),
        (
            "unsorted extents",
            root(&[header(2, 4, 0), extent(100, 8, 20000), extent(0, 8, 21000)]),
        ),
        (
            "extent at block 0",
            root(&[header(1, 4, 0), extent(0, 8, 0)]),
        ),
        (
            "extent past the filesystem",
            root(&[header(1, 4, 0), extent(0, 8, vol.blocks_count.unwrap() - 4)]),
        ),
        (
            "48-bit start",
            root(&[header(1, 4, 0), extent(0, 8, 0xFFFF_0000_0000)]),
        ),
        ("index to block 0", root(&[header(1, 4, 1), idx(0, 0)])),
    ];
    for (name, r) in cases {
        let got = map_all(&vol, &ext_inode(r, size), &img, 256);
        match got {
            Err(e) => eprintln!("{name}: {e}"),
            Ok(states) => panic!("{name}: mapped {states:?}"),
        }
    }
    // The root is validated before any page is asked for.
    let r = root(&[header(1, 4, 6), idx(0, 20000)]);
    assert_eq!(
        root_error(map_all(&vol, &ext_inode(r, size), &img, 1)),
        "eh_depth > 5"
    );
}

/// Index blocks pointing at themselves (or at their parent) are refused by the depth rule.
#[test]
fn index_cycles() {
    let (img, vol, _) = plain();
    let bs = vol.block_size;
    let x = 20000u64;
    let mut over = Overlay {
        base: &img,
        blocks: HashMap::new(),
    };
    // X is an index node of depth 1 whose only entry is X.
    over.blocks
        .insert(x, block(bs, &[header(1, 340, 1), idx(0, x)]));
    for depth in [1u16, 2, 5] {
        let r = root(&[header(1, 4, depth), idx(0, x)]);
        let t = Instant::now();
        let got = map_all(&vol, &ext_inode(r, 1 << 20), &over, 256);
        assert!(t.elapsed() < Duration::from_secs(1));
        match got {
            Err(BlockMapError::ExtentNode {
                at: NodeAt::Block(b),
                ..
            }) => assert_eq!(b, x),
            other => panic!("depth {depth}: {other:?}"),
        }
    }
    // X pointing back at a depth-2 parent Y: Y's child must have depth 1, X's depth 0.
    let y = 20001u64;
    over.blocks
        .insert(y, block(bs, &[header(1, 340, 2), idx(0, x)]));
    over.blocks
        .insert(x, block(bs, &[header(1, 340, 1), idx(0, y)]));
    let r = root(&[header(1, 4, 3), idx(0, y)]);
    assert!(map_all(&vol, &ext_inode(r, 1 << 20), &over, 256).is_err());
    // Child index entries outside the range the parent gives them.
    over.blocks.insert(
        x,
        block(
            bs,
            &[
                header(2, 340, 0),
                extent(0, 4, 21000),
                extent(500, 4, 21010),
            ],
        ),
    );
    let r = root(&[header(2, 4, 1), idx(0, x), idx(100, x)]);
    assert!(map_all(&vol, &ext_inode(r, 1 << 22), &over, 1024).is_err());
}

/// A legitimate depth-5 chain of index blocks over frag's real leaf maps exactly as the
/// real depth-1 tree does, reading 5 blocks.
#[test]
fn deep_chain_maps_like_the_original() {
    let (img, vol, frag) = plain();
    let bs = vol.block_size;
    let pages = frag.i_size / 4096;
    let want = map_all(&vol, &frag, &img, pages).expect("frag maps");
    let leaf = {
        let e = &frag.i_block[12..24];
        u64::from(u32::from_le_bytes([e[4], e[5], e[6], e[7]]))
            | u64::from(u16::from_le_bytes([e[8], e[9]])) << 32
    };
    let mut over = Overlay {
        base: &img,
        blocks: HashMap::new(),
    };
    let chain = [20010u64, 20011, 20012, 20013];
    // chain[0] has depth 1 (points at the leaf), chain[3] depth 4.
    for (i, &b) in chain.iter().enumerate() {
        let child = if i == 0 { leaf } else { chain[i - 1] };
        over.blocks
            .insert(b, block(bs, &[header(1, 340, i as u16 + 1), idx(0, child)]));
    }
    let deep = ext_inode(root(&[header(1, 4, 5), idx(0, chain[3])]), frag.i_size);
    let mut pm = PageMapper::new(&vol, &deep, &over, MapOptions::default()).expect("mapper");
    let got: Vec<PageState> = (0..pages).map(|p| pm.page(p).expect("page")).collect();
    assert_eq!(got, want);
    assert_eq!(pm.block_reads(), 5);
}

/// A cap on reads turns a tree needing more into an error, not a long walk.
#[test]
fn read_budget() {
    let img_path = image("mini", "bs1k");
    let fs = open_fs(&img_path);
    let frag = fs.inode_at("/special/frag").expect("frag").as_ext4_inode();
    let vol = fs.volume();
    let pages = frag.i_size / 4096;
    let opts = |n| MapOptions {
        max_block_reads: n,
        ..MapOptions::default()
    };
    let mut pm = PageMapper::new(&vol, &frag, fs.source(), opts(1)).expect("mapper");
    match pm.map_pages(0..pages) {
        Err(BlockMapError::Budget { limit: 1, .. }) => {}
        other => panic!("{other:?}"),
    }
    let mut pm = PageMapper::new(&vol, &frag, fs.source(), opts(64)).expect("mapper");
    assert!(pm.map_pages(0..pages).is_ok());
}

/// Random i_data, random flags, random sizes, random page indices: no panic, bounded.
#[test]
fn random_i_data() {
    let (img, vol, frag) = plain();
    let mut rng = Rng(0x9E37_79B9_7F4A_7C15);
    let t = Instant::now();
    let (mut errors, mut restorable, mut reads) = (0u64, 0u64, 0u64);
    let limit = 64;
    for round in 0..20_000u32 {
        let mut i_block = [0u8; 60];
        match round % 4 {
            0 => rng.fill(&mut i_block),
            1 => {
                // A plausible header over random entries.
                rng.fill(&mut i_block);
                let h = header(
                    rng.below(6) as u16,
                    rng.below(6) as u16,
                    rng.below(7) as u16,
                );
                i_block[..12].copy_from_slice(&h);
            }
            2 => {
                // frag's real root with a few bytes flipped.
                i_block = frag.i_block;
                for _ in 0..1 + rng.below(4) {
                    i_block[rng.below(60) as usize] ^= 1 << rng.below(8);
                }
            }
            _ => {
                // Block pointers into the filesystem, for the indirect walker.
                for w in i_block.chunks_exact_mut(4) {
                    let p = rng.below(vol.blocks_count.unwrap() + 100) as u32;
                    w.copy_from_slice(&p.to_le_bytes());
                }
            }
        }
        let i_flags = match round % 4 {
            3 => 0,
            _ if rng.below(50) == 0 => EXT4_INLINE_DATA_FL,
            _ => EXT4_EXTENTS_FL,
        };
        let inode = Ext4Inode {
            ino: u64::from(round),
            i_flags,
            i_size: rng.next() >> rng.below(64),
            i_block,
        };
        let v = Ext4Volume {
            blocks_count: if round % 8 == 7 {
                None
            } else {
                vol.blocks_count
            },
            ..vol
        };
        let opts = MapOptions {
            tail_page: rng.below(2) == 0,
            max_block_reads: limit,
        };
        let mut pm = match PageMapper::new(&v, &inode, &img, opts) {
            Ok(pm) => pm,
            Err(_) => {
                errors += 1;
                continue;
            }
        };
        let mut pages: Vec<u64> = (0..16).collect();
        pages.extend((0..16).map(|_| rng.next() >> rng.below(64)));
        pages.sort_unstable();
        for p in pages {
            match pm.page(p) {
                Ok(PageState::Restorable { .. }) => restorable += 1,
                Ok(_) => {}
                Err(_) => errors += 1,
            }
        }
        assert!(pm.block_reads() <= limit);
        reads += u64::from(pm.block_reads());
    }
    let took = t.elapsed();
    eprintln!("20000 random inodes: {errors} errors, {restorable} restorable pages, {reads} block reads, {took:?}");
    assert!(took < Duration::from_secs(60));
}

/// frag's real leaf block with random bytes flipped, many times.
#[test]
fn mutated_leaf() {
    let (img, vol, frag) = plain();
    let e = &frag.i_block[12..24];
    let leaf = u64::from(u32::from_le_bytes([e[4], e[5], e[6], e[7]]));
    let mut orig = vec![0u8; vol.block_size as usize];
    img.read_block(leaf, &mut orig).expect("leaf");
    let mut rng = Rng(7);
    let pages = frag.i_size / 4096 + 4;
    let (mut ok, mut bad) = (0, 0);
    for _ in 0..5000 {
        let mut b = orig.clone();
        for _ in 0..1 + rng.below(8) {
            // Mostly the header and first extents, where the live data is.
            let span = if rng.below(2) == 0 { 64 } else { 600 };
            let at = rng.below(span) as usize;
            b[at] ^= 1 << rng.below(8);
        }
        let over = Overlay {
            base: &img,
            blocks: HashMap::from([(leaf, b)]),
        };
        match map_all(&vol, &frag, &over, pages) {
            Ok(_) => ok += 1,
            Err(_) => bad += 1,
        }
    }
    eprintln!("mutated leaf: {ok} mapped, {bad} refused");
    assert!(bad > 0);
}

/// Block-mapped inode whose indirect blocks point at themselves: bounded by the fixed
/// depth (at most 3 reads, cached), no panic.
#[test]
fn indirect_self_reference() {
    let img_path = image("mini", "noextent");
    let fs = open_fs(&img_path);
    let vol = fs.volume();
    let img = ImageFile::open(&img_path, 0).expect("image");
    let x = 20000u64;
    let ppb = vol.block_size as usize / 4;
    let selfref: Vec<u8> = (0..ppb).flat_map(|_| (x as u32).to_le_bytes()).collect();
    let over = Overlay {
        base: &img,
        blocks: HashMap::from([(x, selfref)]),
    };
    let mut i_block = [0u8; 60];
    for slot in 12..15 {
        i_block[4 * slot..4 * slot + 4].copy_from_slice(&(x as u32).to_le_bytes());
    }
    let inode = Ext4Inode {
        ino: 99,
        i_flags: 0,
        i_size: 1 << 40,
        i_block,
    };
    let mut pm = PageMapper::new(&vol, &inode, &over, MapOptions::default()).expect("mapper");
    let t = Instant::now();
    let mut pages: Vec<u64> = (0..4096).collect();
    pages.extend([1 << 20, 1 << 24, (1 << 28) - 1]);
    let map = pm.map_pages(pages).expect("map");
    assert!(t.elapsed() < Duration::from_secs(5));
    // Direct slots are holes; every other block is x: one block per page, never
    // contiguous with the next.
    assert!(map.runs.iter().all(|r| r.pages == 1));
    assert!(map.block_reads <= 3, "{} reads", map.block_reads);
    assert!(map
        .unrestorable
        .iter()
        .any(|&(_, w)| w == Unrestorable::Hole));
}
