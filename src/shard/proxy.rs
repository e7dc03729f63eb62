//! The shard's calls to the application backend: a session asks for one
//! ([`crate::conn::session::Host::proxy`]), the shard runs it as a task on its own executor
//! through its HTTP client ([`crate::backend`]), and hands the answer back to the session of
//! the connection, if that connection is still there.
//!
//! Shard thread only. Nothing here blocks: a slow or dead backend holds only its own tasks
//! (each bounded by `proxy.timeout_ms`) and the shard's in-flight budget
//! (`proxy.max_in_flight`; over it the command gets error 100 and `proxy_overloaded` counts).
//! The headers `proxy.http_headers` names are kept per connection from its upgrade request,
//! only when that list is not empty.

use super::Shard;
use crate::backend::{CallError, Endpoint, HttpClient, ProxyKind};
use crate::conn::session::Awaiting;
use crate::conn::ConnKey;
use crate::protocol::proxy::Hook;
use crate::protocol::ErrorCode;
use serde_json::value::RawValue;
use std::cell::{Cell, RefCell};
use std::collections::HashMap;
use std::rc::Rc;
use std::time::{Duration, Instant};

/// The hooks in a fixed order (index into [`Proxies::endpoints`]).
const HOOKS: [Hook; 6] = [
    Hook::Connect,
    Hook::Refresh,
    Hook::Subscribe,
    Hook::Publish,
    Hook::SubRefresh,
    Hook::Rpc,
];

/// The metrics' name for a hook.
fn kind(hook: Hook) -> ProxyKind {
    match hook {
        Hook::Connect => ProxyKind::Connect,
        Hook::Refresh => ProxyKind::Refresh,
        Hook::Subscribe => ProxyKind::Subscribe,
        Hook::Publish => ProxyKind::Publish,
        Hook::SubRefresh => ProxyKind::SubRefresh,
        Hook::Rpc => ProxyKind::Rpc,
    }
}

fn slot(hook: Hook) -> usize {
    HOOKS.iter().position(|&h| h == hook).expect("every hook has a slot")
}

/// A shard's backend calls: its client, the endpoints, and what waits.
pub struct Proxies {
    client: Option<Rc<HttpClient>>,
    endpoints: [Option<Rc<Endpoint>>; 6],
    timeout: Duration,
    /// Headers copied from each connection's upgrade request (only connections that had one
    /// of the listed headers).
    headers: RefCell<HashMap<ConnKey, Rc<[(String, Vec<u8>)]>>>,
    /// Subscribes waiting for the subscribe proxy, per connection: call number and channel.
    subscribing: RefCell<HashMap<ConnKey, Vec<(u64, String)>>>,
    /// Data for subscribe replies the shard sends later, by connection and command id.
    later_data: RefCell<HashMap<(ConnKey, u32), Box<RawValue>>>,
    next_call: Cell<u64>,
}

impl Proxies {
    /// The proxies a configuration asks for (none: no client is made).
    pub fn new(cfg: &crate::config::Config) -> anyhow::Result<Proxies> {
        let p = &cfg.proxy;
        let urls = [
            &p.connect_endpoint,
            &p.refresh_endpoint,
            &p.subscribe_endpoint,
            &p.publish_endpoint,
            &p.sub_refresh_endpoint,
            &p.rpc_endpoint,
        ];
        let mut endpoints: [Option<Rc<Endpoint>>; 6] = Default::default();
        for (i, url) in urls.iter().enumerate() {
            if !url.is_empty() {
                endpoints[i] = Some(Rc::new(Endpoint::parse(url)?));
            }
        }
        let client = match endpoints.iter().any(Option::is_some) {
            true => Some(HttpClient::new(p)?),
            false => None,
        };
        Ok(Proxies {
            client,
            endpoints,
            timeout: Duration::from_millis(p.timeout_ms as u64),
            headers: RefCell::default(),
            subscribing: RefCell::default(),
            later_data: RefCell::default(),
            next_call: Cell::new(1),
        })
    }

    /// Keeps the listed headers of a connection's upgrade request.
    pub fn keep_headers(&self, key: ConnKey, headers: Vec<(String, Vec<u8>)>) {
        if !headers.is_empty() {
            self.headers.borrow_mut().insert(key, headers.into());
        }
    }

    /// A subscribe to `channel` of `key` waits for the proxy.
    pub fn waits(&self, key: ConnKey, channel: &str) -> bool {
        self.subscribing
            .borrow()
            .get(&key)
            .is_some_and(|l| l.iter().any(|(_, c)| c == channel))
    }

    /// Forgets a waiting subscribe (its answer will be dropped).
    pub fn forget(&self, key: ConnKey, channel: &str) {
        let mut map = self.subscribing.borrow_mut();
        if let Some(list) = map.get_mut(&key) {
            list.retain(|(_, c)| c != channel);
            if list.is_empty() {
                map.remove(&key);
            }
        }
    }

    /// Subscribe-reply data kept for a later reply.
    pub fn keep_later_data(&self, key: ConnKey, id: u32, data: Box<RawValue>) {
        self.later_data.borrow_mut().insert((key, id), data);
    }

    /// Takes the data of a later subscribe reply, if the proxy gave any.
    pub fn take_later_data(&self, key: ConnKey, id: u32) -> Option<Box<RawValue>> {
        let mut map = self.later_data.borrow_mut();
        if map.is_empty() {
            return None;
        }
        map.remove(&(key, id))
    }

    /// A connection ended: forget everything kept for it.
    pub fn forget_connection(&self, key: ConnKey) {
        if self.client.is_none() {
            return;
        }
        self.headers.borrow_mut().remove(&key);
        self.subscribing.borrow_mut().remove(&key);
        let mut later = self.later_data.borrow_mut();
        if !later.is_empty() {
            later.retain(|(k, _), _| *k != key);
        }
    }
}

impl Shard {
    /// Starts a backend call for connection `key` (see [`Proxies`]).
    pub(super) fn start_proxy(
        &self,
        key: ConnKey,
        waiting: Awaiting,
        body: Vec<u8>,
    ) -> Result<(), ErrorCode> {
        let proxies = &self.proxies;
        let hook = waiting.hook();
        let (Some(client), Some(endpoint)) = (&proxies.client, &proxies.endpoints[slot(hook)])
        else {
            return Err(ErrorCode::NotAvailable);
        };
        let Some(permit) = client.try_acquire() else {
            client.stats().overloaded();
            return Err(ErrorCode::Internal);
        };
        let Some(shard) = self.me.upgrade() else {
            return Err(ErrorCode::Internal);
        };
        let call = proxies.next_call.get();
        proxies.next_call.set(call + 1);
        if let Some(channel) = waiting.subscribing() {
            (proxies.subscribing.borrow_mut())
                .entry(key)
                .or_default()
                .push((call, channel.to_string()));
        }
        let headers = proxies.headers.borrow().get(&key).cloned();
        let client = client.clone();
        let endpoint = endpoint.clone();
        let timeout = proxies.timeout;
        glommio::spawn_local(async move {
            let started = Instant::now();
            let headers: &[(String, Vec<u8>)] = headers.as_deref().unwrap_or(&[]);
            let result = client
                .post_json(permit, &endpoint, headers, body, timeout)
                .await;
            let outcome = result.as_ref().map(|r| r.status);
            client.stats().record(kind(hook), started.elapsed(), outcome);
            let answer = match result {
                Ok(r) if r.status == 200 => Some(r.body),
                Ok(r) => {
                    tracing::warn!(proxy = hook.name(), status = r.status, "proxy answered a non-200 status");
                    None
                }
                Err(e) => {
                    log_failure(hook, &e);
                    None
                }
            };
            shard.proxy_done(key, call, waiting, answer.as_deref());
        })
        .detach();
        Ok(())
    }

    /// A backend call ended: the session of `key`, if still there, takes the answer.
    fn proxy_done(&self, key: ConnKey, call: u64, waiting: Awaiting, answer: Option<&[u8]>) {
        if let Some(channel) = waiting.subscribing() {
            let mut map = self.proxies.subscribing.borrow_mut();
            let Some(list) = map.get_mut(&key) else {
                return; // the client unsubscribed meanwhile, or the connection ended
            };
            let Some(i) = list.iter().position(|(c, ch)| *c == call && ch == channel) else {
                return;
            };
            list.swap_remove(i);
            if list.is_empty() {
                map.remove(&key);
            }
        }
        if let Some(conn) = self.conn(key) {
            conn.resume(&self.ctx(), waiting, answer);
            self.want_flush();
        }
    }
}

fn log_failure(hook: Hook, e: &CallError) {
    tracing::warn!(proxy = hook.name(), error = %e, "proxy call failed");
}
