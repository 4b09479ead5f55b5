//! Log output: env_logger's plain lines (the default, what `journalctl` shows), or one
//! JSON object per line for log shippers (`log.format = "json"`).

use std::io::Write as _;

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Format {
    #[default]
    Text,
    Json,
}

/// Installs the logger: `level` (env_logger filter syntax), overridden by `RUST_LOG`.
pub fn init(level: &str, format: Format) {
    let mut builder = env_logger::Builder::new();
    builder.parse_filters(level).parse_env("RUST_LOG");
    if format == Format::Json {
        builder.format(|out, record| {
            let line = serde_json::json!({
                "ts": chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Millis, true),
                "level": record.level().as_str(),
                "target": record.target(),
                "msg": record.args().to_string(),
            });
            writeln!(out, "{line}")
        });
    }
    builder.init();
}
