//! Fused multi-head self-attention on the packed `qkv` activations, with a hand-written backward pass.
//!
//! `qkv` is the `(B*T, 3D)` output of the block's qkv linear, each row laid out `[q | k | v]` and each of those
//! `[head 0 | head 1 | ...]` (the official `qkv.reshape(B, N, 3, H, hd)`). The op reads every head's Q, K and V
//! in place through gemm strides (no split, permute or contiguous copy), runs one single-threaded GEMM per
//! `(batch, head)` with the `(batch, head)` pairs spread over the rayon pool (small per-head GEMMs parallelise
//! badly inside), and writes the head outputs straight into their columns of the `(B*T, D)` result. The
//! attention probabilities are kept by the op for the backward pass:
//! - `dV = Pᵀ dO`, `dP = dO Vᵀ`, `dS = scale · P ⊙ (dP − rowsum(dP ⊙ P))`, `dQ = dS K`, `dK = dSᵀ Q`,
//!
//! all written into their columns of one `(B*T, 3D)` gradient. Other devices and dtypes use candle's
//! composed ops (same result, slower).

use std::sync::{Arc, Mutex};

use candle_core::{CpuStorage, CustomOp1, CustomOp2, Layout, Result, Shape, Tensor};
use gemm::Parallelism;
use rayon::prelude::*;

use crate::fused::gemm_strided;
use crate::ops::{self, f32_data};

/// A raw pointer that may cross rayon tasks: every task writes a disjoint set of elements.
#[derive(Clone, Copy)]
struct SyncPtr(*mut f32);
// SAFETY: used only to write disjoint regions from parallel tasks (see each use).
unsafe impl Send for SyncPtr {}
// SAFETY: as above.
unsafe impl Sync for SyncPtr {}

impl SyncPtr {
    /// The pointer (a method, so closures capture the whole `Send` wrapper).
    fn get(self) -> *mut f32 {
        self.0
    }
}

/// `dst (m, n) = lhs (m, k) · rhs (k, n)` on the calling thread (see [`gemm_strided`]).
///
/// # Safety
/// As [`gemm_strided`].
unsafe fn mm(
    m: usize,
    n: usize,
    k: usize,
    dst: (*mut f32, isize, isize),
    lhs: (*const f32, isize, isize),
    rhs: (*const f32, isize, isize),
) {
    gemm_strided(m, n, k, dst, false, lhs, rhs, Parallelism::None)
}

/// Geometry of one attention call.
#[derive(Debug, Clone, Copy)]
struct Dims {
    b: usize,
    t: usize,
    heads: usize,
    hd: usize,
    scale: f32,
}

impl Dims {
    fn d(&self) -> usize {
        self.heads * self.hd
    }
}

/// The forward op; keeps the probabilities `(B*H, T, T)` for the backward pass.
struct AttentionOp {
    dims: Dims,
    probs: Mutex<Option<Arc<Vec<f32>>>>,
}

impl CustomOp1 for AttentionOp {
    fn name(&self) -> &'static str {
        "dino-attention"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let Dims {
            b,
            t,
            heads,
            hd,
            scale,
        } = self.dims;
        let d = self.dims.d();
        let qkv = f32_data(s, l, "attention")?;
        let mut probs = vec![0f32; b * heads * t * t];
        let mut out = vec![0f32; b * t * d];
        let out_ptr = SyncPtr(out.as_mut_ptr());
        let qkv_ptr = qkv.as_ptr() as usize;
        let rs3 = (3 * d) as isize;
        probs.par_chunks_mut(t * t).enumerate().for_each_init(
            || vec![0f32; t * t],
            |logits, (bh, p)| {
                let (bi, hi) = (bh / heads, bh % heads);
                let base = qkv_ptr as *const f32;
                // SAFETY: q, k and v of (bi, hi) lie inside qkv (rows bi*T.., columns hi*hd.. of each third);
                // this task alone writes rows bi*T.. x columns hi*hd.. of `out`, and `p` is its own chunk.
                unsafe {
                    let q = base.add(bi * t * 3 * d + hi * hd);
                    let k = q.add(d);
                    let v = q.add(2 * d);
                    let ti = t as isize;
                    mm(
                        t,
                        t,
                        hd,
                        (logits.as_mut_ptr(), 1, ti),
                        (q, 1, rs3),
                        (k, rs3, 1),
                    );
                    ops::softmax_fwd_chunk(logits, p, t, scale);
                    let o = out_ptr.get().add(bi * t * d + hi * hd);
                    mm(
                        t,
                        hd,
                        t,
                        (o, 1, d as isize),
                        (p.as_ptr(), 1, t as isize),
                        (v, 1, rs3),
                    );
                }
            },
        );
        if let Ok(mut slot) = self.probs.lock() {
            *slot = Some(Arc::new(probs));
        }
        Ok((CpuStorage::F32(out), Shape::from((b * t, d))))
    }

    fn bwd(&self, arg: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        let probs = self
            .probs
            .lock()
            .ok()
            .and_then(|p| p.clone())
            .ok_or_else(|| candle_core::Error::Msg("attention: probabilities missing".into()))?;
        let g = arg.apply_op2_no_bwd(
            &grad.contiguous()?,
            &AttentionBwdOp {
                dims: self.dims,
                probs,
            },
        )?;
        Ok(Some(g))
    }
}

/// The backward op: `(qkv, dOut)` -> `dqkv`.
struct AttentionBwdOp {
    dims: Dims,
    probs: Arc<Vec<f32>>,
}

impl CustomOp2 for AttentionBwdOp {
    fn name(&self) -> &'static str {
        "dino-attention-bwd"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let Dims {
            b,
            t,
            heads,
            hd,
            scale,
        } = self.dims;
        let d = self.dims.d();
        let qkv = f32_data(s1, l1, "attention backward")?;
        let go = f32_data(s2, l2, "attention backward")?;
        let mut dqkv = vec![0f32; b * t * 3 * d];
        let dptr = SyncPtr(dqkv.as_mut_ptr());
        let qkv_ptr = qkv.as_ptr() as usize;
        let go_ptr = go.as_ptr() as usize;
        let rs3 = (3 * d) as isize;
        let (tt, ti) = (t * t, t as isize);
        self.probs.par_chunks(tt).enumerate().for_each_init(
            || (vec![0f32; tt], vec![0f32; tt]),
            |(dp, ds), (bh, p)| {
                let (bi, hi) = (bh / heads, bh % heads);
                // SAFETY: reads stay inside qkv / dOut rows bi*T.. ; this task alone writes the columns
                // hi*hd.. of each third of dqkv rows bi*T.. ; `dp` is this task's scratch buffer.
                unsafe {
                    let q = (qkv_ptr as *const f32).add(bi * t * 3 * d + hi * hd);
                    let k = q.add(d);
                    let v = q.add(2 * d);
                    let go = (go_ptr as *const f32).add(bi * t * d + hi * hd);
                    let dq = dptr.get().add(bi * t * 3 * d + hi * hd);
                    let dk = dq.add(d);
                    let dv = dq.add(2 * d);
                    let p = p.as_ptr();
                    // dV = Pᵀ dO
                    mm(t, hd, t, (dv, 1, rs3), (p, ti, 1), (go, 1, d as isize));
                    // dP = dO Vᵀ
                    mm(
                        t,
                        t,
                        hd,
                        (dp.as_mut_ptr(), 1, ti),
                        (go, 1, d as isize),
                        (v, rs3, 1),
                    );
                    ops::softmax_bwd_chunk(std::slice::from_raw_parts(p, tt), dp, ds, t, scale);
                    // dQ = dS K, dK = dSᵀ Q
                    mm(t, hd, t, (dq, 1, rs3), (ds.as_ptr(), 1, ti), (k, 1, rs3));
                    mm(t, hd, t, (dk, 1, rs3), (ds.as_ptr(), ti, 1), (q, 1, rs3));
                }
            },
        );
        Ok((CpuStorage::F32(dqkv), Shape::from((b * t, 3 * d))))
    }
}

/// Multi-head self-attention `softmax(scale · Q Kᵀ) V` of every head, merged back:
/// `qkv`: `(B*T, 3D)` (rows `[q | k | v]`, heads contiguous within each) -> `(B*T, D)`.
pub fn attention(qkv: &Tensor, b: usize, t: usize, heads: usize, scale: f64) -> Result<Tensor> {
    let (rows, d3) = qkv.dims2()?;
    if rows != b * t || d3 % (3 * heads) != 0 || heads == 0 {
        candle_core::bail!(
            "attention: qkv {:?} does not match B {b} x T {t} rows and 3 x {heads} heads",
            qkv.dims()
        );
    }
    let d = d3 / 3;
    let hd = d / heads;
    if qkv.device().is_cpu() && qkv.dtype() == candle_core::DType::F32 {
        let op = AttentionOp {
            dims: Dims {
                b,
                t,
                heads,
                hd,
                scale: scale as f32,
            },
            probs: Mutex::new(None),
        };
        return qkv.apply_op1(op);
    }
    let split = |i: usize| -> Result<Tensor> {
        qkv.narrow(1, i * d, d)?
            .reshape((b, t, heads, hd))?
            .permute((0, 2, 1, 3))?
            .contiguous()
    };
    let (q, k, v) = (split(0)?, split(1)?, split(2)?);
    let probs = candle_nn::ops::softmax(&(q.matmul(&k.t()?)? * scale)?, candle_core::D::Minus1)?;
    probs
        .matmul(&v)?
        .permute((0, 2, 1, 3))?
        .contiguous()?
        .reshape((b * t, d))
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};

    /// The composed-op reference on CPU (same maths, candle autograd).
    fn reference(qkv: &Tensor, b: usize, t: usize, heads: usize, scale: f64) -> Result<Tensor> {
        let d = qkv.dim(1)? / 3;
        let hd = d / heads;
        let split = |i: usize| -> Result<Tensor> {
            qkv.narrow(1, i * d, d)?
                .reshape((b, t, heads, hd))?
                .permute((0, 2, 1, 3))?
                .contiguous()
        };
        let (q, k, v) = (split(0)?, split(1)?, split(2)?);
        let logits = (q.matmul(&k.t()?.contiguous()?)? * scale)?;
        let probs = candle_nn::ops::softmax(&logits, candle_core::D::Minus1)?;
        probs
            .matmul(&v)?
            .permute((0, 2, 1, 3))?
            .contiguous()?
            .reshape((b * t, d))
    }

    fn pattern(n: usize, seed: u64) -> Vec<f32> {
        (0..n)
            .map(|i| {
                let x = (i as u64 * 2654435761 + seed * 40503) % 10007;
                x as f32 / 10007.0 * 4.0 - 2.0
            })
            .collect()
    }

    #[test]
    fn forward_and_backward_match_composed_ops() -> Result<()> {
        let dev = Device::Cpu;
        for &(b, t, heads, hd) in &[
            (2usize, 5usize, 3usize, 4usize),
            (3, 17, 2, 8),
            (1, 1, 1, 2),
        ] {
            let d = heads * hd;
            let scale = (hd as f64).powf(-0.5);
            let qkv = Var::from_vec(pattern(b * t * 3 * d, 1), (b * t, 3 * d), &dev)?;
            let w = Tensor::from_vec(pattern(b * t * d, 2), (b * t, d), &dev)?;
            let y = attention(qkv.as_tensor(), b, t, heads, scale)?;
            let y_ref = reference(qkv.as_tensor(), b, t, heads, scale)?;
            let diff = (&y - &y_ref)?.abs()?.max_all()?.to_scalar::<f32>()?;
            assert!(
                diff < 1e-5,
                "forward differs by {diff} at {b}x{t}x{heads}x{hd}"
            );
            let g = (y * &w)?.sum_all()?.backward()?;
            let g_ref = (y_ref * &w)?.sum_all()?.backward()?;
            let (a, r) = (g.get(&qkv).unwrap(), g_ref.get(&qkv).unwrap());
            let diff = (a - r)?.abs()?.max_all()?.to_scalar::<f32>()?;
            let mag = r.abs()?.max_all()?.to_scalar::<f32>()?;
            assert!(
                diff < 1e-5 * mag.max(1.0),
                "gradient differs by {diff} (max {mag})"
            );
        }
        Ok(())
    }

    #[test]
    fn gradient_matches_finite_differences() -> Result<()> {
        let dev = Device::Cpu;
        let (b, t, heads, hd) = (2usize, 4usize, 2usize, 3usize);
        let d = heads * hd;
        let scale = 0.7;
        let x0 = pattern(b * t * 3 * d, 3);
        let w = Tensor::from_vec(pattern(b * t * d, 4), (b * t, d), &dev)?;
        let f = |x: &[f32]| -> Result<f64> {
            let qkv = Tensor::from_vec(x.to_vec(), (b * t, 3 * d), &dev)?;
            let y = attention(&qkv, b, t, heads, scale)?;
            (y.to_dtype(candle_core::DType::F64)? * w.to_dtype(candle_core::DType::F64)?)?
                .sum_all()?
                .to_scalar::<f64>()
        };
        let qkv = Var::from_vec(x0.clone(), (b * t, 3 * d), &dev)?;
        let y = attention(qkv.as_tensor(), b, t, heads, scale)?;
        let g = (y * &w)?.sum_all()?.backward()?;
        let g: Vec<f32> = g.get(&qkv).unwrap().flatten_all()?.to_vec1()?;
        let eps = 1e-2f32;
        for i in (0..x0.len()).step_by(7) {
            let mut xp = x0.clone();
            xp[i] += eps;
            let mut xm = x0.clone();
            xm[i] -= eps;
            let fd = (f(&xp)? - f(&xm)?) / (2.0 * eps as f64);
            assert!(
                (fd - g[i] as f64).abs() < 2e-3 * (1.0 + fd.abs()),
                "element {i}: finite difference {fd}, analytic {}",
                g[i]
            );
        }
        Ok(())
    }
}
