//! Answering from the address a query was sent to, on a UDP socket bound to a wildcard
//! address (`0.0.0.0`, `[::]`). Such a socket receives for every address of the host (an
//! anycast service address on `lo` beside the unicast one, several addresses on one
//! interface), but the kernel picks an unconnected socket's source address by route, and a
//! resolver drops an answer from an address it did not ask (so does `dig`: "reply from
//! unexpected source"). As gdnsd, NSD and Knot do, the socket asks for each datagram's
//! destination (`IP_PKTINFO`, `IPV6_RECVPKTINFO`) and every answer names it as its source.
//! Sockets bound to one address need none of this and do not pay for it.

use std::io;
use std::os::fd::AsRawFd;

/// Room for one received `in6_pktinfo` (or `in_pktinfo`) control message and then some: a
/// message that does not fit is cut (`MSG_CTRUNC`) and the answer goes out without a source.
const CONTROL_LEN: usize = 64;

/// A control-message buffer aligned as `cmsghdr` requires.
#[derive(Clone, Copy)]
#[repr(C, align(8))]
pub struct Control([u8; CONTROL_LEN]);

impl Default for Control {
    fn default() -> Self {
        Control([0; CONTROL_LEN])
    }
}

impl Control {
    pub fn as_mut_ptr(&mut self) -> *mut libc::c_void {
        self.0.as_mut_ptr().cast()
    }

    pub const fn capacity() -> usize {
        CONTROL_LEN
    }
}

/// Asks the kernel for each datagram's destination address on `sock` (an IPv6 socket gets it
/// for IPv4 clients too, as a mapped address).
pub fn enable(sock: &impl AsRawFd, v4: bool) -> io::Result<()> {
    let (level, name) = if v4 {
        (libc::IPPROTO_IP, libc::IP_PKTINFO)
    } else {
        (libc::IPPROTO_IPV6, libc::IPV6_RECVPKTINFO)
    };
    super::server::set_int_option(sock, level, name, 1)
}

/// Writes into `out` the control message that makes an answer leave from the address the
/// query in `received` (a header the kernel filled by `recvmmsg`) was sent to; returns its
/// length, 0 when the query carried no destination.
///
/// The interface index is left to routing (0), except for an IPv6 link-local address, which
/// means nothing without its interface.
///
/// # Safety
/// `received.msg_control` must point at `received.msg_controllen` readable bytes as the kernel
/// wrote them, aligned for `cmsghdr`.
pub unsafe fn reply_source(received: &libc::msghdr, out: &mut Control) -> usize {
    if received.msg_control.is_null() || received.msg_flags & libc::MSG_CTRUNC != 0 {
        return 0;
    }
    let mut cmsg = libc::CMSG_FIRSTHDR(received);
    while !cmsg.is_null() {
        let c = &*cmsg;
        let data = libc::CMSG_DATA(cmsg);
        let payload = (c.cmsg_len as usize).saturating_sub(data as usize - cmsg as usize);
        if c.cmsg_level == libc::IPPROTO_IP
            && c.cmsg_type == libc::IP_PKTINFO
            && payload >= std::mem::size_of::<libc::in_pktinfo>()
        {
            let got: libc::in_pktinfo = std::ptr::read_unaligned(data.cast());
            let send = libc::in_pktinfo {
                ipi_ifindex: 0,
                ipi_spec_dst: got.ipi_spec_dst,
                ipi_addr: libc::in_addr { s_addr: 0 },
            };
            return write(out, libc::IPPROTO_IP, libc::IP_PKTINFO, &send);
        }
        if c.cmsg_level == libc::IPPROTO_IPV6
            && c.cmsg_type == libc::IPV6_PKTINFO
            && payload >= std::mem::size_of::<libc::in6_pktinfo>()
        {
            let got: libc::in6_pktinfo = std::ptr::read_unaligned(data.cast());
            let link_local =
                got.ipi6_addr.s6_addr[0] == 0xfe && got.ipi6_addr.s6_addr[1] & 0xc0 == 0x80;
            let send = libc::in6_pktinfo {
                ipi6_addr: got.ipi6_addr,
                ipi6_ifindex: if link_local { got.ipi6_ifindex } else { 0 },
            };
            return write(out, libc::IPPROTO_IPV6, libc::IPV6_PKTINFO, &send);
        }
        cmsg = libc::CMSG_NXTHDR(received, cmsg);
    }
    0
}

/// One control message of `level`/`kind` holding `value`, at the start of `out`.
fn write<T: Copy>(out: &mut Control, level: libc::c_int, kind: libc::c_int, value: &T) -> usize {
    let len = std::mem::size_of::<T>() as libc::c_uint;
    // SAFETY: CMSG_SPACE/CMSG_LEN are pure arithmetic.
    let (space, cmsg_len) = unsafe { (libc::CMSG_SPACE(len) as usize, libc::CMSG_LEN(len)) };
    if space > CONTROL_LEN {
        return 0;
    }
    // SAFETY: all-zero is a valid cmsghdr (plain integers and, on some libcs, padding).
    let mut hdr: libc::cmsghdr = unsafe { std::mem::zeroed() };
    hdr.cmsg_len = cmsg_len as _;
    hdr.cmsg_level = level;
    hdr.cmsg_type = kind;
    out.0 = [0; CONTROL_LEN];
    let base = out.0.as_mut_ptr();
    // SAFETY: `out` is aligned for cmsghdr and `space` (header, padding and value) fits in it;
    // the value goes where CMSG_DATA says for a header at `base`.
    unsafe {
        std::ptr::write_unaligned(base.cast::<libc::cmsghdr>(), hdr);
        let data = libc::CMSG_DATA(base.cast::<libc::cmsghdr>());
        std::ptr::write_unaligned(data.cast::<T>(), *value);
    }
    space
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A received header whose control bytes hold one message of `level`/`kind` with `value`.
    fn received<T: Copy>(ctl: &mut Control, level: i32, kind: i32, value: &T) -> libc::msghdr {
        let len = write(ctl, level, kind, value);
        // SAFETY: all-zero is a valid msghdr.
        let mut h: libc::msghdr = unsafe { std::mem::zeroed() };
        h.msg_control = ctl.as_mut_ptr();
        h.msg_controllen = len as _;
        h
    }

    /// The one message in `out` (`len` bytes): level, type and value.
    fn sent<T: Copy>(out: &Control, len: usize) -> (i32, i32, T) {
        assert!(len > 0);
        let hdr: libc::cmsghdr = unsafe { std::ptr::read_unaligned(out.0.as_ptr().cast()) };
        let data = unsafe { libc::CMSG_DATA(out.0.as_ptr().cast()) };
        (hdr.cmsg_level, hdr.cmsg_type, unsafe {
            std::ptr::read_unaligned(data.cast::<T>())
        })
    }

    /// What the kernel reports for an IPv4 datagram sent to `to` on interface `ifindex`.
    fn v4_pktinfo(ifindex: i32, to: [u8; 4]) -> libc::in_pktinfo {
        let addr = libc::in_addr {
            s_addr: u32::from_ne_bytes(to),
        };
        libc::in_pktinfo {
            ipi_ifindex: ifindex,
            ipi_spec_dst: addr,
            ipi_addr: addr,
        }
    }

    #[test]
    fn an_ipv4_answer_leaves_from_the_local_address_with_routing_choosing_the_interface() {
        let got = v4_pktinfo(7, [192, 0, 2, 53]);
        let (mut ctl, mut out) = (Control::default(), Control::default());
        let h = received(&mut ctl, libc::IPPROTO_IP, libc::IP_PKTINFO, &got);
        let len = unsafe { reply_source(&h, &mut out) };
        let (level, kind, v) = sent::<libc::in_pktinfo>(&out, len);
        assert_eq!((level, kind), (libc::IPPROTO_IP, libc::IP_PKTINFO));
        assert_eq!(v.ipi_ifindex, 0);
        assert_eq!(v.ipi_spec_dst.s_addr.to_ne_bytes(), [192, 0, 2, 53]);
    }

    #[test]
    fn an_ipv6_answer_keeps_the_interface_only_for_a_link_local_address() {
        for (addr, want_ifindex) in [
            ("2001:db8::53".parse::<std::net::Ipv6Addr>().unwrap(), 0),
            ("fe80::53".parse().unwrap(), 3),
        ] {
            let got = libc::in6_pktinfo {
                ipi6_addr: libc::in6_addr {
                    s6_addr: addr.octets(),
                },
                ipi6_ifindex: 3,
            };
            let (mut ctl, mut out) = (Control::default(), Control::default());
            let h = received(&mut ctl, libc::IPPROTO_IPV6, libc::IPV6_PKTINFO, &got);
            let len = unsafe { reply_source(&h, &mut out) };
            let (level, kind, v) = sent::<libc::in6_pktinfo>(&out, len);
            assert_eq!((level, kind), (libc::IPPROTO_IPV6, libc::IPV6_PKTINFO));
            assert_eq!(v.ipi6_addr.s6_addr, addr.octets());
            assert_eq!(v.ipi6_ifindex, want_ifindex, "{addr}");
        }
    }

    #[test]
    fn no_destination_or_a_cut_control_message_sends_no_source() {
        let (mut ctl, mut out) = (Control::default(), Control::default());
        // Another message (a hop limit) only.
        let h = received(&mut ctl, libc::IPPROTO_IPV6, libc::IPV6_HOPLIMIT, &64i32);
        assert_eq!(unsafe { reply_source(&h, &mut out) }, 0);
        // A destination, but the kernel cut the control data: not trusted.
        let got = v4_pktinfo(1, [127, 0, 0, 2]);
        let mut h = received(&mut ctl, libc::IPPROTO_IP, libc::IP_PKTINFO, &got);
        assert!(unsafe { reply_source(&h, &mut out) } > 0);
        h.msg_flags = libc::MSG_CTRUNC;
        assert_eq!(unsafe { reply_source(&h, &mut out) }, 0);
        h.msg_control = std::ptr::null_mut();
        h.msg_flags = 0;
        assert_eq!(unsafe { reply_source(&h, &mut out) }, 0);
    }
}
