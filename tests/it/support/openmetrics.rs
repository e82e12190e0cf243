//! A strict check of `/metrics`: the OpenMetrics parser of the Prometheus Python client
//! (`prometheus_client.openmetrics.parser`, the reference implementation) reads the exposition,
//! and the families the code registers are read from its source.

use std::collections::BTreeMap;
use std::io::Write;
use std::process::{Command, Stdio};

/// The Content-Type of an OpenMetrics 1.0 exposition.
pub const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

const PARSE: &str = r#"
import json, math, sys
try:
    from prometheus_client.openmetrics.parser import text_string_to_metric_families
except ImportError as e:
    sys.stderr.write("prometheus_client is missing: %s\n" % e)
    sys.exit(3)
families = []
for f in text_string_to_metric_families(sys.stdin.read()):
    families.append({
        "name": f.name, "type": f.type, "help": f.documentation, "unit": f.unit,
        "samples": [{"name": s.name, "labels": s.labels,
                     "value": s.value if math.isfinite(s.value) else str(s.value)} for s in f.samples],
    })
print(json.dumps(families))
"#;

/// One metric family as the parser read it.
#[derive(Debug, Clone)]
pub struct Family {
    pub name: String,
    pub kind: String,
    pub help: String,
    pub unit: String,
    pub samples: Vec<Sample>,
}

/// One sample.
#[derive(Debug, Clone)]
pub struct Sample {
    pub name: String,
    pub labels: BTreeMap<String, String>,
    pub value: serde_json::Value,
}

/// The Python that has prometheus_client: `$PYTHON` (as scripts/test.sh uses it), else python3.
fn python() -> String {
    std::env::var("PYTHON")
        .ok()
        .filter(|p| !p.is_empty())
        .unwrap_or_else(|| "python3".into())
}

/// Parses `body` with the strict OpenMetrics parser; fails the test when it is refused, or when
/// Python or prometheus_client is missing (never skips: the check would silently vanish).
pub fn parse_strict(body: &str) -> Vec<Family> {
    let py = python();
    let mut child = Command::new(&py)
        .args(["-c", PARSE])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| {
            panic!(
                "cannot run {py} ({e}): the strict OpenMetrics check needs Python 3 with prometheus_client \
                 (pip install prometheus_client; scripts/test.sh installs it)"
            )
        });
    child.stdin.take().unwrap().write_all(body.as_bytes()).unwrap();
    let out = child.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    match out.status.code() {
        Some(0) => {}
        Some(3) => panic!(
            "{py} has no prometheus_client, which the strict OpenMetrics check needs: \
             pip install prometheus_client (scripts/test.sh installs it)\n{stderr}"
        ),
        _ => panic!("the exposition is not valid OpenMetrics:\n{stderr}\n--- body ---\n{body}"),
    }
    let parsed: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let text = |v: &serde_json::Value| v.as_str().unwrap_or_default().to_owned();
    parsed
        .as_array()
        .unwrap()
        .iter()
        .map(|f| Family {
            name: text(&f["name"]),
            kind: text(&f["type"]),
            help: text(&f["help"]),
            unit: text(&f["unit"]),
            samples: f["samples"]
                .as_array()
                .unwrap()
                .iter()
                .map(|s| Sample {
                    name: text(&s["name"]),
                    labels: serde_json::from_value(s["labels"].clone()).unwrap(),
                    value: s["value"].clone(),
                })
                .collect(),
        })
        .collect()
}

/// Reads a Rust string literal (no raw strings) at the start of `s`; returns it and the rest.
fn string_literal(s: &str) -> Option<(String, &str)> {
    let s = s.trim_start().strip_prefix('"')?;
    let mut out = String::new();
    let mut chars = s.char_indices();
    while let Some((i, c)) = chars.next() {
        match c {
            '"' => return Some((out, &s[i + 1..])),
            '\\' => out.push(chars.next()?.1),
            c => out.push(c),
        }
    }
    None
}

/// The family names registered in the metrics source `source`: every `.register(NAME, HELP, …)`
/// and `.register_with_unit(NAME, HELP, Unit::U, …)` on a `Registry::with_prefix(PREFIX)`, as
/// `PREFIX_NAME[_unit]`. Panics when a registration cannot be read, so that a change of style in
/// the source fails here instead of silently checking fewer families.
pub fn registered_families(path: &str, source: &str) -> Vec<(String, String)> {
    let prefix = source
        .split_once("Registry::with_prefix(")
        .and_then(|(_, rest)| string_literal(rest))
        .map(|(p, _)| p)
        .unwrap_or_else(|| panic!("{path}: no Registry::with_prefix(\"…\")"));
    let mut families = Vec::new();
    // The shared helper of telemetry::metrics registers `certificate_reloads` with the help its
    // caller passes: `register_reloads(&mut registry, "HELP")`.
    for (at, _) in source.match_indices("register_reloads(&mut registry,") {
        let args = &source[at + "register_reloads(&mut registry,".len()..];
        let line = source[..at].lines().count();
        let Some((help, _)) = string_literal(args) else {
            panic!("{path}:{line}: cannot read the help of this reload family")
        };
        families.push((format!("{prefix}_certificate_reloads"), help));
    }
    for (at, _) in source.match_indices(".register") {
        let call = &source[at + ".register".len()..];
        let (with_unit, args) = if let Some(args) = call.strip_prefix("_with_unit(") {
            (true, args)
        } else if let Some(args) = call.strip_prefix('(') {
            (false, args)
        } else {
            continue;
        };
        let line = source[..at].lines().count();
        let unreadable = || panic!("{path}:{line}: cannot read this registration's name and help");
        let Some((name, rest)) = string_literal(args) else {
            unreadable()
        };
        let Some((help, rest)) = rest.trim_start().strip_prefix(',').and_then(string_literal) else {
            if name == "certificate_reloads" && source.contains("pub fn register_reloads(") {
                // The helper's own body: its callers are read above.
                continue;
            }
            unreadable()
        };
        let mut family = format!("{prefix}_{name}");
        if with_unit {
            let unit = rest
                .trim_start()
                .strip_prefix(',')
                .and_then(|r| r.split_once("Unit::"))
                .map(|(_, u)| u.chars().take_while(char::is_ascii_alphanumeric).collect::<String>())
                .filter(|u| !u.is_empty())
                .unwrap_or_else(|| panic!("{path}:{line}: cannot read the unit of {family}"));
            family = format!("{family}_{}", unit.to_ascii_lowercase());
        }
        families.push((family, help));
    }
    assert!(!families.is_empty(), "{path}: no registrations found");
    families
}

/// Fetches `/metrics` from `admin`, checks its Content-Type, parses it strictly, and checks that
/// every family has help text and that every family registered in `sources` (paths relative to
/// the crate) is there, with the help text the source gives it. Returns the families by name.
pub async fn check_admin_metrics(admin: std::net::SocketAddr, sources: &[&str]) -> BTreeMap<String, Family> {
    let (status, headers, body) = super::raw::http_response(admin, "GET", "/metrics").await;
    assert_eq!(status, 200, "{body}");
    let content_types: Vec<&str> = headers
        .iter()
        .filter(|(k, _)| k == "content-type")
        .map(|(_, v)| v.as_str())
        .collect();
    assert_eq!(content_types, vec![CONTENT_TYPE], "GET /metrics Content-Type");
    let families = parse_strict(&body);
    for f in &families {
        assert!(!f.help.trim().is_empty(), "family {} has no help text:\n{body}", f.name);
    }
    let by_name: BTreeMap<String, Family> = families.into_iter().map(|f| (f.name.clone(), f)).collect();
    for path in sources {
        let source = std::fs::read_to_string(format!("{}/{path}", env!("CARGO_MANIFEST_DIR"))).unwrap();
        for (name, help) in registered_families(path, &source) {
            let family = by_name
                .get(&name)
                .unwrap_or_else(|| panic!("{name} (registered in {path}) is not in /metrics:\n{body}"));
            // prometheus-client ends every help text with a full stop.
            assert_eq!(
                family.help.trim_end_matches('.'),
                help.trim_end_matches('.'),
                "help text of {name}"
            );
        }
    }
    by_name
}
