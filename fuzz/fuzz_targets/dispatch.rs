//! Fuzz target: bytes → well-framed requests on a logged-in connection → router →
//! handlers → the embedded store (a real server in a temporary directory). The
//! property (see `../harness.rs`): one answer per request with its seq and command,
//! never INTERNAL, never a malformed frame, and the server keeps serving.
//!
//! Run: `RUSTC_BOOTSTRAP=1 cargo fuzz run dispatch` from `fuzz/`.
#![no_main]

#[path = "../harness.rs"]
mod harness;

use libfuzzer_sys::fuzz_target;
use std::sync::OnceLock;

static H: OnceLock<harness::Harness> = OnceLock::new();

fuzz_target!(|data: &[u8]| {
    let h = H.get_or_init(harness::Harness::new);
    if let Err(e) = h.run(data) {
        panic!("property broken: {e}");
    }
});
