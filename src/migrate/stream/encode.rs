//! Encoder: [`Record`]s back to stream bytes, exactly as QEMU 7.2 lays them out.
//!
//! Encoding a record the decoder produced yields the bytes it was decoded from. The receiver
//! also uses [`put_page`] to emit a page it restored from disk.

use super::{
    ram_flag, section_type, ConfigSubsection, PageAddr, RamRecord, Record, MAX_VMDESC, PAGE_SIZE,
    QEVM_MAGIC, RAM_FLAGS_MASK,
};

/// A record that cannot be written as QEMU would read it.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum EncodeError {
    #[error("{what} `{name}` is longer than 255 bytes")]
    NameTooLong { what: &'static str, name: String },
    #[error("page payload is {0} bytes, must be {PAGE_SIZE}")]
    PageSize(usize),
    #[error("RAM address {0:#x} is not page aligned")]
    Unaligned(u64),
    #[error("{what} of {len} bytes does not fit its length field")]
    TooLong { what: &'static str, len: usize },
    #[error("section header: START/FULL need name, instance and version; PART/END have none")]
    SectionIdent,
}

fn put_name8(out: &mut Vec<u8>, what: &'static str, name: &str) -> Result<(), EncodeError> {
    let len = u8::try_from(name.len()).map_err(|_| EncodeError::NameTooLong {
        what,
        name: name.to_owned(),
    })?;
    out.push(len);
    out.extend_from_slice(name.as_bytes());
    Ok(())
}

fn put_ram_word(out: &mut Vec<u8>, addr: u64, flags: u64) -> Result<(), EncodeError> {
    if addr & RAM_FLAGS_MASK != 0 {
        return Err(EncodeError::Unaligned(addr));
    }
    out.extend_from_slice(&(addr | flags).to_be_bytes());
    Ok(())
}

/// The be64 word and, unless `block` is `None` (CONTINUE), the block name.
fn put_page_header(
    out: &mut Vec<u8>,
    block: Option<&str>,
    offset: u64,
    flag: u64,
) -> Result<(), EncodeError> {
    match block {
        Some(name) => {
            put_ram_word(out, offset, flag)?;
            put_name8(out, "RAM block name", name)
        }
        None => put_ram_word(out, offset, flag | ram_flag::CONTINUE),
    }
}

/// A `PAGE` record; `block: None` writes it as CONTINUE (same block as the record before).
pub fn put_page(
    out: &mut Vec<u8>,
    block: Option<&str>,
    offset: u64,
    data: &[u8],
) -> Result<(), EncodeError> {
    if data.len() != PAGE_SIZE {
        return Err(EncodeError::PageSize(data.len()));
    }
    put_page_header(out, block, offset, ram_flag::PAGE)?;
    out.extend_from_slice(data);
    Ok(())
}

/// A `ZERO` record (a page filled with `fill`); `block: None` writes CONTINUE.
pub fn put_zero(
    out: &mut Vec<u8>,
    block: Option<&str>,
    offset: u64,
    fill: u8,
) -> Result<(), EncodeError> {
    put_page_header(out, block, offset, ram_flag::ZERO)?;
    out.push(fill);
    Ok(())
}

fn page_block<'a>(page: &PageAddr<'a>) -> Option<&'a str> {
    (!page.continued).then_some(page.block_name)
}

fn put_subsection(out: &mut Vec<u8>, sub: &ConfigSubsection) -> Result<(), EncodeError> {
    out.push(section_type::SUBSECTION);
    put_name8(out, "subsection name", sub.name())?;
    match sub {
        ConfigSubsection::TargetPageBits { version, bits } => {
            out.extend_from_slice(&version.to_be_bytes());
            out.extend_from_slice(&bits.to_be_bytes());
        }
        ConfigSubsection::Capabilities { version, names } => {
            out.extend_from_slice(&version.to_be_bytes());
            let count = u32::try_from(names.len()).map_err(|_| EncodeError::TooLong {
                what: "capability list",
                len: names.len(),
            })?;
            out.extend_from_slice(&count.to_be_bytes());
            for name in names {
                put_name8(out, "capability name", name)?;
            }
        }
        ConfigSubsection::Uuid { version, uuid } => {
            out.extend_from_slice(&version.to_be_bytes());
            out.extend_from_slice(uuid);
        }
    }
    Ok(())
}

/// Appends the encoding of `rec` to `out`. On error `out` may hold a partial record.
pub fn encode_record(rec: &Record<'_>, out: &mut Vec<u8>) -> Result<(), EncodeError> {
    match rec {
        Record::Header { version } => {
            out.extend_from_slice(&QEVM_MAGIC.to_be_bytes());
            out.extend_from_slice(&version.to_be_bytes());
        }
        Record::Configuration {
            machine,
            subsections,
        } => {
            out.push(section_type::CONFIGURATION);
            let len = u32::try_from(machine.len()).map_err(|_| EncodeError::TooLong {
                what: "machine name",
                len: machine.len(),
            })?;
            out.extend_from_slice(&len.to_be_bytes());
            out.extend_from_slice(machine.as_bytes());
            for sub in subsections.iter() {
                put_subsection(out, sub)?;
            }
        }
        Record::Command { cmd, data } => {
            let len = u16::try_from(data.len()).map_err(|_| EncodeError::TooLong {
                what: "command",
                len: data.len(),
            })?;
            out.push(section_type::COMMAND);
            out.extend_from_slice(&cmd.to_be_bytes());
            out.extend_from_slice(&len.to_be_bytes());
            out.extend_from_slice(data);
        }
        Record::Section(h) => {
            if h.kind.has_ident() != h.ident.is_some() {
                return Err(EncodeError::SectionIdent);
            }
            out.push(h.kind.type_byte());
            out.extend_from_slice(&h.id.to_be_bytes());
            if let Some(ident) = &h.ident {
                put_name8(out, "section name", ident.name)?;
                out.extend_from_slice(&ident.instance.to_be_bytes());
                out.extend_from_slice(&ident.version.to_be_bytes());
            }
        }
        Record::Footer { section_id } => {
            out.push(section_type::FOOTER);
            out.extend_from_slice(&section_id.to_be_bytes());
        }
        Record::Ram(RamRecord::MemSize { total, blocks }) => {
            put_ram_word(out, *total, ram_flag::MEM_SIZE)?;
            for b in blocks.iter() {
                put_name8(out, "RAM block name", &b.name)?;
                out.extend_from_slice(&b.used_length.to_be_bytes());
                if let Some(addr) = b.shared_addr {
                    out.extend_from_slice(&addr.to_be_bytes());
                }
            }
        }
        Record::Ram(RamRecord::Zero { page, fill }) => {
            put_zero(out, page_block(page), page.offset, *fill)?;
        }
        Record::Ram(RamRecord::Page { page, data }) => {
            put_page(out, page_block(page), page.offset, data)?;
        }
        Record::Ram(RamRecord::Eos) => put_ram_word(out, 0, ram_flag::EOS)?,
        Record::DeviceState(bytes) => out.extend_from_slice(bytes),
        Record::Eof => out.push(section_type::EOF),
        Record::VmDesc { json } => {
            if json.len() > MAX_VMDESC {
                return Err(EncodeError::TooLong {
                    what: "JSON device description",
                    len: json.len(),
                });
            }
            out.push(section_type::VMDESCRIPTION);
            out.extend_from_slice(&(json.len() as u32).to_be_bytes());
            out.extend_from_slice(json);
        }
    }
    Ok(())
}
