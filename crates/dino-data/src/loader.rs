//! The parallel multi-crop loader (work in progress).
