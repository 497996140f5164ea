//! Weight normalisation `W = g · v / ‖v‖_row` (`torch.nn.utils.weight_norm(dim=0)`, the DINO head's last
//! layer): one fused CPU pass forward and two backward on the fast path, composed candle ops on the portable
//! path.

use candle_core::{CpuStorage, CustomOp2, CustomOp3, Layout, Shape, Tensor};
use rayon::prelude::*;

/// `torch.nn.utils.weight_norm(dim=0)`: `W = g · v / ‖v‖_row` for `v`: `(K, C)`, `g`: `(K, 1)`, differentiable
/// in both. Contiguous f32 CPU tensors take a fused kernel (one pass forward, two passes backward, instead of
/// about five and eight memory passes over `K·C` for the composed ops); anything else uses
/// [`weight_norm_composed`].
pub fn weight_norm(v: &Tensor, g: &Tensor) -> candle_core::Result<Tensor> {
    let (k, _c) = v.dims2()?;
    if g.dims() != [k, 1] {
        candle_core::bail!(
            "weight_norm: g {:?} must be ({k}, 1) for v {:?}",
            g.dims(),
            v.dims()
        );
    }
    let fast =
        crate::dispatch::cpu_f32_fast_path(&[v, g]) && v.is_contiguous() && g.is_contiguous();
    if fast {
        v.apply_op2(g, WeightNormOp)
    } else {
        weight_norm_composed(v, g)
    }
}

/// [`weight_norm`] from stock candle ops (the reference the fused kernel is tested against).
pub fn weight_norm_composed(v: &Tensor, g: &Tensor) -> candle_core::Result<Tensor> {
    let norm = v.sqr()?.sum_keepdim(1)?.sqrt()?;
    let scale = g.div(&norm)?;
    v.broadcast_mul(&scale)
}

/// `a · b`, in 16 lanes (vectorised).
#[inline(always)]
fn row_dot(a: &[f32], b: &[f32]) -> f32 {
    let b = &b[..a.len()];
    crate::ops::lane_sum([a, b], |[a, b]| a * b)
}

/// Rows of `W = g · v / ‖v‖`: `v` and `w` hold whole rows of `c` values, `g` one value per row.
#[inline(always)]
fn wn_fwd_kernel(v: &[f32], g: &[f32], w: &mut [f32], c: usize) {
    for ((wr, vr), &gk) in w.chunks_exact_mut(c).zip(v.chunks_exact(c)).zip(g) {
        let s = gk / row_dot(vr, vr).sqrt();
        wr.iter_mut().zip(vr).for_each(|(o, x)| *o = s * x);
    }
}
crate::ops::multiversion!(fn wn_fwd_rows => wn_fwd_kernel(v: &[f32], g: &[f32], w: &mut [f32], c: usize));

/// Rows of `dv = s (gW − (gW·v / ‖v‖²) v)`, `s = g / ‖v‖`.
#[inline(always)]
fn wn_bwd_v_kernel(v: &[f32], g: &[f32], gw: &[f32], dv: &mut [f32], c: usize) {
    let rows = dv
        .chunks_exact_mut(c)
        .zip(v.chunks_exact(c).zip(gw.chunks_exact(c)));
    for ((dr, (vr, gr)), &gk) in rows.zip(g) {
        let n2 = row_dot(vr, vr);
        let s = gk / n2.sqrt();
        let proj = row_dot(gr, vr) / n2;
        dr.iter_mut()
            .zip(vr.iter().zip(gr))
            .for_each(|(o, (x, gx))| *o = s * (gx - proj * x));
    }
}
crate::ops::multiversion!(fn wn_bwd_v_rows => wn_bwd_v_kernel(v: &[f32], g: &[f32], gw: &[f32], dv: &mut [f32], c: usize));

/// Rows of `dg = gW·v / ‖v‖`.
#[inline(always)]
fn wn_bwd_g_kernel(v: &[f32], gw: &[f32], dg: &mut [f32], c: usize) {
    for ((o, vr), gr) in dg.iter_mut().zip(v.chunks_exact(c)).zip(gw.chunks_exact(c)) {
        *o = row_dot(gr, vr) / row_dot(vr, vr).sqrt();
    }
}
crate::ops::multiversion!(fn wn_bwd_g_rows => wn_bwd_g_kernel(v: &[f32], gw: &[f32], dg: &mut [f32], c: usize));

/// Rows handed to one rayon task (rows are short: the bottleneck width, 256 by default).
const WN_ROWS_PER_TASK: usize = 64;

/// Forward of the fused weight norm: `(v (K, C), g (K, 1)) -> W (K, C)`.
struct WeightNormOp;

impl CustomOp2 for WeightNormOp {
    fn name(&self) -> &'static str {
        "dino-weight-norm"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let v = crate::ops::f32_data(s1, l1, self.name())?;
        let g = crate::ops::f32_data(s2, l2, self.name())?;
        let (_k, c) = l1.shape().dims2()?;
        let mut w = crate::ops::uninit_f32(v.len());
        if c > 0 {
            let n = WN_ROWS_PER_TASK * c;
            w.par_chunks_mut(n)
                .zip(v.par_chunks(n))
                .zip(g.par_chunks(WN_ROWS_PER_TASK))
                .for_each(|((wr, vr), gr)| wn_fwd_rows(vr, gr, wr, c));
        }
        Ok((CpuStorage::F32(w), l1.shape().clone()))
    }

    fn bwd(
        &self,
        v: &Tensor,
        g: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        let grad = grad.contiguous()?;
        let dv = v.apply_op3_no_bwd(g, &grad, &WeightNormBwdV)?;
        // A detached (frozen) `g` gets no gradient: one pass over `K·C` less.
        let dg = if g.track_op() {
            Some(v.apply_op2_no_bwd(&grad, &WeightNormBwdG)?)
        } else {
            None
        };
        Ok((Some(dv), dg))
    }
}

/// `dL/dv_k = s_k (gW_k − (gW_k·v_k / ‖v_k‖²) v_k)` with `s_k = g_k / ‖v_k‖`; inputs `(v, g, gW)`.
struct WeightNormBwdV;

impl CustomOp3 for WeightNormBwdV {
    fn name(&self) -> &'static str {
        "dino-weight-norm-bwd-v"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let v = crate::ops::f32_data(s1, l1, self.name())?;
        let g = crate::ops::f32_data(s2, l2, self.name())?;
        let gw = crate::ops::f32_data(s3, l3, self.name())?;
        let (_k, c) = l1.shape().dims2()?;
        if gw.len() != v.len() {
            candle_core::bail!(
                "{}: grad {:?} vs v {:?}",
                self.name(),
                l3.shape(),
                l1.shape()
            );
        }
        let mut dv = crate::ops::uninit_f32(v.len());
        if c > 0 {
            let n = WN_ROWS_PER_TASK * c;
            dv.par_chunks_mut(n)
                .zip(v.par_chunks(n).zip(gw.par_chunks(n)))
                .zip(g.par_chunks(WN_ROWS_PER_TASK))
                .for_each(|((dr, (vr, gr)), gk)| wn_bwd_v_rows(vr, gk, gr, dr, c));
        }
        Ok((CpuStorage::F32(dv), l1.shape().clone()))
    }
}

/// `dL/dg_k = gW_k·v_k / ‖v_k‖`; inputs `(v, gW)`, output `(K, 1)`.
struct WeightNormBwdG;

impl CustomOp2 for WeightNormBwdG {
    fn name(&self) -> &'static str {
        "dino-weight-norm-bwd-g"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let v = crate::ops::f32_data(s1, l1, self.name())?;
        let gw = crate::ops::f32_data(s2, l2, self.name())?;
        let (k, c) = l1.shape().dims2()?;
        if gw.len() != v.len() {
            candle_core::bail!(
                "{}: grad {:?} vs v {:?}",
                self.name(),
                l2.shape(),
                l1.shape()
            );
        }
        let mut dg = crate::ops::uninit_f32(k);
        if c > 0 {
            let n = WN_ROWS_PER_TASK * c;
            dg.par_chunks_mut(WN_ROWS_PER_TASK)
                .zip(v.par_chunks(n).zip(gw.par_chunks(n)))
                .for_each(|(o, (vr, gr))| wn_bwd_g_rows(vr, gr, o, c));
        } else {
            dg.fill(0.0);
        }
        Ok((CpuStorage::F32(dg), Shape::from((k, 1))))
    }
}
