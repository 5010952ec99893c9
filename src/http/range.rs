//! `Range` requests, for blobs and for files from inside images alike: one
//! parser, one answer for a range that cannot be served (416 with
//! `Content-Range: bytes */size`), one `Content-Range` for a partial answer.

use http::header::{self, HeaderMap};
use http::{Response, StatusCode};

use crate::http::body::{insert_str, Body};
use crate::http::error::ApiError;
use crate::oci::error_code::ErrorCode;

/// The bytes `[start, end)` of a body of `size` bytes that a response sends.
#[derive(Debug, PartialEq, Eq)]
pub(crate) struct Span {
    pub(crate) status: StatusCode,
    pub(crate) start: u64,
    pub(crate) end: u64,
    pub(crate) size: u64,
}

impl Span {
    /// The whole body.
    pub(crate) fn whole(size: u64) -> Span {
        Span {
            status: StatusCode::OK,
            start: 0,
            end: size,
            size,
        }
    }

    /// Which part of a body of `size` bytes the request's `Range` asks for,
    /// or the 416 response when no part can be served. `what` names the
    /// body in the error ("blob", "file").
    pub(crate) fn of_request(
        headers: &HeaderMap,
        size: u64,
        what: &str,
    ) -> Result<Span, Box<Response<Body>>> {
        match parse_range(headers, size) {
            RangeRequest::Whole => Ok(Span::whole(size)),
            RangeRequest::Part { start, end } => Ok(Span {
                status: StatusCode::PARTIAL_CONTENT,
                start,
                end: end + 1,
                size,
            }),
            RangeRequest::Unsatisfiable => {
                let mut resp = ApiError::new(
                    StatusCode::RANGE_NOT_SATISFIABLE,
                    ErrorCode::SizeInvalid,
                    format!("range not satisfiable for a {what} of {size} bytes"),
                )
                .into_response();
                insert_str(
                    resp.headers_mut(),
                    header::CONTENT_RANGE,
                    &format!("bytes */{size}"),
                );
                Err(Box::new(resp))
            }
        }
    }

    pub(crate) fn len(&self) -> u64 {
        self.end - self.start
    }

    /// Sets `Content-Range` on a partial answer.
    pub(crate) fn describe(&self, headers: &mut HeaderMap) {
        if self.status == StatusCode::PARTIAL_CONTENT {
            insert_str(
                headers,
                header::CONTENT_RANGE,
                &format!("bytes {}-{}/{}", self.start, self.end - 1, self.size),
            );
        }
    }
}

/// A single byte range `[start, end]` (inclusive), already checked against the size.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum RangeRequest {
    Whole,
    Part { start: u64, end: u64 },
    Unsatisfiable,
}

/// Parses `Range: bytes=…` for a blob of `size` bytes. Only single ranges are
/// served as 206; anything else we do not understand (multiple ranges, other
/// units, garbage) is ignored and the whole blob sent, as RFC 9110 allows.
pub(crate) fn parse_range(headers: &HeaderMap, size: u64) -> RangeRequest {
    let Some(value) = headers.get(header::RANGE).and_then(|v| v.to_str().ok()) else {
        return RangeRequest::Whole;
    };
    let Some(spec) = value.trim().strip_prefix("bytes=") else {
        return RangeRequest::Whole;
    };
    if spec.contains(',') {
        return RangeRequest::Whole;
    }
    let Some((first, last)) = spec.trim().split_once('-') else {
        return RangeRequest::Whole;
    };
    let num = |s: &str| -> Option<u64> {
        if s.is_empty() || !s.bytes().all(|b| b.is_ascii_digit()) {
            None
        } else {
            s.parse().ok()
        }
    };
    match (first.is_empty(), num(first), num(last)) {
        // bytes=-N: the last N bytes.
        (true, _, Some(n)) => {
            if n == 0 || size == 0 {
                RangeRequest::Unsatisfiable
            } else {
                RangeRequest::Part {
                    start: size - n.min(size),
                    end: size - 1,
                }
            }
        }
        (false, Some(start), None) if last.is_empty() => {
            if start >= size {
                RangeRequest::Unsatisfiable
            } else {
                RangeRequest::Part {
                    start,
                    end: size - 1,
                }
            }
        }
        (false, Some(start), Some(end)) => {
            if start > end || start >= size {
                RangeRequest::Unsatisfiable
            } else {
                RangeRequest::Part {
                    start,
                    end: end.min(size - 1),
                }
            }
        }
        _ => RangeRequest::Whole,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::header::HeaderValue;

    fn range(v: &str, size: u64) -> RangeRequest {
        let mut h = HeaderMap::new();
        h.insert(header::RANGE, HeaderValue::from_str(v).expect("header"));
        parse_range(&h, size)
    }

    #[test]
    fn ranges_follow_the_conformance_suite() {
        use RangeRequest::*;
        assert_eq!(
            range("bytes=500-1499", 2048),
            Part {
                start: 500,
                end: 1499
            }
        );
        assert_eq!(
            range("bytes=500-", 2048),
            Part {
                start: 500,
                end: 2047
            }
        );
        assert_eq!(
            range("bytes=-500", 2048),
            Part {
                start: 1548,
                end: 2047
            }
        );
        assert_eq!(
            range("bytes=500-9999", 2048),
            Part {
                start: 500,
                end: 2047
            }
        );
        assert_eq!(range("bytes=500-0", 2048), Unsatisfiable);
        assert_eq!(range("bytes=2048-", 2048), Unsatisfiable);
        assert_eq!(range("bytes=-0", 2048), Unsatisfiable);
        assert_eq!(range("bytes=0-", 0), Unsatisfiable);
        assert_eq!(range("bytes=0-1,5-6", 2048), Whole);
        assert_eq!(range("items=0-1", 2048), Whole);
        assert_eq!(range("bytes=x-1", 2048), Whole);
        assert_eq!(range("bytes=+1-2", 2048), Whole);
    }
}
