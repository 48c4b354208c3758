//! A fast, trivial FastCGI responder for load tests: every request gets the same tiny
//! response, so a benchmark through a proxy measures the proxy and not PHP.
//!
//! ```text
//! cargo build --release --example fcgi_responder
//! target/release/examples/fcgi_responder 127.0.0.1:9100
//! ```
//!
//! Behaves like PHP-FPM on the wire where it matters to a proxy: one request at a time per
//! connection (a second BEGIN_REQUEST while one is open gets FCGI_CANT_MPX_CONN), the
//! connection is closed after the response unless BEGIN_REQUEST asked for FCGI_KEEP_CONN,
//! FCGI_GET_VALUES is answered (`FCGI_MPXS_CONNS=0`), the request body (STDIN) is read and
//! discarded. Built on fpmgate's own codec. Runs on one thread (pin it with taskset);
//! `FCGI_RESPONDER_THREADS=N` uses a multi-threaded runtime instead.

use std::net::SocketAddr;

use bytes::{Bytes, BytesMut};
use fpmgate::fastcgi::codec::{
    decode_record, parse_begin_request, put_end_request, put_record, ProtocolStatus, RecordType,
    FLAG_KEEP_CONN,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// The whole CGI response every request gets.
const BODY: &[u8] = b"Content-Type: text/plain\r\n\r\nhello\n";

/// Encoded records answering one request with id `id`: STDOUT with [`BODY`], the empty
/// STDOUT ending the stream, END_REQUEST complete.
fn response(id: u16) -> Bytes {
    let mut out = BytesMut::with_capacity(BODY.len() + 32);
    put_record(&mut out, RecordType::Stdout, id, BODY);
    put_record(&mut out, RecordType::Stdout, id, b"");
    put_end_request(&mut out, id, 0, ProtocolStatus::RequestComplete);
    out.freeze()
}

/// FCGI_GET_VALUES_RESULT for the management record: this responder never multiplexes.
fn get_values_result(asked: &[u8], out: &mut BytesMut) {
    let mut pairs = Vec::new();
    if let Ok(names) = fpmgate::fastcgi::codec::decode_pairs(asked) {
        for (name, _) in names {
            let value: &[u8] = match name.as_slice() {
                b"FCGI_MPXS_CONNS" => b"0",
                b"FCGI_MAX_CONNS" | b"FCGI_MAX_REQS" => b"100000",
                _ => continue,
            };
            // Names and values here are all shorter than 128 bytes: 1-byte lengths.
            pairs.push(name.len() as u8);
            pairs.push(value.len() as u8);
            pairs.extend_from_slice(&name);
            pairs.extend_from_slice(value);
        }
    }
    put_record(out, RecordType::GetValuesResult, 0, &pairs);
}

/// The request open on a connection.
struct Open {
    id: u16,
    keep_conn: bool,
}

async fn serve(mut sock: TcpStream, cached: Bytes) -> std::io::Result<()> {
    let _ = sock.set_nodelay(true);
    let mut buf = BytesMut::with_capacity(16 * 1024);
    let mut out = BytesMut::with_capacity(1024);
    let mut open: Option<Open> = None;
    loop {
        let mut close = false;
        loop {
            let rec = match decode_record(&mut buf) {
                Ok(Some(rec)) => rec,
                Ok(None) => break,
                Err(_) => return Ok(()), // not FastCGI: drop the connection
            };
            match rec.kind {
                RecordType::BeginRequest => {
                    let Ok((_role, flags)) = parse_begin_request(&rec.content) else {
                        return Ok(());
                    };
                    if open.is_some() {
                        put_end_request(&mut out, rec.request_id, 0, ProtocolStatus::CantMpxConn);
                        continue;
                    }
                    open = Some(Open {
                        id: rec.request_id,
                        keep_conn: flags & FLAG_KEEP_CONN != 0,
                    });
                }
                RecordType::Stdin if rec.content.is_empty() => {
                    let Some(req) = open.take_if(|o| o.id == rec.request_id) else {
                        continue;
                    };
                    if req.id == 1 {
                        out.extend_from_slice(&cached);
                    } else {
                        out.extend_from_slice(&response(req.id));
                    }
                    if !req.keep_conn {
                        close = true;
                        break;
                    }
                }
                RecordType::AbortRequest => {
                    if let Some(req) = open.take_if(|o| o.id == rec.request_id) {
                        put_end_request(&mut out, req.id, 0, ProtocolStatus::RequestComplete);
                        if !req.keep_conn {
                            close = true;
                            break;
                        }
                    }
                }
                RecordType::GetValues => get_values_result(&rec.content, &mut out),
                // PARAMS, body STDIN, DATA: read and ignored.
                RecordType::Params | RecordType::Stdin | RecordType::Data => {}
                RecordType::Other(kind) => {
                    let mut body = [0u8; 8];
                    body[0] = kind;
                    put_record(&mut out, RecordType::UnknownType, 0, &body);
                }
                _ => {}
            }
        }
        if !out.is_empty() {
            sock.write_all(&out).await?;
            out.clear();
        }
        if close {
            let _ = sock.shutdown().await;
            return Ok(());
        }
        if buf.capacity() - buf.len() < 4096 {
            buf.reserve(16 * 1024);
        }
        if sock.read_buf(&mut buf).await? == 0 {
            return Ok(());
        }
    }
}

/// A listener with a deep accept queue: a proxy warming up opens hundreds of connections
/// at once, and with tokio's default backlog (128) the SYNs beyond it are dropped and retried
/// only after the 1 s SYN retransmission timeout.
fn listen(addr: SocketAddr) -> std::io::Result<TcpListener> {
    let socket = socket2::Socket::new(
        socket2::Domain::for_address(addr),
        socket2::Type::STREAM,
        Some(socket2::Protocol::TCP),
    )?;
    socket.set_reuse_address(true)?;
    socket.set_nonblocking(true)?;
    socket.bind(&addr.into())?;
    socket.listen(4096)?;
    TcpListener::from_std(socket.into())
}

async fn run(addr: SocketAddr) -> std::io::Result<()> {
    let listener = listen(addr)?;
    eprintln!("fcgi_responder listening on {}", listener.local_addr()?);
    let cached = response(1);
    loop {
        match listener.accept().await {
            Ok((sock, _)) => {
                let cached = cached.clone();
                tokio::spawn(async move {
                    let _ = serve(sock, cached).await;
                });
            }
            // EMFILE and friends: back off briefly instead of spinning.
            Err(_) => tokio::time::sleep(std::time::Duration::from_millis(10)).await,
        }
    }
}

fn main() {
    let Some(addr) = std::env::args().nth(1) else {
        eprintln!("usage: fcgi_responder IP:PORT");
        std::process::exit(2);
    };
    let addr: SocketAddr = match addr.parse() {
        Ok(a) => a,
        Err(e) => {
            eprintln!("fcgi_responder: bad address {addr:?}: {e}");
            std::process::exit(2);
        }
    };
    let threads: usize = std::env::var("FCGI_RESPONDER_THREADS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1);
    let rt = if threads > 1 {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(threads)
            .enable_all()
            .build()
    } else {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
    };
    let rt = match rt {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("fcgi_responder: runtime: {e}");
            std::process::exit(1);
        }
    };
    if let Err(e) = rt.block_on(run(addr)) {
        eprintln!("fcgi_responder: {e}");
        std::process::exit(1);
    }
}
