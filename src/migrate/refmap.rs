//! The cache map seen from the migration stream: which (RAM block, offset) pages the
//! destination can restore from its disk, and where on the disk they are.
//!
//! The cache map is in guest-physical addresses; QEMU's stream addresses pages by RAM block
//! and offset inside the block. For the block behind a `memory-backend-file` (named after
//! the backend object, e.g. `ram0`) the offset in the block is the offset in the backend's
//! file, and QEMU's flat memory map (`info mtree -f`, [`crate::memory::Region`]) says which
//! guest-physical ranges show which file offsets. Pages of other blocks (VGA RAM, ROMs) are
//! never referenced.

use crate::cachemap::CacheMap;
use crate::memory::Region;

const PAGE: u64 = 4096;

/// One contiguous piece: `len` bytes at block offset `offset` are on disk at `disk_offset`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Piece {
    offset: u64,
    disk_offset: u64,
    len: u64,
}

/// Page-granular lookup from RAM block offsets to disk offsets, for one RAM block.
#[derive(Debug, Clone, Default)]
pub struct RefMap {
    block: String,
    /// Sorted by `offset`, non-overlapping.
    pieces: Vec<Piece>,
    /// Index of the piece the last lookup hit (the stream is mostly ascending).
    hint: usize,
}

impl RefMap {
    /// Builds the lookup for RAM block `block` from `map`, through `regions` (guest-physical
    /// ranges of that block). Pieces that are not page aligned are trimmed to whole pages.
    pub fn new(block: &str, map: &CacheMap, regions: &[Region]) -> RefMap {
        let mut pieces = Vec::new();
        for run in &map.runs {
            let (Some(run_end), true) = (run.gpa.checked_add(run.len), run.len > 0) else {
                continue;
            };
            for r in regions {
                let Some(r_end) = r.gpa.checked_add(r.len) else {
                    continue;
                };
                let start = run.gpa.max(r.gpa);
                let end = run_end.min(r_end);
                if start >= end {
                    continue;
                }
                // Whole pages only, in both address spaces.
                let skip = (PAGE - start % PAGE) % PAGE;
                let start = start + skip;
                let end = end - end % PAGE;
                if start >= end {
                    continue;
                }
                let disk_offset = run.disk_offset + (start - run.gpa);
                if !disk_offset.is_multiple_of(512) {
                    continue;
                }
                pieces.push(Piece {
                    offset: r.offset + (start - r.gpa),
                    disk_offset,
                    len: end - start,
                });
            }
        }
        pieces.sort_by_key(|p| p.offset);
        // Drop overlaps (a broken map or a broken memory map): keep the first.
        let mut clean: Vec<Piece> = Vec::with_capacity(pieces.len());
        for p in pieces {
            match clean.last() {
                Some(last) if p.offset < last.offset + last.len => continue,
                _ => clean.push(p),
            }
        }
        RefMap {
            block: block.to_owned(),
            pieces: clean,
            hint: 0,
        }
    }

    /// The RAM block this map is for.
    pub fn block(&self) -> &str {
        &self.block
    }

    /// Bytes covered.
    pub fn bytes(&self) -> u64 {
        self.pieces.iter().map(|p| p.len).sum()
    }

    pub fn pages(&self) -> u64 {
        self.bytes() / PAGE
    }

    /// Disk offset of the page at `offset` in the block, if the map covers it.
    pub fn lookup(&mut self, offset: u64) -> Option<u64> {
        let hit = |p: &Piece| (p.offset..p.offset + p.len).contains(&offset);
        for i in [self.hint, self.hint + 1] {
            if let Some(p) = self.pieces.get(i) {
                if hit(p) {
                    self.hint = i;
                    return Some(p.disk_offset + (offset - p.offset));
                }
            }
        }
        let i = self.pieces.partition_point(|p| p.offset + p.len <= offset);
        let p = self.pieces.get(i).filter(|p| hit(p))?;
        self.hint = i;
        Some(p.disk_offset + (offset - p.offset))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cachemap::Run;

    fn run(gpa: u64, disk: u64, len: u64) -> Run {
        Run {
            gpa,
            disk_offset: disk,
            len,
            dev: "vda".into(),
            ino: None,
            file_offset: None,
            path: None,
        }
    }

    #[test]
    fn translates_through_regions() {
        let map = CacheMap {
            runs: vec![
                run(0x9f000, 0x10000, 0x3000),
                run(0x1_0000_0000, 0x80000, 0x2000),
            ],
            ..Default::default()
        };
        // Low RAM identity up to 0xa0000, then 0x100000.., and 4 GiB+ continuing at 0xc0000000.
        let regions = [
            Region {
                gpa: 0,
                offset: 0,
                len: 0xa0000,
            },
            Region {
                gpa: 0x100000,
                offset: 0x100000,
                len: 0xbff00000,
            },
            Region {
                gpa: 0x1_0000_0000,
                offset: 0xc000_0000,
                len: 0x4000_0000,
            },
        ];
        let mut m = RefMap::new("ram0", &map, &regions);
        assert_eq!(m.lookup(0x9f000), Some(0x10000));
        // 0xa0000.. is the VGA hole: not RAM of this block.
        assert_eq!(m.lookup(0xa0000), None);
        assert_eq!(m.lookup(0xc000_1000), Some(0x81000));
        assert_eq!(m.lookup(0xc000_2000), None);
        assert_eq!(m.pages(), 3);
    }
}
