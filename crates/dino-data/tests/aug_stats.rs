//! Statistical tests of the random samplers over thousands of draws, and of the rendered crops against the
//! official `DataAugmentationDINO` statistics (`shared/golden-aug/dino_aug_stats.safetensors`).
//!
//! Every band is derived from a standard error: a rate `p` estimated from `n` draws must lie within
//! `Z * sqrt(p (1 - p) / n)` of `p` and a mean of `n` draws within `Z * sd / sqrt(n)`, with `Z = 4.5`
//! (a false alarm rate of ~7e-6 per check for a correct sampler). The seeds are fixed, so the tests are
//! reproducible; a wrong probability (0.7 instead of 0.8, say) is many standard errors away.

use std::collections::HashMap;

use candle_core::{Device, Tensor};
use dino_data::augment::{
    random_resized_crop_params, sample_rng, DataAugmentationDINO, DinoAugConfig, ViewParams,
};
use dino_data::Transform;
use image::RgbImage;

const GOLDEN: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../../../shared/golden-aug/");
const PHOTOS: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../../../shared/data/photos/");
const Z: f64 = 4.5;

fn load(name: &str) -> HashMap<String, Tensor> {
    candle_core::safetensors::load(format!("{GOLDEN}{name}"), &Device::Cpu)
        .unwrap_or_else(|e| panic!("cannot load {GOLDEN}{name}: {e}"))
}

/// Asserts that `k` successes out of `n` are consistent with probability `p`.
fn assert_rate(what: &str, k: usize, n: usize, p: f64) {
    let phat = k as f64 / n as f64;
    if p == 0.0 || p == 1.0 {
        assert_eq!(phat, p, "{what}: {k}/{n}, expected probability {p} exactly");
        return;
    }
    let se = (p * (1.0 - p) / n as f64).sqrt();
    assert!(
        (phat - p).abs() <= Z * se,
        "{what}: rate {phat:.4} ({k}/{n}) vs {p} (band +-{:.4})",
        Z * se
    );
}

/// Asserts that the mean of `xs` is consistent with `mu`, for draws of standard deviation `sd`, allowing an
/// extra deterministic `bias` (rounding).
fn assert_mean(what: &str, xs: &[f64], mu: f64, sd: f64, bias: f64) {
    let m = xs.iter().sum::<f64>() / xs.len() as f64;
    let band = Z * sd / (xs.len() as f64).sqrt() + bias;
    assert!(
        (m - mu).abs() <= band,
        "{what}: mean {m:.5} vs {mu:.5} (band +-{band:.5})"
    );
}

#[test]
fn random_resized_crop_area_aspect_and_position() {
    let n = 6000;
    let ratio = (3.0 / 4.0, 4.0 / 3.0);
    for (w, h) in [(256usize, 256usize), (160, 106), (137, 160)] {
        let area = (w * h) as f64;
        for (kind, scale) in [("global", (0.4, 1.0)), ("local", (0.05, 0.4))] {
            let mut rng = sample_rng(42, w as u64, h as u64);
            let mut fracs = Vec::new();
            let mut log_aspects = Vec::new();
            let mut tops = Vec::new();
            for _ in 0..n {
                let c = random_resized_crop_params(w, h, scale, ratio, &mut rng);
                let (cw, ch) = (c.width as f64, c.height as f64);
                assert!(c.left + c.width <= w && c.top + c.height <= h, "{c:?}");
                // Rounding w and h to integers moves the area by at most (w + h + 1) / 2 + 1/4 pixels and
                // the aspect ratio by at most half a pixel on each side.
                let slack = ((cw + ch + 1.0) / 2.0 + 0.25) / area;
                let frac = cw * ch / area;
                let is_fallback = frac > scale.1 + slack || frac < scale.0 - slack;
                if !is_fallback {
                    assert!(
                        cw <= 4.0 / 3.0 * ch + 7.0 / 6.0,
                        "{kind} {w}x{h}: aspect {c:?}"
                    );
                    assert!(
                        ch <= 4.0 / 3.0 * cw + 7.0 / 6.0,
                        "{kind} {w}x{h}: aspect {c:?}"
                    );
                    fracs.push(frac);
                    log_aspects.push((cw / ch).ln());
                }
                if c.height < h {
                    tops.push(c.top as f64 / (h - c.height) as f64);
                }
            }
            // The centre-crop fallback is rare (every attempt must fail); local crops always fit.
            assert!(
                fracs.len() as f64 >= 0.99 * n as f64,
                "{kind} {w}x{h}: {} fallbacks",
                n - fracs.len()
            );
            assert!(fracs
                .iter()
                .all(|f| *f >= scale.0 - 0.02 && *f <= scale.1 + 0.02));
            if kind == "local" {
                // Area fraction ~ U(0.05, 0.4): mean 0.225, sd 0.35 / sqrt(12); rounding bias < 1%.
                let bias = 0.01 * 0.225;
                assert_mean(
                    "local area fraction",
                    &fracs,
                    0.225,
                    0.35 / 12f64.sqrt(),
                    bias,
                );
                // log aspect ~ U(ln 3/4, ln 4/3): mean 0, sd (2 ln 4/3) / sqrt(12); rounding adds noise
                // of at most ~1/side, far below the band.
                let lr = (4.0f64 / 3.0).ln();
                assert_mean(
                    "local log aspect",
                    &log_aspects,
                    0.0,
                    2.0 * lr / 12f64.sqrt(),
                    0.01,
                );
                assert!(log_aspects.iter().all(|a| a.abs() <= lr + 0.2));
            }
            // Position uniform over the valid range: mean 1/2, sd <= 1/2.
            if tops.len() > 1000 {
                assert_mean(
                    &format!("{kind} {w}x{h} top position"),
                    &tops,
                    0.5,
                    0.5,
                    0.0,
                );
            }
        }
    }
    // Fallback of an extreme aspect ratio: a centred crop of ratio 3/4 or 4/3.
    let mut rng = sample_rng(0, 0, 0);
    let c = random_resized_crop_params(1000, 10, (0.9, 1.0), ratio, &mut rng);
    assert_eq!(
        (c.height, c.width, c.top, c.left),
        (10, 13, 0, (1000 - 13) / 2)
    );
    let c = random_resized_crop_params(10, 1000, (0.9, 1.0), ratio, &mut rng);
    assert_eq!(
        (c.height, c.width, c.top, c.left),
        (13, 10, (1000 - 13) / 2, 0)
    );
}

fn all_params(cfg: DinoAugConfig, n: usize) -> Vec<Vec<ViewParams>> {
    let aug = DataAugmentationDINO::new(cfg).unwrap();
    (0..n as u64)
        .map(|i| aug.sample_params(256, 256, &mut sample_rng(3, 1, i)))
        .collect()
}

#[test]
fn random_decisions_have_official_rates() {
    let n = 5000;
    let params = all_params(DinoAugConfig::default(), n);
    assert!(params.iter().all(|p| p.len() == 10));
    let count = |v: std::ops::Range<usize>, f: &dyn Fn(&ViewParams) -> bool| -> (usize, usize) {
        let k = params
            .iter()
            .flat_map(|p| &p[v.clone()])
            .filter(|x| f(x))
            .count();
        (k, n * v.len())
    };
    let views = [("global1", 0..1), ("global2", 1..2), ("locals", 2..10)];
    for (name, v) in views.clone() {
        let (k, m) = count(v.clone(), &|p| p.flip);
        assert_rate(&format!("{name} flip"), k, m, 0.5);
        let (k, m) = count(v.clone(), &|p| p.jitter.is_some());
        assert_rate(&format!("{name} colour jitter"), k, m, 0.8);
        let (k, m) = count(v.clone(), &|p| p.grayscale);
        assert_rate(&format!("{name} grayscale"), k, m, 0.2);
    }
    let (k, m) = count(0..1, &|p| p.blur_sigma.is_some());
    assert_rate("global1 blur", k, m, 1.0);
    let (k, m) = count(1..2, &|p| p.blur_sigma.is_some());
    assert_rate("global2 blur", k, m, 0.1);
    let (k, m) = count(2..10, &|p| p.blur_sigma.is_some());
    assert_rate("local blur", k, m, 0.5);
    let (k, m) = count(0..1, &|p| p.solarize);
    assert_rate("global1 solarize", k, m, 0.0);
    let (k, m) = count(1..2, &|p| p.solarize);
    assert_rate("global2 solarize", k, m, 0.2);
    let (k, m) = count(2..10, &|p| p.solarize);
    assert_rate("local solarize", k, m, 0.0);
    // Sizes.
    assert!(params.iter().all(|p| p[0].size == 224 && p[1].size == 224));
    assert!(params.iter().all(|p| p[2..].iter().all(|v| v.size == 96)));

    // Blur sigma ~ U(0.1, 2.0).
    let sigmas: Vec<f64> = params
        .iter()
        .flatten()
        .filter_map(|p| p.blur_sigma)
        .collect();
    assert!(sigmas.iter().all(|s| (0.1..2.0).contains(s)));
    assert_mean("blur sigma", &sigmas, 1.05, 1.9 / 12f64.sqrt(), 0.0);

    // Jitter: a uniform permutation (each op first with rate 1/4) and uniform factors.
    let jit: Vec<_> = params.iter().flatten().filter_map(|p| p.jitter).collect();
    for op in 0..4u8 {
        let k = jit.iter().filter(|j| j.order[0] == op).count();
        assert_rate(&format!("op {op} first"), k, jit.len(), 0.25);
        let k = jit.iter().filter(|j| j.order[3] == op).count();
        assert_rate(&format!("op {op} last"), k, jit.len(), 0.25);
    }
    for j in &jit {
        let mut o = j.order;
        o.sort();
        assert_eq!(o, [0, 1, 2, 3]);
    }
    let fb: Vec<f64> = jit.iter().map(|j| j.brightness.unwrap()).collect();
    let fc: Vec<f64> = jit.iter().map(|j| j.contrast.unwrap()).collect();
    let fs: Vec<f64> = jit.iter().map(|j| j.saturation.unwrap()).collect();
    let fh: Vec<f64> = jit.iter().map(|j| j.hue.unwrap()).collect();
    assert!(fb.iter().chain(&fc).all(|f| (0.6..=1.4).contains(f)));
    assert!(fs.iter().all(|f| (0.8..=1.2).contains(f)));
    assert!(fh.iter().all(|f| (-0.1..=0.1).contains(f)));
    assert_mean("brightness", &fb, 1.0, 0.8 / 12f64.sqrt(), 0.0);
    assert_mean("contrast", &fc, 1.0, 0.8 / 12f64.sqrt(), 0.0);
    assert_mean("saturation", &fs, 1.0, 0.4 / 12f64.sqrt(), 0.0);
    assert_mean("hue", &fh, 0.0, 0.2 / 12f64.sqrt(), 0.0);

    // Configured probabilities are honoured too.
    let cfg = DinoAugConfig {
        flip_p: 0.0,
        color_jitter_p: 0.3,
        grayscale_p: 1.0,
        local_blur_p: 0.0,
        global2_solarize_p: 0.7,
        local_crops_number: 2,
        saturation: 0.0,
        ..DinoAugConfig::default()
    };
    let p2 = all_params(cfg, 3000);
    let flat: Vec<&ViewParams> = p2.iter().flatten().collect();
    assert_rate(
        "flip_p 0",
        flat.iter().filter(|p| p.flip).count(),
        flat.len(),
        0.0,
    );
    assert_rate(
        "grayscale_p 1",
        flat.iter().filter(|p| p.grayscale).count(),
        flat.len(),
        1.0,
    );
    let k = flat.iter().filter(|p| p.jitter.is_some()).count();
    assert_rate("color_jitter_p 0.3", k, flat.len(), 0.3);
    assert!(flat
        .iter()
        .filter_map(|p| p.jitter)
        .all(|j| j.saturation.is_none()));
    let k = p2.iter().filter(|p| p[1].solarize).count();
    assert_rate("solarize 0.7", k, p2.len(), 0.7);
    let k = p2
        .iter()
        .flat_map(|p| &p[2..])
        .filter(|p| p.blur_sigma.is_some())
        .count();
    assert_rate("local blur 0", k, 2 * p2.len(), 0.0);
}

/// Per-crop rows of three channel values.
type Rows = Vec<[f64; 3]>;

/// Per-crop channel means and unbiased stds of CHW views.
fn channel_stats(data: &[f32]) -> ([f64; 3], [f64; 3]) {
    let n = data.len() / 3;
    let mut mean = [0.0; 3];
    let mut std = [0.0; 3];
    for c in 0..3 {
        let ch = &data[c * n..(c + 1) * n];
        let m = ch.iter().map(|&x| x as f64).sum::<f64>() / n as f64;
        let v = ch.iter().map(|&x| (x as f64 - m).powi(2)).sum::<f64>() / (n - 1) as f64;
        mean[c] = m;
        std[c] = v.sqrt();
    }
    (mean, std)
}

/// Mean and standard error of each column of `rows`.
fn mean_se(rows: &[[f64; 3]]) -> ([f64; 3], [f64; 3]) {
    let n = rows.len() as f64;
    let mut m = [0.0; 3];
    let mut se = [0.0; 3];
    for c in 0..3 {
        m[c] = rows.iter().map(|r| r[c]).sum::<f64>() / n;
        let var = rows.iter().map(|r| (r[c] - m[c]).powi(2)).sum::<f64>() / (n - 1.0);
        se[c] = (var / n).sqrt();
    }
    (m, se)
}

fn rows_of(t: &Tensor) -> Vec<[f64; 3]> {
    t.to_vec2::<f32>()
        .unwrap()
        .into_iter()
        .map(|r| [r[0] as f64, r[1] as f64, r[2] as f64])
        .collect()
}

/// Un-normalised channels equal (grayscale crop), from the per-crop means and stds.
fn is_grey(mean: &[f64; 3], std: &[f64; 3]) -> bool {
    let (m, s) = ([0.485, 0.456, 0.406], [0.229, 0.224, 0.225]);
    let um: Vec<f64> = (0..3).map(|c| mean[c] * s[c] + m[c]).collect();
    let us: Vec<f64> = (0..3).map(|c| std[c] * s[c]).collect();
    (um[0] - um[1]).abs() < 1e-3
        && (um[1] - um[2]).abs() < 1e-3
        && (us[0] - us[1]).abs() < 1e-3
        && (us[1] - us[2]).abs() < 1e-3
}

/// Our pipeline against the official one (`DataAugmentationDINO((0.4, 1), (0.05, 0.4), 2)`, seeds 1..200):
/// per-crop channel means and stds agree within `Z * sqrt(se_ref^2 + se_port^2)`, and so does the fraction
/// of grayscale crops.
#[test]
fn crop_statistics_match_official_pipeline() {
    let stats = load("dino_aug_stats.safetensors");
    let inputs = load("aug_inputs.safetensors");
    let t = &inputs["p0/input"];
    let (h, w, _) = t.dims3().unwrap();
    let p0 = RgbImage::from_raw(
        w as u32,
        h as u32,
        t.flatten_all().unwrap().to_vec1::<u8>().unwrap(),
    )
    .unwrap();
    let full = image::open(format!("{PHOTOS}chelsea_cat.png"))
        .unwrap()
        .to_rgb8();
    let aug = DataAugmentationDINO::new(DinoAugConfig {
        local_crops_number: 2,
        ..DinoAugConfig::default()
    })
    .unwrap();
    // 200 calls like the official statistics on the small input; fewer on the 451x300 photo to keep the
    // test short (the band widens accordingly).
    for (src, img, calls) in [("p0_input", &p0, 200u64), ("photo_full_res", &full, 100)] {
        let mut port: HashMap<&str, (Rows, Rows)> = HashMap::new();
        for i in 0..calls {
            let views = aug.views(img, &mut sample_rng(11, 0, i));
            for (v, view) in views.iter().enumerate() {
                let kind = if v < 2 { "global" } else { "local" };
                let (m, s) = channel_stats(&view.data);
                let e = port.entry(kind).or_default();
                e.0.push(m);
                e.1.push(s);
            }
        }
        for kind in ["global", "local"] {
            let (pm, ps) = &port[kind];
            let rm = rows_of(&stats[&format!("{src}/{kind}_crop_channel_means")]);
            let rs = rows_of(&stats[&format!("{src}/{kind}_crop_channel_stds")]);
            for (what, p, r) in [("channel means", pm, &rm), ("channel stds", ps, &rs)] {
                let (pmean, pse) = mean_se(p);
                let (rmean, rse) = mean_se(r);
                for c in 0..3 {
                    let band = Z * (pse[c].powi(2) + rse[c].powi(2)).sqrt();
                    eprintln!(
                        "{src} {kind} {what} c{c}: port {:.4} official {:.4} |diff| {:.4} band {band:.4}",
                        pmean[c],
                        rmean[c],
                        (pmean[c] - rmean[c]).abs()
                    );
                    assert!(
                        (pmean[c] - rmean[c]).abs() <= band,
                        "{src} {kind} {what} channel {c}: port {:.4} vs official {:.4} (band +-{band:.4})",
                        pmean[c],
                        rmean[c]
                    );
                }
            }
            let grey_port = pm.iter().zip(ps).filter(|(m, s)| is_grey(m, s)).count();
            let grey_ref = rm.iter().zip(&rs).filter(|(m, s)| is_grey(m, s)).count();
            let (fp, fr) = (
                grey_port as f64 / pm.len() as f64,
                grey_ref as f64 / rm.len() as f64,
            );
            eprintln!("{src} {kind} grayscale fraction: port {fp:.4} official {fr:.4}");
            let se = (0.2 * 0.8 / pm.len() as f64 + 0.2 * 0.8 / rm.len() as f64).sqrt();
            assert!(
                (fp - fr).abs() <= Z * se,
                "{src} {kind}: grayscale fraction {fp:.3} vs official {fr:.3}"
            );
            assert_rate(&format!("{src} {kind} grayscale"), grey_port, pm.len(), 0.2);
        }
    }
}
