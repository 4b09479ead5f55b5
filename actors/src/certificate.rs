//! What a client certificate tells the gateway about the connection that presented
//! it: the user it names (its subject's common name) and its serial, which tells two
//! certificates of one user apart in the logs and the audit trail.

use std::sync::Arc;

/// A client certificate as the gateway keeps it for its connection: the user it
/// names and its serial, which tells two certificates of one user apart.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClientCert {
    /// The subject's common name.
    pub user: Box<str>,
    /// The serial number in hexadecimal, as `user cert` prints it.
    pub serial: Box<str>,
}

/// The user a client certificate names (its subject's common name) and its serial;
/// `None` without a common name.
pub fn client_cert(der: &[u8]) -> Option<Arc<ClientCert>> {
    let (_, cert) = x509_parser::parse_x509_certificate(der).ok()?;
    let name = cert.subject().iter_common_name().next()?.as_str().ok()?;
    let serial: String = cert
        .raw_serial()
        .iter()
        .map(|b| format!("{b:02X}"))
        .collect();
    Some(Arc::new(ClientCert {
        user: name.into(),
        serial: serial.into(),
    }))
}
