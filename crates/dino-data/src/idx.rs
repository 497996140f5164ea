//! IDX files (MNIST, Fashion-MNIST): big-endian header `00 00 08 <ndim>`, `ndim` u32 dimensions, then u8 data.
//! Images are `(N, H, W)` greyscale, labels `(N,)`. Files may be gzipped (detected from the gzip magic bytes, not
//! the extension). Grey is replicated to RGB, as PIL's `convert("RGB")` does.

use std::io::Read;
use std::path::{Path, PathBuf};

use image::RgbImage;

use crate::dataset::{out_of_range, Dataset, Split};
use crate::error::{Error, Result};

/// Fashion-MNIST class names, by label.
pub const FASHION_MNIST_CLASSES: [&str; 10] = [
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
];

/// A parsed IDX array of u8.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IdxArray {
    /// The dimensions from the header.
    pub dims: Vec<usize>,
    /// The data, row-major, `dims.iter().product()` bytes.
    pub data: Vec<u8>,
}

/// Read the whole file, gunzipping when it starts with the gzip magic `1f 8b`.
fn read_maybe_gz(path: &Path) -> Result<Vec<u8>> {
    let raw = std::fs::read(path).map_err(|e| Error::io(path, e))?;
    if raw.len() >= 2 && raw[0] == 0x1f && raw[1] == 0x8b {
        let mut out = Vec::with_capacity(raw.len() * 2);
        flate2::read::MultiGzDecoder::new(raw.as_slice())
            .read_to_end(&mut out)
            .map_err(|e| Error::io(path, e))?;
        Ok(out)
    } else {
        Ok(raw)
    }
}

/// Parse an IDX file of unsigned bytes (type 0x08). Errors name the file: wrong magic, unsupported element
/// type, data shorter or longer than the header says, truncated gzip stream.
pub fn read_idx(path: &Path) -> Result<IdxArray> {
    let bytes = read_maybe_gz(path)?;
    let fmt_err = |reason: String| Error::IdxFormat {
        path: path.to_path_buf(),
        reason,
    };
    if bytes.len() < 4 {
        return Err(fmt_err(format!(
            "{} bytes, shorter than the 4-byte magic number",
            bytes.len()
        )));
    }
    let magic = [bytes[0], bytes[1], bytes[2], bytes[3]];
    if magic[0] != 0 || magic[1] != 0 || magic[3] == 0 {
        return Err(Error::IdxMagic {
            path: path.to_path_buf(),
            found: magic,
        });
    }
    if magic[2] != 0x08 {
        return Err(match magic[2] {
            0x09 | 0x0b | 0x0c | 0x0d | 0x0e => fmt_err(format!(
                "element type 0x{:02x} is not supported (only unsigned bytes, 0x08)",
                magic[2]
            )),
            _ => Error::IdxMagic {
                path: path.to_path_buf(),
                found: magic,
            },
        });
    }
    let ndim = magic[3] as usize;
    let header = 4 + 4 * ndim;
    if bytes.len() < header {
        return Err(fmt_err(format!(
            "{} bytes, shorter than the {header}-byte header of a {ndim}-d array",
            bytes.len()
        )));
    }
    let dims: Vec<usize> = bytes[4..header]
        .chunks_exact(4)
        .map(|c| u32::from_be_bytes([c[0], c[1], c[2], c[3]]) as usize)
        .collect();
    let n = dims
        .iter()
        .try_fold(1usize, |a, &d| a.checked_mul(d))
        .ok_or_else(|| fmt_err(format!("dimensions {dims:?} overflow")))?;
    let have = bytes.len() - header;
    if have != n {
        return Err(fmt_err(format!(
            "header dimensions {dims:?} need {n} data bytes, the file holds {have}"
        )));
    }
    let mut data = bytes;
    data.drain(..header);
    Ok(IdxArray { dims, data })
}

/// Greyscale images from an IDX file, with labels from a second IDX file when given.
#[derive(Debug, Clone)]
pub struct IdxDataset {
    images: Vec<u8>,
    height: usize,
    width: usize,
    labels: Option<Vec<usize>>,
    class_names: Option<Vec<String>>,
    path: PathBuf,
    name: String,
}

/// The first of `names` (tried with and without `.gz`) that exists in `dir`.
fn find_in(dir: &Path, names: &[&str]) -> Option<PathBuf> {
    names.iter().find_map(|n| {
        [dir.join(n), dir.join(format!("{n}.gz"))]
            .into_iter()
            .find(|p| p.is_file())
    })
}

impl IdxDataset {
    /// Images from `images` (an `(N, H, W)` IDX file) and labels from `labels` (an `(N,)` IDX file).
    pub fn open(images: &Path, labels: Option<&Path>) -> Result<Self> {
        let arr = read_idx(images)?;
        if arr.dims.len() != 3 {
            return Err(Error::IdxFormat {
                path: images.to_path_buf(),
                reason: format!(
                    "an image file must be 3-d (N, H, W), found dims {:?}",
                    arr.dims
                ),
            });
        }
        let (n, height, width) = (arr.dims[0], arr.dims[1], arr.dims[2]);
        if height == 0 || width == 0 {
            return Err(Error::IdxFormat {
                path: images.to_path_buf(),
                reason: format!("empty images of size {height}x{width}"),
            });
        }
        let labels = match labels {
            None => None,
            Some(lp) => {
                let la = read_idx(lp)?;
                if la.dims.len() != 1 || la.dims[0] != n {
                    return Err(Error::IdxFormat {
                        path: lp.to_path_buf(),
                        reason: format!(
                            "a label file must be 1-d with {n} entries (one per image of {}), found dims {:?}",
                            images.display(),
                            la.dims
                        ),
                    });
                }
                Some(la.data.iter().map(|&b| b as usize).collect::<Vec<_>>())
            }
        };
        let lower = images.to_string_lossy().to_ascii_lowercase();
        let fashion = lower.contains("fashion") || lower.contains("fmnist");
        let class_names = match &labels {
            Some(l) if l.iter().all(|&x| x < 10) => Some(if fashion {
                FASHION_MNIST_CLASSES
                    .iter()
                    .map(|s| s.to_string())
                    .collect()
            } else {
                (0..10).map(|d| d.to_string()).collect()
            }),
            _ => None,
        };
        let name = if fashion { "fashion-mnist" } else { "idx" };
        Ok(Self {
            images: arr.data,
            height,
            width,
            labels,
            class_names,
            path: images.to_path_buf(),
            name: name.to_string(),
        })
    }

    /// Open an image file and the label file beside it (`*-images-idx3-ubyte*` -> `*-labels-idx1-ubyte*`),
    /// if that exists.
    pub fn open_images(images: &Path) -> Result<Self> {
        let fname = images
            .file_name()
            .unwrap_or_default()
            .to_string_lossy()
            .into_owned();
        let label_name = fname.replace("images-idx3", "labels-idx1");
        let labels = images.with_file_name(label_name);
        let labels = (labels != images && labels.is_file()).then_some(labels);
        Self::open(images, labels.as_deref())
    }

    /// Open the `split` of an MNIST-style folder: `train-images-idx3-ubyte[.gz]` + `train-labels-idx1-ubyte[.gz]`
    /// or `t10k-*` for the test split.
    pub fn open_dir(dir: &Path, split: Split) -> Result<Self> {
        let prefix = match split {
            Split::Train => "train",
            Split::Test => "t10k",
        };
        let img_name = format!("{prefix}-images-idx3-ubyte");
        let lab_name = format!("{prefix}-labels-idx1-ubyte");
        let images = find_in(dir, &[&img_name, &format!("{prefix}-images.idx3-ubyte")])
            .ok_or_else(|| {
                Error::InvalidArgument(format!(
                    "{}: no {img_name}[.gz] for the {split:?} split",
                    dir.display()
                ))
            })?;
        let labels = find_in(dir, &[&lab_name, &format!("{prefix}-labels.idx1-ubyte")]);
        Self::open(&images, labels.as_deref())
    }

    /// Image height and width.
    pub fn image_size(&self) -> (usize, usize) {
        (self.height, self.width)
    }

    /// The raw grey bytes of image `index` (`H * W`, row-major).
    pub fn raw_pixels(&self, index: usize) -> Option<&[u8]> {
        let s = self.height * self.width;
        self.images.get(index * s..(index + 1) * s)
    }

    /// Replace the class names (for example with the MNIST digit names, or when detection guessed wrong).
    pub fn with_class_names(mut self, names: Vec<String>) -> Self {
        self.class_names = Some(names);
        self
    }
}

impl Dataset for IdxDataset {
    fn len(&self) -> usize {
        self.images.len() / (self.height * self.width)
    }
    fn get(&self, index: usize) -> Result<RgbImage> {
        let grey = self
            .raw_pixels(index)
            .ok_or_else(|| out_of_range(self, index))?;
        let mut buf = Vec::with_capacity(grey.len() * 3);
        for &v in grey {
            buf.extend_from_slice(&[v, v, v]);
        }
        RgbImage::from_raw(self.width as u32, self.height as u32, buf).ok_or_else(|| {
            Error::Loader(format!(
                "{}: pixel buffer of wrong size",
                self.source(index)
            ))
        })
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
    fn source(&self, index: usize) -> String {
        format!("{}#{index}", self.path.display())
    }
}
