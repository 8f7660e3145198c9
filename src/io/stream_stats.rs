//! What a shard counts about its TCP and TLS client connections, by transport: the values
//! behind the `turnpike_connection*` series.

use crate::proto::Transport;

/// One transport's connection counters on one shard.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct StreamCounters {
    /// Connections that got past admission and setup (PROXY header, TLS handshake).
    pub accepted: u64,
    pub open: u64,
    /// Turned away at accept because the server holds `connections_total`.
    pub refused_total: u64,
    /// Turned away because the client's address holds `connections_per_source`.
    pub refused_per_source: u64,
    /// Closed without an allocation after the idle timeout.
    pub closed_idle: u64,
    /// PROXY header or TLS handshake not done within the setup timeout.
    pub setup_timeouts: u64,
    /// A TLS handshake the server could not accept (a bad record after it is not counted).
    pub tls_errors: u64,
    /// The client hung up during the TLS handshake (often: it does not trust the certificate).
    pub tls_closed_in_handshake: u64,
    /// A missing, malformed or untrusted PROXY header.
    pub proxy_errors: u64,
    pub bytes_in: u64,
    pub bytes_out: u64,
    /// Frames for a client too far behind on reading, dropped as a full UDP path would drop them.
    pub frames_dropped: u64,
}

/// Connection counters by transport (`tcp`, `tls`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ConnectionStats {
    pub tcp: StreamCounters,
    pub tls: StreamCounters,
}

impl ConnectionStats {
    pub fn of(&mut self, transport: Transport) -> &mut StreamCounters {
        match transport {
            Transport::Tls => &mut self.tls,
            Transport::Udp | Transport::Tcp => &mut self.tcp,
        }
    }
}

impl std::ops::AddAssign for StreamCounters {
    fn add_assign(&mut self, o: Self) {
        // No `..`: a counter added above does not compile until it is summed here.
        let StreamCounters {
            accepted,
            open,
            refused_total,
            refused_per_source,
            closed_idle,
            setup_timeouts,
            tls_errors,
            tls_closed_in_handshake,
            proxy_errors,
            bytes_in,
            bytes_out,
            frames_dropped,
        } = o;
        self.accepted += accepted;
        self.open += open;
        self.refused_total += refused_total;
        self.refused_per_source += refused_per_source;
        self.closed_idle += closed_idle;
        self.setup_timeouts += setup_timeouts;
        self.tls_errors += tls_errors;
        self.tls_closed_in_handshake += tls_closed_in_handshake;
        self.proxy_errors += proxy_errors;
        self.bytes_in += bytes_in;
        self.bytes_out += bytes_out;
        self.frames_dropped += frames_dropped;
    }
}

impl std::ops::AddAssign for ConnectionStats {
    fn add_assign(&mut self, o: Self) {
        self.tcp += o.tcp;
        self.tls += o.tls;
    }
}
