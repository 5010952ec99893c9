//! `/files/<repository>(:<tag>|@<digest>)/<path>`: files from inside
//! images (blobserve) as HTTP, with directory listings in HTML or JSON,
//! validators and ranges.

use std::sync::Arc;

use bytes::Bytes;
use http::header::{self, HeaderMap, HeaderValue};
use http::{Method, Request, Response, StatusCode};
use http_body_util::BodyExt;
use hyper::body::Incoming;

use crate::blobserve::{FileRequest, Found};
use crate::http::body::{blob_stream, empty, full, insert_str, json_response, Body};
use crate::http::chunks::ChunkPool;
use crate::http::error::ApiError;
use crate::http::range::Span;
use crate::http::status_page::escape as html_escape;
use crate::http::{parse_query, App};
use crate::oci::error_code::ErrorCode;
use crate::oci::reference::RegistryHost;

/// Decodes `%XX` escapes; `None` for a malformed escape or non-UTF-8 result.
fn percent_decode(s: &str) -> Option<String> {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' {
            let hex = std::str::from_utf8(b.get(i + 1..i + 3)?).ok()?;
            out.push(u8::from_str_radix(hex, 16).ok()?);
            i += 3;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8(out).ok()
}

pub(crate) async fn files(
    app: &App,
    req: &Request<Incoming>,
    rest: &str,
    ns_echo: &mut Option<RegistryHost>,
) -> Result<Response<Body>, ApiError> {
    let Some(blobserve) = &app.blobserve else {
        return Err(ApiError::unsupported_route());
    };
    if req.method() != Method::GET && req.method() != Method::HEAD {
        return Err(ApiError::method_not_allowed(format!(
            "{} is not supported on /files",
            req.method()
        )));
    }
    let query = parse_query(req.uri().query())?;
    *ns_echo = query.ns.clone();
    let host = query
        .ns
        .unwrap_or_else(|| app.registry.default_host().clone());
    let decoded = percent_decode(rest).ok_or_else(|| {
        ApiError::new(
            StatusCode::BAD_REQUEST,
            ErrorCode::NameInvalid,
            "malformed percent-encoding",
        )
    })?;
    let file_req = FileRequest::parse(&decoded)?;
    match blobserve.lookup(host, &file_req).await? {
        Found::File(hit) => Ok(file_response(
            &app.chunks,
            *hit,
            req.headers(),
            req.method(),
        )),
        Found::Dir(listing) => {
            let wants_json = req
                .headers()
                .get_all(header::ACCEPT)
                .iter()
                .filter_map(|v| v.to_str().ok())
                .any(|v| v.contains("application/json"));
            if wants_json {
                let body = serde_json::json!({ "path": listing.path, "entries": listing.entries });
                return Ok(json_response(StatusCode::OK, Bytes::from(body.to_string())));
            }
            let base = format!("/files/{}{}", file_req.repo, file_req.reference_text);
            let html = listing_html(&base, &listing, req.uri().query());
            let len = html.len();
            let mut resp = Response::new(full(Bytes::from(html)));
            let h = resp.headers_mut();
            h.insert(
                header::CONTENT_TYPE,
                HeaderValue::from_static("text/html; charset=utf-8"),
            );
            h.insert(header::CONTENT_LENGTH, HeaderValue::from(len));
            Ok(resp)
        }
    }
}

fn href_escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || b"-._~/:@+".contains(&b) {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

fn listing_html(base: &str, listing: &crate::blobserve::Listing, query: Option<&str>) -> String {
    let dir = listing.path.trim_end_matches('/');
    let q = query.map(|q| format!("?{q}")).unwrap_or_default();
    let mut html = format!(
        "<!DOCTYPE html>\n<html><head><meta charset=\"utf-8\"><title>{0}</title></head>\n<body><h1>{0}</h1>\n<ul>\n",
        html_escape(&format!("{base}{dir}/"))
    );
    if !dir.is_empty() {
        let parent = dir.rsplit_once('/').map_or("", |(p, _)| p);
        html.push_str(&format!(
            "<li><a href=\"{}/{q}\">../</a></li>\n",
            href_escape(&format!("{base}{parent}"))
        ));
    }
    for e in &listing.entries {
        let suffix = if e.kind == "dir" { "/" } else { "" };
        let extra = match &e.target {
            Some(t) => format!(" → {}", html_escape(t)),
            None if e.kind == "file" => format!(" ({} bytes)", e.size),
            None => String::new(),
        };
        html.push_str(&format!(
            "<li><a href=\"{}{suffix}{q}\">{}{suffix}</a>{extra}</li>\n",
            href_escape(&format!("{base}{dir}/{}", e.name)),
            html_escape(&e.name),
        ));
    }
    html.push_str("</ul></body></html>\n");
    html
}

fn file_response(
    chunks: &Arc<ChunkPool>,
    hit: crate::blobserve::FileHit,
    headers: &HeaderMap,
    method: &Method,
) -> Response<Body> {
    let etag = format!("\"{}:{}\"", hit.layer, hit.path);
    let not_modified = headers
        .get_all(header::IF_NONE_MATCH)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|t| t.trim() == etag || t.trim() == "*");
    let content_type = crate::blobserve::content_type(&hit.path);
    let mut resp = if not_modified {
        let mut r = Response::new(empty());
        *r.status_mut() = StatusCode::NOT_MODIFIED;
        r
    } else {
        let span = match Span::of_request(headers, hit.size, "file") {
            Ok(span) => span,
            Err(resp) => return *resp,
        };
        let (start, end_excl) = (span.start, span.end);
        let body = if method == Method::HEAD {
            empty()
        } else if let Some(bytes) = &hit.replaced {
            full(bytes.slice(start as usize..end_excl as usize))
        } else {
            // The guard keeps the layer from eviction until the body is done.
            let guard = hit.guard;
            blob_stream(Arc::clone(chunks), hit.file, start, end_excl)
                .map_frame(move |f| {
                    let _ = &guard;
                    f
                })
                .boxed_unsync()
        };
        let mut r = Response::new(body);
        *r.status_mut() = span.status;
        let h = r.headers_mut();
        h.insert(header::CONTENT_LENGTH, HeaderValue::from(span.len()));
        span.describe(h);
        r
    };
    let h = resp.headers_mut();
    h.insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    h.insert(header::ACCEPT_RANGES, HeaderValue::from_static("bytes"));
    insert_str(h, header::ETAG, &etag);
    if let Some(m) = hit.modified {
        insert_str(h, header::LAST_MODIFIED, &crate::util::time::http_date(m));
    }
    resp
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percent_decoding() {
        assert_eq!(percent_decode("a%20b%2Fc").as_deref(), Some("a b/c"));
        assert_eq!(percent_decode("%zz"), None);
        assert_eq!(percent_decode("%2"), None);
    }
}
