//! DINOv2's iBOT masked-patch loss (`dinov2.loss.iBOTPatchLoss`): the student sees global crops with some
//! patches replaced by a mask token and predicts, for each masked patch, the teacher's distribution for the
//! same patch of the unmasked crop. Teacher targets come from an EMA centre of the masked patch logits (as
//! [`crate::DinoLoss`]'s, with its own buffer) or from Sinkhorn-Knopp over the masked patches of the global
//! batch; the loss is the mean over crops of each crop's mean masked-token cross-entropy.
//!
//! Under data parallelism both the centre and Sinkhorn-Knopp use the masked patches of every rank: the centre
//! moves towards the mean over all of them (the official code averages the ranks' means, which differs when
//! ranks hold different numbers of masked patches), so that N ranks train as one.

use candle_core::{DType, Device, Tensor, D};

use crate::loss::{restored_center, sinkhorn_knopp, TeacherCentering};
use crate::{Error, Result};

/// Configuration of [`IbotPatchLoss`]; defaults follow `dinov2.loss.iBOTPatchLoss`.
#[derive(Debug, Clone, PartialEq)]
pub struct IbotPatchLossConfig {
    /// Output dimension K of the head for patch tokens (the DINO head's `out_dim` when shared).
    pub out_dim: usize,
    /// Student temperature (default 0.1).
    pub student_temp: f64,
    /// Momentum of the centre EMA (default 0.9).
    pub center_momentum: f64,
    /// How teacher logits become targets: the EMA centre (default) or Sinkhorn-Knopp.
    pub centering: TeacherCentering,
}

impl IbotPatchLossConfig {
    /// The official defaults for `out_dim` (student temperature 0.1, centre momentum 0.9, centering).
    pub fn new(out_dim: usize) -> Self {
        Self {
            out_dim,
            student_temp: 0.1,
            center_momentum: 0.9,
            centering: TeacherCentering::Centering,
        }
    }
}

/// The iBOT patch loss with its centre buffer (`ibot_patch_loss.center`, shape (1, K), zeros at start).
#[derive(Debug)]
pub struct IbotPatchLoss {
    cfg: IbotPatchLossConfig,
    center: Tensor,
}

impl IbotPatchLoss {
    /// Builds the loss; the centre starts at zeros (1, `out_dim`) f32 on `device`.
    pub fn new(cfg: IbotPatchLossConfig, device: &Device) -> Result<Self> {
        if cfg.out_dim == 0 {
            return Err(Error::arg("out_dim", "must be positive"));
        }
        if !(cfg.student_temp > 0.0 && cfg.student_temp.is_finite()) {
            return Err(Error::arg(
                "student_temp",
                format!("must be a positive number, got {}", cfg.student_temp),
            ));
        }
        if !(0.0..=1.0).contains(&cfg.center_momentum) {
            return Err(Error::arg(
                "center_momentum",
                format!("must lie in [0, 1], got {}", cfg.center_momentum),
            ));
        }
        if cfg.centering == (TeacherCentering::SinkhornKnopp { n_iterations: 0 }) {
            return Err(Error::arg(
                "sinkhorn_knopp n_iterations",
                "must be at least 1",
            ));
        }
        let center = Tensor::zeros((1, cfg.out_dim), DType::F32, device)?;
        Ok(Self { cfg, center })
    }

    /// The configuration.
    pub fn config(&self) -> &IbotPatchLossConfig {
        &self.cfg
    }

    /// The centre buffer, shape (1, K) (the `ibot_patch_loss.center` checkpoint entry).
    pub fn center(&self) -> &Tensor {
        &self.center
    }

    /// Restores the centre from a checkpoint; it must hold K values ((1, K), (K) or (1, 1, K)).
    pub fn set_center(&mut self, center: &Tensor) -> Result<()> {
        let k = self.cfg.out_dim;
        if center.elem_count() != k || center.dims().iter().filter(|&&d| d != 1).count() > 1 {
            return Err(Error::shape("center", format!("(1, {k})"), center.dims()));
        }
        self.center = restored_center(center, k, self.center.device())?;
        Ok(())
    }

    /// `softmax((t - center) / teacher_temp)` of the teacher's masked-patch logits `t` `(n, K)` -> `(n, K)`
    /// f32, detached.
    pub fn softmax_center_teacher(&self, teacher: &Tensor, teacher_temp: f64) -> Result<Tensor> {
        self.check(teacher, "teacher")?;
        let t = teacher.detach().to_dtype(DType::F32)?;
        if t.dim(0)? == 0 {
            return Ok(t);
        }
        Ok(candle_nn::ops::softmax(
            &(t.broadcast_sub(&self.center)? / teacher_temp)?,
            D::Minus1,
        )?)
    }

    /// Moves the centre towards the mean of the masked-patch logits `(n, K)` of every rank:
    /// `center = m · center + (1 − m) · Σ t / n_global`. Nothing changes when no rank has a masked patch.
    pub fn update_center(&mut self, teacher: &Tensor) -> Result<()> {
        self.check(teacher, "teacher")?;
        let k = self.cfg.out_dim;
        let t = teacher.detach().to_dtype(DType::F64)?;
        let mut buf: Vec<f64> = if t.dim(0)? == 0 {
            vec![0.0; k]
        } else {
            t.sum(0)?.to_vec1::<f64>()?
        };
        buf.push(t.dim(0)? as f64);
        let coll = crate::collective::current();
        if coll.world_size() > 1 {
            coll.all_reduce_sum_f64(&mut buf)?;
        }
        let n = buf[k];
        if n == 0.0 {
            return Ok(());
        }
        let mean: Vec<f32> = buf[..k].iter().map(|&v| (v / n) as f32).collect();
        let mean = Tensor::from_vec(mean, (1, k), self.center.device())?;
        let m = self.cfg.center_momentum;
        self.center = ((&self.center * m)? + (mean * (1.0 - m))?)?.detach();
        Ok(())
    }

    /// The targets of the training loop for the teacher's masked-patch logits `(n, K)`: with centering,
    /// [`softmax_center_teacher`](Self::softmax_center_teacher) then [`update_center`](Self::update_center);
    /// with Sinkhorn-Knopp, its targets over the masked patches of every rank (B = their global count).
    pub fn teacher_targets(&mut self, teacher: &Tensor, teacher_temp: f64) -> Result<Tensor> {
        match self.cfg.centering {
            TeacherCentering::Centering => {
                let probs = self.softmax_center_teacher(teacher, teacher_temp)?;
                self.update_center(teacher)?;
                Ok(probs)
            }
            TeacherCentering::SinkhornKnopp { n_iterations } => {
                self.check(teacher, "teacher")?;
                let coll = crate::collective::current();
                let mut n = [teacher.dim(0)? as f64];
                if coll.world_size() > 1 {
                    coll.all_reduce_sum_f64(&mut n)?;
                }
                if n[0] == 0.0 {
                    return Ok(teacher.detach().to_dtype(DType::F32)?);
                }
                sinkhorn_knopp(teacher, teacher_temp, n_iterations, n[0])
            }
        }
    }

    /// `forward_masked`: `−Σ_j w_j Σ_k q_jk log_softmax(s_j / student_temp)_k / n_crops` for the student's
    /// masked-patch logits `s` `(n, K)`, the targets `q` `(n, K)` and each masked patch's weight `w` `(n)`
    /// (1 / the masked patches of its crop), over `n_crops` global crops (those without a mask count as 0).
    /// A scalar in the student's dtype (0 when `n` is 0); the gradient reaches the student only.
    pub fn forward_masked(
        &self,
        student: &Tensor,
        targets: &Tensor,
        weights: &Tensor,
        n_crops: usize,
    ) -> Result<Tensor> {
        self.check(student, "student")?;
        let n = student.dim(0)?;
        if targets.dims() != student.dims() {
            return Err(Error::shape(
                "targets",
                format!("(n, K) = {:?}", student.dims()),
                targets.dims(),
            ));
        }
        if weights.dims() != [n] {
            return Err(Error::shape("weights", format!("({n})"), weights.dims()));
        }
        if n_crops == 0 {
            return Err(Error::arg("n_crops", "must be positive"));
        }
        if n == 0 {
            return Ok(Tensor::zeros((), student.dtype(), student.device())?);
        }
        // f64 inside, as the DINO loss's composed path; the gradient flows through the casts.
        let dt = DType::F64;
        let ls = candle_nn::ops::log_softmax(
            &(student.to_dtype(dt)? / self.cfg.student_temp)?,
            D::Minus1,
        )?;
        let ce = (targets.detach().to_dtype(dt)? * ls)?.sum(1)?; // (n)
        let w = weights.detach().to_dtype(dt)?;
        let loss = ((ce * w)?.sum_all()? * (-1.0 / n_crops as f64))?;
        Ok(loss.to_dtype(student.dtype())?)
    }

    fn check(&self, t: &Tensor, name: &str) -> Result<()> {
        match t.dims() {
            &[_, k] if k == self.cfg.out_dim => Ok(()),
            d => Err(Error::shape(name, format!("(n, {})", self.cfg.out_dim), d)),
        }
    }
}

/// The official `iBOTPatchLoss.forward` on dense tokens: `student` and `targets` `(C, N, K)`, `masks`
/// `(C, N)` (1 = masked, any dtype): per crop the sum over its masked tokens of
/// `Σ_k q log_softmax(s / student_temp)` divided by max(masked count, 1), then minus the mean over crops.
pub fn ibot_loss_dense(
    student: &Tensor,
    targets: &Tensor,
    masks: &Tensor,
    student_temp: f64,
) -> Result<Tensor> {
    let (c, n, _) = student.dims3()?;
    if targets.dims() != student.dims() || masks.dims() != [c, n] {
        return Err(Error::shape(
            "targets / masks",
            format!("(C, N, K) = {:?} and (C, N)", student.dims()),
            targets.dims(),
        ));
    }
    let dt = DType::F64;
    let ls = candle_nn::ops::log_softmax(&(student.to_dtype(dt)? / student_temp)?, D::Minus1)?;
    let ce = (targets.detach().to_dtype(dt)? * ls)?.sum(2)?; // (C, N)
    let m = masks.to_dtype(dt)?;
    let per_crop = ((ce * &m)?.sum(1)? / m.sum(1)?.clamp(1.0, f64::INFINITY)?)?;
    Ok((per_crop.mean_all()? * -1.0)?.to_dtype(student.dtype())?)
}
