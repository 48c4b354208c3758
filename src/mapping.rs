//! Request mapping: from an HTTP request to the FastCGI params PHP-FPM sees,
//! with parity to the common nginx setup (upstream `fastcgi_params`,
//! `fastcgi_split_path_info ^(.+?\.php)(/.*)$`, `try_files
//! $fastcgi_script_name =404`, an `index.php` front controller).
//!
//! It owns path normalisation (percent-decoding, `.`/`..`, slashes), the
//! SCRIPT_NAME / PATH_INFO split, the script/static/front-controller
//! decision and the param set, including the header filtering that keeps
//! httpoxy and header spoofing out of PHP's `$_SERVER`.
//!
//! Pure: no I/O (the caller answers "is this a local file" through a
//! closure), imports nothing else from the crate, never panics on input.

use std::borrow::Cow;
use std::fmt::Display;
use std::io::Write as _;

/// Why a request path is rejected; every cause is a 400.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum MapError {
    /// A `%` not followed by two hex digits (nginx answers 400 too).
    #[error("bad percent-encoding in path")]
    BadPercentEncoding,
    /// NUL, CR or LF after decoding. LF is how CVE-2019-11043 defeated the
    /// split regex; NUL truncates paths in C code on the FPM side.
    #[error("forbidden byte (NUL, CR or LF) in path")]
    ForbiddenByte,
    /// The decoded path is not UTF-8.
    #[error("path is not valid UTF-8 after decoding")]
    NotUtf8,
    /// A `..` segment climbs above `/`.
    #[error("path escapes the document root")]
    EscapesRoot,
    /// The path does not start with `/` (asterisk or absolute form).
    #[error("request target is not in origin form")]
    NotOriginForm,
}

/// Percent-decodes the raw request path (no query), rejects NUL/CR/LF and
/// invalid UTF-8 after decoding, merges repeated slashes and resolves `.` and
/// `..` segments (a `..` above `/` is [`MapError::EscapesRoot`]).
///
/// Like nginx, decoding happens before segment resolution, so `%2e%2e` is a
/// `..` segment and `%2F` is a separator (merged and resolved like `/`).
/// Decoding is done once: `%252e` becomes a literal `%2e`. A trailing slash
/// is kept, and a path ending in `.` or `..` ends in `/` (it names a
/// directory). `+` is not a space in paths.
pub fn normalize_path(raw_path: &str) -> Result<String, MapError> {
    if !raw_path.starts_with('/') {
        return Err(MapError::NotOriginForm);
    }
    let decoded: Cow<'_, [u8]> = if raw_path.as_bytes().contains(&b'%') {
        Cow::Owned(percent_decode(raw_path.as_bytes())?)
    } else {
        Cow::Borrowed(raw_path.as_bytes())
    };
    if decoded.iter().any(|&b| matches!(b, 0 | b'\r' | b'\n')) {
        return Err(MapError::ForbiddenByte);
    }
    let decoded = std::str::from_utf8(&decoded).map_err(|_| MapError::NotUtf8)?;

    let mut out = String::with_capacity(decoded.len());
    let mut ends_as_dir = false;
    // Everything after the leading '/'; empty pieces are merged slashes.
    for seg in decoded[1..].split('/') {
        ends_as_dir = true;
        match seg {
            "" | "." => {}
            ".." => match out.rfind('/') {
                Some(parent) => out.truncate(parent),
                None => return Err(MapError::EscapesRoot),
            },
            _ => {
                out.push('/');
                out.push_str(seg);
                ends_as_dir = false;
            }
        }
    }
    if out.is_empty() || ends_as_dir {
        out.push('/');
    }
    Ok(out)
}

/// Strict `%XX` decoding: a lone `%` or non-hex digits are an error, as in
/// nginx, instead of being passed through as the lenient decoders do.
fn percent_decode(raw: &[u8]) -> Result<Vec<u8>, MapError> {
    let mut out = Vec::with_capacity(raw.len());
    let mut i = 0;
    while let Some(&b) = raw.get(i) {
        if b == b'%' {
            let hi = raw.get(i + 1).copied().and_then(hex_value);
            let lo = raw.get(i + 2).copied().and_then(hex_value);
            match (hi, lo) {
                (Some(hi), Some(lo)) => out.push(hi << 4 | lo),
                _ => return Err(MapError::BadPercentEncoding),
            }
            i += 3;
        } else {
            out.push(b);
            i += 1;
        }
    }
    Ok(out)
}

fn hex_value(b: u8) -> Option<u8> {
    match b {
        b'0'..=b'9' => Some(b - b'0'),
        b'a'..=b'f' => Some(b - b'a' + 10),
        b'A'..=b'F' => Some(b - b'A' + 10),
        _ => None,
    }
}

/// nginx's `^(.+?\.php)(/.*)?$` split, without a regex: the first `.php`
/// that ends the path or is followed by `/`. `"/a/b.php/x/y"` ->
/// `("/a/b.php", "/x/y")`, `"/b.php"` -> `("/b.php", "")`; `"/x.phpfoo"`,
/// `"/a.php.bak"` and `"/x.PHP"` (case-sensitive, as nginx's `~`) -> `None`.
///
/// The script's file name needs a character before `.php`, as in nginx's
/// recommended `location ~ [^/]\.php(/|$)`: `"/.php"` -> `None`, and
/// `"/a/.php/b.php"` skips the bare `.php` segment. A path holding NUL, CR or
/// LF never splits: PCRE's `.` stops at LF, which is the CVE-2019-11043
/// trap, so such a path must never reach FPM as a script.
pub fn split_script(path: &str) -> Option<(&str, &str)> {
    let bytes = path.as_bytes();
    if bytes.iter().any(|&b| matches!(b, 0 | b'\r' | b'\n')) {
        return None;
    }
    // Every '.', then a look at what follows: cheaper than a substring searcher for a
    // four-byte needle in a short path.
    for (start, _) in bytes.iter().enumerate().filter(|(_, &b)| b == b'.') {
        let end = start + ".php".len();
        if bytes.get(start..end) != Some(&b".php"[..]) {
            continue;
        }
        let named = start > 0 && bytes.get(start - 1) != Some(&b'/');
        let ends_segment = matches!(bytes.get(end), None | Some(b'/'));
        if named && ends_segment {
            // `end` follows the ASCII "php", so it is a char boundary.
            return Some(path.split_at(end));
        }
    }
    None
}

/// What the proxy's view of the document tree says about a path.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LocalFile {
    /// A regular file.
    File,
    /// A directory.
    Dir,
    /// Nothing there (or not readable).
    Missing,
}

/// The outcome of mapping one normalised path.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Resolved {
    /// Send to PHP-FPM with these params.
    Script {
        /// SCRIPT_NAME; SCRIPT_FILENAME is the root plus this.
        script_name: String,
        /// PATH_INFO, `""` when there is none.
        path_info: String,
        /// DOCUMENT_URI: the normalised path, or the script for the front
        /// controller (nginx's `$document_uri` after the internal redirect).
        document_uri: String,
    },
    /// Serve the normalised path from the vhost's local static tree.
    Static,
    /// 404 without calling FPM.
    NotFound,
}

/// Maps a normalised path, in the spec's order:
/// 1. a `.php` split -> `Script`, unless `local` is given and the script is
///    not a file there (nginx's `try_files $fastcgi_script_name =404`, which
///    is what stops `/uploads/evil.jpg/x.php` from running the JPEG through
///    FPM's `cgi.fix_pathinfo`) -> `NotFound`;
/// 2. `local` says the path is a file and no segment is hidden -> `Static`;
/// 3. `index` set -> with `local`, a directory path ending in `/` that holds a script of
///    that name runs it (nginx's `index`); else the front controller `"/" + index` (also
///    subject to the `local` check, as nginx re-runs the PHP location after `try_files`);
/// 4. `NotFound`.
///
/// Hidden segments (`.env`, `.git/config`) are never served statically,
/// except a leading `/.well-known/` (RFC 8615). Names ending in `.php` in any
/// case (`x.PHP`) are never served statically either: on a case-insensitive
/// file system that would hand out PHP source.
pub fn resolve(
    path: &str,
    index: Option<&str>,
    local: Option<&dyn Fn(&str) -> LocalFile>,
) -> Resolved {
    let exists = |script: &str| local.is_none_or(|local| local(script) == LocalFile::File);
    if let Some((script, info)) = split_script(path) {
        if !exists(script) {
            return Resolved::NotFound;
        }
        return Resolved::Script {
            script_name: script.to_owned(),
            path_info: info.to_owned(),
            document_uri: path.to_owned(),
        };
    }
    if let Some(local) = local {
        if static_allowed(path) && local(path) == LocalFile::File {
            return Resolved::Static;
        }
    }
    let Some(index) = index.map(|i| i.trim_start_matches('/')) else {
        return Resolved::NotFound;
    };
    if let Some(local) = local {
        // A directory asked for with its slash runs its own index script, as nginx's
        // `index` does: `/wp-admin/` is `/wp-admin/index.php`. Without the slash (relative
        // links would resolve one level up), or without one there, the front controller.
        let bare = !index.contains('/');
        if bare && path.len() > 1 && path.ends_with('/') && local(path) == LocalFile::Dir {
            let own = format!("{path}{index}");
            let whole =
                split_script(&own).is_some_and(|(s, info)| s.len() == own.len() && info.is_empty());
            if whole && local(&own) == LocalFile::File {
                return Resolved::Script {
                    script_name: own.clone(),
                    path_info: String::new(),
                    document_uri: own,
                };
            }
        }
    }
    let mut script = String::with_capacity(index.len() + 1);
    script.push('/');
    script.push_str(index);
    // Only a name that is itself a whole `.php` script may be the front
    // controller: SCRIPT_FILENAME must never end in anything but `.php`, nor
    // climb out of the root through a `..` in the configured name.
    let whole_script = split_script(&script).is_some_and(|(_, info)| info.is_empty());
    let plain = !script[1..]
        .split('/')
        .any(|seg| matches!(seg, "" | "." | ".."));
    if !whole_script || !plain || !exists(&script) {
        return Resolved::NotFound;
    }
    Resolved::Script {
        script_name: script.clone(),
        path_info: String::new(),
        document_uri: script,
    }
}

/// Whether the built-in rules let `path` (or a bare file name) be served statically:
/// no hidden segment outside `/.well-known/`, no name ending in `.php` in any case.
pub fn static_allowed(path: &str) -> bool {
    let rest = path.strip_prefix("/.well-known/").unwrap_or(path);
    let hidden = rest.split('/').any(|seg| seg.starts_with('.'));
    let last = rest.rsplit('/').next().unwrap_or("");
    let php_like = last.len() >= 4
        && last
            .get(last.len() - 4..)
            .is_some_and(|ext| ext.eq_ignore_ascii_case(".php"));
    !hidden && !php_like
}

/// Where FastCGI params go (the FastCGI encoder implements it).
pub trait ParamSink {
    /// One param, name and value as bytes.
    fn param(&mut self, name: &[u8], value: &[u8]);
    /// One request header; `name` is as received (lowercase from `http`).
    /// The sink writes `"HTTP_"` + upper case with `-` -> `_`.
    fn header(&mut self, name: &[u8], value: &[u8]);
    /// One param whose value is `value` followed by `more`. The default joins them; a sink
    /// that writes bytes out writes both parts without the temporary.
    fn param_joined(&mut self, name: &[u8], value: &[u8], more: &[u8]) {
        let mut joined = Vec::with_capacity(value.len() + more.len());
        joined.extend_from_slice(value);
        joined.extend_from_slice(more);
        self.param(name, &joined);
    }
}

/// What the connection and request line say about one request.
#[derive(Debug, Clone, Copy)]
pub struct RequestFacts<'a> {
    /// Request method.
    pub method: &'a str,
    /// As sent: raw path, then `?` and the query when present.
    pub request_uri: &'a str,
    /// Raw query without `?`, `""` if none.
    pub query: &'a str,
    /// Request headers.
    pub headers: &'a http::HeaderMap,
    /// Host header or `:authority` as sent, port included.
    pub host: &'a str,
    /// `HTTP/1.0`, `HTTP/1.1` or `HTTP/2.0`.
    pub protocol: &'a str,
    /// The request came over TLS.
    pub https: bool,
    /// Negotiated TLS version (`TLSv1.3`), sent as SSL_PROTOCOL.
    pub tls_protocol: Option<&'a str>,
    /// Client address.
    pub remote: std::net::SocketAddr,
    /// Local address the request arrived on.
    pub local: std::net::SocketAddr,
    /// `remote` and `local` already spelled out, when the connection's text applies (the
    /// client address was not taken from a trusted proxy's header).
    pub addr_text: Option<&'a AddrText>,
    /// Body length; `None` when the request has no body framing at all
    /// (CONTENT_LENGTH is then `""`, as nginx sends it).
    pub content_length: Option<u64>,
    /// SERVER_SOFTWARE, e.g. `fpmgate/0.1.0`.
    pub server_software: &'a str,
}

/// What the vhost and pool contribute to the params.
#[derive(Debug, Clone, Copy)]
pub struct VhostFacts<'a> {
    /// The vhost's first host name; may be `*` or `*.suffix`.
    pub first_host: &'a str,
    /// Document root as seen by the FPM nodes.
    pub root: &'a str,
    /// The pool's extra params, sent last so they win in PHP.
    pub extra_params: &'a [(String, String)],
}

/// Hop-by-hop headers (RFC 9110 §7.6.1 plus the legacy Proxy-Connection)
/// and `proxy`, whose HTTP_PROXY would be read as a proxy setting by PHP
/// HTTP clients (httpoxy).
const NEVER_PASSED: [&str; 7] = [
    "connection",
    "keep-alive",
    "te",
    "transfer-encoding",
    "upgrade",
    "proxy-connection",
    "proxy",
];

/// Emits every param for one request: the upstream nginx `fastcgi_params`
/// set in its order, then SCRIPT_FILENAME, PATH_INFO, SSL_PROTOCOL (TLS
/// only), the HTTP_* headers, and last the pool's extra params.
///
/// `script` is `(script_name, path_info, document_uri)` from
/// [`Resolved::Script`].
pub fn write_params(
    req: &RequestFacts<'_>,
    vhost: &VhostFacts<'_>,
    script: (&str, &str, &str),
    sink: &mut impl ParamSink,
) {
    let (script_name, path_info, document_uri) = script;
    let mut num = [0u8; 48];

    sink.param(b"QUERY_STRING", req.query.as_bytes());
    sink.param(b"REQUEST_METHOD", req.method.as_bytes());
    let content_type = req.headers.get(http::header::CONTENT_TYPE);
    sink.param(
        b"CONTENT_TYPE",
        content_type.map_or(&b""[..], |v| v.as_bytes()),
    );
    match req.content_length {
        Some(n) => sink.param(b"CONTENT_LENGTH", decimal(&mut num, n)),
        None => sink.param(b"CONTENT_LENGTH", b""),
    }
    sink.param(b"SCRIPT_NAME", script_name.as_bytes());
    sink.param(b"REQUEST_URI", req.request_uri.as_bytes());
    sink.param(b"DOCUMENT_URI", document_uri.as_bytes());
    sink.param(b"DOCUMENT_ROOT", vhost.root.as_bytes());
    sink.param(b"SERVER_PROTOCOL", req.protocol.as_bytes());
    let scheme: &[u8] = if req.https { b"https" } else { b"http" };
    sink.param(b"REQUEST_SCHEME", scheme);
    if req.https {
        // nginx: `HTTPS $https if_not_empty`, so absent on plain HTTP.
        sink.param(b"HTTPS", b"on");
    }
    sink.param(b"GATEWAY_INTERFACE", b"CGI/1.1");
    sink.param(b"SERVER_SOFTWARE", req.server_software.as_bytes());
    // Canonical form: a v4 client on a dual-stack socket is 1.2.3.4, not
    // ::ffff:1.2.3.4, as PHP apps (and nginx's default v6only listeners) expect.
    match req.addr_text {
        Some(t) => {
            let [remote_ip, remote_port, local_ip, local_port] = t.parts();
            sink.param(b"REMOTE_ADDR", remote_ip);
            sink.param(b"REMOTE_PORT", remote_port);
            sink.param(b"SERVER_ADDR", local_ip);
            sink.param(b"SERVER_PORT", local_port);
        }
        None => {
            sink.param(
                b"REMOTE_ADDR",
                ip_text(&mut num, req.remote.ip().to_canonical()),
            );
            sink.param(b"REMOTE_PORT", decimal(&mut num, req.remote.port().into()));
            sink.param(
                b"SERVER_ADDR",
                ip_text(&mut num, req.local.ip().to_canonical()),
            );
            sink.param(b"SERVER_PORT", decimal(&mut num, req.local.port().into()));
        }
    }
    write_server_name(req.host, vhost.first_host, sink);
    sink.param(b"REDIRECT_STATUS", b"200");

    // nginx's `$document_root$fastcgi_script_name`, minus the double slash a
    // root configured with a trailing '/' would give.
    let root = vhost.root.trim_end_matches('/');
    sink.param_joined(b"SCRIPT_FILENAME", root.as_bytes(), script_name.as_bytes());
    sink.param(b"PATH_INFO", path_info.as_bytes());
    if let (true, Some(tls)) = (req.https, req.tls_protocol) {
        sink.param(b"SSL_PROTOCOL", tls.as_bytes());
    }

    // HTTP_HOST from the host as sent, so h2's :authority is covered; a
    // request without any host gets none, as in nginx.
    if !req.host.is_empty() {
        sink.header(b"host", req.host.as_bytes());
    }
    write_headers(req.headers, sink);

    for (name, value) in vhost.extra_params {
        sink.param(name.as_bytes(), value.as_bytes());
    }
}

/// The vhost's first name, or for a wildcard / default vhost the request's
/// host like nginx's `$host`: port and one trailing dot removed, lowercased.
fn write_server_name(host: &str, first_host: &str, sink: &mut impl ParamSink) {
    if first_host != "*" && !first_host.starts_with("*.") {
        sink.param(b"SERVER_NAME", first_host.as_bytes());
        return;
    }
    let name = crate::router::host_without_port(host);
    let name = name.strip_suffix('.').unwrap_or(name);
    if name.bytes().any(|b| b.is_ascii_uppercase()) {
        sink.param(b"SERVER_NAME", name.to_ascii_lowercase().as_bytes());
    } else {
        sink.param(b"SERVER_NAME", name.as_bytes());
    }
}

fn write_headers(headers: &http::HeaderMap, sink: &mut impl ParamSink) {
    let connection = headers.get_all(http::header::CONNECTION);
    let has_connection = connection.iter().next().is_some();
    // One pass: the map yields every value of a name before the next name, so repeated
    // headers are joined as they come, without a lookup per name.
    let mut it = headers.iter().peekable();
    while let Some((name, first)) = it.next() {
        let n = name.as_str();
        let same = |next: &(&http::HeaderName, &http::HeaderValue)| next.0 == name;
        // nginx's default `ignore_invalid_headers on` + `underscores_in_headers
        // off`: only [a-z0-9-] names pass. Dropping '_' matters most: `X_Real_IP`
        // and `X-Real-IP` would both become HTTP_X_REAL_IP (spoofing).
        let valid = n
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-');
        // Headers the client declared hop-by-hop (`Connection: close, X-Foo`).
        let listed = || {
            has_connection
                && connection.iter().any(|v| {
                    v.as_bytes()
                        .split(|&b| b == b',')
                        .any(|token| token.trim_ascii().eq_ignore_ascii_case(n.as_bytes()))
                })
        };
        if !valid || n == "host" || NEVER_PASSED.contains(&n) || listed() {
            while it.next_if(same).is_some() {}
            continue;
        }
        let Some((_, second)) = it.next_if(same) else {
            // The common case: one occurrence, passed without copying.
            sink.header(n.as_bytes(), first.as_bytes());
            continue;
        };
        // HTTP/2 clients send each cookie as its own header; PHP parses
        // HTTP_COOKIE with "; " separators, everything else takes ", ".
        let sep: &[u8] = if name == http::header::COOKIE {
            b"; "
        } else {
            b", "
        };
        let mut joined = Vec::with_capacity(first.len() + sep.len() + second.len());
        joined.extend_from_slice(first.as_bytes());
        joined.extend_from_slice(sep);
        joined.extend_from_slice(second.as_bytes());
        while let Some((_, value)) = it.next_if(same) {
            joined.extend_from_slice(sep);
            joined.extend_from_slice(value.as_bytes());
        }
        sink.header(n.as_bytes(), &joined);
    }
}

/// Formats a number or address into `buf` without allocating. 48 bytes hold
/// any u64 and any IPv6 address (45 characters at most).
/// `n` in decimal, without the formatting machinery (four of these per request).
fn decimal(buf: &mut [u8; 48], mut n: u64) -> &[u8] {
    let mut i = buf.len();
    loop {
        i -= 1;
        buf[i] = b'0' + (n % 10) as u8;
        n /= 10;
        if n == 0 {
            return &buf[i..];
        }
    }
}

/// A connection's addresses as REMOTE_ADDR, REMOTE_PORT, SERVER_ADDR and SERVER_PORT spell
/// them, formatted once per connection rather than once per request. One allocation:
/// the four texts back to back, and where each ends.
#[derive(Debug, Clone)]
pub struct AddrText {
    bytes: Box<[u8]>,
    ends: [u8; 4],
}

impl AddrText {
    /// Canonical forms, as the per-request path writes them: a v4 client on a dual-stack
    /// socket is 1.2.3.4, not ::ffff:1.2.3.4.
    pub fn new(remote: std::net::SocketAddr, local: std::net::SocketAddr) -> AddrText {
        let mut num = [0u8; 48];
        let mut bytes = Vec::with_capacity(32);
        // Two addresses of at most 45 bytes and two ports of at most 5: under 256.
        let end = |bytes: &Vec<u8>| u8::try_from(bytes.len()).unwrap_or(u8::MAX);
        bytes.extend_from_slice(ip_text(&mut num, remote.ip().to_canonical()));
        let remote_ip = end(&bytes);
        bytes.extend_from_slice(decimal(&mut num, remote.port().into()));
        let remote_port = end(&bytes);
        bytes.extend_from_slice(ip_text(&mut num, local.ip().to_canonical()));
        let local_ip = end(&bytes);
        bytes.extend_from_slice(decimal(&mut num, local.port().into()));
        AddrText {
            ends: [remote_ip, remote_port, local_ip, end(&bytes)],
            bytes: bytes.into_boxed_slice(),
        }
    }

    /// Remote address, remote port, local address, local port.
    pub fn parts(&self) -> [&[u8]; 4] {
        let mut start = 0;
        self.ends.map(|end| {
            let part = self.bytes.get(start..usize::from(end)).unwrap_or_default();
            start = usize::from(end);
            part
        })
    }
}

/// An address as `Display` writes it; IPv4 (the common case) by hand.
fn ip_text(buf: &mut [u8; 48], ip: std::net::IpAddr) -> &[u8] {
    let std::net::IpAddr::V4(v4) = ip else {
        return display(buf, ip);
    };
    let mut len = 0;
    for (k, octet) in v4.octets().into_iter().enumerate() {
        if k > 0 {
            buf[len] = b'.';
            len += 1;
        }
        // At most 3 digits and a dot per octet: 15 bytes in all, well inside `buf`.
        let (hundreds, tens, ones) = (octet / 100, octet / 10 % 10, octet % 10);
        if hundreds > 0 {
            buf[len] = b'0' + hundreds;
            len += 1;
        }
        if hundreds > 0 || tens > 0 {
            buf[len] = b'0' + tens;
            len += 1;
        }
        buf[len] = b'0' + ones;
        len += 1;
    }
    &buf[..len]
}

fn display(buf: &mut [u8; 48], value: impl Display) -> &[u8] {
    let mut cursor = &mut buf[..];
    // A too-long value could only be truncated, never panic; none is.
    let _ = write!(cursor, "{value}");
    let left = cursor.len();
    let written = buf.len() - left;
    &buf[..written]
}

#[cfg(test)]
#[path = "mapping_tests.rs"]
mod tests;

#[cfg(test)]
#[path = "mapping_resolve_tests.rs"]
mod resolve_tests;
