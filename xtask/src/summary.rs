//! The summary of interleaved benchmark rounds: `cargo xtask bench --rounds N` prints it at the end, and
//! `cargo xtask bench-summary FILE...` makes it from saved JSON lines. For each case it gives every engine's
//! images/s per round with their median, and the per-round ratios of dino-rs to PyTorch's same mode (and of
//! each side's best mode) with their median and range: on a noisy machine the median of per-round ratios of
//! runs made minutes apart is the figure to quote, not a ratio of two medians. Where the run has the `ceiling`
//! case too, it gives each dino-rs mode's GFLOP/s as a fraction of this CPU's register-only ceiling for the
//! path its linear layers took.

use anyhow::{bail, Context, Result};
use std::collections::BTreeMap;
use std::fmt::Write as _;

/// One engine and mode of a case: a column of the summary.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Mode {
    /// dino-rs, f32 products (`--matmul-precision highest`).
    F32,
    /// dino-rs, `--matmul-precision bf16`.
    Bf16,
    /// dino-rs, `--matmul-precision bf16 --head-last-layer-bf16`.
    Bf16Head,
    /// PyTorch fp32.
    TorchFp32,
    /// PyTorch under bf16 autocast.
    TorchBf16,
}

impl Mode {
    const ALL: [Mode; 5] = [
        Mode::F32,
        Mode::Bf16,
        Mode::Bf16Head,
        Mode::TorchFp32,
        Mode::TorchBf16,
    ];

    fn title(self) -> &'static str {
        match self {
            Mode::F32 => "dino-rs f32",
            Mode::Bf16 => "dino-rs bf16",
            Mode::Bf16Head => "dino-rs bf16, head too",
            Mode::TorchFp32 => "PyTorch fp32",
            Mode::TorchBf16 => "PyTorch bf16 autocast",
        }
    }
}

/// One measured run: a JSON line of `bench_step` or `dino_step.py`.
#[derive(Debug, Clone, PartialEq)]
pub struct Run {
    /// The case, e.g. `step/cifar/4096`.
    pub case: String,
    /// The engine and mode.
    pub mode: Mode,
    /// The round it belongs to (1-based).
    pub round: usize,
    /// Images per second.
    pub images_per_s: f64,
    /// The CPU `bench_step` reported (dino-rs lines only).
    pub cpu: Option<String>,
    /// The GEMM path its products took (dino-rs lines only).
    pub gemm_path: Option<String>,
    /// The step's executed GFLOP/s (dino-rs lines only).
    pub gflop_per_s: Option<f64>,
}

/// What one JSON line holds for the summary.
#[derive(Debug, Clone, PartialEq)]
pub enum Line {
    /// A timed case.
    Run(Run),
    /// The `ceiling` case: each register-only loop's GFLOP/s on all threads (`None`: not run on this CPU).
    Ceilings(Vec<(String, Option<f64>)>),
}

/// The register-only loop (`bench_step --case ceiling`'s name) that bounds a GEMM path (`gemm_path`'s text).
pub fn ceiling_of_path(gemm_path: &str) -> Option<&'static str> {
    if gemm_path.starts_with("bf16: dino-kernels AMX") {
        Some("bf16_amx")
    } else if gemm_path.starts_with("bf16: dino-kernels vdpbf16ps") {
        Some("bf16_avx512")
    } else if gemm_path.starts_with("f32: gemm 0.19 AVX-512") {
        Some("f32_avx512")
    } else if gemm_path.starts_with("f32: gemm 0.19 AVX2") {
        Some("f32_avx2")
    } else {
        None
    }
}

/// Reads one JSON line; `Ok(None)` for lines that are neither a timed case nor the ceilings (criterion
/// estimates, other tools' lines). `default_round` is used where the line carries no `round`.
pub fn parse_line(line: &str, default_round: usize) -> Result<Option<Line>> {
    let v: serde_json::Value =
        serde_json::from_str(line).with_context(|| format!("not a JSON line: {line}"))?;
    parse_value(&v, default_round)
}

/// [`parse_line`] of a line already parsed.
pub fn parse_value(v: &serde_json::Value, default_round: usize) -> Result<Option<Line>> {
    if v["case"].as_str() == Some("ceiling") {
        let Some(loops) = v["ceilings"].as_object() else {
            bail!("a ceiling line without `ceilings`: {v}");
        };
        return Ok(Some(Line::Ceilings(
            loops
                .iter()
                .map(|(name, c)| (name.clone(), c["gflop_per_s_all_threads"].as_f64()))
                .collect(),
        )));
    }
    let (Some(case), Some(images_per_s)) = (v["case"].as_str(), v["images_per_s"].as_f64()) else {
        return Ok(None);
    };
    let mode = if v["impl"].as_str() == Some("pytorch") {
        match v["precision"].as_str() {
            Some("fp32") => Mode::TorchFp32,
            Some("bf16") => Mode::TorchBf16,
            other => bail!("a PyTorch line of {case} with precision {other:?}"),
        }
    } else {
        match v["matmul_precision"].as_str() {
            Some("highest") | None => Mode::F32,
            Some("bf16") if v["head_last_layer_bf16"].as_bool() == Some(true) => Mode::Bf16Head,
            Some("bf16") => Mode::Bf16,
            Some(other) => bail!("a dino-rs line of {case} with matmul_precision {other:?}"),
        }
    };
    let round = match v.get("round") {
        Some(r) => r
            .as_u64()
            .filter(|&r| r >= 1)
            .with_context(|| format!("a line of {case} with round {r} (rounds count from 1)"))?
            as usize,
        None => default_round,
    };
    Ok(Some(Line::Run(Run {
        case: case.to_string(),
        mode,
        round,
        images_per_s,
        cpu: v["cpu"].as_str().map(str::to_string),
        gemm_path: v["gemm_path"].as_str().map(str::to_string),
        gflop_per_s: v["gflop_per_s"].as_f64(),
    })))
}

/// The median of `xs` (the mean of the two middle values for an even count); `None` when empty.
pub fn median(xs: &[f64]) -> Option<f64> {
    let mut s: Vec<f64> = xs.to_vec();
    s.sort_by(f64::total_cmp);
    let n = s.len();
    match n {
        0 => None,
        _ if n % 2 == 1 => Some(s[n / 2]),
        _ => Some(0.5 * (s[n / 2 - 1] + s[n / 2])),
    }
}

/// `xs` with `decimals` digits, joined by " / ".
pub fn joined(xs: &[f64], decimals: usize) -> String {
    xs.iter()
        .map(|v| format!("{v:.decimals$}"))
        .collect::<Vec<_>>()
        .join(" / ")
}

/// The smallest and largest of `xs` (infinities when empty).
pub fn range(xs: &[f64]) -> (f64, f64) {
    xs.iter()
        .fold((f64::INFINITY, f64::NEG_INFINITY), |(lo, hi), &x| {
            (lo.min(x), hi.max(x))
        })
}

/// A ratio of dino-rs to PyTorch over the rounds where both sides ran.
#[derive(Debug, Clone, PartialEq)]
pub struct Ratio {
    /// What is divided by what.
    pub name: &'static str,
    /// One value per round that has both sides, in round order.
    pub per_round: Vec<f64>,
}

impl Ratio {
    /// The median of the per-round ratios.
    pub fn median(&self) -> Option<f64> {
        median(&self.per_round)
    }
}

/// The runs of one case, by mode and round.
#[derive(Debug, Default)]
pub struct CaseRuns {
    by_mode: BTreeMap<Mode, BTreeMap<usize, f64>>,
    /// Executed GFLOP/s per dino-rs mode and round, with the ceiling its GEMM path is bounded by.
    gflops: BTreeMap<Mode, (Vec<f64>, Option<&'static str>)>,
    /// Whether a `--matmul-precision bf16` run reported f32 products (`gemm_path` "f32: ..."): a CPU whose
    /// bf16 arithmetic is slower than its f32, where bf16 requests run f32.
    bf16_ran_f32: bool,
}

impl CaseRuns {
    /// images/s of `mode` per round, in round order.
    pub fn column(&self, mode: Mode) -> Vec<f64> {
        self.by_mode
            .get(&mode)
            .map(|m| m.values().copied().collect())
            .unwrap_or_default()
    }

    fn at(&self, mode: Mode, round: usize) -> Option<f64> {
        self.by_mode.get(&mode)?.get(&round).copied()
    }

    fn rounds(&self) -> Vec<usize> {
        let mut r: Vec<usize> = self
            .by_mode
            .values()
            .flat_map(|m| m.keys().copied())
            .collect();
        r.sort_unstable();
        r.dedup();
        r
    }

    /// f32 / PyTorch fp32, bf16 / PyTorch bf16 autocast, and dino-rs's faster of f32 and bf16 (the head's last
    /// layer at its default) / PyTorch's faster mode, per round where both sides have a figure. Where the bf16
    /// runs took f32 products, dino-rs's best is its f32 run alone: the faster of two runs of one path would
    /// only pick the luckier sample.
    pub fn ratios(&self) -> Vec<Ratio> {
        let pair = |name, a: Mode, b: Mode| Ratio {
            name,
            per_round: self
                .rounds()
                .into_iter()
                .filter_map(|r| Some(self.at(a, r)? / self.at(b, r)?))
                .collect(),
        };
        let best =
            |r: usize, modes: &[Mode]| modes.iter().filter_map(|&m| self.at(m, r)).reduce(f64::max);
        let mut out = vec![
            pair("f32 / PyTorch fp32", Mode::F32, Mode::TorchFp32),
            pair("bf16 / PyTorch bf16", Mode::Bf16, Mode::TorchBf16),
            pair(
                "bf16, head too / PyTorch bf16",
                Mode::Bf16Head,
                Mode::TorchBf16,
            ),
        ];
        let ours: &[Mode] = if self.bf16_ran_f32 {
            &[Mode::F32]
        } else {
            &[Mode::F32, Mode::Bf16]
        };
        out.push(Ratio {
            name: if self.bf16_ran_f32 {
                "f32 (bf16 ran f32 here) / PyTorch's best"
            } else {
                "best / PyTorch's best"
            },
            per_round: self
                .rounds()
                .into_iter()
                .filter_map(|r| {
                    Some(best(r, ours)? / best(r, &[Mode::TorchFp32, Mode::TorchBf16])?)
                })
                .collect(),
        });
        out.retain(|r| !r.per_round.is_empty());
        out
    }
}

/// Every run of a set of rounds, by case (in the order the cases first appear).
#[derive(Debug, Default)]
pub struct Summary {
    cases: Vec<(String, CaseRuns)>,
    cpus: Vec<String>,
    gemm_paths: Vec<(Mode, String)>,
    /// Each ceiling line's loops, in the order read.
    ceilings: Vec<Vec<(String, Option<f64>)>>,
}

impl Summary {
    /// Adds one run; a second figure for the same case, mode and round is an error (two files for one round).
    pub fn add(&mut self, run: Run) -> Result<()> {
        let idx = match self.cases.iter().position(|(c, _)| *c == run.case) {
            Some(i) => i,
            None => {
                self.cases.push((run.case.clone(), CaseRuns::default()));
                self.cases.len() - 1
            }
        };
        if run.mode == Mode::Bf16
            && run
                .gemm_path
                .as_deref()
                .is_some_and(|p| p.starts_with("f32"))
        {
            self.cases[idx].1.bf16_ran_f32 = true;
        }
        if let Some(g) = run.gflop_per_s {
            let ceiling = run.gemm_path.as_deref().and_then(ceiling_of_path);
            let entry = self.cases[idx].1.gflops.entry(run.mode).or_default();
            entry.0.push(g);
            entry.1 = entry.1.or(ceiling);
        }
        let slot = self.cases[idx].1.by_mode.entry(run.mode).or_default();
        if slot.insert(run.round, run.images_per_s).is_some() {
            bail!(
                "two figures for {} ({}) in round {}",
                run.case,
                run.mode.title(),
                run.round
            );
        }
        if let Some(cpu) = run.cpu {
            if !self.cpus.contains(&cpu) {
                self.cpus.push(cpu);
            }
        }
        if let Some(path) = run.gemm_path {
            // Every process's text: `gemm_path_lines` groups them and counts the fallback's measurements.
            self.gemm_paths.push((run.mode, path));
        }
        Ok(())
    }

    /// Adds one parsed line.
    pub fn add_line(&mut self, line: Line) -> Result<()> {
        match line {
            Line::Run(run) => self.add(run),
            Line::Ceilings(c) => {
                self.ceilings.push(c);
                Ok(())
            }
        }
    }

    /// Reads JSON lines; a line without `round` belongs to round `default_round` (a file per round).
    pub fn add_lines(&mut self, text: &str, default_round: usize) -> Result<()> {
        for line in text.lines().map(str::trim).filter(|l| l.starts_with('{')) {
            if let Some(l) = parse_line(line, default_round)? {
                self.add_line(l)?;
            }
        }
        Ok(())
    }

    /// The median over the run's ceiling lines of loop `name` on all threads.
    pub fn ceiling(&self, name: &str) -> Option<f64> {
        let xs: Vec<f64> = self
            .ceilings
            .iter()
            .filter_map(|c| c.iter().find(|(n, _)| n == name).and_then(|(_, g)| *g))
            .collect();
        median(&xs)
    }

    /// The runs of `case`.
    #[cfg(test)]
    pub fn case(&self, case: &str) -> Option<&CaseRuns> {
        self.cases.iter().find(|(c, _)| c == case).map(|(_, r)| r)
    }

    /// Whether no timed run was read.
    pub fn is_empty(&self) -> bool {
        self.cases.is_empty()
    }

    /// The summary as Markdown: the CPU, the GEMM paths, a table of images/s per round, one of the ratios.
    pub fn markdown(&self) -> String {
        let mut s = String::new();
        let _ = writeln!(
            s,
            "CPU: {}",
            if self.cpus.is_empty() {
                "not reported".to_string()
            } else {
                self.cpus.join("; ")
            }
        );
        for (mode, path) in gemm_path_lines(&self.gemm_paths) {
            let _ = writeln!(s, "GEMM path, {}: {path}", mode.title());
        }
        let modes: Vec<Mode> = Mode::ALL
            .into_iter()
            .filter(|&m| self.cases.iter().any(|(_, r)| r.by_mode.contains_key(&m)))
            .collect();
        let _ = writeln!(s, "\nimages/s per round (median):\n");
        let _ = writeln!(
            s,
            "| case | {} |",
            modes
                .iter()
                .map(|m| m.title())
                .collect::<Vec<_>>()
                .join(" | ")
        );
        let _ = writeln!(s, "|---{}|", "|---".repeat(modes.len()));
        for (case, runs) in &self.cases {
            let cells: Vec<String> = modes
                .iter()
                .map(|&m| {
                    let xs = runs.column(m);
                    match median(&xs) {
                        Some(med) => format!("{} ({med:.2})", joined(&xs, 2)),
                        None => "-".to_string(),
                    }
                })
                .collect();
            let _ = writeln!(s, "| {case} | {} |", cells.join(" | "));
        }
        let with_ratios: Vec<(&String, Vec<Ratio>)> = self
            .cases
            .iter()
            .map(|(c, r)| (c, r.ratios()))
            .filter(|(_, r)| !r.is_empty())
            .collect();
        if !with_ratios.is_empty() {
            let _ = writeln!(
                s,
                "\nratios per round where both sides ran; **median** [range]:\n"
            );
            let _ = writeln!(s, "| case | ratio | per round | median [range] |");
            let _ = writeln!(s, "|---|---|---|---|");
            for (case, ratios) in with_ratios {
                for r in ratios {
                    let (lo, hi) = range(&r.per_round);
                    let _ = writeln!(
                        s,
                        "| {case} | {} | {} | **{:.2}x** [{lo:.2}-{hi:.2}] |",
                        r.name,
                        joined(&r.per_round, 2),
                        r.median().unwrap_or(f64::NAN)
                    );
                }
            }
        }
        let with_gflops: Vec<_> = self
            .cases
            .iter()
            .flat_map(|(c, r)| r.gflops.iter().map(move |(m, g)| (c, *m, g)))
            .collect();
        if !with_gflops.is_empty() {
            let _ = writeln!(
                s,
                "\ndino-rs's executed GFLOP/s, and its median as a fraction of the ceiling (register-only loop, all \
                 threads, median of this run's `ceiling` lines) of the path its linear layers took:\n"
            );
            let _ = writeln!(
                s,
                "| case | mode | GFLOP/s per round (median) | of the ceiling |"
            );
            let _ = writeln!(s, "|---|---|---|---|");
            for (case, mode, (xs, ceiling)) in with_gflops {
                let med = median(xs).unwrap_or(f64::NAN);
                let frac = match ceiling.map(|c| (c, self.ceiling(c))) {
                    Some((c, Some(g))) => {
                        format!("{:.0}% of {c} ({g:.0} GFLOP/s)", 100.0 * med / g)
                    }
                    Some((c, None)) => format!("{c}: no `ceiling` case in this run"),
                    None => "unknown GEMM path".to_string(),
                };
                let _ = writeln!(
                    s,
                    "| {case} | {} | {} ({med:.0}) | {frac} |",
                    mode.title(),
                    joined(xs, 0)
                );
            }
        }
        s
    }
}

/// The GEMM paths by mode, one line each: the bf16 fallback's text carries the ratio each process measured
/// ("runs at 0.51x the f32 FMA rate"), so the texts that differ only in it become one with the range.
fn gemm_path_lines(paths: &[(Mode, String)]) -> Vec<(Mode, String)> {
    const AT: &str = "runs at ";
    // (mode, text before the number, text after it, the numbers) or a text without one.
    let mut groups: Vec<(Mode, String, String, Vec<f64>)> = Vec::new();
    for (mode, path) in paths {
        let split = path.find(AT).and_then(|i| {
            let rest = &path[i + AT.len()..];
            let end = rest.find('x')?;
            let r: f64 = rest[..end].parse().ok()?;
            Some((path[..i + AT.len()].to_string(), rest[end..].to_string(), r))
        });
        let (head, tail, r) = match split {
            Some((h, t, r)) => (h, t, Some(r)),
            None => (path.clone(), String::new(), None),
        };
        match groups
            .iter_mut()
            .find(|(m, h, t, _)| m == mode && *h == head && *t == tail)
        {
            Some(g) => g.3.extend(r),
            None => groups.push((*mode, head, tail, r.into_iter().collect())),
        }
    }
    groups
        .into_iter()
        .map(|(mode, head, tail, rs)| {
            let (lo, hi) = range(&rs);
            let text = match rs.len() {
                0 => head,
                _ if lo == hi => format!("{head}{lo:.2}{tail}"),
                n => format!("{head}{lo:.2}-{hi:.2}{tail} ({n} processes)"),
            };
            (mode, text)
        })
        .collect()
}

/// `cargo xtask bench-summary FILE...`: the summary of saved JSON lines, a file per round unless the lines
/// carry their `round`.
pub fn from_files(files: &[std::path::PathBuf]) -> Result<String> {
    if files.is_empty() {
        bail!("bench-summary: name the JSON-lines files of `cargo xtask bench` (one per round, or with --rounds)");
    }
    let mut summary = Summary::default();
    for (i, f) in files.iter().enumerate() {
        let text =
            std::fs::read_to_string(f).with_context(|| format!("cannot read {}", f.display()))?;
        summary
            .add_lines(&text, i + 1)
            .with_context(|| format!("in {}", f.display()))?;
    }
    if summary.is_empty() {
        bail!(
            "bench-summary: no timed case (a line with `case` and `images_per_s`) in {}",
            files
                .iter()
                .map(|f| f.display().to_string())
                .collect::<Vec<_>>()
                .join(", ")
        );
    }
    Ok(summary.markdown())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dino(case: &str, prec: &str, head: bool, round: Option<usize>, ips: f64) -> String {
        let mut v = serde_json::json!({
            "case": case, "matmul_precision": prec, "head_last_layer_bf16": head, "images_per_s": ips,
            "cpu": "Test CPU (family 6 model 207)", "gemm_path": format!("{prec} path"),
        });
        if let Some(r) = round {
            v["round"] = r.into();
        }
        v.to_string()
    }

    fn torch(case: &str, prec: &str, round: Option<usize>, ips: f64) -> String {
        let mut v = serde_json::json!({
            "case": case, "impl": "pytorch", "precision": prec, "images_per_s": ips,
        });
        if let Some(r) = round {
            v["round"] = r.into();
        }
        v.to_string()
    }

    #[test]
    fn medians_of_odd_and_even_counts() {
        assert_eq!(median(&[]), None);
        assert_eq!(median(&[3.0]), Some(3.0));
        assert_eq!(median(&[5.0, 1.0, 3.0]), Some(3.0));
        assert_eq!(median(&[4.0, 1.0, 3.0, 2.0]), Some(2.5));
    }

    fn run_of(line: &str, default_round: usize) -> Run {
        match parse_line(line, default_round).unwrap() {
            Some(Line::Run(r)) => r,
            other => panic!("not a run: {other:?}"),
        }
    }

    #[test]
    fn lines_map_to_their_modes_and_rounds() {
        let r = run_of(&dino("step/a", "highest", false, Some(2), 10.0), 9);
        assert_eq!((r.mode, r.round), (Mode::F32, 2));
        assert_eq!(r.gemm_path.as_deref(), Some("highest path"));
        let r = run_of(&dino("step/a", "bf16", true, None, 10.0), 4);
        assert_eq!((r.mode, r.round), (Mode::Bf16Head, 4));
        let r = run_of(&torch("step/a", "bf16", None, 1.0), 1);
        assert_eq!(r.mode, Mode::TorchBf16);
        // A criterion estimate is not a timed case; a malformed line or a round 0 is an error.
        assert_eq!(
            parse_line(r#"{"case":"g/c","source":"criterion","median_s":0.1}"#, 1).unwrap(),
            None
        );
        assert!(parse_line("{not json", 1).is_err());
        assert!(parse_line(&dino("step/a", "highest", false, Some(0), 1.0), 1).is_err());
        assert!(parse_line(&torch("step/a", "fp16", None, 1.0), 1).is_err());
    }

    #[test]
    fn ratios_pair_the_same_round_and_skip_rounds_missing_a_side() {
        // Three rounds; PyTorch bf16 is missing in round 2. Ratios per round, by hand:
        // f32 / fp32: 10/5 = 2.0, 12/4 = 3.0, 9/6 = 1.5 -> median 2.0.
        // bf16 / bf16: 20/8 = 2.5, (round 2 skipped), 18/12 = 1.5 -> median 2.0 of two.
        // best / best: max(10, 20) / max(5, 8) = 2.5, max(12, 30) / 4 = 7.5, max(9, 18) / max(6, 12) = 1.5
        //   -> median 2.5.
        let mut s = Summary::default();
        let lines = [
            dino("step/c", "highest", false, Some(1), 10.0),
            dino("step/c", "bf16", false, Some(1), 20.0),
            torch("step/c", "fp32", Some(1), 5.0),
            torch("step/c", "bf16", Some(1), 8.0),
            dino("step/c", "highest", false, Some(2), 12.0),
            dino("step/c", "bf16", false, Some(2), 30.0),
            torch("step/c", "fp32", Some(2), 4.0),
            dino("step/c", "highest", false, Some(3), 9.0),
            dino("step/c", "bf16", false, Some(3), 18.0),
            torch("step/c", "fp32", Some(3), 6.0),
            torch("step/c", "bf16", Some(3), 12.0),
        ];
        s.add_lines(&lines.join("\n"), 1).unwrap();
        let ratios = s.case("step/c").unwrap().ratios();
        let get = |name: &str| ratios.iter().find(|r| r.name == name).unwrap().clone();
        assert_eq!(get("f32 / PyTorch fp32").per_round, vec![2.0, 3.0, 1.5]);
        assert_eq!(get("f32 / PyTorch fp32").median(), Some(2.0));
        assert_eq!(get("bf16 / PyTorch bf16").per_round, vec![2.5, 1.5]);
        assert_eq!(get("bf16 / PyTorch bf16").median(), Some(2.0));
        assert_eq!(get("best / PyTorch's best").per_round, vec![2.5, 7.5, 1.5]);
        assert_eq!(get("best / PyTorch's best").median(), Some(2.5));
        // No head-bf16 runs: no such ratio.
        assert!(ratios
            .iter()
            .all(|r| r.name != "bf16, head too / PyTorch bf16"));
        let md = s.markdown();
        assert!(
            md.contains(
                "| step/c | f32 / PyTorch fp32 | 2.00 / 3.00 / 1.50 | **2.00x** [1.50-3.00] |"
            ),
            "{md}"
        );
        assert!(md.contains("10.00 / 12.00 / 9.00 (10.00)"), "{md}");
        assert!(md.contains("CPU: Test CPU (family 6 model 207)"), "{md}");
    }

    #[test]
    fn gemm_paths_map_to_their_ceilings() {
        // The texts of dino_kernels::cpu::gemm_path.
        let amx = "bf16: dino-kernels AMX tdpbf16ps tiles, f32 accumulation";
        let dp = "bf16: dino-kernels vdpbf16ps (AVX-512 BF16), f32 accumulation";
        let fallback =
            "f32: gemm 0.19 AVX-512 kernels (bf16 requested; vdpbf16ps runs at 0.51x the f32 FMA rate here)";
        assert_eq!(ceiling_of_path(amx), Some("bf16_amx"));
        assert_eq!(ceiling_of_path(dp), Some("bf16_avx512"));
        assert_eq!(ceiling_of_path(fallback), Some("f32_avx512"));
        assert_eq!(
            ceiling_of_path("f32: gemm 0.19 AVX2+FMA kernels (bf16 requested; no AVX-512 BF16)"),
            Some("f32_avx2")
        );
        assert_eq!(ceiling_of_path("f32: gemm 0.19 portable kernels"), None);
    }

    #[test]
    fn fallback_paths_that_differ_in_their_measured_ratio_are_one_line() {
        let f = |r: &str| {
            format!(
                "f32: gemm 0.19 AVX-512 kernels (bf16 requested; vdpbf16ps runs at {r}x the f32 FMA rate here)"
            )
        };
        let paths = vec![
            (Mode::F32, "f32: gemm 0.19 AVX-512 kernels".to_string()),
            (Mode::Bf16, f("0.51")),
            (Mode::Bf16Head, f("0.52")),
            (Mode::Bf16, f("0.49")),
            (Mode::Bf16, f("0.54")),
            (Mode::F32, "f32: gemm 0.19 AVX-512 kernels".to_string()),
        ];
        assert_eq!(
            gemm_path_lines(&paths),
            vec![
                (Mode::F32, "f32: gemm 0.19 AVX-512 kernels".to_string()),
                (Mode::Bf16, format!("{} (3 processes)", f("0.49-0.54"))),
                (Mode::Bf16Head, f("0.52")),
            ]
        );
    }

    #[test]
    fn gflops_are_a_fraction_of_the_runs_median_ceiling() {
        // Step GFLOP/s 140 / 160 / 150 (median 150) on the AVX-512 f32 path; ceilings 310 / 290 / 300 on all
        // threads (median 300): 50%. The AVX2 loop's 150 must not be the one taken.
        let mut s = Summary::default();
        for (round, g) in [(1, 140.0), (2, 160.0), (3, 150.0)] {
            let v = serde_json::json!({
                "case": "step/c", "matmul_precision": "highest", "images_per_s": 10.0, "round": round,
                "gflop_per_s": g, "gemm_path": "f32: gemm 0.19 AVX-512 kernels",
            });
            s.add_lines(&v.to_string(), 1).unwrap();
        }
        for c in [310.0, 290.0, 300.0] {
            let v = serde_json::json!({
                "case": "ceiling",
                "ceilings": {
                    "f32_avx512": {"gflop_per_s_1_thread": c / 2.0, "gflop_per_s_all_threads": c},
                    "f32_avx2": {"gflop_per_s_1_thread": 75.0, "gflop_per_s_all_threads": 150.0},
                    "bf16_amx": {"gflop_per_s_1_thread": null, "gflop_per_s_all_threads": null},
                },
            });
            s.add_lines(&v.to_string(), 1).unwrap();
        }
        assert_eq!(s.ceiling("f32_avx512"), Some(300.0));
        assert_eq!(s.ceiling("bf16_amx"), None);
        let md = s.markdown();
        assert!(
            md.contains("| step/c | dino-rs f32 | 140 / 160 / 150 (150) | 50% of f32_avx512 (300 GFLOP/s) |"),
            "{md}"
        );
        // Without a ceiling line the table says so instead of a fraction.
        let mut t = Summary::default();
        t.add_lines(
            &serde_json::json!({
                "case": "step/c", "matmul_precision": "highest", "images_per_s": 10.0,
                "gflop_per_s": 150.0, "gemm_path": "f32: gemm 0.19 AVX-512 kernels",
            })
            .to_string(),
            1,
        )
        .unwrap();
        assert!(t
            .markdown()
            .contains("f32_avx512: no `ceiling` case in this run"));
    }

    #[test]
    fn where_bf16_ran_f32_the_best_ratio_is_the_f32_run() {
        // bf16 requests that report f32 products (a CPU without fast bf16): 11 is the luckier sample of the same
        // path, so the best ratio takes f32's 10 / PyTorch's best 5 = 2.0, not 11 / 5.
        let mut s = Summary::default();
        let bf16_as_f32 = serde_json::json!({
            "case": "step/c", "matmul_precision": "bf16", "images_per_s": 11.0, "round": 1,
            "gemm_path": "f32: gemm 0.19 AVX-512 kernels (bf16 requested; vdpbf16ps runs at 0.51x the f32 FMA rate here)",
        });
        let lines = [
            dino("step/c", "highest", false, Some(1), 10.0),
            bf16_as_f32.to_string(),
            torch("step/c", "fp32", Some(1), 5.0),
            torch("step/c", "bf16", Some(1), 4.0),
        ];
        s.add_lines(&lines.join("\n"), 1).unwrap();
        let ratios = s.case("step/c").unwrap().ratios();
        let best = ratios
            .iter()
            .find(|r| r.name.contains("PyTorch's best"))
            .unwrap();
        assert_eq!(best.name, "f32 (bf16 ran f32 here) / PyTorch's best");
        assert_eq!(best.per_round, vec![2.0]);
    }

    #[test]
    fn files_without_rounds_are_one_round_each_and_duplicates_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let a = dir.path().join("r1.jsonl");
        let b = dir.path().join("r2.jsonl");
        std::fs::write(
            &a,
            format!(
                "{}\nprogress text\n{}\n",
                dino("step/x", "highest", false, None, 6.0),
                torch("step/x", "fp32", None, 3.0)
            ),
        )
        .unwrap();
        std::fs::write(
            &b,
            format!(
                "{}\n{}\n",
                dino("step/x", "highest", false, None, 8.0),
                torch("step/x", "fp32", None, 2.0)
            ),
        )
        .unwrap();
        let md = from_files(&[a.clone(), b.clone()]).unwrap();
        // 6/3 = 2.0 and 8/2 = 4.0: median 3.0.
        assert!(
            md.contains("| step/x | f32 / PyTorch fp32 | 2.00 / 4.00 | **3.00x** [2.00-4.00] |"),
            "{md}"
        );
        // The same file twice puts two figures in one round only if the lines name it.
        let c = dir.path().join("dup.jsonl");
        std::fs::write(
            &c,
            format!(
                "{}\n{}\n",
                dino("step/x", "highest", false, Some(1), 6.0),
                dino("step/x", "highest", false, Some(1), 7.0)
            ),
        )
        .unwrap();
        let err = format!("{:#}", from_files(&[c]).unwrap_err());
        assert!(
            err.contains("two figures for step/x (dino-rs f32) in round 1"),
            "{err}"
        );
        let empty = dir.path().join("empty.jsonl");
        std::fs::write(&empty, "no lines here\n").unwrap();
        assert!(format!("{:#}", from_files(&[empty]).unwrap_err()).contains("no timed case"));
        assert!(from_files(&[dir.path().join("missing.jsonl")]).is_err());
    }
}
