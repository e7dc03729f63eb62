//! The benches' command line: `--key value`, `--key=value` and `--flag`, with a typed default
//! per key and a clear exit on a bad value, plus the options several benches share
//! (`--client-cpus`, a connection count held under the file-descriptor limit).

use super::safety::fatal;
use std::collections::HashMap;
use std::str::FromStr;

/// Parsed arguments. Unknown arguments such as the `--bench` that `cargo bench` appends are
/// accepted and ignored.
pub struct Args {
    map: HashMap<String, String>,
}

impl Args {
    /// Parses the process arguments; `None` after printing `usage` when `--help` is given.
    pub fn parse_or_help(usage: &str) -> Option<Args> {
        let args = Args::parse();
        if args.has("help") {
            println!("{usage}");
            return None;
        }
        Some(args)
    }

    fn parse() -> Args {
        let argv: Vec<String> = std::env::args().skip(1).collect();
        let mut map = HashMap::new();
        let mut i = 0;
        while i < argv.len() {
            let a = &argv[i];
            if let Some(k) = a.strip_prefix("--") {
                if let Some((k, v)) = k.split_once('=') {
                    map.insert(k.to_string(), v.to_string());
                } else if i + 1 < argv.len() && !argv[i + 1].starts_with("--") {
                    map.insert(k.to_string(), argv[i + 1].clone());
                    i += 1;
                } else {
                    map.insert(k.to_string(), "true".to_string());
                }
            }
            i += 1;
        }
        Args { map }
    }

    pub fn has(&self, k: &str) -> bool {
        self.map.contains_key(k)
    }

    pub fn str(&self, k: &str) -> Option<String> {
        self.map.get(k).cloned()
    }

    pub fn get<T: FromStr>(&self, k: &str, default: T) -> T {
        match self.map.get(k) {
            None => default,
            Some(v) => match v.parse() {
                Ok(x) => x,
                Err(_) => fatal(&format!("bad value for --{k}: {v:?}")),
            },
        }
    }

    /// `--server-args "--foo 1 --bar"` split on whitespace.
    pub fn server_args(&self) -> Vec<String> {
        self.str("server-args")
            .map(|s| s.split_whitespace().map(str::to_string).collect())
            .unwrap_or_default()
    }
}

/// How many connections `--<key>` asks for (default `default`, else the limit), held at most at
/// the RLIMIT_NOFILE hard limit `hard` minus `--margin` (default 300), saying so on stderr.
/// Returns (count, margin).
#[allow(
    dead_code,
    reason = "fanout refuses a count over the limit instead of lowering it"
)]
pub fn conns_under_nofile(
    args: &Args,
    key: &str,
    default: Option<usize>,
    hard: u64,
) -> (usize, u64) {
    let margin: u64 = args.get("margin", 300u64);
    let max = hard.saturating_sub(margin) as usize;
    let n: usize = args.get(key, default.unwrap_or(max));
    if n > max {
        eprintln!(
            "# --{key} {n} exceeds RLIMIT_NOFILE hard limit {hard} - margin {margin}; using {max}"
        );
        return (max, margin);
    }
    (n, margin)
}
