//! Handing freed memory back to the kernel once idle connections have parked.
//!
//! When thousands of kept-alive clients go quiet together, their connections park and free
//! their HTTP server state, and then nothing allocates. An allocator that returns memory
//! lazily (mimalloc purges freed pages only after a delay, and only when it runs again)
//! would keep all of it resident. Purging at once on every free costs throughput instead
//! (HTTP/2 frees and refaults pages all the time: −18% req/s measured). So the binary
//! registers a trim function, and it runs once connections have parked.
//!
//! Trims wait until connections have stopped parking: under steady traffic freed memory
//! is soon used again, and a trim that purges it costs refaults and stalls the thread.
//! [`trim_after_parking`] sees the parkings stop and asks for a trim. A trim can only
//! collect the heap of the thread it runs on (mimalloc's pages belong to the thread that
//! allocated them, and a connection's task may have moved between threads), so every
//! runtime thread answers the request itself as it goes idle ([`before_idle`], the
//! runtime's `on_thread_park` hook); the task wakes idle threads for a few rounds so that
//! each of them does.

use std::cell::Cell;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::OnceLock;
use std::time::Duration;

use tokio_util::sync::CancellationToken;

/// How often [`trim_after_parking`] looks at the parkings.
pub const TRIM_EVERY: Duration = Duration::from_millis(250);

static TRIM: OnceLock<fn()> = OnceLock::new();

/// Counts parkings.
static PARKINGS: AtomicU64 = AtomicU64::new(0);

/// The parkings count at the last trim request: a thread that has not trimmed since it
/// changed owes a trim.
static REQUESTED: AtomicU64 = AtomicU64::new(0);

/// Rounds of waking idle threads after a trim request.
const ROUNDS: u32 = 3;

thread_local! {
    /// [`REQUESTED`] as of this thread's last trim.
    static SEEN: Cell<u64> = const { Cell::new(0) };
}

/// Sets the function that returns the allocator's free memory to the kernel (the binary
/// knows its allocator). Without one, nothing is trimmed.
pub fn set_trim(f: fn()) {
    let _ = TRIM.set(f);
}

/// A connection has parked and freed its server state.
pub fn parked() {
    PARKINGS.fetch_add(1, Ordering::Relaxed);
}

/// For the runtime's `on_thread_park` hook: trims this thread's heap if a trim was asked
/// for since its last one. An atomic load and a compare otherwise.
pub fn before_idle() {
    let requested = REQUESTED.load(Ordering::Relaxed);
    if requested != SEEN.get() {
        SEEN.set(requested);
        if let Some(trim) = TRIM.get() {
            trim();
        }
    }
}

/// Until shutdown: every [`TRIM_EVERY`], if connections parked before the last look and
/// none since, asks every thread for a trim, trims this one, and for `ROUNDS` rounds
/// wakes the others (a few no-op tasks make idle runtime threads look for work; they run
/// [`before_idle`] as they go idle again).
pub async fn trim_after_parking(shutdown: CancellationToken) {
    if TRIM.get().is_none() {
        return;
    }
    let workers = tokio::runtime::Handle::current().metrics().num_workers();
    let mut tick = tokio::time::interval(TRIM_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let (mut last, mut rounds) = (0, 0);
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tick.tick() => {}
        }
        let parkings = PARKINGS.load(Ordering::Relaxed);
        if parkings != last {
            // Still parking: wait for a quiet look.
            last = parkings;
            continue;
        }
        if parkings != REQUESTED.load(Ordering::Relaxed) {
            REQUESTED.store(parkings, Ordering::Relaxed);
            rounds = ROUNDS;
            before_idle();
        }
        if rounds == 0 {
            continue;
        }
        rounds -= 1;
        // A spawn that finds the LIFO slot taken notifies an idle thread: `workers` of
        // them wake up to `workers - 1` threads.
        if workers > 1 {
            for _ in 0..workers {
                tokio::spawn(async {});
            }
        }
    }
}
