//! Volatility 2 Linux profile import (zip: `module.dwarf` dwarfdump text + `System.map`).
use std::path::Path;

use super::error::{Error, Result};
use super::model::Profile;

/// Import a Volatility 2 profile zip.
pub fn import_zip(path: &Path) -> Result<Profile> {
    Err(Error::bad(path, "Volatility 2 import not implemented yet"))
}
