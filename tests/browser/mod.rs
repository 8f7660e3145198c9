//! Support for the headless browser tests: finding and launching Chromium
//! (`chromium`) and driving its pages over the Chrome DevTools Protocol
//! (`cdp`). No Node, no npm: the protocol is JSON over one WebSocket.

pub mod cdp;
pub mod chromium;
