//! Image folders: the ImageNet layout (one sub-folder per class, classes sorted by name, label = index of the
//! sorted class) like torchvision's `ImageFolder`, and flat folders of unlabelled images. Files are found
//! recursively and sorted like torchvision (`sorted(os.walk(...))`, then sorted file names) so the sample order is
//! reproducible; images are decoded lazily in `get` and converted to RGB (greyscale replicated, alpha dropped,
//! as PIL's `convert("RGB")`).

use std::path::{Path, PathBuf};

use image::RgbImage;

use crate::dataset::{out_of_range, Dataset};
use crate::error::{Error, Result};

/// File extensions read as images (case-insensitive).
pub const IMAGE_EXTENSIONS: &[&str] = &["jpg", "jpeg", "png", "webp", "bmp", "gif", "tif", "tiff"];

/// Whether `path` has one of [`IMAGE_EXTENSIONS`].
pub fn has_image_extension(path: &Path) -> bool {
    path.extension()
        .map(|e| {
            let e = e.to_string_lossy().to_ascii_lowercase();
            IMAGE_EXTENSIONS.contains(&e.as_str())
        })
        .unwrap_or(false)
}

/// How the folder is organised.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum FolderLayout {
    /// Class sub-folders when the root holds sub-folders and no image directly, a flat folder otherwise. Default.
    #[default]
    Auto,
    /// One sub-folder per class (files directly in the root are ignored, as in torchvision).
    Classes,
    /// Every image below the root, unlabelled.
    Flat,
}

/// Decode the image file at `path` into 8-bit RGB (format guessed from the content, not the extension).
pub fn load_rgb(path: &Path) -> Result<RgbImage> {
    let reader = image::ImageReader::open(path)
        .map_err(|e| Error::io(path, e))?
        .with_guessed_format()
        .map_err(|e| Error::io(path, e))?;
    let img = reader.decode().map_err(|e| Error::Image {
        path: path.to_path_buf(),
        // Some decoders end their messages with a newline.
        reason: e
            .to_string()
            .split_whitespace()
            .collect::<Vec<_>>()
            .join(" "),
    })?;
    Ok(match img {
        image::DynamicImage::ImageRgb8(rgb) => rgb,
        other => other.to_rgb8(),
    })
}

/// A folder of image files, labelled by class sub-folder or unlabelled.
#[derive(Debug, Clone)]
pub struct ImageFolder {
    root: PathBuf,
    files: Vec<PathBuf>,
    labels: Option<Vec<usize>>,
    classes: Option<Vec<String>>,
    name: String,
}

/// Visible (not dot-prefixed) entries of `dir`, split into (sub-folders, files), following symlinks.
fn list_dir(dir: &Path) -> Result<(Vec<PathBuf>, Vec<PathBuf>, usize)> {
    let mut dirs = Vec::new();
    let mut files = Vec::new();
    let mut n = 0;
    for entry in std::fs::read_dir(dir).map_err(|e| Error::io(dir, e))? {
        let entry = entry.map_err(|e| Error::io(dir, e))?;
        n += 1;
        let name = entry.file_name();
        if name.to_string_lossy().starts_with('.') {
            continue;
        }
        let path = entry.path();
        // Follow symlinks; skip dangling ones (they are not images we could read anyway).
        match std::fs::metadata(&path) {
            Ok(m) if m.is_dir() => dirs.push(path),
            Ok(m) if m.is_file() => files.push(path),
            Ok(_) => {}
            Err(e) => tracing::warn!("skipping unreadable entry {}: {e}", path.display()),
        }
    }
    Ok((dirs, files, n))
}

/// The identity of a folder (device, inode), following symlinks.
#[cfg(unix)]
fn folder_id(d: &Path) -> Option<(u64, u64)> {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata(d).ok().map(|m| (m.dev(), m.ino()))
}

#[cfg(not(unix))]
fn folder_id(_: &Path) -> Option<(u64, u64)> {
    None
}

/// Every image below `dir`, ordered like torchvision: by directory path, then by file name.
fn walk_images(dir: &Path) -> Result<Vec<PathBuf>> {
    let mut by_dir: Vec<(String, Vec<PathBuf>)> = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    let mut seen = 0usize;
    // Folders reached twice through symlinks (a loop, or two links to one folder) are walked once.
    let mut visited = std::collections::HashSet::new();
    while let Some(d) = stack.pop() {
        if let Some(id) = folder_id(&d) {
            if !visited.insert(id) {
                tracing::warn!(
                    "skipping {}: that folder was already walked (a symlink loop or a second link to it)",
                    d.display()
                );
                continue;
            }
        }
        seen += 1;
        if seen > 1_000_000 {
            return Err(Error::InvalidArgument(format!(
                "{}: more than a million folders (symlink loop?)",
                dir.display()
            )));
        }
        let (subdirs, files, _) = list_dir(&d)?;
        let mut imgs: Vec<PathBuf> = files
            .into_iter()
            .filter(|p| has_image_extension(p))
            .collect();
        imgs.sort_by(|a, b| a.file_name().cmp(&b.file_name()));
        by_dir.push((d.to_string_lossy().into_owned(), imgs));
        stack.extend(subdirs);
    }
    by_dir.sort_by(|a, b| a.0.cmp(&b.0));
    Ok(by_dir.into_iter().flat_map(|(_, v)| v).collect())
}

fn no_images(path: &Path) -> Error {
    Error::NoImages {
        path: path.to_path_buf(),
        extensions: IMAGE_EXTENSIONS.join(", "),
    }
}

impl ImageFolder {
    /// Open `root` with [`FolderLayout::Auto`].
    pub fn open(root: impl AsRef<Path>) -> Result<Self> {
        Self::open_with(root, FolderLayout::Auto)
    }

    /// Open `root` with the given layout. Errors name the folder: empty folder, no images (in the root or in a
    /// class sub-folder).
    pub fn open_with(root: impl AsRef<Path>, layout: FolderLayout) -> Result<Self> {
        let root = root.as_ref().to_path_buf();
        let (dirs, files, n_entries) = list_dir(&root)?;
        if n_entries == 0 {
            return Err(Error::EmptyFolder(root));
        }
        let layout = match layout {
            FolderLayout::Auto => {
                if !dirs.is_empty() && !files.iter().any(|p| has_image_extension(p)) {
                    FolderLayout::Classes
                } else {
                    FolderLayout::Flat
                }
            }
            l => l,
        };
        let name = format!("image-folder:{}", root.display());
        match layout {
            FolderLayout::Flat | FolderLayout::Auto => {
                let files = walk_images(&root)?;
                if files.is_empty() {
                    return Err(no_images(&root));
                }
                Ok(Self {
                    root,
                    files,
                    labels: None,
                    classes: None,
                    name,
                })
            }
            FolderLayout::Classes => {
                let mut class_dirs = dirs;
                class_dirs.sort_by(|a, b| a.file_name().cmp(&b.file_name()));
                if class_dirs.is_empty() {
                    return Err(Error::InvalidArgument(format!(
                        "{}: class layout asked for, but the folder has no class sub-folders",
                        root.display()
                    )));
                }
                let mut all = Vec::new();
                let mut labels = Vec::new();
                let mut classes = Vec::new();
                for (label, d) in class_dirs.iter().enumerate() {
                    let imgs = walk_images(d)?;
                    if imgs.is_empty() {
                        return Err(no_images(d));
                    }
                    classes.push(
                        d.file_name()
                            .unwrap_or_default()
                            .to_string_lossy()
                            .into_owned(),
                    );
                    labels.extend(std::iter::repeat_n(label, imgs.len()));
                    all.extend(imgs);
                }
                Ok(Self {
                    root,
                    files: all,
                    labels: Some(labels),
                    classes: Some(classes),
                    name,
                })
            }
        }
    }

    /// The folder opened.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// The image files, in sample order.
    pub fn files(&self) -> &[PathBuf] {
        &self.files
    }

    /// The file of sample `index`.
    pub fn path(&self, index: usize) -> Option<&Path> {
        self.files.get(index).map(|p| p.as_path())
    }
}

impl Dataset for ImageFolder {
    fn len(&self) -> usize {
        self.files.len()
    }
    fn get(&self, index: usize) -> Result<RgbImage> {
        let path = self
            .files
            .get(index)
            .ok_or_else(|| out_of_range(self, index))?;
        load_rgb(path)
    }
    fn label(&self, index: usize) -> Option<usize> {
        self.labels.as_ref().and_then(|l| l.get(index).copied())
    }
    fn class_names(&self) -> Option<&[String]> {
        self.classes.as_deref()
    }
    fn name(&self) -> &str {
        &self.name
    }
    fn source(&self, index: usize) -> String {
        match self.files.get(index) {
            Some(p) => p.display().to_string(),
            None => format!("{}[{index}]", self.name),
        }
    }
}
