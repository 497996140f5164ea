//! The fused ops of `dino_models::ops` against candle's composed ops (values and autograd) and against
//! central finite differences.

use candle_core::{DType, Device, Result, Tensor, Var, D};
use dino_models::ops;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

fn randn(rng: &mut ChaCha8Rng, shape: &[usize], mean: f32, std: f32) -> Result<Tensor> {
    let n: usize = shape.iter().product();
    let v: Vec<f32> = (0..n)
        .map(|_| {
            // Box-Muller
            let u1: f32 = rng.random::<f32>().max(1e-7);
            let u2: f32 = rng.random();
            mean + std * (-2.0 * u1.ln()).sqrt() * (2.0 * std::f32::consts::PI * u2).cos()
        })
        .collect();
    Tensor::from_vec(v, shape, &Device::Cpu)
}

fn max_abs_diff(a: &Tensor, b: &Tensor) -> Result<f32> {
    assert_eq!(a.dims(), b.dims());
    (a.to_dtype(DType::F32)? - b.to_dtype(DType::F32)?)?
        .abs()?
        .flatten_all()?
        .max(0)?
        .to_scalar::<f32>()
}

fn max_abs(a: &Tensor) -> Result<f32> {
    a.abs()?.flatten_all()?.max(0)?.to_scalar::<f32>()
}

/// Gradients of `sum(f(inputs) * r)` with respect to every input.
fn grads_of(
    f: &dyn Fn(&[Tensor]) -> Result<Tensor>,
    inputs: &[Tensor],
    r: &Tensor,
) -> Result<(Tensor, Vec<Tensor>)> {
    let vars: Vec<Var> = inputs.iter().map(Var::from_tensor).collect::<Result<_>>()?;
    let ts: Vec<Tensor> = vars.iter().map(|v| v.as_tensor().clone()).collect();
    let y = f(&ts)?;
    let loss = (&y * r)?.sum_all()?;
    let g = loss.backward()?;
    let grads = vars
        .iter()
        .map(|v| {
            g.get(v)
                .cloned()
                .ok_or_else(|| candle_core::Error::Msg("missing gradient".into()))
        })
        .collect::<Result<Vec<_>>>()?;
    Ok((y, grads))
}

/// Central finite differences of `sum(f(inputs) * r)` (accumulated in f64) w.r.t. input `which`,
/// at every element.
fn finite_diff(
    f: &dyn Fn(&[Tensor]) -> Result<Tensor>,
    inputs: &[Tensor],
    r: &Tensor,
    which: usize,
    h: f32,
) -> Result<Vec<f64>> {
    let loss = |ins: &[Tensor]| -> Result<f64> {
        let y = f(ins)?.to_dtype(DType::F64)?;
        (y * r.to_dtype(DType::F64)?)?.sum_all()?.to_scalar::<f64>()
    };
    let base: Vec<f32> = inputs[which].flatten_all()?.to_vec1()?;
    let shape = inputs[which].dims().to_vec();
    let mut out = Vec::with_capacity(base.len());
    for i in 0..base.len() {
        let mut plus = base.clone();
        plus[i] += h;
        let mut minus = base.clone();
        minus[i] -= h;
        let mut ins = inputs.to_vec();
        ins[which] = Tensor::from_vec(plus, shape.as_slice(), &Device::Cpu)?;
        let lp = loss(&ins)?;
        ins[which] = Tensor::from_vec(minus, shape.as_slice(), &Device::Cpu)?;
        let lm = loss(&ins)?;
        out.push((lp - lm) / (2.0 * h as f64));
    }
    Ok(out)
}

fn check_fd(analytic: &Tensor, fd: &[f64], tol: f64, what: &str) -> Result<()> {
    let a: Vec<f32> = analytic.flatten_all()?.to_vec1()?;
    assert_eq!(a.len(), fd.len());
    let scale = fd.iter().fold(0f64, |m, v| m.max(v.abs())).max(1.0);
    for (i, (x, y)) in a.iter().zip(fd).enumerate() {
        assert!(
            (*x as f64 - y).abs() <= tol * scale,
            "{what}[{i}]: analytic {x} vs finite difference {y}"
        );
    }
    Ok(())
}

fn fast_ln(t: &[Tensor]) -> Result<Tensor> {
    ops::layer_norm(&t[0], &t[1], &t[2], 1e-6)
}

fn slow_ln(t: &[Tensor]) -> Result<Tensor> {
    candle_nn::ops::layer_norm_slow(&t[0], &t[1], &t[2], 1e-6)
}

#[test]
fn layer_norm_matches_composed_values_and_gradients() -> Result<()> {
    let mut rng = ChaCha8Rng::seed_from_u64(1);
    // Small (serial path) and large (parallel path, 300 rows x 192 > threshold) cases.
    for shape in [[2usize, 5, 48], [3, 100, 192], [1, 3, 7]] {
        let d = shape[2];
        let x = randn(&mut rng, &shape, 0.7, 2.0)?;
        let w = randn(&mut rng, &[d], 1.0, 0.5)?;
        let b = randn(&mut rng, &[d], 0.0, 0.5)?;
        let r = randn(&mut rng, &shape, 0.0, 1.0)?;
        let inputs = [x, w, b];
        let (yf, gf) = grads_of(&fast_ln, &inputs, &r)?;
        let (ys, gs) = grads_of(&slow_ln, &inputs, &r)?;
        assert!(max_abs_diff(&yf, &ys)? < 2e-5, "{shape:?} values");
        for (i, (a, b)) in gf.iter().zip(&gs).enumerate() {
            let tol = 1e-4 * max_abs(b)?.max(1.0);
            let diff = max_abs_diff(a, b)?;
            assert!(
                diff < tol,
                "{shape:?} grad {i}: diff {diff} (scale {})",
                max_abs(b)?
            );
        }
    }
    Ok(())
}

#[test]
fn layer_norm_gradients_match_finite_differences() -> Result<()> {
    let mut rng = ChaCha8Rng::seed_from_u64(2);
    let x = randn(&mut rng, &[3, 8], 0.3, 1.0)?;
    let w = randn(&mut rng, &[8], 1.0, 0.3)?;
    let b = randn(&mut rng, &[8], 0.0, 0.3)?;
    let r = randn(&mut rng, &[3, 8], 0.0, 1.0)?;
    let inputs = [x, w, b];
    let (_, g) = grads_of(&fast_ln, &inputs, &r)?;
    for (which, name) in ["x", "weight", "bias"].iter().enumerate() {
        let fd = finite_diff(&fast_ln, &inputs, &r, which, 1e-2)?;
        check_fd(&g[which], &fd, 3e-3, name)?;
    }
    Ok(())
}

#[test]
fn layer_norm_non_contiguous_and_other_dtype() -> Result<()> {
    let mut rng = ChaCha8Rng::seed_from_u64(3);
    let x = randn(&mut rng, &[16, 6], 0.0, 1.0)?.t()?; // (6, 16), strided
    assert!(!x.is_contiguous());
    let w = randn(&mut rng, &[16], 1.0, 0.1)?;
    let b = randn(&mut rng, &[16], 0.0, 0.1)?;
    let r = randn(&mut rng, &[6, 16], 0.0, 1.0)?;
    let inputs = [x.clone(), w.clone(), b.clone()];
    let (yf, gf) = grads_of(&fast_ln, &inputs, &r)?;
    let (ys, gs) = grads_of(&slow_ln, &inputs, &r)?;
    assert!(max_abs_diff(&yf, &ys)? < 2e-5);
    for (a, b) in gf.iter().zip(&gs) {
        assert!(max_abs_diff(a, b)? < 1e-4);
    }
    // f64 goes through the composed fallback and still has gradients.
    let x64 = Var::from_tensor(&x.to_dtype(DType::F64)?)?;
    let y = ops::layer_norm(
        x64.as_tensor(),
        &w.to_dtype(DType::F64)?,
        &b.to_dtype(DType::F64)?,
        1e-6,
    )?;
    assert!(max_abs_diff(&y, &ys)? < 2e-5);
    let g = (y * r.to_dtype(DType::F64)?)?.sum_all()?.backward()?;
    assert!(max_abs_diff(g.get(&x64).expect("x grad"), &gs[0])? < 1e-4);
    // Shape errors name the shapes.
    let err = ops::layer_norm(&x, &w.narrow(0, 0, 5)?, &b, 1e-6).unwrap_err();
    assert!(err.to_string().contains("[5]"), "{err}");
    Ok(())
}

fn fast_softmax(t: &[Tensor]) -> Result<Tensor> {
    ops::softmax_last_dim(&t[0])
}

fn slow_softmax(t: &[Tensor]) -> Result<Tensor> {
    candle_nn::ops::softmax(&t[0], D::Minus1)
}

#[test]
fn softmax_matches_composed_values_and_gradients() -> Result<()> {
    let mut rng = ChaCha8Rng::seed_from_u64(4);
    // Rows longer than 16 lanes with a partial last block, a multiple of 16, and shorter than 16.
    for shape in [[2usize, 3, 37], [2, 3 * 197, 197], [1, 3, 32], [1, 2, 5]] {
        let x = randn(&mut rng, &shape, 0.0, 4.0)?;
        let r = randn(&mut rng, &shape, 0.0, 1.0)?;
        let (yf, gf) = grads_of(&fast_softmax, std::slice::from_ref(&x), &r)?;
        let (ys, gs) = grads_of(&slow_softmax, &[x], &r)?;
        assert!(max_abs_diff(&yf, &ys)? < 1e-6, "{shape:?} values");
        assert!(max_abs_diff(&gf[0], &gs[0])? < 1e-5, "{shape:?} grads");
    }
    // Large logits stay finite and exact.
    let x = Tensor::new(
        &[[1000f32, 999.0, -1000.0], [-5.0, -5.0, -5.0]],
        &Device::Cpu,
    )?;
    let y = ops::softmax_last_dim(&x)?;
    let ys = candle_nn::ops::softmax(&x, D::Minus1)?;
    assert!(max_abs_diff(&y, &ys)? < 1e-6);
    Ok(())
}

#[test]
fn scaled_softmax_equals_softmax_of_scaled_input() -> Result<()> {
    let mut rng = ChaCha8Rng::seed_from_u64(5);
    let x = randn(&mut rng, &[4, 9, 50], 0.0, 3.0)?;
    let r = randn(&mut rng, &[4, 9, 50], 0.0, 1.0)?;
    for scale in [0.125f64, -0.7] {
        let fast = |t: &[Tensor]| ops::softmax_last_dim_scaled(&t[0], scale);
        let slow = |t: &[Tensor]| candle_nn::ops::softmax(&(&t[0] * scale)?, D::Minus1);
        let (yf, gf) = grads_of(&fast, std::slice::from_ref(&x), &r)?;
        let (ys, gs) = grads_of(&slow, std::slice::from_ref(&x), &r)?;
        assert!(max_abs_diff(&yf, &ys)? < 1e-6);
        assert!(max_abs_diff(&gf[0], &gs[0])? < 1e-5);
    }
    Ok(())
}

#[test]
fn softmax_gradients_match_finite_differences() -> Result<()> {
    let mut rng = ChaCha8Rng::seed_from_u64(6);
    let x = randn(&mut rng, &[3, 7], 0.0, 1.5)?;
    let r = randn(&mut rng, &[3, 7], 0.0, 1.0)?;
    let f = |t: &[Tensor]| ops::softmax_last_dim_scaled(&t[0], 0.5);
    let (_, g) = grads_of(&f, std::slice::from_ref(&x), &r)?;
    let fd = finite_diff(&f, &[x], &r, 0, 1e-2)?;
    check_fd(&g[0], &fd, 2e-3, "softmax x")
}

fn fast_gelu(t: &[Tensor]) -> Result<Tensor> {
    ops::gelu_erf(&t[0])
}

fn slow_gelu(t: &[Tensor]) -> Result<Tensor> {
    t[0].gelu_erf()
}

#[test]
fn gelu_matches_composed_values_and_gradients() -> Result<()> {
    let mut rng = ChaCha8Rng::seed_from_u64(7);
    for shape in [[3usize, 50], [64, 768], [1, 1]] {
        let x = randn(&mut rng, &shape, 0.0, 3.0)?;
        let r = randn(&mut rng, &shape, 0.0, 1.0)?;
        let (yf, gf) = grads_of(&fast_gelu, std::slice::from_ref(&x), &r)?;
        let (ys, gs) = grads_of(&slow_gelu, &[x], &r)?;
        assert!(max_abs_diff(&yf, &ys)? < 2e-6, "{shape:?} values");
        assert!(max_abs_diff(&gf[0], &gs[0])? < 2e-5, "{shape:?} grads");
    }
    // Extreme inputs.
    let x = Tensor::new(&[-50f32, -8.0, -1e-3, 0.0, 1e-3, 8.0, 50.0], &Device::Cpu)?;
    let ours: Vec<f32> = ops::gelu_erf(&x)?.to_vec1()?;
    let reference: Vec<f32> = x.gelu_erf()?.to_vec1()?;
    for (a, b) in ours.iter().zip(&reference) {
        assert!((a - b).abs() <= 1e-6 * b.abs().max(1.0), "{a} vs {b}");
    }
    Ok(())
}

#[test]
fn gelu_gradients_match_finite_differences() -> Result<()> {
    let mut rng = ChaCha8Rng::seed_from_u64(8);
    let x = randn(&mut rng, &[4, 6], 0.0, 2.0)?;
    let r = randn(&mut rng, &[4, 6], 0.0, 1.0)?;
    let (_, g) = grads_of(&fast_gelu, std::slice::from_ref(&x), &r)?;
    let fd = finite_diff(&fast_gelu, &[x], &r, 0, 1e-2)?;
    check_fd(&g[0], &fd, 2e-3, "gelu x")
}

#[test]
fn linear_and_add_bias_match_composed_values_and_gradients() -> Result<()> {
    let mut rng = ChaCha8Rng::seed_from_u64(9);
    // Small (serial) and large (parallel column sums) cases.
    for (r, i, o) in [(5usize, 7usize, 3usize), (400, 64, 192)] {
        let x = randn(&mut rng, &[r, i], 0.0, 1.0)?;
        let w = randn(&mut rng, &[o, i], 0.0, 0.2)?;
        let b = randn(&mut rng, &[o], 0.0, 1.0)?;
        let g = randn(&mut rng, &[r, o], 0.0, 1.0)?;
        let inputs = [x, w, b];
        let fast = |t: &[Tensor]| ops::linear(&t[0], &t[1], Some(&t[2]));
        let slow = |t: &[Tensor]| t[0].matmul(&t[1].t()?)?.broadcast_add(&t[2]);
        let (yf, gf) = grads_of(&fast, &inputs, &g)?;
        let (ys, gs) = grads_of(&slow, &inputs, &g)?;
        assert!(max_abs_diff(&yf, &ys)? < 1e-5);
        for (k, (a, b)) in gf.iter().zip(&gs).enumerate() {
            let tol = 1e-5 * max_abs(b)?.max(1.0);
            assert!(max_abs_diff(a, b)? < tol, "({r},{i},{o}) grad {k}");
        }
    }
    // A non-contiguous input and a shape error.
    let y = randn(&mut rng, &[6, 4], 0.0, 1.0)?.t()?;
    let b = randn(&mut rng, &[6], 0.0, 1.0)?;
    assert!(max_abs_diff(&ops::add_bias(&y, &b)?, &y.broadcast_add(&b)?)? < 1e-6);
    let err = ops::add_bias(&y, &b.narrow(0, 0, 2)?).unwrap_err();
    assert!(err.to_string().contains("[2]"), "{err}");
    Ok(())
}

#[test]
fn add_bias_gradients_match_finite_differences() -> Result<()> {
    let mut rng = ChaCha8Rng::seed_from_u64(10);
    let y = randn(&mut rng, &[4, 5], 0.0, 1.0)?;
    let b = randn(&mut rng, &[5], 0.0, 1.0)?;
    let r = randn(&mut rng, &[4, 5], 0.0, 1.0)?;
    let f = |t: &[Tensor]| ops::add_bias(&t[0], &t[1]);
    let inputs = [y, b];
    let (_, g) = grads_of(&f, &inputs, &r)?;
    for (which, grad) in g.iter().enumerate() {
        let fd = finite_diff(&f, &inputs, &r, which, 1e-2)?;
        check_fd(grad, &fd, 2e-3, "add_bias")?;
    }
    Ok(())
}
