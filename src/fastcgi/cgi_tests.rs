use super::*;
use proptest::prelude::*;

fn parse_one(input: &'static [u8]) -> Result<(CgiHead, Bytes), CgiError> {
    let mut p = HeadParser::new(8192);
    match p.push(Bytes::from_static(input)) {
        Ok(Some(done)) => Ok(done),
        Ok(None) => panic!("head not complete"),
        Err(e) => Err(e),
    }
}

fn values<'h>(head: &'h CgiHead, name: &str) -> Vec<&'h [u8]> {
    head.headers
        .get_all(name)
        .iter()
        .map(HeaderValue::as_bytes)
        .collect()
}

/// Feeds `input` cut at `points` (sorted, within bounds) and returns the head
/// plus the body reassembled from `rest` and the chunks after it.
fn parse_split(
    input: &[u8],
    points: &[usize],
    limit: usize,
) -> Result<Option<(CgiHead, Vec<u8>)>, CgiError> {
    let mut p = HeadParser::new(limit);
    let mut head = None;
    let mut body = Vec::new();
    let mut bounds = vec![0];
    bounds.extend_from_slice(points);
    bounds.push(input.len());
    for w in bounds.windows(2) {
        let chunk = Bytes::copy_from_slice(&input[w[0]..w[1]]);
        if head.is_some() {
            body.extend_from_slice(&chunk);
        } else if let Some((h, rest)) = p.push(chunk)? {
            head = Some(h);
            body.extend_from_slice(&rest);
        }
    }
    Ok(head.map(|h| (h, body)))
}

#[test]
fn status_with_and_without_reason() {
    let (head, _) = parse_one(b"Status: 404 Not Found\r\nContent-Type: text/html\r\n\r\n").unwrap();
    assert_eq!(head.status, StatusCode::NOT_FOUND);
    assert!(!head.headers.contains_key("status"));
    assert_eq!(values(&head, "content-type"), [b"text/html"]);

    let (head, _) = parse_one(b"status:503\r\n\r\n").unwrap();
    assert_eq!(head.status, StatusCode::SERVICE_UNAVAILABLE);
    assert!(head.headers.is_empty());

    let (head, _) = parse_one(b"Status: 599\tWhatever\r\n\r\n").unwrap();
    assert_eq!(head.status.as_u16(), 599);
}

#[test]
fn bad_status_values() {
    for input in [
        &b"Status: abc\r\n\r\n"[..],
        b"Status: 99\r\n\r\n",
        b"Status: 099\r\n\r\n",
        b"Status: 1000\r\n\r\n",
        b"Status: 200OK\r\n\r\n",
        b"Status:\r\n\r\n",
    ] {
        let mut p = HeadParser::new(1024);
        assert!(
            matches!(p.push(Bytes::from_static(input)), Err(CgiError::BadStatus)),
            "{input:?}"
        );
    }
}

#[test]
fn location_means_302_unless_status_given() {
    let (head, _) = parse_one(b"Location: /login\r\n\r\n").unwrap();
    assert_eq!(head.status, StatusCode::FOUND);
    assert_eq!(values(&head, "location"), [b"/login"]);

    let (head, _) = parse_one(b"Location: https://x.test/\r\nStatus: 301 Moved\r\n\r\n").unwrap();
    assert_eq!(head.status, StatusCode::MOVED_PERMANENTLY);

    let (head, _) = parse_one(b"Content-Type: text/plain\r\n\r\n").unwrap();
    assert_eq!(head.status, StatusCode::OK);
}

#[test]
fn repeated_headers_all_kept() {
    let (head, _) = parse_one(
        b"Set-Cookie: a=1; path=/\r\nX-A: x\r\nset-cookie: b=2\r\nSET-COOKIE: c=3\r\n\r\n",
    )
    .unwrap();
    assert_eq!(
        values(&head, "set-cookie"),
        [&b"a=1; path=/"[..], b"b=2", b"c=3"]
    );
}

#[test]
fn bare_lf_and_mixed_endings() {
    let (head, body) = parse_one(b"Content-Type: text/plain\nX-A:  spaced \t\n\nbody\r\n").unwrap();
    assert_eq!(values(&head, "x-a"), [b"spaced"]);
    assert_eq!(&body[..], b"body\r\n");
    let (head, body) = parse_one(b"X-A: 1\r\n\nrest").unwrap();
    assert_eq!(values(&head, "x-a"), [b"1"]);
    assert_eq!(&body[..], b"rest");
}

#[test]
fn empty_head_and_empty_value() {
    let (head, body) = parse_one(b"\r\nhello").unwrap();
    assert_eq!(head.status, StatusCode::OK);
    assert!(head.headers.is_empty());
    assert_eq!(&body[..], b"hello");
    let (head, _) = parse_one(b"X-Empty:\r\n\r\n").unwrap();
    assert_eq!(values(&head, "x-empty"), [b""]);
}

#[test]
fn hop_by_hop_dropped() {
    let (head, _) = parse_one(
        b"Connection: close\r\nKeep-Alive: timeout=5\r\nTransfer-Encoding: chunked\r\nTE: trailers\r\n\
          Trailer: X\r\nUpgrade: h2c\r\nProxy-Connection: keep-alive\r\nX-Keep: yes\r\n\r\n",
    )
    .unwrap();
    assert_eq!(head.headers.len(), 1);
    assert_eq!(values(&head, "x-keep"), [b"yes"]);
}

#[test]
fn content_length_kept_only_when_valid() {
    let (head, _) = parse_one(b"Content-Length: 42\r\n\r\n").unwrap();
    assert_eq!(values(&head, "content-length"), [b"42"]);
    for bad in [
        &b"Content-Length: 4x\r\n\r\n"[..],
        b"Content-Length: +4\r\n\r\n",
        b"Content-Length:\r\n\r\n",
    ] {
        let mut p = HeadParser::new(1024);
        let (head, _) = p.push(Bytes::from_static(bad)).unwrap().unwrap();
        assert!(!head.headers.contains_key("content-length"), "{bad:?}");
    }
    let (head, _) = parse_one(b"Content-Length: 99999999999999999999999\r\n\r\n").unwrap();
    assert!(!head.headers.contains_key("content-length"));
    let (head, _) = parse_one(b"Content-Length: 5\r\nContent-Length: 7\r\n\r\n").unwrap();
    assert_eq!(values(&head, "content-length"), [b"5"]);
}

#[test]
fn malformed_lines() {
    for input in [
        &b"NoColonHere\r\n\r\n"[..],
        b": value\r\n\r\n",
        b"Bad Name: v\r\n\r\n",
        b" folded: v\r\n\r\n",
        b"X-A: bad\x01value\r\n\r\n",
    ] {
        let mut p = HeadParser::new(1024);
        assert!(
            matches!(
                p.push(Bytes::from_static(input)),
                Err(CgiError::Malformed(_))
            ),
            "{input:?}"
        );
    }
}

#[test]
fn too_large() {
    let mut p = HeadParser::new(16);
    assert!(p.push(Bytes::from_static(b"X-A: 1\r\n")).unwrap().is_none());
    assert!(matches!(
        p.push(Bytes::from_static(b"X-Long-Header: value")),
        Err(CgiError::TooLarge)
    ));

    // Head exactly at the limit (terminator included) is accepted.
    let input = b"X-A: 1234567\r\n\r\nbody";
    let mut p = HeadParser::new(16);
    assert!(p.push(Bytes::from_static(input)).unwrap().is_some());
    let mut p = HeadParser::new(15);
    assert!(matches!(
        p.push(Bytes::from_static(input)),
        Err(CgiError::TooLarge)
    ));

    // A large chunk with no line end fails at once rather than buffering.
    let mut p = HeadParser::new(1024);
    assert!(matches!(
        p.push(Bytes::from(vec![b'a'; 1 << 20])),
        Err(CgiError::TooLarge)
    ));
}

#[test]
fn body_preserved_without_copy() {
    let input = Bytes::from_static(
        b"Content-Type: text/html; charset=UTF-8\r\n\r\n<html>\r\n\r\n\0\xff</html>",
    );
    let mut p = HeadParser::new(1024);
    let (head, rest) = p.push(input.clone()).unwrap().unwrap();
    assert_eq!(values(&head, "content-type"), [b"text/html; charset=UTF-8"]);
    assert_eq!(&rest[..], b"<html>\r\n\r\n\0\xff</html>");
    assert_eq!(
        rest.as_ptr(),
        input[42..].as_ptr(),
        "rest must be a slice of the chunk"
    );
}

#[test]
fn split_across_chunks_and_push_after_done() {
    let input = b"Status: 201\r\nX-A: 1\r\n\r\nbody";
    for cut in 0..=input.len() {
        let (head, body) = parse_split(input, &[cut], 1024).unwrap().unwrap();
        assert_eq!(head.status, StatusCode::CREATED);
        assert_eq!(body, b"body");
    }
    let mut p = HeadParser::new(1024);
    assert!(p.push(Bytes::from_static(b"\n")).unwrap().is_some());
    assert!(p.push(Bytes::from_static(b"x")).is_err());
}

fn header_strategy() -> impl Strategy<Value = (String, String, bool)> {
    (
        prop::sample::select(vec![
            "Content-Type",
            "Set-Cookie",
            "x-powered-by",
            "Cache-Control",
            "X-Custom",
            "Location",
        ]),
        "[ \t]{0,2}[!-~]([ -~]{0,30}[!-~])?[ \t]{0,2}",
        any::<bool>(),
    )
        .prop_map(|(n, v, crlf)| (n.to_string(), v, crlf))
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    #[test]
    fn prop_any_split_same_head_and_body(
        headers in proptest::collection::vec(header_strategy(), 0..8),
        status in proptest::option::of(100u16..1000),
        body in proptest::collection::vec(any::<u8>(), 0..200),
        cuts in proptest::collection::vec(any::<prop::sample::Index>(), 0..12),
    ) {
        let mut input = Vec::new();
        let mut expected = HeaderMap::new();
        if let Some(code) = status {
            input.extend_from_slice(format!("Status: {code} Reason Text\r\n").as_bytes());
        }
        for (name, value, crlf) in &headers {
            input.extend_from_slice(format!("{name}:{value}{}", if *crlf { "\r\n" } else { "\n" }).as_bytes());
            expected.append(
                HeaderName::from_bytes(name.as_bytes()).unwrap(),
                HeaderValue::from_str(value.trim_matches([' ', '\t'])).unwrap(),
            );
        }
        input.extend_from_slice(b"\r\n");
        let head_len = input.len();
        input.extend_from_slice(&body);

        let mut points: Vec<usize> = cuts.iter().map(|c| c.index(input.len() + 1)).collect();
        points.sort_unstable();
        let (head, got_body) = parse_split(&input, &points, head_len).unwrap().unwrap();
        prop_assert_eq!(&head.headers, &expected);
        let expected_status = match status {
            Some(code) => code,
            None if expected.contains_key("location") => 302,
            None => 200,
        };
        prop_assert_eq!(head.status.as_u16(), expected_status);
        prop_assert_eq!(got_body, body);

        // One byte less of limit fails the same way wherever the cuts fall.
        prop_assert!(matches!(parse_split(&input, &points, head_len - 1), Err(CgiError::TooLarge)));
    }

    #[test]
    fn prop_arbitrary_bytes_never_panic(
        chunks in proptest::collection::vec(proptest::collection::vec(any::<u8>(), 0..64), 0..8),
        limit in 0usize..300,
    ) {
        let mut p = HeadParser::new(limit);
        for chunk in chunks {
            if p.push(Bytes::from(chunk)).is_err() {
                break;
            }
        }
    }

    #[test]
    fn prop_header_like_bytes_never_panic(
        data in "([A-Za-z:\\- \t\r\n]|\\x00|\u{ff}){0,200}",
        cuts in proptest::collection::vec(any::<prop::sample::Index>(), 0..6),
    ) {
        let bytes = data.as_bytes();
        let mut points: Vec<usize> = cuts.iter().map(|c| c.index(bytes.len() + 1)).collect();
        points.sort_unstable();
        let _ = parse_split(bytes, &points, 128);
    }
}
