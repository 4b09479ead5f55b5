//! What a client certificate tells the gateway about the connection that presented
//! it: the user it names (its subject's common name), its serial, which tells two
//! certificates of one user apart in the logs and the audit trail, and when it was
//! issued and expires, which decide how long the connection may last.

use std::sync::Arc;

use chrono::{DateTime, Utc};

/// A client certificate as the gateway keeps it for its connection.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClientCert {
    /// The subject's common name.
    pub user: Box<str>,
    /// The serial number in hexadecimal, as `user cert` prints it.
    pub serial: Box<str>,
    /// Its validity: issued (not before) and expiry (not after).
    pub not_before: DateTime<Utc>,
    pub not_after: DateTime<Utc>,
}

/// What a client certificate names; `None` without a common name.
pub fn client_cert(der: &[u8]) -> Option<Arc<ClientCert>> {
    let (_, cert) = x509_parser::parse_x509_certificate(der).ok()?;
    let name = cert.subject().iter_common_name().next()?.as_str().ok()?;
    let time = |t: x509_parser::time::ASN1Time| {
        DateTime::from_timestamp(t.timestamp(), 0).unwrap_or(DateTime::<Utc>::MIN_UTC)
    };
    Some(Arc::new(ClientCert {
        user: name.into(),
        serial: serial_hex(cert.raw_serial()).into(),
        not_before: time(cert.validity().not_before),
        not_after: time(cert.validity().not_after),
    }))
}

/// A serial number's bytes as the gateway writes them: upper-case hexadecimal.
pub fn serial_hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02X}")).collect()
}
