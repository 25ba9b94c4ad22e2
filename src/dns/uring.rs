//! io_uring UDP I/O for Linux, the UDP workers' default. One multishot receive stays armed on
//! the socket and fills buffers the worker lends the kernel (a provided-buffer ring), and the
//! answers go out as `sendmsg` entries submitted by the same system call that waits for the
//! next queries. A worker that sleeps between queries, as at a steady 40k queries/s, makes
//! one system call per wake-up where `recvmmsg` + `sendmmsg` take two, and the kernel wakes it
//! through io_uring's task work rather than the socket's wait queue: about 8% less CPU per
//! query there, and 10-15% at the load generator's cap (`benches/dns/README.md`).
//!
//! With `[dns] udp_coalesce` a wait may also hold out for a batch (`coalesce` decides when;
//! Linux 6.12's min-wait does the waiting).
//!
//! Where the kernel refuses io_uring (before 6.1, `kernel.io_uring_disabled`, a seccomp
//! policy), [`Worker::new`] fails and the worker uses `batch` instead.

use super::batch::QUERY_MAX;
use super::coalesce::{Coalescer, WANT};
use super::pktinfo::{self, Control};
use super::query;
use super::DnsState;
use io_uring::types::{BufRingEntry, CancelBuilder, Fd, RecvMsgOut, SubmitArgs, Timespec};
use io_uring::{cqueue, opcode, squeue, IoUring};
use std::alloc::Layout;
use std::io;
use std::os::fd::RawFd;
use std::ptr::NonNull;
use std::sync::atomic::{AtomicBool, AtomicU16, Ordering};
use std::time::{Duration, Instant};

/// Receive buffers lent to the kernel (a power of two). When all hold queries not yet
/// answered, the receive stops (`ENOBUFS`) and is armed again once they are back; datagrams
/// wait in the socket meanwhile.
const BUFFERS: u16 = 128;
/// Answers sent by one system call: one per receive buffer.
const SLOTS: usize = BUFFERS as usize;
const BUFFER_GROUP: u16 = 0;
/// `struct io_uring_recvmsg_out`, which starts each filled buffer.
const OUT_HEADER: usize = 16;
const NAME_LEN: usize = std::mem::size_of::<libc::sockaddr_storage>();
/// What the kernel writes into one buffer: header, source address, the control message when
/// one is asked for (`pktinfo`), then the query. A query longer than [`QUERY_MAX`] is cut and
/// then fails to parse, as in `batch`.
const BUFFER_LEN: usize = OUT_HEADER + NAME_LEN + Control::capacity() + QUERY_MAX;
// The control message inside a buffer must be aligned for `cmsghdr` (`pktinfo` reads it
// through references): buffers start 8-aligned, and so does what follows the address.
const _: () = assert!(BUFFER_LEN % 8 == 0 && (OUT_HEADER + NAME_LEN) % 8 == 0);
/// Submission queue entries: every answer of one round, the receive and the wake-up.
const ENTRIES: u32 = 256;
/// Consecutive failed receives after which the worker gives up on io_uring (the caller
/// then falls back to `recvmmsg`) rather than spin on an error that will not go away.
const MAX_RECV_FAILURES: u32 = 16;
/// How long stopping waits for the kernel to hand back everything it was lent.
const DRAIN: Duration = Duration::from_secs(1);
// `coalesce::WANT`, the completions a coalescing wait ends at, is a quarter of the buffers.
const _: () = assert!(WANT == BUFFERS as usize / 4);
/// With `[dns] udp_coalesce`, the general timeout of a wait. The kernel needs one to go on
/// waiting for a single completion once the window ends with none in (without it, an idle
/// worker would wake every window); when it passes the loop just waits again (a stop comes
/// through the eventfd, not this).
const IDLE_WAIT: Timespec = Timespec::new().sec(1);

/// `user_data` of the multishot receive, the wake-up read and the cancellation; a send (which
/// completes only when it fails) carries `SEND` plus its slot's index.
const RECV: u64 = 1;
const WAKE: u64 = 2;
const CANCEL: u64 = 3;
const SEND: u64 = 1 << 32;
/// Consecutive transient failures of `io_uring_enter` (no memory for a request, a signal)
/// after which the worker gives up on io_uring.
const MAX_ENTER_FAILURES: u32 = 1000;

/// Zeroed memory from the global allocator, freed on drop.
struct Zeroed {
    ptr: NonNull<u8>,
    layout: Layout,
}

impl Zeroed {
    fn new(layout: Layout) -> io::Result<Self> {
        // SAFETY: every layout used here has a non-zero size.
        let ptr = unsafe { std::alloc::alloc_zeroed(layout) };
        let ptr = NonNull::new(ptr).ok_or_else(|| io::Error::from(io::ErrorKind::OutOfMemory))?;
        Ok(Zeroed { ptr, layout })
    }
}

impl Drop for Zeroed {
    fn drop(&mut self) {
        // SAFETY: allocated in `new` with this layout.
        unsafe { std::alloc::dealloc(self.ptr.as_ptr(), self.layout) }
    }
}

/// The ring of receive buffers shared with the kernel (`IORING_REGISTER_PBUF_RING`): the
/// kernel takes buffers from its head, the worker gives them back at its tail.
struct BufRing {
    entries: Zeroed,
    slab: Zeroed,
    tail: u16,
    added: u16,
}

impl BufRing {
    fn new() -> io::Result<Self> {
        // The kernel wants the ring page-aligned.
        // SAFETY: sysconf has no preconditions.
        let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
        let page = usize::try_from(page)
            .ok()
            .filter(|p| p.is_power_of_two())
            .unwrap_or(4096);
        let entries = Layout::from_size_align(
            usize::from(BUFFERS) * std::mem::size_of::<BufRingEntry>(),
            page,
        )
        .map_err(io::Error::other)?;
        // 8-aligned, and so is every buffer (BUFFER_LEN is a multiple of 8), so the control
        // message inside one is aligned for `cmsghdr`.
        let slab = Layout::from_size_align(usize::from(BUFFERS) * BUFFER_LEN, 8)
            .map_err(io::Error::other)?;
        let mut ring = BufRing {
            entries: Zeroed::new(entries)?,
            slab: Zeroed::new(slab)?,
            tail: 0,
            added: 0,
        };
        for bid in 0..BUFFERS {
            ring.give_back(bid);
        }
        ring.commit();
        Ok(ring)
    }

    fn base(&self) -> *mut BufRingEntry {
        self.entries.ptr.as_ptr().cast()
    }

    /// Queues buffer `bid` for the kernel; [`commit`](Self::commit) publishes it.
    fn give_back(&mut self, bid: u16) {
        let idx = self.tail.wrapping_add(self.added) & (BUFFERS - 1);
        // SAFETY: `idx` < BUFFERS, the ring's length; the kernel reads only entries between
        // its head and the published tail, and this one is past the tail.
        let entry = unsafe { &mut *self.base().add(usize::from(idx)) };
        entry.set_addr(self.buffer_ptr(bid) as u64);
        entry.set_len(BUFFER_LEN as u32);
        entry.set_bid(bid);
        self.added += 1;
    }

    fn commit(&mut self) {
        if self.added == 0 {
            return;
        }
        self.tail = self.tail.wrapping_add(self.added);
        self.added = 0;
        // SAFETY: the tail field of the shared ring (inside entry 0, aligned for u16), which
        // the kernel only reads.
        let tail = unsafe { AtomicU16::from_ptr(BufRingEntry::tail(self.base()).cast_mut()) };
        tail.store(self.tail, Ordering::Release);
    }

    fn buffer_ptr(&self, bid: u16) -> *mut u8 {
        // SAFETY: `bid` < BUFFERS, so the offset stays inside the slab.
        unsafe {
            self.slab
                .ptr
                .as_ptr()
                .add(usize::from(bid % BUFFERS) * BUFFER_LEN)
        }
    }

    /// The first `len` bytes of buffer `bid`, as the kernel filled them.
    fn filled(&self, bid: u16, len: usize) -> &[u8] {
        // SAFETY: inside the slab; the kernel handed this buffer back (its completion came)
        // and does not write it again until it is given back.
        unsafe { std::slice::from_raw_parts(self.buffer_ptr(bid), len.min(BUFFER_LEN)) }
    }
}

/// One answer on its way out. `hdr` points into the slot itself, so slots never move (a boxed
/// slice that is never resized). Sends carry `MSG_DONTWAIT`, which io_uring honours by never
/// leaving one pending (`REQ_F_NOWAIT`): it is done, sent or failed, when the system call that
/// submitted it returns, and its slot can take the next answer.
struct Slot {
    hdr: libc::msghdr,
    iov: libc::iovec,
    addr: libc::sockaddr_storage,
    ctl: Control,
    out: Vec<u8>,
}

impl Slot {
    fn new() -> Self {
        Slot {
            // SAFETY: all-zero is a valid value for these plain C structs.
            hdr: unsafe { std::mem::zeroed() },
            iov: libc::iovec {
                iov_base: std::ptr::null_mut(),
                iov_len: 0,
            },
            // SAFETY: as above.
            addr: unsafe { std::mem::zeroed() },
            ctl: Control::default(),
            out: Vec::with_capacity(1232),
        }
    }

    /// Points the header at this slot's answer, address and (`ctl_len` > 0) control message.
    fn prepare(&mut self, addr_len: libc::socklen_t, ctl_len: usize) {
        self.iov = libc::iovec {
            iov_base: self.out.as_mut_ptr().cast(),
            iov_len: self.out.len(),
        };
        self.hdr.msg_name = (&mut self.addr as *mut libc::sockaddr_storage).cast();
        self.hdr.msg_namelen = addr_len;
        self.hdr.msg_iov = &mut self.iov;
        self.hdr.msg_iovlen = 1;
        if ctl_len == 0 {
            self.hdr.msg_control = std::ptr::null_mut();
            self.hdr.msg_controllen = 0;
        } else {
            self.hdr.msg_control = self.ctl.as_mut_ptr();
            self.hdr.msg_controllen = ctl_len as _;
        }
    }
}

/// Everything the kernel may read or write while an operation is in flight.
struct Lent {
    bufs: BufRing,
    slots: Box<[Slot]>,
    /// The receive's template: only its name and control lengths matter.
    recv_hdr: libc::msghdr,
    /// Where the wake-up read puts the eventfd's count. The kernel writes it during system
    /// calls while `run` holds `&mut Lent`, so it is its own allocation, reached only through
    /// its raw pointer.
    wake_buf: Zeroed,
}

/// One UDP worker's ring, on the thread that made it (the ring is single-issuer).
pub struct Worker {
    ring: IoUring,
    /// Boxed so its address holds; `None` once leaked (see `Drop`).
    lent: Option<Box<Lent>>,
    /// The next free slot; back to 0 once the kernel has taken every queued send.
    next_slot: usize,
    fd: RawFd,
    wake_fd: RawFd,
    recv_armed: bool,
    wake_armed: bool,
    /// The kernel can wait for a batch with a bounded delay (`IORING_FEAT_MIN_TIMEOUT`,
    /// Linux 6.12), which `[dns] udp_coalesce` needs.
    min_timeout: bool,
}

impl Worker {
    /// Sets up the ring for socket `fd`; a write to the eventfd `wake_fd` wakes the worker
    /// (to see its stop flag). `reply_source`: ask for each query's destination address and
    /// answer from it (`pktinfo`). Fails where the kernel refuses io_uring.
    pub fn new(fd: RawFd, wake_fd: RawFd, reply_source: bool) -> io::Result<Self> {
        let ring = IoUring::builder()
            .setup_single_issuer()
            .setup_defer_taskrun()
            .setup_submit_all()
            .build(ENTRIES)?;
        // SAFETY: all-zero is a valid msghdr.
        let mut recv_hdr: libc::msghdr = unsafe { std::mem::zeroed() };
        recv_hdr.msg_namelen = NAME_LEN as libc::socklen_t;
        recv_hdr.msg_controllen = if reply_source { Control::capacity() } else { 0 } as _;
        let lent = Box::new(Lent {
            bufs: BufRing::new()?,
            slots: (0..SLOTS).map(|_| Slot::new()).collect(),
            recv_hdr,
            wake_buf: Zeroed::new(Layout::new::<u64>())?,
        });
        // SAFETY: the ring's entries live in `lent`, which outlives the registration: it is
        // freed only after the ring has handed everything back (`drain`), or leaked.
        unsafe {
            ring.submitter().register_buf_ring_with_flags(
                lent.bufs.base() as u64,
                BUFFERS,
                BUFFER_GROUP,
                0,
            )?;
        }
        let min_timeout = ring.params().is_feature_min_timeout();
        Ok(Worker {
            ring,
            lent: Some(lent),
            next_slot: 0,
            fd,
            wake_fd,
            recv_armed: false,
            wake_armed: false,
            min_timeout,
        })
    }

    /// Answers queries until `stop` is set (Ok) or io_uring fails (Err: the caller falls
    /// back to `recvmmsg` on the same socket).
    pub fn run(&mut self, state: &DnsState, stop: &AtomicBool) -> io::Result<()> {
        let stats = state.stats();
        let mut map_cache = state.map_cache();
        let mut failures = 0u32;
        let mut enter_failures = 0u32;
        let mut coalesce_was_on = false;
        let mut coalescer = Coalescer::new(Instant::now());
        let mut done: Vec<(u64, i32, u32)> = Vec::with_capacity(2 * SLOTS);
        let Some(lent) = self.lent.as_deref_mut() else {
            return Err(io::Error::other("io_uring worker already stopped"));
        };
        let (submitter, mut sq, mut cq) = self.ring.split();
        let push = |sq: &mut squeue::SubmissionQueue<'_>, e: squeue::Entry| {
            // SAFETY: every entry points into `lent` (boxed, alive until drained) or at
            // nothing.
            while unsafe { sq.push(&e) }.is_err() {
                sq.sync();
                submitter.submit()?;
                sq.sync();
            }
            io::Result::Ok(())
        };
        loop {
            if !self.recv_armed {
                let recv = opcode::RecvMsgMulti::new(Fd(self.fd), &lent.recv_hdr, BUFFER_GROUP);
                push(&mut sq, recv.build().user_data(RECV))?;
                self.recv_armed = true;
            }
            if !self.wake_armed {
                let buf = lent.wake_buf.ptr.as_ptr();
                push(
                    &mut sq,
                    opcode::Read::new(Fd(self.wake_fd), buf, 8)
                        .build()
                        .user_data(WAKE),
                )?;
                self.wake_armed = true;
            }
            sq.sync();
            let coalesce = state.udp_coalesce_us();
            if coalesce > 0 && !coalesce_was_on {
                if !self.min_timeout {
                    tracing::warn!("[dns] udp_coalesce needs Linux 6.12 or later; this DNS UDP worker answers at once");
                }
                // Turned on (at start or by a reload): measure afresh, not from a rate
                // counted before it was turned off.
                coalescer = Coalescer::new(Instant::now());
            }
            // Warned (and measured) again if a reload turns it off and on.
            coalesce_was_on = coalesce > 0;
            let window = if self.min_timeout {
                coalescer.window(coalesce)
            } else {
                0
            };
            match wait(&submitter, window) {
                Ok(_) => enter_failures = 0,
                Err(e)
                    if matches!(
                        e.raw_os_error(),
                        Some(libc::EINTR | libc::EBUSY | libc::EAGAIN | libc::ENOMEM)
                    ) && enter_failures < MAX_ENTER_FAILURES =>
                {
                    enter_failures += 1;
                }
                Err(e) => return Err(e),
            }
            sq.sync();
            if sq.is_empty() {
                self.next_slot = 0;
            }
            if stop.load(Ordering::Relaxed) {
                return Ok(());
            }
            // Taken out of the queue first, and the queue's head published before the next
            // wait (else the kernel still counts them and that wait returns at once).
            cq.sync();
            done.clear();
            done.extend((&mut cq).map(|c| (c.user_data(), c.result(), c.flags())));
            cq.sync();
            // Failed sends before anything else: their slots take new answers below.
            for &(data, res, _) in &done {
                if let Some(i) = data.checked_sub(SEND) {
                    resend(lent, i, res, self.fd, stats);
                }
            }
            let batch = done
                .iter()
                .filter(|&&(data, _, flags)| data == RECV && cqueue::buffer_select(flags).is_some())
                .count();
            stats.record_udp_batch(batch);
            if coalesce > 0 {
                coalescer.record(Instant::now(), batch, window);
            }
            let map = map_cache.load();
            for &(data, res, flags) in &done {
                match data {
                    RECV => {
                        if !cqueue::more(flags) {
                            self.recv_armed = false;
                        }
                        let Some(bid) = cqueue::buffer_select(flags) else {
                            if res != -libc::ENOBUFS {
                                stats.udp_errors.fetch_add(1, Ordering::Relaxed);
                                failures += 1;
                                if failures >= MAX_RECV_FAILURES {
                                    return Err(io::Error::from_raw_os_error(-res));
                                }
                            }
                            continue;
                        };
                        failures = 0;
                        let len = usize::try_from(res).unwrap_or(0);
                        if let Some(send) =
                            answer(lent, &mut self.next_slot, bid, len, map, stats, self.fd)
                        {
                            push(&mut sq, send)?;
                        }
                        lent.bufs.give_back(bid);
                    }
                    WAKE => self.wake_armed = false,
                    _ => {}
                }
            }
            lent.bufs.commit();
        }
    }

    /// Cancels what is in flight and waits (up to [`DRAIN`]) for the kernel to hand it all
    /// back; false if it did not.
    fn drain(&mut self) -> bool {
        let cancel = opcode::AsyncCancel2::new(CancelBuilder::any())
            .build()
            .user_data(CANCEL);
        // SAFETY: a cancellation points at nothing.
        if unsafe { self.ring.submission().push(&cancel) }.is_err() {
            let _ = self.ring.submit();
            // SAFETY: as above.
            if unsafe { self.ring.submission().push(&cancel) }.is_err() {
                return false;
            }
        }
        let deadline = Instant::now() + DRAIN;
        loop {
            for cqe in self.ring.completion() {
                match cqe.user_data() {
                    RECV if !cqueue::more(cqe.flags()) => self.recv_armed = false,
                    WAKE => self.wake_armed = false,
                    _ => {}
                }
            }
            self.ring.submission().sync();
            if !self.recv_armed && !self.wake_armed && self.ring.submission().is_empty() {
                return true;
            }
            if Instant::now() >= deadline {
                return false;
            }
            let ts = Timespec::new().nsec(50_000_000);
            let args = SubmitArgs::new().timespec(&ts);
            if let Err(e) = self.ring.submitter().submit_with_args(1, &args) {
                if !matches!(
                    e.raw_os_error(),
                    Some(libc::ETIME | libc::EINTR | libc::EBUSY)
                ) {
                    return false;
                }
            }
        }
    }
}

impl Drop for Worker {
    fn drop(&mut self) {
        if !self.drain() {
            tracing::warn!(
                "io_uring DNS worker: the kernel kept buffers past shutdown; leaking them"
            );
            if let Some(lent) = self.lent.take() {
                std::mem::forget(lent);
            }
        }
    }
}

/// Submits what is queued and waits: for one completion, or with `coalesce_us` for
/// [`WANT`] of them, but no longer than `coalesce_us` once one is in. A query that
/// comes to a worker idle for longer than that is answered at once: the kernel then waits
/// for a single completion. `ETIME` is no failure: the window ended with completions in, or
/// [`IDLE_WAIT`] passed without any; the caller reads whatever is there.
fn wait(submitter: &io_uring::Submitter<'_>, coalesce_us: u32) -> io::Result<usize> {
    if coalesce_us == 0 {
        return submitter.submit_and_wait(1);
    }
    let args = SubmitArgs::new()
        .timespec(&IDLE_WAIT)
        .min_wait_usec(coalesce_us);
    match submitter.submit_with_args(WANT, &args) {
        Err(e) if e.raw_os_error() == Some(libc::ETIME) => Ok(0),
        r => r,
    }
}

/// Answers the query in buffer `bid` (`len` bytes filled): the send entry for the answer (in
/// slot `next_slot`, which moves on), or None (nothing to send, or no free slot).
fn answer(
    lent: &mut Lent,
    next_slot: &mut usize,
    bid: u16,
    len: usize,
    map: &super::map::Map,
    stats: &super::stats::Stats,
    fd: RawFd,
) -> Option<squeue::Entry> {
    let msg = RecvMsgOut::parse(lent.bufs.filled(bid, len), &lent.recv_hdr).ok()?;
    let name = msg.name_data();
    if msg.is_name_data_truncated() || name.len() > NAME_LEN {
        return None;
    }
    // SAFETY: all-zero is a valid sockaddr_storage; `name` fits in it (checked above).
    let mut addr: libc::sockaddr_storage = unsafe { std::mem::zeroed() };
    unsafe {
        std::ptr::copy_nonoverlapping(
            name.as_ptr(),
            (&mut addr as *mut libc::sockaddr_storage).cast::<u8>(),
            name.len(),
        );
    }
    let addr_len = name.len() as libc::socklen_t;
    // SAFETY: the kernel wrote `addr_len` bytes of a socket address.
    let src = unsafe { socket2::SockAddr::new(addr, addr_len) }.as_socket()?;
    let Some(slot) = lent.slots.get_mut(*next_slot) else {
        // Every slot holds an answer the kernel has not taken yet (it refused a submission).
        stats.udp_errors.fetch_add(1, Ordering::Relaxed);
        return None;
    };
    let query = msg.payload_data();
    let query = &query[..query.len().min(QUERY_MAX)];
    let sent = match query::handle_udp(query, src.ip(), map, &mut slot.out) {
        Some(o) => {
            stats.record(o);
            !slot.out.is_empty() // empty: dropped by the rate limit
        }
        None => false,
    };
    if !sent {
        return None;
    }
    *next_slot += 1;
    slot.addr = addr;
    let ctl_len = if lent.recv_hdr.msg_controllen > 0 {
        reply_source(&msg, &mut slot.ctl)
    } else {
        0
    };
    slot.prepare(addr_len, ctl_len);
    let send = opcode::SendMsg::new(Fd(fd), &slot.hdr)
        .flags(libc::MSG_DONTWAIT as u32)
        .build()
        .flags(squeue::Flags::SKIP_SUCCESS);
    Some(send.user_data(SEND + *next_slot as u64 - 1))
}

/// A send of slot `i` failed with `res`. A full send buffer (`EAGAIN`: sends carry
/// `MSG_DONTWAIT`) is waited out with a blocking `sendmsg`, as the `recvmmsg` path's blocking
/// `sendmmsg` does; other errors (an unreachable peer) drop the answer.
fn resend(lent: &Lent, i: u64, res: i32, fd: RawFd, stats: &super::stats::Stats) {
    let slot = usize::try_from(i).ok().and_then(|i| lent.slots.get(i));
    if let (Some(slot), true) = (slot, res == -libc::EAGAIN) {
        // SAFETY: the slot's header still points at its own address, iovec, control message
        // and answer (slots are reused only after this), and the socket is open.
        if unsafe { libc::sendmsg(fd, &slot.hdr, 0) } >= 0 {
            return;
        }
    }
    stats.udp_errors.fetch_add(1, Ordering::Relaxed);
}

/// The control message that makes the answer leave from the query's destination address.
fn reply_source(msg: &RecvMsgOut<'_>, out: &mut Control) -> usize {
    let ctl = msg.control_data();
    // SAFETY: all-zero is a valid msghdr.
    let mut h: libc::msghdr = unsafe { std::mem::zeroed() };
    h.msg_control = ctl.as_ptr().cast_mut().cast();
    h.msg_controllen = ctl.len() as _;
    h.msg_flags = msg.flags() as libc::c_int;
    // SAFETY: `ctl` is the control data as the kernel wrote it, `ctl.len()` bytes, aligned
    // for `cmsghdr` (8-aligned buffer, 8-aligned offset); read only.
    unsafe { pktinfo::reply_source(&h, out) }
}
