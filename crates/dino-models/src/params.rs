//! Which variables are trainable, which the EMA averages, and which are weight-decayed, decided by name in
//! one place (dino-spec §1.5, §1.7, §1.9).
//!
//! Every list here is a `Vec<NamedVar>` sorted by name (`VarMap` iteration order is random per process).
//! - Buffers (`running_mean`, `running_var`, `num_batches_tracked` of BatchNorm) are neither trained nor
//!   EMA-averaged: the official teacher's BN buffers evolve from its own forward passes.
//! - `last_layer.weight_g` is frozen when `norm_last_layer` is true (`requires_grad = False`), but it is still a
//!   parameter, so the EMA covers it (as `model.parameters()` does).

/// A named variable (the official PyTorch state-dict path) and the sorted listing of a `VarMap`: one
/// definition, in dino-core.
pub use dino_core::params::{sorted_vars, NamedVar};

/// The model-level facts the filters need.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ModelSpec {
    /// The head's `norm_last_layer` (default true): when set, `last_layer.weight_g` is not trainable.
    pub norm_last_layer: bool,
}

impl Default for ModelSpec {
    fn default() -> Self {
        Self {
            norm_last_layer: true,
        }
    }
}

/// Suffixes of BatchNorm buffers (state, not parameters).
pub const BUFFER_SUFFIXES: [&str; 3] = ["running_mean", "running_var", "num_batches_tracked"];

fn last_segment(name: &str) -> &str {
    name.rsplit('.').next().unwrap_or(name)
}

/// True for BatchNorm buffers (`*.running_mean`, `*.running_var`, `*.num_batches_tracked`).
pub fn is_buffer(name: &str) -> bool {
    BUFFER_SUFFIXES.contains(&last_segment(name))
}

/// True for the weight-norm magnitude of the head's last layer (`[head.]last_layer.weight_g`).
pub fn is_last_layer_weight_g(name: &str) -> bool {
    name == "last_layer.weight_g" || name.ends_with(".last_layer.weight_g")
}

/// True for the head's last layer (`last_layer.*`), the prototypes frozen while `epoch < freeze_last_layer`.
pub fn is_last_layer(name: &str) -> bool {
    name.starts_with("last_layer.") || name.contains(".last_layer.")
}

/// True if the optimiser updates this variable: not a buffer, and not `weight_g` under `norm_last_layer`.
pub fn is_trainable(name: &str, spec: &ModelSpec) -> bool {
    let frozen_g = spec.norm_last_layer && is_last_layer_weight_g(name);
    !(is_buffer(name) || frozen_g)
}

/// True if this parameter is in the EMA (every parameter, never a buffer; includes a frozen `weight_g`).
pub fn is_ema_param(name: &str) -> bool {
    !is_buffer(name)
}

/// True if the official `get_params_groups` puts this parameter in the weight-decayed group: neither a bias
/// (`*.bias`) nor 1-D.
pub fn is_regularized(name: &str, rank: usize) -> bool {
    !(name.ends_with(".bias") || name == "bias" || rank == 1)
}

fn sorted_filter(vars: &[NamedVar], keep: impl Fn(&str) -> bool) -> Vec<NamedVar> {
    let mut out: Vec<NamedVar> = vars.iter().filter(|(n, _)| keep(n)).cloned().collect();
    out.sort_by(|a, b| a.0.cmp(&b.0));
    out
}

/// The trainable variables, sorted by name.
pub fn trainable_vars(vars: &[NamedVar], spec: &ModelSpec) -> Vec<NamedVar> {
    sorted_filter(vars, |n| is_trainable(n, spec))
}

/// The variables the teacher EMA averages (all parameters, no buffers), sorted by name.
pub fn ema_vars(vars: &[NamedVar]) -> Vec<NamedVar> {
    sorted_filter(vars, is_ema_param)
}

/// The trainable variables split as the official `get_params_groups`: `(regularized, not_regularized)`,
/// each sorted by name.
pub fn param_groups(vars: &[NamedVar], spec: &ModelSpec) -> (Vec<NamedVar>, Vec<NamedVar>) {
    dino_core::params::get_params_groups(&trainable_vars(vars, spec))
}

/// Total number of elements of `vars`.
pub fn count_elements(vars: &[NamedVar]) -> usize {
    vars.iter().map(|(_, v)| v.elem_count()).sum()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_decide() {
        let spec = ModelSpec::default();
        assert!(is_buffer("head.mlp.1.running_mean"));
        assert!(is_buffer("backbone.bn1.num_batches_tracked"));
        assert!(!is_buffer("head.mlp.1.weight"));
        assert!(!is_trainable("head.last_layer.weight_g", &spec));
        assert!(is_trainable(
            "head.last_layer.weight_g",
            &ModelSpec {
                norm_last_layer: false
            }
        ));
        assert!(is_trainable("head.last_layer.weight_v", &spec));
        assert!(is_ema_param("head.last_layer.weight_g"));
        assert!(!is_ema_param("backbone.layer1.0.bn1.running_var"));
        assert!(is_last_layer("head.last_layer.weight_v"));
        assert!(!is_last_layer("head.mlp.0.weight"));
        assert!(!is_regularized("backbone.blocks.0.norm1.weight", 1));
        assert!(!is_regularized("head.mlp.0.bias", 1));
        assert!(is_regularized("head.last_layer.weight_g", 2));
        assert!(is_regularized("backbone.cls_token", 3));
    }
}
