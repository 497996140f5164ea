//! Pillow's `ImageFilter.GaussianBlur(radius=sigma)` (BoxBlur.c), bit for bit. It is not a Gaussian
//! convolution: 3 passes per axis of an "extended box" blur of fractional radius (Gwosdek et al. 2011), in
//! 24-bit fixed point, edges replicated, every pass rounded to u8; 3 horizontal passes, then 3 vertical ones.

use super::kernels;

/// Number of box passes Pillow uses for `GaussianBlur`.
pub const PASSES: usize = 3;

/// Pillow's `_gaussian_blur_radius(sigma, passes)`: the fractional box radius `l + a` (C float arithmetic with
/// the same double steps).
pub fn box_radius(sigma: f32, passes: usize) -> f32 {
    let sigma2: f32 = sigma * sigma / passes as f32;
    let big_l: f32 = (12.0 * sigma2 as f64 + 1.0).sqrt() as f32;
    let l: f32 = ((big_l as f64 - 1.0) / 2.0).floor() as f32;
    let mut a: f32 = (2.0 * l + 1.0) * (l * (l + 1.0) - 3.0 * sigma2);
    a /= 6.0 * (sigma2 - (l + 1.0) * (l + 1.0));
    l + a
}

/// The integer parameters of one box pass: `(radius, ww, fw)` as in `ImagingHorizontalBoxBlur`.
pub fn box_weights(float_radius: f32) -> (usize, u32, u32) {
    let radius = float_radius as i32;
    let ww = ((1u32 << 24) as f32 / (float_radius * 2.0 + 1.0)) as u32;
    let fw = ((1u32 << 24).wrapping_sub(((radius * 2 + 1) as u32).wrapping_mul(ww))) / 2;
    (radius.max(0) as usize, ww, fw)
}

/// `img.filter(ImageFilter.GaussianBlur(radius=sigma))` on an RGB u8 HWC buffer of `width x height`, in
/// place. `sigma` is Pillow's radius (the Gaussian's standard deviation); `sigma <= 0` leaves the image as is.
pub fn gaussian_blur(data: &mut [u8], width: usize, height: usize, sigma: f32) {
    if sigma.is_nan() || sigma <= 0.0 || width == 0 || height == 0 {
        return;
    }
    let fr = box_radius(sigma, PASSES);
    if fr == 0.0 {
        return;
    }
    let (radius, ww, fw) = box_weights(fr);
    let rowlen = width * 3;
    let mut tmp = vec![0u8; data.len()];
    let mut acc = vec![0u32; rowlen.max(height * 3)];
    // Horizontal: 3 passes along the rows, run as vertical passes over the transposed image (the same
    // arithmetic per value, vectorised along the other axis).
    let mut t = vec![0u8; data.len()];
    kernels::transpose_rgb(data, 0, rowlen, width, height, &mut t);
    for _ in 0..PASSES {
        kernels::box_pass_vertical(&t, &mut tmp, height * 3, width, radius, ww, fw, &mut acc);
        t.copy_from_slice(&tmp);
    }
    kernels::transpose_rgb(&t, 0, height * 3, height, width, data);
    // Vertical: the same arithmetic per column as Pillow's transpose + horizontal pass.
    for _ in 0..PASSES {
        kernels::box_pass_vertical(data, &mut tmp, rowlen, height, radius, ww, fw, &mut acc);
        data.copy_from_slice(&tmp);
    }
}
