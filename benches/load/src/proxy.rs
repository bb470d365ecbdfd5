//! `tcp-proxy`: the cheapest proxy a byte path can have, for reference. Every accepted
//! connection is forwarded to one upstream with `tokio::io::copy_bidirectional_with_sizes`:
//! no HTTP parsing, no Redis, no S3 client, buffers of the gateway's read-buffer size.
//! `parts-presigned --via` through it measures what *any* user-space proxy costs on this
//! machine (two more kernel copies and one more loopback hop per byte), which bounds what
//! the gateway's proxied parts can reach against direct presigned PUTs.

use tokio::net::{TcpListener, TcpStream};

/// Forwards connections from `listen` to `to` until the process is killed.
pub async fn serve(listen: &str, to: &str, buffer: usize) -> Result<(), String> {
    let listener = TcpListener::bind(listen)
        .await
        .map_err(|e| format!("bind {listen}: {e}"))?;
    println!(
        "PROXY_ADDR={}",
        listener.local_addr().map_err(|e| e.to_string())?
    );
    loop {
        let (mut down, _) = match listener.accept().await {
            Ok(s) => s,
            Err(e) => {
                eprintln!("tcp-proxy: accept: {e}");
                tokio::time::sleep(std::time::Duration::from_millis(10)).await;
                continue;
            }
        };
        let to = to.to_owned();
        tokio::spawn(async move {
            let mut up = match TcpStream::connect(&to).await {
                Ok(s) => s,
                Err(e) => {
                    eprintln!("tcp-proxy: connect {to}: {e}");
                    return;
                }
            };
            let _ = down.set_nodelay(true);
            let _ = up.set_nodelay(true);
            let _ =
                tokio::io::copy_bidirectional_with_sizes(&mut down, &mut up, buffer, buffer).await;
        });
    }
}
