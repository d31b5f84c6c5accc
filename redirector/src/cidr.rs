//! Address blocks, as operators write them: `10.0.0.0/24`, `fd00::/8`, or
//! one address.

use std::{fmt, net::IpAddr, str::FromStr};

/// An address block, `10.0.0.0/24`, or one address (`10.0.0.5`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Cidr {
    addr: IpAddr,
    prefix: u8,
}

impl Cidr {
    pub fn contains(&self, ip: IpAddr) -> bool {
        let (net, ip, bits) = match (self.addr, ip) {
            (IpAddr::V4(net), IpAddr::V4(ip)) => (u32::from(net).into(), u32::from(ip).into(), 32),
            (IpAddr::V6(net), IpAddr::V6(ip)) => (u128::from(net), u128::from(ip), 128),
            _ => return false,
        };
        let host_bits = bits - u32::from(self.prefix);
        host_bits >= bits || (net >> host_bits) == (ip >> host_bits)
    }
}

impl FromStr for Cidr {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        let bad = || format!("{s}: expected an address or a CIDR such as 10.0.0.0/24");
        let (addr, prefix) = match s.split_once('/') {
            Some((addr, prefix)) => (addr, Some(prefix)),
            None => (s, None),
        };
        let addr: IpAddr = addr.parse().map_err(|_| bad())?;
        let max = if addr.is_ipv4() { 32 } else { 128 };
        let prefix = match prefix {
            Some(p) => p.parse::<u8>().ok().filter(|p| *p <= max).ok_or_else(bad)?,
            None => max,
        };
        Ok(Self { addr, prefix })
    }
}

impl Cidr {
    /// Loopback, both families: the node's own processes.
    pub fn loopback() -> [Self; 2] {
        [
            Self {
                addr: IpAddr::from([127, 0, 0, 0]),
                prefix: 8,
            },
            Self {
                addr: IpAddr::from(std::net::Ipv6Addr::LOCALHOST),
                prefix: 128,
            },
        ]
    }
}

impl fmt::Display for Cidr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.addr, self.prefix)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cidrs_match_their_block_only() {
        let net: Cidr = "10.1.0.0/16".parse().expect("cidr");
        assert!(net.contains("10.1.200.3".parse().expect("ip")));
        assert!(!net.contains("10.2.0.1".parse().expect("ip")));
        assert!(!net.contains("::1".parse().expect("ip")));
        let one: Cidr = "10.1.0.5".parse().expect("single address");
        assert!(one.contains("10.1.0.5".parse().expect("ip")));
        assert!(!one.contains("10.1.0.6".parse().expect("ip")));
        let all: Cidr = "0.0.0.0/0".parse().expect("everything");
        assert!(all.contains("192.0.2.1".parse().expect("ip")));
        let v6: Cidr = "fd00::/8".parse().expect("v6");
        assert!(v6.contains("fd12::1".parse().expect("ip")));
        for bad in ["10.0.0.0/33", "10.0.0/8", "nonsense", "::/129"] {
            assert!(bad.parse::<Cidr>().is_err(), "{bad}");
        }
    }
}
