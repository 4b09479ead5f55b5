//! The gateway's lifetime: start the shared actors and the worker threads, hand each
//! accepted connection to a worker, and on SIGTERM/SIGINT shut down without losing a
//! sighting: stop accepting, close sessions, flush the debouncer and the persistence
//! actor, exit.

use std::time::Duration;

use actix::prelude::*;
use anyhow::Context as _;
use socket2::{SockRef, TcpKeepalive};
use tokio::net::{TcpListener, TcpStream};

use elfin_actors::debouncer::FlushAll;
use elfin_actors::persistence::Flush;
use elfin_actors::session::Session;
use elfin_actors::Hub;

use crate::settings::Settings;

/// How long shutdown waits for sessions to close.
const CLOSE_TIMEOUT: Duration = Duration::from_secs(5);

pub async fn run(settings: Settings) -> anyhow::Result<()> {
    raise_open_files_limit();
    let store = crate::open_store(&settings, true).await?;
    let (hub, mut all_closed) = Hub::start(store, settings.gateway_config()?);
    if !settings.metrics.listen.is_empty() {
        let addr = settings.metrics.listen.parse::<std::net::SocketAddr>()?;
        metrics_exporter_prometheus::PrometheusBuilder::new()
            .with_http_listener(addr)
            .install()
            .context("cannot start the metrics endpoint")?;
        log::info!("metrics on http://{addr}/metrics");
    }
    let addr = settings.listen_addr()?;
    let listener = TcpListener::bind(addr)
        .await
        .with_context(|| format!("cannot listen on {addr}"))?;
    log::info!(
        "elfin-gateway {} listening on {} ({} storage)",
        env!("CARGO_PKG_VERSION"),
        listener.local_addr()?,
        settings.storage.backend
    );

    let workers: Vec<Arbiter> = (0..worker_count(&settings))
        .map(|_| Arbiter::new())
        .collect();
    let keepalive = Duration::from_secs(settings.server.keepalive_secs);
    let stop = shutdown_signal();
    tokio::pin!(stop);
    let mut next = 0;
    loop {
        let accepted = tokio::select! {
            _ = &mut stop => break,
            accepted = listener.accept() => accepted,
        };
        let stream = match accepted.and_then(|(stream, _)| configure(stream, keepalive)) {
            Ok(stream) => stream,
            Err(e) => {
                // Out of file descriptors and the like: back off instead of spinning.
                log::warn!("accept failed: {e}");
                actix_rt::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let hub = hub.clone();
        workers[next].spawn(async move {
            if let Err(e) = TcpStream::from_std(stream).and_then(|s| Session::start(s, hub)) {
                log::debug!("connection lost before its session started: {e}");
            }
        });
        next = (next + 1) % workers.len();
    }

    log::info!("shutting down");
    drop(listener);
    hub.shutdown.cancel();
    let (debouncer, persistence) = (hub.debouncer.clone(), hub.persistence.clone());
    drop(hub);
    if actix_rt::time::timeout(CLOSE_TIMEOUT, all_closed.recv())
        .await
        .is_err()
    {
        log::warn!("some connections did not close within {CLOSE_TIMEOUT:?}");
    }
    debouncer.send(FlushAll).await?;
    let deadline = tokio::time::Instant::now()
        + Duration::from_secs(settings.persistence.shutdown_timeout_secs);
    loop {
        let unwritten = persistence.send(Flush).await?;
        if unwritten == 0 {
            break;
        }
        if tokio::time::Instant::now() >= deadline {
            anyhow::bail!("{unwritten} sightings could not be written before shutdown");
        }
        actix_rt::time::sleep(Duration::from_millis(20)).await;
    }
    for worker in workers {
        worker.stop();
    }
    log::info!("stopped");
    Ok(())
}

/// Each connection is a file descriptor: lift the soft limit (often 1024) to the hard
/// one, so the gateway can hold as many devices as the system allows.
fn raise_open_files_limit() {
    match rlimit::increase_nofile_limit(u64::MAX) {
        Ok(limit) if limit < 10_000 => {
            log::warn!("open files limit is {limit}: at most about that many connections")
        }
        Ok(limit) => log::debug!("open files limit: {limit}"),
        Err(e) => log::warn!("cannot raise the open files limit: {e}"),
    }
}

fn worker_count(settings: &Settings) -> usize {
    match settings.server.workers {
        0 => std::thread::available_parallelism().map_or(1, |n| n.get()),
        n => n,
    }
}

/// Low latency (no Nagle) and keepalive probes to find dead peers; returns the socket
/// detached from this thread's reactor, for a worker to adopt.
fn configure(stream: TcpStream, keepalive: Duration) -> std::io::Result<std::net::TcpStream> {
    let sock = SockRef::from(&stream);
    sock.set_tcp_nodelay(true)?;
    if !keepalive.is_zero() {
        sock.set_tcp_keepalive(
            &TcpKeepalive::new()
                .with_time(keepalive)
                .with_interval(keepalive / 4),
        )?;
    }
    stream.into_std()
}

async fn shutdown_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    match signal(SignalKind::terminate()) {
        Ok(mut term) => {
            tokio::select! {
                _ = term.recv() => {}
                _ = tokio::signal::ctrl_c() => {}
            }
        }
        Err(e) => {
            log::warn!("cannot watch SIGTERM: {e}");
            let _ = tokio::signal::ctrl_c().await;
        }
    }
}
