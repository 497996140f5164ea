//! Attention maps as `visualize_attention.py` draws them: the CLS-query row of the last block's self-attention
//! per head, the optional mass threshold (sort ascending, normalise, cumulative sum > 1 - t, un-sort),
//! nearest upsampling by the patch size, the viridis colormap (matplotlib's default) and the mask overlay.
//!
//! Everything here works on plain `(heads, h, w)` arrays so it is tested without a network.

use image::{Rgb, RgbImage};

/// Per-head maps on the patch grid: `data[head * h * w + y * w + x]`.
#[derive(Debug, Clone, PartialEq)]
pub struct HeadMaps {
    /// Number of heads.
    pub heads: usize,
    /// Grid height (H / patch).
    pub h: usize,
    /// Grid width (W / patch).
    pub w: usize,
    /// `heads * h * w` values.
    pub data: Vec<f32>,
}

impl HeadMaps {
    /// The map of one head, `h * w` values.
    pub fn head(&self, j: usize) -> &[f32] {
        &self.data[j * self.h * self.w..(j + 1) * self.h * self.w]
    }
}

/// The threshold masks of `visualize_attention.py`, per head: keep the smallest set of highest-attention patches
/// holding at least `t` of the mass. Official steps: sort ascending, divide by the sum, cumulative sum, keep
/// `cumsum > 1 - t`, un-sort. Returns `heads * h * w` booleans in the layout of `maps`.
pub fn threshold_masks(maps: &HeadMaps, t: f32) -> Vec<bool> {
    let n = maps.h * maps.w;
    let mut out = vec![false; maps.heads * n];
    for j in 0..maps.heads {
        let a = maps.head(j);
        let mut idx: Vec<usize> = (0..n).collect();
        // torch.sort is ascending; ties keep index order (stable) here.
        idx.sort_by(|&p, &q| a[p].total_cmp(&a[q]));
        let sum: f32 = a.iter().sum();
        let mut cum = 0f32;
        for &i in &idx {
            cum += a[i] / sum;
            out[j * n + i] = cum > 1.0 - t;
        }
    }
    out
}

/// Nearest-neighbour upsampling of an `h x w` map by an integer factor (`F.interpolate(mode="nearest")`).
pub fn upsample_nearest<T: Copy>(map: &[T], h: usize, w: usize, factor: usize) -> Vec<T> {
    let (oh, ow) = (h * factor, w * factor);
    let mut out = Vec::with_capacity(oh * ow);
    for y in 0..oh {
        for x in 0..ow {
            out.push(map[(y / factor) * w + x / factor]);
        }
    }
    out
}

/// matplotlib's viridis at `t` in [0, 1] (a degree-6 polynomial fit of the 256-entry table, within ~0.01).
pub fn viridis(t: f32) -> [u8; 3] {
    const C: [[f32; 3]; 7] = [
        [0.277_727_33, 0.005_407_344_5, 0.334_099_8],
        [0.105_093_04, 1.404_613_5, 1.384_590_2],
        [-0.330_861_83, 0.214_847_56, 0.095_095_16],
        [-4.634_230_5, -5.799_101, -19.332_441],
        [6.228_27, 14.179_933, 56.690_55],
        [4.776_385, -13.745_145, -65.353_035],
        [-5.435_456, 4.645_852_6, 26.312_435],
    ];
    let t = if t.is_finite() {
        t.clamp(0.0, 1.0)
    } else {
        0.0
    };
    let mut rgb = [0u8; 3];
    for (c, v) in rgb.iter_mut().enumerate() {
        let mut acc = C[6][c];
        for k in (0..6).rev() {
            acc = acc * t + C[k][c];
        }
        *v = (acc.clamp(0.0, 1.0) * 255.0).round() as u8;
    }
    rgb
}

/// A map rendered like `plt.imsave(fname, map, format="png")`: min-max normalised, viridis.
pub fn colormap_image(map: &[f32], h: usize, w: usize) -> RgbImage {
    let (lo, hi) = map
        .iter()
        .fold((f32::INFINITY, f32::NEG_INFINITY), |(lo, hi), &v| {
            (lo.min(v), hi.max(v))
        });
    let span = if hi > lo { hi - lo } else { 1.0 };
    RgbImage::from_fn(w as u32, h as u32, |x, y| {
        let v = map[y as usize * w + x as usize];
        Rgb(viridis((v - lo) / span))
    })
}

/// The colour of head `j`'s mask overlay (a fixed bright palette instead of the official random colours, so runs
/// are reproducible).
pub fn head_color(j: usize) -> [u8; 3] {
    const P: [[u8; 3]; 8] = [
        [255, 48, 48],
        [48, 220, 48],
        [64, 128, 255],
        [255, 200, 0],
        [255, 0, 255],
        [0, 230, 230],
        [255, 128, 0],
        [160, 96, 255],
    ];
    P[j % P.len()]
}

/// `display_instances` of visualize_attention.py for one mask: the image with the mask blended in `color` at
/// alpha 0.5 and the mask's contour drawn in the full colour. `mask` is `img.height() x img.width()`.
pub fn overlay_mask(img: &RgbImage, mask: &[bool], color: [u8; 3]) -> RgbImage {
    let (w, h) = (img.width() as usize, img.height() as usize);
    let inside = |x: isize, y: isize| {
        x >= 0
            && y >= 0
            && (x as usize) < w
            && (y as usize) < h
            && mask[y as usize * w + x as usize]
    };
    RgbImage::from_fn(w as u32, h as u32, |x, y| {
        let p = img.get_pixel(x, y).0;
        let (xi, yi) = (x as isize, y as isize);
        if !inside(xi, yi) {
            return Rgb(p);
        }
        let edge = !inside(xi - 1, yi)
            || !inside(xi + 1, yi)
            || !inside(xi, yi - 1)
            || !inside(xi, yi + 1);
        if edge {
            return Rgb(color);
        }
        let mut o = [0u8; 3];
        for c in 0..3 {
            o[c] = ((p[c] as f32) * 0.5 + (color[c] as f32) * 0.5).round() as u8;
        }
        Rgb(o)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn maps(heads: usize, h: usize, w: usize, data: Vec<f32>) -> HeadMaps {
        assert_eq!(data.len(), heads * h * w);
        HeadMaps { heads, h, w, data }
    }

    /// The official procedure written out directly with explicit sorting of (value, index) pairs.
    fn reference_mask(a: &[f32], t: f32) -> Vec<bool> {
        let total: f64 = a.iter().map(|&v| v as f64).sum();
        let mut pairs: Vec<(f32, usize)> = a.iter().copied().zip(0..).collect();
        pairs.sort_by(|x, y| x.0.total_cmp(&y.0));
        let mut keep = vec![false; a.len()];
        let mut cum = 0f64;
        for (v, i) in pairs {
            cum += v as f64 / total;
            keep[i] = cum > 1.0 - t as f64;
        }
        keep
    }

    #[test]
    fn threshold_keeps_the_smallest_top_set_holding_the_mass() {
        // One head, 2x3 grid: masses 0.05 0.1 0.4 / 0.3 0.1 0.05. With t = 0.6 the top patches 0.4 + 0.3 = 0.7
        // hold >= 0.6 of the mass; adding nothing else is needed.
        let m = maps(1, 2, 3, vec![0.05, 0.1, 0.4, 0.3, 0.1, 0.05]);
        let k = threshold_masks(&m, 0.6);
        assert_eq!(k, vec![false, false, true, true, false, false]);
        // t = 0.85: sorted cumulative sums 0.05 0.1 0.2 0.3 0.6 1.0; those > 0.15 are kept: everything but the
        // two 0.05 patches.
        let k = threshold_masks(&m, 0.85);
        assert_eq!(k, vec![false, true, true, true, true, false]);
        // Unnormalised input gives the same masks (the procedure divides by the sum).
        let scaled = maps(1, 2, 3, m.data.iter().map(|v| v * 7.0).collect());
        assert_eq!(threshold_masks(&scaled, 0.6), threshold_masks(&m, 0.6));
    }

    #[test]
    fn threshold_matches_the_direct_procedure_on_many_heads() {
        // A deterministic pseudo-random attention (LCG) over 4 heads of a 7x5 grid.
        let mut s = 12345u64;
        let data: Vec<f32> = (0..4 * 35)
            .map(|_| {
                s = s
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                ((s >> 33) as f32 / (1u64 << 31) as f32).powi(3) + 1e-4
            })
            .collect();
        let m = maps(4, 7, 5, data);
        for t in [0.1f32, 0.5, 0.6, 0.9] {
            let k = threshold_masks(&m, t);
            for j in 0..4 {
                assert_eq!(
                    &k[j * 35..(j + 1) * 35],
                    reference_mask(m.head(j), t).as_slice(),
                    "t={t} head={j}"
                );
                // The kept set holds at least t of the mass, and dropping its smallest element falls below t.
                let a = m.head(j);
                let total: f32 = a.iter().sum();
                let kept: Vec<f32> = (0..35).filter(|&i| k[j * 35 + i]).map(|i| a[i]).collect();
                let mass: f32 = kept.iter().sum::<f32>() / total;
                assert!(mass >= t - 1e-5, "mass {mass} < {t}");
                let smallest = kept.iter().copied().fold(f32::INFINITY, f32::min);
                assert!(mass - smallest / total < t + 1e-5);
            }
        }
    }

    #[test]
    fn nearest_upsampling_repeats_each_patch() {
        let up = upsample_nearest(&[1, 2, 3, 4, 5, 6], 2, 3, 2);
        assert_eq!(
            up,
            vec![1, 1, 2, 2, 3, 3, 1, 1, 2, 2, 3, 3, 4, 4, 5, 5, 6, 6, 4, 4, 5, 5, 6, 6]
        );
    }

    #[test]
    fn viridis_matches_matplotlib_at_known_points() {
        // matplotlib's viridis table: entry 0 #440154, entry 128 #21918c, entry 255 #fde725.
        let close = |a: [u8; 3], b: [u8; 3]| {
            a.iter()
                .zip(b)
                .all(|(x, y)| (*x as i32 - y as i32).abs() <= 5)
        };
        assert!(
            close(viridis(0.0), [0x44, 0x01, 0x54]),
            "{:?}",
            viridis(0.0)
        );
        assert!(
            close(viridis(128.0 / 255.0), [0x21, 0x91, 0x8c]),
            "{:?}",
            viridis(0.5)
        );
        assert!(
            close(viridis(1.0), [0xfd, 0xe7, 0x25]),
            "{:?}",
            viridis(1.0)
        );
        // Monotone in luminance, as viridis is designed to be.
        let lum = |c: [u8; 3]| 0.2126 * c[0] as f32 + 0.7152 * c[1] as f32 + 0.0722 * c[2] as f32;
        for i in 0..20 {
            assert!(lum(viridis(i as f32 / 20.0)) < lum(viridis((i + 1) as f32 / 20.0)));
        }
    }

    #[test]
    fn colormap_normalises_min_to_dark_and_max_to_bright() {
        let img = colormap_image(&[2.0, 3.0, 4.0, 6.0], 2, 2);
        assert_eq!(img.get_pixel(0, 0).0, viridis(0.0));
        assert_eq!(img.get_pixel(1, 1).0, viridis(1.0));
        assert_eq!(img.get_pixel(1, 0).0, viridis(0.25));
        // A constant map does not divide by zero.
        let flat = colormap_image(&[1.0; 4], 2, 2);
        assert_eq!(flat.get_pixel(1, 1).0, viridis(0.0));
    }

    #[test]
    fn overlay_blends_inside_draws_the_contour_and_leaves_outside() {
        let img = RgbImage::from_pixel(5, 5, Rgb([100, 100, 100]));
        let mut mask = vec![false; 25];
        for y in 1..4 {
            for x in 1..4 {
                mask[y * 5 + x] = true;
            }
        }
        let o = overlay_mask(&img, &mask, [200, 0, 0]);
        assert_eq!(o.get_pixel(0, 0).0, [100, 100, 100]);
        assert_eq!(o.get_pixel(1, 1).0, [200, 0, 0], "contour");
        assert_eq!(o.get_pixel(2, 2).0, [150, 50, 50], "alpha 0.5 inside");
    }
}
