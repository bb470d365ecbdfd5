//! The response future shared by every layer of the crate.

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};

use pin_project_lite::pin_project;

use crate::BoxError;

pub(crate) type BoxFuture<T> = Pin<Box<dyn Future<Output = Result<T, BoxError>> + Send + 'static>>;

pin_project! {
    /// Response future of the services in this crate.
    ///
    /// Requests a layer does not act on are forwarded without boxing; requests it
    /// acts on run in a boxed future; responses decided on the spot are returned
    /// without touching the inner service.
    pub struct ResponseFuture<F, T> {
        #[pin]
        kind: Kind<F, T>,
    }
}

pin_project! {
    #[project = KindProj]
    enum Kind<F, T> {
        Inner { #[pin] fut: F },
        Boxed { fut: BoxFuture<T> },
        Ready { res: Option<Result<T, BoxError>> },
    }
}

#[allow(dead_code)] // not every feature uses every constructor
impl<F, T> ResponseFuture<F, T> {
    pub(crate) fn inner(fut: F) -> Self {
        Self {
            kind: Kind::Inner { fut },
        }
    }

    pub(crate) fn boxed(fut: impl Future<Output = Result<T, BoxError>> + Send + 'static) -> Self {
        Self {
            kind: Kind::Boxed { fut: Box::pin(fut) },
        }
    }

    pub(crate) fn ready(res: Result<T, BoxError>) -> Self {
        Self {
            kind: Kind::Ready { res: Some(res) },
        }
    }
}

impl<F, T> fmt::Debug for ResponseFuture<F, T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ResponseFuture").finish_non_exhaustive()
    }
}

impl<F, T, E> Future for ResponseFuture<F, T>
where
    F: Future<Output = Result<T, E>>,
    E: Into<BoxError>,
{
    type Output = Result<T, BoxError>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        match self.project().kind.project() {
            KindProj::Inner { fut } => fut.poll(cx).map_err(Into::into),
            KindProj::Boxed { fut } => fut.as_mut().poll(cx),
            KindProj::Ready { res } => Poll::Ready(
                res.take()
                    .unwrap_or_else(|| Err("ResponseFuture polled after completion".into())),
            ),
        }
    }
}
