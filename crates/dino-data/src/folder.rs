//! Image folders (work in progress).
