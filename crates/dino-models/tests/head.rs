//! DINO head: golden forward against the official DINOHead, gradients to every trainable parameter,
//! finite differences of the weight-normalised last layer, parameter names and counts.

use candle_core::{DType, Tensor, Var, D};
use candle_nn::{VarBuilder, VarMap};
use dino_models::head::{l2_normalize, DinoHead, DinoHeadConfig};
use dino_models::params::{
    count_elements, ema_vars, is_buffer, sorted_vars, trainable_vars, ModelSpec, NamedVar,
};
use dino_models::weights::{load_head, LoadOptions};

/// The device these checks run on: the CPU, or GPU 0 under `DINO_TEST_DEVICE=cuda` (`cargo xtask gpu-check`).
fn tdev() -> candle_core::Device {
    dino_models::dispatch::test_device()
}

const GOLDEN: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../../../shared/golden/");

fn golden(name: &str) -> std::collections::HashMap<String, Tensor> {
    candle_core::safetensors::load(format!("{GOLDEN}{name}"), &tdev()).expect("golden file")
}

/// max |a - b| - (atol + rtol |b|) must be <= 0 everywhere.
fn assert_close(a: &Tensor, b: &Tensor, atol: f64, rtol: f64, what: &str) {
    assert_eq!(a.dims(), b.dims(), "{what}: shapes");
    let a = a
        .to_dtype(DType::F64)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1::<f64>()
        .unwrap();
    let b = b
        .to_dtype(DType::F64)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1::<f64>()
        .unwrap();
    let mut worst = 0.0f64;
    for (x, y) in a.iter().zip(&b) {
        let excess = (x - y).abs() - (atol + rtol * y.abs());
        worst = worst.max(excess);
    }
    assert!(worst <= 0.0, "{what}: exceeds tolerance by {worst:e}");
}

fn small_cfg(use_bn: bool, norm_last_layer: bool, nlayers: usize) -> DinoHeadConfig {
    DinoHeadConfig {
        in_dim: 12,
        out_dim: 20,
        use_bn,
        norm_last_layer,
        nlayers,
        hidden_dim: 24,
        bottleneck_dim: 8,
        last_layer_bf16: false,
    }
}

fn build(cfg: DinoHeadConfig, dtype: DType) -> (VarMap, DinoHead) {
    let varmap = VarMap::new();
    let vb = VarBuilder::from_varmap(&varmap, dtype, &tdev());
    let head = DinoHead::new(cfg, vb.pp("head")).expect("head");
    (varmap, head)
}

#[test]
fn golden_head_matches_official() {
    let w = golden("dino_head_weights.safetensors");
    let io = golden("dino_head_io.safetensors");
    let cfg = DinoHeadConfig::new(192, 1024);
    let varmap = VarMap::new();
    let vb = VarBuilder::from_varmap(&varmap, DType::F32, &tdev());
    let head = DinoHead::new(cfg, vb).unwrap();
    let report = load_head(
        &varmap,
        format!("{GOLDEN}dino_head_weights.safetensors"),
        &LoadOptions::default(),
    )
    .unwrap();
    assert_eq!(report.loaded.len(), w.len());
    assert!(report.ignored.is_empty());

    let x = &io["x"];
    let mlp = head.forward_mlp(x, false).unwrap();
    assert_close(&mlp, &io["mlp_out"], 1e-4, 1e-4, "mlp_out");
    let normed = l2_normalize(&mlp).unwrap();
    assert_close(
        &normed,
        &io["mlp_out_normalized"],
        1e-4,
        1e-4,
        "mlp_out_normalized",
    );
    let out = head.forward(x, false).unwrap();
    assert_close(&out, &io["out"], 1e-4, 1e-4, "out");
    // train mode only matters for BatchNorm: identical here.
    let out_train = head.forward(x, true).unwrap();
    assert_close(&out_train, &io["out"], 1e-4, 1e-4, "out (train)");
    // norm_last_layer: every logit is a cosine similarity.
    let max_abs = out
        .abs()
        .unwrap()
        .max_all()
        .unwrap()
        .to_scalar::<f32>()
        .unwrap();
    assert!(max_abs <= 1.0 + 1e-5, "{max_abs}");
}

#[test]
fn official_names_and_parameter_counts_vit_s() {
    // ViT-S head at K = 65536 (dino-spec §1.5).
    let cfg = DinoHeadConfig::new(384, 65536);
    let (varmap, _head) = build(cfg, DType::F32);
    let vars = sorted_vars(&varmap);
    let names: Vec<&str> = vars.iter().map(|(n, _)| n.as_str()).collect();
    assert_eq!(
        names,
        [
            "head.last_layer.weight_g",
            "head.last_layer.weight_v",
            "head.mlp.0.bias",
            "head.mlp.0.weight",
            "head.mlp.2.bias",
            "head.mlp.2.weight",
            "head.mlp.4.bias",
            "head.mlp.4.weight",
        ]
    );
    let mlp: Vec<NamedVar> = vars
        .iter()
        .filter(|(n, _)| n.contains(".mlp."))
        .cloned()
        .collect();
    assert_eq!(count_elements(&mlp), 5_509_376);
    assert_eq!(cfg.mlp_param_count(), 5_509_376);
    let get = |n: &str| vars.iter().find(|(m, _)| m == n).unwrap().1.clone();
    assert_eq!(get("head.last_layer.weight_v").elem_count(), 16_777_216);
    assert_eq!(get("head.last_layer.weight_g").dims(), &[65536, 1]);
    assert_eq!(cfg.last_layer_param_count(), (16_777_216, 65_536));
    // weight_g is 1; weight_v is U(±1/16).
    let g = get("head.last_layer.weight_g")
        .as_tensor()
        .flatten_all()
        .unwrap();
    assert_eq!(g.min(0).unwrap().to_scalar::<f32>().unwrap(), 1.0);
    assert_eq!(g.max(0).unwrap().to_scalar::<f32>().unwrap(), 1.0);
    let v = get("head.last_layer.weight_v")
        .as_tensor()
        .flatten_all()
        .unwrap();
    let vmax = v.abs().unwrap().max(0).unwrap().to_scalar::<f32>().unwrap();
    assert!(vmax <= 0.0625 && vmax > 0.062, "{vmax}");
    // Trunc-normal(0.02) MLP weights, zero biases.
    let w = get("head.mlp.2.weight").as_tensor().flatten_all().unwrap();
    let std = w
        .sqr()
        .unwrap()
        .mean(0)
        .unwrap()
        .sqrt()
        .unwrap()
        .to_scalar::<f32>()
        .unwrap();
    assert!((std - 0.02).abs() < 2e-4, "{std}");
    let b = get("head.mlp.0.bias")
        .as_tensor()
        .abs()
        .unwrap()
        .max(0)
        .unwrap();
    assert_eq!(b.to_scalar::<f32>().unwrap(), 0.0);
    // Trainable: everything but weight_g; EMA: everything.
    let spec = ModelSpec::default();
    assert_eq!(trainable_vars(&vars, &spec).len(), 7);
    assert_eq!(ema_vars(&vars).len(), 8);
    assert_eq!(
        trainable_vars(
            &vars,
            &ModelSpec {
                norm_last_layer: false
            }
        )
        .len(),
        8
    );
}

#[test]
fn batchnorm_and_single_layer_names() {
    let (varmap, _) = build(small_cfg(true, true, 3), DType::F32);
    let names: Vec<String> = sorted_vars(&varmap).into_iter().map(|(n, _)| n).collect();
    for n in [
        "head.mlp.0.weight",
        "head.mlp.1.weight",
        "head.mlp.1.bias",
        "head.mlp.1.running_mean",
        "head.mlp.1.running_var",
        "head.mlp.3.weight",
        "head.mlp.4.running_var",
        "head.mlp.6.weight",
        "head.mlp.6.bias",
    ] {
        assert!(names.iter().any(|m| m == n), "{n} missing from {names:?}");
    }
    assert_eq!(names.len(), 2 + 2 + 4 + 2 + 4 + 2);
    let cfg = small_cfg(true, true, 3);
    let mlp_params: usize = sorted_vars(&varmap)
        .iter()
        .filter(|(n, _)| n.contains(".mlp.") && !is_buffer(n))
        .map(|(_, v)| v.elem_count())
        .sum();
    assert_eq!(mlp_params, cfg.mlp_param_count());

    // nlayers = 1: a single Linear named `mlp` (official nn.Linear, not a Sequential).
    let (varmap, head) = build(small_cfg(false, true, 1), DType::F32);
    let names: Vec<String> = sorted_vars(&varmap).into_iter().map(|(n, _)| n).collect();
    assert_eq!(
        names,
        [
            "head.last_layer.weight_g",
            "head.last_layer.weight_v",
            "head.mlp.bias",
            "head.mlp.weight"
        ]
    );
    let x = Tensor::randn(0f32, 1., (3, 12), &tdev()).unwrap();
    assert_eq!(head.forward(&x, true).unwrap().dims(), &[3, 20]);
    // nlayers = 4 without BN: mlp.0, .2, .4, .6.
    let (varmap, _) = build(small_cfg(false, true, 4), DType::F32);
    let names: Vec<String> = sorted_vars(&varmap).into_iter().map(|(n, _)| n).collect();
    assert!(
        names.contains(&"head.mlp.6.weight".to_string()),
        "{names:?}"
    );
    assert!(!names.iter().any(|n| n.contains("mlp.7")));
}

#[test]
fn invalid_config_is_an_error() {
    let varmap = VarMap::new();
    let vb = VarBuilder::from_varmap(&varmap, DType::F32, &tdev());
    let mut cfg = small_cfg(false, true, 3);
    cfg.out_dim = 0;
    let err = DinoHead::new(cfg, vb).unwrap_err().to_string();
    assert!(err.contains("out_dim"), "{err}");
}

/// A loss that weights every logit differently, so no gradient vanishes by symmetry.
fn weighted_loss(out: &Tensor, seed_weights: &Tensor) -> Tensor {
    (out * seed_weights).unwrap().sum_all().unwrap()
}

fn check_all_trainable_get_gradients(cfg: DinoHeadConfig) {
    let (varmap, head) = build(cfg, DType::F32);
    let x = Tensor::randn(0f32, 1., (6, cfg.in_dim), &tdev()).unwrap();
    let out = head.forward(&x, true).unwrap();
    let r = Tensor::randn(0f32, 1., out.dims(), &tdev()).unwrap();
    let grads = weighted_loss(&out, &r).backward().unwrap();
    let vars = sorted_vars(&varmap);
    let spec = ModelSpec {
        norm_last_layer: cfg.norm_last_layer,
    };
    let trainable = trainable_vars(&vars, &spec);
    assert!(!trainable.is_empty());
    // With BatchNorm, the bias of each Linear before a BN has an exactly-zero gradient: BN subtracts the
    // batch mean, so shifting its input changes nothing. Autograd gives rounding noise there, which is
    // checked to be that (under 1e-4 of the largest gradient); every other trainable parameter must get a
    // non-zero gradient.
    let before_bn = |name: &str| {
        let Some((pre, idx)) = name.strip_suffix(".bias").and_then(|p| p.rsplit_once('.')) else {
            return false;
        };
        idx.parse::<usize>().is_ok_and(|i| {
            let rm = format!("{pre}.{}.running_mean", i + 1);
            vars.iter().any(|(n, _)| *n == rm)
        })
    };
    let maxes: Vec<(&str, f32)> = trainable
        .iter()
        .map(|(name, var)| {
            let g = grads
                .get(var.as_tensor())
                .unwrap_or_else(|| panic!("{name}: no gradient ({cfg:?})"));
            let m = g
                .abs()
                .unwrap()
                .max_all()
                .unwrap()
                .to_scalar::<f32>()
                .unwrap();
            (name.as_str(), m)
        })
        .collect();
    let scale = maxes.iter().map(|&(_, m)| m).fold(0.0f32, f32::max);
    assert!(scale.is_finite() && scale > 0.0, "gradient scale {scale}");
    let zero_by_bn = maxes.iter().filter(|(n, _)| before_bn(n)).count();
    assert_eq!(
        zero_by_bn,
        if cfg.use_bn { cfg.nlayers - 1 } else { 0 },
        "Linears before a BN ({cfg:?})"
    );
    for &(name, m) in &maxes {
        if before_bn(name) {
            assert!(
                m <= 1e-4 * scale,
                "{name}: gradient {m} should be 0 ({cfg:?})"
            );
        } else {
            assert!(m > 0.0 && m.is_finite(), "{name}: gradient {m} ({cfg:?})");
        }
    }
    // Buffers are never trainable; weight_g is trainable exactly when norm_last_layer is false.
    assert!(trainable.iter().all(|(n, _)| !is_buffer(n)));
    let has_g = trainable.iter().any(|(n, _)| n.ends_with("weight_g"));
    assert_eq!(has_g, !cfg.norm_last_layer);
    // A frozen weight_g (norm_last_layer) enters the graph detached: the backward pass computes nothing for it.
    let (_, g_var) = vars
        .iter()
        .find(|(n, _)| n.ends_with("weight_g"))
        .expect("weight_g");
    assert_eq!(
        grads.get(g_var.as_tensor()).is_some(),
        !cfg.norm_last_layer,
        "weight_g gradient ({cfg:?})"
    );
    let expected =
        vars.iter().filter(|(n, _)| !is_buffer(n)).count() - usize::from(cfg.norm_last_layer);
    assert_eq!(trainable.len(), expected);
}

#[test]
fn every_trainable_parameter_gets_a_gradient() {
    check_all_trainable_get_gradients(small_cfg(false, true, 3));
    check_all_trainable_get_gradients(small_cfg(false, false, 3));
    check_all_trainable_get_gradients(small_cfg(true, true, 3));
    check_all_trainable_get_gradients(small_cfg(true, false, 4));
    check_all_trainable_get_gradients(small_cfg(false, false, 1));
}

#[test]
fn batchnorm_train_uses_batch_statistics_and_updates_running_stats() {
    let cfg = small_cfg(true, true, 2);
    let (varmap, head) = build(cfg, DType::F32);
    let x = (Tensor::randn(0f32, 1., (16, 12), &tdev()).unwrap() * 3.0).unwrap();
    let get = |n: &str| {
        sorted_vars(&varmap)
            .into_iter()
            .find(|(m, _)| m == n)
            .unwrap()
            .1
            .as_tensor()
            .copy()
            .unwrap()
    };
    let rm_before = get("head.mlp.1.running_mean");
    let train_out = head.forward_mlp(&x, true).unwrap();
    let rm_after = get("head.mlp.1.running_mean");
    let moved = (rm_after - &rm_before)
        .unwrap()
        .abs()
        .unwrap()
        .sum_all()
        .unwrap();
    assert!(
        moved.to_scalar::<f32>().unwrap() > 0.0,
        "running_mean not updated"
    );
    // Independent computation of the train-mode forward: Linear -> batch-stat BN (biased var, eps 1e-5) ->
    // GELU -> Linear.
    let w0 = get("head.mlp.0.weight");
    let b0 = get("head.mlp.0.bias");
    let h = x
        .matmul(&w0.t().unwrap())
        .unwrap()
        .broadcast_add(&b0)
        .unwrap();
    let mean = h.mean_keepdim(0).unwrap();
    let c = h.broadcast_sub(&mean).unwrap();
    let var = c.sqr().unwrap().mean_keepdim(0).unwrap();
    let hn = c
        .broadcast_div(&(var + 1e-5).unwrap().sqrt().unwrap())
        .unwrap();
    let hn = hn
        .broadcast_mul(&get("head.mlp.1.weight"))
        .unwrap()
        .broadcast_add(&get("head.mlp.1.bias"))
        .unwrap();
    let a = hn.gelu_erf().unwrap();
    let expect = a
        .matmul(&get("head.mlp.3.weight").t().unwrap())
        .unwrap()
        .broadcast_add(&get("head.mlp.3.bias"))
        .unwrap();
    assert_close(&train_out, &expect, 1e-5, 1e-4, "BN train forward");
    // Eval mode uses the running statistics instead: a different result.
    let eval_out = head.forward_mlp(&x, false).unwrap();
    let diff = (eval_out - &train_out)
        .unwrap()
        .abs()
        .unwrap()
        .max_all()
        .unwrap();
    assert!(diff.to_scalar::<f32>().unwrap() > 1e-3);
}

/// Finite differences (f64) of L = sum(R ⊙ head(x)) with respect to weight_v, weight_g, an MLP weight and
/// the input, against autograd.
#[test]
fn finite_differences_weight_norm_layer() {
    let cfg = small_cfg(false, false, 2);
    let (varmap, head) = build(cfg, DType::F64);
    // Give g non-unit values so its role is exercised.
    let vars = sorted_vars(&varmap);
    let get = |n: &str| vars.iter().find(|(m, _)| m == n).unwrap().1.clone();
    let g = get("head.last_layer.weight_g");
    g.set(&(Tensor::rand(0.5f64, 1.5, (20, 1), &tdev()).unwrap()))
        .unwrap();
    let v = get("head.last_layer.weight_v");
    let w0 = get("head.mlp.0.weight");
    let x = Var::new(
        Tensor::randn(0f64, 1., (5, 12), &tdev())
            .unwrap()
            .to_vec2::<f64>()
            .unwrap(),
        &tdev(),
    )
    .unwrap();
    let r = Tensor::randn(0f64, 1., (5, 20), &tdev()).unwrap();
    let loss = |h: &DinoHead| -> f64 {
        let out = h.forward(x.as_tensor(), true).unwrap();
        weighted_loss(&out, &r).to_scalar::<f64>().unwrap()
    };
    let grads = weighted_loss(&head.forward(x.as_tensor(), true).unwrap(), &r)
        .backward()
        .unwrap();
    let eps = 1e-6;
    let mut checked = 0;
    for (name, var) in [
        ("weight_v", &v),
        ("weight_g", &g),
        ("mlp.0.weight", &w0),
        ("x", &x),
    ] {
        let analytic = grads
            .get(var.as_tensor())
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1::<f64>()
            .unwrap();
        let base = var
            .as_tensor()
            .flatten_all()
            .unwrap()
            .to_vec1::<f64>()
            .unwrap();
        let n = base.len();
        for k in [0, n / 3, n / 2, n - 1] {
            let mut plus = base.clone();
            plus[k] += eps;
            var.set(&Tensor::from_vec(plus, var.dims(), &tdev()).unwrap())
                .unwrap();
            let lp = loss(&head);
            let mut minus = base.clone();
            minus[k] -= eps;
            var.set(&Tensor::from_vec(minus, var.dims(), &tdev()).unwrap())
                .unwrap();
            let lm = loss(&head);
            var.set(&Tensor::from_vec(base.clone(), var.dims(), &tdev()).unwrap())
                .unwrap();
            let numeric = (lp - lm) / (2.0 * eps);
            let err = (numeric - analytic[k]).abs();
            assert!(
                err <= 1e-6 + 1e-5 * numeric.abs(),
                "{name}[{k}]: numeric {numeric} vs autograd {}",
                analytic[k]
            );
            checked += 1;
        }
    }
    assert_eq!(checked, 16);
    // Scaling a row of v leaves the output unchanged (only its direction matters) and its gradient is
    // orthogonal to that row.
    let gv = grads.get(v.as_tensor()).unwrap();
    let dots = (gv * v.as_tensor())
        .unwrap()
        .sum(D::Minus1)
        .unwrap()
        .abs()
        .unwrap()
        .max(0)
        .unwrap();
    assert!(dots.to_scalar::<f64>().unwrap() < 1e-10);
}

#[test]
fn weight_norm_formula_and_l2_eps() {
    let cfg = small_cfg(false, false, 2);
    let (_varmap, head) = build(cfg, DType::F64);
    let w = head.last_layer_weight().unwrap();
    // With g = 1 every row of W has unit norm.
    let norms = w
        .sqr()
        .unwrap()
        .sum(1)
        .unwrap()
        .sqrt()
        .unwrap()
        .to_vec1::<f64>()
        .unwrap();
    for n in norms {
        assert!((n - 1.0).abs() < 1e-12, "{n}");
    }
    // A zero row stays zero (norm clamped at 1e-12), a tiny row is normalised.
    let x = Tensor::new(&[[0f64, 0., 0.], [3e-9, 0., 4e-9]], &tdev()).unwrap();
    let y = l2_normalize(&x).unwrap().to_vec2::<f64>().unwrap();
    assert_eq!(y[0], [0., 0., 0.]);
    assert!((y[1][0] - 0.6).abs() < 1e-12 && (y[1][2] - 0.8).abs() < 1e-12);
}

/// The fused weight-norm kernel (f32) against the composed candle ops: values and both gradients.
#[test]
fn fused_weight_norm_matches_composed_ops() {
    use dino_models::head::{weight_norm, weight_norm_composed};
    let dev = tdev();
    for (k, c) in [(37, 16), (300, 256)] {
        let v = Var::from_tensor(&Tensor::randn(0f32, 1., (k, c), &dev).unwrap()).unwrap();
        let g = Var::from_tensor(&Tensor::rand(0.5f32, 2.0, (k, 1), &dev).unwrap()).unwrap();
        let r = Tensor::randn(0f32, 1., (k, c), &dev).unwrap();
        let fused = weight_norm(v.as_tensor(), g.as_tensor()).unwrap();
        let composed = weight_norm_composed(v.as_tensor(), g.as_tensor()).unwrap();
        assert_close(&fused, &composed, 1e-6, 1e-5, "W");
        // A transposed upstream gradient, as the matmul x @ W^T produces.
        let loss = |w: &Tensor| {
            (w.t().unwrap().contiguous().unwrap().t().unwrap() * &r)
                .unwrap()
                .sum_all()
                .unwrap()
        };
        let gf = loss(&fused).backward().unwrap();
        let gc = loss(&composed).backward().unwrap();
        for (name, var) in [("v", &v), ("g", &g)] {
            let a = gf.get(var.as_tensor()).unwrap();
            let b = gc.get(var.as_tensor()).unwrap();
            assert_close(a, b, 1e-5, 1e-4, name);
        }
        // Through the head's matmul too: x @ W^T.
        let x = Tensor::randn(0f32, 1., (5, c), &dev).unwrap();
        let r2 = Tensor::randn(0f32, 1., (5, k), &dev).unwrap();
        let via = |w: Tensor| {
            (x.matmul(&w.t().unwrap()).unwrap() * &r2)
                .unwrap()
                .sum_all()
                .unwrap()
        };
        let gf = via(fused).backward().unwrap();
        let gc = via(composed).backward().unwrap();
        for (name, var) in [("v (matmul)", &v), ("g (matmul)", &g)] {
            assert_close(
                gf.get(var.as_tensor()).unwrap(),
                gc.get(var.as_tensor()).unwrap(),
                1e-5,
                1e-4,
                name,
            );
        }
    }
    assert!(weight_norm(
        &Tensor::zeros((4, 3), DType::F32, &dev).unwrap(),
        &Tensor::zeros((3, 1), DType::F32, &dev).unwrap()
    )
    .is_err());
}

dino_kernels::portable_path_tests!(
    golden_head_matches_official,
    every_trainable_parameter_gets_a_gradient,
    finite_differences_weight_norm_layer,
    batchnorm_train_uses_batch_statistics_and_updates_running_stats,
);

/// `last_layer_bf16`: under bf16 precision the last layer's products take the bf16-rounded operands (the
/// normalised features and the weight-normalised weight); without it they stay f32 whatever the thread's
/// precision. Without bf16 products on this CPU both give the f32 products.
#[test]
fn last_layer_bf16_follows_the_precision_only_when_asked() {
    use dino_kernels::bf16::round_bf16;
    use dino_models::{with_matmul_precision, MatmulPrecision};
    let round = |t: &Tensor| -> Tensor {
        let v: Vec<f32> = t.flatten_all().unwrap().to_vec1().unwrap();
        let v: Vec<f32> = v.into_iter().map(round_bf16).collect();
        Tensor::from_vec(v, t.shape(), t.device()).unwrap()
    };
    let mut cfg = small_cfg(false, true, 3);
    cfg.out_dim = 70;
    let x = Tensor::randn(0f32, 1.0, (37, cfg.in_dim), &tdev()).unwrap();
    let (vm, head) = build(cfg, DType::F32);
    cfg.last_layer_bf16 = true;
    let head_bf16 = DinoHead::new(
        cfg,
        VarBuilder::from_varmap(&vm, DType::F32, &tdev()).pp("head"),
    )
    .unwrap();
    let bf16 = |f: &dyn Fn() -> candle_core::Result<Tensor>| {
        with_matmul_precision(MatmulPrecision::Bf16, f).unwrap()
    };
    // The MLP takes bf16 products in both heads alike: the last layer's input.
    let feat = bf16(&|| l2_normalize(&head.forward_mlp(&x, false)?));
    let w = head.last_layer_weight().unwrap();
    let want_f32 = feat.matmul(&w.t().unwrap()).unwrap();
    let want_bf16 = round(&feat).matmul(&round(&w).t().unwrap()).unwrap();
    let kept = bf16(&|| head.forward(&x, false));
    assert_close(
        &kept,
        &want_f32,
        1e-6,
        0.0,
        "default last layer vs f32 products",
    );
    let got = bf16(&|| head_bf16.forward(&x, false));
    if MatmulPrecision::bf16_supported() {
        assert_close(
            &got,
            &want_bf16,
            1e-6,
            0.0,
            "bf16 last layer vs rounded products",
        );
        let moved = (&got - &kept).unwrap().abs().unwrap().max_all().unwrap();
        assert!(
            moved.to_scalar::<f32>().unwrap() > 1e-4,
            "bf16 products did not run"
        );
    } else {
        assert_eq!(
            got.to_vec2::<f32>().unwrap(),
            kept.to_vec2::<f32>().unwrap()
        );
    }
    // Under f32 precision the flag changes nothing.
    let a = head_bf16.forward(&x, false).unwrap();
    let b = head.forward(&x, false).unwrap();
    assert_eq!(a.to_vec2::<f32>().unwrap(), b.to_vec2::<f32>().unwrap());
}

dino_kernels::bf16_path_tests!(every_trainable_parameter_gets_a_gradient,);
