//! The process-wide precision of products with frozen base weights on the CPU.
//!
//! In: a [`MatmulPrecision`], stored once at start by the model's kernels
//! (`model::kernels::set_matmul_precision`, which first checks that the CPU can run it). Out:
//! [`matmul_precision`], read by the kernels for every frozen product and by
//! [`crate::util::code_version`], which names a precision other than the default. It imports
//! nothing from the stages, so any module may read it.

use std::sync::atomic::{AtomicU8, Ordering};

/// How products with frozen base weights run on the CPU.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MatmulPrecision {
    /// f32 throughout (the default).
    F32,
    /// Inputs rounded to bf16, f32 accumulation, on AMX tiles (`model::amx`); LoRA weights,
    /// norms, attention and losses stay f32.
    Bf16,
}

impl MatmulPrecision {
    pub fn name(self) -> &'static str {
        match self {
            MatmulPrecision::F32 => "f32",
            MatmulPrecision::Bf16 => "bf16",
        }
    }
}

static PRECISION: AtomicU8 = AtomicU8::new(0);

/// Records `p` for the whole process without checking the CPU: the public way in is
/// `model::kernels::set_matmul_precision`, which refuses bf16 where AMX is missing.
pub(crate) fn store_matmul_precision(p: MatmulPrecision) {
    PRECISION.store(p as u8, Ordering::Relaxed);
}

/// The precision stored at start (f32 unless changed).
pub fn matmul_precision() -> MatmulPrecision {
    if PRECISION.load(Ordering::Relaxed) == MatmulPrecision::Bf16 as u8 {
        MatmulPrecision::Bf16
    } else {
        MatmulPrecision::F32
    }
}
