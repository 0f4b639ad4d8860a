//! x86_64 page-table walks (4- and 5-level) over guest-physical memory, for kernel
//! virtual addresses outside the direct map (vmemmap, vmalloc, the kernel image).

use crate::memory::GuestMemory;

const PRESENT: u64 = 1;
const PSE: u64 = 1 << 7;
const ADDR_MASK: u64 = 0x000f_ffff_ffff_f000;

/// Translates `va` through the page tables rooted at guest-physical `pgd`.
/// Returns the guest-physical address, or None if unmapped or unreadable.
pub fn translate(mem: &GuestMemory, pgd: u64, levels: u8, va: u64) -> Option<u64> {
    let mut table = pgd & ADDR_MASK;
    let top_shift: u32 = if levels == 5 { 48 } else { 39 };
    let mut shift = top_shift;
    loop {
        let index = (va >> shift) & 0x1ff;
        let entry = mem.read_u64(table + index * 8).ok()?;
        if entry & PRESENT == 0 {
            return None;
        }
        // 1 GiB (shift 30) and 2 MiB (shift 21) leaves.
        if shift == 12 || ((shift == 30 || shift == 21) && entry & PSE != 0) {
            let page_mask = (1u64 << shift) - 1;
            return Some((entry & ADDR_MASK & !page_mask) | (va & page_mask));
        }
        table = entry & ADDR_MASK;
        shift -= 9;
    }
}
