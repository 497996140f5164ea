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
//! vector per row and `k`). Two instruction sets, picked at run time ([`isa`]): AVX-512 F (a tile of up to 6 rows x 64
//! columns in 24 zmm registers) and AVX2 + FMA for CPUs without AVX-512 (AMD Zen 1-3, older Intel: a tile of up to 6
//! rows x 16 columns in 12 ymm registers). Both run the same FMA chain per output element, so [`gemm`] gives the
//! same bits on either. [`available`] says whether this CPU runs one of them.

/// Rows of a tile.
const MR: usize = 6;
/// 16-lane vectors per tile row (64 columns).
const NV: usize = 4;

/// The instruction set a kernel of this module runs on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Isa {
    /// AVX-512 F: 16-lane zmm vectors.
    Avx512,
    /// AVX2 + FMA: 8-lane ymm vectors.
    Avx2,
}

/// The widest instruction set of this module that this CPU runs, if any.
pub(crate) fn isa() -> Option<Isa> {
    #[cfg(target_arch = "x86_64")]
    {
        if std::arch::is_x86_feature_detected!("avx512f") {
            return Some(Isa::Avx512);
        }
        if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma")
        {
            return Some(Isa::Avx2);
        }
    }
    None
}

/// Whether this CPU runs [`gemm`] (AVX-512 F, or AVX2 and FMA).
pub(crate) fn available() -> bool {
    isa().is_some()
}

/// `c (m, n) = a (m, k) · b (k, n)`, overwriting `c`. Element `(i, l)` of `a` is at `a.0 + i * a.1 + l * a.2`,
/// element `(l, j)` of `b` at `b.0 + l * b.1 + j`, element `(i, j)` of `c` at `c.0 + i * c.1 + j` (strides in
/// elements; the right operand and the output have unit column stride).
///
/// # Safety
/// The CPU must run one of this module's instruction sets ([`available`]); every addressed element must be
/// inside its buffer, and `c` must not overlap `a` or `b`.
#[cfg(target_arch = "x86_64")]
pub(crate) unsafe fn gemm(
    m: usize,
    n: usize,
    k: usize,
    c: (*mut f32, usize),
    a: (*const f32, usize, usize),
    b: (*const f32, usize),
) {
    gemm_on(
        isa().expect("small_gemm::gemm called without AVX2 or AVX-512"),
        m,
        n,
        k,
        c,
        a,
        b,
    )
}

/// [`gemm`] on the given instruction set.
///
/// # Safety
/// As [`gemm`], and the CPU must run `isa`.
#[cfg(target_arch = "x86_64")]
unsafe fn gemm_on(
    isa: Isa,
    m: usize,
    n: usize,
    k: usize,
    c: (*mut f32, usize),
    a: (*const f32, usize, usize),
    b: (*const f32, usize),
) {
    match isa {
        Isa::Avx512 => gemm_avx512(m, n, k, c, a, b),
        Isa::Avx2 => avx2::gemm(m, n, k, c, a, b),
    }
}

/// [`gemm`] in 6 x 64 tiles of zmm registers.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn gemm_avx512(
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
/// As [`gemm`]: AVX2 or AVX-512 ([`available`]), and every addressed element inside its buffer.
#[cfg(target_arch = "x86_64")]
pub(crate) unsafe fn dot_columns(
    m: usize,
    k: usize,
    j0: usize,
    c: (*mut f32, usize),
    a: (*const f32, usize),
    rows: &[*const f32],
) {
    dot_columns_on(
        isa().expect("small_gemm::dot_columns called without AVX2 or AVX-512"),
        m,
        k,
        j0,
        c,
        a,
        rows,
    )
}

/// [`dot_columns`] on the given instruction set.
///
/// # Safety
/// As [`dot_columns`], and the CPU must run `isa`.
#[cfg(target_arch = "x86_64")]
unsafe fn dot_columns_on(
    isa: Isa,
    m: usize,
    k: usize,
    j0: usize,
    c: (*mut f32, usize),
    a: (*const f32, usize),
    rows: &[*const f32],
) {
    match isa {
        Isa::Avx512 => dot_columns_avx512(m, k, j0, c, a, rows),
        Isa::Avx2 => avx2::dot_columns(m, k, j0, c, a, rows),
    }
}

/// [`dot_columns`] with zmm registers.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn dot_columns_avx512(
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
/// The CPU must run one of this module's instruction sets ([`available`]); `src` must address `rows` rows of
/// `cols` elements with row stride `rs`; `dst` must hold `rows * cols`.
#[cfg(target_arch = "x86_64")]
pub(crate) unsafe fn transpose_into(
    src: *const f32,
    rows: usize,
    cols: usize,
    rs: usize,
    dst: &mut [f32],
) {
    let isa = isa().expect("small_gemm::transpose_into called without AVX2 or AVX-512");
    transpose_into_on(isa, src, rows, cols, rs, dst)
}

/// [`transpose_into`] on the given instruction set.
///
/// # Safety
/// As [`transpose_into`], and the CPU must run `isa`.
#[cfg(target_arch = "x86_64")]
unsafe fn transpose_into_on(
    isa: Isa,
    src: *const f32,
    rows: usize,
    cols: usize,
    rs: usize,
    dst: &mut [f32],
) {
    assert!(
        dst.len() >= rows * cols,
        "transpose_into: destination too small"
    );
    match isa {
        Isa::Avx512 => transpose_avx512(src, rows, cols, rs, dst),
        Isa::Avx2 => avx2::transpose(src, rows, cols, rs, dst),
    }
}

/// [`transpose_into`] in 16 x 16 blocks of zmm registers.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn transpose_avx512(src: *const f32, rows: usize, cols: usize, rs: usize, dst: &mut [f32]) {
    use std::arch::x86_64::*;
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

/// The AVX2 + FMA kernels: tiles of up to [`MR`] rows x 16 columns (two ymm vectors per row), for CPUs without
/// AVX-512. Each output element of [`gemm`] is the same FMA chain over `k` as on AVX-512, and [`dot_columns`]
/// keeps the 16 partial sums of the AVX-512 lanes in two ymm registers.
#[cfg(target_arch = "x86_64")]
mod avx2 {
    use super::MR;
    use std::arch::x86_64::*;

    /// The lane mask of the first `n` (1..=8) of 8 lanes, for `_mm256_maskload_ps` / `_mm256_maskstore_ps`.
    #[inline]
    #[target_feature(enable = "avx2")]
    unsafe fn mask8(n: usize) -> __m256i {
        let n = n.min(8) as i32;
        _mm256_cmpgt_epi32(
            _mm256_set1_epi32(n),
            _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7),
        )
    }

    /// Loads 8 lanes at `p`, the first `n` of them (the others 0) when `MASKED`.
    #[inline]
    #[target_feature(enable = "avx2")]
    unsafe fn load<const MASKED: bool>(p: *const f32, mask: __m256i) -> __m256 {
        if MASKED {
            _mm256_maskload_ps(p, mask)
        } else {
            _mm256_loadu_ps(p)
        }
    }

    /// `c (m, n) = a (m, k) · b (k, n)` as [`super::gemm`], in panels of 16 columns.
    ///
    /// # Safety
    /// AVX2 and FMA; as [`super::gemm`].
    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn gemm(
        m: usize,
        n: usize,
        k: usize,
        c: (*mut f32, usize),
        a: (*const f32, usize, usize),
        b: (*const f32, usize),
    ) {
        let mut j0 = 0;
        while j0 < n {
            let cols = (n - j0).min(16);
            let nv = cols.div_ceil(8);
            let last = cols - 8 * (nv - 1);
            let mask = mask8(last);
            let mut i0 = 0;
            while i0 < m {
                let rows = (m - i0).min(MR);
                let ct = (c.0.add(i0 * c.1 + j0), c.1);
                let at = (a.0.add(i0 * a.1), a.1, a.2);
                let bt = (b.0.add(j0), b.1);
                macro_rules! go {
                    ($($r:literal),*) => {
                        match (rows, nv, last == 8) {
                            $(
                                ($r, 1, true) => tile::<$r, 1, false>(k, ct, at, bt, mask),
                                ($r, 1, false) => tile::<$r, 1, true>(k, ct, at, bt, mask),
                                ($r, _, true) => tile::<$r, 2, false>(k, ct, at, bt, mask),
                                ($r, _, false) => tile::<$r, 2, true>(k, ct, at, bt, mask),
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

    /// One `R x 8*V` tile of [`gemm`]: the last vector of each row is masked to `mask`'s lanes when `MASKED`.
    #[inline]
    #[target_feature(enable = "avx2,fma")]
    unsafe fn tile<const R: usize, const V: usize, const MASKED: bool>(
        k: usize,
        c: (*mut f32, usize),
        a: (*const f32, usize, usize),
        b: (*const f32, usize),
        mask: __m256i,
    ) {
        let mut acc = [[_mm256_setzero_ps(); V]; R];
        for l in 0..k {
            let bl = b.0.add(l * b.1);
            let mut bv = [_mm256_setzero_ps(); V];
            for (v, bv) in bv.iter_mut().enumerate() {
                *bv = if v == V - 1 {
                    load::<MASKED>(bl.add(8 * v), mask)
                } else {
                    _mm256_loadu_ps(bl.add(8 * v))
                };
            }
            let al = a.0.add(l * a.2);
            for (r, acc) in acc.iter_mut().enumerate() {
                let x = _mm256_set1_ps(*al.add(r * a.1));
                for (acc, &bv) in acc.iter_mut().zip(&bv) {
                    *acc = _mm256_fmadd_ps(x, bv, *acc);
                }
            }
        }
        for (r, acc) in acc.iter().enumerate() {
            let cr = c.0.add(r * c.1);
            for (v, &acc) in acc.iter().enumerate() {
                if MASKED && v == V - 1 {
                    _mm256_maskstore_ps(cr.add(8 * v), mask, acc);
                } else {
                    _mm256_storeu_ps(cr.add(8 * v), acc);
                }
            }
        }
    }

    /// [`super::dot_columns`]: lanes 0-7 and 8-15 of the AVX-512 kernel's 16 partial sums in two ymm registers,
    /// summed together, then in halves.
    ///
    /// # Safety
    /// AVX2 and FMA; as [`super::dot_columns`].
    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn dot_columns(
        m: usize,
        k: usize,
        j0: usize,
        c: (*mut f32, usize),
        a: (*const f32, usize),
        rows: &[*const f32],
    ) {
        for i in 0..m {
            let ai = a.0.add(i * a.1);
            for (t, &b) in rows.iter().enumerate() {
                let mut lo = _mm256_setzero_ps();
                let mut hi = _mm256_setzero_ps();
                let mut l = 0;
                while l < k {
                    let left = k - l;
                    if left >= 16 {
                        lo = _mm256_fmadd_ps(
                            _mm256_loadu_ps(ai.add(l)),
                            _mm256_loadu_ps(b.add(l)),
                            lo,
                        );
                        hi = _mm256_fmadd_ps(
                            _mm256_loadu_ps(ai.add(l + 8)),
                            _mm256_loadu_ps(b.add(l + 8)),
                            hi,
                        );
                    } else {
                        let m0 = mask8(left);
                        lo = _mm256_fmadd_ps(
                            _mm256_maskload_ps(ai.add(l), m0),
                            _mm256_maskload_ps(b.add(l), m0),
                            lo,
                        );
                        if left > 8 {
                            let m1 = mask8(left - 8);
                            hi = _mm256_fmadd_ps(
                                _mm256_maskload_ps(ai.add(l + 8), m1),
                                _mm256_maskload_ps(b.add(l + 8), m1),
                                hi,
                            );
                        }
                    }
                    l += 16;
                }
                let s = _mm256_add_ps(lo, hi);
                let s = _mm_add_ps(_mm256_castps256_ps128(s), _mm256_extractf128_ps::<1>(s));
                let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
                let s = _mm_add_ss(s, _mm_shuffle_ps::<1>(s, s));
                *c.0.add(i * c.1 + j0 + t) = _mm_cvtss_f32(s);
            }
        }
    }

    /// The transpose of an 8 x 8 block of f32 rows (`out[j]` lane `i` = `r[i]` lane `j`).
    #[inline]
    #[target_feature(enable = "avx2")]
    unsafe fn transpose8(r: [__m256; 8]) -> [__m256; 8] {
        let t0 = _mm256_unpacklo_ps(r[0], r[1]);
        let t1 = _mm256_unpackhi_ps(r[0], r[1]);
        let t2 = _mm256_unpacklo_ps(r[2], r[3]);
        let t3 = _mm256_unpackhi_ps(r[2], r[3]);
        let t4 = _mm256_unpacklo_ps(r[4], r[5]);
        let t5 = _mm256_unpackhi_ps(r[4], r[5]);
        let t6 = _mm256_unpacklo_ps(r[6], r[7]);
        let t7 = _mm256_unpackhi_ps(r[6], r[7]);
        // Within each 128-bit lane, u[q] holds element (4L + q) of rows 0-3 (u[0..4]) or 4-7 (u[4..8]).
        let u0 = _mm256_shuffle_ps::<0x44>(t0, t2);
        let u1 = _mm256_shuffle_ps::<0xee>(t0, t2);
        let u2 = _mm256_shuffle_ps::<0x44>(t1, t3);
        let u3 = _mm256_shuffle_ps::<0xee>(t1, t3);
        let u4 = _mm256_shuffle_ps::<0x44>(t4, t6);
        let u5 = _mm256_shuffle_ps::<0xee>(t4, t6);
        let u6 = _mm256_shuffle_ps::<0x44>(t5, t7);
        let u7 = _mm256_shuffle_ps::<0xee>(t5, t7);
        [
            _mm256_permute2f128_ps::<0x20>(u0, u4),
            _mm256_permute2f128_ps::<0x20>(u1, u5),
            _mm256_permute2f128_ps::<0x20>(u2, u6),
            _mm256_permute2f128_ps::<0x20>(u3, u7),
            _mm256_permute2f128_ps::<0x31>(u0, u4),
            _mm256_permute2f128_ps::<0x31>(u1, u5),
            _mm256_permute2f128_ps::<0x31>(u2, u6),
            _mm256_permute2f128_ps::<0x31>(u3, u7),
        ]
    }

    /// [`super::transpose_into`] in 8 x 8 blocks of ymm registers, the edges element by element.
    ///
    /// # Safety
    /// AVX2; as [`super::transpose_into`] (the caller checked `dst`'s length).
    #[target_feature(enable = "avx2")]
    pub(super) unsafe fn transpose(
        src: *const f32,
        rows: usize,
        cols: usize,
        rs: usize,
        dst: &mut [f32],
    ) {
        let d = dst.as_mut_ptr();
        let (rb, cb) = (rows / 8 * 8, cols / 8 * 8);
        for r0 in (0..rb).step_by(8) {
            for c0 in (0..cb).step_by(8) {
                let mut v = [_mm256_setzero_ps(); 8];
                for (i, v) in v.iter_mut().enumerate() {
                    *v = _mm256_loadu_ps(src.add((r0 + i) * rs + c0));
                }
                for (j, t) in transpose8(v).iter().enumerate() {
                    _mm256_storeu_ps(d.add((c0 + j) * rows + r0), *t);
                }
            }
        }
        for r in 0..rows {
            let c_start = if r < rb { cb } else { 0 };
            for c in c_start..cols {
                *d.add(c * rows + r) = *src.add(r * rs + c);
            }
        }
    }
}

#[cfg(all(test, target_arch = "x86_64"))]
mod tests {
    use super::*;

    /// The instruction sets of this module that this CPU runs; says on stderr which ones a test could not check.
    fn isas(test: &str) -> Vec<Isa> {
        let mut isas = Vec::new();
        if std::arch::is_x86_feature_detected!("avx512f") {
            isas.push(Isa::Avx512);
        }
        if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma")
        {
            isas.push(Isa::Avx2);
        }
        for missing in [Isa::Avx512, Isa::Avx2] {
            if !isas.contains(&missing) {
                eprintln!("NOT RUN on this CPU: {test} for {missing:?} (the CPU lacks it)");
            }
        }
        isas
    }

    fn pattern(n: usize, seed: usize) -> Vec<f32> {
        (0..n)
            .map(|i| (((i * 7919 + seed * 104_729) % 2003) as f32 / 1001.5) - 1.0)
            .collect()
    }

    /// Every edge of the blocking (row remainders 1-5, column tails, more than one column chunk, `k` from 0 to
    /// several hundred), strided and transposed left operands and padded output rows, against a direct f64
    /// triple loop within the rounding bound of a `k`-term f32 sum, and bit for bit against each element's own
    /// FMA chain over `k` in order (`f32::mul_add`), which the module promises whatever the blocking.
    #[test]
    fn matches_direct_products_on_every_tile_shape() {
        for isa in isas("matches_direct_products_on_every_tile_shape") {
            matches_direct_products_on_every_tile_shape_on(isa);
        }
    }

    fn matches_direct_products_on_every_tile_shape_on(isa: Isa) {
        for &(m, n, k) in &[
            (1, 1, 1),
            (17, 17, 64),
            (65, 64, 65),
            (13, 130, 7),
            (6, 16, 3),
            (7, 200, 33),
            (13, 37, 300),
            (4, 16, 0),
        ] {
            for transposed in [false, true] {
                let (a_rs, a_cs) = if transposed { (1, m + 3) } else { (k + 2, 1) };
                let a = pattern((m + 3) * (k + 2), 1);
                let b_rs = n + 5;
                let b = pattern(k * b_rs, 2);
                let c_rs = n + 1;
                let mut c = vec![f32::NAN; m * c_rs];
                // SAFETY: the CPU runs `isa`; every index below is inside the buffers.
                unsafe {
                    gemm_on(
                        isa,
                        m,
                        n,
                        k,
                        (c.as_mut_ptr(), c_rs),
                        (a.as_ptr(), a_rs, a_cs),
                        (b.as_ptr(), b_rs),
                    )
                };
                let what = format!("{isa:?} ({m}, {n}, {k}) transposed {transposed}");
                for i in 0..m {
                    for j in 0..n {
                        let terms = (0..k).map(|l| (a[i * a_rs + l * a_cs], b[l * b_rs + j]));
                        let want: f64 = terms.clone().map(|(x, y)| x as f64 * y as f64).sum();
                        // The rounding bound of a k-term f32 sum: (k + 1) ulps of 1 times the sum of magnitudes.
                        let magnitude: f64 = terms
                            .clone()
                            .map(|(x, y)| (x as f64 * y as f64).abs())
                            .sum();
                        let bound = (k + 1) as f64 * f32::EPSILON as f64 * magnitude;
                        let chain = terms.fold(0f32, |acc, (x, y)| x.mul_add(y, acc));
                        let got = c[i * c_rs + j];
                        assert!(
                            (got as f64 - want).abs() <= bound,
                            "{what}: c[{i}][{j}] = {got}, want {want} (bound {bound})"
                        );
                        assert_eq!(
                            got.to_bits(),
                            chain.to_bits(),
                            "{what}: c[{i}][{j}] = {got} is not its FMA chain's {chain}"
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
        for isa in isas("dot_columns_match_direct_products") {
            dot_columns_match_direct_products_on(isa);
        }
    }

    fn dot_columns_match_direct_products_on(isa: Isa) {
        for &(m, k) in &[(1, 1), (7, 16), (65, 64), (5, 37)] {
            let a_rs = k + 3;
            let a = pattern(m * a_rs, 4);
            let b = pattern(2 * (k + 1), 5);
            let rows = [b.as_ptr(), b[k + 1..].as_ptr()];
            let c_rs = 6;
            let mut c = vec![f32::NAN; m * c_rs];
            // SAFETY: the CPU runs `isa`; `m` rows of `k` with stride `a_rs`, two rows of `k`, and columns 3-4
            // of `m` rows of 6 lie inside their buffers.
            unsafe {
                dot_columns_on(
                    isa,
                    m,
                    k,
                    3,
                    (c.as_mut_ptr(), c_rs),
                    (a.as_ptr(), a_rs),
                    &rows,
                )
            };
            for i in 0..m {
                for t in 0..2 {
                    let want: f64 = (0..k)
                        .map(|l| a[i * a_rs + l] as f64 * b[t * (k + 1) + l] as f64)
                        .sum();
                    let got = c[i * c_rs + 3 + t];
                    assert!(
                        (got as f64 - want).abs() < 1e-5 * (1.0 + want.abs()),
                        "{isa:?} ({m}, {k}) c[{i}][{t}]"
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
        for isa in isas("transpose_reads_strided_rows") {
            transpose_reads_strided_rows_on(isa);
        }
    }

    fn transpose_reads_strided_rows_on(isa: Isa) {
        for &(rows, cols) in &[(5, 7), (17, 64), (33, 40), (16, 16), (65, 17)] {
            let rs = cols + 9;
            let src = pattern(rows * rs, 3);
            let mut dst = vec![f32::NAN; rows * cols];
            // SAFETY: the CPU runs `isa`; `rows` rows of `cols` with stride `rs` lie inside `src`.
            unsafe { transpose_into_on(isa, src.as_ptr(), rows, cols, rs, &mut dst) };
            for r in 0..rows {
                for c in 0..cols {
                    assert_eq!(
                        dst[c * rows + r],
                        src[r * rs + c],
                        "{isa:?} ({rows}, {cols}) at ({r}, {c})"
                    );
                }
            }
        }
    }

    /// The two instruction sets give the same bits for [`gemm`] (the same FMA chain per element); [`dot_columns`]
    /// sums the same 16 partial sums, whose final reduction may be ordered differently.
    #[test]
    fn avx2_and_avx512_give_the_same_bits() {
        // `isas` names the set this CPU lacks.
        if isas("avx2_and_avx512_give_the_same_bits").len() < 2 {
            return;
        }
        let (m, n, k) = (65, 65, 64);
        let a = pattern(m * k, 7);
        let b = pattern(k * n, 8);
        let run = |isa| {
            let mut c = vec![0f32; m * n];
            let mut d = vec![0f32; m * 2];
            // SAFETY: the CPU runs both sets; `a` is (m, k), `b` (k, n), `c` (m, n) and `d` (m, 2), all row-major.
            unsafe {
                gemm_on(
                    isa,
                    m,
                    n,
                    k,
                    (c.as_mut_ptr(), n),
                    (a.as_ptr(), k, 1),
                    (b.as_ptr(), n),
                );
                let rows = [b.as_ptr(), b[k..].as_ptr()];
                dot_columns_on(
                    isa,
                    m,
                    k - 3,
                    0,
                    (d.as_mut_ptr(), 2),
                    (a.as_ptr(), k),
                    &rows,
                );
            }
            (c, d)
        };
        let ((c512, d512), (c2, d2)) = (run(Isa::Avx512), run(Isa::Avx2));
        for (i, (x, y)) in c512.iter().zip(&c2).enumerate() {
            assert_eq!(
                x.to_bits(),
                y.to_bits(),
                "gemm element {i}: AVX-512 {x}, AVX2 {y}"
            );
        }
        for (i, (x, y)) in d512.iter().zip(&d2).enumerate() {
            assert!(
                (x - y).abs() <= 1e-6 * (1.0 + x.abs()),
                "dot column element {i}: AVX-512 {x}, AVX2 {y}"
            );
        }
    }
}
