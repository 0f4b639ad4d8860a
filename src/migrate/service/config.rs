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

/// One `[[vm]]` table.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VmConfig {
    /// The name senders give (`pct-migrate --vm NAME`).
    pub name: String,
    /// The destination QEMU's QMP socket (QEMU started with `-incoming defer`): pct drives
    /// the incoming migration.
    pub qmp: Option<PathBuf>,
    /// Or where a VM manager's destination QEMU listens for the stream, HOST:PORT.
    pub incoming: Option<String>,
    /// The destination's copy of this VM's disk: every page restored for this VM is read
    /// from it, and only from it.
    pub disk: PathBuf,
    /// raw, qcow2 or auto (the default: qcow2 if the file starts with qcow2's magic; say
    /// raw for an untrusted guest's raw disk).
    #[serde(default)]
    pub disk_format: DiskFormat,
    /// Who may migrate this VM: names from the senders' certificates (common name, DNS
    /// name or IP address), as `pct-migrate keygen` writes them.
    #[serde(default)]
    pub senders: Vec<String>,
}

impl VmConfig {
    /// Its destination QEMU, as the receiver reaches it.
    pub fn qemu(&self) -> DestinationQemu {
        match (&self.qmp, &self.incoming) {
            (Some(p), _) => DestinationQemu::Qmp(p.clone()),
            (None, Some(a)) => DestinationQemu::Incoming(a.clone()),
            // `load` refuses a VM with neither.
            (None, None) => DestinationQemu::Incoming(String::new()),
        }
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
        for vm in &self.vms {
            if !valid_vm_name(&vm.name) {
                bail!(
                    "VM name {:?}: use 1 to {MAX_VM_NAME} letters, digits, `.`, `_` or `-`, not \
                     starting with `.` or `-`",
                    vm.name
                );
            }
            if !names.insert(vm.name.as_str()) {
                bail!("VM `{}` is named twice", vm.name);
            }
            match (&vm.qmp, &vm.incoming) {
                (Some(_), Some(_)) => {
                    bail!("VM `{}`: give `qmp` or `incoming`, not both", vm.name)
                }
                (None, None) => bail!(
                    "VM `{}`: give its destination QEMU, `qmp = \"/path/to/qmp.sock\"` (QEMU \
                     started with -incoming defer) or `incoming = \"HOST:PORT\"` (where a VM \
                     manager's QEMU listens)",
                    vm.name
                ),
                _ => {}
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
            c.vm("web-1").unwrap().qemu(),
            DestinationQemu::Qmp(_)
        ));
        assert!(matches!(
            c.vm("db.2").unwrap().qemu(),
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
                "give its destination QEMU",
            ),
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
