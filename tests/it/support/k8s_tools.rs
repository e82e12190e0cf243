//! Installs and locates the Kubernetes tool chain the chart tests need (helm, kubernetes-validate,
//! hadolint, the npm schema validators, a CEL evaluator): runs `scripts/k8s-tools.sh` once per test process (it is
//! idempotent, takes a lock, and returns at once when everything is in place) and hands out the
//! paths, plus helpers to run helm and the project's manifest validator.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::OnceLock;

/// Where the tools are and how to run them.
pub struct K8sTools {
    /// The repository root.
    pub root: PathBuf,
    /// The tool folder (`.tools/k8s`, or `$WSGATE_K8S_TOOLS_DIR`).
    pub dir: PathBuf,
    pub helm: PathBuf,
    pub hadolint: PathBuf,
    /// The venv's python: kubernetes-validate, jsonschema, PyYAML, cel-expr-python.
    pub python: PathBuf,
    /// node_modules with @kubernetes-models/{cert-manager,prometheus-operator}.
    pub node_modules: PathBuf,
}

/// The tool chain, installed on first use.
pub fn tools() -> &'static K8sTools {
    static TOOLS: OnceLock<K8sTools> = OnceLock::new();
    TOOLS.get_or_init(|| {
        let root = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
        let dir = std::env::var_os("WSGATE_K8S_TOOLS_DIR")
            .map(PathBuf::from)
            .unwrap_or_else(|| root.join(".tools/k8s"));
        let out = Command::new("bash")
            .arg(root.join("scripts/k8s-tools.sh"))
            .arg(&dir)
            .output()
            .expect("running scripts/k8s-tools.sh");
        assert!(
            out.status.success(),
            "scripts/k8s-tools.sh {} failed ({}):\n{}{}",
            dir.display(),
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        K8sTools {
            helm: dir.join("bin/helm"),
            hadolint: dir.join("bin/hadolint"),
            python: dir.join("venv/bin/python"),
            node_modules: dir.join("node/node_modules"),
            root,
            dir,
        }
    })
}

/// What a finished command said.
pub struct Ran {
    pub ok: bool,
    pub stdout: String,
    pub stderr: String,
}

impl Ran {
    fn from(out: Output) -> Self {
        Self {
            ok: out.status.success(),
            stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        }
    }
}

impl K8sTools {
    /// A path in the repository.
    pub fn path(&self, rel: &str) -> PathBuf {
        self.root.join(rel)
    }

    /// Runs `program` in the repository root, feeding it `stdin`.
    pub fn run(&self, program: &Path, args: &[&str], stdin: &str, env: &[(&str, &Path)]) -> Ran {
        let mut cmd = Command::new(program);
        cmd.args(args)
            .current_dir(&self.root)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        // helm keeps caches and config under these; keep them out of $HOME.
        for (var, sub) in [
            ("HELM_CACHE_HOME", "cache"),
            ("HELM_CONFIG_HOME", "config"),
            ("HELM_DATA_HOME", "data"),
        ] {
            cmd.env(var, self.dir.join("helm-home").join(sub));
        }
        for (k, v) in env {
            cmd.env(k, v);
        }
        let mut child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("starting {}: {e}", program.display()));
        let mut pipe = child.stdin.take().unwrap();
        let input = stdin.to_owned();
        let writer = std::thread::spawn(move || {
            let _ = pipe.write_all(input.as_bytes());
        });
        let out = child.wait_with_output().unwrap();
        writer.join().unwrap();
        Ran::from(out)
    }

    /// Runs helm.
    pub fn helm(&self, args: &[&str]) -> Ran {
        self.run(&self.helm, args, "", &[])
    }

    /// Multi-document YAML as a JSON array of its (non-empty) documents.
    pub fn yaml_docs(&self, yaml: &str) -> Vec<serde_json::Value> {
        let ran = self.run(
            &self.python,
            &[
                "-c",
                "import json, sys, yaml; \
                 json.dump([d for d in yaml.safe_load_all(sys.stdin) if d is not None], sys.stdout)",
            ],
            yaml,
            &[],
        );
        assert!(ran.ok, "YAML does not parse:\n{}", ran.stderr);
        match serde_json::from_str(&ran.stdout).unwrap() {
            serde_json::Value::Array(docs) => docs,
            other => panic!("expected a list of documents, got {other}"),
        }
    }

    /// Runs scripts/validate-manifests.py (strict, with --require-namespace) on `files` (or on
    /// `stdin` when `files` is `["-"]`) for the Kubernetes `versions`.
    pub fn validate(&self, files: &[&str], stdin: &str, versions: &[&str]) -> Ran {
        let script = self.path("scripts/validate-manifests.py");
        let node_modules = self.node_modules.to_string_lossy().into_owned();
        let mut args = vec![
            script.to_str().unwrap(),
            "--require-namespace",
            "--node-modules",
            &node_modules,
        ];
        for v in versions {
            args.extend_from_slice(&["-k", v]);
        }
        args.extend_from_slice(files);
        self.run(&self.python, &args, stdin, &[])
    }
    /// Evaluates approver-policy validation `rules` (CEL) for each request `(self, cr)` with
    /// scripts/eval-cel.py (cel-expr-python, CEL's C++ implementation with RE2, in approver-policy's
    /// environment): per rule, per request, its value, or why it has none (it does not compile,
    /// is not a bool, or failed to evaluate).
    pub fn eval_cel(&self, rules: &[&str], requests: &[(&str, serde_json::Value)]) -> Vec<Vec<Result<bool, String>>> {
        let requests: Vec<_> = requests
            .iter()
            .map(|(value, cr)| serde_json::json!({"self": value, "cr": cr}))
            .collect();
        let job = serde_json::json!({"rules": rules, "requests": requests});
        let script = self.path("scripts/eval-cel.py");
        let ran = self.run(&self.python, &[script.to_str().unwrap()], &job.to_string(), &[]);
        assert!(ran.ok, "scripts/eval-cel.py failed:\n{}", ran.stderr);
        let out: Vec<Vec<serde_json::Value>> = serde_json::from_str(&ran.stdout).unwrap();
        out.into_iter()
            .map(|per_rule| {
                per_rule
                    .into_iter()
                    .map(|v| match v {
                        serde_json::Value::Bool(b) => Ok(b),
                        other => Err(other.as_str().map_or_else(|| other.to_string(), str::to_owned)),
                    })
                    .collect()
            })
            .collect()
    }
}
