//! The certificates of the TLS link: what a `--tls-dir` holds, `pct-migrate keygen`, which
//! writes such directories, and what a peer's certificate names (for the logs).
//!
//! A TLS directory holds three PEM files: `ca.pem` (the certificate authority, or several,
//! that the peer's certificate must chain to), `cert.pem` (this end's certificate, then any
//! intermediates) and `key.pem` (its private key: PKCS#8, PKCS#1 or SEC1). `keygen` writes
//! `DIR/ca.pem`, `DIR/ca-key.pem` and, for each host, `DIR/HOST/{ca,cert,key}.pem`, the
//! certificate naming the host (DNS name or IP address) and valid for both ends of the link.

use super::TlsError;
use crate::sanitize::sanitize;
use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose,
};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use std::fs::{self, OpenOptions};
use std::io::Write;
use std::net::IpAddr;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

/// The CA bundle in a TLS directory.
pub const CA_FILE: &str = "ca.pem";
/// This end's certificate chain.
pub const CERT_FILE: &str = "cert.pem";
/// This end's private key.
pub const KEY_FILE: &str = "key.pem";
/// The CA's private key, in the directory `keygen` writes (never in a host's).
pub const CA_KEY_FILE: &str = "ca-key.pem";

/// How long the certificates `keygen` issues are valid.
const VALIDITY_DAYS: i64 = 3650;

fn file_error(path: &Path, msg: impl std::fmt::Display) -> TlsError {
    TlsError::File {
        path: path.to_owned(),
        msg: msg.to_string(),
    }
}

/// Every certificate in the PEM file `path` (at least one).
pub fn read_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let certs = CertificateDer::pem_file_iter(path)
        .map_err(|e| file_error(path, e))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| file_error(path, e))?;
    if certs.is_empty() {
        return Err(file_error(path, "no CERTIFICATE in the file"));
    }
    Ok(certs)
}

/// The private key in the PEM file `path`.
pub fn read_key(path: &Path) -> Result<PrivateKeyDer<'static>, TlsError> {
    PrivateKeyDer::from_pem_file(path).map_err(|e| file_error(path, e))
}

/// What a certificate names, read from its DER without trusting it: any malformation just
/// leaves fields out. Strings are sanitized ([`sanitize`]): they come from a peer.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Names {
    /// The subject's common name.
    pub subject_cn: Option<String>,
    /// The issuer's common name.
    pub issuer_cn: Option<String>,
    /// subjectAltName DNS names.
    pub dns: Vec<String>,
    /// subjectAltName IP addresses.
    pub ips: Vec<IpAddr>,
}

impl Names {
    /// Reads `der` (an X.509 certificate).
    pub fn of(der: &[u8]) -> Names {
        let mut n = Names::default();
        let _ = parse_names(der, &mut n);
        n
    }

    /// The subject, for people: `CN=…, DNS:…, IP:…` (or `no names` if it has none).
    pub fn subject(&self) -> String {
        let mut parts = Vec::new();
        if let Some(cn) = &self.subject_cn {
            parts.push(format!("CN={cn}"));
        }
        parts.extend(self.dns.iter().map(|d| format!("DNS:{d}")));
        parts.extend(self.ips.iter().map(|ip| format!("IP:{ip}")));
        if parts.is_empty() {
            return "a certificate with no names".into();
        }
        parts.join(", ")
    }

    /// Whether the certificate names `name`: as its common name, a DNS name or an IP
    /// address.
    pub fn has(&self, name: &str) -> bool {
        self.subject_cn.as_deref() == Some(name)
            || self.dns.iter().any(|d| d == name)
            || self.ips.iter().any(|ip| ip.to_string() == name)
    }

    /// The issuer, for people.
    pub fn issuer(&self) -> String {
        match &self.issuer_cn {
            Some(cn) => format!("CN={cn}"),
            None => "an issuer with no common name".into(),
        }
    }
}

/// A cursor over DER: tag-length-value items, bounds-checked, single-byte tags only (all
/// that X.509 uses where we look).
struct Der<'a>(&'a [u8]);

impl<'a> Der<'a> {
    /// The next item's tag and contents.
    fn next(&mut self) -> Option<(u8, &'a [u8])> {
        let (&tag, rest) = self.0.split_first()?;
        if tag & 0x1f == 0x1f {
            return None;
        }
        let (&first, mut rest) = rest.split_first()?;
        let len = if first < 0x80 {
            usize::from(first)
        } else {
            let n = usize::from(first & 0x7f);
            if n == 0 || n > 4 {
                return None;
            }
            let (bytes, after) = rest.split_at_checked(n)?;
            rest = after;
            bytes
                .iter()
                .fold(0usize, |acc, &b| (acc << 8) | usize::from(b))
        };
        let (body, after) = rest.split_at_checked(len)?;
        self.0 = after;
        Some((tag, body))
    }

    /// The next item, which must have tag `want`.
    fn expect(&mut self, want: u8) -> Option<&'a [u8]> {
        match self.next()? {
            (tag, body) if tag == want => Some(body),
            _ => None,
        }
    }
}

const SEQUENCE: u8 = 0x30;
const SET: u8 = 0x31;
const OID: u8 = 0x06;
const OCTET_STRING: u8 = 0x04;
/// tbsCertificate's `[0] EXPLICIT version`.
const VERSION: u8 = 0xa0;
/// tbsCertificate's `[3] EXPLICIT extensions`.
const EXTENSIONS: u8 = 0xa3;
/// GeneralName's `[2] IMPLICIT IA5String dNSName` and `[7] IMPLICIT OCTET STRING iPAddress`.
const SAN_DNS: u8 = 0x82;
const SAN_IP: u8 = 0x87;
/// 2.5.4.3, commonName.
const OID_CN: &[u8] = &[0x55, 0x04, 0x03];
/// 2.5.29.17, subjectAltName.
const OID_SAN: &[u8] = &[0x55, 0x1d, 0x11];

fn parse_names(der: &[u8], n: &mut Names) -> Option<()> {
    let cert = Der(der).expect(SEQUENCE)?;
    let mut tbs = Der(Der(cert).expect(SEQUENCE)?);
    let (tag, _) = tbs.next()?;
    if tag == VERSION {
        tbs.next()?; // serial number
    }
    tbs.expect(SEQUENCE)?; // signature algorithm
    n.issuer_cn = common_name(tbs.expect(SEQUENCE)?);
    tbs.expect(SEQUENCE)?; // validity
    n.subject_cn = common_name(tbs.expect(SEQUENCE)?);
    tbs.expect(SEQUENCE)?; // subject public key
    while let Some((tag, body)) = tbs.next() {
        if tag != EXTENSIONS {
            continue;
        }
        let mut exts = Der(Der(body).expect(SEQUENCE)?);
        while let Some(ext) = exts.expect(SEQUENCE) {
            let mut ext = Der(ext);
            if ext.expect(OID)? != OID_SAN {
                continue;
            }
            // `critical` (a BOOLEAN) may come before the value.
            let value = match ext.next()? {
                (OCTET_STRING, v) => v,
                _ => ext.expect(OCTET_STRING)?,
            };
            let mut names = Der(Der(value).expect(SEQUENCE)?);
            while let Some((tag, body)) = names.next() {
                match tag {
                    SAN_DNS => n.dns.push(sanitize(body)),
                    SAN_IP => match body.len() {
                        4 => n.ips.push(IpAddr::from(<[u8; 4]>::try_from(body).ok()?)),
                        16 => n.ips.push(IpAddr::from(<[u8; 16]>::try_from(body).ok()?)),
                        _ => {}
                    },
                    _ => {}
                }
            }
        }
    }
    Some(())
}

/// The first common name of an X.509 Name (a sequence of sets of type-value pairs).
fn common_name(name: &[u8]) -> Option<String> {
    let mut rdns = Der(name);
    while let Some(set) = rdns.expect(SET) {
        let mut atvs = Der(set);
        while let Some(atv) = atvs.expect(SEQUENCE) {
            let mut atv = Der(atv);
            if atv.expect(OID)? == OID_CN {
                return atv.next().map(|(_, v)| sanitize(v));
            }
        }
    }
    None
}

/// One host of `keygen`: `NAME[,NAME…]`, each a DNS name or an IP address; the first names
/// its directory.
#[derive(Debug, Clone)]
pub struct HostSpec {
    pub names: Vec<String>,
}

impl std::str::FromStr for HostSpec {
    type Err = String;

    fn from_str(s: &str) -> Result<HostSpec, String> {
        let names: Vec<String> = s.split(',').map(str::to_owned).collect();
        for n in &names {
            // A valid server name has no `/` and is not `.` or `..`: safe as a directory.
            if ServerName::try_from(n.as_str()).is_err() || n.starts_with('.') {
                return Err(format!(
                    "{:?} is neither a DNS name nor an IP address",
                    sanitize(n.as_bytes())
                ));
            }
        }
        Ok(HostSpec { names })
    }
}

impl HostSpec {
    fn dir_name(&self) -> &str {
        self.names.first().map_or("", String::as_str)
    }
}

/// What `keygen` wrote.
#[derive(Debug)]
pub struct Issued {
    /// The CA's certificate, and whether it was made now (else an existing one signed).
    pub ca: PathBuf,
    pub new_ca: bool,
    /// Each host's directory (for `--tls-dir`).
    pub hosts: Vec<PathBuf>,
}

fn keygen_error(what: &str, e: impl std::fmt::Display) -> TlsError {
    TlsError::Config(format!("{what}: {e}"))
}

/// Writes `contents` to a new file `path` (never over an existing one), readable by its
/// owner alone if `secret`.
fn write_new(path: &Path, contents: &str, secret: bool) -> Result<(), TlsError> {
    let mut f = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(if secret { 0o600 } else { 0o644 })
        .open(path)
        .map_err(|e| file_error(path, e))?;
    f.write_all(contents.as_bytes())
        .and_then(|()| f.sync_all())
        .map_err(|e| file_error(path, e))
}

/// The CA's parameters (its certificate is made from them, and it signs with them).
fn ca_params(cn: &str) -> CertificateParams {
    let mut p = CertificateParams::default();
    p.distinguished_name = rcgen::DistinguishedName::new();
    p.distinguished_name.push(DnType::CommonName, cn);
    p.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    p.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    p
}

fn validity(p: &mut CertificateParams) {
    let now = time::OffsetDateTime::now_utc();
    // A day back, for clocks a little behind.
    p.not_before = now - time::Duration::days(1);
    p.not_after = now + time::Duration::days(VALIDITY_DAYS);
}

/// `pct-migrate keygen --out DIR HOST…`: a CA in `DIR` (made unless `DIR/ca.pem` and
/// `DIR/ca-key.pem` exist from an earlier run) and, for each host, `DIR/HOST/` with the CA,
/// a certificate for the host's names signed by it (for client and server
/// authentication) and its key. Refuses to replace an existing host directory. Each
/// directory is checked by loading it as `--tls-dir` does.
pub fn keygen(out: &Path, hosts: &[HostSpec]) -> Result<Issued, TlsError> {
    let (ca_path, ca_key_path) = (out.join(CA_FILE), out.join(CA_KEY_FILE));
    fs::DirBuilder::new()
        .recursive(true)
        .mode(0o755)
        .create(out)
        .map_err(|e| file_error(out, e))?;
    for h in hosts {
        let dir = out.join(h.dir_name());
        if dir.exists() {
            return Err(file_error(
                &dir,
                "exists already: remove it to issue this host a new certificate",
            ));
        }
    }
    let (ca_cert_pem, issuer, new_ca) = match (ca_path.exists(), ca_key_path.exists()) {
        (true, true) => {
            let pem = fs::read_to_string(&ca_path).map_err(|e| file_error(&ca_path, e))?;
            let key_pem =
                fs::read_to_string(&ca_key_path).map_err(|e| file_error(&ca_key_path, e))?;
            let key = KeyPair::from_pem(&key_pem).map_err(|e| file_error(&ca_key_path, e))?;
            let der = read_certs(&ca_path)?;
            let cn = Names::of(&der[0])
                .subject_cn
                .ok_or_else(|| file_error(&ca_path, "the CA certificate has no common name"))?;
            (pem, Issuer::new(ca_params(&cn), key), false)
        }
        (false, false) => {
            let key = KeyPair::generate().map_err(|e| keygen_error("generating the CA key", e))?;
            // Named after its key, so that two CAs are told apart in the logs.
            let id = blake3::hash(key.public_key_raw()).to_hex();
            let mut params = ca_params(&format!("pct migration CA {}", &id[..12]));
            validity(&mut params);
            let cert = params
                .self_signed(&key)
                .map_err(|e| keygen_error("making the CA certificate", e))?;
            write_new(&ca_key_path, &key.serialize_pem(), true)?;
            write_new(&ca_path, &cert.pem(), false)?;
            (cert.pem(), Issuer::new(params, key), true)
        }
        (true, false) | (false, true) => {
            return Err(file_error(
                out,
                format!("holds one of {CA_FILE} and {CA_KEY_FILE} but not the other"),
            ))
        }
    };
    let mut issued = Vec::new();
    for h in hosts {
        let dir = out.join(h.dir_name());
        let key = KeyPair::generate().map_err(|e| keygen_error("generating a host key", e))?;
        let mut params = CertificateParams::new(h.names.clone())
            .map_err(|e| keygen_error(&format!("the names of {}", h.dir_name()), e))?;
        params.distinguished_name = rcgen::DistinguishedName::new();
        params
            .distinguished_name
            .push(DnType::CommonName, h.dir_name());
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        params.use_authority_key_identifier_extension = true;
        validity(&mut params);
        let cert = params
            .signed_by(&key, &issuer)
            .map_err(|e| keygen_error(&format!("signing {}'s certificate", h.dir_name()), e))?;
        fs::DirBuilder::new()
            .mode(0o700)
            .create(&dir)
            .map_err(|e| file_error(&dir, e))?;
        write_new(&dir.join(KEY_FILE), &key.serialize_pem(), true)?;
        write_new(&dir.join(CERT_FILE), &cert.pem(), false)?;
        write_new(&dir.join(CA_FILE), &ca_cert_pem, false)?;
        // What an end will load, loaded: the key matches, the chain verifies.
        super::Identity::load(&dir)?.check_own_chain()?;
        issued.push(dir);
    }
    Ok(Issued {
        ca: ca_path,
        new_ca,
        hosts: issued,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cert(names: &[&str]) -> Vec<u8> {
        let key = KeyPair::generate().expect("key");
        let mut p = CertificateParams::new(names.iter().map(|s| s.to_string()).collect::<Vec<_>>())
            .expect("params");
        p.distinguished_name = rcgen::DistinguishedName::new();
        p.distinguished_name.push(DnType::CommonName, "dst\x1b[2J");
        p.self_signed(&key).expect("cert").der().to_vec()
    }

    #[test]
    fn names_of_a_certificate() {
        let der = cert(&["dst.example", "10.0.0.2", "::1"]);
        let n = Names::of(&der);
        assert_eq!(n.subject_cn.as_deref(), Some("dst\\x1b[2J"));
        assert_eq!(n.issuer_cn.as_deref(), Some("dst\\x1b[2J"));
        assert_eq!(n.dns, ["dst.example"]);
        let ips: Vec<IpAddr> = vec!["10.0.0.2".parse().unwrap(), "::1".parse().unwrap()];
        assert_eq!(n.ips, ips);
        assert_eq!(
            n.subject(),
            "CN=dst\\x1b[2J, DNS:dst.example, IP:10.0.0.2, IP:::1"
        );
    }

    #[test]
    fn garbage_and_truncations_never_panic() {
        let der = cert(&["a.example"]);
        for len in 0..der.len() {
            let _ = Names::of(&der[..len]);
        }
        let mut next = crate::migrate::replay::xorshift(7);
        for _ in 0..2000 {
            let mut d = der.clone();
            let at = (next() as usize) % d.len();
            d[at] ^= (next() as u8) | 1;
            let _ = Names::of(&d);
        }
        assert_eq!(Names::of(b"\x30\x84\xff\xff\xff\xff"), Names::default());
    }

    #[test]
    fn host_specs() {
        let h: HostSpec = "dst,10.0.0.2".parse().expect("spec");
        assert_eq!(h.names, ["dst", "10.0.0.2"]);
        assert_eq!(h.dir_name(), "dst");
        for bad in ["../x", "a/b", "..", ".", "", "a b"] {
            assert!(bad.parse::<HostSpec>().is_err(), "{bad}");
        }
    }
}
