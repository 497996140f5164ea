//! cargo xtask: fetch-data | fetch-weights | ci | bench
//!
//! - `fetch-data <cifar10|cifar100|fashion-mnist|imagenette> [--dir DIR]`: official archives, resumed, verified
//!   (published sha256/md5), extracted.
//! - `fetch-weights <name>`: official DINO weights through dino-models' hub code.
//! - `ci`: exactly what `.ci/run` runs.
//! - `bench [--quick] [--case NAME]... [--criterion] [--no-step]`: one JSON line per benchmark case.

mod bench;
mod ci;
mod fetch;

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
        Cmd::Bench {
            quick,
            cases,
            criterion,
            no_step,
        } => bench::run(
            root(),
            &bench::BenchArgs {
                quick,
                cases,
                step: !no_step,
                criterion,
            },
        ),
    }
}

mod weights {
    //! `fetch-weights`: placeholder until dino-models' hub lands (wired below).
    use anyhow::{bail, Result};
    use std::path::Path;

    pub fn fetch(name: &str, _out: Option<&Path>) -> Result<()> {
        bail!("fetch-weights {name}: the hub code of dino-models is not wired in yet")
    }
}
