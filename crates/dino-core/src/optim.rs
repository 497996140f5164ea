//! The optimisation pieces of the official training loop (spec §1.9): parameter groups, torch-exact
//! AdamW with per-parameter step counts (fused and in place on CPU), SGD and LARS behind the same group
//! API, per-parameter gradient clipping (`utils.clip_gradients`) and dropping the last layer's
//! gradients while `epoch < freeze_last_layer` (`utils.cancel_gradients_last_layer`).

use std::collections::{BTreeMap, HashMap, HashSet};

use candle_core::backprop::GradStore;
use candle_core::{CpuStorage, DType, InplaceOp2, Layout, Storage, Tensor, Var};

use crate::kernels::{dot, par_ranges, simd, SendPtr};
use crate::params::NamedVar;
use crate::{Error, Result};
use dino_kernels::dispatch::cpu_fast_path;

/// A parameter group: parameters sharing a learning rate and a weight decay (torch `param_groups`).
#[derive(Debug, Clone)]
pub struct ParamGroup {
    /// The group's parameters, (name, var).
    pub params: Vec<NamedVar>,
    /// Learning rate (the official loop overwrites it every iteration from the lr schedule).
    pub lr: f64,
    /// Weight decay (group 0 follows the wd schedule; group 1, biases and 1-D tensors, keeps 0).
    pub weight_decay: f64,
}

impl ParamGroup {
    /// A group with `lr` 0 and `weight_decay` 0 (set both from the schedules before each step).
    pub fn new(params: Vec<NamedVar>) -> Self {
        Self {
            params,
            lr: 0.0,
            weight_decay: 0.0,
        }
    }
}

/// The common interface of [`AdamW`], [`Sgd`] and [`Lars`].
pub trait Optimizer {
    /// One update from the gradients in `grads`; parameters without a gradient are skipped entirely.
    fn step(&mut self, grads: &GradStore) -> Result<()>;
    /// Sets the learning rate of group `group`.
    fn set_lr(&mut self, group: usize, lr: f64) -> Result<()>;
    /// Sets the weight decay of group `group`.
    fn set_weight_decay(&mut self, group: usize, weight_decay: f64) -> Result<()>;
    /// The groups (parameters, lr, weight decay).
    fn groups(&self) -> &[ParamGroup];
    /// The per-parameter state as flat named tensors for a checkpoint (`{state}.{parameter}`).
    fn state_tensors(&self) -> Result<BTreeMap<String, Tensor>>;
    /// Restores the state written by [`state_tensors`](Self::state_tensors). An unknown key or parameter, or
    /// a tensor whose shape is not its parameter's, is an error naming it; parameters absent from `tensors`
    /// restart from an empty state (as torch).
    fn load_state_tensors(&mut self, tensors: &HashMap<String, Tensor>) -> Result<()>;
}

fn check_groups(groups: &[ParamGroup]) -> Result<()> {
    let mut seen = HashSet::new();
    for g in groups {
        for (name, _) in &g.params {
            if !seen.insert(name.as_str()) {
                return Err(Error::arg(
                    "groups",
                    format!("parameter {name:?} appears in more than one place"),
                ));
            }
        }
    }
    Ok(())
}

fn group_mut(groups: &mut [ParamGroup], group: usize) -> Result<&mut ParamGroup> {
    let n = groups.len();
    groups
        .get_mut(group)
        .ok_or_else(|| Error::arg("group", format!("index {group} out of range ({n} groups)")))
}

/// The gradient of `var`, checked against its shape, or `None`.
fn grad_of<'a>(grads: &'a GradStore, name: &str, var: &Var) -> Result<Option<&'a Tensor>> {
    match grads.get(var.as_tensor()) {
        None => Ok(None),
        Some(g) if g.dims() != var.dims() => Err(Error::ParameterShape {
            name: name.to_string(),
            what: "gradient vs parameter".into(),
            expected: var.dims().to_vec(),
            got: g.dims().to_vec(),
        }),
        Some(g) => Ok(Some(g)),
    }
}

/// AdamW hyper-parameters (torch defaults).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AdamWConfig {
    /// beta1 (default 0.9).
    pub beta1: f64,
    /// beta2 (default 0.999).
    pub beta2: f64,
    /// eps (default 1e-8).
    pub eps: f64,
}

impl Default for AdamWConfig {
    fn default() -> Self {
        Self {
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
        }
    }
}

/// One parameter's AdamW state, as torch stores it (`step`, `exp_avg`, `exp_avg_sq`).
#[derive(Debug, Clone)]
pub struct AdamWParamState {
    /// Number of updates this parameter received.
    pub step: u64,
    /// First moment m, the parameter's shape, f32.
    pub exp_avg: Tensor,
    /// Second moment v, the parameter's shape, f32.
    pub exp_avg_sq: Tensor,
}

#[derive(Debug)]
enum Moments {
    /// CPU f32: plain vectors updated by the fused kernel.
    Cpu { m: Vec<f32>, v: Vec<f32> },
    /// Any other device or dtype: tensors updated with candle ops.
    Dev { m: Tensor, v: Tensor },
}

#[derive(Debug)]
struct AdamState {
    step: u64,
    moments: Moments,
}

/// torch.optim.AdamW, exactly: per element, with t counted PER PARAMETER,
/// `p *= 1 - lr*wd; m = lerp(m, g, 1-beta1); v = beta2 v + (1-beta2) g^2;
/// p -= lr/(1-beta1^t) * m / (sqrt(v)/sqrt(1-beta2^t) + eps)`. A parameter without a gradient in the
/// `GradStore` is skipped entirely (no decay, no moment update, no step count).
#[derive(Debug)]
pub struct AdamW {
    groups: Vec<ParamGroup>,
    cfg: AdamWConfig,
    state: HashMap<String, AdamState>,
}

impl AdamW {
    /// AdamW with torch's default betas and eps over `groups` (names must be unique).
    pub fn new(groups: Vec<ParamGroup>) -> Result<Self> {
        Self::with_config(groups, AdamWConfig::default())
    }

    /// AdamW with explicit hyper-parameters.
    pub fn with_config(groups: Vec<ParamGroup>, cfg: AdamWConfig) -> Result<Self> {
        check_groups(&groups)?;
        Ok(Self {
            groups,
            cfg,
            state: HashMap::new(),
        })
    }

    /// Sets the learning rate of group `group`.
    pub fn set_lr(&mut self, group: usize, lr: f64) -> Result<()> {
        group_mut(&mut self.groups, group)?.lr = lr;
        Ok(())
    }

    /// Sets the weight decay of group `group`.
    pub fn set_weight_decay(&mut self, group: usize, weight_decay: f64) -> Result<()> {
        group_mut(&mut self.groups, group)?.weight_decay = weight_decay;
        Ok(())
    }

    /// The parameter groups.
    pub fn groups(&self) -> &[ParamGroup] {
        &self.groups
    }

    /// The per-parameter step count (0 for a parameter never updated).
    pub fn step_count(&self, name: &str) -> u64 {
        self.state.get(name).map_or(0, |s| s.step)
    }

    /// One AdamW step over every group.
    pub fn step(&mut self, grads: &GradStore) -> Result<()> {
        let cfg = self.cfg;
        for group in &self.groups {
            for (name, var) in &group.params {
                let Some(grad) = grad_of(grads, name, var)? else {
                    continue;
                };
                let fast = cpu_fast_path(&[var.as_tensor(), grad])
                    && var.dtype() == DType::F32
                    && grad.dtype() == DType::F32;
                let state = match self.state.entry(name.clone()) {
                    std::collections::hash_map::Entry::Occupied(e) => e.into_mut(),
                    std::collections::hash_map::Entry::Vacant(e) => {
                        let moments = if fast {
                            let n = var.elem_count();
                            Moments::Cpu {
                                m: vec![0.0; n],
                                v: vec![0.0; n],
                            }
                        } else {
                            Moments::Dev {
                                m: var.zeros_like()?.to_dtype(DType::F32)?,
                                v: var.zeros_like()?.to_dtype(DType::F32)?,
                            }
                        };
                        e.insert(AdamState { step: 0, moments })
                    }
                };
                state.step += 1;
                let t = state.step as i32;
                let bc1 = 1.0 - cfg.beta1.powi(t);
                let bc2 = 1.0 - cfg.beta2.powi(t);
                let k = AdamKernel {
                    decay: (1.0 - group.lr * group.weight_decay) as f32,
                    apply_decay: group.weight_decay != 0.0,
                    lerp_w: (1.0 - cfg.beta1) as f32,
                    beta2: cfg.beta2 as f32,
                    one_minus_beta2: (1.0 - cfg.beta2) as f32,
                    neg_step_size: (-(group.lr / bc1)) as f32,
                    bc2_sqrt: bc2.sqrt() as f32,
                    eps: cfg.eps as f32,
                    m: std::ptr::null_mut(),
                    v: std::ptr::null_mut(),
                    len: 0,
                };
                match &mut state.moments {
                    Moments::Cpu { m, v } if fast => {
                        let k = AdamKernel {
                            m: m.as_mut_ptr(),
                            v: v.as_mut_ptr(),
                            len: m.len(),
                            ..k
                        };
                        let grad = grad.contiguous()?;
                        var.as_tensor().inplace_op2(&grad, &k).map_err(|e| {
                            Error::arg(name.clone(), format!("AdamW step failed: {e}"))
                        })?;
                    }
                    Moments::Dev { m, v } => {
                        let g = grad.to_dtype(DType::F32)?;
                        let mut p = var.as_tensor().to_dtype(DType::F32)?;
                        if k.apply_decay {
                            p = p.affine(1.0 - group.lr * group.weight_decay, 0.0)?;
                        }
                        *m = (m.affine(cfg.beta1, 0.0)? + g.affine(1.0 - cfg.beta1, 0.0)?)?;
                        *v =
                            (v.affine(cfg.beta2, 0.0)? + g.sqr()?.affine(1.0 - cfg.beta2, 0.0)?)?;
                        let denom = ((v.sqrt()? / bc2.sqrt())? + cfg.eps)?;
                        p = (p - (m.affine(group.lr / bc1, 0.0)? / denom)?)?;
                        var.set(&p.to_dtype(var.dtype())?)?;
                    }
                    Moments::Cpu { .. } => {
                        return Err(Error::arg(
                            name.clone(),
                            "parameter moved off the CPU or changed dtype",
                        ));
                    }
                }
            }
        }
        Ok(())
    }

    fn find_var(&self, name: &str) -> Option<&Var> {
        find_var(&self.groups, name)
    }

    /// The state of every parameter that was updated at least once, sorted by name (torch's
    /// `optimizer.state_dict()["state"]`, keyed by name instead of index).
    pub fn export_state(&self) -> Result<Vec<(String, AdamWParamState)>> {
        let mut out = Vec::with_capacity(self.state.len());
        for (name, st) in &self.state {
            let var = self.find_var(name).ok_or_else(|| Error::MissingParameter {
                name: name.clone(),
                msg: "optimizer state without a parameter".into(),
            })?;
            let (m, v) = match &st.moments {
                Moments::Cpu { m, v } => (
                    Tensor::from_slice(m, var.shape(), var.device())?,
                    Tensor::from_slice(v, var.shape(), var.device())?,
                ),
                Moments::Dev { m, v } => (m.copy()?, v.copy()?),
            };
            out.push((
                name.clone(),
                AdamWParamState {
                    step: st.step,
                    exp_avg: m,
                    exp_avg_sq: v,
                },
            ));
        }
        out.sort_by(|a, b| a.0.cmp(&b.0));
        Ok(out)
    }

    /// Restores state exported by [`export_state`](Self::export_state). Every name must be a parameter
    /// of this optimiser and every moment must have its shape; parameters absent from `state` restart
    /// from zero moments and step 0 (as torch).
    pub fn import_state(&mut self, state: &[(String, AdamWParamState)]) -> Result<()> {
        let mut new = HashMap::with_capacity(state.len());
        for (name, st) in state {
            let var = param_for_state(
                &self.groups,
                name,
                &[("exp_avg", &st.exp_avg), ("exp_avg_sq", &st.exp_avg_sq)],
            )?;
            let moments = if cpu_fast_path(&[var.as_tensor()]) && var.dtype() == DType::F32 {
                Moments::Cpu {
                    m: st
                        .exp_avg
                        .to_dtype(DType::F32)?
                        .flatten_all()?
                        .to_vec1::<f32>()?,
                    v: st
                        .exp_avg_sq
                        .to_dtype(DType::F32)?
                        .flatten_all()?
                        .to_vec1::<f32>()?,
                }
            } else {
                Moments::Dev {
                    m: st.exp_avg.to_dtype(DType::F32)?.to_device(var.device())?,
                    v: st
                        .exp_avg_sq
                        .to_dtype(DType::F32)?
                        .to_device(var.device())?,
                }
            };
            new.insert(
                name.clone(),
                AdamState {
                    step: st.step,
                    moments,
                },
            );
        }
        self.state = new;
        Ok(())
    }

    /// The state as flat named tensors for a safetensors checkpoint: `exp_avg.{name}`,
    /// `exp_avg_sq.{name}` (f32) and `step.{name}` (i64 scalar shaped (1)).
    pub fn state_tensors(&self) -> Result<BTreeMap<String, Tensor>> {
        let mut out = BTreeMap::new();
        for (name, st) in self.export_state()? {
            let dev = st.exp_avg.device().clone();
            out.insert(format!("exp_avg.{name}"), st.exp_avg);
            out.insert(format!("exp_avg_sq.{name}"), st.exp_avg_sq);
            out.insert(
                format!("step.{name}"),
                Tensor::new(&[st.step as i64], &dev)?,
            );
        }
        Ok(out)
    }

    /// Restores from [`state_tensors`](Self::state_tensors)' layout; a missing moment or an unknown key
    /// is an error naming it.
    pub fn load_state_tensors(&mut self, tensors: &HashMap<String, Tensor>) -> Result<()> {
        let mut state = Vec::new();
        for (key, t) in tensors {
            let Some(name) = key.strip_prefix("step.") else {
                if !(key.starts_with("exp_avg.") || key.starts_with("exp_avg_sq.")) {
                    return Err(Error::arg(key.clone(), "unknown optimizer state key"));
                }
                continue;
            };
            let step = t.flatten_all()?.to_dtype(DType::F64)?.to_vec1::<f64>()?;
            let step = match step.as_slice() {
                [s] if *s >= 0.0 => *s as u64,
                _ => {
                    return Err(Error::shape(
                        key.clone(),
                        "one non-negative step count",
                        t.dims(),
                    ))
                }
            };
            let get = |prefix: &str| {
                tensors
                    .get(&format!("{prefix}.{name}"))
                    .cloned()
                    .ok_or_else(|| Error::MissingParameter {
                        name: format!("{prefix}.{name}"),
                        msg: "optimizer state has a step count but not this moment".into(),
                    })
            };
            state.push((
                name.to_string(),
                AdamWParamState {
                    step,
                    exp_avg: get("exp_avg")?,
                    exp_avg_sq: get("exp_avg_sq")?,
                },
            ));
        }
        for key in tensors.keys() {
            let name = key
                .strip_prefix("exp_avg_sq.")
                .or_else(|| key.strip_prefix("exp_avg."));
            if let Some(name) = name {
                if !tensors.contains_key(&format!("step.{name}")) {
                    return Err(Error::MissingParameter {
                        name: format!("step.{name}"),
                        msg: format!("{key} has no step count"),
                    });
                }
            }
        }
        self.import_state(&state)
    }
}

impl Optimizer for AdamW {
    fn step(&mut self, grads: &GradStore) -> Result<()> {
        AdamW::step(self, grads)
    }
    fn set_lr(&mut self, group: usize, lr: f64) -> Result<()> {
        AdamW::set_lr(self, group, lr)
    }
    fn set_weight_decay(&mut self, group: usize, weight_decay: f64) -> Result<()> {
        AdamW::set_weight_decay(self, group, weight_decay)
    }
    fn groups(&self) -> &[ParamGroup] {
        &self.groups
    }
    fn state_tensors(&self) -> Result<BTreeMap<String, Tensor>> {
        AdamW::state_tensors(self)
    }
    fn load_state_tensors(&mut self, tensors: &HashMap<String, Tensor>) -> Result<()> {
        AdamW::load_state_tensors(self, tensors)
    }
}

/// The fused AdamW update of one f32 CPU tensor, in place (parameter through candle's `InplaceOp2`,
/// moments through raw pointers into the optimiser's own vectors).
struct AdamKernel {
    decay: f32,
    apply_decay: bool,
    lerp_w: f32,
    beta2: f32,
    one_minus_beta2: f32,
    neg_step_size: f32,
    bc2_sqrt: f32,
    eps: f32,
    m: *mut f32,
    v: *mut f32,
    len: usize,
}

impl AdamKernel {
    #[inline(always)]
    fn update(&self, p: &mut [f32], g: &[f32], m: &mut [f32], v: &mut [f32]) {
        let (decay, w, b2, omb2, nss, bc2s, eps) = (
            self.decay,
            self.lerp_w,
            self.beta2,
            self.one_minus_beta2,
            self.neg_step_size,
            self.bc2_sqrt,
            self.eps,
        );
        let lerp_low = w < 0.5;
        for (((p, &g), m), v) in p.iter_mut().zip(g).zip(m.iter_mut()).zip(v.iter_mut()) {
            if self.apply_decay {
                *p *= decay;
            }
            // torch.lerp: weight < 0.5 ? a + w (b - a) : b - (b - a)(1 - w)
            *m = if lerp_low {
                *m + w * (g - *m)
            } else {
                g - (g - *m) * (1.0 - w)
            };
            *v = *v * b2 + omb2 * g * g;
            let denom = v.sqrt() / bc2s + eps;
            *p += nss * *m / denom;
        }
    }
}

impl InplaceOp2 for AdamKernel {
    fn name(&self) -> &'static str {
        "adamw-step"
    }

    fn cpu_fwd(
        &self,
        s1: &mut CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<()> {
        let (CpuStorage::F32(p), CpuStorage::F32(g)) = (s1, s2) else {
            candle_core::bail!("adamw: fused kernel needs f32 parameter and gradient")
        };
        let (Some((p0, p1)), Some((g0, g1))) = (l1.contiguous_offsets(), l2.contiguous_offsets())
        else {
            candle_core::bail!("adamw: parameter and gradient must be contiguous")
        };
        let p = &mut p[p0..p1];
        let g = &g[g0..g1];
        if p.len() != self.len || g.len() != self.len {
            candle_core::bail!(
                "adamw: parameter {} / gradient {} / state {} sizes differ",
                p.len(),
                g.len(),
                self.len
            );
        }
        let (pp, mp, vp) = (SendPtr(p.as_mut_ptr()), SendPtr(self.m), SendPtr(self.v));
        par_ranges(self.len, |r| {
            // SAFETY: disjoint ranges of three buffers of length `self.len`, each owned exclusively here
            // (the parameter under candle's write lock, the moments by `&mut AdamW`).
            let (p, m, v) = unsafe {
                (
                    pp.slice_mut(r.clone()),
                    mp.slice_mut(r.clone()),
                    vp.slice_mut(r.clone()),
                )
            };
            simd!({ self.update(p, &g[r], m, v) });
        });
        Ok(())
    }
}

// SAFETY: the raw moment pointers are only dereferenced inside `cpu_fwd`, on disjoint ranges.
unsafe impl Sync for AdamKernel {}

/// torch.optim.SGD as the official `--optimizer sgd` uses it: momentum 0.9 (dampening 0, no Nesterov),
/// coupled weight decay `g += wd * p`, `buf = momentum * buf + g` (buf = g at the first step),
/// `p -= lr * buf`.
#[derive(Debug)]
pub struct Sgd {
    groups: Vec<ParamGroup>,
    momentum: f64,
    buffers: HashMap<String, Tensor>,
}

impl Sgd {
    /// SGD with `momentum` (the official code uses 0.9).
    pub fn new(groups: Vec<ParamGroup>, momentum: f64) -> Result<Self> {
        check_groups(&groups)?;
        Ok(Self {
            groups,
            momentum,
            buffers: HashMap::new(),
        })
    }

    /// The momentum buffer of a parameter, if it was updated.
    pub fn momentum_buffer(&self, name: &str) -> Option<&Tensor> {
        self.buffers.get(name)
    }
}

/// Momentum buffers as checkpoint tensors `{key}.{name}`.
fn buffers_to_tensors(key: &str, buffers: &HashMap<String, Tensor>) -> BTreeMap<String, Tensor> {
    buffers
        .iter()
        .map(|(name, t)| (format!("{key}.{name}"), t.clone()))
        .collect()
}

/// Momentum buffers from checkpoint tensors `{key}.{name}`: each must name a parameter of `groups` and have
/// its shape; it is converted to the parameter's dtype and device.
fn buffers_from_tensors(
    key: &str,
    groups: &[ParamGroup],
    tensors: &HashMap<String, Tensor>,
) -> Result<HashMap<String, Tensor>> {
    let mut out = HashMap::with_capacity(tensors.len());
    for (k, t) in tensors {
        let name = k
            .strip_prefix(key)
            .and_then(|n| n.strip_prefix('.'))
            .ok_or_else(|| {
                Error::arg(
                    k.clone(),
                    format!("unknown optimizer state key (expected {key}.<parameter>)"),
                )
            })?;
        let var = param_for_state(groups, name, &[(key, t)])?;
        out.insert(
            name.to_string(),
            t.to_dtype(var.dtype())?.to_device(var.device())?,
        );
    }
    Ok(out)
}

/// The parameter `name` of `groups` that the state tensors `(kind, tensor)` belong to; each must have its shape.
fn param_for_state<'a>(
    groups: &'a [ParamGroup],
    name: &str,
    state: &[(&str, &Tensor)],
) -> Result<&'a Var> {
    let var = find_var(groups, name).ok_or_else(|| Error::MissingParameter {
        name: name.to_string(),
        msg: "in the optimizer state but not a parameter of this optimizer".into(),
    })?;
    for (what, t) in state {
        if t.dims() != var.dims() {
            return Err(Error::ParameterShape {
                name: name.to_string(),
                what: what.to_string(),
                expected: var.dims().to_vec(),
                got: t.dims().to_vec(),
            });
        }
    }
    Ok(var)
}

/// The parameter called `name` in `groups`.
fn find_var<'a>(groups: &'a [ParamGroup], name: &str) -> Option<&'a Var> {
    groups
        .iter()
        .flat_map(|g| g.params.iter())
        .find(|(n, _)| n == name)
        .map(|(_, v)| v)
}

impl Optimizer for Sgd {
    fn step(&mut self, grads: &GradStore) -> Result<()> {
        for group in &self.groups {
            for (name, var) in &group.params {
                let Some(g) = grad_of(grads, name, var)? else {
                    continue;
                };
                let p = var.as_tensor();
                let mut d = g.clone();
                if group.weight_decay != 0.0 {
                    d = (d + p.affine(group.weight_decay, 0.0)?)?;
                }
                if self.momentum != 0.0 {
                    let buf = match self.buffers.get(name) {
                        Some(b) => (b.affine(self.momentum, 0.0)? + d)?,
                        None => d.copy()?,
                    };
                    self.buffers.insert(name.clone(), buf.clone());
                    d = buf;
                }
                var.set(&(p - d.affine(group.lr, 0.0)?)?)?;
            }
        }
        Ok(())
    }
    fn set_lr(&mut self, group: usize, lr: f64) -> Result<()> {
        group_mut(&mut self.groups, group)?.lr = lr;
        Ok(())
    }
    fn set_weight_decay(&mut self, group: usize, weight_decay: f64) -> Result<()> {
        group_mut(&mut self.groups, group)?.weight_decay = weight_decay;
        Ok(())
    }
    fn groups(&self) -> &[ParamGroup] {
        &self.groups
    }
    /// `momentum_buffer.{name}` (torch's state key) for every parameter updated at least once.
    fn state_tensors(&self) -> Result<BTreeMap<String, Tensor>> {
        Ok(buffers_to_tensors("momentum_buffer", &self.buffers))
    }
    fn load_state_tensors(&mut self, tensors: &HashMap<String, Tensor>) -> Result<()> {
        self.buffers = buffers_from_tensors("momentum_buffer", &self.groups, tensors)?;
        Ok(())
    }
}

/// `utils.LARS` (from barlowtwins): for tensors that are not 1-D, `dp = g + wd * p` then
/// `dp *= eta * ||p|| / ||dp||` (1 when either norm is 0); 1-D tensors get neither. Then
/// `mu = momentum * mu + dp; p -= lr * mu`. Defaults momentum 0.9, eta 0.001.
#[derive(Debug)]
pub struct Lars {
    groups: Vec<ParamGroup>,
    momentum: f64,
    eta: f64,
    mu: HashMap<String, Tensor>,
}

impl Lars {
    /// LARS with the official defaults (momentum 0.9, eta 0.001).
    pub fn new(groups: Vec<ParamGroup>) -> Result<Self> {
        Self::with_params(groups, 0.9, 0.001)
    }

    /// LARS with explicit momentum and trust coefficient eta.
    pub fn with_params(groups: Vec<ParamGroup>, momentum: f64, eta: f64) -> Result<Self> {
        check_groups(&groups)?;
        Ok(Self {
            groups,
            momentum,
            eta,
            mu: HashMap::new(),
        })
    }

    /// The momentum `mu` of a parameter, if it was updated.
    pub fn momentum_buffer(&self, name: &str) -> Option<&Tensor> {
        self.mu.get(name)
    }
}

fn l2_norm(t: &Tensor) -> Result<f64> {
    Ok(t.to_dtype(DType::F64)?
        .sqr()?
        .sum_all()?
        .sqrt()?
        .to_scalar::<f64>()?)
}

impl Optimizer for Lars {
    fn step(&mut self, grads: &GradStore) -> Result<()> {
        for group in &self.groups {
            for (name, var) in &group.params {
                let Some(g) = grad_of(grads, name, var)? else {
                    continue;
                };
                let p = var.as_tensor();
                let mut dp = g.clone();
                if var.rank() != 1 {
                    dp = (dp + p.affine(group.weight_decay, 0.0)?)?;
                    let param_norm = l2_norm(p)?;
                    let update_norm = l2_norm(&dp)?;
                    let q = if param_norm > 0.0 && update_norm > 0.0 {
                        self.eta * param_norm / update_norm
                    } else {
                        1.0
                    };
                    dp = dp.affine(q, 0.0)?;
                }
                let mu = match self.mu.get(name) {
                    Some(mu) => (mu.affine(self.momentum, 0.0)? + dp)?,
                    None => dp,
                };
                self.mu.insert(name.clone(), mu.clone());
                var.set(&(p - mu.affine(group.lr, 0.0)?)?)?;
            }
        }
        Ok(())
    }
    fn set_lr(&mut self, group: usize, lr: f64) -> Result<()> {
        group_mut(&mut self.groups, group)?.lr = lr;
        Ok(())
    }
    fn set_weight_decay(&mut self, group: usize, weight_decay: f64) -> Result<()> {
        group_mut(&mut self.groups, group)?.weight_decay = weight_decay;
        Ok(())
    }
    fn groups(&self) -> &[ParamGroup] {
        &self.groups
    }
    /// `mu.{name}` (the official `LARS`'s state key) for every parameter updated at least once.
    fn state_tensors(&self) -> Result<BTreeMap<String, Tensor>> {
        Ok(buffers_to_tensors("mu", &self.mu))
    }
    fn load_state_tensors(&mut self, tensors: &HashMap<String, Tensor>) -> Result<()> {
        self.mu = buffers_from_tensors("mu", &self.groups, tensors)?;
        Ok(())
    }
}

/// The l2 norm of a gradient as torch computes it in f32 (here: f32 lanes, f64 final sum).
fn grad_norm(g: &Tensor) -> Result<f32> {
    if cpu_fast_path(&[g]) && g.dtype() == DType::F32 {
        let (s, l) = g.storage_and_layout();
        if let (Storage::Cpu(CpuStorage::F32(v)), Some((a, b))) = (&*s, l.contiguous_offsets()) {
            let x = &v[a..b];
            return Ok(dot(x, x).sqrt() as f32);
        }
    }
    Ok(l2_norm(g)? as f32)
}

/// `utils.clip_gradients(model, clip)`: PER PARAMETER (not a global norm), for each parameter of
/// `params` that has a gradient, `norm = ||g||_2`, `coef = clip / (norm + 1e-6)` (f32) and if
/// `coef < 1` the gradient becomes `g * coef`. Returns the pre-clip norms of the parameters that have
/// a gradient, in `params` order (parameters without a gradient are skipped, as in the official code).
pub fn clip_gradients(grads: &mut GradStore, params: &[NamedVar], clip: f64) -> Result<Vec<f64>> {
    if clip.is_nan() || clip <= 0.0 {
        return Err(Error::arg("clip", format!("must be positive, got {clip}")));
    }
    let mut norms = Vec::with_capacity(params.len());
    for (name, var) in params {
        let Some(g) = grad_of(grads, name, var)? else {
            continue;
        };
        let norm = grad_norm(g)?;
        norms.push(norm as f64);
        let coef = clip as f32 / (norm + 1e-6f32);
        if coef < 1.0 {
            let clipped = g.affine(coef as f64, 0.0)?;
            grads.insert(var.as_tensor(), clipped);
        }
    }
    Ok(norms)
}

/// `utils.cancel_gradients_last_layer`: while `epoch < freeze_last_layer`, removes from `grads` the
/// gradient of every parameter whose name contains `"last_layer"`, so the optimiser skips them entirely
/// (zeroing would still apply weight decay). Returns how many were removed.
pub fn cancel_gradients_last_layer(
    epoch: usize,
    grads: &mut GradStore,
    params: &[NamedVar],
    freeze_last_layer: usize,
) -> usize {
    if epoch >= freeze_last_layer {
        return 0;
    }
    params
        .iter()
        .filter(|(name, _)| name.contains("last_layer"))
        .filter(|(_, var)| grads.remove(var.as_tensor()).is_some())
        .count()
}
