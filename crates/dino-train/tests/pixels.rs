//! The raw-pixel k-NN baseline printed beside the trained one: its features are the stored image bytes / 255
//! (checked against the IDX files read here byte by byte), and its k-NN on the embedded split equals an
//! independent f64 computation of the weighted k-NN (k = 20, T = 0.07, cosine) written out in this file,
//! which gives the 79.4% the issue measured with its own script.

use std::io::Read;

use dino_train::data::{embedded_dir, eval_transform, open_bank, open_val};
use dino_train::eval::{extract_pixels, knn_eval};
use dino_train::TrainConfig;

fn idx(path: &std::path::Path) -> Vec<u8> {
    let mut out = Vec::new();
    flate2::read::GzDecoder::new(std::fs::File::open(path).unwrap())
        .read_to_end(&mut out)
        .unwrap();
    out
}

/// eval_knn.py's weighted vote in f64: top-k cosine similarities, weights exp(s / T), class scores summed.
fn knn_f64(bank: &[Vec<f64>], bl: &[u8], q: &[Vec<f64>], ql: &[u8], k: usize, t: f64) -> f64 {
    let norm = |v: &Vec<f64>| {
        let n = v.iter().map(|x| x * x).sum::<f64>().sqrt();
        v.iter().map(|x| x / n).collect::<Vec<f64>>()
    };
    let bank: Vec<Vec<f64>> = bank.iter().map(norm).collect();
    let mut correct = 0;
    for (qv, &label) in q.iter().zip(ql) {
        let qv = norm(qv);
        let mut sims: Vec<(f64, usize)> = bank
            .iter()
            .enumerate()
            .map(|(i, b)| (b.iter().zip(&qv).map(|(a, c)| a * c).sum(), i))
            .collect();
        sims.sort_by(|a, b| b.0.total_cmp(&a.0));
        let mut votes = [0f64; 10];
        for &(s, i) in &sims[..k] {
            votes[bl[i] as usize] += (s / t).exp();
        }
        let best = (0..10)
            .max_by(|&a, &b| votes[a].total_cmp(&votes[b]))
            .unwrap();
        correct += usize::from(best == label as usize);
    }
    100.0 * correct as f64 / q.len() as f64
}

#[test]
fn raw_pixel_baseline_is_the_pixels_and_matches_an_independent_knn() {
    let cfg = TrainConfig::default_preset();
    let dir = embedded_dir().unwrap();
    let images = |name: &str| -> Vec<Vec<f64>> {
        let b = idx(&dir.join(format!("{name}-images-idx3-ubyte.gz")));
        b[16..]
            .chunks(784)
            .map(|c| c.iter().map(|&v| v as f64 / 255.0).collect())
            .collect()
    };
    let labels = |name: &str| idx(&dir.join(format!("{name}-labels-idx1-ubyte.gz")))[8..].to_vec();
    let (bank_px, bank_l) = (images("train"), labels("train"));
    let (val_px, val_l) = (images("t10k"), labels("t10k"));
    let bank = open_bank(&cfg).unwrap().unwrap();
    let val = open_val(&cfg).unwrap().unwrap();
    let t = eval_transform(&cfg).unwrap();
    let px = |ds| extract_pixels(ds, t.clone(), cfg.norm_mean, cfg.norm_std, 256, 1).unwrap();
    let (fb, fv) = (px(bank), px(val));
    // The features are the stored bytes / 255, replicated over the 3 channels (grey to RGB).
    assert_eq!(fb.features.dims(), &[5000, 3 * 784]);
    let rows = fb
        .features
        .narrow(0, 0, 50)
        .unwrap()
        .to_vec2::<f32>()
        .unwrap();
    for (r, want) in rows.iter().zip(&bank_px) {
        for c in 0..3 {
            for (a, b) in r[c * 784..(c + 1) * 784].iter().zip(want) {
                assert!((*a as f64 - b).abs() < 1e-5, "{a} vs {b}");
            }
        }
    }
    let ours = knn_eval(&fb, &fv, 20, 0.07).unwrap();
    let want = knn_f64(&bank_px, &bank_l, &val_px, &val_l, 20, 0.07);
    assert!(
        (ours.top1 - want).abs() < 0.15,
        "k-NN {} vs independent {want}",
        ours.top1
    );
    assert!((want - 79.4).abs() < 0.05, "the issue's figure: {want}");
}
