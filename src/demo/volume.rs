//! Writes a directory exactly as the kubelet writes a Secret volume (its "atomic writer").
//!
//! Each update: write every file into a new hidden `..YYYY_MM_DD_hh_mm_ss.NNNNNNNNN` directory,
//! point a `..data_tmp` symlink at it, rename that over `..data`, create the visible symlinks
//! (`tls.crt` → `..data/tls.crt`) that are missing, remove visible names no longer in the
//! payload, then remove the previous timestamped directory. Used by the demo and the tests.

use std::io;
use std::os::unix::fs::symlink;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

/// A Secret volume directory maintained the way the kubelet maintains it.
#[derive(Debug)]
pub struct SecretVolume {
    dir: PathBuf,
}

static SEQUENCE: AtomicU64 = AtomicU64::new(0);

fn timestamp_name() -> String {
    let now = time::OffsetDateTime::now_utc();
    // The kubelet adds a random suffix (os.MkdirTemp); a process-wide counter is unique enough.
    let seq = SEQUENCE.fetch_add(1, Ordering::Relaxed);
    format!(
        "..{:04}_{:02}_{:02}_{:02}_{:02}_{:02}.{:09}{}",
        now.year(),
        u8::from(now.month()),
        now.day(),
        now.hour(),
        now.minute(),
        now.second(),
        now.nanosecond(),
        seq
    )
}

impl SecretVolume {
    /// Uses (and creates if needed) `dir` as the volume's mount point.
    pub fn new(dir: impl Into<PathBuf>) -> io::Result<Self> {
        let dir = dir.into();
        std::fs::create_dir_all(&dir)?;
        Ok(Self { dir })
    }

    /// The mount point.
    pub fn path(&self) -> &Path {
        &self.dir
    }

    /// Replaces the whole payload atomically, as one kubelet sync does.
    pub fn write(&self, files: &[(&str, &[u8])]) -> io::Result<()> {
        let data = self.dir.join("..data");
        let old = std::fs::read_link(&data).ok();
        // (5) a new timestamped directory, (6) the payload into it.
        let ts = timestamp_name();
        let ts_path = self.dir.join(&ts);
        std::fs::create_dir(&ts_path)?;
        for (name, bytes) in files {
            std::fs::write(ts_path.join(name), bytes)?;
        }
        // (7) ..data_tmp -> the new directory, (8) renamed over ..data in one step.
        let tmp = self.dir.join("..data_tmp");
        let _ = std::fs::remove_file(&tmp);
        symlink(&ts, &tmp)?;
        std::fs::rename(&tmp, &data)?;
        // (9) visible names that are missing.
        for (name, _) in files {
            let visible = self.dir.join(name);
            if std::fs::symlink_metadata(&visible).is_err() {
                symlink(Path::new("..data").join(name), &visible)?;
            }
        }
        // (10) visible names no longer in the payload.
        for entry in std::fs::read_dir(&self.dir)? {
            let entry = entry?;
            let name = entry.file_name().to_string_lossy().into_owned();
            if !name.starts_with('.') && !files.iter().any(|(f, _)| *f == name) {
                std::fs::remove_file(entry.path())?;
            }
        }
        // (11) the previous generation.
        if let Some(old) = old {
            std::fs::remove_dir_all(self.dir.join(old))?;
        }
        Ok(())
    }
}
