//! Who a peer is, for every per-address limit of the gateway's port and the admin
//! server: an IPv4 address by itself, an IPv6 address by its prefix
//! (`limits.ipv6_prefix`, a /64 by default: what one customer line is given, so one
//! host cannot escape its limits by rotating through 2^64 addresses). An IPv4-mapped
//! IPv6 address (`::ffff:192.0.2.1`, what a dual-stack socket reports) is its IPv4
//! address.

use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use serde::{Deserialize, Serialize};

/// A peer as per-address limits see it: an IPv4 address, or an IPv6 network.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Source {
    V4(Ipv4Addr),
    /// The network's first address and its prefix length.
    V6(Ipv6Addr, u8),
}

impl fmt::Display for Source {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Source::V4(ip) => write!(f, "{ip}"),
            Source::V6(net, 128) => write!(f, "{net}"),
            Source::V6(net, len) => write!(f, "{net}/{len}"),
        }
    }
}

/// How many leading bits of an IPv6 address name its source (`limits.ipv6_prefix`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "u8", into = "u8")]
pub struct Ipv6Prefix(u8);

impl Ipv6Prefix {
    /// One customer line's share, as providers hand them out.
    pub const DEFAULT: Self = Self(64);

    /// The source `ip` belongs to.
    pub fn source_of(self, ip: IpAddr) -> Source {
        match ip {
            IpAddr::V4(v4) => Source::V4(v4),
            IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
                Some(v4) => Source::V4(v4),
                None => {
                    let mask = u128::MAX.checked_shl(u32::from(128 - self.0)).unwrap_or(0);
                    Source::V6(Ipv6Addr::from(u128::from(v6) & mask), self.0)
                }
            },
        }
    }
}

impl Default for Ipv6Prefix {
    fn default() -> Self {
        Self::DEFAULT
    }
}

impl TryFrom<u8> for Ipv6Prefix {
    type Error = String;

    fn try_from(bits: u8) -> Result<Self, String> {
        if (1..=128).contains(&bits) {
            Ok(Self(bits))
        } else {
            Err(format!(
                "limits.ipv6_prefix = {bits}: expected a prefix length from 1 to 128 (64 is one customer line)"
            ))
        }
    }
}

impl From<Ipv6Prefix> for u8 {
    fn from(prefix: Ipv6Prefix) -> u8 {
        prefix.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn source(prefix: u8, ip: &str) -> String {
        Ipv6Prefix::try_from(prefix)
            .unwrap()
            .source_of(ip.parse().unwrap())
            .to_string()
    }

    #[test]
    fn ipv4_is_by_address() {
        assert_eq!(source(64, "192.0.2.1"), "192.0.2.1");
        assert_ne!(source(64, "192.0.2.1"), source(64, "192.0.2.2"));
    }

    #[test]
    fn ipv6_is_by_prefix() {
        assert_eq!(source(64, "2001:db8:1:2:3:4:5:6"), "2001:db8:1:2::/64");
        assert_eq!(
            source(64, "2001:db8:1:2:ffff::1"),
            source(64, "2001:db8:1:2::9")
        );
        assert_ne!(source(64, "2001:db8:1:2::1"), source(64, "2001:db8:1:3::1"));
        assert_eq!(source(48, "2001:db8:1:2::1"), "2001:db8:1::/48");
        assert_eq!(source(128, "2001:db8::1"), "2001:db8::1");
        assert_eq!(source(1, "2001:db8::1"), "::/1");
        assert_eq!(source(64, "::1"), "::/64");
    }

    #[test]
    fn ipv4_mapped_ipv6_is_its_ipv4_address() {
        assert_eq!(source(64, "::ffff:192.0.2.1"), "192.0.2.1");
        assert_eq!(
            Ipv6Prefix::DEFAULT.source_of("::ffff:192.0.2.1".parse().unwrap()),
            Ipv6Prefix::DEFAULT.source_of("192.0.2.1".parse().unwrap())
        );
    }

    #[test]
    fn prefix_lengths_outside_1_to_128_are_refused_in_words() {
        assert!(Ipv6Prefix::try_from(0)
            .unwrap_err()
            .contains("limits.ipv6_prefix"));
        assert!(Ipv6Prefix::try_from(129).is_err());
        assert!(Ipv6Prefix::try_from(128).is_ok());
    }
}
