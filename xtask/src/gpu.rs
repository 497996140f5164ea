//! `cargo xtask gpu-check`: builds HERE (a machine without a GPU is fine) what a GPU machine without cargo needs
//! to check the CUDA path, into `target/gpu-check/`:
//! - `bin/dino.xz`: the CLI with the `cuda` feature (stripped and xz-compressed: with candle's CUDA kernels each
//!   binary about 65 MB stripped, 7-11 MB compressed);
//! - `bin/device.xz`: the test binary `crates/dino-train/tests/device.rs` (every golden and gradient-presence check,
//!   run on `DINO_TEST_DEVICE=cuda`, plus the step benchmark as an ignored test);
//! - `run.sh` (from `xtask/gpu/run.sh`) and `dino_step.py` (the PyTorch step, `--device cuda`);
//! - `build-root.txt`: the checkout the test binary was built in (it reads `<checkout>/../shared`).
//!
//! The CUDA toolchain (nvcc 13.0 from PyPI wheels) comes from `xtask/gpu/toolchain.sh`, as in `.ci/run`.
//! It ends by printing the command to run there and the folder's size.

use anyhow::{bail, Context, Result};
use std::path::{Path, PathBuf};
use std::process::Command;

/// Where the artefacts go, relative to the workspace root.
pub const OUT: &str = "target/gpu-check";

/// Builds the artefacts into `<root>/target/gpu-check` and prints how to run them.
pub fn run(root: &Path) -> Result<()> {
    let out = root.join(OUT);
    std::fs::create_dir_all(out.join("bin")).with_context(|| format!("{}", out.display()))?;
    // Build with the toolchain script's environment: run cargo from a shell that sourced it.
    let target_dir = std::env::var("DINO_CUDA_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|_| root.join("target-cuda"));
    let build = format!(
        "set -e; source xtask/gpu/toolchain.sh; export CARGO_TARGET_DIR='{t}'; \
         cargo build --release -p dino-cli -p dino-train --features dino-cli/cuda,dino-train/cuda \
           --bin dino --test device --message-format json-render-diagnostics > '{t}/device-test.json'",
        t = target_dir.display()
    );
    eprintln!(
        "xtask gpu-check: building the CUDA binaries into {}",
        target_dir.display()
    );
    let status = Command::new("bash")
        .args(["-c", &build])
        .current_dir(root)
        .status()
        .context("cannot run bash")?;
    if !status.success() {
        bail!("the CUDA build failed ({status})");
    }
    let device = test_executable(&target_dir.join("device-test.json"))?;
    pack(&target_dir.join("release/dino"), &out.join("bin/dino"))?;
    pack(&device, &out.join("bin/device"))?;
    for (from, to) in [
        ("xtask/gpu/run.sh", "run.sh"),
        ("xtask/pytorch/dino_step.py", "dino_step.py"),
    ] {
        std::fs::copy(root.join(from), out.join(to)).with_context(|| from.to_string())?;
    }
    std::fs::write(out.join("build-root.txt"), format!("{}\n", root.display()))?;
    let size: u64 = ["bin/dino.xz", "bin/device.xz", "run.sh", "dino_step.py"]
        .iter()
        .map(|f| std::fs::metadata(out.join(f)).map(|m| m.len()).unwrap_or(0))
        .sum();
    println!(
        "xtask gpu-check: {} holds {:.1} MB; on a GPU machine with this checkout and ../shared beside it, run\n\n    \
         bash {OUT}/run.sh            # tests, train, bench; results in {OUT}/out (or $OUT)\n\n\
         (DINO_SHARED=<copy of shared/> when the golden files are elsewhere; see docs/CUDA.md)",
        out.display(),
        size as f64 / 1e6
    );
    Ok(())
}

/// The test executable that cargo's JSON messages name for the `device` test target.
fn test_executable(messages: &Path) -> Result<PathBuf> {
    let text = std::fs::read_to_string(messages).with_context(|| messages.display().to_string())?;
    for line in text.lines() {
        let Ok(v) = serde_json::from_str::<serde_json::Value>(line) else {
            continue;
        };
        if v["reason"] == "compiler-artifact" && v["target"]["name"] == "device" {
            if let Some(exe) = v["executable"].as_str() {
                return Ok(PathBuf::from(exe));
            }
        }
    }
    bail!(
        "{}: cargo named no executable for the `device` test",
        messages.display()
    )
}

/// Copies `from` to `to` without its symbol tables (`strip`, where present), then compresses it to `to.xz`
/// (run.sh unpacks it there).
fn pack(from: &Path, to: &Path) -> Result<()> {
    std::fs::copy(from, to).with_context(|| format!("{} -> {}", from.display(), to.display()))?;
    match Command::new("strip").arg(to).status() {
        Ok(s) if s.success() => {}
        _ => eprintln!(
            "xtask gpu-check: could not strip {}; kept as built",
            to.display()
        ),
    }
    let status = Command::new("xz")
        .args(["-T0", "-6", "-f"])
        .arg(to)
        .status()
        .context("cannot run xz")?;
    if !status.success() {
        bail!("xz {} failed ({status})", to.display());
    }
    Ok(())
}
