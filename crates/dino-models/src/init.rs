//! Seeded initialisation (work in progress).
