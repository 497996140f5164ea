//! k-NN against eval_knn.knn_classifier goldens (several k), small test sets (< 100, which the official
//! code cannot handle), agreement with an independent brute-force vote, and errors.

mod common;

use candle_core::{DType, Device, Tensor};
use common::{get, golden};
use dino_core::{knn_classifier, l2_normalize};

#[test]
fn knn_matches_official_top1_top5() {
    let g = golden("knn.safetensors");
    for (p, classes, k, top1, top5) in [
        ("c5_", 5usize, 20usize, 94.0, 100.0),
        ("c10_", 10, 10, 86.5, 99.5),
        ("c10_", 10, 20, 87.0, 100.0),
    ] {
        let r = knn_classifier(
            &get(&g, &format!("{p}train_features")),
            &get(&g, &format!("{p}train_labels")),
            &get(&g, &format!("{p}test_features")),
            &get(&g, &format!("{p}test_labels")),
            k,
            0.07,
            classes,
        )
        .unwrap();
        assert_eq!((r.top1, r.top5), (top1, top5), "{p} k={k}");
    }
}

/// Independent brute force: full sort of similarities per test row, f64 votes.
fn brute_force(
    train: &[Vec<f32>],
    ty: &[i64],
    test: &[Vec<f32>],
    sy: &[i64],
    k: usize,
    t: f64,
    c: usize,
) -> (f64, f64) {
    let (mut t1, mut t5) = (0, 0);
    for (x, y) in test.iter().zip(sy) {
        let mut sims: Vec<(f64, usize)> = train
            .iter()
            .enumerate()
            .map(|(j, tr)| {
                (
                    x.iter()
                        .zip(tr)
                        .map(|(a, b)| (*a as f64) * (*b as f64))
                        .sum(),
                    j,
                )
            })
            .collect();
        sims.sort_by(|a, b| b.0.partial_cmp(&a.0).unwrap());
        let mut votes = vec![0f64; c];
        for &(s, j) in &sims[..k] {
            votes[ty[j] as usize] += (s / t).exp();
        }
        let mut order: Vec<usize> = (0..c).collect();
        order.sort_by(|a, b| votes[*b].partial_cmp(&votes[*a]).unwrap().then(a.cmp(b)));
        t1 += usize::from(order[0] as i64 == *y);
        t5 += usize::from(order[..k.min(5)].iter().any(|o| *o as i64 == *y));
    }
    (
        t1 as f64 * 100.0 / test.len() as f64,
        t5 as f64 * 100.0 / test.len() as f64,
    )
}

#[test]
fn small_test_sets_work_and_agree_with_brute_force() {
    let g = golden("knn.safetensors");
    let train = get(&g, "c10_train_features");
    let ty = get(&g, "c10_train_labels");
    let rows = |t: &Tensor| t.to_vec2::<f32>().unwrap();
    let (trv, tyv) = (rows(&train), ty.to_vec1::<i64>().unwrap());
    for n_test in [1usize, 7, 37, 99] {
        let test = get(&g, "c10_test_features").narrow(0, 0, n_test).unwrap();
        let sy = get(&g, "c10_test_labels").narrow(0, 0, n_test).unwrap();
        for k in [1usize, 3, 20] {
            let r = knn_classifier(&train, &ty, &test, &sy, k, 0.07, 10).unwrap();
            let want = brute_force(
                &trv,
                &tyv,
                &rows(&test),
                &sy.to_vec1::<i64>().unwrap(),
                k,
                0.07,
                10,
            );
            assert_eq!((r.top1, r.top5), want, "n_test {n_test}, k {k}");
        }
    }
    // u32 labels are accepted too
    let test = get(&g, "c10_test_features");
    let sy = get(&g, "c10_test_labels").to_dtype(DType::U32).unwrap();
    let r = knn_classifier(
        &train,
        &ty.to_dtype(DType::U32).unwrap(),
        &test,
        &sy,
        20,
        0.07,
        10,
    )
    .unwrap();
    assert_eq!((r.top1, r.top5), (87.0, 100.0));
}

#[test]
fn l2_normalize_gives_unit_rows() {
    let x = Tensor::new(&[[3f32, 4.0], [0.0, 0.0], [1.0, 0.0]], &Device::Cpu).unwrap();
    let y = l2_normalize(&x).unwrap().to_vec2::<f32>().unwrap();
    assert_eq!(y, vec![vec![0.6, 0.8], vec![0.0, 0.0], vec![1.0, 0.0]]);
}

#[test]
fn knn_errors() {
    let dev = Device::Cpu;
    let f = Tensor::zeros((4, 3), DType::F32, &dev).unwrap();
    let y = Tensor::new(&[0i64, 1, 1, 0], &dev).unwrap();
    assert!(knn_classifier(&f, &y, &f, &y, 5, 0.07, 2)
        .unwrap_err()
        .to_string()
        .contains("k"));
    assert!(knn_classifier(&f, &y, &f, &y, 2, 0.07, 1)
        .unwrap_err()
        .to_string()
        .contains("outside 0..1"));
    let f2 = Tensor::zeros((4, 2), DType::F32, &dev).unwrap();
    assert!(knn_classifier(&f, &y, &f2, &y, 2, 0.07, 2)
        .unwrap_err()
        .to_string()
        .contains("test_features"));
    let y3 = Tensor::new(&[0i64, 1, 1], &dev).unwrap();
    assert!(knn_classifier(&f, &y3, &f, &y, 2, 0.07, 2)
        .unwrap_err()
        .to_string()
        .contains("train_labels"));
    let yf = Tensor::new(&[0f32, 1., 1., 0.], &dev).unwrap();
    assert!(knn_classifier(&f, &yf, &f, &y, 2, 0.07, 2).is_err());
}
