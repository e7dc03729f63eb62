//! The server's own figures from `POST /api/info`: the counters and gauges of the node the
//! request reached (`result.nodes[0]`, the local entry). A server from before a counter or
//! gauge existed simply lacks it: the lookups return `None` and the benches print "n/a".

use super::http::HttpClient;
use std::net::SocketAddr;

/// The local node's entry of `/api/info`, or why it could not be read.
pub struct NodeInfo {
    entry: serde_json::Value,
}

impl NodeInfo {
    /// Asks the server at `addr` (API key `bench`) on a fresh connection.
    pub fn fetch(addr: SocketAddr) -> Result<NodeInfo, String> {
        let mut c = HttpClient::connect(addr).map_err(|e| format!("connect: {e}"))?;
        c.send("POST", "/api/info", b"{}")
            .map_err(|e| format!("send: {e}"))?;
        match c.recv() {
            Ok((200, body)) => {
                let v: serde_json::Value =
                    serde_json::from_slice(&body).map_err(|e| format!("bad JSON: {e}"))?;
                let entry = v["result"]["nodes"][0].clone();
                if entry.is_null() {
                    return Err("no result.nodes[0]".into());
                }
                Ok(NodeInfo { entry })
            }
            Ok((code, body)) => Err(format!(
                "HTTP {code}: {}",
                String::from_utf8_lossy(&body[..body.len().min(200)])
            )),
            Err(e) => Err(format!("recv: {e}")),
        }
    }

    /// `counters.<name>`, if this server has it.
    #[allow(dead_code, reason = "density reads a gauge only")]
    pub fn counter(&self, name: &str) -> Option<u64> {
        self.entry["counters"][name].as_u64()
    }

    /// `gauges.<name>`, if this server has it.
    #[allow(dead_code, reason = "fanout reads counters only")]
    pub fn gauge(&self, name: &str) -> Option<u64> {
        self.entry["gauges"][name].as_u64()
    }
}

/// The delta of counter `name` between two readings, if both have it.
#[allow(dead_code, reason = "density reads a gauge only")]
pub fn counter_delta(
    before: Option<&NodeInfo>,
    after: Option<&NodeInfo>,
    name: &str,
) -> Option<u64> {
    Some(after?.counter(name)?.saturating_sub(before?.counter(name)?))
}
