//! Forward-only throughput of the ViT configurations of `shared/spec/baseline.md` and fwd+bwd micro
//! benchmarks of the fused ops (LayerNorm, softmax, GELU, attention, one transformer block) against candle's
//! composed ops, and of a linear layer with f32 and bf16 products. Run: `cargo bench -p dino-models --bench forward` (append a filter, e.g. `-- vit_forward`).

use candle_core::{DType, Device, Result, Tensor, Var, D};
use candle_nn::VarMap;
use std::time::Duration;

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use dino_models::init::seeded_var_builder;
use dino_models::ops;
use dino_models::vit::{ViTConfig, VisionTransformer};
use dino_models::{with_matmul_precision, MatmulPrecision};

/// Large tensor buffers cache-line aligned, on huge pages (see `TensorAlloc`).
#[global_allocator]
static GLOBAL: dino_models::runtime::TensorAlloc = dino_models::runtime::TensorAlloc;

fn vit(cfg: ViTConfig) -> VisionTransformer {
    let vm = VarMap::new();
    VisionTransformer::new(cfg, seeded_var_builder(&vm, 0, DType::F32, &Device::Cpu)).expect("vit")
}

/// A benchmark case: one "image" is a set of crops; `crops` lists (count, size) per image.
struct Case {
    name: &'static str,
    cfg: ViTConfig,
    batch: usize,
    crops: &'static [(usize, usize)],
}

fn cases(drop_path: f64) -> Vec<Case> {
    let tiny = ViTConfig::vit_tiny(16).with_drop_path(drop_path);
    let cifar = ViTConfig::custom(32, 4, 192, 12, 3).with_drop_path(drop_path);
    vec![
        Case {
            name: "vit_tiny16_224_b8",
            cfg: tiny.clone(),
            batch: 8,
            crops: &[(1, 224)],
        },
        Case {
            name: "cifar_p4_32_b64",
            cfg: cifar.clone(),
            batch: 64,
            crops: &[(1, 32)],
        },
        // The multi-crop work of baseline.md per image: 2 x 224 + 6 x 96 (imagenet), 2 x 32 + 6 x 16 (cifar),
        // one backbone call per resolution as the multi-crop wrapper does (backbone only, no head).
        Case {
            name: "imagenet_multicrop_b8",
            cfg: tiny,
            batch: 8,
            crops: &[(2, 224), (6, 96)],
        },
        Case {
            name: "cifar_multicrop_b64",
            cfg: cifar,
            batch: 64,
            crops: &[(2, 32), (6, 16)],
        },
    ]
}

fn inputs(case: &Case) -> Vec<Tensor> {
    case.crops
        .iter()
        .map(|&(n, s)| {
            Tensor::randn(0f32, 1f32, (n * case.batch, 3, s, s), &Device::Cpu).expect("x")
        })
        .collect()
}

fn vit_forward(c: &mut Criterion) {
    let mut g = c.benchmark_group("vit_forward");
    g.sample_size(10)
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(5));
    for case in cases(0.0) {
        let model = vit(case.cfg.clone());
        let xs = inputs(&case);
        g.throughput(Throughput::Elements(case.batch as u64));
        g.bench_function(case.name, |b| {
            b.iter(|| {
                for x in &xs {
                    std::hint::black_box(model.forward(x).expect("forward"));
                }
            })
        });
    }
    g.finish();
}

fn vit_train_step(c: &mut Criterion) {
    let mut g = c.benchmark_group("vit_fwd_bwd");
    g.sample_size(10)
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(5));
    for case in cases(0.1) {
        let model = vit(case.cfg.clone());
        let xs = inputs(&case);
        g.throughput(Throughput::Elements(case.batch as u64));
        g.bench_function(case.name, |b| {
            b.iter(|| {
                let ys: Vec<Tensor> = xs
                    .iter()
                    .map(|x| model.forward_t(x, true).expect("forward"))
                    .collect();
                let y = Tensor::cat(&ys, 0).expect("cat");
                y.sqr()
                    .and_then(|t| t.sum_all())
                    .and_then(|l| l.backward())
                    .expect("backward")
            })
        });
    }
    g.finish();
}

/// `sum(f(x) * r)` forward + backward.
fn fwd_bwd(f: &dyn Fn(&Tensor) -> Result<Tensor>, x: &Var, r: &Tensor) {
    let y = f(x.as_tensor()).expect("fwd");
    let g = (y * r)
        .and_then(|t| t.sum_all())
        .and_then(|l| l.backward())
        .expect("bwd");
    std::hint::black_box(g);
}

fn ops_fwd_bwd(c: &mut Criterion) {
    let dev = Device::Cpu;
    let mut g = c.benchmark_group("ops_fwd_bwd");
    g.sample_size(20)
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(3));

    // LayerNorm on the tokens of vit_tiny/16, batch 8: (8*197, 192).
    let x = Var::from_tensor(&Tensor::randn(0f32, 1f32, (8 * 197, 192), &dev).unwrap()).unwrap();
    let w = Var::from_tensor(&Tensor::ones(192, DType::F32, &dev).unwrap()).unwrap();
    let bias = Var::from_tensor(&Tensor::zeros(192, DType::F32, &dev).unwrap()).unwrap();
    let r = Tensor::randn(0f32, 1f32, (8 * 197, 192), &dev).unwrap();
    let fast = |x: &Tensor| ops::layer_norm(x, w.as_tensor(), bias.as_tensor(), 1e-6);
    let slow =
        |x: &Tensor| candle_nn::ops::layer_norm_slow(x, w.as_tensor(), bias.as_tensor(), 1e-6);
    g.bench_function(BenchmarkId::new("layer_norm", "ours"), |b| {
        b.iter(|| fwd_bwd(&fast, &x, &r))
    });
    g.bench_function(BenchmarkId::new("layer_norm", "candle_composed"), |b| {
        b.iter(|| fwd_bwd(&slow, &x, &r))
    });

    // Softmax on the attention logits of vit_tiny/16, batch 8: (8*3, 197, 197).
    let x = Var::from_tensor(&Tensor::randn(0f32, 1f32, (24, 197, 197), &dev).unwrap()).unwrap();
    let r = Tensor::randn(0f32, 1f32, (24, 197, 197), &dev).unwrap();
    let fast = |x: &Tensor| ops::softmax_last_dim(x);
    let slow = |x: &Tensor| candle_nn::ops::softmax(x, D::Minus1);
    g.bench_function(BenchmarkId::new("softmax", "ours"), |b| {
        b.iter(|| fwd_bwd(&fast, &x, &r))
    });
    g.bench_function(BenchmarkId::new("softmax", "candle_composed"), |b| {
        b.iter(|| fwd_bwd(&slow, &x, &r))
    });

    // GELU on the MLP hidden activations of vit_tiny/16, batch 8: (8*197, 768).
    let x = Var::from_tensor(&Tensor::randn(0f32, 1f32, (8 * 197, 768), &dev).unwrap()).unwrap();
    let r = Tensor::randn(0f32, 1f32, (8 * 197, 768), &dev).unwrap();
    let fast = |x: &Tensor| ops::gelu_erf(x);
    let slow = |x: &Tensor| x.gelu_erf();
    g.bench_function(BenchmarkId::new("gelu_erf", "ours"), |b| {
        b.iter(|| fwd_bwd(&fast, &x, &r))
    });
    g.bench_function(BenchmarkId::new("gelu_erf", "candle_composed"), |b| {
        b.iter(|| fwd_bwd(&slow, &x, &r))
    });

    // Multi-head attention of vit_tiny/16 on packed qkv, batch 8: (8*197, 3*192) -> (8*197, 192).
    let (bsz, t, heads, hd) = (8usize, 197usize, 3usize, 64usize);
    let d = heads * hd;
    let x = Var::from_tensor(&Tensor::randn(0f32, 1f32, (bsz * t, 3 * d), &dev).unwrap()).unwrap();
    let r = Tensor::randn(0f32, 1f32, (bsz * t, d), &dev).unwrap();
    let scale = (hd as f64).powf(-0.5);
    let fast = |x: &Tensor| dino_models::attention::attention(x, bsz, t, heads, scale);
    let slow = |x: &Tensor| -> Result<Tensor> {
        let split = |i: usize| -> Result<Tensor> {
            x.narrow(1, i * d, d)?
                .reshape((bsz, t, heads, hd))?
                .permute((0, 2, 1, 3))?
                .contiguous()
        };
        let (q, k, v) = (split(0)?, split(1)?, split(2)?);
        let p = candle_nn::ops::softmax(&(q.matmul(&k.t()?)? * scale)?, D::Minus1)?;
        p.matmul(&v)?
            .permute((0, 2, 1, 3))?
            .contiguous()?
            .reshape((bsz * t, d))
    };
    g.bench_function(BenchmarkId::new("attention", "ours"), |b| {
        b.iter(|| fwd_bwd(&fast, &x, &r))
    });
    g.bench_function(BenchmarkId::new("attention", "candle_composed"), |b| {
        b.iter(|| fwd_bwd(&slow, &x, &r))
    });
    // The cifar configuration's attention (patch 4): 64 x 6 local crops of 17 tokens, 64 x 2 global of 65.
    for (bsz, t) in [(384usize, 17usize), (128, 65)] {
        let x =
            Var::from_tensor(&Tensor::randn(0f32, 1f32, (bsz * t, 3 * d), &dev).unwrap()).unwrap();
        let r = Tensor::randn(0f32, 1f32, (bsz * t, d), &dev).unwrap();
        let fast = |x: &Tensor| dino_models::attention::attention(x, bsz, t, heads, scale);
        g.bench_function(
            BenchmarkId::new("attention", format!("ours_b{bsz}_t{t}")),
            |b| b.iter(|| fwd_bwd(&fast, &x, &r)),
        );
    }
    g.finish();
}

/// The parameters of one vit_tiny block.
struct BlockParams {
    vars: Vec<Var>,
}

impl BlockParams {
    fn new() -> Self {
        let dev = Device::Cpu;
        let d = 192;
        let shapes: [&[usize]; 12] = [
            &[d],
            &[d],
            &[3 * d, d],
            &[3 * d],
            &[d, d],
            &[d],
            &[d],
            &[d],
            &[4 * d, d],
            &[4 * d],
            &[d, 4 * d],
            &[d],
        ];
        let vars = shapes
            .iter()
            .map(|s| {
                Var::from_tensor(&(Tensor::randn(0f32, 1f32, *s, &dev).unwrap() * 0.05).unwrap())
                    .unwrap()
            })
            .collect();
        Self { vars }
    }

    fn t(&self, i: usize) -> &Tensor {
        self.vars[i].as_tensor()
    }

    /// One pre-norm block on `(B*T, D)` tokens, with either our fused ops or candle's composed ones.
    fn forward(&self, x: &Tensor, b: usize, t: usize, fused: bool) -> Result<Tensor> {
        let (d, h) = (192, 3);
        let hd = d / h;
        let ln = |x: &Tensor, w: &Tensor, bb: &Tensor| {
            if fused {
                ops::layer_norm(x, w, bb, 1e-6)
            } else {
                candle_nn::ops::layer_norm_slow(x, w, bb, 1e-6)
            }
        };
        let lin = |x: &Tensor, w: &Tensor, bb: &Tensor| {
            if fused {
                ops::linear(x, w, Some(bb))
            } else {
                x.matmul(&w.t()?)?.broadcast_add(bb)
            }
        };
        let qkv = lin(&ln(x, self.t(0), self.t(1))?, self.t(2), self.t(3))?
            .reshape((b, t, 3, h, hd))?
            .permute((2, 0, 3, 1, 4))?
            .contiguous()?;
        let q = qkv.get(0)?.reshape((b * h, t, hd))?;
        let k = qkv.get(1)?.reshape((b * h, t, hd))?;
        let v = qkv.get(2)?.reshape((b * h, t, hd))?;
        let logits = q.matmul(&k.t()?)?;
        let scale = (hd as f64).powf(-0.5);
        let p = if fused {
            ops::softmax_last_dim_scaled(&logits, scale)?
        } else {
            candle_nn::ops::softmax(&(logits * scale)?, D::Minus1)?
        };
        let o = p
            .matmul(&v)?
            .reshape((b, h, t, hd))?
            .permute((0, 2, 1, 3))?
            .contiguous()?
            .reshape((b * t, d))?;
        let x = (x + lin(&o, self.t(4), self.t(5))?)?;
        let hdn = lin(&ln(&x, self.t(6), self.t(7))?, self.t(8), self.t(9))?;
        let act = if fused {
            ops::gelu_erf(&hdn)?
        } else {
            hdn.gelu_erf()?
        };
        x + lin(&act, self.t(10), self.t(11))?
    }
}

fn block_fwd_bwd(c: &mut Criterion) {
    let dev = Device::Cpu;
    let mut g = c.benchmark_group("block_fwd_bwd");
    g.sample_size(10)
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(3));
    let p = BlockParams::new();
    for (name, b, t) in [("tiny_224_b8", 8, 197), ("cifar_32_b64", 64, 65)] {
        let x = Var::from_tensor(&Tensor::randn(0f32, 1f32, (b * t, 192), &dev).unwrap()).unwrap();
        let r = Tensor::randn(0f32, 1f32, (b * t, 192), &dev).unwrap();
        for (label, fused) in [("ours", true), ("candle_composed", false)] {
            let f = |x: &Tensor| p.forward(x, b, t, fused);
            g.bench_function(BenchmarkId::new(name, label), |bch| {
                bch.iter(|| fwd_bwd(&f, &x, &r))
            });
            let id = format!("{name}_fwd_only");
            g.bench_function(BenchmarkId::new(id, label), |bch| {
                bch.iter(|| p.forward(x.as_tensor(), b, t, fused).expect("fwd"))
            });
        }
    }
    g.finish();
}

/// A linear layer `(8*197, 192) -> 768` (vit_tiny's fc1 at batch 8) forward + backward (dx, dW, db), with f32
/// and bf16 products (`MatmulPrecision`): 3 GEMMs of 2 * 1576 * 192 * 768 FLOPs each.
fn linear_precision(c: &mut Criterion) {
    // The step's allocator settings: without them every fresh multi-MB buffer is mmapped and page-faulted,
    // which costs more than the GEMMs here.
    dino_models::runtime::tune_allocator();
    dino_models::runtime::main_thread_in_pool();
    let dev = Device::Cpu;
    let mut g = c.benchmark_group("linear_fwd_bwd");
    g.sample_size(20)
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(3));
    let (rows, inp, out) = (8 * 197, 192, 768);
    g.throughput(Throughput::Elements((3 * 2 * rows * inp * out) as u64));
    let x = Var::from_tensor(&Tensor::randn(0f32, 1f32, (rows, inp), &dev).unwrap()).unwrap();
    let w = Var::from_tensor(&Tensor::randn(0f32, 0.05f32, (out, inp), &dev).unwrap()).unwrap();
    let bias = Var::from_tensor(&Tensor::zeros(out, DType::F32, &dev).unwrap()).unwrap();
    let r = Tensor::randn(0f32, 1f32, (rows, out), &dev).unwrap();
    let f = |x: &Tensor| dino_models::fused::linear(x, w.as_tensor(), Some(bias.as_tensor()));
    for p in [MatmulPrecision::Highest, MatmulPrecision::Bf16] {
        g.bench_function(BenchmarkId::new("fc1_1576x192x768", p.to_string()), |b| {
            b.iter(|| with_matmul_precision(p, || fwd_bwd(&f, &x, &r)))
        });
    }
    g.finish();
}

criterion_group!(
    benches,
    vit_forward,
    vit_train_step,
    ops_fwd_bwd,
    block_fwd_bwd,
    linear_precision
);
criterion_main!(benches);
