//! A QEMU stream replayed through the real pct sender and receiver on loopback, without
//! QEMU: the stream is fed to the sender as QEMU would migrate into it, crosses the link
//! (TLS or plain TCP, as the two ends are configured), and what the receiver would give
//! the destination QEMU is read back, counted and, if asked, compared. Nothing else limits
//! the rate, so this measures pct's relay throughput (`pct-migrate bench-link`) and checks
//! that the relay is exact (tests/link_tls.rs). No guest, so no teleportation: the sender
//! forwards every page, as with `--no-teleport`.
//!
//! [`synthetic_stream`] builds a well-formed QEMU precopy stream of a given size for it,
//! when no recorded one (`--record-stream`) is at hand.

use super::link::{self, Security};
use super::receiver::{self, Closing, ReceiverOptions};
use super::sender::{self, Connections, Counters, SenderHooks, SenderOptions, StreamMap};
use super::stream::{
    encode_record, put_page, put_zero, RamBlock, RamRecord, Record, SectionHeader, SectionIdent,
    SectionKind, PAGE_SIZE,
};
use super::tls::TlsError;
use super::wire::WireStats;
use crate::disk::{Disk, DiskFormat};
use crate::qemu::Channel;
use anyhow::{anyhow, Context, Result};
use std::io::{Read, Write};
use std::net::Shutdown;
use std::os::unix::net::UnixStream;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// How the two ends of a replay are set up.
#[derive(Debug, Clone)]
pub struct ReplayOptions {
    /// The sender's and the receiver's link protection (the same kind on both ends for a
    /// migration to work).
    pub sender_security: Security,
    pub receiver_security: Security,
    /// The host the sender dials (the receiver listens on 127.0.0.1): with TLS, the name
    /// the receiver's certificate must have.
    pub host: String,
    pub sender: SenderOptions,
    pub receiver: ReceiverOptions,
    /// Compare what comes out with what went in (costs a hash of both).
    pub verify: bool,
}

/// What a replay did.
#[derive(Debug, Clone)]
pub struct Replayed {
    /// QEMU stream bytes fed, and given out by the receiver.
    pub stream_bytes: u64,
    pub out_bytes: u64,
    /// pct's frame bytes on the link (TLS's own overhead not counted).
    pub wire_bytes: u64,
    /// From the first stream byte fed to the receiver's `Complete` at the sender.
    pub elapsed: Duration,
    /// With `verify`: whether the output equals the input.
    pub identical: Option<bool>,
    /// What the TLS handshake said of the peers: the receiver's, then the sender's.
    pub peers: (Option<String>, Option<String>),
    /// Connections the receiver refused, in its words.
    pub refused: Vec<String>,
}

impl Replayed {
    /// QEMU stream megabytes (10^6 bytes) per second.
    pub fn mb_per_s(&self) -> f64 {
        self.stream_bytes as f64 / 1e6 / self.elapsed.as_secs_f64().max(1e-9)
    }
}

/// Feeds `stream` to `sock` in QEMU-sized writes, then closes its sending side.
fn feed(mut sock: UnixStream, stream: &[u8]) -> std::io::Result<()> {
    for chunk in stream.chunks(256 << 10) {
        sock.write_all(chunk)?;
    }
    sock.shutdown(Shutdown::Write)
}

/// Reads `sock` to its end: the byte count, and the hash if `verify`.
fn drain(mut sock: UnixStream, verify: bool) -> std::io::Result<(u64, Option<blake3::Hash>)> {
    let mut buf = vec![0u8; 1 << 20];
    let mut hasher = verify.then(blake3::Hasher::new);
    let mut n = 0u64;
    loop {
        match sock.read(&mut buf) {
            Ok(0) => break,
            Ok(k) => {
                n += k as u64;
                if let Some(h) = hasher.as_mut() {
                    h.update(&buf[..k]);
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok((n, hasher.map(|h| h.finalize())))
}

/// A one-page scratch disk image for the receiver (no reference ever reads it).
struct ScratchDisk(std::path::PathBuf);

impl ScratchDisk {
    fn new() -> Result<ScratchDisk> {
        use std::sync::atomic::{AtomicU64, Ordering};
        static N: AtomicU64 = AtomicU64::new(0);
        let p = std::env::temp_dir().join(format!(
            "pct-replay-{}-{}.img",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        std::fs::write(&p, vec![0u8; PAGE_SIZE]).with_context(|| format!("{}", p.display()))?;
        Ok(ScratchDisk(p))
    }
}

impl Drop for ScratchDisk {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// Replays `stream` through a pct sender and receiver connected on loopback.
pub fn replay(stream: Arc<Vec<u8>>, opts: &ReplayOptions) -> Result<Replayed> {
    let scratch = ScratchDisk::new()?;
    let disk = Disk::open(&scratch.0, DiskFormat::Raw)?;
    let listener = link::listen("127.0.0.1:0")?;
    let port = listener.local_addr()?.port();
    let (qemu_out, qemu_dst) = UnixStream::pair()?;
    let (qemu_src, qemu_in) = UnixStream::pair()?;
    std::thread::scope(|s| {
        let receiving = s.spawn(|| -> Result<(Option<String>, Vec<String>)> {
            let mut refused = Vec::new();
            let mut note = |e: &TlsError| refused.push(e.to_string());
            let got = link::accept_peer(
                &listener,
                &opts.receiver_security,
                Duration::from_secs(30),
                &mut note,
            );
            let mut got = got.map_err(|e| anyhow!("{e} (refused: {refused:?})"))?;
            let mut stats = WireStats::default();
            link::hello_as_receiver(&mut got.link, &mut stats, Duration::from_secs(30), |_| {
                Ok(())
            })?;
            let closing = Closing::new(&got.link)?;
            let (report, _) = receiver::receive(
                got.link,
                disk,
                Channel::Unix(qemu_out),
                &opts.receiver,
                stats,
            )?;
            closing.complete(&report)?;
            Ok((got.peer.map(|p| p.subject), refused))
        });
        let verify = opts.verify;
        let draining = s.spawn(move || drain(qemu_dst, verify));

        let sent = (|| -> Result<(Replayed, Option<blake3::Hash>)> {
            let to = format!("{}:{port}", opts.host);
            let (mut link, peer) = link::dial(&to, &opts.sender_security, Duration::from_secs(10))?;
            let mut stats = WireStats::default();
            let session =
                link::hello_as_sender(&mut link, "", &mut stats, Duration::from_secs(30))?;
            let fed = stream.clone();
            let want = verify.then(|| blake3::hash(&stream));
            let started = Instant::now();
            let feeder = std::thread::spawn(move || feed(qemu_in, &fed));
            let conn = Connections {
                qemu: Channel::Unix(qemu_src),
                link,
                session,
                wire_stats: stats,
            };
            let counters = Arc::new(Counters::default());
            let hooks = SenderHooks {
                map: |_: &[RamBlock]| -> Result<Option<StreamMap<'_>>, String> { Ok(None) },
                check: None,
                counters: counters.clone(),
            };
            sender::send(conn, &opts.sender, hooks)?;
            let elapsed = started.elapsed();
            feeder
                .join()
                .map_err(|_| anyhow!("the feeder panicked"))?
                .context("feeding the stream")?;
            let r = Replayed {
                stream_bytes: stream.len() as u64,
                out_bytes: 0,
                wire_bytes: counters
                    .wire_bytes
                    .load(std::sync::atomic::Ordering::Relaxed),
                elapsed,
                identical: None,
                peers: (peer.map(|p| p.subject), None),
                refused: Vec::new(),
            };
            Ok((r, want))
        })();
        let received = receiving
            .join()
            .map_err(|_| anyhow!("the receiver panicked"))?;
        let drained = draining
            .join()
            .map_err(|_| anyhow!("the output reader panicked"))?;
        let (mut r, want) = sent?;
        let (sender_peer, refused) = received?;
        let (out_bytes, got) = drained.context("reading the receiver's output")?;
        r.out_bytes = out_bytes;
        r.identical = want.map(|w| Some(w) == got && out_bytes == r.stream_bytes);
        r.peers.1 = sender_peer;
        r.refused = refused;
        Ok(r)
    })
}

/// What the pages of a [`synthetic_stream`] hold.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Content {
    /// Pseudo-random bytes: nothing to compress (the most work per stream byte for TLS).
    Random,
    /// A quarter each: random, text-like, half random and half zero, and sparse words in
    /// zeros; plus a zero page (a `ZERO` record) after every fourth.
    Mixed,
}

fn put(out: &mut Vec<u8>, rec: Record<'_>) -> Result<()> {
    encode_record(&rec, out).map_err(|e| anyhow!("encoding a synthetic stream: {e:?}"))
}

fn section(kind: SectionKind, ident: Option<SectionIdent<'_>>) -> Record<'_> {
    Record::Section(SectionHeader { kind, id: 2, ident })
}

/// A page of `content`, the `i`th of the stream.
fn page(content: Content, i: u64, next: &mut impl FnMut() -> u64, out: &mut [u8]) {
    let mut random = |out: &mut [u8]| {
        for c in out.chunks_mut(8) {
            c.copy_from_slice(&next().to_le_bytes()[..c.len()]);
        }
    };
    match (content, i % 4) {
        (Content::Random, _) | (Content::Mixed, 0) => random(out),
        (Content::Mixed, 1) => {
            const WORDS: [&[u8]; 8] = [
                b"the ",
                b"guest ",
                b"page ",
                b"cache ",
                b"migrates ",
                b"over ",
                b"a ",
                b"link ",
            ];
            let mut at = 0;
            while at < out.len() {
                let w = WORDS[(next() % 8) as usize];
                let n = w.len().min(out.len() - at);
                out[at..at + n].copy_from_slice(&w[..n]);
                at += n;
            }
        }
        (Content::Mixed, 2) => {
            out.fill(0);
            random(&mut out[..PAGE_SIZE / 2]);
        }
        _ => {
            out.fill(0);
            for c in out.chunks_mut(64) {
                c[..8].copy_from_slice(&(next() % 1000).to_le_bytes());
            }
        }
    }
}

/// A well-formed QEMU precopy stream (as QEMU 7.2 writes it for a `pc` machine) of about
/// `bytes` bytes: one RAM block, `PAGE` records of `content` over two passes, the
/// switchover's last pass, then device state.
pub fn synthetic_stream(bytes: u64, content: Content) -> Result<Vec<u8>> {
    let mut pages = bytes / (PAGE_SIZE as u64 + 8);
    if content == Content::Mixed {
        // One page in four is a ZERO record, of a few bytes.
        pages = pages * 4 / 3;
    }
    let pages = pages.max(4);
    // Two passes over the block: the second re-sends every fourth page.
    let block_pages = (pages * 4 / 5).max(1);
    let blocks = [RamBlock {
        name: "pc.ram".into(),
        used_length: block_pages * PAGE_SIZE as u64,
        shared_addr: None,
    }];
    let mut s = Vec::with_capacity(bytes as usize + (1 << 20));
    put(&mut s, Record::Header { version: 3 })?;
    put(
        &mut s,
        Record::Configuration {
            machine: "pc-i440fx-7.2",
            subsections: &[],
        },
    )?;
    let ident = SectionIdent {
        name: "ram",
        instance: 0,
        version: 4,
    };
    put(&mut s, section(SectionKind::Start, Some(ident)))?;
    put(
        &mut s,
        Record::Ram(RamRecord::MemSize {
            total: blocks[0].used_length,
            blocks: &blocks,
        }),
    )?;
    put(&mut s, Record::Ram(RamRecord::Eos))?;
    put(&mut s, Record::Footer { section_id: 2 })?;
    let mut next = xorshift(0x5eed);
    let mut data = vec![0u8; PAGE_SIZE];
    let mut sent = 0u64;
    let mut pass = 0u64;
    // Parts of 4096 pages, as QEMU's iterations come.
    while sent < pages {
        let last = sent + 4096 >= pages;
        let kind = if last {
            SectionKind::End
        } else {
            SectionKind::Part
        };
        put(&mut s, section(kind, None))?;
        let mut first = true;
        for _ in 0..4096.min(pages - sent) {
            let pfn = if pass == 0 {
                sent
            } else {
                (sent * 4) % block_pages
            };
            let block = first.then_some("pc.ram");
            first = false;
            let offset = pfn * PAGE_SIZE as u64;
            if content == Content::Mixed && sent % 4 == 3 {
                put_zero(&mut s, block, offset, 0).map_err(|e| anyhow!("{e:?}"))?;
            } else {
                page(content, sent, &mut next, &mut data);
                put_page(&mut s, block, offset, &data).map_err(|e| anyhow!("{e:?}"))?;
            }
            sent += 1;
            if sent == block_pages {
                pass = 1;
            }
        }
        put(&mut s, Record::Ram(RamRecord::Eos))?;
        put(&mut s, Record::Footer { section_id: 2 })?;
    }
    // Device state: a device section, EOF, the JSON description.
    let timer = SectionIdent {
        name: "timer",
        instance: 0,
        version: 1,
    };
    put(
        &mut s,
        Record::Section(SectionHeader {
            kind: SectionKind::Full,
            id: 0,
            ident: Some(timer),
        }),
    )?;
    s.extend_from_slice(&[0u8, 1, 2, 3, 4, 5, 6, 7]);
    put(&mut s, Record::Footer { section_id: 0 })?;
    put(&mut s, Record::Eof)?;
    put(
        &mut s,
        Record::VmDesc {
            json: br#"{"page_size": 4096, "devices": []}"#,
        },
    )?;
    Ok(s)
}

/// xorshift64* (a xorshift generator with a multiplying output step): a deterministic
/// stream of pseudo-random `u64`s, the same for the same `seed` on every run and machine
/// (the seed's lowest bit is forced to 1, so that 0 is a usable seed). For synthetic,
/// incompressible test data: the synthetic pages here, test bytes elsewhere in the crate
/// and in its integration tests. Not for cryptography, nor for anything that must not be
/// predicted.
pub fn xorshift(seed: u64) -> impl FnMut() -> u64 {
    let mut x = seed | 1;
    move || {
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        x.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::migrate::stream::Decoder;

    #[test]
    fn synthetic_streams_decode() {
        for content in [Content::Random, Content::Mixed] {
            let s = synthetic_stream(3 << 20, content).expect("stream");
            assert!(s.len() > 3_000_000 && s.len() < 3_300_000, "{}", s.len());
            let mut d = Decoder::new();
            d.feed(&s);
            while d.advance().expect("decodes") {}
            d.finish().expect("complete");
            assert_eq!(d.blocks().len(), 1);
        }
    }
}
