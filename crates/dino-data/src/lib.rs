//! dino-data: datasets, the DINO multi-crop augmentation and a parallel loader.

pub mod augment;
pub mod cifar;
pub mod dataset;
pub mod error;
pub mod folder;
pub mod idx;
pub mod loader;
pub mod masking;
pub mod pil;
pub mod view;

pub use view::{Transform, View};
