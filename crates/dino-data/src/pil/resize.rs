//! Pillow 13's `Image.resize(size, BICUBIC)` (Resample.c), bit for bit: cubic kernel with a = -0.5, support
//! `2 * max(1, in/out)` (antialiased when downscaling), taps outside the image dropped and the rest
//! renormalised, 22-bit fixed-point coefficients, two separable passes on u8 with the intermediate rounded and
//! clamped to u8, and Pillow 13's pass order (vertical first iff `in_w != out_w`, `in_h > out_h` and
//! `in_h - out_h > 2 (in_w - out_w)`).
//!
//! Images are raw RGB u8 buffers, HWC, rows `stride` bytes apart.

use super::kernels;

/// Fixed-point precision of the coefficients (Pillow's `PRECISION_BITS = 32 - 8 - 2`).
pub const PRECISION_BITS: u32 = 22;

/// Pillow's bicubic kernel, a = -0.5.
#[inline]
fn bicubic_filter(x: f64) -> f64 {
    const A: f64 = -0.5;
    let x = x.abs();
    if x < 1.0 {
        ((A + 2.0) * x - (A + 3.0)) * x * x + 1.0
    } else if x < 2.0 {
        (((x - 5.0) * x + 8.0) * x - 4.0) * A
    } else {
        0.0
    }
}

/// The fixed-point filter of one resampling pass: for output index `o`, the taps are input indices
/// `bounds[o].0 .. bounds[o].0 + bounds[o].1` with weights `k[o * ksize ..][.. bounds[o].1]`.
#[derive(Debug, Clone, PartialEq)]
pub struct Coeffs {
    /// `(first input index, number of taps)` per output index.
    pub bounds: Vec<(usize, usize)>,
    /// Row length of `k` (the maximum number of taps).
    pub ksize: usize,
    /// 22-bit fixed-point weights, `out_size * ksize`, zero past each row's tap count.
    pub k: Vec<i32>,
}

impl Coeffs {
    /// Pillow's `precompute_coeffs` + `normalize_coeffs_8bpc` for resampling the input range `[in0, in1)`
    /// of an axis of `in_size` pixels onto `out_size` pixels.
    pub fn bicubic(in_size: usize, in0: f64, in1: f64, out_size: usize) -> Coeffs {
        let scale = (in1 - in0) / out_size as f64;
        let filterscale = scale.max(1.0);
        let support = 2.0 * filterscale;
        let ksize = support.ceil() as usize * 2 + 1;
        let ss = 1.0 / filterscale;
        let mut bounds = Vec::with_capacity(out_size);
        let mut k = vec![0i32; out_size * ksize];
        let mut w = vec![0f64; ksize];
        for xx in 0..out_size {
            let center = in0 + (xx as f64 + 0.5) * scale;
            // C `(int)` truncates toward zero.
            let xmin = ((center - support + 0.5) as i64).max(0);
            let xmax = ((center + support + 0.5) as i64).min(in_size as i64);
            let n = (xmax - xmin).max(0) as usize;
            let n = n.min(ksize);
            let mut ww = 0.0;
            for (x, wx) in w.iter_mut().enumerate().take(n) {
                let v = bicubic_filter((x as f64 + xmin as f64 - center + 0.5) * ss);
                *wx = v;
                ww += v;
            }
            let row = &mut k[xx * ksize..xx * ksize + ksize];
            let scale_fp = (1u32 << PRECISION_BITS) as f64;
            for x in 0..n {
                let v = if ww != 0.0 { w[x] / ww } else { w[x] };
                row[x] = if v < 0.0 {
                    (-0.5 + v * scale_fp) as i32
                } else {
                    (0.5 + v * scale_fp) as i32
                };
            }
            bounds.push((xmin as usize, n));
        }
        Coeffs { bounds, ksize, k }
    }
}

/// Which passes run, and in which order, when Pillow 13 resizes `(in_w, in_h)` to `(out_w, out_h)`
/// (the box being the whole input).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PassOrder {
    /// Sizes equal: a copy.
    None,
    /// Only the width changes.
    HorizontalOnly,
    /// Only the height changes.
    VerticalOnly,
    /// Horizontal pass, then vertical.
    HorizontalFirst,
    /// Vertical pass, then horizontal (Pillow >= 13, python-pillow/Pillow#9549).
    VerticalFirst,
}

/// Pillow 13's pass-order rule.
pub fn pass_order(in_w: usize, in_h: usize, out_w: usize, out_h: usize) -> PassOrder {
    let need_h = in_w != out_w;
    let need_v = in_h != out_h;
    match (need_h, need_v) {
        (false, false) => PassOrder::None,
        (true, false) => PassOrder::HorizontalOnly,
        (false, true) => PassOrder::VerticalOnly,
        (true, true) => {
            let (iw, ih, ow, oh) = (in_w as i64, in_h as i64, out_w as i64, out_h as i64);
            if ih > oh && (ih - oh) > 2 * (iw - ow) {
                PassOrder::VerticalFirst
            } else {
                PassOrder::HorizontalFirst
            }
        }
    }
}

/// Horizontal pass: `src` holds `h` rows of `w` RGB pixels starting at byte `off`, rows `stride` bytes apart;
/// writes `h` rows of `c.bounds.len()` pixels, tightly packed, into `dst`. Computed as transpose, vertical
/// pass, transpose: the same integer arithmetic per output value as Pillow's horizontal pass, but
/// vectorised along the rows.
fn horizontal_pass(
    src: &[u8],
    off: usize,
    stride: usize,
    w: usize,
    h: usize,
    c: &Coeffs,
    dst: &mut [u8],
) {
    let out_w = c.bounds.len();
    let mut t = vec![0u8; w * h * 3];
    kernels::transpose_rgb(src, off, stride, w, h, &mut t);
    let mut t2 = vec![0u8; out_w * h * 3];
    vertical_pass(&t, 0, h * 3, h, c, &mut t2);
    kernels::transpose_rgb(&t2, 0, h * 3, h, out_w, dst);
}

/// Vertical pass: `src` rows of `w` RGB pixels starting at `off`, `stride` bytes apart; writes
/// `c.bounds.len()` packed rows of `w` pixels into `dst`.
fn vertical_pass(src: &[u8], off: usize, stride: usize, w: usize, c: &Coeffs, dst: &mut [u8]) {
    let rowlen = w * 3;
    let mut acc = vec![0i32; rowlen];
    for (yy, &(ymin, n)) in c.bounds.iter().enumerate() {
        let k = &c.k[yy * c.ksize..yy * c.ksize + n];
        acc.fill(1 << (PRECISION_BITS - 1));
        for (t, &kt) in k.iter().enumerate() {
            let start = off + (ymin + t) * stride;
            kernels::mac_row(&mut acc, &src[start..start + rowlen], kt);
        }
        kernels::clip_row(&acc, &mut dst[yy * rowlen..(yy + 1) * rowlen]);
    }
}

/// Pillow's `Image.crop((left, top, left + w, top + h)).resize((out_w, out_h), BICUBIC)` on an RGB u8 HWC
/// buffer `src` of `src_w` pixels per row (the crop box must lie inside the image). Returns `out_h * out_w * 3`
/// bytes, HWC.
#[allow(clippy::too_many_arguments)]
pub fn resized_crop_raw(
    src: &[u8],
    src_w: usize,
    top: usize,
    left: usize,
    h: usize,
    w: usize,
    out_w: usize,
    out_h: usize,
) -> Vec<u8> {
    let stride = src_w * 3;
    let off = top * stride + left * 3;
    let mut out = vec![0u8; out_w * out_h * 3];
    match pass_order(w, h, out_w, out_h) {
        PassOrder::None => {
            for y in 0..h {
                out[y * w * 3..(y + 1) * w * 3]
                    .copy_from_slice(&src[off + y * stride..off + y * stride + w * 3]);
            }
        }
        PassOrder::HorizontalOnly => {
            let ch = Coeffs::bicubic(w, 0.0, w as f64, out_w);
            horizontal_pass(src, off, stride, w, h, &ch, &mut out);
        }
        PassOrder::VerticalOnly => {
            let cv = Coeffs::bicubic(h, 0.0, h as f64, out_h);
            vertical_pass(src, off, stride, w, &cv, &mut out);
        }
        PassOrder::HorizontalFirst => {
            let ch = Coeffs::bicubic(w, 0.0, w as f64, out_w);
            let cv = Coeffs::bicubic(h, 0.0, h as f64, out_h);
            // Only the rows the vertical pass reads (Pillow does the same; the values do not change).
            let first = cv.bounds.first().map_or(0, |b| b.0);
            let last = cv.bounds.iter().map(|b| b.0 + b.1).max().unwrap_or(0);
            let rows = last.saturating_sub(first);
            let mut tmp = vec![0u8; rows * out_w * 3];
            horizontal_pass(src, off + first * stride, stride, w, rows, &ch, &mut tmp);
            let cv = Coeffs {
                bounds: cv.bounds.iter().map(|&(a, n)| (a - first, n)).collect(),
                ..cv
            };
            vertical_pass(&tmp, 0, out_w * 3, out_w, &cv, &mut out);
        }
        PassOrder::VerticalFirst => {
            let ch = Coeffs::bicubic(w, 0.0, w as f64, out_w);
            let cv = Coeffs::bicubic(h, 0.0, h as f64, out_h);
            let mut tmp = vec![0u8; out_h * w * 3];
            vertical_pass(src, off, stride, w, &cv, &mut tmp);
            horizontal_pass(&tmp, 0, w * 3, w, out_h, &ch, &mut out);
        }
    }
    out
}
