//! wsgate: the mTLS WebSocket sidecar for Kubernetes.
//!
//! The binary (`src/main.rs`) only parses the command line and maps errors to exit codes;
//! everything else lives here so that the demo and the tests run the real thing.
#![forbid(unsafe_code)]
#![warn(missing_docs)]

pub mod admin;
pub mod authz;
pub mod certs;
pub mod cli;
pub mod demo;
pub mod inject;
pub mod lifecycle;
pub mod net;
pub mod proxy;
pub mod telemetry;
pub mod tls;
pub mod x509;
