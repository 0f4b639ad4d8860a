//! Guest physical memory: one read-only, zero-copy view over wherever guest RAM is.
//!
//! Sources: a raw RAM file (QEMU `memory-backend-file`, a /dev/shm path or a copy),
//! an ELF core written by QEMU's `dump-guest-memory` (its PT_LOAD segments give the
//! guest-physical layout, its PT_NOTE may carry VMCOREINFO), or a live QEMU found
//! through QMP (see [`crate::qemu::ram`]). Everything above this module asks for guest-physical
//! ranges and gets byte slices or an error naming the address, and reads fields out of
//! them with [`reader::LeSlice`], which fails on a short read instead of making up a 0.

pub mod elfcore;
pub mod ondemand;
pub mod reader;

use memmap2::Mmap;
use ondemand::{OnDemand, ProcessMem};
use std::borrow::Cow;
use std::fs::File;
use std::path::{Path, PathBuf};

/// Why a read of guest memory failed.
#[derive(Debug, thiserror::Error)]
pub enum MemError {
    #[error("cannot open guest memory {path}: {source}")]
    Open {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: {msg}")]
    Format { path: PathBuf, msg: String },
    #[error("guest-physical {gpa:#x}+{len:#x} is outside guest RAM")]
    NotPresent { gpa: u64, len: u64 },
    #[error("reading guest-physical {gpa:#x}+{len:#x} from {path}: {source}")]
    Read {
        path: PathBuf,
        gpa: u64,
        len: u64,
        source: std::io::Error,
    },
}

/// One contiguous piece of guest-physical memory and where it lies in the mapping.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Region {
    pub gpa: u64,
    pub offset: u64,
    pub len: u64,
}

/// A read-only view of a guest's physical memory.
pub struct GuestMemory {
    backing: Backing,
    /// Sorted by `gpa`, non-overlapping, each inside the mapping.
    regions: Vec<Region>,
    vmcoreinfo: Option<String>,
    description: String,
    /// The QEMU RAM block this mapping *is*, for a live memory-backend-file: offsets in the
    /// mapping are that block's offsets, and its contents change as the guest runs.
    live_block: Option<String>,
}

/// Where the bytes of a [`GuestMemory`] are.
enum Backing {
    /// A mapping of a file (a RAM file, an image, a core) or of a copy.
    Mapped(Mmap),
    /// Another process's memory, each page copied in on its first read.
    OnDemand(OnDemand),
}

impl Backing {
    fn len(&self) -> u64 {
        match self {
            Backing::Mapped(map) => map.len() as u64,
            Backing::OnDemand(d) => d.process().len(),
        }
    }
}

/// Bytes per piece of [`GuestMemory::pieces`] read from another process, and how far
/// successive pieces overlap.
const PIECE: u64 = 8 << 20;
const PIECE_OVERLAP: u64 = 128 << 10;

/// How a raw RAM file maps to guest-physical addresses.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum RawLayout {
    /// The file is guest-physical memory from 0, in one piece (pc machines up to ~3 GiB).
    #[default]
    Identity,
    /// A pc machine's RAM block split at `below_4g`: the rest sits at 4 GiB and up.
    SplitAt4G { below_4g: u64 },
}

impl RawLayout {
    /// The guest-physical pieces of a RAM block of `len` bytes laid out this way.
    pub fn regions(self, len: u64) -> Vec<Region> {
        match self {
            RawLayout::SplitAt4G { below_4g } if below_4g < len => vec![
                Region {
                    gpa: 0,
                    offset: 0,
                    len: below_4g,
                },
                Region {
                    gpa: 1 << 32,
                    offset: below_4g,
                    len: len - below_4g,
                },
            ],
            _ => vec![Region {
                gpa: 0,
                offset: 0,
                len,
            }],
        }
    }
}

impl GuestMemory {
    /// Opens an ELF core (detected by its magic) or a raw RAM file.
    pub fn open(path: &Path) -> Result<GuestMemory, MemError> {
        Self::open_with(path, RawLayout::Identity)
    }

    /// Like [`open`](Self::open), with an explicit layout for raw files.
    pub fn open_with(path: &Path, layout: RawLayout) -> Result<GuestMemory, MemError> {
        Self::open_file(path, layout, false)
    }

    /// `populate`: map every page now (MAP_POPULATE), so that a later pass over all of
    /// guest RAM (the switchover check, during the downtime) takes no page faults.
    fn open_file(path: &Path, layout: RawLayout, populate: bool) -> Result<GuestMemory, MemError> {
        let file = File::open(path).map_err(|source| MemError::Open {
            path: path.to_owned(),
            source,
        })?;
        let mut opts = memmap2::MmapOptions::new();
        if populate {
            opts.populate();
        }
        // SAFETY: `MmapOptions::map` makes a read-only *shared* mapping (PROT_READ,
        // MAP_SHARED) of the file's pages: it is not a private copy, and writes to the file
        // by anyone else show through it. That is the point for a live memory-backend-file
        // (`open_live_file`): the running QEMU writes guest RAM into it as pct reads. pct
        // itself never writes through it (PROT_READ), hands out only `&[u8]` (every bit
        // pattern is a valid `u8`, so changing bytes can give wrong values but never invalid
        // ones), and treats all contents as untrusted: no reader assumes two reads of the
        // same bytes agree; the walkers cross-check back-pointers to catch torn reads,
        // `--verify` and the receiver's hash check catch what changed meanwhile.
        // Bounds: every read goes through `slice`/`chunks`/`live_block_page` or the ELF
        // core parser (`object`'s checked accessors), all checked against the length
        // taken here.
        // Remaining risk: a bounds check cannot stop SIGBUS. If the file is truncated below
        // that length after it was mapped (an image rewritten in place, a RAM block shrunk
        // under a live view), or a page of it cannot be supplied (a hugetlbfs hole with no
        // huge page free), touching such a page kills pct with SIGBUS. No handler catches
        // it: pct fails loudly, it does not read wrong bytes. Unlinking the file does not
        // truncate it and is harmless.
        let map = unsafe { opts.map(&file) }.map_err(|source| MemError::Open {
            path: path.to_owned(),
            source,
        })?;
        if map.len() >= 4 && &map[..4] == b"\x7fELF" {
            let (regions, vmcoreinfo) = elfcore::parse(&map, path)?;
            return Ok(GuestMemory {
                regions,
                vmcoreinfo,
                description: format!("ELF core {}", path.display()),
                backing: Backing::Mapped(map),
                live_block: None,
            });
        }
        let len = map.len() as u64;
        if len == 0 || !len.is_multiple_of(4096) {
            return Err(MemError::Format {
                path: path.to_owned(),
                msg: format!(
                    "{len} bytes is not a whole number of 4 KiB pages: not a raw guest RAM file \
                     (truncated copy?)"
                ),
            });
        }
        let regions = layout.regions(len);
        Ok(GuestMemory {
            backing: Backing::Mapped(map),
            regions,
            vmcoreinfo: None,
            description: format!("raw RAM file {}", path.display()),
            live_block: None,
        })
    }

    /// A raw RAM image already mapped (guest-physical 0 at offset 0), e.g. a private
    /// copy-on-write mapping that a fuzzer mutates.
    pub fn from_map(map: Mmap, description: &str) -> Result<GuestMemory, MemError> {
        let len = map.len() as u64;
        if len == 0 || !len.is_multiple_of(4096) {
            return Err(MemError::Format {
                path: PathBuf::from(description),
                msg: format!("{len} bytes is not a whole number of 4 KiB pages"),
            });
        }
        Ok(GuestMemory {
            backing: Backing::Mapped(map),
            regions: vec![Region {
                gpa: 0,
                offset: 0,
                len,
            }],
            vmcoreinfo: None,
            description: description.to_owned(),
            live_block: None,
        })
    }

    /// Another process's memory, laid out in guest-physical memory as `regions` (those
    /// inside it), its pages copied in as they are first read: see [`ondemand`].
    pub fn open_process(
        process: ProcessMem,
        regions: Vec<Region>,
        description: String,
    ) -> Result<GuestMemory, MemError> {
        let mem = GuestMemory {
            backing: Backing::OnDemand(OnDemand::new(process)?),
            regions: Vec::new(),
            vmcoreinfo: None,
            description,
            live_block: None,
        };
        Ok(mem.with_regions(regions))
    }

    /// For a view of another process's memory, the bytes of it copied into pct so far
    /// (what the view costs); `None` for a mapping.
    pub fn copied_bytes(&self) -> Option<u64> {
        match &self.backing {
            Backing::Mapped(_) => None,
            Backing::OnDemand(d) => Some(d.resident_bytes()),
        }
    }

    /// Marks this view as RAM block `name` as it is, for tests of what needs a live view.
    #[cfg(test)]
    pub(crate) fn into_live_block(mut self, name: &str) -> GuestMemory {
        self.live_block = Some(name.to_owned());
        self
    }

    /// A live QEMU RAM block: `block`'s memory-backend-file (share=on) at `path`, mapped in
    /// full, showing the guest-physical `regions` QEMU's memory map gives it (those that lie
    /// inside the file).
    pub(crate) fn open_live_block(
        path: &Path,
        block: &str,
        regions: Vec<Region>,
        description: String,
    ) -> Result<GuestMemory, MemError> {
        let mut mem = Self::open_file(path, RawLayout::Identity, true)?.with_regions(regions);
        mem.description = description;
        mem.live_block = Some(block.to_owned());
        Ok(mem)
    }

    /// This mapping laid out as `regions` (guest-physical ranges at offsets of the mapping),
    /// keeping only those that lie inside it.
    pub(crate) fn with_regions(mut self, regions: Vec<Region>) -> GuestMemory {
        let len = self.backing.len();
        let mut regions: Vec<Region> = regions
            .into_iter()
            .filter(|r| r.offset.checked_add(r.len).is_some_and(|e| e <= len))
            .collect();
        regions.sort_by_key(|r| r.gpa);
        self.regions = regions;
        self
    }

    /// For a live memory-backend-file view, the page at `offset` in its RAM block
    /// ([`live_block`](Self::live_block)) as it is now; `None` for images, copies, and
    /// offsets past the end.
    pub fn live_block_page(&self, offset: u64) -> Option<&[u8]> {
        let start = usize::try_from(offset).ok()?;
        self.live_map()?.get(start..start.checked_add(4096)?)
    }

    /// The mapping of a live view; `None` for anything else.
    fn live_map(&self) -> Option<&Mmap> {
        self.live_block.as_ref()?;
        match &self.backing {
            Backing::Mapped(map) => Some(map),
            Backing::OnDemand(_) => None,
        }
    }

    /// The QEMU RAM block this is a live view of (see [`live_block_page`](Self::live_block_page)).
    pub fn live_block(&self) -> Option<&str> {
        self.live_block.as_deref()
    }

    /// Bytes of the live view's mapping (the RAM block's size as QEMU's file has it).
    pub fn live_block_len(&self) -> Option<u64> {
        self.live_map().map(|m| m.len() as u64)
    }

    /// Where this process maps the live view (its first byte), for reading its page table
    /// entries in `/proc/self/pagemap`.
    pub fn live_block_addr(&self) -> Option<u64> {
        self.live_map().map(|m| m.as_ptr() as u64)
    }

    /// Drops this process's page table entries for `len` bytes of the live view from
    /// `offset`: the next read of such a page faults it back in from the RAM file, as it is
    /// then. pct's own entries must be gone before the kernel will drop QEMU's (it leaves
    /// a page that two processes map alone), see
    /// [`TouchLog`](crate::qemu::touched::TouchLog).
    pub fn drop_live_entries(&self, offset: u64, len: u64) -> Result<(), String> {
        let map = self
            .live_map()
            .filter(|m| {
                offset
                    .checked_add(len)
                    .is_some_and(|end| end <= m.len() as u64)
            })
            .ok_or_else(|| {
                format!(
                    "{offset:#x}+{len:#x} is not inside the live view of {}",
                    self.description
                )
            })?;
        // SAFETY: MADV_DONTNEED on a *shared* file mapping (a live view, mapped MAP_SHARED
        // by `open_file`) only zaps this process's page table entries for the range
        // (checked above to lie inside the mapping); the pages stay in the file and a later
        // access maps the same file page again. No private copy exists that could be
        // lost, so the bytes any `&[u8]` handed out refers to are unchanged by this call:
        // they remain whatever the file holds, as before.
        unsafe {
            map.unchecked_advise_range(
                memmap2::UncheckedAdvice::DontNeed,
                offset as usize,
                len as usize,
            )
        }
        .map_err(|e| {
            format!(
                "dropping pct's page table entries for {}: {e}",
                self.description
            )
        })
    }

    /// Per page of the live view: whether the RAM file holds it in memory now
    /// (`mincore(2)`: for tmpfs, whether the page exists; one punched out of the file or
    /// truncated away does not).
    pub fn live_resident(&self) -> Result<Vec<bool>, String> {
        let map = self
            .live_map()
            .ok_or_else(|| format!("{} is not a live view", self.description))?;
        let mut vec = vec![0u8; map.len().div_ceil(4096)];
        // SAFETY: mincore reads no memory of ours; it writes one byte per page of the range
        // into `vec`, which has exactly that many (the range is the whole mapping, which
        // `map` keeps alive and page-aligned for the call).
        let r = unsafe {
            libc::mincore(
                map.as_ptr() as *mut libc::c_void,
                map.len(),
                vec.as_mut_ptr(),
            )
        };
        if r != 0 {
            return Err(format!(
                "mincore on {}: {}",
                self.description,
                std::io::Error::last_os_error()
            ));
        }
        Ok(vec.into_iter().map(|b| b & 1 == 1).collect())
    }

    /// The guest-physical regions present.
    pub fn regions(&self) -> &[Region] {
        &self.regions
    }

    /// Bytes of guest RAM in this view.
    pub fn total_bytes(&self) -> u64 {
        self.regions.iter().map(|r| r.len).sum()
    }

    /// One past the highest guest-physical address present.
    pub fn end_gpa(&self) -> u64 {
        self.regions.last().map(|r| r.gpa + r.len).unwrap_or(0)
    }

    /// VMCOREINFO text carried by the source itself (an ELF core's note), if any.
    pub fn vmcoreinfo(&self) -> Option<&str> {
        self.vmcoreinfo.as_deref()
    }

    pub fn description(&self) -> &str {
        &self.description
    }

    fn region_of(&self, gpa: u64) -> Option<&Region> {
        let i = self.regions.partition_point(|r| r.gpa <= gpa);
        let r = self.regions.get(i.checked_sub(1)?)?;
        (gpa - r.gpa < r.len).then_some(r)
    }

    /// `len` bytes at guest-physical `gpa`, without copying (an on-demand view copies each
    /// page in once, on its first read). Fails if any byte is absent or cannot be read.
    pub fn slice(&self, gpa: u64, len: u64) -> Result<&[u8], MemError> {
        let absent = MemError::NotPresent { gpa, len };
        let r = self.region_of(gpa).ok_or(absent)?;
        let rel = gpa - r.gpa;
        if len > r.len - rel {
            return Err(MemError::NotPresent { gpa, len });
        }
        let start = r.offset + rel;
        let bytes = match &self.backing {
            Backing::Mapped(map) => map.get(start as usize..(start + len) as usize),
            Backing::OnDemand(d) => d.bytes(start, len, gpa)?,
        };
        bytes.ok_or(MemError::NotPresent { gpa, len })
    }

    /// Up to `max` bytes from guest-physical `gpa`, as many as its region holds (at least
    /// one), to search through: a mapping's bytes, or for an on-demand view a copy that is
    /// not kept.
    pub fn read_upto(&self, gpa: u64, max: u64) -> Result<Cow<'_, [u8]>, MemError> {
        let r = self
            .region_of(gpa)
            .ok_or(MemError::NotPresent { gpa, len: 1 })?;
        let len = max.min(r.len - (gpa - r.gpa));
        match &self.backing {
            Backing::Mapped(_) => self.slice(gpa, len).map(Cow::Borrowed),
            Backing::OnDemand(d) => {
                let mut buf = vec![0; len as usize];
                d.process()
                    .read_at(r.offset + (gpa - r.gpa), &mut buf)
                    .map_err(|e| d.process().read_error(gpa, len, e))?;
                Ok(Cow::Owned(buf))
            }
        }
    }

    /// The 4 KiB page at page frame number `pfn`.
    pub fn page(&self, pfn: u64) -> Result<&[u8], MemError> {
        self.slice(
            pfn.checked_mul(4096).ok_or(MemError::NotPresent {
                gpa: u64::MAX,
                len: 4096,
            })?,
            4096,
        )
    }

    pub fn read_u64(&self, gpa: u64) -> Result<u64, MemError> {
        let b = self.slice(gpa, 8)?;
        Ok(u64::from_le_bytes(b.try_into().expect("8-byte slice")))
    }

    /// Calls `f` with the guest-physical address of each 4 KiB page, ascending, whose
    /// bytes at `at` (an offset in the page) start with `prefix`, until it returns a value:
    /// a scan that looks at one spot per page. An on-demand view reads those spots only
    /// (1024 per system call), not the pages.
    pub fn find_page_with_prefix<T>(
        &self,
        at: u64,
        prefix: &[u8],
        mut f: impl FnMut(u64) -> Result<Option<T>, MemError>,
    ) -> Result<Option<T>, MemError> {
        const PAGE: u64 = 4096;
        let need = at + prefix.len() as u64;
        for r in &self.regions {
            let end = r.gpa + r.len;
            let pages: Vec<u64> = (r.gpa.next_multiple_of(PAGE)..end)
                .step_by(PAGE as usize)
                .take_while(|p| p + need <= end)
                .collect();
            match &self.backing {
                Backing::Mapped(_) => {
                    for p in pages {
                        if self.slice(p + at, prefix.len() as u64)? == prefix {
                            if let Some(found) = f(p)? {
                                return Ok(Some(found));
                            }
                        }
                    }
                }
                Backing::OnDemand(d) => {
                    const BATCH: usize = 16 * 1024;
                    let mut buf = vec![0; BATCH.min(pages.len()) * prefix.len()];
                    for part in pages.chunks(BATCH) {
                        let offsets: Vec<u64> =
                            part.iter().map(|p| r.offset + (p - r.gpa) + at).collect();
                        let buf = &mut buf[..part.len() * prefix.len()];
                        d.process()
                            .gather(&offsets, prefix.len(), buf)
                            .map_err(|e| {
                                d.process()
                                    .read_error(part[0] + at, (part.len() as u64) * PAGE, e)
                            })?;
                        let hits: Vec<u64> = part
                            .iter()
                            .zip(buf.chunks(prefix.len()))
                            .filter(|(_, spot)| *spot == prefix)
                            .map(|(p, _)| *p)
                            .collect();
                        for p in hits {
                            if let Some(found) = f(p)? {
                                return Ok(Some(found));
                            }
                        }
                    }
                }
            }
        }
        Ok(None)
    }

    /// Every present region's bytes in address order, for scans over all of RAM, as
    /// `(gpa, bytes)` pieces. A mapping gives each region whole, without copying. An
    /// on-demand view reads each region in pieces of 8 MiB into a fresh buffer and keeps
    /// nothing; successive pieces of a region overlap by 128 KiB and start on a page
    /// boundary, so a match that starts in one piece at least 128 KiB before its end lies
    /// wholly inside it (a VMCOREINFO note's text is looked for up to 64 KiB), and page offsets are the same in every piece. A failed read ends
    /// the pieces with its error.
    pub fn pieces(&self) -> impl Iterator<Item = Result<(u64, Cow<'_, [u8]>), MemError>> {
        let mut out = Vec::new();
        for r in &self.regions {
            match &self.backing {
                Backing::Mapped(_) => out.push((r.gpa, r.offset, r.len)),
                Backing::OnDemand(_) => {
                    let mut at = 0;
                    loop {
                        let n = PIECE.min(r.len - at);
                        out.push((r.gpa + at, r.offset + at, n));
                        if at + n >= r.len {
                            break;
                        }
                        at += PIECE - PIECE_OVERLAP;
                    }
                }
            }
        }
        let mut failed = false;
        out.into_iter().map_while(move |(gpa, offset, len)| {
            if failed {
                return None;
            }
            let piece = match &self.backing {
                Backing::Mapped(map) => map
                    .get(offset as usize..(offset + len) as usize)
                    .map(Cow::Borrowed)
                    .ok_or(MemError::NotPresent { gpa, len }),
                Backing::OnDemand(d) => {
                    let mut buf = vec![0; len as usize];
                    d.process()
                        .read_at(offset, &mut buf)
                        .map(|()| Cow::Owned(buf))
                        .map_err(|e| d.process().read_error(gpa, len, e))
                }
            };
            failed = piece.is_err();
            Some(piece.map(|p| (gpa, p)))
        })
    }
}
