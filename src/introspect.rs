//! The introspection pipeline end to end, as `pct-introspect scan` and the migration
//! sender run it: guest memory → kernel located → page-cache walk → cache map, with
//! the optional linear-scan cross-check and disk verification, timed stage by stage.

use crate::cachemap::{self, CacheMap, FreePages};
use crate::kernel::{find_vmcoreinfo, overrides, Kernel, LocateError};
use crate::memory::GuestMemory;
use crate::profile::Profile;
use crate::report::{self, CrossCheck, KernelSummary, ScanReport};
use crate::walk::buddy::FreePageInit;
use crate::walk::fs::walk_page_cache;
use crate::walk::page_scan::for_each_page;
use crate::walk::WalkError;
use std::collections::{BTreeMap, BTreeSet};
use std::time::Instant;

#[derive(Debug, thiserror::Error)]
pub enum ScanError {
    #[error(transparent)]
    Locate(#[from] LocateError),
    #[error("walking the page cache: {0}")]
    Walk(#[from] WalkError),
}

/// What to do besides building the map.
#[derive(Debug, Default, Clone, Copy)]
pub struct ScanOptions {
    /// Also scan the struct page array (census and cross-check).
    pub cross_check: bool,
    /// Byte-compare every run with the disk image.
    pub verify: bool,
    /// Also list the buddy allocator's free blocks ([`CacheMap::free`]), for free-page
    /// elision.
    pub free_pages: bool,
}

/// Builds the cache map of the guest in `mem` and a report about it.
pub fn scan(
    mem: &GuestMemory,
    profile: &Profile,
    disk: Option<&crate::disk::Disk>,
    opts: ScanOptions,
) -> Result<(CacheMap, ScanReport), ScanError> {
    let mut t = BTreeMap::new();
    let start = Instant::now();
    let mut lap = |name: &str, since: &mut Instant| {
        t.insert(name.to_owned(), since.elapsed().as_secs_f64() * 1e3);
        *since = Instant::now();
    };
    let mut since = Instant::now();
    // The guest's own page-flag numbers, where its VMCOREINFO has them, win over the
    // profile's (kernel/overrides.rs); the report lists each change.
    let found = find_vmcoreinfo(mem).map_err(LocateError::from)?;
    let (profile, pageflag_overrides) = match &found {
        Some((info, _)) => overrides::apply(profile, info),
        None => (std::borrow::Cow::Borrowed(profile), Vec::new()),
    };
    let profile: &Profile = &profile;
    let k = Kernel::locate_with(mem, profile, found)?;
    lap("locate", &mut since);
    let walk = walk_page_cache(&k)?;
    lap("walk", &mut since);
    let map = cachemap::build(&k, &walk, disk);
    lap("map", &mut since);

    let mut map = map;
    let mut census = None;
    let mut cross_check = None;
    let free_pages = |free| {
        Some(FreePages {
            blocks: free,
            loc: k.loc.clone(),
            init: FreePageInit::read(&k),
        })
    };
    if opts.free_pages && !opts.cross_check {
        map.free = free_pages(for_each_page(&k, &BTreeSet::new())?.free);
        lap("free_pages", &mut since);
    }
    if opts.cross_check {
        let mappings: BTreeSet<u64> = walk.inodes.iter().map(|i| i.mapping).collect();
        let lin = for_each_page(&k, &mappings)?;
        let tree: BTreeSet<(u64, u64, u64)> = walk
            .inodes
            .iter()
            .flat_map(|i| i.pages.iter().map(move |p| (p.pfn, i.mapping, p.index)))
            .collect();
        let linear: BTreeSet<(u64, u64, u64)> = lin
            .pages
            .iter()
            .map(|p| (p.pfn, p.mapping, p.index))
            .collect();
        cross_check = Some(CrossCheck {
            tree_pages: tree.len(),
            linear_pages: linear.len(),
            only_in_tree: tree.difference(&linear).count(),
            only_in_linear_scan: linear.difference(&tree).count(),
        });
        let mut c = lin.census;
        c.free_not_zero = report::free_not_zero(mem, &lin.free);
        census = Some(c);
        if opts.free_pages {
            map.free = free_pages(lin.free);
        }
        lap("cross_check", &mut since);
    }
    let verify = match (opts.verify, disk) {
        (true, Some(d)) => {
            let v = report::verify(mem, &map, d);
            lap("verify", &mut since);
            Some(v)
        }
        _ => None,
    };
    let (page_cache, filesystems, top_files) = report::summarise(&walk, &map);
    t.insert("total".into(), start.elapsed().as_secs_f64() * 1e3);
    let restorable = map.bytes();
    let report = ScanReport {
        source: mem.description().to_owned(),
        kernel: KernelSummary {
            release: k.loc.release.clone(),
            build_id: k.loc.build_id.clone(),
            located_by: k.loc.method,
            kaslr_offset: format!("{:#x}", k.loc.virt_offset),
        },
        ram_bytes: mem.total_bytes(),
        free_page_init: census.as_ref().map(|_| FreePageInit::read(&k)),
        census,
        page_cache,
        large_folios: report::large_folios(&walk),
        restorable_bytes: restorable,
        runs: map.runs.len(),
        filesystems,
        top_files,
        savings: report::savings(restorable),
        excluded: map.excluded.clone(),
        pageflag_overrides,
        verify,
        cross_check,
        problems: walk.problems.clone(),
        timings_ms: t,
        rss_anon_kib: report::rss_anon_kib(),
    };
    Ok((map, report))
}
