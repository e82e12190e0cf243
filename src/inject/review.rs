//! A bounded reading of an AdmissionReview for a Pod: only the fields the mutation reads
//! (`patch::mutate`, `annotations`, the webhook's log line), with a cap on every list it keeps,
//! so one review costs about its own body in memory and milliseconds of CPU, whatever its pod
//! holds. Everything else in the body is skipped by serde_json without being built (`IgnoredAny`:
//! a loop with an explicit stack of one byte per level, no recursion). The values built have a
//! fixed shape a few levels deep, behind serde_json's recursion limit (128 levels).
//!
//! Pure: serde, k8s-openapi and kube's admission types; in the crate only `annotations` (the
//! annotation names it keeps).

use std::collections::BTreeMap;
use std::fmt;
use std::marker::PhantomData;

use k8s_openapi::api::core::v1::{Container, ContainerPort, Pod, PodSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, OwnerReference};
use kube::core::GroupVersionKind;
use kube::core::admission::Operation;
use serde::Deserialize;
use serde::de::{DeserializeSeed, Deserializer, IgnoredAny, MapAccess, SeqAccess, Visitor};

/// Most containers (and, separately, init containers) a pod may have for wsgate to read it.
/// Kubernetes sets no cap of its own, but real pods have a handful and well under 100 (a
/// service-mesh pod with every sidecar has about 5); 1024 is far above any real pod and still
/// only a few KiB of names.
pub const MAX_CONTAINERS: usize = 1024;
/// Most ports one container may declare. Kubernetes has no port ranges, so media servers
/// declare one entry per port, sometimes a few hundred; 1024 is above those.
pub const MAX_PORTS: usize = 1024;
/// Most ports all the containers of a pod may declare together: the per-container cap alone
/// would let one body of 3 MiB carry 150,000 ports, about 40 MiB once turned into a pod.
pub const MAX_PORTS_IN_POD: usize = 4096;
/// Most `wsgate.dev/*` annotations a pod may carry (wsgate reads 13 of them).
pub const MAX_WSGATE_ANNOTATIONS: usize = 64;
/// Longest value of an annotation wsgate reads (`wsgate.dev/*`, and
/// `kubectl.kubernetes.io/default-container`): allow lists and DNS names of a few hundred
/// entries fit; Kubernetes caps all of a pod's annotations together at 256 KiB.
pub const MAX_ANNOTATION_VALUE: usize = 32 * 1024;

/// Longest container name wsgate reads. Kubernetes requires a DNS label (63 bytes), but a
/// mutating webhook sees the pod before that validation; each declared port copies its
/// container's name, so an unbounded name would multiply the body.
pub const MAX_NAME: usize = 253;

/// The annotation kubectl uses to pick the container of `exec` and `logs`.
pub const DEFAULT_CONTAINER: &str = "kubectl.kubernetes.io/default-container";
/// Most owner references wsgate reads (a pod has one controller, rarely any other owner);
/// past the cap none is read and the workload is named after the pod.
pub const MAX_OWNERS: usize = 16;
/// The labels wsgate reads (to name the workload in `OTEL_SERVICE_NAME`); the others are
/// skipped unread.
pub const LABELS_READ: [&str; 2] = ["app.kubernetes.io/name", "pod-template-hash"];
/// The prefix of the annotations wsgate reads.
const WSGATE_PREFIX: &str = "wsgate.dev/";

/// A part of a pod beyond one of the caps above: wsgate read no further than the cap, so it
/// cannot tell what the pod holds there.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum OverLimit {
    /// A list longer than its cap.
    #[error("the pod has {found} {what}; wsgate reads at most {cap}")]
    List {
        /// Which list (`containers`, `initContainers`, `ports of container web`).
        what: String,
        /// How many elements it has.
        found: usize,
        /// The cap.
        cap: usize,
    },
    /// More `wsgate.dev/*` annotations than [`MAX_WSGATE_ANNOTATIONS`].
    #[error("the pod has {found} wsgate.dev/* annotations; wsgate reads at most {cap}")]
    Annotations {
        /// How many it has.
        found: usize,
        /// The cap.
        cap: usize,
    },
    /// A container name longer than [`MAX_NAME`].
    #[error("the pod has a container name {len} bytes long; wsgate reads at most {cap} bytes")]
    Name {
        /// Its length in bytes.
        len: usize,
        /// The cap.
        cap: usize,
    },
    /// An annotation value longer than [`MAX_ANNOTATION_VALUE`].
    #[error("annotation {key} is {len} bytes long; wsgate reads at most {cap} bytes")]
    AnnotationValue {
        /// The annotation.
        key: String,
        /// Its length in bytes.
        len: usize,
        /// The cap.
        cap: usize,
    },
}

/// A JSON array read up to `CAP` elements. Past the cap the rest is only counted
/// (`IgnoredAny`: nothing is built), the elements read are dropped, and [`Bounded::exceeded`]
/// says so; the parse goes on, so the review's `uid` can still be answered.
#[derive(Debug, Clone, PartialEq)]
pub struct Bounded<T, const CAP: usize> {
    items: Vec<T>,
    len: usize,
}

impl<T, const CAP: usize> Default for Bounded<T, CAP> {
    fn default() -> Self {
        Self {
            items: Vec::new(),
            len: 0,
        }
    }
}

impl<T, const CAP: usize> Bounded<T, CAP> {
    /// How many elements the array has (all of them, also past the cap).
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether the array is empty.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Whether the array has more than `CAP` elements.
    pub fn exceeded(&self) -> bool {
        self.len > CAP
    }

    /// The elements; empty when the cap was exceeded.
    pub fn items(&self) -> &[T] {
        &self.items
    }

    /// How many elements are held in memory (at most `CAP`, 0 past the cap).
    pub fn held(&self) -> usize {
        self.items.len()
    }
}

impl<'de, T: Deserialize<'de>, const CAP: usize> Deserialize<'de> for Bounded<T, CAP> {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct Counting<T, const CAP: usize>(PhantomData<T>);

        impl<'de, T: Deserialize<'de>, const CAP: usize> Visitor<'de> for Counting<T, CAP> {
            type Value = Bounded<T, CAP>;

            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(f, "an array")
            }

            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Self::Value, A::Error> {
                let mut items = Vec::new();
                while items.len() < CAP {
                    match seq.next_element::<T>()? {
                        Some(item) => items.push(item),
                        None => {
                            let len = items.len();
                            return Ok(Bounded { items, len });
                        }
                    }
                }
                let mut len = items.len();
                while seq.next_element::<IgnoredAny>()?.is_some() {
                    if len == CAP {
                        // Over the cap: what was read is of no use any more.
                        items = Vec::new();
                    }
                    len += 1;
                }
                Ok(Bounded { items, len })
            }
        }

        deserializer.deserialize_seq(Counting::<T, CAP>(PhantomData))
    }
}

/// A review: the `AdmissionReview` envelope and its request.
#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ReviewView {
    /// `admission.k8s.io/v1`, echoed in the answer.
    pub api_version: String,
    /// `AdmissionReview`, echoed in the answer.
    pub kind: String,
    /// The request (absent in a malformed review).
    #[serde(default)]
    pub request: Option<RequestView>,
}

/// The fields of an `AdmissionRequest` the webhook reads (`oldObject`, `userInfo`, `options`
/// and the rest are skipped).
#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct RequestView {
    /// The round-trip id, echoed in the answer.
    pub uid: String,
    /// The kind of the object.
    pub kind: GroupVersionKind,
    /// The namespace of the request.
    #[serde(default)]
    pub namespace: Option<String>,
    /// CREATE, UPDATE, …
    pub operation: Operation,
    /// The pod.
    #[serde(default)]
    pub object: Option<PodView>,
    /// A dry run.
    #[serde(default)]
    pub dry_run: bool,
}

/// The fields of a pod the mutation reads.
#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PodView {
    #[serde(default)]
    metadata: MetaView,
    #[serde(default)]
    spec: Option<SpecView>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
struct MetaView {
    #[serde(default)]
    name: Option<String>,
    #[serde(default)]
    generate_name: Option<String>,
    #[serde(default)]
    namespace: Option<String>,
    /// Whether there are labels (the patch adds one to the map or creates it), and the
    /// [`LABELS_READ`].
    #[serde(default)]
    labels: Option<Labels>,
    #[serde(default)]
    annotations: Option<Annotations>,
    /// The pod's owners (its controller names the workload).
    #[serde(default)]
    owner_references: Option<Bounded<OwnerView, MAX_OWNERS>>,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
struct OwnerView {
    #[serde(default)]
    kind: Option<BoundedStr<MAX_NAME>>,
    #[serde(default)]
    name: Option<BoundedStr<MAX_NAME>>,
    #[serde(default)]
    controller: Option<bool>,
}

/// The [`LABELS_READ`] of a pod, values of at most [`MAX_NAME`] bytes (a longer one is
/// dropped: Kubernetes allows 63). Present even when empty.
#[derive(Debug, Default)]
struct Labels {
    kept: BTreeMap<String, String>,
}

impl<'de> Deserialize<'de> for Labels {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct Filter;

        impl<'de> Visitor<'de> for Filter {
            type Value = Labels;

            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(f, "a map of labels")
            }

            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
                let mut out = Labels::default();
                while let Some(key) = map.next_key_seed(LabelKeySeed)? {
                    match key {
                        Some(key) => {
                            if let BoundedStr(Ok(value)) = map.next_value::<BoundedStr<MAX_NAME>>()? {
                                out.kept.insert(key.to_owned(), value);
                            }
                        }
                        None => {
                            map.next_value::<IgnoredAny>()?;
                        }
                    }
                }
                Ok(out)
            }
        }

        deserializer.deserialize_map(Filter)
    }
}

/// A label key, kept only when it is one of [`LABELS_READ`].
struct LabelKeySeed;

impl<'de> DeserializeSeed<'de> for LabelKeySeed {
    type Value = Option<&'static str>;

    fn deserialize<D: Deserializer<'de>>(self, deserializer: D) -> Result<Self::Value, D::Error> {
        deserializer.deserialize_str(self)
    }
}

impl Visitor<'_> for LabelKeySeed {
    type Value = Option<&'static str>;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "a label name")
    }

    fn visit_str<E: serde::de::Error>(self, key: &str) -> Result<Self::Value, E> {
        Ok(LABELS_READ.into_iter().find(|k| *k == key))
    }
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
struct SpecView {
    #[serde(default)]
    containers: Option<Bounded<ContainerView, MAX_CONTAINERS>>,
    #[serde(default)]
    init_containers: Option<Bounded<ContainerView, MAX_CONTAINERS>>,
    /// Only whether there are volumes matters (the patch appends to the list or creates it).
    #[serde(default)]
    volumes: Option<IgnoredAny>,
    #[serde(default)]
    service_account_name: Option<String>,
    #[serde(default)]
    host_network: Option<bool>,
    #[serde(default)]
    restart_policy: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
struct ContainerView {
    #[serde(default)]
    name: Option<BoundedStr<MAX_NAME>>,
    #[serde(default)]
    ports: Option<Bounded<PortView, MAX_PORTS>>,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
struct PortView {
    #[serde(default)]
    container_port: Option<i32>,
    #[serde(default)]
    protocol: Option<String>,
}

/// The annotations wsgate reads (`wsgate.dev/*` and [`DEFAULT_CONTAINER`]); the others are
/// skipped unread. Present even when empty: whether the pod has annotations at all matters.
#[derive(Debug, Default)]
struct Annotations {
    kept: BTreeMap<String, String>,
    over: Option<OverLimit>,
}

/// An annotation key, kept only when wsgate reads it.
struct KeySeed;

impl<'de> DeserializeSeed<'de> for KeySeed {
    type Value = Option<String>;

    fn deserialize<D: Deserializer<'de>>(self, deserializer: D) -> Result<Self::Value, D::Error> {
        deserializer.deserialize_str(self)
    }
}

impl Visitor<'_> for KeySeed {
    type Value = Option<String>;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "an annotation name")
    }

    fn visit_str<E: serde::de::Error>(self, key: &str) -> Result<Self::Value, E> {
        Ok((key.starts_with(WSGATE_PREFIX) || key == DEFAULT_CONTAINER).then(|| key.to_owned()))
    }
}

/// A JSON string read only when at most `CAP` bytes long; otherwise only its length is kept.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BoundedStr<const CAP: usize>(pub Result<String, usize>);

impl<'de, const CAP: usize> Deserialize<'de> for BoundedStr<CAP> {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct Measure<const CAP: usize>;

        impl<const CAP: usize> Visitor<'_> for Measure<CAP> {
            type Value = BoundedStr<CAP>;

            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(f, "a string")
            }

            fn visit_str<E: serde::de::Error>(self, value: &str) -> Result<Self::Value, E> {
                Ok(BoundedStr(if value.len() > CAP {
                    Err(value.len())
                } else {
                    Ok(value.to_owned())
                }))
            }
        }

        deserializer.deserialize_str(Measure::<CAP>)
    }
}

impl<'de> Deserialize<'de> for Annotations {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct Filter;

        impl<'de> Visitor<'de> for Filter {
            type Value = Annotations;

            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(f, "a map of annotations")
            }

            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
                let mut out = Annotations::default();
                let mut wsgate = 0usize;
                while let Some(key) = map.next_key_seed(KeySeed)? {
                    let Some(key) = key else {
                        map.next_value::<IgnoredAny>()?;
                        continue;
                    };
                    if key.starts_with(WSGATE_PREFIX) {
                        wsgate += 1;
                        if wsgate > MAX_WSGATE_ANNOTATIONS {
                            map.next_value::<IgnoredAny>()?;
                            continue;
                        }
                    }
                    match map.next_value::<BoundedStr<MAX_ANNOTATION_VALUE>>()?.0 {
                        Ok(value) => {
                            out.kept.insert(key, value);
                        }
                        Err(len) => {
                            // Kept empty, so that an over-long `wsgate.dev/inject` reads as a
                            // bad value rather than as no opinion.
                            out.kept.insert(key.clone(), String::new());
                            out.over.get_or_insert(OverLimit::AnnotationValue {
                                key,
                                len,
                                cap: MAX_ANNOTATION_VALUE,
                            });
                        }
                    }
                }
                if wsgate > MAX_WSGATE_ANNOTATIONS {
                    out.over = Some(OverLimit::Annotations {
                        found: wsgate,
                        cap: MAX_WSGATE_ANNOTATIONS,
                    });
                }
                Ok(out)
            }
        }

        deserializer.deserialize_map(Filter)
    }
}

fn list_over<T, const CAP: usize>(list: Option<&Bounded<T, CAP>>, what: impl FnOnce() -> String) -> Option<OverLimit> {
    let list = list?;
    list.exceeded().then(|| OverLimit::List {
        what: what(),
        found: list.len(),
        cap: CAP,
    })
}

impl ContainerView {
    fn name(&self) -> &str {
        match &self.name {
            Some(BoundedStr(Ok(name))) => name,
            _ => "",
        }
    }
}

impl PodView {
    /// The first cap the pod exceeds, if any. When there is one, [`PodView::to_pod`] lacks the
    /// part beyond it (the list is empty), so only the annotations can be trusted.
    pub fn over_limit(&self) -> Option<OverLimit> {
        if let Some(over) = self.metadata.annotations.as_ref().and_then(|a| a.over.clone()) {
            return Some(over);
        }
        let spec = self.spec.as_ref()?;
        for (field, list) in [
            ("containers", &spec.containers),
            ("initContainers", &spec.init_containers),
        ] {
            if let Some(over) = list_over(list.as_ref(), || field.to_owned()) {
                return Some(over);
            }
            for c in list.iter().flat_map(|l| l.items()) {
                if let Some(BoundedStr(Err(len))) = c.name {
                    return Some(OverLimit::Name { len, cap: MAX_NAME });
                }
                let name = || format!("ports in container {}", c.name());
                if let Some(over) = list_over(c.ports.as_ref(), name) {
                    return Some(over);
                }
            }
        }
        let ports: usize = [&spec.containers, &spec.init_containers]
            .into_iter()
            .flatten()
            .flat_map(|l| l.items())
            .flat_map(|c| c.ports.as_ref())
            .map(Bounded::len)
            .sum();
        (ports > MAX_PORTS_IN_POD).then(|| OverLimit::List {
            what: "ports in all its containers".into(),
            found: ports,
            cap: MAX_PORTS_IN_POD,
        })
    }

    /// The pod as k8s-openapi's type, with only the fields the mutation reads: name,
    /// generateName, namespace, the labels wsgate reads (or an empty map: whether there are
    /// labels matters), the owners' kind, name and `controller`, the annotations wsgate reads, the
    /// containers' and init containers' names and ports, whether there are volumes, the
    /// service account, `hostNetwork` and `restartPolicy`. A pod past a cap ([`PodView::over_limit`]) gets its metadata only.
    pub fn to_pod(&self) -> Pod {
        let m = &self.metadata;
        let metadata = ObjectMeta {
            name: m.name.clone(),
            generate_name: m.generate_name.clone(),
            namespace: m.namespace.clone(),
            labels: m.labels.as_ref().map(|l| l.kept.clone()),
            annotations: m.annotations.as_ref().map(|a| a.kept.clone()),
            owner_references: m.owner_references.as_ref().map(|owners| {
                let text = |s: &Option<BoundedStr<MAX_NAME>>| match s {
                    Some(BoundedStr(Ok(s))) => s.clone(),
                    _ => String::new(),
                };
                owners
                    .items()
                    .iter()
                    .map(|o| OwnerReference {
                        kind: text(&o.kind),
                        name: text(&o.name),
                        controller: o.controller,
                        ..OwnerReference::default()
                    })
                    .collect()
            }),
            ..ObjectMeta::default()
        };
        let within = self.over_limit().is_none();
        let spec = self.spec.as_ref().filter(|_| within).map(|s| {
            let container = |c: &ContainerView| Container {
                name: c.name().to_owned(),
                ports: c.ports.as_ref().map(|ports| {
                    ports
                        .items()
                        .iter()
                        .map(|p| ContainerPort {
                            container_port: p.container_port.unwrap_or_default(),
                            protocol: p.protocol.clone(),
                            ..ContainerPort::default()
                        })
                        .collect()
                }),
                ..Container::default()
            };
            PodSpec {
                containers: s.containers.iter().flat_map(|l| l.items()).map(container).collect(),
                init_containers: s
                    .init_containers
                    .as_ref()
                    .map(|l| l.items().iter().map(container).collect()),
                volumes: s.volumes.map(|_| Vec::new()),
                service_account_name: s.service_account_name.clone(),
                host_network: s.host_network,
                restart_policy: s.restart_policy.clone(),
                ..PodSpec::default()
            }
        });
        Pod {
            metadata,
            spec,
            ..Pod::default()
        }
    }
}

#[cfg(test)]
mod tests {
    use std::cell::Cell;

    use super::*;

    thread_local! {
        static BUILT: Cell<usize> = const { Cell::new(0) };
    }

    /// An element that counts how many of it were built.
    struct Counted(#[allow(dead_code)] u64);

    impl<'de> Deserialize<'de> for Counted {
        fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
            IgnoredAny::deserialize(deserializer)?;
            BUILT.with(|b| b.set(b.get() + 1));
            Ok(Counted(0))
        }
    }

    fn array(n: usize) -> String {
        format!("[{}]", vec!["{}"; n].join(","))
    }

    #[test]
    fn a_list_at_its_cap_is_read_whole() {
        let list: Bounded<Counted, 8> = serde_json::from_str(&array(8)).unwrap();
        assert!(!list.exceeded());
        assert_eq!((list.len(), list.held()), (8, 8));
        let empty: Bounded<Counted, 8> = serde_json::from_str("[]").unwrap();
        assert!(empty.is_empty() && !empty.exceeded());
    }

    #[test]
    fn one_past_the_cap_is_refused_and_nothing_is_kept() {
        let list: Bounded<Counted, 8> = serde_json::from_str(&array(9)).unwrap();
        assert!(list.exceeded());
        assert_eq!((list.len(), list.held()), (9, 0));
    }

    #[test]
    fn elements_past_the_cap_are_counted_not_built() {
        BUILT.with(|b| b.set(0));
        let list: Bounded<Counted, 8> = serde_json::from_str(&array(1_000_000)).unwrap();
        assert_eq!(list.len(), 1_000_000);
        assert!(list.exceeded());
        assert_eq!(BUILT.with(Cell::get), 8, "only the elements up to the cap were built");
        assert_eq!(list.items.capacity(), 0, "and they were dropped");
    }

    #[test]
    fn a_list_that_is_not_an_array_is_an_error() {
        assert!(serde_json::from_str::<Bounded<Counted, 8>>("{}").is_err());
        assert!(serde_json::from_str::<Bounded<Counted, 8>>("[1,").is_err());
    }

    fn review(object: &str) -> String {
        format!(
            r#"{{"apiVersion":"admission.k8s.io/v1","kind":"AdmissionReview","request":{{"uid":"u1","kind":{{"group":"","version":"v1","kind":"Pod"}},"operation":"CREATE","object":{object}}}}}"#
        )
    }

    fn view(object: &str) -> PodView {
        let r: ReviewView = serde_json::from_str(&review(object)).unwrap();
        r.request.unwrap().object.unwrap()
    }

    #[test]
    fn too_many_containers_is_named_with_its_cap_and_the_uid_still_read() {
        let containers = array(MAX_CONTAINERS + 1);
        let text = review(&format!(r#"{{"spec":{{"containers":{containers}}}}}"#));
        let r: ReviewView = serde_json::from_str(&text).unwrap();
        let req = r.request.unwrap();
        assert_eq!(req.uid, "u1");
        let over = req.object.unwrap().over_limit().unwrap();
        assert_eq!(
            over.to_string(),
            format!(
                "the pod has {} containers; wsgate reads at most {MAX_CONTAINERS}",
                MAX_CONTAINERS + 1
            )
        );
    }

    #[test]
    fn too_many_ports_in_a_container_or_too_long_a_name_is_named() {
        let ports = vec![r#"{"containerPort":80}"#; MAX_PORTS + 1].join(",");
        let p = view(&format!(
            r#"{{"spec":{{"initContainers":[],"containers":[{{"name":"web","ports":[{ports}]}}]}}}}"#
        ));
        assert!(p.over_limit().unwrap().to_string().contains("ports in container web"));
        let long = "a".repeat(MAX_NAME + 1);
        let p = view(&format!(r#"{{"spec":{{"containers":[{{"name":"{long}"}}]}}}}"#));
        assert_eq!(
            p.over_limit(),
            Some(OverLimit::Name {
                len: MAX_NAME + 1,
                cap: MAX_NAME
            })
        );
        let at_cap = "a".repeat(MAX_NAME);
        let p = view(&format!(r#"{{"spec":{{"containers":[{{"name":"{at_cap}"}}]}}}}"#));
        assert_eq!(p.to_pod().spec.unwrap().containers[0].name, at_cap);
    }

    #[test]
    fn ports_are_capped_across_the_whole_pod_and_such_a_pod_is_not_built() {
        let ports = vec![r#"{"containerPort":80}"#; MAX_PORTS].join(",");
        let n = MAX_PORTS_IN_POD / MAX_PORTS;
        let at_cap = vec![format!(r#"{{"ports":[{ports}]}}"#); n].join(",");
        let p = view(&format!(r#"{{"spec":{{"containers":[{at_cap}]}}}}"#));
        assert_eq!(p.over_limit(), None);
        assert_eq!(p.to_pod().spec.unwrap().containers.len(), n);
        let p = view(&format!(
            r#"{{"spec":{{"containers":[{at_cap}],"initContainers":[{{"ports":[{{}}]}}]}}}}"#
        ));
        assert_eq!(
            p.over_limit().unwrap().to_string(),
            format!(
                "the pod has {} ports in all its containers; wsgate reads at most {MAX_PORTS_IN_POD}",
                MAX_PORTS_IN_POD + 1
            )
        );
        assert!(p.to_pod().spec.is_none());
    }

    #[test]
    fn only_the_annotations_wsgate_reads_are_kept_and_long_values_are_refused() {
        let long = "a".repeat(MAX_ANNOTATION_VALUE + 1);
        let p = view(&format!(
            r#"{{"metadata":{{"labels":{{"app":"x"}},"annotations":{{"other":"x","kubectl.kubernetes.io/default-container":"web","wsgate.dev/inject":"true","wsgate.dev/allow":"{long}"}}}}}}"#
        ));
        let pod = p.to_pod();
        let a = pod.metadata.annotations.unwrap();
        assert_eq!(
            a.keys().collect::<Vec<_>>(),
            [DEFAULT_CONTAINER, "wsgate.dev/allow", "wsgate.dev/inject"]
        );
        assert_eq!(a["wsgate.dev/allow"], "");
        assert!(pod.metadata.labels.is_some());
        assert_eq!(
            p.over_limit(),
            Some(OverLimit::AnnotationValue {
                key: "wsgate.dev/allow".into(),
                len: MAX_ANNOTATION_VALUE + 1,
                cap: MAX_ANNOTATION_VALUE
            })
        );
        let many: Vec<String> = (0..=MAX_WSGATE_ANNOTATIONS)
            .map(|i| format!(r#""wsgate.dev/x{i}":"""#))
            .collect();
        let p = view(&format!(r#"{{"metadata":{{"annotations":{{{}}}}}}}"#, many.join(",")));
        assert!(matches!(p.over_limit(), Some(OverLimit::Annotations { .. })));
    }

    #[test]
    fn the_workload_labels_and_owners_are_kept_and_nothing_else() {
        let p = view(
            r#"{"metadata":{"labels":{"app":"x","app.kubernetes.io/name":"checkout","pod-template-hash":"5d4f8b"},
               "ownerReferences":[{"apiVersion":"apps/v1","kind":"ReplicaSet","name":"checkout-5d4f8b","uid":"u","controller":true,"blockOwnerDeletion":true}]}}"#,
        );
        let pod = p.to_pod();
        let labels = pod.metadata.labels.unwrap();
        assert_eq!(labels.keys().collect::<Vec<_>>(), LABELS_READ);
        assert_eq!(labels["app.kubernetes.io/name"], "checkout");
        let owners = pod.metadata.owner_references.unwrap();
        assert_eq!(
            (owners[0].kind.as_str(), owners[0].name.as_str(), owners[0].controller),
            ("ReplicaSet", "checkout-5d4f8b", Some(true))
        );
        let many = vec![r#"{"kind":"Job","name":"j"}"#; MAX_OWNERS + 1].join(",");
        let p = view(&format!(r#"{{"metadata":{{"ownerReferences":[{many}]}}}}"#));
        assert_eq!(p.to_pod().metadata.owner_references, Some(Vec::new()));
        assert_eq!(p.over_limit(), None, "too many owners only loses the workload's name");
        let long = "a".repeat(MAX_NAME + 1);
        let p = view(&format!(
            r#"{{"metadata":{{"labels":{{"app.kubernetes.io/name":"{long}"}}}}}}"#
        ));
        assert_eq!(p.to_pod().metadata.labels, Some(BTreeMap::new()));
    }

    #[test]
    fn absent_and_null_fields_read_as_k8s_openapi_reads_them() {
        let p = view(r#"{"metadata":{"annotations":null,"labels":null},"spec":{"containers":null,"volumes":null}}"#);
        let pod = p.to_pod();
        assert!(pod.metadata.annotations.is_none() && pod.metadata.labels.is_none());
        let spec = pod.spec.unwrap();
        assert!(spec.containers.is_empty() && spec.volumes.is_none() && spec.init_containers.is_none());
        let p = view(r#"{"metadata":{"annotations":{}},"spec":{"containers":[{}],"volumes":[]}}"#);
        let pod = p.to_pod();
        assert_eq!(pod.metadata.annotations, Some(BTreeMap::new()));
        let spec = pod.spec.unwrap();
        assert_eq!(spec.containers[0].name, "");
        assert_eq!(spec.volumes, Some(Vec::new()));
        assert!(view(r#"{}"#).to_pod().spec.is_none());
    }

    #[test]
    fn deep_nesting_costs_no_stack_skipped_or_read() {
        // Skipped values are walked by serde_json's `ignore_value`, a loop with an explicit
        // stack of one byte per level (so at most the body's size): no recursion to overflow.
        let deep = format!("{}{}", "[".repeat(1_000_000), "]".repeat(1_000_000));
        let p = view(&format!(r#"{{"spec":{{"unknown":{deep}}},"x":{deep}}}"#));
        assert!(p.over_limit().is_none());
        // The values wsgate builds have a fixed shape a few levels deep; anything nested where
        // a value is built is a type error at once, and serde_json's recursion limit (128)
        // stands behind every array and map it builds.
        let deep = format!("{}{}", "[".repeat(100_000), "]".repeat(100_000));
        let text = review(&format!(r#"{{"spec":{{"containers":{deep}}}}}"#));
        let e = serde_json::from_str::<ReviewView>(&text).unwrap_err();
        assert!(e.to_string().contains("invalid type"), "{e}");
        let e = serde_json::from_str::<serde_json::Value>(&deep).unwrap_err();
        assert!(e.to_string().contains("recursion limit exceeded"), "{e}");
    }
}
