//! Train-mode BatchNorm as one CPU op with an analytic backward (the fast path of
//! `dino_models::resnet::BatchNorm2d`; its portable path is composed from candle ops in the model). The
//! per-channel sums of a data-parallel run (SyncBatchNorm) go through a caller-given [`SumReducer`], so this
//! crate knows nothing about ranks.

use std::sync::Arc;

use candle_core::{CpuStorage, CustomOp3, DType, Layout, Result, Shape, Tensor, WithDType};

use crate::conv::par_chunks;

/// Sums per-channel partial sums over the ranks of a data-parallel run in place (SyncBatchNorm's
/// all-reduce); `None` for one process.
pub type SumReducer = Arc<dyn Fn(&mut [f64]) -> Result<()> + Send + Sync>;

/// Per-channel `(mean, biased variance)` of a contiguous `(B, C, HW)` buffer, two-pass in f64, channels
/// spread over all cores. `n_all` is the number of values per channel over every rank: when it exceeds this
/// buffer's `B * HW`, each pass's per-channel sums are all-reduced (SyncBatchNorm).
fn channel_stats<T: WithDType>(
    x: &[T],
    b: usize,
    c: usize,
    hw: usize,
    n_all: usize,
    reduce: Option<&SumReducer>,
) -> Result<Vec<(f64, f64)>> {
    let sync = n_all != b * hw;
    let n = n_all as f64;
    let planes = |ci: usize| (0..b).map(move |bi| &x[(bi * c + ci) * hw..(bi * c + ci + 1) * hw]);
    let mut sums = vec![0.0f64; c];
    par_chunks(&mut sums, 1, |ci, slot| {
        slot[0] = planes(ci)
            .map(|p| p.iter().map(|v| v.to_f64()).sum::<f64>())
            .sum::<f64>();
    });
    if sync {
        all_reduce(reduce, &mut sums)?;
    }
    let mean: Vec<f64> = sums.iter().map(|s| s / n).collect();
    let mut sq = vec![0.0f64; c];
    par_chunks(&mut sq, 1, |ci, slot| {
        let m = mean[ci];
        slot[0] = planes(ci)
            .map(|p| p.iter().map(|v| (v.to_f64() - m).powi(2)).sum::<f64>())
            .sum::<f64>();
    });
    if sync {
        all_reduce(reduce, &mut sq)?;
    }
    Ok(mean.into_iter().zip(sq).map(|(m, q)| (m, q / n)).collect())
}

fn all_reduce(reduce: Option<&SumReducer>, sums: &mut [f64]) -> Result<()> {
    match reduce {
        Some(r) => r(sums),
        None => candle_core::bail!(
            "dino-batch-norm-train: statistics span several ranks but no reducer was given"
        ),
    }
}

/// Train-mode BatchNorm `y = (x - mean) * inv_std * weight + bias` on CPU with an analytic backward; the
/// batch statistics are computed beforehand (they also feed the running statistics).
pub(crate) struct BatchNormTrainOp {
    mean: Vec<f64>,
    inv_std: Vec<f64>,
    /// Values per channel over every rank (the local `B * HW` outside data parallelism).
    n_all: usize,
    /// The all-reduce of the backward pass's per-channel sums when `n_all` spans several ranks.
    reduce: Option<SumReducer>,
}

impl BatchNormTrainOp {
    fn fwd<T: WithDType>(&self, x: &[T], w: &[T], bias: &[T], c: usize, hw: usize) -> Vec<T> {
        let mut y = x.to_vec();
        let scale: Vec<f64> = (0..c).map(|ci| self.inv_std[ci] * w[ci].to_f64()).collect();
        let shift: Vec<f64> = (0..c)
            .map(|ci| bias[ci].to_f64() - self.mean[ci] * scale[ci])
            .collect();
        par_chunks(&mut y, c * hw, |_, img| {
            for (ci, plane) in img.chunks_mut(hw).enumerate() {
                let (sc, sh) = (scale[ci], shift[ci]);
                for v in plane.iter_mut() {
                    *v = T::from_f64(v.to_f64() * sc + sh);
                }
            }
        });
        y
    }

    /// `(dx, dweight, dbias)` for upstream gradient `g`.
    fn bwd_impl<T: WithDType>(
        &self,
        x: &[T],
        w: &[T],
        g: &[T],
        b: usize,
        c: usize,
        hw: usize,
    ) -> Result<(Vec<T>, Vec<T>, Vec<T>)> {
        // Per channel: sum(g) and sum(g * xhat).
        let mut sums = vec![(0.0f64, 0.0f64); c];
        par_chunks(&mut sums, 1, |ci, slot| {
            let (m, is) = (self.mean[ci], self.inv_std[ci]);
            let (mut sg, mut sgx) = (0.0, 0.0);
            for bi in 0..b {
                let r = (bi * c + ci) * hw..(bi * c + ci + 1) * hw;
                for (xv, gv) in x[r.clone()].iter().zip(&g[r]) {
                    let gv = gv.to_f64();
                    sg += gv;
                    sgx += gv * (xv.to_f64() - m) * is;
                }
            }
            slot[0] = (sg, sgx);
        });
        // The weight and bias gradients are this rank's (the trainer averages them); dx needs the sums
        // over the global batch (SyncBatchNorm's all-reduce of sum_dy and sum_dy_xmu).
        let dw = sums.iter().map(|s| T::from_f64(s.1)).collect();
        let db = sums.iter().map(|s| T::from_f64(s.0)).collect();
        if self.n_all != b * hw {
            let mut flat: Vec<f64> = sums.iter().flat_map(|s| [s.0, s.1]).collect();
            all_reduce(self.reduce.as_ref(), &mut flat)?;
            for (ci, s) in sums.iter_mut().enumerate() {
                *s = (flat[2 * ci], flat[2 * ci + 1]);
            }
        }
        let n = self.n_all as f64;
        let mut dx = vec![T::zero(); x.len()];
        par_chunks(&mut dx, c * hw, |bi, img| {
            for (ci, plane) in img.chunks_mut(hw).enumerate() {
                let (m, is) = (self.mean[ci], self.inv_std[ci]);
                let (sg, sgx) = sums[ci];
                let k = w[ci].to_f64() * is / n;
                let off = (bi * c + ci) * hw;
                for (i, d) in plane.iter_mut().enumerate() {
                    let xhat = (x[off + i].to_f64() - m) * is;
                    *d = T::from_f64(k * (n * g[off + i].to_f64() - sg - xhat * sgx));
                }
            }
        });
        Ok((dx, dw, db))
    }
}

impl CustomOp3 for BatchNormTrainOp {
    fn name(&self) -> &'static str {
        "dino-batch-norm-train"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (_, c, h, w) = l1.shape().dims4()?;
        let range = |l: &Layout| {
            l.contiguous_offsets().ok_or_else(|| {
                candle_core::Error::Msg("dino-batch-norm-train: inputs must be contiguous".into())
            })
        };
        let ((a1, e1), (a2, e2), (a3, e3)) = (range(l1)?, range(l2)?, range(l3)?);
        let out = match (s1, s2, s3) {
            (CpuStorage::F32(x), CpuStorage::F32(wt), CpuStorage::F32(bs)) => {
                CpuStorage::F32(self.fwd(&x[a1..e1], &wt[a2..e2], &bs[a3..e3], c, h * w))
            }
            (CpuStorage::F64(x), CpuStorage::F64(wt), CpuStorage::F64(bs)) => {
                CpuStorage::F64(self.fwd(&x[a1..e1], &wt[a2..e2], &bs[a3..e3], c, h * w))
            }
            _ => candle_core::bail!(
                "dino-batch-norm-train: x, weight and bias must all be f32 or all f64"
            ),
        };
        Ok((out, l1.shape().clone()))
    }

    fn bwd(
        &self,
        x: &Tensor,
        weight: &Tensor,
        _bias: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let (b, c, h, w) = x.dims4()?;
        let dev = x.device();
        let (dx, dw, db) = match x.dtype() {
            DType::F32 => {
                let (dx, dw, db) = self.bwd_impl(
                    &x.flatten_all()?.to_vec1::<f32>()?,
                    &weight.to_vec1::<f32>()?,
                    &grad.flatten_all()?.to_vec1::<f32>()?,
                    b,
                    c,
                    h * w,
                )?;
                (
                    Tensor::from_vec(dx, x.shape(), dev)?,
                    Tensor::new(dw, dev)?,
                    Tensor::new(db, dev)?,
                )
            }
            DType::F64 => {
                let (dx, dw, db) = self.bwd_impl(
                    &x.flatten_all()?.to_vec1::<f64>()?,
                    &weight.to_vec1::<f64>()?,
                    &grad.flatten_all()?.to_vec1::<f64>()?,
                    b,
                    c,
                    h * w,
                )?;
                (
                    Tensor::from_vec(dx, x.shape(), dev)?,
                    Tensor::new(dw, dev)?,
                    Tensor::new(db, dev)?,
                )
            }
            dt => candle_core::bail!("dino-batch-norm-train backward: unsupported dtype {dt:?}"),
        };
        Ok((Some(dx), Some(dw), Some(db)))
    }
}

/// Train-mode BatchNorm on `(B, C, H, W)` f32/f64 CPU tensors: `(y, per-channel mean, per-channel biased
/// variance)`, the statistics over `n_all` values per channel (every rank's; `reduce` sums the partial sums
/// when that exceeds this process's `B * H * W`). Gradients flow to `x`, `weight` and `bias`.
pub fn batch_norm_train(
    x: &Tensor,
    weight: &Tensor,
    bias: &Tensor,
    eps: f64,
    n_all: usize,
    reduce: Option<SumReducer>,
) -> Result<(Tensor, Vec<f64>, Vec<f64>)> {
    let (b, c, h, w) = x.dims4()?;
    let x = x.contiguous()?;
    let stats = match x.dtype() {
        DType::F32 => channel_stats(
            &x.flatten_all()?.to_vec1::<f32>()?,
            b,
            c,
            h * w,
            n_all,
            reduce.as_ref(),
        )?,
        _ => channel_stats(
            &x.flatten_all()?.to_vec1::<f64>()?,
            b,
            c,
            h * w,
            n_all,
            reduce.as_ref(),
        )?,
    };
    let mean: Vec<f64> = stats.iter().map(|s| s.0).collect();
    let var: Vec<f64> = stats.iter().map(|s| s.1).collect();
    let inv_std = var.iter().map(|v| 1.0 / (v + eps).sqrt()).collect();
    let op = BatchNormTrainOp {
        mean: mean.clone(),
        inv_std,
        n_all,
        reduce,
    };
    let y = x.apply_op3_arc(weight, bias, Arc::new(Box::new(op)))?;
    Ok((y, mean, var))
}

/// Whether [`batch_norm_train`] serves these tensors: the CPU fast path with f32 or f64 throughout.
pub fn batch_norm_train_applies(x: &Tensor, weight: &Tensor, bias: &Tensor) -> bool {
    crate::dispatch::cpu_fast_path(&[x])
        && matches!(x.dtype(), DType::F32 | DType::F64)
        && weight.dtype() == x.dtype()
        && bias.dtype() == x.dtype()
}
