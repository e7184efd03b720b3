//! CPU kernels for what candle runs as chains of scalar ops, with extra copies or without a
//! backward pass, one file per concern:
//!
//! - `activation`: a vectorisable `exp` and the MLP's gated activation `act(gate) * up`,
//!   forward and backward;
//! - `norm`: the input gradient of RMSNorm;
//! - `softmax`: row statistics for log-sum-exp and token cross-entropy rows with their
//!   gradient;
//! - `frozen`: products with frozen base weights (f32, or bf16 on AMX tiles with a pack cache)
//!   and the process-wide switch between the two;
//! - `attention`: fused attention for inference and the 2-D passes (forward and backward) of
//!   the training layer.
//!
//! In: contiguous f32 slices or f32 CPU tensors. Out: new f32 buffers or tensors; the
//! tensor-level entry points give `None` for other dtypes and devices, and callers then use
//! candle's ops. Callers use the names re-exported here (`kernels::glu`,
//! `kernels::attention_2d::forward`, ...). The pieces shared with the AMX product live in
//! `model::cpu`, the precision setting itself in [`crate::precision`].

mod activation;
mod attention;
mod frozen;
mod norm;
mod softmax;

pub use activation::{exp, glu, glu_backward, glu_backward_slices, glu_slices, Glu};
pub use attention::{attention, attention_2d, Block};
pub use frozen::{frozen_linear, frozen_linear_grad, linear, set_matmul_precision, PackCache};
pub use norm::{rms_norm_backward, rms_norm_backward_slices};
pub use softmax::{cross_entropy_rows, max_and_sum_exp};

pub use crate::precision::{matmul_precision, MatmulPrecision};
