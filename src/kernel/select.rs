//! Which profile describes the guest in memory, one path for `scan` and `pct-migrate`:
//!
//! 1. the one the user named (`--profile`);
//! 2. else the guest's VMCOREINFO note, found in RAM, gives its build-id;
//! 3. a shipped profile or one in the user's cache with that build-id;
//! 4. otherwise a profile built from the guest's own memory (kallsyms + BTF), then cached.
//!
//! The result says where the profile came from, so the tools can say it too.

use super::find_vmcoreinfo;
use super::self_profile::{build_profile_at, SelfProfileError, SelfProfileStats};
use crate::memory::GuestMemory;
use crate::profile::{self, cache, MatchQuality, Profile};
use std::fmt;
use std::path::{Path, PathBuf};

/// Where a selected profile came from.
#[derive(Debug, Clone, serde::Serialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Origin {
    /// Named by the user.
    Given { path: PathBuf },
    /// A shipped profile with the guest's build-id.
    Shipped { path: PathBuf },
    /// Built from this kernel's memory on an earlier run.
    Cached { path: PathBuf },
    /// Built from the guest's memory just now; `cached_at` where it was saved.
    FromMemory {
        cached_at: Option<PathBuf>,
        elapsed_ms: f64,
        /// Why it could not be saved, if it could not.
        #[serde(skip_serializing_if = "Option::is_none")]
        cache_error: Option<String>,
    },
}

impl fmt::Display for Origin {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Origin::Given { path } => write!(f, "{} (given)", path.display()),
            Origin::Shipped { path } => write!(f, "{} (shipped, same build-id)", path.display()),
            Origin::Cached { path } => write!(
                f,
                "{} (cached, built from this kernel's memory on an earlier run)",
                path.display()
            ),
            Origin::FromMemory {
                cached_at,
                elapsed_ms,
                cache_error,
            } => {
                write!(
                    f,
                    "built from the guest's memory (kallsyms and BTF) in {elapsed_ms:.0} ms"
                )?;
                match (cached_at, cache_error) {
                    (Some(p), _) => write!(f, ", cached as {}", p.display()),
                    (None, Some(e)) => write!(f, ", not cached: {e}"),
                    (None, None) => write!(
                        f,
                        ", not cached (no cache directory: set PCT_PROFILE_CACHE)"
                    ),
                }
            }
        }
    }
}

/// A profile and where it came from.
pub struct Selected {
    pub profile: Profile,
    pub origin: Origin,
    /// Set when the profile was built from memory just now.
    pub stats: Option<SelfProfileStats>,
}

/// Why no profile could be had.
#[derive(Debug, thiserror::Error)]
pub enum SelectError {
    #[error("looking for the guest's VMCOREINFO: {0}")]
    Memory(#[from] crate::memory::MemError),
    #[error("loading profile {path}: {msg}")]
    Given { path: PathBuf, msg: String },
    #[error("no profile matches the guest (build-id {build_id}), and building one from its memory failed: {source}")]
    FromMemory {
        build_id: String,
        source: SelfProfileError,
    },
}

/// Where to look; the defaults are the shipped directory and the user's cache.
#[derive(Debug, Clone, Default)]
pub struct Places {
    /// Shipped profiles [default: `profile::profiles_dir()`].
    pub shipped: Option<PathBuf>,
    /// The cache [default: `profile::cache::cache_dir()`].
    pub cache: Option<PathBuf>,
}

/// Picks the profile for the guest in `mem` (see the module comment).
pub fn select_profile(mem: &GuestMemory, given: Option<&Path>) -> Result<Selected, SelectError> {
    select_profile_in(mem, given, &Places::default())
}

/// [`select_profile`] with explicit places to look.
pub fn select_profile_in(
    mem: &GuestMemory,
    given: Option<&Path>,
    places: &Places,
) -> Result<Selected, SelectError> {
    if let Some(path) = given {
        let profile = Profile::load(path).map_err(|e| SelectError::Given {
            path: path.to_owned(),
            msg: e.to_string(),
        })?;
        return Ok(Selected {
            profile,
            origin: Origin::Given {
                path: path.to_owned(),
            },
            stats: None,
        });
    }
    let t0 = std::time::Instant::now();
    let found = find_vmcoreinfo(mem)?;
    let build_id = found
        .as_ref()
        .and_then(|(info, _)| info.build_id())
        .map(str::to_ascii_lowercase);
    let cache_dir = places.cache.clone().or_else(cache::cache_dir);
    if let Some(id) = &build_id {
        if let Some(found) = find_known(id, places, cache_dir.as_deref()) {
            return Ok(found);
        }
    }
    // The note found above is the one the build starts from: RAM is searched once.
    let (profile, stats) = found
        .ok_or(SelfProfileError::NoVmcoreinfo)
        .and_then(|f| build_profile_at(mem, f, None, t0))
        .map_err(|source| SelectError::FromMemory {
            build_id: build_id.clone().unwrap_or_else(|| "unknown".into()),
            source,
        })?;
    let (cached_at, cache_error) = match &cache_dir {
        Some(d) => match cache::store(d, &profile) {
            Ok(p) => (Some(p), None),
            Err(e) => (None, Some(e.to_string())),
        },
        None => (None, None),
    };
    Ok(Selected {
        profile,
        origin: Origin::FromMemory {
            cached_at,
            elapsed_ms: stats.elapsed_ms,
            cache_error,
        },
        stats: Some(stats),
    })
}

/// A shipped or cached profile for build `id`.
fn find_known(id: &str, places: &Places, cache_dir: Option<&Path>) -> Option<Selected> {
    let shipped = places.shipped.clone().unwrap_or_else(profile::profiles_dir);
    if let Ok(Some((path, profile, MatchQuality::BuildId))) =
        profile::find_matching_in(&shipped, id)
    {
        return Some(Selected {
            profile,
            origin: Origin::Shipped { path },
            stats: None,
        });
    }
    let (path, profile) = cache::find_cached(cache_dir?, id)?;
    Some(Selected {
        profile,
        origin: Origin::Cached { path },
        stats: None,
    })
}

/// The shipped or cached profile for build `id` in the default places, for hints.
pub fn known_profile(id: &str) -> Option<PathBuf> {
    let cache = cache::cache_dir();
    match find_known(id, &Places::default(), cache.as_deref())?.origin {
        Origin::Shipped { path } | Origin::Cached { path } => Some(path),
        Origin::Given { .. } | Origin::FromMemory { .. } => None,
    }
}
