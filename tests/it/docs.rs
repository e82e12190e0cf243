//! The documentation cannot drift from the code: the `--help` blocks in docs/cli.md are the
//! binary's own output, README.md stays a front door of at most 16 KiB, every relative link in
//! README.md and docs/*.md resolves (file and anchor), and the README's test command is the one
//! CI runs. Uses only std and the built binary.
//!
//! After a CLI change, regenerate the help blocks with
//! `WSGATE_UPDATE_DOCS=1 cargo nextest run docs` (or `cargo test --test it docs`).

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::Command;

const BIN: &str = env!("CARGO_BIN_EXE_wsgate");
const CLI_DOC: &str = "docs/cli.md";
const README: &str = "README.md";
const README_MAX_BYTES: u64 = 16 * 1024;
/// The README's "whole test suite" command; `.ci/run` must run exactly this line.
const SUITE_COMMAND: &str = "bash scripts/test.sh";
/// The marker before each help block: `<!-- help: wsgate -->` for `wsgate --help`,
/// `<!-- help: proxy -->` for `wsgate proxy --help`.
const MARKER_START: &str = "<!-- help: ";
const MARKER_END: &str = " -->";
/// The key of the top-level help in a marker.
const TOP: &str = "wsgate";

fn root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

fn read(rel: &str) -> String {
    let path = root().join(rel);
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("reading {}: {e}", path.display()))
}

/// `wsgate [COMMAND] --help` as a user sees it with nothing set: no `WSGATE_*` variable (clap
/// prints their values next to the defaults), no colour, a fixed width.
fn help(key: &str) -> String {
    let mut cmd = Command::new(BIN);
    cmd.env_clear().env("COLUMNS", "100").env("NO_COLOR", "1");
    if key != TOP {
        cmd.arg(key);
    }
    let out = cmd.arg("--help").output().expect("running wsgate --help");
    let stdout = String::from_utf8(out.stdout).expect("help is UTF-8");
    assert!(
        out.status.success() && out.stderr.is_empty(),
        "wsgate {key} --help failed ({}): {}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    stdout
}

/// The subcommands `wsgate --help` lists (without clap's own `help`).
fn subcommands(top_help: &str) -> Vec<String> {
    top_help
        .lines()
        .skip_while(|l| l.trim() != "Commands:")
        .skip(1)
        .take_while(|l| !l.trim().is_empty())
        .filter_map(|l| l.split_whitespace().next())
        .filter(|name| *name != "help")
        .map(str::to_owned)
        .collect()
}

/// A help block in a document: its key and the byte range of its body (between the fences).
#[derive(Debug, PartialEq)]
struct HelpBlock {
    key: String,
    body: std::ops::Range<usize>,
}

/// Finds every `<!-- help: KEY -->` marker and the fenced block on the line after it.
fn help_blocks(doc: &str) -> Result<Vec<HelpBlock>, String> {
    let mut blocks = Vec::new();
    let mut offset = 0;
    let lines: Vec<&str> = doc.split_inclusive('\n').collect();
    let mut i = 0;
    while i < lines.len() {
        let line = lines[i].trim_end();
        offset += lines[i].len();
        i += 1;
        let Some(key) = line.strip_prefix(MARKER_START).and_then(|r| r.strip_suffix(MARKER_END)) else {
            continue;
        };
        let key = key.trim().to_owned();
        let fence = lines.get(i).map(|l| l.trim_end()).unwrap_or_default();
        if !fence.starts_with("```") {
            return Err(format!(
                "the line after `{line}` must open a ``` block, found `{fence}`"
            ));
        }
        offset += lines[i].len();
        i += 1;
        let body_start = offset;
        loop {
            let Some(l) = lines.get(i) else {
                return Err(format!("the block after `{line}` is never closed"));
            };
            if l.trim_end() == "```" {
                blocks.push(HelpBlock {
                    key,
                    body: body_start..offset,
                });
                offset += l.len();
                i += 1;
                break;
            }
            offset += l.len();
            i += 1;
        }
    }
    Ok(blocks)
}

#[test]
fn cli_doc_help_blocks_are_the_binarys_own_help_output() {
    let updating = std::env::var("WSGATE_UPDATE_DOCS").is_ok_and(|v| v == "1");
    let doc = read(CLI_DOC);
    let blocks = help_blocks(&doc).unwrap_or_else(|e| panic!("{CLI_DOC}: {e}"));

    let top = help(TOP);
    let mut wanted: BTreeMap<String, String> = BTreeMap::new();
    for name in subcommands(&top) {
        let text = help(&name);
        wanted.insert(name, text);
    }
    wanted.insert(TOP.to_owned(), top);

    let mut problems = Vec::new();
    let mut seen = BTreeSet::new();
    for b in &blocks {
        if !seen.insert(b.key.clone()) {
            problems.push(format!("`{MARKER_START}{}{MARKER_END}` appears twice", b.key));
        }
        if !wanted.contains_key(&b.key) {
            problems.push(format!(
                "`{MARKER_START}{}{MARKER_END}` names no command of `wsgate --help`: remove that section",
                b.key
            ));
        }
    }
    let missing: Vec<&String> = wanted.keys().filter(|k| !seen.contains(*k)).collect();

    if updating {
        assert!(problems.is_empty(), "{CLI_DOC}:\n{}", problems.join("\n"));
        // Rewrite from the end so earlier ranges stay valid.
        let mut new = doc.clone();
        for b in blocks.iter().rev() {
            new.replace_range(b.body.clone(), &wanted[&b.key]);
        }
        for key in missing {
            let title = if key == TOP {
                TOP.to_owned()
            } else {
                format!("{TOP} {key}")
            };
            new.push_str(&format!(
                "\n### `{title} --help`\n\n{MARKER_START}{key}{MARKER_END}\n```text\n{}```\n",
                wanted[key]
            ));
        }
        if new != doc {
            std::fs::write(root().join(CLI_DOC), new).expect("writing docs/cli.md");
            eprintln!("WSGATE_UPDATE_DOCS=1: rewrote the help blocks of {CLI_DOC}");
        }
        return;
    }

    for key in missing {
        problems.push(format!(
            "no `{MARKER_START}{key}{MARKER_END}` block for `wsgate {key} --help`"
        ));
    }
    for b in &blocks {
        if let Some(want) = wanted.get(&b.key)
            && doc[b.body.clone()] != *want
        {
            problems.push(format!(
                "the `{key}` block differs from `wsgate {key} --help` (- {CLI_DOC}, + binary):\n{}",
                line_diff(&doc[b.body.clone()], want),
                key = b.key,
            ));
        }
    }
    assert!(
        problems.is_empty(),
        "{CLI_DOC} is out of date with the binary. Regenerate the help blocks with \
         `WSGATE_UPDATE_DOCS=1 cargo nextest run docs` and review the prose around them.\n\n{}",
        problems.join("\n\n")
    );
}

/// The lines only in `old` (`-`) and only in `new` (`+`), in order: enough to see what changed in
/// a help text without printing both whole.
fn line_diff(old: &str, new: &str) -> String {
    let old_lines: BTreeSet<&str> = old.lines().collect();
    let new_lines: BTreeSet<&str> = new.lines().collect();
    let gone = old.lines().filter(|l| !new_lines.contains(l)).map(|l| format!("- {l}"));
    let added = new.lines().filter(|l| !old_lines.contains(l)).map(|l| format!("+ {l}"));
    let diff: Vec<String> = gone.chain(added).collect();
    if diff.is_empty() {
        "(the same lines, in another order or with other blank lines)".to_owned()
    } else {
        diff.join("\n")
    }
}

#[test]
fn readme_is_at_most_16_kib() {
    let len = std::fs::metadata(root().join(README)).expect("README.md").len();
    assert!(
        len <= README_MAX_BYTES,
        "README.md is {len} bytes, more than {README_MAX_BYTES}: it is the front door; move \
         reference material into docs/"
    );
}

#[test]
fn readme_test_command_is_the_one_ci_runs() {
    let line_of = |text: &str| text.lines().any(|l| l.trim() == SUITE_COMMAND);
    assert!(
        line_of(&read(README)),
        "README.md must give `{SUITE_COMMAND}` on a line of its own"
    );
    let ci = read(".ci/run");
    assert!(
        line_of(&ci),
        ".ci/run must run `{SUITE_COMMAND}`, the README's command, on a line of its own:\n{ci}"
    );
}

// ------------------------------------------------------------------------------------- links

/// The markdown files whose links are checked: README.md and docs/*.md.
fn markdown_files() -> Vec<PathBuf> {
    let mut files = vec![root().join(README)];
    let mut docs: Vec<PathBuf> = std::fs::read_dir(root().join("docs"))
        .expect("docs/")
        .map(|e| e.expect("a docs/ entry").path())
        .filter(|p| p.extension().is_some_and(|e| e == "md"))
        .collect();
    docs.sort();
    files.extend(docs);
    files
}

/// The lines of a markdown document outside fenced code blocks, numbered from 1.
fn outside_fences(doc: &str) -> Vec<(usize, &str)> {
    let mut out = Vec::new();
    let mut fence: Option<&str> = None;
    for (n, line) in doc.lines().enumerate() {
        let t = line.trim();
        let marker = ["```", "~~~"].into_iter().find(|m| t.starts_with(m));
        match (fence, marker) {
            (None, Some(m)) => fence = Some(m),
            (Some(f), Some(m)) if f == m && t == m => fence = None,
            (None, None) => out.push((n + 1, line)),
            _ => {}
        }
    }
    out
}

/// The prose lines of a document (outside fences), with inline code removed.
fn prose_lines(doc: &str) -> Vec<(usize, String)> {
    outside_fences(doc)
        .into_iter()
        .map(|(n, l)| (n, strip_inline_code(l)))
        .collect()
}

fn strip_inline_code(line: &str) -> String {
    let mut out = String::new();
    let mut in_code = false;
    for c in line.chars() {
        if c == '`' {
            in_code = !in_code;
        } else if !in_code {
            out.push(c);
        }
    }
    out
}

/// Link targets on a line: inline `[text](target)` / `![alt](target)` and reference
/// definitions `[name]: target`.
fn link_targets(line: &str) -> Vec<String> {
    let mut targets = Vec::new();
    if let Some(rest) = line.trim_start().strip_prefix('[')
        && let Some((_, def)) = rest.split_once("]:")
    {
        if let Some(t) = def.split_whitespace().next() {
            targets.push(t.trim_matches(['<', '>']).to_owned());
        }
        return targets;
    }
    let mut rest = line;
    while let Some(i) = rest.find("](") {
        let after = &rest[i + 2..];
        let mut depth = 0;
        let end = after
            .char_indices()
            .find(|&(_, c)| match c {
                '(' => {
                    depth += 1;
                    false
                }
                ')' if depth == 0 => true,
                ')' => {
                    depth -= 1;
                    false
                }
                _ => false,
            })
            .map_or(after.len(), |(j, _)| j);
        let inner = after[..end].trim();
        let target = if let Some(r) = inner.strip_prefix('<') {
            r.split('>').next().unwrap_or_default()
        } else {
            inner.split_whitespace().next().unwrap_or_default()
        };
        targets.push(target.to_owned());
        rest = &after[end..];
    }
    targets
}

/// GitHub's anchor for a heading: lowercase, punctuation dropped (letters, digits, `-`, `_`
/// and spaces stay), spaces become `-`.
fn slug(heading: &str) -> String {
    let text = heading_text(heading);
    text.trim()
        .to_lowercase()
        .chars()
        .filter(|c| c.is_alphanumeric() || *c == '-' || *c == '_' || *c == ' ')
        .map(|c| if c == ' ' { '-' } else { c })
        .collect()
}

/// A heading's text as GitHub renders it: code marks and link syntax removed.
fn heading_text(heading: &str) -> String {
    let no_ticks: String = heading.chars().filter(|&c| c != '`').collect();
    // [text](url) -> text
    let mut out = String::new();
    let mut rest = no_ticks.as_str();
    while let Some(open) = rest.find('[') {
        let Some(close) = rest[open..].find("](").map(|c| open + c) else {
            break;
        };
        let Some(end) = rest[close..].find(')').map(|e| close + e) else {
            break;
        };
        out.push_str(&rest[..open]);
        out.push_str(&rest[open + 1..close]);
        rest = &rest[end + 1..];
    }
    out.push_str(rest);
    out
}

/// The anchors a document defines: one per heading (repeats get `-1`, `-2`, …), plus explicit
/// `id="…"` / `name="…"` of HTML anchors.
fn anchors(doc: &str) -> BTreeSet<String> {
    let mut found = BTreeSet::new();
    let mut counts: BTreeMap<String, usize> = BTreeMap::new();
    for (_, line) in outside_fences(doc) {
        let t = line.trim_start();
        let hashes = t.chars().take_while(|&c| c == '#').count();
        if (1..=6).contains(&hashes) && t[hashes..].starts_with(' ') {
            let base = slug(t[hashes..].trim().trim_end_matches('#'));
            let n = counts.entry(base.clone()).or_insert(0);
            found.insert(if *n == 0 { base.clone() } else { format!("{base}-{n}") });
            *n += 1;
        }
        for attr in ["id=\"", "name=\""] {
            let mut rest = line;
            while let Some(i) = rest.find(attr) {
                let after = &rest[i + attr.len()..];
                if let Some(end) = after.find('"') {
                    found.insert(after[..end].to_owned());
                }
                rest = after;
            }
        }
    }
    found
}

fn is_external(target: &str) -> bool {
    let scheme_end = target.find(':');
    let slash = target.find('/');
    matches!((scheme_end, slash), (Some(c), Some(s)) if c < s)
        || target.starts_with("mailto:")
        || target.starts_with("//")
}

/// Problems with the relative links of one document: missing files, missing anchors.
fn broken_links(file: &Path, doc: &str) -> Vec<String> {
    let dir = file.parent().expect("a file in a folder");
    let shown = file.strip_prefix(root()).unwrap_or(file).display().to_string();
    let mut problems = Vec::new();
    for (n, line) in prose_lines(doc) {
        for target in link_targets(&line) {
            if target.is_empty() || is_external(&target) {
                continue;
            }
            let (path, anchor) = match target.split_once('#') {
                Some((p, a)) => (p, Some(a)),
                None => (target.as_str(), None),
            };
            let dest = if path.is_empty() {
                file.to_path_buf()
            } else {
                dir.join(path)
            };
            if !dest.exists() {
                problems.push(format!("{shown}:{n}: `{target}`: {} does not exist", dest.display()));
                continue;
            }
            let Some(anchor) = anchor else { continue };
            if dest.extension().is_none_or(|e| e != "md") {
                continue; // an anchor in a non-markdown file (a line of YAML, …) is not checked
            }
            let text = if path.is_empty() {
                doc.to_owned()
            } else {
                std::fs::read_to_string(&dest).unwrap_or_default()
            };
            if !anchors(&text).contains(anchor) {
                problems.push(format!(
                    "{shown}:{n}: `{target}`: no heading or anchor `#{anchor}` in {}",
                    dest.strip_prefix(root()).unwrap_or(&dest).display()
                ));
            }
        }
    }
    problems
}

#[test]
fn relative_links_in_readme_and_docs_reach_existing_files_and_headings() {
    let mut problems = Vec::new();
    let mut checked = 0;
    for file in markdown_files() {
        let doc = std::fs::read_to_string(&file).unwrap_or_else(|e| panic!("{}: {e}", file.display()));
        checked += prose_lines(&doc)
            .iter()
            .map(|(_, l)| link_targets(l).len())
            .sum::<usize>();
        problems.extend(broken_links(&file, &doc));
    }
    assert!(checked > 0, "no link found at all: the link parser is broken");
    assert!(problems.is_empty(), "broken links:\n{}", problems.join("\n"));
}

/// The link checker itself: it sees inline, image and reference links, skips code, resolves
/// anchors as GitHub does, and reports a missing file and a missing heading.
#[test]
fn link_checker_finds_missing_files_and_headings_and_ignores_code() {
    assert_eq!(
        slug("`wsgate inject`: the admission webhook"),
        "wsgate-inject-the-admission-webhook"
    );
    assert_eq!(
        slug("Rotating the workload CA (with trust-manager)"),
        "rotating-the-workload-ca-with-trust-manager"
    );
    assert_eq!(
        slug("Who may connect: allow patterns"),
        "who-may-connect-allow-patterns"
    );
    assert_eq!(
        link_targets("see [a](x.md#y \"t\"), ![i](img.png) and [b](https://e.org/(z))"),
        ["x.md#y", "img.png", "https://e.org/(z)"]
    );
    assert_eq!(link_targets("[ref]: <docs/cli.md>"), ["docs/cli.md"]);
    assert!(is_external("https://cert-manager.io") && !is_external("docs/cli.md#flags"));

    let doc = "# Top\n## Twice\n## Twice\n`[no](nowhere.md)`\n```\n[no](nowhere.md)\n```\n\
               [ok](#top) [ok](#twice-1) [ok](README.md) [bad](#nope) [bad](missing.md)\n";
    let file = root().join("README.md");
    let problems = broken_links(&file, doc);
    assert_eq!(problems.len(), 2, "{problems:#?}");
    assert!(
        problems[0].contains("#nope") && problems[1].contains("missing.md"),
        "{problems:#?}"
    );
}

/// The help-block parser: finds a marked block and its exact body, refuses an unclosed one.
#[test]
fn help_block_parser_finds_the_body_after_each_marker() {
    let doc = "intro\n<!-- help: proxy -->\n```text\nUsage: x\n\nmore\n```\nafter\n";
    let blocks = help_blocks(doc).unwrap();
    assert_eq!(blocks.len(), 1);
    assert_eq!(blocks[0].key, "proxy");
    assert_eq!(&doc[blocks[0].body.clone()], "Usage: x\n\nmore\n");
    assert!(help_blocks("<!-- help: demo -->\n```text\nnever closed\n").is_err());
    assert!(help_blocks("<!-- help: demo -->\nno fence\n").is_err());
    assert_eq!(
        subcommands("x\n\nCommands:\n  proxy  P\n  demo   D\n  help   H\n\nOptions:\n"),
        ["proxy", "demo"]
    );
}
