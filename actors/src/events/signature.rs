//! The Standard Webhooks signature (<https://www.standardwebhooks.com>), so receivers
//! verify deliveries with an existing library: the secret is `whsec_` and the key in
//! base64; each attempt carries `webhook-id`, `webhook-timestamp` (Unix seconds) and
//! `webhook-signature` = `v1,` + base64(HMAC-SHA256(key, "id.timestamp.body")).

use base64::engine::general_purpose::STANDARD;
use base64::Engine;
use ring::hmac;

const PREFIX: &str = "whsec_";

/// Bytes a key must have at least (Standard Webhooks asks for 24 to 64).
pub const MIN_KEY: usize = 24;

/// An endpoint's signing key.
#[derive(Clone)]
pub struct SigningKey(hmac::Key);

impl std::fmt::Debug for SigningKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("SigningKey(****)")
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum KeyError {
    #[error("a webhook secret is \"whsec_\" and the key in base64 (make one with `elfin-gateway events secret`)")]
    NoPrefix,
    #[error("the part after \"whsec_\" is not base64: {0}")]
    NotBase64(String),
    #[error("the key has {0} bytes, fewer than {MIN_KEY}")]
    Short(usize),
}

impl SigningKey {
    /// Reads a `whsec_…` secret.
    pub fn parse(secret: &str) -> Result<SigningKey, KeyError> {
        let encoded = secret
            .trim()
            .strip_prefix(PREFIX)
            .ok_or(KeyError::NoPrefix)?;
        let key = STANDARD
            .decode(encoded)
            .map_err(|e| KeyError::NotBase64(e.to_string()))?;
        if key.len() < MIN_KEY {
            return Err(KeyError::Short(key.len()));
        }
        Ok(SigningKey(hmac::Key::new(hmac::HMAC_SHA256, &key)))
    }

    /// A new random secret, in its `whsec_` form.
    pub fn generate() -> String {
        let mut key = [0u8; 32];
        ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut key)
            .expect("the system's random source");
        format!("{PREFIX}{}", STANDARD.encode(key))
    }

    /// The `webhook-signature` header of one attempt.
    pub fn sign(&self, id: &str, timestamp: i64, body: &[u8]) -> String {
        let mut context = hmac::Context::with_key(&self.0);
        context.update(id.as_bytes());
        context.update(b".");
        context.update(timestamp.to_string().as_bytes());
        context.update(b".");
        context.update(body);
        format!("v1,{}", STANDARD.encode(context.sign().as_ref()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn signs_as_the_specification_s_example() {
        // The example of the Standard Webhooks specification and its reference
        // libraries' tests.
        let key = SigningKey::parse("whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw").unwrap();
        let signature = key.sign(
            "msg_p5jXN8AQM9LWM0D4loKWxJek",
            1614265330,
            br#"{"test": 2432232314}"#,
        );
        assert_eq!(signature, "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE=");
    }

    #[test]
    fn refuses_what_is_no_secret() {
        assert_eq!(
            SigningKey::parse("MfKQ9r8GKYqr").unwrap_err(),
            KeyError::NoPrefix
        );
        assert!(matches!(
            SigningKey::parse("whsec_!!!"),
            Err(KeyError::NotBase64(_))
        ));
        assert_eq!(
            SigningKey::parse("whsec_c2hvcnQ=").unwrap_err(),
            KeyError::Short(5)
        );
        assert!(SigningKey::parse(&SigningKey::generate()).is_ok());
    }
}
