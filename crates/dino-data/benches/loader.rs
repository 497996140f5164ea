//! Multi-crop loader throughput: images/s of the official DINO augmentation (2 x 224 + 6 x 96 crops) through
//! `MultiCropLoader` on 1 and 2 worker threads, from the real photos of `../shared/data/photos` resized to
//! 256 x 256 (as the torchvision baseline, ~85 images/s per core, `../shared/spec/baseline.md`), held in memory
//! and, for the second group, decoded from JPEG files on every epoch.
//!
//! After the criterion groups, `report_cpu_time` prints images per CPU-second of this process (user + system time
//! of all threads), the per-core figure to compare with torchvision's on a machine shared with other work.
//!
//! Run: `cargo bench -p dino-data --bench loader` (add `-- report_only` to skip the criterion groups and print the
//! CPU-time report alone). Elements = images.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use dino_data::augment::{DataAugmentationDINO, DinoAugConfig};
use dino_data::dataset::{Dataset, InMemoryDataset};
use dino_data::folder::ImageFolder;
use dino_data::loader::{LoaderConfig, MultiCropLoader};
use dino_data::Transform;
use image::RgbImage;

const COPIES: usize = 4;
const BATCH: usize = 20;

fn photos_256() -> Vec<RgbImage> {
    let dir = PathBuf::from(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../../../shared/data/photos"
    ));
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .expect("../shared/data/photos")
        .map(|e| e.unwrap().path())
        .filter(|p| matches!(p.extension().and_then(|e| e.to_str()), Some("jpg" | "png")))
        .collect();
    files.sort();
    files
        .iter()
        .map(|p| {
            let img = image::open(p).unwrap().to_rgb8();
            image::imageops::resize(&img, 256, 256, image::imageops::FilterType::CatmullRom)
        })
        .collect()
}

/// The photos written as JPEG (quality 90), `COPIES` times, into a tempdir opened as an image folder.
fn jpeg_folder(photos: &[RgbImage]) -> (tempfile::TempDir, Arc<dyn Dataset>) {
    let tmp = tempfile::tempdir().unwrap();
    for (k, p) in photos.iter().enumerate() {
        for copy in 0..COPIES {
            let path = tmp.path().join(format!("img_{copy}_{k:02}.jpg"));
            let f = std::fs::File::create(&path).unwrap();
            let mut enc =
                image::codecs::jpeg::JpegEncoder::new_with_quality(std::io::BufWriter::new(f), 90);
            enc.encode_image(p).unwrap();
        }
    }
    let folder: Arc<dyn Dataset> = Arc::new(ImageFolder::open(tmp.path()).unwrap());
    (tmp, folder)
}

fn augmentation() -> Arc<dyn Transform> {
    let cfg = DinoAugConfig {
        local_crops_number: 6,
        ..DinoAugConfig::default()
    };
    Arc::new(DataAugmentationDINO::new(cfg).unwrap())
}

fn run_epoch(loader: &MultiCropLoader, epoch: u64) -> usize {
    let mut n = 0;
    for b in loader.epoch(epoch) {
        let b = b.unwrap();
        assert_eq!(b.crops.len(), 8);
        n += b.indices.len();
    }
    n
}

fn bench_loader(c: &mut Criterion) {
    let photos = photos_256();
    let images: Vec<RgbImage> = (0..COPIES).flat_map(|_| photos.iter().cloned()).collect();
    let n = images.len();
    let ds: Arc<dyn Dataset> = Arc::new(InMemoryDataset::new("photos-256", images, None).unwrap());
    let aug = augmentation();

    // The transform alone on the calling thread: the per-core figure.
    let mut g = c.benchmark_group("dino_augment_2x224_6x96");
    g.throughput(Throughput::Elements(1));
    let img = photos[0].clone();
    let mut i = 0u64;
    g.bench_function("transform_only_1_thread", |b| {
        b.iter(|| {
            let mut rng = dino_data::augment::sample_rng(0, 0, i);
            i += 1;
            aug.views(&img, &mut rng)
        })
    });
    g.finish();

    let mut g = c.benchmark_group("multicrop_loader_in_memory_256px");
    g.throughput(Throughput::Elements((n / BATCH * BATCH) as u64));
    for workers in [1usize, 2] {
        let loader = MultiCropLoader::new(
            Arc::clone(&ds),
            Arc::clone(&aug),
            LoaderConfig {
                batch_size: BATCH,
                num_workers: workers,
                prefetch: 2,
                seed: 0,
                shuffle: true,
                drop_last: true,
                ..Default::default()
            },
        )
        .unwrap();
        let mut epoch = 0u64;
        g.bench_with_input(BenchmarkId::new("workers", workers), &workers, |b, _| {
            b.iter(|| {
                epoch += 1;
                run_epoch(&loader, epoch)
            })
        });
    }
    g.finish();

    // From JPEG files (quality 90) decoded on every epoch.
    let (_tmp, folder) = jpeg_folder(&photos);
    let mut g = c.benchmark_group("multicrop_loader_jpeg_folder_256px");
    g.throughput(Throughput::Elements((folder.len() / BATCH * BATCH) as u64));
    for workers in [1usize, 2] {
        let loader = MultiCropLoader::new(
            Arc::clone(&folder),
            Arc::clone(&aug),
            LoaderConfig {
                batch_size: BATCH,
                num_workers: workers,
                prefetch: 2,
                seed: 0,
                shuffle: true,
                drop_last: true,
                ..Default::default()
            },
        )
        .unwrap();
        let mut epoch = 0u64;
        g.bench_with_input(BenchmarkId::new("workers", workers), &workers, |b, _| {
            b.iter(|| {
                epoch += 1;
                run_epoch(&loader, epoch)
            })
        });
    }
    g.finish();
}

/// User + system CPU seconds of this process (all threads) from `/proc/self/stat`, assuming 100 ticks/s.
fn cpu_seconds() -> Option<f64> {
    let stat = std::fs::read_to_string("/proc/self/stat").ok()?;
    let rest = &stat[stat.rfind(')')? + 2..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    // After the command name: field 3 is `state`, so utime (14) and stime (15) are at 11 and 12.
    let ticks: f64 = f.get(11)?.parse::<f64>().ok()? + f.get(12)?.parse::<f64>().ok()?;
    Some(ticks / 100.0)
}

/// Images per CPU-second (a per-core figure that holds on a busy machine) and per wall-second, printed.
fn report_cpu_time(_c: &mut Criterion) {
    let photos = photos_256();
    let images: Vec<RgbImage> = (0..COPIES).flat_map(|_| photos.iter().cloned()).collect();
    let ds: Arc<dyn Dataset> = Arc::new(InMemoryDataset::new("photos-256", images, None).unwrap());
    let (_tmp, folder) = jpeg_folder(&photos);
    let aug = augmentation();
    for ((name, ds), workers) in [("in-memory", &ds), ("jpeg-folder", &folder)]
        .into_iter()
        .flat_map(|d| [(d, 1usize), (d, 2)])
    {
        let loader = MultiCropLoader::new(
            Arc::clone(ds),
            Arc::clone(&aug),
            LoaderConfig {
                batch_size: BATCH,
                num_workers: workers,
                prefetch: 2,
                seed: 0,
                shuffle: true,
                drop_last: true,
                ..Default::default()
            },
        )
        .unwrap();
        run_epoch(&loader, 1000);
        let (t0, c0) = (std::time::Instant::now(), cpu_seconds());
        let n: usize = (0..4).map(|e| run_epoch(&loader, e)).sum();
        let wall = t0.elapsed().as_secs_f64();
        if let (Some(c0), Some(c1)) = (c0, cpu_seconds()) {
            eprintln!(
                "cpu-time report, {name} 256px, {workers} worker(s): {n} images, {wall:.2} s wall \
                 ({:.1} images/s), {:.2} CPU-s ({:.1} images per CPU-second)",
                n as f64 / wall,
                c1 - c0,
                n as f64 / (c1 - c0)
            );
        }
    }
}

criterion_group! {
    name = benches;
    config = Criterion::default()
        .sample_size(10)
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(8));
    targets = bench_loader, report_cpu_time
}
criterion_main!(benches);
