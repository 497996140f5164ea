//! Named parameters: a sorted `(name, Var)` list and the official weight-decay groups
//! (`utils.get_params_groups`).

use candle_core::Var;
use candle_nn::VarMap;

/// A parameter with its official PyTorch path, e.g. `("backbone.blocks.0.attn.qkv.weight", var)`.
pub type NamedVar = (String, Var);

/// All variables of a `VarMap`, sorted by name (VarMap iteration order is random per process).
pub fn sorted_vars(varmap: &VarMap) -> Vec<NamedVar> {
    let data = varmap.data().lock().unwrap_or_else(|e| e.into_inner());
    let mut vars: Vec<NamedVar> = data.iter().map(|(k, v)| (k.clone(), v.clone())).collect();
    vars.sort_by(|a, b| a.0.cmp(&b.0));
    vars
}

/// Whether a parameter is regularised (weight-decayed) in the official code: not a `.bias` and not 1-D.
/// `cls_token` (1,1,D) and `pos_embed` (1,N,D) ARE regularised.
pub fn is_regularized(name: &str, var: &Var) -> bool {
    !(name.ends_with(".bias") || var.rank() == 1)
}

/// Splits parameters as `utils.get_params_groups`: `(regularized, not_regularized)`, where not regularised
/// means the name ends with `.bias` or the tensor is 1-D. Input order is kept in each group.
pub fn get_params_groups(params: &[NamedVar]) -> (Vec<NamedVar>, Vec<NamedVar>) {
    params
        .iter()
        .cloned()
        .partition(|(name, var)| is_regularized(name, var))
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{DType, Device};

    #[test]
    fn groups_follow_official_rules() {
        let dev = Device::Cpu;
        let mk = |shape: &[usize]| Var::zeros(shape, DType::F32, &dev).unwrap();
        let params = vec![
            ("backbone.cls_token".to_string(), mk(&[1, 1, 4])),
            ("backbone.norm.weight".to_string(), mk(&[4])),
            ("backbone.pos_embed".to_string(), mk(&[1, 3, 4])),
            ("head.last_layer.weight_g".to_string(), mk(&[8, 1])),
            ("head.mlp.0.bias".to_string(), mk(&[4])),
            ("head.mlp.0.weight".to_string(), mk(&[4, 4])),
        ];
        let (reg, noreg) = get_params_groups(&params);
        let names = |v: &[NamedVar]| v.iter().map(|p| p.0.clone()).collect::<Vec<_>>();
        assert_eq!(
            names(&reg),
            vec![
                "backbone.cls_token",
                "backbone.pos_embed",
                "head.last_layer.weight_g",
                "head.mlp.0.weight"
            ]
        );
        assert_eq!(
            names(&noreg),
            vec!["backbone.norm.weight", "head.mlp.0.bias"]
        );
    }

    #[test]
    fn sorted_vars_sorts_by_name() {
        let vm = VarMap::new();
        let vb = candle_nn::VarBuilder::from_varmap(&vm, DType::F32, &Device::Cpu);
        for name in ["z.weight", "a.bias", "m.weight", "b.weight"] {
            vb.get(2, name).unwrap();
        }
        let names: Vec<String> = sorted_vars(&vm).into_iter().map(|p| p.0).collect();
        assert_eq!(names, vec!["a.bias", "b.weight", "m.weight", "z.weight"]);
    }
}
