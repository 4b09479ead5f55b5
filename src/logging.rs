//! Log output: env_logger's plain lines (the default, what `journalctl` shows) with
//! control characters escaped ([`escaped`]), or one JSON object per line for log
//! shippers (`log.format = "json"`).

use std::io::Write as _;

use log::LevelFilter;
use serde::{Deserialize, Serialize};

use crate::printable::escaped;

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Format {
    #[default]
    Text,
    Json,
}

/// The `[log]` section.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Log {
    #[serde(with = "level")]
    pub level: LevelFilter,
    pub format: Format,
}

impl Default for Log {
    fn default() -> Self {
        Self {
            level: LevelFilter::Info,
            format: Format::Text,
        }
    }
}

/// `log.level`: off, error, warn, info, debug or trace.
mod level {
    use log::LevelFilter;
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<LevelFilter, D::Error> {
        let text = String::deserialize(d)?;
        text.parse().map_err(|_| {
            serde::de::Error::custom(format!(
                "{text:?} is not one of off, error, warn, info, debug, trace"
            ))
        })
    }

    pub fn serialize<S: Serializer>(level: &LevelFilter, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&level.as_str().to_ascii_lowercase())
    }
}

/// Installs the logger at `log.level`, overridden by `RUST_LOG` (env_logger syntax).
pub fn init(log: &Log) {
    let mut builder = env_logger::Builder::new();
    builder.filter_level(log.level).parse_env("RUST_LOG");
    if log.format == Format::Json {
        builder.format(|out, record| {
            let line = serde_json::json!({
                "ts": chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Millis, true),
                "level": record.level().as_str(),
                "target": record.target(),
                "msg": record.args().to_string(),
            });
            writeln!(out, "{line}")
        });
    } else {
        builder.format(|out, record| {
            let message = record.args().to_string();
            writeln!(
                out,
                "[{} {:<5} {}] {}",
                out.timestamp(),
                record.level(),
                record.target(),
                escaped(&message)
            )
        });
    }
    builder.init();
}
