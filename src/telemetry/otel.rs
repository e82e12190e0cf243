//! OpenTelemetry settings from the standard `OTEL_*` environment variables.
//!
//! Read here rather than left to the exporter, because the exporter does not read all of them
//! (`OTEL_SDK_DISABLED`, `OTEL_PROPAGATORS`) and because gRPC versus HTTP must be known before
//! the exporter is built. Unknown values are reported and replaced by the default, as the
//! specification asks. Pure: the variables come through a lookup function.

use std::time::Duration;

use opentelemetry::KeyValue;
use opentelemetry_sdk::trace::Sampler;

/// The OTLP transport.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Protocol {
    /// OTLP/gRPC (`grpc`).
    #[value(name = "grpc")]
    Grpc,
    /// OTLP/HTTP with protobuf bodies (`http/protobuf`, the specification's default).
    #[value(name = "http/protobuf")]
    HttpProtobuf,
}

impl Protocol {
    /// The value of `OTEL_EXPORTER_OTLP_PROTOCOL`.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Grpc => "grpc",
            Self::HttpProtobuf => "http/protobuf",
        }
    }
}

/// Which context propagators are active.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Propagators {
    /// W3C `traceparent` / `tracestate`.
    pub tracecontext: bool,
    /// W3C `baggage`.
    pub baggage: bool,
}

/// The batching of span export (`OTEL_BSP_*`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Batching {
    /// Most spans waiting for export; more are dropped and counted.
    pub max_queue: usize,
    /// Most spans per export request.
    pub max_batch: usize,
    /// Longest wait before a partial batch is sent.
    pub delay: Duration,
}

/// Everything the span pipeline needs. `endpoint == None` means tracing is off: nothing is
/// exported and nothing is attempted.
#[derive(Debug, Clone)]
pub struct OtelSettings {
    /// The full traces URL (HTTP: ending in `/v1/traces`; gRPC: `http://host:port`).
    pub endpoint: Option<String>,
    /// gRPC or HTTP/protobuf.
    pub protocol: Protocol,
    /// Extra headers (gRPC metadata) for the collector, e.g. an API key.
    pub headers: Vec<(String, String)>,
    /// Timeout of one export request.
    pub timeout: Duration,
    /// Resource attributes, `service.name` included.
    pub resource: Vec<KeyValue>,
    /// The sampler for successful handshakes (failures are always recorded).
    pub sampler: Sampler,
    /// Active propagators.
    pub propagators: Propagators,
    /// Span batching.
    pub batching: Batching,
    /// Problems found in the variables (unknown values replaced by defaults), logged at start.
    pub warnings: Vec<String>,
}

impl Default for OtelSettings {
    /// Tracing off.
    fn default() -> Self {
        Self {
            endpoint: None,
            protocol: Protocol::HttpProtobuf,
            headers: Vec::new(),
            timeout: Duration::from_secs(10),
            resource: vec![KeyValue::new("service.name", "wsgate")],
            sampler: Sampler::ParentBased(Box::new(Sampler::AlwaysOn)),
            propagators: Propagators {
                tracecontext: true,
                baggage: true,
            },
            batching: Batching {
                max_queue: 2048,
                max_batch: 512,
                delay: Duration::from_millis(5000),
            },
            warnings: Vec::new(),
        }
    }
}

/// Decodes `%XX` escapes (W3C baggage octets, as the OTLP header variables use them).
fn percent_decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%'
            && i + 2 < bytes.len()
            && let Ok(b) = u8::from_str_radix(std::str::from_utf8(&bytes[i + 1..i + 3]).unwrap_or("zz"), 16)
        {
            out.push(b);
            i += 3;
            continue;
        }
        out.push(bytes[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Parses `key1=value1,key2=value2` (the format of `OTEL_RESOURCE_ATTRIBUTES` and
/// `OTEL_EXPORTER_OTLP_HEADERS`), skipping malformed entries.
fn key_values(s: &str, what: &str, warnings: &mut Vec<String>) -> Vec<(String, String)> {
    s.split(',')
        .filter(|e| !e.trim().is_empty())
        .filter_map(|entry| match entry.split_once('=') {
            Some((k, v)) if !k.trim().is_empty() => Some((percent_decode(k.trim()), percent_decode(v.trim()))),
            _ => {
                warnings.push(format!("{what}: ignoring malformed entry '{entry}'"));
                None
            }
        })
        .collect()
}

fn truthy(v: &str) -> bool {
    v.trim().eq_ignore_ascii_case("true")
}

fn ratio(arg: Option<String>, warnings: &mut Vec<String>) -> f64 {
    match arg.as_deref().map(str::trim).map(str::parse::<f64>) {
        None => 1.0,
        Some(Ok(r)) if (0.0..=1.0).contains(&r) => r,
        Some(_) => {
            warnings.push(format!(
                "OTEL_TRACES_SAMPLER_ARG '{}' is not a ratio between 0 and 1; using 1.0",
                arg.unwrap_or_default()
            ));
            1.0
        }
    }
}

fn duration_ms(name: &str, value: Option<String>, default: Duration, warnings: &mut Vec<String>) -> Duration {
    match value.as_deref().map(str::trim).map(str::parse::<u64>) {
        None => default,
        Some(Ok(ms)) => Duration::from_millis(ms),
        Some(Err(_)) => {
            warnings.push(format!(
                "{name} '{}' is not a number of milliseconds; using the default",
                value.unwrap_or_default()
            ));
            default
        }
    }
}

fn count(name: &str, value: Option<String>, default: usize, warnings: &mut Vec<String>) -> usize {
    match value.as_deref().map(str::trim).map(str::parse::<usize>) {
        None => default,
        Some(Ok(n)) if n > 0 => n,
        Some(_) => {
            warnings.push(format!(
                "{name} '{}' is not a positive number; using {default}",
                value.unwrap_or_default()
            ));
            default
        }
    }
}

impl OtelSettings {
    /// Reads the process environment.
    pub fn from_env() -> Self {
        Self::from_lookup(|k| std::env::var(k).ok().filter(|v| !v.is_empty()))
    }

    /// Reads the variables through `get` (empty values count as unset).
    pub fn from_lookup(get: impl Fn(&str) -> Option<String>) -> Self {
        let get = |k: &str| get(k).filter(|v| !v.trim().is_empty());
        let mut s = Self::default();
        let w = &mut s.warnings;

        if get("OTEL_SDK_DISABLED").is_some_and(|v| truthy(&v)) {
            return s;
        }

        let protocol_var = get("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL").or_else(|| get("OTEL_EXPORTER_OTLP_PROTOCOL"));
        s.protocol = match protocol_var.as_deref().map(str::trim) {
            None | Some("http/protobuf") => Protocol::HttpProtobuf,
            Some("grpc") => Protocol::Grpc,
            Some(other) => {
                w.push(format!(
                    "OTEL_EXPORTER_OTLP_PROTOCOL '{other}' is not supported (use grpc or http/protobuf); using http/protobuf"
                ));
                Protocol::HttpProtobuf
            }
        };

        // The signal-specific endpoint is used as it is; the generic one gets /v1/traces (HTTP).
        s.endpoint = match (
            get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"),
            get("OTEL_EXPORTER_OTLP_ENDPOINT"),
        ) {
            (Some(traces), _) => Some(traces.trim().to_owned()),
            (None, Some(base)) => Some(match s.protocol {
                Protocol::Grpc => base.trim().to_owned(),
                Protocol::HttpProtobuf => format!("{}/v1/traces", base.trim().trim_end_matches('/')),
            }),
            (None, None) => None,
        };
        if let Some(ep) = &s.endpoint
            && !ep.starts_with("http://")
        {
            w.push(format!(
                "OTLP endpoint '{ep}': only plain http:// collectors are supported (a node-local or in-cluster collector); tracing is off"
            ));
            s.endpoint = None;
        }

        let mut headers = Vec::new();
        if let Some(h) = get("OTEL_EXPORTER_OTLP_HEADERS") {
            headers.extend(key_values(&h, "OTEL_EXPORTER_OTLP_HEADERS", w));
        }
        if let Some(h) = get("OTEL_EXPORTER_OTLP_TRACES_HEADERS") {
            headers.extend(key_values(&h, "OTEL_EXPORTER_OTLP_TRACES_HEADERS", w));
        }
        s.headers = headers;

        let timeout = get("OTEL_EXPORTER_OTLP_TRACES_TIMEOUT").or_else(|| get("OTEL_EXPORTER_OTLP_TIMEOUT"));
        s.timeout = duration_ms("OTEL_EXPORTER_OTLP_TIMEOUT", timeout, s.timeout, w);
        if s.timeout.is_zero() {
            w.push("OTEL_EXPORTER_OTLP_TIMEOUT 0 would fail every export; using 10000".into());
            s.timeout = Duration::from_secs(10);
        }

        let mut resource: Vec<KeyValue> = Vec::new();
        if let Some(attrs) = get("OTEL_RESOURCE_ATTRIBUTES") {
            for (k, v) in key_values(&attrs, "OTEL_RESOURCE_ATTRIBUTES", w) {
                resource.push(KeyValue::new(k, v));
            }
        }
        // OTEL_SERVICE_NAME wins over service.name in OTEL_RESOURCE_ATTRIBUTES; default wsgate.
        let service = get("OTEL_SERVICE_NAME")
            .or_else(|| {
                resource
                    .iter()
                    .find(|kv| kv.key.as_str() == "service.name")
                    .map(|kv| kv.value.to_string())
            })
            .unwrap_or_else(|| "wsgate".to_owned());
        resource.retain(|kv| kv.key.as_str() != "service.name");
        resource.insert(0, KeyValue::new("service.name", service));
        s.resource = resource;

        let arg = get("OTEL_TRACES_SAMPLER_ARG");
        s.sampler = match get("OTEL_TRACES_SAMPLER").as_deref().map(str::trim) {
            None | Some("parentbased_always_on") => Sampler::ParentBased(Box::new(Sampler::AlwaysOn)),
            Some("always_on") => Sampler::AlwaysOn,
            Some("always_off") => Sampler::AlwaysOff,
            Some("traceidratio") => Sampler::TraceIdRatioBased(ratio(arg, w)),
            Some("parentbased_always_off") => Sampler::ParentBased(Box::new(Sampler::AlwaysOff)),
            Some("parentbased_traceidratio") => {
                Sampler::ParentBased(Box::new(Sampler::TraceIdRatioBased(ratio(arg, w))))
            }
            Some(other) => {
                w.push(format!(
                    "OTEL_TRACES_SAMPLER '{other}' is not supported; using parentbased_always_on"
                ));
                Sampler::ParentBased(Box::new(Sampler::AlwaysOn))
            }
        };

        if let Some(list) = get("OTEL_PROPAGATORS") {
            let mut p = Propagators::default();
            for name in list.split(',').map(str::trim).filter(|n| !n.is_empty()) {
                match name {
                    "tracecontext" => p.tracecontext = true,
                    "baggage" => p.baggage = true,
                    "none" => {}
                    other => w.push(format!("OTEL_PROPAGATORS: '{other}' is not supported; ignored")),
                }
            }
            s.propagators = p;
        }

        s.batching = Batching {
            max_queue: count("OTEL_BSP_MAX_QUEUE_SIZE", get("OTEL_BSP_MAX_QUEUE_SIZE"), 2048, w),
            max_batch: count(
                "OTEL_BSP_MAX_EXPORT_BATCH_SIZE",
                get("OTEL_BSP_MAX_EXPORT_BATCH_SIZE"),
                512,
                w,
            ),
            delay: duration_ms(
                "OTEL_BSP_SCHEDULE_DELAY",
                get("OTEL_BSP_SCHEDULE_DELAY"),
                Duration::from_millis(5000),
                w,
            ),
        };
        s.batching.max_batch = s.batching.max_batch.min(s.batching.max_queue);
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn settings(vars: &[(&str, &str)]) -> OtelSettings {
        let map: HashMap<String, String> = vars.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
        OtelSettings::from_lookup(|k| map.get(k).cloned())
    }

    fn resource(s: &OtelSettings, key: &str) -> Option<String> {
        s.resource
            .iter()
            .find(|kv| kv.key.as_str() == key)
            .map(|kv| kv.value.to_string())
    }

    #[test]
    fn nothing_is_exported_without_an_endpoint() {
        let s = settings(&[("OTEL_SERVICE_NAME", "x")]);
        assert_eq!(s.endpoint, None);
        assert!(s.warnings.is_empty());
    }

    #[test]
    fn the_generic_http_endpoint_gets_v1_traces_and_the_specific_one_is_used_as_is() {
        let s = settings(&[("OTEL_EXPORTER_OTLP_ENDPOINT", "http://collector:4318/")]);
        assert_eq!(s.protocol, Protocol::HttpProtobuf);
        assert_eq!(s.endpoint.as_deref(), Some("http://collector:4318/v1/traces"));
        let s = settings(&[
            ("OTEL_EXPORTER_OTLP_ENDPOINT", "http://collector:4318"),
            ("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "http://other:9999/custom"),
        ]);
        assert_eq!(s.endpoint.as_deref(), Some("http://other:9999/custom"));
    }

    #[test]
    fn grpc_is_chosen_by_the_protocol_variable() {
        let s = settings(&[
            ("OTEL_EXPORTER_OTLP_ENDPOINT", "http://collector:4317"),
            ("OTEL_EXPORTER_OTLP_PROTOCOL", "grpc"),
        ]);
        assert_eq!(s.protocol, Protocol::Grpc);
        assert_eq!(s.endpoint.as_deref(), Some("http://collector:4317"));
        let s = settings(&[("OTEL_EXPORTER_OTLP_PROTOCOL", "http/json")]);
        assert_eq!(s.protocol, Protocol::HttpProtobuf);
        assert!(s.warnings[0].contains("http/json"));
    }

    #[test]
    fn disabled_sdk_turns_everything_off() {
        let s = settings(&[
            ("OTEL_SDK_DISABLED", "TRUE"),
            ("OTEL_EXPORTER_OTLP_ENDPOINT", "http://c:4318"),
        ]);
        assert_eq!(s.endpoint, None);
    }

    #[test]
    fn https_collectors_are_refused_with_a_warning() {
        let s = settings(&[("OTEL_EXPORTER_OTLP_ENDPOINT", "https://c:4318")]);
        assert_eq!(s.endpoint, None);
        assert!(s.warnings[0].contains("http://"));
    }

    #[test]
    fn headers_and_resource_attributes_are_parsed_and_decoded() {
        let s = settings(&[
            ("OTEL_EXPORTER_OTLP_HEADERS", "api-key=abc%3D%3D,x-tenant = blue,broken"),
            (
                "OTEL_RESOURCE_ATTRIBUTES",
                "k8s.pod.name=web-1,service.name=ignored,deployment.environment=prod",
            ),
        ]);
        assert_eq!(
            s.headers,
            vec![("api-key".into(), "abc==".into()), ("x-tenant".into(), "blue".into())]
        );
        assert_eq!(s.warnings.len(), 1);
        assert_eq!(resource(&s, "service.name").as_deref(), Some("ignored"));
        assert_eq!(resource(&s, "k8s.pod.name").as_deref(), Some("web-1"));
        let s = settings(&[
            ("OTEL_SERVICE_NAME", "edge"),
            ("OTEL_RESOURCE_ATTRIBUTES", "service.name=ignored"),
        ]);
        assert_eq!(resource(&s, "service.name").as_deref(), Some("edge"));
        assert_eq!(resource(&settings(&[]), "service.name").as_deref(), Some("wsgate"));
    }

    #[test]
    fn samplers_follow_the_specification_names() {
        let s = settings(&[
            ("OTEL_TRACES_SAMPLER", "parentbased_traceidratio"),
            ("OTEL_TRACES_SAMPLER_ARG", "0.25"),
        ]);
        assert_eq!(
            format!("{:?}", s.sampler),
            format!("{:?}", Sampler::ParentBased(Box::new(Sampler::TraceIdRatioBased(0.25))))
        );
        let s = settings(&[
            ("OTEL_TRACES_SAMPLER", "traceidratio"),
            ("OTEL_TRACES_SAMPLER_ARG", "2"),
        ]);
        assert_eq!(
            format!("{:?}", s.sampler),
            format!("{:?}", Sampler::TraceIdRatioBased(1.0))
        );
        assert_eq!(s.warnings.len(), 1);
        let s = settings(&[("OTEL_TRACES_SAMPLER", "jaeger_remote")]);
        assert!(s.warnings[0].contains("jaeger_remote"));
    }

    #[test]
    fn propagators_can_be_chosen_or_switched_off() {
        let s = settings(&[("OTEL_PROPAGATORS", "tracecontext")]);
        assert_eq!(
            s.propagators,
            Propagators {
                tracecontext: true,
                baggage: false
            }
        );
        let s = settings(&[("OTEL_PROPAGATORS", "none")]);
        assert_eq!(s.propagators, Propagators::default());
        let s = settings(&[("OTEL_PROPAGATORS", "b3,baggage")]);
        assert_eq!(
            s.propagators,
            Propagators {
                tracecontext: false,
                baggage: true
            }
        );
        assert!(s.warnings[0].contains("b3"));
    }

    #[test]
    fn batching_variables_are_read() {
        let s = settings(&[("OTEL_BSP_SCHEDULE_DELAY", "100"), ("OTEL_BSP_MAX_QUEUE_SIZE", "64")]);
        assert_eq!(s.batching.delay, Duration::from_millis(100));
        assert_eq!(s.batching.max_queue, 64);
        assert_eq!(s.batching.max_batch, 64);
    }
}
