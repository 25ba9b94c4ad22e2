//! The PoP-origin round trip as the kernel measures it on the pooled TCP connections
//! (TCP_INFO's smoothed RTT), beside the h2 PING round trip: it covers http/1.1 origins too.
//! Through the user-space WAN relay it shows the loopback hop only, not the simulated delay.

use std::os::fd::RawFd;
use std::time::Duration;

/// Smoothed RTT of the TCP socket `fd`, if the kernel reports one.
///
/// The caller checks the connection is still open just before; if it closed in between and the
/// number was reused, the result is another socket's RTT — a wrong statistic, never unsafety.
#[cfg(target_os = "linux")]
pub fn tcp_rtt(fd: RawFd) -> Option<Duration> {
    // SAFETY: tcp_info is plain old data; getsockopt writes at most `len` bytes into it and
    // reports how many; an invalid fd makes it fail with EBADF/ENOTSOCK.
    let mut info: libc::tcp_info = unsafe { std::mem::zeroed() };
    let mut len = std::mem::size_of::<libc::tcp_info>() as libc::socklen_t;
    let rc = unsafe {
        libc::getsockopt(
            fd,
            libc::IPPROTO_TCP,
            libc::TCP_INFO,
            (&mut info as *mut libc::tcp_info).cast(),
            &mut len,
        )
    };
    (rc == 0 && info.tcpi_rtt > 0).then(|| Duration::from_micros(u64::from(info.tcpi_rtt)))
}

#[cfg(not(target_os = "linux"))]
pub fn tcp_rtt(_fd: RawFd) -> Option<Duration> {
    None
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::AsRawFd;

    #[test]
    fn a_connected_loopback_socket_reports_an_rtt() {
        let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let c = std::net::TcpStream::connect(l.local_addr().expect("addr")).expect("connect");
        let rtt = tcp_rtt(c.as_raw_fd()).expect("rtt");
        assert!(rtt < Duration::from_secs(1));
        assert_eq!(tcp_rtt(-1), None);
    }
}
