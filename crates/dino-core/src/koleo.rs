//! The KoLeo regulariser of DINOv2 (`dinov2.loss.KoLeoLoss`, Sablayrolles et al. 2019): minus the mean log
//! distance of each l2-normalised feature to its nearest neighbour in the batch, which spreads the features
//! over the sphere. Composed from candle ops (autograd on any device); the neighbour index is not
//! differentiated, as in the official code. Under data parallelism the batch is either each rank's own
//! (dinov2's choice, [`koleo_per_crop`]) or the global batch gathered over the ranks
//! ([`koleo_per_crop_over_ranks`], the same loss and gradients as one process with the whole batch).

use std::sync::Arc;

use candle_core::{DType, Tensor, D};

use crate::collective::{all_reduce_sum_with, Collective};
use crate::{Error, Result};

/// `eps` of the official `F.normalize`, `nn.PairwiseDistance` and the log.
pub const KOLEO_EPS: f64 = 1e-8;

/// The index of each row's nearest neighbour by inner product of the l2-normalised rows, itself excluded
/// (the official `pairwise_NNs_inner`: the diagonal of `x̂ x̂ᵀ` set to -1, argmax per row; ties go to the
/// lower index). `x`: (B, D) -> (B) u32.
pub fn nearest_neighbours(x: &Tensor) -> Result<Tensor> {
    let (b, _) = x.dims2()?;
    let rows: Vec<u32> = (0..b as u32).collect();
    nearest_neighbours_of(x, &rows)
}

/// [`nearest_neighbours`] for the rows `rows` of `x` only, each searched among all rows of `x` but itself.
/// `x`: (B, D) -> (rows.len()) u32.
pub fn nearest_neighbours_of(x: &Tensor, rows: &[u32]) -> Result<Tensor> {
    let xn = normalize(&x.detach().to_dtype(DType::F32)?)?;
    let q = if is_every_row(rows, xn.dim(0)?) {
        xn.clone()
    } else {
        xn.index_select(&Tensor::new(rows, xn.device())?, 0)?
    };
    let dots = q.matmul(&xn.t()?)?.to_vec2::<f32>()?;
    let idx: Vec<u32> = dots
        .iter()
        .zip(rows)
        .map(|(row, &i)| {
            let mut best = (0usize, f32::NEG_INFINITY);
            for (j, &v) in row.iter().enumerate() {
                let v = if i as usize == j { -1.0 } else { v };
                if v > best.1 {
                    best = (j, v);
                }
            }
            best.0 as u32
        })
        .collect();
    Ok(Tensor::from_vec(idx, rows.len(), x.device())?)
}

/// Whether `rows` is `0..b` in order (then no row selection is needed).
fn is_every_row(rows: &[u32], b: usize) -> bool {
    rows.len() == b && rows.iter().enumerate().all(|(i, &r)| r as usize == i)
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
    let b = x.dim(0)?;
    let rows: Vec<u32> = (0..b as u32).collect();
    koleo_loss_of(x, &rows)
}

/// [`koleo_loss`] averaged over the rows `rows` of `x` only, each row's neighbour searched among all rows of
/// `x` (for a batch gathered over the ranks: this rank's rows against the global batch). Gradients reach
/// `x` through the rows and through their neighbours.
pub fn koleo_loss_of(x: &Tensor, rows: &[u32]) -> Result<Tensor> {
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
    if rows.is_empty() || rows.iter().any(|&r| r as usize >= b) {
        return Err(Error::arg(
            "rows",
            format!("{} row indices, each below {b}, at least one", rows.len()),
        ));
    }
    let x = x.to_dtype(dt)?;
    let idx = nearest_neighbours_of(&x, rows)?;
    let xn = normalize(&x)?;
    let nn = xn.index_select(&idx, 0)?;
    let q = if is_every_row(rows, b) {
        xn
    } else {
        xn.index_select(&Tensor::new(rows, x.device())?, 0)?
    };
    let diff = ((q - nn)? + KOLEO_EPS)?;
    let dist = diff.sqr()?.sum(D::Minus1)?.sqrt()?;
    let loss = ((dist + KOLEO_EPS)?.log()?.mean_all()? * -1.0)?;
    Ok(loss)
}

/// The training-loop form: `weight · Σ_c KoLeo(crop c)` over the `n_crops` equal row blocks of `features`
/// (crop-major, e.g. the backbone CLS tokens of the 2 global crops, (2B, D)); official weight 0.1. One KoLeo
/// per crop, never across the crops of one image.
pub fn koleo_per_crop(features: &Tensor, n_crops: usize, weight: f64) -> Result<Tensor> {
    sum_over_crops(features, n_crops, weight, koleo_loss)
}

/// `weight · Σ_c loss(crop c)` over the `n_crops` equal row blocks of `features`.
fn sum_over_crops(
    features: &Tensor,
    n_crops: usize,
    weight: f64,
    loss: impl Fn(&Tensor) -> Result<Tensor>,
) -> Result<Tensor> {
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
        let l = loss(&c)?;
        total = Some(match total {
            Some(t) => (t + l)?,
            None => l,
        });
    }
    let total = total.ok_or_else(|| Error::arg("features", "no rows"))?;
    Ok((total * weight)?)
}

/// [`koleo_per_crop`] over the global batch of a data-parallel run on `c`'s ranks: each crop's rows are
/// gathered (rank `r`'s local row `k` at global position `r + N·k`, the positions its samples hold in the
/// global batch), and each rank averages the KoLeo of its own rows against all of them. The mean of the ranks'
/// losses is the one-process loss of the whole batch, and the gather's backward all-reduces the gradient of
/// the gathered rows, so the averaged gradients are the one-process gradients too (up to fp32 rounding). At
/// world size 1 it is [`koleo_per_crop`]. Every rank must call it at the same point of its step.
pub fn koleo_per_crop_over_ranks(
    features: &Tensor,
    n_crops: usize,
    weight: f64,
    c: &Arc<dyn Collective>,
) -> Result<Tensor> {
    let (r, n) = (c.rank(), c.world_size());
    if n == 1 {
        return koleo_per_crop(features, n_crops, weight);
    }
    sum_over_crops(features, n_crops, weight, |x| {
        let own: Vec<u32> = (0..x.dim(0)?).map(|k| (r + n * k) as u32).collect();
        koleo_loss_of(&gather_interleaved(x, c)?, &own)
    })
}

/// The rows of every rank in one `(N·b, D)` tensor, rank `r`'s row `k` at row `r + N·k`, differentiable:
/// zero-filled rows summed over the ranks (exact), whose backward sums the gradient over the ranks and hands
/// each rank its own rows' part. `x`: (b, D), the same b on every rank.
fn gather_interleaved(x: &Tensor, c: &Arc<dyn Collective>) -> Result<Tensor> {
    let (r, n) = (c.rank(), c.world_size());
    let (b, d) = x.dims2()?;
    let zeros = |k: usize| Tensor::zeros((b, k, d), x.dtype(), x.device());
    let mut parts = Vec::with_capacity(3);
    if r > 0 {
        parts.push(zeros(r)?);
    }
    parts.push(x.unsqueeze(1)?);
    if r + 1 < n {
        parts.push(zeros(n - r - 1)?);
    }
    let padded = Tensor::cat(&parts, 1)?.reshape((b * n, d))?;
    Ok(all_reduce_sum_with(c.clone(), &padded)?)
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

    /// One rank of an in-process group whose ranks are threads (sums in f64, exact for the zero-filled
    /// gathers and correctly rounded for two f32 terms).
    struct ThreadRank {
        rank: usize,
        world: usize,
        acc: Arc<(std::sync::Mutex<Vec<f64>>, std::sync::Barrier)>,
    }

    impl ThreadRank {
        fn sum(&self, buf: &mut [f64]) {
            let (acc, barrier) = &*self.acc;
            {
                let mut a = acc.lock().unwrap();
                if a.is_empty() {
                    a.resize(buf.len(), 0.0);
                }
                assert_eq!(
                    a.len(),
                    buf.len(),
                    "ranks reduce buffers of different lengths"
                );
                a.iter_mut().zip(buf.iter()).for_each(|(a, b)| *a += b);
            }
            barrier.wait();
            buf.copy_from_slice(&acc.lock().unwrap());
            barrier.wait();
            if self.rank == 0 {
                acc.lock().unwrap().clear();
            }
            barrier.wait();
        }
    }

    impl Collective for ThreadRank {
        fn name(&self) -> &'static str {
            "threads"
        }
        fn rank(&self) -> usize {
            self.rank
        }
        fn world_size(&self) -> usize {
            self.world
        }
        fn local_rank(&self) -> usize {
            self.rank
        }
        fn local_size(&self) -> usize {
            self.world
        }
        fn all_reduce_sum_f32(&self, buf: &mut [f32]) -> Result<()> {
            let mut v: Vec<f64> = buf.iter().map(|&x| x as f64).collect();
            self.sum(&mut v);
            buf.iter_mut().zip(v).for_each(|(b, v)| *b = v as f32);
            Ok(())
        }
        fn all_reduce_sum_f64(&self, buf: &mut [f64]) -> Result<()> {
            self.sum(buf);
            Ok(())
        }
        fn broadcast_bytes(&self, _buf: &mut Vec<u8>, _root: usize) -> Result<()> {
            unimplemented!("not used by KoLeo")
        }
        fn barrier(&self) -> Result<()> {
            self.acc.1.wait();
            Ok(())
        }
        fn abort(&self, code: i32) -> ! {
            std::process::exit(code)
        }
    }

    #[test]
    fn over_ranks_is_the_one_process_loss_and_gradient() {
        // The global batch: 2 crops x 12 samples, D = 5; on 3 ranks each holds samples r, r + 3, ...
        let (crops, b, d, world) = (2usize, 12usize, 5usize, 3usize);
        let x = sample(crops * b, d, 17);
        let whole = candle_core::Var::new(x.clone(), &Device::Cpu).unwrap();
        let l1 = koleo_per_crop(whole.as_tensor(), crops, 0.1).unwrap();
        let g1 = l1
            .backward()
            .unwrap()
            .get(whole.as_tensor())
            .unwrap()
            .to_vec2::<f64>()
            .unwrap();
        let l1 = l1.to_scalar::<f64>().unwrap();
        let acc = Arc::new((
            std::sync::Mutex::new(Vec::new()),
            std::sync::Barrier::new(world),
        ));
        let per_rank: Vec<(f64, Vec<Vec<f64>>, f64)> = std::thread::scope(|s| {
            let hs: Vec<_> = (0..world)
                .map(|rank| {
                    let (x, acc) = (&x, acc.clone());
                    s.spawn(move || {
                        let c: Arc<dyn Collective> = Arc::new(ThreadRank { rank, world, acc });
                        // Crop-major local rows: crop c's samples r, r + N, ...
                        let local: Vec<Vec<f64>> = (0..crops)
                            .flat_map(|cr| (rank..b).step_by(world).map(move |p| cr * b + p))
                            .map(|i| x[i].clone())
                            .collect();
                        let v = candle_core::Var::new(local, &Device::Cpu).unwrap();
                        let l = koleo_per_crop_over_ranks(v.as_tensor(), crops, 0.1, &c).unwrap();
                        let g = l.backward().unwrap().get(v.as_tensor()).unwrap().clone();
                        // dinov2's per-rank KoLeo of the same rows, for contrast.
                        let own = koleo_per_crop(v.as_tensor(), crops, 0.1).unwrap();
                        (
                            l.to_scalar::<f64>().unwrap(),
                            g.to_vec2::<f64>().unwrap(),
                            own.to_scalar::<f64>().unwrap(),
                        )
                    })
                })
                .collect();
            hs.into_iter().map(|h| h.join().unwrap()).collect()
        });
        // The mean of the ranks' losses is the one-process loss.
        let mean = per_rank.iter().map(|(l, _, _)| l).sum::<f64>() / world as f64;
        assert!((mean - l1).abs() < 1e-12 * l1.abs(), "{mean} vs {l1}");
        // Rank r's gradient of its row k, averaged over the ranks as the trainer averages, is the
        // one-process gradient of the sample it holds.
        let local_b = b / world;
        for (rank, (_, g, _)) in per_rank.iter().enumerate() {
            for cr in 0..crops {
                for k in 0..local_b {
                    let whole_row = &g1[cr * b + rank + world * k];
                    for (j, (&a, &e)) in g[cr * local_b + k].iter().zip(whole_row).enumerate() {
                        let a = a / world as f64;
                        assert!(
                            (a - e).abs() < 1e-12 * (1.0 + e.abs()),
                            "rank {rank} crop {cr} row {k} [{j}]: {a} vs {e}"
                        );
                    }
                }
            }
        }
        // The per-rank KoLeo (neighbours within 4 samples, not 12) is another loss: the test tells them apart.
        let own = per_rank.iter().map(|(_, _, o)| o).sum::<f64>() / world as f64;
        assert!((own - l1).abs() > 1e-3 * l1.abs(), "{own} vs {l1}");
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
