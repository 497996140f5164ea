//! The crate's error type, `dino_data::Error`: every variant that concerns a file names it.

use std::path::PathBuf;

/// Errors raised by the dataset readers, the transforms and the loader.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// An I/O error while reading `path` (missing file, permission, truncated gzip stream...).
    #[error("I/O error on {path}: {source}")]
    Io {
        /// The file or folder being read.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },

    /// A dataset folder that holds no entries at all.
    #[error("empty folder {0}: it holds no files or sub-folders")]
    EmptyFolder(PathBuf),

    /// A dataset folder (or a class sub-folder) that holds no file with an image extension.
    #[error("no images in folder {path} (looked recursively for {extensions})")]
    NoImages {
        /// The folder searched.
        path: PathBuf,
        /// The extensions searched for, comma-separated.
        extensions: String,
    },

    /// An IDX file whose first bytes are not `00 00 <type> <ndim>`.
    #[error("{path}: wrong IDX magic number {found:02x?} (expected 00 00 08 <ndim>)")]
    IdxMagic {
        /// The IDX file.
        path: PathBuf,
        /// The first four bytes found.
        found: [u8; 4],
    },

    /// An IDX file with a valid magic number but an unusable header or payload.
    #[error("{path}: malformed IDX file: {reason}")]
    IdxFormat {
        /// The IDX file.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },

    /// A CIFAR binary batch whose size is not a whole number of records.
    #[error(
        "{path}: CIFAR file size {size} bytes is not a multiple of the {record_len}-byte record"
    )]
    CifarSize {
        /// The batch file.
        path: PathBuf,
        /// Its size in bytes.
        size: u64,
        /// The record length: 3073 for CIFAR-10, 3074 for CIFAR-100.
        record_len: usize,
    },

    /// A CIFAR record whose label byte is out of range.
    #[error(
        "{path}: record {record} has label {label}, but the dataset has {num_classes} classes"
    )]
    CifarLabel {
        /// The batch file.
        path: PathBuf,
        /// The record index within that file.
        record: usize,
        /// The label byte read.
        label: u8,
        /// The number of classes of that label kind.
        num_classes: usize,
    },

    /// An image file that cannot be decoded (corrupt, truncated, unsupported).
    #[error("cannot decode image {path}: {reason}")]
    Image {
        /// The image file.
        path: PathBuf,
        /// The decoder's message.
        reason: String,
    },

    /// A sample index past the end of a dataset.
    #[error("index {index} out of range for dataset '{dataset}' of length {len}")]
    IndexOutOfRange {
        /// The dataset's name.
        dataset: String,
        /// The index asked for.
        index: usize,
        /// The dataset's length.
        len: usize,
    },

    /// A bad argument (unknown dataset kind, zero batch size, inconsistent files...).
    #[error("invalid argument: {0}")]
    InvalidArgument(String),

    /// A failure inside the loader (a transform that panicked, views of inconsistent shapes...).
    #[error("loader: {0}")]
    Loader(String),

    /// An error from candle while building batch tensors.
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
}

impl Error {
    /// An [`Error::Io`] for `path`.
    pub fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Error::Io {
            path: path.into(),
            source,
        }
    }
}

/// `Result` with [`Error`].
pub type Result<T> = std::result::Result<T, Error>;
