//! TLS on the gateway's own port, and who may send requests over what.
//!
//! [`Tls`] holds the server certificate and key (PEM files, reloadable while the
//! gateway runs: a broken or mismatched pair keeps the one in use), the protocol
//! versions (TLS 1.3 only unless 1.2 is allowed) and, with a client CA, the check of
//! client certificates. The listener tells TLS from protocol v1 by the first byte
//! (a TLS record starts with `0x16`, a v1 message with an ASCII keyword).
//!
//! [`ClientPolicy`] decides whether `connme`, `connthem` and `query` are accepted on a
//! connection ([`Transport`]): from anyone, only over TLS, or only over TLS with a
//! client certificate from the client CA; trusted networks are exempt. Devices cannot
//! do TLS, so `beat` and device `data` are always accepted.

use std::fmt;
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use ipnet::IpNet;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::WebPkiClientVerifier;
use rustls::{RootCertStore, ServerConfig};
use tokio_rustls::TlsAcceptor;

/// The `[tls]` settings.
#[derive(Debug, Clone)]
pub struct TlsFiles {
    /// The certificate chain, leaf first.
    pub cert: PathBuf,
    pub key: PathBuf,
    /// CA whose client certificates are accepted; none = no client certificates.
    pub client_ca: Option<PathBuf>,
    /// Also accept TLS 1.2.
    pub allow_tls12: bool,
    pub handshake_timeout: Duration,
}

#[derive(Debug, thiserror::Error)]
#[error("{file}: {reason}")]
pub struct TlsError {
    pub file: String,
    pub reason: String,
}

impl TlsError {
    fn new(file: &Path, reason: impl fmt::Display) -> Self {
        Self {
            file: file.display().to_string(),
            reason: reason.to_string(),
        }
    }
}

/// The gateway's TLS server side.
pub struct Tls {
    files: TlsFiles,
    config: RwLock<Arc<ServerConfig>>,
}

impl fmt::Debug for Tls {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Tls").field("files", &self.files).finish()
    }
}

impl Tls {
    /// Reads the files; an error names the file at fault.
    pub fn load(files: TlsFiles) -> Result<Arc<Tls>, TlsError> {
        let config = server_config(&files)?;
        Ok(Arc::new(Tls {
            files,
            config: RwLock::new(Arc::new(config)),
        }))
    }

    /// Reads the files again: new handshakes use them, open connections keep going.
    /// On error the pair in use stays.
    pub fn reload(&self) -> Result<(), TlsError> {
        let config = server_config(&self.files)?;
        *self.config.write().unwrap_or_else(|e| e.into_inner()) = Arc::new(config);
        Ok(())
    }

    pub fn acceptor(&self) -> TlsAcceptor {
        TlsAcceptor::from(
            self.config
                .read()
                .unwrap_or_else(|e| e.into_inner())
                .clone(),
        )
    }

    pub fn handshake_timeout(&self) -> Duration {
        self.files.handshake_timeout
    }

    pub fn files(&self) -> &TlsFiles {
        &self.files
    }
}

fn server_config(files: &TlsFiles) -> Result<ServerConfig, TlsError> {
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(&files.cert)
        .and_then(|certs| certs.collect())
        .map_err(|e| TlsError::new(&files.cert, e))?;
    if certs.is_empty() {
        return Err(TlsError::new(&files.cert, "no certificate in the file"));
    }
    let key = PrivateKeyDer::from_pem_file(&files.key).map_err(|e| TlsError::new(&files.key, e))?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let versions: &[&rustls::SupportedProtocolVersion] = if files.allow_tls12 {
        &[&rustls::version::TLS13, &rustls::version::TLS12]
    } else {
        &[&rustls::version::TLS13]
    };
    let builder = ServerConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(versions)
        .map_err(|e| TlsError::new(&files.cert, e))?;
    let builder = match &files.client_ca {
        None => builder.with_no_client_auth(),
        Some(ca) => {
            let mut roots = RootCertStore::empty();
            for cert in CertificateDer::pem_file_iter(ca).map_err(|e| TlsError::new(ca, e))? {
                let cert = cert.map_err(|e| TlsError::new(ca, e))?;
                roots.add(cert).map_err(|e| TlsError::new(ca, e))?;
            }
            // Clients without a certificate still connect: they are told what is
            // required when they send a request.
            let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider)
                .allow_unauthenticated()
                .build()
                .map_err(|e| TlsError::new(ca, e))?;
            builder.with_client_cert_verifier(verifier)
        }
    };
    let mut config = builder
        .with_single_cert(certs, key)
        .map_err(|e| TlsError::new(&files.key, format!("does not fit the certificate: {e}")))?;
    // Stateless session tickets: a client that reconnects resumes, client certificate
    // included, whichever worker thread takes it.
    config.ticketer =
        rustls::crypto::ring::Ticketer::new().map_err(|e| TlsError::new(&files.cert, e))?;
    Ok(config)
}

/// How a connection reached the gateway.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transport {
    Plain,
    Tls {
        /// It presented a certificate that chains to the client CA.
        client_cert: bool,
    },
}

impl Transport {
    pub fn label(self) -> &'static str {
        match self {
            Transport::Plain => "plain",
            Transport::Tls { .. } => "tls",
        }
    }
}

/// Who may send `connme`, `connthem` and `query` (`auth.clients`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Clients {
    /// Anyone, in plain TCP too (the original gateway's behaviour).
    #[default]
    Any,
    /// Only over TLS.
    Tls,
    /// Only over TLS with a certificate from the client CA.
    ClientCert,
}

#[derive(Debug, Clone, Default)]
pub struct ClientPolicy {
    pub clients: Clients,
    /// Sources exempt from `clients` (e.g. the web backend's host).
    pub trusted_networks: Vec<IpNet>,
}

impl ClientPolicy {
    /// Whether a request from `ip` over `transport` is accepted; if not, what is
    /// required.
    pub fn check(&self, transport: Transport, ip: IpAddr) -> Result<(), &'static str> {
        let ip = match ip {
            IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(IpAddr::V6(v6), IpAddr::V4),
            v4 => v4,
        };
        if self.trusted_networks.iter().any(|net| net.contains(&ip)) {
            return Ok(());
        }
        match (self.clients, transport) {
            (Clients::Any, _) => Ok(()),
            (Clients::Tls, Transport::Tls { .. }) => Ok(()),
            (Clients::ClientCert, Transport::Tls { client_cert: true }) => Ok(()),
            (Clients::Tls, Transport::Plain) => {
                Err("this gateway accepts connme, connthem and query only over TLS")
            }
            (Clients::ClientCert, _) => Err(
                "this gateway accepts connme, connthem and query only over TLS with a client certificate",
            ),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_policy_asks_for_what_each_mode_requires_and_trusts_its_networks() {
        let plain = Transport::Plain;
        let tls = Transport::Tls { client_cert: false };
        let cert = Transport::Tls { client_cert: true };
        let ip: IpAddr = "203.0.113.7".parse().unwrap();
        let any = ClientPolicy::default();
        assert!(any.check(plain, ip).is_ok());
        let only_tls = ClientPolicy {
            clients: Clients::Tls,
            trusted_networks: vec!["10.0.0.0/8".parse().unwrap()],
        };
        assert!(only_tls.check(plain, ip).unwrap_err().contains("TLS"));
        assert!(only_tls.check(tls, ip).is_ok());
        assert!(only_tls.check(plain, "10.1.2.3".parse().unwrap()).is_ok());
        let certs = ClientPolicy {
            clients: Clients::ClientCert,
            trusted_networks: vec!["127.0.0.1/32".parse().unwrap()],
        };
        assert!(certs.check(tls, ip).unwrap_err().contains("certificate"));
        assert!(certs.check(cert, ip).is_ok());
        assert!(certs
            .check(plain, "::ffff:127.0.0.1".parse().unwrap())
            .is_ok());
    }
}
