//! Certificates: read a mounted Secret consistently, validate the set, watch it for rotation.
//!
//! `source` (std) → `bundle` (pure validation) → `watch` (notify + tokio). `summary` reads an
//! X.509 certificate for both validation and peer identity.

pub mod bundle;
pub mod source;
pub mod summary;
pub mod watch;

pub use bundle::{BundleError, CertBundle, Usage};
pub use source::{RawSet, SecretSource, SourceError};
