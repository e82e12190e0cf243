//! The module graph as `docs/DESIGN.md` draws it: acyclic at the top level and inside each
//! module, the proxy's stages independent of one another, every file opening with what it holds;
//! and its rule of one crypto provider in the dependency tree.
//!
//! Reads `src/` as text: a `crate::a::b` or `super::b` path in a file is an edge from the
//! file's module to `a` (or to its sibling `b`). Test modules (`#[cfg(test)]` to the end of a
//! file) are not part of the design and are skipped.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            rust_files(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

/// `src/proxy/inbound.rs` → `["proxy", "inbound"]`; `src/lib.rs` → `[]`.
fn module_of(src: &Path, file: &Path) -> Vec<String> {
    let rel = file.strip_prefix(src).unwrap().with_extension("");
    let parts: Vec<String> = rel.iter().map(|p| p.to_string_lossy().into_owned()).collect();
    if parts == ["lib"] || parts == ["main"] {
        Vec::new()
    } else {
        parts
    }
}

fn ident_at(s: &str) -> String {
    s.chars()
        .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
        .collect()
}

/// The first path segment after every `prefix` in `code`, braces (`prefix{a, b::c}`) included.
fn targets(code: &str, prefix: &str) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    for (i, _) in code.match_indices(prefix) {
        // `wsgate::crate::` never occurs; skip identifiers that merely end in the prefix.
        if code[..i]
            .chars()
            .last()
            .is_some_and(|c| c.is_ascii_alphanumeric() || c == '_')
        {
            continue;
        }
        let rest = &code[i + prefix.len()..];
        if let Some(group) = rest.strip_prefix('{') {
            let end = group.find('}').unwrap_or(group.len());
            for item in group[..end].split(',') {
                let id = ident_at(item.trim());
                if !id.is_empty() {
                    out.insert(id);
                }
            }
        } else {
            let id = ident_at(rest);
            if !id.is_empty() {
                out.insert(id);
            }
        }
    }
    out
}

/// Design code of a file: without comments and without its test module.
fn design_code(text: &str) -> String {
    let end = text.find("#[cfg(test)]").unwrap_or(text.len());
    text[..end]
        .lines()
        .filter(|l| !l.trim_start().starts_with("//"))
        .collect::<Vec<_>>()
        .join("\n")
}

struct Graph {
    /// module path → the module paths it uses (at most two segments deep).
    edges: BTreeMap<Vec<String>, BTreeSet<Vec<String>>>,
}

fn graph() -> Graph {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut files = Vec::new();
    rust_files(&src, &mut files);
    let mut edges: BTreeMap<Vec<String>, BTreeSet<Vec<String>>> = BTreeMap::new();
    for file in files {
        let module = module_of(&src, &file);
        if module.is_empty() {
            continue;
        }
        let code = design_code(&std::fs::read_to_string(&file).unwrap());
        let mut uses = BTreeSet::new();
        for top in targets(&code, "crate::") {
            // Also keep the second segment, for edges between siblings inside one module.
            let mut target = vec![top.clone()];
            for second in targets(&code, &format!("crate::{top}::")) {
                let mut t = target.clone();
                t.push(second);
                uses.insert(t);
            }
            target.truncate(1);
            uses.insert(target);
        }
        let parent: Vec<String> = module[..module.len() - 1].to_vec();
        for sibling in targets(&code, "super::") {
            let mut t = parent.clone();
            t.push(sibling);
            uses.insert(t);
        }
        // A child module's own submodules (`use name::x` after `pub mod name;`) stay inside it.
        edges.entry(module).or_default().extend(uses);
    }
    Graph { edges }
}

/// Finds a cycle among `nodes` with `next`, returning it as a path.
fn cycle(nodes: &BTreeSet<String>, next: &BTreeMap<String, BTreeSet<String>>) -> Option<Vec<String>> {
    fn visit(
        n: &str,
        next: &BTreeMap<String, BTreeSet<String>>,
        state: &mut BTreeMap<String, u8>,
        path: &mut Vec<String>,
    ) -> Option<Vec<String>> {
        match state.get(n) {
            Some(1) => {
                let start = path.iter().position(|p| p == n).unwrap_or(0);
                let mut c = path[start..].to_vec();
                c.push(n.to_owned());
                return Some(c);
            }
            Some(2) => return None,
            _ => {}
        }
        state.insert(n.to_owned(), 1);
        path.push(n.to_owned());
        for m in next.get(n).into_iter().flatten() {
            if let Some(c) = visit(m, next, state, path) {
                return Some(c);
            }
        }
        path.pop();
        state.insert(n.to_owned(), 2);
        None
    }
    let mut state = BTreeMap::new();
    for n in nodes {
        if let Some(c) = visit(n, next, &mut state, &mut Vec::new()) {
            return Some(c);
        }
    }
    None
}

/// The edges between the children of `parent` (the top level when `parent` is empty).
fn level(g: &Graph, parent: &[String]) -> (BTreeSet<String>, BTreeMap<String, BTreeSet<String>>) {
    let depth = parent.len();
    let mut nodes = BTreeSet::new();
    let mut next: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for (from, tos) in &g.edges {
        if from.len() <= depth || from[..depth] != *parent {
            continue;
        }
        let a = from[depth].clone();
        nodes.insert(a.clone());
        for to in tos {
            if to.len() <= depth || to[..depth] != *parent {
                continue;
            }
            let b = to[depth].clone();
            if b != a
                && g.edges
                    .keys()
                    .any(|k| k.len() > depth && k[..depth] == *parent && k[depth] == b)
            {
                next.entry(a.clone()).or_default().insert(b);
            }
        }
    }
    (nodes, next)
}

#[test]
fn the_top_level_module_graph_has_no_cycle() {
    let g = graph();
    let (nodes, next) = level(&g, &[]);
    assert!(
        nodes.contains("proxy") && nodes.contains("tls"),
        "read the modules: {nodes:?}"
    );
    assert!(
        next.get("proxy").is_some_and(|n| n.contains("tls")),
        "the reader must see proxy → tls: {next:?}"
    );
    if let Some(c) = cycle(&nodes, &next) {
        panic!("module cycle: {}\nedges: {next:#?}", c.join(" → "));
    }
}

#[test]
fn the_modules_inside_each_module_have_no_cycle() {
    let g = graph();
    let parents: BTreeSet<Vec<String>> = g
        .edges
        .keys()
        .filter(|k| k.len() >= 2)
        .map(|k| k[..1].to_vec())
        .collect();
    assert!(parents.contains(&vec!["proxy".to_owned()]));
    for parent in parents {
        let (nodes, next) = level(&g, &parent);
        if let Some(c) = cycle(&nodes, &next) {
            panic!("cycle inside {}: {}", parent.join("::"), c.join(" → "));
        }
    }
}

#[test]
fn the_leaf_modules_depend_on_no_other_module_of_the_crate() {
    let g = graph();
    let (_, next) = level(&g, &[]);
    for leaf in ["x509", "net", "lifecycle", "telemetry"] {
        let uses: Vec<&String> = next.get(leaf).into_iter().flatten().filter(|m| *m != "x509").collect();
        assert!(uses.is_empty(), "{leaf} is a leaf (x509 aside) but uses {uses:?}");
    }
    for module in [
        "x509",
        "authz",
        "certs",
        "tls",
        "telemetry",
        "net",
        "lifecycle",
        "admin",
    ] {
        let uses = next.get(module).cloned().unwrap_or_default();
        for upper in ["proxy", "inject", "cli", "demo"] {
            assert!(!uses.contains(upper), "{module} reaches up into {upper}");
        }
    }
    let inject = next.get("inject").cloned().unwrap_or_default();
    assert!(
        !inject.contains("proxy"),
        "the injector shares building blocks, not the proxy"
    );
}

#[test]
fn the_proxy_stages_do_not_import_one_another() {
    let g = graph();
    let (_, next) = level(&g, &["proxy".to_owned()]);
    let stages = ["accept", "exchange", "dial", "secure", "pump"];
    for stage in stages {
        let uses = next.get(stage).cloned().unwrap_or_default();
        for other in stages {
            assert!(!uses.contains(other), "stage {stage} imports stage {other}");
        }
    }
    let root = next.get("inbound").cloned().unwrap_or_default();
    for stage in ["accept", "exchange", "dial", "pump"] {
        assert!(root.contains(stage), "the composition root wires {stage}: {root:?}");
    }
    // The outbound root composes the same stages in the other order, with TLS as a client.
    let outbound = next.get("outbound").cloned().unwrap_or_default();
    for stage in ["exchange", "dial", "secure", "pump"] {
        assert!(
            outbound.contains(stage),
            "the outbound root wires {stage}: {outbound:?}"
        );
    }
    assert!(
        !outbound.contains("accept"),
        "outbound accepts plain TCP, no TLS server"
    );
    // The trust registry is a helper of the root: it ends connections through a closure.
    let trust = next.get("trust").cloned().unwrap_or_default();
    for stage in stages {
        assert!(!trust.contains(stage), "the trust registry imports stage {stage}");
    }
}

#[test]
fn every_source_file_opens_with_what_it_holds() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut files = Vec::new();
    rust_files(&src, &mut files);
    assert!(files.len() > 20);
    for file in files {
        let text = std::fs::read_to_string(&file).unwrap();
        assert!(
            text.starts_with("//!"),
            "{} must open with a //! line saying what it holds and what it may depend on",
            file.display()
        );
    }
}

#[test]
fn the_reader_finds_grouped_and_relative_paths() {
    let code = "use crate::{a, b::c};\nuse super::d;\nlet x = crate::e::f();\nmy_crate::g();";
    assert_eq!(
        targets(code, "crate::"),
        ["a", "b", "e"].iter().map(|s| s.to_string()).collect()
    );
    assert_eq!(targets(code, "super::"), ["d".to_string()].into_iter().collect());
    let mut next = BTreeMap::new();
    next.insert("a".to_owned(), ["b".to_owned()].into_iter().collect());
    next.insert("b".to_owned(), ["a".to_owned()].into_iter().collect());
    let nodes = ["a".to_owned(), "b".to_owned()].into_iter().collect();
    assert_eq!(cycle(&nodes, &next), Some(vec!["a".into(), "b".into(), "a".into()]));
}

/// The names of the packages `cargo tree` links in with the default features, for any target,
/// the dev-dependencies included (`cargo metadata` would list optional dependencies that no
/// feature turns on).
fn linked_packages() -> BTreeSet<String> {
    let out = std::process::Command::new(env!("CARGO"))
        .args([
            "tree",
            "--offline",
            "--locked",
            "--target",
            "all",
            "-e",
            "normal,build,dev",
        ])
        .args(["--prefix", "none", "--format", "{p}"])
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| l.split_whitespace().next())
        .map(str::to_owned)
        .collect()
}

#[test]
fn one_crypto_provider_is_linked_in() {
    let packages = linked_packages();
    assert!(packages.contains("aws-lc-rs"), "aws-lc-rs is the provider");
    // ring comes in only with the `bench-ring` feature, for the handshake benchmark.
    assert!(!packages.contains("ring"), "a second crypto provider: ring");
}
