#![no_main]
//! Message::parse, the attribute walk, integrity, rebuild with MessageWriter: `turnpike::fuzzing::check_stun_message`.

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| turnpike::fuzzing::check_stun_message(data));
