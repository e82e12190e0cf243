//! wsgate's integration tests: one binary (every extra file under `tests/` would be linked
//! separately against the whole dependency tree), a module per area.

mod admin;
mod bench_smoke;
mod certs;
mod chart;
mod cli;
mod conformance;
mod data_path;
mod design;
mod docs;
mod drain;
mod e2e;
mod hostile;
mod inject;
mod inject_limits;
mod key_exchange;
mod limits;
mod outbound;
mod rotation;
mod support;
mod telemetry;
mod tls_refusals;
mod trust;
