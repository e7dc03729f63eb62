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
use crate::backend::{CallError, Endpoint, HttpClient};
use crate::conn::session::Awaiting;
use crate::conn::ConnKey;
use crate::protocol::jwks::FetchReason;
use crate::protocol::proxy::ProxyKind;
use crate::protocol::ErrorCode;
use serde_json::value::RawValue;
use std::cell::{Cell, RefCell};
use std::collections::HashMap;
use std::rc::Rc;
use std::time::{Duration, Instant};

/// A header copied onto proxy requests: name, value.
type Header = (String, Vec<u8>);

/// A shard's backend calls: its client, the endpoints, and what waits.
pub struct Proxies {
    pub(super) client: Option<Rc<HttpClient>>,
    /// Where each kind of call goes, by [`ProxyKind`] (the key set: `token_jwks_url`).
    endpoints: [Option<Rc<Endpoint>>; 7],
    timeout: Duration,
    /// Headers copied from each connection's upgrade request (only connections that had one
    /// of the listed headers).
    headers: RefCell<HashMap<ConnKey, Rc<[Header]>>>,
    /// Subscribes waiting for the subscribe proxy, per connection: call number and channel.
    subscribing: RefCell<HashMap<ConnKey, Vec<(u64, String)>>>,
    /// Data for subscribe replies the shard sends later, by connection and command id.
    later_data: RefCell<HashMap<(ConnKey, u32), Box<RawValue>>>,
    next_call: Cell<u64>,
    /// A key set fetch runs.
    jwks_fetching: Cell<bool>,
    /// Connects whose token names a `kid` the set lacks, waiting for the fetch (at most
    /// `proxy.max_in_flight`).
    key_waiters: RefCell<Vec<(ConnKey, Awaiting)>>,
}

impl Proxies {
    /// The proxies a configuration asks for (none: no client is made).
    pub fn new(cfg: &crate::config::Config) -> anyhow::Result<Proxies> {
        let p = &cfg.proxy;
        let jwks = match cfg.token_jwks_url.as_str() {
            "" => None,
            url => Some(Endpoint::parse(url).map_err(anyhow::Error::msg)?),
        };
        // In `ProxyKind` order.
        let endpoints = [
            p.connect_endpoint.clone(),
            p.refresh_endpoint.clone(),
            p.subscribe_endpoint.clone(),
            p.publish_endpoint.clone(),
            p.sub_refresh_endpoint.clone(),
            p.rpc_endpoint.clone(),
            jwks,
        ]
        .map(|e| e.map(Rc::new));
        let client = match endpoints.iter().any(Option::is_some) {
            true => {
                let tls = crate::backend::tls::client_config(p).map_err(anyhow::Error::msg)?;
                Some(HttpClient::new(p, tls))
            }
            false => None,
        };
        Ok(Proxies {
            client,
            endpoints,
            timeout: p.timeout(),
            headers: RefCell::default(),
            subscribing: RefCell::default(),
            later_data: RefCell::default(),
            next_call: Cell::new(1),
            jwks_fetching: Cell::new(false),
            key_waiters: RefCell::default(),
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
    ///
    /// (Connects waiting for the key set are found gone when it comes.)
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
    /// The backend client's counters for `/api/info` (none without a client).
    pub(super) fn proxy_counters(&self) -> Vec<(&'static str, u64)> {
        match &self.proxies.client {
            Some(c) => c.stats().counters(),
            None => Vec::new(),
        }
    }

    /// Starts a backend call for connection `key` (see [`Proxies`]).
    pub(super) fn start_proxy(
        &self,
        key: ConnKey,
        waiting: Awaiting,
        body: Vec<u8>,
    ) -> Result<(), ErrorCode> {
        let proxies = &self.proxies;
        let hook = waiting.kind();
        if hook == ProxyKind::Jwks {
            return self.await_keys(key, waiting);
        }
        let (Some(client), Some(endpoint)) = (&proxies.client, &proxies.endpoints[hook as usize])
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
            let headers: &[Header] = headers.as_deref().unwrap_or(&[]);
            let result = client
                .post_json(permit, &endpoint, headers, body, timeout)
                .await;
            let outcome = result.as_ref().map(|r| r.status);
            client.stats().record(hook, started.elapsed(), outcome);
            let answer = match result {
                Ok(r) if r.status == 200 => Some(r.body),
                Ok(r) => {
                    tracing::warn!(
                        proxy = hook.label(),
                        status = r.status,
                        "proxy answered a non-200 status"
                    );
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

impl Shard {
    /// The shard's per-second look at its token key set: fetched at start and when
    /// `token_jwks_refresh_interval_secs` passed (or after a failure, at most once per
    /// `token_jwks_min_fetch_interval_secs`).
    pub(super) fn jwks_tick(&self) {
        if let Some(client) = &self.proxies.client {
            client.sweep_idle();
        }
        let Some(cache) = self.verifier.as_ref().and_then(|v| v.jwks()) else {
            return;
        };
        if !self.proxies.jwks_fetching.get()
            && cache
                .borrow_mut()
                .should_fetch(Instant::now(), FetchReason::Periodic)
        {
            self.fetch_keys();
        }
    }

    /// A connect's token names a `kid` the key set lacks: it waits for a fetch (one running,
    /// or one started now if the rate limit allows). `Err(NotAvailable)`: no fetch is allowed,
    /// the token is invalid; `Err(Internal)`: too many connects wait (temporary).
    pub(super) fn await_keys(&self, key: ConnKey, waiting: Awaiting) -> Result<(), ErrorCode> {
        let Some(cache) = self.verifier.as_ref().and_then(|v| v.jwks()) else {
            return Err(ErrorCode::NotAvailable);
        };
        let proxies = &self.proxies;
        if proxies.key_waiters.borrow().len() >= self.cfg.proxy.max_in_flight {
            return Err(ErrorCode::Internal);
        }
        let running = proxies.jwks_fetching.get();
        if !running
            && !cache
                .borrow_mut()
                .should_fetch(Instant::now(), FetchReason::UnknownKid)
        {
            return Err(ErrorCode::NotAvailable);
        }
        proxies.key_waiters.borrow_mut().push((key, waiting));
        if !running {
            self.fetch_keys();
        }
        Ok(())
    }

    /// Fetches the token key set and feeds it to the verifier's cache; then the connects
    /// that waited for it try their tokens again.
    fn fetch_keys(&self) {
        let proxies = &self.proxies;
        let (Some(client), Some(endpoint), Some(shard)) = (
            &proxies.client,
            &proxies.endpoints[ProxyKind::Jwks as usize],
            self.me.upgrade(),
        ) else {
            return;
        };
        let Some(permit) = client.try_acquire() else {
            if let Some(cache) = self.verifier.as_ref().and_then(|v| v.jwks()) {
                cache.borrow_mut().fetch_failed();
            }
            shard.keys_done();
            return;
        };
        proxies.jwks_fetching.set(true);
        let client = client.clone();
        let endpoint = endpoint.clone();
        let timeout = proxies.timeout;
        glommio::spawn_local(async move {
            let started = Instant::now();
            let result = client.get(permit, &endpoint, timeout).await;
            let outcome = result.as_ref().map(|r| r.status);
            client.stats().record(ProxyKind::Jwks, started.elapsed(), outcome);
            if let Some(cache) = shard.verifier.as_ref().and_then(|v| v.jwks()) {
                let mut cache = cache.borrow_mut();
                match result {
                    Ok(r) if r.status == 200 => match cache.update(&r.body, Instant::now()) {
                        Ok(n) => tracing::debug!(shard = shard.id, keys = n, "token key set fetched"),
                        Err(e) => {
                            tracing::warn!(shard = shard.id, error = %e, "token key set refused; the last good set is kept")
                        }
                    },
                    Ok(r) => {
                        tracing::warn!(shard = shard.id, status = r.status, "token key set fetch answered a non-200 status; the last good set is kept");
                        cache.fetch_failed();
                    }
                    Err(e) => {
                        tracing::warn!(shard = shard.id, error = %e, "token key set fetch failed; the last good set is kept");
                        cache.fetch_failed();
                    }
                }
            }
            shard.proxies.jwks_fetching.set(false);
            shard.keys_done();
        })
        .detach();
    }

    /// The connects that waited for the key set try again.
    fn keys_done(&self) {
        let waiters = std::mem::take(&mut *self.proxies.key_waiters.borrow_mut());
        if waiters.is_empty() {
            return;
        }
        let ctx = self.ctx();
        for (key, waiting) in waiters {
            if let Some(conn) = self.conn(key) {
                conn.resume(&ctx, waiting, None);
            }
        }
        self.want_flush();
    }
}

fn log_failure(hook: ProxyKind, e: &CallError) {
    tracing::warn!(proxy = hook.label(), error = %e, "proxy call failed");
}
