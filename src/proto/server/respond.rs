//! The one exit every answer leaves by: success bodies, error responses from a [`TurnError`]
//! (REALM and a fresh NONCE for 401/438, UNKNOWN-ATTRIBUTES for 420), the optional SOFTWARE,
//! integrity matching the request's, and FINGERPRINT when the request had one. Unsigned errors
//! are rate limited per source: they are what a spoofed source could aim at a victim.

use std::time::Instant;

use super::{ClientAction, Core};
use crate::proto::auth::{LongTermKey, PasswordAlgorithm};
use crate::proto::codec::{attr, Class, Message, MessageWriter};
use crate::proto::error::TurnError;
use crate::proto::FiveTuple;

/// The password algorithms PASSWORD-ALGORITHMS offers (RFC 8489 §9.2.4).
pub(super) const ALGORITHMS: [PasswordAlgorithm; 2] =
    [PasswordAlgorithm::Md5, PasswordAlgorithm::Sha256];

/// PASSWORD-ALGORITHMS as we send it (and as a client must echo it back).
pub(super) fn password_algorithms_value() -> [u8; 8] {
    let mut v = [0u8; 8];
    for (i, a) in ALGORITHMS.iter().enumerate() {
        v[i * 4..i * 4 + 2].copy_from_slice(&a.code().to_be_bytes());
    }
    v
}

/// What an answer needs to know of its request, kept apart from the request's bytes so an
/// answer can be written after they are gone (an Allocate waiting for its relay sockets).
#[derive(Clone, Copy, Debug)]
pub(super) struct Answer {
    pub(super) method: u16,
    pub(super) txid: [u8; 12],
    pub(super) fingerprint: bool,
}

impl Answer {
    pub(super) fn to(msg: &Message) -> Self {
        Answer {
            method: msg.method,
            txid: msg.transaction_id(),
            fingerprint: msg.has_fingerprint(),
        }
    }
}

/// How a response is protected: with the key and integrity attribute the request was checked with.
#[derive(Clone, Copy)]
pub(super) struct Signer {
    pub(super) key: LongTermKey,
    pub(super) sha256: bool,
}

/// A TURN method's success, written by [`Core::succeed`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Success {
    /// A success response with no attributes of its own (CreatePermission, ChannelBind).
    Plain,
    /// Refresh: the lifetime granted.
    Refresh { lifetime_secs: u32 },
    /// Allocate: written once the I/O layer has opened the relay sockets.
    Pending,
}

impl Core {
    /// Answers `err`. Without a signer the answer is unauthenticated and rate limited per source,
    /// so it may be dropped instead.
    pub(super) fn refuse(
        &mut self,
        now: Instant,
        ft: &FiveTuple,
        answer: &Answer,
        err: TurnError,
        signer: Option<&Signer>,
        reply: &mut Vec<u8>,
    ) -> ClientAction {
        if signer.is_none() && !self.shared.limiter.allow(ft.client.ip(), now) {
            self.stats.rate_limited += 1;
            return ClientAction::Drop;
        }
        let mut w = MessageWriter::new(reply, answer.method, Class::Error, answer.txid);
        w.error_code(err.code(), err.reason());
        match err {
            TurnError::UnknownAttributes(unknown) => {
                let mut list = [0u8; 2 * crate::proto::error::MAX_UNKNOWN];
                for (i, t) in unknown.as_slice().iter().enumerate() {
                    list[i * 2..i * 2 + 2].copy_from_slice(&t.to_be_bytes());
                }
                w.attr(
                    attr::UNKNOWN_ATTRIBUTES,
                    &list[..unknown.as_slice().len() * 2],
                );
            }
            e if e.is_challenge() => {
                let unix = self.shared.unix_time(now);
                let nonce = self
                    .shared
                    .nonces
                    .issue(unix, ft.transport.tag(), &ft.client);
                w.attr(attr::REALM, self.config.auth.realm().as_bytes())
                    .attr(attr::NONCE, nonce.as_bytes())
                    .attr(attr::PASSWORD_ALGORITHMS, &password_algorithms_value());
            }
            _ => {}
        }
        self.finish(&mut w, answer, signer);
        ClientAction::Reply { to: *ft }
    }

    /// Writes a TURN method's success (Allocate's excepted, see `allocate`).
    pub(super) fn succeed(
        &self,
        reply: &mut Vec<u8>,
        answer: &Answer,
        signer: &Signer,
        success: Success,
    ) {
        let mut w = MessageWriter::new(reply, answer.method, Class::Success, answer.txid);
        if let Success::Refresh { lifetime_secs } = success {
            w.u32_attr(attr::LIFETIME, lifetime_secs);
        }
        self.finish(&mut w, answer, Some(signer));
    }

    /// SOFTWARE (if configured), integrity matching the request's, FINGERPRINT if the request had one.
    pub(super) fn finish(&self, w: &mut MessageWriter, answer: &Answer, signer: Option<&Signer>) {
        if let Some(s) = &self.config.software {
            w.attr(attr::SOFTWARE, s.as_bytes());
        }
        if let Some(s) = signer {
            if s.sha256 {
                w.integrity_sha256(s.key.as_bytes());
            } else {
                w.integrity(s.key.as_bytes());
            }
        }
        if answer.fingerprint {
            w.fingerprint();
        }
    }
}
