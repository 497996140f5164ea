//! The KoLeo regulariser of DINOv2 (`dinov2.loss.KoLeoLoss`, Sablayrolles et al. 2019): minus the mean log
//! distance of each l2-normalised feature to its nearest neighbour in the batch, which spreads the features
//! over the sphere. Composed from candle ops (autograd on any device); the neighbour index is not
//! differentiated, as in the official code.

use candle_core::{DType, Tensor, D};

use crate::{Error, Result};

/// `eps` of the official `F.normalize`, `nn.PairwiseDistance` and the log.
pub const KOLEO_EPS: f64 = 1e-8;

/// The index of each row's nearest neighbour by inner product of the l2-normalised rows, itself excluded
/// (the official `pairwise_NNs_inner`: the diagonal of `x̂ x̂ᵀ` set to -1, argmax per row; ties go to the
/// lower index). `x`: (B, D) -> (B) u32.
pub fn nearest_neighbours(x: &Tensor) -> Result<Tensor> {
    let (b, _) = x.dims2()?;
    let xn = normalize(&x.detach().to_dtype(DType::F32)?)?;
    let dots = xn.matmul(&xn.t()?)?.to_vec2::<f32>()?;
    let idx: Vec<u32> = dots
        .iter()
        .enumerate()
        .map(|(i, row)| {
            let mut best = (0usize, f32::NEG_INFINITY);
            for (j, &v) in row.iter().enumerate() {
                let v = if i == j { -1.0 } else { v };
                if v > best.1 {
                    best = (j, v);
                }
            }
            best.0 as u32
        })
        .collect();
    Ok(Tensor::from_vec(idx, b, x.device())?)
}

/// `x / max(‖x‖, 1e-8)` per row, differentiable (a zero row gives zeros and a zero gradient).
fn normalize(x: &Tensor) -> Result<Tensor> {
    let n2 = x.sqr()?.sum_keepdim(D::Minus1)?;
    let norm = n2.maximum(KOLEO_EPS * KOLEO_EPS)?.sqrt()?;
    Ok(x.broadcast_div(&norm)?)
}

/// The KoLeo loss of the rows of `x` (B, D), B >= 2: `x̂ = x / max(‖x‖, 1e-8)`, `I` = nearest neighbours
/// ([`nearest_neighbours`]), `d_i = ‖x̂_i − x̂_{I(i)} + 1e-8‖₂` (the eps added to every element of the
/// difference, as `nn.PairwiseDistance`), loss = `−mean_i ln(d_i + 1e-8)`. Returns a scalar of `x`'s dtype
/// (f32 or f64), with gradients through both `x̂_i` and the gathered `x̂_{I(i)}`. Two identical rows give a
/// large finite value (each d = 1e-8·√D) and cancelling gradients, as the official code.
pub fn koleo_loss(x: &Tensor) -> Result<Tensor> {
    let (b, d) = x.dims2()?;
    if b < 2 {
        return Err(Error::arg(
            "koleo",
            format!("needs at least 2 rows (samples) to find neighbours, got {b}"),
        ));
    }
    if d == 0 {
        return Err(Error::arg("koleo", "features have 0 columns"));
    }
    let dt = if x.dtype() == DType::F64 {
        DType::F64
    } else {
        DType::F32
    };
    let x = x.to_dtype(dt)?;
    let idx = nearest_neighbours(&x)?;
    let xn = normalize(&x)?;
    let nn = xn.index_select(&idx, 0)?;
    let diff = ((xn - nn)? + KOLEO_EPS)?;
    let dist = diff.sqr()?.sum(D::Minus1)?.sqrt()?;
    let loss = ((dist + KOLEO_EPS)?.log()?.mean_all()? * -1.0)?;
    Ok(loss)
}

/// The training-loop form: `weight · Σ_c KoLeo(crop c)` over the `n_crops` equal row blocks of `features`
/// (crop-major, e.g. the backbone CLS tokens of the 2 global crops, (2B, D)); official weight 0.1. One KoLeo
/// per crop, never across the crops of one image.
pub fn koleo_per_crop(features: &Tensor, n_crops: usize, weight: f64) -> Result<Tensor> {
    let rows = features.dim(0)?;
    if n_crops == 0 || rows % n_crops != 0 {
        return Err(Error::shape(
            "features",
            format!("a multiple of n_crops = {n_crops} rows"),
            features.dims(),
        ));
    }
    let mut total: Option<Tensor> = None;
    for c in features.chunk(n_crops, 0)? {
        let l = koleo_loss(&c)?;
        total = Some(match total {
            Some(t) => (t + l)?,
            None => l,
        });
    }
    let total = total.ok_or_else(|| Error::arg("features", "no rows"))?;
    Ok((total * weight)?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    /// The loss from a direct f64 formula (no candle ops), for comparison.
    fn direct(x: &[Vec<f64>]) -> f64 {
        let xn: Vec<Vec<f64>> = x
            .iter()
            .map(|r| {
                let n = r.iter().map(|v| v * v).sum::<f64>().sqrt().max(1e-8);
                r.iter().map(|v| v / n).collect()
            })
            .collect();
        let b = xn.len();
        let mut s = 0.0;
        for i in 0..b {
            let mut best = (0, f64::NEG_INFINITY);
            for j in 0..b {
                let v = if i == j {
                    -1.0
                } else {
                    xn[i].iter().zip(&xn[j]).map(|(a, c)| a * c).sum()
                };
                if v > best.1 {
                    best = (j, v);
                }
            }
            let d = xn[i]
                .iter()
                .zip(&xn[best.0])
                .map(|(a, c)| (a - c + 1e-8).powi(2))
                .sum::<f64>()
                .sqrt();
            s += (d + 1e-8).ln();
        }
        -s / b as f64
    }

    fn sample(b: usize, d: usize, seed: u64) -> Vec<Vec<f64>> {
        let mut s = seed;
        (0..b)
            .map(|_| {
                (0..d)
                    .map(|_| {
                        s = s
                            .wrapping_mul(6364136223846793005)
                            .wrapping_add(1442695040888963407);
                        ((s >> 11) as f64 / (1u64 << 53) as f64) * 2.0 - 1.0
                    })
                    .collect()
            })
            .collect()
    }

    #[test]
    fn matches_a_direct_formula_and_finite_differences() {
        let x = sample(6, 5, 3);
        let t = Tensor::new(x.clone(), &Device::Cpu).unwrap();
        let v = koleo_loss(&t).unwrap().to_scalar::<f64>().unwrap();
        assert!((v - direct(&x)).abs() < 1e-12, "{v} vs {}", direct(&x));
        let var = candle_core::Var::from_tensor(&t).unwrap();
        let g = koleo_loss(var.as_tensor())
            .unwrap()
            .backward()
            .unwrap()
            .get(var.as_tensor())
            .unwrap()
            .to_vec2::<f64>()
            .unwrap();
        let h = 1e-6;
        for i in 0..6 {
            for j in 0..5 {
                let mut p = x.clone();
                p[i][j] += h;
                let mut m = x.clone();
                m[i][j] -= h;
                let fd = (direct(&p) - direct(&m)) / (2.0 * h);
                assert!(
                    (fd - g[i][j]).abs() < 1e-6,
                    "[{i},{j}] fd {fd} vs {}",
                    g[i][j]
                );
            }
        }
    }

    #[test]
    fn degenerate_inputs_are_finite_or_an_error() {
        let one = Tensor::ones((1, 4), DType::F32, &Device::Cpu).unwrap();
        let e = koleo_loss(&one).unwrap_err().to_string();
        assert!(e.contains("at least 2 rows"), "{e}");
        // A zero row and a zero column: finite value and gradient.
        let mut x = sample(5, 4, 9);
        x[2] = vec![0.0; 4];
        for r in x.iter_mut() {
            r[1] = 0.0;
        }
        let var = candle_core::Var::new(x, &Device::Cpu).unwrap();
        let l = koleo_loss(var.as_tensor()).unwrap();
        assert!(l.to_scalar::<f64>().unwrap().is_finite());
        let g = l.backward().unwrap().get(var.as_tensor()).unwrap().clone();
        for row in g.to_vec2::<f64>().unwrap() {
            assert!(row.iter().all(|v| v.is_finite()), "{row:?}");
        }
        // All rows identical: every distance is the eps floor, finite.
        let same = Tensor::ones((4, 8), DType::F32, &Device::Cpu).unwrap();
        let v = koleo_loss(&same).unwrap().to_scalar::<f32>().unwrap();
        let expect = -((1e-8f64 * 8f64.sqrt()) + 1e-8).ln();
        assert!((v as f64 - expect).abs() < 1e-4 * expect, "{v} vs {expect}");
    }
}
