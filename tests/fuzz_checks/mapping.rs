//! Request mapping (normalisation, script split, resolution, params) on arbitrary input.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use bytes::BytesMut;
use fpmgate::fastcgi::codec::{Pair, ParamsWriter};
use fpmgate::mapping::{
    normalize_path, resolve, split_script, write_params, AddrText, LocalFile, MapError, ParamSink,
    RequestFacts, Resolved, VhostFacts,
};
use http::{HeaderMap, HeaderName, HeaderValue};

use super::codec::{cgi_header_name, read_params_stream};
use super::Cursor;

// ---------------------------------------------------------------------------
// Request mapping
// ---------------------------------------------------------------------------

/// Names no header may reach PHP under (hop-by-hop, httpoxy, and host, which
/// is sent from the request's authority instead).
const NEVER_PASSED: [&str; 8] = [
    "connection",
    "keep-alive",
    "te",
    "transfer-encoding",
    "upgrade",
    "proxy-connection",
    "proxy",
    "host",
];

/// Carves a request out of the input — a fixed prefix of flags, addresses
/// and length, then 0xFF-separated fields (0xFF never occurs in UTF-8, so
/// fields can hold any text, NUL, CR and LF included) — and runs it through
/// normalisation, the script split, resolution and the param writer.
pub fn request_mapping(data: &[u8]) {
    let mut cursor = Cursor(data);
    let flags = cursor.byte();
    let local_mode = cursor.byte();
    let remote_ip: [u8; 16] = cursor.array();
    let remote_port = u16::from_be_bytes(cursor.array());
    let local_ip: [u8; 4] = cursor.array();
    let local_port = u16::from_be_bytes(cursor.array());
    let content_length = u64::from_be_bytes(cursor.array());

    let mut fields = cursor.0.split(|&b| b == 0xFF);
    let mut text = || String::from_utf8_lossy(fields.next().unwrap_or_default()).into_owned();
    let raw_path = text();
    let index = text();
    let root = text();
    let host = text();
    let first_host = if flags & 0x40 != 0 {
        "*".to_owned()
    } else {
        text()
    };
    let query = text();
    let method = text();
    let extra = text();
    let mut headers = HeaderMap::new();
    while let (Some(name), Some(value)) = (fields.next(), fields.next()) {
        // Only what the HTTP layer could have produced reaches mapping.
        if let (Ok(name), Ok(value)) =
            (HeaderName::from_bytes(name), HeaderValue::from_bytes(value))
        {
            headers.append(name, value);
        }
    }

    // The raw string itself also goes to split_script: it must hold its
    // promises on any text, not only on normalised paths.
    check_split(&raw_path);

    let path = match normalize_path(&raw_path) {
        Ok(path) => {
            check_normalized(&raw_path, &path);
            path
        }
        Err(error) => {
            if !raw_path.starts_with('/') {
                assert_eq!(error, MapError::NotOriginForm);
            }
            return;
        }
    };
    check_split(&path);

    let index = (flags & 0x04 != 0).then_some(index.as_str());
    let seed = usize::from(local_mode >> 2);
    let local = move |p: &str| match local_mode & 3 {
        0 => LocalFile::File,
        1 => LocalFile::Missing,
        2 => LocalFile::Dir,
        _ => match (p.len() + seed) % 3 {
            0 => LocalFile::File,
            1 => LocalFile::Dir,
            _ => LocalFile::Missing,
        },
    };
    let unchecked = resolve(&path, index, None);
    check_resolved(&path, index, &unchecked, None);
    let checked = resolve(&path, index, Some(&local));
    check_resolved(&path, index, &checked, Some(&local));
    if let Resolved::Script { .. } = checked {
        assert_eq!(
            checked, unchecked,
            "the local check changed the script it let through"
        );
    }

    let remote_ip = match flags & 0x30 {
        0x00 => IpAddr::V4(Ipv4Addr::new(
            remote_ip[0],
            remote_ip[1],
            remote_ip[2],
            remote_ip[3],
        )),
        0x10 => IpAddr::V6(
            Ipv4Addr::new(remote_ip[0], remote_ip[1], remote_ip[2], remote_ip[3]).to_ipv6_mapped(),
        ),
        _ => IpAddr::V6(Ipv6Addr::from(remote_ip)),
    };
    let extra_params = [("FUZZ_EXTRA".to_owned(), extra)];
    let request_uri = if query.is_empty() {
        raw_path.clone()
    } else {
        format!("{raw_path}?{query}")
    };
    let req = RequestFacts {
        method: &method,
        request_uri: &request_uri,
        query: &query,
        headers: &headers,
        host: &host,
        protocol: "HTTP/1.1",
        https: flags & 0x01 != 0,
        tls_protocol: (flags & 0x02 != 0).then_some("TLSv1.3"),
        remote: SocketAddr::new(remote_ip, remote_port),
        local: SocketAddr::new(IpAddr::V4(Ipv4Addr::from(local_ip)), local_port),
        addr_text: None,
        content_length: (flags & 0x08 != 0).then_some(content_length),
        server_software: "fpmgate/0.1.0",
    };
    let vhost = VhostFacts {
        first_host: &first_host,
        root: &root,
        extra_params: if flags & 0x80 != 0 {
            &extra_params
        } else {
            &[]
        },
    };
    for resolved in [&unchecked, &checked] {
        if let Resolved::Script {
            script_name,
            path_info,
            document_uri,
        } = resolved
        {
            check_params(&req, &vhost, (script_name, path_info, document_uri));
        }
    }
    // Whatever the caller passes as the script, the writer must not panic.
    let mut sink = Collect::default();
    write_params(&req, &vhost, (&raw_path, &query, &host), &mut sink);
    // The connection's addresses formatted once say exactly what formatting them per
    // request says.
    let text = AddrText::new(req.remote, req.local);
    let with_text = RequestFacts {
        addr_text: Some(&text),
        ..req
    };
    let mut from_text = Collect::default();
    write_params(
        &with_text,
        &vhost,
        (&raw_path, &query, &host),
        &mut from_text,
    );
    assert_eq!(
        from_text.0, sink.0,
        "addresses {:?} {:?}",
        req.remote, req.local
    );
}

fn has_forbidden_byte(s: &str) -> bool {
    s.bytes().any(|b| matches!(b, 0 | b'\r' | b'\n'))
}

fn check_normalized(raw: &str, path: &str) {
    assert!(path.starts_with('/'), "{raw:?} normalised to {path:?}");
    assert!(!has_forbidden_byte(path), "{raw:?} normalised to {path:?}");
    for bad in ["/../", "/./", "//"] {
        assert!(!path.contains(bad), "{raw:?} normalised to {path:?}");
    }
    for bad in ["/..", "/."] {
        assert!(!path.ends_with(bad), "{raw:?} normalised to {path:?}");
    }
    if !path.contains('%') {
        // Decoding happens once, so only a path without '%' is a fixed point.
        assert_eq!(
            normalize_path(path).as_deref(),
            Ok(path),
            "normalising {raw:?} twice is not stable"
        );
    }
}

fn check_split(path: &str) {
    let Some((script, info)) = split_script(path) else {
        return;
    };
    assert_eq!(
        format!("{script}{info}"),
        path,
        "split of {path:?} is not a split"
    );
    assert!(
        script.ends_with(".php"),
        "split of {path:?} gave script {script:?}"
    );
    let name = &script[..script.len() - ".php".len()];
    assert!(
        !name.is_empty() && !name.ends_with('/'),
        "split of {path:?} gave a script without a file name: {script:?}"
    );
    assert!(
        info.is_empty() || info.starts_with('/'),
        "split of {path:?} gave PATH_INFO {info:?}"
    );
    assert!(
        !has_forbidden_byte(path),
        "{path:?} split although it holds NUL, CR or LF"
    );
}

fn check_resolved(
    path: &str,
    index: Option<&str>,
    resolved: &Resolved,
    local: Option<&dyn Fn(&str) -> LocalFile>,
) {
    let is_file = |p: &str| local.is_none_or(|local| local(p) == LocalFile::File);
    match resolved {
        Resolved::Script {
            script_name,
            path_info,
            document_uri,
        } => {
            assert!(
                is_file(script_name),
                "{path:?}: script {script_name:?} is not a local file"
            );
            assert!(
                script_name.ends_with(".php"),
                "{path:?} resolved to script {script_name:?}"
            );
            assert!(
                script_name.starts_with('/'),
                "{path:?} resolved to script {script_name:?}"
            );
            assert!(
                !has_forbidden_byte(script_name),
                "{path:?} resolved to script {script_name:?}"
            );
            // The root plus this name must stay inside the root.
            for seg in script_name[1..].split('/') {
                assert!(
                    !matches!(seg, "" | "." | ".."),
                    "{path:?} (index {index:?}) resolved to script {script_name:?}"
                );
            }
            if document_uri == path {
                assert_eq!(format!("{script_name}{path_info}"), path);
            } else {
                // The front controller.
                assert!(
                    index.is_some(),
                    "{path:?} resolved to a front controller without an index"
                );
                assert!(path_info.is_empty());
                assert_eq!(document_uri, script_name);
            }
        }
        Resolved::Static => {
            assert!(
                local.is_some(),
                "{path:?} served statically without a local tree"
            );
            assert!(
                is_file(path),
                "{path:?} served statically but is not a local file"
            );
            let rest = path.strip_prefix("/.well-known/").unwrap_or(path);
            assert!(
                !rest.split('/').any(|seg| seg.starts_with('.')),
                "hidden {path:?} served statically"
            );
            assert!(
                !path.to_ascii_lowercase().ends_with(".php"),
                "PHP source {path:?} served statically"
            );
        }
        Resolved::NotFound => {
            if let (None, Some((script, info))) = (local, split_script(path)) {
                panic!("{path:?} splits as ({script:?}, {info:?}) but was not found");
            }
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum Kind {
    Param,
    Header,
}

/// The plain sink: every call, in order.
#[derive(Default, Debug)]
struct Collect(Vec<(Kind, Vec<u8>, Vec<u8>)>);

impl ParamSink for Collect {
    fn param(&mut self, name: &[u8], value: &[u8]) {
        self.0.push((Kind::Param, name.to_vec(), value.to_vec()));
    }
    fn header(&mut self, name: &[u8], value: &[u8]) {
        self.0.push((Kind::Header, name.to_vec(), value.to_vec()));
    }
}

fn check_params(req: &RequestFacts<'_>, vhost: &VhostFacts<'_>, script: (&str, &str, &str)) {
    let (script_name, path_info, document_uri) = script;
    let mut sink = Collect::default();
    write_params(req, vhost, script, &mut sink);
    let sent = &sink.0;

    let param = |name: &str| -> Vec<&[u8]> {
        sent.iter()
            .filter(|(kind, n, _)| *kind == Kind::Param && n == name.as_bytes())
            .map(|(_, _, v)| &v[..])
            .collect()
    };
    let root = vhost.root.trim_end_matches('/');
    let filename = param("SCRIPT_FILENAME");
    let [filename] = filename[..] else {
        panic!("SCRIPT_FILENAME sent {} times", filename.len());
    };
    assert!(
        filename.ends_with(b".php"),
        "SCRIPT_FILENAME {:?}",
        String::from_utf8_lossy(filename)
    );
    let below = filename.strip_prefix(root.as_bytes()).unwrap_or_else(|| {
        panic!(
            "SCRIPT_FILENAME {:?} outside root {root:?}",
            String::from_utf8_lossy(filename)
        )
    });
    assert_eq!(
        below,
        script_name.as_bytes(),
        "SCRIPT_FILENAME is not root + SCRIPT_NAME"
    );
    assert!(
        below.starts_with(b"/"),
        "SCRIPT_FILENAME {:?}",
        String::from_utf8_lossy(filename)
    );
    assert_eq!(param("SCRIPT_NAME"), [script_name.as_bytes()]);
    assert_eq!(param("PATH_INFO"), [path_info.as_bytes()]);
    assert_eq!(param("DOCUMENT_URI"), [document_uri.as_bytes()]);
    let remote = req.remote.ip().to_canonical().to_string();
    assert_eq!(param("REMOTE_ADDR"), [remote.as_bytes()]);
    let length = req
        .content_length
        .map(|n| n.to_string())
        .unwrap_or_default();
    assert_eq!(param("CONTENT_LENGTH"), [length.as_bytes()]);
    assert_eq!(param("HTTPS").len(), usize::from(req.https));
    let [server_name] = param("SERVER_NAME")[..] else {
        panic!("SERVER_NAME not sent exactly once");
    };
    if vhost.first_host == "*" || vhost.first_host.starts_with("*.") {
        assert!(
            !server_name.iter().any(u8::is_ascii_uppercase),
            "SERVER_NAME not lowercased"
        );
    } else {
        assert_eq!(server_name, vhost.first_host.as_bytes());
    }
    let mut names: Vec<&[u8]> = sent
        .iter()
        .filter(|(k, _, _)| *k == Kind::Param)
        .map(|(_, n, _)| &n[..])
        .collect();
    let count = names.len();
    names.sort_unstable();
    names.dedup();
    assert_eq!(names.len(), count, "a param was sent twice");
    if let Some((name, value)) = vhost.extra_params.last() {
        let (kind, n, v) = sent.last().expect("nothing sent");
        assert_eq!(
            (*kind, &n[..], &v[..]),
            (Kind::Param, name.as_bytes(), value.as_bytes()),
            "pool params must come last"
        );
    }

    check_headers(req, sent);
    check_encoded(req, vhost, script, sent);
}

/// The headers that reach PHP: only `[a-z0-9-]` names, none of the
/// never-passed ones, none the client declared hop-by-hop, each once; host
/// first and only from the request's authority.
fn check_headers(req: &RequestFacts<'_>, sent: &[(Kind, Vec<u8>, Vec<u8>)]) {
    let headers: Vec<(&[u8], &[u8])> = sent
        .iter()
        .filter(|(k, _, _)| *k == Kind::Header)
        .map(|(_, n, v)| (&n[..], &v[..]))
        .collect();
    let mut rest = &headers[..];
    if !req.host.is_empty() {
        let Some(((b"host", value), after)) = rest.split_first() else {
            panic!("host not sent first: {headers:?}");
        };
        assert_eq!(*value, req.host.as_bytes());
        rest = after;
    }
    let connection: Vec<Vec<u8>> = req
        .headers
        .get_all(http::header::CONNECTION)
        .iter()
        .flat_map(|v| {
            v.as_bytes()
                .split(|&b| b == b',')
                .map(|t| t.trim_ascii().to_ascii_lowercase())
        })
        .collect();
    let mut seen: Vec<&[u8]> = Vec::new();
    for &(name, _) in rest {
        let shown = String::from_utf8_lossy(name);
        assert!(
            !name.is_empty()
                && name
                    .iter()
                    .all(|&b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-'),
            "header {shown:?} passed to PHP"
        );
        assert!(
            !NEVER_PASSED.iter().any(|n| n.as_bytes() == name),
            "header {shown:?} passed to PHP"
        );
        assert!(
            !connection.iter().any(|c| c == name),
            "Connection-listed header {shown:?} passed to PHP"
        );
        assert!(!seen.contains(&name), "header {shown:?} sent twice");
        seen.push(name);
    }
    // And nothing else is dropped.
    for name in req.headers.keys() {
        let n = name.as_str();
        let plain = n
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-');
        let dropped = NEVER_PASSED.contains(&n) || connection.iter().any(|c| c == n.as_bytes());
        if plain && !dropped {
            assert!(
                seen.contains(&n.as_bytes()),
                "header {n:?} not passed to PHP"
            );
        }
    }
}

/// What `write_params` sends through the real FastCGI encoder must decode to
/// exactly what the plain sink saw.
fn check_encoded(
    req: &RequestFacts<'_>,
    vhost: &VhostFacts<'_>,
    script: (&str, &str, &str),
    sent: &[(Kind, Vec<u8>, Vec<u8>)],
) {
    let mut out = BytesMut::new();
    let mut writer = ParamsWriter::new(&mut out, 1);
    write_params(req, vhost, script, &mut writer);
    writer.finish();
    let expected: Vec<Pair> = sent
        .iter()
        .map(|(kind, name, value)| match kind {
            Kind::Param => (name.clone(), value.clone()),
            Kind::Header => (cgi_header_name(name), value.clone()),
        })
        .collect();
    assert_eq!(
        read_params_stream(&out, 1).0,
        expected,
        "encoded params differ from the sink's"
    );
}
