//! Empty: a build script makes cargo resolve the `[build-dependencies]` whose host features this crate pins.
fn main() {}
