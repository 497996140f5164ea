//! The parallel multi-crop loader and the sequential evaluation batcher.
//!
//! `MultiCropLoader` yields `MultiCropBatch`es: crop-major tensors (`crops[c]` is `(B, 3, h_c, w_c)`, global crops
//! first) ready for the multi-crop wrapper. Each epoch visits a permutation of the dataset that depends only on
//! `(seed, epoch)` (like `DistributedSampler(shuffle=True)` with `set_epoch`), with `drop_last`, so
//! `niter_per_epoch = floor(N / B)`. Decoding and augmentation run on the loader's own rayon pool of
//! `num_workers` threads (never the global pool, which candle's matmuls use); a producer thread fills a bounded
//! queue of `prefetch` batches, so augmentation overlaps the training step and memory stays bounded.
//!
//! Determinism: the views of sample `i` in epoch `e` are drawn from an RNG seeded by `(seed, e, i)` only, so
//! batches do not depend on the number of threads or on batch order, and an epoch can start at any iteration
//! (exact resume). A sample whose image cannot be read is skipped with a warning naming its source and counted
//! ([`Epoch::skipped`]); its slot is filled with the next readable sample in dataset order (`i+1, i+2, ...`),
//! whose views are drawn from the slot's own RNG `(seed, e, i)`.

use std::panic::AssertUnwindSafe;
use std::sync::atomic::{AtomicU8, AtomicUsize, Ordering};
use std::sync::mpsc::{sync_channel, Receiver};
use std::sync::Arc;
use std::thread::JoinHandle;

use candle_core::{Device, Tensor};
use image::RgbImage;
use rand::{RngCore, SeedableRng};
use rand_chacha::ChaCha8Rng;
use rayon::prelude::*;

use crate::dataset::Dataset;
use crate::error::{Error, Result};
use crate::view::{Transform, View};

/// How many following samples are tried in place of an unreadable one before giving up with an error.
pub const MAX_SUBSTITUTE_TRIES: usize = 64;

/// Loader settings.
#[derive(Debug, Clone)]
pub struct LoaderConfig {
    /// Images per batch (per-GPU `batch_size_per_gpu` in the official code). Default 64.
    pub batch_size: usize,
    /// Threads of the loader's own pool that decode and augment. Default 2 (official `num_workers` 10).
    pub num_workers: usize,
    /// Finished batches queued ahead of the consumer (0 = hand over directly). Default 2.
    pub prefetch: usize,
    /// Seed of the shuffle and of the augmentation RNGs. Default 0.
    pub seed: u64,
    /// Shuffle each epoch (from `(seed, epoch)`). Default true.
    pub shuffle: bool,
    /// Drop the last incomplete batch. Default true (as the official code).
    pub drop_last: bool,
    /// This process's rank in a data-parallel run. Default 0.
    pub rank: usize,
    /// Ranks of the data-parallel run (`DistributedSampler`'s `num_replicas`); `batch_size` is per rank.
    /// Default 1.
    pub world_size: usize,
}

impl Default for LoaderConfig {
    fn default() -> Self {
        Self {
            batch_size: 64,
            num_workers: 2,
            prefetch: 2,
            seed: 0,
            shuffle: true,
            drop_last: true,
            rank: 0,
            world_size: 1,
        }
    }
}

/// The dataset indices of rank `rank`'s batch `it`: `DistributedSampler` semantics over the global batch of
/// `b * world` positions `[it * b * world, (it + 1) * b * world)` of the epoch's `order`, rank `r` taking
/// positions `r, r + world, ...` of it. The union over the ranks is the one-rank batch `it` of size
/// `b * world`; local row `j` holds global-batch position `r + world * j` ([`global_positions`]).
pub fn rank_slots(order: &[usize], it: usize, b: usize, rank: usize, world: usize) -> Vec<usize> {
    let start = it * b * world;
    (0..b)
        .map(|j| start + rank + world * j)
        .take_while(|&p| p < order.len())
        .map(|p| order[p])
        .collect()
}

/// The global-batch positions of the `b` local rows of rank `rank` (`rank + world * j`).
pub fn global_positions(rank: usize, world: usize, b: usize) -> Vec<u64> {
    (0..b).map(|j| (rank + world * j) as u64).collect()
}

/// One training batch: `2 + L` crop tensors, crop-major.
#[derive(Debug, Clone)]
pub struct MultiCropBatch {
    /// `crops[c]` has shape `(B, 3, h_c, w_c)`: global crops first, then local crops.
    pub crops: Vec<Tensor>,
    /// The dataset index of each row (the substitute's index where a sample was skipped; with an
    /// [`EvalBatcher`] unreadable samples have no row).
    pub indices: Vec<usize>,
    /// The label of each row, when the dataset is labelled.
    pub labels: Option<Vec<usize>>,
    /// The epoch this batch belongs to.
    pub epoch: u64,
    /// The iteration within the epoch (0-based).
    pub iteration: usize,
    /// Rows of this batch whose sample could not be read (each holds the next readable sample instead).
    pub skipped: usize,
}

/// SplitMix64 finaliser.
fn mix64(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// A ChaCha8 RNG seeded from a hash of `(domain, seed, epoch, index)` (the shuffle's own stream).
fn keyed_rng(domain: u64, seed: u64, epoch: u64, index: u64) -> ChaCha8Rng {
    let mut h = mix64(domain);
    let mut key = [0u8; 32];
    for (k, v) in [seed, epoch, index, domain].into_iter().enumerate() {
        h = mix64(h ^ mix64(v.wrapping_add(k as u64)));
        key[k * 8..(k + 1) * 8].copy_from_slice(&h.to_le_bytes());
    }
    ChaCha8Rng::from_seed(key)
}

/// The RNG of sample `index` in `epoch`: [`crate::augment::sample_rng`], the one source of per-sample randomness.
pub fn sample_rng(seed: u64, epoch: u64, index: usize) -> ChaCha8Rng {
    crate::augment::sample_rng(seed, epoch, index as u64)
}

/// Uniform integer in `[0, n)` (Lemire's unbiased multiply-shift), stable across `rand` versions.
fn below(rng: &mut ChaCha8Rng, n: u64) -> u64 {
    let mut m = (rng.next_u64() as u128) * (n as u128);
    if (m as u64) < n {
        let t = n.wrapping_neg() % n;
        while (m as u64) < t {
            m = (rng.next_u64() as u128) * (n as u128);
        }
    }
    (m >> 64) as u64
}

/// The sample order of `epoch` for a dataset of `n` samples: a Fisher-Yates permutation that depends only on
/// `(seed, epoch)`.
pub fn epoch_permutation(n: usize, seed: u64, epoch: u64) -> Vec<usize> {
    let mut perm: Vec<usize> = (0..n).collect();
    let mut rng = keyed_rng(0x5045_524d_5554_4521, seed, epoch, 0);
    for i in (1..n).rev() {
        let j = below(&mut rng, i as u64 + 1) as usize;
        perm.swap(i, j);
    }
    perm
}

const UNKNOWN: u8 = 0;
const BAD: u8 = 2;

/// State shared by the loader and its epochs.
struct Shared {
    dataset: Arc<dyn Dataset>,
    transform: Arc<dyn Transform>,
    pool: rayon::ThreadPool,
    device: Device,
    /// Per-sample decode state: known-bad samples are not decoded (nor warned about) again.
    state: Vec<AtomicU8>,
    /// Whether an unreadable sample's slot takes the next readable sample (training) or is left out of its
    /// batch ([`EvalBatcher`]: an evaluation must not count an image twice, nor give a file another's row).
    substitute: bool,
}

/// One processed slot of a batch.
struct Sample {
    index: usize,
    views: Vec<View>,
    skipped: bool,
}

impl Shared {
    fn try_get(&self, j: usize) -> Option<RgbImage> {
        if self.state[j].load(Ordering::Relaxed) == BAD {
            return None;
        }
        match self.dataset.get(j) {
            Ok(img) => Some(img),
            Err(e) => {
                if self.state[j].swap(BAD, Ordering::Relaxed) != BAD {
                    tracing::warn!(
                        "skipping unreadable sample {j} ({}): {e}",
                        self.dataset.source(j)
                    );
                }
                None
            }
        }
    }

    /// Decode (or substitute) and transform the sample at slot `i`; `None` for an unreadable one that is left
    /// out (see `substitute`).
    fn process(&self, i: usize, seed: u64, epoch: u64) -> Result<Option<Sample>> {
        let n = self.dataset.len();
        let mut rng = sample_rng(seed, epoch, i);
        if !self.substitute {
            return Ok(self.try_get(i).map(|img| Sample {
                index: i,
                views: self.transform.views(&img, &mut rng),
                skipped: false,
            }));
        }
        for t in 0..MAX_SUBSTITUTE_TRIES.min(n) {
            let j = (i + t) % n;
            if let Some(img) = self.try_get(j) {
                let views = self.transform.views(&img, &mut rng);
                return Ok(Some(Sample {
                    index: j,
                    views,
                    skipped: t > 0,
                }));
            }
        }
        Err(Error::Loader(format!(
            "sample {i} ({}) and the {} samples after it are all unreadable",
            self.dataset.source(i),
            MAX_SUBSTITUTE_TRIES.min(n) - 1
        )))
    }

    /// Build the batch of `slots` (dataset indices) on the pool. Without `substitute`, a batch whose samples are
    /// all unreadable has no crops and no rows.
    fn batch(
        &self,
        slots: &[usize],
        seed: u64,
        epoch: u64,
        iteration: usize,
        skipped: &AtomicUsize,
    ) -> Result<MultiCropBatch> {
        let samples: Vec<Result<Option<Sample>>> = self.pool.install(|| {
            slots
                .par_iter()
                .map(|&i| self.process(i, seed, epoch))
                .collect()
        });
        let samples: Vec<Option<Sample>> = samples.into_iter().collect::<Result<_>>()?;
        let left_out = samples.iter().filter(|s| s.is_none()).count();
        let samples: Vec<Sample> = samples.into_iter().flatten().collect();
        let n_skipped = left_out + samples.iter().filter(|s| s.skipped).count();
        skipped.fetch_add(n_skipped, Ordering::Relaxed);
        let nv = self.transform.num_views();
        let b = samples.len();
        let mut crops = Vec::with_capacity(nv);
        for c in (0..nv).take_while(|_| b > 0) {
            let first = samples[0].views.get(c).ok_or_else(|| {
                Error::Loader(format!(
                    "the transform returned {} views, num_views() says {nv}",
                    samples[0].views.len()
                ))
            })?;
            let (ch, h, w) = (first.channels, first.height, first.width);
            let mut data = Vec::with_capacity(b * ch * h * w);
            for s in &samples {
                let v = s.views.get(c).ok_or_else(|| {
                    Error::Loader(format!(
                        "the transform returned {} views, num_views() says {nv}",
                        s.views.len()
                    ))
                })?;
                if (v.channels, v.height, v.width) != (ch, h, w) || v.data.len() != ch * h * w {
                    return Err(Error::Loader(format!(
                        "view {c} of sample {} is {}x{}x{} with {} values, other samples' view {c} is {ch}x{h}x{w}",
                        s.index,
                        v.channels,
                        v.height,
                        v.width,
                        v.data.len()
                    )));
                }
                data.extend_from_slice(&v.data);
            }
            crops.push(Tensor::from_vec(data, (b, ch, h, w), &self.device)?);
        }
        let indices: Vec<usize> = samples.iter().map(|s| s.index).collect();
        let labels: Option<Vec<usize>> = indices.iter().map(|&j| self.dataset.label(j)).collect();
        Ok(MultiCropBatch {
            crops,
            indices,
            labels,
            epoch,
            iteration,
            skipped: n_skipped,
        })
    }
}

/// The parallel multi-crop loader. Cheap to keep for the whole run; each [`MultiCropLoader::epoch`] starts a
/// producer thread that stops when the epoch ends or is dropped.
pub struct MultiCropLoader {
    shared: Arc<Shared>,
    cfg: LoaderConfig,
}

impl MultiCropLoader {
    /// A loader over `dataset` applying `transform`, building tensors on the CPU.
    pub fn new(
        dataset: Arc<dyn Dataset>,
        transform: Arc<dyn Transform>,
        cfg: LoaderConfig,
    ) -> Result<Self> {
        Self::with_device(dataset, transform, cfg, Device::Cpu)
    }

    /// As [`MultiCropLoader::new`], with batch tensors created on `device`.
    pub fn with_device(
        dataset: Arc<dyn Dataset>,
        transform: Arc<dyn Transform>,
        cfg: LoaderConfig,
        device: Device,
    ) -> Result<Self> {
        Self::build(dataset, transform, cfg, device, true)
    }

    /// The loader; `substitute`: see `Shared::substitute`.
    fn build(
        dataset: Arc<dyn Dataset>,
        transform: Arc<dyn Transform>,
        cfg: LoaderConfig,
        device: Device,
        substitute: bool,
    ) -> Result<Self> {
        if cfg.batch_size == 0 {
            return Err(Error::InvalidArgument(
                "batch_size must be at least 1".into(),
            ));
        }
        if dataset.is_empty() {
            return Err(Error::InvalidArgument(format!(
                "dataset '{}' is empty",
                dataset.name()
            )));
        }
        if transform.num_views() == 0 {
            return Err(Error::InvalidArgument(
                "the transform produces no views".into(),
            ));
        }
        if cfg.world_size == 0 || cfg.rank >= cfg.world_size {
            return Err(Error::InvalidArgument(format!(
                "rank {} is not in a world of {}",
                cfg.rank, cfg.world_size
            )));
        }
        if cfg.drop_last && dataset.len() < cfg.batch_size * cfg.world_size {
            return Err(Error::InvalidArgument(format!(
                "dataset '{}' has {} samples, fewer than one batch of {} with drop_last",
                dataset.name(),
                dataset.len(),
                cfg.batch_size
            )));
        }
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(cfg.num_workers.max(1))
            .thread_name(|i| format!("dino-data-{i}"))
            .build()
            .map_err(|e| {
                Error::Loader(format!(
                    "cannot build a pool of {} threads: {e}",
                    cfg.num_workers
                ))
            })?;
        let state = (0..dataset.len()).map(|_| AtomicU8::new(UNKNOWN)).collect();
        Ok(Self {
            shared: Arc::new(Shared {
                dataset,
                transform,
                pool,
                device,
                state,
                substitute,
            }),
            cfg,
        })
    }

    /// The settings.
    pub fn config(&self) -> &LoaderConfig {
        &self.cfg
    }

    /// The dataset.
    pub fn dataset(&self) -> &Arc<dyn Dataset> {
        &self.shared.dataset
    }

    /// Batches per epoch: `floor(N / B)` with `drop_last`, `ceil(N / B)` without, `B` the global batch
    /// (`batch_size * world_size`).
    pub fn niter_per_epoch(&self) -> usize {
        let n = self.shared.dataset.len();
        let b = self.cfg.batch_size * self.cfg.world_size;
        if self.cfg.drop_last {
            n / b
        } else {
            n.div_ceil(b)
        }
    }

    /// The sample order of `epoch` (identity when `shuffle` is off).
    pub fn order(&self, epoch: u64) -> Vec<usize> {
        let n = self.shared.dataset.len();
        if self.cfg.shuffle {
            epoch_permutation(n, self.cfg.seed, epoch)
        } else {
            (0..n).collect()
        }
    }

    /// Dataset indices found unreadable so far (over all epochs), sorted.
    pub fn bad_indices(&self) -> Vec<usize> {
        (0..self.shared.state.len())
            .filter(|&i| self.shared.state[i].load(Ordering::Relaxed) == BAD)
            .collect()
    }

    /// Build batch `iteration` of `epoch` on the calling thread's behalf (no prefetch).
    pub fn batch(&self, epoch: u64, iteration: usize) -> Result<MultiCropBatch> {
        if iteration >= self.niter_per_epoch() {
            return Err(Error::InvalidArgument(format!(
                "iteration {iteration} past the end of an epoch of {} iterations",
                self.niter_per_epoch()
            )));
        }
        let order = self.order(epoch);
        let (b, r, w) = (self.cfg.batch_size, self.cfg.rank, self.cfg.world_size);
        let slots = rank_slots(&order, iteration, b, r, w);
        self.shared.batch(
            &slots,
            self.cfg.seed,
            epoch,
            iteration,
            &AtomicUsize::new(0),
        )
    }

    /// Iterate over all batches of `epoch`.
    pub fn epoch(&self, epoch: u64) -> Epoch {
        self.epoch_from(epoch, 0)
    }

    /// Iterate over the batches of `epoch` from iteration `start` on (exact resume mid-epoch): the batches are
    /// those a full epoch yields from `start`.
    pub fn epoch_from(&self, epoch: u64, start: usize) -> Epoch {
        let niter = self.niter_per_epoch();
        let start = start.min(niter);
        let order = self.order(epoch);
        let (b, rank, world) = (self.cfg.batch_size, self.cfg.rank, self.cfg.world_size);
        let (tx, rx) = sync_channel::<Result<MultiCropBatch>>(self.cfg.prefetch);
        let skipped = Arc::new(AtomicUsize::new(0));
        let produced = Arc::new(AtomicUsize::new(0));
        let shared = Arc::clone(&self.shared);
        let seed = self.cfg.seed;
        let (sk, pr) = (Arc::clone(&skipped), Arc::clone(&produced));
        let producer = std::thread::Builder::new()
            .name(format!("dino-data-epoch-{epoch}"))
            .spawn(move || {
                for it in start..niter {
                    let slots = rank_slots(&order, it, b, rank, world);
                    let res = std::panic::catch_unwind(AssertUnwindSafe(|| {
                        shared.batch(&slots, seed, epoch, it, &sk)
                    }))
                    .unwrap_or_else(|p| {
                        let msg = p
                            .downcast_ref::<String>()
                            .cloned()
                            .or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string()))
                            .unwrap_or_else(|| "unknown panic".into());
                        Err(Error::Loader(format!(
                            "epoch {epoch} iteration {it}: a worker panicked: {msg}"
                        )))
                    });
                    let failed = res.is_err();
                    pr.fetch_add(1, Ordering::Relaxed);
                    if tx.send(res).is_err() || failed {
                        return;
                    }
                }
                let n = sk.load(Ordering::Relaxed);
                if n > 0 {
                    tracing::warn!(
                        "epoch {epoch}: skipped {n} unreadable samples of '{}' ({})",
                        shared.dataset.name(),
                        if shared.substitute {
                            "substituted by the next readable ones"
                        } else {
                            "left out"
                        }
                    );
                }
            });
        let (rx, producer, error) = match producer {
            Ok(h) => (Some(rx), Some(h), None),
            Err(e) => (
                None,
                None,
                Some(Error::Loader(format!(
                    "cannot spawn the producer thread: {e}"
                ))),
            ),
        };
        Epoch {
            rx,
            producer,
            skipped,
            produced,
            next: start,
            end: niter,
            error,
        }
    }
}

/// The batches of one epoch, produced in the background. Dropping it stops the producer.
pub struct Epoch {
    rx: Option<Receiver<Result<MultiCropBatch>>>,
    producer: Option<JoinHandle<()>>,
    skipped: Arc<AtomicUsize>,
    produced: Arc<AtomicUsize>,
    next: usize,
    end: usize,
    error: Option<Error>,
}

impl Epoch {
    /// Samples skipped so far in this epoch because their image could not be read (final once the iterator
    /// is exhausted).
    pub fn skipped(&self) -> usize {
        self.skipped.load(Ordering::Relaxed)
    }

    /// Batches built so far by the producer (consumed or waiting in the queue).
    pub fn produced(&self) -> usize {
        self.produced.load(Ordering::Relaxed)
    }

    /// Batches still to be yielded.
    pub fn remaining(&self) -> usize {
        self.end - self.next
    }

    fn finish(&mut self) {
        self.rx = None;
        if let Some(h) = self.producer.take() {
            let _ = h.join();
        }
    }
}

impl Iterator for Epoch {
    type Item = Result<MultiCropBatch>;

    fn next(&mut self) -> Option<Self::Item> {
        if let Some(e) = self.error.take() {
            self.next = self.end;
            return Some(Err(e));
        }
        if self.next >= self.end {
            self.finish();
            return None;
        }
        let got = self.rx.as_ref().map(|rx| rx.recv());
        match got {
            Some(Ok(Ok(batch))) => {
                self.next += 1;
                if self.next >= self.end {
                    self.finish();
                }
                Some(Ok(batch))
            }
            Some(Ok(Err(e))) => {
                self.next = self.end;
                self.finish();
                Some(Err(e))
            }
            Some(Err(_)) | None => {
                let it = self.next;
                self.next = self.end;
                self.finish();
                Some(Err(Error::Loader(format!(
                    "the producer stopped before iteration {it}"
                ))))
            }
        }
    }

    fn size_hint(&self) -> (usize, Option<usize>) {
        let r = self.remaining();
        (r, Some(r))
    }
}

impl Drop for Epoch {
    fn drop(&mut self) {
        self.finish();
    }
}

/// One evaluation batch. Unreadable samples are left out of it (an evaluation must not count another
/// image twice, nor give a file another file's features), so it may hold fewer rows than the batch size.
#[derive(Debug, Clone)]
pub struct EvalBatch {
    /// `(B, 3, h, w)` images through the evaluation transform.
    pub images: Tensor,
    /// Dataset index of each row, increasing.
    pub indices: Vec<usize>,
    /// Label of each row, when the dataset is labelled.
    pub labels: Option<Vec<usize>>,
}

/// Sequential batches of a dataset through a one-view transform, in dataset order, the last batch kept
/// (for k-NN banks and feature extraction), unreadable samples left out (warned about, each by its source,
/// and counted as in training). Decoding runs on the loader's own pool.
pub struct EvalBatcher {
    loader: MultiCropLoader,
}

impl EvalBatcher {
    /// Batches of `batch_size` from `dataset` through `transform` (which must return exactly one view),
    /// decoded on `num_workers` threads.
    pub fn new(
        dataset: Arc<dyn Dataset>,
        transform: Arc<dyn Transform>,
        batch_size: usize,
        num_workers: usize,
    ) -> Result<Self> {
        if transform.num_views() != 1 {
            return Err(Error::InvalidArgument(format!(
                "the evaluation transform must return one view, it returns {}",
                transform.num_views()
            )));
        }
        let cfg = LoaderConfig {
            batch_size,
            num_workers,
            prefetch: 2,
            seed: 0,
            shuffle: false,
            drop_last: false,
            ..LoaderConfig::default()
        };
        Ok(Self {
            loader: MultiCropLoader::build(dataset, transform, cfg, Device::Cpu, false)?,
        })
    }

    /// Number of batches: `ceil(N / B)`.
    pub fn len(&self) -> usize {
        self.loader.niter_per_epoch()
    }

    /// Whether there are no batches.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Iterate over all batches in dataset order. A batch whose samples are all unreadable is not yielded.
    pub fn iter(&self) -> impl Iterator<Item = Result<EvalBatch>> + '_ {
        self.loader.epoch(0).filter_map(|r| match r {
            Ok(b) if b.indices.is_empty() => None,
            Ok(mut b) => Some(Ok(EvalBatch {
                images: b.crops.swap_remove(0),
                indices: b.indices,
                labels: b.labels,
            })),
            Err(e) => Some(Err(e)),
        })
    }
}
