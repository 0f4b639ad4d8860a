//! `enum pageflags` of the kernel lines whose Volatility 2 profiles pct ships (Debian 6's
//! 2.6.32, Debian 7's 3.2, Debian 9's 4.9): their dumps do not describe the enum, so the
//! importer adds these numbers, taken from that line's `include/linux/page-flags.h` under
//! the configuration of Debian's amd64 kernels, and says so in the profile's `source`.
//!
//! The enum counts up from `PG_locked` = 0; `#ifdef`s shift what follows them. On x86_64
//! `CONFIG_PAGEFLAGS_EXTENDED` is always on (mm/Kconfig: `def_bool y`, `depends on 64BIT ||
//! …`) until 4.4 removed it, so 2.6.32 and 3.2 have `PG_head`/`PG_tail`, not
//! `PG_compound`; `PG_mlocked` needs `CONFIG_HAVE_MLOCKED_PAGE_BIT` (2.6.32) or `CONFIG_MMU`,
//! both on with an MMU. The enumerators after `PG_mlocked` depend on options not certain
//! here (`CONFIG_ARCH_USES_PG_UNCACHED` from `X86_PAT`, `CONFIG_MEMORY_FAILURE`,
//! `CONFIG_TRANSPARENT_HUGEPAGE`, `CONFIG_IDLE_PAGE_TRACKING`) and pct reads none of them:
//! they are listed as absent, never guessed. A guest's VMCOREINFO `NUMBER(PG_…)` values
//! override these at run time ([`crate::kernel::overrides`]).

use super::model::{Absent, EnumDef, Profile};
use std::collections::BTreeMap;

/// The page flags of one kernel line.
pub struct LineFlags {
    /// `(version, patchlevel)`.
    pub line: (u32, u32),
    /// As cited: `2.6.32`, `3.2`, `4.9`.
    pub name: &'static str,
    /// Enumerators of [`ORDER_2_6_32`] this line no longer has.
    pub removed: &'static [&'static str],
    /// Aliases beyond [`ALIASES`]: `(name, the enumerator it equals)`.
    pub more_aliases: &'static [(&'static str, &'static str)],
    /// Enumerators that follow, whose numbers depend on `uncertain` options.
    pub not_recorded: &'static [&'static str],
    pub config: &'static str,
    pub uncertain: &'static str,
}

/// The enum of 2.6.32 from `PG_locked` = 0 on (`CONFIG_PAGEFLAGS_EXTENDED`, an MMU), up
/// to the first config-dependent enumerator. Later lines only dropped enumerators from
/// it: `PG_buddy` in 2.6.38 (free pages marked by `_mapcount`), `PG_tail` in 4.4 (tail
/// pages marked by `compound_head`).
pub const ORDER_2_6_32: [&str; 23] = [
    "PG_locked",
    "PG_error",
    "PG_referenced",
    "PG_uptodate",
    "PG_dirty",
    "PG_lru",
    "PG_active",
    "PG_slab",
    "PG_owner_priv_1",
    "PG_arch_1",
    "PG_reserved",
    "PG_private",
    "PG_private_2",
    "PG_writeback",
    "PG_head",
    "PG_tail",
    "PG_swapcache",
    "PG_mappedtodisk",
    "PG_reclaim",
    "PG_buddy",
    "PG_swapbacked",
    "PG_unevictable",
    "PG_mlocked",
];

/// Aliases all three lines have.
pub const ALIASES: [(&str, &str); 5] = [
    ("PG_checked", "PG_owner_priv_1"),
    ("PG_fscache", "PG_private_2"),
    ("PG_pinned", "PG_owner_priv_1"),
    ("PG_savepinned", "PG_dirty"),
    ("PG_slob_free", "PG_private"),
];

/// The three lines, oldest first.
pub const LINES: [LineFlags; 3] = [
    LineFlags {
        line: (2, 6),
        name: "2.6.32",
        removed: &[],
        more_aliases: &[
            ("PG_slub_frozen", "PG_active"),
            ("PG_slub_debug", "PG_error"),
        ],
        not_recorded: &["PG_uncached", "PG_hwpoison"],
        config: "CONFIG_PAGEFLAGS_EXTENDED=y (64BIT), CONFIG_HAVE_MLOCKED_PAGE_BIT=y (MMU)",
        uncertain: "CONFIG_ARCH_USES_PG_UNCACHED, CONFIG_MEMORY_FAILURE",
    },
    LineFlags {
        line: (3, 2),
        name: "3.2",
        removed: &["PG_buddy"],
        more_aliases: &[],
        not_recorded: &["PG_uncached", "PG_hwpoison", "PG_compound_lock"],
        config: "CONFIG_PAGEFLAGS_EXTENDED=y (64BIT), CONFIG_MMU=y",
        uncertain:
            "CONFIG_ARCH_USES_PG_UNCACHED, CONFIG_MEMORY_FAILURE, CONFIG_TRANSPARENT_HUGEPAGE",
    },
    LineFlags {
        line: (4, 9),
        name: "4.9",
        removed: &["PG_buddy", "PG_tail"],
        more_aliases: &[
            ("PG_foreign", "PG_owner_priv_1"),
            ("PG_double_map", "PG_private_2"),
            ("PG_isolated", "PG_reclaim"),
        ],
        not_recorded: &["PG_uncached", "PG_hwpoison", "PG_young", "PG_idle"],
        config: "CONFIG_MMU=y (PG_head unconditional since 4.4)",
        uncertain: "CONFIG_ARCH_USES_PG_UNCACHED, CONFIG_MEMORY_FAILURE, CONFIG_IDLE_PAGE_TRACKING",
    },
];

impl LineFlags {
    /// The enum as a profile records it.
    pub fn enum_def(&self) -> EnumDef {
        let mut values: BTreeMap<String, i64> = ORDER_2_6_32
            .iter()
            .filter(|n| !self.removed.contains(n))
            .zip(0..)
            .map(|(n, v)| ((*n).to_owned(), v))
            .collect();
        for (alias, of) in ALIASES.iter().chain(self.more_aliases) {
            if let Some(&v) = values.get(*of) {
                values.insert((*alias).to_owned(), v);
            }
        }
        EnumDef {
            name: None,
            size: 4,
            values,
        }
    }

    /// The `source.inputs` line that says where the numbers come from.
    pub fn citation(&self) -> String {
        format!(
            "pct's table of Linux {} (the input has no enum pageflags): \
             include/linux/page-flags.h with {}; {} not recorded (they follow and depend \
             on {})",
            self.name,
            self.config,
            self.not_recorded.join(", "),
            self.uncertain
        )
    }
}

/// The line of `release` (`2.6.32-5-amd64`), if pct has its page flags.
pub fn for_release(release: &str) -> Option<&'static LineFlags> {
    let (v, p, s) = super::kernel_version(release)?;
    // 2.6.x lines differ by sublevel: only 2.6.32 is in the table.
    if (v, p) == (2, 6) && s != 32 {
        return None;
    }
    LINES.iter().find(|l| l.line == (v, p))
}

/// Adds the table's `enum pageflags` to an imported profile that lacks it: the enum, the
/// citation in `source.inputs`, and the config-dependent enumerators as absent.
/// Returns whether it did.
pub fn complete(p: &mut Profile) -> bool {
    if p.enums.contains_key("pageflags") {
        return false;
    }
    let Some(line) = p.kernel.release.as_deref().and_then(for_release) else {
        return false;
    };
    p.enums.insert("pageflags".into(), line.enum_def());
    p.absent
        .retain(|a| !(a.kind == "enum" && a.key == "pageflags"));
    for name in line.not_recorded {
        p.absent.push(Absent {
            kind: "enumerator".into(),
            key: format!("pageflags.{name}"),
            tried: vec![(*name).to_owned()],
            required: false,
            note: Some(format!("its number depends on {}", line.uncertain)),
        });
    }
    p.absent.sort();
    p.source.inputs.push(line.citation());
    true
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines_are_told_apart_by_release() {
        assert_eq!(for_release("2.6.32-5-amd64").map(|l| l.line), Some((2, 6)));
        assert!(for_release("2.6.38-2-amd64").is_none());
        assert_eq!(for_release("3.2.0-4-amd64").map(|l| l.line), Some((3, 2)));
        assert_eq!(for_release("4.9.0-6-amd64").map(|l| l.line), Some((4, 9)));
        assert!(for_release("4.19.0-1-amd64").is_none());
        assert!(for_release("junk").is_none());
    }

    #[test]
    fn numbers_agree_with_what_those_kernels_publish_in_vmcoreinfo() {
        // VMCOREINFO's NUMBER(PG_lru), NUMBER(PG_private), NUMBER(PG_swapcache) of each
        // line, and PG_head_mask = 1 << PG_head (4.9).
        for (release, lru, private, swapcache, head) in [
            ("2.6.32-5-amd64", 5, 11, 16, 14),
            ("3.2.0-4-amd64", 5, 11, 16, 14),
            ("4.9.0-6-amd64", 5, 11, 15, 14),
        ] {
            let e = for_release(release).unwrap().enum_def();
            let v = |n: &str| e.values[n];
            assert_eq!(
                (
                    v("PG_lru"),
                    v("PG_private"),
                    v("PG_swapcache"),
                    v("PG_head")
                ),
                (lru, private, swapcache, head),
                "{release}"
            );
            assert_eq!(v("PG_locked"), 0);
            assert_eq!(v("PG_checked"), v("PG_owner_priv_1"));
        }
        let old = for_release("2.6.32-5-amd64").unwrap().enum_def();
        assert_eq!(old.values["PG_buddy"], 19);
        assert_eq!(old.values["PG_tail"], 15);
        let new = for_release("4.9.0-6-amd64").unwrap().enum_def();
        assert!(!new.values.contains_key("PG_tail") && !new.values.contains_key("PG_buddy"));
        assert_eq!(new.values["PG_mlocked"], 20);
    }

    #[test]
    fn complete_adds_cites_and_lists_what_it_left_out() {
        let mut p = Profile::new("volatility2");
        p.kernel.release = Some("3.2.0-4-amd64".into());
        p.absent.push(Absent {
            kind: "enum".into(),
            key: "pageflags".into(),
            tried: vec!["pageflags".into()],
            required: true,
            note: None,
        });
        assert!(complete(&mut p));
        assert_eq!(p.pageflag("PG_swapbacked"), Some(19));
        assert!(!p.absent.iter().any(|a| a.key == "pageflags"));
        assert!(p
            .absent
            .iter()
            .any(|a| a.key == "pageflags.PG_compound_lock"));
        assert!(p.source.inputs.iter().any(|i| i.contains("page-flags.h")));
        // A profile with the enum is left alone.
        assert!(!complete(&mut p));
    }
}
