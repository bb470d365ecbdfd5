//! Sessions an end user owns: a request authenticated by a JWT ([`crate::auth::User`]) on
//! a session route is answered 404 `sessionNotFound` unless its user owns the session,
//! exactly as another tenant's session is. Requests with an API key or an upload token go
//! straight through (the key sees every session; a token is checked against its session
//! by [`crate::auth`]).
//!
//! A session's owner never changes, so owners are cached per replica: after the first JWT
//! request on a session, the check costs no store round trip.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};

use axum::extract::Request;
use axum::response::{IntoResponse, Response};
use futures_util::future::{BoxFuture, Either};
use tower::{Layer, Service};
use upgate_layers::BoxError;

use crate::auth::User;
use crate::error::AppError;
use crate::store::SessionStore;

/// Owners remembered per replica; the cache is cleared when it reaches this size.
const OWNER_CACHE_MAX: usize = 100_000;

/// The session id of a `/v1/sessions/{id}...` path, percent-decoded as the router decodes
/// it (so `%61bc` is checked as the session `abc` it names). Not UTF-8 once decoded: the
/// router's 400, with no session to check.
fn session_id_of(path: &str) -> Option<String> {
    let raw = crate::api::session_in_path(path)?;
    percent_encoding::percent_decode_str(raw)
        .decode_utf8()
        .ok()
        .map(|s| s.into_owned())
}

/// (tenant, session) → the session's owner (`None`: the API key's session).
type OwnerCache = HashMap<(String, String), Option<Arc<str>>>;

/// Session owners: the store's, cached.
#[derive(Clone)]
pub struct Owners {
    store: Arc<dyn SessionStore>,
    cache: Arc<Mutex<OwnerCache>>,
}

impl Owners {
    /// Over `store`.
    pub fn new(store: Arc<dyn SessionStore>) -> Self {
        Owners {
            store,
            cache: Arc::default(),
        }
    }

    /// True when `sub` may act on the session: it owns it, or there is no such session
    /// (the handler then answers 404 itself).
    pub async fn admits(
        &self,
        tenant: &str,
        session_id: &str,
        sub: &str,
    ) -> Result<bool, BoxError> {
        let key = (tenant.to_owned(), session_id.to_owned());
        let cached = self
            .cache
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(&key)
            .cloned();
        let owner = match cached {
            Some(owner) => owner,
            None => match self.store.session_owner(tenant, session_id).await? {
                None => return Ok(true),
                Some(owner) => {
                    let owner: Option<Arc<str>> = owner.map(Arc::from);
                    let mut cache = self.cache.lock().unwrap_or_else(|e| e.into_inner());
                    if cache.len() >= OWNER_CACHE_MAX {
                        cache.clear();
                    }
                    cache.insert(key, owner.clone());
                    owner
                }
            },
        };
        Ok(owner.as_deref() == Some(sub))
    }
}

/// [`Ownership`] around a service.
#[derive(Clone)]
pub struct OwnershipLayer {
    owners: Owners,
}

impl OwnershipLayer {
    /// Checking with `owners`.
    pub fn new(owners: Owners) -> Self {
        OwnershipLayer { owners }
    }
}

impl<S> Layer<S> for OwnershipLayer {
    type Service = Ownership<S>;

    fn layer(&self, inner: S) -> Ownership<S> {
        Ownership {
            inner,
            owners: self.owners.clone(),
        }
    }
}

/// Answers 404 to an end user's request on a session another user (or the API key) owns.
#[derive(Clone)]
pub struct Ownership<S> {
    inner: S,
    owners: Owners,
}

impl<S> Service<Request> for Ownership<S>
where
    S: Service<Request, Response = Response> + Clone + Send + 'static,
    S::Error: Into<BoxError>,
    S::Future: Send + 'static,
{
    type Response = Response;
    type Error = BoxError;
    type Future = Either<
        futures_util::future::ErrInto<S::Future, BoxError>,
        BoxFuture<'static, Result<Response, BoxError>>,
    >;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx).map_err(Into::into)
    }

    fn call(&mut self, req: Request) -> Self::Future {
        use futures_util::TryFutureExt;
        // Requests without an end user (the API key's, upload tokens') pay one extension
        // lookup here: the path is decoded only for a user's.
        let target = req.extensions().get::<User>().and_then(|user| {
            let tenant = req.extensions().get::<crate::api::Tenant>()?;
            let session = session_id_of(req.uri().path())?;
            Some((tenant.0.id.clone(), session, user.0.clone()))
        });
        let Some((tenant, session, user)) = target else {
            return Either::Left(self.inner.call(req).err_into());
        };
        let clone = self.inner.clone();
        let mut inner = std::mem::replace(&mut self.inner, clone);
        let owners = self.owners.clone();
        Either::Right(Box::pin(async move {
            if !owners.admits(&tenant, &session, &user.sub).await? {
                tracing::debug!("session owned by another user");
                return Ok(AppError::SessionNotFound.into_response());
            }
            inner.call(req).await.map_err(Into::into)
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn session_ids_come_from_session_paths_only() {
        assert_eq!(session_id_of("/v1/sessions/abc").as_deref(), Some("abc"));
        assert_eq!(
            session_id_of("/v1/sessions/abc/files/x").as_deref(),
            Some("abc")
        );
        assert_eq!(session_id_of("/v1/sessions/%61bc").as_deref(), Some("abc"));
        assert_eq!(session_id_of("/v1/sessions/%ff"), None);
        assert_eq!(session_id_of("/v1/sessions"), None);
        assert_eq!(session_id_of("/v1/sessions/"), None);
        assert_eq!(session_id_of("/healthz"), None);
    }
}
