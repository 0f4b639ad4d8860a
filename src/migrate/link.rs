//! The link between the pct sender and the pct receiver: connection set-up, socket
//! options that keep the link's buffering small (see [`super::flow`]), TLS or not
//! ([`Security`], [`super::tls`]), and the hello exchange that opens every session.

use super::tls::{self, Identity, TlsEnd, TlsError};
use super::wire::{read_frame, write_frame, Frame, Hello, Role, Session, WireError, WireStats};
use std::io::{self, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream, ToSocketAddrs};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Kernel send buffer asked for on the sender's socket (Linux doubles it). Small, so that
/// the bytes QEMU hands over are bytes the WAN has (almost) taken: 128 KiB is 40 ms at
/// 50 Mbit/s.
pub const SEND_BUFFER: usize = 128 << 10;

#[derive(Debug, thiserror::Error)]
pub enum LinkError {
    #[error("cannot resolve {addr}: {cause}")]
    Resolve { addr: String, cause: io::Error },
    #[error("cannot connect to {addr}: {cause}")]
    Connect { addr: String, cause: io::Error },
    #[error("cannot listen on {addr}: {cause}")]
    Listen { addr: String, cause: io::Error },
    #[error("no pct sender connected to {addr} within {timeout:?}")]
    AcceptTimeout { addr: String, timeout: Duration },
    #[error("socket: {0}")]
    Io(#[from] io::Error),
    #[error("hello exchange: {0}")]
    Hello(#[from] WireError),
    #[error("peer closed the connection during the hello exchange")]
    HelloClosed,
    #[error("expected a hello, got a {0} frame")]
    NotHello(&'static str),
    #[error("{0}")]
    Tls(#[from] TlsError),
    /// The TLS session under the link failed (the pump's words).
    #[error("{0}")]
    TlsLink(String),
    #[error("the peer speaks TLS: start this end with --tls-dir too")]
    PeerSpeaksTls,
    /// The receiver answered our hello with the reason it will not take this migration
    /// (sanitized: it comes from the network).
    #[error("the receiver refused this migration: {0}")]
    RefusedByReceiver(String),
    /// We refused the sender's hello (told the sender why, too).
    #[error("refused: {0}")]
    Refused(String),
}

/// How the link is protected.
#[derive(Debug, Clone)]
pub enum Security {
    /// TLS 1.3, both ends authenticated by certificates of one CA ([`super::tls`]).
    Tls(Arc<Identity>),
    /// Plain TCP (`--insecure-plaintext`): the guest's memory crosses the link as it is.
    Plaintext,
}

/// How long a TLS handshake may take.
pub const TLS_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(15);

/// The link to the peer pct, as the sender's and receiver's threads use it: the TCP socket
/// itself, or the plaintext end of the TLS pump ([`TlsEnd`]). Each thread takes its own
/// handle ([`LinkStream::try_clone`]).
#[derive(Debug)]
pub enum LinkStream {
    Plain(TcpStream),
    Tls(TlsEnd),
}

impl LinkStream {
    pub fn try_clone(&self) -> io::Result<LinkStream> {
        match self {
            LinkStream::Plain(s) => s.try_clone().map(LinkStream::Plain),
            LinkStream::Tls(s) => s.try_clone().map(LinkStream::Tls),
        }
    }

    pub fn shutdown(&self, how: Shutdown) -> io::Result<()> {
        match self {
            LinkStream::Plain(s) => s.shutdown(how),
            LinkStream::Tls(s) => s.shutdown(how),
        }
    }

    pub fn set_read_timeout(&self, t: Option<Duration>) -> io::Result<()> {
        match self {
            LinkStream::Plain(s) => s.set_read_timeout(t),
            LinkStream::Tls(s) => s.set_read_timeout(t),
        }
    }

    pub fn set_write_timeout(&self, t: Option<Duration>) -> io::Result<()> {
        match self {
            LinkStream::Plain(s) => s.set_write_timeout(t),
            LinkStream::Tls(s) => s.set_write_timeout(t),
        }
    }

    /// Bytes written to the link that have not reached the peer: the TCP send queue's
    /// unacknowledged bytes, plus with TLS what waits for encryption.
    pub fn unacked_bytes(&self) -> io::Result<u64> {
        match self {
            LinkStream::Plain(s) => unacked_bytes(s),
            LinkStream::Tls(s) => Ok(unacked_bytes(s.tcp())? + s.unencrypted_bytes()),
        }
    }

    /// Shuts the link down for writing and waits, at most `timeout`, until what was
    /// written has gone out (with TLS, through the pump: see [`TlsEnd::wait_sent`]); for
    /// the last frames of a process. True if it has.
    pub fn finish_sending(&self, timeout: Duration) -> bool {
        let _ = self.shutdown(Shutdown::Write);
        match self {
            LinkStream::Plain(_) => true,
            LinkStream::Tls(s) => s.wait_sent(timeout),
        }
    }

    /// Why the TLS session under the link failed, if it did: the cause behind an end of
    /// input or a broken pipe here.
    pub fn tls_failure(&self) -> Option<String> {
        match self {
            LinkStream::Plain(_) => None,
            LinkStream::Tls(s) => s.failure(),
        }
    }
}

impl Read for LinkStream {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            LinkStream::Plain(s) => s.read(buf),
            LinkStream::Tls(s) => s.read(buf),
        }
    }
}

impl Write for LinkStream {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self {
            LinkStream::Plain(s) => s.write(buf),
            LinkStream::Tls(s) => s.write(buf),
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        match self {
            LinkStream::Plain(s) => s.flush(),
            LinkStream::Tls(s) => s.flush(),
        }
    }
}

impl AsFd for LinkStream {
    fn as_fd(&self) -> BorrowedFd<'_> {
        match self {
            LinkStream::Plain(s) => s.as_fd(),
            LinkStream::Tls(s) => s.as_fd(),
        }
    }
}

/// The host part of `HOST:PORT` (`[V6]:PORT` too): the name the receiver's certificate
/// must have.
pub fn host_of(addr: &str) -> &str {
    let host = addr.rsplit_once(':').map_or(addr, |(h, _)| h);
    host.strip_prefix('[')
        .and_then(|h| h.strip_suffix(']'))
        .unwrap_or(host)
}

/// Connects to the receiver at `to` (retrying until `timeout`, as [`connect`]) and, with
/// TLS, runs the handshake: the receiver's certificate must chain to our CA and name the
/// host in `to`. Returns the link and, with TLS, who the receiver is.
pub fn dial(
    to: &str,
    security: &Security,
    timeout: Duration,
) -> Result<(LinkStream, Option<tls::Peer>), LinkError> {
    let tcp = connect(to, timeout)?;
    match security {
        Security::Plaintext => Ok((LinkStream::Plain(tcp), None)),
        Security::Tls(id) => {
            let (end, peer) = tls::connect(tcp, host_of(to), id, TLS_HANDSHAKE_TIMEOUT)?;
            Ok((LinkStream::Tls(end), Some(peer)))
        }
    }
}

/// A sender, accepted.
#[derive(Debug)]
pub struct Accepted {
    pub link: LinkStream,
    /// Where it connected from.
    pub addr: SocketAddr,
    /// With TLS: who it is.
    pub peer: Option<tls::Peer>,
}

/// Accepts a sender within `timeout`. With TLS, a connection whose handshake fails (a
/// certificate not of our CA, say) is refused, `refused` is told who and why, and the wait
/// goes on for a sender that passes.
pub fn accept_peer(
    l: &TcpListener,
    security: &Security,
    timeout: Duration,
    refused: &mut dyn FnMut(&TlsError),
) -> Result<Accepted, LinkError> {
    let start = Instant::now();
    loop {
        let left = timeout.saturating_sub(start.elapsed());
        let tcp = accept(l, left).map_err(|e| match e {
            LinkError::AcceptTimeout { addr, .. } => LinkError::AcceptTimeout { addr, timeout },
            e => e,
        })?;
        // A peer gone already (a port scan, say) is no sender.
        let Ok(addr) = tcp.peer_addr() else {
            continue;
        };
        match security {
            Security::Plaintext => {
                return Ok(Accepted {
                    link: LinkStream::Plain(tcp),
                    addr,
                    peer: None,
                })
            }
            Security::Tls(id) => match tls::accept(tcp, addr, id, TLS_HANDSHAKE_TIMEOUT) {
                Ok((end, peer)) => {
                    return Ok(Accepted {
                        link: LinkStream::Tls(end),
                        addr,
                        peer: Some(peer),
                    })
                }
                Err(e @ TlsError::Refused { .. }) => refused(&e),
                Err(e) => return Err(e.into()),
            },
        }
    }
}

fn set_sndbuf(s: &TcpStream, bytes: usize) -> io::Result<()> {
    rustix::net::sockopt::set_socket_send_buffer_size(s, bytes).map_err(io::Error::from)
}

/// Bytes in `tcp`'s send queue that the peer has not acknowledged yet (`SIOCOUTQ`): what
/// the link still owes, on top of pct's own queue.
pub fn unacked_bytes(tcp: &TcpStream) -> io::Result<u64> {
    let mut n: libc::c_int = 0;
    // SAFETY: TIOCOUTQ (SIOCOUTQ on a TCP socket) stores one c_int through its pointer
    // argument, which points at `n`, alive for the call; the descriptor is `tcp`'s own,
    // open while `tcp` is borrowed.
    let r = unsafe { libc::ioctl(tcp.as_raw_fd(), libc::TIOCOUTQ, &mut n) };
    if r != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(u64::try_from(n).unwrap_or(0))
}

/// Connects to the receiver, retrying until `timeout` (it may still be starting).
pub fn connect(addr: &str, timeout: Duration) -> Result<TcpStream, LinkError> {
    let addrs: Vec<SocketAddr> = addr
        .to_socket_addrs()
        .map_err(|cause| LinkError::Resolve {
            addr: addr.to_owned(),
            cause,
        })?
        .collect();
    let start = Instant::now();
    loop {
        let mut last = io::Error::new(io::ErrorKind::NotFound, "no address");
        for a in &addrs {
            match TcpStream::connect_timeout(a, Duration::from_secs(5)) {
                Ok(s) => {
                    s.set_nodelay(true)?;
                    set_sndbuf(&s, SEND_BUFFER)?;
                    return Ok(s);
                }
                Err(e) => last = e,
            }
        }
        if start.elapsed() >= timeout {
            return Err(LinkError::Connect {
                addr: addr.to_owned(),
                cause: last,
            });
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// Binds the receiver's listening socket.
pub fn listen(addr: &str) -> Result<TcpListener, LinkError> {
    TcpListener::bind(addr).map_err(|cause| LinkError::Listen {
        addr: addr.to_owned(),
        cause,
    })
}

/// Accepts one sender within `timeout`.
pub fn accept(l: &TcpListener, timeout: Duration) -> Result<TcpStream, LinkError> {
    let addr = l
        .local_addr()
        .map(|a| a.to_string())
        .unwrap_or_else(|_| "?".into());
    l.set_nonblocking(true)?;
    let start = Instant::now();
    let s = loop {
        match l.accept() {
            Ok((s, _)) => break s,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                if start.elapsed() >= timeout {
                    return Err(LinkError::AcceptTimeout { addr, timeout });
                }
                std::thread::sleep(Duration::from_millis(50));
            }
            Err(e) => return Err(e.into()),
        }
    };
    s.set_nonblocking(false)?;
    s.set_nodelay(true)?;
    Ok(s)
}

/// TLS record types a TLS peer starts with: a handshake (a client's hello) or an alert (a
/// server refusing what it got).
const TLS_RECORDS: [u8; 2] = [0x16, 0x15];

/// The sender's half of the hello exchange: sends our hello, naming `vm` (empty: a receiver
/// that serves one migration), then reads the receiver's answer: its hello, which settles
/// the session, or the reason it refuses. `stats` counts both.
pub fn hello_as_sender(
    s: &mut LinkStream,
    vm: &str,
    stats: &mut WireStats,
    timeout: Duration,
) -> Result<Session, LinkError> {
    let ours = Hello::for_vm(vm);
    let r = send_hello(s, &ours, stats)
        .and_then(|()| read_hello(s, stats, timeout))
        .and_then(|frame| peer_hello(&ours, frame))
        .map(|(session, _)| session);
    with_tls_cause(s, r)
}

/// The receiver's half: reads the sender's hello and lets `admit` judge it (the VM it names,
/// against who the sender is); then answers with our hello, which settles the session, or
/// with the reason `admit` gives, and fails with it. `stats` counts both.
pub fn hello_as_receiver<T>(
    s: &mut LinkStream,
    stats: &mut WireStats,
    timeout: Duration,
    admit: impl FnOnce(&Hello) -> Result<T, String>,
) -> Result<(Session, T), LinkError> {
    let ours = Hello::new(Role::Receiver);
    let frame = match read_hello(s, stats, timeout) {
        // Plain bytes back make the peer's TLS handshake fail saying so (a reset would not).
        Err(LinkError::PeerSpeaksTls) => {
            let _ = send_hello(s, &ours, stats);
            return Err(LinkError::PeerSpeaksTls);
        }
        r => r,
    };
    let r = frame.and_then(|frame| {
        // A hello that settles the session, then `admit`'s verdict on it.
        let judged = peer_hello(&ours, frame).and_then(|(session, peer)| {
            let t = admit(&peer).map_err(LinkError::Refused)?;
            Ok((session, t))
        });
        match judged {
            Ok(got) => {
                send_hello(s, &ours, stats)?;
                Ok(got)
            }
            // Told why, the sender can say so (a closed link would only say "closed").
            Err(e) => {
                let message = match &e {
                    LinkError::Refused(why) => why.clone(),
                    e => e.to_string(),
                };
                let f = Frame::Error { code: 1, message };
                if let Ok(n) = write_frame(s, &f) {
                    stats.count(&f, n);
                }
                Err(e)
            }
        }
    });
    with_tls_cause(s, r)
}

/// Under TLS, a closed or broken link has its cause in the TLS session.
fn with_tls_cause<T>(s: &LinkStream, r: Result<T, LinkError>) -> Result<T, LinkError> {
    match (r, s.tls_failure()) {
        (
            Err(LinkError::HelloClosed | LinkError::Io(_) | LinkError::Hello(WireError::Io(_))),
            Some(why),
        ) => Err(LinkError::TlsLink(why)),
        (r, _) => r,
    }
}

fn send_hello(s: &mut LinkStream, ours: &Hello, stats: &mut WireStats) -> Result<(), LinkError> {
    let f = Frame::Hello(ours.clone());
    let n = write_frame(s, &f)?;
    stats.count(&f, n);
    Ok(())
}

/// The peer's first frame, within `timeout`.
fn read_hello(
    s: &mut LinkStream,
    stats: &mut WireStats,
    timeout: Duration,
) -> Result<Frame, LinkError> {
    s.set_read_timeout(Some(timeout))?;
    if let LinkStream::Plain(tcp) = s {
        // A TLS handshake where a hello should be: the peer was given --tls-dir.
        let mut first = [0u8];
        if tcp.peek(&mut first)? == 1 && TLS_RECORDS.contains(&first[0]) {
            return Err(LinkError::PeerSpeaksTls);
        }
    }
    let got = read_frame(s, super::wire::MAX_PAYLOAD)?;
    s.set_read_timeout(None)?;
    let (frame, n) = got.ok_or(LinkError::HelloClosed)?;
    stats.count(&frame, n);
    Ok(frame)
}

/// What the peer's first frame means for the session, given `ours`: its hello settles the
/// session parameters (returned with the hello, for the receiver to judge the VM it names);
/// an error frame or any other frame refuses the session. The part of the hello exchange
/// that judges untrusted bytes, without a socket (fuzz/receiver_wire).
pub fn peer_hello(ours: &Hello, frame: Frame) -> Result<(Session, Hello), LinkError> {
    match frame {
        Frame::Hello(peer) => Ok((ours.negotiate(&peer)?, peer)),
        Frame::Error { message, .. } => Err(LinkError::RefusedByReceiver(
            crate::sanitize::sanitize(message.as_bytes()),
        )),
        other => Err(LinkError::NotHello(other.name())),
    }
}
