//! dino-models: Vision Transformer, ResNet, DINO head and multi-crop wrapper, trainable in candle and
//! loadable from / exportable to the official PyTorch checkpoints.

pub mod backbone;
pub mod error;
pub mod head;
pub mod hub;
pub mod init;
pub mod multicrop;
pub mod params;
pub mod resnet;
pub mod runtime;
pub mod vit;
pub mod weights;

pub use backbone::Backbone;
/// The ops the models are made of, each with a CPU fast path and a portable path (the `dino-kernels` crate).
pub use dino_kernels::{attention, bf16, dispatch, fused, ops, patch};
pub use dino_kernels::{kernel_path, set_kernel_path, with_kernel_path, KernelPath};
pub use fused::{
    matmul_precision, no_grad, set_matmul_precision, with_matmul_precision, MatmulPrecision,
};
