//! Incremental decoder of the precopy stream: feed bytes as they arrive, take records out.
//!
//! The decoder owns one buffer. [`Decoder::advance`] parses the next complete record at the
//! front of it and keeps it as the *current* record, which [`Decoder::item`] shows as a
//! [`Record`] borrowing the buffer (a page's 4096 bytes are not copied) together with the raw
//! bytes it was decoded from. The current record stays valid until the next `advance`,
//! `feed` or `read_from`. When the buffer holds only part of a record, `advance` returns
//! `false` and the caller feeds more. [`Decoder::finish`] says the input has ended and checks
//! that it ended where a stream may end.
//!
//! A record is parsed from its first byte each time it is tried, and the decoder's state only
//! changes once the whole record is present, so chunk boundaries can fall anywhere.
//! Memory is bounded: a buffer of what the caller fed (at most one partial record is kept
//! across calls: ≤ 4 KiB + 264 bytes for RAM, ≤ [`MAX_VMDESC`] for the JSON description),
//! plus the last [`MAX_VMDESC`] bytes of device state, kept to find the trailer at the end.

use super::{
    command, ram_flag, section_type, ConfigSubsection, Context, ErrorKind, PageAddr, RamBlock,
    RamRecord, Record, SectionHeader, SectionIdent, SectionKind, StreamError, MAX_MACHINE_NAME,
    MAX_RAM_BLOCKS, MAX_VMDESC, PAGE_SIZE, QEVM_MAGIC, QEVM_VERSION, RAM_FLAGS_MASK, RAM_SECTION,
};
use std::io::Read;
use std::ops::Range;

/// The `ram` section version QEMU 7.2 writes.
const RAM_SECTION_VERSION: u32 = 4;
/// More capabilities than QEMU has would be garbage.
const MAX_CONFIG_CAPABILITIES: u32 = 64;
const MAX_CONFIG_SUBSECTIONS: usize = 16;
/// Default read size of [`StreamReader`].
const READ_CHUNK: usize = 256 << 10;

/// Where the decoder is in the stream's grammar.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
enum State {
    /// Expecting `QEVM` + version.
    #[default]
    Header,
    /// Expecting the optional configuration section.
    Config,
    /// Expecting a section header, a command or EOF.
    Top,
    /// Inside a `ram` section, expecting RAM records up to EOS.
    Ram { id: u32 },
    /// After a `ram` section's EOS, expecting its footer (absent on machines ≤ 2.3).
    RamFooter { id: u32 },
    /// From the first non-RAM FULL section on: opaque until the input ends.
    Device,
    /// After EOF: expecting the JSON description or the end.
    AfterEof,
    /// After the JSON description: nothing may follow.
    Done,
}

/// The current record in owned form; ranges index the record's raw bytes.
#[derive(Debug)]
enum Rec {
    Header {
        version: u32,
    },
    Configuration {
        machine: Range<usize>,
        subsections: Vec<ConfigSubsection>,
    },
    Command {
        cmd: u16,
        data: Range<usize>,
    },
    Section {
        kind: SectionKind,
        id: u32,
        ident: Option<(Range<usize>, u32, u32)>,
    },
    Footer {
        id: u32,
    },
    MemSize {
        total: u64,
    },
    Zero {
        block: usize,
        offset: u64,
        continued: bool,
        fill: u8,
    },
    Page {
        block: usize,
        offset: u64,
        continued: bool,
        data: Range<usize>,
    },
    Eos,
    DeviceState,
    Eof,
    VmDesc {
        json: Range<usize>,
    },
}

#[derive(Debug)]
struct Current {
    /// Index of the record's first byte in `Decoder::buf`.
    start: usize,
    len: usize,
    rec: Rec,
}

/// A decoded record with its position and the exact bytes it came from.
#[derive(Debug, Clone, Copy)]
pub struct Item<'a> {
    /// Offset of the record's first byte in the stream.
    pub offset: u64,
    /// The record's bytes, exactly as received.
    pub raw: &'a [u8],
    pub record: Record<'a>,
}

/// Byte and record counts, by kind.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct StreamStats {
    /// All bytes decoded.
    pub total_bytes: u64,
    /// `PAGE` records, and their bytes including header and block name.
    pub pages: u64,
    pub page_bytes: u64,
    /// `ZERO` records and their bytes.
    pub zero_pages: u64,
    pub zero_bytes: u64,
    /// `ram` section headers seen (START + PART + END).
    pub ram_sections: u64,
    /// Opaque device-state bytes (from the first FULL section to the end).
    pub device_bytes: u64,
    /// Everything else: header, configuration, section headers and footers, commands,
    /// `MEM_SIZE`, `EOS`, EOF, JSON description.
    pub other_bytes: u64,
}

/// How the stream ended, as found by [`Decoder::finish`].
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Trailer {
    /// Stream offset of the EOF byte (0x00), if found.
    pub eof_offset: Option<u64>,
    /// The JSON device description, if QEMU sent one (it does for precopy on machines ≥ 2.4).
    pub vmdesc: Option<Vec<u8>>,
    /// Stream range of the opaque device state, EOF and description included.
    pub device_state: Option<Range<u64>>,
}

/// Why a parse attempt stopped.
enum Halt {
    /// The record is not complete in the buffer yet.
    More,
    Bad(ErrorKind),
}

impl From<ErrorKind> for Halt {
    fn from(kind: ErrorKind) -> Halt {
        Halt::Bad(kind)
    }
}

type Parse<T> = Result<T, Halt>;

fn malformed(msg: impl Into<String>) -> Halt {
    Halt::Bad(ErrorKind::Malformed(msg.into()))
}

fn capability(what: &'static str, capability: &'static str) -> Halt {
    Halt::Bad(ErrorKind::Capability { what, capability })
}

/// Big-endian reader over the bytes of one record.
struct Cursor<'b> {
    b: &'b [u8],
    p: usize,
}

impl<'b> Cursor<'b> {
    fn new(b: &'b [u8]) -> Self {
        Cursor { b, p: 0 }
    }

    fn take(&mut self, n: usize) -> Parse<Range<usize>> {
        if self.b.len() - self.p < n {
            return Err(Halt::More);
        }
        let r = self.p..self.p + n;
        self.p += n;
        Ok(r)
    }

    fn array<const N: usize>(&mut self) -> Parse<[u8; N]> {
        let r = self.take(N)?;
        let mut a = [0u8; N];
        a.copy_from_slice(&self.b[r]);
        Ok(a)
    }

    fn peek(&self) -> Parse<u8> {
        self.b.get(self.p).copied().ok_or(Halt::More)
    }

    fn u8(&mut self) -> Parse<u8> {
        Ok(self.array::<1>()?[0])
    }

    fn be16(&mut self) -> Parse<u16> {
        Ok(u16::from_be_bytes(self.array()?))
    }

    fn be32(&mut self) -> Parse<u32> {
        Ok(u32::from_be_bytes(self.array()?))
    }

    fn be64(&mut self) -> Parse<u64> {
        Ok(u64::from_be_bytes(self.array()?))
    }

    /// A u8 length and that many bytes of UTF-8 (QEMU's idstr names are ASCII).
    fn name8(&mut self, what: &str) -> Parse<Range<usize>> {
        let len = self.u8()? as usize;
        let r = self.take(len)?;
        self.text(r, what)
    }

    fn text(&self, r: Range<usize>, what: &str) -> Parse<Range<usize>> {
        match std::str::from_utf8(&self.b[r.clone()]) {
            Ok(_) => Ok(r),
            Err(_) => Err(malformed(format!("{what} is not UTF-8"))),
        }
    }

    fn str(&self, r: &Range<usize>) -> &'b str {
        std::str::from_utf8(&self.b[r.clone()]).unwrap_or_default()
    }

    fn pos(&self) -> usize {
        self.p
    }
}

/// What a successful step produced.
enum Step {
    /// A record of `len` bytes.
    Record(usize, Rec),
    /// A state change that consumed nothing.
    Moved,
}

/// The incremental stream decoder. See the module documentation.
#[derive(Debug, Default)]
pub struct Decoder {
    buf: Vec<u8>,
    /// First byte of `buf` not yet consumed (the current record starts here).
    pos: usize,
    /// Stream offset of `buf[0]`.
    base: u64,
    current: Option<Current>,
    state: State,
    input_done: bool,
    failed: bool,
    blocks: Vec<RamBlock>,
    /// Block of the last ZERO/PAGE record, for `CONTINUE`.
    last_block: Option<usize>,
    /// Iterative sections by id (only `ram` is accepted).
    sections: Vec<(u32, String)>,
    /// The section being decoded, for error context.
    section: Option<(u32, String)>,
    ignore_shared: bool,
    machine: Option<String>,
    /// The last bytes of device state, to find EOF and the description at the end.
    device_tail: Vec<u8>,
    device_start: Option<u64>,
    eof_offset: Option<u64>,
    vmdesc: Option<Vec<u8>>,
    stats: StreamStats,
}

impl Decoder {
    pub fn new() -> Decoder {
        Decoder::default()
    }

    /// Appends input. Ends the current record.
    pub fn feed(&mut self, data: &[u8]) {
        self.release();
        self.buf.extend_from_slice(data);
    }

    /// Reads once from `r` (at most `max` bytes) straight into the buffer; returns the count,
    /// 0 at end of input. Ends the current record.
    pub fn read_from<R: Read + ?Sized>(&mut self, r: &mut R, max: usize) -> std::io::Result<usize> {
        self.release();
        let old = self.buf.len();
        self.buf.resize(old + max.max(1), 0);
        let res = loop {
            match r.read(&mut self.buf[old..]) {
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                res => break res,
            }
        };
        let n = *res.as_ref().unwrap_or(&0);
        self.buf.truncate(old + n);
        res
    }

    /// Decodes the next record if the buffer holds all of it. `Ok(false)`: feed more (or,
    /// after [`finish`](Self::finish), the stream is over).
    pub fn advance(&mut self) -> Result<bool, StreamError> {
        if self.failed {
            return Err(self.error(ErrorKind::Poisoned));
        }
        if let Some(cur) = self.current.take() {
            self.pos = cur.start + cur.len;
        }
        let buf = std::mem::take(&mut self.buf);
        let res = loop {
            match self.step(&buf[self.pos..]) {
                Ok(Step::Moved) => continue,
                Ok(Step::Record(len, rec)) => {
                    self.count(&rec, &buf[self.pos..self.pos + len]);
                    self.current = Some(Current {
                        start: self.pos,
                        len,
                        rec,
                    });
                    break Ok(true);
                }
                Err(Halt::More) => break Ok(false),
                Err(Halt::Bad(kind)) => {
                    self.failed = true;
                    break Err(self.error(kind));
                }
            }
        };
        self.buf = buf;
        res
    }

    /// The current record (after `advance` returned `true`).
    pub fn item(&self) -> Option<Item<'_>> {
        let cur = self.current.as_ref()?;
        let raw = &self.buf[cur.start..cur.start + cur.len];
        let c = Cursor::new(raw);
        let page = |block: usize, offset, continued| PageAddr {
            block,
            block_name: self.blocks.get(block).map_or("", |b| b.name.as_str()),
            offset,
            continued,
        };
        let record = match &cur.rec {
            Rec::Header { version } => Record::Header { version: *version },
            Rec::Configuration {
                machine,
                subsections,
            } => Record::Configuration {
                machine: c.str(machine),
                subsections,
            },
            Rec::Command { cmd, data } => Record::Command {
                cmd: *cmd,
                data: &raw[data.clone()],
            },
            Rec::Section { kind, id, ident } => Record::Section(SectionHeader {
                kind: *kind,
                id: *id,
                ident: ident
                    .as_ref()
                    .map(|(name, instance, version)| SectionIdent {
                        name: c.str(name),
                        instance: *instance,
                        version: *version,
                    }),
            }),
            Rec::Footer { id } => Record::Footer { section_id: *id },
            Rec::MemSize { total } => Record::Ram(RamRecord::MemSize {
                total: *total,
                blocks: &self.blocks,
            }),
            Rec::Zero {
                block,
                offset,
                continued,
                fill,
            } => Record::Ram(RamRecord::Zero {
                page: page(*block, *offset, *continued),
                fill: *fill,
            }),
            Rec::Page {
                block,
                offset,
                continued,
                data,
            } => Record::Ram(RamRecord::Page {
                page: page(*block, *offset, *continued),
                data: &raw[data.clone()],
            }),
            Rec::Eos => Record::Ram(RamRecord::Eos),
            Rec::DeviceState => Record::DeviceState(raw),
            Rec::Eof => Record::Eof,
            Rec::VmDesc { json } => Record::VmDesc {
                json: &raw[json.clone()],
            },
        };
        Some(Item {
            offset: self.base + cur.start as u64,
            raw,
            record,
        })
    }

    /// `advance` + `item`.
    pub fn next_item(&mut self) -> Result<Option<Item<'_>>, StreamError> {
        Ok(if self.advance()? { self.item() } else { None })
    }

    /// Declares the end of input (call after `advance` returned `false`) and checks that the
    /// stream is complete: it must end after EOF (and the JSON description, if sent).
    pub fn finish(&mut self) -> Result<Trailer, StreamError> {
        if self.failed {
            return Err(self.error(ErrorKind::Poisoned));
        }
        self.release();
        self.input_done = true;
        let left = self.buf.len() - self.pos;
        let expected = match self.state {
            State::Header if left == 0 && self.base == 0 => "the QEVM header (empty stream)",
            State::Header => "the rest of the QEVM header",
            State::Config | State::Top => "a section, a command or EOF",
            State::Ram { .. } => "a RAM record (the section has no EOS yet)",
            State::RamFooter { .. } => "a section footer, a section or EOF",
            State::AfterEof | State::Done if left == 0 => return Ok(self.trailer()),
            State::AfterEof => "the rest of the JSON device description",
            State::Done => "nothing (trailing bytes)",
            State::Device => return self.device_trailer(),
        };
        self.failed = true;
        Err(self.error(ErrorKind::Truncated(format!(
            "expected {expected}, have {left} byte(s) of it"
        ))))
    }

    /// RAM blocks announced by `MEM_SIZE` (empty before it).
    pub fn blocks(&self) -> &[RamBlock] {
        &self.blocks
    }

    /// The machine type from the configuration section.
    pub fn machine(&self) -> Option<&str> {
        self.machine.as_deref()
    }

    pub fn stats(&self) -> &StreamStats {
        &self.stats
    }

    /// Stream offset of the next byte not yet decoded.
    pub fn offset(&self) -> u64 {
        match &self.current {
            Some(cur) => self.base + (cur.start + cur.len) as u64,
            None => self.base + self.pos as u64,
        }
    }

    /// True once the decoder is passing device state through (RAM is complete).
    pub fn in_device_state(&self) -> bool {
        self.state == State::Device
    }

    /// Drops the current record and the consumed front of the buffer.
    fn release(&mut self) {
        if let Some(cur) = self.current.take() {
            self.pos = cur.start + cur.len;
        }
        if self.pos > 0 {
            self.buf.drain(..self.pos);
            self.base += self.pos as u64;
            self.pos = 0;
        }
    }

    fn error(&self, kind: ErrorKind) -> StreamError {
        StreamError::new(
            Context {
                offset: self.base + self.pos as u64,
                section: self.section.clone(),
            },
            kind,
        )
    }

    fn trailer(&self) -> Trailer {
        Trailer {
            eof_offset: self.eof_offset,
            vmdesc: self.vmdesc.clone(),
            device_state: None,
        }
    }

    /// Finds `0x00 0x06 be32(len) json` ending exactly at the end of the device state. The
    /// JSON contains no NUL byte, so the last candidate is the only possible one. QEMU 7.2
    /// sends the description in precopy unless the machine type is older than 2.3
    /// (`suppress-vmdesc`); pct requires it, as it is the only sign that the opaque device
    /// state was not cut short.
    fn device_trailer(&mut self) -> Result<Trailer, StreamError> {
        let start = self.device_start.unwrap_or(0);
        let end = self.base + self.pos as u64;
        let t = &self.device_tail;
        let tail_base = end - t.len() as u64;
        let found = (0..t.len().saturating_sub(5)).rev().find(|&p| {
            t[p] == section_type::EOF
                && t[p + 1] == section_type::VMDESCRIPTION
                && u32::from_be_bytes([t[p + 2], t[p + 3], t[p + 4], t[p + 5]]) as usize
                    == t.len() - p - 6
        });
        match found {
            Some(p) if serde_json::from_slice::<serde::de::IgnoredAny>(&t[p + 6..]).is_ok() => {
                Ok(Trailer {
                    eof_offset: Some(tail_base + p as u64),
                    vmdesc: Some(t[p + 6..].to_vec()),
                    device_state: Some(start..end),
                })
            }
            _ => {
                self.failed = true;
                Err(self.error(ErrorKind::Truncated(
                    "device state does not end with EOF and the JSON device description".into(),
                )))
            }
        }
    }

    fn count(&mut self, rec: &Rec, raw: &[u8]) {
        let n = raw.len() as u64;
        let s = &mut self.stats;
        s.total_bytes += n;
        match rec {
            Rec::Page { .. } => {
                s.pages += 1;
                s.page_bytes += n;
            }
            Rec::Zero { .. } => {
                s.zero_pages += 1;
                s.zero_bytes += n;
            }
            Rec::DeviceState => {
                s.device_bytes += n;
                self.device_tail.extend_from_slice(raw);
                if self.device_tail.len() > 2 * (MAX_VMDESC + 6) {
                    let cut = self.device_tail.len() - (MAX_VMDESC + 6);
                    self.device_tail.drain(..cut);
                }
            }
            Rec::Section { kind, .. } => {
                if !matches!(kind, SectionKind::Full) {
                    s.ram_sections += 1;
                }
                s.other_bytes += n;
            }
            Rec::VmDesc { json } => {
                self.vmdesc = Some(raw[json.clone()].to_vec());
                s.other_bytes += n;
            }
            _ => s.other_bytes += n,
        }
    }

    /// Parses one record from the front of `b` and, only if it is complete and valid,
    /// updates the decoder's state.
    fn step(&mut self, b: &[u8]) -> Parse<Step> {
        let mut c = Cursor::new(b);
        let rec = match self.state {
            State::Header => {
                let magic = c.be32()?;
                if magic != QEVM_MAGIC {
                    return Err(ErrorKind::BadMagic(magic).into());
                }
                let version = c.be32()?;
                if version != QEVM_VERSION {
                    return Err(ErrorKind::BadVersion(version).into());
                }
                self.state = State::Config;
                Rec::Header { version }
            }
            State::Config => {
                if c.peek()? != section_type::CONFIGURATION {
                    self.state = State::Top;
                    return Ok(Step::Moved);
                }
                let rec = self.configuration(&mut c)?;
                self.state = State::Top;
                rec
            }
            State::Top => self.top(&mut c)?,
            State::Ram { id } => self.ram(&mut c, id)?,
            State::RamFooter { id } => {
                if c.peek()? != section_type::FOOTER {
                    self.state = State::Top;
                    self.section = None;
                    return Ok(Step::Moved);
                }
                c.u8()?;
                let got = c.be32()?;
                if got != id {
                    return Err(malformed(format!(
                        "footer names section {got}, expected {id}"
                    )));
                }
                self.state = State::Top;
                self.section = None;
                Rec::Footer { id }
            }
            State::Device => {
                if b.is_empty() {
                    return Err(Halt::More);
                }
                c.take(b.len())?;
                Rec::DeviceState
            }
            State::AfterEof => {
                let t = c.u8()?;
                if t != section_type::VMDESCRIPTION {
                    return Err(malformed(format!(
                        "byte {t:#04x} after EOF; expected the JSON description (0x06)"
                    )));
                }
                let len = c.be32()?;
                if len as usize > MAX_VMDESC {
                    return Err(ErrorKind::TooLong {
                        what: "JSON device description",
                        len: len.into(),
                        max: MAX_VMDESC as u64,
                    }
                    .into());
                }
                let json = c.take(len as usize)?;
                self.state = State::Done;
                Rec::VmDesc { json }
            }
            State::Done => {
                c.peek()?;
                return Err(malformed("bytes after the JSON device description"));
            }
        };
        Ok(Step::Record(c.pos(), rec))
    }

    /// 0x07, be32 length, machine name, then `configuration/*` subsections.
    fn configuration(&mut self, c: &mut Cursor<'_>) -> Parse<Rec> {
        c.u8()?;
        let len = c.be32()?;
        if len as usize > MAX_MACHINE_NAME {
            return Err(ErrorKind::TooLong {
                what: "machine name",
                len: len.into(),
                max: MAX_MACHINE_NAME as u64,
            }
            .into());
        }
        let machine = c.take(len as usize)?;
        let machine = c.text(machine, "machine name")?;
        let mut subsections = Vec::new();
        // Subsections follow while the next byte is 0x05: the end of input here means
        // "don't know yet", as the stream cannot end after the configuration.
        while c.peek()? == section_type::SUBSECTION {
            if subsections.len() >= MAX_CONFIG_SUBSECTIONS {
                return Err(malformed("too many configuration subsections"));
            }
            c.u8()?;
            let name = c.name8("configuration subsection name")?;
            let version = c.be32()?;
            let sub = match c.str(&name) {
                ConfigSubsection::TARGET_PAGE_BITS => {
                    let bits = c.be32()?;
                    if bits != PAGE_SIZE.trailing_zeros() {
                        return Err(ErrorKind::Unsupported(format!(
                            "target page bits {bits} (pct handles 4 KiB pages)"
                        ))
                        .into());
                    }
                    ConfigSubsection::TargetPageBits { version, bits }
                }
                ConfigSubsection::CAPABILITIES => {
                    let count = c.be32()?;
                    if count > MAX_CONFIG_CAPABILITIES {
                        return Err(malformed(format!("{count} capabilities")));
                    }
                    let mut names = Vec::new();
                    for _ in 0..count {
                        let n = c.name8("capability name")?;
                        names.push(c.str(&n).to_owned());
                    }
                    ConfigSubsection::Capabilities { version, names }
                }
                ConfigSubsection::UUID => ConfigSubsection::Uuid {
                    version,
                    uuid: c.array()?,
                },
                other => {
                    return Err(ErrorKind::Unsupported(format!(
                        "configuration subsection `{other}`"
                    ))
                    .into())
                }
            };
            subsections.push(sub);
        }
        // Commit.
        self.ignore_shared = subsections.iter().any(|s| {
            matches!(s, ConfigSubsection::Capabilities { names, .. }
                if names.iter().any(|n| n == "x-ignore-shared"))
        });
        self.machine = Some(c.str(&machine).to_owned());
        Ok(Rec::Configuration {
            machine,
            subsections,
        })
    }

    /// A top-level item: section header, command or EOF.
    fn top(&mut self, c: &mut Cursor<'_>) -> Parse<Rec> {
        let offset = self.base + self.pos as u64;
        let t = c.u8()?;
        let kind = match t {
            section_type::START => SectionKind::Start,
            section_type::PART => SectionKind::Part,
            section_type::END => SectionKind::End,
            section_type::FULL => SectionKind::Full,
            section_type::COMMAND => return self.command(c),
            section_type::EOF => {
                self.eof_offset = Some(offset);
                self.state = State::AfterEof;
                return Ok(Rec::Eof);
            }
            section_type::CONFIGURATION => {
                return Err(malformed("configuration section after the first section"))
            }
            section_type::FOOTER => return Err(malformed("section footer outside a section")),
            section_type::VMDESCRIPTION => {
                return Err(malformed("JSON device description before EOF"))
            }
            other => return Err(malformed(format!("unknown section type {other:#04x}"))),
        };
        let id = c.be32()?;
        if !kind.has_ident() {
            let Some((_, name)) = self.sections.iter().find(|(sid, _)| *sid == id) else {
                return Err(malformed(format!(
                    "{kind:?} of section {id}, which was never started"
                )));
            };
            self.section = Some((id, name.clone()));
            self.state = State::Ram { id };
            return Ok(Rec::Section {
                kind,
                id,
                ident: None,
            });
        }
        let name = c.name8("section name")?;
        let instance = c.be32()?;
        let version = c.be32()?;
        let name_str = c.str(&name);
        match (kind, name_str) {
            (SectionKind::Start, RAM_SECTION) => {
                if version != RAM_SECTION_VERSION {
                    return Err(ErrorKind::Unsupported(format!(
                        "`ram` section version {version} (QEMU 7.2 writes {RAM_SECTION_VERSION})"
                    ))
                    .into());
                }
                if self.sections.iter().any(|(sid, _)| *sid == id) {
                    return Err(malformed(format!("section {id} started twice")));
                }
                self.sections.push((id, RAM_SECTION.to_owned()));
                self.section = Some((id, RAM_SECTION.to_owned()));
                self.state = State::Ram { id };
            }
            (SectionKind::Start, "block") => {
                return Err(capability("block migration section", "block"))
            }
            (SectionKind::Start, "dirty-bitmap") => {
                return Err(capability(
                    "dirty bitmap migration section",
                    "dirty-bitmaps",
                ))
            }
            (SectionKind::Start, other) => {
                return Err(ErrorKind::Unsupported(format!(
                    "iterative device section `{other}` (only `ram` is understood; \
                     VFIO and other iterative devices cannot be migrated through pct)"
                ))
                .into())
            }
            (_, RAM_SECTION) => return Err(malformed("`ram` sent as a FULL section")),
            _ => {
                self.section = Some((id, name_str.to_owned()));
                self.device_start = Some(offset);
                self.state = State::Device;
            }
        }
        Ok(Rec::Section {
            kind,
            id,
            ident: Some((name, instance, version)),
        })
    }

    /// 0x08, be16 command, be16 length, arguments.
    fn command(&mut self, c: &mut Cursor<'_>) -> Parse<Rec> {
        let cmd = c.be16()?;
        let len = c.be16()?;
        let data = c.take(len.into())?;
        match cmd {
            command::OPEN_RETURN_PATH | command::PING | command::SWITCHOVER_START => {}
            command::POSTCOPY_ADVISE
            | command::POSTCOPY_LISTEN
            | command::POSTCOPY_RUN
            | command::POSTCOPY_RAM_DISCARD
            | command::PACKAGED
            | command::POSTCOPY_RESUME
            | command::RECV_BITMAP => return Err(capability("postcopy command", "postcopy-ram")),
            command::ENABLE_COLO => return Err(capability("COLO command", "x-colo")),
            other => return Err(malformed(format!("unknown command {other}"))),
        }
        Ok(Rec::Command { cmd, data })
    }

    /// One record of a `ram` section.
    fn ram(&mut self, c: &mut Cursor<'_>, id: u32) -> Parse<Rec> {
        let word = c.be64()?;
        let flags = word & RAM_FLAGS_MASK;
        let addr = word & !RAM_FLAGS_MASK;
        if flags & ram_flag::XBZRLE != 0 {
            return Err(capability("XBZRLE-encoded page", "xbzrle"));
        }
        if flags & ram_flag::COMPRESS_PAGE != 0 {
            return Err(capability("compressed page", "compress"));
        }
        if flags & ram_flag::MULTIFD_FLUSH != 0 {
            return Err(capability("multifd flush", "multifd"));
        }
        if flags & ram_flag::HOOK != 0 {
            return Err(ErrorKind::Unsupported("RDMA hook record (rdma: transport)".into()).into());
        }
        let continued = flags & ram_flag::CONTINUE != 0;
        match flags & !ram_flag::CONTINUE {
            ram_flag::MEM_SIZE if !continued => self.mem_size(c, addr),
            f @ (ram_flag::ZERO | ram_flag::PAGE) => {
                let block = if continued {
                    self.last_block
                        .ok_or_else(|| malformed("CONTINUE page with no previous RAM block"))?
                } else {
                    let name = c.name8("RAM block name")?;
                    let name = c.str(&name);
                    self.blocks
                        .iter()
                        .position(|b| b.name == name)
                        .ok_or_else(|| {
                            malformed(format!("page for RAM block `{name}`, not in MEM_SIZE"))
                        })?
                };
                let used = self.blocks.get(block).map_or(0, |b| b.used_length);
                if addr
                    .checked_add(PAGE_SIZE as u64)
                    .is_none_or(|end| end > used)
                {
                    return Err(malformed(format!(
                        "page offset {addr:#x} outside RAM block {block} ({used:#x} bytes)"
                    )));
                }
                let rec = if f == ram_flag::ZERO {
                    Rec::Zero {
                        block,
                        offset: addr,
                        continued,
                        fill: c.u8()?,
                    }
                } else {
                    Rec::Page {
                        block,
                        offset: addr,
                        continued,
                        data: c.take(PAGE_SIZE)?,
                    }
                };
                self.last_block = Some(block);
                Ok(rec)
            }
            ram_flag::EOS if !continued && addr == 0 => {
                self.state = State::RamFooter { id };
                Ok(Rec::Eos)
            }
            _ => Err(malformed(format!("RAM record with flags {flags:#x}"))),
        }
    }

    /// `MEM_SIZE`: total bytes, then per block: u8 length + name, be64 used length
    /// (+ be64 guest address with `x-ignore-shared`), until the lengths add up to the total.
    fn mem_size(&mut self, c: &mut Cursor<'_>, total: u64) -> Parse<Rec> {
        if !self.blocks.is_empty() {
            return Err(malformed("second MEM_SIZE record"));
        }
        let mut blocks: Vec<RamBlock> = Vec::new();
        let mut left = total;
        while left > 0 {
            if blocks.len() >= MAX_RAM_BLOCKS {
                return Err(malformed(format!("more than {MAX_RAM_BLOCKS} RAM blocks")));
            }
            let name = c.name8("RAM block name")?;
            let name = c.str(&name).to_owned();
            let used_length = c.be64()?;
            let shared_addr = if self.ignore_shared {
                Some(c.be64()?)
            } else {
                None
            };
            if used_length == 0 || used_length > left || used_length % PAGE_SIZE as u64 != 0 {
                return Err(malformed(format!(
                    "RAM block `{name}` of {used_length:#x} bytes (total left {left:#x})"
                )));
            }
            if blocks.iter().any(|b| b.name == name) {
                return Err(malformed(format!("RAM block `{name}` listed twice")));
            }
            left -= used_length;
            blocks.push(RamBlock {
                name,
                used_length,
                shared_addr,
            });
        }
        self.blocks = blocks;
        Ok(Rec::MemSize { total })
    }
}

/// A pull parser over a blocking reader (a file, a pipe, a unix socket).
pub struct StreamReader<R> {
    inner: R,
    dec: Decoder,
    chunk: usize,
    ended: bool,
    trailer: Option<Trailer>,
}

impl<R: Read> StreamReader<R> {
    pub fn new(inner: R) -> Self {
        StreamReader {
            inner,
            dec: Decoder::new(),
            chunk: READ_CHUNK,
            ended: false,
            trailer: None,
        }
    }

    /// Sets how many bytes one `read` asks for.
    pub fn with_chunk(mut self, chunk: usize) -> Self {
        self.chunk = chunk.max(1);
        self
    }

    /// The next record, `None` at the end of a complete stream.
    pub fn next_item(&mut self) -> Result<Option<Item<'_>>, StreamError> {
        loop {
            if self.dec.advance()? {
                return Ok(self.dec.item());
            }
            if self.ended {
                return Ok(None);
            }
            let n = self
                .dec
                .read_from(&mut self.inner, self.chunk)
                .map_err(|e| self.dec.error(ErrorKind::Io(e)))?;
            if n == 0 {
                self.ended = true;
                self.trailer = Some(self.dec.finish()?);
            }
        }
    }

    /// How the stream ended (after `next_item` returned `None`).
    pub fn trailer(&self) -> Option<&Trailer> {
        self.trailer.as_ref()
    }

    pub fn decoder(&self) -> &Decoder {
        &self.dec
    }

    pub fn into_inner(self) -> R {
        self.inner
    }
}
