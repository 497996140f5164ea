//! No code: this crate only pins dependency features so that the workspace's builds share their artifacts
//! (see its Cargo.toml).
