//! hf-hub references (work in progress).
