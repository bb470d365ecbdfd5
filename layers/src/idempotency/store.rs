use std::future::Future;
use std::time::Duration;

use bytes::{BufMut, Bytes, BytesMut};
use http::{HeaderName, HeaderValue, StatusCode};

use crate::BoxError;

/// A response kept for replay.
///
/// ```
/// use bytes::Bytes;
/// use http::{header, HeaderValue, StatusCode};
/// use upgate_layers::idempotency::StoredResponse;
///
/// let stored = StoredResponse {
///     status: StatusCode::CREATED,
///     headers: vec![(header::LOCATION, HeaderValue::from_static("/uploads/1"))],
///     trailers: vec![],
///     body: Bytes::from_static(b"{}"),
/// };
/// assert_eq!(StoredResponse::decode(&stored.encode()), Some(stored.clone()));
/// // Trailers (gRPC's status) are kept too.
/// let grpc = StoredResponse {
///     trailers: vec![(header::HeaderName::from_static("grpc-status"), HeaderValue::from_static("0"))],
///     ..stored.clone()
/// };
/// assert_eq!(StoredResponse::decode(&grpc.encode()), Some(grpc));
/// ```
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StoredResponse {
    /// The status.
    pub status: StatusCode,
    /// The stored headers (content-type, location, etag and configured extras).
    pub headers: Vec<(HeaderName, HeaderValue)>,
    /// The response's trailers (gRPC's `grpc-status`, for example), all of them.
    pub trailers: Vec<(HeaderName, HeaderValue)>,
    /// The body.
    pub body: Bytes,
}

/// Leading marker of the encoding with trailers (an impossible status in the first one).
const WITH_TRAILERS: u16 = 0xFFFF;

impl StoredResponse {
    /// A compact binary encoding (used by stores that keep bytes).
    ///
    /// ```
    /// # use upgate_layers::idempotency::StoredResponse;
    /// let s = StoredResponse { status: http::StatusCode::OK, headers: vec![], trailers: vec![], body: Default::default() };
    /// assert_eq!(s.encode().len(), 4);
    /// ```
    pub fn encode(&self) -> Bytes {
        let mut len = 8 + self.body.len();
        for (n, v) in self.headers.iter().chain(&self.trailers) {
            len += 6 + n.as_str().len() + v.len();
        }
        let mut buf = BytesMut::with_capacity(len);
        if !self.trailers.is_empty() {
            buf.put_u16(WITH_TRAILERS);
        }
        buf.put_u16(self.status.as_u16());
        put_fields(&mut buf, &self.headers);
        if !self.trailers.is_empty() {
            put_fields(&mut buf, &self.trailers);
        }
        buf.put_slice(&self.body);
        buf.freeze()
    }

    /// Decodes [`encode`](Self::encode)'s output; `None` if it is malformed.
    ///
    /// ```
    /// # use upgate_layers::idempotency::StoredResponse;
    /// assert_eq!(StoredResponse::decode(b"\x00"), None);
    /// ```
    pub fn decode(mut data: &[u8]) -> Option<Self> {
        fn take<'a>(data: &mut &'a [u8], n: usize) -> Option<&'a [u8]> {
            if data.len() < n {
                return None;
            }
            let (head, tail) = data.split_at(n);
            *data = tail;
            Some(head)
        }
        fn u16_(data: &mut &[u8]) -> Option<u16> {
            take(data, 2).map(|b| u16::from_be_bytes([b[0], b[1]]))
        }
        fn fields(data: &mut &[u8]) -> Option<Vec<(HeaderName, HeaderValue)>> {
            let count = u16_(data)?;
            let mut out = Vec::with_capacity(usize::from(count));
            for _ in 0..count {
                let n = usize::from(u16_(data)?);
                let name = HeaderName::from_bytes(take(data, n)?).ok()?;
                let l = take(data, 4)?;
                let vl = usize::try_from(u32::from_be_bytes([l[0], l[1], l[2], l[3]])).ok()?;
                let value = HeaderValue::from_bytes(take(data, vl)?).ok()?;
                out.push((name, value));
            }
            Some(out)
        }
        let mut first = u16_(&mut data)?;
        let with_trailers = first == WITH_TRAILERS;
        if with_trailers {
            first = u16_(&mut data)?;
        }
        let status = StatusCode::from_u16(first).ok()?;
        let headers = fields(&mut data)?;
        let trailers = if with_trailers {
            fields(&mut data)?
        } else {
            Vec::new()
        };
        Some(Self {
            status,
            headers,
            trailers,
            body: Bytes::copy_from_slice(data),
        })
    }
}

/// Appends `fields` as a u16 count, then per field a u16 name length, the name, a u32 value
/// length and the value (at most `u16::MAX` fields).
fn put_fields(buf: &mut BytesMut, fields: &[(HeaderName, HeaderValue)]) {
    buf.put_u16(u16::try_from(fields.len()).unwrap_or(u16::MAX));
    for (n, v) in fields.iter().take(usize::from(u16::MAX)) {
        let name = n.as_str().as_bytes();
        buf.put_u16(u16::try_from(name.len()).unwrap_or(0));
        buf.put_slice(&name[..name.len().min(usize::from(u16::MAX))]);
        buf.put_u32(u32::try_from(v.len()).unwrap_or(0));
        buf.put_slice(
            &v.as_bytes()[..usize::try_from(u32::MAX).map_or(v.len(), |m| v.len().min(m))],
        );
    }
}

/// What [`IdempotencyStore::reserve`] found.
///
/// ```
/// use upgate_layers::idempotency::Reservation;
/// assert!(matches!(Reservation::Reserved, Reservation::Reserved));
/// ```
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Reservation {
    /// The key was free and is now reserved for this request.
    Reserved,
    /// Another request holds the reservation.
    InProgress,
    /// A response is stored for this key and fingerprint.
    Completed(StoredResponse),
    /// The key is in use (reserved or completed) with a different fingerprint.
    FingerprintMismatch,
}

/// Atomic storage of idempotency records.
///
/// `key` is the full storage key (`<prefix><scope>:<idempotency key>`); `owner` is
/// a per-request token so that only the reservation's holder completes or releases
/// it (a reservation whose lock TTL expired may have been taken by someone else).
///
/// ```
/// use std::time::Duration;
/// use upgate_layers::idempotency::{IdempotencyStore, InMemory, Reservation, StoredResponse};
///
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> Result<(), upgate_layers::BoxError> {
/// let store = InMemory::new();
/// let fp = [7u8; 32];
/// let ttl = Duration::from_secs(60);
/// assert_eq!(store.reserve("k", &fp, "owner-1", ttl).await?, Reservation::Reserved);
/// assert_eq!(store.reserve("k", &fp, "owner-2", ttl).await?, Reservation::InProgress);
/// assert_eq!(store.reserve("k", &[0; 32], "owner-2", ttl).await?, Reservation::FingerprintMismatch);
/// let resp = StoredResponse { status: http::StatusCode::OK, headers: vec![], trailers: vec![], body: "hi".into() };
/// store.complete("k", "owner-1", &resp, ttl).await?;
/// assert_eq!(store.reserve("k", &fp, "owner-2", ttl).await?, Reservation::Completed(resp));
/// # Ok(())
/// # }
/// ```
pub trait IdempotencyStore: Send + Sync + 'static {
    /// Atomically reserves `key` for `owner` for `lock_ttl` unless a record exists.
    fn reserve(
        &self,
        key: &str,
        fingerprint: &[u8; 32],
        owner: &str,
        lock_ttl: Duration,
    ) -> impl Future<Output = Result<Reservation, BoxError>> + Send;

    /// Stores `response` for `ttl` if `owner` still holds the reservation.
    fn complete(
        &self,
        key: &str,
        owner: &str,
        response: &StoredResponse,
        ttl: Duration,
    ) -> impl Future<Output = Result<(), BoxError>> + Send;

    /// Removes the reservation if `owner` still holds it.
    fn release(&self, key: &str, owner: &str) -> impl Future<Output = Result<(), BoxError>> + Send;
}
