//! The store's contract (docs/PROTOCOL.md §5), role by role — sightings, the
//! directory, the audit log — written once and run against both backends: the
//! embedded store on a real database file, and the MongoDB store over the wire (the
//! stand-in, or the server at `MONGODB_URI`). A case that writes sightings checks them
//! through the directory, so it takes the whole store.

mod common;

use common::mongo::Mongo;
use common::{at, sighting};
use elfin_actors::audit::{
    Attempt, AuditBatch, AuditSize, DeviceChange, DeviceEvent, Filter, RefusalRecord, TunnelRecord,
};
use elfin_actors::store::embedded::EmbeddedStore;
use elfin_actors::store::mongo::MongoStore;
use elfin_actors::store::{AuditLog, Recorded, Sighting, Store, StoreError};

/// Writes one sighting and checks it was written.
async fn record(store: &dyn Store, s: Sighting) {
    let got = store.record(&[s]).await.unwrap();
    assert_eq!((got.written, got.unknown_user), (1, 0));
}

async fn sightings_of_unknown_users_are_not_written(store: &dyn Store) {
    let got = store
        .record(&[sighting("nobody", "M1", "h", 0)])
        .await
        .unwrap();
    assert_eq!(
        got,
        Recorded {
            written: 0,
            unknown_user: 1,
            refused: 0
        }
    );
    assert!(store.devices(None).await.unwrap().is_empty());
    assert_eq!(store.user_devices("nobody").await.unwrap(), None);
    assert!(!store.user_exists("nobody").await.unwrap());
}

async fn a_new_device_is_inserted_and_listed_under_its_user(store: &dyn Store) {
    store.add_user("alice", "ua").await.unwrap();
    assert!(store.user_exists("ua").await.unwrap());
    record(store, sighting("ua", "M1", "plc-1", 10)).await;
    let devices = store.user_devices("ua").await.unwrap().unwrap();
    assert_eq!(devices.len(), 1);
    assert_eq!(
        (devices[0].host.as_str(), devices[0].mac.as_str()),
        ("plc-1", "M1")
    );
    assert_eq!(devices[0].last_seen, at(10));
    let listed = store.devices(Some("ua")).await.unwrap();
    assert_eq!(listed[0].owner.as_deref(), Some("ua"));
}

async fn last_seen_never_moves_backwards_but_the_host_name_follows(store: &dyn Store) {
    store.add_user("alice", "ua").await.unwrap();
    record(store, sighting("ua", "M1", "old", 50)).await;
    record(store, sighting("ua", "M1", "new", 40)).await;
    let d = &store.user_devices("ua").await.unwrap().unwrap()[0];
    assert_eq!((d.host.as_str(), d.last_seen), ("new", at(50)));
    record(store, sighting("ua", "M1", "new", 60)).await;
    let d = &store.user_devices("ua").await.unwrap().unwrap()[0];
    assert_eq!(d.last_seen, at(60));
}

async fn a_device_reporting_another_uuid_changes_owner(store: &dyn Store) {
    store.add_user("alice", "ua").await.unwrap();
    store.add_user("bob", "ub").await.unwrap();
    record(store, sighting("ua", "M1", "h", 1)).await;
    record(store, sighting("ub", "M1", "h", 2)).await;
    assert!(store.user_devices("ua").await.unwrap().unwrap().is_empty());
    assert_eq!(store.user_devices("ub").await.unwrap().unwrap().len(), 1);
    let users = store.users().await.unwrap();
    let counts: Vec<(&str, usize)> = users
        .iter()
        .map(|u| (u.username.as_str(), u.devices))
        .collect();
    assert_eq!(counts, [("alice", 0), ("bob", 1)]);
    // And back: still exactly one owner.
    record(store, sighting("ua", "M1", "h", 3)).await;
    assert_eq!(store.user_devices("ua").await.unwrap().unwrap().len(), 1);
    assert!(store.user_devices("ub").await.unwrap().unwrap().is_empty());
    assert_eq!(store.devices(None).await.unwrap().len(), 1);
}

async fn duplicate_users_are_refused(store: &dyn Store) {
    store.add_user("alice", "ua").await.unwrap();
    assert!(matches!(
        store.add_user("alice", "other").await,
        Err(StoreError::Conflict(_))
    ));
    assert!(matches!(
        store.add_user("carol", "ua").await,
        Err(StoreError::Conflict(_))
    ));
}

async fn a_batch_is_written_whole_and_devices_keep_their_order(store: &dyn Store) {
    store.add_user("alice", "ua").await.unwrap();
    store.add_user("bob", "ub").await.unwrap();
    let batch: Vec<Sighting> = (0..300)
        .map(|i| {
            sighting(
                if i % 3 == 0 { "ub" } else { "ua" },
                &format!("M{i:03}"),
                "h",
                i,
            )
        })
        .chain([sighting("nobody", "X", "h", 0)])
        .collect();
    let got = store.record(&batch).await.unwrap();
    assert_eq!((got.written, got.unknown_user), (300, 1));
    let alice: Vec<String> = store
        .user_devices("ua")
        .await
        .unwrap()
        .unwrap()
        .into_iter()
        .map(|d| d.mac)
        .collect();
    let want: Vec<String> = (0..300)
        .filter(|i| i % 3 != 0)
        .map(|i| format!("M{i:03}"))
        .collect();
    assert_eq!(alice, want);
    assert_eq!(store.devices(Some("ub")).await.unwrap().len(), 100);
    assert_eq!(store.devices(None).await.unwrap().len(), 300);
}

async fn a_ping_answers_while_the_database_is_reachable(store: &dyn Store) {
    store.ping().await.unwrap();
}

fn tunnel(id: &str, uuid: &str, device: &str, opened: i64) -> TunnelRecord {
    TunnelRecord {
        id: id.into(),
        node: "gw-1".into(),
        uuid: uuid.into(),
        device: device.into(),
        device_addr: "192.0.2.10:5000".into(),
        peer_device: None,
        client_addr: "198.51.100.7:40000".into(),
        client_cert: Some("alice".into()),
        client_cert_serial: Some("1A2B".into()),
        opened: at(opened),
        closed: None,
        cause: None,
        to_device: 0,
        from_device: 0,
    }
}

fn event(uuid: &str, mac: &str, change: DeviceChange, at_ms: i64) -> DeviceEvent {
    DeviceEvent {
        at: at(at_ms),
        node: "gw-1".into(),
        uuid: uuid.into(),
        mac: mac.into(),
        host: "plc".into(),
        change,
        address: "192.0.2.10:5000".into(),
        cause: (change == DeviceChange::Offline).then(|| "silent".into()),
    }
}

fn batch(tunnels: &[TunnelRecord], events: &[DeviceEvent]) -> AuditBatch {
    AuditBatch {
        tunnels: tunnels.to_vec(),
        events: events.to_vec(),
        refusals: Vec::new(),
    }
}

fn refusal(
    uuid: Option<&str>,
    device: Option<&str>,
    request: Attempt,
    at_ms: i64,
) -> RefusalRecord {
    RefusalRecord {
        at: at(at_ms),
        node: "gw-1".into(),
        request,
        uuid: uuid.map(str::to_owned),
        device: device.map(str::to_owned),
        reason: "user_binding".into(),
        detail: "connme for user u… with a client certificate: it names user \"bob\"".into(),
        source: "198.51.100.7:40000".into(),
        certificate: Some("bob".into()),
        certificate_serial: Some("0C0FFEE0".into()),
    }
}

fn all() -> Filter {
    Filter {
        limit: 100,
        ..Filter::default()
    }
}

async fn a_tunnel_is_one_record_from_open_to_close(store: &dyn AuditLog) {
    let open = tunnel("t1", "ua", "M1", 1_000);
    store
        .write_audit(&batch(std::slice::from_ref(&open), &[]))
        .await
        .unwrap();
    assert_eq!(
        store.audit_tunnels(&all()).await.unwrap(),
        std::slice::from_ref(&open)
    );
    let closed = TunnelRecord {
        closed: Some(at(9_000)),
        cause: Some("client closed".into()),
        to_device: 5_000_000_000,
        from_device: 7,
        ..open
    };
    store
        .write_audit(&batch(std::slice::from_ref(&closed), &[]))
        .await
        .unwrap();
    assert_eq!(store.audit_tunnels(&all()).await.unwrap(), [closed]);
}

async fn audit_records_are_filtered_and_paged_newest_first(store: &dyn AuditLog) {
    let mut tunnels: Vec<TunnelRecord> = (0..5)
        .map(|i| tunnel(&format!("t{i}"), "ua", "M1", 1_000 * (i + 1)))
        .collect();
    tunnels.push(tunnel("b1", "ub", "M2", 2_500));
    let mut pair = tunnel("c1", "ua", "M3", 3_500);
    pair.peer_device = Some("M1".into());
    tunnels.push(pair);
    let events = [
        event("ua", "M1", DeviceChange::Online, 100),
        event("ua", "M1", DeviceChange::Offline, 200),
        event("ub", "M2", DeviceChange::Online, 300),
        event("ua", "M1", DeviceChange::Refused, 400),
    ];
    store.write_audit(&batch(&tunnels, &events)).await.unwrap();

    let ids = |records: Vec<TunnelRecord>| records.into_iter().map(|t| t.id).collect::<Vec<_>>();
    let of_m1 = Filter {
        mac: Some("M1".into()),
        ..all()
    };
    // A connthem tunnel counts for both of its devices.
    assert_eq!(
        ids(store.audit_tunnels(&of_m1).await.unwrap()),
        ["t4", "t3", "c1", "t2", "t1", "t0"]
    );
    let page = Filter {
        offset: 2,
        limit: 2,
        ..of_m1.clone()
    };
    assert_eq!(ids(store.audit_tunnels(&page).await.unwrap()), ["c1", "t2"]);
    let of_bob = Filter {
        uuid: Some("ub".into()),
        ..all()
    };
    assert_eq!(ids(store.audit_tunnels(&of_bob).await.unwrap()), ["b1"]);
    // Since: tunnels still open or closed after it.
    let since = Filter {
        since: Some(at(4_500)),
        ..all()
    };
    assert_eq!(
        store.audit_tunnels(&since).await.unwrap().len(),
        7,
        "all still open"
    );

    let changes = |events: Vec<DeviceEvent>| {
        events
            .into_iter()
            .map(|e| (e.mac, e.change))
            .collect::<Vec<_>>()
    };
    let m1 = store.audit_devices(&of_m1).await.unwrap();
    assert_eq!(m1[1].cause.as_deref(), Some("silent"));
    assert_eq!(
        changes(m1),
        [
            ("M1".to_owned(), DeviceChange::Refused),
            ("M1".to_owned(), DeviceChange::Offline),
            ("M1".to_owned(), DeviceChange::Online),
        ]
    );
    let recent = Filter {
        since: Some(at(250)),
        ..all()
    };
    assert_eq!(store.audit_devices(&recent).await.unwrap().len(), 2);
}

async fn records_past_the_retention_are_pruned(store: &dyn AuditLog) {
    let mut old = tunnel("old", "ua", "M1", 1_000);
    old.closed = Some(at(2_000));
    let mut long = tunnel("long", "ua", "M1", 1_000);
    long.closed = Some(at(60_000));
    let open = tunnel("open", "ua", "M1", 50_000);
    store
        .write_audit(&batch(
            &[old, long, open],
            &[
                event("ua", "M1", DeviceChange::Online, 1_000),
                event("ua", "M1", DeviceChange::Offline, 60_000),
            ],
        ))
        .await
        .unwrap();
    assert_eq!(store.prune_audit(at(10_000)).await.unwrap(), 2);
    let left: Vec<String> = store
        .audit_tunnels(&all())
        .await
        .unwrap()
        .into_iter()
        .map(|t| t.id)
        .collect();
    assert_eq!(left, ["open", "long"]);
    assert_eq!(store.audit_devices(&all()).await.unwrap().len(), 1);
}

async fn refusals_are_recorded_filtered_counted_and_pruned(store: &dyn AuditLog) {
    let refusals = AuditBatch {
        refusals: vec![
            refusal(Some("ua"), Some("M1"), Attempt::Connme, 1_000),
            refusal(None, None, Attempt::Handshake, 2_000),
            refusal(Some("ub"), None, Attempt::Query, 3_000),
            refusal(Some("ua"), Some("M1"), Attempt::Takeover, 50_000),
        ],
        ..batch(&[tunnel("t1", "ua", "M1", 1_000)], &[])
    };
    store.write_audit(&refusals).await.unwrap();
    let all_refusals = store.audit_refusals(&all()).await.unwrap();
    assert_eq!(all_refusals.len(), 4);
    assert_eq!(
        all_refusals[0], refusals.refusals[3],
        "newest first, as written"
    );
    let of_m1 = Filter {
        mac: Some("M1".into()),
        ..all()
    };
    let requests: Vec<Attempt> = store
        .audit_refusals(&of_m1)
        .await
        .unwrap()
        .into_iter()
        .map(|r| r.request)
        .collect();
    assert_eq!(requests, [Attempt::Takeover, Attempt::Connme]);
    let of_ub = Filter {
        uuid: Some("ub".into()),
        ..all()
    };
    assert_eq!(store.audit_refusals(&of_ub).await.unwrap().len(), 1);
    assert_eq!(
        store.audit_size().await.unwrap(),
        AuditSize {
            tunnels: 1,
            device_events: 0,
            refusals: 4
        }
    );
    // The three old refusals, and the tunnel (open since long before).
    assert_eq!(store.prune_audit(at(10_000)).await.unwrap(), 4);
    assert_eq!(store.audit_refusals(&all()).await.unwrap().len(), 1);
}

async fn the_directory_follows_removals_and_admin_changes(store: &dyn Store) {
    store.add_user("alice", "ua").await.unwrap();
    store.add_user("bob", "ub").await.unwrap();
    store
        .record(&[
            sighting("ua", "M1", "plc", 1),
            sighting("ua", "M2", "pump", 1),
        ])
        .await
        .unwrap();
    let members = store.members(true).await.unwrap();
    assert_eq!(members.len(), 2);
    let mut macs: Vec<&String> = members["ua"].devices.iter().collect();
    macs.sort();
    assert_eq!(macs, ["M1", "M2"]);
    assert!(!members["ub"].admin);
    assert!(store.members(false).await.unwrap()["ua"].devices.is_empty());

    assert!(store.remove_device("M1").await.unwrap());
    assert!(!store.remove_device("M1").await.unwrap(), "gone already");
    assert!(store.set_admin("bob", true).await.unwrap());
    assert!(!store.set_admin("nobody", true).await.unwrap());
    let members = store.members(true).await.unwrap();
    assert_eq!(members["ua"].devices.len(), 1);
    assert!(members["ub"].admin);

    // Recording existing devices only: a removed one is not written back.
    store.forget_users(&["ua".to_owned()]);
    let recorded = store
        .record_existing(&[
            sighting("ua", "M1", "plc", 5),
            sighting("ua", "M2", "pump", 5),
        ])
        .await
        .unwrap();
    assert_eq!((recorded.written, recorded.refused), (1, 1));
    let devices = store.user_devices("ua").await.unwrap().unwrap();
    assert_eq!(devices.len(), 1);
    assert_eq!(devices[0].mac, "M2");
    assert_eq!(devices[0].last_seen, at(5));

    assert!(store.remove_user("alice").await.unwrap());
    store.forget_users(&["ua".to_owned()]);
    assert!(!store.user_exists("ua").await.unwrap());
    assert!(!store.members(false).await.unwrap().contains_key("ua"));
}

/// One test per contract case and backend, grouped by role (`sightings::embedded::…`).
macro_rules! contract {
    ($role:ident: $($case:ident),* $(,)?) => {
        mod $role {
            mod embedded {
                $(
                    #[tokio::test]
                    async fn $case() {
                        let dir = tempfile::tempdir().unwrap();
                        let path = dir.path().join("elfin.db");
                        let store = crate::EmbeddedStore::open(&path).unwrap();
                        crate::$case(&store).await;
                    }
                )*
            }

            mod mongodb {
                $(
                    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                    async fn $case() {
                        let mongo = crate::Mongo::start();
                        let (options, _) = mongo.options().await;
                        let store =
                            crate::MongoStore::with_options(options, &mongo.database).unwrap();
                        crate::$case(&store).await;
                    }
                )*
            }
        }
    };
}

contract!(
    sightings: sightings_of_unknown_users_are_not_written,
    a_new_device_is_inserted_and_listed_under_its_user,
    last_seen_never_moves_backwards_but_the_host_name_follows,
    a_device_reporting_another_uuid_changes_owner,
    a_batch_is_written_whole_and_devices_keep_their_order,
);

contract!(
    directory: duplicate_users_are_refused,
    a_ping_answers_while_the_database_is_reachable,
    the_directory_follows_removals_and_admin_changes,
);

contract!(
    audit_log: a_tunnel_is_one_record_from_open_to_close,
    audit_records_are_filtered_and_paged_newest_first,
    records_past_the_retention_are_pruned,
    refusals_are_recorded_filtered_counted_and_pruned,
);
