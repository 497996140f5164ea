//! `cargo xtask ci`: the cargo checks of `.ci/run` (format, clippy with warnings denied, the workspace tests),
//! stopping at the first failure with a non-zero exit. `.ci/run` also installs Open MPI and tensorboard and
//! builds the `cuda` feature with `xtask/gpu/toolchain.sh`; run it for those.

use anyhow::{bail, Context, Result};
use std::path::Path;
use std::process::Command;

/// The steps of `.ci/run`, in order, as cargo argument lists.
pub const STEPS: &[&[&str]] = &[
    &["fmt", "--all", "--check"],
    &[
        "clippy",
        "--workspace",
        "--all-targets",
        "--",
        "-D",
        "warnings",
    ],
    &["test", "--workspace"],
    // Without the `hub` feature (which xtask turns on in workspace builds): the README's first command's build.
    &[
        "clippy",
        "-p",
        "dino-models",
        "-p",
        "dino-train",
        "-p",
        "dino-cli",
        "--all-targets",
        "--",
        "-D",
        "warnings",
    ],
    &["test", "-p", "dino-models", "--test", "hub"],
];

/// Runs every step of [`STEPS`] in `root` with the cargo that runs us; the first failing step is the error.
pub fn run(root: &Path) -> Result<()> {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".to_string());
    for step in STEPS {
        let line = format!("cargo {}", step.join(" "));
        eprintln!("xtask ci: {line}");
        let status = Command::new(&cargo)
            .args(*step)
            .current_dir(root)
            .status()
            .with_context(|| format!("cannot run `{line}`"))?;
        if !status.success() {
            bail!("`{line}` failed ({status})");
        }
    }
    eprintln!("xtask ci: all checks passed");
    Ok(())
}
