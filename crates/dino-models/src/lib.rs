//! dino-models: Vision Transformer, ResNet, DINO head and multi-crop wrapper, trainable in candle and
//! loadable from / exportable to the official PyTorch checkpoints.

pub mod backbone;
pub mod resnet;

pub use backbone::Backbone;
