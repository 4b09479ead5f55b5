//! Client certificates bound to their user (`auth.clients = "user-cert"`) on the real
//! binary: a certificate reaches its own user's devices and no other's, an admin's
//! reaches every user's, `user cert` issues a PKCS#12 key store the client loads, and
//! `user cert --revoke` with SIGHUP shuts a certificate out. Certificates made by
//! `openssl` work as well as the command's.

mod common;

use std::path::Path;
use std::process::Command;
use std::sync::Arc;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use rustls::{ClientConfig, RootCertStore};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_rustls::client::TlsStream;
use tokio_rustls::TlsConnector;

use common::webhooks::{Receiver, SECRET};
use common::{failed_reason, run_cli, Binary};

const ALICE_PLC: &str = "A11CE0000001";
const BOB_PLC: &str = "B0B000000001";

/// Runs `openssl` with `args` (split at spaces), then `subject` if given.
fn openssl(dir: &Path, args: &str, subject: Option<&str>) {
    let mut all: Vec<&str> = args.split_whitespace().collect();
    all.extend(subject.map(|s| ["-subj", s]).into_iter().flatten());
    let out = Command::new("openssl")
        .current_dir(dir)
        .args(&all)
        .output()
        .expect("openssl (tests/run.sh installs it)");
    assert!(
        out.status.success(),
        "openssl {all:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A gateway whose clients need a certificate bound to their user, with the CA,
/// server certificate and revocation list files `openssl_pki` makes.
const USER_CERT: [(&str, &str); 6] = [
    ("ELFIN__TLS__CERT", "server.pem"),
    ("ELFIN__TLS__KEY", "server.key"),
    ("ELFIN__TLS__CLIENT_CA", "ca.pem"),
    ("ELFIN__TLS__CLIENT_CA_KEY", "ca.key"),
    ("ELFIN__TLS__CLIENT_CRL", "clients.crl"),
    ("ELFIN__AUTH__CLIENTS", "user-cert"),
];

/// Adds user `name` with the command; its uuid.
fn add_user(dir: &tempfile::TempDir, name: &str) -> String {
    run_cli(dir, &USER_CERT, &["user", "add", name])
        .lines()
        .next()
        .unwrap()
        .to_owned()
}

const NEW_KEY: &str = "-newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes";

/// With openssl: a CA, the gateway's certificate for localhost, and the extensions
/// of a client certificate (`client.ext`).
fn openssl_pki(dir: &Path) {
    let ca = format!("req -x509 {NEW_KEY} -keyout ca.key -out ca.pem -days 30");
    openssl(dir, &ca, Some("/CN=Test clients CA"));
    std::fs::write(dir.join("server.ext"), "subjectAltName=DNS:localhost\n").unwrap();
    openssl_leaf(dir, "server", "localhost", "server.ext");
    std::fs::write(dir.join("client.ext"), "extendedKeyUsage=clientAuth\n").unwrap();
}

/// With openssl: a certificate with common name `name`, signed by the CA, with the
/// extensions in `ext`, in `<file>.pem` and `<file>.key`.
fn openssl_leaf(dir: &Path, file: &str, name: &str, ext: &str) {
    let request = format!("req {NEW_KEY} -keyout {file}.key -out {file}.csr");
    openssl(dir, &request, Some(&format!("/CN={name}")));
    let sign = format!(
        "x509 -req -in {file}.csr -CA ca.pem -CAkey ca.key -CAcreateserial -days 30 \
         -extfile {ext} -out {file}.pem"
    );
    openssl(dir, &sign, None);
}

/// A client that trusts the CA and presents this certificate chain and key.
fn client(
    dir: &Path,
    chain: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
) -> Arc<ClientConfig> {
    let mut roots = RootCertStore::empty();
    roots
        .add(CertificateDer::from_pem_file(dir.join("ca.pem")).unwrap())
        .unwrap();
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    Arc::new(
        ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(roots)
            .with_client_auth_cert(chain, key)
            .unwrap(),
    )
}

/// The key and chain in a PKCS#12 key store, as the desktop client loads it.
fn from_p12(dir: &Path, file: &str, password: &str) -> Arc<ClientConfig> {
    let data = std::fs::read(dir.join(file)).unwrap();
    let store = p12_keystore::KeyStore::from_pkcs12(&data, password, Default::default()).unwrap();
    let (_, chain) = store.private_key_chain().expect("a key with its chain");
    let certs = chain
        .certs()
        .iter()
        .map(|c| CertificateDer::from(c.as_der().to_vec()))
        .collect();
    let key = PrivateKeyDer::try_from(chain.key().as_der().to_vec()).unwrap();
    client(dir, certs, key)
}

fn from_pem(dir: &Path, file: &str) -> Arc<ClientConfig> {
    let chain = vec![CertificateDer::from_pem_file(dir.join(format!("{file}.pem"))).unwrap()];
    let key = PrivateKeyDer::from_pem_file(dir.join(format!("{file}.key"))).unwrap();
    client(dir, chain, key)
}

async fn connect(gw: &Binary, config: Arc<ClientConfig>) -> std::io::Result<TlsStream<TcpStream>> {
    let tcp = TcpStream::connect(gw.addr).await?;
    let name = ServerName::try_from("localhost").unwrap();
    TlsConnector::from(config).connect(name, tcp).await
}

/// Sends a request and reads its one-line reply (`None` if the connection ends
/// first, as after a refused handshake).
async fn ask(stream: &mut TlsStream<TcpStream>, request: &str) -> Option<String> {
    stream.write_all(request.as_bytes()).await.ok()?;
    let mut line = Vec::new();
    let mut byte = [0u8; 1];
    loop {
        match stream.read(&mut byte).await {
            Ok(1) if byte[0] == b'\n' => return Some(String::from_utf8(line).unwrap()),
            Ok(1) => line.push(byte[0]),
            _ => return None,
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_certificate_reaches_its_own_users_devices_and_an_admins_reaches_all() {
    let dir = Arc::new(tempfile::tempdir().unwrap());
    let d = dir.path();
    openssl_pki(d);
    let env = USER_CERT;
    let uuid = |name: &str| add_user(&dir, name);
    let (alice, bob) = (uuid("alice"), uuid("bob"));
    uuid("root");
    // The Web UI's admin flag.
    let db = rusqlite::Connection::open(d.join("elfin.db")).unwrap();
    db.execute("UPDATE users SET admin = 1 WHERE username = 'root'", [])
        .unwrap();
    drop(db);
    let issued = run_cli(
        &dir,
        &env,
        &[
            "user",
            "cert",
            "alice",
            "--out",
            "alice.p12",
            "--password",
            "pw-1",
        ],
    );
    assert!(issued.contains("serial "), "{issued}");
    {
        use std::os::unix::fs::PermissionsExt as _;
        let mode = std::fs::metadata(d.join("alice.p12"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600, "a key store is its owner's only");
    }
    let generated = run_cli(&dir, &env, &["user", "cert", "bob"]);
    let password = generated
        .lines()
        .find_map(|l| l.strip_prefix("password "))
        .unwrap()
        .to_owned();
    openssl_leaf(d, "root", "root", "client.ext");

    let gw = Binary::start_in(dir.clone(), &env);
    // Devices beat in plain TCP as always; a plain query is refused here, so the
    // log says when they are online.
    let mut plcs = Vec::new();
    for (uuid, mac) in [(&alice, ALICE_PLC), (&bob, BOB_PLC)] {
        let mut plc = gw.connect();
        plc.send(format!("beat;{uuid};{mac};plc;0").as_bytes());
        gw.wait_log(&format!("device {mac} (plc)"));
        plcs.push(plc);
    }

    // Alice's certificate (from `user cert`): her device, not Bob's.
    let alice_cert = from_p12(d, "alice.p12", "pw-1");
    let mut tls = connect(&gw, alice_cert.clone()).await.unwrap();
    assert_eq!(
        ask(&mut tls, &format!("connme;{alice};{ALICE_PLC}\n"))
            .await
            .unwrap(),
        r#"{"status":"success"}"#
    );
    let mut tls = connect(&gw, alice_cert.clone()).await.unwrap();
    let refused = ask(&mut tls, &format!("connme;{bob};{BOB_PLC}\n"))
        .await
        .unwrap();
    assert_eq!(
        failed_reason(&refused),
        format!("device {BOB_PLC} is offline")
    );
    assert_eq!(
        ask(&mut tls, &format!("query;{bob}\n")).await.unwrap(),
        "[]"
    );
    let line = gw.wait_log("refused 127.0.0.1 (user_binding)");
    assert!(line.contains("\"alice\""), "{line}");

    // Bob's, with the password the command made up.
    let mut tls = connect(&gw, from_p12(d, "bob.p12", &password))
        .await
        .unwrap();
    let listed = ask(&mut tls, &format!("query;{bob}\n")).await.unwrap();
    assert!(listed.contains(BOB_PLC), "{listed}");

    // An admin's certificate, made by openssl, reaches every user's devices.
    let mut tls = connect(&gw, from_pem(d, "root")).await.unwrap();
    assert_eq!(
        ask(&mut tls, &format!("connme;{bob};{BOB_PLC}\n"))
            .await
            .unwrap(),
        r#"{"status":"success"}"#
    );

    // The audit trail names the certificate each tunnel was opened with.
    let certificates = common::eventually(
        || {
            let rows = gw.get("/api/audit").json()["rows"].clone();
            let mut certificates: Vec<String> = rows
                .as_array()
                .unwrap()
                .iter()
                .filter_map(|r| r["client_certificate"].as_str().map(str::to_owned))
                .collect();
            certificates.sort();
            certificates
        },
        |certificates| certificates.len() == 2,
    );
    assert_eq!(certificates, ["alice", "root"]);
    // Beside each name, the certificate's serial: two certificates of one user differ.
    let alice_serial = issued
        .lines()
        .find_map(|l| l.strip_prefix("serial "))
        .and_then(|rest| rest.split_whitespace().next())
        .unwrap()
        .to_owned();
    let rows = gw.get("/api/audit").json()["rows"].clone();
    let alice_row = rows
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["client_certificate"] == "alice")
        .unwrap();
    assert_eq!(
        alice_row["client_certificate_serial"].as_str().unwrap(),
        alice_serial
    );

    // Revoked and re-read: Alice's certificate no longer completes a handshake.
    let revoked = run_cli(&dir, &env, &["user", "cert", "--revoke", "alice"]);
    assert!(revoked.contains("revoked "), "{revoked}");
    gw.signal("HUP");
    let reloaded = gw.wait_log("TLS certificate reloaded");
    assert!(
        reloaded.contains("revocation list with 1 revoked certificate"),
        "{reloaded}"
    );
    let shut_out = match connect(&gw, alice_cert).await {
        Err(_) => true,
        Ok(mut tls) => ask(&mut tls, &format!("query;{alice}\n")).await.is_none(),
    };
    assert!(shut_out, "a revoked certificate still works");
    let line = gw.wait_log("refused 127.0.0.1 (certificate)");
    assert!(line.contains("revoked"), "{line}");
    // The refused handshake is in the audit trail, and so is Alice's refused request
    // for Bob's device, with her certificate.
    let refusals = common::eventually(
        || gw.get("/api/audit?kind=refusals").json()["rows"].clone(),
        |rows| {
            rows.as_array()
                .is_some_and(|r| r.iter().any(|r| r["request"] == "handshake"))
        },
    );
    let handshake = refusals
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["request"] == "handshake")
        .unwrap();
    assert_eq!(handshake["reason"], "certificate");
    assert!(handshake["detail"].as_str().unwrap().contains("revoked"));
    let binding = refusals
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["reason"] == "user_binding" && r["request"] == "connme")
        .unwrap();
    assert_eq!(binding["device"], BOB_PLC);
    assert_eq!(binding["certificate"], "alice");
    assert_eq!(
        binding["certificate_serial"].as_str().unwrap(),
        alice_serial
    );
}

/// Whether the gateway ends `stream` within a few seconds (reads it to its end).
async fn ended(stream: &mut TlsStream<TcpStream>) -> bool {
    let mut buf = [0u8; 4096];
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(20);
    loop {
        match tokio::time::timeout_at(deadline, stream.read(&mut buf)).await {
            Err(_) => return false,
            Ok(Ok(0) | Err(_)) => return true,
            Ok(Ok(_)) => {}
        }
    }
}

/// With rcgen: a certificate for `name` signed by the openssl-made CA, expiring
/// `valid_secs` from now, in `<file>.pem` and `<file>.key`.
fn short_lived_leaf(dir: &Path, file: &str, name: &str, valid_secs: i64) {
    let ca_key =
        rcgen::KeyPair::from_pem(&std::fs::read_to_string(dir.join("ca.key")).unwrap()).unwrap();
    let ca = rcgen::CertificateParams::from_ca_cert_pem(
        &std::fs::read_to_string(dir.join("ca.pem")).unwrap(),
    )
    .unwrap()
    .self_signed(&ca_key)
    .unwrap();
    let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    params
        .distinguished_name
        .push(rcgen::DnType::CommonName, name);
    params.extended_key_usages = vec![rcgen::ExtendedKeyUsagePurpose::ClientAuth];
    let now = time::OffsetDateTime::now_utc();
    params.not_before = now - time::Duration::hours(1);
    params.not_after = now + time::Duration::seconds(valid_secs);
    let key = rcgen::KeyPair::generate().unwrap();
    let cert = params.signed_by(&key, &ca, &ca_key).unwrap();
    std::fs::write(dir.join(format!("{file}.pem")), cert.pem()).unwrap();
    std::fs::write(dir.join(format!("{file}.key")), key.serialize_pem()).unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn revocation_and_expiry_reach_open_connections_and_certificates_made_elsewhere() {
    let dir = Arc::new(tempfile::tempdir().unwrap());
    let d = dir.path();
    openssl_pki(d);
    let env = USER_CERT;
    let uuid = |name: &str| add_user(&dir, name);
    let (alice, bob) = (uuid("alice"), uuid("bob"));
    let cli = |args: &[&str]| run_cli(&dir, &env, args);
    cli(&[
        "user",
        "cert",
        "alice",
        "--out",
        "alice.p12",
        "--password",
        "pw",
    ]);
    // Alice's second certificate, made with openssl: the tool never saw it.
    openssl_leaf(d, "alice-openssl", "alice", "client.ext");
    openssl_leaf(d, "bob-openssl", "bob", "client.ext");
    openssl_leaf(d, "bob-other", "bob", "client.ext");
    short_lived_leaf(d, "bob-brief", "bob", 8);

    // Certificate refusals go to a webhook, verified by the reference library.
    let receiver = Receiver::start(SECRET, &[]);
    let hooks = receiver
        .as_ref()
        .map(|r| r.setting(SECRET, r#"events = ["client.*"]"#));
    let mut env = env.to_vec();
    env.extend(hooks.as_deref().map(|h| ("ELFIN__WEBHOOKS", h)));
    let gw = Binary::start_in(dir.clone(), &env);
    let mut plc = gw.connect();
    plc.send(format!("beat;{alice};{ALICE_PLC};plc;0").as_bytes());
    gw.wait_log(&format!("device {ALICE_PLC} (plc)"));
    let mut bob_plc = gw.connect();
    bob_plc.send(format!("beat;{bob};{BOB_PLC};plc;0").as_bytes());
    gw.wait_log(&format!("device {BOB_PLC} (plc)"));

    // Open before the revocation: a tunnel with the tool's certificate, a querying
    // connection with openssl's; and a connection whose certificate expires soon.
    let mut tunnel = connect(&gw, from_p12(d, "alice.p12", "pw")).await.unwrap();
    let ok = ask(&mut tunnel, &format!("connme;{alice};{ALICE_PLC}\n")).await;
    assert_eq!(ok.as_deref(), Some(r#"{"status":"success"}"#));
    tunnel
        .write_all(format!("data;{alice};T;T;1;before").as_bytes())
        .await
        .unwrap();
    assert_eq!(plc.bytes(6), b"before");
    let mut querying = connect(&gw, from_pem(d, "alice-openssl")).await.unwrap();
    assert!(ask(&mut querying, &format!("query;{alice}\n"))
        .await
        .is_some());
    let mut brief = connect(&gw, from_pem(d, "bob-brief")).await.unwrap();
    assert!(ask(&mut brief, &format!("query;{bob}\n")).await.is_some());

    // The expiring certificate's connection is closed at its expiry.
    assert!(
        ended(&mut brief).await,
        "closed when its certificate expired"
    );
    gw.wait_log("is closed: the certificate is expired");

    // Alice is revoked as a whole, and one of Bob's certificates by its file.
    cli(&["user", "cert", "--revoke", "alice"]);
    let revoked = cli(&["user", "cert", "--revoke-file", "bob-openssl.pem"]);
    assert!(revoked.starts_with("revoked "), "{revoked}");
    let mut bob_other = connect(&gw, from_pem(d, "bob-other")).await.unwrap();
    assert!(ask(&mut bob_other, &format!("query;{bob}\n"))
        .await
        .is_some());
    gw.signal("HUP");
    let reloaded = gw.wait_log("TLS certificate reloaded");
    assert!(reloaded.contains("1 revoked user(s)"), "{reloaded}");

    assert!(ended(&mut tunnel).await, "the tunnel's client is closed");
    assert!(
        ended(&mut querying).await,
        "the openssl-made certificate's too"
    );
    let line = gw.wait_log("certificate of \"alice\"");
    assert!(
        line.contains("serial") && line.contains("revoked"),
        "{line}"
    );
    // Bob's other certificate is untouched.
    assert!(ask(&mut bob_other, &format!("query;{bob}\n"))
        .await
        .is_some());

    // New handshakes: none of the revoked certificates gets a request through.
    for config in [
        from_p12(d, "alice.p12", "pw"),
        from_pem(d, "alice-openssl"),
        from_pem(d, "bob-openssl"),
    ] {
        let refused = match connect(&gw, config).await {
            Err(_) => true,
            Ok(mut tls) => ask(&mut tls, &format!("query;{bob}\n")).await.is_none(),
        };
        assert!(refused, "a revoked certificate still works");
    }
    // A certificate issued to Alice after her revocation works.
    cli(&[
        "user",
        "cert",
        "alice",
        "--out",
        "alice-new.p12",
        "--password",
        "pw",
    ]);
    gw.signal("HUP");
    gw.wait_log("2 revoked certificate(s)");
    let mut fresh = connect(&gw, from_p12(d, "alice-new.p12", "pw"))
        .await
        .unwrap();
    assert!(ask(&mut fresh, &format!("query;{alice}\n")).await.is_some());

    // Each certificate shut out was told once: expired, revoked while connected,
    // refused at its handshake; named by user and serial, never by uuid.
    if let Some(receiver) = &receiver {
        let events = receiver.wait(std::time::Duration::from_secs(10), |e| e.len() >= 3);
        for event in &events {
            assert_eq!(event["type"], "client.certificate_refused");
            // A handshake rustls refused names no certificate (its error does not
            // carry it); the others name their user.
            if let Some(user) = event["data"]["user"]["name"].as_str() {
                assert!(user == "alice" || user == "bob", "{event}");
            }
            assert!(event["data"]["source"]
                .as_str()
                .unwrap()
                .starts_with("127.0.0.1:"));
        }
        let reasons: Vec<&str> = events
            .iter()
            .filter_map(|e| e["data"]["reason"].as_str())
            .collect();
        assert!(reasons.iter().any(|r| r.contains("expired")), "{reasons:?}");
        assert!(reasons.iter().any(|r| r.contains("revoked")), "{reasons:?}");
        assert!(events
            .iter()
            .any(|e| e["data"]["certificate_serial"].is_string()));
        assert!(events.iter().any(|e| e["data"]["user"]["name"] == "alice"));
        assert!(events.iter().any(|e| e["data"]["user"]["name"] == "bob"));
    }

    // Bob is made an admin while the gateway runs: within 10 s his certificate
    // reaches Alice's devices, and when it is taken back, no longer.
    let mut bob_tls = connect(&gw, from_pem(d, "bob-other")).await.unwrap();
    let lists_alices = |reply: Option<String>| reply.is_some_and(|r| r.contains(ALICE_PLC));
    assert!(!lists_alices(
        ask(&mut bob_tls, &format!("query;{alice}\n")).await
    ));
    for (state, reaches) in [("on", true), ("off", false)] {
        cli(&["user", "admin", "bob", state]);
        let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(10);
        loop {
            let reply = ask(&mut bob_tls, &format!("query;{alice}\n")).await;
            if lists_alices(reply) == reaches {
                break;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "admin {state} not applied"
            );
            tokio::time::sleep(std::time::Duration::from_millis(200)).await;
        }
    }

    // The audit trail: the tunnel ended for the certificate, and each closing and
    // refused handshake is recorded with the certificate.
    let tunnels = gw.get("/api/audit").json()["rows"].clone();
    let cause = tunnels[0]["cause"].as_str().unwrap_or_default().to_owned();
    assert_eq!(cause, "the client's certificate was revoked", "{tunnels}");
    let refusals = common::eventually(
        || gw.get("/api/audit?kind=refusals&per_page=200").json()["rows"].clone(),
        |rows| {
            rows.as_array()
                .is_some_and(|r| r.iter().filter(|r| r["request"] == "connection").count() >= 3)
        },
    );
    let closed: Vec<&serde_json::Value> = refusals
        .as_array()
        .unwrap()
        .iter()
        .filter(|r| r["request"] == "connection")
        .collect();
    assert!(closed.iter().all(|r| r["certificate_serial"].is_string()));
    assert!(closed
        .iter()
        .any(|r| r["detail"].as_str().unwrap().contains("expired")));
}
