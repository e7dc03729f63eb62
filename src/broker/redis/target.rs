//! Where Redis is: the `redis` URL, parsed. (Moving to `crate::config`; this file holds it
//! alone so it can be deleted when that lands.)

/// Where Redis is, parsed from `redis://[user:password@]host:port[/db]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RedisTarget {
    pub host: String,
    pub port: u16,
    pub username: Option<String>,
    pub password: Option<String>,
    pub db: u32,
}

impl RedisTarget {
    /// Parses a Redis URL; the error says what is wrong.
    pub fn parse(text: &str) -> Result<RedisTarget, String> {
        let url = url::Url::parse(text).map_err(|e| format!("is not a URL ({e})"))?;
        if url.scheme() != "redis" {
            return Err("must start with redis:// (TLS is not supported)".into());
        }
        let host = url
            .host_str()
            .filter(|h| !h.is_empty())
            .ok_or("has no host")?
            .trim_start_matches('[')
            .trim_end_matches(']')
            .to_string();
        let db = match url.path().trim_start_matches('/') {
            "" => 0,
            p => p
                .parse()
                .map_err(|_| format!("has a bad database number `{p}`"))?,
        };
        let decode = |s: &str| {
            url::form_urlencoded::parse(format!("x={s}").as_bytes())
                .next()
                .map(|(_, v)| v.to_string())
                .unwrap_or_default()
        };
        Ok(RedisTarget {
            host,
            port: url.port().unwrap_or(6379),
            username: Some(decode(url.username())).filter(|u| !u.is_empty()),
            password: url.password().map(decode),
            db,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls() {
        let t = RedisTarget::parse("redis://127.0.0.1:6380/2").unwrap();
        assert_eq!((t.host.as_str(), t.port, t.db), ("127.0.0.1", 6380, 2));
        assert_eq!((t.username, t.password), (None, None));
        let t = RedisTarget::parse("redis://user:p%40ss@redis.local").unwrap();
        assert_eq!(t.port, 6379);
        assert_eq!(t.username.as_deref(), Some("user"));
        assert_eq!(t.password.as_deref(), Some("p@ss"));
        let t = RedisTarget::parse("redis://:secret@[::1]:7000").unwrap();
        assert_eq!(
            (t.host.as_str(), t.password.as_deref()),
            ("::1", Some("secret"))
        );
        assert!(RedisTarget::parse("rediss://h:1").is_err());
        assert!(RedisTarget::parse("redis://h:1/x").is_err());
        assert!(RedisTarget::parse("not a url").is_err());
    }
}
