//! cargo xtask: fetch-data | fetch-weights | ci | bench | bench-summary | gpu-check
//!
//! - `fetch-data <cifar10|cifar100|fashion-mnist|imagenette> [--dir DIR]`: official archives, resumed, verified
//!   (published sha256/md5), extracted.
//! - `fetch-weights <name>`: official DINO weights through dino-models' hub code.
//! - `ci`: exactly what `.ci/run` runs.
//! - `bench [--quick] [--case NAME]... [--criterion] [--no-step] [--matmul-precision bf16|both|all] [--pytorch PYTHON]
//!   [--pytorch-bf16 auto|always|never] [--rounds N] [--summary FILE]`: one JSON line per benchmark case (with
//!   `--pytorch`, each training step and forward pass also timed in PyTorch, fp32 and, where the CPU has bf16
//!   arithmetic, bf16 autocast; the `ceiling` case gives this CPU's f32 and bf16 register-only FMA rates); with
//!   `--rounds N` the whole selection N times, interleaved, then the rounds' medians and per-round ratios.
//! - `bench-summary FILE...`: those medians and ratios from saved JSON lines (a file per round).
//! - `bench-ab --variant NAME=PATH [--variant ...] --case CASE... [--matmul-precision P] [--rounds N] [--out FILE]`:
//!   interleaved rounds of `bench_step` binaries (or one binary under different environments), the order
//!   rotated per round, with per-round ratios to the first variant and the run's order effect.
//! - `gpu-check`: builds the CUDA binaries and the script that checks them on a GPU machine (`target/gpu-check`).

mod ab;
mod bench;
mod ci;
mod fetch;
mod gpu;
mod summary;
mod unify;

use anyhow::Result;
use clap::{Parser, Subcommand};
use std::path::{Path, PathBuf};

#[derive(Parser)]
#[command(name = "cargo xtask", about = "dino-rs developer tasks")]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Download, verify and extract a dataset.
    FetchData {
        /// cifar10, cifar100, fashion-mnist or imagenette.
        name: String,
        /// Where to put it (default: data/<name> in the workspace).
        #[arg(long)]
        dir: Option<PathBuf>,
    },
    /// Download official DINO weights (e.g. dino_vits16, dino_vitb8, hf:facebook/dino-vits16).
    FetchWeights {
        /// The name of the weights.
        name: String,
        /// Copy the file here as well (default: only the hub cache).
        #[arg(long)]
        out: Option<PathBuf>,
    },
    /// Run the checks of .ci/run: fmt --check, clippy -D warnings, the workspace tests.
    Ci,
    /// Build the CUDA binaries and the script that runs the golden tests, a short training run and the step
    /// benchmark on a GPU machine without cargo (target/gpu-check).
    GpuCheck,
    /// Check (nightly cargo) that the builds of .ci/run reuse the workspace tests' compiled dependencies.
    UnifyCheck,
    /// Run the benchmarks, one JSON line per case.
    Bench {
        /// Fewer iterations: a smoke run.
        #[arg(long)]
        quick: bool,
        /// Only the cases whose name contains this (repeatable).
        #[arg(long = "case")]
        cases: Vec<String>,
        /// Also run the criterion benches of the workspace (`cargo bench --workspace`).
        #[arg(long)]
        criterion: bool,
        /// Skip the step benchmark (with --criterion: run only the criterion benches).
        #[arg(long)]
        no_step: bool,
        /// The step benchmark's linear-layer products: highest (f32, default), bf16, both (each case in
        /// f32 then bf16, interleaved with PyTorch's modes), or all (both, then bf16 with the head's last
        /// layer in bf16 too, --head-last-layer-bf16, as PyTorch's autocast runs it).
        #[arg(long, value_parser = ["highest", "bf16", "both", "all"])]
        matmul_precision: Option<String>,
        /// A Python with torch: after each training-step and forward case, time the same in PyTorch
        /// (xtask/pytorch/dino_step.py) in fp32 and under bf16 autocast, same-run baselines.
        #[arg(long, value_name = "PYTHON")]
        pytorch: Option<PathBuf>,
        /// With --pytorch, when to time bf16 autocast too: auto (where the CPU has bf16 arithmetic:
        /// avx512_bf16 or amx_bf16), always or never.
        #[arg(long, value_name = "WHEN", default_value = "auto", value_parser = ["auto", "always", "never"])]
        pytorch_bf16: String,
        /// Run the whole selection this many times, one round after the other (each JSON line carries its
        /// `round`; even rounds run each case's engines in reverse order), then print the rounds' images/s
        /// medians and per-round ratios to PyTorch.
        #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..=1000))]
        rounds: u32,
        /// Write that summary (Markdown) to this file instead of stderr.
        #[arg(long, value_name = "FILE")]
        summary: Option<PathBuf>,
    },
    /// Interleaved A/B rounds of `bench_step` binaries: each round runs every variant once per case, the
    /// order rotated by one place per round (every variant in every position equally often), then per-round
    /// ratios to the first variant and each position's speed against its round's mean.
    BenchAb {
        /// `NAME=PATH [VAR=VALUE]...`: a `bench_step` binary (copy target/release/examples/bench_step aside per
        /// build) and the environment it runs under; at least two, ratios are to the first.
        #[arg(
            long = "variant",
            required = true,
            value_name = "NAME=PATH [VAR=VALUE]..."
        )]
        variants: Vec<ab::Variant>,
        /// `bench_step` cases, e.g. step/cifar/4096 (repeatable).
        #[arg(long = "case", required = true)]
        cases: Vec<String>,
        /// The products of every run: highest (f32) or bf16.
        #[arg(long, default_value = "highest", value_parser = ["highest", "bf16"])]
        matmul_precision: String,
        /// Rounds; a multiple of the number of variants balances the positions.
        #[arg(long, default_value_t = 6, value_parser = clap::value_parser!(u32).range(1..=1000))]
        rounds: u32,
        /// Write the JSON lines (with variant, round and position) to this file.
        #[arg(long, value_name = "FILE")]
        out: Option<PathBuf>,
    },
    /// The medians and per-round ratios of saved `bench` JSON lines (a file per round, unless the lines carry
    /// their `round`), as Markdown tables.
    BenchSummary {
        /// JSON-lines files of `cargo xtask bench`.
        #[arg(required = true)]
        files: Vec<PathBuf>,
    },
}

fn root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("xtask lives in the workspace root")
}

fn main() {
    std::panic::set_hook(Box::new(|info| {
        eprintln!("xtask: internal error: {info}");
    }));
    if let Err(e) = run(Cli::parse()) {
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}

fn run(cli: Cli) -> Result<()> {
    match cli.cmd {
        Cmd::FetchData { name, dir } => {
            let ds = fetch::dataset(&name)?;
            let dir = dir.unwrap_or_else(|| root().join("data").join(ds.name));
            fetch::fetch_dataset(&fetch::agent(true), &ds, &dir)
        }
        Cmd::FetchWeights { name, out } => weights::fetch(&name, out.as_deref()),
        Cmd::Ci => ci::run(root()),
        Cmd::GpuCheck => gpu::run(root()),
        Cmd::UnifyCheck => unify::run(root()),
        Cmd::Bench {
            quick,
            cases,
            criterion,
            no_step,
            matmul_precision,
            pytorch,
            pytorch_bf16,
            rounds,
            summary,
        } => bench::run(
            root(),
            &bench::BenchArgs {
                quick,
                cases,
                step: !no_step,
                criterion,
                matmul_precision,
                pytorch,
                pytorch_bf16: match pytorch_bf16.as_str() {
                    "always" => bench::PytorchBf16::Always,
                    "never" => bench::PytorchBf16::Never,
                    _ => bench::PytorchBf16::Auto,
                },
                rounds: rounds as usize,
                summary,
            },
        ),
        Cmd::BenchAb {
            variants,
            cases,
            matmul_precision,
            rounds,
            out,
        } => {
            let s = ab::run(&ab::AbArgs {
                variants,
                cases,
                matmul_precision,
                rounds: rounds as usize,
                out,
            })?;
            print!("{s}");
            Ok(())
        }
        Cmd::BenchSummary { files } => {
            print!("{}", summary::from_files(&files)?);
            Ok(())
        }
    }
}

mod weights {
    //! `fetch-weights`: official DINO weights through dino-models' hub code (the Hugging Face cache), by their
    //! official names (`dino_vits16`, ...) or any `hf:owner/name[/file]` reference.
    use anyhow::{bail, Context, Result};
    use dino_models::hub::{resolve, HubOptions, HubRef};
    use std::path::Path;

    /// The official release names and their Hugging Face repositories.
    pub const OFFICIAL: &[(&str, &str)] = &[
        ("dino_vits16", "hf:facebook/dino-vits16"),
        ("dino_vits8", "hf:facebook/dino-vits8"),
        ("dino_vitb16", "hf:facebook/dino-vitb16"),
        ("dino_vitb8", "hf:facebook/dino-vitb8"),
    ];

    /// The hub reference of `name`: an official name, `owner/name`, or an `hf:` reference.
    pub fn reference(name: &str) -> Result<HubRef> {
        let r = if let Some((_, r)) = OFFICIAL.iter().find(|(n, _)| *n == name) {
            r.to_string()
        } else if name.starts_with("hf:") {
            name.to_string()
        } else if name.contains('/') {
            format!("hf:{name}")
        } else {
            let names: Vec<&str> = OFFICIAL.iter().map(|(n, _)| *n).collect();
            bail!(
                "unknown weights `{name}`: expected one of {} or an hf:owner/name[/file] reference",
                names.join(", ")
            );
        };
        HubRef::parse(&r)?.with_context(|| format!("`{r}` is not a hub reference"))
    }

    /// Downloads `name` into the hub cache (or finds it there offline) and optionally copies it to `out`.
    pub fn fetch(name: &str, out: Option<&Path>) -> Result<()> {
        let r = reference(name)?;
        let opts = HubOptions {
            offline: HubOptions::offline_from_env(),
            ..HubOptions::default()
        };
        let path = resolve(&r, &opts)?;
        println!("{}: {}", r.repo_id(), path.display());
        if let Some(out) = out {
            std::fs::copy(&path, out)
                .with_context(|| format!("cannot copy {} to {}", path.display(), out.display()))?;
            println!("copied to {}", out.display());
        }
        Ok(())
    }

    #[cfg(test)]
    mod tests {
        use super::*;

        #[test]
        fn names_map_to_the_official_repositories() {
            let r = reference("dino_vits16").unwrap();
            assert_eq!(
                (r.owner.as_str(), r.name.as_str(), r.file.as_deref()),
                ("facebook", "dino-vits16", None)
            );
            let r = reference("facebook/dino-vitb8/model.safetensors").unwrap();
            assert_eq!(r.file.as_deref(), Some("model.safetensors"));
            let e = reference("dino_vith14").unwrap_err().to_string();
            assert!(
                e.contains("dino_vith14") && e.contains("dino_vits16"),
                "{e}"
            );
        }

        #[test]
        fn offline_without_cache_says_what_to_do() {
            let cache = tempfile::tempdir().unwrap();
            let r = reference("dino_vits8").unwrap();
            let opts = HubOptions {
                offline: true,
                cache_dir: Some(cache.path().to_path_buf()),
                ..HubOptions::default()
            };
            let e = format!("{:#}", anyhow::Error::from(resolve(&r, &opts).unwrap_err()));
            assert!(e.contains("facebook/dino-vits8"), "{e}");
        }
    }
}
