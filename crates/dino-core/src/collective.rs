//! The collective seam of data-parallel training: what the loss (centre), the networks (SyncBatchNorm) and
//! the trainer (gradient averaging) need of a communication engine, as one trait with a [`Local`] backend
//! (world size 1, no dependency). Engines (MPI in dino-train's `mpi` feature; NCCL later) implement
//! [`Collective`] and are [`install`]ed once per process, as `torch.distributed.init_process_group` does;
//! [`current`] returns the installed one (or [`Local`]).
//!
//! [`all_reduce_sum`] is the differentiable tensor form: forward sums a tensor over the ranks, backward sums
//! the gradient over the ranks (the gradient of `sum_r L_r` through an all-reduce). With it, statistics over
//! the global batch (SyncBatchNorm's mean and variance) get exact gradients.
//!
//! Every rank must issue the same collectives in the same order; all calls are blocking.

use std::sync::{Arc, OnceLock};

use candle_core::{CpuStorage, CustomOp1, DType, Layout, Shape, Tensor};

use crate::error::{Error, Result};

/// A group of processes (ranks) that reduce and broadcast together.
pub trait Collective: Send + Sync {
    /// The engine's name (`local`, `mpi`, ...), for logs.
    fn name(&self) -> &'static str;
    /// This process's rank in `0..world_size()`.
    fn rank(&self) -> usize;
    /// Number of ranks.
    fn world_size(&self) -> usize;
    /// This process's rank among the ranks of its node.
    fn local_rank(&self) -> usize;
    /// Number of ranks on this node.
    fn local_size(&self) -> usize;
    /// In-place element-wise sum over the ranks (every rank gets the result).
    fn all_reduce_sum_f32(&self, buf: &mut [f32]) -> Result<()>;
    /// In-place element-wise sum over the ranks, f64.
    fn all_reduce_sum_f64(&self, buf: &mut [f64]) -> Result<()>;
    /// `buf` of rank `root` replaces `buf` on every rank (any length).
    fn broadcast_bytes(&self, buf: &mut Vec<u8>, root: usize) -> Result<()>;
    /// Blocks until every rank has called it.
    fn barrier(&self) -> Result<()>;
    /// Ends every rank of the job with `code` (MPI_Abort); does not return.
    fn abort(&self, code: i32) -> !;
}

/// The single-process "group": world size 1, every collective is the identity.
#[derive(Debug, Default, Clone, Copy)]
pub struct Local;

impl Collective for Local {
    fn name(&self) -> &'static str {
        "local"
    }
    fn rank(&self) -> usize {
        0
    }
    fn world_size(&self) -> usize {
        1
    }
    fn local_rank(&self) -> usize {
        0
    }
    fn local_size(&self) -> usize {
        1
    }
    fn all_reduce_sum_f32(&self, _buf: &mut [f32]) -> Result<()> {
        Ok(())
    }
    fn all_reduce_sum_f64(&self, _buf: &mut [f64]) -> Result<()> {
        Ok(())
    }
    fn broadcast_bytes(&self, _buf: &mut Vec<u8>, root: usize) -> Result<()> {
        if root != 0 {
            return Err(Error::collective(
                "broadcast",
                format!("root {root} in a world of 1"),
            ));
        }
        Ok(())
    }
    fn barrier(&self) -> Result<()> {
        Ok(())
    }
    fn abort(&self, code: i32) -> ! {
        std::process::exit(code)
    }
}

static CURRENT: OnceLock<Arc<dyn Collective>> = OnceLock::new();

/// Make `c` the process's collective (once; before any training). Errors if one is installed already.
pub fn install(c: Arc<dyn Collective>) -> Result<()> {
    CURRENT
        .set(c)
        .map_err(|_| Error::collective("install", "a collective is installed already"))
}

/// The installed collective, or [`Local`] when none was installed.
pub fn current() -> Arc<dyn Collective> {
    match CURRENT.get() {
        Some(c) => c.clone(),
        None => Arc::new(Local),
    }
}

/// World size of [`current`].
pub fn world_size() -> usize {
    CURRENT.get().map(|c| c.world_size()).unwrap_or(1)
}

/// Rank of [`current`].
pub fn rank() -> usize {
    CURRENT.get().map(|c| c.rank()).unwrap_or(0)
}

/// In-place mean over the ranks: sum, then divide by the world size.
pub fn all_reduce_mean_f32(c: &dyn Collective, buf: &mut [f32]) -> Result<()> {
    c.all_reduce_sum_f32(buf)?;
    let w = c.world_size();
    if w > 1 {
        let inv = w as f32;
        buf.iter_mut().for_each(|v| *v /= inv);
    }
    Ok(())
}

/// Differentiable sum of `x` over the ranks of [`current`] (identity at world size 1): forward all-reduces
/// the values, backward all-reduces the gradient. f32 or f64, any shape, CPU.
pub fn all_reduce_sum(x: &Tensor) -> candle_core::Result<Tensor> {
    if world_size() == 1 {
        return Ok(x.clone());
    }
    x.contiguous()?.apply_op1(AllReduceSum)
}

/// The op behind [`all_reduce_sum`].
struct AllReduceSum;

fn to_candle(e: Error) -> candle_core::Error {
    candle_core::Error::Msg(e.to_string())
}

impl CustomOp1 for AllReduceSum {
    fn name(&self) -> &'static str {
        "all-reduce-sum"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let c = current();
        let out = match s {
            CpuStorage::F32(v) => {
                let mut buf = strided_copy(v, l)?;
                c.all_reduce_sum_f32(&mut buf).map_err(to_candle)?;
                CpuStorage::F32(buf)
            }
            CpuStorage::F64(v) => {
                let mut buf = strided_copy(v, l)?;
                c.all_reduce_sum_f64(&mut buf).map_err(to_candle)?;
                CpuStorage::F64(buf)
            }
            _ => candle_core::bail!("all-reduce-sum: f32 or f64 tensors only"),
        };
        Ok((out, l.shape().clone()))
    }

    fn bwd(
        &self,
        _arg: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<Option<Tensor>> {
        // d(sum_r L_r)/dx_r = sum_r' dL_r'/dy: the gradient is all-reduced too.
        Ok(Some(grad.contiguous()?.apply_op1_no_bwd(&AllReduceSum)?))
    }
}

fn strided_copy<T: Copy>(v: &[T], l: &Layout) -> candle_core::Result<Vec<T>> {
    match l.contiguous_offsets() {
        Some((a, b)) => Ok(v[a..b].to_vec()),
        None => candle_core::bail!("all-reduce-sum: the input must be contiguous"),
    }
}

/// Sum a `DType::F64` count over the ranks (e.g. the global number of rows of a batch).
pub fn all_reduce_count(n: usize) -> Result<usize> {
    let c = current();
    let mut v = [n as f64];
    c.all_reduce_sum_f64(&mut v)?;
    Ok(v[0] as usize)
}

/// `dtype` is one the collectives carry (f32 or f64).
pub fn is_reducible(dtype: DType) -> bool {
    matches!(dtype, DType::F32 | DType::F64)
}
