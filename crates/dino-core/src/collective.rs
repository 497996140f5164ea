//! The collective seam of data-parallel training: what the loss (centre), the networks (SyncBatchNorm) and
//! the trainer (gradient averaging) need of a communication engine, as one trait with a [`Local`] backend
//! (world size 1, no dependency). Engines (MPI in dino-train's `mpi` feature, NCCL in its `nccl` feature)
//! implement [`Collective`] and are [`install`]ed once per process, as `torch.distributed.init_process_group`
//! does; a device engine built on an installed one (NCCL, once the GPU is known) takes its place with
//! [`upgrade`]. [`current`] returns the installed one (or [`Local`]).
//!
//! Host buffers go through `all_reduce_sum_f32` / `_f64`; tensors on any device through
//! [`Collective::all_reduce_sum_tensor`] (by default a copy through host memory; NCCL reduces in GPU memory).
//! [`all_reduce_sum`] is the differentiable tensor form: forward sums a tensor over the ranks, backward sums
//! the gradient over the ranks (the gradient of `sum_r L_r` through an all-reduce). With it, statistics over
//! the global batch (SyncBatchNorm's mean and variance) get exact gradients, on the CPU and on a GPU.
//!
//! Every rank must issue the same collectives in the same order; all calls are blocking.

use std::sync::{Arc, RwLock};

use candle_core::{CpuStorage, CustomOp2, DType, Device, Layout, Shape, Tensor};

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
    /// Element-wise sum over the ranks of an f32 or f64 tensor on any device: a new contiguous tensor of the
    /// same shape on the same device. By default through host memory and `all_reduce_sum_f32` / `_f64`
    /// ([`host_all_reduce_sum`]); a device engine reduces in device memory.
    fn all_reduce_sum_tensor(&self, x: &Tensor) -> Result<Tensor> {
        host_all_reduce_sum(self, x)
    }
}

/// [`Collective::all_reduce_sum_tensor`] through host memory: the tensor is copied to the host, summed with
/// `c`'s host all-reduce and copied back to its device.
pub fn host_all_reduce_sum<C: Collective + ?Sized>(c: &C, x: &Tensor) -> Result<Tensor> {
    let host = x.to_device(&Device::Cpu)?.flatten_all()?;
    let summed = match x.dtype() {
        DType::F32 => {
            let mut buf = host.to_vec1::<f32>()?;
            c.all_reduce_sum_f32(&mut buf)?;
            Tensor::from_vec(buf, x.shape(), &Device::Cpu)?
        }
        DType::F64 => {
            let mut buf = host.to_vec1::<f64>()?;
            c.all_reduce_sum_f64(&mut buf)?;
            Tensor::from_vec(buf, x.shape(), &Device::Cpu)?
        }
        other => {
            return Err(Error::collective(
                "all_reduce",
                format!("f32 or f64 tensors only, got {other:?}"),
            ))
        }
    };
    Ok(summed.to_device(x.device())?)
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

static CURRENT: RwLock<Option<Arc<dyn Collective>>> = RwLock::new(None);

fn installed() -> Option<Arc<dyn Collective>> {
    // A poisoned lock only means a panic elsewhere while it was held; the Option inside is still whole.
    CURRENT.read().unwrap_or_else(|e| e.into_inner()).clone()
}

/// Make `c` the process's collective (once; before any training). Errors if one is installed already.
pub fn install(c: Arc<dyn Collective>) -> Result<()> {
    let mut slot = CURRENT.write().unwrap_or_else(|e| e.into_inner());
    if slot.is_some() {
        return Err(Error::collective(
            "install",
            "a collective is installed already",
        ));
    }
    *slot = Some(c);
    Ok(())
}

/// Replace the installed collective by `c`, an engine of the same group built on it (NCCL over the MPI
/// world, once the run's GPU is known); before any training. Errors when none is installed or when `c`'s
/// rank or world size differ from the installed one's.
pub fn upgrade(c: Arc<dyn Collective>) -> Result<()> {
    let mut slot = CURRENT.write().unwrap_or_else(|e| e.into_inner());
    let Some(old) = slot.as_ref() else {
        return Err(Error::collective(
            "upgrade",
            format!("no collective is installed for {} to replace", c.name()),
        ));
    };
    if (old.rank(), old.world_size()) != (c.rank(), c.world_size()) {
        return Err(Error::collective(
            "upgrade",
            format!(
                "{} is rank {} of {}, the installed {} rank {} of {}",
                c.name(),
                c.rank(),
                c.world_size(),
                old.name(),
                old.rank(),
                old.world_size()
            ),
        ));
    }
    *slot = Some(c);
    Ok(())
}

/// The installed collective, or [`Local`] when none was installed.
pub fn current() -> Arc<dyn Collective> {
    installed().unwrap_or_else(|| Arc::new(Local))
}

/// World size of [`current`].
pub fn world_size() -> usize {
    installed().map(|c| c.world_size()).unwrap_or(1)
}

/// Rank of [`current`].
pub fn rank() -> usize {
    installed().map(|c| c.rank()).unwrap_or(0)
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
/// the values, backward all-reduces the gradient. f32 or f64, any shape, any device.
pub fn all_reduce_sum(x: &Tensor) -> candle_core::Result<Tensor> {
    if world_size() == 1 {
        return Ok(x.clone());
    }
    all_reduce_sum_with(current(), x)
}

/// [`all_reduce_sum`] over the ranks of `c` (forward now, backward when the gradient is computed).
pub fn all_reduce_sum_with(c: Arc<dyn Collective>, x: &Tensor) -> candle_core::Result<Tensor> {
    let summed = c.all_reduce_sum_tensor(&x.detach()).map_err(to_candle)?;
    // The values are `summed`'s; the op gives `x` the all-reduced gradient.
    x.apply_op2(&summed, SumOverRanks(c))
}

/// The op behind [`all_reduce_sum`]: forward returns its second argument (the sum over the ranks, already
/// computed), backward all-reduces the gradient into the first.
struct SumOverRanks(Arc<dyn Collective>);

fn to_candle(e: Error) -> candle_core::Error {
    candle_core::Error::Msg(e.to_string())
}

fn clone_contiguous<S: candle_core::backend::BackendStorage>(
    s: &S,
    l: &Layout,
) -> candle_core::Result<(S, Shape)> {
    match l.contiguous_offsets() {
        Some((0, n)) if n == l.shape().elem_count() => Ok((s.try_clone(l)?, l.shape().clone())),
        _ => candle_core::bail!(
            "all-reduce-sum: the sum over the ranks must be a fresh contiguous tensor"
        ),
    }
}

impl CustomOp2 for SumOverRanks {
    fn name(&self) -> &'static str {
        "all-reduce-sum"
    }

    fn cpu_fwd(
        &self,
        _s1: &CpuStorage,
        _l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        clone_contiguous(s2, l2)
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        _s1: &candle_core::CudaStorage,
        _l1: &Layout,
        s2: &candle_core::CudaStorage,
        l2: &Layout,
    ) -> candle_core::Result<(candle_core::CudaStorage, Shape)> {
        clone_contiguous(s2, l2)
    }

    fn bwd(
        &self,
        _arg1: &Tensor,
        _arg2: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        // d(sum_r L_r)/dx_r = sum_r' dL_r'/dy: the gradient is all-reduced too.
        let g = self
            .0
            .all_reduce_sum_tensor(&grad.contiguous()?)
            .map_err(to_candle)?;
        Ok((Some(g), None))
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

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Var;

    /// Rank 0 of a world of 2 whose other rank holds `other` in every buffer it reduces.
    struct WithOther(Vec<f64>);

    impl Collective for WithOther {
        fn name(&self) -> &'static str {
            "test"
        }
        fn rank(&self) -> usize {
            0
        }
        fn world_size(&self) -> usize {
            2
        }
        fn local_rank(&self) -> usize {
            0
        }
        fn local_size(&self) -> usize {
            2
        }
        fn all_reduce_sum_f32(&self, buf: &mut [f32]) -> Result<()> {
            assert_eq!(buf.len(), self.0.len());
            buf.iter_mut()
                .zip(&self.0)
                .for_each(|(b, o)| *b += *o as f32);
            Ok(())
        }
        fn all_reduce_sum_f64(&self, buf: &mut [f64]) -> Result<()> {
            assert_eq!(buf.len(), self.0.len());
            buf.iter_mut().zip(&self.0).for_each(|(b, o)| *b += o);
            Ok(())
        }
        fn broadcast_bytes(&self, _buf: &mut Vec<u8>, _root: usize) -> Result<()> {
            Ok(())
        }
        fn barrier(&self) -> Result<()> {
            Ok(())
        }
        fn abort(&self, code: i32) -> ! {
            std::process::exit(code)
        }
    }

    #[test]
    fn the_sum_goes_forward_and_the_gradient_backward_over_the_ranks() -> candle_core::Result<()> {
        let other = vec![10.0, 20.0, 30.0, 40.0];
        let c: Arc<dyn Collective> = Arc::new(WithOther(other.clone()));
        for dtype in [DType::F32, DType::F64] {
            let x = Var::from_tensor(
                &Tensor::new(&[[1.0f64, 2.0], [3.0, 4.0]], &Device::Cpu)?.to_dtype(dtype)?,
            )?;
            // A transposed (strided) input: the sum is taken over the logical order.
            let y = all_reduce_sum_with(c.clone(), &x.t()?)?;
            assert_eq!(
                y.to_dtype(DType::F64)?.to_vec2::<f64>()?,
                [[11.0, 23.0], [32.0, 44.0]]
            );
            // loss = sum(y * w): dL/dy = w, all-reduced over the ranks, then transposed back onto x.
            let w = Tensor::new(&[[1.0f64, -1.0], [0.5, 2.0]], &Device::Cpu)?.to_dtype(dtype)?;
            let grads = (y * w)?.sum_all()?.backward()?;
            let g = grads.get(x.as_tensor()).expect("x has a gradient");
            assert_eq!(
                g.to_dtype(DType::F64)?.to_vec2::<f64>()?,
                [[11.0, 30.5], [19.0, 42.0]]
            );
        }
        Ok(())
    }

    #[test]
    fn only_floats_are_reduced_and_upgrade_needs_an_installed_group() {
        let c = WithOther(vec![0.0; 2]);
        let x = Tensor::new(&[1u32, 2], &Device::Cpu).unwrap();
        let e = c.all_reduce_sum_tensor(&x).unwrap_err().to_string();
        assert!(e.contains("f32 or f64 tensors only, got U32"), "{e}");
        // Nothing is installed in this test binary: there is nothing to upgrade.
        let e = upgrade(Arc::new(WithOther(vec![])))
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("no collective is installed for test to replace"),
            "{e}"
        );
        assert_eq!(world_size(), 1);
    }
}
