//! Patterns users configure or send: the `*` glob of channel names (`/api/channels`) and the
//! `allowed_origins` patterns of WebSocket upgrades ([`origin`]). Pure string matching, no
//! state, nothing beneath it; used by the config's validation, the shards, the broker and the
//! HTTP handshake alike.

pub mod origin;

/// A simple `*` glob (the `pattern` of `/api/channels`): `*` matches any run of characters,
/// case-sensitively.
pub fn glob_match(pattern: &str, text: &str) -> bool {
    glob(pattern.as_bytes(), text.as_bytes(), |a, b| a == b)
}

/// The same glob with ASCII case ignored (host names).
pub fn glob_match_ignore_case(pattern: &str, text: &str) -> bool {
    glob(pattern.as_bytes(), text.as_bytes(), |a, b| {
        a.eq_ignore_ascii_case(&b)
    })
}

/// `*` matches any run of bytes (including none); every other byte matches what `same` says.
/// Iterative with one backtrack point, so linear-ish and never recursive.
fn glob(pattern: &[u8], text: &[u8], same: impl Fn(u8, u8) -> bool) -> bool {
    let (mut p, mut t) = (0, 0);
    let mut star: Option<(usize, usize)> = None;
    while t < text.len() {
        if p < pattern.len() && pattern[p] == b'*' {
            star = Some((p, t));
            p += 1;
        } else if p < pattern.len() && same(pattern[p], text[t]) {
            p += 1;
            t += 1;
        } else if let Some((sp, st)) = star {
            // Let the last `*` swallow one more byte and retry from there.
            p = sp + 1;
            t = st + 1;
            star = Some((sp, st + 1));
        } else {
            return false;
        }
    }
    pattern[p..].iter().all(|&b| b == b'*')
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn glob_backtracks() {
        for g in [glob_match, glob_match_ignore_case] {
            assert!(g("a*b*c", "axxbyyc"));
            assert!(g("a*c", "abcbc"));
            assert!(!g("a*c", "abcb"));
            assert!(g("**", ""));
            assert!(!g("", "x"));
            assert!(g("news:*", "news:sport"));
            assert!(!g("news:*", "chat:1"));
        }
    }

    #[test]
    fn case_is_ignored_only_when_asked() {
        assert!(!glob_match(
            "https://*.Example.com",
            "https://a.example.com"
        ));
        assert!(glob_match_ignore_case(
            "https://*.Example.com",
            "https://a.example.com"
        ));
    }
}
