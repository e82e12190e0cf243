//! The injection itself, as a pure function: a Pod (and the injector's settings) in, a JSON
//! patch out — or a reason to leave the pod alone, or to deny it.
//!
//! The patch only adds: the `wsgate.dev/injected` label, the `wsgate.dev/status` annotation
//! (the sidecar's image and the injector's version), the certificate volumes (mounted as
//! directories, never with `subPath`, so rotations reach the sidecar), and the sidecar — first
//! among the init containers with `restartPolicy: Always` on clusters with native sidecars, last
//! among the containers on older ones. A pod that already has the sidecar is left as it is, so
//! the API server's reinvocation (`reinvocationPolicy: IfNeeded`) changes nothing. Pods on the
//! host's network, and pods that must complete (`restartPolicy: Never` or `OnFailure`) when
//! native sidecars are off, are admitted unchanged with a warning.

use json_patch::jsonptr::PointerBuf;
use json_patch::{AddOperation, Patch, PatchOperation};
use k8s_openapi::api::core::v1::{
    Capabilities, ConfigMapVolumeSource, Container, ContainerPort, EnvVar, EnvVarSource, ExecAction, HTTPGetAction,
    Lifecycle, LifecycleHandler, ObjectFieldSelector, Pod, PodSpec, Probe, ResourceRequirements, SeccompProfile,
    SecretVolumeSource, SecurityContext, Volume, VolumeMount,
};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use serde_json::Value;

use super::annotations::{self, ADMIN_PORT, AnnotationError, INJECTED_LABEL, PodOptions, STATUS, Wanted};
use super::settings::InjectSettings;

/// The sidecar container's name.
pub const SIDECAR: &str = "wsgate-proxy";
/// The certificate volume's name.
pub const TLS_VOLUME: &str = "wsgate-tls";
/// The trust-bundle volume's name.
pub const TRUST_VOLUME: &str = "wsgate-trust";
/// Where the certificate Secret is mounted in the sidecar.
pub const TLS_MOUNT: &str = "/var/run/wsgate/tls";
/// Where the trust-bundle ConfigMap is mounted.
pub const TRUST_MOUNT: &str = "/var/run/wsgate/trust";
/// The non-root user and group the sidecar runs as (distroless "nonroot").
pub const SIDECAR_UID: i64 = 65532;

/// The annotation kubectl uses to pick the container of `exec` and `logs`.
const DEFAULT_CONTAINER: &str = "kubectl.kubernetes.io/default-container";

/// The value of `wsgate.dev/status` on an injected pod: which sidecar it got.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Status {
    /// The sidecar's image.
    pub image: String,
    /// The injector's version (`CARGO_PKG_VERSION`).
    pub version: String,
    /// Whether the sidecar is a native sidecar (an init container).
    pub native: bool,
}

impl Status {
    /// The status of a sidecar this injector writes.
    pub fn new(settings: &InjectSettings, native: bool) -> Self {
        Self {
            image: settings.image.clone(),
            version: env!("CARGO_PKG_VERSION").to_owned(),
            native,
        }
    }

    /// As the annotation's value (compact JSON).
    pub fn to_annotation(&self) -> String {
        // A struct of strings and a bool always serializes.
        serde_json::to_string(self).unwrap_or_default()
    }
}

/// Why a pod that asked for the sidecar is denied.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    /// An annotation is wrong.
    #[error(transparent)]
    Annotation(#[from] AnnotationError),
    /// One of the sidecar's ports is declared by another container (or init container) of the
    /// pod: they share one network namespace, so one of the two could not listen.
    #[error("the sidecar's {which} port {port} is already declared by {kind} {container}; {fix}")]
    PortTaken {
        /// `mTLS`, `admin` or `outbound`.
        which: &'static str,
        /// The port.
        port: u16,
        /// `container` or `init container`.
        kind: &'static str,
        /// The container's name.
        container: String,
        /// What the user can do about it.
        fix: &'static str,
    },
}

/// What to do with a pod.
#[derive(Debug, Clone, PartialEq)]
pub enum Mutation {
    /// Admit it unchanged, and why.
    Skip(&'static str),
    /// Admit it with this patch.
    Inject {
        /// The JSON patch.
        patch: Patch,
        /// What the annotations asked for (boxed: the other variants are small).
        options: Box<PodOptions>,
    },
    /// Deny it: an annotation is wrong, or the sidecar's ports are taken.
    Deny(Refusal),
    /// Admit it unchanged although it asked for the sidecar, with this warning for the user
    /// saying why it was not injected.
    Decline(String),
}

fn has_sidecar(pod: &Pod) -> bool {
    pod.spec.as_ref().is_some_and(|s| {
        s.containers.iter().any(|c| c.name == SIDECAR) || s.init_containers.iter().flatten().any(|c| c.name == SIDECAR)
    })
}

fn add(path: &[&str], value: Value) -> PatchOperation {
    PatchOperation::Add(AddOperation {
        path: PointerBuf::from_tokens(path.iter().copied()),
        value,
    })
}

fn to_value<T: serde::Serialize>(v: &T) -> Value {
    // k8s-openapi types always serialize.
    serde_json::to_value(v).unwrap_or(Value::Null)
}

fn env(name: &str, value: &str) -> EnvVar {
    EnvVar {
        name: name.into(),
        value: Some(value.into()),
        ..EnvVar::default()
    }
}

fn field_env(name: &str, path: &str) -> EnvVar {
    EnvVar {
        name: name.into(),
        value_from: Some(EnvVarSource {
            field_ref: Some(ObjectFieldSelector {
                field_path: path.into(),
                ..ObjectFieldSelector::default()
            }),
            ..EnvVarSource::default()
        }),
        ..EnvVar::default()
    }
}

fn http_probe(path: &str, period: i32, failures: i32) -> Probe {
    Probe {
        http_get: Some(HTTPGetAction {
            path: Some(path.into()),
            port: IntOrString::Int(i32::from(ADMIN_PORT)),
            ..HTTPGetAction::default()
        }),
        period_seconds: Some(period),
        failure_threshold: Some(failures),
        timeout_seconds: Some(2),
        ..Probe::default()
    }
}

/// Most runtime workers the injector gives a sidecar: a bound for quantities like `1k` (a
/// thousand CPUs), far above any sidecar's need.
pub const MAX_SIDECAR_WORKERS: u32 = 64;

/// The sidecar's runtime workers (`TOKIO_WORKER_THREADS`): its CPU limit rounded up, else its
/// CPU request rounded up, at least 1 and at most [`MAX_SIDECAR_WORKERS`]. Without it tokio
/// starts one worker per CPU the container may use, which without a CPU limit (the injector's
/// default) is every CPU of the node: 64 threads in a sidecar on a 64-CPU node that asked for
/// 50m. One worker is also the cheapest per relayed message at a moderate rate
/// (docs/performance.md, "Two workers"); a pod that needs more asks for the CPU.
pub fn sidecar_workers(cpu_limit: Option<&str>, cpu_request: Option<&str>) -> u32 {
    let parse = |q: &str| annotations::quantity_value(q.trim());
    let cores = cpu_limit
        .and_then(parse)
        .or_else(|| cpu_request.and_then(parse))
        .unwrap_or(0.0);
    // Compared as floats first: a huge quantity must not wrap when turned into an integer.
    if cores >= f64::from(MAX_SIDECAR_WORKERS) {
        return MAX_SIDECAR_WORKERS;
    }
    (cores.ceil() as u32).max(1)
}

/// The sidecar container for a pod with these options.
pub fn sidecar(opts: &PodOptions, settings: &InjectSettings, native: bool) -> Container {
    // An outbound-only pod's sidecar gets no --listen, --upstream nor --allow: without
    // --upstream the proxy binds no mTLS listener.
    let inbound = opts.inbound.as_ref();
    let mut args: Vec<String> = vec!["proxy".into()];
    if let Some(i) = inbound {
        args.extend(["--listen".into(), format!("0.0.0.0:{}", i.port)]);
    }
    args.extend(["--admin".into(), format!("0.0.0.0:{ADMIN_PORT}")]);
    if let Some(i) = inbound {
        args.extend(["--upstream".into(), format!("ws://127.0.0.1:{}", i.upstream_port)]);
    }
    args.extend([
        "--cert-dir".into(),
        TLS_MOUNT.into(),
        "--log-format".into(),
        super::settings::value_name(&settings.log_format),
    ]);
    if opts.trust_bundle.is_some() {
        args.extend(["--trust-bundle".into(), TRUST_MOUNT.into()]);
    }
    for pattern in inbound.iter().flat_map(|i| &i.allow) {
        args.extend(["--allow".into(), pattern.clone()]);
    }
    for o in &opts.outbound {
        args.extend(["--outbound".into(), format!("{}={}", o.local(), o.remote)]);
        if let Some(pattern) = &o.expect {
            args.extend(["--outbound-expect".into(), format!("{}={pattern}", o.local())]);
        }
    }
    let mut env = vec![
        field_env("POD_NAME", "metadata.name"),
        field_env("POD_NAMESPACE", "metadata.namespace"),
        env(
            "OTEL_RESOURCE_ATTRIBUTES",
            "k8s.pod.name=$(POD_NAME),k8s.namespace.name=$(POD_NAMESPACE)",
        ),
        env("OTEL_SERVICE_NAME", &opts.service_name),
    ];
    if let Some((endpoint, protocol)) = &settings.otlp {
        env.push(self::env("OTEL_EXPORTER_OTLP_ENDPOINT", endpoint));
        env.push(self::env("OTEL_EXPORTER_OTLP_PROTOCOL", protocol.as_str()));
    }
    let mut mounts = vec![VolumeMount {
        name: TLS_VOLUME.into(),
        mount_path: TLS_MOUNT.into(),
        read_only: Some(true),
        ..VolumeMount::default()
    }];
    if opts.trust_bundle.is_some() {
        mounts.push(VolumeMount {
            name: TRUST_VOLUME.into(),
            mount_path: TRUST_MOUNT.into(),
            read_only: Some(true),
            ..VolumeMount::default()
        });
    }
    let quantities = |pairs: [(&str, &Option<String>); 2]| {
        let map: std::collections::BTreeMap<String, Quantity> = pairs
            .into_iter()
            .filter_map(|(k, v)| v.as_ref().map(|q| (k.to_owned(), Quantity(q.clone()))))
            .collect();
        (!map.is_empty()).then_some(map)
    };
    // A pod's annotation wins over the injector's flag, one value at a time.
    let (r, o) = (&settings.resources, &opts.resources);
    let pick = |pod: &Option<String>, flag: &Option<String>| pod.clone().or_else(|| flag.clone());
    let requests = quantities([
        ("cpu", &pick(&o.cpu_request, &r.cpu_request)),
        ("memory", &pick(&o.memory_request, &r.memory_request)),
    ]);
    let cpu_limit = pick(&o.cpu_limit, &r.cpu_limit);
    let cpu_request = pick(&o.cpu_request, &r.cpu_request);
    let limits = quantities([("cpu", &cpu_limit), ("memory", &pick(&o.memory_limit, &r.memory_limit))]);
    let workers = sidecar_workers(cpu_limit.as_deref(), cpu_request.as_deref());
    env.push(self::env("TOKIO_WORKER_THREADS", &workers.to_string()));
    Container {
        name: SIDECAR.into(),
        image: Some(settings.image.clone()),
        image_pull_policy: Some(super::settings::value_name(&settings.pull_policy)),
        args: Some(args),
        env: Some(env),
        ports: Some(
            inbound
                .map(|i| ("wsgate-mtls", i.port))
                .into_iter()
                .chain([("wsgate-admin", ADMIN_PORT)])
                .map(|(name, port)| ContainerPort {
                    name: Some(name.into()),
                    container_port: i32::from(port),
                    protocol: Some("TCP".into()),
                    ..ContainerPort::default()
                })
                .collect(),
        ),
        // The app starts once this passes (native sidecars): certificates loaded, listener up.
        // cert-manager may need a while for a new service account, hence the long budget.
        startup_probe: Some(http_probe("/readyz", 1, 300)),
        readiness_probe: Some(http_probe("/readyz", 5, 2)),
        liveness_probe: Some(http_probe("/healthz", 10, 3)),
        lifecycle: Some(Lifecycle {
            pre_stop: Some(LifecycleHandler {
                exec: Some(ExecAction {
                    command: Some(vec!["/wsgate".into(), "drain".into()]),
                }),
                ..LifecycleHandler::default()
            }),
            ..Lifecycle::default()
        }),
        resources: Some(ResourceRequirements {
            requests,
            limits,
            ..ResourceRequirements::default()
        }),
        security_context: Some(SecurityContext {
            run_as_non_root: Some(true),
            run_as_user: Some(SIDECAR_UID),
            run_as_group: Some(SIDECAR_UID),
            read_only_root_filesystem: Some(true),
            allow_privilege_escalation: Some(false),
            privileged: Some(false),
            capabilities: Some(Capabilities {
                drop: Some(vec!["ALL".into()]),
                ..Capabilities::default()
            }),
            seccomp_profile: Some(SeccompProfile {
                type_: "RuntimeDefault".into(),
                ..SeccompProfile::default()
            }),
            ..SecurityContext::default()
        }),
        restart_policy: native.then(|| "Always".to_owned()),
        volume_mounts: Some(mounts),
        termination_message_policy: Some("FallbackToLogsOnError".into()),
        ..Container::default()
    }
}

fn volumes(opts: &PodOptions) -> Vec<Volume> {
    let mut v = vec![Volume {
        name: TLS_VOLUME.into(),
        secret: Some(SecretVolumeSource {
            secret_name: Some(opts.secret.clone()),
            ..SecretVolumeSource::default()
        }),
        ..Volume::default()
    }];
    if let Some(cm) = &opts.trust_bundle {
        v.push(Volume {
            name: TRUST_VOLUME.into(),
            config_map: Some(ConfigMapVolumeSource {
                name: cm.clone(),
                ..ConfigMapVolumeSource::default()
            }),
            ..Volume::default()
        });
    }
    v
}

/// The first of the sidecar's ports (mTLS, admin, then the outbound entries' local ports) that a
/// container or init container of the pod declares for TCP (a UDP or SCTP port of the same
/// number does not collide; an outbound listener binds loopback only, but the app's container
/// may listen on all addresses, loopback included).
fn port_taken(spec: &PodSpec, options: &PodOptions) -> Option<Refusal> {
    let declared = spec
        .containers
        .iter()
        .map(|c| ("container", c))
        .chain(spec.init_containers.iter().flatten().map(|c| ("init container", c)))
        .flat_map(|(kind, c)| {
            c.ports
                .iter()
                .flatten()
                .filter(|p| p.protocol.as_deref().is_none_or(|proto| proto == "TCP"))
                .map(move |p| (kind, c.name.as_str(), p.container_port))
        })
        .collect::<Vec<_>>();
    let mtls = options
        .inbound
        .as_ref()
        .map(|i| ("mTLS", i.port, "choose another with wsgate.dev/port"));
    let mut wanted = mtls
        .into_iter()
        .chain([(
            "admin",
            ADMIN_PORT,
            "the sidecar's admin port is fixed (probes and preStop use it): move that container's port",
        )])
        .chain(options.outbound.iter().map(|o| {
            (
                "outbound",
                o.local_port,
                "choose another local port in wsgate.dev/outbound",
            )
        }));
    wanted.find_map(|(which, port, fix)| {
        declared
            .iter()
            .find(|(_, _, p)| *p == i32::from(port))
            .map(|(kind, container, _)| Refusal::PortTaken {
                which,
                port,
                kind,
                container: (*container).to_owned(),
                fix,
            })
    })
}

/// Decides what to do with `pod`, created in `namespace` (`namespace_enabled` when the namespace
/// carries `wsgate.dev/injection: enabled`), on a cluster with or without native sidecars.
pub fn mutate(
    pod: &Pod,
    namespace: &str,
    namespace_enabled: bool,
    settings: &InjectSettings,
    native: bool,
) -> Mutation {
    match annotations::wanted(pod, namespace_enabled) {
        Err(e) => return Mutation::Deny(e.into()),
        Ok(Wanted::No) => return Mutation::Skip("not opted in"),
        Ok(Wanted::Yes) => {}
    }
    if has_sidecar(pod) {
        return Mutation::Skip("already injected");
    }
    let Some(spec) = pod.spec.as_ref() else {
        return Mutation::Skip("no pod spec");
    };
    if spec.host_network == Some(true) {
        // The sidecar's ports would be the node's: the API server defaults hostPort to
        // containerPort, so 8443 and 9901 would be taken on the node (and clash between pods).
        return Mutation::Decline(format!(
            "wsgate: sidecar not injected: the pod uses hostNetwork, where the sidecar's ports ({} and admin {ADMIN_PORT}) would be the node's ports",
            annotations::requested_port(pod)
        ));
    }
    if let Some(policy) = spec
        .restart_policy
        .as_deref()
        .filter(|p| matches!(*p, "Never" | "OnFailure"))
        && !native
    {
        // Only a native sidecar is stopped when the app's containers have completed; an
        // ordinary one never exits, so a Job's pod would run for ever.
        return Mutation::Decline(format!(
            "wsgate: sidecar not injected: the pod has restartPolicy {policy} and must complete, but native sidecars are off on this cluster; an ordinary sidecar container would never exit and keep the pod running for ever"
        ));
    }
    let options = match annotations::options(pod, namespace, settings) {
        Ok(o) => o,
        Err(e) => return Mutation::Deny(e.into()),
    };
    if let Some(taken) = port_taken(spec, &options) {
        return Mutation::Deny(taken);
    }
    let mut ops = Vec::new();
    match &pod.metadata.labels {
        None => ops.push(add(
            &["metadata", "labels"],
            serde_json::json!({ INJECTED_LABEL: "true" }),
        )),
        Some(_) => ops.push(add(&["metadata", "labels", INJECTED_LABEL], Value::from("true"))),
    }
    let new_volumes = volumes(&options);
    match &spec.volumes {
        None => ops.push(add(&["spec", "volumes"], to_value(&new_volumes))),
        Some(_) => ops.extend(new_volumes.iter().map(|v| add(&["spec", "volumes", "-"], to_value(v)))),
    }
    let container = to_value(&sidecar(&options, settings, native));
    let mut new_annotations = vec![(STATUS, Value::from(Status::new(settings, native).to_annotation()))];
    if native {
        // First init container: it starts (and passes its startup probe) before any other.
        match &spec.init_containers {
            None => ops.push(add(&["spec", "initContainers"], Value::Array(vec![container]))),
            Some(_) => ops.push(add(&["spec", "initContainers", "0"], container)),
        }
    } else {
        ops.push(add(&["spec", "containers", "-"], container));
        let has_default = pod
            .metadata
            .annotations
            .as_ref()
            .is_some_and(|a| a.contains_key(DEFAULT_CONTAINER));
        if !has_default && let Some(app) = spec.containers.first() {
            // kubectl exec/logs keep going to the app, not to the sidecar appended after it.
            new_annotations.push((DEFAULT_CONTAINER, Value::from(app.name.clone())));
        }
    }
    match &pod.metadata.annotations {
        None => {
            let map: serde_json::Map<String, Value> =
                new_annotations.into_iter().map(|(k, v)| (k.to_owned(), v)).collect();
            ops.push(add(&["metadata", "annotations"], Value::Object(map)));
        }
        Some(_) => ops.extend(
            new_annotations
                .into_iter()
                .map(|(k, v)| add(&["metadata", "annotations", k], v)),
        ),
    }
    Mutation::Inject {
        patch: Patch(ops),
        options: Box::new(options),
    }
}
