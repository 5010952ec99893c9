//! The one place where failures become what a client sees: a status and
//! one entry of the OCI error envelope `{"errors":[{"code","message"}]}`.
//! Services and sources keep their own typed errors; this module decides,
//! from their kind, the status, the code, and which details stay in the log.

use bytes::Bytes;
use http::header::{self, HeaderValue};
use http::{Response, StatusCode};
use hyper::ext::ReasonPhrase;

use crate::blobserve::BlobserveError;
use crate::http::body::{json_response, Body};
use crate::oci::error_code::ErrorCode;
use crate::oci::reference::NameError;
use crate::registry::RegistryError;
use crate::sources::{ErrorKind, SourceError};

const READ_ONLY_METHODS: HeaderValue = HeaderValue::from_static("GET, HEAD");

/// What internal faults tell the client; the detail goes to the log.
const INTERNAL: &str = "internal error; see the daemon's log";

#[derive(Debug)]
pub(crate) struct ApiError {
    status: StatusCode,
    code: ErrorCode,
    message: String,
}

impl ApiError {
    pub(crate) fn new(status: StatusCode, code: ErrorCode, message: impl Into<String>) -> ApiError {
        ApiError {
            status,
            code,
            message: message.into(),
        }
    }

    pub(crate) fn unsupported_route() -> ApiError {
        ApiError::new(
            StatusCode::NOT_FOUND,
            ErrorCode::Unsupported,
            "no such endpoint in the registry API",
        )
    }

    /// Writes, push or delete on a read-only cache.
    pub(crate) fn method_not_allowed(message: impl Into<String>) -> ApiError {
        ApiError::new(
            StatusCode::METHOD_NOT_ALLOWED,
            ErrorCode::Unsupported,
            message,
        )
    }

    pub(crate) fn message(&self) -> &str {
        &self.message
    }

    fn internal(detail: &dyn std::fmt::Display) -> ApiError {
        tracing::error!(error = %detail, "request failed");
        ApiError::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            ErrorCode::Unknown,
            INTERNAL,
        )
    }

    /// A source's failure to supply what the client asked for; `missing` is
    /// the code for "not here" (manifest or blob).
    fn from_source(e: &SourceError, missing: ErrorCode) -> ApiError {
        match e.kind() {
            // A fast 404 lets containerd fall back to its next host. Clients
            // print the code's own text ("manifest unknown") before the
            // message, so the message does not repeat it.
            ErrorKind::NotFound => {
                tracing::info!(error = %e, "miss");
                ApiError::new(StatusCode::NOT_FOUND, missing, e.to_string())
            }
            // Not a 404: containerd falls back to its next host on any error,
            // but reports the first non-404 one, so the reason (upstream down,
            // refused, offline) reaches the terminal instead of "not found".
            ErrorKind::Unavailable => {
                tracing::info!(error = %e, "upstream unavailable");
                ApiError::new(StatusCode::BAD_GATEWAY, ErrorCode::Unknown, e.to_string())
            }
            // NAME_UNKNOWN, as a 400: containerd prints only "not found" for
            // a 404, and podman does not retry this code (it does retry
            // NAME_INVALID).
            ErrorKind::UnknownName => ApiError::new(
                StatusCode::BAD_REQUEST,
                ErrorCode::NameUnknown,
                e.to_string(),
            ),
            ErrorKind::Invalid => ApiError::new(
                StatusCode::BAD_REQUEST,
                ErrorCode::NameInvalid,
                e.to_string(),
            ),
            // The message carries the tail of the build's log, which is what
            // the user needs to see.
            ErrorKind::Failed => {
                tracing::warn!(error = %e, "source failed");
                ApiError::new(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    ErrorCode::Unknown,
                    e.to_string(),
                )
            }
            ErrorKind::Internal => ApiError::internal(e),
        }
    }

    /// The error as a response.
    pub(crate) fn into_response(self) -> Response<Body> {
        let body = serde_json::json!({
            "errors": [{ "code": self.code.as_str(), "message": self.message }]
        });
        let mut resp = json_response(self.status, Bytes::from(body.to_string()));
        if self.status == StatusCode::METHOD_NOT_ALLOWED {
            resp.headers_mut().insert(header::ALLOW, READ_ONLY_METHODS);
        }
        // containerd resolves with HEAD (no body) and prints only the status
        // line of a failure: the reason phrase carries the message to it.
        if let Ok(phrase) = ReasonPhrase::try_from(reason_phrase(self.status, &self.message)) {
            resp.extensions_mut().insert(phrase);
        }
        resp
    }
}

/// Longest reason phrase sent: long enough for a missing package's name or
/// the last line of a build log, short of what proxies refuse.
const MAX_REASON: usize = 400;

/// "Not Found: <message>" on one line of visible ASCII.
fn reason_phrase(status: StatusCode, message: &str) -> String {
    let canonical = status.canonical_reason().unwrap_or("Error");
    let mut reason = format!("{canonical}: ");
    let words = message.split_whitespace().flat_map(|w| [" ", w]).skip(1);
    for c in words.flat_map(str::chars) {
        if reason.len() >= MAX_REASON {
            reason.push_str("...");
            break;
        }
        reason.push(if c.is_ascii_graphic() || c == ' ' {
            c
        } else {
            '?'
        });
    }
    reason
}

impl From<RegistryError> for ApiError {
    fn from(e: RegistryError) -> ApiError {
        let not_found = |code| ApiError::new(StatusCode::NOT_FOUND, code, e.to_string());
        match &e {
            RegistryError::ManifestUnknown(_) => not_found(ErrorCode::ManifestUnknown),
            RegistryError::BlobUnknown(_) => not_found(ErrorCode::BlobUnknown),
            RegistryError::NameUnknown(_) => not_found(ErrorCode::NameUnknown),
            RegistryError::ManifestSource(s) => {
                ApiError::from_source(s, ErrorCode::ManifestUnknown)
            }
            RegistryError::BlobSource(s) => ApiError::from_source(s, ErrorCode::BlobUnknown),
            RegistryError::Store(_) | RegistryError::Task(_) => ApiError::internal(&e),
        }
    }
}

impl From<NameError> for ApiError {
    fn from(e: NameError) -> ApiError {
        let (status, code) = match e {
            NameError::Digest(_) => (StatusCode::BAD_REQUEST, ErrorCode::DigestInvalid),
            // A tag that cannot exist names no manifest.
            NameError::Tag(_) => (StatusCode::NOT_FOUND, ErrorCode::ManifestUnknown),
            NameError::Repository(_) | NameError::Host(_) | NameError::Image(_) => {
                (StatusCode::BAD_REQUEST, ErrorCode::NameInvalid)
            }
        };
        ApiError::new(status, code, e.to_string())
    }
}

impl From<BlobserveError> for ApiError {
    fn from(e: BlobserveError) -> ApiError {
        let (status, code) = match e {
            BlobserveError::Name(n) => return ApiError::from(n),
            BlobserveError::Registry(r) => return ApiError::from(r),
            BlobserveError::BadRequest(_) => (StatusCode::BAD_REQUEST, ErrorCode::NameInvalid),
            // A path inside an image names content of one of its blobs.
            BlobserveError::NotFound(_)
            | BlobserveError::NotADirectory(_)
            | BlobserveError::SymlinkLoop(_) => (StatusCode::NOT_FOUND, ErrorCode::BlobUnknown),
            BlobserveError::NoPlatform(_) => (StatusCode::NOT_FOUND, ErrorCode::ManifestUnknown),
            BlobserveError::UnsupportedLayer(_) | BlobserveError::Manifest(_) => {
                (StatusCode::UNSUPPORTED_MEDIA_TYPE, ErrorCode::Unsupported)
            }
            BlobserveError::Extract { .. }
            | BlobserveError::Io { .. }
            | BlobserveError::Task(_) => return ApiError::internal(&e),
        };
        ApiError::new(status, code, e.to_string())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reason_phrases_are_one_line_of_ascii() {
        let r = reason_phrase(
            StatusCode::NOT_FOUND,
            "unknown packages:\n  nosuch, other\t“x”",
        );
        assert_eq!(r, "Not Found: unknown packages: nosuch, other ?x?");
        assert!(ReasonPhrase::try_from(r).is_ok());
        let long = reason_phrase(StatusCode::INTERNAL_SERVER_ERROR, &"x".repeat(5000));
        assert!(long.len() <= MAX_REASON + 3 && long.ends_with("..."));
    }
}
