//! Low-level pieces that the CPU kernels ([`super::kernels`]) and the AMX product
//! ([`super::amx`]) share, kept below both so their imports run one way.
//!
//! In: candle tensors, or a raw output buffer split among parallel tasks. Out: the tensors'
//! values as f32 slices read in place ([`f32_slices`]), a pointer those tasks may share
//! ([`OutPtr`]), whether this CPU runs the AVX-512 variants ([`avx512`]), and the error a kernel
//! gives for tensors that are not f32 on the CPU.

use candle_core::{DType, Device, Storage, Tensor};

/// `f` applied to the values of f32 CPU tensors, read in place (a tensor that is not
/// contiguous is copied first); `None` when any tensor is not f32 on the CPU.
pub(crate) fn f32_slices<const N: usize, R>(
    ts: [&Tensor; N],
    f: impl FnOnce([&[f32]; N]) -> R,
) -> candle_core::Result<Option<R>> {
    if ts
        .iter()
        .any(|t| t.dtype() != DType::F32 || !matches!(t.device(), Device::Cpu))
    {
        return Ok(None);
    }
    let owned = ts
        .iter()
        .map(|t| t.contiguous())
        .collect::<candle_core::Result<Vec<_>>>()?;
    let guards: Vec<_> = owned.iter().map(|t| t.storage_and_layout()).collect();
    let mut slices: Vec<&[f32]> = Vec::with_capacity(N);
    for ((storage, layout), t) in guards.iter().zip(&owned) {
        let Storage::Cpu(c) = &**storage else {
            return Ok(None);
        };
        let o = layout.start_offset();
        slices.push(&c.as_slice::<f32>()?[o..o + t.elem_count()]);
    }
    let slices: [&[f32]; N] = slices.try_into().expect("one slice per tensor");
    Ok(Some(f(slices)))
}

/// A raw output pointer shared by parallel tasks that write disjoint parts of one buffer.
#[derive(Clone, Copy)]
pub(crate) struct OutPtr(pub(crate) *mut f32);
// SAFETY: every user has each task write its own block (attention: a (batch, head) block;
// the AMX product: rows x columns of the output); no two blocks overlap.
unsafe impl Send for OutPtr {}
// SAFETY: shared references only copy the pointer; the writes through it follow the rule above.
unsafe impl Sync for OutPtr {}

impl OutPtr {
    /// The pointer (a method, so closures capture the whole `Send` wrapper).
    pub(crate) fn get(self) -> *mut f32 {
        self.0
    }
}

/// Whether the AVX-512 variants can run here (AVX-512 F, BW, DQ, VL and FMA all detected).
pub(crate) fn avx512() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::arch::is_x86_feature_detected!("avx512f")
            && std::arch::is_x86_feature_detected!("avx512bw")
            && std::arch::is_x86_feature_detected!("avx512dq")
            && std::arch::is_x86_feature_detected!("avx512vl")
            && std::arch::is_x86_feature_detected!("fma")
    }
    #[cfg(not(target_arch = "x86_64"))]
    false
}

/// The error of a slice kernel given tensors that are not f32 on the CPU.
pub(crate) fn not_f32_cpu() -> crate::error::Error {
    crate::error::Error::Internal("this CPU kernel needs f32 tensors on the CPU".into())
}
