//! Volatility 3 ISF import and export.
use std::path::Path;

use super::error::{Error, Result};
use super::model::Profile;

/// Import an ISF file (`.json` or `.json.xz`).
pub fn import_file(path: &Path) -> Result<Profile> {
    Err(Error::bad(path, "ISF import not implemented yet"))
}

/// Export a profile as ISF JSON text.
pub fn export(_p: &Profile) -> String {
    String::new()
}
