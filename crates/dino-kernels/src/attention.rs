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
//! all written into their columns of one `(B*T, 3D)` gradient. [`attention_query`] is the same kernel for
//! separate queries over packed keys/values (the last ViT block when only the CLS output is used: one query
//! per sample). Other devices and dtypes use candle's composed ops (same result, slower).

use std::sync::{Arc, Mutex};

use candle_core::{CpuStorage, CustomOp1, CustomOp2, CustomOp3, Layout, Result, Shape, Tensor};
use gemm::Parallelism;
use rayon::prelude::*;

use crate::fused::gemm_strided;
use crate::ops::{self, f32_data, save, take_saved, Saved};
use crate::small_gemm;

/// A raw pointer that may cross rayon tasks: every task writes a disjoint set of elements.
struct SyncPtr<T = f32>(*mut T);
impl<T> Clone for SyncPtr<T> {
    fn clone(&self) -> Self {
        *self
    }
}
impl<T> Copy for SyncPtr<T> {}
// SAFETY: used only to write disjoint regions from parallel tasks (see each use).
unsafe impl<T> Send for SyncPtr<T> {}
// SAFETY: as above.
unsafe impl<T> Sync for SyncPtr<T> {}

impl<T> SyncPtr<T> {
    /// The pointer (a method, so closures capture the whole `Send` wrapper).
    fn get(self) -> *mut T {
        self.0
    }
}

/// Where the heads' outputs go: the f32 `(B*tq, D)` output, or a bf16 one (bit patterns), each head's rows
/// rounded as the bf16 packings round them (see [`attention_bf16_out`]).
#[derive(Clone, Copy)]
enum HeadOut {
    F32(SyncPtr),
    Bf16(SyncPtr<u16>),
}

/// Keys per sequence from which the heads' products take bf16 under [`crate::fused::MatmulPrecision::Bf16`]
/// (under the `vdpbf16ps` kernel the forward ones only, see [`Geo::backward`]): below it they stay in f32
/// through [`small_gemm`]. On the Intel Xeon with AMX (family 6 model 207), 3
/// interleaved pairs of bf16 steps: cifar/4096 (65 and 17 tokens) 2.21-2.32 s with AMX heads against
/// 2.16-2.24 s with f32 heads; imagenet/4096 (197 and 37 tokens) 0.78-0.89 s against 0.81-0.91 s.
pub(crate) const BF16_MIN_TOKENS: usize = 128;

/// Whether attention over `b` sequences of `t` keys takes bf16 products (see [`BF16_MIN_TOKENS`]).
fn bf16_heads(b: usize, t: usize) -> bool {
    crate::bf16::use_bf16(crate::fused::matmul_precision(), b * t)
        && (t >= BF16_MIN_TOKENS || !small_gemm::available())
}

/// `dst (m, n) = lhs (m, k) · rhs (k, n)` on the calling thread, each operand `(pointer, column stride, row
/// stride)`: bf16 products when `geo.bf16` (see [`crate::bf16::gemm_strided`]), else [`small_gemm::gemm`] when
/// `geo.small` and `dst` and `rhs` have unit column stride, else gemm ([`gemm_strided`]).
///
/// # Safety
/// As [`gemm_strided`].
#[allow(clippy::too_many_arguments)]
unsafe fn mm(
    geo: &Geo,
    m: usize,
    n: usize,
    k: usize,
    dst: (*mut f32, isize, isize),
    lhs: (*const f32, isize, isize),
    rhs: (*const f32, isize, isize),
) {
    if geo.bf16 {
        crate::bf16::gemm_strided(m, n, k, dst, lhs, rhs)
    } else if geo.small && dst.1 == 1 && rhs.1 == 1 {
        small_gemm::gemm(
            m,
            n,
            k,
            (dst.0, dst.2 as usize),
            (lhs.0, lhs.2 as usize, lhs.1 as usize),
            (rhs.0, rhs.2 as usize),
        )
    } else {
        gemm_strided(m, n, k, dst, false, lhs, rhs, Parallelism::None)
    }
}

/// `dst (m, n) = lhs (m, k) · rowsᵀ`, where `rows` is `(n, k)` with unit column stride and row stride `rows.1`:
/// for the small kernel through a transposed copy in `scratch` (`n * k` elements), else read in place.
///
/// # Safety
/// As [`mm`]; `scratch` holds at least `n * k` elements.
#[allow(clippy::too_many_arguments)]
unsafe fn mm_bt(
    geo: &Geo,
    m: usize,
    n: usize,
    k: usize,
    dst: (*mut f32, isize, isize),
    lhs: (*const f32, isize, isize),
    rows: (*const f32, isize),
    scratch: &mut [f32],
) {
    if geo.transposes() {
        // One or two columns past a multiple of 16 (the CLS key: 17 or 65 tokens) as dot products, when the
        // left operand's rows are contiguous.
        let extra = n % 16;
        let main = if n > 16 && extra <= 2 && lhs.1 == 1 && dst.1 == 1 {
            n - extra
        } else {
            n
        };
        small_gemm::transpose_into(rows.0, main, k, rows.1 as usize, scratch);
        mm(
            geo,
            m,
            main,
            k,
            dst,
            lhs,
            (scratch.as_ptr(), 1, main as isize),
        );
        if main < n {
            let row = |j: usize| rows.0.wrapping_offset(j as isize * rows.1);
            let tail = [row(main), row(main + 1)];
            let tail = &tail[..n - main];
            small_gemm::dot_columns(
                m,
                k,
                main,
                (dst.0, dst.2 as usize),
                (lhs.0, lhs.2 as usize),
                tail,
            );
        }
    } else {
        mm(geo, m, n, k, dst, lhs, (rows.0, rows.1, 1))
    }
}

/// Geometry of one attention call: element `j` of head `h` of row `r` of Q is at `q_off + r * q_rs + h * hd + j`
/// of the Q buffer, and likewise for K and V (offsets `k_off`, `v_off`) in the K/V buffer with row stride `kv_rs`.
#[derive(Debug, Clone, Copy)]
struct Geo {
    b: usize,
    /// Queries per sample.
    tq: usize,
    /// Keys (= values) per sample.
    t: usize,
    heads: usize,
    hd: usize,
    scale: f32,
    q_rs: usize,
    q_off: usize,
    kv_rs: usize,
    k_off: usize,
    v_off: usize,
    /// bf16 products (see [`crate::fused::MatmulPrecision::Bf16`]).
    bf16: bool,
    /// f32 products through [`small_gemm`] (AVX-512, or AVX2 + FMA), not gemm.
    small: bool,
}

impl Geo {
    /// Whether [`mm_bt`] multiplies through a transposed copy in scratch (f32 products in [`small_gemm`]).
    fn transposes(&self) -> bool {
        self.small && !self.bf16
    }

    /// Elements of the transposed-operand scratch one `(batch, head)` pair needs: `t * hd`, none without
    /// [`Geo::transposes`].
    fn transposed_len(&self) -> usize {
        if self.transposes() {
            self.t * self.hd
        } else {
            0
        }
    }

    fn d(&self) -> usize {
        self.heads * self.hd
    }

    /// Q, K and V of sample `bi`, head `hi` inside their buffers.
    ///
    /// # Safety
    /// `q` and `kv` must hold the buffers this geometry describes.
    unsafe fn qkv(
        &self,
        q: *const f32,
        kv: *const f32,
        bi: usize,
        hi: usize,
    ) -> (*const f32, *const f32, *const f32) {
        let h = hi * self.hd;
        (
            q.add(bi * self.tq * self.q_rs + self.q_off + h),
            kv.add(bi * self.t * self.kv_rs + self.k_off + h),
            kv.add(bi * self.t * self.kv_rs + self.v_off + h),
        )
    }

    /// Asks the cache for the Q, K and V rows of pair `bh` (if there is one), and its rows of the output
    /// gradient `go` `(B*tq, D)` when given, so that they arrive from L3 or memory while the current pair
    /// computes: each head reads 256 bytes of every row, a stride that the hardware prefetchers do not follow
    /// over 17-65 rows.
    fn prefetch_pair(&self, q: &[f32], kv: &[f32], go: Option<&[f32]>, bh: usize) {
        if bh >= self.b * self.heads {
            return;
        }
        let (bi, hi) = (bh / self.heads, bh % self.heads);
        let h = hi * self.hd;
        let qs = bi * self.tq * self.q_rs + self.q_off + h;
        prefetch_rows(q, qs, self.tq, self.q_rs, self.hd);
        let ks = bi * self.t * self.kv_rs + h;
        prefetch_rows(kv, ks + self.k_off, self.t, self.kv_rs, self.hd);
        prefetch_rows(kv, ks + self.v_off, self.t, self.kv_rs, self.hd);
        if let Some(go) = go {
            let d = self.d();
            prefetch_rows(go, bi * self.tq * d + h, self.tq, d, self.hd);
        }
    }

    /// Forward: `(out (B*tq, D), probs (B*H, tq, t))`, `out` in bf16 with `bf16_out`; the probabilities only
    /// when `keep_probs` (for the backward pass), otherwise they live in per-thread scratch.
    fn forward(
        &self,
        q: &[f32],
        kv: &[f32],
        keep_probs: bool,
        bf16_out: bool,
    ) -> (CpuStorage, Option<Vec<f32>>) {
        let (tq, t, d) = (self.tq, self.t, self.d());
        let n = tq * t;
        let len = self.b * tq * d;
        let (out, out_ptr) = if bf16_out {
            let mut o = crate::bf16::uninit_bf16(len);
            let ptr = HeadOut::Bf16(SyncPtr(crate::bf16::bf16_bits_mut(&mut o).as_mut_ptr()));
            (CpuStorage::BF16(o), ptr)
        } else {
            let mut o = crate::ops::uninit_f32(len);
            let ptr = HeadOut::F32(SyncPtr(o.as_mut_ptr()));
            (CpuStorage::F32(o), ptr)
        };
        let nt = self.transposed_len();
        let head = |bh: usize, logits: &mut [f32], p: &mut [f32], kt: &mut [f32]| {
            // SAFETY: the geometry matches the buffers (checked by the callers); the task of pair `bh` alone
            // writes rows bi*tq.. x columns hi*hd.. of `out`.
            unsafe { self.head_forward(q, kv, bh, logits, p, kt, out_ptr) }
        };
        if !keep_probs {
            (0..self.b * self.heads)
                .into_par_iter()
                .for_each(|bh| with_scratch(n, nt, |logits, p, kt| head(bh, logits, p, kt)));
            return (out, None);
        }
        let mut probs = crate::ops::uninit_f32(self.b * self.heads * n);
        probs
            .par_chunks_mut(n)
            .enumerate()
            .for_each(|(bh, p)| with_scratch(n, nt, |logits, _, kt| head(bh, logits, p, kt)));
        (out, Some(probs))
    }

    /// One `(batch, head)` pair of the forward pass: logits, softmax into `p`, `p V` into `out`; `kt` is
    /// scratch for `Kᵀ` (`t * hd` elements).
    ///
    /// # Safety
    /// `q`, `kv` and `out` must match the geometry, and no other task may write this pair's part of `out`.
    #[allow(clippy::too_many_arguments)]
    unsafe fn head_forward(
        &self,
        q: &[f32],
        kv: &[f32],
        bh: usize,
        logits: &mut [f32],
        p: &mut [f32],
        kt: &mut [f32],
        out: HeadOut,
    ) {
        let (tq, t, hd, d) = (self.tq, self.t, self.hd, self.d());
        let (q_rs, kv_rs, ti) = (self.q_rs as isize, self.kv_rs as isize, t as isize);
        let (bi, hi) = (bh / self.heads, bh % self.heads);
        self.prefetch_pair(q, kv, None, bh + 1);
        let (qh, kh, vh) = self.qkv(q.as_ptr(), kv.as_ptr(), bi, hi);
        mm_bt(
            self,
            tq,
            t,
            hd,
            (logits.as_mut_ptr(), 1, ti),
            (qh, 1, q_rs),
            (kh, kv_rs),
            kt,
        );
        ops::softmax_fwd_chunk(logits, p, t, self.scale);
        let at = bi * tq * d + hi * hd;
        match out {
            HeadOut::F32(o) => mm(
                self,
                tq,
                hd,
                t,
                (o.get().add(at), 1, d as isize),
                (p.as_ptr(), 1, ti),
                (vh, 1, kv_rs),
            ),
            HeadOut::Bf16(o) => {
                // The head's rows into scratch, then rounded into their columns of the output.
                let mut ph = crate::ops::uninit_f32(tq * hd);
                mm(
                    self,
                    tq,
                    hd,
                    t,
                    (ph.as_mut_ptr(), 1, hd as isize),
                    (p.as_ptr(), 1, ti),
                    (vh, 1, kv_rs),
                );
                for (i, row) in ph.chunks_exact(hd).enumerate() {
                    let dst = std::slice::from_raw_parts_mut(o.get().add(at + i * d), hd);
                    crate::bf16::round_to_bf16(row, dst);
                }
            }
        }
    }

    /// Backward: writes dQ into `dq` (laid out like Q) and dK, dV into `dkv` (laid out like K/V); `go` is the
    /// `(B*tq, D)` output gradient. `dq` and `dkv` may be the same buffer when Q and K/V share one.
    ///
    /// Under the `vdpbf16ps` kernel the backward products stay in f32 (`small_gemm`) even where the forward
    /// ones take bf16: three of its four products have a `t x t` operand (P, dS twice) against a head width of
    /// 64, so packing them to bf16 pairs cost more than their products (AMD Zen 5, step/imagenet/4096 bf16:
    /// packing 8% of the step, the heads' bf16 products 4%); with f32 backward products that step ran 1.05x
    /// (minimum step 1.07x; the backward phase 322 -> 283 ms) and imagenet/65536 1.07x (331 -> 305 ms), medians
    /// of 6 rounds in rotated order (`cargo xtask bench-ab`, 36th session). AMX keeps bf16 here.
    ///
    /// # Safety
    /// `dq` / `dkv` must be valid for the layouts of Q and K/V; `q`, `kv`, `go`, `probs` must match the geometry.
    unsafe fn backward(
        &self,
        q: &[f32],
        kv: &[f32],
        go: &[f32],
        probs: &[f32],
        dq: SyncPtr,
        dkv: SyncPtr,
    ) {
        if self.bf16 && self.small && crate::bf16::kernel() == Some(crate::bf16::Bf16Kernel::Dp) {
            // f32 backward products under the vdpbf16ps kernel (see above).
            let f32_geo = Geo {
                bf16: false,
                ..*self
            };
            return f32_geo.backward(q, kv, go, probs, dq, dkv);
        }
        let (tq, t, hd, d) = (self.tq, self.t, self.hd, self.d());
        let (qp, kvp, gop) = (
            q.as_ptr() as usize,
            kv.as_ptr() as usize,
            go.as_ptr() as usize,
        );
        let (q_rs, kv_rs, ti) = (self.q_rs as isize, self.kv_rs as isize, t as isize);
        let n = tq * t;
        probs.par_chunks(n).enumerate().for_each(|(bh, p)| {
            with_scratch(n, self.transposed_len(), |dp, ds, vt| {
                let (bi, hi) = (bh / self.heads, bh % self.heads);
                let h = hi * hd;
                self.prefetch_pair(q, kv, Some(go), bh + 1);
                // SAFETY: reads stay inside the buffers of the geometry; this task alone writes columns
                // hi*hd.. of its sample's rows of dQ, dK and dV; `dp`, `ds` are its scratch buffers.
                unsafe {
                    let (qh, kh, vh) = self.qkv(qp as *const f32, kvp as *const f32, bi, hi);
                    let goh = (gop as *const f32).add(bi * tq * d + h);
                    let dqh = dq.get().add(bi * tq * self.q_rs + self.q_off + h);
                    let dkh = dkv.get().add(bi * t * self.kv_rs + self.k_off + h);
                    let dvh = dkv.get().add(bi * t * self.kv_rs + self.v_off + h);
                    let p = p.as_ptr();
                    // dV = Pᵀ dO
                    mm(
                        self,
                        t,
                        hd,
                        tq,
                        (dvh, 1, kv_rs),
                        (p, ti, 1),
                        (goh, 1, d as isize),
                    );
                    // dP = dO Vᵀ
                    mm_bt(
                        self,
                        tq,
                        t,
                        hd,
                        (dp.as_mut_ptr(), 1, ti),
                        (goh, 1, d as isize),
                        (vh, kv_rs),
                        vt,
                    );
                    ops::softmax_bwd_chunk(std::slice::from_raw_parts(p, n), dp, ds, t, self.scale);
                    // dQ = dS K, dK = dSᵀ Q
                    mm(
                        self,
                        tq,
                        hd,
                        t,
                        (dqh, 1, q_rs),
                        (ds.as_ptr(), 1, ti),
                        (kh, 1, kv_rs),
                    );
                    mm(
                        self,
                        t,
                        hd,
                        tq,
                        (dkh, 1, kv_rs),
                        (ds.as_ptr(), ti, 1),
                        (qh, 1, q_rs),
                    );
                }
            })
        });
    }
}

/// Prefetches (into every cache level) `rows` rows of `len` elements of `buf` from `start`, row stride `rs`;
/// rows past the buffer's end are skipped.
fn prefetch_rows(buf: &[f32], start: usize, rows: usize, rs: usize, len: usize) {
    #[cfg(target_arch = "x86_64")]
    for r in 0..rows {
        let s = start + r * rs;
        let Some(row) = buf.get(s..s + len) else {
            return;
        };
        let p = row.as_ptr() as *const i8;
        let bytes = 4 * len;
        let mut off = 0;
        while off < bytes + 63 {
            // SAFETY: prefetching is only a hint: it never faults, and every address is inside `row` (the last one
            // is its final byte).
            unsafe {
                std::arch::x86_64::_mm_prefetch::<{ std::arch::x86_64::_MM_HINT_T0 }>(
                    p.add(off.min(bytes - 1)),
                )
            };
            off += 64;
        }
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = (buf, start, rows, rs, len);
}

thread_local! {
    /// Per-thread scratch of the attention tasks (logits, or dP and dS, and a transposed head): allocated once
    /// per pool thread instead of zero-filled `T x T` buffers for every rayon split.
    static SCRATCH: std::cell::RefCell<(Vec<f32>, Vec<f32>, Vec<f32>)> =
        const { std::cell::RefCell::new((Vec::new(), Vec::new(), Vec::new())) };
}

/// Runs `f` with two scratch buffers of `n` elements and one of `m` (contents unspecified: every use
/// overwrites them).
///
/// Re-entrant: a task that waits inside `f` (the bf16 GEMM packs large operands on the pool) may run another
/// attention task on this thread, which then gets fresh buffers instead of the borrowed ones.
fn with_scratch(n: usize, m: usize, f: impl FnOnce(&mut [f32], &mut [f32], &mut [f32])) {
    SCRATCH.with(|s| match s.try_borrow_mut() {
        Ok(mut s) => {
            let (a, b, c) = &mut *s;
            if a.len() < n {
                a.resize(n, 0.0);
                b.resize(n, 0.0);
            }
            if c.len() < m {
                c.resize(m, 0.0);
            }
            f(&mut a[..n], &mut b[..n], &mut c[..m])
        }
        Err(_) => f(&mut vec![0.0; n], &mut vec![0.0; n], &mut vec![0.0; m]),
    })
}

/// Self-attention on packed `qkv` `(B*T, 3D)` -> `(B*T, D)`.
struct AttentionOp {
    geo: Geo,
    /// Whether the backward pass will run (the probabilities are kept for it).
    keep_probs: bool,
    /// The output stored in bf16 (see [`attention_bf16_out`]).
    bf16_out: bool,
    probs: Saved,
}

impl CustomOp1 for AttentionOp {
    fn name(&self) -> &'static str {
        "dino-attention"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let qkv = f32_data(s, l, self.name())?;
        let (out, probs) = self.geo.forward(&qkv, &qkv, self.keep_probs, self.bf16_out);
        if let Some(probs) = probs {
            save(&self.probs, probs);
        }
        let g = self.geo;
        Ok((out, Shape::from((g.b * g.t, g.d()))))
    }

    fn bwd(&self, arg: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        let probs = take_saved(&self.probs, "attention probabilities")?;
        let op = AttentionBwdOp {
            geo: self.geo,
            probs,
        };
        Ok(Some(arg.apply_op2_no_bwd(&grad.contiguous()?, &op)?))
    }
}

/// Backward of [`AttentionOp`]: `(qkv, dOut)` -> `dqkv`.
struct AttentionBwdOp {
    geo: Geo,
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
        let qkv = f32_data(s1, l1, self.name())?;
        let go = f32_data(s2, l2, self.name())?;
        let mut dqkv = crate::ops::uninit_f32(qkv.len());
        let p = SyncPtr(dqkv.as_mut_ptr());
        // SAFETY: dqkv has qkv's layout, which the geometry describes.
        unsafe { self.geo.backward(&qkv, &qkv, &go, &self.probs, p, p) };
        Ok((CpuStorage::F32(dqkv), l1.shape().clone()))
    }
}

/// Attention of separate queries `(B*tq, D)` over packed keys/values `(B*T, 2D)` -> `(B*tq, D)`.
struct QueryAttentionOp {
    geo: Geo,
    /// As [`AttentionOp::keep_probs`].
    keep_probs: bool,
    probs: Saved,
}

impl CustomOp2 for QueryAttentionOp {
    fn name(&self) -> &'static str {
        "dino-query-attention"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let q = f32_data(s1, l1, self.name())?;
        let kv = f32_data(s2, l2, self.name())?;
        let (out, probs) = self.geo.forward(&q, &kv, self.keep_probs, false);
        if let Some(probs) = probs {
            save(&self.probs, probs);
        }
        let g = self.geo;
        Ok((out, Shape::from((g.b * g.tq, g.d()))))
    }

    fn bwd(
        &self,
        q: &Tensor,
        kv: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let probs = take_saved(&self.probs, "attention probabilities")?;
        let op = QueryAttentionBwdOp {
            geo: self.geo,
            probs,
        };
        // One flat buffer [dq | dkv], split into two views.
        let both = q.apply_op3_no_bwd(kv, &grad.contiguous()?, &op)?;
        let (nq, nkv) = (q.elem_count(), kv.elem_count());
        let dq = both.narrow(0, 0, nq)?.reshape(q.shape())?;
        let dkv = both.narrow(0, nq, nkv)?.reshape(kv.shape())?;
        Ok((Some(dq), Some(dkv)))
    }
}

/// Backward of [`QueryAttentionOp`]: `(q, kv, dOut)` -> flat `[dq | dkv]`.
struct QueryAttentionBwdOp {
    geo: Geo,
    probs: Arc<Vec<f32>>,
}

impl CustomOp3 for QueryAttentionBwdOp {
    fn name(&self) -> &'static str {
        "dino-query-attention-bwd"
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
        let q = f32_data(s1, l1, self.name())?;
        let kv = f32_data(s2, l2, self.name())?;
        let go = f32_data(s3, l3, self.name())?;
        let mut both = crate::ops::uninit_f32(q.len() + kv.len());
        let dq = SyncPtr(both.as_mut_ptr());
        // SAFETY: the first q.len() elements are dq (q's layout), the rest dkv (kv's layout).
        let dkv = SyncPtr(unsafe { both.as_mut_ptr().add(q.len()) });
        // SAFETY: as above; the geometry matches q and kv (checked by `attention_query`).
        unsafe { self.geo.backward(&q, &kv, &go, &self.probs, dq, dkv) };
        let n = both.len();
        Ok((CpuStorage::F32(both), Shape::from(n)))
    }
}

fn composed(q: &Tensor, k: &Tensor, v: &Tensor, scale: f64) -> Result<Tensor> {
    use crate::fused::portable_matmul;
    let probs = candle_nn::ops::softmax(
        &(portable_matmul(q, &k.t()?)? * scale)?,
        candle_core::D::Minus1,
    )?;
    portable_matmul(&probs, v)
}

/// `(B*T, D)`-shaped columns `[off, off + D)` of a 2-D tensor as `(B, H, T, hd)`.
fn heads_of(x: &Tensor, off: usize, b: usize, t: usize, heads: usize, hd: usize) -> Result<Tensor> {
    x.narrow(1, off, heads * hd)?
        .reshape((b, t, heads, hd))?
        .permute((0, 2, 1, 3))?
        .contiguous()
}

/// Multi-head self-attention `softmax(scale · Q Kᵀ) V` of every head, merged back:
/// `qkv`: `(B*T, 3D)` (rows `[q | k | v]`, heads contiguous within each) -> `(B*T, D)`.
pub fn attention(qkv: &Tensor, b: usize, t: usize, heads: usize, scale: f64) -> Result<Tensor> {
    attention_impl(qkv, b, t, heads, scale, false)
}

/// [`attention`] for an output that only bf16 products read next (the block's projection, a
/// [`crate::fused::linear_residual`]; the backward pass reads the probabilities and the output gradient, not
/// the output): where those products run in bf16 (see [`crate::fused::with_matmul_precision`]), the output is
/// a bf16 tensor rounded as their packing would round it, so results and gradients keep their bits while it
/// takes half the memory. Its gradient comes back in f32. Elsewhere an f32 tensor, as [`attention`]'s.
pub fn attention_bf16_out(
    qkv: &Tensor,
    b: usize,
    t: usize,
    heads: usize,
    scale: f64,
) -> Result<Tensor> {
    attention_impl(qkv, b, t, heads, scale, true)
}

fn attention_impl(
    qkv: &Tensor,
    b: usize,
    t: usize,
    heads: usize,
    scale: f64,
    bf16_out: bool,
) -> Result<Tensor> {
    let (rows, d3) = qkv.dims2()?;
    if heads == 0 || rows != b * t || d3 % (3 * heads) != 0 {
        candle_core::bail!(
            "attention: qkv {:?} does not match B {b} x T {t} rows and 3 x {heads} heads",
            qkv.dims()
        );
    }
    let d = d3 / 3;
    let hd = d / heads;
    if crate::dispatch::cpu_f32_fast_path(&[qkv]) {
        let geo = Geo {
            b,
            tq: t,
            t,
            heads,
            hd,
            scale: scale as f32,
            q_rs: 3 * d,
            q_off: 0,
            kv_rs: 3 * d,
            k_off: d,
            v_off: 2 * d,
            bf16: bf16_heads(b, t),
            small: small_gemm::available(),
        };
        let keep_probs = crate::fused::records_grad(&[qkv]);
        let op = AttentionOp {
            geo,
            keep_probs,
            bf16_out: bf16_out && crate::bf16::use_bf16(crate::fused::matmul_precision(), rows),
            probs: Mutex::new(None),
        };
        return if keep_probs {
            qkv.apply_op1(op)
        } else {
            qkv.apply_op1_no_bwd(&op)
        };
    }
    let split = |i: usize| heads_of(qkv, i * d, b, t, heads, hd);
    composed(&split(0)?, &split(1)?, &split(2)?, scale)?
        .permute((0, 2, 1, 3))?
        .contiguous()?
        .reshape((b * t, d))
}

/// Multi-head attention of `tq` queries per sample over `t` keys/values per sample (the last ViT block when
/// only the CLS output is used): `q`: `(B*tq, D)`, `kv`: `(B*T, 2D)` (rows `[k | v]`) -> `(B*tq, D)`.
#[allow(clippy::too_many_arguments)]
pub fn attention_query(
    q: &Tensor,
    kv: &Tensor,
    b: usize,
    tq: usize,
    t: usize,
    heads: usize,
    scale: f64,
) -> Result<Tensor> {
    let (qr, d) = q.dims2()?;
    let (kvr, d2) = kv.dims2()?;
    if heads == 0 || qr != b * tq || kvr != b * t || d2 != 2 * d || d % heads != 0 {
        candle_core::bail!(
            "attention_query: q {:?} and kv {:?} do not match B {b}, {tq} queries, {t} keys, {heads} heads",
            q.dims(),
            kv.dims()
        );
    }
    let hd = d / heads;
    if crate::dispatch::cpu_f32_fast_path(&[q, kv]) {
        let geo = Geo {
            b,
            tq,
            t,
            heads,
            hd,
            scale: scale as f32,
            q_rs: d,
            q_off: 0,
            kv_rs: 2 * d,
            k_off: 0,
            v_off: d,
            bf16: bf16_heads(b, t),
            small: small_gemm::available(),
        };
        let keep_probs = crate::fused::records_grad(&[q, kv]);
        let op = QueryAttentionOp {
            geo,
            keep_probs,
            probs: Mutex::new(None),
        };
        return if keep_probs {
            q.apply_op2(kv, op)
        } else {
            q.apply_op2_no_bwd(kv, &op)
        };
    }
    composed(
        &heads_of(q, 0, b, tq, heads, hd)?,
        &heads_of(kv, 0, b, t, heads, hd)?,
        &heads_of(kv, d, b, t, heads, hd)?,
        scale,
    )?
    .permute((0, 2, 1, 3))?
    .contiguous()?
    .reshape((b * tq, d))
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

    /// The per-thread scratch when a task runs inside another on the same thread: separate buffers, no
    /// panic on the borrowed ones.
    #[test]
    fn scratch_is_reentrant() {
        with_scratch(4, 3, |a, b, e| {
            a.fill(1.0);
            b.fill(2.0);
            e.fill(5.0);
            with_scratch(8, 6, |c, d, f| {
                assert_eq!((c.len(), d.len(), f.len()), (8, 8, 6));
                c.fill(3.0);
                d.fill(4.0);
                f.fill(6.0);
            });
            assert!(a.iter().all(|&v| v == 1.0) && b.iter().all(|&v| v == 2.0));
            assert!(e.iter().all(|&v| v == 5.0));
        });
    }

    /// Under `no_grad` (probabilities in per-thread scratch, not kept) the outputs are the same bit for bit, for
    /// rows of logits shorter than, a multiple of, and longer than the softmax's 16 lanes; nothing is recorded.
    #[test]
    fn no_grad_gives_the_same_values_without_a_graph() -> Result<()> {
        let dev = Device::Cpu;
        for &(b, t, heads, hd) in &[
            (2usize, 5usize, 3usize, 4usize),
            (2, 32, 2, 8),
            (3, 37, 3, 8),
        ] {
            let d = heads * hd;
            let qkv = Var::from_vec(pattern(b * t * 3 * d, 1), (b * t, 3 * d), &dev)?;
            let y = attention(qkv.as_tensor(), b, t, heads, 0.3)?;
            let y0 = crate::fused::no_grad(|| attention(qkv.as_tensor(), b, t, heads, 0.3))?;
            assert!(y.track_op() && !y0.track_op());
            assert!(
                y.to_vec2::<f32>()? == y0.to_vec2::<f32>()?,
                "{b}x{t}x{heads}x{hd}"
            );
            // The CLS query over every key.
            let q = Var::from_vec(pattern(b * d, 3), (b, d), &dev)?;
            let kv = qkv.as_tensor().narrow(1, d, 2 * d)?.contiguous()?;
            let z = attention_query(q.as_tensor(), &kv, b, 1, t, heads, 0.3)?;
            let z0 =
                crate::fused::no_grad(|| attention_query(q.as_tensor(), &kv, b, 1, t, heads, 0.3))?;
            assert!(z.track_op() && !z0.track_op());
            assert!(z.to_vec2::<f32>()? == z0.to_vec2::<f32>()?, "query {b}x{t}");
        }
        Ok(())
    }

    /// bf16 products: the forward pass against the composed f32 ops on the operands the bf16 GEMMs see
    /// (Q, K, V and the probabilities rounded to bf16); the gradient within bf16 distance (2^-8 relative per
    /// operand) of the f32 one, and different from it (the bf16 path ran). Without AVX-512 BF16 the setting
    /// falls back to f32.
    #[test]
    fn bf16_products_match_rounded_operand_reference() -> Result<()> {
        crate::bf16::for_each_bf16_kernel(bf16_products_match_rounded_operand_reference_with_kernel)
    }

    fn bf16_products_match_rounded_operand_reference_with_kernel() -> Result<()> {
        use crate::bf16::{round_bf16, supported};
        let dev = Device::Cpu;
        let round = |t: &Tensor| -> Result<Tensor> {
            let v: Vec<f32> = t.flatten_all()?.to_vec1()?;
            Tensor::from_vec(
                v.into_iter().map(round_bf16).collect::<Vec<f32>>(),
                t.shape(),
                t.device(),
            )
        };
        // Below BF16_MIN_TOKENS keys the heads' products stay in f32 (the same bits as without bf16).
        for &(b, t, heads, hd) in &[
            (2usize, 5usize, 3usize, 4usize),
            (2, 40, 2, 64),
            (1, BF16_MIN_TOKENS, 3, 4),
            (2, BF16_MIN_TOKENS + 12, 2, 64),
        ] {
            let bf16 = supported() && (t >= BF16_MIN_TOKENS || !small_gemm::available());
            let d = heads * hd;
            let scale = (hd as f64).powf(-0.5);
            let qkv = Var::from_vec(pattern(b * t * 3 * d, 3), (b * t, 3 * d), &dev)?;
            let qkv_t = (qkv.as_tensor() * 0.25)?;
            let w = Tensor::from_vec(pattern(b * t * d, 4), (b * t, d), &dev)?;
            let y = crate::bf16::bf16_products(|| attention(&qkv_t, b, t, heads, scale))?;
            let y32 = attention(&qkv_t, b, t, heads, scale)?;
            if bf16 {
                // Reference: rounded Q, K -> f32 softmax -> rounded P times rounded V.
                let split = |i: usize| -> Result<Tensor> {
                    round(&qkv_t)?
                        .narrow(1, i * d, d)?
                        .reshape((b, t, heads, hd))?
                        .permute((0, 2, 1, 3))?
                        .contiguous()
                };
                let logits = (split(0)?.matmul(&split(1)?.t()?.contiguous()?)? * scale)?;
                let probs = round(&candle_nn::ops::softmax(&logits, candle_core::D::Minus1)?)?;
                let y_ref = probs
                    .matmul(&split(2)?)?
                    .permute((0, 2, 1, 3))?
                    .contiguous()?
                    .reshape((b * t, d))?;
                let diff = (&y - &y_ref)?.abs()?.max_all()?.to_scalar::<f32>()?;
                // f32 sums over t keys in another order: their rounding grows with t.
                let tol = 1e-5f32.max(4e-7 * t as f32);
                assert!(
                    diff < tol,
                    "bf16 forward differs by {diff} at {b}x{t}x{heads}x{hd}"
                );
                assert!((&y - &y32)?.abs()?.max_all()?.to_scalar::<f32>()? > 0.0);
            } else {
                assert_eq!(y.to_vec2::<f32>()?, y32.to_vec2::<f32>()?);
            }
            let g = (y * &w)?.sum_all()?.backward()?;
            let g32 = (y32 * &w)?.sum_all()?.backward()?;
            let (a, r) = (g.get(&qkv).unwrap(), g32.get(&qkv).unwrap());
            let diff = (a - r)?.abs()?.max_all()?.to_scalar::<f32>()?;
            let mag = r.abs()?.max_all()?.to_scalar::<f32>()?;
            eprintln!("bf16 attention gradient: max diff {diff}, max {mag}");
            assert!(
                diff < 2e-2 * mag,
                "bf16 gradient differs by {diff} (max {mag})"
            );
            if bf16 {
                assert!(diff > 0.0, "bf16 gradient equals the f32 one");
            } else {
                assert_eq!(a.to_vec2::<f32>()?, r.to_vec2::<f32>()?);
            }
        }
        Ok(())
    }

    /// The backward pass of bf16 heads: f32 products under the `vdpbf16ps` kernel (the bits of the f32 heads'
    /// backward on the same probabilities), bf16 ones under AMX (other bits), see [`Geo::backward`].
    #[test]
    fn bf16_heads_backward_products_by_kernel() {
        use crate::bf16::{supported, with_bf16_gemm, Bf16Gemm};
        if !supported() || !small_gemm::available() {
            eprintln!("BF16 ATTENTION BACKWARD TEST NOT RUN: this CPU has no AVX-512 BF16");
            return;
        }
        let (b, t, heads, hd) = (2usize, BF16_MIN_TOKENS + 12, 2usize, 64usize);
        let d = heads * hd;
        let geo = |bf16: bool| Geo {
            b,
            tq: t,
            t,
            heads,
            hd,
            scale: (hd as f32).powf(-0.5),
            q_rs: 3 * d,
            q_off: 0,
            kv_rs: 3 * d,
            k_off: d,
            v_off: 2 * d,
            bf16,
            small: true,
        };
        let qkv: Vec<f32> = pattern(b * t * 3 * d, 5).iter().map(|v| v * 0.25).collect();
        let go = pattern(b * t * d, 6);
        // Rows of positive weights summing to 1 stand in for the kept probabilities.
        let mut probs: Vec<f32> = pattern(b * heads * t * t, 7)
            .iter()
            .map(|v| v + 2.5)
            .collect();
        probs.chunks_mut(t).for_each(|row| {
            let s: f32 = row.iter().sum();
            row.iter_mut().for_each(|v| *v /= s)
        });
        let grad = |g: Geo, mode: Bf16Gemm| {
            let mut dqkv = vec![0f32; qkv.len()];
            let p = SyncPtr(dqkv.as_mut_ptr());
            // SAFETY: dqkv has qkv's layout, which the geometry describes; probs are (b * heads, t, t).
            with_bf16_gemm(mode, || unsafe {
                g.backward(&qkv, &qkv, &go, &probs, p, p)
            });
            dqkv
        };
        let f32_bits = grad(geo(false), Bf16Gemm::Always);
        let dp = grad(geo(true), Bf16Gemm::Always);
        assert!(
            dp.iter()
                .zip(&f32_bits)
                .all(|(a, b)| a.to_bits() == b.to_bits()),
            "vdpbf16ps: the backward products are not the f32 ones"
        );
        if crate::bf16::amx_test_pass_runs("the bf16 heads' backward") {
            let amx = grad(geo(true), Bf16Gemm::Amx);
            assert!(amx != f32_bits, "AMX: the backward products ran in f32");
        }
    }

    #[test]
    fn query_attention_matches_full_attention_rows() -> Result<()> {
        // The CLS-row output of full attention equals attention_query with the CLS query; gradients too.
        let dev = Device::Cpu;
        let (b, t, heads, hd) = (3usize, 6usize, 2usize, 4usize);
        let d = heads * hd;
        let scale = (hd as f64).powf(-0.5);
        let qkv = Var::from_vec(pattern(b * t * 3 * d, 5), (b * t, 3 * d), &dev)?;
        let w = Tensor::from_vec(pattern(b * d, 6), (b, d), &dev)?;
        let cls_rows = |x: &Tensor| -> Result<Tensor> {
            let c = x.dim(1)?;
            x.reshape((b, t, c))?.narrow(1, 0, 1)?.reshape((b, c))
        };
        let full = cls_rows(&attention(qkv.as_tensor(), b, t, heads, scale)?)?;
        let q = cls_rows(&qkv.as_tensor().narrow(1, 0, d)?)?;
        let kv = qkv.as_tensor().narrow(1, d, 2 * d)?;
        let part = attention_query(&q, &kv, b, 1, t, heads, scale)?;
        let diff = (&full - &part)?.abs()?.max_all()?.to_scalar::<f32>()?;
        assert!(diff < 1e-6, "outputs differ by {diff}");
        let g_full = (full * &w)?.sum_all()?.backward()?;
        let g_part = (part * &w)?.sum_all()?.backward()?;
        let (a, r) = (g_part.get(&qkv).unwrap(), g_full.get(&qkv).unwrap());
        let diff = (a - r)?.abs()?.max_all()?.to_scalar::<f32>()?;
        assert!(diff < 1e-5, "gradients differ by {diff}");
        // Several queries per sample against the composed reference.
        let tq = 2;
        let q2 = Tensor::from_vec(pattern(b * tq * d, 7), (b * tq, d), &dev)?;
        let kv2 = Tensor::from_vec(pattern(b * t * 2 * d, 8), (b * t, 2 * d), &dev)?;
        let fast = attention_query(&q2, &kv2, b, tq, t, heads, scale)?;
        let reference = composed(
            &heads_of(&q2, 0, b, tq, heads, hd)?,
            &heads_of(&kv2, 0, b, t, heads, hd)?,
            &heads_of(&kv2, d, b, t, heads, hd)?,
            scale,
        )?
        .permute((0, 2, 1, 3))?
        .contiguous()?
        .reshape((b * tq, d))?;
        let diff = (&fast - &reference)?.abs()?.max_all()?.to_scalar::<f32>()?;
        assert!(diff < 1e-5, "{tq} queries: outputs differ by {diff}");
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
