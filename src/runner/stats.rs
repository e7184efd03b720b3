//! Uncertainty of accuracies across seeds and test items, and the verdict of
//! a method against a reference method.
//!
//! # Input
//!
//! One (method, budget) cell is an [`Outcomes`] map: seed -> language ->
//! item id -> whether the prediction was correct. Accuracies are fractions
//! in `[0, 1]`.
//!
//! # Statistic
//!
//! For seed `s`, language `l` has the item set `I_sl` with outcomes
//! `x_sli` in {0, 1}. The seed's accuracy is
//!
//! ```text
//! micro:  acc(s) = sum_l sum_{i in I_sl} x_sli / sum_l |I_sl|
//! macro:  acc(s) = (1 / L_s) * sum_l ( sum_{i in I_sl} x_sli / |I_sl| )
//! ```
//!
//! where `L_s` counts the languages of `s` that have at least one item
//! (empty languages and seeds without items are skipped). A cell's
//! accuracy is the mean over its `S` seeds, `theta = (1/S) sum_s acc(s)`.
//!
//! For a paired comparison of method `x` with reference `y`, seed `s` keeps
//! only the items `P_sl` present (same language, same item id) in both, and
//!
//! ```text
//! d(s) = acc_x(s) - acc_y(s)   both computed on P_s
//! diff = (1/S) sum_s d(s)      over the S seeds present in both
//! ```
//!
//! # Intervals
//!
//! - [`t_interval`]: `mean +- t(0.975, n-1) * sd / sqrt(n)` over seed-level
//!   values (`sd` with `n - 1` in the denominator). Only seed-to-seed
//!   variation enters; item sampling counts only as far as it shows up in
//!   the seed values.
//! - [`two_level_bootstrap`] and [`paired_difference`]: percentile 95%
//!   interval of a two-level bootstrap. One resample `b` is
//!
//!   ```text
//!   draw seeds s*_1 .. s*_S uniformly with replacement from the S seeds
//!   for each drawn seed, for each language l:
//!       draw |I_sl| items uniformly with replacement from I_sl
//!   theta*_b = (1/S) sum_j acc*(s*_j)       (or d*(s*_j) when paired)
//!   ```
//!
//!   Each language keeps its item count, so a macro resample is still a
//!   mean of per-language accuracies. In the paired case both methods are
//!   scored on the same resampled items, which keeps their correlation.
//!   The interval is `[q_0.025, q_0.975]` of the `theta*_b`, with linear
//!   interpolation between order statistics.
//!
//! # Verdict
//!
//! Given the interval `[low, high]` of `method - reference` and a margin
//! `m >= 0` (an accuracy fraction, 0.02 for two points), the first rule that
//! holds decides:
//!
//! ```text
//! low or high is NaN  -> inconclusive
//! low  >  0           -> superior
//! low  > -m           -> non-inferior
//! high < -m           -> inferior
//! otherwise           -> inconclusive
//! ```

use std::collections::BTreeMap;

use crate::util::Rng;

/// seed -> language -> item id -> correct
pub type Outcomes = BTreeMap<u64, BTreeMap<String, BTreeMap<String, bool>>>;

/// How one seed's items are turned into an accuracy.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Average {
    /// All items of all languages pooled.
    Micro,
    /// Mean of the per-language accuracies.
    Macro,
}

/// Upper 97.5% quantiles of Student's t for 1..=30 degrees of freedom.
const T_975: [f64; 30] = [
    12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160,
    2.145, 2.131, 2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056,
    2.052, 2.048, 2.045, 2.042,
];

/// Normal quantile used past the table.
const Z_975: f64 = 1.96;

/// Accuracy of one seed (language -> item id -> correct). NaN when no
/// language has any item.
pub fn seed_accuracy(by_lang: &BTreeMap<String, BTreeMap<String, bool>>, avg: Average) -> f64 {
    let mut tally = Tally::new(avg);
    for items in by_lang.values() {
        let correct = items.values().filter(|&&c| c).count();
        tally.add(correct, 0, items.len());
    }
    tally.finish().0
}

/// Mean and two-sided 95% Student-t interval `(mean, low, high)` of
/// seed-level values. One value gives `(value, NaN, NaN)`, none gives NaNs.
pub fn t_interval(values: &[f64]) -> (f64, f64, f64) {
    let n = values.len();
    if n == 0 {
        return (f64::NAN, f64::NAN, f64::NAN);
    }
    let mean = values.iter().sum::<f64>() / n as f64;
    if n == 1 {
        return (mean, f64::NAN, f64::NAN);
    }
    let var = values.iter().map(|v| (v - mean).powi(2)).sum::<f64>() / (n - 1) as f64;
    let half = t_quantile(n - 1) * (var / n as f64).sqrt();
    (mean, mean - half, mean + half)
}

/// Two-sided 95% t quantile for `df >= 1` degrees of freedom.
fn t_quantile(df: usize) -> f64 {
    T_975.get(df.saturating_sub(1)).copied().unwrap_or(Z_975)
}

/// Percentile 95% interval `(low, high)` of the mean-over-seeds accuracy,
/// two-level bootstrap (seeds, then items within each language). Seeds
/// without items are skipped; NaNs when none is left or `resamples == 0`.
pub fn two_level_bootstrap(
    o: &Outcomes,
    avg: Average,
    resamples: usize,
    rng_seed: u64,
) -> (f64, f64) {
    let seeds: Vec<SeedItems> = o
        .values()
        .map(SeedItems::unpaired)
        .filter(|s| s.items() > 0)
        .collect();
    let (low, high, _) = bootstrap(&seeds, avg, resamples, rng_seed, |(x, _)| x);
    (low, high)
}

/// A method's accuracy minus the reference's, on paired seeds and items.
#[derive(Debug, Clone, PartialEq)]
pub struct Paired {
    /// Mean over paired seeds of (method - reference) accuracy on the items
    /// both have.
    pub diff: f64,
    /// 95% percentile interval of the paired two-level bootstrap.
    pub low: f64,
    pub high: f64,
    /// Seeds present in both, with at least one common item.
    pub seeds: Vec<u64>,
    /// Seeds of the method without a counterpart: the reference lacks the
    /// seed, or shares no item with it. Never replaced by another seed.
    pub missing: Vec<u64>,
    /// Paired items summed over the paired seeds.
    pub items: usize,
    /// Two-sided bootstrap p-value of "no difference": twice the smaller share of resampled
    /// differences on either side of zero (ties count on both sides), at most 1.
    pub p: f64,
}

/// Pairs `method` with `reference` by seed and by (language, item id) and
/// returns the mean difference with its paired two-level bootstrap interval.
/// Items present on one side only are dropped for that seed; seeds only the
/// reference has are ignored. `None` when no seed pairs.
pub fn paired_difference(
    method: &Outcomes,
    reference: &Outcomes,
    avg: Average,
    resamples: usize,
    rng_seed: u64,
) -> Option<Paired> {
    let mut seeds = Vec::new();
    let mut missing = Vec::new();
    let mut cells = Vec::new();
    for (&seed, by_lang) in method {
        let cell = reference
            .get(&seed)
            .map(|other| SeedItems::paired(by_lang, other));
        match cell {
            Some(cell) if cell.items() > 0 => {
                seeds.push(seed);
                cells.push(cell);
            }
            _ => missing.push(seed),
        }
    }
    if cells.is_empty() {
        return None;
    }
    let diff = cells
        .iter()
        .map(|c| {
            let (x, y) = c.accuracies(avg);
            x - y
        })
        .sum::<f64>()
        / cells.len() as f64;
    let (low, high, p) = bootstrap(&cells, avg, resamples, rng_seed, |(x, y)| x - y);
    let items = cells.iter().map(SeedItems::items).sum();
    Some(Paired {
        diff,
        low,
        high,
        seeds,
        missing,
        items,
        p,
    })
}

/// Outcome of comparing an interval of `method - reference` with a margin.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    Superior,
    NonInferior,
    Inferior,
    Inconclusive,
}

impl Verdict {
    pub fn name(self) -> &'static str {
        match self {
            Verdict::Superior => "superior",
            Verdict::NonInferior => "non-inferior",
            Verdict::Inferior => "inferior",
            Verdict::Inconclusive => "inconclusive",
        }
    }
}

/// Verdict for the interval `[low, high]` of `method - reference` with
/// `margin` as an accuracy fraction; see the module docs for the table.
pub fn verdict(low: f64, high: f64, margin: f64) -> Verdict {
    if low.is_nan() || high.is_nan() {
        Verdict::Inconclusive
    } else if low > 0.0 {
        Verdict::Superior
    } else if low > -margin {
        Verdict::NonInferior
    } else if high < -margin {
        Verdict::Inferior
    } else {
        Verdict::Inconclusive
    }
}

/// Bit of an item code that holds the method's (or the only) outcome.
const X_BIT: u8 = 1;
/// Bit of an item code that holds the reference's outcome.
const Y_BIT: u8 = 2;

/// One seed's items, one non-empty vector per language. Each item is a code
/// with the method's outcome in `X_BIT` and the reference's in `Y_BIT`
/// (zero when there is no reference), so one draw serves both sides.
struct SeedItems {
    langs: Vec<Vec<u8>>,
}

impl SeedItems {
    fn unpaired(by_lang: &BTreeMap<String, BTreeMap<String, bool>>) -> SeedItems {
        let langs = by_lang
            .values()
            .filter(|items| !items.is_empty())
            .map(|items| items.values().map(|&c| u8::from(c) * X_BIT).collect())
            .collect();
        SeedItems { langs }
    }

    /// Items of `x` whose (language, id) also appears in `y`.
    fn paired(
        x: &BTreeMap<String, BTreeMap<String, bool>>,
        y: &BTreeMap<String, BTreeMap<String, bool>>,
    ) -> SeedItems {
        let mut langs = Vec::new();
        for (lang, x_items) in x {
            let Some(y_items) = y.get(lang) else {
                continue;
            };
            let codes: Vec<u8> = x_items
                .iter()
                .filter_map(|(id, &cx)| {
                    let cy = *y_items.get(id)?;
                    Some(u8::from(cx) * X_BIT + u8::from(cy) * Y_BIT)
                })
                .collect();
            if !codes.is_empty() {
                langs.push(codes);
            }
        }
        SeedItems { langs }
    }

    fn items(&self) -> usize {
        self.langs.iter().map(Vec::len).sum()
    }

    /// (method, reference) accuracy on all items.
    fn accuracies(&self, avg: Average) -> (f64, f64) {
        let mut tally = Tally::new(avg);
        for codes in &self.langs {
            let (x, y) = codes.iter().fold((0, 0), |(x, y), &c| {
                (x + usize::from(c & X_BIT), y + usize::from(c >> 1))
            });
            tally.add(x, y, codes.len());
        }
        tally.finish()
    }

    /// (method, reference) accuracy on items drawn with replacement within
    /// each language, keeping the language's item count.
    fn resampled(&self, avg: Average, rng: &mut Rng) -> (f64, f64) {
        let mut tally = Tally::new(avg);
        for codes in &self.langs {
            let n = codes.len() as u64;
            let (mut x, mut y) = (0usize, 0usize);
            for _ in 0..n {
                let c = codes[rng.below(n) as usize];
                x += usize::from(c & X_BIT);
                y += usize::from(c >> 1);
            }
            tally.add(x, y, codes.len());
        }
        tally.finish()
    }
}

/// Running micro or macro accuracy of the two sides of a seed.
struct Tally {
    avg: Average,
    x: f64,
    y: f64,
    items: usize,
    langs: usize,
}

impl Tally {
    fn new(avg: Average) -> Tally {
        Tally {
            avg,
            x: 0.0,
            y: 0.0,
            items: 0,
            langs: 0,
        }
    }

    /// Adds one language with `x` and `y` correct out of `n` items; an empty
    /// language is skipped.
    fn add(&mut self, x: usize, y: usize, n: usize) {
        if n == 0 {
            return;
        }
        let scale = match self.avg {
            Average::Micro => 1.0,
            Average::Macro => 1.0 / n as f64,
        };
        self.x += x as f64 * scale;
        self.y += y as f64 * scale;
        self.items += n;
        self.langs += 1;
    }

    /// (x, y) accuracies; NaN when nothing was added.
    fn finish(&self) -> (f64, f64) {
        let denom = match self.avg {
            Average::Micro => self.items as f64,
            Average::Macro => self.langs as f64,
        };
        (self.x / denom, self.y / denom)
    }
}

/// Percentile 95% interval of `stat` averaged over resampled seeds (see the
/// module docs for the scheme) and the two-sided share of resamples beyond
/// zero (the p-value of [`Paired::p`]). NaNs when there are no seeds or
/// resamples.
fn bootstrap<F>(
    seeds: &[SeedItems],
    avg: Average,
    resamples: usize,
    rng_seed: u64,
    stat: F,
) -> (f64, f64, f64)
where
    F: Fn((f64, f64)) -> f64,
{
    if seeds.is_empty() || resamples == 0 {
        return (f64::NAN, f64::NAN, f64::NAN);
    }
    let mut rng = Rng::new(rng_seed);
    let k = seeds.len() as u64;
    let mut draws = Vec::with_capacity(resamples);
    for _ in 0..resamples {
        let mut sum = 0.0;
        for _ in 0..k {
            let seed = &seeds[rng.below(k) as usize];
            sum += stat(seed.resampled(avg, &mut rng));
        }
        draws.push(sum / k as f64);
    }
    draws.sort_by(f64::total_cmp);
    let at_most = draws.iter().filter(|&&d| d <= 0.0).count();
    let at_least = draws.iter().filter(|&&d| d >= 0.0).count();
    let p = (2.0 * at_most.min(at_least) as f64 / draws.len() as f64).min(1.0);
    (quantile(&draws, 0.025), quantile(&draws, 0.975), p)
}

/// `p`-quantile of sorted values, interpolating linearly between order
/// statistics (the usual "type 7" definition). NaN for no values.
fn quantile(sorted: &[f64], p: f64) -> f64 {
    let Some(last) = sorted.len().checked_sub(1) else {
        return f64::NAN;
    };
    let h = p * last as f64;
    let lo = h.floor() as usize;
    let hi = (lo + 1).min(last);
    sorted[lo] + (h - lo as f64) * (sorted[hi] - sorted[lo])
}

#[cfg(test)]
mod tests {
    use super::*;

    type Langs = BTreeMap<String, BTreeMap<String, bool>>;

    /// Language map from (language, [(item id, correct)]).
    fn langs(spec: &[(&str, &[(&str, bool)])]) -> Langs {
        spec.iter()
            .map(|(lang, items)| {
                let items = items.iter().map(|(id, c)| (id.to_string(), *c)).collect();
                (lang.to_string(), items)
            })
            .collect()
    }

    fn close(a: f64, b: f64) -> bool {
        (a - b).abs() < 1e-9
    }

    #[test]
    fn seed_accuracy_micro_and_macro() {
        let by_lang = langs(&[
            ("en", &[("a", true), ("b", true), ("c", true), ("d", false)]),
            ("fr", &[("a", true), ("b", false)]),
            ("de", &[]),
        ]);
        // micro: 4 of 6; macro: (3/4 + 1/2) / 2, the empty language skipped.
        assert!(close(seed_accuracy(&by_lang, Average::Micro), 4.0 / 6.0));
        assert!(close(seed_accuracy(&by_lang, Average::Macro), 0.625));
        assert!(seed_accuracy(&Langs::new(), Average::Micro).is_nan());
    }

    #[test]
    fn t_interval_matches_hand_computation() {
        // mean 0.6, sd 0.1, se 0.1 / sqrt(3) = 0.0577350, t(2) = 4.303,
        // half-width 0.2484339.
        let (m, lo, hi) = t_interval(&[0.5, 0.6, 0.7]);
        assert!(close(m, 0.6));
        assert!((lo - 0.3515661).abs() < 1e-6, "{lo}");
        assert!((hi - 0.8484339).abs() < 1e-6, "{hi}");

        // 40 alternating 0/1: sd = sqrt(10 / 39), se = sd / sqrt(40),
        // df 39 is past the table so 1.96: half-width 0.1569252.
        let values: Vec<f64> = (0..40).map(|i| f64::from(i % 2)).collect();
        let (m, lo, hi) = t_interval(&values);
        assert!(close(m, 0.5));
        assert!((hi - m - 0.1569252).abs() < 1e-6);
        assert!(close(m - lo, hi - m));

        let (m, lo, hi) = t_interval(&[0.42]);
        assert_eq!(m, 0.42);
        assert!(lo.is_nan() && hi.is_nan());
    }

    #[test]
    fn verdicts_follow_the_rules_in_order() {
        let m = 0.02;
        assert_eq!(verdict(0.01, 0.05, m), Verdict::Superior);
        assert_eq!(verdict(-0.01, 0.03, m), Verdict::NonInferior);
        // low == 0 is not superior, but it is above -margin.
        assert_eq!(verdict(0.0, 0.03, m), Verdict::NonInferior);
        assert_eq!(verdict(-0.08, -0.03, m), Verdict::Inferior);
        assert_eq!(verdict(-0.05, 0.01, m), Verdict::Inconclusive);
        // low == -margin is not non-inferior; high == -margin is not inferior.
        assert_eq!(verdict(-0.02, 0.01, m), Verdict::Inconclusive);
        assert_eq!(verdict(-0.05, -0.02, m), Verdict::Inconclusive);
        assert_eq!(verdict(f64::NAN, 0.1, m), Verdict::Inconclusive);
        assert_eq!(verdict(0.1, f64::NAN, m), Verdict::Inconclusive);
        assert_eq!(verdict(-0.5, f64::NAN, m), Verdict::Inconclusive);
        assert_eq!(Verdict::NonInferior.name(), "non-inferior");
        assert_eq!(Verdict::Superior.name(), "superior");
        assert_eq!(Verdict::Inferior.name(), "inferior");
        assert_eq!(Verdict::Inconclusive.name(), "inconclusive");
    }

    /// Three seeds, two languages, 40 items each, outcomes from a fixed rng.
    fn random_outcomes(rng_seed: u64, p: f64) -> Outcomes {
        let mut rng = Rng::new(rng_seed);
        let mut o = Outcomes::new();
        for seed in 0..3 {
            for lang in ["en", "sw"] {
                for i in 0..40 {
                    o.entry(seed)
                        .or_default()
                        .entry(lang.to_string())
                        .or_default()
                        .insert(format!("q{i}"), rng.next_f64() < p);
                }
            }
        }
        o
    }

    #[test]
    fn bootstrap_is_reproducible_for_an_rng_seed() {
        let o = random_outcomes(1, 0.6);
        let r = random_outcomes(2, 0.5);
        for avg in [Average::Micro, Average::Macro] {
            let a = two_level_bootstrap(&o, avg, 500, 7);
            assert_eq!(a, two_level_bootstrap(&o, avg, 500, 7));
            assert_ne!(a, two_level_bootstrap(&o, avg, 500, 8));
            assert!(a.0 < a.1);

            let p = paired_difference(&o, &r, avg, 500, 7).expect("seeds pair");
            let q = paired_difference(&o, &r, avg, 500, 7).expect("seeds pair");
            assert_eq!(p, q);
            let q = paired_difference(&o, &r, avg, 500, 8).expect("seeds pair");
            assert_eq!(p.diff, q.diff);
            assert_ne!((p.low, p.high), (q.low, q.high));
            assert!(p.low < p.diff && p.diff < p.high);
        }
    }

    #[test]
    fn bootstrap_degenerate_cases() {
        let all_right: Outcomes = [(0, langs(&[("en", &[("a", true), ("b", true)])]))].into();
        assert_eq!(
            two_level_bootstrap(&all_right, Average::Micro, 100, 1),
            (1.0, 1.0)
        );
        let (lo, hi) = two_level_bootstrap(&Outcomes::new(), Average::Micro, 100, 1);
        assert!(lo.is_nan() && hi.is_nan());
        let (lo, hi) = two_level_bootstrap(&all_right, Average::Micro, 0, 1);
        assert!(lo.is_nan() && hi.is_nan());
    }

    #[test]
    fn missing_reference_seed_is_reported_not_replaced() {
        let method = random_outcomes(3, 0.6);
        let full = random_outcomes(4, 0.6);
        // The reference has seed 0 of `full` and a seed 7 the method lacks.
        let mut reference = Outcomes::new();
        reference.insert(0, full[&0].clone());
        reference.insert(7, full[&1].clone());

        let p = paired_difference(&method, &reference, Average::Micro, 200, 1).expect("seed 0");
        assert_eq!(p.seeds, vec![0]);
        assert_eq!(p.missing, vec![1, 2]);
        assert_eq!(p.items, 80);
        let expected =
            seed_accuracy(&method[&0], Average::Micro) - seed_accuracy(&full[&0], Average::Micro);
        assert!(close(p.diff, expected));

        // A reference seed with no item in common counts as missing too.
        let disjoint = langs(&[("en", &[("zz", true)])]);
        reference.insert(1, disjoint);
        let q = paired_difference(&method, &reference, Average::Micro, 200, 1).expect("seed 0");
        assert_eq!(q.seeds, vec![0]);
        assert_eq!(q.missing, vec![1, 2]);

        let only_other: Outcomes = [(9, full[&0].clone())].into();
        assert_eq!(
            paired_difference(&method, &only_other, Average::Micro, 200, 1),
            None
        );
    }

    #[test]
    fn pairing_uses_only_common_items() {
        let method: Outcomes = [(
            0,
            langs(&[
                ("en", &[("a", true), ("b", false), ("c", true), ("d", true)]),
                ("fr", &[("a", true), ("b", true)]),
                ("sw", &[("x", true)]),
            ]),
        )]
        .into();
        let reference: Outcomes = [(
            0,
            langs(&[
                ("en", &[("a", true), ("b", true), ("e", false)]),
                ("fr", &[("a", false), ("z", false)]),
            ]),
        )]
        .into();
        // Common: en {a, b}, fr {a}; sw and en c, d, e, fr b, z are dropped.
        // micro: method 2/3, reference 2/3 -> 0.
        // macro: method (1/2 + 1) / 2 = 0.75, reference (1 + 0) / 2 = 0.5.
        // Without pairing the micro difference would be 6/7 - 2/5.
        let p = paired_difference(&method, &reference, Average::Micro, 200, 1).expect("pairs");
        assert_eq!(p.items, 3);
        assert!(close(p.diff, 0.0), "{}", p.diff);
        let p = paired_difference(&method, &reference, Average::Macro, 200, 1).expect("pairs");
        assert!(close(p.diff, 0.25), "{}", p.diff);
        assert!(p.low <= p.diff && p.diff <= p.high);
    }

    /// A simulated study design for the coverage checks.
    struct Design {
        seeds: u64,
        langs: usize,
        items: usize,
        /// Population difference method - reference, in every language.
        delta: f64,
        /// Standard deviation of each method's seed effect (independent for
        /// the two methods, shared by the languages of a seed).
        seed_sd: f64,
        /// Chance that the reference's item uses the method's latent draw,
        /// which correlates the two outcomes on an item.
        coupling: f64,
        /// Chance that an item's latent draw is fixed across seeds (the
        /// same test set for every seed); 0 draws fresh items per seed.
        item_share: f64,
    }

    /// Reference accuracies per language.
    const BASE: [f64; 7] = [0.70, 0.55, 0.80, 0.60, 0.65, 0.75, 0.50];

    fn normal(rng: &mut Rng) -> f64 {
        let u1 = 1.0 - rng.next_f64();
        let u2 = rng.next_f64();
        (-2.0 * u1.ln()).sqrt() * (std::f64::consts::TAU * u2).cos()
    }

    /// One study: (method, reference) outcomes.
    ///
    /// Seed `s` has true accuracies `p_r = BASE[l] + a_s` and
    /// `p_m = BASE[l] + delta + b_s` with `a_s, b_s ~ N(0, seed_sd^2)`.
    /// An item is correct when a uniform latent falls below the true
    /// accuracy, so each outcome is Bernoulli with exactly that chance and
    /// the population difference (mean over seeds and items) is `delta`.
    fn simulate(d: &Design, rng: &mut Rng) -> (Outcomes, Outcomes) {
        let fixed: Vec<Vec<f64>> = (0..d.langs)
            .map(|_| (0..d.items).map(|_| rng.next_f64()).collect())
            .collect();
        let (mut method, mut reference) = (Outcomes::new(), Outcomes::new());
        for seed in 0..d.seeds {
            let a = d.seed_sd * normal(rng);
            let b = d.seed_sd * normal(rng);
            for (l, fixed) in fixed.iter().enumerate() {
                let p_r = (BASE[l] + a).clamp(0.0, 1.0);
                let p_m = (BASE[l] + d.delta + b).clamp(0.0, 1.0);
                let lang = format!("l{l}");
                let m = method.entry(seed).or_default().entry(lang.clone());
                let m = m.or_default();
                let r = reference.entry(seed).or_default().entry(lang).or_default();
                for (i, &f) in fixed.iter().enumerate() {
                    let u = if rng.next_f64() < d.item_share {
                        f
                    } else {
                        rng.next_f64()
                    };
                    let v = if rng.next_f64() < d.coupling {
                        u
                    } else {
                        rng.next_f64()
                    };
                    m.insert(format!("q{i}"), u < p_m);
                    r.insert(format!("q{i}"), v < p_r);
                }
            }
        }
        (method, reference)
    }

    /// Share of `studies` simulated studies whose interval covers `delta`:
    /// (paired two-level bootstrap, t interval over per-seed differences,
    /// mean bootstrap width, mean t width).
    fn coverage(d: &Design, studies: usize, resamples: usize) -> (f64, f64, f64, f64) {
        let mut rng = Rng::new(2024);
        let (mut boot, mut t, mut boot_w, mut t_w) = (0usize, 0usize, 0.0, 0.0);
        for study in 0..studies {
            let (m, r) = simulate(d, &mut rng);
            let p = paired_difference(&m, &r, Average::Micro, resamples, study as u64)
                .expect("all seeds pair");
            boot += usize::from(p.low <= d.delta && d.delta <= p.high);
            boot_w += p.high - p.low;
            let diffs: Vec<f64> = m
                .keys()
                .map(|s| {
                    seed_accuracy(&m[s], Average::Micro) - seed_accuracy(&r[s], Average::Micro)
                })
                .collect();
            let (_, lo, hi) = t_interval(&diffs);
            t += usize::from(lo <= d.delta && d.delta <= hi);
            t_w += hi - lo;
        }
        let n = studies as f64;
        (boot as f64 / n, t as f64 / n, boot_w / n, t_w / n)
    }

    fn design(seeds: u64) -> Design {
        Design {
            seeds,
            langs: 2,
            items: 150,
            delta: -0.01,
            seed_sd: 0.015,
            coupling: 0.5,
            item_share: 0.0,
        }
    }

    /// Coverage of the paired interval when the two-level bootstrap matches
    /// the data: 5 seeds x 2 languages x 150 items, fresh items per seed, a
    /// seed random effect (sd 0.015 per method, so about 0.021 on the
    /// difference) and a true population difference of -0.01. 200 studies,
    /// 500 resamples each.
    ///
    /// Measured: 0.975 (t interval over seed differences: 0.965); with 1000
    /// studies 0.968. The band [0.88, 0.99] allows for the Monte Carlo error
    /// of 200 studies (about 1.5 points at 95%) and for the two-level
    /// bootstrap's known biases: resampling items inside resampled seeds
    /// counts item noise twice (over-coverage when it dominates), and
    /// resampling few seeds understates seed variance (under-coverage when
    /// that dominates). See `coverage_table` for both regimes.
    #[test]
    fn paired_interval_covers_the_true_difference() {
        let (boot, t, _, _) = coverage(&design(5), 200, 500);
        println!("bootstrap coverage {boot}, t coverage {t}");
        assert!(
            (0.88..=0.99).contains(&boot),
            "bootstrap coverage {boot}, t coverage {t}"
        );
    }

    /// Coverage across designs, printed; run with
    /// `cargo test --release -- --ignored --nocapture coverage_table`.
    ///
    /// Measured (1000 studies each, 500 resamples, 2 languages x 150 items,
    /// delta -0.01; bootstrap / t over seed differences):
    ///
    /// ```text
    /// fresh items per seed     seed_sd 0.000   seed_sd 0.015   seed_sd 0.030
    ///   3 seeds                0.977 / 0.957   0.954 / 0.940   0.891 / 0.946
    ///   5 seeds                0.981 / 0.956   0.968 / 0.955   0.924 / 0.947
    ///  10 seeds                0.989 / 0.958   0.980 / 0.951   0.959 / 0.956
    /// same items every seed
    ///   3 seeds                0.936 / 0.917   0.907 / 0.928   0.870 / 0.940
    ///   5 seeds                0.900 / 0.823   0.895 / 0.873   0.867 / 0.899
    ///  10 seeds                0.826 / 0.701   0.852 / 0.776   0.877 / 0.881
    /// ```
    ///
    /// "Same items" is the extreme `item_share = 1`: an item's latent draw
    /// is fixed for all seeds. Item effects then do not average out over
    /// seeds, and neither interval reaches 95% for the population of items,
    /// more so the more seeds there are.
    #[test]
    #[ignore]
    fn coverage_table() {
        for item_share in [0.0, 1.0] {
            for seeds in [3, 5, 10] {
                for seed_sd in [0.0, 0.015, 0.03] {
                    let d = Design {
                        seed_sd,
                        item_share,
                        ..design(seeds)
                    };
                    let (boot, t, bw, tw) = coverage(&d, 1000, 500);
                    println!(
                        "shared items {item_share} seeds {seeds:2} seed_sd {seed_sd:.3}: \
                         bootstrap {boot:.3} (width {bw:.4}), t {t:.3} (width {tw:.4})"
                    );
                }
            }
        }
    }
}
