//! OTLP trace receivers running inside the test process: gRPC (tonic's generated service on
//! hyper's HTTP/2 server) and HTTP/protobuf (`POST /v1/traces` on hyper), both on 127.0.0.1.

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::rt::{TokioExecutor, TokioIo};
use opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::{TraceService, TraceServiceServer};
use opentelemetry_proto::tonic::collector::trace::v1::{ExportTraceServiceRequest, ExportTraceServiceResponse};
use opentelemetry_proto::tonic::common::v1::any_value::Value as Any;
use opentelemetry_proto::tonic::common::v1::{AnyValue, KeyValue};
use prost::Message;
use tokio::net::TcpListener;

/// An attribute value, flattened.
#[derive(Debug, Clone, PartialEq)]
pub enum Val {
    Str(String),
    Int(i64),
    Bool(bool),
    Double(f64),
    List(Vec<Val>),
    Other,
}

impl Val {
    pub fn str(&self) -> &str {
        match self {
            Val::Str(s) => s,
            other => panic!("expected a string, got {other:?}"),
        }
    }
}

fn val(v: &Option<AnyValue>) -> Val {
    match v.as_ref().and_then(|v| v.value.as_ref()) {
        Some(Any::StringValue(s)) => Val::Str(s.clone()),
        Some(Any::IntValue(i)) => Val::Int(*i),
        Some(Any::BoolValue(b)) => Val::Bool(*b),
        Some(Any::DoubleValue(d)) => Val::Double(*d),
        Some(Any::ArrayValue(a)) => Val::List(a.values.iter().map(|v| val(&Some(v.clone()))).collect()),
        _ => Val::Other,
    }
}

fn attrs(kvs: &[KeyValue]) -> BTreeMap<String, Val> {
    kvs.iter().map(|kv| (kv.key.clone(), val(&kv.value))).collect()
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|b| format!("{b:02x}")).collect()
}

/// One received span.
#[derive(Debug, Clone)]
pub struct Span {
    pub name: String,
    pub trace_id: String,
    pub span_id: String,
    pub parent_span_id: String,
    /// OTLP SpanKind: 1 internal, 2 server.
    pub kind: i32,
    /// OTLP status code: 0 unset, 1 ok, 2 error.
    pub status_code: i32,
    pub status_message: String,
    pub start_unix_nano: u64,
    pub end_unix_nano: u64,
    pub attributes: BTreeMap<String, Val>,
    pub resource: BTreeMap<String, Val>,
    pub transport: &'static str,
}

impl Span {
    pub fn attr(&self, key: &str) -> &Val {
        self.attributes
            .get(key)
            .unwrap_or_else(|| panic!("span {} has no attribute {key}: {:#?}", self.name, self.attributes))
    }

    pub fn error_type(&self) -> Option<&str> {
        self.attributes.get("error.type").map(|v| v.str())
    }
}

/// Spans received so far, and the headers of the last HTTP export request.
#[derive(Clone, Default)]
pub struct Received(Arc<Mutex<Vec<Span>>>, Arc<Mutex<http::HeaderMap>>);

impl Received {
    /// Headers of the last export request (HTTP receiver only).
    pub fn last_headers(&self) -> http::HeaderMap {
        self.1.lock().unwrap().clone()
    }

    fn add(&self, req: ExportTraceServiceRequest, transport: &'static str) {
        let mut spans = self.0.lock().unwrap();
        for rs in req.resource_spans {
            let resource = rs.resource.as_ref().map(|r| attrs(&r.attributes)).unwrap_or_default();
            for ss in rs.scope_spans {
                for s in ss.spans {
                    let status = s.status.clone().unwrap_or_default();
                    spans.push(Span {
                        name: s.name,
                        trace_id: hex(&s.trace_id),
                        span_id: hex(&s.span_id),
                        parent_span_id: hex(&s.parent_span_id),
                        kind: s.kind,
                        status_code: status.code,
                        status_message: status.message,
                        start_unix_nano: s.start_time_unix_nano,
                        end_unix_nano: s.end_time_unix_nano,
                        attributes: attrs(&s.attributes),
                        resource: resource.clone(),
                        transport,
                    });
                }
            }
        }
    }

    pub fn all(&self) -> Vec<Span> {
        self.0.lock().unwrap().clone()
    }

    pub fn handshakes(&self) -> Vec<Span> {
        self.all()
            .into_iter()
            .filter(|s| s.name == "wsgate.handshake")
            .collect()
    }

    /// Waits until `pick` finds a span, failing after 10 s.
    pub async fn wait_for(&self, what: &str, pick: impl Fn(&Span) -> bool) -> Span {
        let t0 = std::time::Instant::now();
        loop {
            if let Some(s) = self.all().into_iter().find(|s| pick(s)) {
                return s;
            }
            assert!(
                t0.elapsed() < Duration::from_secs(10),
                "no span for {what} within 10 s; received: {:#?}",
                self.all()
                    .iter()
                    .map(|s| (&s.name, s.error_type(), &s.attributes))
                    .collect::<Vec<_>>()
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
}

#[derive(Clone)]
struct Grpc(Received);

#[tonic::async_trait]
impl TraceService for Grpc {
    async fn export(
        &self,
        request: tonic::Request<ExportTraceServiceRequest>,
    ) -> Result<tonic::Response<ExportTraceServiceResponse>, tonic::Status> {
        self.0.add(request.into_inner(), "grpc");
        Ok(tonic::Response::new(ExportTraceServiceResponse {
            partial_success: None,
        }))
    }
}

/// Starts an OTLP/gRPC receiver; returns its endpoint (`http://127.0.0.1:PORT`).
pub async fn grpc_receiver() -> (String, Received) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let received = Received::default();
    let service = TraceServiceServer::new(Grpc(received.clone()));
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            let service = service.clone();
            tokio::spawn(async move {
                let _ = hyper::server::conn::http2::Builder::new(TokioExecutor::new())
                    .serve_connection(
                        TokioIo::new(stream),
                        hyper_util::service::TowerToHyperService::new(service),
                    )
                    .await;
            });
        }
    });
    (format!("http://{addr}"), received)
}

/// Starts an OTLP/HTTP (protobuf) receiver; returns its traces URL and the received spans.
pub async fn http_receiver() -> (String, Received) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr: SocketAddr = listener.local_addr().unwrap();
    let received = Received::default();
    let sink = received.clone();
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            let sink = sink.clone();
            tokio::spawn(async move {
                let service = hyper::service::service_fn(move |req: http::Request<hyper::body::Incoming>| {
                    let sink = sink.clone();
                    async move {
                        *sink.1.lock().unwrap() = req.headers().clone();
                        let ok = req.uri().path() == "/v1/traces"
                            && req.headers().get("content-type").map(|v| v.as_bytes())
                                == Some(b"application/x-protobuf");
                        let body = req
                            .into_body()
                            .collect()
                            .await
                            .map(|b| b.to_bytes())
                            .unwrap_or_default();
                        let status = match ExportTraceServiceRequest::decode(body) {
                            Ok(export) if ok => {
                                sink.add(export, "http/protobuf");
                                200
                            }
                            _ => 400,
                        };
                        let mut resp = http::Response::new(Full::new(Bytes::from(
                            ExportTraceServiceResponse { partial_success: None }.encode_to_vec(),
                        )));
                        *resp.status_mut() = http::StatusCode::from_u16(status).unwrap();
                        resp.headers_mut()
                            .insert("content-type", "application/x-protobuf".parse().unwrap());
                        Ok::<_, Infallible>(resp)
                    }
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), service)
                    .await;
            });
        }
    });
    (format!("http://{addr}/v1/traces"), received)
}
