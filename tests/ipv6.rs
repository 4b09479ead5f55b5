//! Per-address limits over real IPv6: an IPv6 source is its `limits.ipv6_prefix` (a
//! /64), so a host cannot escape `max_connections_per_ip` by rotating through the
//! addresses of its network.
//!
//! The test runs in a network namespace it makes for itself (`unshare -n`, which needs
//! root, as the test machines have): it re-runs itself there, puts addresses of two
//! documentation /64s on that namespace's loopback interface and talks only to them.
//! Without the right to make a namespace it says so and passes only when
//! `ELFIN_REQUIRE_NETNS` is unset.

mod common;

use std::process::Command;
use std::time::Duration;

use common::Binary;

const INSIDE: &str = "ELFIN_TEST_INSIDE_NETNS";
const TEST: &str = "addresses_of_one_ipv6_network_share_one_sources_connection_limit";

/// The gateway's address, and the clients' (three in one /64, one in another).
const GATEWAY: &str = "2001:db8:ffff::1";
const SAME_NETWORK: [&str; 3] = ["2001:db8:7::1", "2001:db8:7::2", "2001:db8:7:0:ffff::3"];
const OTHER_NETWORK: &str = "2001:db8:8::1";

#[test]
fn addresses_of_one_ipv6_network_share_one_sources_connection_limit() {
    if std::env::var_os(INSIDE).is_none() {
        run_in_a_namespace_of_its_own();
        return;
    }
    ip(&["link", "set", "lo", "up"]);
    for address in [GATEWAY, OTHER_NETWORK].iter().chain(&SAME_NETWORK) {
        ip(&[
            "-6",
            "addr",
            "add",
            &format!("{address}/64"),
            "dev",
            "lo",
            "nodad",
        ]);
    }
    let gw = Binary::start(&[
        ("ELFIN__SERVER__LISTEN", &format!("[{GATEWAY}]:0")),
        ("ELFIN__LIMITS__MAX_CONNECTIONS_PER_IP", "2"),
    ]);

    let from = |address: &str| gw.connect_from_ip(address.parse().unwrap());
    // Two addresses of one /64 take its two places; a third address of it is refused
    // (closed at accept, without a word).
    let first = from(SAME_NETWORK[0]);
    let second = from(SAME_NETWORK[1]);
    from(SAME_NETWORK[2]).expect_closed();
    // Another /64 is another source: admitted, and open while it says nothing.
    from(OTHER_NETWORK).expect_silence(Duration::from_millis(500));
    let line = gw.wait_log("refused connections from");
    assert!(line.contains("2001:db8:7:0:ffff::3"), "{line}");
    assert_eq!(
        gw.metric(r#"elfin_connections_refused_total{limit="max_connections_per_ip"}"#),
        1
    );

    // A place given back is the network's again, whichever address takes it.
    drop(first);
    std::thread::sleep(Duration::from_millis(200));
    from(SAME_NETWORK[2]).expect_silence(Duration::from_millis(500));
    drop(second);
}

/// Re-runs this test alone inside `unshare -n`.
fn run_in_a_namespace_of_its_own() {
    let out = Command::new("unshare")
        .args(["--net", "--"])
        .arg(std::env::current_exe().unwrap())
        .args(["--exact", TEST, "--nocapture", "--test-threads=1"])
        .env(INSIDE, "1")
        .output();
    let out = match out {
        Ok(out) => out,
        Err(e) => return cannot(&format!("cannot run unshare: {e}")),
    };
    let printed =
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    if !out.status.success() && printed.contains("unshare failed") {
        return cannot(&printed);
    }
    assert!(out.status.success(), "inside the namespace:\n{printed}");
    assert!(printed.contains("1 passed"), "{printed}");
}

fn cannot(why: &str) {
    assert!(
        std::env::var_os("ELFIN_REQUIRE_NETNS").is_none(),
        "no network namespace for the IPv6 test: {why}"
    );
    eprintln!("skipped: no network namespace for the IPv6 test: {why}");
}

fn ip(args: &[&str]) {
    let status = Command::new("ip").args(args).status().expect("run ip");
    assert!(status.success(), "ip {args:?}");
}
