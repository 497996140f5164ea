//! Which parameters are trainable (work in progress).
