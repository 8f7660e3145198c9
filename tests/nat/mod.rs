//! Helpers for `tests/nat_call.rs`: a throw-away network of namespaces with two symmetric NATs,
//! processes and threads placed inside it (`netns`), and a WebRTC peer driven through the
//! example signaling server (`peer`).

// `netns` defines `say!` (stderr past libtest's capture), for the modules after it and for
// the test that declares `#[macro_use] mod nat;`.
#[macro_use]
pub mod netns;
pub mod peer;
