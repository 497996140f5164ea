//! The colour operations of torchvision's PIL path (`ImageEnhance`, `Image.blend`, `convert('L')`,
//! `convert('HSV')`), bit for bit, in place on RGB u8 HWC buffers.

use super::kernels;

/// `TF.adjust_brightness(img, f)` = `ImageEnhance.Brightness(img).enhance(f)` = `Image.blend(black, img, f)`.
pub fn adjust_brightness(data: &mut [u8], factor: f64) {
    kernels::blend_const(data, 0, factor as f32);
}

/// The grey level `ImageEnhance.Contrast` blends with: `int(mean(L) + 0.5)` over the u8 luma.
pub fn contrast_mean(data: &[u8]) -> u8 {
    let n = data.len() / 3;
    if n == 0 {
        return 0;
    }
    let mut sum = 0u64;
    kernels::luma_sum(data, &mut sum);
    let mean = sum as f64 / n as f64;
    (mean + 0.5) as u8
}

/// `TF.adjust_contrast(img, f)` = `ImageEnhance.Contrast(img).enhance(f)`: blend with a constant grey image of
/// the rounded mean luma.
pub fn adjust_contrast(data: &mut [u8], factor: f64) {
    let mean = contrast_mean(data);
    kernels::blend_const(data, mean, factor as f32);
}

/// `TF.adjust_saturation(img, f)` = `ImageEnhance.Color(img).enhance(f)`: blend with the luma replicated to RGB.
pub fn adjust_saturation(data: &mut [u8], factor: f64) {
    kernels::blend_luma(data, factor as f32);
}

/// `TF.rgb_to_grayscale(img, num_output_channels=3)` = `convert('L')` replicated to three channels.
pub fn grayscale3(data: &mut [u8]) {
    kernels::grayscale3(data);
}

/// Pillow's `CLIP8` on an int.
#[inline(always)]
fn clip8i(v: i32) -> u8 {
    v.clamp(0, 255) as u8
}

/// Pillow's `rgb2hsv_row` for one pixel: u8 `(H, S, V)` (float32 arithmetic with the same double steps as C).
#[inline(always)]
pub fn rgb_to_hsv(r: u8, g: u8, b: u8) -> (u8, u8, u8) {
    let maxc = r.max(g).max(b);
    let minc = r.min(g).min(b);
    if minc == maxc {
        return (0, 0, maxc);
    }
    let cr = maxc.wrapping_sub(minc) as f32;
    let s: f32 = cr / maxc as f32;
    let rc: f32 = maxc.wrapping_sub(r) as f32 / cr;
    let gc: f32 = maxc.wrapping_sub(g) as f32 / cr;
    let bc: f32 = maxc.wrapping_sub(b) as f32 / cr;
    let h: f32 = if r == maxc {
        bc - gc
    } else if g == maxc {
        (2.0 + rc as f64 - bc as f64) as f32
    } else {
        (4.0 + gc as f64 - rc as f64) as f32
    };
    // fmod(h / 6.0 + 1.0, 1.0) in double. h is in [-1, 5], so x is in [5/6, 11/6) and fmod is x or the
    // exact difference x - 1 (Sterbenz).
    let x = h as f64 / 6.0 + 1.0;
    let h: f32 = (if x >= 1.0 { x - 1.0 } else { x }) as f32;
    let uh = clip8i((h as f64 * 255.0) as i32);
    let us = clip8i((s as f64 * 255.0) as i32);
    (uh, us, maxc)
}

/// Pillow's `hsv2rgb` for one pixel.
#[inline(always)]
pub fn hsv_to_rgb(h: u8, s: u8, v: u8) -> (u8, u8, u8) {
    if s == 0 {
        return (v, v, v);
    }
    let h6 = h as f32 as f64 * 6.0 / 255.0;
    let i = h6.floor() as i32;
    let f: f32 = (h6 - i as f32 as f64) as f32;
    let fs: f32 = (s as f32 as f64 / 255.0) as f32;
    let vf = v as f32 as f64;
    let p = (vf * (1.0 - fs as f64)).round() as i32;
    let q = (vf * (1.0 - (fs * f) as f64)).round() as i32;
    let t = (vf * (1.0 - fs as f64 * (1.0 - f as f64))).round() as i32;
    let (up, uq, ut) = (clip8i(p), clip8i(q), clip8i(t));
    match i % 6 {
        0 => (v, ut, up),
        1 => (uq, v, up),
        2 => (up, v, ut),
        3 => (up, uq, v),
        4 => (ut, up, v),
        _ => (v, up, uq),
    }
}

/// `img.convert('HSV')`: RGB u8 HWC to Pillow's u8 HSV, in place.
pub fn rgb_to_hsv_image(data: &mut [u8]) {
    for p in data.chunks_exact_mut(3) {
        let (h, s, v) = rgb_to_hsv(p[0], p[1], p[2]);
        p[0] = h;
        p[1] = s;
        p[2] = v;
    }
}

/// The hue shift torchvision's PIL `adjust_hue` adds to Pillow's u8 hue: `np.int32(f * 255)` (truncated toward
/// zero) cast to u8 (wrapping: -0.1 gives +231).
pub fn hue_shift(hue_factor: f64) -> u8 {
    ((hue_factor * 255.0) as i32) as u8
}

/// `TF.adjust_hue(img, f)` on the PIL path: RGB -> Pillow HSV, `H += hue_shift(f)` mod 256, HSV -> RGB.
/// The round trip is lossy by itself, so a shift of 0 still changes pixels (as in torchvision).
pub fn adjust_hue(data: &mut [u8], hue_factor: f64) {
    kernels::hue_rotate(data, hue_shift(hue_factor));
}
