//! ResNet-18 (CIFAR stem) throughput at 32 px, batch 64: train-mode forward and forward + backward,
//! plus one layer1-sized 3x3 convolution with our GEMM backward against candle's stock conv2d.
//! Criterion's "thrpt" column is images per second.

use candle_core::{DType, Device, Tensor, Var};
use candle_nn::{VarBuilder, VarMap};
use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use dino_models::resnet::{conv2d, ResNet, ResNetConfig};
use dino_models::Backbone;

const BATCH: usize = 64;

fn resnet18_cifar(c: &mut Criterion) {
    let varmap = VarMap::new();
    let model = ResNet::new(
        ResNetConfig::resnet18_cifar(),
        VarBuilder::from_varmap(&varmap, DType::F32, &Device::Cpu),
    )
    .unwrap();
    let x = Tensor::randn(0f32, 1., (BATCH, 3, 32, 32), &Device::Cpu).unwrap();
    let mut g = c.benchmark_group("resnet18_cifar_32px_b64");
    g.sample_size(10);
    g.throughput(Throughput::Elements(BATCH as u64));
    g.bench_function("forward_eval", |b| {
        b.iter(|| model.forward_features(&x, false).unwrap())
    });
    g.bench_function("forward_train", |b| {
        b.iter(|| model.forward_features(&x, true).unwrap())
    });
    g.bench_function("forward_backward", |b| {
        b.iter(|| {
            model
                .forward_features(&x, true)
                .unwrap()
                .sqr()
                .unwrap()
                .sum_all()
                .unwrap()
                .backward()
                .unwrap()
        })
    });
    g.finish();
}

fn conv_layer1(c: &mut Criterion) {
    let x = Var::from_tensor(&Tensor::randn(0f32, 1., (BATCH, 64, 32, 32), &Device::Cpu).unwrap())
        .unwrap();
    let w = Var::from_tensor(&Tensor::randn(0f32, 0.05, (64, 64, 3, 3), &Device::Cpu).unwrap())
        .unwrap();
    let mut g = c.benchmark_group("conv3x3_64to64_32px_b64");
    g.sample_size(10);
    g.throughput(Throughput::Elements(BATCH as u64));
    g.bench_function("ours_forward", |b| {
        b.iter(|| conv2d(&x.as_tensor().detach(), w.as_tensor(), 1, 1).unwrap())
    });
    g.bench_function("candle_forward", |b| {
        b.iter(|| {
            x.as_tensor()
                .detach()
                .conv2d(w.as_tensor(), 1, 1, 1, 1)
                .unwrap()
        })
    });
    g.bench_function("ours_forward_backward", |b| {
        b.iter(|| {
            conv2d(x.as_tensor(), w.as_tensor(), 1, 1)
                .unwrap()
                .sum_all()
                .unwrap()
                .backward()
                .unwrap()
        })
    });
    g.bench_function("candle_forward_backward", |b| {
        b.iter(|| {
            x.as_tensor()
                .conv2d(w.as_tensor(), 1, 1, 1, 1)
                .unwrap()
                .sum_all()
                .unwrap()
                .backward()
                .unwrap()
        })
    });
    g.finish();
}

criterion_group!(benches, conv_layer1, resnet18_cifar);
criterion_main!(benches);
