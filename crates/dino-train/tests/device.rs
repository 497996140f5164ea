//! Every golden and gradient-presence check of the workspace in one test binary, so that a GPU machine
//! (which has no cargo) can run them from one file: `cargo xtask gpu-check` builds this target with the
//! `cuda` feature and runs its `portable::` tests with `DINO_TEST_DEVICE=cuda`, where each op takes the
//! portable path on candle's CUDA kernels. On the CPU (the README's test command) the same files run as their
//! own crates' tests, so this binary repeats them and is only built with the `cuda` feature.
#![cfg(feature = "cuda")]

#[path = "../../dino-core/tests/golden_loss.rs"]
mod golden_loss;

#[path = "../../dino-core/tests/golden_optim.rs"]
mod golden_optim;

#[path = "../../dino-core/tests/golden_schedules_ema.rs"]
mod golden_schedules_ema;

#[path = "../../dino-core/tests/golden_dinov2.rs"]
mod golden_dinov2;

#[path = "../../dino-models/tests/vit.rs"]
mod vit;

#[path = "../../dino-models/tests/vit_reg4.rs"]
mod vit_reg4;

#[path = "../../dino-models/tests/head.rs"]
mod head;

#[path = "../../dino-models/tests/multicrop.rs"]
mod multicrop;

#[path = "../../dino-models/tests/resnet_golden.rs"]
mod resnet_golden;

#[path = "../../dino-models/tests/resnet_grad.rs"]
mod resnet_grad;

#[path = "golden_steps.rs"]
mod golden_steps;

/// One benchmark case on the test device, printed as one JSON line: `DINO_BENCH_CASE` (`step/imagenet/65536`,
/// ...) and `DINO_BENCH_PRECISION` (`highest` or `bf16`). `cargo xtask gpu-check`'s script runs it with
/// `--ignored` beside the PyTorch step on the same card.
#[test]
#[ignore = "a benchmark, run by cargo xtask gpu-check"]
fn bench_step_on_test_device() {
    let case = std::env::var("DINO_BENCH_CASE").unwrap_or_else(|_| "step/cifar/4096".into());
    let precision: dino_train::MatmulPrecision = std::env::var("DINO_BENCH_PRECISION")
        .unwrap_or_else(|_| "highest".into())
        .parse()
        .unwrap();
    let parts: Vec<&str> = case.split('/').collect();
    let [_, name, k] = parts.as_slice() else {
        panic!("DINO_BENCH_CASE={case}: expected step/<imagenet|cifar>/<out_dim>")
    };
    let mut cfg = dino_train::bench::case_config(name, k.parse().unwrap()).unwrap();
    cfg.matmul_precision = precision;
    let dev = dino_models::dispatch::test_device();
    let crops = dino_train::bench::pattern_crops(&cfg, &dev).unwrap();
    let mut trainer = dino_train::Trainer::new(&cfg, 1000, &dev).unwrap();
    let (warmup, iters) = (3, 20);
    let mut times = Vec::new();
    for it in 0..warmup + iters {
        let t = std::time::Instant::now();
        let s = trainer.step(&crops, 1, it).unwrap();
        dev.synchronize().unwrap();
        assert!(s.loss.is_finite());
        if it >= warmup {
            times.push(t.elapsed().as_secs_f64());
        }
    }
    times.sort_by(|a, b| a.total_cmp(b));
    let med = times[times.len() / 2];
    println!(
        "{}",
        serde_json::json!({
            "case": case,
            "impl": "dino-rs",
            "precision": precision.to_string(),
            "device": dino_train::device::describe(&dev),
            "batch": cfg.batch_size,
            "iterations": iters,
            "seconds_per_step_median": med,
            "seconds_per_step_min": times[0],
            "images_per_s": cfg.batch_size as f64 / med,
        })
    );
}
