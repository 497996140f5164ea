//! Pixel operations that reproduce Pillow/torchvision exactly (work in progress).
