//! A misbehaving FastCGI server for the faults PHP-FPM cannot produce on demand: garbage,
//! resets mid-response, oversized heads, silence, records after END_REQUEST. Built on
//! fpmgate's own codec; runs on its own thread so it outlives any test runtime.
#![allow(dead_code)]

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::BytesMut;
use fpmgate::fastcgi::codec::{self, ProtocolStatus, RecordType};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// What the server does with each request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// A proper 200 "ok" response, keeping the connection when asked.
    Good,
    /// Answers with bytes that are not FastCGI.
    Garbage,
    /// Reads the request, then closes without a byte.
    CloseBeforeResponse,
    /// Sends the head and part of the body, then closes before END_REQUEST.
    TruncateBody,
    /// Sends a response head of the given size.
    HugeHead(usize),
    /// Reads the request and never answers.
    Silent,
    /// A normal response, then an extra STDOUT record after END_REQUEST.
    StdoutAfterEnd,
    /// An unknown record type before the head.
    UnknownRecord,
    /// `Status: abc`.
    BadStatus,
    /// END_REQUEST with FCGI_OVERLOADED and no output.
    Overloaded,
    /// Sends a record header claiming 65535 bytes, then closes.
    ShortRecord,
    /// A head and some body, then END_REQUEST saying the request did not complete.
    UncleanEnd,
    /// A body of [`TRICKLE_LEN`] bytes (`Content-Length` declared) in two padded STDOUT
    /// records of which only parts arrive at a time, with the given pause in ms between
    /// writes: the first in two halves, the second's padding last, with END_REQUEST.
    Trickle(u64),
}

/// The body [`Mode::Trickle`] sends.
pub const TRICKLE_LEN: usize = 80_000;

/// Byte `i` of the [`Mode::Trickle`] body: misplaced or lost bytes show.
pub fn trickle_byte(i: usize) -> u8 {
    (i % 251) as u8
}

/// A running fake server.
pub struct FakeFpm {
    /// Where it listens.
    pub addr: SocketAddr,
    /// Connections accepted so far.
    pub accepted: Arc<AtomicUsize>,
    /// Requests fully read so far.
    pub requests: Arc<AtomicUsize>,
}

impl FakeFpm {
    /// Starts a server answering every request with `mode`.
    pub fn start(mode: Mode) -> FakeFpm {
        let accepted = Arc::new(AtomicUsize::new(0));
        let requests = Arc::new(AtomicUsize::new(0));
        let (tx, rx) = std::sync::mpsc::channel();
        let (a, r) = (accepted.clone(), requests.clone());
        std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            rt.block_on(async move {
                let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
                tx.send(l.local_addr().unwrap()).unwrap();
                loop {
                    let Ok((s, _)) = l.accept().await else {
                        continue;
                    };
                    a.fetch_add(1, Ordering::SeqCst);
                    let r = r.clone();
                    tokio::spawn(async move {
                        let _ = serve(s, mode, r).await;
                    });
                }
            });
        });
        let addr = rx
            .recv_timeout(Duration::from_secs(5))
            .expect("fake FPM started");
        FakeFpm {
            addr,
            accepted,
            requests,
        }
    }
}

/// Reads one request (through the empty STDIN). Returns false on EOF.
async fn read_request(s: &mut TcpStream, buf: &mut BytesMut) -> std::io::Result<bool> {
    loop {
        while let Some(rec) =
            codec::decode_record(buf).map_err(|e| std::io::Error::other(e.to_string()))?
        {
            if rec.kind == RecordType::Stdin && rec.content.is_empty() {
                return Ok(true);
            }
        }
        if s.read_buf(buf).await? == 0 {
            return Ok(false);
        }
    }
}

fn stdout(out: &mut BytesMut, data: &[u8]) {
    codec::put_record(out, RecordType::Stdout, 1, data);
}

async fn serve(mut s: TcpStream, mode: Mode, requests: Arc<AtomicUsize>) -> std::io::Result<()> {
    let mut buf = BytesMut::with_capacity(65536);
    while read_request(&mut s, &mut buf).await? {
        requests.fetch_add(1, Ordering::SeqCst);
        let mut out = BytesMut::new();
        match mode {
            Mode::Good => {
                stdout(&mut out, b"Content-Type: text/plain\r\n\r\nok");
                codec::put_record(&mut out, RecordType::Stdout, 1, b"");
                codec::put_end_request(&mut out, 1, 0, ProtocolStatus::RequestComplete);
            }
            Mode::Garbage => {
                out.extend_from_slice(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nhi")
            }
            Mode::CloseBeforeResponse => return Ok(()),
            Mode::TruncateBody => {
                stdout(&mut out, b"Content-Type: text/plain\r\n\r\npartial body");
                s.write_all(&out).await?;
                tokio::time::sleep(Duration::from_millis(50)).await;
                return Ok(());
            }
            Mode::HugeHead(n) => {
                let mut head = b"X-Big: ".to_vec();
                head.extend(std::iter::repeat_n(b'a', n));
                head.extend_from_slice(b"\r\n\r\nok");
                stdout(&mut out, &head);
                codec::put_end_request(&mut out, 1, 0, ProtocolStatus::RequestComplete);
            }
            Mode::Silent => {
                tokio::time::sleep(Duration::from_secs(3600)).await;
                return Ok(());
            }
            Mode::StdoutAfterEnd => {
                stdout(&mut out, b"Content-Type: text/plain\r\n\r\nok");
                codec::put_end_request(&mut out, 1, 0, ProtocolStatus::RequestComplete);
                stdout(&mut out, b"sneaky");
            }
            Mode::UnknownRecord => {
                codec::put_record(&mut out, RecordType::Other(42), 1, b"??");
                stdout(&mut out, b"Content-Type: text/plain\r\n\r\nok");
                codec::put_end_request(&mut out, 1, 0, ProtocolStatus::RequestComplete);
            }
            Mode::BadStatus => {
                stdout(&mut out, b"Status: abc\r\n\r\nok");
                codec::put_end_request(&mut out, 1, 0, ProtocolStatus::RequestComplete);
            }
            Mode::Overloaded => codec::put_end_request(&mut out, 1, 0, ProtocolStatus::Overloaded),
            Mode::UncleanEnd => {
                stdout(&mut out, b"Content-Type: text/plain\r\n\r\npartial body");
                codec::put_end_request(&mut out, 1, 0, ProtocolStatus::Overloaded);
            }
            Mode::Trickle(ms) => {
                let pause = Duration::from_millis(ms);
                let half = TRICKLE_LEN / 2;
                let body: Vec<u8> = (0..TRICKLE_LEN).map(trickle_byte).collect();
                let head =
                    format!("Content-Type: text/plain\r\nContent-Length: {TRICKLE_LEN}\r\n\r\n");
                stdout(&mut out, head.as_bytes());
                let (first, second) = body.split_at(half);
                let len = u16::try_from(half).unwrap();
                out.extend_from_slice(&codec::record_header(RecordType::Stdout, 1, len, 7));
                out.extend_from_slice(&first[..half / 2]);
                s.write_all(&std::mem::take(&mut out)).await?;
                tokio::time::sleep(pause).await;
                out.extend_from_slice(&first[half / 2..]);
                out.extend_from_slice(&[0; 7]);
                s.write_all(&std::mem::take(&mut out)).await?;
                tokio::time::sleep(pause).await;
                out.extend_from_slice(&codec::record_header(RecordType::Stdout, 1, len, 5));
                out.extend_from_slice(second);
                s.write_all(&std::mem::take(&mut out)).await?;
                tokio::time::sleep(pause).await;
                out.extend_from_slice(&[0; 5]);
                codec::put_record(&mut out, RecordType::Stdout, 1, b"");
                codec::put_end_request(&mut out, 1, 0, ProtocolStatus::RequestComplete);
            }
            Mode::ShortRecord => {
                out.extend_from_slice(&codec::record_header(RecordType::Stdout, 1, 65535, 0));
                out.extend_from_slice(b"Content-Type: text/plain\r\n\r\n");
                s.write_all(&out).await?;
                return Ok(());
            }
        }
        s.write_all(&out).await?;
    }
    Ok(())
}

/// A one-shot FastCGI GET straight to an FPM address (no fpmgate), for reading FPM's own
/// status page in tests. Returns the STDOUT body after the CGI head.
pub fn fcgi_get(addr: SocketAddr, script: &str, query: &str) -> String {
    use std::io::{Read, Write};
    let mut out = BytesMut::new();
    codec::put_begin_request(&mut out, 1, false);
    let mut p = codec::ParamsWriter::new(&mut out, 1);
    for (k, v) in [
        ("SCRIPT_NAME", script),
        ("SCRIPT_FILENAME", script),
        ("REQUEST_URI", script),
        ("REQUEST_METHOD", "GET"),
        ("QUERY_STRING", query),
        ("SERVER_PROTOCOL", "HTTP/1.1"),
        ("GATEWAY_INTERFACE", "CGI/1.1"),
    ] {
        p.add(k.as_bytes(), v.as_bytes());
    }
    p.finish();
    codec::put_stdin_end(&mut out, 1);
    let mut s = std::net::TcpStream::connect(addr).expect("connect to FPM");
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    s.write_all(&out).unwrap();
    let mut raw = Vec::new();
    let _ = s.read_to_end(&mut raw);
    let mut buf = BytesMut::from(&raw[..]);
    let mut stdout = Vec::new();
    while let Ok(Some(rec)) = codec::decode_record(&mut buf) {
        if rec.kind == RecordType::Stdout {
            stdout.extend_from_slice(&rec.content);
        }
    }
    let text = String::from_utf8_lossy(&stdout).into_owned();
    match text.split_once("\r\n\r\n") {
        Some((_, body)) => body.to_string(),
        None => text,
    }
}
