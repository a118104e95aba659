//! The dispatch fuzz target's property (see `fuzz/harness.rs`), as a proptest that CI
//! runs: arbitrary request streams on a logged-in connection each get exactly one
//! answer per request, never INTERNAL, never a malformed frame, and the server keeps
//! serving.

#[path = "../fuzz/harness.rs"]
mod harness;

use proptest::prelude::*;
use proptest::test_runner::{Config, TestCaseError, TestRunner};

#[test]
fn arbitrary_requests_are_answered_one_to_one_and_never_internal() {
    let h = harness::Harness::new();
    let mut runner = TestRunner::new(Config {
        cases: 300,
        failure_persistence: None,
        ..Config::default()
    });
    runner
        .run(&proptest::collection::vec(any::<u8>(), 0..700), |input| {
            h.run(&input).map_err(TestCaseError::fail)
        })
        .unwrap();
}

/// The generator reaches deep: most requests of a long input decode as protobuf and
/// name commands the server serves (not just BAD_REQUEST for garbage).
#[test]
fn the_generator_builds_real_requests() {
    let commands: Vec<u16> = (0..=u16::MAX)
        .filter(|id| mychat_proto::Command::from_id(*id).is_some())
        .collect();
    let input: Vec<u8> = (0..4000u32)
        .map(|i| (i.wrapping_mul(2654435761) >> 13) as u8)
        .collect();
    let reqs = harness::requests(&commands, &input);
    assert_eq!(reqs.len(), 64);
    let served = reqs
        .iter()
        .filter(|(c, _)| mychat_proto::Command::from_id(*c).is_some())
        .count();
    assert!(served > 48, "{served} of 64 name a command");
}
