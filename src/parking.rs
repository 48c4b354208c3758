//! The parking lot: idle plaintext HTTP/1 connections, held without a task each.
//!
//! A parked connection has no HTTP server state left (see `listener::PARK_AFTER`), but
//! as a task waiting on its socket it would still hold the task, its future, a timer and
//! the runtime's per-socket registration: over a kilobyte for doing nothing. In the lot it
//! is its socket's descriptor, its addresses, when it went idle and its connection slot.
//! The socket leaves the runtime's reactor for an epoll set of the listener's own, which
//! one thread watches: when bytes (or a close) arrive it hands the socket back to a new
//! connection task; it closes sockets whose idle budget ran out, and all of them at
//! shutdown.

use std::cmp::Reverse;
use std::collections::BinaryHeap;
use std::io;
use std::net::TcpStream as StdTcpStream;
use std::os::fd::AsRawFd;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use mio::unix::SourceFd;
use mio::{Events, Interest, Poll, Registry, Token};
use slab::Slab;
use tokio::sync::OwnedSemaphorePermit;

use crate::pool::endpoint::now_ms;
use crate::proxy::ConnInfo;

/// How often the lot looks for connections past their budget. Timeouts fire up to this
/// much late, as the watchdog's do for connections being served.
const SWEEP_EVERY: Duration = Duration::from_millis(100);

/// What a connection holds for its whole life: its slot under `max_connections` and its
/// count in the `fpmgate_client_connections` gauge, given back when it is dropped.
pub struct ConnGuard {
    gauge: prometheus::IntGauge,
    _permit: OwnedSemaphorePermit,
}

impl ConnGuard {
    /// Counts a connection in `gauge` until dropped.
    pub fn new(gauge: prometheus::IntGauge, permit: OwnedSemaphorePermit) -> ConnGuard {
        gauge.inc();
        ConnGuard {
            gauge,
            _permit: permit,
        }
    }
}

impl Drop for ConnGuard {
    fn drop(&mut self) {
        self.gauge.dec();
    }
}

/// A parked connection: everything needed to serve it again.
pub struct Parked {
    /// Its slot and gauge count. First, so that they are given back before the socket
    /// closes (fields drop in order): a client that sees the close finds the slot free.
    pub guard: ConnGuard,
    /// The socket, out of the runtime's reactor.
    pub stream: StdTcpStream,
    /// Its addresses.
    pub info: Arc<ConnInfo>,
    /// When its last response ended (ms on the process clock).
    pub idle_since: u64,
}

struct Entry {
    conn: Parked,
    /// Tells this parking from an earlier one in the same slot.
    parking: u64,
}

struct State {
    entries: Slab<Entry>,
    /// (deadline ms, parking, key), earliest first. Entries that left the lot before
    /// their deadline stay here until it passes (or the heap is rebuilt).
    deadlines: BinaryHeap<Reverse<(u64, u64, usize)>>,
    parkings: u64,
    /// Set at shutdown: nothing parks any more.
    closed: bool,
}

impl State {
    /// Drops the deadlines of connections that left, once they outnumber the parked.
    fn compact(&mut self) {
        if self.deadlines.len() > 2 * self.entries.len() + 1024 {
            let entries = &self.entries;
            self.deadlines
                .retain(|Reverse((_, p, k))| entries.get(*k).is_some_and(|e| e.parking == *p));
        }
    }
}

/// A listener's lot. Cheap to share: connection tasks park here from any thread.
pub struct Lot {
    registry: Registry,
    state: Mutex<State>,
}

/// Hands the connections whose sockets became readable back to be served.
pub trait Resume: Send + Sync + 'static {
    /// Serves `conn` again (spawns its task); it may park in `lot` again.
    fn resume(&self, lot: &Arc<Lot>, conn: Parked);
}

impl Lot {
    /// A new lot, with the thread that watches it until `shutdown` (then closes every
    /// connection still parked).
    pub fn start(
        shutdown: tokio_util::sync::CancellationToken,
        resume: impl Resume,
    ) -> io::Result<Arc<Lot>> {
        let poll = Poll::new()?;
        let lot = Arc::new(Lot {
            registry: poll.registry().try_clone()?,
            state: Mutex::new(State {
                entries: Slab::new(),
                deadlines: BinaryHeap::new(),
                parkings: 0,
                closed: false,
            }),
        });
        let l = lot.clone();
        std::thread::Builder::new()
            .name("fpmgate-lot".into())
            .spawn(move || watch(&l, poll, &shutdown, &resume))?;
        Ok(lot)
    }

    fn state(&self) -> MutexGuard<'_, State> {
        // Nothing panics while holding it; if something did, the slab is still whole.
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Parks `conn` until its socket is readable or `budget` runs out. The connection
    /// comes back as the error when it cannot park (the lot is shut, or the socket could
    /// not be watched).
    pub fn park(&self, conn: Parked, budget: Duration) -> Result<(), Parked> {
        let deadline = now_ms().saturating_add(budget.as_millis() as u64);
        let mut st = self.state();
        if st.closed {
            return Err(conn);
        }
        st.parkings += 1;
        let parking = st.parkings;
        let slot = st.entries.vacant_entry();
        let key = slot.key();
        let fd = conn.stream.as_raw_fd();
        // Under the lock, so that an event for this token always finds its entry. A
        // socket that is already readable is reported at once.
        match self
            .registry
            .register(&mut SourceFd(&fd), Token(key), Interest::READABLE)
        {
            Ok(()) => {
                slot.insert(Entry { conn, parking });
                st.deadlines.push(Reverse((deadline, parking, key)));
                st.compact();
                Ok(())
            }
            Err(e) => {
                tracing::debug!("cannot park a connection: {e}");
                Err(conn)
            }
        }
    }

    /// Takes the connections of `keys` out of the lot, and their sockets out of its set
    /// (outside the lock: they are ours now, open, and no longer reported to anyone).
    fn take(&self, keys: impl Iterator<Item = usize>, out: &mut Vec<Parked>) {
        let from = out.len();
        {
            let mut st = self.state();
            out.extend(keys.filter_map(|key| st.entries.try_remove(key).map(|e| e.conn)));
        }
        for conn in &out[from..] {
            let _ = self
                .registry
                .deregister(&mut SourceFd(&conn.stream.as_raw_fd()));
        }
    }

    /// Takes the connections past their deadline.
    fn expired(&self, now: u64, out: &mut Vec<Parked>) {
        let from = out.len();
        {
            let mut st = self.state();
            while let Some(&Reverse((deadline, parking, key))) = st.deadlines.peek() {
                if deadline > now {
                    break;
                }
                st.deadlines.pop();
                if st.entries.get(key).is_some_and(|e| e.parking == parking) {
                    out.push(st.entries.remove(key).conn);
                }
            }
        }
        for conn in &out[from..] {
            let _ = self
                .registry
                .deregister(&mut SourceFd(&conn.stream.as_raw_fd()));
        }
    }

    /// Shuts the lot: every parked connection is taken (to be closed), none parks again.
    fn close(&self) -> Vec<Parked> {
        let mut st = self.state();
        st.closed = true;
        st.deadlines.clear();
        st.entries.drain().map(|e| e.conn).collect()
    }

    /// Whether no connection is parked.
    #[cfg(test)]
    fn is_empty(&self) -> bool {
        self.state().entries.is_empty()
    }
}

/// The lot's thread: waits on the set (at most [`SWEEP_EVERY`] at a time), hands back the
/// connections whose sockets became readable, closes those past their deadline (the
/// earliest deadlines first, so a sweep costs what expires, not what is parked).
fn watch(
    lot: &Arc<Lot>,
    mut poll: Poll,
    shutdown: &tokio_util::sync::CancellationToken,
    resume: &impl Resume,
) {
    let mut events = Events::with_capacity(256);
    let mut out = Vec::new();
    let mut next_sweep = now_ms();
    while !shutdown.is_cancelled() {
        match poll.poll(&mut events, Some(SWEEP_EVERY)) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => {
                tracing::error!("parked connections cannot be watched: {e}");
                break;
            }
        }
        lot.take(events.iter().map(|e| e.token().0), &mut out);
        for conn in out.drain(..) {
            resume.resume(lot, conn);
        }
        let now = now_ms();
        if now >= next_sweep {
            next_sweep = now + SWEEP_EVERY.as_millis() as u64;
            // Dropped here: each socket closes.
            lot.expired(now, &mut out);
            out.clear();
        }
    }
    drop(lot.close());
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;
    use std::net::{SocketAddr, TcpListener};
    use std::sync::atomic::{AtomicUsize, Ordering};

    struct Count(Arc<AtomicUsize>, tokio::sync::mpsc::UnboundedSender<Parked>);

    impl Resume for Count {
        fn resume(&self, _: &Arc<Lot>, conn: Parked) {
            self.0.fetch_add(1, Ordering::Relaxed);
            let _ = self.1.send(conn);
        }
    }

    fn parked(l: &TcpListener, sem: &Arc<tokio::sync::Semaphore>) -> (Parked, StdTcpStream) {
        let client = StdTcpStream::connect(l.local_addr().unwrap()).unwrap();
        let (server, remote) = l.accept().unwrap();
        server.set_nonblocking(true).unwrap();
        let local: SocketAddr = server.local_addr().unwrap();
        let gauge = prometheus::IntGauge::new("t", "t").unwrap();
        let conn = Parked {
            guard: ConnGuard::new(gauge, sem.clone().try_acquire_owned().unwrap()),
            stream: server,
            info: Arc::new(ConnInfo::new(remote, local, None)),
            idle_since: now_ms(),
        };
        (conn, client)
    }

    async fn recv(rx: &mut tokio::sync::mpsc::UnboundedReceiver<Parked>) -> Parked {
        tokio::time::timeout(Duration::from_secs(5), rx.recv())
            .await
            .expect("handed back within 5 s")
            .unwrap()
    }

    #[tokio::test]
    async fn wakes_on_bytes_closes_at_deadline_and_at_shutdown() {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let sem = Arc::new(tokio::sync::Semaphore::new(8));
        let shutdown = tokio_util::sync::CancellationToken::new();
        let woken = Arc::new(AtomicUsize::new(0));
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
        let lot = Lot::start(shutdown.clone(), Count(woken.clone(), tx)).unwrap();

        // Bytes already waiting when it parks, and bytes that come later.
        let (a, mut ca) = parked(&l, &sem);
        ca.write_all(b"GET").unwrap();
        std::thread::sleep(Duration::from_millis(20));
        assert!(lot.park(a, Duration::from_secs(30)).is_ok());
        let (b, mut cb) = parked(&l, &sem);
        assert!(lot.park(b, Duration::from_secs(30)).is_ok());
        let back = recv(&mut rx).await;
        assert_eq!(back.info.remote, ca.local_addr().unwrap());
        assert_eq!(lot.state().entries.len(), 1);
        cb.write_all(b"GET").unwrap();
        let back2 = recv(&mut rx).await;
        assert_eq!(back2.info.remote, cb.local_addr().unwrap());
        assert!(lot.is_empty());
        assert_eq!(
            sem.available_permits(),
            6,
            "resumed connections keep their slot"
        );
        drop((back, back2));
        assert_eq!(sem.available_permits(), 8);

        // Past its budget: closed, slot given back, not resumed.
        let (c, mut cc) = parked(&l, &sem);
        assert!(lot.park(c, Duration::from_millis(50)).is_ok());
        cc.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let mut buf = [0u8; 8];
        let t = std::time::Instant::now();
        let n = tokio::task::spawn_blocking(move || std::io::Read::read(&mut cc, &mut buf))
            .await
            .unwrap();
        assert_eq!(n.unwrap(), 0, "closed");
        assert!(t.elapsed() < Duration::from_secs(2));
        assert!(lot.is_empty());
        assert_eq!(sem.available_permits(), 8);

        // Shutdown closes what is parked and refuses more.
        let (d, _cd) = parked(&l, &sem);
        assert!(lot.park(d, Duration::from_secs(30)).is_ok());
        shutdown.cancel();
        let t = std::time::Instant::now();
        while sem.available_permits() < 8 && t.elapsed() < Duration::from_secs(5) {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert!(lot.is_empty());
        assert_eq!(sem.available_permits(), 8);
        let (e, _ce) = parked(&l, &sem);
        assert!(lot.park(e, Duration::from_secs(30)).is_err());
        assert_eq!(woken.load(Ordering::Relaxed), 2);
    }

    #[tokio::test]
    async fn deadlines_of_connections_that_left_do_not_pile_up() {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let sem = Arc::new(tokio::sync::Semaphore::new(8));
        let shutdown = tokio_util::sync::CancellationToken::new();
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
        let lot = Lot::start(shutdown.clone(), Count(Arc::new(AtomicUsize::new(0)), tx)).unwrap();
        let (mut conn, mut client) = parked(&l, &sem);
        // One client parks and comes back 3,000 times, each time with a minute to go.
        for _ in 0..3000 {
            assert!(lot.park(conn, Duration::from_secs(60)).is_ok());
            client.write_all(b"x").unwrap();
            conn = recv(&mut rx).await;
            let mut buf = [0u8; 8];
            let _ = std::io::Read::read(&mut &conn.stream, &mut buf);
        }
        let heap = lot.state().deadlines.len();
        assert!(heap <= 1024 + 2, "{heap} deadlines kept for one connection");
        shutdown.cancel();
    }
}
