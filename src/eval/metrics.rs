//! Metrics and their uncertainty: per-example predictions in, per-group values with standard
//! errors and 95% intervals out.
//!
//! - `acc`: the choice with the highest summed log-probability is the gold one;
//! - `acc_norm`: the same after dividing each choice's log-probability by its length in
//!   characters (lm-evaluation-harness's `acc_norm`);
//! - `acc_bytes`: divided by its length in UTF-8 bytes;
//! - `exact_match`: the extracted answer equals the target (numbers compared as numbers).
//!
//! Ties go to the first choice (as `numpy.argmax`). The standard error is the sample standard
//! deviation (n - 1) over sqrt(n), as the harness reports it. Intervals are Wilson score
//! intervals for a proportion, and a stratified percentile bootstrap for macro averages.

use crate::util::{derive_seed, Rng};

/// Index of the largest value (first on ties); `None` for an empty slice.
pub fn argmax(v: &[f64]) -> Option<usize> {
    let mut best: Option<usize> = None;
    for (i, &x) in v.iter().enumerate() {
        match best {
            Some(b) if v[b] >= x => {}
            _ => best = Some(i),
        }
    }
    best
}

/// Predictions of the three multiple-choice rules from the summed log-probabilities and the
/// scored continuations (the choice strings as scored, after the one-space target delimiter).
/// Lengths leave the delimiter out, as lm-evaluation-harness measures the choice text alone.
pub fn mc_predictions(logprobs: &[f64], continuations: &[String]) -> (usize, usize, usize) {
    let by = |len: &dyn Fn(&str) -> usize| -> usize {
        let v: Vec<f64> = logprobs
            .iter()
            .zip(continuations)
            .map(|(lp, c)| lp / len(c.strip_prefix(' ').unwrap_or(c)).max(1) as f64)
            .collect();
        argmax(&v).unwrap_or(0)
    };
    (
        argmax(logprobs).unwrap_or(0),
        by(&|c| c.chars().count()),
        by(&|c| c.len()),
    )
}

/// Normalises an extracted answer for `exact_match`: trims, drops thousands separators and a
/// trailing period, and writes numbers canonically (`18.0` -> `18`).
pub fn normalize_answer(s: &str) -> String {
    let t = s.trim().trim_end_matches('.').replace(',', "");
    match t.parse::<f64>() {
        Ok(x) if x.is_finite() => {
            if x.fract() == 0.0 && x.abs() < 1e15 {
                format!("{}", x as i64)
            } else {
                format!("{x}")
            }
        }
        _ => t.to_string(),
    }
}

/// The last match of `re` in `text` (its first group when it has one).
pub fn extract(re: &regex::Regex, text: &str) -> Option<String> {
    re.captures_iter(text).last().map(|c| {
        c.get(1)
            .or_else(|| c.get(0))
            .map(|m| m.as_str().to_string())
            .unwrap_or_default()
    })
}

/// A metric's value with its uncertainty.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Estimate {
    pub n: usize,
    pub value: f64,
    pub stderr: f64,
    pub ci_low: f64,
    pub ci_high: f64,
}

/// Mean of 0/1 outcomes with the harness's standard error and a 95% Wilson interval.
pub fn proportion(outcomes: &[bool]) -> Estimate {
    let n = outcomes.len();
    if n == 0 {
        return Estimate {
            n: 0,
            value: f64::NAN,
            stderr: f64::NAN,
            ci_low: f64::NAN,
            ci_high: f64::NAN,
        };
    }
    let k = outcomes.iter().filter(|&&x| x).count() as f64;
    let nf = n as f64;
    let p = k / nf;
    let stderr = if n > 1 {
        (p * (1.0 - p) * nf / (nf - 1.0)).sqrt() / nf.sqrt()
    } else {
        f64::NAN
    };
    let (lo, hi) = wilson(k, nf, 1.959_963_984_540_054);
    Estimate {
        n,
        value: p,
        stderr,
        ci_low: lo,
        ci_high: hi,
    }
}

/// Wilson score interval for `k` successes in `n` trials at normal quantile `z`.
pub fn wilson(k: f64, n: f64, z: f64) -> (f64, f64) {
    let p = k / n;
    let z2 = z * z;
    let centre = (p + z2 / (2.0 * n)) / (1.0 + z2 / n);
    let half = z * ((p * (1.0 - p) + z2 / (4.0 * n)) / n).sqrt() / (1.0 + z2 / n);
    ((centre - half).max(0.0), (centre + half).min(1.0))
}

/// Macro average (mean of the groups' means) with a stratified percentile bootstrap: each
/// resample redraws every group's outcomes with replacement within the group. The standard error
/// is the bootstrap standard deviation. Seeded, so reports are reproducible.
pub fn macro_average(groups: &[Vec<f64>], resamples: usize, seed: u64) -> Estimate {
    let groups: Vec<&Vec<f64>> = groups.iter().filter(|g| !g.is_empty()).collect();
    let n: usize = groups.iter().map(|g| g.len()).sum();
    if groups.is_empty() {
        return proportion(&[]);
    }
    let mean = |v: &[f64]| v.iter().sum::<f64>() / v.len() as f64;
    let value = groups.iter().map(|g| mean(g)).sum::<f64>() / groups.len() as f64;
    let mut rng = Rng::new(derive_seed(seed, &["bootstrap"]));
    let mut stats: Vec<f64> = (0..resamples)
        .map(|_| {
            groups
                .iter()
                .map(|g| {
                    let s: f64 = (0..g.len())
                        .map(|_| g[rng.below(g.len() as u64) as usize])
                        .sum();
                    s / g.len() as f64
                })
                .sum::<f64>()
                / groups.len() as f64
        })
        .collect();
    stats.sort_by(f64::total_cmp);
    let q = |p: f64| -> f64 {
        if stats.is_empty() {
            return f64::NAN;
        }
        let i = ((p * (stats.len() - 1) as f64).round() as usize).min(stats.len() - 1);
        stats[i]
    };
    let m = mean(&stats);
    let sd = (stats.iter().map(|x| (x - m).powi(2)).sum::<f64>() / (stats.len().max(2) - 1) as f64)
        .sqrt();
    Estimate {
        n,
        value,
        stderr: sd,
        ci_low: q(0.025),
        ci_high: q(0.975),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn multiple_choice_rules_by_hand() {
        // Lengths without the delimiter space. Choice 0 " a" (1 char) lp -2; choice 1 " bbbb"
        // (4 chars) lp -3; choice 2 " é" (1 char, 2 bytes) lp -2.5. acc: choice 0 (-2 is
        // largest). acc_norm: -2, -0.75, -2.5 -> 1. acc_bytes: -2, -0.75, -1.25 -> 1.
        let c: Vec<String> = [" a", " bbbb", " é"].map(String::from).to_vec();
        assert_eq!(mc_predictions(&[-2.0, -3.0, -2.5], &c), (0, 1, 1));
        // Bytes and characters disagree: " é" is 1 char / 2 bytes, " ab" 2 / 2.
        let c: Vec<String> = [" é", " ab"].map(String::from).to_vec();
        // norm: -2.0/1 = -2.0 vs -2.7/2 = -1.35 -> 1; bytes: -2/2 = -1.0 vs -1.35 -> 0.
        assert_eq!(mc_predictions(&[-2.0, -2.7], &c), (0, 1, 0));
        // The delimiter decides: with it, -1.9/2 = -0.95 beats -3.0/3 = -1.0; without it
        // (lm-evaluation-harness), -1.9/1 loses to -3.0/2 = -1.5.
        let c: Vec<String> = [" a", " bb"].map(String::from).to_vec();
        assert_eq!(mc_predictions(&[-1.9, -3.0], &c), (0, 1, 1));
        assert_eq!(argmax(&[1.0, 3.0, 3.0]), Some(1), "first of ties");
    }

    #[test]
    fn proportion_and_wilson_match_hand_values() {
        let o = [true, true, true, false];
        let e = proportion(&o);
        assert_eq!(e.value, 0.75);
        // sample sd with n-1: sqrt(0.75*0.25*4/3) = 0.5; / sqrt(4) = 0.25
        assert!((e.stderr - 0.25).abs() < 1e-12);
        // Wilson 95% for 3/4 (textbook value: 0.3006, 0.9544).
        assert!((e.ci_low - 0.3006).abs() < 5e-4, "{}", e.ci_low);
        assert!((e.ci_high - 0.9544).abs() < 5e-4, "{}", e.ci_high);
        let all = proportion(&[true; 10]);
        assert!((all.ci_high - 1.0).abs() < 1e-12);
        assert!(all.ci_low > 0.69 && all.ci_low < 0.73, "{}", all.ci_low);
    }

    #[test]
    fn macro_average_is_the_mean_of_means_with_a_covering_interval() {
        let g = vec![vec![1.0; 10], vec![0.0, 1.0, 0.0, 1.0], vec![0.0; 6]];
        let e = macro_average(&g, 2000, 0);
        assert!((e.value - (1.0 + 0.5 + 0.0) / 3.0).abs() < 1e-12);
        assert!(e.ci_low <= e.value && e.value <= e.ci_high);
        assert!(e.ci_high - e.ci_low > 0.1 && e.ci_high - e.ci_low < 0.5);
        assert_eq!(e, macro_average(&g, 2000, 0), "seeded");
        assert_eq!(e.n, 20);
    }

    #[test]
    fn answers_are_extracted_and_normalised() {
        let re = regex::Regex::new(r"(-?[0-9][0-9,\.]*)").unwrap();
        assert_eq!(
            extract(&re, "3 apples, then 1,250. The answer is 18.").as_deref(),
            Some("18.")
        );
        assert_eq!(normalize_answer("18."), "18");
        assert_eq!(normalize_answer("1,250"), "1250");
        assert_eq!(normalize_answer(" 18.0 "), "18");
        assert_eq!(normalize_answer("2.5"), "2.5");
        assert_eq!(normalize_answer("abc"), "abc");
    }
}
