//! The guest's own view of its page cache, as `pct-oracle` (tools/lab/guest) reports it.

/// /proc/kpageflags bits (include/uapi/linux/kernel-page-flags.h).
pub mod kpf {
    pub const LOCKED: u64 = 1 << 0;
    pub const UPTODATE: u64 = 1 << 3;
    pub const DIRTY: u64 = 1 << 4;
    pub const WRITEBACK: u64 = 1 << 8;
    pub const ANON: u64 = 1 << 12;
    pub const SWAPBACKED: u64 = 1 << 14;
}

#[derive(Debug, Clone)]
pub struct OraclePage {
    pub index: u64,
    pub pfn: u64,
    pub flags: u64,
}

impl OraclePage {
    /// Clean, up to date, disk-backed page cache: what pct should find.
    pub fn is_clean_file_page(&self) -> bool {
        use kpf::*;
        self.flags & UPTODATE != 0
            && self.flags & (DIRTY | WRITEBACK | LOCKED | ANON | SWAPBACKED) == 0
    }
}

#[derive(Debug, Clone)]
pub struct OracleFile {
    pub dev: (u32, u32),
    pub ino: u64,
    pub size: u64,
    pub path: String,
    pub pages: Vec<OraclePage>,
}

#[derive(Debug, Default)]
pub struct Oracle {
    pub files: Vec<OracleFile>,
}

impl Oracle {
    pub fn parse(raw: &[u8]) -> Result<Oracle, String> {
        let end = raw
            .iter()
            .position(|&b| b == 0)
            .ok_or("no NUL terminator")?;
        let text = std::str::from_utf8(&raw[..end]).map_err(|e| e.to_string())?;
        let mut lines = text.lines();
        if lines.next() != Some("PCT-ORACLE 1") {
            return Err("missing PCT-ORACLE 1 header".into());
        }
        let mut o = Oracle::default();
        let mut ended = false;
        for line in lines {
            let mut w = line.splitn(5, ' ');
            match w.next() {
                Some("F") => {
                    let dev = w.next().ok_or("F: dev")?;
                    let (ma, mi) = dev.split_once(':').ok_or("F: dev")?;
                    o.files.push(OracleFile {
                        dev: (
                            ma.parse().map_err(|_| "dev")?,
                            mi.parse().map_err(|_| "dev")?,
                        ),
                        ino: w.next().ok_or("ino")?.parse().map_err(|_| "ino")?,
                        size: w.next().ok_or("size")?.parse().map_err(|_| "size")?,
                        path: w.next().ok_or("path")?.to_owned(),
                        pages: Vec::new(),
                    });
                }
                Some("P") => {
                    let f = o.files.last_mut().ok_or("P before F")?;
                    f.pages.push(OraclePage {
                        index: w.next().ok_or("idx")?.parse().map_err(|_| "idx")?,
                        pfn: w.next().ok_or("pfn")?.parse().map_err(|_| "pfn")?,
                        flags: u64::from_str_radix(w.next().ok_or("flags")?, 16)
                            .map_err(|_| "flags")?,
                    });
                }
                Some("END") => ended = true,
                _ => return Err(format!("bad line {line:?}")),
            }
        }
        if !ended {
            return Err("no END line (truncated?)".into());
        }
        Ok(o)
    }

    pub fn file(&self, path: &str) -> Option<&OracleFile> {
        self.files.iter().find(|f| f.path == path)
    }
}
