//! cargo xtask: fetch-data | fetch-weights | ci | bench
fn main() {}
