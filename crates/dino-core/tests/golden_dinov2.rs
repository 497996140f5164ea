//! The DINOv2 options against `../shared/golden-dinov2` (values from the official dinov2 code): KoLeo (value,
//! gradient, nearest-neighbour index, the training-loop form, duplicate rows), Sinkhorn-Knopp teacher
//! targets (3 and 1 iterations, T 0.07 / 0.04) and the DINO loss composed as dinov2's training loop does in
//! both centering modes (value and gradients, fused CPU op and composed candle-op path); plus the degenerate
//! inputs of both.

mod common;

use candle_core::{DType, Tensor, Var};
use common::{assert_close, get, golden_v2, scalar, vec_f64};
use dino_core::koleo::nearest_neighbours;
use dino_core::loss::dino_loss_composed_probs;
use dino_core::{
    ibot_loss_dense, koleo_loss, koleo_per_crop, sinkhorn_knopp_teacher, DinoLoss, DinoLossConfig,
    IbotPatchLoss, IbotPatchLossConfig, TeacherCentering,
};

/// The loss and its gradient w.r.t. `x` through autograd.
fn value_and_grad(x: &Tensor, mut f: impl FnMut(&Tensor) -> Tensor) -> (f64, Tensor) {
    let v = Var::from_tensor(x).unwrap();
    let l = f(v.as_tensor());
    let g = l.backward().unwrap().get(v.as_tensor()).unwrap().clone();
    (scalar(&l), g)
}

fn max_abs(t: &Tensor) -> f64 {
    vec_f64(t).iter().fold(0.0, |m, v| m.max(v.abs()))
}

#[test]
fn koleo_matches_the_official_code() {
    let g = golden_v2("koleo.safetensors");
    for p in ["b8_", "b16_", "b64_", "dup8_"] {
        let x = get(&g, &format!("{p}x"));
        let idx: Vec<i64> = get(&g, &format!("{p}nn_index")).to_vec1().unwrap();
        let ours: Vec<u32> = nearest_neighbours(&x).unwrap().to_vec1().unwrap();
        assert_eq!(
            ours.iter().map(|&i| i as i64).collect::<Vec<_>>(),
            idx,
            "{p}nn_index"
        );
        // f32 against the official f32 (loss rtol 1e-5, grad atol 1e-5 max|grad|).
        let (l, grad) = value_and_grad(&x, |x| koleo_loss(x).unwrap());
        let want = scalar(&get(&g, &format!("{p}loss")));
        assert!(
            (l - want).abs() <= 1e-5 * want.abs(),
            "{p}loss {l} vs {want}"
        );
        let gw = get(&g, &format!("{p}grad_x"));
        assert_close(&format!("{p}grad_x"), &grad, &gw, 1e-5 * max_abs(&gw), 0.0);
        // f64 against the official f64 (rtol 1e-10).
        let x64 = x.to_dtype(DType::F64).unwrap();
        let (l64, g64) = value_and_grad(&x64, |x| koleo_loss(x).unwrap());
        let want64 = scalar(&get(&g, &format!("{p}loss_f64")));
        assert!(
            (l64 - want64).abs() <= 1e-10 * want64.abs(),
            "{p}loss_f64 {l64} vs {want64}"
        );
        let gw64 = get(&g, &format!("{p}grad_x_f64"));
        assert_close(
            &format!("{p}grad_x_f64"),
            &g64,
            &gw64,
            1e-10 * max_abs(&gw64),
            1e-8,
        );
    }
    // Duplicate rows 2 and 5: a large finite loss and their gradient exactly 0.
    let (_, grad) = value_and_grad(&get(&g, "dup8_x"), |x| koleo_loss(x).unwrap());
    let rows = grad.to_vec2::<f32>().unwrap();
    assert!(rows[2].iter().chain(&rows[5]).all(|&v| v.abs() < 1e-6));
}

#[test]
fn koleo_training_loop_form_matches() {
    let g = golden_v2("koleo.safetensors");
    let x = get(&g, "meta_x");
    let (l, grad) = value_and_grad(&x, |x| koleo_per_crop(x, 2, 0.1).unwrap());
    let want = scalar(&get(&g, "meta_loss"));
    assert!((l - want).abs() <= 1e-5 * want.abs(), "{l} vs {want}");
    let gw = get(&g, "meta_grad_x");
    assert_close("meta_grad_x", &grad, &gw, 1e-5 * max_abs(&gw), 0.0);
    assert!(koleo_per_crop(&x, 3, 0.1).is_err(), "32 rows in 3 crops");
}

#[test]
fn sinkhorn_knopp_matches_the_official_code() {
    let g = golden_v2("dino_loss.safetensors");
    for (p, temp, iters) in [("sk0_", 0.07, 3), ("sk1_", 0.04, 3), ("sk2_", 0.07, 1)] {
        let t = get(&g, &format!("{p}teacher_logits"));
        let q = sinkhorn_knopp_teacher(&t, temp, iters).unwrap();
        assert_close(p, &q, &get(&g, &format!("{p}Q")), 1e-6, 1e-4);
        // We compute in f64: also within f32 rounding of the float64 reference.
        assert_close(
            &format!("{p}f64"),
            &q,
            &get(&g, &format!("{p}Q_f64")),
            1e-7,
            1e-6,
        );
        for row in q.to_vec2::<f32>().unwrap() {
            let s: f64 = row.iter().map(|&v| v as f64).sum();
            assert!((s - 1.0).abs() < 1e-5, "{p}: a row sums to {s}");
        }
    }
}

#[test]
fn sinkhorn_knopp_degenerate_inputs_stay_finite() {
    let dev = common::tdev();
    // One sample; duplicate rows; a column of zeros; logits far apart (exp would overflow f32 unshifted).
    let one = Tensor::new(&[[0.3f32, -0.2, 0.9, 0.0]], &dev).unwrap();
    let dup = Tensor::new(
        &[[0.5f32, 0.1, -0.4], [0.5, 0.1, -0.4], [0.5, 0.1, -0.4]],
        &dev,
    )
    .unwrap();
    let zcol = Tensor::new(&[[0.0f32, 0.7, -0.1], [0.0, -0.3, 0.2]], &dev).unwrap();
    let far = Tensor::new(&[[30.0f32, -30.0, 0.0], [0.0, 29.0, -29.0]], &dev).unwrap();
    for (name, t) in [("one", one), ("dup", dup), ("zcol", zcol), ("far", far)] {
        let q = sinkhorn_knopp_teacher(&t, 0.04, 3).unwrap();
        for row in q.to_vec2::<f32>().unwrap() {
            assert!(
                row.iter().all(|v| v.is_finite() && *v >= 0.0),
                "{name}: {row:?}"
            );
            let s: f32 = row.iter().sum();
            assert!((s - 1.0).abs() < 1e-5, "{name}: row sum {s}");
        }
    }
    // Identical rows give identical, uniform-over-prototypes targets (every prototype gets B/K mass).
    let dup = Tensor::new(&[[0.5f32, 0.1, -0.4], [0.5, 0.1, -0.4]], &dev).unwrap();
    let q = sinkhorn_knopp_teacher(&dup, 0.04, 3)
        .unwrap()
        .to_vec2::<f32>()
        .unwrap();
    for v in q.iter().flatten() {
        assert!((v - 1.0 / 3.0).abs() < 1e-5, "{q:?}");
    }
    // A non-finite logit (a diverged teacher) gives NaN targets, so the loss is NaN and the training loop
    // stops naming the step.
    let nan = Tensor::new(&[[f32::NAN, 0.0], [0.1, 0.2]], &dev).unwrap();
    let q = sinkhorn_knopp_teacher(&nan, 0.04, 3)
        .unwrap()
        .to_vec2::<f32>()
        .unwrap();
    assert!(q.iter().flatten().all(|v| v.is_nan()), "{q:?}");
    let e = DinoLoss::new(
        DinoLossConfig {
            centering: TeacherCentering::SinkhornKnopp { n_iterations: 0 },
            ..DinoLossConfig::default()
        },
        &dev,
    )
    .unwrap_err()
    .to_string();
    assert!(e.contains("at least 1"), "{e}");
}

/// The dinov2 composition of the DINO loss (2 global + 4 local crops, B = 4, K = 256, T = 0.07) in both
/// modes, through our DinoLoss (teacher rows back in crop order), on the fused CPU op and the composed path.
#[test]
fn dino_loss_in_both_centering_modes_matches_dinov2() {
    let g = golden_v2("dino_loss.safetensors");
    let b = 4;
    for (mode, centering) in [
        ("centering", TeacherCentering::Centering),
        (
            "sinkhorn_knopp",
            TeacherCentering::SinkhornKnopp { n_iterations: 3 },
        ),
    ] {
        let p = format!("fwd_{mode}_");
        let at = |k: &str| get(&g, &format!("{p}{k}"));
        // Golden teacher rows are [crop1; crop0]; DinoLoss takes [crop0; crop1].
        let tl = at("teacher_logits");
        let teacher = Tensor::cat(
            &[tl.narrow(0, b, b).unwrap(), tl.narrow(0, 0, b).unwrap()],
            0,
        )
        .unwrap();
        let sg = at("student_global");
        let student = Tensor::cat(&[sg.clone(), at("student_local")], 0).unwrap();
        let want = scalar(&at("loss"));
        let want_gg = at("grad_student_global");
        let want_gl = at("grad_student_local");
        let mut loss = DinoLoss::new(
            DinoLossConfig {
                out_dim: 256,
                ncrops: 6,
                warmup_teacher_temp: 0.07,
                teacher_temp: 0.07,
                nepochs: 1,
                centering,
                ..DinoLossConfig::default()
            },
            &common::tdev(),
        )
        .unwrap();
        loss.set_center(&at("center")).unwrap();
        let (l, grad) = value_and_grad(&student, |s| loss.forward(s, &teacher, 0).unwrap());
        assert!(
            (l - want).abs() <= 1e-5 * want,
            "{mode}: loss {l} vs {want}"
        );
        assert_close(
            &format!("{mode} global grad"),
            &grad.narrow(0, 0, 2 * b).unwrap(),
            &want_gg,
            1e-6,
            0.0,
        );
        assert_close(
            &format!("{mode} local grad"),
            &grad.narrow(0, 2 * b, 4 * b).unwrap(),
            &want_gl,
            1e-6,
            0.0,
        );
        let center_after = loss.center().clone();
        match centering {
            // Sinkhorn-Knopp never touches the centre (zeros in the golden).
            TeacherCentering::SinkhornKnopp { .. } => {
                assert_eq!(vec_f64(&center_after), vec_f64(&at("center")));
                // The composed path with the same targets.
                let q = sinkhorn_knopp_teacher(&teacher, 0.07, 3).unwrap();
                let swapped =
                    Tensor::cat(&[q.narrow(0, b, b).unwrap(), q.narrow(0, 0, b).unwrap()], 0)
                        .unwrap();
                assert_close("teacher probs", &swapped, &at("teacher_probs"), 1e-6, 1e-4);
                let (lc, gc) = value_and_grad(&student, |s| {
                    dino_loss_composed_probs(s, &q, 6, 0.1).unwrap()
                });
                assert!((lc - want).abs() <= 1e-5 * want, "composed {lc} vs {want}");
                assert_close(
                    "composed global grad",
                    &gc.narrow(0, 0, 2 * b).unwrap(),
                    &want_gg,
                    1e-6,
                    0.0,
                );
                let m = loss.last_metrics().unwrap().unwrap();
                assert!(m.teacher_entropy.is_finite() && m.teacher_entropy > 0.0);
            }
            TeacherCentering::Centering => {
                assert_ne!(
                    vec_f64(&center_after),
                    vec_f64(&at("center")),
                    "the EMA centre moves"
                );
            }
        }
        // The f64 composition of the official code agrees with its f32 one: our f32 is within both.
        let want64 = scalar(&at("loss_f64"));
        assert!(
            (l - want64).abs() <= 1e-5 * want64,
            "{mode}: loss {l} vs f64 {want64}"
        );
    }
}

dino_kernels::portable_path_tests!(
    koleo_matches_the_official_code,
    dino_loss_in_both_centering_modes_matches_dinov2,
);

/// iBOTPatchLoss(128) on 74 masked patches of 8 crops: teacher targets by centering (with the centre after
/// the update) and by Sinkhorn-Knopp (B = the masked patch count), forward_masked's value and gradient in
/// both modes against the official f32 and float64 values, and the dense forward.
#[test]
fn ibot_patch_loss_matches_dinov2() {
    let g = golden_v2("ibot_loss.safetensors");
    let dev = common::tdev();
    let teacher = get(&g, "teacher_logits_masked");
    let student = get(&g, "student_logits_masked");
    let weights = get(&g, "masks_weight");
    let n_crops = get(&g, "masks_u8").dim(0).unwrap();
    for (mode, centering) in [
        ("centering", TeacherCentering::Centering),
        (
            "sinkhorn_knopp",
            TeacherCentering::SinkhornKnopp { n_iterations: 3 },
        ),
    ] {
        let mut loss = IbotPatchLoss::new(
            IbotPatchLossConfig {
                centering,
                ..IbotPatchLossConfig::new(128)
            },
            &dev,
        )
        .unwrap();
        loss.set_center(&get(&g, "center_used")).unwrap();
        let probs = loss.teacher_targets(&teacher, 0.07).unwrap();
        if mode == "centering" {
            assert_close(
                "probs_centering",
                &probs,
                &get(&g, "probs_centering"),
                1e-6,
                1e-5,
            );
            assert_close(
                "center_after_update",
                loss.center(),
                &get(&g, "center_after_update"),
                1e-7,
                1e-5,
            );
        } else {
            assert_close(
                "probs_sinkhorn",
                &probs,
                &get(&g, "probs_sinkhorn"),
                1e-6,
                1e-4,
            );
            assert_close(
                "probs_sinkhorn_f64",
                &probs,
                &get(&g, "probs_sinkhorn_f64"),
                1e-7,
                1e-6,
            );
            // Sinkhorn-Knopp leaves the centre alone.
            assert_close("center", loss.center(), &get(&g, "center_used"), 0.0, 0.0);
        }
        let p = format!("fwd_{mode}_");
        let (l, grad) = value_and_grad(&student, |s| {
            loss.forward_masked(s, &probs, &weights, n_crops).unwrap()
        });
        let want = scalar(&get(&g, &format!("{p}loss")));
        assert!(
            (l - want).abs() <= 1e-5 * want.abs(),
            "{mode}: {l} vs {want}"
        );
        assert_close(
            &format!("{p}grad"),
            &grad,
            &get(&g, &format!("{p}grad_student")),
            1e-6,
            0.0,
        );
        // float64 through the same code on the same inputs (the official float64 forward took the f32
        // targets of both modes): rtol 1e-10.
        let s64 = student.to_dtype(DType::F64).unwrap();
        let q64 = get(
            &g,
            if mode == "centering" {
                "probs_centering"
            } else {
                "probs_sinkhorn"
            },
        )
        .to_dtype(DType::F64)
        .unwrap();
        let w64 = weights.to_dtype(DType::F64).unwrap();
        let (l64, g64) = value_and_grad(&s64, |s| {
            loss.forward_masked(s, &q64, &w64, n_crops).unwrap()
        });
        let want64 = scalar(&get(&g, &format!("{p}loss_f64")));
        assert!(
            (l64 - want64).abs() <= 1e-10 * want64.abs(),
            "{mode} f64: {l64} vs {want64}"
        );
        let gw = get(&g, &format!("{p}grad_student_f64"));
        assert_close(
            &format!("{p}grad_f64"),
            &g64,
            &gw,
            1e-10 * max_abs(&gw),
            1e-8,
        );
    }
    // The dense forward (masks as a (C, N) tensor).
    let (l, grad) = value_and_grad(&get(&g, "dense_student"), |s| {
        ibot_loss_dense(
            s,
            &get(&g, "dense_teacher_probs"),
            &get(&g, "dense_masks_u8"),
            0.1,
        )
        .unwrap()
    });
    let want = scalar(&get(&g, "dense_loss"));
    assert!(
        (l - want).abs() <= 1e-5 * want.abs(),
        "dense: {l} vs {want}"
    );
    assert_close(
        "dense_grad",
        &grad,
        &get(&g, "dense_grad_student"),
        1e-6,
        0.0,
    );
}

/// No masked patch anywhere: zero loss, targets of shape (0, K), the centre unchanged; a batch of one
/// masked patch and duplicate rows stay finite in both modes.
#[test]
fn ibot_patch_loss_degenerate_inputs() {
    let dev = common::tdev();
    for centering in [
        TeacherCentering::Centering,
        TeacherCentering::SinkhornKnopp { n_iterations: 3 },
    ] {
        let mut loss = IbotPatchLoss::new(
            IbotPatchLossConfig {
                centering,
                ..IbotPatchLossConfig::new(3)
            },
            &dev,
        )
        .unwrap();
        let empty = Tensor::zeros((0, 3), DType::F32, &dev).unwrap();
        let q = loss.teacher_targets(&empty, 0.04).unwrap();
        assert_eq!(q.dims(), [0, 3]);
        let w = Tensor::zeros(0, DType::F32, &dev).unwrap();
        let l = loss.forward_masked(&empty, &q, &w, 4).unwrap();
        assert_eq!(scalar(&l), 0.0);
        assert_eq!(vec_f64(loss.center()), vec![0.0; 3]);
        for t in [
            Tensor::new(&[[0.3f32, -0.2, 0.9]], &dev).unwrap(),
            Tensor::new(&[[0.5f32, 0.1, -0.4], [0.5, 0.1, -0.4]], &dev).unwrap(),
            Tensor::new(&[[0.0f32, 0.7, -0.1], [0.0, -0.3, 0.2]], &dev).unwrap(),
        ] {
            let q = loss.teacher_targets(&t, 0.04).unwrap();
            let n = t.dim(0).unwrap();
            let w = Tensor::ones(n, DType::F32, &dev).unwrap();
            let l = scalar(&loss.forward_masked(&t, &q, &w, 2).unwrap());
            assert!(l.is_finite(), "{centering:?}: {l}");
            assert!(vec_f64(&q).iter().all(|v| v.is_finite()), "{centering:?}");
        }
    }
    let e = IbotPatchLoss::new(IbotPatchLossConfig::new(3), &dev)
        .unwrap()
        .forward_masked(
            &Tensor::zeros((2, 3), DType::F32, &dev).unwrap(),
            &Tensor::zeros((2, 3), DType::F32, &dev).unwrap(),
            &Tensor::zeros(3, DType::F32, &dev).unwrap(),
            1,
        )
        .unwrap_err()
        .to_string();
    assert!(e.contains("weights"), "{e}");
}
