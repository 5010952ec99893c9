//! Response bodies: blobs streamed from disk or from a download still
//! arriving, in pooled chunks with backpressure; small bodies whole.

use std::convert::Infallible;
use std::io;
use std::sync::Arc;

use bytes::Bytes;
use futures_util::TryStreamExt;
use http::header::{self, HeaderMap, HeaderValue};
use http::{Response, StatusCode};
use http_body_util::combinators::UnsyncBoxBody;
use http_body_util::{BodyExt, Empty, Full, StreamBody};
use hyper::body::Frame;

use crate::http::chunks::ChunkPool;
use crate::sources::mirror::Download;
use crate::store::BlobFile;
use crate::telemetry::metrics::{self, METRICS};

pub(crate) type Body = UnsyncBoxBody<Bytes, io::Error>;

/// Streams `[start, end)` of a blob still arriving from upstream: each chunk
/// waits until its bytes have arrived. If the download fails (wrong digest,
/// cut off), the stream ends in an error, so hyper aborts the response and
/// the client sees a short body rather than a complete-looking one.
pub(crate) fn download_stream(
    pool: Arc<ChunkPool>,
    dl: Arc<Download>,
    start: u64,
    end: u64,
) -> Body {
    let stream = futures_util::stream::unfold(
        (pool, dl, start, end),
        |(pool, dl, offset, end)| async move {
            if offset >= end {
                return None;
            }
            let available = match dl.available(offset).await {
                Ok(Some(a)) => a,
                Ok(None) => return None,
                Err(e) => return Some((Err(e), (pool, dl, end, end))),
            };
            let (p, d) = (Arc::clone(&pool), Arc::clone(&dl));
            let read = tokio::task::spawn_blocking(move || {
                let mut chunk = p.take();
                let want = (available.min(end) - offset).min(chunk.buffer().len() as u64) as usize;
                let n = d.read_at(offset, &mut chunk.buffer()[..want])?;
                chunk.set_len(n);
                Ok::<_, io::Error>(chunk.freeze())
            })
            .await;
            match read {
                Ok(Ok(bytes)) if !bytes.is_empty() => {
                    metrics::add(&METRICS.bytes_served, bytes.len() as u64);
                    let next = offset + bytes.len() as u64;
                    Some((Ok(bytes), (pool, dl, next, end)))
                }
                Ok(Ok(_)) => Some((
                    Err(io::Error::new(
                        io::ErrorKind::UnexpectedEof,
                        "download shorter than announced",
                    )),
                    (pool, dl, end, end),
                )),
                Ok(Err(e)) => Some((Err(e), (pool, dl, end, end))),
                Err(e) => Some((Err(io::Error::other(e)), (pool, dl, end, end))),
            }
        },
    );
    BodyExt::boxed_unsync(StreamBody::new(stream.map_ok(Frame::data)))
}

/// Streams `[start, end)` of `file` in pooled chunks read on the blocking
/// pool, one chunk read ahead so disk and socket overlap. hyper polls for the
/// next chunk only once the previous one is written, so a slow client holds at
/// most two chunks and never stalls anyone else.
pub(crate) fn blob_stream(pool: Arc<ChunkPool>, file: Arc<BlobFile>, start: u64, end: u64) -> Body {
    type Pending = tokio::task::JoinHandle<io::Result<Bytes>>;
    fn read(pool: &Arc<ChunkPool>, file: &Arc<BlobFile>, offset: u64, end: u64) -> Option<Pending> {
        if offset >= end {
            return None;
        }
        let (pool, file) = (Arc::clone(pool), Arc::clone(file));
        Some(tokio::task::spawn_blocking(move || {
            let mut chunk = pool.take();
            let len = (end - offset).min(chunk.buffer().len() as u64) as usize;
            let n = file.read_at(offset, &mut chunk.buffer()[..len])?;
            if n < len {
                // The file shrank under us; sending less than Content-Length
                // would corrupt the client's view, so abort the response.
                return Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "blob is shorter than its recorded size",
                ));
            }
            chunk.set_len(n);
            Ok(chunk.freeze())
        }))
    }
    let first = read(&pool, &file, start, end);
    let state = (pool, file, start, end, first);
    let stream =
        futures_util::stream::unfold(state, |(pool, file, offset, end, pending)| async move {
            let chunk = match pending?.await {
                Ok(Ok(chunk)) => chunk,
                Ok(Err(e)) => return Some((Err(e), (pool, file, end, end, None))),
                Err(e) => return Some((Err(io::Error::other(e)), (pool, file, end, end, None))),
            };
            metrics::add(&METRICS.bytes_served, chunk.len() as u64);
            let next_offset = offset + chunk.len() as u64;
            let next = read(&pool, &file, next_offset, end);
            Some((Ok(chunk), (pool, file, next_offset, end, next)))
        });
    BodyExt::boxed_unsync(StreamBody::new(stream.map_ok(Frame::data)))
}

pub(crate) fn json_response(status: StatusCode, body: Bytes) -> Response<Body> {
    let len = body.len();
    let mut resp = Response::new(full(body));
    *resp.status_mut() = status;
    let h = resp.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    h.insert(header::CONTENT_LENGTH, HeaderValue::from(len));
    resp
}

/// Values here come from validated names and digests or from the store's own
/// records; one that is not a valid header value is left out, not sent broken.
pub(crate) fn insert_str(h: &mut HeaderMap, name: impl header::IntoHeaderName, value: &str) {
    if let Ok(v) = HeaderValue::from_str(value) {
        h.insert(name, v);
    }
}

pub(crate) fn full(bytes: Bytes) -> Body {
    Full::new(bytes)
        .map_err(|e: Infallible| match e {})
        .boxed_unsync()
}

pub(crate) fn empty() -> Body {
    Empty::new()
        .map_err(|e: Infallible| match e {})
        .boxed_unsync()
}
