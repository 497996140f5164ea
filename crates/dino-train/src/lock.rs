//! The output-directory lock: one training run per `output_dir`.
//!
//! `dino.lock` in the directory holds an exclusive `flock` for the life of the run and names its holder
//! (pid, host, start time) as one JSON line. A second run on the directory finds the lock held and refuses,
//! naming the holder. The kernel drops a `flock` when its process ends in any way (exit, panic, kill -9,
//! reboot), so a lock file whose lock nobody holds is stale: the next run takes it over with a warning. Readers
//! of the directory (`dino info`, `eval-knn --checkpoint`) take no lock and keep working during a run.
//!
//! On NFS, Linux maps `flock` onto POSIX byte-range locks, which the server arbitrates across hosts; on a
//! filesystem without any locking the file still names the holder but cannot stop a run on another host.

use std::fs::{File, OpenOptions};
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

/// File name of the lock inside the output directory.
pub const LOCK_FILE: &str = "dino.lock";

/// Who holds (or held) a lock.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LockHolder {
    /// Process id.
    pub pid: u32,
    /// Host name.
    pub host: String,
    /// Start of the run, seconds since the Unix epoch.
    pub started_unix: u64,
}

impl LockHolder {
    fn this_process() -> Self {
        Self {
            pid: std::process::id(),
            host: host_name(),
            started_unix: std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_secs())
                .unwrap_or(0),
        }
    }

    fn describe(&self) -> String {
        format!("pid {} on host {}", self.pid, self.host)
    }
}

/// A held output-directory lock; released (and its file removed) on drop.
#[derive(Debug)]
pub struct RunLock {
    file: File,
    path: PathBuf,
    /// The previous holder when a stale lock was taken over.
    pub took_over: Option<LockHolder>,
}

/// The host name of this machine (`gethostname`), or "unknown".
pub fn host_name() -> String {
    let mut buf = [0u8; 256];
    // SAFETY: the buffer is valid for its length; gethostname NUL-terminates within it on success.
    let rc = unsafe { libc::gethostname(buf.as_mut_ptr().cast(), buf.len()) };
    if rc != 0 {
        return "unknown".into();
    }
    let end = buf.iter().position(|&b| b == 0).unwrap_or(buf.len());
    String::from_utf8_lossy(&buf[..end]).into_owned()
}

fn read_holder(file: &mut File) -> Option<LockHolder> {
    let mut s = String::new();
    file.seek(SeekFrom::Start(0)).ok()?;
    file.take(4096).read_to_string(&mut s).ok()?;
    serde_json::from_str(s.trim()).ok()
}

#[cfg(unix)]
fn try_flock(file: &File) -> std::io::Result<bool> {
    use std::os::unix::io::AsRawFd;
    // SAFETY: flock on an open descriptor we own.
    let rc = unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
    if rc == 0 {
        return Ok(true);
    }
    let e = std::io::Error::last_os_error();
    if e.raw_os_error() == Some(libc::EWOULDBLOCK) {
        Ok(false)
    } else {
        Err(e)
    }
}

/// Same file: the descriptor still names the inode at `path` (it was not unlinked and replaced).
#[cfg(unix)]
fn still_at(file: &File, path: &Path) -> bool {
    use std::os::unix::fs::MetadataExt;
    match (file.metadata(), std::fs::metadata(path)) {
        (Ok(a), Ok(b)) => a.ino() == b.ino() && a.dev() == b.dev(),
        _ => false,
    }
}

impl RunLock {
    /// Take the lock of `dir` (which must exist). A lock held by a live run is an [`Error::Locked`] naming it;
    /// a stale one is taken over and reported in [`RunLock::took_over`].
    #[cfg(unix)]
    pub fn acquire(dir: &Path) -> Result<Self> {
        let path = dir.join(LOCK_FILE);
        // Another run may unlink the file between our open and our flock (at its end): then the inode we
        // locked is no longer the directory's lock, and we try again on the new one.
        for _ in 0..100 {
            let mut file = OpenOptions::new()
                .read(true)
                .write(true)
                .create(true)
                .truncate(false)
                .open(&path)
                .map_err(|e| Error::io(&path, e))?;
            if !try_flock(&file).map_err(|e| Error::io(&path, e))? {
                // The holder writes its name right after locking: give it a moment.
                let mut holder = read_holder(&mut file);
                for _ in 0..20 {
                    if holder.is_some() {
                        break;
                    }
                    std::thread::sleep(std::time::Duration::from_millis(25));
                    holder = read_holder(&mut file);
                }
                return Err(Error::Locked {
                    dir: dir.to_path_buf(),
                    holder: holder
                        .map(|h| h.describe())
                        .unwrap_or_else(|| "a process that has not written its name".into()),
                });
            }
            if !still_at(&file, &path) {
                continue;
            }
            let took_over = read_holder(&mut file);
            let me = LockHolder::this_process();
            let line = serde_json::to_string(&me).unwrap_or_default() + "\n";
            file.set_len(0)
                .and_then(|_| file.seek(SeekFrom::Start(0)))
                .and_then(|_| file.write_all(line.as_bytes()))
                .and_then(|_| file.sync_all())
                .map_err(|e| Error::io(&path, e))?;
            return Ok(Self {
                file,
                path,
                took_over,
            });
        }
        Err(Error::Msg(format!(
            "{}: the lock file keeps being replaced by other processes",
            path.display()
        )))
    }

    /// Without `flock` (non-Unix): the file is created exclusively; a leftover one must be removed by hand.
    #[cfg(not(unix))]
    pub fn acquire(dir: &Path) -> Result<Self> {
        let path = dir.join(LOCK_FILE);
        match OpenOptions::new().write(true).create_new(true).open(&path) {
            Ok(mut file) => {
                let me = LockHolder::this_process();
                let line = serde_json::to_string(&me).unwrap_or_default() + "\n";
                file.write_all(line.as_bytes())
                    .map_err(|e| Error::io(&path, e))?;
                Ok(Self {
                    file,
                    path,
                    took_over: None,
                })
            }
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
                let holder = File::open(&path)
                    .ok()
                    .and_then(|mut f| read_holder(&mut f))
                    .map(|h| h.describe())
                    .unwrap_or_else(|| "an unknown process".into());
                Err(Error::Locked {
                    dir: dir.to_path_buf(),
                    holder: format!("{holder} (remove {LOCK_FILE} if that run is gone)"),
                })
            }
            Err(e) => Err(Error::io(&path, e)),
        }
    }

    /// The lock file.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for RunLock {
    fn drop(&mut self) {
        // Remove the file while still holding the lock (a waiting opener then sees a replaced inode and
        // retries); closing the descriptor releases the lock.
        #[cfg(unix)]
        let ours = still_at(&self.file, &self.path);
        #[cfg(not(unix))]
        let ours = true;
        if ours {
            let _ = std::fs::remove_file(&self.path);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn second_lock_refused_then_released_on_drop() {
        let dir = tempfile::tempdir().unwrap();
        let a = RunLock::acquire(dir.path()).unwrap();
        assert!(a.took_over.is_none());
        let msg = RunLock::acquire(dir.path()).unwrap_err().to_string();
        let me = format!("pid {} on host {}", std::process::id(), host_name());
        assert!(msg.contains(&me), "{msg}");
        assert!(!msg.contains('\n'), "{msg}");
        drop(a);
        assert!(!dir.path().join(LOCK_FILE).exists());
        let b = RunLock::acquire(dir.path()).unwrap();
        assert!(b.took_over.is_none());
    }

    #[test]
    fn stale_lock_file_is_taken_over_naming_its_holder() {
        let dir = tempfile::tempdir().unwrap();
        let old = LockHolder {
            pid: 999_999,
            host: "gone-host".into(),
            started_unix: 1,
        };
        std::fs::write(
            dir.path().join(LOCK_FILE),
            serde_json::to_string(&old).unwrap(),
        )
        .unwrap();
        let l = RunLock::acquire(dir.path()).unwrap();
        assert_eq!(l.took_over, Some(old));
        let now: LockHolder =
            serde_json::from_str(std::fs::read_to_string(l.path()).unwrap().trim()).unwrap();
        assert_eq!(now.pid, std::process::id());
    }
}
