//! A QEMU process seen from the host alone, for when a VM manager (libvirt, and through it
//! OpenStack Nova or KubeVirt) owns QEMU's only monitor and pct must not talk to it:
//!
//! - which process is at the other end of a TCP connection ([`tcp_peer_pid`], from
//!   `/proc/net/tcp{,6}` and the processes' file descriptors);
//! - where in that process a RAM block of a given size is mapped ([`ram_mapping`], from
//!   `/proc/PID/maps`);
//! - whether it runs its guest under KVM ([`uses_kvm`]: a `/dev/kvm` or `kvm-vm`
//!   descriptor) and which QEMU it is ([`version`]: its executable's `--version`).
//!
//! Everything here reads `/proc`; nothing disturbs QEMU or its manager.

use std::fs;
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::process::Command;

/// What could not be found out about a QEMU process.
#[derive(Debug, thiserror::Error)]
pub enum ProcessError {
    #[error("reading {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{0}")]
    NotFound(String),
}

fn read(path: impl Into<PathBuf>) -> Result<String, ProcessError> {
    let path = path.into();
    fs::read_to_string(&path).map_err(|source| ProcessError::Io { path, source })
}

/// How `/proc/net/tcp{,6}` prints an address: the IP's bytes as native-endian 32-bit words
/// in hex, then the port in hex. An IPv4 address is also looked for as its IPv4-mapped IPv6
/// form (a dual-stack socket).
fn proc_net_forms(a: SocketAddr) -> Vec<String> {
    let words = |bytes: &[u8]| -> String {
        bytes
            .chunks(4)
            .map(|c| format!("{:08X}", u32::from_ne_bytes([c[0], c[1], c[2], c[3]])))
            .collect()
    };
    let port = a.port();
    match a.ip() {
        IpAddr::V4(v4) => vec![
            format!("{}:{port:04X}", words(&v4.octets())),
            format!("{}:{port:04X}", words(&v4.to_ipv6_mapped().octets())),
        ],
        IpAddr::V6(v6) => {
            let mut forms = vec![format!("{}:{port:04X}", words(&v6.octets()))];
            if let Some(v4) = v6.to_ipv4_mapped() {
                forms.push(format!("{}:{port:04X}", words(&v4.octets())));
            }
            forms
        }
    }
}

/// The inode of the socket whose local end is `local` and remote end is `remote`, from
/// `/proc/net/tcp` and `/proc/net/tcp6` (of pct's own network namespace). When no socket
/// has both, the one socket whose local end is `local`: a connection redirected to pct by
/// netfilter (`REDIRECT`, `DNAT`) still names its original destination as its remote end.
fn tcp_socket_inode(local: SocketAddr, remote: SocketAddr) -> Result<Option<u64>, ProcessError> {
    let (locals, remotes) = (proc_net_forms(local), proc_net_forms(remote));
    let (mut exact, mut by_local) = (None, Vec::new());
    for table in ["/proc/net/tcp", "/proc/net/tcp6"] {
        let text = match fs::read_to_string(table) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
            Err(source) => {
                return Err(ProcessError::Io {
                    path: table.into(),
                    source,
                })
            }
        };
        for line in text.lines().skip(1) {
            let f: Vec<&str> = line.split_whitespace().collect();
            let Some(inode) = f.get(9).and_then(|i| i.parse::<u64>().ok()) else {
                continue;
            };
            if inode == 0 || !locals.iter().any(|l| l == f[1]) {
                continue;
            }
            if remotes.iter().any(|r| r == f[2]) {
                exact = Some(inode);
            }
            by_local.push(inode);
        }
    }
    Ok(exact.or(match by_local[..] {
        [only] => Some(only),
        _ => None,
    }))
}

/// The process holding the other end of a TCP connection that pct accepted: `ours` is
/// pct's end (the listening address it was reached on), `peer` the address it came from.
/// Works when the peer runs on this host, in pct's network namespace (QEMU migrating to
/// `tcp:127.0.0.1:PORT`, as a VM manager is told to).
pub fn tcp_peer_pid(ours: SocketAddr, peer: SocketAddr) -> Result<u32, ProcessError> {
    let inode = tcp_socket_inode(peer, ours)?.ok_or_else(|| {
        ProcessError::NotFound(format!(
            "no socket from {peer} to {ours} in /proc/net/tcp: the connection does not come \
             from a process of this host's network namespace (name the QEMU with --pid)"
        ))
    })?;
    let want = format!("socket:[{inode}]");
    let procs = fs::read_dir("/proc").map_err(|source| ProcessError::Io {
        path: "/proc".into(),
        source,
    })?;
    for entry in procs.flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|s| s.parse::<u32>().ok())
        else {
            continue;
        };
        let Ok(fds) = fs::read_dir(entry.path().join("fd")) else {
            continue;
        };
        for fd in fds.flatten() {
            if fs::read_link(fd.path()).is_ok_and(|t| t.as_os_str() == want.as_str()) {
                return Ok(pid);
            }
        }
    }
    Err(ProcessError::NotFound(format!(
        "no process holds {want}, the socket from {peer}: it exited, or pct may not read \
         other processes' descriptors (run it as root)"
    )))
}

/// One line of `/proc/PID/maps`.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Mapping {
    start: u64,
    end: u64,
    perms: String,
    path: String,
}

fn parse_maps(text: &str) -> Vec<Mapping> {
    text.lines()
        .filter_map(|l| {
            let mut f = l.split_whitespace();
            let (range, perms) = (f.next()?, f.next()?);
            let (s, e) = range.split_once('-')?;
            let path = f.nth(3).unwrap_or("").to_owned();
            Some(Mapping {
                start: u64::from_str_radix(s, 16).ok()?,
                end: u64::from_str_radix(e, 16).ok()?,
                perms: perms.to_owned(),
                path,
            })
        })
        .collect()
}

/// Whether a mapping can hold guest RAM: read-write, not executable (TCG's code buffer is
/// `rwx`), anonymous, a memfd or a file (a memory backend), never the heap or a stack.
fn may_hold_ram(m: &Mapping) -> bool {
    m.perms.starts_with("rw") && !m.perms.contains('x') && !m.path.starts_with('[')
}

/// Where the RAM block of `len` bytes is mapped in the process `pid`: the one read-write
/// mapping exactly `len` bytes long (QEMU maps a block in one piece, with a guard page
/// after it), else the one span of adjacent ones (something split it) that long. Errors when there
/// is none or more than one: pct never guesses which memory is the guest's.
pub fn ram_mapping(pid: u32, len: u64) -> Result<u64, ProcessError> {
    let maps = parse_maps(&read(format!("/proc/{pid}/maps"))?);
    let found = spans_of_len(&maps, len);
    match found[..] {
        [base] => Ok(base),
        [] => Err(ProcessError::NotFound(format!(
            "process {pid} maps no read-write memory of exactly {len} bytes (the RAM block's \
             size in its migration stream): is it the QEMU being migrated?"
        ))),
        _ => Err(ProcessError::NotFound(format!(
            "process {pid} maps {} read-write areas of exactly {len} bytes: cannot tell which \
             is the guest's RAM",
            found.len()
        ))),
    }
}

/// The starts of the RAM-capable mappings exactly `len` bytes long; if there is none, of
/// the spans of adjacent ones (of one file, or anonymous) that long. Adjacent mappings are
/// joined only then: the kernel keeps them apart for a reason (other flags), and a block
/// QEMU mapped in one piece is one mapping unless something split it since.
fn spans_of_len(maps: &[Mapping], len: u64) -> Vec<u64> {
    let ram = || maps.iter().filter(|m| may_hold_ram(m));
    let whole: Vec<u64> = ram()
        .filter(|m| m.end - m.start == len)
        .map(|m| m.start)
        .collect();
    if !whole.is_empty() {
        return whole;
    }
    let mut spans: Vec<(u64, u64, &str)> = Vec::new();
    for m in ram() {
        match spans.last_mut() {
            Some((_, end, path)) if *end == m.start && *path == m.path => *end = m.end,
            _ => spans.push((m.start, m.end, &m.path)),
        }
    }
    spans
        .iter()
        .filter(|(s, e, _)| e - s == len)
        .map(|(s, _, _)| *s)
        .collect()
}

/// Whether the process runs its guest under KVM: it holds `/dev/kvm` or a KVM VM
/// descriptor.
pub fn uses_kvm(pid: u32) -> Result<bool, ProcessError> {
    let dir = format!("/proc/{pid}/fd");
    let fds = fs::read_dir(&dir).map_err(|source| ProcessError::Io {
        path: dir.into(),
        source,
    })?;
    Ok(fds.flatten().any(|fd| {
        fs::read_link(fd.path()).is_ok_and(|t| {
            let t = t.to_string_lossy();
            t == "/dev/kvm" || t.starts_with("anon_inode:kvm-vm")
        })
    }))
}

/// The QEMU version of the process: its executable's `--version`, major and minor.
pub fn version(pid: u32) -> Result<(u64, u64), ProcessError> {
    let exe = format!("/proc/{pid}/exe");
    let out = Command::new(&exe)
        .arg("--version")
        .output()
        .map_err(|source| ProcessError::Io {
            path: exe.clone().into(),
            source,
        })?;
    let text = String::from_utf8_lossy(&out.stdout);
    parse_version(&text).ok_or_else(|| {
        ProcessError::NotFound(format!(
            "{exe} --version printed no QEMU version: {:?}",
            text.lines().next().unwrap_or("")
        ))
    })
}

/// `QEMU emulator version 7.2.22 (Debian …)` → (7, 2).
fn parse_version(text: &str) -> Option<(u64, u64)> {
    let v = text.split("QEMU emulator version ").nth(1)?;
    let mut parts = v.split(|c: char| !c.is_ascii_digit());
    Some((parts.next()?.parse().ok()?, parts.next()?.parse().ok()?))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn proc_net_address_forms() {
        let a: SocketAddr = "127.0.0.1:8080".parse().unwrap();
        let forms = proc_net_forms(a);
        if cfg!(target_endian = "little") {
            assert_eq!(forms[0], "0100007F:1F90");
            assert_eq!(forms[1], "0000000000000000FFFF00000100007F:1F90");
        }
        let b: SocketAddr = "[::ffff:127.0.0.1]:8080".parse().unwrap();
        assert_eq!(proc_net_forms(b)[1], forms[0]);
    }

    #[test]
    fn maps_spans_of_the_block_size() {
        let maps = "\
7f0000100000-7f0000200000 rw-p 00000000 00:00 0 \n\
7f0000200000-7f0040200000 rw-p 00000000 00:00 0 \n\
7f0040200000-7f0040201000 ---p 00000000 00:00 0 \n\
7f1000000000-7f103ffff000 rwxp 00000000 00:00 0 \n\
7f2000000000-7f2020000000 rw-p 00000000 00:00 0 \n\
7f2020000000-7f2040000000 rw-p 00000000 00:00 0 \n\
55aa00000000-55aa40000000 rw-p 00000000 00:00 0                          [heap]\n";
        let m = parse_maps(maps);
        assert_eq!(m.len(), 7);
        assert!(!may_hold_ram(&m[3]) && !may_hold_ram(&m[6]) && may_hold_ram(&m[0]));
        assert_eq!(spans_of_len(&m, 0x4010_0000), vec![0x7f00_0010_0000]);
        // 1 GiB in one piece, even next to another mapping; the guard page and TCG's rwx
        // buffer never count.
        assert_eq!(spans_of_len(&m, 0x4000_0000), vec![0x7f00_0020_0000]);
        // Two halves split by madvise, joined only when no mapping has the size whole.
        assert_eq!(spans_of_len(&m[3..], 0x4000_0000), vec![0x7f20_0000_0000]);
        assert_eq!(spans_of_len(&m, 0x3fff_f000), Vec::<u64>::new());
        assert_eq!(
            parse_version("QEMU emulator version 10.0.2 (Debian)\n"),
            Some((10, 0))
        );
        assert_eq!(parse_version("QEMU emulator version 7.2.22"), Some((7, 2)));
        assert_eq!(parse_version("something else"), None);
    }
}
