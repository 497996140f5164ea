//! Process-level settings for training speed (defined in `dino_models::runtime`, beside the ops they serve).

pub use dino_models::runtime::{tune_allocator, TensorAlloc};
