//! `cargo xtask bench`: runs the step benchmark (the `bench_step` example of dino-cli, one process per case so that
//! each case's peak RSS is its own) and/or the criterion benches of the workspace, printing one JSON line per case.

use crate::summary::{self, Summary};
use anyhow::{bail, Context, Result};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

/// What to run.
#[derive(Debug, Clone)]
pub struct BenchArgs {
    /// Fewer iterations (a smoke run).
    pub quick: bool,
    /// Only the cases whose name contains one of these (all when empty).
    pub cases: Vec<String>,
    /// Run the step benchmark (the training step, forward-only, loader-fed and micro cases).
    pub step: bool,
    /// Run `cargo bench --workspace` (criterion) and report its estimates as JSON lines.
    pub criterion: bool,
    /// The step benchmark's linear-layer precision (`highest`, `bf16`, `both`: each case in f32 then in
    /// bf16, or `all`: both, then bf16 with the head's last layer in bf16 too), when given.
    pub matmul_precision: Option<String>,
    /// A Python with torch: after each training-step and forward case, the same in PyTorch
    /// (`xtask/pytorch/dino_step.py`) in fp32 and under bf16 autocast, baselines timed in the same run.
    pub pytorch: Option<PathBuf>,
    /// When PyTorch also runs under bf16 autocast (default [`PytorchBf16::Auto`]).
    pub pytorch_bf16: PytorchBf16,
    /// How many times the step benchmark runs its whole selection (default 1); each JSON line carries its
    /// `round`, and the run ends with the rounds' summary ([`crate::summary`]).
    pub rounds: usize,
    /// Where the summary goes (Markdown); stderr when not given.
    pub summary: Option<PathBuf>,
}

/// When `--pytorch` times PyTorch under bf16 autocast beside fp32.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum PytorchBf16 {
    /// Where the CPU has bf16 arithmetic (`avx512_bf16` or `amx_bf16` in /proc/cpuinfo; where that file cannot be
    /// read: always). Without it PyTorch emulates bf16: 256 s per step/cifar/4096 step on an AVX2-only EPYC, 11x
    /// its fp32 time, and hours for the larger configurations.
    #[default]
    Auto,
    /// Always.
    Always,
    /// Never: fp32 only.
    Never,
}

/// Whether a /proc/cpuinfo text names a bf16 arithmetic flag (`avx512_bf16`, `amx_bf16`) of x86, or `bf16` of
/// aarch64's Features.
fn cpuinfo_has_bf16(cpuinfo: &str) -> bool {
    cpuinfo
        .lines()
        .filter(|l| l.starts_with("flags") || l.starts_with("Features"))
        .flat_map(|l| l.split_whitespace())
        .any(|f| matches!(f, "avx512_bf16" | "amx_bf16" | "bf16"))
}

/// Whether this run times PyTorch under bf16 autocast; says why on stderr when `Auto` leaves it out.
fn pytorch_runs_bf16(mode: PytorchBf16) -> bool {
    match mode {
        PytorchBf16::Always => true,
        PytorchBf16::Never => false,
        PytorchBf16::Auto => match std::fs::read_to_string("/proc/cpuinfo") {
            Ok(info) if !cpuinfo_has_bf16(&info) => {
                eprintln!(
                    "--pytorch: bf16 autocast not timed: this CPU has no bf16 arithmetic (no avx512_bf16 or \
                     amx_bf16 in /proc/cpuinfo), where PyTorch emulates it at a fraction of its fp32 speed; \
                     --pytorch-bf16 always times it anyway"
                );
                false
            }
            _ => true,
        },
    }
}

fn cargo() -> String {
    std::env::var("CARGO").unwrap_or_else(|_| "cargo".to_string())
}

fn target_dir(root: &Path) -> PathBuf {
    std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| root.join("target"))
}

/// Runs what `args` selects from the workspace at `root`.
pub fn run(root: &Path, args: &BenchArgs) -> Result<()> {
    if args.step {
        run_step(root, args)?;
    }
    if args.criterion {
        run_criterion(root, args)?;
    }
    Ok(())
}

fn run_step(root: &Path, args: &BenchArgs) -> Result<()> {
    let status = Command::new(cargo())
        .args([
            "build",
            "--release",
            "--quiet",
            "-p",
            "dino-cli",
            "--example",
            "bench_step",
        ])
        .current_dir(root)
        .status()
        .context("cannot run cargo build")?;
    if !status.success() {
        bail!("building the bench_step example failed ({status})");
    }
    let exe = target_dir(root).join("release/examples/bench_step");
    let list = Command::new(&exe)
        .arg("--list")
        .output()
        .with_context(|| format!("cannot run {}", exe.display()))?;
    if !list.status.success() {
        bail!(
            "{} --list failed: {}",
            exe.display(),
            String::from_utf8_lossy(&list.stderr).trim()
        );
    }
    let all: Vec<String> = String::from_utf8_lossy(&list.stdout)
        .lines()
        .map(|l| l.trim().to_string())
        .filter(|l| !l.is_empty())
        .collect();
    let chosen: Vec<&String> = all
        .iter()
        .filter(|c| args.cases.is_empty() || args.cases.iter().any(|f| c.contains(f.as_str())))
        .collect();
    if chosen.is_empty() {
        bail!(
            "no benchmark case matches {:?}; the cases are: {}",
            args.cases,
            all.join(", ")
        );
    }
    let pytorch_bf16 = args.pytorch.is_some() && pytorch_runs_bf16(args.pytorch_bf16);
    let mut failed = Vec::new();
    let mut summary = Summary::default();
    // Each dino-rs run of a case: its --matmul-precision and whether the head's last layer takes it too.
    let precisions: Vec<(Option<&str>, bool)> = match args.matmul_precision.as_deref() {
        Some("both") => vec![(Some("highest"), false), (Some("bf16"), false)],
        Some("all") => vec![
            (Some("highest"), false),
            (Some("bf16"), false),
            (Some("bf16"), true),
        ],
        other => vec![(other, false)],
    };
    let plan = Plan {
        root,
        args,
        exe: &exe,
        precisions: &precisions,
        pytorch_bf16,
    };
    for round in 1..=args.rounds.max(1) {
        if args.rounds > 1 {
            eprintln!("bench: round {round} of {}", args.rounds);
        }
        for case in &chosen {
            run_case(&plan, case, round, &mut summary, &mut failed)?;
        }
    }
    if args.rounds > 1 || args.pytorch.is_some() || args.summary.is_some() {
        let text = summary.markdown();
        match &args.summary {
            Some(path) => std::fs::write(path, &text)
                .with_context(|| format!("cannot write the summary to {}", path.display()))?,
            None => eprintln!("\n{text}"),
        }
    }
    if !failed.is_empty() {
        bail!("benchmark cases failed: {}", failed.join(", "));
    }
    Ok(())
}

/// Prints a case's JSON line with its `round` added and adds it to the summary. A line the summary cannot read
/// is still printed as it came, with a warning: a long run is not stopped for its summary.
fn emit(line: &str, round: usize, summary: &mut Summary) {
    let mut v: serde_json::Value = match serde_json::from_str(line) {
        Ok(v) => v,
        Err(e) => {
            println!("{line}");
            eprintln!(
                "bench: a case printed a line that is not JSON ({e}); left out of the summary"
            );
            return;
        }
    };
    if let Some(obj) = v.as_object_mut() {
        obj.insert("round".to_string(), round.into());
    }
    println!("{v}");
    let added = summary::parse_value(&v, round)
        .and_then(|parsed| parsed.map_or(Ok(()), |p| summary.add_line(p)));
    if let Err(e) = added {
        eprintln!("bench: left out of the summary: {e:#}");
    }
}

/// What every case of a step benchmark run does.
struct Plan<'a> {
    root: &'a Path,
    args: &'a BenchArgs,
    /// The `bench_step` binary.
    exe: &'a Path,
    /// Each dino-rs run of a case: its --matmul-precision and whether the head's last layer takes it too.
    precisions: &'a [(Option<&'a str>, bool)],
    /// Whether PyTorch also runs under bf16 autocast.
    pytorch_bf16: bool,
}

/// One timed run of a case: dino-rs at one of the plan's precisions (its index), or PyTorch (bf16 autocast or fp32).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Engine {
    Dino(usize),
    Torch { bf16: bool },
}

/// The order of a case's runs in `round`: dino-rs's precisions, then PyTorch fp32 and bf16 autocast; in even
/// rounds the reverse. A run right after another can be slower or faster for reasons of the machine (the
/// log's twenty-third session: the second of a pair 8-26% slower in 5 of 7 pairs), and a fixed order would put
/// that into every ratio; alternating it cancels it in the median over rounds.
fn run_order(round: usize, dino_runs: usize, torch_bf16: Option<bool>) -> Vec<Engine> {
    let mut order: Vec<Engine> = (0..dino_runs).map(Engine::Dino).collect();
    if let Some(bf16) = torch_bf16 {
        order.push(Engine::Torch { bf16: false });
        if bf16 {
            order.push(Engine::Torch { bf16: true });
        }
    }
    if round.is_multiple_of(2) {
        order.reverse();
    }
    order
}

/// One case of one round: dino-rs in each of the plan's precisions and PyTorch's modes where asked, in
/// [`run_order`].
fn run_case(
    plan: &Plan,
    case: &str,
    round: usize,
    summary: &mut Summary,
    failed: &mut Vec<String>,
) -> Result<()> {
    let Plan {
        root,
        args,
        exe,
        precisions,
        pytorch_bf16,
    } = *plan;
    let pytorch_case = case
        .strip_prefix("step/")
        .map(|c| (c, false))
        .or_else(|| case.strip_prefix("forward/").map(|c| (c, true)));
    let torch = match (&args.pytorch, pytorch_case) {
        (Some(python), Some((cfg, forward))) => Some((python, cfg, forward)),
        _ => None,
    };
    for engine in run_order(round, precisions.len(), torch.map(|_| pytorch_bf16)) {
        match engine {
            Engine::Dino(i) => {
                let (precision, head_bf16) = precisions[i];
                let mut cmd = Command::new(exe);
                cmd.args(["--case", case]);
                if args.quick {
                    cmd.arg("--quick");
                }
                if let Some(p) = precision {
                    cmd.args(["--matmul-precision", p]);
                }
                if head_bf16 {
                    cmd.arg("--head-last-layer-bf16");
                }
                // Each case prints its JSON line on stdout; progress goes to stderr, passed through.
                let out = cmd
                    .stderr(Stdio::inherit())
                    .output()
                    .with_context(|| format!("cannot run {}", exe.display()))?;
                let stdout = String::from_utf8_lossy(&out.stdout);
                for line in stdout.lines().filter(|l| l.starts_with('{')) {
                    emit(line, round, summary);
                }
                if !out.status.success() {
                    failed.push(format!("{case} ({})", precision.unwrap_or("highest")));
                }
            }
            Engine::Torch { bf16 } => {
                // `run_order` yields PyTorch's runs only where `torch` is set.
                let Some((python, cfg, forward)) = torch else {
                    continue;
                };
                let (ok, lines) = run_pytorch(root, python, cfg, forward, bf16, args.quick)?;
                for line in lines {
                    emit(&line, round, summary);
                }
                if !ok {
                    let mode = if bf16 { "bf16 autocast" } else { "fp32" };
                    failed.push(format!("{case} (PyTorch {mode})"));
                }
            }
        }
    }
    Ok(())
}

/// The PyTorch step (or with `forward`, the forward passes) of `cfg` (e.g. `imagenet/65536`), in fp32 or under
/// bf16 autocast: whether it succeeded, and its JSON lines.
fn run_pytorch(
    root: &Path,
    python: &Path,
    cfg: &str,
    forward: bool,
    bf16: bool,
    quick: bool,
) -> Result<(bool, Vec<String>)> {
    let script = root.join("xtask/pytorch/dino_step.py");
    let mut cmd = Command::new(python);
    cmd.arg(&script).args(["--case", cfg]);
    if forward {
        cmd.arg("--forward");
    }
    if quick {
        cmd.args(["--steps", "3", "--warmup", "1"]);
    }
    if bf16 {
        cmd.arg("--bf16");
    }
    let out = cmd.stderr(Stdio::piped()).output().with_context(|| {
        format!(
            "--pytorch: cannot run {} {}",
            python.display(),
            script.display()
        )
    })?;
    let lines: Vec<String> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter(|l| l.starts_with('{'))
        .map(str::to_string)
        .collect();
    if !out.status.success() {
        let err = String::from_utf8_lossy(&out.stderr);
        let last = err.lines().last().unwrap_or("").trim();
        if last.contains("No module named 'torch'") {
            bail!(
                "--pytorch {}: this Python has no torch (pip install torch==2.15.0, the version of baseline.md)",
                python.display()
            );
        }
        eprintln!("PyTorch step {cfg} failed: {last}");
    }
    Ok((out.status.success(), lines))
}

fn run_criterion(root: &Path, args: &BenchArgs) -> Result<()> {
    let mut cmd = Command::new(cargo());
    cmd.args(["bench", "--workspace", "--benches", "--"]);
    if args.quick {
        cmd.args([
            "--warm-up-time",
            "1",
            "--measurement-time",
            "2",
            "--sample-size",
            "10",
        ]);
    }
    for f in &args.cases {
        cmd.arg(f);
    }
    let status = cmd
        .current_dir(root)
        .stdout(Stdio::null())
        .status()
        .context("cannot run cargo bench")?;
    if !status.success() {
        bail!("cargo bench failed ({status})");
    }
    let dir = target_dir(root).join("criterion");
    let mut found = Vec::new();
    collect_estimates(&dir, &mut found)?;
    found.sort();
    for (id, est) in found {
        println!("{}", criterion_line(&id, &est)?);
    }
    Ok(())
}

/// Walks `target/criterion` for `<bench>/new/{benchmark,estimates}.json` pairs.
fn collect_estimates(dir: &Path, out: &mut Vec<(String, PathBuf)>) -> Result<()> {
    let Ok(rd) = std::fs::read_dir(dir) else {
        return Ok(());
    };
    for e in rd.flatten() {
        let p = e.path();
        if p.is_dir() {
            if p.file_name().is_some_and(|n| n == "new") {
                let bench = p.join("benchmark.json");
                let est = p.join("estimates.json");
                if bench.is_file() && est.is_file() {
                    let b: serde_json::Value = serde_json::from_str(
                        &std::fs::read_to_string(&bench)
                            .with_context(|| format!("cannot read {}", bench.display()))?,
                    )
                    .with_context(|| format!("{} is not JSON", bench.display()))?;
                    let id = b["full_id"].as_str().unwrap_or("?").to_string();
                    out.push((id, est));
                }
            } else if p.file_name().is_some_and(|n| n != "report" && n != "base") {
                collect_estimates(&p, out)?;
            }
        }
    }
    Ok(())
}

/// One JSON line from a criterion `estimates.json` (times in seconds).
fn criterion_line(id: &str, est: &Path) -> Result<String> {
    let v: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(est).with_context(|| format!("cannot read {}", est.display()))?,
    )
    .with_context(|| format!("{} is not JSON", est.display()))?;
    let ns = |k: &str| v[k]["point_estimate"].as_f64().map(|x| x * 1e-9);
    Ok(serde_json::json!({
        "case": id,
        "source": "criterion",
        "median_s": ns("median"),
        "mean_s": ns("mean"),
        "std_dev_s": ns("std_dev"),
    })
    .to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bf16_arithmetic_is_read_from_cpuinfo_flags() {
        let zen1 = "processor\t: 0\nflags\t\t: fpu sse avx2 fma avx512f\n";
        assert!(!cpuinfo_has_bf16(zen1));
        assert!(cpuinfo_has_bf16("flags\t\t: avx2 avx512f avx512_bf16\n"));
        assert!(cpuinfo_has_bf16("flags\t\t: avx2 amx_bf16 amx_tile\n"));
        assert!(cpuinfo_has_bf16("Features\t: fp asimd bf16 i8mm\n"));
        // A word that only contains the name does not count, nor does a line other than the flags.
        assert!(!cpuinfo_has_bf16(
            "flags\t\t: avx512_bf16x\nmodel name\t: bf16 avx512_bf16\n"
        ));
    }

    #[test]
    fn even_rounds_run_the_engines_in_reverse_order() {
        use Engine::*;
        let odd = vec![
            Dino(0),
            Dino(1),
            Dino(2),
            Torch { bf16: false },
            Torch { bf16: true },
        ];
        assert_eq!(run_order(1, 3, Some(true)), odd);
        assert_eq!(run_order(3, 3, Some(true)), odd);
        let mut even = odd.clone();
        even.reverse();
        assert_eq!(run_order(2, 3, Some(true)), even);
        // Without PyTorch's bf16, or without PyTorch at all.
        assert_eq!(
            run_order(2, 1, Some(false)),
            vec![Torch { bf16: false }, Dino(0)]
        );
        assert_eq!(run_order(2, 2, None), vec![Dino(1), Dino(0)]);
    }

    #[test]
    fn a_line_the_summary_cannot_read_does_not_stop_the_run() {
        let mut summary = Summary::default();
        emit("{not json", 1, &mut summary);
        emit(
            r#"{"case":"step/c","impl":"pytorch","precision":"fp16","images_per_s":1.0}"#,
            1,
            &mut summary,
        );
        assert!(summary.is_empty());
        emit(
            r#"{"case":"step/c","matmul_precision":"highest","images_per_s":2.0}"#,
            3,
            &mut summary,
        );
        assert!(!summary.is_empty());
        assert!(summary.markdown().contains("| step/c | 2.00 (2.00) |"));
    }

    #[test]
    fn criterion_estimates_become_json_lines() {
        let dir = tempfile::tempdir().unwrap();
        let new = dir.path().join("criterion/group/case/new");
        std::fs::create_dir_all(&new).unwrap();
        std::fs::write(new.join("benchmark.json"), r#"{"full_id":"group/case"}"#).unwrap();
        std::fs::write(
            new.join("estimates.json"),
            r#"{"mean":{"point_estimate":2.0e6},"median":{"point_estimate":1.5e6},"std_dev":{"point_estimate":1.0e3}}"#,
        )
        .unwrap();
        let mut found = Vec::new();
        collect_estimates(&dir.path().join("criterion"), &mut found).unwrap();
        assert_eq!(found.len(), 1);
        let line = criterion_line(&found[0].0, &found[0].1).unwrap();
        let v: serde_json::Value = serde_json::from_str(&line).unwrap();
        assert_eq!(v["case"], "group/case");
        assert!((v["median_s"].as_f64().unwrap() - 1.5e-3).abs() < 1e-12);
        assert!((v["mean_s"].as_f64().unwrap() - 2.0e-3).abs() < 1e-12);
    }
}
