//! The DINO projection head (work in progress).
