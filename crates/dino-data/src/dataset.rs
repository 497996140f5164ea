//! The `Dataset` trait (length, image by index, optional label, class names), in-memory helpers
//! (`InMemoryDataset`, `Subset`) and `open_dataset`, which opens a path as an image folder, CIFAR-10/100
//! binary batches or IDX files, detecting the kind from the path when it is not given.

use std::fmt;
use std::path::Path;
use std::str::FromStr;
use std::sync::Arc;

use image::RgbImage;

use crate::cifar::{CifarDataset, CifarKind};
use crate::error::{Error, Result};
use crate::folder::ImageFolder;
use crate::idx::IdxDataset;

/// A random-access dataset of RGB images with optional integer labels.
///
/// Implementations decode lazily in [`Dataset::get`] and must be cheap to share between threads.
pub trait Dataset: Send + Sync {
    /// Number of samples.
    fn len(&self) -> usize;

    /// Whether the dataset holds no samples.
    fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The image of sample `index`, converted to 8-bit RGB.
    fn get(&self, index: usize) -> Result<RgbImage>;

    /// The label of sample `index`, if the dataset is labelled (and `index` is in range).
    fn label(&self, index: usize) -> Option<usize>;

    /// The class names, indexed by label, when known.
    fn class_names(&self) -> Option<&[String]>;

    /// A short name for logs ("cifar10", "image-folder", ...).
    fn name(&self) -> &str;

    /// Where sample `index` comes from (a file path, or `file#record`), for warnings.
    fn source(&self, index: usize) -> String {
        format!("{}[{index}]", self.name())
    }

    /// A one-line description for logs: name, length and number of classes.
    fn describe(&self) -> String {
        match self.class_names() {
            Some(c) => format!(
                "{}: {} images, {} classes",
                self.name(),
                self.len(),
                c.len()
            ),
            None if self.len() > 0 && self.label(0).is_some() => {
                format!("{}: {} labelled images", self.name(), self.len())
            }
            None => format!("{}: {} unlabelled images", self.name(), self.len()),
        }
    }
}

impl<D: Dataset + ?Sized> Dataset for Arc<D> {
    fn len(&self) -> usize {
        (**self).len()
    }
    fn get(&self, index: usize) -> Result<RgbImage> {
        (**self).get(index)
    }
    fn label(&self, index: usize) -> Option<usize> {
        (**self).label(index)
    }
    fn class_names(&self) -> Option<&[String]> {
        (**self).class_names()
    }
    fn name(&self) -> &str {
        (**self).name()
    }
    fn source(&self, index: usize) -> String {
        (**self).source(index)
    }
    fn describe(&self) -> String {
        (**self).describe()
    }
}

impl<D: Dataset + ?Sized> Dataset for Box<D> {
    fn len(&self) -> usize {
        (**self).len()
    }
    fn get(&self, index: usize) -> Result<RgbImage> {
        (**self).get(index)
    }
    fn label(&self, index: usize) -> Option<usize> {
        (**self).label(index)
    }
    fn class_names(&self) -> Option<&[String]> {
        (**self).class_names()
    }
    fn name(&self) -> &str {
        (**self).name()
    }
    fn source(&self, index: usize) -> String {
        (**self).source(index)
    }
    fn describe(&self) -> String {
        (**self).describe()
    }
}

/// The error for an out-of-range `index` into `ds`.
pub(crate) fn out_of_range(ds: &(impl Dataset + ?Sized), index: usize) -> Error {
    Error::IndexOutOfRange {
        dataset: ds.name().to_string(),
        index,
        len: ds.len(),
    }
}

/// Images held in memory, with optional labels and class names (tests, benches, small data sets).
#[derive(Debug, Clone)]
pub struct InMemoryDataset {
    name: String,
    images: Vec<RgbImage>,
    labels: Option<Vec<usize>>,
    class_names: Option<Vec<String>>,
}

impl InMemoryDataset {
    /// A dataset over `images`; `labels`, when given, must have one entry per image.
    pub fn new(
        name: impl Into<String>,
        images: Vec<RgbImage>,
        labels: Option<Vec<usize>>,
    ) -> Result<Self> {
        let name = name.into();
        if let Some(l) = &labels {
            if l.len() != images.len() {
                return Err(Error::InvalidArgument(format!(
                    "in-memory dataset '{name}': {} labels for {} images",
                    l.len(),
                    images.len()
                )));
            }
        }
        Ok(Self {
            name,
            images,
            labels,
            class_names: None,
        })
    }

    /// Attach class names (indexed by label).
    pub fn with_class_names(mut self, names: Vec<String>) -> Self {
        self.class_names = Some(names);
        self
    }
}

impl Dataset for InMemoryDataset {
    fn len(&self) -> usize {
        self.images.len()
    }
    fn get(&self, index: usize) -> Result<RgbImage> {
        self.images
            .get(index)
            .cloned()
            .ok_or_else(|| out_of_range(self, index))
    }
    fn label(&self, index: usize) -> Option<usize> {
        self.labels.as_ref().and_then(|l| l.get(index).copied())
    }
    fn class_names(&self) -> Option<&[String]> {
        self.class_names.as_deref()
    }
    fn name(&self) -> &str {
        &self.name
    }
}

/// A view onto some samples of another dataset, in the given order (a limit, a split, a fixed subset).
#[derive(Clone)]
pub struct Subset {
    inner: Arc<dyn Dataset>,
    indices: Vec<usize>,
    name: String,
}

impl fmt::Debug for Subset {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Subset")
            .field("inner", &self.inner.name())
            .field("len", &self.indices.len())
            .finish()
    }
}

impl Subset {
    /// The samples `indices` of `inner` (each must be `< inner.len()`).
    pub fn new(inner: Arc<dyn Dataset>, indices: Vec<usize>) -> Result<Self> {
        if let Some(&bad) = indices.iter().find(|&&i| i >= inner.len()) {
            return Err(out_of_range(&inner, bad));
        }
        let name = format!("{}[subset of {}]", inner.name(), indices.len());
        Ok(Self {
            inner,
            indices,
            name,
        })
    }

    /// The first `min(n, inner.len())` samples of `inner`.
    pub fn first(inner: Arc<dyn Dataset>, n: usize) -> Self {
        let n = n.min(inner.len());
        let name = format!("{}[:{n}]", inner.name());
        Self {
            inner,
            indices: (0..n).collect(),
            name,
        }
    }

    /// The index in the underlying dataset of sample `index`.
    pub fn inner_index(&self, index: usize) -> Option<usize> {
        self.indices.get(index).copied()
    }
}

impl Dataset for Subset {
    fn len(&self) -> usize {
        self.indices.len()
    }
    fn get(&self, index: usize) -> Result<RgbImage> {
        match self.indices.get(index) {
            Some(&i) => self.inner.get(i),
            None => Err(out_of_range(self, index)),
        }
    }
    fn label(&self, index: usize) -> Option<usize> {
        self.indices.get(index).and_then(|&i| self.inner.label(i))
    }
    fn class_names(&self) -> Option<&[String]> {
        self.inner.class_names()
    }
    fn name(&self) -> &str {
        &self.name
    }
    fn source(&self, index: usize) -> String {
        match self.indices.get(index) {
            Some(&i) => self.inner.source(i),
            None => format!("{}[{index}]", self.name),
        }
    }
}

/// Which split of a dataset to open (CIFAR and IDX directories hold both; image folders ignore it).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Split {
    /// The training split (`data_batch_*.bin`, `train.bin`, `train-*-ubyte`). Default.
    #[default]
    Train,
    /// The test split (`test_batch.bin`, `test.bin`, `t10k-*-ubyte`).
    Test,
}

/// The on-disk formats `open_dataset` understands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DatasetKind {
    /// A folder of images: class sub-folders (ImageNet layout) or a flat folder of unlabelled images.
    ImageFolder,
    /// CIFAR-10 binary batches (3073-byte records).
    Cifar10,
    /// CIFAR-100 binary batches (3074-byte records: coarse label, fine label, pixels).
    Cifar100,
    /// IDX image + label files (MNIST, Fashion-MNIST), gzipped or not.
    Idx,
}

impl FromStr for DatasetKind {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        match s.to_ascii_lowercase().replace(['_', ' '], "-").as_str() {
            "folder" | "image-folder" | "imagefolder" | "imagenet" => Ok(Self::ImageFolder),
            "cifar10" | "cifar-10" => Ok(Self::Cifar10),
            "cifar100" | "cifar-100" => Ok(Self::Cifar100),
            "idx" | "mnist" | "fashion-mnist" | "fmnist" => Ok(Self::Idx),
            other => Err(Error::InvalidArgument(format!(
                "unknown dataset kind '{other}' (expected folder, cifar10, cifar100 or idx)"
            ))),
        }
    }
}

impl fmt::Display for DatasetKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::ImageFolder => "folder",
            Self::Cifar10 => "cifar10",
            Self::Cifar100 => "cifar100",
            Self::Idx => "idx",
        })
    }
}

fn is_idx_name(name: &str) -> bool {
    name.contains("-ubyte")
        || name.contains(".idx")
        || name.ends_with("idx3")
        || name.contains("idx3-")
}

fn cifar_kind_of_file(name: &str) -> Option<DatasetKind> {
    if name.starts_with("data_batch") || name.starts_with("test_batch") {
        Some(DatasetKind::Cifar10)
    } else if name == "train.bin" || name == "test.bin" {
        Some(DatasetKind::Cifar100)
    } else {
        None
    }
}

impl DatasetKind {
    /// Detect the kind of `path`: a CIFAR batch file (or a folder holding `data_batch_*.bin`/`test_batch.bin`
    /// for CIFAR-10, `train.bin`/`test.bin` for CIFAR-100), IDX files (`*-ubyte[.gz]`), otherwise an image folder.
    pub fn detect(path: &Path) -> Result<Self> {
        let meta = std::fs::metadata(path).map_err(|e| Error::io(path, e))?;
        let lower = |p: &Path| {
            p.file_name()
                .map(|n| n.to_string_lossy().to_ascii_lowercase())
                .unwrap_or_default()
        };
        if meta.is_file() {
            let name = lower(path);
            if let Some(k) = cifar_kind_of_file(&name) {
                return Ok(k);
            }
            if is_idx_name(&name) {
                return Ok(Self::Idx);
            }
            if name.ends_with(".bin") {
                // Decide by record length.
                let size = meta.len();
                return Ok(if size % 3073 == 0 {
                    Self::Cifar10
                } else {
                    Self::Cifar100
                });
            }
            return Err(Error::InvalidArgument(format!(
                "cannot tell the dataset kind of file {} (expected a CIFAR .bin batch or an IDX *-ubyte file; \
                 image datasets are folders)",
                path.display()
            )));
        }
        let rd = std::fs::read_dir(path).map_err(|e| Error::io(path, e))?;
        let mut names = Vec::new();
        for entry in rd {
            let entry = entry.map_err(|e| Error::io(path, e))?;
            names.push(entry.file_name().to_string_lossy().to_ascii_lowercase());
        }
        if let Some(k) = names.iter().find_map(|n| cifar_kind_of_file(n)) {
            return Ok(k);
        }
        if names.iter().any(|n| is_idx_name(n)) {
            return Ok(Self::Idx);
        }
        Ok(Self::ImageFolder)
    }
}

/// Open `path` as a dataset of `kind` (detected from the path when `None`), `split` selecting the CIFAR/IDX files.
pub fn open_dataset(
    path: &Path,
    kind: Option<DatasetKind>,
    split: Split,
) -> Result<Arc<dyn Dataset>> {
    let kind = match kind {
        Some(k) => k,
        None => DatasetKind::detect(path)?,
    };
    let is_file = path.is_file();
    Ok(match kind {
        DatasetKind::ImageFolder => Arc::new(ImageFolder::open(path)?),
        DatasetKind::Cifar10 | DatasetKind::Cifar100 => {
            let ck = if kind == DatasetKind::Cifar10 {
                CifarKind::Cifar10
            } else {
                CifarKind::Cifar100
            };
            if is_file {
                Arc::new(CifarDataset::open_files(ck, &[path.to_path_buf()])?)
            } else {
                Arc::new(CifarDataset::open_dir(ck, path, split)?)
            }
        }
        DatasetKind::Idx => {
            if is_file {
                Arc::new(IdxDataset::open_images(path)?)
            } else {
                Arc::new(IdxDataset::open_dir(path, split)?)
            }
        }
    })
}
