//! Wall-clock time for the few things that are defined in it (token `exp`, presence stamps).
//!
//! Everything else in a shard runs on its own monotonic ticks (the timer wheel); this module
//! exists so that any layer can read the Unix time without importing the shard.

/// Seconds since the Unix epoch (0 if the system clock is before it).
pub fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}
