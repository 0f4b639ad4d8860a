//! The radix-tree walker (kernels before 4.20) on trees laid out exactly as the three
//! imported Volatility 2 profiles describe them (Debian 2.6.32 and 3.2: the `height`
//! generation; Debian 4.9: the `shift` generation). No guest of those kernels can be
//! booted here, so the trees are built in a memory image by these tests, with the
//! profiles' real offsets, sizes and slot counts.

mod support;

use pct::kernel::{Kernel, LocatedBy, Location};
use pct::memory::GuestMemory;
use pct::profile::{PageCacheTree, Profile};
use pct::walk::radix_tree::radix_tree_for_each;
use pct::walk::WalkError;
use std::collections::BTreeMap;
use std::sync::Mutex;
use support::oldguest::{build_radix_tree, radix_slot, Ram};
use support::profile::shared;

const POB: u64 = 0xffff_8800_0000_0000;
const MEM: usize = 32 << 20;

/// The profile pct imports from a Volatility 2 profile in `../shared` (named as the shipped
/// copy in `profiles/` is, which the tests do not need), imported once per process.
fn vol2_profile(name: &str) -> Profile {
    static CACHE: Mutex<BTreeMap<String, Profile>> = Mutex::new(BTreeMap::new());
    let zip = match name {
        "debian-2.6.32.json" => "Debian608.zip",
        "debian-3.2.json" => "Debian73.zip",
        "debian-4.9.json" => "Debian94.zip",
        other => panic!("no Volatility 2 profile for {other}"),
    };
    let mut cache = CACHE.lock().unwrap_or_else(|e| e.into_inner());
    cache
        .entry(name.to_owned())
        .or_insert_with(|| {
            let path = shared().join("volatility2-profiles").join(zip);
            pct::profile::vol2::import_zip(&path)
                .unwrap_or_else(|e| panic!("importing {}: {e}", path.display()))
        })
        .clone()
}

/// A memory image being built: nodes are allocated in the direct map (support::oldguest).
struct Image {
    ram: Ram,
    p: Profile,
}

impl Image {
    fn new(profile: &str) -> Image {
        Image {
            ram: Ram::new(MEM, POB, 0x10000..MEM as u64),
            p: vol2_profile(profile),
        }
    }
    fn put(&mut self, va: u64, off: u64, v: u64, size: usize) {
        self.ram.put(va, off, v, size);
    }
    fn get(&self, va: u64, off: u64) -> u64 {
        self.ram.get(va, off)
    }
    fn slot(&self, node: u64, i: u64) -> u64 {
        radix_slot(&self.p, node, i)
    }

    /// Builds a tree holding `items` (index → entry) under the root at `root`.
    fn build(&mut self, root: u64, items: &BTreeMap<u64, u64>) {
        build_radix_tree(&mut self.ram, &self.p, root, items);
    }

    fn walk(self, root: u64) -> (Result<(), WalkError>, Vec<(u64, u64)>) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("mem");
        std::fs::write(&path, &self.ram.bytes).unwrap();
        let mem = GuestMemory::open(&path).unwrap();
        let k = Kernel {
            mem: &mem,
            profile: &self.p,
            loc: Location {
                method: LocatedBy::BannerAndInitTask,
                release: None,
                build_id: None,
                virt_offset: 0,
                phys_base: 0,
                page_offset_base: POB,
                vmemmap_base: 0xffff_ea00_0000_0000,
                pgd: 0,
                levels: 4,
            },
        };
        let mut got = Vec::new();
        let r = radix_tree_for_each(&k, root, "test tree", |i, e| {
            got.push((i, e));
            Ok(())
        });
        (r, got)
    }
}

fn fake_page(n: u64) -> u64 {
    0xffff_ea00_0000_0000 + n * 64
}

fn check_profile(profile: &str, want_gen: PageCacheTree) {
    let mut img = Image::new(profile);
    assert_eq!(
        img.p.page_cache_tree(),
        Some(want_gen),
        "{profile}: generation"
    );
    let root = POB + 0x1000;
    let indices = [0u64, 1, 63, 64, 100, 4095, 4096, 70_000, 262_143, 300_000];
    let mut items: BTreeMap<u64, u64> = indices
        .iter()
        .enumerate()
        .map(|(n, &i)| (i, fake_page(n as u64)))
        .collect();
    // Exceptional (shadow/swap) entries the walk must skip.
    items.insert(5, (7 << 2) | 2);
    items.insert(262_144, (9 << 2) | 2);
    img.build(root, &items);
    let (r, got) = img.walk(root);
    r.unwrap_or_else(|e| panic!("{profile}: {e}"));
    let want: Vec<(u64, u64)> = items.into_iter().filter(|(_, e)| e & 3 == 0).collect();
    assert_eq!(got, want, "{profile}: items");
}

#[test]
fn height_generation_debian_2_6_32() {
    check_profile("debian-2.6.32.json", PageCacheTree::RadixHeight);
}

#[test]
fn height_generation_debian_3_2() {
    check_profile("debian-3.2.json", PageCacheTree::RadixHeight);
}

#[test]
fn shift_generation_debian_4_9() {
    check_profile("debian-4.9.json", PageCacheTree::RadixShift);
}

#[test]
fn single_item_and_empty_trees() {
    for profile in ["debian-2.6.32.json", "debian-4.9.json"] {
        let mut img = Image::new(profile);
        let root = POB + 0x1000;
        let rnode_off = img.p.offset("radix_tree_root", "rnode").unwrap();
        img.put(root, rnode_off, fake_page(3), 8); // height 0: the item itself, index 0
        let (r, got) = img.walk(root);
        r.unwrap();
        assert_eq!(got, vec![(0, fake_page(3))], "{profile}");
        let img = Image::new(profile);
        let (r, got) = img.walk(root);
        r.unwrap();
        assert!(got.is_empty());
    }
}

/// A node that points back up the tree, or whose level/shift lies, is refused.
#[test]
fn cycles_and_lies_are_refused() {
    for profile in ["debian-2.6.32.json", "debian-3.2.json", "debian-4.9.json"] {
        let mut img = Image::new(profile);
        let root = POB + 0x1000;
        let items: BTreeMap<u64, u64> = [(0u64, fake_page(0)), (300_000, fake_page(1))].into();
        img.build(root, &items);
        // The first node allocated is the top: point a leaf-level slot of a lower node at it.
        let top = POB + 0x10000;
        let child = img.get(img.slot(top, 0), 0) & !3;
        let tag = if img.p.page_cache_tree() == Some(PageCacheTree::RadixShift) {
            1
        } else {
            0
        };
        let at = img.slot(child, 7);
        img.put(at, 0, top | tag, 8);
        let (r, _) = img.walk(root);
        let e = r.expect_err(profile);
        assert!(e.to_string().contains("expected"), "{profile}: {e}");
    }
}
