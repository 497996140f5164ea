//! DINOv2's register tokens and LayerScale in our ViT against `../shared/golden-dinov2/vit_reg4_*` (the
//! official `DinoVisionTransformer`, embed 192, depth 2, 3 heads, patch 14, 4 registers, init_values 1.0,
//! interpolate_offset 0.1): our parameter names are the official state dict's (minus the head, and minus
//! `mask_token` unless iBOT's mask token is configured), and the prepared tokens, the positional embedding
//! used, the CLS / register / patch outputs on the native 56 px input, on interpolated 84x70 and 28x42 inputs
//! and on the 56 px input with patches masked (iBOT) match; plus one backward pass reaching every parameter,
//! registers, gammas and the mask token included; `Backbone::cls_attention`'s slice of the attention. Not
//! covered: dinov2's antialiased offset-0 interpolation (`aa_offset0_*`).

use candle_core::{DType, Result, Tensor};
use candle_nn::VarMap;
use dino_models::init::seeded_var_builder;
use dino_models::vit::{ViTConfig, VisionTransformer};

/// The device these checks run on: the CPU, or GPU 0 under `DINO_TEST_DEVICE=cuda` (`cargo xtask gpu-check`).
fn tdev() -> candle_core::Device {
    dino_models::dispatch::test_device()
}

const DIR: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/../../../shared/golden-dinov2/"
);

fn config() -> ViTConfig {
    ViTConfig {
        num_register_tokens: 4,
        layer_scale_init: Some(1.0),
        ..ViTConfig::custom(56, 14, 192, 2, 3)
    }
}

fn load() -> Result<(VisionTransformer, VarMap)> {
    load_with(config())
}

fn load_with(cfg: ViTConfig) -> Result<(VisionTransformer, VarMap)> {
    let dev = tdev();
    let file = candle_core::safetensors::load(format!("{DIR}vit_reg4_weights.safetensors"), &dev)?;
    let vm = VarMap::new();
    let mask_token = cfg.mask_token;
    let vit = VisionTransformer::new(cfg, seeded_var_builder(&vm, 0, DType::F32, &dev))?;
    {
        let data = vm.data().lock().unwrap();
        let mut ours: Vec<&String> = data.keys().collect();
        let mut theirs: Vec<&String> = file
            .keys()
            .filter(|k| !k.starts_with("head.") && (mask_token || k.as_str() != "mask_token"))
            .collect();
        ours.sort();
        theirs.sort();
        assert_eq!(
            ours, theirs,
            "parameter names differ from the official state dict"
        );
        for (k, v) in data.iter() {
            assert_eq!(v.dims(), file[k].dims(), "shape of {k}");
            v.set(&file[k])?;
        }
    }
    Ok((vit, vm))
}

fn close(what: &str, got: &Tensor, want: &Tensor, atol: f32) -> Result<()> {
    assert_eq!(got.dims(), want.dims(), "{what}: shape");
    let g: Vec<f32> = got.flatten_all()?.to_vec1()?;
    let w: Vec<f32> = want.flatten_all()?.to_vec1()?;
    let worst = g
        .iter()
        .zip(&w)
        .map(|(a, b)| (a - b).abs())
        .fold(0f32, f32::max);
    assert!(worst <= atol, "{what}: max |diff| {worst} > {atol}");
    Ok(())
}

#[test]
fn registers_and_layer_scale_match_dinov2() -> Result<()> {
    let (vit, _vm) = load()?;
    assert_eq!(config().num_params(), {
        let f =
            candle_core::safetensors::load(format!("{DIR}vit_reg4_weights.safetensors"), &tdev())?;
        f.iter()
            .filter(|(k, _)| !k.starts_with("head.") && k.as_str() != "mask_token")
            .map(|(_, v)| v.elem_count())
            .sum::<usize>()
    });
    let io = candle_core::safetensors::load(format!("{DIR}vit_reg4_io.safetensors"), &tdev())?;
    for (p, input) in [
        ("offset0.1_x56_", "input_x56"),
        ("offset0.1_x84x70_", "input_x84x70"),
        ("offset0.1_x28x42_", "input_x28x42"),
    ] {
        let x = &io[input];
        let g = |k: &str| io[&format!("{p}{k}")].clone();
        let (_, _, h, w) = x.dims4()?;
        close(
            &format!("{p}pos_embed_used"),
            &vit.interpolate_pos_encoding(h, w)?,
            &g("pos_embed_used"),
            1e-6,
        )?;
        close(
            &format!("{p}prepare_tokens"),
            &vit.prepare_tokens(x)?,
            &g("prepare_tokens"),
            1e-5,
        )?;
        let tokens = vit.get_intermediate_layers(x, 1)?.remove(0); // (B, 5 + N, D), normed
        let t = tokens.dim(1)?;
        close(
            &format!("{p}cls"),
            &vit.forward(x)?,
            &g("x_norm_clstoken"),
            1e-4,
        )?;
        close(
            &format!("{p}regs"),
            &tokens.narrow(1, 1, 4)?,
            &g("x_norm_regtokens"),
            1e-4,
        )?;
        close(
            &format!("{p}patches"),
            &tokens.narrow(1, 5, t - 5)?,
            &g("x_norm_patchtokens"),
            1e-4,
        )?;
    }
    Ok(())
}

/// dinov2's `forward_features(x, masks)`: masked patches replaced by the mask token before the positional
/// embedding; the CLS and patch outputs of the masked 56 px input.
#[test]
fn masked_patches_match_dinov2() -> Result<()> {
    let cfg = ViTConfig {
        mask_token: true,
        ..config()
    };
    assert_eq!(cfg.num_params(), config().num_params() + 192);
    let (vit, _vm) = load_with(cfg)?;
    let io = candle_core::safetensors::load(format!("{DIR}vit_reg4_io.safetensors"), &tdev())?;
    let g = |k: &str| io[&format!("offset0.1_x56_masked_{k}")].clone();
    let masks = &io["masks_x56_u8"];
    let (cls, patches) = vit.forward_tokens(&io["input_x56"], Some(masks), false)?;
    close("masked cls", &cls, &g("x_norm_clstoken"), 1e-4)?;
    close("masked patches", &patches, &g("x_norm_patchtokens"), 1e-4)?;
    // Without masks the same call gives the unmasked outputs, and masks that differ change the result.
    let (cls0, _) = vit.forward_tokens(&io["input_x56"], None, false)?;
    close(
        "unmasked cls",
        &cls0,
        &io["offset0.1_x56_x_norm_clstoken"],
        1e-4,
    )?;
    let n_masked: u32 = masks.to_dtype(DType::U32)?.sum_all()?.to_scalar()?;
    assert!(n_masked > 0);
    // A network without a mask token refuses masks with a message naming it.
    let (plain, _) = load()?;
    let e = plain
        .forward_tokens(&io["input_x56"], Some(masks), false)
        .unwrap_err()
        .to_string();
    assert!(e.contains("mask token"), "{e}");
    Ok(())
}

#[test]
fn one_backward_pass_reaches_registers_and_gammas() -> Result<()> {
    let vm = VarMap::new();
    let cfg = ViTConfig {
        num_register_tokens: 2,
        layer_scale_init: Some(1e-5),
        ..ViTConfig::custom(16, 4, 16, 2, 2).with_drop_path(0.1)
    };
    let vit = VisionTransformer::new(cfg, seeded_var_builder(&vm, 3, DType::F32, &tdev()))?;
    vit.reseed(1);
    let x = Tensor::randn(0f32, 1.0, (4, 3, 16, 12), &tdev())?;
    let r = Tensor::randn(0f32, 1.0, (4, 16), &tdev())?;
    let grads = (vit.forward_t(&x, true)? * r)?.sum_all()?.backward()?;
    let data = vm.data().lock().unwrap();
    assert!(data.contains_key("register_tokens") && data.contains_key("blocks.1.ls2.gamma"));
    assert_every_var_has_a_gradient(&data, &grads)
}

/// Every variable has a finite gradient in `grads` that is not all zeros.
fn assert_every_var_has_a_gradient(
    vars: &std::collections::HashMap<String, candle_core::Var>,
    grads: &candle_core::backprop::GradStore,
) -> Result<()> {
    for (name, var) in vars.iter() {
        let g = grads
            .get(var)
            .unwrap_or_else(|| panic!("{name}: no gradient"));
        let m = g.abs()?.max_all()?.to_scalar::<f32>()?;
        assert!(m > 0.0 && m.is_finite(), "{name}: gradient max {m}");
    }
    Ok(())
}

/// iBOT's forward: masked patches, CLS and patch outputs both used; every parameter, the mask token
/// included, gets a gradient.
#[test]
fn one_masked_backward_pass_reaches_the_mask_token() -> Result<()> {
    let vm = VarMap::new();
    let cfg = ViTConfig {
        num_register_tokens: 2,
        layer_scale_init: Some(1e-5),
        mask_token: true,
        ..ViTConfig::custom(16, 4, 16, 2, 2).with_drop_path(0.1)
    };
    let vit = VisionTransformer::new(cfg, seeded_var_builder(&vm, 3, DType::F32, &tdev()))?;
    vit.reseed(1);
    let x = Tensor::randn(0f32, 1.0, (4, 3, 16, 16), &tdev())?;
    let m: Vec<u8> = (0..4 * 16).map(|i| u8::from(i % 5 == 1)).collect();
    let masks = Tensor::from_vec(m, (4, 16), &tdev())?;
    let (cls, patches) = vit.forward_tokens(&x, Some(&masks), true)?;
    assert_eq!(patches.dims(), [4, 16, 16]);
    let r = Tensor::randn(0f32, 1.0, (4, 16), &tdev())?;
    let rp = Tensor::randn(0f32, 1.0, (4, 16, 16), &tdev())?;
    let loss = ((cls * r)?.sum_all()? + (patches * rp)?.sum_all()?)?;
    let grads = loss.backward()?;
    let data = vm.data().lock().unwrap();
    assert!(data.contains_key("mask_token"));
    assert_every_var_has_a_gradient(&data, &grads)
}

/// `Backbone::cls_attention`: row 0 (the CLS query) of the last block's attention, without the CLS and
/// register columns, on the patch grid in row-major order (checked on a non-square input, 4 x 3 patches);
/// with the 1 + 4 prefix columns it sums to 1 per head.
#[test]
fn cls_attention_is_the_cls_row_over_the_patch_grid() -> Result<()> {
    use dino_models::Backbone;
    let (vit, _vm) = load()?;
    let (b, h, w) = (2, 56, 42);
    let n = b * 3 * h * w;
    let x: Vec<f32> = (0..n)
        .map(|i| ((i * 7919) % 1013) as f32 / 1013.0 - 0.5)
        .collect();
    let x = Tensor::from_vec(x, (b, 3, h, w), &tdev())?;
    let full = vit.get_last_selfattention(&x)?;
    assert_eq!(full.dims(), [b, 3, 1 + 4 + 12, 1 + 4 + 12]);
    let cls = vit.cls_attention(&x)?.expect("a ViT has attention maps");
    assert_eq!(cls.dims(), [b, 3, 4, 3]);
    for s in 0..b {
        for head in 0..3 {
            let row: Vec<f32> = full.get(s)?.get(head)?.get(0)?.to_vec1()?;
            let grid: Vec<Vec<f32>> = cls.get(s)?.get(head)?.to_vec2()?;
            let mut mass: f32 = row[..5].iter().sum();
            for (i, line) in grid.iter().enumerate() {
                for (j, &v) in line.iter().enumerate() {
                    assert_eq!(
                        v,
                        row[5 + i * 3 + j],
                        "sample {s} head {head} patch ({i}, {j})"
                    );
                    mass += v;
                }
            }
            assert!((mass - 1.0).abs() < 1e-5, "sample {s} head {head}: {mass}");
        }
    }
    Ok(())
}

dino_kernels::portable_path_tests!(
    registers_and_layer_scale_match_dinov2,
    masked_patches_match_dinov2,
    one_masked_backward_pass_reaches_the_mask_token,
    one_backward_pass_reaches_registers_and_gammas,
    cls_attention_is_the_cls_row_over_the_patch_grid,
);

dino_kernels::bf16_path_tests!(
    one_masked_backward_pass_reaches_the_mask_token,
    one_backward_pass_reaches_registers_and_gammas,
);
