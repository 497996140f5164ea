//! The crate's error type: what can go wrong when building networks and moving weights in and out.
//!
//! Every variant names the file, tensor or argument involved (and both shapes for a shape mismatch), so a
//! failed load says which tensor to look at instead of silently loading nothing (the official loader's
//! `strict=False` pitfall, dino-spec §1.13).

use std::path::PathBuf;

/// Errors of `dino-models`.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A tensor the network needs is absent from the checkpoint.
    #[error(
        "missing tensor `{name}` (expected shape {expected:?}) in {origin}{}",
        more_note(*others, "missing")
    )]
    MissingKey {
        /// Our (official) name of the tensor.
        name: String,
        /// Shape the network expects.
        expected: Vec<usize>,
        /// The file (and checkpoint key) being loaded.
        origin: String,
        /// How many other tensors are missing too.
        others: usize,
    },

    /// The checkpoint holds a tensor the network does not have.
    #[error(
        "unexpected tensor `{name}` (shape {shape:?}) in {origin}: the network has no parameter of that name{}",
        more_note(*others, "unexpected")
    )]
    UnexpectedKey {
        /// Name of the tensor in the checkpoint (after prefix stripping and layout mapping).
        name: String,
        /// Its shape in the checkpoint.
        shape: Vec<usize>,
        /// The file (and checkpoint key) being loaded.
        origin: String,
        /// How many other tensors are unexpected too.
        others: usize,
    },

    /// A tensor has a different shape in the checkpoint than in the network.
    #[error("shape mismatch for tensor `{name}` in {origin}: the network expects {expected:?}, the checkpoint has {found:?}")]
    ShapeMismatch {
        /// Name of the tensor.
        name: String,
        /// Shape the network expects.
        expected: Vec<usize>,
        /// Shape found in the checkpoint.
        found: Vec<usize>,
        /// The file (and checkpoint key) being loaded.
        origin: String,
    },

    /// A file could not be read or parsed.
    #[error("cannot read {}: {reason}", path.display())]
    Unreadable {
        /// The file.
        path: PathBuf,
        /// What went wrong.
        reason: String,
    },

    /// A file could not be written.
    #[error("cannot write {}: {reason}", path.display())]
    Write {
        /// The file.
        path: PathBuf,
        /// What went wrong.
        reason: String,
    },

    /// A full training checkpoint has no entry under the requested `checkpoint_key`.
    #[error(
        "{} has no `{key}` entry (checkpoint_key); official training checkpoints hold `teacher` and `student`, \
         backbone-only *_pretrain.pth files hold the tensors at the top level",
        path.display()
    )]
    CheckpointKey {
        /// The file.
        path: PathBuf,
        /// The key that was asked for.
        key: String,
    },

    /// A checkpoint's tensor names follow no layout we know how to map.
    #[error("{origin}: {reason}")]
    Layout {
        /// The file being loaded.
        origin: String,
        /// What is wrong with its names.
        reason: String,
    },

    /// An `hf:owner/name[/file]` reference is malformed.
    #[error("invalid hub reference `{reference}`: {reason} (expected `hf:owner/name` or `hf:owner/name/file`)")]
    HubReference {
        /// The reference as given.
        reference: String,
        /// What is wrong with it.
        reason: String,
    },

    /// The file is not in the local hub cache and cannot be downloaded (offline flag or no network).
    #[error(
        "`{file}` of `{repo}` is not in the local hub cache {} and could not be downloaded ({reason}). \
         Do one of: pass a local weights file path instead of the hf: reference; run `cargo xtask fetch-weights` \
         on a machine with network access and copy its cache here; or point the cache directory (HF_HUB_CACHE \
         or the cache_dir option) at a directory that already holds this file",
        cache_dir.display()
    )]
    HubUnavailable {
        /// `owner/name`.
        repo: String,
        /// File inside the repository.
        file: String,
        /// The cache directory that was searched.
        cache_dir: PathBuf,
        /// Why: offline flag set, network error...
        reason: String,
    },

    /// Any other hub failure (repository or file does not exist, authentication...).
    #[error("hub error for `{file}` of `{repo}`: {reason}")]
    Hub {
        /// `owner/name`.
        repo: String,
        /// File inside the repository.
        file: String,
        /// The hub client's message.
        reason: String,
    },

    /// An invalid configuration value.
    #[error("invalid configuration: {0}")]
    Config(String),

    /// A tensor operation failed.
    #[error("{}", dino_core::error::candle_text(.0))]
    Candle(candle_core::Error),
}

fn more_note(others: usize, what: &str) -> String {
    if others == 0 {
        String::new()
    } else {
        format!(" (and {others} more {what} tensors)")
    }
}

/// `Result` with [`Error`].
pub type Result<T> = std::result::Result<T, Error>;

impl From<candle_core::Error> for Error {
    fn from(e: candle_core::Error) -> Self {
        Error::Candle(e)
    }
}
