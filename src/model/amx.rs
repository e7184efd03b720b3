//! bf16 matrix products on Intel AMX tiles, with f32 accumulation: the opt-in fast path for
//! frozen base weights on CPUs that have AMX (Sapphire Rapids and later Xeons).
//!
//! In: an f32 activation matrix `a: [m, k]` (rounded to bf16, nearest-even, as it is read)
//! and a weight already rounded to bf16 and packed once into tile order ([`Packed`]); out: the
//! f32 product `a b: [m, n]`. Each `tdpbf16ps` multiplies a 16 x 32 bf16 tile of `a` by a
//! 32 x 16 tile of `b` into a 16 x 16 f32 accumulator; a task keeps a 32 x 32 block of the
//! output in four accumulators while it walks `k`.
//!
//! Accuracy: inputs carry 8 significant bits (relative rounding error <= 2^-9 each), sums are
//! f32, so a product of length `k` is off by about `2^-9 sqrt(k)` of its typical term. That is
//! the precision PyTorch's CPU autocast gives; f32 stays the default (see
//! [`super::kernels::set_matmul_precision`]).
//!
//! Linux on x86-64 only: the kernel must grant the process the tile state
//! (`arch_prctl(ARCH_REQ_XCOMP_PERM)`); [`available`] asks once and reports whether it may be
//! used. Elsewhere it is always `false` and the callers keep the f32 path.

use rayon::prelude::*;

use super::cpu::OutPtr;

/// Rows of an A tile and of an accumulator tile.
const TM: usize = 16;
/// bf16 values along `k` in one tile row (64 bytes).
const TK: usize = 32;
/// f32 columns of an accumulator tile (and bf16 pairs in a B tile row).
const TN: usize = 16;
/// u16 values in one packed B tile (16 rows x 64 bytes).
const TILE: usize = TM * TK;
/// Output rows one parallel task covers (it reuses its B columns across them).
const TASK_ROWS: usize = 256;

/// Whether AMX bf16 tiles can be used in this process (asked once). `MLBENCH_NO_AMX=1` answers
/// no whatever the CPU (to check the f32-only behaviour on an AMX machine).
pub fn available() -> bool {
    static OK: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *OK.get_or_init(|| std::env::var_os("MLBENCH_NO_AMX").is_none() && detect())
}

#[cfg(all(target_arch = "x86_64", target_os = "linux"))]
fn detect() -> bool {
    // CPUID leaf 7: EDX bit 22 = AMX-BF16, bit 24 = AMX-TILE.
    let l7 = core::arch::x86_64::__cpuid_count(7, 0);
    let (bf16, tile) = ((l7.edx >> 22) & 1 == 1, (l7.edx >> 24) & 1 == 1);
    if !(bf16 && tile) {
        return false;
    }
    const ARCH_REQ_XCOMP_PERM: libc::c_long = 0x1023;
    const XFEATURE_XTILEDATA: libc::c_long = 18;
    // SAFETY: a plain system call with integer arguments; it only changes which register
    // state the kernel lets this process use.
    let r = unsafe {
        libc::syscall(
            libc::SYS_arch_prctl,
            ARCH_REQ_XCOMP_PERM,
            XFEATURE_XTILEDATA,
        )
    };
    r == 0
}

#[cfg(not(all(target_arch = "x86_64", target_os = "linux")))]
fn detect() -> bool {
    false
}

/// f32 -> bf16 bits, rounding to nearest even (what `vcvtneps2bf16` and PyTorch do). NaN
/// inputs are not preserved exactly (they may come out as infinities or zeros).
#[inline(always)]
pub fn bf16_bits(x: f32) -> u16 {
    let b = x.to_bits();
    (b.wrapping_add(0x7fff + ((b >> 16) & 1)) >> 16) as u16
}

/// bf16 bits -> f32 (exact).
#[inline(always)]
pub fn bf16_value(h: u16) -> f32 {
    f32::from_bits((h as u32) << 16)
}

/// The right-hand matrix `b: [k, n]` rounded to bf16 and laid out as AMX B tiles: `k` padded
/// to 32 and `n` to 32 with zeros; tile `(j, t)` (columns `16 j..`, rows `32 t..`) is 1 KiB
/// at `(j * k_tiles + t) * 512`, its row `r` holding the pairs `(b[32t + 2r][c],
/// b[32t + 2r + 1][c])` for its 16 columns `c`.
#[derive(Debug)]
pub struct Packed {
    k: usize,
    n: usize,
    k_tiles: usize,
    n_tiles: usize,
    data: Vec<u16>,
}

impl Packed {
    /// Packs `b = w^T` for a weight `w: [n, k]` stored row-major (a linear layer's `[out, in]`
    /// matrix, for `y = x w^T`).
    pub fn from_transposed(w: &[f32], n: usize, k: usize) -> Packed {
        assert_eq!(w.len(), n * k, "weight length");
        Packed::build(k, n, |kk, c| w[c * k + kk])
    }

    /// Packs `b: [k, n]` stored row-major (a linear layer's `[out, in]` matrix for the input
    /// gradient `g w`).
    pub fn from_rows(b: &[f32], k: usize, n: usize) -> Packed {
        assert_eq!(b.len(), k * n, "matrix length");
        Packed::build(k, n, |kk, c| b[kk * n + c])
    }

    fn build(k: usize, n: usize, get: impl Fn(usize, usize) -> f32 + Sync) -> Packed {
        let k_tiles = k.div_ceil(TK);
        let n_tiles = n.div_ceil(2 * TN) * 2;
        let mut data = vec![0u16; n_tiles * k_tiles * TILE];
        data.par_chunks_mut(k_tiles * TILE)
            .enumerate()
            .for_each(|(j, col)| {
                for c in 0..TN {
                    let cc = j * TN + c;
                    if cc >= n {
                        break;
                    }
                    for kk in 0..k {
                        let (t, r, odd) = (kk / TK, (kk % TK) / 2, kk % 2);
                        col[t * TILE + r * TK + 2 * c + odd] = bf16_bits(get(kk, cc));
                    }
                }
            });
        Packed {
            k,
            n,
            k_tiles,
            n_tiles,
            data,
        }
    }

    /// `(k, n)`.
    pub fn dims(&self) -> (usize, usize) {
        (self.k, self.n)
    }

    /// Bytes held.
    pub fn bytes(&self) -> usize {
        self.data.len() * 2
    }
}

/// Rows of `a: [m, k]` as bf16, padded with zeros to `m_pad` rows of `k_pad` values.
fn pack_rows(a: &[f32], m: usize, k: usize, m_pad: usize, k_pad: usize) -> Vec<u16> {
    let mut out = vec![0u16; m_pad * k_pad];
    out.par_chunks_mut(k_pad * TM)
        .zip(a.par_chunks(k * TM))
        .for_each(|(dst, src)| {
            for (d, s) in dst.chunks_mut(k_pad).zip(src.chunks(k)) {
                for (x, &y) in d[..k].iter_mut().zip(s) {
                    *x = bf16_bits(y);
                }
            }
        });
    debug_assert!(m <= m_pad);
    out
}

/// `a b` for `a: [m, k]` f32 row-major and a packed `b: [k, n]`: `[m, n]` f32 row-major.
/// Panics when [`available`] is false or the shapes disagree (callers check both).
pub fn matmul(a: &[f32], m: usize, b: &Packed) -> Vec<f32> {
    assert!(available(), "AMX is not available");
    let k = b.k;
    assert_eq!(a.len(), m * k, "left matrix length");
    let m_pad = m.div_ceil(2 * TM) * 2 * TM;
    let k_pad = b.k_tiles * TK;
    let n_pad = b.n_tiles * TN;
    let ap = pack_rows(a, m, k, m_pad, k_pad);
    // Output with padded rows and columns, then trimmed: padded columns only exist when n is
    // not a multiple of 32 (no model layer here), padded rows are cut by truncating.
    let mut c: Vec<f32> = Vec::with_capacity(m_pad * n_pad);
    let row_chunks = m_pad.div_ceil(TASK_ROWS);
    let col_pairs = b.n_tiles / 2;
    let out = OutPtr(c.as_mut_ptr());
    (0..row_chunks * col_pairs)
        .into_par_iter()
        .for_each(|task| {
            let (rc, jp) = (task / col_pairs, task % col_pairs);
            let r0 = rc * TASK_ROWS;
            let r1 = (r0 + TASK_ROWS).min(m_pad);
            let b0 = b.data[(2 * jp) * b.k_tiles * TILE..].as_ptr();
            let b1 = b.data[(2 * jp + 1) * b.k_tiles * TILE..].as_ptr();
            // SAFETY: `ap` has m_pad x k_pad values and each B column has k_tiles tiles, so every
            // tile load stays inside its buffer; each task stores the disjoint rows r0..r1 x
            // columns 32 jp..32 jp + 32 of the m_pad x n_pad output, which `c` has room for.
            unsafe {
                tiles::configure();
                let mut r = r0;
                while r < r1 {
                    tiles::block(
                        ap.as_ptr().add(r * k_pad),
                        k_pad * 2,
                        b0,
                        b1,
                        b.k_tiles,
                        out.get().add(r * n_pad + 2 * jp * TN),
                        n_pad * 4,
                    );
                    r += 2 * TM;
                }
                tiles::release();
            }
        });
    // SAFETY: the tasks above wrote every element of the m_pad x n_pad block.
    unsafe { c.set_len(m_pad * n_pad) };
    if n_pad == b.n {
        c.truncate(m * b.n);
        return c;
    }
    let mut y = Vec::with_capacity(m * b.n);
    for row in c.chunks(n_pad).take(m) {
        y.extend_from_slice(&row[..b.n]);
    }
    y
}

#[cfg(target_arch = "x86_64")]
mod tiles {
    use std::arch::asm;

    /// The tile configuration: palette 1, all eight tiles 16 rows x 64 bytes.
    #[repr(C, align(64))]
    struct Config([u8; 64]);

    const CONFIG: Config = {
        let mut c = [0u8; 64];
        c[0] = 1;
        let mut t = 0;
        while t < 8 {
            c[16 + 2 * t] = 64;
            c[48 + t] = 16;
            t += 1;
        }
        Config(c)
    };

    /// Loads the tile configuration on the calling thread.
    ///
    /// # Safety
    /// [`super::available`] must have returned true.
    pub unsafe fn configure() {
        asm!("ldtilecfg [{0}]", in(reg) CONFIG.0.as_ptr(), options(nostack, readonly));
    }

    /// Frees the calling thread's tile state.
    ///
    /// # Safety
    /// As [`configure`].
    pub unsafe fn release() {
        asm!("tilerelease", options(nostack, nomem));
    }

    /// One 32 x 32 output block: `c = a b` over `k_tiles` steps of 32, where `a` points at 32
    /// bf16 rows `lda` bytes apart, `b0`/`b1` at the packed tiles of two 16-column groups, and
    /// `c` at f32 rows `ldc` bytes apart.
    ///
    /// # Safety
    /// Tiles configured on this thread; all pointers valid for the extents above.
    #[inline(always)]
    pub unsafe fn block(
        a: *const u16,
        lda: usize,
        b0: *const u16,
        b1: *const u16,
        k_tiles: usize,
        c: *mut f32,
        ldc: usize,
    ) {
        asm!(
            "tilezero tmm0",
            "tilezero tmm1",
            "tilezero tmm2",
            "tilezero tmm3",
            options(nostack, nomem)
        );
        let a1 = (a as *const u8).add(16 * lda) as *const u16;
        for t in 0..k_tiles {
            asm!(
                "tileloadd tmm4, [{a0} + {lda}*1]",
                "tileloadd tmm5, [{a1} + {lda}*1]",
                "tileloadd tmm6, [{b0} + {s64}*1]",
                "tileloadd tmm7, [{b1} + {s64}*1]",
                "tdpbf16ps tmm0, tmm4, tmm6",
                "tdpbf16ps tmm1, tmm4, tmm7",
                "tdpbf16ps tmm2, tmm5, tmm6",
                "tdpbf16ps tmm3, tmm5, tmm7",
                a0 = in(reg) a.add(t * 32),
                a1 = in(reg) a1.add(t * 32),
                b0 = in(reg) b0.add(t * 512),
                b1 = in(reg) b1.add(t * 512),
                lda = in(reg) lda,
                s64 = in(reg) 64usize,
                options(nostack, readonly)
            );
        }
        let c1 = (c as *mut u8).add(16 * ldc) as *mut f32;
        asm!(
            "tilestored [{c0} + {ldc}*1], tmm0",
            "tilestored [{c0b} + {ldc}*1], tmm1",
            "tilestored [{c1} + {ldc}*1], tmm2",
            "tilestored [{c1b} + {ldc}*1], tmm3",
            c0 = in(reg) c,
            c0b = in(reg) c.add(16),
            c1 = in(reg) c1,
            c1b = in(reg) c1.add(16),
            ldc = in(reg) ldc,
            options(nostack)
        );
    }
}

/// Stand-ins on other architectures, where `available()` is always false and nothing calls them.
#[cfg(not(target_arch = "x86_64"))]
mod tiles {
    /// Never called (see the module).
    ///
    /// # Safety
    /// None needed: it panics.
    pub unsafe fn configure() {
        unreachable!("AMX is x86-64 only")
    }

    /// Never called (see the module).
    ///
    /// # Safety
    /// None needed: it does nothing.
    pub unsafe fn release() {}

    /// Never called (see the module).
    ///
    /// # Safety
    /// None needed: it panics.
    pub unsafe fn block(
        _a: *const u16,
        _lda: usize,
        _b0: *const u16,
        _b1: *const u16,
        _k_tiles: usize,
        _c: *mut f32,
        _ldc: usize,
    ) {
        unreachable!("AMX is x86-64 only")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// f64 product of the bf16-rounded inputs: what the tiles compute, up to f32 summation.
    fn reference(a: &[f32], m: usize, k: usize, b: &[f32], n: usize) -> Vec<f64> {
        let r = |x: f32| bf16_value(bf16_bits(x)) as f64;
        let mut y = vec![0f64; m * n];
        for i in 0..m {
            for kk in 0..k {
                let av = r(a[i * k + kk]);
                for j in 0..n {
                    y[i * n + j] += av * r(b[kk * n + j]);
                }
            }
        }
        y
    }

    fn values(len: usize, seed: u64) -> Vec<f32> {
        let mut rng = crate::util::Rng::new(seed);
        (0..len)
            .map(|_| rng.next_f64() as f32 * 2.0 - 1.0)
            .collect()
    }

    #[test]
    fn bf16_rounding_is_nearest_even() {
        assert_eq!(bf16_bits(1.0), 0x3f80);
        // 1 + 2^-8 lies halfway between bf16 1.0 and 1 + 2^-7: ties go to the even one (1.0).
        assert_eq!(bf16_value(bf16_bits(1.0 + 1.0 / 256.0)), 1.0);
        // 1 + 3 * 2^-8 is halfway between 1 + 2^-7 (odd) and 1 + 2^-6 (even).
        assert_eq!(bf16_value(bf16_bits(1.0 + 3.0 / 256.0)), 1.0 + 1.0 / 64.0);
        // Just above the halfway point rounds up.
        assert_eq!(
            bf16_value(bf16_bits(f32::from_bits(0x3f80_8001))),
            1.0 + 1.0 / 128.0
        );
        assert_eq!(bf16_value(bf16_bits(-2.5)), -2.5);
    }

    #[test]
    fn packed_product_matches_reference_on_ragged_shapes() {
        if !available() {
            eprintln!("AMX not available here: the tile product is not exercised");
            return;
        }
        // Shapes off every tile multiple, one exact, and a single row (decoding).
        for &(m, k, n) in &[(37, 70, 45), (64, 64, 64), (1, 33, 17), (300, 96, 40)] {
            let a = values(m * k, 1 + m as u64);
            let b = values(k * n, 2 + n as u64);
            let want = reference(&a, m, k, &b, n);
            let got = matmul(&a, m, &Packed::from_rows(&b, k, n));
            assert_eq!(got.len(), m * n);
            for (i, (g, w)) in got.iter().zip(&want).enumerate() {
                assert!(
                    (*g as f64 - w).abs() <= 1e-5 * (1.0 + w.abs()),
                    "{m}x{k}x{n} element {i}: {g} vs {w}"
                );
            }
            // The transposed packing of w = b^T gives the same product.
            let mut w = vec![0f32; n * k];
            for kk in 0..k {
                for j in 0..n {
                    w[j * k + kk] = b[kk * n + j];
                }
            }
            assert_eq!(matmul(&a, m, &Packed::from_transposed(&w, n, k)), got);
        }
    }
}
