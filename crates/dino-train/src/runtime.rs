//! Process-level settings for training speed (defined in `dino_models::runtime`, beside the ops they serve).

pub use dino_models::runtime::{main_thread_in_pool, tune_allocator, TensorAlloc};
