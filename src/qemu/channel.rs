//! QEMU's migration channel, whichever socket carries it: a Unix socket when pct drives
//! QEMU itself (`migrate unix:…`), TCP when a VM manager does (`migrate tcp:…` to pct's
//! proxy, or pct connecting to a destination QEMU's `-incoming tcp:…`).

use std::io::{self, Read, Write};
use std::net::{Shutdown, TcpStream};
use std::os::unix::net::UnixStream;

/// One end of a migration channel to or from QEMU.
#[derive(Debug)]
pub enum Channel {
    Unix(UnixStream),
    Tcp(TcpStream),
}

impl Channel {
    /// A second handle on the same socket (for another thread).
    pub fn try_clone(&self) -> io::Result<Channel> {
        match self {
            Channel::Unix(s) => s.try_clone().map(Channel::Unix),
            Channel::Tcp(s) => s.try_clone().map(Channel::Tcp),
        }
    }

    pub fn set_read_timeout(&self, t: Option<std::time::Duration>) -> io::Result<()> {
        match self {
            Channel::Unix(s) => s.set_read_timeout(t),
            Channel::Tcp(s) => s.set_read_timeout(t),
        }
    }

    pub fn shutdown(&self, how: Shutdown) -> io::Result<()> {
        match self {
            Channel::Unix(s) => s.shutdown(how),
            Channel::Tcp(s) => s.shutdown(how),
        }
    }
}

impl From<UnixStream> for Channel {
    fn from(s: UnixStream) -> Channel {
        Channel::Unix(s)
    }
}

impl From<TcpStream> for Channel {
    fn from(s: TcpStream) -> Channel {
        Channel::Tcp(s)
    }
}

impl Read for Channel {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            Channel::Unix(s) => s.read(buf),
            Channel::Tcp(s) => s.read(buf),
        }
    }
}

impl Write for Channel {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self {
            Channel::Unix(s) => s.write(buf),
            Channel::Tcp(s) => s.write(buf),
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        match self {
            Channel::Unix(s) => s.flush(),
            Channel::Tcp(s) => s.flush(),
        }
    }
}

impl std::os::fd::AsFd for Channel {
    fn as_fd(&self) -> std::os::fd::BorrowedFd<'_> {
        match self {
            Channel::Unix(s) => s.as_fd(),
            Channel::Tcp(s) => s.as_fd(),
        }
    }
}
