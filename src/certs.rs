//! Certificates: read a mounted Secret consistently, validate the set, watch it for rotation.
//!
//! `source` (std) → `bundle` (pure validation) → `watch` (notify + tokio). Depends on `x509`
//! (what a certificate says) and nothing else of the crate: the watcher hands validated sets to
//! a `ReloadSink`, which `tls::reloader` implements.

pub mod bundle;
pub mod source;
pub mod watch;

pub use bundle::{BundleError, CertBundle, Usage};
pub use source::{RawSet, SecretSource, SourceError};
pub use watch::{ReloadError, ReloadTiming};
