//! dino-data: datasets, the DINO multi-crop augmentation and a parallel loader.

pub mod view;

pub use view::{Transform, View};
