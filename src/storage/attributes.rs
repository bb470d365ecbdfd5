//! What a completed object carries besides its bytes (`../shared/API.md` v1.1,
//! "Deployments"): Content-Type, Content-Disposition, the file's metadata as user metadata,
//! and the tenant's server-side encryption and storage class.
//!
//! S3 takes them when the multipart upload is created, so [`ObjectAttributes`] goes with
//! [`super::ObjectStore::create_upload`]. Filesystem storage has no place for them and
//! ignores them (the README says so).

use std::collections::BTreeMap;

use percent_encoding::{utf8_percent_encode, AsciiSet, NON_ALPHANUMERIC};

/// `content_disposition` of a tenant.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Disposition {
    /// `attachment` (the default): browsers download the object.
    #[default]
    Attachment,
    /// `inline`: browsers show it.
    Inline,
}

/// A tenant's `sse`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Sse {
    /// `AES256`: S3-managed keys.
    Aes256,
    /// `aws:kms`, with `sse_kms_key_id` (absent: the account's default KMS key).
    Kms {
        /// `sse_kms_key_id`.
        key_id: Option<String>,
    },
}

/// A tenant's settings for the objects it completes.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct ObjectSettings {
    /// `content_disposition`.
    pub disposition: Disposition,
    /// `sse`.
    pub sse: Option<Sse>,
    /// `storage_class` (an S3 storage class name, checked at start-up).
    pub storage_class: Option<String>,
}

/// The attributes one object is created with.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct ObjectAttributes {
    /// The declared type, or the detected one, else `application/octet-stream`; `None`
    /// leaves it to storage.
    pub content_type: Option<String>,
    /// A `Content-Disposition` value (see [`content_disposition`]).
    pub content_disposition: Option<String>,
    /// The file's metadata, as given at registration (S3 encodes it with [`s3_metadata`]).
    pub metadata: BTreeMap<String, String>,
    /// Server-side encryption.
    pub sse: Option<Sse>,
    /// Storage class.
    pub storage_class: Option<String>,
}

impl ObjectAttributes {
    /// The attributes of a file named `file_name` of type `content_type` (`None`:
    /// `application/octet-stream`), under a tenant's `settings`.
    pub fn new(
        settings: &ObjectSettings,
        file_name: &str,
        content_type: Option<&str>,
        metadata: &BTreeMap<String, String>,
    ) -> Self {
        ObjectAttributes {
            content_type: Some(content_type.unwrap_or(OCTET_STREAM).to_owned()),
            content_disposition: Some(content_disposition(settings.disposition, file_name)),
            metadata: metadata.clone(),
            sse: settings.sse.clone(),
            storage_class: settings.storage_class.clone(),
        }
    }
}

/// The type of an object whose type is neither declared nor detected.
pub const OCTET_STREAM: &str = "application/octet-stream";

/// RFC 5987 `attr-char`: everything else in `filename*` is percent-encoded.
const ATTR_CHAR: &AsciiSet = &NON_ALPHANUMERIC
    .remove(b'!')
    .remove(b'#')
    .remove(b'$')
    .remove(b'&')
    .remove(b'+')
    .remove(b'-')
    .remove(b'.')
    .remove(b'^')
    .remove(b'_')
    .remove(b'`')
    .remove(b'|')
    .remove(b'~');

/// An RFC 6266 `Content-Disposition` for `file_name`: the disposition type, an ASCII
/// `filename` fallback (every character outside printable ASCII, and `"`, `\`, `/`, `%`,
/// replaced by `_`), and `filename*=UTF-8''` with the exact name percent-encoded.
///
/// ```
/// use upgate::storage::attributes::{content_disposition, Disposition};
/// assert_eq!(
///     content_disposition(Disposition::Attachment, "résumé 2026.pdf"),
///     "attachment; filename=\"r_sum_ 2026.pdf\"; filename*=UTF-8''r%C3%A9sum%C3%A9%202026.pdf"
/// );
/// assert_eq!(
///     content_disposition(Disposition::Inline, "a.png"),
///     "inline; filename=\"a.png\"; filename*=UTF-8''a.png"
/// );
/// ```
pub fn content_disposition(disposition: Disposition, file_name: &str) -> String {
    let kind = match disposition {
        Disposition::Attachment => "attachment",
        Disposition::Inline => "inline",
    };
    // Path separators and quoting characters become `_` in the fallback; `filename*` keeps
    // them, percent-encoded.
    let fallback: String = file_name
        .chars()
        .map(|c| match c {
            '"' | '\\' | '/' | '%' => '_',
            ' '..='~' => c,
            _ => '_',
        })
        .collect();
    let exact = utf8_percent_encode(file_name, ATTR_CHAR);
    format!("{kind}; filename=\"{fallback}\"; filename*=UTF-8''{exact}")
}

/// HTTP `tchar`s other than `%`: a metadata key keeps these and percent-encodes the rest.
const NOT_TOKEN: &AsciiSet = &NON_ALPHANUMERIC
    .remove(b'!')
    .remove(b'#')
    .remove(b'$')
    .remove(b'&')
    .remove(b'\'')
    .remove(b'*')
    .remove(b'+')
    .remove(b'-')
    .remove(b'.')
    .remove(b'^')
    .remove(b'_')
    .remove(b'`')
    .remove(b'|')
    .remove(b'~');

/// The file's metadata as S3 user metadata (`x-amz-meta-<key>: <value>`), which must be
/// valid HTTP header names and values: a key keeps its token characters and
/// percent-encodes every other byte; a value of printable ASCII stays as it is, any other
/// becomes an RFC 2047 encoded word (`=?UTF-8?B?<base64>?=`), the form S3 itself uses for
/// non-ASCII metadata. S3 compares keys without case.
///
/// ```
/// let m = std::collections::BTreeMap::from([
///     ("owner".to_owned(), "ada".to_owned()),
///     ("title text".to_owned(), "Grüße".to_owned()),
/// ]);
/// let s3 = upgate::storage::attributes::s3_metadata(&m);
/// assert_eq!(s3["owner"], "ada");
/// assert_eq!(s3["title%20text"], "=?UTF-8?B?R3LDvMOfZQ==?=");
/// ```
pub fn s3_metadata(metadata: &BTreeMap<String, String>) -> BTreeMap<String, String> {
    use base64::Engine as _;
    metadata
        .iter()
        .map(|(k, v)| {
            let key = utf8_percent_encode(k, NOT_TOKEN).to_string();
            let plain = v.bytes().all(|b| (b' '..=b'~').contains(&b))
                && !v.starts_with(' ')
                && !v.ends_with(' ')
                && !v.starts_with("=?");
            let value = if plain {
                v.clone()
            } else {
                format!(
                    "=?UTF-8?B?{}?=",
                    base64::engine::general_purpose::STANDARD.encode(v)
                )
            };
            (key, value)
        })
        .collect()
}

/// Largest user metadata S3 accepts: the keys and values of `x-amz-meta-*` together.
pub const S3_MAX_METADATA_BYTES: usize = 2048;

/// Bytes S3 counts for `metadata` once encoded (keys and values, UTF-8).
pub fn s3_metadata_len(metadata: &BTreeMap<String, String>) -> usize {
    s3_metadata(metadata)
        .iter()
        .map(|(k, v)| k.len() + v.len())
        .sum()
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn is_header_value(s: &str) -> bool {
        http::HeaderValue::from_str(s).is_ok() && s.is_ascii()
    }

    proptest! {
        #[test]
        fn any_file_name_gives_a_header_value_that_round_trips(name in "\\PC{0,40}") {
            let value = content_disposition(Disposition::Attachment, &name);
            prop_assert!(is_header_value(&value), "{value:?}");
            let exact = value.rsplit_once("filename*=UTF-8''").map(|(_, e)| e).unwrap_or("");
            let decoded = percent_encoding::percent_decode_str(exact).decode_utf8();
            prop_assert_eq!(decoded.as_deref().ok(), Some(name.as_str()));
        }

        #[test]
        fn any_metadata_gives_header_names_and_values(
            m in proptest::collection::btree_map("\\PC{1,12}", "\\PC{0,20}", 0..5)
        ) {
            for (k, v) in s3_metadata(&m) {
                prop_assert!(http::HeaderName::from_bytes(format!("x-amz-meta-{k}").as_bytes()).is_ok(), "{k:?}");
                prop_assert!(is_header_value(&v), "{v:?}");
            }
        }
    }

    #[test]
    fn quotes_and_separators_never_leave_the_fallback() {
        let v = content_disposition(Disposition::Attachment, "a\"b\\c/d%e.txt");
        assert_eq!(
            v,
            "attachment; filename=\"a_b_c_d_e.txt\"; filename*=UTF-8''a%22b%5Cc%2Fd%25e.txt"
        );
    }

    #[test]
    fn values_that_look_encoded_or_have_edge_spaces_are_encoded() {
        let m = BTreeMap::from([
            ("a".to_owned(), " x".to_owned()),
            ("b".to_owned(), "=?x?=".to_owned()),
            ("c".to_owned(), "line\nbreak".to_owned()),
        ]);
        let s3 = s3_metadata(&m);
        assert!(s3.values().all(|v| v.starts_with("=?UTF-8?B?")), "{s3:?}");
        assert_eq!(s3_metadata_len(&BTreeMap::new()), 0);
    }
}
