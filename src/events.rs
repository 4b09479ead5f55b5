//! `elfin-gateway events`: a new webhook secret, and a signed sample event sent to a
//! receiver now, so an operator sees the endpoint take (and verify) one before a
//! device goes offline.

use anyhow::{anyhow, bail};
use chrono::Utc;

use elfin_actors::events::signature::SigningKey;
use elfin_actors::events::webhook::{send_once, Endpoint, WebhookSettings};
use elfin_actors::events::{Event, EventData, EventKind, EventUser};

use crate::settings::Settings;

/// Prints a new `whsec_` secret.
pub fn secret() {
    println!("{}", SigningKey::generate());
}

/// Sends a signed `device.offline` sample to `url`, with `secret` or the secret of
/// the `[[webhooks]]` entry of that URL.
pub async fn test(settings: &Settings, url: &str, secret: Option<String>) -> anyhow::Result<()> {
    let entry = settings.webhooks.iter().find(|w| w.url == url);
    let mut webhook = entry.cloned().unwrap_or_else(|| WebhookSettings {
        url: url.to_owned(),
        ..WebhookSettings::default()
    });
    match secret {
        Some(secret) => {
            webhook.secret = Some(secret.parse().map_err(|e| anyhow!("{e:?}"))?);
            webhook.secret_file = None;
        }
        None if entry.is_none() => {
            bail!("{url} is no [[webhooks]] entry of the settings: give its secret with --secret")
        }
        None => {}
    }
    webhook.events.clear();
    webhook.users.clear();
    let endpoint = Endpoint::new(&webhook, 0, &settings.events.allow_http_hosts)
        .map_err(|e| anyhow!("{}", e.why))?;
    let event = sample(settings.cluster.node_id.as_deref());
    send_once(&endpoint, &event)
        .await
        .map_err(|e| anyhow!("{url}: {e}"))?;
    println!(
        "{url} took a signed sample {} event (webhook-id {})",
        event.kind.name(),
        event.id
    );
    Ok(())
}

fn sample(node: Option<&str>) -> Event {
    let now = Utc::now();
    Event::new(
        EventKind::Offline,
        EventData {
            user: Some(EventUser {
                name: Some("example".into()),
                uuid_prefix: Some("00000000…".into()),
            }),
            mac: Some("000000000000".into()),
            host: Some("sample-device".into()),
            source: Some("192.0.2.1:40000".into()),
            node: elfin_actors::config::node_name(node),
            time: now - chrono::TimeDelta::seconds(300),
            reason: "a sample event sent by `elfin-gateway events test`".into(),
            ..EventData::default()
        },
    )
}
