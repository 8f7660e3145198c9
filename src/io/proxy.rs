//! The PROXY protocol header (HAProxy's spec, versions 1 and 2) that a load balancer puts before
//! the client's bytes, so the daemon sees the client's address instead of the balancer's. Pure
//! parsing: bytes in, a header and its length out. A listener that expects the header treats
//! anything else as an error and closes that connection only.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

/// The v2 signature: 12 bytes no v1 header, TLS record or TURN frame starts with.
const V2_SIGNATURE: [u8; 12] = *b"\r\n\r\n\0\r\nQUIT\n";
const V1_PREFIX: &[u8] = b"PROXY ";
/// A v1 line is at most 107 bytes, CRLF included (the spec's worst case, TCP6 with full addresses).
const V1_MAX: usize = 107;
/// v2 allows 64 KiB of TLVs; balancers send a few dozen bytes. More is refused, not buffered.
pub const V2_MAX: usize = 16 + 1024;

/// What the header says about the connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProxyHeader {
    /// The balancer's own connection (a health check, v2 LOCAL, or v1 UNKNOWN): the socket's
    /// addresses stand.
    Local,
    /// A relayed client: `source` is the client as the balancer saw it.
    Proxied {
        source: SocketAddr,
        destination: SocketAddr,
    },
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ProxyError {
    #[error("the connection does not start with a PROXY protocol header")]
    Missing,
    #[error("malformed PROXY v1 header: {0}")]
    V1(&'static str),
    #[error("malformed PROXY v2 header: {0}")]
    V2(&'static str),
}

/// The header at the start of `buf` and the number of bytes it takes; `Ok(None)` while more
/// bytes are needed to tell.
pub fn parse(buf: &[u8]) -> Result<Option<(ProxyHeader, usize)>, ProxyError> {
    let n = buf.len().min(V2_SIGNATURE.len());
    if buf[..n] == V2_SIGNATURE[..n] {
        return if n < V2_SIGNATURE.len() {
            Ok(None)
        } else {
            parse_v2(buf)
        };
    }
    let n = buf.len().min(V1_PREFIX.len());
    if buf[..n] == V1_PREFIX[..n] {
        return if n < V1_PREFIX.len() {
            Ok(None)
        } else {
            parse_v1(buf)
        };
    }
    Err(ProxyError::Missing)
}

fn parse_v1(buf: &[u8]) -> Result<Option<(ProxyHeader, usize)>, ProxyError> {
    let window = &buf[..buf.len().min(V1_MAX)];
    let Some(cr) = window.iter().position(|&b| b == b'\r') else {
        return if buf.len() >= V1_MAX {
            Err(ProxyError::V1("no CRLF within 107 bytes"))
        } else {
            Ok(None)
        };
    };
    match window.get(cr + 1) {
        None => return Ok(None),
        Some(b'\n') => {}
        Some(_) => return Err(ProxyError::V1("CR not followed by LF")),
    }
    let line = std::str::from_utf8(&window[V1_PREFIX.len()..cr])
        .map_err(|_| ProxyError::V1("not ASCII"))?;
    let len = cr + 2;
    let mut fields = line.split(' ');
    let family = fields.next().unwrap_or_default();
    if family == "UNKNOWN" {
        // The spec: whatever follows UNKNOWN is to be ignored.
        return Ok(Some((ProxyHeader::Local, len)));
    }
    let fields: Vec<&str> = fields.collect();
    let [src, dst, sport, dport] = fields[..] else {
        return Err(ProxyError::V1("expected four fields after the protocol"));
    };
    let (src, dst): (IpAddr, IpAddr) = match family {
        "TCP4" => (
            v1_ip::<Ipv4Addr>(src)?.into(),
            v1_ip::<Ipv4Addr>(dst)?.into(),
        ),
        "TCP6" => (
            v1_ip::<Ipv6Addr>(src)?.into(),
            v1_ip::<Ipv6Addr>(dst)?.into(),
        ),
        _ => return Err(ProxyError::V1("protocol is not TCP4, TCP6 or UNKNOWN")),
    };
    Ok(Some((
        ProxyHeader::Proxied {
            source: unmapped(SocketAddr::new(src, v1_port(sport)?)),
            destination: unmapped(SocketAddr::new(dst, v1_port(dport)?)),
        },
        len,
    )))
}

/// An IPv4 client as IPv4. A balancer whose two sides differ in family (an IPv4 client on a
/// dual-stack frontend) writes the client as an IPv4-mapped IPv6 address (HAProxy does, in both
/// versions); the client is IPv4 all the same, and XOR-MAPPED-ADDRESS, quotas and logs must
/// say so.
fn unmapped(addr: SocketAddr) -> SocketAddr {
    match addr.ip() {
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => SocketAddr::new(v4.into(), addr.port()),
            None => addr,
        },
        IpAddr::V4(_) => addr,
    }
}

fn v1_ip<T: std::str::FromStr>(text: &str) -> Result<T, ProxyError> {
    text.parse().map_err(|_| ProxyError::V1("bad address"))
}

fn v1_port(text: &str) -> Result<u16, ProxyError> {
    // Decimal without sign or leading zeros, as the spec writes them.
    let canonical = !text.is_empty()
        && text.bytes().all(|b| b.is_ascii_digit())
        && (text == "0" || !text.starts_with('0'));
    match text.parse() {
        Ok(port) if canonical => Ok(port),
        _ => Err(ProxyError::V1("bad port")),
    }
}

fn parse_v2(buf: &[u8]) -> Result<Option<(ProxyHeader, usize)>, ProxyError> {
    let Some(&[ver_cmd, fam, hi, lo]) = buf.get(12..16) else {
        return Ok(None);
    };
    if ver_cmd >> 4 != 2 {
        return Err(ProxyError::V2("version is not 2"));
    }
    let len = 16 + usize::from(u16::from_be_bytes([hi, lo]));
    if len > V2_MAX {
        return Err(ProxyError::V2("longer than this server accepts"));
    }
    let Some(body) = buf.get(16..len) else {
        return Ok(None);
    };
    match ver_cmd & 0x0f {
        // LOCAL: the balancer speaking for itself; the address block is to be ignored.
        0 => return Ok(Some((ProxyHeader::Local, len))),
        1 => {}
        _ => return Err(ProxyError::V2("unknown command")),
    }
    let (family, protocol) = (fam >> 4, fam & 0x0f);
    // UNSPEC (either half): the spec says to use the socket's own addresses.
    if family == 0 || protocol == 0 {
        return Ok(Some((ProxyHeader::Local, len)));
    }
    if protocol != 1 {
        return Err(ProxyError::V2("not a stream connection"));
    }
    let header = match family {
        1 => {
            let a = body
                .get(..12)
                .ok_or(ProxyError::V2("address block too short for IPv4"))?;
            let ip = |i: usize| IpAddr::from([a[i], a[i + 1], a[i + 2], a[i + 3]]);
            let port = |i: usize| u16::from_be_bytes([a[i], a[i + 1]]);
            ProxyHeader::Proxied {
                source: SocketAddr::new(ip(0), port(8)),
                destination: SocketAddr::new(ip(4), port(10)),
            }
        }
        2 => {
            let a = body
                .get(..36)
                .ok_or(ProxyError::V2("address block too short for IPv6"))?;
            let ip = |i: usize| {
                let mut octets = [0u8; 16];
                octets.copy_from_slice(&a[i..i + 16]);
                IpAddr::from(octets)
            };
            let port = |i: usize| u16::from_be_bytes([a[i], a[i + 1]]);
            ProxyHeader::Proxied {
                source: unmapped(SocketAddr::new(ip(0), port(32))),
                destination: unmapped(SocketAddr::new(ip(16), port(34))),
            }
        }
        3 => return Err(ProxyError::V2("a unix-socket client cannot use TURN")),
        _ => return Err(ProxyError::V2("unknown address family")),
    };
    // TLVs after the addresses (AWS and GCP send some) carry nothing the daemon needs.
    Ok(Some((header, len)))
}

/// A v2 header, as a balancer would send it: for tests, here and in `tests/`.
pub fn encode_v2(source: SocketAddr, destination: SocketAddr) -> Vec<u8> {
    let mut out = V2_SIGNATURE.to_vec();
    out.push(0x21);
    let mut block = Vec::new();
    match (source.ip(), destination.ip()) {
        (IpAddr::V4(s), IpAddr::V4(d)) => {
            out.push(0x11);
            block.extend_from_slice(&s.octets());
            block.extend_from_slice(&d.octets());
        }
        (s, d) => {
            out.push(0x21);
            let v6 = |ip: IpAddr| match ip {
                IpAddr::V4(v4) => v4.to_ipv6_mapped().octets(),
                IpAddr::V6(v6) => v6.octets(),
            };
            block.extend_from_slice(&v6(s));
            block.extend_from_slice(&v6(d));
        }
    }
    block.extend_from_slice(&source.port().to_be_bytes());
    block.extend_from_slice(&destination.port().to_be_bytes());
    out.extend_from_slice(&(block.len() as u16).to_be_bytes());
    out.extend_from_slice(&block);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn addr(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    /// Every prefix of a valid header asks for more; the whole one parses to `want`.
    fn parses_whole_only(bytes: &[u8], want: ProxyHeader) {
        for cut in 0..bytes.len() {
            assert_eq!(parse(&bytes[..cut]), Ok(None), "prefix of {cut} bytes");
        }
        let mut with_payload = bytes.to_vec();
        with_payload.extend_from_slice(&[0, 1, 0, 0]);
        assert_eq!(parse(&with_payload), Ok(Some((want, bytes.len()))));
    }

    #[test]
    fn v1_tcp4_tcp6_and_unknown() {
        parses_whole_only(
            b"PROXY TCP4 198.51.100.7 192.0.2.1 40000 443\r\n",
            ProxyHeader::Proxied {
                source: addr("198.51.100.7:40000"),
                destination: addr("192.0.2.1:443"),
            },
        );
        parses_whole_only(
            b"PROXY TCP6 2001:db8::7 2001:db8::1 1 3478\r\n",
            ProxyHeader::Proxied {
                source: addr("[2001:db8::7]:1"),
                destination: addr("[2001:db8::1]:3478"),
            },
        );
        parses_whole_only(b"PROXY UNKNOWN\r\n", ProxyHeader::Local);
        parses_whole_only(b"PROXY UNKNOWN ffff::1 ffff::2 1 2\r\n", ProxyHeader::Local);
    }

    #[test]
    fn ipv4_mapped_addresses_are_read_as_ipv4() {
        let want = ProxyHeader::Proxied {
            source: addr("198.51.100.7:40000"),
            destination: addr("[2001:db8::1]:443"),
        };
        parses_whole_only(
            b"PROXY TCP6 ::ffff:198.51.100.7 2001:db8::1 40000 443\r\n",
            want,
        );
        // encode_v2 writes mixed families as IPv6, IPv4 mapped.
        parses_whole_only(
            &encode_v2(addr("198.51.100.7:40000"), addr("[2001:db8::1]:443")),
            want,
        );
        // Other IPv6 addresses that embed IPv4 (6to4, NAT64) are IPv6 clients: kept.
        parses_whole_only(
            b"PROXY TCP6 2002:c633:6407::1 2001:db8::1 1 2\r\n",
            ProxyHeader::Proxied {
                source: addr("[2002:c633:6407::1]:1"),
                destination: addr("[2001:db8::1]:2"),
            },
        );
    }

    #[test]
    fn v1_garbage_is_an_error() {
        for bad in [
            &b"PROXY TCP4 198.51.100.7 192.0.2.1 40000\r\n"[..],
            b"PROXY TCP4 2001:db8::1 192.0.2.1 1 2\r\n",
            b"PROXY TCP6 198.51.100.7 192.0.2.1 1 2\r\n",
            b"PROXY TCP4 198.51.100.7 192.0.2.1 65536 443\r\n",
            b"PROXY TCP4 198.51.100.7 192.0.2.1 0443 443\r\n",
            b"PROXY TCP4 198.51.100.7 192.0.2.1 +1 443\r\n",
            b"PROXY UDP4 198.51.100.7 192.0.2.1 1 2\r\n",
            b"PROXY TCP4 198.51.100.7  192.0.2.1 1 2\r\n",
            b"PROXY TCP4 198.51.100.7 192.0.2.1 1 2\rX",
        ] {
            assert!(
                matches!(parse(bad), Err(ProxyError::V1(_))),
                "{:?}",
                String::from_utf8_lossy(bad)
            );
        }
        // No CRLF within the longest line the spec allows.
        let long = [b"PROXY ".as_slice(), &[b'A'; 120]].concat();
        assert!(matches!(parse(&long), Err(ProxyError::V1(_))));
    }

    #[test]
    fn v2_proxy_local_and_tlvs() {
        parses_whole_only(
            &encode_v2(addr("198.51.100.7:40000"), addr("192.0.2.1:443")),
            ProxyHeader::Proxied {
                source: addr("198.51.100.7:40000"),
                destination: addr("192.0.2.1:443"),
            },
        );
        parses_whole_only(
            &encode_v2(addr("[2001:db8::7]:5"), addr("[2001:db8::1]:443")),
            ProxyHeader::Proxied {
                source: addr("[2001:db8::7]:5"),
                destination: addr("[2001:db8::1]:443"),
            },
        );
        // TLVs after the address block are skipped with it.
        let mut with_tlv = encode_v2(addr("198.51.100.7:1"), addr("192.0.2.1:2"));
        with_tlv.extend_from_slice(&[0x04, 0x00, 0x02, b'h', b'i']);
        with_tlv[15] += 5;
        parses_whole_only(
            &with_tlv,
            ProxyHeader::Proxied {
                source: addr("198.51.100.7:1"),
                destination: addr("192.0.2.1:2"),
            },
        );
        // LOCAL, with or without an address block.
        let mut local = V2_SIGNATURE.to_vec();
        local.extend_from_slice(&[0x20, 0x00, 0x00, 0x00]);
        parses_whole_only(&local, ProxyHeader::Local);
    }

    #[test]
    fn v2_garbage_is_an_error() {
        let good = encode_v2(addr("198.51.100.7:1"), addr("192.0.2.1:2"));
        let with = |i: usize, b: u8| {
            let mut v = good.clone();
            v[i] = b;
            v
        };
        assert!(matches!(parse(&with(12, 0x11)), Err(ProxyError::V2(_))));
        assert!(matches!(parse(&with(12, 0x2f)), Err(ProxyError::V2(_))));
        assert!(matches!(parse(&with(13, 0x12)), Err(ProxyError::V2(_))));
        assert!(matches!(parse(&with(13, 0x31)), Err(ProxyError::V2(_))));
        // Length too short for the family's address block.
        let mut short = with(15, 8);
        short.truncate(24);
        assert!(matches!(parse(&short), Err(ProxyError::V2(_))));
        // A length past what the server buffers is refused before the bytes arrive.
        let huge = with(14, 0xff);
        assert!(matches!(parse(&huge[..16]), Err(ProxyError::V2(_))));
    }

    #[test]
    fn no_header_is_missing_at_the_first_byte_that_tells() {
        // A STUN request, a TLS ClientHello, ChannelData: each is refused at once.
        for first in [&[0x00u8, 0x01][..], &[0x16, 0x03], &[0x40, 0x00], b"GET /"] {
            assert_eq!(parse(first), Err(ProxyError::Missing));
        }
        assert_eq!(parse(b"PROX"), Ok(None));
        assert_eq!(parse(b"\r\n\r\n"), Ok(None));
        assert_eq!(parse(b""), Ok(None));
    }
}
