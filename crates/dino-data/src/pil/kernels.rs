//! The inner loops of the pixel ops, compiled three times on x86-64 (baseline, AVX2 and AVX-512, picked at run
//! time) so that they vectorise without changing a single result (Rust never contracts `a * b + c` into an
//! FMA, so enabling the `fma` feature changes no float result).

use super::resize::{Coeffs, PRECISION_BITS};

/// Defines `fn $name` that runs an AVX2-compiled copy of `$body` when the CPU has AVX2 and the baseline copy
/// otherwise. The body is plain safe Rust; only the code generation differs, never the arithmetic.
macro_rules! multiversion {
    ($(#[$m:meta])* $vis:vis fn $name:ident($($arg:ident : $ty:ty),* $(,)?) $body:block) => {
        $(#[$m])*
        $vis fn $name($($arg: $ty),*) {
            #[inline(always)]
            fn inner($($arg: $ty),*) $body
            #[cfg(target_arch = "x86_64")]
            {
                #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512dq,avx2,fma")]
                unsafe fn avx512($($arg: $ty),*) {
                    inner($($arg),*)
                }
                #[target_feature(enable = "avx2")]
                unsafe fn avx2($($arg: $ty),*) {
                    inner($($arg),*)
                }
                if std::arch::is_x86_feature_detected!("avx512f")
                    && std::arch::is_x86_feature_detected!("avx512bw")
                    && std::arch::is_x86_feature_detected!("avx512vl")
                    && std::arch::is_x86_feature_detected!("avx512dq")
                    && std::arch::is_x86_feature_detected!("fma")
                {
                    // SAFETY: the CPU supports these features (checked just above).
                    return unsafe { avx512($($arg),*) };
                }
                if std::arch::is_x86_feature_detected!("avx2") {
                    // SAFETY: the CPU supports AVX2 (checked just above).
                    return unsafe { avx2($($arg),*) };
                }
            }
            inner($($arg),*)
        }
    };
}

/// Pillow's `clip8` for a 22-bit fixed-point accumulator: `>> 22` clamped to `0..=255`.
#[inline(always)]
pub fn clip8(v: i32) -> u8 {
    if v >= (1 << PRECISION_BITS << 8) {
        255
    } else if v <= 0 {
        0
    } else {
        (v >> PRECISION_BITS) as u8
    }
}

multiversion! {
    /// `acc[i] += row[i] * k` over a whole row (the vertical resampling pass).
    pub fn mac_row(acc: &mut [i32], row: &[u8], k: i32) {
        for (a, &p) in acc.iter_mut().zip(row) {
            // Never overflows (|sum| < 2^31); wrapping keeps overflow checks out of the vector loop.
            *a = a.wrapping_add((p as i32).wrapping_mul(k));
        }
    }
}

multiversion! {
    /// `out[i] = clip8(acc[i])`.
    pub fn clip_row(acc: &[i32], out: &mut [u8]) {
        for (o, &a) in out.iter_mut().zip(acc) {
            *o = clip8(a);
        }
    }
}

multiversion! {
    /// One row of the horizontal resampling pass: RGB `row` (the input row from the crop's left edge) to the
    /// RGB `out` row of `c.bounds.len()` pixels.
    pub fn resample_row_h(row: &[u8], c: &Coeffs, out: &mut [u8]) {
        let ksize = c.ksize;
        for (xx, (&(xmin, n), o)) in c.bounds.iter().zip(out.chunks_exact_mut(3)).enumerate() {
            let k = &c.k[xx * ksize..xx * ksize + n];
            let px = &row[xmin * 3..(xmin + n) * 3];
            let init = 1i32 << (PRECISION_BITS - 1);
            let (mut s0, mut s1, mut s2) = (init, init, init);
            for (p, &kt) in px.chunks_exact(3).zip(k) {
                s0 = s0.wrapping_add((p[0] as i32).wrapping_mul(kt));
                s1 = s1.wrapping_add((p[1] as i32).wrapping_mul(kt));
                s2 = s2.wrapping_add((p[2] as i32).wrapping_mul(kt));
            }
            o[0] = clip8(s0);
            o[1] = clip8(s1);
            o[2] = clip8(s2);
        }
    }
}

/// `Image.blend(a, img, alpha)` of one value against the constant `a`: `a + alpha * (v - a)` in f32, truncated
/// toward zero, clipped to `0..=255` when alpha is outside `[0, 1]` (Blend.c).
#[inline(always)]
pub fn blend_value(a: u8, v: u8, alpha: f32) -> u8 {
    let af = a as i32;
    let t = af as f32 + alpha * (v as i32).wrapping_sub(af) as f32;
    if (0.0..=1.0).contains(&alpha) {
        t as u8
    } else if t <= 0.0 {
        0
    } else if t >= 255.0 {
        255
    } else {
        t as u8
    }
}

/// `Image.blend(a, img, alpha)` with a constant first image `a` for every channel value (brightness: a = 0,
/// contrast: a = the rounded mean luma), through a 256-entry table of [`blend_value`].
pub fn blend_const(data: &mut [u8], a: u8, alpha: f32) {
    let mut lut = [0u8; 256];
    for (v, o) in lut.iter_mut().enumerate() {
        *o = blend_value(a, v as u8, alpha);
    }
    for v in data.iter_mut() {
        *v = lut[*v as usize];
    }
}

multiversion! {
    /// `Image.blend(L replicated to RGB, img, alpha)` (saturation): per pixel, `a` is that pixel's luma.
    pub fn blend_luma(data: &mut [u8], alpha: f32) {
        let inside = (0.0..=1.0).contains(&alpha);
        for p in data.chunks_exact_mut(3) {
            let l = luma(p[0], p[1], p[2]) as i32;
            for v in p.iter_mut() {
                let t = l as f32 + alpha * (*v as i32).wrapping_sub(l) as f32;
                *v = if inside {
                    t as u8
                } else if t <= 0.0 {
                    0
                } else if t >= 255.0 {
                    255
                } else {
                    t as u8
                };
            }
        }
    }
}

/// Pillow's `L` conversion: `(19595 R + 38470 G + 7471 B + 0x8000) >> 16`.
#[inline(always)]
pub fn luma(r: u8, g: u8, b: u8) -> u8 {
    // At most 255 * 65536 + 0x8000: never overflows; wrapping keeps overflow checks out of vector loops.
    (19595u32
        .wrapping_mul(r as u32)
        .wrapping_add(38470u32.wrapping_mul(g as u32))
        .wrapping_add(7471u32.wrapping_mul(b as u32))
        .wrapping_add(0x8000)
        >> 16) as u8
}

multiversion! {
    /// Grayscale with 3 output channels, in place.
    pub fn grayscale3(data: &mut [u8]) {
        for p in data.chunks_exact_mut(3) {
            let l = luma(p[0], p[1], p[2]);
            p[0] = l;
            p[1] = l;
            p[2] = l;
        }
    }
}

multiversion! {
    /// Sum of the luma of every pixel (for the contrast mean).
    pub fn luma_sum(data: &[u8], out: &mut u64) {
        let mut s = 0u64;
        for p in data.chunks_exact(3) {
            s = s.wrapping_add(luma(p[0], p[1], p[2]) as u64);
        }
        *out = s;
    }
}

multiversion! {
    /// ToTensor + Normalize through a per-channel lookup table: RGB HWC u8 in, CHW f32 out (`out` holds
    /// `3 * n` values for `n` pixels).
    pub fn to_chw_lut(data: &[u8], lut: &[[f32; 256]; 3], out: &mut [f32]) {
        let n = data.len() / 3;
        let (r, rest) = out.split_at_mut(n);
        let (g, b) = rest.split_at_mut(n);
        for (i, p) in data.chunks_exact(3).enumerate() {
            r[i] = lut[0][p[0] as usize];
            g[i] = lut[1][p[1] as usize];
            b[i] = lut[2][p[2] as usize];
        }
    }
}

/// One position of Pillow's extended-box blur on `m` lanes: slide the window sum (`+ add - sub`), then
/// `out = (acc * ww + (sub + far) * fw + 2^23) >> 24`, all in u32 as in BoxBlur.c.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
fn box_step(acc: &mut [u32], add: &[u8], sub: &[u8], far: &[u8], out: &mut [u8], ww: u32, fw: u32) {
    let m = acc.len();
    let (add, sub, far, out) = (&add[..m], &sub[..m], &far[..m], &mut out[..m]);
    for j in 0..m {
        let a = acc[j]
            .wrapping_add(add[j] as u32)
            .wrapping_sub(sub[j] as u32);
        acc[j] = a;
        let bulk = a
            .wrapping_mul(ww)
            .wrapping_add((sub[j] as u32 + far[j] as u32).wrapping_mul(fw));
        out[j] = (bulk.wrapping_add(1 << 23) >> 24) as u8;
    }
}

multiversion! {
    /// One extended-box pass along the vertical axis: the image (`height` rows of `rowlen` values) is one line
    /// of `height` positions whose elements are whole rows, so each column gets exactly Pillow's arithmetic
    /// (Pillow transposes and runs its horizontal pass). `acc` is scratch of `rowlen` values.
    #[allow(clippy::too_many_arguments)]
    pub fn box_pass_vertical(
        data: &[u8],
        out: &mut [u8],
        rowlen: usize,
        height: usize,
        radius: usize,
        ww: u32,
        fw: u32,
        acc: &mut [u32],
    ) {
        let last = height as isize - 1;
        let at = |p: isize| -> usize { p.clamp(0, last) as usize * rowlen };
        let r = radius as isize;
        let acc = &mut acc[..rowlen];
        acc.fill(0);
        // Window sum over positions [-r-1, r-1], edges replicated.
        for p in (-r - 1)..r {
            let o = at(p);
            for (a, &v) in acc.iter_mut().zip(&data[o..o + rowlen]) {
                *a = a.wrapping_add(v as u32);
            }
        }
        for y in 0..height as isize {
            let (sub, add, far) = (at(y - r - 1), at(y + r), at(y + r + 1));
            let o = y as usize * rowlen;
            box_step(
                acc,
                &data[add..add + rowlen],
                &data[sub..sub + rowlen],
                &data[far..far + rowlen],
                &mut out[o..o + rowlen],
                ww,
                fw,
            );
        }
    }
}

multiversion! {
    /// One extended-box pass along every row of an RGB image (`height` rows of `width` pixels), edges
    /// replicated, exactly Pillow's `ImagingLineBoxBlur32` per channel.
    #[allow(clippy::too_many_arguments)]
    pub fn box_pass_rows(data: &[u8], out: &mut [u8], width: usize, height: usize, radius: usize, ww: u32, fw: u32) {
        let last = width as isize - 1;
        let r = radius as isize;
        let at = |p: isize| -> usize { p.clamp(0, last) as usize * 3 };
        for (row, orow) in data.chunks_exact(width * 3).zip(out.chunks_exact_mut(width * 3)).take(height) {
            let mut acc = [0u32; 3];
            for p in (-r - 1)..r {
                let o = at(p);
                for c in 0..3 {
                    acc[c] += row[o + c] as u32;
                }
            }
            for x in 0..width as isize {
                let (sub, add, far) = (at(x - r - 1), at(x + r), at(x + r + 1));
                let o = x as usize * 3;
                for c in 0..3 {
                    let a = acc[c].wrapping_add(row[add + c] as u32).wrapping_sub(row[sub + c] as u32);
                    acc[c] = a;
                    let bulk = a
                        .wrapping_mul(ww)
                        .wrapping_add((row[sub + c] as u32 + row[far + c] as u32).wrapping_mul(fw));
                    orow[o + c] = (bulk.wrapping_add(1 << 23) >> 24) as u8;
                }
            }
        }
    }
}

multiversion! {
    /// RGB -> Pillow HSV, `H += shift` (mod 256), -> RGB, in place.
    pub fn hue_rotate(data: &mut [u8], shift: u8) {
        for p in data.chunks_exact_mut(3) {
            let (h, s, v) = super::color::rgb_to_hsv(p[0], p[1], p[2]);
            let (r, g, b) = super::color::hsv_to_rgb(h.wrapping_add(shift), s, v);
            p[0] = r;
            p[1] = g;
            p[2] = b;
        }
    }
}

/// Transposes the `w x h` RGB region of `src` starting at byte `off` (rows `stride` bytes apart) into `dst`,
/// `w` packed rows of `h` pixels: `dst[x][y] = src[y][x]`.
pub fn transpose_rgb(src: &[u8], off: usize, stride: usize, w: usize, h: usize, dst: &mut [u8]) {
    let h3 = h * 3;
    for y in 0..h {
        let start = off + y * stride;
        let row = &src[start..start + w * 3];
        for (x, px) in row.chunks_exact(3).enumerate() {
            let d = x.wrapping_mul(h3).wrapping_add(y * 3);
            let o = &mut dst[d..d + 3];
            o[0] = px[0];
            o[1] = px[1];
            o[2] = px[2];
        }
    }
}
