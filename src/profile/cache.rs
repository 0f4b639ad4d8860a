//! Where profiles live besides the shipped ones: the per-user cache of profiles that pct
//! built itself (from guest memory), one file per kernel build, named by its build-id.
//!
//! The directory is `$PCT_PROFILE_CACHE`, else `$XDG_CACHE_HOME/pct/profiles`, else
//! `~/.cache/pct/profiles`. Files are written whole (a temporary file renamed into place),
//! so concurrent writers of the same build never leave a torn profile.

use std::path::{Path, PathBuf};

use super::error::{Error, Result};
use super::model::Profile;

/// The per-user profile cache directory, if one can be named.
pub fn cache_dir() -> Option<PathBuf> {
    if let Some(d) = std::env::var_os("PCT_PROFILE_CACHE").filter(|d| !d.is_empty()) {
        return Some(PathBuf::from(d));
    }
    if let Some(d) = std::env::var_os("XDG_CACHE_HOME").filter(|d| !d.is_empty()) {
        return Some(Path::new(&d).join("pct/profiles"));
    }
    std::env::var_os("HOME")
        .filter(|d| !d.is_empty())
        .map(|h| Path::new(&h).join(".cache/pct/profiles"))
}

/// Whether `id` looks like a GNU build-id (hex); anything else never names a cache file.
fn valid_build_id(id: &str) -> bool {
    (16..=128).contains(&id.len()) && id.bytes().all(|b| b.is_ascii_hexdigit())
}

/// The cache file for build-id `id` in `dir`.
pub fn cache_path(dir: &Path, build_id: &str) -> Option<PathBuf> {
    valid_build_id(build_id).then(|| dir.join(format!("{}.json", build_id.to_ascii_lowercase())))
}

/// The cached profile of build `build_id` in `dir`, if there is one that really is for it.
pub fn find_cached(dir: &Path, build_id: &str) -> Option<(PathBuf, Profile)> {
    let path = cache_path(dir, build_id)?;
    let p = Profile::load(&path).ok()?;
    p.kernel
        .build_id
        .as_deref()
        .is_some_and(|b| b.eq_ignore_ascii_case(build_id))
        .then_some((path, p))
}

/// Writes `profile` into `dir` under its build-id; returns the path.
pub fn store(dir: &Path, profile: &Profile) -> Result<PathBuf> {
    let id = profile.kernel.build_id.as_deref().unwrap_or_default();
    let path = cache_path(dir, id)
        .ok_or_else(|| Error::bad(dir, "a profile without a build-id cannot be cached"))?;
    std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
    // Unique per process and call: concurrent writers never share a temporary file.
    static SEQ: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let seq = SEQ.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let tmp = dir.join(format!(".{}.{}.{seq}.tmp", id, std::process::id()));
    std::fs::write(&tmp, profile.to_json()).map_err(|e| Error::io(&tmp, e))?;
    std::fs::rename(&tmp, &path).map_err(|e| {
        let _ = std::fs::remove_file(&tmp);
        Error::io(&path, e)
    })?;
    Ok(path)
}
