//! IDX files (work in progress).
