//! A loopback TCP proxy that injects faults between a client (the gateway) and a server
//! (Redis, S3), in the manner of toxiproxy: pass traffic, refuse connections, stall them,
//! or cut them after a number of bytes.
//!
//! ```no_run
//! # async fn demo() {
//! use upgate_testkit::fault::{Fault, FaultProxy};
//! let proxy = FaultProxy::start("127.0.0.1:6379".parse().unwrap()).await;
//! // point the client at proxy.addr() ...
//! proxy.set(Fault::Refuse); // every connection, open ones included, is closed
//! proxy.set(Fault::Pass);   // healed
//! # }
//! ```
//!
//! Changing the fault cuts every open connection (so a pooled keep-alive connection sees the
//! fault too) except when the new fault is [`Fault::Pass`].

use std::net::SocketAddr;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

/// What the proxy does to connections.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    /// Forward both ways.
    Pass,
    /// Accept and close at once (the server is down).
    Refuse,
    /// Accept and read, but forward nothing and never answer (the server hangs).
    Stall,
    /// Forward the request, then close the connection once this many bytes of the answer
    /// have been forwarded (a cut mid-response).
    CutResponseAfter(usize),
    /// Forward, but close the connection once this many bytes of the request have been
    /// forwarded (a cut mid-upload).
    CutRequestAfter(usize),
}

/// A running proxy; stops when dropped.
pub struct FaultProxy {
    addr: SocketAddr,
    fault: watch::Sender<(u64, Fault)>,
    task: tokio::task::JoinHandle<()>,
}

impl FaultProxy {
    /// Listens on a free loopback port and forwards to `target`.
    pub async fn start(target: SocketAddr) -> FaultProxy {
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind the fault proxy");
        let addr = listener.local_addr().expect("proxy address");
        let (tx, rx) = watch::channel((0u64, Fault::Pass));
        let task = tokio::spawn(async move {
            loop {
                let Ok((client, _)) = listener.accept().await else {
                    continue;
                };
                let rx = rx.clone();
                tokio::spawn(handle(client, target, rx));
            }
        });
        FaultProxy {
            addr,
            fault: tx,
            task,
        }
    }

    /// The address clients connect to.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Applies `fault` to new connections and, unless it is [`Fault::Pass`], cuts the open
    /// ones.
    pub fn set(&self, fault: Fault) {
        self.fault.send_modify(|(generation, f)| {
            *generation += 1;
            *f = fault;
        });
    }

    /// The fault in force.
    pub fn fault(&self) -> Fault {
        self.fault.borrow().1
    }
}

impl Drop for FaultProxy {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn handle(mut client: TcpStream, target: SocketAddr, mut rx: watch::Receiver<(u64, Fault)>) {
    let (generation, fault) = *rx.borrow_and_update();
    match fault {
        Fault::Refuse => return,
        Fault::Stall => {
            let mut sink = [0u8; 8192];
            loop {
                tokio::select! {
                    r = client.read(&mut sink) => if matches!(r, Ok(0) | Err(_)) { return },
                    _ = rx.changed() => return,
                }
            }
        }
        _ => {}
    }
    let Ok(server) = tokio::time::timeout(Duration::from_secs(5), TcpStream::connect(target)).await
    else {
        return;
    };
    let Ok(server) = server else { return };
    let _ = client.set_nodelay(true);
    let _ = server.set_nodelay(true);
    let (request_limit, response_limit) = match fault {
        Fault::CutRequestAfter(n) => (Some(n), None),
        Fault::CutResponseAfter(n) => (None, Some(n)),
        _ => (None, None),
    };
    let (cr, cw) = client.into_split();
    let (sr, sw) = server.into_split();
    let limit_hit = std::sync::Arc::new(tokio::sync::Notify::new());
    let copy_up = pipe(cr, sw, request_limit, limit_hit.clone());
    let copy_down = pipe(sr, cw, response_limit, limit_hit.clone());
    let cut = async {
        loop {
            if rx.changed().await.is_err() {
                return;
            }
            let (g, f) = *rx.borrow();
            if g != generation && f != Fault::Pass {
                return;
            }
        }
    };
    // The connection ends when both directions end, when a limited direction hits its
    // limit (the peer sees the connection close mid-stream), or when the fault changes.
    tokio::select! {
        _ = async { tokio::join!(copy_up, copy_down) } => {}
        _ = limit_hit.notified() => {}
        _ = cut => {}
    }
}

/// Copies until EOF, an error, or `limit` bytes; then shuts the writer.
async fn pipe<R, W>(
    mut r: R,
    mut w: W,
    limit: Option<usize>,
    limit_hit: std::sync::Arc<tokio::sync::Notify>,
) where
    R: tokio::io::AsyncRead + Unpin,
    W: tokio::io::AsyncWrite + Unpin,
{
    let mut buf = vec![0u8; 16 * 1024];
    let mut sent = 0usize;
    loop {
        let n = match r.read(&mut buf).await {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        let n = match limit {
            Some(l) if sent + n >= l => {
                let take = l - sent;
                let _ = w.write_all(&buf[..take]).await;
                let _ = w.flush().await;
                limit_hit.notify_one();
                return;
            }
            _ => n,
        };
        if w.write_all(&buf[..n]).await.is_err() {
            break;
        }
        sent += n;
    }
    let _ = w.shutdown().await;
}
