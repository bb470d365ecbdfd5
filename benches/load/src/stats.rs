//! Per-endpoint latency histograms, error counts and bytes; Markdown and JSON output.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;
use serde_json::{json, Value};

/// One endpoint's figures (latencies in microseconds).
#[derive(Clone)]
pub struct Endpoint {
    pub hist: Histogram<u64>,
    pub ok: u64,
    pub bytes: u64,
    pub errors: BTreeMap<String, u64>,
}

impl Default for Endpoint {
    fn default() -> Self {
        Endpoint {
            // 1 µs .. 10 min, 3 significant digits.
            hist: Histogram::new_with_bounds(1, 600_000_000, 3).expect("histogram bounds"),
            ok: 0,
            bytes: 0,
            errors: BTreeMap::new(),
        }
    }
}

/// The outcome of one request.
pub enum Outcome {
    /// 2xx; payload bytes sent (parts) or 0.
    Ok(u64),
    /// Anything else: `"409 duplicateFileKey"`, `"io: connection reset"`, ...
    Err(String),
}

/// What one worker (or the whole run, once merged) measured.
#[derive(Clone, Default)]
pub struct Stats {
    pub endpoints: BTreeMap<&'static str, Endpoint>,
}

impl Stats {
    /// Records a request that started at `start` when it started inside the measured window.
    pub fn record(
        &mut self,
        name: &'static str,
        start: Instant,
        measure_from: Instant,
        outcome: Outcome,
    ) {
        if start < measure_from {
            return;
        }
        let micros = start.elapsed().as_micros().max(1) as u64;
        let e = self.endpoints.entry(name).or_default();
        match outcome {
            Outcome::Ok(bytes) => {
                e.hist.saturating_record(micros);
                e.ok += 1;
                e.bytes += bytes;
            }
            Outcome::Err(kind) => {
                *e.errors.entry(kind).or_default() += 1;
            }
        }
    }

    pub fn merge(&mut self, other: &Stats) {
        for (name, o) in &other.endpoints {
            let e = self.endpoints.entry(name).or_default();
            e.hist.add(&o.hist).expect("same histogram bounds");
            e.ok += o.ok;
            e.bytes += o.bytes;
            for (k, v) in &o.errors {
                *e.errors.entry(k.clone()).or_default() += v;
            }
        }
    }
}

fn ms(us: u64) -> f64 {
    us as f64 / 1000.0
}

/// The JSON the `report` subcommand reads back.
pub fn to_json(
    scenario: &str,
    label: &str,
    params: Value,
    stats: &Stats,
    window: Duration,
    order: &[&'static str],
) -> Value {
    let secs = window.as_secs_f64().max(1e-9);
    let mut eps = Vec::new();
    for name in ordered(stats, order) {
        let e = &stats.endpoints[name];
        let h = &e.hist;
        eps.push(json!({
            "endpoint": name,
            "ok": e.ok,
            "errors": e.errors,
            "errorCount": e.errors.values().sum::<u64>(),
            "reqPerSec": e.ok as f64 / secs,
            "mbPerSec": e.bytes as f64 / secs / 1_048_576.0,
            "bytes": e.bytes,
            "p50Ms": ms(h.value_at_quantile(0.50)),
            "p99Ms": ms(h.value_at_quantile(0.99)),
            "p999Ms": ms(h.value_at_quantile(0.999)),
            "meanMs": h.mean() / 1000.0,
            "maxMs": ms(h.max()),
        }));
    }
    json!({
        "scenario": scenario,
        "label": label,
        "params": params,
        "windowSeconds": secs,
        "endpoints": eps,
    })
}

fn ordered<'a>(stats: &'a Stats, order: &[&'static str]) -> Vec<&'a str> {
    let mut names: Vec<&str> = order
        .iter()
        .copied()
        .filter(|n| stats.endpoints.contains_key(n))
        .collect();
    for n in stats.endpoints.keys() {
        if !names.contains(n) {
            names.push(n);
        }
    }
    names
}

/// A Markdown table of one scenario's JSON.
pub fn markdown(v: &Value) -> String {
    let mut out = String::new();
    let params = v["params"].as_object().map(|o| {
        o.iter()
            .map(|(k, v)| {
                format!(
                    "{k}={}",
                    v.as_str()
                        .map(str::to_owned)
                        .unwrap_or_else(|| v.to_string())
                )
            })
            .collect::<Vec<_>>()
            .join(", ")
    });
    out.push_str(&format!(
        "#### {} ({}) — {}, measured {:.1} s\n\n",
        v["scenario"].as_str().unwrap_or("?"),
        v["label"].as_str().unwrap_or("?"),
        params.unwrap_or_default(),
        v["windowSeconds"].as_f64().unwrap_or(0.0)
    ));
    out.push_str(
        "| endpoint | ok | req/s | MB/s | p50 ms | p99 ms | p99.9 ms | max ms | errors |\n",
    );
    out.push_str("|---|---:|---:|---:|---:|---:|---:|---:|---|\n");
    for e in v["endpoints"].as_array().into_iter().flatten() {
        let errors = e["errors"]
            .as_object()
            .map(|o| {
                o.iter()
                    .map(|(k, n)| format!("{k}: {n}"))
                    .collect::<Vec<_>>()
                    .join("; ")
            })
            .filter(|s| !s.is_empty())
            .unwrap_or_else(|| "0".into());
        let mbs = e["mbPerSec"].as_f64().unwrap_or(0.0);
        out.push_str(&format!(
            "| {} | {} | {:.0} | {} | {:.2} | {:.2} | {:.2} | {:.2} | {} |\n",
            e["endpoint"].as_str().unwrap_or("?"),
            e["ok"],
            e["reqPerSec"].as_f64().unwrap_or(0.0),
            if mbs > 0.0 {
                format!("{mbs:.1}")
            } else {
                "–".into()
            },
            e["p50Ms"].as_f64().unwrap_or(0.0),
            e["p99Ms"].as_f64().unwrap_or(0.0),
            e["p999Ms"].as_f64().unwrap_or(0.0),
            e["maxMs"].as_f64().unwrap_or(0.0),
            errors
        ));
    }
    out
}

/// The endpoint `name` of a scenario's JSON.
pub fn endpoint<'a>(v: &'a Value, name: &str) -> Option<&'a Value> {
    v["endpoints"]
        .as_array()?
        .iter()
        .find(|e| e["endpoint"] == name)
}

/// Shortens an error message into a stable bucket name.
pub fn bucket(msg: &str) -> String {
    let m: String = msg.chars().take(60).collect();
    m.replace('\n', " ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_only_inside_the_window_and_merges() {
        let t0 = Instant::now();
        let later = t0 + Duration::from_secs(3600);
        let mut a = Stats::default();
        a.record("x", t0, later, Outcome::Ok(10));
        assert!(a.endpoints.is_empty());
        a.record("x", t0, t0, Outcome::Ok(10));
        a.record("x", t0, t0, Outcome::Err("500 internal".into()));
        let mut b = Stats::default();
        b.record("x", t0, t0, Outcome::Ok(5));
        b.merge(&a);
        let e = &b.endpoints["x"];
        assert_eq!((e.ok, e.bytes, e.errors["500 internal"]), (2, 15, 1));
        let v = to_json("s", "l", json!({}), &b, Duration::from_secs(1), &["x"]);
        assert_eq!(endpoint(&v, "x").unwrap()["ok"], 2);
        assert!(markdown(&v).contains("| x | 2 |"));
    }
}
