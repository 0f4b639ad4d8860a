//! Volatility 2 profiles (Debian 6.0.8 / 7.3 / 9.4) import into profiles the radix-tree
//! walker can use; the shipped `profiles/debian-*.json`, where shipped, are exactly what the
//! importer makes.

mod support;

use pct::profile::{vol2, PageCacheTree, Profile};
use support::profile::shared;
use support::repo;

/// (zip, shipped profile, expected generation, release)
const CASES: &[(&str, &str, PageCacheTree, &str)] = &[
    (
        "Debian608.zip",
        "debian-2.6.32.json",
        PageCacheTree::RadixHeight,
        "2.6.32-5-amd64",
    ),
    (
        "Debian73.zip",
        "debian-3.2.json",
        PageCacheTree::RadixHeight,
        "3.2.0-4-amd64",
    ),
    (
        "Debian94.zip",
        "debian-4.9.json",
        PageCacheTree::RadixShift,
        "4.9.0-6-amd64",
    ),
];

fn import(zip: &str) -> Option<Profile> {
    let path = shared().join("volatility2-profiles").join(zip);
    if !path.exists() {
        support::profile::skip_or_fail(&format!("{} is not there", path.display()));
        return None;
    }
    Some(vol2::import_zip(&path).unwrap_or_else(|e| panic!("{zip}: {e}")))
}

#[test]
fn volatility2_imports_have_radix_tree_walker_fields() {
    for (zip, _, generation, release) in CASES {
        let Some(p) = import(zip) else { return };
        assert_eq!(p.kernel.release.as_deref(), Some(*release));
        assert_eq!(p.page_cache_tree(), Some(*generation), "{zip}");
        // Chunk size from the DWARF slots[] array length.
        let slots = p.tree_slots().expect("radix_tree_node.slots has a length");
        assert!(
            slots.is_power_of_two() && slots >= 16,
            "{zip}: slots {slots}"
        );
        let node = p.layout("radix_tree_node").unwrap();
        assert!(node.fields["count"].size > 0);
        assert_eq!(node.fields["slots"].size, slots * 8);
        assert!(p.field("radix_tree_root", "rnode").is_some(), "{zip}");
        let i_pages = p.field("address_space", "i_pages").expect("page tree");
        assert_eq!(
            i_pages.name.as_deref(),
            Some("page_tree"),
            "{zip}: pre-4.17 name"
        );
        assert!(i_pages.type_name.contains("radix_tree_root"));
        for f in ["host", "nrpages"] {
            assert!(
                p.field("address_space", f).is_some(),
                "{zip}: address_space.{f}"
            );
        }
        for f in ["flags", "mapping", "index"] {
            assert!(p.field("page", f).is_some(), "{zip}: page.{f}");
        }
        for f in ["i_mapping", "i_size", "i_sb_list", "i_sb", "i_ino"] {
            assert!(p.field("inode", f).is_some(), "{zip}: inode.{f}");
        }
        for f in ["s_list", "s_inodes", "s_bdev", "s_blocksize_bits"] {
            assert!(
                p.field("super_block", f).is_some(),
                "{zip}: super_block.{f}"
            );
        }
        for s in ["init_task", "super_blocks", "linux_banner", "init_top_pgt"] {
            assert!(p.symbol(s).is_some(), "{zip}: symbol {s}");
        }
        // Distinct members of a struct never share an offset (dwarfdump's `208 (-48)`
        // once read as 0 put s_bdev on top of s_list).
        for ty in ["super_block", "inode", "block_device", "address_space"] {
            let l = p.layout(ty).unwrap();
            let mut seen = std::collections::BTreeMap::new();
            for (name, f) in &l.fields {
                if let Some(other) = seen.insert(f.offset, name.clone()) {
                    panic!(
                        "{zip}: {ty}.{name} and {ty}.{other} both at offset {}",
                        f.offset
                    );
                }
            }
        }
        // Generation-specific node fields agree with the generation.
        let has = |f: &str| node.fields.contains_key(f);
        match generation {
            PageCacheTree::RadixHeight => assert!(has("height") && !has("shift")),
            PageCacheTree::RadixShift => assert!(has("shift") && !has("height")),
            _ => unreachable!(),
        }
        // The dumps carry no `enum pageflags`: the importer adds the kernel line's numbers,
        // cites them, and lists the config-dependent enumerators it left out.
        let flags = &p.enums["pageflags"].values;
        for f in [
            "PG_locked",
            "PG_uptodate",
            "PG_dirty",
            "PG_writeback",
            "PG_head",
        ] {
            assert!(flags.contains_key(f), "{zip}: {f}");
        }
        assert!(
            p.source
                .inputs
                .iter()
                .any(|i| i.contains("include/linux/page-flags.h")),
            "{zip}: the numbers are cited"
        );
        assert!(!p.absent.iter().any(|a| a.key == "pageflags"), "{zip}");
        assert!(
            p.absent
                .iter()
                .any(|a| a.kind == "enumerator" && a.key == "pageflags.PG_hwpoison"),
            "{zip}: PG_hwpoison's number depends on the config: left out"
        );
        // PG_buddy marked free pages until 2.6.37; PG_tail existed until 4.3.
        assert_eq!(flags.contains_key("PG_buddy"), *release == "2.6.32-5-amd64");
        assert_eq!(flags.contains_key("PG_tail"), *release != "4.9.0-6-amd64");
    }
}

#[test]
fn shipped_volatility2_profiles_are_current() {
    for (zip, shipped, _, _) in CASES {
        let Some(mut fresh) = import(zip) else { return };
        // Shipped profiles are a convenience: check each one that is there.
        let path = repo().join("profiles").join(shipped);
        if !path.exists() {
            eprintln!("profiles/{shipped} is not shipped: nothing to compare");
            continue;
        }
        let mut on_disk = Profile::load(&path).unwrap_or_else(|e| panic!("{shipped}: {e}"));
        fresh.source.generator.clear();
        on_disk.source.generator.clear();
        assert_eq!(
            fresh, on_disk,
            "profiles/{shipped} is stale: re-run the import"
        );
    }
}
