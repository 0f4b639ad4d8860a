//! Fuzz what a pct receiver reads from its (untrusted) sender: the hello that opens the
//! session, then frames, through the code the receiver runs on them.
//!
//! Input: one selector byte, then the bytes of the TCP connection. The selector's low six
//! bits pick how many bytes each `read` hands over (1 to 2332, so that short reads split
//! headers and payloads); its top bit skips the hello (frames only, as after a handshake).
//!
//! - the hello: `read_frame` with the receiver's payload bound, then `link::peer_hello`
//!   (the decision `link::handshake` takes on the peer's first frame: negotiate, refuse);
//! - each frame: `read_frame` as the receiver's reader thread calls it, which must agree
//!   with the buffered `Frame::decode` on the same bytes; an accepted frame must encode
//!   back to exactly the bytes it came from;
//! - what the restorer and the emitter do with it, as far as it is pure: data and fallback
//!   payloads decompressed (to their announced, bounded length), the rebuilt stream probed
//!   for RAM block names, reference runs checked against pages (all zero, as an unreadable
//!   disk gives) and written back as `PAGE` records, page hashes and the `End` counts
//!   checked. The restorer's choice of frames and the fallback exchange run in threads on
//!   sockets (`receiver::receive`) and are mirrored here, not called.
//!
//! Every input must give frames or an error, never a panic, a hang or an allocation beyond
//! a frame's bound.
//!
//!   cargo +nightly fuzz run receiver_wire -- -max_total_time=600 -rss_limit_mb=2048
#![no_main]

use libfuzzer_sys::fuzz_target;
use pct::migrate::link::peer_hello;
use pct::migrate::stream::Decoder;
use pct::migrate::wire::{read_frame, Frame, Hello, PageRefs, Role, MAX_PAYLOAD, PAGE_SIZE};
use std::io::Read;

/// Runs of more pages than this are checked against a short read (every page then counts
/// as unreadable), not against a full zeroed run, to keep executions fast.
const FULL_RUN_PAGES: usize = 256;

/// The connection: `chunk` bytes per read at most.
struct Peer<'a> {
    wire: &'a [u8],
    pos: usize,
    chunk: usize,
}

impl Read for Peer<'_> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = buf.len().min(self.chunk).min(self.wire.len() - self.pos);
        buf[..n].copy_from_slice(&self.wire[self.pos..self.pos + n]);
        self.pos += n;
        Ok(n)
    }
}

/// The next frame off the connection, checked against the buffered decoder.
fn next_frame(peer: &mut Peer<'_>) -> Option<Frame> {
    let start = peer.pos;
    let read = read_frame(peer, MAX_PAYLOAD);
    let buffered = Frame::decode(&peer.wire[start..], MAX_PAYLOAD);
    match read {
        Ok(Some((frame, n))) => {
            assert_eq!(
                n,
                peer.pos - start,
                "read_frame's length is what it consumed"
            );
            match buffered {
                Ok(Some((f, m))) => assert_eq!((&f, m), (&frame, n), "decoders disagree"),
                other => panic!("read_frame got a {}, Frame::decode {other:?}", frame.name()),
            }
            let mut again = Vec::new();
            let m = frame
                .encode(&mut again)
                .expect("re-encode an accepted frame");
            assert_eq!(m, n);
            assert_eq!(
                again,
                &peer.wire[start..start + n],
                "{} round trip",
                frame.name()
            );
            Some(frame)
        }
        Ok(None) => {
            assert_eq!(start, peer.wire.len(), "clean end only between frames");
            None
        }
        Err(_) => {
            assert!(
                !matches!(buffered, Ok(Some(_))),
                "Frame::decode accepts what read_frame refuses"
            );
            None
        }
    }
}

/// What the receiver's restorer and emitter track, as far as it is pure.
#[derive(Default)]
struct Receiver {
    probe: Option<Decoder>,
    names: Vec<String>,
    stream_bytes: u64,
    runs: u64,
    out: Vec<u8>,
}

impl Receiver {
    /// Stream bytes given to QEMU: counted, and probed for the RAM block names.
    fn emit(&mut self, bytes: &[u8]) -> Result<(), ()> {
        self.stream_bytes += bytes.len() as u64;
        if let Some(p) = self.probe.as_mut() {
            p.feed(bytes);
            while p.advance().map_err(drop)? {
                if !p.blocks().is_empty() {
                    self.names = p.blocks().iter().map(|b| b.name.clone()).collect();
                    self.probe = None;
                    break;
                }
            }
        }
        Ok(())
    }

    fn run(&mut self, refs: &PageRefs) -> Result<(), ()> {
        let n = refs.pages.len();
        let data = vec![
            0u8;
            if n <= FULL_RUN_PAGES {
                n * PAGE_SIZE
            } else {
                PAGE_SIZE
            }
        ];
        let views: Vec<&[u8]> = data.chunks(PAGE_SIZE).collect();
        let bad = refs.verify(&views);
        assert!(bad.iter().all(|&i| i < n), "bad page index out of the run");
        if n > FULL_RUN_PAGES {
            assert_eq!(bad.len(), n, "a short read fails every page");
            return Ok(());
        }
        let name = match (refs.first_named, self.names.get(refs.block as usize)) {
            (false, _) => "",
            (true, Some(n)) => n.as_str(),
            (true, None) => return Err(()),
        };
        let mut out = std::mem::take(&mut self.out);
        out.clear();
        refs.emit_records(name, &views, &mut out).map_err(drop)?;
        assert!(out.len() >= n * PAGE_SIZE);
        let r = self.emit(&out);
        self.out = out;
        self.runs += 1;
        r
    }

    /// One frame from the sender; `Err` where the receiver gives up.
    fn frame(&mut self, frame: Frame) -> Result<(), ()> {
        match frame {
            Frame::Data(p) => {
                let b = p.decompress().map_err(drop)?;
                assert_eq!(b.len(), p.raw_len as usize);
                self.emit(&b)
            }
            Frame::PageRefs(refs) => self.run(&refs),
            Frame::FallbackData { count, data, .. } => {
                let d = data.decompress().map_err(drop)?;
                assert_eq!(d.len(), count as usize * PAGE_SIZE, "fallback length");
                Ok(())
            }
            Frame::PageHashes {
                count,
                hash_len,
                hashes,
                ..
            } => {
                assert_eq!(hashes.len(), count as usize * usize::from(hash_len));
                Ok(())
            }
            Frame::End { stream_bytes, runs } => {
                // The receiver checks the counts, then stops reading.
                let _ = (stream_bytes, runs) == (self.stream_bytes, self.runs);
                Err(())
            }
            // Unexpected from a sender: the restorer gives up.
            _ => Err(()),
        }
    }
}

fuzz_target!(|input: &[u8]| {
    let Some((&sel, wire)) = input.split_first() else {
        return;
    };
    let mut peer = Peer {
        wire,
        pos: 0,
        chunk: usize::from(sel & 0x3f) * 37 + 1,
    };
    if sel & 0x80 == 0 {
        let Some(first) = next_frame(&mut peer) else {
            return;
        };
        if peer_hello(&Hello::new(Role::Receiver), first).is_err() {
            return;
        }
    }
    let mut rx = Receiver {
        probe: Some(Decoder::new()),
        ..Receiver::default()
    };
    while let Some(frame) = next_frame(&mut peer) {
        if rx.frame(frame).is_err() {
            return;
        }
    }
});
