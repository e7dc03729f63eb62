//! The internal listener (`metrics_listen`, loopback by default): Prometheus metrics at
//! `/metrics`, a live status page at `/status` and its data at `/status.json`.
//!
//! Runs on its own small thread (`shardcast-metrics`) with blocking sockets: it serves a few
//! scrapes a minute and must never touch a shard. Shards count in plain cells on their hot path
//! and publish a snapshot once a second ([`ShardSnapshot`], in [`crate::bus`]); the multiplexer
//! publishes the cluster's node list the same way.

use crate::bus::{NodeCounts, NodeInfo, ProxyKindSnapshot, ShardSnapshot};
use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use serde_json::{json, Value};
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

/// The status page (self-contained: no build step, no external resources).
const STATUS_HTML: &str = include_str!("status.html");

/// Starts the internal listener; returns the bound address, or `None` (logged) if it could
/// not bind. Never fatal: the node serves clients without it. `redis_mode` is what the status
/// page's node entry reports as its broker.
pub fn start(listen: &str, node: Arc<NodeInfo>, redis_mode: bool) -> Option<MetricsListener> {
    if listen.is_empty() {
        return None;
    }
    let listener = match TcpListener::bind(listen) {
        Ok(l) => l,
        Err(e) => {
            tracing::warn!(%listen, error = %e, "metrics listener not started");
            return None;
        }
    };
    let addr = listener.local_addr().ok()?;
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let stopped = stop.clone();
    let spawned = std::thread::Builder::new()
        .name("shardcast-metrics".into())
        .spawn(move || {
            for stream in listener.incoming().flatten() {
                if stopped.load(std::sync::atomic::Ordering::SeqCst) {
                    return;
                }
                let _ = serve(stream, &node, redis_mode);
            }
        });
    match spawned {
        Ok(thread) => Some(MetricsListener { addr, stop, thread }),
        Err(e) => {
            tracing::warn!(error = %e, "metrics thread not started");
            None
        }
    }
}

/// The running metrics listener: its address, and the way to end its thread.
pub struct MetricsListener {
    pub addr: SocketAddr,
    stop: Arc<std::sync::atomic::AtomicBool>,
    thread: std::thread::JoinHandle<()>,
}

impl MetricsListener {
    /// Ends the listener's thread: flags it, wakes its blocking accept with one connection
    /// (bounded), and joins it (each request it serves is bounded in time).
    pub fn stop(self) {
        self.stop.store(true, std::sync::atomic::Ordering::SeqCst);
        let woke = TcpStream::connect_timeout(&self.addr, std::time::Duration::from_secs(1));
        if woke.is_ok() {
            let _ = self.thread.join();
        }
    }
}

/// One request per connection (`Connection: close`), bounded in size and time.
fn serve(mut stream: TcpStream, node: &NodeInfo, redis_mode: bool) -> std::io::Result<()> {
    stream.set_read_timeout(Some(Duration::from_secs(5)))?;
    stream.set_write_timeout(Some(Duration::from_secs(5)))?;
    let mut buf = vec![0u8; 8192];
    let mut len = 0;
    let path = loop {
        let n = stream.read(&mut buf[len..])?;
        if n == 0 {
            return Ok(());
        }
        len += n;
        let mut headers = [httparse::EMPTY_HEADER; 32];
        let mut req = httparse::Request::new(&mut headers);
        match req.parse(&buf[..len]) {
            Ok(httparse::Status::Complete(_)) => break req.path.unwrap_or("/").to_string(),
            Ok(httparse::Status::Partial) if len < buf.len() => continue,
            _ => return respond(&mut stream, 400, "text/plain", b"bad request\n"),
        }
    };
    match path.split('?').next().unwrap_or("") {
        "/metrics" => respond(
            &mut stream,
            200,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
            prometheus(node).as_bytes(),
        ),
        "/status" | "/" => respond(
            &mut stream,
            200,
            "text/html; charset=utf-8",
            STATUS_HTML.as_bytes(),
        ),
        "/status.json" => respond(
            &mut stream,
            200,
            "application/json",
            status(node, redis_mode).to_string().as_bytes(),
        ),
        _ => respond(&mut stream, 404, "text/plain", b"not found\n"),
    }
}

fn respond(stream: &mut TcpStream, status: u16, ctype: &str, body: &[u8]) -> std::io::Result<()> {
    let reason = match status {
        200 => "OK",
        400 => "Bad Request",
        _ => "Not Found",
    };
    write!(
        stream,
        "HTTP/1.1 {status} {reason}\r\nContent-Type: {ctype}\r\nContent-Length: {}\r\nCache-Control: no-store\r\nConnection: close\r\n\r\n",
        body.len()
    )?;
    stream.write_all(body)
}

/// Resident set size of this process, bytes.
pub fn rss_bytes() -> u64 {
    std::fs::read_to_string("/proc/self/statm")
        .ok()
        .and_then(|s| s.split_whitespace().nth(1)?.parse::<u64>().ok())
        .map(|pages| pages * 4096)
        .unwrap_or(0)
}

fn snapshots(node: &NodeInfo) -> Vec<ShardSnapshot> {
    node.shard_snapshots
        .iter()
        .map(|m| m.lock().map(|s| s.clone()).unwrap_or_default())
        .collect()
}

/// User-space bytes per connection: RSS above the node's start-up baseline, divided by the
/// connections held (0 when none).
fn bytes_per_connection(node: &NodeInfo, connections: u64) -> u64 {
    let above = rss_bytes().saturating_sub(node.rss_baseline.load(Ordering::Relaxed));
    above.checked_div(connections).unwrap_or(0)
}

type ShardLabel = Vec<(String, String)>;

fn prometheus(node: &NodeInfo) -> String {
    let mut registry = Registry::with_prefix("shardcast");
    let shards = snapshots(node);
    let gauge =
        |registry: &mut Registry, name: &str, help: &str, f: &dyn Fn(&ShardSnapshot) -> u64| {
            let family = Family::<ShardLabel, Gauge>::default();
            for (i, s) in shards.iter().enumerate() {
                family
                    .get_or_create(&vec![("shard".into(), i.to_string())])
                    .set(f(s) as i64);
            }
            registry.register(name, help, family);
        };
    gauge(
        &mut registry,
        "connections",
        "WebSocket connections held",
        &|s| s.connections,
    );
    gauge(
        &mut registry,
        "subscriptions",
        "Subscriptions (connection x channel)",
        &|s| s.subscriptions,
    );
    gauge(
        &mut registry,
        "channels",
        "Channels with local subscribers",
        &|s| s.channels,
    );
    gauge(
        &mut registry,
        "broker_inbox_depth",
        "Messages waiting in the shard's broker inbox",
        &|s| s.inbox_depth,
    );
    // Every shard counter, labelled by shard (drops and disconnects by reason among them).
    let mut names: Vec<&'static str> = Vec::new();
    for s in &shards {
        for (n, _) in &s.counters {
            if !names.contains(n) {
                names.push(n);
            }
        }
    }
    for name in names {
        let family = Family::<ShardLabel, Counter<u64, AtomicU64>>::default();
        for (i, s) in shards.iter().enumerate() {
            let v = s
                .counters
                .iter()
                .find(|(n, _)| *n == name)
                .map(|(_, v)| *v)
                .unwrap_or(0);
            family
                .get_or_create(&vec![("shard".into(), i.to_string())])
                .inc_by(v);
        }
        registry.register(name, format!("Shard counter {name}"), family);
    }
    register_proxy(&mut registry, &shards);
    let bus = &node.bus;
    for (name, value) in bus.counters() {
        let c = Counter::<u64, AtomicU64>::default();
        c.inc_by(value);
        registry.register(name, format!("Broker counter {name} (see /api/info)"), c);
    }
    for (name, value) in bus.gauges() {
        let g = Gauge::<i64>::default();
        g.set(value as i64);
        registry.register(name, format!("Broker gauge {name} (see /api/info)"), g);
    }
    let g = Gauge::<i64>::default();
    g.set(node.broker_queue.get().map(|q| q.len() as i64).unwrap_or(0));
    registry.register(
        "broker_queue_depth",
        "Messages waiting in the shards-to-broker queue",
        g,
    );
    let g = Gauge::<i64>::default();
    g.set(node.redis_state.get() as i64);
    registry.register(
        "redis_link_state",
        "Redis link: 0 standalone, 1 connected, 2 down",
        g,
    );
    let c = Counter::<u64, AtomicU64>::default();
    c.inc_by(node.redis_reconnects.load(Ordering::Relaxed));
    registry.register(
        "redis_reconnects",
        "Times the Redis link was re-established",
        c,
    );
    let c = Counter::<u64, AtomicU64>::default();
    c.inc_by(node.redis_failovers.load(Ordering::Relaxed));
    registry.register(
        "redis_failovers",
        "Times the node moved to another Redis master (Sentinel: +switch-master, or a new master found on reconnect)",
        c,
    );
    let total: u64 = shards.iter().map(|s| s.connections).sum();
    let g = Gauge::<i64>::default();
    g.set(rss_bytes() as i64);
    registry.register(
        "resident_memory_bytes",
        "Resident set size of the process",
        g,
    );
    let g = Gauge::<i64>::default();
    g.set(bytes_per_connection(node, total) as i64);
    registry.register(
        "bytes_per_connection",
        "User-space bytes per connection (RSS above start-up, divided by connections)",
        g,
    );
    let mut out = String::new();
    let _ = encode(&mut out, &registry);
    out
}

/// The backend calls, summed over the shards: `proxy_duration_seconds{kind}` (histogram),
/// `proxy_errors_total{kind,error}` and `proxy_overloaded_total`.
fn register_proxy(registry: &mut Registry, shards: &[ShardSnapshot]) {
    let mut kinds: Vec<ProxyKindSnapshot> = Vec::new();
    for s in shards {
        for k in &s.proxy.kinds {
            match kinds.iter_mut().find(|x| x.kind == k.kind) {
                None => kinds.push(k.clone()),
                Some(sum) => {
                    for (a, b) in sum.buckets.iter_mut().zip(&k.buckets) {
                        *a += b;
                    }
                    sum.sum_secs += k.sum_secs;
                    for ((_, a), (_, b)) in sum.errors.iter_mut().zip(&k.errors) {
                        *a += b;
                    }
                }
            }
        }
    }
    let errors = Family::<ShardLabel, Counter<u64, AtomicU64>>::default();
    for k in &kinds {
        for (class, n) in &k.errors {
            errors
                .get_or_create(&vec![
                    ("kind".into(), k.kind.to_string()),
                    ("error".into(), class.to_string()),
                ])
                .inc_by(*n);
        }
    }
    registry.register_with_unit(
        "proxy_duration",
        "Backend call latency (connect, TLS, request, whole response), by proxy kind",
        prometheus_client::registry::Unit::Seconds,
        ProxyHistograms(kinds),
    );
    registry.register(
        "proxy_errors",
        "Backend calls failed, by proxy kind and error (status = non-2xx answer)",
        errors,
    );
    let c = Counter::<u64, AtomicU64>::default();
    c.inc_by(shards.iter().map(|s| s.proxy.overloaded).sum());
    registry.register(
        "proxy_overloaded",
        "Backend calls refused by proxy.max_in_flight (the client got error 100)",
        c,
    );
}

/// Latency histograms summed over the shards, one per proxy kind (the shards count into fixed
/// buckets; this only encodes their sums).
#[derive(Debug)]
struct ProxyHistograms(Vec<ProxyKindSnapshot>);

impl prometheus_client::encoding::EncodeMetric for ProxyHistograms {
    fn encode(
        &self,
        mut encoder: prometheus_client::encoding::MetricEncoder,
    ) -> Result<(), std::fmt::Error> {
        for k in &self.0 {
            let labels = [("kind", k.kind)];
            let buckets: Vec<(f64, u64)> = k
                .bounds_secs
                .iter()
                .copied()
                .chain(std::iter::once(f64::INFINITY))
                .zip(k.buckets.iter().copied())
                .collect();
            let count = k.buckets.iter().sum();
            encoder
                .encode_family(&labels)?
                .encode_histogram::<prometheus_client::encoding::NoLabelSet>(
                    k.sum_secs, count, &buckets, None,
                )?;
        }
        Ok(())
    }

    fn metric_type(&self) -> prometheus_client::metrics::MetricType {
        prometheus_client::metrics::MetricType::Histogram
    }
}

/// `/status.json`: this node's entry (the same builder as `/api/info`'s, counted from the
/// shards' last snapshots: a channel with subscribers on several shards counts once per
/// shard), the per-shard figures, and the cluster's registry entries (Redis mode).
fn status(node: &NodeInfo, redis_mode: bool) -> Value {
    let shards = snapshots(node);
    let total: u64 = shards.iter().map(|s| s.connections).sum();
    let cluster = node.cluster.lock().map(|c| c.clone()).unwrap_or_default();
    let entry = node.info_entry(
        redis_mode,
        NodeCounts {
            clients: total,
            users: None,
            subs: shards.iter().map(|s| s.subscriptions).sum(),
            channels: shards.iter().map(|s| s.channels).sum(),
            counters: None,
        },
    );
    json!({
        "node": entry,
        "time_ms": std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0),
        "connections": total,
        "rss_bytes": rss_bytes(),
        "bytes_per_connection": bytes_per_connection(node, total),
        "shards": shards.iter().enumerate().map(|(i, s)| json!({
            "shard": i,
            "connections": s.connections,
            "subscriptions": s.subscriptions,
            "channels": s.channels,
            "inbox_depth": s.inbox_depth,
            "counters": s.counters.iter().map(|(k, v)| (k.to_string(), json!(v))).collect::<serde_json::Map<String, Value>>(),
        })).collect::<Vec<_>>(),
        "nodes": cluster,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::{CallError, ProxyKind, ProxyStats};

    /// Two shards' backend calls reach `/metrics` summed, as a histogram per kind and error
    /// counters by kind and class.
    #[test]
    fn proxy_figures_of_all_shards_are_exported_summed() {
        let node = NodeInfo::new("u".into(), "n".into(), "a".into(), 1).with_shards(2);
        let ms = Duration::from_millis;
        let a = ProxyStats::default();
        a.record(ProxyKind::Connect, ms(3), Ok(200));
        a.record(ProxyKind::Connect, ms(30), Ok(500));
        a.overloaded();
        let b = ProxyStats::default();
        b.record(ProxyKind::Connect, ms(4), Ok(200));
        b.record(ProxyKind::SubRefresh, ms(2000), Err(&CallError::Timeout));
        b.overloaded();
        for (slot, stats) in node.shard_snapshots.iter().zip([&a, &b]) {
            slot.lock().unwrap().proxy = stats.snapshot();
        }
        let text = prometheus(&node);
        for line in [
            "# TYPE shardcast_proxy_duration_seconds histogram",
            "shardcast_proxy_duration_seconds_count{kind=\"connect\"} 3",
            "shardcast_proxy_duration_seconds_bucket{le=\"0.005\",kind=\"connect\"} 2",
            "shardcast_proxy_duration_seconds_bucket{le=\"0.05\",kind=\"connect\"} 3",
            "shardcast_proxy_duration_seconds_bucket{le=\"+Inf\",kind=\"sub_refresh\"} 1",
            "shardcast_proxy_duration_seconds_bucket{le=\"1.0\",kind=\"sub_refresh\"} 0",
            "shardcast_proxy_errors_total{kind=\"connect\",error=\"status\"} 1",
            "shardcast_proxy_errors_total{kind=\"sub_refresh\",error=\"timeout\"} 1",
            "shardcast_proxy_errors_total{kind=\"rpc\",error=\"tls\"} 0",
            "shardcast_proxy_overloaded_total 2",
        ] {
            assert!(text.contains(line), "missing {line:?} in:\n{text}");
        }
    }
}
