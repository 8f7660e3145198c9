#![no_main]
//! Sequences of signed requests with mutated attributes, relayed data, peer datagrams, time and
//! admin calls against the core, checked against a model: `turnpike::fuzzing::run_ops`.

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    turnpike::fuzzing::run_ops(data);
});
