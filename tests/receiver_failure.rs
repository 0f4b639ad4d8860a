//! A receiver that fails mid-session tells its sender why, in one `Error` frame, and names
//! the same cause itself (not the end of input that its own clean-up causes). Through the
//! real destination side ([`destination::receive`], a manager-driven destination QEMU
//! played by a socket that swallows the stream), plaintext and TLS; the sender is played by
//! hand so that it can break the protocol and count the frames it gets back. No QEMU.

use pct::disk::DiskFormat;
use pct::migrate::destination::{self, DestinationOptions, DestinationQemu, Notice};
use pct::migrate::link::{self, Security};
use pct::migrate::receiver::ReceiverOptions;
use pct::migrate::tls::certs::{keygen, HostSpec};
use pct::migrate::tls::Identity;
use pct::migrate::wire::{read_frame, write_frame, Frame, WireStats, MAX_PAYLOAD};
use std::io::Read;
use std::net::TcpListener;
use std::sync::{mpsc, Arc};
use std::time::Duration;

/// Runs a session whose sender ends the stream with counts that do not match what it sent
/// (nothing); returns the `Error` messages the sender got and the receiver's own error.
fn failed_session(receiver: Security, sender: Security) -> (Vec<String>, String) {
    let tmp = tempfile::tempdir().expect("tmp");
    let disk = tmp.path().join("disk.img");
    std::fs::write(&disk, vec![0u8; 1 << 20]).expect("disk");
    // The destination QEMU: takes whatever comes until the receiver closes.
    let qemu = TcpListener::bind("127.0.0.1:0").expect("bind");
    let qemu_addr = qemu.local_addr().expect("addr").to_string();
    let swallowing = std::thread::spawn(move || {
        let (mut c, _) = qemu.accept().expect("the receiver connects to QEMU");
        let _ = c.read_to_end(&mut Vec::new());
    });
    let opts = DestinationOptions {
        listen: "127.0.0.1:0".into(),
        security: receiver,
        qemu: DestinationQemu::Incoming(qemu_addr),
        disk,
        disk_format: DiskFormat::Raw,
        accept_timeout: Duration::from_secs(30),
        receiver: ReceiverOptions::default(),
    };
    let (tx, rx) = mpsc::channel();
    let receiving = std::thread::spawn(move || {
        destination::receive(&opts, &|n| {
            if let Notice::Listening(a) = n {
                let _ = tx.send(a);
            }
        })
        .map(|_| ())
    });
    let to = rx.recv().expect("the receiver listens").to_string();
    let (mut l, _) = link::dial(&to, &sender, Duration::from_secs(10)).expect("dial");
    let mut stats = WireStats::default();
    link::hello_as_sender(&mut l, "", &mut stats, Duration::from_secs(10)).expect("hello");
    let end = Frame::End {
        stream_bytes: 5,
        runs: 0,
    };
    write_frame(&mut l, &end).expect("end");
    let mut errors = Vec::new();
    while let Some((f, _)) = read_frame(&mut l, MAX_PAYLOAD).expect("the receiver's frames") {
        match f {
            Frame::Error { message, .. } => errors.push(message),
            f => panic!("unexpected {} frame from a failing receiver", f.name()),
        }
    }
    let local = receiving
        .join()
        .expect("receiver thread")
        .expect_err("the receiver reported success");
    swallowing.join().expect("QEMU thread");
    (errors, format!("{local:#}"))
}

fn assert_told_once((errors, local): (Vec<String>, String)) {
    const CAUSE: &str = "receiver: protocol error: the sender sent 5 stream bytes in 0 runs";
    assert_eq!(errors.len(), 1, "Error frames: {errors:?}");
    assert!(
        errors[0].starts_with(CAUSE),
        "the sender was told: {errors:?}"
    );
    assert!(local.starts_with(CAUSE), "the receiver said: {local}");
}

#[test]
fn plaintext_sender_is_told_once() {
    assert_told_once(failed_session(Security::Plaintext, Security::Plaintext));
}

#[test]
fn tls_sender_is_told_once() {
    let tmp = tempfile::tempdir().expect("tmp");
    let hosts: Vec<HostSpec> = ["127.0.0.1", "src-host"]
        .iter()
        .map(|n| n.parse().expect("host"))
        .collect();
    let dirs = keygen(tmp.path(), &hosts).expect("keygen").hosts;
    let tls = |d| Security::Tls(Arc::new(Identity::load(d).expect("TLS directory")));
    assert_told_once(failed_session(tls(&dirs[0]), tls(&dirs[1])));
}
