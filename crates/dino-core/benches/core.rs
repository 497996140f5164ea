//! Micro-benchmarks of the per-step costs dino-core adds to training:
//! the loss forward + backward at K = 65536, n = 10, B = 64, and the EMA and AdamW steps on the
//! 21.7M parameters of a ViT-S/16 backbone (the "22M" of the targets: EMA <= 15 ms, AdamW <= 60 ms).
//! Run: `cargo bench -p dino-core --bench core` (medians are what to report).

use std::time::Duration;

use candle_core::backprop::GradStore;
use candle_core::{Device, Tensor, Var};
use criterion::{criterion_group, criterion_main, Criterion};
use dino_core::{AdamW, DinoLoss, DinoLossConfig, EmaTeacher, NamedVar, ParamGroup};

/// The parameter shapes of ViT-S/16 (21.67M parameters).
fn vit_small_shapes() -> Vec<(String, Vec<usize>)> {
    let d = 384;
    let mut s = vec![
        ("cls_token".to_string(), vec![1, 1, d]),
        ("pos_embed".to_string(), vec![1, 197, d]),
        ("patch_embed.proj.weight".to_string(), vec![d, 3, 16, 16]),
        ("patch_embed.proj.bias".to_string(), vec![d]),
        ("norm.weight".to_string(), vec![d]),
        ("norm.bias".to_string(), vec![d]),
    ];
    for i in 0..12 {
        for (n, shape) in [
            ("norm1.weight", vec![d]),
            ("norm1.bias", vec![d]),
            ("attn.qkv.weight", vec![3 * d, d]),
            ("attn.qkv.bias", vec![3 * d]),
            ("attn.proj.weight", vec![d, d]),
            ("attn.proj.bias", vec![d]),
            ("norm2.weight", vec![d]),
            ("norm2.bias", vec![d]),
            ("mlp.fc1.weight", vec![4 * d, d]),
            ("mlp.fc1.bias", vec![4 * d]),
            ("mlp.fc2.weight", vec![d, 4 * d]),
            ("mlp.fc2.bias", vec![d]),
        ] {
            s.push((format!("blocks.{i}.{n}"), shape));
        }
    }
    s
}

fn make_params(dev: &Device) -> Vec<NamedVar> {
    vit_small_shapes()
        .into_iter()
        .map(|(n, shape)| {
            (
                n,
                Var::from_tensor(&Tensor::randn(0f32, 0.02, shape, dev).unwrap()).unwrap(),
            )
        })
        .collect()
}

fn bench_loss(c: &mut Criterion) {
    let dev = Device::Cpu;
    let (n, b, k) = (10usize, 64usize, 65536usize);
    let student = Var::from_tensor(&Tensor::randn(0f32, 0.3, (n * b, k), &dev).unwrap()).unwrap();
    let teacher = Tensor::randn(0f32, 0.3, (2 * b, k), &dev).unwrap();
    let mut loss = DinoLoss::new(DinoLossConfig::new(k, n, 0.04, 0.07, 30, 100), &dev).unwrap();
    let mut g = c.benchmark_group("dino_loss");
    g.sample_size(10)
        .measurement_time(Duration::from_secs(8))
        .warm_up_time(Duration::from_secs(1));
    g.bench_function("fwd_bwd_K65536_n10_B64", |bench| {
        bench.iter(|| {
            let l = loss.forward(student.as_tensor(), &teacher, 0).unwrap();
            let grads = l.backward().unwrap();
            assert!(grads.get(student.as_tensor()).is_some());
        })
    });
    g.bench_function("fwd_K65536_n10_B64", |bench| {
        bench.iter(|| loss.forward(student.as_tensor(), &teacher, 0).unwrap())
    });
    // the same loss composed from candle ops (log_softmax/softmax autograd), at B = 8 to stay short
    let b8 = 8usize;
    let s8 = Var::from_tensor(&Tensor::randn(0f32, 0.3, (n * b8, k), &dev).unwrap()).unwrap();
    let t8 = Tensor::randn(0f32, 0.3, (2 * b8, k), &dev).unwrap();
    let c8 = Tensor::zeros((1, k), candle_core::DType::F32, &dev).unwrap();
    let mut loss8 = DinoLoss::new(DinoLossConfig::new(k, n, 0.04, 0.07, 30, 100), &dev).unwrap();
    g.bench_function("fused_fwd_bwd_K65536_n10_B8", |bench| {
        bench.iter(|| {
            loss8
                .forward(s8.as_tensor(), &t8, 0)
                .unwrap()
                .backward()
                .unwrap()
        })
    });
    g.bench_function("composed_fwd_bwd_K65536_n10_B8", |bench| {
        bench.iter(|| {
            dino_core::loss::dino_loss_composed(s8.as_tensor(), &t8, &c8, n, 0.1, 0.04)
                .unwrap()
                .backward()
                .unwrap()
        })
    });
    g.finish();
}

fn bench_ema(c: &mut Criterion) {
    let dev = Device::Cpu;
    let student = make_params(&dev);
    let teacher = make_params(&dev);
    let n: usize = student.iter().map(|p| p.1.elem_count()).sum();
    let ema = EmaTeacher::new(&student, &teacher).unwrap();
    let mut g = c.benchmark_group("ema");
    g.sample_size(20)
        .measurement_time(Duration::from_secs(4))
        .warm_up_time(Duration::from_secs(1));
    g.bench_function(format!("update_{:.1}M_params", n as f64 / 1e6), |bench| {
        bench.iter(|| ema.update(0.996).unwrap())
    });
    g.finish();
}

fn bench_adamw(c: &mut Criterion) {
    let dev = Device::Cpu;
    let params = make_params(&dev);
    let n: usize = params.iter().map(|p| p.1.elem_count()).sum();
    // a GradStore with a gradient for every parameter
    let mut total: Option<Tensor> = None;
    for (_, v) in &params {
        let s = v.as_tensor().sum_all().unwrap();
        total = Some(match total {
            Some(t) => (t + s).unwrap(),
            None => s,
        });
    }
    let mut grads: GradStore = total.unwrap().backward().unwrap();
    for (_, v) in &params {
        grads.insert(
            v.as_tensor(),
            Tensor::randn(0f32, 1e-3, v.shape(), &dev).unwrap(),
        );
    }
    let (reg, noreg) = dino_core::get_params_groups(&params);
    let mut opt = AdamW::new(vec![ParamGroup::new(reg), ParamGroup::new(noreg)]).unwrap();
    opt.set_lr(0, 1e-3).unwrap();
    opt.set_lr(1, 1e-3).unwrap();
    opt.set_weight_decay(0, 0.04).unwrap();
    let mut g = c.benchmark_group("adamw");
    g.sample_size(20)
        .measurement_time(Duration::from_secs(5))
        .warm_up_time(Duration::from_secs(1));
    g.bench_function(format!("step_{:.1}M_params", n as f64 / 1e6), |bench| {
        bench.iter(|| opt.step(&grads).unwrap())
    });
    g.finish();
}

criterion_group!(benches, bench_loss, bench_ema, bench_adamw);
criterion_main!(benches);
