//! `elfin-gateway`: the command line. `serve` (the default) runs the gateway until
//! SIGTERM or Ctrl-C, with its admin server ([`admin`]); `user`, `device` and `audit`
//! are operator commands on its database ([`operator`]), `events` the webhook
//! commands ([`events`]). Everything else lives in the `elfin-actors` library.

mod admin;
mod allocator;
mod audit;
mod certs;
mod events;
mod logging;
mod operator;
mod printable;
mod settings;

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use anyhow::Context as _;
use clap::{Parser, Subcommand};

use elfin_actors::store;
use elfin_actors::tls::Tls;
use elfin_actors::{Hub, Listen};
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};
use operator::{add_device, list_devices, open_store, print_audit, user_command};
use settings::Settings;
use tokio::signal::unix::{signal, Signal, SignalKind};

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
    command: Option<CliCommand>,
}

#[derive(Subcommand)]
enum CliCommand {
    /// Run the gateway (the default).
    Serve,
    /// Manage users.
    #[command(subcommand)]
    User(UserCommand),
    /// Inspect devices.
    #[command(subcommand)]
    Device(DeviceCommand),
    /// Print the audit trail: tunnels (who, to which device, from where, when, how
    /// long, why it ended, bytes each way) and devices coming and going, newest first.
    Audit {
        /// Only this user's (by name).
        #[arg(long, value_name = "NAME")]
        user: Option<String>,
        /// Only this device's (its MAC).
        #[arg(long, value_name = "MAC")]
        device: Option<String>,
        /// Only since then: an age (30m, 24h, 7d) or a time (2026-12-01T08:00:00Z).
        #[arg(long, value_name = "AGE|TIME", value_parser = audit::since_arg)]
        since: Option<String>,
        /// At most this many tunnels and this many device events.
        #[arg(long, default_value_t = 100)]
        limit: usize,
        /// One JSON object per line instead of tables.
        #[arg(long)]
        json: bool,
    },
    /// Fleet events: webhook secrets, and a signed sample event.
    #[command(subcommand)]
    Events(EventsCommand),
}

#[derive(Subcommand)]
enum EventsCommand {
    /// Print a new webhook secret (whsec_…).
    Secret,
    /// Send a signed sample event to URL now (a [[webhooks]] entry's, or with
    /// --secret).
    Test {
        url: String,
        #[arg(long, value_name = "whsec_…")]
        secret: Option<String>,
    },
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
    /// Remove a user (its devices stay, owned by nobody); a running gateway closes
    /// its devices' connections within seconds and refuses it from then on.
    Remove { name: String },
    /// Make a user an admin (its client certificate reaches every user's devices), or
    /// not; a running gateway applies it within seconds.
    Admin {
        name: String,
        #[arg(value_parser = ["on", "off"])]
        state: String,
    },
    /// Issue a client certificate for a user (auth.clients = "user-cert") as a
    /// PKCS#12 key store, or revoke one.
    Cert {
        /// The user's name, as `user add` took it.
        #[arg(required_unless_present_any = ["revoke", "revoke_file"])]
        name: Option<String>,
        /// Days the certificate is valid (at most 100 years).
        #[arg(long, default_value_t = 365, value_parser = clap::value_parser!(u32).range(1..=36_500))]
        days: u32,
        /// Where the key store goes (default: NAME.p12).
        #[arg(long, value_name = "FILE.p12")]
        out: Option<PathBuf>,
        /// The key store's password (default: a new one, printed).
        #[arg(long)]
        password: Option<String>,
        /// Revoke every certificate of this user issued until now (also ones made
        /// with openssl), or the certificate with this serial; the gateway applies it
        /// on SIGHUP, to open connections too.
        #[arg(long, value_name = "NAME|SERIAL", conflicts_with_all = ["name", "out", "password", "revoke_file"])]
        revoke: Option<String>,
        /// Revoke the certificate in this PEM file (signed by tls.client_ca).
        #[arg(long, value_name = "CERT.pem", conflicts_with_all = ["name", "out", "password"])]
        revoke_file: Option<PathBuf>,
    },
}

#[derive(Subcommand)]
enum DeviceCommand {
    /// List devices, all or those of one user.
    List { uuid: Option<String> },
    /// Register a device for a user (for auth.devices = "registered"); it shows as
    /// never seen until it connects.
    Add {
        uuid: String,
        mac: String,
        /// Its host name until it sends its own.
        host: Option<String>,
    },
    /// Remove a device; a running gateway closes its connection within seconds and,
    /// with auth.devices = "registered", refuses it from then on.
    Remove { mac: String },
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
    logging::init(&settings.log);
    for warning in settings.warnings() {
        log::warn!("{warning}");
    }
    let result = actix_rt::System::new().block_on(async move {
        match cli.command.unwrap_or(CliCommand::Serve) {
            CliCommand::Serve => serve(settings).await,
            CliCommand::User(cmd) => user_command(&settings, cmd).await,
            CliCommand::Device(DeviceCommand::List { uuid }) => list_devices(&settings, uuid).await,
            CliCommand::Device(DeviceCommand::Add { uuid, mac, host }) => {
                add_device(&settings, uuid, mac, host).await
            }
            CliCommand::Device(DeviceCommand::Remove { mac }) => {
                let store = open_store(&settings).await?;
                if !store.remove_device(&mac).await? {
                    anyhow::bail!("no device {mac:?}");
                }
                println!("device {mac} removed");
                Ok(())
            }
            CliCommand::Audit {
                user,
                device,
                since,
                limit,
                json,
            } => {
                let wanted = audit::Wanted {
                    user,
                    device,
                    since,
                    offset: 0,
                    limit,
                };
                print_audit(&settings, wanted, json).await
            }
            CliCommand::Events(EventsCommand::Secret) => {
                events::secret();
                Ok(())
            }
            CliCommand::Events(EventsCommand::Test { url, secret }) => {
                events::test(&settings, &url, secret).await
            }
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

/// Runs the gateway. Start-up fails with one line naming the cause, before any actor
/// starts: the port is bound and the store opened first.
async fn serve(settings: Settings) -> anyhow::Result<()> {
    let open_files = raise_open_files_limit();
    allocator::tune(&settings.server.workers);
    let addr = settings.server.listen;
    let backlog = settings.server.backlog.get();
    let listener = elfin_actors::server::bind(addr, backlog)
        .with_context(|| format!("cannot listen on {addr}"))?;
    let mut listeners = vec![(listener, Listen::Detect)];
    if let Some(addr) = settings.tls.listen {
        let tls_only = elfin_actors::server::bind(addr, backlog)
            .with_context(|| format!("cannot listen on {addr}"))?;
        log::info!("TLS only on {}", tls_only.local_addr()?);
        listeners.push((tls_only, Listen::TlsOnly));
    }
    let admin_listener = match settings.admin.listen {
        Some(addr) => Some(
            std::net::TcpListener::bind(addr)
                .with_context(|| format!("cannot listen on {addr} (admin.listen)"))?,
        ),
        None => None,
    };
    let tls = settings.tls.files().map(Tls::load).transpose()?;
    if let Some(tls) = &tls {
        log::info!("TLS: {}", tls.loaded());
    }
    let store = store::open(&settings.storage, &settings.mongodb, true).await?;
    let mut config = settings.gateway_config();
    config.tls = tls.clone();
    // Keep descriptors for the database, logs and the metrics endpoint, so that an
    // accept never fails for want of one.
    if let Some(limit) = open_files {
        let room = usize::try_from(limit.saturating_sub(FD_RESERVE)).unwrap_or(usize::MAX);
        let room = std::num::NonZeroUsize::new(room).unwrap_or(std::num::NonZeroUsize::MIN);
        if config.limits.max_connections > room {
            log::warn!(
                "limits.max_connections lowered from {} to {room}: the open files limit is {limit}",
                config.limits.max_connections
            );
            config.limits.max_connections = room;
        }
    }
    // Metrics are recorded only when the admin server can show them.
    let prometheus = admin_listener
        .as_ref()
        .map(|_| install_metrics())
        .transpose()?;
    let term = signal(SignalKind::terminate()).context("cannot watch SIGTERM")?;
    if let Some(tls) = &tls {
        tls.loaded().export_expiry();
        let hangups = signal(SignalKind::hangup()).context("cannot watch SIGHUP")?;
        actix_rt::spawn(reload_on_sighup(hangups, tls.clone()));
    }
    let events = settings.fleet_events()?;
    let mut hub = Hub::start_with_events(store, config, events);
    let mut cluster = settings.cluster_config()?;
    if let Some(cluster) = &mut cluster {
        if settings.auth.device_takeover == elfin_actors::registry::Takeover::WhenSilent {
            cluster.linger = Some(settings.heartbeat.online_window);
        }
    }
    let node = cluster.as_ref().map(|c| c.node.clone());
    if let Some(cluster) = cluster {
        let joined = elfin_actors::cluster::join(cluster, hub.registry.clone(), hub.bridge.clone());
        hub.join(joined.await.context("cannot join the cluster")?);
    }
    let admin = match admin_listener.zip(prometheus) {
        Some((listener, prometheus)) => {
            let addr = listener.local_addr()?;
            let server = admin::start(
                listener,
                settings.admin.rules(settings.limits.ipv6_prefix),
                hub.clone(),
                prometheus,
            )
            .context("cannot start the admin server")?;
            log::info!("admin pages on http://{addr}/");
            let handle = server.handle();
            actix_rt::spawn(server);
            Some(handle)
        }
        None => None,
    };
    log::info!(
        "elfin-gateway {} listening on {} ({} storage{}{})",
        env!("CARGO_PKG_VERSION"),
        listeners[0].0.local_addr()?,
        settings.storage.backend,
        if tls.is_some() { ", TLS" } else { "" },
        node.map(|n| format!(", cluster node {n}"))
            .unwrap_or_default()
    );
    let cluster = hub.cluster.clone();
    let served = elfin_actors::serve_all(listeners, hub, shutdown_signal(term)).await;
    if let Some(cluster) = cluster {
        let _ = cluster.send(elfin_actors::cluster::Leave).await;
    }
    if let Some(admin) = admin {
        admin.stop(true).await;
    }
    served?;
    log::info!("stopped");
    Ok(())
}

/// Installs the Prometheus recorder for the admin server.
fn install_metrics() -> anyhow::Result<PrometheusHandle> {
    let seconds = [
        0.000_25, 0.000_5, 0.001, 0.002_5, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
        10.0,
    ];
    let handle = PrometheusBuilder::new()
        .set_buckets_for_metric(Matcher::Suffix("_seconds".into()), &seconds)?
        .install_recorder()
        .context("cannot install the metrics recorder")?;
    Ok(handle)
}

/// File descriptors kept back from connections.
const FD_RESERVE: u64 = 64;

/// Each connection is a file descriptor: lift the soft limit (often 1024) to the hard
/// one, so the gateway can hold as many devices as the system allows. Returns it.
fn raise_open_files_limit() -> Option<u64> {
    match rlimit::increase_nofile_limit(u64::MAX) {
        Ok(limit) => {
            if limit < 10_000 {
                log::warn!("open files limit is {limit}: at most about that many connections");
            }
            Some(limit)
        }
        Err(e) => {
            log::warn!("cannot raise the open files limit: {e}");
            None
        }
    }
}

/// SIGHUP reads the certificate, its key, the client CA and the revocation list again
/// (after a renewal or a `user cert --revoke`) and logs what is now in force; a broken
/// file keeps everything in use, and the log says which file and why.
async fn reload_on_sighup(mut hangups: Signal, tls: Arc<Tls>) {
    while hangups.recv().await.is_some() {
        match tls.reload() {
            Ok(loaded) => {
                loaded.export_expiry();
                log::info!(
                    "SIGHUP: TLS certificate reloaded from {}: {loaded}",
                    tls.files().cert.display()
                )
            }
            Err(e) => log::error!(
                "SIGHUP: TLS not reloaded, keeping the certificate and revocation list in \
                 use: {e}"
            ),
        }
    }
}

/// Completes on SIGTERM or Ctrl-C. The handlers are installed by the caller before
/// the gateway says it listens, so no early signal meets the default action.
async fn shutdown_signal(mut term: Signal) {
    tokio::select! {
        _ = term.recv() => {}
        _ = tokio::signal::ctrl_c() => {}
    }
}
