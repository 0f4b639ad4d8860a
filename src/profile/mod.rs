//! Kernel profiles: which symbols, struct layouts and enum values a guest kernel has.
//!
//! A profile is built once per kernel build from its vmlinux (`build`), or imported from a
//! Volatility 2 profile (`vol2`) or a Volatility 3 ISF (`isf`), always restricted to what the
//! manifest (`symbols/manifest.toml`, see `manifest`) asks for. Walkers read the typed
//! [`Profile`]; [`find_matching`] picks the shipped profile for a memory image by build-id or
//! banner.
//!
//! Readers: `elf` (symbols, banner, build-id), `btf` (hand-written `.BTF` parser), `dwarf`
//! (gimli, indexed), `vol2` (dwarfdump text + System.map), `isf` (JSON); `types` is the one
//! resolver they all feed.

pub mod btf;
pub mod build;
pub mod cache;
pub mod dwarf;
pub mod elf;
pub mod error;
pub mod isf;
pub mod manifest;
pub mod model;
pub mod oldflags;
pub mod types;
pub mod vol2;

use std::path::{Path, PathBuf};

pub use build::{build_profile, default_file_name, BuildOptions, DebugFormat};
pub use error::{Error, Result};
pub use manifest::Manifest;
pub use model::{Field, PageCacheTree, Profile, TypeLayout};

/// `(version, patchlevel, sublevel)` of a kernel release such as `6.1.0-57-amd64`.
pub fn kernel_version(release: &str) -> Option<(u32, u32, u32)> {
    let mut it = release.split(|c: char| !c.is_ascii_digit());
    let mut next = || it.next()?.parse().ok();
    Some((next()?, next()?, next()?))
}

/// Directory holding shipped profiles: `$PCT_PROFILES`, else the source tree's `profiles/`.
pub fn profiles_dir() -> PathBuf {
    std::env::var_os("PCT_PROFILES")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("profiles"))
}

/// Every profile in `dir` (sorted by file name); unreadable files are reported as errors.
pub fn list_profiles(dir: &Path) -> Result<Vec<(PathBuf, Result<Profile>)>> {
    let rd = std::fs::read_dir(dir).map_err(|e| Error::io(dir, e))?;
    let mut paths: Vec<PathBuf> = rd
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "json"))
        .collect();
    paths.sort();
    Ok(paths
        .into_iter()
        .map(|p| {
            let r = Profile::load(&p);
            (p, r)
        })
        .collect())
}

/// How well a profile matched.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum MatchQuality {
    /// Same `uname -r` only (a rebuilt kernel of the same release could differ).
    Release,
    /// Identical `linux_banner` (release, build number, compiler and date).
    Banner,
    /// Identical GNU build-id: the very same vmlinux.
    BuildId,
}

/// Does `p` match `key` (a build-id in hex, or a banner as found in memory)?
pub fn match_profile(p: &Profile, key: &str) -> Option<MatchQuality> {
    let key = key.trim_matches(|c: char| c == '\0' || c.is_whitespace());
    if key.len() >= 16 && key.chars().all(|c| c.is_ascii_hexdigit()) {
        return (p.kernel.build_id.as_deref() == Some(&key.to_ascii_lowercase()))
            .then_some(MatchQuality::BuildId);
    }
    if let Some(b) = &p.kernel.banner {
        if b.trim_end() == key {
            return Some(MatchQuality::Banner);
        }
    }
    let release = key
        .strip_prefix("Linux version ")
        .and_then(|r| r.split_whitespace().next())
        .unwrap_or(key);
    (p.kernel.release.as_deref() == Some(release)).then_some(MatchQuality::Release)
}

/// Pick the best shipped profile for a memory image, given its build-id (VMCOREINFO
/// `BUILD-ID=`) or its `linux_banner` text.
pub fn find_matching(banner_or_buildid: &str) -> Result<Option<(PathBuf, Profile, MatchQuality)>> {
    find_matching_in(&profiles_dir(), banner_or_buildid)
}

/// [`find_matching`] over the profiles in `dir`.
pub fn find_matching_in(
    dir: &Path,
    banner_or_buildid: &str,
) -> Result<Option<(PathBuf, Profile, MatchQuality)>> {
    let mut best: Option<(PathBuf, Profile, MatchQuality)> = None;
    for (path, p) in list_profiles(dir)? {
        let Ok(p) = p else { continue };
        if let Some(q) = match_profile(&p, banner_or_buildid) {
            if best.as_ref().is_none_or(|b| q > b.2) {
                best = Some((path, p, q));
            }
        }
    }
    Ok(best)
}

/// Build or import a profile from whatever `input` is: a Volatility 2 profile (zip), a
/// Volatility 3 ISF (JSON, optionally xz-compressed), or a vmlinux.
pub fn import_any(input: &Path, opts: &BuildOptions) -> Result<Profile> {
    let mut head = [0u8; 8];
    let n = {
        use std::io::Read;
        let mut f = std::fs::File::open(input).map_err(|e| Error::io(input, e))?;
        f.read(&mut head).map_err(|e| Error::io(input, e))?
    };
    let head = &head[..n];
    if head.starts_with(b"PK\x03\x04") {
        return vol2::import_zip(input);
    }
    if head.starts_with(b"\xfd7zXZ\x00") || head.first() == Some(&b'{') {
        return isf::import_file(input);
    }
    build_profile(input, opts)
}
