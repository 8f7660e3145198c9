//! The host's own interface addresses (getifaddrs).

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

/// One address of one interface.
#[derive(Debug, Clone, Copy)]
pub struct InterfaceAddress {
    pub ip: IpAddr,
    pub up: bool,
}

/// Every IPv4 and IPv6 address on this host's interfaces, up or down; empty if the kernel
/// refuses the query.
pub fn interface_addresses() -> Vec<InterfaceAddress> {
    let mut found = Vec::new();
    // SAFETY: getifaddrs fills a linked list we only read and then free with freeifaddrs; each
    // sockaddr is read as the type its family names.
    unsafe {
        let mut list: *mut libc::ifaddrs = std::ptr::null_mut();
        if libc::getifaddrs(&mut list) != 0 {
            return found;
        }
        let mut cur = list;
        while !cur.is_null() {
            let ifa = &*cur;
            let up = ifa.ifa_flags & libc::IFF_UP as u32 != 0;
            if !ifa.ifa_addr.is_null() {
                let ip = match i32::from((*ifa.ifa_addr).sa_family) {
                    libc::AF_INET => {
                        let sin = &*(ifa.ifa_addr as *const libc::sockaddr_in);
                        Some(IpAddr::V4(Ipv4Addr::from(u32::from_be(
                            sin.sin_addr.s_addr,
                        ))))
                    }
                    libc::AF_INET6 => {
                        let sin6 = &*(ifa.ifa_addr as *const libc::sockaddr_in6);
                        Some(IpAddr::V6(Ipv6Addr::from(sin6.sin6_addr.s6_addr)))
                    }
                    _ => None,
                };
                if let Some(ip) = ip {
                    found.push(InterfaceAddress { ip, up });
                }
            }
            cur = ifa.ifa_next;
        }
        libc::freeifaddrs(list);
    }
    found
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_loopback() {
        assert!(interface_addresses()
            .iter()
            .any(|a| a.ip == IpAddr::V4(Ipv4Addr::LOCALHOST)));
    }
}
