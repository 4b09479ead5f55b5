//! `elfin-bench`: the gateway's benchmark suite. Each scenario simulates Elfin devices
//! and clients over loopback and measures, in the same run, the baseline that bounds
//! its figure (a relay with the gateway's read size, a bare tokio acceptor, the store
//! written directly), then prints gateway, baseline, their ratio and PASS/FAIL against
//! the target. See `BENCHMARKS.md`.
//!
//! ```text
//! cargo bench --bench elfin-bench                        # every scenario, short sizes
//! cargo bench --bench elfin-bench -- --full              # full sizes
//! cargo bench --bench elfin-bench -- tunnel-latency --json
//! cargo bench --bench elfin-bench -- --target 10.0.0.5:3001 --uuid U --target-pid 1234
//! ```
//!
//! The gateway is the release binary, started by the bench in a process of its own
//! (its RSS is its own), or a running one with `--target`.

mod cluster;
mod events;
mod fleet;
mod gateway;
mod modbus;
mod net;
mod operator;
mod plot;
mod report;
mod store;
mod tunnel;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Instant;

use clap::{Parser, ValueEnum};

use gateway::Gateway;
use report::Row;

#[derive(Parser)]
#[command(about = "Benchmarks of the Elfin Connect gateway against same-run baselines")]
struct Cli {
    /// Scenarios to run; all when none is named.
    #[arg(value_enum)]
    scenarios: Vec<Scenario>,
    /// Full sizes (minutes) instead of short ones (all short ones: under a minute).
    #[arg(long)]
    full: bool,
    /// Print JSON instead of the table.
    #[arg(long)]
    json: bool,
    /// Where the SVG plots go.
    #[arg(long, value_name = "DIR", default_value = "target/elfin-bench")]
    plots: PathBuf,
    /// Drive this running gateway instead of starting one.
    #[arg(long, value_name = "ADDR", requires = "uuid")]
    target: Option<SocketAddr>,
    /// A user of the target gateway (its devices are simulated).
    #[arg(long)]
    uuid: Option<String>,
    /// The target gateway's process id, for its RSS.
    #[arg(long, value_name = "PID")]
    target_pid: Option<u32>,
    /// MongoDB for store-writes (default: the tests' stand-in, if prepared).
    #[arg(long, value_name = "URI")]
    mongodb_uri: Option<String>,
    /// Passed by `cargo bench`; ignored.
    #[arg(long, hide = true)]
    bench: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Scenario {
    TunnelThroughput,
    TunnelLatency,
    ManyTunnels,
    DeviceFleet,
    ReconnectStorm,
    StoreWrites,
    CrossNode,
    ModbusPoll,
    OperatorView,
    Events,
}

fn main() {
    // The baselines run in processes of their own, as the gateway does.
    let args: Vec<String> = std::env::args().collect();
    match args.get(1).map(String::as_str) {
        Some("__acceptor") => {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            return runtime.block_on(fleet::serve_acceptor());
        }
        Some("__relay") => {
            let threads = args.get(2).and_then(|t| t.parse().ok()).unwrap_or(1);
            let runtime = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(threads)
                .enable_all()
                .build()
                .unwrap();
            return runtime.block_on(net::serve_relay());
        }
        _ => {}
    }
    let cli = Cli::parse();
    let scenarios = if cli.scenarios.is_empty() {
        Scenario::value_variants().to_vec()
    } else {
        cli.scenarios.clone()
    };
    fleet::fleet_limit(); // raise the open files limit before any socket
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let mut figures = plot::Figures::default();
    let mut rows: Vec<Row> = Vec::new();
    let started = Instant::now();
    let target = cli
        .target
        .map(|addr| Gateway::target(addr, cli.uuid.clone().unwrap_or_default(), cli.target_pid));
    for scenario in scenarios {
        let at = Instant::now();
        let name = scenario.to_possible_value().unwrap().get_name().to_owned();
        eprintln!("running {name}…");
        let got = match scenario {
            Scenario::StoreWrites => {
                let (full, uri) = (cli.full, cli.mongodb_uri.clone());
                std::thread::spawn(move || store::store_writes(full, uri))
                    .join()
                    .expect("store-writes failed")
            }
            Scenario::CrossNode => runtime.block_on(cluster::cross_node(cli.full)),
            Scenario::OperatorView => runtime.block_on(operator::operator_view(cli.full)),
            Scenario::Events => runtime.block_on(events::events(cli.full)),
            _ => runtime.block_on(async {
                let gw = &*gateway::target_or_start(target.as_ref(), &[], true);
                match scenario {
                    Scenario::TunnelThroughput => {
                        tunnel::throughput(gw, cli.full, &mut figures).await
                    }
                    Scenario::TunnelLatency => tunnel::latency(gw, cli.full, &mut figures).await,
                    Scenario::ManyTunnels => tunnel::many_tunnels(target.as_ref(), cli.full).await,
                    Scenario::DeviceFleet => {
                        fleet::device_fleet(target.as_ref(), cli.full, &mut figures).await
                    }
                    Scenario::ReconnectStorm => {
                        fleet::reconnect_storm(target.as_ref(), cli.full).await
                    }
                    Scenario::ModbusPoll => modbus::modbus_poll(gw, cli.full).await,
                    Scenario::StoreWrites
                    | Scenario::CrossNode
                    | Scenario::OperatorView
                    | Scenario::Events => unreachable!(),
                }
            }),
        };
        eprintln!("  {name}: {:.1} s", at.elapsed().as_secs_f64());
        rows.extend(got);
    }
    let plots = plot::write(&cli.plots, &figures);
    let machine = machine();
    if cli.json {
        let json = serde_json::json!({
            "machine": machine,
            "size": if cli.full { "full" } else { "short" },
            "seconds": started.elapsed().as_secs_f64(),
            "rows": rows,
            "plots": plots,
        });
        println!("{}", serde_json::to_string_pretty(&json).unwrap());
    } else {
        println!(
            "elfin-bench, {} sizes, {} ({:.0} s)\n",
            if cli.full { "full" } else { "short" },
            machine["summary"].as_str().unwrap_or_default(),
            started.elapsed().as_secs_f64()
        );
        report::print_table(&rows);
        if !plots.is_empty() {
            println!("\nplots: {}", plots.join(", "));
        }
    }
}

/// What the figures were measured on.
fn machine() -> serde_json::Value {
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let cpu = cpuinfo
        .lines()
        .find_map(|l| l.strip_prefix("model name"))
        .and_then(|l| l.split(':').nth(1))
        .unwrap_or("unknown CPU")
        .trim()
        .to_owned();
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .unwrap_or_default()
        .trim()
        .to_owned();
    let memory_kib: u64 = std::fs::read_to_string("/proc/meminfo")
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("MemTotal:"))
        .and_then(|l| l.split_whitespace().next()?.parse().ok())
        .unwrap_or(0);
    serde_json::json!({
        "cpu": cpu,
        "cores": cores,
        "kernel": kernel,
        "memory_gib": memory_kib as f64 / (1 << 20) as f64,
        "summary": format!("{cores} cores of {cpu}, Linux {kernel}, {:.0} GiB", memory_kib as f64 / (1 << 20) as f64),
    })
}
