//! `elfin-gateway`: the command line. `serve` (the default) runs the gateway; `user`
//! and `device` are operator commands on its database.

mod server;
mod settings;

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use clap::{Parser, Subcommand};

use std::time::Duration;

use elfin_actors::store::embedded::EmbeddedStore;
use elfin_actors::store::mongo::MongoStore;
use elfin_actors::store::Store;
use settings::Settings;

#[derive(Parser)]
#[command(
    version,
    about = "Remote-access gateway for Elfin serial-to-network devices"
)]
struct Cli {
    /// Settings file; every key can also be set as ELFIN__SECTION__KEY.
    #[arg(long, global = true, value_name = "FILE")]
    config: Option<PathBuf>,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Subcommand)]
enum Command {
    /// Run the gateway (the default).
    Serve,
    /// Manage users.
    #[command(subcommand)]
    User(UserCommand),
    /// Inspect devices.
    #[command(subcommand)]
    Device(DeviceCommand),
}

#[derive(Subcommand)]
enum UserCommand {
    /// Create a user; prints its uuid, then the strings to paste into the device.
    Add {
        name: String,
        /// Use this uuid instead of a new random one.
        #[arg(long)]
        uuid: Option<String>,
    },
    /// List users.
    List,
}

#[derive(Subcommand)]
enum DeviceCommand {
    /// List devices, all or those of one user.
    List { uuid: Option<String> },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let path = cli.config.clone().unwrap_or_else(|| "settings.toml".into());
    let settings = match Settings::load(&path, cli.config.is_some()) {
        Ok(settings) => settings,
        Err(e) => {
            eprintln!("elfin-gateway: {e:#}");
            return ExitCode::from(2);
        }
    };
    env_logger::Builder::new()
        .parse_filters(&settings.log.level)
        .parse_env("RUST_LOG")
        .init();
    let result = actix_rt::System::new().block_on(async move {
        match cli.command.unwrap_or(Command::Serve) {
            Command::Serve => server::run(settings).await,
            Command::User(cmd) => user_command(&settings, cmd).await,
            Command::Device(DeviceCommand::List { uuid }) => list_devices(&settings, uuid).await,
        }
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("elfin-gateway: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// Opens the configured store. For the gateway itself (`serving`), MongoDB indexes are
/// created in the background, so it starts even when MongoDB is down.
pub async fn open_store(settings: &Settings, serving: bool) -> anyhow::Result<Arc<dyn Store>> {
    match settings.storage.backend.as_str() {
        "mongodb" => {
            let m = &settings.mongodb;
            let store = Arc::new(
                MongoStore::connect(
                    &m.uri,
                    &m.database,
                    Duration::from_millis(m.connect_timeout_ms),
                    Duration::from_millis(m.server_selection_timeout_ms),
                )
                .await?,
            );
            if serving {
                store.ensure_indexes_in_background();
            }
            Ok(store)
        }
        _ => Ok(Arc::new(EmbeddedStore::open(&settings.storage.path)?)),
    }
}

async fn user_command(settings: &Settings, cmd: UserCommand) -> anyhow::Result<()> {
    let store = open_store(settings, false).await?;
    match cmd {
        UserCommand::Add { name, uuid } => {
            let uuid = uuid.unwrap_or_else(|| uuid::Uuid::new_v4().to_string());
            if uuid.is_empty() || uuid.contains([';', '\r', '\n']) || uuid.len() > 128 {
                anyhow::bail!("a uuid must be 1-128 characters without ';' or line breaks");
            }
            store.add_user(&name, &uuid).await?;
            println!("{uuid}");
            println!("heartbeat packet: beat;{uuid};%MAC;%HOST;0");
            println!("data packet header: data;{uuid};%MAC;%HOST;0;");
        }
        UserCommand::List => {
            println!("{:<36}  {:<20}  {:>7}", "UUID", "NAME", "DEVICES");
            for u in store.users().await? {
                println!("{:<36}  {:<20}  {:>7}", u.uuid, u.username, u.devices);
            }
        }
    }
    Ok(())
}

async fn list_devices(settings: &Settings, owner: Option<String>) -> anyhow::Result<()> {
    let store = open_store(settings, false).await?;
    let zone = settings.time_zone()?;
    println!("{:<20}  {:<24}  {:<22}  OWNER", "MAC", "HOST", "LAST SEEN");
    for d in store.devices(owner.as_deref()).await? {
        println!(
            "{:<20}  {:<24}  {:<22}  {}",
            d.device.mac,
            d.device.host,
            d.device
                .last_seen
                .with_timezone(&zone)
                .format(&settings.query.time_format)
                .to_string(),
            d.owner.as_deref().unwrap_or("-")
        );
    }
    Ok(())
}
