//! Which client certificates are revoked, and why: a trust decision that must hold
//! for as long as a connection lasts, not only at its handshake.
//!
//! Two lists, read with the TLS files at start-up and on every SIGHUP:
//! - the revocation list `tls.client_crl` (by serial; rustls also checks it at each
//!   handshake);
//! - the users revoked as a whole, `<tls.client_crl>.users` (one line each: the
//!   revocation time in Unix seconds, a tab, the user's name): every certificate of
//!   that user issued at or before that time is revoked, whoever made it — one made
//!   with openssl that `user cert` never saw included. `user cert --revoke NAME`
//!   writes it; a missing file is an empty list.
//!
//! [`Revocations::check`] answers for one certificate; the server asks it after each
//! handshake, and each session holding a certificate asks it again whenever the lists
//! are reloaded ([`crate::tls::Tls::subscribe`]), and closes at its certificate's
//! expiry.

use std::collections::{HashMap, HashSet};
use std::fmt;
use std::path::{Path, PathBuf};

use chrono::{DateTime, Utc};
use rustls::pki_types::CertificateRevocationListDer;

use crate::certificate::{serial_hex, ClientCert};

/// The revoked serials and users in force.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Revocations {
    serials: HashSet<Box<str>>,
    users: HashMap<Box<str>, DateTime<Utc>>,
}

/// Why a certificate is refused now.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Revoked {
    /// Its serial is on the revocation list.
    Serial,
    /// Its user was revoked at this time, after it was issued.
    User(DateTime<Utc>),
    /// It expired.
    Expired(DateTime<Utc>),
}

impl fmt::Display for Revoked {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Revoked::Serial => write!(f, "revoked (its serial is on tls.client_crl)"),
            Revoked::User(at) => write!(
                f,
                "revoked (every certificate of its user issued before {} is)",
                at.to_rfc3339()
            ),
            Revoked::Expired(at) => write!(f, "expired at {}", at.to_rfc3339()),
        }
    }
}

impl Revocations {
    /// The lists from the revocation lists' DER and the users file's text.
    pub fn new(crls: &[CertificateRevocationListDer<'_>], users: &str) -> Result<Self, String> {
        let mut serials = HashSet::new();
        for crl in crls {
            let (_, crl) = x509_parser::parse_x509_crl(crl)
                .map_err(|e| format!("cannot read the revocation list: {e}"))?;
            serials.extend(
                crl.iter_revoked_certificates()
                    .map(|r| serial_hex(r.raw_serial()).into_boxed_str()),
            );
        }
        Ok(Self {
            serials,
            users: parse_users(users)?,
        })
    }

    /// Why `cert` may not be used now, if it may not.
    pub fn check(&self, cert: &ClientCert, now: DateTime<Utc>) -> Option<Revoked> {
        if self.serials.contains(&cert.serial) {
            return Some(Revoked::Serial);
        }
        if let Some(at) = self.users.get(&cert.user) {
            if cert.not_before <= *at {
                return Some(Revoked::User(*at));
            }
        }
        (cert.not_after <= now).then_some(Revoked::Expired(cert.not_after))
    }

    pub fn serials(&self) -> usize {
        self.serials.len()
    }

    pub fn users(&self) -> usize {
        self.users.len()
    }
}

/// Where the users revoked as a whole are listed, beside the revocation list.
pub fn users_path(crl: &Path) -> PathBuf {
    let mut name = crl.as_os_str().to_owned();
    name.push(".users");
    name.into()
}

/// One line of the users file.
pub fn user_line(user: &str, at: DateTime<Utc>) -> String {
    format!("{}\t{user}\n", at.timestamp())
}

/// The users file: name -> the latest revocation time given for it.
fn parse_users(text: &str) -> Result<HashMap<Box<str>, DateTime<Utc>>, String> {
    let mut users: HashMap<Box<str>, DateTime<Utc>> = HashMap::new();
    for line in text
        .lines()
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
    {
        let bad = || format!("revoked users: {line:?} is not <unix time><tab><user>");
        let (at, user) = line.split_once('\t').ok_or_else(bad)?;
        let at = at
            .parse::<i64>()
            .ok()
            .and_then(|secs| DateTime::from_timestamp(secs, 0))
            .ok_or_else(bad)?;
        let entry = users.entry(user.into()).or_insert(at);
        *entry = (*entry).max(at);
    }
    Ok(users)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cert(user: &str, serial: &str, issued: i64, expires: i64) -> ClientCert {
        ClientCert {
            user: user.into(),
            serial: serial.into(),
            not_before: DateTime::from_timestamp(issued, 0).unwrap(),
            not_after: DateTime::from_timestamp(expires, 0).unwrap(),
        }
    }

    #[test]
    fn a_users_certificates_issued_before_their_revocation_are_revoked() {
        let lists = Revocations::new(&[], "1000\talice\n# a comment\n500\talice\n").unwrap();
        let now = DateTime::from_timestamp(2_000, 0).unwrap();
        assert_eq!(
            lists.check(&cert("alice", "01", 900, 9_000), now),
            Some(Revoked::User(DateTime::from_timestamp(1_000, 0).unwrap())),
            "the latest time counts"
        );
        assert_eq!(lists.check(&cert("alice", "02", 1_001, 9_000), now), None);
        assert_eq!(lists.check(&cert("bob", "03", 0, 9_000), now), None);
        assert_eq!(
            lists.check(&cert("bob", "03", 0, 1_500), now),
            Some(Revoked::Expired(
                DateTime::from_timestamp(1_500, 0).unwrap()
            ))
        );
        assert_eq!((lists.users(), lists.serials()), (1, 0));
    }

    #[test]
    fn a_bad_users_file_is_refused_in_words() {
        let err = Revocations::new(&[], "yesterday alice").unwrap_err();
        assert!(err.contains("<unix time><tab><user>"), "{err}");
    }
}
