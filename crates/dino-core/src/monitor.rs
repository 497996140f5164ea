//! Collapse monitors, cheap enough to log every step (DINO paper §5.3 and spec §2):
//!
//! - `teacher_entropy`: mean over samples of H(P_t), P_t = softmax((t - center) / teacher_temp), in nats.
//!   **Uniform collapse**: it climbs to `max_entropy = ln K` (11.09 for K = 65536) and the loss sticks
//!   at ln K. **One-hot collapse**: it falls to 0.
//! - `teacher_mean_entropy`: H of the batch-mean teacher distribution. Healthy training has low
//!   per-sample entropy but a high entropy of the mean (images use different prototypes); if both go
//!   to 0 every image picks the same dimension (one-hot / dimension collapse).
//! - `kl_teacher_student`: mean KL(P_t || P_s) over the cross-view pairs = loss - teacher_entropy.
//!   Going to 0 means the student output equals the teacher's: nothing left to learn (either collapse).
//! - `teacher_std`: mean over dimensions of the per-dimension standard deviation (unbiased, over the
//!   batch) of the l2-normalised teacher outputs; about `1/sqrt(K)` for spread-out outputs, 0 when
//!   every image maps to the same vector. [`output_std`] applies it to any (N, D) tensor, e.g. backbone
//!   features, the SimSiam collapse criterion.

use candle_core::{DType, Tensor, D};

use crate::{Error, Result};

/// Collapse indicators for one step; `NaN` marks a value not computed.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct CollapseMetrics {
    /// The DINO loss of the step (NaN when computed from the teacher only).
    pub loss: f64,
    /// Mean per-sample entropy of the teacher distribution, nats; -> ln K uniform, -> 0 one-hot collapse.
    pub teacher_entropy: f64,
    /// Entropy of the batch-mean teacher distribution, nats; -> 0 when every sample uses one dimension.
    pub teacher_mean_entropy: f64,
    /// Mean KL(teacher || student) over cross-view pairs, nats; -> 0 in either collapse.
    pub kl_teacher_student: f64,
    /// Mean per-dimension std of the l2-normalised teacher outputs; -> 0 in collapse, ~1/sqrt(K) healthy.
    pub teacher_std: f64,
    /// ln K, the entropy of the uniform distribution (the uniform-collapse level).
    pub max_entropy: f64,
}

impl CollapseMetrics {
    /// Teacher-side metrics from the raw teacher output (2B, K), the centre used (1, K) and the teacher
    /// temperature; `loss` and `kl_teacher_student` are NaN.
    pub fn from_teacher(
        teacher_output: &Tensor,
        center: &Tensor,
        teacher_temp: f64,
    ) -> Result<Self> {
        let probs = teacher_probs(teacher_output, center, teacher_temp)?;
        Ok(Self {
            loss: f64::NAN,
            teacher_entropy: mean_entropy(&probs)?,
            teacher_mean_entropy: entropy_of_mean(&probs)?,
            kl_teacher_student: f64::NAN,
            teacher_std: output_std(teacher_output)?,
            max_entropy: (probs.dim(1)? as f64).ln(),
        })
    }

    /// Teacher-side metrics from the raw teacher output (2B, K) and the targets actually used (2B, K), e.g.
    /// Sinkhorn-Knopp's; `loss` and `kl_teacher_student` are NaN.
    pub fn from_probs(teacher_output: &Tensor, probs: &Tensor) -> Result<Self> {
        Ok(Self {
            loss: f64::NAN,
            teacher_entropy: mean_entropy(probs)?,
            teacher_mean_entropy: entropy_of_mean(probs)?,
            kl_teacher_student: f64::NAN,
            teacher_std: output_std(teacher_output)?,
            max_entropy: (probs.dim(1)? as f64).ln(),
        })
    }

    /// Every metric from the student output (n*B, K), crop-major, and the teacher output (2B, K).
    pub fn compute(
        student_output: &Tensor,
        teacher_output: &Tensor,
        center: &Tensor,
        ncrops: usize,
        student_temp: f64,
        teacher_temp: f64,
    ) -> Result<Self> {
        let mut m = Self::from_teacher(teacher_output, center, teacher_temp)?;
        m.kl_teacher_student = kl_teacher_student(
            student_output,
            teacher_output,
            center,
            ncrops,
            student_temp,
            teacher_temp,
        )?;
        m.loss = m.kl_teacher_student + m.teacher_entropy;
        Ok(m)
    }
}

fn check_2d(t: &Tensor, name: &str) -> Result<(usize, usize)> {
    match t.dims() {
        [r, c] if *r > 0 && *c > 0 => Ok((*r, *c)),
        d => Err(Error::shape(name, "a non-empty (rows, K) matrix", d)),
    }
}

/// Teacher probabilities `softmax((teacher_output - center) / teacher_temp)`, (2B, K) f32, detached.
pub fn teacher_probs(
    teacher_output: &Tensor,
    center: &Tensor,
    teacher_temp: f64,
) -> Result<Tensor> {
    let (_, k) = check_2d(teacher_output, "teacher_output")?;
    if center.elem_count() != k {
        return Err(Error::shape("center", format!("(1, {k})"), center.dims()));
    }
    let t = teacher_output.detach().to_dtype(DType::F32)?;
    let c = center.to_dtype(DType::F32)?.reshape((1, k))?;
    Ok(candle_nn::ops::softmax(
        &(t.broadcast_sub(&c)? / teacher_temp)?,
        D::Minus1,
    )?)
}

/// Entropy of each row of a probability matrix, `-sum p ln p` (0 ln 0 = 0), in nats: (rows,) f32.
pub fn row_entropy(probs: &Tensor) -> Result<Tensor> {
    check_2d(probs, "probs")?;
    let p = probs.to_dtype(DType::F32)?;
    let logp = p.clamp(1e-30f32, 1f32)?.log()?;
    Ok((p * logp)?.sum(1)?.neg()?)
}

/// Mean over rows of the row entropies, nats.
pub fn mean_entropy(probs: &Tensor) -> Result<f64> {
    Ok(row_entropy(probs)?
        .to_dtype(DType::F64)?
        .mean_all()?
        .to_scalar::<f64>()?)
}

/// Entropy of the mean of the rows (the batch-mean distribution), nats.
pub fn entropy_of_mean(probs: &Tensor) -> Result<f64> {
    let mean = probs.to_dtype(DType::F32)?.mean_keepdim(0)?;
    mean_entropy(&mean)
}

/// Mean over cross-view pairs (teacher crop t in {0, 1}, student crop s != t) and samples of
/// KL(P_t || P_s), with P_s = softmax(student / student_temp); nats.
pub fn kl_teacher_student(
    student_output: &Tensor,
    teacher_output: &Tensor,
    center: &Tensor,
    ncrops: usize,
    student_temp: f64,
    teacher_temp: f64,
) -> Result<f64> {
    let (rows, k) = check_2d(student_output, "student_output")?;
    if ncrops < 2 || rows % ncrops > 0 {
        return Err(Error::shape(
            "student_output",
            format!("a multiple of ncrops = {ncrops} (>= 2) rows"),
            student_output.dims(),
        ));
    }
    let b = rows / ncrops;
    let (trows, tk) = check_2d(teacher_output, "teacher_output")?;
    if trows != 2 * b || tk != k {
        return Err(Error::shape(
            "teacher_output",
            format!("({}, {k})", 2 * b),
            teacher_output.dims(),
        ));
    }
    let q = teacher_probs(teacher_output, center, teacher_temp)?;
    let logq = q.clamp(1e-30f32, 1f32)?.log()?;
    let ls = candle_nn::ops::log_softmax(
        &(student_output.detach().to_dtype(DType::F32)? / student_temp)?,
        D::Minus1,
    )?;
    let mut total = 0f64;
    let mut terms = 0usize;
    for iq in 0..2 {
        let qi = q.narrow(0, iq * b, b)?;
        let lqi = logq.narrow(0, iq * b, b)?;
        for v in (0..ncrops).filter(|&v| v != iq) {
            let lv = ls.narrow(0, v * b, b)?;
            let kl = (&qi * (&lqi - &lv)?)?
                .sum_all()?
                .to_dtype(DType::F64)?
                .to_scalar::<f64>()?;
            total += kl / b as f64;
            terms += 1;
        }
    }
    Ok(total / terms as f64)
}

/// Mean over the D dimensions of the per-dimension standard deviation (unbiased, over the N rows) of
/// the l2-normalised rows of `x` (N, D); 0 if N < 2.
pub fn output_std(x: &Tensor) -> Result<f64> {
    let (n, _) = check_2d(x, "x")?;
    if n < 2 {
        return Ok(0.0);
    }
    let z = crate::knn::l2_normalize(&x.detach().to_dtype(DType::F32)?)?;
    let mean = z.mean_keepdim(0)?;
    let var = (z.broadcast_sub(&mean)?.sqr()?.sum_keepdim(0)? / (n as f64 - 1.0))?;
    Ok(var
        .sqrt()?
        .to_dtype(DType::F64)?
        .mean_all()?
        .to_scalar::<f64>()?)
}
