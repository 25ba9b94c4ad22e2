//! Batched UDP I/O for Linux: `recvmmsg` takes every datagram waiting (up to [`BATCH`]) in
//! one system call and `sendmmsg` returns all the answers in one, so under load the cost of
//! the two system calls is shared by the whole batch. Used by the UDP workers in `server`.

use super::pktinfo::{self, Control};
use super::query;
use super::DnsState;
use std::net::UdpSocket;
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, Ordering};

/// Datagrams per system call, unless `EDGEPOP_DNS_UDP_BATCH` says otherwise (1..=256).
pub const BATCH: usize = 32;
/// Receive buffer per datagram: DNS queries are small; a longer one is cut (`MSG_TRUNC`) and
/// then fails to parse like any other malformed packet.
pub(super) const QUERY_MAX: usize = 4096;

/// The receive loop of one worker; returns when `stop` is set. `reply_source`: the socket is
/// bound to a wildcard address and has `pktinfo` enabled, so each answer names the address
/// its query was sent to as its source.
pub fn udp_loop(
    sock: &UdpSocket,
    state: &DnsState,
    stop: &AtomicBool,
    batch: usize,
    reply_source: bool,
) {
    let batch = batch.clamp(1, 256);
    let fd = sock.as_raw_fd();
    let stats = state.stats();
    let mut map_cache = state.map_cache();
    let mut bufs = vec![[0u8; QUERY_MAX]; batch];
    let mut outs: Vec<Vec<u8>> = (0..batch).map(|_| Vec::with_capacity(1232)).collect();
    // SAFETY: all-zero is a valid value for these plain C structs.
    let mut addrs: Vec<libc::sockaddr_storage> = vec![unsafe { std::mem::zeroed() }; batch];
    let mut iov: Vec<libc::iovec> = vec![
        libc::iovec {
            iov_base: std::ptr::null_mut(),
            iov_len: 0
        };
        batch
    ];
    let mut msgs: Vec<libc::mmsghdr> = vec![unsafe { std::mem::zeroed() }; batch];
    let mut send_iov = iov.clone();
    let mut send_msgs = msgs.clone();
    let controls = if reply_source { batch } else { 0 };
    let mut recv_ctl = vec![Control::default(); controls];
    let mut send_ctl = vec![Control::default(); controls];
    // Headers the kernel wrote into last round; only those need resetting.
    let mut dirty = batch;
    loop {
        for i in 0..dirty {
            iov[i] = libc::iovec {
                iov_base: bufs[i].as_mut_ptr().cast(),
                iov_len: QUERY_MAX,
            };
            msgs[i].msg_hdr.msg_name = (&mut addrs[i] as *mut libc::sockaddr_storage).cast();
            msgs[i].msg_hdr.msg_namelen = std::mem::size_of::<libc::sockaddr_storage>() as u32;
            msgs[i].msg_hdr.msg_iov = &mut iov[i];
            msgs[i].msg_hdr.msg_iovlen = 1;
            if let Some(ctl) = recv_ctl.get_mut(i) {
                msgs[i].msg_hdr.msg_control = ctl.as_mut_ptr();
                msgs[i].msg_hdr.msg_controllen = Control::capacity() as _;
            }
            msgs[i].msg_len = 0;
        }
        dirty = 0;
        // SAFETY: `msgs` holds batch headers whose name and iovec pointers point into
        // `addrs`, `iov` and `bufs`, which outlive the call and are not otherwise borrowed.
        // MSG_WAITFORONE: block for the first datagram, then take only what is already queued.
        // The raw system call: glibc's wrapper adds a cancellation point (two calls into
        // libpthread per receive) that this thread never uses.
        let n = unsafe {
            libc::syscall(
                libc::SYS_recvmmsg,
                fd,
                msgs.as_mut_ptr(),
                batch as libc::c_uint,
                libc::MSG_WAITFORONE,
                std::ptr::null_mut::<libc::timespec>(),
            )
        };
        if stop.load(Ordering::Relaxed) {
            return;
        }
        if n <= 0 {
            let e = std::io::Error::last_os_error();
            if e.kind() != std::io::ErrorKind::Interrupted {
                stats.udp_errors.fetch_add(1, Ordering::Relaxed);
                tracing::debug!(error = %e, "dns udp receive");
            }
            continue;
        }
        let n = n as usize;
        dirty = n;
        stats.record_udp_batch(n);
        let mut answers = 0usize;
        {
            let map = map_cache.load();
            for i in 0..n {
                let len = (msgs[i].msg_len as usize).min(QUERY_MAX);
                // SAFETY: the kernel filled `addrs[i]` with `msg_namelen` bytes of address.
                let src = unsafe { socket2::SockAddr::new(addrs[i], msgs[i].msg_hdr.msg_namelen) }
                    .as_socket();
                let Some(src) = src else { continue };
                let Some(o) = query::handle_udp(&bufs[i][..len], src.ip(), map, &mut outs[i])
                else {
                    continue;
                };
                stats.record(o);
                if outs[i].is_empty() {
                    continue; // dropped by the rate limit
                }
                send_iov[answers] = libc::iovec {
                    iov_base: outs[i].as_mut_ptr().cast(),
                    iov_len: outs[i].len(),
                };
                send_msgs[answers].msg_hdr.msg_name =
                    (&mut addrs[i] as *mut libc::sockaddr_storage).cast();
                send_msgs[answers].msg_hdr.msg_namelen = msgs[i].msg_hdr.msg_namelen;
                send_msgs[answers].msg_hdr.msg_iov = &mut send_iov[answers];
                send_msgs[answers].msg_hdr.msg_iovlen = 1;
                if let Some(ctl) = send_ctl.get_mut(answers) {
                    // SAFETY: the kernel wrote `msgs[i]`'s control bytes into `recv_ctl[i]`
                    // (aligned, `msg_controllen` of them) in the receive above.
                    let len = unsafe { pktinfo::reply_source(&msgs[i].msg_hdr, ctl) };
                    send_msgs[answers].msg_hdr.msg_control = if len == 0 {
                        std::ptr::null_mut()
                    } else {
                        ctl.as_mut_ptr()
                    };
                    send_msgs[answers].msg_hdr.msg_controllen = len as _;
                }
                answers += 1;
            }
        }
        let mut sent = 0usize;
        while sent < answers {
            // SAFETY: headers `sent..answers` point at live `addrs`, `send_iov` and `outs`
            // entries that are not touched until the call returns.
            let r = unsafe {
                libc::syscall(
                    libc::SYS_sendmmsg,
                    fd,
                    send_msgs[sent..].as_mut_ptr(),
                    (answers - sent) as libc::c_uint,
                    0,
                )
            };
            if r <= 0 {
                let e = std::io::Error::last_os_error();
                if e.kind() == std::io::ErrorKind::Interrupted {
                    continue;
                }
                // Drop this answer (e.g. unreachable peer) and carry on with the rest.
                stats.udp_errors.fetch_add(1, Ordering::Relaxed);
                sent += 1;
            } else {
                sent += r as usize;
            }
        }
    }
}
