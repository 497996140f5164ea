//! The DINO training iteration in the official order (dino-spec §1.10) and the state it carries: student,
//! teacher (a copy of the student with its own storage), optimiser, DINO loss with its centre, and the lr /
//! weight-decay / momentum schedules indexed by the global iteration.
//!
//! One [`Trainer::step`]:
//! 1. `g = epoch * niter_per_ep + it`; lr (all groups) = `lr_schedule[g]`, wd (group 0) = `wd_schedule[g]`;
//! 2. the student's drop-path draws are keyed by `(seed, g)` and each row's crop and global-batch position
//!    (exact resume; the same masks on any number of ranks);
//! 3. teacher forward on the 2 global crops FIRST (output detached: no gradient reaches the teacher) and
//!    its targets, then student forward on all crops, the DINO loss and backward (with `student_passes`,
//!    forward, loss terms and backward per group of crops, the gradients added), then the centre update;
//!    with iBOT (`ibot_loss_weight > 0`) the student's global crops get patch masks drawn from `(seed, g)`
//!    for the whole global batch (so each rank's masks do not depend on the split), both networks' patch
//!    tokens at the masked positions go through the shared head, and the masked-patch loss is added;
//! 4. a non-finite loss stops with [`Error::NonFiniteLoss`] naming the epoch and iteration, before any update;
//! 5. under data parallelism the gradients are averaged over the ranks (a few large bucketed
//!    all-reduces, as DDP) and the loss value too; then per-parameter clipping (`clip_grad`), last-layer gradients dropped while
//!    `epoch < freeze_last_layer`, optimiser step (two groups, wd on group 0 only);
//! 6. teacher EMA with `momentum_schedule[g]`.

use std::collections::{BTreeMap, HashMap};

use candle_core::{DType, Device, Tensor, Var};
use dino_core::optim::{Lars, Sgd};
use dino_core::{
    cancel_gradients_last_layer, clip_gradients, cosine_scheduler, AdamW, CollapseMetrics,
    DinoLoss, DinoLossConfig, EmaTeacher, IbotPatchLoss, IbotPatchLossConfig, NamedVar, Optimizer,
    ParamGroup,
};
use dino_data::masking::{MaskingGenerator, PatchMasks};
use dino_models::params::is_regularized;
use dino_models::with_matmul_precision;
use rand::SeedableRng;

use crate::checkpoint::take_prefixed;
use crate::config::{OptimizerKind, StudentPasses, TrainConfig};
use crate::error::{Error, Result};
use crate::model::DinoNetwork;

/// The optimiser of the run.
#[derive(Debug)]
pub enum RunOptimizer {
    /// torch-exact AdamW (state checkpointed exactly).
    AdamW(AdamW),
    /// SGD with momentum 0.9.
    Sgd(Sgd),
    /// LARS.
    Lars(Lars),
}

impl RunOptimizer {
    fn as_dyn(&mut self) -> &mut dyn Optimizer {
        match self {
            Self::AdamW(o) => o,
            Self::Sgd(o) => o,
            Self::Lars(o) => o,
        }
    }

    fn as_dyn_ref(&self) -> &dyn Optimizer {
        match self {
            Self::AdamW(o) => o,
            Self::Sgd(o) => o,
            Self::Lars(o) => o,
        }
    }
}

/// What one iteration produced.
#[derive(Debug, Clone)]
pub struct StepStats {
    /// Epoch index.
    pub epoch: usize,
    /// Iteration within the epoch.
    pub iteration: usize,
    /// Global iteration.
    pub global_iteration: usize,
    /// The loss the step minimised (DINO, plus KoLeo and iBOT when enabled), mean over the ranks.
    pub loss: f64,
    /// The iBOT masked-patch loss (unweighted, mean over the ranks), when enabled.
    pub ibot_loss: Option<f64>,
    /// Learning rate used (both groups).
    pub lr: f64,
    /// Weight decay used (group 0).
    pub wd: f64,
    /// Teacher momentum used for the EMA after the step.
    pub momentum: f64,
    /// Teacher temperature of the epoch.
    pub teacher_temp: f64,
    /// Pre-clip gradient norm of every trainable parameter that had a gradient, by name (empty if
    /// `clip_grad` is 0).
    pub clip_norms: Vec<(String, f64)>,
    /// Number of parameters whose gradient reached the optimiser (after the last-layer freeze).
    pub params_with_grad: usize,
    /// Bytes of gradient this rank all-reduced in the step (0 on one rank).
    pub all_reduce_bytes: usize,
    /// Wall-clock seconds of each phase of this step.
    pub timings: StepTimings,
}

/// Wall-clock seconds of each phase of one training step (in execution order).
#[derive(Debug, Clone, Copy, Default, PartialEq, serde::Serialize)]
pub struct StepTimings {
    /// Teacher forward on the 2 global crops (backbone + head, no graph kept).
    pub teacher_forward: f64,
    /// Student forward on every crop (backbone + head).
    pub student_forward: f64,
    /// DINO loss forward (centering, sharpening, cross-entropy) and reading its value.
    pub loss: f64,
    /// Backward pass through loss, head and backbone.
    pub backward: f64,
    /// Waiting, after backward, for the slowest rank (the first collective of the gradient average); 0 on
    /// one rank.
    pub rank_wait: f64,
    /// Averaging the gradients over the ranks (packing, the bucketed all-reduces, unpacking), without
    /// `rank_wait`; 0 on one rank.
    pub all_reduce: f64,
    /// Gradient clipping and last-layer cancelling.
    pub clip: f64,
    /// Optimiser step.
    pub optimizer: f64,
    /// EMA update of the teacher.
    pub ema: f64,
}

impl StepTimings {
    /// Sum of the phases.
    pub fn total(&self) -> f64 {
        self.teacher_forward
            + self.student_forward
            + self.loss
            + self.backward
            + self.rank_wait
            + self.all_reduce
            + self.clip
            + self.optimizer
            + self.ema
    }
}

/// `(seed, global_iteration)` -> the drop-path seed of that iteration (SplitMix64).
pub fn drop_path_seed(seed: u64, global_iteration: usize) -> u64 {
    let mut z = seed ^ 0xd1b5_4a32_d192_ed03u64.wrapping_mul(global_iteration as u64 + 1);
    z = z.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// This rank's iBOT masks at global iteration `g`: drawn for the 2 global crops of every sample of the
/// global batch (crop-major, `2 · B · world` crops, from `(seed, g)`), then the rows of this rank's
/// samples taken, crop-major as its batch: the same masks whatever the number of ranks.
fn ibot_masks(
    cfg: &TrainConfig,
    g: usize,
    rank: usize,
    world: usize,
    crop: &Tensor,
) -> Result<PatchMasks> {
    let (b, _, h, w) = crop.dims4()?;
    let p = cfg.patch_size;
    let generator = MaskingGenerator::new(h / p, w / p);
    let global_b = b * world;
    let mut rng =
        rand_chacha::ChaCha8Rng::seed_from_u64(drop_path_seed(cfg.seed ^ IBOT_MASK_SALT, g));
    let r = cfg.ibot_mask_ratio_min_max;
    let all = PatchMasks::draw(
        &generator,
        2 * global_b,
        (r[0], r[1]),
        cfg.ibot_mask_sample_probability,
        &mut rng,
    );
    let pos = dino_data::loader::global_positions(rank, world, b);
    let rows: Vec<usize> = (0..2)
        .flat_map(|c| pos.iter().map(move |&q| c * global_b + q as usize))
        .collect();
    Ok(all.select(&rows))
}

/// One step's iBOT pieces shared by the teacher and the student pass over the global crops.
struct IbotStep {
    /// Flat indices of the masked patches in the `(2B, N)` grid, `(m)` u32.
    idx: Tensor,
    /// Each masked patch's weight, `(m)`.
    weights: Tensor,
    /// The masks `(2B, N)` u8.
    mask_t: Tensor,
    /// Global crops the masks were drawn for (2B).
    n_crops: usize,
    /// The teacher's targets for the masked patches, `(m, K)`.
    targets: Tensor,
}

/// `grads` with every gradient detached: a parameter's gradient can be the output of an op on the pass's
/// activations (a product with an activation), which would keep that pass's whole forward graph alive
/// until the optimiser step; detached, the graph goes when the pass's loss does. No copy.
fn detached(mut grads: candle_core::backprop::GradStore) -> candle_core::backprop::GradStore {
    let ids: Vec<_> = grads.get_ids().copied().collect();
    for id in ids {
        if let Some(g) = grads.get_id(id).map(Tensor::detach) {
            grads.insert_id(id, g);
        }
    }
    grads
}

/// The crops of each student pass (ranges into the crop list, in order, covering it once), for `passes`
/// already resolved ([`StudentPasses::resolve`]): one range for `all`, the multi-crop wrapper's resolution
/// groups for `resolution`, one crop each for `crop` (with iBOT the 2 global crops stay in one pass: their
/// masks and patch targets are drawn for both).
fn student_pass_ranges(
    passes: StudentPasses,
    crops: &[Tensor],
    ibot: bool,
) -> Result<Vec<std::ops::Range<usize>>> {
    let n = crops.len();
    Ok(match passes {
        StudentPasses::All | StudentPasses::Auto => std::iter::once(0..n).collect(),
        StudentPasses::Resolution => dino_models::multicrop::resolution_groups(crops)?,
        StudentPasses::Crop if ibot => std::iter::once(0..2.min(n))
            .chain((2..n).map(|c| c..c + 1))
            .collect(),
        StudentPasses::Crop => (0..n).map(|c| c..c + 1).collect(),
    })
}

/// Mixed into the seed of the iBOT masks, so that they are not drawn from drop path's stream.
const IBOT_MASK_SALT: u64 = 0x1b07_3a5c_0ffe_e001;

/// Gradient bucket size of [`average_gradients`] (f32 values): 25 MiB, DDP's default `bucket_cap_mb`.
pub const BUCKET_FLOATS: usize = 25 * 1024 * 1024 / 4;

/// Average the gradients of `params` over the ranks of `coll` in place (DDP's all-reduce, then division by
/// the world size): the gradients are packed in parameter order into buckets of [`BUCKET_FLOATS`] values,
/// each bucket one all-reduce. The ranks must agree on which parameters have a gradient (checked first, one
/// small all-reduce, where the ranks also meet after their backward passes). Returns the gradient bytes
/// all-reduced and the seconds of that first, small all-reduce (the wait for the slowest rank).
pub fn average_gradients(
    coll: &dyn dino_core::Collective,
    grads: &mut candle_core::backprop::GradStore,
    params: &[NamedVar],
) -> Result<(usize, f64)> {
    let world = coll.world_size();
    let mut present: Vec<f32> = params
        .iter()
        .map(|(_, v)| f32::from(u8::from(grads.get(v.as_tensor()).is_some())))
        .collect();
    let t_wait = std::time::Instant::now();
    coll.all_reduce_sum_f32(&mut present)?;
    let wait = t_wait.elapsed().as_secs_f64();
    if let Some((i, c)) = present
        .iter()
        .enumerate()
        .find(|(_, &c)| c != 0.0 && c as usize != world)
    {
        return Err(Error::Msg(format!(
            "ranks disagree on whether `{}` has a gradient ({c} of {world} ranks have one)",
            params[i].0
        )));
    }
    let with_grad: Vec<&NamedVar> = params
        .iter()
        .zip(&present)
        .filter(|(_, &c)| c > 0.0)
        .map(|(p, _)| p)
        .collect();
    let mut bytes = 0usize;
    let mut start = 0usize;
    while start < with_grad.len() {
        // One bucket: parameters start..end, at least one, at most BUCKET_FLOATS values unless one alone
        // is larger.
        let mut end = start;
        let mut len = 0usize;
        while end < with_grad.len() {
            let n = with_grad[end].1.as_tensor().elem_count();
            if end > start && len + n > BUCKET_FLOATS {
                break;
            }
            len += n;
            end += 1;
        }
        let bucket = &with_grad[start..end];
        let on_device = !bucket[0].1.as_tensor().device().is_cpu();
        bytes += average_bucket(coll, grads, bucket, len, on_device)?;
        start = end;
    }
    Ok((bytes, wait))
}

/// Average the gradients of one bucket (`len` values in all) over the ranks; returns the bytes reduced. On the
/// host (`on_device` false) the values are packed straight into the all-reduce's buffer; on a device (a GPU)
/// the bucket is packed, reduced ([`dino_core::Collective::all_reduce_sum_tensor`]: NCCL in GPU memory, other
/// engines through the host) and unpacked there. Both give the same values: a sum over the ranks, then a
/// division by the world size.
fn average_bucket(
    coll: &dyn dino_core::Collective,
    grads: &mut candle_core::backprop::GradStore,
    bucket: &[&NamedVar],
    len: usize,
    on_device: bool,
) -> Result<usize> {
    let grad_of = |grads: &candle_core::backprop::GradStore, name: &str, v: &Var| {
        grads
            .get(v.as_tensor())
            .cloned()
            .ok_or_else(|| Error::Msg(format!("`{name}` lost its gradient while averaging")))
    };
    let mean = if on_device {
        let flat = bucket
            .iter()
            .map(|(name, v)| {
                Ok(grad_of(grads, name, v)?
                    .flatten_all()?
                    .to_dtype(DType::F32)?)
            })
            .collect::<Result<Vec<_>>>()?;
        let summed = coll.all_reduce_sum_tensor(&Tensor::cat(&flat, 0)?)?;
        // A division, as on the host (not a multiplication by 1/world): the same bits as the host path.
        let world = Tensor::new(coll.world_size() as f32, summed.device())?;
        summed.broadcast_div(&world)?
    } else {
        let mut buf = Vec::with_capacity(len);
        for (name, v) in bucket {
            let g = grad_of(grads, name, v)?;
            buf.extend(g.flatten_all()?.to_dtype(DType::F32)?.to_vec1::<f32>()?);
        }
        dino_core::collective::all_reduce_mean_f32(coll, &mut buf)?;
        Tensor::from_vec(buf, len, &Device::Cpu)?
    };
    let mut off = 0usize;
    for (_, v) in bucket {
        let t = v.as_tensor();
        let n = t.elem_count();
        // Each gradient its own storage of its own size: a narrowed view would keep the whole bucket's, and so
        // would `Tensor::copy`, which clones the whole storage under the view (a bucket-sized copy per
        // parameter: 36% of a rank's time in the default preset, 2026-12-07); `force_contiguous` copies the
        // view alone.
        let g = mean
            .narrow(0, off, n)?
            .force_contiguous()?
            .reshape(t.shape())?
            .to_dtype(t.dtype())?;
        grads.insert(t, g);
        off += n;
    }
    Ok(len * 4)
}

/// Student, teacher, optimiser, loss and schedules.
pub struct Trainer {
    /// The run's configuration.
    pub cfg: TrainConfig,
    /// The student (trained by the optimiser).
    pub student: DinoNetwork,
    /// The teacher (EMA of the student; never receives gradients).
    pub teacher: DinoNetwork,
    /// The student's trainable parameters, sorted by name.
    pub params: Vec<NamedVar>,
    /// The optimiser over `params` (group 0 regularised, group 1 not).
    pub optimizer: RunOptimizer,
    /// The DINO loss with its centre.
    pub loss: DinoLoss,
    /// The iBOT masked-patch loss with its centre, when `ibot_loss_weight > 0`.
    pub ibot: Option<IbotPatchLoss>,
    ema: EmaTeacher,
    /// Learning rate per global iteration (`cosine_scheduler(lr * batch / 256, min_lr, ...)`).
    pub lr_schedule: Vec<f64>,
    /// Weight decay per global iteration.
    pub wd_schedule: Vec<f64>,
    /// Teacher momentum per global iteration.
    pub momentum_schedule: Vec<f64>,
    /// Iterations per epoch.
    pub niter_per_ep: usize,
}

impl std::fmt::Debug for Trainer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Trainer")
            .field("params", &self.params.len())
            .field("niter_per_ep", &self.niter_per_ep)
            .finish()
    }
}

impl Trainer {
    /// A fresh run: the student initialised from `cfg.seed` (with `drop_path_rate`), the teacher a copy of it.
    pub fn new(cfg: &TrainConfig, niter_per_ep: usize, device: &Device) -> Result<Self> {
        cfg.validate()?;
        let student = DinoNetwork::new(cfg, cfg.seed, cfg.drop_path_rate, device)?;
        Self::from_student(cfg, student, niter_per_ep, device)
    }

    /// A run starting from a given student (e.g. loaded weights); the teacher is a copy of it.
    pub fn from_student(
        cfg: &TrainConfig,
        student: DinoNetwork,
        niter_per_ep: usize,
        device: &Device,
    ) -> Result<Self> {
        if niter_per_ep == 0 {
            return Err(Error::Msg("niter_per_ep must be positive".into()));
        }
        let teacher = DinoNetwork::copy_of(cfg, &student, device)?;
        let params = student.trainable(cfg.norm_last_layer);
        let (reg, noreg): (Vec<NamedVar>, Vec<NamedVar>) = params
            .iter()
            .cloned()
            .partition(|(n, v)| is_regularized(n, v.rank()));
        let groups = vec![ParamGroup::new(reg), ParamGroup::new(noreg)];
        let optimizer = match cfg.optimizer {
            OptimizerKind::Adamw => RunOptimizer::AdamW(AdamW::new(groups)?),
            OptimizerKind::Sgd => RunOptimizer::Sgd(Sgd::new(groups, 0.9)?),
            OptimizerKind::Lars => RunOptimizer::Lars(Lars::new(groups)?),
        };
        let loss = DinoLoss::new(
            DinoLossConfig {
                out_dim: cfg.out_dim,
                ncrops: cfg.ncrops(),
                warmup_teacher_temp: cfg.warmup_teacher_temp,
                teacher_temp: cfg.teacher_temp,
                warmup_teacher_temp_epochs: cfg.warmup_teacher_temp_epochs,
                nepochs: cfg.epochs,
                student_temp: cfg.student_temp,
                center_momentum: cfg.center_momentum,
                centering: cfg.centering.to_loss(),
            },
            device,
        )?;
        let ibot = if cfg.ibot_loss_weight > 0.0 {
            Some(IbotPatchLoss::new(
                IbotPatchLossConfig {
                    out_dim: cfg.out_dim,
                    student_temp: cfg.student_temp,
                    center_momentum: cfg.center_momentum,
                    centering: cfg.centering.to_loss(),
                },
                device,
            )?)
        } else {
            None
        };
        let ema = EmaTeacher::new(&student.ema_params(), &teacher.ema_params())?;
        let lr_schedule = cosine_scheduler(
            cfg.scaled_lr(),
            cfg.min_lr,
            cfg.epochs,
            niter_per_ep,
            cfg.warmup_epochs,
            0.0,
        );
        let wd_schedule = cosine_scheduler(
            cfg.weight_decay,
            cfg.weight_decay_end,
            cfg.epochs,
            niter_per_ep,
            0,
            0.0,
        );
        let momentum_schedule =
            cosine_scheduler(cfg.momentum_teacher, 1.0, cfg.epochs, niter_per_ep, 0, 0.0);
        Ok(Self {
            cfg: cfg.clone(),
            student,
            teacher,
            params,
            optimizer,
            loss,
            ibot,
            ema,
            lr_schedule,
            wd_schedule,
            momentum_schedule,
            niter_per_ep,
        })
    }

    /// Total number of iterations of the run.
    pub fn total_iterations(&self) -> usize {
        self.cfg.epochs * self.niter_per_ep
    }

    /// One training iteration on `crops` (2 global crops then the local ones, each `(B, 3, h, w)`), at
    /// `epoch` and iteration `it` within it. See the module documentation for the order.
    pub fn step(&mut self, crops: &[Tensor], epoch: usize, it: usize) -> Result<StepStats> {
        let g = epoch * self.niter_per_ep + it;
        let sched = |s: &[f64], name: &str| {
            s.get(g).copied().ok_or_else(|| {
                Error::Msg(format!(
                    "global iteration {g} is past the end of the {name} schedule ({})",
                    s.len()
                ))
            })
        };
        let (lr, wd, m) = (
            sched(&self.lr_schedule, "lr")?,
            sched(&self.wd_schedule, "wd")?,
            sched(&self.momentum_schedule, "momentum")?,
        );
        if crops.len() != self.cfg.ncrops() {
            return Err(Error::Msg(format!(
                "{} crops given, the configuration has 2 global + {} local = {}",
                crops.len(),
                self.cfg.local_crops_number,
                self.cfg.ncrops()
            )));
        }
        let opt = self.optimizer.as_dyn();
        for group in 0..opt.groups().len() {
            opt.set_lr(group, lr)?;
        }
        opt.set_weight_decay(0, wd)?;
        let teacher_temp = self.loss.teacher_temp(epoch)?;

        let coll = dino_core::collective::current();
        let (rank, world) = (coll.rank(), coll.world_size());
        let local_b = crops[0].dim(0)?;
        self.student.model.backbone.set_drop_path_samples(
            drop_path_seed(self.cfg.seed, g),
            &dino_data::loader::global_positions(rank, world, local_b),
        );
        let mut timings = StepTimings::default();
        let mut clock = std::time::Instant::now();
        let mut lap = |slot: &mut f64| {
            let now = std::time::Instant::now();
            *slot += (now - clock).as_secs_f64();
            clock = now;
        };
        // Teacher first, on the two global crops; detached (stop-gradient), and run under `no_grad` so its
        // fused ops keep nothing for a backward pass. The linear layers run at the configured precision, which
        // their backward passes keep.
        let precision = self.cfg.matmul_precision;
        let koleo_w = self.cfg.koleo_loss_weight;
        let passes = student_pass_ranges(
            self.cfg.student_passes.resolve(self.cfg.use_bn_in_head),
            crops,
            self.ibot.is_some(),
        )?;
        let (t_out, ibot_step) = if let Some(ibot) = self.ibot.as_mut() {
            let masks = ibot_masks(&self.cfg, g, rank, world, &crops[0])?;
            let dev = crops[0].device();
            let n = masks.n_masked();
            let idx = Tensor::from_vec(masks.indices(), n, dev)?;
            let weights = Tensor::from_vec(masks.weights(), n, dev)?;
            let mask_t = Tensor::from_vec(
                masks.masks.iter().map(|&m| u8::from(m)).collect::<Vec<_>>(),
                (masks.n_crops, masks.n_tokens),
                dev,
            )?;
            let (_, t_out, t_patch) = dino_models::no_grad(|| {
                with_matmul_precision(precision, || {
                    self.teacher
                        .model
                        .forward_ibot(&crops[..2], None, &idx, true)
                })
            })?;
            lap(&mut timings.teacher_forward);
            let targets = ibot.teacher_targets(&t_patch.detach(), teacher_temp)?;
            let step = IbotStep {
                idx,
                weights,
                mask_t,
                n_crops: masks.n_crops,
                targets,
            };
            (t_out.detach(), Some(step))
        } else {
            let t_out = dino_models::no_grad(|| {
                with_matmul_precision(precision, || self.teacher.model.forward(&crops[..2], true))
            })?
            .detach();
            lap(&mut timings.teacher_forward);
            (t_out, None)
        };
        let targets = self.loss.teacher_targets(&t_out, epoch)?;
        lap(&mut timings.loss);
        let scalar = |t: &Tensor| -> Result<f64> {
            Ok(t.to_dtype(candle_core::DType::F64)?.to_scalar::<f64>()?)
        };
        // The student, in one pass over every crop (the official step) or in several (`student_passes`):
        // each pass's forward, loss terms and backward, its activations freed before the next pass; the
        // passes' gradients add up to the one-pass gradient. The global crops' terms (iBOT, KoLeo) go with
        // the pass that holds them.
        let mut grads: Option<candle_core::backprop::GradStore> = None;
        let (mut loss_v, mut dino_v, mut ibot_v) = (0f64, 0f64, None);
        for views in passes {
            let globals = views.end.min(2).saturating_sub(views.start);
            let pass = &crops[views.clone()];
            let ibot_pass = ibot_step.as_ref().filter(|_| globals > 0);
            let (s_feat, s_out, s_patch) = with_matmul_precision(precision, || {
                let student = &self.student.model;
                Ok::<_, Error>(if let Some(ib) = ibot_pass {
                    let (f, o, p) = student.forward_ibot(pass, Some(&ib.mask_t), &ib.idx, true)?;
                    (Some(f), o, Some(p))
                } else if koleo_w > 0.0 && globals > 0 {
                    let (f, o) = student.forward_with_features(pass, true)?;
                    (Some(f), o, None)
                } else {
                    (None, student.forward(pass, true)?, None)
                })
            })?;
            lap(&mut timings.student_forward);
            let dino = self.loss.student_loss(&targets, &s_out, views)?;
            let mut loss = dino.clone();
            if let (Some(ib), Some(ibot), Some(patch)) = (ibot_pass, self.ibot.as_ref(), &s_patch) {
                let l = ibot.forward_masked(patch, &ib.targets, &ib.weights, ib.n_crops)?;
                ibot_v = Some(scalar(&l)?);
                loss = (loss + (&l * self.cfg.ibot_loss_weight)?)?;
            }
            // DINOv2's KoLeo on the backbone CLS features of the global crops, one term per crop: over the
            // global batch (the rows gathered over the ranks: one process's loss and gradients), or on this
            // rank's rows alone as the official code does (`koleo_global_batch = false`).
            if let (Some(f), true) = (&s_feat, koleo_w > 0.0 && globals > 0) {
                let global = f.narrow(0, 0, globals * local_b)?;
                let k = if self.cfg.koleo_global_batch {
                    dino_core::koleo_per_crop_over_ranks(&global, globals, koleo_w, &coll)?
                } else {
                    dino_core::koleo_per_crop(&global, globals, koleo_w)?
                };
                loss = (loss + k)?;
            }
            dino_v += scalar(&dino)?;
            loss_v += scalar(&loss)?;
            lap(&mut timings.loss);
            let pass_grads = detached(loss.backward()?);
            match grads.as_mut() {
                Some(acc) => acc.extend(pass_grads)?,
                None => grads = Some(pass_grads),
            }
            lap(&mut timings.backward);
        }
        self.loss.finish(targets, dino_v)?;
        if world > 1 {
            // The global batch's loss: the mean of the ranks' (equal-sized) batch means. A non-finite
            // loss on any rank makes it non-finite on every rank, so all of them stop at the same step.
            let mut v = [loss_v, ibot_v.unwrap_or(0.0)];
            coll.all_reduce_sum_f64(&mut v)?;
            loss_v = v[0] / world as f64;
            ibot_v = ibot_v.map(|_| v[1] / world as f64);
        }
        lap(&mut timings.loss);
        if !loss_v.is_finite() {
            return Err(Error::NonFiniteLoss {
                loss: loss_v,
                epoch,
                iteration: it,
                global_iteration: g,
            });
        }
        let mut grads = grads.ok_or_else(|| Error::Msg("a step without a student pass".into()))?;
        let all_reduce_bytes = if world > 1 {
            let (bytes, wait) = average_gradients(coll.as_ref(), &mut grads, &self.params)?;
            timings.rank_wait = wait;
            bytes
        } else {
            0
        };
        lap(&mut timings.all_reduce);
        timings.all_reduce -= timings.rank_wait;
        let clip_norms = if self.cfg.clip_grad > 0.0 {
            let with_grad: Vec<String> = self
                .params
                .iter()
                .filter(|(_, v)| grads.get(v.as_tensor()).is_some())
                .map(|(n, _)| n.clone())
                .collect();
            let norms = clip_gradients(&mut grads, &self.params, self.cfg.clip_grad)?;
            with_grad.into_iter().zip(norms).collect()
        } else {
            Vec::new()
        };
        cancel_gradients_last_layer(epoch, &mut grads, &self.params, self.cfg.freeze_last_layer);
        let params_with_grad = self
            .params
            .iter()
            .filter(|(_, v)| grads.get(v.as_tensor()).is_some())
            .count();
        lap(&mut timings.clip);
        self.optimizer.as_dyn().step(&grads)?;
        drop(grads);
        lap(&mut timings.optimizer);
        self.ema.update(m)?;
        lap(&mut timings.ema);
        Ok(StepStats {
            epoch,
            iteration: it,
            global_iteration: g,
            loss: loss_v,
            ibot_loss: ibot_v,
            lr,
            wd,
            momentum: m,
            teacher_temp,
            clip_norms,
            params_with_grad,
            all_reduce_bytes,
            timings,
        })
    }

    /// Collapse monitors of the last step (teacher entropy, KL(teacher || student), teacher std).
    pub fn last_metrics(&self) -> Result<Option<CollapseMetrics>> {
        Ok(self.loss.last_metrics()?)
    }

    /// Every tensor of the training state for a checkpoint: `student.*`, `teacher.*`, `optimizer.*`
    /// (AdamW: `exp_avg.<p>`, `exp_avg_sq.<p>`, `step.<p>`; SGD: `momentum_buffer.<p>`; LARS: `mu.<p>`),
    /// `dino_loss.center`.
    pub fn state_tensors(&self) -> Result<Vec<(String, Tensor)>> {
        let mut out = Vec::new();
        for (n, t) in self.student.tensors() {
            out.push((format!("student.{n}"), t));
        }
        for (n, t) in self.teacher.tensors() {
            out.push((format!("teacher.{n}"), t));
        }
        for (n, t) in self.optimizer.as_dyn_ref().state_tensors()? {
            out.push((format!("optimizer.{n}"), t));
        }
        out.push(("dino_loss.center".into(), self.loss.center().copy()?));
        if let Some(ibot) = &self.ibot {
            out.push(("ibot_patch_loss.center".into(), ibot.center().copy()?));
        }
        Ok(out)
    }

    /// Restore the state written by [`Trainer::state_tensors`] (strict: every student / teacher variable must
    /// be present with its shape). `origin` names the file in errors.
    pub fn load_state(&mut self, tensors: &HashMap<String, Tensor>, origin: &str) -> Result<()> {
        let to_btree = |m: HashMap<String, Tensor>| m.into_iter().collect::<BTreeMap<_, _>>();
        let student = to_btree(take_prefixed(tensors, "student"));
        let teacher = to_btree(take_prefixed(tensors, "teacher"));
        dino_models::weights::load_strict(
            &self.student.vars(),
            &student,
            &format!("{origin} (student)"),
        )?;
        dino_models::weights::load_strict(
            &self.teacher.vars(),
            &teacher,
            &format!("{origin} (teacher)"),
        )?;
        let opt = take_prefixed(tensors, "optimizer");
        self.optimizer.as_dyn().load_state_tensors(&opt)?;
        let center = tensors
            .get("dino_loss.center")
            .ok_or_else(|| Error::Checkpoint {
                path: origin.into(),
                reason: "no `dino_loss.center` tensor".into(),
            })?;
        self.loss.set_center(center)?;
        if let Some(ibot) = self.ibot.as_mut() {
            let center =
                tensors
                    .get("ibot_patch_loss.center")
                    .ok_or_else(|| Error::Checkpoint {
                        path: origin.into(),
                        reason: "no `ibot_patch_loss.center` tensor (iBOT is enabled)".into(),
                    })?;
            ibot.set_center(center)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A parameter's gradient that is a product with an activation is a node of the activation's graph;
    /// `detached` cuts it, with the values kept (kept, each student pass's graph lived on in the gradient
    /// store until the optimiser step: +3.4 GiB per global-crop pass of vit_small at batch 64).
    #[test]
    fn detached_gradients_hold_no_graph() {
        let dev = Device::Cpu;
        let w = Var::new(&[1f32, 2.0, 3.0], &dev).unwrap();
        let v = Var::new(&[0.5f32, -1.0, 2.0], &dev).unwrap();
        let a = (v.as_tensor() * 2.0).unwrap();
        let loss = (w.as_tensor() * &a).unwrap().sum_all().unwrap();
        let raw = loss.backward().unwrap();
        assert!(
            raw.get(w.as_tensor()).unwrap().track_op(),
            "premise: w's gradient (the activation a) is a graph node"
        );
        let g = detached(raw);
        for (var, want) in [(&w, [1f32, -2.0, 4.0]), (&v, [2.0, 4.0, 6.0])] {
            let t = g.get(var.as_tensor()).unwrap();
            assert!(!t.track_op());
            assert_eq!(t.to_vec1::<f32>().unwrap(), want);
        }
    }

    /// Rank 0 of a world of 2 whose other rank's buffer is `i as f32 * 0.25 - 1` at index `i`.
    struct TwoRanks;

    impl dino_core::Collective for TwoRanks {
        fn name(&self) -> &'static str {
            "test"
        }
        fn rank(&self) -> usize {
            0
        }
        fn world_size(&self) -> usize {
            2
        }
        fn local_rank(&self) -> usize {
            0
        }
        fn local_size(&self) -> usize {
            2
        }
        fn all_reduce_sum_f32(&self, buf: &mut [f32]) -> dino_core::Result<()> {
            for (i, b) in buf.iter_mut().enumerate() {
                *b += i as f32 * 0.25 - 1.0;
            }
            Ok(())
        }
        fn all_reduce_sum_f64(&self, _buf: &mut [f64]) -> dino_core::Result<()> {
            unreachable!("gradients are averaged in f32")
        }
        fn broadcast_bytes(&self, _buf: &mut Vec<u8>, _root: usize) -> dino_core::Result<()> {
            Ok(())
        }
        fn barrier(&self) -> dino_core::Result<()> {
            Ok(())
        }
        fn abort(&self, code: i32) -> ! {
            std::process::exit(code)
        }
    }

    /// The device path of the gradient average (packed bucket, `all_reduce_sum_tensor`, division on the
    /// device: what runs on a GPU) gives the host path's bits, and both give `(mine + other) / 2`.
    #[test]
    fn a_bucket_averages_to_the_same_bits_on_the_host_and_on_a_device() -> Result<()> {
        let dev = Device::Cpu;
        let params: Vec<NamedVar> = [(2usize, 3usize), (1, 5), (4, 1)]
            .iter()
            .enumerate()
            .map(|(i, &shape)| Ok((format!("p{i}"), Var::zeros(shape, DType::F32, &dev)?)))
            .collect::<Result<_>>()?;
        let bucket: Vec<&NamedVar> = params.iter().collect();
        let len: usize = params.iter().map(|(_, v)| v.elem_count()).sum();
        let mine: Vec<f32> = (0..len).map(|i| (i as f32 * 0.7).sin() / 3.0).collect();
        let averaged = |on_device: bool| -> Result<Vec<f32>> {
            // (GradStore has no public constructor: a backward pass makes one, then every entry is set.)
            let mut grads = params[0].1.as_tensor().sum_all()?.backward()?;
            let mut off = 0;
            for (_, v) in &params {
                let n = v.elem_count();
                grads.insert(
                    v.as_tensor(),
                    Tensor::from_slice(&mine[off..off + n], v.shape(), &dev)?,
                );
                off += n;
            }
            let bytes = average_bucket(&TwoRanks, &mut grads, &bucket, len, on_device)?;
            assert_eq!(bytes, len * 4);
            let mut out = Vec::new();
            for (_, v) in &params {
                let g = grads.get(v.as_tensor()).expect("a gradient");
                assert_eq!(g.shape(), v.shape());
                // Each gradient owns a storage of its own size, not a copy of the whole bucket (candle's
                // `Tensor::copy` of a narrowed view clones the whole storage: a bucket per parameter).
                let (storage, layout) = g.storage_and_layout();
                let held = match &*storage {
                    candle_core::Storage::Cpu(candle_core::CpuStorage::F32(d)) => d.len(),
                    _ => unreachable!("f32 on the CPU"),
                };
                assert_eq!((held, layout.start_offset()), (v.elem_count(), 0));
                drop(storage);
                out.extend(g.flatten_all()?.to_vec1::<f32>()?);
            }
            Ok(out)
        };
        let host = averaged(false)?;
        let device = averaged(true)?;
        let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
        assert_eq!(bits(&host), bits(&device));
        for (i, (h, m)) in host.iter().zip(&mine).enumerate() {
            assert_eq!(*h, (m + (i as f32 * 0.25 - 1.0)) / 2.0, "value {i}");
        }
        Ok(())
    }
}
