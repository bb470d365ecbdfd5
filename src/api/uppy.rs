//! Uppy Companion's S3 routes (`../shared/API.md` v1.1, "Uppy"), under
//! `/v1/uppy/{uploadToken}/s3/...`, with Companion's JSON shapes, so `@uppy/aws-s3` uploads
//! through upgate with `companionEndpoint: "<gateway>/v1/uppy/<token>"` (Uppy 5:
//! `endpoint`). Each upload is a file of the token's session ([`crate::uploads::uppy`]).
//!
//! Companion's `uploadId` is the file's id here (the storage upload's id stays inside the
//! gateway); its `key` is the object's key, which the routes ignore on the way back in.

use std::collections::BTreeMap;

use axum::extract::State;
use axum::http::Uri;
use axum::response::{IntoResponse, Response};
use axum::{Extension, Json};
use serde_json::{json, Value};

use super::{ApiPath, AppState, JsonBody, Tenant};
use crate::auth::SessionScope;
use crate::error::{AppError, FieldError};
use crate::model::{now_ms, FileRecord};
use crate::uploads::uppy::{MULTIPART, POST};

/// The session of the request's upload token (these routes act on nothing else).
fn session(scope: Option<Extension<SessionScope>>) -> Result<String, AppError> {
    scope
        .map(|Extension(s)| s.0)
        .ok_or(AppError::InsufficientScope)
}

/// The query's pairs, percent-decoded (`+` is a space: Uppy builds them with
/// `URLSearchParams`).
fn query(uri: &Uri) -> Vec<(String, String)> {
    form_urlencoded::parse(uri.query().unwrap_or("").as_bytes())
        .into_owned()
        .collect()
}

fn bad(field: &str, message: &str) -> AppError {
    AppError::Validation(vec![FieldError::new(field, message)])
}

/// Uppy's `metadata` (all of the file's `meta` by default) as the file's metadata: strings
/// kept, numbers and booleans written out, `null` and nested values dropped; `name` and
/// `type` are the file's name and type already.
fn file_metadata(meta: Option<&Value>) -> BTreeMap<String, String> {
    let Some(Value::Object(m)) = meta else {
        return BTreeMap::new();
    };
    m.iter()
        .filter(|(k, _)| k.as_str() != "name" && k.as_str() != "type")
        .filter_map(|(k, v)| match v {
            Value::String(s) => Some((k.clone(), s.clone())),
            Value::Number(n) => Some((k.clone(), n.to_string())),
            Value::Bool(b) => Some((k.clone(), b.to_string())),
            _ => None,
        })
        .collect()
}

/// Registers a file of unknown length for an Uppy upload of `form` in the token's session.
async fn register(
    state: &AppState,
    tenant: &Tenant,
    session_id: &str,
    file_name: &str,
    content_type: Option<&str>,
    metadata: BTreeMap<String, String>,
    form: &str,
) -> Result<FileRecord, AppError> {
    if file_name.is_empty() {
        return Err(bad("filename", "is required"));
    }
    let t = &tenant.0;
    state.uploads.uppy_supported(&t.id)?;
    let id = uuid::Uuid::new_v4().simple().to_string();
    let mut reg = json!({
        "fileName": file_name,
        // A placeholder: the length is learnt when the bytes are in storage.
        "sizeBytes": 0,
        // Short (s3s-fs, say, keeps a whole key in one file name) and unique per upload:
        // Uppy users upload files of one name more than once.
        "fileKey": format!("uppy-{}", &id[..12]),
        "metadata": metadata,
    });
    if let Some(ct) = content_type.filter(|c| !c.is_empty()) {
        reg["contentType"] = json!(ct);
    }
    let req = crate::validate::register_file(&reg, t)?;
    let mut file = super::files::new_file(state, t, session_id, req)?;
    file.tus_form = Some(form.to_owned());
    if form == POST {
        file.upload_id = Some(state.uploads.post_marker(now_ms()));
    }
    tracing::Span::current().record("file_id", file.id.as_str());
    let now = now_ms();
    let gate = state
        .store
        .register_tus_file(&t.id, &file, true, now)
        .await?;
    state.uploads.wake(&t.id, session_id);
    let outcome = super::open_gate(gate, &t.id, now).map(|(r, _)| r);
    match super::files::registered(outcome, &file.file_key) {
        Ok(f) => {
            state.metrics.registration("created");
            Ok(f)
        }
        Err(e) => {
            state.metrics.registration(e.code());
            Err(e)
        }
    }
}

/// The largest file the tenant takes (and the part count allows).
fn max_size(state: &AppState, tenant: &Tenant) -> u64 {
    let parts_cap = crate::model::MAX_PARTS.saturating_mul(state.config.part_size_bytes());
    tenant.0.max_file_size_bytes.min(parts_cap)
}

/// `POST .../s3/multipart`: `{filename, type, metadata}` → `{key, uploadId, bucket}`. One
/// store call: the storage upload is created when the first part is signed.
#[tracing::instrument(skip_all, fields(tenant = %tenant.0.id, session_id, file_id))]
pub(super) async fn create(
    State(state): State<AppState>,
    Extension(tenant): Extension<Tenant>,
    scope: Option<Extension<SessionScope>>,
    JsonBody(body): JsonBody,
) -> Result<Response, AppError> {
    let session_id = session(scope)?;
    tracing::Span::current().record("session_id", session_id.as_str());
    let file_name = body.get("filename").and_then(Value::as_str).unwrap_or("");
    let content_type = match body.get("type") {
        None | Some(Value::Null) => None,
        Some(Value::String(s)) => Some(s.as_str()),
        Some(_) => return Err(bad("type", "must be a string")),
    };
    let metadata = file_metadata(body.get("metadata"));
    let file = register(
        &state,
        &tenant,
        &session_id,
        file_name,
        content_type,
        metadata,
        MULTIPART,
    )
    .await?;
    Ok(Json(json!({
        "key": file.object_key,
        "uploadId": file.id,
        "bucket": Value::Null,
    }))
    .into_response())
}

/// `GET .../s3/multipart/{uploadId}?key=`: the parts storage holds, as S3 lists them.
#[tracing::instrument(skip_all, fields(tenant = %tenant.0.id, file_id = %file_id))]
pub(super) async fn list_parts(
    State(state): State<AppState>,
    Extension(tenant): Extension<Tenant>,
    scope: Option<Extension<SessionScope>>,
    ApiPath((_token, file_id)): ApiPath<(String, String)>,
) -> Result<Response, AppError> {
    let session_id = session(scope)?;
    let parts = state
        .uploads
        .uppy_parts(&tenant.0.id, &session_id, &file_id)
        .await?;
    let parts: Vec<Value> = parts
        .iter()
        .map(|p| json!({"PartNumber": p.part_number, "Size": p.size_bytes, "ETag": format!("\"{}\"", p.etag.trim_matches('"'))}))
        .collect();
    Ok(Json(Value::Array(parts)).into_response())
}

fn part_number(raw: &str) -> Result<u32, AppError> {
    raw.parse::<u32>()
        .ok()
        .filter(|n| *n > 0)
        .ok_or_else(|| bad("partNumber", "must be a positive whole number"))
}

/// `GET .../s3/multipart/{uploadId}/{partNumber}?key=`: `{url, expires}`.
#[tracing::instrument(skip_all, fields(tenant = %tenant.0.id, file_id = %file_id, part_number = %n))]
pub(super) async fn sign_part(
    State(state): State<AppState>,
    Extension(tenant): Extension<Tenant>,
    scope: Option<Extension<SessionScope>>,
    ApiPath((_token, file_id, n)): ApiPath<(String, String, String)>,
) -> Result<Response, AppError> {
    let session_id = session(scope)?;
    let n = part_number(&n)?;
    let urls = state
        .uploads
        .uppy_sign(
            &tenant.0.id,
            &session_id,
            &file_id,
            &[n],
            max_size(&state, &tenant),
        )
        .await?;
    let url = urls
        .into_iter()
        .next()
        .map(|(_, u)| u)
        .ok_or_else(|| AppError::Internal("no URL for a signed part".into()))?;
    Ok(Json(json!({
        "url": url,
        "expires": crate::uploads::parts::PRESIGN_TTL.as_secs(),
    }))
    .into_response())
}

/// `GET .../s3/multipart/{uploadId}/batch?key=&partNumbers=1,2`:
/// `{presignedUrls: {"1": url, ...}}` (Uppy 6 signs one part at a time; older clients
/// batch).
#[tracing::instrument(skip_all, fields(tenant = %tenant.0.id, file_id = %file_id))]
pub(super) async fn sign_batch(
    State(state): State<AppState>,
    Extension(tenant): Extension<Tenant>,
    scope: Option<Extension<SessionScope>>,
    ApiPath((_token, file_id)): ApiPath<(String, String)>,
    uri: Uri,
) -> Result<Response, AppError> {
    let session_id = session(scope)?;
    let q = query(&uri);
    let raw = q
        .iter()
        .find(|(k, _)| k == "partNumbers")
        .map(|(_, v)| v.as_str())
        .unwrap_or("");
    let numbers = raw
        .split(',')
        .filter(|s| !s.is_empty())
        .map(part_number)
        .collect::<Result<Vec<_>, _>>()?;
    // A batch is at most one presign per part: bounded as the REST presign is.
    if numbers.is_empty() || numbers.len() > 1000 {
        return Err(bad("partNumbers", "must list 1 to 1000 part numbers"));
    }
    let signed = state
        .uploads
        .uppy_sign(
            &tenant.0.id,
            &session_id,
            &file_id,
            &numbers,
            max_size(&state, &tenant),
        )
        .await?;
    let urls: serde_json::Map<String, Value> = signed
        .into_iter()
        .map(|(n, url)| (n.to_string(), Value::String(url)))
        .collect();
    Ok(Json(json!({ "presignedUrls": urls })).into_response())
}

/// `POST .../s3/multipart/{uploadId}/complete?key=`: `{parts: [{PartNumber, ETag}]}` →
/// `{location, key, bucket}`.
#[tracing::instrument(skip_all, fields(tenant = %tenant.0.id, file_id = %file_id))]
pub(super) async fn complete(
    State(state): State<AppState>,
    Extension(tenant): Extension<Tenant>,
    scope: Option<Extension<SessionScope>>,
    ApiPath((_token, file_id)): ApiPath<(String, String)>,
    JsonBody(body): JsonBody,
) -> Result<Response, AppError> {
    let session_id = session(scope)?;
    let Some(list) = body.get("parts").and_then(Value::as_array) else {
        return Err(bad("parts", "must be an array of {PartNumber, ETag}"));
    };
    if list.len() > crate::model::MAX_PARTS as usize {
        return Err(bad("parts", "too many parts"));
    }
    let mut parts = Vec::with_capacity(list.len());
    for p in list {
        let n = p
            .get("PartNumber")
            .and_then(Value::as_u64)
            .and_then(|n| u32::try_from(n).ok());
        let etag = p.get("ETag").and_then(Value::as_str);
        match (n, etag) {
            (Some(n), Some(e)) => parts.push((n, e.to_owned())),
            _ => {
                return Err(bad(
                    "parts",
                    "each part needs a numeric PartNumber and a string ETag",
                ))
            }
        }
    }
    let file = state
        .uploads
        .uppy_complete(
            &tenant.0.id,
            &session_id,
            &file_id,
            &parts,
            max_size(&state, &tenant),
        )
        .await?;
    Ok(Json(json!({
        "location": file.file_url,
        "key": file.object_key,
        "bucket": Value::Null,
    }))
    .into_response())
}

/// `DELETE .../s3/multipart/{uploadId}?key=`: the file is deleted (its upload aborted,
/// anything stored removed) → `{}`.
#[tracing::instrument(skip_all, fields(tenant = %tenant.0.id, file_id = %file_id))]
pub(super) async fn abort(
    State(state): State<AppState>,
    Extension(tenant): Extension<Tenant>,
    scope: Option<Extension<SessionScope>>,
    ApiPath((_token, file_id)): ApiPath<(String, String)>,
) -> Result<Response, AppError> {
    let session_id = session(scope)?;
    match state
        .uploads
        .uppy_abort(&tenant.0.id, &session_id, &file_id)
        .await
    {
        // Already gone: Uppy aborts on removal whatever happened before.
        Ok(()) | Err(AppError::FileNotFound) => Ok(Json(json!({})).into_response()),
        Err(e) => Err(e),
    }
}

/// `GET .../s3/params?filename=&type=&metadata[k]=v`: a presigned form upload
/// `{method: "POST", url, fields, expires}` for a file registered now; it becomes
/// `completed` once its object lands.
#[tracing::instrument(skip_all, fields(tenant = %tenant.0.id, session_id, file_id))]
pub(super) async fn params(
    State(state): State<AppState>,
    Extension(tenant): Extension<Tenant>,
    scope: Option<Extension<SessionScope>>,
    uri: Uri,
) -> Result<Response, AppError> {
    let session_id = session(scope)?;
    let q = query(&uri);
    tracing::Span::current().record("session_id", session_id.as_str());
    let mut file_name: &str = "";
    let mut content_type: Option<&str> = None;
    let mut meta = serde_json::Map::new();
    for (k, v) in &q {
        match k.as_str() {
            "filename" => file_name = v,
            "type" => content_type = Some(v),
            _ => {
                if let Some(name) = k
                    .strip_prefix("metadata[")
                    .and_then(|r| r.strip_suffix(']'))
                {
                    meta.insert(name.to_owned(), Value::String(v.to_owned()));
                }
            }
        }
    }
    let metadata = file_metadata(Some(&Value::Object(meta)));
    let file = register(
        &state,
        &tenant,
        &session_id,
        file_name,
        content_type,
        metadata,
        POST,
    )
    .await?;
    let post = match state
        .uploads
        .uppy_post(&tenant.0.id, &file, max_size(&state, &tenant))
        .await
    {
        Ok(p) => p,
        Err(e) => {
            if let Err(d) = state
                .uploads
                .delete_file(&tenant.0.id, &session_id, &file.id)
                .await
            {
                tracing::warn!(error = %d, "removing an Uppy file whose form could not be signed failed");
            }
            return Err(e);
        }
    };
    let fields: serde_json::Map<String, Value> = post
        .fields
        .into_iter()
        .map(|(k, v)| (k, Value::String(v)))
        .collect();
    let mut res = Json(json!({
        "method": "POST",
        "url": post.url,
        "fields": fields,
        "expires": state.uploads.form_post_ttl().as_secs(),
    }))
    .into_response();
    res.extensions_mut()
        .insert(upgate_layers::idempotency::NotReplayable);
    Ok(res)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn uppy_meta_becomes_string_metadata_without_name_and_type() {
        let meta = json!({"name": "a.png", "type": "image/png", "relativePath": null,
            "caption": "hi", "n": 3, "ok": true, "nested": {"x": 1}});
        let m = file_metadata(Some(&meta));
        assert_eq!(
            m.into_iter().collect::<Vec<_>>(),
            vec![
                ("caption".to_owned(), "hi".to_owned()),
                ("n".to_owned(), "3".to_owned()),
                ("ok".to_owned(), "true".to_owned()),
            ]
        );
        assert!(file_metadata(None).is_empty());
    }

    #[test]
    fn part_numbers_are_positive_whole_numbers() {
        assert_eq!(part_number("3").ok(), Some(3));
        assert!(part_number("0").is_err());
        assert!(part_number("-1").is_err());
        assert!(part_number("x").is_err());
    }
}
