//! SVG plots of a run, drawn with `plotters`: the latency distribution (CDF), the
//! throughput over time, and RSS against the number of devices; gateway and baseline
//! in each.

use std::path::Path;

use plotters::prelude::*;

/// Points of one line: (x, y).
pub type Line = Vec<(f64, f64)>;

/// What the scenarios leave for the plots: (gateway, baseline) each.
#[derive(Default)]
pub struct Figures {
    /// Sorted round-trip microseconds.
    pub latency: Option<(Vec<f64>, Vec<f64>)>,
    /// (seconds, MB/s).
    pub throughput: Option<(Line, Line)>,
    /// (devices, RSS KiB).
    pub rss: Option<(Line, Line)>,
}

type Series<'a> = [(&'a str, &'a [(f64, f64)], RGBColor); 2];

fn draw(
    path: &Path,
    title: &str,
    (x_desc, y_desc): (&str, &str),
    series: Series,
) -> Result<(), Box<dyn std::error::Error>> {
    let all = series.iter().flat_map(|s| s.1.iter());
    let (mut x_max, mut y_max) = (0f64, 0f64);
    for &(x, y) in all {
        x_max = x_max.max(x);
        y_max = y_max.max(y);
    }
    let root = SVGBackend::new(path, (760, 420)).into_drawing_area();
    root.fill(&WHITE)?;
    let mut chart = ChartBuilder::on(&root)
        .caption(title, ("sans-serif", 18))
        .margin(12)
        .x_label_area_size(40)
        .y_label_area_size(70)
        .build_cartesian_2d(0f64..x_max * 1.02, 0f64..y_max * 1.05)?;
    chart
        .configure_mesh()
        .x_desc(x_desc)
        .y_desc(y_desc)
        .draw()?;
    for (name, points, color) in series {
        chart
            .draw_series(LineSeries::new(
                points.iter().copied(),
                color.stroke_width(2),
            ))?
            .label(name)
            .legend(move |(x, y)| {
                PathElement::new(vec![(x, y), (x + 20, y)], color.stroke_width(2))
            });
    }
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::LowerRight)
        .background_style(WHITE.mix(0.9))
        .border_style(BLACK)
        .draw()?;
    root.present()?;
    Ok(())
}

/// The share of samples at or below each value, up to the 99.9th percentile (the
/// rest would flatten the plot).
fn cdf(sorted: &[f64]) -> Vec<(f64, f64)> {
    let n = sorted.len() as f64;
    let keep = ((n * 0.999) as usize).max(1);
    let step = (keep / 400).max(1);
    (0..keep)
        .step_by(step)
        .map(|i| (sorted[i], (i + 1) as f64 / n))
        .collect()
}

/// Writes every plot there is data for into `dir`; returns the files.
pub fn write(dir: &Path, figures: &Figures) -> Vec<String> {
    std::fs::create_dir_all(dir).unwrap();
    let relay = "relay, 64 KiB reads";
    let latency = figures.latency.as_ref().map(|(g, b)| (cdf(g), cdf(b)));
    let plots = [
        (
            "latency-cdf.svg",
            "tunnel-latency: 32-byte round trips (CDF to p99.9)",
            ("round trip (us)", "share of round trips"),
            latency.as_ref(),
            relay,
        ),
        (
            "throughput.svg",
            "tunnel-throughput: both directions, 16 KiB frames",
            ("seconds", "MB/s (both ways)"),
            figures.throughput.as_ref(),
            relay,
        ),
        (
            "rss.svg",
            "device-fleet: resident memory against devices connected",
            ("devices", "RSS (KiB)"),
            figures.rss.as_ref(),
            "bare tokio acceptor",
        ),
    ];
    let mut written = Vec::new();
    for (name, title, axes, lines, baseline) in plots {
        let Some((g, b)) = lines else { continue };
        let path = dir.join(name);
        let series = [
            ("elfin-gateway", &g[..], RGBColor(42, 111, 176)),
            (baseline, &b[..], RGBColor(200, 110, 30)),
        ];
        match draw(&path, title, axes, series) {
            Ok(()) => written.push(path.display().to_string()),
            Err(e) => eprintln!("cannot draw {name}: {e}"),
        }
    }
    written
}
