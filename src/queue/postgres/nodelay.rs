//! `TCP_NODELAY` on our connections to Postgres.
//!
//! sqlx leaves Nagle's algorithm on. A statement bigger than one TCP segment (a group of
//! attempt ends carrying their responses, a group of accepted requests) then held its
//! last, partial segment until the server acknowledged the first, and Linux delays that
//! acknowledgement by up to 40 ms. On the benchmark (concurrency 256, 200 ms upstream) it
//! was most of the p99: 340 ms through the gateway with Nagle, 290 ms without.
//!
//! sqlx does not hand out its socket, so the connection's socket is found among the
//! process's descriptors by its two ends: the local port the server reports for it and
//! the server's port.

use sqlx::PgConnection;

/// This connection's server process id, and `TCP_NODELAY` set on its socket when it is
/// a TCP connection (a Unix socket needs nothing).
pub async fn backend_pid_and_nodelay(
    conn: &mut PgConnection,
    server_port: u16,
) -> sqlx::Result<i32> {
    let (pid, client_port): (i32, Option<i32>) =
        sqlx::query_as("SELECT pg_backend_pid(), inet_client_port()")
            .fetch_one(conn)
            .await?;
    if let Some(port) = client_port.and_then(|p| u16::try_from(p).ok()) {
        set_on_socket(port, server_port);
    }
    Ok(pid)
}

#[cfg(target_os = "linux")]
fn set_on_socket(local_port: u16, peer_port: u16) {
    let Ok(fds) = std::fs::read_dir("/proc/self/fd") else {
        return;
    };
    for entry in fds.flatten() {
        let Some(fd) = entry
            .file_name()
            .to_str()
            .and_then(|s| s.parse::<i32>().ok())
        else {
            continue;
        };
        if sys::ports(fd) == Some((local_port, peer_port)) {
            if !sys::set_nodelay(fd) {
                tracing::debug!(fd, "cannot set TCP_NODELAY on a Postgres connection");
            }
            return;
        }
    }
}

#[cfg(not(target_os = "linux"))]
fn set_on_socket(_local_port: u16, _peer_port: u16) {}

#[cfg(target_os = "linux")]
mod sys {
    use std::mem::{MaybeUninit, size_of};

    /// The local and peer ports of `fd` if it is a connected TCP socket.
    pub fn ports(fd: i32) -> Option<(u16, u16)> {
        let kind = option(fd, libc::SOL_SOCKET, libc::SO_TYPE)?;
        if kind != libc::SOCK_STREAM {
            return None;
        }
        Some((
            port_of(fd, libc::getsockname)?,
            port_of(fd, libc::getpeername)?,
        ))
    }

    pub fn set_nodelay(fd: i32) -> bool {
        let on: libc::c_int = 1;
        // SAFETY: `on` outlives the call and its size is passed with it; `fd` is only
        // read by the kernel, which checks it.
        let r = unsafe {
            libc::setsockopt(
                fd,
                libc::IPPROTO_TCP,
                libc::TCP_NODELAY,
                (&raw const on).cast(),
                size_of::<libc::c_int>() as libc::socklen_t,
            )
        };
        r == 0
    }

    fn option(fd: i32, level: i32, name: i32) -> Option<libc::c_int> {
        let mut value: libc::c_int = 0;
        let mut len = size_of::<libc::c_int>() as libc::socklen_t;
        // SAFETY: the kernel writes at most `len` bytes into `value`.
        let r = unsafe { libc::getsockopt(fd, level, name, (&raw mut value).cast(), &mut len) };
        (r == 0).then_some(value)
    }

    type NameFn =
        unsafe extern "C" fn(libc::c_int, *mut libc::sockaddr, *mut libc::socklen_t) -> libc::c_int;

    fn port_of(fd: i32, name: NameFn) -> Option<u16> {
        let mut addr = MaybeUninit::<libc::sockaddr_storage>::zeroed();
        let mut len = size_of::<libc::sockaddr_storage>() as libc::socklen_t;
        // SAFETY: the kernel writes at most `len` bytes, the size of a sockaddr_storage.
        let r = unsafe { name(fd, addr.as_mut_ptr().cast(), &mut len) };
        if r != 0 {
            return None;
        }
        // SAFETY: zero-initialised and, on success, filled in by the kernel.
        let addr = unsafe { addr.assume_init() };
        match i32::from(addr.ss_family) {
            libc::AF_INET => {
                // SAFETY: the family says this is a sockaddr_in, which fits in the storage.
                let v4 = unsafe { &*(&raw const addr).cast::<libc::sockaddr_in>() };
                Some(u16::from_be(v4.sin_port))
            }
            libc::AF_INET6 => {
                // SAFETY: as above, for sockaddr_in6.
                let v6 = unsafe { &*(&raw const addr).cast::<libc::sockaddr_in6>() };
                Some(u16::from_be(v6.sin6_port))
            }
            _ => None,
        }
    }
}

#[cfg(all(test, target_os = "linux"))]
mod tests {
    use std::os::fd::AsRawFd;

    use super::*;

    #[test]
    fn finds_a_connection_by_its_ports_and_sets_nodelay() {
        let server = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let client = std::net::TcpStream::connect(server.local_addr().unwrap()).unwrap();
        let _accepted = server.accept().unwrap();
        client.set_nodelay(false).unwrap();
        let local = client.local_addr().unwrap().port();
        let peer = server.local_addr().unwrap().port();
        assert_eq!(sys::ports(client.as_raw_fd()), Some((local, peer)));
        set_on_socket(local, peer);
        assert!(client.nodelay().unwrap());
    }
}
