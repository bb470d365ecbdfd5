//! The response body of [`Idempotency`](super::Idempotency): the inner service's body, or a
//! buffered one (a replay, or a response that was read to be stored) that keeps its
//! trailers, so gRPC's `grpc-status` survives both.

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::Bytes;
use http::{HeaderMap, Response};
use http_body::{Frame, SizeHint};
use pin_project_lite::pin_project;

pin_project! {
    /// The body of a response that passed the idempotency layer.
    ///
    /// ```
    /// use bytes::Bytes;
    /// use http_body_util::BodyExt;
    /// use upgate_layers::idempotency::IdempotencyBody;
    ///
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() {
    /// let mut trailers = http::HeaderMap::new();
    /// trailers.insert("grpc-status", http::HeaderValue::from_static("0"));
    /// let body = IdempotencyBody::<http_body_util::Empty<Bytes>>::buffered(
    ///     Bytes::from_static(b"hi"),
    ///     Some(trailers),
    /// );
    /// let collected = body.collect().await.unwrap();
    /// assert_eq!(collected.trailers().unwrap()["grpc-status"], "0");
    /// assert_eq!(collected.to_bytes(), "hi");
    /// # }
    /// ```
    #[derive(Debug)]
    pub struct IdempotencyBody<B> {
        #[pin]
        kind: Kind<B>,
    }
}

pin_project! {
    #[project = BodyProj]
    #[derive(Debug)]
    enum Kind<B> {
        // The inner service's body, untouched.
        Inner { #[pin] body: B },
        // A body held in memory, with its trailers (each taken once polled).
        Buffered { data: Option<Bytes>, trailers: Option<HeaderMap> },
        // What was read of the inner body, then the rest of it.
        Continued { prefix: Option<Bytes>, rest: Pin<Box<B>> },
    }
}

impl<B> IdempotencyBody<B> {
    /// The inner service's body.
    pub fn inner(body: B) -> Self {
        IdempotencyBody {
            kind: Kind::Inner { body },
        }
    }

    /// `data`, then `trailers`.
    pub fn buffered(data: Bytes, trailers: Option<HeaderMap>) -> Self {
        IdempotencyBody {
            kind: Kind::Buffered {
                data: (!data.is_empty()).then_some(data),
                trailers,
            },
        }
    }
}

impl<B> IdempotencyBody<B> {
    /// `prefix` (already read from `rest`), then what `rest` still has.
    pub(crate) fn continued(prefix: Bytes, rest: Pin<Box<B>>) -> Self {
        IdempotencyBody {
            kind: Kind::Continued {
                prefix: (!prefix.is_empty()).then_some(prefix),
                rest,
            },
        }
    }
}

impl<B> http_body::Body for IdempotencyBody<B>
where
    B: http_body::Body<Data = Bytes>,
{
    type Data = Bytes;
    type Error = B::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        match self.project().kind.project() {
            BodyProj::Inner { body } => body.poll_frame(cx),
            BodyProj::Buffered { data, trailers } => Poll::Ready(
                data.take()
                    .map(Frame::data)
                    .or_else(|| trailers.take().map(Frame::trailers))
                    .map(Ok),
            ),
            BodyProj::Continued { prefix, rest } => match prefix.take() {
                Some(data) => Poll::Ready(Some(Ok(Frame::data(data)))),
                None => rest.as_mut().poll_frame(cx),
            },
        }
    }

    fn is_end_stream(&self) -> bool {
        match &self.kind {
            Kind::Inner { body } => body.is_end_stream(),
            Kind::Buffered { data, trailers } => data.is_none() && trailers.is_none(),
            Kind::Continued { prefix, rest } => prefix.is_none() && rest.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match &self.kind {
            Kind::Inner { body } => body.size_hint(),
            Kind::Buffered { data, .. } => {
                SizeHint::with_exact(data.as_ref().map_or(0, |d| d.len() as u64))
            }
            Kind::Continued { prefix, rest } => {
                let extra = prefix.as_ref().map_or(0, |d| d.len() as u64);
                let inner = rest.size_hint();
                let mut hint = SizeHint::new();
                hint.set_lower(inner.lower().saturating_add(extra));
                if let Some(upper) = inner.upper() {
                    hint.set_upper(upper.saturating_add(extra));
                }
                hint
            }
        }
    }
}

pin_project! {
    /// The inner service's future, its response body wrapped in [`IdempotencyBody::Inner`].
    #[derive(Debug)]
    pub struct MapBody<F> {
        #[pin]
        fut: F,
    }
}

impl<F> MapBody<F> {
    pub(crate) fn new(fut: F) -> Self {
        MapBody { fut }
    }
}

impl<F, B, E> Future for MapBody<F>
where
    F: Future<Output = Result<Response<B>, E>>,
{
    type Output = Result<Response<IdempotencyBody<B>>, E>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        self.project()
            .fut
            .poll(cx)
            .map(|r| r.map(|res| res.map(IdempotencyBody::inner)))
    }
}

/// A buffered body of `data` (no trailers), so layers outside this one can build responses.
impl<B> From<Bytes> for IdempotencyBody<B> {
    fn from(data: Bytes) -> Self {
        IdempotencyBody::buffered(data, None)
    }
}
