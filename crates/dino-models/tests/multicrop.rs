//! Multi-crop wrapper: grouping of consecutive equal-resolution crops, one backbone call per group, one head
//! call, crop-major rows; gradients through the wrapper.

use std::sync::{Arc, Mutex};

use candle_core::{DType, Result, Tensor};
use candle_nn::{VarBuilder, VarMap};
use dino_models::head::{DinoHead, DinoHeadConfig};
use dino_models::multicrop::{resolution_groups, MultiCropWrapper};
use dino_models::params::{sorted_vars, trainable_vars, ModelSpec, NamedVar};
use dino_models::Backbone;

/// The device these checks run on: the CPU, or GPU 0 under `DINO_TEST_DEVICE=cuda` (`cargo xtask gpu-check`).
fn tdev() -> candle_core::Device {
    dino_models::dispatch::test_device()
}

/// A tiny backbone: per-channel spatial mean (B, 3) then a Linear to `dim`; records every call's input shape.
struct ToyBackbone {
    w: Tensor,
    calls: Arc<Mutex<Vec<Vec<usize>>>>,
}

impl Backbone for ToyBackbone {
    fn forward_features(&self, x: &Tensor, _train: bool) -> Result<Tensor> {
        self.calls.lock().unwrap().push(x.dims().to_vec());
        // Spatial mean and spatial max, so crops of different content/size give different features.
        let mean = x.mean((2, 3))?;
        let max = x.flatten_from(2)?.max(2)?;
        Tensor::cat(&[mean, max], 1)?.matmul(&self.w.t()?)
    }
    fn embed_dim(&self) -> usize {
        self.w.dim(0).unwrap()
    }
}

fn toy(varmap: &VarMap, dim: usize) -> (ToyBackbone, Arc<Mutex<Vec<Vec<usize>>>>) {
    let vb = VarBuilder::from_varmap(varmap, DType::F32, &tdev());
    let w = vb
        .pp("backbone")
        .get_with_hints(
            (dim, 6),
            "proj.weight",
            candle_nn::Init::Randn {
                mean: 0.,
                stdev: 1.,
            },
        )
        .unwrap();
    let calls = Arc::new(Mutex::new(Vec::new()));
    (
        ToyBackbone {
            w,
            calls: calls.clone(),
        },
        calls,
    )
}

fn head(varmap: &VarMap, in_dim: usize) -> DinoHead {
    let vb = VarBuilder::from_varmap(varmap, DType::F32, &tdev());
    let cfg = DinoHeadConfig {
        hidden_dim: 32,
        bottleneck_dim: 8,
        ..DinoHeadConfig::new(in_dim, 16)
    };
    DinoHead::new(cfg, vb.pp("head")).unwrap()
}

/// Every named variable has a gradient in `grads`, and it is not all zeros.
fn assert_every_gradient_nonzero(grads: &candle_core::backprop::GradStore, vars: &[NamedVar]) {
    for (name, var) in vars {
        let g = grads
            .get(var.as_tensor())
            .unwrap_or_else(|| panic!("{name}: no grad"));
        let n = g
            .sqr()
            .unwrap()
            .sum_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        assert!(n > 0.0, "{name}: zero gradient");
    }
}

fn crop(b: usize, s: usize) -> Tensor {
    Tensor::randn(0f32, 1., (b, 3, s, s), &tdev()).unwrap()
}

#[test]
fn groups_consecutive_resolutions() {
    let crops = [
        crop(1, 8),
        crop(1, 8),
        crop(1, 4),
        crop(1, 4),
        crop(1, 4),
        crop(1, 8),
    ];
    let g = resolution_groups(&crops).unwrap();
    assert_eq!(g, vec![0..2, 2..5, 5..6]);
    let rect = [
        crop(1, 8),
        Tensor::zeros((1, 3, 6, 8), DType::F32, &tdev()).unwrap(),
    ];
    assert_eq!(resolution_groups(&rect).unwrap(), vec![0..1, 1..2]);
    let bad = [Tensor::zeros((3, 8, 8), DType::F32, &tdev()).unwrap()];
    assert!(resolution_groups(&bad).is_err());
}

#[test]
fn one_backbone_call_per_group_and_crop_major_rows() {
    let varmap = VarMap::new();
    let (bb, calls) = toy(&varmap, 10);
    let h = head(&varmap, 10);
    let wrapper = MultiCropWrapper::new(Box::new(bb), h.clone()).unwrap();
    let b = 3;
    // 2 global crops (16 px) then 4 local crops (8 px), as main_dino.py with local_crops_number 4.
    let crops: Vec<Tensor> = (0..6)
        .map(|i| crop(b, if i < 2 { 16 } else { 8 }))
        .collect();
    let (feats, out) = wrapper.forward_with_features(&crops, true).unwrap();
    assert_eq!(feats.dims(), &[6 * b, 10]);
    assert_eq!(out.dims(), &[6 * b, 16]);
    assert_eq!(
        *calls.lock().unwrap(),
        vec![vec![2 * b, 3, 16, 16], vec![4 * b, 3, 8, 8]]
    );
    // Rows [i*B, (i+1)*B) are crop i: compare with running each crop alone.
    let (bb2, _) = toy(&varmap, 10);
    for (i, c) in crops.iter().enumerate() {
        let f = bb2.forward_features(c, true).unwrap();
        let o = h.forward(&f, true).unwrap();
        let rows = out.narrow(0, i * b, b).unwrap();
        let diff = (rows - o)
            .unwrap()
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        assert!(diff < 1e-5, "crop {i}: {diff}");
    }
    // forward == forward_with_features().1, and the teacher call on the 2 global crops gives (2B, K).
    let out2 = wrapper.forward(&crops, true).unwrap();
    let d = (out2 - &out)
        .unwrap()
        .abs()
        .unwrap()
        .max_all()
        .unwrap()
        .to_scalar::<f32>()
        .unwrap();
    assert_eq!(d, 0.0);
    assert_eq!(
        wrapper.forward(&crops[..2], false).unwrap().dims(),
        &[2 * b, 16]
    );
    assert!(wrapper.forward(&[], false).is_err());
}

#[test]
fn gradients_reach_backbone_and_head() {
    let varmap = VarMap::new();
    let (bb, _) = toy(&varmap, 10);
    let wrapper = MultiCropWrapper::new(Box::new(bb), head(&varmap, 10)).unwrap();
    let crops = vec![crop(2, 16), crop(2, 16), crop(2, 8)];
    let out = wrapper.forward(&crops, true).unwrap();
    let r = Tensor::randn(0f32, 1., out.dims(), &tdev()).unwrap();
    let grads = (out * r).unwrap().sum_all().unwrap().backward().unwrap();
    let vars = sorted_vars(&varmap);
    let trainable = trainable_vars(&vars, &ModelSpec::default());
    assert_eq!(trainable.len(), 8); // backbone.proj.weight + 7 head parameters
    assert_every_gradient_nonzero(&grads, &trainable);
}

/// iBOT's forward with a ViT: without masks, the CLS head outputs equal `forward`'s (the head has no
/// BatchNorm here, so the extra patch rows do not change them) and the patch head outputs are the head of the
/// selected patch tokens; with masks, one backward pass reaches every parameter, the mask token included; a
/// backbone without patch tokens answers an error.
#[test]
fn ibot_forward_selects_patch_tokens_and_reaches_every_parameter() {
    use dino_models::vit::{ViTConfig, VisionTransformer};
    let varmap = VarMap::new();
    let vb = dino_models::init::seeded_var_builder(&varmap, 5, DType::F32, &tdev());
    let cfg = ViTConfig {
        mask_token: true,
        ..ViTConfig::custom(16, 4, 16, 2, 2)
    };
    let vit = VisionTransformer::new(cfg, vb.pp("backbone")).unwrap();
    let wrapper = MultiCropWrapper::new(Box::new(vit), head(&varmap, 16)).unwrap();
    let crops = vec![crop(2, 16), crop(2, 16), crop(2, 8), crop(2, 8)];
    // Flat indices into the (2B = 4 crops, N = 16) patch grid.
    let idx = Tensor::new(&[1u32, 5, 17, 40, 63], &tdev()).unwrap();
    let (feats, out, pout) = wrapper.forward_ibot(&crops, None, &idx, false).unwrap();
    assert_eq!(feats.dims(), [8, 16]);
    assert_eq!(pout.dims(), [5, 16]);
    let plain = wrapper.forward(&crops, false).unwrap();
    let diff = (out - plain).unwrap().abs().unwrap().max_all().unwrap();
    assert!(diff.to_scalar::<f32>().unwrap() < 1e-5);
    let global = Tensor::cat(&crops[..2], 0).unwrap();
    let (_, patches) = wrapper
        .backbone
        .forward_tokens(&global, None, false)
        .unwrap();
    let picked = patches
        .reshape((64, 16))
        .unwrap()
        .index_select(&idx, 0)
        .unwrap();
    let want = wrapper.head.forward(&picked, false).unwrap();
    let diff = (pout - want).unwrap().abs().unwrap().max_all().unwrap();
    assert!(diff.to_scalar::<f32>().unwrap() < 1e-5);

    let m: Vec<u8> = (0..64)
        .map(|i| u8::from([1, 5, 17, 40, 63].contains(&i)))
        .collect();
    let masks = Tensor::from_vec(m, (4, 16), &tdev()).unwrap();
    let (_, out, pout) = wrapper
        .forward_ibot(&crops, Some(&masks), &idx, true)
        .unwrap();
    let r = Tensor::randn(0f32, 1., out.dims(), &tdev()).unwrap();
    let rp = Tensor::randn(0f32, 1., pout.dims(), &tdev()).unwrap();
    let loss =
        ((out * r).unwrap().sum_all().unwrap() + (pout * rp).unwrap().sum_all().unwrap()).unwrap();
    let grads = loss.backward().unwrap();
    let vars = sorted_vars(&varmap);
    let trainable = trainable_vars(&vars, &ModelSpec::default());
    assert!(trainable.iter().any(|(n, _)| n == "backbone.mask_token"));
    assert_every_gradient_nonzero(&grads, &trainable);

    let varmap = VarMap::new();
    let (bb, _) = toy(&varmap, 10);
    let toy_wrapper = MultiCropWrapper::new(Box::new(bb), head(&varmap, 10)).unwrap();
    let e = toy_wrapper
        .forward_ibot(&[crop(2, 16), crop(2, 16)], None, &idx, true)
        .unwrap_err()
        .to_string();
    assert!(e.contains("patch tokens"), "{e}");
}

#[test]
fn embed_dim_mismatch_is_an_error() {
    let varmap = VarMap::new();
    let (bb, _) = toy(&varmap, 10);
    let err = MultiCropWrapper::new(Box::new(bb), head(&varmap, 12))
        .err()
        .unwrap()
        .to_string();
    assert!(err.contains("10") && err.contains("12"), "{err}");
}

const GOLDEN: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../../../shared/golden/");

/// Official `MultiCropWrapper(vit_tiny(16), DINOHead(192, 1024))` on `[x224 (2 images), x96 (2 images)]`.
#[test]
fn golden_multicrop_vit_tiny16_with_head() {
    use dino_models::vit::{ViTConfig, VisionTransformer};
    use dino_models::weights::{load_backbone, load_head, LoadOptions};
    let load = |f: &str| candle_core::safetensors::load(format!("{GOLDEN}{f}"), &tdev()).unwrap();
    let vit_io = load("vit_tiny16_io.safetensors");
    let head_io = load("dino_head_io.safetensors");
    let varmap = VarMap::new();
    let vb = VarBuilder::from_varmap(&varmap, DType::F32, &tdev());
    let vit = VisionTransformer::new(ViTConfig::vit_tiny(16), vb.pp("backbone")).unwrap();
    let head = DinoHead::new(DinoHeadConfig::new(192, 1024), vb.pp("head")).unwrap();
    load_backbone(
        &varmap,
        format!("{GOLDEN}vit_tiny16_weights.safetensors"),
        &LoadOptions::with_prefix("backbone."),
    )
    .unwrap();
    load_head(
        &varmap,
        format!("{GOLDEN}dino_head_weights.safetensors"),
        &LoadOptions::with_prefix("head."),
    )
    .unwrap();
    let wrapper = MultiCropWrapper::new(Box::new(vit), head).unwrap();
    let crops = [vit_io["x224"].clone(), vit_io["x96"].clone()];
    let (feats, out) = wrapper.forward_with_features(&crops, false).unwrap();
    let expected = &head_io["multicrop_out_x224_x96"];
    assert_eq!(out.dims(), expected.dims());
    let excess = |a: &Tensor, b: &Tensor| {
        // max(|a - b| - (1e-4 + 1e-4 |b|)), the manifest's tolerance
        let d = (a - b).unwrap().abs().unwrap();
        let tol = (b.abs().unwrap() * 1e-4)
            .unwrap()
            .affine(1.0, 1e-4)
            .unwrap();
        (d - tol)
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap()
    };
    assert!(
        excess(&out, expected) <= 0.0,
        "head output off by {}",
        excess(&out, expected)
    );
    // Backbone features are the CLS tokens, crop-major.
    let cls = Tensor::cat(&[&vit_io["cls224"], &vit_io["cls96"]], 0).unwrap();
    assert!(
        excess(&feats, &cls) <= 0.0,
        "features off by {}",
        excess(&feats, &cls)
    );
}

dino_kernels::portable_path_tests!(
    golden_multicrop_vit_tiny16_with_head,
    ibot_forward_selects_patch_tokens_and_reaches_every_parameter,
    gradients_reach_backbone_and_head,
);

dino_kernels::bf16_path_tests!(
    ibot_forward_selects_patch_tokens_and_reaches_every_parameter,
    gradients_reach_backbone_and_head,
);
