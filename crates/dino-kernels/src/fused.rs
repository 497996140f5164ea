//! GEMM-level fused layers with hand-written backward passes, calling the `gemm` crate (candle's own CPU GEMM)
//! directly with strides:
//! - [`linear`]: `y = x Wᵀ + b` as one op: the bias is written into the output before the GEMM accumulates
//!   onto it, and the backward pass computes `dx = dy W`, `dW = dyᵀ x` (already in `W`'s `(out, in)` layout,
//!   no transposed copy; the two GEMMs run concurrently, one thread each) and `db` = column sums, instead of
//!   candle's matmul + transpose + broadcast-add graph;
//! - [`linear_gelu`]: `GELU(x Wᵀ + b)` with the pre-activation kept by the op for the backward pass (one graph
//!   node and one gradient accumulation fewer than linear then GELU);
//! - [`residual`]: `x + s_i · y_i` per sample `i` (stochastic depth's kept/dropped scale, 1 without drop path),
//!   replacing candle's reshape + broadcast-mul + add;
//! - [`linear_residual`]: `x + s_i · (h Wᵀ + b)`, a linear layer and its residual sum in one op (the output
//!   starts as `x + s_i · b` and the GEMM accumulates onto it; dropped samples skip their GEMM rows).
//!
//! Every op takes 2-D row-major f32 CPU tensors; other devices and dtypes use candle's composed ops.
//!
//! The linear layers' products run in f32 by default; [`set_matmul_precision`] switches the calling thread's
//! linear layers (and attention heads) to bf16 products with f32 sums ([`MatmulPrecision::Bf16`], see
//! [`crate::bf16`]).

use std::cell::Cell;
use std::sync::{Arc, Mutex};

use candle_core::{CpuStorage, CustomOp1, CustomOp2, CustomOp3, Layout, Result, Shape, Tensor};
use gemm::{gemm, Parallelism};
use rayon::prelude::*;

use crate::bf16::{self, bf16_bits_mut, uninit_bf16};
use crate::ops::{self, f32_data};

/// The arithmetic of the linear layers' matrix products, as `torch.set_float32_matmul_precision`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum MatmulPrecision {
    /// f32 products and sums (the default; what the golden tests pin).
    #[default]
    Highest,
    /// Operands rounded to bfloat16, products summed in f32, on CPUs with AVX-512 BF16 (f32 elsewhere): the
    /// linear layers (ViT blocks, patch embedding, head MLP) and the attention heads' products run at about
    /// twice the f32 GEMM speed. Outputs, LayerNorm, softmax, GELU, the loss, the weight-normalised last
    /// layer and the optimiser stay f32; the pre-activation GELU keeps for its backward pass is kept in bf16,
    /// as PyTorch's autocast keeps it.
    Bf16,
}

impl MatmulPrecision {
    /// Whether [`MatmulPrecision::Bf16`] runs in bf16 here: the CPU has AVX-512 BF16 and runs it faster than f32
    /// (see [`bf16::Bf16Gemm`]); otherwise bf16 requests run in f32.
    pub fn bf16_supported() -> bool {
        bf16::active()
    }

    /// The names [`MatmulPrecision::from_str`](std::str::FromStr) accepts.
    pub const NAMES: &'static [&'static str] = &["highest", "bf16"];
}

impl std::str::FromStr for MatmulPrecision {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s.to_ascii_lowercase().as_str() {
            "highest" => Ok(Self::Highest),
            "bf16" => Ok(Self::Bf16),
            _ => Err(format!(
                "expected one of {}, got `{s}`",
                Self::NAMES.join(", ")
            )),
        }
    }
}

impl std::fmt::Display for MatmulPrecision {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::Highest => "highest",
            Self::Bf16 => "bf16",
        })
    }
}

thread_local! {
    pub(crate) static PRECISION: Cell<MatmulPrecision> = const { Cell::new(MatmulPrecision::Highest) };
}

/// Sets the precision of the linear layers run on the calling thread from now on (forward and their backward
/// passes). Per thread, so tests and models on other threads are unaffected.
pub fn set_matmul_precision(precision: MatmulPrecision) {
    PRECISION.with(|p| p.set(precision));
}

/// The calling thread's linear-layer precision (default [`MatmulPrecision::Highest`]).
pub fn matmul_precision() -> MatmulPrecision {
    PRECISION.with(|p| p.get())
}

/// Runs `f` with the calling thread's linear layers at `precision`, then restores the previous setting.
pub fn with_matmul_precision<R>(precision: MatmulPrecision, f: impl FnOnce() -> R) -> R {
    crate::dispatch::with_thread_value(&PRECISION, precision, f)
}

thread_local! {
    pub(crate) static NO_GRAD: Cell<bool> = const { Cell::new(false) };
}

/// Runs `f` without recording the backward passes of this crate's fused ops on the calling thread, as
/// `torch.no_grad()`: linear + GELU layers do not keep their pre-activation and attention does not keep its
/// probabilities (the teacher's forward pass, evaluation). Same outputs; no gradient flows back through them.
pub fn no_grad<R>(f: impl FnOnce() -> R) -> R {
    crate::dispatch::with_thread_value(&NO_GRAD, true, f)
}

/// Whether an op on `inputs` records its backward pass: some input tracks a gradient and no [`no_grad`] scope
/// is active on the calling thread.
pub(crate) fn records_grad(inputs: &[&Tensor]) -> bool {
    !NO_GRAD.with(|g| g.get()) && inputs.iter().any(|t| t.track_op())
}

/// The rayon parallelism of a GEMM big enough to split (`m * n * k` multiply-adds).
fn parallelism(m: usize, n: usize, k: usize) -> Parallelism {
    let threads = rayon::current_num_threads();
    if threads > 1 && m * n * k >= 1 << 18 {
        Parallelism::Rayon(threads)
    } else {
        Parallelism::None
    }
}

/// Most rows one single-threaded GEMM call takes.
///
/// gemm 0.19 runs 7-15% slower on these row-major operands past ~2000 rows: measured single-threaded on the
/// cifar shapes (4160 rows), the linear forward with k = 768 went from 91 to 100 GFLOP/s and the input gradient
/// with k = 576 from 85 to 97 in blocks of ~1000-1600 rows, while 1576-row calls (imagenet) gain nothing from a
/// split.
const GEMM_MAX_ROWS: usize = 1600;

/// Rows `[lo, hi)` of part `i` of `n` rows split in `parts` near-equal parts.
fn part(n: usize, parts: usize, i: usize) -> (usize, usize) {
    (n * i / parts, n * (i + 1) / parts)
}

/// `rows` split into near-equal `(start, len)` blocks of at most [`GEMM_MAX_ROWS`].
fn row_blocks(rows: usize) -> Vec<(usize, usize)> {
    let n = rows.div_ceil(GEMM_MAX_ROWS);
    (0..n)
        .map(|i| part(rows, n, i))
        .map(|(lo, hi)| (lo, hi - lo))
        .collect()
}

/// `dst (m, n) [+]= lhs (m, k) · rhs (k, n)`; each matrix is `(ptr, col stride, row stride)` in elements.
/// With `accumulate` the product is added to `dst`'s contents, otherwise `dst` is overwritten.
///
/// # Safety
/// Every pointer must be valid for the addresses its strides reach, and `dst` must not alias the inputs.
#[allow(clippy::too_many_arguments)]
pub(crate) unsafe fn gemm_strided(
    m: usize,
    n: usize,
    k: usize,
    dst: (*mut f32, isize, isize),
    accumulate: bool,
    lhs: (*const f32, isize, isize),
    rhs: (*const f32, isize, isize),
    par: Parallelism,
) {
    gemm(
        m,
        n,
        k,
        dst.0,
        dst.1,
        dst.2,
        accumulate,
        lhs.0,
        lhs.1,
        lhs.2,
        rhs.0,
        rhs.1,
        rhs.2,
        if accumulate { 1.0 } else { 0.0 },
        1.0,
        false,
        false,
        false,
        par,
    )
}

fn dims2(l: &Layout, what: &str) -> Result<(usize, usize)> {
    match l.dims() {
        [r, c] => Ok((*r, *c)),
        d => candle_core::bail!("{what}: a 2-D tensor is required, got {d:?}"),
    }
}

/// Rows of `y [+]= x Wᵀ`: `n` rows of `x` (row stride `inp`) times `W` `(out, inp)` (read as `Wᵀ` through
/// strides) into `n` rows of `y` (row stride `out`); with `accumulate` the product is added to `y`'s contents.
///
/// # Safety
/// The pointers must be valid for those rows, and the `y` rows must be the caller's own.
#[allow(clippy::too_many_arguments)]
unsafe fn y_rows(
    n: usize,
    out: usize,
    inp: usize,
    y: *mut f32,
    accumulate: bool,
    x: *const f32,
    w: *const f32,
    par: Parallelism,
) {
    gemm_strided(
        n,
        out,
        inp,
        (y, 1, out as isize),
        accumulate,
        (x, 1, inp as isize),
        (w, inp as isize, 1),
        par,
    )
}

/// `x Wᵀ (+ b)` into a fresh `(R, out)` buffer.
fn linear_fwd(
    x: &[f32],
    r: usize,
    inp: usize,
    w: &[f32],
    out: usize,
    b: Option<&[f32]>,
) -> Vec<f32> {
    let mut y = crate::ops::uninit_f32(r * out);
    let threads = rayon::current_num_threads();
    if threads > 1 && wide(r, out) && r >= 64 * threads {
        // Each pool thread takes a slice of the outputs for every row (see `wide`; with fewer rows gemm's own
        // threads split the whole product).
        let yp = y.as_mut_ptr() as usize;
        (0..threads).into_par_iter().for_each(|i| {
            let (c0, c1) = part(out, threads, i);
            for (s0, sn) in row_blocks(r).into_iter().filter(|_| c1 > c0) {
                let yb = (yp as *mut f32).wrapping_add(s0 * out + c0);
                // SAFETY: x is (r, inp), W (out, inp) is read at rows c0..c1, and columns c0..c1 of y's rows
                // s0..s0+sn are this task's own.
                unsafe {
                    if let Some(b) = b {
                        for row in 0..sn {
                            std::ptr::copy_nonoverlapping(
                                b[c0..].as_ptr(),
                                yb.add(row * out),
                                c1 - c0,
                            );
                        }
                    }
                    gemm_strided(
                        sn,
                        c1 - c0,
                        inp,
                        (yb, 1, out as isize),
                        b.is_some(),
                        (x[s0 * inp..].as_ptr(), 1, inp as isize),
                        (w[c0 * inp..].as_ptr(), inp as isize, 1),
                        Parallelism::None,
                    )
                }
            }
        });
        return y;
    }
    // Row blocks, one single-threaded GEMM (bias first) per pool thread: no synchronisation inside a GEMM.
    let rows_per = if threads > 1 && r >= 64 * threads {
        r.div_ceil(threads)
    } else {
        r.max(1)
    };
    let block = |r0: usize, yb: &mut [f32]| {
        let rows = yb.len() / out.max(1);
        let par = if rows_per == r {
            parallelism(rows, out, inp)
        } else {
            Parallelism::None
        };
        // A single-threaded GEMM goes through its rows in sub-blocks (see `row_blocks`).
        let subs = if matches!(par, Parallelism::None) {
            row_blocks(rows)
        } else {
            vec![(0, rows)]
        };
        for (s0, sn) in subs {
            let yb = &mut yb[s0 * out..(s0 + sn) * out];
            if let Some(b) = b {
                yb.chunks_exact_mut(out)
                    .for_each(|row| row.copy_from_slice(b));
            }
            // SAFETY: x rows r0+s0.. are (sn, inp), w is (out, inp), yb is (sn, out) and this block's own.
            unsafe {
                y_rows(
                    sn,
                    out,
                    inp,
                    yb.as_mut_ptr(),
                    b.is_some(),
                    x[(r0 + s0) * inp..].as_ptr(),
                    w.as_ptr(),
                    par,
                )
            }
        }
    };
    if out == 0 {
        return y;
    }
    if rows_per == r {
        block(0, &mut y);
    } else {
        y.par_chunks_mut(rows_per * out)
            .enumerate()
            .for_each(|(i, yb)| block(i * rows_per, yb));
    }
    y
}

/// Rows per product of a scaled `linear_residual` branch under bf16 products: its f32 scratch (128 x 192 = 96
/// KiB for the ViT's projections) stays in L2 until the residual pass reads it.
const RESIDUAL_CHUNK_ROWS: usize = 128;

/// Rows per block of the row-blocked `GELU(x Wᵀ + b)`: a block's GEMM output (256 x 768 f32 = 768 KiB for
/// the ViT MLP) is still in the core's L2 cache when the bias and GELU pass reads it.
const GELU_BLOCK_ROWS: usize = 256;

/// `(pre, act)` of `GELU(x Wᵀ + b)`, `pre = x Wᵀ + b` kept for the backward pass: blocks of
/// [`GELU_BLOCK_ROWS`] rows shared among the pool threads, each a single-threaded GEMM (no bias in the GEMM)
/// followed at once by the bias + GELU pass over the block while it is in cache. With `bf16` the GEMMs take
/// bf16 products (W packed once, each block's rows packed as it goes), and the kept `pre` is its bf16
/// rounding (see [`Pre`]), each block's GEMM writing a scratch block instead.
#[allow(clippy::too_many_arguments)]
fn linear_gelu_fwd(
    x: &[f32],
    r: usize,
    inp: usize,
    w: &[f32],
    out: usize,
    b: Option<&[f32]>,
    keep_pre: bool,
    bf16: bool,
) -> (Option<Pre>, Vec<f32>) {
    let mut act = crate::ops::uninit_f32(r * out);
    if out == 0 {
        return (keep_pre.then(|| Pre::keep(Vec::new(), bf16)), act);
    }
    // bf16 products: W packed once for every block.
    let wp = bf16.then(|| bf16::pack_nk(w, out, inp, inp, bf16::NR));
    let n = GELU_BLOCK_ROWS * out;
    // Block `i` of rows: the GEMM writes it (into `pb`, or straight into the output when the pre-activation
    // is not kept), then bias + GELU run on it while it is in L2.
    let block = |i: usize, pb: &mut [f32], ab: Option<&mut [f32]>| {
        let r0 = i * GELU_BLOCK_ROWS;
        let rows = pb.len() / out;
        // SAFETY: x rows r0.. are (rows, inp), w is (out, inp), pb is this block's own (rows, out); with
        // bf16 products the CPU has them (checked when the op was built).
        unsafe {
            match &wp {
                Some(wp) => bf16::gemm_rows(
                    rows,
                    out,
                    inp,
                    &x[r0 * inp..],
                    wp,
                    pb.as_mut_ptr(),
                    out,
                    false,
                ),
                None => y_rows(
                    rows,
                    out,
                    inp,
                    pb.as_mut_ptr(),
                    false,
                    x[r0 * inp..].as_ptr(),
                    w.as_ptr(),
                    Parallelism::None,
                ),
            }
        }
        match ab {
            Some(ab) => ops::bias_gelu_fwd_rows(pb, b, ab, out),
            None => ops::bias_gelu_inplace_rows(pb, b, out),
        }
    };
    if !keep_pre {
        act.par_chunks_mut(n)
            .enumerate()
            .for_each(|(i, ab)| block(i, ab, None));
        return (None, act);
    }
    if bf16 {
        let pre = blocks_with_bf16_pre(&mut act, n, |i, pb, ab, pre| {
            block(i, pb, Some(ab));
            bf16::round_to_bf16(pb, pre);
        });
        return (Some(Pre::Bf16(pre)), act);
    }
    let mut pre = crate::ops::uninit_f32(r * out);
    pre.par_chunks_mut(n)
        .zip(act.par_chunks_mut(n))
        .enumerate()
        .for_each(|(i, (pb, ab))| block(i, pb, Some(ab)));
    (Some(Pre::F32(pre)), act)
}

/// The row blocks of `n` activation values shared among the pool threads, each given a scratch block for its
/// GEMM output (it stays in cache, unlike the kept tensor) and its part of the kept bf16 pre-activation (see
/// [`Pre`]), which `block(i, scratch, act, pre)` writes; returns that pre-activation.
fn blocks_with_bf16_pre<T: Send>(
    act: &mut [T],
    n: usize,
    block: impl Fn(usize, &mut [f32], &mut [T], &mut [u16]) + Sync,
) -> Vec<half::bf16> {
    let mut pre = uninit_bf16(act.len());
    bf16_bits_mut(&mut pre)
        .par_chunks_mut(n)
        .zip(act.par_chunks_mut(n))
        .enumerate()
        .for_each(|(i, (pre, ab))| {
            let mut pb = crate::ops::uninit_f32(ab.len());
            block(i, &mut pb, ab, pre)
        });
    pre
}

/// [`linear_gelu_fwd`] with bf16 products and the activation stored in bf16 (rounded as every bf16 packing
/// rounds it, so that a bf16 product reading it gives the bits it would give reading the f32 activation):
/// `(pre, act)`, `pre` (rounded to bf16, see [`Pre`]) kept for the backward pass with `keep_pre`. Blocks of
/// [`GELU_BLOCK_ROWS`] rows as there, the GEMM output of a block (its pre-activation, in a scratch block) in
/// cache while bias + GELU and the roundings run on it, a row at a time.
fn linear_gelu_fwd_bf16_out(
    x: bf16::Rows,
    r: usize,
    inp: usize,
    w: &[f32],
    out: usize,
    b: Option<&[f32]>,
    keep_pre: bool,
) -> (Option<Vec<half::bf16>>, Vec<half::bf16>) {
    let mut act = uninit_bf16(r * out);
    if out == 0 {
        return (keep_pre.then(Vec::new), act);
    }
    let wp = bf16::pack_nk(w, out, inp, inp, bf16::NR);
    let n = GELU_BLOCK_ROWS * out;
    // Block `i`: the GEMM writes its pre-activation into the scratch block `pb`, then each row gets its bias
    // (in `pb`), GELU into `row` and the rounding into the activation, and with `pre` the rounding of the
    // pre-activation into it (the bf16 pre-activation of [`Pre`]).
    let block = |i: usize, pb: &mut [f32], ab: &mut [half::bf16], pre: Option<&mut [u16]>| {
        let r0 = i * GELU_BLOCK_ROWS;
        let rows = pb.len() / out;
        // SAFETY: x rows r0.. are (rows, inp), wp is W packed, pb is this block's own (rows, out); bf16
        // products run only where the CPU has them (checked when the op was built).
        unsafe {
            bf16::gemm_rows_src(
                rows,
                out,
                inp,
                x.from(r0 * inp),
                &wp,
                pb.as_mut_ptr(),
                out,
                crate::amx::Init::Zero,
            )
        }
        let mut row = vec![0f32; out];
        let mut pre_rows = pre.map(|p| p.chunks_exact_mut(out));
        for (pr, ar) in pb
            .chunks_exact_mut(out)
            .zip(bf16_bits_mut(ab).chunks_exact_mut(out))
        {
            ops::bias_gelu_fwd_rows(pr, b, &mut row, out);
            bf16::round_to_bf16(&row, ar);
            // The pre-activation row's rounding while it is in L1.
            if let Some(p) = pre_rows.as_mut().and_then(|it| it.next()) {
                bf16::round_to_bf16(pr, p);
            }
        }
    };
    if keep_pre {
        let pre = blocks_with_bf16_pre(&mut act, n, |i, pb, ab, pre| block(i, pb, ab, Some(pre)));
        return (Some(pre), act);
    }
    act.par_chunks_mut(n).enumerate().for_each(|(i, ab)| {
        let mut pb = crate::ops::uninit_f32(ab.len());
        block(i, &mut pb, ab, None)
    });
    (None, act)
}

/// Rows of `dx = g W`: `n` rows of `g` (row stride `out`) times `W` `(out, inp)` into `n` rows of `dx` (row
/// stride `inp`), all row-major.
///
/// # Safety
/// The pointers must be valid for those rows, and the `dx` rows must be the caller's own.
#[allow(clippy::too_many_arguments)]
unsafe fn dx_rows(
    n: usize,
    inp: usize,
    out: usize,
    dx: *mut f32,
    g: *const f32,
    w: *const f32,
    par: Parallelism,
) {
    gemm_strided(
        n,
        inp,
        out,
        (dx, 1, inp as isize),
        false,
        (g, 1, out as isize),
        (w, 1, inp as isize),
        par,
    )
}

/// `dW (out, inp) [+]= gᵀ x` over `n` rows of `g` (row stride `out`) and `x` (row stride `inp`); with
/// `accumulate` the product is added to `dw`'s contents.
///
/// # Safety
/// The pointers must be valid for those rows, and `dw` (`out * inp` values) must be the caller's own.
#[allow(clippy::too_many_arguments)]
unsafe fn dw_rows(
    out: usize,
    inp: usize,
    n: usize,
    dw: *mut f32,
    accumulate: bool,
    g: *const f32,
    x: *const f32,
    par: Parallelism,
) {
    gemm_strided(
        out,
        inp,
        n,
        (dw, 1, inp as isize),
        accumulate,
        (g, out as isize, 1),
        (x, 1, inp as isize),
        par,
    )
}

/// Bytes of one block of `gᵀ` that [`dw_cols_t`] transposes before its product (it stays in L2 while gemm
/// packs it). One thread, the head's `dW` (`(32,768, 256)` of 512 rows): 118 / 127 / 131 / 131 / 132 GFLOP/s
/// with blocks of 128 KiB / 256 KiB / 512 KiB / 1 MiB / 4 MiB; 64 rows: 102 / 104 / 100-102 / 98-101 / 93-97.
const DW_T_BLOCK_BYTES: usize = 512 << 10;

/// Rows of `g` (the products' k) in one block of [`dw_cols_t`].
const DW_T_BLOCK_K: usize = 512;

/// Outputs from which a layer with fewer rows than outputs is "wide" (the DINO head's layers; see [`wide`]).
const WIDE_MIN_OUT: usize = 1024;

/// Whether the f32 products of a layer of `r` rows and `out` outputs take the wide layer's splits: the forward
/// pass and `dx = g W` split over the outputs (each pool thread packs its own slice of `W`, where a split by
/// rows has every thread pack all of it: 64 MiB for the head's 65,536 x 256), and `dW = gᵀ x` through
/// [`dw_cols_t`]'s transposed blocks of `g` (gemm multiplies a strided `gᵀ` in place, a cache line per k step
/// `out` values apart). One thread, half of the head's 256 -> 65,536 layer (512 rows): `dW` 87-89 -> 129-132
/// GFLOP/s (transposes included), the forward 128-129 -> 140-141, `dx` 143 -> 146-148; 128 and 64 rows gain
/// more (forward 86 -> 110-113, `dx` 59-61 -> 87-89).
fn wide(r: usize, out: usize) -> bool {
    out >= WIDE_MIN_OUT && r < out
}

/// `dW[i][j] (+)= Σ_l g[l][i] x[l][j]` for the dW rows `i` in `rows` and columns `j` in `cols`, over the rows
/// `l` in `ks` of `g` `(_, out)` and `x` `(_, inp)`: `g`'s columns are transposed in blocks (at most
/// [`DW_T_BLOCK_K`] of its rows, about [`DW_T_BLOCK_BYTES`]) into a row-major scratch, each multiplied while
/// it is in cache; the first block of rows overwrites `dW`, the later ones add to it.
///
/// # Safety
/// The pointers must be valid for those matrices, `dw` `(out, inp)` rows `rows` at columns `cols` must be the
/// caller's own, and [`crate::small_gemm::available`] must be true.
#[allow(clippy::too_many_arguments)]
unsafe fn dw_cols_t(
    rows: std::ops::Range<usize>,
    cols: std::ops::Range<usize>,
    ks: std::ops::Range<usize>,
    out: usize,
    inp: usize,
    dw: *mut f32,
    g: *const f32,
    x: *const f32,
) {
    let kb = DW_T_BLOCK_K.min(ks.len()).max(1);
    let mb = (DW_T_BLOCK_BYTES / (4 * kb))
        .next_multiple_of(16)
        .min(rows.len())
        .max(1);
    let mut scratch = ops::uninit_f32(mb * kb);
    for l0 in ks.clone().step_by(kb) {
        let kn = kb.min(ks.end - l0);
        for i0 in rows.clone().step_by(mb) {
            let n = mb.min(rows.end - i0);
            crate::small_gemm::transpose_into(g.add(l0 * out + i0), kn, n, out, &mut scratch);
            gemm_strided(
                n,
                cols.len(),
                kn,
                (dw.add(i0 * inp + cols.start), 1, inp as isize),
                l0 > ks.start,
                (scratch.as_ptr(), 1, kn as isize),
                (x.add(l0 * inp + cols.start), 1, inp as isize),
                Parallelism::None,
            )
        }
    }
}

/// `n` uninitialised buffers of `len` values for the partial sums of pool tasks 1..=n (each task writes all of
/// its own before any is read), and their addresses for the tasks.
fn task_partials(n: usize, len: usize) -> (Vec<Vec<f32>>, Vec<usize>) {
    let mut partials: Vec<Vec<f32>> = (0..n).map(|_| ops::uninit_f32(len)).collect();
    let ptrs = partials
        .iter_mut()
        .map(|p| p.as_mut_ptr() as usize)
        .collect();
    (partials, ptrs)
}

/// Adds the per-task partials to `acc`, in task order (the same sum whatever rayon's scheduling).
fn add_partials<'a>(acc: &mut [f32], partials: impl IntoIterator<Item = &'a [f32]>) {
    for p in partials {
        ops::for_elem_chunks(acc, |a, c| {
            let n = c.len();
            c.iter_mut().zip(&p[a..a + n]).for_each(|(o, v)| *o += v)
        });
    }
}

/// A CPU tensor's contiguous data as an operand of the products: f32, or bf16 (a tensor stored in bf16 by
/// [`linear_gelu_bf16_out`]).
enum RowsData<'a> {
    F32(std::borrow::Cow<'a, [f32]>),
    Bf16(&'a [u16]),
}

impl RowsData<'_> {
    /// The data as [`bf16::Rows`].
    fn rows(&self) -> bf16::Rows<'_> {
        match self {
            RowsData::F32(d) => bf16::Rows::F32(d),
            RowsData::Bf16(d) => bf16::Rows::Bf16(d),
        }
    }

    /// The data in f32 (bf16 widened, exactly).
    fn f32(&self) -> std::borrow::Cow<'_, [f32]> {
        let r = self.rows();
        r.to_f32(0..r.len())
    }
}

/// `s`'s contiguous data: f32 (gathered when strided) or bf16 bit patterns (contiguous only).
fn rows_data<'a>(s: &'a CpuStorage, l: &Layout, op: &str) -> Result<RowsData<'a>> {
    match s {
        CpuStorage::BF16(d) => match l.contiguous_offsets() {
            Some((a, b)) => Ok(RowsData::Bf16(bf16::bf16_bits(&d[a..b]))),
            None => candle_core::bail!("{op}: a strided bf16 input"),
        },
        _ => Ok(RowsData::F32(f32_data(s, l, op)?)),
    }
}

/// The input and weight gradients of a linear layer, `dx = g W` and `dW = gᵀ x`, in one op: inputs
/// `(g (R, out), W (out, in), x (R, in))`, output `dx` (or an empty tensor when the input needs no gradient);
/// `dW` is left in the op for the caller. With a pool of `t > 1` threads, task `i` computes the `i`-th slice of
/// the rows of `dx` and, with at least as many rows `R` as outputs, the partial `dW` over the same rows (the
/// partials are added in task order; each task packs only its own rows of `g` and `x`), otherwise the `i`-th
/// slice of `dW`'s longer side. Each is a single-threaded GEMM: the tasks have equal work whatever the GEMMs'
/// shapes and need no synchronisation inside a GEMM.
struct LinearGradOp {
    /// Whether `dx` is computed (the patch embedding's input, the image, needs none).
    need_dx: bool,
    /// Products in bf16.
    bf16: bool,
    /// For `GELU(x Wᵀ + b)` with enough rows (f32 or bf16 products): the saved pre-activation. The op's
    /// gradient input is then the gradient of the GELU output, and GELU' is applied block by block (see
    /// [`linear_grad_blocked`]).
    gelu_pre: Option<Arc<Pre>>,
    dw: Mutex<Option<Vec<f32>>>,
    /// The bias gradient, computed with `gelu_pre` only.
    db: Mutex<Option<Vec<f32>>>,
}

impl CustomOp3 for LinearGradOp {
    fn name(&self) -> &'static str {
        "dino-linear-grad"
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
        let (r, out) = dims2(l1, self.name())?;
        let (wo, inp) = dims2(l2, self.name())?;
        let (xr, xi) = dims2(l3, self.name())?;
        if wo != out || xr != r || xi != inp {
            candle_core::bail!(
                "{}: gradient {:?}, weight {:?} and input {:?} do not match",
                self.name(),
                l1.dims(),
                l2.dims(),
                l3.dims()
            );
        }
        let g = f32_data(s1, l1, self.name())?;
        let w = f32_data(s2, l2, self.name())?;
        let xd = rows_data(s3, l3, self.name())?;
        if let (true, None, true) = (self.bf16, &self.gelu_pre, r >= 4 * GELU_BLOCK_ROWS) {
            // Enough rows: block by block, each block's operands packed while in cache (as with GELU); a bf16
            // input is packed as it is.
            let (dx, dw, _) =
                linear_grad_blocked(&g, None, &w, xd.rows(), r, out, inp, self.need_dx, true);
            return self.finish(dx, dw, r, inp);
        }
        if let Some(pre) = &self.gelu_pre {
            let pre = pre.rows();
            if pre.len() != g.len() {
                candle_core::bail!(
                    "{}: pre-activation size {} != {}",
                    self.name(),
                    pre.len(),
                    g.len()
                );
            }
            // bf16 products pack a bf16 input as it is; f32 ones read it widened (exactly).
            let xf = if self.bf16 { None } else { Some(xd.f32()) };
            let (dx, dw, db) = linear_grad_blocked(
                &g,
                Some(pre),
                &w,
                xf.as_deref().map_or(xd.rows(), bf16::Rows::F32),
                r,
                out,
                inp,
                self.need_dx,
                self.bf16,
            );
            if let Ok(mut slot) = self.db.lock() {
                *slot = Some(db);
            }
            return self.finish(dx, dw, r, inp);
        }
        // The other paths read an f32 input (a bf16 one widened exactly: rounding it again changes nothing).
        let x = xd.f32();
        if self.bf16 {
            let (dx, dw) = linear_grad_bf16(&g, &w, &x, r, out, inp, self.need_dx);
            return self.finish(dx, dw, r, inp);
        }
        let mut dx = ops::uninit_f32(if self.need_dx { r * inp } else { 0 });
        let mut dw = ops::uninit_f32(out * inp);
        let parts = rayon::current_num_threads().max(1);
        let (gp, wp, xp) = (
            g.as_ptr() as usize,
            w.as_ptr() as usize,
            x.as_ptr() as usize,
        );
        let (dxp, dwp) = (dx.as_mut_ptr() as usize, dw.as_mut_ptr() as usize);
        // dW split: by rows of the input (each task packs only its own rows of g and x, and the partials are
        // added) when there are at least as many rows as outputs, as in the ViT's layers; otherwise (the head,
        // e.g. 80 rows against 65536 outputs) by the longer side of dW itself, with no partials to add.
        let k_split = parts > 1 && r >= out;
        let split_rows = out >= inp;
        // Wide layers (the head's) multiply a row-major copy of gᵀ, block by block (see `wide`).
        let transpose_g = wide(r, out) && crate::small_gemm::available();
        let (partials, partial_ptrs) =
            task_partials(if k_split { parts - 1 } else { 0 }, out * inp);
        let need_dx = self.need_dx;
        // dx of a wide layer split over its outputs (the products' k; see `wide`), task 0 into dx and task i > 0
        // into partial i - 1, added in task order.
        let dx_k_split = need_dx && parts > 1 && wide(r, out);
        let (dx_partials, dx_partial_ptrs) =
            task_partials(if dx_k_split { parts - 1 } else { 0 }, r * inp);
        let job = |i: usize| {
            let par = |m, n, k| {
                if parts > 1 {
                    Parallelism::None
                } else {
                    parallelism(m, n, k)
                }
            };
            let (x0, x1) = part(r, parts, i);
            if dx_k_split {
                let dst = if i == 0 {
                    dxp as *mut f32
                } else {
                    dx_partial_ptrs[i - 1] as *mut f32
                };
                let (k0, k1) = part(out, parts, i);
                for (s0, sn) in row_blocks(r) {
                    // SAFETY: g is (r, out) and W (out, inp), read at columns / rows k0..k1; dst is this task's
                    // own (r, inp) buffer.
                    unsafe {
                        if k1 > k0 {
                            gemm_strided(
                                sn,
                                inp,
                                k1 - k0,
                                (dst.add(s0 * inp), 1, inp as isize),
                                false,
                                ((gp as *const f32).add(s0 * out + k0), 1, out as isize),
                                ((wp as *const f32).add(k0 * inp), 1, inp as isize),
                                Parallelism::None,
                            )
                        } else {
                            std::ptr::write_bytes(dst.add(s0 * inp), 0, sn * inp)
                        }
                    }
                }
            } else if need_dx && x1 > x0 {
                for (s0, sn) in row_blocks(x1 - x0) {
                    let r0 = x0 + s0;
                    // SAFETY: g is (r, out), w is (out, inp), dx is (r, inp); rows r0..r0+sn of dx are this
                    // task's own.
                    unsafe {
                        dx_rows(
                            sn,
                            inp,
                            out,
                            (dxp as *mut f32).add(r0 * inp),
                            (gp as *const f32).add(r0 * out),
                            wp as *const f32,
                            par(sn, inp, out),
                        )
                    }
                }
            }
            if !k_split {
                // dW = gᵀ x, this task's slice of the rows or columns of dW (every task reads all of the other
                // operand).
                let (lo, hi) = part(if split_rows { out } else { inp }, parts, i);
                if hi > lo {
                    let (rows, cols) = if split_rows {
                        (lo..hi, 0..inp)
                    } else {
                        (0..out, lo..hi)
                    };
                    if transpose_g {
                        // SAFETY: g is (r, out), x is (r, inp), dw is (out, inp) and the block [rows lo..hi or
                        // columns lo..hi] is this task's own; `transpose_g` checked small_gemm::available().
                        unsafe {
                            dw_cols_t(
                                rows,
                                cols,
                                0..r,
                                out,
                                inp,
                                dwp as *mut f32,
                                gp as *const f32,
                                xp as *const f32,
                            )
                        }
                        return;
                    }
                    let (m, n) = (rows.len(), cols.len());
                    // SAFETY: gᵀ is read through strides from the (r, out) g; x is (r, inp); dw is (out, inp)
                    // and the block [rows lo..hi or columns lo..hi] is this task's own.
                    unsafe {
                        gemm_strided(
                            m,
                            n,
                            r,
                            (
                                (dwp as *mut f32).add(rows.start * inp + cols.start),
                                1,
                                inp as isize,
                            ),
                            false,
                            ((gp as *const f32).add(rows.start), out as isize, 1),
                            ((xp as *const f32).add(cols.start), 1, inp as isize),
                            par(m, n, r),
                        )
                    }
                }
                return;
            }
            // dW = gᵀ x over this task's rows only (its own slices of g and x, which no other task packs), into
            // its own (out, inp) partial: task 0 into dw, task i > 0 into partial i - 1.
            let dst = if i == 0 {
                dwp as *mut f32
            } else {
                partial_ptrs[i - 1] as *mut f32
            };
            if x1 > x0 {
                // SAFETY: rows x0..x1 of g (r, out) and x (r, inp); dst is this task's own (out, inp) buffer.
                unsafe {
                    dw_rows(
                        out,
                        inp,
                        x1 - x0,
                        dst,
                        false,
                        (gp as *const f32).add(x0 * out),
                        (xp as *const f32).add(x0 * inp),
                        par(out, inp, x1 - x0),
                    )
                }
            } else {
                // SAFETY: dst is this task's own buffer of out * inp values.
                unsafe { std::ptr::write_bytes(dst, 0, out * inp) }
            }
        };
        if parts > 1 {
            (0..parts).into_par_iter().for_each(job);
        } else {
            job(0);
        }
        add_partials(&mut dw, partials.iter().map(Vec::as_slice));
        add_partials(&mut dx, dx_partials.iter().map(Vec::as_slice));
        self.finish(dx, dw, r, inp)
    }
}

/// `(dx, dW, db)` of `GELU(x Wᵀ + b)` from the gradient `g` of its output and the saved pre-activation.
/// Task `i` of the pool takes the `i`-th slice of the rows and goes through it in blocks of
/// [`GELU_BLOCK_ROWS`]: `dpre = g ⊙ GELU'(pre)` into a block buffer, then, while that is in cache, its column
/// sums (db), its rows of `dx = dpre W` and its term of `dW += dpreᵀ x`. The task partials of `dW` and `db`
/// are added in task order. `dpre` is never written out whole. With `bf16` the GEMMs take bf16 products
/// (W packed once; each block packs its `dpre`, `dpreᵀ` and `x` rows on its own thread, and under
/// `vdpbf16ps` rounds `dpre` to bf16 rows first, read in place by `dx`). With `pre` None the
/// layer has no GELU: `dpre = g`, read in place, and `db` is left at zeros (the caller sums `g`).
#[allow(clippy::too_many_arguments)]
fn linear_grad_blocked(
    g: &[f32],
    pre: Option<bf16::Rows>,
    w: &[f32],
    x: bf16::Rows,
    r: usize,
    out: usize,
    inp: usize,
    need_dx: bool,
    bf16: bool,
) -> (Vec<f32>, Vec<f32>, Vec<f32>) {
    let mut dx = ops::uninit_f32(if need_dx { r * inp } else { 0 });
    let parts = rayon::current_num_threads().max(1);
    // bf16 products: W (read as `(out, inp)` for `dx = dpre W`) packed once for every block.
    let wk = (bf16 && need_dx).then(|| bf16::pack_kn(w, out, inp, inp, bf16::NR));
    // Under `vdpbf16ps` a block's `dpre` is rounded to bf16 once, row by row as it is made (its column sums
    // taken from the f32 row first): `dx` reads those rows in place and `dW` packs their transpose from half
    // the bytes, where the f32 block was packed twice (the same roundings, so the same bits). AMX packs the
    // f32 block.
    let bf16_rows = bf16 && bf16::kernel() == Some(bf16::Bf16Kernel::Dp);
    let dxp = dx.as_mut_ptr() as usize;
    let job = |i: usize| -> (Vec<f32>, Vec<f32>) {
        let (x0, x1) = part(r, parts, i);
        // The first block writes the partial, the later ones add to it (zeros when the task has no rows).
        let mut dw = if x1 > x0 {
            ops::uninit_f32(out * inp)
        } else {
            vec![0f32; out * inp]
        };
        let mut db = vec![0f32; out];
        // The f32 `dpre` of a block (of a row, when the block is kept in bf16).
        let mut dpre = ops::uninit_f32(match (pre.is_some(), bf16_rows) {
            (false, _) => 0,
            (true, false) => GELU_BLOCK_ROWS.min(r) * out,
            (true, true) => out,
        });
        let mut dpre_bf16 = bf16::uninit_bf16(if bf16_rows {
            GELU_BLOCK_ROWS.min(r) * out
        } else {
            0
        });
        let mut r0 = x0;
        while r0 < x1 {
            let sn = GELU_BLOCK_ROWS.min(x1 - r0);
            let span = r0 * out..(r0 + sn) * out;
            let blk = if bf16_rows {
                let rows = bf16::bf16_bits_mut(&mut dpre_bf16[..sn * out]);
                for i in 0..sn {
                    let at = span.start + i * out;
                    let row: &[f32] = match pre {
                        Some(pre) => {
                            let d = &mut dpre[..out];
                            gelu_bwd_rows(pre.from(at), &g[at..at + out], d);
                            ops::col_sum_chunk(d, &mut db);
                            d
                        }
                        None => &g[at..at + out],
                    };
                    bf16::round_to_bf16(row, &mut rows[i * out..(i + 1) * out]);
                }
                bf16::Rows::Bf16(bf16::bf16_bits(&dpre_bf16[..sn * out]))
            } else {
                bf16::Rows::F32(match pre {
                    Some(pre) => {
                        let blk = &mut dpre[..sn * out];
                        gelu_bwd_rows(pre.from(span.start), &g[span], blk);
                        ops::col_sum_chunk(blk, &mut db);
                        blk
                    }
                    None => &g[span],
                })
            };
            if let Some(wk) = &wk {
                // SAFETY: blk is (sn, out), wk is W packed; rows r0..r0+sn of dx (r, inp) are this task's own.
                unsafe {
                    bf16::gemm_rows_src(
                        sn,
                        inp,
                        out,
                        blk,
                        wk,
                        (dxp as *mut f32).add(r0 * inp),
                        inp,
                        crate::amx::Init::Zero,
                    )
                }
            } else if let (true, bf16::Rows::F32(blk)) = (need_dx, blk) {
                // SAFETY: blk is (sn, out), w is (out, inp); rows r0..r0+sn of dx (r, inp) are this task's own.
                unsafe {
                    dx_rows(
                        sn,
                        inp,
                        out,
                        (dxp as *mut f32).add(r0 * inp),
                        blk.as_ptr(),
                        w.as_ptr(),
                        Parallelism::None,
                    )
                }
            }
            // SAFETY: blk is (sn, out), x rows r0.. are (sn, inp); dw is this task's (out, inp) partial.
            unsafe {
                match (bf16, blk, x) {
                    (true, _, _) => bf16::gemm_tn(
                        out,
                        inp,
                        sn,
                        blk,
                        out,
                        x.from(r0 * inp),
                        inp,
                        dw.as_mut_ptr(),
                        inp,
                        r0 > x0,
                    ),
                    (false, bf16::Rows::F32(blk), bf16::Rows::F32(x)) => dw_rows(
                        out,
                        inp,
                        sn,
                        dw.as_mut_ptr(),
                        r0 > x0,
                        blk.as_ptr(),
                        x[r0 * inp..].as_ptr(),
                        Parallelism::None,
                    ),
                    (false, ..) => {
                        unreachable!("f32 products of bf16 operands (the callers widen them)")
                    }
                }
            }
            r0 += sn;
        }
        (dw, db)
    };
    let partials: Vec<(Vec<f32>, Vec<f32>)> = if parts > 1 {
        (0..parts).into_par_iter().map(job).collect()
    } else {
        vec![job(0)]
    };
    let mut it = partials.into_iter();
    let (mut dw, mut db) = it
        .next()
        .unwrap_or_else(|| (vec![0f32; out * inp], vec![0f32; out]));
    let rest: Vec<_> = it.collect();
    add_partials(&mut dw, rest.iter().map(|p| p.0.as_slice()));
    add_partials(&mut db, rest.iter().map(|p| p.1.as_slice()));
    (dx, dw, db)
}

impl LinearGradOp {
    /// Leaves `dw` in the op and returns `dx` as the op's output.
    fn finish(
        &self,
        dx: Vec<f32>,
        dw: Vec<f32>,
        r: usize,
        inp: usize,
    ) -> Result<(CpuStorage, Shape)> {
        if let Ok(mut slot) = self.dw.lock() {
            *slot = Some(dw);
        }
        let shape = if self.need_dx {
            Shape::from((r, inp))
        } else {
            Shape::from(0)
        };
        Ok((CpuStorage::F32(dx), shape))
    }
}

/// [`linear_fwd`] with bf16 products: `W` is packed once, then each pool thread packs and multiplies its
/// own row block.
fn linear_fwd_bf16(
    x: bf16::Rows,
    r: usize,
    inp: usize,
    w: &[f32],
    out: usize,
    b: Option<&[f32]>,
) -> Vec<f32> {
    let mut y = crate::ops::uninit_f32(r * out);
    if out == 0 {
        return y;
    }
    let wp = bf16::pack_nk(w, out, inp, inp, bf16::NR);
    let threads = rayon::current_num_threads().max(1);
    let rows_per = r.div_ceil(threads).max(1);
    y.par_chunks_mut(rows_per * out)
        .enumerate()
        .for_each(|(i, yb)| {
            let r0 = i * rows_per;
            let rows = yb.len() / out;
            let xb = x.from(r0 * inp);
            // SAFETY: bf16 is supported (checked when the op was built); yb is this block's own (rows, out);
            // the bias has `out` values.
            unsafe {
                let init = b.map_or(crate::amx::Init::Zero, crate::amx::Init::Bias);
                bf16::gemm_rows_src(rows, out, inp, xb, &wp, yb.as_mut_ptr(), out, init)
            }
        });
    y
}

/// `(dx, dW)` of a linear layer with bf16 products: `dx = g W` (each pool thread a row slice) and `dW = gᵀ x`
/// (each thread a slice of rows in whole panels); `W`, `gᵀ` and `x` are packed once, in parallel.
fn linear_grad_bf16(
    g: &[f32],
    w: &[f32],
    x: &[f32],
    r: usize,
    out: usize,
    inp: usize,
    need_dx: bool,
) -> (Vec<f32>, Vec<f32>) {
    let mut dx = ops::uninit_f32(if need_dx { r * inp } else { 0 });
    let mut dw = ops::uninit_f32(out * inp);
    let wk = need_dx.then(|| bf16::pack_kn(w, out, inp, inp, bf16::NR));
    let gt = bf16::LhsT::pack(g, r, out, out);
    let xk = bf16::pack_kn(x, r, inp, inp, bf16::NR);
    let parts = rayon::current_num_threads().max(1);
    let granule = gt.granule();
    let panels = out.div_ceil(granule);
    let (dxp, dwp) = (dx.as_mut_ptr() as usize, dw.as_mut_ptr() as usize);
    let job = |i: usize| {
        let (x0, x1) = part(r, parts, i);
        if let Some(wk) = wk.as_ref().filter(|_| x1 > x0) {
            // SAFETY: rows x0..x1 of dx (r, inp) are this task's own.
            unsafe {
                bf16::gemm_rows(
                    x1 - x0,
                    inp,
                    out,
                    &g[x0 * out..],
                    wk,
                    (dxp as *mut f32).add(x0 * inp),
                    inp,
                    false,
                )
            }
        }
        let (p0, p1) = part(panels, parts, i);
        let (lo, hi) = (p0 * granule, (p1 * granule).min(out));
        if hi > lo {
            // SAFETY: rows lo..hi of dw (out, inp) are this task's own.
            unsafe {
                bf16::gemm(
                    hi - lo,
                    inp,
                    &gt.at(lo),
                    &xk,
                    (dwp as *mut f32).add(lo * inp),
                    inp,
                    false,
                )
            }
        }
    };
    if parts > 1 {
        (0..parts).into_par_iter().for_each(job);
    } else {
        job(0);
    }
    (dx, dw)
}

/// The pre-activation `x Wᵀ + b` of a GELU layer, kept for its backward pass: f32 under f32 products, bf16 under
/// bf16 products (as PyTorch's autocast keeps the bf16 output of a linear layer for GELU's backward): GELU' is
/// then evaluated at the rounded value, and the kept tensor and its traffic halve.
enum Pre {
    F32(Vec<f32>),
    Bf16(Vec<half::bf16>),
}

impl Pre {
    /// `pre` as kept under `bf16` products (rounded to nearest even, as the packings round).
    fn keep(pre: Vec<f32>, bf16: bool) -> Self {
        if bf16 {
            let mut b = uninit_bf16(pre.len());
            bf16::round_to_bf16(&pre, bf16_bits_mut(&mut b));
            Pre::Bf16(b)
        } else {
            Pre::F32(pre)
        }
    }

    /// The values, f32 or bf16 bit patterns.
    fn rows(&self) -> bf16::Rows<'_> {
        match self {
            Pre::F32(v) => bf16::Rows::F32(v),
            Pre::Bf16(v) => bf16::Rows::Bf16(bf16::bf16_bits(v)),
        }
    }
}

/// `dx[i] = g[i] · GELU'(pre[i])` over a chunk, `pre` f32 or bf16.
fn gelu_bwd_rows(pre: bf16::Rows, g: &[f32], dx: &mut [f32]) {
    match pre {
        bf16::Rows::F32(p) => ops::gelu_bwd_chunk(p, g, dx),
        bf16::Rows::Bf16(p) => ops::gelu_bwd_bf16_chunk(p, g, dx),
    }
}

/// `g ⊙ GELU'(pre)` with the pre-activation held by the op.
struct GeluGradOp {
    pre: Arc<Pre>,
}

impl CustomOp1 for GeluGradOp {
    fn name(&self) -> &'static str {
        "dino-linear-gelu-bwd"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let g = f32_data(s, l, self.name())?;
        let pre = self.pre.rows();
        if g.len() != pre.len() {
            candle_core::bail!(
                "{}: gradient size {} != {}",
                self.name(),
                g.len(),
                pre.len()
            );
        }
        let mut dx = crate::ops::uninit_f32(g.len());
        ops::for_elem_chunks(&mut dx, |a, c| {
            let n = c.len();
            gelu_bwd_rows(pre.from(a), &g[a..a + n], c)
        });
        Ok((CpuStorage::F32(dx), l.shape().clone()))
    }
}

/// The fused linear (optionally followed by GELU).
struct LinearOp {
    gelu: bool,
    /// Products in bf16 (forward and backward), see [`MatmulPrecision::Bf16`].
    bf16: bool,
    /// The output stored in bf16 (with `bf16` only; see [`linear_gelu_bf16_out`]).
    bf16_out: bool,
    /// Whether the backward pass will run (see [`records_grad`]); without it `pre` is not kept.
    keep_pre: bool,
    /// The pre-activation when `gelu`, kept for the backward pass (in bf16 under bf16 products).
    pre: ops::Saved<Pre>,
}

impl LinearOp {
    fn new(gelu: bool, bf16: bool, keep_pre: bool) -> Self {
        Self {
            gelu,
            bf16,
            bf16_out: false,
            keep_pre,
            pre: Mutex::new(None),
        }
    }

    fn fwd(
        &self,
        x: (&CpuStorage, &Layout),
        w: (&CpuStorage, &Layout),
        b: Option<(&CpuStorage, &Layout)>,
    ) -> Result<(CpuStorage, Shape)> {
        let name = "dino-linear";
        let (r, inp) = dims2(x.1, name)?;
        let (out, win) = dims2(w.1, name)?;
        if win != inp {
            candle_core::bail!(
                "{name}: input has {inp} features, the weight {:?}",
                w.1.dims()
            );
        }
        // A bf16 input (from `layer_norm_bf16_out`) goes to the bf16 products as it is; f32 products widen it
        // exactly.
        let xr = rows_data(x.0, x.1, name)?;
        let wd = f32_data(w.0, w.1, name)?;
        let bd = match b {
            Some((s, l)) => {
                if l.dims() != [out] {
                    candle_core::bail!("{name}: bias {:?} must be ({out})", l.dims());
                }
                Some(f32_data(s, l, name)?)
            }
            None => None,
        };
        if self.gelu && self.bf16_out && r >= 4 * GELU_BLOCK_ROWS {
            let (pre, act) =
                linear_gelu_fwd_bf16_out(xr.rows(), r, inp, &wd, out, bd.as_deref(), self.keep_pre);
            if let Some(pre) = pre {
                ops::save(&self.pre, Pre::Bf16(pre));
            }
            return Ok((CpuStorage::BF16(act), Shape::from((r, out))));
        }
        if self.gelu && r >= 4 * GELU_BLOCK_ROWS {
            let (pre, act) = linear_gelu_fwd(
                &xr.f32(),
                r,
                inp,
                &wd,
                out,
                bd.as_deref(),
                self.keep_pre,
                self.bf16,
            );
            if let Some(pre) = pre {
                ops::save(&self.pre, pre);
            }
            return Ok((CpuStorage::F32(act), Shape::from((r, out))));
        }
        let mut y = if self.bf16 {
            linear_fwd_bf16(xr.rows(), r, inp, &wd, out, bd.as_deref())
        } else {
            linear_fwd(&xr.f32(), r, inp, &wd, out, bd.as_deref())
        };
        let y = if self.gelu && !self.keep_pre {
            ops::for_elem_chunks(&mut y, |_, c| ops::bias_gelu_inplace_rows(c, None, c.len()));
            y
        } else if self.gelu {
            let mut act = crate::ops::uninit_f32(y.len());
            ops::for_elem_chunks(&mut act, |a, c| {
                let n = c.len();
                ops::gelu_fwd_chunk(&y[a..a + n], c)
            });
            ops::save(&self.pre, Pre::keep(y, self.bf16));
            act
        } else {
            y
        };
        let shape = Shape::from((r, out));
        if self.bf16_out {
            let mut act = uninit_bf16(y.len());
            bf16::round_to_bf16(&y, bf16_bits_mut(&mut act));
            return Ok((CpuStorage::BF16(act), shape));
        }
        Ok((CpuStorage::F32(y), shape))
    }

    /// `(dx, dW, db)` for upstream gradient `grad` `(R, out)`; no `dx` when `x` needs no gradient.
    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        has_bias: bool,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Tensor, Option<Tensor>)> {
        let rows = grad.dim(0)?;
        // GELU layers with enough rows apply GELU' inside the gradient op, block by block.
        let blocked = self.gelu && rows >= 4 * GELU_BLOCK_ROWS;
        let mut gelu_pre = None;
        let g = if self.gelu {
            let pre = ops::take_saved(&self.pre, "linear_gelu pre-activation")?;
            if blocked {
                gelu_pre = Some(pre);
                grad.contiguous()?
            } else {
                grad.apply_op1_no_bwd(&GeluGradOp { pre })?
            }
        } else {
            grad.contiguous()?
        };
        let op = LinearGradOp {
            need_dx: x.track_op(),
            bf16: self.bf16,
            gelu_pre,
            dw: Mutex::new(None),
            db: Mutex::new(None),
        };
        let need_dx = op.need_dx;
        let dx = g.apply_op3_no_bwd(&w.contiguous()?, &x.contiguous()?, &op)?;
        let dx = need_dx.then_some(dx);
        let missing = || candle_core::Error::Msg("linear: weight gradient missing".into());
        let dw = op
            .dw
            .lock()
            .ok()
            .and_then(|mut d| d.take())
            .ok_or_else(missing)?;
        let dw = Tensor::from_vec(dw, w.shape(), w.device())?;
        let db = match (has_bias, blocked) {
            (false, _) => None,
            (true, false) => Some(ops::col_sum(&g)?),
            (true, true) => {
                let db = op
                    .db
                    .lock()
                    .ok()
                    .and_then(|mut d| d.take())
                    .ok_or_else(missing)?;
                Some(Tensor::from_vec(db, w.dim(0)?, w.device())?)
            }
        };
        Ok((dx, dw, db))
    }
}

/// `LinearOp` with a bias: inputs `(x, W, b)`.
struct LinearBiasOp(LinearOp);

impl CustomOp3 for LinearBiasOp {
    fn name(&self) -> &'static str {
        "dino-linear"
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
        self.0.fwd((s1, l1), (s2, l2), Some((s3, l3)))
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        _b: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let (dx, dw, db) = self.0.bwd(x, w, true, grad)?;
        Ok((dx, Some(dw), db))
    }
}

/// `LinearOp` without a bias: inputs `(x, W)`.
struct LinearNoBiasOp(LinearOp);

impl CustomOp2 for LinearNoBiasOp {
    fn name(&self) -> &'static str {
        "dino-linear"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        self.0.fwd((s1, l1), (s2, l2), None)
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let (dx, dw, _) = self.0.bwd(x, w, false, grad)?;
        Ok((dx, Some(dw)))
    }
}

/// `a @ b` on the portable path: f32 products, or under [`MatmulPrecision::Bf16`] both operands cast to bf16
/// with the product cast back to f32 (as `torch.autocast` runs a linear layer: bf16 operands, f32 accumulation
/// in the GEMM, a bf16 result). Gradients flow through the casts.
pub fn portable_matmul(a: &Tensor, b: &Tensor) -> Result<Tensor> {
    if matmul_precision() == MatmulPrecision::Bf16 && a.dtype() == candle_core::DType::F32 {
        let bf = candle_core::DType::BF16;
        a.to_dtype(bf)?
            .matmul(&b.to_dtype(bf)?)?
            .to_dtype(candle_core::DType::F32)
    } else {
        a.matmul(b)
    }
}

fn linear_impl(
    x: &Tensor,
    weight: &Tensor,
    bias: Option<&Tensor>,
    gelu: bool,
    bf16_out: bool,
) -> Result<Tensor> {
    let all: Vec<&Tensor> = [Some(x), Some(weight), bias]
        .into_iter()
        .flatten()
        .collect();
    // A bf16 x (from `layer_norm_bf16_out`) takes the fused op as an f32 one would.
    let params: Vec<&Tensor> = [Some(weight), bias].into_iter().flatten().collect();
    let x_fast = crate::dispatch::cpu_fast_path(&[x])
        && matches!(
            x.dtype(),
            candle_core::DType::F32 | candle_core::DType::BF16
        );
    if !crate::dispatch::cpu_f32_fast_path(&params)
        || !x_fast
        || x.rank() != 2
        || weight.rank() != 2
    {
        let x = &x.to_dtype(weight.dtype())?;
        let y = portable_matmul(x, &weight.t()?)?;
        let y = match bias {
            Some(b) => y.broadcast_add(b)?,
            None => y,
        };
        return if gelu { y.gelu_erf() } else { Ok(y) };
    }
    let bf16 = bf16::use_bf16(matmul_precision(), x.dim(0)?);
    let grad = records_grad(&all);
    let op = LinearOp {
        bf16_out: bf16_out && bf16,
        ..LinearOp::new(gelu, bf16, grad)
    };
    match (bias, grad) {
        (Some(b), true) => x.apply_op3(weight, b, LinearBiasOp(op)),
        (Some(b), false) => x.apply_op3_no_bwd(weight, b, &LinearBiasOp(op)),
        (None, true) => x.apply_op2(weight, LinearNoBiasOp(op)),
        (None, false) => x.apply_op2_no_bwd(weight, &LinearNoBiasOp(op)),
    }
}

/// A linear layer on a 2-D input: `x`: `(R, in)`, `weight`: `(out, in)`, `bias`: `(out)` -> `(R, out)`.
pub fn linear(x: &Tensor, weight: &Tensor, bias: Option<&Tensor>) -> Result<Tensor> {
    linear_impl(x, weight, bias, false, false)
}

/// `GELU(x Wᵀ + b)` (exact erf GELU) on a 2-D input: `(R, in)` -> `(R, out)`.
pub fn linear_gelu(x: &Tensor, weight: &Tensor, bias: Option<&Tensor>) -> Result<Tensor> {
    linear_impl(x, weight, bias, true, false)
}

/// [`linear_gelu`] for an output that only bf16 products read next (the `h` of [`linear_residual`]): where
/// this layer's products run in bf16 (see [`with_matmul_precision`]), the output is a bf16 tensor, rounded as
/// the next product's packing would round it, so that the results and every gradient keep their bits while
/// the activation takes half the memory and its packing rounds nothing. Its gradient comes back in f32.
/// Elsewhere an f32 tensor, as [`linear_gelu`]'s.
pub fn linear_gelu_bf16_out(x: &Tensor, weight: &Tensor, bias: Option<&Tensor>) -> Result<Tensor> {
    linear_impl(x, weight, bias, true, true)
}

/// The number of samples `B` that `scales` (one per sample, `None` for one) splits `rows` into.
fn samples(rows: usize, scales: Option<&[f32]>, op: &str) -> Result<usize> {
    let b = scales.map_or(1, |s| s.len());
    if b == 0 || !rows.is_multiple_of(b) {
        candle_core::bail!("{op}: {rows} rows do not split into {b} samples");
    }
    Ok(b)
}

/// `x + s_i · y` on the rows of sample `i`: inputs `(x, y)` of shape `(B*T, D)`, `scales` one per sample.
struct ResidualOp {
    scales: Arc<Vec<f32>>,
}

impl ResidualOp {
    /// `out[i] = a[i] + s(row i) * y[i]` over rows of `d` elements, `rows_per_sample` rows per scale.
    fn apply(&self, a: Option<&[f32]>, y: &[f32], rows: usize, d: usize) -> Vec<f32> {
        let per = rows / self.scales.len().max(1);
        let mut out = crate::ops::uninit_f32(rows * d);
        ops::for_row_chunks(&mut out, rows, d, |r0, chunk| {
            for (i, orow) in chunk.chunks_exact_mut(d).enumerate() {
                let r = r0 + i;
                let s = self.scales[r / per.max(1)];
                let yr = &y[r * d..(r + 1) * d];
                match a {
                    Some(a) => {
                        let ar = &a[r * d..(r + 1) * d];
                        for ((o, &av), &yv) in orow.iter_mut().zip(ar).zip(yr) {
                            *o = av + s * yv;
                        }
                    }
                    None => {
                        for (o, &yv) in orow.iter_mut().zip(yr) {
                            *o = s * yv;
                        }
                    }
                }
            }
        });
        out
    }
}

impl CustomOp2 for ResidualOp {
    fn name(&self) -> &'static str {
        "dino-residual"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (rows, d) = dims2(l1, self.name())?;
        if l2.dims() != l1.dims() {
            candle_core::bail!(
                "{}: {:?} and {:?} differ",
                self.name(),
                l1.dims(),
                l2.dims()
            );
        }
        let x = f32_data(s1, l1, self.name())?;
        let y = f32_data(s2, l2, self.name())?;
        Ok((
            CpuStorage::F32(self.apply(Some(&x), &y, rows, d)),
            l1.shape().clone(),
        ))
    }

    fn bwd(
        &self,
        _x: &Tensor,
        _y: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        if self.scales.iter().all(|&s| s == 1.0) {
            return Ok((Some(grad.clone()), Some(grad.clone())));
        }
        let dy = grad.apply_op1_no_bwd(&ScaleRowsOp {
            res: ResidualOp {
                scales: self.scales.clone(),
            },
            compact: false,
        })?;
        Ok((Some(grad.clone()), Some(dy)))
    }
}

/// `s_i · g` per sample (the `y` gradient of [`ResidualOp`]); with `compact`, only the rows of the samples with
/// `s_i ≠ 0` (the `h`-side gradient of [`LinearResidualOp`], whose `h` holds only those rows).
struct ScaleRowsOp {
    res: ResidualOp,
    compact: bool,
}

impl CustomOp1 for ScaleRowsOp {
    fn name(&self) -> &'static str {
        "dino-residual-bwd"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let (rows, d) = dims2(l, self.name())?;
        let g = f32_data(s, l, self.name())?;
        let scales = &self.res.scales;
        if !self.compact || !scales.contains(&0.0) {
            return Ok((
                CpuStorage::F32(self.res.apply(None, &g, rows, d)),
                l.shape().clone(),
            ));
        }
        let slot = kept_slots(&kept_samples(scales), scales.len());
        let (out, n) = move_sample_rows(&g, rows, d, &slot, false, Some(scales));
        Ok((CpuStorage::F32(out), Shape::from((n, d))))
    }
}

/// The samples that stochastic depth keeps (`s_i ≠ 0`), in order.
pub fn kept_samples(scales: &[f32]) -> Vec<usize> {
    (0..scales.len()).filter(|&i| scales[i] != 0.0).collect()
}

/// `slot[i]`: sample `i`'s position among the `kept` ones (ascending), `None` for the others.
fn kept_slots(kept: &[usize], samples: usize) -> Vec<Option<usize>> {
    let mut slot = vec![None; samples];
    for (j, &i) in kept.iter().enumerate() {
        slot[i] = Some(j);
    }
    slot
}

/// The rows of the samples with a `slot` of `x` `(rows, d)` (`slot.len()` samples of equal row counts), each
/// times `scale[i]` when given: gathered into `(K*R, d)`, or with `scatter` (`x` holds the gathered rows) spread
/// back into `(B*R, d)` with zeros for the other samples. Returns the rows and their count.
fn move_sample_rows(
    x: &[f32],
    rows: usize,
    d: usize,
    slot: &[Option<usize>],
    scatter: bool,
    scale: Option<&[f32]>,
) -> (Vec<f32>, usize) {
    let kept: Vec<usize> = (0..slot.len()).filter(|&i| slot[i].is_some()).collect();
    // Rows per sample, and the rows written. Sample `i`'s rows sit at `i * per` in the full tensor and at
    // `slot[i] * per` in the gathered one.
    let (per, out_rows) = if scatter {
        let per = rows / kept.len().max(1);
        (per, per * slot.len())
    } else {
        let per = rows / slot.len().max(1);
        (per, per * kept.len())
    };
    let mut out = crate::ops::uninit_f32(out_rows * d);
    ops::for_row_chunks(&mut out, out_rows, d, |r0, chunk| {
        for (i, row) in chunk.chunks_exact_mut(d).enumerate() {
            let (r, within) = (r0 + i, (r0 + i) % per);
            let (sample, src) = if scatter {
                (r / per, slot[r / per].map(|j| j * per + within))
            } else {
                (kept[r / per], Some(kept[r / per] * per + within))
            };
            let Some(src) = src else {
                row.fill(0.0);
                continue;
            };
            let src = &x[src * d..(src + 1) * d];
            match scale {
                Some(scale) => {
                    let sc = scale[sample];
                    row.iter_mut().zip(src).for_each(|(o, &v)| *o = sc * v);
                }
                None => row.copy_from_slice(src),
            }
        }
    });
    (out, out_rows)
}

/// Gathers the rows of some samples of a `(B*R, D)` tensor into `(K*R, D)` or, as its backward, scatters them
/// back into `(B*R, D)` with zeros for the other samples. `slot[i]` is sample `i`'s position among the
/// gathered ones, `None` when it is not gathered.
struct SampleRowsOp {
    slot: Arc<Vec<Option<usize>>>,
    scatter: bool,
}

impl CustomOp1 for SampleRowsOp {
    fn name(&self) -> &'static str {
        if self.scatter {
            "dino-sample-rows-bwd"
        } else {
            "dino-sample-rows"
        }
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let (rows, d) = dims2(l, self.name())?;
        let x = f32_data(s, l, self.name())?;
        let (out, out_rows) = move_sample_rows(&x, rows, d, &self.slot, self.scatter, None);
        Ok((CpuStorage::F32(out), Shape::from((out_rows, d))))
    }

    fn bwd(&self, _x: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        let scatter = SampleRowsOp {
            slot: self.slot.clone(),
            scatter: true,
        };
        Ok(Some(grad.contiguous()?.apply_op1_no_bwd(&scatter)?))
    }
}

/// The rows per sample of `rows` rows in `samples` samples, after checking that `kept` lists some of those
/// samples in ascending order (an error naming `op` otherwise).
pub(crate) fn rows_per_kept_sample(
    rows: usize,
    samples: usize,
    kept: &[usize],
    op: &str,
) -> Result<usize> {
    let ascending = kept.windows(2).all(|w| w[0] < w[1]);
    if samples == 0
        || !rows.is_multiple_of(samples)
        || !ascending
        || kept.iter().any(|&i| i >= samples)
    {
        candle_core::bail!("{op}: {rows} rows, {samples} samples, kept {kept:?}");
    }
    Ok(rows / samples)
}

/// The rows of the samples `kept` (ascending) of `x` `(B*R, D)`, `B = samples`: `(K*R, D)`, the input of a
/// branch that stochastic depth keeps for those samples only. The gradient flows back into their rows.
pub fn sample_rows(x: &Tensor, samples: usize, kept: &[usize]) -> Result<Tensor> {
    let (rows, d) = x.dims2()?;
    let per = rows_per_kept_sample(rows, samples, kept, "sample_rows")?;
    if !crate::dispatch::cpu_f32_fast_path(&[x]) || kept.is_empty() {
        let ids = Tensor::from_vec(
            kept.iter().map(|&i| i as u32).collect::<Vec<_>>(),
            kept.len(),
            x.device(),
        )?;
        return x
            .reshape((samples, per * d))?
            .index_select(&ids, 0)?
            .reshape((kept.len() * per, d));
    }
    let op = SampleRowsOp {
        slot: Arc::new(kept_slots(kept, samples)),
        scatter: false,
    };
    if records_grad(&[x]) {
        x.apply_op1(op)
    } else {
        x.apply_op1_no_bwd(&op)
    }
}

/// `y`, the rows of the kept samples only, spread back over every sample's rows, zeros for the dropped ones:
/// `((B - dropped)·per, D)` -> `(B·per, D)` (the composed fallback of [`linear_residual`]).
fn expand_kept(y: &Tensor, scales: &[f32], per: usize) -> Result<Tensor> {
    let d = y.dim(1)?;
    let mut pieces = Vec::new();
    let (mut i, mut off) = (0, 0);
    while i < scales.len() {
        let keep = scales[i] != 0.0;
        let mut e = i + 1;
        while e < scales.len() && (scales[e] != 0.0) == keep {
            e += 1;
        }
        let n = (e - i) * per;
        pieces.push(if keep {
            off += n;
            y.narrow(0, off - n, n)?
        } else {
            Tensor::zeros((n, d), y.dtype(), y.device())?
        });
        i = e;
    }
    Tensor::cat(&pieces, 0)
}

/// `x + s_i · y` on the `rows / scales.len()` rows of each sample `i`: `x`, `y`: `(B*T, D)`, `scales`: `B`
/// values (stochastic depth's `keep / (1 - rate)` or 0; pass `None` for a plain residual sum).
pub fn residual(x: &Tensor, y: &Tensor, scales: Option<Vec<f32>>) -> Result<Tensor> {
    let (rows, d) = x.dims2()?;
    let b = samples(rows, scales.as_deref(), "residual")?;
    if !crate::dispatch::cpu_f32_fast_path(&[x, y]) {
        return match scales {
            None => x + y,
            Some(s) => {
                let mask = Tensor::from_vec(s, (b, 1), y.device())?.to_dtype(y.dtype())?;
                x + y
                    .reshape((b, (rows / b) * d))?
                    .broadcast_mul(&mask)?
                    .reshape((rows, d))?
            }
        };
    }
    let scales = Arc::new(scales.unwrap_or_else(|| vec![1.0]));
    x.apply_op2(y, ResidualOp { scales })
}

/// `x + s_i · (h Wᵀ + b)` per sample `i` as one op (the projection or fc2 layer and its residual sum): the output
/// starts as `x + s_i · b` and the GEMM accumulates `s_i · h Wᵀ` onto it, so neither the layer's output nor a
/// bias-row pass is materialised. With `compact`, `h` holds the rows of the samples with `s_i ≠ 0` only: the
/// branch of a sample dropped by stochastic depth is never computed, and its output rows are `x`'s. Inputs
/// `(x, h, wb)`: `wb` is `W` `(out, in)`, or `[W | b]` `(out, in + 1)` with a bias (one input for both, since
/// custom ops take at most three).
struct LinearResidualOp {
    scales: Arc<Vec<f32>>,
    has_bias: bool,
    compact: bool,
    /// bf16 products (forward and backward), as [`LinearOp`]'s.
    bf16: bool,
}

impl LinearResidualOp {
    /// `h` is bf16 only with bf16 products.
    fn fwd(
        &self,
        x: &[f32],
        h: bf16::Rows,
        wb: &[f32],
        rows: usize,
        d: usize,
        inp: usize,
    ) -> Vec<f32> {
        let mut out = crate::ops::uninit_f32(rows * d);
        if d == 0 {
            return out;
        }
        let w_rs = inp + usize::from(self.has_bias);
        // The bias column of `[W | b]`, contiguous.
        let bias: Vec<f32> = if self.has_bias {
            (0..d).map(|k| wb[k * w_rs + inp]).collect()
        } else {
            Vec::new()
        };
        let per = (rows / self.scales.len()).max(1);
        let scale = |r: usize| self.scales[r / per];
        // Row `r` of `x` reads row `r - per · (samples dropped before r's)` of a compact `h`.
        let dropped_before: Vec<usize> = self
            .scales
            .iter()
            .scan(0, |n, &s| {
                let before = *n;
                *n += usize::from(self.compact && s == 0.0);
                Some(before)
            })
            .collect();
        let h_row = |r: usize| r - dropped_before[r / per] * per;
        // W (the first inp columns of `[W | b]`) packed once for the bf16 products.
        let wp = self.bf16.then(|| bf16::pack_nk(wb, d, inp, w_rs, bf16::NR));
        let threads = rayon::current_num_threads();
        let rows_per = if threads > 1 && rows >= 64 * threads {
            rows.div_ceil(threads)
        } else {
            rows.max(1)
        };
        let block = |r0: usize, ob: &mut [f32]| {
            let n = ob.len() / d;
            let mut scratch: Option<Vec<f32>> = None;
            for (s0, sn) in row_blocks(n) {
                // Runs of rows with one scale (a whole sample or more; every row without drop path).
                let mut a = s0;
                while a < s0 + sn {
                    let s = scale(r0 + a);
                    let mut e = a + 1;
                    while e < s0 + sn && scale(r0 + e) == s {
                        e += 1;
                    }
                    let o = &mut ob[a * d..e * d];
                    let xr = &x[(r0 + a) * d..(r0 + e) * d];
                    if let (Some(wp), false) = (&wp, s == 0.0 || s == 1.0) {
                        // A scaled branch (drop path's kept samples) under bf16 products: the product of
                        // RESIDUAL_CHUNK_ROWS rows at a time into a scratch that stays in L2, then
                        // `o = (x + s·b) + s·p` in one pass.
                        let p = scratch
                            .get_or_insert_with(|| crate::ops::uninit_f32(RESIDUAL_CHUNK_ROWS * d));
                        for c0 in (a..e).step_by(RESIDUAL_CHUNK_ROWS) {
                            let cn = RESIDUAL_CHUNK_ROWS.min(e - c0);
                            let p = &mut p[..cn * d];
                            // SAFETY: bf16 is supported (checked when the op was built); p is (cn, d); h rows
                            // h_row(r0+c0).. are (cn, inp) (a run of kept rows is contiguous in h).
                            unsafe {
                                bf16::gemm_rows_src(
                                    cn,
                                    d,
                                    inp,
                                    h.from(h_row(r0 + c0) * inp),
                                    wp,
                                    p.as_mut_ptr(),
                                    d,
                                    crate::amx::Init::Zero,
                                )
                            }
                            let bias = self.has_bias.then_some(bias.as_slice());
                            let xc = &x[(r0 + c0) * d..(r0 + c0 + cn) * d];
                            ops::residual_scaled_rows(
                                xc,
                                bias,
                                s,
                                p,
                                &mut ob[c0 * d..(c0 + cn) * d],
                            );
                        }
                        a = e;
                        continue;
                    }
                    if s == 0.0 || !self.has_bias {
                        o.copy_from_slice(xr);
                    } else {
                        ops::add_scaled_bias_rows(xr, &bias, s, o);
                    }
                    if s != 0.0 {
                        match &wp {
                            Some(wp) => {
                                // Unscaled (scaled branches took the chunked path above): the product
                                // accumulates onto `o`.
                                // SAFETY: bf16 is supported (checked when the op was built); o is (e-a, d);
                                // h rows h_row(r0+a).. are (e-a, inp).
                                unsafe {
                                    bf16::gemm_rows_src(
                                        e - a,
                                        d,
                                        inp,
                                        h.from(h_row(r0 + a) * inp),
                                        wp,
                                        o.as_mut_ptr(),
                                        d,
                                        crate::amx::Init::Load,
                                    )
                                }
                            }
                            None => {
                                let bf16::Rows::F32(h) = h else {
                                    unreachable!("f32 products of a bf16 h (cpu_fwd widens it)")
                                };
                                // SAFETY: h rows h_row(r0+a).. are (e-a, inp) (a run of kept rows is
                                // contiguous in h); wb is (d, w_rs) with W in its first inp columns; o is this
                                // block's own (e-a, d).
                                unsafe {
                                    gemm(
                                        e - a,
                                        d,
                                        inp,
                                        o.as_mut_ptr(),
                                        1,
                                        d as isize,
                                        true,
                                        h[h_row(r0 + a) * inp..].as_ptr(),
                                        1,
                                        inp as isize,
                                        wb.as_ptr(),
                                        w_rs as isize,
                                        1,
                                        1.0,
                                        s,
                                        false,
                                        false,
                                        false,
                                        Parallelism::None,
                                    )
                                }
                            }
                        }
                    }
                    a = e;
                }
            }
        };
        if rows_per == rows {
            block(0, &mut out);
        } else {
            out.par_chunks_mut(rows_per * d)
                .enumerate()
                .for_each(|(i, ob)| block(i * rows_per, ob));
        }
        out
    }
}

impl CustomOp3 for LinearResidualOp {
    fn name(&self) -> &'static str {
        "dino-linear-residual"
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
        let name = self.name();
        let (rows, d) = dims2(l1, name)?;
        let (hr, inp) = dims2(l2, name)?;
        let (out, wc) = dims2(l3, name)?;
        let h_samples = if self.compact {
            kept_samples(&self.scales).len()
        } else {
            self.scales.len()
        };
        if hr != h_samples * (rows / self.scales.len())
            || out != d
            || wc != inp + usize::from(self.has_bias)
        {
            candle_core::bail!(
                "{name}: x {:?}, h {:?} and weight {:?} do not match",
                l1.dims(),
                l2.dims(),
                l3.dims()
            );
        }
        let x = f32_data(s1, l1, name)?;
        let hd = rows_data(s2, l2, name)?;
        let wb = f32_data(s3, l3, name)?;
        let y = if self.bf16 {
            self.fwd(&x, hd.rows(), &wb, rows, d, inp)
        } else {
            self.fwd(&x, bf16::Rows::F32(&hd.f32()), &wb, rows, d, inp)
        };
        Ok((CpuStorage::F32(y), l1.shape().clone()))
    }

    fn bwd(
        &self,
        _x: &Tensor,
        h: &Tensor,
        wb: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let grad = grad.contiguous()?;
        let dy = if self.scales.iter().all(|&s| s == 1.0) {
            grad.clone()
        } else {
            grad.apply_op1_no_bwd(&ScaleRowsOp {
                res: ResidualOp {
                    scales: self.scales.clone(),
                },
                compact: self.compact,
            })?
        };
        let inp = h.dim(1)?;
        let w = if self.has_bias {
            wb.narrow(1, 0, inp)?
        } else {
            wb.clone()
        };
        let (dh, dw, db) = LinearOp::new(false, self.bf16, true).bwd(h, &w, self.has_bias, &dy)?;
        let dwb = match db {
            Some(db) => Tensor::cat(&[&dw, &db.unsqueeze(1)?], 1)?,
            None => dw,
        };
        Ok((Some(grad), dh, Some(dwb)))
    }
}

/// `x + s_i · (h Wᵀ + b)` on the rows of each sample `i` (a linear layer and its residual sum, see
/// [`residual`]): `x`: `(B*T, out)`, `h`: `(B*T, in)`, or `(K*T, in)`, the rows of the `K` samples with
/// `s_i ≠ 0` only (see [`kept_samples`]: a dropped sample's branch need not be computed at all), `weight`:
/// `(out, in)`, `bias`: `(out)`, `scales`: `B` values or `None` -> `(B*T, out)`. Equal to
/// `residual(x, &linear(h, weight, bias)?, scales)` (with a compact `h` spread back over all samples) up to
/// rounding (`s_i · b` and `s_i · h Wᵀ` are added separately); with bf16 products (see
/// [`with_matmul_precision`]) `h` and `W` are rounded to bf16 as in [`linear`]. Other devices and dtypes use
/// that composition (see [`skips_dropped_samples`]).
pub fn linear_residual(
    x: &Tensor,
    h: &Tensor,
    weight: &Tensor,
    bias: Option<&Tensor>,
    scales: Option<Vec<f32>>,
) -> Result<Tensor> {
    let all: Vec<&Tensor> = [Some(x), Some(h), Some(weight), bias]
        .into_iter()
        .flatten()
        .collect();
    let rows = x.dim(0)?;
    let b = samples(rows, scales.as_deref(), "linear_residual")?;
    let kept_rows = scales.as_deref().map_or(b, |s| kept_samples(s).len()) * (rows / b);
    let h_rows = h.dim(0)?;
    if h_rows != rows && h_rows != kept_rows {
        candle_core::bail!(
            "linear_residual: h has {h_rows} rows; x's samples take {rows}, the kept ones {kept_rows}"
        );
    }
    // A bf16 h (from linear_gelu_bf16_out) takes the fused op as an f32 one would.
    let others: Vec<&Tensor> = [Some(x), Some(weight), bias]
        .into_iter()
        .flatten()
        .collect();
    let h_fast = crate::dispatch::cpu_fast_path(&[h])
        && matches!(
            h.dtype(),
            candle_core::DType::F32 | candle_core::DType::BF16
        );
    if !crate::dispatch::cpu_f32_fast_path(&others)
        || !h_fast
        || x.rank() != 2
        || h.rank() != 2
        || weight.rank() != 2
    {
        let h = &h.to_dtype(x.dtype())?;
        let y = linear(h, weight, bias)?;
        let y = match scales.as_deref() {
            Some(s) if h_rows < rows => expand_kept(&y, s, rows / b)?,
            _ => y,
        };
        return residual(x, &y, scales);
    }
    let wb = match bias {
        Some(bias) => Tensor::cat(&[weight, &bias.unsqueeze(1)?], 1)?,
        None => weight.clone(),
    };
    let op = LinearResidualOp {
        scales: Arc::new(scales.unwrap_or_else(|| vec![1.0])),
        has_bias: bias.is_some(),
        compact: h_rows < rows,
        bf16: bf16::use_bf16(matmul_precision(), h_rows),
    };
    if records_grad(&all) {
        x.apply_op3(h, &wb, op)
    } else {
        x.apply_op3_no_bwd(h, &wb, &op)
    }
}

/// Whether a stochastic-depth branch ending in [`linear_residual`] on `x` should run on the kept samples only:
/// where the fused op applies (f32 tensors on the CPU, f32 or bf16 products). Elsewhere `linear_residual` is
/// composed and has to spread a compact `h` back over every sample, which cost more than it saved (when the
/// bf16 products were composed, the bf16 step of cifar/4096 went from 2.46-2.71 s to 3.01-3.24 s).
pub fn skips_dropped_samples(x: &Tensor) -> bool {
    crate::dispatch::cpu_f32_fast_path(&[x])
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{DType, Device, Storage, Var};

    fn pattern(n: usize, seed: u64) -> Vec<f32> {
        (0..n)
            .map(|i| {
                let x = (i as u64 * 2654435761 + seed * 40503) % 10007;
                x as f32 / 10007.0 * 2.0 - 1.0
            })
            .collect()
    }

    fn max_diff(a: &Tensor, b: &Tensor) -> f32 {
        (a - b)
            .unwrap()
            .abs()
            .unwrap()
            .flatten_all()
            .unwrap()
            .max(0)
            .unwrap()
            .to_scalar::<f32>()
            .unwrap()
    }

    #[test]
    fn linear_and_linear_gelu_match_composed_ops_with_gradients() -> Result<()> {
        let dev = Device::Cpu;
        // 1300 rows: linear_gelu in row blocks of GELU_BLOCK_ROWS, the last one partial.
        let long = 5 * GELU_BLOCK_ROWS + 20;
        // Fewer rows than outputs (the head's shapes): dW split by its rows (40 > 4) or columns (60 > 40).
        for &(r, inp, out) in &[
            (7usize, 5usize, 3usize),
            (300, 64, 96),
            (1, 1, 1),
            (long, 16, 24),
            (5, 4, 40),
            (5, 60, 40),
        ] {
            for gelu in [false, true] {
                for with_bias in [true, false] {
                    let x = Var::from_vec(pattern(r * inp, 1), (r, inp), &dev)?;
                    let w = Var::from_vec(pattern(out * inp, 2), (out, inp), &dev)?;
                    let b = Var::from_vec(pattern(out, 3), out, &dev)?;
                    let up = Tensor::from_vec(pattern(r * out, 4), (r, out), &dev)?;
                    let bias = with_bias.then(|| b.as_tensor());
                    let y = linear_impl(x.as_tensor(), w.as_tensor(), bias, gelu, false)?;
                    let mut yr = x.as_tensor().matmul(&w.as_tensor().t()?)?;
                    if with_bias {
                        yr = yr.broadcast_add(b.as_tensor())?;
                    }
                    if gelu {
                        yr = yr.gelu_erf()?;
                    }
                    assert!(
                        max_diff(&y, &yr) < 1e-5,
                        "forward {r}x{inp}x{out} gelu {gelu}"
                    );
                    let g = (y * &up)?.sum_all()?.backward()?;
                    let gr = (yr * &up)?.sum_all()?.backward()?;
                    for (name, v) in [("x", &x), ("w", &w)] {
                        let d = max_diff(g.get(v).unwrap(), gr.get(v).unwrap());
                        assert!(
                            d < 1e-4,
                            "d{name} differs by {d} ({r}x{inp}x{out}, gelu {gelu})"
                        );
                    }
                    if with_bias {
                        let d = max_diff(g.get(&b).unwrap(), gr.get(&b).unwrap());
                        assert!(d < 1e-4, "db differs by {d}");
                    } else {
                        assert!(g.get(&b).is_none());
                    }
                }
            }
        }
        Ok(())
    }

    /// bf16 linear layers against candle's f32 ops on bf16-rounded operands (what the bf16 products compute),
    /// forward and every gradient; the bias gradient is the f32 column sum of the unrounded upstream gradient.
    /// Without AVX-512 BF16 the bf16 setting must give exactly the f32 results.
    #[test]
    fn bf16_linear_matches_f32_ops_on_rounded_operands() -> Result<()> {
        crate::bf16::for_each_bf16_kernel(
            bf16_linear_matches_f32_ops_on_rounded_operands_with_kernel,
        )
    }

    fn bf16_linear_matches_f32_ops_on_rounded_operands_with_kernel() -> Result<()> {
        let dev = Device::Cpu;
        let round = |t: &Tensor| -> Result<Tensor> {
            let v: Vec<f32> = t.flatten_all()?.to_vec1()?;
            let v: Vec<f32> = v.into_iter().map(bf16::round_bf16).collect();
            Tensor::from_vec(v, t.shape(), t.device())
        };
        // 1300 rows: a GELU layer in row blocks of GELU_BLOCK_ROWS (the last one partial), packed and
        // multiplied block by block.
        let long = 5 * GELU_BLOCK_ROWS + 20;
        for &(r, inp, out) in &[
            (7usize, 5usize, 3usize),
            (301, 64, 97),
            (130, 33, 40),
            (long, 40, 50),
        ] {
            for gelu in [false, true] {
                let x = Var::from_vec(pattern(r * inp, 1), (r, inp), &dev)?;
                let w = Var::from_vec(pattern(out * inp, 2), (out, inp), &dev)?;
                let b = Var::from_vec(pattern(out, 3), out, &dev)?;
                let up = Tensor::from_vec(pattern(r * out, 4), (r, out), &dev)?;
                let y = crate::bf16::bf16_products(|| {
                    linear_impl(
                        x.as_tensor(),
                        w.as_tensor(),
                        Some(b.as_tensor()),
                        gelu,
                        false,
                    )
                })?;
                let g = (&y * &up)?.sum_all()?.backward()?;
                let got = [
                    y.clone(),
                    g.get(&x).unwrap().clone(),
                    g.get(&w).unwrap().clone(),
                    g.get(&b).unwrap().clone(),
                ];
                let want = if bf16::supported() {
                    let (xr, wr) = (round(x.as_tensor())?, round(w.as_tensor())?);
                    let pre = xr.matmul(&wr.t()?)?.broadcast_add(b.as_tensor())?;
                    let (yr, gpre) = if gelu {
                        // d/dpre of sum(gelu(pre) * up), through candle's autograd on a fresh variable, at the
                        // pre-activation the op keeps under bf16 products: its bf16 rounding (see `Pre`).
                        let yr = pre.gelu_erf()?;
                        let pv = Var::from_tensor(&round(&pre)?)?;
                        let gp = (pv.as_tensor().gelu_erf()? * &up)?.sum_all()?.backward()?;
                        (yr, gp.get(&pv).unwrap().clone())
                    } else {
                        (pre, up.clone())
                    };
                    let gr = round(&gpre)?;
                    [yr, gr.matmul(&wr)?, gr.t()?.matmul(&xr)?, gpre.sum(0)?]
                } else {
                    let y = linear_impl(
                        x.as_tensor(),
                        w.as_tensor(),
                        Some(b.as_tensor()),
                        gelu,
                        false,
                    )?;
                    let g = (&y * &up)?.sum_all()?.backward()?;
                    [
                        y.clone(),
                        g.get(&x).unwrap().clone(),
                        g.get(&w).unwrap().clone(),
                        g.get(&b).unwrap().clone(),
                    ]
                };
                for (name, (a, e)) in ["y", "dx", "dw", "db"].iter().zip(got.iter().zip(&want)) {
                    let d = max_diff(a, e);
                    let big = e.abs()?.flatten_all()?.max(0)?.to_scalar::<f32>()?;
                    // With GELU the reference's pre-activation differs from the op's in the last f32 bits,
                    // which can move the upstream gradient across a bf16 rounding boundary (one bf16 ulp,
                    // 2^-8 relative): bf16-level tolerance there, f32-level otherwise.
                    let rel = if gelu && *name != "y" { 4e-3 } else { 1e-5 };
                    let tol = if bf16::supported() {
                        rel * (1.0 + big)
                    } else {
                        0.0
                    };
                    assert!(
                        d <= tol,
                        "{name} differs by {d} > {tol} ({r}x{inp}x{out}, gelu {gelu})"
                    );
                }
                // The f32 result differs (the operands are rounded): bf16 really ran.
                if bf16::supported() {
                    let f = linear_impl(
                        x.as_tensor(),
                        w.as_tensor(),
                        Some(b.as_tensor()),
                        gelu,
                        false,
                    )?;
                    assert!(max_diff(&f, &y) > 0.0, "bf16 gave the f32 result");
                }
            }
        }
        assert_eq!(
            matmul_precision(),
            MatmulPrecision::Highest,
            "precision restored"
        );
        Ok(())
    }

    #[test]
    fn long_inputs_in_row_blocks_and_inputs_without_gradient() -> Result<()> {
        // More rows per thread than one GEMM call takes (GEMM_MAX_ROWS), as a linear and as a row-blocked
        // linear_gelu, with an input that is a variable (dx computed) and one that is not (dx skipped).
        let dev = Device::Cpu;
        let r = 2 * GEMM_MAX_ROWS + 101;
        for (&(inp, out), gelu) in [(9usize, 6usize), (6, 9)].iter().zip([false, true]) {
            for x_is_var in [true, false] {
                let xv = Var::from_vec(pattern(r * inp, 5), (r, inp), &dev)?;
                let x = if x_is_var {
                    xv.as_tensor().clone()
                } else {
                    xv.as_tensor().detach()
                };
                let w = Var::from_vec(pattern(out * inp, 6), (out, inp), &dev)?;
                let b = Var::from_vec(pattern(out, 7), out, &dev)?;
                let up = Tensor::from_vec(pattern(r * out, 8), (r, out), &dev)?;
                let y = linear_impl(&x, w.as_tensor(), Some(b.as_tensor()), gelu, false)?;
                let mut yr = x
                    .matmul(&w.as_tensor().t()?)?
                    .broadcast_add(b.as_tensor())?;
                if gelu {
                    yr = yr.gelu_erf()?;
                }
                assert!(max_diff(&y, &yr) < 1e-5, "forward {inp}->{out}");
                let g = (y * &up)?.sum_all()?.backward()?;
                let gr = (yr * &up)?.sum_all()?.backward()?;
                // dW sums r products per element: compare relative to its size.
                for v in [&w, &b] {
                    let (a, e) = (g.get(v).unwrap(), gr.get(v).unwrap());
                    let size = e.abs()?.flatten_all()?.max(0)?.to_scalar::<f32>()?;
                    let d = max_diff(a, e);
                    assert!(
                        d <= 1e-5 * (1.0 + size),
                        "parameter gradient {inp}->{out}: {d}"
                    );
                }
                if x_is_var {
                    let d = max_diff(g.get(&xv).unwrap(), gr.get(&xv).unwrap());
                    assert!(d < 1e-5, "dx {inp}->{out}: {d}");
                } else {
                    assert!(g.get(&xv).is_none());
                }
            }
        }
        Ok(())
    }

    /// Under `no_grad` the layers give the same values bit for bit (the blocked GELU path without its kept
    /// pre-activation, the others with GELU in place), record no graph, and the same call outside it does.
    #[test]
    fn no_grad_gives_the_same_values_without_a_graph() -> Result<()> {
        let dev = Device::Cpu;
        let long = 5 * GELU_BLOCK_ROWS + 20;
        for &(r, inp, out) in &[(long, 16usize, 24usize), (40, 8, 12)] {
            for gelu in [false, true] {
                for with_bias in [true, false] {
                    let x = Var::from_vec(pattern(r * inp, 1), (r, inp), &dev)?;
                    let w = Var::from_vec(pattern(out * inp, 2), (out, inp), &dev)?;
                    let b = Var::from_vec(pattern(out, 3), out, &dev)?;
                    let bias = with_bias.then(|| b.as_tensor());
                    let y = linear_impl(x.as_tensor(), w.as_tensor(), bias, gelu, false)?;
                    let y0 =
                        no_grad(|| linear_impl(x.as_tensor(), w.as_tensor(), bias, gelu, false))?;
                    assert!(y.track_op() && !y0.track_op(), "{r} rows gelu {gelu}");
                    let (a, b) = (
                        y.flatten_all()?.to_vec1::<f32>()?,
                        y0.flatten_all()?.to_vec1::<f32>()?,
                    );
                    assert!(
                        a == b,
                        "{r} rows gelu {gelu} bias {with_bias}: values differ"
                    );
                }
            }
        }
        // No rows: an empty output, as outside the scope.
        let x = Var::from_vec(Vec::<f32>::new(), (0, 3), &dev)?;
        let w = Var::from_vec(pattern(6, 2), (2, 3), &dev)?;
        let y0 = no_grad(|| linear_gelu(x.as_tensor(), w.as_tensor(), None))?;
        assert_eq!(y0.dims(), &[0, 2]);
        // The scope ends with the closure.
        let x = Var::from_vec(pattern(6, 1), (2, 3), &dev)?;
        no_grad(|| ());
        assert!(linear(x.as_tensor(), x.as_tensor(), None)?.track_op());
        Ok(())
    }

    /// The rows of the `kept` samples of `m` `(samples * t, c)`, in order.
    /// `(scales, kept samples)` without drop path and with sample 1 dropped (the others scaled by 1.25).
    fn drop_path_cases(samples: usize) -> [(Option<Vec<f32>>, Vec<usize>); 2] {
        let drop: Vec<f32> = (0..samples)
            .map(|i| if i == 1 { 0.0 } else { 1.25 })
            .collect();
        let kept = kept_samples(&drop);
        [(None, (0..samples).collect()), (Some(drop), kept)]
    }

    /// Asserts that `chain(true)`, which stores one of its activations in bf16 for bf16 products, changes no bit
    /// against `chain(false)`, which stores it in f32: `chain` returns its output and that activation's dtype
    /// (bf16, then f32); the outputs, with and without a graph, are equal, and so are the gradients of a
    /// weighted sum of them, non-zero and f32, for every var.
    fn assert_bf16_storage_changes_no_bit(
        chain: impl Fn(bool) -> Result<(Tensor, DType)>,
        vars: &[(&str, &Var)],
        what: &str,
    ) -> Result<()> {
        let (y16, dt) = chain(true)?;
        let (y32, dt32) = chain(false)?;
        assert_eq!(
            (dt, dt32),
            (DType::BF16, DType::F32),
            "stored dtypes: {what}"
        );
        assert_eq!(max_diff(&y16, &y32), 0.0, "forward {what}");
        let (n16, _) = no_grad(|| chain(true))?;
        assert_eq!(max_diff(&n16, &y32), 0.0, "forward without a graph {what}");
        let up = Tensor::from_vec(pattern(y32.elem_count(), 18), y32.shape(), y32.device())?;
        let g16 = (&y16 * &up)?.sum_all()?.backward()?;
        let g32 = (&y32 * &up)?.sum_all()?.backward()?;
        for &(name, v) in vars {
            let (a, b) = (g16.get(v).unwrap(), g32.get(v).unwrap());
            assert_eq!(a.dtype(), DType::F32, "{name} gradient dtype: {what}");
            assert!(max_diff(b, &b.zeros_like()?) > 0.0, "{name}: {what}");
            assert_eq!(max_diff(a, b), 0.0, "{name} gradient: {what}");
        }
        Ok(())
    }

    fn kept_sample_rows(m: &Tensor, samples: usize, kept: &[usize]) -> Result<Tensor> {
        let (r, c) = m.dims2()?;
        let t = r / samples;
        let ids = Tensor::from_vec(
            kept.iter().map(|&i| i as u32).collect::<Vec<_>>(),
            kept.len(),
            m.device(),
        )?;
        m.reshape((samples, t * c))?
            .index_select(&ids, 0)?
            .reshape((kept.len() * t, c))
    }

    /// A LayerNorm output stored in bf16 for bf16 products ([`ops::layer_norm_bf16_out`], also of kept samples,
    /// as the ViT blocks feed qkv and fc1) against an f32 one, under bf16 products, on each bf16 kernel:
    /// `linear(LN(x))` (with and without a bias) and `linear_residual(x, linear_gelu_bf16_out(LN(x)))` give the
    /// outputs and the gradients of x, of the LayerNorm's weight and bias and of the layers' with the same bits;
    /// row counts below and above the row-blocked paths' threshold and LayerNorm's parallel one, odd widths,
    /// drop-path scales.
    #[test]
    fn bf16_layer_norm_outputs_change_no_bit() -> Result<()> {
        crate::bf16::for_each_bf16_kernel(bf16_layer_norm_outputs_with_kernel)
    }

    fn bf16_layer_norm_outputs_with_kernel() -> Result<()> {
        let dev = Device::Cpu;
        let eps = 1e-6;
        for &(samples, t, d, hid) in &[
            (4usize, 520usize, 32usize, 40usize),
            (4, 300, 16, 36),
            (2, 700, 24, 20),
            (3, 7, 9, 13),
        ] {
            let r = samples * t;
            for (scales, kept) in drop_path_cases(samples) {
                let x = Var::from_vec(pattern(r * d, 11), (r, d), &dev)?;
                let lw: Vec<f32> = pattern(d, 12).iter().map(|v| 1.0 + v).collect();
                let lw = Var::from_vec(lw, d, &dev)?;
                let lb = Var::from_vec(pattern(d, 13), d, &dev)?;
                let w1 = Var::from_vec(pattern(hid * d, 14), (hid, d), &dev)?;
                let b1 = Var::from_vec(pattern(hid, 15), hid, &dev)?;
                let w2 = Var::from_vec(pattern(d * hid, 16), (d, hid), &dev)?;
                let b2 = Var::from_vec(pattern(d, 17), d, &dev)?;
                for (mlp, bias) in [(false, true), (false, false), (true, true)] {
                    let what = format!(
                        "{samples}x{t}, {d} -> {hid}, mlp {mlp}, bias {bias}, scales {scales:?}"
                    );
                    // (output, the LayerNorm output's dtype) of the chain.
                    let chain = |bf16_out: bool| -> Result<(Tensor, DType)> {
                        crate::bf16::bf16_products(|| {
                            let (xt, lw, lb) = (x.as_tensor(), lw.as_tensor(), lb.as_tensor());
                            let xn = match (scales.is_some(), bf16_out) {
                                (false, false) => ops::layer_norm(xt, lw, lb, eps)?,
                                (false, true) => ops::layer_norm_bf16_out(xt, lw, lb, eps, None)?,
                                (true, false) => {
                                    ops::layer_norm_kept(xt, lw, lb, eps, samples, &kept)?
                                }
                                (true, true) => ops::layer_norm_bf16_out(
                                    xt,
                                    lw,
                                    lb,
                                    eps,
                                    Some((samples, &kept)),
                                )?,
                            };
                            let b1 = bias.then(|| b1.as_tensor());
                            let y = if mlp {
                                let h = linear_gelu_bf16_out(&xn, w1.as_tensor(), b1)?;
                                let (w2, b2) = (w2.as_tensor(), Some(b2.as_tensor()));
                                linear_residual(xt, &h, w2, b2, scales.clone())?
                            } else {
                                linear(&xn, w1.as_tensor(), b1)?
                            };
                            Ok((y, xn.dtype()))
                        })
                    };
                    let mut vars = vec![("x", &x), ("ln w", &lw), ("ln b", &lb), ("w1", &w1)];
                    if bias {
                        vars.push(("b1", &b1));
                    }
                    if mlp {
                        vars.extend([("w2", &w2), ("b2", &b2)]);
                    }
                    assert_bf16_storage_changes_no_bit(chain, &vars, &what)?;
                }
            }
        }
        Ok(())
    }

    /// The attention output stored in bf16 for the projection's bf16 products
    /// ([`crate::attention::attention_bf16_out`]) against an f32 one, under bf16 products, on each bf16 kernel:
    /// `linear_residual(x, attention(qkv), W, b)` gives the output and the gradients of x, qkv, W and b with the
    /// same bits; heads in f32 (under 128 keys) and in bf16, drop-path scales (attention on the kept samples).
    #[test]
    fn bf16_attention_output_changes_no_bit() -> Result<()> {
        crate::bf16::for_each_bf16_kernel(bf16_attention_output_with_kernel)
    }

    fn bf16_attention_output_with_kernel() -> Result<()> {
        let dev = Device::Cpu;
        for &(samples, t, heads, hd) in &[
            (3usize, 7usize, 2usize, 8usize),
            (4, 65, 3, 16),
            (2, 130, 2, 16),
        ] {
            let d = heads * hd;
            let scale = (hd as f64).powf(-0.5);
            for (scales, kept) in drop_path_cases(samples) {
                let what = format!("{samples}x{t}, {heads} heads of {hd}, scales {scales:?}");
                let k = kept.len();
                let x = Var::from_vec(pattern(samples * t * d, 21), (samples * t, d), &dev)?;
                let qkv = Var::from_vec(pattern(k * t * 3 * d, 22), (k * t, 3 * d), &dev)?;
                let w = Var::from_vec(pattern(d * d, 23), (d, d), &dev)?;
                let b = Var::from_vec(pattern(d, 24), d, &dev)?;
                let branch = |bf16_out: bool| -> Result<(Tensor, DType)> {
                    crate::bf16::bf16_products(|| {
                        let h = if bf16_out {
                            crate::attention::attention_bf16_out(
                                qkv.as_tensor(),
                                k,
                                t,
                                heads,
                                scale,
                            )?
                        } else {
                            crate::attention::attention(qkv.as_tensor(), k, t, heads, scale)?
                        };
                        let (xt, w, b) = (x.as_tensor(), w.as_tensor(), Some(b.as_tensor()));
                        Ok((linear_residual(xt, &h, w, b, scales.clone())?, h.dtype()))
                    })
                };
                let vars = [("x", &x), ("qkv", &qkv), ("w", &w), ("b", &b)];
                assert_bf16_storage_changes_no_bit(branch, &vars, &what)?;
            }
        }
        Ok(())
    }

    /// The kept pre-activation of `GELU(x Wᵀ + b)`: the bf16 rounding of `x Wᵀ + b` under bf16 products (within
    /// one bf16 rounding of the bf16 linear layer's output), f32 under f32 products, on every forward path
    /// (rows below and above the row-blocked threshold, f32 and bf16 activations).
    #[test]
    fn the_gelu_pre_activation_is_kept_in_bf16_under_bf16_products() -> Result<()> {
        crate::bf16::for_each_bf16_kernel(gelu_pre_with_kernel)
    }

    fn gelu_pre_with_kernel() -> Result<()> {
        let dev = Device::Cpu;
        let long = 4 * GELU_BLOCK_ROWS + 30;
        for &(r, inp, out) in &[(40usize, 24usize, 36usize), (long, 16, 40)] {
            let x = Tensor::from_vec(pattern(r * inp, 1), (r, inp), &dev)?;
            let w = Tensor::from_vec(pattern(out * inp, 2), (out, inp), &dev)?;
            let b = Tensor::from_vec(pattern(out, 3), out, &dev)?;
            for (bf16, bf16_out) in [(false, false), (true, false), (true, true)] {
                if bf16 && !bf16::supported() {
                    eprintln!("BF16 PASS NOT RUN: this CPU has no AVX-512 BF16");
                    continue;
                }
                let run = || -> Result<(Vec<f32>, bool, Vec<f32>)> {
                    let op = LinearOp {
                        bf16_out,
                        ..LinearOp::new(true, bf16, true)
                    };
                    let (xs, xl) = x.storage_and_layout();
                    let (ws, wl) = w.storage_and_layout();
                    let (bs, bl) = b.storage_and_layout();
                    let (Storage::Cpu(xs), Storage::Cpu(ws), Storage::Cpu(bs)) = (&*xs, &*ws, &*bs)
                    else {
                        unreachable!("CPU tensors")
                    };
                    op.fwd((xs, xl), (ws, wl), Some((bs, bl)))?;
                    let kept = op.pre.lock().unwrap().clone().expect("pre kept");
                    let is_bf16 = matches!(*kept, Pre::Bf16(_));
                    let v = kept.rows().to_f32(0..r * out).into_owned();
                    // The bf16 linear layer's own output, without GELU.
                    let lin = linear_impl(&x, &w, Some(&b), false, false)?;
                    Ok((v, is_bf16, lin.flatten_all()?.to_vec1()?))
                };
                let (kept, is_bf16, lin) = if bf16 {
                    crate::bf16::bf16_products(run)?
                } else {
                    run()?
                };
                let what = format!("{r}x{inp}x{out}, bf16 {bf16}, bf16 out {bf16_out}");
                assert_eq!(is_bf16, bf16, "{what}");
                for (k, l) in kept.iter().zip(&lin) {
                    if is_bf16 {
                        assert_eq!(k.to_bits() & 0xffff, 0, "{what}: not a bf16 value");
                        assert!(
                            (k - l).abs() <= l.abs() / 256.0 + 1e-6,
                            "{what}: {k} vs {l}"
                        );
                    } else {
                        assert!((k - l).abs() <= l.abs() * 1e-5 + 1e-6, "{what}: {k} vs {l}");
                    }
                }
            }
        }
        Ok(())
    }

    /// The MLP branch with its hidden activations stored in bf16 ([`linear_gelu_bf16_out`]) against the same
    /// branch with f32 ones, under bf16 products, on each bf16 kernel: the output and the gradients of the
    /// branch input and of W1, b1, W2 and b2 carry the same bits, with and without a graph; rows below and
    /// above the row-blocked GELU's threshold, an odd hidden width, drop-path scales (a compact h).
    #[test]
    fn bf16_hidden_activations_change_no_bit() -> Result<()> {
        crate::bf16::for_each_bf16_kernel(bf16_hidden_activations_with_kernel)
    }

    fn bf16_hidden_activations_with_kernel() -> Result<()> {
        let dev = Device::Cpu;
        for &(samples, t, d, hid) in &[
            (4usize, 50usize, 16usize, 40usize),
            (4, 400, 16, 36),
            (3, 7, 8, 13),
        ] {
            let r = samples * t;
            for (scales, kept) in drop_path_cases(samples) {
                let x = Var::from_vec(pattern(r * d, 1), (r, d), &dev)?;
                let w1 = Var::from_vec(pattern(hid * d, 2), (hid, d), &dev)?;
                let b1 = Var::from_vec(pattern(hid, 3), hid, &dev)?;
                let w2 = Var::from_vec(pattern(d * hid, 4), (d, hid), &dev)?;
                let b2 = Var::from_vec(pattern(d, 5), d, &dev)?;
                let what = format!("{samples}x{t}, {d} -> {hid}, scales {scales:?}");
                // (output, h's dtype) of the branch with the hidden activations in bf16 or f32.
                let branch = |bf16_out: bool| -> Result<(Tensor, DType)> {
                    crate::bf16::bf16_products(|| {
                        let xt = x.as_tensor();
                        let xk = if scales.is_some() {
                            kept_sample_rows(xt, samples, &kept)?
                        } else {
                            xt.clone()
                        };
                        let (w1, b1) = (w1.as_tensor(), Some(b1.as_tensor()));
                        let h = if bf16_out {
                            linear_gelu_bf16_out(&xk, w1, b1)?
                        } else {
                            linear_gelu(&xk, w1, b1)?
                        };
                        let y = linear_residual(
                            xt,
                            &h,
                            w2.as_tensor(),
                            Some(b2.as_tensor()),
                            scales.clone(),
                        )?;
                        Ok((y, h.dtype()))
                    })
                };
                let vars = [
                    ("x", &x),
                    ("w1", &w1),
                    ("b1", &b1),
                    ("w2", &w2),
                    ("b2", &b2),
                ];
                assert_bf16_storage_changes_no_bit(branch, &vars, &what)?;
            }
        }
        Ok(())
    }

    /// The fused projection + residual against `residual(x, linear(h))`: values and the gradients of `x`, `h`,
    /// `W` and `b`, with drop-path scales (dropped, kept and scaled samples; every sample dropped), with and
    /// without a bias, over shapes that take one block, the pool's row split, and sub-blocks of
    /// `GEMM_MAX_ROWS`. The fused op reads `h` for the kept samples only; the reference computes the layer on
    /// every sample's rows and multiplies the dropped ones by 0, as the official `drop_path`.
    #[test]
    fn linear_residual_matches_linear_then_residual() -> Result<()> {
        crate::bf16::for_each_bf16_kernel(linear_residual_matches_linear_then_residual_with_kernel)
    }

    fn linear_residual_matches_linear_then_residual_with_kernel() -> Result<()> {
        let dev = Device::Cpu;
        for &(samples, t, inp, out) in &[
            (2usize, 3usize, 5usize, 4usize),
            (4, 50, 24, 16),
            (3, 700, 8, 6),
        ] {
            let r = samples * t;
            let drop: Vec<f32> = (0..samples)
                .map(|i| if i % 3 == 1 { 0.0 } else { 1.25 })
                .collect();
            for scales in [None, Some(drop), Some(vec![0.0; samples])] {
                let kept = scales
                    .as_deref()
                    .map_or((0..samples).collect(), kept_samples);
                let kept_rows = |m: &Tensor| kept_sample_rows(m, samples, &kept);
                for (with_bias, compact) in [(true, true), (false, true), (true, false)] {
                    let x = Var::from_vec(pattern(r * out, 5), (r, out), &dev)?;
                    let h_all = Var::from_vec(pattern(r * inp, 1), (r, inp), &dev)?;
                    let h = if compact {
                        Var::from_tensor(&kept_rows(h_all.as_tensor())?)?
                    } else {
                        Var::from_tensor(h_all.as_tensor())?
                    };
                    let w = Var::from_vec(pattern(out * inp, 2), (out, inp), &dev)?;
                    let b = Var::from_vec(pattern(out, 3), out, &dev)?;
                    let up = Tensor::from_vec(pattern(r * out, 4), (r, out), &dev)?;
                    let bias = with_bias.then(|| b.as_tensor());
                    let (xt, ht, wt) = (x.as_tensor(), h.as_tensor(), w.as_tensor());
                    let y = linear_residual(xt, ht, wt, bias, scales.clone())?;
                    let yr = residual(xt, &linear(h_all.as_tensor(), wt, bias)?, scales.clone())?;
                    let what = format!(
                        "{samples}x{t}x{inp}->{out} bias {with_bias} compact {compact} scales {scales:?}"
                    );
                    assert!(max_diff(&y, &yr) < 1e-5, "forward {what}");
                    let y0 = no_grad(|| linear_residual(xt, ht, wt, bias, scales.clone()))?;
                    assert!(!y0.track_op() && max_diff(&y, &y0) == 0.0, "no_grad {what}");
                    let g = (y * &up)?.sum_all()?.backward()?;
                    let gr = (yr * &up)?.sum_all()?.backward()?;
                    let mut pairs = vec![("x", &x, &x), ("w", &w, &w)];
                    if with_bias {
                        pairs.push(("b", &b, &b));
                    }
                    for (name, v, vr) in pairs {
                        let d = max_diff(g.get(v).unwrap(), gr.get(vr).unwrap());
                        assert!(d < 1e-4, "{name} gradient differs by {d}: {what}");
                    }
                    let dh_all = gr.get(&h_all).unwrap();
                    if !compact {
                        let d = max_diff(g.get(&h).unwrap(), dh_all);
                        assert!(d < 1e-4, "h gradient differs by {d}: {what}");
                    } else if !kept.is_empty() {
                        let d = max_diff(g.get(&h).unwrap(), &kept_rows(dh_all)?);
                        assert!(d < 1e-4, "h gradient differs by {d}: {what}");
                    }
                    // bf16 products: the fused op (its own bf16 forward, `LinearOp`'s bf16 backward) against
                    // the bf16 linear layer on every sample's rows; the sums run in another order.
                    let (yb, ybr) = crate::bf16::bf16_products(|| -> Result<_> {
                        Ok((
                            linear_residual(xt, ht, wt, bias, scales.clone())?,
                            residual(xt, &linear(h_all.as_tensor(), wt, bias)?, scales.clone())?,
                        ))
                    })?;
                    assert!(max_diff(&yb, &ybr) < 1e-5, "bf16 forward {what}");
                    let g = (&yb * &up)?.sum_all()?.backward()?;
                    let gr = (&ybr * &up)?.sum_all()?.backward()?;
                    for (name, v) in [("x", &x), ("w", &w), ("b", &b)] {
                        if name == "b" && !with_bias {
                            continue;
                        }
                        let d = max_diff(g.get(v).unwrap(), gr.get(v).unwrap());
                        assert!(d < 1e-4, "bf16 {name} gradient differs by {d}: {what}");
                    }
                    let dh_all = gr.get(&h_all).unwrap();
                    let dh_want = if compact && !kept.is_empty() {
                        kept_rows(dh_all)?
                    } else {
                        dh_all.clone()
                    };
                    if !compact || !kept.is_empty() {
                        let d = max_diff(g.get(&h).unwrap(), &dh_want);
                        assert!(d < 1e-4, "bf16 h gradient differs by {d}: {what}");
                    }
                    // Where the CPU has bf16 products they ran: the f32 result differs.
                    if bf16::supported()
                        && scales
                            .as_deref()
                            .is_none_or(|s| s.iter().any(|&v| v != 0.0))
                    {
                        assert!(max_diff(&y0, &yb) > 0.0, "bf16 gave the f32 result: {what}");
                    }
                }
            }
            // An `h` with neither every sample's rows nor the kept ones' is an error, not a misread.
            let x = Tensor::from_vec(pattern(r * out, 5), (r, out), &dev)?;
            let h = Tensor::from_vec(pattern((r - 1) * inp, 1), (r - 1, inp), &dev)?;
            let w = Tensor::from_vec(pattern(out * inp, 2), (out, inp), &dev)?;
            let mut s = vec![1.0; samples];
            s[1] = 0.0;
            let err = linear_residual(&x, &h, &w, None, Some(s)).unwrap_err();
            assert!(err.to_string().contains("the kept ones"), "{err}");
        }
        Ok(())
    }

    /// The gathered rows and their gradient against candle's `index_select` (whose backward is `index_add`),
    /// over a size that stays on one thread and one that the pool splits; `no_grad` gives the same rows.
    #[test]
    fn sample_rows_gathers_and_scatters_back() -> Result<()> {
        let dev = Device::Cpu;
        for &(samples, per, d) in &[(5usize, 3usize, 4usize), (16, 197, 24)] {
            let kept: Vec<usize> = (0..samples).filter(|i| i % 4 != 1).collect();
            let x = Var::from_vec(pattern(samples * per * d, 1), (samples * per, d), &dev)?;
            let ids = Tensor::from_vec(
                kept.iter().map(|&i| i as u32).collect::<Vec<_>>(),
                kept.len(),
                &dev,
            )?;
            let reference = x
                .as_tensor()
                .reshape((samples, per * d))?
                .index_select(&ids, 0)?
                .reshape((kept.len() * per, d))?;
            let y = sample_rows(x.as_tensor(), samples, &kept)?;
            assert_eq!(y.dims(), reference.dims());
            assert_eq!(max_diff(&y, &reference), 0.0);
            let y0 = no_grad(|| sample_rows(x.as_tensor(), samples, &kept))?;
            assert!(!y0.track_op() && max_diff(&y0, &reference) == 0.0);
            let up = Tensor::from_vec(pattern(y.elem_count(), 2), y.dims(), &dev)?;
            let g = (y * &up)?.sum_all()?.backward()?;
            let gr = (reference * &up)?.sum_all()?.backward()?;
            assert_eq!(max_diff(g.get(&x).unwrap(), gr.get(&x).unwrap()), 0.0);
        }
        let x = Tensor::zeros((6, 2), DType::F32, &dev)?;
        assert!(sample_rows(&x, 3, &[2, 0]).is_err());
        assert!(sample_rows(&x, 3, &[3]).is_err());
        assert!(sample_rows(&x, 4, &[0]).is_err());
        Ok(())
    }

    /// Wide layers (fewer rows than outputs, at least `WIDE_MIN_OUT` outputs: the forward and `dx` split over
    /// the outputs, `dW` through transposed blocks of `g`) against an f64 reference, on 1, 2 and 3 pool
    /// threads: more rows than one k block of `dw_cols_t` (its blocks accumulate) and several row blocks per
    /// task with a partial last one, dW split by rows (`out >= inp`) and by columns, with and without a bias,
    /// `x` with and without a gradient, and rows below the forward's split (gemm's own threads). Each value is
    /// within `(k + 2) · 2^-24 · Σ|terms|` of the exact sum (f32 rounding over k terms; a misplaced block or a
    /// lost partial is off by whole terms).
    #[test]
    fn wide_layers_match_an_f64_reference() -> Result<()> {
        let dev = Device::Cpu;
        // (rows, in, out): 600 rows > DW_T_BLOCK_K; 1030 outputs in blocks of 256 dW rows per k block.
        let cases = [
            (600usize, 19usize, WIDE_MIN_OUT + 6),
            (40, WIDE_MIN_OUT + 76, WIDE_MIN_OUT + 6),
            (130, 33, 2 * WIDE_MIN_OUT + 1),
        ];
        // `(value, Σ|terms|)` of `Σ_l a(l) b(l)` over `n` terms, in f64.
        let dot = |n: usize, a: &dyn Fn(usize) -> f64, b: &dyn Fn(usize) -> f64| {
            (0..n).fold((0.0, 0.0), |(v, m), l| {
                (v + a(l) * b(l), m + (a(l) * b(l)).abs())
            })
        };
        let check = |what: &str, got: &[f32], want: &[(f64, f64)], k: usize| {
            assert_eq!(got.len(), want.len(), "{what}: length");
            let u = (k + 2) as f64 * 2f64.powi(-24);
            for (i, (&g, &(v, m))) in got.iter().zip(want).enumerate() {
                assert!(
                    (g as f64 - v).abs() <= u * m + 1e-30,
                    "{what}[{i}]: {g} vs {v} (terms {m})"
                );
            }
        };
        for threads in [1usize, 2, 3] {
            let pool = rayon::ThreadPoolBuilder::new()
                .num_threads(threads)
                .build()
                .map_err(|e| candle_core::Error::Msg(e.to_string()))?;
            for &(r, inp, out) in &cases {
                assert!(wide(r, out));
                for (with_bias, x_is_var) in [(true, true), (false, false)] {
                    let (xs, ws, bs, ups) = (
                        pattern(r * inp, 11),
                        pattern(out * inp, 12),
                        pattern(out, 13),
                        pattern(r * out, 14),
                    );
                    let xv = Var::from_vec(xs.clone(), (r, inp), &dev)?;
                    let x = if x_is_var {
                        xv.as_tensor().clone()
                    } else {
                        xv.as_tensor().detach()
                    };
                    let w = Var::from_vec(ws.clone(), (out, inp), &dev)?;
                    let b = Var::from_vec(bs.clone(), out, &dev)?;
                    let up = Tensor::from_vec(ups.clone(), (r, out), &dev)?;
                    let bias = with_bias.then(|| b.as_tensor());
                    let (y, grads) = pool.install(|| -> Result<_> {
                        let y = linear(&x, w.as_tensor(), bias)?;
                        let grads = (&y * &up)?.sum_all()?.backward()?;
                        Ok((y, grads))
                    })?;
                    let f = |v: &[f32], i: usize| v[i] as f64;
                    let what = |t: &str| format!("{t} ({r}x{inp}->{out}, {threads} threads)");
                    let want_y: Vec<(f64, f64)> = (0..r * out)
                        .map(|e| {
                            let (i, j) = (e / out, e % out);
                            let (v, m) =
                                dot(inp, &|l| f(&xs, i * inp + l), &|l| f(&ws, j * inp + l));
                            let bj = if with_bias { bs[j] as f64 } else { 0.0 };
                            (v + bj, m + bj.abs())
                        })
                        .collect();
                    let yv = y.flatten_all()?.to_vec1::<f32>()?;
                    check(&what("y"), &yv, &want_y, inp + 1);
                    let want_dw: Vec<(f64, f64)> = (0..out * inp)
                        .map(|e| {
                            let (j, c) = (e / inp, e % inp);
                            dot(r, &|l| f(&ups, l * out + j), &|l| f(&xs, l * inp + c))
                        })
                        .collect();
                    let dw = grads.get(&w).unwrap().flatten_all()?.to_vec1::<f32>()?;
                    check(&what("dW"), &dw, &want_dw, r);
                    if x_is_var {
                        let want_dx: Vec<(f64, f64)> = (0..r * inp)
                            .map(|e| {
                                let (i, c) = (e / inp, e % inp);
                                dot(out, &|j| f(&ups, i * out + j), &|j| f(&ws, j * inp + c))
                            })
                            .collect();
                        let dx = grads.get(&xv).unwrap().flatten_all()?.to_vec1::<f32>()?;
                        check(&what("dx"), &dx, &want_dx, out);
                    } else {
                        assert!(grads.get(&xv).is_none());
                    }
                    if with_bias {
                        let want_db: Vec<(f64, f64)> = (0..out)
                            .map(|j| dot(r, &|l| f(&ups, l * out + j), &|_| 1.0))
                            .collect();
                        let db = grads.get(&b).unwrap().to_vec1::<f32>()?;
                        check(&what("db"), &db, &want_db, r);
                    }
                }
            }
        }
        Ok(())
    }

    #[test]
    fn linear_gelu_gradient_matches_finite_differences() -> Result<()> {
        let dev = Device::Cpu;
        let (r, inp, out) = (3usize, 4usize, 5usize);
        let w0 = pattern(out * inp, 5);
        let x = Tensor::from_vec(pattern(r * inp, 6), (r, inp), &dev)?;
        let b = Tensor::from_vec(pattern(out, 7), out, &dev)?;
        let f = |wv: &[f32]| -> Result<f64> {
            let w = Tensor::from_vec(wv.to_vec(), (out, inp), &dev)?;
            linear_gelu(&x, &w, Some(&b))?
                .to_dtype(DType::F64)?
                .sqr()?
                .sum_all()?
                .to_scalar::<f64>()
        };
        let w = Var::from_vec(w0.clone(), (out, inp), &dev)?;
        let g = linear_gelu(&x, w.as_tensor(), Some(&b))?
            .sqr()?
            .sum_all()?
            .backward()?;
        let g: Vec<f32> = g.get(&w).unwrap().flatten_all()?.to_vec1()?;
        for i in 0..w0.len() {
            let (mut p, mut m) = (w0.clone(), w0.clone());
            p[i] += 1e-2;
            m[i] -= 1e-2;
            let fd = (f(&p)? - f(&m)?) / 2e-2;
            assert!(
                (fd - g[i] as f64).abs() < 2e-3 * (1.0 + fd.abs()),
                "w[{i}]: fd {fd}, analytic {}",
                g[i]
            );
        }
        Ok(())
    }

    #[test]
    fn residual_scales_each_sample_and_its_gradient() -> Result<()> {
        let dev = Device::Cpu;
        let (b, t, d) = (3usize, 4usize, 5usize);
        let x = Var::from_vec(pattern(b * t * d, 8), (b * t, d), &dev)?;
        let y = Var::from_vec(pattern(b * t * d, 9), (b * t, d), &dev)?;
        let scales = vec![0.0f32, 1.25, 1.0];
        let up = Tensor::from_vec(pattern(b * t * d, 10), (b * t, d), &dev)?;
        let out = residual(x.as_tensor(), y.as_tensor(), Some(scales.clone()))?;
        let mask = Tensor::from_vec(scales, (b, 1), &dev)?;
        let yr = y
            .as_tensor()
            .reshape((b, t * d))?
            .broadcast_mul(&mask)?
            .reshape((b * t, d))?;
        let reference = (x.as_tensor() + yr)?;
        assert!(max_diff(&out, &reference) < 1e-6);
        let g = (out * &up)?.sum_all()?.backward()?;
        let gr = (reference * &up)?.sum_all()?.backward()?;
        assert!(max_diff(g.get(&x).unwrap(), gr.get(&x).unwrap()) < 1e-6);
        assert!(max_diff(g.get(&y).unwrap(), gr.get(&y).unwrap()) < 1e-6);
        // Without scales: a plain sum, gradient passed through to both.
        let plain = residual(x.as_tensor(), y.as_tensor(), None)?;
        assert!(max_diff(&plain, &(x.as_tensor() + y.as_tensor())?) < 1e-6);
        Ok(())
    }
}
