//! The buddy allocator's view of a page frame: how a kernel marks the head of a free block
//! (`PageBuddy`, [`BuddyMark`]), `buddy_order`, `is_free_buddy_page` (mm/page_alloc.c) over
//! the `struct page` array, and what the kernel expects a free page to hold
//! (`init_on_free`, page poisoning), for free-page elision.

use super::page::Pages;
use super::{at_va, need, WalkError};
use crate::kernel::Kernel;
use crate::profile::kernel_version;

/// How this kernel marks a `struct page` as the head of a free block in the buddy
/// allocator (`PageBuddy`): the encoding changed four times.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BuddyMark {
    /// Up to 2.6.37: a page flag, `PG_buddy`.
    Flag { bit: u32 },
    /// 2.6.38 to 4.16: `_mapcount` holds `PAGE_BUDDY_MAPCOUNT_VALUE` (-128).
    MapcountValue { value: u32 },
    /// 4.17 to 6.11: in the word `_mapcount` shares with `page_type`, a type is a bit
    /// *cleared* under a base: `(page_type & (base | flag)) == base` (up to 6.8 base
    /// 0xf0000000 and `PG_buddy` 0x80, `#define`s; from 6.9 `enum pagetype`).
    ClearedBit { base: u32, flag: u32 },
    /// From 6.12: the top byte of `page_type` is the type, `PGTY_buddy` (`enum pagetype`).
    TopByte { buddy: u32 },
}

impl BuddyMark {
    /// From the profile: its `enum pagetype` or `enum pageflags` where they say, else the
    /// `#define`s of kernels up to 6.8 (told apart by the profile's release).
    pub fn from_profile(p: &crate::profile::Profile) -> Result<BuddyMark, WalkError> {
        let pagetype = |n: &str| {
            p.enum_value("pagetype", n)
                .and_then(|v| u32::try_from(v & 0xffff_ffff).ok())
        };
        if let Some(buddy) = pagetype("PGTY_buddy") {
            return Ok(BuddyMark::TopByte { buddy });
        }
        if let Some(flag) = pagetype("PG_buddy") {
            let base = pagetype("PAGE_TYPE_BASE").ok_or_else(|| {
                WalkError::ProfileLacks("enum pagetype PAGE_TYPE_BASE (beside PG_buddy)".into())
            })?;
            return Ok(BuddyMark::ClearedBit { base, flag });
        }
        if let Some(bit) = p.pageflag("PG_buddy") {
            return Ok(BuddyMark::Flag { bit });
        }
        let release = p.kernel.release.as_deref().unwrap_or("");
        match kernel_version(release) {
            Some(v) if v < (2, 6, 38) => Err(WalkError::ProfileLacks(format!(
                "enum pageflags PG_buddy, which kernel {release:?} marks free pages with"
            ))),
            Some(v) if v < (4, 17, 0) => Ok(BuddyMark::MapcountValue {
                value: -128i32 as u32,
            }),
            Some(v) if v < (6, 9, 0) => Ok(BuddyMark::ClearedBit {
                base: 0xf000_0000,
                flag: 0x80,
            }),
            _ => Err(WalkError::ProfileLacks(format!(
                "enum pagetype, which kernel {release:?} marks free pages with                  (rebuild the profile with this pct: `pct-introspect build-profile`)"
            ))),
        }
    }

    /// `PageBuddy`, from a page's `flags` and the `_mapcount`/`page_type` word.
    pub fn page_buddy(self, flags: u64, page_type: u32) -> bool {
        match self {
            BuddyMark::Flag { bit } => flags >> bit & 1 == 1,
            BuddyMark::MapcountValue { value } => page_type == value,
            BuddyMark::ClearedBit { base, flag } => page_type & (base | flag) == base,
            BuddyMark::TopByte { buddy } => page_type >> 24 == buddy,
        }
    }
}

/// The largest buddy order pct accepts (x86-64's MAX_PAGE_ORDER is 10; a few
/// configurations raise it): a larger one in `private` is a torn or hostile read.
pub const MAX_ORDER: u32 = 15;

/// The byte page poisoning fills free pages with (`PAGE_POISON`, include/linux/poison.h).
pub const PAGE_POISON: u8 = 0xaa;

/// Whether a page's bytes are page poisoning's pattern: such a free page is not elided (the
/// kernel checks the pattern when it hands the page out again).
pub fn is_poisoned(page: &[u8]) -> bool {
    !page.is_empty() && page.iter().all(|&b| b == PAGE_POISON)
}

/// Reads the buddy allocator's marks from `struct page`s.
pub struct Buddy<'k, 'a> {
    k: &'k Kernel<'a>,
    pages: Pages,
    mark: BuddyMark,
    mapcount_off: u64,
    private_off: u64,
}

impl<'k, 'a> Buddy<'k, 'a> {
    pub fn new(k: &'k Kernel<'a>) -> Result<Self, WalkError> {
        let p = k.profile;
        Ok(Buddy {
            k,
            pages: Pages::new(k)?,
            mark: BuddyMark::from_profile(p)?,
            mapcount_off: need(p, "page", "_mapcount")?,
            private_off: need(p, "page", "private")?,
        })
    }

    /// `PageBuddy(pfn_to_page(pfn)) ? buddy_order(page)`: the order of the free block that
    /// starts at `pfn`, or `None` if no free block starts there. An order above
    /// [`MAX_ORDER`], or one the block is not aligned to, is a torn read: `None`.
    pub fn buddy_order(&self, pfn: u64) -> Result<Option<u32>, WalkError> {
        let va = self.pages.pfn_to_page(pfn);
        let b = self.k.read(va, self.pages.struct_size(), "struct page")?;
        let b = at_va(&b, va, "page");
        let (flags, _, _) = self.pages.fields(&b)?;
        if !self
            .mark
            .page_buddy(flags, b.u32(self.mapcount_off, "_mapcount")?)
        {
            return Ok(None);
        }
        let order = b.u64(self.private_off, "private")?;
        Ok(
            (order <= u64::from(MAX_ORDER) && pfn.is_multiple_of(1 << order))
                .then_some(order as u32),
        )
    }

    /// `is_free_buddy_page`: whether frame `pfn` lies in a free block of the buddy
    /// allocator, i.e. some block head at or below it, aligned to its order, covers it.
    /// Frames on the per-CPU lists are free too but not in a block: `false`.
    pub fn is_free_buddy_page(&self, pfn: u64) -> Result<bool, WalkError> {
        Ok(self.free_block_of(pfn)?.is_some())
    }

    /// The free block [`is_free_buddy_page`](Self::is_free_buddy_page) finds `pfn` in: its
    /// head frame and order.
    pub fn free_block_of(&self, pfn: u64) -> Result<Option<(u64, u32)>, WalkError> {
        for order in 0..=MAX_ORDER {
            let head = pfn & !((1u64 << order) - 1);
            if let Some(o) = self.buddy_order(head)?.filter(|&o| o >= order) {
                return Ok(Some((head, o)));
            }
        }
        Ok(None)
    }
}

/// What the guest kernel makes of free pages' bytes, from its static keys (`None`:
/// unknown: the kernel predates the key, or it could not be read).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
pub struct FreePageInit {
    /// `init_on_free`: free pages are zeroed when freed, so a zero page is exact.
    pub init_on_free: Option<bool>,
    /// Page poisoning: free pages hold [`PAGE_POISON`] and are checked when handed out
    /// again; pct does not elide a page that holds the pattern.
    pub poisoning: Option<bool>,
}

impl FreePageInit {
    /// Reads the static keys `init_on_free` (5.3 and later) and `_page_poisoning_enabled`
    /// (5.11 and later): a `struct static_key` starts with its `atomic_t enabled`, above 0
    /// when on. A key the profile records as absent from a kernel at least that new was
    /// not built in (`CONFIG_PAGE_POISONING` off), so it is off; on older kernels, or where
    /// the key cannot be read, the setting is unknown.
    pub fn read(k: &Kernel) -> FreePageInit {
        let version = k.profile.kernel.release.as_deref().and_then(kernel_version);
        let key = |name: &str, since: (u32, u32, u32)| {
            let Some(va) = k.symbol(name) else {
                let absent = k
                    .profile
                    .absent
                    .iter()
                    .any(|a| a.kind == "symbol" && a.key == name);
                return (absent && version.is_some_and(|v| v >= since)).then_some(false);
            };
            let on = k.loc.read_u32(k.mem, va, name).ok()? as i32 > 0;
            Some(on)
        };
        FreePageInit {
            init_on_free: key("init_on_free", (5, 3, 0)),
            poisoning: key("_page_poisoning_enabled", (5, 11, 0)),
        }
    }

    /// One line for reports.
    pub fn describe(&self) -> String {
        let s = |v: Option<bool>| match v {
            Some(true) => "on",
            Some(false) => "off",
            None => "unknown",
        };
        let what = match self.poisoning {
            Some(false) | None => "free pages are elided (sent as zero pages)",
            Some(true) => "poisoned free pages are sent as they are (they compress to nothing)",
        };
        format!(
            "init_on_free {}, page poisoning {}: {what}; a page holding the poison pattern is never elided",
            s(self.init_on_free),
            s(self.poisoning)
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buddy_marks() {
        // 6.1: a free head has bit 0x80 cleared under 0xf0000000; a page never mapped has
        // _mapcount -1, a mapped one 0 and up.
        let old = BuddyMark::ClearedBit {
            base: 0xf000_0000,
            flag: 0x80,
        };
        assert!(old.page_buddy(0, 0xffff_ff7f));
        assert!(!old.page_buddy(0, 0xffff_ffff));
        assert!(!old.page_buddy(0, 0));
        assert!(!old.page_buddy(0, 0xffff_feff), "PG_offline, not buddy");
        // 6.12: the top byte is the type.
        let new = BuddyMark::TopByte { buddy: 0xf0 };
        assert!(new.page_buddy(0, 0xf000_0000));
        assert!(!new.page_buddy(0, 0xf100_0000));
        assert!(!new.page_buddy(0, 0xffff_ffff));
        assert!(BuddyMark::Flag { bit: 19 }.page_buddy(1 << 19, 0));
        // 4.9: _mapcount -128 exactly.
        let v49 = BuddyMark::MapcountValue {
            value: -128i32 as u32,
        };
        assert!(v49.page_buddy(0, 0xffff_ff80));
        assert!(!v49.page_buddy(0, 0xffff_ff7f));
        assert_eq!(kernel_version("6.1.0-57-amd64"), Some((6, 1, 0)));
        assert_eq!(kernel_version("2.6.32-5-amd64"), Some((2, 6, 32)));
        assert_eq!(kernel_version("junk"), None);
    }
}
