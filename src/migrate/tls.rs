//! TLS 1.3 with mutual authentication on the link between the pct sender and the pct
//! receiver (rustls, with ring's cryptography).
//!
//! This module owns:
//!
//! - each end's TLS identity, from its `--tls-dir` ([`Identity`]): the CA the peer's
//!   certificate must chain to, this end's certificate chain and its key ([`certs`] reads
//!   and writes those files);
//! - the handshake on a TCP socket just connected ([`connect`], the sender: it checks that
//!   the receiver's certificate names the host it dialled) or accepted ([`accept`], the
//!   receiver: it checks that the sender's certificate chains to its CA, and says who the
//!   sender is, or who was refused and why);
//! - after the handshake, the *pump*: one thread that owns the rustls connection and the
//!   TCP socket and moves bytes both ways between them and one end of a Unix socket pair.
//!   The other end, [`TlsEnd`], is the link the sender and receiver use: plaintext, and like
//!   the TCP socket it stands for it can be cloned for several threads, shut down, and given
//!   timeouts. A rustls connection cannot be shared between threads; a socket can.
//!
//! The pump, in both directions, holds at most one buffer of bytes it has taken and not
//! passed on (plus rustls's own bounded buffers): it reads from one side only once the
//! other has taken what it read before, so a slow side slows the other down, as TCP does.
//! A half-close of the plaintext end (`shutdown(Write)`, or its last handle dropped)
//! becomes TLS `close_notify` and a TCP half-close; the peer's `close_notify` becomes the
//! end of the plaintext end's input. Anything else that ends the TLS session (an error, a
//! TCP close without `close_notify`, an alert) closes both sides at once, and
//! [`TlsEnd::failure`] tells what it was.

pub mod certs;

use certs::{Names, CA_FILE, CERT_FILE, KEY_FILE};
use rustix::event::{poll, PollFd, PollFlags};
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::WebPkiServerVerifier;
use rustls::crypto::CryptoProvider;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::server::WebPkiClientVerifier;
use rustls::{
    AlertDescription, CertificateError, ClientConfig, ClientConnection, Connection,
    DigitallySignedStruct, DistinguishedName, RootCertStore, ServerConfig, ServerConnection,
    SignatureScheme,
};
use std::io::{self, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpStream};
use std::os::fd::{AsFd, BorrowedFd};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

/// Bytes the pump takes from one side before the other has taken them, in each direction;
/// also the bound on the TLS records rustls holds for TCP.
const PUMP_BUFFER: usize = 32 << 10;

/// Kernel send buffer asked for on both ends of the socket pair: with the pump's own
/// buffer, what TLS adds to the link's buffering (see [`super::flow`]).
const PAIR_BUFFER: usize = 32 << 10;

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("{}: {msg}", path.display())]
    File { path: PathBuf, msg: String },
    #[error("TLS configuration: {0}")]
    Config(String),
    #[error("{0:?} is not a TLS server name (a DNS name or an IP address)")]
    ServerName(String),
    /// The sender's side of a failed handshake.
    #[error("TLS with the receiver at {peer}: {why}")]
    Connect { peer: SocketAddr, why: String },
    /// The receiver's side of a failed handshake: who was refused, and why.
    #[error("refused sender {peer}: {why}")]
    Refused { peer: SocketAddr, why: String },
    #[error("TLS: {0}")]
    Io(#[from] io::Error),
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// One end's TLS identity, as its `--tls-dir` gives it.
pub struct Identity {
    dir: PathBuf,
    provider: Arc<CryptoProvider>,
    /// The CA(s) the peer's certificate must chain to.
    roots: Arc<RootCertStore>,
    /// This end's certificate, then any intermediates.
    chain: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
}

impl std::fmt::Debug for Identity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Identity")
            .field("dir", &self.dir)
            .field("subject", &self.subject())
            .finish_non_exhaustive()
    }
}

impl Identity {
    /// Loads `dir/ca.pem`, `dir/cert.pem` and `dir/key.pem`, and checks that they make a
    /// usable client and server configuration (the key is the certificate's).
    pub fn load(dir: &Path) -> Result<Identity, TlsError> {
        let ca_path = dir.join(CA_FILE);
        let mut roots = RootCertStore::empty();
        for c in certs::read_certs(&ca_path)? {
            roots.add(c).map_err(|e| TlsError::File {
                path: ca_path.clone(),
                msg: format!("not a usable CA certificate: {e}"),
            })?;
        }
        let id = Identity {
            dir: dir.to_owned(),
            provider: Arc::new(rustls::crypto::aws_lc_rs::default_provider()),
            roots: Arc::new(roots),
            chain: certs::read_certs(&dir.join(CERT_FILE))?,
            key: certs::read_key(&dir.join(KEY_FILE))?,
        };
        let bad = |e: TlsError| TlsError::Config(format!("{}: {e}", dir.display()));
        id.client_config(Arc::default()).map_err(bad)?;
        id.server_config(Arc::default()).map_err(bad)?;
        Ok(id)
    }

    /// The directory it was loaded from.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// What this end's certificate names.
    pub fn subject(&self) -> String {
        self.chain
            .first()
            .map_or_else(String::new, |c| Names::of(c).subject())
    }

    /// Checks that this end's own certificate chains to its CA, for each of its names, as
    /// either end of the link ([`certs::keygen`]'s self-check).
    pub fn check_own_chain(&self) -> Result<(), TlsError> {
        let leaf = self
            .chain
            .first()
            .ok_or_else(|| TlsError::Config("no certificate".into()))?;
        let server = self.server_verifier()?;
        let client = self.client_verifier()?;
        let now = UnixTime::now();
        let bad = |e: rustls::Error| {
            TlsError::Config(format!(
                "{}: {}",
                self.dir.display(),
                explain(&e, Side::Ours)
            ))
        };
        client
            .verify_client_cert(leaf, &self.chain[1..], now)
            .map_err(bad)?;
        let names = Names::of(leaf);
        let all = names
            .dns
            .iter()
            .map(|d| ServerName::try_from(d.clone()).ok())
            .chain(names.ips.iter().map(|ip| Some(ServerName::from(*ip))));
        for name in all.flatten() {
            server
                .verify_server_cert(leaf, &self.chain[1..], &name, &[], now)
                .map_err(bad)?;
        }
        Ok(())
    }

    fn server_verifier(&self) -> Result<Arc<WebPkiServerVerifier>, TlsError> {
        WebPkiServerVerifier::builder_with_provider(self.roots.clone(), self.provider.clone())
            .build()
            .map_err(|e| TlsError::Config(e.to_string()))
    }

    fn client_verifier(&self) -> Result<Arc<dyn ClientCertVerifier>, TlsError> {
        WebPkiClientVerifier::builder_with_provider(self.roots.clone(), self.provider.clone())
            .build()
            .map_err(|e| TlsError::Config(e.to_string()))
    }

    /// The sender's configuration: TLS 1.3, the receiver checked against our CA (noting
    /// its certificate in `seen`), our certificate presented.
    fn client_config(&self, seen: Arc<Seen>) -> Result<Arc<ClientConfig>, TlsError> {
        let verifier = Arc::new(Noting {
            inner: self.server_verifier()?,
            seen,
        });
        let mut c = ClientConfig::builder_with_provider(self.provider.clone())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .map_err(|e| TlsError::Config(e.to_string()))?
            // Not dangerous: `Noting` notes the certificate and leaves every decision to
            // webpki's verifier.
            .dangerous()
            .with_custom_certificate_verifier(verifier)
            .with_client_auth_cert(self.chain.clone(), self.key.clone_key())
            .map_err(|e| TlsError::Config(format!("certificate and key: {e}")))?;
        c.resumption = rustls::client::Resumption::disabled();
        Ok(Arc::new(c))
    }

    /// The receiver's configuration: TLS 1.3, a client certificate required and checked
    /// against our CA (noted in `seen`), our certificate presented.
    fn server_config(&self, seen: Arc<Seen>) -> Result<Arc<ServerConfig>, TlsError> {
        let verifier = Arc::new(Noting {
            inner: self.client_verifier()?,
            seen,
        });
        let mut c = ServerConfig::builder_with_provider(self.provider.clone())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .map_err(|e| TlsError::Config(e.to_string()))?
            .with_client_cert_verifier(verifier)
            .with_single_cert(self.chain.clone(), self.key.clone_key())
            .map_err(|e| TlsError::Config(format!("certificate and key: {e}")))?;
        // One session per connection, never resumed: nothing to send after the handshake.
        c.send_tls13_tickets = 0;
        Ok(Arc::new(c))
    }
}

/// The peer's end-entity certificate, as a verifier saw it (also when it refused it).
#[derive(Debug, Default)]
struct Seen(Mutex<Option<CertificateDer<'static>>>);

impl Seen {
    fn note(&self, c: &CertificateDer<'_>) {
        *lock(&self.0) = Some(c.clone().into_owned());
    }

    fn names(&self) -> Option<Names> {
        lock(&self.0).as_ref().map(|c| Names::of(c))
    }
}

/// A verifier that notes the certificate it is shown, then asks `inner` (webpki's).
#[derive(Debug)]
struct Noting<V: ?Sized> {
    inner: Arc<V>,
    seen: Arc<Seen>,
}

impl ServerCertVerifier for Noting<WebPkiServerVerifier> {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        self.seen.note(end_entity);
        self.inner
            .verify_server_cert(end_entity, intermediates, server_name, ocsp_response, now)
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.inner.supported_verify_schemes()
    }
}

impl ClientCertVerifier for Noting<dyn ClientCertVerifier> {
    fn offer_client_auth(&self) -> bool {
        self.inner.offer_client_auth()
    }

    fn client_auth_mandatory(&self) -> bool {
        self.inner.client_auth_mandatory()
    }

    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        self.inner.root_hint_subjects()
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        self.seen.note(end_entity);
        self.inner
            .verify_client_cert(end_entity, intermediates, now)
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.inner.supported_verify_schemes()
    }
}

/// Whose certificate an error is about, for [`explain`].
#[derive(Clone, Copy, PartialEq, Eq)]
enum Side {
    /// The receiver judging a sender's certificate.
    Sender,
    /// The sender judging the receiver's.
    Receiver,
    /// This end's own (keygen's check).
    Ours,
}

impl Side {
    fn cert(self) -> &'static str {
        match self {
            Side::Sender => "certificate",
            Side::Receiver => "the receiver's certificate",
            Side::Ours => "the certificate",
        }
    }

    fn our_ca(self) -> &'static str {
        match self {
            Side::Sender => "this receiver's CA",
            Side::Receiver => "this sender's CA",
            Side::Ours => "the CA in its directory",
        }
    }

    /// Who sent us an alert.
    fn peer(self) -> &'static str {
        match self {
            Side::Sender | Side::Ours => "the sender",
            Side::Receiver => "the receiver",
        }
    }
}

/// A TLS error in words, for the operator. Certificate-derived strings in rustls's own
/// messages are sanitized.
fn explain(e: &rustls::Error, side: Side) -> String {
    use rustls::Error as E;
    let cert = side.cert();
    match e {
        E::InvalidCertificate(c) => match c {
            CertificateError::UnknownIssuer => {
                format!("{cert} not signed by {}", side.our_ca())
            }
            CertificateError::BadSignature => format!("{cert} has a bad signature"),
            CertificateError::BadEncoding => format!("{cert} is malformed"),
            CertificateError::Expired | CertificateError::ExpiredContext { .. } => {
                format!("{cert} has expired ({})", sanitize_str(&c.to_string()))
            }
            CertificateError::NotValidYet | CertificateError::NotValidYetContext { .. } => {
                format!(
                    "{cert} is not valid yet (are the clocks right? {})",
                    sanitize_str(&c.to_string())
                )
            }
            CertificateError::NotValidForName | CertificateError::NotValidForNameContext { .. } => {
                format!(
                    "{cert} does not name the host in --to ({})",
                    sanitize_str(&c.to_string())
                )
            }
            CertificateError::InvalidPurpose | CertificateError::InvalidPurposeContext { .. } => {
                let role = match side {
                    Side::Receiver => "a TLS server (serverAuth)",
                    _ => "a TLS client (clientAuth)",
                };
                format!("{cert} is not for {role}")
            }
            CertificateError::Revoked => format!("{cert} is revoked"),
            other => format!("{cert} refused: {}", sanitize_str(&other.to_string())),
        },
        E::NoCertificatesPresented => "presented no certificate".into(),
        E::AlertReceived(a) => {
            let peer = side.peer();
            match a {
                AlertDescription::UnknownCA => format!(
                    "{peer} refused this end's certificate: not signed by {peer}'s CA (TLS \
                     alert {a:?})"
                ),
                AlertDescription::BadCertificate
                | AlertDescription::CertificateUnknown
                | AlertDescription::UnsupportedCertificate
                | AlertDescription::CertificateExpired
                | AlertDescription::CertificateRevoked
                | AlertDescription::CertificateRequired
                | AlertDescription::DecryptError => {
                    let hint = match side {
                        Side::Sender => ": does this end's certificate name the host it dialled?",
                        _ => "",
                    };
                    format!("{peer} refused this end's certificate (TLS alert {a:?}{hint})")
                }
                AlertDescription::ProtocolVersion => {
                    format!("{peer} does not speak TLS 1.3 (alert {a:?})")
                }
                _ => format!("{peer} ended the TLS session (alert {a:?})"),
            }
        }
        E::InvalidMessage(_) | E::InappropriateMessage { .. } => format!(
            "{} does not speak TLS: is it started with --insecure-plaintext? ({})",
            side.peer(),
            sanitize_str(&e.to_string())
        ),
        E::PeerIncompatible(p) => format!("incompatible TLS peer: {p:?} (pct speaks TLS 1.3 only)"),
        other => sanitize_str(&other.to_string()),
    }
}

fn sanitize_str(s: &str) -> String {
    crate::sanitize::sanitize(s.as_bytes())
}

/// An I/O error from a handshake in words: rustls's errors come wrapped in `InvalidData`.
fn explain_io(e: &io::Error, side: Side) -> String {
    if let Some(t) = e.get_ref().and_then(|i| i.downcast_ref::<rustls::Error>()) {
        return explain(t, side);
    }
    match e.kind() {
        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut => "the TLS handshake timed out".into(),
        io::ErrorKind::UnexpectedEof => format!(
            "{} closed the connection during the TLS handshake (is it started with \
             --insecure-plaintext, or did it refuse this end?)",
            side.peer()
        ),
        _ => format!("during the TLS handshake: {e}"),
    }
}

/// Runs the handshake on blocking `tcp` until done, or `timeout`.
fn handshake(conn: &mut Connection, tcp: &mut TcpStream, timeout: Duration) -> io::Result<()> {
    let deadline = Instant::now() + timeout;
    while conn.is_handshaking() {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(io::ErrorKind::TimedOut.into());
        }
        tcp.set_read_timeout(Some(left))?;
        tcp.set_write_timeout(Some(left))?;
        conn.complete_io(tcp)?;
    }
    // Whatever the handshake left to send (the client's Finished).
    while conn.wants_write() {
        conn.write_tls(tcp)?;
    }
    tcp.set_read_timeout(None)?;
    tcp.set_write_timeout(None)?;
    Ok(())
}

/// The peer of a TLS link, once authenticated.
#[derive(Debug, Clone)]
pub struct Peer {
    /// What its certificate names (sanitized), for people.
    pub subject: String,
    /// The same names, one by one (what a receiver's `senders` list is matched against).
    pub names: Names,
    /// The cipher suite and the key exchange agreed, e.g.
    /// `TLS13_AES_256_GCM_SHA384, X25519MLKEM768`.
    pub suite: String,
}

impl Peer {
    fn of(conn: &Connection) -> Peer {
        let names = conn
            .peer_certificates()
            .and_then(|c| c.first())
            .map(|c| Names::of(c));
        let subject = names
            .as_ref()
            .map_or_else(|| "no certificate".into(), Names::subject);
        let cipher = conn
            .negotiated_cipher_suite()
            .map_or_else(|| "?".into(), |s| format!("{:?}", s.suite()));
        let group = conn
            .negotiated_key_exchange_group()
            .map_or_else(|| "?".into(), |g| format!("{:?}", g.name()));
        Peer {
            subject,
            names: names.unwrap_or_default(),
            suite: format!("{cipher}, {group}"),
        }
    }
}

/// The sender's handshake on `tcp`, connected to the receiver at `host` (the name or
/// address in `--to`, which the receiver's certificate must name). Returns the link's
/// plaintext end, its pump running.
pub fn connect(
    mut tcp: TcpStream,
    host: &str,
    id: &Identity,
    timeout: Duration,
) -> Result<(TlsEnd, Peer), TlsError> {
    let name = ServerName::try_from(host.to_owned())
        .map_err(|_| TlsError::ServerName(sanitize_str(host)))?;
    let peer = tcp.peer_addr()?;
    let seen = Arc::new(Seen::default());
    let conn = ClientConnection::new(id.client_config(seen.clone())?, name)
        .map_err(|e| TlsError::Config(e.to_string()))?;
    let mut conn = Connection::from(conn);
    if let Err(e) = handshake(&mut conn, &mut tcp, timeout) {
        let mut why = explain_io(&e, Side::Receiver);
        if let Some(n) = seen.names() {
            why = format!("{why} (it is {}, issued by {})", n.subject(), n.issuer());
        }
        return Err(TlsError::Connect { peer, why });
    }
    let who = Peer::of(&conn);
    Ok((pump(conn, tcp)?, who))
}

/// The receiver's handshake on `tcp`, just accepted from `peer`. Returns the link's
/// plaintext end, its pump running, and who the sender is; or, as [`TlsError::Refused`],
/// who was refused and why.
pub fn accept(
    mut tcp: TcpStream,
    peer: SocketAddr,
    id: &Identity,
    timeout: Duration,
) -> Result<(TlsEnd, Peer), TlsError> {
    let seen = Arc::new(Seen::default());
    let conn = ServerConnection::new(id.server_config(seen.clone())?)
        .map_err(|e| TlsError::Config(e.to_string()))?;
    let mut conn = Connection::from(conn);
    if let Err(e) = handshake(&mut conn, &mut tcp, timeout) {
        let why = explain_io(&e, Side::Sender);
        let why = match seen.names() {
            Some(n) => format!("{why} (it is {}, issued by {})", n.subject(), n.issuer()),
            None => why,
        };
        return Err(TlsError::Refused { peer, why });
    }
    let who = Peer::of(&conn);
    Ok((pump(conn, tcp)?, who))
}

/// What the pump and the plaintext ends share.
#[derive(Debug, Default)]
struct Shared {
    /// Why the pump stopped, if it failed.
    failure: Mutex<Option<String>>,
    /// Plaintext bytes written to the plaintext end, and taken from the pump's end into
    /// TLS: the difference is what waits in the socket pair and the pump's buffer.
    written: AtomicU64,
    taken: AtomicU64,
    /// The outbound direction is over: all that was written went out, then
    /// `close_notify` (or the pump stopped).
    sent: Mutex<bool>,
    sent_cv: Condvar,
}

impl Shared {
    fn set_sent(&self) {
        *lock(&self.sent) = true;
        self.sent_cv.notify_all();
    }
}

/// The plaintext end of a TLS link: a Unix socket whose other end the pump serves.
#[derive(Debug)]
pub struct TlsEnd {
    local: UnixStream,
    /// The TCP socket under the link (a second handle, for what it still has to send).
    tcp: Arc<TcpStream>,
    shared: Arc<Shared>,
}

impl TlsEnd {
    pub fn try_clone(&self) -> io::Result<TlsEnd> {
        Ok(TlsEnd {
            local: self.local.try_clone()?,
            tcp: self.tcp.clone(),
            shared: self.shared.clone(),
        })
    }

    pub fn shutdown(&self, how: Shutdown) -> io::Result<()> {
        self.local.shutdown(how)
    }

    pub fn set_read_timeout(&self, t: Option<Duration>) -> io::Result<()> {
        self.local.set_read_timeout(t)
    }

    pub fn set_write_timeout(&self, t: Option<Duration>) -> io::Result<()> {
        self.local.set_write_timeout(t)
    }

    /// The TCP socket under the link.
    pub fn tcp(&self) -> &TcpStream {
        &self.tcp
    }

    /// Plaintext bytes written here that the pump has not encrypted yet.
    pub fn unencrypted_bytes(&self) -> u64 {
        let written = self.shared.written.load(Ordering::Relaxed);
        written.saturating_sub(self.shared.taken.load(Ordering::Relaxed))
    }

    /// Waits, at most `timeout`, until what was written here before a shutdown for writing
    /// has gone out on TCP, followed by `close_notify` (or the pump stopped); true if so.
    /// The pump is a thread of this process: a process that exits right after its last
    /// write must wait for it, as the kernel would have sent what a plain socket held.
    pub fn wait_sent(&self, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        let mut sent = lock(&self.shared.sent);
        while !*sent {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return false;
            }
            sent = match self.shared.sent_cv.wait_timeout(sent, left) {
                Ok((g, _)) => g,
                Err(p) => p.into_inner().0,
            };
        }
        true
    }

    /// Why the TLS session ended, if it failed: the cause behind an end of input or a
    /// broken pipe on this end.
    pub fn failure(&self) -> Option<String> {
        lock(&self.shared.failure).clone()
    }
}

impl Read for TlsEnd {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.local.read(buf)
    }
}

impl Write for TlsEnd {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = self.local.write(buf)?;
        self.shared.written.fetch_add(n as u64, Ordering::Relaxed);
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl AsFd for TlsEnd {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.local.as_fd()
    }
}

/// Starts the pump for `conn` on `tcp` (handshake done); returns the plaintext end.
fn pump(mut conn: Connection, tcp: TcpStream) -> Result<TlsEnd, TlsError> {
    conn.set_buffer_limit(Some(PUMP_BUFFER));
    let (ours, theirs) = UnixStream::pair()?;
    for s in [&ours, &theirs] {
        rustix::net::sockopt::set_socket_send_buffer_size(s, PAIR_BUFFER)
            .map_err(io::Error::from)?;
    }
    theirs.set_nonblocking(true)?;
    tcp.set_nonblocking(true)?;
    let shared = Arc::new(Shared::default());
    let end = TlsEnd {
        local: ours,
        tcp: Arc::new(tcp.try_clone()?),
        shared: shared.clone(),
    };
    let mut p = Pump {
        conn,
        tcp,
        local: theirs,
        out: Buf::new(),
        net: Buf::new(),
        inb: Buf::new(),
        local_eof: false,
        close_queued: false,
        tcp_write_shut: false,
        tcp_eof: false,
        peer_closed: false,
        inbound_done: false,
        shared,
    };
    std::thread::Builder::new()
        .name("pct-tls-pump".into())
        .spawn(move || p.run())?;
    Ok(end)
}

/// A byte buffer of [`PUMP_BUFFER`] bytes: filled when empty, then drained.
struct Buf {
    data: Box<[u8]>,
    start: usize,
    end: usize,
}

impl Buf {
    fn new() -> Buf {
        Buf {
            data: vec![0; PUMP_BUFFER].into_boxed_slice(),
            start: 0,
            end: 0,
        }
    }

    fn is_empty(&self) -> bool {
        self.start == self.end
    }

    fn pending(&self) -> &[u8] {
        &self.data[self.start..self.end]
    }

    fn consume(&mut self, n: usize) {
        self.start = (self.start + n).min(self.end);
    }

    fn clear(&mut self) {
        (self.start, self.end) = (0, 0);
    }

    /// One read from `r` into the (empty) buffer.
    fn fill(&mut self, r: &mut dyn Read) -> io::Result<usize> {
        debug_assert!(self.is_empty());
        self.clear();
        let n = r.read(&mut self.data)?;
        self.end = n;
        Ok(n)
    }
}

/// Why the pump stopped early.
enum Stop {
    /// The TLS session failed (a rustls error: ours or the peer's alert).
    Tls(rustls::Error),
    /// The peer closed TCP without `close_notify`.
    Truncated,
    /// The TCP socket failed.
    Tcp(io::Error),
}

impl Stop {
    fn describe(&self, side: Side) -> String {
        match self {
            Stop::Tls(e) => format!("TLS: {}", explain(e, side)),
            Stop::Truncated => format!(
                "{} closed the TCP connection without ending the TLS session (close_notify): \
                 it stopped, or the connection was cut",
                side.peer()
            ),
            Stop::Tcp(e) => format!("the TCP connection to {}: {e}", side.peer()),
        }
    }
}

/// The pump's state (see the module comment).
struct Pump {
    conn: Connection,
    tcp: TcpStream,
    /// The pump's end of the socket pair.
    local: UnixStream,
    /// Plaintext read from `local`, not yet taken by rustls.
    out: Buf,
    /// TLS records read from `tcp`, not yet taken by rustls.
    net: Buf,
    /// Plaintext from rustls, not yet written to `local`.
    inb: Buf,
    /// `local` has no more to send: `close_notify` is due.
    local_eof: bool,
    /// `close_notify` is queued in rustls.
    close_queued: bool,
    /// ... and has been sent, and TCP's sending side shut down: the outbound direction is
    /// over.
    tcp_write_shut: bool,
    /// TCP gave end of file.
    tcp_eof: bool,
    /// The peer's plaintext has all been taken (it sent `close_notify`).
    peer_closed: bool,
    /// The inbound direction is over: `local` was told (shut down for writing), or takes
    /// no more.
    inbound_done: bool,
    shared: Arc<Shared>,
}

fn would_block(e: &io::Error) -> bool {
    e.kind() == io::ErrorKind::WouldBlock
}

fn interrupted(e: &io::Error) -> bool {
    e.kind() == io::ErrorKind::Interrupted
}

impl Pump {
    fn side(&self) -> Side {
        match self.conn {
            Connection::Client(_) => Side::Receiver,
            Connection::Server(_) => Side::Sender,
        }
    }

    fn run(&mut self) {
        let r = self.serve();
        if let Err(stop) = &r {
            *lock(&self.shared.failure) = Some(stop.describe(self.side()));
            // An alert rustls queued for the peer, if TCP takes it now.
            let _ = self.conn.write_tls(&mut self.tcp);
        }
        let _ = self.tcp.shutdown(Shutdown::Both);
        let _ = self.local.shutdown(Shutdown::Both);
        self.shared.set_sent();
    }

    /// Moves bytes until both directions are over.
    fn serve(&mut self) -> Result<(), Stop> {
        loop {
            self.outbound()?;
            self.inbound()?;
            // What the inbound side made rustls queue (alerts, key updates).
            self.flush_tls()?;
            if self.tcp_write_shut && self.inbound_done {
                return Ok(());
            }
            self.wait()?;
        }
    }

    /// Sends rustls's queued records on TCP; false if TCP takes no more now.
    fn flush_tls(&mut self) -> Result<bool, Stop> {
        while self.conn.wants_write() && !self.tcp_write_shut {
            match self.conn.write_tls(&mut self.tcp) {
                Ok(0) => return Err(Stop::Tcp(io::ErrorKind::WriteZero.into())),
                Ok(_) => {}
                Err(e) if would_block(&e) => return Ok(false),
                Err(e) if interrupted(&e) => {}
                Err(e) => return Err(Stop::Tcp(e)),
            }
        }
        Ok(true)
    }

    /// Plaintext end → TLS → TCP, until one side would block.
    fn outbound(&mut self) -> Result<(), Stop> {
        while !self.tcp_write_shut {
            // Into rustls, as much as its bounded buffer takes.
            while !self.out.is_empty() {
                let n = self
                    .conn
                    .writer()
                    .write(self.out.pending())
                    .map_err(Stop::Tcp)?;
                if n == 0 {
                    if !self.conn.wants_write() {
                        // Full, with nothing to send: it would never take more.
                        return Err(Stop::Tcp(io::Error::other("TLS takes no more data")));
                    }
                    break;
                }
                self.out.consume(n);
                self.shared.taken.fetch_add(n as u64, Ordering::Relaxed);
            }
            if !self.flush_tls()? {
                return Ok(());
            }
            if !self.out.is_empty() {
                continue;
            }
            if self.local_eof {
                if !self.close_queued {
                    self.conn.send_close_notify();
                    self.close_queued = true;
                    continue;
                }
                // close_notify is out: TCP's sending side is done too.
                let _ = self.tcp.shutdown(Shutdown::Write);
                self.tcp_write_shut = true;
                self.shared.set_sent();
                return Ok(());
            }
            match self.out.fill(&mut self.local) {
                Ok(0) => self.local_eof = true,
                Ok(_) => {}
                Err(e) if would_block(&e) => return Ok(()),
                Err(e) if interrupted(&e) => {}
                // The plaintext end is gone (reset): nothing more will come from it.
                Err(_) => self.local_eof = true,
            }
        }
        Ok(())
    }

    /// TCP → TLS → plaintext end, until one side would block.
    fn inbound(&mut self) -> Result<(), Stop> {
        while !self.inbound_done {
            while !self.inb.is_empty() {
                match self.local.write(self.inb.pending()) {
                    Ok(n) => self.inb.consume(n),
                    Err(e) if would_block(&e) => return Ok(()),
                    Err(e) if interrupted(&e) => {}
                    // Nobody reads the plaintext end any more: drop what comes.
                    Err(_) => {
                        self.inb.clear();
                        self.inbound_done = true;
                        return Ok(());
                    }
                }
            }
            if self.peer_closed {
                let _ = self.local.shutdown(Shutdown::Write);
                self.inbound_done = true;
                return Ok(());
            }
            match self.inb.fill(&mut self.conn.reader()) {
                Ok(0) => {
                    self.peer_closed = true;
                    continue;
                }
                Ok(_) => continue,
                Err(e) if would_block(&e) => {}
                Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return Err(Stop::Truncated),
                Err(e) => return Err(Stop::Tcp(e)),
            }
            // rustls wants more records.
            if self.net.is_empty() && !self.tcp_eof {
                match self.net.fill(&mut self.tcp) {
                    Ok(0) => self.tcp_eof = true,
                    Ok(_) => {}
                    Err(e) if would_block(&e) => return Ok(()),
                    Err(e) if interrupted(&e) => continue,
                    Err(e) => return Err(Stop::Tcp(e)),
                }
            }
            // Records to rustls; at TCP's end of file, an empty read tells it so.
            let mut records = self.net.pending();
            let n = self.conn.read_tls(&mut records).map_err(Stop::Tcp)?;
            self.net.consume(n);
            if let Err(e) = self.conn.process_new_packets() {
                return Err(Stop::Tls(e));
            }
        }
        Ok(())
    }

    /// Waits for a socket to be ready for what the pump is blocked on.
    fn wait(&mut self) -> Result<(), Stop> {
        let mut local = PollFlags::empty();
        let mut tcp = PollFlags::empty();
        let tls_pending = self.conn.wants_write() && !self.tcp_write_shut;
        if tls_pending {
            tcp |= PollFlags::OUT;
        }
        if !self.tcp_write_shut && !self.local_eof && self.out.is_empty() && !tls_pending {
            local |= PollFlags::IN;
        }
        if !self.inbound_done {
            if self.inb.is_empty() {
                tcp |= PollFlags::IN;
            } else {
                local |= PollFlags::OUT;
            }
        }
        // A socket is polled only for what the pump waits for: a hang-up or error it does
        // not wait on would wake it again and again. The plaintext end is watched for its
        // hang-up alone while the pump has nothing for it but may get something.
        let watch_local = !local.is_empty() || (self.local_eof && !self.inbound_done);
        let (local_fd, tcp_fd) = (self.local.as_fd(), self.tcp.as_fd());
        let mut fds = Vec::with_capacity(2);
        if watch_local {
            fds.push(PollFd::new(&local_fd, local));
        }
        if !tcp.is_empty() {
            fds.push(PollFd::new(&tcp_fd, tcp));
        }
        loop {
            match poll(&mut fds, None) {
                Ok(_) => break,
                Err(rustix::io::Errno::INTR) => {}
                Err(e) => return Err(Stop::Tcp(e.into())),
            }
        }
        // The plaintext end closed both ways (no handle left, or shut down): nobody will
        // read what the peer sends.
        if watch_local && fds[0].revents().contains(PollFlags::HUP) && self.inb.is_empty() {
            self.inbound_done = true;
        }
        Ok(())
    }
}
