//! Small shared helpers: a deterministic RNG, stable string hashing, atomic file writes,
//! sha256 of files and edit-distance suggestions.
//!
//! The RNG is our own (SplitMix64 seeding a xoshiro256** generator) so that draws never change
//! with a dependency upgrade: a pool drawn today is the pool drawn in five years.

use std::io::Write;
use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};

use crate::error::{Error, Result};

/// Tunes glibc's allocator for tensor work: large activation buffers (up to 32 MiB) come
/// from the heap instead of fresh `mmap`s and freed memory is kept for reuse, so the kernel does
/// not zero new pages for every op (profiling showed ~25% of a training step in page faults).
/// Call once at program start; a no-op on non-glibc targets.
pub fn tune_allocator() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only changes allocator parameters; it is called before other threads start.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 32 << 20);
        libc::mallopt(libc::M_TRIM_THRESHOLD, 1 << 30);
        libc::mallopt(libc::M_TOP_PAD, 64 << 20);
    }
}

/// Keeps candle's element-wise ops on the calling thread (`CANDLE_NUM_THREADS=1`, unless the
/// user set it). candle 0.11 runs them on a second pool of its own ("candle-bp" workers that
/// spin before they sleep) beside rayon's pool, which runs the GEMMs and mlbench's kernels; on a
/// few cores the two pools' idle spinning takes cores from each other's work. One MeTA-LoRA
/// meta-iteration on 2 cores (Gemma 3, 7 SIB-200 tasks): 64.2 s with both pools, 49.2 s with
/// element-wise ops inline (benchmarks/perf/README.md). The ops are per element, so the results
/// are the same bits. Call once at program start, before other threads exist.
pub fn tune_threads() {
    if std::env::var_os("CANDLE_NUM_THREADS").is_none() {
        std::env::set_var("CANDLE_NUM_THREADS", "1");
    }
}

/// SplitMix64 step: the standard 64-bit mixer, used to expand seeds.
pub fn splitmix64(state: &mut u64) -> u64 {
    *state = state.wrapping_add(0x9E37_79B9_7F4A_7C15);
    let mut z = *state;
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// FNV-1a 64-bit hash of bytes: stable across platforms and Rust versions (unlike `std::hash`).
pub fn fnv1a64(bytes: &[u8]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in bytes {
        h ^= u64::from(*b);
        h = h.wrapping_mul(0x0000_0100_0000_01B3);
    }
    h
}

/// Derives a seed from a base seed and a list of string parts. Parts are length-prefixed so
/// `("ab","c")` and `("a","bc")` differ.
pub fn derive_seed(base: u64, parts: &[&str]) -> u64 {
    let mut buf = Vec::with_capacity(64);
    buf.extend_from_slice(&base.to_le_bytes());
    for p in parts {
        buf.extend_from_slice(&(p.len() as u64).to_le_bytes());
        buf.extend_from_slice(p.as_bytes());
    }
    let mut s = fnv1a64(&buf);
    splitmix64(&mut s)
}

/// xoshiro256** generator (Blackman & Vigna), seeded through SplitMix64.
#[derive(Debug, Clone)]
pub struct Rng {
    s: [u64; 4],
}

impl Rng {
    /// A generator whose whole stream is fixed by `seed`.
    pub fn new(seed: u64) -> Self {
        let mut sm = seed;
        let s = [
            splitmix64(&mut sm),
            splitmix64(&mut sm),
            splitmix64(&mut sm),
            splitmix64(&mut sm),
        ];
        Rng { s }
    }

    /// Next 64 random bits.
    pub fn next_u64(&mut self) -> u64 {
        let result = self.s[1].wrapping_mul(5).rotate_left(7).wrapping_mul(9);
        let t = self.s[1] << 17;
        self.s[2] ^= self.s[0];
        self.s[3] ^= self.s[1];
        self.s[1] ^= self.s[2];
        self.s[0] ^= self.s[3];
        self.s[2] ^= t;
        self.s[3] = self.s[3].rotate_left(45);
        result
    }

    /// Uniform integer in `0..n` without modulo bias (Lemire's method with rejection).
    pub fn below(&mut self, n: u64) -> u64 {
        assert!(n > 0, "Rng::below(0)");
        loop {
            let x = self.next_u64();
            let m = u128::from(x) * u128::from(n);
            let low = m as u64;
            if low >= n.wrapping_neg() % n {
                return (m >> 64) as u64;
            }
        }
    }

    /// Uniform float in `[0, 1)` with 53 random bits.
    pub fn next_f64(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 * (1.0 / (1u64 << 53) as f64)
    }

    /// Fisher-Yates shuffle in place.
    pub fn shuffle<T>(&mut self, v: &mut [T]) {
        for i in (1..v.len()).rev() {
            let j = self.below(i as u64 + 1) as usize;
            v.swap(i, j);
        }
    }
}

/// Writes a file atomically: the bytes go to a temporary file in the same directory, which is
/// synced and renamed over `path`. A reader never sees a half-written file, and a failed write
/// leaves no file behind.
pub fn write_atomic(
    path: &Path,
    write: impl FnOnce(&mut std::fs::File) -> Result<()>,
) -> Result<()> {
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
        _ => PathBuf::from("."),
    };
    std::fs::create_dir_all(&dir).map_err(|e| Error::io("create directory", &dir, e))?;
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "out".into());
    let tmp = dir.join(format!(".{name}.{}.tmp", std::process::id()));
    let result = (|| {
        let mut f = std::fs::File::create(&tmp).map_err(|e| Error::io("create", &tmp, e))?;
        write(&mut f)?;
        f.flush().map_err(|e| Error::io("write", &tmp, e))?;
        f.sync_all().map_err(|e| Error::io("sync", &tmp, e))?;
        Ok(())
    })();
    fault_point("write_atomic: written, not renamed");
    match result {
        Ok(()) => std::fs::rename(&tmp, path).map_err(|e| {
            let _ = std::fs::remove_file(&tmp);
            Error::io("rename into", path, e)
        }),
        Err(e) => {
            let _ = std::fs::remove_file(&tmp);
            Err(e)
        }
    }
}

/// A fault-injection point for crash tests. With `MLBENCH_FAULT_AT=N` in the environment, the
/// process kills itself (SIGKILL: no destructor, flush or lock release runs, as with `kill -9`)
/// at the N-th point it passes (1-based, counted over every point of the process). With
/// `MLBENCH_FAULT_LOG=1` each point passed is printed to stderr as `fault point N: what`, so a
/// test can enumerate them. Without either variable a point costs one relaxed atomic load.
pub fn fault_point(what: &str) {
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::OnceLock;
    static TARGET: OnceLock<(usize, bool)> = OnceLock::new();
    static COUNT: AtomicUsize = AtomicUsize::new(0);
    let &(target, log) = TARGET.get_or_init(|| {
        let at = std::env::var("MLBENCH_FAULT_AT")
            .ok()
            .and_then(|v| v.trim().parse::<usize>().ok())
            .unwrap_or(0);
        (at, std::env::var_os("MLBENCH_FAULT_LOG").is_some())
    });
    if target == 0 && !log {
        return;
    }
    let n = COUNT.fetch_add(1, Ordering::Relaxed) + 1;
    if log {
        eprintln!("fault point {n}: {what}");
    }
    if n == target {
        // SAFETY: kill(2) on our own pid with a valid signal number has no memory effects.
        unsafe {
            libc::kill(libc::getpid(), libc::SIGKILL);
        }
    }
}

/// Atomic write of a byte buffer.
pub fn write_bytes_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    write_atomic(path, |f| {
        f.write_all(bytes).map_err(|e| Error::io("write", path, e))
    })
}

/// `s` with the HTML special characters escaped (text and attribute values).
pub fn html_escape(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

/// Lower-case hex sha256 of a byte slice.
pub fn sha256_hex(bytes: &[u8]) -> String {
    let d = Sha256::digest(bytes);
    d.iter().map(|b| format!("{b:02x}")).collect()
}

/// Lower-case hex sha256 of a file's content, read in 1 MiB pieces.
pub fn sha256_file(path: &Path) -> Result<String> {
    use std::io::Read;
    let mut f = std::fs::File::open(path).map_err(|e| Error::io("read", path, e))?;
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = f.read(&mut buf).map_err(|e| Error::io("read", path, e))?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
    }
    Ok(h.finalize().iter().map(|b| format!("{b:02x}")).collect())
}

/// Levenshtein distance on characters.
pub fn edit_distance(a: &str, b: &str) -> usize {
    let a: Vec<char> = a.chars().collect();
    let b: Vec<char> = b.chars().collect();
    let mut prev: Vec<usize> = (0..=b.len()).collect();
    let mut cur = vec![0; b.len() + 1];
    for (i, ca) in a.iter().enumerate() {
        cur[0] = i + 1;
        for (j, cb) in b.iter().enumerate() {
            let sub = prev[j] + usize::from(ca != cb);
            cur[j + 1] = sub.min(prev[j + 1] + 1).min(cur[j] + 1);
        }
        std::mem::swap(&mut prev, &mut cur);
    }
    prev[b.len()]
}

/// Up to three known codes closest to `code` (case-insensitive), for "did you mean" messages.
pub fn suggestions<'a>(code: &str, known: impl IntoIterator<Item = &'a str>) -> Vec<String> {
    let lc = code.to_lowercase();
    let mut scored: Vec<(usize, String)> = known
        .into_iter()
        .map(|k| {
            let kl = k.to_lowercase();
            let d = if kl.starts_with(&lc) || lc.starts_with(&kl) {
                0
            } else {
                edit_distance(&lc, &kl)
            };
            (d, k.to_string())
        })
        .filter(|(d, k)| {
            let n = k.chars().count().min(lc.chars().count());
            *d <= if n <= 3 { 1 } else { (n / 3).max(2) }
        })
        .collect();
    scored.sort();
    scored.dedup_by(|a, b| a.1 == b.1);
    scored.into_iter().take(3).map(|(_, k)| k).collect()
}

/// `mlbench <version>` plus the git commit it was built from, when known (`<commit>-dirty-<hash
/// of the difference>` when its code differed from that commit; see `build.rs`), and
/// ` matmul=bf16` when frozen-weight products run in bf16
/// ([`crate::precision::matmul_precision`]).
pub fn code_version() -> String {
    // The line `mlbench --version` prints (package version and commit, from `build.rs`).
    let mut v = format!("mlbench {}", env!("MLBENCH_VERSION_LINE"));
    // Numerics other than the default change every score, so they are part of the identity.
    use crate::precision::{matmul_precision, MatmulPrecision};
    if matmul_precision() != MatmulPrecision::F32 {
        v.push_str(&format!(" matmul={}", matmul_precision().name()));
    }
    v
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rng_stream_is_pinned() {
        // Golden values: if these change, every recorded pool changes. They come from an
        // independent Python transcription of SplitMix64 seeding + xoshiro256** (Blackman &
        // Vigna's reference algorithm), run once by hand:
        //   state = [splitmix64 x4 from seed 0]; out = rotl(s1 * 5, 7) * 9; ...
        let mut r = Rng::new(0);
        let first: Vec<u64> = (0..3).map(|_| r.next_u64()).collect();
        assert_eq!(
            first,
            vec![
                11091344671253066420,
                13793997310169335082,
                1900383378846508768
            ]
        );
    }

    #[test]
    fn below_is_in_range_and_covers() {
        let mut r = Rng::new(7);
        let mut seen = [0usize; 5];
        for _ in 0..5000 {
            seen[r.below(5) as usize] += 1;
        }
        for c in seen {
            assert!((900..1100).contains(&c), "{seen:?}");
        }
    }

    #[test]
    fn derive_seed_separates_parts() {
        assert_ne!(derive_seed(0, &["ab", "c"]), derive_seed(0, &["a", "bc"]));
        assert_ne!(derive_seed(0, &["x"]), derive_seed(1, &["x"]));
        assert_eq!(
            derive_seed(3, &["sib200", "eng_Latn"]),
            derive_seed(3, &["sib200", "eng_Latn"])
        );
    }

    #[test]
    fn suggestions_find_close_codes() {
        let s = suggestions("eng_Latm", ["eng_Latn", "fra_Latn", "deu_Latn"]);
        assert_eq!(s[0], "eng_Latn");
        assert!(suggestions("zzzzzzzz", ["eng_Latn"]).is_empty());
    }

    #[test]
    fn atomic_write_leaves_nothing_on_failure() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("out.bin");
        let r = write_atomic(&p, |_| Err(Error::Invalid("boom".into())));
        assert!(r.is_err());
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0);
        write_bytes_atomic(&p, b"ok").unwrap();
        assert_eq!(std::fs::read(&p).unwrap(), b"ok");
    }
}
