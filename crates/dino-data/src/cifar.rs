//! CIFAR-10 and CIFAR-100 binary batches (the official "binary version"): fixed-size records with no header.
//! CIFAR-10: 1 label byte + 3072 pixel bytes (R plane, G plane, B plane, each 32x32 row-major) = 3073 bytes.
//! CIFAR-100: coarse label byte, fine label byte, then the same 3072 pixel bytes = 3074 bytes; the fine label
//! is the sample's label. Several batch files are concatenated in the order given; class names come from
//! `batches.meta.txt` (CIFAR-10) or `fine_label_names.txt` / `coarse_label_names.txt` (CIFAR-100) when present.

use std::path::{Path, PathBuf};

use image::RgbImage;

use crate::dataset::{out_of_range, Dataset, Split};
use crate::error::{Error, Result};

/// CIFAR image side in pixels.
pub const CIFAR_SIDE: usize = 32;
/// Pixel bytes per record (3 planes of 32x32).
pub const CIFAR_PIXELS: usize = 3 * CIFAR_SIDE * CIFAR_SIDE;

/// Which CIFAR variant.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CifarKind {
    /// 10 classes, 3073-byte records.
    Cifar10,
    /// 100 fine / 20 coarse classes, 3074-byte records.
    Cifar100,
}

impl CifarKind {
    /// Number of label bytes before the pixels.
    pub fn label_bytes(self) -> usize {
        match self {
            CifarKind::Cifar10 => 1,
            CifarKind::Cifar100 => 2,
        }
    }

    /// Record length in bytes (3073 or 3074).
    pub fn record_len(self) -> usize {
        self.label_bytes() + CIFAR_PIXELS
    }

    /// Number of (fine) classes.
    pub fn num_classes(self) -> usize {
        match self {
            CifarKind::Cifar10 => 10,
            CifarKind::Cifar100 => 100,
        }
    }

    fn name(self) -> &'static str {
        match self {
            CifarKind::Cifar10 => "cifar10",
            CifarKind::Cifar100 => "cifar100",
        }
    }
}

/// CIFAR records held in memory (pixels only: 3072 bytes per image, 184 MB for all 60,000).
#[derive(Debug, Clone)]
pub struct CifarDataset {
    kind: CifarKind,
    pixels: Vec<u8>,
    labels: Vec<usize>,
    coarse_labels: Option<Vec<usize>>,
    class_names: Option<Vec<String>>,
    coarse_class_names: Option<Vec<String>>,
    /// (file, index of its first sample), in order.
    files: Vec<(PathBuf, usize)>,
}

/// Non-empty trimmed lines of a names file, or `None` when the file does not exist.
fn read_names(path: &Path) -> Result<Option<Vec<String>>> {
    match std::fs::read_to_string(path) {
        Ok(s) => Ok(Some(
            s.lines()
                .map(|l| l.trim().to_string())
                .filter(|l| !l.is_empty())
                .collect(),
        )),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(Error::io(path, e)),
    }
}

impl CifarDataset {
    /// Read the batch `files` in order. Errors name the file: unreadable, size not a multiple of the record
    /// length, or a label out of range. Class names are read from the first file's folder when present.
    pub fn open_files(kind: CifarKind, files: &[PathBuf]) -> Result<Self> {
        if files.is_empty() {
            return Err(Error::InvalidArgument(format!(
                "{}: no batch files given",
                kind.name()
            )));
        }
        let rl = kind.record_len();
        let mut pixels = Vec::new();
        let mut labels = Vec::new();
        let mut coarse = Vec::new();
        let mut index = Vec::new();
        for path in files {
            let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
            if bytes.len() % rl != 0 || bytes.is_empty() {
                return Err(Error::CifarSize {
                    path: path.clone(),
                    size: bytes.len() as u64,
                    record_len: rl,
                });
            }
            index.push((path.clone(), labels.len()));
            pixels.reserve(bytes.len() / rl * CIFAR_PIXELS);
            for (r, rec) in bytes.chunks_exact(rl).enumerate() {
                let fine = rec[kind.label_bytes() - 1];
                if fine as usize >= kind.num_classes() {
                    return Err(Error::CifarLabel {
                        path: path.clone(),
                        record: r,
                        label: fine,
                        num_classes: kind.num_classes(),
                    });
                }
                if kind == CifarKind::Cifar100 {
                    if rec[0] >= 20 {
                        return Err(Error::CifarLabel {
                            path: path.clone(),
                            record: r,
                            label: rec[0],
                            num_classes: 20,
                        });
                    }
                    coarse.push(rec[0] as usize);
                }
                labels.push(fine as usize);
                pixels.extend_from_slice(&rec[kind.label_bytes()..]);
            }
        }
        let dir = files[0].parent().unwrap_or(Path::new("."));
        let (class_names, coarse_class_names) = match kind {
            CifarKind::Cifar10 => (read_names(&dir.join("batches.meta.txt"))?, None),
            CifarKind::Cifar100 => (
                read_names(&dir.join("fine_label_names.txt"))?,
                read_names(&dir.join("coarse_label_names.txt"))?,
            ),
        };
        for (names, n, file) in [
            (&class_names, kind.num_classes(), "class names"),
            (&coarse_class_names, 20, "coarse class names"),
        ] {
            if let Some(v) = names {
                if v.len() != n {
                    return Err(Error::InvalidArgument(format!(
                        "{}: {} {file} found next to the batches, expected {n}",
                        dir.display(),
                        v.len()
                    )));
                }
            }
        }
        Ok(Self {
            kind,
            pixels,
            labels,
            coarse_labels: (kind == CifarKind::Cifar100).then_some(coarse),
            class_names,
            coarse_class_names,
            files: index,
        })
    }

    /// Open the `split` of a CIFAR folder: `data_batch_1..5.bin` / `test_batch.bin` (CIFAR-10),
    /// `train.bin` / `test.bin` (CIFAR-100). Missing batches among 1..5 are skipped, but at least one must exist.
    pub fn open_dir(kind: CifarKind, dir: &Path, split: Split) -> Result<Self> {
        let candidates: Vec<PathBuf> = match (kind, split) {
            (CifarKind::Cifar10, Split::Train) => (1..=5)
                .map(|i| dir.join(format!("data_batch_{i}.bin")))
                .collect(),
            (CifarKind::Cifar10, Split::Test) => vec![dir.join("test_batch.bin")],
            (CifarKind::Cifar100, Split::Train) => vec![dir.join("train.bin")],
            (CifarKind::Cifar100, Split::Test) => vec![dir.join("test.bin")],
        };
        let files: Vec<PathBuf> = candidates.iter().filter(|p| p.is_file()).cloned().collect();
        if files.is_empty() {
            return Err(Error::InvalidArgument(format!(
                "{}: no {} {:?} batch files (looked for {})",
                dir.display(),
                kind.name(),
                split,
                candidates
                    .iter()
                    .map(|p| p
                        .file_name()
                        .unwrap_or_default()
                        .to_string_lossy()
                        .into_owned())
                    .collect::<Vec<_>>()
                    .join(", ")
            )));
        }
        Self::open_files(kind, &files)
    }

    /// The variant read.
    pub fn kind(&self) -> CifarKind {
        self.kind
    }

    /// All (fine) labels in sample order.
    pub fn labels(&self) -> &[usize] {
        &self.labels
    }

    /// CIFAR-100 coarse labels (20 superclasses), `None` for CIFAR-10.
    pub fn coarse_labels(&self) -> Option<&[usize]> {
        self.coarse_labels.as_deref()
    }

    /// CIFAR-100 coarse class names when `coarse_label_names.txt` is present.
    pub fn coarse_class_names(&self) -> Option<&[String]> {
        self.coarse_class_names.as_deref()
    }

    /// The 3072 raw pixel bytes (R, G, B planes) of sample `index`.
    pub fn raw_pixels(&self, index: usize) -> Option<&[u8]> {
        self.pixels
            .get(index * CIFAR_PIXELS..(index + 1) * CIFAR_PIXELS)
    }
}

impl Dataset for CifarDataset {
    fn len(&self) -> usize {
        self.labels.len()
    }
    fn get(&self, index: usize) -> Result<RgbImage> {
        let raw = self
            .raw_pixels(index)
            .ok_or_else(|| out_of_range(self, index))?;
        let plane = CIFAR_SIDE * CIFAR_SIDE;
        let (r, rest) = raw.split_at(plane);
        let (g, b) = rest.split_at(plane);
        let mut buf = Vec::with_capacity(CIFAR_PIXELS);
        for ((&r, &g), &b) in r.iter().zip(g).zip(b) {
            buf.extend_from_slice(&[r, g, b]);
        }
        RgbImage::from_raw(CIFAR_SIDE as u32, CIFAR_SIDE as u32, buf).ok_or_else(|| {
            Error::Loader(format!(
                "{}: pixel buffer of wrong size",
                self.source(index)
            ))
        })
    }
    fn label(&self, index: usize) -> Option<usize> {
        self.labels.get(index).copied()
    }
    fn class_names(&self) -> Option<&[String]> {
        self.class_names.as_deref()
    }
    fn name(&self) -> &str {
        self.kind.name()
    }
    fn source(&self, index: usize) -> String {
        let pos = self.files.partition_point(|(_, start)| *start <= index);
        match pos.checked_sub(1).and_then(|p| self.files.get(p)) {
            Some((path, start)) if index < self.len() => {
                format!("{}#{}", path.display(), index - start)
            }
            _ => format!("{}[{index}]", self.name()),
        }
    }
}
