//! The profile: a versioned JSON description of one kernel build, and typed accessors over it.
//!
//! Walkers never look up raw names scattered around the code: they ask a [`Profile`] for the
//! manifest keys (`profile.offset("page", "mapping")`), or use the typed views at the bottom
//! (`PageCacheTree`, `pageflag`). See docs/profile-format.md for the format.

use std::collections::BTreeMap;
use std::path::Path;

use serde::{Deserialize, Serialize};

use super::error::{Error, Result};

/// The `format` tag every profile carries.
pub const FORMAT_TAG: &str = "pct-profile";
/// The profile format version this build reads and writes.
pub const FORMAT_VERSION: u32 = 1;

/// One kernel build's symbols, layouts and enums, restricted to what the manifest asks for.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Profile {
    pub format: String,
    pub version: u32,
    pub kernel: KernelInfo,
    pub source: SourceInfo,
    pub symbols: BTreeMap<String, Symbol>,
    pub types: BTreeMap<String, TypeLayout>,
    pub enums: BTreeMap<String, EnumDef>,
    /// Manifest entries this kernel does not have (or the input did not describe).
    pub absent: Vec<Absent>,
}

/// Identity of the kernel build.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct KernelInfo {
    /// `uname -r`, e.g. `6.1.0-56-cloud-amd64`.
    pub release: Option<String>,
    /// The exact `linux_banner` text (without the trailing NUL).
    pub banner: Option<String>,
    /// GNU build-id of vmlinux, lower-case hex (what VMCOREINFO's `BUILD-ID=` carries).
    pub build_id: Option<String>,
    pub arch: String,
    pub pointer_size: u32,
    pub distribution: Option<String>,
    pub flavour: Option<String>,
}

/// Where the profile came from.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct SourceInfo {
    /// `pct-introspect <version>`.
    pub generator: String,
    /// `btf`, `dwarf`, `btf+dwarf`, `volatility2`, `isf`.
    pub method: String,
    /// Input files (base names) and what was taken from each.
    pub inputs: Vec<String>,
}

/// A kernel symbol (link-time address: add the KASLR offset at run time).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Symbol {
    /// The spelling found, when it differs from the key.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    pub address: u64,
    #[serde(default, skip_serializing_if = "is_zero")]
    pub size: u64,
}

/// A struct or union layout (only the manifest's fields).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TypeLayout {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// `struct` or `union`.
    pub kind: String,
    pub size: u64,
    pub fields: BTreeMap<String, Field>,
}

/// One field, at a byte offset from the start of the outermost struct (anonymous members flattened).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Field {
    /// The member path found, when it differs from the key (`page_tree` for `i_pages`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    pub offset: u64,
    pub size: u64,
    /// C spelling of the type, e.g. `struct list_head`, `void *[64]`.
    #[serde(rename = "type")]
    pub type_name: String,
    /// Element count when the type is an array (0 for a flexible array).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub count: Option<u64>,
    /// Bitfields: bit offset from the start of the struct, and width.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bit_offset: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bit_size: Option<u32>,
}

/// An enumeration with all its enumerators.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EnumDef {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    pub size: u64,
    pub values: BTreeMap<String, i64>,
}

/// A manifest entry the input does not have.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub struct Absent {
    /// `symbol`, `type`, `field`, `enum` or `enumerator`.
    pub kind: String,
    /// Manifest key (`page.first_page` for fields).
    pub key: String,
    /// Spellings that were tried.
    pub tried: Vec<String>,
    /// Set when a required entry is missing (only imported profiles can have this).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub required: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub note: Option<String>,
}

fn is_zero(v: &u64) -> bool {
    *v == 0
}

impl Profile {
    /// An empty profile for `method`.
    pub fn new(method: &str) -> Self {
        Profile {
            format: FORMAT_TAG.to_owned(),
            version: FORMAT_VERSION,
            kernel: KernelInfo {
                arch: "x86_64".to_owned(),
                pointer_size: 8,
                ..Default::default()
            },
            source: SourceInfo {
                generator: format!("pct-introspect {}", env!("CARGO_PKG_VERSION")),
                method: method.to_owned(),
                inputs: Vec::new(),
            },
            symbols: BTreeMap::new(),
            types: BTreeMap::new(),
            enums: BTreeMap::new(),
            absent: Vec::new(),
        }
    }

    /// Parse a profile from JSON text, checking the format tag and version.
    pub fn from_json(text: &str, path: &Path) -> Result<Self> {
        let v: serde_json::Value = serde_json::from_str(text).map_err(|e| Error::Profile {
            path: path.into(),
            msg: e.to_string(),
        })?;
        let tag = v.get("format").and_then(|t| t.as_str());
        let ver = v.get("version").and_then(|t| t.as_u64());
        if tag != Some(FORMAT_TAG) {
            return Err(Error::Profile {
                path: path.into(),
                msg: format!("format tag is {tag:?}, expected \"{FORMAT_TAG}\""),
            });
        }
        if ver != Some(FORMAT_VERSION as u64) {
            return Err(Error::Profile {
                path: path.into(),
                msg: format!(
                    "format version {ver:?} is not supported (this build reads {FORMAT_VERSION})"
                ),
            });
        }
        serde_json::from_value(v).map_err(|e| Error::Profile {
            path: path.into(),
            msg: e.to_string(),
        })
    }

    /// Read a profile file.
    pub fn load(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
        Self::from_json(&text, path)
    }

    /// Pretty JSON, stable key order, trailing newline.
    pub fn to_json(&self) -> String {
        let mut s = serde_json::to_string_pretty(self).unwrap_or_default();
        s.push('\n');
        s
    }

    /// Records manifest symbol `entry`: the first of its spellings that `lookup` finds
    /// (address, size), or an absent entry saying what was tried (`note`: where).
    pub fn record_symbol(
        &mut self,
        entry: &super::manifest::Entry,
        lookup: impl Fn(&str) -> Option<(u64, u64)>,
        note: Option<&str>,
    ) {
        let cands = entry.candidates();
        match cands.iter().find_map(|c| lookup(c).map(|hit| (*c, hit))) {
            Some((name, (address, size))) => {
                self.symbols.insert(
                    entry.key.clone(),
                    Symbol {
                        name: (name != entry.key).then(|| name.to_owned()),
                        address,
                        size,
                    },
                );
            }
            None => self.absent.push(Absent {
                kind: "symbol".into(),
                key: entry.key.clone(),
                tried: cands.iter().map(|c| c.to_string()).collect(),
                required: entry.required,
                note: note.map(str::to_owned),
            }),
        }
    }

    /// Link-time address of a manifest symbol.
    pub fn symbol(&self, key: &str) -> Option<u64> {
        self.symbols.get(key).map(|s| s.address)
    }

    /// Layout of a manifest type.
    pub fn layout(&self, ty: &str) -> Option<&TypeLayout> {
        self.types.get(ty)
    }

    /// `sizeof(struct ty)`.
    pub fn size_of(&self, ty: &str) -> Option<u64> {
        self.types.get(ty).map(|t| t.size)
    }

    /// A field of a manifest type.
    pub fn field(&self, ty: &str, field: &str) -> Option<&Field> {
        self.types.get(ty)?.fields.get(field)
    }

    /// Byte offset of a field.
    pub fn offset(&self, ty: &str, field: &str) -> Option<u64> {
        self.field(ty, field).map(|f| f.offset)
    }

    /// Value of an enumerator of a manifest enum.
    pub fn enum_value(&self, en: &str, name: &str) -> Option<i64> {
        self.enums.get(en)?.values.get(name).copied()
    }

    /// Bit number of a page flag (`PG_dirty`…).
    pub fn pageflag(&self, name: &str) -> Option<u32> {
        self.enum_value("pageflags", name)
            .and_then(|v| u32::try_from(v).ok())
    }

    /// Which page-cache tree this kernel uses.
    pub fn page_cache_tree(&self) -> Option<PageCacheTree> {
        if self.types.contains_key("xa_node") {
            return Some(PageCacheTree::XArray);
        }
        let node = self.types.get("radix_tree_node")?;
        if node.fields.contains_key("shift") {
            Some(PageCacheTree::RadixShift)
        } else if node.fields.contains_key("path") {
            Some(PageCacheTree::RadixPath)
        } else if node.fields.contains_key("height") {
            Some(PageCacheTree::RadixHeight)
        } else {
            None
        }
    }

    /// Number of slots per page-cache tree node (the DWARF array length).
    pub fn tree_slots(&self) -> Option<u64> {
        let ty = match self.page_cache_tree()? {
            PageCacheTree::XArray => "xa_node",
            _ => "radix_tree_node",
        };
        self.field(ty, "slots")?.count
    }
}

/// Page-cache tree generations (docs/design.md, "The page cache").
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PageCacheTree {
    /// Radix tree, nodes carry `height` (< 3.15).
    RadixHeight,
    /// Radix tree, nodes carry `path` (3.15–4.6).
    RadixPath,
    /// Radix tree, nodes carry `shift` (4.7–4.19).
    RadixShift,
    /// XArray (≥ 4.20).
    XArray,
}
