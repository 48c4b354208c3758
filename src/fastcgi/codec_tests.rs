use super::*;
use proptest::prelude::*;

fn decode_all(buf: &mut BytesMut) -> Vec<Record> {
    let mut out = Vec::new();
    while let Some(rec) = decode_record(buf).expect("valid stream") {
        out.push(rec);
    }
    out
}

/// Concatenates the contents of all PARAMS records up to the empty one and
/// checks nothing follows it.
fn params_stream(bytes: &[u8], request_id: u16) -> Vec<u8> {
    let mut buf = BytesMut::from(bytes);
    let records = decode_all(&mut buf);
    assert!(buf.is_empty(), "trailing partial record");
    let (last, body) = records.split_last().expect("at least the terminator");
    assert_eq!(last.kind, RecordType::Params);
    assert!(
        last.content.is_empty(),
        "stream must end with an empty PARAMS record"
    );
    let mut stream = Vec::new();
    for rec in body {
        assert_eq!(rec.kind, RecordType::Params);
        assert_eq!(rec.request_id, request_id);
        assert!(
            !rec.content.is_empty(),
            "no empty PARAMS record before the end"
        );
        assert!(rec.content.len() <= MAX_CONTENT_LEN);
        stream.extend_from_slice(&rec.content);
    }
    stream
}

#[test]
fn record_type_codes_round_trip() {
    for v in 0..=255u8 {
        assert_eq!(RecordType::from_u8(v).as_u8(), v);
        assert_eq!(ProtocolStatus::from_u8(v).as_u8(), v);
    }
    assert_eq!(RecordType::from_u8(6), RecordType::Stdout);
    assert_eq!(RecordType::from_u8(0), RecordType::Other(0));
    assert_eq!(RecordType::from_u8(12), RecordType::Other(12));
}

#[test]
fn begin_request_bytes() {
    let mut buf = BytesMut::new();
    put_begin_request(&mut buf, 1, true);
    assert_eq!(&buf[..], &[1, 1, 0, 1, 0, 8, 0, 0, 0, 1, 1, 0, 0, 0, 0, 0]);
    buf.clear();
    put_begin_request(&mut buf, 0x0102, false);
    assert_eq!(&buf[..], &[1, 1, 1, 2, 0, 8, 0, 0, 0, 1, 0, 0, 0, 0, 0, 0]);
    assert_eq!(parse_begin_request(&buf[8..]), Ok((ROLE_RESPONDER, 0)));
}

#[test]
fn end_request_bytes() {
    let mut buf = BytesMut::new();
    put_end_request(&mut buf, 7, 0x0A0B_0C0D, ProtocolStatus::Overloaded);
    assert_eq!(
        &buf[..],
        &[1, 3, 0, 7, 0, 8, 0, 0, 0x0A, 0x0B, 0x0C, 0x0D, 2, 0, 0, 0]
    );
    let rec = decode_record(&mut buf).unwrap().unwrap();
    assert_eq!(rec.kind, RecordType::EndRequest);
    assert_eq!(
        parse_end_request(&rec.content),
        Ok(EndRequest {
            app_status: 0x0A0B_0C0D,
            protocol_status: ProtocolStatus::Overloaded
        })
    );
}

#[test]
fn short_bodies_rejected() {
    assert_eq!(parse_end_request(&[0; 7]), Err(DecodeError::BadEndRequest));
    assert_eq!(
        parse_begin_request(&[0, 1]),
        Err(DecodeError::BadBeginRequest)
    );
}

#[test]
fn header_and_stdin_end_bytes() {
    assert_eq!(
        record_header(RecordType::Stdout, 0xABCD, 0x1234, 5),
        [1, 6, 0xAB, 0xCD, 0x12, 0x34, 5, 0]
    );
    let mut buf = BytesMut::new();
    put_stdin_end(&mut buf, 3);
    assert_eq!(&buf[..], &[1, 5, 0, 3, 0, 0, 0, 0]);
}

#[test]
fn put_stdin_small_and_empty() {
    let mut buf = BytesMut::new();
    put_stdin(&mut buf, 1, b"");
    assert!(buf.is_empty());
    put_stdin(&mut buf, 1, b"abc");
    assert_eq!(&buf[..], &[1, 5, 0, 1, 0, 3, 0, 0, b'a', b'b', b'c']);
}

#[test]
fn put_stdin_splits_large_body() {
    let data: Vec<u8> = (0..150_000u32).map(|i| i as u8).collect();
    let mut buf = BytesMut::new();
    put_stdin(&mut buf, 9, &data);
    let records = decode_all(&mut buf);
    assert_eq!(records.len(), 3);
    let lens: Vec<usize> = records.iter().map(|r| r.content.len()).collect();
    assert_eq!(lens, [65535, 65535, 150_000 - 2 * 65535]);
    let joined: Vec<u8> = records
        .iter()
        .flat_map(|r| r.content.iter().copied())
        .collect();
    assert_eq!(joined, data);
    assert!(records
        .iter()
        .all(|r| r.kind == RecordType::Stdin && r.request_id == 9));
}

#[test]
fn put_record_empty_writes_one_record() {
    let mut buf = BytesMut::new();
    put_record(&mut buf, RecordType::Stdout, 2, b"");
    assert_eq!(&buf[..], &[1, 6, 0, 2, 0, 0, 0, 0]);
    put_record(&mut buf, RecordType::Stderr, 2, &[7; 65536]);
    let records = decode_all(&mut buf);
    assert_eq!(records.len(), 3);
    assert_eq!(records[1].content.len(), 65535);
    assert_eq!(records[2].content.len(), 1);
}

#[test]
fn decode_waits_for_whole_record_and_skips_padding() {
    let mut wire = Vec::new();
    wire.extend_from_slice(&record_header(RecordType::Stdout, 1, 3, 4));
    wire.extend_from_slice(b"xyz\0\0\0\0");
    wire.extend_from_slice(&record_header(RecordType::Other(200), 2, 0, 0));
    let mut buf = BytesMut::new();
    for (i, &b) in wire.iter().enumerate() {
        buf.extend_from_slice(&[b]);
        let got = decode_record(&mut buf).unwrap();
        if i == 14 {
            let rec = got.expect("first record complete with its padding");
            assert_eq!(
                rec,
                Record {
                    kind: RecordType::Stdout,
                    request_id: 1,
                    content: Bytes::from_static(b"xyz")
                }
            );
            assert!(buf.is_empty());
        } else if i == 22 {
            let rec = got.expect("second record");
            assert_eq!(rec.kind, RecordType::Other(200));
            assert!(rec.content.is_empty());
        } else {
            assert!(got.is_none(), "byte {i}");
        }
    }
}

#[test]
fn decode_rejects_bad_version() {
    let mut buf = BytesMut::from(&b"HTTP/1.1 400 Bad Request\r\n"[..]);
    assert_eq!(
        decode_record(&mut buf),
        Err(DecodeError::UnsupportedVersion(b'H'))
    );
}

#[test]
fn pairs_short_and_long_lengths() {
    let mut buf = BytesMut::new();
    let mut w = ParamsWriter::new(&mut buf, 1);
    w.add(b"SCRIPT_NAME", b"/index.php");
    w.finish();
    let mut expected = vec![1, 4, 0, 1, 0, 23, 0, 0, 11, 10];
    expected.extend_from_slice(b"SCRIPT_NAME/index.php");
    expected.extend_from_slice(&[1, 4, 0, 1, 0, 0, 0, 0]);
    assert_eq!(&buf[..], &expected[..]);

    let long_name = vec![b'N'; 128];
    let long_value = vec![b'v'; 300];
    let mut buf = BytesMut::new();
    let mut w = ParamsWriter::new(&mut buf, 1);
    w.add(&long_name, &long_value);
    w.add(&[b'n'; 127], b"");
    w.finish();
    let stream = params_stream(&buf, 1);
    assert_eq!(&stream[..8], &[0x80, 0, 0, 128, 0x80, 0, 1, 44]);
    assert_eq!(stream[8 + 128 + 300..][..2], [127, 0]);
    assert_eq!(
        decode_pairs(&stream).unwrap(),
        vec![(long_name, long_value), (vec![b'n'; 127], Vec::new())]
    );
}

#[test]
fn params_writer_empty_is_single_terminator() {
    let mut buf = BytesMut::from(&b"prefix"[..]);
    ParamsWriter::new(&mut buf, 5).finish();
    assert_eq!(&buf[..], b"prefix\x01\x04\x00\x05\x00\x00\x00\x00");
}

#[test]
fn cgi_name_maps_every_byte() {
    let mut all: Vec<u8> = (0..=255u8).collect();
    cgi_name(&mut all);
    for (b, got) in (0..=255u8).zip(all) {
        let want = if b == b'-' {
            b'_'
        } else {
            b.to_ascii_uppercase()
        };
        assert_eq!(got, want, "byte {b:#04x}");
    }
}

#[test]
fn add_header_transforms_name() {
    let mut buf = BytesMut::new();
    let mut w = ParamsWriter::new(&mut buf, 1);
    w.add_header(b"x-forwarded-for", b"10.0.0.1");
    w.add_header(b"Accept-Encoding", b"gzip");
    w.finish();
    assert_eq!(
        decode_pairs(&params_stream(&buf, 1)).unwrap(),
        vec![
            (b"HTTP_X_FORWARDED_FOR".to_vec(), b"10.0.0.1".to_vec()),
            (b"HTTP_ACCEPT_ENCODING".to_vec(), b"gzip".to_vec()),
        ]
    );
}

#[test]
fn params_writer_crosses_record_boundary() {
    let big: Vec<u8> = (0..200 * 1024u32).map(|i| (i % 251) as u8).collect();
    let mut buf = BytesMut::new();
    let mut w = ParamsWriter::new(&mut buf, 3);
    w.add(b"A", b"1");
    w.add(b"BIG", &big);
    w.add_header(b"cookie", &big[..70_000]);
    w.add(b"Z", b"");
    w.finish();
    let pairs = decode_pairs(&params_stream(&buf, 3)).unwrap();
    assert_eq!(
        pairs,
        vec![
            (b"A".to_vec(), b"1".to_vec()),
            (b"BIG".to_vec(), big.clone()),
            (b"HTTP_COOKIE".to_vec(), big[..70_000].to_vec()),
            (b"Z".to_vec(), Vec::new()),
        ]
    );
}

#[test]
fn add_joined_writes_one_value_from_two_parts() {
    let big: Vec<u8> = (0..70_000u32).map(|i| (i % 251) as u8).collect();
    let mut buf = BytesMut::new();
    let mut w = ParamsWriter::new(&mut buf, 2);
    w.add_joined(b"SCRIPT_FILENAME", b"/srv/app", b"/index.php");
    w.add_joined(b"EMPTY_TAIL", b"abc", b"");
    // Long enough to roll into a second record in the middle of the second part.
    w.add_joined(b"LONG", &big[..100], &big[100..]);
    w.finish();
    assert_eq!(
        decode_pairs(&params_stream(&buf, 2)).unwrap(),
        vec![
            (b"SCRIPT_FILENAME".to_vec(), b"/srv/app/index.php".to_vec()),
            (b"EMPTY_TAIL".to_vec(), b"abc".to_vec()),
            (b"LONG".to_vec(), big),
        ]
    );
}

#[test]
fn params_writer_exact_fill_has_no_empty_record() {
    // 1-byte name length + 4-byte value length + 1-byte name + value = exactly one full record.
    let value = vec![b'x'; MAX_CONTENT_LEN - 6];
    let mut buf = BytesMut::new();
    let mut w = ParamsWriter::new(&mut buf, 1);
    w.add(b"K", &value);
    w.finish();
    assert_eq!(buf.len(), HEADER_LEN + MAX_CONTENT_LEN + HEADER_LEN);
    assert_eq!(
        decode_pairs(&params_stream(&buf, 1)).unwrap(),
        vec![(b"K".to_vec(), value)]
    );
}

#[test]
fn decode_pairs_rejects_truncation() {
    assert_eq!(decode_pairs(&[3]), Err(DecodeError::BadNameValue));
    assert_eq!(decode_pairs(&[1, 1, b'a']), Err(DecodeError::BadNameValue));
    assert_eq!(decode_pairs(&[0x80, 0, 0]), Err(DecodeError::BadNameValue));
    assert_eq!(
        decode_pairs(&[0xFF, 0xFF, 0xFF, 0xFF, 0]),
        Err(DecodeError::BadNameValue)
    );
    assert_eq!(decode_pairs(&[]), Ok(Vec::new()));
}

fn content_strategy() -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![
        3 => proptest::collection::vec(any::<u8>(), 0..300),
        1 => (0..=MAX_CONTENT_LEN, any::<u8>())
            .prop_map(|(n, seed)| (0..n).map(|i| (i as u8).wrapping_mul(31) ^ seed).collect()),
    ]
}

fn record_strategy() -> impl Strategy<Value = (Record, u8)> {
    (any::<u8>(), any::<u16>(), content_strategy(), any::<u8>()).prop_map(
        |(kind, id, content, pad)| {
            (
                Record {
                    kind: RecordType::from_u8(kind),
                    request_id: id,
                    content: Bytes::from(content),
                },
                pad,
            )
        },
    )
}

fn encode(records: &[(Record, u8)]) -> Vec<u8> {
    let mut wire = Vec::new();
    for (rec, pad) in records {
        let len = u16::try_from(rec.content.len()).unwrap();
        wire.extend_from_slice(&record_header(rec.kind, rec.request_id, len, *pad));
        wire.extend_from_slice(&rec.content);
        wire.extend((0..*pad).map(|i| i ^ 0x5A));
    }
    wire
}

fn pair_bytes() -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![
        4 => proptest::collection::vec(any::<u8>(), 0..140),
        1 => (0usize..150_000, any::<u8>()).prop_map(|(n, b)| vec![b; n]),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    #[test]
    fn prop_records_round_trip(records in proptest::collection::vec(record_strategy(), 0..5)) {
        let mut buf = BytesMut::from(&encode(&records)[..]);
        let decoded = decode_all(&mut buf);
        prop_assert!(buf.is_empty());
        let expected: Vec<Record> = records.into_iter().map(|(r, _)| r).collect();
        prop_assert_eq!(decoded, expected);
    }

    #[test]
    fn prop_records_any_split(
        records in proptest::collection::vec(record_strategy(), 1..5),
        cuts in proptest::collection::vec(any::<prop::sample::Index>(), 0..20),
    ) {
        let wire = encode(&records);
        let mut points: Vec<usize> = cuts.iter().map(|c| c.index(wire.len() + 1)).collect();
        points.push(0);
        points.push(wire.len());
        points.sort_unstable();
        let mut buf = BytesMut::new();
        let mut decoded = Vec::new();
        for w in points.windows(2) {
            buf.extend_from_slice(&wire[w[0]..w[1]]);
            while let Some(rec) = decode_record(&mut buf).unwrap() {
                decoded.push(rec);
            }
        }
        prop_assert!(buf.is_empty());
        let expected: Vec<Record> = records.into_iter().map(|(r, _)| r).collect();
        prop_assert_eq!(decoded, expected);
    }

    #[test]
    fn prop_params_writer_round_trip(
        pairs in proptest::collection::vec((pair_bytes(), pair_bytes()), 0..8),
        id in any::<u16>(),
    ) {
        let mut buf = BytesMut::new();
        let mut w = ParamsWriter::new(&mut buf, id);
        for (i, (n, v)) in pairs.iter().enumerate() {
            // Every other pair as two parts, split anywhere.
            if i % 2 == 1 {
                let (a, b) = v.split_at(v.len() / 3);
                w.add_joined(n, a, b);
            } else {
                w.add(n, v);
            }
        }
        w.finish();
        prop_assert_eq!(decode_pairs(&params_stream(&buf, id)).unwrap(), pairs);
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    #[test]
    fn prop_arbitrary_bytes_never_panic(data in proptest::collection::vec(any::<u8>(), 0..400)) {
        let mut buf = BytesMut::from(&data[..]);
        while let Ok(Some(_)) = decode_record(&mut buf) {}
        let mut versioned = data.clone();
        if let Some(first) = versioned.first_mut() {
            *first = VERSION_1;
        }
        let mut buf = BytesMut::from(&versioned[..]);
        while let Ok(Some(_)) = decode_record(&mut buf) {}
        let _ = decode_pairs(&data);
        let _ = parse_end_request(&data);
        let _ = parse_begin_request(&data);
    }
}

#[test]
fn partial_stdout_is_split_off_as_it_arrives() {
    let mut whole = BytesMut::new();
    whole.extend_from_slice(&record_header(RecordType::Stdout, 1, 10, 3));
    whole.extend_from_slice(b"0123456789\0\0\0");
    // Whole records, and too little content, are left to decode_record.
    assert_eq!(split_partial_stdout(&mut whole.clone(), 1), None);
    let mut buf = BytesMut::from(&whole[..HEADER_LEN + 3]);
    assert_eq!(split_partial_stdout(&mut buf, 4), None);
    assert_eq!(buf.len(), HEADER_LEN + 3, "nothing consumed");
    // Part of the content.
    let (content, left, pad) = split_partial_stdout(&mut buf, 3).unwrap();
    assert_eq!((&content[..], left, pad), (&b"012"[..], 7, 3));
    assert!(buf.is_empty());
    // All of the content and part of the padding.
    let mut buf = BytesMut::from(&whole[..HEADER_LEN + 11]);
    let (content, left, pad) = split_partial_stdout(&mut buf, 1).unwrap();
    assert_eq!((&content[..], left, pad), (&b"0123456789"[..], 0, 2));
    assert!(buf.is_empty());
    // Not STDOUT, or not FastCGI.
    let mut err = BytesMut::new();
    err.extend_from_slice(&record_header(RecordType::Stderr, 1, 10, 0));
    err.extend_from_slice(b"01234");
    assert_eq!(split_partial_stdout(&mut err, 1), None);
    let mut bad = BytesMut::from(&whole[..HEADER_LEN + 5]);
    bad[0] = 2;
    assert_eq!(split_partial_stdout(&mut bad, 1), None);
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    /// A STDOUT record cut anywhere: what is split off as it arrives, then the rest taken
    /// by its remaining lengths, is the record's content; the next record starts after it.
    #[test]
    fn prop_partial_stdout_reassembles(
        content in proptest::collection::vec(any::<u8>(), 1..300),
        padding in 0u8..20,
        cut in 0usize..400,
        min in 0usize..50,
    ) {
        let mut wire = BytesMut::new();
        let len = u16::try_from(content.len()).unwrap();
        wire.extend_from_slice(&record_header(RecordType::Stdout, 1, len, padding));
        wire.extend_from_slice(&content);
        wire.extend_from_slice(&vec![0; usize::from(padding)]);
        put_end_request(&mut wire, 1, 0, ProtocolStatus::RequestComplete);
        let cut = cut.min(wire.len());
        let mut buf = BytesMut::from(&wire[..cut]);
        let rest = &wire[cut..];
        if let Some((first, left, pad)) = split_partial_stdout(&mut buf, min) {
            prop_assert!(first.len() >= min.max(1));
            prop_assert_eq!(first.len() + left, content.len());
            buf.extend_from_slice(rest);
            let mut got = first.to_vec();
            got.extend_from_slice(&buf.split_to(left));
            buf.advance(pad);
            prop_assert_eq!(got, content);
            let end = decode_record(&mut buf).unwrap().unwrap();
            prop_assert_eq!(end.kind, RecordType::EndRequest);
        } else {
            prop_assert_eq!(buf.len(), cut, "nothing consumed");
        }
    }

    #[test]
    fn prop_partial_stdout_never_panics(data in proptest::collection::vec(any::<u8>(), 0..400), min in 0usize..600) {
        let mut buf = BytesMut::from(&data[..]);
        if let Some((first, left, pad)) = split_partial_stdout(&mut buf, min) {
            prop_assert!(first.len() + left <= MAX_CONTENT_LEN && pad <= 255);
        }
    }
}
