//! The memory estimate made before a run's first step (`dino_train::memory`): probing the student leaves
//! the training unchanged, bit for bit, and the estimated peak of a step is near the peak the allocator
//! counts while the step runs, for a ViT in each student-pass mode, with iBOT, and for a ResNet.
//!
//! The counts come from `TensorAlloc`, this binary's global allocator. They are the process's, so the
//! tests take turns (`SERIAL`).

use std::sync::Mutex;

use candle_core::{DType, Device, Tensor};
use dino_train::memory::StepMemory;
use dino_train::runtime::{peak_allocated_bytes, reset_peak_allocated, TensorAlloc};
use dino_train::{StudentPasses, TrainConfig, Trainer};

#[global_allocator]
static GLOBAL: TensorAlloc = TensorAlloc;

/// One test at a time: the allocator's counts are the whole process's.
static SERIAL: Mutex<()> = Mutex::new(());

/// A ViT whose activations outweigh its weights, as in real runs: 65 tokens per global crop, 4 blocks.
fn vit() -> TrainConfig {
    TrainConfig {
        arch: "vit_custom".into(),
        patch_size: 4,
        img_size: 32,
        vit_embed_dim: 96,
        vit_depth: 4,
        vit_num_heads: 3,
        out_dim: 1024,
        head_hidden_dim: 256,
        head_bottleneck_dim: 64,
        drop_path_rate: 0.1,
        batch_size: 16,
        epochs: 2,
        warmup_epochs: 1,
        freeze_last_layer: 0,
        local_crops_number: 4,
        global_crops_size: 32,
        local_crops_size: 16,
        ..TrainConfig::default()
    }
}

fn resnet() -> TrainConfig {
    TrainConfig {
        arch: "resnet18".into(),
        batch_size: 32,
        global_crops_size: 64,
        local_crops_size: 32,
        ..vit()
    }
}

/// The step's crops (2 global, then the local ones): the step benchmark's deterministic pattern.
fn crops(cfg: &TrainConfig) -> Vec<Tensor> {
    dino_train::bench::pattern_crops(cfg, &Device::Cpu).unwrap()
}

/// Every state tensor after two steps, as f32 bits, and the losses; `probe` first when asked.
fn two_steps(cfg: &TrainConfig, probe: bool) -> (Vec<(String, Vec<u32>)>, Vec<u64>) {
    let mut t = Trainer::new(cfg, 2, &Device::Cpu).unwrap();
    if probe {
        let mem = StepMemory::probe(&t).unwrap();
        assert!(mem.is_some(), "TensorAlloc counts here, so the probe runs");
    }
    let losses = (0..2)
        .map(|it| t.step(&crops(cfg), 0, it).unwrap().loss.to_bits())
        .collect();
    let state = t
        .state_tensors()
        .unwrap()
        .into_iter()
        .map(|(n, v)| {
            let v = v
                .to_dtype(DType::F32)
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1::<f32>()
                .unwrap();
            (n, v.into_iter().map(f32::to_bits).collect())
        })
        .collect();
    (state, losses)
}

#[test]
fn probing_leaves_the_training_unchanged() {
    let _turn = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    // Drop path (draws keyed by crop), KoLeo, and a ResNet's BatchNorm statistics.
    let cases = [
        (
            "vit with drop path and KoLeo",
            TrainConfig {
                koleo_loss_weight: 0.1,
                ..vit()
            },
        ),
        ("resnet18", resnet()),
    ];
    for (what, cfg) in cases {
        let (want, want_loss) = two_steps(&cfg, false);
        let (got, got_loss) = two_steps(&cfg, true);
        assert_eq!(got_loss, want_loss, "{what}: losses");
        assert_eq!(got.len(), want.len());
        for ((n, g), (_, w)) in got.iter().zip(&want) {
            assert!(g == w, "{what}: {n} differs after a probe");
        }
    }
}

#[test]
fn the_estimate_is_near_the_peak_a_step_reaches() {
    let _turn = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let ibot = TrainConfig {
        ibot_loss_weight: 1.0,
        ..vit()
    };
    let cases = [
        ("vit", vit(), StudentPasses::All),
        ("vit", vit(), StudentPasses::Resolution),
        ("vit", vit(), StudentPasses::Crop),
        ("vit + iBOT", ibot.clone(), StudentPasses::All),
        ("vit + iBOT", ibot, StudentPasses::Crop),
        ("resnet18", resnet(), StudentPasses::Resolution),
    ];
    for (what, cfg, passes) in cases {
        let cfg = TrainConfig {
            student_passes: passes,
            ..cfg
        };
        let mut t = Trainer::new(&cfg, 2, &Device::Cpu).unwrap();
        let mem = StepMemory::probe(&t).unwrap().unwrap();
        let step_crops = crops(&cfg);
        let estimate = mem.peak(passes, cfg.batch_size);
        // The first step allocates for the first time; the second is the steady state the estimate is for.
        t.step(&step_crops, 0, 0).unwrap();
        reset_peak_allocated();
        t.step(&step_crops, 0, 1).unwrap();
        let peak = peak_allocated_bytes().unwrap() as u64;
        let ratio = estimate as f64 / peak as f64;
        let acts = mem.activations(passes, cfg.batch_size);
        let mib = |b: u64| b as f64 / (1 << 20) as f64;
        eprintln!(
            "{what} {passes}: estimate {:.1} MiB (held {:.1}, activations {:.1}), peak {:.1} MiB: {ratio:.2}",
            mib(estimate),
            mib(mem.held),
            mib(acts),
            mib(peak)
        );
        // The activations weigh: an estimate without them would be far below the peak.
        assert!(
            acts as f64 > peak as f64 / 3.0,
            "{what} {passes}: activations {acts} of a peak of {peak}: too small a case to tell"
        );
        assert!(
            (0.8..1.25).contains(&ratio),
            "{what} {passes}: estimated {estimate} bytes, the step reached {peak} ({ratio:.2})"
        );
    }
}
