//! End-to-end against a real API server. These tests are `#[ignore]`d, so a plain
//! `cargo nextest run` leaves them out; `scripts/test.sh` builds and starts a loopback
//! kube-apiserver (`scripts/kube-apiserver.sh`) and runs them with `--run-ignored all`. Run on
//! their own, they need `WSGATE_E2E_KUBECONFIG` naming a kubeconfig, and fail without it:
//!
//! ```sh
//! scripts/kube-apiserver.sh build && scripts/kube-apiserver.sh start /tmp/wsgate-k8s
//! WSGATE_E2E_KUBECONFIG=/tmp/wsgate-k8s/kubeconfig cargo nextest run --run-ignored only e2e
//! scripts/kube-apiserver.sh stop /tmp/wsgate-k8s
//! ```
//!
//! The test runs the injector in this process on 127.0.0.1, registers it by URL with our own
//! CA as `caBundle`, creates annotated and plain pods in two fresh namespaces, and checks what
//! the API server stored (the injected sidecar, after the ServiceAccount plugin's reinvocation)
//! and the Certificates the controller applied, its refusal of a Secret name not reserved to the
//! pod's service account (a hand-made `kubernetes.io/tls` Secret stays untouched), and the Warning
//! Event that refusal writes on the pod. The injector's client acts as a ServiceAccount bound to
//! the chart's own ClusterRole (from `manifests/install/`), so a call its RBAC does not grant
//! fails these tests.

use std::time::Duration;

use k8s_openapi::api::admissionregistration::v1::MutatingWebhookConfiguration;
use k8s_openapi::api::core::v1::{Namespace, Pod, Secret, ServiceAccount};
use k8s_openapi::api::events::v1::Event;
use k8s_openapi::api::rbac::v1::{ClusterRole, ClusterRoleBinding};
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::api::{Api, DeleteParams, DynamicObject, PostParams};
use serde_json::{Value, json};

use crate::support::{Pki, SecretVolume, wait_serial_of, write_set};

/// Why every test here is ignored by default, and how to run them.
const NEEDS_API_SERVER: &str = "needs a kube-apiserver: scripts/kube-apiserver.sh (run by scripts/test.sh)";

/// A client for the API server that `WSGATE_E2E_KUBECONFIG` names; panics without one, so an
/// e2e test that was asked to run never passes without having run.
async fn client() -> kube::Client {
    kube::Client::try_from(config().await).expect("a client")
}

/// The configuration `WSGATE_E2E_KUBECONFIG` names (an admin's).
async fn config() -> kube::Config {
    let Some(path) = std::env::var_os("WSGATE_E2E_KUBECONFIG") else {
        panic!(
            "WSGATE_E2E_KUBECONFIG is not set: this test {NEEDS_API_SERVER}. Start one with \
             `scripts/kube-apiserver.sh build && scripts/kube-apiserver.sh start RUN_DIR` and set \
             WSGATE_E2E_KUBECONFIG=RUN_DIR/kubeconfig, or run scripts/test.sh"
        );
    };
    let kc = kube::config::Kubeconfig::read_from(&path)
        .unwrap_or_else(|e| panic!("reading WSGATE_E2E_KUBECONFIG={}: {e}", path.to_string_lossy()));
    kube::Config::from_custom_kubeconfig(kc, &kube::config::KubeConfigOptions::default())
        .await
        .expect("a usable kubeconfig")
}

/// A client acting as a fresh ServiceAccount bound to the chart's ClusterRole, exactly as
/// `manifests/install/10-wsgate.yaml` renders it (no Secrets in it): what the injector may call
/// in a real install, and nothing more. Returns once the API server authorizes it.
async fn injector_client(admin: &kube::Client) -> kube::Client {
    let id = unique_id();
    let rendered = std::fs::read_to_string("manifests/install/10-wsgate.yaml").unwrap();
    let docs = crate::support::k8s_tools::tools().yaml_docs(&rendered);
    let role = docs
        .iter()
        .find(|d| d["kind"] == "ClusterRole" && d["metadata"]["name"] == "wsgate")
        .expect("the chart's ClusterRole in manifests/install");
    let ns = format!("wsgate-e2e-rbac-{id}");
    create(&Api::<Namespace>::all(admin.clone()), json!({"metadata": {"name": ns}})).await;
    create(
        &Api::<ServiceAccount>::namespaced(admin.clone(), &ns),
        json!({"metadata": {"name": "wsgate-injector"}}),
    )
    .await;
    let name = format!("wsgate-e2e-{id}");
    create(
        &Api::<ClusterRole>::all(admin.clone()),
        json!({"metadata": {"name": name}, "rules": role["rules"]}),
    )
    .await;
    create(
        &Api::<ClusterRoleBinding>::all(admin.clone()),
        json!({"metadata": {"name": name},
               "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": name},
               "subjects": [{"kind": "ServiceAccount", "name": "wsgate-injector", "namespace": ns}]}),
    )
    .await;
    let mut cfg = config().await;
    cfg.auth_info.impersonate = Some(format!("system:serviceaccount:{ns}:wsgate-injector"));
    let client = kube::Client::try_from(cfg).expect("an impersonating client");
    // The authorizer learns of the binding through an informer.
    let pods: Api<Pod> = Api::all(client.clone());
    let t0 = std::time::Instant::now();
    while let Err(e) = pods.list(&kube::api::ListParams::default().limit(1)).await {
        assert!(
            t0.elapsed() < Duration::from_secs(30),
            "the chart's ClusterRole never allowed listing pods: {e}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let secrets: Api<Secret> = Api::namespaced(client.clone(), &ns);
    let refused = secrets.get_opt("anything").await.unwrap_err().to_string();
    assert!(
        refused.contains("forbidden"),
        "the injector may read Secrets: {refused}"
    );
    client
}

async fn create<K>(api: &Api<K>, value: Value) -> K
where
    K: kube::Resource + Clone + serde::de::DeserializeOwned + serde::Serialize + std::fmt::Debug,
{
    let obj: K = serde_json::from_value(value).unwrap();
    api.create(&PostParams::default(), &obj).await.unwrap()
}

/// A name suffix no earlier run used (the API server keeps what earlier runs created).
fn unique_id() -> String {
    format!(
        "{:x}",
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_nanos()
    )
}

/// The Certificate CRD created if missing; returns once the server serves it.
async fn certificates_served(client: &kube::Client) {
    let crds: Api<CustomResourceDefinition> = Api::all(client.clone());
    ensure_certificate_crd(&crds).await;
    let all_certs: Api<DynamicObject> =
        Api::all_with(client.clone(), &wsgate::inject::certificates::certificate_resource());
    let t0 = std::time::Instant::now();
    while all_certs.list(&Default::default()).await.is_err() {
        assert!(
            t0.elapsed() < Duration::from_secs(30),
            "the Certificate CRD never became served"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// The injector in this process on 127.0.0.1, with a serving certificate from our own CA, once
/// it serves it. The temporary folder holds that certificate: keep it alive.
async fn start_injector(client: &kube::Client) -> (tempfile::TempDir, Pki, wsgate::inject::InjectHandle) {
    let tmp = tempfile::tempdir().unwrap();
    let pki = Pki::new();
    let vol = SecretVolume::new(tmp.path().join("webhook-tls")).unwrap();
    let serving = pki.server();
    write_set(&vol, &serving, &pki.ca);
    let cfg = crate::support::inject_config(vol.path(), wsgate::inject::settings::NativeSidecar::Auto);
    let hook = wsgate::inject::start(cfg, Some(injector_client(client).await))
        .await
        .unwrap();
    wait_serial_of(&hook.store, &serving.serial).await;
    (tmp, pki, hook)
}

/// Creates cert-manager's Certificate CRD unless it exists; the e2e tests run in parallel, so
/// another test creating it first is fine.
async fn ensure_certificate_crd(crds: &Api<CustomResourceDefinition>) {
    if crds.get_opt("certificates.cert-manager.io").await.unwrap().is_some() {
        return;
    }
    let crd_json: Value =
        serde_json::from_str(include_str!("../data/e2e/certificates.cert-manager.io.crd.json")).unwrap();
    let obj: CustomResourceDefinition = serde_json::from_value(crd_json).unwrap();
    if let Err(e) = crds.create(&PostParams::default(), &obj).await {
        assert!(
            e.to_string().contains("already exists"),
            "creating the Certificate CRD: {e}"
        );
    }
}

fn pod(name: &str, sa: &str, annotations: Value) -> Value {
    json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": name, "annotations": annotations, "labels": {"app": name}},
        "spec": {
            "serviceAccountName": sa,
            "containers": [{"name": "app", "image": "registry.example.org/echo:1", "ports": [{"containerPort": 8080}]}]
        }
    })
}

fn sidecar(p: &Pod) -> Option<k8s_openapi::api::core::v1::Container> {
    let spec = p.spec.as_ref()?;
    spec.containers
        .iter()
        .chain(spec.init_containers.iter().flatten())
        .find(|c| c.name == wsgate::inject::patch::SIDECAR)
        .cloned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs a kube-apiserver: scripts/kube-apiserver.sh (run by scripts/test.sh)"]
async fn the_webhook_and_controller_work_against_a_real_api_server() {
    let client = client().await;
    crate::support::init_logs();
    let id = unique_id();

    // cert-manager's Certificate CRD (no cert-manager controller runs: the test only checks
    // the objects the injector's controller writes).
    certificates_served(&client).await;

    // The injector, with a serving certificate for 127.0.0.1 from our own CA.
    let (_tmp, pki, hook) = start_injector(&client).await;
    let version = client.apiserver_version().await.unwrap();
    let expect_native = wsgate::inject::parse_version(&version.major, &version.minor)
        .is_some_and(wsgate::inject::supports_native_sidecars);
    assert_eq!(hook.native.load(std::sync::atomic::Ordering::Relaxed), expect_native);

    // Two namespaces: one labelled for injection, one not.
    let namespaces: Api<Namespace> = Api::all(client.clone());
    let (enabled, plain) = (format!("wsgate-e2e-on-{id}"), format!("wsgate-e2e-off-{id}"));
    create(
        &namespaces,
        json!({"metadata": {"name": enabled, "labels": {"wsgate-e2e": id, "wsgate.dev/injection": "enabled"}}}),
    )
    .await;
    create(
        &namespaces,
        json!({"metadata": {"name": plain, "labels": {"wsgate-e2e": id}}}),
    )
    .await;
    for ns in [&enabled, &plain] {
        let sas: Api<ServiceAccount> = Api::namespaced(client.clone(), ns);
        for sa in ["default", "checkout"] {
            create(&sas, json!({"metadata": {"name": sa}})).await;
        }
    }

    // Register the webhook by URL, with our CA as caBundle.
    let ca_bundle = base64::Engine::encode(&base64::engine::general_purpose::STANDARD, pki.ca.cert_pem.as_bytes());
    let url = |path: &str| format!("https://{}{path}", hook.listen_addr);
    let entry = |name: &str, path: &str, selector: Value| {
        json!({
            "name": name, "admissionReviewVersions": ["v1"], "sideEffects": "None", "failurePolicy": "Fail",
            "reinvocationPolicy": "IfNeeded", "timeoutSeconds": 10,
            "clientConfig": {"url": url(path), "caBundle": ca_bundle},
            "namespaceSelector": selector,
            "rules": [{"operations": ["CREATE"], "apiGroups": [""], "apiVersions": ["v1"], "resources": ["pods"]}]
        })
    };
    let configs: Api<MutatingWebhookConfiguration> = Api::all(client.clone());
    let config_name = format!("wsgate-e2e-{id}");
    create(&configs, json!({
        "metadata": {"name": config_name},
        "webhooks": [
            entry("namespace.inject.wsgate.dev", "/mutate/namespace-enabled",
                json!({"matchLabels": {"wsgate-e2e": id, "wsgate.dev/injection": "enabled"}})),
            entry("pod.inject.wsgate.dev", "/mutate",
                json!({"matchLabels": {"wsgate-e2e": id},
                       "matchExpressions": [{"key": "wsgate.dev/injection", "operator": "NotIn", "values": ["enabled"]}]})),
        ]
    })).await;
    // The API server picks the configuration up through an informer.
    tokio::time::sleep(Duration::from_secs(2)).await;

    let on: Api<Pod> = Api::namespaced(client.clone(), &enabled);
    let off: Api<Pod> = Api::namespaced(client.clone(), &plain);
    let checkout_dns = format!("checkout.{plain}.svc");
    let annotated = create(
        &off,
        pod(
            "annotated",
            "checkout",
            json!({"wsgate.dev/inject": "true", "wsgate.dev/dns-names": checkout_dns}),
        ),
    )
    .await;
    let untouched = create(&off, pod("untouched", "default", json!({}))).await;
    let by_namespace = create(&on, pod("by-namespace", "default", json!({}))).await;
    let opted_out = create(&on, pod("opted-out", "default", json!({"wsgate.dev/inject": "false"}))).await;

    for p in [&annotated, &by_namespace] {
        let c = sidecar(p).unwrap_or_else(|| panic!("{:?} has no sidecar", p.metadata.name));
        assert_eq!(c.image.as_deref(), Some("ghcr.io/wsgate/wsgate:0.1.0"));
        // Reinvocation happened: the ServiceAccount plugin's token mount is on our container,
        // and there is exactly one sidecar.
        let spec = p.spec.as_ref().unwrap();
        let count = spec
            .containers
            .iter()
            .chain(spec.init_containers.iter().flatten())
            .filter(|c| c.name == "wsgate-proxy")
            .count();
        assert_eq!(count, 1);
        assert!(
            c.volume_mounts
                .as_ref()
                .unwrap()
                .iter()
                .any(|m| m.mount_path == "/var/run/secrets/kubernetes.io/serviceaccount")
        );
        assert_eq!(p.metadata.labels.as_ref().unwrap()["wsgate.dev/injected"], "true");
        if !expect_native {
            assert!(
                spec.containers.iter().any(|c| c.name == "wsgate-proxy"),
                "ordinary container on a pre-1.29 cluster"
            );
        }
    }
    assert!(sidecar(&untouched).is_none());
    assert!(sidecar(&opted_out).is_none());

    // A bad annotation is refused by the API server with our message.
    let bad: Pod = serde_json::from_value(pod("bad-port", "default", json!({"wsgate.dev/port": "70000"}))).unwrap();
    let err = on.create(&PostParams::default(), &bad).await.unwrap_err().to_string();
    assert!(err.contains("wsgate.dev/port") && err.contains("70000"), "{err}");

    // A server-side dry run is injected too, and leaves nothing behind.
    let dry = PostParams {
        dry_run: true,
        ..PostParams::default()
    };
    let dry_pod: Pod = serde_json::from_value(pod("dry", "default", json!({}))).unwrap();
    let answered = on.create(&dry, &dry_pod).await.unwrap();
    assert!(sidecar(&answered).is_some());
    assert!(on.get_opt("dry").await.unwrap().is_none());

    // The controller requested a Certificate per service account of injected pods.
    let certs_off: Api<DynamicObject> = Api::namespaced_with(
        client.clone(),
        &plain,
        &wsgate::inject::certificates::certificate_resource(),
    );
    let certs_on: Api<DynamicObject> = Api::namespaced_with(
        client.clone(),
        &enabled,
        &wsgate::inject::certificates::certificate_resource(),
    );
    let t0 = std::time::Instant::now();
    let (checkout, default_cert) = loop {
        let a = certs_off.get_opt("wsgate-checkout").await.unwrap();
        let b = certs_on.get_opt("wsgate-default").await.unwrap();
        if let (Some(a), Some(b)) = (a, b) {
            break (a, b);
        }
        assert!(t0.elapsed() < Duration::from_secs(60), "Certificates were not created");
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    let spec = &checkout.data["spec"];
    assert_eq!(
        spec["uris"],
        json!([format!("spiffe://cluster.local/ns/{plain}/sa/checkout")])
    );
    assert_eq!(spec["dnsNames"], json!([checkout_dns]));
    assert_eq!(spec["usages"], json!(["server auth", "client auth"]));
    assert_eq!(spec["privateKey"]["rotationPolicy"], "Always");
    let sa_uid = Api::<ServiceAccount>::namespaced(client.clone(), &plain)
        .get("checkout")
        .await
        .unwrap()
        .metadata
        .uid;
    assert_eq!(
        checkout.metadata.owner_references.as_ref().unwrap()[0].uid,
        sa_uid.unwrap()
    );
    let managers: Vec<_> = checkout
        .metadata
        .managed_fields
        .iter()
        .flatten()
        .filter_map(|m| m.manager.clone())
        .collect();
    assert!(managers.contains(&"wsgate-injector".to_owned()), "{managers:?}");
    assert_eq!(
        default_cert.data["spec"]["uris"],
        json!([format!("spiffe://cluster.local/ns/{enabled}/sa/default")])
    );
    assert!(
        certs_on.get_opt("wsgate-checkout").await.unwrap().is_none(),
        "no pod of checkout in the enabled namespace"
    );

    // Only Secret names reserved to the pod's service account. A kubernetes.io/tls Secret made by
    // hand: the webhook refuses a pod that names it, ...
    let secrets: Api<Secret> = Api::namespaced(client.clone(), &plain);
    let dummy = base64::Engine::encode(
        &base64::engine::general_purpose::STANDARD,
        b"not issued by cert-manager",
    );
    create(
        &secrets,
        json!({"metadata": {"name": "hand-made-tls"}, "type": "kubernetes.io/tls",
               "data": {"tls.crt": dummy, "tls.key": dummy}}),
    )
    .await;
    let named: Pod = serde_json::from_value(pod(
        "hand-made",
        "default",
        json!({"wsgate.dev/inject": "true", "wsgate.dev/secret": "hand-made-tls"}),
    ))
    .unwrap();
    let err = off
        .create(&PostParams::default(), &named)
        .await
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("wsgate.dev/secret") && err.contains("wsgate-default-"),
        "{err}"
    );
    // ... and the controller refuses a pod that bypassed the webhook (the injected label and the
    // annotation set by hand, no wsgate.dev/inject): no Certificate, a Warning Event.
    let mut bypass = pod("bypass", "default", json!({"wsgate.dev/secret": "hand-made-tls"}));
    bypass["metadata"]["labels"]["wsgate.dev/injected"] = json!("true");
    create(&off, bypass).await;
    // A name under the service account's own prefix is served.
    create(
        &off,
        pod(
            "custom",
            "default",
            json!({"wsgate.dev/inject": "true", "wsgate.dev/secret": "wsgate-default-api"}),
        ),
    )
    .await;
    let events: Api<Event> = Api::namespaced(client.clone(), &plain);
    let t0 = std::time::Instant::now();
    let refusal = loop {
        let found = events
            .list(&Default::default())
            .await
            .unwrap()
            .items
            .into_iter()
            .find(|e| {
                e.regarding.as_ref().and_then(|r| r.name.as_deref()) == Some("bypass")
                    && e.reason.as_deref() == Some("SecretNotReserved")
            });
        if let Some(e) = found {
            break e;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(60),
            "no SecretNotReserved Event on the pod"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    assert_eq!(refusal.type_.as_deref(), Some("Warning"));
    assert_eq!(refusal.reporting_controller.as_deref(), Some("wsgate-injector"));
    assert_eq!(refusal.regarding.as_ref().and_then(|r| r.kind.as_deref()), Some("Pod"));
    assert!(
        refusal.note.as_deref().is_some_and(|n| n.contains("hand-made-tls")),
        "{:?}",
        refusal.note
    );
    let t0 = std::time::Instant::now();
    while certs_off.get_opt("wsgate-default-api").await.unwrap().is_none() {
        assert!(
            t0.elapsed() < Duration::from_secs(60),
            "no Certificate for a name under the service account's prefix"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let targets: Vec<String> = certs_off
        .list(&Default::default())
        .await
        .unwrap()
        .items
        .iter()
        .filter_map(|c| c.data["spec"]["secretName"].as_str().map(str::to_owned))
        .collect();
    assert!(
        !targets.iter().any(|t| t == "hand-made-tls"),
        "a Certificate targets the hand-made Secret: {targets:?}"
    );
    let untouched_secret = secrets.get("hand-made-tls").await.unwrap();
    assert_eq!(untouched_secret.type_.as_deref(), Some("kubernetes.io/tls"));
    assert!(
        untouched_secret
            .metadata
            .annotations
            .as_ref()
            .is_none_or(|a| !a.contains_key("cert-manager.io/certificate-name"))
    );

    // Clean up what would otherwise affect later runs on the same API server.
    configs.delete(&config_name, &DeleteParams::default()).await.unwrap();
    for ns in [&enabled, &plain] {
        let _ = namespaces.delete(ns, &DeleteParams::default()).await;
    }
    hook.stop();
    hook.wait().await;
}

/// What the API server makes of the pods the injector must leave alone or refuse, and of the
/// annotations the injector adds: a `hostNetwork` pod is admitted unchanged (with a warning), a
/// pod declaring the admin port 9901 or asking for a DNS name of another namespace is refused
/// with a message naming it, and a pod of a 70-character service account is injected (with its
/// `wsgate.dev/status`, its `OTEL_SERVICE_NAME` and a resource annotation) and gets a
/// Certificate whose labels the API server accepted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs a kube-apiserver: scripts/kube-apiserver.sh (run by scripts/test.sh)"]
async fn pods_that_do_not_fit_are_refused_or_left_alone_and_long_names_get_valid_labels() {
    let client = client().await;
    crate::support::init_logs();
    let id = unique_id();

    // The Certificate CRD, shared with the other e2e tests (they may run at the same time).
    certificates_served(&client).await;

    // The injector on 127.0.0.1 with a serving certificate from our own CA.
    let (_tmp, pki, hook) = start_injector(&client).await;
    let native = hook.native.load(std::sync::atomic::Ordering::Relaxed);

    // One namespace, its pods opted in by annotation through `/mutate`.
    let namespaces: Api<Namespace> = Api::all(client.clone());
    let ns = format!("wsgate-e2e-fit-{id}");
    create(
        &namespaces,
        json!({"metadata": {"name": ns, "labels": {"wsgate-e2e-fit": id}}}),
    )
    .await;
    let long_sa = format!("sa-{}", "x".repeat(67));
    assert_eq!(long_sa.len(), 70);
    let sas: Api<ServiceAccount> = Api::namespaced(client.clone(), &ns);
    for sa in ["default", long_sa.as_str()] {
        create(&sas, json!({"metadata": {"name": sa}})).await;
    }
    let ca_bundle = base64::Engine::encode(&base64::engine::general_purpose::STANDARD, pki.ca.cert_pem.as_bytes());
    let configs: Api<MutatingWebhookConfiguration> = Api::all(client.clone());
    let config_name = format!("wsgate-e2e-fit-{id}");
    create(
        &configs,
        json!({
            "metadata": {"name": config_name},
            "webhooks": [{
                "name": "pod.inject.wsgate.dev", "admissionReviewVersions": ["v1"], "sideEffects": "None",
                "failurePolicy": "Fail", "reinvocationPolicy": "IfNeeded", "timeoutSeconds": 10,
                "clientConfig": {"url": format!("https://{}/mutate", hook.listen_addr), "caBundle": ca_bundle},
                "namespaceSelector": {"matchLabels": {"wsgate-e2e-fit": id}},
                "rules": [{"operations": ["CREATE"], "apiGroups": [""], "apiVersions": ["v1"], "resources": ["pods"]}]
            }]
        }),
    )
    .await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let pods: Api<Pod> = Api::namespaced(client.clone(), &ns);
    let inject = || json!({"wsgate.dev/inject": "true"});

    // hostNetwork: admitted as it was sent, no sidecar, no label, no status.
    let mut host = pod("host-network", "default", inject());
    host["spec"]["hostNetwork"] = json!(true);
    let host = create(&pods, host).await;
    assert!(sidecar(&host).is_none(), "a hostNetwork pod got the sidecar");
    let labels = host.metadata.labels.clone().unwrap_or_default();
    assert!(!labels.contains_key("wsgate.dev/injected"), "{labels:?}");
    let annotations = host.metadata.annotations.clone().unwrap_or_default();
    assert!(!annotations.contains_key("wsgate.dev/status"), "{annotations:?}");

    // A container declaring the sidecar's admin port: refused, naming the port and container.
    let mut admin = pod("admin-port", "default", inject());
    admin["spec"]["containers"][0]["ports"] = json!([{"containerPort": 8080}, {"containerPort": 9901}]);
    admin["metadata"]["annotations"]["wsgate.dev/upstream-port"] = json!("8080");
    let admin: Pod = serde_json::from_value(admin).unwrap();
    let err = pods
        .create(&PostParams::default(), &admin)
        .await
        .unwrap_err()
        .to_string();
    assert!(err.contains("9901") && err.contains("container app"), "{err}");

    // A DNS name of another namespace: refused, naming the annotation and the name.
    let foreign: Pod = serde_json::from_value(pod(
        "foreign-dns",
        "default",
        json!({"wsgate.dev/inject": "true", "wsgate.dev/dns-names": "api.kube-system.svc"}),
    ))
    .unwrap();
    let err = pods
        .create(&PostParams::default(), &foreign)
        .await
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("wsgate.dev/dns-names") && err.contains("api.kube-system.svc"),
        "{err}"
    );
    for refused in ["admin-port", "foreign-dns"] {
        assert!(pods.get_opt(refused).await.unwrap().is_none(), "{refused} was stored");
    }

    // A 70-character service account: injected, and its Certificate's labels are valid (the
    // API server stored it).
    let long = create(
        &pods,
        pod(
            "long-sa",
            &long_sa,
            json!({"wsgate.dev/inject": "true", "wsgate.dev/cpu-request": "250m"}),
        ),
    )
    .await;
    let c = sidecar(&long).expect("the long service account's pod has the sidecar");
    let status: Value =
        serde_json::from_str(&long.metadata.annotations.as_ref().unwrap()["wsgate.dev/status"]).unwrap();
    assert_eq!(
        status,
        json!({"image": "ghcr.io/wsgate/wsgate:0.1.0", "version": env!("CARGO_PKG_VERSION"), "native": native})
    );
    let service = c.env.iter().flatten().find(|e| e.name == "OTEL_SERVICE_NAME").unwrap();
    assert_eq!(service.value.as_deref(), Some("long-sa-wsgate"));
    let requests = c.resources.as_ref().unwrap().requests.clone().unwrap();
    assert_eq!(requests["cpu"].0, "250m");
    let certs: Api<DynamicObject> = Api::namespaced_with(
        client.clone(),
        &ns,
        &wsgate::inject::certificates::certificate_resource(),
    );
    let secret = format!("wsgate-{long_sa}");
    let t0 = std::time::Instant::now();
    let cert = loop {
        if let Some(cert) = certs.get_opt(&secret).await.unwrap() {
            break cert;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(60),
            "no Certificate {secret} for the 70-character service account"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    let labels = cert.metadata.labels.clone().unwrap();
    let sa_label = &labels["wsgate.dev/service-account"];
    assert_eq!(*sa_label, wsgate::inject::certificates::label_value(&long_sa));
    assert!(sa_label.len() <= 63 && sa_label.starts_with("sa-xxx"), "{sa_label}");
    assert_eq!(
        cert.data["spec"]["uris"],
        json!([format!("spiffe://cluster.local/ns/{ns}/sa/{long_sa}")])
    );
    // The label selects it, as the controller's own lookups do.
    let selected = certs
        .list(&kube::api::ListParams::default().labels(&format!("wsgate.dev/service-account={sa_label}")))
        .await
        .unwrap();
    assert_eq!(selected.items.len(), 1);

    configs.delete(&config_name, &DeleteParams::default()).await.unwrap();
    let _ = namespaces.delete(&ns, &DeleteParams::default()).await;
    hook.stop();
    hook.wait().await;
}
