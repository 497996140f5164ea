//! Every deterministic pixel op of `dino_data::pil` against the Pillow 13 / torchvision outputs stored in
//! `shared/golden-aug` (resized crops, flip, colour ops, HSV, grayscale, Gaussian blur, solarize,
//! ToTensor + Normalize). The manifest's tolerance is "exact if Pillow's arithmetic is reproduced"; we reproduce
//! it, so every u8 comparison here demands bit equality and the f32 one bitwise equality.

use std::collections::HashMap;

use candle_core::{Device, Tensor};
use dino_data::pil::{self, Normalize, PassOrder};
use image::RgbImage;

const GOLDEN: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../../../shared/golden-aug/");
const PHOTOS: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../../../shared/data/photos/");

fn load(name: &str) -> HashMap<String, Tensor> {
    candle_core::safetensors::load(format!("{GOLDEN}{name}"), &Device::Cpu)
        .unwrap_or_else(|e| panic!("cannot load {GOLDEN}{name}: {e}"))
}

fn u8_hwc(t: &Tensor) -> (usize, usize, Vec<u8>) {
    let (h, w, c) = t.dims3().unwrap();
    assert_eq!(c, 3);
    (h, w, t.flatten_all().unwrap().to_vec1::<u8>().unwrap())
}

fn input(inputs: &HashMap<String, Tensor>, k: usize) -> RgbImage {
    let (h, w, data) = u8_hwc(&inputs[&format!("p{k}/input")]);
    RgbImage::from_raw(w as u32, h as u32, data).unwrap()
}

/// Asserts bit equality, reporting the number of differing values and the largest difference.
fn assert_u8_eq(what: &str, got: &[u8], want: &[u8]) {
    assert_eq!(got.len(), want.len(), "{what}: length");
    let diffs: Vec<i32> = got
        .iter()
        .zip(want)
        .map(|(&a, &b)| (a as i32 - b as i32).abs())
        .filter(|&d| d > 0)
        .collect();
    assert!(
        diffs.is_empty(),
        "{what}: {} of {} values differ, max |diff| {}",
        diffs.len(),
        got.len(),
        diffs.iter().max().unwrap()
    );
}

const BOXES: [&str; 7] = [
    "full",
    "small_upscale",
    "w96",
    "full_height_w60",
    "corner_tiny",
    "sampled_global",
    "sampled_local",
];

#[test]
fn resized_crop_matches_pillow() {
    let inputs = load("aug_inputs.safetensors");
    let rc = load("resized_crop.safetensors");
    let mut n_cases = 0;
    for k in 0..3 {
        let img = input(&inputs, k);
        let boxes = rc[&format!("p{k}/boxes")].to_vec2::<i64>().unwrap();
        assert_eq!(boxes.len(), BOXES.len());
        for (name, b) in BOXES.iter().zip(&boxes) {
            let (top, left, h, w) = (b[0] as usize, b[1] as usize, b[2] as usize, b[3] as usize);
            for s in [224usize, 96] {
                let key = format!("p{k}/rrc/{name}/{s}/pil");
                let (_, _, want) = u8_hwc(&rc[&key]);
                let got = pil::resized_crop(&img, top, left, h, w, s, s).unwrap();
                assert_u8_eq(&key, got.as_raw(), &want);
                n_cases += 1;
            }
        }
    }
    assert_eq!(n_cases, 42);
}

#[test]
fn pass_order_follows_pillow_13() {
    // From the manifest's per-case `pil_pass_order`.
    assert_eq!(pil::pass_order(96, 100, 96, 96), PassOrder::VerticalOnly); // w96/96
    assert_eq!(pil::pass_order(60, 106, 96, 96), PassOrder::VerticalFirst); // p0 full_height_w60/96
    assert_eq!(pil::pass_order(107, 130, 96, 96), PassOrder::VerticalFirst); // p1 sampled_global/96
    assert_eq!(
        pil::pass_order(160, 106, 96, 96),
        PassOrder::HorizontalFirst
    ); // p0 full/96
    assert_eq!(pil::pass_order(103, 97, 96, 96), PassOrder::HorizontalFirst); // p0 sampled_global/96
    assert_eq!(pil::pass_order(96, 74, 96, 96), PassOrder::VerticalOnly); // p1 sampled_local/96
    assert_eq!(pil::pass_order(50, 40, 50, 40), PassOrder::None);
    assert_eq!(pil::pass_order(50, 40, 60, 40), PassOrder::HorizontalOnly);
}

/// The stored inputs are themselves Pillow resizes of the PNG photos (2.82x and 3.2x antialiased downscales).
#[test]
fn downscale_of_full_photo_matches_pillow() {
    let inputs = load("aug_inputs.safetensors");
    for (k, file, size) in [
        (0, "chelsea_cat.png", (160, 106)),
        (2, "astronaut.png", (160, 160)),
    ] {
        let photo = image::open(format!("{PHOTOS}{file}")).unwrap().to_rgb8();
        let got = pil::resize(&photo, size.0, size.1).unwrap();
        let want = input(&inputs, k);
        assert_eq!(got.dimensions(), want.dimensions());
        assert_u8_eq(file, got.as_raw(), want.as_raw());
    }
}

#[test]
fn resized_crop_rejects_bad_boxes() {
    let img = RgbImage::new(10, 8);
    assert!(pil::resized_crop(&img, 0, 0, 9, 10, 4, 4).is_err());
    assert!(pil::resized_crop(&img, 0, 3, 8, 8, 4, 4).is_err());
    assert!(pil::resized_crop(&img, 0, 0, 0, 10, 4, 4).is_err());
    assert!(pil::resized_crop(&img, 0, 0, 8, 10, 0, 4).is_err());
    assert_eq!(pil::resized_crop(&img, 0, 0, 8, 10, 10, 8).unwrap(), img);
}

fn fmt_factor(f: f64) -> String {
    // Python's repr of the factors used as key suffixes.
    let s = format!("{f}");
    if s.contains('.') {
        s
    } else {
        format!("{s}.0")
    }
}

#[test]
fn pixel_ops_match_pillow() {
    let inputs = load("aug_inputs.safetensors");
    let ops = load("pil_ops.safetensors");
    type Op = fn(&mut [u8], f64);
    let colour: [(&str, &[f64], Op); 4] = [
        ("brightness", &[0.6, 1.4, 0.8731], pil::adjust_brightness),
        ("contrast", &[0.6, 1.4, 1.1642], pil::adjust_contrast),
        ("saturation", &[0.8, 1.2, 0.9377], pil::adjust_saturation),
        ("hue", &[-0.1, 0.1, 0.0372, -0.0629, 0.003], pil::adjust_hue),
    ];
    for k in 0..3 {
        let img = input(&inputs, k);
        let (w, h) = (img.width() as usize, img.height() as usize);
        let key = |op: &str| format!("p{k}/{op}");
        let want = |op: &str| u8_hwc(&ops[&key(op)]).2;

        let mut d = img.as_raw().clone();
        pil::hflip(&mut d, w);
        assert_u8_eq(&key("hflip"), &d, &want("hflip"));

        let mut d = img.as_raw().clone();
        pil::rgb_to_hsv_image(&mut d);
        assert_u8_eq(&key("hsv"), &d, &want("hsv"));

        for (name, factors, op) in colour {
            for &f in factors {
                let mut d = img.as_raw().clone();
                op(&mut d, f);
                let op_key = format!("{name}={}", fmt_factor(f));
                assert_u8_eq(&key(&op_key), &d, &want(&op_key));
            }
        }

        let mut d = img.as_raw().clone();
        pil::grayscale3(&mut d);
        assert_u8_eq(&key("grayscale3"), &d, &want("grayscale3"));

        for s in [0.1f64, 1.0, 2.0, 1.37] {
            let mut d = img.as_raw().clone();
            pil::gaussian_blur(&mut d, w, h, s as f32);
            let op_key = format!("gaussian_blur={}", fmt_factor(s));
            assert_u8_eq(&key(&op_key), &d, &want(&op_key));
        }

        let mut d = img.as_raw().clone();
        pil::solarize(&mut d, 128);
        assert_u8_eq(&key("solarize"), &d, &want("solarize"));

        let got = Normalize::imagenet().apply(img.as_raw());
        let want_n = ops[&key("normalized")]
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        assert_eq!(got.len(), want_n.len());
        let n_bits_diff = got
            .iter()
            .zip(&want_n)
            .filter(|(a, b)| a.to_bits() != b.to_bits())
            .count();
        assert_eq!(
            n_bits_diff,
            0,
            "{}: normalised values not bitwise equal",
            key("normalized")
        );
    }
}

/// The HSV round trip must be exactly Pillow's (lossy) one: `hue=0.003` shifts by 0 yet changes pixels.
#[test]
fn hue_shift_truncates_and_wraps() {
    assert_eq!(pil::color::hue_shift(-0.1), 231);
    assert_eq!(pil::color::hue_shift(0.1), 25);
    assert_eq!(pil::color::hue_shift(0.003), 0);
    assert_eq!(pil::color::hue_shift(-0.0629), 240);
    // Round trip of greys is exact, of saturated primaries too.
    for v in [0u8, 17, 128, 255] {
        assert_eq!(pil::hsv_to_rgb(pil::rgb_to_hsv(v, v, v).0, 0, v), (v, v, v));
    }
    let (h, s, v) = pil::rgb_to_hsv(255, 0, 0);
    assert_eq!((h, s, v), (0, 255, 255));
    assert_eq!(pil::hsv_to_rgb(h, s, v), (255, 0, 0));
}

/// Pillow's box radius for sigma 0.1 is tiny but not zero (so the blur is not the identity).
#[test]
fn blur_box_radius_formula() {
    let r = pil::blur::box_radius(0.1, 3);
    assert!(r > 0.0 && r < 0.01, "radius {r}");
    let (l, ww, fw) = pil::blur::box_weights(r);
    assert_eq!(l, 0);
    assert!(ww < (1 << 24) && fw > 0, "ww {ww} fw {fw}");
    // sigma 2: sigma2 = 4/3, L = sqrt(17) = 4.12, l = 1.
    let r2 = pil::blur::box_radius(2.0, 3);
    assert!((1.0..2.0).contains(&r2), "radius {r2}");
    // Independent check of the formula in f64: a = (2l+1)(l(l+1) - 3 s2) / (6 (s2 - (l+1)^2)).
    let s2 = 4.0f64 / 3.0;
    let want = 1.0 + 3.0 * (2.0 - 3.0 * s2) / (6.0 * (s2 - 4.0));
    assert!((r2 as f64 - want).abs() < 1e-6);
}

/// The vectorised passes (transpose + vertical pass) give exactly the direct scalar row kernels' results, on
/// many sizes (down- and upscales, tiny images) that the golden files do not cover.
#[test]
fn transposed_passes_equal_direct_row_kernels() {
    let inputs = load("aug_inputs.safetensors");
    let img = input(&inputs, 1);
    let src = img.as_raw();
    let iw = img.width() as usize;
    for (w, h, ow) in [
        (137, 160, 224),
        (137, 160, 96),
        (5, 7, 3),
        (1, 1, 4),
        (40, 2, 39),
        (13, 9, 224),
    ] {
        let c = pil::Coeffs::bicubic(w, 0.0, w as f64, ow);
        let mut direct = vec![0u8; h * ow * 3];
        for y in 0..h {
            pil::kernels::resample_row_h(
                &src[y * iw * 3..],
                &c,
                &mut direct[y * ow * 3..(y + 1) * ow * 3],
            );
        }
        // Horizontal-only resize runs the transposed path.
        let got = pil::resized_crop(&img, 0, 0, h, w, ow, h).unwrap();
        assert_u8_eq(
            &format!("horizontal pass {w}x{h} -> {ow}"),
            got.as_raw(),
            &direct,
        );
    }
    for (w, h, sigma) in [
        (137, 160, 2.0f32),
        (31, 5, 1.0),
        (3, 40, 0.7),
        (1, 1, 1.5),
        (200, 1, 2.0),
    ] {
        let crop = pil::resized_crop(&img, 0, 0, h.min(160), w.min(137), w, h).unwrap();
        let mut got = crop.as_raw().clone();
        pil::gaussian_blur(&mut got, w, h, sigma);
        // Reference: direct row passes, then the vertical passes on the transposed image's rows.
        let (radius, ww, fw) = pil::blur::box_weights(pil::blur::box_radius(sigma, 3));
        let mut a = crop.as_raw().clone();
        let mut b = a.clone();
        for _ in 0..3 {
            pil::kernels::box_pass_rows(&a, &mut b, w, h, radius, ww, fw);
            a.copy_from_slice(&b);
        }
        let mut t = vec![0u8; a.len()];
        pil::kernels::transpose_rgb(&a, 0, w * 3, w, h, &mut t);
        let mut tb = t.clone();
        for _ in 0..3 {
            pil::kernels::box_pass_rows(&t, &mut tb, h, w, radius, ww, fw);
            t.copy_from_slice(&tb);
        }
        pil::kernels::transpose_rgb(&t, 0, h * 3, h, w, &mut a);
        assert_u8_eq(&format!("blur {w}x{h} sigma {sigma}"), &got, &a);
    }
}
