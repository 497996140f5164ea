//! The DINO multi-crop augmentation and the evaluation transform (work in progress).
