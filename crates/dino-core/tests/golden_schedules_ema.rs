//! Schedules and the EMA teacher against the official goldens (utils.cosine_scheduler arrays and a
//! 70-step EMA trace), plus EMA pairing errors.

mod common;

use candle_core::{DType, Tensor, Var};
use common::{assert_close, get, golden, vec_f64};
use dino_core::{cosine_scheduler, EmaTeacher, Error, NamedVar};

#[test]
fn cosine_schedules_match_numpy() {
    let g = golden("schedules_ema.safetensors");
    // lr: 0.0005 * 64 / 256 = 1.25e-4 -> 1e-6, 10 epochs x 7 it, 2 warm-up epochs from 0
    let lr = cosine_scheduler(0.0005 * 64.0 / 256.0, 1e-6, 10, 7, 2, 0.0);
    let wd = cosine_scheduler(0.04, 0.4, 10, 7, 0, 0.0);
    let mom = cosine_scheduler(0.996, 1.0, 10, 7, 0, 0.0);
    for (name, got) in [
        ("lr_schedule", lr),
        ("wd_schedule", wd),
        ("momentum_schedule", mom),
    ] {
        let want = vec_f64(&get(&g, name));
        assert_eq!(got.len(), want.len(), "{name} length");
        for (i, (a, b)) in got.iter().zip(&want).enumerate() {
            // bit-compatible with numpy (float64)
            assert_eq!(
                a.to_bits(),
                b.to_bits(),
                "{name}[{i}]: {a:e} vs numpy {b:e}"
            );
        }
    }
}

fn var(t: &Tensor) -> Var {
    Var::from_tensor(&t.copy().unwrap()).unwrap()
}

#[test]
fn ema_trace_matches_official_70_steps() {
    let g = golden("schedules_ema.safetensors");
    let mom = vec_f64(&get(&g, "momentum_schedule"));
    let (sw, sb, sg) = (
        get(&g, "ema_student_w"),
        get(&g, "ema_student_b"),
        get(&g, "ema_student_g"),
    );
    let (tw, tb, tg) = (
        get(&g, "ema_teacher_w"),
        get(&g, "ema_teacher_b"),
        get(&g, "ema_teacher_g"),
    );
    let student: Vec<NamedVar> = vec![
        ("b".into(), var(&sb.get(0).unwrap())),
        ("g".into(), var(&sg.get(0).unwrap())),
        ("w".into(), var(&sw.get(0).unwrap())),
    ];
    // teacher listed in another order: pairing is by name
    let teacher: Vec<NamedVar> = vec![
        ("w".into(), var(&tw.get(0).unwrap())),
        ("g".into(), var(&tg.get(0).unwrap())),
        ("b".into(), var(&tb.get(0).unwrap())),
    ];
    let ema = EmaTeacher::new(&student, &teacher).unwrap();
    assert_eq!(ema.names().collect::<Vec<_>>(), vec!["b", "g", "w"]);
    for (it, &m) in mom.iter().enumerate() {
        student[0].1.set(&sb.get(it).unwrap()).unwrap();
        student[1].1.set(&sg.get(it).unwrap()).unwrap();
        student[2].1.set(&sw.get(it).unwrap()).unwrap();
        ema.update(m).unwrap();
        assert_close(
            &format!("w after it {it}"),
            teacher[0].1.as_tensor(),
            &tw.get(it + 1).unwrap(),
            0.0,
            2e-7,
        );
        assert_close(
            &format!("g after it {it}"),
            teacher[1].1.as_tensor(),
            &tg.get(it + 1).unwrap(),
            0.0,
            2e-7,
        );
        assert_close(
            &format!("b after it {it}"),
            teacher[2].1.as_tensor(),
            &tb.get(it + 1).unwrap(),
            0.0,
            2e-7,
        );
    }
}

#[test]
fn ema_large_tensor_uses_the_parallel_path_correctly() {
    let dev = common::tdev();
    let s = Tensor::randn(0f32, 1.0, (700, 1000), &dev).unwrap();
    let t = Tensor::randn(0f32, 1.0, (700, 1000), &dev).unwrap();
    let student = vec![("x".to_string(), var(&s))];
    let teacher = vec![("x".to_string(), var(&t))];
    EmaTeacher::new(&student, &teacher)
        .unwrap()
        .update(0.99)
        .unwrap();
    let want = ((&t * 0.99f64).unwrap() + (&s * (1.0 - 0.99f64)).unwrap()).unwrap();
    assert_close("ema 700k", teacher[0].1.as_tensor(), &want, 1e-7, 1e-6);
    // the student is untouched
    assert_close("student", student[0].1.as_tensor(), &s, 0.0, 0.0);
}

#[test]
fn ema_pairing_errors_name_the_parameter() {
    let dev = common::tdev();
    let v = |shape: &[usize]| Var::zeros(shape, DType::F32, &dev).unwrap();
    let student: Vec<NamedVar> = vec![("a".into(), v(&[2])), ("b".into(), v(&[3]))];
    let e = EmaTeacher::new(&student, &[("a".into(), v(&[2]))]).unwrap_err();
    assert!(
        matches!(&e, Error::MissingParameter { name, .. } if name == "b"),
        "{e}"
    );
    let e = EmaTeacher::new(
        &student,
        &[
            ("a".into(), v(&[2])),
            ("b".into(), v(&[3])),
            ("c".into(), v(&[1])),
        ],
    )
    .unwrap_err();
    assert!(
        matches!(&e, Error::MissingParameter { name, .. } if name == "c"),
        "{e}"
    );
    let e = EmaTeacher::new(&student, &[("a".into(), v(&[2])), ("b".into(), v(&[4]))]).unwrap_err();
    assert!(
        e.to_string().contains("\"b\"") && e.to_string().contains("[3]"),
        "{e}"
    );
    // a teacher sharing storage with its student is refused
    let shared: Vec<NamedVar> = student
        .iter()
        .map(|(n, v)| (n.clone(), v.clone()))
        .collect();
    let e = EmaTeacher::new(&student, &shared).unwrap_err();
    assert!(e.to_string().contains("shares storage"), "{e}");
    let ema = EmaTeacher::new(&student, &[("a".into(), v(&[2])), ("b".into(), v(&[3]))]).unwrap();
    assert!(ema.update(1.5).is_err());
}

dino_kernels::portable_path_tests!(ema_trace_matches_official_70_steps,);
