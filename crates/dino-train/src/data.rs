//! The training and validation datasets a [`TrainConfig`] names (image folder, CIFAR, IDX, or the embedded
//! Fashion-MNIST subset), the transforms built from it, and the dataset fingerprint checked on resume.
//!
//! The embedded dataset (`assets/fashion-mnist`, MIT licence, see its README) is 5,000 training and 1,000
//! test images of Fashion-MNIST compiled into the library with `include_bytes!`; it is unpacked once into a
//! folder of the system temp directory and read with dino-data's IDX reader.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use dino_data::augment::{DataAugmentationDINO, DinoAugConfig, EvalTransform};
use dino_data::dataset::{open_dataset, Dataset, DatasetKind as DataKind, Split, Subset};
use dino_data::Transform;

use crate::checkpoint::{DatasetFingerprint, Fnv64};
use crate::config::{DatasetKind, TrainConfig};
use crate::error::{Error, Result};

/// The embedded Fashion-MNIST subset: (file name, gzipped IDX bytes).
pub const EMBEDDED_FILES: [(&str, &[u8]); 4] = [
    (
        "train-images-idx3-ubyte.gz",
        include_bytes!("../assets/fashion-mnist/train-images-idx3-ubyte.gz"),
    ),
    (
        "train-labels-idx1-ubyte.gz",
        include_bytes!("../assets/fashion-mnist/train-labels-idx1-ubyte.gz"),
    ),
    (
        "t10k-images-idx3-ubyte.gz",
        include_bytes!("../assets/fashion-mnist/t10k-images-idx3-ubyte.gz"),
    ),
    (
        "t10k-labels-idx1-ubyte.gz",
        include_bytes!("../assets/fashion-mnist/t10k-labels-idx1-ubyte.gz"),
    ),
];

/// Fashion-MNIST's per-channel mean and std (grey replicated to RGB).
pub const FASHION_MNIST_MEAN_STD: (f32, f32) = (0.2860, 0.3530);

/// Unpack the embedded dataset (once) and return its folder.
pub fn embedded_dir() -> Result<PathBuf> {
    let mut h = Fnv64::default();
    for (n, b) in EMBEDDED_FILES {
        h.update(n.as_bytes());
        h.update(&(b.len() as u64).to_le_bytes());
    }
    let dir = std::env::temp_dir().join(format!("dino-rs-embedded-fashion-mnist-{}", h.hex()));
    std::fs::create_dir_all(&dir).map_err(|e| Error::io(&dir, e))?;
    for (name, bytes) in EMBEDDED_FILES {
        let path = dir.join(name);
        if std::fs::metadata(&path)
            .map(|m| m.len() == bytes.len() as u64)
            .unwrap_or(false)
        {
            continue;
        }
        // Unique temporary name: several processes may unpack at once.
        static COUNTER: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
        let n = COUNTER.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let tmp = dir.join(format!("{name}.{}.{n}.tmp", std::process::id()));
        let written = std::fs::write(&tmp, bytes)
            .map_err(|e| Error::io(&tmp, e))
            .and_then(|()| std::fs::rename(&tmp, &path).map_err(|e| Error::io(&path, e)));
        if let Err(e) = written {
            // A full disk: do not keep the partial file.
            let _ = std::fs::remove_file(&tmp);
            return Err(e);
        }
    }
    Ok(dir)
}

fn data_kind(kind: DatasetKind) -> DataKind {
    match kind {
        DatasetKind::Folder => DataKind::ImageFolder,
        DatasetKind::Cifar10 => DataKind::Cifar10,
        DatasetKind::Cifar100 => DataKind::Cifar100,
        DatasetKind::FashionMnist | DatasetKind::Mnist | DatasetKind::Embedded => DataKind::Idx,
    }
}

fn root(cfg: &TrainConfig) -> Result<PathBuf> {
    if cfg.dataset == DatasetKind::Embedded {
        return embedded_dir();
    }
    if !cfg.data_path.exists() {
        return Err(Error::config(
            "data_path",
            cfg.data_path.display(),
            format!("does not exist (dataset kind {})", cfg.dataset.name()),
        ));
    }
    Ok(cfg.data_path.clone())
}

/// The training dataset of `cfg` (the first `max_train_images` when set).
pub fn open_train(cfg: &TrainConfig) -> Result<Arc<dyn Dataset>> {
    let path = root(cfg)?;
    let ds = open_dataset(&path, Some(data_kind(cfg.dataset)), Split::Train)?;
    Ok(limit(ds, cfg.max_train_images))
}

/// The labelled validation split of `cfg`, if any: `val_data_path` for image folders, the test files for
/// CIFAR / IDX / embedded data. Limited to `eval_max_val` images when set.
pub fn open_val(cfg: &TrainConfig) -> Result<Option<Arc<dyn Dataset>>> {
    let ds = match cfg.dataset {
        DatasetKind::Folder => match &cfg.val_data_path {
            None => return Ok(None),
            Some(p) => {
                if !p.exists() {
                    return Err(Error::config(
                        "val_data_path",
                        p.display(),
                        "does not exist",
                    ));
                }
                open_dataset(p, Some(DataKind::ImageFolder), Split::Test)?
            }
        },
        _ => open_dataset(&root(cfg)?, Some(data_kind(cfg.dataset)), Split::Test)?,
    };
    Ok(Some(limit(ds, cfg.eval_max_val)))
}

/// The k-NN bank: the training data (first `eval_max_train` images when set), if it is labelled.
pub fn open_bank(cfg: &TrainConfig) -> Result<Option<Arc<dyn Dataset>>> {
    let path = root(cfg)?;
    let ds = open_dataset(&path, Some(data_kind(cfg.dataset)), Split::Train)?;
    if ds.is_empty() || ds.label(0).is_none() {
        return Ok(None);
    }
    Ok(Some(limit(ds, cfg.eval_max_train)))
}

fn limit(ds: Arc<dyn Dataset>, n: usize) -> Arc<dyn Dataset> {
    if n == 0 || n >= ds.len() {
        ds
    } else {
        Arc::new(Subset::first(ds, n))
    }
}

/// The multi-crop augmentation of `cfg`.
pub fn augmentation(cfg: &TrainConfig) -> Result<Arc<dyn Transform>> {
    let aug = DinoAugConfig {
        global_crops_scale: (cfg.global_crops_scale[0], cfg.global_crops_scale[1]),
        local_crops_scale: (cfg.local_crops_scale[0], cfg.local_crops_scale[1]),
        local_crops_number: cfg.local_crops_number,
        global_crop_size: cfg.global_crops_size,
        local_crop_size: cfg.local_crops_size,
        blur_sigma: (cfg.blur_sigma[0], cfg.blur_sigma[1]),
        ratio: (cfg.crops_ratio[0], cfg.crops_ratio[1]),
        color_jitter_p: cfg.color_jitter_p,
        global1_blur_p: cfg.blur_p[0],
        global2_blur_p: cfg.blur_p[1],
        local_blur_p: cfg.blur_p[2],
        global2_solarize_p: cfg.solarize_p,
        mean: cfg.norm_mean,
        std: cfg.norm_std,
        ..DinoAugConfig::default()
    };
    Ok(Arc::new(DataAugmentationDINO::new(aug)?))
}

/// The evaluation transform of `cfg` (resize of the shorter side, centre crop, normalise).
pub fn eval_transform(cfg: &TrainConfig) -> Result<Arc<dyn Transform>> {
    Ok(Arc::new(EvalTransform::new(
        cfg.eval_resize,
        cfg.eval_crop,
        cfg.norm_mean,
        cfg.norm_std,
    )?))
}

/// A cheap identity of `ds`: length plus a hash of the pixels and labels of up to 16 evenly spaced images.
pub fn fingerprint(ds: &dyn Dataset, description: &str) -> Result<DatasetFingerprint> {
    let n = ds.len();
    let mut h = Fnv64::default();
    h.update(&(n as u64).to_le_bytes());
    let picks = n.min(16);
    for k in 0..picks {
        let i = k * n / picks;
        match ds.get(i) {
            Ok(img) => {
                h.update(&img.width().to_le_bytes());
                h.update(&img.height().to_le_bytes());
                h.update(img.as_raw());
            }
            Err(_) => h.update(b"unreadable"),
        }
        h.update(&(ds.label(i).map(|l| l as i64).unwrap_or(-1)).to_le_bytes());
    }
    Ok(DatasetFingerprint {
        description: description.to_string(),
        len: n,
        hash: h.hex(),
    })
}

/// A description of the training data of `cfg` for logs and checkpoints.
pub fn describe(cfg: &TrainConfig, ds: &dyn Dataset) -> String {
    let place: &Path = &cfg.data_path;
    match cfg.dataset {
        DatasetKind::Embedded => format!("embedded Fashion-MNIST subset ({})", ds.describe()),
        k => format!("{} at {} ({})", k.name(), place.display(), ds.describe()),
    }
}

/// What [`fit_to_data`] measured on the training images.
#[derive(Debug, Clone, PartialEq)]
pub struct DataStats {
    /// Images read (evenly spaced over the dataset, unreadable ones skipped).
    pub images: usize,
    /// Median of the shorter sides, pixels.
    pub side: usize,
    /// Per-channel mean of the RGB values in [0, 1].
    pub mean: [f32; 3],
    /// Per-channel standard deviation of the RGB values in [0, 1].
    pub std: [f32; 3],
}

/// Largest image side the `small` preset trains at: bigger images are resized to it.
pub const SMALL_MAX_SIDE: usize = 64;

/// Measure the training data of `cfg` (up to `max_images` images, evenly spaced): median shorter side and
/// per-channel mean / std.
pub fn data_stats(cfg: &TrainConfig, max_images: usize) -> Result<DataStats> {
    let ds = open_train(cfg)?;
    let n = ds.len();
    if n == 0 {
        return Err(Error::config(
            "data_path",
            cfg.data_path.display(),
            "holds no images",
        ));
    }
    let take = n.min(max_images.max(1));
    let mut sides = Vec::with_capacity(take);
    let (mut sum, mut sq, mut count) = ([0f64; 3], [0f64; 3], 0f64);
    for k in 0..take {
        let i = k * n / take;
        let Ok(img) = ds.get(i) else { continue };
        sides.push(img.width().min(img.height()) as usize);
        for p in img.pixels() {
            for c in 0..3 {
                let v = p.0[c] as f64 / 255.0;
                sum[c] += v;
                sq[c] += v * v;
            }
        }
        count += (img.width() * img.height()) as f64;
    }
    if sides.is_empty() {
        return Err(Error::config(
            "data_path",
            cfg.data_path.display(),
            format!("none of the {take} images read to measure it could be decoded"),
        ));
    }
    sides.sort_unstable();
    let mean = sum.map(|s| (s / count) as f32);
    let mut std = [0f32; 3];
    for c in 0..3 {
        let m = sum[c] / count;
        // A constant channel would divide by 0: keep a floor.
        std[c] = ((sq[c] / count - m * m).max(0.0).sqrt() as f32).max(1e-3);
    }
    Ok(DataStats {
        images: sides.len(),
        side: sides[sides.len() / 2],
        mean,
        std,
    })
}

/// Fit the size and normalisation keys of `cfg` (the `small` preset) to its training data: train and
/// evaluate at the images' median shorter side `s` (at most [`SMALL_MAX_SIDE`], rounded down to a
/// multiple of 4): global crops `s`, local crops `s / 2`, ViT patch `s / 4` (a 4 x 4 grid, the cost of the
/// 28 px recipe at any size), evaluation resize and crop `s`; mean / std measured per channel. Returns the
/// statistics, for the log.
pub fn fit_to_data(cfg: &mut TrainConfig) -> Result<DataStats> {
    let st = data_stats(cfg, 2000)?;
    let s = (st.side.min(SMALL_MAX_SIDE) / 4 * 4).max(8);
    cfg.img_size = s;
    cfg.patch_size = s / 4;
    cfg.global_crops_size = s;
    cfg.local_crops_size = s / 2;
    cfg.eval_resize = s;
    cfg.eval_crop = s;
    cfg.norm_mean = st.mean;
    cfg.norm_std = st.std;
    Ok(st)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn augmentation_receives_the_crops_ratio() {
        // An inverted range passes through to DinoAugConfig's own check only if the key is forwarded.
        let cfg = TrainConfig {
            crops_ratio: [2.0, 1.0],
            ..TrainConfig::default_preset()
        };
        let err = augmentation(&cfg)
            .err()
            .expect("an inverted ratio range is refused");
        assert!(err.to_string().contains("ratio = (2, 1)"), "{err}");
        let cfg = TrainConfig {
            crops_ratio: [1.0, 1.0],
            ..TrainConfig::default_preset()
        };
        augmentation(&cfg).unwrap();
    }

    #[test]
    fn augmentation_receives_the_jitter_blur_and_solarize_probabilities() {
        // Each key reaches its DinoAugConfig field: a value that is not a probability (which
        // TrainConfig::validate would refuse first) is refused by the augmentation under the field's name.
        let base = TrainConfig::default_preset;
        for (cfg, field) in [
            (
                TrainConfig {
                    color_jitter_p: 1.5,
                    ..base()
                },
                "color_jitter_p = 1.5",
            ),
            (
                TrainConfig {
                    blur_p: [1.5, 0.1, 0.5],
                    ..base()
                },
                "global1_blur_p = 1.5",
            ),
            (
                TrainConfig {
                    blur_p: [1.0, 1.5, 0.5],
                    ..base()
                },
                "global2_blur_p = 1.5",
            ),
            (
                TrainConfig {
                    blur_p: [1.0, 0.1, 1.5],
                    ..base()
                },
                "local_blur_p = 1.5",
            ),
            (
                TrainConfig {
                    solarize_p: 1.5,
                    ..base()
                },
                "global2_solarize_p = 1.5",
            ),
        ] {
            let err = augmentation(&cfg).err().expect("refused");
            assert!(err.to_string().contains(field), "{field}: {err}");
            assert!(
                cfg.validate().is_err(),
                "{field}: TrainConfig::validate refuses it too"
            );
        }
        let cfg = TrainConfig {
            color_jitter_p: 0.0,
            blur_p: [0.0, 0.0, 0.0],
            solarize_p: 0.0,
            ..base()
        };
        cfg.validate().unwrap();
        augmentation(&cfg).unwrap();
    }
}
