//! The long-term credential check (RFC 8489 §9.2.4) every TURN request passes before any state.

use std::sync::Arc;
use std::time::Instant;

use super::respond::{password_algorithms_value, Signer, ALGORITHMS};
use super::Core;
use crate::proto::auth::{AuthReject, NonceIssuer, NonceStatus, PasswordAlgorithm};
use crate::proto::codec::{attr, Message};
use crate::proto::error::TurnError;
use crate::proto::FiveTuple;

impl Core {
    /// The key a request's integrity was checked with, or why it was refused: 401 (challenge),
    /// 438 (stale nonce, challenge) or 400 (the credential attributes are malformed).
    pub(super) fn authenticate(
        &mut self,
        now: Instant,
        ft: &FiveTuple,
        msg: &Message,
    ) -> Result<Signer, TurnError> {
        let sha256 = msg.has_integrity_sha256();
        if !msg.has_integrity() && !sha256 {
            return Err(TurnError::Unauthenticated);
        }
        let username = msg.get(attr::USERNAME).map(|a| a.value);
        let realm = msg.get(attr::REALM);
        let nonce = msg.get(attr::NONCE);
        let (Some(username), Some(_), Some(nonce)) = (username, realm, nonce) else {
            return Err(TurnError::BadRequest);
        };
        let username = std::str::from_utf8(username).map_err(|_| TurnError::BadRequest)?;
        let unix = self.shared.unix_time(now);
        match self
            .shared
            .nonces
            .check(nonce.value, unix, ft.transport.tag(), &ft.client)
        {
            NonceStatus::Valid => {}
            NonceStatus::Stale | NonceStatus::Invalid => {
                self.stats.stale_nonces += 1;
                return Err(TurnError::StaleNonce);
            }
        }
        let algorithm = password_algorithm(msg, nonce.value).ok_or(TurnError::BadRequest)?;
        let config = Arc::clone(&self.config);
        let mut keys = std::mem::take(&mut self.keys);
        let verdict = config
            .auth
            .candidate_keys(username, algorithm, unix, &mut keys)
            .inspect_err(|why| {
                tracing::debug!(client = %ft.client, reason = %why, "credentials refused");
            })
            .and_then(|()| {
                keys.iter()
                    .copied()
                    .find(|k| {
                        if sha256 {
                            msg.verify_integrity_sha256(k.as_bytes())
                        } else {
                            msg.verify_integrity(k.as_bytes())
                        }
                    })
                    .ok_or_else(|| {
                        tracing::debug!(client = %ft.client, "message integrity check failed");
                        AuthReject::WrongPassword
                    })
            });
        self.keys = keys;
        verdict.map(|key| Signer { key, sha256 }).map_err(|why| {
            self.stats.auth_failures[why as usize] += 1;
            TurnError::Unauthenticated
        })
    }
}

/// PASSWORD-ALGORITHM negotiation (RFC 8489 §9.2.4): absent means MD5; when present it must come
/// with the PASSWORD-ALGORITHMS list we sent, unchanged (downgrade protection).
fn password_algorithm(msg: &Message, nonce: &[u8]) -> Option<PasswordAlgorithm> {
    let chosen = msg.get(attr::PASSWORD_ALGORITHM);
    let offered = msg.get(attr::PASSWORD_ALGORITHMS);
    match (chosen, offered) {
        (None, None) => Some(PasswordAlgorithm::Md5),
        (Some(c), Some(o)) if NonceIssuer::announces_password_algorithms(nonce) => {
            if o.value != password_algorithms_value() || c.value.len() < 4 {
                return None;
            }
            let code = u16::from_be_bytes([c.value[0], c.value[1]]);
            PasswordAlgorithm::from_code(code).filter(|a| ALGORITHMS.contains(a))
        }
        _ => None,
    }
}
