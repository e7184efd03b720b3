//! Timing shared by the GEMM benchmarks: the median wall time of repeated runs, and the row
//! counts to time (the command's arguments).

use std::time::Instant;

/// Median seconds of 20 runs of `f` after 5 warm-ups.
pub fn median(mut f: impl FnMut()) -> f64 {
    let mut t: Vec<f64> = (0..25)
        .map(|_| {
            let t0 = Instant::now();
            f();
            t0.elapsed().as_secs_f64()
        })
        .skip(5)
        .collect();
    t.sort_by(f64::total_cmp);
    t[t.len() / 2]
}

/// The row counts given as the command's arguments, else `default`.
pub fn rows_or(default: &[usize]) -> Vec<usize> {
    let rows: Vec<usize> = std::env::args()
        .skip(1)
        .map(|s| s.parse().expect("ROWS are whole numbers"))
        .collect();
    if rows.is_empty() {
        default.to_vec()
    } else {
        rows
    }
}
