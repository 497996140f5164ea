//! The Dataset trait (work in progress).
