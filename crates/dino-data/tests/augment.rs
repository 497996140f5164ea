//! The DINO augmentation chains against the official Compose chains with every random decision fixed
//! (`shared/golden-aug/chains.safetensors`), determinism of the per-sample RNG, the evaluation transform, and
//! config validation.

use std::collections::HashMap;

use candle_core::{Device, Tensor};
use dino_data::augment::{
    sample_rng, CropBox, DataAugmentationDINO, DinoAugConfig, EvalTransform, JitterParams,
    ViewParams,
};
use dino_data::pil;
use dino_data::Transform;
use image::RgbImage;
use rayon::prelude::*;

const GOLDEN: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../../../shared/golden-aug/");

fn load(name: &str) -> HashMap<String, Tensor> {
    candle_core::safetensors::load(format!("{GOLDEN}{name}"), &Device::Cpu)
        .unwrap_or_else(|e| panic!("cannot load {GOLDEN}{name}: {e}"))
}

fn u8_of(t: &Tensor) -> Vec<u8> {
    t.flatten_all().unwrap().to_vec1::<u8>().unwrap()
}

fn input(inputs: &HashMap<String, Tensor>, k: usize) -> RgbImage {
    let t = &inputs[&format!("p{k}/input")];
    let (h, w, _) = t.dims3().unwrap();
    RgbImage::from_raw(w as u32, h as u32, u8_of(t)).unwrap()
}

fn assert_u8_eq(what: &str, got: &[u8], want: &[u8]) {
    assert_eq!(got.len(), want.len(), "{what}: length");
    let n = got.iter().zip(want).filter(|(a, b)| a != b).count();
    let max = got
        .iter()
        .zip(want)
        .map(|(&a, &b)| (a as i32 - b as i32).abs())
        .max()
        .unwrap_or(0);
    assert_eq!(
        n,
        0,
        "{what}: {n} of {} values differ, max |diff| {max}",
        got.len()
    );
}

/// (name, photo, size, flip, jitter (order, b, c, s, h), grayscale, blur sigma, solarize, box t/l/h/w), as
/// recorded in manifest.json `sections.chains.chains`.
#[allow(clippy::type_complexity)]
const CHAINS: [(
    &str,
    usize,
    usize,
    bool,
    Option<([u8; 4], f64, f64, f64, f64)>,
    bool,
    Option<f64>,
    bool,
    [usize; 4],
); 3] = [
    (
        "global1_like",
        0,
        224,
        true,
        Some(([2, 0, 3, 1], 1.23, 0.71, 1.12, -0.043)),
        false,
        Some(1.37),
        false,
        [15, 17, 75, 120],
    ),
    (
        "global2_like",
        1,
        224,
        false,
        Some(([3, 1, 0, 2], 0.66, 1.31, 0.85, 0.091)),
        true,
        None,
        true,
        [22, 15, 114, 102],
    ),
    (
        "local_like",
        2,
        96,
        true,
        None,
        false,
        Some(0.55),
        false,
        [22, 17, 114, 120],
    ),
];

#[test]
fn official_chains_match_stage_by_stage() {
    let inputs = load("aug_inputs.safetensors");
    let chains = load("chains.safetensors");
    let aug = DataAugmentationDINO::new(DinoAugConfig::default()).unwrap();
    for (name, photo, size, flip, jitter, grayscale, blur, solarize, b) in CHAINS {
        let img = input(&inputs, photo);
        let key = |s: &str| format!("chain/{name}/{s}");
        let params = ViewParams {
            crop: CropBox {
                top: b[0],
                left: b[1],
                height: b[2],
                width: b[3],
            },
            size,
            flip,
            jitter: jitter.map(|(order, b, c, s, h)| JitterParams {
                order,
                brightness: Some(b),
                contrast: Some(c),
                saturation: Some(s),
                hue: Some(h),
            }),
            grayscale,
            blur_sigma: blur,
            solarize,
        };
        // Stage 1: RandomResizedCrop.
        let mut d = pil::resized_crop(&img, b[0], b[1], b[2], b[3], size, size)
            .unwrap()
            .into_raw();
        assert_u8_eq(&key("after_crop"), &d, &u8_of(&chains[&key("after_crop")]));
        // Stage 2: flip, colour jitter, grayscale.
        if flip {
            pil::hflip(&mut d, size);
        }
        if let Some(j) = &params.jitter {
            j.apply(&mut d);
        }
        if grayscale {
            pil::grayscale3(&mut d);
        }
        assert_u8_eq(
            &key("after_color"),
            &d,
            &u8_of(&chains[&key("after_color")]),
        );
        // Stage 3: blur, solarize; the whole u8 chain through the public renderer.
        let got = aug.render_u8(&img, &params).unwrap();
        let want = u8_of(&chains[&key("after_blur_solarize")]);
        assert_u8_eq(&key("after_blur_solarize"), got.as_raw(), &want);
        // Final: ToTensor + Normalize, bitwise.
        let view = aug.render(&img, &params).unwrap();
        assert_eq!((view.channels, view.height, view.width), (3, size, size));
        let want_out = chains[&key("out")]
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        let n_bits = view
            .data
            .iter()
            .zip(&want_out)
            .filter(|(a, b)| a.to_bits() != b.to_bits())
            .count();
        assert_eq!(n_bits, 0, "{}: f32 output differs", key("out"));
    }
}

fn photo(w: u32, h: u32) -> RgbImage {
    // A real photo resized to the requested size (the resize is exact Pillow, tested elsewhere).
    let inputs = load("aug_inputs.safetensors");
    pil::resize(&input(&inputs, 1), w as usize, h as usize).unwrap()
}

#[test]
fn views_have_official_shapes_and_count() {
    let aug = DataAugmentationDINO::new(DinoAugConfig::default()).unwrap();
    assert_eq!(aug.num_views(), 10);
    let img = photo(150, 120);
    let views = aug.views(&img, &mut sample_rng(0, 0, 0));
    assert_eq!(views.len(), 10);
    for (v, view) in views.iter().enumerate() {
        let s = if v < 2 { 224 } else { 96 };
        assert_eq!(
            (view.channels, view.height, view.width),
            (3, s, s),
            "view {v}"
        );
        assert_eq!(view.data.len(), 3 * s * s);
        assert!(view.data.iter().all(|x| x.is_finite()));
        // Normalised range: (0 - 0.485) / 0.229 .. (1 - 0.406) / 0.225.
        assert!(view.data.iter().all(|&x| (-2.2..=2.7).contains(&x)));
    }
    let cfg = DinoAugConfig {
        local_crops_number: 3,
        global_crop_size: 32,
        local_crop_size: 16,
        ..DinoAugConfig::default()
    };
    let aug = DataAugmentationDINO::new(cfg).unwrap();
    let views = aug.views(&img, &mut sample_rng(0, 0, 0));
    let sizes: Vec<usize> = views.iter().map(|v| v.height).collect();
    assert_eq!(sizes, vec![32, 32, 16, 16, 16]);
    // An empty image does not panic.
    assert_eq!(
        aug.views(&RgbImage::new(0, 0), &mut sample_rng(0, 0, 0))
            .len(),
        5
    );
}

#[test]
fn views_depend_only_on_seed_epoch_index() {
    let aug = DataAugmentationDINO::new(DinoAugConfig {
        local_crops_number: 2,
        ..DinoAugConfig::default()
    })
    .unwrap();
    let img = photo(120, 100);
    let run = |seed, epoch, i| aug.views(&img, &mut sample_rng(seed, epoch, i));
    let a = run(7, 3, 11);
    assert_eq!(a, run(7, 3, 11));
    assert_ne!(a, run(7, 3, 12));
    assert_ne!(a, run(7, 4, 11));
    assert_ne!(a, run(8, 3, 11));
    // Order and thread count do not matter: in parallel, reversed, equals serial.
    let serial: Vec<_> = (0..12u64).map(|i| run(1, 0, i)).collect();
    let parallel: Vec<_> = (0..12u64)
        .rev()
        .collect::<Vec<_>>()
        .into_par_iter()
        .map(|i| (i, run(1, 0, i)))
        .collect();
    for (i, views) in parallel {
        assert_eq!(views, serial[i as usize], "sample {i}");
    }
    // The RNG streams themselves differ per (seed, epoch, index).
    use rand::RngCore;
    let first = |s, e, i| sample_rng(s, e, i).next_u64();
    let mut seen = std::collections::HashSet::new();
    for s in 0..4 {
        for e in 0..4 {
            for i in 0..64 {
                assert!(seen.insert(first(s, e, i)), "collision at ({s}, {e}, {i})");
            }
        }
    }
}

#[test]
fn sample_params_boxes_fit_and_render() {
    let aug = DataAugmentationDINO::new(DinoAugConfig::default()).unwrap();
    for (w, h) in [(1, 1), (3, 200), (200, 3), (37, 41), (256, 256)] {
        let img = photo(w, h);
        for i in 0..20 {
            let params = aug.sample_params(w as usize, h as usize, &mut sample_rng(5, 0, i));
            for p in &params {
                let c = p.crop;
                assert!(c.width > 0 && c.height > 0);
                assert!(
                    c.left + c.width <= w as usize && c.top + c.height <= h as usize,
                    "{c:?}"
                );
                assert!(aug.render_u8(&img, p).is_ok());
            }
        }
    }
}

#[test]
fn eval_transform_resize_and_centre_crop() {
    let t = EvalTransform::imagenet();
    assert_eq!(t.resized_size(451, 300), (384, 256)); // int(256 * 451 / 300)
    assert_eq!(t.resized_size(300, 451), (256, 384));
    let img = photo(160, 137);
    let (rw, rh) = t.resized_size(160, 137);
    assert_eq!((rw, rh), ((256.0 * 160.0 / 137.0) as usize, 256));
    let resized = pil::resize(&img, rw, rh).unwrap();
    let got = t.render_u8(&img).unwrap();
    let top = ((rh - 224) as f64 / 2.0).round_ties_even() as u32;
    let left = ((rw - 224) as f64 / 2.0).round_ties_even() as u32;
    for y in 0..224u32 {
        for x in 0..224u32 {
            assert_eq!(got.get_pixel(x, y), resized.get_pixel(x + left, y + top));
        }
    }
    let views = t.views(&img, &mut sample_rng(0, 0, 0));
    assert_eq!(views.len(), 1);
    assert_eq!(views[0].data.len(), 3 * 224 * 224);
    assert_eq!(t.num_views(), 1);

    // A crop larger than the resized image is zero-padded around the centre (torchvision CenterCrop).
    let small = EvalTransform::new(8, 12, [0.5; 3], [0.5; 3]).unwrap();
    let img = photo(8, 8);
    let got = small.render_u8(&img).unwrap();
    assert_eq!(got.dimensions(), (12, 12));
    assert_eq!(got.get_pixel(0, 0).0, [0, 0, 0]);
    assert_eq!(got.get_pixel(2, 2), img.get_pixel(0, 0));
    assert_eq!(got.get_pixel(9, 9), img.get_pixel(7, 7));
    assert_eq!(got.get_pixel(10, 10).0, [0, 0, 0]);
}

#[test]
fn config_validation_names_the_field() {
    let bad = [
        DinoAugConfig {
            global_crops_scale: (0.5, 0.4),
            ..DinoAugConfig::default()
        },
        DinoAugConfig {
            local_crop_size: 0,
            ..DinoAugConfig::default()
        },
        DinoAugConfig {
            grayscale_p: 1.5,
            ..DinoAugConfig::default()
        },
        DinoAugConfig {
            hue: 0.7,
            ..DinoAugConfig::default()
        },
        DinoAugConfig {
            std: [0.2, 0.0, 0.2],
            ..DinoAugConfig::default()
        },
    ];
    let names = [
        "global_crops_scale",
        "crop sizes",
        "grayscale_p",
        "hue",
        "std",
    ];
    for (cfg, name) in bad.into_iter().zip(names) {
        let err = DataAugmentationDINO::new(cfg).unwrap_err().to_string();
        assert!(err.contains(name), "{err}");
    }
    let grey = DinoAugConfig::default().with_grey_normalization(0.2860, 0.3530);
    assert_eq!(grey.mean, [0.2860; 3]);
    assert!(DataAugmentationDINO::new(grey).is_ok());
}
