//! Fuzz target: bytes → well-framed requests on a logged-in connection → router →
//! handlers → the embedded store (a real server in a temporary directory). The
//! property (see `../harness.rs`): one answer per request with its seq and command,
//! never INTERNAL, never a malformed frame, and the server keeps serving.
//!
//! Run: `RUSTC_BOOTSTRAP=1 cargo fuzz run dispatch -- -detect_leaks=0` from `fuzz/`.
//! Leak detection is off because it reports a false leak here: after a connection has
//! written all it had, its outbound `BytesMut` reaches its allocation only through a
//! pointer one past the end (bytes keeps the offset apart), which LeakSanitizer does
//! not count as a reference. The buffer is reused by the next write and freed with the
//! connection; a leak check per input also means little against a server whose threads
//! outlive every input.
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
