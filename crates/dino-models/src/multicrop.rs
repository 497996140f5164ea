//! The multi-crop wrapper (work in progress).
