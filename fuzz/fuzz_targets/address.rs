#![no_main]
//! XOR and plain address decoding, written back and round-tripped: `turnpike::fuzzing::check_address`.

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| turnpike::fuzzing::check_address(data));
