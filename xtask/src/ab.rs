//! `cargo xtask bench-ab`: interleaved A/B(/C...) rounds of `bench_step` binaries (or of one binary under
//! different environments), the way a speed claim about a change is measured here. Each round runs every
//! variant once per case, the variants' order rotated by one place per round, so that every variant runs in
//! every position equally often: on these VMs the position alone moves a run by ~10% (a run right after a long
//! one is slower), and a fixed order turns that into a false gain or loss. The summary gives per-round ratios
//! to the first variant (images/s and the minimum step time), their median and range, each variant's median
//! time per phase (a change to the backward pass that moves the forward phases too points at the machine), and
//! each position's median speed against its round's mean, which shows the order effect of the run itself.

use crate::summary::{joined, median, range};
use anyhow::{bail, Context, Result};
use std::fmt::Write as _;
use std::path::PathBuf;
use std::process::Command;

/// One variant: a `bench_step` binary and the environment it runs under.
#[derive(Debug, Clone, PartialEq)]
pub struct Variant {
    /// Its name in the summary.
    pub name: String,
    /// The `bench_step` binary.
    pub binary: PathBuf,
    /// Extra environment variables, `(name, value)`.
    pub env: Vec<(String, String)>,
}

impl std::str::FromStr for Variant {
    type Err = String;
    /// `NAME=PATH [VAR=VALUE]...`, e.g. `old=/tmp/bench_step_old` or `f32gelu=target/release/examples/bench_step
    /// DINO_BF16_GEMM=f32`.
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        let (name, rest) = s
            .split_once('=')
            .filter(|(n, _)| !n.trim().is_empty())
            .ok_or_else(|| format!("`{s}`: expected NAME=PATH [VAR=VALUE]..."))?;
        let mut words = rest.split_whitespace();
        let binary = words
            .next()
            .ok_or_else(|| format!("`{s}`: no binary after `{name}=`"))?;
        let env = words
            .map(|w| {
                w.split_once('=')
                    .filter(|(k, _)| !k.is_empty())
                    .map(|(k, v)| (k.to_string(), v.to_string()))
                    .ok_or_else(|| format!("`{w}` in `{s}`: expected VAR=VALUE"))
            })
            .collect::<std::result::Result<_, _>>()?;
        Ok(Variant {
            name: name.trim().to_string(),
            binary: PathBuf::from(binary),
            env,
        })
    }
}

/// What `bench-ab` runs.
#[derive(Debug, Clone)]
pub struct AbArgs {
    /// At least two variants; ratios are to the first.
    pub variants: Vec<Variant>,
    /// `bench_step` cases, e.g. `step/cifar/4096`.
    pub cases: Vec<String>,
    /// `--matmul-precision` for every run (highest or bf16).
    pub matmul_precision: String,
    /// Rounds (each variant once per case per round).
    pub rounds: usize,
    /// Where the JSON lines go (each with `variant`, `round` and `position` added).
    pub out: Option<PathBuf>,
}

/// The variants' order in `round` (0-based): the list rotated by `round` places, so that over any `n`
/// consecutive rounds each of the `n` variants runs once in each position.
pub fn order(n: usize, round: usize) -> Vec<usize> {
    (0..n).map(|i| (i + round) % n.max(1)).collect()
}

/// One timed run of a variant.
#[derive(Debug, Clone, PartialEq)]
pub struct AbRun {
    /// The case.
    pub case: String,
    /// The variant's index in [`AbArgs::variants`].
    pub variant: usize,
    /// The round (0-based).
    pub round: usize,
    /// Its position in the round's order for this case (0 = first).
    pub position: usize,
    /// Images per second.
    pub images_per_s: f64,
    /// The fastest step, seconds.
    pub min_step_s: f64,
    /// The median seconds of each phase (`phase_seconds_median`: teacher_forward, student_forward, backward...).
    pub phases: Vec<(String, f64)>,
}

/// Run the rounds, write the lines, return the summary (Markdown).
pub fn run(args: &AbArgs) -> Result<String> {
    if args.variants.len() < 2 {
        bail!("bench-ab: give at least two --variant NAME=PATH");
    }
    if args.cases.is_empty() {
        bail!("bench-ab: give at least one --case (e.g. step/cifar/4096)");
    }
    for v in &args.variants {
        if !v.binary.is_file() {
            bail!(
                "bench-ab: variant `{}`: no binary at {} (build one with `cargo build --release -p dino-cli \
                 --example bench_step` and copy target/release/examples/bench_step aside)",
                v.name,
                v.binary.display()
            );
        }
    }
    let mut out = match &args.out {
        Some(p) => Some(
            std::fs::File::create(p).with_context(|| format!("cannot create {}", p.display()))?,
        ),
        None => None,
    };
    let n = args.variants.len();
    if !args.rounds.is_multiple_of(n) {
        eprintln!(
            "bench-ab: {} rounds for {n} variants: the positions are not balanced (use a multiple of {n})",
            args.rounds
        );
    }
    let mut runs = Vec::new();
    for round in 0..args.rounds {
        for case in &args.cases {
            for (position, vi) in order(n, round).into_iter().enumerate() {
                let v = &args.variants[vi];
                let mut value = run_one(v, case, &args.matmul_precision)?;
                let run = AbRun {
                    case: case.clone(),
                    variant: vi,
                    round,
                    position,
                    images_per_s: value["images_per_s"].as_f64().with_context(|| {
                        format!("variant `{}`, {case}: no images_per_s in its line", v.name)
                    })?,
                    min_step_s: value["seconds_per_step_min"].as_f64().unwrap_or(f64::NAN),
                    phases: value["phase_seconds_median"]
                        .as_object()
                        .map(|m| {
                            m.iter()
                                .filter_map(|(k, v)| Some((k.clone(), v.as_f64()?)))
                                .collect()
                        })
                        .unwrap_or_default(),
                };
                eprintln!(
                    "round {} {case} {}: {:.2} images/s",
                    round + 1,
                    v.name,
                    run.images_per_s
                );
                if let Some(f) = out.as_mut() {
                    use std::io::Write as _;
                    value["variant"] = v.name.clone().into();
                    value["round"] = (round + 1).into();
                    value["position"] = (position + 1).into();
                    writeln!(f, "{value}")?;
                }
                runs.push(run);
            }
        }
    }
    let names: Vec<&str> = args.variants.iter().map(|v| v.name.as_str()).collect();
    Ok(summary(&names, &args.cases, &runs))
}

/// One run of `v` on `case`: its last JSON line.
fn run_one(v: &Variant, case: &str, precision: &str) -> Result<serde_json::Value> {
    let o = Command::new(&v.binary)
        .args(["--case", case, "--matmul-precision", precision])
        .envs(v.env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
        .output()
        .with_context(|| format!("cannot run {} (variant `{}`)", v.binary.display(), v.name))?;
    let stdout = String::from_utf8_lossy(&o.stdout);
    let line = stdout
        .lines()
        .rev()
        .find(|l| l.trim_start().starts_with('{'));
    match (o.status.success(), line) {
        (true, Some(l)) => serde_json::from_str(l)
            .with_context(|| format!("variant `{}`, {case}: unreadable line {l}", v.name)),
        _ => {
            let err = String::from_utf8_lossy(&o.stderr);
            // Its last 600 characters.
            let from = err.char_indices().rev().nth(599).map_or(0, |(i, _)| i);
            let tail = &err[from..];
            bail!(
                "variant `{}`, {case}: {} gave no result ({}): {tail}",
                v.name,
                v.binary.display(),
                o.status
            )
        }
    }
}

/// The Markdown summary of `runs` (see the module comment).
pub fn summary(names: &[&str], cases: &[String], runs: &[AbRun]) -> String {
    let mut s = String::new();
    let rounds = runs.iter().map(|r| r.round + 1).max().unwrap_or(0);
    let _ = writeln!(
        s,
        "bench-ab: {} variants, {rounds} rounds, order rotated by one place per round; ratios to `{}`, per \
         round (median [range]).\n",
        names.len(),
        names[0]
    );
    let _ = writeln!(
        s,
        "| case | variant | images/s per round (median) | images/s ratio | min-step speed ratio |"
    );
    let _ = writeln!(s, "|---|---|---|---|---|");
    let find = |case: &str, v: usize, round: usize| {
        runs.iter()
            .find(|r| r.case == case && r.variant == v && r.round == round)
    };
    for case in cases {
        for (vi, name) in names.iter().enumerate() {
            let mine: Vec<&AbRun> = (0..rounds).filter_map(|r| find(case, vi, r)).collect();
            let ips: Vec<f64> = mine.iter().map(|r| r.images_per_s).collect();
            let (mut by_ips, mut by_min) = (Vec::new(), Vec::new());
            for r in &mine {
                if let Some(base) = find(case, 0, r.round) {
                    by_ips.push(r.images_per_s / base.images_per_s);
                    by_min.push(base.min_step_s / r.min_step_s);
                }
            }
            let _ = writeln!(
                s,
                "| {case} | {name} | {} ({}) | {} | {} |",
                joined(&ips, 2),
                median(&ips).map_or("-".into(), |m| format!("{m:.2}")),
                ratio_cell(&by_ips),
                ratio_cell(&by_min),
            );
        }
    }
    // Where a difference lies: each variant's median per phase (a change to the backward pass that moves the
    // forward phases too points at the machine, not at the change).
    let phase_names: Vec<&str> = ["teacher_forward", "student_forward", "backward"]
        .into_iter()
        .filter(|p| runs.iter().any(|r| r.phases.iter().any(|(k, _)| k == p)))
        .collect();
    if !phase_names.is_empty() {
        let _ = writeln!(
            s,
            "\n| case | variant | {} (median ms) |\n|---|---|---|",
            phase_names.join(" / ")
        );
        for case in cases {
            for (vi, name) in names.iter().enumerate() {
                let cells: Vec<String> = phase_names
                    .iter()
                    .map(|p| {
                        let xs: Vec<f64> = runs
                            .iter()
                            .filter(|r| r.case == *case && r.variant == vi)
                            .filter_map(|r| {
                                r.phases.iter().find(|(k, _)| k == p).map(|x| x.1 * 1e3)
                            })
                            .collect();
                        median(&xs).map_or("-".into(), |m| format!("{m:.0}"))
                    })
                    .collect();
                let _ = writeln!(s, "| {case} | {name} | {} |", cells.join(" / "));
            }
        }
    }
    // The order effect: each position's images/s over its round's mean, all variants and cases together.
    let mut by_pos: Vec<Vec<f64>> = vec![Vec::new(); names.len()];
    for case in cases {
        for round in 0..rounds {
            let these: Vec<&AbRun> = runs
                .iter()
                .filter(|r| r.case == *case && r.round == round)
                .collect();
            if these.len() != names.len() {
                continue;
            }
            let mean = these.iter().map(|r| r.images_per_s).sum::<f64>() / these.len() as f64;
            for r in these {
                by_pos[r.position].push(r.images_per_s / mean);
            }
        }
    }
    let cells: Vec<String> = by_pos
        .iter()
        .enumerate()
        .map(|(p, xs)| {
            format!(
                "position {}: {}",
                p + 1,
                median(xs).map_or("-".into(), |m| format!("{m:.3}"))
            )
        })
        .collect();
    let _ = writeln!(
        s,
        "\nOrder effect of this run (images/s over the round's mean, median over rounds and cases): {}.",
        cells.join(", ")
    );
    s
}

/// `median [min-max]` of ratios, or `-`.
fn ratio_cell(xs: &[f64]) -> String {
    match median(xs) {
        None => "-".into(),
        Some(m) => {
            let (lo, hi) = range(xs);
            format!("**{m:.3}x** [{lo:.2}-{hi:.2}]")
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_variant_takes_every_position_equally_often() {
        for n in 2..=5 {
            let mut count = vec![vec![0usize; n]; n];
            for round in 0..2 * n {
                let o = order(n, round);
                let mut sorted = o.clone();
                sorted.sort();
                assert_eq!(sorted, (0..n).collect::<Vec<_>>(), "round {round}: {o:?}");
                for (pos, v) in o.into_iter().enumerate() {
                    count[v][pos] += 1;
                }
            }
            assert!(
                count.iter().flatten().all(|&c| c == 2),
                "{n} variants: {count:?}"
            );
        }
    }

    #[test]
    fn variants_parse_with_their_environment_and_refuse_bad_specs() {
        let v: Variant = "old=/tmp/b DINO_BF16_GEMM=f32 X=1".parse().unwrap();
        assert_eq!(v.name, "old");
        assert_eq!(v.binary, PathBuf::from("/tmp/b"));
        assert_eq!(
            v.env,
            vec![
                ("DINO_BF16_GEMM".to_string(), "f32".to_string()),
                ("X".to_string(), "1".to_string())
            ]
        );
        for bad in ["/tmp/b", "=/tmp/b", "old=", "old=/tmp/b NOEQUALS"] {
            let e = bad.parse::<Variant>().unwrap_err();
            assert!(
                e.contains(bad.split_whitespace().last().unwrap()),
                "{bad}: {e}"
            );
        }
    }

    fn run(case: &str, variant: usize, round: usize, position: usize, ips: f64) -> AbRun {
        AbRun {
            case: case.into(),
            variant,
            round,
            position,
            images_per_s: ips,
            min_step_s: 1.0 / ips,
            phases: vec![
                ("teacher_forward".into(), 0.1 / ips),
                ("backward".into(), 0.2 / ips),
            ],
        }
    }

    #[test]
    fn ratios_pair_the_same_round_and_the_order_effect_shows() {
        // b is 10% faster than a in every round; whoever runs second loses 20% of its speed.
        let mut runs = Vec::new();
        for round in 0..4 {
            for (pos, v) in order(2, round).into_iter().enumerate() {
                let base = [10.0, 11.0][v] * (1.0 + round as f64);
                runs.push(run(
                    "c",
                    v,
                    round,
                    pos,
                    base * if pos == 1 { 0.8 } else { 1.0 },
                ));
            }
        }
        let s = summary(&["a", "b"], &["c".to_string()], &runs);
        // Per-round ratios b/a: 1.1 * 0.8 = 0.88 (b second) or 1.1 / 0.8 = 1.375 (a second), two of each: the
        // median 1.1275 (a fixed order would read 0.88 every round).
        assert!(s.contains("| c | b |"), "{s}");
        assert!(
            s.contains("**1.127x** [0.88-1.38]") || s.contains("**1.128x** [0.88-1.38]"),
            "{s}"
        );
        assert!(
            s.contains("| c | a |") && s.contains("**1.000x** [1.00-1.00]"),
            "{s}"
        );
        // Over the round's mean the first run reads 10 / 9.4 or 11 / 9.5 (median 1.111), the second 0.889.
        assert!(s.contains("position 1: 1.111, position 2: 0.889"), "{s}");
        // The phase medians (ms) per variant, only the phases the lines carry as columns: a's teacher forward
        // takes 100 / images/s ms in each round, its backward twice that.
        assert!(
            s.contains("| case | variant | teacher_forward / backward (median ms) |"),
            "{s}"
        );
        let a_tf: Vec<f64> = runs
            .iter()
            .filter(|r| r.variant == 0)
            .map(|r| 100.0 / r.images_per_s)
            .collect();
        let m = median(&a_tf).unwrap();
        let want = format!("| c | a | {m:.0} / {:.0} |", 2.0 * m);
        assert!(s.contains(&want), "{want} in {s}");
    }

    #[test]
    fn a_missing_binary_is_named_before_anything_runs() {
        let args = AbArgs {
            variants: vec![
                "a=/nonexistent/bench_step_a".parse().unwrap(),
                "b=/nonexistent/bench_step_b".parse().unwrap(),
            ],
            cases: vec!["step/cifar/4096".into()],
            matmul_precision: "highest".into(),
            rounds: 2,
            out: None,
        };
        let e = super::run(&args).unwrap_err().to_string();
        assert!(
            e.contains("`a`") && e.contains("/nonexistent/bench_step_a"),
            "{e}"
        );
    }

    /// The whole loop against a stand-in `bench_step` (a shell script whose speed comes from its environment):
    /// the environment reaches each variant, the lines carry variant, round and position.
    #[cfg(unix)]
    #[test]
    fn rounds_run_each_variant_with_its_environment() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let bin = dir.path().join("fake_bench_step");
        std::fs::write(
            &bin,
            "#!/bin/sh\necho \"warming up $2\" >&2\n\
             echo \"{\\\"case\\\":\\\"$2\\\",\\\"images_per_s\\\":${SPEED:-1},\\\"seconds_per_step_min\\\":0.5}\"\n",
        )
        .unwrap();
        std::fs::set_permissions(&bin, std::fs::Permissions::from_mode(0o755)).unwrap();
        let out = dir.path().join("ab.jsonl");
        let args = AbArgs {
            variants: vec![
                format!("slow={} SPEED=10", bin.display()).parse().unwrap(),
                format!("fast={} SPEED=15", bin.display()).parse().unwrap(),
            ],
            cases: vec!["step/x".into()],
            matmul_precision: "bf16".into(),
            rounds: 2,
            out: Some(out.clone()),
        };
        let s = super::run(&args).unwrap();
        assert!(
            s.contains("| step/x | fast | 15.00 / 15.00 (15.00) | **1.500x** [1.50-1.50]"),
            "{s}"
        );
        let lines: Vec<serde_json::Value> = std::fs::read_to_string(&out)
            .unwrap()
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        let seen: Vec<(String, u64, u64)> = lines
            .iter()
            .map(|v| {
                (
                    v["variant"].as_str().unwrap().to_string(),
                    v["round"].as_u64().unwrap(),
                    v["position"].as_u64().unwrap(),
                )
            })
            .collect();
        assert_eq!(
            seen,
            vec![
                ("slow".into(), 1, 1),
                ("fast".into(), 1, 2),
                ("fast".into(), 2, 1),
                ("slow".into(), 2, 2)
            ]
        );
        // A variant whose binary fails is named, with its stderr.
        let failing = dir.path().join("failing");
        std::fs::write(&failing, "#!/bin/sh\necho 'no such case' >&2\nexit 2\n").unwrap();
        std::fs::set_permissions(&failing, std::fs::Permissions::from_mode(0o755)).unwrap();
        let args = AbArgs {
            variants: vec![
                format!("ok={}", bin.display()).parse().unwrap(),
                format!("broken={}", failing.display()).parse().unwrap(),
            ],
            out: None,
            ..args
        };
        let e = super::run(&args).unwrap_err().to_string();
        assert!(e.contains("`broken`") && e.contains("no such case"), "{e}");
    }
}
