//! Properties checked on arbitrary input, shared by the cargo-fuzz targets
//! under `fuzz/` and by `tests/fuzz_regressions.rs`, which replays saved
//! inputs through the very same code on stable Rust.
//!
//! Each entry point takes raw fuzzer bytes, carves them into the arguments
//! it needs without any other crate (so the regression test needs no extra
//! dev-dependency), and panics with a message naming the broken property.
//! A panic inside fpmgate itself is a finding too: every function exercised
//! here documents that it never panics on input.

// Each fuzz target uses only one entry point of this module.
#![allow(dead_code, unused_imports)]

mod codec;
mod mapping;

pub use codec::{cgi_head, fastcgi_decode};
pub use mapping::request_mapping;

/// Reads the fuzzer's bytes front to back; running out yields zeros, so
/// every input, even an empty one, maps to some arguments.
struct Cursor<'a>(&'a [u8]);

impl<'a> Cursor<'a> {
    fn byte(&mut self) -> u8 {
        match self.0.split_first() {
            Some((&b, rest)) => {
                self.0 = rest;
                b
            }
            None => 0,
        }
    }

    fn array<const N: usize>(&mut self) -> [u8; N] {
        let mut out = [0; N];
        for b in &mut out {
            *b = self.byte();
        }
        out
    }

    /// A count byte (mod 16) then that many piece lengths; what is left is
    /// the stream, cut into those pieces with whatever remains as the last.
    /// Returns the stream and the piece lengths (summing to its length).
    fn split_stream(mut self) -> (&'a [u8], Vec<usize>) {
        let count = self.byte() % 16;
        let wanted: Vec<usize> = (0..count).map(|_| usize::from(self.byte())).collect();
        let stream = self.0;
        let mut left = stream.len();
        let mut cuts = Vec::with_capacity(wanted.len() + 1);
        for len in wanted {
            let len = len.min(left);
            cuts.push(len);
            left -= len;
        }
        cuts.push(left);
        (stream, cuts)
    }
}
