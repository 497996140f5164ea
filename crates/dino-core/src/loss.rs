//! `DINOLoss` (main_dino.py): cross-entropy between the centred, sharpened teacher distribution of the
//! two global crops and the student distribution of every other crop, with the centre EMA updated
//! after the loss. On CPU the loss and its gradient are one fused op with an analytic backward
//! ([`DinoLossOp`]); on other devices the same formula is composed from candle ops.
//!
//! DINOv2's alternative to the centre, Sinkhorn-Knopp teacher normalisation
//! ([`TeacherCentering::SinkhornKnopp`], [`sinkhorn_knopp_teacher`]), is a config choice; the centre is then
//! never updated, as in the official dinov2 code.

use std::ops::Range;
use std::sync::Mutex;

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp2, DType, Device, Layout, Shape, Storage, Tensor, D};

use crate::kernels::{
    dot_log_softmax, exp_f32, max_f32, par_fill, par_rows_mut, simd, sum_exp_scaled,
};
use crate::monitor::CollapseMetrics;
use crate::schedule::teacher_temp_schedule;
use crate::{Error, Result};
use dino_kernels::dispatch::cpu_fast_path;
use dino_kernels::ops::uninit_f32;

/// Configuration of [`DinoLoss`]; field names and defaults follow `main_dino.DINOLoss` and its CLI.
#[derive(Debug, Clone, PartialEq)]
pub struct DinoLossConfig {
    /// Head output dimension K (`--out_dim`, default 65536).
    pub out_dim: usize,
    /// Number of crops n = 2 global + `local_crops_number` (default 2 + 8 = 10). At least 2.
    pub ncrops: usize,
    /// Teacher temperature at epoch 0 (`--warmup_teacher_temp`, default 0.04).
    pub warmup_teacher_temp: f64,
    /// Teacher temperature after the warm-up (`--teacher_temp`, default 0.04).
    pub teacher_temp: f64,
    /// Epochs of linear teacher-temperature warm-up (`--warmup_teacher_temp_epochs`, code default 0).
    pub warmup_teacher_temp_epochs: usize,
    /// Training epochs, the length of the teacher-temperature schedule (`--epochs`, default 100).
    pub nepochs: usize,
    /// Student temperature (default 0.1).
    pub student_temp: f64,
    /// Momentum of the centre EMA (default 0.9).
    pub center_momentum: f64,
    /// How teacher logits become targets: the EMA centre (DINO v1, default) or Sinkhorn-Knopp (DINOv2).
    pub centering: TeacherCentering,
}

/// How the teacher logits become target distributions.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum TeacherCentering {
    /// DINO v1: `softmax((t - center) / teacher_temp)` with the centre an EMA of the batch mean (default).
    #[default]
    Centering,
    /// DINOv2's `sinkhorn_knopp_teacher` with this many iterations (official: 3) over both global crops of
    /// the global batch; the centre is left alone.
    SinkhornKnopp {
        /// Normalisation rounds (each: prototypes, then samples). At least 1.
        n_iterations: usize,
    },
}

impl Default for DinoLossConfig {
    fn default() -> Self {
        Self {
            out_dim: 65536,
            ncrops: 10,
            warmup_teacher_temp: 0.04,
            teacher_temp: 0.04,
            warmup_teacher_temp_epochs: 0,
            nepochs: 100,
            student_temp: 0.1,
            center_momentum: 0.9,
            centering: TeacherCentering::Centering,
        }
    }
}

impl DinoLossConfig {
    /// The official constructor's positional arguments; `student_temp` 0.1 and `center_momentum` 0.9.
    pub fn new(
        out_dim: usize,
        ncrops: usize,
        warmup_teacher_temp: f64,
        teacher_temp: f64,
        warmup_teacher_temp_epochs: usize,
        nepochs: usize,
    ) -> Self {
        Self {
            out_dim,
            ncrops,
            warmup_teacher_temp,
            teacher_temp,
            warmup_teacher_temp_epochs,
            nepochs,
            ..Self::default()
        }
    }
}

/// What the last forward pass saw, kept (cheap `Tensor` clones) for [`DinoLoss::last_metrics`].
#[derive(Debug, Clone)]
struct LastCall {
    loss: f64,
    teacher_output: Tensor,
    center_before: Tensor,
    teacher_temp: f64,
    /// The Sinkhorn-Knopp targets (2B, K), when that mode made them.
    probs: Option<Tensor>,
}

/// The teacher's side of one step's loss ([`DinoLoss::teacher_targets`]), shared by the passes over the
/// student's crops.
#[derive(Debug, Clone)]
pub struct TeacherTargets {
    /// Teacher logits (2B, K), f32, detached.
    teacher: Tensor,
    /// The centre (1, K) the targets use (before this step's update).
    center: Tensor,
    /// Teacher temperature of the step's epoch.
    temp: f64,
    /// The Sinkhorn-Knopp targets (2B, K), in that mode.
    probs: Option<Tensor>,
    /// Rows per crop, B.
    batch: usize,
}

/// The DINO loss with its centre buffer (`center`, shape (1, K), zeros at start).
#[derive(Debug)]
pub struct DinoLoss {
    cfg: DinoLossConfig,
    center: Tensor,
    teacher_temp_schedule: Vec<f64>,
    last: Option<LastCall>,
}

impl DinoLoss {
    /// Builds the loss; the centre starts at zeros (1, `out_dim`) f32 on `device`.
    pub fn new(cfg: DinoLossConfig, device: &Device) -> Result<Self> {
        if cfg.ncrops < 2 {
            return Err(Error::arg(
                "ncrops",
                format!(
                    "must be at least 2 (the two global crops), got {}",
                    cfg.ncrops
                ),
            ));
        }
        if cfg.out_dim == 0 {
            return Err(Error::arg("out_dim", "must be positive"));
        }
        for (name, t) in [
            ("student_temp", cfg.student_temp),
            ("teacher_temp", cfg.teacher_temp),
            ("warmup_teacher_temp", cfg.warmup_teacher_temp),
        ] {
            if !(t > 0.0 && t.is_finite()) {
                return Err(Error::arg(
                    name,
                    format!("must be a positive number, got {t}"),
                ));
            }
        }
        if cfg.centering == (TeacherCentering::SinkhornKnopp { n_iterations: 0 }) {
            return Err(Error::arg(
                "sinkhorn_knopp n_iterations",
                "must be at least 1",
            ));
        }
        if !(0.0..=1.0).contains(&cfg.center_momentum) {
            return Err(Error::arg(
                "center_momentum",
                format!("must lie in [0, 1], got {}", cfg.center_momentum),
            ));
        }
        let teacher_temp_schedule = teacher_temp_schedule(
            cfg.warmup_teacher_temp,
            cfg.teacher_temp,
            cfg.warmup_teacher_temp_epochs,
            cfg.nepochs,
        )?;
        let center = Tensor::zeros((1, cfg.out_dim), DType::F32, device)?;
        Ok(Self {
            cfg,
            center,
            teacher_temp_schedule,
            last: None,
        })
    }

    /// The configuration.
    pub fn config(&self) -> &DinoLossConfig {
        &self.cfg
    }

    /// The centre buffer, shape (1, K) (the `dino_loss.center` checkpoint entry).
    pub fn center(&self) -> &Tensor {
        &self.center
    }

    /// Restores the centre from a checkpoint; it must have shape (1, K) or (K).
    pub fn set_center(&mut self, center: &Tensor) -> Result<()> {
        let k = self.cfg.out_dim;
        let dims = center.dims();
        if dims != [1, k] && dims != [k] {
            return Err(Error::shape("center", format!("(1, {k})"), dims));
        }
        self.center = restored_center(center, k, self.center.device())?;
        Ok(())
    }

    /// The per-epoch teacher temperature schedule (length `nepochs`).
    pub fn teacher_temp_schedule(&self) -> &[f64] {
        &self.teacher_temp_schedule
    }

    /// The teacher temperature at `epoch`; an error past the schedule's end.
    pub fn teacher_temp(&self, epoch: usize) -> Result<f64> {
        crate::schedule::at(
            &self.teacher_temp_schedule,
            epoch,
            "teacher_temp_schedule (epoch)",
        )
    }

    /// The loss for `student_output` (n*B, K), crop-major (rows `[c*B, (c+1)*B)` are crop c, crops 0 and
    /// 1 global) and `teacher_output` (2*B, K) for the two global crops, at `epoch`. Returns a scalar
    /// (shape `()`, f32). The teacher is detached (no gradient reaches it); the centre is updated after
    /// the loss with the mean of the raw teacher logits.
    pub fn forward(
        &mut self,
        student_output: &Tensor,
        teacher_output: &Tensor,
        epoch: usize,
    ) -> Result<Tensor> {
        let (n, _, _) = self.check_shapes(student_output, teacher_output)?;
        let targets = self.teacher_targets(teacher_output, epoch)?;
        let loss = self.student_loss(&targets, student_output, 0..n)?;
        self.finish(targets, loss.to_dtype(DType::F64)?.to_scalar::<f64>()?)?;
        Ok(loss)
    }

    /// The first of the three parts of [`forward`](Self::forward), for a step whose student crops go
    /// through the network in several passes (each pass's activations freed by its backward before the
    /// next): the targets of the teacher's `teacher_output` (2*B, K) at `epoch`, made once per step
    /// (Sinkhorn-Knopp runs here, with its all-reduces). The centre is left alone until
    /// [`finish`](Self::finish).
    pub fn teacher_targets(&self, teacher_output: &Tensor, epoch: usize) -> Result<TeacherTargets> {
        let k = self.cfg.out_dim;
        let td = teacher_output.dims();
        if td.len() != 2 || td[1] != k || td[0] == 0 || td[0] % 2 > 0 {
            return Err(Error::shape(
                "teacher_output",
                format!("(2 * B, K) with B > 0 and K = {k}"),
                td,
            ));
        }
        let temp = self.teacher_temp(epoch)?;
        let teacher = teacher_output.detach().to_dtype(DType::F32)?;
        let probs = match self.cfg.centering {
            TeacherCentering::Centering => None,
            TeacherCentering::SinkhornKnopp { n_iterations } => {
                Some(sinkhorn_knopp_teacher(&teacher, temp, n_iterations)?)
            }
        };
        Ok(TeacherTargets {
            batch: td[0] / 2,
            teacher,
            center: self.center.clone(),
            temp,
            probs,
        })
    }

    /// The second part: the loss terms of the student crops `views` (a range of crop indices in
    /// `0..ncrops`), `student_output` their rows `(views.len() * B, K)`, crop-major. Each term is divided
    /// by the whole step's pair count, so the values (and gradients) of passes that cover every crop once
    /// add up to [`forward`](Self::forward)'s; one pass over `0..ncrops` is `forward`'s loss itself. The
    /// gradient flows to `student_output` only.
    pub fn student_loss(
        &self,
        targets: &TeacherTargets,
        student_output: &Tensor,
        views: Range<usize>,
    ) -> Result<Tensor> {
        let (n, k, b) = (self.cfg.ncrops, self.cfg.out_dim, targets.batch);
        if views.is_empty() || views.end > n {
            return Err(Error::arg(
                "views",
                format!("{views:?} is not a non-empty range of the {n} crops (0..{n})"),
            ));
        }
        let sd = student_output.dims();
        if sd != [views.len() * b, k] {
            return Err(Error::shape(
                "student_output",
                format!(
                    "({} crops * B = {b}, K = {k}) for crops {views:?}",
                    views.len()
                ),
                sd,
            ));
        }
        if !student_output
            .device()
            .same_device(targets.teacher.device())
        {
            return Err(Error::arg(
                "teacher_output",
                "must be on the student_output's device",
            ));
        }
        let loss = match (&targets.probs, cpu_fast_path(&[student_output])) {
            (None, true) => {
                let op = DinoLossOp::new(
                    n,
                    b,
                    k,
                    self.cfg.student_temp,
                    targets.temp,
                    targets.center.flatten_all()?.to_vec1::<f32>()?,
                )
                .for_views(views);
                let student = student_output.to_dtype(DType::F32)?.contiguous()?;
                student.apply_op2(&targets.teacher.contiguous()?, op)?
            }
            (Some(q), true) => {
                let op =
                    DinoLossOp::with_teacher_probs(n, b, k, self.cfg.student_temp).for_views(views);
                let student = student_output.to_dtype(DType::F32)?.contiguous()?;
                student.apply_op2(&q.contiguous()?, op)?
            }
            (None, false) => dino_loss_composed_views(
                student_output,
                &teacher_probs_composed(&targets.teacher, &targets.center, targets.temp)?,
                n,
                views,
                self.cfg.student_temp,
            )?,
            (Some(q), false) => {
                dino_loss_composed_views(student_output, q, n, views, self.cfg.student_temp)?
            }
        };
        Ok(loss)
    }

    /// The third part, once after every pass of the step: records `loss` (the sum of the passes' DINO
    /// loss values) for [`last_metrics`](Self::last_metrics) and updates the centre with the teacher's
    /// batch mean (centering mode; all-reduced over the ranks).
    pub fn finish(&mut self, targets: TeacherTargets, loss: f64) -> Result<()> {
        let probs_given = targets.probs.is_some();
        self.last = Some(LastCall {
            loss,
            teacher_output: targets.teacher.clone(),
            center_before: targets.center,
            teacher_temp: targets.temp,
            probs: targets.probs,
        });
        if !probs_given {
            self.update_center(&targets.teacher)?;
        }
        Ok(())
    }

    /// [`forward`](Self::forward) for per-crop lists: `student` holds n tensors (B, K) (2 global crops
    /// first), `teacher` the 2 global crops' (B, K) outputs.
    pub fn forward_crops(
        &mut self,
        student: &[Tensor],
        teacher: &[Tensor],
        epoch: usize,
    ) -> Result<Tensor> {
        if student.is_empty() {
            return Err(Error::arg(
                "student",
                "zero crops: expected ncrops student tensors",
            ));
        }
        if student.len() != self.cfg.ncrops {
            return Err(Error::arg(
                "student",
                format!(
                    "{} crops given, the loss was built with ncrops = {}",
                    student.len(),
                    self.cfg.ncrops
                ),
            ));
        }
        if teacher.len() != 2 {
            return Err(Error::arg(
                "teacher",
                format!("expected the 2 global crops, got {} tensors", teacher.len()),
            ));
        }
        let b = student[0].dims().first().copied().unwrap_or(0);
        for (name, list) in [("student", student), ("teacher", teacher)] {
            for (i, t) in list.iter().enumerate() {
                if t.rank() != 2 || t.dim(0)? != b || t.dim(1)? != self.cfg.out_dim {
                    return Err(Error::shape(
                        format!("{name}[{i}]"),
                        format!("(B, K) = ({b}, {})", self.cfg.out_dim),
                        t.dims(),
                    ));
                }
            }
        }
        let s = Tensor::cat(student, 0)?;
        let t = Tensor::cat(teacher, 0)?;
        self.forward(&s, &t, epoch)
    }

    /// Collapse metrics of the last forward call (teacher entropy, KL(teacher || student), output std),
    /// or `None` before the first call. Costs O(2*B*K).
    pub fn last_metrics(&self) -> Result<Option<CollapseMetrics>> {
        let Some(last) = &self.last else {
            return Ok(None);
        };
        let mut m = match &last.probs {
            Some(q) => CollapseMetrics::from_probs(&last.teacher_output, q)?,
            None => CollapseMetrics::from_teacher(
                &last.teacher_output,
                &last.center_before,
                last.teacher_temp,
            )?,
        };
        m.kl_teacher_student = last.loss - m.teacher_entropy;
        m.loss = last.loss;
        Ok(Some(m))
    }

    /// `center = m * center + (1 - m) * mean(teacher_output rows)`, the rows of every rank: as the official
    /// `update_center`, `batch_center = sum(rows)`, all-reduced over the ranks of
    /// [`crate::collective::current`], divided by `rows * world_size` (world size 1: no communication).
    fn update_center(&mut self, teacher: &Tensor) -> Result<()> {
        let rows = teacher.dim(0)?;
        let m = self.cfg.center_momentum;
        let world = crate::collective::world_size();
        let sum = teacher.sum_keepdim(0)?;
        let sum = if world > 1 {
            let mut v = sum.flatten_all()?.to_vec1::<f32>()?;
            crate::collective::current().all_reduce_sum_f32(&mut v)?;
            Tensor::from_vec(v, sum.shape(), sum.device())?
        } else {
            sum
        };
        // torch divides by the row count (true division), then scales by python floats.
        let denom = Tensor::new((rows * world) as f32, teacher.device())?;
        let batch_center = sum.broadcast_div(&denom)?;
        self.center = (self.center.affine(m, 0.0)? + batch_center.affine(1.0 - m, 0.0)?)?.detach();
        Ok(())
    }

    fn check_shapes(&self, student: &Tensor, teacher: &Tensor) -> Result<(usize, usize, usize)> {
        let n = self.cfg.ncrops;
        let k = self.cfg.out_dim;
        let sd = student.dims();
        if sd.len() != 2 || sd[1] != k {
            return Err(Error::shape(
                "student_output",
                format!("(ncrops * B, K) with K = {k}"),
                sd,
            ));
        }
        if sd[0] == 0 || sd[0] % n > 0 {
            return Err(Error::shape(
                "student_output",
                format!("a positive multiple of ncrops = {n} rows (crop-major, n * B)"),
                sd,
            ));
        }
        let b = sd[0] / n;
        let td = teacher.dims();
        if td.len() != 2 || td[1] != k {
            return Err(Error::shape(
                "teacher_output",
                format!("(2 * B, K) with K = {k}"),
                td,
            ));
        }
        if td[0] != 2 * b {
            return Err(Error::shape(
                "teacher_output",
                format!(
                    "2 * B = {} rows (B = {b} from student_output {sd:?})",
                    2 * b
                ),
                td,
            ));
        }
        if !student.device().same_device(teacher.device()) {
            return Err(Error::arg(
                "teacher_output",
                "must be on the student_output's device",
            ));
        }
        Ok((n, b, k))
    }
}

/// The loss composed from candle ops (any device, autograd through `log_softmax`); the fused CPU op
/// computes the same thing.
pub fn dino_loss_composed(
    student_output: &Tensor,
    teacher_output: &Tensor,
    center: &Tensor,
    ncrops: usize,
    student_temp: f64,
    teacher_temp: f64,
) -> Result<Tensor> {
    let q = teacher_probs_composed(&teacher_output.detach(), center, teacher_temp)?;
    dino_loss_composed_views(student_output, &q, ncrops, 0..ncrops, student_temp)
}

/// The loss of [`dino_loss_composed`] for given teacher targets `teacher_probs` (2B, K) (e.g. from
/// [`sinkhorn_knopp_teacher`]), composed from candle ops.
pub fn dino_loss_composed_probs(
    student_output: &Tensor,
    teacher_probs: &Tensor,
    ncrops: usize,
    student_temp: f64,
) -> Result<Tensor> {
    dino_loss_composed_views(
        student_output,
        teacher_probs,
        ncrops,
        0..ncrops,
        student_temp,
    )
}

/// `softmax((teacher - center) / teacher_temp)` in f64 (2B, K), detached.
fn teacher_probs_composed(teacher: &Tensor, center: &Tensor, teacher_temp: f64) -> Result<Tensor> {
    // In f64, as the fused kernel's sums: candle's f32 reductions add K = 65536 terms one after another, which
    // put the gradient 3e-3 relative away from the official values (torch's f32 sums are pairwise).
    let dt = DType::F64;
    let teacher = teacher.detach().to_dtype(dt)?;
    let center = center.to_dtype(dt)?;
    Ok(candle_nn::ops::softmax(
        &(teacher.broadcast_sub(&center)? / teacher_temp)?,
        D::Minus1,
    )?
    .detach())
}

/// The loss terms of the student crops `views` (rows `(views.len() * B, K)`) against the teacher targets
/// `q` (2B, K), each divided by the pair count of all `ncrops` crops; composed from candle ops in f64 (the
/// loss comes back in the student's dtype, the gradient flows through the casts).
fn dino_loss_composed_views(
    student_output: &Tensor,
    q: &Tensor,
    ncrops: usize,
    views: Range<usize>,
    student_temp: f64,
) -> Result<Tensor> {
    let dt = DType::F64;
    let student = (student_output.to_dtype(dt)? / student_temp)?;
    let ls = candle_nn::ops::log_softmax(&student, D::Minus1)?;
    Ok(
        cross_entropy_pairs(&ls, &q.detach().to_dtype(dt)?, ncrops, views)?
            .to_dtype(student_output.dtype())?,
    )
}

/// Over the pairs (teacher crop iq, student crop v != iq) with v in `views`: the batch-mean cross-entropy,
/// summed and divided by the pair count of all `ncrops` crops (2 ncrops - 2), from the student
/// log-probabilities `ls` (views.len() * B, K) and the teacher targets `q` (2B, K).
fn cross_entropy_pairs(
    ls: &Tensor,
    q: &Tensor,
    ncrops: usize,
    views: Range<usize>,
) -> Result<Tensor> {
    let ls = ls.chunk(views.len(), 0)?;
    let q = q.chunk(2, 0)?;
    let b = ls[0].dim(0)? as f64;
    let mut total: Option<Tensor> = None;
    for (iq, qi) in q.iter().enumerate() {
        for (v, lv) in views.clone().zip(&ls) {
            if v == iq {
                continue;
            }
            let term = ((qi * lv)?.sum_all()? * (-1.0 / b))?;
            total = Some(match total {
                Some(t) => (t + term)?,
                None => term,
            });
        }
    }
    let total = total.ok_or_else(|| Error::arg("ncrops", "no pair of different views"))?;
    Ok((total / (2 * ncrops - 2) as f64)?)
}

/// A centre read from a checkpoint (K values, shape already checked) as the (1, K) f32 buffer on `device`.
pub(crate) fn restored_center(center: &Tensor, k: usize, device: &Device) -> Result<Tensor> {
    Ok(center
        .reshape((1, k))?
        .to_dtype(DType::F32)?
        .to_device(device)?
        .detach())
}

/// DINOv2's `sinkhorn_knopp_teacher`: targets (rows, K) from the teacher logits (rows, K) of both global
/// crops. `Q = exp(t / teacher_temp)ᵀ`, `Q /= ΣQ`, then `n_iterations` times: each prototype row divided by
/// its sum and by K, each sample column divided by its sum and by B; finally `Q *= B`, returned transposed
/// (every row sums to 1). B = rows × world size; the total and the prototype sums are all-reduced over the
/// ranks of [`crate::collective::current`], as the official code does. Computed in f64 (the official code:
/// fp32) after subtracting one constant from every logit of every rank (which cancels exactly), so that
/// `t / teacher_temp` up to ~700 apart cannot overflow; a prototype that no sample reaches (its row sums
/// to 0 after underflow) stays 0 instead of the official NaN. A non-finite logit on any rank gives NaN
/// targets on every rank. Returns f32 on the input's device, detached.
pub fn sinkhorn_knopp_teacher(
    teacher_output: &Tensor,
    teacher_temp: f64,
    n_iterations: usize,
) -> Result<Tensor> {
    let rows = teacher_output.dims().first().copied().unwrap_or(0);
    if rows == 0 {
        return Err(Error::shape(
            "teacher_output",
            "(rows, K) with rows, K > 0",
            teacher_output.dims(),
        ));
    }
    let world = crate::collective::current().world_size();
    sinkhorn_knopp(
        teacher_output,
        teacher_temp,
        n_iterations,
        (rows * world) as f64,
    )
}

/// Sinkhorn-Knopp as [`sinkhorn_knopp_teacher`] with the sample count `B` given (iBOT: the masked patch
/// tokens of every rank, `n_masked_patches`). A rank may hold no rows (`(0, K)`): it still takes part in
/// every collective and gets `(0, K)` back.
pub(crate) fn sinkhorn_knopp(
    teacher_output: &Tensor,
    teacher_temp: f64,
    n_iterations: usize,
    b: f64,
) -> Result<Tensor> {
    let (rows, k) = match teacher_output.dims() {
        &[r, k] if k > 0 => (r, k),
        d => {
            return Err(Error::shape(
                "teacher_output",
                "(rows, K) with rows, K > 0",
                d,
            ))
        }
    };
    if !(teacher_temp > 0.0 && teacher_temp.is_finite()) {
        return Err(Error::arg(
            "teacher_temp",
            format!("must be a positive number, got {teacher_temp}"),
        ));
    }
    let t: Vec<f64> = teacher_output
        .detach()
        .to_dtype(DType::F64)?
        .flatten_all()?
        .to_vec1::<f64>()?;
    let coll = crate::collective::current();
    let world = coll.world_size();
    // One shift for every rank (the mean of the maxima of the ranks that hold rows; world 1: the maximum),
    // and whether any rank holds a non-finite logit: then every rank returns NaN targets (after the same
    // collectives), so the loss is NaN and the training loop stops naming the step, as for any other NaN.
    let finite = t.iter().all(|v| v.is_finite());
    let max = t.iter().cloned().fold(f64::NEG_INFINITY, f64::max) / teacher_temp;
    let holds = finite && rows > 0;
    let mut head = [
        if holds { max } else { 0.0 },
        f64::from(u8::from(!finite)),
        f64::from(u8::from(rows > 0)),
    ];
    if world > 1 {
        coll.all_reduce_sum_f64(&mut head)?;
    }
    if head[1] > 0.0 {
        return Ok(Tensor::full(f32::NAN, (rows, k), teacher_output.device())?);
    }
    let shift = if head[2] > 0.0 {
        head[0] / head[2]
    } else {
        0.0
    };
    // q[r * k + j] holds Q[j, r] (the official Q is K x rows; we keep the sample-major layout).
    let mut q: Vec<f64> = t
        .iter()
        .map(|&v| (v / teacher_temp - shift).exp())
        .collect();
    if let Some(i) = q.iter().position(|v| !v.is_finite()) {
        return Err(Error::arg(
            "teacher_output",
            format!(
                "Sinkhorn-Knopp: exp(logit / teacher_temp) overflows at row {}, column {} (the logits of the \
                 ranks lie more than ~700 x teacher_temp apart)",
                i / k,
                i % k
            ),
        ));
    }
    let reduce = |v: &mut [f64]| -> Result<()> {
        if world > 1 {
            coll.all_reduce_sum_f64(v)?;
        }
        Ok(())
    };
    let mut total = [q.iter().sum::<f64>()];
    reduce(&mut total)?;
    if total[0] > 0.0 {
        q.iter_mut().for_each(|v| *v /= total[0]);
    }
    let mut proto = vec![0f64; k];
    for _ in 0..n_iterations {
        proto.iter_mut().for_each(|v| *v = 0.0);
        for row in q.chunks_exact(k) {
            for (p, &v) in proto.iter_mut().zip(row) {
                *p += v;
            }
        }
        reduce(&mut proto)?;
        for row in q.chunks_exact_mut(k) {
            for (v, &p) in row.iter_mut().zip(&proto) {
                *v = if p > 0.0 { *v / p / k as f64 } else { 0.0 };
            }
        }
        for row in q.chunks_exact_mut(k) {
            let s: f64 = row.iter().sum();
            if s > 0.0 {
                row.iter_mut().for_each(|v| *v = *v / s / b);
            }
        }
    }
    let out: Vec<f32> = q.iter().map(|&v| (v * b) as f32).collect();
    Ok(Tensor::from_vec(out, (rows, k), teacher_output.device())?)
}

/// Per-student-row quantities the backward pass reuses: row max of `s / student_temp` and
/// `ln(sum exp(s / student_temp - max))`.
#[derive(Clone, Copy, Default)]
struct RowStats {
    max: f32,
    log_sum: f32,
}

struct FwdCache {
    /// Teacher probabilities, (2B, K) row-major.
    q: Vec<f32>,
    student_rows: Vec<RowStats>,
}

/// The fused DINO loss as a candle `CustomOp2(student (nB, K), teacher (2B, K)) -> ()` with an
/// analytic backward: `d L / d s[v,b,k] = (w_v * p[v,b,k] - Q_v[b,k]) / (student_temp * n_terms * B)`
/// where `p` is the student softmax, `Q_v` the sum of the teacher distributions of the global crops
/// other than v and `w_v = sum_k Q_v[b,k]` their count. The teacher gets no gradient.
pub struct DinoLossOp {
    ncrops: usize,
    /// The student crops this op's first input holds: `views.len() * B` rows (all `0..ncrops` unless
    /// [`DinoLossOp::for_views`] narrowed them).
    views: Range<usize>,
    batch: usize,
    out_dim: usize,
    student_temp: f32,
    teacher_temp: f32,
    center: Vec<f32>,
    /// The second input is already the teacher targets (2B, K) (Sinkhorn-Knopp): no softmax, no centre.
    teacher_probs: bool,
    cache: Mutex<Option<FwdCache>>,
}

impl DinoLossOp {
    /// An op for `ncrops` crops of `batch` rows, `out_dim` = K, with the centre (K values) used for
    /// the teacher.
    pub fn new(
        ncrops: usize,
        batch: usize,
        out_dim: usize,
        student_temp: f64,
        teacher_temp: f64,
        center: Vec<f32>,
    ) -> Self {
        Self {
            ncrops,
            views: 0..ncrops,
            batch,
            out_dim,
            student_temp: student_temp as f32,
            teacher_temp: teacher_temp as f32,
            center,
            teacher_probs: false,
            cache: Mutex::new(None),
        }
    }

    /// An op whose second input is the teacher targets (2B, K) themselves (rows summing to 1, e.g. from
    /// [`sinkhorn_knopp_teacher`]) instead of logits to centre and sharpen.
    pub fn with_teacher_probs(
        ncrops: usize,
        batch: usize,
        out_dim: usize,
        student_temp: f64,
    ) -> Self {
        Self {
            teacher_probs: true,
            ..Self::new(ncrops, batch, out_dim, student_temp, 1.0, Vec::new())
        }
    }

    /// The op for the student crops `views` only (its first input then has `views.len() * B` rows): the
    /// same terms and gradient rows as the op over every crop has for them, divided by the same pair count,
    /// so ops over ranges that cover every crop once add up to the op over all of them.
    pub fn for_views(mut self, views: Range<usize>) -> Self {
        self.views = views;
        self
    }

    fn n_terms(&self) -> usize {
        // every (teacher crop iq in {0, 1}, student crop v != iq): 2(n - 1) for n >= 2
        2 * self.ncrops - 2
    }

    /// Teacher crops (0 and/or 1) whose distribution is a target for student crop `v`.
    fn targets(v: usize) -> &'static [usize] {
        match v {
            0 => &[1],
            1 => &[0],
            _ => &[0, 1],
        }
    }
}

fn cpu_f32<'a>(s: &'a CpuStorage, l: &Layout, name: &str) -> candle_core::Result<&'a [f32]> {
    let data = match s {
        CpuStorage::F32(v) => v.as_slice(),
        _ => candle_core::bail!("dino loss: {name} must be f32, got {:?}", s.dtype()),
    };
    match l.contiguous_offsets() {
        Some((a, b)) => Ok(&data[a..b]),
        None => candle_core::bail!("dino loss: {name} must be contiguous"),
    }
}

impl CustomOp2 for DinoLossOp {
    fn name(&self) -> &'static str {
        "dino-loss"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let (n, b, k) = (self.views.len(), self.batch, self.out_dim);
        let student = cpu_f32(s1, l1, "student_output")?;
        let teacher = cpu_f32(s2, l2, "teacher_output")?;
        let center_ok = self.teacher_probs || self.center.len() == k;
        let views_ok = !self.views.is_empty() && self.views.end <= self.ncrops;
        if student.len() != n * b * k || teacher.len() != 2 * b * k || !center_ok || !views_ok {
            candle_core::bail!(
                "dino loss: sizes do not match crops {:?} of {}, batch {b}, out_dim {k}",
                self.views,
                self.ncrops
            );
        }
        // Teacher: q = softmax((t - center) / T), as torch: subtract, divide, max, exp, normalise. Every
        // element of q is written below (a copy, or each row's first loop) before it is read.
        let mut q = uninit_f32(2 * b * k);
        let center = &self.center;
        let tt = self.teacher_temp;
        if self.teacher_probs {
            q.copy_from_slice(teacher);
        } else {
            par_rows_mut(&mut q, k, |r, qrow| {
                simd!({
                    let t = &teacher[r * k..(r + 1) * k];
                    for ((o, &x), &c) in qrow.iter_mut().zip(t).zip(center) {
                        *o = (x - c) / tt;
                    }
                    let m = max_f32(qrow);
                    let mut acc = [0f32; 16];
                    let mut chunks = qrow.chunks_exact_mut(16);
                    for c in &mut chunks {
                        for i in 0..16 {
                            c[i] = exp_f32(c[i] - m);
                            acc[i] += c[i];
                        }
                    }
                    let mut sum: f64 = acc.iter().map(|&v| v as f64).sum();
                    for v in chunks.into_remainder() {
                        *v = exp_f32(*v - m);
                        sum += *v as f64;
                    }
                    let inv = (1.0 / sum) as f32;
                    for v in qrow.iter_mut() {
                        *v *= inv;
                    }
                })
            });
        }
        // Student: row stats of s / student_temp, then the cross-entropy against each target.
        let st = self.student_temp;
        let mut stats = vec![RowStats::default(); n * b];
        par_fill(&mut stats, k, |r| {
            simd!({
                let s = &student[r * k..(r + 1) * k];
                let m = max_f32(s) / st;
                let log_sum = sum_exp_scaled(s, st, m).ln() as f32;
                RowStats { max: m, log_sum }
            })
        });
        let mut ce = vec![0f64; n * b];
        let q_ref = &q;
        let stats_ref = &stats;
        let v0 = self.views.start;
        par_fill(&mut ce, 2 * k, |r| {
            simd!({
                let (v, bi) = (v0 + r / b, r % b);
                let s = &student[r * k..(r + 1) * k];
                let shift = stats_ref[r].max + stats_ref[r].log_sum;
                // A plain loop, not `map().sum()`: the iterator's `fold` stays out of line and would
                // compile the dot products without the wide vectors of `simd!`.
                let mut total = 0f64;
                for &iq in Self::targets(v) {
                    let qrow = &q_ref[(iq * b + bi) * k..(iq * b + bi + 1) * k];
                    total += -dot_log_softmax(qrow, s, st, shift);
                }
                total
            })
        });
        let loss = ce.iter().sum::<f64>() / (b as f64 * self.n_terms() as f64);
        *self.cache.lock().unwrap_or_else(|e| e.into_inner()) = Some(FwdCache {
            q,
            student_rows: stats,
        });
        Ok((CpuStorage::F32(vec![loss as f32]), Shape::from(())))
    }

    fn bwd(
        &self,
        arg1: &Tensor,
        _arg2: &Tensor,
        _res: &Tensor,
        grad_res: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        let (n, b, k) = (self.views.len(), self.batch, self.out_dim);
        let g = grad_res
            .to_dtype(DType::F32)?
            .flatten_all()?
            .to_vec1::<f32>()?;
        let g = *g
            .first()
            .ok_or_else(|| candle_core::Error::Msg("dino loss: empty grad".into()))?;
        let guard = self.cache.lock().unwrap_or_else(|e| e.into_inner());
        let cache = guard
            .as_ref()
            .ok_or_else(|| candle_core::Error::Msg("dino loss: backward before forward".into()))?;
        let (storage, layout) = arg1.storage_and_layout();
        let student = match &*storage {
            Storage::Cpu(s) => cpu_f32(s, layout, "student_output")?,
            _ => candle_core::bail!("dino loss: the fused op runs on cpu only"),
        };
        let st = self.student_temp;
        let scale = g / (st * (b * self.n_terms()) as f32);
        // Every row's first loop writes all of it before the targets' terms are added.
        let mut grad = uninit_f32(n * b * k);
        let v0 = self.views.start;
        par_rows_mut(&mut grad, k, |r, out| {
            simd!({
                let (v, bi) = (v0 + r / b, r % b);
                let s = &student[r * k..(r + 1) * k];
                let RowStats { max, log_sum } = cache.student_rows[r];
                let shift = max + log_sum;
                let targets = Self::targets(v);
                let w = targets.len() as f32 * scale;
                for (o, &x) in out.iter_mut().zip(s) {
                    *o = w * exp_f32(x / st - shift);
                }
                for &iq in targets {
                    let qrow = &cache.q[(iq * b + bi) * k..(iq * b + bi + 1) * k];
                    for (o, &qv) in out.iter_mut().zip(qrow) {
                        *o -= scale * qv;
                    }
                }
            })
        });
        drop(storage);
        let grad = Tensor::from_vec(grad, (n * b, k), arg1.device())?;
        Ok((Some(grad), None))
    }
}
