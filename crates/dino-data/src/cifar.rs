//! CIFAR binary batches (work in progress).
