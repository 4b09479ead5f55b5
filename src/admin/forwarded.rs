//! Which address an admin request comes from when it reaches us through reverse
//! proxies (`admin.trusted_proxies`).
//!
//! Each proxy appends the address it received the request from: to the last
//! `X-Forwarded-For` line, or as a line of its own (HAProxy's `option forwardfor`
//! adds one), or as a `for=` element of RFC 7239's `Forwarded`. So only the right end
//! of the list is written by proxies we trust; anything further left may be the
//! client's own invention. The list (every line, in order) is walked from the right
//! past trusted proxies, and the first address that is not one is the source. An
//! element that names no address (`unknown`, an obfuscated `_node`, garbage) stops
//! the walk at the proxy that wrote it: that proxy is the source we can vouch for.
//! `Forwarded`, when present, is read instead of `X-Forwarded-For`.

use std::net::{IpAddr, SocketAddr};

use actix_web::http::header::{HeaderMap, HeaderName};

/// The request's source: `peer` itself unless it is a trusted proxy.
pub fn source(peer: IpAddr, headers: &HeaderMap, trusted: &[IpAddr]) -> IpAddr {
    if !trusted.contains(&peer) {
        return peer;
    }
    let forwarded = HeaderName::from_static("forwarded");
    let hops = if headers.contains_key(&forwarded) {
        elements(headers, &forwarded)
            .map(|element| for_of(&element))
            .collect::<Vec<_>>()
    } else {
        elements(headers, &HeaderName::from_static("x-forwarded-for"))
            .map(|element| address(&element))
            .collect()
    };
    let mut source = peer;
    for hop in hops.into_iter().rev() {
        match hop {
            Some(ip) if trusted.contains(&ip) => source = ip,
            Some(ip) => return ip,
            None => return source,
        }
    }
    source
}

/// Every comma-separated element of every line of `name`, in order.
fn elements<'a>(headers: &'a HeaderMap, name: &HeaderName) -> impl Iterator<Item = String> + 'a {
    headers.get_all(name).flat_map(|line| {
        // A line that is not text names no address: it stops the walk there.
        let text = line.to_str().unwrap_or("\u{0}");
        text.split(',').map(str::to_owned).collect::<Vec<_>>()
    })
}

/// The address of an `X-Forwarded-For` element (`192.0.2.1`, `2001:db8::1`, and the
/// forms with a port some proxies write: `192.0.2.1:4711`, `[2001:db8::1]:4711`).
fn address(element: &str) -> Option<IpAddr> {
    let text = element.trim().trim_matches('"');
    if let Ok(ip) = text.parse::<IpAddr>() {
        return Some(ip);
    }
    if let Ok(socket) = text.parse::<SocketAddr>() {
        return Some(socket.ip());
    }
    text.strip_prefix('[')
        .and_then(|rest| rest.strip_suffix(']'))
        .and_then(|inner| inner.parse().ok())
}

/// The `for=` address of one `Forwarded` element (`for=192.0.2.60;proto=https`,
/// `for="[2001:db8:cafe::17]:4711"`); `None` for `unknown`, `_hidden` or none.
fn for_of(element: &str) -> Option<IpAddr> {
    element.split(';').find_map(|pair| {
        let (name, value) = pair.split_once('=')?;
        if !name.trim().eq_ignore_ascii_case("for") {
            return None;
        }
        address(value)
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use actix_web::http::header::HeaderValue;

    const PROXY: &str = "10.0.0.9";
    const OTHER_PROXY: &str = "10.0.0.8";

    fn ip(text: &str) -> IpAddr {
        text.parse().unwrap()
    }

    fn source_of(peer: &str, lines: &[(&str, &str)]) -> IpAddr {
        let mut headers = HeaderMap::new();
        for (name, value) in lines {
            headers.append(
                HeaderName::from_bytes(name.as_bytes()).unwrap(),
                HeaderValue::from_str(value).unwrap(),
            );
        }
        source(ip(peer), &headers, &[ip(PROXY), ip(OTHER_PROXY)])
    }

    #[test]
    fn a_peer_that_is_no_trusted_proxy_is_the_source_whatever_it_says() {
        let s = source_of("192.0.2.1", &[("x-forwarded-for", "203.0.113.7")]);
        assert_eq!(s, ip("192.0.2.1"));
    }

    #[test]
    fn one_line_is_walked_from_the_right() {
        let s = source_of(PROXY, &[("x-forwarded-for", "203.0.113.7, 198.51.100.3")]);
        assert_eq!(s, ip("198.51.100.3"), "what the trusted proxy appended");
    }

    #[test]
    fn several_lines_are_one_list_in_order() {
        // The client sent its own line; HAProxy's `option forwardfor` added another.
        let s = source_of(
            PROXY,
            &[
                ("x-forwarded-for", "1.2.3.4"),
                ("x-forwarded-for", "198.51.100.3"),
            ],
        );
        assert_eq!(s, ip("198.51.100.3"));
    }

    #[test]
    fn trusted_proxies_in_a_chain_are_walked_past() {
        let s = source_of(
            PROXY,
            &[("x-forwarded-for", "1.2.3.4, 198.51.100.3, 10.0.0.8")],
        );
        assert_eq!(s, ip("198.51.100.3"));
        let all_trusted = source_of(PROXY, &[("x-forwarded-for", "10.0.0.8")]);
        assert_eq!(all_trusted, ip(OTHER_PROXY));
    }

    #[test]
    fn an_element_that_names_no_address_stops_at_the_proxy_that_wrote_it() {
        assert_eq!(
            source_of(PROXY, &[("x-forwarded-for", "1.2.3.4, garbage")]),
            ip(PROXY)
        );
        assert_eq!(
            source_of(PROXY, &[("x-forwarded-for", "1.2.3.4, unknown, 10.0.0.8")]),
            ip(OTHER_PROXY)
        );
        assert_eq!(source_of(PROXY, &[]), ip(PROXY), "no header");
    }

    #[test]
    fn ports_and_brackets_are_read() {
        assert_eq!(
            source_of(PROXY, &[("x-forwarded-for", "198.51.100.3:4711")]),
            ip("198.51.100.3")
        );
        assert_eq!(
            source_of(PROXY, &[("x-forwarded-for", "[2001:db8::7]:4711")]),
            ip("2001:db8::7")
        );
        assert_eq!(
            source_of(PROXY, &[("x-forwarded-for", "2001:db8::7")]),
            ip("2001:db8::7")
        );
    }

    #[test]
    fn forwarded_is_read_the_same_way_and_preferred() {
        let s = source_of(
            PROXY,
            &[
                ("forwarded", "for=1.2.3.4"),
                (
                    "forwarded",
                    "For=\"[2001:db8:cafe::17]:4711\";proto=https, for=10.0.0.8;by=10.0.0.9",
                ),
                ("x-forwarded-for", "5.6.7.8"),
            ],
        );
        assert_eq!(s, ip("2001:db8:cafe::17"));
        assert_eq!(
            source_of(PROXY, &[("forwarded", "for=1.2.3.4, for=_hidden")]),
            ip(PROXY)
        );
        assert_eq!(
            source_of(PROXY, &[("forwarded", "proto=https;for=198.51.100.3")]),
            ip("198.51.100.3")
        );
    }
}
