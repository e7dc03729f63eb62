//! A shard's io_uring for WebSocket I/O: the ring itself, its provided receive buffers, the
//! bytes of sends in flight, and the eventfd through which completions wake the shard.
//!
//! One ring per shard, created and used only on the shard's thread, next to glommio's own rings
//! (glommio keeps accept, the HTTP phase and outbound links). An upgraded socket has one armed
//! multishot receive in the kernel that picks a buffer from the shard's provided-buffer ring
//! only when data arrives: an idle connection holds no buffer, no future and no task. A send in
//! flight owns its bytes here until its completion arrives, even if its connection ended
//! meanwhile. Every completion posted signals the registered eventfd, which the shard's I/O
//! task awaits through glommio ([`super::io`]).
//!
//! `user_data` says what a completion is about: the operation (top 8 bits), the connection's
//! slot (24 bits) and generation (32 bits), so a completion that arrives after its connection
//! ended (a receive cancelled at close) finds no connection of that generation and is ignored.
//! Never blocks: submissions are non-blocking `io_uring_enter` calls; nothing here waits.

use crate::config::RingConfig;
use crate::conn::ConnKey;
use bytes::Bytes;
use io_uring::{cqueue, opcode, squeue, types, IoUring};
use std::cell::RefCell;
use std::collections::HashMap;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::sync::atomic::{AtomicU16, Ordering};

/// The provided-buffer group of the receive buffers (one group per ring).
const BUF_GROUP: u16 = 0;
/// Slots above this cannot be named in `user_data` (16M connections per shard).
pub const MAX_SLOT: u32 = (1 << 24) - 1;

/// What a completion is about.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Op {
    /// A connection's multishot receive.
    Recv = 1,
    /// A connection's send.
    Send = 2,
    /// Cancel and close at teardown: only failures are posted, and they are ignored.
    Close = 3,
}

/// One completion, copied out of the queue so that handling it may submit more.
#[derive(Debug, Clone, Copy)]
pub struct Completion {
    pub op: Op,
    pub key: ConnKey,
    /// Bytes, or a negated errno.
    pub result: i32,
    pub flags: u32,
}

impl Completion {
    /// Whether a multishot receive stays armed after this completion.
    pub fn more(&self) -> bool {
        cqueue::more(self.flags)
    }

    /// The receive buffer holding this completion's bytes, if one was picked.
    pub fn buffer(&self) -> Option<u16> {
        cqueue::buffer_select(self.flags)
    }
}

fn user_data(op: Op, key: ConnKey) -> u64 {
    ((op as u64) << 56) | (((key.slot & MAX_SLOT) as u64) << 32) | key.generation as u64
}

fn decode(data: u64) -> Option<(Op, ConnKey)> {
    let op = match data >> 56 {
        1 => Op::Recv,
        2 => Op::Send,
        3 => Op::Close,
        _ => return None,
    };
    let key = ConnKey {
        slot: ((data >> 32) as u32) & MAX_SLOT,
        generation: data as u32,
    };
    Some((op, key))
}

/// Why a shard's ring could not be set up.
#[derive(Debug, thiserror::Error)]
#[error("io_uring {feature} is not available ({detail}) on Linux {kernel}; shardcast needs Linux 6.0 or later with io_uring enabled")]
pub struct RingError {
    /// The feature that is missing, by its io_uring name.
    pub feature: &'static str,
    pub detail: String,
    /// The running kernel's release (`uname -r`).
    pub kernel: String,
}

fn missing(feature: &'static str, detail: impl ToString) -> RingError {
    RingError {
        feature,
        detail: detail.to_string(),
        kernel: kernel_release(),
    }
}

/// The running kernel's release, as `uname -r` prints it.
pub fn kernel_release() -> String {
    // SAFETY: uname fills a zeroed struct we own; release is NUL-terminated.
    unsafe {
        let mut u: libc::utsname = std::mem::zeroed();
        if libc::uname(&mut u) != 0 {
            return "unknown".into();
        }
        std::ffi::CStr::from_ptr(u.release.as_ptr())
            .to_string_lossy()
            .into_owned()
    }
}

/// The receive buffers the kernel picks from: `count` buffers of `size` bytes, and the ring of
/// their descriptors shared with the kernel. Memory is allocated zeroed, so a page costs
/// resident memory only once the kernel has written into it.
struct RecvBuffers {
    /// The descriptor ring (`count` entries of 16 bytes, page aligned).
    entries: *mut types::BufRingEntry,
    entries_layout: std::alloc::Layout,
    /// The buffers, back to back.
    memory: *mut u8,
    memory_layout: std::alloc::Layout,
    count: u16,
    size: u32,
    /// Our copy of the ring's tail (the kernel reads the shared one).
    tail: u16,
}

impl RecvBuffers {
    fn new(count: u32, size: u32) -> RecvBuffers {
        let entries_layout =
            std::alloc::Layout::from_size_align(count as usize * 16, 4096).expect("ring layout");
        let memory_layout = std::alloc::Layout::from_size_align(count as usize * size as usize, 64)
            .expect("buffer layout");
        // SAFETY: both layouts have a non-zero size (count and size are validated ≥ 1).
        let (entries, memory) = unsafe {
            (
                std::alloc::alloc_zeroed(entries_layout).cast::<types::BufRingEntry>(),
                std::alloc::alloc_zeroed(memory_layout),
            )
        };
        if entries.is_null() || memory.is_null() {
            std::alloc::handle_alloc_error(memory_layout);
        }
        let mut bufs = RecvBuffers {
            entries,
            entries_layout,
            memory,
            memory_layout,
            count: count as u16,
            size,
            tail: 0,
        };
        for bid in 0..count {
            bufs.put(bid as u16);
        }
        bufs.publish();
        bufs
    }

    /// Appends buffer `bid` to the ring (seen by the kernel after [`RecvBuffers::publish`]).
    fn put(&mut self, bid: u16) {
        let mask = self.count.wrapping_sub(1) as usize;
        // SAFETY: the index is masked into the ring; the entry at the tail is ours until the
        // tail is published; the buffer lies inside `memory`.
        unsafe {
            let entry = &mut *self.entries.add(self.tail as usize & mask);
            entry.set_addr(self.memory.add(bid as usize * self.size as usize) as u64);
            entry.set_len(self.size);
            entry.set_bid(bid);
        }
        self.tail = self.tail.wrapping_add(1);
    }

    /// Makes every buffer put so far visible to the kernel.
    fn publish(&self) {
        // SAFETY: the tail field lives in the first entry, which is valid and aligned for u16;
        // the kernel reads it atomically.
        unsafe {
            let tail = types::BufRingEntry::tail(self.entries) as *const AtomicU16;
            (*tail).store(self.tail, Ordering::Release);
        }
    }

    /// The first `len` bytes of buffer `bid`.
    ///
    /// # Safety
    /// The kernel must have handed `bid` over in a completion and it must not be back in the
    /// ring yet.
    unsafe fn slice(&mut self, bid: u16, len: usize) -> &mut [u8] {
        let len = len.min(self.size as usize);
        std::slice::from_raw_parts_mut(self.memory.add(bid as usize * self.size as usize), len)
    }
}

impl Drop for RecvBuffers {
    fn drop(&mut self) {
        // SAFETY: allocated in `new` with these layouts; the ring that used them is gone (the
        // `Ring` drops its io_uring first).
        unsafe {
            std::alloc::dealloc(self.entries.cast(), self.entries_layout);
            std::alloc::dealloc(self.memory, self.memory_layout);
        }
    }
}

/// A shard's ring. Fields drop in order: the io_uring first, so the kernel is done with the
/// buffers and the bytes of sends in flight before they are freed.
pub struct Ring {
    uring: RefCell<IoUring>,
    bufs: RefCell<RecvBuffers>,
    /// Bytes of each connection's send in flight, kept until its completion.
    sending: RefCell<HashMap<ConnKey, Bytes>>,
    eventfd: OwnedFd,
}

impl Ring {
    /// Creates the ring, registers its receive buffers and its eventfd, and checks that the
    /// kernel has every feature used ([`check_kernel`]).
    pub fn open(cfg: &RingConfig) -> Result<Ring, RingError> {
        check_kernel()?;
        let uring = IoUring::builder()
            .setup_cqsize(cfg.entries * 4)
            .build(cfg.entries)
            .map_err(|e| missing("io_uring_setup", e))?;
        let bufs = RecvBuffers::new(cfg.recv_buffers, cfg.recv_buffer_bytes);
        // SAFETY: the descriptor ring stays allocated, at this address, for the io_uring's
        // whole life (the `Ring` drops the io_uring before its buffers).
        unsafe {
            uring
                .submitter()
                .register_buf_ring_with_flags(bufs.entries as u64, bufs.count, BUF_GROUP, 0)
                .map_err(|e| missing("IORING_REGISTER_PBUF_RING", e))?;
        }
        // SAFETY: plain syscall; the fd is owned right away.
        let fd = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC) };
        if fd < 0 {
            return Err(missing("eventfd", std::io::Error::last_os_error()));
        }
        // SAFETY: a fresh descriptor we own.
        let eventfd = unsafe { OwnedFd::from_raw_fd(fd) };
        uring
            .submitter()
            .register_eventfd(eventfd.as_raw_fd())
            .map_err(|e| missing("IORING_REGISTER_EVENTFD", e))?;
        Ok(Ring {
            uring: RefCell::new(uring),
            bufs: RefCell::new(bufs),
            sending: RefCell::default(),
            eventfd,
        })
    }

    /// A new descriptor of the eventfd, signalled whenever a completion is posted.
    pub fn eventfd(&self) -> std::io::Result<OwnedFd> {
        self.eventfd.try_clone()
    }

    /// Queues one submission, submitting what is queued first if the queue is full.
    fn push(&self, entry: squeue::Entry) {
        let mut uring = self.uring.borrow_mut();
        loop {
            // SAFETY: every entry built here points only at memory that outlives the request
            // (buffers of `RecvBuffers`, bytes kept in `sending`) or at nothing.
            if unsafe { uring.submission().push(&entry) }.is_ok() {
                return;
            }
            if let Err(e) = uring.submit() {
                tracing::warn!(error = %e, "io_uring submit failed; retrying");
            }
        }
    }

    /// Arms connection `key`'s multishot receive on `fd`.
    pub fn arm_recv(&self, fd: RawFd, key: ConnKey) {
        let entry = opcode::RecvMulti::new(types::Fd(fd), BUF_GROUP)
            .build()
            .user_data(user_data(Op::Recv, key));
        self.push(entry);
    }

    /// Queues a send of `bytes` for connection `key`; the bytes stay here until it completes.
    pub fn send(&self, fd: RawFd, key: ConnKey, bytes: Bytes) {
        let len = bytes.len().min(u32::MAX as usize) as u32;
        let entry = opcode::Send::new(types::Fd(fd), bytes.as_ptr(), len)
            .flags(libc::MSG_NOSIGNAL)
            .build()
            .user_data(user_data(Op::Send, key));
        let replaced = self.sending.borrow_mut().insert(key, bytes);
        debug_assert!(replaced.is_none(), "one send in flight per connection");
        self.push(entry);
    }

    /// The bytes of `key`'s send in flight, once its completion arrived.
    pub fn take_sent(&self, key: ConnKey) -> Option<Bytes> {
        self.sending.borrow_mut().remove(&key)
    }

    /// Cancels every request on `fd` and closes it, through the ring, and submits now.
    pub fn cancel_and_close(&self, fd: RawFd, key: ConnKey) {
        let data = user_data(Op::Close, key);
        let cancel = opcode::AsyncCancel2::new(types::CancelBuilder::fd(types::Fd(fd)).all())
            .build()
            .flags(squeue::Flags::SKIP_SUCCESS)
            .user_data(data);
        let close = opcode::Close::new(types::Fd(fd))
            .build()
            .flags(squeue::Flags::SKIP_SUCCESS)
            .user_data(data);
        self.push(cancel);
        self.push(close);
        self.submit();
    }

    /// Submits everything queued in one `io_uring_enter` (non-blocking).
    pub fn submit(&self) {
        let uring = self.uring.borrow();
        if let Err(e) = uring.submit() {
            // EBUSY/EAGAIN: completions must be reaped first; what is queued stays queued and
            // goes with the next submit.
            tracing::debug!(error = %e, "io_uring submit deferred");
        }
    }

    /// Moves every posted completion into `out` (cleared first); returns how many.
    pub fn reap(&self, out: &mut Vec<Completion>) -> usize {
        out.clear();
        let mut uring = self.uring.borrow_mut();
        for cqe in uring.completion() {
            if let Some((op, key)) = decode(cqe.user_data()) {
                out.push(Completion {
                    op,
                    key,
                    result: cqe.result(),
                    flags: cqe.flags(),
                });
            }
        }
        out.len()
    }

    /// Submits and blocks until a completion is posted (tests only: the shard never waits
    /// here, it awaits the eventfd).
    #[cfg(test)]
    pub fn wait_for_test(&self) {
        self.uring
            .borrow()
            .submit_and_wait(1)
            .expect("io_uring wait");
    }

    /// Whether completions are waiting to be reaped.
    pub fn has_completions(&self) -> bool {
        let mut uring = self.uring.borrow_mut();
        let mut cq = uring.completion();
        cq.sync();
        !cq.is_empty()
    }

    /// Runs `f` on the first `len` bytes of receive buffer `bid`, then hands the buffer back to
    /// the kernel. Call once per completion that carried `bid`.
    pub fn with_buffer<R>(&self, bid: u16, len: usize, f: impl FnOnce(&mut [u8]) -> R) -> R {
        let mut bufs = self.bufs.borrow_mut();
        // SAFETY: a completion handed `bid` over and it goes back to the ring only below.
        let r = f(unsafe { bufs.slice(bid, len) });
        bufs.put(bid);
        bufs.publish();
        r
    }
}

/// Checks that the kernel has every io_uring feature the data path uses: the ring itself, no
/// dropped completions, internal polling (no worker thread for a socket that is not ready),
/// receive/send/close/cancel, provided-buffer rings, skipping successful completions, and a
/// multishot receive that really stays armed (tried on a socket pair).
pub fn check_kernel() -> Result<(), RingError> {
    let mut uring = IoUring::new(8).map_err(|e| missing("io_uring_setup", e))?;
    let params = uring.params();
    if !params.is_feature_nodrop() {
        return Err(missing("IORING_FEAT_NODROP", "feature flag not set"));
    }
    if !params.is_feature_fast_poll() {
        return Err(missing("IORING_FEAT_FAST_POLL", "feature flag not set"));
    }
    let mut probe = io_uring::Probe::new();
    uring
        .submitter()
        .register_probe(&mut probe)
        .map_err(|e| missing("IORING_REGISTER_PROBE", e))?;
    let ops: [(u8, &'static str); 5] = [
        (opcode::Recv::CODE, "IORING_OP_RECV"),
        (opcode::Send::CODE, "IORING_OP_SEND"),
        (opcode::Close::CODE, "IORING_OP_CLOSE"),
        (opcode::AsyncCancel::CODE, "IORING_OP_ASYNC_CANCEL"),
        (opcode::Nop::CODE, "IORING_OP_NOP"),
    ];
    for (code, name) in ops {
        if !probe.is_supported(code) {
            return Err(missing(name, "opcode not supported"));
        }
    }
    let bufs = RecvBuffers::new(2, 64);
    // SAFETY: `bufs` outlives `uring` (declared before it is dropped at the end of this
    // function: `uring` is dropped explicitly first).
    unsafe {
        uring
            .submitter()
            .register_buf_ring_with_flags(bufs.entries as u64, bufs.count, BUF_GROUP, 0)
            .map_err(|e| missing("IORING_REGISTER_PBUF_RING", e))?;
    }
    let result = multishot_self_test(&mut uring);
    drop(uring);
    drop(bufs);
    result
}

/// Arms a multishot receive on one end of a socket pair, writes to the other, and expects a
/// completion with a selected buffer that says the receive stays armed; then cancels it by
/// descriptor with a skipped success.
fn multishot_self_test(uring: &mut IoUring) -> Result<(), RingError> {
    let (a, b) = std::os::unix::net::UnixStream::pair().map_err(|e| missing("socketpair", e))?;
    let key = ConnKey {
        slot: 0,
        generation: 1,
    };
    let recv = opcode::RecvMulti::new(types::Fd(a.as_raw_fd()), BUF_GROUP)
        .build()
        .user_data(user_data(Op::Recv, key));
    // SAFETY: the entry points at the registered buffer group only.
    unsafe { uring.submission().push(&recv) }.map_err(|e| missing("IORING_OP_RECV", e))?;
    std::io::Write::write_all(&mut &b, b"x").map_err(|e| missing("socketpair", e))?;
    uring
        .submit_and_wait(1)
        .map_err(|e| missing("IORING_OP_RECV", e))?;
    let cqe = uring
        .completion()
        .next()
        .ok_or_else(|| missing("IORING_RECV_MULTISHOT", "no completion"))?;
    if cqe.result() != 1 {
        let err = std::io::Error::from_raw_os_error(-cqe.result().min(0));
        return Err(missing("IORING_RECV_MULTISHOT", err));
    }
    if cqueue::buffer_select(cqe.flags()).is_none() {
        return Err(missing("IOSQE_BUFFER_SELECT", "no buffer selected"));
    }
    if !cqueue::more(cqe.flags()) {
        return Err(missing(
            "IORING_RECV_MULTISHOT",
            "the receive did not stay armed",
        ));
    }
    let cancel =
        opcode::AsyncCancel2::new(types::CancelBuilder::fd(types::Fd(a.as_raw_fd())).all())
            .build()
            .flags(squeue::Flags::SKIP_SUCCESS)
            .user_data(user_data(Op::Close, key));
    // SAFETY: the entry points at nothing.
    unsafe { uring.submission().push(&cancel) }
        .map_err(|e| missing("IORING_OP_ASYNC_CANCEL", e))?;
    uring
        .submit_and_wait(1)
        .map_err(|e| missing("IORING_ASYNC_CANCEL_FD", e))?;
    for cqe in uring.completion() {
        match decode(cqe.user_data()) {
            Some((Op::Recv, _)) if cqe.result() == -libc::ECANCELED => {}
            Some((Op::Close, _)) => {
                let err = std::io::Error::from_raw_os_error(-cqe.result().min(0));
                return Err(missing("IORING_ASYNC_CANCEL_FD", err));
            }
            _ => {}
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn user_data_round_trips_and_rejects_unknown_ops() {
        let key = ConnKey {
            slot: 123_456,
            generation: u32::MAX,
        };
        for op in [Op::Recv, Op::Send, Op::Close] {
            assert_eq!(decode(user_data(op, key)), Some((op, key)));
        }
        assert_eq!(decode(0), None);
    }

    #[test]
    fn this_kernel_has_every_feature_used() {
        check_kernel().unwrap();
    }
}
