//! Fuzzing of every reader of user files, on stable Rust (no cargo-fuzz): each reader is fed mutations of
//! real files from `../shared` (bit flips, bytes set to edge values, truncation at every offset of the
//! header and at random points, huge declared sizes, wrong magic, inserted / deleted / repeated spans,
//! NaN / Inf in tensor data, format-aware edits of headers and pickles) plus hand-made structural cases
//! (deep and self-referencing pickles, symlink loops, non-UTF-8 names).
//!
//! Every case must end in `Ok` or in an error whose text is one line and says each thing once; a panic fails
//! the test naming the case, and so does any single allocation above [`ALLOC_LIMIT`] (a reader that
//! allocated a declared size before checking it against the file): the counting allocator below refuses it,
//! which aborts the process after printing the reader and case.
//!
//! Fixed seed; `DINO_FUZZ_CASES=<n>` sets the cases per reader (default 4000), `DINO_FUZZ_SEED` the seed.
//! Each reader prints `fuzz <reader>: <cases> cases, <ok> ok, <err> errors, ...` (shown with `--nocapture`) and
//! appends the line to `target/tmp/fuzz_readers.txt`.

use std::alloc::{GlobalAlloc, Layout, System};
use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::panic::AssertUnwindSafe;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;

use candle_core::{DType, Device, Tensor};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

/// The largest single allocation a case may request (the seeds are at most a few hundred KB; the image
/// decoders' own limit is 512 MiB).
const ALLOC_LIMIT: usize = 768 << 20;

struct Capped;
static LARGEST: AtomicUsize = AtomicUsize::new(0);
static READER: AtomicUsize = AtomicUsize::new(usize::MAX);
static CASE: AtomicUsize = AtomicUsize::new(0);

fn note_size(size: usize) -> bool {
    if READER.load(Ordering::Relaxed) != usize::MAX {
        LARGEST.fetch_max(size, Ordering::Relaxed);
    }
    if size <= ALLOC_LIMIT {
        return true;
    }
    // No allocation here: format into a stack buffer.
    let mut buf = [0u8; 160];
    let mut n = 0;
    let mut put = |s: &[u8]| {
        for &b in s {
            if n < buf.len() {
                buf[n] = b;
                n += 1;
            }
        }
    };
    let num = |v: usize, put: &mut dyn FnMut(&[u8])| {
        let mut d = [0u8; 20];
        let mut i = d.len();
        let mut v = v;
        loop {
            i -= 1;
            d[i] = b'0' + (v % 10) as u8;
            v /= 10;
            if v == 0 {
                break;
            }
        }
        put(&d[i..]);
    };
    put(b"\nfuzz: refused an allocation of ");
    num(size, &mut put);
    put(b" bytes in reader #");
    num(READER.load(Ordering::Relaxed), &mut put);
    put(b" case ");
    num(CASE.load(Ordering::Relaxed), &mut put);
    put(b"\n");
    // SAFETY: writing a valid buffer to stderr.
    unsafe { libc::write(2, buf.as_ptr().cast(), n) };
    false
}

// SAFETY: forwards to the system allocator, refusing (null) only oversized requests.
unsafe impl GlobalAlloc for Capped {
    unsafe fn alloc(&self, l: Layout) -> *mut u8 {
        if note_size(l.size()) {
            System.alloc(l)
        } else {
            std::ptr::null_mut()
        }
    }
    unsafe fn alloc_zeroed(&self, l: Layout) -> *mut u8 {
        if note_size(l.size()) {
            System.alloc_zeroed(l)
        } else {
            std::ptr::null_mut()
        }
    }
    unsafe fn dealloc(&self, p: *mut u8, l: Layout) {
        System.dealloc(p, l)
    }
    unsafe fn realloc(&self, p: *mut u8, l: Layout, new: usize) -> *mut u8 {
        if note_size(new) {
            System.realloc(p, l, new)
        } else {
            std::ptr::null_mut()
        }
    }
}

#[global_allocator]
static GLOBAL: Capped = Capped;

/// The readers run one at a time (the allocation record and the case number are global).
static SERIAL: Mutex<()> = Mutex::new(());

fn shared() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../../shared")
}

fn cases() -> usize {
    std::env::var("DINO_FUZZ_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(4000)
}

fn rng(reader: &str) -> ChaCha8Rng {
    let seed: u64 = std::env::var("DINO_FUZZ_SEED")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(0x05ee_dd10);
    let h = reader.bytes().fold(0xcbf29ce484222325u64, |h, b| {
        (h ^ b as u64).wrapping_mul(0x100000001b3)
    });
    ChaCha8Rng::seed_from_u64(seed ^ h)
}

fn gunzip(p: &Path) -> Vec<u8> {
    let mut v = Vec::new();
    flate2::read::GzDecoder::new(std::fs::File::open(p).unwrap())
        .read_to_end(&mut v)
        .unwrap();
    v
}

fn gzip(b: &[u8]) -> Vec<u8> {
    let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    e.write_all(b).unwrap();
    e.finish().unwrap()
}

/// The first `n` records of an IDX file: the header with its first dimension set to `n`, then the data.
fn idx_prefix(bytes: &[u8], n: usize) -> Vec<u8> {
    let ndim = bytes[3] as usize;
    let dims: Vec<usize> = (0..ndim)
        .map(|i| u32::from_be_bytes(bytes[4 + 4 * i..8 + 4 * i].try_into().unwrap()) as usize)
        .collect();
    let per: usize = dims[1..].iter().product();
    let head = 4 + 4 * ndim;
    let mut out = bytes[..head].to_vec();
    out[4..8].copy_from_slice(&(n as u32).to_be_bytes());
    out.extend_from_slice(&bytes[head..head + n * per]);
    out
}

/// Byte offsets where a format's structure changes (header fields), for exhaustive truncation.
type Boundaries = Vec<usize>;

/// A generic mutation of `seed`; `boundaries` are tried as truncation points first (case < len), then
/// random mutations.
fn mutate(seed: &[u8], boundaries: &[usize], case: usize, r: &mut ChaCha8Rng) -> (Vec<u8>, String) {
    if case < boundaries.len() {
        let at = boundaries[case].min(seed.len());
        return (seed[..at].to_vec(), format!("truncated at {at}"));
    }
    let mut b = seed.to_vec();
    let len = b.len().max(1);
    let mut what = Vec::new();
    for _ in 0..r.random_range(1..=3) {
        match r.random_range(0..9) {
            0 => {
                for _ in 0..r.random_range(1..=8) {
                    let i = r.random_range(0..len).min(b.len().saturating_sub(1));
                    if !b.is_empty() {
                        b[i] ^= 1 << r.random_range(0..8);
                    }
                }
                what.push("bit flips".to_string());
            }
            1 if !b.is_empty() => {
                let i = r.random_range(0..b.len());
                b[i] = [0x00, 0xff, 0x7f, 0x80, 0x01][r.random_range(0..5)];
                what.push(format!("byte {i} set"));
            }
            2 => {
                let at = r.random_range(0..=b.len());
                b.truncate(at);
                what.push(format!("truncated at {at}"));
            }
            3 if b.len() >= 8 => {
                // A huge declared size or count, little- or big-endian, at a header-ish offset.
                let limit = b
                    .len()
                    .min(if r.random_bool(0.7) { 64 } else { usize::MAX })
                    - 4;
                let i = r.random_range(0..=limit);
                let v: u32 = [u32::MAX, 0x7fff_ffff, 0x8000_0000, 1 << 24, 0][r.random_range(0..5)];
                let bytes = if r.random_bool(0.5) {
                    v.to_le_bytes()
                } else {
                    v.to_be_bytes()
                };
                b[i..i + 4].copy_from_slice(&bytes);
                what.push(format!("u32 {v:#x} at {i}"));
            }
            4 if b.len() >= 8 => {
                let i = r.random_range(0..=b.len().min(64) - 8);
                let v: u64 = [u64::MAX, 1 << 40, i64::MAX as u64][r.random_range(0..3)];
                b[i..i + 8].copy_from_slice(&v.to_le_bytes());
                what.push(format!("u64 {v:#x} at {i}"));
            }
            5 if !b.is_empty() => {
                let i = r.random_range(0..b.len());
                let n = r.random_range(1..=64).min(b.len() - i);
                b.drain(i..i + n);
                what.push(format!("deleted {n} at {i}"));
            }
            6 => {
                let i = r.random_range(0..=b.len());
                let ins: Vec<u8> = (0..r.random_range(1..=64)).map(|_| r.random()).collect();
                what.push(format!("inserted {} at {i}", ins.len()));
                b.splice(i..i, ins);
            }
            7 if b.len() >= 2 => {
                let i = r.random_range(0..b.len() - 1);
                let n = r.random_range(1..=256).min(b.len() - i);
                let span = b[i..i + n].to_vec();
                let at = r.random_range(0..=b.len());
                what.push(format!("repeated {n} from {i} at {at}"));
                b.splice(at..at, span);
            }
            _ => {
                // Wrong magic: the first bytes replaced.
                let n = r.random_range(1..=8).min(b.len());
                for x in &mut b[..n] {
                    *x = r.random();
                }
                what.push(format!("first {n} bytes replaced"));
            }
        }
    }
    (b, what.join(", "))
}

/// What one reader's run found.
struct Tally {
    name: &'static str,
    cases: usize,
    ok: usize,
    err: usize,
    failures: Vec<String>,
}

/// Check an error's text: one line, not empty, and no part said twice.
fn check_error_text(e: &(dyn std::error::Error + 'static)) -> Option<String> {
    let line = dino_train::error::one_line_report(e);
    let display = e.to_string();
    if display.contains('\n') || display.trim().is_empty() {
        return Some(format!("not one line: {display:?}"));
    }
    if line.matches("(os error").count() > 1 {
        return Some(format!("says the os error twice: {line}"));
    }
    let parts: Vec<&str> = line
        .split(": ")
        .map(str::trim)
        .filter(|p| p.len() >= 12)
        .collect();
    for (i, p) in parts.iter().enumerate() {
        if parts[..i].contains(p) {
            return Some(format!("says `{p}` twice: {line}"));
        }
    }
    None
}

/// Run `cases` inputs through `read` (which gets the case's file path), tallying and catching panics.
fn fuzz<E: std::error::Error + 'static>(
    reader_id: usize,
    name: &'static str,
    n: usize,
    mut make: impl FnMut(usize) -> (Vec<u8>, String),
    path: &Path,
    read: impl Fn(&Path) -> Result<(), E>,
) -> Tally {
    let mut t = Tally {
        name,
        cases: 0,
        ok: 0,
        err: 0,
        failures: Vec::new(),
    };
    LARGEST.store(0, Ordering::Relaxed);
    READER.store(reader_id, Ordering::Relaxed);
    for case in 0..n {
        let (bytes, what) = make(case);
        CASE.store(case, Ordering::Relaxed);
        std::fs::write(path, &bytes).unwrap();
        t.cases += 1;
        match std::panic::catch_unwind(AssertUnwindSafe(|| read(path))) {
            Ok(Ok(())) => t.ok += 1,
            Ok(Err(e)) => {
                t.err += 1;
                if let Some(bad) = check_error_text(&e) {
                    t.failures
                        .push(format!("{name} case {case} ({what}): {bad}"));
                }
            }
            Err(p) => {
                let msg = p
                    .downcast_ref::<String>()
                    .cloned()
                    .or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string()))
                    .unwrap_or_default();
                t.failures
                    .push(format!("{name} case {case} ({what}): panicked: {msg}"));
            }
        }
    }
    READER.store(usize::MAX, Ordering::Relaxed);
    let line = format!(
        "fuzz {name}: {} cases, {} ok, {} errors, {} failures, largest allocation {} bytes",
        t.cases,
        t.ok,
        t.err,
        t.failures.len(),
        LARGEST.load(Ordering::Relaxed)
    );
    println!("{line}");
    // The test harness hides a passing test's output: the counts also go to a report file.
    let report = Path::new(env!("CARGO_TARGET_TMPDIR")).join("fuzz_readers.txt");
    static FRESH: std::sync::Once = std::sync::Once::new();
    FRESH.call_once(|| {
        let _ = std::fs::remove_file(&report);
    });
    if let Ok(mut f) = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&report)
    {
        let _ = writeln!(f, "{line}");
    }
    t
}

fn assert_clean(tallies: &[Tally]) {
    let failures: Vec<&String> = tallies.iter().flat_map(|t| &t.failures).collect();
    for t in tallies {
        assert!(t.cases > 0, "{}: no cases", t.name);
    }
    // One example per kind of failure (the text with digits and the file name removed).
    let mut kinds = std::collections::BTreeMap::new();
    for f in &failures {
        let key: String = f
            .split_once("): ")
            .map(|x| x.1)
            .unwrap_or(f)
            .chars()
            .filter(|c| !c.is_ascii_digit())
            .take(90)
            .collect();
        kinds.entry(key).or_insert(f.as_str());
    }
    assert!(
        failures.is_empty(),
        "{} failing cases, {} kinds:\n{}",
        failures.len(),
        kinds.len(),
        kinds
            .values()
            .take(60)
            .copied()
            .collect::<Vec<_>>()
            .join("\n")
    );
}

fn lock() -> std::sync::MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(|e| e.into_inner())
}

// ---------------------------------------------------------------------------------------------- datasets

#[test]
fn fuzz_idx_and_cifar_readers() {
    let _g = lock();
    let tmp = tempfile::tempdir().unwrap();
    let fm = shared().join("data/fashion-mnist");
    let images = idx_prefix(&gunzip(&fm.join("t10k-images-idx3-ubyte.gz")), 16);
    let labels = idx_prefix(&gunzip(&fm.join("t10k-labels-idx1-ubyte.gz")), 16);
    let head: Boundaries = (0..=40).collect();
    let n = cases();
    let mut out = Vec::new();

    let mut r = rng("idx-images");
    let img_path = tmp.path().join("images-idx3-ubyte");
    let lab_path = tmp.path().join("labels-idx1-ubyte");
    std::fs::write(&lab_path, &labels).unwrap();
    let gz = gzip(&images);
    out.push(fuzz(
        0,
        "idx images (+ labels, every image read)",
        n,
        |c| {
            // A third of the cases mutate the gzipped file (the reader detects gzip by its magic).
            if c % 3 == 2 {
                let (m, w) = mutate(&gz, &[], c, &mut r);
                (m, format!("gzip: {w}"))
            } else {
                mutate(&images, &head, c, &mut r)
            }
        },
        &img_path,
        |p| -> Result<(), dino_data::error::Error> {
            let _ = dino_data::idx::read_idx(p)?;
            let ds = dino_data::idx::IdxDataset::open(p, Some(&lab_path))?;
            use dino_data::dataset::Dataset;
            for i in 0..ds.len() {
                ds.get(i)?;
                let _ = ds.label(i);
            }
            Ok(())
        },
    ));

    let mut r = rng("idx-labels");
    let img_ok = tmp.path().join("ok-images-idx3-ubyte");
    std::fs::write(&img_ok, &images).unwrap();
    let lab_mut = tmp.path().join("mut-labels-idx1-ubyte");
    out.push(fuzz(
        1,
        "idx labels",
        n / 2,
        |c| mutate(&labels, &head, c, &mut r),
        &lab_mut,
        |p| -> Result<(), dino_data::error::Error> {
            dino_data::idx::IdxDataset::open(&img_ok, Some(p)).map(|_| ())
        },
    ));

    let cifar_dir = tmp.path().join("cifar");
    std::fs::create_dir_all(&cifar_dir).unwrap();
    let src = shared().join("data/cifar10-test20");
    std::fs::copy(
        src.join("batches.meta.txt"),
        cifar_dir.join("batches.meta.txt"),
    )
    .unwrap();
    let batch = std::fs::read(src.join("test_batch.bin")).unwrap();
    let mut r = rng("cifar");
    let cb: Boundaries = (0..=8).chain([3072, 3073, 3074, 6146]).collect();
    out.push(fuzz(
        2,
        "cifar-10 binary batch (every image read)",
        n,
        |c| mutate(&batch, &cb, c, &mut r),
        &cifar_dir.join("test_batch.bin"),
        |p| -> Result<(), dino_data::error::Error> {
            use dino_data::dataset::Dataset;
            let ds = dino_data::cifar::CifarDataset::open_files(
                dino_data::cifar::CifarKind::Cifar10,
                &[p.to_path_buf()],
            )?;
            for i in 0..ds.len() {
                ds.get(i)?;
            }
            Ok(())
        },
    ));
    let mut r = rng("cifar-names");
    let names = std::fs::read(src.join("batches.meta.txt")).unwrap();
    std::fs::write(cifar_dir.join("test_batch.bin"), &batch).unwrap();
    out.push(fuzz(
        3,
        "cifar-10 class names (batches.meta.txt)",
        n / 4,
        |c| mutate(&names, &[], c, &mut r),
        &cifar_dir.join("batches.meta.txt"),
        |_| -> Result<(), dino_data::error::Error> {
            dino_data::cifar::CifarDataset::open_files(
                dino_data::cifar::CifarKind::Cifar10,
                &[cifar_dir.join("test_batch.bin")],
            )
            .map(|_| ())
        },
    ));
    assert_clean(&out);
}

/// Seeds for the image decoders: real PNG / JPEG files, and the same pixels re-encoded as BMP, GIF, TIFF and
/// WebP (every format the folder reader accepts).
fn image_seeds() -> Vec<(&'static str, Vec<u8>)> {
    let png = shared().join("data/cifar10-test20/png/cifar10_00_3.png");
    let png_bytes = std::fs::read(&png).unwrap();
    let img = image::load_from_memory(&png_bytes).unwrap().to_rgb8();
    let mut seeds = vec![
        ("png", png_bytes),
        (
            "jpg",
            std::fs::read(shared().join("data/photos/opencv_butterfly.jpg")).unwrap(),
        ),
    ];
    for (ext, fmt) in [
        ("bmp", image::ImageFormat::Bmp),
        ("gif", image::ImageFormat::Gif),
        ("tiff", image::ImageFormat::Tiff),
        ("webp", image::ImageFormat::WebP),
    ] {
        let mut c = std::io::Cursor::new(Vec::new());
        img.write_to(&mut c, fmt).unwrap();
        seeds.push((ext, c.into_inner()));
    }
    seeds
}

#[test]
fn fuzz_image_decoders() {
    let _g = lock();
    let tmp = tempfile::tempdir().unwrap();
    let mut out = Vec::new();
    for (i, (ext, seed)) in image_seeds().into_iter().enumerate() {
        let mut r = rng(ext);
        let head: Boundaries = (0..=64.min(seed.len())).collect();
        // The JPEG seed is a 44 KB photo: fewer cases keep the time in budget.
        let n = if ext == "jpg" {
            cases() / 4
        } else {
            cases() / 2
        };
        out.push(fuzz(
            10 + i,
            ext,
            n,
            |c| mutate(&seed, &head, c, &mut r),
            &tmp.path().join(format!("x.{ext}")),
            |p| dino_data::folder::load_rgb(p).map(|_| ()),
        ));
    }
    assert_clean(&out);
}

#[test]
fn image_folders_with_loops_odd_names_and_broken_files() {
    use std::os::unix::ffi::OsStrExt;
    let _g = lock();
    let tmp = tempfile::tempdir().unwrap();
    let png = shared().join("data/cifar10-test20/png/cifar10_00_3.png");
    let mk = |name: &str| {
        let d = tmp.path().join(name);
        std::fs::create_dir_all(&d).unwrap();
        d
    };
    // Symlink loops: a folder that links to itself twice (2^depth paths if followed blindly).
    let looped = mk("looped");
    std::fs::copy(&png, looped.join("a.png")).unwrap();
    std::os::unix::fs::symlink(".", looped.join("again")).unwrap();
    std::os::unix::fs::symlink("..", looped.join("up")).unwrap();
    std::os::unix::fs::symlink("again", looped.join("again2")).unwrap();
    let t = std::time::Instant::now();
    let f = dino_data::folder::ImageFolder::open(&looped).unwrap();
    assert_eq!(f.files().len(), 1, "{:?}", f.files());
    assert!(t.elapsed().as_secs() < 10, "took {:?}", t.elapsed());
    // A class layout whose class folder loops onto the root.
    let classes = mk("classes");
    let cat = classes.join("cat");
    std::fs::create_dir_all(&cat).unwrap();
    std::fs::copy(&png, cat.join("1.png")).unwrap();
    std::os::unix::fs::symlink("..", cat.join("root")).unwrap();
    let f = dino_data::folder::ImageFolder::open(&classes).unwrap();
    assert_eq!(f.files().len(), 1, "{:?}", f.files());
    // Non-UTF-8 names, empty and garbage "images", a folder named like an image, dangling links,
    // a FIFO named like an image: openable, and each bad file is an error naming it when read.
    let odd = mk("odd");
    let bad_name = std::ffi::OsStr::from_bytes(b"\xff\xfe-\x80.png");
    std::fs::copy(&png, odd.join(bad_name)).unwrap();
    std::fs::write(odd.join("empty.png"), b"").unwrap();
    std::fs::write(odd.join("text.jpg"), b"not a jpeg at all").unwrap();
    std::fs::create_dir_all(odd.join("dir.png")).unwrap();
    std::os::unix::fs::symlink("missing.png", odd.join("dangling.png")).unwrap();
    let fifo = std::ffi::CString::new(odd.join("pipe.png").as_os_str().as_bytes()).unwrap();
    // SAFETY: a valid NUL-terminated path.
    assert_eq!(unsafe { libc::mkfifo(fifo.as_ptr(), 0o644) }, 0);
    let f = dino_data::folder::ImageFolder::open(&odd).unwrap();
    use dino_data::dataset::Dataset;
    let mut good = 0;
    for i in 0..f.len() {
        match f.get(i) {
            Ok(_) => good += 1,
            Err(e) => {
                assert!(check_error_text(&e).is_none(), "{e}");
                assert!(e.to_string().contains(&*odd.to_string_lossy()), "{e}");
            }
        }
    }
    assert_eq!(good, 1, "{:?}", f.files());
    // Very deep nesting.
    let mut deep = mk("deep");
    for i in 0..200 {
        deep = deep.join(format!("d{i}"));
    }
    std::fs::create_dir_all(&deep).unwrap();
    std::fs::copy(&png, deep.join("x.png")).unwrap();
    assert_eq!(
        dino_data::folder::ImageFolder::open(tmp.path().join("deep"))
            .unwrap()
            .files()
            .len(),
        1
    );
}

// ---------------------------------------------------------------------------------------------- weights

fn safetensors_boundaries(b: &[u8]) -> Boundaries {
    let n = u64::from_le_bytes(b[..8].try_into().unwrap()) as usize;
    (0..=16).chain([n + 7, n + 8, n + 9, b.len() - 1]).collect()
}

/// Mutations aimed at a safetensors file: its JSON header edited (offsets, dtypes, shapes), its header length
/// made huge, NaN / Inf written into the data; otherwise generic.
fn mutate_safetensors(
    seed: &[u8],
    bounds: &[usize],
    c: usize,
    r: &mut ChaCha8Rng,
) -> (Vec<u8>, String) {
    if c < bounds.len() {
        return mutate(seed, bounds, c, r);
    }
    let n = u64::from_le_bytes(seed[..8].try_into().unwrap()) as usize;
    let header = String::from_utf8_lossy(&seed[8..8 + n]).into_owned();
    match r.random_range(0..6) {
        0 => {
            // A number in the header replaced by an edge value.
            let nums: Vec<(usize, usize)> = header
                .char_indices()
                .filter(|(_, ch)| ch.is_ascii_digit())
                .map(|(i, _)| i)
                .fold(Vec::new(), |mut v: Vec<(usize, usize)>, i| {
                    match v.last_mut() {
                        Some(last) if last.1 == i => last.1 = i + 1,
                        _ => v.push((i, i + 1)),
                    }
                    v
                });
            if nums.is_empty() {
                return mutate(seed, &[], c, r);
            }
            let (a, z) = nums[r.random_range(0..nums.len())];
            let v = [
                "0",
                "18446744073709551615",
                "4294967296",
                "99999999999",
                "-1",
                "1e309",
            ][r.random_range(0..6)];
            let h = format!("{}{}{}", &header[..a], v, &header[z..]);
            let mut out = (h.len() as u64).to_le_bytes().to_vec();
            out.extend_from_slice(h.as_bytes());
            out.extend_from_slice(&seed[8 + n..]);
            (out, format!("header number at {a} -> {v}"))
        }
        1 => {
            let dt =
                ["F64", "BF16", "I64", "U8", "BOOL", "F8_E4M3", "XYZ", ""][r.random_range(0..8)];
            let h = header.replacen("\"F32\"", &format!("\"{dt}\""), 1);
            let mut out = (h.len() as u64).to_le_bytes().to_vec();
            out.extend_from_slice(h.as_bytes());
            out.extend_from_slice(&seed[8 + n..]);
            (out, format!("first F32 dtype -> {dt}"))
        }
        2 => {
            let mut out = seed.to_vec();
            let v = [u64::MAX, 1 << 40, (seed.len() as u64) + 1, 0, 1][r.random_range(0..5)];
            out[..8].copy_from_slice(&v.to_le_bytes());
            (out, format!("header length {v}"))
        }
        3 if seed.len() > 8 + n + 4 => {
            // NaN / Inf / subnormal f32 patterns in the data.
            let mut out = seed.to_vec();
            let k = r.random_range(1..=16);
            for _ in 0..k {
                let i = 8 + n + 4 * r.random_range(0..(seed.len() - 8 - n) / 4);
                let v = [f32::NAN, f32::INFINITY, f32::NEG_INFINITY, 1e-45][r.random_range(0..4)];
                out[i..i + 4].copy_from_slice(&v.to_le_bytes());
            }
            (out, format!("{k} NaN/Inf values in the data"))
        }
        _ => mutate(seed, &[], c, r),
    }
}

#[test]
fn fuzz_weights_readers() {
    let _g = lock();
    let tmp = tempfile::tempdir().unwrap();
    let n = cases();
    let mut out = Vec::new();
    for (i, file) in [
        "clip_gradients.safetensors",
        "schedules_ema.safetensors",
        "dino_head_io.safetensors",
    ]
    .into_iter()
    .enumerate()
    {
        let seed = std::fs::read(shared().join("golden").join(file)).unwrap();
        let bounds = safetensors_boundaries(&seed);
        let mut r = rng(file);
        out.push(fuzz(
            20 + i,
            [
                "safetensors clip_gradients",
                "safetensors schedules_ema",
                "safetensors dino_head_io",
            ][i],
            n / 2,
            |c| mutate_safetensors(&seed, &bounds, c, &mut r),
            &tmp.path().join(file),
            |p| dino_models::weights::read_state_dict(p, "teacher").map(|_| ()),
        ));
    }

    // A Hugging Face layout file (names as transformers' ViTModel), read and mapped onto official names.
    let hf = hf_layout_file();
    let bounds = safetensors_boundaries(&hf);
    let mut r = rng("hf");
    out.push(fuzz(
        23,
        "safetensors in the Hugging Face layout (read + mapped)",
        n / 2,
        |c| mutate_safetensors(&hf, &bounds, c, &mut r),
        &tmp.path().join("model.safetensors"),
        |p| -> Result<(), dino_models::error::Error> {
            let (t, _, origin) = dino_models::weights::read_state_dict(p, "teacher")?;
            if dino_models::weights::is_hf_layout(t.keys()) {
                dino_models::weights::map_hf_vit(t, &origin)?;
            }
            Ok(())
        },
    ));

    // `.pth`: the checkpoint written by Python's own pickler (see dino-models' weights tests).
    let pth = std::fs::read(
        Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../dino-models/tests/fixtures/python_pickler_checkpoint.pth"),
    )
    .unwrap();
    let pth_bounds: Boundaries = (0..=64).chain([pth.len() - 22, pth.len() - 1]).collect();
    let mut r = rng("pth");
    out.push(fuzz(
        24,
        "pth zip-pickle",
        n,
        |c| mutate_pth(&pth, &pth_bounds, c, &mut r),
        &tmp.path().join("checkpoint.pth"),
        |p| dino_models::weights::read_state_dict(p, "teacher").map(|_| ()),
    ));
    let structural = pickle_structures();
    out.push(fuzz(
        25,
        "pth with deep / recursive pickles",
        structural.len(),
        |c| (zip_pickle(&structural[c].1), structural[c].0.clone()),
        &tmp.path().join("structural.pth"),
        |p| dino_models::weights::read_state_dict(p, "teacher").map(|_| ()),
    ));
    assert_clean(&out);
}

/// A small safetensors file in the Hugging Face ViT layout.
fn hf_layout_file() -> Vec<u8> {
    let dev = Device::Cpu;
    let d = 8;
    let mut m: BTreeMap<String, Tensor> = BTreeMap::new();
    let t = |s: &[usize]| {
        Tensor::arange(0f32, s.iter().product::<usize>() as f32, &dev)
            .unwrap()
            .reshape(s)
            .unwrap()
    };
    m.insert("vit.embeddings.cls_token".into(), t(&[1, 1, d]));
    m.insert("vit.embeddings.position_embeddings".into(), t(&[1, 5, d]));
    m.insert(
        "vit.embeddings.patch_embeddings.projection.weight".into(),
        t(&[d, 3, 2, 2]),
    );
    m.insert(
        "vit.embeddings.patch_embeddings.projection.bias".into(),
        t(&[d]),
    );
    for q in ["query", "key", "value"] {
        m.insert(
            format!("vit.encoder.layer.0.attention.attention.{q}.weight"),
            t(&[d, d]),
        );
        m.insert(
            format!("vit.encoder.layer.0.attention.attention.{q}.bias"),
            t(&[d]),
        );
    }
    m.insert(
        "vit.encoder.layer.0.attention.output.dense.weight".into(),
        t(&[d, d]),
    );
    m.insert("vit.layernorm.weight".into(), t(&[d]));
    m.insert("vit.pooler.dense.weight".into(), t(&[d, d]));
    let tmp = tempfile::NamedTempFile::new().unwrap();
    candle_core::safetensors::save(&m.into_iter().collect(), tmp.path()).unwrap();
    std::fs::read(tmp.path()).unwrap()
}

/// Offsets of the zip members of `b` (local headers `PK\x03\x04`).
fn zip_locals(b: &[u8]) -> Vec<usize> {
    (0..b.len().saturating_sub(4))
        .filter(|&i| b[i..i + 4] == *b"PK\x03\x04")
        .collect()
}

/// Mutations aimed at a torch zip: a member's declared sizes made huge, the pickle's bytes mutated in place
/// (the zip is STORED, so they are plain), or generic.
fn mutate_pth(seed: &[u8], bounds: &[usize], c: usize, r: &mut ChaCha8Rng) -> (Vec<u8>, String) {
    if c < bounds.len() {
        return mutate(seed, bounds, c, r);
    }
    let locals = zip_locals(seed);
    match r.random_range(0..4) {
        0 if !locals.is_empty() => {
            let mut b = seed.to_vec();
            let at = locals[r.random_range(0..locals.len())];
            let field = [18usize, 22, 26, 28][r.random_range(0..4)];
            let v = [u32::MAX, 0x7fff_ffff, 1 << 30][r.random_range(0..3)];
            let w = if field >= 26 { 2 } else { 4 };
            b[at + field..at + field + w].copy_from_slice(&v.to_le_bytes()[..w]);
            (b, format!("local header at {at}: field {field} = {v:#x}"))
        }
        1 => {
            // Inside data.pkl (which starts after the first local header's 30 + name bytes).
            let mut b = seed.to_vec();
            let start = 30 + u16::from_le_bytes([seed[26], seed[27]]) as usize;
            let size = u32::from_le_bytes(seed[18..22].try_into().unwrap()) as usize;
            let k = r.random_range(1..=4);
            for _ in 0..k {
                let i = start + r.random_range(0..size);
                b[i] = if r.random_bool(0.5) {
                    r.random()
                } else {
                    // A pickle opcode.
                    *b"(.0124GJKMNPQRSTUX]abcdeghijlopqrstu}\x80\x81\x85\x86\x87\x88\x89\x8a\x8c\x94\x95"
                        .get(r.random_range(0..46))
                        .unwrap_or(&b'.')
                };
            }
            (b, format!("{k} bytes of data.pkl changed"))
        }
        _ => mutate(seed, &[], c, r),
    }
}

/// A torch-style zip (`archive/data.pkl`, STORED) holding `pickle`, without storages.
fn zip_pickle(pickle: &[u8]) -> Vec<u8> {
    let tmp = tempfile::NamedTempFile::new().unwrap();
    {
        let mut z = zip::ZipWriter::new(std::fs::File::create(tmp.path()).unwrap());
        let o = zip::write::SimpleFileOptions::default()
            .compression_method(zip::CompressionMethod::Stored);
        z.start_file("archive/data.pkl", o).unwrap();
        z.write_all(pickle).unwrap();
        z.start_file("archive/version", o).unwrap();
        z.write_all(b"3\n").unwrap();
        z.finish().unwrap();
    }
    std::fs::read(tmp.path()).unwrap()
}

/// Pickles built to break a naive reader: very deep nesting, self-references through the memo, a huge
/// declared string length, and a `_rebuild_tensor_v2` with absurd sizes.
fn pickle_structures() -> Vec<(String, Vec<u8>)> {
    let mut v = Vec::new();
    for depth in [1_000usize, 100_000, 1_000_000] {
        // PROTO 2, then `depth` nested empty lists each appended to its parent.
        let mut p = vec![0x80, 2];
        p.extend(std::iter::repeat_n(b']', depth));
        p.extend(std::iter::repeat_n(b'a', depth - 1));
        p.push(b'.');
        v.push((format!("{depth} nested lists"), p));
        let mut p = vec![0x80, 2];
        p.extend(std::iter::repeat_n(b'(', depth));
        p.extend(std::iter::repeat_n(b't', depth));
        p.push(b'.');
        v.push((format!("{depth} nested tuples via MARK"), p));
        let mut p = vec![0x80, 2, b'}'];
        for _ in 0..depth {
            // dict[key] = {} nested: "X\x01\x00\x00\x00k}" ... closes with s.
            p.extend_from_slice(b"X\x01\x00\x00\x00k}");
        }
        p.extend(std::iter::repeat_n(b's', depth));
        p.push(b'.');
        v.push((format!("{depth} nested dicts"), p));
    }
    // A list that contains itself: EMPTY_LIST, BINPUT 0, BINGET 0, APPEND, STOP.
    v.push((
        "self-referencing list".into(),
        b"\x80\x02]q\x00h\x00a.".to_vec(),
    ));
    // A dict whose value is itself.
    v.push((
        "self-referencing dict".into(),
        b"\x80\x02}q\x00X\x01\x00\x00\x00kh\x00s.".to_vec(),
    ));
    // A string declaring 4 GiB.
    v.push((
        "BINUNICODE of 4 GiB declared".into(),
        b"\x80\x02X\xff\xff\xff\xffabc.".to_vec(),
    ));
    v.push((
        "BINBYTES8 of 2^62 declared".into(),
        b"\x80\x04\x8e\x00\x00\x00\x00\x00\x00\x00\x40abc.".to_vec(),
    ));
    // A memo get of an index never put; an empty stack popped.
    v.push(("BINGET of an unset memo".into(), b"\x80\x02h\x07.".to_vec()));
    v.push(("APPEND on an empty stack".into(), b"\x80\x02a.".to_vec()));
    v.push(("STOP only".into(), b".".to_vec()));
    v.push(("empty".into(), Vec::new()));
    v
}

// ---------------------------------------------------------------------------------------------- training files

fn tiny_checkpoint(dir: &Path) -> PathBuf {
    use dino_train::checkpoint::*;
    let cfg = dino_train::TrainConfig::default_preset();
    let meta = CheckpointMeta {
        epoch: 1,
        global_iteration: 7,
        niter_per_ep: 7,
        last_loss: 3.5,
        config: cfg,
        rng: RngState {
            seed: 0,
            next_global_iteration: 7,
            next_epoch: 1,
            next_iteration: 0,
            scheme: "s".into(),
        },
        dataset: DatasetFingerprint {
            description: "d".into(),
            len: 10,
            hash: "00".into(),
        },
        versions: Versions::default(),
        extensions: Vec::new(),
        epoch_sums: None,
        compute: Some(Compute {
            device: "cpu".into(),
            cpu: "c".into(),
            cpu_flags: vec!["avx2".into()],
            products: "f32: p".into(),
            kernels: "auto".into(),
            threads: 2,
            ranks: 1,
        }),
        knn_baselines: Some(KnnBaselines {
            eval: "e".into(),
            init: Some(Accuracy {
                top1: 10.0,
                top5: 50.0,
            }),
            pixels: None,
        }),
    };
    let dev = Device::Cpu;
    let tensors = vec![
        (
            "student.backbone.cls_token".to_string(),
            Tensor::arange(0f32, 8., &dev)
                .unwrap()
                .reshape((1, 1, 8))
                .unwrap(),
        ),
        (
            "optimizer.step".to_string(),
            Tensor::new(&[3f64], &dev)
                .unwrap()
                .to_dtype(DType::F64)
                .unwrap(),
        ),
    ];
    save(dir, LATEST, &tensors, &meta).unwrap();
    weights_path(dir, LATEST)
}

#[test]
fn fuzz_training_files() {
    let _g = lock();
    let tmp = tempfile::tempdir().unwrap();
    let n = cases();
    let mut out = Vec::new();

    let ck = tiny_checkpoint(tmp.path());
    let seed = std::fs::read(&ck).unwrap();
    let bounds = safetensors_boundaries(&seed);
    let mut r = rng("checkpoint");
    out.push(fuzz(
        30,
        "checkpoint (safetensors + embedded JSON metadata)",
        n,
        |c| mutate_safetensors(&seed, &bounds, c, &mut r),
        &tmp.path().join("fuzzed.safetensors"),
        |p| dino_train::checkpoint::load(p, &Device::Cpu).map(|_| ()),
    ));

    let json = std::fs::read(dino_train::checkpoint::meta_path(tmp.path(), "checkpoint")).unwrap();
    let mut r = rng("checkpoint-json");
    out.push(fuzz(
        31,
        "checkpoint JSON (checkpoint.json)",
        n / 2,
        |c| mutate(&json, &[], c, &mut r),
        &tmp.path().join("fuzzed.json"),
        |p| -> Result<(), serde_json::Error> {
            serde_json::from_slice::<dino_train::checkpoint::CheckpointMeta>(
                &std::fs::read(p).unwrap(),
            )
            .map(|_| ())
        },
    ));

    let mut tomls: Vec<Vec<u8>> = ["default", "official", "small", "cifar"]
        .iter()
        .filter_map(|p| dino_train::TrainConfig::preset(p).ok())
        .map(|c| c.to_toml_string().into_bytes())
        .collect();
    tomls.push(
        b"arch = \"vit_tiny\"\nlr = 0.002\nepochs = 3\n[extra]\nx = [1, 2, {a = 3}]\n".to_vec(),
    );
    let mut r = rng("toml");
    out.push(fuzz(
        32,
        "TOML configuration (parsed + validated)",
        n,
        |c| {
            let s = &tomls[c % tomls.len()];
            if r.random_bool(0.3) {
                // A value replaced by an edge value.
                let text = String::from_utf8_lossy(s).into_owned();
                let lines: Vec<&str> = text.lines().collect();
                let i = r.random_range(0..lines.len());
                let key = lines[i].split('=').next().unwrap_or("").trim();
                let v = [
                    "nan",
                    "inf",
                    "-1",
                    "1e309",
                    "18446744073709551616",
                    "\"\"",
                    "[]",
                    "0",
                    "\"\\uD800\"",
                ][r.random_range(0..9)];
                let mut l: Vec<String> = lines.iter().map(|s| s.to_string()).collect();
                l[i] = format!("{key} = {v}");
                (l.join("\n").into_bytes(), format!("line {i}: {key} = {v}"))
            } else {
                mutate(s, &[], c, &mut r)
            }
        },
        &tmp.path().join("config.toml"),
        |p| -> Result<(), dino_train::Error> {
            dino_train::TrainConfig::from_toml_file(p)?.validate()
        },
    ));

    let refs = [
        "hf:facebook/dino-vits16",
        "hf:facebook/dino-vitb8/pytorch_model.bin",
        "hf:owner/name/dir/model.safetensors",
    ];
    let mut r = rng("hf-ref");
    let refs_dir = tmp.path().join("refs");
    out.push(fuzz(
        33,
        "hf: references",
        n,
        |c| mutate(refs[c % refs.len()].as_bytes(), &[], c, &mut r),
        &refs_dir,
        |p| -> Result<(), dino_models::error::Error> {
            let s = String::from_utf8_lossy(&std::fs::read(p).unwrap()).into_owned();
            if let Some(h) = dino_models::hub::HubRef::parse(&s)? {
                let _ = h.repo_id();
                let _ = dino_models::hub::repo_cache_folder(Path::new("/nonexistent"), &h);
            }
            Ok(())
        },
    ));
    assert_clean(&out);
}
