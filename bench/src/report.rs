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

/// The markdown table: medians per target, wsgate ÷ limit, wsgate ÷ the best peer (the lowest
/// cost or the highest rate among nginx, HAProxy and Caddy), two workers ÷ one.
pub fn table(figures: &[Figure], targets: &[Kind], records: &[Record]) -> String {
    let med = medians(records);
    let get = |f: &str, k: Kind| {
        med.iter()
            .find(|((fi, t), _)| *fi == f && *t == k.name())
            .map(|(_, v)| *v)
    };
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
        let peers = targets.iter().filter(|k| k.is_peer()).filter_map(|k| get(f.id, *k));
        let best = match f.better {
            Better::Lower => peers.min_by(f64::total_cmp),
            Better::Higher => peers.max_by(f64::total_cmp),
        };
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

    #[test]
    fn the_median_of_three_rounds_is_the_middle_one() {
        assert_eq!(median(&mut [3.0, 1.0, 2.0]), Some(2.0));
        assert_eq!(median(&mut []), None);
        assert_eq!(quantile(&[1, 2, 3, 4], 0.5), Some(2));
        assert_eq!(quantile(&(1..=100).collect::<Vec<_>>(), 0.99), Some(99));
    }

    #[test]
    fn the_table_compares_wsgate_with_the_limit_and_the_best_peer() {
        let rec = |target, value| Record {
            round: 1,
            target,
            figure: "cpu",
            value,
            detail: serde_json::Value::Null,
        };
        let records = [
            rec("limit", 100.0),
            rec("wsgate", 150.0),
            rec("nginx", 400.0),
            rec("haproxy", 300.0),
        ];
        let figures = [Figure {
            id: "cpu",
            label: "CPU".into(),
            better: Better::Lower,
        }];
        let t = table(
            &figures,
            &[Kind::Limit, Kind::Wsgate, Kind::Nginx, Kind::Haproxy],
            &records,
        );
        assert!(t.contains("| CPU | 100 | 150 | 400 | 300 | 1.50× | 0.50× | – |"), "{t}");
    }
}
