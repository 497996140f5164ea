//! dino-models: Vision Transformer, ResNet, DINO head and multi-crop wrapper, trainable in candle and
//! loadable from / exportable to the official PyTorch checkpoints.

pub mod attention;
pub mod backbone;
pub mod bf16;
pub mod error;
pub mod fused;
pub mod head;
pub mod hub;
pub mod init;
pub mod multicrop;
pub mod ops;
pub mod params;
pub mod resnet;
pub mod runtime;
mod small_gemm;
pub mod vit;
pub mod weights;

pub use backbone::Backbone;
pub use fused::{
    matmul_precision, no_grad, set_matmul_precision, with_matmul_precision, MatmulPrecision,
};
