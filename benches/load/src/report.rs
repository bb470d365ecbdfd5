//! `report --dir DIR`: the final summary from the JSON files one `run.sh` wrote, ratios first.
//!
//! Files read (each optional): `register-gateway.json`, `register-baseline.json`,
//! `register-gateway-{token,jwt,key}-{round}.json` (rounds 1, 2, ...),
//! `register-{gateway,baseline}-cpu.json` (`{"serverTicks","redisTicks","ticksPerSecond"}`:
//! CPU spent in the measured window, from run.sh), `parts-c{N}.json` / `presigned-c{N}.json` /
//! `l4proxy-c{N}.json` / `l4splice-c{N}.json` / `pinned-parts-c{N}.json` /
//! `pinned-presigned-c{N}.json` (the S3 server alone on one core) and their `-cpu.json` (`{"s3Ticks","gatewayTicks","proxyTicks","loadTicks","seconds","ticksPerSecond"}`)
//! for every N present, `flow.json`, `rss.json`
//! (`{"idleKiB","peakKiB","concurrency","partSizeBytes"}`, from run.sh), `rtt.json`
//! (`{"gatewayPerRegistration","baselinePerRegistration","gatewayBreakdown", ...}`, from run.sh)
//! `redis-mem.json`, `wrk-register-{gateway,baseline,baseline-gateway-script}-{round}.json`
//! (`{"reqPerSec","p50Ms","p99Ms","not201"}`, from run.sh's wrk runs; a directory of an older
//! run.sh has one round without the `-{round}` suffix and no `baseline-gateway-script`), and
//! `fs-parts-c{1,4}.json` / `fs-complete-c{1,4}.json` (filesystem
//! storage, part PUTs alone and upload + complete), `register-hooks.json`, `hooks-sink-{1,2}.json`
//! (`{"events","duplicates","eventsPerSec","p50Ms","p99Ms","maxMs"}`, from `webhook-sink`) and
//! `hooks-rtt.json` (`{"requestPerRegistration","allPerRegistration", ...}`, from run.sh).

use std::path::Path;

use serde_json::Value;

use crate::scenarios::redis_mem_markdown;
use crate::stats::{endpoint, markdown};

const REGISTER: &str = "register file";
const PROXIED: &str = "upload part (proxied)";
const PRESIGNED: &str = "upload part (presigned, direct to S3)";

fn load(dir: &Path, name: &str) -> Option<Value> {
    let text = std::fs::read_to_string(dir.join(name)).ok()?;
    serde_json::from_str(&text).ok()
}

fn f(v: &Value, k: &str) -> f64 {
    v[k].as_f64().unwrap_or(f64::NAN)
}

fn verdict(ok: bool) -> &'static str {
    if ok {
        "**met**"
    } else {
        "**not met**"
    }
}

fn concurrencies(dir: &Path) -> Vec<u64> {
    let mut cs: Vec<u64> = std::fs::read_dir(dir)
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| {
            let name = e.file_name().to_string_lossy().into_owned();
            name.strip_prefix("parts-c")?
                .strip_suffix(".json")?
                .parse()
                .ok()
        })
        .collect();
    cs.sort_unstable_by(|a, b| b.cmp(a));
    cs
}

fn errors(e: &Value) -> u64 {
    e["errorCount"].as_u64().unwrap_or(0)
}

pub fn report(dir: &Path) -> String {
    let mut out = String::new();
    let reg_gw = load(dir, "register-gateway.json");
    let reg_bl = load(dir, "register-baseline.json");
    let rss = load(dir, "rss.json");
    let rtt = load(dir, "rtt.json");
    let mem = load(dir, "redis-mem.json");
    let flow = load(dir, "flow.json");
    let cs = concurrencies(dir);

    out.push_str("### Summary: ratios (same run, same machine)\n\n");
    out.push_str("| # | measure | ratio / figure | target | verdict |\n|---|---|---:|---|---|\n");
    let mut absolute = Vec::new();
    if let (Some(g), Some(b)) = (&reg_gw, &reg_bl) {
        if let (Some(ge), Some(be)) = (endpoint(g, REGISTER), endpoint(b, REGISTER)) {
            let tput = f(ge, "reqPerSec") / f(be, "reqPerSec");
            let p99 = f(ge, "p99Ms") / f(be, "p99Ms");
            out.push_str(&format!(
                "| 1 | register-file throughput, gateway / baseline (c={}) | {tput:.2}× | ≥ 0.70× | {} |\n",
                g["params"]["concurrency"],
                verdict(tput >= 0.7)
            ));
            out.push_str(&format!(
                "| 1 | register-file p99, gateway / baseline | {p99:.2}× | ≤ 1.50× | {} |\n",
                verdict(p99 <= 1.5)
            ));
            let cpu = |label: &str, who: &str, ok: f64| -> Option<f64> {
                let c = load(dir, &format!("register-{label}-cpu.json"))?;
                Some(f(&c, who) / f(&c, "ticksPerSecond") / ok * 1e6)
            };
            let (g_ok, b_ok) = (f(ge, "ok"), f(be, "ok"));
            if let (Some(gs), Some(bs), Some(gr), Some(br)) = (
                cpu("gateway", "serverTicks", g_ok),
                cpu("baseline", "serverTicks", b_ok),
                cpu("gateway", "redisTicks", g_ok),
                cpu("baseline", "redisTicks", b_ok),
            ) {
                out.push_str(&format!(
                    "| – | CPU per registration: server / Redis, gateway vs baseline | {gs:.0} / {gr:.0} µs vs {bs:.0} / {br:.0} µs | – | – |\n"
                ));
            }
            // Rounds of token, JWT and API-key runs (run.sh): each credential run against
            // the mean of the API-key runs before and after it, the median over rounds.
            let rate = |name: &str| -> Option<f64> {
                let v = load(dir, &format!("register-{name}.json"))?;
                Some(f(endpoint(&v, REGISTER)?, "reqPerSec"))
            };
            let mut tok = Vec::new();
            let mut jwt = Vec::new();
            let mut before = f(ge, "reqPerSec");
            for round in 1.. {
                let Some(after) = rate(&format!("gateway-key-{round}")) else {
                    break;
                };
                let key = (before + after) / 2.0;
                if let Some(t) = rate(&format!("gateway-token-{round}")) {
                    tok.push(t / key);
                }
                if let Some(j) = rate(&format!("gateway-jwt-{round}")) {
                    jwt.push(j / key);
                }
                before = after;
            }
            for (what, ratios) in [
                ("upload token", &mut tok),
                ("end-user JWT (EdDSA)", &mut jwt),
            ] {
                if ratios.is_empty() {
                    continue;
                }
                let each: Vec<String> = ratios.iter().map(|r| format!("{r:.2}")).collect();
                ratios.sort_by(f64::total_cmp);
                let median = ratios[ratios.len() / 2];
                out.push_str(&format!(
                    "| 1 | register-file throughput, {what} / API key (same gateway; median of {} rounds, each against the key runs before and after: {}) | {median:.2}× | ≥ 0.90× | {} |\n",
                    ratios.len(),
                    each.join(", "),
                    verdict(median >= 0.9)
                ));
            }
            for (label, name) in [
                ("upload token, round 1", "gateway-token-1"),
                ("end-user JWT, round 1", "gateway-jwt-1"),
                ("API key after round 1", "gateway-key-1"),
            ] {
                if let Some(v) = load(dir, &format!("register-{name}.json")) {
                    if let Some(e) = endpoint(&v, REGISTER) {
                        absolute.push((
                            format!("register file, gateway, {label}"),
                            v.clone(),
                            e.clone(),
                        ));
                    }
                }
            }
            absolute.push((
                "register file, gateway (full stack)".to_owned(),
                g.clone(),
                ge.clone(),
            ));
            absolute.push((
                "register file, baseline (hyper + 1 EVALSHA)".to_owned(),
                b.clone(),
                be.clone(),
            ));
        }
    }
    // Every process on the shared cores, then (run.sh) the same pairs with the S3 server
    // alone on one core and everything else on the other: whether the gateway limits the
    // bytes when storage has a core of its own (run.sh runs the L4 references only on the
    // shared cores).
    let placements = [
        ("", "", ""),
        (
            "pinned-",
            ", S3 on its own core",
            ", **S3 on its own core**",
        ),
    ];
    for (prefix, placed, marked) in placements {
        for c in &cs {
            let (Some(p), Some(q)) = (
                load(dir, &format!("{prefix}parts-c{c}.json")),
                load(dir, &format!("{prefix}presigned-c{c}.json")),
            ) else {
                continue;
            };
            if let (Some(pe), Some(qe)) = (endpoint(&p, PROXIED), endpoint(&q, PRESIGNED)) {
                let ratio = f(pe, "mbPerSec") / f(qe, "mbPerSec");
                let mib = p["params"]["partSizeBytes"].as_f64().unwrap_or(0.0) / 1_048_576.0;
                out.push_str(&format!(
                    "| 2 | part MB/s, proxied / presigned-direct{marked} ({c} × {mib:.0} MiB parts) | {ratio:.2}× | ≥ 0.90× | {} |\n",
                    verdict(ratio >= 0.9)
                ));
                absolute.push((
                    format!("part PUT proxied{placed}, c={c}"),
                    p.clone(),
                    pe.clone(),
                ));
                absolute.push((
                    format!("part PUT presigned direct to S3{placed}, c={c}"),
                    q.clone(),
                    qe.clone(),
                ));
                for (file, what) in [
                    (
                        "l4proxy",
                        "a bare L4 proxy (`tcp-proxy`, user-space copies)",
                    ),
                    (
                        "l4splice",
                        "a bare L4 proxy with splice(2) (`tcp-proxy --splice`, no user-space copy)",
                    ),
                ] {
                    let Some(l) = load(dir, &format!("{prefix}{file}-c{c}.json")) else {
                        continue;
                    };
                    if let Some(le) = endpoint(&l, PRESIGNED) {
                        let lr = f(le, "mbPerSec") / f(qe, "mbPerSec");
                        out.push_str(&format!(
                            "| – | reference: part MB/s through {what} / presigned-direct ({c} × {mib:.0} MiB) | {lr:.2}× | – | – |\n",
                        ));
                        absolute.push((
                            format!("part PUT presigned via {what}, c={c}"),
                            l.clone(),
                            le.clone(),
                        ));
                    }
                }
            }
        }
    }
    if let Some(r) = &rss {
        let idle = f(r, "idleKiB") / 1024.0;
        let peak = f(r, "peakKiB") / 1024.0;
        let delta = peak - idle;
        out.push_str(&format!(
            "| 3 | gateway peak RSS above idle ({} × {:.0} MiB proxied parts) | {delta:.1} MiB (idle {idle:.1}, peak {peak:.1}) | < 64 MiB | {} |\n",
            r["concurrency"],
            f(r, "partSizeBytes") / 1_048_576.0,
            verdict(delta < 64.0)
        ));
    }
    if let Some(r) = &rtt {
        out.push_str(&format!(
            "| – | Redis round trips per registration, gateway / baseline | {:.2} / {:.2} | 1 script per operation | – |\n",
            f(r, "gatewayPerRegistration"),
            f(r, "baselinePerRegistration")
        ));
        out.push_str(&format!(
            "| – | Redis round trips per proxied part PUT (gateway) | {:.2} | – | – |\n",
            f(r, "partRoundTripsPerPut")
        ));
    }
    if let Some(m) = &mem {
        out.push_str(&format!(
            "| – | Redis memory per active session / per registered file | {:.0} B / {:.0} B | – | – |\n",
            f(m, "bytesPerSession"),
            f(m, "bytesPerFile")
        ));
    }
    if let Some(fl) = &flow {
        for name in [
            "create session",
            REGISTER,
            "upload part",
            "complete file",
            "finalize session",
            "whole flow",
        ] {
            if let Some(e) = endpoint(fl, name) {
                absolute.push((format!("flow: {name}"), fl.clone(), e.clone()));
            }
        }
    }

    // Where the byte path's CPU goes: per process, CPU time per MB moved in the measured
    // window (run.sh samples /proc/PID/stat around it). Loopback TCP is charged partly to
    // the sender (the receiver's softirq runs in its context).
    let mut cpu_rows = String::new();
    for c in &cs {
        for (file, what, ep) in [
            ("parts", "proxied through the gateway", PROXIED),
            ("presigned", "presigned, direct to S3", PRESIGNED),
            ("l4proxy", "presigned, through the bare L4 proxy", PRESIGNED),
            (
                "l4splice",
                "presigned, through the splice L4 proxy",
                PRESIGNED,
            ),
            (
                "pinned-parts",
                "proxied through the gateway, S3 on its own core",
                PROXIED,
            ),
            (
                "pinned-presigned",
                "presigned, direct to S3, S3 on its own core",
                PRESIGNED,
            ),
        ] {
            let (Some(run), Some(cpu)) = (
                load(dir, &format!("{file}-c{c}.json")),
                load(dir, &format!("{file}-c{c}-cpu.json")),
            ) else {
                continue;
            };
            let Some(e) = endpoint(&run, ep) else {
                continue;
            };
            let mb = f(e, "mbPerSec") * f(&cpu, "seconds");
            let tps = f(&cpu, "ticksPerSecond");
            if mb <= 0.0 || tps <= 0.0 {
                continue;
            }
            let ms = |k: &str| f(&cpu, k) / tps * 1000.0 / mb;
            let cores = |k: &str| f(&cpu, k) / tps / f(&cpu, "seconds").max(1e-9);
            cpu_rows.push_str(&format!(
                "| {what}, c={c} | {:.1} | {:.2} ({:.2}) | {:.2} ({:.2}) | {:.2} ({:.2}) | {:.2} ({:.2}) |\n",
                f(e, "mbPerSec"),
                ms("s3Ticks"),
                cores("s3Ticks"),
                ms("gatewayTicks"),
                cores("gatewayTicks"),
                ms("proxyTicks"),
                cores("proxyTicks"),
                ms("loadTicks"),
                cores("loadTicks"),
            ));
        }
    }
    if !cpu_rows.is_empty() {
        out.push_str("\n### Byte path: CPU ms per MB moved (cores used)\n\n");
        out.push_str("| run | MB/s | S3 server | gateway | L4 proxy | load generator |\n|---|---:|---:|---:|---:|---:|\n");
        out.push_str(&cpu_rows);
    }

    out.push_str("\n### Absolute figures\n\n");
    out.push_str("| scenario | concurrency | ok | req/s | MB/s | p50 ms | p99 ms | p99.9 ms | errors |\n|---|---:|---:|---:|---:|---:|---:|---:|---:|\n");
    for (name, run, e) in &absolute {
        let mbs = f(e, "mbPerSec");
        out.push_str(&format!(
            "| {name} | {} | {} | {:.0} | {} | {:.2} | {:.2} | {:.2} | {} |\n",
            run["params"]["concurrency"],
            e["ok"],
            f(e, "reqPerSec"),
            if mbs > 0.0 {
                format!("{mbs:.1}")
            } else {
                "–".into()
            },
            f(e, "p50Ms"),
            f(e, "p99Ms"),
            f(e, "p999Ms"),
            errors(e)
        ));
    }
    if let Some(r) = &rtt {
        if let Some(b) = r["gatewayBreakdown"].as_str() {
            let note = if b.contains("unwatch") {
                "; UNWATCH is pipelined with a PING (deadpool-redis recycle), one round trip for the two"
            } else {
                ""
            };
            out.push_str(&format!(
                "\nRedis commands per registration, gateway (top level, from MONITOR{note}): {b}\n"
            ));
        }
        if let Some(b) = r["gatewayScriptCommands"].as_str() {
            out.push_str(&format!(
                "\nCommands run inside scripts per registration, gateway: {b}\n"
            ));
        }
        if let Some(b) = r["partBreakdown"].as_str() {
            out.push_str(&format!(
                "\nRedis commands per proxied part PUT, gateway (top level): {b}\n"
            ));
        }
    }
    if let Some(m) = &mem {
        out.push('\n');
        out.push_str(&redis_mem_markdown(m));
    }
    let wrk = wrk_rounds(dir);
    if !wrk.is_empty() {
        out.push_str(&wrk_markdown(&wrk));
    }
    let fs_rows: Vec<String> = [1u64, 4]
        .iter()
        .filter_map(|c| {
            let parts = load(dir, &format!("fs-parts-c{c}.json"))?;
            let whole = load(dir, &format!("fs-complete-c{c}.json"))?;
            let p = f(endpoint(&parts, PROXIED)?, "mbPerSec");
            let w = f(endpoint(&whole, PROXIED)?, "mbPerSec");
            let done = endpoint(&whole, "complete file")
                .map(|e| format!("{} completes, p50 {:.1} ms", e["ok"], f(e, "p50Ms")))
                .unwrap_or_else(|| "no completion".into());
            let ratio = w / p;
            Some(format!(
                "| {c} | {p:.1} | {w:.1} ({done}) | {ratio:.2}× | ≥ 0.90× | {} |\n",
                verdict(ratio >= 0.9)
            ))
        })
        .collect();
    if !fs_rows.is_empty() {
        out.push_str(
            "\n### Filesystem storage: 256 MiB uploads, part PUTs alone vs upload + complete\n\n",
        );
        out.push_str("MB/s of part bytes over the measured window; the upload + complete run spends part of the window completing.\n\n");
        out.push_str("| concurrent uploads | part PUTs only MB/s | upload + complete MB/s | ratio | target | verdict |\n|---:|---:|---:|---:|---|---|\n");
        for row in fs_rows {
            out.push_str(&row);
        }
    }

    let sink = load(dir, "hooks-sink-1.json");
    let sink_idle = load(dir, "hooks-sink-2.json");
    let hooks_rtt = load(dir, "hooks-rtt.json");
    if sink.is_some() || hooks_rtt.is_some() {
        out.push_str("\n### Webhooks: one endpoint, the load test's sink answering 204\n\n");
        out.push_str("| measure | figure | target | verdict |\n|---|---:|---|---|\n");
        if let Some(r) = &hooks_rtt {
            let req = f(r, "requestPerRegistration");
            out.push_str(&format!(
                "| Redis round trips per registration, request path ({}) | {req:.2} | ≤ 1.05 | {} |\n",
                r["requestBreakdown"].as_str().unwrap_or(""),
                verdict(req <= 1.05)
            ));
            out.push_str(&format!(
                "| Redis commands per registration, delivery worker included ({}) | {:.2} | – | – |\n",
                r["allBreakdown"].as_str().unwrap_or(""),
                f(r, "allPerRegistration")
            ));
        }
        for (v, what) in [
            (&sink, "registering at full speed (a backlog builds)"),
            (&sink_idle, "one registration at a time"),
        ] {
            let Some(v) = v else { continue };
            out.push_str(&format!(
                "| {what}: events delivered (duplicates) | {} ({}) | – | – |\n| {what}: events delivered per second, first to last arrival | {:.0} | – | – |\n| {what}: delivery latency p50 / p99 / max, ms (event to arrival) | {:.1} / {:.1} / {:.1} | – | – |\n",
                v["events"],
                v["duplicates"],
                f(v, "eventsPerSec"),
                f(v, "p50Ms"),
                f(v, "p99Ms"),
                f(v, "maxMs")
            ));
        }
        if let (Some(h), Some(g)) = (load(dir, "register-hooks.json"), &reg_gw) {
            if let (Some(he), Some(ge)) = (endpoint(&h, REGISTER), endpoint(g, REGISTER)) {
                out.push_str(&format!(
                    "| register-file req/s with webhooks / without (c={}, separate runs) | {:.0} / {:.0} | – | – |\n",
                    h["params"]["concurrency"],
                    f(he, "reqPerSec"),
                    f(ge, "reqPerSec")
                ));
            }
        }
    }

    out.push_str("\n### Per-scenario tables\n\n");
    let mut names = vec![
        "register-gateway.json".to_owned(),
        "register-baseline.json".to_owned(),
    ];
    for c in &cs {
        names.push(format!("parts-c{c}.json"));
        names.push(format!("presigned-c{c}.json"));
        names.push(format!("l4proxy-c{c}.json"));
        names.push(format!("l4splice-c{c}.json"));
        names.push(format!("pinned-parts-c{c}.json"));
        names.push(format!("pinned-presigned-c{c}.json"));
    }
    for c in [1, 4] {
        names.push(format!("fs-parts-c{c}.json"));
        names.push(format!("fs-complete-c{c}.json"));
    }
    names.push("flow.json".into());
    names.push("register-hooks.json".into());
    for n in names {
        if let Some(v) = load(dir, &n) {
            out.push_str(&markdown(&v));
            out.push('\n');
        }
    }
    out
}

/// One round of the wrk-driven registration runs: the gateway, the baseline and (from
/// run.sh's third server on) the baseline running the gateway's own script.
struct WrkRound {
    gateway: Value,
    baseline: Value,
    same_script: Option<Value>,
}

/// The wrk rounds of `dir`, in round order.
fn wrk_rounds(dir: &Path) -> Vec<WrkRound> {
    let one = |suffix: &str| {
        Some(WrkRound {
            gateway: load(dir, &format!("wrk-register-gateway{suffix}.json"))?,
            baseline: load(dir, &format!("wrk-register-baseline{suffix}.json"))?,
            same_script: load(
                dir,
                &format!("wrk-register-baseline-gateway-script{suffix}.json"),
            ),
        })
    };
    let rounds: Vec<WrkRound> = (1..).map_while(|r| one(&format!("-{r}"))).collect();
    if rounds.is_empty() {
        one("").into_iter().collect()
    } else {
        rounds
    }
}

fn mean(xs: &[f64]) -> f64 {
    xs.iter().sum::<f64>() / xs.len().max(1) as f64
}

/// The wrk section: means over the rounds (the ratio of the means is what the target is
/// checked on), and each round's ratio.
fn wrk_markdown(rounds: &[WrkRound]) -> String {
    fn gw(r: &WrkRound) -> Option<&Value> {
        Some(&r.gateway)
    }
    fn bl(r: &WrkRound) -> Option<&Value> {
        Some(&r.baseline)
    }
    fn same(r: &WrkRound) -> Option<&Value> {
        r.same_script.as_ref()
    }
    // The mean of `key` over the rounds; None unless every round has the server.
    let avg = |pick: fn(&WrkRound) -> Option<&Value>, key: &str| {
        let xs: Vec<f64> = rounds
            .iter()
            .filter_map(|r| pick(r).map(|v| f(v, key)))
            .collect();
        (xs.len() == rounds.len()).then(|| mean(&xs))
    };
    let mut out = format!(
        "\n### Registration driven by wrk (gateway / baseline, same run; mean of {} round{})\n\n",
        rounds.len(),
        if rounds.len() == 1 { "" } else { "s" }
    );
    out.push_str(
        "| | gateway | baseline | ratio | target | verdict | baseline, gateway's script | ratio |\n\
         |---|---:|---:|---:|---|---|---:|---:|\n",
    );
    for (key, label, decimals, target, ok) in [
        (
            "reqPerSec",
            "req/s",
            0,
            "≥ 0.70×",
            (|r: f64| r >= 0.7) as fn(f64) -> bool,
        ),
        ("p99Ms", "p99 ms", 2, "≤ 1.50×", |r: f64| r <= 1.5),
    ] {
        let (g, b) = (
            avg(gw, key).unwrap_or(f64::NAN),
            avg(bl, key).unwrap_or(f64::NAN),
        );
        let same_cells = match avg(same, key) {
            Some(s) => format!("{s:.decimals$} | {:.2}×", g / s),
            None => "– | –".to_owned(),
        };
        out.push_str(&format!(
            "| {label} | {g:.decimals$} | {b:.decimals$} | {:.2}× | {target} | {} | {same_cells} |\n",
            g / b,
            verdict(ok(g / b))
        ));
    }
    if rounds.len() > 1 {
        let per_round: Vec<String> = rounds
            .iter()
            .map(|r| {
                let t = f(&r.gateway, "reqPerSec") / f(&r.baseline, "reqPerSec");
                let p = f(&r.gateway, "p99Ms") / f(&r.baseline, "p99Ms");
                format!("{t:.2}× / {p:.2}×")
            })
            .collect();
        out.push_str(&format!(
            "\nEach round, gateway / baseline throughput / p99: {}.\n",
            per_round.join(", ")
        ));
    }
    let bad: f64 = rounds
        .iter()
        .map(|r| {
            f(&r.gateway, "not201")
                + f(&r.baseline, "not201")
                + r.same_script.as_ref().map_or(0.0, |s| f(s, "not201"))
        })
        .sum();
    if bad > 0.0 {
        out.push_str(&format!(
            "\n{bad} answers were not 201 (`wrk-*.txt`): the figures above count them.\n"
        ));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(rps: f64, p99: f64) -> Value {
        serde_json::json!({"reqPerSec": rps, "p50Ms": 1.0, "p99Ms": p99, "not201": 0})
    }

    #[test]
    fn wrk_section_compares_the_means_of_the_rounds() {
        let rounds = [
            WrkRound {
                gateway: run(30_000.0, 4.0),
                baseline: run(40_000.0, 3.0),
                same_script: Some(run(30_000.0, 4.0)),
            },
            WrkRound {
                gateway: run(36_000.0, 4.0),
                baseline: run(50_000.0, 2.0),
                same_script: Some(run(36_000.0, 4.0)),
            },
        ];
        let md = wrk_markdown(&rounds);
        // Means 33,000 / 45,000 = 0.73×; p99 4.00 / 2.50 = 1.60×.
        assert!(
            md.contains("| req/s | 33000 | 45000 | 0.73× | ≥ 0.70× | **met** | 33000 | 1.00× |"),
            "{md}"
        );
        assert!(
            md.contains("| p99 ms | 4.00 | 2.50 | 1.60× | ≤ 1.50× | **not met** | 4.00 | 1.00× |"),
            "{md}"
        );
        assert!(md.contains("0.75× / 1.33×, 0.72× / 2.00×"), "{md}");
        assert!(md.contains("mean of 2 rounds"), "{md}");
    }

    #[test]
    fn wrk_section_without_the_third_server_leaves_its_cells_empty() {
        let rounds = [WrkRound {
            gateway: run(30_000.0, 4.0),
            baseline: run(40_000.0, 2.0),
            same_script: None,
        }];
        let md = wrk_markdown(&rounds);
        assert!(md.contains("| 0.75× | ≥ 0.70× | **met** | – | – |"), "{md}");
        assert!(!md.contains("Each round"), "{md}");
    }
}
