//! Checkpoint I/O (work in progress).
