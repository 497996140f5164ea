//! The step benchmark of issue 6 (`cargo xtask bench` runs it, one process per case so each case's peak RSS is
//! its own). It drives dino-train's public `Trainer::step`, exactly the training iteration `dino train` runs.
//!
//! Configurations (../shared/spec/baseline.md): vit_tiny (dim 192, depth 12, 3 heads) student with drop path 0.1
//! and DINOHead(192, K), K = 65536 or 4096, hidden 2048, bottleneck 256, norm_last_layer; AdamW in two groups,
//! clip 3.0, EMA; epoch 1 (the last layer is trained).
//! - `imagenet`: patch 16, 2 x 224 + 6 x 96 crops, batch 8;
//! - `cifar`: patch 4, 2 x 32 + 6 x 16 crops, batch 64.
//!
//! Cases (`--list` prints them):
//! - `step/<cfg>/<K>`: one training step on seeded random crops: seconds/step (median of >= 10 after 2 warm-up
//!   steps; `--quick`: 3), images/s = batch / median, peak RSS;
//! - `forward/<cfg>/<K>`: the forward part of the step under `dino_models::no_grad` (as the official
//!   forward-only figure under `torch.no_grad()`): teacher on the 2 global crops + student on all crops
//!   (evaluation mode, no drop path), images/s;
//! - `loader/<cfg>/<K>`: the training step fed by dino-data's parallel loader with the real multi-crop
//!   augmentation of real images (../shared/data/photos downscaled to 256 px for imagenet, the 20 CIFAR-10 test
//!   images for cifar), to show whether data loading hides behind compute.
//!
//! - `ceiling`: this CPU's f32 and bf16 arithmetic ceilings, register-only FMA / `vdpbf16ps` loops on 1 thread
//!   and on all threads (`dino_kernels::cpu::Ceiling`), the yardstick for the GFLOP/s of the other cases.
//!
//! Every case's JSON names the CPU (model, family/model) and its kernel flags (avx512f, avx512_bf16, amx_bf16,
//! ...); step and forward cases also the GEMM path their products took (`gemm_path`).
//!
//! Options: `--quick` (1 warm-up + 3 measured iterations), `--case C` (one case), `--list`, and for scaling
//! measurements `--batch N` / `--local-crops L` (override the configuration's batch size / local crop count),
//! `--matmul-precision bf16` (the linear layers' products in bf16, see `TrainConfig::matmul_precision`),
//! `--head-last-layer-bf16` (with bf16, the head's last layer too, see `TrainConfig::head_last_layer_bf16`),
//! `--student-passes resolution|crop` (the student's crops in passes, see `TrainConfig::student_passes`).
//!
//! Output: one JSON line per case on stdout (median seconds, images/s, peak RSS, per-phase medians, FLOPs and
//! GFLOP/s); progress on stderr.

use anyhow::{bail, Context, Result};
use dino_data::dataset::{Dataset, InMemoryDataset, Subset};
use dino_data::loader::{LoaderConfig, MultiCropLoader};
use dino_train::{TrainConfig, Trainer};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

/// Tensor buffers as in the `dino` binary (see `TensorAlloc`).
#[global_allocator]
static GLOBAL: dino_train::runtime::TensorAlloc = dino_train::runtime::TensorAlloc;

const CONFIGS: [&str; 2] = ["imagenet", "cifar"];
const OUT_DIMS: [usize; 2] = [65536, 4096];
const KINDS: [&str; 3] = ["step", "forward", "loader"];

/// Multiply-adds of one forward pass of vit_tiny + DINOHead on `rows` crops of `size` px, as executed here
/// (the last block for the CLS rows only) and as the official code executes it (every row of the last block).
fn forward_macs(cfg: &TrainConfig, size: usize, rows: usize) -> (f64, f64) {
    let d = 192f64;
    let depth = 12f64;
    let p = cfg.patch_size;
    let n = ((size / p) * (size / p)) as f64;
    let t = n + 1.0;
    let block = 12.0 * t * d * d + 2.0 * t * t * d;
    let last_cls = 2.0 * t * d * d + 10.0 * d * d + 2.0 * t * d;
    let patch = n * (3 * p * p) as f64 * d;
    let head = d * 2048.0 + 2048.0 * 2048.0 + 2048.0 * 256.0 + 256.0 * cfg.out_dim as f64;
    let ours = patch + (depth - 1.0) * block + last_cls + head;
    let official = patch + depth * block + head;
    (rows as f64 * ours, rows as f64 * official)
}

/// FLOPs of one training step (teacher forward on the global crops, student forward + backward (2x the
/// forward) on every crop): `(as executed here, as the official code executes it)`.
fn step_flops(cfg: &TrainConfig) -> (f64, f64) {
    let b = cfg.batch_size;
    let (g_ours, g_off) = forward_macs(cfg, cfg.global_crops_size, 2 * b);
    let (l_ours, l_off) = forward_macs(cfg, cfg.local_crops_size, cfg.local_crops_number * b);
    let teacher = (g_ours, g_off);
    let student = (g_ours + l_ours, g_off + l_off);
    // 2 FLOPs per multiply-add; backward = 2 x forward.
    (
        2.0 * (teacher.0 + 3.0 * student.0),
        2.0 * (teacher.1 + 3.0 * student.1),
    )
}

/// Forward-only FLOPs (teacher on the global crops + student on every crop): `(as executed here, as the
/// official code executes them)`.
fn forward_flops(cfg: &TrainConfig) -> (f64, f64) {
    let b = cfg.batch_size;
    let (g, g_off) = forward_macs(cfg, cfg.global_crops_size, 2 * b);
    let (l, l_off) = forward_macs(cfg, cfg.local_crops_size, cfg.local_crops_number * b);
    (2.0 * (2.0 * g + l), 2.0 * (2.0 * g_off + l_off))
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    let n = v.len();
    if n % 2 == 1 {
        v[n / 2]
    } else {
        0.5 * (v[n / 2 - 1] + v[n / 2])
    }
}

fn shared() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../../shared/data")
}

/// Real images for the loader case, repeated to `n` samples.
fn real_dataset(name: &str, n: usize) -> Result<Arc<dyn Dataset>> {
    let inner: Arc<dyn Dataset> = if name == "imagenet" {
        let dir = shared().join("photos");
        let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
            .with_context(|| format!("cannot read {}", dir.display()))?
            .flatten()
            .map(|e| e.path())
            .filter(|p| dino_data::folder::has_image_extension(p))
            .collect();
        files.sort();
        let mut imgs = Vec::new();
        for f in &files {
            let img = dino_data::folder::load_rgb(f)?;
            // Shorter side 256, as baseline.md's augmentation measurement.
            let (w, h) = (img.width() as usize, img.height() as usize);
            let (nw, nh) = if w <= h {
                (256, 256 * h / w)
            } else {
                (256 * w / h, 256)
            };
            imgs.push(dino_data::pil::resize(&img, nw, nh)?);
        }
        Arc::new(InMemoryDataset::new("photos-256", imgs, None)?)
    } else {
        let f = shared().join("cifar10-test20/test_batch.bin");
        Arc::new(dino_data::cifar::CifarDataset::open_files(
            dino_data::cifar::CifarKind::Cifar10,
            &[f],
        )?)
    };
    let len = inner.len();
    Ok(Arc::new(Subset::new(
        inner,
        (0..n).map(|i| i % len).collect(),
    )?))
}

/// Overrides of the baseline configuration, for the scaling measurements.
#[derive(Debug, Clone, Copy, Default)]
struct Overrides {
    batch: Option<usize>,
    local_crops: Option<usize>,
    matmul_precision: dino_train::MatmulPrecision,
    /// `--head-last-layer-bf16`: the head's last layer takes bf16 products too (with bf16).
    head_last_layer_bf16: bool,
    student_passes: dino_train::StudentPasses,
    device: dino_train::DeviceSpec,
}

/// `ceiling`: the register-only loops of `dino_kernels::cpu::Ceiling` on 1 thread and on every thread of this
/// process (median of 5 runs of ~0.3 s each), GFLOP/s; null where the CPU lacks the instructions.
fn ceilings(quick: bool) -> serde_json::Value {
    use dino_kernels::cpu::Ceiling;
    let threads = cpus();
    let mut out = serde_json::Map::new();
    for c in Ceiling::ALL {
        let iterations = if quick { 20_000_000 } else { 100_000_000 };
        let mut one: Vec<f64> = (0..5).filter_map(|_| c.measure(1, iterations)).collect();
        let mut all: Vec<f64> = (0..5)
            .filter_map(|_| c.measure(threads, iterations))
            .collect();
        let (one, all) = if one.is_empty() {
            (None, None)
        } else {
            (Some(median(&mut one)), Some(median(&mut all)))
        };
        eprintln!(
            "ceiling {}: {} GFLOP/s on 1 thread, {} on {threads}",
            c.name(),
            one.map_or("not run (no instructions)".into(), |g| format!("{g:.1}")),
            all.map_or("-".into(), |g| format!("{g:.1}")),
        );
        out.insert(
            c.name().to_string(),
            serde_json::json!({ "gflop_per_s_1_thread": one, "gflop_per_s_all_threads": all }),
        );
    }
    let cpu = dino_kernels::cpu::CpuInfo::detect();
    serde_json::json!({
        "case": "ceiling",
        "cpu": cpu.describe(),
        "cpu_flags": cpu.flags,
        "threads": threads,
        "ceilings": out,
        "amx_bf16": if dino_kernels::amx::available() {
            "present and granted (the bf16_amx loop)"
        } else if cpu.has("amx_bf16") {
            "reported by the CPU but not granted by the OS"
        } else {
            "absent"
        },
    })
}

fn run_case(case: &str, quick: bool, ov: Overrides) -> Result<serde_json::Value> {
    if case == "ceiling" {
        return Ok(ceilings(quick));
    }
    let parts: Vec<&str> = case.split('/').collect();
    let [kind, name, k] = parts.as_slice() else {
        bail!("bad case `{case}`: expected kind/config/out_dim");
    };
    let out_dim: usize = k
        .parse()
        .with_context(|| format!("bad out_dim in `{case}`"))?;
    let mut cfg = dino_train::bench::case_config(name, out_dim)?;
    if let Some(b) = ov.batch {
        cfg.batch_size = b;
    }
    cfg.matmul_precision = ov.matmul_precision;
    cfg.head_last_layer_bf16 = ov.head_last_layer_bf16;
    cfg.student_passes = ov.student_passes;
    if let Some(l) = ov.local_crops {
        cfg.local_crops_number = l;
    }
    cfg.validate()?;
    let dev = ov.device.resolve("--device")?;
    let b = cfg.batch_size;
    let (warmup, iters) = if quick { (1, 3) } else { (2, 10) };
    let niter_per_ep = 1000;
    let mut trainer = Trainer::new(&cfg, niter_per_ep, &dev)?;
    let mut times = Vec::new();
    let mut phases: Vec<dino_train::StepTimings> = Vec::new();
    let t_all = Instant::now();
    match *kind {
        "step" => {
            let crops = dino_train::bench::pattern_crops(&cfg, &dev)?;
            for it in 0..warmup + iters {
                let t = Instant::now();
                let s = trainer.step(&crops, 1, it)?;
                // The EMA and optimiser kernels are queued on a GPU: wait for them.
                dev.synchronize()?;
                let dt = t.elapsed().as_secs_f64();
                eprintln!("{case}: step {it} loss {:.4} {:.3} s", s.loss, dt);
                if it >= warmup {
                    times.push(dt);
                    phases.push(s.timings);
                }
            }
        }
        "forward" => {
            let crops = dino_train::bench::pattern_crops(&cfg, &dev)?;
            for it in 0..warmup + iters {
                let t = Instant::now();
                let (tout, sout) = dino_models::no_grad(|| {
                    dino_models::with_matmul_precision(cfg.matmul_precision, || {
                        anyhow::Ok((
                            trainer.teacher.model.forward(&crops[..2], false)?,
                            trainer.student.model.forward(&crops, false)?,
                        ))
                    })
                })?;
                // Make sure the work is done (candle is eager, but read a value anyway).
                let _ = (
                    tout.sum_all()?.to_scalar::<f32>()?,
                    sout.sum_all()?.to_scalar::<f32>()?,
                );
                let dt = t.elapsed().as_secs_f64();
                eprintln!("{case}: forward {it} {dt:.3} s");
                if it >= warmup {
                    times.push(dt);
                }
            }
        }
        "loader" => {
            let ds = real_dataset(name, b * (warmup + iters))?;
            let aug = dino_train::data::augmentation(&cfg)?;
            let loader = MultiCropLoader::new(
                ds,
                aug,
                LoaderConfig {
                    batch_size: b,
                    num_workers: 2,
                    prefetch: 2,
                    seed: 0,
                    shuffle: true,
                    drop_last: true,
                    ..Default::default()
                },
            )?;
            let mut epoch = loader.epoch(1);
            for it in 0..warmup + iters {
                let t = Instant::now();
                let batch = epoch.next().context("the loader ran out of batches")??;
                let s = trainer.step(&batch.crops, 1, it)?;
                let dt = t.elapsed().as_secs_f64();
                eprintln!(
                    "{case}: step {it} loss {:.4} {dt:.3} s (data + compute)",
                    s.loss
                );
                if it >= warmup {
                    times.push(dt);
                    phases.push(s.timings);
                }
            }
        }
        other => bail!("unknown case kind `{other}`"),
    }
    let med = median(&mut times);
    let phase = |f: fn(&dino_train::StepTimings) -> f64| -> f64 {
        let mut v: Vec<f64> = phases.iter().map(f).collect();
        if v.is_empty() {
            f64::NAN
        } else {
            median(&mut v)
        }
    };
    let phases_json = (!phases.is_empty()).then(|| {
        serde_json::json!({
            "teacher_forward": phase(|p| p.teacher_forward),
            "student_forward": phase(|p| p.student_forward),
            "loss": phase(|p| p.loss),
            "backward": phase(|p| p.backward),
            "clip": phase(|p| p.clip),
            "optimizer": phase(|p| p.optimizer),
            "ema": phase(|p| p.ema),
        })
    });
    let (flops, flops_official) = if *kind == "forward" {
        forward_flops(&cfg)
    } else {
        step_flops(&cfg)
    };
    let cpu = dino_kernels::cpu::CpuInfo::detect();
    Ok(serde_json::json!({
        "case": case,
        "config": name,
        "matmul_precision": cfg.matmul_precision.to_string(),
        "head_last_layer_bf16": cfg.head_last_layer_bf16,
        "student_passes": cfg.student_passes.to_string(),
        "device": dino_train::device::describe(&dev),
        "out_dim": out_dim,
        "batch": b,
        "crops": format!("2x{} + {}x{}", cfg.global_crops_size, cfg.local_crops_number, cfg.local_crops_size),
        "iterations": times.len(),
        "seconds_per_step_median": med,
        "seconds_per_step_min": times.iter().copied().fold(f64::INFINITY, f64::min),
        "images_per_s": b as f64 / med,
        "peak_rss_bytes": dino_train::runtime::peak_rss_bytes(),
        "peak_rss_gib": dino_train::runtime::peak_rss_bytes().map(dino_train::runtime::gib),
        "total_seconds": t_all.elapsed().as_secs_f64(),
        "cpus": cpus(),
        "cpu": cpu.name(),
        "cpu_flags": cpu.flags,
        "gemm_path": dino_kernels::cpu::gemm_path(cfg.matmul_precision),
        "phase_seconds_median": phases_json,
        "gflop": flops / 1e9,
        "gflop_official_equivalent": flops_official / 1e9,
        "gflop_per_s": flops / med / 1e9,
    }))
}

fn cpus() -> usize {
    std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1)
}

fn all_cases() -> Vec<String> {
    let mut v = vec!["ceiling".to_string()];
    for kind in KINDS {
        for c in CONFIGS {
            for k in OUT_DIMS {
                v.push(format!("{kind}/{c}/{k}"));
            }
        }
    }
    v
}

fn main() {
    dino_train::runtime::tune_allocator();
    dino_train::runtime::main_thread_in_pool();
    let args: Vec<String> = std::env::args().skip(1).collect();
    let quick = args.iter().any(|a| a == "--quick");
    if args.iter().any(|a| a == "--list") {
        for c in all_cases() {
            println!("{c}");
        }
        return;
    }
    let cases: Vec<String> = match args.iter().position(|a| a == "--case") {
        Some(i) => match args.get(i + 1) {
            Some(c) => vec![c.clone()],
            None => {
                eprintln!("error: --case needs a value (see --list)");
                std::process::exit(2);
            }
        },
        None => all_cases(),
    };
    let value = |flag: &str| -> Option<usize> {
        let i = args.iter().position(|a| a == flag)?;
        match args.get(i + 1).and_then(|v| v.parse().ok()) {
            Some(v) => Some(v),
            None => {
                eprintln!("error: {flag} needs a positive integer");
                std::process::exit(2);
            }
        }
    };
    // `--flag VALUE`, parsed; a missing or bad value ends the program with the flag named.
    let parsed = |flag: &str, values: &str| -> Option<String> {
        let i = args.iter().position(|a| a == flag)?;
        match args.get(i + 1) {
            Some(v) => Some(v.clone()),
            None => {
                eprintln!("error: {flag} needs a value ({values})");
                std::process::exit(2);
            }
        }
    };
    fn or_exit<T, E: std::fmt::Display>(flag: &str, r: std::result::Result<T, E>) -> T {
        r.unwrap_or_else(|e| {
            eprintln!("error: {flag}: {e}");
            std::process::exit(2);
        })
    }
    let matmul_precision = parsed("--matmul-precision", "highest or bf16")
        .map_or(dino_train::MatmulPrecision::Highest, |v| {
            or_exit("--matmul-precision", v.parse())
        });
    let device = parsed("--device", "cpu, cuda, cuda:N or auto")
        .map_or(dino_train::DeviceSpec::Cpu, |v| {
            or_exit("--device", v.parse::<dino_train::DeviceSpec>())
        });
    // One pass unless asked: the figures of docs/PERFORMANCE.md (the default, auto, runs two).
    let student_passes = parsed("--student-passes", "auto, all, resolution or crop")
        .map_or(dino_train::StudentPasses::All, |v| {
            or_exit("--student-passes", v.parse::<dino_train::StudentPasses>())
        });
    let ov = Overrides {
        batch: value("--batch"),
        local_crops: value("--local-crops"),
        matmul_precision,
        head_last_layer_bf16: args.iter().any(|a| a == "--head-last-layer-bf16"),
        student_passes,
        device,
    };
    for case in cases {
        match run_case(&case, quick, ov) {
            Ok(v) => println!("{v}"),
            Err(e) => {
                eprintln!("error: {case}: {e:#}");
                std::process::exit(1);
            }
        }
    }
}
