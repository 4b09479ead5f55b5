//! The rules every key follows, as `#[serde(with = …)]` modules. Each reads what a
//! settings file writes and what an environment variable holds (always a string), and
//! an error names the bad value.

use std::fmt::Display;
use std::str::FromStr;
use std::time::Duration;

use serde::de::Error as _;
use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// A value written as its text (addresses, time zones): parsed with `FromStr`.
pub mod parsed {
    use super::*;

    pub fn deserialize<'de, D, T>(d: D) -> Result<T, D::Error>
    where
        D: Deserializer<'de>,
        T: FromStr,
        T::Err: Display,
    {
        let text = String::deserialize(d)?;
        text.parse()
            .map_err(|e| D::Error::custom(format!("{text:?}: {e}")))
    }

    pub fn serialize<S: Serializer, T: Display>(value: &T, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(value)
    }
}

/// An optional value: empty means none, anything else is parsed with `FromStr`.
pub mod optional {
    use super::*;

    pub fn deserialize<'de, D, T>(d: D) -> Result<Option<T>, D::Error>
    where
        D: Deserializer<'de>,
        T: FromStr,
        T::Err: Display,
    {
        let text = String::deserialize(d)?;
        if text.is_empty() {
            return Ok(None);
        }
        text.parse()
            .map(Some)
            .map_err(|e| D::Error::custom(format!("{text:?}: {e}")))
    }

    pub fn serialize<S: Serializer, T: Serialize>(
        value: &Option<T>,
        s: S,
    ) -> Result<S::Ok, S::Error> {
        match value {
            Some(value) => value.serialize(s),
            None => s.serialize_str(""),
        }
    }
}

/// A list: an array, or one string holding either a TOML array
/// (`["10.0.0.5/32"]`) or comma-separated items (`10.0.0.5/32,192.168.1.0/24`),
/// as an environment variable writes it. Each item is parsed with `FromStr`.
pub mod list {
    use super::*;

    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Written {
        Items(Vec<String>),
        Text(String),
    }

    #[derive(Deserialize)]
    struct Array {
        v: Vec<String>,
    }

    pub fn deserialize<'de, D, T>(d: D) -> Result<Vec<T>, D::Error>
    where
        D: Deserializer<'de>,
        T: FromStr,
        T::Err: Display,
    {
        let items = match Written::deserialize(d)
            .map_err(|_| D::Error::custom("expected a list or a comma-separated string"))?
        {
            Written::Items(items) => items,
            Written::Text(text) if text.trim_start().starts_with('[') => {
                toml::from_str::<Array>(&format!("v = {text}"))
                    .map_err(|e| {
                        D::Error::custom(format!("{text:?} is not a TOML array: {}", e.message()))
                    })?
                    .v
            }
            Written::Text(text) => text
                .split(',')
                .map(str::trim)
                .filter(|item| !item.is_empty())
                .map(str::to_owned)
                .collect(),
        };
        items
            .iter()
            .map(|item| {
                item.parse()
                    .map_err(|e| D::Error::custom(format!("{item:?}: {e}")))
            })
            .collect()
    }

    pub fn serialize<S: Serializer, T: Display>(items: &[T], s: S) -> Result<S::Ok, S::Error> {
        s.collect_seq(items.iter().map(|item| item.to_string()))
    }
}

fn duration<'de, D: Deserializer<'de>>(
    d: D,
    unit: fn(u64) -> Duration,
    positive: bool,
) -> Result<Duration, D::Error> {
    let n = u64::deserialize(d)?;
    if positive && n == 0 {
        return Err(D::Error::custom("0: must be greater than 0"));
    }
    Ok(unit(n))
}

/// Whole seconds, zero allowed (where it means "off").
pub mod secs {
    use super::*;

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
        duration(d, Duration::from_secs, false)
    }

    pub fn serialize<S: Serializer>(value: &Duration, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_u64(value.as_secs())
    }
}

/// Whole seconds, more than zero.
pub mod positive_secs {
    use super::*;

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
        duration(d, Duration::from_secs, true)
    }

    pub use super::secs::serialize;
}

/// Whole milliseconds, zero allowed.
pub mod millis {
    use super::*;

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
        duration(d, Duration::from_millis, false)
    }

    pub fn serialize<S: Serializer>(value: &Duration, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_u64(value.as_millis() as u64)
    }
}

/// Whole milliseconds, more than zero.
pub mod positive_millis {
    use super::*;

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
        duration(d, Duration::from_millis, true)
    }

    pub use super::millis::serialize;
}

/// A list of tables (`[[webhooks]]`): an array of tables, or one string holding a
/// TOML array of inline tables (`[{url = "…", secret = "…"}]`), as an environment
/// variable writes it. An error names the entry (`[1]: …`).
pub mod tables {
    use super::*;
    use serde::de::DeserializeOwned;

    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Written {
        Text(String),
        Tables(Vec<toml::Table>),
    }

    #[derive(Deserialize)]
    struct Array {
        v: Vec<toml::Table>,
    }

    pub fn deserialize<'de, D, T>(d: D) -> Result<Vec<T>, D::Error>
    where
        D: Deserializer<'de>,
        T: DeserializeOwned,
    {
        let tables = match Written::deserialize(d).map_err(|_| {
            D::Error::custom("expected a list of tables, or a string holding a TOML array of them")
        })? {
            Written::Tables(tables) => tables,
            Written::Text(text) => {
                toml::from_str::<Array>(&format!("v = {text}"))
                    .map_err(|e| {
                        D::Error::custom(format!("not a TOML array of tables: {}", e.message()))
                    })?
                    .v
            }
        };
        tables
            .into_iter()
            .enumerate()
            .map(|(i, table)| {
                T::deserialize(toml::Value::Table(table))
                    .map_err(|e| D::Error::custom(format!("[{i}]: {}", e.message())))
            })
            .collect()
    }

    pub fn serialize<S: Serializer, T: Serialize>(items: &[T], s: S) -> Result<S::Ok, S::Error> {
        s.collect_seq(items)
    }
}
