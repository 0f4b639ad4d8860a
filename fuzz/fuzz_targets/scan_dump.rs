//! Fuzz the whole introspection pipeline on a mutated real guest image.
//!
//! `PCT_FUZZ_DUMP` names a raw RAM file of a lab guest (e.g. a copy of
//! /dev/shm/pct-lab-*), `PCT_FUZZ_PROFILE` its profile. Each input is a list of
//! (guest-physical page, offset, 8-byte value) writes applied to a private
//! copy-on-write mapping of the image; the scan, and the build of a profile from the
//! image alone (kallsyms, BTF, module BTF), must return a result or an error, never
//! panic, hang or grow without bound. Run with
//! `cargo fuzz run scan_dump -- -max_total_time=600 -rss_limit_mb=2048`.
#![no_main]

use libfuzzer_sys::fuzz_target;
use pct::introspect::{scan, ScanOptions};
use pct::memory::GuestMemory;
use pct::profile::Profile;
use std::sync::OnceLock;

struct Base {
    file: std::fs::File,
    profile: Profile,
    /// Pages the unmutated walk reads most: the kernel structures worth corrupting.
    hot: Vec<u64>,
}

fn base() -> &'static Base {
    static B: OnceLock<Base> = OnceLock::new();
    B.get_or_init(|| {
        let dump = std::env::var("PCT_FUZZ_DUMP").expect("set PCT_FUZZ_DUMP to a raw guest RAM file");
        let profile = std::env::var("PCT_FUZZ_PROFILE").expect("set PCT_FUZZ_PROFILE to its profile");
        let profile = Profile::load(profile.as_ref()).expect("profile");
        let file = std::fs::File::open(&dump).expect("dump");
        let mem = GuestMemory::open(dump.as_ref()).expect("map dump");
        let k = pct::kernel::Kernel::locate(&mem, &profile).expect("the unmutated dump must locate");
        let walk = pct::walk::fs::walk_page_cache(&k).expect("the unmutated dump must walk");
        let mut hot: Vec<u64> = walk
            .inodes
            .iter()
            .map(|i| i.va)
            .chain(walk.inodes.iter().map(|i| i.mapping))
            .chain(walk.super_blocks.iter().map(|s| s.va))
            .filter_map(|va| k.va_to_pa(va))
            .map(|pa| pa / 4096)
            .collect();
        // What the from-memory profile build reads: VMCOREINFO, kallsyms, the BTF blobs.
        if let Ok(Some((info, method))) = pct::kernel::find_vmcoreinfo(&mem) {
            if let Ok(loc) = pct::kernel::Location::from_vmcoreinfo(&info, method) {
                if let Ok(ks) = pct::kernel::kallsyms::Kallsyms::read(&mem, &loc, &info) {
                    let t = ks.tables;
                    let mut vas = vec![t.num_syms, t.token_table, t.token_index, t.offsets];
                    vas.extend((0..16).map(|i| t.names + i * 4096));
                    if let Some(btf) = ks.lookup_name("__start_BTF") {
                        vas.extend((0..64).map(|i| btf + i * 16384));
                    }
                    hot.extend(vas.into_iter().filter_map(|va| loc.va_to_pa(&mem, va)).map(|pa| pa / 4096));
                }
            }
        }
        hot.sort_unstable();
        hot.dedup();
        Base { file, profile, hot }
    })
}

fuzz_target!(|data: &[u8]| {
    let b = base();
    // SAFETY: a private copy-on-write mapping: writes stay in this process.
    let mut map = match unsafe { memmap2::MmapOptions::new().map_copy(&b.file) } {
        Ok(m) => m,
        Err(_) => return,
    };
    for w in data.chunks_exact(12) {
        let sel = u32::from_le_bytes([w[0], w[1], w[2], 0]) as usize;
        let page = b.hot[sel % b.hot.len()];
        let off = (page * 4096) as usize + (w[3] as usize % 512) * 8;
        if let Some(dst) = map.get_mut(off..off + 8) {
            dst.copy_from_slice(&w[4..12]);
        }
    }
    let Ok(map) = map.make_read_only() else { return };
    let Ok(mem) = GuestMemory::from_map(map, "fuzzed dump") else { return };
    let _ = scan(&mem, &b.profile, None, ScanOptions { cross_check: true, verify: false, free_pages: true });
    let _ = pct::kernel::self_profile::build_profile_from_memory(&mem);
});
