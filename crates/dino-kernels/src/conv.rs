//! 2-D convolution whose CPU forward is im2col + one GEMM and whose backward is two GEMMs + col2im (candle's
//! own CPU conv2d backward runs a direct `conv_transpose2d` loop, about 3x slower, and fails on non-square
//! inputs whose height and width differ in parity under stride 2). The portable path is candle's `conv2d`.

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp3, DType, Layout, Result, Shape, Tensor, WithDType};

// ---------------------------------------------------------------------------------------------------------
// Convolution
// ---------------------------------------------------------------------------------------------------------

/// Geometry of one convolution call.
#[derive(Debug, Clone, Copy)]
struct ConvGeom {
    b: usize,
    c: usize,
    h: usize,
    w: usize,
    k: usize,
    stride: usize,
    padding: usize,
    ho: usize,
    wo: usize,
}

impl ConvGeom {
    fn new(x: &Tensor, weight: &Tensor, stride: usize, padding: usize) -> Result<Self> {
        let (b, c, h, w) = x.dims4()?;
        let (_, c_w, k, k2) = weight.dims4()?;
        if c_w != c || k != k2 {
            candle_core::bail!(
                "conv2d: input {:?} does not fit kernel {:?}",
                x.dims(),
                weight.dims()
            )
        }
        if h + 2 * padding < k || w + 2 * padding < k {
            candle_core::bail!(
                "conv2d: input {:?} (padding {padding}) is smaller than the kernel {k}x{k}",
                x.dims()
            )
        }
        let ho = (h + 2 * padding - k) / stride + 1;
        let wo = (w + 2 * padding - k) / stride + 1;
        Ok(Self {
            b,
            c,
            h,
            w,
            k,
            stride,
            padding,
            ho,
            wo,
        })
    }

    /// Columns per output position: `c * k * k`.
    fn ckk(&self) -> usize {
        self.c * self.k * self.k
    }

    /// `true` when im2col is a plain transpose (1x1 kernel, stride 1, no padding).
    fn is_pointwise(&self) -> bool {
        self.k == 1 && self.stride == 1 && self.padding == 0
    }
}

/// Runs `f(i, chunk)` over the `per`-sized chunks of `out` on all cores (one task per thread of rayon's pool;
/// scoped OS threads started per call before, i.e. per convolution of every step).
pub(crate) fn par_chunks<T: Send>(out: &mut [T], per: usize, f: impl Fn(usize, &mut [T]) + Sync) {
    let n = out.len() / per.max(1);
    let threads = rayon::current_num_threads().max(1).min(n.max(1));
    if threads <= 1 {
        for (i, chunk) in out.chunks_mut(per).enumerate() {
            f(i, chunk);
        }
        return;
    }
    let per_thread = n.div_ceil(threads);
    rayon::scope(|scope| {
        for (t, group) in out.chunks_mut(per * per_thread).enumerate() {
            let f = &f;
            scope.spawn(move |_| {
                for (j, chunk) in group.chunks_mut(per).enumerate() {
                    f(t * per_thread + j, chunk);
                }
            });
        }
    });
}

/// For kernel column `kx`: the output columns `ox` in `[lo, hi)` whose input column `ox*s + kx - p` is
/// inside the image.
fn ox_range(g: &ConvGeom, kx: usize) -> (usize, usize) {
    let lo = g.padding.saturating_sub(kx).div_ceil(g.stride);
    let hi = if g.w + g.padding > kx {
        ((g.w + g.padding - kx - 1) / g.stride + 1).min(g.wo)
    } else {
        0
    };
    (lo, hi)
}

/// The input row of output row `oy` and kernel row `ky`, if inside the image.
fn input_row(g: &ConvGeom, oy: usize, ky: usize) -> Option<usize> {
    let iy = (oy * g.stride + ky).checked_sub(g.padding)?;
    (iy < g.h).then_some(iy)
}

/// `x (B, C, H, W)` -> columns `(C*k*k, B*Ho*Wo)`: row `(c, ky, kx)`, column `(b, oy, ox)`, zero padding.
fn im2col<T: WithDType>(x: &[T], g: &ConvGeom) -> Vec<T> {
    let (kk, p, hw) = (g.k * g.k, g.ho * g.wo, g.h * g.w);
    let bp = g.b * p;
    let mut cols = vec![T::zero(); g.ckk() * bp];
    par_chunks(&mut cols, kk * bp, |ci, out| {
        for ky in 0..g.k {
            for kx in 0..g.k {
                let (lo, hi) = ox_range(g, kx);
                let row = &mut out[(ky * g.k + kx) * bp..(ky * g.k + kx + 1) * bp];
                for bi in 0..g.b {
                    let plane = &x[(bi * g.c + ci) * hw..(bi * g.c + ci + 1) * hw];
                    for oy in 0..g.ho {
                        let Some(iy) = input_row(g, oy, ky) else {
                            continue;
                        };
                        let src = &plane[iy * g.w..(iy + 1) * g.w];
                        let dst = &mut row[bi * p + oy * g.wo..bi * p + (oy + 1) * g.wo];
                        if g.stride == 1 {
                            dst[lo..hi]
                                .copy_from_slice(&src[lo + kx - g.padding..hi + kx - g.padding]);
                        } else {
                            for ox in lo..hi {
                                dst[ox] = src[ox * g.stride + kx - g.padding];
                            }
                        }
                    }
                }
            }
        }
    });
    cols
}

/// Adjoint of [`im2col`]: columns `(C*k*k, B*Ho*Wo)` -> `dx` laid out `(C, B, H, W)`, summing overlaps.
fn col2im<T: WithDType>(cols: &[T], g: &ConvGeom) -> Vec<T> {
    let (kk, p, hw) = (g.k * g.k, g.ho * g.wo, g.h * g.w);
    let bp = g.b * p;
    let mut dx = vec![T::zero(); g.c * g.b * hw];
    par_chunks(&mut dx, g.b * hw, |ci, out| {
        let rows = &cols[ci * kk * bp..(ci + 1) * kk * bp];
        for ky in 0..g.k {
            for kx in 0..g.k {
                let (lo, hi) = ox_range(g, kx);
                let row = &rows[(ky * g.k + kx) * bp..(ky * g.k + kx + 1) * bp];
                for bi in 0..g.b {
                    let plane = &mut out[bi * hw..(bi + 1) * hw];
                    for oy in 0..g.ho {
                        let Some(iy) = input_row(g, oy, ky) else {
                            continue;
                        };
                        let dst = &mut plane[iy * g.w..(iy + 1) * g.w];
                        let src = &row[bi * p + oy * g.wo..bi * p + (oy + 1) * g.wo];
                        for ox in lo..hi {
                            dst[ox * g.stride + kx - g.padding] += src[ox];
                        }
                    }
                }
            }
        }
    });
    dx
}

/// `(B, C, H, W)` -> columns `(C*k*k, B*Ho*Wo)` as a tensor.
fn columns(x: &Tensor, g: &ConvGeom) -> Result<Tensor> {
    if g.is_pointwise() {
        return x
            .transpose(0, 1)?
            .contiguous()?
            .reshape((g.c, g.b * g.h * g.w));
    }
    let x = x.contiguous()?;
    let shape = (g.ckk(), g.b * g.ho * g.wo);
    match x.dtype() {
        DType::F32 => Tensor::from_vec(
            im2col(&x.flatten_all()?.to_vec1::<f32>()?, g),
            shape,
            x.device(),
        ),
        DType::F64 => Tensor::from_vec(
            im2col(&x.flatten_all()?.to_vec1::<f64>()?, g),
            shape,
            x.device(),
        ),
        dt => candle_core::bail!("conv2d (im2col): unsupported dtype {dt:?}"),
    }
}

/// Columns `(C*k*k, B*Ho*Wo)` -> `(B, C, H, W)`, the adjoint of [`columns`].
fn uncolumns(cols: &Tensor, g: &ConvGeom) -> Result<Tensor> {
    let cbhw = if g.is_pointwise() {
        cols.reshape((g.c, g.b, g.h, g.w))?
    } else {
        let cols = cols.contiguous()?;
        let shape = (g.c, g.b, g.h, g.w);
        match cols.dtype() {
            DType::F32 => Tensor::from_vec(
                col2im(&cols.flatten_all()?.to_vec1::<f32>()?, g),
                shape,
                cols.device(),
            )?,
            DType::F64 => Tensor::from_vec(
                col2im(&cols.flatten_all()?.to_vec1::<f64>()?, g),
                shape,
                cols.device(),
            )?,
            dt => candle_core::bail!("conv2d (col2im): unsupported dtype {dt:?}"),
        }
    };
    cbhw.transpose(0, 1)?.contiguous()
}

/// Forward by im2col + one GEMM: `(B, C, H, W) x (O, C, k, k) -> (B, O, Ho, Wo)` (contiguous).
fn conv2d_gemm(x: &Tensor, weight: &Tensor, g: &ConvGeom) -> Result<Tensor> {
    let o = weight.dim(0)?;
    // (O, CKK) x (CKK, B*HoWo) -> (O, B*HoWo) -> (B, O, Ho, Wo)
    let y = weight.reshape((o, g.ckk()))?.matmul(&columns(x, g)?)?;
    y.reshape((o, g.b, g.ho, g.wo))?
        .transpose(0, 1)?
        .contiguous()
}

/// Backward of a convolution whose forward result was computed outside the graph: the op's output is
/// `arg3` (copied), its gradients are GEMMs against im2col / col2im of `arg1` (input) and `arg2` (weight).
struct ConvBackward {
    stride: usize,
    padding: usize,
}

impl CustomOp3 for ConvBackward {
    fn name(&self) -> &'static str {
        "dino-conv2d"
    }

    fn cpu_fwd(
        &self,
        _s1: &CpuStorage,
        _l1: &Layout,
        _s2: &CpuStorage,
        _l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (start, end) = l3.contiguous_offsets().ok_or_else(|| {
            candle_core::Error::Msg("dino-conv2d: forward result must be contiguous".into())
        })?;
        let out = match s3 {
            CpuStorage::F32(v) => CpuStorage::F32(v[start..end].to_vec()),
            CpuStorage::F64(v) => CpuStorage::F64(v[start..end].to_vec()),
            s => candle_core::bail!("dino-conv2d: unsupported dtype {:?}", s.dtype()),
        };
        Ok((out, l3.shape().clone()))
    }

    fn bwd(
        &self,
        x: &Tensor,
        weight: &Tensor,
        _y: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let (x_tracked, weight_tracked) = (x.track_op(), weight.track_op());
        let (x, weight) = (x.detach(), weight.detach());
        let g = ConvGeom::new(&x, &weight, self.stride, self.padding)?;
        let o = weight.dim(0)?;
        // G: (B, O, Ho, Wo) -> (O, B*HoWo)
        let grad = grad
            .detach()
            .transpose(0, 1)?
            .contiguous()?
            .reshape((o, g.b * g.ho * g.wo))?;
        let w2 = weight.reshape((o, g.ckk()))?;
        // dW = G (O, B*HoWo) @ cols^T (B*HoWo, CKK)
        let dw = if weight_tracked {
            Some(
                grad.matmul(&columns(&x, &g)?.t()?)?
                    .reshape(weight.shape())?,
            )
        } else {
            None
        };
        // dcols = W^T (CKK, O) @ G (O, B*HoWo); dx = col2im(dcols). Skipped for inputs without gradient
        // (the images entering conv1).
        let dx = if x_tracked {
            Some(uncolumns(&w2.t()?.matmul(&grad)?, &g)?)
        } else {
            None
        };
        Ok((dx, dw, None))
    }
}

/// `(B, C, H, W) x (O, C, k, k) -> (B, O, Ho, Wo)` convolution (no bias, dilation 1, groups 1) whose
/// backward is two GEMMs plus im2col / col2im on CPU f32/f64, instead of candle's direct
/// `conv_transpose2d` loop. Other devices and dtypes call candle's `conv2d`.
pub fn conv2d(x: &Tensor, weight: &Tensor, stride: usize, padding: usize) -> Result<Tensor> {
    let fast = crate::dispatch::cpu_fast_path(&[x, weight])
        && matches!(x.dtype(), DType::F32 | DType::F64)
        && x.dtype() == weight.dtype();
    if !fast {
        // A contiguous kernel: candle's CUDA conv2d read a strided kernel at the wrong offset before
        // huggingface/candle#3894 (issue #3893).
        return x.conv2d(&weight.contiguous()?, padding, stride, 1, 1);
    }
    let g = ConvGeom::new(x, weight, stride, padding)?;
    let y = conv2d_gemm(&x.detach(), &weight.detach(), &g)?;
    if !x.track_op() && !weight.track_op() {
        return Ok(y);
    }
    x.apply_op3_arc(
        weight,
        &y,
        std::sync::Arc::new(Box::new(ConvBackward { stride, padding })),
    )
}
