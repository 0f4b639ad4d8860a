//! The guest's own page-flag numbers: VMCOREINFO publishes some of `enum pageflags`
//! (`NUMBER(PG_lru)`, `NUMBER(PG_private)`, `NUMBER(PG_swapcache)` since 2.6.2x;
//! `NUMBER(PG_slab)`, `NUMBER(PG_head_mask)` = `1 << PG_head`, `NUMBER(PG_hwpoison)` since
//! 3.x; `NUMBER(PG_swapbacked)` since 4.17). They describe the running kernel, so they take
//! precedence over the profile's numbers (an imported profile's come from a table; a
//! profile of a rebuilt kernel may be a near miss). Each change is recorded so the report
//! can say so.

use super::vmcoreinfo::VmcoreInfo;
use crate::profile::model::EnumDef;
use crate::profile::Profile;
use std::borrow::Cow;

/// The `NUMBER(…)` keys that are page-flag bit numbers (newer kernels also publish
/// `NUMBER(PG_hugetlb)` and the like, which are page *types*, not flags).
const FLAG_NUMBERS: [&str; 6] = [
    "PG_lru",
    "PG_private",
    "PG_swapcache",
    "PG_swapbacked",
    "PG_slab",
    "PG_hwpoison",
];

/// One page flag whose number VMCOREINFO gave differently from the profile (or that the
/// profile lacked).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct PageflagOverride {
    pub flag: String,
    /// The profile's number; None when the profile did not have it.
    pub profile: Option<i64>,
    pub vmcoreinfo: i64,
}

impl std::fmt::Display for PageflagOverride {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.profile {
            Some(p) => write!(f, "{} {} -> {} (VMCOREINFO)", self.flag, p, self.vmcoreinfo),
            None => write!(
                f,
                "{} = {} (VMCOREINFO; not in the profile)",
                self.flag, self.vmcoreinfo
            ),
        }
    }
}

/// The page-flag numbers VMCOREINFO carries, by enumerator name. Values that cannot be
/// bit numbers of a 64-bit `page->flags` (a hostile or corrupt note) are left out.
pub fn vmcoreinfo_pageflags(info: &VmcoreInfo) -> Vec<(String, i64)> {
    let mut out: Vec<(String, i64)> = FLAG_NUMBERS
        .iter()
        .filter_map(|&n| Some((n.to_owned(), info.number(n)?)))
        .filter(|(_, v)| (0..64).contains(v))
        .collect();
    if let Some(mask) = info.number("PG_head_mask") {
        if mask > 0 && (mask as u64).is_power_of_two() {
            out.push(("PG_head".to_owned(), i64::from(mask.trailing_zeros())));
        }
    }
    out
}

/// `profile` with VMCOREINFO's page-flag numbers applied, and what changed. Borrowed
/// unchanged when nothing differs.
pub fn apply<'p>(
    profile: &'p Profile,
    info: &VmcoreInfo,
) -> (Cow<'p, Profile>, Vec<PageflagOverride>) {
    let mut changed = Vec::new();
    for (flag, v) in vmcoreinfo_pageflags(info) {
        let old = profile.enum_value("pageflags", &flag);
        if old != Some(v) {
            changed.push(PageflagOverride {
                flag,
                profile: old,
                vmcoreinfo: v,
            });
        }
    }
    if changed.is_empty() {
        return (Cow::Borrowed(profile), changed);
    }
    let mut p = profile.clone();
    let e = p
        .enums
        .entry("pageflags".into())
        .or_insert_with(|| EnumDef {
            name: None,
            size: 4,
            values: Default::default(),
        });
    for c in &changed {
        e.values.insert(c.flag.clone(), c.vmcoreinfo);
    }
    (Cow::Owned(p), changed)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn profile() -> Profile {
        let mut p = Profile::new("test");
        let values = [
            ("PG_locked", 0),
            ("PG_lru", 5),
            ("PG_head", 14),
            ("PG_swapcache", 16),
        ]
        .into_iter()
        .map(|(n, v)| (n.to_owned(), v))
        .collect();
        p.enums.insert(
            "pageflags".into(),
            EnumDef {
                name: None,
                size: 4,
                values,
            },
        );
        p
    }

    #[test]
    fn vmcoreinfo_numbers_override_and_are_reported() {
        let p = profile();
        let info = VmcoreInfo::parse(
            "OSRELEASE=4.9.0-6-amd64\nNUMBER(PG_lru)=5\nNUMBER(PG_swapcache)=15\n\
             NUMBER(PG_head_mask)=16384\nNUMBER(PG_slab)=7\nNUMBER(PG_hugetlb)=4\n",
        );
        let (q, changed) = apply(&p, &info);
        assert_eq!(
            changed,
            vec![
                PageflagOverride {
                    flag: "PG_swapcache".into(),
                    profile: Some(16),
                    vmcoreinfo: 15
                },
                PageflagOverride {
                    flag: "PG_slab".into(),
                    profile: None,
                    vmcoreinfo: 7
                },
            ]
        );
        assert_eq!(q.pageflag("PG_swapcache"), Some(15));
        assert_eq!(q.pageflag("PG_slab"), Some(7));
        assert_eq!(q.pageflag("PG_head"), Some(14));
        // A page type is not a page flag.
        assert_eq!(q.pageflag("PG_hugetlb"), None);
        assert_eq!(changed[0].to_string(), "PG_swapcache 16 -> 15 (VMCOREINFO)");
    }

    #[test]
    fn head_mask_gives_pg_head_and_nothing_changes_when_all_agree() {
        let p = profile();
        let info = VmcoreInfo::parse("NUMBER(PG_head_mask)=16384\nNUMBER(PG_lru)=5\n");
        let (q, changed) = apply(&p, &info);
        assert!(changed.is_empty());
        assert!(matches!(q, Cow::Borrowed(_)));
        let info = VmcoreInfo::parse("NUMBER(PG_head_mask)=1024\n");
        let (q, changed) = apply(&p, &info);
        assert_eq!(changed.len(), 1);
        assert_eq!(q.pageflag("PG_head"), Some(10));
    }

    #[test]
    fn impossible_numbers_are_ignored() {
        let p = profile();
        let info = VmcoreInfo::parse(
            "NUMBER(PG_lru)=64\nNUMBER(PG_private)=-1\nNUMBER(PG_head_mask)=12\nNUMBER(PG_slab)=x\n",
        );
        let (q, changed) = apply(&p, &info);
        assert!(changed.is_empty(), "{changed:?}");
        assert_eq!(q.pageflag("PG_lru"), Some(5));
    }
}
