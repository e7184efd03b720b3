//! Progress lines for long work when nobody watches a terminal: positions and messages in
//! (training steps, evaluation items, grid cells), at most one `tracing` line per interval out,
//! with an estimate of the time left made from this process's own work. The terminal's bar is
//! [`super::Global::bar`].

use super::Global;

/// Periodic progress lines for long work when stderr is not a terminal (cron, Slurm, `nohup`),
/// where the progress bar is hidden: at most one `tracing` line every `MLBENCH_PROGRESS_SECS`
/// seconds (default 60) with the position, the elapsed time, an estimate of what is left and
/// the latest message. Silent with `--quiet` or on a terminal.
///
/// The estimate comes from work done in this process only: [`Beat::tick`] times the current
/// stretch (a resumed run that starts at step 12 is timed from step 12; a new unit, seen as a
/// position that goes back or a new length, starts a new stretch), and [`Beat::tick_units`]
/// times the units that actually ran (a resumed grid passes its finished cells in no time).
pub struct Beat {
    what: String,
    on: bool,
    every: std::time::Duration,
    start: std::time::Instant,
    last: Option<std::time::Instant>,
    stretch: Option<Stretch>,
}

/// Where and when the current stretch of [`Beat::tick`] positions began.
struct Stretch {
    from: u64,
    len: u64,
    pos: u64,
    at: std::time::Instant,
}

impl Stretch {
    /// The stretch `pos` of `len` belongs to: `prev` when it goes on from it (same length, not
    /// behind), else a new one starting now.
    fn next(prev: Option<Stretch>, pos: u64, len: u64) -> Stretch {
        match prev {
            Some(s) if s.len == len && pos >= s.pos => Stretch { pos, ..s },
            _ => Stretch {
                from: pos,
                len,
                pos,
                at: std::time::Instant::now(),
            },
        }
    }
}

impl Beat {
    pub fn new(g: &Global, what: &str) -> Beat {
        let every = std::env::var("MLBENCH_PROGRESS_SECS")
            .ok()
            .and_then(|v| v.trim().parse::<u64>().ok())
            .unwrap_or(60);
        Beat {
            what: what.to_string(),
            on: !g.quiet && !std::io::IsTerminal::is_terminal(&std::io::stderr()),
            every: std::time::Duration::from_secs(every),
            start: std::time::Instant::now(),
            last: None,
            stretch: None,
        }
    }

    /// Notes progress `pos` of `len` with `message`; logs it when the interval has passed.
    pub fn tick(&mut self, pos: u64, len: u64, message: &str) {
        let s = Stretch::next(self.stretch.take(), pos, len);
        let secs = s.at.elapsed().as_secs_f64();
        let (done, left) = (pos - s.from, len.saturating_sub(pos));
        self.stretch = Some(s);
        self.log(pos, len, eta(secs, done, left), message);
    }

    /// Notes unit `pos` of `len` where `ran` units have run in this process, taking `spent`
    /// seconds, and at most `left` remain to run: the estimate is their mean time times `left`.
    pub fn tick_units(
        &mut self,
        pos: u64,
        len: u64,
        (ran, spent): (u64, f64),
        left: u64,
        message: &str,
    ) {
        self.log(pos, len, eta(spent, ran, left), message);
    }

    fn log(&mut self, pos: u64, len: u64, eta: String, message: &str) {
        if !self.on || self.last.is_some_and(|t| t.elapsed() < self.every) {
            return;
        }
        self.last = Some(std::time::Instant::now());
        let secs = self.start.elapsed().as_secs_f64();
        tracing::info!(
            "{}: {pos}/{len}, {secs:.0} s elapsed, eta {eta}: {message}",
            self.what
        );
    }
}

/// `secs` spent on `done` units, `left` to go: "N s", or "?" before the first unit.
fn eta(secs: f64, done: u64, left: u64) -> String {
    if done == 0 {
        return "?".into();
    }
    format!("{:.0} s", secs / done as f64 * left as f64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_stretch_starts_where_the_work_resumed_and_again_at_each_new_unit() {
        // A training run resumed at step 12 of 168 is timed from step 12.
        let s = Stretch::next(None, 12, 168);
        assert_eq!((s.from, s.pos), (12, 12));
        let s = Stretch::next(Some(s), 15, 168);
        assert_eq!((s.from, s.pos), (12, 15));
        // A new evaluation unit (position back to 0) or phase (another length) starts afresh.
        let s = Stretch::next(Some(s), 0, 168);
        assert_eq!((s.from, s.pos), (0, 0));
        let s = Stretch::next(Some(s), 3, 40);
        assert_eq!((s.from, s.len), (3, 40));
    }

    #[test]
    fn the_estimate_is_the_mean_time_of_the_done_units_times_those_left() {
        assert_eq!(eta(10.0, 2, 3), "15 s");
        assert_eq!(eta(0.0, 0, 5), "?");
        assert_eq!(eta(7.0, 7, 0), "0 s");
    }
}
