//! dino-data: datasets, the DINO multi-crop augmentation and a parallel loader.
