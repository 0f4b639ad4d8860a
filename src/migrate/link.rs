//! The TCP link between the pct sender and the pct receiver: connection set-up, socket
//! options that keep the link's buffering small (see [`super::flow`]), and the hello
//! exchange that opens every session.

use super::wire::{read_frame, write_frame, Frame, Hello, Role, Session, WireError, WireStats};
use std::io;
use std::net::{SocketAddr, TcpListener, TcpStream, ToSocketAddrs};
use std::os::fd::AsRawFd;
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

/// Sends our hello, reads the peer's, and settles the session. `stats` counts both.
pub fn handshake(
    s: &mut TcpStream,
    role: Role,
    stats: &mut WireStats,
    timeout: Duration,
) -> Result<Session, LinkError> {
    let ours = Hello::new(role);
    let f = Frame::Hello(ours.clone());
    let n = write_frame(s, &f)?;
    stats.count(&f, n);
    s.set_read_timeout(Some(timeout))?;
    let got = read_frame(s, super::wire::MAX_PAYLOAD)?;
    s.set_read_timeout(None)?;
    let (frame, n) = got.ok_or(LinkError::HelloClosed)?;
    stats.count(&frame, n);
    peer_hello(&ours, frame)
}

/// What the peer's first frame means for the session, given `ours`: its hello settles the
/// session parameters; an error frame or any other frame refuses the session. The part of
/// [`handshake`] that judges untrusted bytes, without a socket (fuzz/receiver_wire).
pub fn peer_hello(ours: &Hello, frame: Frame) -> Result<Session, LinkError> {
    match frame {
        Frame::Hello(peer) => Ok(ours.negotiate(&peer)?),
        Frame::Error { message, .. } => Err(LinkError::Hello(WireError::Mismatch(message))),
        other => Err(LinkError::NotHello(other.name())),
    }
}
