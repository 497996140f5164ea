//! Vision Transformer (work in progress).
