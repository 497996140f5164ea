//! Patchify: images `(B, C, H, W)` to the rows of patch vectors a ViT's patch embedding projects, optionally
//! with shifted patch tokenization's four diagonal translations (Lee et al. 2021) on the channels.
//!
//! The CPU fast path writes every row in one pass straight from the image (no shifted copies, no strided
//! permute); it serves f32 images that carry no gradient (training data). The portable path is the candle
//! composition (zero pad + narrow per translation, concatenation, reshape/permute), whose gradient candle
//! derives: it runs on CUDA, under `DINO_KERNELS=portable`, and for inputs that track a gradient.

use candle_core::{Result, Tensor};
use rayon::prelude::*;

use crate::dispatch::cpu_f32_fast_path;
use crate::ops::f32_data;

/// The translations of shifted patch tokenization by `s` pixels in (rows, columns), after the unshifted
/// image: the SPT code's `left-up`, `right-up`, `left-down`, `right-down` (each pads one side and crops the
/// other, moving the content by (+s, +s), (+s, -s), (-s, +s), (-s, -s)).
fn shifts(s: usize) -> [(isize, isize); 5] {
    let s = s as isize;
    [(0, 0), (s, s), (s, -s), (-s, s), (-s, -s)]
}

/// The patch rows of `x` `(B, C, H, W)` for patch size `p`: `(B * (H/p) * (W/p), K * C * p * p)`, row `(b, i,
/// j)` in raster order of the `(H/p, W/p)` grid (pixels past the last whole patch are dropped), each row in
/// `(k, c, y, x)` order, as the flattened weight of a `Conv2d(K C, D, p, stride p)`. `shift: None` gives the
/// plain patches (K = 1); `Some(s)` the image followed by its four diagonal translations by `s` pixels
/// (content moved by (+s, +s), (+s, -s), (-s, +s), (-s, -s), the uncovered border zero), K = 5.
pub fn patchify(x: &Tensor, p: usize, shift: Option<usize>) -> Result<Tensor> {
    let (b, c, h, w) = x.dims4()?;
    if p == 0 || h < p || w < p {
        candle_core::bail!("patchify: patch size {p} does not fit a {h}x{w} image");
    }
    if cpu_f32_fast_path(&[x]) && !x.track_op() {
        patchify_cpu(x, b, c, h, w, p, shift)
    } else {
        patchify_portable(x, p, shift)
    }
}

fn patchify_cpu(
    x: &Tensor,
    b: usize,
    c: usize,
    h: usize,
    w: usize,
    p: usize,
    shift: Option<usize>,
) -> Result<Tensor> {
    let (storage, layout) = x.storage_and_layout();
    let candle_core::Storage::Cpu(cpu) = &*storage else {
        candle_core::bail!("patchify: CPU storage expected");
    };
    // Borrowed in place when contiguous (the loader's batches), gathered once otherwise.
    let src = f32_data(cpu, layout, "patchify")?;
    let (gh, gw) = (h / p, w / p);
    let moves: &[(isize, isize)] = match shift {
        Some(s) => &shifts(s),
        None => &shifts(0)[..1],
    };
    let cols = moves.len() * c * p * p;
    let mut out = vec![0f32; b * gh * gw * cols];
    out.par_chunks_mut(cols.max(1))
        .enumerate()
        .for_each(|(row, dst)| {
            let (bi, cell) = (row / (gh * gw), row % (gh * gw));
            let (y0, x0) = ((cell / gw * p) as isize, (cell % gw * p) as isize);
            let mut o = 0;
            for &(dy, dx) in moves {
                for ci in 0..c {
                    let plane = &src[(bi * c + ci) * h * w..(bi * c + ci + 1) * h * w];
                    for py in 0..p as isize {
                        let sy = y0 + py - dy;
                        let row_out = &mut dst[o..o + p];
                        o += p;
                        if sy < 0 || sy >= h as isize {
                            continue; // stays zero
                        }
                        let line = &plane[sy as usize * w..(sy as usize + 1) * w];
                        for (px, v) in row_out.iter_mut().enumerate() {
                            let sx = x0 + px as isize - dx;
                            if sx >= 0 && sx < w as isize {
                                *v = line[sx as usize];
                            }
                        }
                    }
                }
            }
        });
    Tensor::from_vec(out, (b * gh * gw, cols), x.device())
}

/// `x` `(B, C, H, W)` translated by `(dy, dx)` pixels (content moves down / right for positive shifts), the
/// uncovered border filled with zeros.
fn translate(x: &Tensor, dy: isize, dx: isize) -> Result<Tensor> {
    let mut x = x.clone();
    for (dim, s) in [(2, dy), (3, dx)] {
        let n = x.dim(dim)?;
        let k = s.unsigned_abs().min(n);
        if k == 0 {
            continue;
        }
        x = if s > 0 {
            x.pad_with_zeros(dim, k, 0)?.narrow(dim, 0, n)?
        } else {
            x.pad_with_zeros(dim, 0, k)?.narrow(dim, k, n)?
        };
    }
    Ok(x)
}

fn patchify_portable(x: &Tensor, p: usize, shift: Option<usize>) -> Result<Tensor> {
    let x = match shift {
        Some(s) => {
            let parts = shifts(s)
                .iter()
                .map(|&(dy, dx)| translate(x, dy, dx))
                .collect::<Result<Vec<_>>>()?;
            Tensor::cat(&parts, 1)?
        }
        None => x.clone(),
    };
    let (b, c, h, w) = x.dims4()?;
    let (gh, gw) = (h / p, w / p);
    let x = if gh * p != h || gw * p != w {
        x.narrow(2, 0, gh * p)?.narrow(3, 0, gw * p)?
    } else {
        x
    };
    x.reshape((b, c, gh, p, gw, p))?
        .permute((0, 2, 4, 1, 3, 5))?
        .contiguous()?
        .reshape((b * gh * gw, c * p * p))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dispatch::{with_kernel_path, KernelPath};
    use candle_core::{Device, Var};

    fn image(b: usize, c: usize, h: usize, w: usize) -> Tensor {
        let v: Vec<f32> = (0..b * c * h * w)
            .map(|i| ((i * 37 % 101) as f32) / 101.0 - 0.5)
            .collect();
        Tensor::from_vec(v, (b, c, h, w), &Device::Cpu).unwrap()
    }

    /// A direct reading of the definition, pixel by pixel.
    fn reference(x: &Tensor, p: usize, shift: Option<usize>) -> Vec<f32> {
        let (b, c, h, w) = x.dims4().unwrap();
        let v = x.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        let moves: Vec<(isize, isize)> = match shift {
            Some(s) => shifts(s).to_vec(),
            None => vec![(0, 0)],
        };
        let mut out = Vec::new();
        for bi in 0..b {
            for i in 0..h / p {
                for j in 0..w / p {
                    for &(dy, dx) in &moves {
                        for ci in 0..c {
                            for py in 0..p {
                                for px in 0..p {
                                    let sy = (i * p + py) as isize - dy;
                                    let sx = (j * p + px) as isize - dx;
                                    let inside = (0..h as isize).contains(&sy)
                                        && (0..w as isize).contains(&sx);
                                    out.push(if inside {
                                        v[((bi * c + ci) * h + sy as usize) * w + sx as usize]
                                    } else {
                                        0.0
                                    });
                                }
                            }
                        }
                    }
                }
            }
        }
        out
    }

    #[test]
    fn both_paths_equal_the_definition() -> Result<()> {
        // Square and non-square, a remainder past the last whole patch, odd patch, shift past the border.
        for &(b, c, h, w, p, shift) in &[
            (2, 3, 28, 28, 7, Some(3)),
            (3, 1, 14, 14, 7, Some(3)),
            (2, 3, 30, 23, 7, Some(3)),
            (1, 2, 8, 12, 4, None),
            (2, 3, 9, 9, 3, Some(1)),
            (1, 1, 4, 4, 2, Some(5)),
        ] {
            let x = image(b, c, h, w);
            let want = reference(&x, p, shift);
            let k = if shift.is_some() { 5 } else { 1 };
            for path in [KernelPath::Auto, KernelPath::Portable] {
                let got = with_kernel_path(path, || patchify(&x, p, shift))?;
                assert_eq!(got.dims(), [b * (h / p) * (w / p), k * c * p * p]);
                let got = got.flatten_all()?.to_vec1::<f32>()?;
                assert_eq!(got, want, "{path:?} {b}x{c}x{h}x{w} p {p} shift {shift:?}");
            }
        }
        // A strided view (H and W swapped) is read through its strides.
        let x = image(2, 3, 14, 21).transpose(2, 3)?;
        let want = reference(&x, 7, Some(3));
        let got = patchify(&x, 7, Some(3))?.flatten_all()?.to_vec1::<f32>()?;
        assert_eq!(got, want, "strided input");
        Ok(())
    }

    #[test]
    fn an_input_that_tracks_a_gradient_gets_one() -> Result<()> {
        // Each pixel appears once unshifted and in up to four translations: the gradient of the sum of all
        // patch values counts those appearances (1 + the translations that keep it inside the image).
        let x = Var::from_tensor(&image(1, 1, 6, 6))?;
        let y = patchify(x.as_tensor(), 3, Some(1))?;
        let g = y.sum_all()?.backward()?;
        let g = g
            .get(&x)
            .expect("gradient")
            .flatten_all()?
            .to_vec1::<f32>()?;
        for yy in 0..6usize {
            for xx in 0..6usize {
                let mut n = 1.0;
                for (dy, dx) in [(1isize, 1isize), (1, -1), (-1, 1), (-1, -1)] {
                    let (ty, tx) = (yy as isize + dy, xx as isize + dx);
                    if (0..6).contains(&ty) && (0..6).contains(&tx) {
                        n += 1.0;
                    }
                }
                assert_eq!(g[yy * 6 + xx], n, "pixel ({yy}, {xx})");
            }
        }
        Ok(())
    }
}
