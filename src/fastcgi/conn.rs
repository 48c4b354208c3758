//! Connections to PHP-FPM: TCP or unix socket, connect with a timeout, socket options, and the
//! liveness check that runs before a kept-alive connection is reused.

use std::io;
use std::path::Path;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpStream, UnixStream};

/// Read buffer of a FastCGI connection: room for a typical response in one read; it grows
/// to a whole 64 KiB record only when FPM sends one.
pub const READ_BUF: usize = 16 * 1024;

/// A connected FastCGI socket.
#[derive(Debug)]
pub enum Stream {
    /// A remote or local TCP endpoint.
    Tcp(TcpStream),
    /// A unix socket endpoint.
    Unix(UnixStream),
}

/// Where to connect.
#[derive(Debug, Clone, Copy)]
pub enum Target<'a> {
    /// `host:port`.
    Tcp(std::net::SocketAddr),
    /// `unix:/path`.
    Unix(&'a Path),
}

/// Connects within `timeout`. TCP sockets get `TCP_NODELAY` (FastCGI records are small and
/// latency-bound).
pub async fn connect(target: Target<'_>, timeout: Duration) -> io::Result<Stream> {
    let fut = async {
        match target {
            Target::Tcp(addr) => {
                let s = TcpStream::connect(addr).await?;
                s.set_nodelay(true)?;
                Ok(Stream::Tcp(s))
            }
            Target::Unix(path) => Ok(Stream::Unix(UnixStream::connect(path).await?)),
        }
    };
    match tokio::time::timeout(timeout, fut).await {
        Ok(r) => r,
        Err(_) => Err(io::Error::new(io::ErrorKind::TimedOut, "connect timed out")),
    }
}

impl Stream {
    /// True when an idle connection still looks usable: no EOF and no unexpected bytes
    /// waiting. FPM closes a kept connection when its worker exits (`pm.max_requests`,
    /// reload, idle process kill); reusing such a socket would fail the request.
    pub fn is_reusable(&self) -> bool {
        let mut probe = [0u8; 1];
        let r = match self {
            Stream::Tcp(s) => s.try_read(&mut probe),
            Stream::Unix(s) => s.try_read(&mut probe),
        };
        matches!(r, Err(ref e) if e.kind() == io::ErrorKind::WouldBlock)
    }

    /// Re-arms `TCP_QUICKACK` (Linux). PHP-FPM leaves Nagle on; with delayed ACKs on our side
    /// a large response stalls ~40 ms per round. Quick ACKs must be re-armed after reads
    /// because the kernel drops back to delayed mode on its own.
    #[inline]
    pub fn rearm_quickack(&self) {
        #[cfg(target_os = "linux")]
        if let Stream::Tcp(s) = self {
            let _ = socket2::SockRef::from(s).set_tcp_quickack(true);
        }
    }
}

impl AsyncRead for Stream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Stream::Tcp(s) => Pin::new(s).poll_read(cx, buf),
            Stream::Unix(s) => Pin::new(s).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for Stream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Stream::Tcp(s) => Pin::new(s).poll_write(cx, buf),
            Stream::Unix(s) => Pin::new(s).poll_write(cx, buf),
        }
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Stream::Tcp(s) => Pin::new(s).poll_write_vectored(cx, bufs),
            Stream::Unix(s) => Pin::new(s).poll_write_vectored(cx, bufs),
        }
    }

    fn is_write_vectored(&self) -> bool {
        true
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Stream::Tcp(s) => Pin::new(s).poll_flush(cx),
            Stream::Unix(s) => Pin::new(s).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Stream::Tcp(s) => Pin::new(s).poll_shutdown(cx),
            Stream::Unix(s) => Pin::new(s).poll_shutdown(cx),
        }
    }
}
