//! The multi-crop loader: determinism across thread counts and batchings, per-epoch shuffles, drop_last,
//! mid-epoch start, bounded prefetch, skipped unreadable images, and the evaluation batcher. The transform here
//! is a small deterministic one written for the test (random crops drawn from the sample RNG, nearest sampling),
//! so the tests do not depend on the augmentation module.

use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use dino_data::augment::{sample_rng, DataAugmentationDINO, DinoAugConfig};
use dino_data::cifar::{CifarDataset, CifarKind};
use dino_data::dataset::{Dataset, Subset};
use dino_data::folder::ImageFolder;
use dino_data::idx::IdxDataset;
use dino_data::loader::{
    epoch_permutation, EvalBatcher, LoaderConfig, MultiCropBatch, MultiCropLoader,
};
use dino_data::{Transform, View};
use image::RgbImage;
use rand::RngCore;
use rand_chacha::ChaCha8Rng;

fn data(rel: &str) -> PathBuf {
    PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/../../../shared/data")).join(rel)
}

const CIFAR_LABELS: [usize; 20] = [3, 8, 8, 0, 6, 6, 1, 6, 3, 1, 0, 9, 5, 7, 9, 8, 5, 7, 8, 6];

/// Square views of the given sizes: a random window (offset and flip drawn from the RNG), nearest sampling,
/// scaled to [0, 1] plus a random brightness offset. Counts its calls.
struct ToyCrops {
    sizes: Vec<usize>,
    calls: Arc<AtomicUsize>,
    panic_on_call: Option<usize>,
}

impl ToyCrops {
    fn new(sizes: &[usize]) -> Self {
        Self {
            sizes: sizes.to_vec(),
            calls: Arc::new(AtomicUsize::new(0)),
            panic_on_call: None,
        }
    }
}

impl Transform for ToyCrops {
    fn views(&self, img: &RgbImage, rng: &mut ChaCha8Rng) -> Vec<View> {
        let call = self.calls.fetch_add(1, Ordering::SeqCst);
        if self.panic_on_call == Some(call) {
            panic!("toy transform asked to panic");
        }
        let (w, h) = img.dimensions();
        self.sizes
            .iter()
            .map(|&s| {
                let x0 = rng.next_u32() % w;
                let y0 = rng.next_u32() % h;
                let flip = rng.next_u32() % 2 == 1;
                let offset = (rng.next_u32() % 1000) as f32 / 1000.0;
                let mut data = Vec::with_capacity(3 * s * s);
                for c in 0..3 {
                    for y in 0..s {
                        for x in 0..s {
                            let xx = if flip { s - 1 - x } else { x };
                            let p = img.get_pixel((x0 + xx as u32) % w, (y0 + y as u32) % h);
                            data.push(p.0[c] as f32 / 255.0 + offset);
                        }
                    }
                }
                View {
                    data,
                    channels: 3,
                    height: s,
                    width: s,
                }
            })
            .collect()
    }

    fn num_views(&self) -> usize {
        self.sizes.len()
    }
}

fn cifar20() -> Arc<dyn Dataset> {
    Arc::new(
        CifarDataset::open_files(CifarKind::Cifar10, &[data("cifar10-test20/test_batch.bin")])
            .unwrap(),
    )
}

fn fmnist(n: usize) -> Arc<dyn Dataset> {
    let ds: Arc<dyn Dataset> =
        Arc::new(IdxDataset::open_dir(&data("fashion-mnist"), Default::default()).unwrap());
    Arc::new(Subset::first(ds, n))
}

fn cfg(batch_size: usize, num_workers: usize) -> LoaderConfig {
    LoaderConfig {
        batch_size,
        num_workers,
        prefetch: 2,
        seed: 7,
        shuffle: true,
        drop_last: true,
        ..Default::default()
    }
}

fn loader(ds: Arc<dyn Dataset>, t: ToyCrops, c: LoaderConfig) -> MultiCropLoader {
    MultiCropLoader::new(ds, Arc::new(t), c).unwrap()
}

fn collect(l: &MultiCropLoader, epoch: u64) -> Vec<MultiCropBatch> {
    l.epoch(epoch).map(|b| b.unwrap()).collect()
}

/// The crop values of every row, keyed by dataset index: `index -> [crop0 row, crop1 row, ...]`.
fn rows_by_index(batches: &[MultiCropBatch]) -> std::collections::BTreeMap<usize, Vec<Vec<f32>>> {
    let mut m = std::collections::BTreeMap::new();
    for b in batches {
        for (r, &i) in b.indices.iter().enumerate() {
            let rows = b
                .crops
                .iter()
                .map(|t| {
                    t.get(r)
                        .unwrap()
                        .flatten_all()
                        .unwrap()
                        .to_vec1::<f32>()
                        .unwrap()
                })
                .collect();
            assert!(m.insert(i, rows).is_none(), "index {i} twice in an epoch");
        }
    }
    m
}

fn flat(b: &MultiCropBatch) -> Vec<Vec<f32>> {
    b.crops
        .iter()
        .map(|t| t.flatten_all().unwrap().to_vec1::<f32>().unwrap())
        .collect()
}

#[test]
fn batches_are_crop_major_with_labels() {
    let l = loader(cifar20(), ToyCrops::new(&[8, 8, 4, 4, 4]), cfg(6, 2));
    assert_eq!(l.niter_per_epoch(), 3); // floor(20 / 6)
    let batches = collect(&l, 0);
    assert_eq!(batches.len(), 3);
    for (it, b) in batches.iter().enumerate() {
        assert_eq!(b.iteration, it);
        assert_eq!(b.epoch, 0);
        assert_eq!(b.crops.len(), 5);
        assert_eq!(b.crops[0].dims(), &[6, 3, 8, 8]);
        assert_eq!(b.crops[4].dims(), &[6, 3, 4, 4]);
        let labels = b.labels.as_ref().unwrap();
        for (k, &i) in b.indices.iter().enumerate() {
            assert_eq!(labels[k], CIFAR_LABELS[i]);
        }
    }
    // drop_last: 18 distinct samples, the order is the epoch permutation.
    let order = l.order(0);
    let seen: Vec<usize> = batches.iter().flat_map(|b| b.indices.clone()).collect();
    assert_eq!(seen, order[..18]);
    let mut sorted = order.clone();
    sorted.sort();
    assert_eq!(sorted, (0..20).collect::<Vec<_>>());
}

#[test]
fn identical_batches_on_one_and_two_workers() {
    let ds = fmnist(96);
    let t1 = ToyCrops::new(&[12, 12, 6, 6]);
    let t2 = ToyCrops::new(&[12, 12, 6, 6]);
    let l1 = loader(Arc::clone(&ds), t1, cfg(16, 1));
    let l2 = loader(ds, t2, cfg(16, 2));
    for epoch in [0u64, 3] {
        let a = collect(&l1, epoch);
        let b = collect(&l2, epoch);
        assert_eq!(a.len(), 6);
        assert_eq!(a.len(), b.len());
        for (x, y) in a.iter().zip(&b) {
            assert_eq!(x.indices, y.indices);
            assert_eq!(x.labels, y.labels);
            assert_eq!(flat(x), flat(y), "epoch {epoch} iteration {}", x.iteration);
        }
    }
}

#[test]
fn views_depend_only_on_seed_epoch_and_index() {
    // Different batch sizes give different batchings of the same permutation; every sample keeps its views.
    let ds = fmnist(60);
    let a = rows_by_index(&collect(
        &loader(Arc::clone(&ds), ToyCrops::new(&[10, 5]), cfg(4, 2)),
        1,
    ));
    let b = rows_by_index(&collect(
        &loader(Arc::clone(&ds), ToyCrops::new(&[10, 5]), cfg(6, 1)),
        1,
    ));
    assert_eq!(a.len(), 60);
    assert_eq!(a, b);
    // And they are exactly the transform applied with `augment::sample_rng(seed, epoch, i)`.
    let t = ToyCrops::new(&[10, 5]);
    for i in [0usize, 17, 59] {
        let views = t.views(&ds.get(i).unwrap(), &mut sample_rng(7, 1, i as u64));
        let want: Vec<Vec<f32>> = views.into_iter().map(|v| v.data).collect();
        assert_eq!(a[&i], want, "sample {i}");
    }
    // Another epoch draws other views of the same sample; another seed too.
    let c = rows_by_index(&collect(
        &loader(Arc::clone(&ds), ToyCrops::new(&[10, 5]), cfg(4, 2)),
        2,
    ));
    let mut other_seed = cfg(4, 2);
    other_seed.seed = 8;
    let d = rows_by_index(&collect(
        &loader(ds, ToyCrops::new(&[10, 5]), other_seed),
        1,
    ));
    let differ = |x: &std::collections::BTreeMap<usize, Vec<Vec<f32>>>| {
        (0..60).filter(|i| a[i] != x[i]).count()
    };
    assert!(
        differ(&c) > 50,
        "epoch 2 repeats epoch 1's views for {} samples",
        60 - differ(&c)
    );
    assert!(differ(&d) > 50);
}

#[test]
fn shuffle_depends_on_seed_and_epoch_only() {
    let n = 1000;
    let p0 = epoch_permutation(n, 7, 0);
    let p1 = epoch_permutation(n, 7, 1);
    assert_eq!(p0, epoch_permutation(n, 7, 0));
    assert_ne!(p0, p1);
    assert_ne!(p0, epoch_permutation(n, 8, 0));
    for p in [&p0, &p1] {
        let mut s = p.clone();
        s.sort();
        assert_eq!(s, (0..n).collect::<Vec<_>>());
        // Not the identity, nor close to it.
        assert!(p.iter().enumerate().filter(|(i, &v)| *i == v).count() < 10);
    }
    // Uniformity: over many epochs the first position sees every value of a small range about equally often.
    let mut counts = [0usize; 5];
    for e in 0..5000 {
        counts[epoch_permutation(5, 1, e)[0]] += 1;
    }
    for c in counts {
        assert!((850..1150).contains(&c), "{counts:?}");
    }
    // The loader uses it; epochs differ.
    let l = loader(cifar20(), ToyCrops::new(&[4]), cfg(5, 1));
    assert_eq!(l.order(4), epoch_permutation(20, 7, 4));
    let e0: Vec<usize> = collect(&l, 0)
        .iter()
        .flat_map(|b| b.indices.clone())
        .collect();
    let e1: Vec<usize> = collect(&l, 1)
        .iter()
        .flat_map(|b| b.indices.clone())
        .collect();
    assert_ne!(e0, e1);
    // No shuffle: dataset order.
    let mut c = cfg(5, 1);
    c.shuffle = false;
    let l = loader(cifar20(), ToyCrops::new(&[4]), c);
    let e: Vec<usize> = collect(&l, 3)
        .iter()
        .flat_map(|b| b.indices.clone())
        .collect();
    assert_eq!(e, (0..20).collect::<Vec<_>>());
}

#[test]
fn drop_last_and_keep_last() {
    let l = loader(cifar20(), ToyCrops::new(&[4, 2]), cfg(8, 2));
    assert_eq!(l.niter_per_epoch(), 2);
    let b = collect(&l, 0);
    assert_eq!(b.len(), 2);
    assert!(b
        .iter()
        .all(|b| b.indices.len() == 8 && b.crops[1].dims() == [8, 3, 2, 2]));
    let mut c = cfg(8, 2);
    c.drop_last = false;
    let l = loader(cifar20(), ToyCrops::new(&[4, 2]), c);
    assert_eq!(l.niter_per_epoch(), 3);
    let b = collect(&l, 0);
    assert_eq!(b.len(), 3);
    assert_eq!(b[2].indices.len(), 4);
    assert_eq!(b[2].crops[0].dims(), &[4, 3, 4, 4]);
    let mut all: Vec<usize> = b.iter().flat_map(|b| b.indices.clone()).collect();
    all.sort();
    assert_eq!(all, (0..20).collect::<Vec<_>>());
    // Fewer samples than a batch with drop_last, or a zero batch: errors, not panics.
    assert!(MultiCropLoader::new(cifar20(), Arc::new(ToyCrops::new(&[4])), cfg(21, 1)).is_err());
    assert!(MultiCropLoader::new(cifar20(), Arc::new(ToyCrops::new(&[4])), cfg(0, 1)).is_err());
}

#[test]
fn mid_epoch_start_equals_the_tail_of_a_full_epoch() {
    let ds = fmnist(64);
    let l = loader(ds, ToyCrops::new(&[8, 4]), cfg(8, 2));
    let full = collect(&l, 5);
    assert_eq!(full.len(), 8);
    let tail: Vec<MultiCropBatch> = l.epoch_from(5, 5).map(|b| b.unwrap()).collect();
    assert_eq!(tail.len(), 3);
    for (x, y) in full[5..].iter().zip(&tail) {
        assert_eq!(x.iteration, y.iteration);
        assert_eq!(x.indices, y.indices);
        assert_eq!(flat(x), flat(y));
    }
    // Random access gives the same batch; starting past the end yields nothing.
    let b6 = l.batch(5, 6).unwrap();
    assert_eq!(flat(&b6), flat(&full[6]));
    assert_eq!(l.epoch_from(5, 8).count(), 0);
    assert!(l.batch(5, 8).is_err());
    // The iterator reports its exact length.
    assert_eq!(l.epoch_from(5, 2).size_hint(), (6, Some(6)));
}

fn wait_for(counter: &AtomicUsize, at_least: usize) {
    let t0 = Instant::now();
    while counter.load(Ordering::SeqCst) < at_least {
        assert!(
            t0.elapsed() < Duration::from_secs(15),
            "loader stalled at {}",
            counter.load(Ordering::SeqCst)
        );
        std::thread::sleep(Duration::from_millis(5));
    }
}

#[test]
fn prefetch_is_bounded() {
    let t = ToyCrops::new(&[8]);
    let calls = Arc::clone(&t.calls);
    let mut c = cfg(4, 2);
    c.prefetch = 1;
    let l = loader(fmnist(80), t, c);
    let mut epoch = l.epoch(0);
    // One batch queued + one built and waiting to be sent: 2 batches of 4 samples, then the producer blocks.
    wait_for(&calls, 8);
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(calls.load(Ordering::SeqCst), 8);
    assert_eq!(epoch.produced(), 2);
    let first = epoch.next().unwrap().unwrap();
    assert_eq!(first.iteration, 0);
    wait_for(&calls, 12);
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(calls.load(Ordering::SeqCst), 12);
    // Dropping the epoch mid-way stops the producer (the test would hang otherwise).
    drop(epoch);
    let after = calls.load(Ordering::SeqCst);
    std::thread::sleep(Duration::from_millis(100));
    assert_eq!(calls.load(Ordering::SeqCst), after);
}

#[test]
fn unreadable_images_are_skipped_counted_and_substituted_deterministically() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let pngs = data("cifar10-test20/png");
    for (i, label) in CIFAR_LABELS.iter().enumerate().take(10) {
        let name = format!("cifar10_{i:02}_{label}.png");
        std::fs::copy(pngs.join(&name), dir.join(format!("img_{i:02}.png"))).unwrap();
    }
    // A garbage .jpg and a truncated .png among the good images (sorted positions 3 and 7 of 12).
    std::fs::write(
        dir.join("img_02_garbage.jpg"),
        b"\xff\xd8\xff garbage, not a JPEG",
    )
    .unwrap();
    let png = std::fs::read(pngs.join("cifar10_07_6.png")).unwrap();
    std::fs::write(dir.join("img_05_truncated.png"), &png[..png.len() / 2]).unwrap();
    let ds: Arc<dyn Dataset> = Arc::new(ImageFolder::open(dir).unwrap());
    assert_eq!(ds.len(), 12);
    let bad: Vec<usize> = (0..12).filter(|&i| ds.get(i).is_err()).collect();
    assert_eq!(bad, [3, 7]);

    let l1 = loader(Arc::clone(&ds), ToyCrops::new(&[6, 3]), cfg(4, 1));
    let l2 = loader(Arc::clone(&ds), ToyCrops::new(&[6, 3]), cfg(4, 2));
    for epoch in 0..2u64 {
        let mut e1 = l1.epoch(epoch);
        let b1: Vec<MultiCropBatch> = e1.by_ref().map(|b| b.unwrap()).collect();
        let mut e2 = l2.epoch(epoch);
        let b2: Vec<MultiCropBatch> = e2.by_ref().map(|b| b.unwrap()).collect();
        assert_eq!(b1.len(), 3);
        // All 12 slots are visited (12 / 4): both bad samples skipped, in every epoch.
        assert_eq!(e1.skipped(), 2, "epoch {epoch}");
        assert_eq!(e2.skipped(), 2);
        let order = l1.order(epoch);
        for (x, y) in b1.iter().zip(&b2) {
            assert_eq!(x.indices, y.indices);
            assert_eq!(flat(x), flat(y));
            assert_eq!(x.crops[0].dims(), &[4, 3, 6, 6]);
            for (k, &i) in x.indices.iter().enumerate() {
                let slot = order[x.iteration * 4 + k];
                assert!(!bad.contains(&i));
                // A bad slot is filled with the next readable sample in dataset order.
                let want = if bad.contains(&slot) { slot + 1 } else { slot };
                assert_eq!(i, want);
            }
        }
    }
    assert_eq!(l1.bad_indices(), [3, 7]);
}

#[test]
fn eval_batcher_leaves_unreadable_samples_out() {
    // 12 images, 3 and 7 unreadable (the same folder as above), plus a batch of which every sample is
    // unreadable (8 and 9 with batch 2 in a second folder): each readable sample once, with its own label.
    let tmp = tempfile::tempdir().unwrap();
    let pngs = data("cifar10-test20/png");
    let mut want = Vec::new();
    for (i, label) in CIFAR_LABELS.iter().enumerate().take(12) {
        let name = format!("cifar10_{i:02}_{label}.png");
        // Two class folders (images 0-5 and 6-11), so the batches carry labels.
        let class = tmp.path().join(format!("class{}", i / 6));
        std::fs::create_dir_all(&class).unwrap();
        let file = class.join(format!("img_{i:02}.png"));
        if [3, 8, 9].contains(&i) {
            std::fs::write(&file, b"not a png").unwrap();
        } else {
            std::fs::copy(pngs.join(&name), &file).unwrap();
            want.push(i);
        }
    }
    let ds: Arc<dyn Dataset> = Arc::new(ImageFolder::open(tmp.path()).unwrap());
    let ev = EvalBatcher::new(Arc::clone(&ds), Arc::new(ToyCrops::new(&[5])), 2, 2).unwrap();
    let batches: Vec<_> = ev.iter().map(|b| b.unwrap()).collect();
    // Batches of 2: [0 1] [2 -] [4 5] [6 7] [- -] [10 11].
    let sizes: Vec<usize> = batches.iter().map(|b| b.indices.len()).collect();
    assert_eq!(sizes, [2, 1, 2, 2, 2]);
    let idx: Vec<usize> = batches.iter().flat_map(|b| b.indices.clone()).collect();
    assert_eq!(idx, want);
    let one_by_one =
        EvalBatcher::new(Arc::clone(&ds), Arc::new(ToyCrops::new(&[5])), 1, 1).unwrap();
    let singles: std::collections::HashMap<usize, Vec<f32>> = one_by_one
        .iter()
        .map(|b| {
            let b = b.unwrap();
            let v = b.images.flatten_all().unwrap().to_vec1::<f32>().unwrap();
            (b.indices[0], v)
        })
        .collect();
    assert_eq!(singles.len(), want.len());
    let labels: Vec<usize> = batches
        .iter()
        .flat_map(|b| b.labels.clone().unwrap())
        .collect();
    assert_eq!(labels, want.iter().map(|&i| i / 6).collect::<Vec<_>>());
    for b in &batches {
        assert_eq!(b.images.dim(0).unwrap(), b.indices.len());
        assert_eq!(
            b.labels.clone().expect("class folders are labelled"),
            b.indices
                .iter()
                .map(|&i| ds.label(i).unwrap())
                .collect::<Vec<_>>()
        );
        // Each row is its own image's view (drawn from its own slot's RNG), not a neighbour's: the same as
        // one image per batch gives.
        for (r, &i) in b.indices.iter().enumerate() {
            let row = b.images.get(r).unwrap().flatten_all().unwrap();
            assert_eq!(row.to_vec1::<f32>().unwrap(), singles[&i], "row of {i}");
        }
    }
}

#[test]
fn a_panicking_transform_is_an_error_not_a_hang() {
    let mut t = ToyCrops::new(&[4]);
    t.panic_on_call = Some(5);
    let l = loader(cifar20(), t, cfg(4, 2));
    let results: Vec<_> = l.epoch(0).collect();
    assert!(results.len() <= 5);
    let err = results.into_iter().find_map(|r| r.err()).expect("an error");
    assert!(err.to_string().contains("panicked"), "{err}");
}

#[test]
fn eval_batcher_is_sequential_and_keeps_the_last_batch() {
    let ds = cifar20();
    assert!(EvalBatcher::new(Arc::clone(&ds), Arc::new(ToyCrops::new(&[4, 4])), 8, 2).is_err());
    let ev = EvalBatcher::new(Arc::clone(&ds), Arc::new(ToyCrops::new(&[5])), 8, 2).unwrap();
    assert_eq!(ev.len(), 3);
    let batches: Vec<_> = ev.iter().map(|b| b.unwrap()).collect();
    let sizes: Vec<usize> = batches.iter().map(|b| b.indices.len()).collect();
    assert_eq!(sizes, [8, 8, 4]);
    let idx: Vec<usize> = batches.iter().flat_map(|b| b.indices.clone()).collect();
    assert_eq!(idx, (0..20).collect::<Vec<_>>());
    let labels: Vec<usize> = batches
        .iter()
        .flat_map(|b| b.labels.clone().unwrap())
        .collect();
    assert_eq!(labels, CIFAR_LABELS);
    assert_eq!(batches[2].images.dims(), &[4, 3, 5, 5]);
    // Twice the same.
    let again: Vec<_> = ev.iter().map(|b| b.unwrap()).collect();
    for (a, b) in batches.iter().zip(&again) {
        assert_eq!(
            a.images.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
            b.images.flatten_all().unwrap().to_vec1::<f32>().unwrap()
        );
    }
}

#[test]
fn real_dino_augmentation_through_the_loader() {
    // Small crops of the real CIFAR images with the official recipe: 2 x 32 + 3 x 16.
    let aug_cfg = DinoAugConfig {
        global_crop_size: 32,
        local_crop_size: 16,
        local_crops_number: 3,
        ..DinoAugConfig::default()
    };
    let aug = Arc::new(DataAugmentationDINO::new(aug_cfg).unwrap());
    let ds = cifar20();
    let l1 = MultiCropLoader::new(Arc::clone(&ds), aug.clone(), cfg(5, 1)).unwrap();
    let l2 = MultiCropLoader::new(Arc::clone(&ds), aug.clone(), cfg(5, 2)).unwrap();
    let a = collect(&l1, 2);
    let b = collect(&l2, 2);
    assert_eq!(a.len(), 4);
    for (x, y) in a.iter().zip(&b) {
        let dims: Vec<Vec<usize>> = x.crops.iter().map(|t| t.dims().to_vec()).collect();
        assert_eq!(
            dims,
            [
                [5, 3, 32, 32],
                [5, 3, 32, 32],
                [5, 3, 16, 16],
                [5, 3, 16, 16],
                [5, 3, 16, 16]
            ]
        );
        assert_eq!(x.indices, y.indices);
        assert_eq!(flat(x), flat(y));
    }
    let rows = rows_by_index(&a);
    for i in [0usize, 9, 19] {
        let want: Vec<Vec<f32>> = aug
            .views(&ds.get(i).unwrap(), &mut sample_rng(7, 2, i as u64))
            .into_iter()
            .map(|v| v.data)
            .collect();
        assert_eq!(rows[&i], want, "sample {i}");
    }
}

/// `DistributedSampler` semantics: rank r's batch `it` is positions r, r + N, ... of the global batch `it`,
/// so the ranks' batches are disjoint and their union is the one-rank batch of size `b * N`.
#[test]
fn rank_slots_partition_the_global_batch() {
    use dino_data::loader::{epoch_permutation, global_positions, rank_slots};
    let order = epoch_permutation(100, 3, 1);
    for world in [1usize, 2, 4] {
        let b = 12 / world;
        for it in 0..8 {
            let mut union: Vec<usize> = Vec::new();
            for rank in 0..world {
                let s = rank_slots(&order, it, b, rank, world);
                assert_eq!(s.len(), b);
                for (j, (&idx, &pos)) in s.iter().zip(&global_positions(rank, world, b)).enumerate()
                {
                    assert_eq!(
                        idx,
                        order[it * 12 + pos as usize],
                        "world {world} rank {rank} row {j}"
                    );
                }
                union.extend(s);
            }
            let mut one = rank_slots(&order, it, 12, 0, 1);
            union.sort_unstable();
            one.sort_unstable();
            assert_eq!(union, one, "world {world} iteration {it}");
        }
    }
}
