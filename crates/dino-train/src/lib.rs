//! dino-train: the DINO training loop, checkpoints and exact resume, logging and evaluation.
//!
//! - [`config::TrainConfig`]: every official `main_dino.py` option (official names and defaults), TOML
//!   loading and named presets ([`config::TrainConfig::preset`]).
//! - [`trainer::Trainer`]: one training iteration in the official order ([`trainer::Trainer::step`]).
//! - [`run::train`]: a whole run with checkpoints, exact resume, logs, plots and k-NN evaluation;
//!   [`run::train_default`] is the no-argument run on the embedded Fashion-MNIST subset.
//! - [`bench`](mod@bench): the step benchmark's configurations and input crops.
//! - [`checkpoint`]: atomic safetensors checkpoints with embedded JSON metadata.
//! - [`eval`]: feature extraction, weighted k-NN and the linear probe.
//! - [`lock`]: one run per output directory (a `flock`ed `dino.lock` naming its holder).
//! - [`log`], [`plot`]: JSON-lines log, progress display, PNG curves.
//! - [`attention`]: attention maps as `visualize_attention.py` draws them, and the run's attention sheet.
//! - [`tensorboard`]: the log's numbers as TensorBoard scalar event files.
//! - [`device`]: `--device cpu|cuda|cuda:N|auto`.
//! - [`signals`]: a graceful stop on SIGINT, SIGTERM, SIGHUP, SIGUSR1, SIGUSR2 (a checkpoint after the
//!   current step).
//! - [`dist`]: the process group of a data-parallel run (MPI with the `mpi` feature), rank threads.
//! - [`memory`]: a step's memory estimated before the first step, and the warning when it will not fit.
//! - [`runtime::tune_allocator`], [`runtime::main_thread_in_pool`]: allocator and thread-pool settings for the
//!   training process.

pub mod attention;
pub mod bench;
pub mod checkpoint;
pub mod config;
pub mod data;
pub mod device;
pub mod dist;
pub mod error;
pub mod eval;
pub mod lock;
pub mod log;
pub mod memory;
pub mod model;
pub mod plot;
pub mod run;
pub mod runtime;
pub mod signals;
pub mod tensorboard;
pub mod trainer;

pub use config::{
    Arch, Centering, DatasetKind, OptimizerKind, StudentPasses, TrainConfig, VitLinearInit,
};
pub use device::DeviceSpec;
pub use dino_models::{KernelPath, MatmulPrecision};
pub use error::{Error, Result};
pub use run::{train, train_default, TrainOptions, TrainSummary};
pub use trainer::{StepStats, StepTimings, Trainer};
