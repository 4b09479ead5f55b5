//! TLS on the gateway's own port (in-process, real sockets, a throw-away CA made here
//! with rcgen, a rustls client): TLS clients and plain devices on one port, TLS 1.3
//! only by default, bounded handshakes, certificate reload, client certificates and
//! session resumption.

mod common;

use std::sync::Arc;
use std::time::Duration;

use rustls::pki_types::ServerName;
use rustls::ClientConfig;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_rustls::client::TlsStream;
use tokio_rustls::TlsConnector;

use common::pki::{Leaf, Pki};
use common::{failed_reason, TestGateway};
use elfin_actors::tls::{Clients, Tls, TlsFiles};

const MAC: &str = "F0FE6B2A1C3D";

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// A client trusting `pki`'s CA, with TLS 1.3 (or only 1.2), and a certificate if given.
fn client_config(pki: &Pki, only_tls12: bool, cert: Option<Leaf>) -> Arc<ClientConfig> {
    let versions: &[&rustls::SupportedProtocolVersion] = if only_tls12 {
        &[&rustls::version::TLS12]
    } else {
        &[&rustls::version::TLS13]
    };
    let builder = ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(versions)
        .unwrap()
        .with_root_certificates(pki.roots());
    Arc::new(match cert {
        Some(leaf) => builder.with_client_auth_cert(leaf.chain, leaf.key).unwrap(),
        None => builder.with_no_client_auth(),
    })
}

async fn tls_connect(
    gw: &TestGateway,
    config: Arc<ClientConfig>,
) -> std::io::Result<TlsStream<TcpStream>> {
    tls_connect_to(gw.addr, config).await
}

async fn tls_connect_to(
    addr: std::net::SocketAddr,
    config: Arc<ClientConfig>,
) -> std::io::Result<TlsStream<TcpStream>> {
    let tcp = TcpStream::connect(addr).await?;
    tcp.set_nodelay(true)?;
    let name = ServerName::try_from("localhost").unwrap();
    TlsConnector::from(config).connect(name, tcp).await
}

/// One request over TLS (one write, as the desktop client does).
async fn send(stream: &mut TlsStream<TcpStream>, message: impl AsRef<[u8]>) {
    stream.write_all(message.as_ref()).await.unwrap();
}

/// `connme` over TLS, success checked.
async fn connme(stream: &mut TlsStream<TcpStream>, uuid: &str) {
    send(stream, format!("connme;{uuid};{MAC}")).await;
    assert_eq!(line(stream).await, r#"{"status":"success"}"#);
}

async fn line(stream: &mut TlsStream<TcpStream>) -> String {
    let mut line = Vec::new();
    let mut byte = [0u8; 1];
    loop {
        let n = tokio::time::timeout(Duration::from_secs(10), stream.read(&mut byte))
            .await
            .expect("a reply")
            .unwrap();
        assert!(n > 0, "closed after {:?}", String::from_utf8_lossy(&line));
        if byte[0] == b'\n' {
            return String::from_utf8(line).unwrap();
        }
        line.push(byte[0]);
    }
}

async fn gateway(tune: impl FnOnce(&mut elfin_actors::Config), tls: TlsFiles) -> TestGateway {
    let tls = Tls::load(tls).unwrap();
    TestGateway::start_with(move |c| {
        c.tls = Some(tls);
        tune(c);
    })
    .await
}

/// A gateway with TLS, user alice and her device online on it, and the PKI of its
/// certificate.
async fn alice_and_her_device() -> (Pki, TestGateway, String, common::Peer) {
    let pki = Pki::new();
    pki.issue("localhost", "server");
    let gw = gateway(|_| {}, pki.files(false, false)).await;
    let uuid = gw.add_user("alice").await;
    let device = gw.device(&uuid, MAC, "plc-1").await;
    (pki, gw, uuid, device)
}

#[actix_rt::test]
async fn a_tls_client_tunnels_to_a_plain_device_on_the_same_port() {
    let (pki, gw, uuid, mut device) = alice_and_her_device().await;

    let config = client_config(&pki, false, None);
    let mut query = tls_connect(&gw, config.clone()).await.unwrap();
    send(&mut query, format!("query;{uuid}")).await;
    let listed: serde_json::Value = serde_json::from_str(&line(&mut query).await).unwrap();
    assert_eq!(listed[0]["macaddress"], MAC);

    let mut client = tls_connect(&gw, config).await.unwrap();
    connme(&mut client, &uuid).await;
    let all: Vec<u8> = (0..=255).collect();
    let big: Vec<u8> = (0..1u32 << 20)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 24) as u8)
        .collect();
    for payload in [&all, &big] {
        let frame = [format!("data;{uuid};T1;T1;1;").as_bytes(), payload].concat();
        let (writer, reader) =
            futures::join!(client.write_all(&frame), device.bytes(payload.len()));
        writer.unwrap();
        assert!(reader == *payload, "client -> device");
        let frame = [format!("data;{uuid};{MAC};plc-1;0;").as_bytes(), payload].concat();
        let mut got = vec![0u8; payload.len()];
        let (writer, reader) = futures::join!(device.send(&frame), client.read_exact(&mut got));
        let () = writer;
        reader.unwrap();
        assert!(got == *payload, "device -> client");
    }
}

/// A TLS client whose writes outran the tunnel, cut inside a header, the rest 20 ms
/// later (the binary test `a_sender_cut_mid_header_after_a_backlog_keeps_the_tunnel_exact`
/// on plain TCP): TLS hands over at most a record (16 KiB) per read, so a backlog
/// need not show as a full read buffer; a read of a whole record counts too.
#[actix_rt::test]
async fn a_tls_sender_cut_mid_header_after_a_backlog_keeps_the_tunnel_exact() {
    let (pki, gw, uuid, mut device) = alice_and_her_device().await;
    let mut client = tls_connect(&gw, client_config(&pki, false, None))
        .await
        .unwrap();
    connme(&mut client, &uuid).await;
    let header = format!("data;{uuid};T1;T1;1;");
    let cut = "data;".len() + 8;
    let bytes = |len: u32, seed: u32| -> Vec<u8> {
        (0..len)
            .map(|i| ((i ^ seed).wrapping_mul(2_654_435_761) >> 24) as u8)
            .collect()
    };
    let (first, second) = (bytes(1 << 20, 7), bytes(64 << 10, 11));
    let send = async {
        let cut_write = [header.as_bytes(), &first, &header.as_bytes()[..cut]].concat();
        client.write_all(&cut_write).await.unwrap();
        client.flush().await.unwrap();
        tokio::time::sleep(Duration::from_millis(20)).await;
        let rest = [&header.as_bytes()[cut..], &second[..]].concat();
        client.write_all(&rest).await.unwrap();
        client.flush().await.unwrap();
    };
    let want = [&first[..], &second].concat();
    let ((), got) = futures::join!(send, device.bytes(want.len()));
    assert!(got == want, "header bytes leaked into the payload");
}

#[actix_rt::test]
async fn tls_1_2_is_refused_unless_allowed() {
    let pki = Pki::new();
    pki.issue("localhost", "server");
    let strict = gateway(|_| {}, pki.files(false, false)).await;
    assert!(tls_connect(&strict, client_config(&pki, true, None))
        .await
        .is_err());
    let lenient = gateway(|_| {}, pki.files(true, false)).await;
    let uuid = lenient.add_user("alice").await;
    let mut client = tls_connect(&lenient, client_config(&pki, true, None))
        .await
        .unwrap();
    send(&mut client, format!("query;{uuid}")).await;
    assert_eq!(line(&mut client).await, "[]");
}

#[actix_rt::test]
async fn a_handshake_that_never_finishes_is_closed_after_the_timeout() {
    tokio::time::pause();
    let pki = Pki::new();
    pki.issue("localhost", "server");
    let gw = gateway(|_| {}, pki.files(false, false)).await;
    let mut stalled = TcpStream::connect(gw.addr).await.unwrap();
    stalled.write_all(&[0x16, 0x03, 0x01]).await.unwrap(); // a record header, cut short
    let started = tokio::time::Instant::now();
    let mut buf = [0u8; 16];
    let n = tokio::time::timeout(Duration::from_secs(30), stalled.read(&mut buf))
        .await
        .expect("closed")
        .unwrap_or(0);
    assert_eq!(n, 0);
    let waited = started.elapsed();
    assert!(
        waited >= Duration::from_secs(10) && waited < Duration::from_secs(11),
        "{waited:?}"
    );
}

#[actix_rt::test]
async fn a_tls_client_on_a_gateway_without_tls_is_closed_at_once() {
    let pki = Pki::new();
    let gw = TestGateway::start().await;
    let started = std::time::Instant::now();
    assert!(tls_connect(&gw, client_config(&pki, false, None))
        .await
        .is_err());
    assert!(started.elapsed() < Duration::from_secs(1));
}

#[actix_rt::test]
async fn a_reloaded_certificate_serves_new_handshakes_while_open_tunnels_keep_flowing() {
    let pki = Pki::new();
    pki.issue("localhost", "server");
    let tls = Tls::load(pki.files(false, false)).unwrap();
    let shared = tls.clone();
    let gw = TestGateway::start_with(move |c| c.tls = Some(shared)).await;
    let uuid = gw.add_user("alice").await;
    let mut device = gw.device(&uuid, MAC, "plc-1").await;
    let mut client = tls_connect(&gw, client_config(&pki, false, None))
        .await
        .unwrap();
    connme(&mut client, &uuid).await;

    // A broken file: the pair in use stays, and the error names the file.
    std::fs::write(pki.path("server.key"), "not a key").unwrap();
    let err = tls.reload().unwrap_err();
    assert!(err.to_string().contains("server.key"), "{err}");
    assert!(tls_connect(&gw, client_config(&pki, false, None))
        .await
        .is_ok());

    // A new certificate from another CA: new handshakes see it, old trust fails.
    let other = Pki::new();
    other.issue("localhost", "server");
    for file in ["server.pem", "server.key"] {
        std::fs::copy(other.path(file), pki.path(file)).unwrap();
    }
    tls.reload().unwrap();
    assert!(tls_connect(&gw, client_config(&other, false, None))
        .await
        .is_ok());
    assert!(tls_connect(&gw, client_config(&pki, false, None))
        .await
        .is_err());

    // The tunnel opened before the reload still flows.
    send(&mut client, format!("data;{uuid};T1;T1;1;still")).await;
    assert_eq!(device.bytes(5).await, b"still");
}

#[actix_rt::test]
async fn with_client_certificates_a_sniffed_uuid_opens_no_tunnel() {
    let pki = Pki::new();
    pki.issue("localhost", "server");
    let engineer = pki.issue("engineer", "engineer");
    let outsider_ca = Pki::new();
    let outsider = outsider_ca.issue("engineer", "outsider");
    let gw = gateway(
        |c| {
            c.auth.clients = Clients::ClientCert;
            c.auth.trusted_networks = vec!["127.0.0.2/32".parse().unwrap()];
        },
        pki.files(false, true),
    )
    .await;
    let uuid = gw.add_user("alice").await;
    // A plain-TCP device still registers.
    let mut device = gw.device_registered(&uuid, MAC, "plc-1").await;

    // Plain TCP and TLS without a certificate: refused, saying what is required.
    let mut plain = gw.connect().await;
    plain.send(format!("connme;{uuid};{MAC}")).await;
    assert!(failed_reason(&plain.line().await).contains("client certificate"));
    let mut anonymous = tls_connect(&gw, client_config(&pki, false, None))
        .await
        .unwrap();
    send(&mut anonymous, format!("query;{uuid}")).await;
    assert!(failed_reason(&line(&mut anonymous).await).contains("client certificate"));

    // A certificate from another CA does not get through the handshake.
    let refused = match tls_connect(&gw, client_config(&pki, false, Some(outsider))).await {
        Err(_) => true,
        Ok(mut s) => {
            let _ = s.write_all(format!("query;{uuid}").as_bytes()).await;
            let mut buf = [0u8; 64];
            !matches!(s.read(&mut buf).await, Ok(n) if n > 0 && buf.starts_with(b"["))
        }
    };
    assert!(refused, "a certificate from another CA was accepted");

    // The engineer's certificate tunnels; its second connection resumes the session.
    let config = client_config(&pki, false, Some(engineer));
    let mut client = tls_connect(&gw, config.clone()).await.unwrap();
    connme(&mut client, &uuid).await;
    send(&mut client, format!("data;{uuid};T1;T1;1;hello")).await;
    assert_eq!(device.bytes(5).await, b"hello");
    // Read the session tickets the first connection was sent.
    let mut second = tls_connect(&gw, config).await.unwrap();
    assert_eq!(
        second.get_ref().1.handshake_kind(),
        Some(rustls::HandshakeKind::Resumed),
        "the second connection did not resume"
    );
    send(&mut second, format!("query;{uuid}")).await;
    assert!(line(&mut second).await.starts_with('['));

    // A trusted network is served in plain TCP.
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.bind("127.0.0.2:0".parse().unwrap()).unwrap();
    let mut trusted = common::Peer::from_stream(socket.connect(gw.addr).await.unwrap());
    trusted.send(format!("query;{uuid}")).await;
    assert!(trusted.line().await.starts_with("[{"));
}

#[actix_rt::test]
async fn a_tls_only_port_serves_tls_clients_and_closes_plain_ones() {
    let pki = Pki::new();
    pki.issue("localhost", "server");
    let tls = Tls::load(pki.files(false, false)).unwrap();
    let gw = TestGateway::start_with_tls_port(move |c| c.tls = Some(tls)).await;
    let tls_port = gw.tls_addr.unwrap();
    let uuid = gw.add_user("alice").await;
    let mut device = gw.device(&uuid, MAC, "plc-1").await;
    // Plain protocol v1 on the TLS-only port: a TLS alert and closed, never parsed.
    let mut plain = TcpStream::connect(tls_port).await.unwrap();
    plain
        .write_all(format!("query;{uuid}").as_bytes())
        .await
        .unwrap();
    let mut answer = Vec::new();
    let read = tokio::time::timeout(Duration::from_secs(5), plain.read_to_end(&mut answer)).await;
    assert!(read.is_ok(), "still open");
    assert!(
        !answer.contains(&b'['),
        "answered in plain text: {answer:?}"
    );
    // A TLS client there tunnels to the device on the main port.
    let mut client = tls_connect_to(tls_port, client_config(&pki, false, None))
        .await
        .unwrap();
    connme(&mut client, &uuid).await;
    send(&mut client, format!("data;{uuid};T1;T1;1;via 443")).await;
    assert_eq!(device.bytes(7).await, b"via 443");
}

#[test]
fn a_missing_revocation_list_is_refused_naming_the_setting_and_the_command_that_makes_it() {
    let pki = Pki::new();
    pki.issue("localhost", "server");
    let mut files = pki.files(false, true);
    files.client_crl = Some(pki.path("clients.crl"));
    let err = Tls::load(files).unwrap_err().to_string();
    assert!(err.starts_with("tls.client_crl = "), "{err}");
    assert!(err.contains("clients.crl"), "{err}");
    assert!(err.contains("elfin-gateway user cert NAME"), "{err}");
    assert!(!err.contains("I/O error"), "{err}");

    // A broken key names its setting too.
    std::fs::write(pki.path("server.key"), "not a key").unwrap();
    let err = Tls::load(pki.files(false, false)).unwrap_err().to_string();
    assert!(err.starts_with("tls.key = "), "{err}");
}
