//! A minimal HTTP/1.1 client for `turnpike sessions`: one request per connection to the daemon's
//! own API (normally on localhost), so no HTTP client crate is needed.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::Duration;

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("cannot reach the API at {addr}: {source}")]
    Connect {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("API I/O error: {0}")]
    Io(#[from] std::io::Error),
    #[error("malformed HTTP response from the API")]
    Malformed,
    /// A method, path or header value that would change the request's framing (CR, LF or another
    /// control character, a space in the path): refused before anything is sent.
    #[error("refusing to send the request: {what} {reason}")]
    Invalid { what: &'static str, reason: String },
}

/// HTTP method: a non-empty run of ASCII letters (GET, POST, DELETE).
fn check_method(method: &str) -> Result<(), ClientError> {
    if method.is_empty() || !method.bytes().all(|b| b.is_ascii_alphabetic()) {
        return Err(ClientError::Invalid {
            what: "method",
            reason: format!("{method:?} is not a run of ASCII letters"),
        });
    }
    Ok(())
}

/// Request target: origin form, visible ASCII only (no space, no control character, no
/// non-ASCII byte: a caller percent-encodes those).
fn check_path(path: &str) -> Result<(), ClientError> {
    if !path.starts_with('/') {
        return Err(ClientError::Invalid {
            what: "path",
            reason: format!("{path:?} does not start with '/'"),
        });
    }
    if let Some(b) = path.bytes().find(|b| !b.is_ascii_graphic()) {
        return Err(ClientError::Invalid {
            what: "path",
            reason: format!("{path:?} contains the byte 0x{b:02x} (a space, control character or non-ASCII byte)"),
        });
    }
    Ok(())
}

/// Header value: printable ASCII and spaces, so it cannot end the header line. The value is not
/// echoed (it may be the bearer token).
fn check_header_value(what: &'static str, value: &str) -> Result<(), ClientError> {
    if let Some(b) = value
        .bytes()
        .find(|&b| !(b == b' ' || b.is_ascii_graphic()))
    {
        return Err(ClientError::Invalid {
            what,
            reason: format!("contains the byte 0x{b:02x} (a control character or non-ASCII byte)"),
        });
    }
    Ok(())
}

/// Sends one request and returns (status, body).
pub fn request(
    addr: SocketAddr,
    method: &str,
    path: &str,
    token: Option<&str>,
    body: Option<&str>,
) -> Result<(u16, String), ClientError> {
    check_method(method)?;
    check_path(path)?;
    if let Some(t) = token {
        check_header_value("the bearer token", t)?;
    }
    let mut stream = TcpStream::connect_timeout(&addr, Duration::from_secs(5))
        .map_err(|source| ClientError::Connect { addr, source })?;
    stream.set_read_timeout(Some(Duration::from_secs(10)))?;
    let mut req = format!("{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n");
    if let Some(t) = token {
        req.push_str(&format!("Authorization: Bearer {t}\r\n"));
    }
    let body = body.unwrap_or("");
    if !body.is_empty() {
        req.push_str("Content-Type: application/json\r\n");
    }
    req.push_str(&format!("Content-Length: {}\r\n\r\n{body}", body.len()));
    stream.write_all(req.as_bytes())?;
    let mut raw = Vec::new();
    stream.read_to_end(&mut raw)?;
    parse_response(&raw)
}

fn parse_response(raw: &[u8]) -> Result<(u16, String), ClientError> {
    let text = String::from_utf8_lossy(raw);
    let (head, body) = text.split_once("\r\n\r\n").ok_or(ClientError::Malformed)?;
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or(ClientError::Malformed)?;
    let chunked = head.lines().any(|l| {
        l.to_ascii_lowercase().starts_with("transfer-encoding:")
            && l.to_ascii_lowercase().contains("chunked")
    });
    let body = if chunked {
        dechunk(body)?
    } else {
        body.to_owned()
    };
    Ok((status, body))
}

fn dechunk(mut s: &str) -> Result<String, ClientError> {
    let mut out = String::new();
    loop {
        let (size, rest) = s.split_once("\r\n").ok_or(ClientError::Malformed)?;
        let size = usize::from_str_radix(size.split(';').next().unwrap_or("").trim(), 16)
            .map_err(|_| ClientError::Malformed)?;
        if size == 0 {
            return Ok(out);
        }
        let chunk = rest.get(..size).ok_or(ClientError::Malformed)?;
        out.push_str(chunk);
        s = rest.get(size + 2..).ok_or(ClientError::Malformed)?;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refuses_request_smuggling_before_connecting() {
        // A listener that records whether anyone connected.
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        listener.set_nonblocking(true).unwrap();
        let addr = listener.local_addr().unwrap();
        let smuggle =
            "/api/v1/sessions/0-1-2 HTTP/1.1\r\nHost: x\r\n\r\nDELETE /api/v1/sessions/0-0-0";
        let cases: [(&str, &str, Option<&str>, &str); 9] = [
            ("DELETE", smuggle, None, "path"),
            ("DELETE", "/api/v1/sessions/1-2-3\n", None, "path"),
            ("DELETE", "/api/v1/sessions/1 2 3", None, "path"),
            ("DELETE", "/api/v1/sessions/\u{e9}", None, "path"),
            ("GET", "api/v1/sessions", None, "path"),
            ("GET /x HTTP/1.1\r\n", "/", None, "method"),
            ("", "/", None, "method"),
            ("GET", "/", Some("token\r\nX-Evil: 1"), "token"),
            ("GET", "/", Some("tok\u{7f}en"), "token"),
        ];
        for (method, path, token, what) in cases {
            let e = request(addr, method, path, token, None).unwrap_err();
            let ClientError::Invalid { what: w, .. } = &e else {
                panic!("{method:?} {path:?}: expected Invalid, got {e:?}");
            };
            assert!(w.contains(what), "{method:?} {path:?}: {e}");
            let text = e.to_string();
            assert!(!text.contains('\r') && !text.contains('\n'), "{text}");
            assert!(!text.contains("X-Evil"), "the token is not echoed: {text}");
        }
        assert!(
            listener.accept().is_err(),
            "nothing may reach the API when a request is refused"
        );
    }

    #[test]
    fn parses_plain_and_chunked_responses() {
        let plain = b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\n{}";
        assert_eq!(parse_response(plain).unwrap(), (200, "{}".into()));
        let chunked = b"HTTP/1.1 404 Not Found\r\ntransfer-encoding: chunked\r\n\r\n3\r\nabc\r\n2\r\nde\r\n0\r\n\r\n";
        assert_eq!(parse_response(chunked).unwrap(), (404, "abcde".into()));
        assert!(parse_response(b"garbage").is_err());
        assert!(
            parse_response(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\nzz\r\n").is_err()
        );
    }
}
