//! Collapse metrics: uniform and one-hot extremes, KL = loss - entropy, the values DinoLoss records.

use candle_core::{DType, Device, Tensor};
use dino_core::monitor::{kl_teacher_student, output_std, teacher_probs};
use dino_core::{CollapseMetrics, DinoLoss, DinoLossConfig};

#[test]
fn uniform_and_one_hot_extremes() {
    let dev = Device::Cpu;
    let (b, k) = (4usize, 256usize);
    let center = Tensor::zeros((1, k), DType::F32, &dev).unwrap();
    // uniform: every teacher logit equal -> entropy ln K, std 0 (all rows identical)
    let flat = Tensor::ones((2 * b, k), DType::F32, &dev).unwrap();
    let m = CollapseMetrics::from_teacher(&flat, &center, 0.04).unwrap();
    assert!((m.teacher_entropy - (k as f64).ln()).abs() < 1e-4, "{m:?}");
    assert!((m.max_entropy - (k as f64).ln()).abs() < 1e-12);
    assert!(m.teacher_std.abs() < 1e-6);
    assert!(m.loss.is_nan());
    // one-hot: one dimension far above the others in every row -> entropies 0
    let mut v = vec![0f32; 2 * b * k];
    for r in 0..2 * b {
        v[r * k + 3] = 1.0;
    }
    let hot = Tensor::from_vec(v, (2 * b, k), &dev).unwrap();
    let m = CollapseMetrics::from_teacher(&hot, &center, 0.01).unwrap();
    assert!(
        m.teacher_entropy < 1e-6 && m.teacher_mean_entropy < 1e-6,
        "{m:?}"
    );
    // healthy-looking: each row one-hot on a different dimension -> mean entropy ln(2B)
    let mut v = vec![0f32; 2 * b * k];
    for r in 0..2 * b {
        v[r * k + r] = 1.0;
    }
    let spread = Tensor::from_vec(v, (2 * b, k), &dev).unwrap();
    let m = CollapseMetrics::from_teacher(&spread, &center, 0.01).unwrap();
    assert!(m.teacher_entropy < 1e-6);
    assert!(
        (m.teacher_mean_entropy - ((2 * b) as f64).ln()).abs() < 1e-4,
        "{m:?}"
    );
    assert!(m.teacher_std > 0.0);
    let p = teacher_probs(&spread, &center, 0.01).unwrap();
    assert_eq!(p.dims(), &[2 * b, k]);
}

#[test]
fn kl_equals_loss_minus_entropy_and_loss_records_metrics() {
    let dev = Device::Cpu;
    let (n, b, k) = (4usize, 3usize, 50usize);
    let s = (Tensor::randn(0f32, 1.0, (n * b, k), &dev).unwrap() * 0.5).unwrap();
    let t = (Tensor::randn(0f32, 1.0, (2 * b, k), &dev).unwrap() * 0.5).unwrap();
    let mut loss = DinoLoss::new(DinoLossConfig::new(k, n, 0.04, 0.04, 0, 5), &dev).unwrap();
    assert!(loss.last_metrics().unwrap().is_none());
    let center0 = loss.center().clone();
    let l = loss.forward(&s, &t, 0).unwrap().to_scalar::<f32>().unwrap() as f64;
    let m = loss.last_metrics().unwrap().unwrap();
    let full = CollapseMetrics::compute(&s, &t, &center0, n, 0.1, 0.04).unwrap();
    let kl = kl_teacher_student(&s, &t, &center0, n, 0.1, 0.04).unwrap();
    assert!(kl > 0.0);
    assert!((m.loss - l).abs() < 1e-9);
    assert!(
        (m.kl_teacher_student - kl).abs() < 1e-4,
        "{} vs {kl}",
        m.kl_teacher_student
    );
    assert!((full.loss - l).abs() < 1e-4, "{} vs {l}", full.loss);
    assert!((m.teacher_entropy - full.teacher_entropy).abs() < 1e-9);
    // KL is 0 when each student crop's distribution equals its cross-view teacher's: with n = 2,
    // student crop 0 is compared with teacher crop 1 and crop 1 with crop 0.
    let (t0, t1) = (t.narrow(0, 0, b).unwrap(), t.narrow(0, b, b).unwrap());
    let swapped = (Tensor::cat(&[&t1, &t0], 0).unwrap() * (0.1 / 0.04)).unwrap();
    let zero = Tensor::zeros((1, k), DType::F32, &dev).unwrap();
    let kl_same = kl_teacher_student(&swapped, &t, &zero, 2, 0.1, 0.04).unwrap();
    assert!(kl_same.abs() < 1e-5, "{kl_same}");
    let unswapped = (Tensor::cat(&[&t0, &t1], 0).unwrap() * (0.1 / 0.04)).unwrap();
    assert!(kl_teacher_student(&unswapped, &t, &zero, 2, 0.1, 0.04).unwrap() > 1e-3);
    assert_eq!(
        output_std(&Tensor::ones((1, 4), DType::F32, &dev).unwrap()).unwrap(),
        0.0
    );
}
