//! VMCOREINFO: the kernel's own `KEY=VALUE` description of itself, kept in an ELF
//! note in guest RAM (`vmcoreinfo_note`) and copied into QEMU's ELF cores.

use std::collections::HashMap;

/// Parsed VMCOREINFO text.
#[derive(Debug, Clone, Default)]
pub struct VmcoreInfo {
    pub values: HashMap<String, String>,
    /// Guest-physical address of the note's name (`VMCOREINFO\0`), when it was found in
    /// RAM: kernels that do not publish `NUMBER(phys_base)` are placed by it.
    pub found_at: Option<u64>,
}

/// The note header plus the start of its text, as it appears in guest RAM:
/// name "VMCOREINFO\0" padded to 12 bytes, then the descriptor.
pub const NOTE_MARKER: &[u8] = b"VMCOREINFO\0\0OSRELEASE=";

impl VmcoreInfo {
    pub fn parse(text: &str) -> VmcoreInfo {
        let values = text
            .lines()
            .filter_map(|l| l.split_once('='))
            .map(|(k, v)| (k.to_owned(), v.to_owned()))
            .collect();
        VmcoreInfo {
            values,
            found_at: None,
        }
    }

    /// Finds the note in raw guest memory and parses it. `chunk` starts at the marker.
    pub fn from_note_bytes(at_marker: &[u8]) -> Option<VmcoreInfo> {
        let text = at_marker.get(12..)?;
        let end = text.iter().take(64 * 1024).position(|&b| b == 0)?;
        // Guest bytes: a corrupt byte spoils its own line only.
        let info = VmcoreInfo::parse(&String::from_utf8_lossy(&text[..end]));
        info.get("OSRELEASE").is_some().then_some(info)
    }

    pub fn get(&self, key: &str) -> Option<&str> {
        self.values.get(key).map(String::as_str)
    }

    fn hex(&self, key: &str) -> Option<u64> {
        u64::from_str_radix(self.get(key)?, 16).ok()
    }

    pub fn number(&self, name: &str) -> Option<i64> {
        self.get(&format!("NUMBER({name})"))?.parse().ok()
    }

    pub fn symbol(&self, name: &str) -> Option<u64> {
        self.hex(&format!("SYMBOL({name})"))
    }

    pub fn release(&self) -> Option<&str> {
        self.get("OSRELEASE")
    }

    pub fn build_id(&self) -> Option<&str> {
        self.get("BUILD-ID")
    }

    /// The virtual KASLR shift (`KERNELOFFSET`, hex).
    pub fn kernel_offset(&self) -> Option<u64> {
        self.hex("KERNELOFFSET")
    }
}
