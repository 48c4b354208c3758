//! The nginx parity battery. Expected values are what nginx 1.22 gives with
//! upstream `fastcgi_params`, `root /var/www/shop/public; index index.php;`,
//! `location / { try_files $uri $uri/ /index.php$is_args$args; }` and a PHP
//! location with `fastcgi_split_path_info ^(.+?\.php)(/.*)$;`,
//! `try_files $fastcgi_script_name =404;` (when a local tree is given),
//! `fastcgi_param SCRIPT_FILENAME $document_root$fastcgi_script_name;` and
//! `fastcgi_param PATH_INFO $path_info;` (the usual `set $path_info
//! $fastcgi_path_info;` workaround for try_files clearing it).

use super::*;
use http::header::{HeaderName, HeaderValue};
use http::HeaderMap;
use proptest::prelude::*;

const ROOT: &str = "/var/www/shop/public";

#[derive(Default)]
struct VecSink(Vec<(String, Vec<u8>)>);

impl ParamSink for VecSink {
    fn param(&mut self, name: &[u8], value: &[u8]) {
        self.0
            .push((String::from_utf8_lossy(name).into_owned(), value.to_vec()));
    }
    fn header(&mut self, name: &[u8], value: &[u8]) {
        let upper = String::from_utf8_lossy(name)
            .to_ascii_uppercase()
            .replace('-', "_");
        self.0.push((format!("HTTP_{upper}"), value.to_vec()));
    }
}

impl VecSink {
    fn get(&self, name: &str) -> Option<String> {
        let mut hits = self.0.iter().filter(|(n, _)| n == name);
        let hit = hits
            .next()
            .map(|(_, v)| String::from_utf8_lossy(v).into_owned());
        assert!(hits.next().is_none(), "{name} sent twice");
        hit
    }
    fn val(&self, name: &str) -> String {
        self.get(name).unwrap_or_else(|| panic!("{name} missing"))
    }
    fn names(&self) -> Vec<&str> {
        self.0.iter().map(|(n, _)| n.as_str()).collect()
    }
}

fn facts<'a>(uri: &'a str, headers: &'a HeaderMap) -> RequestFacts<'a> {
    RequestFacts {
        method: "GET",
        request_uri: uri,
        query: uri.split_once('?').map_or("", |(_, q)| q),
        headers,
        host: "shop.example.com",
        protocol: "HTTP/1.1",
        https: false,
        tls_protocol: None,
        remote: "192.0.2.10:51234".parse().expect("addr"),
        local: "10.0.0.1:8080".parse().expect("addr"),
        addr_text: None,
        content_length: None,
        server_software: "fpmgate/0.1.0",
    }
}

const EXTRA: &[(String, String)] = &[];

fn vhost<'a>(first_host: &'a str, root: &'a str, extra: &'a [(String, String)]) -> VhostFacts<'a> {
    VhostFacts {
        first_host,
        root,
        extra_params: extra,
    }
}

fn shop_vhost() -> VhostFacts<'static> {
    vhost("shop.example.com", ROOT, EXTRA)
}

/// Path of a request-target (everything before the first '?').
fn raw_path(uri: &str) -> &str {
    uri.split_once('?').map_or(uri, |(p, _)| p)
}

/// normalize + resolve with `index index.php` and no local tree.
fn map(uri: &str) -> Result<Resolved, MapError> {
    Ok(resolve(
        &normalize_path(raw_path(uri))?,
        Some("index.php"),
        None,
    ))
}

/// Full mapping of a GET through the front-controller vhost, with `tweak`
/// applied to the request facts.
fn emit_with(uri: &str, headers: &HeaderMap, tweak: impl FnOnce(&mut RequestFacts)) -> VecSink {
    let Ok(Resolved::Script {
        script_name,
        path_info,
        document_uri,
    }) = map(uri)
    else {
        panic!("{uri} did not map to a script");
    };
    let mut req = facts(uri, headers);
    tweak(&mut req);
    let mut sink = VecSink::default();
    write_params(
        &req,
        &shop_vhost(),
        (&script_name, &path_info, &document_uri),
        &mut sink,
    );
    sink
}

fn emit(uri: &str) -> VecSink {
    emit_with(uri, &HeaderMap::new(), |_| {})
}

/// (request-target, SCRIPT_NAME, PATH_INFO, DOCUMENT_URI, QUERY_STRING) as nginx sends them;
/// REQUEST_URI is always the target as sent and SCRIPT_FILENAME the root + SCRIPT_NAME.
#[rustfmt::skip]
const NGINX_PARITY: &[(&str, &str, &str, &str, &str)] = &[
    ("/",                       "/index.php",        "",           "/index.php",          ""),
    ("/index.php",              "/index.php",        "",           "/index.php",          ""),
    ("/info.php?a=1&b=2",       "/info.php",         "",           "/info.php",           "a=1&b=2"),
    ("/info.php/some/path?x=1", "/info.php",         "/some/path", "/info.php/some/path", "x=1"),
    ("/app/",                   "/index.php",        "",           "/index.php",          ""),
    ("/app/page?p=2",           "/index.php",        "",           "/index.php",          "p=2"),
    ("/a/../b.php",             "/b.php",            "",           "/b.php",              ""),
    ("/%7Euser/x.php",          "/~user/x.php",      "",           "/~user/x.php",        ""),
    ("/caf%C3%A9.php",          "/café.php",         "",           "/café.php",           ""),
    ("//double//slash.php",     "/double/slash.php", "",           "/double/slash.php",   ""),
    ("/a.php/b.php/c",          "/a.php",            "/b.php/c",   "/a.php/b.php/c",      ""),
    ("/x.php%2Fy",              "/x.php",            "/y",         "/x.php/y",            ""),
    ("/x.PHP",                  "/index.php",        "",           "/index.php",          ""),
    ("/x.phpfoo",               "/index.php",        "",           "/index.php",          ""),
    ("/a.php.bak",              "/index.php",        "",           "/index.php",          ""),
    ("/info.php?",              "/info.php",         "",           "/info.php",           ""),
    ("/search?q=a+b%20c",       "/index.php",        "",           "/index.php",          "q=a+b%20c"),
];

#[test]
fn nginx_parity_battery() {
    for &(uri, script, info, doc_uri, query) in NGINX_PARITY {
        let p = emit(uri);
        assert_eq!(p.val("SCRIPT_NAME"), script, "SCRIPT_NAME for {uri}");
        assert_eq!(p.val("PATH_INFO"), info, "PATH_INFO for {uri}");
        assert_eq!(p.val("DOCUMENT_URI"), doc_uri, "DOCUMENT_URI for {uri}");
        assert_eq!(p.val("QUERY_STRING"), query, "QUERY_STRING for {uri}");
        assert_eq!(p.val("REQUEST_URI"), uri, "REQUEST_URI for {uri}");
        assert_eq!(p.val("SCRIPT_FILENAME"), format!("{ROOT}{script}"), "{uri}");
        assert_eq!(p.val("DOCUMENT_ROOT"), ROOT);
    }
}

#[test]
fn nginx_rejects_with_400() {
    let cases = [
        ("/x.php%00.jpg", MapError::ForbiddenByte),
        ("/x.php%0a", MapError::ForbiddenByte),
        // CVE-2019-11043's shape: a %0a that stops PCRE's `.` before PATH_INFO.
        ("/index.php/PHP%0Ais_the_shit.php", MapError::ForbiddenByte),
        ("/a%0D.php", MapError::ForbiddenByte),
        ("/../etc/passwd", MapError::EscapesRoot),
        ("/a/../../etc/passwd", MapError::EscapesRoot),
        ("/%2e%2e/etc/passwd", MapError::EscapesRoot),
        ("/a/%2E%2E%2f%2e%2e%2Fetc", MapError::EscapesRoot),
        ("/x%zz", MapError::BadPercentEncoding),
        ("/x%4", MapError::BadPercentEncoding),
        ("/x%", MapError::BadPercentEncoding),
        ("/%C3%28.php", MapError::NotUtf8),
        ("/%FF", MapError::NotUtf8),
        ("*", MapError::NotOriginForm),
        ("http://a/x.php", MapError::NotOriginForm),
        ("", MapError::NotOriginForm),
    ];
    for (raw, err) in cases {
        assert_eq!(normalize_path(raw), Err(err), "{raw}");
    }
}

#[test]
fn normalize_examples() {
    let cases = [
        ("/", "/"),
        ("//", "/"),
        ("/a/./b", "/a/b"),
        ("/a/.", "/a/"),
        ("/a/..", "/"),
        ("/a/b/..", "/a/"),
        ("/a/b/../", "/a/"),
        ("/a//b///", "/a/b/"),
        ("/%2e/a", "/a"),
        ("/a%2fb", "/a/b"),
        ("/a%2F%2Fb", "/a/b"),
        ("/a+b", "/a+b"),
        ("/%252e%252e/x", "/%2e%2e/x"),
        ("/...", "/..."),
        ("/.hidden/..x", "/.hidden/..x"),
        ("/%E2%82%AC", "/€"),
        ("/€", "/€"),
    ];
    for (raw, want) in cases {
        assert_eq!(normalize_path(raw).as_deref(), Ok(want), "{raw}");
    }
}

#[test]
fn split_examples() {
    assert_eq!(split_script("/a/b.php/x/y"), Some(("/a/b.php", "/x/y")));
    assert_eq!(split_script("/b.php"), Some(("/b.php", "")));
    assert_eq!(split_script("/b.php/"), Some(("/b.php", "/")));
    assert_eq!(split_script("/a.php.d/x.php"), Some(("/a.php.d/x.php", "")));
    assert_eq!(split_script("/x.phpfoo"), None);
    assert_eq!(split_script("/.php"), None);
    assert_eq!(split_script("/a/.php/b.php"), Some(("/a/.php/b.php", "")));
    assert_eq!(split_script("/a.php.bak"), None);
    assert_eq!(split_script("/x.PHP"), None);
    assert_eq!(split_script("/x.php\n"), None);
    assert_eq!(split_script("/é.php/ü"), Some(("/é.php", "/ü")));
    assert_eq!(split_script(""), None);
}

#[test]
fn params_in_nginx_order() {
    let mut headers = HeaderMap::new();
    headers.insert("accept", HeaderValue::from_static("*/*"));
    let extra = [("APP_ENV".to_string(), "production".to_string())];
    let vhost = vhost("shop.example.com", ROOT, &extra);
    let mut req = facts("/info.php/p?x=1", &headers);
    req.https = true;
    req.tls_protocol = Some("TLSv1.3");
    let mut p = VecSink::default();
    write_params(&req, &vhost, ("/info.php", "/p", "/info.php/p"), &mut p);
    let want = "QUERY_STRING REQUEST_METHOD CONTENT_TYPE CONTENT_LENGTH SCRIPT_NAME REQUEST_URI \
        DOCUMENT_URI DOCUMENT_ROOT SERVER_PROTOCOL REQUEST_SCHEME HTTPS GATEWAY_INTERFACE \
        SERVER_SOFTWARE REMOTE_ADDR REMOTE_PORT SERVER_ADDR SERVER_PORT SERVER_NAME \
        REDIRECT_STATUS SCRIPT_FILENAME PATH_INFO SSL_PROTOCOL HTTP_HOST HTTP_ACCEPT APP_ENV";
    assert_eq!(p.names(), want.split_whitespace().collect::<Vec<_>>());
    assert_eq!(p.val("REQUEST_METHOD"), "GET");
    assert_eq!(p.val("CONTENT_TYPE"), "");
    assert_eq!(p.val("SERVER_PROTOCOL"), "HTTP/1.1");
    assert_eq!(p.val("REQUEST_SCHEME"), "https");
    assert_eq!(p.val("HTTPS"), "on");
    assert_eq!(p.val("SSL_PROTOCOL"), "TLSv1.3");
    assert_eq!(p.val("GATEWAY_INTERFACE"), "CGI/1.1");
    assert_eq!(p.val("SERVER_SOFTWARE"), "fpmgate/0.1.0");
    assert_eq!(p.val("REMOTE_ADDR"), "192.0.2.10");
    assert_eq!(p.val("REMOTE_PORT"), "51234");
    assert_eq!(p.val("SERVER_ADDR"), "10.0.0.1");
    assert_eq!(p.val("SERVER_PORT"), "8080");
    assert_eq!(p.val("SERVER_NAME"), "shop.example.com");
    assert_eq!(p.val("REDIRECT_STATUS"), "200");
    assert_eq!(p.val("HTTP_HOST"), "shop.example.com");
    assert_eq!(p.val("APP_ENV"), "production");
}

#[test]
fn plain_http_has_no_https_or_ssl_protocol() {
    let p = emit_with("/index.php", &HeaderMap::new(), |r| {
        r.tls_protocol = Some("TLSv1.3")
    });
    assert_eq!(p.get("HTTPS"), None);
    assert_eq!(p.get("SSL_PROTOCOL"), None);
    assert_eq!(p.val("REQUEST_SCHEME"), "http");
}

#[test]
fn content_length_empty_zero_or_value() {
    assert_eq!(emit("/index.php").val("CONTENT_LENGTH"), "");
    let p = emit_with("/index.php", &HeaderMap::new(), |r| {
        r.content_length = Some(0)
    });
    assert_eq!(p.val("CONTENT_LENGTH"), "0");
    let mut h = HeaderMap::new();
    h.insert("content-type", HeaderValue::from_static("application/json"));
    h.insert("content-length", HeaderValue::from_static("123"));
    let p = emit_with("/index.php", &h, |r| {
        r.method = "POST";
        r.content_length = Some(123);
    });
    assert_eq!(p.val("CONTENT_LENGTH"), "123");
    assert_eq!(p.val("CONTENT_TYPE"), "application/json");
    // nginx also passes them as HTTP_* when the client sent them.
    assert_eq!(p.val("HTTP_CONTENT_LENGTH"), "123");
    assert_eq!(p.val("HTTP_CONTENT_TYPE"), "application/json");
    assert_eq!(p.val("REQUEST_METHOD"), "POST");
    // A de-chunked body: CONTENT_LENGTH is known, HTTP_CONTENT_LENGTH was never sent.
    let p = emit_with("/index.php", &HeaderMap::new(), |r| {
        r.content_length = Some(42)
    });
    assert_eq!(p.val("CONTENT_LENGTH"), "42");
    assert_eq!(p.get("HTTP_CONTENT_LENGTH"), None);
}

fn header_map(pairs: &[(&str, &[u8])]) -> HeaderMap {
    let mut h = HeaderMap::new();
    for &(n, v) in pairs {
        let name = HeaderName::from_bytes(n.as_bytes()).expect("name");
        h.append(name, HeaderValue::from_bytes(v).expect("value"));
    }
    h
}

#[test]
fn header_filtering() {
    let h = header_map(&[
        ("proxy", b"http://evil:8080"),
        ("x_forwarded_for", b"6.6.6.6"),
        ("x-forwarded-for", b"192.0.2.1"),
        ("accept", b"text/html"),
        ("accept", b"*/*"),
        ("cookie", b"a=1"),
        ("cookie", b"b=2"),
        ("connection", b"close, X-Foo"),
        ("x-foo", b"dropped"),
        ("x-bar", b"kept"),
        ("keep-alive", b"timeout=5"),
        ("te", b"trailers"),
        ("transfer-encoding", b"chunked"),
        ("upgrade", b"h2c"),
        ("proxy-connection", b"keep-alive"),
        ("x.dotted", b"1"),
        ("host", b"spoofed.example"),
        ("x-latin1", b"caf\xe9"),
    ]);
    let p = emit_with("/index.php", &h, |_| {});
    // httpoxy: no HTTP_PROXY, ever.
    assert_eq!(p.get("HTTP_PROXY"), None);
    // Underscore names dropped: only the real X-Forwarded-For reaches PHP.
    assert_eq!(p.val("HTTP_X_FORWARDED_FOR"), "192.0.2.1");
    assert_eq!(p.val("HTTP_ACCEPT"), "text/html, */*");
    assert_eq!(p.val("HTTP_COOKIE"), "a=1; b=2");
    assert_eq!(p.val("HTTP_X_BAR"), "kept");
    let gone = "HTTP_X_FOO HTTP_CONNECTION HTTP_KEEP_ALIVE HTTP_TE HTTP_TRANSFER_ENCODING \
        HTTP_UPGRADE HTTP_PROXY_CONNECTION HTTP_X.DOTTED";
    for gone in gone.split_whitespace() {
        assert_eq!(p.get(gone), None, "{gone}");
    }
    // HTTP_HOST comes from the request's host (h2 :authority included), once.
    assert_eq!(p.val("HTTP_HOST"), "shop.example.com");
    // Header values are bytes: passed through unchanged.
    let raw =
        p.0.iter()
            .find(|(n, _)| n == "HTTP_X_LATIN1")
            .map(|(_, v)| v.clone());
    assert_eq!(raw.as_deref(), Some(&b"caf\xe9"[..]));
}

#[test]
fn server_name_exact_vs_wildcard() {
    let h = HeaderMap::new();
    let run = |first_host: &str, host: &str| {
        let mut req = facts("/", &h);
        req.host = host;
        let vhost = vhost(first_host, ROOT, EXTRA);
        let mut p = VecSink::default();
        write_params(&req, &vhost, ("/index.php", "", "/index.php"), &mut p);
        (p.val("SERVER_NAME"), p.get("HTTP_HOST"))
    };
    // (vhost's first name, host as sent) -> (SERVER_NAME, HTTP_HOST)
    let cases = [
        (
            "shop.example.com",
            "a.shop.example.com:8443",
            "shop.example.com",
        ),
        (
            "*.shop.example.com",
            "A.Shop.Example.com.:8443",
            "a.shop.example.com",
        ),
        ("*", "other.org", "other.org"),
        ("*", "[2001:db8::1]:8080", "[2001:db8::1]"),
    ];
    for (first, host, name) in cases {
        assert_eq!(run(first, host), (name.to_string(), Some(host.to_string())));
    }
    // HTTP/1.0 without Host: empty SERVER_NAME, no HTTP_HOST (nginx sends none).
    assert_eq!(run("*", ""), (String::new(), None));
}

#[test]
fn ipv6_addresses_without_brackets() {
    let p = emit_with("/index.php", &HeaderMap::new(), |r| {
        r.remote = "[2001:db8::7]:40000".parse().expect("addr");
        r.local = "[2001:db8::1]:443".parse().expect("addr");
        r.protocol = "HTTP/2.0";
    });
    assert_eq!(p.val("REMOTE_ADDR"), "2001:db8::7");
    assert_eq!(p.val("REMOTE_PORT"), "40000");
    assert_eq!(p.val("SERVER_ADDR"), "2001:db8::1");
    assert_eq!(p.val("SERVER_PORT"), "443");
    assert_eq!(p.val("SERVER_PROTOCOL"), "HTTP/2.0");
    // A v4 client on a dual-stack socket shows as plain IPv4.
    let p = emit_with("/index.php", &HeaderMap::new(), |r| {
        r.remote = "[::ffff:192.0.2.9]:1234".parse().expect("addr");
    });
    assert_eq!(p.val("REMOTE_ADDR"), "192.0.2.9");
}

#[test]
fn connection_address_text_matches_per_request_formatting() {
    for (remote, local) in [
        ("192.0.2.10:51234", "10.0.0.1:8080"),
        ("0.0.0.0:0", "255.255.255.255:65535"),
        ("[2001:db8::7]:40000", "[2001:db8::1]:443"),
        ("[::ffff:192.0.2.9]:1234", "[::1]:80"),
        (
            "[ffff:ffff:ffff:ffff:ffff:ffff:ffff:fffe]:65535",
            "[ffff:ffff:ffff:ffff:ffff:ffff:255.255.255.255]:1",
        ),
    ] {
        let h = HeaderMap::new();
        let mut req = facts("/", &h);
        req.remote = remote.parse().expect("addr");
        req.local = local.parse().expect("addr");
        let text = AddrText::new(req.remote, req.local);
        let (mut formatted, mut from_text) = (VecSink::default(), VecSink::default());
        let script = ("/index.php", "", "/index.php");
        write_params(&req, &vhost("*", "/srv", EXTRA), script, &mut formatted);
        req.addr_text = Some(&text);
        write_params(&req, &vhost("*", "/srv", EXTRA), script, &mut from_text);
        assert_eq!(from_text.0, formatted.0, "{remote} {local}");
    }
}

#[test]
fn root_trailing_slash_gives_no_double_slash() {
    let h = HeaderMap::new();
    for (root, want) in [("/srv/www/", "/srv/www/index.php"), ("/", "/index.php")] {
        let mut p = VecSink::default();
        let req = facts("/", &h);
        write_params(
            &req,
            &vhost("*", root, EXTRA),
            ("/index.php", "", "/index.php"),
            &mut p,
        );
        assert_eq!(p.val("SCRIPT_FILENAME"), want);
        assert_eq!(p.val("DOCUMENT_ROOT"), root);
    }
}

/// Inputs built from the pieces that matter to normalisation.
fn path_pieces() -> impl Strategy<Value = String> {
    let piece = prop::sample::select(vec![
        "/", "//", ".", "..", "%2e", "%2E", "%2e%2e", "%2f", "%2F", "a", "b.php", ".php", "%",
        "%zz", "%00", "%0a", "é", "%C3%A9", "%FF", "?", "+", "~", "%25",
    ]);
    prop::collection::vec(piece, 0..12).prop_map(|v| v.concat())
}

fn check_normalized(input: &str) {
    let Ok(out) = normalize_path(input) else {
        return;
    };
    assert!(out.starts_with('/'), "{input:?} -> {out:?}");
    assert!(
        !out.contains("/../") && !out.contains("/./") && !out.contains("//"),
        "{input:?} -> {out:?}"
    );
    assert!(
        !out.ends_with("/..") && !out.ends_with("/."),
        "{input:?} -> {out:?}"
    );
    assert!(!out.contains(['\0', '\r', '\n']), "{input:?} -> {out:?}");
    // Without a '%' left to decode, normalising again changes nothing.
    if !out.contains('%') {
        assert_eq!(normalize_path(&out).as_deref(), Ok(out.as_str()));
    }
}

fn check_split(input: &str) {
    if let Some((script, info)) = split_script(input) {
        assert_eq!(format!("{script}{info}"), input);
        assert!(script.ends_with(".php") && script.len() > ".php".len());
        assert!(info.is_empty() || info.starts_with('/'));
    }
}

proptest! {
    #[test]
    fn normalize_any_string(s in ".*") {
        check_normalized(&s);
        check_normalized(&format!("/{s}"));
    }

    #[test]
    fn normalize_tricky_pieces(s in path_pieces()) {
        check_normalized(&format!("/{s}"));
    }

    #[test]
    fn split_is_a_prefix_split(s in ".*", t in path_pieces()) {
        check_split(&s);
        check_split(&t);
        if let Ok(n) = normalize_path(&format!("/{t}")) {
            check_split(&n);
        }
    }
}

#[test]
fn numbers_and_addresses_match_display() {
    let mut b = [0u8; 48];
    for n in [0u64, 7, 10, 65535, 1 << 40, u64::MAX] {
        assert_eq!(decimal(&mut b, n), n.to_string().as_bytes());
    }
    for ip in [
        "0.0.0.0",
        "255.255.255.255",
        "10.2.30.4",
        "100.105.99.200",
        "127.0.0.1",
        "::1",
        "2001:db8::8:800:200c:417a",
    ] {
        let ip: std::net::IpAddr = ip.parse().unwrap();
        assert_eq!(ip_text(&mut b, ip), ip.to_string().as_bytes());
    }
}
