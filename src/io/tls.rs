//! TURN over TLS (`turns:`, RFC 8656 §3.1 with RFC 7443's ALPN `stun.turn`): rustls with the
//! ring provider, driven without an async wrapper. The connection task reads ciphertext from the
//! socket and hands it here; plaintext comes back into the same frame buffer plain TCP uses, and
//! queued output is encrypted and written once per wake-up, as on plain TCP.
//!
//! The certificate sits behind a resolver that a reload swaps: new handshakes get the new one,
//! live connections keep the session they have.

use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};

use rustls::crypto::CryptoProvider;
use rustls::server::{Acceptor, ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use rustls::{ServerConfig, ServerConnection};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use tokio::net::TcpStream;

/// RFC 7443's ALPN identifier for TURN and STUN over TLS.
pub const ALPN_STUN_TURN: &[u8] = b"stun.turn";
/// The first byte of every TLS record a client opens with (a handshake record); no STUN message,
/// ChannelData or PROXY header starts with it.
pub const HANDSHAKE_RECORD: u8 = 0x16;
/// A certificate this close to its end gets a warning at check-config, start and reload.
pub const EXPIRY_WARNING_SECS: i64 = 14 * 86400;
/// Unsent ciphertext rustls may hold for a connection; our own queue in front of it is bounded
/// separately (`tcp::MAX_QUEUED`).
const TLS_BUFFER_LIMIT: usize = 64 * 1024;

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("{}: {source}", path.display())]
    Read { path: PathBuf, source: io::Error },
    #[error("{}: no PEM certificate in the file", path.display())]
    NoCertificate { path: PathBuf },
    #[error("{}: {reason}", path.display())]
    BadPem { path: PathBuf, reason: String },
    #[error("{}: no usable private key: {reason}", path.display())]
    BadKey { path: PathBuf, reason: String },
    #[error("the private key does not belong to the first certificate of the chain")]
    KeyMismatch,
    #[error("the first certificate of the chain cannot be parsed: {0}")]
    BadCertificate(String),
    #[error("the certificate expired at {not_after} (unix time); renew it")]
    Expired { not_after: i64 },
    #[error("the certificate is not valid before {not_before} (unix time); check the clock")]
    NotYetValid { not_before: i64 },
    #[error("TLS setup: {0}")]
    Setup(rustls::Error),
}

/// A loaded certificate chain and key, checked against each other, with what the operator
/// wants to hear about it.
#[derive(Debug, Clone)]
pub struct ServedCertificate {
    key: Arc<CertifiedKey>,
    /// Unix seconds.
    pub not_after: i64,
    /// The leaf's DNS names and IP addresses (subject alternative names).
    pub names: Vec<String>,
}

impl ServedCertificate {
    /// Reads a PEM chain (leaf first) and a PEM key (PKCS#8, PKCS#1 or SEC1), as Let's Encrypt's
    /// `fullchain.pem` and `privkey.pem`; refuses a pair that does not match, or a certificate
    /// outside its validity at `now_unix`.
    pub fn load(cert_path: &Path, key_path: &Path, now_unix: i64) -> Result<Self, TlsError> {
        let read = |path: &Path| {
            std::fs::read(path).map_err(|source| TlsError::Read {
                path: path.to_owned(),
                source,
            })
        };
        let (cert_pem, key_pem) = (read(cert_path)?, read(key_path)?);
        let chain = CertificateDer::pem_slice_iter(&cert_pem)
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| TlsError::BadPem {
                path: cert_path.to_owned(),
                reason: e.to_string(),
            })?;
        if chain.is_empty() {
            return Err(TlsError::NoCertificate {
                path: cert_path.to_owned(),
            });
        }
        let key = PrivateKeyDer::from_pem_slice(&key_pem).map_err(|e| TlsError::BadKey {
            path: key_path.to_owned(),
            reason: e.to_string(),
        })?;
        let (not_before, not_after, names) = leaf_facts(&chain[0])?;
        let certified = CertifiedKey::from_der(chain, key, &provider()).map_err(|e| match e {
            rustls::Error::InconsistentKeys(_) => TlsError::KeyMismatch,
            other => TlsError::BadKey {
                path: key_path.to_owned(),
                reason: other.to_string(),
            },
        })?;
        if now_unix > not_after {
            return Err(TlsError::Expired { not_after });
        }
        if now_unix < not_before {
            return Err(TlsError::NotYetValid { not_before });
        }
        Ok(ServedCertificate {
            key: Arc::new(certified),
            not_after,
            names,
        })
    }

    /// Seconds until the certificate expires (negative once it has).
    pub fn remaining_secs(&self, now_unix: i64) -> i64 {
        self.not_after - now_unix
    }
}

/// Validity and names of the leaf certificate.
fn leaf_facts(der: &CertificateDer<'_>) -> Result<(i64, i64, Vec<String>), TlsError> {
    use x509_parser::prelude::{FromDer, GeneralName, X509Certificate};
    let (_, cert) =
        X509Certificate::from_der(der).map_err(|e| TlsError::BadCertificate(e.to_string()))?;
    let validity = cert.validity();
    let mut names = Vec::new();
    if let Ok(Some(san)) = cert.subject_alternative_name() {
        for name in &san.value.general_names {
            match name {
                GeneralName::DNSName(dns) => names.push((*dns).to_owned()),
                GeneralName::IPAddress(bytes) => match bytes.len() {
                    4 => names.push(
                        std::net::Ipv4Addr::from(<[u8; 4]>::try_from(*bytes).unwrap_or_default())
                            .to_string(),
                    ),
                    16 => names.push(
                        std::net::Ipv6Addr::from(<[u8; 16]>::try_from(*bytes).unwrap_or_default())
                            .to_string(),
                    ),
                    _ => {}
                },
                _ => {}
            }
        }
    }
    Ok((
        validity.not_before.timestamp(),
        validity.not_after.timestamp(),
        names,
    ))
}

/// Whether a certificate name covers `host` (exact, or one `*.` label), ASCII case-insensitive.
pub fn name_covers(name: &str, host: &str) -> bool {
    let (name, host) = (name.to_ascii_lowercase(), host.to_ascii_lowercase());
    let host = host.trim_end_matches('.');
    match name.strip_prefix("*.") {
        Some(suffix) => host
            .split_once('.')
            .is_some_and(|(label, rest)| !label.is_empty() && rest == suffix),
        None => name == host,
    }
}

fn provider() -> CryptoProvider {
    rustls::crypto::ring::default_provider()
}

/// The current certificate, for every handshake.
#[derive(Debug)]
struct Resolver(RwLock<Arc<CertifiedKey>>);

impl ResolvesServerCert for Resolver {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        // SNI is not matched: one certificate serves the daemon, whatever name the client used.
        Some(Arc::clone(
            &self.0.read().unwrap_or_else(|e| e.into_inner()),
        ))
    }
}

/// What every TLS listener of the daemon serves, shared by all shards.
#[derive(Debug)]
pub struct TlsContext {
    resolver: Arc<Resolver>,
    /// For clients that offer `stun.turn` among their ALPN protocols.
    with_alpn: Arc<ServerConfig>,
    /// For clients offering no ALPN, or only others (Chromium offers none for TURN): rustls
    /// would refuse a client whose offer misses every configured protocol.
    without_alpn: Arc<ServerConfig>,
    not_after: RwLock<i64>,
}

impl TlsContext {
    pub fn new(cert: ServedCertificate) -> Result<Arc<Self>, TlsError> {
        let resolver = Arc::new(Resolver(RwLock::new(cert.key)));
        let build = |alpn: bool| -> Result<Arc<ServerConfig>, TlsError> {
            let mut config = ServerConfig::builder_with_provider(Arc::new(provider()))
                .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
                .map_err(TlsError::Setup)?
                .with_no_client_auth()
                .with_cert_resolver(resolver.clone());
            if alpn {
                config.alpn_protocols = vec![ALPN_STUN_TURN.to_vec()];
            }
            Ok(Arc::new(config))
        };
        Ok(Arc::new(TlsContext {
            with_alpn: build(true)?,
            without_alpn: build(false)?,
            resolver,
            not_after: RwLock::new(cert.not_after),
        }))
    }

    /// A reload's certificate: new handshakes use it; sessions already open are not touched.
    pub fn replace(&self, cert: ServedCertificate) {
        *self.resolver.0.write().unwrap_or_else(|e| e.into_inner()) = cert.key;
        *self.not_after.write().unwrap_or_else(|e| e.into_inner()) = cert.not_after;
    }

    /// When the certificate in use expires (unix seconds), for the metrics.
    pub fn not_after(&self) -> i64 {
        *self.not_after.read().unwrap_or_else(|e| e.into_inner())
    }

    fn config_for(&self, hello: &ClientHello<'_>) -> Arc<ServerConfig> {
        let offers_turn = hello
            .alpn()
            .is_some_and(|mut offered| offered.any(|p| p == ALPN_STUN_TURN));
        Arc::clone(if offers_turn {
            &self.with_alpn
        } else {
            &self.without_alpn
        })
    }
}

/// Why a TLS session ended before or during its handshake, as counted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HandshakeFailure {
    /// Not TLS, a version or cipher we do not speak, a bad record.
    Protocol,
    /// The client closed the connection mid-handshake (often: it does not trust our certificate).
    Closed,
}

/// A fatal TLS error, with the alert to send the client before closing, if any.
#[derive(Debug)]
pub struct TlsFailure {
    pub error: rustls::Error,
    pub alert: Vec<u8>,
}

/// One connection's TLS state.
pub enum TlsSession {
    /// Until the ClientHello is whole: nothing is decided, not even which configuration.
    Hello(Box<Acceptor>),
    Open(Box<ServerConnection>),
}

impl Default for TlsSession {
    fn default() -> Self {
        TlsSession::Hello(Box::default())
    }
}

impl TlsSession {
    pub fn is_handshaking(&self) -> bool {
        match self {
            TlsSession::Hello(_) => true,
            TlsSession::Open(conn) => conn.is_handshaking(),
        }
    }

    /// Takes ciphertext read from the socket; appends the plaintext it carried to `plain`.
    /// `Ok(true)` when the client closed the session (close_notify).
    pub fn receive(
        &mut self,
        ctx: &TlsContext,
        mut cipher: &[u8],
        plain: &mut Vec<u8>,
    ) -> Result<bool, TlsFailure> {
        while !cipher.is_empty() {
            match self {
                TlsSession::Hello(acceptor) => {
                    if let Err(e) = acceptor.read_tls(&mut cipher) {
                        return Err(TlsFailure {
                            error: rustls::Error::General(e.to_string()),
                            alert: Vec::new(),
                        });
                    }
                    match acceptor.accept() {
                        Ok(None) => {}
                        Ok(Some(accepted)) => {
                            let config = ctx.config_for(&accepted.client_hello());
                            match accepted.into_connection(config) {
                                Ok(mut conn) => {
                                    conn.set_buffer_limit(Some(TLS_BUFFER_LIMIT));
                                    *self = TlsSession::Open(Box::new(conn));
                                    // The hello may have been followed by more records.
                                    self.process(plain)?;
                                }
                                Err((error, alert)) => return Err(failure(error, alert)),
                            }
                        }
                        Err((error, alert)) => return Err(failure(error, alert)),
                    }
                }
                TlsSession::Open(conn) => {
                    if let Err(e) = conn.read_tls(&mut cipher) {
                        return Err(TlsFailure {
                            error: rustls::Error::General(e.to_string()),
                            alert: Vec::new(),
                        });
                    }
                    if self.process(plain)? {
                        return Ok(true);
                    }
                }
            }
        }
        Ok(false)
    }

    /// Decrypts what has arrived into `plain`; true at close_notify.
    fn process(&mut self, plain: &mut Vec<u8>) -> Result<bool, TlsFailure> {
        let TlsSession::Open(conn) = self else {
            return Ok(false);
        };
        if let Err(error) = conn.process_new_packets() {
            let mut alert = Vec::new();
            // The alert rustls queued goes out before the close, as a courtesy.
            let _ = conn.write_tls(&mut alert);
            return Err(TlsFailure { error, alert });
        }
        // Everything decrypted so far: read_to_end stops at WouldBlock with the bytes appended,
        // and returns Ok only at the clean end of the session.
        match conn.reader().read_to_end(plain) {
            Ok(_) => Ok(true),
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => Ok(false),
            Err(e) => Err(TlsFailure {
                error: rustls::Error::General(e.to_string()),
                alert: Vec::new(),
            }),
        }
    }

    /// Whether there is ciphertext to write, or plaintext that can be encrypted now.
    pub fn has_output(&self, queued_plain: bool) -> bool {
        match self {
            TlsSession::Hello(_) => false,
            TlsSession::Open(conn) => {
                conn.wants_write() || (queued_plain && !conn.is_handshaking())
            }
        }
    }

    /// Encrypts queued plaintext from `out` and writes what the socket takes now, saying how
    /// many bytes that was; the rest stays queued (in `out`, or in rustls, whose share is
    /// bounded).
    pub fn flush(&mut self, out: &mut Vec<u8>, stream: &TcpStream) -> io::Result<usize> {
        let TlsSession::Open(conn) = self else {
            return Ok(0);
        };
        let mut written = 0;
        let mut socket = Socket(stream);
        loop {
            while conn.wants_write() {
                match conn.write_tls(&mut socket) {
                    Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
                    Ok(n) => written += n,
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(written),
                    Err(e) => return Err(e),
                }
            }
            // Application data waits for the handshake: rustls would only buffer it.
            if out.is_empty() || conn.is_handshaking() {
                return Ok(written);
            }
            let taken = conn.writer().write(out)?;
            out.drain(..taken);
            if taken == 0 {
                return Ok(written);
            }
        }
    }
}

fn failure(error: rustls::Error, mut alert: rustls::server::AcceptedAlert) -> TlsFailure {
    let mut bytes = Vec::new();
    let _ = alert.write_all(&mut bytes);
    TlsFailure {
        error,
        alert: bytes,
    }
}

/// The socket as rustls's `Write`: a non-blocking write that says WouldBlock when full.
struct Socket<'a>(&'a TcpStream);

impl Write for Socket<'_> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.0.try_write(buf)
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wildcard_names_cover_one_label() {
        assert!(name_covers("turn.example.com", "TURN.example.com"));
        assert!(name_covers("turn.example.com", "turn.example.com."));
        assert!(name_covers("*.example.com", "turn.example.com"));
        assert!(!name_covers("*.example.com", "example.com"));
        assert!(!name_covers("*.example.com", "a.b.example.com"));
        assert!(!name_covers("turn.example.com", "example.com"));
        assert!(name_covers("192.0.2.1", "192.0.2.1"));
    }
}
