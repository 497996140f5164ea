//! The `dino` binary: train DINO, evaluate (k-NN, linear probe), extract features, draw attention maps, export
//! official-named weights and describe checkpoints.
//!
//! Every error a user can cause ends as one line `error: ...` naming the culprit and exit status 1 (2 for a bad
//! command line); a panic prints one line too, never a backtrace.

mod commands;
mod info;
mod source;
mod train_args;

/// Large tensor buffers cache-line aligned, on huge pages (see `TensorAlloc`).
#[global_allocator]
static GLOBAL: dino_train::runtime::TensorAlloc = dino_train::runtime::TensorAlloc;

use anyhow::Result;
use clap::{Parser, Subcommand};
use std::path::PathBuf;

/// DINO self-supervised learning (Caron et al. 2021) on candle.
#[derive(Parser, Debug)]
#[command(name = "dino", version, about, long_about = None)]
struct Cli {
    #[command(subcommand)]
    command: Command,
    /// Compute threads of this process (default: the cores divided by the ranks on this node).
    #[arg(long, global = true, value_parser = parse_threads)]
    threads: Option<usize>,
}

/// A thread count of at least one (`--threads 0` would otherwise run one thread without saying so).
fn parse_threads(s: &str) -> std::result::Result<usize, String> {
    match s.trim().parse::<usize>() {
        Ok(0) => Err("at least 1 (leave --threads out for the default)".into()),
        Ok(n) => Ok(n),
        Err(e) => Err(e.to_string()),
    }
}

/// The command line, with every flag's value free to start with a minus sign, so that `--teacher-temp -1`
/// reaches the configuration's own check (which names the key) instead of clap's "unexpected argument".
fn parse_cli() -> Result<Cli, clap::Error> {
    use clap::{CommandFactory, FromArgMatches};
    let negative = |a: clap::Arg| {
        if a.get_action().takes_values() {
            a.allow_negative_numbers(true)
        } else {
            a
        }
    };
    let cmd = Cli::command()
        .mut_args(negative)
        .mut_subcommands(move |c| c.mut_args(negative));
    Cli::from_arg_matches(&cmd.try_get_matches()?)
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Train a DINO model (flags as main_dino.py in kebab-case). With no flags: the embedded default preset.
    Train(Box<TrainCmd>),
    /// Weighted k-NN evaluation (eval_knn.py) of a checkpoint's teacher backbone.
    EvalKnn(Box<commands::EvalKnnArgs>),
    /// Linear probe (eval_linear.py protocol on frozen features) of a checkpoint's backbone.
    EvalLinear(Box<commands::EvalLinearArgs>),
    /// Backbone features of a dataset to safetensors.
    Extract(Box<commands::ExtractArgs>),
    /// Per-head CLS attention maps of the last block as PNG (visualize_attention.py).
    Attention(Box<commands::AttentionArgs>),
    /// Export weights to safetensors with the official parameter names.
    Export(Box<commands::ExportArgs>),
    /// Draw the PNG plots of a training output dir from its log.jsonl (one chart per logged quantity and
    /// summary.png, in <dir>/plots), and a ViT's attention.png from its latest checkpoint; for a run still
    /// going or one that was stopped.
    Plot {
        /// The training output dir (holding log.jsonl).
        dir: PathBuf,
    },
    /// Describe a checkpoint or weights file: tensors, shapes, configuration, epoch.
    Info {
        /// A checkpoint (.safetensors / .json), a training output dir, or a weights file (.safetensors / .pth).
        path: PathBuf,
        /// List every tensor (by default only the groups when there are more than 64).
        #[arg(long)]
        all: bool,
    },
}

/// `dino train`: the training flags plus how to treat an existing checkpoint in the output dir.
#[derive(clap::Args, Debug)]
struct TrainCmd {
    #[command(flatten)]
    args: train_args::TrainArgs,
    /// Require a checkpoint in --output-dir and continue it (re-running with the same output dir also resumes).
    #[arg(long, conflicts_with = "no_resume")]
    resume: bool,
    /// Start afresh even if --output-dir holds a checkpoint (it is overwritten).
    #[arg(long)]
    no_resume: bool,
    /// Lengthen the run in --output-dir to --epochs (more than it was started with): the lr, weight-decay and
    /// teacher-momentum schedules are rebuilt for the new length, as the official code does on resume with a
    /// larger --epochs. Any other changed setting is still refused.
    #[arg(long, conflicts_with = "no_resume")]
    extend: bool,
    /// Do not write TensorBoard event files (by default the log's numbers also go to
    /// <output-dir>/tensorboard: `tensorboard --logdir <output-dir>`).
    #[arg(long)]
    no_tensorboard: bool,
    /// Stop (as if killed) once this many global iterations are complete; for tests of resume.
    #[arg(long, hide = true)]
    stop_after: Option<usize>,
}

fn main() {
    dino_train::runtime::tune_allocator();
    // Library warnings (e.g. a setting this CPU cannot honour) on stderr; RUST_LOG overrides the level.
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_target(false)
        .without_time()
        .init();
    // A panic is a bug, not a user error: one line, no backtrace.
    std::panic::set_hook(Box::new(|info| {
        let msg = info
            .payload()
            .downcast_ref::<&str>()
            .map(|s| s.to_string())
            .or_else(|| info.payload().downcast_ref::<String>().cloned())
            .unwrap_or_else(|| "unknown panic".to_string());
        // Except stdout or stderr closed by its reader (`dino info run | head`): quiet, with the status of a
        // process that SIGPIPE (13) ended, as other command-line tools do (Rust ignores SIGPIPE, so println!
        // panics). A training run ends as if killed: its last checkpoint resumes it.
        if msg.starts_with("failed printing to std") && msg.contains("Broken pipe") {
            std::process::exit(141);
        }
        let at = info
            .location()
            .map(|l| format!(" at {}:{}", l.file(), l.line()))
            .unwrap_or_default();
        error_line(&format!(
            "error: internal error (please report): {}{at}",
            one_line(&msg)
        ));
    }));
    let cli = match parse_cli() {
        Ok(c) => c,
        Err(e) => {
            use clap::error::ErrorKind;
            if matches!(
                e.kind(),
                ErrorKind::DisplayHelp
                    | ErrorKind::DisplayVersion
                    | ErrorKind::DisplayHelpOnMissingArgumentOrSubcommand
            ) {
                e.exit();
            }
            // clap names the flag and the value (and lists missing arguments) before its usage block: keep
            // that part, on one line.
            let text = e.render().to_string();
            let head: Vec<&str> = text
                .lines()
                .take_while(|l| !l.starts_with("Usage:") && !l.starts_with("For more information"))
                .map(str::trim)
                .filter(|l| !l.is_empty())
                .collect();
            let msg = head.join(" ");
            let msg = msg.strip_prefix("error: ").unwrap_or(&msg);
            error_line(&format!("error: {} (see `dino --help`)", one_line(msg)));
            std::process::exit(2);
        }
    };
    // The process group (MPI under mpirun/srun with the `mpi` feature) and this rank's threads, before any
    // compute starts a thread pool.
    let dist = match dino_train::dist::init(cli.threads) {
        Ok(d) => d,
        Err(e) => {
            error_line(&format!(
                "error: {}",
                dino_train::error::one_line_report(&e)
            ));
            std::process::exit(1);
        }
    };
    // The compute pool, with this rank's threads (`dist::init` set them) and the main thread one of them.
    dino_train::runtime::main_thread_in_pool();
    if dist.bound_below_share && dist.rank == 0 {
        eprintln!(
            "note: the launcher bound each rank to {} core(s), fewer than its share of this node, so each rank \
             runs {} thread(s); for more, launch with `mpirun --bind-to none` (or `--map-by socket:PE=<threads>`, \
             `srun --cpus-per-task=<threads>`) or pass --threads",
            dist.allowed_cores, dist.threads
        );
    }
    let status = run(cli);
    if let Err(e) = status {
        if dist.world_size > 1 {
            // One failed rank ends the whole job (MPI_Abort), naming itself.
            error_line(&format!(
                "error (rank {} of {}): {}",
                dist.rank,
                dist.world_size,
                dino_train::error::one_line_report(e.as_ref())
            ));
            // A non-finite loss is all-reduced, so every rank stops at the same step with this error: each
            // waits until all have said so, or the first rank's MPI_Abort could end another before its line.
            let collective = e.chain().any(|c| {
                matches!(
                    c.downcast_ref::<dino_train::error::Error>(),
                    Some(dino_train::error::Error::NonFiniteLoss { .. })
                )
            });
            if collective {
                let _ = dino_train::dist::barrier();
            }
            dino_train::dist::abort(1);
        }
        error_line(&format!(
            "error: {}",
            dino_train::error::one_line_report(e.as_ref())
        ));
        dino_train::dist::finalize();
        std::process::exit(1);
    }
    dino_train::dist::finalize();
    // A run stopped by a signal (after its checkpoint) exits as a shell reports a death by that signal.
    if let Ok(code @ 1..) = status {
        std::process::exit(code);
    }
}

/// Writes `line` and a newline to stderr in one `write` call. `eprintln!` writes its pieces one by one, and under
/// mpirun another process's output (its MPI_Abort notice) landed inside a rank's error line.
fn error_line(line: &str) {
    use std::io::Write;
    let _ = std::io::stderr().write_all(format!("{line}\n").as_bytes());
}

/// Collapses a message onto one line.
fn one_line(s: &str) -> String {
    s.split_whitespace().collect::<Vec<_>>().join(" ")
}

/// Runs the command; `Ok` carries the exit status.
fn run(cli: Cli) -> Result<i32> {
    let done = match cli.command {
        Command::Train(t) => {
            return commands::train(
                &t.args,
                commands::TrainFlags {
                    resume: t.resume || t.extend,
                    no_resume: t.no_resume,
                    extend: t.extend,
                    tensorboard: !t.no_tensorboard,
                    stop_after: t.stop_after,
                },
            )
        }
        Command::EvalKnn(a) => commands::eval_knn(&a),
        Command::EvalLinear(a) => commands::eval_linear(&a),
        Command::Extract(a) => commands::extract(&a),
        Command::Attention(a) => commands::attention(&a),
        // Single-process work: under mpirun, rank 0 does it once.
        _ if dino_core::collective::rank() != 0 => Ok(()),
        Command::Export(a) => commands::export(&a),
        Command::Plot { dir } => commands::plot(&dir),
        Command::Info { path, all } => info::run(&path, all),
    };
    done.map(|()| 0)
}
