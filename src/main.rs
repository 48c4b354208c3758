//! The `fpmgate` binary: argument parsing and exit codes only.

use clap::Parser;
use fpmgate::cli::{Cli, Command};

#[cfg(feature = "mimalloc")]
#[global_allocator]
static GLOBAL: MiMalloc = MiMalloc;

/// mimalloc, asked for an alignment only when a type needs more than every block has.
///
/// The `mimalloc` crate's allocator passes every layout to `mi_malloc_aligned`, and that is
/// a fast path only for blocks up to 1 KiB whose next free block happens to be aligned;
/// anything larger (each request's future, read buffers) took the generic aligned path:
/// about 570 instructions for the 4.5 KiB box of a request's future. Every mimalloc block
/// is aligned to at least a word (its size classes are multiples of 8 bytes), so up to
/// that alignment the plain calls are exact. Measured with callgrind on fast-h1
/// (instructions per request in user space): 27.3k through the crate's allocator, 26.6k
/// with these calls, 26.1k with these calls on mimalloc 2 (Cargo.toml says why that one).
#[cfg(feature = "mimalloc")]
struct MiMalloc;

#[cfg(feature = "mimalloc")]
const WORD: usize = std::mem::size_of::<usize>();

// SAFETY: each method hands the layout to the mimalloc call with the same contract (size,
// and alignment whenever it exceeds the word every block is aligned to); blocks from any
// of them are freed by `mi_free`, which takes blocks of every mimalloc allocation call.
#[cfg(feature = "mimalloc")]
unsafe impl std::alloc::GlobalAlloc for MiMalloc {
    #[inline]
    unsafe fn alloc(&self, layout: std::alloc::Layout) -> *mut u8 {
        use libmimalloc_sys as mi;
        if layout.align() <= WORD {
            // SAFETY: see the impl.
            unsafe { mi::mi_malloc(layout.size()).cast() }
        } else {
            // SAFETY: see the impl.
            unsafe { mi::mi_malloc_aligned(layout.size(), layout.align()).cast() }
        }
    }

    #[inline]
    unsafe fn alloc_zeroed(&self, layout: std::alloc::Layout) -> *mut u8 {
        use libmimalloc_sys as mi;
        if layout.align() <= WORD {
            // SAFETY: see the impl.
            unsafe { mi::mi_zalloc(layout.size()).cast() }
        } else {
            // SAFETY: see the impl.
            unsafe { mi::mi_zalloc_aligned(layout.size(), layout.align()).cast() }
        }
    }

    #[inline]
    unsafe fn dealloc(&self, ptr: *mut u8, _layout: std::alloc::Layout) {
        // SAFETY: `ptr` came from one of the calls above.
        unsafe { libmimalloc_sys::mi_free(ptr.cast()) }
    }

    #[inline]
    unsafe fn realloc(&self, ptr: *mut u8, layout: std::alloc::Layout, new_size: usize) -> *mut u8 {
        use libmimalloc_sys as mi;
        if layout.align() <= WORD {
            // SAFETY: see the impl; `ptr` came from one of the calls above.
            unsafe { mi::mi_realloc(ptr.cast(), new_size).cast() }
        } else {
            // SAFETY: see the impl; `ptr` came from one of the calls above.
            unsafe { mi::mi_realloc_aligned(ptr.cast(), new_size, layout.align()).cast() }
        }
    }
}

/// Lets the proxy give freed memory back to the kernel after idle connections park (see
/// `fpmgate::memory`): a forced collect purges mimalloc's free pages at once.
#[cfg(feature = "mimalloc")]
fn tune_allocator() {
    fpmgate::memory::set_trim(|| {
        // SAFETY: takes no pointers; collects this thread's heap and purges free memory.
        unsafe { libmimalloc_sys::mi_collect(true) }
    });
}

#[cfg(not(feature = "mimalloc"))]
fn tune_allocator() {}

/// No transparent huge pages for this process. mimalloc asks for them on its arenas, and
/// the kernel's khugepaged then collapses a mostly idle 2 MiB region into one resident
/// huge page at a moment of its choosing: an idle proxy's RSS jumps by 2-6 MiB some
/// seconds after its clients went quiet, and purged memory comes back. The heap of a
/// proxy is small and gains nothing: in an A/B of three rounds each, CPU per request was
/// the same with and without (fast-h1 0.130 vs 0.129 s per 10k, fast-h2 0.116 vs 0.117),
/// peak RSS 17 vs 23 MiB (h1) and 23 vs 32 MiB (h2).
#[cfg(target_os = "linux")]
fn no_huge_pages() {
    // SAFETY: PR_SET_THP_DISABLE takes integers only and changes no memory.
    let r = unsafe { libc::prctl(libc::PR_SET_THP_DISABLE, 1, 0, 0, 0) };
    if r != 0 {
        eprintln!(
            "fpmgate: cannot disable transparent huge pages: {}",
            std::io::Error::last_os_error()
        );
    }
}

#[cfg(not(target_os = "linux"))]
fn no_huge_pages() {}

fn main() {
    no_huge_pages();
    tune_allocator();
    let cli = Cli::parse();
    let code = match (cli.command, cli.config) {
        (Some(Command::Check { config }), _) => match fpmgate::app::load_config(&config) {
            Ok(cfg) => {
                for w in fpmgate::app::config_warnings(&cfg) {
                    eprintln!("{}: warning: {w}", config.display());
                }
                println!("{}: {}", config.display(), cfg.summary());
                0
            }
            Err(errors) => {
                eprint!("{errors}");
                1
            }
        },
        (Some(Command::Run { config }), _) | (None, Some(config)) => {
            fpmgate::telemetry::init();
            match fpmgate::app::run(config) {
                Ok(()) => 0,
                Err(e) => {
                    eprintln!("fpmgate: {e:#}");
                    1
                }
            }
        }
        (None, None) => {
            eprintln!("fpmgate: missing --config PATH (try `fpmgate --help`)");
            2
        }
    };
    std::process::exit(code);
}
