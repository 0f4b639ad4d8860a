//! The symbol manifest (`symbols/manifest.toml`): what the introspector needs from a kernel.
//!
//! The manifest is data, embedded at build time; extraction code iterates over it and never
//! names kernel structures itself.

use serde::Deserialize;

use super::error::{Error, Result};

/// The manifest text shipped in the binary.
pub const MANIFEST_TOML: &str = include_str!("../../symbols/manifest.toml");

/// One needed item, with the spellings different kernels use.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Entry {
    /// The name walkers use.
    pub key: String,
    /// Spellings to try, newest first; defaults to `[key]`.
    #[serde(default)]
    pub names: Vec<String>,
    #[serde(default)]
    pub required: bool,
}

/// The spellings to try for an entry: its `names` in order, or just its key.
fn candidates<'a>(key: &'a str, names: &'a [String]) -> Vec<&'a str> {
    if names.is_empty() {
        vec![key]
    } else {
        names.iter().map(String::as_str).collect()
    }
}

impl Entry {
    /// The spellings to try, in order.
    pub fn candidates(&self) -> Vec<&str> {
        candidates(&self.key, &self.names)
    }
}

/// A struct or union and the fields needed from it.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TypeEntry {
    pub key: String,
    #[serde(default)]
    pub names: Vec<String>,
    #[serde(default)]
    pub required: bool,
    #[serde(default)]
    pub fields: Vec<Entry>,
}

impl TypeEntry {
    pub fn candidates(&self) -> Vec<&str> {
        candidates(&self.key, &self.names)
    }
}

/// An enumeration; all its enumerators are recorded, `values` must be among them.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EnumEntry {
    pub key: String,
    #[serde(default)]
    pub names: Vec<String>,
    #[serde(default)]
    pub required: bool,
    #[serde(default)]
    pub values: Vec<String>,
}

impl EnumEntry {
    pub fn candidates(&self) -> Vec<&str> {
        candidates(&self.key, &self.names)
    }
}

/// The whole manifest.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Manifest {
    pub version: u32,
    #[serde(default, rename = "symbol")]
    pub symbols: Vec<Entry>,
    #[serde(default, rename = "type")]
    pub types: Vec<TypeEntry>,
    #[serde(default, rename = "enum")]
    pub enums: Vec<EnumEntry>,
}

impl Manifest {
    /// Parse a manifest from TOML text.
    pub fn parse(text: &str) -> Result<Self> {
        let m: Manifest = toml::from_str(text).map_err(|e| Error::Manifest(e.to_string()))?;
        if m.version != 1 {
            return Err(Error::Manifest(format!(
                "manifest version {} is not supported (expected 1)",
                m.version
            )));
        }
        Ok(m)
    }

    /// The manifest embedded in this build.
    pub fn builtin() -> Self {
        // The embedded text is checked by the `manifest_parses` unit test.
        Self::parse(MANIFEST_TOML).expect("embedded symbols/manifest.toml is valid")
    }

    /// Every struct/union/enum name any entry may resolve to.
    pub fn wanted_type_names(&self) -> Vec<String> {
        let mut v: Vec<String> = Vec::new();
        for t in &self.types {
            v.extend(t.candidates().into_iter().map(str::to_owned));
        }
        for e in &self.enums {
            v.extend(e.candidates().into_iter().map(str::to_owned));
        }
        v.sort();
        v.dedup();
        v
    }

    /// Every symbol name any entry may resolve to.
    pub fn wanted_symbol_names(&self) -> Vec<&str> {
        self.symbols.iter().flat_map(|s| s.candidates()).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn manifest_parses() {
        let m = Manifest::builtin();
        assert!(m.types.iter().any(|t| t.key == "page"));
        assert!(m.symbols.iter().any(|s| s.key == "init_task"));
    }
}
