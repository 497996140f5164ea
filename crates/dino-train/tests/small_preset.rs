//! The `small` preset's data fitting: sizes from the images' median side, normalisation measured per channel
//! (checked against a direct computation over the same images), on the embedded Fashion-MNIST (28 px grey),
//! the CIFAR-10 PNGs (32 px colour) and the photos (large: capped at the preset's maximum side).

use std::path::PathBuf;

use dino_train::config::DatasetKind;
use dino_train::data::{data_stats, fit_to_data, open_train, SMALL_MAX_SIDE};
use dino_train::TrainConfig;

fn shared(p: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../../../shared/data")
        .join(p)
}

#[test]
fn fits_sizes_and_normalisation_to_the_data() {
    // Embedded Fashion-MNIST: 28 px -> the default preset's geometry; mean / std near the dataset's constants.
    let mut cfg = TrainConfig {
        dataset: DatasetKind::Embedded,
        ..TrainConfig::small_data()
    };
    let st = fit_to_data(&mut cfg).unwrap();
    assert_eq!((st.images, st.side), (2000, 28));
    let d = TrainConfig::default_preset();
    assert_eq!(
        (
            cfg.img_size,
            cfg.patch_size,
            cfg.global_crops_size,
            cfg.local_crops_size
        ),
        (
            d.img_size,
            d.patch_size,
            d.global_crops_size,
            d.local_crops_size
        )
    );
    assert_eq!((cfg.eval_resize, cfg.eval_crop), (28, 28));
    for c in 0..3 {
        assert!(
            (cfg.norm_mean[c] - 0.2860).abs() < 0.01,
            "{:?}",
            cfg.norm_mean
        );
        assert!(
            (cfg.norm_std[c] - 0.3530).abs() < 0.01,
            "{:?}",
            cfg.norm_std
        );
    }
    cfg.validate().unwrap();

    // CIFAR-10 PNG folder: 32 px colour, statistics equal to a direct computation over the 20 images.
    let mut cfg = TrainConfig {
        data_path: shared("cifar10-test20/png"),
        ..TrainConfig::small_data()
    };
    let st = fit_to_data(&mut cfg).unwrap();
    assert_eq!(
        (st.images, st.side, cfg.patch_size, cfg.local_crops_size),
        (20, 32, 8, 16)
    );
    let ds = open_train(&cfg).unwrap();
    let mut sum = [0f64; 3];
    let mut n = 0f64;
    for i in 0..ds.len() {
        for p in ds.get(i).unwrap().pixels() {
            for (acc, &v) in sum.iter_mut().zip(&p.0) {
                *acc += v as f64 / 255.0;
            }
            n += 1.0;
        }
    }
    for (m, s) in cfg.norm_mean.iter().zip(&sum) {
        assert!((*m as f64 - s / n).abs() < 1e-5);
    }
    assert!(
        cfg.norm_mean[0] != cfg.norm_mean[2],
        "colour channels differ"
    );
    cfg.validate().unwrap();

    // Large photos: trained at the preset's maximum side.
    let mut cfg = TrainConfig {
        data_path: shared("photos"),
        ..TrainConfig::small_data()
    };
    let st = fit_to_data(&mut cfg).unwrap();
    assert!(st.side > SMALL_MAX_SIDE);
    assert_eq!(
        (cfg.global_crops_size, cfg.patch_size),
        (SMALL_MAX_SIDE, SMALL_MAX_SIDE / 4)
    );
    cfg.validate().unwrap();

    // No images: one error naming the path.
    let empty = tempfile::tempdir().unwrap();
    let cfg = TrainConfig {
        data_path: empty.path().to_path_buf(),
        ..TrainConfig::small_data()
    };
    let e = data_stats(&cfg, 10).unwrap_err().to_string();
    assert!(e.contains(&empty.path().display().to_string()), "{e}");
}
