//! One publisher per session file: the lock a publisher holds on its session file for
//! as long as it runs.
//!
//! Two publishers sharing a session file register as the same session, and each one's
//! channel replaces the other's, for ever: their rows flap between active and inactive
//! and neither says why. A publisher that takes a [`SessionFileLock`] before it reads
//! the file, and keeps it while it runs, makes the second one fail at once with
//! [`SessionFileError::Held`], which says which file and which process.
//!
//! The lock is the operating system's advisory file lock (`flock` on Unix,
//! `LockFileEx` on Windows, through [`std::fs::File::try_lock`]), so it is released
//! when its holder exits however it exits: a crashed publisher leaves no stale lock.
//! It is taken on a file beside the session file, `<session file>.lock`, because the
//! session file itself is replaced (written aside and renamed over) each time the
//! session id changes, and a lock on the replaced file would protect nothing. The lock
//! file holds the holder's process id, for the message only; it stays when its holder
//! exits (removing it would race with the next publisher opening it).
//!
//! ```
//! use virtual_llm_core::session_file::{SessionFileError, SessionFileLock};
//!
//! let dir = std::env::temp_dir().join(format!("session-lock-doc-{}", std::process::id()));
//! let file = dir.join("publisher-session");
//! let held = SessionFileLock::acquire(&file).unwrap();
//! // A second publisher (here: a second lock in the same process) is refused.
//! assert!(matches!(
//!     SessionFileLock::acquire(&file),
//!     Err(SessionFileError::Held { .. })
//! ));
//! drop(held);
//! SessionFileLock::acquire(&file).unwrap();
//! # std::fs::remove_dir_all(&dir).unwrap();
//! ```

use std::fs::{File, OpenOptions, TryLockError};
use std::io::{ErrorKind, Write as _};
use std::path::{Path, PathBuf};

/// Why a session file could not be locked.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum SessionFileError {
    /// Another publisher holds the lock: it runs with the same session file.
    #[error("another publisher is running with session file {}{}", path.display(), describe_pid(*pid))]
    Held {
        /// The session file.
        path: PathBuf,
        /// The holder's process id, when it could be read.
        pid: Option<u32>,
    },
    /// The lock file could not be created, opened or locked.
    #[error("cannot lock session file {} (through {}): {source}", path.display(), lock_path_of(path).display())]
    Io {
        /// The session file.
        path: PathBuf,
        /// What the operating system said.
        #[source]
        source: std::io::Error,
    },
}

fn describe_pid(pid: Option<u32>) -> String {
    pid.map(|pid| format!(" (pid {pid})")).unwrap_or_default()
}

/// An exclusive lock on a session file, held until dropped. See the [module
/// docs](self).
#[derive(Debug)]
pub struct SessionFileLock {
    /// The session file this lock guards.
    path: PathBuf,
    /// The locked file; closing it releases the lock.
    _file: File,
}

impl SessionFileLock {
    /// Locks `session_file` for this process, creating its directory and lock file
    /// as needed. Fails at once with [`SessionFileError::Held`] when another process
    /// (or another lock in this one) holds it; never waits.
    ///
    /// On a file system that cannot lock files at all, this logs a warning and
    /// returns a lock that guards nothing, rather than refusing to publish.
    pub fn acquire(session_file: &Path) -> Result<Self, SessionFileError> {
        let io = |source| SessionFileError::Io {
            path: session_file.to_owned(),
            source,
        };
        if let Some(dir) = session_file.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir).map_err(io)?;
        }
        let lock_path = lock_path_of(session_file);
        let mut file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&lock_path)
            .map_err(io)?;
        match file.try_lock() {
            Ok(()) => {}
            Err(TryLockError::WouldBlock) => {
                let pid = std::fs::read_to_string(&lock_path)
                    .ok()
                    .and_then(|text| text.trim().parse().ok());
                return Err(SessionFileError::Held {
                    path: session_file.to_owned(),
                    pid,
                });
            }
            Err(TryLockError::Error(e)) if e.kind() == ErrorKind::Unsupported => {
                tracing::warn!(
                    file = %session_file.display(),
                    error = %e,
                    "this file system cannot lock files: nothing stops a second publisher from using the same session file"
                );
                return Ok(SessionFileLock {
                    path: session_file.to_owned(),
                    _file: file,
                });
            }
            Err(TryLockError::Error(e)) => return Err(io(e)),
        }
        // Ours now: say who holds it. Failing to write the pid costs only the message.
        let written = file
            .set_len(0)
            .and_then(|()| writeln!(file, "{}", std::process::id()));
        if let Err(e) = written {
            tracing::debug!(file = %lock_path.display(), error = %e, "could not record the pid in the lock file");
        }
        Ok(SessionFileLock {
            path: session_file.to_owned(),
            _file: file,
        })
    }

    /// The session file this lock guards.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

/// `<session file>.lock`, beside it.
fn lock_path_of(session_file: &Path) -> PathBuf {
    let mut name = session_file.as_os_str().to_owned();
    name.push(".lock");
    PathBuf::from(name)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn temp_file() -> (PathBuf, PathBuf) {
        let dir = std::env::temp_dir().join(format!(
            "vllm-session-lock-{}",
            crate::SessionId::generate()
        ));
        let file = dir.join("nested").join("publisher-session");
        (dir, file)
    }

    #[test]
    fn a_second_lock_is_refused_naming_the_file_and_the_holder() {
        let (dir, file) = temp_file();
        let held = SessionFileLock::acquire(&file).unwrap();
        assert_eq!(held.path(), file);
        let err = SessionFileLock::acquire(&file).unwrap_err();
        match &err {
            SessionFileError::Held { path, pid } => {
                assert_eq!(path, &file);
                assert_eq!(*pid, Some(std::process::id()));
            }
            other => panic!("expected Held, got {other:?}"),
        }
        let message = err.to_string();
        assert!(
            message.contains(&file.display().to_string())
                && message.contains(&format!("(pid {})", std::process::id())),
            "{message}"
        );
        drop(held);
        let again = SessionFileLock::acquire(&file).unwrap();
        drop(again);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn the_lock_survives_the_session_file_being_replaced() {
        let (dir, file) = temp_file();
        let _held = SessionFileLock::acquire(&file).unwrap();
        // What the publisher does when it persists a new session id.
        let tmp = file.with_extension("tmp");
        std::fs::write(&tmp, "ses_x\n").unwrap();
        std::fs::rename(&tmp, &file).unwrap();
        assert!(matches!(
            SessionFileLock::acquire(&file),
            Err(SessionFileError::Held { .. })
        ));
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn the_lock_file_sits_beside_the_session_file() {
        assert_eq!(
            lock_path_of(Path::new("./publisher-session")),
            Path::new("./publisher-session.lock")
        );
        assert_eq!(
            lock_path_of(Path::new("/var/lib/pub/session.json")),
            Path::new("/var/lib/pub/session.json.lock")
        );
    }
}
