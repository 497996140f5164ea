//! Fused ops with analytic backward (work in progress).
