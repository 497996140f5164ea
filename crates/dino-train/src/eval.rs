//! Evaluation of a backbone: feature extraction through the evaluation transform, the weighted k-NN of
//! eval_knn.py (l2-normalised features, dino_core::knn_classifier) and the linear probe of eval_linear.py
//! (frozen backbone, the CLS tokens of the last `n_last_blocks` blocks, optionally interleaved with the
//! average-pooled patch tokens, a linear layer initialised N(0, 0.01), SGD momentum 0.9 without weight decay,
//! lr = lr * batch / 256 with a per-epoch cosine schedule to 0, best top-1 over the epochs).
//!
//! CPU budget note: the official linear protocol re-extracts features of RandomResizedCrop+flip views every
//! epoch; [`linear_probe`] trains on features extracted once through the evaluation transform (cached), which
//! is what makes a 100-epoch probe affordable on a CPU. Everything else follows the official protocol.

use std::sync::Arc;

use candle_core::{DType, Device, Tensor, D};
use candle_nn::VarMap;
use dino_core::{knn_classifier, l2_normalize, KnnResult, Optimizer, ParamGroup, Sgd};
use dino_data::dataset::Dataset;
use dino_data::loader::EvalBatcher;
use dino_data::Transform;
use dino_models::vit::VisionTransformer;
use dino_models::Backbone;
use rand::seq::SliceRandom;
use rand::SeedableRng;

use crate::error::{Error, Result};

/// Features of a dataset's readable samples, in dataset order, with the labels when the dataset has them.
#[derive(Debug, Clone)]
pub struct Features {
    /// `(N, D)` f32.
    pub features: Tensor,
    /// One label per row, when labelled.
    pub labels: Option<Vec<usize>>,
    /// The dataset index of each row, increasing: all of `0..len` unless unreadable samples were left out.
    pub indices: Vec<usize>,
}

impl Features {
    /// Number of rows.
    pub fn len(&self) -> usize {
        self.features.dims().first().copied().unwrap_or(0)
    }
    /// Whether there are no rows.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Run `f` on every batch of `ds` through `transform` (dataset order), collecting `(B, D)` outputs (on the
/// CPU, whatever device `f` computes on). A stop request ([`crate::signals`]) ends it before the next batch
/// with [`Error::Interrupted`].
pub fn extract_with(
    ds: Arc<dyn Dataset>,
    transform: Arc<dyn Transform>,
    batch_size: usize,
    num_workers: usize,
    f: impl Fn(&Tensor) -> Result<Tensor>,
) -> Result<Features> {
    let batcher = EvalBatcher::new(ds.clone(), transform, batch_size, num_workers)?;
    let mut feats = Vec::with_capacity(batcher.len());
    let mut labels: Option<Vec<usize>> = Some(Vec::with_capacity(ds.len()));
    let mut indices = Vec::with_capacity(ds.len());
    for b in batcher.iter() {
        if let Some(signal) = crate::signals::stop_requested() {
            return Err(Error::Interrupted { signal });
        }
        let b = b?;
        indices.extend_from_slice(&b.indices);
        feats.push(f(&b.images)?.detach().to_device(&Device::Cpu)?);
        match (&mut labels, b.labels) {
            (Some(all), Some(l)) => all.extend(l),
            _ => labels = None,
        }
    }
    if feats.is_empty() {
        return Err(Error::NoReadableImage {
            dataset: ds.name().to_string(),
        });
    }
    let features = Tensor::cat(&feats, 0)?.to_dtype(DType::F32)?;
    Ok(Features {
        features,
        labels,
        indices,
    })
}

/// Backbone features (`forward_features` in evaluation mode: the CLS token after the final norm, or the
/// pooled ResNet feature) of every image of `ds` through `transform`.
pub fn extract_features(
    backbone: &dyn Backbone,
    ds: Arc<dyn Dataset>,
    transform: Arc<dyn Transform>,
    batch_size: usize,
    num_workers: usize,
) -> Result<Features> {
    let dev = backbone.device();
    extract_with(ds, transform, batch_size, num_workers, |x| {
        let x = x.to_device(&dev)?;
        Ok(dino_models::no_grad(|| {
            backbone.forward_features(&x, false)
        })?)
    })
}

/// `extract` run data-parallel over the ranks of the installed collective (`dino_core::collective`), as the
/// official `eval_knn` shards its sampler and all-gathers: rank `r` of `N` computes the rows of samples
/// `r, r + N, ...` of `ds` and every rank gets the rows of all readable samples in dataset order, with `ds`'s
/// labels and their indices.
/// Each row comes from one rank only, so the gather (an all-reduce of zero-filled rows) is exact; a row
/// may differ from a one-rank extraction by the rounding of another batch composition. At world 1 it is
/// `extract(ds)`. When `extract` stops with [`Error::Interrupted`] on any rank, every rank returns that
/// error (after the others finish their share), so the ranks stay in step.
pub fn extract_over_ranks(
    ds: Arc<dyn Dataset>,
    extract: impl FnOnce(Arc<dyn Dataset>) -> Result<Features>,
) -> Result<Features> {
    let coll = dino_core::collective::current();
    let (rank, world) = (coll.rank(), coll.world_size());
    if world == 1 {
        return extract(ds);
    }
    let n = ds.len();
    let mine: Vec<usize> = (rank..n).step_by(world).collect();
    // This rank's rows, each with its index into `ds` (a row per readable sample of its share).
    let part = if mine.is_empty() {
        Ok(None)
    } else {
        let sub: Arc<dyn Dataset> =
            Arc::new(dino_data::dataset::Subset::new(ds.clone(), mine.clone())?);
        match extract(sub) {
            Ok(f) => {
                let at: Vec<usize> = f.indices.iter().map(|&k| mine[k]).collect();
                Ok(Some((f.features.to_vec2::<f32>()?, at)))
            }
            // Every image of this rank's share is unreadable: no rows here, the other ranks may have some.
            Err(Error::NoReadableImage { .. }) => Ok(None),
            Err(Error::Interrupted { signal }) => Err(signal),
            Err(e) => return Err(e),
        }
    };
    // The width, from the ranks that have rows (with fewer samples than ranks, some have none), and whether
    // a stop request cut any rank's share short: then every rank skips the gather and reports it.
    let mut width = match &part {
        Ok(Some((rows, _))) => [rows.first().map_or(0, Vec::len) as f64, 1.0, 0.0, 0.0],
        Ok(None) => [0.0; 4],
        Err(signal) => [0.0, 0.0, 1.0, f64::from(*signal)],
    };
    coll.all_reduce_sum_f64(&mut width)?;
    if width[2] > 0.0 {
        let signal = match part {
            Err(s) => s,
            _ => (width[3] / width[2]).round() as i32,
        };
        return Err(Error::Interrupted { signal });
    }
    let part = part.ok().flatten();
    let d = (width[0] / width[1].max(1.0)).round() as usize;
    // Rows `0..n` of the features, then one flag per sample: whether a rank extracted it (unreadable samples
    // are left out, as at world 1).
    let mut all = vec![0f32; n * d + n];
    for (row, &i) in part.iter().flat_map(|(rows, at)| rows.iter().zip(at)) {
        if row.len() != d {
            return Err(Error::Msg(format!(
                "rank {rank}: features of width {} where the ranks average {d}",
                row.len()
            )));
        }
        all[i * d..(i + 1) * d].copy_from_slice(row);
        all[n * d + i] = 1.0;
    }
    coll.all_reduce_sum_f32(&mut all)?;
    let indices: Vec<usize> = (0..n).filter(|&i| all[n * d + i] > 0.5).collect();
    if indices.is_empty() {
        // On every rank alike, as one process would say it.
        return Err(Error::NoReadableImage {
            dataset: ds.name().to_string(),
        });
    }
    let mut rows = Vec::with_capacity(indices.len() * d);
    for &i in &indices {
        rows.extend_from_slice(&all[i * d..(i + 1) * d]);
    }
    let labels: Option<Vec<usize>> = indices.iter().map(|&i| ds.label(i)).collect();
    Ok(Features {
        features: Tensor::from_vec(rows, (indices.len(), d), &Device::Cpu)?,
        labels,
        indices,
    })
}

/// Largest side of the raw-pixel baseline's images: larger evaluation crops are area-pooled to at most this
/// (28 px Fashion-MNIST and 32 px CIFAR are used as they are).
pub const PIXEL_SIDE: usize = 32;

/// The raw-pixel "features" of every image of `ds`: the evaluation transform's output with its
/// normalisation (`mean`, `std` per channel) undone, so values in [0, 1], area-pooled by the smallest
/// integer factor that brings the larger side to at most [`PIXEL_SIDE`], flattened channel-major,
/// `(N, 3·h·w)`. The baseline a trained backbone should beat under the same k-NN.
pub fn extract_pixels(
    ds: Arc<dyn Dataset>,
    transform: Arc<dyn Transform>,
    mean: [f32; 3],
    std: [f32; 3],
    batch_size: usize,
    num_workers: usize,
) -> Result<Features> {
    extract_with(ds, transform, batch_size, num_workers, |x| {
        let dev = x.device();
        let s = Tensor::from_vec(std.to_vec(), (1, 3, 1, 1), dev)?;
        let m = Tensor::from_vec(mean.to_vec(), (1, 3, 1, 1), dev)?;
        let mut px = x.broadcast_mul(&s)?.broadcast_add(&m)?;
        let side = px.dim(2)?.max(px.dim(3)?);
        if side > PIXEL_SIDE {
            px = px.avg_pool2d(side.div_ceil(PIXEL_SIDE))?;
        }
        Ok(px.flatten_from(1)?)
    })
}

/// The number of classes of labelled features: `max label + 1` over both sets.
pub fn num_classes_of(a: &Features, b: &Features) -> Result<usize> {
    let max = |f: &Features, what: &str| {
        f.labels
            .as_ref()
            .ok_or_else(|| {
                Error::Msg(format!(
                    "the {what} features have no labels: k-NN needs labelled data"
                ))
            })
            .map(|l| l.iter().copied().max().unwrap_or(0))
    };
    Ok(max(a, "train")?.max(max(b, "test")?) + 1)
}

fn labels_tensor(f: &Features, what: &str) -> Result<Tensor> {
    let l = f
        .labels
        .as_ref()
        .ok_or_else(|| Error::Msg(format!("the {what} features have no labels")))?;
    let v: Vec<u32> = l.iter().map(|&x| x as u32).collect();
    Ok(Tensor::from_vec(v, l.len(), f.features.device())?)
}

/// Weighted k-NN (eval_knn.py) of `test` against the bank `train`: both are l2-normalised here. `k` is capped
/// at the bank size.
pub fn knn_eval(train: &Features, test: &Features, k: usize, t: f64) -> Result<KnnResult> {
    let nc = num_classes_of(train, test)?;
    let k = k.min(train.len()).max(1);
    Ok(knn_classifier(
        &l2_normalize(&train.features)?,
        &labels_tensor(train, "train")?,
        &l2_normalize(&test.features)?,
        &labels_tensor(test, "test")?,
        k,
        t,
        nc,
    )?)
}

/// Features for the linear probe from a ViT: the CLS tokens of the last `n_last_blocks` blocks (each after
/// the final norm) concatenated, `(B, n·D)`; with `avgpool_patchtokens` (official: only with n = 1) the CLS
/// token and the mean of the last block's patch tokens interleaved, `(B, 2D)` = [cls0, avg0, cls1, avg1, ...].
pub fn linear_features(
    vit: &VisionTransformer,
    x: &Tensor,
    n_last_blocks: usize,
    avgpool: bool,
) -> Result<Tensor> {
    if n_last_blocks == 0 {
        return Err(Error::config("n_last_blocks", 0, "must be positive"));
    }
    if avgpool && n_last_blocks != 1 {
        return Err(Error::config(
            "n_last_blocks",
            n_last_blocks,
            "avgpool_patchtokens needs n_last_blocks = 1 (as the official eval_linear.py)",
        ));
    }
    let layers = vit.get_intermediate_layers(x, n_last_blocks)?;
    let cls: Vec<Tensor> = layers
        .iter()
        .map(|l| l.narrow(1, 0, 1).and_then(|t| t.squeeze(1)))
        .collect::<candle_core::Result<_>>()?;
    let out = Tensor::cat(&cls, D::Minus1)?;
    if !avgpool {
        return Ok(out);
    }
    let last = layers
        .last()
        .ok_or_else(|| Error::Msg("no intermediate layer".into()))?;
    let t = last.dim(1)?;
    // Patch tokens follow the CLS token and any (dinov2) register tokens.
    let first = vit.config().num_prefix_tokens();
    let avg = last.narrow(1, first, t - first)?.mean(1)?;
    let b = out.dim(0)?;
    Ok(Tensor::stack(&[out, avg], D::Minus1)?.reshape((b, ()))?)
}

/// Settings of the linear probe (official eval_linear.py defaults).
#[derive(Debug, Clone, PartialEq)]
pub struct LinearProbeConfig {
    /// Training epochs. Default 100.
    pub epochs: usize,
    /// Base learning rate for a batch of 256 (scaled by batch_size / 256). Default 0.001.
    pub lr: f64,
    /// Batch size. Default 128.
    pub batch_size: usize,
    /// Concatenate the CLS tokens of this many last blocks. Default 4.
    pub n_last_blocks: usize,
    /// Interleave the average-pooled patch tokens (needs n_last_blocks = 1). Default false.
    pub avgpool_patchtokens: bool,
    /// Seed of the linear layer's initialisation and of the shuffling. Default 0.
    pub seed: u64,
}

impl Default for LinearProbeConfig {
    fn default() -> Self {
        Self {
            epochs: 100,
            lr: 0.001,
            batch_size: 128,
            n_last_blocks: 4,
            avgpool_patchtokens: false,
            seed: 0,
        }
    }
}

impl LinearProbeConfig {
    /// Refuse settings that cannot train: no epochs, empty batches, a learning rate that is not a positive
    /// number. Errors name the key.
    pub fn validate(&self) -> Result<()> {
        if self.epochs == 0 {
            return Err(Error::config("epochs", 0, "must be positive"));
        }
        if self.batch_size == 0 {
            return Err(Error::config("batch_size", 0, "must be positive"));
        }
        if !(self.lr.is_finite() && self.lr > 0.0) {
            return Err(Error::config("lr", self.lr, "must be a positive number"));
        }
        if self.n_last_blocks == 0 {
            return Err(Error::config("n_last_blocks", 0, "must be positive"));
        }
        Ok(())
    }
}

/// The outcome of a linear probe.
#[derive(Debug, Clone, PartialEq)]
pub struct LinearProbeResult {
    /// Best validation top-1 (%) over the epochs (the official report).
    pub best_top1: f64,
    /// Top-5 (%) at the best epoch.
    pub best_top5: f64,
    /// Epoch (0-based) of the best top-1.
    pub best_epoch: usize,
    /// Validation top-1 (%) after every epoch.
    pub top1_per_epoch: Vec<f64>,
    /// Mean training cross-entropy of every epoch.
    pub train_loss_per_epoch: Vec<f64>,
}

fn topk_acc(logits: &Tensor, labels: &[usize]) -> Result<(usize, usize)> {
    let rows = logits.to_vec2::<f32>()?;
    let (mut c1, mut c5) = (0, 0);
    for (r, &y) in rows.iter().zip(labels) {
        let target = r[y];
        // rank = number of classes scoring strictly higher (ties broken towards the lower index)
        let rank = r
            .iter()
            .enumerate()
            .filter(|&(j, &v)| v > target || (v == target && j < y))
            .count();
        if rank == 0 {
            c1 += 1;
        }
        if rank < 5 {
            c5 += 1;
        }
    }
    Ok((c1, c5))
}

/// Train a linear classifier on frozen features `train` and report the best validation accuracy on `val`.
pub fn linear_probe(
    train: &Features,
    val: &Features,
    cfg: &LinearProbeConfig,
) -> Result<LinearProbeResult> {
    let nc = num_classes_of(train, val)?;
    let (n, d) = train.features.dims2()?;
    if val.features.dim(1)? != d {
        return Err(Error::Msg(format!(
            "linear probe: train features have {d} dims, validation features {}",
            val.features.dim(1)?
        )));
    }
    cfg.validate()?;
    let dev = train.features.device().clone();
    let ytrain = train.labels.clone().unwrap_or_default();
    let yval = val.labels.clone().unwrap_or_default();
    // LinearClassifier: weight N(0, 0.01^2), bias 0 (seeded).
    let varmap = VarMap::new();
    let vb = dino_models::init::seeded_var_builder(&varmap, cfg.seed, DType::F32, &dev);
    let w = vb.get_with_hints(
        (nc, d),
        "linear.weight",
        candle_nn::Init::Randn {
            mean: 0.0,
            stdev: 0.01,
        },
    )?;
    let b = vb.get_with_hints(nc, "linear.bias", candle_nn::Init::Const(0.0))?;
    let params = dino_core::sorted_vars(&varmap);
    let mut sgd = Sgd::new(vec![ParamGroup::new(params)], 0.9)?;
    let base_lr = cfg.lr * cfg.batch_size as f64 / 256.0;
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(cfg.seed);
    let mut order: Vec<usize> = (0..n).collect();
    let forward = |x: &Tensor| -> Result<Tensor> { Ok(x.matmul(&w.t()?)?.broadcast_add(&b)?) };
    let mut res = LinearProbeResult {
        best_top1: -1.0,
        best_top5: 0.0,
        best_epoch: 0,
        top1_per_epoch: Vec::new(),
        train_loss_per_epoch: Vec::new(),
    };
    for epoch in 0..cfg.epochs {
        // CosineAnnealingLR(T_max = epochs, eta_min = 0), stepped per epoch.
        let lr =
            0.5 * base_lr * (1.0 + (std::f64::consts::PI * epoch as f64 / cfg.epochs as f64).cos());
        sgd.set_lr(0, lr)?;
        order.shuffle(&mut rng);
        let mut loss_sum = 0.0;
        let mut batches = 0usize;
        for chunk in order.chunks(cfg.batch_size) {
            let idx = Tensor::from_vec(
                chunk.iter().map(|&i| i as u32).collect::<Vec<_>>(),
                chunk.len(),
                &dev,
            )?;
            let x = train.features.index_select(&idx, 0)?;
            let y = Tensor::from_vec(
                chunk.iter().map(|&i| ytrain[i] as u32).collect::<Vec<_>>(),
                chunk.len(),
                &dev,
            )?;
            let loss = candle_nn::loss::cross_entropy(&forward(&x)?, &y)?;
            loss_sum += loss.to_scalar::<f32>()? as f64;
            batches += 1;
            let grads = loss.backward()?;
            sgd.step(&grads)?;
        }
        res.train_loss_per_epoch
            .push(loss_sum / batches.max(1) as f64);
        let (mut c1, mut c5) = (0, 0);
        let nv = val.len();
        for start in (0..nv).step_by(1024) {
            let len = 1024.min(nv - start);
            let logits = forward(&val.features.narrow(0, start, len)?.detach())?;
            let (a, b5) = topk_acc(&logits, &yval[start..start + len])?;
            c1 += a;
            c5 += b5;
        }
        let top1 = 100.0 * c1 as f64 / nv.max(1) as f64;
        let top5 = 100.0 * c5 as f64 / nv.max(1) as f64;
        res.top1_per_epoch.push(top1);
        if top1 > res.best_top1 {
            res.best_top1 = top1;
            res.best_top5 = top5;
            res.best_epoch = epoch;
        }
    }
    Ok(res)
}

/// Features of `ds` for the linear probe from a ViT (see [`linear_features`]).
pub fn extract_linear_features(
    vit: &VisionTransformer,
    ds: Arc<dyn Dataset>,
    transform: Arc<dyn Transform>,
    batch_size: usize,
    num_workers: usize,
    n_last_blocks: usize,
    avgpool: bool,
) -> Result<Features> {
    let dev = vit.device().clone();
    extract_with(ds, transform, batch_size, num_workers, |x| {
        linear_features(vit, &x.to_device(&dev)?, n_last_blocks, avgpool)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Two well separated Gaussian clusters per class: the probe must learn them and k-NN must find them.
    fn clusters(n_per: usize, seed: u64) -> Features {
        use rand_distr::{Distribution, Normal};
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
        let nd = Normal::new(0.0f32, 0.3).unwrap();
        let centres = [
            [3.0f32, 0.0, 0.0, 1.0],
            [0.0, 3.0, 0.0, 1.0],
            [0.0, 0.0, 3.0, 1.0],
        ];
        let mut x = Vec::new();
        let mut y = Vec::new();
        for (c, centre) in centres.iter().enumerate() {
            for _ in 0..n_per {
                x.extend(centre.iter().map(|v| v + nd.sample(&mut rng)));
                y.push(c);
            }
        }
        Features {
            features: Tensor::from_vec(x, (3 * n_per, 4), &Device::Cpu).unwrap(),
            labels: Some(y),
            indices: (0..3 * n_per).collect(),
        }
    }

    #[test]
    fn knn_and_linear_probe_separate_clusters_and_chance_on_shuffled_labels() {
        let (train, val) = (clusters(40, 1), clusters(20, 2));
        let knn = knn_eval(&train, &val, 20, 0.07).unwrap();
        assert_eq!(knn.top1, 100.0);
        let cfg = LinearProbeConfig {
            epochs: 30,
            lr: 0.5,
            batch_size: 16,
            ..Default::default()
        };
        let r = linear_probe(&train, &val, &cfg).unwrap();
        assert!(r.best_top1 > 95.0, "{r:?}");
        assert!(r.train_loss_per_epoch.last().unwrap() < &r.train_loss_per_epoch[0]);
        // Labels unrelated to the features: the probe cannot exceed chance by much.
        let mut bad = train.clone();
        bad.labels = Some((0..train.len()).map(|i| (i * 7 + i / 3) % 3).collect());
        let r = linear_probe(&bad, &val, &cfg).unwrap();
        assert!(r.top1_per_epoch.last().unwrap() < &70.0, "{r:?}");
    }

    #[test]
    fn topk_counts_ties_towards_lower_index() {
        let logits = Tensor::new(&[[1f32, 3., 2.], [5., 5., 0.]], &Device::Cpu).unwrap();
        assert_eq!(topk_acc(&logits, &[1, 1]).unwrap(), (1, 2));
    }
}
