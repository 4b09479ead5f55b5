//! Who a peer connection may be: this node's key pair and certificate
//! ([`PeerIdentity`]), the certificates of the nodes heard from ([`Known`]), and both
//! sides' TLS that accept exactly those ([`PeerTls`], pinned by SHA-256 fingerprint,
//! TLS 1.3 only).

use std::collections::HashMap;
use std::path::Path;
use std::sync::{Arc, RwLock};

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::{verify_tls13_signature, CryptoProvider};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::{
    ClientConfig, DigitallySignedStruct, DistinguishedName, ServerConfig, SignatureScheme,
};
use sha2::{Digest, Sha256};

use super::bus::hex;
use super::wire::NodeId;

/// This node's certificate and key for peer connections.
pub struct PeerIdentity {
    certs: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
    /// SHA-256 of the certificate, in hex: what the hello announces.
    pub fingerprint: String,
}

#[derive(Debug, thiserror::Error)]
#[error("{path}: {reason}")]
pub struct PeerIdentityError {
    path: String,
    reason: String,
}

impl PeerIdentity {
    /// Exports the peer certificate's expiry (`which = "peer"`).
    pub fn export_expiry(&self) {
        if let Some(at) = self.certs.first().and_then(crate::tls::not_after) {
            metrics::gauge!(crate::metric::CERTIFICATE_EXPIRY, "which" => "peer").set(at as f64);
        }
    }

    /// A fresh key pair and self-signed certificate for node `node`.
    pub fn generate(node: &str) -> PeerIdentity {
        let names = vec![format!("{}.elfin-node", sanitize(node))];
        let made = rcgen::generate_simple_self_signed(names)
            .or_else(|_| rcgen::generate_simple_self_signed(vec!["elfin-node".to_owned()]))
            .expect("a P-256 key pair and its certificate can always be made");
        let cert = made.cert.der().clone();
        let key = PrivateKeyDer::Pkcs8(made.key_pair.serialize_der().into());
        PeerIdentity {
            fingerprint: fingerprint(&cert),
            certs: vec![cert],
            key,
        }
    }

    /// The certificate (chain) and key in these PEM files.
    pub fn load(cert: &Path, key: &Path) -> Result<PeerIdentity, PeerIdentityError> {
        let error = |path: &Path, reason: String| PeerIdentityError {
            path: path.display().to_string(),
            reason,
        };
        let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(cert)
            .and_then(|certs| certs.collect())
            .map_err(|e| error(cert, e.to_string()))?;
        let Some(leaf) = certs.first() else {
            return Err(error(cert, "no certificate in the file".into()));
        };
        let key = PrivateKeyDer::from_pem_file(key).map_err(|e| error(key, e.to_string()))?;
        Ok(PeerIdentity {
            fingerprint: fingerprint(leaf),
            certs,
            key,
        })
    }
}

/// Host names allow letters, digits and hyphens.
fn sanitize(node: &str) -> String {
    let name: String = node
        .chars()
        .map(|c| if c.is_ascii_alphanumeric() { c } else { '-' })
        .take(60)
        .collect();
    if name.is_empty() {
        "node".into()
    } else {
        name
    }
}

pub fn fingerprint(cert: &CertificateDer<'_>) -> String {
    hex(&Sha256::digest(cert.as_ref()))
}

/// The certificates of the nodes heard from: fingerprint → node id. The cluster
/// actor writes it from authenticated hellos; the listener's TLS reads it.
pub type Known = Arc<RwLock<HashMap<String, NodeId>>>;

/// Accepts exactly the pinned certificates: on the listening side any node heard
/// from ([`Pinned::Known`]), on the dialing side the one node dialed.
#[derive(Debug)]
enum Pinned {
    Known(Known),
    One(String),
}

impl Pinned {
    fn check(&self, cert: &CertificateDer<'_>) -> Result<(), rustls::Error> {
        let print = fingerprint(cert);
        let pinned = match self {
            Pinned::Known(known) => known
                .read()
                .unwrap_or_else(|e| e.into_inner())
                .contains_key(&print),
            Pinned::One(expected) => *expected == print,
        };
        if pinned {
            Ok(())
        } else {
            Err(rustls::Error::InvalidCertificate(
                rustls::CertificateError::ApplicationVerificationFailure,
            ))
        }
    }
}

/// A [`Pinned`] check, and the handshake's signature checked against it.
#[derive(Debug)]
struct PinnedVerifier {
    pinned: Pinned,
    provider: Arc<CryptoProvider>,
}

impl PinnedVerifier {
    fn tls13(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls13_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn schemes(&self) -> Vec<SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}

/// Peer connections are TLS 1.3 only.
fn no_tls12() -> Result<HandshakeSignatureValid, rustls::Error> {
    Err(rustls::Error::PeerIncompatible(
        rustls::PeerIncompatible::Tls12NotOffered,
    ))
}

impl ServerCertVerifier for PinnedVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        _: &[CertificateDer<'_>],
        _: &ServerName<'_>,
        _: &[u8],
        _: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        self.pinned.check(end_entity)?;
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        _: &[u8],
        _: &CertificateDer<'_>,
        _: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        no_tls12()
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.tls13(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.schemes()
    }
}

impl ClientCertVerifier for PinnedVerifier {
    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        &[]
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        _: &[CertificateDer<'_>],
        _: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        self.pinned.check(end_entity)?;
        Ok(ClientCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        _: &[u8],
        _: &CertificateDer<'_>,
        _: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        no_tls12()
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.tls13(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.schemes()
    }
}

/// Both sides' TLS for peer connections.
pub struct PeerTls {
    pub(super) server: Arc<ServerConfig>,
    identity: Arc<PeerIdentity>,
    provider: Arc<CryptoProvider>,
    known: Known,
}

impl PeerTls {
    pub fn new(identity: Arc<PeerIdentity>, known: Known) -> Result<PeerTls, rustls::Error> {
        // AES-128-GCM: the fastest suite where the CPU has AES instructions, and
        // as strong as a link between two of one's own nodes needs.
        let provider = Arc::new(CryptoProvider {
            cipher_suites: vec![
                rustls::crypto::ring::cipher_suite::TLS13_AES_128_GCM_SHA256,
                rustls::crypto::ring::cipher_suite::TLS13_CHACHA20_POLY1305_SHA256,
            ],
            ..rustls::crypto::ring::default_provider()
        });
        let verifier = Arc::new(PinnedVerifier {
            pinned: Pinned::Known(known.clone()),
            provider: provider.clone(),
        });
        let mut server = ServerConfig::builder_with_provider(provider.clone())
            .with_protocol_versions(&[&rustls::version::TLS13])?
            .with_client_cert_verifier(verifier)
            .with_single_cert(identity.certs.clone(), identity.key.clone_key())?;
        // Nothing resumes, and a ticket would be the one thing a lane's reader
        // sends its writer.
        server.send_tls13_tickets = 0;
        Ok(PeerTls {
            server: Arc::new(server),
            identity,
            provider,
            known,
        })
    }

    /// The client side, pinned to the node whose certificate is `fingerprint`.
    pub(super) fn client(&self, fingerprint: &str) -> Result<ClientConfig, rustls::Error> {
        let verifier = Arc::new(PinnedVerifier {
            pinned: Pinned::One(fingerprint.to_owned()),
            provider: self.provider.clone(),
        });
        ClientConfig::builder_with_provider(self.provider.clone())
            .with_protocol_versions(&[&rustls::version::TLS13])?
            .dangerous()
            .with_custom_certificate_verifier(verifier)
            .with_client_auth_cert(self.identity.certs.clone(), self.identity.key.clone_key())
    }

    /// The node a peer connection's certificate belongs to.
    pub(super) fn node_of(&self, cert: Option<&CertificateDer<'_>>) -> Option<NodeId> {
        let known = self.known.read().unwrap_or_else(|e| e.into_inner());
        known.get(&fingerprint(cert?)).cloned()
    }
}
