#![no_main]
//! One raw client datagram (then peer payload) against a core holding an allocation, a permission and a channel: `turnpike::fuzzing::run_datagram`.

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| turnpike::fuzzing::run_datagram(data));
