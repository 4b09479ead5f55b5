//! The gateway under measurement: the release `elfin-gateway` binary, started by the
//! bench in a process of its own with the shipped defaults (so its RSS is its own and
//! it runs as operators run it), or one already running (`--target`).

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

pub struct Gateway {
    pub addr: SocketAddr,
    /// The admin server, when the bench started the gateway.
    pub admin: Option<SocketAddr>,
    /// A client configuration that trusts the gateway's certificate, when it has one.
    pub tls: Option<std::sync::Arc<rustls::ClientConfig>>,
    /// A user whose devices the scenarios simulate.
    pub uuid: String,
    pid: Option<u32>,
    child: Option<Child>,
    _dir: Option<tempfile::TempDir>,
}

impl Gateway {
    /// Starts the binary on loopback with a fresh embedded database and `env` on top
    /// of the defaults, and adds a user. With `tls`, it has a certificate for
    /// `localhost` (clients choose TLS or plain on the same port).
    pub fn start(env: &[(&str, &str)], tls: bool) -> Gateway {
        Gateway::start_for("bench", env, tls)
    }

    /// [`Gateway::start`], adding a user of this name (gateways sharing a database
    /// need one each).
    pub fn start_for(user: &str, env: &[(&str, &str)], tls: bool) -> Gateway {
        let dir = tempfile::tempdir().unwrap();
        let mut all = vec![
            ("ELFIN__SERVER__LISTEN", "127.0.0.1:0"),
            ("ELFIN__ADMIN__LISTEN", "127.0.0.1:0"),
            ("ELFIN__LOG__LEVEL", "warn"),
            // The fleet and storm scenarios put one user's whole fleet (up to 20 000
            // devices, all new) on the gateway at once: capacity, not tenancy, is
            // what they measure.
            ("ELFIN__LIMITS__MAX_DEVICES_PER_USER", "100000"),
            ("ELFIN__LIMITS__NEW_DEVICES_BURST", "100000"),
        ];
        let client_tls = tls.then(|| {
            all.extend([
                ("ELFIN__TLS__CERT", "cert.pem"),
                ("ELFIN__TLS__KEY", "key.pem"),
            ]);
            certificate(dir.path())
        });
        all.extend_from_slice(env);
        let binary = env!("CARGO_BIN_EXE_elfin-gateway");
        let out = Command::new(binary)
            .current_dir(dir.path())
            .envs(all.iter().copied())
            .args(["user", "add", user])
            .output()
            .expect("run elfin-gateway user add");
        let uuid = String::from_utf8_lossy(&out.stdout)
            .lines()
            .next()
            .unwrap_or_else(|| {
                panic!(
                    "`elfin-gateway user add` failed: {}",
                    String::from_utf8_lossy(&out.stderr)
                )
            })
            .to_owned();
        // "info" only for the line that names the port; warnings after it.
        let mut child = Command::new(binary)
            .current_dir(dir.path())
            .envs(all.iter().copied())
            .env("RUST_LOG", "warn,elfin_gateway=info")
            .stdin(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start elfin-gateway");
        let mut lines = BufReader::new(child.stderr.take().unwrap()).lines();
        let mut admin = None;
        let addr = loop {
            let line = lines
                .next()
                .and_then(Result::ok)
                .expect("the gateway exited at start");
            if let Some(rest) = line.split("admin pages on http://").nth(1) {
                admin = rest.split('/').next().and_then(|a| a.parse().ok());
            }
            if let Some(rest) = line.split(" listening on ").nth(1) {
                break rest.split_whitespace().next().unwrap().parse().unwrap();
            }
        };
        std::thread::spawn(move || {
            for line in lines.map_while(Result::ok) {
                eprintln!("gateway: {line}");
            }
        });
        Gateway {
            addr,
            admin,
            tls: client_tls,
            uuid,
            pid: Some(child.id()),
            child: Some(child),
            _dir: Some(dir),
        }
    }

    /// A gateway someone else runs.
    pub fn target(addr: SocketAddr, uuid: String, pid: Option<u32>) -> Gateway {
        Gateway {
            addr,
            admin: None,
            tls: None,
            uuid,
            pid,
            child: None,
            _dir: None,
        }
    }

    /// The directory the bench's own gateway runs in (its embedded database is
    /// `data/elfin.db` there).
    pub fn dir(&self) -> Option<&std::path::Path> {
        self._dir.as_ref().map(|d| d.path())
    }

    /// SIGTERM to the bench's own gateway; waits for it to exit. Whether it exited 0.
    pub fn terminate(&mut self) -> bool {
        let Some(mut child) = self.child.take() else {
            return false;
        };
        let _ = Command::new("kill")
            .args(["-TERM", &child.id().to_string()])
            .status();
        child.wait().is_ok_and(|status| status.success())
    }

    /// The gateway's resident memory, when its process is known.
    pub fn rss_kib(&self) -> Option<u64> {
        self.pid.and_then(crate::net::rss_kib)
    }

    /// The gateway's CPU time and page faults so far, when its process is known.
    pub fn usage(&self) -> Option<crate::net::Usage> {
        self.pid.and_then(crate::net::Usage::of)
    }
}

impl Drop for Gateway {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
            // Let the kernel release the sockets before the next scenario.
            std::thread::sleep(Duration::from_millis(200));
        }
    }
}

/// A self-signed certificate for `localhost` written into `dir`, and a TLS 1.3 client
/// that trusts it.
fn certificate(dir: &std::path::Path) -> std::sync::Arc<rustls::ClientConfig> {
    let key = rcgen::KeyPair::generate().unwrap();
    let params = rcgen::CertificateParams::new(vec!["localhost".to_owned()]).unwrap();
    let cert = params.self_signed(&key).unwrap();
    std::fs::write(dir.join("cert.pem"), cert.pem()).unwrap();
    std::fs::write(dir.join("key.pem"), key.serialize_pem()).unwrap();
    let mut roots = rustls::RootCertStore::empty();
    roots.add(cert.der().clone()).unwrap();
    let provider = std::sync::Arc::new(rustls::crypto::ring::default_provider());
    std::sync::Arc::new(
        rustls::ClientConfig::builder_with_provider(provider)
            .with_protocol_versions(&[&rustls::version::TLS13])
            .unwrap()
            .with_root_certificates(roots)
            .with_no_client_auth(),
    )
}

/// The gateway a scenario runs on: the one given with `--target`, or a fresh one of
/// its own.
pub enum Under<'a> {
    Target(&'a Gateway),
    Own(Gateway),
}

impl std::ops::Deref for Under<'_> {
    type Target = Gateway;

    fn deref(&self) -> &Gateway {
        match self {
            Under::Target(gw) => gw,
            Under::Own(gw) => gw,
        }
    }
}

/// `target`, or a gateway started with `env` (and a certificate with `tls`).
pub fn target_or_start<'a>(
    target: Option<&'a Gateway>,
    env: &[(&str, &str)],
    tls: bool,
) -> Under<'a> {
    match target {
        Some(gw) => Under::Target(gw),
        None => Under::Own(Gateway::start(env, tls)),
    }
}
