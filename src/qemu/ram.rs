//! Guest RAM of a live QEMU, found through its QMP socket, read-only.
//!
//! QEMU is asked for its `memory-backend-file` objects (`qom-list`/`qom-get`): the
//! backend's file (shared, e.g. in /dev/shm) is mapped read-only, and the flat memory
//! map (`info mtree -f`) says which guest-physical ranges show which offsets of it.
//! Any other QEMU (anonymous RAM): its process memory is read through /proc/PID/mem from
//! the host address HMP `gpa2hva` reports, each page when it is first needed and while the
//! guest may run, which the walkers' back-pointer checks are made for.

use super::Qmp;
use crate::memory::ondemand::ProcessMem;
use crate::memory::{GuestMemory, MemError, Region};
use serde_json::{json, Value};
use std::path::{Path, PathBuf};
use std::time::Duration;

/// A memory backend object of a running QEMU.
#[derive(Debug, Clone)]
pub struct Backend {
    pub id: String,
    pub mem_path: PathBuf,
    pub size: u64,
    pub share: bool,
}

fn qmp_err(e: super::QmpError) -> MemError {
    MemError::Format {
        path: PathBuf::from("QMP"),
        msg: e.to_string(),
    }
}

/// Lists QEMU's `memory-backend-file` objects.
pub fn backends(qmp: &mut Qmp) -> Result<Vec<Backend>, MemError> {
    let list = qmp
        .execute("qom-list", Some(json!({ "path": "/objects" })))
        .map_err(qmp_err)?;
    let mut out = Vec::new();
    for o in list.as_array().into_iter().flatten() {
        let (Some(name), Some(ty)) = (o["name"].as_str(), o["type"].as_str()) else {
            continue;
        };
        if ty != "child<memory-backend-file>" {
            continue;
        }
        let path = format!("/objects/{name}");
        let get = |qmp: &mut Qmp, prop: &str| -> Result<Value, MemError> {
            qmp.execute("qom-get", Some(json!({ "path": path, "property": prop })))
                .map_err(qmp_err)
        };
        let mem_path = get(qmp, "mem-path")?;
        let size = get(qmp, "size")?;
        let share = get(qmp, "share")?;
        out.push(Backend {
            id: name.to_owned(),
            mem_path: PathBuf::from(mem_path.as_str().unwrap_or_default()),
            size: size.as_u64().unwrap_or(0),
            share: share.as_bool().unwrap_or(false),
        });
    }
    Ok(out)
}

/// Parses `info mtree -f` lines `START-END (prio P, ram): NAME [@OFFSET]` for `name`.
pub fn parse_mtree(text: &str, name: &str) -> Vec<Region> {
    let mut regions: Vec<Region> = Vec::new();
    for line in text.lines() {
        let line = line.trim();
        let Some((range, rest)) = line.split_once(' ') else {
            continue;
        };
        let Some((s, e)) = range.split_once('-') else {
            continue;
        };
        let (Ok(start), Ok(end)) = (u64::from_str_radix(s, 16), u64::from_str_radix(e, 16)) else {
            continue;
        };
        let Some((attrs, target)) = rest.split_once("): ") else {
            continue;
        };
        if !attrs.ends_with("ram") {
            continue;
        }
        let mut words = target.split_whitespace();
        if words.next() != Some(name) {
            continue;
        }
        let offset = words
            .next()
            .and_then(|w| w.strip_prefix('@'))
            .and_then(|o| u64::from_str_radix(o, 16).ok())
            .unwrap_or(start);
        let len = end.wrapping_sub(start).wrapping_add(1);
        if regions.iter().any(|r| r.gpa == start) || len == 0 {
            continue;
        }
        regions.push(Region {
            gpa: start,
            offset,
            len,
        });
    }
    regions.sort_by_key(|r| r.gpa);
    // Merge pieces that continue each other in both spaces.
    let mut merged: Vec<Region> = Vec::new();
    for r in regions {
        match merged.last_mut() {
            Some(m) if m.gpa + m.len == r.gpa && m.offset + m.len == r.offset => m.len += r.len,
            _ => merged.push(r),
        }
    }
    merged
}

/// Maps the RAM of the QEMU behind `socket`.
pub fn open_live(socket: &Path) -> Result<GuestMemory, MemError> {
    let mut qmp = Qmp::connect(socket, Duration::from_secs(5)).map_err(qmp_err)?;
    let backends = backends(&mut qmp)?;
    let mtree = qmp.hmp("info mtree -f").map_err(qmp_err)?;
    let Some(b) = backends.iter().max_by_key(|b| b.size) else {
        return process_ram(&mut qmp, &mtree, socket);
    };
    if !b.share {
        return Err(MemError::Format {
            path: b.mem_path.clone(),
            msg: format!(
                "memory backend '{}' is not share=on: its file does not show guest RAM",
                b.id
            ),
        });
    }
    let mut regions = parse_mtree(&mtree, &b.id);
    if regions.is_empty() {
        regions = vec![Region {
            gpa: 0,
            offset: 0,
            len: b.size,
        }];
    }
    GuestMemory::open_live_block(
        &b.mem_path,
        &b.id,
        regions,
        format!(
            "live QEMU {} (RAM file {})",
            socket.display(),
            b.mem_path.display()
        ),
    )
}

/// The main RAM block's name: the one holding guest-physical 1 MiB.
fn main_ram_block(mtree: &str) -> Option<String> {
    mtree.lines().find_map(|l| {
        let l = l.trim();
        let (range, rest) = l.split_once(' ')?;
        let (s, e) = range.split_once('-')?;
        let (s, e) = (
            u64::from_str_radix(s, 16).ok()?,
            u64::from_str_radix(e, 16).ok()?,
        );
        let (attrs, target) = rest.split_once("): ")?;
        (attrs.ends_with("ram") && s <= 0x10_0000 && 0x10_0000 <= e)
            .then(|| target.split_whitespace().next().map(str::to_owned))
            .flatten()
    })
}

/// The main RAM block of a QEMU process whose guest RAM is anonymous memory: where it sits
/// in the process (from HMP `gpa2hva`), read through `/proc/PID/mem`.
#[derive(Debug, Clone)]
pub struct ProcessRam {
    /// The RAM block's name in QEMU's migration stream (`pc.ram` for a PC machine).
    pub block: String,
    pub pid: u32,
    /// Host virtual address of the block's offset 0 in QEMU's process.
    base: u64,
    /// Guest-physical ranges of the block.
    pub regions: Vec<Region>,
    /// Bytes of the block the regions cover.
    pub len: u64,
}

impl ProcessRam {
    /// Finds the main RAM block of the QEMU behind `qmp` (`mtree`: its `info mtree -f`).
    pub fn find(qmp: &mut Qmp, mtree: &str, socket: &Path) -> Result<ProcessRam, MemError> {
        let fail = |msg: String| MemError::Format {
            path: socket.to_owned(),
            msg,
        };
        let pid = qmp
            .peer_pid()
            .ok_or_else(|| fail("cannot tell QEMU's process id from its QMP socket".into()))?;
        let block = main_ram_block(mtree)
            .ok_or_else(|| fail("`info mtree -f` shows no RAM at 1 MiB".into()))?;
        let regions = parse_mtree(mtree, &block);
        let len = regions.iter().map(|r| r.offset + r.len).max().unwrap_or(0);
        // Host address of block offset 0: gpa2hva of an address whose block offset is known.
        let probe = regions
            .iter()
            .find(|r| r.len >= 4096)
            .ok_or_else(|| fail(format!("RAM block {block} has no mapped page")))?;
        let answer = qmp
            .hmp(&format!("gpa2hva {:#x}", probe.gpa))
            .map_err(qmp_err)?;
        let base = answer
            .rsplit("is 0x")
            .next()
            .and_then(|h| u64::from_str_radix(h.trim(), 16).ok())
            .and_then(|hva| hva.checked_sub(probe.offset))
            .ok_or_else(|| fail(format!("unexpected gpa2hva answer {answer:?}")))?;
        Ok(ProcessRam {
            block,
            pid,
            base,
            regions,
            len,
        })
    }

    /// The RAM block `block` of the QEMU process `pid`, found without a monitor: mapped at
    /// `base` in the process ([`super::process::ram_mapping`]), `len` bytes, laid out in
    /// guest-physical memory as `regions`.
    pub fn in_process(
        pid: u32,
        block: String,
        base: u64,
        len: u64,
        regions: Vec<Region>,
    ) -> ProcessRam {
        ProcessRam {
            block,
            pid,
            base,
            regions,
            len,
        }
    }

    /// The same block laid out as `regions` instead.
    pub fn with_regions(mut self, regions: Vec<Region>) -> ProcessRam {
        self.regions = regions;
        self
    }

    /// The block's bytes, read through `/proc/PID/mem` into buffers of the caller's; its
    /// offsets are the block's, including the parts no guest-physical address shows (the
    /// PC's legacy VGA and BIOS window), which QEMU migrates too.
    pub fn memory(&self) -> Result<ProcessMem, MemError> {
        ProcessMem::open(self.pid, self.base, self.len)
    }

    /// A view of the guest-physical memory of the block that copies each page in from
    /// `/proc/PID/mem` when it is first read (see [`crate::memory::ondemand`]): while the
    /// guest runs, each page is as it was at that moment.
    pub fn open(&self) -> Result<GuestMemory, MemError> {
        let description = format!(
            "live QEMU pid {} (RAM block {}, read through /proc/{}/mem)",
            self.pid, self.block, self.pid
        );
        GuestMemory::open_process(self.memory()?, self.regions.clone(), description)
    }
}

/// The main RAM block of the QEMU process behind `qmp`, read through /proc/PID/mem.
fn process_ram(qmp: &mut Qmp, mtree: &str, socket: &Path) -> Result<GuestMemory, MemError> {
    ProcessRam::find(qmp, mtree, socket)?.open()
}
