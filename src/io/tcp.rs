//! TURN over TCP (RFC 8656 §3.1): STUN messages and ChannelData back to back on a byte stream,
//! ChannelData padded to 4 bytes. A connection belongs to the shard that accepted it, like a
//! UDP client's 5-tuple; its relays to peers are UDP. Output for the client (replies and relayed
//! frames) is queued on the connection and written in one go when its task next runs, so a
//! burst of peer datagrams costs one write, not one per datagram.

use std::cell::RefCell;
use std::io;
use std::net::SocketAddr;

use socket2::{Domain, Protocol, Socket, Type};
use tokio::net::TcpStream;
use tokio::sync::Notify;

use crate::proto::codec::{self, HEADER_LEN};

/// Bytes a connection may have queued for a client that reads too slowly; past it, relayed
/// frames are dropped (as a full UDP path would drop them) rather than held without bound.
pub const MAX_QUEUED: usize = 256 * 1024;
/// Room past [`MAX_QUEUED`] for answers to the client's own requests. A stream client does not
/// retransmit (RFC 8489 §6.2.2), so a dropped answer (a Refresh's, say) is a transaction lost
/// for 39.5 s; relayed data is what a slow reader loses. Still bounded: a client that sends
/// requests without reading their answers loses those past this too.
pub const ANSWER_RESERVE: usize = 64 * 1024;
/// The largest frame a stream can carry: a STUN message or padded ChannelData of 64 KiB.
pub const MAX_FRAME: usize = HEADER_LEN + u16::MAX as usize + 3;
/// How much one read asks the kernel for.
const READ_CHUNK: usize = 16 * 1024;

/// A listening TCP socket, bound once by the daemon; every shard accepts from a clone of it.
pub fn bind_tcp(addr: SocketAddr) -> io::Result<std::net::TcpListener> {
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
    socket.set_reuse_address(true)?;
    if addr.is_ipv6() {
        // "[::]:3478" serves IPv6; IPv4 clients come through an IPv4 listener of their own.
        socket.set_only_v6(true)?;
    }
    socket.bind(&addr.into())?;
    socket.listen(1024)?;
    socket.set_nonblocking(true)?;
    Ok(socket.into())
}

/// The shard's handle on one client connection: where output for it is queued.
#[derive(Default)]
pub struct StreamConn {
    out: RefCell<Vec<u8>>,
    wake: Notify,
}

impl StreamConn {
    /// Queues a frame for the client; false, and nothing queued, when the client is too far
    /// behind: past [`MAX_QUEUED`] for relayed data, past [`ANSWER_RESERVE`] more for answers.
    pub fn queue(&self, frame: &[u8]) -> bool {
        let mut out = self.out.borrow_mut();
        let limit = if is_response(frame) {
            MAX_QUEUED + ANSWER_RESERVE
        } else {
            MAX_QUEUED
        };
        if out.len() + frame.len() > limit {
            return false;
        }
        let was_empty = out.is_empty();
        out.extend_from_slice(frame);
        if was_empty {
            self.wake.notify_one();
        }
        true
    }

    /// Waits until output is queued (or returns at once if some already is).
    pub async fn queued(&self) {
        if self.out.borrow().is_empty() {
            self.wake.notified().await;
        }
    }

    pub fn has_output(&self) -> bool {
        !self.out.borrow().is_empty()
    }

    /// The queued bytes, for a layer (TLS) that takes them in its own pieces.
    pub fn with_queue<T>(&self, f: impl FnOnce(&mut Vec<u8>) -> T) -> T {
        f(&mut self.out.borrow_mut())
    }

    /// Writes what the socket takes now, and says how much that was; the rest stays queued.
    pub fn flush(&self, stream: &TcpStream) -> io::Result<usize> {
        let mut out = self.out.borrow_mut();
        let mut written = 0;
        while written < out.len() {
            match stream.try_write(&out[written..]) {
                Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
                Ok(n) => written += n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) => return Err(e),
            }
        }
        out.drain(..written);
        Ok(written)
    }
}

/// A STUN success or error response (class bit C1 set), as opposed to ChannelData and
/// indications (relayed data).
fn is_response(frame: &[u8]) -> bool {
    frame.len() >= HEADER_LEN && frame[0] >> 6 == 0 && frame[0] & 0x01 != 0
}

/// Appends what the socket has to `buf`; how many bytes, 0 at the end of the stream.
pub fn read_some(stream: &TcpStream, buf: &mut Vec<u8>) -> io::Result<usize> {
    // Reads into spare capacity: no zero-filling of the chunk before every read.
    buf.reserve(READ_CHUNK);
    let room = buf.capacity() - buf.len();
    let n = stream.try_read_buf(buf)?;
    if n > 0 && n < room {
        // A short read emptied the receive queue. tokio keeps the socket marked readable until
        // a read says WouldBlock, which would cost one more syscall per read; clear the mark
        // without it (the UDP listeners do the same after a short batch). Bytes arriving from
        // now on raise a fresh edge, so nothing is missed.
        let _ = stream.try_io(tokio::io::Interest::READABLE, || {
            Err::<(), _>(io::ErrorKind::WouldBlock.into())
        });
    }
    Ok(n)
}

/// The complete frames at the start of `buf`, by their lengths, and how many bytes they take;
/// an error when the stream cannot be TURN (the connection is then closed). `each` returns
/// false to stop after its frame (RFC 6062: after a ConnectionBind the bytes are no TURN).
pub fn complete_frames(buf: &[u8], mut each: impl FnMut(&[u8]) -> bool) -> io::Result<usize> {
    let mut pos = 0;
    loop {
        let rest = &buf[pos..];
        let len = match codec::stream_frame_len(rest) {
            Ok(Some(len)) => len,
            Ok(None) => return Ok(pos),
            Err(e) => return Err(io::Error::new(io::ErrorKind::InvalidData, e)),
        };
        if len > MAX_FRAME {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                "frame longer than a stream frame can be",
            ));
        }
        if rest.len() < len {
            return Ok(pos);
        }
        pos += len;
        if !each(&rest[..len]) {
            return Ok(pos);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_split_anywhere_are_found_whole_and_in_order() {
        let mut stream = Vec::new();
        let mut msg = Vec::new();
        codec::MessageWriter::new(
            &mut msg,
            codec::method::BINDING,
            codec::Class::Request,
            [4; 12],
        );
        stream.extend_from_slice(&msg);
        stream.extend_from_slice(&[0x40, 0x01, 0x00, 0x03, 7, 8, 9, 0]);
        stream.extend_from_slice(&msg);
        let whole: Vec<Vec<u8>> = {
            let mut v = Vec::new();
            assert_eq!(
                complete_frames(&stream, |f| {
                    v.push(f.to_vec());
                    true
                })
                .unwrap(),
                stream.len()
            );
            v
        };
        assert_eq!(whole.len(), 3);
        assert_eq!(whole[1], [0x40, 0x01, 0x00, 0x03, 7, 8, 9, 0]);
        // Fed in pieces of every size, the same frames come out.
        for piece in 1..stream.len() {
            let (mut buf, mut got) = (Vec::new(), Vec::new());
            for chunk in stream.chunks(piece) {
                buf.extend_from_slice(chunk);
                let used = complete_frames(&buf, |f| {
                    got.push(f.to_vec());
                    true
                })
                .unwrap();
                buf.drain(..used);
            }
            assert!(buf.is_empty(), "piece {piece}");
            assert_eq!(got, whole, "piece {piece}");
        }
    }

    #[test]
    fn frames_stop_after_the_one_that_says_so() {
        let mut msg = Vec::new();
        codec::MessageWriter::new(
            &mut msg,
            codec::method::BINDING,
            codec::Class::Request,
            [4; 12],
        );
        // A ConnectionBind, then bytes that are not TURN (RFC 6062 data).
        let mut stream = msg.clone();
        stream.extend_from_slice(&[0xC0, 0xFF, 0xEE]);
        let mut seen = 0;
        let used = complete_frames(&stream, |_| {
            seen += 1;
            false
        })
        .unwrap();
        assert_eq!((seen, used), (1, msg.len()));
    }

    #[test]
    fn a_stream_that_is_not_turn_is_an_error() {
        assert!(complete_frames(&[0xC0, 0, 0, 0], |_| true).is_err());
        assert!(complete_frames(&[0x00, 0x01, 0x00, 0x03], |_| true).is_err());
    }

    #[test]
    fn a_slow_reader_holds_at_most_its_queue() {
        let conn = StreamConn::default();
        let frame = [0u8; 1000];
        let queued = (0..1000).filter(|_| conn.queue(&frame)).count();
        assert_eq!(queued, MAX_QUEUED / 1000);
        assert!(conn.has_output());
        // Answers still fit, in their reserve only; indications do not.
        let mut answer = Vec::new();
        codec::MessageWriter::new(
            &mut answer,
            codec::method::BINDING,
            codec::Class::Success,
            [1; 12],
        )
        .attr(codec::attr::SOFTWARE, &[b'x'; 980]);
        let mut indication = Vec::new();
        codec::MessageWriter::new(
            &mut indication,
            codec::method::DATA,
            codec::Class::Indication,
            [2; 12],
        )
        .attr(codec::attr::DATA, &[0; 980]);
        assert!(!conn.queue(&indication));
        let answers = (0..1000).filter(|_| conn.queue(&answer)).count();
        assert_eq!(answers, (MAX_QUEUED % 1000 + ANSWER_RESERVE) / answer.len());
        let mut error = answer.clone();
        error[1] |= 0x10;
        assert!(!conn.queue(&error), "the reserve is bounded");
    }
}
