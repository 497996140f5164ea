//! dino-models: Vision Transformer, ResNet, DINO head and multi-crop wrapper.
