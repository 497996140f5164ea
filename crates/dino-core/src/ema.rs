//! The EMA teacher update `teacher = m * teacher + (1 - m) * student` (main_dino.py, after every
//! optimiser step), pairing parameters BY NAME and writing the teacher in place: on CPU a fused
//! `InplaceOp2` loop over each tensor's storage, with no allocation per step. Buffers (BatchNorm running
//! statistics) are not averaged: pass parameters only.

use std::collections::HashMap;

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, InplaceOp2, Layout, Storage, Tensor};

use crate::kernels::{par_ranges, simd, SendPtr};
use crate::params::NamedVar;
use crate::{Error, Result};
use dino_kernels::dispatch::cpu_fast_path;

/// Pairs of (teacher, student) parameters, matched by name, for the in-place EMA update.
#[derive(Debug)]
pub struct EmaTeacher {
    /// (name, teacher var, student tensor), sorted by name.
    pairs: Vec<(String, candle_core::Var, Tensor)>,
}

impl EmaTeacher {
    /// Pairs every teacher parameter with the student parameter of the same name. Errors name a
    /// parameter present on one side only, a shape or dtype mismatch, or a teacher that shares storage
    /// with its student (a teacher aliasing the student collapses at once).
    pub fn new(student: &[NamedVar], teacher: &[NamedVar]) -> Result<Self> {
        let by_name: HashMap<&str, &candle_core::Var> =
            student.iter().map(|(n, v)| (n.as_str(), v)).collect();
        let teacher_names: HashMap<&str, ()> =
            teacher.iter().map(|(n, _)| (n.as_str(), ())).collect();
        if let Some((name, _)) = student
            .iter()
            .find(|(n, _)| !teacher_names.contains_key(n.as_str()))
        {
            return Err(Error::MissingParameter {
                name: name.clone(),
                msg: "present in the student, absent from the teacher".into(),
            });
        }
        let mut pairs = Vec::with_capacity(teacher.len());
        for (name, t) in teacher {
            let s = by_name
                .get(name.as_str())
                .ok_or_else(|| Error::MissingParameter {
                    name: name.clone(),
                    msg: "present in the teacher, absent from the student".into(),
                })?;
            if t.dims() != s.dims() {
                return Err(Error::ParameterShape {
                    name: name.clone(),
                    what: "teacher vs student".into(),
                    expected: s.dims().to_vec(),
                    got: t.dims().to_vec(),
                });
            }
            if t.dtype() != s.dtype() || !t.device().same_device(s.device()) {
                return Err(Error::arg(
                    name.clone(),
                    format!(
                        "teacher ({:?}, {:?}) and student ({:?}, {:?}) differ in dtype or device",
                        t.dtype(),
                        t.device(),
                        s.dtype(),
                        s.device()
                    ),
                ));
            }
            if shares_storage(t.as_tensor(), s.as_tensor()) {
                return Err(Error::arg(
                    name.clone(),
                    "the teacher shares storage with the student (build the teacher on its own VarMap)",
                ));
            }
            pairs.push((name.clone(), t.clone(), s.as_tensor().detach()));
        }
        pairs.sort_by(|a, b| a.0.cmp(&b.0));
        Ok(Self { pairs })
    }

    /// Number of paired parameters.
    pub fn len(&self) -> usize {
        self.pairs.len()
    }

    /// Whether no parameter is paired.
    pub fn is_empty(&self) -> bool {
        self.pairs.is_empty()
    }

    /// The paired parameter names, sorted.
    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.pairs.iter().map(|p| p.0.as_str())
    }

    /// `teacher = momentum * teacher + (1 - momentum) * student` for every pair, in place. In f32 the
    /// rounding is torch's `t.mul_(m).add_((1 - m) * s)`: `fl(fl(t * m) + fl(s * (1 - m)))`.
    pub fn update(&self, momentum: f64) -> Result<()> {
        if !(0.0..=1.0).contains(&momentum) {
            return Err(Error::arg(
                "momentum",
                format!("must lie in [0, 1], got {momentum}"),
            ));
        }
        let op = EmaOp { momentum };
        for (name, t, s) in &self.pairs {
            if cpu_fast_path(&[t.as_tensor(), s]) {
                t.as_tensor()
                    .inplace_op2(s, &op)
                    .map_err(|e| Error::arg(name.clone(), format!("EMA update failed: {e}")))?;
            } else {
                let new =
                    (t.as_tensor().affine(momentum, 0.0)? + s.affine(1.0 - momentum, 0.0)?)?;
                t.set(&new)?;
            }
        }
        Ok(())
    }
}

/// Whether two CPU tensors point into the same allocation (other devices: false; candle's in-place op
/// then rejects aliasing at update time).
pub(crate) fn shares_storage(a: &Tensor, b: &Tensor) -> bool {
    fn range(t: &Tensor) -> Option<(usize, usize)> {
        let (s, _) = t.storage_and_layout();
        match &*s {
            Storage::Cpu(c) => {
                let (ptr, bytes) = match c {
                    CpuStorage::F32(v) => (v.as_ptr() as usize, v.len() * 4),
                    CpuStorage::F64(v) => (v.as_ptr() as usize, v.len() * 8),
                    CpuStorage::BF16(v) => (v.as_ptr() as usize, v.len() * 2),
                    CpuStorage::F16(v) => (v.as_ptr() as usize, v.len() * 2),
                    _ => return None,
                };
                Some((ptr, ptr + bytes))
            }
            _ => None,
        }
    }
    match (range(a), range(b)) {
        (Some((a0, a1)), Some((b0, b1))) => a0 < b1 && b0 < a1 && a1 > a0,
        _ => false,
    }
}

/// The fused in-place EMA kernel.
struct EmaOp {
    momentum: f64,
}

fn contiguous<'a, T>(v: &'a [T], l: &Layout, what: &str) -> candle_core::Result<&'a [T]> {
    match l.contiguous_offsets() {
        Some((a, b)) => Ok(&v[a..b]),
        None => candle_core::bail!("ema: {what} must be contiguous"),
    }
}

impl InplaceOp2 for EmaOp {
    fn name(&self) -> &'static str {
        "ema-update"
    }

    fn cpu_fwd(
        &self,
        s1: &mut CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<()> {
        let Some((t0, t1)) = l1.contiguous_offsets() else {
            candle_core::bail!("ema: teacher must be contiguous")
        };
        match (s1, s2) {
            (CpuStorage::F32(t), CpuStorage::F32(s)) => {
                let s = contiguous(s, l2, "student")?;
                let t = &mut t[t0..t1];
                if s.len() != t.len() {
                    candle_core::bail!(
                        "ema: teacher has {} elements, student {}",
                        t.len(),
                        s.len()
                    );
                }
                let m = self.momentum as f32;
                let om = (1.0 - self.momentum) as f32;
                let tp = SendPtr(t.as_mut_ptr());
                par_ranges(t.len(), |r| {
                    // SAFETY: par_ranges hands out disjoint ranges inside `t`.
                    let t = unsafe { tp.slice_mut(r.clone()) };
                    simd!({
                        for (tv, &sv) in t.iter_mut().zip(&s[r]) {
                            *tv = *tv * m + sv * om;
                        }
                    });
                });
            }
            (CpuStorage::F64(t), CpuStorage::F64(s)) => {
                let s = contiguous(s, l2, "student")?;
                let (m, om) = (self.momentum, 1.0 - self.momentum);
                for (tv, &sv) in t[t0..t1].iter_mut().zip(s) {
                    *tv = *tv * m + sv * om;
                }
            }
            (t, s) => candle_core::bail!(
                "ema: unsupported dtypes teacher {:?} / student {:?} (f32 or f64)",
                t.dtype(),
                s.dtype()
            ),
        }
        Ok(())
    }
}
