//! pct: page-cache teleportation for live migration of Linux VMs.
//!
//! The crate follows the pipeline; modules import only from those before them:
//!
//! ```text
//! profile   vmlinux (DWARF/BTF) or imports ─▶ a kernel's symbols, layouts, enums
//! memory    guest RAM (raw file, ELF core) ─▶ a guest-physical view
//! qemu      a live QEMU: its monitor, its guest RAM as a memory view, migration control
//! disk      the guest's disk on the host (raw file, block device, qcow2 chain) ─▶ bytes
//! kernel    the kernel located (VMCOREINFO, KASLR, page tables); its own kallsyms and BTF
//!           ─▶ a profile from memory; which profile to use
//! walk      super_blocks → inodes → page-cache trees → struct page: clean page cache
//! blockmap  ext4 extents, block pointers, on-disk inodes: file page → disk bytes
//! cachemap  the cache map: runs of (guest-physical address, disk offset, length)
//! report    the forensic report and its disk verification
//! introspect  the scan end to end: memory → kernel → walk → cachemap → report
//! migrate   QEMU's stream ─▶ pct sender ══ WAN ══▶ pct receiver ─▶ QEMU's stream
//! (sanitize: untrusted strings made safe to print, for any of them;
//!  errors: how an error and its causes read on a terminal)
//! ```
//!
//! docs/design.md describes the design; each module's top comment says what it owns.

pub mod blockmap;
pub mod cachemap;
pub mod disk;
pub mod errors;
pub mod introspect;
pub mod kernel;
pub mod memory;
pub mod migrate;
pub mod profile;
pub mod qemu;
pub mod report;
pub mod sanitize;
pub mod selfstat;
pub mod walk;
