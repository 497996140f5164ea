//! Shifted patch tokenization (`ViTConfig::shifted_patches`, Lee et al. 2021) against a direct f64
//! computation written from the SPT code's definitions (its four `F.pad` + crop shifts, the patch LayerNorm,
//! the projection), its parameter count, and its gradients (every parameter, finite differences), on the CPU
//! fast path and the portable path.

use candle_core::{DType, Result, Tensor, Var};
use candle_nn::VarMap;
use dino_models::init::seeded_var_builder;
use dino_models::vit::{ViTConfig, VisionTransformer};

fn tdev() -> candle_core::Device {
    dino_models::dispatch::test_device()
}

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

/// img 8, patch 4 (shift 2), 2 input channels, D 8, depth 2, 2 heads.
fn config() -> ViTConfig {
    ViTConfig {
        in_chans: 2,
        shifted_patches: true,
        ..ViTConfig::custom(8, 4, 8, 2, 2)
    }
}

fn build(cfg: ViTConfig, seed: u64) -> Result<(VisionTransformer, Vec<(String, Var)>)> {
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

fn var<'a>(vars: &'a [(String, Var)], name: &str) -> &'a Var {
    &vars.iter().find(|(k, _)| k == name).unwrap().1
}

fn f64s(t: &Tensor) -> Result<Vec<f64>> {
    t.flatten_all()?.to_dtype(DType::F64)?.to_vec1()
}

/// The SPT code's `shift(x, mode)` on one channel plane `(h, w)`, from its `F.pad(...)[crop]` definitions:
/// left-up `pad(x, (s, 0, s, 0))[:-s, :-s]`, right-up `pad(x, (0, s, s, 0))[:-s, s:]`, left-down
/// `pad(x, (s, 0, 0, s))[s:, :-s]`, right-down `pad(x, (0, s, 0, s))[s:, s:]`.
fn spt_shift(plane: &[f64], h: usize, w: usize, s: usize, mode: usize) -> Vec<f64> {
    // Padding (left, right, top, bottom), then the crop's first row / column in the padded plane.
    let (l, t, r0, c0) = match mode {
        0 => (s, s, 0, 0),
        1 => (0, s, 0, s),
        2 => (s, 0, s, 0),
        _ => (0, 0, s, s),
    };
    let mut out = vec![0.0; h * w];
    for i in 0..h {
        for j in 0..w {
            // Padded coordinates (r0 + i, c0 + j) -> original (r0 + i - t, c0 + j - l).
            let (pi, pj) = (
                (r0 + i) as isize - t as isize,
                (c0 + j) as isize - l as isize,
            );
            if pi >= 0 && pj >= 0 && (pi as usize) < h && (pj as usize) < w {
                out[i * w + j] = plane[pi as usize * w + pj as usize];
            }
        }
    }
    out
}

/// The patch embedding in f64: `(B, C, H, W)` -> `(B * gh * gw, D)`.
#[allow(clippy::too_many_arguments)]
fn reference(
    x: &[f64],
    (b, c, h, w): (usize, usize, usize, usize),
    p: usize,
    ln_w: &[f64],
    ln_b: &[f64],
    proj_w: &[f64],
    proj_b: &[f64],
) -> Vec<f64> {
    let s = p / 2;
    let (gh, gw) = (h / p, w / p);
    let d = proj_b.len();
    let pd = 5 * c * p * p;
    let mut out = Vec::new();
    for bi in 0..b {
        // 5C planes: the image's C channels, then each shift of every channel (torch.cat on dim 1).
        let mut planes: Vec<Vec<f64>> = (0..c)
            .map(|ci| x[(bi * c + ci) * h * w..(bi * c + ci + 1) * h * w].to_vec())
            .collect();
        for mode in 0..4 {
            for ci in 0..c {
                let plane = x[(bi * c + ci) * h * w..(bi * c + ci + 1) * h * w].to_vec();
                planes.push(spt_shift(&plane, h, w, s, mode));
            }
        }
        for gi in 0..gh {
            for gj in 0..gw {
                // The conv weight's (C', p, p) order.
                let mut v = Vec::with_capacity(pd);
                for plane in &planes {
                    for di in 0..p {
                        for dj in 0..p {
                            v.push(plane[(gi * p + di) * w + gj * p + dj]);
                        }
                    }
                }
                let mean = v.iter().sum::<f64>() / pd as f64;
                let var = v.iter().map(|a| (a - mean).powi(2)).sum::<f64>() / pd as f64;
                let n: Vec<f64> = v
                    .iter()
                    .enumerate()
                    .map(|(k, a)| (a - mean) / (var + 1e-5).sqrt() * ln_w[k] + ln_b[k])
                    .collect();
                for o in 0..d {
                    let dot: f64 = (0..pd).map(|k| proj_w[o * pd + k] * n[k]).sum();
                    out.push(dot + proj_b[o]);
                }
            }
        }
    }
    out
}

#[test]
fn shifted_patch_embedding_matches_a_direct_computation() -> Result<()> {
    let cfg = config();
    let (vit, vars) = build(cfg.clone(), 3)?;
    // A non-trivial LayerNorm affine, so that its parameter order is checked too.
    let pd = 5 * 2 * 4 * 4;
    var(&vars, "patch_embed.norm.weight").set(&((randn(7, &[pd])? * 0.5)? + 1.0)?)?;
    var(&vars, "patch_embed.norm.bias").set(&(randn(8, &[pd])? * 0.3)?)?;
    let get = |k: &str| f64s(var(&vars, k).as_tensor());
    let (ln_w, ln_b) = (
        get("patch_embed.norm.weight")?,
        get("patch_embed.norm.bias")?,
    );
    let (pw, pb) = (
        get("patch_embed.proj.weight")?,
        get("patch_embed.proj.bias")?,
    );
    assert_eq!(var(&vars, "patch_embed.proj.weight").dims(), [8, 10, 4, 4]);
    // The training size and a non-square input with a remainder (dropped, as a stride-p conv does).
    for (seed, shape) in [(1, [3, 2, 8, 8]), (2, [2, 2, 13, 8])] {
        let x = randn(seed, &shape)?;
        let ours = f64s(&vit.patch_embed(&x)?)?;
        let want = reference(
            &f64s(&x)?,
            (shape[0], shape[1], shape[2], shape[3]),
            4,
            &ln_w,
            &ln_b,
            &pw,
            &pb,
        );
        assert_eq!(ours.len(), want.len(), "{shape:?}");
        for (i, (a, e)) in ours.iter().zip(&want).enumerate() {
            assert!(
                (a - e).abs() <= 1e-4 + 1e-4 * e.abs(),
                "{shape:?}[{i}]: ours {a} vs direct {e}"
            );
        }
    }
    // The plain patch embedding sees the image only: shifting changes the output.
    let plain = ViTConfig {
        shifted_patches: false,
        ..cfg.clone()
    };
    assert_eq!(plain.patch_in_chans(), 2);
    assert_eq!(cfg.patch_in_chans(), 10);
    Ok(())
}

#[test]
fn parameter_count_includes_the_patch_norm() -> Result<()> {
    let cfg = config();
    let (_, vars) = build(cfg.clone(), 4)?;
    let n: usize = vars.iter().map(|(_, v)| v.elem_count()).sum();
    assert_eq!(n, cfg.num_params());
    let plain = ViTConfig {
        shifted_patches: false,
        ..cfg.clone()
    };
    // 4x more projection inputs, plus the LayerNorm's weight and bias over 5 C p^2 values.
    assert_eq!(
        cfg.num_params() - plain.num_params(),
        8 * 4 * 2 * 16 + 2 * 5 * 2 * 16
    );
    Ok(())
}

#[test]
fn one_backward_pass_reaches_every_parameter() -> Result<()> {
    let (vit, vars) = build(config(), 11)?;
    // A training-size batch and a smaller non-square batch (interpolated positions), as multi-crop does.
    let x1 = randn(102, &[3, 2, 8, 8])?;
    let x2 = randn(103, &[3, 2, 4, 8])?;
    let r = randn(104, &[6, 8])?;
    let y = Tensor::cat(&[vit.forward_t(&x1, true)?, vit.forward_t(&x2, true)?], 0)?;
    let grads = (y * r)?.sum_all()?.backward()?;
    assert_eq!(vars.len(), 6 + 2 * 12 + 2);
    for (name, var) in &vars {
        let g = grads
            .get(var)
            .unwrap_or_else(|| panic!("{name}: no gradient"));
        let m = g.abs()?.max_all()?.to_scalar::<f32>()?;
        assert!(m > 0.0 && m.is_finite(), "{name}: gradient max |g| {m}");
    }
    Ok(())
}

#[test]
fn patch_gradients_match_finite_differences() -> Result<()> {
    let (vit, vars) = build(config(), 21)?;
    let dev = tdev();
    let x = (randn(105, &[2, 2, 8, 8])? * 2.0)?;
    let r = randn(106, &[2, 8])?;
    let loss = || -> Result<f64> {
        let y = vit.forward_t(&x, false)?.to_dtype(DType::F64)?;
        (y * r.to_dtype(DType::F64)?)?.sum_all()?.to_scalar::<f64>()
    };
    let grads = (vit.forward_t(&x, false)? * &r)?.sum_all()?.backward()?;
    let h = 5e-3f32;
    let mut checked = 0;
    for (name, var) in vars.iter().filter(|(k, _)| k.starts_with("patch_embed.")) {
        let g: Vec<f32> = grads.get(var).expect("grad").flatten_all()?.to_vec1()?;
        let base: Vec<f32> = var.as_tensor().flatten_all()?.to_vec1()?;
        let shape = var.dims().to_vec();
        let mut idx: Vec<usize> = (0..g.len()).collect();
        idx.sort_by(|&a, &b| g[b].abs().total_cmp(&g[a].abs()));
        for &i in idx.iter().take(3) {
            let mut v = base.clone();
            v[i] += h;
            var.set(&Tensor::from_vec(v, shape.as_slice(), &dev)?)?;
            let lp = loss()?;
            let mut v = base.clone();
            v[i] -= h;
            var.set(&Tensor::from_vec(v, shape.as_slice(), &dev)?)?;
            let lm = loss()?;
            var.set(&Tensor::from_vec(base.clone(), shape.as_slice(), &dev)?)?;
            let fd = (lp - lm) / (2.0 * h as f64);
            let an = g[i] as f64;
            assert!(
                (an - fd).abs() <= 3e-3 + 5e-2 * fd.abs(),
                "{name}[{i}]: analytic {an} vs finite difference {fd}"
            );
            checked += 1;
        }
    }
    assert_eq!(checked, 4 * 3);
    Ok(())
}

dino_kernels::portable_path_tests!(
    shifted_patch_embedding_matches_a_direct_computation,
    one_backward_pass_reaches_every_parameter,
    patch_gradients_match_finite_differences,
);

dino_kernels::bf16_path_tests!(one_backward_pass_reaches_every_parameter,);
