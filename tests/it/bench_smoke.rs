//! Smoke runs of the comparison harness (`bench/`, the `wsgate-bench` crate): a few seconds of
//! every measurement against wsgate and the limit, and against nginx and HAProxy where they are
//! installed. They prove the harness still produces every figure, finite and above zero; they
//! never judge a figure (performance is measured by `bench/run.sh`, not asserted here).

use std::path::{Path, PathBuf};
use std::process::Command;

use crate::support::bin::BIN;

/// Builds `wsgate-bench` with this test binary's profile into the same target directory (a
/// no-op when it is up to date) and returns its path.
fn bench_exe() -> PathBuf {
    let profile_dir = Path::new(BIN).parent().unwrap();
    let target_dir = profile_dir.parent().unwrap();
    let mut cargo = Command::new(option_env!("CARGO").unwrap_or("cargo"));
    cargo
        .args(["build", "--quiet", "-p", "wsgate-bench", "--target-dir"])
        .arg(target_dir)
        .current_dir(env!("CARGO_MANIFEST_DIR"));
    // What cargo sets for a running test must not reach this build: build scripts that watch
    // such a variable (ring's watches CARGO_MANIFEST_DIR) would rebuild half the tree.
    for (k, _) in std::env::vars() {
        let test_only = [
            "CARGO_PKG_",
            "CARGO_MANIFEST_",
            "CARGO_CRATE_",
            "CARGO_BIN_",
            "CARGO_PRIMARY_",
            "CARGO_TARGET_TMPDIR",
        ];
        if test_only.iter().any(|p| k.starts_with(p)) || k == "OUT_DIR" {
            cargo.env_remove(k);
        }
    }
    if profile_dir.file_name().is_some_and(|n| n == "release") {
        cargo.arg("--release");
    }
    let status = cargo.status().unwrap();
    assert!(status.success(), "building wsgate-bench failed: {status}");
    profile_dir.join("wsgate-bench")
}

/// Figures every target has, and those only wsgate has.
const EVERY_TARGET: &[&str] = &[
    "hs_cpu_us",
    "hs_rate",
    "small_fixed_cpu_us",
    "small_fixed_rate",
    "large_fixed_cpu_us",
    "large_fixed_rate",
    "small_sat_cpu_us",
    "small_sat_rate",
    "large_sat_cpu_us",
    "large_sat_rate",
    "idle_kib",
    "rtt_p50_ms",
    "rtt_p99_ms",
];
const WSGATE_ONLY: &[&str] = &[
    "swap_idle_p50_ms",
    "swap_idle_p99_ms",
    "swap_load_p50_ms",
    "swap_load_p99_ms",
];

/// Runs one short round against `targets` and checks every figure of every target.
fn smoke(targets: &[&str]) {
    let out = tempfile::tempdir().unwrap();
    let run = Command::new(bench_exe())
        .args(["run", "--rounds", "1", "--secs", "0.3", "--warmup", "0.1"])
        .args(["--small-rate", "2000", "--large-rate", "100", "--latency-rate", "640"])
        .args([
            "--memory-connections",
            "200",
            "--swaps",
            "2",
            "--targets",
            &targets.join(","),
        ])
        .arg("--wsgate")
        .arg(BIN)
        .arg("--out")
        .arg(out.path())
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&run.stdout);
    let stderr = String::from_utf8_lossy(&run.stderr);
    assert!(run.status.success(), "wsgate-bench run failed:\n{stdout}\n{stderr}");
    let raw: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.path().join("raw.json")).unwrap()).unwrap();
    let records = raw["records"].as_array().unwrap();
    for target in targets {
        let wsgate = WSGATE_ONLY.iter().filter(|_| *target == "wsgate");
        for figure in EVERY_TARGET.iter().chain(wsgate) {
            let value = records
                .iter()
                .find(|r| r["target"] == *target && r["figure"] == *figure)
                .and_then(|r| r["value"].as_f64())
                .unwrap_or_else(|| panic!("no {figure} for {target}:\n{stdout}"));
            assert!(
                value.is_finite() && value > 0.0,
                "{figure} of {target} is {value}:\n{stdout}"
            );
        }
    }
    // Every CPU window also says how busy the load side and each CPU were: the load generator
    // always works, so its CPU time cannot be zero.
    for r in records.iter().filter(|r| r["figure"] == "hs_cpu_us") {
        let detail = &r["detail"];
        assert!(detail["load_cpu_ms"].as_f64().is_some_and(|ms| ms > 0.0), "{r}");
        let cpus = detail["cpus_busy_pct"].as_array().unwrap();
        assert!(
            !cpus.is_empty()
                && cpus
                    .iter()
                    .all(|c| c.as_f64().is_some_and(|p| (0.0..=100.0).contains(&p))),
            "{r}"
        );
        assert_eq!(
            detail["cpus_steal_pct"].as_array().map(Vec::len),
            Some(cpus.len()),
            "{r}"
        );
    }
    for r in records.iter().filter(|r| r["figure"] == "rtt_p99_ms") {
        assert!(
            r["detail"]["cpus_steal_pct"].as_array().is_some_and(|c| !c.is_empty()),
            "{r}"
        );
        let p99 = r["value"].as_f64().unwrap();
        assert!(r["detail"]["max_ms"].as_f64().is_some_and(|max| max >= p99), "{r}");
    }
    assert!(
        stdout.contains("| figure (target % / load %) |"),
        "no busy table printed:\n{stdout}"
    );
    for file in ["raw.csv", "machine.json", "summary.md"] {
        assert!(out.path().join(file).is_file(), "{file} was not written");
    }
    assert!(
        stdout.contains("| figure | limit | wsgate |"),
        "no table printed:\n{stdout}"
    );
}

#[test]
fn the_harness_measures_every_figure_of_wsgate_and_the_limit() {
    smoke(&["limit", "wsgate"]);
}

#[test]
#[ignore = "needs nginx and haproxy (scripts/test.sh installs them)"]
fn the_harness_measures_every_figure_of_nginx_and_haproxy_too() {
    smoke(&["limit", "wsgate", "nginx", "haproxy"]);
}
