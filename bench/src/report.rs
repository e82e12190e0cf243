//! The results: one record per figure, target and round; written raw (CSV and JSON) and
//! summed up as a markdown table of medians with ratios to the limit and to the best peer.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::Path;

use anyhow::Result;
use serde::Serialize;

use crate::targets::Kind;

/// Whether less or more of a figure is better.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Better {
    /// A cost: CPU, memory, time.
    Lower,
    /// A rate.
    Higher,
}

/// One row of the table.
#[derive(Debug, Clone)]
pub struct Figure {
    /// Key in the raw files.
    pub id: &'static str,
    /// What the row says.
    pub label: String,
    /// Which direction is better.
    pub better: Better,
}

/// One measured value.
#[derive(Debug, Clone, Serialize)]
pub struct Record {
    /// Round, from 1.
    pub round: usize,
    /// Target name.
    pub target: &'static str,
    /// Figure id.
    pub figure: &'static str,
    /// The value, in the figure's unit.
    pub value: f64,
    /// What it was computed from (operations, seconds, CPU time, errors, ...).
    pub detail: serde_json::Value,
}

/// The median of `values` (the lower middle one for an even count); `None` when empty.
pub fn median(values: &mut [f64]) -> Option<f64> {
    values.sort_by(f64::total_cmp);
    values.get(values.len().saturating_sub(1) / 2).copied()
}

/// The `q` quantile (0..=1) of sorted `values`, nearest rank.
pub fn quantile(sorted: &[u32], q: f64) -> Option<u32> {
    let rank = ((q * sorted.len() as f64).ceil() as usize).clamp(1, sorted.len().max(1));
    sorted.get(rank - 1).copied()
}

/// Median per figure and target.
pub fn medians(records: &[Record]) -> BTreeMap<(&'static str, &'static str), f64> {
    let mut all: BTreeMap<(&'static str, &'static str), Vec<f64>> = BTreeMap::new();
    for r in records {
        all.entry((r.figure, r.target)).or_default().push(r.value);
    }
    all.into_iter()
        .filter_map(|(k, mut v)| Some((k, median(&mut v)?)))
        .collect()
}

fn fmt(v: f64) -> String {
    if v.abs() >= 1000.0 {
        let s = format!("{v:.0}");
        // Thousands separated by a thin space, as in the docs.
        let (sign, digits) = s.split_at(usize::from(s.starts_with('-')));
        let mut out = String::new();
        for (i, c) in digits.chars().enumerate() {
            if i > 0 && (digits.len() - i) % 3 == 0 {
                out.push(' ');
            }
            out.push(c);
        }
        format!("{sign}{out}")
    } else if v.abs() >= 100.0 {
        format!("{v:.0}")
    } else if v.abs() >= 10.0 {
        format!("{v:.1}")
    } else {
        format!("{v:.2}")
    }
}

fn ratio(a: Option<f64>, b: Option<f64>) -> String {
    match (a, b) {
        (Some(a), Some(b)) if b != 0.0 && a.is_finite() && b.is_finite() => format!("{:.2}×", a / b),
        _ => "–".into(),
    }
}

/// The peer (nginx, HAProxy or Caddy) with the best median of `f`: the lowest cost or the
/// highest rate; with that median.
fn best_peer(f: &Figure, targets: &[Kind], med: &BTreeMap<(&'static str, &'static str), f64>) -> Option<(Kind, f64)> {
    let peers = targets
        .iter()
        .filter(|k| k.is_peer())
        .filter_map(|k| Some((*k, *med.get(&(f.id, k.name()))?)));
    match f.better {
        Better::Lower => peers.min_by(|a, b| a.1.total_cmp(&b.1)),
        Better::Higher => peers.max_by(|a, b| a.1.total_cmp(&b.1)),
    }
}

/// The markdown table: medians per target, wsgate ÷ limit, wsgate ÷ the best peer (the lowest
/// cost or the highest rate among nginx, HAProxy and Caddy), two workers ÷ one.
pub fn table(figures: &[Figure], targets: &[Kind], records: &[Record]) -> String {
    let med = medians(records);
    let get = |f: &str, k: Kind| med.get(&(f, k.name())).copied();
    let mut out = String::from("| figure |");
    for k in targets {
        let _ = write!(out, " {} |", k.name());
    }
    out.push_str(" wsgate ÷ limit | wsgate ÷ best peer | 2 workers ÷ 1 |\n|---|");
    out.push_str(&"---:|".repeat(targets.len() + 3));
    out.push('\n');
    for f in figures {
        if !targets.iter().any(|k| get(f.id, *k).is_some()) {
            continue;
        }
        let _ = write!(out, "| {} |", f.label);
        for k in targets {
            let _ = write!(out, " {} |", get(f.id, *k).map(fmt).unwrap_or_else(|| "–".into()));
        }
        let best = best_peer(f, targets, &med).map(|(_, v)| v);
        let ws = get(f.id, Kind::Wsgate);
        let _ = writeln!(
            out,
            " {} | {} | {} |",
            ratio(ws, get(f.id, Kind::Limit)),
            ratio(ws, best),
            ratio(get(f.id, Kind::Wsgate2w), ws)
        );
    }
    out
}

/// The same comparisons taken within each round, and their median: a round's noise moves both
/// targets of a ratio alike, so these are steadier than the ratio of the medians on a shared
/// machine. The best peer is the one best by the medians.
pub fn round_ratios(figures: &[Figure], targets: &[Kind], records: &[Record]) -> String {
    let value = |f: &str, k: Kind, round: usize| {
        records
            .iter()
            .find(|r| r.figure == f && r.target == k.name() && r.round == round)
            .map(|r| r.value)
    };
    let rounds = records.iter().map(|r| r.round).max().unwrap_or(0);
    let med = medians(records);
    let series = |f: &str, a: Kind, b: Kind| {
        let mut ratios: Vec<f64> = (1..=rounds)
            .filter_map(|round| Some(value(f, a, round)? / value(f, b, round)?))
            .filter(|r| r.is_finite())
            .collect();
        if ratios.is_empty() {
            return "–".to_owned();
        }
        let listed: Vec<String> = ratios.iter().map(|r| format!("{r:.2}")).collect();
        let mid = median(&mut ratios).unwrap_or(f64::NAN);
        format!("{} (median {mid:.2})", listed.join(", "))
    };
    let mut out = String::from(
        "| figure | wsgate ÷ limit, by round | wsgate ÷ best peer, by round | 2 workers ÷ 1, by round |\n|---|---|---|---|\n",
    );
    for f in figures {
        if value(f.id, Kind::Wsgate, 1).is_none() {
            continue;
        }
        let peer = best_peer(f, targets, &med).map_or_else(
            || "–".to_owned(),
            |(k, _)| format!("{}: {}", k.name(), series(f.id, Kind::Wsgate, k)),
        );
        let _ = writeln!(
            out,
            "| {} | {} | {peer} | {} |",
            f.label,
            series(f.id, Kind::Wsgate, Kind::Limit),
            series(f.id, Kind::Wsgate2w, Kind::Wsgate)
        );
    }
    out
}

/// How busy each side was in every CPU figure's window, median of the rounds: the target's CPU
/// time ÷ the window, then the load generator's and echo app's together, both in % of one CPU.
/// Whichever side is near 100 % bounds that figure's rate (a two-worker target may pass 100).
pub fn busy_table(figures: &[Figure], targets: &[Kind], records: &[Record]) -> String {
    let share = |r: &Record, key: &str| {
        let ms = r.detail.get(key)?.as_f64()?;
        let secs = r.detail.get("secs")?.as_f64()?;
        (secs > 0.0).then(|| ms / (secs * 10.0))
    };
    let mut out = String::from("| figure (target % / load %) |");
    for k in targets {
        let _ = write!(out, " {} |", k.name());
    }
    out.push_str("\n|---|");
    out.push_str(&"---:|".repeat(targets.len()));
    out.push('\n');
    let mut rows = 0;
    for f in figures.iter().filter(|f| f.id.ends_with("_cpu_us")) {
        let cells: Vec<String> = targets
            .iter()
            .map(|k| {
                let of = |key: &str| {
                    let mut v: Vec<f64> = records
                        .iter()
                        .filter(|r| r.figure == f.id && r.target == k.name())
                        .filter_map(|r| share(r, key))
                        .collect();
                    median(&mut v)
                };
                match (of("cpu_ms"), of("load_cpu_ms")) {
                    (Some(t), Some(l)) => format!("{t:.0} / {l:.0}"),
                    _ => "–".into(),
                }
            })
            .collect();
        if cells.iter().all(|c| c == "–") {
            continue;
        }
        rows += 1;
        let _ = writeln!(out, "| {} | {} |", f.label, cells.join(" | "));
    }
    if rows == 0 { String::new() } else { out }
}

/// Writes `raw.csv` and `raw.json` (with the run's settings) into `dir`.
pub fn write_raw(dir: &Path, records: &[Record], settings: &serde_json::Value) -> Result<()> {
    let mut csv = String::from("round,target,figure,value,detail\n");
    for r in records {
        let detail = r.detail.to_string().replace('"', "\"\"");
        let _ = writeln!(csv, "{},{},{},{},\"{detail}\"", r.round, r.target, r.figure, r.value);
    }
    std::fs::write(dir.join("raw.csv"), csv)?;
    let json = serde_json::json!({ "settings": settings, "records": records });
    std::fs::write(dir.join("raw.json"), serde_json::to_string_pretty(&json)?)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// One CPU figure's value for `target` in `round`.
    fn rec(round: usize, target: &'static str, value: f64) -> Record {
        Record {
            round,
            target,
            figure: "cpu",
            value,
            detail: serde_json::Value::Null,
        }
    }

    /// The figure those records are of.
    fn cpu() -> Figure {
        Figure {
            id: "cpu",
            label: "CPU".into(),
            better: Better::Lower,
        }
    }

    #[test]
    fn the_median_of_three_rounds_is_the_middle_one() {
        assert_eq!(median(&mut [3.0, 1.0, 2.0]), Some(2.0));
        assert_eq!(median(&mut []), None);
        assert_eq!(quantile(&[1, 2, 3, 4], 0.5), Some(2));
        assert_eq!(quantile(&(1..=100).collect::<Vec<_>>(), 0.99), Some(99));
    }

    #[test]
    fn the_table_compares_wsgate_with_the_limit_and_the_best_peer() {
        let records = [
            rec(1, "limit", 100.0),
            rec(1, "wsgate", 150.0),
            rec(1, "nginx", 400.0),
            rec(1, "haproxy", 300.0),
        ];
        let figures = [cpu()];
        let t = table(
            &figures,
            &[Kind::Limit, Kind::Wsgate, Kind::Nginx, Kind::Haproxy],
            &records,
        );
        assert!(t.contains("| CPU | 100 | 150 | 400 | 300 | 1.50× | 0.50× | – |"), "{t}");
    }

    #[test]
    fn ratios_are_also_taken_within_each_round_against_the_peer_best_by_the_medians() {
        // Round 2 is slow for everyone (the limit's value doubles); its ratios stay near the others'.
        let records = [
            rec(1, "limit", 100.0),
            rec(1, "wsgate", 150.0),
            rec(1, "haproxy", 300.0),
            rec(1, "nginx", 500.0),
            rec(2, "limit", 200.0),
            rec(2, "wsgate", 280.0),
            rec(2, "haproxy", 700.0),
            rec(2, "nginx", 560.0),
            rec(3, "limit", 100.0),
            rec(3, "wsgate", 160.0),
            rec(3, "haproxy", 320.0),
            rec(3, "nginx", 520.0),
        ];
        let figures = [cpu()];
        let t = round_ratios(
            &figures,
            &[Kind::Limit, Kind::Wsgate, Kind::Nginx, Kind::Haproxy],
            &records,
        );
        assert!(
            t.contains("| CPU | 1.50, 1.40, 1.60 (median 1.50) | haproxy: 0.50, 0.40, 0.50 (median 0.50) | – |"),
            "{t}"
        );
    }

    #[test]
    fn the_busy_table_says_which_side_was_saturated_in_each_cpu_window() {
        let window = |target: &'static str, cpu_ms: f64, load_cpu_ms: f64| Record {
            round: 1,
            target,
            figure: "hs_cpu_us",
            value: 1.0,
            detail: serde_json::json!({ "secs": 5.0, "cpu_ms": cpu_ms, "load_cpu_ms": load_cpu_ms }),
        };
        // The limit is load-bound (its load side at 99 %), nginx bound by its own CPU.
        let records = [window("limit", 3850.0, 4950.0), window("nginx", 4900.0, 2600.0)];
        let figures = [
            Figure {
                id: "hs_cpu_us",
                label: "CPU per handshake".into(),
                better: Better::Lower,
            },
            Figure {
                id: "hs_rate",
                label: "handshakes/s".into(),
                better: Better::Higher,
            },
        ];
        let t = busy_table(&figures, &[Kind::Limit, Kind::Nginx, Kind::Haproxy], &records);
        assert!(t.contains("| CPU per handshake | 77 / 99 | 98 / 52 | – |"), "{t}");
        assert!(!t.contains("handshakes/s"), "{t}");
        // Records without the load's CPU (runs before it was measured) give no table.
        let older = Record {
            detail: serde_json::json!({ "secs": 5.0, "cpu_ms": 3850.0 }),
            ..window("limit", 0.0, 0.0)
        };
        assert_eq!(busy_table(&figures, &[Kind::Limit], &[older]), "");
    }
}
