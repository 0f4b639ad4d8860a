//! Fuzz the QEMU stream decoder and pct's wire frames. The first byte picks the target and,
//! for the stream, the chunk size the input is fed in. Every input must give records or an
//! error, never a panic or a hang; every record the stream decoder accepts must re-encode to
//! exactly the bytes it came from.
//!
//!   cargo +nightly fuzz run stream_decoder
#![no_main]

use libfuzzer_sys::fuzz_target;
use pct::migrate::stream::{encode_record, Decoder};
use pct::migrate::wire::{Frame, Payload, MAX_PAYLOAD};

fn stream(chunk: usize, data: &[u8]) {
    let mut dec = Decoder::new();
    for piece in data.chunks(chunk) {
        dec.feed(piece);
        loop {
            match dec.next_item() {
                Ok(Some(item)) => {
                    let mut again = Vec::new();
                    encode_record(&item.record, &mut again).expect("re-encode accepted record");
                    assert_eq!(again, item.raw);
                }
                Ok(None) => break,
                Err(_) => return,
            }
        }
    }
    let _ = dec.finish();
}

fn frames(mut data: &[u8]) {
    while !data.is_empty() {
        match Frame::decode(data, MAX_PAYLOAD) {
            Ok(Some((frame, used))) => {
                if let Frame::Data(p) | Frame::FallbackData { data: p, .. } = &frame {
                    let _: Result<_, _> = Payload::decompress(p);
                }
                let mut again = Vec::new();
                frame.encode(&mut again).expect("re-encode accepted frame");
                data = &data[used..];
            }
            _ => return,
        }
    }
}

fuzz_target!(|input: &[u8]| {
    let Some((&sel, data)) = input.split_first() else {
        return;
    };
    if sel & 0x80 == 0 {
        stream(usize::from(sel % 64) * 67 + 1, data);
    } else {
        frames(data);
    }
});
