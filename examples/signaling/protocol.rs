//! Wire messages of the signaling WebSocket: JSON objects tagged by `"type"`.
//!
//! Client to server:
//!
//! ```text
//! {"type":"offer",     "to":"<peer id>", "sdp":"v=0..."}
//! {"type":"answer",    "to":"<peer id>", "sdp":"v=0..."}
//! {"type":"candidate", "to":"<peer id>", "candidate":{"candidate":"...","sdpMid":"0","sdpMLineIndex":0}}
//! {"type":"ping"}
//! {"type":"leave"}
//! ```
//!
//! Server to client: `welcome`, `peer-joined`, `peer-left`, the relayed
//! `offer` / `answer` / `candidate` (with `from` instead of `to`), `pong` and
//! `error` (`code` is stable, `message` is for humans).

use serde::{Deserialize, Serialize};

use crate::ice::IceResponse;

/// Largest text message the server accepts; larger ones close the socket.
pub const MAX_MESSAGE_BYTES: usize = 64 * 1024;

/// Message types a client may send, for telling "unknown type" apart from
/// "known type, bad fields".
const CLIENT_TYPES: &[&str] = &["offer", "answer", "candidate", "ping", "leave"];

#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(tag = "type", rename_all = "kebab-case")]
pub enum ClientMsg {
    Offer {
        to: String,
        sdp: String,
    },
    Answer {
        to: String,
        sdp: String,
    },
    Candidate {
        to: String,
        /// `null` = end of candidates.
        candidate: Option<IceCandidate>,
    },
    Ping,
    Leave,
}

/// `RTCIceCandidateInit`, as `RTCIceCandidate.toJSON()` writes it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct IceCandidate {
    pub candidate: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sdp_mid: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sdp_m_line_index: Option<u16>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub username_fragment: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct PeerInfo {
    pub id: String,
    pub name: String,
}

#[derive(Debug, Serialize)]
#[serde(
    tag = "type",
    rename_all = "kebab-case",
    rename_all_fields = "camelCase"
)]
pub enum ServerMsg<'a> {
    Welcome {
        id: &'a str,
        room: &'a str,
        name: &'a str,
        room_size: usize,
        /// Members already in the room, in join order.
        peers: Vec<PeerInfo>,
        /// Short-lived TURN credentials, same shape as `GET /api/ice`.
        ice: &'a IceResponse,
    },
    PeerJoined {
        peer: PeerInfo,
    },
    PeerLeft {
        id: &'a str,
    },
    Offer {
        from: &'a str,
        sdp: &'a str,
    },
    Answer {
        from: &'a str,
        sdp: &'a str,
    },
    Candidate {
        from: &'a str,
        candidate: Option<&'a IceCandidate>,
    },
    Pong,
    Error {
        code: ErrorCode,
        message: &'a str,
    },
}

impl ServerMsg<'_> {
    pub fn to_json(&self) -> String {
        serde_json::to_string(self).expect("server messages always serialize")
    }
}

/// Stable error codes sent in `{"type":"error","code":...}`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum ErrorCode {
    /// Not JSON at all.
    BadJson,
    /// JSON, but not an object with a string `type`, or bad fields.
    BadMessage,
    UnknownType,
    /// `to` names nobody in the sender's room (or the sender itself).
    UnknownPeer,
    BinaryUnsupported,
    RoomFull,
    TooManyRooms,
    ServerFull,
    TooLarge,
    RateLimited,
    /// The socket did not read its messages fast enough.
    TooSlow,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ParseError {
    pub code: ErrorCode,
    pub message: String,
}

/// Parses one text frame. Never panics, whatever the input.
pub fn parse_client(text: &str) -> Result<ClientMsg, ParseError> {
    let value: serde_json::Value = serde_json::from_str(text).map_err(|e| ParseError {
        code: ErrorCode::BadJson,
        message: format!("not JSON: {e}"),
    })?;
    let Some(kind) = value.get("type").and_then(|t| t.as_str()) else {
        return Err(ParseError {
            code: ErrorCode::BadMessage,
            message: "expected a JSON object with a string \"type\"".to_owned(),
        });
    };
    if !CLIENT_TYPES.contains(&kind) {
        return Err(ParseError {
            code: ErrorCode::UnknownType,
            message: format!(
                "unknown message type (expected one of: {})",
                CLIENT_TYPES.join(", ")
            ),
        });
    }
    serde_json::from_value(value).map_err(|e| ParseError {
        code: ErrorCode::BadMessage,
        message: format!("bad message: {e}"),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_client_messages() {
        assert_eq!(
            parse_client(r#"{"type":"offer","to":"a","sdp":"v=0"}"#),
            Ok(ClientMsg::Offer {
                to: "a".into(),
                sdp: "v=0".into()
            })
        );
        assert_eq!(parse_client(r#"{"type":"ping"}"#), Ok(ClientMsg::Ping));
        let c = parse_client(
            r#"{"type":"candidate","to":"b","candidate":{"candidate":"candidate:1 1 udp 1 1.2.3.4 5 typ relay","sdpMid":"0","sdpMLineIndex":0,"usernameFragment":null}}"#,
        )
        .unwrap();
        let ClientMsg::Candidate { to, candidate } = c else {
            panic!("not a candidate")
        };
        assert_eq!(to, "b");
        let candidate = candidate.unwrap();
        assert_eq!(candidate.sdp_m_line_index, Some(0));
        assert_eq!(candidate.username_fragment, None);
        assert_eq!(
            parse_client(r#"{"type":"candidate","to":"b","candidate":null}"#),
            Ok(ClientMsg::Candidate {
                to: "b".into(),
                candidate: None
            })
        );
    }

    #[test]
    fn classifies_bad_input() {
        let code = |s: &str| parse_client(s).unwrap_err().code;
        assert_eq!(code("not json"), ErrorCode::BadJson);
        assert_eq!(code(""), ErrorCode::BadJson);
        assert_eq!(code("[1,2]"), ErrorCode::BadMessage);
        assert_eq!(code(r#"{"type":5}"#), ErrorCode::BadMessage);
        assert_eq!(code(r#"{"type":"dance"}"#), ErrorCode::UnknownType);
        assert_eq!(code(r#"{"type":"offer","to":"a"}"#), ErrorCode::BadMessage);
        assert_eq!(
            code(r#"{"type":"offer","to":1,"sdp":""}"#),
            ErrorCode::BadMessage
        );
    }

    #[test]
    fn server_messages_are_camel_case_and_tagged() {
        let m = ServerMsg::PeerLeft { id: "x" }.to_json();
        assert_eq!(m, r#"{"type":"peer-left","id":"x"}"#);
        let e = ServerMsg::Error {
            code: ErrorCode::RoomFull,
            message: "full",
        }
        .to_json();
        assert_eq!(e, r#"{"type":"error","code":"room-full","message":"full"}"#);
        let c = IceCandidate {
            candidate: "c".into(),
            sdp_mid: Some("0".into()),
            sdp_m_line_index: Some(1),
            username_fragment: None,
        };
        let m = ServerMsg::Candidate {
            from: "a",
            candidate: Some(&c),
        }
        .to_json();
        assert_eq!(
            m,
            r#"{"type":"candidate","from":"a","candidate":{"candidate":"c","sdpMid":"0","sdpMLineIndex":1}}"#
        );
    }
}
