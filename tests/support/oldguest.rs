//! Synthetic guest RAM laid out by a profile, for kernels no guest of which can be booted
//! here (the imported Volatility 2 profiles: Debian 2.6.32, 3.2, 4.9).
//!
//! - [`Ram`]: a guest-physical image with a bump allocator, written through the direct map;
//! - [`build_radix_tree`]: a page-cache radix tree of the profile's generation (height or
//!   shift), at the profile's offsets and slot count;
//! - [`OldGuest`]: a whole kernel as pct finds it: its VMCOREINFO note in the image's
//!   `.bss` (`vmcoreinfo_note`, text as those kernels write it), `phys_base`, the
//!   randomised bases where the kernel has them, page tables (direct map, kernel image,
//!   vmemmap), the `struct page` array, `super_blocks` with filesystems, inodes and their
//!   page cache, and the data pages themselves.

use pct::kernel::START_KERNEL_MAP;
use pct::profile::{PageCacheTree, Profile};
/// What a cached page is, as the guest kernel left it (the states pct tells apart).
pub use pct::walk::page::PageState as PageKind;
use std::collections::BTreeMap;

/// Pre-4.8 fixed bases (4-level paging).
pub const FIXED_POB: u64 = 0xffff_8800_0000_0000;
pub const FIXED_VMEMMAP: u64 = 0xffff_ea00_0000_0000;

/// A guest-physical RAM image; kernel objects are allocated from a heap and addressed
/// through the direct map at `pob`.
pub struct Ram {
    pub bytes: Vec<u8>,
    pub pob: u64,
    next: u64,
    heap_end: u64,
}

impl Ram {
    pub fn new(size: usize, pob: u64, heap: std::ops::Range<u64>) -> Ram {
        Ram {
            bytes: vec![0; size],
            pob,
            next: heap.start,
            heap_end: heap.end,
        }
    }

    /// Writes the low `size` bytes of `v` at guest-physical `pa`.
    pub fn put_pa(&mut self, pa: u64, v: u64, size: usize) {
        let pa = pa as usize;
        self.bytes[pa..pa + size].copy_from_slice(&v.to_le_bytes()[..size]);
    }

    pub fn put_bytes_pa(&mut self, pa: u64, b: &[u8]) {
        let pa = pa as usize;
        self.bytes[pa..pa + b.len()].copy_from_slice(b);
    }

    /// Writes at direct-map VA `va` + `off`.
    pub fn put(&mut self, va: u64, off: u64, v: u64, size: usize) {
        self.put_pa(va - self.pob + off, v, size);
    }

    pub fn get(&self, va: u64, off: u64) -> u64 {
        let pa = (va - self.pob + off) as usize;
        u64::from_le_bytes(self.bytes[pa..pa + 8].try_into().unwrap())
    }

    /// `len` zeroed bytes from the heap, `align`-aligned: their guest-physical address.
    pub fn alloc_pa(&mut self, len: u64, align: u64) -> u64 {
        let pa = self.next.next_multiple_of(align);
        self.next = pa + len;
        assert!(self.next <= self.heap_end, "synthetic guest heap exhausted");
        pa
    }

    /// Like [`alloc_pa`](Self::alloc_pa), as a direct-map VA.
    pub fn alloc(&mut self, len: u64, align: u64) -> u64 {
        self.pob + self.alloc_pa(len, align)
    }

    /// A NUL-terminated string in the heap: its VA.
    pub fn string(&mut self, s: &str) -> u64 {
        let va = self.alloc(s.len() as u64 + 1, 8);
        let pa = va - self.pob;
        self.put_bytes_pa(pa, s.as_bytes());
        va
    }
}

fn off(p: &Profile, ty: &str, f: &str) -> u64 {
    p.offset(ty, f)
        .unwrap_or_else(|| panic!("the profile lacks {ty}.{f}"))
}

fn field(p: &Profile, ty: &str, f: &str) -> Option<(u64, usize)> {
    let fl = p.field(ty, f)?;
    Some((fl.offset, fl.size as usize))
}

/// Size of a radix-tree node of the profile, as allocated (64-byte aligned).
pub fn radix_node_size(p: &Profile) -> u64 {
    off(p, "radix_tree_node", "slots") + 8 * p.tree_slots().unwrap()
}

/// VA of slot `i` of the radix-tree node at `node`.
pub fn radix_slot(p: &Profile, node: u64, i: u64) -> u64 {
    node + off(p, "radix_tree_node", "slots") + 8 * i
}

fn init_radix_node(
    ram: &mut Ram,
    p: &Profile,
    node: u64,
    level: u64,
    offset: u64,
    parent: Option<u64>,
) {
    let bits = p.tree_slots().unwrap().trailing_zeros() as u64;
    if let Some((o, s)) = field(p, "radix_tree_node", "height") {
        ram.put(node, o, level, s);
    }
    if let Some((o, s)) = field(p, "radix_tree_node", "shift") {
        ram.put(node, o, (level - 1) * bits, s);
    }
    if let Some((o, s)) = field(p, "radix_tree_node", "offset") {
        ram.put(node, o, offset, s);
    }
    if let (Some((o, s)), Some(parent)) = (field(p, "radix_tree_node", "parent"), parent) {
        ram.put(node, o, parent, s);
    }
    // `count`: the node's non-empty slots, kept for realism (the walker does not need it).
}

/// Builds a radix tree holding `items` (index → entry) under the `radix_tree_root` at
/// `root` (a direct-map VA), with nodes from the heap; returns the top node's VA. The
/// root's `height` (< 4.7) and each node's `height` or `shift`, `offset` and `parent` are
/// set as the profile's generation has them; internal pointers are tagged as that
/// generation tags them.
pub fn build_radix_tree(ram: &mut Ram, p: &Profile, root: u64, items: &BTreeMap<u64, u64>) -> u64 {
    let gen = p.page_cache_tree().unwrap();
    let bits = p.tree_slots().unwrap().trailing_zeros() as u64;
    let max = items.keys().max().copied().unwrap_or(0);
    let mut levels = 1;
    while max >> (bits * levels) != 0 {
        levels += 1;
    }
    let node_size = radix_node_size(p).div_ceil(64) * 64;
    let top = ram.alloc(node_size, 64);
    let shifted = gen == PageCacheTree::RadixShift;
    init_radix_node(ram, p, top, levels, 0, None);
    ram.put(root, off(p, "radix_tree_root", "rnode"), top | 1, 8);
    if let Some(h) = p.offset("radix_tree_root", "height") {
        ram.put(root, h, levels, 4);
    }
    for (&index, &entry) in items {
        let mut node = top;
        for l in (1..=levels).rev() {
            let slot = (index >> (bits * (l - 1))) & ((1 << bits) - 1);
            let at = radix_slot(p, node, slot);
            if l == 1 {
                ram.put(at, 0, entry, 8);
                break;
            }
            let cur = ram.get(at, 0);
            node = if cur == 0 {
                let c = ram.alloc(node_size, 64);
                init_radix_node(ram, p, c, l - 1, slot, Some(node));
                ram.put(at, 0, if shifted { c | 1 } else { c }, 8);
                c
            } else {
                cur & !3
            };
        }
    }
    top
}

/// A cached page: its index in the file, its frame, its state and its bytes.
pub struct CachedPage {
    pub index: u64,
    pub pfn: u64,
    pub kind: PageKind,
    pub bytes: Vec<u8>,
}

/// An inode with page cache.
pub struct GuestInode {
    pub ino: u64,
    pub size: u64,
    pub mode: u16,
    pub pages: Vec<CachedPage>,
}

/// A mounted filesystem.
pub struct GuestFs {
    pub fs_type: &'static str,
    pub id: &'static str,
    /// Has a block device (ext4 on a disk); tmpfs has none.
    pub bdev: bool,
    pub blocksize_bits: u8,
    pub inodes: Vec<GuestInode>,
}

/// The kernel an image is laid out for.
pub struct OldGuest<'p> {
    pub profile: &'p Profile,
    /// `OSRELEASE=` of the note (normally the profile's release).
    pub release: String,
    /// KASLR shift of the image; `None` writes no `KERNELOFFSET=` (kernels before 3.14).
    pub kernel_offset: Option<u64>,
    pub phys_base: u64,
    /// Direct-map and vmemmap bases: randomised (written to `page_offset_base` and
    /// `vmemmap_base`) where the profile has those symbols, else the fixed ones.
    pub pob: u64,
    pub vmemmap: u64,
    /// The page-flag numbers the guest kernel really uses (what its pages carry and what
    /// its VMCOREINFO publishes).
    pub flags: BTreeMap<String, u32>,
    pub ram_size: usize,
    /// Guest-physical base of the `struct page` array (2 MiB aligned).
    pub vmemmap_pa: u64,
}

const MB: u64 = 1 << 20;
const TWO_MB: u64 = 2 * MB;

impl<'p> OldGuest<'p> {
    /// The layout of a Debian kernel of `profile`: 64 MiB of RAM, the fixed bases of old
    /// kernels (or randomised ones with KASLR where the profile has the variables), the
    /// page flags of the profile.
    pub fn new(profile: &'p Profile) -> OldGuest<'p> {
        let kaslr = profile.symbol("page_offset_base").is_some();
        let flags = profile.enums["pageflags"]
            .values
            .iter()
            .map(|(k, v)| (k.clone(), *v as u32))
            .collect();
        OldGuest {
            profile,
            release: profile.kernel.release.clone().unwrap(),
            kernel_offset: kaslr.then_some(0xa0_0000),
            phys_base: if kaslr { 0x20_0000 } else { 0 },
            pob: if kaslr {
                0xffff_9a00_0000_0000
            } else {
                FIXED_POB
            },
            vmemmap: if kaslr {
                0xffff_e3c0_4000_0000
            } else {
                FIXED_VMEMMAP
            },
            flags,
            ram_size: 64 << 20,
            vmemmap_pa: 48 * MB,
        }
    }

    fn virt(&self) -> u64 {
        self.kernel_offset.unwrap_or(0)
    }

    /// Guest-physical address of the kernel-image symbol `name`.
    pub fn symbol_pa(&self, name: &str) -> u64 {
        let link = self
            .profile
            .symbol(name)
            .unwrap_or_else(|| panic!("the profile has no symbol {name}"));
        link + self.virt() - START_KERNEL_MAP + self.phys_base
    }

    fn symbol_va(&self, name: &str) -> u64 {
        self.profile.symbol(name).unwrap() + self.virt()
    }

    /// The VA of pfn's `struct page`.
    pub fn page_va(&self, pfn: u64) -> u64 {
        self.vmemmap + pfn * self.profile.size_of("page").unwrap()
    }

    fn flag(&self, n: &str) -> u64 {
        1 << self.flags[n]
    }

    /// The VMCOREINFO text such a kernel writes (the parts pct reads).
    pub fn vmcoreinfo_text(&self) -> String {
        let mut t = format!("OSRELEASE={}\nPAGESIZE=4096\n", self.release);
        let pgd = self.symbol_va("init_top_pgt");
        t += &format!("SYMBOL(swapper_pg_dir)={pgd:x}\n");
        for n in ["PG_lru", "PG_private", "PG_swapcache"] {
            t += &format!("NUMBER({n})={}\n", self.flags[n]);
        }
        if self.kernel_offset.is_some() {
            // 4.9 also publishes these (added in the 3.x series).
            t += &format!("NUMBER(PG_slab)={}\n", self.flags["PG_slab"]);
            t += &format!("NUMBER(PG_head_mask)={}\n", self.flag("PG_head"));
            t += "NUMBER(PAGE_BUDDY_MAPCOUNT_VALUE)=-128\n";
        }
        t += &format!("SYMBOL(phys_base)={:x}\n", self.symbol_va("phys_base"));
        t += &format!("SYMBOL(init_level4_pgt)={pgd:x}\n");
        if let Some(o) = self.kernel_offset {
            t += &format!("KERNELOFFSET={o:x}\n");
        }
        t
    }

    /// Lays out the kernel and `filesystems` in RAM; returns the image.
    pub fn build(&self, filesystems: &[GuestFs]) -> Vec<u8> {
        let p = self.profile;
        let mut ram = Ram::new(self.ram_size, self.pob, 0x1_0000..15 * MB);
        // The note, as update_vmcoreinfo_note() leaves it in vmcoreinfo_note.
        let text = self.vmcoreinfo_text();
        let note = self.symbol_pa("vmcoreinfo_note");
        ram.put_pa(note, 11, 4);
        ram.put_pa(note + 4, text.len() as u64, 4);
        ram.put_pa(note + 8, 0, 4);
        ram.put_bytes_pa(note + 12, b"VMCOREINFO\0\0");
        ram.put_bytes_pa(note + 24, text.as_bytes());
        ram.put_pa(self.symbol_pa("phys_base"), self.phys_base, 8);
        if p.symbol("page_offset_base").is_some() {
            ram.put_pa(self.symbol_pa("page_offset_base"), self.pob, 8);
            ram.put_pa(self.symbol_pa("vmemmap_base"), self.vmemmap, 8);
        }
        // Page tables: direct map, kernel image, vmemmap, all with 2 MiB pages.
        let pml4 = self.symbol_pa("init_top_pgt");
        for pa in (0..self.ram_size as u64).step_by(TWO_MB as usize) {
            map_2m(&mut ram, pml4, self.pob + pa, pa);
        }
        for x in (0..self.ram_size as u64 - self.phys_base).step_by(TWO_MB as usize) {
            map_2m(&mut ram, pml4, START_KERNEL_MAP + x, self.phys_base + x);
        }
        let npages = self.ram_size as u64 / 4096;
        let array = npages * p.size_of("page").unwrap();
        for x in (0..array).step_by(TWO_MB as usize) {
            map_2m(&mut ram, pml4, self.vmemmap + x, self.vmemmap_pa + x);
        }
        // Every struct page: _mapcount -1 (not mapped, not free).
        let mapcount = p.offset("page", "_mapcount").unwrap();
        for pfn in 0..npages {
            let pa = self.vmemmap_pa + pfn * p.size_of("page").unwrap();
            ram.put_pa(pa + mapcount, u32::MAX as u64, 4);
        }
        // super_blocks.
        let head_pa = self.symbol_pa("super_blocks");
        let head_va = self.symbol_va("super_blocks");
        let mut prev_link = head_va;
        let mut prev_pa = head_pa;
        for fs in filesystems {
            let sb = ram.alloc(p.size_of("super_block").unwrap(), 64);
            let link = sb + off(p, "super_block", "s_list");
            // prev->next = link; link->prev = prev.
            ram.put_pa(prev_pa, link, 8);
            ram.put(link, 8, prev_link, 8);
            prev_link = link;
            prev_pa = link - self.pob;
            self.fill_super_block(&mut ram, sb, fs);
        }
        ram.put_pa(prev_pa, head_va, 8);
        ram.put_pa(head_pa + 8, prev_link, 8);
        ram.bytes
    }

    fn fill_super_block(&self, ram: &mut Ram, sb: u64, fs: &GuestFs) {
        let p = self.profile;
        let fst = ram.alloc(p.size_of("file_system_type").unwrap(), 64);
        let name = ram.string(fs.fs_type);
        ram.put(fst, off(p, "file_system_type", "name"), name, 8);
        ram.put(sb, off(p, "super_block", "s_type"), fst, 8);
        ram.put(sb, off(p, "super_block", "s_dev"), 0x0fe0_0000, 4);
        ram.put(
            sb,
            off(p, "super_block", "s_blocksize_bits"),
            fs.blocksize_bits.into(),
            1,
        );
        ram.put(
            sb,
            off(p, "super_block", "s_blocksize"),
            1 << fs.blocksize_bits,
            8,
        );
        let id = off(p, "super_block", "s_id");
        ram.put_bytes_pa(sb - self.pob + id, fs.id.as_bytes());
        if fs.bdev {
            let bd = ram.alloc(p.size_of("block_device").unwrap(), 64);
            ram.put(bd, off(p, "block_device", "bd_dev"), 0x0fe0_0000, 4);
            ram.put(sb, off(p, "super_block", "s_bdev"), bd, 8);
        }
        // s_inodes, linked through i_sb_list.
        let head = sb + off(p, "super_block", "s_inodes");
        let mut prev = head;
        for ino in &fs.inodes {
            let inode = ram.alloc(p.size_of("inode").unwrap(), 64);
            let link = inode + off(p, "inode", "i_sb_list");
            ram.put(prev, 0, link, 8);
            ram.put(link, 8, prev, 8);
            prev = link;
            self.fill_inode(ram, sb, inode, ino);
        }
        ram.put(prev, 0, head, 8);
        ram.put(head, 8, prev, 8);
    }

    fn fill_inode(&self, ram: &mut Ram, sb: u64, inode: u64, gi: &GuestInode) {
        let p = self.profile;
        ram.put(inode, off(p, "inode", "i_mode"), gi.mode.into(), 2);
        ram.put(inode, off(p, "inode", "i_ino"), gi.ino, 8);
        ram.put(inode, off(p, "inode", "i_size"), gi.size, 8);
        ram.put(inode, off(p, "inode", "i_sb"), sb, 8);
        if let Some((o, s)) = field(p, "inode", "i_nlink") {
            ram.put(inode, o, 1, s);
        }
        // i_mapping points at the inode's own i_data, as for every regular file.
        let mapping = inode + off(p, "inode", "i_data");
        ram.put(inode, off(p, "inode", "i_mapping"), mapping, 8);
        ram.put(mapping, off(p, "address_space", "host"), inode, 8);
        ram.put(
            mapping,
            off(p, "address_space", "nrpages"),
            gi.pages.len() as u64,
            8,
        );
        let mut items = BTreeMap::new();
        let size = p.size_of("page").unwrap();
        for cp in &gi.pages {
            let page_pa = self.vmemmap_pa + cp.pfn * size;
            let flags = match cp.kind {
                PageKind::Clean => self.flag("PG_uptodate") | self.flag("PG_lru"),
                PageKind::Dirty => {
                    self.flag("PG_uptodate") | self.flag("PG_dirty") | self.flag("PG_lru")
                }
                PageKind::Writeback => self.flag("PG_uptodate") | self.flag("PG_writeback"),
                PageKind::Locked => self.flag("PG_locked") | self.flag("PG_uptodate"),
                PageKind::NotUptodate => self.flag("PG_lru"),
                PageKind::Shmem => {
                    self.flag("PG_uptodate") | self.flag("PG_swapbacked") | self.flag("PG_lru")
                }
                other => panic!("the builder makes no {other:?} pages"),
            };
            ram.put_pa(page_pa + off(p, "page", "flags"), flags, 8);
            ram.put_pa(page_pa + off(p, "page", "mapping"), mapping, 8);
            ram.put_pa(page_pa + off(p, "page", "index"), cp.index, 8);
            ram.put_bytes_pa(cp.pfn * 4096, &cp.bytes);
            items.insert(cp.index, self.page_va(cp.pfn));
        }
        if !items.is_empty() {
            build_radix_tree(ram, p, mapping + off(p, "address_space", "i_pages"), &items);
        }
    }
}

/// Maps the 2 MiB page at `va` to `pa` in the 4-level tables rooted at `pml4`
/// (guest-physical), allocating the lower tables from the heap.
pub fn map_2m(ram: &mut Ram, pml4: u64, va: u64, pa: u64) {
    let mut table = pml4;
    for shift in [39u32, 30] {
        let at = table + ((va >> shift) & 511) * 8;
        let e = u64::from_le_bytes(ram.bytes[at as usize..at as usize + 8].try_into().unwrap());
        table = if e & 1 == 1 {
            e & 0x000f_ffff_ffff_f000
        } else {
            let t = ram.alloc_pa(4096, 4096);
            ram.put_pa(at, t | 3, 8);
            t
        };
    }
    let at = table + ((va >> 21) & 511) * 8;
    ram.put_pa(at, pa | 0x83, 8);
}
