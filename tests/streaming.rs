//! Response bodies whose FastCGI records arrive in parts: the content is sent on as it
//! comes (not gathered into whole records first), and a body left mid-record still ends
//! where FPM's records do, whether it was all delivered (the connection is kept) or the
//! client went away (the place is held until END_REQUEST).

mod fake;
mod support;

use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use fake::{trickle_byte, FakeFpm, Mode, TRICKLE_LEN};
use support::{client, php_root, Gate};

fn gate(endpoint: &str) -> Gate {
    Gate::start(&format!(
        r#"
listen: [ {{ bind: "127.0.0.1:0" }} ]
pools:
  main:
    endpoints: [ {{ addr: "{endpoint}", max_conns: 1 }} ]
    keepalive: {{ max_idle: 1, idle_timeout: 30s }}
    queue: {{ size: 8, timeout: 20s }}
vhosts:
  - hosts: ["*"]
    root: {root}
    pool: main
    index: index.php
"#,
        root = php_root().display()
    ))
}

fn check_body(body: &[u8]) {
    assert_eq!(body.len(), TRICKLE_LEN);
    if let Some(i) = (0..TRICKLE_LEN).find(|&i| body[i] != trickle_byte(i)) {
        panic!("body byte {i} is {}, not {}", body[i], trickle_byte(i));
    }
}

/// Every byte arrives in order, and the connection is kept: the declared length was
/// reached inside the last record's padding, and reading on to END_REQUEST from there
/// finds it.
#[tokio::test]
async fn records_arriving_in_parts_stream_whole_and_keep_the_connection() {
    let f = FakeFpm::start(Mode::Trickle(30));
    let g = gate(&f.addr.to_string());
    for _ in 0..3 {
        let resp = client().get(g.url("/x.php")).send().await.unwrap();
        assert_eq!(resp.status(), 200);
        check_body(&resp.bytes().await.unwrap());
    }
    assert_eq!(f.requests.load(Ordering::SeqCst), 3);
    // The FPM connection goes back to the idle list once END_REQUEST has been read after
    // the body, which may be just after the client has it.
    tokio::time::sleep(Duration::from_millis(200)).await;
    let resp = client().get(g.url("/x.php")).send().await.unwrap();
    check_body(&resp.bytes().await.unwrap());
    assert_eq!(
        f.accepted.load(Ordering::SeqCst),
        1,
        "every request on the one kept FPM connection"
    );
}

/// A client that goes away inside a record: the rest of the response is read and
/// discarded to END_REQUEST, holding the only place (`max_conns: 1`), so the next request
/// starts only when FPM is done with the first.
#[tokio::test]
async fn a_client_leaving_mid_record_holds_the_place_to_the_end_of_the_request() {
    let pause = Duration::from_millis(250);
    let f = FakeFpm::start(Mode::Trickle(pause.as_millis() as u64));
    let g = gate(&f.addr.to_string());
    let mut resp = client().get(g.url("/x.php")).send().await.unwrap();
    let first = resp.chunk().await.unwrap().expect("a first chunk");
    assert!(first.len() < TRICKLE_LEN / 2, "only part of a record yet");
    let left_at = Instant::now();
    drop(resp);

    let resp = client().get(g.url("/x.php")).send().await.unwrap();
    check_body(&resp.bytes().await.unwrap());
    // FPM ends the first request three pauses after it started; the second has its whole
    // body two pauses after it starts. Had the place gone with the client (noticed by the
    // next write to it, a pause or two in), the second would be done after four at most.
    let waited = left_at.elapsed();
    assert!(
        waited >= pause * 9 / 2,
        "the second request ran while FPM still served the first ({waited:?})"
    );
    assert_eq!(f.requests.load(Ordering::SeqCst), 2);
}
