//! Request-body validation: pure functions from untrusted JSON to typed requests or a list
//! of every field that is wrong. Property-tested in this module and fuzzed over HTTP in
//! `tests/api_fuzz.rs`.

use serde_json::{Map, Value};

use crate::config::TenantConfig;
use crate::error::{AppError, FieldError};

/// Longest fileKey / fileName, in bytes (S3's object-key limit).
pub const MAX_KEY_BYTES: usize = 1024;

/// Why a fileKey is refused, or `None` when it is fine.
///
/// Refused: empty, over 1024 bytes, control characters, a `..` segment, a leading `/`; and
/// because keys become paths on filesystem storage, a `.` segment or an empty segment
/// (`a//b`, a trailing `/`), which would alias another key.
pub fn file_key_problem(key: &str) -> Option<&'static str> {
    if key.is_empty() {
        return Some("must not be empty");
    }
    if key.len() > MAX_KEY_BYTES {
        return Some("must be at most 1024 bytes");
    }
    if key.chars().any(char::is_control) {
        return Some("must not contain control characters");
    }
    if key.starts_with('/') {
        return Some("must not start with '/'");
    }
    for segment in key.split('/') {
        match segment {
            ".." => return Some("must not contain a '..' segment"),
            "." => return Some("must not contain a '.' segment"),
            "" => return Some("must not contain an empty segment ('//' or a trailing '/')"),
            _ => {}
        }
    }
    None
}

/// True when `s` looks like `type/subtype` (parameters allowed).
fn is_media_type(s: &str) -> bool {
    // ASCII only: it becomes the object's Content-Type header.
    s.is_ascii() && s.parse::<mime::Mime>().is_ok() && !s.chars().any(char::is_control)
}

/// `POST /v1/sessions`.
#[derive(Debug, Clone, PartialEq)]
pub struct CreateSession {
    /// Requested file limit.
    pub max_files: Option<u32>,
    /// Session lifetime.
    pub ttl_seconds: u64,
    /// Client metadata (an object).
    pub metadata: Value,
}

/// `POST /v1/sessions/{id}/files`.
#[derive(Debug, Clone, PartialEq)]
pub struct RegisterFile {
    /// Client's name.
    pub file_name: String,
    /// Storage key under the session.
    pub file_key: String,
    /// Declared size.
    pub size_bytes: u64,
    /// Declared content type.
    pub content_type: Option<String>,
    /// Client metadata (string values).
    pub metadata: std::collections::BTreeMap<String, String>,
}

/// One entry of `complete`'s `parts`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClientPart {
    /// 1-based.
    pub part_number: u32,
    /// ETag as the client has it (quotes allowed).
    pub etag: String,
}

fn object(body: &Value) -> Result<&Map<String, Value>, AppError> {
    body.as_object()
        .ok_or_else(|| AppError::Validation(vec![FieldError::new("body", "must be a JSON object")]))
}

fn present<'a>(o: &'a Map<String, Value>, field: &str) -> Option<&'a Value> {
    o.get(field).filter(|v| !v.is_null())
}

/// Parses a JSON body (empty means `{}`), mapping syntax errors to `validationFailed`.
pub fn parse_json(bytes: &[u8]) -> Result<Value, AppError> {
    if bytes.iter().all(u8::is_ascii_whitespace) {
        return Ok(Value::Object(Map::new()));
    }
    serde_json::from_slice(bytes).map_err(|e| {
        AppError::Validation(vec![FieldError::new(
            "body",
            format!("malformed JSON: {e}"),
        )])
    })
}

/// The `ttlSeconds` of a token-minting body: absent, or an integer >= 1.
pub fn token_ttl(body: &Value) -> Result<Option<u64>, AppError> {
    let o = object(body)?;
    match present(o, "ttlSeconds") {
        None => Ok(None),
        Some(v) => match v.as_u64() {
            Some(n) if n >= 1 => Ok(Some(n)),
            _ => Err(AppError::Validation(vec![FieldError::new(
                "ttlSeconds",
                "must be an integer >= 1",
            )])),
        },
    }
}

/// Validates a create-session body against the tenant's bounds.
pub fn create_session(body: &Value, tenant: &TenantConfig) -> Result<CreateSession, AppError> {
    let o = object(body)?;
    let mut errors = Vec::new();
    let max_files = match present(o, "maxFiles") {
        None => None,
        Some(v) => match v.as_u64() {
            Some(n) if n >= 1 && n <= u64::from(tenant.max_files_per_session) => Some(n as u32),
            Some(n) if n >= 1 => {
                errors.push(FieldError::new(
                    "maxFiles",
                    format!(
                        "must be at most {} for this tenant",
                        tenant.max_files_per_session
                    ),
                ));
                None
            }
            _ => {
                errors.push(FieldError::new("maxFiles", "must be an integer >= 1"));
                None
            }
        },
    };
    let bounds = tenant.session_ttl_seconds;
    let ttl_seconds = match present(o, "ttlSeconds") {
        None => bounds.default,
        Some(v) => match v.as_u64() {
            Some(n) if (bounds.min..=bounds.max).contains(&n) => n,
            _ => {
                errors.push(FieldError::new(
                    "ttlSeconds",
                    format!(
                        "must be an integer between {} and {}",
                        bounds.min, bounds.max
                    ),
                ));
                bounds.default
            }
        },
    };
    let metadata = match present(o, "metadata") {
        None => Value::Object(Map::new()),
        Some(v @ Value::Object(_)) => v.clone(),
        Some(_) => {
            errors.push(FieldError::new("metadata", "must be a JSON object"));
            Value::Null
        }
    };
    metadata_within_limit(&metadata, tenant)?;
    if errors.is_empty() {
        Ok(CreateSession {
            max_files,
            ttl_seconds,
            metadata,
        })
    } else {
        Err(AppError::Validation(errors))
    }
}

fn string_field(
    o: &Map<String, Value>,
    field: &str,
    errors: &mut Vec<FieldError>,
) -> Option<String> {
    match present(o, field) {
        None => None,
        Some(Value::String(s)) => Some(s.clone()),
        Some(_) => {
            errors.push(FieldError::new(field, "must be a string"));
            None
        }
    }
}

/// Validates a register-file body; `fileTooLarge` only once the body is otherwise valid.
pub fn register_file(body: &Value, tenant: &TenantConfig) -> Result<RegisterFile, AppError> {
    let o = object(body)?;
    let mut errors = Vec::new();
    let file_name = string_field(o, "fileName", &mut errors);
    match &file_name {
        None if !errors.iter().any(|e| e.field == "fileName") => {
            errors.push(FieldError::new("fileName", "is required"))
        }
        Some(n) if n.is_empty() || n.len() > MAX_KEY_BYTES || n.chars().any(char::is_control) => {
            errors.push(FieldError::new(
                "fileName",
                "must be 1 to 1024 bytes without control characters",
            ))
        }
        _ => {}
    }
    let explicit_key = string_field(o, "fileKey", &mut errors);
    let file_key = explicit_key.clone().or_else(|| file_name.clone());
    if let Some(k) = &file_key {
        if let Some(problem) = file_key_problem(k) {
            // When fileKey defaults to fileName, say so: the client may not know the default.
            let msg = if explicit_key.is_some() {
                problem.to_owned()
            } else {
                format!("{problem} (fileKey defaults to fileName)")
            };
            errors.push(FieldError::new("fileKey", msg));
        }
    }
    let size_bytes = match present(o, "sizeBytes") {
        None => {
            errors.push(FieldError::new("sizeBytes", "is required"));
            None
        }
        Some(v) => match v.as_u64() {
            Some(n) => Some(n),
            None => {
                errors.push(FieldError::new("sizeBytes", "must be an integer >= 0"));
                None
            }
        },
    };
    let metadata = match present(o, "metadata") {
        None => std::collections::BTreeMap::new(),
        Some(v) => {
            match serde_json::from_value::<std::collections::BTreeMap<String, String>>(v.clone()) {
                Ok(m) => m,
                Err(_) => {
                    errors.push(FieldError::new(
                        "metadata",
                        "must be a JSON object of string values",
                    ));
                    std::collections::BTreeMap::new()
                }
            }
        }
    };
    metadata_within_limit(&metadata, tenant)?;
    let content_type = string_field(o, "contentType", &mut errors);
    if let Some(ct) = &content_type {
        if !is_media_type(ct) {
            errors.push(FieldError::new(
                "contentType",
                "must be a media type like image/png",
            ));
        }
    }
    match (errors.is_empty(), file_name, file_key, size_bytes) {
        (true, Some(file_name), Some(file_key), Some(size_bytes)) => {
            if size_bytes > tenant.max_file_size_bytes {
                return Err(AppError::FileTooLarge(tenant.max_file_size_bytes));
            }
            Ok(RegisterFile {
                file_name,
                file_key,
                size_bytes,
                content_type,
                metadata,
            })
        }
        _ => Err(AppError::Validation(errors)),
    }
}

/// Validates `GET .../files`' query: `limit` 1 to 1,000 (default 1,000) and `cursor` (a
/// `nextCursor` this API returned). Unknown parameters are ignored; every problem is
/// reported at once.
pub fn files_page(query: Option<&str>) -> Result<crate::store::Page, AppError> {
    use crate::store::FILES_PAGE_MAX;
    let mut page = crate::store::Page::FIRST;
    let mut errors = Vec::new();
    for (name, value) in form_urlencoded::parse(query.unwrap_or("").as_bytes()) {
        match &*name {
            "limit" => match value.parse::<usize>() {
                Ok(n) if (1..=FILES_PAGE_MAX).contains(&n) => page.limit = n,
                _ => errors.push(FieldError::new(
                    "limit",
                    format!("must be an integer between 1 and {FILES_PAGE_MAX}"),
                )),
            },
            "cursor" if value.is_empty() => {}
            "cursor" => match value.parse::<u64>() {
                Ok(seq) => page.after = Some(seq),
                Err(_) => errors.push(FieldError::new(
                    "cursor",
                    "must be a nextCursor returned by this API",
                )),
            },
            _ => {}
        }
    }
    if errors.is_empty() {
        Ok(page)
    } else {
        Err(AppError::Validation(errors))
    }
}

/// Session and file `metadata` is at most the tenant's `max_metadata_bytes`, counted as the
/// JSON the gateway stores (`../shared/API.md` v1.1 limits): else 413 `payloadTooLarge`.
fn metadata_within_limit<T: serde::Serialize>(
    metadata: &T,
    tenant: &TenantConfig,
) -> Result<(), AppError> {
    if serde_json::to_vec(metadata).map_or(0, |v| v.len() as u64) > tenant.max_metadata_bytes {
        return Err(AppError::MetadataTooLarge(tenant.max_metadata_bytes));
    }
    Ok(())
}

/// Validates a part number path segment against the file's part count.
pub fn part_number(raw: &str, part_count: u32) -> Result<u32, AppError> {
    match raw.parse::<u32>() {
        Ok(n) if n >= 1 && n <= part_count => Ok(n),
        _ => Err(AppError::Validation(vec![FieldError::new(
            "partNumber",
            format!("must be an integer between 1 and {part_count}"),
        )])),
    }
}

/// Validates `complete`'s optional `parts`.
pub fn complete_parts(body: &Value, part_count: u32) -> Result<Option<Vec<ClientPart>>, AppError> {
    let o = object(body)?;
    let Some(parts) = present(o, "parts") else {
        return Ok(None);
    };
    let Some(items) = parts.as_array() else {
        return Err(AppError::Validation(vec![FieldError::new(
            "parts",
            "must be an array",
        )]));
    };
    let mut errors = Vec::new();
    let mut out: Vec<ClientPart> = Vec::with_capacity(items.len());
    for (i, item) in items.iter().enumerate() {
        let number = item.get("partNumber").and_then(Value::as_u64);
        let etag = item.get("etag").and_then(Value::as_str);
        match (number, etag) {
            (Some(n), Some(e))
                if n >= 1 && n <= u64::from(part_count) && !e.trim_matches('"').is_empty() =>
            {
                if out.iter().any(|p| u64::from(p.part_number) == n) {
                    errors.push(FieldError::new(
                        format!("parts[{i}].partNumber"),
                        "is listed twice",
                    ));
                } else {
                    out.push(ClientPart {
                        part_number: n as u32,
                        etag: e.trim_matches('"').to_owned(),
                    });
                }
            }
            _ => errors.push(FieldError::new(
                format!("parts[{i}]"),
                format!("needs partNumber (1..={part_count}) and a non-empty etag"),
            )),
        }
    }
    if !errors.is_empty() {
        return Err(AppError::Validation(errors));
    }
    out.sort_by_key(|p| p.part_number);
    Ok(Some(out))
}

/// Validates `presigned-parts`' `partNumbers`.
pub fn presign_numbers(body: &Value, part_count: u32) -> Result<Vec<u32>, AppError> {
    let o = object(body)?;
    let bad = || {
        AppError::Validation(vec![FieldError::new(
            "partNumbers",
            format!("must be a non-empty array of distinct integers between 1 and {part_count} (at most 1000)"),
        )])
    };
    let items = present(o, "partNumbers")
        .and_then(Value::as_array)
        .ok_or_else(bad)?;
    if items.is_empty() || items.len() > 1000 {
        return Err(bad());
    }
    let mut out = Vec::with_capacity(items.len());
    for v in items {
        match v.as_u64() {
            Some(n) if n >= 1 && n <= u64::from(part_count) && !out.contains(&(n as u32)) => {
                out.push(n as u32)
            }
            _ => return Err(bad()),
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use serde_json::json;

    fn tenant() -> TenantConfig {
        crate::config::Config::embedded_default()
            .map(|c| c.tenants[0].clone())
            .unwrap_or_else(|e| panic!("{e}"))
    }

    #[test]
    fn file_key_rules() {
        for bad in [
            "", "/a", "a/../b", "..", "a/..", "a\u{0}b", "a\nb", "a//b", "a/", "./a",
        ] {
            assert!(file_key_problem(bad).is_some(), "{bad:?} accepted");
        }
        assert!(file_key_problem(&"k".repeat(1025)).is_some());
        for good in [
            "a",
            "a/b/c.txt",
            "my..file",
            "...",
            "é/ü.png",
            &"k".repeat(1024),
        ] {
            assert_eq!(file_key_problem(good), None, "{good:?} refused");
        }
    }

    #[test]
    fn register_reports_every_bad_field() {
        let err = register_file(
            &json!({"fileKey": "/x", "sizeBytes": -1, "contentType": 5}),
            &tenant(),
        )
        .expect_err("bad");
        let AppError::Validation(errs) = err else {
            panic!("not validation")
        };
        let fields: Vec<&str> = errs.iter().map(|e| e.field.as_str()).collect();
        assert_eq!(fields, ["fileName", "fileKey", "sizeBytes", "contentType"]);
    }

    #[test]
    fn file_key_defaults_to_file_name() {
        let r =
            register_file(&json!({"fileName": "a.png", "sizeBytes": 3}), &tenant()).expect("valid");
        assert_eq!(r.file_key, "a.png");
    }

    #[test]
    fn oversize_file_is_413_after_validation() {
        let mut t = tenant();
        t.max_file_size_bytes = 10;
        assert!(matches!(
            register_file(&json!({"fileName": "a", "sizeBytes": 11}), &t),
            Err(AppError::FileTooLarge(10))
        ));
        assert!(matches!(
            register_file(&json!({"sizeBytes": 11}), &t),
            Err(AppError::Validation(_))
        ));
    }

    proptest! {
        #[test]
        fn file_key_validation_never_panics_and_accepts_only_safe_keys(key in "\\PC{0,40}|[a./]{0,12}") {
            if file_key_problem(&key).is_none() {
                prop_assert!(!key.is_empty() && !key.starts_with('/'));
                prop_assert!(key.split('/').all(|s| !s.is_empty() && s != "." && s != ".."));
            }
        }

        #[test]
        fn arbitrary_json_bodies_are_typed_or_validation_errors(text in "\\PC{0,64}") {
            let t = tenant();
            if let Ok(v) = parse_json(text.as_bytes()) {
                for r in [register_file(&v, &t).err(), create_session(&v, &t).err()].into_iter().flatten() {
                    prop_assert!(r.status().is_client_error());
                }
                let _ = complete_parts(&v, 3);
                let _ = presign_numbers(&v, 3);
            }
        }
    }
}
