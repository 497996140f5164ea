//! The Vision Transformer against the official code's outputs (shared/golden/vit_tiny16_*), parameter
//! names/counts, gradients (every parameter, finite differences) and drop path.

use std::collections::HashMap;
use std::sync::Mutex;

use candle_core::{DType, Device, Result, Shape, Tensor, Var};
use candle_nn::var_builder::SimpleBackend;
use candle_nn::{Init, VarBuilder, VarMap};
use dino_models::init::{seeded_var_builder, LinearInit};
use dino_models::vit::{Pool, ViTConfig, VisionTransformer};
use dino_models::Backbone;

/// The device these checks run on: the CPU, or GPU 0 under `DINO_TEST_DEVICE=cuda` (`cargo xtask gpu-check`).
fn tdev() -> candle_core::Device {
    dino_models::dispatch::test_device()
}

const WEIGHTS: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/../../../shared/golden/vit_tiny16_weights.safetensors"
);
const IO: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/../../../shared/golden/vit_tiny16_io.safetensors"
);
// manifest.json "vit_tiny16"."suggested_tolerance"
const ATOL: f32 = 1e-4;
const RTOL: f32 = 1e-4;

/// Seeded standard-normal tensor (candle's own RNG cannot be seeded).
fn randn(seed: u64, shape: &[usize]) -> Result<Tensor> {
    use rand::SeedableRng;
    use rand_distr::Distribution;
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
    let n: usize = shape.iter().product();
    let v: Vec<f32> = (0..n)
        .map(|_| rand_distr::StandardNormal.sample(&mut rng))
        .collect();
    Tensor::from_vec(v, shape, &tdev())
}

fn assert_close(a: &Tensor, b: &Tensor, what: &str) -> Result<()> {
    assert_eq!(a.dims(), b.dims(), "{what}: shapes");
    let a: Vec<f32> = a.flatten_all()?.to_vec1()?;
    let b: Vec<f32> = b.flatten_all()?.to_vec1()?;
    let mut worst = 0f32;
    for (i, (x, y)) in a.iter().zip(&b).enumerate() {
        let err = (x - y).abs();
        assert!(
            err <= ATOL + RTOL * y.abs(),
            "{what}[{i}]: ours {x} vs official {y} (|diff| {err})"
        );
        worst = worst.max(err);
    }
    eprintln!("{what}: max |diff| {worst:.2e}");
    Ok(())
}

/// The official vit_tiny/16 loaded into a VarMap, checking that our parameter names and shapes are exactly
/// the official state dict's.
fn official_tiny() -> Result<(VisionTransformer, VarMap)> {
    let dev = tdev();
    let file = candle_core::safetensors::load(WEIGHTS, &dev)?;
    let vm = VarMap::new();
    let vit = VisionTransformer::new(
        ViTConfig::vit_tiny(16),
        seeded_var_builder(&vm, 0, DType::F32, &dev),
    )?;
    {
        let data = vm.data().lock().unwrap();
        let mut ours: Vec<&String> = data.keys().collect();
        let mut theirs: Vec<&String> = file.keys().collect();
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

#[test]
fn vit_tiny16_matches_official_outputs() -> Result<()> {
    let (vit, _vm) = official_tiny()?;
    let io = candle_core::safetensors::load(IO, &tdev())?;
    // Positional-embedding interpolation: key "pos_interp_{rows}x{cols}".
    for (r, c) in [(224, 224), (96, 96), (32, 32), (64, 128), (224, 160)] {
        let ours = vit.interpolate_pos_encoding(r, c)?;
        assert_close(
            &ours,
            &io[&format!("pos_interp_{r}x{c}")],
            &format!("pos_interp_{r}x{c}"),
        )?;
    }
    for size in ["224", "96"] {
        let x = &io[&format!("x{size}")];
        assert_close(
            &vit.prepare_tokens(x)?,
            &io[&format!("tokens{size}")],
            &format!("tokens{size}"),
        )?;
        assert_close(
            &vit.forward(x)?,
            &io[&format!("cls{size}")],
            &format!("cls{size}"),
        )?;
        assert_close(
            &vit.get_last_selfattention(x)?,
            &io[&format!("last_selfattention{size}")],
            &format!("last_selfattention{size}"),
        )?;
        let inter = vit.get_intermediate_layers(x, 4)?;
        assert_eq!(inter.len(), 4);
        let stacked = Tensor::stack(&inter, 0)?;
        assert_close(
            &stacked,
            &io[&format!("intermediate4_{size}")],
            &format!("intermediate4_{size}"),
        )?;
    }
    let x = &io["x_rect_224x160"];
    assert_close(
        &vit.forward(x)?,
        &io["cls_rect_224x160"],
        "cls_rect_224x160",
    )?;
    // The Backbone trait in eval mode is the same forward.
    assert_close(
        &vit.forward_features(&io["x96"], false)?,
        &io["cls96"],
        "forward_features",
    )?;
    Ok(())
}

/// A backend that records requested shapes and returns broadcast zeros (no allocation), for counting.
struct Counting(Mutex<Vec<(String, Shape)>>);

impl SimpleBackend for Counting {
    fn get(&self, s: Shape, name: &str, _: Init, dtype: DType, dev: &Device) -> Result<Tensor> {
        self.0.lock().unwrap().push((name.to_string(), s.clone()));
        Tensor::zeros((), dtype, dev)?.broadcast_as(s)
    }
    fn get_unchecked(&self, name: &str, _: DType, _: &Device) -> Result<Tensor> {
        candle_core::bail!("unexpected get_unchecked({name})")
    }
    fn contains_tensor(&self, _: &str) -> bool {
        true
    }
}

fn count(cfg: ViTConfig) -> Result<(usize, Vec<String>)> {
    let backend = std::sync::Arc::new(Counting(Mutex::new(Vec::new())));
    struct Shared(std::sync::Arc<Counting>);
    impl SimpleBackend for Shared {
        fn get(&self, s: Shape, n: &str, h: Init, d: DType, dev: &Device) -> Result<Tensor> {
            self.0.get(s, n, h, d, dev)
        }
        fn get_unchecked(&self, n: &str, d: DType, dev: &Device) -> Result<Tensor> {
            self.0.get_unchecked(n, d, dev)
        }
        fn contains_tensor(&self, n: &str) -> bool {
            self.0.contains_tensor(n)
        }
    }
    let vb = VarBuilder::from_backend(Box::new(Shared(backend.clone())), DType::F32, tdev());
    let _vit = VisionTransformer::new(cfg, vb)?;
    let seen = backend.0.lock().unwrap();
    let n = seen.iter().map(|(_, s)| s.elem_count()).sum();
    Ok((n, seen.iter().map(|(k, _)| k.clone()).collect()))
}

#[test]
fn parameter_counts_match_the_spec_table() -> Result<()> {
    let table = [
        (ViTConfig::vit_tiny(16), 5_524_416),
        (ViTConfig::vit_tiny(8), 5_526_720),
        (ViTConfig::vit_small(16), 21_665_664),
        (ViTConfig::vit_small(8), 21_670_272),
        (ViTConfig::vit_base(16), 85_798_656),
        (ViTConfig::vit_base(8), 85_807_872),
    ];
    for (cfg, expected) in table {
        let (n, names) = count(cfg.clone())?;
        assert_eq!(n, expected, "{cfg:?}");
        assert_eq!(cfg.num_params(), expected, "num_params {cfg:?}");
        assert_eq!(names.len(), 4 + 12 * 12 + 2);
        let mut dedup = names.clone();
        dedup.sort();
        dedup.dedup();
        assert_eq!(dedup.len(), names.len(), "duplicate parameter names");
    }
    Ok(())
}

#[test]
fn seeded_init_is_reproducible_and_official_shaped() -> Result<()> {
    let dev = tdev();
    let cfg = ViTConfig::custom(16, 4, 32, 2, 2);
    let build = |seed| -> Result<(VisionTransformer, VarMap)> {
        let vm = VarMap::new();
        let vit =
            VisionTransformer::new(cfg.clone(), seeded_var_builder(&vm, seed, DType::F32, &dev))?;
        Ok((vit, vm))
    };
    let (a, vma) = build(3)?;
    let (b, _) = build(3)?;
    let (c, _) = build(4)?;
    let x = randn(101, &[2, 3, 16, 16])?;
    let (ya, yb, yc) = (a.forward(&x)?, b.forward(&x)?, c.forward(&x)?);
    let diff = |p: &Tensor, q: &Tensor| -> Result<f32> { (p - q)?.abs()?.max_all()?.to_scalar() };
    assert_eq!(diff(&ya, &yb)?, 0.0);
    assert!(diff(&ya, &yc)? > 1e-4);
    let data = vma.data().lock().unwrap();
    let get = |k: &str| data[k].as_tensor().clone();
    // LayerNorm 1/0, linear biases 0, trunc-normal 0.02 weights, patch embed U(±1/sqrt(3*16)).
    assert_eq!(
        get("blocks.1.norm2.weight").min_all()?.to_scalar::<f32>()?,
        1.0
    );
    assert_eq!(get("norm.bias").abs()?.max_all()?.to_scalar::<f32>()?, 0.0);
    assert_eq!(
        get("blocks.0.mlp.fc1.bias")
            .abs()?
            .max_all()?
            .to_scalar::<f32>()?,
        0.0
    );
    let std = get("blocks.0.mlp.fc1.weight")
        .sqr()?
        .mean_all()?
        .sqrt()?
        .to_scalar::<f32>()?;
    assert!((std - 0.02).abs() < 0.003, "fc1 std {std}");
    let bound = 1.0 / (48f32).sqrt();
    for k in ["patch_embed.proj.weight", "patch_embed.proj.bias"] {
        let m = get(k).abs()?.max_all()?.to_scalar::<f32>()?;
        assert!(m <= bound && m > 0.5 * bound, "{k}: max {m}, bound {bound}");
    }
    Ok(())
}

/// `LinearInit::DefaultUniform`: every block linear's weight and bias is `U(±1/sqrt(fan_in))` (bounded, std
/// `bound/sqrt(3)`, non-zero bias), while the tensors drawn before the blocks (patch embedding, cls token,
/// positional embedding) are the same draws as under the official init.
#[test]
fn default_uniform_linear_init_is_pytorchs_nn_linear() -> Result<()> {
    let dev = tdev();
    let official = ViTConfig::custom(16, 4, 64, 2, 2);
    let uniform = ViTConfig {
        linear_init: LinearInit::DefaultUniform,
        ..official.clone()
    };
    let build = |cfg: &ViTConfig| -> Result<VarMap> {
        let vm = VarMap::new();
        VisionTransformer::new(cfg.clone(), seeded_var_builder(&vm, 7, DType::F32, &dev))?;
        Ok(vm)
    };
    let (vo, vu) = (build(&official)?, build(&uniform)?);
    let (o, u) = (vo.data().lock().unwrap(), vu.data().lock().unwrap());
    let stat = |t: &Tensor| -> Result<(f32, f32)> {
        Ok((
            t.abs()?.max_all()?.to_scalar::<f32>()?,
            t.sqr()?.mean_all()?.sqrt()?.to_scalar::<f32>()?,
        ))
    };
    for (layer, fan_in) in [
        ("attn.qkv", 64usize),
        ("attn.proj", 64),
        ("mlp.fc1", 64),
        ("mlp.fc2", 256),
    ] {
        let bound = 1.0 / (fan_in as f32).sqrt();
        for blk in 0..2 {
            let w = u[&format!("blocks.{blk}.{layer}.weight")]
                .as_tensor()
                .clone();
            let (max, std) = stat(&w)?;
            assert!(
                max <= bound && max > 0.95 * bound,
                "{layer}: max {max}, bound {bound}"
            );
            let want = bound / 3f32.sqrt();
            assert!(
                (std / want - 1.0).abs() < 0.06,
                "{layer}: std {std}, want {want}"
            );
            let (bmax, _) = stat(u[&format!("blocks.{blk}.{layer}.bias")].as_tensor())?;
            assert!(
                bmax <= bound && bmax > 0.5 * bound,
                "{layer} bias: max {bmax}"
            );
            let (_, ostd) = stat(o[&format!("blocks.{blk}.{layer}.weight")].as_tensor())?;
            assert!((ostd - 0.02).abs() < 0.003, "official {layer}: std {ostd}");
        }
    }
    for k in ["patch_embed.proj.weight", "cls_token", "pos_embed"] {
        let d = (o[k].as_tensor() - u[k].as_tensor())?
            .abs()?
            .max_all()?
            .to_scalar::<f32>()?;
        assert_eq!(d, 0.0, "{k} should not depend on linear_init");
    }
    Ok(())
}

fn tiny_trainable(cfg: ViTConfig, seed: u64) -> Result<(VisionTransformer, Vec<(String, Var)>)> {
    let vm = VarMap::new();
    let vit = VisionTransformer::new(cfg, seeded_var_builder(&vm, seed, DType::F32, &tdev()))?;
    let mut vars: Vec<(String, Var)> = vm
        .data()
        .lock()
        .unwrap()
        .iter()
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    vars.sort_by(|a, b| a.0.cmp(&b.0));
    Ok((vit, vars))
}

#[test]
fn one_backward_pass_reaches_every_parameter() -> Result<()> {
    for pool in [Pool::Cls, Pool::Avg] {
        backward_reaches_every_parameter(pool, 4, true)?;
    }
    Ok(())
}

/// The same with one batch of 64 images, average pooling and no drop path: 1,088 token rows through every
/// linear layer of every block (1,024 through the patch embedding), enough for the row-blocked backward of
/// each (bf16 products block a layer without GELU from 1,024 rows on), and no second batch whose gradient
/// could hide a zero from it.
#[test]
fn one_backward_pass_in_row_blocks_reaches_every_parameter() -> Result<()> {
    backward_reaches_every_parameter(Pool::Avg, 64, false)
}

/// With `multi_crop` a batch of `batch` images and as many smaller, non-square crops (interpolated
/// positions), as multi-crop does, with drop path 0.1; otherwise the one batch, without drop path.
fn backward_reaches_every_parameter(pool: Pool, batch: usize, multi_crop: bool) -> Result<()> {
    let cfg = ViTConfig {
        pool,
        ..ViTConfig::custom(16, 4, 16, 2, 2).with_drop_path(if multi_crop { 0.1 } else { 0.0 })
    };
    let (vit, vars) = tiny_trainable(cfg, 11)?;
    vit.reseed(5);
    let x1 = randn(102, &[batch, 3, 16, 16])?;
    let (y, r) = if multi_crop {
        let x2 = randn(103, &[batch, 3, 8, 12])?;
        let y = Tensor::cat(&[vit.forward_t(&x1, true)?, vit.forward_t(&x2, true)?], 0)?;
        (y, randn(104, &[2 * batch, 16])?)
    } else {
        (vit.forward_t(&x1, true)?, randn(104, &[batch, 16])?)
    };
    let grads = (y * r)?.sum_all()?.backward()?;
    assert_eq!(vars.len(), 4 + 2 * 12 + 2);
    for (name, var) in &vars {
        let g = grads
            .get(var)
            .unwrap_or_else(|| panic!("{name} ({pool:?}): no gradient"));
        let m = g.abs()?.max_all()?.to_scalar::<f32>()?;
        assert!(m > 0.0, "{name} ({pool:?}): zero gradient");
        assert!(m.is_finite(), "{name} ({pool:?}): non-finite gradient");
    }
    Ok(())
}

#[test]
fn gradients_match_finite_differences() -> Result<()> {
    for pool in [Pool::Cls, Pool::Avg] {
        gradients_match_finite_differences_with(pool)?;
    }
    Ok(())
}

fn gradients_match_finite_differences_with(pool: Pool) -> Result<()> {
    // img 8, patch 4, dim 8, depth 2, 2 heads; drop path 0.3 with masks fixed by reseeding; a non-square
    // 12x8 input so the pos_embed gradient goes through the bicubic interpolation.
    let cfg = ViTConfig {
        pool,
        ..ViTConfig::custom(8, 4, 8, 2, 2).with_drop_path(0.3)
    };
    let (vit, vars) = tiny_trainable(cfg, 21)?;
    let dev = tdev();
    let x = (randn(105, &[3, 3, 12, 8])? * 2.0)?;
    let r = randn(106, &[3, 8])?;
    let loss = || -> Result<f64> {
        vit.reseed(9);
        let y = vit.forward_t(&x, true)?.to_dtype(DType::F64)?;
        (y * r.to_dtype(DType::F64)?)?.sum_all()?.to_scalar::<f64>()
    };
    vit.reseed(9);
    let grads = (vit.forward_t(&x, true)? * &r)?.sum_all()?.backward()?;
    let h = 5e-3f32;
    let mut checked = 0;
    for (name, var) in &vars {
        let g: Vec<f32> = grads.get(var).expect("grad").flatten_all()?.to_vec1()?;
        let base: Vec<f32> = var.as_tensor().flatten_all()?.to_vec1()?;
        let shape = var.dims().to_vec();
        // The two largest-gradient entries of each tensor.
        let mut idx: Vec<usize> = (0..g.len()).collect();
        idx.sort_by(|&a, &b| g[b].abs().total_cmp(&g[a].abs()));
        for &i in idx.iter().take(2) {
            let mut p = base.clone();
            p[i] += h;
            var.set(&Tensor::from_vec(p, shape.as_slice(), &dev)?)?;
            let lp = loss()?;
            let mut m = base.clone();
            m[i] -= h;
            var.set(&Tensor::from_vec(m, shape.as_slice(), &dev)?)?;
            let lm = loss()?;
            var.set(&Tensor::from_vec(base.clone(), shape.as_slice(), &dev)?)?;
            let fd = (lp - lm) / (2.0 * h as f64);
            let an = g[i] as f64;
            assert!(
                (an - fd).abs() <= 3e-3 + 5e-2 * fd.abs(),
                "{name}[{i}] ({pool:?}): analytic {an} vs finite difference {fd}"
            );
            checked += 1;
        }
    }
    assert!(checked >= 2 * 28);
    Ok(())
}

#[test]
fn drop_path_is_training_only_seeded_and_linear_in_depth() -> Result<()> {
    let cfg = ViTConfig::custom(16, 4, 16, 5, 2).with_drop_path(0.4);
    let (vit, _) = tiny_trainable(cfg, 1)?;
    let rates = vit.drop_path_rates();
    for (i, r) in rates.iter().enumerate() {
        assert!((r - 0.1 * i as f64).abs() < 1e-12, "{rates:?}");
    }
    let x = randn(107, &[16, 3, 16, 16])?;
    let e1 = vit.forward_t(&x, false)?;
    let e2 = vit.forward(&x)?;
    let diff = |p: &Tensor, q: &Tensor| -> Result<f32> { (p - q)?.abs()?.max_all()?.to_scalar() };
    assert_eq!(diff(&e1, &e2)?, 0.0);
    vit.reseed(7);
    let t1 = vit.forward_t(&x, true)?;
    let t1b = vit.forward_t(&x, true)?; // the RNG advanced: other masks
    vit.reseed(7);
    let t2 = vit.forward_t(&x, true)?;
    assert_eq!(diff(&t1, &t2)?, 0.0);
    assert!(diff(&t1, &e1)? > 1e-4);
    assert!(diff(&t1, &t1b)? > 1e-4);
    Ok(())
}

/// Drop-path masks are keyed by each row's (crop, global-batch position): two "ranks" holding the even and
/// the odd samples of a batch (2 crops each, crop-major) draw the same masks as one process holding all of
/// them, so their rows of the output are the same.
#[test]
fn drop_path_masks_do_not_depend_on_the_data_parallel_split() -> Result<()> {
    let cfg = ViTConfig::custom(16, 4, 16, 3, 2).with_drop_path(0.5);
    let (vit, _) = tiny_trainable(cfg, 3)?;
    let (b, crops) = (8usize, 2usize);
    let x = randn(11, &[crops * b, 3, 16, 16])?; // crop-major: rows [c*b, (c+1)*b) are crop c
    let all: Vec<u64> = (0..b as u64).collect();
    vit.set_drop_path_samples(99, &all);
    let full = vit.forward_t(&x, true)?.to_vec2::<f32>()?;
    let mut dropped_somewhere = false;
    for rank in 0..2usize {
        let mine: Vec<usize> = (rank..b).step_by(2).collect();
        let rows: Vec<u32> = (0..crops)
            .flat_map(|c| mine.iter().map(move |&j| (c * b + j) as u32))
            .collect();
        let xr = x.index_select(&Tensor::new(rows.as_slice(), &tdev())?, 0)?;
        let ids: Vec<u64> = mine.iter().map(|&j| j as u64).collect();
        vit.set_drop_path_samples(99, &ids);
        let part = vit.forward_t(&xr, true)?.to_vec2::<f32>()?;
        // Same masks: equal up to the rounding of a smaller matrix product (a mask that differs changes a
        // row by O(1): a whole residual branch comes or goes).
        for (r, &row) in rows.iter().enumerate() {
            for (p, q) in part[r].iter().zip(&full[row as usize]) {
                assert!(
                    (p - q).abs() <= 1e-5 * (1.0 + q.abs()),
                    "rank {rank}, row {row}: {p} vs {q}"
                );
            }
        }
    }
    // Masks were drawn at all: another seed gives other outputs; eval mode gives others again.
    vit.set_drop_path_samples(100, &all);
    let other = vit.forward_t(&x, true)?.to_vec2::<f32>()?;
    let eval = vit.forward_t(&x, false)?.to_vec2::<f32>()?;
    let far = |a: &[f32], b: &[f32]| a.iter().zip(b).any(|(p, q)| (p - q).abs() > 1e-3);
    for r in 0..crops * b {
        dropped_somewhere |= far(&other[r], &full[r]) || far(&eval[r], &full[r]);
    }
    assert!(dropped_somewhere, "drop path 0.5 dropped nothing");
    Ok(())
}

#[test]
fn rejects_bad_inputs_and_configs() -> Result<()> {
    let cfg = ViTConfig::custom(16, 4, 16, 1, 3);
    let vm = VarMap::new();
    assert!(VisionTransformer::new(cfg, seeded_var_builder(&vm, 0, DType::F32, &tdev())).is_err());
    let (vit, _) = tiny_trainable(ViTConfig::custom(16, 4, 16, 1, 2), 0)?;
    let err = vit
        .forward(&Tensor::zeros((2, 1, 16, 16), DType::F32, &tdev())?)
        .unwrap_err();
    assert!(err.to_string().contains("[2, 1, 16, 16]"), "{err}");
    let m: HashMap<String, Tensor> = HashMap::new();
    let vb = VarBuilder::from_tensors(m, DType::F32, &tdev());
    let err = VisionTransformer::new(ViTConfig::vit_tiny(16), vb).unwrap_err();
    assert!(err.to_string().contains("patch_embed.proj.weight"), "{err}");
    Ok(())
}

#[test]
fn avg_pool_is_the_mean_of_the_normed_patch_tokens() -> Result<()> {
    let cfg = ViTConfig::custom(16, 4, 16, 2, 2);
    let (cls_vit, _) = tiny_trainable(cfg.clone(), 31)?;
    let (avg_vit, _) = tiny_trainable(
        ViTConfig {
            pool: Pool::Avg,
            ..cfg
        },
        31,
    )?;
    let x = randn(107, &[3, 3, 16, 12])?;
    let tokens = cls_vit.get_intermediate_layers(&x, 1)?.remove(0);
    let want = tokens.narrow(1, 1, tokens.dim(1)? - 1)?.mean(1)?;
    assert_close(&avg_vit.forward_t(&x, false)?, &want, "avg pool")?;
    // ... and not the CLS token.
    let d = (avg_vit.forward_t(&x, false)? - cls_vit.forward_t(&x, false)?)?
        .abs()?
        .max_all()?
        .to_scalar::<f32>()?;
    assert!(d > 1e-3, "avg pool equals the CLS token");
    Ok(())
}

dino_kernels::portable_path_tests!(
    vit_tiny16_matches_official_outputs,
    one_backward_pass_reaches_every_parameter,
    one_backward_pass_in_row_blocks_reaches_every_parameter,
    gradients_match_finite_differences,
    drop_path_is_training_only_seeded_and_linear_in_depth,
);

dino_kernels::bf16_path_tests!(
    one_backward_pass_reaches_every_parameter,
    one_backward_pass_in_row_blocks_reaches_every_parameter,
);
