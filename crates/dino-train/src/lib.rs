//! dino-train: the DINO training loop, checkpoints, logging and evaluation.
