//! Hand-written CPU kernels shared by the loss, the EMA and the optimisers: a vectorisable `exp`,
//! lane-parallel row reductions, and parallel-loop helpers on rayon's pool (the pool the kernels of
//! dino-kernels and candle run on; rayon is already a dependency of both).

use std::ops::Range;

/// Below this many elements of work a kernel runs on the calling thread only.
const MIN_PARALLEL_WORK: usize = 1 << 16;

/// Number of worker threads to use: the threads of the current rayon pool. The helpers below used to spawn
/// scoped OS threads per call; once per parameter tensor in the EMA and AdamW loops that was ~120 thread
/// starts per training step.
pub(crate) fn num_threads() -> usize {
    rayon::current_num_threads().max(1)
}

fn threads_for(items: usize, work_per_item: usize) -> usize {
    let work = items.saturating_mul(work_per_item.max(1));
    num_threads()
        .min(items)
        .min((work / MIN_PARALLEL_WORK).max(1))
}

/// `out[i] = f(i)` for every `i`, splitting the items across threads when the work is large.
pub(crate) fn par_fill<R: Send, F: Fn(usize) -> R + Sync>(
    out: &mut [R],
    work_per_item: usize,
    f: F,
) {
    let threads = threads_for(out.len(), work_per_item);
    if threads <= 1 {
        for (i, o) in out.iter_mut().enumerate() {
            *o = f(i);
        }
        return;
    }
    let chunk = out.len().div_ceil(threads);
    let f = &f;
    rayon::scope(|sc| {
        for (c, part) in out.chunks_mut(chunk).enumerate() {
            sc.spawn(move |_| {
                for (j, o) in part.iter_mut().enumerate() {
                    *o = f(c * chunk + j);
                }
            });
        }
    });
}

/// Calls `f(row, out_row)` for every row of `out` (rows of `row_len`), in parallel when large.
pub(crate) fn par_rows_mut<F: Fn(usize, &mut [f32]) + Sync>(out: &mut [f32], row_len: usize, f: F) {
    if row_len == 0 {
        return;
    }
    let rows = out.len() / row_len;
    let threads = threads_for(rows, row_len);
    if threads <= 1 {
        for (r, row) in out.chunks_mut(row_len).enumerate() {
            f(r, row);
        }
        return;
    }
    let rows_per = rows.div_ceil(threads);
    let f = &f;
    rayon::scope(|sc| {
        for (c, part) in out.chunks_mut(rows_per * row_len).enumerate() {
            sc.spawn(move |_| {
                for (j, row) in part.chunks_mut(row_len).enumerate() {
                    f(c * rows_per + j, row);
                }
            });
        }
    });
}

/// Splits `0..len` into one contiguous range per thread and calls `f(range)` on each, in parallel
/// when `len` is large. Callers split their own slices by the range.
pub(crate) fn par_ranges<F: Fn(Range<usize>) + Sync>(len: usize, f: F) {
    let threads = threads_for(len, 1);
    if threads <= 1 {
        f(0..len);
        return;
    }
    // Chunk boundaries on multiples of 64 elements keep every chunk cache-line aligned.
    let chunk = len.div_ceil(threads).div_ceil(64) * 64;
    let f = &f;
    rayon::scope(|sc| {
        let mut start = 0;
        while start < len {
            let end = (start + chunk).min(len);
            sc.spawn(move |_| f(start..end));
            start = end;
        }
    });
}

/// `simd!({ body })`: `body` run by [`with_simd`] as an `#[inline(always)]` closure, so that it is compiled
/// inside the wide-vector wrappers. A closure left out of line (another codegen unit) keeps the baseline's SSE
/// code, as the loss, EMA and AdamW loops did before this macro. Code the body calls must inline too: the
/// kernels below do, an iterator adaptor's `fold` (`map().sum()`) may not, so the bodies use plain loops.
macro_rules! simd {
    ($body:block) => {
        $crate::kernels::with_simd(
            #[inline(always)]
            || $body,
        )
    };
}
pub(crate) use simd;

/// Runs `f` in a function compiled with AVX-512 F, else AVX2, enabled when the CPU has it (the kernels below
/// are `inline(always)`, so they are generated with 512-bit or 256-bit vectors there); plain `f()` otherwise.
/// The wider vectors only change how the [`LANES`] accumulator lanes map onto registers: no FMA
/// contraction, so results are bit-identical either way. Call it through [`simd!`].
#[inline(always)]
pub(crate) fn with_simd<R>(f: impl FnOnce() -> R) -> R {
    #[cfg(target_arch = "x86_64")]
    {
        #[target_feature(enable = "avx512f")]
        unsafe fn avx512<R>(f: impl FnOnce() -> R) -> R {
            f()
        }
        #[target_feature(enable = "avx2")]
        unsafe fn avx2<R>(f: impl FnOnce() -> R) -> R {
            f()
        }
        if std::is_x86_feature_detected!("avx512f") {
            // SAFETY: the CPU supports AVX-512 F (checked just above).
            return unsafe { avx512(f) };
        }
        if std::is_x86_feature_detected!("avx2") {
            // SAFETY: the CPU supports AVX2 (checked just above).
            return unsafe { avx2(f) };
        }
    }
    f()
}

/// A raw pointer that may be sent to the scoped worker threads of [`par_ranges`]; every worker writes
/// a disjoint range.
#[derive(Clone, Copy)]
pub(crate) struct SendPtr<T>(pub *mut T);
unsafe impl<T> Send for SendPtr<T> {}
unsafe impl<T> Sync for SendPtr<T> {}

impl<T> SendPtr<T> {
    /// # Safety
    /// `range` must lie inside the allocation and no other live reference may overlap it.
    pub(crate) unsafe fn slice_mut<'a>(self, range: Range<usize>) -> &'a mut [T] {
        std::slice::from_raw_parts_mut(self.0.add(range.start), range.len())
    }
}

/// `exp(x)` in f32 (Cephes `expf` polynomial, relative error < 2 ulp over the normal range), written
/// with branch-free integer tricks so that loops over it vectorise. Inputs below -87.3 give ~1e-38
/// (callers subtract the row maximum, so those terms are negligible next to the maximum's 1).
#[inline(always)]
pub(crate) fn exp_f32(x: f32) -> f32 {
    const LOG2E: f32 = std::f32::consts::LOG2_E;
    const LN2_HI: f32 = 0.693_359_4;
    const LN2_LO: f32 = -2.121_944_4e-4;
    // 1.5 * 2^23: adding it rounds to the nearest integer, kept in the low mantissa bits.
    const MAGIC: f32 = 12_582_912.0;
    let x = x.clamp(-87.3, 88.3);
    let t = x * LOG2E + MAGIC;
    let n = t - MAGIC;
    let r = x - n * LN2_HI - n * LN2_LO;
    let z = r * r;
    let p = (((((1.987_569_1e-4 * r + 1.398_2e-3) * r + 8.333_452e-3) * r + 4.166_579_6e-2) * r
        + 1.666_666_5e-1)
        * r
        + 5.000_000_1e-1_f64 as f32)
        * z
        + r
        + 1.0;
    let ni = (t.to_bits() as i32).wrapping_sub(0x4B40_0000);
    let scale = f32::from_bits(((ni + 127) as u32) << 23);
    p * scale
}

const LANES: usize = 16;

/// Maximum of a non-empty slice (NaN-propagation is not needed: inputs are finite logits).
#[inline(always)]
pub(crate) fn max_f32(x: &[f32]) -> f32 {
    let mut acc = [f32::NEG_INFINITY; LANES];
    let chunks = x.chunks_exact(LANES);
    let rem = chunks.remainder();
    for c in chunks {
        for i in 0..LANES {
            acc[i] = acc[i].max(c[i]);
        }
    }
    let mut m = f32::NEG_INFINITY;
    for &v in acc.iter().chain(rem) {
        m = m.max(v);
    }
    m
}

/// `sum_k exp(x[k] / temp - shift)` with `shift` the row maximum of `x / temp`; accumulated in
/// 16 f32 lanes and a final f64 sum.
#[inline(always)]
pub(crate) fn sum_exp_scaled(x: &[f32], temp: f32, shift: f32) -> f64 {
    let mut acc = [0f32; LANES];
    let chunks = x.chunks_exact(LANES);
    let rem = chunks.remainder();
    for c in chunks {
        for i in 0..LANES {
            acc[i] += exp_f32(c[i] / temp - shift);
        }
    }
    let mut s: f64 = acc.iter().map(|&v| v as f64).sum();
    for &v in rem {
        s += exp_f32(v / temp - shift) as f64;
    }
    s
}

/// `sum_k a[k] * b[k]` in 16 f32 lanes with a final f64 sum.
#[inline(always)]
pub(crate) fn dot(a: &[f32], b: &[f32]) -> f64 {
    let n = a.len().min(b.len());
    let (a, b) = (&a[..n], &b[..n]);
    let mut acc = [0f32; LANES];
    let ca = a.chunks_exact(LANES);
    let cb = b.chunks_exact(LANES);
    let (ra, rb) = (ca.remainder(), cb.remainder());
    for (x, y) in ca.zip(cb) {
        for i in 0..LANES {
            acc[i] += x[i] * y[i];
        }
    }
    let mut s: f64 = acc.iter().map(|&v| v as f64).sum();
    for (x, y) in ra.iter().zip(rb) {
        s += (*x * *y) as f64;
    }
    s
}

/// `sum_k q[k] * (x[k] / temp - shift)`: the dot of a target distribution with a log-softmax row
/// (`shift = max + ln(sum exp)`), in 16 f32 lanes with a final f64 sum.
#[inline(always)]
pub(crate) fn dot_log_softmax(q: &[f32], x: &[f32], temp: f32, shift: f32) -> f64 {
    let n = q.len().min(x.len());
    let (q, x) = (&q[..n], &x[..n]);
    let mut acc = [0f32; LANES];
    let cq = q.chunks_exact(LANES);
    let cx = x.chunks_exact(LANES);
    let (rq, rx) = (cq.remainder(), cx.remainder());
    for (a, b) in cq.zip(cx) {
        for i in 0..LANES {
            acc[i] += a[i] * (b[i] / temp - shift);
        }
    }
    let mut s: f64 = acc.iter().map(|&v| v as f64).sum();
    for (a, b) in rq.iter().zip(rx) {
        s += (*a * (*b / temp - shift)) as f64;
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    /// candle's sum over leading dimensions (the centre's `(B, K) -> (1, K)` batch sum, a broadcast's backward
    /// over the batch), which vendor/candle-core runs as in-order row additions: the bits of a direct in-order
    /// loop (signed zeros, 1e8 cancellations), over one and over two leading dimensions.
    #[test]
    fn leading_dim_sums_add_the_rows_in_order() {
        let dev = candle_core::Device::Cpu;
        for &(a, b, c) in &[
            (1usize, 1usize, 1usize),
            (3, 1, 5),
            (128, 1, 4099),
            (7, 3, 70_000),
        ] {
            let x: Vec<f32> = (0..a * b * c)
                .map(|i| match i % 11 {
                    0 => -0.0,
                    1 => 1e8,
                    2 => -1e8,
                    _ => ((i * 7919 % 1009) as f32 - 504.0) / 37.0,
                })
                .collect();
            let t = candle_core::Tensor::from_vec(x.clone(), (a, b, c), &dev).unwrap();
            let in_order = |rows: usize, n: usize| {
                let mut acc = vec![0f32; n];
                for r in 0..rows {
                    for (s, &v) in acc.iter_mut().zip(&x[r * n..(r + 1) * n]) {
                        *s += v;
                    }
                }
                acc
            };
            for (dims, rows) in [(vec![0usize], a), (vec![0, 1], a * b)] {
                let got = t
                    .sum_keepdim(dims.clone())
                    .unwrap()
                    .flatten_all()
                    .unwrap()
                    .to_vec1::<f32>()
                    .unwrap();
                let want = in_order(rows, x.len() / rows);
                assert_eq!(got.len(), want.len());
                for (j, (g, w)) in got.iter().zip(&want).enumerate() {
                    assert_eq!(
                        g.to_bits(),
                        w.to_bits(),
                        "{a}x{b}x{c} over {dims:?} [{j}]: {g} vs {w}"
                    );
                }
            }
        }
    }

    /// candle's copies, which vendor/candle-core splits over the rayon pool from 256 KiB: a `cat` along rows
    /// (each source's rows into their columns, the parallel row path, beside a source small enough for the
    /// serial one), a `cat` along the batch (the parallel contiguous path, a length that is not a multiple of
    /// its chunk), one of a tensor and a transposed one (a single strided block) and a `contiguous` copy of a
    /// column slice put every element where it belongs, on a pool of 3 threads and of 1. It fails when a row or
    /// chunk of the parallel paths is offset or skipped.
    #[test]
    fn large_copies_place_every_element() {
        use candle_core::{Device, Tensor};
        let (rows, wide, narrow) = (611usize, 1003usize, 7usize);
        let val = |i: usize, j: usize, k: usize| (i * 100_003 + j * 7 + k) as f32;
        let make = |cols: usize, k: usize| {
            let v: Vec<f32> = (0..rows * cols)
                .map(|x| val(x / cols, x % cols, k))
                .collect();
            Tensor::from_vec(v, (rows, cols), &Device::Cpu).unwrap()
        };
        // Every element of the 2-D `t` against `want(i, j)`.
        let check = |t: Tensor, want: &dyn Fn(usize, usize) -> f32, what: &str| {
            for (i, row) in t.to_vec2::<f32>().unwrap().iter().enumerate() {
                for (j, &v) in row.iter().enumerate() {
                    assert_eq!(v, want(i, j), "{what} [{i}][{j}]");
                }
            }
        };
        let (a, b, sq) = (make(wide, 0), make(narrow, 1), make(rows, 2));
        for threads in [3, 1] {
            let pool = rayon::ThreadPoolBuilder::new()
                .num_threads(threads)
                .build()
                .unwrap();
            pool.install(|| {
                check(
                    Tensor::cat(&[&a, &b], 1).unwrap(),
                    &|i, j| {
                        if j < wide {
                            val(i, j, 0)
                        } else {
                            val(i, j - wide, 1)
                        }
                    },
                    &format!("cat along rows, {threads} threads"),
                );
                check(
                    Tensor::cat(&[&a, &a, &a], 0).unwrap(),
                    &|i, j| val(i % rows, j, 0),
                    &format!("cat along the batch, {threads} threads"),
                );
                // A square and its transpose along the batch: candle's strided `cat0`, the square copied as one
                // block.
                check(
                    Tensor::cat(&[&sq, &sq.t().unwrap()], 0).unwrap(),
                    &|i, j| {
                        if i < rows {
                            val(i, j, 2)
                        } else {
                            val(j, i - rows, 2)
                        }
                    },
                    &format!("strided cat, {threads} threads"),
                );
                check(
                    a.narrow(1, 5, 900).unwrap().contiguous().unwrap(),
                    &|i, j| val(i, j + 5, 0),
                    &format!("contiguous column slice, {threads} threads"),
                );
            });
        }
    }

    #[test]
    fn exp_matches_std_within_3_ulp() {
        let mut x = -87.0f32;
        while x < 88.0 {
            let got = exp_f32(x);
            let want = x.exp();
            let rel = ((got - want) / want).abs();
            assert!(
                rel < 3.0 * f32::EPSILON,
                "exp({x}) = {got}, std {want}, rel {rel}"
            );
            x += 0.0137;
        }
        assert!(exp_f32(-1000.0) < 1e-37);
        assert_eq!(exp_f32(0.0), 1.0);
    }

    #[test]
    fn reductions_match_naive() {
        let x: Vec<f32> = (0..1037)
            .map(|i| ((i * 37 % 101) as f32 - 50.0) / 17.0)
            .collect();
        let y: Vec<f32> = (0..1037).map(|i| ((i * 13 % 7) as f32) / 7.0).collect();
        assert_eq!(max_f32(&x), x.iter().cloned().fold(f32::MIN, f32::max));
        let naive: f64 = x.iter().zip(&y).map(|(a, b)| *a as f64 * *b as f64).sum();
        assert!((dot(&x, &y) - naive).abs() < 1e-4);
        let se: f64 = x.iter().map(|v| ((*v as f64) / 0.5 - 2.0).exp()).sum();
        assert!((sum_exp_scaled(&x, 0.5, 2.0) - se).abs() / se < 1e-6);
    }

    /// The kernels give the same bits under `simd!` (AVX-512 or AVX2 where present) as compiled for the
    /// baseline x86-64 (SSE2): the wider vectors must not change a result.
    #[test]
    fn simd_widths_give_the_same_bits() {
        type Bits = (u32, u64, u64, u64, Vec<u32>);
        #[inline(always)]
        fn run(x: &[f32], y: &[f32]) -> Bits {
            let m = max_f32(x) / 0.1;
            let exps: Vec<u32> = x.iter().map(|&v| exp_f32(v - 3.0).to_bits()).collect();
            (
                m.to_bits(),
                sum_exp_scaled(x, 0.1, m).to_bits(),
                dot(x, y).to_bits(),
                dot_log_softmax(y, x, 0.1, m).to_bits(),
                exps,
            )
        }
        let x: Vec<f32> = (0..4099)
            .map(|i| ((i * 37 % 1001) as f32 - 500.0) / 97.0)
            .collect();
        let y: Vec<f32> = (0..4099).map(|i| ((i * 13 % 71) as f32) / 71.0).collect();
        assert_eq!(simd!({ run(&x, &y) }), run(&x, &y));
    }

    #[test]
    fn par_helpers_cover_every_item() {
        let mut out = vec![0usize; 100_000];
        par_fill(&mut out, 10, |i| i * 2);
        assert!(out.iter().enumerate().all(|(i, v)| *v == 2 * i));
        let mut rows = vec![0f32; 300 * 1000];
        par_rows_mut(&mut rows, 1000, |r, row| {
            row.iter_mut().for_each(|v| *v = r as f32)
        });
        assert!(rows
            .chunks(1000)
            .enumerate()
            .all(|(r, row)| row.iter().all(|v| *v == r as f32)));
        let mut flat = vec![0u32; 1_000_003];
        let p = SendPtr(flat.as_mut_ptr());
        par_ranges(flat.len(), |r| {
            let s = unsafe { p.slice_mut(r.clone()) };
            for (i, v) in s.iter_mut().enumerate() {
                *v = (r.start + i) as u32;
            }
        });
        assert!(flat.iter().enumerate().all(|(i, v)| *v == i as u32));
    }
}
