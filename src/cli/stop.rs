//! Stop signals: SIGINT (Ctrl-C) and SIGTERM (Slurm, Kubernetes) in; the [`STOP`] flag that
//! `train`, `run` and `eval` poll out (they keep their finished work and end with exit status
//! 130). The first signal
//! sets the flag and says so on stderr (unless `--quiet`); a repeat within a second is the same
//! request (one request can arrive twice); a later one ends the process at once. The handler
//! only touches atomics and calls async-signal-safe functions.

/// Set by Ctrl-C (SIGINT) or a scheduler's SIGTERM once [`catch_stop_signals`] is in place:
/// long commands (`train`, `run`, `eval`) keep their finished work and stop when they see it.
pub static STOP: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// When the first stop signal came (CLOCK_MONOTONIC nanoseconds; 0 = none yet).
static FIRST_STOP_NS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

/// Signals this soon after the first are the same request delivered twice, not a second
/// request: GNU `timeout -s INT` signals the child and then its whole process group, and a
/// terminal's Ctrl-C reaches every process of the foreground group, so one request can arrive
/// as two signals a few microseconds apart.
const REPEAT_WINDOW_NS: u64 = 1_000_000_000;

/// CLOCK_MONOTONIC in nanoseconds, never 0.
fn monotonic_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid, writable timespec; clock_gettime is async-signal-safe (POSIX).
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    (ts.tv_sec as u64)
        .saturating_mul(1_000_000_000)
        .saturating_add(ts.tv_nsec as u64)
        .max(1)
}

/// Whether the first stop signal is acknowledged on stderr (not with `--quiet`).
static SAY_STOPPING: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(true);

/// What the first stop signal prints: the stop is not instant, and how to make it so.
const STOPPING: &[u8] = b"mlbench: stopping cleanly at the next training step or evaluation batch (finished work is kept); a second Ctrl-C (after a second) ends at once without saving\n";

/// First signal: set [`STOP`] and say so. A repeat within [`REPEAT_WINDOW_NS`]: nothing. A
/// later one: the user insists, so the process ends at once (default action, no checkpoint).
extern "C" fn on_stop_signal(sig: libc::c_int) {
    use std::sync::atomic::Ordering::SeqCst;
    let now = monotonic_ns();
    match FIRST_STOP_NS.compare_exchange(0, now, SeqCst, SeqCst) {
        Ok(_) => {
            STOP.store(true, SeqCst);
            if SAY_STOPPING.load(SeqCst) {
                // SAFETY: write(2) is async-signal-safe; the buffer is a static byte string of
                // the given length. A failed or short write loses only the message.
                unsafe { libc::write(2, STOPPING.as_ptr().cast(), STOPPING.len()) };
            }
        }
        Err(first) if now.saturating_sub(first) < REPEAT_WINDOW_NS => {}
        // SAFETY: `signal` and `raise` are async-signal-safe (POSIX) and SIG_DFL installs no
        // code of ours; the raised signal is delivered with its default action (termination)
        // once this handler returns.
        Err(_) => unsafe {
            libc::signal(libc::SIGINT, libc::SIG_DFL);
            libc::signal(libc::SIGTERM, libc::SIG_DFL);
            libc::raise(sig);
        },
    }
}

/// Routes SIGINT and SIGTERM (Slurm, Kubernetes) to [`STOP`]; the first one is acknowledged on
/// stderr unless `quiet`.
pub fn catch_stop_signals(quiet: bool) {
    SAY_STOPPING.store(!quiet, std::sync::atomic::Ordering::SeqCst);
    let h = on_stop_signal as *const () as libc::sighandler_t;
    // SAFETY: `h` is an `extern "C" fn(c_int)`, the signature `signal` expects, and the handler
    // only touches atomics and calls async-signal-safe functions (clock_gettime, signal, raise).
    unsafe {
        libc::signal(libc::SIGINT, h);
        libc::signal(libc::SIGTERM, h);
    }
}
