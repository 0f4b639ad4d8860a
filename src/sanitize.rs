//! Untrusted bytes made safe to print: guest strings (file names, device names, module
//! names) and names read from a migration stream reach terminals and JSON only through
//! [`sanitize`].

/// Printable ASCII kept, everything else (and `\`) escaped as `\xNN`.
pub fn sanitize(raw: &[u8]) -> String {
    let mut s = String::with_capacity(raw.len());
    for &b in raw {
        if (0x20..0x7f).contains(&b) && b != b'\\' {
            s.push(b as char);
        } else {
            s.push_str(&format!("\\x{b:02x}"));
        }
    }
    s
}

#[cfg(test)]
mod tests {
    #[test]
    fn escapes_all_but_printable_ascii() {
        assert_eq!(
            super::sanitize(b"ab c/\x1b[2J\\\xff"),
            "ab c/\\x1b[2J\\x5c\\xff"
        );
    }
}
