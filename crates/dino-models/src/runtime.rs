//! Process-level settings for training speed (called once by the `dino` binary, the examples and benches;
//! re-exported as `dino_train::runtime`): glibc's allocation thresholds, a global allocator that aligns
//! large blocks to cache lines and offers them transparent huge pages, and the main thread as a thread of
//! rayon's global pool.

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicUsize, Ordering};

/// Keep freed memory in the process instead of handing it back to the kernel.
///
/// A training step frees and reallocates tens of megabytes of activations and gradients per op. With glibc's
/// defaults every allocation above 128 KiB-32 MiB is a fresh `mmap` (page faults, zeroing) and every free a
/// `munmap` (TLB shootdowns): on 2 cores that was 15% of the step in the kernel. This sets glibc's mmap threshold
/// to its 32 MiB maximum, serves larger blocks from the heap too (`M_MMAP_MAX` 0) and stops trimming the heap (`M_TRIM_THRESHOLD`, `M_TOP_PAD`). Measured on
/// `step/cifar/4096`: 5.5 s -> 4.6 s per step, kernel time 6.2 s -> 2.4 s per run, peak RSS unchanged
/// (2.65 GiB). A no-op on other platforms and allocators. Call it before the first large allocation.
pub fn tune_allocator() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only changes glibc's allocation thresholds; it is called before any worker thread.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 32 << 20);
        // Larger blocks (the cifar MLP activations are 45 MB) would still be mmapped: serve them from the heap.
        libc::mallopt(libc::M_MMAP_MAX, 0);
        // -1: never trim the heap top (any positive value is capped at 2 GiB, below a cifar step's heap).
        libc::mallopt(libc::M_TRIM_THRESHOLD, -1);
        libc::mallopt(libc::M_TOP_PAD, 256 << 20);
    }
}

/// Builds rayon's global pool (`RAYON_NUM_THREADS` threads, else one per core) with the calling thread as its
/// thread 0; returns false, and changes nothing, when the global pool already exists. Call it early in `main`,
/// before any parallel op and after whatever sets `RAYON_NUM_THREADS` (the `dino` binary: `dist::init`).
///
/// The ops split their work over the global pool. From a thread outside the pool every split hands its work
/// to the pool's threads and sleeps until one of them wakes it: a futex wait and wake per op, thousands per
/// training step, and a third runnable thread beside the pool's two on a 2-core machine. As thread 0 the main
/// thread works on its own split while the other threads steal the rest. The step stays on the main thread and
/// its tensors in glibc's main heap: running it on another pool thread instead was as fast but put them in
/// per-thread arenas of 64 MiB heaps, where the cifar/4096 bf16 step's peak RSS rose from 2.3 to 4.3 GiB in
/// some runs (docs/PERFORMANCE-LOG.md, twenty-fourth session). Measured on the Intel Xeon with AMX (family 6 model
/// 167), interleaved pairs against the pool without the main thread: bf16 imagenet/4096 1.04-1.09x, cifar/4096
/// 0.98-1.14x, imagenet/65536 1.06-1.09x, cifar/65536 0.91-1.07x; f32 1.00-1.10x; peak RSS unchanged.
///
/// Between two ops the other threads look for work for 1 ms before they sleep (the workspace's patched
/// rayon-core, `DINO_RAYON_SPIN_US`; vendor/rayon-core/DINO-RS-PATCH.md), so that the next op finds them awake.
pub fn main_thread_in_pool() -> bool {
    rayon::ThreadPoolBuilder::new()
        .use_current_thread()
        .build_global()
        .is_ok()
}

/// Blocks of at least this many bytes get [`TensorAlloc`]'s 64-byte alignment.
pub const CACHE_ALIGNED_MIN_BYTES: usize = 16 << 10;

/// Alignment [`TensorAlloc`] gives large blocks: a cache line, the width of an AVX-512 vector and of an AMX
/// tile row.
pub const CACHE_LINE: usize = 64;

/// Blocks of at least this many bytes are offered transparent huge pages by [`TensorAlloc`] (their 2 MiB-aligned
/// interior, which a block of 4 MiB always has).
pub const HUGE_PAGE_MIN_BYTES: usize = 4 << 20;

/// Size of a transparent huge page on x86_64 and aarch64 with 4 KiB base pages.
const HUGE_PAGE: usize = 2 << 20;

/// The system allocator tuned for tensor buffers: every block of [`CACHE_ALIGNED_MIN_BYTES`] or more aligned
/// to [`CACHE_LINE`] bytes, and on Linux every block of [`HUGE_PAGE_MIN_BYTES`] or more marked
/// `MADV_HUGEPAGE`. Install it in a binary with `#[global_allocator] static A: TensorAlloc = TensorAlloc;`.
///
/// - Alignment: glibc aligns a `malloc` block to 16 bytes, so the rows of a tensor's buffer (a `Vec<f32>`)
///   start mid-line: every 64-byte vector load or store of a kernel then touches two cache lines, and every
///   64-byte row an AMX tile store writes is two partial-line writes. Aligned, they are whole lines. Measured
///   on the Intel Xeon with AMX (family 6 model 207, docs/PERFORMANCE-LOG.md, twentieth session): the bf16
///   `step/cifar/4096` ran 44.8-51.4 -> 51.8-57.8 images/s in 3 interleaved pairs; the f32 step (gemm packs its
///   own buffers) was unchanged.
/// - Huge pages: a step streams gigabytes of activations through 4 KiB pages, a TLB miss (a two-level walk in
///   a VM) every 64 cache lines. Where the kernel's THP mode is `madvise` (the default of many
///   distributions) only marked ranges get 2 MiB pages; `always` needs no mark, `never` ignores it. Measured
///   on the same Xeon, bf16 `step/cifar/4096`, 8 interleaved pairs against the aligned-only allocator: median
///   ratio 1.05 (0.70-1.18: that VM swings by 1.5x within minutes); 2.2 of the step's 2.9 GB resident on huge
///   pages, 123 mappings.
///
/// Results do not depend on either: no kernel needs the alignment or the page size, only runs faster with them.
///
/// It also counts the bytes it has handed out in blocks of [`COUNTED_MIN_BYTES`] or more and not got back,
/// and their peak ([`allocated_bytes`], [`peak_allocated_bytes`]): the figures a training run's memory
/// estimate is made of.
#[derive(Clone, Copy, Debug, Default)]
pub struct TensorAlloc;

/// Blocks of at least this many bytes are counted by [`TensorAlloc`]: tensor buffers. The smaller ones, nine
/// in ten of a training step's ~50,000 allocations (`step/cifar/4096`), go uncounted and pay no atomic.
pub const COUNTED_MIN_BYTES: usize = 4 << 10;

/// Bytes in counted blocks [`TensorAlloc`] has handed out and not got back (the requested sizes).
static LIVE_BYTES: AtomicUsize = AtomicUsize::new(0);
/// The largest [`LIVE_BYTES`] seen since the start or the last [`reset_peak_allocated`].
static PEAK_BYTES: AtomicUsize = AtomicUsize::new(0);

fn count_alloc(bytes: usize) {
    if bytes >= COUNTED_MIN_BYTES {
        let now = LIVE_BYTES.fetch_add(bytes, Ordering::Relaxed) + bytes;
        PEAK_BYTES.fetch_max(now, Ordering::Relaxed);
    }
}

fn count_free(bytes: usize) {
    if bytes >= COUNTED_MIN_BYTES {
        LIVE_BYTES.fetch_sub(bytes, Ordering::Relaxed);
    }
}

/// Bytes the process holds through [`TensorAlloc`] now, in blocks of [`COUNTED_MIN_BYTES`] or more; `None`
/// where it is not the global allocator (nothing was ever counted).
pub fn allocated_bytes() -> Option<usize> {
    Some(LIVE_BYTES.load(Ordering::Relaxed)).filter(|&b| b > 0)
}

/// The most bytes held through [`TensorAlloc`] at once, as [`allocated_bytes`] counts them, since the start
/// or the last [`reset_peak_allocated`]; `None` as for [`allocated_bytes`].
pub fn peak_allocated_bytes() -> Option<usize> {
    allocated_bytes()?;
    Some(PEAK_BYTES.load(Ordering::Relaxed))
}

/// Starts a new peak for [`peak_allocated_bytes`] at the bytes held now.
pub fn reset_peak_allocated() {
    PEAK_BYTES.store(LIVE_BYTES.load(Ordering::Relaxed), Ordering::Relaxed);
}

impl TensorAlloc {
    /// The layout a request is served with: `layout` itself, or for a large block the same size aligned to
    /// [`CACHE_LINE`]. A function of the request alone, so that `dealloc` hands the system the layout
    /// `alloc` used.
    fn served(layout: Layout) -> Layout {
        if layout.size() >= CACHE_ALIGNED_MIN_BYTES && layout.align() < CACHE_LINE {
            // A size of at least 16 KiB with a power-of-two alignment of 64 is always a valid layout.
            Layout::from_size_align(layout.size(), CACHE_LINE).unwrap_or(layout)
        } else {
            layout
        }
    }
}

// SAFETY: every block comes from `System` with `served(layout)`, which is at least as large and as aligned
// as the request, and goes back to `System` with the same `served(layout)` (a function of the layout the
// caller passes, which GlobalAlloc requires to be the one it allocated with).
unsafe impl GlobalAlloc for TensorAlloc {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        counted(
            advise_huge_pages(System.alloc(Self::served(layout)), layout.size()),
            layout.size(),
        )
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        counted(
            advise_huge_pages(System.alloc_zeroed(Self::served(layout)), layout.size()),
            layout.size(),
        )
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        count_free(layout.size());
        System.dealloc(ptr, Self::served(layout))
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        let p = self.realloc_uncounted(ptr, layout, new_size);
        if !p.is_null() {
            count_free(layout.size());
            count_alloc(new_size);
        }
        p
    }
}

impl TensorAlloc {
    /// `realloc` without the byte counts.
    ///
    /// # Safety
    /// As [`GlobalAlloc::realloc`].
    unsafe fn realloc_uncounted(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        let old = Self::served(layout);
        // SAFETY (from_size_align_unchecked): GlobalAlloc::realloc requires new_size, rounded up to
        // layout's alignment, not to overflow isize.
        let new = Self::served(Layout::from_size_align_unchecked(new_size, layout.align()));
        if old.align() == new.align() {
            // Both small or both large: the system's realloc keeps the alignment it was asked for.
            return advise_huge_pages(System.realloc(ptr, old, new_size), new_size);
        }
        // Crossing the threshold: a fresh block with the new alignment, the contents moved over.
        let fresh = System.alloc(new);
        if !fresh.is_null() {
            std::ptr::copy_nonoverlapping(ptr, fresh, layout.size().min(new_size));
            System.dealloc(ptr, old);
        }
        advise_huge_pages(fresh, new_size)
    }
}

/// `p` (null: a failed allocation, not counted) after counting `bytes` handed out.
fn counted(p: *mut u8, bytes: usize) -> *mut u8 {
    if !p.is_null() {
        count_alloc(bytes);
    }
    p
}

/// Marks the 2 MiB-aligned interior of a block of `size` bytes at `p` (null: none) `MADV_HUGEPAGE` when the
/// block is large enough; returns `p`. Failure (a kernel without THP) changes nothing and is ignored.
fn advise_huge_pages(p: *mut u8, size: usize) -> *mut u8 {
    #[cfg(target_os = "linux")]
    if !p.is_null() && size >= HUGE_PAGE_MIN_BYTES {
        let start = (p as usize).next_multiple_of(HUGE_PAGE);
        let end = (p as usize + size) / HUGE_PAGE * HUGE_PAGE;
        if end > start {
            // SAFETY: [start, end) lies inside the block just allocated; MADV_HUGEPAGE only changes how
            // the kernel backs those pages, never their contents.
            unsafe { libc::madvise(start as *mut libc::c_void, end - start, libc::MADV_HUGEPAGE) };
        }
    }
    p
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The allocator's byte counts are the process's: the tests that allocate through it take turns.
    static SERIAL: std::sync::Mutex<()> = std::sync::Mutex::new(());

    fn turn() -> std::sync::MutexGuard<'static, ()> {
        SERIAL.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Every byte handed out in a block of `COUNTED_MIN_BYTES` or more is counted until it comes back,
    /// through `realloc` too (both ways across that size), and the peak follows; smaller blocks are not.
    #[test]
    fn counts_the_bytes_it_holds_and_their_peak() {
        let _turn = turn();
        let a = TensorAlloc;
        let live = || LIVE_BYTES.load(Ordering::Relaxed);
        let base = live();
        let l = Layout::from_size_align(1 << 20, 4).unwrap();
        let p = unsafe { a.alloc(l) };
        assert_eq!(live() - base, 1 << 20);
        assert_eq!(allocated_bytes(), Some(base + (1 << 20)));
        reset_peak_allocated();
        assert_eq!(peak_allocated_bytes(), Some(base + (1 << 20)));
        let q = unsafe { a.realloc(p, l, 3 << 20) };
        assert_eq!(live() - base, 3 << 20);
        let small = unsafe { a.realloc(q, Layout::from_size_align(3 << 20, 4).unwrap(), 100) };
        assert_eq!(live(), base);
        let back = unsafe { a.realloc(small, Layout::from_size_align(100, 4).unwrap(), 8192) };
        assert_eq!(live() - base, 8192);
        let z = unsafe { a.alloc_zeroed(l) };
        assert_eq!(live() - base, 8192 + (1 << 20));
        unsafe { a.dealloc(z, l) };
        unsafe { a.dealloc(back, Layout::from_size_align(8192, 4).unwrap()) };
        assert_eq!(live(), base);
        let tiny = Layout::from_size_align(COUNTED_MIN_BYTES - 1, 4).unwrap();
        let t = unsafe { a.alloc(tiny) };
        assert_eq!(live(), base);
        unsafe { a.dealloc(t, tiny) };
        assert_eq!(live(), base);
        // The peak was the 3 MiB block (read directly: with nothing held, `peak_allocated_bytes` may say
        // nothing is counted).
        assert_eq!(PEAK_BYTES.load(Ordering::Relaxed), base + (3 << 20));
    }

    /// Large blocks are cache-line aligned, whatever their requested alignment; small ones keep the system's.
    #[test]
    fn large_blocks_are_cache_line_aligned() {
        let _turn = turn();
        let a = TensorAlloc;
        for size in [
            CACHE_ALIGNED_MIN_BYTES,
            CACHE_ALIGNED_MIN_BYTES + 4,
            3 << 20,
        ] {
            for align in [1, 4, 16] {
                let l = Layout::from_size_align(size, align).unwrap();
                // Several blocks, so that one aligned by chance does not pass the test.
                let ptrs: Vec<_> = (0..8).map(|_| unsafe { a.alloc(l) }).collect();
                for &p in &ptrs {
                    assert!(!p.is_null());
                    assert_eq!(p as usize % CACHE_LINE, 0, "{size} bytes, align {align}");
                    unsafe { p.write_bytes(0xa5, size) };
                }
                for p in ptrs {
                    unsafe { a.dealloc(p, l) };
                }
            }
        }
        let l = Layout::from_size_align(CACHE_ALIGNED_MIN_BYTES - 4, 4).unwrap();
        assert_eq!(TensorAlloc::served(l), l);
        // An alignment above a cache line is the caller's and is kept.
        let l = Layout::from_size_align(1 << 20, 4096).unwrap();
        let p = unsafe { a.alloc(l) };
        assert_eq!(p as usize % 4096, 0);
        unsafe { a.dealloc(p, l) };
    }

    /// A block of at least [`HUGE_PAGE_MIN_BYTES`] lies in a mapping marked `MADV_HUGEPAGE` (`hg` in its
    /// `/proc/self/smaps` flags), a small one does not get the mark from this allocator.
    #[cfg(target_os = "linux")]
    #[test]
    fn large_blocks_are_marked_for_huge_pages() {
        let _turn = turn();
        if !std::path::Path::new("/sys/kernel/mm/transparent_hugepage").exists() {
            eprintln!("NOT RUN: this kernel has no transparent huge pages");
            return;
        }
        // The VmFlags of the mapping that holds address `a`.
        let flags = |a: usize| -> String {
            let smaps = std::fs::read_to_string("/proc/self/smaps").unwrap();
            let mut inside = false;
            for line in smaps.lines() {
                let head = line.split_whitespace().next().unwrap_or("");
                if let Some((lo, hi)) = head.split_once('-') {
                    if let (Ok(lo), Ok(hi)) =
                        (usize::from_str_radix(lo, 16), usize::from_str_radix(hi, 16))
                    {
                        inside = lo <= a && a < hi;
                        continue;
                    }
                }
                if inside {
                    if let Some(f) = line.strip_prefix("VmFlags:") {
                        return f.to_string();
                    }
                }
            }
            panic!("no mapping holds {a:#x}")
        };
        let a = TensorAlloc;
        let l = Layout::from_size_align(HUGE_PAGE_MIN_BYTES * 2, 4).unwrap();
        let p = unsafe { a.alloc(l) };
        assert!(!p.is_null());
        let mid = (p as usize + l.size() / 2) / HUGE_PAGE * HUGE_PAGE;
        let f = flags(mid);
        assert!(f.split_whitespace().any(|x| x == "hg"), "flags {f}");
        unsafe { a.dealloc(p, l) };
    }

    /// `alloc_zeroed` zeroes, and `realloc` keeps the contents across the threshold both ways, aligned once
    /// large.
    #[test]
    fn zeroed_and_realloc_keep_contents() {
        let _turn = turn();
        let a = TensorAlloc;
        let big = Layout::from_size_align(CACHE_ALIGNED_MIN_BYTES * 2, 4).unwrap();
        let z = unsafe { a.alloc_zeroed(big) };
        assert_eq!(z as usize % CACHE_LINE, 0);
        assert!(unsafe { std::slice::from_raw_parts(z, big.size()) }
            .iter()
            .all(|&b| b == 0));
        unsafe { a.dealloc(z, big) };

        let small = Layout::from_size_align(1000, 4).unwrap();
        let p = unsafe { a.alloc(small) };
        let fill =
            |p: *mut u8, n: usize| (0..n).for_each(|i| unsafe { *p.add(i) = (i * 7 % 251) as u8 });
        let check =
            |p: *const u8, n: usize| (0..n).all(|i| unsafe { *p.add(i) } == (i * 7 % 251) as u8);
        fill(p, 1000);
        // Small -> large: aligned, the first 1000 bytes kept.
        let q = unsafe { a.realloc(p, small, big.size()) };
        assert_eq!(q as usize % CACHE_LINE, 0);
        assert!(check(q, 1000));
        fill(q, big.size());
        // Large -> larger (same alignment class), then large -> small.
        let bigger = big.size() * 4;
        let r = unsafe { a.realloc(q, big, bigger) };
        assert_eq!(r as usize % CACHE_LINE, 0);
        assert!(check(r, big.size()));
        let s = unsafe { a.realloc(r, Layout::from_size_align(bigger, 4).unwrap(), 500) };
        assert!(check(s, 500));
        unsafe { a.dealloc(s, Layout::from_size_align(500, 4).unwrap()) };
    }
}
