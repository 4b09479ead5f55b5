//! What is particular to the MongoDB store, over the real wire protocol: the Web UI's
//! documents, round trips, outages, the gateway end to end. Against the stand-in
//! (tests/mongo/standin.py), or a real server when MONGODB_URI is set. The rules every
//! store follows are in tests/store.rs.

mod common;

use std::sync::Arc;
use std::time::Duration;

use bson::oid::ObjectId;
use bson::spec::ElementType;
use bson::{doc, Bson, Document};

use common::mongo::{CommandCounter, Mongo};
use common::{at, sighting};
use elfin_actors::store::mongo::MongoStore;
use elfin_actors::store::{Directory, Sighting, Sightings};

const MAC: &str = "F0FE6B2A1C3D";

async fn open_store(mongo: &Mongo) -> (MongoStore, CommandCounter) {
    let (options, counter) = mongo.options().await;
    (
        MongoStore::with_options(options, &mongo.database).unwrap(),
        counter,
    )
}

/// A user written straight into the database, as the Web UI does.
async fn web_ui_user(db: &mongodb::Database, uuid: &str, name: &str) -> ObjectId {
    let id = ObjectId::new();
    db.collection::<Document>("users")
        .insert_one(doc! {
            "_id": id, "uuid": uuid, "username": name, "password": "$2b$10$hash",
            "admin": false, "allDevices": [], "__v": 0,
        })
        .await
        .unwrap();
    id
}

async fn user_doc(db: &mongodb::Database, uuid: &str) -> Document {
    db.collection::<Document>("users")
        .find_one(doc! { "uuid": uuid })
        .await
        .unwrap()
        .unwrap()
}

async fn device_doc(db: &mongodb::Database, mac: &str) -> Option<Document> {
    db.collection::<Document>("devices")
        .find_one(doc! { "macAddress": mac })
        .await
        .unwrap()
}

fn all_devices(user: &Document) -> Vec<ObjectId> {
    user.get_array("allDevices")
        .unwrap()
        .iter()
        .map(|b| b.as_object_id().unwrap())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_device_is_inserted_with_web_ui_fields_and_listed_under_its_user() {
    let mongo = Mongo::start();
    let db = mongo.db().await;
    web_ui_user(&db, "ua", "alice").await;
    let (store, _) = open_store(&mongo).await;
    store
        .record(&[sighting("ua", MAC, "plc-1", 10)])
        .await
        .unwrap();

    let device = device_doc(&db, MAC).await.unwrap();
    let types: Vec<(&str, ElementType)> = ["_id", "hostName", "macAddress", "lastSeenDate", "__v"]
        .iter()
        .map(|k| {
            (
                *k,
                device
                    .get(k)
                    .map(Bson::element_type)
                    .unwrap_or(ElementType::Undefined),
            )
        })
        .collect();
    assert_eq!(
        types,
        [
            ("_id", ElementType::ObjectId),
            ("hostName", ElementType::String),
            ("macAddress", ElementType::String),
            ("lastSeenDate", ElementType::DateTime),
            ("__v", ElementType::Int32),
        ]
    );
    assert_eq!(device.get_i32("__v").unwrap(), 0);
    assert_eq!(
        device.get_datetime("lastSeenDate").unwrap().to_chrono(),
        at(10)
    );
    let user = user_doc(&db, "ua").await;
    assert_eq!(all_devices(&user), [device.get_object_id("_id").unwrap()]);
    assert_eq!(
        user.get_str("password").unwrap(),
        "$2b$10$hash",
        "password untouched"
    );
    assert_eq!(
        store.user_devices("ua").await.unwrap().unwrap()[0].host,
        "plc-1"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_device_reporting_another_uuid_moves_to_that_user() {
    let mongo = Mongo::start();
    let db = mongo.db().await;
    web_ui_user(&db, "ua", "alice").await;
    web_ui_user(&db, "ub", "bob").await;
    let (store, _) = open_store(&mongo).await;
    store.record(&[sighting("ua", MAC, "h", 1)]).await.unwrap();
    let id = device_doc(&db, MAC)
        .await
        .unwrap()
        .get_object_id("_id")
        .unwrap();

    store.record(&[sighting("ub", MAC, "h", 2)]).await.unwrap();
    assert_eq!(all_devices(&user_doc(&db, "ua").await), []);
    assert_eq!(
        all_devices(&user_doc(&db, "ub").await),
        [id],
        "same document, new owner"
    );
    // And back, through another store (no shared cache): still one owner.
    let (other, _) = open_store(&mongo).await;
    other.record(&[sighting("ua", MAC, "h", 3)]).await.unwrap();
    assert_eq!(all_devices(&user_doc(&db, "ua").await), [id]);
    assert_eq!(all_devices(&user_doc(&db, "ub").await), []);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_existing_device_listed_by_nobody_is_added_to_its_user() {
    let mongo = Mongo::start();
    let db = mongo.db().await;
    web_ui_user(&db, "ua", "alice").await;
    let id = ObjectId::new();
    db.collection::<Document>("devices")
        .insert_one(doc! {
            "_id": id, "hostName": "h", "macAddress": MAC,
            "lastSeenDate": bson::DateTime::from_chrono(at(100)), "__v": 0,
        })
        .await
        .unwrap();
    let (store, _) = open_store(&mongo).await;
    store.record(&[sighting("ua", MAC, "h", 5)]).await.unwrap();
    assert_eq!(all_devices(&user_doc(&db, "ua").await), [id]);
    let device = device_doc(&db, MAC).await.unwrap();
    assert_eq!(
        device.get_datetime("lastSeenDate").unwrap().to_chrono(),
        at(100)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_of_1000_known_devices_costs_one_write_round_trip() {
    let mongo = Mongo::start();
    let db = mongo.db().await;
    web_ui_user(&db, "ua", "alice").await;
    let (store, commands) = open_store(&mongo).await;
    let batch = |secs| -> Vec<Sighting> {
        (0..1000)
            .map(|i| sighting("ua", &format!("MAC{i:04}"), "h", secs))
            .collect()
    };
    // First sight: new devices, so inserts and ownership updates.
    assert_eq!(store.record(&batch(1)).await.unwrap().written, 1000);
    assert_eq!(all_devices(&user_doc(&db, "ua").await).len(), 1000);
    commands.take();
    if mongo.is_standin() {
        mongo.standin_reset().await;
    }

    // Steady state: every device known and owned.
    assert_eq!(store.record(&batch(2)).await.unwrap().written, 1000);
    assert_eq!(commands.take(), ["update"], "driver-side: one command");
    if mongo.is_standin() {
        assert_eq!(
            mongo.standin_counts().await,
            doc! { "update": 1 },
            "server-side"
        );
    }
    let device = device_doc(&db, "MAC0999").await.unwrap();
    assert_eq!(
        device.get_datetime("lastSeenDate").unwrap().to_chrono(),
        at(2)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn users_added_directly_in_the_database_are_picked_up() {
    let mongo = Mongo::start();
    let gw = mongo.gateway();
    let db = mongo.db().await;
    web_ui_user(&db, "web-ui-user", "carol").await;
    let (_device, _client) = tokio::task::spawn_blocking(move || {
        let device = gw.device("web-ui-user", MAC, "plc-1");
        let client = gw.tunnel("web-ui-user", MAC);
        (device, (client, gw))
    })
    .await
    .unwrap();
    for _ in 0..100 {
        if !all_devices(&user_doc(&db, "web-ui-user").await).is_empty() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("the device was not added to the Web UI user");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_gateway_creates_its_indexes_at_start() {
    let mongo = Mongo::start();
    let _gw = mongo.gateway();
    let db = mongo.db().await;
    for _ in 0..100 {
        let users = db.collection::<Document>("users").list_index_names().await;
        let devices = db
            .collection::<Document>("devices")
            .list_index_names()
            .await;
        if let (Ok(users), Ok(devices)) = (users, devices) {
            if users.iter().any(|n| n == "uuid_1") && devices.iter().any(|n| n == "macAddress_1") {
                return;
            }
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("indexes not created");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn end_to_end_on_mongodb_like_on_the_embedded_store() {
    let mongo = Mongo::start();
    let gw = mongo.gateway();
    tokio::task::spawn_blocking(move || {
        let uuid = gw.add_user("alice");
        assert!(gw.cli(&["user", "list"]).contains(&uuid));
        let mut device = gw.device(&uuid, MAC, "plc-1");
        let mut client = gw.tunnel(&uuid, MAC);
        client.send(format!("data;{uuid};T1;T1;1;\x00\x01;\n").as_bytes());
        assert_eq!(device.bytes(4), b"\x00\x01;\n");
        device.send(
            &[
                format!("data;{uuid};{MAC};plc-1;0;").as_bytes(),
                b"\xff\xfe",
            ]
            .concat(),
        );
        assert_eq!(client.bytes(2), b"\xff\xfe");
        let listed = gw.query(&uuid);
        assert_eq!(listed[0]["macaddress"], MAC);
        // Written to the database by the batch flush.
        let deadline = std::time::Instant::now() + common::TIMEOUT;
        while !gw.cli(&["device", "list", &uuid]).contains(MAC) {
            assert!(std::time::Instant::now() < deadline, "device never written");
            std::thread::sleep(Duration::from_millis(50));
        }
    })
    .await
    .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_database_outage_loses_no_sighting() {
    let mut mongo = Mongo::start();
    let db = mongo.db().await;
    web_ui_user(&db, "ua", "alice").await;
    let gw = Arc::new(mongo.gateway());

    let g = gw.clone();
    let before = tokio::task::spawn_blocking(move || g.device("ua", "AAAAAAAAAAAA", "before"))
        .await
        .unwrap();
    wait_for_device(&db, "AAAAAAAAAAAA").await;

    mongo.stop();
    let g = gw.clone();
    let (during, query) = tokio::task::spawn_blocking(move || {
        // Traffic goes on while the database is down, and query answers from memory.
        let mut during = g.device("ua", "BBBBBBBBBBBB", "during");
        let started = std::time::Instant::now();
        let listed = g.query("ua");
        let took = started.elapsed();
        during.send(b"beat;ua;BBBBBBBBBBBB;renamed;0");
        // A request on the same connection is answered after the beat is handled.
        during.send(b"\nconnme;ua;BBBBBBBBBBBB\n");
        assert!(common::failed_reason(&during.line()).contains("itself"));
        (during, (listed, took))
    })
    .await
    .unwrap();
    let (listed, took) = query;
    let macs: Vec<&str> = listed
        .as_array()
        .unwrap()
        .iter()
        .map(|d| d["macaddress"].as_str().unwrap())
        .collect();
    assert!(
        macs.contains(&"AAAAAAAAAAAA") && macs.contains(&"BBBBBBBBBBBB"),
        "{listed}"
    );
    assert!(
        took < Duration::from_secs(3),
        "query took {took:?} during the outage"
    );
    tokio::task::block_in_place(|| gw.wait_log("database write failed"));

    mongo.restart();
    let device = wait_for_device(&db, "BBBBBBBBBBBB").await;
    for _ in 0..200 {
        let device = device_doc(&db, "BBBBBBBBBBBB").await.unwrap();
        if device.get_str("hostName").unwrap() == "renamed" {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(
        device_doc(&db, "BBBBBBBBBBBB")
            .await
            .unwrap()
            .get_str("hostName")
            .unwrap(),
        "renamed"
    );
    assert!(all_devices(&user_doc(&db, "ua").await).contains(&device.get_object_id("_id").unwrap()));
    tokio::task::block_in_place(|| gw.wait_log("database is back"));
    drop((before, during));
}

async fn wait_for_device(db: &mongodb::Database, mac: &str) -> Document {
    for _ in 0..300 {
        if let Ok(Some(d)) = db
            .collection::<Document>("devices")
            .find_one(doc! { "macAddress": mac })
            .await
        {
            return d;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("{mac} never written");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_gateway_starts_and_tunnels_while_mongodb_is_down() {
    let mut mongo = Mongo::start();
    let db = mongo.db().await;
    web_ui_user(&db, "ua", "alice").await;
    mongo.stop();
    let gw = mongo.gateway();
    let (device, client) = tokio::task::spawn_blocking(move || {
        let mut device = gw.device("ua", MAC, "plc-1");
        let mut client = gw.tunnel("ua", MAC);
        device.send(format!("data;ua;{MAC};plc-1;0;up").as_bytes());
        assert_eq!(client.bytes(2), b"up");
        (device, (client, gw))
    })
    .await
    .unwrap();
    mongo.restart();
    wait_for_device(&db, MAC).await;
    drop((device, client));
}

#[test]
fn relay_uris_keep_credentials_and_options() {
    use common::mongo::{host_port, through_relay};
    assert_eq!(
        through_relay("mongodb://u:p@db.example:27018/admin?tls=false", 4000),
        "mongodb://u:p@127.0.0.1:4000/admin?tls=false&directConnection=true"
    );
    assert_eq!(
        through_relay("mongodb://localhost", 4000),
        "mongodb://127.0.0.1:4000/?directConnection=true"
    );
    assert_eq!(
        host_port("mongodb://u:p@db.example:27018/admin"),
        "db.example:27018"
    );
    assert_eq!(host_port("mongodb://localhost/?x=1"), "localhost:27017");
}

#[test]
fn readiness_follows_the_database() {
    let mut mongo = Mongo::start();
    let gw = mongo.gateway();
    let ready = || gw.get("/readyz");
    let wait_for = |status: u16| {
        let deadline = std::time::Instant::now() + common::TIMEOUT;
        loop {
            let got = ready();
            if got.status == status {
                return got;
            }
            assert!(std::time::Instant::now() < deadline, "{got:?}");
            std::thread::sleep(Duration::from_millis(100));
        }
    };
    wait_for(200);
    mongo.stop();
    let down = wait_for(503);
    assert_eq!(down.json()["ready"], false);
    let reason = down.json()["reason"].as_str().unwrap().to_owned();
    assert!(reason.contains("store"), "{reason}");
    // Liveness does not depend on the database.
    assert_eq!(gw.get("/healthz").status, 200);
    mongo.restart();
    wait_for(200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn removals_by_the_web_ui_and_the_cli_reach_open_connections_on_mongodb() {
    let mongo = Mongo::start();
    let db = mongo.db().await;
    let gw = mongo.gateway_with(&[("ELFIN__AUTH__DEVICES", "registered")]);
    let (alice, bob) = (gw.add_user("alice"), gw.add_user("bob"));
    for (uuid, mac) in [(&alice, MAC), (&bob, "B0B000000001")] {
        gw.cli(&["device", "add", uuid, mac, "plc"]);
    }
    let (a, b) = (alice.clone(), bob.clone());
    let gw = Arc::new(gw);
    let g = gw.clone();
    let (mut alices, mut bobs) = tokio::task::spawn_blocking(move || {
        (
            g.device(&a, MAC, "plc"),
            g.device(&b, "B0B000000001", "plc"),
        )
    })
    .await
    .unwrap();

    // The Web UI deletes Alice's device (findAndModify) and takes it off her list.
    let gone = db
        .collection::<Document>("devices")
        .find_one_and_delete(doc! { "macAddress": MAC })
        .await
        .unwrap()
        .unwrap();
    let id = gone.get_object_id("_id").unwrap();
    db.collection::<Document>("users")
        .update_one(
            doc! { "uuid": &alice },
            doc! { "$pull": { "allDevices": id } },
        )
        .await
        .unwrap();
    // Bob is removed with the command.
    let g = gw.clone();
    tokio::task::spawn_blocking(move || {
        assert!(g.cli(&["user", "remove", "bob"]).contains("removed"));
        alices.send(format!("beat;{alice};{MAC};plc;0").as_bytes());
        // Both connections are closed within 10 s, each with its reason.
        alices.expect_closed();
        bobs.expect_closed();
        g.wait_log("it was removed from the database");
        g.wait_log("its user was removed from the database");
    })
    .await
    .unwrap();
    // Alice's device is not written back by the beat it sent meanwhile.
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(device_doc(&db, MAC).await.is_none());
    assert_eq!(
        db.collection::<Document>("devices")
            .count_documents(doc! {})
            .await
            .unwrap(),
        1,
        "count_documents (aggregate) through the stand-in: only Bob's device row is left"
    );
}
