//! The receiver as a long-lived service (`pct-migrate receive --config FILE`): one
//! listening socket for many migrations, each into a VM its configuration names
//! ([`config`]). A sender's hello names the VM; the service admits it only if the sender's
//! certificate is among that VM's `senders` and no other migration into that VM is under
//! way. Each admitted session then runs as a one-shot receiver does
//! ([`destination::receive_admitted`]), reading only its own VM's disk, through reads that
//! are range-checked against that disk's size ([`crate::disk`]).
//!
//! tokio owns what waits: the accept loop, the sessions' supervision, the limit on
//! connections still in their handshake, and the signals that stop the service. A session's
//! data path stays on its own threads (reader, restorer, emitter: [`super::receiver`]),
//! because it is bound by CPU and disk (zstd, BLAKE3, reads), not by waiting; it runs on
//! tokio's blocking pool, so sessions run side by side and a failed one ends alone.

pub mod config;

use super::destination::{self, Admitted, Received};
use super::link::{self, LinkStream, Security, TLS_HANDSHAKE_TIMEOUT};
use super::receiver::ReceiverOptions;
use super::tls::{self, Peer, TlsError};
use super::wire::{Hello, WireStats};
use crate::disk::Disk;
use anyhow::{anyhow, Context, Result};
use config::{ServiceConfig, VmConfig};
use std::collections::HashMap;
use std::fmt;
use std::net::{SocketAddr, TcpStream};
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::task::JoinSet;

/// Connections still in their TLS handshake or hello at once; more wait in the kernel's
/// backlog.
const MAX_HANDSHAKES: usize = 64;

/// What the service tells its operator.
#[derive(Debug)]
pub enum Event<'a> {
    /// The listening socket is bound.
    Listening(SocketAddr),
    /// A connection refused at the TLS handshake (who, and why).
    TlsRefused(&'a TlsError),
    /// A sender refused at its hello: from where, who it is, and why (told the sender too).
    Refused {
        addr: SocketAddr,
        who: &'a str,
        why: &'a str,
    },
    /// A migration into `vm` admitted.
    Started {
        vm: &'a str,
        addr: SocketAddr,
        who: &'a str,
    },
    /// A migration into `vm` ended: received, or why not.
    Finished {
        vm: &'a str,
        who: &'a str,
        /// The disk its pages were restored from.
        disk: &'a Path,
        result: &'a Result<Received>,
    },
    /// Stopping: no new sessions; this many still run.
    Stopping(usize),
}

impl fmt::Display for Event<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Event::Listening(a) => write!(f, "receiver service listening on {a}"),
            Event::TlsRefused(e) => write!(f, "{e}"),
            Event::Refused { addr, who, why } => {
                write!(f, "refused the sender at {addr} ({who}): {why}")
            }
            Event::Started { vm, addr, who } => {
                write!(f, "vm {vm}: receiving from {addr} ({who})")
            }
            Event::Finished {
                vm,
                disk,
                result: Ok(r),
                ..
            } => write!(f, "vm {vm}: {}", r.to_text(disk).trim_end()),
            Event::Finished {
                vm, result: Err(e), ..
            } => write!(f, "vm {vm}: failed: {}", crate::errors::chain_text(e)),
            Event::Stopping(n) => write!(f, "stopping: {n} migration(s) still running"),
        }
    }
}

/// What the service did, once it stops.
#[derive(Debug, Default, Clone, Copy)]
pub struct Served {
    pub received: u64,
    pub failed: u64,
    pub refused: u64,
}

type Notify = Arc<dyn Fn(Event<'_>) + Send + Sync>;

/// The service's shared state.
struct Service {
    cfg: ServiceConfig,
    security: Security,
    receiver: ReceiverOptions,
    /// The VMs with a migration under way, and from whom.
    busy: Mutex<HashMap<String, String>>,
    notify: Notify,
}

/// How a connection ended.
enum Outcome {
    Received,
    Failed,
    Refused,
}

/// Runs the service until `max_sessions` admitted migrations have ended (`None`: until
/// SIGINT or SIGTERM; then no new sessions start, and those running finish).
pub fn serve(
    cfg: ServiceConfig,
    security: Security,
    receiver: ReceiverOptions,
    max_sessions: Option<u64>,
    notify: Notify,
) -> Result<Served> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .thread_name("pct-service")
        .enable_all()
        .build()
        .context("starting the service's runtime")?;
    let svc = Arc::new(Service {
        cfg,
        security,
        receiver,
        busy: Mutex::default(),
        notify,
    });
    rt.block_on(run(svc, max_sessions))
}

async fn run(svc: Arc<Service>, max_sessions: Option<u64>) -> Result<Served> {
    let listener = tokio::net::TcpListener::bind(&svc.cfg.listen)
        .await
        .with_context(|| format!("cannot listen on {}", svc.cfg.listen))?;
    (svc.notify)(Event::Listening(listener.local_addr()?));
    let handshakes = Arc::new(tokio::sync::Semaphore::new(MAX_HANDSHAKES));
    let mut sessions: JoinSet<Outcome> = JoinSet::new();
    let mut served = Served::default();
    let mut sigterm = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .context("installing the SIGTERM handler")?;
    let done = |s: &Served| max_sessions.is_some_and(|m| s.received + s.failed >= m);
    while !done(&served) {
        tokio::select! {
            accepted = listener.accept() => {
                let (tcp, addr) = match accepted {
                    Ok(a) => a,
                    // A connection gone before we took it, or out of descriptors for a
                    // moment: the service goes on.
                    Err(e) => {
                        eprintln!("pct-migrate: accept on {}: {e}", svc.cfg.listen);
                        tokio::time::sleep(Duration::from_millis(100)).await;
                        continue;
                    }
                };
                let permit = handshakes.clone().acquire_owned().await?;
                let tcp = tcp.into_std()?;
                let svc = svc.clone();
                sessions.spawn_blocking(move || svc.connection(tcp, addr, permit));
            }
            Some(ended) = sessions.join_next() => count(&mut served, ended),
            _ = tokio::signal::ctrl_c() => break,
            _ = sigterm.recv() => break,
        }
    }
    drop(listener);
    if !sessions.is_empty() {
        (svc.notify)(Event::Stopping(sessions.len()));
    }
    while let Some(ended) = sessions.join_next().await {
        count(&mut served, ended);
    }
    Ok(served)
}

fn count(served: &mut Served, ended: Result<Outcome, tokio::task::JoinError>) {
    match ended {
        Ok(Outcome::Received) => served.received += 1,
        Ok(Outcome::Refused) => served.refused += 1,
        // A panicked session is a failed one; the others go on.
        Ok(Outcome::Failed) | Err(_) => served.failed += 1,
    }
}

/// Frees a VM for the next migration when its session ends, however it ends.
struct Claim<'a> {
    busy: &'a Mutex<HashMap<String, String>>,
    vm: String,
}

impl Drop for Claim<'_> {
    fn drop(&mut self) {
        lock(self.busy).remove(&self.vm);
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl Service {
    /// One connection, on a blocking thread: authentication, the hello and its admission,
    /// then the migration.
    fn connection(
        &self,
        tcp: TcpStream,
        addr: SocketAddr,
        permit: tokio::sync::OwnedSemaphorePermit,
    ) -> Outcome {
        let prepared = tcp
            .set_nonblocking(false)
            .and_then(|()| tcp.set_nodelay(true));
        if prepared.is_err() {
            return Outcome::Refused;
        }
        let (mut link, peer) = match &self.security {
            Security::Plaintext => (LinkStream::Plain(tcp), None),
            Security::Tls(id) => match tls::accept(tcp, addr, id, TLS_HANDSHAKE_TIMEOUT) {
                Ok((end, peer)) => (LinkStream::Tls(end), Some(peer)),
                Err(e) => {
                    if matches!(e, TlsError::Refused { .. }) {
                        (self.notify)(Event::TlsRefused(&e));
                    }
                    return Outcome::Refused;
                }
            },
        };
        let who = peer.as_ref().map_or_else(
            || "plaintext, unauthenticated".to_owned(),
            |p| p.subject.clone(),
        );
        let started = Instant::now();
        let mut wire_stats = WireStats::default();
        let hello_timeout = Duration::from_secs(self.cfg.hello_timeout_s);
        let admitted = link::hello_as_receiver(&mut link, &mut wire_stats, hello_timeout, |h| {
            self.admit(h, peer.as_ref(), &who)
        });
        drop(permit);
        let (vm, claim, disk) = match admitted {
            Ok((_, got)) => got,
            Err(e) => {
                let why = e.to_string();
                let why = why.strip_prefix("refused: ").unwrap_or(&why);
                (self.notify)(Event::Refused {
                    addr,
                    who: &who,
                    why,
                });
                return Outcome::Refused;
            }
        };
        (self.notify)(Event::Started {
            vm: &vm.name,
            addr,
            who: &who,
        });
        let result = destination::receive_admitted(
            Admitted {
                link,
                wire_stats,
                started,
            },
            disk,
            &vm.qemu,
            None,
            &self.receiver,
        );
        drop(claim);
        (self.notify)(Event::Finished {
            vm: &vm.name,
            who: &who,
            disk: &vm.disk,
            result: &result,
        });
        match result {
            Ok(_) => Outcome::Received,
            Err(_) => Outcome::Failed,
        }
    }

    /// Judges a sender's hello: the VM it names must be configured, the sender's
    /// certificate among that VM's `senders`, and the VM free; then its disk must open. On
    /// success the VM is claimed until the returned [`Claim`] drops. The reason for a
    /// refusal goes to the sender as well.
    fn admit(
        &self,
        hello: &Hello,
        peer: Option<&Peer>,
        who: &str,
    ) -> Result<(&VmConfig, Claim<'_>, Disk), String> {
        if hello.vm.is_empty() {
            return Err(
                "this receiver serves several VMs: name the one to migrate (--vm NAME)".into(),
            );
        }
        let vm = self
            .cfg
            .vm(&hello.vm)
            .ok_or_else(|| format!("no VM `{}` is configured here", hello.vm))?;
        if let Some(p) = peer {
            if !vm.senders.iter().any(|s| p.names.has(s)) {
                return Err(format!("{who} may not migrate VM `{}`", vm.name));
            }
        }
        let claim = {
            let mut busy = lock(&self.busy);
            if let Some(from) = busy.get(&vm.name) {
                return Err(format!(
                    "VM `{}` is already receiving a migration (from {from})",
                    vm.name
                ));
            }
            busy.insert(vm.name.clone(), who.to_owned());
            Claim {
                busy: &self.busy,
                vm: vm.name.clone(),
            }
        };
        let disk = Disk::open(&vm.disk, vm.disk_format).map_err(|e| {
            format!(
                "VM `{}`: its disk cannot be opened here: {}",
                vm.name,
                crate::errors::chain_text(&anyhow!(e))
            )
        })?;
        Ok((vm, claim, disk))
    }
}
