//! The kernel's own type information (BTF) in guest memory.
//!
//! vmlinux's BTF blob lies in the kernel image between `__start_BTF` and `__stop_BTF` (what
//! `/sys/kernel/btf/vmlinux` shows). Each loaded module's split BTF was copied by
//! `btf_parse_module` into a `struct btf` (its `data`, `data_size` and `name`) hung on the
//! `btf_modules` list through a `struct btf_module`; the layouts of both come from
//! vmlinux's BTF itself, so no profile is needed to read them.

use super::{LocateError, Location};
use crate::memory::GuestMemory;
use crate::profile::btf::Btf;
use crate::profile::types::{find_path, Kind, TypeSource};

/// Larger than any kernel's BTF (Debian's vmlinux carries about 5 MB).
const MAX_BTF: u64 = 256 << 20;
/// More modules than any kernel loads.
const MAX_MODULES: usize = 4096;

/// Why the guest's BTF could not be read.
#[derive(Debug, thiserror::Error)]
pub enum MemBtfError {
    #[error(transparent)]
    Read(#[from] LocateError),
    #[error(
        "the guest kernel carries no BTF: its symbol table has no {0} (a kernel built without \
         CONFIG_DEBUG_INFO_BTF); build a profile from its vmlinux with debug information instead: \
         `pct-introspect build-profile /usr/lib/debug/boot/vmlinux-<release>` (Debian: package \
         linux-image-<release>-dbg)"
    )]
    NoBtf(&'static str),
    #[error("the guest's {what} at {va:#x} ({len} bytes) fails validation: {msg}")]
    Invalid {
        what: String,
        va: u64,
        len: u64,
        msg: String,
    },
    #[error("reading module BTF needs {0} in vmlinux's BTF, which lacks it")]
    Layout(String),
}

/// vmlinux's BTF blob: its runtime address and bytes.
pub fn vmlinux_btf(
    mem: &GuestMemory,
    loc: &Location,
    start: Option<u64>,
    stop: Option<u64>,
) -> Result<(u64, Vec<u8>), MemBtfError> {
    let start = start.ok_or(MemBtfError::NoBtf("__start_BTF"))?;
    let stop = stop.ok_or(MemBtfError::NoBtf("__stop_BTF"))?;
    let len = stop
        .checked_sub(start)
        .filter(|l| (24..=MAX_BTF).contains(l))
        .ok_or_else(|| MemBtfError::Invalid {
            what: "vmlinux BTF".into(),
            va: start,
            len: stop.wrapping_sub(start),
            msg: format!("__start_BTF..__stop_BTF ({start:#x}..{stop:#x}) is not a plausible size"),
        })?;
    let bytes = loc.read(mem, start, len, "vmlinux BTF (__start_BTF)")?;
    Ok((start, bytes.into_owned()))
}

/// A loaded module's split BTF, as the kernel keeps it.
pub struct ModuleBtf {
    /// The module's name (sanitised: guest bytes).
    pub name: String,
    /// Runtime address of the copy the kernel parsed.
    pub va: u64,
    pub data: Vec<u8>,
}

/// Every module BTF on the `btf_modules` list at `list_head` (its runtime address).
pub fn module_btfs(
    mem: &GuestMemory,
    loc: &Location,
    base: &Btf<'_>,
    list_head: u64,
) -> Result<Vec<ModuleBtf>, MemBtfError> {
    let off = |ty: &str, field: &str| -> Result<u64, MemBtfError> {
        let missing = || MemBtfError::Layout(format!("{ty}.{field}"));
        let id = base
            .find(Kind::Aggregate, ty)
            .ok()
            .flatten()
            .ok_or_else(missing)?;
        let f = find_path(base, id, field)
            .ok()
            .flatten()
            .ok_or_else(missing)?;
        Ok(f.bit_offset / 8)
    };
    let list_off = off("btf_module", "list")?;
    let btf_ptr_off = off("btf_module", "btf")?;
    let data_off = off("btf", "data")?;
    let size_off = off("btf", "data_size")?;
    let name_off = off("btf", "name")?;

    let u64_at = |va: u64, what: &str| loc.read_u64(mem, va, what);
    let mut out = Vec::new();
    let mut node = u64_at(list_head, "btf_modules.next")?;
    let mut seen = std::collections::HashSet::new();
    // list_for_each_entry(btf_mod, &btf_modules, list)
    while node != list_head {
        if !seen.insert(node) || out.len() >= MAX_MODULES {
            return Err(MemBtfError::Invalid {
                what: "btf_modules list".into(),
                va: node,
                len: 0,
                msg: "the list loops or never ends".into(),
            });
        }
        let entry = node.wrapping_sub(list_off);
        let btf = u64_at(entry + btf_ptr_off, "btf_module.btf")?;
        let data = u64_at(btf + data_off, "btf.data")?;
        let size = u64::from(loc.read_u32(mem, btf + size_off, "btf.data_size")?);
        let raw_name = loc.read(mem, btf + name_off, 56, "btf.name")?;
        let end = raw_name
            .iter()
            .position(|&b| b == 0)
            .unwrap_or(raw_name.len());
        let name = crate::sanitize::sanitize(&raw_name[..end]);
        if !(24..=MAX_BTF).contains(&size) {
            return Err(MemBtfError::Invalid {
                what: format!("BTF of module {name}"),
                va: data,
                len: size,
                msg: "not a plausible size".into(),
            });
        }
        let bytes = loc.read(mem, data, size, "module BTF (btf.data)")?;
        out.push(ModuleBtf {
            name,
            va: data,
            data: bytes.into_owned(),
        });
        node = u64_at(node, "btf_module.list.next")?;
    }
    Ok(out)
}
