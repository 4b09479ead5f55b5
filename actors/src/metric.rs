//! The gateway's metrics: every name, its kind and its help text, in one catalogue.
//! Code records them by these names (`metrics::counter!(metric::TUNNELS_OPEN)`); the
//! admin server calls [`describe`] once so `/metrics` carries the help texts.

/// Connections accepted, by transport.
pub const CONNECTIONS_TOTAL: &str = "elfin_connections_total";
/// Connections refused at accept, by limit.
pub const CONNECTIONS_REFUSED_TOTAL: &str = "elfin_connections_refused_total";
/// Connections closed by a limit, by limit.
pub const CONNECTIONS_CLOSED_TOTAL: &str = "elfin_connections_closed_total";
/// Failed accept calls (e.g. out of descriptors).
pub const ACCEPT_ERRORS_TOTAL: &str = "elfin_accept_errors_total";
/// TLS handshakes, by result.
pub const TLS_HANDSHAKES_TOTAL: &str = "elfin_tls_handshakes_total";
/// Devices that reconnected while their old connection was open.
pub const DEVICE_TAKEOVERS_TOTAL: &str = "elfin_device_takeovers_total";
/// Tunnels ended because one side read nothing.
pub const TUNNELS_STALLED_TOTAL: &str = "elfin_tunnels_stalled_total";
/// Protocol messages, by type.
pub const MESSAGES_TOTAL: &str = "elfin_messages_total";
/// Malformed messages, by reason.
pub const MESSAGES_REJECTED_TOTAL: &str = "elfin_messages_rejected_total";
/// Device messages of unknown users, ignored.
pub const UNKNOWN_USER_MESSAGES_TOTAL: &str = "elfin_unknown_user_messages_total";
/// connme, connthem and query answered failed, by reason.
pub const REQUESTS_REFUSED_TOTAL: &str = "elfin_requests_refused_total";
/// Peers refused by a trust rule, by reason (README, "Threat model").
pub const REFUSALS_TOTAL: &str = "elfin_refusals_total";
/// Requests delayed by the per-connection rate limit.
pub const REQUESTS_PACED_TOTAL: &str = "elfin_requests_paced_total";
/// Requests naming a uuid that is no user's.
pub const FAILED_LOOKUPS_TOTAL: &str = "elfin_failed_lookups_total";
/// Failed look-ups answered late (abuse brake).
pub const FAILED_LOOKUPS_DELAYED_TOTAL: &str = "elfin_failed_lookups_delayed_total";
/// Turns a busy connection gave up to let others run.
pub const SESSION_YIELDS_TOTAL: &str = "elfin_session_yields_total";
/// Batches of sightings written to the store.
pub const STORE_BATCHES_TOTAL: &str = "elfin_store_batches_total";
/// Failed store writes.
pub const STORE_ERRORS_TOTAL: &str = "elfin_store_errors_total";
/// Device sightings written to the store.
pub const SIGHTINGS_WRITTEN_TOTAL: &str = "elfin_sightings_written_total";
/// Sightings the store refused for good.
pub const SIGHTINGS_DROPPED_TOTAL: &str = "elfin_sightings_dropped_total";
/// Sightings skipped: no user has their uuid.
pub const SIGHTINGS_UNKNOWN_USER_TOTAL: &str = "elfin_sightings_unknown_user_total";
/// Cross-node tunnel ends closed because their node or NATS was lost.
pub const CLUSTER_TUNNELS_LOST_TOTAL: &str = "elfin_cluster_tunnels_lost_total";
/// Messages and peer connections from other nodes rejected, by reason.
pub const CLUSTER_REJECTED_TOTAL: &str = "elfin_cluster_rejected_total";
/// Bytes carried by tunnels, by direction.
pub const TUNNEL_BYTES_TOTAL: &str = "elfin_tunnel_bytes_total";
/// Payload bytes with no tunnel to carry them.
pub const PAYLOAD_DROPPED_BYTES_TOTAL: &str = "elfin_payload_dropped_bytes_total";
/// Input bytes that were no message.
pub const GARBAGE_BYTES_TOTAL: &str = "elfin_garbage_bytes_total";
/// Audit records written.
pub const AUDIT_WRITTEN_TOTAL: &str = "elfin_audit_records_written_total";
/// Audit records dropped: refused by the database, or past the pending bound.
pub const AUDIT_DROPPED_TOTAL: &str = "elfin_audit_records_dropped_total";
/// Requests dropped unanswered because their connection's output had closed.
pub const REQUESTS_DROPPED_TOTAL: &str = "elfin_requests_dropped_total";
/// Payload tails held back because they could start a header.
pub const HELD_TAILS_TOTAL: &str = "elfin_held_tails_total";
/// Keys filed under a full table's shared entry, by table.
pub const BOUNDED_TABLE_OVERFLOWS_TOTAL: &str = "elfin_bounded_table_overflows_total";
/// Records the audit trail holds, by kind (read hourly).
pub const AUDIT_RECORDS: &str = "elfin_audit_records";
/// Devices claimed from another address within the online window ("when-silent").
pub const DEVICES_CONTESTED: &str = "elfin_devices_contested";
/// Open connections, by transport and role.
pub const CONNECTIONS_OPEN: &str = "elfin_connections_open";
/// Devices with a live connection.
pub const DEVICES_ONLINE: &str = "elfin_devices_online";
/// Open tunnels.
pub const TUNNELS_OPEN: &str = "elfin_tunnels_open";
/// Sightings waiting to be written.
pub const SIGHTINGS_PENDING: &str = "elfin_sightings_pending";
/// Cluster mode: 1 while this node is connected to NATS.
pub const CLUSTER_CONNECTED: &str = "elfin_cluster_connected";
/// Cluster mode: other nodes heard from lately.
pub const CLUSTER_NODES: &str = "elfin_cluster_nodes";
/// Cluster mode: tunnel ends here whose other end is on another node.
pub const CLUSTER_TUNNEL_ENDS: &str = "elfin_cluster_tunnel_ends";
/// How long held payload tails waited, by outcome.
pub const HEADER_HOLD_SECONDS: &str = "elfin_header_hold_seconds";
/// Store round trips, by operation.
pub const STORE_ROUND_TRIP_SECONDS: &str = "elfin_store_round_trip_seconds";

/// Fleet events emitted, by type.
pub const EVENTS_TOTAL: &str = "elfin_events_total";
/// Fleet events not emitted: past a device's budget, or said within the minute.
pub const EVENTS_SUPPRESSED_TOTAL: &str = "elfin_events_suppressed_total";
/// Devices away (grace period running) or announced offline, this node's record.
pub const DEVICES_AWAY: &str = "elfin_devices_away";
/// Webhook deliveries that succeeded, by endpoint.
pub const WEBHOOK_DELIVERED_TOTAL: &str = "elfin_webhook_delivered_total";
/// Webhook attempts that failed and are retried, by endpoint.
pub const WEBHOOK_RETRIES_TOTAL: &str = "elfin_webhook_retries_total";
/// Webhook events given up, by endpoint and reason (queue_full, expired).
pub const WEBHOOK_DROPPED_TOTAL: &str = "elfin_webhook_dropped_total";
/// Webhook events waiting, by endpoint.
pub const WEBHOOK_QUEUE_DEPTH: &str = "elfin_webhook_queue_depth";
/// From an event to its successful delivery, by endpoint.
pub const WEBHOOK_DELIVERY_SECONDS: &str = "elfin_webhook_delivery_seconds";
/// When a certificate the gateway presents stops being valid, by which.
pub const CERTIFICATE_EXPIRY: &str = "elfin_certificate_expiry_timestamp_seconds";

/// What kind of series a metric is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Counter,
    Gauge,
    Histogram,
}

/// Every metric: its name, kind, unit and help text.
pub const CATALOGUE: &[(&str, Kind, Option<metrics::Unit>, &str)] = &[
    (
        EVENTS_TOTAL,
        Kind::Counter,
        None,
        "Fleet events emitted by this node, by type (device.offline, ...).",
    ),
    (
        EVENTS_SUPPRESSED_TOTAL,
        Kind::Counter,
        None,
        "Fleet events not emitted, by type: past the device's audit budget, or a refusal said within the minute.",
    ),
    (
        DEVICES_AWAY,
        Kind::Gauge,
        None,
        "Devices this node keeps a fleet-event record of: away (grace period running) or announced offline.",
    ),
    (
        WEBHOOK_DELIVERED_TOTAL,
        Kind::Counter,
        None,
        "Webhook deliveries a receiver took (2xx), by endpoint.",
    ),
    (
        WEBHOOK_RETRIES_TOTAL,
        Kind::Counter,
        None,
        "Webhook attempts that failed and are retried with backoff, by endpoint.",
    ),
    (
        WEBHOOK_DROPPED_TOTAL,
        Kind::Counter,
        None,
        "Webhook events given up, by endpoint and reason (queue_full, expired).",
    ),
    (
        WEBHOOK_QUEUE_DEPTH,
        Kind::Gauge,
        None,
        "Webhook events waiting for delivery, by endpoint.",
    ),
    (
        WEBHOOK_DELIVERY_SECONDS,
        Kind::Histogram,
        Some(metrics::Unit::Seconds),
        "From an event to its successful delivery (retries included), by endpoint.",
    ),
    (
        CERTIFICATE_EXPIRY,
        Kind::Gauge,
        Some(metrics::Unit::Seconds),
        "When a certificate the gateway presents stops being valid (Unix time), by which: server (tls.cert), peer (cluster.peer_cert).",
    ),
    (
        DEVICES_CONTESTED,
        Kind::Gauge,
        None,
        "Devices a connection from another address claimed within the online window while auth.device_takeover = \"when-silent\" (refused, and shown on the device's page).",
    ),
    (
        AUDIT_RECORDS,
        Kind::Gauge,
        None,
        "Records the audit trail holds, by kind (tunnels, device_events, refusals), read a minute after start and hourly.",
    ),
    (
        BOUNDED_TABLE_OVERFLOWS_TOTAL,
        Kind::Counter,
        None,
        "Sources filed under a full per-source table's shared entry (paced together), by table.",
    ),
    (
        CONNECTIONS_TOTAL,
        Kind::Counter,
        None,
        "Connections accepted, by transport.",
    ),
    (
        CONNECTIONS_REFUSED_TOTAL,
        Kind::Counter,
        None,
        "Connections refused at accept, by limit.",
    ),
    (
        CONNECTIONS_CLOSED_TOTAL,
        Kind::Counter,
        None,
        "Connections closed by a limit, by limit.",
    ),
    (
        ACCEPT_ERRORS_TOTAL,
        Kind::Counter,
        None,
        "Failed accept calls (e.g. out of descriptors).",
    ),
    (
        TLS_HANDSHAKES_TOTAL,
        Kind::Counter,
        None,
        "TLS handshakes, by result.",
    ),
    (
        DEVICE_TAKEOVERS_TOTAL,
        Kind::Counter,
        None,
        "Devices that reconnected while their old connection was open.",
    ),
    (
        TUNNELS_STALLED_TOTAL,
        Kind::Counter,
        None,
        "Tunnels ended because one side read nothing.",
    ),
    (
        MESSAGES_TOTAL,
        Kind::Counter,
        None,
        "Protocol messages, by type.",
    ),
    (
        MESSAGES_REJECTED_TOTAL,
        Kind::Counter,
        None,
        "Malformed messages, by reason.",
    ),
    (
        UNKNOWN_USER_MESSAGES_TOTAL,
        Kind::Counter,
        None,
        "Device messages of unknown users, ignored.",
    ),
    (
        REQUESTS_REFUSED_TOTAL,
        Kind::Counter,
        None,
        "connme, connthem and query answered failed, by reason.",
    ),
    (
        REFUSALS_TOTAL,
        Kind::Counter,
        None,
        "Peers refused by a trust rule, by reason (README, \"Threat model\").",
    ),
    (
        REQUESTS_PACED_TOTAL,
        Kind::Counter,
        None,
        "Requests delayed by the per-connection rate limit.",
    ),
    (
        FAILED_LOOKUPS_TOTAL,
        Kind::Counter,
        None,
        "Requests naming a uuid that is no user's.",
    ),
    (
        FAILED_LOOKUPS_DELAYED_TOTAL,
        Kind::Counter,
        None,
        "Failed look-ups answered late (abuse brake).",
    ),
    (
        SESSION_YIELDS_TOTAL,
        Kind::Counter,
        None,
        "Turns a busy connection gave up to let others run.",
    ),
    (
        STORE_BATCHES_TOTAL,
        Kind::Counter,
        None,
        "Batches of sightings written to the store.",
    ),
    (
        STORE_ERRORS_TOTAL,
        Kind::Counter,
        None,
        "Failed store writes.",
    ),
    (
        SIGHTINGS_WRITTEN_TOTAL,
        Kind::Counter,
        None,
        "Device sightings written to the store.",
    ),
    (
        SIGHTINGS_DROPPED_TOTAL,
        Kind::Counter,
        None,
        "Sightings the store refused for good.",
    ),
    (
        SIGHTINGS_UNKNOWN_USER_TOTAL,
        Kind::Counter,
        None,
        "Sightings skipped: no user has their uuid.",
    ),
    (
        CLUSTER_TUNNELS_LOST_TOTAL,
        Kind::Counter,
        None,
        "Cross-node tunnel ends closed because their node or NATS was lost.",
    ),
    (
        CLUSTER_REJECTED_TOTAL,
        Kind::Counter,
        None,
        "Messages (NATS) and connections (peer port) claiming to be from a node, \
         rejected: unsigned, bad_mac, stale, replay, own_name, flood, unexpected, peer.",
    ),
    (
        TUNNEL_BYTES_TOTAL,
        Kind::Counter,
        Some(metrics::Unit::Bytes),
        "Bytes carried by tunnels, by direction.",
    ),
    (
        PAYLOAD_DROPPED_BYTES_TOTAL,
        Kind::Counter,
        Some(metrics::Unit::Bytes),
        "Payload bytes with no tunnel to carry them.",
    ),
    (
        GARBAGE_BYTES_TOTAL,
        Kind::Counter,
        Some(metrics::Unit::Bytes),
        "Input bytes that were no message.",
    ),
    (
        AUDIT_WRITTEN_TOTAL,
        Kind::Counter,
        None,
        "Audit records (tunnels, device events) written to the store.",
    ),
    (
        AUDIT_DROPPED_TOTAL,
        Kind::Counter,
        None,
        "Audit records dropped: refused by the database, or past the bound kept through an outage.",
    ),
    (
        REQUESTS_DROPPED_TOTAL,
        Kind::Counter,
        None,
        "Requests dropped unanswered because their connection's output had closed (the peer is gone).",
    ),
    (
        HELD_TAILS_TOTAL,
        Kind::Counter,
        None,
        "Payload tails held back because they could start the connection's next header.",
    ),
    (
        CONNECTIONS_OPEN,
        Kind::Gauge,
        None,
        "Open connections, by transport and role.",
    ),
    (
        DEVICES_ONLINE,
        Kind::Gauge,
        None,
        "Devices with a live connection.",
    ),
    (TUNNELS_OPEN, Kind::Gauge, None, "Open tunnels."),
    (
        SIGHTINGS_PENDING,
        Kind::Gauge,
        None,
        "Sightings waiting to be written.",
    ),
    (
        CLUSTER_CONNECTED,
        Kind::Gauge,
        None,
        "Cluster mode: 1 while this node is connected to NATS.",
    ),
    (
        CLUSTER_NODES,
        Kind::Gauge,
        None,
        "Cluster mode: other nodes heard from lately.",
    ),
    (
        CLUSTER_TUNNEL_ENDS,
        Kind::Gauge,
        None,
        "Cluster mode: tunnel ends here whose other end is on another node.",
    ),
    (
        HEADER_HOLD_SECONDS,
        Kind::Histogram,
        Some(metrics::Unit::Seconds),
        "How long held payload tails waited for the rest of a header, by outcome: \
         more_input (the next bytes decided), timed_out (forwarded as payload), closed.",
    ),
    (
        STORE_ROUND_TRIP_SECONDS,
        Kind::Histogram,
        Some(metrics::Unit::Seconds),
        "Store round trips, by operation.",
    ),
];

/// Registers every metric's help text with the installed recorder.
pub fn describe() {
    for &(name, kind, unit, help) in CATALOGUE {
        match (kind, unit) {
            (Kind::Counter, Some(unit)) => metrics::describe_counter!(name, unit, help),
            (Kind::Counter, None) => metrics::describe_counter!(name, help),
            (Kind::Gauge, Some(unit)) => metrics::describe_gauge!(name, unit, help),
            (Kind::Gauge, None) => metrics::describe_gauge!(name, help),
            (Kind::Histogram, Some(unit)) => metrics::describe_histogram!(name, unit, help),
            (Kind::Histogram, None) => metrics::describe_histogram!(name, help),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_name_is_listed_once_and_follows_prometheus_conventions() {
        let mut names: Vec<&str> = CATALOGUE.iter().map(|(name, ..)| *name).collect();
        names.sort_unstable();
        names.dedup();
        assert_eq!(names.len(), CATALOGUE.len(), "a name twice");
        for &(name, kind, unit, _) in CATALOGUE {
            assert!(name.starts_with("elfin_"), "{name}");
            assert_eq!(kind == Kind::Counter, name.ends_with("_total"), "{name}");
            if unit == Some(metrics::Unit::Seconds) {
                assert!(name.ends_with("_seconds"), "{name}");
            }
        }
    }

    #[test]
    fn the_code_records_only_catalogued_names() {
        let src = concat!(env!("CARGO_MANIFEST_DIR"), "/src");
        let mut stack = vec![std::path::PathBuf::from(src)];
        while let Some(path) = stack.pop() {
            if path.is_dir() {
                stack.extend(std::fs::read_dir(&path).unwrap().map(|e| e.unwrap().path()));
                continue;
            }
            if path.ends_with("metric.rs") {
                continue;
            }
            let text = std::fs::read_to_string(&path).unwrap();
            for macro_name in ["counter!(", "gauge!(", "histogram!("] {
                for (at, _) in text.match_indices(macro_name) {
                    let arg = text[at + macro_name.len()..].trim_start();
                    assert!(
                        !arg.starts_with('"'),
                        "{}: a metric named by a literal, not from the catalogue",
                        path.display()
                    );
                }
            }
        }
    }
}
