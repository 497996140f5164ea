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
        std::fs::write(&tmp, bytes).map_err(|e| Error::io(&tmp, e))?;
        std::fs::rename(&tmp, &path).map_err(|e| Error::io(&path, e))?;
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
