//! The crate's error type: every failure names the argument or tensor at fault and its shape.

/// Errors returned by dino-core.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// An error from candle itself (device, dtype, shape inside an op), without candle's backtrace.
    #[error("{}", candle_text(.0))]
    Candle(candle_core::Error),

    /// A tensor argument has the wrong shape.
    #[error("{name}: expected shape {expected}, got {got:?}")]
    Shape {
        /// The argument or tensor name.
        name: String,
        /// What was expected, in words.
        expected: String,
        /// The shape received.
        got: Vec<usize>,
    },

    /// An argument is out of its valid range.
    #[error("invalid argument {name}: {msg}")]
    InvalidArgument {
        /// The argument name.
        name: String,
        /// What is wrong with it.
        msg: String,
    },

    /// A named parameter is missing from a parameter list or a checkpoint state.
    #[error("parameter {name:?} missing: {msg}")]
    MissingParameter {
        /// The parameter name.
        name: String,
        /// Where it was looked for.
        msg: String,
    },

    /// A parameter or a state entry has a shape different from the one it pairs with.
    #[error("parameter {name:?}: shape mismatch, {what}: expected {expected:?}, got {got:?}")]
    ParameterShape {
        /// The parameter name.
        name: String,
        /// What is being compared.
        what: String,
        /// The reference shape.
        expected: Vec<usize>,
        /// The offending shape.
        got: Vec<usize>,
    },

    /// A collective operation (all-reduce, broadcast, barrier) failed or was misused.
    #[error("collective {op}: {msg}")]
    Collective {
        /// The operation.
        op: String,
        /// What went wrong.
        msg: String,
    },

    /// An epoch or iteration index lies beyond the end of a schedule.
    #[error("{name}: index {index} is past the end of the schedule (length {len})")]
    PastSchedule {
        /// Which schedule.
        name: String,
        /// The index asked for.
        index: usize,
        /// The schedule length.
        len: usize,
    },
}

/// `Result` with [`Error`].
pub type Result<T> = std::result::Result<T, Error>;

impl Error {
    /// A failed collective `op`.
    pub fn collective(op: impl Into<String>, msg: impl Into<String>) -> Self {
        Error::Collective {
            op: op.into(),
            msg: msg.into(),
        }
    }

    pub(crate) fn shape(
        name: impl Into<String>,
        expected: impl Into<String>,
        got: &[usize],
    ) -> Self {
        Error::Shape {
            name: name.into(),
            expected: expected.into(),
            got: got.to_vec(),
        }
    }

    pub(crate) fn arg(name: impl Into<String>, msg: impl Into<String>) -> Self {
        Error::InvalidArgument {
            name: name.into(),
            msg: msg.into(),
        }
    }
}

impl From<candle_core::Error> for Error {
    fn from(e: candle_core::Error) -> Self {
        Error::Candle(e)
    }
}

/// A candle error's text on one line, without the backtrace candle appends when `RUST_BACKTRACE` (or
/// `RUST_LIB_BACKTRACE`) is set: `WithBacktrace` is peeled and `Context` / `WithPath` are joined with ": ".
pub fn candle_text(e: &candle_core::Error) -> String {
    use candle_core::Error as C;
    match e {
        C::WithBacktrace { inner, .. } => candle_text(inner),
        C::Context { inner, context } => format!("{context}: {}", candle_text(inner)),
        C::WithPath { inner, path } => format!("{}: {}", path.display(), candle_text(inner)),
        other => other
            .to_string()
            .split_whitespace()
            .collect::<Vec<_>>()
            .join(" "),
    }
}
