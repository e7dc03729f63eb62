//! The `Origin` check of WebSocket upgrades (cross-site WebSocket hijacking): no I/O, run on the
//! shard's thread once per upgrade request, before the 101.
//!
//! Semantics follow Centrifugo's `allowed_origins`: a request without `Origin` (a non-browser
//! client) passes; otherwise the origin passes when its `host[:port]` is the request's own `Host`
//! (the page was served by this node's address), or when it matches one of the configured
//! patterns. A pattern is `*` (any origin) or `scheme://host[:port]` where `*` in the host part
//! matches any run of characters (so `https://*.example.com` matches `https://a.example.com`
//! and `https://a.b.example.com`, not `https://example.com`). Matching ignores ASCII case, as
//! host names do (Centrifugo lowercases the origin only, so its upper-case patterns never match;
//! here they do).

/// Why a configured pattern is refused (the config error names the key and quotes the pattern).
pub fn check_pattern(pattern: &str) -> Result<(), &'static str> {
    if pattern == "*" {
        return Ok(());
    }
    let Some((scheme, authority)) = pattern.split_once("://") else {
        return Err("must be \"*\" or scheme://host[:port]");
    };
    let scheme_ok = !scheme.is_empty()
        && scheme
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'+' || b == b'-' || b == b'.');
    if !scheme_ok {
        return Err("needs a scheme of letters and digits (no `*`), as in https://host");
    }
    if authority.is_empty()
        || authority
            .bytes()
            .any(|b| matches!(b, b'/' | b'?' | b'#' | b'@') || b.is_ascii_whitespace())
    {
        return Err("must be scheme://host[:port] with no path, query or user part");
    }
    let (_, port) = split_port(authority);
    if port.is_some_and(|p| p.is_empty() || !p.bytes().all(|b| b.is_ascii_digit())) {
        return Err("has a port that is not a number (`*` is allowed in the host part only)");
    }
    Ok(())
}

/// `host[:port]` → (host, port); an IPv6 host is bracketed.
fn split_port(authority: &str) -> (&str, Option<&str>) {
    let host_end = if authority.starts_with('[') {
        authority.find(']').map_or(authority.len(), |i| i + 1)
    } else {
        0
    };
    match authority[host_end..].rfind(':') {
        Some(i) => (
            &authority[..host_end + i],
            Some(&authority[host_end + i + 1..]),
        ),
        None => (authority, None),
    }
}

/// Whether an upgrade carrying `origin` (the header's value) may proceed, given the request's
/// `Host` and the configured patterns.
pub fn allowed(origin: &str, host: Option<&str>, patterns: &[String]) -> bool {
    let origin = origin.trim();
    if same_host(origin, host) {
        return true;
    }
    patterns
        .iter()
        .any(|p| p == "*" || super::glob_match_ignore_case(p, origin))
}

/// The origin's `host[:port]` is the request's `Host` (ASCII case ignored).
fn same_host(origin: &str, host: Option<&str>) -> bool {
    let (Some((_, authority)), Some(host)) = (origin.split_once("://"), host) else {
        return false;
    };
    !authority.is_empty()
        && !authority.contains(['/', '@'])
        && authority.eq_ignore_ascii_case(host.trim())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pats(list: &[&str]) -> Vec<String> {
        list.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn no_pattern_allows_only_the_same_host() {
        let none = pats(&[]);
        assert!(allowed(
            "http://127.0.0.1:8000",
            Some("127.0.0.1:8000"),
            &none
        ));
        assert!(allowed(
            "https://Chat.Example.com",
            Some("chat.example.com"),
            &none
        ));
        assert!(!allowed(
            "http://127.0.0.1:8001",
            Some("127.0.0.1:8000"),
            &none
        ));
        assert!(!allowed(
            "https://evil.com",
            Some("chat.example.com"),
            &none
        ));
        assert!(!allowed("https://evil.com", None, &none));
        assert!(!allowed("null", Some("chat.example.com"), &none));
        // Userinfo tricks are no same host.
        assert!(!allowed(
            "https://chat.example.com@evil.com",
            Some("chat.example.com@evil.com"),
            &none
        ));
    }

    #[test]
    fn patterns_match_like_centrifugo() {
        let p = pats(&["https://*.example.com", "http://localhost:3000"]);
        assert!(allowed("https://foo.example.com", Some("node"), &p));
        assert!(allowed("https://two.Example.com", Some("node"), &p));
        assert!(allowed("https://a.b.example.com", Some("node"), &p));
        assert!(allowed("http://localhost:3000", Some("node"), &p));
        assert!(!allowed("https://example.com", Some("node"), &p));
        assert!(!allowed("http://foo.example.com", Some("node"), &p));
        assert!(!allowed(
            "https://foo.example.com.evil.com",
            Some("node"),
            &p
        ));
        assert!(!allowed("https://fooexample.com", Some("node"), &p));
        assert!(!allowed("http://localhost:3001", Some("node"), &p));
        // A Cyrillic "е" is not an "e".
        assert!(!allowed("https://two.еxample.com", Some("node"), &p));
        // Upper case in a pattern still matches (host names ignore case).
        assert!(allowed(
            "https://app.example.org",
            Some("node"),
            &pats(&["https://APP.example.org"])
        ));
        let any = pats(&["*"]);
        assert!(allowed("https://anything.test", Some("node"), &any));
        assert!(allowed("null", Some("node"), &any));
    }

    #[test]
    fn patterns_are_checked() {
        for ok in [
            "*",
            "https://example.com",
            "https://*.example.com",
            "http://localhost:3000",
            "http://[::1]:8000",
            "http://*:8000",
        ] {
            assert_eq!(check_pattern(ok), Ok(()), "{ok}");
        }
        for bad in [
            "",
            "example.com",
            "*.example.com",
            "*://example.com",
            "https://",
            "https://example.com/",
            "https://example.com/path",
            "https://user@example.com",
            "https://example.com:*",
            "https://example.com:80a",
        ] {
            assert!(check_pattern(bad).is_err(), "{bad}");
        }
    }
}
