//! Handing freed memory back to the kernel once idle connections have parked.
//!
//! When thousands of kept-alive clients go quiet together, their connections park and free
//! their HTTP server state, and then nothing allocates. An allocator that returns memory
//! lazily (mimalloc purges freed pages only after a delay, and only when it runs again)
//! would keep all of it resident. Purging at once on every free costs throughput instead
//! (HTTP/2 frees and refaults pages all the time: −18% req/s measured). So the binary
//! registers a trim function and it runs only after connections parked, at most every
//! [`TRIM_EVERY`] per thread.
//!
//! A trim can only collect the heap of the thread it runs on (mimalloc's pages belong to
//! the thread that allocated them, and a connection's task may have moved between
//! threads), so after connections park every runtime thread trims itself as it goes idle
//! ([`before_idle`], the runtime's `on_thread_park` hook). [`trim_after_parking`] wakes
//! the threads that went idle too soon after their previous trim, for a few rounds after
//! the last connection parked.

use std::cell::Cell;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::OnceLock;
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use crate::pool::endpoint::now_ms;

/// How often a thread may trim while connections keep parking.
pub const TRIM_EVERY: Duration = Duration::from_millis(500);

static TRIM: OnceLock<fn()> = OnceLock::new();

/// Counts parkings: a thread that has not trimmed since the last one owes a trim.
static PARKINGS: AtomicU64 = AtomicU64::new(0);

/// Rounds of [`trim_after_parking`] after the last parking.
const ROUNDS: u32 = 3;

thread_local! {
    /// [`PARKINGS`] as of this thread's last trim.
    static SEEN: Cell<u64> = const { Cell::new(0) };
    /// When this thread last trimmed (ms on the process clock; 0 = never).
    static LAST_TRIM: Cell<u64> = const { Cell::new(0) };
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

/// For the runtime's `on_thread_park` hook: trims this thread's heap if connections parked
/// since its last trim and that was at least [`TRIM_EVERY`] ago. An atomic load and a
/// compare when nothing parked.
pub fn before_idle() {
    let parkings = PARKINGS.load(Ordering::Relaxed);
    if parkings != SEEN.get() {
        trim_here(parkings);
    }
}

fn trim_here(parkings: u64) {
    let Some(trim) = TRIM.get() else {
        return;
    };
    let now = now_ms();
    let last = LAST_TRIM.get();
    if parkings == SEEN.get()
        || (last != 0 && now.saturating_sub(last) < TRIM_EVERY.as_millis() as u64)
    {
        return;
    }
    SEEN.set(parkings);
    LAST_TRIM.set(now.max(1));
    trim();
}

/// Until shutdown: for [`ROUNDS`] rounds of [`TRIM_EVERY`] after connections parked,
/// trims this thread and wakes the others (a few no-op tasks make idle runtime threads
/// look for work; they run [`before_idle`] as they go idle again).
pub async fn trim_after_parking(shutdown: CancellationToken) {
    if TRIM.get().is_none() {
        return;
    }
    let workers = tokio::runtime::Handle::current().metrics().num_workers();
    let mut tick = tokio::time::interval(TRIM_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let (mut last, mut quiet) = (0, ROUNDS);
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tick.tick() => {}
        }
        let parkings = PARKINGS.load(Ordering::Relaxed);
        if parkings != last {
            (last, quiet) = (parkings, 0);
        } else if quiet >= ROUNDS {
            continue;
        }
        quiet += 1;
        trim_here(parkings);
        // A spawn that finds the LIFO slot taken notifies an idle thread: `workers` of
        // them wake up to `workers - 1` threads.
        if workers > 1 {
            for _ in 0..workers {
                tokio::spawn(async {});
            }
        }
    }
}
