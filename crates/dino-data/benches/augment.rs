//! Multi-crop augmentation throughput: the official recipe (2 x 224 + 6 x 96 here, as in
//! `shared/spec/baseline.md`, which measured torchvision at ~85 images/s per core) on the real photos of
//! `shared/data/photos` resized to 256 x 256. One image per iteration on 1 thread, and a batch of 64 images on
//! a 2-thread rayon pool. Also the hot pixel ops on their own.

use criterion::{criterion_group, criterion_main, BatchSize, Criterion, Throughput};
use dino_data::augment::{sample_rng, DataAugmentationDINO, DinoAugConfig};
use dino_data::pil;
use dino_data::Transform;
use image::RgbImage;
use rayon::prelude::*;

const PHOTOS: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../../../shared/data/photos/");

fn photos() -> Vec<RgbImage> {
    let mut files: Vec<_> = std::fs::read_dir(PHOTOS)
        .expect("shared/data/photos")
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| matches!(p.extension().and_then(|e| e.to_str()), Some("png" | "jpg")))
        .collect();
    files.sort();
    files
        .iter()
        .map(|p| {
            let img = image::open(p).expect("decodable photo").to_rgb8();
            pil::resize(&img, 256, 256).expect("resize")
        })
        .collect()
}

/// CPU time of the calling thread in ns (`/proc/thread-self/schedstat`), robust to a busy shared machine.
fn thread_cpu_ns() -> Option<u64> {
    let s = std::fs::read_to_string("/proc/thread-self/schedstat").ok()?;
    s.split_whitespace().next()?.parse().ok()
}

fn bench_multicrop(c: &mut Criterion) {
    let imgs = photos();
    let aug = DataAugmentationDINO::new(DinoAugConfig {
        local_crops_number: 6,
        ..DinoAugConfig::default()
    })
    .unwrap();
    // Images per CPU-second on one thread (wall-clock figures below suffer when other jobs share the cores).
    let n = 300u64;
    let (t0, w0) = (thread_cpu_ns(), std::time::Instant::now());
    for i in 0..n {
        std::hint::black_box(aug.views(&imgs[i as usize % imgs.len()], &mut sample_rng(0, 2, i)));
    }
    let wall = w0.elapsed().as_secs_f64();
    if let (Some(t0), Some(t1)) = (t0, thread_cpu_ns()) {
        let cpu = (t1 - t0) as f64 * 1e-9;
        println!(
            "multicrop 2x224+6x96, 1 thread: {n} images in {cpu:.3} CPU-s = {:.1} images per CPU-second \
             ({:.1} images/s wall)",
            n as f64 / cpu,
            n as f64 / wall
        );
    }
    let mut g = c.benchmark_group("multicrop_2x224_6x96");
    g.sample_size(30);
    g.throughput(Throughput::Elements(1));
    let mut i = 0u64;
    g.bench_function("1_thread_per_image", |b| {
        b.iter(|| {
            i += 1;
            let img = &imgs[(i as usize) % imgs.len()];
            aug.views(img, &mut sample_rng(0, 0, i))
        })
    });
    let batch = 64u64;
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(2)
        .build()
        .unwrap();
    g.throughput(Throughput::Elements(batch));
    g.bench_function("2_threads_batch_64", |b| {
        b.iter(|| {
            pool.install(|| {
                (0..batch)
                    .into_par_iter()
                    .map(|i| aug.views(&imgs[i as usize % imgs.len()], &mut sample_rng(0, 1, i)))
                    .collect::<Vec<_>>()
            })
        })
    });
    g.finish();
}

fn bench_ops(c: &mut Criterion) {
    let img = photos().swap_remove(0);
    let mut g = c.benchmark_group("pil_ops");
    g.sample_size(30);
    g.bench_function("resized_crop_200x180_to_224", |b| {
        b.iter(|| pil::resized_crop(&img, 10, 20, 180, 200, 224, 224).unwrap())
    });
    g.bench_function("resized_crop_100x90_to_96", |b| {
        b.iter(|| pil::resized_crop(&img, 10, 20, 90, 100, 96, 96).unwrap())
    });
    let crop = pil::resized_crop(&img, 10, 20, 180, 200, 224, 224)
        .unwrap()
        .into_raw();
    let mut run = |name: &str, f: &dyn Fn(&mut [u8])| {
        g.bench_function(name, |b| {
            b.iter_batched_ref(|| crop.clone(), |d| f(d), BatchSize::SmallInput)
        });
    };
    run("blur_224_sigma1.5", &|d| {
        pil::gaussian_blur(d, 224, 224, 1.5)
    });
    run("hue_224", &|d| pil::adjust_hue(d, 0.05));
    run("contrast_224", &|d| pil::adjust_contrast(d, 1.2));
    run("saturation_224", &|d| pil::adjust_saturation(d, 1.1));
    run("brightness_224", &|d| pil::adjust_brightness(d, 0.9));
    let norm = pil::Normalize::imagenet();
    g.bench_function("normalize_224", |b| b.iter(|| norm.apply(&crop)));
    g.finish();
}

criterion_group!(benches, bench_multicrop, bench_ops);
criterion_main!(benches);
