//! Claims on a results store: who is working on a cell, and who is compacting the store.
//!
//! In: a store folder and a cell key (or the store itself). Out: a [`Claim`] held until dropped,
//! or the description of the process that holds it.
//!
//! Layout: `locks/<key>.lock` for a cell, `locks/store.lock` for a merge. A claim is an
//! exclusive advisory lock (`flock(2)`, `LOCK_EX`) on that file; the
//! file's text names the holder (`pid <N> on <host>, since <unix time>`) for messages only.
//!
//! Contract:
//! - the kernel releases the lock when the holder's last descriptor closes, which a crash or
//!   `kill -9` does too: a lock file left by a dead process is stale by construction, and the
//!   next claimant simply takes it (no timeout, no pid guessing, no clean-up race);
//! - lock files are never removed (removing one would let two processes hold "the same" lock
//!   on two inodes); they are empty of meaning when nobody holds them;
//! - on a shared file system the lock is only as good as its `flock` (NFSv4 and Lustre with
//!   `-o flock` give it cluster-wide; a local-only `flock` mount does not).
//!
//! Who claims: `mlbench run` claims each cell before it looks at its work folder and keeps the
//! claim until the cell is committed; a cell that trains in a sibling's work folder claims the
//! sibling too (own first, then the sibling: one order, no deadlock). `mlbench merge` and the
//! compaction at the end of a run claim the store.

use std::fs::{File, OpenOptions};
use std::io::{Read, Seek, SeekFrom, Write};
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};

use crate::error::{Error, Result};

/// A held claim; dropping it releases the lock.
#[derive(Debug)]
pub struct Claim {
    _file: File,
    pub path: PathBuf,
}

/// The outcome of [`try_claim`].
#[derive(Debug)]
pub enum TryClaim {
    Claimed(Claim),
    /// Another live process holds it: its own description (`pid N on host, since T`).
    Busy(String),
}

/// The lock file of a cell of the store at `store`.
pub fn cell_lock_path(store: &Path, key: &str) -> PathBuf {
    store.join("locks").join(format!("{key}.lock"))
}

/// The store-wide lock file (merges).
pub fn store_lock_path(store: &Path) -> PathBuf {
    store.join("locks").join("store.lock")
}

fn open(path: &Path) -> Result<File> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(|e| Error::io("create directory", dir, e))?;
    }
    OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(path)
        .map_err(|e| Error::io("open lock file", path, e))
}

/// What `flock(2)` said.
enum Flock {
    Taken,
    Busy,
}

/// `flock(fd, LOCK_EX)`, without blocking when `wait` is false.
fn flock(file: &File, wait: bool, path: &Path) -> Result<Flock> {
    let op = libc::LOCK_EX | if wait { 0 } else { libc::LOCK_NB };
    loop {
        // SAFETY: flock(2) on a descriptor this `File` owns and keeps open; no memory is shared.
        let rc = unsafe { libc::flock(file.as_raw_fd(), op) };
        if rc == 0 {
            return Ok(Flock::Taken);
        }
        let e = std::io::Error::last_os_error();
        match e.kind() {
            std::io::ErrorKind::WouldBlock => return Ok(Flock::Busy),
            std::io::ErrorKind::Interrupted => continue,
            _ => return Err(Error::io("lock", path, e)),
        }
    }
}

fn holder_of(file: &mut File) -> String {
    let mut s = String::new();
    let _ = file.seek(SeekFrom::Start(0));
    let _ = file.read_to_string(&mut s);
    let s = s.trim();
    if s.is_empty() {
        "another process".into()
    } else {
        s.to_string()
    }
}

fn stamp(file: &mut File, path: &Path) -> Result<()> {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_string())
        .unwrap_or_else(|_| "this host".into());
    let since = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    let text = format!("pid {} on {host}, since {since}\n", std::process::id());
    (|| {
        file.set_len(0)?;
        file.seek(SeekFrom::Start(0))?;
        file.write_all(text.as_bytes())
    })()
    .map_err(|e| Error::io("write lock file", path, e))
}

/// Takes the lock at `path` if nobody holds it.
pub fn try_claim(path: &Path) -> Result<TryClaim> {
    let mut file = open(path)?;
    match flock(&file, false, path)? {
        Flock::Taken => {
            stamp(&mut file, path)?;
            Ok(TryClaim::Claimed(Claim {
                _file: file,
                path: path.to_path_buf(),
            }))
        }
        Flock::Busy => Ok(TryClaim::Busy(holder_of(&mut file))),
    }
}

/// Who holds the lock at `path`, if anyone, without taking it or creating the file.
pub fn holder(path: &Path) -> Result<Option<String>> {
    let mut file = match OpenOptions::new().read(true).write(true).open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(Error::io("open lock file", path, e)),
    };
    match flock(&file, false, path)? {
        // Free: the lock is released when `file` closes.
        Flock::Taken => Ok(None),
        Flock::Busy => Ok(Some(holder_of(&mut file))),
    }
}

/// Takes the lock at `path`, waiting for its holder to finish.
pub fn claim(path: &Path) -> Result<Claim> {
    let mut file = open(path)?;
    flock(&file, true, path)?;
    stamp(&mut file, path)?;
    Ok(Claim {
        _file: file,
        path: path.to_path_buf(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_second_claim_is_busy_until_the_first_is_dropped() {
        let d = tempfile::tempdir().unwrap();
        let p = cell_lock_path(d.path(), "abc");
        let first = match try_claim(&p).unwrap() {
            TryClaim::Claimed(c) => c,
            TryClaim::Busy(h) => panic!("busy: {h}"),
        };
        match try_claim(&p).unwrap() {
            TryClaim::Busy(h) => assert!(h.contains(&format!("pid {}", std::process::id())), "{h}"),
            TryClaim::Claimed(_) => panic!("claimed twice"),
        }
        drop(first);
        assert!(matches!(try_claim(&p).unwrap(), TryClaim::Claimed(_)));
        // The file stays: a stale file without a holder is free.
        assert!(p.exists());
    }
}
