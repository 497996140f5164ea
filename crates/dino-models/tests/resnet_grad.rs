//! ResNet gradients: one backward pass reaches every trainable parameter (never the BN buffers), and
//! finite-difference checks of the max-pool, of a conv + BatchNorm block and of a tiny ResNet.

use candle_core::{DType, Tensor, Var};
use candle_nn::{VarBuilder, VarMap};
use dino_models::resnet::{
    conv2d, is_batch_norm_buffer, max_pool2d, max_pool2d_composed, BatchNorm2d, ResNet,
    ResNetConfig,
};
use dino_models::Backbone;

/// The device these checks run on: the CPU, or GPU 0 under `DINO_TEST_DEVICE=cuda` (`cargo xtask gpu-check`).
fn tdev() -> candle_core::Device {
    dino_models::dispatch::test_device()
}

thread_local! {
    /// Per-test (per-thread) draw counter: every test sees the same inputs on every run.
    static DRAWS: std::cell::Cell<u64> = const { std::cell::Cell::new(0) };
}

/// Standard-normal values, seeded by the test's draw count: the finite-difference checks must not depend on the
/// run (a random draw can put a ReLU or max-pool input within the difference step of its kink).
fn rand(shape: &[usize], dtype: DType) -> Tensor {
    use rand::SeedableRng;
    use rand_distr::Distribution;
    let seed = DRAWS.with(|d| {
        d.set(d.get() + 1);
        d.get()
    });
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
    let n: usize = shape.iter().product();
    let v: Vec<f64> = (0..n)
        .map(|_| rand_distr::StandardNormal.sample(&mut rng))
        .collect();
    Tensor::from_vec(v, shape, &tdev())
        .unwrap()
        .to_dtype(dtype)
        .unwrap()
}

/// A variable builder with seeded initial values (see [`rand`]).
fn seeded(varmap: &VarMap, dtype: DType) -> VarBuilder<'static> {
    dino_models::init::seeded_var_builder(varmap, 0, dtype, &tdev())
}

/// One train-mode forward + backward of `sum(features * r)`; every trainable parameter must get a
/// non-zero gradient, and no buffer may get one.
fn all_params_get_gradients(cfg: ResNetConfig, batch: usize, hw: usize) {
    let varmap = VarMap::new();
    let model = ResNet::new(cfg.clone(), seeded(&varmap, DType::F32)).unwrap();
    let x = rand(&[batch, 3, hw, hw], DType::F32);
    let feats = model.forward_features(&x, true).unwrap();
    let r = rand(feats.dims(), DType::F32);
    let grads = (feats * r).unwrap().sum_all().unwrap().backward().unwrap();
    let vars = varmap.data().lock().unwrap();
    let mut names: Vec<_> = vars.keys().cloned().collect();
    names.sort();
    let mut n_checked = 0;
    for name in names {
        let var = &vars[&name];
        let g = grads.get(var.as_tensor());
        if is_batch_norm_buffer(&name) {
            let zero = g
                .map(|g| {
                    g.abs()
                        .unwrap()
                        .sum_all()
                        .unwrap()
                        .to_scalar::<f32>()
                        .unwrap()
                        == 0.0
                })
                .unwrap_or(true);
            assert!(zero, "{cfg:?}: buffer {name} received a gradient");
            continue;
        }
        let g = g.unwrap_or_else(|| panic!("{cfg:?}: no gradient for {name}"));
        assert_eq!(g.dims(), var.dims());
        let norm = g
            .sqr()
            .unwrap()
            .sum_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        assert!(
            norm > 0.0 && norm.is_finite(),
            "{cfg:?}: gradient of {name} has squared norm {norm}"
        );
        n_checked += 1;
    }
    let n_bn = vars.keys().filter(|k| k.ends_with("running_mean")).count();
    assert_eq!(n_checked, vars.len() - 3 * n_bn);
}

#[test]
fn resnet18_every_parameter_gets_a_gradient() {
    // layer4 sees 1x1 maps: batch 4 gives its BatchNorms 4 values per channel.
    all_params_get_gradients(ResNetConfig::resnet18(), 4, 32);
}

#[test]
fn resnet18_cifar_every_parameter_gets_a_gradient() {
    all_params_get_gradients(ResNetConfig::resnet18_cifar(), 2, 32);
}

#[test]
fn resnet50_every_parameter_gets_a_gradient() {
    all_params_get_gradients(ResNetConfig::resnet50(), 4, 32);
}

#[test]
fn resnet50_cifar_every_parameter_gets_a_gradient() {
    all_params_get_gradients(ResNetConfig::resnet50().cifar(), 2, 16);
}

/// Central differences of `f` at every coordinate of `x` (f64).
fn numeric_grad(x: &Tensor, f: &dyn Fn(&Tensor) -> f64, eps: f64) -> Vec<f64> {
    let v = x.flatten_all().unwrap().to_vec1::<f64>().unwrap();
    (0..v.len())
        .map(|i| {
            let mut p = v.clone();
            p[i] += eps;
            let fp = f(&Tensor::from_vec(p.clone(), x.shape(), x.device()).unwrap());
            p[i] -= 2.0 * eps;
            let fm = f(&Tensor::from_vec(p, x.shape(), x.device()).unwrap());
            (fp - fm) / (2.0 * eps)
        })
        .collect()
}

fn assert_close(got: &[f64], want: &[f64], tol: f64, what: &str) {
    assert_eq!(got.len(), want.len());
    for (i, (g, w)) in got.iter().zip(want).enumerate() {
        assert!(
            (g - w).abs() <= tol * (1.0 + w.abs()),
            "{what}[{i}]: analytic {g} vs numeric {w}"
        );
    }
}

/// Direct PyTorch-semantics max-pool (floor mode, -inf padding) for reference.
fn naive_pool(
    x: &[f64],
    (b, c, h, w): (usize, usize, usize, usize),
    k: usize,
    s: usize,
    p: usize,
) -> Vec<f64> {
    let ho = (h + 2 * p - k) / s + 1;
    let wo = (w + 2 * p - k) / s + 1;
    let mut out = vec![f64::NEG_INFINITY; b * c * ho * wo];
    for pl in 0..b * c {
        for oy in 0..ho {
            for ox in 0..wo {
                for ky in 0..k {
                    for kx in 0..k {
                        let (iy, ix) = (
                            (oy * s + ky) as isize - p as isize,
                            (ox * s + kx) as isize - p as isize,
                        );
                        if iy >= 0 && ix >= 0 && (iy as usize) < h && (ix as usize) < w {
                            let v = x[pl * h * w + iy as usize * w + ix as usize];
                            let o = &mut out[(pl * ho + oy) * wo + ox];
                            *o = o.max(v);
                        }
                    }
                }
            }
        }
    }
    out
}

#[test]
fn max_pool_forward_and_finite_differences() {
    for &(h, w, k, s, p) in &[
        (7usize, 8usize, 3usize, 2usize, 1usize),
        (6, 5, 3, 2, 1),
        (5, 5, 2, 2, 0),
        (4, 6, 3, 1, 1),
    ] {
        let x = rand(&[2, 2, h, w], DType::F64);
        let xv = x.flatten_all().unwrap().to_vec1::<f64>().unwrap();
        let want = naive_pool(&xv, (2, 2, h, w), k, s, p);
        let r = rand(
            &[2, 2, (h + 2 * p - k) / s + 1, (w + 2 * p - k) / s + 1],
            DType::F64,
        );
        let loss = |t: &Tensor| {
            (max_pool2d(t, k, s, p).unwrap() * &r)
                .unwrap()
                .sum_all()
                .unwrap()
                .to_scalar::<f64>()
                .unwrap()
        };
        let numeric = numeric_grad(&x, &loss, 1e-6);
        for (which, pool) in [
            (
                "custom op",
                max_pool2d as fn(&Tensor, usize, usize, usize) -> candle_core::Result<Tensor>,
            ),
            ("composed", max_pool2d_composed),
        ] {
            let xv_var = Var::from_tensor(&x).unwrap();
            let y = pool(xv_var.as_tensor(), k, s, p).unwrap();
            assert_eq!(
                y.flatten_all().unwrap().to_vec1::<f64>().unwrap(),
                want,
                "{which} forward {h}x{w} k{k} s{s} p{p}"
            );
            let grads = (y * &r).unwrap().sum_all().unwrap().backward().unwrap();
            let g = grads
                .get(xv_var.as_tensor())
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1::<f64>()
                .unwrap();
            assert_close(
                &g,
                &numeric,
                1e-6,
                &format!("{which} max-pool grad {h}x{w} k{k} s{s} p{p}"),
            );
        }
        // f32 path equals the f64 one.
        let y32 = max_pool2d(&x.to_dtype(DType::F32).unwrap(), k, s, p)
            .unwrap()
            .to_dtype(DType::F64)
            .unwrap();
        let y64 = max_pool2d(&x, k, s, p).unwrap();
        assert!(
            (y32 - y64)
                .unwrap()
                .abs()
                .unwrap()
                .max_all()
                .unwrap()
                .to_scalar::<f64>()
                .unwrap()
                < 1e-6
        );
    }
}

#[test]
fn max_pool_ties_go_to_the_first_maximum_like_pytorch() {
    // A constant 4x4 plane, 3x3/s2/p1 -> 2x2; PyTorch gives each window's gradient to its first element
    // in row-major order: windows start at (0,0), (0,1), (1,0), (1,1).
    let x = Var::from_tensor(&Tensor::ones((1, 1, 4, 4), DType::F32, &tdev()).unwrap()).unwrap();
    let g = max_pool2d(x.as_tensor(), 3, 2, 1)
        .unwrap()
        .sum_all()
        .unwrap()
        .backward()
        .unwrap();
    let g = g
        .get(x.as_tensor())
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1::<f32>()
        .unwrap();
    let mut want = vec![0f32; 16];
    for i in [0, 1, 4, 5] {
        want[i] = 1.0;
    }
    assert_eq!(g, want);
    // Stock candle gets this wrong (see candle-notes); make sure we are not calling it.
    let e = max_pool2d(
        &Tensor::ones((1, 1, 1, 1), DType::F32, &tdev()).unwrap(),
        3,
        2,
        0,
    )
    .unwrap_err();
    assert!(e.to_string().contains("smaller than the kernel"), "{e}");
}

#[test]
fn conv_bn_block_finite_differences() {
    // relu(BN_train(conv3x3/s2(x))) in f64 on a non-square input: gradients of x, the conv weight, BN weight
    // and bias.
    let varmap = VarMap::new();
    let vb = seeded(&varmap, DType::F64);
    let bn = BatchNorm2d::new(4, 1e-5, 0.1, vb.pp("bn")).unwrap();
    let w = Var::from_tensor(&rand(&[4, 3, 3, 3], DType::F64)).unwrap();
    let gamma = varmap.data().lock().unwrap()["bn.weight"].clone();
    let beta = varmap.data().lock().unwrap()["bn.bias"].clone();
    gamma.set(&rand(&[4], DType::F64)).unwrap();
    beta.set(&rand(&[4], DType::F64)).unwrap();
    let x = Var::from_tensor(&rand(&[2, 3, 6, 5], DType::F64)).unwrap();
    let r = rand(&[2, 4, 3, 3], DType::F64);
    let f = |x: &Tensor, w: &Tensor| -> Tensor {
        let h = conv2d(x, w, 2, 1).unwrap();
        (bn.forward(&h, true).unwrap().relu().unwrap() * &r)
            .unwrap()
            .sum_all()
            .unwrap()
    };
    let grads = f(x.as_tensor(), w.as_tensor()).backward().unwrap();
    let flat = |t: &Tensor| t.flatten_all().unwrap().to_vec1::<f64>().unwrap();
    let eps = 1e-6;
    let num_x = numeric_grad(
        x.as_tensor(),
        &|t| f(t, w.as_tensor()).to_scalar::<f64>().unwrap(),
        eps,
    );
    assert_close(
        &flat(grads.get(x.as_tensor()).unwrap()),
        &num_x,
        1e-5,
        "d/dx",
    );
    let num_w = numeric_grad(
        w.as_tensor(),
        &|t| f(x.as_tensor(), t).to_scalar::<f64>().unwrap(),
        eps,
    );
    assert_close(
        &flat(grads.get(w.as_tensor()).unwrap()),
        &num_w,
        1e-5,
        "d/dconv.weight",
    );
    for (name, p) in [("bn.weight", &gamma), ("bn.bias", &beta)] {
        let orig = p.as_tensor().copy().unwrap();
        let num = numeric_grad(
            &orig,
            &|t| {
                p.set(t).unwrap();
                f(x.as_tensor(), w.as_tensor()).to_scalar::<f64>().unwrap()
            },
            eps,
        );
        p.set(&orig).unwrap();
        assert_close(&flat(grads.get(p.as_tensor()).unwrap()), &num, 1e-5, name);
    }
    // train-mode forwards counted: 1 + 2 * (numel(x) + numel(w) + 8)
    assert_eq!(
        bn.num_batches_tracked().unwrap() as usize,
        1 + 2 * (2 * 3 * 6 * 5 + 4 * 27 + 8)
    );
}

#[test]
fn tiny_resnet_finite_differences() {
    // ResNet-18 (CIFAR stem) in f64 on 2x3x16x16 (layer4 BNs see 8 values per channel), train mode: spot-check input and parameter gradients.
    let varmap = VarMap::new();
    let model = ResNet::new(ResNetConfig::resnet18_cifar(), seeded(&varmap, DType::F64)).unwrap();
    let x = Var::from_tensor(&rand(&[2, 3, 16, 16], DType::F64)).unwrap();
    let r = rand(&[2, 512], DType::F64);
    let f = |x: &Tensor| {
        (model.forward_features(x, true).unwrap() * &r)
            .unwrap()
            .sum_all()
            .unwrap()
    };
    let grads = f(x.as_tensor()).backward().unwrap();
    // A small step: with ~10^5 ReLUs, a larger one moves some pre-activations across zero.
    let eps = 1e-7;
    let vars = varmap.data().lock().unwrap();
    for (name, idx) in [
        ("conv1.weight", 5usize),
        ("layer1.0.conv2.weight", 1000),
        ("layer2.0.downsample.0.weight", 77),
        ("layer3.1.bn1.weight", 3),
        ("layer4.1.bn2.bias", 100),
        ("layer4.0.conv1.weight", 12345),
    ] {
        let var = &vars[name];
        let g = grads
            .get(var.as_tensor())
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1::<f64>()
            .unwrap()[idx];
        let orig = var
            .as_tensor()
            .flatten_all()
            .unwrap()
            .to_vec1::<f64>()
            .unwrap();
        let at = |d: f64| {
            let mut v = orig.clone();
            v[idx] += d;
            var.set(&Tensor::from_vec(v, var.shape(), &tdev()).unwrap())
                .unwrap();
            f(x.as_tensor()).to_scalar::<f64>().unwrap()
        };
        let num = (at(eps) - at(-eps)) / (2.0 * eps);
        var.set(&Tensor::from_vec(orig, var.shape(), &tdev()).unwrap())
            .unwrap();
        assert!(
            (g - num).abs() <= 1e-4 * (1.0 + num.abs()),
            "{name}[{idx}]: analytic {g} vs numeric {num}"
        );
    }
    let gx = grads
        .get(x.as_tensor())
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1::<f64>()
        .unwrap();
    let xv = x
        .as_tensor()
        .flatten_all()
        .unwrap()
        .to_vec1::<f64>()
        .unwrap();
    for idx in [0usize, 77, 200, 383] {
        let at = |d: f64| {
            let mut v = xv.clone();
            v[idx] += d;
            f(&Tensor::from_vec(v, x.shape(), &tdev()).unwrap())
                .to_scalar::<f64>()
                .unwrap()
        };
        let num = (at(eps) - at(-eps)) / (2.0 * eps);
        assert!(
            (gx[idx] - num).abs() <= 1e-4 * (1.0 + num.abs()),
            "x[{idx}]: analytic {} vs numeric {num}",
            gx[idx]
        );
    }
}

#[test]
fn conv2d_matches_candle_and_finite_differences() {
    // (B, C, H, W, O, k, stride, padding): every geometry the ResNets use, on odd sizes.
    for &(b, c, h, w, o, k, s, p) in &[
        (
            2usize, 3usize, 7usize, 6usize, 4usize, 3usize, 1usize, 1usize,
        ),
        (2, 3, 7, 6, 4, 3, 2, 1),
        (2, 4, 5, 5, 3, 1, 1, 0),
        (2, 3, 6, 6, 4, 3, 2, 1),
        (2, 4, 5, 6, 3, 1, 2, 0),
        (1, 3, 9, 8, 2, 7, 2, 3),
    ] {
        let what = format!("conv b{b} c{c} {h}x{w} o{o} k{k} s{s} p{p}");
        let x = Var::from_tensor(&rand(&[b, c, h, w], DType::F64)).unwrap();
        let wt = Var::from_tensor(&rand(&[o, c, k, k], DType::F64)).unwrap();
        let y = conv2d(x.as_tensor(), wt.as_tensor(), s, p).unwrap();
        let want = x.as_tensor().conv2d(wt.as_tensor(), p, s, 1, 1).unwrap();
        assert_eq!(y.dims(), want.dims(), "{what}");
        let d = (&y - &want)
            .unwrap()
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar::<f64>()
            .unwrap();
        assert!(d < 1e-12, "{what}: forward differs from candle by {d}");
        let r = rand(y.dims(), DType::F64);
        let grads = (y * &r).unwrap().sum_all().unwrap().backward().unwrap();
        let flat = |t: &Tensor| t.flatten_all().unwrap().to_vec1::<f64>().unwrap();
        let f = |xx: &Tensor, ww: &Tensor| {
            (conv2d(xx, ww, s, p).unwrap() * &r)
                .unwrap()
                .sum_all()
                .unwrap()
                .to_scalar::<f64>()
                .unwrap()
        };
        let num_x = numeric_grad(x.as_tensor(), &|t| f(t, wt.as_tensor()), 1e-6);
        assert_close(
            &flat(grads.get(x.as_tensor()).unwrap()),
            &num_x,
            1e-7,
            &format!("{what} d/dx"),
        );
        let num_w = numeric_grad(wt.as_tensor(), &|t| f(x.as_tensor(), t), 1e-6);
        assert_close(
            &flat(grads.get(wt.as_tensor()).unwrap()),
            &num_w,
            1e-7,
            &format!("{what} d/dw"),
        );

        // f32: same gradients as candle's own conv2d backward (only on square inputs: candle 0.11.1 takes the
        // output padding of its conv_transpose2d from the height alone, so H != W can fail there).
        if h != w {
            continue;
        }
        let x32 = Var::from_tensor(&x.as_tensor().to_dtype(DType::F32).unwrap()).unwrap();
        let w32 = Var::from_tensor(&wt.as_tensor().to_dtype(DType::F32).unwrap()).unwrap();
        let r32 = r.to_dtype(DType::F32).unwrap();
        let ours = (conv2d(x32.as_tensor(), w32.as_tensor(), s, p).unwrap() * &r32)
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap();
        let theirs = (x32.as_tensor().conv2d(w32.as_tensor(), p, s, 1, 1).unwrap() * &r32)
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap();
        for v in [&x32, &w32] {
            let d = (ours.get(v.as_tensor()).unwrap() - theirs.get(v.as_tensor()).unwrap())
                .unwrap()
                .abs()
                .unwrap()
                .max_all()
                .unwrap()
                .to_scalar::<f32>()
                .unwrap();
            assert!(
                d < 1e-4,
                "{what}: f32 gradient differs from candle's by {d}"
            );
        }
    }
}

#[test]
fn fused_batch_norm_equals_the_composed_one() {
    // The CPU fused train-mode op against the candle-composed path used on other devices: outputs and
    // the gradients of x, weight and bias (f64, non-square maps, 3 images).
    let varmap = VarMap::new();
    let vb = seeded(&varmap, DType::F64);
    let bn = BatchNorm2d::new(5, 1e-5, 0.1, vb.pp("bn")).unwrap();
    let (gamma, beta) = {
        let vars = varmap.data().lock().unwrap();
        (vars["bn.weight"].clone(), vars["bn.bias"].clone())
    };
    gamma.set(&rand(&[5], DType::F64)).unwrap();
    beta.set(&rand(&[5], DType::F64)).unwrap();
    let x = Var::from_tensor(&rand(&[3, 5, 4, 7], DType::F64).affine(3.0, 1.0).unwrap()).unwrap();
    let r = rand(&[3, 5, 4, 7], DType::F64);
    let fused = bn.forward(x.as_tensor(), true).unwrap();
    let composed = bn.forward_train_composed(x.as_tensor()).unwrap();
    let maxdiff = |a: &Tensor, b: &Tensor| {
        (a - b)
            .unwrap()
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar::<f64>()
            .unwrap()
    };
    assert!(maxdiff(&fused, &composed) < 1e-12);
    let gf = (&fused * &r)
        .unwrap()
        .sum_all()
        .unwrap()
        .backward()
        .unwrap();
    let gc = (&composed * &r)
        .unwrap()
        .sum_all()
        .unwrap()
        .backward()
        .unwrap();
    for (name, t) in [
        ("x", x.as_tensor()),
        ("weight", gamma.as_tensor()),
        ("bias", beta.as_tensor()),
    ] {
        let d = maxdiff(gf.get(t).unwrap(), gc.get(t).unwrap());
        assert!(
            d < 1e-10,
            "gradient of {name}: fused and composed differ by {d}"
        );
    }
    // Only the forward() call counted as a batch.
    assert_eq!(bn.num_batches_tracked().unwrap(), 1);
}

dino_kernels::portable_path_tests!(
    resnet18_every_parameter_gets_a_gradient,
    resnet18_cifar_every_parameter_gets_a_gradient,
    resnet50_every_parameter_gets_a_gradient,
    resnet50_cifar_every_parameter_gets_a_gradient,
    max_pool_forward_and_finite_differences,
    max_pool_ties_go_to_the_first_maximum_like_pytorch,
    tiny_resnet_finite_differences,
);
