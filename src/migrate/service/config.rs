//! The receiver service's configuration file (TOML): where it listens, how the link is
//! protected, and each VM it may feed — its name, its destination QEMU, its disk, and the
//! senders allowed to migrate it. Checked whole before the service starts.

use crate::disk::DiskFormat;
use crate::migrate::destination::DestinationQemu;
use crate::migrate::wire::{valid_vm_name, MAX_VM_NAME};
use anyhow::{bail, Context, Result};
use serde::Deserialize;
use std::collections::HashSet;
use std::path::{Path, PathBuf};

/// The whole file.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServiceConfig {
    /// HOST:PORT to listen on for senders.
    pub listen: String,
    /// This host's TLS directory (ca.pem, cert.pem, key.pem), as `--tls-dir`.
    pub tls_dir: Option<PathBuf>,
    /// No TLS (a lab network only): any sender may then migrate any VM.
    #[serde(default)]
    pub insecure_plaintext: bool,
    /// Seconds a sender may take from its connection to its hello.
    #[serde(default = "default_hello_timeout")]
    pub hello_timeout_s: u64,
    /// The VMs, as `[[vm]]` tables.
    #[serde(rename = "vm", default)]
    pub vms: Vec<VmConfig>,
}

fn default_hello_timeout() -> u64 {
    30
}

/// One `[[vm]]` table, checked on its own (its name, and exactly one destination QEMU).
#[derive(Debug, Clone, Deserialize)]
#[serde(try_from = "RawVm")]
pub struct VmConfig {
    /// The name senders give (`pct-migrate --vm NAME`).
    pub name: String,
    /// Its destination QEMU, as the receiver reaches it: in the table, either
    /// `qmp = "/path/to/qmp.sock"` (QEMU started with `-incoming defer`: pct drives the
    /// incoming migration, [`DestinationQemu::Qmp`]) or `incoming = "HOST:PORT"` (where a
    /// VM manager's destination QEMU listens for the stream, [`DestinationQemu::Incoming`]).
    pub qemu: DestinationQemu,
    /// The destination's copy of this VM's disk: every page restored for this VM is read
    /// from it, and only from it.
    pub disk: PathBuf,
    /// raw, qcow2 or auto (the default: qcow2 if the file starts with qcow2's magic; say
    /// raw for an untrusted guest's raw disk).
    pub disk_format: DiskFormat,
    /// Who may migrate this VM: names from the senders' certificates (common name, DNS
    /// name or IP address), as `pct-migrate keygen` writes them.
    pub senders: Vec<String>,
}

/// A `[[vm]]` table as written, before [`VmConfig`] checks it.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawVm {
    name: String,
    qmp: Option<PathBuf>,
    incoming: Option<String>,
    disk: PathBuf,
    #[serde(default)]
    disk_format: DiskFormat,
    #[serde(default)]
    senders: Vec<String>,
}

impl TryFrom<RawVm> for VmConfig {
    type Error = String;

    fn try_from(raw: RawVm) -> Result<VmConfig, String> {
        if !valid_vm_name(&raw.name) {
            return Err(format!(
                "VM name {:?}: use 1 to {MAX_VM_NAME} letters, digits, `.`, `_` or `-`, not \
                 starting with `.` or `-`",
                raw.name
            ));
        }
        let qemu = match (raw.qmp, raw.incoming) {
            (Some(p), None) => DestinationQemu::Qmp(p),
            (None, Some(a)) => DestinationQemu::Incoming(a),
            (Some(_), Some(_)) => {
                return Err(format!(
                    "VM `{}`: give `qmp` or `incoming`, not both",
                    raw.name
                ))
            }
            (None, None) => {
                return Err(format!(
                    "VM `{}`: give its destination QEMU, `qmp = \"/path/to/qmp.sock\"` (QEMU \
                     started with -incoming defer) or `incoming = \"HOST:PORT\"` (where a VM \
                     manager's QEMU listens)",
                    raw.name
                ))
            }
        };
        Ok(VmConfig {
            name: raw.name,
            qemu,
            disk: raw.disk,
            disk_format: raw.disk_format,
            senders: raw.senders,
        })
    }
}

impl ServiceConfig {
    /// Reads and checks `path`.
    pub fn load(path: &Path) -> Result<ServiceConfig> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("reading the receiver's configuration {}", path.display()))?;
        Self::parse(&text).with_context(|| format!("in {}", path.display()))
    }

    /// Parses and checks a configuration's text.
    pub fn parse(text: &str) -> Result<ServiceConfig> {
        let cfg: ServiceConfig = toml::from_str(text)?;
        cfg.check()?;
        Ok(cfg)
    }

    fn check(&self) -> Result<()> {
        if self.vms.is_empty() {
            bail!("no [[vm]] table: name at least one VM this receiver may feed");
        }
        let mut names = HashSet::new();
        // Each VM's name and destination QEMU are checked as its table is read (`RawVm`).
        for vm in &self.vms {
            if !names.insert(vm.name.as_str()) {
                bail!("VM `{}` is named twice", vm.name);
            }
            if vm.senders.is_empty() && !self.insecure_plaintext {
                bail!(
                    "VM `{}`: no `senders`: name the certificates that may migrate it, e.g. \
                     senders = [\"src-host\"]",
                    vm.name
                );
            }
        }
        if self.tls_dir.is_some() && self.insecure_plaintext {
            bail!("`tls_dir` and `insecure_plaintext` exclude each other");
        }
        Ok(())
    }

    /// The VM named `name`.
    pub fn vm(&self, name: &str) -> Option<&VmConfig> {
        self.vms.iter().find(|v| v.name == name)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = r#"
listen = "0.0.0.0:7400"
tls_dir = "/etc/pct/tls/dst"

[[vm]]
name = "web-1"
qmp = "/run/pct/web-1.qmp"
disk = "/var/lib/images/web-1.qcow2"
senders = ["src-a"]

[[vm]]
name = "db.2"
incoming = "127.0.0.1:49152"
disk = "/dev/vg0/db2"
disk_format = "raw"
senders = ["src-a", "10.0.0.5"]
"#;

    #[test]
    fn a_good_file() {
        let c = ServiceConfig::parse(GOOD).unwrap();
        assert_eq!(c.vms.len(), 2);
        assert!(matches!(
            c.vm("web-1").unwrap().qemu,
            DestinationQemu::Qmp(_)
        ));
        assert!(matches!(
            c.vm("db.2").unwrap().qemu,
            DestinationQemu::Incoming(_)
        ));
        assert_eq!(c.vm("db.2").unwrap().disk_format, DiskFormat::Raw);
        assert_eq!(c.hello_timeout_s, 30);
        assert!(c.vm("nope").is_none());
    }

    #[test]
    fn mistakes_are_named() {
        let cases = [
            (GOOD.replace("db.2", "web-1"), "named twice"),
            (GOOD.replace("db.2", "../etc"), "VM name"),
            (
                GOOD.replace("incoming = \"127.0.0.1:49152\"\n", ""),
                "VM `db.2`: give its destination QEMU, `qmp = ",
            ),
            (
                GOOD.replace(
                    "name = \"db.2\"\n",
                    "name = \"db.2\"\nqmp = \"/run/db.qmp\"\n",
                ),
                "VM `db.2`: give `qmp` or `incoming`, not both",
            ),
            (GOOD.replace("disk_format", "disk_fromat"), "unknown field"),
            (
                GOOD.replace("\"raw\"", "\"vmdk\""),
                "unknown variant `vmdk`",
            ),
            (GOOD.replace("senders = [\"src-a\"]", ""), "no `senders`"),
            (GOOD.replace("listen", "listne"), "unknown field"),
            (
                GOOD.replace("tls_dir", "insecure_plaintext = true\ntls_dir"),
                "exclude each other",
            ),
            ("listen = \"x:1\"\n".into(), "no [[vm]]"),
        ];
        for (text, want) in cases {
            let e = format!("{:#}", ServiceConfig::parse(&text).unwrap_err());
            assert!(e.contains(want), "{want:?} not in {e:?}");
        }
    }
}
