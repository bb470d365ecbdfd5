//! tus 1.0 and IETF resumable uploads (`../shared/API.md` v1.1): `/v1/tus` and its uploads.
//!
//! Handlers parse the protocol's headers, call [`crate::uploads::tus`] and render the
//! protocol's headers; every upload is a file of a session. An upload's id names both:
//! `{sessionId}.{fileId}` for an upload added to a session the client named
//! (`Upload-Metadata` `sessionId`), `{sessionId}_{fileId}` for one with a session of its own,
//! which is finalized when the last byte arrives. The concatenation extension's uploads
//! carry their kind before the file id: `p~` a partial upload (never finalized: it is
//! deleted once a final upload is made of it), `c~` a final upload (made of partial uploads
//! when it is created, completed before the creation answers).

use std::collections::BTreeMap;

use axum::body::Body;
use axum::extract::State;
use axum::http::{header, HeaderMap, HeaderName, HeaderValue, Method, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Extension;
use base64::Engine as _;
use futures_util::StreamExt as _;
use serde_json::json;

use super::{ApiPath, AppState, Tenant};
use crate::error::{AppError, FieldError};
use crate::model::now_ms;
use crate::uploads::tus::{Checksum, Form, Head, Kind, PartialUpload, Patch, Patched};

/// The tus version spoken.
const TUS_VERSION: &str = "1.0.0";
/// The tus extensions (API.md's list).
const TUS_EXTENSIONS: &str = "creation,creation-with-upload,creation-defer-length,expiration,checksum,termination,concatenation";
/// The IETF draft interop versions spoken.
const IETF_VERSIONS: std::ops::RangeInclusive<u32> = 3..=8;

/// The response headers a browser page reads (CORS `Access-Control-Expose-Headers`).
pub(crate) const EXPOSED: [&str; 14] = [
    "upload-offset",
    "upload-length",
    "upload-expires",
    "upload-metadata",
    "upload-defer-length",
    "upload-complete",
    "upload-incomplete",
    "upload-limit",
    "upload-draft-interop-version",
    "tus-resumable",
    "tus-version",
    "tus-extension",
    "tus-max-size",
    "tus-checksum-algorithm",
];

/// The request headers tus and IETF clients send (CORS `Access-Control-Allow-Headers`).
pub(crate) const ALLOWED: [&str; 11] = [
    "tus-resumable",
    "upload-offset",
    "upload-length",
    "upload-metadata",
    "upload-defer-length",
    "upload-checksum",
    "upload-concat",
    "upload-complete",
    "upload-incomplete",
    "upload-draft-interop-version",
    "x-http-method-override",
];

/// Which protocol a request speaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Proto {
    Tus,
    /// IETF draft-ietf-httpbis-resumable-upload, with its interop version.
    Ietf(u32),
}

fn header_str<'a>(h: &'a HeaderMap, name: &str) -> Option<&'a str> {
    h.get(name).and_then(|v| v.to_str().ok()).map(str::trim)
}

fn bad(field: &str, message: impl Into<String>) -> AppError {
    AppError::Validation(vec![FieldError::new(field, message)])
}

fn proto(h: &HeaderMap) -> Result<Proto, AppError> {
    if let Some(v) = header_str(h, "upload-draft-interop-version") {
        return match v.parse::<u32>() {
            Ok(n) if IETF_VERSIONS.contains(&n) => Ok(Proto::Ietf(n)),
            _ => Err(AppError::VersionNotSupported),
        };
    }
    match header_str(h, "tus-resumable") {
        Some(TUS_VERSION) => Ok(Proto::Tus),
        _ => Err(AppError::VersionNotSupported),
    }
}

/// A structured-field boolean (`?1` / `?0`).
fn sf_bool(h: &HeaderMap, name: &str) -> Result<Option<bool>, AppError> {
    match header_str(h, name) {
        None => Ok(None),
        Some("?1") => Ok(Some(true)),
        Some("?0") => Ok(Some(false)),
        Some(_) => Err(bad(name, "must be ?1 or ?0")),
    }
}

/// IETF: whether this request's bytes end the upload (`Upload-Complete`, or the inverse
/// `Upload-Incomplete` of interop version 3, draft -01).
fn ietf_complete(h: &HeaderMap, v: u32) -> Result<Option<bool>, AppError> {
    if v <= 3 {
        Ok(sf_bool(h, "upload-incomplete")?
            .map(|incomplete| !incomplete)
            .or(Some(true)))
    } else {
        sf_bool(h, "upload-complete")
    }
}

fn number(h: &HeaderMap, name: &str) -> Result<Option<u64>, AppError> {
    match header_str(h, name) {
        None => Ok(None),
        Some(v) => v
            .parse::<u64>()
            .map(Some)
            .map_err(|_| bad(name, "must be a non-negative whole number")),
    }
}

/// `Upload-Metadata`: comma-separated `key base64(value)` pairs (a key alone has an empty
/// value).
fn metadata(h: &HeaderMap) -> Result<BTreeMap<String, String>, AppError> {
    let mut out = BTreeMap::new();
    let Some(raw) = header_str(h, "upload-metadata") else {
        return Ok(out);
    };
    for pair in raw.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        let mut it = pair.splitn(2, ' ');
        let key = it.next().unwrap_or("");
        let value = it.next().unwrap_or("").trim();
        if key.is_empty() || !key.bytes().all(|b| b.is_ascii_graphic()) {
            return Err(bad("Upload-Metadata", "keys are non-empty visible ASCII"));
        }
        let decoded = base64::engine::general_purpose::STANDARD
            .decode(value)
            .ok()
            .and_then(|b| String::from_utf8(b).ok())
            .ok_or_else(|| bad("Upload-Metadata", format!("{key}: not base64 of UTF-8")))?;
        if out.insert(key.to_owned(), decoded).is_some() {
            return Err(bad("Upload-Metadata", format!("{key} appears twice")));
        }
    }
    Ok(out)
}

/// `Upload-Checksum: <algorithm> <base64 digest>`.
fn checksum(h: &HeaderMap) -> Result<Option<Checksum>, AppError> {
    let Some(raw) = header_str(h, "upload-checksum") else {
        return Ok(None);
    };
    let (algo, digest) = raw
        .split_once(' ')
        .ok_or_else(|| bad("Upload-Checksum", "<algorithm> <base64 digest> expected"))?;
    let digest = base64::engine::general_purpose::STANDARD
        .decode(digest.trim())
        .map_err(|_| bad("Upload-Checksum", "the digest is not base64"))?;
    match algo {
        "sha1" => Ok(Some(Checksum::Sha1(digest))),
        "sha256" => Ok(Some(Checksum::Sha256(digest))),
        "md5" => Ok(Some(Checksum::Md5(digest))),
        _ => Err(bad(
            "Upload-Checksum",
            "the algorithm is one of sha1, sha256, md5",
        )),
    }
}

/// What an upload id names.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct UploadRef<'a> {
    pub(crate) session: &'a str,
    pub(crate) file: &'a str,
    pub(crate) form: Form,
}

/// An upload id's parts (see the module's documentation): the session id, the marker
/// ([`Form::marker`]) and the file id.
pub(crate) fn split_upload_id(id: &str) -> Option<UploadRef<'_>> {
    let sep = id.find(['_', '.'])?;
    let (session, rest) = id.split_at(sep);
    let kind_len = match rest.get(1..3) {
        Some("p~" | "c~") => 3,
        _ => 1,
    };
    let form = Form::from_marker(&rest[..kind_len])?;
    let file = &rest[kind_len..];
    (!session.is_empty() && !file.is_empty()).then_some(UploadRef {
        session,
        file,
        form,
    })
}

fn upload_id(session_id: &str, file_id: &str, form: Form) -> String {
    format!("{session_id}{}{file_id}", form.marker())
}

/// What `Upload-Concat` asks of a creation.
enum Concat<'a> {
    None,
    Partial,
    /// The upload ids of the partial uploads, in order.
    Final(Vec<&'a str>),
}

/// `Upload-Concat: partial` or `final;<url> <url>...` (URLs absolute or paths ending in
/// `/v1/tus/<uploadId>`).
fn concat(h: &HeaderMap) -> Result<Concat<'_>, AppError> {
    let Some(v) = header_str(h, "upload-concat") else {
        return Ok(Concat::None);
    };
    if v == "partial" {
        return Ok(Concat::Partial);
    }
    let Some(urls) = v.strip_prefix("final;") else {
        return Err(bad("Upload-Concat", "partial or final;<upload URLs>"));
    };
    let ids: Vec<&str> = urls
        .split(' ')
        .filter(|u| !u.is_empty())
        .map(|u| {
            let path = u.split(['?', '#']).next().unwrap_or(u);
            path.rsplit_once("/v1/tus/")
                .map(|(_, id)| id)
                .filter(|id| !id.is_empty() && !id.contains('/'))
                .ok_or_else(|| bad("Upload-Concat", format!("{u} is not an upload URL")))
        })
        .collect::<Result<_, _>>()?;
    if ids.is_empty() {
        return Err(bad(
            "Upload-Concat",
            "a final upload names its partial uploads",
        ));
    }
    if ids.len() > MAX_PARTIALS {
        return Err(bad(
            "Upload-Concat",
            format!("at most {MAX_PARTIALS} partial uploads"),
        ));
    }
    Ok(Concat::Final(ids))
}

/// The most partial uploads one final upload is made of (each is looked up and deleted in
/// the creation request).
const MAX_PARTIALS: usize = 100;

/// An HTTP date (RFC 9110) of Unix seconds.
fn http_date(secs: i64) -> String {
    let t =
        std::time::UNIX_EPOCH + std::time::Duration::from_secs(u64::try_from(secs).unwrap_or(0));
    httpdate::fmt_http_date(t)
}

fn set(res: &mut Response, name: &'static str, value: impl ToString) {
    if let Ok(v) = HeaderValue::from_str(&value.to_string()) {
        res.headers_mut().insert(HeaderName::from_static(name), v);
    }
}

/// Headers every answer in `proto` carries (errors included).
fn stamp(mut res: Response, proto: Option<Proto>) -> Response {
    match proto {
        Some(Proto::Ietf(v)) => set(&mut res, "upload-draft-interop-version", v),
        _ => set(&mut res, "tus-resumable", TUS_VERSION),
    }
    res
}

fn finish(result: Result<Response, AppError>, proto: Option<Proto>) -> Response {
    let res = result.unwrap_or_else(|e| {
        // A terminated upload (its own session deleted with it) is gone: 404, as tus's
        // termination extension has it.
        match e {
            AppError::SessionNotActive(crate::model::SessionStatus::Aborted)
            | AppError::FileAborted => AppError::FileNotFound,
            other => other,
        }
        .into_response()
    });
    stamp(res, proto)
}

/// The state headers of an upload (HEAD, PATCH and creation answers).
fn state_headers(
    res: &mut Response,
    proto: Proto,
    offset: u64,
    length: Option<u64>,
    expires_at: i64,
) {
    set(res, "upload-offset", offset);
    match length {
        Some(l) => set(res, "upload-length", l),
        None if proto == Proto::Tus => set(res, "upload-defer-length", 1),
        None => {}
    }
    set(res, "upload-expires", http_date(expires_at));
    if let Proto::Ietf(v) = proto {
        let complete = length == Some(offset);
        if v <= 3 {
            set(res, "upload-incomplete", if complete { "?0" } else { "?1" });
        } else {
            set(res, "upload-complete", if complete { "?1" } else { "?0" });
        }
    }
}

/// `Upload-Limit` (IETF; a structured-field dictionary): the largest upload.
fn limit_header(res: &mut Response, max: u64) {
    set(res, "upload-limit", format!("min-size=0,max-size={max}"));
}

fn ids_headers(res: &mut Response, session_id: &str, file_id: &str) {
    set(res, "upgate-session-id", session_id);
    set(res, "upgate-file-id", file_id);
}

/// The largest upload `tenant` takes (Tus-Max-Size): its `max_file_size_bytes`, and at most
/// 10,000 parts of the configured part size, so that a tus upload's parts (and so a PATCH's
/// buffer and the tail in the store) never grow past the part size (a REST file may raise
/// its part size instead).
fn max_size(state: &AppState, tenant: Option<&Tenant>, user: Option<&crate::auth::User>) -> u64 {
    let parts_cap = crate::model::MAX_PARTS.saturating_mul(state.config.part_size_bytes());
    let tenant_max = match tenant {
        Some(t) => {
            let limited = user.and_then(|u| u.0.limits.under(&t.0));
            limited.as_ref().unwrap_or(&t.0).max_file_size_bytes
        }
        None => state
            .config
            .tenants
            .iter()
            .map(|t| t.max_file_size_bytes)
            .max()
            .unwrap_or(0),
    };
    tenant_max.min(parts_cap)
}

/// `OPTIONS /v1/tus` (and on an upload): the server's capabilities; no credential needed.
pub(super) async fn options(State(state): State<AppState>) -> Response {
    let mut res = StatusCode::NO_CONTENT.into_response();
    set(&mut res, "tus-version", TUS_VERSION);
    set(&mut res, "tus-extension", TUS_EXTENSIONS);
    set(&mut res, "tus-max-size", max_size(&state, None, None));
    set(&mut res, "tus-checksum-algorithm", "sha1,sha256,md5");
    limit_header(&mut res, max_size(&state, None, None));
    stamp(res, Some(Proto::Tus))
}

/// The request's body as the upload protocol reads it.
fn body_stream(
    state: &AppState,
    body: Body,
) -> impl futures_util::Stream<Item = Result<bytes::Bytes, AppError>> + Unpin + Send + 'static {
    super::parts::BodyStream::new(
        body,
        state.config.part_idle_timeout,
        None,
        state.metrics.clone(),
    )
    .map(|chunk| chunk.map_err(|_| AppError::BodyIncomplete))
}

/// Whether the request carries a body (a creation-with-upload).
fn has_body(h: &HeaderMap) -> bool {
    h.contains_key(header::TRANSFER_ENCODING)
        || number(h, "content-length")
            .ok()
            .flatten()
            .is_some_and(|n| n > 0)
}

/// The ids a detached upload task owns.
fn owned_ids(tenant: &str, session_id: &str, file_id: &str) -> (String, String, String) {
    (tenant.to_owned(), session_id.to_owned(), file_id.to_owned())
}

/// Runs upload work in a task of its own, so a client going away mid-request cannot cancel
/// the recording of what arrived.
async fn detached(
    what: &str,
    work: impl std::future::Future<Output = Result<Patched, AppError>> + Send + 'static,
) -> Result<Patched, AppError> {
    tokio::spawn(work)
        .await
        .map_err(|e| AppError::Internal(format!("tus {what} task: {e}")))?
}

/// A PATCH (or a creation's body), detached.
async fn run_patch(
    state: &AppState,
    tenant: &str,
    session_id: &str,
    file_id: &str,
    req: Patch,
    body: Body,
) -> Result<Patched, AppError> {
    let uploads = state.uploads.clone();
    let stream = body_stream(state, body);
    let (tenant, session_id, file_id) = owned_ids(tenant, session_id, file_id);
    detached("PATCH", async move {
        uploads
            .tus_patch(&tenant, &session_id, &file_id, req, stream)
            .await
    })
    .await
}

/// A concatenation, detached.
async fn run_concat(
    state: &AppState,
    tenant: &str,
    session_id: &str,
    file_id: &str,
    form: Form,
    partials: Vec<PartialUpload>,
    max_size: u64,
) -> Result<Patched, AppError> {
    let uploads = state.uploads.clone();
    let (tenant, session_id, file_id) = owned_ids(tenant, session_id, file_id);
    detached("concatenation", async move {
        uploads
            .tus_concat(&tenant, &session_id, &file_id, form, &partials, max_size)
            .await
    })
    .await
}

/// The partial uploads a final upload names: each a completed partial upload (by its id and
/// its file's record alike) the caller may act on (an upload token's own session, a
/// user's own sessions), named once; any other is refused alike, so a final upload learns
/// nothing of uploads that are not the caller's.
async fn partial_uploads(
    state: &AppState,
    tenant: &Tenant,
    user: Option<&crate::auth::User>,
    scope: Option<&Extension<crate::auth::SessionScope>>,
    ids: &[&str],
) -> Result<Vec<PartialUpload>, AppError> {
    let mut out = Vec::with_capacity(ids.len());
    for id in ids {
        let refused = || {
            bad(
                "Upload-Concat",
                format!("{id} is not a completed partial upload"),
            )
        };
        let Some(r) = split_upload_id(id).filter(|r| r.form.kind == Kind::Partial) else {
            return Err(refused());
        };
        if ids[..out.len()].contains(id) {
            return Err(bad("Upload-Concat", format!("{id} is named twice")));
        }
        if scope.is_some_and(|Extension(s)| s.0 != r.session) {
            return Err(refused());
        }
        if let Some(u) = user {
            let owner = state.store.session_owner(&tenant.0.id, r.session).await?;
            if owner.flatten().as_deref() != Some(u.0.sub.as_str()) {
                return Err(refused());
            }
        }
        let head = match state
            .uploads
            .tus_head(&tenant.0.id, r.session, r.file, r.form)
            .await
        {
            Ok(h) => h,
            Err(
                AppError::SessionNotFound
                | AppError::FileNotFound
                | AppError::SessionExpired { .. }
                | AppError::SessionNotActive(_)
                | AppError::FileAborted,
            ) => return Err(refused()),
            Err(e) => return Err(e),
        };
        if head.file.status != crate::model::FileStatus::Completed {
            return Err(refused());
        }
        out.push(PartialUpload {
            file: head.file,
            own_session: r.form.own,
        });
    }
    Ok(out)
}

/// `POST /v1/tus`: creates an upload (a file; of its own session unless `sessionId` names
/// one), with its first bytes when the request has a body.
#[tracing::instrument(skip_all, fields(tenant = %tenant.0.id, session_id, file_id))]
pub(super) async fn create(
    State(state): State<AppState>,
    Extension(tenant): Extension<Tenant>,
    user: Option<Extension<crate::auth::User>>,
    scope: Option<Extension<crate::auth::SessionScope>>,
    headers: HeaderMap,
    body: Body,
) -> Response {
    let p = proto(&headers);
    let pr = p.as_ref().ok().copied();
    let result = async {
        let proto = p?;
        create_upload(
            &state,
            &tenant,
            user.as_ref().map(|u| &u.0),
            scope,
            proto,
            &headers,
            body,
        )
        .await
    }
    .await;
    finish(result, pr)
}

async fn create_upload(
    state: &AppState,
    tenant: &Tenant,
    user: Option<&crate::auth::User>,
    scope: Option<Extension<crate::auth::SessionScope>>,
    proto: Proto,
    headers: &HeaderMap,
    body: Body,
) -> Result<Response, AppError> {
    let concat = concat(headers)?;
    if !matches!(concat, Concat::None) && proto != Proto::Tus {
        // The IETF draft has no concatenation.
        return Err(bad("Upload-Concat", "is a tus 1.0 header"));
    }
    let max = max_size(state, Some(tenant), user);
    let (kind, partials) = match &concat {
        Concat::None => (Kind::Plain, None),
        Concat::Partial => (Kind::Partial, None),
        Concat::Final(ids) => {
            if has_body(headers) {
                return Err(bad(
                    "Upload-Concat",
                    "a final upload's creation has no body",
                ));
            }
            if headers.contains_key("upload-length") {
                return Err(bad(
                    "Upload-Length",
                    "a final upload's length is its partial uploads' sum",
                ));
            }
            let partials = partial_uploads(state, tenant, user, scope.as_ref(), ids).await?;
            (Kind::Final, Some(partials))
        }
    };
    let length = match &partials {
        Some(ps) => Some(ps.iter().map(|p| p.file.size_bytes).sum()),
        None => number(headers, "upload-length")?,
    };
    let complete = match proto {
        Proto::Ietf(v) => ietf_complete(headers, v)?,
        Proto::Tus => None,
    };
    let deferred = match (proto, length) {
        (_, Some(_)) => false,
        (Proto::Tus, None) => {
            if header_str(headers, "upload-defer-length") != Some("1") {
                return Err(bad(
                    "Upload-Length",
                    "Upload-Length or Upload-Defer-Length: 1 is required",
                ));
            }
            true
        }
        (Proto::Ietf(_), None) => true,
    };
    if let Some(l) = length.filter(|l| *l > max) {
        let _ = l;
        return Err(AppError::FileTooLarge(max));
    }
    let mut meta = metadata(headers)?;
    let named_session = meta.remove("sessionId");
    let file_name = meta
        .remove("filename")
        .or_else(|| meta.remove("name"))
        .unwrap_or_else(|| "upload".to_owned());
    let content_type = meta.remove("filetype").or_else(|| meta.remove("type"));
    let file_key = meta.remove("fileKey");
    // An upload token acts on its own session only.
    let named_session = match (&scope, named_session) {
        (Some(Extension(s)), Some(named)) if named != s.0 => return Err(AppError::SessionNotFound),
        (Some(Extension(s)), _) => Some(s.0.clone()),
        (None, named) => named,
    };
    let limited = user.and_then(|u| u.0.limits.under(&tenant.0));
    let t = limited.as_ref().unwrap_or(&tenant.0);
    let (session_id, own, expires_at) = match named_session {
        Some(id) => {
            if let Some(u) = user {
                let owner = state.store.session_owner(&t.id, &id).await?;
                if owner.flatten().as_deref() != Some(u.0.sub.as_str()) {
                    return Err(AppError::SessionNotFound);
                }
            }
            // The session's expiry comes back with the registration (one round trip).
            (id, false, None)
        }
        None => {
            let req = crate::validate::CreateSession {
                max_files: Some(1),
                ttl_seconds: t.session_ttl_seconds.default,
                metadata: json!({}),
            };
            let session = super::sessions::open(state, tenant, user.map(|u| &u.0), req).await?;
            (session.id, true, Some(session.expires_at))
        }
    };
    tracing::Span::current().record("session_id", session_id.as_str());
    let mut reg = json!({
        "fileName": file_name,
        "sizeBytes": length.unwrap_or(0),
        "metadata": meta,
    });
    match (&file_key, kind) {
        (Some(k), _) => reg["fileKey"] = json!(k),
        // Partial uploads of one file share its name (tus-js-client sends none): each gets
        // a key of its own, so that several fit in one session (48 random bits; short, as
        // object keys sit in file names on some S3-compatible servers: s3s-fs base64s the
        // whole key into one).
        (None, Kind::Partial) => {
            let id = uuid::Uuid::new_v4().simple().to_string();
            reg["fileKey"] = json!(format!("partial-{}", &id[..12]));
        }
        (None, _) => {}
    }
    if let Some(ct) = &content_type {
        reg["contentType"] = json!(ct);
    }
    let req = crate::validate::register_file(&reg, t)?;
    if let Some(l) = user
        .map(|u| &u.0.limits)
        .filter(|l| !l.allows_content_type(req.content_type.as_deref()))
    {
        return Err(AppError::ContentTypeNotAllowed(
            l.allowed_content_types.clone().unwrap_or_default(),
        ));
    }
    let mut file = super::files::new_file(state, t, &session_id, req)?;
    let form = Form { own, kind };
    file.tus_form = Some(match &concat {
        Concat::Final(ids) => form.record(ids),
        _ => form.record(&[]),
    });
    tracing::Span::current().record("file_id", file.id.as_str());
    let now = now_ms();
    let gate = state
        .store
        .register_tus_file(&t.id, &file, deferred, now)
        .await?;
    state.uploads.wake(&t.id, &session_id);
    let mut registered_expiry = 0;
    let outcome = super::open_gate(gate, &t.id, now).map(|(r, e)| {
        registered_expiry = e;
        r
    });
    let outcome = super::files::registered(outcome, &file.file_key);
    let expires_at = expires_at.unwrap_or(registered_expiry);
    let file = match outcome {
        Ok(f) => {
            state.metrics.registration("created");
            f
        }
        Err(e) => {
            state.metrics.registration(e.code());
            return Err(e);
        }
    };
    let id = upload_id(&session_id, &file.id, form);
    // A body (creation-with-upload), a zero-length upload, or an IETF creation that says it
    // is complete goes through the PATCH path.
    let with_body = has_body(headers);
    let patched = if let Some(partials) = partials {
        Some(run_concat(state, &t.id, &session_id, &file.id, form, partials, max).await?)
    } else if with_body || length == Some(0) || complete == Some(true) {
        if proto == Proto::Tus
            && with_body
            && header_str(headers, "content-type") != Some("application/offset+octet-stream")
        {
            return Err(AppError::UnsupportedMediaType);
        }
        let req = Patch {
            offset: 0,
            length: None,
            complete,
            checksum: checksum(headers)?,
            max_size: max,
            form: Some(form),
        };
        Some(run_patch(state, &t.id, &session_id, &file.id, req, body).await?)
    } else {
        None
    };
    let mut res = StatusCode::CREATED.into_response();
    set(&mut res, "location", format!("/v1/tus/{id}"));
    let (offset, length) = match &patched {
        Some(p) => (p.offset, p.length),
        None => (0, length),
    };
    state_headers(&mut res, proto, offset, length, expires_at);
    if matches!(proto, Proto::Ietf(_)) {
        limit_header(&mut res, max);
    }
    ids_headers(&mut res, &session_id, &file.id);
    Ok(res)
}

/// The upload id of the path, as (session, file, form).
fn ids(upload: &str) -> Result<(String, String, Form), AppError> {
    let r = split_upload_id(upload).ok_or(AppError::FileNotFound)?;
    Ok((r.session.to_owned(), r.file.to_owned(), r.form))
}

/// `HEAD /v1/tus/{uploadId}`: the offset (and length, expiry).
#[tracing::instrument(skip_all, fields(tenant = %tenant.0.id, upload = %upload))]
pub(super) async fn head(
    State(state): State<AppState>,
    Extension(tenant): Extension<Tenant>,
    ApiPath(upload): ApiPath<String>,
    headers: HeaderMap,
) -> Response {
    let p = proto(&headers);
    let pr = p.as_ref().ok().copied();
    let result = async {
        let proto = p?;
        let (sid, fid, form) = ids(&upload)?;
        let h: Head = state
            .uploads
            .tus_head(&tenant.0.id, &sid, &fid, form)
            .await?;
        let mut res = StatusCode::OK.into_response();
        let length = (!h.state.deferred).then_some(h.file.size_bytes);
        state_headers(&mut res, proto, h.offset(), length, h.expires_at);
        match form.kind {
            Kind::Plain => {}
            Kind::Partial => set(&mut res, "upload-concat", "partial"),
            Kind::Final => {
                let urls: Vec<String> = crate::uploads::tus::partial_ids(&h.file)
                    .into_iter()
                    .map(|id| format!("/v1/tus/{id}"))
                    .collect();
                set(
                    &mut res,
                    "upload-concat",
                    format!("final;{}", urls.join(" ")),
                );
            }
        }
        set(&mut res, "cache-control", "no-store");
        ids_headers(&mut res, &sid, &fid);
        if matches!(proto, Proto::Ietf(_)) {
            limit_header(&mut res, max_size(&state, Some(&tenant), None));
        }
        Ok(res)
    }
    .await;
    // HEAD answers have no body, errors included.
    let mut res = finish(result, pr);
    *res.body_mut() = Body::empty();
    res
}

/// `PATCH /v1/tus/{uploadId}`: appends the body at `Upload-Offset`.
#[tracing::instrument(skip_all, fields(tenant = %tenant.0.id, upload = %upload))]
pub(super) async fn patch(
    State(state): State<AppState>,
    Extension(tenant): Extension<Tenant>,
    user: Option<Extension<crate::auth::User>>,
    ApiPath(upload): ApiPath<String>,
    headers: HeaderMap,
    body: Body,
) -> Response {
    let p = proto(&headers);
    let pr = p.as_ref().ok().copied();
    let result = async {
        let proto = p?;
        let (sid, fid, form) = ids(&upload)?;
        let content_type = header_str(&headers, "content-type").unwrap_or("");
        let accepted = match proto {
            Proto::Tus => content_type == "application/offset+octet-stream",
            Proto::Ietf(v) if v >= 6 => {
                content_type == "application/partial-upload"
                    || content_type == "application/offset+octet-stream"
            }
            Proto::Ietf(_) => true,
        };
        if !accepted {
            return Err(AppError::UnsupportedMediaType);
        }
        let offset = number(&headers, "upload-offset")?
            .ok_or_else(|| bad("Upload-Offset", "is required"))?;
        let req = Patch {
            offset,
            length: number(&headers, "upload-length")?,
            complete: match proto {
                Proto::Ietf(v) => ietf_complete(&headers, v)?,
                Proto::Tus => None,
            },
            checksum: checksum(&headers)?,
            max_size: max_size(&state, Some(&tenant), user.as_ref().map(|u| &u.0)),
            form: Some(form),
        };
        let done = run_patch(&state, &tenant.0.id, &sid, &fid, req, body).await?;
        let (expires_at, _) = state
            .store
            .session_deadline(&tenant.0.id, &sid)
            .await?
            .unwrap_or((0, 0));
        let mut res = StatusCode::NO_CONTENT.into_response();
        state_headers(&mut res, proto, done.offset, done.length, expires_at);
        Ok(res)
    }
    .await;
    finish(result, pr)
}

/// `DELETE /v1/tus/{uploadId}` (termination): the file, or the upload's own session, is
/// deleted and its bytes removed from storage.
#[tracing::instrument(skip_all, fields(tenant = %tenant.0.id, upload = %upload))]
pub(super) async fn delete(
    State(state): State<AppState>,
    Extension(tenant): Extension<Tenant>,
    ApiPath(upload): ApiPath<String>,
    headers: HeaderMap,
) -> Response {
    let p = proto(&headers);
    let pr = p.as_ref().ok().copied();
    let result = async {
        p?;
        let (sid, fid, form) = ids(&upload)?;
        state
            .uploads
            .tus_terminate(&tenant.0.id, &sid, &fid, form)
            .await?;
        Ok(StatusCode::NO_CONTENT.into_response())
    }
    .await;
    finish(result, pr)
}

/// `POST /v1/tus/{uploadId}` with `X-HTTP-Method-Override` (clients behind proxies that
/// allow only GET and POST): answered as the method it names.
pub(super) async fn overridden(
    state: State<AppState>,
    tenant: Extension<Tenant>,
    user: Option<Extension<crate::auth::User>>,
    upload: ApiPath<String>,
    headers: HeaderMap,
    body: Body,
) -> Response {
    let method = header_str(&headers, "x-http-method-override")
        .and_then(|m| Method::from_bytes(m.to_ascii_uppercase().as_bytes()).ok());
    match method {
        Some(Method::PATCH) => patch(state, tenant, user, upload, headers, body).await,
        Some(Method::DELETE) => delete(state, tenant, upload, headers).await,
        Some(Method::HEAD) => head(state, tenant, upload, headers).await,
        _ => stamp(AppError::MethodNotAllowed.into_response(), Some(Proto::Tus)),
    }
}

/// Metadata values a tus client cannot send as JSON are strings already; this keeps the
/// JSON conversion in one place for tests.
#[cfg(test)]
fn metadata_json(h: &HeaderMap) -> Result<serde_json::Value, AppError> {
    Ok(json!(metadata(h)?))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(pairs: &[(&'static str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.insert(*k, HeaderValue::from_str(v).unwrap());
        }
        h
    }

    #[test]
    fn metadata_pairs_decode_and_bad_ones_are_refused() {
        let h = headers(&[(
            "upload-metadata",
            "filename d29ybGRfZG9taW5hdGlvbi5wZGY=,is_confidential, filetype aW1hZ2UvcG5n",
        )]);
        assert_eq!(
            metadata_json(&h).unwrap(),
            json!({"filename": "world_domination.pdf", "is_confidential": "", "filetype": "image/png"})
        );
        assert!(metadata(&headers(&[("upload-metadata", "a !!!")])).is_err());
        assert!(metadata(&headers(&[("upload-metadata", "a YQ==,a YQ==")])).is_err());
    }

    #[test]
    fn versions_and_checksums_parse() {
        assert_eq!(
            proto(&headers(&[("tus-resumable", "1.0.0")])).unwrap(),
            Proto::Tus
        );
        assert!(matches!(
            proto(&headers(&[("tus-resumable", "0.2.2")])),
            Err(AppError::VersionNotSupported)
        ));
        assert!(matches!(
            proto(&HeaderMap::new()),
            Err(AppError::VersionNotSupported)
        ));
        for v in 3..=8 {
            assert_eq!(
                proto(&headers(&[(
                    "upload-draft-interop-version",
                    &v.to_string()
                )]))
                .unwrap(),
                Proto::Ietf(v)
            );
        }
        assert!(proto(&headers(&[("upload-draft-interop-version", "2")])).is_err());
        assert!(proto(&headers(&[("upload-draft-interop-version", "9")])).is_err());
        assert_eq!(
            checksum(&headers(&[(
                "upload-checksum",
                "sha1 Kq5sNclPz7QV2+lfQIuc6R7oRu0="
            )]))
            .unwrap(),
            Some(Checksum::Sha1(
                base64::engine::general_purpose::STANDARD
                    .decode("Kq5sNclPz7QV2+lfQIuc6R7oRu0=")
                    .unwrap()
            ))
        );
        assert!(checksum(&headers(&[("upload-checksum", "crc32 AAAA")])).is_err());
        assert_eq!(
            ietf_complete(&headers(&[("upload-incomplete", "?1")]), 3).unwrap(),
            Some(false)
        );
        assert_eq!(ietf_complete(&HeaderMap::new(), 3).unwrap(), Some(true));
        assert_eq!(
            ietf_complete(&headers(&[("upload-complete", "?0")]), 4).unwrap(),
            Some(false)
        );
        assert_eq!(ietf_complete(&HeaderMap::new(), 4).unwrap(), None);
    }

    #[test]
    fn upload_ids_name_session_file_ownership_and_kind() {
        let r = |session, file, own, kind| {
            Some(UploadRef {
                session,
                file,
                form: Form { own, kind },
            })
        };
        assert_eq!(split_upload_id("s_f"), r("s", "f", true, Kind::Plain));
        assert_eq!(split_upload_id("s.f"), r("s", "f", false, Kind::Plain));
        assert_eq!(split_upload_id("s_p~f"), r("s", "f", true, Kind::Partial));
        assert_eq!(split_upload_id("s.c~f"), r("s", "f", false, Kind::Final));
        assert_eq!(split_upload_id("sf"), None);
        assert_eq!(split_upload_id("_f"), None);
        assert_eq!(split_upload_id("s_p~"), None);
        assert_eq!(split_upload_id("s_"), None);
        for own in [true, false] {
            for kind in [Kind::Plain, Kind::Partial, Kind::Final] {
                let form = Form { own, kind };
                let id = upload_id("s", "f", form);
                assert_eq!(split_upload_id(&id), r("s", "f", own, kind), "{id}");
                assert_eq!(Form::from_marker(form.marker()), Some(form));
            }
        }
    }

    #[test]
    fn upload_concat_parses_partial_and_final_lists() {
        assert!(matches!(concat(&HeaderMap::new()), Ok(Concat::None)));
        assert!(matches!(
            concat(&headers(&[("upload-concat", "partial")])),
            Ok(Concat::Partial)
        ));
        let h = headers(&[(
            "upload-concat",
            "final;http://gw:8080/v1/tus/a_p~b /v1/tus/c.p~d?x=1",
        )]);
        match concat(&h) {
            Ok(Concat::Final(ids)) => assert_eq!(ids, ["a_p~b", "c.p~d"]),
            _ => panic!("a final list"),
        }
        for v in [
            "final;",
            "final;/v1/files/x",
            "final;/v1/tus/",
            "whole",
            "final;/v1/tus/a/b",
        ] {
            assert!(concat(&headers(&[("upload-concat", v)])).is_err(), "{v}");
        }
        let many = format!(
            "final;{}",
            vec!["/v1/tus/a_p~b"; MAX_PARTIALS + 1].join(" ")
        );
        assert!(concat(&headers(&[("upload-concat", &many)])).is_err());
    }
}
