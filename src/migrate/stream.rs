//! QEMU's precopy migration stream, as QEMU 7.2 writes it: record types, a decoder and an
//! encoder.
//!
//! The stream is big-endian and has no framing of its own. Its top level is a sequence of
//! sections; a section's payload has no length field, so it can only be delimited by
//! understanding it. pct understands exactly two kinds of payload:
//!
//! - the iterative `ram` section (START, then PARTs, then END), a sequence of
//!   `be64 (offset | flags)` records, each ending at a known length ([`RamRecord`]);
//! - everything else at the top level (header, configuration, commands, footers, EOF and the
//!   JSON device description).
//!
//! Device state is sent by QEMU's non-iterative handlers as FULL sections once RAM is done
//! (`qemu_savevm_state_complete_precopy`: the ram END section first, then one FULL section
//! per device, then EOF and the JSON description). Its payload is opaque to pct, so from the
//! first FULL section on, the decoder hands out the rest of the stream as
//! [`Record::DeviceState`] chunks, verbatim, and recognises the EOF byte and the trailing
//! JSON only when the input ends ([`Trailer`]). No RAM follows a FULL section in precopy.
//!
//! Capabilities that change the RAM encoding (xbzrle, compress, multifd, postcopy, rdma,
//! block migration, dirty bitmaps, COLO) are refused with an error naming the capability to
//! switch off. `x-ignore-shared` is understood (it adds a field per RAM block).
//!
//! Layout of the code: this file holds the format's constants and types; [`decode`] turns
//! bytes into [`Record`]s, incrementally; [`encode`] turns [`Record`]s back into bytes, so
//! that decode → encode reproduces the input byte for byte.

pub mod decode;
pub mod encode;
pub mod record;

pub use decode::{Decoder, Item, StreamReader, StreamStats, Trailer};
pub use encode::{encode_record, put_page, put_zero, EncodeError};
pub use record::Recorder;

use std::fmt;

/// `QEVM`, the first four bytes of every stream.
pub const QEVM_MAGIC: u32 = 0x5145_564d;
/// The only stream version QEMU has written since 2009 (`QEMU_VM_FILE_VERSION`).
pub const QEVM_VERSION: u32 = 3;
/// x86 target page size: the payload of a RAM `PAGE` record.
pub const PAGE_SIZE: usize = 4096;
/// Flags live in the low bits of a RAM record's `be64`, below the target page size.
pub const RAM_FLAGS_MASK: u64 = PAGE_SIZE as u64 - 1;

/// Upper bound on the trailing JSON device description we accept (QEMU 7.2 writes about
/// 100 KB for a small `pc` machine).
pub const MAX_VMDESC: usize = 8 << 20;
/// Upper bound on the number of RAM blocks in a `MEM_SIZE` record.
pub const MAX_RAM_BLOCKS: usize = 4096;
/// Upper bound on the machine name in the configuration section.
pub const MAX_MACHINE_NAME: usize = 256;

/// Top-level section type bytes (`QEMU_VM_*` in QEMU's savevm.c).
pub mod section_type {
    pub const EOF: u8 = 0x00;
    pub const START: u8 = 0x01;
    pub const PART: u8 = 0x02;
    pub const END: u8 = 0x03;
    pub const FULL: u8 = 0x04;
    pub const SUBSECTION: u8 = 0x05;
    pub const VMDESCRIPTION: u8 = 0x06;
    pub const CONFIGURATION: u8 = 0x07;
    pub const COMMAND: u8 = 0x08;
    pub const FOOTER: u8 = 0x7e;
}

/// Flags of a RAM record (`RAM_SAVE_FLAG_*` in QEMU's ram.c).
pub mod ram_flag {
    /// Obsolete whole-RAM marker; never sent by modern QEMU.
    pub const FULL: u64 = 0x01;
    /// A page filled with one byte (always 0 from QEMU ≥ 2.x); named `COMPRESS` long ago.
    pub const ZERO: u64 = 0x02;
    /// The list of RAM blocks; the address part is the total RAM size.
    pub const MEM_SIZE: u64 = 0x04;
    /// A full target page follows.
    pub const PAGE: u64 = 0x08;
    /// End of this section's RAM records.
    pub const EOS: u64 = 0x10;
    /// Same RAM block as the previous record: no block name follows.
    pub const CONTINUE: u64 = 0x20;
    /// XBZRLE-encoded page (capability `xbzrle`).
    pub const XBZRLE: u64 = 0x40;
    /// RDMA hook (`rdma:` transport).
    pub const HOOK: u64 = 0x80;
    /// zlib-compressed page (capability `compress`).
    pub const COMPRESS_PAGE: u64 = 0x100;
    /// multifd synchronisation point (QEMU ≥ 8.0, capability `multifd`).
    pub const MULTIFD_FLUSH: u64 = 0x200;
}

/// `QEMU_VM_COMMAND` sub-commands (`MIG_CMD_*`).
pub mod command {
    pub const OPEN_RETURN_PATH: u16 = 1;
    pub const PING: u16 = 2;
    pub const POSTCOPY_ADVISE: u16 = 3;
    pub const POSTCOPY_LISTEN: u16 = 4;
    pub const POSTCOPY_RUN: u16 = 5;
    pub const POSTCOPY_RAM_DISCARD: u16 = 6;
    pub const PACKAGED: u16 = 7;
    pub const ENABLE_COLO: u16 = 8;
    pub const POSTCOPY_RESUME: u16 = 9;
    pub const RECV_BITMAP: u16 = 10;
    /// QEMU 9.2+: the source is about to stop the guest and send the last state
    /// (`send-switchover-start`, on by default for new machine types); no arguments.
    pub const SWITCHOVER_START: u16 = 11;
}

/// The name of the iterative RAM section.
pub const RAM_SECTION: &str = "ram";

/// The four kinds of section header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SectionKind {
    Start,
    Part,
    End,
    Full,
}

impl SectionKind {
    pub fn type_byte(self) -> u8 {
        match self {
            SectionKind::Start => section_type::START,
            SectionKind::Part => section_type::PART,
            SectionKind::End => section_type::END,
            SectionKind::Full => section_type::FULL,
        }
    }

    /// START and FULL headers carry name, instance and version.
    pub fn has_ident(self) -> bool {
        matches!(self, SectionKind::Start | SectionKind::Full)
    }
}

/// Name, instance id and version of a START or FULL section.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SectionIdent<'a> {
    pub name: &'a str,
    pub instance: u32,
    pub version: u32,
}

/// A section header. `ident` is present exactly for START and FULL.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SectionHeader<'a> {
    pub kind: SectionKind,
    pub id: u32,
    pub ident: Option<SectionIdent<'a>>,
}

/// One subsection of the configuration section (`configuration/...` in savevm.c).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ConfigSubsection {
    /// `configuration/target-page-bits`: sent only when it differs from the target default.
    TargetPageBits { version: u32, bits: u32 },
    /// `configuration/capabilities`: capabilities the destination must also have enabled
    /// (in QEMU 7.2 only `x-ignore-shared`).
    Capabilities { version: u32, names: Vec<String> },
    /// `configuration/uuid` (capability `validate-uuid`).
    Uuid { version: u32, uuid: [u8; 16] },
}

impl ConfigSubsection {
    pub const TARGET_PAGE_BITS: &'static str = "configuration/target-page-bits";
    pub const CAPABILITIES: &'static str = "configuration/capabilities";
    pub const UUID: &'static str = "configuration/uuid";

    pub fn name(&self) -> &'static str {
        match self {
            ConfigSubsection::TargetPageBits { .. } => Self::TARGET_PAGE_BITS,
            ConfigSubsection::Capabilities { .. } => Self::CAPABILITIES,
            ConfigSubsection::Uuid { .. } => Self::UUID,
        }
    }
}

/// A RAM block as announced by `MEM_SIZE`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RamBlock {
    /// QEMU's block id string, e.g. `ram0`, `pc.ram`, `0000:00:02.0/vga.vram`.
    pub name: String,
    /// Bytes of the block in use (pages are addressed by offset inside it).
    pub used_length: u64,
    /// The block's guest address, sent only with `x-ignore-shared`.
    pub shared_addr: Option<u64>,
}

/// Where a page goes: RAM block and byte offset inside it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PageAddr<'a> {
    /// Index into the `MEM_SIZE` block list.
    pub block: usize,
    pub block_name: &'a str,
    /// Byte offset inside the block, page aligned.
    pub offset: u64,
    /// Sent with `CONTINUE` (no block name on the wire).
    pub continued: bool,
}

/// A record of the `ram` section.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RamRecord<'a> {
    MemSize { total: u64, blocks: &'a [RamBlock] },
    Zero { page: PageAddr<'a>, fill: u8 },
    Page { page: PageAddr<'a>, data: &'a [u8] },
    Eos,
}

/// One unit of the stream, borrowing from the decoder's buffer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Record<'a> {
    /// `QEVM` and the version.
    Header { version: u32 },
    /// 0x07: the machine type name, and optional subsections.
    Configuration {
        machine: &'a str,
        subsections: &'a [ConfigSubsection],
    },
    /// 0x08: a command with its raw argument bytes.
    Command { cmd: u16, data: &'a [u8] },
    /// 0x01..0x04.
    Section(SectionHeader<'a>),
    /// 0x7e: end of a section.
    Footer { section_id: u32 },
    /// A record inside a `ram` section.
    Ram(RamRecord<'a>),
    /// Opaque bytes from the first non-RAM FULL section to the end of the stream, verbatim
    /// (device state, footers, EOF and the JSON description).
    DeviceState(&'a [u8]),
    /// 0x00 seen at the top level (only when no device state precedes it).
    Eof,
    /// 0x06: the JSON device description that follows EOF (only when no device state
    /// precedes it; otherwise see [`Trailer`]).
    VmDesc { json: &'a [u8] },
}

/// The switchover, as the stream shows it ([`Switchover::observe`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SwitchoverPoint {
    /// The `ram` section's END part begins: QEMU has stopped the guest and sends its last
    /// dirty pages.
    EndPart,
    /// That part's EOS: all of the guest's RAM is out of QEMU; device state follows.
    Eos,
}

/// Follows the `ram` section through a stream and says when the switchover happens.
#[derive(Debug, Clone, Default)]
pub struct Switchover {
    ram_section: Option<u32>,
    /// Inside the `ram` section's END part.
    in_final: bool,
}

impl Switchover {
    /// Notes `rec` (in stream order); names the switchover point it is, if any.
    pub fn observe(&mut self, rec: &Record<'_>) -> Option<SwitchoverPoint> {
        match rec {
            Record::Section(h) => {
                if h.ident.is_some_and(|i| i.name == RAM_SECTION) {
                    self.ram_section = Some(h.id);
                }
                self.in_final = h.kind == SectionKind::End && Some(h.id) == self.ram_section;
                self.in_final.then_some(SwitchoverPoint::EndPart)
            }
            Record::Ram(RamRecord::Eos) if self.in_final => {
                self.in_final = false;
                Some(SwitchoverPoint::Eos)
            }
            _ => None,
        }
    }
}

/// Where in the stream an error was found.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Context {
    /// Byte offset in the stream of the record that failed.
    pub offset: u64,
    /// Section id and name being decoded, if inside one.
    pub section: Option<(u32, String)>,
}

impl fmt::Display for Context {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "stream offset {}", self.offset)?;
        if let Some((id, name)) = &self.section {
            write!(f, ", section {id} `{name}`")?;
        }
        Ok(())
    }
}

/// What is wrong with a stream.
#[derive(Debug, thiserror::Error)]
pub enum ErrorKind {
    #[error("not a QEMU migration stream (magic {0:#010x}, want `QEVM`)")]
    BadMagic(u32),
    #[error("unsupported stream version {0} (QEMU 7.2 writes {QEVM_VERSION})")]
    BadVersion(u32),
    #[error("unsupported: {what}; disable QEMU migration capability `{capability}`")]
    Capability {
        what: &'static str,
        capability: &'static str,
    },
    #[error("unsupported: {0}")]
    Unsupported(String),
    #[error("malformed stream: {0}")]
    Malformed(String),
    #[error("{what} is {len} bytes, more than the limit of {max}")]
    TooLong {
        what: &'static str,
        len: u64,
        max: u64,
    },
    #[error("stream ended early: {0}")]
    Truncated(String),
    #[error("decoder already failed earlier; the stream cannot be resynchronised")]
    Poisoned,
    #[error("reading the stream: {0}")]
    Io(#[from] std::io::Error),
}

/// A stream error with its context.
#[derive(Debug, thiserror::Error)]
#[error("QEMU migration stream, {context}: {kind}")]
pub struct StreamError {
    pub context: Context,
    pub kind: ErrorKind,
}

impl StreamError {
    pub fn new(context: Context, kind: ErrorKind) -> StreamError {
        StreamError { context, kind }
    }
}
