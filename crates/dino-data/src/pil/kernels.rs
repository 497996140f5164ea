//! The inner loops of the pixel ops, compiled twice on x86-64 (baseline and AVX2, picked at run time) so that
//! the integer arithmetic vectorises without changing a single result.

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
                #[target_feature(enable = "avx2")]
                unsafe fn avx2($($arg: $ty),*) {
                    inner($($arg),*)
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
            *a += p as i32 * k;
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
                s0 += p[0] as i32 * kt;
                s1 += p[1] as i32 * kt;
                s2 += p[2] as i32 * kt;
            }
            o[0] = clip8(s0);
            o[1] = clip8(s1);
            o[2] = clip8(s2);
        }
    }
}

multiversion! {
    /// `Image.blend(a, img, alpha)` with a constant first image `a` for every channel value (brightness: a = 0,
    /// contrast: a = the rounded mean luma): `a + alpha * (v - a)` in f32, truncated toward zero, clipped to
    /// `0..=255` when alpha is outside `[0, 1]`.
    pub fn blend_const(data: &mut [u8], a: u8, alpha: f32) {
        let af = a as i32;
        if (0.0..=1.0).contains(&alpha) {
            for v in data.iter_mut() {
                *v = (af as f32 + alpha * (*v as i32 - af) as f32) as u8;
            }
        } else {
            for v in data.iter_mut() {
                let t = af as f32 + alpha * (*v as i32 - af) as f32;
                *v = if t <= 0.0 { 0 } else if t >= 255.0 { 255 } else { t as u8 };
            }
        }
    }
}

multiversion! {
    /// `Image.blend(L replicated to RGB, img, alpha)` (saturation): per pixel, `a` is that pixel's luma.
    pub fn blend_luma(data: &mut [u8], alpha: f32) {
        let inside = (0.0..=1.0).contains(&alpha);
        for p in data.chunks_exact_mut(3) {
            let l = luma(p[0], p[1], p[2]) as i32;
            for v in p.iter_mut() {
                let t = l as f32 + alpha * (*v as i32 - l) as f32;
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
    ((19595 * r as u32 + 38470 * g as u32 + 7471 * b as u32 + 0x8000) >> 16) as u8
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
            s += luma(p[0], p[1], p[2]) as u64;
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

multiversion! {
    /// `acc[i] += row[i]` (the box blur's initial window sum).
    pub fn add_row(acc: &mut [u32], row: &[u8]) {
        for (a, &p) in acc.iter_mut().zip(row) {
            *a += p as u32;
        }
    }
}

multiversion! {
    /// One position of Pillow's extended-box blur: slide the window sum (`+ add - sub`), then
    /// `out = (acc * ww + (sub + far) * fw + 2^23) >> 24`, all in u32 as in BoxBlur.c.
    pub fn step(acc: &mut [u32], add: &[u8], sub: &[u8], far: &[u8], out: &mut [u8], ww: u32, fw: u32) {
        for ((((a, &ad), &sb), &fr), o) in acc.iter_mut().zip(add).zip(sub).zip(far).zip(out.iter_mut()) {
            *a = a.wrapping_add(ad as u32).wrapping_sub(sb as u32);
            let bulk = a.wrapping_mul(ww).wrapping_add((sb as u32 + fr as u32).wrapping_mul(fw));
            *o = (bulk.wrapping_add(1 << 23) >> 24) as u8;
        }
    }
}
