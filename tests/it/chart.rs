//! Helm chart, plain manifests and Dockerfile checks (rendered with helm, validated offline).
//!
//! The chart is rendered with real helm for a matrix of value sets (`charts/wsgate/ci/`), and the
//! objects are checked twice: against the Kubernetes / cert-manager / trust-manager / Prometheus
//! Operator schemas (scripts/validate-manifests.py, strict), and here, for what the schemas cannot
//! know: RBAC is exactly what the injector calls, the webhooks never see kube-system, the release
//! namespace or the injector itself, CA certificates are never re-keyed, every container is
//! hardened. The example's scripts run against the real `wsgate proxy`.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::time::Duration;

use serde_json::{Value, json};

use crate::support::bin::Proc;
use crate::support::k8s_tools::tools;
use crate::support::{LeafSpec, Pki, SecretVolume, write_set};

const CHART: &str = "charts/wsgate";
const RELEASE: &str = "wsgate";
const NAMESPACE: &str = "wsgate-system";
/// The Kubernetes versions every object must be valid for: the oldest the chart claims
/// (kubeVersion >=1.25), the first with native sidecars on by default, and a current one.
const KUBE_VERSIONS: [&str; 3] = ["1.25", "1.29", "1.34"];
/// The value sets of the matrix, all in charts/wsgate/ci/.
const MATRIX: [&str; 6] = [
    "defaults",
    "own-issuer",
    "no-cert-manager",
    "trust-manager",
    "monitoring",
    "native-sidecar-off",
];

// ------------------------------------------------------------------------------------------------
// Rendering helpers

fn ci_values(name: &str) -> String {
    format!("{CHART}/ci/{name}-values.yaml")
}

/// approver-policy's API: the default values need it (the workload issuer's approval policy), so
/// every render passes `--api-versions` with it unless it tests the render without it.
const POLICY_API: &str = "policy.cert-manager.io/v1alpha1";

/// `helm template` with extra arguments (on a cluster serving approver-policy's API); Err(stderr)
/// when helm refuses.
fn try_render(args: &[&str]) -> Result<Vec<Value>, String> {
    let mut all = vec!["--api-versions", POLICY_API];
    all.extend_from_slice(args);
    try_render_bare(&all)
}

/// `helm template` with extra arguments only (no approver-policy API).
fn try_render_bare(args: &[&str]) -> Result<Vec<Value>, String> {
    let t = tools();
    let mut all = vec!["template", RELEASE, CHART];
    if !args.contains(&"--namespace") {
        all.extend_from_slice(&["--namespace", NAMESPACE]);
    }
    all.extend_from_slice(args);
    let ran = t.helm(&all);
    if !ran.ok {
        return Err(ran.stderr);
    }
    Ok(t.yaml_docs(&ran.stdout))
}

fn render(args: &[&str]) -> Vec<Value> {
    try_render(args).unwrap_or_else(|e| panic!("helm template {args:?} failed:\n{e}"))
}

fn render_ci(name: &str) -> Vec<Value> {
    render(&["-f", &ci_values(name)])
}

fn of_kind<'a>(docs: &'a [Value], kind: &str) -> Vec<&'a Value> {
    docs.iter().filter(|d| d["kind"] == kind).collect()
}

fn one<'a>(docs: &'a [Value], kind: &str) -> &'a Value {
    let found = of_kind(docs, kind);
    assert_eq!(found.len(), 1, "expected exactly one {kind}, got {}", found.len());
    found[0]
}

fn named<'a>(docs: &'a [Value], kind: &str, name: &str) -> &'a Value {
    docs.iter()
        .find(|d| d["kind"] == kind && d["metadata"]["name"] == name)
        .unwrap_or_else(|| panic!("no {kind} named {name}"))
}

fn str_of(v: &Value) -> &str {
    v.as_str().unwrap_or_else(|| panic!("expected a string, got {v}"))
}

fn labels(v: &Value) -> BTreeMap<String, String> {
    v.as_object()
        .map(|m| m.iter().map(|(k, v)| (k.clone(), str_of(v).to_owned())).collect())
        .unwrap_or_default()
}

fn injector_container(docs: &[Value]) -> &Value {
    let deploy = named(docs, "Deployment", RELEASE);
    let containers = deploy["spec"]["template"]["spec"]["containers"].as_array().unwrap();
    containers
        .iter()
        .find(|c| c["name"] == "injector")
        .expect("injector container")
}

fn env_of(container: &Value) -> BTreeMap<String, String> {
    container["env"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| (str_of(&e["name"]).to_owned(), str_of(&e["value"]).to_owned()))
        .collect()
}

/// Does a Kubernetes label selector (matchLabels + matchExpressions) select these labels?
fn selects(selector: &Value, labels: &BTreeMap<String, String>) -> bool {
    let by_labels = selector["matchLabels"]
        .as_object()
        .into_iter()
        .flatten()
        .all(|(k, v)| labels.get(k).map(String::as_str) == v.as_str());
    let by_expressions = selector["matchExpressions"].as_array().into_iter().flatten().all(|e| {
        let key = str_of(&e["key"]);
        let values: Vec<&str> = e["values"].as_array().into_iter().flatten().map(str_of).collect();
        let have = labels.get(key).map(String::as_str);
        match str_of(&e["operator"]) {
            "In" => have.is_some_and(|v| values.contains(&v)),
            "NotIn" => have.is_none_or(|v| !values.contains(&v)),
            "Exists" => have.is_some(),
            "DoesNotExist" => have.is_none(),
            op => panic!("unknown selector operator {op}"),
        }
    });
    by_labels && by_expressions
}

/// Namespace labels as the API server sets them (kubernetes.io/metadata.name since 1.21).
fn namespace_labels(name: &str, extra: &[(&str, &str)]) -> BTreeMap<String, String> {
    let mut l = BTreeMap::from([("kubernetes.io/metadata.name".to_owned(), name.to_owned())]);
    l.extend(extra.iter().map(|(k, v)| ((*k).to_owned(), (*v).to_owned())));
    l
}

/// Every pod spec in these objects (Deployments, Pods), with where it came from.
fn pod_specs(docs: &[Value]) -> Vec<(String, &Value)> {
    let mut out = Vec::new();
    for d in docs {
        let what = format!("{}/{}", str_of(&d["kind"]), str_of(&d["metadata"]["name"]));
        match str_of(&d["kind"]) {
            "Deployment" | "StatefulSet" | "DaemonSet" | "Job" | "ReplicaSet" => {
                out.push((what, &d["spec"]["template"]["spec"]))
            }
            "Pod" => out.push((what, &d["spec"])),
            _ => {}
        }
    }
    out
}

fn read(rel: &str) -> String {
    std::fs::read_to_string(tools().path(rel)).unwrap_or_else(|e| panic!("reading {rel}: {e}"))
}

// ------------------------------------------------------------------------------------------------
// helm lint and schema validation over the matrix

#[test]
fn chart_passes_helm_lint_strict_with_every_ci_values_file() {
    let t = tools();
    let mut files: Vec<String> = std::fs::read_dir(t.path(&format!("{CHART}/ci")))
        .unwrap()
        .map(|e| format!("{CHART}/ci/{}", e.unwrap().file_name().to_string_lossy()))
        .collect();
    files.sort();
    for name in MATRIX {
        assert!(files.contains(&ci_values(name)), "the matrix needs {}", ci_values(name));
    }
    for f in &files {
        // helm lint has no --api-versions: without approver-policy's API the default values fail
        // on purpose (approval_policy_* tests), so lint renders with approval=open.
        let ran = t.helm(&["lint", "--strict", CHART, "-f", f, "--set", "certManager.approval=open"]);
        assert!(
            ran.ok,
            "helm lint --strict -f {f} failed:\n{}{}",
            ran.stdout, ran.stderr
        );
        assert!(ran.stdout.contains("0 chart(s) failed"), "{}", ran.stdout);
    }
}

/// Renders a matrix value set and validates every object strictly for every Kubernetes version;
/// returns the validator's report.
fn assert_matrix_entry_valid(name: &str) -> String {
    let t = tools();
    let ran = t.helm(&[
        "template",
        RELEASE,
        CHART,
        "--namespace",
        NAMESPACE,
        "--api-versions",
        POLICY_API,
        "-f",
        &ci_values(name),
    ]);
    assert!(ran.ok, "helm template -f {} failed:\n{}", ci_values(name), ran.stderr);
    let report = t.validate(&["-"], &ran.stdout, &KUBE_VERSIONS);
    assert!(
        report.ok,
        "{name}: objects are not valid:\n{}{}",
        report.stdout, report.stderr
    );
    let objects = t.yaml_docs(&ran.stdout).len();
    assert!(
        report.stdout.contains(&format!("{objects} valid, 0 invalid")),
        "{name}: expected all {objects} objects checked:\n{}",
        report.stdout
    );
    report.stdout
}

#[test]
fn defaults_render_objects_valid_for_kubernetes_1_25_1_29_and_1_34() {
    let report = assert_matrix_entry_valid("defaults");
    for kind in [
        "Deployment",
        "MutatingWebhookConfiguration",
        "ClusterRole",
        "PodDisruptionBudget",
        "NetworkPolicy",
    ] {
        assert!(report.contains(&format!(" {kind}/")), "{kind} missing:\n{report}");
    }
    // cert-manager objects are checked against cert-manager's CRDs, not skipped.
    for kind in ["Certificate", "Issuer", "ClusterIssuer", "CertificateRequestPolicy"] {
        assert!(
            report
                .lines()
                .any(|l| l.contains(&format!(" {kind}/")) && l.contains("CRD ")),
            "{kind} not validated against its CRD:\n{report}"
        );
    }
}

#[test]
fn own_issuer_renders_valid_objects() {
    assert_matrix_entry_valid("own-issuer");
}

#[test]
fn no_cert_manager_renders_valid_objects() {
    assert_matrix_entry_valid("no-cert-manager");
}

#[test]
fn trust_manager_renders_a_valid_bundle() {
    let report = assert_matrix_entry_valid("trust-manager");
    assert!(
        report.lines().any(|l| l.starts_with("OK") && l.contains(" Bundle/")),
        "the Bundle was not validated:\n{report}"
    );
}

#[test]
fn monitoring_renders_valid_prometheus_operator_objects_and_network_policy() {
    let report = assert_matrix_entry_valid("monitoring");
    for kind in ["ServiceMonitor", "PodMonitor", "PrometheusRule", "NetworkPolicy"] {
        assert!(
            report
                .lines()
                .any(|l| l.starts_with("OK") && l.contains(&format!(" {kind}/"))),
            "{kind} was not validated:\n{report}"
        );
    }
}

#[test]
fn native_sidecar_off_renders_valid_objects() {
    assert_matrix_entry_valid("native-sidecar-off");
}

#[test]
fn validator_reports_every_invalid_object() {
    // One mistake per object; a validator that lets any of them through is not checking anything.
    let t = tools();
    let file = "tests/data/k8s/invalid-objects.yaml";
    let docs = t.yaml_docs(&read(file));
    let report = t.validate(&[file], "", &KUBE_VERSIONS);
    assert!(!report.ok, "the validator accepted invalid objects:\n{}", report.stdout);
    assert!(
        report.stdout.contains(&format!("0 valid, {} invalid", docs.len())),
        "{}",
        report.stdout
    );
    for d in &docs {
        let what = format!("{}/{}:", str_of(&d["kind"]), str_of(&d["metadata"]["name"]));
        assert!(
            report
                .stdout
                .lines()
                .any(|l| l.starts_with("ERROR") && l.contains(&what)),
            "{what} was not reported:\n{}",
            report.stdout
        );
    }
}

// ------------------------------------------------------------------------------------------------
// RBAC and the webhook configuration

/// (apiGroup, resource) -> verbs, from a ClusterRole; fails on anything but plain resource rules.
fn rules_of(role: &Value) -> BTreeMap<(String, String), BTreeSet<String>> {
    let mut out = BTreeMap::new();
    for rule in role["rules"].as_array().unwrap() {
        let keys: BTreeSet<&str> = rule.as_object().unwrap().keys().map(String::as_str).collect();
        assert_eq!(
            keys,
            BTreeSet::from(["apiGroups", "resources", "verbs"]),
            "rule with resourceNames, nonResourceURLs or the like: {rule}"
        );
        for group in rule["apiGroups"].as_array().unwrap() {
            for resource in rule["resources"].as_array().unwrap() {
                let verbs = out
                    .entry((str_of(group).to_owned(), str_of(resource).to_owned()))
                    .or_insert_with(BTreeSet::new);
                verbs.extend(rule["verbs"].as_array().unwrap().iter().map(|v| str_of(v).to_owned()));
            }
        }
    }
    out
}

fn rule_set(entries: &[(&str, &str, &[&str])]) -> BTreeMap<(String, String), BTreeSet<String>> {
    entries
        .iter()
        .map(|(g, r, verbs)| {
            (
                (g.to_string(), r.to_string()),
                verbs.iter().map(|v| v.to_string()).collect(),
            )
        })
        .collect()
}

#[test]
fn rbac_verbs_are_exactly_what_the_injector_calls() {
    let docs = render(&[]);
    // Cluster-wide and nothing namespaced: no Role can widen or hide anything.
    assert!(of_kind(&docs, "Role").is_empty() && of_kind(&docs, "RoleBinding").is_empty());
    // What `wsgate inject` calls (docs/injector.md): the certificate controller's watch of
    // injected pods, a get of each one's ServiceAccount (the Certificate's owner), and a
    // server-side apply of the Certificate (a patch that may create; a get first), Events on pods
    // (create, patch), never anything on Secrets; with
    // nativeSidecar=auto (the default), a list of nodes for their kubelet versions. /version is
    // open to every client and needs no rule.
    let role = named(&docs, "ClusterRole", RELEASE);
    assert_eq!(
        rules_of(role),
        rule_set(&[
            ("", "nodes", &["list"]),
            ("", "pods", &["list", "watch"]),
            ("", "serviceaccounts", &["get"]),
            ("cert-manager.io", "certificates", &["get", "create", "patch"]),
            ("events.k8s.io", "events", &["create", "patch"]),
        ])
    );
    // A fixed native-sidecar mode needs no node list.
    let fixed = render(&["--set", "sidecar.nativeSidecar=off"]);
    assert_eq!(
        rules_of(named(&fixed, "ClusterRole", RELEASE)),
        rule_set(&[
            ("", "pods", &["list", "watch"]),
            ("", "serviceaccounts", &["get"]),
            ("cert-manager.io", "certificates", &["get", "create", "patch"]),
            ("events.k8s.io", "events", &["create", "patch"]),
        ])
    );
    // Bound to the ServiceAccount the injector runs as, and only to it.
    let binding = named(&docs, "ClusterRoleBinding", RELEASE);
    assert_eq!(
        binding["roleRef"],
        json!({"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": role["metadata"]["name"]})
    );
    let sa = one(&docs, "ServiceAccount");
    let deploy = named(&docs, "Deployment", RELEASE);
    assert_eq!(
        deploy["spec"]["template"]["spec"]["serviceAccountName"],
        sa["metadata"]["name"]
    );
    assert_eq!(
        binding["subjects"],
        json!([{"kind": "ServiceAccount", "name": sa["metadata"]["name"], "namespace": NAMESPACE}])
    );

    // Without the certificate controller and with a fixed native-sidecar mode, the injector
    // calls nothing that needs a rule.
    let docs = render(&[
        "--set",
        "injector.certificateController=false",
        "--set",
        "sidecar.nativeSidecar=off",
    ]);
    // (The only ClusterRole left is approver-policy's `use` of the issuer's policy, bound to
    // cert-manager: approval_policy_guards_the_workload_issuer.)
    for kind in ["ClusterRole", "ClusterRoleBinding"] {
        let names: Vec<&str> = of_kind(&docs, kind)
            .iter()
            .map(|d| str_of(&d["metadata"]["name"]))
            .collect();
        assert_eq!(names, ["wsgate-ca-policy-use"], "{kind}");
    }
    assert_eq!(
        env_of(injector_container(&docs))["WSGATE_CERTIFICATE_CONTROLLER"],
        "false"
    );
}

#[test]
fn webhooks_never_see_kube_system_the_release_namespace_or_the_injector() {
    let ns = "platform-wsgate";
    let docs = render(&["--namespace", ns, "--set", "webhook.excludeNamespaces={monitoring}"]);
    let mwc = one(&docs, "MutatingWebhookConfiguration");
    let hooks = mwc["webhooks"].as_array().unwrap();
    assert_eq!(hooks.len(), 2);
    let by_path = |path: &str| {
        hooks
            .iter()
            .find(|h| h["clientConfig"]["service"]["path"] == path)
            .unwrap_or_else(|| panic!("no webhook for {path}"))
    };
    let enabled_hook = by_path("/mutate/namespace-enabled");
    let opt_in_hook = by_path("/mutate");
    let enabled = [("wsgate.dev/injection", "enabled")];

    for hook in [enabled_hook, opt_in_hook] {
        let sel = &hook["namespaceSelector"];
        // Never, whatever their labels say.
        for never in ["kube-system", ns, "monitoring"] {
            for extra in [&enabled[..], &[]] {
                assert!(
                    !selects(sel, &namespace_labels(never, extra)),
                    "{} sees {never} {extra:?}",
                    hook["name"]
                );
            }
        }
        // The injector's own pods never reach it; an ordinary pod does.
        let deploy = named(&docs, "Deployment", RELEASE);
        let injector_pod = labels(&deploy["spec"]["template"]["metadata"]["labels"]);
        assert!(
            !selects(&hook["objectSelector"], &injector_pod),
            "{} sees the injector's pods",
            hook["name"]
        );
        let app_pod = BTreeMap::from([("app".to_owned(), "shop".to_owned())]);
        assert!(selects(&hook["objectSelector"], &app_pod));
    }
    // A labelled namespace goes to the namespace-enabled webhook only, any other to the opt-in one.
    assert!(selects(
        &enabled_hook["namespaceSelector"],
        &namespace_labels("shop", &enabled)
    ));
    assert!(!selects(
        &opt_in_hook["namespaceSelector"],
        &namespace_labels("shop", &enabled)
    ));
    assert!(!selects(
        &enabled_hook["namespaceSelector"],
        &namespace_labels("default", &[])
    ));
    assert!(selects(
        &opt_in_hook["namespaceSelector"],
        &namespace_labels("default", &[])
    ));
    // Only "enabled" is special: pods of a namespace labelled otherwise may still opt in one by one.
    let disabled = [("wsgate.dev/injection", "disabled")];
    assert!(selects(
        &opt_in_hook["namespaceSelector"],
        &namespace_labels("legacy", &disabled)
    ));
}

#[test]
fn webhooks_never_see_cert_managers_namespace() {
    let enabled = [("wsgate.dev/injection", "enabled")];
    // cert-manager issues the injector's serving certificate: its pods must never wait for the
    // injector, whatever their namespace's labels say.
    for (args, cm) in [
        (&[][..], "cert-manager"),
        (&["--set", "certManager.namespace=security"][..], "security"),
        // Already excluded another way: listed once.
        (&["--set", "certManager.namespace=kube-system"][..], "kube-system"),
    ] {
        let docs = render(args);
        for hook in one(&docs, "MutatingWebhookConfiguration")["webhooks"]
            .as_array()
            .unwrap()
        {
            let sel = &hook["namespaceSelector"];
            for extra in [&enabled[..], &[]] {
                assert!(
                    !selects(sel, &namespace_labels(cm, extra)),
                    "{} sees {cm} {extra:?}",
                    hook["name"]
                );
            }
            let names = sel["matchExpressions"]
                .as_array()
                .unwrap()
                .iter()
                .find(|e| e["key"] == "kubernetes.io/metadata.name")
                .unwrap()["values"]
                .as_array()
                .unwrap();
            let unique: BTreeSet<&str> = names.iter().map(str_of).collect();
            assert_eq!(unique.len(), names.len(), "duplicates in {names:?}");
            for always in ["kube-system", NAMESPACE, cm] {
                assert!(unique.contains(always), "{always} not excluded: {names:?}");
            }
        }
    }
    // Even without cert-manager objects in the chart: cert-manager may still run there.
    let docs = render_ci("no-cert-manager");
    for hook in one(&docs, "MutatingWebhookConfiguration")["webhooks"]
        .as_array()
        .unwrap()
    {
        assert!(!selects(
            &hook["namespaceSelector"],
            &namespace_labels("cert-manager", &enabled)
        ));
    }
}

#[test]
fn webhook_configuration_follows_the_admission_contract() {
    let docs = render(&[]);
    let mwc = one(&docs, "MutatingWebhookConfiguration");
    let service = one(&docs, "Service");
    let container = injector_container(&docs);
    let env = env_of(container);
    for hook in mwc["webhooks"].as_array().unwrap() {
        assert_eq!(hook["sideEffects"], "None");
        assert_eq!(hook["admissionReviewVersions"], json!(["v1"]));
        assert_eq!(hook["reinvocationPolicy"], "IfNeeded");
        assert_eq!(hook["timeoutSeconds"], 10);
        assert_eq!(
            hook["rules"],
            json!([{"operations": ["CREATE"], "apiGroups": [""], "apiVersions": ["v1"], "resources": ["pods"], "scope": "Namespaced"}])
        );
        let svc = &hook["clientConfig"]["service"];
        assert_eq!(svc["name"], service["metadata"]["name"]);
        assert_eq!(svc["namespace"], NAMESPACE);
        assert_eq!(svc["port"], 443);
        assert!(
            hook["clientConfig"].get("caBundle").is_none(),
            "cainjector fills the caBundle"
        );
    }
    let policy = |docs: &[Value], path: &str| {
        one(docs, "MutatingWebhookConfiguration")["webhooks"]
            .as_array()
            .unwrap()
            .iter()
            .find(|h| h["clientConfig"]["service"]["path"] == path)
            .map(|h| (h["failurePolicy"].clone(), h["timeoutSeconds"].clone()))
            .unwrap()
    };
    assert_eq!(policy(&docs, "/mutate/namespace-enabled"), (json!("Fail"), json!(10)));
    assert_eq!(policy(&docs, "/mutate"), (json!("Ignore"), json!(10)));
    let swapped = render(&[
        "--set",
        "webhook.failurePolicy.namespaceEnabled=Ignore,webhook.failurePolicy.podOptIn=Fail,webhook.timeoutSeconds=7",
    ]);
    assert_eq!(
        policy(&swapped, "/mutate/namespace-enabled"),
        (json!("Ignore"), json!(7))
    );
    assert_eq!(policy(&swapped, "/mutate"), (json!("Fail"), json!(7)));

    // Service 443 -> the container port the injector listens on.
    let https = service["spec"]["ports"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["port"] == 443)
        .unwrap();
    let port = container["ports"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["name"] == https["targetPort"])
        .unwrap();
    assert_eq!(env["WSGATE_LISTEN"], format!("0.0.0.0:{}", port["containerPort"]));
    assert!(selects(
        &json!({"matchLabels": service["spec"]["selector"]}),
        &labels(&named(&docs, "Deployment", RELEASE)["spec"]["template"]["metadata"]["labels"])
    ));

    // cainjector's source: the serving Certificate, valid for the Service's name, whose Secret is
    // the directory the injector reads (mounted whole, never with subPath).
    let source = str_of(&mwc["metadata"]["annotations"]["cert-manager.io/inject-ca-from"]);
    let (cert_ns, cert_name) = source.split_once('/').unwrap();
    assert_eq!(cert_ns, NAMESPACE);
    let cert = named(&docs, "Certificate", cert_name);
    let svc_name = str_of(&service["metadata"]["name"]);
    let dns: Vec<&str> = cert["spec"]["dnsNames"]
        .as_array()
        .unwrap()
        .iter()
        .map(str_of)
        .collect();
    assert!(dns.contains(&format!("{svc_name}.{NAMESPACE}.svc").as_str()), "{dns:?}");
    let pod = &named(&docs, "Deployment", RELEASE)["spec"]["template"]["spec"];
    let mount = container["volumeMounts"]
        .as_array()
        .unwrap()
        .iter()
        .find(|m| m["mountPath"] == env["WSGATE_CERT_DIR"].as_str())
        .expect("the cert dir is mounted");
    assert!(mount.get("subPath").is_none());
    let volume = pod["volumes"]
        .as_array()
        .unwrap()
        .iter()
        .find(|v| v["name"] == mount["name"])
        .unwrap();
    assert_eq!(volume["secret"]["secretName"], cert["spec"]["secretName"]);
}

// ------------------------------------------------------------------------------------------------
// cert-manager wiring

#[test]
fn ca_certificates_are_never_rekeyed() {
    let docs = render(&[]);
    let certs = of_kind(&docs, "Certificate");
    let cas: Vec<&&Value> = certs.iter().filter(|c| c["spec"]["isCA"] == true).collect();
    assert_eq!(cas.len(), 2, "the webhook CA and the workload CA");
    for ca in &cas {
        assert_eq!(
            ca["spec"]["privateKey"]["rotationPolicy"], "Never",
            "{}",
            ca["metadata"]["name"]
        );
        // Issued by a self-signed bootstrap Issuer in its own namespace.
        let issuer = &ca["spec"]["issuerRef"];
        assert_eq!(issuer["kind"], "Issuer");
        let bootstrap = docs
            .iter()
            .find(|d| {
                d["kind"] == "Issuer"
                    && d["metadata"]["name"] == issuer["name"]
                    && d["metadata"]["namespace"] == ca["metadata"]["namespace"]
            })
            .expect("bootstrap issuer");
        assert_eq!(bootstrap["spec"], json!({"selfSigned": {}}));
    }
    // Leaves are re-keyed at every renewal.
    for leaf in certs.iter().filter(|c| c["spec"]["isCA"] != true) {
        assert_eq!(leaf["spec"]["privateKey"]["rotationPolicy"], "Always");
    }

    // The workload CA: a ClusterIssuer reads its Secret from cert-manager's cluster resource
    // namespace, so the CA Certificate must live there.
    let ci = one(&docs, "ClusterIssuer");
    let secret = &ci["spec"]["ca"]["secretName"];
    let workload_ca = cas
        .iter()
        .find(|c| &c["spec"]["secretName"] == secret)
        .expect("the ClusterIssuer's CA");
    assert_eq!(workload_ca["metadata"]["namespace"], "cert-manager");
    let moved = render(&["--set", "certManager.clusterResourceNamespace=security"]);
    let ca = moved
        .iter()
        .find(|d| d["kind"] == "Certificate" && d["spec"]["secretName"] == *secret)
        .unwrap();
    assert_eq!(ca["metadata"]["namespace"], "security");
}

#[test]
fn workload_ca_survives_helm_uninstall() {
    let docs = render(&[]);
    let secret = &one(&docs, "ClusterIssuer")["spec"]["ca"]["secretName"];
    let kept = |d: &Value| d["metadata"]["annotations"]["helm.sh/resource-policy"] == "keep";
    // The root every sidecar trusts: an uninstall must not delete it (nor, through cert-manager's
    // owner references, its Secret), or a reinstall starts a CA no running sidecar trusts.
    let ca = of_kind(&docs, "Certificate")
        .into_iter()
        .find(|c| c["spec"]["isCA"] == true && &c["spec"]["secretName"] == secret)
        .expect("the workload CA Certificate");
    assert!(kept(ca), "{}", ca["metadata"]);
    // cert-manager writes the CA Secret; should the chart ever render it, it must be kept too.
    for s in of_kind(&docs, "Secret") {
        if &s["metadata"]["name"] == secret {
            assert!(kept(s), "the CA Secret {}", s["metadata"]);
        }
    }
    // The webhook CA belongs to this release's webhook configuration, which the uninstall
    // deletes anyway: nothing outside the release trusts it, so it goes with the release.
    let webhook_ca = named(&docs, "Certificate", &format!("{RELEASE}-webhook-ca"));
    assert!(!kept(webhook_ca), "{}", webhook_ca["metadata"]);
    // No workload CA of the chart's, nothing to keep.
    let own = render_ci("own-issuer");
    assert!(!own.iter().any(kept), "own issuer: the chart keeps nothing");
}

#[test]
fn workload_issuer_is_the_one_the_injector_names() {
    // Defaults: the chart's CA ClusterIssuer.
    let docs = render(&[]);
    let env = env_of(injector_container(&docs));
    let ci = one(&docs, "ClusterIssuer");
    assert_eq!(
        (
            &env["WSGATE_ISSUER_NAME"][..],
            &env["WSGATE_ISSUER_KIND"][..],
            &env["WSGATE_ISSUER_GROUP"][..]
        ),
        (str_of(&ci["metadata"]["name"]), "ClusterIssuer", "cert-manager.io")
    );

    // Own issuer: named to the injector; no workload CA rendered.
    let docs = render_ci("own-issuer");
    let env = env_of(injector_container(&docs));
    assert_eq!(env["WSGATE_ISSUER_NAME"], "vault-workloads");
    assert_eq!(env["WSGATE_ISSUER_KIND"], "ClusterIssuer");
    assert!(of_kind(&docs, "ClusterIssuer").is_empty());
    assert_eq!(
        of_kind(&docs, "Certificate").len(),
        2,
        "only the webhook CA and serving certificate"
    );

    // No cert-manager at all: not a single cert-manager object, the caBundle comes from values and
    // the serving certificate from an existing Secret.
    let docs = render_ci("no-cert-manager");
    let cm: Vec<&Value> = docs
        .iter()
        .filter(|d| str_of(&d["apiVersion"]).starts_with("cert-manager.io/"))
        .collect();
    assert!(cm.is_empty(), "cert-manager objects rendered: {cm:?}");
    let mwc = one(&docs, "MutatingWebhookConfiguration");
    assert!(mwc["metadata"].get("annotations").is_none());
    for hook in mwc["webhooks"].as_array().unwrap() {
        assert!(str_of(&hook["clientConfig"]["caBundle"]).starts_with("LS0t"));
    }
    let pod = &named(&docs, "Deployment", RELEASE)["spec"]["template"]["spec"];
    assert_eq!(pod["volumes"][0]["secret"]["secretName"], "wsgate-webhook-tls-manual");
    assert_eq!(env_of(injector_container(&docs))["WSGATE_ISSUER_NAME"], "platform-ca");

    // Without an issuer to name, the chart refuses to render.
    let err = try_render(&["--set", "certManager.workloadIssuer.create=false"]).unwrap_err();
    assert!(err.contains("certManager.issuerRef.name is required"), "{err}");
    let err = try_render(&["--set", "certManager.enabled=false,certManager.issuerRef.name=x"]).unwrap_err();
    assert!(err.contains("webhook.tls.existingSecret is required"), "{err}");
    let err = try_render(&[
        "--set",
        "certManager.enabled=false,certManager.issuerRef.name=x,webhook.tls.existingSecret=s",
    ])
    .unwrap_err();
    assert!(err.contains("webhook.tls.caBundle is required"), "{err}");
}

#[test]
fn trust_bundle_distributes_the_workload_ca() {
    let docs = render_ci("trust-manager");
    let bundle = one(&docs, "Bundle");
    assert!(
        bundle["metadata"].get("namespace").is_none(),
        "Bundles are cluster-scoped"
    );
    let ci = one(&docs, "ClusterIssuer");
    let sources = bundle["spec"]["sources"].as_array().unwrap();
    assert_eq!(
        sources[0],
        json!({"secret": {"name": ci["spec"]["ca"]["secretName"], "key": "ca.crt"}})
    );
    assert!(str_of(&sources[1]["inLine"]).starts_with("-----BEGIN CERTIFICATE-----"));
    assert_eq!(bundle["spec"]["target"]["configMap"], json!({"key": "roots.pem"}));
    // An empty bundle, or the chart's CA when the chart has none, is refused.
    let err = try_render(&[
        "--set",
        "trustManager.enabled=true,trustManager.includeWorkloadCA=false",
    ])
    .unwrap_err();
    assert!(err.contains("would be empty"), "{err}");
    let err = try_render(&["-f", &ci_values("own-issuer"), "--set", "trustManager.enabled=true"]).unwrap_err();
    assert!(err.contains("includeWorkloadCA"), "{err}");
    assert!(of_kind(&render(&[]), "Bundle").is_empty(), "off by default");
}

// ------------------------------------------------------------------------------------------------
// Pods: hardening, availability, what the injector is told

/// Every container (and init container) of every pod spec in `docs` is hardened.
fn assert_hardened(docs: &[Value], source: &str) {
    let specs = pod_specs(docs);
    assert!(!specs.is_empty(), "{source}: no pods");
    for (what, spec) in specs {
        for host in ["hostNetwork", "hostPID", "hostIPC"] {
            assert_ne!(spec[host], true, "{source} {what}: {host}");
        }
        let pod_sc = &spec["securityContext"];
        let containers = spec["containers"].as_array().into_iter().flatten();
        let inits = spec["initContainers"].as_array().into_iter().flatten();
        for c in containers.chain(inits) {
            let at = format!("{source} {what} container {}", c["name"]);
            let sc = &c["securityContext"];
            assert_eq!(sc["runAsNonRoot"], true, "{at}: runAsNonRoot");
            assert!(
                sc["runAsUser"].as_u64().is_some_and(|u| u > 0),
                "{at}: numeric non-root runAsUser"
            );
            assert_eq!(sc["allowPrivilegeEscalation"], false, "{at}: allowPrivilegeEscalation");
            assert_eq!(sc["readOnlyRootFilesystem"], true, "{at}: readOnlyRootFilesystem");
            assert_ne!(sc["privileged"], true, "{at}: privileged");
            assert_eq!(sc["capabilities"]["drop"], json!(["ALL"]), "{at}: capabilities.drop");
            assert!(sc["capabilities"].get("add").is_none(), "{at}: capabilities.add");
            let seccomp = if sc["seccompProfile"].is_null() {
                &pod_sc["seccompProfile"]
            } else {
                &sc["seccompProfile"]
            };
            assert_eq!(seccomp["type"], "RuntimeDefault", "{at}: seccompProfile");
            assert!(c["resources"]["requests"]["memory"].is_string(), "{at}: memory request");
            assert!(c["resources"]["limits"]["memory"].is_string(), "{at}: memory limit");
            for m in c["volumeMounts"].as_array().into_iter().flatten() {
                assert!(m.get("subPath").is_none(), "{at}: subPath mounts never see a renewal");
            }
        }
    }
}

#[test]
fn every_container_is_hardened() {
    for name in MATRIX {
        assert_hardened(&render_ci(name), &ci_values(name));
    }
    let t = tools();
    assert_hardened(
        &t.yaml_docs(&read("manifests/examples/echo.yaml")),
        "manifests/examples/echo.yaml",
    );
    assert_hardened(
        &t.yaml_docs(&read("manifests/install/10-wsgate.yaml")),
        "manifests/install",
    );
}

#[test]
fn injector_is_highly_available_and_probed_on_its_admin_port() {
    let docs = render(&[]);
    let deploy = named(&docs, "Deployment", RELEASE);
    let pod_labels = labels(&deploy["spec"]["template"]["metadata"]["labels"]);
    assert_eq!(deploy["spec"]["replicas"], 2);
    assert_eq!(deploy["spec"]["strategy"]["rollingUpdate"]["maxUnavailable"], 0);
    assert!(selects(&deploy["spec"]["selector"], &pod_labels));

    let spec = &deploy["spec"]["template"]["spec"];

    let c = injector_container(&docs);
    let env = env_of(c);
    let admin = c["ports"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["name"] == "admin")
        .unwrap();
    assert_eq!(env["WSGATE_ADMIN"], format!("0.0.0.0:{}", admin["containerPort"]));
    assert_eq!(admin["containerPort"], 9901);
    assert_eq!(
        c["livenessProbe"]["httpGet"],
        json!({"path": "/healthz", "port": "admin"})
    );
    assert_eq!(
        c["readinessProbe"]["httpGet"],
        json!({"path": "/readyz", "port": "admin"})
    );
    assert_eq!(c["args"], json!(["inject"]));
    assert_eq!(spec["securityContext"]["runAsUser"], 65532);
    assert_eq!(c["securityContext"]["runAsUser"], 65532);
}

fn spread_of<'a>(docs: &'a [Value], key: &str) -> Option<&'a Value> {
    named(docs, "Deployment", RELEASE)["spec"]["template"]["spec"]["topologySpreadConstraints"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["topologyKey"] == key)
}

#[test]
fn topology_spread_honours_taints_and_is_soft_unless_asked_to_be_hard() {
    const NODES: &str = "kubernetes.io/hostname";
    const ZONES: &str = "topology.kubernetes.io/zone";
    let docs = render(&[]);
    let deploy = named(&docs, "Deployment", RELEASE);
    let pod_labels = labels(&deploy["spec"]["template"]["metadata"]["labels"]);
    for key in [NODES, ZONES] {
        let c = spread_of(&docs, key).unwrap_or_else(|| panic!("no spread over {key}"));
        assert_eq!(c["maxSkew"], 1, "{key}");
        // Nodes whose taints the injector does not tolerate are not domains of the spread.
        assert_eq!(c["nodeTaintsPolicy"], "Honor", "{key}");
        // Soft by default: a replica still starts when no other node or zone fits.
        assert_eq!(c["whenUnsatisfiable"], "ScheduleAnyway", "{key}");
        assert!(selects(&c["labelSelector"], &pod_labels), "{key}");
    }
    // Hard spreading only when the values ask for it; taints are honoured then too.
    let hard = render(&[
        "--set",
        "injector.spread.nodes=DoNotSchedule,injector.spread.zones=DoNotSchedule",
    ]);
    for key in [NODES, ZONES] {
        let c = spread_of(&hard, key).unwrap();
        assert_eq!(c["whenUnsatisfiable"], "DoNotSchedule", "{key}");
        assert_eq!(c["nodeTaintsPolicy"], "Honor", "{key}");
    }
    let no_zones = render(&["--set", "injector.spread.zones=Ignore"]);
    assert!(spread_of(&no_zones, NODES).is_some());
    assert!(
        spread_of(&no_zones, ZONES).is_none(),
        "no zone constraint with zones=Ignore"
    );
}

#[test]
fn injector_disruption_budget_exists_only_when_it_cannot_block_a_drain() {
    let docs = render(&[]);
    let deploy = named(&docs, "Deployment", RELEASE);
    let pod_labels = labels(&deploy["spec"]["template"]["metadata"]["labels"]);
    assert_eq!(deploy["spec"]["replicas"], 2);
    let pdb = one(&docs, "PodDisruptionBudget");
    // maxUnavailable, never minAvailable: a drain may always take one replica down.
    assert_eq!(pdb["spec"]["maxUnavailable"], 1);
    assert!(pdb["spec"].get("minAvailable").is_none(), "{}", pdb["spec"]);
    assert!(
        selects(&pdb["spec"]["selector"], &pod_labels),
        "the PDB covers the injector pods"
    );
    // More replicas: still one at a time, or the percentage asked for.
    let three = render(&["--set", "injector.replicas=3"]);
    assert_eq!(one(&three, "PodDisruptionBudget")["spec"]["maxUnavailable"], 1);
    let pct = render(&[
        "--set",
        "injector.replicas=4,injector.podDisruptionBudget.maxUnavailable=50%",
    ]);
    assert_eq!(one(&pct, "PodDisruptionBudget")["spec"]["maxUnavailable"], "50%");
    // A single replica: any budget would block every drain (or protect nothing), so none.
    let single = render(&["--set", "injector.replicas=1"]);
    assert_eq!(named(&single, "Deployment", RELEASE)["spec"]["replicas"], 1);
    assert!(of_kind(&single, "PodDisruptionBudget").is_empty());
    // Switched off, none either.
    let off = render(&["--set", "injector.podDisruptionBudget.enabled=false"]);
    assert!(of_kind(&off, "PodDisruptionBudget").is_empty());
    // A budget of 0 would block drains: the schema refuses it.
    for set in [
        "injector.podDisruptionBudget.maxUnavailable=0",
        "injector.podDisruptionBudget.maxUnavailable=0%",
    ] {
        let err = try_render(&["--set", set]).expect_err(set);
        assert!(
            err.contains("schema") && err.contains("/injector/podDisruptionBudget/maxUnavailable"),
            "--set {set}:\n{err}"
        );
    }
}

/// The ingress rule of a NetworkPolicy that opens exactly this TCP port.
fn ingress_to(policy: &Value, port: u64) -> &Value {
    let rules: Vec<&Value> = policy["spec"]["ingress"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|r| r["ports"].as_array().unwrap().iter().any(|p| p["port"] == port))
        .collect();
    assert_eq!(rules.len(), 1, "one rule for port {port}: {}", policy["spec"]);
    assert_eq!(
        rules[0]["ports"],
        json!([{"port": port, "protocol": "TCP"}]),
        "the rule opens port {port} only"
    );
    rules[0]
}

#[test]
fn network_policy_opens_only_the_webhook_port_to_all_and_metrics_to_the_namespace() {
    let docs = render(&[]);
    let policy = one(&docs, "NetworkPolicy");
    assert_eq!(policy["apiVersion"], "networking.k8s.io/v1");
    assert_eq!(policy["metadata"]["namespace"], NAMESPACE);
    let deploy = named(&docs, "Deployment", RELEASE);
    let pod_labels = labels(&deploy["spec"]["template"]["metadata"]["labels"]);
    assert!(
        selects(&policy["spec"]["podSelector"], &pod_labels),
        "it covers the injector"
    );
    // Ingress only: the injector calls the API server, and that stays open.
    assert_eq!(policy["spec"]["policyTypes"], json!(["Ingress"]));
    // Two rules, two ports: nothing else reaches the injector.
    assert_eq!(policy["spec"]["ingress"].as_array().unwrap().len(), 2);
    let c = injector_container(&docs);
    let port_of = |name: &str| {
        c["ports"]
            .as_array()
            .unwrap()
            .iter()
            .find(|p| p["name"] == name)
            .unwrap()["containerPort"]
            .as_u64()
            .unwrap()
    };
    // The webhook from every source (the API server's addresses differ per cluster).
    let webhook = ingress_to(policy, port_of("webhook"));
    assert!(webhook.get("from").is_none(), "any source by default: {webhook}");
    // The admin port (/metrics) from the release namespace only.
    let admin = ingress_to(policy, port_of("admin"));
    assert_eq!(
        admin["from"],
        json!([{"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": NAMESPACE}}}])
    );

    // Narrowed and widened by the values: the API server's CIDR, Prometheus's namespace.
    let docs = render_ci("monitoring");
    let policy = one(&docs, "NetworkPolicy");
    let webhook = ingress_to(policy, 9443);
    let from = webhook["from"].as_array().unwrap();
    assert_eq!(
        from[0],
        json!({"ipBlock": {"cidr": "10.0.0.0/28", "except": ["10.0.0.8/30"]}})
    );
    // ... and the chart's `helm test` pod, which sends the webhook one review.
    assert_eq!(from.len(), 2, "{from:?}");
    assert_eq!(
        from[1]["podSelector"]["matchLabels"]["app.kubernetes.io/component"],
        "helm-test"
    );
    assert!(from[1].get("namespaceSelector").is_none(), "the release namespace only");
    let admin = ingress_to(policy, 9901);
    let from = admin["from"].as_array().unwrap();
    assert_eq!(from.len(), 2);
    assert_eq!(
        from[1]["namespaceSelector"]["matchLabels"]["kubernetes.io/metadata.name"],
        "monitoring"
    );
    assert!(
        from[1]["podSelector"].is_object(),
        "namespace and pod selector in one peer"
    );

    // Off: none.
    let off = render(&["--set", "networkPolicy.enabled=false"]);
    assert!(of_kind(&off, "NetworkPolicy").is_empty());
    // A peer that is not one: the schema refuses it.
    let err = try_render(&["--set", "networkPolicy.webhookFrom[0].cidr=10.0.0.1/32"]).expect_err("no ipBlock");
    assert!(err.contains("/networkPolicy/webhookFrom/0"), "{err}");
}

/// The environment twins of `wsgate inject`'s flags (and RUST_LOG): all the chart may set.
const INJECTOR_ENV: [&str; 24] = [
    "WSGATE_LISTEN",
    "WSGATE_ADMIN",
    "WSGATE_CERT_DIR",
    "WSGATE_TRUST_DOMAIN",
    "WSGATE_CLUSTER_DOMAIN",
    "WSGATE_SIDECAR_IMAGE",
    "WSGATE_SIDECAR_IMAGE_PULL_POLICY",
    "WSGATE_SIDECAR_CPU_REQUEST",
    "WSGATE_SIDECAR_MEMORY_REQUEST",
    "WSGATE_SIDECAR_CPU_LIMIT",
    "WSGATE_SIDECAR_MEMORY_LIMIT",
    "WSGATE_DEFAULT_ALLOW",
    "WSGATE_NATIVE_SIDECAR",
    "WSGATE_SIDECAR_LOG_FORMAT",
    "WSGATE_OTLP_ENDPOINT",
    "WSGATE_OTLP_PROTOCOL",
    "WSGATE_ISSUER_NAME",
    "WSGATE_ISSUER_KIND",
    "WSGATE_ISSUER_GROUP",
    "WSGATE_CERT_DURATION",
    "WSGATE_CERT_RENEW_BEFORE",
    "WSGATE_CERTIFICATE_CONTROLLER",
    "WSGATE_LOG_FORMAT",
    "RUST_LOG",
];

#[test]
fn sidecar_defaults_reach_the_injector_as_environment() {
    let env = env_of(injector_container(&render(&[])));
    let expected = BTreeMap::from([
        ("WSGATE_TRUST_DOMAIN", "cluster.local"),
        ("WSGATE_SIDECAR_IMAGE", "ghcr.io/wsgate/wsgate:0.1.0"),
        ("WSGATE_SIDECAR_IMAGE_PULL_POLICY", "IfNotPresent"),
        ("WSGATE_SIDECAR_CPU_REQUEST", "50m"),
        ("WSGATE_SIDECAR_MEMORY_REQUEST", "32Mi"),
        ("WSGATE_SIDECAR_CPU_LIMIT", ""),
        ("WSGATE_SIDECAR_MEMORY_LIMIT", "128Mi"),
        ("WSGATE_DEFAULT_ALLOW", "spiffe://{trust-domain}/ns/{namespace}/sa/*"),
        ("WSGATE_NATIVE_SIDECAR", "auto"),
        ("WSGATE_SIDECAR_LOG_FORMAT", "json"),
        ("WSGATE_OTLP_PROTOCOL", "http/protobuf"),
        ("WSGATE_CERT_DURATION", "24h"),
        ("WSGATE_CERT_RENEW_BEFORE", "8h"),
        ("WSGATE_LOG_FORMAT", "json"),
    ]);
    for (k, v) in &expected {
        assert_eq!(env.get(*k).map(String::as_str), Some(*v), "{k}");
    }
    assert!(!env.contains_key("WSGATE_OTLP_ENDPOINT"), "no endpoint: tracing off");
    for k in env.keys() {
        assert!(
            INJECTOR_ENV.contains(&k.as_str()),
            "{k} is not an environment twin of a `wsgate inject` flag"
        );
    }

    // Every value reaches the injector.
    let docs = render_ci("native-sidecar-off");
    let env = env_of(injector_container(&docs));
    let expected = BTreeMap::from([
        ("WSGATE_SIDECAR_IMAGE", "registry.example.com/wsgate/proxy:0.1.0-debug"),
        ("WSGATE_SIDECAR_IMAGE_PULL_POLICY", "Always"),
        ("WSGATE_SIDECAR_CPU_REQUEST", "100m"),
        ("WSGATE_SIDECAR_MEMORY_REQUEST", "64Mi"),
        ("WSGATE_SIDECAR_CPU_LIMIT", "500m"),
        ("WSGATE_SIDECAR_MEMORY_LIMIT", "256Mi"),
        (
            "WSGATE_DEFAULT_ALLOW",
            "spiffe://{trust-domain}/ns/{namespace}/**,spiffe://{trust-domain}/ns/ingress/sa/gateway",
        ),
        ("WSGATE_NATIVE_SIDECAR", "off"),
        ("WSGATE_SIDECAR_LOG_FORMAT", "text"),
        ("WSGATE_OTLP_ENDPOINT", "http://otel-collector.observability:4317"),
        ("WSGATE_OTLP_PROTOCOL", "grpc"),
        ("WSGATE_LOG_FORMAT", "text"),
        ("RUST_LOG", "info,kube=debug"),
    ]);
    for (k, v) in &expected {
        assert_eq!(env.get(*k).map(String::as_str), Some(*v), "{k}");
    }
    // The injector's own image by digest; the sidecar image set on its own.
    let c = injector_container(&docs);
    assert_eq!(
        c["image"],
        "ghcr.io/wsgate/wsgate@sha256:0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef"
    );
    let docs = render(&["-f", &ci_values("own-issuer")]);
    let env = env_of(injector_container(&docs));
    assert_eq!(env["WSGATE_TRUST_DOMAIN"], "prod.example.com");
    assert_eq!(
        (&env["WSGATE_CERT_DURATION"][..], &env["WSGATE_CERT_RENEW_BEFORE"][..]),
        ("48h", "16h")
    );
}

#[test]
fn native_sidecar_on_is_refused_below_kubernetes_1_29() {
    let err = try_render(&["--set", "sidecar.nativeSidecar=on", "--kube-version", "1.28.9"]).unwrap_err();
    assert!(err.contains("needs Kubernetes 1.29"), "{err}");
    let docs = render(&["--set", "sidecar.nativeSidecar=on", "--kube-version", "1.29.0"]);
    assert_eq!(env_of(injector_container(&docs))["WSGATE_NATIVE_SIDECAR"], "on");
    // auto and off work from the oldest version the chart claims; older is refused by kubeVersion.
    render(&["--set", "sidecar.nativeSidecar=auto", "--kube-version", "1.25.0"]);
    let err = try_render(&["--kube-version", "1.24.17"]).unwrap_err();
    assert!(err.contains("kubeVersion"), "{err}");
}

// ------------------------------------------------------------------------------------------------
// helm test

const HELM_TEST: &str = "templates/tests/webhook-test.yaml";

fn is_test_hook(d: &Value) -> bool {
    d["metadata"]["annotations"]["helm.sh/hook"] == "test"
}

#[test]
fn helm_test_pod_sends_the_webhook_a_review_and_expects_200() {
    let t = tools();
    let docs = render(&["--show-only", HELM_TEST]);
    assert!(
        docs.iter().all(is_test_hook),
        "every object of {HELM_TEST} is a test hook"
    );
    let pod = one(&docs, "Pod");
    let config = one(&docs, "ConfigMap");
    assert_eq!(pod["metadata"]["namespace"], NAMESPACE);
    assert_eq!(pod["spec"]["restartPolicy"], "Never");
    // The ConfigMap is created before the Pod.
    let weight = |d: &Value| {
        str_of(&d["metadata"]["annotations"]["helm.sh/hook-weight"])
            .parse::<i32>()
            .unwrap()
    };
    assert!(weight(config) < weight(pod));

    // The review: an AdmissionReview v1 for creating a pod that does not opt in (a dry run).
    let review: Value = serde_json::from_str(str_of(&config["data"]["review.json"])).unwrap();
    assert_eq!(review["apiVersion"], "admission.k8s.io/v1");
    assert_eq!(review["kind"], "AdmissionReview");
    let request = &review["request"];
    assert_eq!(request["kind"], json!({"group": "", "version": "v1", "kind": "Pod"}));
    assert_eq!(request["operation"], "CREATE");
    assert_eq!(request["dryRun"], true);
    assert!(request["object"]["metadata"]["annotations"].is_null(), "no opt-in");
    let uid = str_of(&request["uid"]);

    // Sent through the chart's Service, on the port and path of the opt-in webhook, with the CA
    // the API server trusts; HTTP 200 and an answer to this review that allows the pod.
    let all = render(&[]);
    let service = one(&all, "Service");
    let https = service["spec"]["ports"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["name"] == "https")
        .unwrap();
    let mwc = one(&all, "MutatingWebhookConfiguration");
    let hook = mwc["webhooks"]
        .as_array()
        .unwrap()
        .iter()
        .find(|h| h["clientConfig"]["service"]["path"] == "/mutate")
        .unwrap();
    assert_eq!(hook["clientConfig"]["service"]["port"], https["port"]);
    let url = format!(
        "https://{}.{NAMESPACE}.svc:{}/mutate",
        str_of(&service["metadata"]["name"]),
        https["port"]
    );
    let c = &pod["spec"]["containers"][0];
    assert_eq!(c["command"], json!(["/bin/sh", "-c"]));
    let script = str_of(&c["args"][0]);
    for needle in [
        format!("url={url}\n"),
        "curl ".to_owned(),
        "-X POST".to_owned(),
        "--data-binary @/etc/wsgate-test/review.json".to_owned(),
        "--cacert /etc/wsgate-test/ca.crt".to_owned(),
        "[ \"$code\" = 200 ]".to_owned(),
        format!("'\"uid\":\"{uid}\"'"),
        "'\"allowed\":true'".to_owned(),
    ] {
        assert!(script.contains(&needle), "the script lacks {needle:?}:\n{script}");
    }
    assert!(
        !script.contains(" -k") && !script.contains("--insecure"),
        "TLS is verified"
    );
    let sh = t.run(Path::new("sh"), &["-n", "-c", script], "", &[]);
    assert!(sh.ok, "the script is not valid sh:\n{}", sh.stderr);

    // The CA: ca.crt of the serving certificate's Secret, never its key.
    let volume = &pod["spec"]["volumes"][0]["projected"]["sources"];
    let secret = volume
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s.get("secret").is_some())
        .expect("the CA from the Secret");
    let cert = named(&all, "Certificate", &format!("{RELEASE}-webhook-tls"));
    assert_eq!(secret["secret"]["name"], cert["spec"]["secretName"]);
    assert_eq!(secret["secret"]["items"], json!([{"key": "ca.crt", "path": "ca.crt"}]));
    // Without cert-manager: the caBundle of the webhook configuration.
    let no_cm = render(&["-f", &ci_values("no-cert-manager"), "--show-only", HELM_TEST]);
    let sources = &one(&no_cm, "Pod")["spec"]["volumes"][0]["projected"]["sources"];
    assert!(sources.as_array().unwrap().iter().all(|s| s.get("secret").is_none()));
    let ca = str_of(&one(&no_cm, "ConfigMap")["data"]["ca.crt"]);
    let no_cm_all = render_ci("no-cert-manager");
    let bundle = str_of(&one(&no_cm_all, "MutatingWebhookConfiguration")["webhooks"][0]["clientConfig"]["caBundle"]);
    use base64::Engine as _;
    let decoded = base64::engine::general_purpose::STANDARD.decode(bundle).unwrap();
    assert_eq!(ca.trim(), String::from_utf8(decoded).unwrap().trim());

    // kubectl users never get the test pod.
    let installed = t.yaml_docs(&read("manifests/install/10-wsgate.yaml"));
    assert!(
        !installed.iter().any(is_test_hook),
        "manifests/install holds a helm test hook"
    );
}

/// The test pod's script, run here with the local curl against the real `wsgate inject`: its
/// files come from a folder instead of the pod's volume, and curl (through a .curlrc in HOME)
/// connects to the injector's loopback port for the Service's name.
fn run_helm_test_script(script: &str, review: &str, ca_pem: &str, port: u16) -> crate::support::k8s_tools::Ran {
    let t = tools();
    let tmp = tempfile::tempdir().unwrap();
    let files = tmp.path().join("files");
    std::fs::create_dir(&files).unwrap();
    std::fs::write(files.join("review.json"), review).unwrap();
    std::fs::write(files.join("ca.crt"), ca_pem).unwrap();
    std::fs::write(
        tmp.path().join(".curlrc"),
        format!("connect-to = {RELEASE}.{NAMESPACE}.svc:443:127.0.0.1:{port}\n"),
    )
    .unwrap();
    let script = script.replace("/etc/wsgate-test", files.to_str().unwrap());
    t.run(Path::new("sh"), &["-c", &script], "", &[("HOME", tmp.path())])
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn helm_test_script_passes_against_the_real_webhook_and_fails_on_a_wrong_answer() {
    let docs = render(&["--show-only", HELM_TEST]);
    let script = str_of(&one(&docs, "Pod")["spec"]["containers"][0]["args"][0]).to_owned();
    let review = str_of(&one(&docs, "ConfigMap")["data"]["review.json"]).to_owned();

    // The injector, serving a certificate for the Service's name from the webhook CA.
    let injector = crate::support::injector::Injector::start_serving(|pki| {
        pki.ca
            .leaf(&LeafSpec::new("webhook").dns(&format!("{RELEASE}.{NAMESPACE}.svc")))
            .unwrap()
    })
    .await;
    let (pki, listen) = (&injector.pki, injector.listen);

    let ran = tokio::task::spawn_blocking({
        let (script, review, ca) = (script.clone(), review.clone(), pki.ca.cert_pem.clone());
        move || run_helm_test_script(&script, &review, &ca, listen.port())
    })
    .await
    .unwrap();
    assert!(ran.ok, "the helm test script failed:\n{}{}", ran.stdout, ran.stderr);
    assert!(
        ran.stdout.contains("OK: the webhook answered the review"),
        "{}",
        ran.stdout
    );

    // It fails when the answer is not HTTP 200 (a path the webhook does not serve) ...
    let ran = tokio::task::spawn_blocking({
        let (script, review, ca) = (
            script.replace(".svc:443/mutate", ".svc:443/nothing"),
            review.clone(),
            pki.ca.cert_pem.clone(),
        );
        move || run_helm_test_script(&script, &review, &ca, listen.port())
    })
    .await
    .unwrap();
    assert!(!ran.ok, "a 404 passed:\n{}", ran.stdout);
    assert!(
        ran.stdout.contains("FAIL: expected HTTP 200, got 404"),
        "{}",
        ran.stdout
    );
    // ... and when the answer is for another review.
    let ran = tokio::task::spawn_blocking({
        let other = review.replace("-helm-test\"", "-other\"");
        let (script, ca) = (script.clone(), pki.ca.cert_pem.clone());
        move || run_helm_test_script(&script, &other, &ca, listen.port())
    })
    .await
    .unwrap();
    assert!(!ran.ok, "an answer to another review passed:\n{}", ran.stdout);
    assert!(
        ran.stdout.contains("FAIL: the answer is not for this review"),
        "{}",
        ran.stdout
    );
}

// ------------------------------------------------------------------------------------------------
// values.yaml and values.schema.json

#[test]
fn values_schema_rejects_a_wrong_type() {
    for (set, path) in [
        ("injector.replicas=two", "/injector/replicas"),
        (
            "webhook.failurePolicy.podOptIn=Sometimes",
            "/webhook/failurePolicy/podOptIn",
        ),
        ("sidecar.certificate.duration=1 day", "/sidecar/certificate/duration"),
        ("sidecar.nativeSidecar=false", "/sidecar/nativeSidecar"),
    ] {
        let err = try_render(&["--set", set]).expect_err(set);
        assert!(err.contains("schema") && err.contains(path), "--set {set}:\n{err}");
    }
}

#[test]
fn values_schema_rejects_an_unknown_key() {
    for (set, key) in [
        ("injector.replicaCount=3", "replicaCount"),
        ("sidecar.image.name=x", "name"),
        ("certManager.issuer.name=x", "issuer"),
        ("monitoring.serviceMonitor.enable=true", "enable"),
        ("telemetry=true", "telemetry"),
    ] {
        let err = try_render(&["--set", set]).expect_err(set);
        assert!(
            err.contains("additional properties") && err.contains(key),
            "--set {set}:\n{err}"
        );
    }
}

/// Every object schema in values.schema.json forbids unknown keys and describes its keys.
fn assert_schema_strict(schema: &Value, at: &str) {
    if let Some(props) = schema["properties"].as_object() {
        if at != "/global" {
            assert_eq!(schema["additionalProperties"], false, "{at}: additionalProperties");
        }
        for (k, v) in props {
            let here = format!("{at}/{k}");
            assert!(
                v["description"].as_str().is_some_and(|d| !d.is_empty()),
                "{here}: no description"
            );
            assert_schema_strict(v, &here);
        }
    }
    if schema["items"].is_object() {
        assert_schema_strict(&schema["items"], &format!("{at}[]"));
    }
}

/// The keys of values.yaml, as /a/b paths.
fn value_paths(v: &Value, at: &str, out: &mut Vec<String>) {
    if let Some(m) = v.as_object() {
        for (k, child) in m {
            let here = format!("{at}/{k}");
            out.push(here.clone());
            value_paths(child, &here, out);
        }
    }
}

#[test]
fn every_value_is_documented_and_in_the_schema() {
    let t = tools();
    let text = read(&format!("{CHART}/values.yaml"));
    // Every key line has a comment right above it (or is the first key after a commented block).
    let lines: Vec<&str> = text.lines().collect();
    for (i, line) in lines.iter().enumerate() {
        if let Some(k) = yaml_key(line) {
            let above = lines[..i]
                .iter()
                .rev()
                .find(|l| !l.trim().is_empty())
                .map(|l| l.trim_start());
            assert!(
                above.is_some_and(|l| l.starts_with('#')),
                "values.yaml line {}: `{k}` has no comment above it",
                i + 1
            );
        }
    }
    // Every value has a schema entry (described, strict) and every schema entry a value.
    let schema: Value = serde_json::from_str(&read(&format!("{CHART}/values.schema.json"))).unwrap();
    assert_eq!(schema["additionalProperties"], false);
    assert_schema_strict(&schema, "");
    let values = t.yaml_docs(&text).remove(0);
    let mut paths = Vec::new();
    value_paths(&values, "", &mut paths);
    'paths: for p in &paths {
        let mut node = &schema;
        for part in p.trim_start_matches('/').split('/') {
            if node["properties"][part].is_null() {
                // Only a free-form map (labels, nodeSelector, ...) may hold keys the schema does not name.
                assert!(
                    node["additionalProperties"].is_object(),
                    "{p}: not in values.schema.json"
                );
                continue 'paths;
            }
            node = &node["properties"][part];
        }
        assert!(node["description"].is_string(), "{p}: not described in the schema");
    }
    let mut schema_paths = Vec::new();
    fn walk(s: &Value, at: &str, out: &mut Vec<String>) {
        for (k, v) in s["properties"].as_object().into_iter().flatten() {
            let here = format!("{at}/{k}");
            out.push(here.clone());
            walk(v, &here, out);
        }
    }
    walk(&schema, "", &mut schema_paths);
    for p in schema_paths.iter().filter(|p| *p != "/global") {
        assert!(
            paths.contains(p),
            "{p} is in the schema but has no default in values.yaml"
        );
    }
}

/// `key:` at the start of a YAML mapping line (not a comment, not a list item), else None.
fn yaml_key(line: &str) -> Option<&str> {
    let t = line.trim_start();
    if t.starts_with('#') || t.starts_with('-') || t.is_empty() {
        return None;
    }
    let (k, _) = t.split_once(':')?;
    k.chars().all(|c| c.is_ascii_alphanumeric() || c == '_').then_some(k)
}

/// Copies a folder tree.
fn copy_tree(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for entry in std::fs::read_dir(from).unwrap() {
        let entry = entry.unwrap();
        let target = to.join(entry.file_name());
        if entry.file_type().unwrap().is_dir() {
            copy_tree(&entry.path(), &target);
        } else {
            std::fs::copy(entry.path(), &target).unwrap();
        }
    }
}

/// NOTES.txt as `helm install` prints it. Neither `helm template` nor a client-only dry run (it
/// asks a cluster for its version) renders NOTES, so a copy of the chart renders them into a
/// ConfigMap instead.
fn render_notes(args: &[&str]) -> String {
    let t = tools();
    let tmp = tempfile::tempdir().unwrap();
    let chart = tmp.path().join("wsgate");
    copy_tree(&t.path(CHART), &chart);
    let notes = std::fs::read_to_string(chart.join("templates/NOTES.txt")).unwrap();
    std::fs::remove_file(chart.join("templates/NOTES.txt")).unwrap();
    std::fs::write(
        chart.join("templates/_notes_under_test.tpl"),
        format!("{{{{- define \"notes-under-test\" -}}}}\n{notes}\n{{{{- end -}}}}\n"),
    )
    .unwrap();
    std::fs::write(
        chart.join("templates/notes-under-test.yaml"),
        "apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: notes\ndata:\n  notes: {{ include \"notes-under-test\" . | toJson }}\n",
    )
    .unwrap();
    let chart = chart.to_str().unwrap();
    let mut all = vec![
        "template",
        RELEASE,
        chart,
        "--namespace",
        NAMESPACE,
        "--show-only",
        "templates/notes-under-test.yaml",
        "--api-versions",
        POLICY_API,
    ];
    all.extend_from_slice(args);
    let ran = t.helm(&all);
    assert!(ran.ok, "rendering NOTES.txt failed:\n{}", ran.stderr);
    str_of(&t.yaml_docs(&ran.stdout)[0]["data"]["notes"]).to_owned()
}

#[test]
fn notes_say_how_to_check_the_install_and_opt_a_namespace_or_a_pod_in() {
    let notes = render_notes(&[]);
    for needle in [
        "kubectl label namespace NAMESPACE wsgate.dev/injection=enabled",
        "wsgate.dev/inject: \"true\"",
        "wsgate.dev/upstream-port",
        "wsgate.dev/allow",
        "Never injected: kube-system, wsgate-system, cert-manager, kube-public, kube-node-lease.",
        "issued by ClusterIssuer wsgate-ca.",
        "helm test wsgate --namespace wsgate-system --logs",
    ] {
        assert!(notes.contains(needle), "NOTES lack {needle:?}:\n{notes}");
    }
    // They follow the values.
    let notes = render_notes(&["-f", &ci_values("own-issuer")]);
    assert!(notes.contains("issued by ClusterIssuer vault-workloads."), "{notes}");
    assert!(
        notes.contains("spiffe://prod.example.com/ns/<namespace>/sa/<serviceaccount>"),
        "{notes}"
    );
    let notes = render_notes(&["-f", &ci_values("trust-manager")]);
    assert!(notes.contains("(this release distributes \"wsgate-trust\")"), "{notes}");
}

// ------------------------------------------------------------------------------------------------
// manifests/

#[test]
fn install_manifests_are_identical_to_a_fresh_render() {
    let t = tools();
    let out = tempfile::tempdir().unwrap();
    let ran = t.run(
        Path::new("bash"),
        &["scripts/render-manifests.sh", out.path().to_str().unwrap()],
        "",
        &[("HELM", &t.helm)],
    );
    assert!(ran.ok, "scripts/render-manifests.sh failed:\n{}", ran.stderr);
    let names = |dir: &Path| -> BTreeSet<String> {
        std::fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect()
    };
    let committed = t.path("manifests/install");
    assert_eq!(
        names(&committed),
        names(out.path()),
        "manifests/install has other files than a fresh render"
    );
    for name in names(out.path()) {
        let fresh = std::fs::read_to_string(out.path().join(&name)).unwrap();
        let have = std::fs::read_to_string(committed.join(&name)).unwrap();
        if fresh != have {
            let line = fresh
                .lines()
                .zip(have.lines())
                .position(|(a, b)| a != b)
                .map_or(0, |i| i + 1);
            panic!(
                "manifests/install/{name} is stale (first difference near line {line}): run scripts/render-manifests.sh"
            );
        }
    }
}

#[test]
fn install_and_example_manifests_are_valid_for_kubernetes_1_25_1_29_and_1_34() {
    let t = tools();
    let files = [
        "manifests/install/00-namespace.yaml",
        "manifests/install/10-wsgate.yaml",
        "manifests/examples/echo.yaml",
    ];
    let report = t.validate(&files, "", &KUBE_VERSIONS);
    assert!(report.ok, "{}{}", report.stdout, report.stderr);
    let docs: usize = files.iter().map(|f| t.yaml_docs(&read(f)).len()).sum();
    assert!(
        report.stdout.contains(&format!("{docs} valid, 0 invalid")),
        "{}",
        report.stdout
    );
}

/// The objects of manifests/examples/echo.yaml.
fn example() -> Vec<Value> {
    tools().yaml_docs(&read("manifests/examples/echo.yaml"))
}

#[test]
fn example_echo_admits_only_the_client_identity() {
    let docs = example();
    let echo = named(&docs, "Deployment", "echo");
    let client = named(&docs, "Deployment", "echo-client");
    let ann = |d: &Value, k: &str| {
        d["spec"]["template"]["metadata"]["annotations"][k]
            .as_str()
            .map(str::to_owned)
    };
    for d in [echo, client] {
        assert_eq!(
            ann(d, "wsgate.dev/inject").as_deref(),
            Some("true"),
            "{} is opted in",
            d["metadata"]["name"]
        );
    }
    // The allow policy is exactly the client's SPIFFE ID (its namespace and ServiceAccount).
    let client_id = format!(
        "spiffe://cluster.local/ns/{}/sa/{}",
        str_of(&client["metadata"]["namespace"]),
        str_of(&client["spec"]["template"]["spec"]["serviceAccountName"])
    );
    assert_eq!(ann(echo, "wsgate.dev/allow"), Some(client_id));
    // The Service points at the sidecar's mTLS port, never at the app.
    let service = named(&docs, "Service", "echo");
    assert!(selects(
        &json!({"matchLabels": service["spec"]["selector"]}),
        &labels(&echo["spec"]["template"]["metadata"]["labels"])
    ));
    assert_eq!(
        service["spec"]["ports"],
        json!([{"name": "wss", "port": 443, "targetPort": 8443, "protocol": "TCP"}])
    );
    let echo_env = env_of(&echo["spec"]["template"]["spec"]["containers"][0]);
    assert!(
        echo_env["LISTEN"].starts_with("127.0.0.1:"),
        "the app listens on loopback only"
    );
    assert_eq!(
        Some(echo_env["LISTEN"].trim_start_matches("127.0.0.1:").to_owned()),
        ann(echo, "wsgate.dev/upstream-port")
    );
    // The client dials a name on the echo pods' certificate, checks their identity, and uses the
    // certificate Secret the injector gives its ServiceAccount (wsgate-<serviceaccount>).
    let client_spec = &client["spec"]["template"]["spec"];
    let client_env = env_of(&client_spec["containers"][0]);
    let host = client_env["ECHO_URL"]
        .trim_start_matches("wss://")
        .split([':', '/'])
        .next()
        .unwrap()
        .to_owned();
    assert!(
        ann(echo, "wsgate.dev/dns-names").unwrap().split(',').any(|n| n == host),
        "{host}"
    );
    assert_eq!(
        client_env["EXPECTED_SERVER_ID"],
        format!(
            "spiffe://cluster.local/ns/wsgate-demo/sa/{}",
            str_of(&echo["spec"]["template"]["spec"]["serviceAccountName"])
        )
    );
    let secret = client_spec["volumes"]
        .as_array()
        .unwrap()
        .iter()
        .find_map(|v| v["secret"]["secretName"].as_str());
    assert_eq!(
        secret,
        Some(format!("wsgate-{}", str_of(&client_spec["serviceAccountName"])).as_str())
    );
}

/// The example's echo server, a real `wsgate proxy` in front of it with the example's allow
/// annotation, and the example's client with certificates from one CA: the client's identity gets
/// its echo back, any other gets 403.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn example_client_gets_its_echo_through_the_real_proxy_and_others_do_not() {
    let t = tools();
    let docs = example();
    let scripts = &one(&docs, "ConfigMap")["data"];
    let echo = named(&docs, "Deployment", "echo");
    let allow = str_of(&echo["spec"]["template"]["metadata"]["annotations"]["wsgate.dev/allow"]).to_owned();
    let dns = str_of(&echo["spec"]["template"]["metadata"]["annotations"]["wsgate.dev/dns-names"]).to_owned();
    let server_name = dns.split(',').next().unwrap().to_owned();
    let echo_id = "spiffe://cluster.local/ns/wsgate-demo/sa/echo";

    let tmp = tempfile::tempdir().unwrap();
    for name in ["echo.py", "client.py"] {
        std::fs::write(tmp.path().join(name), str_of(&scripts[name])).unwrap();
    }
    // The echo server on a port of its choosing; it prints where it listens, then one line per
    // connection (with the identity wsgate passed on in X-Forwarded-Client-Cert).
    let mut echo_proc = std::process::Command::new(&t.python)
        .arg(tmp.path().join("echo.py"))
        .env("LISTEN", "127.0.0.1:0")
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    struct Kill(std::process::Child);
    impl Drop for Kill {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
    let echo_out = std::io::BufReader::new(echo_proc.stdout.take().unwrap());
    let _echo_guard = Kill(echo_proc);
    let (tx, rx) = std::sync::mpsc::channel::<String>();
    std::thread::spawn(move || {
        for line in std::io::BufRead::lines(echo_out).map_while(Result::ok) {
            let _ = tx.send(line);
        }
    });
    let first = rx
        .recv_timeout(Duration::from_secs(20))
        .expect("echo.py says where it listens");
    let echo_addr: std::net::SocketAddr = first.trim().rsplit(' ').next().unwrap().parse().unwrap();

    // One CA, as the chart's ClusterIssuer: the echo pods' certificate and two clients.
    let pki = Pki::new();
    let vol = SecretVolume::new(tmp.path().join("echo-tls")).unwrap();
    let server = pki
        .ca
        .leaf(&LeafSpec::new("echo").uri(echo_id).dns(&server_name))
        .unwrap();
    write_set(&vol, &server, &pki.ca);
    let cert_dir = vol.path().to_str().unwrap().to_owned();
    let proxy = Proc::proxy(echo_addr, &["--cert-dir", &cert_dir, "--allow", &allow], &[]);
    let (listen, _admin) = proxy.addrs().await;
    proxy.line("certificate installed", Duration::from_secs(20)).await;

    let run_client = |sa: &str| {
        let dir = tmp.path().join(format!("client-{sa}"));
        std::fs::create_dir_all(&dir).unwrap();
        let leaf = pki
            .ca
            .leaf(&LeafSpec::new(sa).uri(&format!("spiffe://cluster.local/ns/wsgate-demo/sa/{sa}")))
            .unwrap();
        std::fs::write(dir.join("tls.crt"), &leaf.cert_pem).unwrap();
        std::fs::write(dir.join("tls.key"), &leaf.key_pem).unwrap();
        std::fs::write(dir.join("ca.crt"), &pki.ca.cert_pem).unwrap();
        let out = std::process::Command::new(&t.python)
            .arg(tmp.path().join("client.py"))
            .env("ECHO_URL", format!("wss://{listen}/echo"))
            .env("SERVER_NAME", &server_name)
            .env("EXPECTED_SERVER_ID", echo_id)
            .env("CERT_DIR", &dir)
            .env("COUNT", "1")
            .env("HOSTNAME", "test-client")
            .output()
            .unwrap();
        (out.status.success(), String::from_utf8_lossy(&out.stdout).into_owned())
    };
    let allowed_sa = allow.rsplit('/').next().unwrap().to_owned();
    let (ok, out) = run_client(&allowed_sa);
    assert!(ok, "the allowed client failed:\n{out}");
    assert!(
        out.contains(&format!("echo from {echo_id}: hello #1 from test-client")),
        "{out}"
    );
    let seen = rx
        .recv_timeout(Duration::from_secs(5))
        .expect("echo.py logs the connection");
    assert!(
        seen.contains(&format!("URI={allow};")),
        "the app learns who the client is: {seen}"
    );
    let (ok, out) = run_client("intruder");
    assert!(!ok, "an identity outside the allow-list got through:\n{out}");
    assert!(out.contains("403"), "{out}");
}

// ------------------------------------------------------------------------------------------------
// Dockerfile

#[test]
fn dockerfile_passes_hadolint() {
    let t = tools();
    let ran = t.run(&t.hadolint, &["--failure-threshold", "info", "Dockerfile"], "", &[]);
    assert!(ran.ok, "hadolint:\n{}{}", ran.stdout, ran.stderr);
}

#[test]
fn dockerfile_copies_the_binary_cargo_builds_for_the_target_it_names() {
    let t = tools();
    let dockerfile = read("Dockerfile");
    // Instructions, with continuation lines joined.
    let joined = dockerfile.replace("\\\n", " ");
    let instructions: Vec<&str> = joined
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .collect();
    let froms: Vec<&&str> = instructions.iter().filter(|l| l.starts_with("FROM ")).collect();
    assert_eq!(froms.len(), 2, "multi-stage: build and runtime");
    let (build_from, final_from) = (froms[0], froms[1]);
    assert!(
        build_from.starts_with("FROM rust:") && build_from.ends_with(" AS build"),
        "{build_from}"
    );
    assert!(
        final_from.contains("gcr.io/distroless/"),
        "minimal runtime: {final_from}"
    );

    // The Rust image is at least the crate's rust-version.
    let rust_version = instructions
        .iter()
        .find_map(|l| l.strip_prefix("ARG RUST_VERSION="))
        .expect("ARG RUST_VERSION");
    let cargo_toml = read("Cargo.toml");
    let msrv = cargo_toml
        .lines()
        .find_map(|l| l.strip_prefix("rust-version = "))
        .map(|v| v.trim_matches('"'))
        .unwrap();
    let parse = |v: &str| v.split('.').map(|p| p.parse::<u32>().unwrap()).collect::<Vec<_>>();
    assert!(
        parse(rust_version) >= parse(msrv),
        "rust:{rust_version} is older than rust-version {msrv}"
    );

    // cargo build --release --locked --target T, in WORKDIR W.
    let workdir = instructions.iter().find_map(|l| l.strip_prefix("WORKDIR ")).unwrap();
    let build = instructions
        .iter()
        .find(|l| l.contains("cargo build"))
        .expect("cargo build");
    let words: Vec<&str> = build.split_whitespace().collect();
    assert!(words.contains(&"--release") && words.contains(&"--locked"), "{build}");
    let target = words[words.iter().position(|w| *w == "--target").expect("--target") + 1];
    let rustc = std::process::Command::new("rustc")
        .args(["--print", "target-list"])
        .output()
        .unwrap();
    assert!(
        String::from_utf8_lossy(&rustc.stdout).lines().any(|l| l == target),
        "{target} is not a Rust target"
    );

    // The binary cargo builds is named after the [[bin]] target (cargo metadata says which).
    let meta = std::process::Command::new(env!("CARGO"))
        .args(["metadata", "--no-deps", "--format-version", "1", "--offline"])
        .current_dir(&t.root)
        .output()
        .unwrap();
    assert!(meta.status.success(), "{}", String::from_utf8_lossy(&meta.stderr));
    let meta: Value = serde_json::from_slice(&meta.stdout).unwrap();
    let bins: Vec<&str> = meta["packages"][0]["targets"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|t| t["kind"] == json!(["bin"]))
        .map(|t| str_of(&t["name"]))
        .collect();
    assert_eq!(bins, ["wsgate"]);
    let built = format!("{workdir}/target/{target}/release/{}", bins[0]);

    // COPY --from=build <that binary> /wsgate, run as a numeric non-root user, ENTRYPOINT /wsgate.
    let copy = instructions
        .iter()
        .find(|l| l.starts_with("COPY --from=build"))
        .expect("COPY --from=build");
    assert_eq!(
        copy.split_whitespace().collect::<Vec<_>>(),
        ["COPY", "--from=build", &built, "/wsgate"]
    );
    let user = instructions
        .iter()
        .rev()
        .find_map(|l| l.strip_prefix("USER "))
        .expect("USER");
    for id in user.split(':') {
        assert!(
            id.parse::<u32>().is_ok_and(|n| n > 0),
            "USER {user}: numeric and non-root"
        );
    }
    assert_eq!(instructions.last(), Some(&"ENTRYPOINT [\"/wsgate\"]"));
    for label in ["title", "description", "licenses", "version", "revision", "source"] {
        assert!(
            joined.contains(&format!("org.opencontainers.image.{label}=")),
            "OCI label {label}"
        );
    }
    // Cargo reads every target it knows of before building anything: the build stage must copy
    // (and .dockerignore let through) the file of each library, binary, bench and example target,
    // and of every [[test]] Cargo.toml declares (integration tests found under tests/ on their own
    // are not needed).
    let copied: Vec<String> = instructions
        .iter()
        .take_while(|l| !l.starts_with("FROM ") || l.ends_with(" AS build"))
        .filter_map(|l| l.strip_prefix("COPY "))
        .filter(|l| !l.starts_with("--from"))
        .flat_map(|l| {
            let words: Vec<&str> = l.split_whitespace().collect();
            words[..words.len() - 1]
                .iter()
                .map(|w| w.trim_end_matches('/').to_owned())
                .collect::<Vec<_>>()
        })
        .collect();
    let ignore = read(".dockerignore");
    let declared_tests: Vec<String> = cargo_toml
        .split("[[test]]")
        .skip(1)
        .filter_map(|section| {
            section
                .lines()
                .find_map(|l| l.trim().strip_prefix("name = ").map(|n| n.trim_matches('"').to_owned()))
        })
        .collect();
    let root = format!("{}/", t.root.display());
    for target in meta["packages"][0]["targets"].as_array().unwrap() {
        let kind = str_of(&target["kind"][0]);
        let name = str_of(&target["name"]).to_owned();
        if (kind == "test" && !declared_tests.contains(&name)) || kind == "custom-build" {
            continue;
        }
        let src = str_of(&target["src_path"]).trim_start_matches(&root).to_owned();
        let top = src.split('/').next().unwrap();
        assert!(
            copied.iter().any(|c| c == top),
            "{kind} target {name} ({src}): the build stage does not COPY {top}"
        );
        assert!(
            ignore
                .lines()
                .any(|l| l.trim().trim_end_matches('/') == format!("!{top}")),
            ".dockerignore keeps {top} (of {kind} target {name}) out of the build context"
        );
    }
    for source in &copied {
        assert!(
            t.path(source).exists(),
            "the build stage copies {source}, which does not exist"
        );
    }
    // Cargo loads every workspace member's manifest too: each must be copied and let through.
    let members: Vec<String> = cargo_toml
        .lines()
        .find_map(|l| l.trim().strip_prefix("members = "))
        .map(|list| {
            list.trim_matches(|c| c == '[' || c == ']')
                .split(',')
                .map(|m| m.trim().trim_matches('"').to_owned())
                .filter(|m| !m.is_empty() && m != ".")
                .collect()
        })
        .unwrap_or_default();
    for member in &members {
        let manifest = format!("{member}/Cargo.toml");
        assert!(
            copied.iter().any(|c| c == &manifest || c == member),
            "workspace member {member}: the build stage does not COPY its Cargo.toml"
        );
        assert!(
            ignore.lines().any(|l| l.trim() == format!("!{manifest}")),
            ".dockerignore keeps {manifest} out"
        );
    }
    for needed in ["Cargo.toml", "Cargo.lock"] {
        assert!(
            copied.iter().any(|c| c == needed),
            "the build stage does not COPY {needed}"
        );
        assert!(
            ignore.lines().any(|l| l.trim() == format!("!{needed}")),
            ".dockerignore keeps {needed} out"
        );
    }
}

// ------------------------------------------------------------------------------------------------
// Approval of the workload issuer's CertificateRequests (approver-policy)

#[test]
fn approval_policy_guards_the_workload_issuer() {
    let docs = render(&[]);
    let policy = one(&docs, "CertificateRequestPolicy");
    assert_eq!(policy["apiVersion"], POLICY_API);
    let spec = &policy["spec"];
    // Bound to the ClusterIssuer the injector names, and only to it.
    let issuer = one(&docs, "ClusterIssuer");
    assert_eq!(
        spec["selector"],
        json!({"issuerRef": {"name": issuer["metadata"]["name"], "kind": "ClusterIssuer", "group": "cert-manager.io"}})
    );
    let env = env_of(injector_container(&docs));
    assert_eq!(env["WSGATE_ISSUER_NAME"], str_of(&issuer["metadata"]["name"]));
    let allowed = &spec["allowed"];
    assert_eq!(allowed["isCA"], false);
    // Only URI and DNS SANs, usages; no subject, common name, IP or email SANs.
    let keys: BTreeSet<&str> = allowed.as_object().unwrap().keys().map(String::as_str).collect();
    assert_eq!(keys, BTreeSet::from(["isCA", "uris", "dnsNames", "usages"]));
    assert_eq!(allowed["uris"]["required"], true);
    let rules: Vec<&str> = allowed["uris"]["validations"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| str_of(&v["rule"]))
        .collect();
    assert!(
        rules.contains(&"self.startsWith('spiffe://cluster.local/ns/' + cr.namespace + '/sa/')"),
        "{rules:?}"
    );
    assert!(
        rules.contains(
            &"self.matches('^spiffe://cluster[.]local/ns/' + cr.namespace + '/sa/[a-z0-9]([-a-z0-9.]*[a-z0-9])?$')"
        ),
        "{rules:?}"
    );
    assert_eq!(allowed["dnsNames"]["values"], json!(["*.svc", "*.svc.cluster.local"]));
    assert_eq!(
        allowed["dnsNames"]["validations"][0]["rule"],
        "self.matches('^([*]|[a-z0-9]([-a-z0-9]*[a-z0-9])?)[.]' + cr.namespace + '[.]svc([.]cluster[.]local)?$')"
    );
    assert_eq!(
        allowed["usages"],
        json!(["server auth", "client auth", "digital signature", "key encipherment"])
    );
    assert_eq!(
        spec["constraints"],
        json!({"maxDuration": "24h", "privateKey": {"algorithm": "ECDSA", "minSize": 256, "maxSize": 256}})
    );
    // approver-policy evaluates it for cert-manager's controller, which creates the requests.
    let role = named(&docs, "ClusterRole", "wsgate-ca-policy-use");
    assert_eq!(
        role["rules"],
        json!([{
            "apiGroups": ["policy.cert-manager.io"],
            "resources": ["certificaterequestpolicies"],
            "verbs": ["use"],
            "resourceNames": ["wsgate-ca"],
        }])
    );
    let binding = named(&docs, "ClusterRoleBinding", "wsgate-ca-policy-use");
    assert_eq!(binding["roleRef"]["name"], "wsgate-ca-policy-use");
    assert_eq!(
        binding["subjects"],
        json!([{"kind": "ServiceAccount", "name": "cert-manager", "namespace": "cert-manager"}])
    );

    // It follows the values.
    let docs = render(&[
        "--set",
        "sidecar.trustDomain=prod.example.com",
        "--set",
        "sidecar.clusterDomain=k8s.internal",
        "--set",
        "sidecar.certificate.duration=48h",
        "--set",
        "certManager.workloadIssuer.name=mesh-ca",
    ]);
    let spec = &one(&docs, "CertificateRequestPolicy")["spec"];
    assert_eq!(spec["selector"]["issuerRef"]["name"], "mesh-ca");
    assert_eq!(
        spec["allowed"]["uris"]["values"],
        json!(["spiffe://prod.example.com/ns/*/sa/*"])
    );
    assert_eq!(
        spec["allowed"]["dnsNames"]["values"],
        json!(["*.svc", "*.svc.k8s.internal"])
    );
    assert_eq!(spec["constraints"]["maxDuration"], "48h");
}

/// approver-policy's `values` match (pkg/internal/util/wildcard.go): `*` stands for any run of
/// characters, the empty one, dots and slashes included; everything else matches itself.
fn wildcard_matches(pattern: &str, s: &str) -> bool {
    let mut parts = pattern.split('*');
    let Some(mut rest) = s.strip_prefix(parts.next().unwrap_or_default()) else {
        return false;
    };
    let parts: Vec<&str> = parts.collect();
    let Some((last, middle)) = parts.split_last() else {
        return rest.is_empty();
    };
    for part in middle {
        match rest.find(part) {
            Some(at) => rest = &rest[at + part.len()..],
            None => return false,
        }
    }
    rest.ends_with(last)
}

/// What approver-policy decides for one SAN of a CertificateRequest, per
/// pkg/internal/approver/allowed/evaluator.go (evaluateSlice).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Verdict {
    /// It matches one of the attribute's `values`.
    values: bool,
    /// Every CEL rule of the attribute's `validations` is true for it.
    rules: bool,
}

impl Verdict {
    /// Approved: both (an evaluation error counts as a denial there; here it fails the test).
    fn admitted(self) -> bool {
        self.values && self.rules
    }
}

/// approver-policy's verdict on each `(namespace, SAN)`: the SAN asked for by a CertificateRequest
/// in that namespace, under `attribute` (a policy's `allowed.uris` or `allowed.dnsNames`), its
/// rules evaluated with real CEL (`K8sTools::eval_cel`). Panics when a rule does not compile, is
/// not a bool, or fails to evaluate: approver-policy would deny, but the rule is broken.
fn verdicts(attribute: &Value, asks: &[(&str, &str)]) -> Vec<Verdict> {
    let values: Vec<&str> = attribute["values"].as_array().unwrap().iter().map(str_of).collect();
    let rules: Vec<&str> = attribute["validations"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| str_of(&v["rule"]))
        .collect();
    assert!(!rules.is_empty(), "no validations in {attribute}");
    // What approver-policy puts in `cr` (validation/certificaterequest.proto): the request's
    // name, namespace and creator (cert-manager's controller for a Certificate's requests).
    let requests: Vec<(&str, Value)> = asks
        .iter()
        .map(|(namespace, san)| {
            let cr = json!({"name": "wsgate-api-1", "namespace": namespace,
                "username": "system:serviceaccount:cert-manager:cert-manager"});
            (*san, cr)
        })
        .collect();
    let results = tools().eval_cel(&rules, &requests);
    asks.iter()
        .enumerate()
        .map(|(i, (namespace, san))| Verdict {
            values: values.iter().any(|p| wildcard_matches(p, san)),
            rules: rules.iter().zip(&results).all(|(rule, per_request)| {
                per_request[i]
                    .clone()
                    .unwrap_or_else(|e| panic!("rule {rule} for {san:?} from {namespace}: {e}"))
            }),
        })
        .collect()
}

/// The approval policy's CEL rules, evaluated for real (cel-cpp through scripts/eval-cel.py, with
/// approver-policy's variables `self` and `cr` and RE2 `matches`), admit for a CertificateRequest
/// in `dev` exactly `dev`'s SPIFFE IDs and `dev`'s Service names: every other namespace's
/// identity, longer paths, other trust domains and names that merely contain `dev.svc` are
/// refused by the rules themselves (not only by the `values` wildcards, which admit
/// `spiffe://TD/ns/payments/sa/api` and `x.dev.svc.b.svc.cluster.local`). And what the certificate
/// controller asks for is admitted. (A namespace whose name holds a regular expression's
/// metacharacter, which `cr.namespace` would inject into the pattern, cannot exist: namespace
/// names are RFC 1123 labels, `[a-z0-9]([-a-z0-9]*[a-z0-9])?`.)
#[test]
fn approval_policy_rules_admit_only_the_requesting_namespaces_own_identity() {
    use wsgate::inject::certificates::{desired_for, manifest};
    use wsgate::inject::settings::InjectSettings;

    let variant = [
        "--set",
        "sidecar.trustDomain=prod.example.com",
        "--set",
        "sidecar.clusterDomain=k8s.internal",
    ];
    for (args, td, cd, other_td, other_cd) in [
        (
            &[][..],
            "cluster.local",
            "cluster.local",
            "prod.example.com",
            "k8s.internal",
        ),
        (
            &variant[..],
            "prod.example.com",
            "k8s.internal",
            "cluster.local",
            "cluster.local",
        ),
    ] {
        let docs = render(args);
        let allowed = &one(&docs, "CertificateRequestPolicy")["spec"]["allowed"];
        let id = |ns: &str, sa: &str| format!("spiffe://{td}/ns/{ns}/sa/{sa}");
        // A dot of the trust domain or cluster domain read as "any character" would admit these.
        let td_dotless = td.replace('.', "x");
        let cd_dotless = cd.replace('.', "x");

        let good_uris = [
            ("dev", id("dev", "api")),
            ("dev", id("dev", "api.v2")),
            ("dev", id("dev", "a")),
            ("payments", id("payments", "api")),
        ];
        let bad_uris: Vec<String> = vec![
            id("payments", "api"),
            id("dev", "api/extra"),
            id("dev-x", "api"),
            id("de", "api"),
            id("dev", ""),
            id("dev", "-api"),
            id("dev", "api?x=1"),
            id("dev", "api#x"),
            id("dev", "api%2Fx"),
            id("dev", "../../payments/sa/api"),
            id("dev", "api\n"),
            format!("{}/", id("dev", "api")),
            format!("spiffe://{td}/ns/dev/sa"),
            format!("spiffe://{td}/ns/dev/api"),
            format!("spiffe://{td}/ns//sa/api"),
            format!("spiffe://{td}/ns/payments/sa/dev/ns/dev/sa/api"),
            "spiffe://evil.example/ns/dev/sa/api".into(),
            format!("spiffe://{other_td}/ns/dev/sa/api"),
            format!("spiffe://{td_dotless}/ns/dev/sa/api"),
            format!("spiffe://{td}.evil.example/ns/dev/sa/api"),
            format!("spiffe://x@{td}/ns/dev/sa/api"),
            format!("https://{td}/ns/dev/sa/api"),
        ];
        let good_dns: Vec<String> = vec![
            "api.dev.svc".into(),
            format!("api.dev.svc.{cd}"),
            "a-b.dev.svc".into(),
            "*.dev.svc".into(),
            format!("*.dev.svc.{cd}"),
        ];
        let bad_dns: Vec<String> = vec![
            format!("x.dev.svc.b.svc.{cd}"),
            "api.dev.svc.attacker.example".into(),
            "api.payments.svc".into(),
            format!("api.payments.svc.{cd}"),
            format!("api.dev.svc.{cd}."),
            format!("api.dev.svc.{cd}.evil"),
            format!("api.dev.svc.{other_cd}"),
            format!("api.dev.svc.{cd_dotless}"),
            "api.dev.svc.".into(),
            "api.dev.svc\n".into(),
            "x.y.dev.svc".into(),
            "dev.svc".into(),
            ".dev.svc".into(),
            "api.dev-x.svc".into(),
            "api.xdev.svc".into(),
            "api.dev.svcx".into(),
            "api.devxsvc".into(),
            "-api.dev.svc".into(),
            "api-.dev.svc".into(),
            "*.svc".into(),
            "**.dev.svc".into(),
            "*.*.dev.svc".into(),
        ];

        let uris = &allowed["uris"];
        let asks: Vec<(&str, &str)> = good_uris.iter().map(|(ns, u)| (*ns, u.as_str())).collect();
        for ((ns, uri), v) in asks.iter().zip(verdicts(uris, &asks)) {
            assert!(v.admitted(), "{td}: {uri:?} refused for a request in {ns}: {v:?}");
        }
        let asks: Vec<(&str, &str)> = bad_uris.iter().map(|u| ("dev", u.as_str())).collect();
        for ((_, uri), v) in asks.iter().zip(verdicts(uris, &asks)) {
            assert!(!v.rules, "{td}: the rules admit {uri:?} for a request in dev ({v:?})");
        }
        let dns = &allowed["dnsNames"];
        let asks: Vec<(&str, &str)> = good_dns.iter().map(|n| ("dev", n.as_str())).collect();
        for ((_, name), v) in asks.iter().zip(verdicts(dns, &asks)) {
            assert!(v.admitted(), "{cd}: {name:?} refused for a request in dev: {v:?}");
        }
        let asks: Vec<(&str, &str)> = bad_dns.iter().map(|n| ("dev", n.as_str())).collect();
        for ((_, name), v) in asks.iter().zip(verdicts(dns, &asks)) {
            assert!(!v.rules, "{cd}: the rules admit {name:?} for a request in dev ({v:?})");
        }
        // A request from payments gets none of dev's names.
        let asks = [("payments", "api.dev.svc"), ("payments", good_uris[0].1.as_str())];
        assert!(!verdicts(dns, &asks[..1])[0].rules && !verdicts(uris, &asks[1..])[0].rules);

        // The certificate controller's Certificate for a pod in dev asking for every name above
        // (some in upper case): cert-manager puts its uris and dnsNames in the request's CSR.
        let names: Vec<String> = good_dns
            .iter()
            .chain(&bad_dns)
            .filter(|n| !n.contains('\n'))
            .cloned()
            .chain([format!("API.Dev.SVC.{}", cd.to_uppercase())])
            .collect();
        let pod: k8s_openapi::api::core::v1::Pod = serde_json::from_value(json!({
            "metadata": {"name": "api-1", "namespace": "dev", "labels": {"wsgate.dev/injected": "true"},
                "annotations": {"wsgate.dev/dns-names": names.join(",")}},
            "spec": {"serviceAccountName": "api", "containers": [{"name": "app", "image": "app"}]},
        }))
        .unwrap();
        let desired = desired_for(&pod, [&pod], cd).unwrap().unwrap();
        let settings = InjectSettings {
            trust_domain: td.into(),
            cluster_domain: cd.into(),
            ..InjectSettings::example()
        };
        let spec = &manifest(&desired, "uid", &settings)["spec"];
        for (attribute, asked) in [(uris, &spec["uris"]), (dns, &spec["dnsNames"])] {
            let asked: Vec<(&str, &str)> = asked.as_array().unwrap().iter().map(|v| ("dev", str_of(v))).collect();
            for ((_, san), v) in asked.iter().zip(verdicts(attribute, &asked)) {
                assert!(
                    v.admitted(),
                    "the controller asks for {san:?}, which the policy refuses ({v:?})"
                );
            }
        }
        let mut expected: Vec<String> = good_dns.clone();
        expected.push(format!("api.dev.svc.{cd}"));
        expected.sort();
        expected.dedup();
        assert_eq!(spec["dnsNames"], json!(expected), "{cd}");
    }
}

#[test]
fn approval_policy_is_valid_against_approver_policys_crd() {
    // The defaults row of the matrix validates every object; the policy against the copied CRD.
    let report = assert_matrix_entry_valid("defaults");
    assert!(
        report.lines().any(|l| l.starts_with("OK")
            && l.contains(" CertificateRequestPolicy/")
            && l.contains("CRD tests/data/crds/approver-policy/")),
        "the policy was not validated against approver-policy's CRD:\n{report}"
    );
}

#[test]
fn approval_policy_missing_api_fails_the_install_with_how_to_fix_it() {
    let err = try_render_bare(&[]).unwrap_err();
    let line = err
        .lines()
        .find(|l| l.contains("approver-policy"))
        .unwrap_or_else(|| panic!("no approver-policy message:\n{err}"));
    for needle in [
        "policy.cert-manager.io/v1alpha1 is not served",
        "helm install cert-manager-approver-policy",
        "approveSignerNames",
        "disableAutoApproval",
        "certManager.approval=open",
    ] {
        assert!(line.contains(needle), "{needle:?} missing from: {line}");
    }
    // Without the chart's workload issuer there is nothing of the chart's to guard.
    try_render_bare(&["-f", &ci_values("own-issuer")]).unwrap();
}

#[test]
fn approval_open_renders_no_policy_and_notes_warn() {
    let err = try_render_bare(&["--set", "certManager.approval=open"]);
    let docs = err.unwrap_or_else(|e| panic!("approval=open without the API failed:\n{e}"));
    assert!(of_kind(&docs, "CertificateRequestPolicy").is_empty());
    assert!(
        !docs
            .iter()
            .any(|d| str_of(&d["metadata"]["name"]).ends_with("-policy-use")),
        "RBAC for a policy that is not there"
    );
    assert!(!of_kind(&docs, "ClusterIssuer").is_empty());
    let notes = render_notes(&["--set", "certManager.approval=open"]);
    assert!(notes.contains("WARNING: certManager.approval=open"), "{notes}");
    assert!(
        notes.contains("ClusterIssuer wsgate-ca has NO approval policy"),
        "{notes}"
    );
    assert!(!render_notes(&[]).contains("WARNING"));
    // Anything else is refused by the schema.
    assert!(try_render(&["--set", "certManager.approval=auto"]).is_err());
}

#[test]
fn renew_before_must_be_shorter_than_the_duration_at_render_time() {
    // The defaults render.
    try_render(&[]).expect("the default durations render");
    for (values, want) in [
        (
            &[
                "--set",
                "sidecar.certificate.duration=2h",
                "--set",
                "sidecar.certificate.renewBefore=120m",
            ][..],
            "sidecar.certificate.renewBefore (120m) must be shorter than sidecar.certificate.duration (2h)",
        ),
        (
            &[
                "--set",
                "certManager.webhook.duration=1h30m",
                "--set",
                "certManager.webhook.renewBefore=5400s",
            ][..],
            "certManager.webhook.renewBefore (5400s) must be shorter than certManager.webhook.duration (1h30m)",
        ),
        (
            &[
                "--set",
                "sidecar.certificate.duration=59m",
                "--set",
                "sidecar.certificate.renewBefore=10m",
            ][..],
            "sidecar.certificate.duration (59m) must be at least 1h",
        ),
    ] {
        let err = try_render(values).expect_err("refused");
        assert!(err.contains(want), "{values:?}: {err}");
    }
    // Shorter by a second is fine: the comparison is in seconds, across units.
    try_render(&[
        "--set",
        "sidecar.certificate.duration=1h30m",
        "--set",
        "sidecar.certificate.renewBefore=5399s",
    ])
    .expect("renewBefore one second shorter renders");
}
