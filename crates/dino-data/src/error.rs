//! The crate's error type (work in progress).
