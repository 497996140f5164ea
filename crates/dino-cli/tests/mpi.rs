//! Data parallelism over MPI, end to end: `mpirun -np 2 dino train` with the per-rank batch B/2 is the same run
//! as one rank with batch B (student, teacher, optimiser state, centre and BatchNorm buffers in the checkpoint;
//! the per-step loss in the log; the final k-NN), for a ViT with drop path and a BatchNorm head and for a
//! ResNet-18 (SyncBatchNorm in the backbone); across a resume from 2 ranks to 1; after kill -9 of one rank;
//! and bad input is one line.
//!
//! The binary must be built with the `mpi` feature, which needs an MPI library: the test builds it itself
//! (`cargo build -p dino-cli --features mpi` in this target dir, copied to `<target>/tmp/dino-mpi`) or takes
//! `DINO_MPI_BIN`. Without
//! `mpirun` on PATH the tests say they did not run (and fail under `CI=true`, where `.ci/run` installs
//! Open MPI).
//!
//! Tolerance. Two ranks add the same numbers in another order (the gradient all-reduce, SyncBatchNorm's
//! per-rank partial sums, the centre's sum, matrix products over half the rows), and training amplifies fp32
//! rounding step after step (AdamW turns a ~0 gradient's noise into an update of +-lr; the sharpened teacher
//! softmax and small-batch BatchNorm do the rest). So the semantics are tested one step at a time, from the
//! same state (the initialisation, and a 1-rank checkpoint later in the run copied to both): the AdamW
//! moments (the averaged gradients) within `TOL` = 1e-5 of the network's largest, the centre and BatchNorm
//! buffers within `TOL` * (1 + max |a|), the weights within that plus 2 lr ([`assert_same_step`]). The whole
//! runs (12 ViT steps, 4 ResNet steps, across resume and kill) agree per tensor within `NOISE_FACTOR` times
//! the difference between the same 1-rank run on 2 threads and on 1 thread, never below `TOL`. A semantic
//! error (a sample on the wrong rank, an unsynced statistic, a local centre, a drop-path mask keyed by the
//! local row) shows at 1e-3 of the largest gradient or more.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

/// Relative tolerance after one step (see the module documentation).
const TOL: f64 = 1e-5;

/// Whole-run tolerance in units of the single-process fp32 noise (see the module documentation).
const NOISE_FACTOR: f64 = 50.0;

/// One multi-process run at a time (2 cores).
static SERIAL: Mutex<()> = Mutex::new(());

fn has_mpirun() -> bool {
    Command::new("mpirun")
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .map(|s| s.success())
        .unwrap_or(false)
}

/// The mpi-enabled `dino`, or None (with a loud line) when MPI is not installed.
fn mpi_dino() -> Option<PathBuf> {
    static BIN: OnceLock<Option<PathBuf>> = OnceLock::new();
    BIN.get_or_init(|| {
        if !has_mpirun() {
            let msg = "MPI TESTS DID NOT RUN: no `mpirun` on PATH (apt-get install openmpi-bin libopenmpi-dev \
                       libclang-dev)";
            if std::env::var("CI").is_ok_and(|v| v == "true") {
                panic!("{msg}; CI must run them");
            }
            eprintln!("{msg}");
            return None;
        }
        if let Ok(p) = std::env::var("DINO_MPI_BIN") {
            return Some(PathBuf::from(p));
        }
        // Built in this target dir (only dino-models without `hub`, dino-train and dino-cli compile again:
        // crates/dino-workspace-hack keeps every dependency the same as the workspace's; `cargo xtask
        // unify-check` checks it), copied aside, then the plain binary is restored for the other tests.
        let tmp = Path::new(env!("CARGO_TARGET_TMPDIR"));
        let target = tmp.parent().expect("target dir");
        let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
        let build = |features: &[&str]| {
            let st = Command::new(&cargo)
                .args(["build", "-p", "dino-cli", "--bin", "dino"])
                .args(features)
                .arg("--target-dir")
                .arg(target)
                .current_dir(env!("CARGO_MANIFEST_DIR"))
                .status()
                .expect("cargo runs");
            assert!(st.success(), "cargo build {features:?} failed");
        };
        build(&["--features", "mpi"]);
        let bin = tmp.join("dino-mpi");
        std::fs::copy(target.join("debug").join("dino"), &bin).expect("copy the mpi binary");
        build(&[]);
        Some(bin)
    })
    .clone()
}

fn mpirun(np: usize) -> Command {
    let mut c = Command::new("mpirun");
    c.args(["--allow-run-as-root", "--oversubscribe", "-np"])
        .arg(np.to_string());
    c
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

fn ok(out: Output, what: &str) -> Output {
    assert!(
        out.status.success(),
        "{what} failed ({}):\nstdout: {}\nstderr: {}",
        out.status,
        text(&out.stdout),
        text(&out.stderr)
    );
    out
}

/// Train with `cfg` into `dir` on `np` ranks (np = 0: the mpi binary alone, without mpirun: world 1).
fn train(bin: &Path, np: usize, cfg: &Path, dir: &Path, extra: &[&str]) -> Output {
    let mut c = if np == 0 {
        Command::new(bin)
    } else {
        let mut c = mpirun(np);
        c.arg(bin);
        c
    };
    train_args(&mut c, cfg, dir, extra).env("RUST_BACKTRACE", "1");
    c.output().expect("runs")
}

/// `train --config cfg --output-dir dir extra...` appended to `c` (after the binary).
fn train_args<'c>(c: &'c mut Command, cfg: &Path, dir: &Path, extra: &[&str]) -> &'c mut Command {
    c.arg("train")
        .arg("--config")
        .arg(cfg)
        .arg("--output-dir")
        .arg(dir)
        .args(extra)
}

fn load(dir: &Path) -> HashMap<String, Vec<f64>> {
    let bytes = std::fs::read(dir.join("checkpoint.safetensors")).expect("checkpoint");
    let st = safetensors::SafeTensors::deserialize(&bytes).expect("safetensors");
    st.tensors()
        .into_iter()
        .map(|(name, v)| {
            let d = v.data();
            let vals: Vec<f64> = match v.dtype() {
                safetensors::Dtype::F32 => d
                    .chunks_exact(4)
                    .map(|c| f32::from_le_bytes(c.try_into().unwrap()) as f64)
                    .collect(),
                safetensors::Dtype::I64 => d
                    .chunks_exact(8)
                    .map(|c| i64::from_le_bytes(c.try_into().unwrap()) as f64)
                    .collect(),
                other => panic!("{name}: unexpected dtype {other:?}"),
            };
            (name, vals)
        })
        .collect()
}

/// The per-step losses of `<dir>/log.jsonl`, by global iteration.
fn losses(dir: &Path) -> Vec<(u64, f64)> {
    std::fs::read_to_string(dir.join("log.jsonl"))
        .expect("log")
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|v| v["kind"] == "step")
        .map(|v| {
            (
                v["global_iteration"].as_u64().unwrap(),
                v["loss"].as_f64().unwrap(),
            )
        })
        .collect()
}

/// Per tensor of two checkpoints: (name, |a - b| / (1 + max |a|), max |a - b|, max |a|), worst first.
fn state_diff(a: &Path, b: &Path) -> Vec<(String, f64, f64, f64)> {
    let (ta, tb) = (load(a), load(b));
    let mut ka: Vec<&String> = ta.keys().collect();
    let mut kb: Vec<&String> = tb.keys().collect();
    ka.sort();
    kb.sort();
    assert_eq!(ka, kb, "the checkpoints hold different tensors");
    assert!(ka.iter().any(|k| k.starts_with("optimizer.")));
    assert!(ka.contains(&&"dino_loss.center".to_string()));
    let mut rows: Vec<(String, f64, f64, f64)> = ka
        .into_iter()
        .map(|k| {
            let (x, y) = (&ta[k], &tb[k]);
            assert_eq!(x.len(), y.len(), "{k}: sizes differ");
            let scale = x.iter().fold(0.0f64, |m, v| m.max(v.abs()));
            let d = x
                .iter()
                .zip(y)
                .fold(0.0f64, |m, (p, q)| m.max((p - q).abs()));
            (k.clone(), d / (1.0 + scale), d, scale)
        })
        .collect();
    rows.sort_by(|p, q| q.1.total_cmp(&p.1));
    rows
}

/// Every tensor of the two checkpoints (weights, optimiser moments, centre, BatchNorm buffers) agrees within
/// `tol` relative to `1 + max |a|`; returns the worst relative difference.
fn assert_same_state(a: &Path, b: &Path, tol: f64) -> f64 {
    let rows = state_diff(a, b);
    let bad: Vec<String> = rows
        .iter()
        .filter(|r| r.1 > tol)
        .map(|(k, rel, d, s)| {
            format!("{k}: relative {rel:.3e} (max |diff| {d:.3e}, max |value| {s:.3e})")
        })
        .collect();
    assert!(
        bad.is_empty(),
        "{} vs {}: {} tensors differ beyond {tol:.1e}:\n{}",
        a.display(),
        b.display(),
        bad.len(),
        bad.join("\n")
    );
    eprintln!(
        "{} vs {}: worst relative difference {:.3e} ({}), tolerance {tol:.1e}",
        a.display(),
        b.display(),
        rows[0].1,
        rows[0].0
    );
    rows[0].1
}

/// After ONE step from the same state (every tensor of the two checkpoints): the AdamW moments (the averaged gradient and its
/// square, scaled by 1 - beta) within `TOL` of the largest moment in the network (a gradient that is ~0, as
/// a bias ahead of a BatchNorm has, is rounding noise on both sides); the centre and the BatchNorm
/// buffers within `TOL` * (1 + max); the weights within `TOL` * (1 + max) plus two steps of the step's
/// learning rate `lr0` (an element whose true gradient is ~0, such as a bias ahead of a BatchNorm, takes an
/// AdamW update of up to +-lr0 with the sign of its rounding noise).
fn assert_same_step(a: &Path, b: &Path) {
    let lr0 = last_lr(a);
    let rows = state_diff(a, b);
    // The largest first / second moment anywhere in the network.
    let largest = |prefix: &str| {
        rows.iter()
            .filter(|r| r.0.starts_with(prefix))
            .fold(0.0f64, |m, r| m.max(r.3))
    };
    let (g1, g2) = (
        largest("optimizer.exp_avg."),
        largest("optimizer.exp_avg_sq."),
    );
    assert!(g1 > 0.0 && g2 > 0.0, "no AdamW moments after one step");
    let bad: Vec<String> = rows
        .iter()
        .filter_map(|(k, _, d, s)| {
            let tol = if is_buffer(k) {
                TOL * (1.0 + s)
            } else if k.starts_with("optimizer.exp_avg_sq.") {
                TOL * g2
            } else if k.starts_with("optimizer.exp_avg.") {
                TOL * g1
            } else if k.starts_with("student.") || k.starts_with("teacher.") {
                TOL * (1.0 + s) + 2.0 * lr0
            } else {
                TOL * (1.0 + s)
            };
            (*d > tol).then(|| format!("{k}: max |diff| {d:.3e} > {tol:.3e} (max |value| {s:.3e})"))
        })
        .collect();
    assert!(
        bad.is_empty(),
        "{} vs {} one step on: {} tensors differ:\n{}",
        a.display(),
        b.display(),
        bad.len(),
        bad.join("\n")
    );
    // For the record: the worst first moment relative to its own tensor's largest, among tensors with a
    // gradient above 1e-3 of the largest (the ~0 gradients are rounding noise on both sides).
    let worst = rows
        .iter()
        .filter(|r| r.0.starts_with("optimizer.exp_avg.") && r.3 > 1e-3 * g1)
        .map(|r| (r.2 / r.3, r.0.clone()))
        .fold(
            (0.0f64, String::new()),
            |m, x| if x.0 > m.0 { x } else { m },
        );
    eprintln!(
        "{} vs {} one step on: every tensor within tolerance (lr0 {lr0:.3e}, largest moments {g1:.3e} / \
         {g2:.3e}); worst first moment {:.3e} of its tensor's largest ({})",
        a.display(),
        b.display(),
        worst.0,
        worst.1
    );
}

/// One training step from the same state on 1 rank (2 threads) and on 2 ranks (`two_extra` flags), compared
/// with [`assert_same_step`]: from the initialisation (`from` = 0) or from a 1-rank checkpoint of global
/// iteration `from`, copied into both output dirs (`cfg` must checkpoint every iteration). No step-to-step
/// amplification of rounding enters, so this is the tight test of every step's semantics.
fn one_step_equivalence(
    bin: &Path,
    cfg: &Path,
    tmp: &Path,
    name: &str,
    from: usize,
    two_extra: &[&str],
) {
    let (a, b) = one_step_dirs(bin, cfg, tmp, name, from, two_extra);
    assert_same_step(&a, &b);
}

/// The runs of [`one_step_equivalence`], uncompared: the 1-rank and the 2-rank output dirs.
fn one_step_dirs(
    bin: &Path,
    cfg: &Path,
    tmp: &Path,
    name: &str,
    from: usize,
    two_extra: &[&str],
) -> (PathBuf, PathBuf) {
    let (a, b) = (
        tmp.join(format!("{name}_step{from}_one")),
        tmp.join(format!("{name}_step{from}_two")),
    );
    if from > 0 {
        let base = tmp.join(format!("{name}_base{from}"));
        let n = from.to_string();
        ok(
            train(bin, 0, cfg, &base, &["--stop-after", &n, "--threads", "2"]),
            "1 rank, to the base checkpoint",
        );
        copy_dir(&base, &a);
        copy_dir(&base, &b);
    }
    let stop = (from + 1).to_string();
    let o = ok(
        train(bin, 0, cfg, &a, &["--stop-after", &stop, "--threads", "2"]),
        "1 rank, one step",
    );
    let mut extra = vec!["--stop-after", &stop];
    extra.extend_from_slice(two_extra);
    let o2 = ok(train(bin, 2, cfg, &b, &extra), "2 ranks, one step");
    if from > 0 {
        let want = format!("resumed from global iteration {from}");
        assert!(text(&o.stdout).contains(&want), "{}", text(&o.stdout));
        assert!(text(&o2.stdout).contains(&want), "{}", text(&o2.stdout));
    }
    (a, b)
}

/// Copies the files of `from` into a new directory `to` (a run's output dir has no subdirectories that
/// matter for resuming).
fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap() {
        let e = e.unwrap();
        if e.file_type().unwrap().is_file() {
            std::fs::copy(e.path(), to.join(e.file_name())).unwrap();
        }
    }
}

/// BatchNorm running statistics (not trained, not touched by AdamW).
fn is_buffer(k: &str) -> bool {
    k.ends_with("running_mean") || k.ends_with("running_var") || k.ends_with("num_batches_tracked")
}

/// The learning rate of the last step record of `<dir>/log.jsonl`.
fn last_lr(dir: &Path) -> f64 {
    std::fs::read_to_string(dir.join("log.jsonl"))
        .expect("log")
        .lines()
        .rev()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .find(|v| v["kind"] == "step")
        .and_then(|v| v["lr"].as_f64())
        .expect("a step record with lr")
}

/// The fp32 noise of a whole run: the worst relative state difference between the reference (2 threads) and
/// the same run on 1 thread (another summation order in the matrix products), and the worst loss difference.
struct Noise {
    state: f64,
    loss: f64,
}

impl Noise {
    /// Trains `cfg` on one rank into `reference` (2 threads) and into `one_thread` (1 thread); returns the
    /// reference run's output and the noise between the two.
    fn run(bin: &Path, cfg: &Path, reference: &Path, one_thread: &Path) -> (Output, Noise) {
        let o = ok(train(bin, 0, cfg, reference, &["--threads", "2"]), "1 rank");
        ok(
            train(bin, 0, cfg, one_thread, &["--threads", "1"]),
            "1 rank, 1 thread",
        );
        (o, Noise::measure(reference, one_thread))
    }

    fn measure(reference: &Path, one_thread: &Path) -> Noise {
        let state = state_diff(reference, one_thread)[0].1;
        let loss = losses(reference)
            .iter()
            .zip(&losses(one_thread))
            .fold(0.0f64, |m, (a, b)| {
                m.max((a.1 - b.1).abs() / (1.0 + a.1.abs()))
            });
        eprintln!(
            "fp32 noise (2 threads vs 1 thread, one rank): state {state:.3e}, loss {loss:.3e}"
        );
        Noise { state, loss }
    }

    /// The whole-run tolerance: [`NOISE_FACTOR`] times the noise, never below [`TOL`].
    fn state_tol(&self) -> f64 {
        (NOISE_FACTOR * self.state).max(TOL)
    }

    fn loss_tol(&self) -> f64 {
        (NOISE_FACTOR * self.loss).max(TOL)
    }
}

/// The per-step losses agree: the first two steps within [`TOL`], all within `tol` (relative to 1 + |loss|).
fn assert_same_losses(a: &Path, b: &Path, tol: f64) {
    let (la, lb) = (losses(a), losses(b));
    assert_eq!(la.len(), lb.len(), "step records differ in number");
    assert!(!la.is_empty());
    for (i, ((ga, xa), (gb, xb))) in la.iter().zip(&lb).enumerate() {
        assert_eq!(ga, gb);
        let t = if i < 2 { TOL } else { tol };
        assert!(
            (xa - xb).abs() <= t * (1.0 + xa.abs()),
            "step {ga}: loss {xa} vs {xb} (tolerance {t:.1e})"
        );
    }
}

/// The line with the final k-NN of `dino train`'s stdout.
fn knn_line(out: &Output) -> String {
    text(&out.stdout)
        .lines()
        .find(|l| l.starts_with("k-NN"))
        .unwrap_or_default()
        .to_string()
}

/// The previous default preset with drop path 0.2 and Sinkhorn-Knopp teacher targets (whose sums are
/// all-reduced over the ranks), on 384 images for 2 epochs of 6 steps. (KoLeo gets its own one-step test.)
const VIT: &str = r#"
centering = "sinkhorn_knopp"
arch = "vit_custom"
patch_size = 7
img_size = 28
vit_embed_dim = 96
vit_depth = 4
vit_num_heads = 3
out_dim = 1024
use_bn_in_head = true
head_hidden_dim = 512
head_bottleneck_dim = 128
drop_path_rate = 0.2
momentum_teacher = 0.99
warmup_teacher_temp = 0.04
teacher_temp = 0.04
warmup_teacher_temp_epochs = 0
weight_decay_end = 0.1
freeze_last_layer = 1
batch_size = 64
epochs = 2
lr = 0.002
warmup_epochs = 1
min_lr = 0.00001
local_crops_number = 4
local_crops_scale = [0.1, 0.4]
global_crops_size = 28
local_crops_size = 14
norm_mean = [0.286, 0.286, 0.286]
norm_std = [0.353, 0.353, 0.353]
dataset = "embedded"
max_train_images = 384
ckpt_every_iters = 2
num_workers = 1
log_every = 1
eval_every = 0
eval_final = true
eval_resize = 28
eval_crop = 28
eval_max_train = 300
eval_max_val = 100
"#;

fn write_cfg(dir: &Path, name: &str, body: &str) -> PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, body).unwrap();
    p
}

/// ViT (drop path 0.2, BatchNorm head): 2 ranks x 32 == 1 rank x 64 after one step (tightly; also with KoLeo and iBOT
/// in both centering modes) and after 12
/// steps (within the fp32 noise), the k-NN with features gathered over the ranks included; 2 ranks for 5 steps
/// then 1 rank to the end == 1 rank throughout; kill -9 of one rank ends the job within 30 s, the checkpoint
/// loads, and the resumed run ends as the uninterrupted one.
#[test]
fn vit_two_ranks_are_one_rank_across_resume_and_kill() {
    let Some(bin) = mpi_dino() else { return };
    let _g = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let tmp = tempfile::tempdir().unwrap();
    let cfg = write_cfg(tmp.path(), "vit.toml", VIT);
    let (one, one_thread, two, mixed, killed) = (
        tmp.path().join("one"),
        tmp.path().join("one_thread"),
        tmp.path().join("two"),
        tmp.path().join("mixed"),
        tmp.path().join("killed"),
    );
    // One step from the same state, 1 rank x 64 against 2 ranks x 32: from the initialisation, and from the
    // checkpoint of global iteration 7 (epoch 1: another permutation, drop-path keys, schedules, a centre
    // and optimiser state carried over).
    let cfg1 = write_cfg(
        tmp.path(),
        "vit1.toml",
        &VIT.replace("ckpt_every_iters = 2", "ckpt_every_iters = 1"),
    );
    let per_gpu = ["--batch-size-per-gpu", "32"];
    one_step_equivalence(&bin, &cfg1, tmp.path(), "vit", 0, &per_gpu);
    one_step_equivalence(&bin, &cfg1, tmp.path(), "vit", 7, &per_gpu);
    // iBOT in both centering modes: the masks are drawn for the global batch and split by sample, the
    // Sinkhorn-Knopp count and the patch centre's mean run over every rank's masked patches.
    for (name, centering) in [("ibot_sk", "sinkhorn_knopp"), ("ibot_c", "centering")] {
        let body = format!(
            "ibot_loss_weight = 1.0\n{}",
            VIT.replace("ckpt_every_iters = 2", "ckpt_every_iters = 1")
                .replace(
                    "centering = \"sinkhorn_knopp\"",
                    &format!("centering = \"{centering}\"")
                )
        );
        let c = write_cfg(tmp.path(), &format!("{name}.toml"), &body);
        one_step_equivalence(&bin, &c, tmp.path(), name, 7, &per_gpu);
    }
    // KoLeo over the global batch (the default): the student features gathered over the ranks, the gradient
    // through the gather all-reduced. dinov2's per-rank KoLeo is another step, by far more than the tolerance.
    let koleo = write_cfg(
        tmp.path(),
        "koleo.toml",
        &format!(
            "koleo_loss_weight = 0.1\n{}",
            VIT.replace("ckpt_every_iters = 2", "ckpt_every_iters = 1")
        ),
    );
    one_step_equivalence(&bin, &koleo, tmp.path(), "koleo", 7, &per_gpu);
    // The student's crops in passes (one per crop, iBOT's two global crops in one) with iBOT and KoLeo over
    // the global batch: each pass's collectives (KoLeo's gather, its gradient's all-reduce) meet in the same
    // order on every rank, and the gradients of the passes add up before the average.
    let passes = write_cfg(
        tmp.path(),
        "passes.toml",
        &format!(
            "student_passes = \"crop\"\nibot_loss_weight = 1.0\n{}",
            std::fs::read_to_string(&koleo)
                .unwrap()
                .replace("use_bn_in_head = true", "use_bn_in_head = false")
        ),
    );
    one_step_equivalence(&bin, &passes, tmp.path(), "passes", 7, &per_gpu);
    let per_rank = write_cfg(
        tmp.path(),
        "koleo_rank.toml",
        &format!(
            "koleo_global_batch = false\n{}",
            std::fs::read_to_string(&koleo).unwrap()
        ),
    );
    let (a, b) = one_step_dirs(&bin, &per_rank, tmp.path(), "koleo_rank", 7, &per_gpu);
    let rows = state_diff(&a, &b);
    let moments = rows
        .iter()
        .filter(|r| r.0.starts_with("optimizer.exp_avg."));
    let (worst, largest) = moments.fold((0.0f64, 0.0f64), |m, r| (m.0.max(r.2), m.1.max(r.3)));
    eprintln!(
        "per-rank KoLeo against one process: first moments differ by {worst:.3e} of {largest:.3e}"
    );
    assert!(
        worst > 1e-3 * largest,
        "per-rank KoLeo should change the step: first moments differ by {worst:.3e} of {largest:.3e}"
    );

    // The whole run. One rank, global batch 64 (the mpi binary without mpirun is world 1), on 2 threads and
    // on 1 thread (the noise of one process).
    let (o1, noise) = Noise::run(&bin, &cfg, &one, &one_thread);
    // Two ranks, 32 each (the official per-GPU meaning).
    let o2 = ok(
        train(&bin, 2, &cfg, &two, &["--batch-size-per-gpu", "32"]),
        "2 ranks",
    );
    assert!(text(&o2.stderr).contains("2 ranks (mpi) x 32 images = batch 64"));
    assert!(
        text(&o2.stderr).contains(" per rank on ")
            && !text(&o2.stderr).contains("otherwise than rank 0"),
        "{}",
        text(&o2.stderr)
    );
    assert_same_state(&one, &two, noise.state_tol());
    assert_same_losses(&one, &two, noise.loss_tol());
    // The final k-NN of the 2-rank run (each rank extracts half the features, gathered) is the k-NN of one
    // process on the same checkpoint.
    let (k1, k2) = (knn_line(&o1), knn_line(&o2));
    assert!(k1.contains("trained top-1"), "{k1}");
    assert!(k2.contains("trained top-1"), "{k2}");
    let alone = ok(
        Command::new(&bin)
            .args(["eval-knn", "--nb-knn", "20", "--checkpoint"])
            .arg(&two)
            .output()
            .unwrap(),
        "eval-knn of the 2-rank checkpoint",
    );
    let (t1, t5) = knn_numbers(&k2);
    let want = format!("20-NN classifier result: top1 {t1:.2}%, top5 {t5:.2}%");
    assert!(
        text(&alone.stdout).contains(&want),
        "2 ranks: {k2}\n1 process on the same checkpoint: {}",
        text(&alone.stdout)
    );
    // A drop-path rate of 0.2 must matter (else the equivalence above would not test the masks' keys).
    let cfg0 = write_cfg(
        tmp.path(),
        "vit0.toml",
        &VIT.replace("drop_path_rate = 0.2", "drop_path_rate = 0.0"),
    );
    let nodrop = tmp.path().join("nodrop");
    ok(
        train(&bin, 0, &cfg0, &nodrop, &["--stop-after", "2"]),
        "no drop path",
    );
    let l0 = losses(&nodrop);
    let l1 = losses(&one);
    assert!(
        (l0[1].1 - l1[1].1).abs() > 1e-6,
        "drop path changed nothing"
    );

    // 2 ranks for 5 steps (checkpoint at 4), then 1 rank from there to the end.
    ok(
        train(&bin, 2, &cfg, &mixed, &["--stop-after", "5"]),
        "2 ranks, stopped",
    );
    // Resuming on 2 ranks x 64 (another global batch, so another sampler) is a one-line error.
    let out = train(&bin, 2, &cfg, &mixed, &["--batch-size-per-gpu", "64"]);
    assert!(!out.status.success());
    let err = text(&out.stderr);
    assert!(
        err.contains("different configuration") && err.contains("batch_size: 64 -> 128"),
        "{err}"
    );
    assert!(!err.contains("panicked"), "{err}");
    let o = ok(train(&bin, 0, &cfg, &mixed, &[]), "1 rank, resumed");
    assert!(
        text(&o.stdout).contains("resumed from global iteration 4"),
        "{}",
        text(&o.stdout)
    );
    // Another number of ranks rounds differently (the tolerance above), and the resume says so.
    let err = text(&o.stderr);
    assert!(
        err.contains("note: resumed on other compute") && err.contains("ranks: 2 -> 1"),
        "{err}"
    );
    assert_same_state(&one, &mixed, noise.state_tol());

    // kill -9 of rank 1 in the middle of the run.
    let mut job = mpirun(2)
        .arg(&bin)
        .arg("train")
        .arg("--config")
        .arg(&cfg)
        .arg("--output-dir")
        .arg(&killed)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let t0 = Instant::now();
    while losses_if_any(&killed).len() < 5 {
        assert!(
            t0.elapsed() < Duration::from_secs(120),
            "the run did not start"
        );
        assert!(job.try_wait().unwrap().is_none(), "the run ended early");
        std::thread::sleep(Duration::from_millis(50));
    }
    let victim = rank_pid(job.id(), 1).expect("rank 1's pid");
    let killed_at = Instant::now();
    let st = Command::new("kill")
        .args(["-9", &victim.to_string()])
        .status()
        .unwrap();
    assert!(st.success());
    let status = loop {
        if let Some(s) = job.try_wait().unwrap() {
            break s;
        }
        assert!(
            killed_at.elapsed() < Duration::from_secs(30),
            "the job still runs 30 s after rank 1 was killed"
        );
        std::thread::sleep(Duration::from_millis(100));
    };
    eprintln!(
        "job ended {:.2} s after kill -9 of rank 1, {status}",
        killed_at.elapsed().as_secs_f64()
    );
    assert!(!status.success(), "the job must fail when a rank dies");
    let info = ok(
        Command::new(&bin)
            .arg("info")
            .arg(&killed)
            .output()
            .unwrap(),
        "dino info on the killed run",
    );
    let info = text(&info.stdout);
    assert!(
        info.contains("dino-train checkpoint:") && info.contains("global iteration"),
        "{info}"
    );
    let o = ok(train(&bin, 2, &cfg, &killed, &[]), "resume after kill");
    assert!(text(&o.stdout).contains("resumed from global iteration"));
    // The same compute as the killed job's: no note. Both ranks agree to take the k-NN baselines from the
    // checkpoint.
    let err = text(&o.stderr);
    assert!(!err.contains("resumed on other compute"), "{err}");
    assert_eq!(
        err.matches("(recorded in the checkpoint)").count(),
        2,
        "{err}"
    );
    assert_same_state(&one, &killed, noise.state_tol());
}

/// (top-1, top-5) of a `k-NN ... trained top-1 X% top-5 Y% ...` line.
fn knn_numbers(line: &str) -> (f64, f64) {
    let after = |key: &str| -> f64 {
        let rest = &line[line
            .find(key)
            .unwrap_or_else(|| panic!("no {key} in {line}"))
            + key.len()..];
        rest.trim_start()
            .split(|c: char| !(c.is_ascii_digit() || c == '.'))
            .next()
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("no number after {key} in {line}"))
    };
    (after("trained top-1"), after("top-5"))
}

fn losses_if_any(dir: &Path) -> Vec<(u64, f64)> {
    if dir.join("log.jsonl").exists() {
        losses(dir)
    } else {
        Vec::new()
    }
}

/// The pid of rank `rank` among mpirun's processes: a descendant of `root` with `OMPI_COMM_WORLD_RANK=rank`.
fn rank_pid(root: u32, rank: usize) -> Option<u32> {
    let want = format!("OMPI_COMM_WORLD_RANK={rank}");
    let mut stack = vec![root];
    while let Some(p) = stack.pop() {
        let children =
            std::fs::read_to_string(format!("/proc/{p}/task/{p}/children")).unwrap_or_default();
        for c in children
            .split_whitespace()
            .filter_map(|c| c.parse::<u32>().ok())
        {
            let env = std::fs::read(format!("/proc/{c}/environ")).unwrap_or_default();
            if env.split(|&b| b == 0).any(|kv| kv == want.as_bytes()) {
                return Some(c);
            }
            stack.push(c);
        }
    }
    None
}

const RESNET: &str = r#"
arch = "resnet18"
resnet_cifar_stem = true
out_dim = 256
use_bn_in_head = true
head_hidden_dim = 256
head_bottleneck_dim = 64
momentum_teacher = 0.99
batch_size = 16
epochs = 1
lr = 0.002
warmup_epochs = 0
min_lr = 0.00001
local_crops_number = 2
local_crops_scale = [0.1, 0.4]
global_crops_size = 28
local_crops_size = 14
norm_mean = [0.286, 0.286, 0.286]
norm_std = [0.353, 0.353, 0.353]
dataset = "embedded"
max_train_images = 64
ckpt_every_iters = 0
num_workers = 1
log_every = 1
eval_every = 0
eval_final = false
"#;

/// ResNet-18 (SyncBatchNorm in the backbone and the head, running statistics included): 2 ranks x 8 ==
/// 1 rank x 16 after 4 steps.
#[test]
fn resnet_sync_batchnorm_two_ranks_are_one_rank() {
    let Some(bin) = mpi_dino() else { return };
    let _g = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let tmp = tempfile::tempdir().unwrap();
    let cfg = write_cfg(tmp.path(), "resnet.toml", RESNET);
    let (one, one_thread, two) = (
        tmp.path().join("one"),
        tmp.path().join("one_thread"),
        tmp.path().join("two"),
    );
    // One step from the same state (running statistics included): from the initialisation and from the
    // checkpoint of global iteration 2.
    let cfg1 = write_cfg(
        tmp.path(),
        "resnet1.toml",
        &RESNET.replace("ckpt_every_iters = 0", "ckpt_every_iters = 1"),
    );
    one_step_equivalence(&bin, &cfg1, tmp.path(), "resnet", 0, &[]);
    one_step_equivalence(&bin, &cfg1, tmp.path(), "resnet", 2, &[]);
    // The whole run, within the noise of one process.
    let (_, noise) = Noise::run(&bin, &cfg, &one, &one_thread);
    ok(train(&bin, 2, &cfg, &two, &[]), "2 ranks");
    assert_same_state(&one, &two, noise.state_tol());
    assert_same_losses(&one, &two, noise.loss_tol());
    // The running statistics moved (SyncBatchNorm updated them from the global batch).
    let t = load(&two);
    let rv = &t["student.backbone.layer1.0.bn1.running_var"];
    assert!(rv.iter().any(|v| (v - 1.0).abs() > 1e-3));
}

/// A heterogeneous job (here rank 0 on the portable kernels, rank 1 on the CPU fast path) trains, and says
/// which ranks compute otherwise than rank 0 and how.
#[test]
fn ranks_on_other_kernels_say_so() {
    let Some(bin) = mpi_dino() else { return };
    let _g = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let tmp = tempfile::tempdir().unwrap();
    let cfg = write_cfg(tmp.path(), "vit.toml", VIT);
    let dir = tmp.path().join("mixed-kernels");
    let app = |c: &mut Command| {
        train_args(c.arg(&bin), &cfg, &dir, &["--stop-after", "1"]);
    };
    // MPMD: one app context per rank, the first with DINO_KERNELS=portable.
    let mut c = mpirun(1);
    c.args(["-x", "DINO_KERNELS=portable"]);
    app(&mut c);
    c.args([":", "-np", "1"]);
    app(&mut c);
    let o = ok(c.output().unwrap(), "2 ranks on other kernels");
    let err = text(&o.stderr);
    assert!(
        err.contains("note: 1 of 2 ranks computes their steps otherwise than rank 0")
            && err.contains(
                "note (rank 1 of 2): computes otherwise than rank 0 (products: f32: candle matmul \
                 (portable path) -> f32: gemm "
            )
            && err.contains("kernels: portable -> auto)"),
        "{err}"
    );
}

/// Bad input under mpirun: a batch that does not split over the ranks, a NaN loss, and ranks with different
/// configurations, are one-line errors naming the rank, and the job ends.
#[test]
fn bad_input_under_mpirun_is_one_line() {
    let Some(bin) = mpi_dino() else { return };
    let _g = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let tmp = tempfile::tempdir().unwrap();
    let cfg = write_cfg(tmp.path(), "vit.toml", VIT);
    let out = train(
        &bin,
        2,
        &cfg,
        &tmp.path().join("odd"),
        &["--batch-size", "63"],
    );
    assert!(!out.status.success());
    let err = text(&out.stderr);
    assert!(
        err.contains("error (rank 0 of 2): invalid configuration: batch_size")
            || err.contains("error (rank 1 of 2): invalid configuration: batch_size"),
        "{err}"
    );
    assert!(err.contains("split evenly over 2 ranks"), "{err}");
    assert!(!err.contains("panicked"), "{err}");

    // `--device cuda` on two ranks of one node: each rank asks for a GPU of its own (0 and 1) and says in one
    // line why it cannot have it (this binary was built without CUDA).
    let out = train(
        &bin,
        2,
        &cfg,
        &tmp.path().join("gpu"),
        &["--device", "cuda"],
    );
    assert!(!out.status.success());
    let err = text(&out.stderr);
    assert!(
        (0..2).any(|r| err.contains(&format!(
            "error (rank {r} of 2): --device cuda (GPU {r} for rank {r} of the 2 on this node): this dino was \
             built without CUDA support"
        ))),
        "{err}"
    );
    assert!(!err.contains("panicked"), "{err}");

    // A loss that turns NaN (lr 1e30): every rank stops at the same step (the loss is all-reduced), each
    // says so on one line, and the job ends.
    let t0 = Instant::now();
    let out = train(
        &bin,
        2,
        &cfg,
        &tmp.path().join("nan"),
        &["--lr", "1e30", "--warmup-epochs", "0"],
    );
    assert!(!out.status.success());
    let err = text(&out.stderr);
    for r in 0..2 {
        assert!(
            err.contains(&format!(
                "error (rank {r} of 2): loss is NaN at epoch 0, iteration 1 (global iteration 1)"
            )),
            "{err}"
        );
    }
    assert!(!err.contains("panicked"), "{err}");
    assert!(
        t0.elapsed() < Duration::from_secs(60),
        "the NaN job took {:?}",
        t0.elapsed()
    );

    // Rank 1 runs another seed (MPMD launch: two programs in one job).
    let other = write_cfg(tmp.path(), "other.toml", &format!("{VIT}\nseed = 7\n"));
    let out = Command::new("mpirun")
        .args(["--allow-run-as-root", "--oversubscribe", "-np", "1"])
        .arg(&bin)
        .args(["train", "--config"])
        .arg(&cfg)
        .arg("--output-dir")
        .arg(tmp.path().join("mix"))
        .args([":", "-np", "1"])
        .arg(&bin)
        .args(["train", "--config"])
        .arg(&other)
        .arg("--output-dir")
        .arg(tmp.path().join("mix"))
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = text(&out.stderr);
    assert!(
        err.contains("rank 1 runs another configuration than rank 0: seed: 0 -> 7"),
        "{err}"
    );
}

/// `dir/photos` holding the images of ../shared/data/photos whose file names pass `keep`.
fn photos_folder(dir: &Path, keep: impl Fn(&str) -> bool) -> PathBuf {
    let data = dir.join("photos");
    std::fs::create_dir(&data).unwrap();
    let shared = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../../shared/data/photos");
    for e in std::fs::read_dir(&shared).expect("../shared/data/photos") {
        let p = e.unwrap().path();
        let name = p.file_name().unwrap().to_str().unwrap().to_string();
        let image = matches!(p.extension().and_then(|x| x.to_str()), Some("jpg" | "png"));
        if image && keep(&name) {
            std::fs::copy(&p, data.join(&name)).unwrap();
        }
    }
    data
}

/// A folder of the shared photos plus unreadable files, trained 2 epochs by a 1-block ViT.
const FOLDER: &str = r#"
arch = "vit_custom"
patch_size = 7
img_size = 28
vit_embed_dim = 32
vit_depth = 1
vit_num_heads = 2
out_dim = 64
head_hidden_dim = 64
head_bottleneck_dim = 32
batch_size = 4
epochs = 2
warmup_epochs = 1
local_crops_number = 2
global_crops_size = 28
local_crops_size = 14
num_workers = 1
eval_every = 0
eval_final = false
"#;

/// The per-epoch count of unreadable images in the log (and the epoch line) is the run's total, not rank 0's
/// share: 2 ranks log what 1 rank logs, and it is not zero.
#[test]
fn unreadable_images_are_counted_over_all_ranks() {
    let Some(bin) = mpi_dino() else { return };
    let _g = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let tmp = tempfile::tempdir().unwrap();
    let data = photos_folder(tmp.path(), |_| true);
    for i in 0..5 {
        std::fs::write(data.join(format!("broken{i}.jpg")), b"not a jpeg").unwrap();
    }
    let cfg = write_cfg(
        tmp.path(),
        "folder.toml",
        &format!("{FOLDER}data_path = {:?}\n", data.to_str().unwrap()),
    );
    let skipped = |dir: &Path| -> Vec<u64> {
        std::fs::read_to_string(dir.join("log.jsonl"))
            .unwrap()
            .lines()
            .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
            .filter(|v| v["kind"] == "epoch")
            .map(|v| v["skipped_images"].as_u64().unwrap())
            .collect()
    };
    let (one, two) = (tmp.path().join("one"), tmp.path().join("two"));
    ok(train(&bin, 0, &cfg, &one, &[]), "1 rank");
    let out = ok(train(&bin, 2, &cfg, &two, &[]), "2 ranks");
    let (s1, s2) = (skipped(&one), skipped(&two));
    assert_eq!(s1.len(), 2, "{s1:?}");
    assert!(
        s1.iter().sum::<u64>() > 0,
        "no unreadable image was met: {s1:?}"
    );
    assert_eq!(s1, s2, "1 rank against 2 ranks");
    // The epoch lines say the same.
    let said = format!("{}{}", text(&out.stdout), text(&out.stderr));
    for (e, n) in s2.iter().enumerate().filter(|(_, n)| **n > 0) {
        assert!(
            said.lines().any(|l| l.starts_with(&format!("epoch {e}: "))
                && l.ends_with(&format!(", {n} unreadable images skipped"))),
            "{said}"
        );
    }
}

/// Runs `dino args...` on `np` ranks (np = 0: the mpi binary alone, world 1).
fn dino_on(bin: &Path, np: usize, args: &[&str]) -> Output {
    let mut c = if np == 0 {
        Command::new(bin)
    } else {
        let mut c = mpirun(np);
        c.arg(bin);
        c
    };
    c.args(args).env("RUST_BACKTRACE", "1");
    c.output().expect("runs")
}

/// The evaluation commands under mpirun share the work and report once: eval-knn and eval-linear print
/// what one rank prints (features extracted by rank r for samples r, r + 2, ... and gathered), extract writes
/// the one-rank features, attention draws each image of a folder once, and info prints once.
#[test]
fn evaluation_commands_share_the_work_over_the_ranks() {
    let Some(bin) = mpi_dino() else { return };
    let _g = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let tmp = tempfile::tempdir().unwrap();
    let cfg = write_cfg(
        tmp.path(),
        "tiny.toml",
        &format!(
            "{}dataset = \"embedded\"\nmax_train_images = 256\n",
            FOLDER.replace("batch_size = 4", "batch_size = 64")
        ),
    );
    let run = tmp.path().join("run");
    ok(train(&bin, 0, &cfg, &run, &["--epochs", "1"]), "train");
    let run_s = run.to_str().unwrap();
    let knn = [
        "eval-knn",
        "--checkpoint",
        run_s,
        "--max-train",
        "301",
        "--max-val",
        "99",
        "--nb-knn",
        "10",
        "20",
    ];
    let one = text(&ok(dino_on(&bin, 0, &knn), "eval-knn, 1 rank").stdout);
    let two = text(&ok(dino_on(&bin, 2, &knn), "eval-knn, 2 ranks").stdout);
    assert!(one.contains("train 301 x 32, test 99 x 32"), "{one}");
    assert!(one.contains("20-NN classifier result"), "{one}");
    assert_eq!(one, two, "eval-knn: 1 rank against 2 ranks");

    // Unreadable images are left out of an evaluation on any number of ranks: the same rows, the same
    // result, and extract's `indices` name the readable ones.
    let lab = tmp.path().join("lab");
    let pngs =
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../../../shared/data/cifar10-test20/png");
    let mut files: Vec<_> = std::fs::read_dir(&pngs)
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .collect();
    files.sort();
    for (i, f) in files.iter().take(20).enumerate() {
        let split = if i < 14 { "train" } else { "val" };
        let class = lab.join(split).join(["a", "b"][i % 2]);
        std::fs::create_dir_all(&class).unwrap();
        std::fs::copy(f, class.join(f.file_name().unwrap())).unwrap();
    }
    std::fs::write(lab.join("train/a/zz.png"), b"not a png").unwrap();
    std::fs::write(lab.join("val/b/zz.png"), b"not a png").unwrap();
    let (train_s, val_s) = (lab.join("train"), lab.join("val"));
    let (train_s, val_s) = (train_s.to_str().unwrap(), val_s.to_str().unwrap());
    let knn = [
        "eval-knn",
        "--checkpoint",
        run_s,
        "--data-path",
        train_s,
        "--val-data-path",
        val_s,
        "--nb-knn",
        "3",
    ];
    let one = text(&ok(dino_on(&bin, 0, &knn), "eval-knn unreadable, 1 rank").stdout);
    let two = text(&ok(dino_on(&bin, 2, &knn), "eval-knn unreadable, 2 ranks").stdout);
    assert!(one.contains("train 14 x 32, test 6 x 32"), "{one}");
    assert_eq!(
        one, two,
        "eval-knn with unreadable images: 1 rank against 2 ranks"
    );
    // A rank whose whole share is unreadable (rank 1 of 2 gets sample 1 of these 2) has no rows; the others'
    // rows still make the evaluation one process makes (it ended the job before).
    let val2 = lab.join("val2");
    for class in ["a", "b"] {
        std::fs::create_dir_all(val2.join(class)).unwrap();
    }
    std::fs::copy(&files[14], val2.join("a/x.png")).unwrap();
    std::fs::write(val2.join("b/zz.png"), b"not a png").unwrap();
    let knn2 = [&knn[..6], &[val2.to_str().unwrap(), "--nb-knn", "3"]].concat();
    let one = text(&ok(dino_on(&bin, 0, &knn2), "eval-knn, one readable, 1 rank").stdout);
    let two = text(&ok(dino_on(&bin, 2, &knn2), "eval-knn, one readable, 2 ranks").stdout);
    assert!(one.contains("train 14 x 32, test 1 x 32"), "{one}");
    assert_eq!(one, two, "eval-knn, a rank without readable images");
    for np in [0, 2] {
        let f = tmp.path().join(format!("lab{np}.safetensors"));
        let a = ["extract", "--checkpoint", run_s, "--data-path", train_s];
        let out = ok(
            dino_on(
                &bin,
                np,
                &[&a[..], &["--output", f.to_str().unwrap()]].concat(),
            ),
            "extract unreadable",
        );
        assert!(
            text(&out.stdout).contains("1 unreadable image left out"),
            "{}",
            text(&out.stdout)
        );
        let bytes = std::fs::read(&f).unwrap();
        let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
        assert_eq!(st.tensor("features").unwrap().shape(), &[14, 32]);
        let at: Vec<i64> = st
            .tensor("indices")
            .unwrap()
            .data()
            .chunks_exact(8)
            .map(|b| i64::from_le_bytes(b.try_into().unwrap()))
            .collect();
        // Sorted: class a's 7 images then zz.png (index 7, unreadable), then class b's 7.
        let want: Vec<i64> = (0..15).filter(|&i| i != 7).collect();
        assert_eq!(at, want, "{np} ranks");
    }

    // extract: the gathered rows are the one-rank rows (up to another batch's rounding), in order.
    let feats = |np: usize| {
        let f = tmp.path().join(format!("f{np}.safetensors"));
        let mut a = vec!["extract", "--checkpoint", run_s, "--max-train", "301"];
        a.extend(["--output", f.to_str().unwrap()]);
        ok(dino_on(&bin, np, &a), "extract");
        let bytes = std::fs::read(&f).unwrap();
        let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
        let t = st.tensor("features").unwrap();
        assert_eq!(t.shape(), &[301, 32]);
        let v: Vec<f32> = t
            .data()
            .chunks_exact(4)
            .map(|b| f32::from_le_bytes(b.try_into().unwrap()))
            .collect();
        let labels = st.tensor("labels").unwrap().data().to_vec();
        (v, labels)
    };
    let ((f1, l1), (f2, l2)) = (feats(0), feats(2));
    assert_eq!(l1, l2, "labels");
    let scale = f1.iter().fold(0f32, |m, x| m.max(x.abs()));
    let worst = f1
        .iter()
        .zip(&f2)
        .fold(0f32, |m, (a, b)| m.max((a - b).abs()));
    assert!(
        scale > 0.0 && worst <= 1e-5 * scale,
        "max |diff| {worst} of {scale}"
    );

    // eval-linear: one report.
    let lin = [
        "eval-linear",
        "--checkpoint",
        run_s,
        "--max-train",
        "200",
        "--max-val",
        "50",
        "--epochs",
        "2",
        "--n-last-blocks",
        "1",
    ];
    let two = text(&ok(dino_on(&bin, 2, &lin), "eval-linear, 2 ranks").stdout);
    assert_eq!(two.matches("best top1").count(), 1, "{two}");
    assert!(two.contains("(train 200, val 50)"), "{two}");

    // attention over a folder of three photos: each drawn once, by one rank.
    let photos = photos_folder(tmp.path(), |f| {
        ["astronaut.png", "coffee.png", "eagle.jpg"].contains(&f)
    });
    let maps = tmp.path().join("maps");
    let out = ok(
        dino_on(
            &bin,
            2,
            &[
                "attention",
                "--checkpoint",
                run_s,
                "--image",
                photos.to_str().unwrap(),
                "--image-size",
                "56",
                "56",
                "--output-dir",
                maps.to_str().unwrap(),
                "--sheet",
                maps.join("sheet.png").to_str().unwrap(),
            ],
        ),
        "attention, 2 ranks",
    );
    let said = text(&out.stdout);
    for stem in ["astronaut", "coffee", "eagle"] {
        assert_eq!(said.matches(&format!("{stem}.")).count(), 1, "{said}");
        assert!(maps.join(stem).join("attn-head0.png").is_file(), "{stem}");
    }
    // The sheet holds all three, drawn by rank 0 alone.
    assert_eq!(said.matches("sheet of 3 images").count(), 1, "{said}");
    assert!(maps.join("sheet.png").is_file());

    // info: once.
    let out = ok(dino_on(&bin, 2, &["info", run_s]), "info, 2 ranks");
    let said = text(&out.stdout);
    let first = said.lines().next().unwrap_or_default().to_string();
    assert!(!first.is_empty(), "{said}");
    assert_eq!(said.matches(&first).count(), 1, "{said}");
}

/// SIGTERM to mpirun (as Ctrl-C or a scheduler's end of job) and SIGUSR1 (a scheduler's warning before the
/// time limit, e.g. Slurm's `--signal=USR1@120`): mpirun passes each on to the ranks, which agree on the step
/// to stop after; rank 0 writes the checkpoint there and says so, and the lock is given back.
#[test]
fn stop_signals_to_mpirun_stop_every_rank_at_one_step_with_a_checkpoint() {
    let Some(bin) = mpi_dino() else { return };
    let _g = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let tmp = tempfile::tempdir().unwrap();
    let cfg = write_cfg(
        tmp.path(),
        "long.toml",
        &VIT.replace("epochs = 2", "epochs = 200"),
    );
    for sig in ["TERM", "USR1"] {
        let dir = tmp.path().join(format!("stopped-{sig}"));
        let mut c = mpirun(2);
        c.arg(&bin)
            .args(["train", "--config"])
            .arg(&cfg)
            .arg("--output-dir")
            .arg(&dir)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let child = c.spawn().unwrap();
        let t0 = Instant::now();
        let log = dir.join("log.jsonl");
        while !std::fs::read_to_string(&log).is_ok_and(|l| l.contains("\"kind\":\"step\"")) {
            assert!(t0.elapsed() < Duration::from_secs(120), "no step logged");
            std::thread::sleep(Duration::from_millis(20));
        }
        let kill = Command::new("kill")
            .args([&format!("-{sig}"), &child.id().to_string()])
            .status()
            .unwrap();
        assert!(kill.success());
        let o = child.wait_with_output().unwrap();
        let err = text(&o.stderr);
        assert_eq!(
            err.matches(&format!("stopped by SIG{sig} after ")).count(),
            1,
            "rank 0 alone reports the stop: {err}"
        );
        assert!(!err.contains("panicked") && !err.contains("error"), "{err}");
        let meta: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(dir.join("checkpoint.json")).unwrap())
                .unwrap();
        let g = meta["global_iteration"].as_u64().unwrap();
        assert!((1..1200).contains(&g), "{meta}");
        assert!(err.contains(&format!("after {g} iterations")), "{err}");
        assert!(!dir.join("dino.lock").exists());
    }
}
