//! A gRPC service (tonic) behind `RateLimit` and `Idempotency`, both keyed by request
//! metadata: `x-tenant` chooses the quota's key and the idempotency scope, `idempotency-key`
//! names a call that may be retried.
//!
//! Over quota, a call fails with `RESOURCE_EXHAUSTED`, and the IETF `ratelimit`,
//! `ratelimit-policy` and `retry-after` headers arrive as the status' metadata. A call repeated
//! with the same `idempotency-key` gets the stored response (with `idempotent-replayed: true`
//! in its metadata) and the service does not run again.
//!
//! The service is written without code generation (no `protoc`): two prost messages and a
//! `tower::Service` that routes one method through `tonic::server::Grpc`.
//!
//! `cargo run -p upgate-layers --example tonic_grpc --features rate-limit,idempotency,keys`

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::Bytes;
use http::{Request, Response};
use http_body_util::Full;
use tonic::codegen::http::uri::PathAndQuery;
use tonic::{Code, Status};
use tower::{BoxError, Service, ServiceBuilder};
use upgate_layers::idempotency::{self, IdempotencyBody, IdempotencyLayer, Rejection};
use upgate_layers::key::{HeaderValue, Scope, WithQuota};
use upgate_layers::rate_limit::{self, Decision, Quota, RateLimitLayer};

/// `demo.Greeter/SayHello`'s request.
#[derive(Clone, PartialEq, prost::Message)]
pub struct HelloRequest {
    /// Who to greet.
    #[prost(string, tag = "1")]
    pub name: String,
}

/// `demo.Greeter/SayHello`'s response.
#[derive(Clone, PartialEq, prost::Message)]
pub struct HelloReply {
    /// The greeting.
    #[prost(string, tag = "1")]
    pub message: String,
    /// How many times the service has run (a replay does not run it).
    #[prost(uint64, tag = "2")]
    pub calls: u64,
}

/// The method's path.
pub const SAY_HELLO: &str = "/demo.Greeter/SayHello";

/// The unary method.
#[derive(Clone, Default)]
pub struct Greeter {
    /// Times the method ran.
    pub calls: Arc<AtomicU64>,
}

impl tonic::server::UnaryService<HelloRequest> for Greeter {
    type Response = HelloReply;
    type Future = Pin<Box<dyn Future<Output = Result<tonic::Response<HelloReply>, Status>> + Send>>;

    fn call(&mut self, req: tonic::Request<HelloRequest>) -> Self::Future {
        let calls = self.calls.fetch_add(1, Ordering::SeqCst) + 1;
        Box::pin(async move {
            let name = req.into_inner().name;
            if name.is_empty() {
                return Err(Status::invalid_argument("name is empty"));
            }
            Ok(tonic::Response::new(HelloReply {
                message: format!("hello, {name}"),
                calls,
            }))
        })
    }
}

/// The gRPC service: routes `SayHello`, answers `UNIMPLEMENTED` to anything else.
#[derive(Clone, Default)]
pub struct GreeterServer(pub Greeter);

impl tonic::server::NamedService for GreeterServer {
    const NAME: &'static str = "demo.Greeter";
}

impl<B> Service<Request<B>> for GreeterServer
where
    B: http_body::Body<Data = Bytes> + Send + 'static,
    B::Error: Into<BoxError> + Send + 'static,
{
    type Response = Response<tonic::body::Body>;
    type Error = Infallible;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, Infallible>> + Send>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: Request<B>) -> Self::Future {
        if req.uri().path() != SAY_HELLO {
            return Box::pin(async { Ok(Status::unimplemented("no such method").into_http()) });
        }
        let method = self.0.clone();
        Box::pin(async move {
            let mut grpc = tonic::server::Grpc::new(tonic_prost::ProstCodec::default());
            Ok(grpc.unary(method, req).await)
        })
    }
}

/// The request body between the layers: the idempotency layer rebuilds a request from the
/// bytes it read, so the body type must be buildable from `Bytes` (tonic's is not).
pub struct GrpcBody(tonic::body::Body);

impl From<Bytes> for GrpcBody {
    fn from(bytes: Bytes) -> Self {
        GrpcBody(tonic::body::Body::new(Full::new(bytes)))
    }
}

impl http_body::Body for GrpcBody {
    type Data = Bytes;
    type Error = Status;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<Bytes>, Status>>> {
        Pin::new(&mut self.0).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.0.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.0.size_hint()
    }
}

/// A gRPC error as a trailers-only response (the status in the headers).
fn grpc_error<B>(code: Code, message: &str) -> Response<IdempotencyBody<B>> {
    Status::new(code, message)
        .into_http::<tonic::body::Body>()
        .map(|_| IdempotencyBody::from(Bytes::new()))
}

/// Serves the greeter on `listener` behind the layers: `quota` per `x-tenant`, and
/// idempotency per `x-tenant` in process.
pub async fn serve(
    listener: tokio::net::TcpListener,
    greeter: Greeter,
    quota: Quota,
) -> Result<(), tonic::transport::Error> {
    let rate_limit = RateLimitLayer::new(
        WithQuota::new(HeaderValue::new("x-tenant"), quota),
        rate_limit::InProcess::new(),
    )
    .rejection(|_key: &str, _d: &Decision| {
        grpc_error::<tonic::body::Body>(Code::ResourceExhausted, "rate limited")
    });
    let idempotency = IdempotencyLayer::new(
        Scope(HeaderValue::new("x-tenant")),
        idempotency::InMemory::new(),
    )
    .rejection(|r: Rejection, _parts: &http::request::Parts| {
        let code = match r {
            Rejection::InvalidKey => Code::InvalidArgument,
            Rejection::InProgress => Code::Aborted,
            Rejection::FingerprintMismatch => Code::FailedPrecondition,
            _ => Code::ResourceExhausted,
        };
        Status::new(code, format!("{r:?}")).into_http::<tonic::body::Body>()
    });
    let layers = ServiceBuilder::new()
        .map_request(|req: Request<tonic::body::Body>| req.map(GrpcBody))
        .layer(rate_limit)
        .layer(idempotency)
        .map_request(|req: Request<GrpcBody>| req.map(|b| b.0));
    tonic::transport::Server::builder()
        .layer(layers)
        .add_service(GreeterServer(greeter))
        .serve_with_incoming(tonic::transport::server::TcpIncoming::from(listener))
        .await
}

/// One `SayHello` call with the given metadata.
pub async fn say_hello(
    addr: SocketAddr,
    name: &str,
    metadata: &[(&'static str, &str)],
) -> Result<tonic::Response<HelloReply>, Status> {
    let channel = tonic::transport::Endpoint::from_shared(format!("http://{addr}"))
        .map_err(|e| Status::internal(e.to_string()))?
        .connect()
        .await
        .map_err(|e| Status::unavailable(e.to_string()))?;
    let mut grpc = tonic::client::Grpc::new(channel);
    grpc.ready()
        .await
        .map_err(|e| Status::unavailable(e.to_string()))?;
    let mut req = tonic::Request::new(HelloRequest {
        name: name.to_owned(),
    });
    for (k, v) in metadata {
        req.metadata_mut().insert(
            *k,
            v.parse()
                .map_err(|_| Status::invalid_argument("metadata"))?,
        );
    }
    grpc.unary(
        req,
        PathAndQuery::from_static(SAY_HELLO),
        tonic_prost::ProstCodec::default(),
    )
    .await
}

#[allow(dead_code)] // the test includes this file for the functions above
#[tokio::main]
async fn main() -> Result<(), BoxError> {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    tokio::spawn(serve(listener, Greeter::default(), Quota::new(1, 2)));
    let md = [("x-tenant", "acme"), ("idempotency-key", "order-1")];
    let first = say_hello(addr, "world", &md).await?;
    println!(
        "{} (calls: {})",
        first.get_ref().message,
        first.get_ref().calls
    );
    let again = say_hello(addr, "world", &md).await?;
    println!(
        "replayed: {:?}, calls: {}",
        again.metadata().get("idempotent-replayed"),
        again.get_ref().calls
    );
    match say_hello(addr, "world", &[("x-tenant", "acme")]).await {
        Err(status) => println!(
            "{:?}: retry after {:?}",
            status.code(),
            status.metadata().get("retry-after")
        ),
        Ok(_) => println!("admitted"),
    }
    Ok(())
}
