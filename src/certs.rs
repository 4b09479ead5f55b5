//! The client certificate authority behind `auth.clients = "user-cert"`, for the
//! operator's `elfin-gateway user cert`: a user's certificate signed by
//! `tls.client_ca` with `tls.client_ca_key` (its subject CN is the user's name, its
//! purpose client authentication), handed out as a PKCS#12 key store the desktop
//! client loads; and revocation: the list the gateway checks at every handshake
//! (`tls.client_crl`), with beside it the ledger of what was issued
//! (`<client_crl>.issued`, one certificate a line: serial, user, expiry, revocation),
//! and the users revoked as a whole (`<client_crl>.users`, read by the gateway too,
//! see [`elfin_actors::revocation`]): revoking a user revokes every certificate of
//! theirs issued until then, also ones made elsewhere (openssl) with the same CA.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context as _};
use p12_keystore::{KeyStore, KeyStoreEntry, PrivateKeyChain};
use rand::distr::{Alphanumeric, SampleString};
use rcgen::{
    CertificateParams, CertificateRevocationListParams, DnType, ExtendedKeyUsagePurpose,
    KeyIdMethod, KeyPair, KeyUsagePurpose, RevokedCertParams, SerialNumber,
};
use time::{Duration, OffsetDateTime};

use elfin_actors::revocation;
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
struct LedgerLine {
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
        // A little slack for clocks that are behind, but never back to or before the
        // user's revocation: that would revoke the new certificate too.
        let slack = now - Duration::hours(1);
        params.not_before = match self.user_revoked_at(user)? {
            Some(at) => {
                let after = at + Duration::seconds(1);
                // Revoked this very second: wait for the next, so the certificate is
                // valid when it is handed out.
                let early = after - OffsetDateTime::now_utc();
                if early.is_positive() {
                    std::thread::sleep(early.unsigned_abs());
                }
                slack.max(after)
            }
            None => slack,
        };
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
        ledger.push(LedgerLine {
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

    /// Revokes every certificate of `user` that exists now: those in the ledger by
    /// serial, and any other the CA signed for them (openssl-made ones too) by the
    /// user's revocation time, which the gateway applies to every certificate of
    /// theirs issued until then. Returns the ledger's serials revoked now.
    pub fn revoke_user(&self, user: &str) -> anyhow::Result<Vec<String>> {
        let now = OffsetDateTime::now_utc();
        let mut ledger = self.ledger()?;
        let mut revoked = Vec::new();
        for entry in &mut ledger {
            if entry.revoked_at.is_none() && entry.user == user {
                entry.revoked_at = Some(now.unix_timestamp());
                revoked.push(entry.serial.clone());
            }
        }
        let path = revocation::users_path(&self.crl);
        let mut users = read_optional(&path)?;
        let at = chrono::DateTime::from_timestamp(now.unix_timestamp(), 0).unwrap_or_default();
        users.push_str(&revocation::user_line(user, at));
        replace(&path, users.as_bytes())?;
        self.save(&ledger)?;
        Ok(revoked)
    }

    /// Revokes the certificate with serial `serial` (hex), issued by this tool or not;
    /// `user` names it in the ledger when it is new there.
    pub fn revoke_serial(&self, serial: &str, user: Option<&str>) -> anyhow::Result<()> {
        let serial = serial
            .trim_start_matches("0x")
            .replace(':', "")
            .to_ascii_uppercase();
        if serial.is_empty() || unhex(&serial).is_none() {
            bail!("{serial:?} is not a serial number (hexadecimal, as openssl x509 -serial prints it)");
        }
        let now = OffsetDateTime::now_utc().unix_timestamp();
        let mut ledger = self.ledger()?;
        match ledger.iter_mut().find(|e| e.serial == serial) {
            Some(entry) if entry.revoked_at.is_some() => bail!("{serial} is revoked already"),
            Some(entry) => entry.revoked_at = Some(now),
            None => ledger.push(LedgerLine {
                serial,
                user: user.unwrap_or("-").to_owned(),
                not_after: 0,
                revoked_at: Some(now),
            }),
        }
        self.save(&ledger)
    }

    /// Revokes the certificate in the PEM file `path`, which this CA must have signed.
    /// Returns its serial.
    pub fn revoke_file(&self, path: &Path) -> anyhow::Result<String> {
        let der = pem_der(&read(path)?).with_context(|| format!("{}", path.display()))?;
        let (_, cert) = x509_parser::parse_x509_certificate(&der)
            .map_err(|e| anyhow::anyhow!("{}: not an X.509 certificate: {e}", path.display()))?;
        let (_, ca) = x509_parser::parse_x509_certificate(&self.ca_der)
            .map_err(|e| anyhow::anyhow!("tls.client_ca: {e}"))?;
        if cert.issuer().as_raw() != ca.subject().as_raw()
            || cert.verify_signature(Some(ca.public_key())).is_err()
        {
            bail!(
                "{}: not signed by tls.client_ca ({}); the gateway does not accept it anyway",
                path.display(),
                ca.subject()
            );
        }
        let serial = elfin_actors::certificate::serial_hex(cert.raw_serial());
        let user = cert
            .subject()
            .iter_common_name()
            .next()
            .and_then(|cn| cn.as_str().ok())
            .map(str::to_owned);
        self.revoke_serial(&serial, user.as_deref())?;
        Ok(serial)
    }

    /// When `user` was last revoked as a whole, if ever.
    fn user_revoked_at(&self, user: &str) -> anyhow::Result<Option<OffsetDateTime>> {
        let text = read_optional(&revocation::users_path(&self.crl))?;
        Ok(text
            .lines()
            .filter_map(|line| line.split_once('\t'))
            .filter(|(_, name)| *name == user)
            .filter_map(|(at, _)| OffsetDateTime::from_unix_timestamp(at.parse().ok()?).ok())
            .max())
    }

    fn ledger_path(&self) -> PathBuf {
        let mut name = self.crl.clone().into_os_string();
        name.push(".issued");
        name.into()
    }

    fn ledger(&self) -> anyhow::Result<Vec<LedgerLine>> {
        let path = self.ledger_path();
        let text = read_optional(&path)?;
        text.lines()
            .filter(|line| !line.is_empty() && !line.starts_with('#'))
            .map(|line| parse_entry(line).with_context(|| format!("{}: {line:?}", path.display())))
            .collect()
    }

    /// Writes the ledger, then the revocation list it implies (both replaced whole,
    /// so a reader never sees half a file).
    fn save(&self, ledger: &[LedgerLine]) -> anyhow::Result<()> {
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

fn parse_entry(line: &str) -> Option<LedgerLine> {
    let mut fields = line.split('\t');
    let serial = fields.next()?.to_owned();
    let user = fields.next()?.to_owned();
    let not_after = fields.next()?.parse().ok()?;
    let revoked_at = match fields.next()? {
        "-" => None,
        at => Some(at.parse().ok()?),
    };
    Some(LedgerLine {
        serial,
        user,
        not_after,
        revoked_at,
    })
}

/// A file's text, empty if it does not exist yet.
fn read_optional(path: &Path) -> anyhow::Result<String> {
    match std::fs::read_to_string(path) {
        Ok(text) => Ok(text),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(String::new()),
        Err(e) => bail!("{}: {e}", path.display()),
    }
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
        let entry = LedgerLine {
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
