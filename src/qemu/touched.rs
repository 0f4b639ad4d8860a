//! Which pages of a RAM block the source QEMU's process may have touched since a moment,
//! read off the host's page tables: a [`TouchLog`].
//!
//! [`drop_entries`](TouchLog::drop_entries) drops the page table entries QEMU's process
//! holds for a range of its mapping of the RAM file (`process_madvise(MADV_PAGEOUT)`: on
//! tmpfs with no swap the pages stay in the file, only the entries go; the kernel leaves
//! alone a page that a second process maps, so pct drops its own entries first). From
//! then on any access of QEMU's to such a page, a read or a write, faults its entry back
//! in, and `/proc/PID/pagemap` shows it present (bit 63; or, while the kernel migrates the
//! page to another frame, a swap-type entry, bit 62, which counts as touched too). A page
//! whose entry is still absent has not been touched by QEMU since its range was dropped.
//!
//! Under TCG every guest store is a store of QEMU's process through those entries, so a
//! page absent at switchover holds what it held when the log began; QEMU's own writes
//! from device emulation (DMA) go through them too, and are in its dirty log anyway.
//! (The host's soft-dirty bits would say "written" rather than "touched", but only on
//! kernels built with `CONFIG_MEM_SOFT_DIRTY`, which this lab's host is not; presence is
//! on every kernel since 5.10, which has `process_madvise`.)
//!
//! An entry also goes without an access, all of a page's mappings at once:
//! - when the page is punched out of the file or truncated (its content changes): a page
//!   the file no longer holds in memory (`mincore` on pct's own view) counts as touched;
//! - when the kernel reclaims it. Without swap (the only case allowed) tmpfs pages are
//!   not reclaimed, but should the host's reclaim have scanned at all meanwhile (the
//!   `pgscan_*` counters of /proc/vmstat moved), pct also counts as touched each page
//!   absent from *its own* mapping: it re-read every page right after dropping its range
//!   (the caller hashes them), so its own entry went only with all the others;
//! - when the page is migrated to another frame (compaction): the kernel re-creates the
//!   entries it removed, and meanwhile shows them as swap-type (counted, see above);
//! - when pages are collapsed into a huge page: refused (see below).
//!
//! What pct refuses, so that the caller hashes every page:
//! - a RAM file not on tmpfs (a disk file's pages would be written back, and hugetlbfs
//!   pages cannot be paged out);
//! - a host with swap (paging out would swap the guest's RAM out);
//! - shared-memory transparent huge pages on;
//! - another process mapping the RAM file (a vhost-user back end writes through page
//!   tables of its own);
//! - a kernel that kept more than an eighth of QEMU's entries of a range when asked to drop
//!   them.

use crate::memory::GuestMemory;
use std::fs::File;
use std::ops::Range;
use std::os::fd::{FromRawFd, OwnedFd};
use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::Path;

const PAGE: u64 = 4096;
/// pagemap entry bits (`Documentation/admin-guide/mm/pagemap.rst`): the page is mapped;
/// the entry is a swap-type one (swapped out, or a migration entry while the page moves).
const PM_PRESENT: u64 = 1 << 63;
const PM_SWAP: u64 = 1 << 62;
const TMPFS_MAGIC: i64 = 0x0102_1994;

/// The page table entries of QEMU's process for one RAM block, dropped range by range,
/// and pct's own for its live view of the same file.
#[derive(Debug)]
pub struct TouchLog {
    pid: u32,
    /// Where QEMU maps the block, and where pct does.
    va: u64,
    own_va: u64,
    pages: usize,
    /// The host's reclaim scan counters when the log began.
    scanned: u64,
}

impl TouchLog {
    /// A log for the first `len` bytes of the RAM file `file`, as QEMU `pid` maps it,
    /// with `own` pct's live view of the same file; no range is dropped yet. `Err` says why
    /// no log can be kept.
    pub fn start(pid: u32, file: &Path, own: &GuestMemory, len: u64) -> Result<TouchLog, String> {
        let meta =
            std::fs::metadata(file).map_err(|e| format!("reading {}: {e}", file.display()))?;
        if !on_tmpfs(file)? {
            return Err(format!(
                "{} is not on tmpfs: its pages cannot be unmapped and kept",
                file.display()
            ));
        }
        if swap_total()? > 0 {
            return Err("the host has swap: unmapping guest RAM would swap it out".into());
        }
        let thp = std::fs::read_to_string("/sys/kernel/mm/transparent_hugepage/shmem_enabled")
            .unwrap_or_default();
        if !(thp.is_empty() || thp.contains("[never]") || thp.contains("[deny]")) {
            return Err(format!(
                "shared-memory huge pages are on ({}): entries come and go with them",
                thp.trim()
            ));
        }
        let own_va = own
            .live_block_addr()
            .filter(|_| own.live_block_len().is_some_and(|l| l >= len))
            .ok_or("pct has no live view of the whole RAM block")?;
        let mut va = None;
        for (p, start, end, offset) in mappings_of(meta.dev(), meta.ino()) {
            if p == std::process::id() {
                continue;
            }
            if p != pid {
                return Err(format!(
                    "process {p} maps the RAM file too: its writes pass QEMU's page tables by"
                ));
            }
            if offset == 0 && end - start >= len {
                if va.is_some() {
                    return Err("QEMU maps the RAM file more than once".into());
                }
                va = Some(start);
            }
        }
        let va = va.ok_or_else(|| {
            format!(
                "QEMU (pid {pid}) does not map the first {len} bytes of {}",
                file.display()
            )
        })?;
        Ok(TouchLog {
            pid,
            va,
            own_va,
            pages: (len / PAGE) as usize,
            scanned: reclaim_scanned()?,
        })
    }

    /// Drops QEMU's entries, and pct's in `own` (the view [`start`] was given), for
    /// `count` pages from page `first`: from now on the log holds for them. The caller
    /// then reads each of those pages through `own` (that restores pct's entries; see the
    /// module's doc).
    ///
    /// [`start`]: TouchLog::start
    pub fn drop_entries(
        &self,
        own: &GuestMemory,
        first: usize,
        count: usize,
    ) -> Result<(), String> {
        if first.checked_add(count).is_none_or(|end| end > self.pages) {
            return Err(format!("pages {first}+{count} are not in the block"));
        }
        let (offset, len) = (first as u64 * PAGE, count as u64 * PAGE);
        own.drop_live_entries(offset, len)?;
        page_out(self.pid, &[(self.va + offset, len)])?;
        let entries = pagemap(&self.pid.to_string(), self.va + offset, count)?;
        let kept = entries.iter().filter(|&&e| e & PM_PRESENT != 0).count();
        if kept > count / 8 {
            return Err(format!(
                "the kernel kept {kept} of QEMU's {count} entries for pages {first}+{count} of the RAM file"
            ));
        }
        Ok(())
    }

    /// Drops the entries again, QEMU's and pct's, for the page ranges `ranges` (pages that
    /// QEMU touched since they were dropped): the log holds for them afresh, and the caller
    /// reads them again through `own`. Entries the kernel keeps read as touched.
    pub fn drop_again(&self, own: &GuestMemory, ranges: &[Range<usize>]) -> Result<(), String> {
        if ranges.iter().any(|r| r.end > self.pages) {
            return Err("a range past the block".into());
        }
        for r in ranges {
            own.drop_live_entries(r.start as u64 * PAGE, r.len() as u64 * PAGE)?;
        }
        let iov: Vec<(u64, u64)> = ranges
            .iter()
            .map(|r| (self.va + r.start as u64 * PAGE, r.len() as u64 * PAGE))
            .collect();
        page_out(self.pid, &iov)
    }

    /// Per page of the block: whether QEMU's process has its entry back (or a swap-type one).
    pub fn qemu_touched(&self) -> Result<Vec<bool>, String> {
        Ok(pagemap(&self.pid.to_string(), self.va, self.pages)?
            .into_iter()
            .map(|e| e & (PM_PRESENT | PM_SWAP) != 0)
            .collect())
    }

    /// Per page of the block: whether it may have changed since its range was dropped
    /// ([`drop_entries`](Self::drop_entries)): QEMU's process touched it (its entry is
    /// back), the file no longer holds it, or (after the host's reclaim scanned) pct's own
    /// entry went again. `own` is the view [`start`] was given. Meaningless for pages of
    /// ranges not dropped.
    ///
    /// [`start`]: TouchLog::start
    pub fn touched(&self, own: &GuestMemory) -> Result<Vec<bool>, String> {
        if own.live_block_addr() != Some(self.own_va) {
            return Err("the touch log was asked about another view".into());
        }
        let qemu = self.qemu_touched()?;
        let resident = own.live_resident()?;
        let own_entries = match reclaim_scanned()? == self.scanned {
            true => None,
            false => Some(pagemap("self", self.own_va, self.pages)?),
        };
        Ok((0..self.pages)
            .map(|i| {
                qemu[i]
                    || !resident.get(i).copied().unwrap_or(false)
                    || own_entries.as_ref().is_some_and(|o| o[i] & PM_PRESENT == 0)
            })
            .collect())
    }
}

/// The `/proc/PID/pagemap` entries of `pages` pages from virtual address `va` of process
/// `pid` ("self" for pct).
fn pagemap(pid: &str, va: u64, pages: usize) -> Result<Vec<u64>, String> {
    let path = format!("/proc/{pid}/pagemap");
    let f = File::open(&path).map_err(|e| format!("opening {path}: {e}"))?;
    let mut raw = vec![0u8; pages * 8];
    f.read_exact_at(&mut raw, va / PAGE * 8)
        .map_err(|e| format!("reading {path} at {va:#x}: {e}"))?;
    Ok(raw
        .chunks_exact(8)
        .map(|e| u64::from_le_bytes(e.try_into().unwrap_or_default()))
        .collect())
}

/// The sum of the host's `pgscan_*` counters (/proc/vmstat): pages its reclaim scanned.
fn reclaim_scanned() -> Result<u64, String> {
    let v = std::fs::read_to_string("/proc/vmstat").map_err(|e| format!("/proc/vmstat: {e}"))?;
    Ok(v.lines()
        .filter(|l| l.starts_with("pgscan_"))
        .filter_map(|l| l.split_ascii_whitespace().nth(1)?.parse::<u64>().ok())
        .sum())
}

/// Drops the page table entries of process `pid` for each (address, length) range of
/// `ranges` (`process_madvise(2)` with `MADV_PAGEOUT`).
fn page_out(pid: u32, ranges: &[(u64, u64)]) -> Result<(), String> {
    let why = |what: &str| {
        let e = std::io::Error::last_os_error();
        let hint = match e.raw_os_error() {
            Some(libc::ENOSYS) => " (the host kernel is older than 5.10)",
            Some(libc::EPERM) => " (pct needs CAP_SYS_NICE and ptrace access to QEMU)",
            _ => "",
        };
        format!("{what} of QEMU (pid {pid}): {e}{hint}")
    };
    // SAFETY: pidfd_open takes a pid and flags and returns a new descriptor or -1; it
    // touches no memory of ours.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid as libc::pid_t, 0) };
    if fd < 0 {
        return Err(why("pidfd_open"));
    }
    // SAFETY: `fd` is a descriptor pidfd_open just returned, owned by nothing else.
    let pidfd = unsafe { OwnedFd::from_raw_fd(fd as i32) };
    let iov: Vec<libc::iovec> = ranges
        .iter()
        .map(|&(va, len)| libc::iovec {
            iov_base: va as *mut libc::c_void,
            iov_len: len as usize,
        })
        .collect();
    // The kernel takes at most UIO_MAXIOV (1024) ranges a call.
    for part in iov.chunks(1024) {
        // SAFETY: process_madvise reads the `part.len()` iovecs at `part.as_ptr()` (alive
        // for the call) and advises the *target's* address ranges they name; it never
        // dereferences those ranges in this process, and MADV_PAGEOUT changes no page
        // contents, only the target's entries.
        let n = unsafe {
            libc::syscall(
                libc::SYS_process_madvise,
                std::os::fd::AsRawFd::as_raw_fd(&pidfd),
                part.as_ptr(),
                part.len(),
                libc::MADV_PAGEOUT,
                0u32,
            )
        };
        if n < 0 {
            return Err(why("process_madvise"));
        }
    }
    Ok(())
}

/// `SwapTotal` of /proc/meminfo, in kB.
fn swap_total() -> Result<u64, String> {
    let m = std::fs::read_to_string("/proc/meminfo").map_err(|e| format!("/proc/meminfo: {e}"))?;
    m.lines()
        .find_map(|l| l.strip_prefix("SwapTotal:"))
        .and_then(|v| v.split_ascii_whitespace().next()?.parse().ok())
        .ok_or_else(|| "no SwapTotal in /proc/meminfo".into())
}

/// Whether `file` lies on tmpfs.
fn on_tmpfs(file: &Path) -> Result<bool, String> {
    let st = rustix::fs::statfs(file).map_err(|e| format!("statfs {}: {e}", file.display()))?;
    Ok(st.f_type as i64 == TMPFS_MAGIC)
}

/// Every mapping of the file (`dev`, `ino`) in every process: (pid, start, end, offset).
fn mappings_of(dev: u64, ino: u64) -> Vec<(u32, u64, u64, u64)> {
    let (major, minor) = (rustix::fs::major(dev), rustix::fs::minor(dev));
    let want_dev = format!("{major:02x}:{minor:02x}");
    let mut out = Vec::new();
    let Ok(procs) = std::fs::read_dir("/proc") else {
        return out;
    };
    for p in procs.flatten() {
        let Some(pid) = p.file_name().to_str().and_then(|s| s.parse::<u32>().ok()) else {
            continue;
        };
        // A process that exits meanwhile, or a kernel thread, has nothing to say.
        let Ok(maps) = std::fs::read_to_string(p.path().join("maps")) else {
            continue;
        };
        out.extend(
            maps.lines()
                .filter_map(|l| parse_maps_line(l, &want_dev, ino))
                .map(|(s, e, o)| (pid, s, e, o)),
        );
    }
    out
}

/// (start, end, offset) of a `/proc/PID/maps` line that maps inode `ino` of device `dev`
/// (`MAJOR:MINOR`, in hex as maps writes it).
fn parse_maps_line(line: &str, dev: &str, ino: u64) -> Option<(u64, u64, u64)> {
    let mut f = line.split_ascii_whitespace();
    let (range, _perms, offset, d, i) = (f.next()?, f.next()?, f.next()?, f.next()?, f.next()?);
    if d != dev || i.parse::<u64>().ok()? != ino {
        return None;
    }
    let (s, e) = range.split_once('-')?;
    Some((
        u64::from_str_radix(s, 16).ok()?,
        u64::from_str_radix(e, 16).ok()?,
        u64::from_str_radix(offset, 16).ok()?,
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn maps_lines() {
        let l = "7f0000000000-7f0040000000 rw-s 00000000 00:1a 1234   /dev/shm/pct-ram (deleted)";
        assert_eq!(
            parse_maps_line(l, "00:1a", 1234),
            Some((0x7f00_0000_0000, 0x7f00_4000_0000, 0))
        );
        assert_eq!(parse_maps_line(l, "00:1b", 1234), None);
        assert_eq!(parse_maps_line(l, "00:1a", 1235), None);
        assert_eq!(parse_maps_line("garbage", "00:1a", 1234), None);
    }

    /// A python child that maps `path` and writes one byte of page `i` for each line `i`
    /// it reads; it answers every line with "ok".
    fn writer(path: &Path, pages: u64) -> (std::process::Child, impl FnMut(&str)) {
        use std::io::{BufRead, Write};
        let script = format!(
            "import mmap,sys\nf=open('{}','r+b')\nm=mmap.mmap(f.fileno(),{})\n\
             for i in range({pages}): m[i*4096]=1\nprint('ok',flush=True)\n\
             for l in sys.stdin:\n  m[int(l)*4096+7]=9\n  print('ok',flush=True)\n",
            path.display(),
            pages * PAGE
        );
        let mut child = std::process::Command::new("python3")
            .args(["-c", &script])
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .spawn()
            .expect("python3");
        let mut out = std::io::BufReader::new(child.stdout.take().expect("stdout"));
        let mut stdin = child.stdin.take().expect("stdin");
        let mut ok = move || {
            let mut line = String::new();
            out.read_line(&mut line).expect("read the writer");
            assert_eq!(line.trim(), "ok");
        };
        ok();
        let write = move |page: &str| {
            stdin
                .write_all(format!("{page}\n").as_bytes())
                .expect("write");
            ok();
        };
        (child, write)
    }

    /// The log holds exactly the pages another process writes after it began, and a page
    /// the kernel punched out of the file; it is refused while a second process maps the
    /// file, and for a file on a disk.
    #[test]
    fn holds_what_a_process_touches() {
        use std::collections::BTreeSet;
        const N: usize = 2048;
        let dir = tempfile::tempdir_in("/dev/shm").expect("a directory on /dev/shm");
        let path = dir.path().join("ram");
        let f = std::fs::OpenOptions::new()
            .create(true)
            .truncate(true)
            .read(true)
            .write(true)
            .open(&path)
            .expect("RAM file");
        f.set_len(N as u64 * PAGE).expect("RAM file's size");
        let (mut child, mut write) = writer(&path, N as u64);
        let own = GuestMemory::open(&path)
            .expect("pct's view")
            .into_live_block("ram");
        // Reads every page through pct's view (its entries come back): the sum of the
        // writer's first byte of each page.
        let read_all = || -> u64 {
            (0..N as u64)
                .map(|i| own.live_block_page(i * PAGE).map_or(0, |p| p[0] as u64))
                .sum()
        };
        assert_eq!(read_all(), N as u64);
        let log = TouchLog::start(child.id(), &path, &own, N as u64 * PAGE).expect("a touch log");
        log.drop_entries(&own, 0, N).expect("dropping the entries");
        // What the caller does next.
        assert_eq!(read_all(), N as u64);
        let touched = |log: &TouchLog| -> BTreeSet<usize> {
            let t = log.touched(&own).expect("the log");
            (0..N).filter(|&i| t[i]).collect()
        };
        // The kernel may keep a few entries (pages still in a per-CPU batch, not yet on an
        // LRU list): those count as touched from the start.
        let kept = touched(&log);
        assert!(kept.len() < N / 8, "{} entries kept", kept.len());
        let mut free = (5..N).step_by(97).filter(|i| !kept.contains(i));
        let (a, b, punched) = (
            free.next().unwrap(),
            free.next().unwrap(),
            free.next().unwrap(),
        );
        write(&a.to_string());
        write(&b.to_string());
        let mut want = kept.clone();
        want.extend([a, b]);
        assert_eq!(touched(&log), want);
        rustix::fs::fallocate(
            &f,
            rustix::fs::FallocateFlags::PUNCH_HOLE | rustix::fs::FallocateFlags::KEEP_SIZE,
            punched as u64 * PAGE,
            PAGE,
        )
        .expect("punching a page");
        want.insert(punched);
        assert_eq!(touched(&log), want);

        let (mut other, _) = writer(&path, N as u64);
        let e =
            TouchLog::start(child.id(), &path, &own, N as u64 * PAGE).expect_err("a second mapper");
        assert!(e.contains(&format!("process {}", other.id())), "{e}");
        for c in [&mut child, &mut other] {
            let _ = c.kill();
            let _ = c.wait();
        }

        let disk = tempfile::NamedTempFile::new_in("/var/tmp").expect("a file on disk");
        disk.as_file().set_len(PAGE).expect("its size");
        let own = GuestMemory::open(disk.path())
            .expect("pct's view")
            .into_live_block("ram");
        let e =
            TouchLog::start(std::process::id(), disk.path(), &own, PAGE).expect_err("a disk file");
        assert!(e.contains("not on tmpfs"), "{e}");
    }
}
