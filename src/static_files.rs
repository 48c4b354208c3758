//! Direct serving of files from a vhost's `static` tree: existing regular files only, never
//! outside the tree (symlinks resolved and checked) unless the vhost has `follow_symlinks`,
//! with content type, ETag, Last-Modified and conditional GET. Streamed from disk in
//! bounded chunks. Names on the vhost's deny list ([`DenyList`]) are never served, whether
//! asked for or reached through a symlink.

use std::io;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::{SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use http::{header, HeaderMap, HeaderValue, Method, Response, StatusCode};
use http_body::{Frame, SizeHint};
use tokio::io::AsyncRead;

use crate::error::ProxyError;
use crate::mapping::{self, LocalFile};
use crate::respbody::ProxyBody;

mod deny;
pub use deny::{check_pattern, DenyList, DEFAULT_DENY};

const CHUNK: usize = 64 * 1024;

fn join(dir: &Path, path: &str) -> PathBuf {
    dir.join(path.trim_start_matches('/'))
}

/// What the local tree has at a normalised path (used by the mapping rules).
pub fn probe(dir: &Path, path: &str) -> LocalFile {
    match std::fs::metadata(join(dir, path)) {
        Ok(m) if m.is_file() => LocalFile::File,
        Ok(m) if m.is_dir() => LocalFile::Dir,
        _ => LocalFile::Missing,
    }
}

/// Serves the file at `path` under `dir`.
pub async fn serve(
    dir: &Path,
    path: &str,
    method: &Method,
    headers: &HeaderMap,
    follow_symlinks: bool,
    deny: &DenyList,
) -> Result<Response<ProxyBody>, ProxyError> {
    if deny.denies(path) {
        return Err(ProxyError::NotFound);
    }
    if method != Method::GET && method != Method::HEAD {
        let mut resp = Response::new(ProxyBody::full("405 Method Not Allowed\n"));
        *resp.status_mut() = StatusCode::METHOD_NOT_ALLOWED;
        resp.headers_mut()
            .insert(header::ALLOW, HeaderValue::from_static("GET, HEAD"));
        return Ok(resp);
    }
    // Symlinks may point anywhere: what they resolve to is what is checked and opened.
    let (real, root) = match (
        tokio::fs::canonicalize(join(dir, path)).await,
        tokio::fs::canonicalize(dir).await,
    ) {
        (Ok(r), Ok(d)) => (r, d),
        _ => return Err(ProxyError::NotFound),
    };
    // The target answers to the same rules as the name asked for, every segment of it
    // within the tree: `style.css -> backup.sql`, `info.txt -> .git/config` and
    // `logo.txt -> wp-config.php` are not served. Outside the tree (`follow_symlinks`),
    // its name does.
    let target = match real.strip_prefix(&root) {
        Ok(inside) => inside.to_str().map(|t| format!("/{t}")),
        Err(_) if follow_symlinks => real.file_name().and_then(|n| n.to_str()).map(String::from),
        Err(_) => None,
    };
    let allowed = |t: &str| !t.ends_with('/') && mapping::static_allowed(t) && !deny.denies(t);
    if !target.as_deref().is_some_and(allowed) {
        return Err(ProxyError::NotFound);
    }
    let file = tokio::fs::File::open(&real)
        .await
        .map_err(|_| ProxyError::NotFound)?;
    let meta = file.metadata().await.map_err(|_| ProxyError::NotFound)?;
    if !meta.is_file() {
        return Err(ProxyError::NotFound);
    }
    let len = meta.len();
    let mtime = meta
        .modified()
        .ok()
        .and_then(|t| t.duration_since(UNIX_EPOCH).ok())
        .map(|d| d.as_secs())
        .unwrap_or(0);
    let etag = format!("\"{mtime:x}-{len:x}\"");
    let last_modified = httpdate(SystemTime::UNIX_EPOCH + std::time::Duration::from_secs(mtime));

    let not_modified = match headers.get(header::IF_NONE_MATCH) {
        Some(inm) => inm
            .to_str()
            .is_ok_and(|v| v.split(',').any(|t| t.trim() == etag || t.trim() == "*")),
        None => {
            headers
                .get(header::IF_MODIFIED_SINCE)
                .and_then(|v| v.to_str().ok())
                == Some(last_modified.as_str())
        }
    };
    // A Range is honoured only while the validator still matches (If-Range), as RFC 9110
    // requires; a single range is served as 206, several ranges fall back to the whole file.
    let if_range_ok = match headers.get(header::IF_RANGE).and_then(|v| v.to_str().ok()) {
        None => true,
        Some(v) => v == etag || v == last_modified,
    };
    let range = headers
        .get(header::RANGE)
        .and_then(|v| v.to_str().ok())
        .filter(|_| if_range_ok && !not_modified)
        .map(|v| parse_range(v, len));
    let mut resp = if not_modified {
        let mut r = Response::new(ProxyBody::Empty);
        *r.status_mut() = StatusCode::NOT_MODIFIED;
        r
    } else if let Some(Err(())) = range {
        let mut r = Response::new(ProxyBody::Empty);
        *r.status_mut() = StatusCode::RANGE_NOT_SATISFIABLE;
        if let Ok(v) = HeaderValue::from_str(&format!("bytes */{len}")) {
            r.headers_mut().insert(header::CONTENT_RANGE, v);
        }
        r
    } else {
        let (start, count) = match range {
            Some(Ok(Some((a, b)))) => (a, b - a + 1),
            _ => (0, len),
        };
        let mut r = if method == Method::HEAD {
            Response::new(ProxyBody::Empty)
        } else {
            let mut file = file;
            if start > 0 {
                use tokio::io::AsyncSeekExt;
                file.seek(std::io::SeekFrom::Start(start))
                    .await
                    .map_err(|_| ProxyError::NotFound)?;
            }
            Response::new(ProxyBody::File(Box::new(FileBody {
                file,
                remaining: count,
                buf: vec![0; CHUNK.min(count as usize).max(1)],
            })))
        };
        if let Some(Ok(Some((a, b)))) = range {
            *r.status_mut() = StatusCode::PARTIAL_CONTENT;
            if let Ok(v) = HeaderValue::from_str(&format!("bytes {a}-{b}/{len}")) {
                r.headers_mut().insert(header::CONTENT_RANGE, v);
            }
        }
        r.headers_mut()
            .insert(header::CONTENT_LENGTH, HeaderValue::from(count));
        r
    };
    let h = resp.headers_mut();
    if let Ok(v) = HeaderValue::from_str(&etag) {
        h.insert(header::ETAG, v);
    }
    if let Ok(v) = HeaderValue::from_str(&last_modified) {
        h.insert(header::LAST_MODIFIED, v);
    }
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static(content_type(path)),
    );
    h.insert(header::ACCEPT_RANGES, HeaderValue::from_static("bytes"));
    Ok(resp)
}

/// One `bytes=` range of a file of `len` bytes: `Ok(Some((first, last)))` inclusive,
/// `Ok(None)` for forms served as the whole file (several ranges, other units),
/// `Err(())` when unsatisfiable (416).
fn parse_range(v: &str, len: u64) -> Result<Option<(u64, u64)>, ()> {
    let Some(spec) = v.trim().strip_prefix("bytes=") else {
        return Ok(None);
    };
    if spec.contains(',') {
        return Ok(None);
    }
    let (a, b) = spec.split_once('-').ok_or(())?;
    let (a, b) = (a.trim(), b.trim());
    let num = |s: &str| s.parse::<u64>().map_err(|_| ());
    let (first, last) = if a.is_empty() {
        // Suffix range: the last N bytes.
        let n = num(b)?;
        if n == 0 || len == 0 {
            return Err(());
        }
        (len.saturating_sub(n), len - 1)
    } else {
        let first = num(a)?;
        let last = if b.is_empty() {
            len.saturating_sub(1)
        } else {
            num(b)?.min(len.saturating_sub(1))
        };
        (first, last)
    };
    if len == 0 || first >= len || first > last {
        return Err(());
    }
    Ok(Some((first, last)))
}

/// A file streamed in chunks of at most 64 KiB.
pub struct FileBody {
    file: tokio::fs::File,
    remaining: u64,
    buf: Vec<u8>,
}

impl http_body::Body for FileBody {
    type Data = Bytes;
    type Error = io::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, io::Error>>> {
        let this = &mut *self;
        if this.remaining == 0 {
            return Poll::Ready(None);
        }
        let want = (this.remaining as usize).min(this.buf.len());
        let mut rb = tokio::io::ReadBuf::new(&mut this.buf[..want]);
        match Pin::new(&mut this.file).poll_read(cx, &mut rb) {
            Poll::Pending => Poll::Pending,
            Poll::Ready(Err(e)) => Poll::Ready(Some(Err(e))),
            Poll::Ready(Ok(())) => {
                let n = rb.filled().len();
                if n == 0 {
                    return Poll::Ready(Some(Err(io::Error::new(
                        io::ErrorKind::UnexpectedEof,
                        "file shrank while serving",
                    ))));
                }
                this.remaining -= n as u64;
                Poll::Ready(Some(Ok(Frame::data(Bytes::copy_from_slice(rb.filled())))))
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.remaining == 0
    }

    fn size_hint(&self) -> SizeHint {
        SizeHint::with_exact(self.remaining)
    }
}

fn content_type(path: &str) -> &'static str {
    let ext = path
        .rsplit_once('.')
        .map(|(_, e)| e.to_ascii_lowercase())
        .unwrap_or_default();
    match ext.as_str() {
        "html" | "htm" => "text/html; charset=utf-8",
        "css" => "text/css; charset=utf-8",
        "js" | "mjs" => "text/javascript; charset=utf-8",
        "json" => "application/json",
        "txt" => "text/plain; charset=utf-8",
        "xml" => "application/xml",
        "svg" => "image/svg+xml",
        "png" => "image/png",
        "jpg" | "jpeg" => "image/jpeg",
        "gif" => "image/gif",
        "webp" => "image/webp",
        "avif" => "image/avif",
        "ico" => "image/x-icon",
        "woff" => "font/woff",
        "woff2" => "font/woff2",
        "ttf" => "font/ttf",
        "pdf" => "application/pdf",
        "wasm" => "application/wasm",
        "mp4" => "video/mp4",
        "webm" => "video/webm",
        "mp3" => "audio/mpeg",
        "zip" => "application/zip",
        "gz" => "application/gzip",
        _ => "application/octet-stream",
    }
}

/// Civil date and time of a Unix timestamp: (year, month 1-12, day, h, m, s, weekday
/// index with 0 = Thursday, the weekday of 1970-01-01).
fn civil(secs: u64) -> (i64, usize, i64, u64, u64, u64, usize) {
    let days = secs / 86_400;
    let rem = secs % 86_400;
    let (h, m, s) = (rem / 3600, (rem % 3600) / 60, rem % 60);
    // Civil-from-days (Howard Hinnant's algorithm).
    let z = days as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    let month = month as usize;
    (year, month, d, h, m, s, (days % 7) as usize)
}

const MONTHS: [&str; 12] = [
    "Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec",
];

fn unix(t: SystemTime) -> (u64, u32) {
    t.duration_since(UNIX_EPOCH)
        .map(|d| (d.as_secs(), d.subsec_millis()))
        .unwrap_or((0, 0))
}

/// IMF-fixdate (RFC 9110 §5.6.7) without a date crate.
pub fn httpdate(t: SystemTime) -> String {
    let (year, month, d, h, m, s, wd) = civil(unix(t).0);
    let weekday = ["Thu", "Fri", "Sat", "Sun", "Mon", "Tue", "Wed"][wd];
    format!(
        "{weekday}, {d:02} {} {year} {h:02}:{m:02}:{s:02} GMT",
        MONTHS[month - 1]
    )
}

/// The common log format's `10/Oct/2000:13:55:36 +0000`.
pub fn clf_date(t: SystemTime) -> String {
    let (year, month, d, h, m, s, _) = civil(unix(t).0);
    format!(
        "{d:02}/{}/{year}:{h:02}:{m:02}:{s:02} +0000",
        MONTHS[month - 1]
    )
}

/// RFC 3339 with milliseconds, UTC.
pub fn rfc3339(t: SystemTime) -> String {
    let (secs, ms) = unix(t);
    let (year, month, d, h, m, s, _) = civil(secs);
    format!("{year}-{month:02}-{d:02}T{h:02}:{m:02}:{s:02}.{ms:03}Z")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranges() {
        assert_eq!(parse_range("bytes=0-9", 100), Ok(Some((0, 9))));
        assert_eq!(parse_range("bytes=90-", 100), Ok(Some((90, 99))));
        assert_eq!(parse_range("bytes=-10", 100), Ok(Some((90, 99))));
        assert_eq!(parse_range("bytes=-200", 100), Ok(Some((0, 99))));
        assert_eq!(parse_range("bytes=50-500", 100), Ok(Some((50, 99))));
        assert_eq!(parse_range("bytes=0-1,5-6", 100), Ok(None));
        assert_eq!(parse_range("items=0-1", 100), Ok(None));
        assert_eq!(parse_range("bytes=100-", 100), Err(()));
        assert_eq!(parse_range("bytes=9-3", 100), Err(()));
        assert_eq!(parse_range("bytes=x-3", 100), Err(()));
        assert_eq!(parse_range("bytes=-0", 100), Err(()));
    }

    #[test]
    fn httpdate_formats_known_instants() {
        assert_eq!(httpdate(UNIX_EPOCH), "Thu, 01 Jan 1970 00:00:00 GMT");
        let t = UNIX_EPOCH + std::time::Duration::from_secs(784_111_777);
        assert_eq!(httpdate(t), "Sun, 06 Nov 1994 08:49:37 GMT");
        let t = UNIX_EPOCH + std::time::Duration::from_secs(1_709_251_200); // 2024-03-01
        assert_eq!(httpdate(t), "Fri, 01 Mar 2024 00:00:00 GMT");
        assert_eq!(clf_date(t), "01/Mar/2024:00:00:00 +0000");
        assert_eq!(
            rfc3339(t + std::time::Duration::from_millis(7)),
            "2024-03-01T00:00:00.007Z"
        );
    }
}
