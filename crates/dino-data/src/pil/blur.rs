//! Pillow's `ImageFilter.GaussianBlur(radius=sigma)` (BoxBlur.c), bit for bit. It is not a Gaussian
//! convolution: 3 passes per axis of an "extended box" blur of fractional radius (Gwosdek et al. 2011), in
//! 24-bit fixed point, edges replicated, every pass rounded to u8; 3 horizontal passes, then 3 vertical ones.

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

/// One extended-box pass along an axis of `len` positions. Element `j` (of `m`) at position `p` lives at
/// `data[p * pstride + j]`; `acc`, `lo`, `hi` are scratch of length `m`; `out` is laid out like `data`.
#[allow(clippy::too_many_arguments)]
fn box_pass(
    data: &[u8],
    out: &mut [u8],
    len: usize,
    m: usize,
    pstride: usize,
    radius: usize,
    ww: u32,
    fw: u32,
    acc: &mut [u32],
) {
    let last = len as isize - 1;
    let at = |p: isize| -> usize { p.clamp(0, last) as usize * pstride };
    let r = radius as isize;
    // Window sum over positions [-r-1, r-1], edges replicated.
    acc[..m].fill(0);
    for p in (-r - 1)..r {
        let o = at(p);
        super::kernels::add_row(&mut acc[..m], &data[o..o + m]);
    }
    for x in 0..len as isize {
        let sub = at(x - r - 1);
        let add = at(x + r);
        let far = at(x + r + 1);
        let o = x as usize * pstride;
        super::kernels::step(
            &mut acc[..m],
            &data[add..add + m],
            &data[sub..sub + m],
            &data[far..far + m],
            &mut out[o..o + m],
            ww,
            fw,
        );
    }
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
    let mut acc = vec![0u32; rowlen.max(3)];
    // Horizontal: each row is a line of `width` positions of 3 values.
    for _ in 0..PASSES {
        for (row, orow) in data.chunks_exact(rowlen).zip(tmp.chunks_exact_mut(rowlen)) {
            box_pass(row, orow, width, 3, 3, radius, ww, fw, &mut acc);
        }
        data.copy_from_slice(&tmp);
    }
    // Vertical: the whole image is a line of `height` positions of `rowlen` values (the same arithmetic per
    // column as Pillow's transpose + horizontal pass).
    for _ in 0..PASSES {
        box_pass(
            data, &mut tmp, height, rowlen, rowlen, radius, ww, fw, &mut acc,
        );
        data.copy_from_slice(&tmp);
    }
}
