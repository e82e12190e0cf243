//! The injector: golden patch tests over real AdmissionReview requests (captured from an API
//! server), every bad-annotation case, the webhook over real HTTPS with a rotating serving
//! certificate, and the certificate controller against a mocked API.

use std::path::PathBuf;

use json_patch::Patch;
use k8s_openapi::api::core::v1::{Container, Pod};
use serde_json::{Value, json};
use wsgate::inject::patch::{SIDECAR, TLS_MOUNT};
use wsgate::inject::settings::InjectSettings;

const DATA: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/data/admission");

fn fixture(name: &str) -> Value {
    let text = std::fs::read_to_string(format!("{DATA}/{name}")).unwrap();
    serde_json::from_str(&text).unwrap()
}

fn annotate(review: &mut Value, annotations: &[(&str, &str)]) {
    let meta = &mut review["request"]["object"]["metadata"];
    if !meta["annotations"].is_object() {
        meta["annotations"] = json!({});
    }
    for (k, v) in annotations {
        meta["annotations"][*k] = json!(v);
    }
}

fn webhook(native: bool) -> wsgate::inject::webhook::Webhook {
    webhook_with(InjectSettings::example(), native)
}

fn webhook_with(settings: InjectSettings, native: bool) -> wsgate::inject::webhook::Webhook {
    wsgate::inject::webhook::Webhook {
        settings,
        native: std::sync::Arc::new(std::sync::atomic::AtomicBool::new(native)),
        metrics: wsgate::inject::metrics::InjectMetrics::new(),
    }
}

/// The response's patch, accepting both wire forms (base64 string, array of bytes).
fn patch_of(response: &Value) -> Option<Patch> {
    let bytes: Vec<u8> = match &response["response"]["patch"] {
        Value::Null => return None,
        Value::String(b64) => base64::Engine::decode(&base64::engine::general_purpose::STANDARD, b64).unwrap(),
        Value::Array(a) => a.iter().map(|b| b.as_u64().unwrap() as u8).collect(),
        other => panic!("unexpected patch form {other}"),
    };
    Some(serde_json::from_slice(&bytes).unwrap())
}

struct Outcome {
    response: Value,
    pod: Pod,
    patch: Option<Patch>,
}

/// Sends `review` through the webhook and applies its patch to the request's object.
fn run(review: &Value, namespace_enabled: bool, native: bool) -> Outcome {
    run_with(review, namespace_enabled, native, InjectSettings::example())
}

/// [`run`] with the injector's settings `settings`.
fn run_with(review: &Value, namespace_enabled: bool, native: bool, settings: InjectSettings) -> Outcome {
    let body = serde_json::to_vec(review).unwrap();
    let out = webhook_with(settings, native).review(&body, namespace_enabled).unwrap();
    let response: Value = serde_json::from_slice(&out).unwrap();
    assert_eq!(response["apiVersion"], "admission.k8s.io/v1");
    assert_eq!(response["kind"], "AdmissionReview");
    assert_eq!(response["response"]["uid"], review["request"]["uid"], "uid is echoed");
    let mut object = review["request"]["object"].clone();
    let patch = patch_of(&response);
    if let Some(p) = &patch {
        assert_eq!(response["response"]["patchType"], "JSONPatch");
        json_patch::patch(&mut object, p).unwrap();
    }
    let pod: Pod = serde_json::from_value(object).unwrap();
    Outcome { response, pod, patch }
}

/// Compares the patch with the committed golden file (`WSGATE_UPDATE_GOLDEN=1` rewrites it).
fn golden(name: &str, patch: &Patch) {
    let path = PathBuf::from(DATA).join("golden").join(format!("{name}.patch.json"));
    // The version in `wsgate.dev/status` is written as a placeholder: a release does not
    // change the goldens.
    let version = env!("CARGO_PKG_VERSION");
    let actual = (serde_json::to_string_pretty(patch).unwrap() + "\n").replace(
        &format!(r#"\"version\":\"{version}\""#),
        r#"\"version\":\"$CARGO_PKG_VERSION\""#,
    );
    if std::env::var_os("WSGATE_UPDATE_GOLDEN").is_some() {
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(&path, &actual).unwrap();
    }
    let expected = std::fs::read_to_string(&path)
        .unwrap_or_else(|_| panic!("no golden file {} (run with WSGATE_UPDATE_GOLDEN=1)", path.display()));
    assert_eq!(actual, expected, "the patch for {name} differs from {}", path.display());
}

fn sidecar_of(pod: &Pod, native: bool) -> Container {
    let spec = pod.spec.as_ref().unwrap();
    let found = if native {
        spec.init_containers.as_ref().and_then(|c| c.first()).cloned()
    } else {
        spec.containers.last().cloned()
    };
    let c = found.expect("a sidecar");
    assert_eq!(c.name, SIDECAR);
    c
}

fn service_name_of(c: &Container) -> String {
    let env = c.env.iter().flatten().find(|e| e.name == "OTEL_SERVICE_NAME").unwrap();
    env.value.clone().unwrap()
}

fn args(c: &Container) -> Vec<String> {
    c.args.clone().unwrap()
}

fn arg_after(c: &Container, flag: &str) -> Vec<String> {
    let a = args(c);
    a.windows(2).filter(|w| w[0] == flag).map(|w| w[1].clone()).collect()
}

fn assert_hardened(c: &Container) {
    let sc = c.security_context.as_ref().unwrap();
    assert_eq!(sc.run_as_non_root, Some(true));
    assert_eq!(sc.read_only_root_filesystem, Some(true));
    assert_eq!(sc.allow_privilege_escalation, Some(false));
    assert_eq!(sc.capabilities.as_ref().unwrap().drop, Some(vec!["ALL".to_owned()]));
    assert_eq!(sc.seccomp_profile.as_ref().unwrap().type_, "RuntimeDefault");
}

fn assert_common_sidecar(pod: &Pod, c: &Container, secret: &str) {
    assert_hardened(c);
    assert_eq!(pod.metadata.labels.as_ref().unwrap()["wsgate.dev/injected"], "true");
    // `wsgate.dev/status` says which sidecar the pod got.
    let status: Value = serde_json::from_str(&pod.metadata.annotations.as_ref().unwrap()["wsgate.dev/status"]).unwrap();
    assert_eq!(
        status,
        json!({"image": c.image, "version": env!("CARGO_PKG_VERSION"), "native": c.restart_policy.is_some()})
    );
    // The certificate Secret is mounted as a directory, never with subPath.
    let mounts = c.volume_mounts.as_ref().unwrap();
    let tls = mounts.iter().find(|m| m.mount_path == TLS_MOUNT).unwrap();
    assert_eq!(tls.sub_path, None);
    assert_eq!(tls.read_only, Some(true));
    let vol = pod
        .spec
        .as_ref()
        .unwrap()
        .volumes
        .as_ref()
        .unwrap()
        .iter()
        .find(|v| v.name == tls.name)
        .unwrap();
    assert_eq!(vol.secret.as_ref().unwrap().secret_name.as_deref(), Some(secret));
    for probe in [&c.startup_probe, &c.readiness_probe, &c.liveness_probe] {
        let get = probe.as_ref().unwrap().http_get.as_ref().unwrap();
        assert_eq!(
            get.port,
            k8s_openapi::apimachinery::pkg::util::intstr::IntOrString::Int(9901)
        );
    }
    assert_eq!(
        c.startup_probe
            .as_ref()
            .unwrap()
            .http_get
            .as_ref()
            .unwrap()
            .path
            .as_deref(),
        Some("/readyz")
    );
    let pre_stop = c.lifecycle.as_ref().unwrap().pre_stop.as_ref().unwrap();
    assert_eq!(
        pre_stop.exec.as_ref().unwrap().command,
        Some(vec!["/wsgate".to_owned(), "drain".to_owned()])
    );
    let env = c.env.as_ref().unwrap();
    let get = |n: &str| env.iter().find(|e| e.name == n).unwrap().clone();
    assert_eq!(
        get("POD_NAME").value_from.unwrap().field_ref.unwrap().field_path,
        "metadata.name"
    );
    assert_eq!(
        get("POD_NAMESPACE").value_from.unwrap().field_ref.unwrap().field_path,
        "metadata.namespace"
    );
    assert_eq!(
        get("OTEL_RESOURCE_ATTRIBUTES").value.as_deref(),
        Some("k8s.pod.name=$(POD_NAME),k8s.namespace.name=$(POD_NAMESPACE)")
    );
    let res = c.resources.as_ref().unwrap();
    assert_eq!(res.requests.as_ref().unwrap()["memory"].0, "32Mi");
    assert_eq!(res.limits.as_ref().unwrap()["memory"].0, "128Mi");
    assert_eq!(c.image.as_deref(), Some("ghcr.io/wsgate/wsgate:0.1.0"));
}

#[test]
fn an_annotated_pod_on_an_old_cluster_gets_an_ordinary_sidecar_container() {
    let mut review = fixture("pod-create-kubectl-apply.captured-k8s-1.20.json");
    annotate(&mut review, &[("wsgate.dev/inject", "true")]);
    let out = run(&review, false, false);
    assert_eq!(out.response["response"]["allowed"], true);
    let pod = &out.pod;
    let spec = pod.spec.as_ref().unwrap();
    assert_eq!(spec.containers.len(), 2);
    assert_eq!(spec.containers[0].name, "web", "the app stays first");
    assert!(spec.init_containers.is_none());
    let c = sidecar_of(pod, false);
    assert_eq!(c.restart_policy, None);
    assert_eq!(
        arg_after(&c, "--upstream"),
        vec!["ws://127.0.0.1:8080"],
        "the pod's one container port"
    );
    assert_eq!(arg_after(&c, "--listen"), vec!["0.0.0.0:8443"]);
    assert_eq!(
        arg_after(&c, "--allow"),
        vec!["spiffe://cluster.local/ns/demo/sa/*"],
        "the default, filled in"
    );
    assert_common_sidecar(pod, &c, "wsgate-default");
    assert_eq!(
        service_name_of(&c),
        "web-wsgate",
        "from the pod's name (no label, no owner)"
    );
    assert_eq!(
        pod.metadata.annotations.as_ref().unwrap()["kubectl.kubernetes.io/default-container"],
        "web"
    );
    // The ServiceAccount plugin's token volume is still there.
    assert!(
        spec.volumes
            .as_ref()
            .unwrap()
            .iter()
            .any(|v| v.name.starts_with("default-token"))
    );
    golden("kubectl-apply-ordinary-container", out.patch.as_ref().unwrap());
}

#[test]
fn a_pod_in_an_enabled_namespace_on_a_new_cluster_gets_a_native_sidecar_first() {
    let review = fixture("pod-create-replicaset-native-sidecar.k8s-1.30.json");
    let out = run(&review, true, true);
    let pod = &out.pod;
    let init: Vec<_> = pod
        .spec
        .as_ref()
        .unwrap()
        .init_containers
        .as_ref()
        .unwrap()
        .iter()
        .map(|c| c.name.clone())
        .collect();
    assert_eq!(
        init,
        vec![SIDECAR, "log-shipper", "migrate"],
        "the sidecar starts before everything else"
    );
    let c = sidecar_of(pod, true);
    assert_eq!(c.restart_policy.as_deref(), Some("Always"));
    assert_eq!(arg_after(&c, "--allow"), vec!["spiffe://cluster.local/ns/shop/sa/*"]);
    assert_common_sidecar(pod, &c, "wsgate-checkout");
    assert_eq!(service_name_of(&c), "checkout-wsgate", "the Deployment's name");
    assert_eq!(pod.spec.as_ref().unwrap().containers.len(), 1);
    golden("replicaset-native-sidecar", out.patch.as_ref().unwrap());
}

#[test]
fn annotations_choose_ports_policy_secret_trust_bundle_and_names() {
    let mut review = fixture("pod-create-replicaset-native-sidecar.k8s-1.30.json");
    annotate(
        &mut review,
        &[
            ("wsgate.dev/inject", "true"),
            ("wsgate.dev/upstream-port", "8080"),
            ("wsgate.dev/port", "9443"),
            (
                "wsgate.dev/allow",
                "spiffe://cluster.local/ns/web/sa/frontend, dns:*.shop.svc",
            ),
            ("wsgate.dev/secret", "wsgate-checkout-mtls"),
            ("wsgate.dev/trust-bundle", "cluster-trust"),
            (
                "wsgate.dev/dns-names",
                "checkout.shop.svc,checkout.shop.svc.cluster.local",
            ),
        ],
    );
    let out = run(&review, false, true);
    let c = sidecar_of(&out.pod, true);
    assert_eq!(arg_after(&c, "--listen"), vec!["0.0.0.0:9443"]);
    assert_eq!(
        arg_after(&c, "--allow"),
        vec!["spiffe://cluster.local/ns/web/sa/frontend", "dns:*.shop.svc"]
    );
    assert_eq!(arg_after(&c, "--trust-bundle"), vec!["/var/run/wsgate/trust"]);
    assert_common_sidecar(&out.pod, &c, "wsgate-checkout-mtls");
    let vols = out.pod.spec.as_ref().unwrap().volumes.clone().unwrap();
    let trust = vols.iter().find(|v| v.name == "wsgate-trust").unwrap();
    assert_eq!(trust.config_map.as_ref().unwrap().name, "cluster-trust");
    let ports: Vec<i32> = c.ports.unwrap().iter().map(|p| p.container_port).collect();
    assert_eq!(ports, vec![9443, 9901]);
    golden("annotated-options", out.patch.as_ref().unwrap());
}

#[test]
fn reinvocation_after_the_serviceaccount_plugin_changes_nothing() {
    // First call: inject. Then play the ServiceAccount admission plugin, which adds its token
    // mount to every container (ours included), and call again as the API server does.
    let mut review = fixture("pod-create-kubectl-apply.captured-k8s-1.20.json");
    annotate(&mut review, &[("wsgate.dev/inject", "true")]);
    let first = run(&review, false, false);
    let mut injected = serde_json::to_value(&first.pod).unwrap();
    let token_mount = review["request"]["object"]["spec"]["containers"][0]["volumeMounts"][0].clone();
    for c in injected["spec"]["containers"].as_array_mut().unwrap() {
        let mounts = c["volumeMounts"].as_array_mut().unwrap();
        if !mounts.contains(&token_mount) {
            mounts.push(token_mount.clone());
        }
    }
    let mut again = review.clone();
    again["request"]["object"] = injected.clone();
    let second = run(&again, false, false);
    assert_eq!(second.response["response"]["allowed"], true);
    assert!(
        second.patch.is_none(),
        "a pod that already has the sidecar is left as it is"
    );
    // And the captured second call (its sidecar has another name, so it is not ours) still
    // parses and is answered.
    let captured = fixture("pod-create-reinvocation-already-injected.captured-k8s-1.20.json");
    assert!(
        run(&captured, false, false).patch.is_none(),
        "not annotated for wsgate: not injected"
    );
}

#[test]
fn a_pod_that_says_false_is_not_injected_even_in_an_enabled_namespace() {
    let mut review = fixture("pod-create-replicaset-native-sidecar.k8s-1.30.json");
    annotate(&mut review, &[("wsgate.dev/inject", "false")]);
    let out = run(&review, true, true);
    assert_eq!(out.response["response"]["allowed"], true);
    assert!(out.patch.is_none());
}

#[test]
fn the_namespace_label_alone_injects_and_its_absence_does_not() {
    let review = fixture("pod-create-kubectl-apply.captured-k8s-1.20.json");
    assert!(run(&review, true, false).patch.is_some(), "enabled namespace: injected");
    assert!(
        run(&review, false, false).patch.is_none(),
        "plain namespace, no annotation: untouched"
    );
}

#[test]
fn a_dry_run_with_generate_name_and_an_init_container_is_answered_alike() {
    let mut review = fixture("pod-create-generatename-dryrun.captured-k8s-1.20.json");
    assert_eq!(review["request"]["dryRun"], true);
    annotate(&mut review, &[("wsgate.dev/upstream-port", "9000")]);
    let out = run(&review, true, true);
    let init: Vec<_> = out
        .pod
        .spec
        .as_ref()
        .unwrap()
        .init_containers
        .as_ref()
        .unwrap()
        .iter()
        .map(|c| c.name.clone())
        .collect();
    assert_eq!(init, vec![SIDECAR, "fetch-config"]);
    let c = sidecar_of(&out.pod, true);
    assert_eq!(arg_after(&c, "--upstream"), vec!["ws://127.0.0.1:9000"]);
    // The webhook has no side effects, so a dry run gets exactly the answer a real run gets.
    let mut real = review.clone();
    real["request"]["dryRun"] = json!(false);
    assert_eq!(run(&real, true, true).patch, out.patch);
    golden("generatename-dryrun", out.patch.as_ref().unwrap());
}

/// 17 outbound entries, one past the cap.
const TOO_MANY_OUTBOUND: &str = "9001=wss://a:1,9002=wss://a:1,9003=wss://a:1,9004=wss://a:1,9005=wss://a:1,\
    9006=wss://a:1,9007=wss://a:1,9008=wss://a:1,9009=wss://a:1,9010=wss://a:1,9011=wss://a:1,9012=wss://a:1,\
    9013=wss://a:1,9014=wss://a:1,9015=wss://a:1,9016=wss://a:1,9017=wss://a:1";

/// Every bad annotation denies the pod with a message naming the annotation and the value.
#[test]
fn every_bad_annotation_denies_the_pod_naming_annotation_and_value() {
    type Case<'a> = (&'a [(&'a str, &'a str)], &'a str, &'a str);
    let cases: &[Case] = &[
        (&[("wsgate.dev/inject", "yes")], "wsgate.dev/inject", "yes"),
        (
            &[("wsgate.dev/upstream-port", "0")],
            "wsgate.dev/upstream-port",
            "'0' is out of range",
        ),
        (
            &[("wsgate.dev/upstream-port", "70000")],
            "wsgate.dev/upstream-port",
            "'70000' is out of range",
        ),
        (
            &[("wsgate.dev/upstream-port", "http")],
            "wsgate.dev/upstream-port",
            "'http' is not a port",
        ),
        (
            &[("wsgate.dev/upstream-port", "9901")],
            "wsgate.dev/upstream-port",
            "admin port",
        ),
        (&[("wsgate.dev/port", "-1")], "wsgate.dev/port", "'-1'"),
        (&[("wsgate.dev/port", "8080")], "wsgate.dev/port", "'8080'"),
        (&[("wsgate.dev/port", "9901")], "wsgate.dev/port", "admin port"),
        (
            &[("wsgate.dev/allow", "spiffe://cluster.local/ns/fr*nt")],
            "wsgate.dev/allow",
            "fr*nt",
        ),
        (&[("wsgate.dev/allow", " , ")], "wsgate.dev/allow", "no pattern"),
        (&[("wsgate.dev/allow", "frontend")], "wsgate.dev/allow", "'frontend'"),
        (&[("wsgate.dev/secret", "Bad_Name")], "wsgate.dev/secret", "'Bad_Name'"),
        (
            &[("wsgate.dev/trust-bundle", "a/b")],
            "wsgate.dev/trust-bundle",
            "'a/b'",
        ),
        (
            &[("wsgate.dev/dns-names", "ok.svc,not a name")],
            "wsgate.dev/dns-names",
            "not a name",
        ),
        (
            &[("wsgate.dev/dns-names", "api.prod.svc")],
            "wsgate.dev/dns-names",
            "not a Service name of namespace demo",
        ),
        (
            &[("wsgate.dev/dns-names", "x.demo.svc.b.svc.cluster.local")],
            "wsgate.dev/dns-names",
            "'x.demo.svc.b.svc.cluster.local', which is not a Service name of namespace demo",
        ),
        (
            &[("wsgate.dev/dns-names", "api.demo.svc.attacker.example")],
            "wsgate.dev/dns-names",
            "'api.demo.svc.attacker.example', which is not a Service name of namespace demo",
        ),
        (
            &[("wsgate.dev/cpu-request", "lots")],
            "wsgate.dev/cpu-request",
            "'lots' is not a Kubernetes quantity",
        ),
        (
            &[("wsgate.dev/memory-request", "1Gb")],
            "wsgate.dev/memory-request",
            "'1Gb' is not a Kubernetes quantity",
        ),
        (&[("wsgate.dev/cpu-limit", "-1")], "wsgate.dev/cpu-limit", "'-1'"),
        (
            &[("wsgate.dev/memory-limit", "")],
            "wsgate.dev/memory-limit",
            "is not a Kubernetes quantity",
        ),
        (
            &[("wsgate.dev/outbound", "9001=ws://chat.shop.svc:8080")],
            "wsgate.dev/outbound",
            "'9001=ws://chat.shop.svc:8080' has a plain ws:// remote",
        ),
        (
            &[("wsgate.dev/outbound", "9001=wss://chat.shop.svc:84430")],
            "wsgate.dev/outbound",
            "has a remote port '84430' that is out of range",
        ),
        (
            &[("wsgate.dev/outbound", "9001=wss://chat.shop.svc")],
            "wsgate.dev/outbound",
            "has a remote without a port",
        ),
        (
            &[("wsgate.dev/outbound", "70000=wss://chat.shop.svc:8443")],
            "wsgate.dev/outbound",
            "has local port '70000' that is out of range",
        ),
        (
            &[("wsgate.dev/outbound", "127.0.0.1:9001=wss://chat.shop.svc:8443")],
            "wsgate.dev/outbound",
            "give the port alone",
        ),
        (
            &[("wsgate.dev/outbound", "8443=wss://chat.shop.svc:8443")],
            "wsgate.dev/outbound",
            "the sidecar's mTLS port 8443",
        ),
        (
            &[("wsgate.dev/outbound", "9901=wss://chat.shop.svc:8443")],
            "wsgate.dev/outbound",
            "the sidecar's admin port 9901",
        ),
        (
            &[
                ("wsgate.dev/port", "9443"),
                ("wsgate.dev/outbound", "9443=wss://chat.shop.svc:8443"),
            ],
            "wsgate.dev/outbound",
            "the sidecar's mTLS port 9443",
        ),
        (
            &[("wsgate.dev/outbound", "8080=wss://chat.shop.svc:8443")],
            "wsgate.dev/outbound",
            "the app's port 8080",
        ),
        (
            &[("wsgate.dev/outbound", "9001=wss://a.svc:8443, 9001=wss://b.svc:8443")],
            "wsgate.dev/outbound",
            "'9001=wss://b.svc:8443' uses local port 9001, which is the local port of another entry",
        ),
        (
            &[("wsgate.dev/outbound", TOO_MANY_OUTBOUND)],
            "wsgate.dev/outbound",
            "has 17 entries; wsgate takes at most 16",
        ),
        (
            &[
                ("wsgate.dev/outbound", "9001=wss://chat.shop.svc:8443"),
                ("wsgate.dev/outbound-expect", "9001=chat"),
            ],
            "wsgate.dev/outbound-expect",
            "'9001=chat' has a bad pattern",
        ),
        (
            &[
                ("wsgate.dev/outbound", "9001=wss://chat.shop.svc:8443"),
                ("wsgate.dev/outbound-expect", "9002=dns:chat.shop.svc"),
            ],
            "wsgate.dev/outbound-expect",
            "names local port 9002, which no wsgate.dev/outbound entry has",
        ),
        (
            &[("wsgate.dev/outbound-expect", "9001=dns:chat.shop.svc")],
            "wsgate.dev/outbound-expect",
            "is set but wsgate.dev/outbound is not",
        ),
    ];
    for (annotations, name, fragment) in cases {
        let mut review = fixture("pod-create-kubectl-apply.captured-k8s-1.20.json");
        annotate(&mut review, &[("wsgate.dev/inject", "true")]);
        annotate(&mut review, annotations);
        let out = run(&review, false, false);
        let resp = &out.response["response"];
        assert_eq!(resp["allowed"], false, "{annotations:?} should be denied");
        assert!(out.patch.is_none());
        let msg = resp["status"]["message"].as_str().unwrap();
        assert!(msg.contains(name) && msg.contains(fragment), "{annotations:?}: {msg}");
    }
    // Without wsgate.dev/upstream-port, the pod must declare exactly one container port.
    let mut review = fixture("pod-create-generatename-dryrun.captured-k8s-1.20.json");
    annotate(&mut review, &[("wsgate.dev/inject", "true")]);
    let msg = run(&review, false, false).response["response"]["status"]["message"]
        .as_str()
        .unwrap()
        .to_owned();
    assert!(
        msg.contains("wsgate.dev/upstream-port") && msg.contains("0 TCP container ports"),
        "{msg}"
    );
}

/// `wsgate.dev/{cpu,memory}-{request,limit}` replace the injector's `--sidecar-*` values one by
/// one; the others stay (through the webhook, so review.rs keeps these annotations).
#[test]
fn resource_annotations_override_the_injectors_defaults_one_by_one() {
    let mut review = fixture("pod-create-kubectl-apply.captured-k8s-1.20.json");
    annotate(
        &mut review,
        &[
            ("wsgate.dev/inject", "true"),
            ("wsgate.dev/cpu-request", "250m"),
            ("wsgate.dev/cpu-limit", "1"),
            ("wsgate.dev/memory-limit", "256Mi"),
        ],
    );
    let out = run(&review, false, false);
    let c = sidecar_of(&out.pod, false);
    let res = c.resources.as_ref().unwrap();
    let requests = res.requests.as_ref().unwrap();
    let limits = res.limits.as_ref().unwrap();
    assert_eq!(requests["cpu"].0, "250m");
    assert_eq!(requests["memory"].0, "32Mi", "the injector's default stays");
    assert_eq!(limits["cpu"].0, "1", "a limit the injector does not set by default");
    assert_eq!(limits["memory"].0, "256Mi");
}

fn workers_of(c: &Container) -> String {
    let env = c.env.iter().flatten().find(|e| e.name == "TOKIO_WORKER_THREADS");
    env.and_then(|e| e.value.clone())
        .expect("TOKIO_WORKER_THREADS on the sidecar")
}

/// Without it tokio would start one worker per CPU of the node (the default sidecar has no CPU
/// limit): the sidecar gets its CPU limit rounded up, else its request, at least one.
#[test]
fn the_sidecar_runs_as_many_workers_as_the_cpus_it_asks_for_and_one_by_default() {
    let cases: [(&[(&str, &str)], &str); 5] = [
        // The injector's default: 50m requested, no limit.
        (&[], "1"),
        (&[("wsgate.dev/cpu-limit", "1500m")], "2"),
        (&[("wsgate.dev/cpu-request", "3"), ("wsgate.dev/cpu-limit", "2")], "2"),
        (&[("wsgate.dev/cpu-request", "2.5")], "3"),
        (&[("wsgate.dev/cpu-limit", "1k")], "64"),
    ];
    for (extra, want) in cases {
        let mut review = fixture("pod-create-kubectl-apply.captured-k8s-1.20.json");
        annotate(&mut review, &[("wsgate.dev/inject", "true")]);
        annotate(&mut review, extra);
        for native in [false, true] {
            let out = run(&review, false, native);
            let c = sidecar_of(&out.pod, native);
            assert_eq!(workers_of(&c), want, "{extra:?}");
        }
    }
    use wsgate::inject::patch::sidecar_workers;
    assert_eq!(sidecar_workers(None, None), 1);
    assert_eq!(sidecar_workers(Some("0"), Some("4")), 1, "a zero limit still runs one");
    assert_eq!(sidecar_workers(Some("100Mi"), None), 64, "nonsense for a CPU is capped");
    assert_eq!(
        sidecar_workers(Some("1e3"), Some("2")),
        2,
        "not a quantity: the request"
    );
}

#[test]
fn one_outbound_entry_becomes_a_loopback_listener_of_the_sidecar_without_a_warning() {
    let mut review = fixture("pod-create-kubectl-apply.captured-k8s-1.20.json");
    annotate(
        &mut review,
        &[
            ("wsgate.dev/inject", "true"),
            ("wsgate.dev/outbound", "9001=wss://chat.shop.svc.cluster.local:8443/"),
        ],
    );
    let out = run(&review, false, false);
    assert_eq!(out.response["response"]["allowed"], true);
    assert!(out.response["response"]["warnings"].is_null(), "{}", out.response);
    let c = sidecar_of(&out.pod, false);
    assert_eq!(
        arg_after(&c, "--outbound"),
        vec!["127.0.0.1:9001=wss://chat.shop.svc.cluster.local:8443"]
    );
    assert!(arg_after(&c, "--outbound-expect").is_empty());
    // The inbound side is as without the annotation, and the pod's identity is the same Secret.
    assert_eq!(arg_after(&c, "--upstream"), vec!["ws://127.0.0.1:8080"]);
    assert_common_sidecar(&out.pod, &c, "wsgate-default");
    // Loopback listeners are not declared as container ports: nothing outside the pod reaches them.
    let ports: Vec<i32> = c.ports.unwrap().iter().map(|p| p.container_port).collect();
    assert_eq!(ports, vec![8443, 9901]);
}

#[test]
fn several_outbound_entries_with_expectations_are_passed_in_order() {
    let mut review = fixture("pod-create-replicaset-native-sidecar.k8s-1.30.json");
    annotate(
        &mut review,
        &[
            (
                "wsgate.dev/outbound",
                "9001=wss://chat.shop.svc.cluster.local:8443, 9002=wss://10.0.0.7:443, 9003=wss://[fd00::7]:8443",
            ),
            (
                "wsgate.dev/outbound-expect",
                "9003=dns:feed.*.svc, 9001=spiffe://cluster.local/ns/shop/sa/chat",
            ),
        ],
    );
    let out = run(&review, true, true);
    let c = sidecar_of(&out.pod, true);
    assert_eq!(
        arg_after(&c, "--outbound"),
        vec![
            "127.0.0.1:9001=wss://chat.shop.svc.cluster.local:8443",
            "127.0.0.1:9002=wss://10.0.0.7:443",
            "127.0.0.1:9003=wss://[fd00::7]:8443",
        ]
    );
    assert_eq!(
        arg_after(&c, "--outbound-expect"),
        vec![
            "127.0.0.1:9001=spiffe://cluster.local/ns/shop/sa/chat",
            "127.0.0.1:9003=dns:feed.*.svc",
        ]
    );
    assert_common_sidecar(&out.pod, &c, "wsgate-checkout");
    golden("outbound", out.patch.as_ref().unwrap());
}

/// The captured worker pod declares no container port: with outbound entries it gets an
/// outbound-only sidecar (no mTLS listener, no app, no allow-list, no mTLS container port) that
/// still has the certificate, the admin port, the probes and the preStop drain.
#[test]
fn a_pod_with_outbound_entries_and_no_app_port_gets_an_outbound_only_sidecar() {
    let mut review = fixture("pod-create-generatename-dryrun.captured-k8s-1.20.json");
    annotate(
        &mut review,
        &[
            ("wsgate.dev/outbound", "9001=wss://chat.shop.svc.cluster.local:8443"),
            (
                "wsgate.dev/outbound-expect",
                "9001=spiffe://cluster.local/ns/shop/sa/chat",
            ),
        ],
    );
    let out = run(&review, true, true);
    assert_eq!(out.response["response"]["allowed"], true, "{}", out.response);
    assert!(out.response["response"]["warnings"].is_null(), "{}", out.response);
    let c = sidecar_of(&out.pod, true);
    for flag in ["--listen", "--upstream", "--allow"] {
        assert!(arg_after(&c, flag).is_empty(), "{flag}: {:?}", args(&c));
    }
    assert_eq!(
        arg_after(&c, "--outbound"),
        vec!["127.0.0.1:9001=wss://chat.shop.svc.cluster.local:8443"]
    );
    assert_eq!(
        arg_after(&c, "--outbound-expect"),
        vec!["127.0.0.1:9001=spiffe://cluster.local/ns/shop/sa/chat"]
    );
    let ports: Vec<_> = c
        .ports
        .iter()
        .flatten()
        .map(|p| (p.name.clone().unwrap(), p.container_port))
        .collect();
    assert_eq!(ports, vec![("wsgate-admin".to_owned(), 9901)], "no wsgate-mtls port");
    assert_common_sidecar(&out.pod, &c, "wsgate-default");
    golden("outbound-only", out.patch.as_ref().unwrap());
}

/// On an outbound-only pod nothing listens: asking for a listener's port or allow-list denies
/// the pod, saying how to get the inbound side (name the app's port) or what to remove.
#[test]
fn an_outbound_only_pod_asking_for_a_port_or_an_allow_list_is_denied() {
    for (annotation, value) in [
        ("wsgate.dev/allow", "spiffe://cluster.local/ns/web/sa/frontend"),
        ("wsgate.dev/port", "9443"),
    ] {
        let mut review = fixture("pod-create-generatename-dryrun.captured-k8s-1.20.json");
        annotate(
            &mut review,
            &[
                ("wsgate.dev/outbound", "9001=wss://chat.shop.svc.cluster.local:8443"),
                (annotation, value),
            ],
        );
        let out = run(&review, true, true);
        let resp = &out.response["response"];
        assert_eq!(resp["allowed"], false, "{annotation}: {resp}");
        assert!(out.patch.is_none());
        let msg = resp["status"]["message"].as_str().unwrap();
        assert!(
            msg.starts_with(&format!("wsgate: annotation {annotation}: '{value}' is set, but the sidecar of this pod only dials out and has no inbound listener"))
                && msg.contains("set wsgate.dev/upstream-port to the app's port"),
            "{msg}"
        );
    }
}

/// The captured pod, with `annotations`, these init containers (none when `[]`) and these ports
/// added to its app container, is denied with a message containing `fragment`.
fn assert_port_taken(
    annotations: &[(&str, &str)],
    init_containers: Value,
    extra_app_ports: Value,
    native: bool,
    fragment: &str,
) {
    let mut review = fixture("pod-create-kubectl-apply.captured-k8s-1.20.json");
    annotate(
        &mut review,
        &[("wsgate.dev/inject", "true"), ("wsgate.dev/upstream-port", "8080")],
    );
    annotate(&mut review, annotations);
    let spec = &mut review["request"]["object"]["spec"];
    if init_containers != json!([]) {
        spec["initContainers"] = init_containers;
    }
    let ports = spec["containers"][0]["ports"].as_array_mut().unwrap();
    ports.extend(extra_app_ports.as_array().unwrap().iter().cloned());
    let out = run(&review, false, native);
    let resp = &out.response["response"];
    assert_eq!(resp["allowed"], false, "{fragment}: {resp}");
    assert!(out.patch.is_none());
    let msg = resp["status"]["message"].as_str().unwrap();
    assert!(msg.starts_with("wsgate: ") && msg.contains(fragment), "{msg}");
}

#[test]
fn an_outbound_port_declared_by_any_container_denies_the_pod_naming_port_and_container() {
    for (native, init_containers, extra_app_ports, fragment) in [
        (
            false,
            json!([]),
            json!([{"containerPort": 9001}]),
            "the sidecar's outbound port 9001 is already declared by container web; choose another local port in wsgate.dev/outbound",
        ),
        (
            true,
            json!([{"name": "setup", "image": "busybox", "ports": [{"containerPort": 9002, "protocol": "TCP"}]}]),
            json!([]),
            "the sidecar's outbound port 9002 is already declared by init container setup",
        ),
    ] {
        assert_port_taken(
            &[("wsgate.dev/outbound", "9001=wss://chat:8443,9002=wss://feed:8443")],
            init_containers,
            extra_app_ports,
            native,
            fragment,
        );
    }
    // A UDP port of the same number does not collide with a TCP listener.
    let mut review = fixture("pod-create-kubectl-apply.captured-k8s-1.20.json");
    annotate(
        &mut review,
        &[
            ("wsgate.dev/inject", "true"),
            ("wsgate.dev/outbound", "9001=wss://chat:8443"),
        ],
    );
    review["request"]["object"]["spec"]["containers"][0]["ports"]
        .as_array_mut()
        .unwrap()
        .push(json!({"containerPort": 9001, "protocol": "UDP"}));
    assert!(run(&review, false, false).patch.is_some());
}

#[test]
fn a_sidecar_port_declared_by_any_container_denies_the_pod_naming_port_and_container() {
    let init = |ports: Value| json!([{"name": "setup", "image": "busybox", "ports": ports}]);
    let cases: [(&str, Value, Value, &str); 5] = [
        (
            "8443",
            init(json!([{"containerPort": 8443}])),
            json!([]),
            "the sidecar's mTLS port 8443 is already declared by init container setup; choose another with wsgate.dev/port",
        ),
        (
            "8443",
            init(json!([{"containerPort": 9901, "protocol": "TCP"}])),
            json!([]),
            "the sidecar's admin port 9901 is already declared by init container setup",
        ),
        (
            "8443",
            json!([]),
            json!([{"containerPort": 9901}]),
            "the sidecar's admin port 9901 is already declared by container web",
        ),
        (
            "7443",
            json!([]),
            json!([{"containerPort": 7443, "protocol": "TCP"}]),
            "'7443' is already used by container web",
        ),
        (
            "8443",
            init(json!([{"containerPort": 8443}, {"containerPort": 9901}])),
            json!([{"containerPort": 9901}]),
            "mTLS port 8443 is already declared by init container setup",
        ),
    ];
    for (port, init_containers, extra_app_ports, fragment) in cases {
        for native in [false, true] {
            assert_port_taken(
                &[("wsgate.dev/port", port)],
                init_containers.clone(),
                extra_app_ports.clone(),
                native,
                fragment,
            );
        }
    }
    // The same numbers over UDP (or SCTP) do not collide with the sidecar's TCP listeners.
    let mut review = fixture("pod-create-kubectl-apply.captured-k8s-1.20.json");
    annotate(
        &mut review,
        &[("wsgate.dev/inject", "true"), ("wsgate.dev/upstream-port", "8080")],
    );
    let spec = &mut review["request"]["object"]["spec"];
    spec["initContainers"] = init(json!([{"containerPort": 8443, "protocol": "UDP"}]));
    spec["containers"][0]["ports"]
        .as_array_mut()
        .unwrap()
        .push(json!({"containerPort": 9901, "protocol": "SCTP"}));
    assert!(run(&review, false, true).patch.is_some());
}

/// The pod is admitted as it came, without a patch, with one warning containing `fragment`.
fn assert_declined(out: &Outcome, fragment: &str) {
    let resp = &out.response["response"];
    assert_eq!(resp["allowed"], true, "{resp}");
    assert!(out.patch.is_none(), "no patch: {resp}");
    let warnings = resp["warnings"].as_array().expect("a warning says why");
    assert_eq!(warnings.len(), 1);
    assert!(warnings[0].as_str().unwrap().contains(fragment), "{warnings:?}");
}

#[test]
fn a_host_network_pod_is_admitted_unchanged_with_a_warning() {
    for native in [false, true] {
        let mut review = fixture("pod-create-kubectl-apply.captured-k8s-1.20.json");
        annotate(
            &mut review,
            &[("wsgate.dev/inject", "true"), ("wsgate.dev/port", "9443")],
        );
        review["request"]["object"]["spec"]["hostNetwork"] = json!(true);
        let out = run(&review, false, native);
        assert_declined(&out, "hostNetwork");
        assert_declined(&out, "9443 and admin 9901");
        // Also in an enabled namespace, and whatever its other annotations say.
        annotate(&mut review, &[("wsgate.dev/port", "70000")]);
        assert_declined(&run(&review, true, native), "hostNetwork");
    }
    let mut review = fixture("pod-create-kubectl-apply.captured-k8s-1.20.json");
    annotate(&mut review, &[("wsgate.dev/inject", "true")]);
    review["request"]["object"]["spec"]["hostNetwork"] = json!(false);
    assert!(
        run(&review, false, false).patch.is_some(),
        "hostNetwork: false is injected"
    );
}

#[test]
fn a_pod_that_must_complete_gets_only_a_native_sidecar() {
    for policy in ["Never", "OnFailure"] {
        let mut review = fixture("pod-create-kubectl-apply.captured-k8s-1.20.json");
        annotate(&mut review, &[("wsgate.dev/inject", "true")]);
        review["request"]["object"]["spec"]["restartPolicy"] = json!(policy);
        let out = run(&review, false, true);
        let c = sidecar_of(&out.pod, true);
        assert_eq!(
            c.restart_policy.as_deref(),
            Some("Always"),
            "{policy}: a native sidecar"
        );
        let spec = out.pod.spec.as_ref().unwrap();
        assert!(
            spec.containers.iter().all(|c| c.name != SIDECAR),
            "{policy}: not among the containers"
        );
        let out = run(&review, true, false);
        assert_declined(&out, &format!("restartPolicy {policy} and must complete"));
        assert_declined(&out, "native sidecars are off");
    }
    let mut review = fixture("pod-create-kubectl-apply.captured-k8s-1.20.json");
    annotate(&mut review, &[("wsgate.dev/inject", "true")]);
    review["request"]["object"]["spec"]["restartPolicy"] = json!("Always");
    let out = run(&review, false, false);
    assert_eq!(
        sidecar_of(&out.pod, false).restart_policy,
        None,
        "Always: an ordinary sidecar is fine"
    );
}

#[test]
fn a_malformed_review_is_an_error_not_a_panic() {
    let hook = webhook(true);
    for body in [
        &b"not json"[..],
        b"{}",
        br#"{"apiVersion":"admission.k8s.io/v1","kind":"AdmissionReview"}"#,
        br#"{"request": 7}"#,
    ] {
        assert!(hook.review(body, false).is_err(), "{}", String::from_utf8_lossy(body));
    }
}

#[test]
fn native_sidecars_are_assumed_from_kubernetes_1_29() {
    use wsgate::inject::{parse_version, supports_native_sidecars};
    assert_eq!(parse_version("1", "29+"), Some((1, 29)));
    assert_eq!(parse_version("1", "20"), Some((1, 20)));
    assert_eq!(parse_version("x", "1"), None);
    assert!(supports_native_sidecars((1, 29)));
    assert!(supports_native_sidecars((1, 34)));
    assert!(!supports_native_sidecars((1, 28)));
    assert!(!supports_native_sidecars((1, 20)));
    // Kubelets lag behind the API server during upgrades: every one must be 1.29 or later.
    use wsgate::inject::kubelets_support_native_sidecars as all_native;
    assert!(all_native(["v1.29.3", "v1.30.1-eks-a1b2"].into_iter()));
    assert!(!all_native(["v1.30.1", "v1.28.9"].into_iter()));
    assert!(!all_native(["garbage"].into_iter()));
    assert!(all_native(std::iter::empty()));
}

/// The sidecar command-line check: every container the injector writes must start the proxy.
///
/// The check of one case runs in a child process (this test binary again, this test alone), so
/// that the container's environment, after the kubelet's `$(VAR)` expansion, is the child's whole
/// `WSGATE_*`/`OTEL_*` environment: clap reads flags' environment twins from the process, and
/// `into_config` reads the `OTEL_*` variables, exactly as in the binary.
mod sidecar_command_line {
    use std::path::PathBuf;

    use k8s_openapi::api::core::v1::{Container, Pod};
    use serde_json::{Value, json};
    use wsgate::cli::{Cli, Command};
    use wsgate::inject::annotations::ADMIN_PORT;
    use wsgate::inject::patch::{Mutation, TLS_MOUNT, TRUST_MOUNT, mutate};
    use wsgate::inject::settings::InjectSettings;

    use super::{annotate, fixture, run_with, sidecar_of};

    /// Set in the child: the case to check, as JSON.
    const CASE_VAR: &str = "IT_SIDECAR_COMMAND_LINE_CASE";
    /// What the child prints once a case passed (a child that ran no test prints nothing).
    const PASSED: &str = "sidecar command line accepted:";

    /// The injector's settings from `wsgate inject` flags, as the binary derives them.
    fn injector_settings(flags: &[&str]) -> InjectSettings {
        let argv = ["wsgate", "inject", "--sidecar-image", "ghcr.io/wsgate/wsgate:0.1.0"]
            .into_iter()
            .chain(flags.iter().copied());
        let cli = <Cli as clap::Parser>::try_parse_from(argv).unwrap_or_else(|e| panic!("inject {flags:?}: {e}"));
        let Command::Inject(args) = cli.command else {
            panic!("not `wsgate inject`")
        };
        args.into_config()
            .unwrap_or_else(|e| panic!("inject {flags:?}: {e}"))
            .settings
    }

    /// `$(NAME)` of a variable defined earlier becomes its value, `$$` a `$`; anything else stays
    /// as written (the kubelet's expansion of `env[].value`).
    fn expand(value: &str, defined: &[(String, String)]) -> String {
        let mut out = String::new();
        let mut rest = value;
        while let Some(i) = rest.find('$') {
            out.push_str(&rest[..i]);
            let after = &rest[i + 1..];
            if let Some(r) = after.strip_prefix('$') {
                out.push('$');
                rest = r;
            } else if let Some(r) = after.strip_prefix('(')
                && let Some(end) = r.find(')')
                && let Some((_, v)) = defined.iter().rev().find(|(k, _)| *k == r[..end])
            {
                out.push_str(v);
                rest = &r[end + 1..];
            } else {
                out.push('$');
                rest = after;
            }
        }
        out.push_str(rest);
        out
    }

    /// The container's environment as the kubelet gives it to the process.
    fn container_env(c: &Container, pod_name: &str, namespace: &str) -> Vec<(String, String)> {
        assert!(
            c.env_from.is_none(),
            "the sidecar takes variables from a ConfigMap or Secret (envFrom): resolve them in this test"
        );
        let mut env: Vec<(String, String)> = Vec::new();
        for var in c.env.iter().flatten() {
            let value = match (&var.value, &var.value_from) {
                (Some(v), _) => expand(v, &env),
                (None, Some(from)) => {
                    let field = from
                        .field_ref
                        .as_ref()
                        .unwrap_or_else(|| panic!("{}: only fieldRef sources are resolved here", var.name));
                    match field.field_path.as_str() {
                        "metadata.name" => pod_name.to_owned(),
                        "metadata.namespace" => namespace.to_owned(),
                        other => panic!("{}: fieldRef {other} is not resolved here", var.name),
                    }
                }
                (None, None) => String::new(),
            };
            env.push((var.name.clone(), value));
        }
        env
    }

    /// One injected pod: what its sidecar runs, and what the proxy must make of it.
    fn case(label: &str, review: &Value, namespace_enabled: bool, native: bool, settings: InjectSettings) -> Value {
        let out = run_with(review, namespace_enabled, native, settings.clone());
        assert_eq!(out.response["response"]["allowed"], true, "{label}: {}", out.response);
        let c = sidecar_of(&out.pod, native);
        // What the annotations asked for, from the same pure decision the webhook made.
        let request = &review["request"];
        let pod: Pod = serde_json::from_value(request["object"].clone()).unwrap();
        let namespace = request["namespace"].as_str().unwrap();
        let Mutation::Inject { patch, options } = mutate(&pod, namespace, namespace_enabled, &settings, native) else {
            panic!("{label}: not injected")
        };
        assert_eq!(
            out.patch.as_ref(),
            Some(&patch),
            "{label}: the webhook sent another patch"
        );
        // No `command`: the image's entrypoint, /wsgate, gets the args.
        let mut argv = c.command.clone().unwrap_or_else(|| vec!["/wsgate".to_owned()]);
        argv.extend(c.args.clone().unwrap_or_default());
        assert!(argv[0].ends_with("/wsgate"), "{label}: the sidecar runs {argv:?}");
        let pod_name = pod
            .metadata
            .name
            .clone()
            .unwrap_or_else(|| format!("{}x7k2p", pod.metadata.generate_name.clone().unwrap_or_default()));
        json!({
            "label": label,
            "argv": argv,
            "env": container_env(&c, &pod_name, namespace),
            "expect": {
                // An outbound-only pod: no listener, no upstream, no allow-list.
                "listen": options.inbound.as_ref().map(|i| format!("0.0.0.0:{}", i.port)),
                "admin": format!("0.0.0.0:{ADMIN_PORT}"),
                "upstream": options.inbound.as_ref().map(|i| format!("ws://127.0.0.1:{}", i.upstream_port)),
                "trust_bundle": options.trust_bundle.as_ref().map(|_| TRUST_MOUNT),
                "allow": options.inbound.as_ref().map(|i| &i.allow),
                "log_format": format!("{:?}", settings.log_format),
                "otlp_endpoint": settings.otlp.as_ref().map(|(endpoint, _)| endpoint),
                "pod_name": pod_name,
                "namespace": namespace,
                "service_name": options.service_name,
                "outbound": options
                    .outbound
                    .iter()
                    .map(|o| json!({"local": o.local(), "remote": o.remote, "expect": o.expect}))
                    .collect::<Vec<_>>(),
            },
        })
    }

    /// Every annotation the injector reads, set.
    fn every_annotation(review: &mut Value, namespace: &str) {
        let dns = format!("checkout.{namespace}.svc,checkout.{namespace}.svc.cluster.local");
        // A Secret name under the pod's own service account's prefix.
        let sa = review["request"]["object"]["spec"]["serviceAccountName"]
            .as_str()
            .unwrap_or("default");
        let secret = format!("wsgate-{sa}-mtls");
        annotate(
            review,
            &[
                ("wsgate.dev/inject", "true"),
                ("wsgate.dev/upstream-port", "8080"),
                ("wsgate.dev/port", "9443"),
                (
                    "wsgate.dev/allow",
                    "spiffe://cluster.local/ns/web/sa/frontend, spiffe://cluster.local/ns/ops/**, dns:*.shop.svc, cn:legacy-client",
                ),
                ("wsgate.dev/secret", &secret),
                ("wsgate.dev/trust-bundle", "cluster-trust"),
                ("wsgate.dev/dns-names", &dns),
            ],
        );
    }

    fn cases() -> Vec<Value> {
        let defaults = injector_settings(&[]);
        let tuned = injector_settings(&[
            "--trust-domain",
            "example.org",
            "--sidecar-log-format",
            "text",
            "--otlp-endpoint",
            "http://otel-collector.observability:4318",
            "--otlp-protocol",
            "http/protobuf",
            "--default-allow",
            "spiffe://{trust-domain}/ns/{namespace}/sa/*,dns:*.{namespace}.svc",
        ]);
        let grpc = injector_settings(&["--otlp-endpoint", "http://10.0.0.7:4317", "--otlp-protocol", "grpc"]);
        let apply = || {
            let mut r = fixture("pod-create-kubectl-apply.captured-k8s-1.20.json");
            annotate(&mut r, &[("wsgate.dev/inject", "true")]);
            r
        };
        let replicaset = || fixture("pod-create-replicaset-native-sidecar.k8s-1.30.json");
        let mut dry_run = fixture("pod-create-generatename-dryrun.captured-k8s-1.20.json");
        annotate(&mut dry_run, &[("wsgate.dev/upstream-port", "9000")]);
        let mut annotated_native = replicaset();
        every_annotation(&mut annotated_native, "shop");
        let mut annotated_ordinary = apply();
        every_annotation(&mut annotated_ordinary, "demo");
        vec![
            case("defaults, ordinary container", &apply(), false, false, defaults.clone()),
            case(
                "defaults, enabled namespace, native sidecar",
                &replicaset(),
                true,
                true,
                defaults.clone(),
            ),
            case("defaults, generateName dry run", &dry_run, true, true, defaults.clone()),
            case(
                "every annotation, native sidecar",
                &annotated_native,
                false,
                true,
                defaults.clone(),
            ),
            case(
                "every annotation, ordinary container, text logs, OTLP over HTTP",
                &annotated_ordinary,
                false,
                false,
                tuned.clone(),
            ),
            case(
                "default allow of two patterns, text logs, OTLP over HTTP",
                &apply(),
                false,
                true,
                tuned,
            ),
            case("defaults, OTLP over gRPC", &replicaset(), true, true, grpc),
        ]
    }

    /// Child side: parses the case's argv with the proxy's own command line in this process,
    /// whose environment is the container's, and converts it as `main` does.
    fn check_in_this_process(case: &Value) {
        let label = case["label"].as_str().unwrap();
        let argv: Vec<String> = serde_json::from_value(case["argv"].clone()).unwrap();
        let expect = &case["expect"];
        let cli = <Cli as clap::Parser>::try_parse_from(&argv)
            .unwrap_or_else(|e| panic!("{label}: the proxy's command line refuses {argv:?}:\n{e}"));
        assert_eq!(format!("{:?}", cli.log_format), expect["log_format"], "{label}");
        let Command::Proxy(args) = cli.command else {
            panic!("{label}: {argv:?} is not `wsgate proxy`")
        };
        let cfg = args
            .into_config()
            .unwrap_or_else(|e| panic!("{label}: {argv:?} is refused as a proxy config: {e}"));
        assert_eq!(cfg.admin, expect["admin"].as_str().unwrap().parse().unwrap(), "{label}");
        assert_eq!(
            cfg.upstream,
            expect["upstream"]
                .as_str()
                .map(|u| wsgate::proxy::settings::Upstream::parse(u, false).unwrap()),
            "{label}"
        );
        assert_eq!(cfg.cert_dir, PathBuf::from(TLS_MOUNT), "{label}");
        assert_eq!(
            cfg.trust_bundle,
            expect["trust_bundle"].as_str().map(PathBuf::from),
            "{label}"
        );
        match expect["listen"].as_str() {
            Some(listen) => {
                assert_eq!(cfg.listen, listen.parse().unwrap(), "{label}");
                let allow: Vec<String> = serde_json::from_value(expect["allow"].clone()).unwrap();
                assert!(!allow.is_empty(), "{label}: no allow pattern expected");
                assert_eq!(
                    cfg.policy,
                    wsgate::authz::Policy::new(&allow, false).unwrap(),
                    "{label}: the allow-list"
                );
            }
            // Outbound only: the proxy binds no mTLS listener and admits nobody.
            None => {
                assert_eq!(cfg.upstream, None, "{label}: outbound only");
                assert!(expect["allow"].is_null(), "{label}");
                assert_eq!(cfg.policy, wsgate::authz::Policy::nobody(), "{label}");
            }
        }
        // The OTEL_* variables the injector sets are read without a complaint.
        let otel = &cfg.otel;
        assert!(otel.warnings.is_empty(), "{label}: {:?}", otel.warnings);
        match expect["otlp_endpoint"].as_str() {
            None => assert_eq!(otel.endpoint, None, "{label}"),
            Some(endpoint) => assert!(
                otel.endpoint.as_deref().is_some_and(|e| e.starts_with(endpoint)),
                "{label}: {:?} is not the injector's {endpoint}",
                otel.endpoint
            ),
        }
        let resource = |key: &str| {
            otel.resource
                .iter()
                .find(|kv| kv.key.as_str() == key)
                .map(|kv| kv.value.to_string())
        };
        assert_eq!(
            resource("k8s.pod.name"),
            expect["pod_name"].as_str().map(str::to_owned),
            "{label}"
        );
        assert_eq!(
            resource("k8s.namespace.name"),
            expect["namespace"].as_str().map(str::to_owned),
            "{label}"
        );
        assert_eq!(
            resource("service.name"),
            expect["service_name"].as_str().map(str::to_owned),
            "{label}"
        );
        // The outbound entries reached the config, in order: the loopback listener, the remote
        // and the expectation each asked for.
        let wanted: Vec<(std::net::SocketAddr, String, Option<Vec<String>>)> = expect["outbound"]
            .as_array()
            .unwrap()
            .iter()
            .map(|o| {
                (
                    o["local"].as_str().unwrap().parse().unwrap(),
                    o["remote"].as_str().unwrap().to_owned(),
                    o["expect"].as_str().map(|p| vec![p.to_owned()]),
                )
            })
            .collect();
        let routes: Vec<(std::net::SocketAddr, String, Option<Vec<String>>)> = cfg
            .outbound
            .routes
            .iter()
            .map(|r| (r.local, r.remote.url.clone(), r.expect.as_ref().map(|(_, p)| p.clone())))
            .collect();
        assert_eq!(routes, wanted, "{label}");
        assert!(routes.iter().all(|(local, ..)| local.ip().is_loopback()), "{label}");
        println!("{PASSED} {label}");
    }

    /// `--cluster-domain` is the only suffix a DNS name may carry after `NAME.NAMESPACE.svc`.
    #[test]
    fn the_cluster_domain_flag_decides_which_long_service_names_are_allowed() {
        assert_eq!(injector_settings(&[]).cluster_domain, "cluster.local");
        let corp = injector_settings(&["--cluster-domain", "K8s.Corp."]);
        assert_eq!(corp.cluster_domain, "k8s.corp");
        for (name, settings, allowed) in [
            ("api.demo.svc.cluster.local", injector_settings(&[]), true),
            ("api.demo.svc.k8s.corp", corp.clone(), true),
            ("api.demo.svc", corp.clone(), true),
            ("api.demo.svc.cluster.local", corp, false),
        ] {
            let mut review = fixture("pod-create-kubectl-apply.captured-k8s-1.20.json");
            annotate(
                &mut review,
                &[("wsgate.dev/inject", "true"), ("wsgate.dev/dns-names", name)],
            );
            let out = run_with(&review, false, false, settings);
            assert_eq!(out.response["response"]["allowed"], allowed, "{name}");
        }
    }

    /// Every sidecar the injector writes (default options, every annotation set, the injector's
    /// own flags varied, native and ordinary containers) runs a command line and an environment
    /// that the proxy's own parser accepts and turns into the config the pod asked for.
    #[test]
    fn every_sidecar_the_injector_writes_starts_the_proxy_it_asked_for() {
        let Some(cases) = in_children("every_sidecar_the_injector_writes_starts_the_proxy_it_asked_for", cases) else {
            return;
        };
        // The cases cover the variables the injector sets: each child got the container's whole
        // environment (a WSGATE_* variable among them would be read by clap as a flag's twin).
        let names: Vec<String> = cases
            .iter()
            .flat_map(|c| {
                c["env"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .map(|kv| kv[0].as_str().unwrap().to_owned())
            })
            .collect();
        assert!(names.iter().any(|n| n == "OTEL_RESOURCE_ATTRIBUTES"), "{names:?}");
        assert!(names.iter().any(|n| n == "OTEL_EXPORTER_OTLP_ENDPOINT"), "{names:?}");
    }

    /// Pods with `wsgate.dev/outbound` (one entry; several with expectations, with every other
    /// annotation, native and ordinary) start a proxy with the outbound listeners they asked for.
    #[test]
    fn every_sidecar_with_outbound_entries_starts_the_proxy_it_asked_for() {
        let Some(cases) = in_children(
            "every_sidecar_with_outbound_entries_starts_the_proxy_it_asked_for",
            outbound_cases,
        ) else {
            return;
        };
        assert!(
            cases
                .iter()
                .all(|c| !c["expect"]["outbound"].as_array().unwrap().is_empty())
        );
        assert!(
            cases.iter().any(|c| c["expect"]["upstream"].is_null()),
            "an outbound-only case was checked"
        );
    }

    fn outbound_cases() -> Vec<Value> {
        let defaults = injector_settings(&[]);
        let mut one = fixture("pod-create-kubectl-apply.captured-k8s-1.20.json");
        annotate(
            &mut one,
            &[
                ("wsgate.dev/inject", "true"),
                ("wsgate.dev/outbound", "9001=wss://chat.shop.svc.cluster.local:8443/"),
            ],
        );
        let several = [
            (
                "wsgate.dev/outbound",
                "9001=wss://chat.shop.svc.cluster.local:8443, 9002=wss://10.0.0.7:443, 9003=wss://[fd00::7]:8443",
            ),
            (
                "wsgate.dev/outbound-expect",
                "9001=spiffe://cluster.local/ns/shop/sa/chat, 9003=dns:feed.*.svc",
            ),
        ];
        let mut native = fixture("pod-create-replicaset-native-sidecar.k8s-1.30.json");
        every_annotation(&mut native, "shop");
        annotate(&mut native, &several);
        let mut ordinary = fixture("pod-create-kubectl-apply.captured-k8s-1.20.json");
        every_annotation(&mut ordinary, "demo");
        annotate(&mut ordinary, &several);
        // The worker declares no container port: outbound only.
        let mut client_only = fixture("pod-create-generatename-dryrun.captured-k8s-1.20.json");
        annotate(
            &mut client_only,
            &[
                several[0],
                several[1],
                ("wsgate.dev/trust-bundle", "cluster-trust"),
                ("wsgate.dev/secret", "wsgate-default-client"),
            ],
        );
        vec![
            case("one outbound entry", &one, false, false, defaults.clone()),
            case(
                "outbound only (no app port), native sidecar",
                &client_only,
                true,
                true,
                defaults.clone(),
            ),
            case(
                "every annotation and three outbound entries, native sidecar",
                &native,
                false,
                true,
                defaults.clone(),
            ),
            case(
                "every annotation and three outbound entries, ordinary container",
                &ordinary,
                false,
                false,
                defaults,
            ),
        ]
    }

    /// Runs the check of each of `cases()` in a child process (this test binary again, running
    /// the test `test` alone, in the case's environment); in the child, checks its one case.
    /// Returns the cases checked, or `None` in the child.
    fn in_children(test: &str, cases: fn() -> Vec<Value>) -> Option<Vec<Value>> {
        if let Ok(case) = std::env::var(CASE_VAR) {
            check_in_this_process(&serde_json::from_str(&case).unwrap());
            return None;
        }
        let name = format!("{}::{test}", module_path!().split_once("::").unwrap().1);
        let cases = cases();
        for case in &cases {
            let label = case["label"].as_str().unwrap();
            let mut child = std::process::Command::new(std::env::current_exe().unwrap());
            child.args([
                name.as_str(),
                "--exact",
                "--include-ignored",
                "--nocapture",
                "--test-threads",
                "1",
            ]);
            for (k, _) in std::env::vars_os() {
                let k = k.to_string_lossy();
                if k.starts_with("WSGATE_") || k.starts_with("OTEL_") {
                    child.env_remove(&*k);
                }
            }
            let env: Vec<(String, String)> = serde_json::from_value(case["env"].clone()).unwrap();
            for (k, v) in &env {
                child.env(k, v);
            }
            child.env(CASE_VAR, case.to_string());
            let out = child.output().unwrap();
            let stdout = String::from_utf8_lossy(&out.stdout);
            let stderr = String::from_utf8_lossy(&out.stderr);
            assert!(
                out.status.success() && stdout.contains(&format!("{PASSED} {label}\n")),
                "{label}: the check in a child process ({name}) failed or did not run ({}):\n\
                 argv {}\nenv {env:?}\n--- stdout ---\n{stdout}\n--- stderr ---\n{stderr}",
                out.status,
                case["argv"]
            );
        }
        Some(cases)
    }
}

mod over_https {
    use std::time::Duration;

    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    use super::*;
    use crate::support::raw::{http, metric};
    use crate::support::{Pki, SecretVolume, client_config, wait_serial_of, write_set};

    /// POSTs `body` to `path` over HTTPS; returns (status, body, the server's certificate serial).
    pub(super) async fn post(
        addr: std::net::SocketAddr,
        pki: &Pki,
        method: &str,
        path: &str,
        body: &[u8],
    ) -> (u16, Vec<u8>, String) {
        let cfg = client_config(None, std::slice::from_ref(&pki.ca.cert_der)).unwrap();
        let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
        let mut tls = tokio_rustls::TlsConnector::from(cfg)
            .connect("localhost".try_into().unwrap(), tcp)
            .await
            .unwrap();
        let serial = wsgate::x509::CertSummary::from_der(&tls.get_ref().1.peer_certificates().unwrap()[0])
            .unwrap()
            .serial;
        let head = format!(
            "{method} {path}?timeout=10s HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\nUser-Agent: kube-apiserver-admission\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
            body.len()
        );
        tls.write_all(head.as_bytes()).await.unwrap();
        tls.write_all(body).await.unwrap();
        let mut buf = Vec::new();
        tokio::time::timeout(Duration::from_secs(10), tls.read_to_end(&mut buf))
            .await
            .unwrap()
            .unwrap();
        let split = buf.windows(4).position(|w| w == b"\r\n\r\n").unwrap();
        let status = String::from_utf8_lossy(&buf[..split])
            .split_whitespace()
            .nth(1)
            .unwrap()
            .parse()
            .unwrap();
        (status, buf[split + 4..].to_vec(), serial)
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn the_webhook_answers_over_https_and_rotates_its_serving_certificate() {
        crate::support::init_logs();
        let tmp = tempfile::tempdir().unwrap();
        let pki = Pki::new();
        let vol = SecretVolume::new(tmp.path().join("webhook-tls")).unwrap();
        let first = pki.server();
        write_set(&vol, &first, &pki.ca);
        let cfg = crate::support::inject_config(vol.path(), wsgate::inject::settings::NativeSidecar::On);
        let hook = wsgate::inject::start(cfg, None).await.unwrap();
        wait_serial_of(&hook.store, &first.serial).await;
        assert_eq!(http(hook.admin_addr, "GET", "/readyz").await.0, 200);

        let mut review = fixture("pod-create-kubectl-apply.captured-k8s-1.20.json");
        annotate(&mut review, &[("wsgate.dev/inject", "true")]);
        let body = serde_json::to_vec(&review).unwrap();
        let (status, answer, served) = post(hook.listen_addr, &pki, "POST", "/mutate", &body).await;
        assert_eq!(status, 200, "{}", String::from_utf8_lossy(&answer));
        assert_eq!(served, first.serial);
        let response: Value = serde_json::from_slice(&answer).unwrap();
        assert_eq!(response["response"]["uid"], review["request"]["uid"]);
        let mut object = review["request"]["object"].clone();
        json_patch::patch(&mut object, &patch_of(&response).unwrap()).unwrap();
        let pod: Pod = serde_json::from_value(object).unwrap();
        let init = pod.spec.unwrap().init_containers.unwrap();
        assert_eq!(init[0].name, SIDECAR, "native sidecar (--native-sidecar on)");

        // The namespace-enabled path injects without the annotation.
        let plain = serde_json::to_vec(&fixture("pod-create-kubectl-apply.captured-k8s-1.20.json")).unwrap();
        let (_, answer, _) = post(hook.listen_addr, &pki, "POST", "/mutate/namespace-enabled", &plain).await;
        assert!(patch_of(&serde_json::from_slice(&answer).unwrap()).is_some());
        let (_, answer, _) = post(hook.listen_addr, &pki, "POST", "/mutate", &plain).await;
        assert!(patch_of(&serde_json::from_slice(&answer).unwrap()).is_none());

        // Malformed reviews get 400, other methods and paths their usual answers.
        let (status, answer, _) = post(hook.listen_addr, &pki, "POST", "/mutate", b"{\"kind\": 42").await;
        assert_eq!(status, 400);
        assert!(String::from_utf8_lossy(&answer).contains("AdmissionReview"));
        assert_eq!(post(hook.listen_addr, &pki, "GET", "/mutate", b"").await.0, 405);
        assert_eq!(post(hook.listen_addr, &pki, "POST", "/elsewhere", &body).await.0, 404);

        // cert-manager renews the serving certificate: new handshakes get it, the webhook keeps answering.
        let second = pki.server();
        write_set(&vol, &second, &pki.ca);
        wait_serial_of(&hook.store, &second.serial).await;
        let (status, _, served) = post(hook.listen_addr, &pki, "POST", "/mutate", &body).await;
        assert_eq!(status, 200);
        assert_eq!(served, second.serial);

        // The reload is counted just after the new set is installed: poll for it.
        crate::support::metric_becomes(
            "the second serving certificate counted",
            || hook.metrics.encode(),
            "wsgate_inject_certificate_reloads_total{result=\"success\"}",
            2.0,
        )
        .await;
        let (_, text) = http(hook.admin_addr, "GET", "/metrics").await;
        assert_eq!(
            metric(&text, "wsgate_inject_reviews_total{result=\"injected\"}"),
            Some(3.0)
        );
        assert_eq!(
            metric(&text, "wsgate_inject_reviews_total{result=\"invalid\"}"),
            Some(1.0)
        );
        assert_eq!(
            metric(&text, "wsgate_inject_certificate_reloads_total{result=\"success\"}"),
            Some(2.0)
        );
        assert_eq!(metric(&text, "wsgate_inject_native_sidecars"), Some(1.0));

        // SIGTERM: not ready at once (endpoints move away), still answering during the delay.
        hook.drain();
        assert!(matches!(hook.readiness(), Err(wsgate::admin::NotReady::Draining)));
        assert_eq!(http(hook.admin_addr, "GET", "/readyz").await.0, 503);
        let (status, _, _) = post(hook.listen_addr, &pki, "POST", "/mutate", &body).await;
        assert_eq!(status, 200, "a review during the shutdown delay is still answered");
        tokio::time::timeout(Duration::from_secs(10), hook.wait())
            .await
            .expect("stopped after the delay");
    }
}

mod admin_metrics {
    use super::*;
    use crate::support::openmetrics::check_admin_metrics;
    use crate::support::{Pki, SecretVolume, metric_becomes, wait_serial_of, write_set};

    /// The injector's `/metrics` is OpenMetrics as the reference parser reads it, strictly, with
    /// every family src/inject/metrics.rs registers, after real reviews over HTTPS and a
    /// certificate reconcile (against a mocked API) that counts into the injector's metrics.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn the_injectors_metrics_are_strict_openmetrics_with_every_registered_family() {
        crate::support::init_logs();
        let tmp = tempfile::tempdir().unwrap();
        let pki = Pki::new();
        let vol = SecretVolume::new(tmp.path().join("webhook-tls")).unwrap();
        let serving = pki.server();
        write_set(&vol, &serving, &pki.ca);
        let cfg = crate::support::inject_config(vol.path(), wsgate::inject::settings::NativeSidecar::Off);
        let hook = wsgate::inject::start(cfg, None).await.unwrap();
        wait_serial_of(&hook.store, &serving.serial).await;
        let mut review = fixture("pod-create-kubectl-apply.captured-k8s-1.20.json");
        annotate(&mut review, &[("wsgate.dev/inject", "true")]);
        let body = serde_json::to_vec(&review).unwrap();
        let (status, answer, _) = super::over_https::post(hook.listen_addr, &pki, "POST", "/mutate", &body).await;
        assert_eq!(status, 200, "{}", String::from_utf8_lossy(&answer));
        let (status, _, _) = super::over_https::post(hook.listen_addr, &pki, "POST", "/mutate", b"{").await;
        assert_eq!(status, 400);
        // A certificate reconcile against an API without cert-manager, counted in these metrics.
        {
            use super::controller::{CERT_PATH, SA_PATH, expect, expect_event, injected_pod, service_account, status};
            use kube::runtime::{reflector, watcher};
            let (svc, mut handle) =
                tower_test::mock::pair::<http::Request<kube::client::Body>, http::Response<kube::client::Body>>();
            let (reader, mut writer) = reflector::store::<Pod>();
            let pod = injected_pod("checkout-1", "checkout", &[]);
            writer.apply_watcher_event(&watcher::Event::Apply(pod.clone()));
            let ctx = std::sync::Arc::new(wsgate::inject::certificates::Context::new(
                kube::Client::new(svc, "default"),
                reader,
                InjectSettings::example(),
                hook.metrics.clone(),
            ));
            let no_crd = status(404, "the server could not find the requested resource", None);
            let api = tokio::spawn(async move {
                expect(&mut handle, "GET", SA_PATH, 200, &service_account("checkout", "uid-1")).await;
                expect(&mut handle, "GET", CERT_PATH, 404, &no_crd).await;
                expect(&mut handle, "PATCH", CERT_PATH, 404, &no_crd).await;
                expect_event(&mut handle).await;
            });
            wsgate::inject::certificates::reconcile(std::sync::Arc::new(pod), ctx)
                .await
                .unwrap();
            api.await.unwrap();
        }
        metric_becomes(
            "the serving certificate counted",
            || hook.metrics.encode(),
            "wsgate_inject_certificate_reloads_total{result=\"success\"}",
            1.0,
        )
        .await;
        let families = check_admin_metrics(hook.admin_addr, &["src/inject/metrics.rs"]).await;
        let sample = |family: &str, name: &str, labels: &[(&str, &str)]| {
            families[family]
                .samples
                .iter()
                .find(|s| {
                    s.name == name
                        && labels
                            .iter()
                            .all(|(k, v)| s.labels.get(*k).map(String::as_str) == Some(*v))
                })
                .and_then(|s| s.value.as_f64())
        };
        assert_eq!(families["wsgate_inject_reviews"].kind, "counter");
        assert_eq!(
            sample(
                "wsgate_inject_reviews",
                "wsgate_inject_reviews_total",
                &[("result", "injected")]
            ),
            Some(1.0)
        );
        assert_eq!(
            sample(
                "wsgate_inject_reviews",
                "wsgate_inject_reviews_total",
                &[("result", "invalid")]
            ),
            Some(1.0)
        );
        assert_eq!(families["wsgate_inject_review_duration_seconds"].kind, "histogram");
        assert_eq!(
            sample(
                "wsgate_inject_review_duration_seconds",
                "wsgate_inject_review_duration_seconds_count",
                &[]
            ),
            Some(2.0)
        );
        assert_eq!(
            sample(
                "wsgate_inject_certificate_reloads",
                "wsgate_inject_certificate_reloads_total",
                &[("result", "success")]
            ),
            Some(1.0)
        );
        assert_eq!(
            sample(
                "wsgate_inject_certificate_reconciles",
                "wsgate_inject_certificate_reconciles_total",
                &[("result", "no_cert_manager")]
            ),
            Some(1.0)
        );
        assert_eq!(families["wsgate_inject_native_sidecars"].kind, "gauge");
        assert_eq!(
            sample("wsgate_inject_native_sidecars", "wsgate_inject_native_sidecars", &[]),
            Some(0.0)
        );
    }
}

mod controller {
    use std::sync::Arc;

    use http::{Request, Response};
    use kube::client::Body;
    use kube::runtime::reflector;
    use kube::runtime::watcher;
    use wsgate::inject::certificates::{Conflict, Context, Desired, desired_for, manifest, reconcile};
    use wsgate::inject::metrics::InjectMetrics;

    use super::*;

    pub(super) type Handle = tower_test::mock::Handle<Request<Body>, Response<Body>>;

    pub(super) fn injected_pod(name: &str, sa: &str, annotations: &[(&str, &str)]) -> Pod {
        let mut a = serde_json::Map::new();
        for (k, v) in annotations {
            a.insert(k.to_string(), json!(v));
        }
        serde_json::from_value(json!({
            "apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": name, "namespace": "shop", "labels": {"wsgate.dev/injected": "true"}, "annotations": a},
            "spec": {"serviceAccountName": sa, "containers": [{"name": "app", "image": "app"}]}
        }))
        .unwrap()
    }

    pub(super) fn service_account(name: &str, uid: &str) -> Value {
        json!({"apiVersion": "v1", "kind": "ServiceAccount", "metadata": {"name": name, "namespace": "shop", "uid": uid}})
    }

    pub(super) fn status(code: u16, message: &str, details: Option<Value>) -> Value {
        let mut s = json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
            "message": message, "reason": "NotFound", "code": code});
        if let Some(d) = details {
            s["details"] = d;
        }
        s
    }

    fn reply(code: u16, body: &Value) -> Response<Body> {
        Response::builder()
            .status(code)
            .header("content-type", "application/json")
            .body(Body::from(serde_json::to_vec(body).unwrap()))
            .unwrap()
    }

    /// The controller's first two calls for a new Certificate of `checkout`: its service
    /// account (found) and the Certificate (not there yet).
    async fn expect_no_certificate_yet(handle: &mut Handle) {
        expect(handle, "GET", SA_PATH, 200, &service_account("checkout", "uid-1")).await;
        expect(handle, "GET", CERT_PATH, 404, &cert_not_found()).await;
    }

    /// Serves the next request: checks method and path, answers `body` with `code`; returns the
    /// request's URI and body.
    pub(super) async fn expect(
        handle: &mut Handle,
        method: &str,
        path: &str,
        code: u16,
        body: &Value,
    ) -> (String, Value) {
        let (req, send) = handle.next_request().await.expect("a request");
        assert_eq!(req.method().as_str(), method, "{}", req.uri());
        assert_eq!(req.uri().path(), path);
        let uri = req.uri().to_string();
        let content_type = req
            .headers()
            .get("content-type")
            .map(|v| v.to_str().unwrap().to_owned());
        let bytes = req.into_body().collect_bytes().await.unwrap();
        if method == "PATCH" {
            assert_eq!(
                content_type.as_deref(),
                Some("application/apply-patch+yaml"),
                "server-side apply"
            );
        }
        send.send_response(reply(code, body));
        let sent = if bytes.is_empty() {
            Value::Null
        } else {
            serde_json::from_slice(&bytes).unwrap()
        };
        (uri, sent)
    }

    fn context(pods: &[Pod]) -> (Arc<Context>, Handle, Arc<InjectMetrics>) {
        let (svc, handle) = tower_test::mock::pair::<Request<Body>, Response<Body>>();
        let client = kube::Client::new(svc, "default");
        let (reader, mut writer) = reflector::store::<Pod>();
        for p in pods {
            writer.apply_watcher_event(&watcher::Event::Apply(p.clone()));
        }
        let metrics = InjectMetrics::new();
        (
            Arc::new(Context::new(client, reader, InjectSettings::example(), metrics.clone())),
            handle,
            metrics,
        )
    }

    pub(super) const SA_PATH: &str = "/api/v1/namespaces/shop/serviceaccounts/checkout";
    pub(super) const CERT_PATH: &str = "/apis/cert-manager.io/v1/namespaces/shop/certificates/wsgate-checkout";
    pub(super) const EVENTS_PATH: &str = "/apis/events.k8s.io/v1/namespaces/shop/events";

    fn cert_not_found() -> Value {
        status(
            404,
            "certificates.cert-manager.io \"wsgate-checkout\" not found",
            Some(json!({"name": "wsgate-checkout", "group": "cert-manager.io", "kind": "certificates"})),
        )
    }

    /// Serves an Event's creation; returns the Event.
    pub(super) async fn expect_event(handle: &mut Handle) -> Value {
        let (_, event) = expect(handle, "POST", EVENTS_PATH, 201, &json!({})).await;
        event
    }

    fn reconciles(metrics: &InjectMetrics, result: &str) -> Option<f64> {
        crate::support::raw::metric(
            &metrics.encode(),
            &format!("wsgate_inject_certificate_reconciles_total{{result=\"{result}\"}}"),
        )
    }

    #[test]
    fn dns_names_are_the_union_over_the_pods_that_share_a_secret() {
        let a = injected_pod(
            "a",
            "checkout",
            &[("wsgate.dev/dns-names", "checkout.shop.svc, b.shop.svc")],
        );
        let b = injected_pod(
            "b",
            "checkout",
            &[("wsgate.dev/dns-names", "a.shop.svc,checkout.shop.svc")],
        );
        let other = injected_pod("c", "billing", &[("wsgate.dev/dns-names", "billing.shop.svc")]);
        let d = desired_for(&a, [&a, &b, &other], "cluster.local").unwrap().unwrap();
        assert_eq!(d.secret, "wsgate-checkout");
        assert_eq!(d.dns_names, vec!["a.shop.svc", "b.shop.svc", "checkout.shop.svc"]);
        let plain: Pod = serde_json::from_value(json!({"metadata": {"name": "x", "namespace": "shop"}})).unwrap();
        assert!(
            desired_for(&plain, [&plain], "cluster.local").unwrap().is_none(),
            "pods without the injected label are ignored"
        );
    }

    #[tokio::test]
    async fn a_missing_certificate_is_created_by_server_side_apply() {
        let pod = injected_pod(
            "checkout-1",
            "checkout",
            &[("wsgate.dev/dns-names", "checkout.shop.svc")],
        );
        let (ctx, mut handle, metrics) = context(std::slice::from_ref(&pod));
        let api = tokio::spawn(async move {
            expect_no_certificate_yet(&mut handle).await;
            let (uri, applied) = expect(&mut handle, "PATCH", CERT_PATH, 201, &json!({})).await;
            (uri, applied, handle)
        });
        reconcile(Arc::new(pod), ctx.clone()).await.unwrap();
        let (uri, applied, mut handle) = api.await.unwrap();
        assert!(
            uri.contains("fieldManager=wsgate-injector") && uri.contains("force=true"),
            "{uri}"
        );
        assert_eq!(applied["apiVersion"], "cert-manager.io/v1");
        assert_eq!(applied["kind"], "Certificate");
        let spec = &applied["spec"];
        assert_eq!(spec["secretName"], "wsgate-checkout");
        assert_eq!(spec["uris"], json!(["spiffe://cluster.local/ns/shop/sa/checkout"]));
        assert_eq!(spec["dnsNames"], json!(["checkout.shop.svc"]));
        assert_eq!(spec["usages"], json!(["server auth", "client auth"]));
        assert_eq!(
            spec["privateKey"],
            json!({"algorithm": "ECDSA", "size": 256, "rotationPolicy": "Always"})
        );
        assert_eq!(spec["duration"], "24h");
        assert_eq!(spec["renewBefore"], "8h");
        assert_eq!(
            spec["issuerRef"],
            json!({"name": "wsgate-ca", "kind": "ClusterIssuer", "group": "cert-manager.io"})
        );
        let owner = &applied["metadata"]["ownerReferences"][0];
        assert_eq!(owner["kind"], "ServiceAccount");
        assert_eq!(owner["name"], "checkout");
        assert_eq!(owner["uid"], "uid-1");
        assert_eq!(reconciles(&metrics, "applied"), Some(1.0));
        drop(ctx);
        assert!(handle.next_request().await.is_none(), "nothing else was asked");
    }

    #[tokio::test]
    async fn an_up_to_date_certificate_is_not_written() {
        let pod = injected_pod("checkout-1", "checkout", &[]);
        let (ctx, mut handle, metrics) = context(std::slice::from_ref(&pod));
        let desired = desired_for(&pod, [&pod], "cluster.local").unwrap().unwrap();
        // As the API server returns it: our fields plus status, defaults and metadata of its own.
        let mut existing = manifest(&desired, "uid-1", &InjectSettings::example());
        existing["metadata"]["uid"] = json!("cert-uid");
        existing["metadata"]["resourceVersion"] = json!("42");
        existing["metadata"]["labels"]["extra"] = json!("kept");
        existing["spec"]["privateKey"]["encoding"] = json!("PKCS1");
        existing["status"] = json!({"conditions": [{"type": "Ready", "status": "True"}]});
        let api = tokio::spawn(async move {
            expect(&mut handle, "GET", SA_PATH, 200, &service_account("checkout", "uid-1")).await;
            expect(&mut handle, "GET", CERT_PATH, 200, &existing).await;
            handle
        });
        reconcile(Arc::new(pod.clone()), ctx.clone()).await.unwrap();
        let mut handle = api.await.unwrap();
        assert_eq!(reconciles(&metrics, "unchanged"), Some(1.0));
        assert_eq!(reconciles(&metrics, "applied"), None);
        // A second reconcile soon after (a pod status change, say) uses what it knows: no call.
        reconcile(Arc::new(pod), ctx.clone()).await.unwrap();
        drop(ctx);
        assert!(handle.next_request().await.is_none(), "no write, no further read");
    }

    #[tokio::test]
    async fn a_certificate_that_differs_is_applied_again() {
        let pod = injected_pod("checkout-1", "checkout", &[("wsgate.dev/dns-names", "new.shop.svc")]);
        let (ctx, mut handle, metrics) = context(std::slice::from_ref(&pod));
        let stale_pod = injected_pod("checkout-1", "checkout", &[]);
        let stale = manifest(
            &desired_for(&stale_pod, [&stale_pod], "cluster.local").unwrap().unwrap(),
            "uid-1",
            &InjectSettings::example(),
        );
        let api = tokio::spawn(async move {
            expect(&mut handle, "GET", SA_PATH, 200, &service_account("checkout", "uid-1")).await;
            expect(&mut handle, "GET", CERT_PATH, 200, &stale).await;
            let (_, applied) = expect(&mut handle, "PATCH", CERT_PATH, 200, &json!({})).await;
            applied
        });
        reconcile(Arc::new(pod), ctx).await.unwrap();
        let applied = api.await.unwrap();
        assert_eq!(applied["spec"]["dnsNames"], json!(["new.shop.svc"]));
        assert_eq!(reconciles(&metrics, "applied"), Some(1.0));
    }

    #[tokio::test]
    async fn a_cluster_without_cert_manager_is_tolerated() {
        let pod = injected_pod("checkout-1", "checkout", &[]);
        let (ctx, mut handle, metrics) = context(std::slice::from_ref(&pod));
        let no_crd = status(404, "the server could not find the requested resource", None);
        let api = tokio::spawn(async move {
            expect(&mut handle, "GET", SA_PATH, 200, &service_account("checkout", "uid-1")).await;
            expect(&mut handle, "GET", CERT_PATH, 404, &no_crd).await;
            expect(&mut handle, "PATCH", CERT_PATH, 404, &no_crd).await;
            let event = expect_event(&mut handle).await;
            (handle, event)
        });
        let action = reconcile(Arc::new(pod), ctx.clone()).await.unwrap();
        let (mut handle, event) = api.await.unwrap();
        assert_eq!(event["reason"], "CertManagerMissing");
        assert_eq!(event["type"], "Warning");
        assert_eq!(event["regarding"]["kind"], "Pod");
        assert_eq!(event["regarding"]["name"], "checkout-1");
        assert_eq!(
            format!("{action:?}"),
            format!(
                "{:?}",
                kube::runtime::controller::Action::requeue(std::time::Duration::from_secs(300))
            )
        );
        assert_eq!(reconciles(&metrics, "no_cert_manager"), Some(1.0));
        drop(ctx);
        assert!(handle.next_request().await.is_none());
    }

    /// What the controller asks for a pod of service account checkout in shop whose
    /// `wsgate.dev/dns-names` is `names`.
    fn desired_dns(names: &str, cluster_domain: &str) -> Desired {
        let pod = injected_pod("a", "checkout", &[("wsgate.dev/dns-names", names)]);
        desired_for(&pod, [&pod], cluster_domain).unwrap().unwrap()
    }

    #[test]
    fn dns_names_are_asked_for_in_lowercase() {
        // DNS is case-insensitive and the approval policy admits lowercase names only.
        let d = desired_dns(
            "Checkout.SHOP.svc,checkout.shop.svc,*.Shop.SVC.Cluster.Local",
            "cluster.local",
        );
        assert_eq!(d.dns_names, vec!["*.shop.svc.cluster.local", "checkout.shop.svc"]);
        assert!(d.refused_dns_names.is_empty());
    }

    #[test]
    fn dns_names_of_other_namespaces_and_shared_secrets_are_refused() {
        // The injected label can be set by hand, bypassing the webhook: the controller checks again.
        let d = desired_dns("api.prod.svc,checkout.shop.svc,*.example.com", "cluster.local");
        assert_eq!(d.dns_names, vec!["checkout.shop.svc"]);
        assert_eq!(d.refused_dns_names, vec!["*.example.com", "api.prod.svc"]);
        // Names that merely contain `NS.svc` somewhere, followed by something else.
        let sneaky =
            "x.shop.svc.b.svc.cluster.local,api.shop.svc.attacker.example,api.shop.svc,api.shop.svc.cluster.local";
        let d = desired_dns(sneaky, "cluster.local");
        assert_eq!(d.dns_names, vec!["api.shop.svc", "api.shop.svc.cluster.local"]);
        assert_eq!(
            d.refused_dns_names,
            vec!["api.shop.svc.attacker.example", "x.shop.svc.b.svc.cluster.local"]
        );
        assert_eq!(desired_dns(sneaky, "k8s.corp").dns_names, vec!["api.shop.svc"]);
        // checkout's `wsgate-checkout-v2` is also the default name of service account checkout-v2.
        let a = injected_pod("a", "checkout", &[("wsgate.dev/secret", "wsgate-checkout-v2")]);
        let b = injected_pod("b", "checkout-v2", &[]);
        assert!(
            matches!(
                desired_for(&a, [&a, &b], "cluster.local"),
                Err(Conflict::SharedSecret { .. })
            ),
            "one Secret cannot carry two identities"
        );
    }

    #[tokio::test]
    async fn a_certificate_not_managed_by_wsgate_is_left_alone() {
        let pod = injected_pod("checkout-1", "checkout", &[]);
        let (ctx, mut handle, metrics) = context(std::slice::from_ref(&pod));
        let theirs = json!({"apiVersion": "cert-manager.io/v1", "kind": "Certificate",
            "metadata": {"name": "wsgate-checkout", "namespace": "shop", "labels": {"team": "ingress"}},
            "spec": {"secretName": "wsgate-checkout", "dnsNames": ["api.example.com"],
                     "issuerRef": {"name": "letsencrypt", "kind": "ClusterIssuer"}}});
        let api = tokio::spawn(async move {
            expect(&mut handle, "GET", SA_PATH, 200, &service_account("checkout", "uid-1")).await;
            expect(&mut handle, "GET", CERT_PATH, 200, &theirs).await;
            let event = expect_event(&mut handle).await;
            (handle, event)
        });
        reconcile(Arc::new(pod), ctx.clone()).await.unwrap();
        let (mut handle, event) = api.await.unwrap();
        assert_eq!(event["reason"], "CertificateNotManaged");
        assert_eq!(reconciles(&metrics, "foreign"), Some(1.0));
        drop(ctx);
        assert!(
            handle.next_request().await.is_none(),
            "no write to someone else's Certificate"
        );
    }

    #[tokio::test]
    async fn a_missing_service_account_requests_nothing() {
        let pod = injected_pod("checkout-1", "checkout", &[]);
        let (ctx, mut handle, _) = context(std::slice::from_ref(&pod));
        let api = tokio::spawn(async move {
            let gone = status(
                404,
                "serviceaccounts \"checkout\" not found",
                Some(json!({"name": "checkout", "kind": "serviceaccounts"})),
            );
            expect(&mut handle, "GET", SA_PATH, 404, &gone).await;
            let event = expect_event(&mut handle).await;
            (handle, event)
        });
        reconcile(Arc::new(pod), ctx.clone()).await.unwrap();
        let (mut handle, event) = api.await.unwrap();
        assert_eq!(event["reason"], "ServiceAccountNotFound");
        drop(ctx);
        assert!(handle.next_request().await.is_none(), "no Certificate without an owner");
    }

    #[tokio::test]
    async fn a_secret_name_outside_the_service_accounts_reservation_is_refused_with_one_event_and_no_call() {
        // The injected label and the annotation set by hand, bypassing the webhook: `db-tls` may
        // be anyone's Secret, and cert-manager would overwrite it. The controller never reads
        // Secrets, so it refuses by name: no Secret, ServiceAccount or Certificate call at all.
        let pod = injected_pod("checkout-1", "checkout", &[("wsgate.dev/secret", "db-tls")]);
        let billing = injected_pod("checkout-2", "checkout", &[("wsgate.dev/secret", "wsgate-billing")]);
        let (ctx, mut handle, metrics) = context(&[pod.clone(), billing.clone()]);
        let api = tokio::spawn(async move {
            let first = expect_event(&mut handle).await;
            let second = expect_event(&mut handle).await;
            (handle, first, second)
        });
        reconcile(Arc::new(pod.clone()), ctx.clone()).await.unwrap();
        reconcile(Arc::new(billing), ctx.clone()).await.unwrap();
        // Again at once: rate-limited, no second Event for the same pod.
        reconcile(Arc::new(pod), ctx.clone()).await.unwrap();
        let (mut handle, event, other) = api.await.unwrap();
        assert_eq!(event["reason"], "SecretNotReserved");
        assert_eq!(event["type"], "Warning");
        assert_eq!(event["reportingController"], "wsgate-injector");
        assert_eq!(event["regarding"]["name"], "checkout-1");
        let note = event["note"].as_str().unwrap();
        assert!(note.contains("db-tls") && note.contains("wsgate-checkout-"), "{event}");
        assert_eq!(other["reason"], "SecretNotReserved");
        assert!(other["note"].as_str().unwrap().contains("wsgate-billing"), "{other}");
        assert_eq!(reconciles(&metrics, "secret_not_reserved"), Some(3.0));
        assert_eq!(reconciles(&metrics, "applied"), None);
        drop(ctx);
        assert!(handle.next_request().await.is_none(), "no Certificate, no third Event");
    }

    #[tokio::test]
    async fn a_name_under_the_service_accounts_own_prefix_gets_its_certificate() {
        let pod = injected_pod(
            "checkout-1",
            "checkout",
            &[("wsgate.dev/secret", "wsgate-checkout-api")],
        );
        let (ctx, mut handle, metrics) = context(std::slice::from_ref(&pod));
        let api = tokio::spawn(async move {
            expect(&mut handle, "GET", SA_PATH, 200, &service_account("checkout", "uid-1")).await;
            let path = "/apis/cert-manager.io/v1/namespaces/shop/certificates/wsgate-checkout-api";
            let gone = status(
                404,
                "certificates.cert-manager.io \"wsgate-checkout-api\" not found",
                None,
            );
            expect(&mut handle, "GET", path, 404, &gone).await;
            let (_, applied) = expect(&mut handle, "PATCH", path, 201, &json!({})).await;
            (handle, applied)
        });
        reconcile(Arc::new(pod), ctx.clone()).await.unwrap();
        let (mut handle, applied) = api.await.unwrap();
        assert_eq!(applied["spec"]["secretName"], "wsgate-checkout-api");
        assert_eq!(
            applied["spec"]["uris"],
            json!(["spiffe://cluster.local/ns/shop/sa/checkout"])
        );
        assert_eq!(reconciles(&metrics, "applied"), Some(1.0));
        drop(ctx);
        assert!(handle.next_request().await.is_none(), "no Secret read, no Event");
    }

    #[tokio::test]
    async fn a_certificate_of_another_service_account_is_not_taken_over() {
        // Reserved names can still overlap: service account `check` asked for `wsgate-check-out`
        // (under its own prefix) and its pods are gone; service account `check-out` now asks
        // for its default name, the same one.
        let pod = injected_pod("checkout-1", "check-out", &[]);
        let (ctx, mut handle, metrics) = context(std::slice::from_ref(&pod));
        let earlier = injected_pod("check-1", "check", &[("wsgate.dev/secret", "wsgate-check-out")]);
        let theirs = manifest(
            &desired_for(&earlier, [&earlier], "cluster.local").unwrap().unwrap(),
            "uid-check",
            &InjectSettings::example(),
        );
        let api = tokio::spawn(async move {
            let sa = "/api/v1/namespaces/shop/serviceaccounts/check-out";
            expect(&mut handle, "GET", sa, 200, &service_account("check-out", "uid-1")).await;
            let cert = "/apis/cert-manager.io/v1/namespaces/shop/certificates/wsgate-check-out";
            expect(&mut handle, "GET", cert, 200, &theirs).await;
            let event = expect_event(&mut handle).await;
            (handle, event)
        });
        reconcile(Arc::new(pod), ctx.clone()).await.unwrap();
        let (mut handle, event) = api.await.unwrap();
        assert_eq!(event["reason"], "SecretClaimed");
        assert!(
            event["note"].as_str().unwrap().contains("service account check:"),
            "{event}"
        );
        assert_eq!(reconciles(&metrics, "conflict"), Some(1.0));
        drop(ctx);
        assert!(
            handle.next_request().await.is_none(),
            "the other service account's Certificate is not rewritten"
        );
    }

    #[tokio::test]
    async fn pods_of_two_service_accounts_on_one_secret_get_an_event_each_and_no_call_else() {
        let a = injected_pod("a", "checkout", &[("wsgate.dev/secret", "wsgate-checkout-v2")]);
        let b = injected_pod("b", "checkout-v2", &[]);
        let (ctx, mut handle, metrics) = context(&[a.clone(), b.clone()]);
        let api = tokio::spawn(async move {
            let first = expect_event(&mut handle).await;
            let second = expect_event(&mut handle).await;
            (handle, first, second)
        });
        reconcile(Arc::new(a.clone()), ctx.clone()).await.unwrap();
        reconcile(Arc::new(b), ctx.clone()).await.unwrap();
        // Again at once: rate-limited, no Event.
        reconcile(Arc::new(a), ctx.clone()).await.unwrap();
        let (mut handle, first, second) = api.await.unwrap();
        assert_eq!(first["reason"], "SecretClaimed");
        assert_eq!(first["regarding"]["name"], "a");
        assert_eq!(second["regarding"]["name"], "b");
        assert_eq!(reconciles(&metrics, "conflict"), Some(3.0));
        drop(ctx);
        assert!(handle.next_request().await.is_none());
    }

    #[tokio::test]
    async fn an_event_that_cannot_be_written_does_not_fail_the_reconcile() {
        let pod = injected_pod("checkout-1", "checkout", &[]);
        let (ctx, mut handle, _) = context(std::slice::from_ref(&pod));
        let api = tokio::spawn(async move {
            let gone = status(
                404,
                "serviceaccounts \"checkout\" not found",
                Some(json!({"name": "checkout", "kind": "serviceaccounts"})),
            );
            expect(&mut handle, "GET", SA_PATH, 404, &gone).await;
            let forbidden = status(403, "events.events.k8s.io is forbidden", None);
            expect(&mut handle, "POST", EVENTS_PATH, 403, &forbidden).await;
            handle
        });
        let action = reconcile(Arc::new(pod), ctx.clone()).await;
        assert!(action.is_ok(), "{action:?}");
        let mut handle = api.await.unwrap();
        drop(ctx);
        assert!(handle.next_request().await.is_none());
    }
}
