//! How pct's errors read on a terminal: the outermost context first, then each cause, each
//! said once. Error types that name their cause in their own message (`"opening {path}:
//! {source}"`) and also return it as their source would otherwise print it twice.

/// `e` and its causes, joined by `: `, skipping a cause whose text the message already ends
/// with.
pub fn chain_text(e: &anyhow::Error) -> String {
    let mut text = String::new();
    for cause in e.chain() {
        let part = cause.to_string();
        if text.is_empty() {
            text = part;
        } else if !text.ends_with(&part) {
            text.push_str(": ");
            text.push_str(&part);
        }
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, thiserror::Error)]
    #[error("opening {path}: {source}")]
    struct Open {
        path: &'static str,
        source: std::io::Error,
    }

    #[test]
    fn each_cause_once() {
        let io = std::io::Error::new(std::io::ErrorKind::NotFound, "no such file");
        let e = anyhow::Error::new(Open {
            path: "/x",
            source: io,
        })
        .context("the disk");
        assert_eq!(chain_text(&e), "the disk: opening /x: no such file");
        let plain = anyhow::anyhow!("a").context("b");
        assert_eq!(chain_text(&plain), "b: a");
    }
}
