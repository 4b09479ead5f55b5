//! TLS on the gateway's own port, and who may send requests over what.
//!
//! [`Tls`] holds the server certificate and key (PEM files, reloadable while the
//! gateway runs: a broken or mismatched pair keeps the one in use), the protocol
//! versions (TLS 1.3 only unless 1.2 is allowed) and, with a client CA, the check of
//! client certificates. The listener tells TLS from protocol v1 by the first byte
//! (a TLS record starts with `0x16`, a v1 message with an ASCII keyword).
//!
//! [`TlsSettings`] is the `[tls]` section. [`Clients`] says who may send `connme`,
//! `connthem` and `query` over which [`Transport`] (the check itself is
//! [`crate::config::Auth::check_client`]). Devices cannot do TLS, so `beat` and device
//! `data` are always accepted.

use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, CertificateRevocationListDer, PrivateKeyDer};
use rustls::server::WebPkiClientVerifier;
use rustls::{RootCertStore, ServerConfig};
use serde::{Deserialize, Serialize};
use tokio::sync::watch;
use tokio_rustls::TlsAcceptor;

use crate::revocation::{users_path, Revocations};

use crate::de;

/// The `[tls]` section.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TlsSettings {
    /// A second listener that serves TLS only.
    #[serde(with = "de::optional")]
    pub listen: Option<SocketAddr>,
    /// PEM certificate chain, leaf first; none = no TLS.
    #[serde(with = "de::optional")]
    pub cert: Option<PathBuf>,
    #[serde(with = "de::optional")]
    pub key: Option<PathBuf>,
    /// PEM CA of accepted client certificates.
    #[serde(with = "de::optional")]
    pub client_ca: Option<PathBuf>,
    /// The client CA's private key: only `elfin-gateway user cert` reads it.
    #[serde(with = "de::optional")]
    pub client_ca_key: Option<PathBuf>,
    /// PEM revocation list of client certificates, checked at every handshake
    /// (written by `user cert --revoke`, read again with SIGHUP).
    #[serde(with = "de::optional")]
    pub client_crl: Option<PathBuf>,
    pub min_version: TlsVersion,
    #[serde(rename = "handshake_timeout_secs", with = "de::positive_secs")]
    pub handshake_timeout: Duration,
}

impl Default for TlsSettings {
    fn default() -> Self {
        Self {
            listen: None,
            cert: None,
            key: None,
            client_ca: None,
            client_ca_key: None,
            client_crl: None,
            min_version: TlsVersion::V13,
            handshake_timeout: Duration::from_secs(10),
        }
    }
}

/// `tls.min_version`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum TlsVersion {
    #[serde(rename = "1.2")]
    V12,
    #[serde(rename = "1.3")]
    V13,
}

impl TlsSettings {
    /// The files to load, if TLS is on (a certificate and its key).
    pub fn files(&self) -> Option<TlsFiles> {
        Some(TlsFiles {
            cert: self.cert.clone()?,
            key: self.key.clone()?,
            client_ca: self.client_ca.clone(),
            client_crl: self.client_crl.clone(),
            allow_tls12: self.min_version == TlsVersion::V12,
            handshake_timeout: self.handshake_timeout,
        })
    }
}

/// What [`Tls`] loads.
#[derive(Debug, Clone)]
pub struct TlsFiles {
    /// The certificate chain, leaf first.
    pub cert: PathBuf,
    pub key: PathBuf,
    /// CA whose client certificates are accepted; none = no client certificates.
    pub client_ca: Option<PathBuf>,
    /// Revoked client certificates (PEM CRLs of the client CA).
    pub client_crl: Option<PathBuf>,
    /// Also accept TLS 1.2.
    pub allow_tls12: bool,
    pub handshake_timeout: Duration,
}

/// Why the TLS files cannot be used: the setting that names the file, the file, and
/// the reason.
#[derive(Debug, thiserror::Error)]
#[error("{setting} = {file:?}: {reason}")]
pub struct TlsError {
    pub setting: &'static str,
    pub file: String,
    pub reason: String,
}

impl TlsError {
    fn new(setting: &'static str, file: &Path, reason: impl fmt::Display) -> Self {
        Self {
            setting,
            file: file.display().to_string(),
            reason: reason.to_string(),
        }
    }
}

/// What a load or reload put in force, for the operator's log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Loaded {
    /// The server certificate's subject and expiry, in words.
    pub certificate: String,
    /// Its expiry, in seconds since the Unix epoch (`elfin_certificate_expiry_timestamp_seconds`).
    pub not_after: Option<i64>,
    /// Certificates on the revocation list and users revoked as a whole, if there is
    /// a revocation list.
    pub revoked: Option<(usize, usize)>,
}

impl fmt::Display for Loaded {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "server certificate {}", self.certificate)?;
        match self.revoked {
            Some((certificates, users)) => write!(
                f,
                "; client revocation list with {certificates} revoked certificate(s) and \
                 {users} revoked user(s)"
            ),
            None => Ok(()),
        }
    }
}

/// The gateway's TLS server side.
pub struct Tls {
    files: TlsFiles,
    config: RwLock<Arc<ServerConfig>>,
    loaded: RwLock<Loaded>,
    /// The revocations in force; sessions holding a certificate watch it.
    revocations: watch::Sender<Arc<Revocations>>,
}

impl fmt::Debug for Tls {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Tls").field("files", &self.files).finish()
    }
}

impl Tls {
    /// Reads the files; an error names the setting and the file at fault.
    pub fn load(files: TlsFiles) -> Result<Arc<Tls>, TlsError> {
        let (config, loaded, revocations) = server_config(&files)?;
        Ok(Arc::new(Tls {
            files,
            config: RwLock::new(Arc::new(config)),
            loaded: RwLock::new(loaded),
            revocations: watch::Sender::new(Arc::new(revocations)),
        }))
    }

    /// Reads the files again: new handshakes use them, open connections keep going.
    /// On error everything in use stays. Says what is now in force.
    /// Open connections whose certificate is now revoked are told, and close.
    pub fn reload(&self) -> Result<Loaded, TlsError> {
        let (config, loaded, revocations) = server_config(&self.files)?;
        *self.config.write().unwrap_or_else(|e| e.into_inner()) = Arc::new(config);
        *self.loaded.write().unwrap_or_else(|e| e.into_inner()) = loaded.clone();
        self.revocations.send_replace(Arc::new(revocations));
        Ok(loaded)
    }

    /// The revocations in force now.
    pub fn revocations(&self) -> Arc<Revocations> {
        self.revocations.borrow().clone()
    }

    /// The revocations, and every reload's from now on.
    pub fn subscribe(&self) -> watch::Receiver<Arc<Revocations>> {
        self.revocations.subscribe()
    }

    /// What is in force now.
    pub fn loaded(&self) -> Loaded {
        self.loaded
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
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

fn server_config(files: &TlsFiles) -> Result<(ServerConfig, Loaded, Revocations), TlsError> {
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(&files.cert)
        .and_then(|certs| certs.collect())
        .map_err(|e| TlsError::new("tls.cert", &files.cert, e))?;
    let Some(leaf) = certs.first() else {
        return Err(TlsError::new(
            "tls.cert",
            &files.cert,
            "no certificate in the file",
        ));
    };
    let certificate = describe(leaf);
    let not_after = not_after(leaf);
    let key = PrivateKeyDer::from_pem_file(&files.key)
        .map_err(|e| TlsError::new("tls.key", &files.key, e))?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let versions: &[&rustls::SupportedProtocolVersion] = if files.allow_tls12 {
        &[&rustls::version::TLS13, &rustls::version::TLS12]
    } else {
        &[&rustls::version::TLS13]
    };
    let builder = ServerConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(versions)
        .map_err(|e| TlsError::new("tls.cert", &files.cert, e))?;
    let mut revoked = None;
    let mut revocations = Revocations::default();
    let builder = match &files.client_ca {
        None => builder.with_no_client_auth(),
        Some(ca) => {
            let mut roots = RootCertStore::empty();
            let ca_error = |e: &dyn fmt::Display| TlsError::new("tls.client_ca", ca, e);
            for cert in CertificateDer::pem_file_iter(ca).map_err(|e| ca_error(&e))? {
                let cert = cert.map_err(|e| ca_error(&e))?;
                roots.add(cert).map_err(|e| ca_error(&e))?;
            }
            let crls = match &files.client_crl {
                Some(crl) => {
                    let crls = read_crls(crl)?;
                    let users_file = users_path(crl);
                    let users = match std::fs::read_to_string(&users_file) {
                        Ok(text) => text,
                        Err(e) if e.kind() == std::io::ErrorKind::NotFound => String::new(),
                        Err(e) => return Err(TlsError::new("tls.client_crl", &users_file, e)),
                    };
                    revocations = Revocations::new(&crls, &users)
                        .map_err(|e| TlsError::new("tls.client_crl", &users_file, e))?;
                    revoked = Some((revocations.serials(), revocations.users()));
                    crls
                }
                None => Vec::new(),
            };
            // Clients without a certificate still connect: they are told what is
            // required when they send a request.
            let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider)
                .with_crls(crls)
                .allow_unauthenticated()
                .build()
                .map_err(|e| ca_error(&e))?;
            builder.with_client_cert_verifier(verifier)
        }
    };
    let mut config = builder.with_single_cert(certs, key).map_err(|e| {
        TlsError::new(
            "tls.key",
            &files.key,
            format!("does not fit the certificate: {e}"),
        )
    })?;
    // Stateless session tickets: a client that reconnects resumes, client certificate
    // included, whichever worker thread takes it.
    config.ticketer = rustls::crypto::ring::Ticketer::new()
        .map_err(|e| TlsError::new("tls.cert", &files.cert, e))?;
    Ok((
        config,
        Loaded {
            certificate,
            not_after,
            revoked,
        },
        revocations,
    ))
}

/// The revocation lists in `path`. A missing file is refused, not read as an empty
/// list: a list deleted by mistake must not un-revoke every certificate on it.
fn read_crls(path: &Path) -> Result<Vec<CertificateRevocationListDer<'static>>, TlsError> {
    if !path.exists() {
        return Err(TlsError::new(
            "tls.client_crl",
            path,
            "no such file. `elfin-gateway user cert NAME` writes it with the first \
             certificate it issues (and `user cert --revoke` updates it); until there is \
             one, leave tls.client_crl unset. A missing list is not taken as empty, so \
             deleting it cannot un-revoke a certificate",
        ));
    }
    CertificateRevocationListDer::pem_file_iter(path)
        .and_then(|crls| crls.collect::<Result<Vec<_>, _>>())
        .map_err(|e| TlsError::new("tls.client_crl", path, e))
}

/// A certificate's subject and expiry, for the log.
/// When `cert` stops being valid: seconds since the Unix epoch.
pub fn not_after(cert: &CertificateDer<'_>) -> Option<i64> {
    let (_, c) = x509_parser::parse_x509_certificate(cert).ok()?;
    Some(c.validity().not_after.timestamp())
}

impl Loaded {
    /// Exports the server certificate's expiry (`which = "server"`: the certificate of
    /// `server.listen` and `tls.listen` both).
    pub fn export_expiry(&self) {
        if let Some(at) = self.not_after {
            metrics::gauge!(crate::metric::CERTIFICATE_EXPIRY, "which" => "server").set(at as f64);
        }
    }
}

fn describe(cert: &CertificateDer<'_>) -> String {
    match x509_parser::parse_x509_certificate(cert) {
        Ok((_, c)) => format!(
            "{} valid until {}",
            c.subject(),
            c.validity().not_after.to_datetime().date()
        ),
        Err(_) => "(unreadable)".to_owned(),
    }
}

/// Why a client's certificate failed a handshake, in words an operator can act on;
/// `None` when the handshake failed for another reason.
pub fn certificate_refusal(error: &std::io::Error) -> Option<String> {
    use rustls::CertificateError as E;
    let rustls::Error::InvalidCertificate(refused) =
        error.get_ref()?.downcast_ref::<rustls::Error>()?
    else {
        return None;
    };
    let is_v1 = |other: &rustls::OtherError| {
        other.0.downcast_ref::<webpki::Error>() == Some(&webpki::Error::UnsupportedCertVersion)
    };
    Some(match refused {
        E::UnknownIssuer => "its certificate is not issued by tls.client_ca".into(),
        E::Expired | E::ExpiredContext { .. } => "its certificate has expired".into(),
        E::NotValidYet | E::NotValidYetContext { .. } => "its certificate is not valid yet".into(),
        E::Revoked => "its certificate is revoked (user cert --revoke)".into(),
        E::InvalidPurpose | E::InvalidPurposeContext { .. } => {
            "its certificate is not for client authentication; issue it with \
             extendedKeyUsage=clientAuth"
                .into()
        }
        E::Other(other) if is_v1(other) => "X.509 v1 certificates are not accepted; issue a \
             v3 certificate with extendedKeyUsage=clientAuth"
            .into(),
        other => format!("its certificate was refused: {other}"),
    })
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
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Clients {
    /// Anyone, in plain TCP too (the original gateway's behaviour).
    #[default]
    Any,
    /// Only over TLS.
    Tls,
    /// Only over TLS with a certificate from the client CA.
    ClientCert,
    /// Only over TLS with a certificate from the client CA that names the user (its
    /// subject's common name): only that user's devices, or every user's for an admin.
    UserCert,
}

impl Clients {
    /// The value as `settings.toml` spells it.
    pub fn setting(self) -> &'static str {
        match self {
            Clients::Any => "any",
            Clients::Tls => "tls",
            Clients::ClientCert => "client-cert",
            Clients::UserCert => "user-cert",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn refused(error: rustls::CertificateError) -> Option<String> {
        let io = std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            rustls::Error::InvalidCertificate(error),
        );
        certificate_refusal(&io)
    }

    #[test]
    fn a_refused_client_certificate_is_named_in_words() {
        use rustls::CertificateError as E;
        let v1 = E::Other(rustls::OtherError(Arc::new(
            webpki::Error::UnsupportedCertVersion,
        )));
        assert_eq!(
            refused(v1).unwrap(),
            "X.509 v1 certificates are not accepted; issue a v3 certificate with \
             extendedKeyUsage=clientAuth"
        );
        assert!(refused(E::UnknownIssuer).unwrap().contains("tls.client_ca"));
        assert!(refused(E::Expired).unwrap().contains("expired"));
        assert!(refused(E::Revoked).unwrap().contains("revoked"));
        let other = std::io::Error::new(std::io::ErrorKind::InvalidData, "no TLS");
        assert_eq!(certificate_refusal(&other), None);
    }
}
