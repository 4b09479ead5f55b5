//! The operator commands on the gateway's database: `user` (add, list, remove, admin,
//! client certificates), `device` (add, list) and `audit` (the trail as tables or
//! JSON). Each opens the configured store, does its one thing and prints the result.

use std::sync::Arc;

use anyhow::Context as _;
use elfin_actors::store::{self, Store};

use crate::printable::escaped;
use crate::settings::Settings;
use crate::{audit, certs, UserCommand};

pub(crate) async fn open_store(settings: &Settings) -> anyhow::Result<Arc<dyn Store>> {
    Ok(store::open(&settings.storage, &settings.mongodb, false).await?)
}

pub(crate) async fn user_command(settings: &Settings, cmd: UserCommand) -> anyhow::Result<()> {
    let store = open_store(settings).await?;
    match cmd {
        UserCommand::Add { name, uuid } => {
            let uuid = uuid.unwrap_or_else(|| uuid::Uuid::new_v4().to_string());
            if let Err(e) = elfin_actors::frame::check_uuid(&uuid) {
                anyhow::bail!("invalid uuid {uuid:?}: {e}");
            }
            store.add_user(&name, &uuid).await?;
            println!("{uuid}");
            println!("heartbeat packet: beat;{uuid};%MAC;%HOST;0");
            println!("data packet header: data;{uuid};%MAC;%HOST;0;");
        }
        UserCommand::Cert {
            name,
            days,
            out,
            password,
            revoke,
            revoke_file,
        } => {
            let authority = certs::Authority::open(&settings.tls)?;
            let revoking = revoke.is_some() || revoke_file.is_some();
            if let Some(which) = revoke {
                let user = store.account(store::AccountKey::Username(&which)).await?;
                if user.is_some() {
                    for serial in authority.revoke_user(&which)? {
                        println!("revoked {serial}");
                    }
                    println!("revoked every certificate of user {which} issued until now");
                } else {
                    authority.revoke_serial(&which, None).with_context(|| {
                        format!("{which:?} is no user's name, nor a serial number")
                    })?;
                    println!("revoked {which}");
                }
            }
            if let Some(file) = revoke_file {
                println!("revoked {}", authority.revoke_file(&file)?);
            }
            if revoking {
                println!(
                    "send the gateway SIGHUP to apply it (it closes the connections of \
                     revoked certificates)"
                );
                return Ok(());
            }
            let name = name.expect("clap requires a name without --revoke");
            if store
                .account(store::AccountKey::Username(&name))
                .await?
                .is_none()
            {
                anyhow::bail!("no user named {name:?} (user add first)");
            }
            let out = out.unwrap_or_else(|| format!("{name}.p12").into());
            let generated = password.is_none();
            let password = password.unwrap_or_else(certs::new_password);
            let issued = authority.issue(&name, days, &password)?;
            certs::write_private(&out, &issued.p12)?;
            println!("{}", out.display());
            println!(
                "serial {} valid until {}",
                issued.serial,
                issued.not_after.date()
            );
            if generated {
                println!("password {password}");
            }
        }
        UserCommand::Remove { name } => {
            if !store.remove_user(&name).await? {
                anyhow::bail!("no user named {name:?}");
            }
            println!("user {name} removed");
        }
        UserCommand::Admin { name, state } => {
            let admin = state == "on";
            if !store.set_admin(&name, admin).await? {
                anyhow::bail!("no user named {name:?}");
            }
            println!(
                "user {name} is {}",
                if admin { "an admin" } else { "no admin" }
            );
        }
        UserCommand::List => {
            println!("{:<36}  {:<20}  {:>7}", "UUID", "NAME", "DEVICES");
            for u in store.users().await? {
                println!(
                    "{:<36}  {:<20}  {:>7}",
                    escaped(&u.uuid),
                    escaped(&u.username),
                    u.devices
                );
            }
        }
    }
    Ok(())
}

pub(crate) async fn add_device(
    settings: &Settings,
    uuid: String,
    mac: String,
    host: Option<String>,
) -> anyhow::Result<()> {
    for (what, field) in [("uuid", &uuid), ("mac", &mac)] {
        if let Err(e) = elfin_actors::frame::check_uuid(field) {
            anyhow::bail!("invalid {what} {field:?}: {e}");
        }
    }
    let store = open_store(settings).await?;
    let device = elfin_actors::store::Sighting {
        uuid: uuid.clone().into(),
        mac: mac.clone().into(),
        host: host.unwrap_or_default().into(),
        at: chrono::DateTime::UNIX_EPOCH,
    };
    let recorded = store.record(&[device]).await?;
    if recorded.unknown_user > 0 {
        anyhow::bail!("no user has the uuid {uuid}");
    }
    if recorded.written == 0 {
        anyhow::bail!("the store refused device {mac}");
    }
    println!("device {mac} added for user {uuid}");
    Ok(())
}

pub(crate) async fn list_devices(settings: &Settings, owner: Option<String>) -> anyhow::Result<()> {
    let store = open_store(settings).await?;
    let zone = settings.query.time_zone;
    println!("{:<20}  {:<24}  {:<22}  OWNER", "MAC", "HOST", "LAST SEEN");
    for d in store.devices(owner.as_deref()).await? {
        println!(
            "{:<20}  {:<24}  {:<22}  {}",
            escaped(&d.device.mac),
            escaped(&d.device.host),
            d.device
                .last_seen
                .with_timezone(&zone)
                .format(&settings.query.time_format)
                .to_string(),
            escaped(d.owner.as_deref().unwrap_or("-"))
        );
    }
    Ok(())
}

pub(crate) async fn print_audit(
    settings: &Settings,
    wanted: audit::Wanted,
    json: bool,
) -> anyhow::Result<()> {
    let store = open_store(settings).await?;
    let Some(filter) = audit::filter(&*store, &wanted).await? else {
        anyhow::bail!("no user named {:?}", wanted.user.unwrap_or_default());
    };
    let (tunnels, events, refusals, names) = futures::try_join!(
        store.audit_tunnels(&filter),
        store.audit_devices(&filter),
        store.audit_refusals(&filter),
        audit::user_names(&*store)
    )?;
    let shown = audit::Shown {
        names: &names,
        format: &settings.query,
    };
    if json {
        for t in tunnels {
            let row = serde_json::json!({ "tunnel": shown.tunnel(t) });
            println!("{row}");
        }
        for e in events {
            let row = serde_json::json!({ "device_event": shown.event(e) });
            println!("{row}");
        }
        for r in refusals {
            let row = serde_json::json!({ "refusal": shown.refusal(r) });
            println!("{row}");
        }
        return Ok(());
    }
    println!("TUNNELS ({})", tunnels.len());
    println!(
        "{:<22}  {:<9}  {:<16}  {:<14}  {:<21}  {:<16}  {:>7}  {:>10}  {:>10}  CAUSE",
        "OPENED",
        "DURATION",
        "USER",
        "DEVICE",
        "CLIENT",
        "CERTIFICATE",
        "NODE",
        "TO DEV",
        "FROM DEV"
    );
    for t in tunnels {
        let t = shown.tunnel(t);
        let device = match &t.peer_device {
            Some(peer) => format!("{}+{peer}", t.device),
            None => t.device.clone(),
        };
        println!(
            "{:<22}  {:<9}  {:<16}  {:<14}  {:<21}  {:<16}  {:>7}  {:>10}  {:>10}  {}",
            t.opened,
            t.seconds.map_or("open".to_owned(), |s| format!("{s} s")),
            escaped(&t.user),
            escaped(&device),
            t.client_address,
            escaped(&certificate(
                t.client_certificate.as_deref(),
                t.client_certificate_serial.as_deref()
            )),
            escaped(&t.node),
            t.bytes_to_device,
            t.bytes_from_device,
            escaped(t.cause.as_deref().unwrap_or("-")),
        );
    }
    println!();
    println!("DEVICE EVENTS ({})", events.len());
    println!(
        "{:<22}  {:<8}  {:<14}  {:<16}  {:<16}  {:<21}  {:>7}  CAUSE",
        "AT", "EVENT", "DEVICE", "HOST", "USER", "ADDRESS", "NODE"
    );
    for e in events {
        let e = shown.event(e);
        println!(
            "{:<22}  {:<8}  {:<14}  {:<16}  {:<16}  {:<21}  {:>7}  {}",
            e.at,
            e.event,
            escaped(&e.device),
            escaped(&e.host),
            escaped(&e.user),
            e.address,
            escaped(&e.node),
            escaped(e.cause.as_deref().unwrap_or("-")),
        );
    }
    println!();
    println!("REFUSALS ({})", refusals.len());
    println!(
        "{:<22}  {:<9}  {:<16}  {:<14}  {:<14}  {:<21}  {:<16}  {:>7}  DETAIL",
        "AT", "REQUEST", "USER", "DEVICE", "REASON", "SOURCE", "CERTIFICATE", "NODE"
    );
    for r in refusals {
        let r = shown.refusal(r);
        println!(
            "{:<22}  {:<9}  {:<16}  {:<14}  {:<14}  {:<21}  {:<16}  {:>7}  {}",
            r.at,
            r.request,
            escaped(r.user.as_deref().unwrap_or("-")),
            escaped(r.device.as_deref().unwrap_or("-")),
            r.reason,
            r.source,
            escaped(&certificate(
                r.certificate.as_deref(),
                r.certificate_serial.as_deref()
            )),
            escaped(&r.node),
            escaped(&r.detail),
        );
    }
    Ok(())
}

/// A certificate as the tables show it: its subject's name and serial.
fn certificate(name: Option<&str>, serial: Option<&str>) -> String {
    match (name, serial) {
        (Some(name), Some(serial)) => format!("{name} #{serial}"),
        (Some(name), None) => name.to_owned(),
        (None, _) => "-".to_owned(),
    }
}
