//! The step benchmark's configurations (`../shared/spec/baseline.md`: vit_tiny + DINOHead, 2 global + 6 local
//! crops, "imagenet" 224/96 px batch 8 or "cifar" 32/16 px batch 64, out_dim 65536 or 4096) and its input
//! crops, shared by `cargo xtask bench` (the `bench_step` example) and the GPU check (`tests/device.rs`).

use candle_core::{Device, Tensor};

use crate::config::TrainConfig;
use crate::error::{Error, Result};

/// The configuration of a benchmark case: `name` is `imagenet` or `cifar`.
pub fn case_config(name: &str, out_dim: usize) -> Result<TrainConfig> {
    let base = TrainConfig {
        arch: "vit_tiny".into(),
        out_dim,
        drop_path_rate: 0.1,
        norm_last_layer: true,
        local_crops_number: 6,
        clip_grad: 3.0,
        epochs: 2,
        warmup_epochs: 1,
        freeze_last_layer: 1,
        seed: 0,
        ..TrainConfig::official()
    };
    let cfg = match name {
        "imagenet" => TrainConfig {
            patch_size: 16,
            img_size: 224,
            batch_size: 8,
            global_crops_size: 224,
            local_crops_size: 96,
            ..base
        },
        "cifar" => TrainConfig {
            patch_size: 4,
            img_size: 32,
            batch_size: 64,
            global_crops_size: 32,
            local_crops_size: 16,
            norm_mean: [0.4914, 0.4822, 0.4465],
            norm_std: [0.2470, 0.2435, 0.2616],
            ..base
        },
        other => {
            return Err(Error::Msg(format!(
                "unknown benchmark configuration `{other}` (imagenet or cifar)"
            )))
        }
    };
    cfg.validate()?;
    Ok(cfg)
}

/// Deterministic crops for `cfg` on `dev`: 2 global then L local, each `(B, 3, s, s)`, values in [-2, 2]
/// (a cheap pattern: candle's CPU RNG cannot be seeded).
pub fn pattern_crops(cfg: &TrainConfig, dev: &Device) -> Result<Vec<Tensor>> {
    let b = cfg.batch_size;
    let mut crops = Vec::new();
    for c in 0..cfg.ncrops() {
        let s = if c < 2 {
            cfg.global_crops_size
        } else {
            cfg.local_crops_size
        };
        let n = b * 3 * s * s;
        let data: Vec<f32> = (0..n)
            .map(|i| {
                let x = (i as u64)
                    .wrapping_mul(2654435761)
                    .wrapping_add(c as u64 * 97)
                    % 4001;
                x as f32 / 1000.0 - 2.0
            })
            .collect();
        crops.push(Tensor::from_vec(data, (b, 3, s, s), dev)?);
    }
    Ok(crops)
}
