//! Guest RAM that lives in another process's anonymous memory (QEMU without a shared
//! memory-backend-file), read on demand through `/proc/PID/mem`.
//!
//! Each 4 KiB page is copied into pct's own memory the first time something reads it, and
//! kept from then on, so that the zero-copy `&[u8]` every walker takes stays valid. The
//! walkers read a few percent of a guest's RAM (its `struct page` array, page-cache trees,
//! inodes), so pct holds that much, not a copy of the whole guest. Scans over all of RAM
//! (looking for VMCOREINFO or the banner) go through [`ProcessMem::read_at`] instead, into a
//! buffer of the caller's that is reused, and keep nothing.
//!
//! Like a live RAM file, the pages are read while the guest may run, each at its own
//! moment: two pages need not agree with each other. The walkers check back-pointers for
//! that, and the receiver checks every page's hash.

use super::MemError;
use memmap2::{MmapOptions, MmapRaw};
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

const PAGE: u64 = 4096;

/// `len` bytes of a process's memory from host address `base`, read through
/// `/proc/PID/mem` into buffers of the caller's.
pub struct ProcessMem {
    mem: File,
    pid: u32,
    path: PathBuf,
    base: u64,
    len: u64,
}

impl ProcessMem {
    /// `len` bytes of process `pid`'s memory from host address `base`.
    pub fn open(pid: u32, base: u64, len: u64) -> Result<ProcessMem, MemError> {
        let path = PathBuf::from(format!("/proc/{pid}/mem"));
        let mem = File::open(&path).map_err(|source| MemError::Open {
            path: path.clone(),
            source,
        })?;
        Ok(ProcessMem {
            mem,
            pid,
            path,
            base,
            len,
        })
    }

    /// Bytes this covers.
    pub fn len(&self) -> u64 {
        self.len
    }

    /// Whether it covers nothing.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Where the bytes are read from.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Reads `buf.len()` bytes at `offset` into `buf`; a short read is an error.
    pub fn read_at(&self, offset: u64, buf: &mut [u8]) -> std::io::Result<()> {
        let in_range = offset
            .checked_add(buf.len() as u64)
            .is_some_and(|e| e <= self.len);
        if !in_range {
            return Err(std::io::Error::other(format!(
                "{offset:#x}+{:#x} is past the {:#x} bytes of guest RAM",
                buf.len(),
                self.len
            )));
        }
        let at = self.base.checked_add(offset).ok_or_else(|| {
            std::io::Error::other(format!("host address {:#x}+{offset:#x}", self.base))
        })?;
        self.mem.read_exact_at(buf, at)
    }

    /// Reads `each` bytes at every one of `offsets` into successive `each`-byte parts of
    /// `out`, many spots per system call (`process_vm_readv`): for scans that look at one
    /// spot per page. A short read is an error.
    pub fn gather(&self, offsets: &[u64], each: usize, out: &mut [u8]) -> std::io::Result<()> {
        /// Spots per call: the kernel's limit on iovecs (UIO_MAXIOV).
        const BATCH: usize = 1024;
        if out.len() != offsets.len() * each {
            return Err(std::io::Error::other("gather: output size mismatch"));
        }
        for (offs, out) in offsets.chunks(BATCH).zip(out.chunks_mut(BATCH * each)) {
            let mut remote = Vec::with_capacity(offs.len());
            for &o in offs {
                let in_range = o.checked_add(each as u64).is_some_and(|e| e <= self.len);
                let at = self
                    .base
                    .checked_add(o)
                    .filter(|_| in_range)
                    .ok_or_else(|| {
                        std::io::Error::other(format!("{o:#x}+{each:#x} is past the guest RAM"))
                    })?;
                remote.push(libc::iovec {
                    iov_base: at as *mut libc::c_void,
                    iov_len: each,
                });
            }
            let local = libc::iovec {
                iov_base: out.as_mut_ptr().cast(),
                iov_len: out.len(),
            };
            // SAFETY: `local` describes `out`, a live, exclusively borrowed buffer of exactly
            // `iov_len` bytes, which the kernel writes at most; the `remote` iovecs are only
            // addresses in the other process, which the kernel checks (a bad one is an error,
            // never a read of our memory). Both vectors outlive the call, and their counts
            // are their lengths (at most BATCH, within the kernel's limit).
            let n = unsafe {
                libc::process_vm_readv(
                    self.pid as libc::pid_t,
                    &local,
                    1,
                    remote.as_ptr(),
                    remote.len() as libc::c_ulong,
                    0,
                )
            };
            if n < 0 {
                return Err(std::io::Error::last_os_error());
            }
            if n as usize != out.len() {
                return Err(std::io::Error::new(
                    std::io::ErrorKind::UnexpectedEof,
                    format!("process_vm_readv read {n} of {} bytes", out.len()),
                ));
            }
        }
        // process_vm_readv names the process by its pid, which a new process could have
        // taken if QEMU exited meanwhile; `mem` still refers to QEMU's own memory. A read
        // through it succeeding now means QEMU was there all along.
        if let Some(&o) = offsets.first() {
            self.read_at(o, &mut [0; 1])?;
        }
        Ok(())
    }

    /// The error for a failed read of `len` bytes at guest-physical `gpa`.
    pub fn read_error(&self, gpa: u64, len: u64, source: std::io::Error) -> MemError {
        MemError::Read {
            path: self.path.clone(),
            gpa,
            len,
            source,
        }
    }
}

/// A [`ProcessMem`] whose pages are copied into pct's memory as they are first read, and kept.
pub struct OnDemand {
    process: ProcessMem,
    /// Where the pages read so far are kept: `len` bytes reserved, not committed
    /// (MAP_NORESERVE), so only the pages written to cost memory.
    copy: MmapRaw,
    /// One bit per page: set once the page is in `copy`, and never cleared. A set bit is
    /// published with Release after the page was written, and read with Acquire.
    present: Vec<AtomicU64>,
    /// Held while pages are copied in: one writer at a time.
    filling: Mutex<()>,
    /// Pages copied in so far.
    copied: AtomicU64,
}

impl OnDemand {
    /// Copies pages of `process` in as they are read.
    pub fn new(process: ProcessMem) -> Result<OnDemand, MemError> {
        let len = process.len;
        let size = usize::try_from(len)
            .ok()
            .filter(|&n| n > 0 && len.is_multiple_of(PAGE))
            .ok_or_else(|| MemError::Format {
                path: process.path.clone(),
                msg: format!("{len} bytes is not a whole, positive number of 4 KiB pages"),
            })?;
        let copy = MmapOptions::new()
            .len(size)
            .no_reserve_swap()
            .map_anon()
            .map_err(|source| MemError::Open {
                path: process.path.clone(),
                source,
            })?;
        let pages = len / PAGE;
        Ok(OnDemand {
            process,
            copy: MmapRaw::from(copy),
            present: (0..pages.div_ceil(64)).map(|_| AtomicU64::new(0)).collect(),
            filling: Mutex::new(()),
            copied: AtomicU64::new(0),
        })
    }

    /// The process memory this copies from, for reads that keep nothing.
    pub fn process(&self) -> &ProcessMem {
        &self.process
    }

    /// Bytes copied into pct's memory so far (what this view costs).
    pub fn resident_bytes(&self) -> u64 {
        self.copied.load(Ordering::Relaxed) * PAGE
    }

    fn is_present(&self, page: u64) -> bool {
        let word = &self.present[(page / 64) as usize];
        word.load(Ordering::Acquire) & (1 << (page % 64)) != 0
    }

    fn mark_present(&self, page: u64) {
        self.present[(page / 64) as usize].fetch_or(1 << (page % 64), Ordering::Release);
    }

    /// `len` bytes at `offset`, copied in first where they were not yet; `None` past the end.
    /// `gpa` is only for the error.
    pub fn bytes(&self, offset: u64, len: u64, gpa: u64) -> Result<Option<&[u8]>, MemError> {
        let Some(end) = offset.checked_add(len).filter(|&e| e <= self.process.len) else {
            return Ok(None);
        };
        let (first, last) = (offset / PAGE, end.div_ceil(PAGE));
        if !(first..last).all(|p| self.is_present(p)) {
            self.fill(first..last, gpa.wrapping_sub(offset - first * PAGE))?;
        }
        // SAFETY: `offset..end` lies inside the mapping (checked above), which lives as long
        // as `self`. Every page of it is marked present, so it was written once, before its
        // bit was set (Release, read here with Acquire), and is never written again: no
        // `&mut` to these bytes exists now or later, and the mapping is never unmapped or
        // remapped while `self` lives. Any bytes are a valid `u8`.
        Ok(Some(unsafe {
            std::slice::from_raw_parts(
                self.copy.as_ptr().add(offset as usize),
                (end - offset) as usize,
            )
        }))
    }

    /// Copies the pages of `pages` that are not yet present from the process. `gpa` is the
    /// guest-physical address of the first, for the error.
    fn fill(&self, pages: std::ops::Range<u64>, gpa: u64) -> Result<(), MemError> {
        let _one_writer = self.filling.lock().unwrap_or_else(|p| p.into_inner());
        let mut p = pages.start;
        while p < pages.end {
            if self.is_present(p) {
                p += 1;
                continue;
            }
            let run_start = p;
            while p < pages.end && !self.is_present(p) {
                p += 1;
            }
            let (off, n) = (run_start * PAGE, (p - run_start) * PAGE);
            // SAFETY: `off..off + n` lies inside the mapping (`pages` is inside `0..len`,
            // checked by the caller). None of these pages is marked present, so no `&[u8]`
            // to them was ever handed out (`bytes` hands out only present pages), and no
            // other thread writes them: writers hold `filling`, as this one does. So this
            // `&mut` is the only reference to these bytes while it lives.
            let buf = unsafe {
                std::slice::from_raw_parts_mut(self.copy.as_mut_ptr().add(off as usize), n as usize)
            };
            self.process.read_at(off, buf).map_err(|e| {
                self.process
                    .read_error(gpa.wrapping_add(off - pages.start * PAGE), n, e)
            })?;
            for q in run_start..p {
                self.mark_present(q);
            }
            self.copied.fetch_add(p - run_start, Ordering::Relaxed);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::memory::{GuestMemory, Region};
    use std::borrow::Cow;

    /// `pages` pages of this process's own memory, page `i` filled with byte `i`, and a
    /// view of them read on demand through /proc/self/mem.
    fn own_memory(pages: usize) -> (memmap2::MmapMut, GuestMemory) {
        let mut buf = memmap2::MmapMut::map_anon(pages * PAGE as usize).expect("anon map");
        for (i, page) in buf.chunks_mut(PAGE as usize).enumerate() {
            page.fill(i as u8);
        }
        let process = ProcessMem::open(std::process::id(), buf.as_ptr() as u64, buf.len() as u64)
            .expect("/proc/self/mem");
        let len = buf.len() as u64;
        let regions = vec![Region {
            gpa: 0,
            offset: 0,
            len,
        }];
        let mem = GuestMemory::open_process(process, regions, "own memory".into()).expect("view");
        (buf, mem)
    }

    #[test]
    fn copies_only_what_is_read_and_keeps_it() {
        let (mut buf, mem) = own_memory(64);
        assert_eq!(mem.copied_bytes(), Some(0));
        let b = mem
            .slice(5 * PAGE + 100, 2 * PAGE)
            .expect("read across three pages");
        assert_eq!(b[0], 5);
        assert_eq!(b[(PAGE - 100) as usize], 6);
        assert_eq!(b[(2 * PAGE - 1) as usize], 7);
        assert_eq!(mem.copied_bytes(), Some(3 * PAGE));
        // Pages already copied are not read again: the bytes handed out stay as they were.
        buf[6 * PAGE as usize] = 0xee;
        let again = mem.slice(6 * PAGE, 1).expect("page 6");
        assert_eq!(again[0], 6);
        assert_eq!(b[(PAGE - 100) as usize], 6);
        // A page not read before is read as it is now.
        buf[9 * PAGE as usize] = 0xdd;
        assert_eq!(mem.slice(9 * PAGE, 1).expect("page 9")[0], 0xdd);
        assert_eq!(mem.copied_bytes(), Some(4 * PAGE));
        assert!(matches!(
            mem.slice(63 * PAGE, PAGE + 1),
            Err(MemError::NotPresent { .. })
        ));
    }

    #[test]
    fn pieces_overlap_and_cover_every_byte_without_keeping_any() {
        // 20 MiB: three pieces of 8 MiB, overlapping by 128 KiB.
        let (_buf, mem) = own_memory(5120);
        let mut covered = 0u64;
        let mut last_end = 0u64;
        for piece in mem.pieces() {
            let (gpa, bytes) = piece.expect("piece");
            assert!(matches!(bytes, Cow::Owned(_)));
            assert!(gpa.is_multiple_of(PAGE));
            assert!(gpa <= last_end, "a gap before {gpa:#x}");
            if gpa > 0 {
                assert_eq!(last_end - gpa, 128 << 10, "overlap");
            }
            for (k, page) in bytes.chunks(PAGE as usize).enumerate() {
                assert!(page.iter().all(|&b| b == (gpa / PAGE + k as u64) as u8));
            }
            last_end = gpa + bytes.len() as u64;
            covered += 1;
        }
        assert_eq!(last_end, 5120 * PAGE);
        assert_eq!(covered, 3);
        assert_eq!(mem.copied_bytes(), Some(0));
    }

    #[test]
    fn a_read_that_fails_is_an_error_naming_the_address() {
        // Never mapped: the kernel maps nothing below vm.mmap_min_addr (64 KiB by default).
        let base = PAGE;
        let process = ProcessMem::open(std::process::id(), base, 4 * PAGE).expect("open");
        let regions = vec![Region {
            gpa: 0x10_0000,
            offset: 0,
            len: 4 * PAGE,
        }];
        let mem = GuestMemory::open_process(process, regions, "gone".into()).expect("view");
        let e = mem.slice(0x10_1000, 8).expect_err("unmapped");
        assert!(matches!(e, MemError::Read { gpa: 0x10_1000, .. }), "{e}");
        assert!(e.to_string().contains("/proc/"), "{e}");
        assert_eq!(mem.copied_bytes(), Some(0));
        assert!(mem.pieces().next().expect("one piece").is_err());
        assert_eq!(mem.pieces().count(), 1, "the pieces end at the first error");
    }

    #[test]
    fn looks_at_one_spot_per_page_like_a_mapping() {
        // More pages than one batch of spots (16 Ki).
        let (mut buf, mem) = own_memory(20_000);
        for p in [0usize, 1023, 1024, 16_383, 16_384, 19_999] {
            buf[p * PAGE as usize + 12..][..4].copy_from_slice(b"MARK");
        }
        // Not at the spot: must not count.
        buf[77 * PAGE as usize + 13..][..4].copy_from_slice(b"MARK");
        let mut copy = memmap2::MmapMut::map_anon(buf.len()).expect("anon map");
        copy.copy_from_slice(&buf);
        let mapped =
            GuestMemory::from_map(copy.make_read_only().expect("ro"), "copy").expect("view");
        let want: Vec<u64> = [0u64, 1023, 1024, 16_383, 16_384, 19_999]
            .iter()
            .map(|p| p * PAGE)
            .collect();
        let all = |m: &GuestMemory| {
            let mut hits = Vec::new();
            let none = m.find_page_with_prefix(12, b"MARK", |p| {
                hits.push(p);
                Ok(None::<()>)
            });
            assert!(none.expect("scan").is_none());
            hits
        };
        assert_eq!(all(&mapped), want);
        assert_eq!(all(&mem), want);
        let third = mem.find_page_with_prefix(12, b"MARK", |p| Ok((p > 1023 * PAGE).then_some(p)));
        assert_eq!(
            third.expect("scan"),
            Some(1024 * PAGE),
            "stops at the first answer"
        );
        assert_eq!(mem.copied_bytes(), Some(0), "spots are read, not pages");
    }

    #[test]
    fn finds_an_unaligned_vmcoreinfo_note_across_pieces() {
        let (mut buf, mem) = own_memory(4096);
        // Not 12 bytes into a page (as before 4.13: in the image's .bss), so the full scan
        // finds it; in the last page of the first piece, its text running on into the next
        // page, so only the second piece holds it whole.
        let at = 2047 * PAGE as usize + 100;
        let mut note =
            b"VMCOREINFO\0\0OSRELEASE=6.1.0-test\nKERNELOFFSET=0\nNUMBER(phys_base)=0\n".to_vec();
        while note.len() < 6000 {
            note.extend_from_slice(b"SYMBOL(padding)=ffffffff81000000\n");
        }
        note.push(0);
        buf[at..at + note.len()].copy_from_slice(&note);
        let (info, _) = crate::kernel::find_vmcoreinfo(&mem)
            .expect("read")
            .expect("the note");
        assert_eq!(info.release(), Some("6.1.0-test"));
        assert_eq!(info.found_at, Some(at as u64));
        assert_eq!(mem.copied_bytes(), Some(0));
    }
}
