//! Hand-written backward passes for values computed without a gradient graph.
//!
//! candle's fused kernels (rms-norm, rope, softmax) have no backward pass, its matmul backward
//! always computes both operands' gradients, and a loss built from elementary ops keeps every
//! intermediate alive. [`with_grad`] lets mlbench compute a value `y = f(x)` any way it likes
//! (on a detached `x`) and then re-attach it to `x` with a closure `bwd(x, y, dy) -> dx`.
//! In: `x` (tracked), `y` (untracked). Out: `y`, tracked, whose backward calls `bwd`.

use candle_core::{CpuStorage, CudaStorage, CustomOp2, Layout, Shape, Tensor};

use crate::error::Result;

/// `bwd(x, y, dy) -> dx`, with `x` and `y` detached.
pub type BwdFn = dyn Fn(&Tensor, &Tensor, &Tensor) -> candle_core::Result<Tensor> + Send + Sync;

struct WithGrad {
    bwd: Box<BwdFn>,
}

impl CustomOp2 for WithGrad {
    fn name(&self) -> &'static str {
        "with-grad"
    }

    // The forward passes `y` (the second argument) through.
    fn cpu_fwd(
        &self,
        _x: &CpuStorage,
        _lx: &Layout,
        y: &CpuStorage,
        ly: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        use candle_core::backend::BackendStorage;
        Ok((y.try_clone(ly)?, ly.shape().clone()))
    }

    fn cuda_fwd(
        &self,
        _x: &CudaStorage,
        _lx: &Layout,
        y: &CudaStorage,
        ly: &Layout,
    ) -> candle_core::Result<(CudaStorage, Shape)> {
        use candle_core::backend::BackendStorage;
        Ok((y.try_clone(ly)?, ly.shape().clone()))
    }

    fn bwd(
        &self,
        x: &Tensor,
        _y: &Tensor,
        res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        Ok((Some((self.bwd)(&x.detach(), &res.detach(), grad)?), None))
    }
}

/// Attaches `bwd` to a value `y` computed from `x` without a graph. When `x` carries no graph,
/// `y` is returned as is.
pub fn with_grad(x: &Tensor, y: Tensor, bwd: Box<BwdFn>) -> Result<Tensor> {
    if !x.track_op() {
        return Ok(y);
    }
    Ok(x.apply_op2(&y.contiguous()?, WithGrad { bwd })?)
}

/// `bwd(x, a, b, dy) -> (dx, da, db)` for [`with_grad3`], inputs detached; `None` for an input
/// that needs no gradient.
pub type Bwd3Fn = dyn Fn(
        &Tensor,
        &Tensor,
        &Tensor,
        &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)>
    + Send
    + Sync;

struct WithGrad3 {
    y: Tensor,
    bwd: Box<Bwd3Fn>,
}

impl candle_core::CustomOp3 for WithGrad3 {
    fn name(&self) -> &'static str {
        "with-grad3"
    }

    // The forward hands out a copy of the precomputed `y` (CPU only).
    fn cpu_fwd(
        &self,
        _x: &CpuStorage,
        _lx: &Layout,
        _a: &CpuStorage,
        _la: &Layout,
        _b: &CpuStorage,
        _lb: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        use candle_core::backend::BackendStorage;
        let (s, l) = self.y.storage_and_layout();
        match &*s {
            candle_core::Storage::Cpu(c) => Ok((c.try_clone(l)?, l.shape().clone())),
            _ => candle_core::bail!("with-grad3: the value is not on the CPU"),
        }
    }

    fn bwd(
        &self,
        x: &Tensor,
        a: &Tensor,
        b: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        (self.bwd)(&x.detach(), &a.detach(), &b.detach(), grad)
    }
}

/// [`with_grad`] for a value `y` of three inputs (`x` and two weights): one graph node whose
/// backward calls `bwd`. CPU values only. When none of the inputs is tracked, `y` is returned
/// as is.
pub fn with_grad3(
    x: &Tensor,
    a: &Tensor,
    b: &Tensor,
    y: Tensor,
    bwd: Box<Bwd3Fn>,
) -> Result<Tensor> {
    if !(x.track_op() || a.track_op() || b.track_op()) {
        return Ok(y);
    }
    Ok(x.apply_op3(
        a,
        b,
        WithGrad3 {
            y: y.contiguous()?,
            bwd,
        },
    )?)
}
