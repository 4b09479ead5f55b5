//! What a run prints: one row per figure, with the gateway's value, the baseline
//! measured in the same run, their ratio, and the target it is held to.

use serde::Serialize;

/// How a figure is judged.
#[derive(Debug, Clone, Copy, Serialize)]
#[serde(tag = "kind", content = "value", rename_all = "snake_case")]
pub enum Target {
    /// Informational only.
    None,
    /// gateway / baseline at least this.
    RatioAtLeast(f64),
    /// gateway at most baseline plus this.
    AtMostBaselinePlus(f64),
    /// gateway / baseline at most this.
    RatioAtMost(f64),
    /// gateway at most this, whatever the baseline.
    AtMost(f64),
    /// gateway at least this, whatever the baseline.
    AtLeast(f64),
    /// gateway exactly this.
    Equals(f64),
}

#[derive(Debug, Clone, Serialize)]
pub struct Row {
    pub scenario: &'static str,
    pub metric: String,
    pub unit: &'static str,
    pub gateway: f64,
    /// The bound measured in the same run, when there is one.
    pub baseline: Option<f64>,
    pub target: Target,
    /// None when there is no target.
    pub pass: Option<bool>,
}

impl Row {
    pub fn new(
        scenario: &'static str,
        metric: impl Into<String>,
        unit: &'static str,
        gateway: f64,
        baseline: Option<f64>,
        target: Target,
    ) -> Row {
        let b = baseline.unwrap_or(f64::NAN);
        let pass = match target {
            Target::None => None,
            Target::RatioAtLeast(r) => Some(gateway / b >= r),
            Target::AtMostBaselinePlus(d) => Some(gateway <= b + d),
            Target::RatioAtMost(r) => Some(gateway / b <= r),
            Target::AtMost(v) => Some(gateway <= v),
            Target::AtLeast(v) => Some(gateway >= v),
            Target::Equals(v) => Some(gateway == v),
        };
        Row {
            scenario,
            metric: metric.into(),
            unit,
            gateway,
            baseline,
            target,
            pass,
        }
    }

    pub fn ratio(&self) -> Option<f64> {
        self.baseline.map(|b| self.gateway / b)
    }
}

fn number(v: f64) -> String {
    if v.is_nan() {
        "-".into()
    } else if v.abs() >= 100.0 || v == v.trunc() {
        format!("{v:.0}")
    } else if v.abs() >= 10.0 {
        format!("{v:.1}")
    } else {
        format!("{v:.2}")
    }
}

fn target_text(t: Target) -> String {
    match t {
        Target::None => String::new(),
        Target::RatioAtLeast(r) => format!(">= {r}x baseline"),
        Target::AtMostBaselinePlus(d) => format!("<= baseline + {}", number(d)),
        Target::RatioAtMost(r) => format!("<= {r}x baseline"),
        Target::AtMost(v) => format!("<= {}", number(v)),
        Target::AtLeast(v) => format!(">= {}", number(v)),
        Target::Equals(v) => format!("= {}", number(v)),
    }
}

/// The human table.
pub fn print_table(rows: &[Row]) {
    println!(
        "{:<18} {:<56} {:>12} {:>12} {:>7}  target",
        "scenario", "metric", "gateway", "baseline", "ratio"
    );
    for r in rows {
        println!(
            "{:<18} {:<56} {:>12} {:>12} {:>7}  {:<22} {}",
            r.scenario,
            format!("{} ({})", r.metric, r.unit),
            number(r.gateway),
            r.baseline.map_or("-".into(), number),
            r.ratio().map_or("-".into(), |x| format!("{x:.2}x")),
            target_text(r.target),
            match r.pass {
                Some(true) => "PASS",
                Some(false) => "FAIL",
                None => "",
            }
        );
    }
}
