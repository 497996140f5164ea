//! Dataset readers on the real files in `../shared/data` (counts, labels, pixel values checked against the raw
//! bytes and against values computed independently with Python's gzip module) and on corrupt copies in a tempdir.

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use dino_data::cifar::{CifarDataset, CifarKind};
use dino_data::dataset::{open_dataset, Dataset, DatasetKind, InMemoryDataset, Split, Subset};
use dino_data::error::Error;
use dino_data::folder::{FolderLayout, ImageFolder};
use dino_data::idx::{read_idx, IdxDataset};
use image::{GrayImage, RgbImage, RgbaImage};

fn data(rel: &str) -> PathBuf {
    PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/../../../shared/data")).join(rel)
}

const CIFAR_LABELS: [usize; 20] = [3, 8, 8, 0, 6, 6, 1, 6, 3, 1, 0, 9, 5, 7, 9, 8, 5, 7, 8, 6];

fn gunzip(path: &Path) -> Vec<u8> {
    let mut out = Vec::new();
    flate2::read::GzDecoder::new(std::fs::File::open(path).unwrap())
        .read_to_end(&mut out)
        .unwrap();
    out
}

#[test]
fn fashion_mnist_train_counts_labels_and_pixels() {
    let dir = data("fashion-mnist");
    assert_eq!(DatasetKind::detect(&dir).unwrap(), DatasetKind::Idx);
    let ds = open_dataset(&dir, None, Split::Train).unwrap();
    assert_eq!(ds.len(), 60_000);
    let first: Vec<usize> = (0..10).map(|i| ds.label(i).unwrap()).collect();
    assert_eq!(first, [9, 0, 0, 3, 0, 2, 7, 2, 5, 5]);
    assert_eq!(ds.label(59_999), Some(5));
    assert_eq!(ds.label(60_000), None);
    let names = ds.class_names().unwrap();
    assert_eq!(names.len(), 10);
    assert_eq!(names[9], "Ankle boot");
    assert_eq!(names[0], "T-shirt/top");

    // Known pixels, computed independently (Python gzip + struct): (index, y, x, value).
    for (i, y, x, v) in [
        (0usize, 14u32, 14u32, 217u8),
        (0, 5, 10, 0),
        (1, 10, 5, 223),
        (59_999, 20, 13, 0),
        (12_345, 14, 7, 188),
    ] {
        let img = ds.get(i).unwrap();
        assert_eq!(img.dimensions(), (28, 28));
        assert_eq!(
            img.get_pixel(x, y).0,
            [v, v, v],
            "image {i} pixel ({x},{y})"
        );
    }
    let sum0: u64 = ds.get(0).unwrap().pixels().map(|p| p.0[0] as u64).sum();
    assert_eq!(sum0, 76_247);
    let sum_last: u64 = ds
        .get(59_999)
        .unwrap()
        .pixels()
        .map(|p| p.0[1] as u64)
        .sum();
    assert_eq!(sum_last, 16_684);

    // Whole images against the raw bytes (header 16 bytes, 784 bytes per image).
    let raw = gunzip(&dir.join("train-images-idx3-ubyte.gz"));
    assert_eq!(&raw[..4], &[0, 0, 8, 3]);
    for i in [0usize, 1, 777, 59_999] {
        let img = ds.get(i).unwrap();
        let want = &raw[16 + i * 784..16 + (i + 1) * 784];
        let got: Vec<u8> = img.pixels().map(|p| p.0[2]).collect();
        assert_eq!(got, want, "image {i}");
        assert!(img.pixels().all(|p| p.0[0] == p.0[1] && p.0[1] == p.0[2]));
    }
    assert!(matches!(
        ds.get(60_000),
        Err(Error::IndexOutOfRange { len: 60_000, .. })
    ));
}

#[test]
fn fashion_mnist_test_split_and_single_file() {
    let dir = data("fashion-mnist");
    let ds = IdxDataset::open_dir(&dir, Split::Test).unwrap();
    assert_eq!(ds.len(), 10_000);
    assert_eq!(ds.image_size(), (28, 28));
    let first: Vec<usize> = (0..10).map(|i| ds.label(i).unwrap()).collect();
    assert_eq!(first, [9, 2, 1, 1, 6, 1, 4, 6, 5, 7]);
    assert_eq!(ds.label(9_999), Some(5));
    assert_eq!(ds.get(0).unwrap().get_pixel(14, 14).0, [110; 3]);
    let sum: u64 = ds.raw_pixels(0).unwrap().iter().map(|&v| v as u64).sum();
    assert_eq!(sum, 33_456);
    // Opening the image file alone finds the label file beside it.
    let single = open_dataset(&dir.join("t10k-images-idx3-ubyte.gz"), None, Split::Train).unwrap();
    assert_eq!(single.len(), 10_000);
    assert_eq!(single.label(1), Some(2));
    assert!(single.source(3).ends_with("t10k-images-idx3-ubyte.gz#3"));
}

#[test]
fn idx_uncompressed_and_corrupt_copies() {
    let tmp = tempfile::tempdir().unwrap();
    let raw = gunzip(&data("fashion-mnist/t10k-images-idx3-ubyte.gz"));
    // An uncompressed IDX of the first 100 images: rewrite N in the header.
    let mut small = raw[..16 + 100 * 784].to_vec();
    small[4..8].copy_from_slice(&100u32.to_be_bytes());
    let plain = tmp.path().join("small-images-idx3-ubyte");
    std::fs::write(&plain, &small).unwrap();
    let arr = read_idx(&plain).unwrap();
    assert_eq!(arr.dims, [100, 28, 28]);
    assert_eq!(arr.data, &raw[16..16 + 100 * 784]);
    let ds = IdxDataset::open(&plain, None).unwrap();
    assert_eq!(ds.len(), 100);
    assert_eq!(ds.label(0), None);
    assert!(ds.class_names().is_none());

    // Wrong magic number: an error naming the file.
    let mut bad = small.clone();
    bad[2] = 0x07;
    bad[0] = 0x12;
    let p = tmp.path().join("wrong-magic-idx3-ubyte");
    std::fs::write(&p, &bad).unwrap();
    let e = read_idx(&p).unwrap_err();
    assert!(
        matches!(
            e,
            Error::IdxMagic {
                found: [0x12, 0, 0x07, 3],
                ..
            }
        ),
        "{e}"
    );
    assert!(e.to_string().contains("wrong-magic-idx3-ubyte"), "{e}");

    // A PNG is not an IDX file.
    let e = read_idx(&data("cifar10-test20/png/cifar10_00_3.png")).unwrap_err();
    assert!(matches!(e, Error::IdxMagic { .. }), "{e}");

    // Header promises more data than there is.
    let p = tmp.path().join("short-idx3-ubyte");
    std::fs::write(&p, &small[..16 + 50 * 784]).unwrap();
    let e = read_idx(&p).unwrap_err();
    assert!(
        matches!(e, Error::IdxFormat { .. }) && e.to_string().contains("short-idx3-ubyte"),
        "{e}"
    );

    // Truncated gzip stream: an I/O error naming the file, no panic.
    let gz = std::fs::read(data("fashion-mnist/t10k-labels-idx1-ubyte.gz")).unwrap();
    let p = tmp.path().join("t10k-labels-idx1-ubyte.gz");
    std::fs::write(&p, &gz[..gz.len() / 2]).unwrap();
    let e = read_idx(&p).unwrap_err();
    assert!(
        matches!(e, Error::Io { .. } | Error::IdxFormat { .. }),
        "{e}"
    );
    assert!(e.to_string().contains("t10k-labels-idx1-ubyte.gz"), "{e}");

    // Label count that does not match the images.
    let mut enc = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    let mut lab = vec![0u8, 0, 8, 1];
    lab.extend_from_slice(&99u32.to_be_bytes());
    lab.extend(std::iter::repeat_n(1u8, 99));
    enc.write_all(&lab).unwrap();
    let lp = tmp.path().join("small-labels-idx1-ubyte.gz");
    std::fs::write(&lp, enc.finish().unwrap()).unwrap();
    let e = IdxDataset::open(&plain, Some(&lp)).unwrap_err();
    assert!(e.to_string().contains("small-labels-idx1-ubyte.gz"), "{e}");
}

#[test]
fn cifar10_real_records_labels_and_png_copies() {
    let dir = data("cifar10-test20");
    assert_eq!(DatasetKind::detect(&dir).unwrap(), DatasetKind::Cifar10);
    let ds = open_dataset(&dir, None, Split::Test).unwrap();
    assert_eq!(ds.len(), 20);
    let labels: Vec<usize> = (0..20).map(|i| ds.label(i).unwrap()).collect();
    assert_eq!(labels, CIFAR_LABELS);
    let names = ds.class_names().unwrap();
    assert_eq!(names.len(), 10);
    assert_eq!(names[3], "cat");
    assert_eq!(names[8], "ship");
    // Pixels computed independently from the raw bytes (R plane, G plane, B plane).
    let img0 = ds.get(0).unwrap();
    assert_eq!(img0.dimensions(), (32, 32));
    assert_eq!(img0.get_pixel(0, 0).0, [158, 112, 49]);
    assert_eq!(img0.get_pixel(7, 5).0, [167, 115, 41]);
    let raw = std::fs::read(dir.join("test_batch.bin")).unwrap();
    for i in 0..20 {
        let rec = &raw[i * 3073..(i + 1) * 3073];
        assert_eq!(rec[0] as usize, CIFAR_LABELS[i]);
        let img = ds.get(i).unwrap();
        for (k, p) in img.pixels().enumerate() {
            assert_eq!(
                p.0,
                [rec[1 + k], rec[1 + 1024 + k], rec[1 + 2048 + k]],
                "image {i} pixel {k}"
            );
        }
        // The PNG copy decodes to the same image; its name carries the label.
        let png = dir.join(format!("png/cifar10_{i:02}_{}.png", CIFAR_LABELS[i]));
        let decoded = image::open(&png).unwrap().to_rgb8();
        assert_eq!(decoded, img, "{}", png.display());
    }
    assert!(
        ds.source(7).ends_with("test_batch.bin#7"),
        "{}",
        ds.source(7)
    );
    // The train split of this folder does not exist.
    let e = CifarDataset::open_dir(CifarKind::Cifar10, &dir, Split::Train).unwrap_err();
    assert!(e.to_string().contains("data_batch_1.bin"), "{e}");
}

#[test]
fn cifar_several_batches_cifar100_and_bad_size() {
    let tmp = tempfile::tempdir().unwrap();
    let raw = std::fs::read(data("cifar10-test20/test_batch.bin")).unwrap();
    // Two train batches: 12 + 8 records.
    std::fs::write(tmp.path().join("data_batch_1.bin"), &raw[..12 * 3073]).unwrap();
    std::fs::write(tmp.path().join("data_batch_2.bin"), &raw[12 * 3073..]).unwrap();
    let ds = open_dataset(tmp.path(), None, Split::Train).unwrap();
    assert_eq!(ds.len(), 20);
    let labels: Vec<usize> = (0..20).map(|i| ds.label(i).unwrap()).collect();
    assert_eq!(labels, CIFAR_LABELS);
    assert!(ds.class_names().is_none(), "no batches.meta.txt here");
    assert!(
        ds.source(13).ends_with("data_batch_2.bin#1"),
        "{}",
        ds.source(13)
    );
    let orig =
        CifarDataset::open_files(CifarKind::Cifar10, &[data("cifar10-test20/test_batch.bin")])
            .unwrap();
    assert_eq!(ds.get(15).unwrap(), orig.get(15).unwrap());

    // CIFAR-100 records built from the real pixels: coarse = i % 20, fine = 99 - i.
    let dir100 = tmp.path().join("cifar-100-binary");
    std::fs::create_dir(&dir100).unwrap();
    let mut rec100 = Vec::new();
    for i in 0..20 {
        rec100.push((i % 20) as u8);
        rec100.push((99 - i) as u8);
        rec100.extend_from_slice(&raw[i * 3073 + 1..(i + 1) * 3073]);
    }
    std::fs::write(dir100.join("test.bin"), &rec100).unwrap();
    let fine: Vec<String> = (0..100).map(|i| format!("fine{i}")).collect();
    std::fs::write(dir100.join("fine_label_names.txt"), fine.join("\n")).unwrap();
    assert_eq!(DatasetKind::detect(&dir100).unwrap(), DatasetKind::Cifar100);
    let c100 = CifarDataset::open_dir(CifarKind::Cifar100, &dir100, Split::Test).unwrap();
    assert_eq!(c100.len(), 20);
    assert_eq!(c100.label(3), Some(96));
    assert_eq!(c100.coarse_labels().unwrap()[5], 5);
    assert_eq!(c100.class_names().unwrap()[96], "fine96");
    assert_eq!(c100.get(4).unwrap(), orig.get(4).unwrap());

    // A size that is not a multiple of 3073: an error naming the file.
    let bad = tmp.path().join("bad").join("test_batch.bin");
    std::fs::create_dir(bad.parent().unwrap()).unwrap();
    std::fs::write(&bad, &raw[..3 * 3073 + 100]).unwrap();
    let e = open_dataset(&bad, None, Split::Test).err().unwrap();
    assert!(
        matches!(
            e,
            Error::CifarSize {
                record_len: 3073,
                size: 9319,
                ..
            }
        ),
        "{e}"
    );
    let msg = e.to_string();
    assert!(
        msg.contains("test_batch.bin") && msg.contains("3073"),
        "{msg}"
    );
    // The CIFAR-10 batch read as CIFAR-100: 61460 is not a multiple of 3074.
    let e = CifarDataset::open_files(
        CifarKind::Cifar100,
        &[data("cifar10-test20/test_batch.bin")],
    )
    .unwrap_err();
    assert!(
        matches!(
            e,
            Error::CifarSize {
                record_len: 3074,
                ..
            }
        ),
        "{e}"
    );
    // A label byte out of range.
    let mut badlab = raw[..2 * 3073].to_vec();
    badlab[3073] = 200;
    let p = tmp.path().join("bad").join("data_batch_1.bin");
    std::fs::write(&p, &badlab).unwrap();
    let e = CifarDataset::open_files(CifarKind::Cifar10, &[p]).unwrap_err();
    assert!(
        matches!(
            e,
            Error::CifarLabel {
                record: 1,
                label: 200,
                ..
            }
        ),
        "{e}"
    );
}

#[test]
fn image_folder_flat_png_copies_equal_binary_records() {
    let dir = data("cifar10-test20/png");
    let folder = ImageFolder::open(&dir).unwrap();
    assert_eq!(folder.len(), 20);
    assert!(folder.class_names().is_none());
    assert_eq!(folder.label(0), None);
    let bin =
        CifarDataset::open_files(CifarKind::Cifar10, &[data("cifar10-test20/test_batch.bin")])
            .unwrap();
    for (i, label) in CIFAR_LABELS.iter().enumerate() {
        assert!(folder
            .source(i)
            .ends_with(&format!("cifar10_{i:02}_{label}.png")));
        assert_eq!(folder.get(i).unwrap(), bin.get(i).unwrap(), "sample {i}");
    }
}

#[test]
fn image_folder_classes_modes_and_formats() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path();
    let photos = data("photos");
    // Classes sorted by name: "animals" = 0, "fruit" = 1, "zz_misc" = 2 (with a nested folder).
    for (cls, files) in [
        ("zz_misc", vec!["rocket.jpg"]),
        (
            "animals",
            vec!["horses.jpg", "chelsea_cat.png", "eagle.jpg"],
        ),
        ("fruit", vec!["opencv_fruits.jpg"]),
    ] {
        std::fs::create_dir_all(root.join(cls)).unwrap();
        for f in files {
            std::fs::copy(photos.join(f), root.join(cls).join(f)).unwrap();
        }
    }
    std::fs::create_dir_all(root.join("zz_misc/nested")).unwrap();
    // Greyscale, RGBA and WebP files made from a real CIFAR image.
    let base = image::open(data("cifar10-test20/png/cifar10_03_0.png"))
        .unwrap()
        .to_rgb8();
    let grey = GrayImage::from_fn(32, 32, |x, y| image::Luma([base.get_pixel(x, y).0[1]]));
    grey.save(root.join("zz_misc/nested/grey.png")).unwrap();
    let rgba = RgbaImage::from_fn(32, 32, |x, y| {
        let p = base.get_pixel(x, y).0;
        image::Rgba([p[0], p[1], p[2], (x * 8) as u8])
    });
    rgba.save(root.join("zz_misc/a_rgba.PNG")).unwrap();
    base.save_with_format(root.join("zz_misc/b.webp"), image::ImageFormat::WebP)
        .unwrap();
    std::fs::write(root.join("zz_misc/notes.txt"), "not an image").unwrap();
    std::fs::write(root.join("zz_misc/.hidden.png"), "hidden").unwrap();

    assert_eq!(DatasetKind::detect(root).unwrap(), DatasetKind::ImageFolder);
    let ds = ImageFolder::open(root).unwrap();
    assert_eq!(ds.class_names().unwrap(), ["animals", "fruit", "zz_misc"]);
    let names: Vec<String> = (0..ds.len())
        .map(|i| {
            ds.path(i)
                .unwrap()
                .strip_prefix(root)
                .unwrap()
                .to_string_lossy()
                .into_owned()
        })
        .collect();
    assert_eq!(
        names,
        [
            "animals/chelsea_cat.png",
            "animals/eagle.jpg",
            "animals/horses.jpg",
            "fruit/opencv_fruits.jpg",
            "zz_misc/a_rgba.PNG",
            "zz_misc/b.webp",
            "zz_misc/rocket.jpg",
            "zz_misc/nested/grey.png",
        ]
    );
    let labels: Vec<usize> = (0..ds.len()).map(|i| ds.label(i).unwrap()).collect();
    assert_eq!(labels, [0, 0, 0, 1, 2, 2, 2, 2]);
    assert_eq!(ds.get(0).unwrap().dimensions(), (451, 300));
    assert_eq!(ds.get(2).unwrap().dimensions(), (773, 512));
    // RGBA: alpha dropped; WebP (lossless): exact; grey: replicated.
    assert_eq!(ds.get(4).unwrap(), base);
    assert_eq!(ds.get(5).unwrap(), base);
    let g = ds.get(7).unwrap();
    assert!(g
        .enumerate_pixels()
        .all(|(x, y, p)| p.0 == [base.get_pixel(x, y).0[1]; 3]));
    assert!(
        ds.describe().contains("8 images, 3 classes"),
        "{}",
        ds.describe()
    );

    // Flat layout over the same tree: all 8 images, unlabelled, same order.
    let flat = ImageFolder::open_with(root, FolderLayout::Flat).unwrap();
    assert_eq!(flat.len(), 8);
    assert_eq!(flat.files(), ds.files());
    assert_eq!(flat.label(0), None);
    // The photos folder itself is flat.
    let photos_ds = open_dataset(&photos, None, Split::Train).unwrap();
    assert_eq!(photos_ds.len(), 15);
    assert!(photos_ds.source(0).ends_with("astronaut.png"));
}

#[test]
fn image_folder_errors_name_the_folder_and_bad_images_fail_in_get() {
    let tmp = tempfile::tempdir().unwrap();
    let empty = tmp.path().join("empty");
    std::fs::create_dir(&empty).unwrap();
    let e = ImageFolder::open(&empty).unwrap_err();
    assert!(
        matches!(e, Error::EmptyFolder(_)) && e.to_string().contains("empty"),
        "{e}"
    );

    let noimg = tmp.path().join("noimg");
    std::fs::create_dir_all(noimg.join("sub")).unwrap();
    std::fs::write(noimg.join("readme.txt"), "x").unwrap();
    std::fs::write(noimg.join("sub/data.csv"), "x").unwrap();
    let e = ImageFolder::open_with(&noimg, FolderLayout::Flat).unwrap_err();
    assert!(
        matches!(e, Error::NoImages { .. }) && e.to_string().contains("noimg"),
        "{e}"
    );

    // A class folder without images.
    let cls = tmp.path().join("cls");
    std::fs::create_dir_all(cls.join("a")).unwrap();
    std::fs::create_dir_all(cls.join("b_empty")).unwrap();
    std::fs::copy(
        data("cifar10-test20/png/cifar10_00_3.png"),
        cls.join("a/x.png"),
    )
    .unwrap();
    let e = ImageFolder::open(&cls).unwrap_err();
    assert!(e.to_string().contains("b_empty"), "{e}");

    let missing = tmp.path().join("missing");
    let e = open_dataset(&missing, None, Split::Train).err().unwrap();
    assert!(
        matches!(e, Error::Io { .. }) && e.to_string().contains("missing"),
        "{e}"
    );

    // Garbage and truncated images open fine (lazy) and fail in get with an error naming the file.
    let flat = tmp.path().join("flat");
    std::fs::create_dir(&flat).unwrap();
    std::fs::copy(
        data("cifar10-test20/png/cifar10_00_3.png"),
        flat.join("a.png"),
    )
    .unwrap();
    std::fs::write(flat.join("b_garbage.jpg"), b"this is not a jpeg at all").unwrap();
    let jpg = std::fs::read(data("photos/grace_hopper.jpg")).unwrap();
    std::fs::write(flat.join("c_truncated.jpg"), &jpg[..jpg.len() / 3]).unwrap();
    let png = std::fs::read(data("photos/chelsea_cat.png")).unwrap();
    std::fs::write(flat.join("d_truncated.png"), &png[..png.len() / 2]).unwrap();
    let ds = ImageFolder::open(&flat).unwrap();
    assert_eq!(ds.len(), 4);
    assert!(ds.get(0).is_ok());
    for (i, name) in [(1, "b_garbage.jpg"), (3, "d_truncated.png")] {
        let e = ds.get(i).unwrap_err();
        assert!(e.to_string().contains(name), "{e}");
    }
    // A truncated JPEG either errors (naming the file) or decodes with the missing part filled: never a panic.
    if let Err(e) = ds.get(2) {
        assert!(e.to_string().contains("c_truncated.jpg"), "{e}");
    }
}

#[test]
fn in_memory_subset_and_kind_names() {
    let imgs: Vec<RgbImage> = (0..5u8)
        .map(|v| RgbImage::from_pixel(4, 3, image::Rgb([v, v, v])))
        .collect();
    let mem = InMemoryDataset::new("mem", imgs, Some(vec![0, 1, 0, 1, 2])).unwrap();
    assert!(InMemoryDataset::new("bad", vec![], Some(vec![1])).is_err());
    let mem: Arc<dyn Dataset> = Arc::new(mem);
    let sub = Subset::new(Arc::clone(&mem), vec![4, 0, 2]).unwrap();
    assert_eq!(sub.len(), 3);
    assert_eq!(sub.label(0), Some(2));
    assert_eq!(sub.get(0).unwrap().get_pixel(0, 0).0, [4, 4, 4]);
    assert_eq!(sub.inner_index(2), Some(2));
    assert!(matches!(
        sub.get(3),
        Err(Error::IndexOutOfRange {
            index: 3,
            len: 3,
            ..
        })
    ));
    assert!(Subset::new(Arc::clone(&mem), vec![5]).is_err());
    let first = Subset::first(Arc::clone(&mem), 2);
    assert_eq!(first.len(), 2);
    assert_eq!(first.get(1).unwrap().get_pixel(0, 0).0, [1, 1, 1]);
    assert_eq!(Subset::first(mem, 100).len(), 5);

    for (s, k) in [
        ("cifar10", DatasetKind::Cifar10),
        ("CIFAR-100", DatasetKind::Cifar100),
        ("fashion-mnist", DatasetKind::Idx),
        ("image_folder", DatasetKind::ImageFolder),
    ] {
        assert_eq!(s.parse::<DatasetKind>().unwrap(), k);
    }
    let e = "tfrecord".parse::<DatasetKind>().unwrap_err();
    assert!(e.to_string().contains("tfrecord"));
}
