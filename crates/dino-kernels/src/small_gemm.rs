//! A register-blocked f32 GEMM for the attention's per-head products, reading both operands in place.
//!
//! The attention of one `(sample, head)` pair multiplies matrices of 17-197 rows by 64 columns (cifar's local
//! crops have 17 tokens). gemm packs both operands into panels on every call; at these sizes the call, its
//! packing and its edge kernels cost more than the products (the per-head backward ran at ~23 GFLOP/s at
//! 17 tokens). This kernel packs nothing: a tile of up to 6 rows x 64 columns lives in 24 AVX-512 registers,
//! the left operand is broadcast element by element through any strides (so `Pᵀ` is read in place), and the right
//! operand's rows are read where they are (a row-major head of Q, K, V or dO). Only `Kᵀ` / `Vᵀ` need a copy,
//! [`transpose_into`], which the caller makes once per pair. Every output element of [`gemm`] is one FMA chain over
//! `k` in order, so results do not depend on the blocking. [`dot_columns`] computes a product's last one or two
//! columns as dot products instead (the 65th key of cifar's global crops would otherwise take a whole 16-lane
//! vector per row and `k`). AVX-512 only: [`available`] says whether to use it.

/// Rows of a tile.
const MR: usize = 6;
/// 16-lane vectors per tile row (64 columns).
const NV: usize = 4;

/// Whether this CPU runs [`gemm`] (AVX-512 F).
pub(crate) fn available() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::arch::is_x86_feature_detected!("avx512f")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// `c (m, n) = a (m, k) · b (k, n)`, overwriting `c`. Element `(i, l)` of `a` is at `a.0 + i * a.1 + l * a.2`,
/// element `(l, j)` of `b` at `b.0 + l * b.1 + j`, element `(i, j)` of `c` at `c.0 + i * c.1 + j` (strides in
/// elements; the right operand and the output have unit column stride).
///
/// # Safety
/// The CPU must have AVX-512 F ([`available`]); every addressed element must be inside its buffer, and `c`
/// must not overlap `a` or `b`.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
pub(crate) unsafe fn gemm(
    m: usize,
    n: usize,
    k: usize,
    c: (*mut f32, usize),
    a: (*const f32, usize, usize),
    b: (*const f32, usize),
) {
    let mut j0 = 0;
    while j0 < n {
        let cols = (n - j0).min(16 * NV);
        let nv = cols.div_ceil(16);
        let mut i0 = 0;
        while i0 < m {
            let rows = (m - i0).min(MR);
            let ct = (c.0.add(i0 * c.1 + j0), c.1);
            let at = (a.0.add(i0 * a.1), a.1, a.2);
            let bt = (b.0.add(j0), b.1);
            let tail = tail_mask(cols - 16 * (nv - 1));
            macro_rules! go {
                ($($r:literal),*) => {
                    match (rows, nv) {
                        $(
                            ($r, 1) => tile::<$r, 1>(k, ct, at, bt, tail),
                            ($r, 2) => tile::<$r, 2>(k, ct, at, bt, tail),
                            ($r, 3) => tile::<$r, 3>(k, ct, at, bt, tail),
                            ($r, _) => tile::<$r, 4>(k, ct, at, bt, tail),
                        )*
                        _ => unreachable!("tile rows are 1..=MR"),
                    }
                };
            }
            go!(1, 2, 3, 4, 5, 6);
            i0 += rows;
        }
        j0 += cols;
    }
}

/// The mask of the first `n` (1..=16) lanes.
fn tail_mask(n: usize) -> u16 {
    if n >= 16 {
        0xffff
    } else {
        ((1u32 << n) - 1) as u16
    }
}

/// Never called: [`available`] is false off x86_64.
///
/// # Safety
/// Not callable.
#[cfg(not(target_arch = "x86_64"))]
pub(crate) unsafe fn gemm(
    _m: usize,
    _n: usize,
    _k: usize,
    _c: (*mut f32, usize),
    _a: (*const f32, usize, usize),
    _b: (*const f32, usize),
) {
    unreachable!("small_gemm::available() is false off x86_64")
}

/// One `R x 16*V` tile of [`gemm`]: the last vector of each row is masked to `tail`'s lanes.
#[cfg(target_arch = "x86_64")]
#[inline]
#[target_feature(enable = "avx512f")]
unsafe fn tile<const R: usize, const V: usize>(
    k: usize,
    c: (*mut f32, usize),
    a: (*const f32, usize, usize),
    b: (*const f32, usize),
    tail: u16,
) {
    use std::arch::x86_64::*;
    let mut acc = [[_mm512_setzero_ps(); V]; R];
    let mut masks = [0xffffu16; V];
    masks[V - 1] = tail;
    for l in 0..k {
        let bl = b.0.add(l * b.1);
        let mut bv = [_mm512_setzero_ps(); V];
        for v in 0..V {
            bv[v] = _mm512_maskz_loadu_ps(masks[v], bl.add(16 * v));
        }
        let al = a.0.add(l * a.2);
        for (r, acc) in acc.iter_mut().enumerate() {
            let x = _mm512_set1_ps(*al.add(r * a.1));
            for (acc, &bv) in acc.iter_mut().zip(&bv) {
                *acc = _mm512_fmadd_ps(x, bv, *acc);
            }
        }
    }
    for (r, acc) in acc.iter().enumerate() {
        let cr = c.0.add(r * c.1);
        for (v, (&acc, &mask)) in acc.iter().zip(&masks).enumerate() {
            _mm512_mask_storeu_ps(cr.add(16 * v), mask, acc);
        }
    }
}

/// Columns `j0..j0 + rows.len()` of `c (m, n) = a (m, k) · bᵀ` as dot products: column `j0 + t` is
/// `a · rows[t]`, where `rows[t]` is a row of `k` contiguous elements; `a` has row stride `a.1` and unit column
/// stride, `c` row stride `c.1`. Each dot product sums 16 lanes, then the lanes.
///
/// # Safety
/// As [`gemm`]: AVX-512 F, and every addressed element inside its buffer.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
pub(crate) unsafe fn dot_columns(
    m: usize,
    k: usize,
    j0: usize,
    c: (*mut f32, usize),
    a: (*const f32, usize),
    rows: &[*const f32],
) {
    use std::arch::x86_64::*;
    for i in 0..m {
        let ai = a.0.add(i * a.1);
        for (t, &b) in rows.iter().enumerate() {
            let mut acc = _mm512_setzero_ps();
            let mut l = 0;
            while l < k {
                let mask = tail_mask(k - l);
                let x = _mm512_maskz_loadu_ps(mask, ai.add(l));
                let y = _mm512_maskz_loadu_ps(mask, b.add(l));
                acc = _mm512_fmadd_ps(x, y, acc);
                l += 16;
            }
            *c.0.add(i * c.1 + j0 + t) = _mm512_reduce_add_ps(acc);
        }
    }
}

/// Never called: [`available`] is false off x86_64.
///
/// # Safety
/// Not callable.
#[cfg(not(target_arch = "x86_64"))]
pub(crate) unsafe fn dot_columns(
    _m: usize,
    _k: usize,
    _j0: usize,
    _c: (*mut f32, usize),
    _a: (*const f32, usize),
    _rows: &[*const f32],
) {
    unreachable!("small_gemm::available() is false off x86_64")
}

/// Writes the transpose of the `(rows, cols)` matrix at `src` (row stride `rs`, unit column stride) into
/// `dst` as `(cols, rows)` row-major: 16 x 16 blocks through registers, the edges element by element.
///
/// # Safety
/// The CPU must have AVX-512 F ([`available`]); `src` must address `rows` rows of `cols` elements with row
/// stride `rs`; `dst` must hold `rows * cols`.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
pub(crate) unsafe fn transpose_into(
    src: *const f32,
    rows: usize,
    cols: usize,
    rs: usize,
    dst: &mut [f32],
) {
    use std::arch::x86_64::*;
    assert!(
        dst.len() >= rows * cols,
        "transpose_into: destination too small"
    );
    let d = dst.as_mut_ptr();
    let (rb, cb) = (rows / 16 * 16, cols / 16 * 16);
    for r0 in (0..rb).step_by(16) {
        for c0 in (0..cb).step_by(16) {
            let mut v = [_mm512_setzero_si512(); 16];
            for (i, v) in v.iter_mut().enumerate() {
                *v = _mm512_loadu_si512(src.add((r0 + i) * rs + c0) as *const _);
            }
            let t = crate::bf16::x86::transpose16(v);
            for (j, t) in t.iter().enumerate() {
                _mm512_storeu_si512(d.add((c0 + j) * rows + r0) as *mut _, *t);
            }
        }
    }
    let one = |r: usize, c: usize| *d.add(c * rows + r) = *src.add(r * rs + c);
    for r in 0..rows {
        let c_start = if r < rb { cb } else { 0 };
        for c in c_start..cols {
            one(r, c);
        }
    }
}

/// Never called: [`available`] is false off x86_64.
///
/// # Safety
/// Not callable.
#[cfg(not(target_arch = "x86_64"))]
pub(crate) unsafe fn transpose_into(
    _src: *const f32,
    _rows: usize,
    _cols: usize,
    _rs: usize,
    _dst: &mut [f32],
) {
    unreachable!("small_gemm::available() is false off x86_64")
}

#[cfg(all(test, target_arch = "x86_64"))]
mod tests {
    use super::*;

    fn pattern(n: usize, seed: usize) -> Vec<f32> {
        (0..n)
            .map(|i| (((i * 7919 + seed * 104_729) % 2003) as f32 / 1001.5) - 1.0)
            .collect()
    }

    /// Every edge of the blocking (row remainders 1-5, column tails, more than one column chunk), strided and
    /// transposed left operands and padded output rows, against a direct f64 triple loop.
    #[test]
    fn matches_direct_products_on_every_tile_shape() {
        if !available() {
            return;
        }
        for &(m, n, k) in &[
            (1, 1, 1),
            (17, 17, 64),
            (65, 64, 65),
            (13, 130, 7),
            (6, 16, 3),
            (7, 200, 33),
        ] {
            for transposed in [false, true] {
                let (a_rs, a_cs) = if transposed { (1, m + 3) } else { (k + 2, 1) };
                let a = pattern((m + 3) * (k + 2), 1);
                let b_rs = n + 5;
                let b = pattern(k * b_rs, 2);
                let c_rs = n + 1;
                let mut c = vec![f32::NAN; m * c_rs];
                // SAFETY: AVX-512 is available; every index below is inside the buffers.
                unsafe {
                    gemm(
                        m,
                        n,
                        k,
                        (c.as_mut_ptr(), c_rs),
                        (a.as_ptr(), a_rs, a_cs),
                        (b.as_ptr(), b_rs),
                    )
                };
                for i in 0..m {
                    for j in 0..n {
                        let want: f64 = (0..k)
                            .map(|l| a[i * a_rs + l * a_cs] as f64 * b[l * b_rs + j] as f64)
                            .sum();
                        let got = c[i * c_rs + j];
                        assert!(
                            (got as f64 - want).abs() < 1e-5 * (1.0 + want.abs()),
                            "({m}, {n}, {k}) transposed {transposed}: c[{i}][{j}] = {got}, want {want}"
                        );
                    }
                    // The padding column is never written.
                    assert!(
                        c[i * c_rs + n].is_nan(),
                        "({m}, {n}, {k}): wrote past column {n}"
                    );
                }
            }
        }
    }

    /// Dot-product columns with `k` below, at and past one vector, into a strided output.
    #[test]
    fn dot_columns_match_direct_products() {
        if !available() {
            return;
        }
        for &(m, k) in &[(1, 1), (7, 16), (65, 64), (5, 37)] {
            let a_rs = k + 3;
            let a = pattern(m * a_rs, 4);
            let b = pattern(2 * (k + 1), 5);
            let rows = [b.as_ptr(), b[k + 1..].as_ptr()];
            let c_rs = 6;
            let mut c = vec![f32::NAN; m * c_rs];
            // SAFETY: AVX-512 is available; `m` rows of `k` with stride `a_rs`, two rows of `k`, and columns 3-4
            // of `m` rows of 6 lie inside their buffers.
            unsafe { dot_columns(m, k, 3, (c.as_mut_ptr(), c_rs), (a.as_ptr(), a_rs), &rows) };
            for i in 0..m {
                for t in 0..2 {
                    let want: f64 = (0..k)
                        .map(|l| a[i * a_rs + l] as f64 * b[t * (k + 1) + l] as f64)
                        .sum();
                    let got = c[i * c_rs + 3 + t];
                    assert!(
                        (got as f64 - want).abs() < 1e-5 * (1.0 + want.abs()),
                        "({m}, {k}) c[{i}][{t}]"
                    );
                }
                for j in [0, 1, 2, 5] {
                    assert!(c[i * c_rs + j].is_nan(), "({m}, {k}): wrote column {j}");
                }
            }
        }
    }

    /// Full 16 x 16 blocks, edge rows and edge columns, from strided rows.
    #[test]
    fn transpose_reads_strided_rows() {
        if !available() {
            return;
        }
        for &(rows, cols) in &[(5, 7), (17, 64), (33, 40), (16, 16), (65, 17)] {
            let rs = cols + 9;
            let src = pattern(rows * rs, 3);
            let mut dst = vec![f32::NAN; rows * cols];
            // SAFETY: AVX-512 is available; `rows` rows of `cols` with stride `rs` lie inside `src`.
            unsafe { transpose_into(src.as_ptr(), rows, cols, rs, &mut dst) };
            for r in 0..rows {
                for c in 0..cols {
                    assert_eq!(
                        dst[c * rows + r],
                        src[r * rs + c],
                        "({rows}, {cols}) at ({r}, {c})"
                    );
                }
            }
        }
    }
}
