//! `pct-migrate inspect-stream`: reading a recorded stream (`--record-stream`) after the
//! fact: its figures, every record of chosen pages, its section headers, and each page's
//! last record compared with a raw RAM image (such as the stopped source's RAM file).
//!
//! Pages are named by a short hash of their bytes: the first 8 bytes of BLAKE3, the same
//! the bit-identical tests print for pages that differ.

use super::stream::{RamRecord, Record, StreamReader, StreamStats};
use crate::sanitize::sanitize;
use anyhow::{anyhow, Context, Result};
use std::fmt::Write as _;
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

const PAGE: u64 = 4096;

/// What to look for in the stream.
#[derive(Debug, Clone, Default)]
pub struct InspectOptions {
    /// List every record of these page frames (byte offset / 4096 in the RAM block).
    pub pages: Vec<u64>,
    /// RAM block of `pages` (default: the largest).
    pub block: Option<String>,
    /// List the section headers too.
    pub sections: bool,
    /// Keep each page's last record, for [`Inspection::compare`].
    pub last_records: bool,
}

/// What [`inspect`] found.
#[derive(Debug, Clone)]
pub struct Inspection {
    pub file: PathBuf,
    pub stats: StreamStats,
    pub ends_with_eof: bool,
    /// Section headers and records of the chosen pages, in stream order, as text.
    pub listing: Vec<String>,
    /// Per page of the block (with `last_records`): the short hash of its last record and
    /// that record's stream offset.
    last: Vec<Option<(u64, u64)>>,
}

/// How the block's final content in the stream compares with a RAM image.
#[derive(Debug, Clone)]
pub struct Comparison {
    pub ram: PathBuf,
    pub pages: usize,
    pub never_sent: u64,
    /// Pages whose last record differs from the image, with that record's stream offset.
    pub differ: Vec<(usize, u64)>,
}

/// The short page hash: the first 8 bytes of BLAKE3, big-endian.
pub fn short_hash(b: &[u8]) -> u64 {
    let h = blake3::hash(b);
    u64::from_be_bytes(h.as_bytes()[..8].try_into().unwrap_or_default())
}

/// Reads the stream record `file` through.
pub fn inspect(file: &Path, opts: &InspectOptions) -> Result<Inspection> {
    let f = File::open(file)
        .with_context(|| format!("opening the stream record {}", file.display()))?;
    let mut rd = StreamReader::new(std::io::BufReader::with_capacity(1 << 20, f));
    let mut block: Option<usize> = None;
    let mut listing: Vec<String> = Vec::new();
    let mut last: Vec<Option<(u64, u64)>> = Vec::new();
    while let Some(item) = rd.next_item().with_context(|| file.display().to_string())? {
        let (page, hash) = match item.record {
            Record::Section(h) => {
                if opts.sections {
                    let name = h.ident.map(|i| sanitize(i.name.as_bytes()));
                    listing.push(format!(
                        "section {:?} id {} at stream offset {}{}",
                        h.kind,
                        h.id,
                        item.offset,
                        name.map(|n| format!(" `{n}`")).unwrap_or_default()
                    ));
                }
                continue;
            }
            Record::Ram(RamRecord::MemSize { blocks, .. }) if block.is_none() => {
                let i = match &opts.block {
                    Some(n) => blocks
                        .iter()
                        .position(|b| &b.name == n)
                        .ok_or_else(|| anyhow!("the stream has no RAM block `{n}`"))?,
                    None => (0..blocks.len())
                        .max_by_key(|&i| blocks[i].used_length)
                        .ok_or_else(|| anyhow!("MEM_SIZE lists no RAM block"))?,
                };
                if opts.last_records {
                    last = vec![None; (blocks[i].used_length / PAGE) as usize];
                }
                block = Some(i);
                continue;
            }
            Record::Ram(RamRecord::Page { page, data }) if Some(page.block) == block => {
                let wanted = opts.pages.contains(&(page.offset / PAGE));
                let h = (wanted || !last.is_empty()).then(|| short_hash(data));
                (page, h.map(|h| (h, format!("PAGE {h:016x}"))))
            }
            Record::Ram(RamRecord::Zero { page, fill }) if Some(page.block) == block => {
                let h = short_hash(&[fill; PAGE as usize]);
                (page, Some((h, format!("ZERO fill {fill:#04x}"))))
            }
            _ => continue,
        };
        let pfn = page.offset / PAGE;
        let Some((h, what)) = hash else { continue };
        if opts.pages.contains(&pfn) {
            listing.push(format!(
                "pfn {pfn:>8}  stream offset {:>12}  {what}",
                item.offset
            ));
        }
        if let Some(slot) = last.get_mut(pfn as usize) {
            *slot = Some((h, item.offset));
        }
    }
    let ends_with_eof = rd.trailer().and_then(|t| t.eof_offset).is_some();
    Ok(Inspection {
        file: file.to_owned(),
        stats: rd.decoder().stats().clone(),
        ends_with_eof,
        listing,
        last,
    })
}

impl Inspection {
    /// The figures line, then the listing.
    pub fn to_text(&self) -> String {
        let st = &self.stats;
        let mut t = format!(
            "{}: {} bytes, {} PAGE records, {} ZERO records, {} ram section headers, {} bytes of device state{}\n",
            self.file.display(),
            st.total_bytes,
            st.pages,
            st.zero_pages,
            st.ram_sections,
            st.device_bytes,
            if self.ends_with_eof { ", ends with EOF" } else { ", no EOF" }
        );
        for l in &self.listing {
            let _ = writeln!(t, "{l}");
        }
        t
    }

    /// Compares each page's last record with the raw RAM image `ram` (needs
    /// [`InspectOptions::last_records`]).
    pub fn compare(&self, ram: &Path) -> Result<Comparison> {
        let f =
            File::open(ram).with_context(|| format!("opening the RAM image {}", ram.display()))?;
        let mut buf = vec![0u8; PAGE as usize];
        let (mut differ, mut never_sent) = (Vec::new(), 0u64);
        for (pfn, slot) in self.last.iter().enumerate() {
            f.read_exact_at(&mut buf, pfn as u64 * PAGE)
                .with_context(|| format!("reading page {pfn} of {}", ram.display()))?;
            match slot {
                None => never_sent += 1,
                Some((h, at)) if *h != short_hash(&buf) => differ.push((pfn, *at)),
                Some(_) => {}
            }
        }
        Ok(Comparison {
            ram: ram.to_owned(),
            pages: self.last.len(),
            never_sent,
            differ,
        })
    }
}

impl Comparison {
    /// The counts, then the first 20 pages that differ.
    pub fn to_text(&self) -> String {
        let mut t = format!(
            "against {}: {} pages, {} never sent, {} differ from their last record\n",
            self.ram.display(),
            self.pages,
            self.never_sent,
            self.differ.len()
        );
        for (pfn, at) in self.differ.iter().take(20) {
            let _ = writeln!(t, "  pfn {pfn:>8}: last sent at stream offset {at}");
        }
        t
    }
}
