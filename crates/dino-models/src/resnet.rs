//! ResNet-18/50 with torchvision's architecture and parameter names (work in progress).
