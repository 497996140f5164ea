//! Data parallelism over MPI, end to end: `mpirun -np 2 dino train` with the per-rank batch B/2 is the same run
//! as one rank with batch B (student, teacher, optimiser state, centre and BatchNorm buffers in the checkpoint;
//! the per-step loss in the log; the final k-NN), for a ViT with drop path and a BatchNorm head and for a
//! ResNet-18 (SyncBatchNorm in the backbone); across a resume from 2 ranks to 1; after kill -9 of one rank;
//! and bad input is one line.
//!
//! The binary must be built with the `mpi` feature, which needs an MPI library: the test builds it itself
//! (`cargo build -p dino-cli --features mpi --target-dir <target>/mpi`) or takes `DINO_MPI_BIN`. Without
//! `mpirun` on PATH the tests say they did not run (and fail under `CI=true`, where `.ci/run` installs
//! Open MPI).
//!
//! Tolerance: fp32 reordering of sums (the gradient all-reduce, SyncBatchNorm's per-rank partial sums, the
//! centre's sum), |a - b| <= 2e-5 * (1 + max |a|) per tensor after 12 AdamW steps.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

/// Relative tolerance of the equivalence (see the module documentation).
const TOL: f64 = 2e-5;

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
        let target = Path::new(env!("CARGO_TARGET_TMPDIR"))
            .parent()
            .expect("target dir")
            .join("mpi");
        let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
        let st = Command::new(cargo)
            .args(["build", "-p", "dino-cli", "--features", "mpi", "--bin", "dino"])
            .arg("--target-dir")
            .arg(&target)
            .current_dir(env!("CARGO_MANIFEST_DIR"))
            .status()
            .expect("cargo runs");
        assert!(st.success(), "building dino with --features mpi failed");
        Some(target.join("debug").join("dino"))
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
    c.arg("train")
        .arg("--config")
        .arg(cfg)
        .arg("--output-dir")
        .arg(dir)
        .args(extra)
        .env("RUST_BACKTRACE", "1");
    c.output().expect("runs")
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

/// Every tensor of the two checkpoints agrees within [`TOL`]; returns the worst relative difference.
fn assert_same_state(a: &Path, b: &Path) -> f64 {
    let (ta, tb) = (load(a), load(b));
    let mut ka: Vec<&String> = ta.keys().collect();
    let mut kb: Vec<&String> = tb.keys().collect();
    ka.sort();
    kb.sort();
    assert_eq!(ka, kb, "the checkpoints hold different tensors");
    assert!(ka.iter().any(|k| k.starts_with("optimizer.")));
    assert!(ka.contains(&&"dino_loss.center".to_string()));
    let mut worst = (0.0f64, String::new());
    for k in ka {
        let (x, y) = (&ta[k], &tb[k]);
        let scale = x.iter().fold(0.0f64, |m, v| m.max(v.abs()));
        let d = x
            .iter()
            .zip(y)
            .fold(0.0f64, |m, (p, q)| m.max((p - q).abs()));
        let rel = d / (1.0 + scale);
        assert!(
            rel <= TOL,
            "{k}: max |diff| {d:.3e} against max |value| {scale:.3e} ({} vs {})",
            a.display(),
            b.display()
        );
        if rel > worst.0 {
            worst = (rel, k.clone());
        }
    }
    eprintln!(
        "{} vs {}: worst relative difference {:.3e} ({})",
        a.display(),
        b.display(),
        worst.0,
        worst.1
    );
    worst.0
}

fn assert_same_losses(a: &Path, b: &Path) {
    let (la, lb) = (losses(a), losses(b));
    assert_eq!(la.len(), lb.len(), "step records differ in number");
    assert!(!la.is_empty());
    for ((ga, xa), (gb, xb)) in la.iter().zip(&lb) {
        assert_eq!(ga, gb);
        assert!(
            (xa - xb).abs() <= 1e-5 * (1.0 + xa.abs()),
            "step {ga}: loss {xa} vs {xb}"
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

const VIT: &str = r#"
arch = "vit_custom"
patch_size = 7
img_size = 28
vit_embed_dim = 96
vit_depth = 4
vit_num_heads = 3
out_dim = 1024
use_bn_in_head = true
drop_path_rate = 0.2
momentum_teacher = 0.99
weight_decay_end = 0.1
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

/// ViT (drop path 0.2, BatchNorm head): 2 ranks x 32 == 1 rank x 64 after 12 steps, including the k-NN;
/// 2 ranks for 5 steps then 1 rank to the end == 1 rank throughout; kill -9 of one rank ends the job within
/// 30 s, the checkpoint loads, and the resumed run ends as the uninterrupted one.
#[test]
fn vit_two_ranks_are_one_rank_across_resume_and_kill() {
    let Some(bin) = mpi_dino() else { return };
    let _g = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let tmp = tempfile::tempdir().unwrap();
    let cfg = write_cfg(tmp.path(), "vit.toml", VIT);
    let (one, two, mixed, killed) = (
        tmp.path().join("one"),
        tmp.path().join("two"),
        tmp.path().join("mixed"),
        tmp.path().join("killed"),
    );
    // One rank, global batch 64: the mpi binary without mpirun is world 1.
    let o1 = ok(train(&bin, 0, &cfg, &one, &[]), "1 rank");
    // Two ranks, 32 each (the official per-GPU meaning).
    let o2 = ok(
        train(&bin, 2, &cfg, &two, &["--batch-size-per-gpu", "32"]),
        "2 ranks",
    );
    assert!(text(&o2.stderr).contains("2 ranks (mpi) x 32 images = batch 64"));
    assert_same_state(&one, &two);
    assert_same_losses(&one, &two);
    let (k1, k2) = (knn_line(&o1), knn_line(&o2));
    assert!(k1.contains("trained top-1"), "{k1}");
    assert_eq!(
        k1, k2,
        "the k-NN with features gathered over 2 ranks differs"
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
    let o = ok(train(&bin, 0, &cfg, &mixed, &[]), "1 rank, resumed");
    assert!(
        text(&o.stdout).contains("resumed from global iteration 4"),
        "{}",
        text(&o.stdout)
    );
    assert_same_state(&one, &mixed);

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
    assert!(text(&info.stdout).contains("global iteration") || !info.stdout.is_empty());
    let o = ok(train(&bin, 2, &cfg, &killed, &[]), "resume after kill");
    assert!(text(&o.stdout).contains("resumed from global iteration"));
    assert_same_state(&one, &killed);
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
    let (one, two) = (tmp.path().join("one"), tmp.path().join("two"));
    ok(train(&bin, 0, &cfg, &one, &[]), "1 rank");
    ok(train(&bin, 2, &cfg, &two, &[]), "2 ranks");
    assert_same_state(&one, &two);
    assert_same_losses(&one, &two);
    // The running statistics moved (SyncBatchNorm updated them from the global batch).
    let t = load(&two);
    let rv = &t["student.backbone.layer1.0.bn1.running_var"];
    assert!(rv.iter().any(|v| (v - 1.0).abs() > 1e-3));
}

/// Bad input under mpirun: a batch that does not split over the ranks, and ranks with different
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
