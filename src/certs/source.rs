//! Reads a mounted Secret (and an optional trust bundle) consistently, as the kubelet lays it out.
//!
//! The kubelet writes every key of a Secret into a new hidden directory, points `..data` at it by
//! an atomic rename, and the visible names (`tls.crt`) are symlinks through `..data`. Reading the
//! visible names one after another can pair a new certificate with an old key, so this module
//! resolves `..data` once, reads every file from that one directory, and checks afterwards that
//! `..data` still points there; otherwise it reads again. A plain directory (no `..data`) is read
//! as it is; the bundle check (key matches certificate) catches a half-written plain directory.
//! Depends on std only.

use std::io;
use std::path::{Path, PathBuf};

/// The certificate file name cert-manager writes.
pub const TLS_CRT: &str = "tls.crt";
/// The private key file name cert-manager writes.
pub const TLS_KEY: &str = "tls.key";
/// The issuing CA file name cert-manager writes.
pub const CA_CRT: &str = "ca.crt";
/// The symlink the kubelet swaps atomically.
pub const DATA_LINK: &str = "..data";

const MAX_ATTEMPTS: usize = 5;

/// Why the files could not be read.
#[derive(Debug, thiserror::Error)]
pub enum SourceError {
    /// The directory is not there (yet): the kubelet has not mounted the volume.
    #[error("{0} does not exist (waiting for the Secret volume to be mounted)")]
    DirMissing(PathBuf),
    /// A required file is absent: cert-manager has not issued the certificate yet.
    #[error("{file} is missing from {dir} (waiting for the certificate to be issued)")]
    FileMissing {
        /// The missing file name.
        file: &'static str,
        /// The directory searched.
        dir: PathBuf,
    },
    /// Reading failed for another reason (permissions, I/O).
    #[error("reading {path}: {source}")]
    Io {
        /// The file or directory.
        path: PathBuf,
        /// The OS error.
        source: io::Error,
    },
    /// The volume was swapped again and again while being read.
    #[error("{0} kept changing while it was read; will retry")]
    Unstable(PathBuf),
    /// The trust bundle holds no file.
    #[error("trust bundle {0} holds no file")]
    EmptyBundle(PathBuf),
}

/// The bytes of one certificate set, all read from the same generation of the volume.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RawSet {
    /// `tls.crt`: leaf first, then intermediates.
    pub cert: Vec<u8>,
    /// `tls.key`.
    pub key: Vec<u8>,
    /// `ca.crt`, if present.
    pub ca: Option<Vec<u8>>,
    /// The trust bundle's PEM (all its files concatenated), when one is configured.
    pub trust: Option<Vec<u8>>,
}

impl RawSet {
    /// A SHA-256 over all parts, to tell whether anything changed since the last load.
    pub fn fingerprint(&self) -> [u8; 32] {
        let mut ctx = aws_lc_rs::digest::Context::new(&aws_lc_rs::digest::SHA256);
        for part in [Some(&self.cert), Some(&self.key), self.ca.as_ref(), self.trust.as_ref()] {
            match part {
                Some(bytes) => {
                    ctx.update(&(bytes.len() as u64 + 1).to_be_bytes());
                    ctx.update(bytes);
                }
                None => ctx.update(&0u64.to_be_bytes()),
            }
        }
        let mut out = [0u8; 32];
        out.copy_from_slice(ctx.finish().as_ref());
        out
    }
}

/// Where the certificate set lives.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SecretSource {
    /// The Secret volume directory.
    pub cert_dir: PathBuf,
    /// A trust bundle file or ConfigMap directory that replaces `ca.crt`.
    pub trust_bundle: Option<PathBuf>,
}

fn io_err(path: &Path, source: io::Error) -> SourceError {
    SourceError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// The directory the files are read from: the target of `..data` when it exists.
fn data_dir(dir: &Path) -> Result<(PathBuf, Option<PathBuf>), SourceError> {
    match std::fs::read_link(dir.join(DATA_LINK)) {
        Ok(target) => Ok((dir.join(&target), Some(target))),
        Err(e) if e.kind() == io::ErrorKind::NotFound || e.kind() == io::ErrorKind::InvalidInput => {
            match std::fs::metadata(dir) {
                Ok(m) if m.is_dir() => Ok((dir.to_path_buf(), None)),
                Ok(_) => Err(io_err(dir, io::Error::other("not a directory"))),
                Err(e) if e.kind() == io::ErrorKind::NotFound => Err(SourceError::DirMissing(dir.to_path_buf())),
                Err(e) => Err(io_err(dir, e)),
            }
        }
        Err(e) => Err(io_err(dir, e)),
    }
}

fn current_link(dir: &Path) -> Option<PathBuf> {
    std::fs::read_link(dir.join(DATA_LINK)).ok()
}

/// Reads one generation of a volume directory with `read`, retrying when `..data` moved meanwhile.
fn read_consistently<T>(dir: &Path, mut read: impl FnMut(&Path) -> Result<T, SourceError>) -> Result<T, SourceError> {
    for _ in 0..MAX_ATTEMPTS {
        let (base, link) = data_dir(dir)?;
        let result = read(&base);
        if link.is_none() || current_link(dir) == link {
            return result;
        }
        // `..data` was swapped while we read: whatever we got may mix generations.
    }
    Err(SourceError::Unstable(dir.to_path_buf()))
}

fn read_optional(path: &Path) -> Result<Option<Vec<u8>>, SourceError> {
    match std::fs::read(path) {
        Ok(bytes) => Ok(Some(bytes)),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(io_err(path, e)),
    }
}

fn read_required(base: &Path, file: &'static str, dir: &Path) -> Result<Vec<u8>, SourceError> {
    read_optional(&base.join(file))?.ok_or_else(|| SourceError::FileMissing {
        file,
        dir: dir.to_path_buf(),
    })
}

/// Reads every visible file of a trust-bundle directory (one generation), or the file itself.
fn read_bundle(path: &Path) -> Result<Vec<u8>, SourceError> {
    let meta = match std::fs::metadata(path) {
        Ok(m) => m,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Err(SourceError::DirMissing(path.to_path_buf())),
        Err(e) => return Err(io_err(path, e)),
    };
    if !meta.is_dir() {
        return std::fs::read(path).map_err(|e| io_err(path, e));
    }
    read_consistently(path, |base| {
        let mut names: Vec<PathBuf> = std::fs::read_dir(base)
            .map_err(|e| io_err(base, e))?
            .filter_map(Result::ok)
            .filter(|e| !e.file_name().to_string_lossy().starts_with('.'))
            .map(|e| e.path())
            .filter(|p| p.is_file())
            .collect();
        names.sort();
        if names.is_empty() {
            return Err(SourceError::EmptyBundle(path.to_path_buf()));
        }
        let mut all = Vec::new();
        for name in names {
            let bytes = std::fs::read(&name).map_err(|e| io_err(&name, e))?;
            all.extend_from_slice(&bytes);
            all.push(b'\n');
        }
        Ok(all)
    })
}

impl SecretSource {
    /// Reads `tls.crt`, `tls.key`, `ca.crt` from one generation of the volume, and the trust bundle.
    ///
    /// `ca.crt` is required unless a trust bundle is configured.
    pub fn read(&self) -> Result<RawSet, SourceError> {
        let dir = &self.cert_dir;
        let (cert, key, ca) = read_consistently(dir, |base| {
            let cert = read_required(base, TLS_CRT, dir)?;
            let key = read_required(base, TLS_KEY, dir)?;
            let ca = read_optional(&base.join(CA_CRT))?;
            Ok((cert, key, ca))
        })?;
        let trust = match &self.trust_bundle {
            Some(path) => Some(read_bundle(path)?),
            None if ca.is_none() => {
                return Err(SourceError::FileMissing {
                    file: CA_CRT,
                    dir: dir.clone(),
                });
            }
            None => None,
        };
        Ok(RawSet { cert, key, ca, trust })
    }

    /// The directories to watch: the Secret volume, and the trust bundle's directory (or the
    /// directory holding the bundle file).
    pub fn watch_dirs(&self) -> Vec<PathBuf> {
        let mut dirs = vec![self.cert_dir.clone()];
        if let Some(tb) = &self.trust_bundle {
            if tb.is_dir() {
                dirs.push(tb.clone());
            } else if let Some(parent) = tb.parent() {
                let parent = if parent.as_os_str().is_empty() {
                    Path::new(".")
                } else {
                    parent
                };
                dirs.push(parent.to_path_buf());
            }
        }
        dirs
    }
}
