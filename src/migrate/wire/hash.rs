//! The hashes that let the receiver trust a page it read from its own disk: BLAKE3 of the
//! exact bytes, truncated to the session's hash length, per page or per run.

use super::PAGE_SIZE;

/// BLAKE3 of one page, truncated to `len` bytes.
pub fn hash_page(data: &[u8], len: usize) -> Vec<u8> {
    blake3::hash(data).as_bytes()[..len.min(32)].to_vec()
}

/// BLAKE3 of each page, truncated to `len` bytes each, concatenated.
pub fn hash_pages(pages: &[u8], len: usize) -> Vec<u8> {
    pages
        .chunks(PAGE_SIZE)
        .flat_map(|p| hash_page(p, len))
        .collect()
}

/// BLAKE3 of the concatenated pages of a run, truncated to `len` bytes.
pub fn hash_run(pages: &[&[u8]], len: usize) -> Vec<u8> {
    let mut h = blake3::Hasher::new();
    for p in pages {
        h.update(p);
    }
    h.finalize().as_bytes()[..len.min(32)].to_vec()
}
