//! `tcp-proxy`: the cheapest proxy a byte path can have, for reference. Every accepted
//! connection is forwarded to one upstream: no HTTP parsing, no Redis, no S3 client.
//!
//! * default: `tokio::io::copy_bidirectional_with_sizes` with buffers of the gateway's
//!   read-buffer size: what *any* user-space proxy costs on this machine (two more kernel
//!   copies and one more loopback hop per byte);
//! * `--splice` (Linux): `splice(2)` through a pipe, so the proxy never copies a byte into
//!   user space: the floor for a proxy that still terminates both TCP connections.
//!
//! `parts-presigned --via` through it bounds what the gateway's proxied parts can reach
//! against direct presigned PUTs.

use tokio::net::{TcpListener, TcpStream};

/// Forwards connections from `listen` to `to` until the process is killed.
pub async fn serve(listen: &str, to: &str, buffer: usize, zero_copy: bool) -> Result<(), String> {
    #[cfg(not(target_os = "linux"))]
    if zero_copy {
        return Err("--splice needs Linux".into());
    }
    let listener = TcpListener::bind(listen)
        .await
        .map_err(|e| format!("bind {listen}: {e}"))?;
    println!(
        "PROXY_ADDR={}",
        listener.local_addr().map_err(|e| e.to_string())?
    );
    loop {
        let mut down = crate::accept(&listener, "tcp-proxy").await;
        let to = to.to_owned();
        tokio::spawn(async move {
            let mut up = match TcpStream::connect(&to).await {
                Ok(s) => s,
                Err(e) => {
                    eprintln!("tcp-proxy: connect {to}: {e}");
                    return;
                }
            };
            let _ = up.set_nodelay(true);
            #[cfg(target_os = "linux")]
            if zero_copy {
                let (a, b) = tokio::join!(
                    splice::forward(&down, &up, buffer),
                    splice::forward(&up, &down, buffer)
                );
                if let Err(e) = a.and(b) {
                    eprintln!("tcp-proxy: splice: {e}");
                }
                return;
            }
            let _ =
                tokio::io::copy_bidirectional_with_sizes(&mut down, &mut up, buffer, buffer).await;
        });
    }
}

#[cfg(target_os = "linux")]
mod splice {
    use std::io;
    use std::os::fd::AsFd;

    use nix::fcntl::{fcntl, splice, FcntlArg, OFlag, SpliceFFlags};
    use tokio::io::Interest;
    use tokio::net::TcpStream;

    /// Moves bytes `from` → `to` through a pipe with splice(2) until `from` reaches EOF,
    /// then shuts down `to`'s sending side.
    pub(super) async fn forward(from: &TcpStream, to: &TcpStream, chunk: usize) -> io::Result<()> {
        let (pipe_r, pipe_w) = nix::unistd::pipe2(OFlag::O_CLOEXEC | OFlag::O_NONBLOCK)?;
        // A pipe holds 64 KiB by default; give it the chunk size (best effort).
        let _ = fcntl(&pipe_w, FcntlArg::F_SETPIPE_SZ(chunk as i32));
        let flags = SpliceFFlags::SPLICE_F_MOVE | SpliceFFlags::SPLICE_F_NONBLOCK;
        loop {
            let n = loop {
                from.readable().await?;
                match from.try_io(Interest::READABLE, || {
                    splice(from.as_fd(), None, &pipe_w, None, chunk, flags).map_err(io::Error::from)
                }) {
                    Ok(n) => break n,
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                    Err(e) => return Err(e),
                }
            };
            if n == 0 {
                // Half-close, as copy_bidirectional does.
                let _ = nix::sys::socket::shutdown(
                    std::os::fd::AsRawFd::as_raw_fd(to),
                    nix::sys::socket::Shutdown::Write,
                );
                return Ok(());
            }
            let mut left = n;
            while left > 0 {
                to.writable().await?;
                match to.try_io(Interest::WRITABLE, || {
                    splice(&pipe_r, None, to.as_fd(), None, left, flags).map_err(io::Error::from)
                }) {
                    Ok(m) => left -= m,
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                    Err(e) => return Err(e),
                }
            }
        }
    }
}
