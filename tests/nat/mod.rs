//! Helpers for `tests/nat_call.rs`: a throw-away network of namespaces with two symmetric NATs,
//! processes and threads placed inside it (`netns`), and a WebRTC peer driven through the
//! example signaling server (`peer`).

/// `eprintln!` straight to the process's stderr, past libtest's output capture: the NAT test's
/// measurements and a skip notice must show in CI logs even when the test passes.
macro_rules! say {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        let _ = writeln!(std::io::stderr().lock(), $($arg)*);
    }};
}

pub mod netns;
pub mod peer;
