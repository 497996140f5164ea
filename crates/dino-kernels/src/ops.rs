//! Fused ops with hand-written analytic backward passes: LayerNorm over the last dimension, softmax over the
//! last dimension (optionally of a scaled input) and the exact (erf) GELU.
//!
//! candle 0.11.1's fast `candle_nn::ops::layer_norm` / `softmax_last_dim` record no backward at all, and the
//! composed ops (`layer_norm_slow`, `softmax(x, D::Minus1)`, `gelu_erf`) are correct but their backward passes
//! cost 6-20x their forward. These are `CustomOp1/2/3` implementations with:
//! - a contiguous-f32 CPU fast path: rows processed in parallel with rayon, multi-lane reductions that the
//!   compiler vectorises, code compiled for AVX-512 / AVX2 when the CPU has them (runtime dispatch);
//! - non-contiguous f32 inputs copied to a contiguous buffer first;
//! - other dtypes and non-CPU devices falling back to candle's composed ops (correct gradients, slower).
//!
//! The backward passes recompute row statistics from the input instead of storing them.

use std::borrow::Cow;

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp1, CustomOp2, CustomOp3, Layout, Result, Shape, Tensor, D};
use rayon::prelude::*;

use crate::dispatch::cpu_f32_fast_path;

// ---------------------------------------------------------------------------------------------------------
// Runtime SIMD dispatch: compile the same inlined body for AVX-512, AVX2+FMA and the baseline target.
// ---------------------------------------------------------------------------------------------------------

macro_rules! multiversion {
    // `fma`: the kernel takes a `const FMA: bool`, true in the FMA-enabled versions (its multiply-adds then fuse,
    // see [`madd`]), false in the baseline one (where `mul_add` would be a libm call per element).
    (fma $(#[$m:meta])* $vis:vis fn $name:ident => $inner:ident ($($arg:ident : $ty:ty),* $(,)?) $(-> $ret:ty)?) => {
        $crate::ops::multiversion!(@emit [$inner::<true>] [$inner::<false>] [$inner::<{ cfg!(target_feature = "fma") }>]
            $(#[$m])* $vis fn $name ($($arg: $ty),*) $(-> $ret)?);
    };
    (@emit [$($fast:tt)*] [$($base:tt)*] [$($other:tt)*]
        $(#[$m:meta])* $vis:vis fn $name:ident ($($arg:ident : $ty:ty),*) $(-> $ret:ty)?) => {
        $(#[$m])*
        #[allow(clippy::too_many_arguments)]
        $vis fn $name($($arg: $ty),*) $(-> $ret)? {
            #[cfg(target_arch = "x86_64")]
            {
                #[target_feature(enable = "avx512f,avx512vl,avx2,fma")]
                #[allow(clippy::too_many_arguments)]
                unsafe fn v512($($arg: $ty),*) $(-> $ret)? { $($fast)*($($arg),*) }
                #[target_feature(enable = "avx2,fma")]
                #[allow(clippy::too_many_arguments)]
                unsafe fn v256($($arg: $ty),*) $(-> $ret)? { $($fast)*($($arg),*) }
                if std::arch::is_x86_feature_detected!("avx512f")
                    && std::arch::is_x86_feature_detected!("avx512vl")
                {
                    // SAFETY: the CPU supports every feature v512 was compiled for.
                    return unsafe { v512($($arg),*) };
                }
                if std::arch::is_x86_feature_detected!("avx2")
                    && std::arch::is_x86_feature_detected!("fma")
                {
                    // SAFETY: the CPU supports every feature v256 was compiled for.
                    return unsafe { v256($($arg),*) };
                }
                $($base)*($($arg),*)
            }
            #[cfg(not(target_arch = "x86_64"))]
            {
                $($other)*($($arg),*)
            }
        }
    };
    ($(#[$m:meta])* $vis:vis fn $name:ident => $inner:ident ($($arg:ident : $ty:ty),* $(,)?) $(-> $ret:ty)?) => {
        $crate::ops::multiversion!(@emit [$inner] [$inner] [$inner] $(#[$m])* $vis fn $name ($($arg: $ty),*) $(-> $ret)?);
    };
}

pub(crate) use multiversion;

/// Number of independent accumulator lanes in reductions (lets the compiler vectorise without reassociation).
const LANES: usize = 16;

/// `Σ_i f(xs[0][i], xs[1][i], ...)` over slices of equal length, in `LANES` independent accumulators (vectorised
/// without reassociating a single sum), folded pairwise.
#[inline(always)]
pub(crate) fn lane_sum<const K: usize>(xs: [&[f32]; K], f: impl Fn([f32; K]) -> f32) -> f32 {
    let n = xs.first().map_or(0, |x| x.len());
    let mut acc = [0f32; LANES];
    // Whole blocks as `&[f32; LANES]` (one bounds check per block, none per element), so the loop vectorises.
    let full = n / LANES * LANES;
    let mut i = 0;
    while i < full {
        let blocks: [&[f32; LANES]; K] = std::array::from_fn(|k| block(xs[k], i));
        for (l, a) in acc.iter_mut().enumerate() {
            *a += f(std::array::from_fn(|k| blocks[k][l]));
        }
        i += LANES;
    }
    let mut s = fold_lanes(acc);
    // `j` indexes every slice (column `j` of `xs`), not `xs` itself.
    #[allow(clippy::needless_range_loop)]
    for j in full..n {
        s += f(std::array::from_fn(|k| xs[k][j]));
    }
    s
}

/// The sum of the lanes, folded pairwise.
#[inline(always)]
fn fold_lanes(mut acc: [f32; LANES]) -> f32 {
    let mut w = LANES;
    while w > 1 {
        w /= 2;
        for l in 0..w {
            acc[l] += acc[l + w];
        }
    }
    acc[0]
}

/// `max_i f(x[i])`, in `LANES` lanes as [`lane_sum`].
#[inline(always)]
fn lane_max(x: &[f32], f: impl Fn(f32) -> f32) -> f32 {
    let n = x.len();
    let mut acc = [f32::NEG_INFINITY; LANES];
    let full = n / LANES * LANES;
    let mut i = 0;
    while i < full {
        let b = block(x, i);
        for (l, a) in acc.iter_mut().enumerate() {
            let v = f(b[l]);
            *a = if v > *a { v } else { *a };
        }
        i += LANES;
    }
    let mut m = f32::NEG_INFINITY;
    for a in acc {
        m = if a > m { a } else { m };
    }
    for &v in &x[full..] {
        let v = f(v);
        m = if v > m { v } else { m };
    }
    m
}

/// `x[i..i + LANES]` as an array reference.
#[inline(always)]
fn block(x: &[f32], i: usize) -> &[f32; LANES] {
    match x[i..i + LANES].try_into() {
        Ok(b) => b,
        Err(_) => unreachable!("a slice of LANES elements"),
    }
}

/// `a · b + c`: one fused multiply-add (a single rounding) when `FMA`, else a product and a sum. The kernels
/// built by `multiversion!(fma ...)` pass `FMA` = true where the CPU has FMA units.
#[inline(always)]
fn madd<const FMA: bool>(a: f32, b: f32, c: f32) -> f32 {
    if FMA {
        a.mul_add(b, c)
    } else {
        a * b + c
    }
}

/// exp(x) for f32, branch-free (vectorisable): Cephes polynomial after reduction by ln 2; max relative error
/// ~2 ulp on [-87, 88]; inputs below -87.3 return ~1e-38 instead of a denormal. With `FMA` the reduction and
/// the polynomial use fused multiply-adds (fewer instructions, results within the same error).
#[inline(always)]
pub(crate) fn fast_exp_g<const FMA: bool>(x: f32) -> f32 {
    const LOG2E: f32 = std::f32::consts::LOG2_E;
    const C1: f32 = 0.693_359_4;
    const C2: f32 = -2.121_944_4e-4;
    const ROUND: f32 = 12_582_912.0; // 1.5 * 2^23: adding and subtracting rounds to nearest integer.
    let x = x.clamp(-87.3, 88.3);
    let t = madd::<FMA>(x, LOG2E, ROUND);
    let n = t - ROUND;
    let r = if FMA {
        (-n).mul_add(C2, (-n).mul_add(C1, x))
    } else {
        x - n * C1 - n * C2
    };
    let z = r * r;
    let mut p = madd::<FMA>(1.987_569_1e-4, r, 1.398_199_9e-3);
    p = madd::<FMA>(p, r, 8.333_452e-3);
    p = madd::<FMA>(p, r, 4.166_579_6e-2);
    p = madd::<FMA>(p, r, 1.666_666_5e-1);
    p = madd::<FMA>(p, r, 0.5);
    let y = madd::<FMA>(p, z, r) + 1.0;
    // The integer n sits in the low mantissa bits of t: reading it there (instead of the saturating `n as i32`,
    // which LLVM scalarises) keeps the whole function in vector registers.
    let ni = (t.to_bits() as i32).wrapping_sub(0x4B40_0000);
    let bits = ((ni + 127) as u32) << 23;
    y * f32::from_bits(bits)
}

/// [`fast_exp_g`] without fused multiply-adds.
#[cfg(test)]
pub(crate) fn fast_exp(x: f32) -> f32 {
    fast_exp_g::<false>(x)
}

/// erf(x) for f32, branch-free: the rational approximation used by Eigen/XLA (clamped to [-4, 4]; max
/// absolute error ~1e-7); exactly ±1 for |x| >= 3.9, where erf rounds to ±1 in f32. With `FMA` the two
/// polynomials use fused multiply-adds.
#[inline(always)]
pub(crate) fn fast_erf_g<const FMA: bool>(x: f32) -> f32 {
    let sat = x.abs() >= 3.9;
    let one = if x < 0.0 { -1.0 } else { 1.0 };
    let x = x.clamp(-4.0, 4.0);
    let x2 = x * x;
    let mut p = madd::<FMA>(x2, -2.726_142_3e-10, 2.770_681_4e-8);
    p = madd::<FMA>(p, x2, -2.101_024e-6);
    p = madd::<FMA>(p, x2, -5.692_506_4e-5);
    p = madd::<FMA>(p, x2, -7.349_906_3e-4);
    p = madd::<FMA>(p, x2, -2.954_600_1e-3);
    p = madd::<FMA>(p, x2, -1.609_603_3e-2);
    p *= x;
    let mut q = madd::<FMA>(x2, -1.456_607_2e-5, -2.133_740_6e-4);
    q = madd::<FMA>(q, x2, -1.682_827e-3);
    q = madd::<FMA>(q, x2, -7.373_329_2e-3);
    q = madd::<FMA>(q, x2, -1.426_474e-2);
    let r = p / q;
    if sat {
        one
    } else {
        r
    }
}

/// [`fast_erf_g`] without fused multiply-adds.
#[cfg(test)]
pub(crate) fn fast_erf(x: f32) -> f32 {
    fast_erf_g::<false>(x)
}

// ---------------------------------------------------------------------------------------------------------
// Row scheduling
// ---------------------------------------------------------------------------------------------------------

/// Below this many elements an op runs on the calling thread (rayon's overhead would dominate).
const PAR_MIN_ELEMS: usize = 1 << 15;

/// Rows per rayon task for `rows` rows of `d` elements.
fn rows_per_task(rows: usize, d: usize) -> usize {
    let threads = rayon::current_num_threads().max(1);
    let by_size = (8192 / d.max(1)).max(1);
    let by_balance = rows.div_ceil(threads * 4).max(1);
    by_size.min(by_balance).max(1)
}

/// The element-wise sum of per-chunk partial sums, added in chunk order (reproducible whatever the scheduling).
fn sum_in_order(partials: Vec<Vec<f32>>, n: usize) -> Vec<f32> {
    let mut it = partials.into_iter();
    let mut total = it.next().unwrap_or_else(|| vec![0f32; n]);
    for p in it {
        total.iter_mut().zip(&p).for_each(|(u, v)| *u += v);
    }
    total
}

/// A vector of `n` f32 whose every element the caller writes before reading any (op outputs that a kernel or
/// GEMM fills completely; dino-core's loss buffers, filled row by row). Zero-filling them cost ~10% of a forward
/// pass in `memset` and kernel page clearing, and a serial 134 MB `memset` in the cifar/65536 loss.
#[allow(clippy::uninit_vec)]
pub fn uninit_f32(n: usize) -> Vec<f32> {
    let mut v = Vec::with_capacity(n);
    // SAFETY: the capacity is n; f32 has no invalid bit patterns, and every caller overwrites all n elements
    // before reading them (see each call site: a full-coverage kernel or a GEMM with `read_dst = false`).
    unsafe { v.set_len(n) };
    v
}

/// A forward intermediate that an op keeps for its backward pass (attention probabilities, a pre-activation); it
/// lives as long as the op, i.e. as long as the op's output tensor.
pub(crate) type Saved<T = Vec<f32>> = std::sync::Mutex<Option<std::sync::Arc<T>>>;

/// Keep `data` in `slot`.
pub(crate) fn save<T>(slot: &Saved<T>, data: T) {
    if let Ok(mut s) = slot.lock() {
        *s = Some(std::sync::Arc::new(data));
    }
}

/// The kept intermediate, or an error naming `what` if the forward pass did not store it.
pub(crate) fn take_saved<T>(slot: &Saved<T>, what: &str) -> Result<std::sync::Arc<T>> {
    slot.lock()
        .ok()
        .and_then(|p| p.clone())
        .ok_or_else(|| candle_core::Error::Msg(format!("backward: {what} missing")))
}

/// The f32 data of a CPU storage in row-major order (borrowed when contiguous, copied otherwise).
pub(crate) fn f32_data<'a>(s: &'a CpuStorage, l: &Layout, op: &str) -> Result<Cow<'a, [f32]>> {
    let data = match s {
        CpuStorage::F32(d) => d.as_slice(),
        other => candle_core::bail!("{op}: f32 storage expected, got {:?}", other.dtype()),
    };
    Ok(match l.contiguous_offsets() {
        Some((a, b)) => Cow::Borrowed(&data[a..b]),
        None => Cow::Owned(gather_strided(data, l)),
    })
}

/// Copy a strided view into a row-major vector.
fn gather_strided(data: &[f32], l: &Layout) -> Vec<f32> {
    let dims = l.dims();
    let strides = l.stride();
    let n = l.shape().elem_count();
    let mut out = Vec::with_capacity(n);
    if n == 0 {
        return out;
    }
    let rank = dims.len();
    let mut idx = vec![0usize; rank];
    let mut off = l.start_offset();
    loop {
        out.push(data[off]);
        // Increment the multi-index from the last dimension.
        let mut k = rank;
        loop {
            if k == 0 {
                return out;
            }
            k -= 1;
            idx[k] += 1;
            off += strides[k];
            if idx[k] < dims[k] {
                break;
            }
            off -= strides[k] * dims[k];
            idx[k] = 0;
        }
    }
}

fn last_dim(shape: &Shape, op: &str) -> Result<(usize, usize)> {
    let dims = shape.dims();
    let d = *dims.last().ok_or_else(|| {
        candle_core::Error::Msg(format!(
            "{op}: a rank >= 1 tensor is required, got a scalar"
        ))
    })?;
    let n = shape.elem_count();
    Ok((n / d.max(1), d))
}

/// Apply `f(first_row, in_chunk_rows_out)` over `out` split into row chunks, in parallel when large.
pub(crate) fn for_row_chunks<T: Send>(
    out: &mut [T],
    rows: usize,
    d: usize,
    f: impl Fn(usize, &mut [T]) + Sync + Send,
) {
    if d == 0 || rows == 0 {
        return;
    }
    if rows * d < PAR_MIN_ELEMS {
        f(0, out);
        return;
    }
    let rpt = rows_per_task(rows, d);
    out.par_chunks_mut(rpt * d)
        .enumerate()
        .for_each(|(ci, chunk)| f(ci * rpt, chunk));
}

// ---------------------------------------------------------------------------------------------------------
// LayerNorm
// ---------------------------------------------------------------------------------------------------------

#[inline(always)]
fn row_stats(x: &[f32], eps: f32) -> (f32, f32) {
    let d = x.len();
    let mean = lane_sum([x], |[v]| v) / d as f32;
    let var = lane_sum([x], |[v]| {
        let c = v - mean;
        c * c
    }) / d as f32;
    (mean, 1.0 / (var + eps).sqrt())
}

#[inline(always)]
fn ln_fwd_kernel(x: &[f32], w: &[f32], b: &[f32], y: &mut [f32], eps: f32) {
    let d = w.len();
    let b = &b[..d];
    for (xr, yr) in x.chunks_exact(d).zip(y.chunks_exact_mut(d)) {
        let (mean, rstd) = row_stats(xr, eps);
        let yr = &mut yr[..d];
        for i in 0..d {
            yr[i] = (xr[i] - mean) * rstd * w[i] + b[i];
        }
    }
}

multiversion!(fn ln_fwd_chunk => ln_fwd_kernel(x: &[f32], w: &[f32], b: &[f32], y: &mut [f32], eps: f32));

/// Computes dx for the rows of `x`/`g` and accumulates dw, db into `dwb` (`[dw; db]`, length 2d).
#[inline(always)]
fn ln_bwd_kernel(x: &[f32], g: &[f32], w: &[f32], dx: &mut [f32], dwb: &mut [f32], eps: f32) {
    let d = w.len();
    let (dw, db) = dwb.split_at_mut(d);
    let (dw, db) = (&mut dw[..d], &mut db[..d]);
    let inv_d = 1.0 / d as f32;
    for ((xr, gr), dxr) in x
        .chunks_exact(d)
        .zip(g.chunks_exact(d))
        .zip(dx.chunks_exact_mut(d))
    {
        let (mean, rstd) = row_stats(xr, eps);
        let gr = &gr[..d];
        let dxr = &mut dxr[..d];
        let s1 = lane_sum([gr, w], |[g, w]| g * w);
        let s2 = lane_sum([gr, w, xr], |[g, w, x]| g * w * (x - mean));
        let m1 = s1 * inv_d;
        let m2 = s2 * inv_d * rstd;
        for i in 0..d {
            let xhat = (xr[i] - mean) * rstd;
            dxr[i] = rstd * (gr[i] * w[i] - m1 - xhat * m2);
            dw[i] += gr[i] * xhat;
            db[i] += gr[i];
        }
    }
}

multiversion!(fn ln_bwd_chunk => ln_bwd_kernel(x: &[f32], g: &[f32], w: &[f32], dx: &mut [f32], dwb: &mut [f32], eps: f32));

struct LayerNormOp {
    eps: f32,
    /// Normalise only these samples' rows of `x` (see [`layer_norm_kept`]); None: every row.
    kept: Option<KeptRows>,
    /// Store the output rounded to bf16 (see [`layer_norm_bf16_out`]).
    bf16_out: bool,
}

/// [`for_row_chunks`] on a new `(rows, d)` output: f32, or with `bf16` each chunk computed by `f` in an f32
/// scratch (a parallel chunk's [`rows_per_task`] rows, about 8192 values; below [`PAR_MIN_ELEMS`] the one
/// chunk) and stored rounded to bf16 as the bf16 packings round.
fn row_chunks_out(
    rows: usize,
    d: usize,
    bf16: bool,
    f: impl Fn(usize, &mut [f32]) + Sync + Send,
) -> CpuStorage {
    if !bf16 {
        let mut y = uninit_f32(rows * d);
        for_row_chunks(&mut y, rows, d, f);
        return CpuStorage::F32(y);
    }
    let mut y = crate::bf16::uninit_bf16(rows * d);
    for_row_chunks(&mut y, rows, d, |r0, yc| {
        let mut scratch = uninit_f32(yc.len());
        f(r0, &mut scratch);
        crate::bf16::round_to_bf16(&scratch, crate::bf16::bf16_bits_mut(yc));
    });
    CpuStorage::BF16(y)
}

/// The rows of some samples of `x` `(B*per, D)`: sample `kept[i]`'s rows are rows `i*per..` of the op's
/// compact side.
#[derive(Clone, Debug)]
struct KeptRows {
    per: usize,
    samples: usize,
    kept: std::sync::Arc<Vec<usize>>,
}

impl KeptRows {
    /// Rows of the compact side.
    fn rows(&self) -> usize {
        self.kept.len() * self.per
    }

    /// `f(j, src, n)` over the runs of compact rows `j..j+n` within `lo..hi` that sit at `x` rows `src..src+n`
    /// (one sample each at most).
    fn runs(&self, lo: usize, hi: usize, mut f: impl FnMut(usize, usize, usize)) {
        let mut j = lo;
        while j < hi {
            let end = hi.min((j / self.per + 1) * self.per);
            f(
                j,
                self.kept[j / self.per] * self.per + j % self.per,
                end - j,
            );
            j = end;
        }
    }
}

impl CustomOp3 for LayerNormOp {
    fn name(&self) -> &'static str {
        "dino-layer-norm"
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
        let x = f32_data(s1, l1, self.name())?;
        let w = f32_data(s2, l2, self.name())?;
        let b = f32_data(s3, l3, self.name())?;
        let (rows, d) = last_dim(l1.shape(), self.name())?;
        let eps = self.eps;
        let Some(kept) = &self.kept else {
            let y = row_chunks_out(rows, d, self.bf16_out, |r0, yc| {
                let n = yc.len();
                ln_fwd_chunk(&x[r0 * d..r0 * d + n], &w, &b, yc, eps)
            });
            return Ok((y, l1.shape().clone()));
        };
        if l1.dims().len() != 2 || rows != kept.samples * kept.per {
            candle_core::bail!(
                "{}: x {:?} is not {} samples of {} rows",
                self.name(),
                l1.dims(),
                kept.samples,
                kept.per
            );
        }
        let out_rows = kept.rows();
        let y = row_chunks_out(out_rows, d, self.bf16_out, |r0, yc| {
            kept.runs(r0, r0 + yc.len() / d.max(1), |j, src, n| {
                let o = (j - r0) * d;
                ln_fwd_chunk(
                    &x[src * d..(src + n) * d],
                    &w,
                    &b,
                    &mut yc[o..o + n * d],
                    eps,
                )
            })
        });
        Ok((y, Shape::from((out_rows, d))))
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        _b: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let d = w.elem_count();
        let rows = x.elem_count() / d.max(1);
        let op = LayerNormBwdOp {
            eps: self.eps,
            kept: self.kept.clone(),
        };
        let packed = x.apply_op3_no_bwd(w, &grad.contiguous()?, &op)?;
        let dx = packed.narrow(0, 0, rows * d)?.reshape(x.shape())?;
        let dw = packed.narrow(0, rows * d, d)?.reshape(w.shape())?;
        let db = packed.narrow(0, rows * d + d, d)?.reshape(w.shape())?;
        Ok((Some(dx), Some(dw), Some(db)))
    }
}

/// Backward of [`LayerNormOp`]: inputs (x, w, grad), output `[dx (flattened); dw; db]` as one 1-D tensor.
struct LayerNormBwdOp {
    eps: f32,
    /// As [`LayerNormOp`]'s: the gradient holds these rows only, `dx` is zero on the others.
    kept: Option<KeptRows>,
}

impl CustomOp3 for LayerNormBwdOp {
    fn name(&self) -> &'static str {
        "dino-layer-norm-bwd"
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
        let x = f32_data(s1, l1, self.name())?;
        let w = f32_data(s2, l2, self.name())?;
        let g = f32_data(s3, l3, self.name())?;
        let (rows, d) = last_dim(l1.shape(), self.name())?;
        let n = rows * d;
        // dx is written in full by the kernel; only the weight/bias gradient sums start at zero.
        let mut out = uninit_f32(n + 2 * d);
        out[n..].fill(0.0);
        let (dx, dwb) = out.split_at_mut(n);
        let eps = self.eps;
        if let Some(kept) = &self.kept {
            let cr = kept.rows();
            if g.len() != cr * d || rows != kept.samples * kept.per {
                candle_core::bail!(
                    "{}: gradient of {} values for {cr} rows of {d}",
                    self.name(),
                    g.len()
                );
            }
            // The rows of the samples left out get no gradient.
            let mut is_kept = vec![false; kept.samples];
            kept.kept.iter().for_each(|&k| is_kept[k] = true);
            for (i, _) in is_kept.iter().enumerate().filter(|(_, k)| !**k) {
                dx[i * kept.per * d..(i + 1) * kept.per * d].fill(0.0);
            }
            // The chunks of LayerNorm on the gathered rows (one below PAR_MIN_ELEMS), so the weight and bias
            // sums are grouped, and rounded, as there.
            let rpt = if cr * d < PAR_MIN_ELEMS {
                cr.max(1)
            } else {
                rows_per_task(cr, d)
            };
            let dxp = dx.as_mut_ptr() as usize;
            let job = |ci: usize| -> Vec<f32> {
                let mut acc = vec![0f32; 2 * d];
                kept.runs(ci * rpt, ((ci + 1) * rpt).min(cr), |j, src, m| {
                    // SAFETY: x rows src..src+m belong to compact rows j..j+m alone, one chunk's.
                    let dxr = unsafe {
                        std::slice::from_raw_parts_mut((dxp as *mut f32).add(src * d), m * d)
                    };
                    let xr = &x[src * d..(src + m) * d];
                    ln_bwd_chunk(xr, &g[j * d..(j + m) * d], &w, dxr, &mut acc, eps);
                });
                acc
            };
            let chunks = cr.div_ceil(rpt);
            // Partial sums added in chunk order, as below.
            let partials: Vec<Vec<f32>> = if cr * d < PAR_MIN_ELEMS {
                (0..chunks).map(job).collect()
            } else {
                (0..chunks).into_par_iter().map(job).collect()
            };
            if !partials.is_empty() {
                dwb.copy_from_slice(&sum_in_order(partials, 2 * d));
            }
        } else if n < PAR_MIN_ELEMS {
            ln_bwd_chunk(&x, &g, &w, dx, dwb, eps);
        } else {
            let rpt = rows_per_task(rows, d);
            // One partial sum per chunk, added in chunk order: rayon's fold/reduce would group chunks by how
            // the work happened to be stolen, and the sums (so training) would not be reproducible.
            let partials: Vec<Vec<f32>> = dx
                .par_chunks_mut(rpt * d)
                .enumerate()
                .map(|(ci, dxc)| {
                    let mut acc = vec![0f32; 2 * d];
                    let a = ci * rpt * d;
                    let m = dxc.len();
                    ln_bwd_chunk(&x[a..a + m], &g[a..a + m], &w, dxc, &mut acc, eps);
                    acc
                })
                .collect();
            let partial = sum_in_order(partials, 2 * d);
            dwb.copy_from_slice(&partial);
        }
        Ok((CpuStorage::F32(out), Shape::from(n + 2 * d)))
    }
}

/// LayerNorm over the last dimension: `(x - mean) / sqrt(var + eps) * weight + bias` (biased variance, as
/// PyTorch). `x`: `(..., D)`, `weight`, `bias`: `(D)`; returns the shape of `x`. Gradients flow to all three.
pub fn layer_norm(x: &Tensor, weight: &Tensor, bias: &Tensor, eps: f64) -> Result<Tensor> {
    layer_norm_impl(x, weight, bias, eps, None, false)
}

/// [`layer_norm`] (with `kept` = `Some((samples, kept))`, [`layer_norm_kept`]) for an output that only bf16
/// products read next (the input of a [`crate::fused::linear`] or [`crate::fused::linear_gelu_bf16_out`]
/// layer): where those products run in bf16 (see [`crate::fused::with_matmul_precision`]), the output is a
/// bf16 tensor rounded as their packing would round it, so results and gradients keep their bits while the
/// output takes half the memory. Its gradient comes back in f32. Elsewhere an f32 tensor, as theirs.
pub fn layer_norm_bf16_out(
    x: &Tensor,
    weight: &Tensor,
    bias: &Tensor,
    eps: f64,
    kept: Option<(usize, &[usize])>,
) -> Result<Tensor> {
    layer_norm_impl(x, weight, bias, eps, kept, true)
}

/// [`layer_norm`] of the rows of the samples `kept` (ascending) of `x` `(B*R, D)`, `B = samples`: `(K*R, D)`,
/// equal to `layer_norm(&sample_rows(x, samples, kept)?, ..)` (see [`crate::fused::sample_rows`]) without
/// writing the gathered rows: LayerNorm reads them in place, and its backward pass writes `x`'s gradient
/// whole (zeros on the other samples' rows) instead of a compact one for a scatter.
pub fn layer_norm_kept(
    x: &Tensor,
    weight: &Tensor,
    bias: &Tensor,
    eps: f64,
    samples: usize,
    kept: &[usize],
) -> Result<Tensor> {
    layer_norm_impl(x, weight, bias, eps, Some((samples, kept)), false)
}

/// The three above: every row, or the rows of the kept samples; the output in bf16 with `bf16_out` where the
/// products that read it run in bf16 for its rows (the test [`crate::fused`]'s linear layers make).
fn layer_norm_impl(
    x: &Tensor,
    weight: &Tensor,
    bias: &Tensor,
    eps: f64,
    kept: Option<(usize, &[usize])>,
    bf16_out: bool,
) -> Result<Tensor> {
    let name = if kept.is_some() {
        "layer_norm_kept"
    } else {
        "layer_norm"
    };
    let fast = cpu_f32_fast_path(&[x, weight, bias]);
    let kept = match kept {
        Some((samples, k)) if !fast || x.rank() != 2 || k.is_empty() => {
            let xk = crate::fused::sample_rows(x, samples, k)?;
            return layer_norm_impl(&xk, weight, bias, eps, None, bf16_out);
        }
        Some((samples, k)) => {
            let rows = x.dim(0)?;
            let per = crate::fused::rows_per_kept_sample(rows, samples, k, name)?;
            Some(KeptRows {
                per,
                samples,
                kept: std::sync::Arc::new(k.to_vec()),
            })
        }
        None => None,
    };
    let d = x.dim(D::Minus1)?;
    if weight.dims() != [d] || bias.dims() != [d] {
        candle_core::bail!(
            "{name}: weight {:?} and bias {:?} must both be ({d}) to match x {:?}",
            weight.dims(),
            bias.dims(),
            x.dims()
        );
    }
    if !fast {
        return candle_nn::ops::layer_norm_slow(x, weight, bias, eps as f32);
    }
    let out_rows = kept
        .as_ref()
        .map_or(x.elem_count() / d.max(1), KeptRows::rows);
    let op = LayerNormOp {
        eps: eps as f32,
        kept,
        bf16_out: bf16_out && crate::bf16::use_bf16(crate::fused::matmul_precision(), out_rows),
    };
    x.apply_op3(weight, bias, op)
}

// ---------------------------------------------------------------------------------------------------------
// Softmax over the last dimension
// ---------------------------------------------------------------------------------------------------------

#[inline(always)]
fn softmax_fwd_kernel<const FMA: bool>(x: &[f32], y: &mut [f32], d: usize, scale: f32) {
    for (xr, yr) in x.chunks_exact(d).zip(y.chunks_exact_mut(d)) {
        let yr = &mut yr[..d];
        let xr = &xr[..d];
        let ms = lane_max(xr, |v| v * scale);
        // exp and its sum in one pass. A partial last block (rows of 197 or 37 attention logits end in 5
        // elements) is done as the whole block ending at `d`, overlapping the previous one: its overlapping
        // lanes are rewritten with the same values and left out of the sum.
        let mut acc = [0f32; LANES];
        let full = d / LANES * LANES;
        for (xb, yb) in xr[..full]
            .chunks_exact(LANES)
            .zip(yr[..full].chunks_exact_mut(LANES))
        {
            for l in 0..LANES {
                let e = fast_exp_g::<FMA>(xb[l] * scale - ms);
                yb[l] = e;
                acc[l] += e;
            }
        }
        if full < d && d >= LANES {
            let skip = LANES - (d - full);
            let (xb, yb) = (&xr[d - LANES..], &mut yr[d - LANES..]);
            for l in 0..LANES {
                let e = fast_exp_g::<FMA>(xb[l] * scale - ms);
                yb[l] = e;
                acc[l] += if l >= skip { e } else { 0.0 };
            }
        } else {
            for i in full..d {
                let e = fast_exp_g::<FMA>(xr[i] * scale - ms);
                yr[i] = e;
                acc[0] += e;
            }
        }
        let s = fold_lanes(acc);
        let inv = 1.0 / s;
        for v in yr.iter_mut() {
            *v *= inv;
        }
    }
}

multiversion!(fma pub(crate) fn softmax_fwd_chunk => softmax_fwd_kernel(x: &[f32], y: &mut [f32], d: usize, scale: f32));

#[inline(always)]
fn softmax_bwd_kernel(y: &[f32], g: &[f32], dx: &mut [f32], d: usize, scale: f32) {
    for ((yr, gr), dxr) in y
        .chunks_exact(d)
        .zip(g.chunks_exact(d))
        .zip(dx.chunks_exact_mut(d))
    {
        let (yr, gr, dxr) = (&yr[..d], &gr[..d], &mut dxr[..d]);
        let dot = lane_sum([yr, gr], |[y, g]| y * g);
        for i in 0..d {
            dxr[i] = scale * yr[i] * (gr[i] - dot);
        }
    }
}

multiversion!(pub(crate) fn softmax_bwd_chunk => softmax_bwd_kernel(y: &[f32], g: &[f32], dx: &mut [f32], d: usize, scale: f32));

struct SoftmaxOp {
    scale: f32,
}

impl CustomOp1 for SoftmaxOp {
    fn name(&self) -> &'static str {
        "dino-softmax-last-dim"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let x = f32_data(s, l, self.name())?;
        let (rows, d) = last_dim(l.shape(), self.name())?;
        let mut y = uninit_f32(rows * d);
        let scale = self.scale;
        for_row_chunks(&mut y, rows, d, |r0, yc| {
            let n = yc.len();
            softmax_fwd_chunk(&x[r0 * d..r0 * d + n], yc, d, scale)
        });
        Ok((CpuStorage::F32(y), l.shape().clone()))
    }

    fn bwd(&self, _arg: &Tensor, res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        Ok(Some(res.apply_op2_no_bwd(
            grad,
            &SoftmaxBwdOp { scale: self.scale },
        )?))
    }
}

/// Backward of [`SoftmaxOp`]: inputs (y, grad) -> `scale * y * (grad - sum(grad * y))`.
struct SoftmaxBwdOp {
    scale: f32,
}

impl CustomOp2 for SoftmaxBwdOp {
    fn name(&self) -> &'static str {
        "dino-softmax-last-dim-bwd"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let y = f32_data(s1, l1, self.name())?;
        let g = f32_data(s2, l2, self.name())?;
        let (rows, d) = last_dim(l1.shape(), self.name())?;
        let mut dx = uninit_f32(rows * d);
        let scale = self.scale;
        for_row_chunks(&mut dx, rows, d, |r0, c| {
            let (a, n) = (r0 * d, c.len());
            softmax_bwd_chunk(&y[a..a + n], &g[a..a + n], c, d, scale)
        });
        Ok((CpuStorage::F32(dx), l1.shape().clone()))
    }
}

/// Softmax over the last dimension of `scale * x` (as `softmax(x * scale, -1)`): `(..., N)` -> `(..., N)`.
/// Used by attention with `scale = head_dim^-0.5` to save a pass over the logits.
pub fn softmax_last_dim_scaled(x: &Tensor, scale: f64) -> Result<Tensor> {
    if cpu_f32_fast_path(&[x]) {
        x.apply_op1(SoftmaxOp {
            scale: scale as f32,
        })
    } else {
        candle_nn::ops::softmax(&(x * scale)?, D::Minus1)
    }
}

/// Softmax over the last dimension: `(..., N)` -> `(..., N)`, with gradient.
pub fn softmax_last_dim(x: &Tensor) -> Result<Tensor> {
    softmax_last_dim_scaled(x, 1.0)
}

// ---------------------------------------------------------------------------------------------------------
// GELU (exact, erf)
// ---------------------------------------------------------------------------------------------------------

#[inline(always)]
fn gelu_fwd_kernel<const FMA: bool>(x: &[f32], y: &mut [f32]) {
    let n = y.len();
    let x = &x[..n];
    for i in 0..n {
        y[i] = gelu::<FMA>(x[i]);
    }
}

/// Exact GELU of one value: `v · Φ(v) = 0.5 v (1 + erf(v / √2))`.
#[inline(always)]
fn gelu<const FMA: bool>(v: f32) -> f32 {
    0.5 * v * (1.0 + fast_erf_g::<FMA>(v * std::f32::consts::FRAC_1_SQRT_2))
}

multiversion!(fma pub(crate) fn gelu_fwd_chunk => gelu_fwd_kernel(x: &[f32], y: &mut [f32]));

/// Rows of `pre += b` (when there is a bias) then `act = GELU(pre)`: `pre` and `act` hold whole rows of
/// `b.len()` (or `d`) values.
#[inline(always)]
fn bias_gelu_fwd_kernel<const FMA: bool>(
    pre: &mut [f32],
    b: Option<&[f32]>,
    act: &mut [f32],
    d: usize,
) {
    for (pr, ar) in pre.chunks_exact_mut(d).zip(act.chunks_exact_mut(d)) {
        if let Some(b) = b {
            let (pr, b) = (&mut pr[..d], &b[..d]);
            for i in 0..d {
                pr[i] += b[i];
            }
        }
        gelu_fwd_kernel::<FMA>(pr, ar);
    }
}

multiversion!(fma pub(crate) fn bias_gelu_fwd_rows => bias_gelu_fwd_kernel(pre: &mut [f32], b: Option<&[f32]>, act: &mut [f32], d: usize));

/// Rows of `a = GELU(a + b)` in place (no bias: `a = GELU(a)`), rows of `d` values.
#[inline(always)]
fn bias_gelu_inplace_kernel<const FMA: bool>(a: &mut [f32], b: Option<&[f32]>, d: usize) {
    if d == 0 {
        return;
    }
    for r in a.chunks_exact_mut(d) {
        let r = &mut r[..d];
        match b {
            Some(b) => {
                let b = &b[..d];
                for i in 0..d {
                    r[i] = gelu::<FMA>(r[i] + b[i]);
                }
            }
            None => r.iter_mut().for_each(|v| *v = gelu::<FMA>(*v)),
        }
    }
}

multiversion!(fma pub(crate) fn bias_gelu_inplace_rows => bias_gelu_inplace_kernel(a: &mut [f32], b: Option<&[f32]>, d: usize));

/// GELU'(v) = Φ(v) + v φ(v).
#[inline(always)]
fn gelu_grad<const FMA: bool>(v: f32) -> f32 {
    // 1/sqrt(2*pi)
    const INV_SQRT_2PI: f32 = 0.398_942_3;
    let cdf = 0.5 * (1.0 + fast_erf_g::<FMA>(v * std::f32::consts::FRAC_1_SQRT_2));
    let pdf = INV_SQRT_2PI * fast_exp_g::<FMA>(-0.5 * v * v);
    cdf + v * pdf
}

#[inline(always)]
fn gelu_bwd_kernel<const FMA: bool>(x: &[f32], g: &[f32], dx: &mut [f32]) {
    let n = dx.len();
    let (x, g) = (&x[..n], &g[..n]);
    for i in 0..n {
        dx[i] = g[i] * gelu_grad::<FMA>(x[i]);
    }
}

multiversion!(fma pub(crate) fn gelu_bwd_chunk => gelu_bwd_kernel(x: &[f32], g: &[f32], dx: &mut [f32]));

/// [`gelu_bwd_chunk`] with `x` given as bf16 bit patterns (widened exactly).
#[inline(always)]
fn gelu_bwd_bf16_kernel<const FMA: bool>(x: &[u16], g: &[f32], dx: &mut [f32]) {
    let n = dx.len();
    let (x, g) = (&x[..n], &g[..n]);
    for i in 0..n {
        dx[i] = g[i] * gelu_grad::<FMA>(crate::bf16::widen(x[i]));
    }
}

multiversion!(fma pub(crate) fn gelu_bwd_bf16_chunk => gelu_bwd_bf16_kernel(x: &[u16], g: &[f32], dx: &mut [f32]));

/// Elementwise chunking for the GELU kernels.
pub(crate) fn for_elem_chunks(out: &mut [f32], f: impl Fn(usize, &mut [f32]) + Sync + Send) {
    const CHUNK: usize = 16 * 1024;
    if out.len() < PAR_MIN_ELEMS {
        f(0, out);
    } else {
        out.par_chunks_mut(CHUNK)
            .enumerate()
            .for_each(|(ci, c)| f(ci * CHUNK, c));
    }
}

struct GeluErfOp;

impl CustomOp1 for GeluErfOp {
    fn name(&self) -> &'static str {
        "dino-gelu-erf"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let x = f32_data(s, l, self.name())?;
        let mut y = uninit_f32(x.len());
        for_elem_chunks(&mut y, |a, c| {
            let n = c.len();
            gelu_fwd_chunk(&x[a..a + n], c)
        });
        Ok((CpuStorage::F32(y), l.shape().clone()))
    }

    fn bwd(&self, arg: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        Ok(Some(arg.apply_op2_no_bwd(grad, &GeluErfBwdOp)?))
    }
}

/// Backward of [`GeluErfOp`]: inputs (x, grad) -> `grad * (Phi(x) + x * phi(x))`.
struct GeluErfBwdOp;

impl CustomOp2 for GeluErfBwdOp {
    fn name(&self) -> &'static str {
        "dino-gelu-erf-bwd"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let x = f32_data(s1, l1, self.name())?;
        let g = f32_data(s2, l2, self.name())?;
        if x.len() != g.len() {
            candle_core::bail!(
                "{}: x {:?} and grad {:?} differ in size",
                self.name(),
                l1.shape(),
                l2.shape()
            );
        }
        let mut dx = uninit_f32(x.len());
        for_elem_chunks(&mut dx, |a, c| {
            let n = c.len();
            gelu_bwd_chunk(&x[a..a + n], &g[a..a + n], c)
        });
        Ok((CpuStorage::F32(dx), l1.shape().clone()))
    }
}

/// Exact GELU `x * Phi(x) = 0.5 x (1 + erf(x / sqrt 2))`, elementwise, any shape, with gradient.
pub fn gelu_erf(x: &Tensor) -> Result<Tensor> {
    if cpu_f32_fast_path(&[x]) {
        x.apply_op1(GeluErfOp)
    } else {
        x.gelu_erf()
    }
}

// ---------------------------------------------------------------------------------------------------------
// Bias add and linear
// ---------------------------------------------------------------------------------------------------------

#[inline(always)]
fn add_bias_kernel(y: &[f32], b: &[f32], out: &mut [f32]) {
    let c = b.len();
    for (yr, or) in y.chunks_exact(c).zip(out.chunks_exact_mut(c)) {
        let (yr, or) = (&yr[..c], &mut or[..c]);
        for i in 0..c {
            or[i] = yr[i] + b[i];
        }
    }
}

multiversion!(fn add_bias_chunk => add_bias_kernel(y: &[f32], b: &[f32], out: &mut [f32]));

/// Rows of `out = x + s · b` (`b` one row).
#[inline(always)]
fn add_scaled_bias_kernel(x: &[f32], b: &[f32], s: f32, out: &mut [f32]) {
    let c = b.len();
    for (xr, or) in x.chunks_exact(c).zip(out.chunks_exact_mut(c)) {
        let (xr, or) = (&xr[..c], &mut or[..c]);
        for i in 0..c {
            or[i] = xr[i] + s * b[i];
        }
    }
}

multiversion!(pub(crate) fn add_scaled_bias_rows => add_scaled_bias_kernel(x: &[f32], b: &[f32], s: f32, out: &mut [f32]));

/// `out = (x + s·b) + s·p` row by row (rows of `b.len()` values; without a bias `x + s·p`): the same
/// roundings as `out = x + s·b` ([`add_scaled_bias_rows`]) followed by `out += s·p`, in one pass.
#[inline(always)]
fn residual_scaled_kernel(x: &[f32], b: Option<&[f32]>, s: f32, p: &[f32], out: &mut [f32]) {
    let n = out.len();
    let (x, p) = (&x[..n], &p[..n]);
    match b {
        Some(b) if !b.is_empty() => {
            let c = b.len();
            for ((xr, pr), or) in x
                .chunks_exact(c)
                .zip(p.chunks_exact(c))
                .zip(out.chunks_exact_mut(c))
            {
                let (xr, pr, or) = (&xr[..c], &pr[..c], &mut or[..c]);
                for i in 0..c {
                    or[i] = (xr[i] + s * b[i]) + s * pr[i];
                }
            }
        }
        _ => {
            for i in 0..n {
                out[i] = x[i] + s * p[i];
            }
        }
    }
}

multiversion!(pub(crate) fn residual_scaled_rows => residual_scaled_kernel(x: &[f32], b: Option<&[f32]>, s: f32, p: &[f32], out: &mut [f32]));

#[inline(always)]
fn col_sum_kernel(g: &[f32], acc: &mut [f32]) {
    let c = acc.len();
    for gr in g.chunks_exact(c) {
        let gr = &gr[..c];
        for i in 0..c {
            acc[i] += gr[i];
        }
    }
}

multiversion!(pub(crate) fn col_sum_chunk => col_sum_kernel(g: &[f32], acc: &mut [f32]));

/// `y + b` for `y`: `(R, C)`, `b`: `(C)`; backward: `dy = grad`, `db = column sums of grad` (parallel, instead
/// of candle's generic strided reduction).
struct AddBiasOp;

impl CustomOp2 for AddBiasOp {
    fn name(&self) -> &'static str {
        "dino-add-bias"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let y = f32_data(s1, l1, self.name())?;
        let b = f32_data(s2, l2, self.name())?;
        let (rows, c) = last_dim(l1.shape(), self.name())?;
        let mut out = uninit_f32(rows * c);
        for_row_chunks(&mut out, rows, c, |r0, oc| {
            let n = oc.len();
            add_bias_chunk(&y[r0 * c..r0 * c + n], &b, oc)
        });
        Ok((CpuStorage::F32(out), l1.shape().clone()))
    }

    fn bwd(
        &self,
        _y: &Tensor,
        b: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let db = grad.apply_op1_no_bwd(&ColSumOp)?.reshape(b.shape())?;
        Ok((Some(grad.clone()), Some(db)))
    }
}

/// Sum over all but the last dimension: `(..., C)` -> `(C)`.
struct ColSumOp;

impl CustomOp1 for ColSumOp {
    fn name(&self) -> &'static str {
        "dino-col-sum"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let g = f32_data(s, l, self.name())?;
        let (rows, c) = last_dim(l.shape(), self.name())?;
        let out = if rows * c < PAR_MIN_ELEMS {
            let mut acc = vec![0f32; c];
            col_sum_chunk(&g, &mut acc);
            acc
        } else {
            let rpt = rows_per_task(rows, c).max(16);
            let partials: Vec<Vec<f32>> = g
                .par_chunks(rpt * c)
                .map(|gc| {
                    let mut acc = vec![0f32; c];
                    col_sum_chunk(gc, &mut acc);
                    acc
                })
                .collect();
            sum_in_order(partials, c)
        };
        Ok((CpuStorage::F32(out), Shape::from(c)))
    }
}

/// `y + bias` broadcast over the rows: `y`: `(..., C)`, `bias`: `(C)`, with a fast bias gradient.
pub fn add_bias(y: &Tensor, bias: &Tensor) -> Result<Tensor> {
    let c = y.dim(D::Minus1)?;
    if bias.dims() != [c] {
        candle_core::bail!(
            "add_bias: bias {:?} must be ({c}) to match {:?}",
            bias.dims(),
            y.dims()
        );
    }
    if cpu_f32_fast_path(&[y, bias]) {
        y.apply_op2(bias, AddBiasOp)
    } else {
        y.broadcast_add(bias)
    }
}

/// Column sums of a 2-D gradient `(R, C)` -> `(C)` (parallel; no backward).
pub(crate) fn col_sum(g: &Tensor) -> Result<Tensor> {
    g.apply_op1_no_bwd(&ColSumOp)
}

/// A linear layer on a 2-D input: `x`: `(R, in)`, `weight`: `(out, in)`, `bias`: `(out)` -> `(R, out)`
/// (the fused GEMM op of [`crate::fused::linear`]).
pub fn linear(x: &Tensor, weight: &Tensor, bias: Option<&Tensor>) -> Result<Tensor> {
    crate::fused::linear(x, weight, bias)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// [`residual_scaled_rows`] gives the bits of the two passes it replaces (`out = x + s·b`, then
    /// `out += s·p`), with and without a bias, over widths that leave partial vectors; it fails when the
    /// terms are added in another order (e.g. `x + s·(b + p)` or a fused multiply-add).
    #[test]
    fn residual_scaled_rows_rounds_as_the_two_passes() {
        for &(rows, d) in &[(3usize, 5usize), (40, 192), (7, 33)] {
            let n = rows * d;
            let val = |i: usize, m: usize| {
                ((i * m % 2003) as f32 / 2003.0 - 0.5) * (1 + i % 7) as f32 * 3.3
            };
            let x: Vec<f32> = (0..n).map(|i| val(i, 7919)).collect();
            let p: Vec<f32> = (0..n).map(|i| val(i, 104729)).collect();
            let b: Vec<f32> = (0..d).map(|i| val(i, 15485863)).collect();
            for s in [1.0f32 / 0.9, 1.25, 0.3] {
                for bias in [Some(b.as_slice()), None] {
                    let mut want = vec![0f32; n];
                    match bias {
                        Some(b) => add_scaled_bias_rows(&x, b, s, &mut want),
                        None => want.copy_from_slice(&x),
                    }
                    want.iter_mut().zip(&p).for_each(|(o, p)| *o += s * p);
                    let mut got = vec![f32::NAN; n];
                    residual_scaled_rows(&x, bias, s, &p, &mut got);
                    let same = got
                        .iter()
                        .zip(&want)
                        .all(|(g, w)| g.to_bits() == w.to_bits());
                    assert!(same, "{rows}x{d}, s {s}, bias {}", bias.is_some());
                }
            }
        }
    }

    /// [`layer_norm_bf16_out`] (and its kept-samples form) stores, under bf16 products, [`layer_norm`]'s
    /// output rounded to bf16 to the bit (one chunk and LayerNorm's parallel chunks, an odd width); under f32
    /// products it is [`layer_norm`] itself.
    #[test]
    fn layer_norm_bf16_out_is_the_rounded_layer_norm() -> Result<()> {
        let dev = candle_core::Device::Cpu;
        let eps = 1e-5;
        for &(rows, d) in &[(7usize, 9usize), (70, 16), (2100, 24), (1400, 33)] {
            let x: Vec<f32> = (0..rows * d)
                .map(|i| ((i * 7919 % 1009) as f32 / 1009.0 - 0.5) * (1 + i % 5) as f32)
                .collect();
            let x = Tensor::from_vec(x, (rows, d), &dev)?;
            let w = Tensor::from_vec((0..d).map(|i| 0.5 + i as f32 / d as f32).collect(), d, &dev)?;
            let b = Tensor::from_vec((0..d).map(|i| i as f32 / 7.0 - 1.0).collect(), d, &dev)?;
            let samples = 7;
            let kept = [0usize, 3, 4];
            let pairs = |bf16: bool| -> Result<Vec<(Tensor, Tensor)>> {
                let run = || -> Result<Vec<(Tensor, Tensor)>> {
                    Ok(vec![
                        (
                            layer_norm_bf16_out(&x, &w, &b, eps, None)?,
                            layer_norm(&x, &w, &b, eps)?,
                        ),
                        (
                            layer_norm_bf16_out(&x, &w, &b, eps, Some((samples, &kept)))?,
                            layer_norm_kept(&x, &w, &b, eps, samples, &kept)?,
                        ),
                    ])
                };
                if bf16 {
                    crate::bf16::bf16_products(run)
                } else {
                    run()
                }
            };
            for (out, f32_out) in pairs(false)? {
                assert_eq!(out.dtype(), candle_core::DType::F32, "{rows}x{d}");
                let diff = (&out - &f32_out)?.abs()?.max_keepdim(0)?.max(1)?;
                assert_eq!(diff.to_vec1::<f32>()?, vec![0.0], "{rows}x{d}");
            }
            for (out, f32_out) in pairs(true)? {
                assert_eq!(out.dtype(), candle_core::DType::BF16, "{rows}x{d}");
                let got: Vec<u16> = out
                    .flatten_all()?
                    .to_vec1::<half::bf16>()?
                    .iter()
                    .map(|v| v.to_bits())
                    .collect();
                let f = f32_out.flatten_all()?.to_vec1::<f32>()?;
                // Round to nearest, ties to even, by the direct formula.
                let want: Vec<u16> = f
                    .iter()
                    .map(|v| {
                        let u = v.to_bits();
                        ((u + 0x7fff + ((u >> 16) & 1)) >> 16) as u16
                    })
                    .collect();
                assert_eq!(got, want, "{rows}x{d}");
            }
        }
        Ok(())
    }

    #[test]
    fn fast_exp_matches_std() {
        // Both forms: plain multiply-adds, and fused ones (`mul_add` here is libm's correctly rounded fmaf, the
        // same bits as the FMA instructions of the kernels' vector versions).
        for (fma, f) in [
            (false, fast_exp as fn(f32) -> f32),
            (true, fast_exp_g::<true>),
        ] {
            let mut worst = 0f64;
            for i in -8700..=8800 {
                let x = i as f32 * 0.01;
                let a = f(x) as f64;
                let b = (x as f64).exp();
                worst = worst.max(((a - b) / b).abs());
            }
            assert!(worst < 5e-7, "fma {fma}: max relative error {worst}");
        }
    }

    #[test]
    fn fast_erf_matches_reference() {
        for (fma, f) in [
            (false, fast_erf as fn(f32) -> f32),
            (true, fast_erf_g::<true>),
        ] {
            let mut worst = 0f64;
            for i in -6000..=6000 {
                let x = i as f32 * 0.001;
                let a = f(x) as f64;
                let b = candle_core::cpu::erf::erf_f64(x as f64);
                worst = worst.max((a - b).abs());
            }
            assert!(worst < 5e-7, "fma {fma}: max absolute error {worst}");
        }
    }

    /// LayerNorm of the kept samples' rows read in place against LayerNorm of the gathered rows: the same
    /// outputs, input gradient (zeros on the left-out samples' rows) and weight and bias gradients, bit for bit
    /// (the partial sums are grouped alike); on one thread's size and on a size the pool splits, with a run of
    /// samples left out, one left out at each end, and every sample kept.
    #[test]
    fn layer_norm_of_kept_rows_equals_layer_norm_of_gathered_rows() -> Result<()> {
        let dev = candle_core::Device::Cpu;
        let pat = |n: usize, seed: u64| -> Vec<f32> {
            (0..n)
                .map(|i| ((i as u64 * 2654435761 + seed * 40503) % 10007) as f32 / 5003.5 - 1.0)
                .collect()
        };
        for &(samples, per, d) in &[(5usize, 7usize, 8usize), (16, 197, 24)] {
            let all: Vec<usize> = (0..samples).collect();
            let some: Vec<usize> = (0..samples).filter(|i| i % 4 != 1 && *i != 2).collect();
            let inner: Vec<usize> = (1..samples - 1).collect();
            for kept in [some, inner, all] {
                let x = candle_core::Var::from_vec(
                    pat(samples * per * d, 1),
                    (samples * per, d),
                    &dev,
                )?;
                let w = candle_core::Var::from_vec(pat(d, 2), d, &dev)?;
                let b = candle_core::Var::from_vec(pat(d, 3), d, &dev)?;
                let up =
                    Tensor::from_vec(pat(kept.len() * per * d, 4), (kept.len() * per, d), &dev)?;
                let y = layer_norm_kept(&x, &w, &b, 1e-6, samples, &kept)?;
                let xk = crate::fused::sample_rows(&x, samples, &kept)?;
                let yr = layer_norm(&xk, &w, &b, 1e-6)?;
                let what = format!("{samples}x{per}x{d}, kept {kept:?}");
                assert_eq!(y.dims(), yr.dims(), "{what}");
                let diff = |a: &Tensor, b: &Tensor| -> Result<f32> {
                    (a - b)?.abs()?.flatten_all()?.max(0)?.to_scalar::<f32>()
                };
                assert_eq!(diff(&y, &yr)?, 0.0, "forward: {what}");
                let g = (&y * &up)?.sum_all()?.backward()?;
                let gr = (&yr * &up)?.sum_all()?.backward()?;
                assert_eq!(
                    diff(g.get(&x).unwrap(), gr.get(&x).unwrap())?,
                    0.0,
                    "dx: {what}"
                );
                for (name, v) in [("w", &w), ("b", &b)] {
                    let dm = diff(g.get(v).unwrap(), gr.get(v).unwrap())?;
                    assert_eq!(dm, 0.0, "d{name}: {what}");
                }
            }
        }
        Ok(())
    }

    #[test]
    fn parallel_reductions_are_reproducible() -> Result<()> {
        // LayerNorm's weight/bias gradients and the column sum add per-chunk partial sums; the result must not
        // depend on how rayon scheduled the chunks (resumed training must equal uninterrupted training).
        let dev = candle_core::Device::Cpu;
        let (rows, d) = (3152, 192);
        let vals = |seed: u32| -> Vec<f32> {
            (0..rows * d)
                .map(|i| {
                    ((i as u32).wrapping_mul(2_654_435_761).wrapping_add(seed) % 1000) as f32
                        / 250.0
                        - 2.0
                })
                .collect()
        };
        let x = candle_core::Var::from_vec(vals(1), (rows, d), &dev)?;
        let w = candle_core::Var::from_vec(vals(2)[..d].to_vec(), d, &dev)?;
        let b = candle_core::Var::from_vec(vals(3)[..d].to_vec(), d, &dev)?;
        let r = Tensor::from_vec(vals(4), (rows, d), &dev)?;
        let run = || -> Result<(Vec<f32>, Vec<f32>)> {
            let y = layer_norm(x.as_tensor(), w.as_tensor(), b.as_tensor(), 1e-6)?;
            let grads = (y * &r)?.sum_all()?.backward()?;
            let gw = grads
                .get(w.as_tensor())
                .expect("weight gradient")
                .to_vec1::<f32>()?;
            let cs = col_sum(&r)?.to_vec1::<f32>()?;
            Ok((gw, cs))
        };
        let first = run()?;
        for i in 0..20 {
            // Alternate callers inside and outside the pool: rayon splits work differently for each.
            let again = if i % 2 == 0 {
                rayon::scope(|_| run())?
            } else {
                run()?
            };
            let same =
                |a: &[f32], b: &[f32]| a.iter().zip(b).all(|(x, y)| x.to_bits() == y.to_bits());
            assert!(
                same(&first.0, &again.0),
                "weight gradient changed on run {i}"
            );
            assert!(same(&first.1, &again.1), "column sum changed on run {i}");
        }
        Ok(())
    }
}
