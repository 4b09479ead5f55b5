//! The client certificate authority behind `auth.clients = "user-cert"`, for the
//! operator's `elfin-gateway user cert`: a user's certificate signed by
//! `tls.client_ca` with `tls.client_ca_key` (its subject CN is the user's name, its
//! purpose client authentication), handed out as a PKCS#12 key store the desktop
//! client loads; and revocation: the list the gateway checks at every handshake
//! (`tls.client_crl`), with beside it the ledger of what was issued
//! (`<client_crl>.issued`, one certificate a line: serial, user, expiry, revocation),
//! so a user's certificates can be revoked by name.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context as _};
use p12_keystore::{KeyStore, KeyStoreEntry, PrivateKeyChain};
use rand::distr::{Alphanumeric, SampleString};
use rcgen::{
    CertificateParams, CertificateRevocationListParams, DnType, ExtendedKeyUsagePurpose,
    KeyIdMethod, KeyPair, KeyUsagePurpose, RevokedCertParams, SerialNumber,
};
use time::{Duration, OffsetDateTime};

use elfin_actors::tls::TlsSettings;

/// How long a revocation list is valid before the next `user cert` signs a new one.
const CRL_VALID: Duration = Duration::days(365);

/// The client CA, loaded from the `[tls]` settings.
pub struct Authority {
    /// The CA as rcgen signs with it (its name and key), and as clients chain to it.
    issuer: rcgen::Certificate,
    ca_der: Vec<u8>,
    key: KeyPair,
    crl: PathBuf,
}

/// A certificate just issued.
pub struct Issued {
    /// Hex, as `openssl x509 -serial` prints it.
    pub serial: String,
    pub not_after: OffsetDateTime,
    /// The PKCS#12 key store: the private key, the certificate and the CA.
    pub p12: Vec<u8>,
}

/// One line of the ledger.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Entry {
    serial: String,
    user: String,
    not_after: i64,
    revoked_at: Option<i64>,
}

impl Authority {
    /// Reads the CA and its key; names the setting that is missing.
    pub fn open(tls: &TlsSettings) -> anyhow::Result<Authority> {
        let (Some(ca), Some(key), Some(crl)) =
            (&tls.client_ca, &tls.client_ca_key, &tls.client_crl)
        else {
            bail!(
                "user cert needs tls.client_ca, tls.client_ca_key and tls.client_crl \
                 (where revocations go)"
            );
        };
        let ca_pem = read(ca)?;
        let key = KeyPair::from_pem(&read(key)?)
            .with_context(|| format!("{}: not a PEM private key", key.display()))?;
        let params = CertificateParams::from_ca_cert_pem(&ca_pem)
            .with_context(|| format!("{}: not a PEM CA certificate", ca.display()))?;
        let ca_der = pem_der(&ca_pem).with_context(|| format!("{}", ca.display()))?;
        // Only its name and key matter to what it signs.
        let issuer = params.self_signed(&key)?;
        Ok(Authority {
            issuer,
            ca_der,
            key,
            crl: crl.clone(),
        })
    }

    /// Issues a certificate for `user`, valid for `days`, in a key store sealed with
    /// `password`; lists it in the ledger and makes sure the revocation list exists.
    pub fn issue(&self, user: &str, days: u32, password: &str) -> anyhow::Result<Issued> {
        let mut serial = [0u8; 16];
        rand::fill(&mut serial);
        serial[0] = (serial[0] & 0x7f) | 0x01; // positive, and 16 bytes long
        let now = OffsetDateTime::now_utc();
        let not_after = now + Duration::days(i64::from(days));
        let mut params = CertificateParams::new(Vec::<String>::new())?;
        params.distinguished_name.push(DnType::CommonName, user);
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.serial_number = Some(SerialNumber::from_slice(&serial));
        // A little slack for clocks that are behind.
        params.not_before = now - Duration::hours(1);
        params.not_after = not_after;
        let key = KeyPair::generate()?;
        let cert = params.signed_by(&key, &self.issuer, &self.key)?;
        let chain = [
            p12_keystore::Certificate::from_der(cert.der())?,
            p12_keystore::Certificate::from_der(&self.ca_der)?,
        ];
        let private = p12_keystore::PrivateKey::from_der(&key.serialize_der())?;
        let mut store = KeyStore::new();
        store.add_entry(
            user,
            KeyStoreEntry::PrivateKeyChain(PrivateKeyChain::new(serial.to_vec(), private, chain)),
        );
        let p12 = store.writer(password).write()?;
        let serial = hex(&serial);
        let mut ledger = self.ledger()?;
        ledger.push(Entry {
            serial: serial.clone(),
            user: user.to_owned(),
            not_after: not_after.unix_timestamp(),
            revoked_at: None,
        });
        self.save(&ledger)?;
        Ok(Issued {
            serial,
            not_after,
            p12,
        })
    }

    /// Revokes the certificate with serial `which`, or every certificate of user
    /// `which`; rewrites the revocation list. Returns the serials revoked now.
    pub fn revoke(&self, which: &str) -> anyhow::Result<Vec<String>> {
        let mut ledger = self.ledger()?;
        let serial = which.trim_start_matches("0x").to_ascii_uppercase();
        let now = OffsetDateTime::now_utc().unix_timestamp();
        let mut revoked = Vec::new();
        for entry in &mut ledger {
            if entry.revoked_at.is_none() && (entry.serial == serial || entry.user == which) {
                entry.revoked_at = Some(now);
                revoked.push(entry.serial.clone());
            }
        }
        if revoked.is_empty() {
            bail!(
                "no certificate with serial or user {which:?} that is not revoked yet in {}",
                self.ledger_path().display()
            );
        }
        self.save(&ledger)?;
        Ok(revoked)
    }

    fn ledger_path(&self) -> PathBuf {
        let mut name = self.crl.clone().into_os_string();
        name.push(".issued");
        name.into()
    }

    fn ledger(&self) -> anyhow::Result<Vec<Entry>> {
        let path = self.ledger_path();
        let text = match std::fs::read_to_string(&path) {
            Ok(text) => text,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => String::new(),
            Err(e) => bail!("{}: {e}", path.display()),
        };
        text.lines()
            .filter(|line| !line.is_empty() && !line.starts_with('#'))
            .map(|line| parse_entry(line).with_context(|| format!("{}: {line:?}", path.display())))
            .collect()
    }

    /// Writes the ledger, then the revocation list it implies (both replaced whole,
    /// so a reader never sees half a file).
    fn save(&self, ledger: &[Entry]) -> anyhow::Result<()> {
        let mut text =
            String::from("# serial\tuser\tnot after (unix)\trevoked at (unix, - = valid)\n");
        for e in ledger {
            let revoked = e.revoked_at.map_or("-".to_owned(), |t| t.to_string());
            text.push_str(&format!(
                "{}\t{}\t{}\t{revoked}\n",
                e.serial, e.user, e.not_after
            ));
        }
        replace(&self.ledger_path(), text.as_bytes())?;
        let now = OffsetDateTime::now_utc();
        let revoked = ledger
            .iter()
            .filter_map(|e| {
                let at = OffsetDateTime::from_unix_timestamp(e.revoked_at?).ok()?;
                Some(RevokedCertParams {
                    serial_number: SerialNumber::from_slice(&unhex(&e.serial)?),
                    revocation_time: at,
                    reason_code: None,
                    invalidity_date: None,
                })
            })
            .collect();
        let crl = CertificateRevocationListParams {
            this_update: now,
            next_update: now + CRL_VALID,
            crl_number: SerialNumber::from(now.unix_timestamp().max(1) as u64),
            issuing_distribution_point: None,
            revoked_certs: revoked,
            key_identifier_method: KeyIdMethod::Sha256,
        }
        .signed_by(&self.issuer, &self.key)?;
        replace(&self.crl, crl.pem()?.as_bytes())
    }
}

/// A new password for a key store: 20 letters and digits.
pub fn new_password() -> String {
    Alphanumeric.sample_string(&mut rand::rng(), 20)
}

fn parse_entry(line: &str) -> Option<Entry> {
    let mut fields = line.split('\t');
    let serial = fields.next()?.to_owned();
    let user = fields.next()?.to_owned();
    let not_after = fields.next()?.parse().ok()?;
    let revoked_at = match fields.next()? {
        "-" => None,
        at => Some(at.parse().ok()?),
    };
    Some(Entry {
        serial,
        user,
        not_after,
        revoked_at,
    })
}

fn read(path: &Path) -> anyhow::Result<String> {
    std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))
}

/// The DER of the first PEM certificate in `pem`.
fn pem_der(pem: &str) -> anyhow::Result<Vec<u8>> {
    use rustls::pki_types::pem::PemObject;
    Ok(
        rustls::pki_types::CertificateDer::from_pem_slice(pem.as_bytes())
            .context("no PEM certificate")?
            .to_vec(),
    )
}

/// Writes a file that holds a private key (a key store): readable by its owner only
/// (0600), also when it replaces an older file.
pub fn write_private(path: &Path, bytes: &[u8]) -> anyhow::Result<()> {
    use std::io::Write as _;
    use std::os::unix::fs::{OpenOptionsExt as _, PermissionsExt as _};
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)
        .with_context(|| format!("cannot write {}", path.display()))?;
    file.set_permissions(std::fs::Permissions::from_mode(0o600))
        .with_context(|| format!("cannot make {} private", path.display()))?;
    file.write_all(bytes)
        .with_context(|| format!("cannot write {}", path.display()))
}

/// Writes `bytes` to a temporary file beside `path`, then renames it over `path`.
fn replace(path: &Path, bytes: &[u8]) -> anyhow::Result<()> {
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(".tmp");
    std::fs::write(&tmp, bytes).with_context(|| format!("cannot write {}", path.display()))?;
    std::fs::rename(&tmp, path).with_context(|| format!("cannot replace {}", path.display()))
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02X}")).collect()
}

fn unhex(text: &str) -> Option<Vec<u8>> {
    (0..text.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(text.get(i..i + 2)?, 16).ok())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ledger_lines_round_trip() {
        let entry = Entry {
            serial: "7F01".into(),
            user: "alice".into(),
            not_after: 1_900_000_000,
            revoked_at: Some(1_800_000_000),
        };
        assert_eq!(
            parse_entry("7F01\talice\t1900000000\t1800000000"),
            Some(entry)
        );
        assert_eq!(parse_entry("7F01\talice\t1\t-").unwrap().revoked_at, None);
        assert_eq!(
            unhex(&hex(&[0x7f, 0x01, 0xab])),
            Some(vec![0x7f, 0x01, 0xab])
        );
    }
}
