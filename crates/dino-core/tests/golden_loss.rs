//! DinoLoss against the official DINOLoss goldens: loss, d loss / d student_output and centre at
//! epochs 0/10/40, the 5-call centre sequence, the out_dim 65536 case and the temperature schedule;
//! plus finite differences, the composed (candle-op) path and the error cases.

mod common;

use candle_core::{DType, Tensor, Var};
use common::{assert_close, get, golden, scalar, vec_f64};
use dino_core::loss::dino_loss_composed;
use dino_core::{DinoLoss, DinoLossConfig, Error, TeacherCentering};

fn golden_cfg() -> DinoLossConfig {
    // DINOLoss(64, ncrops 6, 0.04 -> 0.07 over 30 epochs, 100 epochs)
    DinoLossConfig::new(64, 6, 0.04, 0.07, 30, 100)
}

/// Loss and gradient through autograd (the student output is a Var).
fn loss_and_grad(
    loss: &mut DinoLoss,
    student: &Tensor,
    teacher: &Tensor,
    epoch: usize,
) -> (Tensor, Tensor) {
    let s = Var::from_tensor(student).unwrap();
    let l = loss.forward(s.as_tensor(), teacher, epoch).unwrap();
    let grads = l.backward().unwrap();
    let g = grads
        .get(s.as_tensor())
        .expect("student output got no gradient")
        .clone();
    (l, g)
}

#[test]
fn teacher_temp_schedule_is_bit_exact() {
    let g = golden("dino_loss.safetensors");
    let want = vec_f64(&get(&g, "teacher_temp_schedule"));
    let loss = DinoLoss::new(golden_cfg(), &common::tdev()).unwrap();
    assert_eq!(loss.teacher_temp_schedule(), want.as_slice());
    assert_eq!(loss.teacher_temp(10).unwrap(), 0.0503448275862069);
    assert!(matches!(
        loss.teacher_temp(100),
        Err(Error::PastSchedule {
            index: 100,
            len: 100,
            ..
        })
    ));
}

#[test]
fn single_calls_match_official_loss_grad_and_center() {
    let g = golden("dino_loss.safetensors");
    for (epoch, want_loss) in [
        (0usize, 12.238492965698242f64),
        (10, 11.80971622467041),
        (40, 12.886090278625488),
    ] {
        let p = format!("single_e{epoch}_");
        let student = get(&g, &format!("{p}student_output"));
        let teacher = get(&g, &format!("{p}teacher_output"));
        let mut loss = DinoLoss::new(golden_cfg(), &common::tdev()).unwrap();
        let (l, grad) = loss_and_grad(&mut loss, &student, &teacher, epoch);
        assert_eq!(l.dims(), &[] as &[usize]);
        let lv = scalar(&l);
        assert!(
            (lv - scalar(&get(&g, &format!("{p}loss")))).abs() < 2e-5 * want_loss,
            "epoch {epoch}: loss {lv}"
        );
        // the f64 reference: our fp32 result is within fp32 accuracy of the exact value
        assert_close(
            &format!("{p}grad_student"),
            &grad,
            &get(&g, &format!("{p}grad_student")),
            1e-7,
            1e-4,
        );
        assert_close(
            &format!("{p}grad_student_f64"),
            &grad,
            &get(&g, &format!("{p}grad_student_f64")),
            1e-7,
            1e-4,
        );
        assert_close(
            &format!("{p}center_after"),
            loss.center(),
            &get(&g, &format!("{p}center_after")),
            1e-7,
            1e-6,
        );
    }
}

#[test]
fn five_call_sequence_matches_center_ema() {
    let g = golden("dino_loss.safetensors");
    let students = get(&g, "seq_student_output");
    let teachers = get(&g, "seq_teacher_output");
    let losses = vec_f64(&get(&g, "seq_loss"));
    let centers = get(&g, "seq_center_after");
    let grads = get(&g, "seq_grad_student");
    let mut loss = DinoLoss::new(golden_cfg(), &common::tdev()).unwrap();
    for (i, epoch) in [0usize, 0, 10, 40, 40].into_iter().enumerate() {
        let (l, grad) = loss_and_grad(
            &mut loss,
            &students.get(i).unwrap(),
            &teachers.get(i).unwrap(),
            epoch,
        );
        assert!(
            (scalar(&l) - losses[i]).abs() < 2e-5 * losses[i],
            "call {i}: {} vs {}",
            scalar(&l),
            losses[i]
        );
        assert_close(
            &format!("seq grad {i}"),
            &grad,
            &grads.get(i).unwrap(),
            1e-7,
            1e-4,
        );
        assert_close(
            &format!("seq center {i}"),
            loss.center(),
            &centers.get(i).unwrap(),
            1e-7,
            1e-6,
        );
    }
}

#[test]
fn out_dim_65536_matches_official() {
    let g = golden("dino_loss_65536.safetensors");
    let mut loss = DinoLoss::new(
        DinoLossConfig::new(65536, 6, 0.04, 0.07, 30, 100),
        &common::tdev(),
    )
    .unwrap();
    // call 0 only sets the centre; its student output was not stored, any valid one gives the same centre
    let t0 = get(&g, "call0_teacher_output");
    let s0 = Tensor::zeros((6, 65536), DType::F32, &common::tdev()).unwrap();
    loss.forward(&s0, &t0, 0).unwrap();
    assert_close(
        "center_after_call0",
        loss.center(),
        &get(&g, "center_after_call0"),
        1e-8,
        1e-6,
    );
    let (l, grad) = loss_and_grad(
        &mut loss,
        &get(&g, "call1_student_output"),
        &get(&g, "call1_teacher_output"),
        40,
    );
    let want = scalar(&get(&g, "call1_loss"));
    assert!(
        (scalar(&l) - want).abs() < 1e-5 * want,
        "loss {} vs {want}",
        scalar(&l)
    );
    assert_close(
        "call1_grad_student",
        &grad,
        &get(&g, "call1_grad_student"),
        1e-9,
        1e-3,
    );
    assert_close(
        "center_after_call1",
        loss.center(),
        &get(&g, "center_after_call1"),
        1e-8,
        1e-6,
    );
}

#[test]
fn fused_op_matches_composed_candle_ops_and_finite_differences() {
    let dev = common::tdev();
    let (n, b, k) = (4usize, 3usize, 37usize);
    let student = (Tensor::randn(0f32, 1.0, (n * b, k), &dev).unwrap() * 0.3).unwrap();
    let teacher = (Tensor::randn(0f32, 1.0, (2 * b, k), &dev).unwrap() * 0.3).unwrap();
    let center = (Tensor::randn(0f32, 1.0, (1, k), &dev).unwrap() * 0.1).unwrap();
    let cfg = DinoLossConfig::new(k, n, 0.04, 0.07, 10, 20);
    let mut loss = DinoLoss::new(cfg, &dev).unwrap();
    loss.set_center(&center).unwrap();
    let (l, grad) = loss_and_grad(&mut loss, &student, &teacher, 5);
    let temp = 0.04 + 5.0 * (0.03 / 9.0);

    // composed path with autograd through candle's log_softmax
    let sv = Var::from_tensor(&student).unwrap();
    let lc = dino_loss_composed(sv.as_tensor(), &teacher, &center, n, 0.1, temp).unwrap();
    let gc = lc.backward().unwrap().get(sv.as_tensor()).unwrap().clone();
    assert!((scalar(&l) - scalar(&lc)).abs() < 1e-5);
    assert_close("fused vs composed grad", &grad, &gc, 1e-7, 1e-4);

    // central finite differences in f64 on the composed formula
    let s64 = student.to_dtype(DType::F64).unwrap();
    let (t64, c64) = (
        teacher.to_dtype(DType::F64).unwrap(),
        center.to_dtype(DType::F64).unwrap(),
    );
    let f = |s: &Tensor| scalar(&dino_loss_composed(s, &t64, &c64, n, 0.1, temp).unwrap());
    let gv = vec_f64(&grad);
    let base = vec_f64(&s64);
    for idx in [0usize, 5, k + 3, 2 * k * b - 1, n * b * k - 1, 7 * k + 20] {
        let h = 1e-5;
        let mut plus = base.clone();
        plus[idx] += h;
        let mut minus = base.clone();
        minus[idx] -= h;
        let mk = |v: Vec<f64>| Tensor::from_vec(v, (n * b, k), &dev).unwrap();
        let fd = (f(&mk(plus)) - f(&mk(minus))) / (2.0 * h);
        assert!(
            (fd - gv[idx]).abs() < 1e-5 + 1e-3 * fd.abs(),
            "index {idx}: fd {fd} vs analytic {}",
            gv[idx]
        );
    }
}

/// The loss split into passes over the student's crops (`teacher_targets`, `student_loss` per range of
/// crops, `finish`) adds up to one `forward`: the values sum to its loss, the gradient rows are its rows,
/// the centre and the collapse monitors end the same; in both teacher modes, with splits that keep the
/// global crops together, split them, and mix a global crop with local ones.
#[test]
fn loss_split_into_crop_passes_adds_up_to_the_whole() {
    let dev = common::tdev();
    let (n, b, k) = (6usize, 3usize, 37usize);
    let student = (Tensor::randn(0f32, 1.0, (n * b, k), &dev).unwrap() * 0.3).unwrap();
    let teacher = (Tensor::randn(0f32, 1.0, (2 * b, k), &dev).unwrap() * 0.3).unwrap();
    let center = (Tensor::randn(0f32, 1.0, (1, k), &dev).unwrap() * 0.1).unwrap();
    for centering in [
        TeacherCentering::Centering,
        TeacherCentering::SinkhornKnopp { n_iterations: 3 },
    ] {
        let cfg = DinoLossConfig {
            centering,
            ..DinoLossConfig::new(k, n, 0.04, 0.07, 10, 20)
        };
        let fresh = || {
            let mut l = DinoLoss::new(cfg.clone(), &dev).unwrap();
            l.set_center(&center).unwrap();
            l
        };
        let mut whole = fresh();
        let (l, grad) = loss_and_grad(&mut whole, &student, &teacher, 5);
        #[allow(clippy::single_range_in_vec_init)] // one pass over every crop is a split too
        let splits: [&[std::ops::Range<usize>]; 4] = [
            &[0..6],
            &[0..2, 2..6],
            &[0..1, 1..2, 2..3, 3..4, 4..5, 5..6],
            &[0..3, 3..6],
        ];
        for split in splits {
            let what = format!("{centering:?}, passes {split:?}");
            let mut parts = fresh();
            let targets = parts.teacher_targets(&teacher, 5).unwrap();
            let mut total = 0f64;
            let mut rows = Vec::new();
            for v in split {
                let s = Var::from_tensor(&student.narrow(0, v.start * b, v.len() * b).unwrap())
                    .unwrap();
                let lv = parts
                    .student_loss(&targets, s.as_tensor(), v.clone())
                    .unwrap();
                total += scalar(&lv);
                rows.push(lv.backward().unwrap().get(s.as_tensor()).unwrap().clone());
            }
            parts.finish(targets, total).unwrap();
            assert!(
                (total - scalar(&l)).abs() < 1e-6 * scalar(&l).abs(),
                "{what}: passes sum to {total}, forward gives {}",
                scalar(&l)
            );
            let g = Tensor::cat(&rows, 0).unwrap();
            assert_close(&format!("{what}: gradient"), &g, &grad, 1e-9, 1e-6);
            assert_close(
                &format!("{what}: centre"),
                parts.center(),
                whole.center(),
                0.0,
                0.0,
            );
            let (mw, mp) = (
                whole.last_metrics().unwrap().unwrap(),
                parts.last_metrics().unwrap().unwrap(),
            );
            assert!(
                (mw.teacher_entropy - mp.teacher_entropy).abs() < 1e-9,
                "{what}"
            );
            assert!(
                (mw.kl_teacher_student - mp.kl_teacher_student).abs() < 1e-5,
                "{what}"
            );
        }
        // a range outside the crops, an empty one, rows that do not match the range
        let parts = fresh();
        let targets = parts.teacher_targets(&teacher, 5).unwrap();
        let rows = |c: usize| student.narrow(0, 0, c * b).unwrap();
        for (v, s, needle) in [
            (5..7, rows(2), "5..7"),
            (2..2, rows(1), "2..2"),
            (2..4, rows(3), "student_output"),
        ] {
            let e = parts.student_loss(&targets, &s, v).unwrap_err().to_string();
            assert!(e.contains(needle), "{e}");
        }
    }
}

#[test]
fn gradient_reaches_the_student_only() {
    let dev = common::tdev();
    let (n, b, k) = (3usize, 2usize, 16usize);
    let s = Var::from_tensor(&Tensor::randn(0f32, 1.0, (n * b, k), &dev).unwrap()).unwrap();
    let t = Var::from_tensor(&Tensor::randn(0f32, 1.0, (2 * b, k), &dev).unwrap()).unwrap();
    // teacher logits computed from a Var (as if the teacher forward recorded a graph)
    let t_out = (t.as_tensor() * 2.0).unwrap();
    let mut loss = DinoLoss::new(DinoLossConfig::new(k, n, 0.04, 0.04, 0, 10), &dev).unwrap();
    let l = loss.forward(s.as_tensor(), &t_out, 0).unwrap();
    let grads = l.backward().unwrap();
    let gs = grads.get(s.as_tensor()).expect("student gets a gradient");
    assert!(vec_f64(gs).iter().any(|v| v.abs() > 1e-6));
    assert!(
        grads.get(t.as_tensor()).is_none(),
        "teacher must get no gradient"
    );
    assert!(
        grads.get(&t_out).is_none(),
        "teacher output must get no gradient"
    );
    // the same through forward_crops with per-crop lists
    let crops: Vec<Tensor> = (0..n)
        .map(|c| s.as_tensor().narrow(0, c * b, b).unwrap())
        .collect();
    let tcrops: Vec<Tensor> = (0..2).map(|c| t_out.narrow(0, c * b, b).unwrap()).collect();
    let mut loss2 = DinoLoss::new(DinoLossConfig::new(k, n, 0.04, 0.04, 0, 10), &dev).unwrap();
    let l2 = loss2.forward_crops(&crops, &tcrops, 0).unwrap();
    assert!((scalar(&l2) - scalar(&l)).abs() < 1e-6);
    let grads2 = l2.backward().unwrap();
    assert_close(
        "forward_crops grad",
        grads2.get(s.as_tensor()).unwrap(),
        gs,
        1e-7,
        1e-6,
    );
    assert!(grads2.get(t.as_tensor()).is_none());
}

#[test]
fn bad_inputs_give_clear_errors() {
    let dev = common::tdev();
    let z = |r: usize, c: usize| Tensor::zeros((r, c), DType::F32, &dev).unwrap();
    let mut loss = DinoLoss::new(DinoLossConfig::new(8, 4, 0.04, 0.07, 3, 5), &dev).unwrap();
    let msg = |e: Error| e.to_string();
    // rows not a multiple of ncrops
    let e = msg(loss.forward(&z(10, 8), &z(4, 8), 0).unwrap_err());
    assert!(
        e.contains("student_output") && e.contains("ncrops = 4"),
        "{e}"
    );
    // teacher not 2B rows
    let e = msg(loss.forward(&z(8, 8), &z(3, 8), 0).unwrap_err());
    assert!(
        e.contains("teacher_output") && e.contains("2 * B = 4"),
        "{e}"
    );
    // K mismatch
    let e = msg(loss.forward(&z(8, 9), &z(4, 9), 0).unwrap_err());
    assert!(e.contains("K = 8"), "{e}");
    let e = msg(loss.forward(&z(8, 8), &z(4, 7), 0).unwrap_err());
    assert!(e.contains("teacher_output"), "{e}");
    // epoch past the schedule
    let e = msg(loss.forward(&z(8, 8), &z(4, 8), 5).unwrap_err());
    assert!(e.contains("past the end") && e.contains("length 5"), "{e}");
    // zero crops / empty input
    assert!(loss.forward(&z(0, 8), &z(0, 8), 0).is_err());
    let e = msg(loss.forward_crops(&[], &[z(2, 8), z(2, 8)], 0).unwrap_err());
    assert!(e.contains("zero crops"), "{e}");
    assert!(DinoLoss::new(DinoLossConfig::new(8, 0, 0.04, 0.07, 3, 5), &dev).is_err());
    assert!(DinoLoss::new(DinoLossConfig::new(8, 1, 0.04, 0.07, 3, 5), &dev).is_err());
    assert!(DinoLoss::new(DinoLossConfig::new(8, 4, 0.04, 0.07, 6, 5), &dev).is_err());
    // wrong crop lists
    assert!(loss
        .forward_crops(&[z(2, 8), z(2, 8), z(2, 8)], &[z(2, 8), z(2, 8)], 0)
        .is_err());
    assert!(loss
        .forward_crops(
            &[z(2, 8), z(2, 8), z(2, 8), z(3, 8)],
            &[z(2, 8), z(2, 8)],
            0
        )
        .is_err());
    assert!(loss
        .forward_crops(&[z(2, 8), z(2, 8), z(2, 8), z(2, 8)], &[z(2, 8)], 0)
        .is_err());
    // centre restore is shape-checked
    let e = msg(loss.set_center(&z(1, 9)).unwrap_err());
    assert!(e.contains("center") && e.contains("(1, 8)"), "{e}");
    loss.set_center(&Tensor::ones(8, DType::F32, &dev).unwrap())
        .unwrap();
    assert_eq!(loss.center().dims(), &[1, 8]);
    // the centre did not move on any failed call
    assert_eq!(vec_f64(loss.center()), vec![1.0; 8]);
}

dino_kernels::portable_path_tests!(
    single_calls_match_official_loss_grad_and_center,
    five_call_sequence_matches_center_ema,
    out_dim_65536_matches_official,
    gradient_reaches_the_student_only,
    loss_split_into_crop_passes_adds_up_to_the_whole,
);
