//! Max-pool with PyTorch's semantics and a correct backward (candle 0.11.1's `max_pool2d` backward is wrong):
//! on the CPU fast path a custom op that routes the gradient to the first maximum of each window, as PyTorch
//! does; on the portable path composed from padded strided views and `maximum` (any device).

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp1, DType, Layout, Result, Shape, Tensor, WithDType};

use crate::conv::par_chunks;

// ---------------------------------------------------------------------------------------------------------
// Max-pool with a correct backward
// ---------------------------------------------------------------------------------------------------------

/// PyTorch's output size for a pooling window (`ceil_mode=False`, dilation 1).
fn pool_out(size: usize, kernel: usize, stride: usize, padding: usize) -> Result<usize> {
    if size + 2 * padding < kernel {
        candle_core::bail!(
            "max_pool2d: input size {size} with padding {padding} is smaller than the kernel {kernel}"
        )
    }
    Ok((size + 2 * padding - kernel) / stride + 1)
}

fn check_pool_args(
    x: &Tensor,
    kernel: usize,
    stride: usize,
    padding: usize,
) -> Result<(usize, usize)> {
    if kernel == 0 || stride == 0 {
        candle_core::bail!("max_pool2d: kernel ({kernel}) and stride ({stride}) must be >= 1")
    }
    if 2 * padding > kernel {
        candle_core::bail!(
            "max_pool2d: padding ({padding}) must be at most half the kernel ({kernel})"
        )
    }
    let (_, _, h, w) = x.dims4().map_err(|_| {
        candle_core::Error::Msg(format!(
            "max_pool2d expects a (B, C, H, W) input, got {:?}",
            x.dims()
        ))
    })?;
    Ok((
        pool_out(h, kernel, stride, padding)?,
        pool_out(w, kernel, stride, padding)?,
    ))
}

/// CPU max-pool with an analytic backward (first maximum of each window wins, as in PyTorch).
struct MaxPool2dOp {
    kernel: usize,
    stride: usize,
    padding: usize,
}

impl MaxPool2dOp {
    /// For each output position, the flat input index of the window's first maximum (`usize::MAX` when
    /// the whole window is padding, which cannot happen with `padding <= kernel / 2`).
    fn argmax<T: WithDType>(
        &self,
        x: &[T],
        (b, c, h, w): (usize, usize, usize, usize),
    ) -> Result<Vec<usize>> {
        let (ho, wo) = (
            pool_out(h, self.kernel, self.stride, self.padding)?,
            pool_out(w, self.kernel, self.stride, self.padding)?,
        );
        let mut idx = vec![usize::MAX; b * c * ho * wo];
        par_chunks(&mut idx, ho * wo, |plane, out| {
            let base = plane * h * w;
            for oy in 0..ho {
                for ox in 0..wo {
                    let mut best = usize::MAX;
                    let mut best_v = T::zero();
                    for ky in 0..self.kernel {
                        let iy = (oy * self.stride + ky) as isize - self.padding as isize;
                        if iy < 0 || iy >= h as isize {
                            continue;
                        }
                        for kx in 0..self.kernel {
                            let ix = (ox * self.stride + kx) as isize - self.padding as isize;
                            if ix < 0 || ix >= w as isize {
                                continue;
                            }
                            let i = base + iy as usize * w + ix as usize;
                            let v = x[i];
                            // PyTorch: `(val > maxval) || isnan(val)`; NaN compares unequal to itself.
                            #[allow(clippy::eq_op)]
                            let is_nan = v != v;
                            if best == usize::MAX || v > best_v || is_nan {
                                best = i;
                                best_v = v;
                            }
                        }
                    }
                    out[oy * wo + ox] = best;
                }
            }
        });
        Ok(idx)
    }

    /// `gx[argmax[o]] += g[o]`, one image plane per task.
    fn scatter<T: WithDType>(
        &self,
        gx: &mut [T],
        idx: &[usize],
        g: &[T],
        (b, c, h, w): (usize, usize, usize, usize),
    ) {
        let per_out = idx.len() / (b * c).max(1);
        par_chunks(gx, h * w, |plane, gplane| {
            let base = plane * h * w;
            let r = plane * per_out..(plane + 1) * per_out;
            for (&i, &gv) in idx[r.clone()].iter().zip(&g[r]) {
                if i != usize::MAX {
                    gplane[i - base] += gv;
                }
            }
        });
    }

    fn fwd<T: WithDType>(&self, x: &[T], dims: (usize, usize, usize, usize)) -> Result<Vec<T>> {
        let idx = self.argmax(x, dims)?;
        Ok(idx
            .iter()
            .map(|&i| if i == usize::MAX { T::zero() } else { x[i] })
            .collect())
    }
}

impl CustomOp1 for MaxPool2dOp {
    fn name(&self) -> &'static str {
        "dino-max-pool2d"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> Result<(CpuStorage, Shape)> {
        let dims = layout.shape().dims4()?;
        let (b, c, h, w) = dims;
        let (ho, wo) = (
            pool_out(h, self.kernel, self.stride, self.padding)?,
            pool_out(w, self.kernel, self.stride, self.padding)?,
        );
        let (start, end) = layout.contiguous_offsets().ok_or_else(|| {
            candle_core::Error::Msg("dino-max-pool2d: input must be contiguous".into())
        })?;
        let out = match storage {
            CpuStorage::F32(v) => CpuStorage::F32(self.fwd(&v[start..end], dims)?),
            CpuStorage::F64(v) => CpuStorage::F64(self.fwd(&v[start..end], dims)?),
            s => candle_core::bail!("dino-max-pool2d: unsupported dtype {:?}", s.dtype()),
        };
        Ok((out, Shape::from((b, c, ho, wo))))
    }

    fn bwd(&self, arg: &Tensor, _res: &Tensor, grad_res: &Tensor) -> Result<Option<Tensor>> {
        let dims = arg.dims4()?;
        let n = arg.elem_count();
        let grad = match arg.dtype() {
            DType::F32 => {
                let x = arg.flatten_all()?.to_vec1::<f32>()?;
                let g = grad_res.flatten_all()?.to_vec1::<f32>()?;
                let mut gx = vec![0f32; n];
                self.scatter(&mut gx, &self.argmax(&x, dims)?, &g, dims);
                Tensor::from_vec(gx, arg.shape(), arg.device())?
            }
            DType::F64 => {
                let x = arg.flatten_all()?.to_vec1::<f64>()?;
                let g = grad_res.flatten_all()?.to_vec1::<f64>()?;
                let mut gx = vec![0f64; n];
                self.scatter(&mut gx, &self.argmax(&x, dims)?, &g, dims);
                Tensor::from_vec(gx, arg.shape(), arg.device())?
            }
            dt => candle_core::bail!("dino-max-pool2d backward: unsupported dtype {dt:?}"),
        };
        Ok(Some(grad))
    }
}

/// Max-pool composed from `-inf` padding, `kernel * kernel` strided views and `maximum`: works on every
/// device and dtype, and its gradient is correct (ties between equal values split the gradient, which
/// only differs from PyTorch on exact ties).
pub fn max_pool2d_composed(
    x: &Tensor,
    kernel: usize,
    stride: usize,
    padding: usize,
) -> Result<Tensor> {
    let (ho, wo) = check_pool_args(x, kernel, stride, padding)?;
    let (b, c, h, w) = x.dims4()?;
    // Pad to exactly the extent the strided views need: `(k - 1) + stride * out` per side.
    let need_h = kernel - 1 + stride * ho;
    let need_w = kernel - 1 + stride * wo;
    let neg = |rows: usize, cols: usize| {
        Tensor::full(f64::NEG_INFINITY, (b, c, rows, cols), x.device())?.to_dtype(x.dtype())
    };
    let mut p = x.clone();
    let (top, bottom) = (padding, need_h.saturating_sub(h + padding));
    if top > 0 || bottom > 0 {
        let mut parts = vec![];
        if top > 0 {
            parts.push(neg(top, w)?);
        }
        parts.push(p.clone());
        if bottom > 0 {
            parts.push(neg(bottom, w)?);
        }
        p = Tensor::cat(&parts, 2)?;
    }
    let hp = p.dim(2)?;
    let (left, right) = (padding, need_w.saturating_sub(w + padding));
    if left > 0 || right > 0 {
        let mut parts = vec![];
        if left > 0 {
            parts.push(neg(hp, left)?);
        }
        parts.push(p.clone());
        if right > 0 {
            parts.push(neg(hp, right)?);
        }
        p = Tensor::cat(&parts, 3)?;
    }
    // The window's values, one strided view per kernel offset, in PyTorch's scan order (row-major).
    let mut views = Vec::with_capacity(kernel * kernel);
    for ky in 0..kernel {
        // rows ky, ky + stride, ..., ky + stride * (ho - 1)
        let rows = p
            .narrow(2, ky, stride * ho)?
            .reshape((b, c, ho, stride, p.dim(3)?))?
            .narrow(3, 0, 1)?
            .squeeze(3)?;
        for kx in 0..kernel {
            views.push(
                rows.narrow(3, kx, stride * wo)?
                    .reshape((b, c, ho, wo, stride))?
                    .narrow(4, 0, 1)?
                    .squeeze(4)?,
            );
        }
    }
    let detached: Vec<Tensor> = views.iter().map(|v| v.detach()).collect();
    let mut max = detached
        .first()
        .cloned()
        .ok_or_else(|| candle_core::Error::Msg("max_pool2d: empty kernel".into()))?;
    for v in &detached[1..] {
        max = max.maximum(v)?;
    }
    // The output is the window's FIRST maximum, selected with `where_cond`: its gradient goes to that one
    // element, as PyTorch's (candle's `maximum` would split it between tied elements).
    let mut out = Tensor::zeros_like(&max)?;
    let mut taken = Tensor::zeros(max.shape(), DType::U8, max.device())?;
    for (v, d) in views.iter().zip(&detached) {
        let first = d.eq(&max)?.gt(&taken)?;
        out = first.where_cond(v, &out)?;
        taken = taken.maximum(&first)?;
    }
    Ok(out)
}

/// `(B, C, H, W) -> (B, C, Ho, Wo)` max-pool with PyTorch's semantics (`ceil_mode=False`, implicit `-inf`
/// padding) and a correct backward. CPU f32/f64 use a custom op (gradient to the first maximum, as
/// PyTorch); other devices and dtypes use [`max_pool2d_composed`].
pub fn max_pool2d(x: &Tensor, kernel: usize, stride: usize, padding: usize) -> Result<Tensor> {
    check_pool_args(x, kernel, stride, padding)?;
    let fast = crate::dispatch::cpu_fast_path(&[x]) && matches!(x.dtype(), DType::F32 | DType::F64);
    if fast {
        x.contiguous()?
            .apply_op1_arc(std::sync::Arc::new(Box::new(MaxPool2dOp {
                kernel,
                stride,
                padding,
            })))
    } else {
        max_pool2d_composed(x, kernel, stride, padding)
    }
}
