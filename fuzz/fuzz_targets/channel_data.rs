#![no_main]
//! ChannelData parsing, ChannelData and Data indication framing in place: `turnpike::fuzzing::check_channel_data`.

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| turnpike::fuzzing::check_channel_data(data));
