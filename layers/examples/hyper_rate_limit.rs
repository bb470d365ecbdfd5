//! A plain hyper 1 server (via hyper-util) with rate limiting and idempotency keys
//! around a `service_fn`.
//!
//! ```text
//! cargo run -p upgate-layers --example hyper_rate_limit --features rate-limit,idempotency
//! curl -i -X POST -H 'x-tenant: acme' -H 'idempotency-key: k1' -d hello localhost:3000/uploads
//! ```

use std::convert::Infallible;
use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body::{Body as HttpBody, Frame, SizeHint};
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use hyper_util::service::TowerToHyperService;
use tower::{service_fn, BoxError, ServiceBuilder};
use upgate_layers::idempotency::{IdempotencyLayer, InMemory};
use upgate_layers::rate_limit::{InProcess, Quota, RateLimitLayer};

/// A request body that can wrap hyper's `Incoming` and be rebuilt from bytes (the
/// idempotency layer buffers the body and needs `From<Bytes>`).
struct Body(BoxBody<Bytes, BoxError>);

impl From<Bytes> for Body {
    fn from(bytes: Bytes) -> Self {
        Body(
            Full::new(bytes)
                .map_err(|never: Infallible| match never {})
                .boxed(),
        )
    }
}

impl From<Incoming> for Body {
    fn from(incoming: Incoming) -> Self {
        Body(incoming.map_err(BoxError::from).boxed())
    }
}

impl HttpBody for Body {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        Pin::new(&mut self.0).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.0.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.0.size_hint()
    }
}

fn tenant<B>(req: &Request<B>) -> Option<String> {
    let t = req.headers().get("x-tenant")?.to_str().ok()?;
    Some(format!("{{{t}}}"))
}

async fn handler(req: Request<Body>) -> Result<Response<Full<Bytes>>, BoxError> {
    let body = req.into_body().collect().await?.to_bytes();
    let mut res = Response::new(Full::new(Bytes::from(format!(
        "stored {} bytes\n",
        body.len()
    ))));
    *res.status_mut() = StatusCode::CREATED;
    Ok(res)
}

#[tokio::main]
async fn main() -> Result<(), BoxError> {
    let rate_limit = RateLimitLayer::new(
        |req: &Request<Body>| tenant(req).map(|t| (t, Quota::new(5, 10))),
        InProcess::new(),
    );
    let stats = rate_limit.stats();
    let svc = ServiceBuilder::new()
        .map_request(|req: Request<Incoming>| req.map(Body::from))
        .layer(rate_limit)
        .layer(IdempotencyLayer::new(
            |req: &Request<Body>| tenant(req),
            InMemory::new(),
        ))
        .service(service_fn(handler));

    let listener = tokio::net::TcpListener::bind("127.0.0.1:3000").await?;
    println!("listening on http://{}", listener.local_addr()?);
    loop {
        let (stream, _) = listener.accept().await?;
        let svc = TowerToHyperService::new(svc.clone());
        let stats = stats.clone();
        tokio::spawn(async move {
            if let Err(e) = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(stream), svc)
                .await
            {
                eprintln!("connection error: {e}");
            }
            println!("admitted={} limited={}", stats.admitted(), stats.limited());
        });
    }
}
