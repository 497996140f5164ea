//! `student_passes`: the student's crops forward and backward in several passes (per resolution, per crop)
//! make the same training steps as one pass, with the paths the official golden run does not cover: drop
//! path (its draws keyed by crop), KoLeo and iBOT on the global crops, Sinkhorn-Knopp targets, and a
//! ResNet's BatchNorm per resolution group. The one-pass step is the reference; the official iterations
//! themselves are checked in every mode by `golden_steps.rs`.

use std::collections::BTreeMap;

use candle_core::{DType, Device, Tensor};
use dino_train::{Centering, StudentPasses, TrainConfig, Trainer};

fn vit() -> TrainConfig {
    TrainConfig {
        arch: "vit_custom".into(),
        patch_size: 4,
        img_size: 16,
        vit_embed_dim: 32,
        vit_depth: 2,
        vit_num_heads: 2,
        out_dim: 64,
        head_hidden_dim: 48,
        head_bottleneck_dim: 16,
        drop_path_rate: 0.3,
        batch_size: 4,
        epochs: 2,
        warmup_epochs: 1,
        lr: 0.01,
        freeze_last_layer: 0,
        local_crops_number: 3,
        global_crops_size: 16,
        local_crops_size: 8,
        ..TrainConfig::default()
    }
}

/// The step's crops (2 global, then the local ones), pseudo-random values in [-1, 1) drawn from `seed`.
fn crops(cfg: &TrainConfig, seed: u64) -> Vec<Tensor> {
    let mut state = seed;
    let mut next = move || {
        // SplitMix64
        state = state.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = state;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        ((z ^ (z >> 31)) >> 40) as f32 / (1u64 << 23) as f32 - 1.0
    };
    let b = cfg.batch_size;
    (0..2 + cfg.local_crops_number)
        .map(|c| {
            let s = if c < 2 {
                cfg.global_crops_size
            } else {
                cfg.local_crops_size
            };
            let v: Vec<f32> = (0..b * 3 * s * s).map(|_| next()).collect();
            Tensor::from_vec(v, (b, 3, s, s), &Device::Cpu).unwrap()
        })
        .collect()
}

/// Every tensor of the training state after two steps on fresh crops, and the two steps' losses.
fn two_steps(cfg: &TrainConfig) -> (BTreeMap<String, Tensor>, Vec<f64>) {
    let mut t = Trainer::new(cfg, 2, &Device::Cpu).unwrap();
    let mut losses = Vec::new();
    for it in 0..2 {
        let s = t.step(&crops(cfg, 7 + it as u64), 0, it).unwrap();
        losses.push(s.loss);
        if let Some(l) = s.ibot_loss {
            losses.push(l);
        }
    }
    (t.state_tensors().unwrap().into_iter().collect(), losses)
}

/// `passes` against one pass: the same losses and every state tensor (student, teacher, optimiser, centres)
/// within float-summation distance of the tensor's scale.
fn same_steps(what: &str, cfg: TrainConfig, passes: StudentPasses) {
    let (want, want_loss) = two_steps(&TrainConfig {
        student_passes: StudentPasses::All,
        ..cfg.clone()
    });
    let (got, got_loss) = two_steps(&TrainConfig {
        student_passes: passes,
        ..cfg
    });
    assert_eq!(got_loss.len(), want_loss.len());
    for (g, w) in got_loss.iter().zip(&want_loss) {
        assert!(
            (g - w).abs() <= 1e-5 * w.abs(),
            "{what} {passes:?}: loss {g} vs {w}"
        );
    }
    assert_eq!(got.len(), want.len());
    let mut worst = (0f64, String::new());
    for (name, w) in &want {
        let (g, w) = if name.contains("attn.qkv.bias") && !name.starts_with("optimizer.step") {
            // The key third of the qkv bias has an analytically zero gradient (softmax ignores a per-row
            // constant): rounding noise that AdamW normalises into steps of up to lr. The q and v thirds.
            let d = w.dim(0).unwrap() / 3;
            let qv = |t: &Tensor| {
                Tensor::cat(
                    &[t.narrow(0, 0, d).unwrap(), t.narrow(0, 2 * d, d).unwrap()],
                    0,
                )
                .unwrap()
            };
            (qv(&got[name]), qv(w))
        } else {
            (got[name].clone(), w.clone())
        };
        let f64_of = |t: &Tensor| t.to_dtype(DType::F64).unwrap();
        let max_abs = |t: Tensor| {
            t.abs()
                .unwrap()
                .max_all()
                .unwrap()
                .to_scalar::<f64>()
                .unwrap()
        };
        let diff = max_abs((f64_of(&g) - f64_of(&w)).unwrap());
        let rel = diff / max_abs(f64_of(&w)).max(1e-12);
        if rel > worst.0 {
            worst = (rel, name.clone());
        }
    }
    eprintln!(
        "{what} {passes:?}: worst relative difference {:e} ({})",
        worst.0, worst.1
    );
    assert!(
        worst.0 < 1e-4,
        "{what} {passes:?}: {} differs by {:e} of its scale",
        worst.1,
        worst.0
    );
}

#[test]
fn vit_with_drop_path_koleo_ibot_and_sinkhorn_knopp_takes_the_same_steps_in_passes() {
    let koleo = TrainConfig {
        koleo_loss_weight: 0.1,
        ..vit()
    };
    let ibot = TrainConfig {
        ibot_loss_weight: 1.0,
        ibot_mask_sample_probability: 1.0,
        centering: Centering::SinkhornKnopp,
        ..koleo.clone()
    };
    for (what, cfg) in [
        ("drop path + KoLeo", koleo),
        ("iBOT + Sinkhorn-Knopp + KoLeo", ibot),
    ] {
        for passes in [StudentPasses::Resolution, StudentPasses::Crop] {
            same_steps(what, cfg.clone(), passes);
        }
    }
}

#[test]
fn resnet_takes_the_same_steps_in_one_pass_per_resolution_and_refuses_one_per_crop() {
    let cfg = TrainConfig {
        arch: "resnet18".into(),
        resnet_width: 8,
        resnet_cifar_stem: true,
        drop_path_rate: 0.0,
        ..vit()
    };
    same_steps("resnet18", cfg.clone(), StudentPasses::Resolution);
    let e = TrainConfig {
        student_passes: StudentPasses::Crop,
        ..cfg.clone()
    }
    .validate()
    .unwrap_err()
    .to_string();
    assert!(
        e.contains("student_passes") && e.contains("BatchNorm"),
        "{e}"
    );
    let e = TrainConfig {
        student_passes: StudentPasses::Resolution,
        use_bn_in_head: true,
        ..vit()
    }
    .validate()
    .unwrap_err()
    .to_string();
    assert!(e.contains("use_bn_in_head"), "{e}");
    // auto (the default): per resolution, or one pass with the head's BatchNorm (and accepted there)
    let bn = TrainConfig {
        use_bn_in_head: true,
        ..vit()
    };
    bn.validate().unwrap();
    assert_eq!(bn.student_passes, StudentPasses::Auto);
    assert_eq!(bn.student_passes.resolve(true), StudentPasses::All);
    assert_eq!(
        vit().student_passes.resolve(false),
        StudentPasses::Resolution
    );
}
