//! `dino_train::Error`: every failure the trainer, checkpoints, logging and evaluation can report.

use std::path::PathBuf;

/// Errors of the training library. Messages name the file, key or tensor at fault.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A numerical or shape error from candle.
    #[error("{}", dino_core::error::candle_text(.0))]
    Candle(candle_core::Error),
    /// An error from dino-core (loss, optimiser, k-NN, ...).
    #[error(transparent)]
    Core(#[from] dino_core::Error),
    /// An error from dino-models (architectures, weights).
    #[error(transparent)]
    Models(#[from] dino_models::error::Error),
    /// An error from dino-data (datasets, augmentation, loader).
    #[error(transparent)]
    Data(#[from] dino_data::error::Error),
    /// A file could not be read or written.
    #[error("{path}: {source}")]
    Io {
        /// The file or directory.
        path: PathBuf,
        /// The underlying error.
        source: std::io::Error,
    },
    /// A configuration value is invalid.
    #[error("invalid configuration: {key} = {value}: {reason}")]
    Config {
        /// The configuration key (official name).
        key: String,
        /// The offending value, as written.
        value: String,
        /// Why it is rejected.
        reason: String,
    },
    /// A TOML configuration file could not be parsed.
    #[error("{path}: cannot parse configuration: {message}")]
    ConfigParse {
        /// The TOML file.
        path: PathBuf,
        /// The parser's message.
        message: String,
    },
    /// Resuming with a configuration that differs from the checkpoint's.
    #[error(
        "{path}: the checkpoint was written with a different configuration (differing keys: {}); use another \
         --output-dir or the checkpoint's values",
        keys.join(", ")
    )]
    ConfigMismatch {
        /// The checkpoint metadata file.
        path: PathBuf,
        /// `key: checkpoint value -> requested value` for each differing key.
        keys: Vec<String>,
    },
    /// A checkpoint is unreadable or inconsistent.
    #[error("{path}: bad checkpoint: {reason}")]
    Checkpoint {
        /// The checkpoint file.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// The loss became NaN or infinite.
    #[error(
        "loss is {loss} at epoch {epoch}, iteration {iteration} (global iteration {global_iteration}); stopping. \
         The last good checkpoint is kept in the output directory"
    )]
    NonFiniteLoss {
        /// The loss value.
        loss: f64,
        /// Epoch index (0-based).
        epoch: usize,
        /// Iteration within the epoch (0-based).
        iteration: usize,
        /// Global iteration `epoch * niter_per_ep + iteration`.
        global_iteration: usize,
    },
    /// The dataset is too small for the batch size (drop_last leaves no iteration).
    #[error("dataset {what} has {len} images, fewer than batch_size = {batch_size}: no iteration per epoch")]
    DatasetTooSmall {
        /// The dataset description.
        what: String,
        /// Its length.
        len: usize,
        /// The batch size.
        batch_size: usize,
    },
    /// JSON (de)serialisation failed.
    #[error("{path}: {source}")]
    Json {
        /// The JSON file.
        path: PathBuf,
        /// The underlying error.
        source: serde_json::Error,
    },
    /// Another run holds the output directory's lock.
    #[error(
        "{dir} is in use by another training run ({holder}); wait for it to end, stop it, or use another \
         --output-dir"
    )]
    Locked {
        /// The output directory.
        dir: PathBuf,
        /// Who holds it ("pid P on host H").
        holder: String,
    },
    /// An evaluation's dataset has no image that decodes, so there is nothing to extract.
    #[error("no features extracted: dataset '{dataset}' has no readable image")]
    NoReadableImage {
        /// The dataset's name.
        dataset: String,
    },
    /// A stop request ([`crate::signals`]) cut an evaluation short; nothing is wrong.
    #[error("stopped by {}", crate::signals::name(*signal))]
    Interrupted {
        /// The signal of the request.
        signal: i32,
    },
    /// Anything else, with its explanation.
    #[error("{0}")]
    Msg(String),
}

/// An error and its chain of causes on one line, each part once: a cause whose text the line already holds
/// (as in `path: No such file or directory (os error 2)` whose io::Error source says the same) is not
/// repeated, and runs of whitespace become one space.
pub fn one_line_report(err: &(dyn std::error::Error + 'static)) -> String {
    let mut out = String::new();
    let mut cur: Option<&(dyn std::error::Error + 'static)> = Some(err);
    while let Some(e) = cur {
        let part = e
            .to_string()
            .split_whitespace()
            .collect::<Vec<_>>()
            .join(" ");
        if !part.is_empty() && !out.contains(&part) {
            if !out.is_empty() {
                out.push_str(": ");
            }
            out.push_str(&part);
        }
        cur = e.source();
    }
    out
}

/// The library's result type.
pub type Result<T> = std::result::Result<T, Error>;

impl Error {
    /// An I/O error on `path`.
    pub fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Error::Io {
            path: path.into(),
            source,
        }
    }

    /// An invalid configuration value.
    pub fn config(key: &str, value: impl std::fmt::Display, reason: impl Into<String>) -> Self {
        Error::Config {
            key: key.to_string(),
            value: value.to_string(),
            reason: reason.into(),
        }
    }
}

impl From<candle_core::Error> for Error {
    fn from(e: candle_core::Error) -> Self {
        Error::Candle(e)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn report_says_each_cause_once() {
        let io = std::io::Error::from_raw_os_error(28);
        let e = Error::io("cc/checkpoint.safetensors", io);
        let line = one_line_report(&e);
        assert_eq!(line.matches("(os error 28)").count(), 1, "{line}");
        assert!(line.starts_with("cc/checkpoint.safetensors: "), "{line}");
        // A cause that adds something is kept.
        #[derive(Debug, thiserror::Error)]
        #[error("opening the run")]
        struct Outer(#[source] Error);
        let line = one_line_report(&Outer(Error::Msg("disk  full\nnow".into())));
        assert_eq!(line, "opening the run: disk full now");
    }
}
