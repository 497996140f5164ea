//! The bf16 GEMM behind [`MatmulPrecision::Bf16`]: f32 operands rounded to bfloat16 (round to nearest even),
//! products summed in f32 by the AVX-512 BF16 instruction `vdpbf16ps`, which does twice the multiply-adds per
//! cycle of an f32 FMA on the same vector width (per core: 460 against 237 GFLOP/s on this project's Zen 5
//! machines, 234 against 117 on its Zen 4 ones). This is the arithmetic of
//! `torch.set_float32_matmul_precision("medium")` on a CPU with bf16 support, with f32 outputs.
//!
//! Operands are packed once per call, straight from f32:
//! - the left operand `(m, k)` either as rows of k-pairs (`pack_rows`, a row-major input; row-major bf16 rows
//!   of an even k, a producer's bf16 output, are their own pair packing and are read in place) or as panels of
//!   [`MR`] rows (`pack_kn` from its transpose), each entry a `u32` holding the bf16 pair `(a[i][2p], a[i][2p+1])`;
//! - the right operand `(k, n)` as panels of [`NR`] columns, each row of a panel the pairs
//!   `(b[2p][j], b[2p+1][j])` of [`NR`] columns (`pack_nk` when `b` is stored transposed, `pack_kn` otherwise).
//!
//! An odd `k` is padded with a zero pair half, and columns past `n` with zeros. The micro-kernel keeps an
//! `MR x NR` = 12 x 32 tile in 24 vector registers.
//!
//! On CPUs with Intel AMX the right-operand packings feed [`crate::amx`]'s tile kernel instead, with k padded
//! by zero pairs to a multiple of 16; its left operand is packed in tiles ([`pack_tiles`], [`LhsT`]).

use rayon::prelude::*;

use crate::fused::MatmulPrecision;

/// Rows of the micro-kernel's tile.
pub(crate) const MR: usize = 12;
/// Columns of the micro-kernel's tile (two 16-lane vectors).
pub(crate) const NR: usize = 32;
/// k-pairs per cache block (512 values of k: a panel's slice, 32 KiB, stays in L1 across a row block).
const KC: usize = 256;
/// Rows per cache block of the left operand (its `MC x 2*KC` bf16 slice, 192 KiB, stays in L2).
const MC: usize = 192;

/// Whether this CPU has the instructions of the bf16 GEMM (AVX-512 F, BW, VL and BF16).
pub fn supported() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::arch::is_x86_feature_detected!("avx512f")
            && std::arch::is_x86_feature_detected!("avx512bw")
            && std::arch::is_x86_feature_detected!("avx512vl")
            && std::arch::is_x86_feature_detected!("avx512bf16")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// `x` rounded to the nearest bfloat16 (ties to even), as the bf16 bit pattern. NaN stays NaN.
pub(crate) fn to_bf16_bits(x: f32) -> u16 {
    let b = x.to_bits();
    if x.is_nan() {
        return ((b >> 16) | 0x40) as u16;
    }
    ((b + 0x7fff + ((b >> 16) & 1)) >> 16) as u16
}

/// The f32 value of bf16 bit pattern `b` (exact).
#[inline(always)]
pub(crate) fn widen(b: u16) -> f32 {
    f32::from_bits((b as u32) << 16)
}

/// `x` rounded to the nearest bfloat16 (ties to even), back in f32.
pub fn round_bf16(x: f32) -> f32 {
    widen(to_bf16_bits(x))
}

/// A row-major matrix operand of the bf16 products: f32 values, or bf16 bit patterns (a tensor a producer
/// stored in bf16 because every consumer rounds it to bf16 anyway; packing it rounds nothing).
#[derive(Clone, Copy, Debug)]
pub(crate) enum Rows<'a> {
    /// f32 values, rounded to bf16 when packed.
    F32(&'a [f32]),
    /// bf16 bit patterns, packed as they are.
    Bf16(&'a [u16]),
}

impl<'a> Rows<'a> {
    /// The operand from element `start` on.
    pub(crate) fn from(self, start: usize) -> Rows<'a> {
        match self {
            Rows::F32(s) => Rows::F32(&s[start..]),
            Rows::Bf16(s) => Rows::Bf16(&s[start..]),
        }
    }

    /// The number of elements.
    pub(crate) fn len(self) -> usize {
        match self {
            Rows::F32(s) => s.len(),
            Rows::Bf16(s) => s.len(),
        }
    }

    /// Elements `range` as f32 (bf16 widened exactly), borrowed when they are f32 already.
    pub(crate) fn to_f32(self, range: std::ops::Range<usize>) -> std::borrow::Cow<'a, [f32]> {
        match self {
            Rows::F32(s) => std::borrow::Cow::Borrowed(&s[range]),
            Rows::Bf16(s) => std::borrow::Cow::Owned(s[range].iter().map(|&b| widen(b)).collect()),
        }
    }
}

/// `n` bf16 values that the caller writes in full (as bit patterns, through [`bf16_bits_mut`]) before any is
/// read.
#[allow(clippy::uninit_vec)]
pub(crate) fn uninit_bf16(n: usize) -> Vec<half::bf16> {
    let mut v = Vec::with_capacity(n);
    // SAFETY: the capacity is n, bf16 has no invalid bit patterns, and every caller writes all n values.
    unsafe { v.set_len(n) };
    v
}

/// The bit patterns of bf16 values.
pub(crate) fn bf16_bits(v: &[half::bf16]) -> &[u16] {
    // SAFETY: half::bf16 is a repr(transparent) u16.
    unsafe { std::slice::from_raw_parts(v.as_ptr() as *const u16, v.len()) }
}

/// The bit patterns of bf16 values, writable.
pub(crate) fn bf16_bits_mut(v: &mut [half::bf16]) -> &mut [u16] {
    // SAFETY: half::bf16 is a repr(transparent) u16.
    unsafe { std::slice::from_raw_parts_mut(v.as_mut_ptr() as *mut u16, v.len()) }
}

/// `dst[i]` = `src[i]` rounded to bf16 (ties to even), the rounding of every bf16 packing here.
pub(crate) fn round_to_bf16(src: &[f32], dst: &mut [u16]) {
    assert_eq!(src.len(), dst.len(), "round_to_bf16: lengths differ");
    #[cfg(target_arch = "x86_64")]
    if supported() {
        // SAFETY: the CPU has AVX-512 F, BW, VL and BF16 (checked just above); equal lengths (asserted).
        return unsafe { x86::round_row(src, dst) };
    }
    dst.iter_mut()
        .zip(src)
        .for_each(|(d, &v)| *d = to_bf16_bits(v));
}

/// When [`MatmulPrecision::Bf16`] products take a bf16 kernel (AMX tiles or `vdpbf16ps`) rather than the f32
/// GEMM.
///
/// bf16 is a permission to trade precision for speed, as PyTorch's "medium" matmul precision, which uses bf16
/// only where a fast kernel exists. `vdpbf16ps` does twice the f32 FMA's work per cycle on AMD Zen 4 and Zen 5,
/// but half of it on the Intel Xeons that serve this project (family 6 model 207: 85 against 171 GFLOP/s per
/// core, `bench_step --case ceiling`), where the bf16 step ran 1.3-1.8x slower than the f32 one.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Bf16Gemm {
    /// The AMX kernel where the CPU and OS offer AMX ([`crate::amx::available`]); else `vdpbf16ps` where the
    /// CPU runs it at least [`MIN_SPEEDUP`] times its f32 FMA rate, measured once per process by the
    /// register-only loops of [`crate::cpu::Ceiling`] (7 ms on this project's Intel Xeon). The default.
    Auto,
    /// The `vdpbf16ps` kernel wherever the CPU has AVX-512 BF16, even with AMX (tests and benchmarks of the
    /// kernel; `DINO_BF16_GEMM=dpbf16`).
    Always,
    /// The AMX kernel wherever available, else f32 (`DINO_BF16_GEMM=amx`).
    Amx,
    /// Never: bf16 requests run in f32 (`DINO_BF16_GEMM=f32`).
    Never,
}

/// How much faster than the f32 FMA `vdpbf16ps` must run for [`Bf16Gemm::Auto`] to take it (packing the
/// operands to bf16 costs a pass over them).
pub const MIN_SPEEDUP: f64 = 1.25;

impl std::str::FromStr for Bf16Gemm {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s.trim().to_ascii_lowercase().as_str() {
            "auto" => Ok(Self::Auto),
            "dpbf16" | "always" => Ok(Self::Always),
            "amx" => Ok(Self::Amx),
            "f32" | "never" => Ok(Self::Never),
            other => Err(format!("`{other}`: expected auto, amx, dpbf16 or f32")),
        }
    }
}

thread_local! {
    pub(crate) static THREAD_MODE: std::cell::Cell<Option<Bf16Gemm>> = const { std::cell::Cell::new(None) };
}

/// The mode in force on this thread: [`with_bf16_gemm`]'s, else `DINO_BF16_GEMM` (read once; an unknown
/// value counts as `auto`), else [`Bf16Gemm::Auto`].
pub fn bf16_gemm() -> Bf16Gemm {
    static ENV: std::sync::OnceLock<Bf16Gemm> = std::sync::OnceLock::new();
    THREAD_MODE.with(|m| m.get()).unwrap_or_else(|| {
        *ENV.get_or_init(|| {
            std::env::var("DINO_BF16_GEMM")
                .ok()
                .and_then(|v| v.parse().ok())
                .unwrap_or(Bf16Gemm::Auto)
        })
    })
}

/// Run `f` with `mode` in force, on a pool of fresh threads that all have it (and the calling thread's other
/// switches, see [`crate::dispatch::on_pool_with_switches`]), so the ops' pool jobs take `mode`'s kernel too;
/// the calling thread's mode is restored after. For tests and benchmarks of a kernel: it starts a pool per
/// call (a process picks its mode with `DINO_BF16_GEMM`).
pub fn with_bf16_gemm<R: Send>(mode: Bf16Gemm, f: impl FnOnce() -> R + Send) -> R {
    crate::dispatch::with_thread_value(&THREAD_MODE, Some(mode), || {
        crate::dispatch::on_pool_with_switches(f)
    })
}

/// `vdpbf16ps`'s rate over the f32 AVX-512 FMA's on one core of this CPU (the best of 5 short runs of each
/// loop, alternating, on the calling thread), measured once per process; None without AVX-512 BF16.
pub fn dp_speedup() -> Option<f64> {
    static RATIO: std::sync::OnceLock<Option<f64>> = std::sync::OnceLock::new();
    *RATIO.get_or_init(|| {
        use crate::cpu::Ceiling;
        if !supported() {
            return None;
        }
        // 2.4 million instructions per run of either loop.
        let run = |c: Ceiling| c.measure(1, 2_400_000 / c.accumulators() as u64);
        let (mut f32_rate, mut bf16_rate) = (0.0f64, 0.0f64);
        for _ in 0..5 {
            f32_rate = f32_rate.max(run(Ceiling::F32Avx512)?);
            bf16_rate = bf16_rate.max(run(Ceiling::Bf16Avx512)?);
        }
        (f32_rate > 0.0).then(|| bf16_rate / f32_rate)
    })
}

/// A bf16 GEMM kernel.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Bf16Kernel {
    /// AVX-512 BF16 `vdpbf16ps`, a 12 x 32 register tile (this module).
    Dp,
    /// Intel AMX `tdpbf16ps`, 32 x 32 blocks of 16 x 16 tiles ([`crate::amx`]).
    Amx,
}

/// The kernel [`MatmulPrecision::Bf16`] products take on this thread (see [`Bf16Gemm`]); None: f32.
pub fn kernel() -> Option<Bf16Kernel> {
    if !supported() {
        return None;
    }
    match bf16_gemm() {
        Bf16Gemm::Always => Some(Bf16Kernel::Dp),
        Bf16Gemm::Never => None,
        Bf16Gemm::Amx => crate::amx::available().then_some(Bf16Kernel::Amx),
        Bf16Gemm::Auto if crate::amx::available() => Some(Bf16Kernel::Amx),
        Bf16Gemm::Auto => dp_speedup()
            .is_some_and(|r| r >= MIN_SPEEDUP)
            .then_some(Bf16Kernel::Dp),
    }
}

/// Whether [`MatmulPrecision::Bf16`] products run in bf16 on this thread (see [`Bf16Gemm`]).
pub fn active() -> bool {
    kernel().is_some()
}

/// Whether packings made on this thread are for the AMX kernel.
fn amx_packing() -> bool {
    kernel() == Some(Bf16Kernel::Amx)
}

/// Pairs per packed row for `k` values: `ceil(k / 2)`, padded to the AMX tile step for AMX packings.
fn packed_kp(k: usize, amx: bool) -> usize {
    let kp = k.div_ceil(2);
    if amx {
        kp.next_multiple_of(crate::amx::KP_STEP)
    } else {
        kp
    }
}

#[cfg(test)]
thread_local! {
    /// The kernel [`bf16_products`] forces (set by [`for_each_bf16_kernel`]).
    static TEST_MODE: std::cell::Cell<Bf16Gemm> = const { std::cell::Cell::new(Bf16Gemm::Always) };
}

/// `f` under [`MatmulPrecision::Bf16`] with the kernel under test (`vdpbf16ps` unless
/// [`for_each_bf16_kernel`] says otherwise) wherever the CPU has it: the kernels' tests must exercise it even
/// where [`Bf16Gemm::Auto`] would not take it.
#[cfg(test)]
pub(crate) fn bf16_products<R: Send>(f: impl FnOnce() -> R + Send) -> R {
    with_bf16_gemm(TEST_MODE.with(|m| m.get()), || {
        crate::fused::with_matmul_precision(MatmulPrecision::Bf16, f)
    })
}

/// Run a bf16 op test once per bf16 kernel: `vdpbf16ps`, then AMX where the CPU offers it (else it says,
/// loudly, that the AMX pass did not run).
#[cfg(test)]
pub(crate) fn for_each_bf16_kernel<E>(
    body: impl Fn() -> std::result::Result<(), E>,
) -> std::result::Result<(), E> {
    let mut r = Ok(());
    for_each_kernel_mode(|mode| {
        if r.is_ok() {
            TEST_MODE.with(|m| m.set(mode));
            r = body();
            TEST_MODE.with(|m| m.set(Bf16Gemm::Always));
        }
    });
    r
}

/// `body` with each bf16 kernel mode a test must cover: `vdpbf16ps` ([`Bf16Gemm::Always`]), then AMX
/// ([`Bf16Gemm::Amx`]) where [`amx_test_pass_runs`].
fn for_each_kernel_mode(mut body: impl FnMut(Bf16Gemm)) {
    for mode in [Bf16Gemm::Always, Bf16Gemm::Amx] {
        if mode == Bf16Gemm::Amx && !amx_test_pass_runs("a bf16 kernel test") {
            continue;
        }
        body(mode)
    }
}

/// The environment variable that makes every test's AMX pass required: with `DINO_REQUIRE_AMX=1` a CPU (or
/// OS) without AMX fails [`amx_test_pass_runs`] instead of skipping (set it on a CPU that has AMX, so that a
/// detection fault cannot skip the AMX passes unseen).
pub const REQUIRE_AMX_VAR: &str = "DINO_REQUIRE_AMX";

/// Test harness: whether a test's AMX pass (`what`) can run here. Where AMX is absent it says so, loudly, and
/// panics when [`REQUIRE_AMX_VAR`] is `1`.
pub fn amx_test_pass_runs(what: &str) -> bool {
    let here = crate::amx::available();
    if !here {
        eprintln!("AMX PASS NOT RUN ({what}): this CPU (or its OS) offers no AMX bf16 tiles");
        assert!(
            std::env::var(REQUIRE_AMX_VAR).as_deref() != Ok("1"),
            "{REQUIRE_AMX_VAR}=1 but AMX is unavailable ({what})"
        );
    }
    here
}

/// Test harness of [`crate::bf16_path_tests`]: `f` under [`MatmulPrecision::Bf16`] once per bf16 kernel of this
/// CPU (`vdpbf16ps`, even where [`Bf16Gemm::Auto`] would take f32, then AMX tiles), each run inside
/// [`with_bf16_gemm`] (so the ops' pool jobs take that kernel too); on a CPU without AVX-512 BF16 it says so,
/// loudly, and runs nothing (no bf16 path exists there).
pub fn on_each_bf16_kernel(what: &str, mut f: impl FnMut() + Send) {
    if !supported() {
        eprintln!("BF16 PATH NOT RUN ({what}): this CPU has no AVX-512 BF16");
        return;
    }
    for_each_kernel_mode(|mode| {
        with_bf16_gemm(mode, || {
            crate::fused::with_matmul_precision(MatmulPrecision::Bf16, &mut f)
        })
    })
}

/// Whether a linear layer with `rows` input rows runs in bf16 under `precision` on this CPU.
pub(crate) fn use_bf16(precision: MatmulPrecision, rows: usize) -> bool {
    precision == MatmulPrecision::Bf16 && rows > 0 && active()
}

/// A cache line of packed pairs: the unit of [`Lines`]' storage.
#[repr(C, align(64))]
struct Line([u32; 16]);

/// A packing buffer of `u32`s whose first element starts a cache line, whatever the global allocator: an AMX
/// tile row (64 bytes) or a zmm load that straddles two lines is slow (on the Intel Xeon with AMX, family 6
/// model 167: a `tileloadd` of 16 such rows 16.5 ns instead of 2.5 ns, the AMX GEMM alone 540-670 instead of
/// 1,100-1,400 GFLOP/s on the ViT's shapes); glibc's `malloc` aligns to 16 bytes only.
pub(crate) struct Lines {
    lines: Vec<Line>,
    len: usize,
}

impl Lines {
    /// An empty buffer (no allocation).
    pub(crate) const fn new() -> Self {
        Lines {
            lines: Vec::new(),
            len: 0,
        }
    }
}

impl std::ops::Deref for Lines {
    type Target = [u32];
    fn deref(&self) -> &[u32] {
        // SAFETY: `lines` holds at least `len` u32s (16 per line, contiguous, initialised or written by
        // the caller of uninit_u32 before any read: u32 has no invalid bit patterns).
        unsafe { std::slice::from_raw_parts(self.lines.as_ptr() as *const u32, self.len) }
    }
}

impl std::ops::DerefMut for Lines {
    fn deref_mut(&mut self) -> &mut [u32] {
        // SAFETY: as in deref, with the unique borrow of `lines`.
        unsafe { std::slice::from_raw_parts_mut(self.lines.as_mut_ptr() as *mut u32, self.len) }
    }
}

/// A line-aligned buffer of `n` u32 that the caller writes in full before reading (packing buffers: a zero
/// fill cost ~2.5% of a bf16 step in `memset`).
#[allow(clippy::uninit_vec)]
fn uninit_u32(n: usize) -> Lines {
    let count = n.div_ceil(16);
    let mut lines = Vec::with_capacity(count);
    // SAFETY: the capacity is `count`; a Line of u32s has no invalid bit patterns, and every caller writes
    // all n elements (each packing below says how) before any is read; the pad past n is never read.
    unsafe { lines.set_len(count) };
    Lines { lines, len: n }
}

/// Pairs of bf16 values packed in `u32`s.
pub(crate) struct Packed {
    pub(crate) data: Lines,
    /// Columns (right operand) or rows (left operand) per panel.
    pub(crate) width: usize,
    /// k-pairs per panel row (padded to [`crate::amx::KP_STEP`] in AMX packings).
    pub(crate) kp: usize,
    /// Whether this packing is for the AMX kernel (the left operand then comes as [`Lhs::Tiles`]).
    pub(crate) amx: bool,
}

/// The left operand of [`gemm`].
pub(crate) enum Lhs<'a> {
    /// Row-major rows of `kp` pairs each (from [`pack_rows`]).
    Rows(&'a [u32], usize),
    /// AMX tiles of 16 rows x 16 pairs, `kp` pairs per row (from [`pack_tiles`] or [`LhsT::pack`]), from
    /// the block of the first row on.
    Tiles(&'a [u32], usize),
    /// Panels of [`MR`] rows (from [`pack_kn`] with width [`MR`]), starting at the given row (a multiple of
    /// [`MR`]).
    Panels(&'a Packed, usize),
}

/// `rows` rows of `k` f32 values (row `i` at `src[i * ld..]`) as rows of `ceil(k / 2)` bf16 pairs.
pub(crate) fn pack_rows(src: &[f32], rows: usize, k: usize, ld: usize) -> (Lines, usize) {
    let kp = k.div_ceil(2);
    // Every row's kp pairs are written by pairs_of_row.
    let mut out = uninit_u32(rows * kp);
    for (i, o) in out.chunks_exact_mut(kp.max(1)).enumerate().take(rows) {
        // SAFETY: `supported()` is checked by every caller before packing; row i holds k values.
        unsafe { x86::pairs_of_row(&src[i * ld..i * ld + k], o) }
    }
    (out, kp)
}

/// `rows` rows of `k` f32 values (row `i` at `src[i * ld..]`) as AMX tiles: blocks of [`crate::amx::TILE`]
/// rows, each a run of 1 KiB tiles (16 rows x 16 pairs, row-major) along k, so that a tile load reads one
/// contiguous KiB. `kp` is `ceil(k / 2)` padded to [`crate::amx::KP_STEP`]; the pairs past k and the rows
/// past `rows` are zeros. Pair `p` of row `i` lies at `(i / 16) * 16 * kp + (p / 16) * 256 + (i % 16) * 16 +
/// p % 16`.
pub(crate) fn pack_tiles(src: &[f32], rows: usize, k: usize, ld: usize) -> (Lines, usize) {
    let mut out = Lines::new();
    let kp = pack_tiles_into(Rows::F32(src), rows, k, ld, &mut out);
    (out, kp)
}

/// [`pack_tiles`] into `out` (resized to the packing's length, its capacity reused); returns `kp`.
fn pack_tiles_into(src: Rows, rows: usize, k: usize, ld: usize, out: &mut Lines) -> usize {
    let kp = packed_kp(k, true);
    let tile = crate::amx::TILE;
    let len = rows.next_multiple_of(tile) * kp;
    if out.len() < len {
        *out = uninit_u32(len);
    }
    let out = &mut out[..len];
    if kp == 0 {
        return kp;
    }
    for (blk, dst) in out.chunks_exact_mut(tile * kp).enumerate() {
        for r in 0..tile {
            let i = blk * tile + r;
            // SAFETY: `supported()` is checked by every caller before packing; row i holds k values; every
            // 16-pair chunk of row r of this block is written (zeros past k, or all zeros past `rows`).
            unsafe {
                match src {
                    Rows::F32(src) => {
                        let row = (i < rows).then(|| &src[i * ld..i * ld + k]);
                        x86::tile_row(row, kp, r, dst)
                    }
                    Rows::Bf16(src) => {
                        let row = (i < rows).then(|| &src[i * ld..i * ld + k]);
                        x86::tile_row_bf16(row, kp, r, dst)
                    }
                }
            }
        }
    }
    kp
}

/// The `(m, k)` matrix `a[i][kk] = src[kk * ld + i]` (stored transposed, e.g. `gᵀ` of a `(k, m)` gradient)
/// as AMX tiles (the layout of [`pack_tiles`]), built 16 rows x 16 pairs at a time through a register
/// transpose.
/// With `parallel` a large packing is split over the pool.
fn pack_tiles_t(src: &[f32], k: usize, m: usize, ld: usize, parallel: bool) -> (Lines, usize) {
    let kp = packed_kp(k, true);
    let tile = crate::amx::TILE;
    let mut out = uninit_u32(m.next_multiple_of(tile) * kp);
    if kp == 0 {
        return (out, kp);
    }
    out.par_chunks_mut(tile * kp)
        .with_min_len(if !parallel || data_len_is_small(m * kp) {
            usize::MAX
        } else {
            1
        })
        .enumerate()
        .for_each(|(blk, dst)| {
            let i0 = blk * tile;
            // SAFETY: `supported()` is checked by the callers; dst is this block's 16 rows of kp pairs,
            // every entry written (zeros past m and past k).
            unsafe { x86::transpose_rows(src, ld, k, i0, tile.min(m - i0), kp, dst) }
        });
    (out, kp)
}

/// A left operand stored transposed, packed for the kernel in force: [`MR`]-row panels for `vdpbf16ps`,
/// rows for AMX.
pub(crate) enum LhsT {
    /// [`pack_kn`] panels of [`MR`] rows.
    Panels(Packed),
    /// AMX tiles (see [`pack_tiles`]) and their pairs per row.
    Tiles(Lines, usize),
}

impl LhsT {
    /// The `(m, k)` matrix `a[i][kk] = src[kk * ld + i]`, packed for this thread's kernel.
    pub(crate) fn pack(src: &[f32], k: usize, m: usize, ld: usize) -> Self {
        if amx_packing() {
            let (tiles, kp) = pack_tiles_t(src, k, m, ld, true);
            LhsT::Tiles(tiles, kp)
        } else {
            LhsT::Panels(pack_kn(src, k, m, ld, MR))
        }
    }

    /// Row ranges handed to [`gemm`] through [`LhsT::at`] must start at a multiple of this.
    pub(crate) fn granule(&self) -> usize {
        match self {
            LhsT::Panels(_) => MR,
            LhsT::Tiles(..) => crate::amx::TILE,
        }
    }

    /// The operand from row `first` on (a multiple of [`LhsT::granule`]).
    pub(crate) fn at(&self, first: usize) -> Lhs<'_> {
        match self {
            LhsT::Panels(p) => Lhs::Panels(p, first),
            LhsT::Tiles(d, kp) => Lhs::Tiles(&d[first * kp..], *kp),
        }
    }
}

/// Whether a packing is too small to be worth splitting over the pool (e.g. one attention head's operand).
fn data_len_is_small(n: usize) -> bool {
    n < 1 << 15
}

/// The `(k, n)` matrix `b[kk][j] = src[j * ld + kk]` (stored transposed, e.g. a linear layer's `(out, in)`
/// weight read as `Wᵀ`) in panels of `width` columns.
pub(crate) fn pack_nk(src: &[f32], n: usize, k: usize, ld: usize, width: usize) -> Packed {
    let amx = width == NR && amx_packing();
    let (real, kp) = (k.div_ceil(2), packed_kp(k, amx));
    let panels = n.div_ceil(width);
    // Columns below n are written pair by pair; the last panel's columns past n and the pair rows past
    // `real` (AMX padding) are zeroed.
    let mut data = uninit_u32(panels * kp * width);
    data.par_chunks_mut((kp * width).max(1))
        .with_min_len(if data_len_is_small(panels * kp * width) {
            usize::MAX
        } else {
            1
        })
        .enumerate()
        .for_each(|(panel, dst)| {
            let cols = width.min(n - panel * width);
            if cols < width {
                dst.chunks_exact_mut(width).for_each(|r| r[cols..].fill(0));
            }
            dst[real * width..].fill(0);
            let j0 = panel * width;
            // SAFETY: as in pack_rows; rows j0..j0+cols of src hold k values each, dst is (kp, width).
            unsafe { x86::transpose_pairs(&src[j0 * ld..], ld, k, cols, width, dst) }
        });
    Packed {
        data,
        width,
        kp,
        amx,
    }
}

/// The `(k, n)` matrix `b[kk][j] = src[kk * ld + j]` (row-major) in panels of `width` columns. Pairs of rows
/// are read in order (contiguous streams), each pool thread taking a range of them.
pub(crate) fn pack_kn(src: &[f32], k: usize, n: usize, ld: usize, width: usize) -> Packed {
    pack_kn_in(src, k, n, ld, width, true)
}

/// The buffer of a [`pack_kn`] packing of a `(k, n)` matrix in panels of `width` columns, with its padding
/// zeroed (the last panel's columns past `n`, and for AMX the pair rows past `ceil(k / 2)`) and the rest left
/// for the caller to write pair by pair: `(data, real pairs, kp)`.
fn padded_panels(k: usize, n: usize, width: usize, amx: bool) -> (Lines, usize, usize) {
    let (real, kp) = (k.div_ceil(2), packed_kp(k, amx));
    let panels = n.div_ceil(width);
    let mut data = uninit_u32(panels * kp * width);
    if kp > real {
        data.chunks_exact_mut(kp * width)
            .for_each(|panel| panel[real * width..].fill(0));
    }
    let tail = n % width;
    if tail != 0 {
        let last = (panels - 1) * kp * width;
        data[last..]
            .chunks_exact_mut(width)
            .for_each(|r| r[tail..].fill(0));
    }
    (data, real, kp)
}

/// [`pack_kn`], split over the pool only with `parallel` (and a large packing).
fn pack_kn_in(src: &[f32], k: usize, n: usize, ld: usize, width: usize, parallel: bool) -> Packed {
    let amx = width == NR && amx_packing();
    let (mut data, real, kp) = padded_panels(k, n, width, amx);
    let parts = if !parallel || data_len_is_small(data.len()) {
        1
    } else {
        rayon::current_num_threads().clamp(1, real.max(1))
    };
    let base = data.as_mut_ptr() as usize;
    (0..parts).into_par_iter().for_each(|t| {
        let (p0, p1) = (real * t / parts, real * (t + 1) / parts);
        // SAFETY: as in pack_rows; every entry [panel][p][0..cols] for p in p0..p1 lies inside `data` and
        // pairs p0..p1 are this task's own.
        unsafe { x86::interleave_pairs(src, ld, k, n, width, kp, p0, p1, base as *mut u32) }
    });
    Packed {
        data,
        width,
        kp,
        amx,
    }
}

/// [`pack_kn`] of a `(k, n)` row-major matrix of bf16 bit patterns in panels of `width` columns ([`NR`] for
/// a right operand, [`MR`] for a left one stored transposed), on the calling thread: the same panels, nothing
/// rounded.
fn pack_kn_bf16(src: &[u16], k: usize, n: usize, ld: usize, width: usize) -> Packed {
    let amx = width == NR && amx_packing();
    let (mut data, real, kp) = padded_panels(k, n, width, amx);
    assert!(
        k == 0 || src.len() >= (k - 1) * ld + n,
        "pack_kn_bf16: {k} x {n} rows in {} values",
        src.len()
    );
    assert!(
        width == NR || width == MR,
        "pack_kn_bf16: panels of {width}"
    );
    // SAFETY: `supported()` is checked by the callers (a bf16 operand exists only where it is); rows 0..k of
    // `n` values lie in `src` (asserted), and every entry [panel][p][0..cols] for p < real lies in `data`.
    unsafe { x86::interleave_pairs_bf16(src, ld, k, n, width, kp, real, data.as_mut_ptr()) }
    Packed {
        data,
        width,
        kp,
        amx,
    }
}

thread_local! {
    /// The AMX left-operand block of [`gemm_rows`] on this thread (reused from call to call).
    static AMX_LHS: std::cell::RefCell<Lines> = const { std::cell::RefCell::new(Lines::new()) };
}

/// Bytes of a packed left block of [`gemm_rows`] on AMX (128 KiB: 64 rows of k = 1024 stay in L2 beside the
/// right operand; a single-thread probe on the step's shapes found 32-512 KiB alike, and up to 15% faster
/// than packing all rows first when k = 768).
const AMX_LHS_BYTES: usize = 128 << 10;

/// Rows per packed left block of [`gemm_rows`] on AMX for `kp` pairs per row (a multiple of 32, the
/// micro-kernel's rows).
fn amx_rows_chunk(kp: usize) -> usize {
    (AMX_LHS_BYTES / (kp.max(1) * 4))
        .next_multiple_of(32)
        .max(32)
}

/// [`gemm`] with a row-major left operand: `c (m, n) [+]= a (m, k) · b (k, n)`, the `m` rows of `k` values at
/// `a` (row stride `k`) packed here (see [`pack_rows`]).
///
/// # Safety
/// As [`gemm`].
#[allow(clippy::too_many_arguments)]
pub(crate) unsafe fn gemm_rows(
    m: usize,
    n: usize,
    k: usize,
    a: &[f32],
    b: &Packed,
    c: *mut f32,
    ldc: usize,
    accumulate: bool,
) {
    gemm_rows_src(
        m,
        n,
        k,
        Rows::F32(a),
        b,
        c,
        ldc,
        crate::amx::Init::accumulating(accumulate),
    )
}

/// [`gemm_rows`] with a left operand in f32 or bf16 ([`Rows`]), the product started from `init`: zeros, `c`'s
/// contents, or a bias row on every row (`c = a · b + bias`; the kernels start their tiles from the bias row,
/// nothing is written into `c` first).
///
/// # Safety
/// As [`gemm`]; a bias holds `n` values.
#[allow(clippy::too_many_arguments)]
pub(crate) unsafe fn gemm_rows_src(
    m: usize,
    n: usize,
    k: usize,
    a: Rows,
    b: &Packed,
    c: *mut f32,
    ldc: usize,
    init: crate::amx::Init,
) {
    if b.amx && b.kp > 0 {
        return amx_rows(m, n, k, a, b, c, ldc, init);
    }
    if b.amx {
        // An empty k: `c` is its start alone.
        gemm_from(m, n, &Lhs::Tiles(&[], 0), b, c, ldc, init)
    } else if let Some(pairs) = pairs_in_place(a, m, k) {
        gemm_from(m, n, &Lhs::Rows(pairs, k / 2), b, c, ldc, init)
    } else {
        let (rows, kp) = pack_rows(&a.to_f32(0..m * k), m, k, k);
        gemm_from(m, n, &Lhs::Rows(&rows, kp), b, c, ldc, init)
    }
}

/// `m` row-major bf16 rows of an even `k` read as the `vdpbf16ps` kernel's rows of `k / 2` pairs, in place: a
/// bf16 row is its own pair packing (the pair `(a[2p], a[2p+1])` is the little-endian `u32` at `2p`), so a
/// producer's bf16 output (a LayerNorm, the attention, GELU) costs no packing pass. None for f32 rows, an odd
/// `k` or rows not on a 4-byte boundary (those are packed).
fn pairs_in_place<'a>(a: Rows<'a>, m: usize, k: usize) -> Option<&'a [u32]> {
    match a {
        Rows::Bf16(src) if k.is_multiple_of(2) && (src.as_ptr() as usize).is_multiple_of(4) => {
            assert!(
                src.len() >= m * k,
                "bf16 GEMM: {} bf16 values for {m} rows of {k}",
                src.len()
            );
            // SAFETY: the first m * k values of src (checked) are m * k / 2 u32s at a 4-byte boundary
            // (checked); any bit pattern is a u32, and the borrow is src's.
            Some(unsafe { std::slice::from_raw_parts(src.as_ptr() as *const u32, m * k / 2) })
        }
        _ => None,
    }
}

/// Panics unless `m` rows of AMX tiles `d` with `kp` pairs per row fit the AMX packing `b`.
fn check_tiles(m: usize, d: &[u32], kp: usize, b: &Packed) {
    assert!(
        b.amx && kp == b.kp && d.len() >= m.next_multiple_of(crate::amx::TILE) * kp,
        "AMX GEMM: operands packed for different kernels"
    );
}

/// The AMX path of [`gemm_rows_src`]: a block of rows at a time, packed into this thread's
/// buffer and multiplied while it is in cache, the tiles of `c` started from `init`.
///
/// # Safety
/// As [`gemm`], with `b` packed for AMX and `b.kp > 0`; a bias holds `n` values.
#[allow(clippy::too_many_arguments)]
unsafe fn amx_rows(
    m: usize,
    n: usize,
    k: usize,
    a: Rows,
    b: &Packed,
    c: *mut f32,
    ldc: usize,
    init: crate::amx::Init,
) {
    // bf16 rows whose k fills whole tile steps are read as they are, in whole 32-row blocks; the rest of the
    // rows (or all of them) are packed a block at a time.
    let mut r0 = 0;
    if let Rows::Bf16(src) = a {
        if k.is_multiple_of(2 * crate::amx::KP_STEP) && b.kp == k / 2 {
            r0 = m / 32 * 32;
            assert!(
                src.len() >= r0 * k,
                "AMX GEMM: {} bf16 values for {r0} rows of {k}",
                src.len()
            );
            if r0 > 0 {
                let lhs = crate::amx::Lhs::Rows(src.as_ptr() as *const u32, 2 * k);
                crate::amx::gemm(r0, n, lhs, b, c, ldc, init)
            }
        }
    }
    let chunk = amx_rows_chunk(b.kp);
    AMX_LHS.with(|buf| {
        let mut buf = buf.borrow_mut();
        for r0 in (r0..m).step_by(chunk) {
            let rows = chunk.min(m - r0);
            let kp = pack_tiles_into(a.from(r0 * k), rows, k, k, &mut buf);
            check_tiles(rows, &buf, kp, b);
            let lhs = crate::amx::Lhs::Tiles(buf.as_ptr());
            crate::amx::gemm(rows, n, lhs, b, c.add(r0 * ldc), ldc, init)
        }
    })
}

/// `c (m, n) [+]= aᵀ b` for row-major `a (k, m)` and `b (k, n)` (row strides `lda`, `ldb`; e.g. a block's
/// term `gᵀ x` of a weight gradient), each in f32 or bf16, both packed on the calling thread. With
/// `accumulate` the product is added to `c`.
///
/// # Safety
/// As [`gemm`].
#[allow(clippy::too_many_arguments)]
pub(crate) unsafe fn gemm_tn(
    m: usize,
    n: usize,
    k: usize,
    a: Rows,
    lda: usize,
    b: Rows,
    ldb: usize,
    c: *mut f32,
    ldc: usize,
    accumulate: bool,
) {
    let bp = match b {
        Rows::F32(b) => pack_kn_in(b, k, n, ldb, NR, false),
        Rows::Bf16(b) => pack_kn_bf16(b, k, n, ldb, NR),
    };
    let lhs = match a {
        Rows::F32(a) if bp.amx => {
            let (tiles, kp) = pack_tiles_t(a, k, m, lda, false);
            LhsT::Tiles(tiles, kp)
        }
        // bf16 values widen exactly, and the tiles round them to themselves.
        Rows::Bf16(_) if bp.amx => {
            let len = if k == 0 { 0 } else { (k - 1) * lda + m };
            let (tiles, kp) = pack_tiles_t(&a.to_f32(0..len), k, m, lda, false);
            LhsT::Tiles(tiles, kp)
        }
        Rows::F32(a) => LhsT::Panels(pack_kn_in(a, k, m, lda, MR, false)),
        Rows::Bf16(a) => LhsT::Panels(pack_kn_bf16(a, k, m, lda, MR)),
    };
    gemm(m, n, &lhs.at(0), &bp, c, ldc, accumulate)
}

/// `c (m, n) [+]= a (m, k) · b (k, n)` with `c` row-major (row stride `ldc`), `a` and `b` packed with the
/// same `k`. With `accumulate` the product is added to `c`, otherwise `c` is overwritten.
///
/// # Safety
/// `c` must be valid for `m` rows of `n` values at stride `ldc`, not aliasing the operands, and [`supported`]
/// must be true. `b` must be packed with width [`NR`] and `a`, when in panels, with width [`MR`].
pub(crate) unsafe fn gemm(
    m: usize,
    n: usize,
    a: &Lhs,
    b: &Packed,
    c: *mut f32,
    ldc: usize,
    accumulate: bool,
) {
    gemm_from(
        m,
        n,
        a,
        b,
        c,
        ldc,
        crate::amx::Init::accumulating(accumulate),
    )
}

/// [`gemm`] started from `init`: zeros, `c`'s contents, or a bias row of `n` values on every row (each tile
/// adds the bias to its first block's sums where it would add `c`'s contents: the bits of accumulating onto
/// bias rows written into `c`, without writing them).
///
/// # Safety
/// As [`gemm`]; a bias holds `n` values.
pub(crate) unsafe fn gemm_from(
    m: usize,
    n: usize,
    a: &Lhs,
    b: &Packed,
    c: *mut f32,
    ldc: usize,
    init: crate::amx::Init,
) {
    use crate::amx::Init;
    debug_assert_eq!(b.width, NR);
    let kp = b.kp;
    if let Lhs::Tiles(d, akp) = a {
        check_tiles(m, d, *akp, b);
    } else {
        assert!(!b.amx, "bf16 GEMM: an AMX packing without AMX tiles");
    }
    if let Init::Bias(bias) = init {
        assert!(
            bias.len() >= n,
            "bf16 GEMM: a bias of {} values for {n} columns",
            bias.len()
        );
    }
    if kp == 0 {
        for i in 0..m {
            match init {
                Init::Zero => std::ptr::write_bytes(c.add(i * ldc), 0, n),
                Init::Load => {}
                Init::Bias(bias) => std::ptr::copy_nonoverlapping(bias.as_ptr(), c.add(i * ldc), n),
            }
        }
        return;
    }
    if let Lhs::Tiles(d, _) = a {
        return crate::amx::gemm(m, n, crate::amx::Lhs::Tiles(d.as_ptr()), b, c, ldc, init);
    }
    let panels = n.div_ceil(NR);
    for i0 in (0..m).step_by(MC) {
        let i1 = (i0 + MC).min(m);
        for p0 in (0..kp).step_by(KC) {
            let pn = KC.min(kp - p0);
            for jp in 0..panels {
                let start = match init {
                    _ if p0 > 0 => x86::Start::C,
                    Init::Zero => x86::Start::Zero,
                    Init::Load => x86::Start::C,
                    Init::Bias(bias) => x86::Start::Row(bias.as_ptr().add(jp * NR)),
                };
                let cols = NR.min(n - jp * NR);
                let bp = b.data.as_ptr().add(jp * kp * NR + p0 * NR);
                for ib in (i0..i1).step_by(MR) {
                    let rows = MR.min(i1 - ib);
                    let (ap, rs, ps) = match a {
                        Lhs::Rows(d, akp) => (d.as_ptr().add(ib * akp + p0), *akp, 1),
                        Lhs::Tiles(..) => unreachable!("AMX tiles go to the AMX kernel"),
                        Lhs::Panels(pk, first) => {
                            debug_assert!(pk.width == MR && first % MR == 0);
                            let panel = (first + ib) / MR;
                            (pk.data.as_ptr().add(panel * kp * MR + p0 * MR), 1, MR)
                        }
                    };
                    let cp = c.add(ib * ldc + jp * NR);
                    x86::tile(rows, pn, ap, rs, ps, bp, cp, ldc, cols, start);
                }
            }
        }
    }
}

/// `dst (m, n) = lhs (m, k) · rhs (k, n)` in bf16 with each matrix given as `(ptr, col stride, row stride)`
/// like [`crate::fused::gemm_strided`], on the calling thread. `dst` must have unit column stride, and each
/// operand unit stride along one of its dimensions (every attention operand has).
///
/// # Safety
/// As [`crate::fused::gemm_strided`], and [`supported`] must be true.
pub(crate) unsafe fn gemm_strided(
    m: usize,
    n: usize,
    k: usize,
    dst: (*mut f32, isize, isize),
    lhs: (*const f32, isize, isize),
    rhs: (*const f32, isize, isize),
) {
    if m == 0 || n == 0 {
        return;
    }
    // The slice an operand of `rows` x `cols` spans from its pointer with these strides.
    let span = |p: *const f32, rows: usize, cols: usize, rs: isize, cs: isize| {
        let len = (rows.max(1) - 1) * rs as usize + (cols.max(1) - 1) * cs as usize + 1;
        std::slice::from_raw_parts(p, if rows == 0 || cols == 0 { 0 } else { len })
    };
    assert!(dst.1 == 1, "bf16 GEMM: the output needs unit column stride");
    let (rows, lhs_t);
    let a = if lhs.1 == 1 {
        let src = span(lhs.0, m, k, lhs.2, 1);
        if amx_packing() {
            rows = pack_tiles(src, m, k, lhs.2 as usize);
            Lhs::Tiles(&rows.0, rows.1)
        } else {
            rows = pack_rows(src, m, k, lhs.2 as usize);
            Lhs::Rows(&rows.0, rows.1)
        }
    } else {
        assert!(
            lhs.2 == 1,
            "bf16 GEMM: the left operand needs a unit stride"
        );
        // lhs[i][kk] at i + kk * cs: the (k, m) row-major matrix of its transpose.
        lhs_t = LhsT::pack(span(lhs.0, k, m, lhs.1, 1), k, m, lhs.1 as usize);
        lhs_t.at(0)
    };
    let b = if rhs.1 == 1 {
        pack_kn(span(rhs.0, k, n, rhs.2, 1), k, n, rhs.2 as usize, NR)
    } else {
        assert!(
            rhs.2 == 1,
            "bf16 GEMM: the right operand needs a unit stride"
        );
        pack_nk(span(rhs.0, n, k, rhs.1, 1), n, k, rhs.1 as usize, NR)
    };
    gemm(m, n, &a, &b, dst.0, dst.2 as usize, false)
}

/// What a `vdpbf16ps` tile's sums are added to when stored.
#[derive(Clone, Copy, Debug)]
pub(crate) enum Start {
    /// Nothing: the tile overwrites `c`.
    Zero,
    /// `c`'s contents.
    C,
    /// A row of the tile's columns (a bias), the same for every row.
    Row(*const f32),
}

#[cfg(target_arch = "x86_64")]
pub(crate) mod x86 {
    use std::arch::x86_64::*;

    pub(crate) use super::Start;

    /// The first `min(n, 16)` lanes.
    #[inline(always)]
    pub(crate) fn mask16(n: usize) -> __mmask16 {
        if n >= 16 {
            0xffff
        } else {
            ((1u32 << n) - 1) as u16
        }
    }

    /// The f32 values of `src` as bf16 pairs in `out` (`ceil(len / 2)` entries; an odd tail pairs with 0).
    #[target_feature(enable = "avx512f,avx512bw,avx512bf16")]
    pub(super) unsafe fn pairs_of_row(src: &[f32], out: &mut [u32]) {
        let k = src.len();
        let mut i = 0;
        while i < k {
            let left = k - i;
            let m0 = mask16(left);
            let l1 = left.saturating_sub(16);
            let m1 = mask16(l1);
            let lo = _mm512_maskz_loadu_ps(m0, src.as_ptr().add(i));
            let hi = _mm512_maskz_loadu_ps(m1, src.as_ptr().add(i + 16));
            // 32 bf16 in order: lanes 0-15 from `lo`, 16-31 from `hi`; as u32 lanes they are the pairs.
            let v: __m512i = std::mem::transmute(_mm512_cvtne2ps_pbh(hi, lo));
            let pairs = left.min(32).div_ceil(2);
            let mask = mask16(pairs);
            _mm512_mask_storeu_epi32(out.as_mut_ptr().add(i / 2) as *mut i32, mask, v);
            i += 32;
        }
    }

    /// Pairs `p0..p1` of the `(k, n)` row-major `src` into panels of `width` columns at `dst`
    /// (`[panel][p][c]`, `kp` pairs per panel): entry `c` is the pair `(src[2p][j], src[2p+1][j])`.
    #[target_feature(enable = "avx512f,avx512bw,avx512bf16")]
    #[allow(clippy::too_many_arguments)]
    pub(super) unsafe fn interleave_pairs(
        src: &[f32],
        ld: usize,
        k: usize,
        n: usize,
        width: usize,
        kp: usize,
        p0: usize,
        p1: usize,
        dst: *mut u32,
    ) {
        if width < 16 {
            // Narrow panels (MR = 12): a masked 12-lane pass per panel ran at 3.9 G values/s, half the rate of
            // 32-wide panels; whole 16-lane vectors of the row pair into an L1 scratch, then one masked copy
            // per panel.
            let chunk = (768 / width) * width;
            let mut scratch = [0u32; 768];
            for p in p0..p1 {
                let r0 = &src[2 * p * ld..2 * p * ld + n];
                let r1 = (2 * p + 1 < k).then(|| &src[(2 * p + 1) * ld..(2 * p + 1) * ld + n]);
                for c0 in (0..n).step_by(chunk) {
                    let cn = chunk.min(n - c0);
                    interleave_rows(
                        &r0[c0..c0 + cn],
                        r1.map(|r| &r[c0..c0 + cn]),
                        &mut scratch[..cn],
                    );
                    scatter_to_panels(&scratch[..cn], c0, width, kp, p, dst);
                }
            }
            return;
        }
        for p in p0..p1 {
            let r0 = &src[2 * p * ld..2 * p * ld + n];
            let r1 = (2 * p + 1 < k).then(|| &src[(2 * p + 1) * ld..(2 * p + 1) * ld + n]);
            let mut j0 = 0;
            while j0 < n {
                let cols = width.min(n - j0);
                let out =
                    std::slice::from_raw_parts_mut(dst.add(((j0 / width) * kp + p) * width), cols);
                interleave_rows(&r0[j0..j0 + cols], r1.map(|r| &r[j0..j0 + cols]), out);
                j0 += width;
            }
        }
    }

    /// Pair row `p` of columns `c0..c0 + row.len()` (`row`, in order) into panels of `width` (< 16) columns
    /// at `dst` (`[panel][p][c]`, `kp` pairs per panel; `c0` a multiple of `width`): one masked store per panel.
    #[target_feature(enable = "avx512f,avx512bw")]
    #[inline]
    unsafe fn scatter_to_panels(
        row: &[u32],
        c0: usize,
        width: usize,
        kp: usize,
        p: usize,
        dst: *mut u32,
    ) {
        for j in (0..row.len()).step_by(width) {
            let cols = width.min(row.len() - j);
            let v = _mm512_maskz_loadu_epi32(mask16(cols), row.as_ptr().add(j) as *const i32);
            let at = dst.add((((c0 + j) / width) * kp + p) * width);
            _mm512_mask_storeu_epi32(at as *mut i32, mask16(cols), v);
        }
    }

    /// The `cols` rows of `src` (row `c` at `src[c * ld..]`, `k` values) as pairs transposed into `dst`
    /// (`(kp, width)`: `dst[p * width + c]` = the pair `(src[c][2p], src[c][2p+1])`), 16 rows x 16 pairs at a
    /// time through a register transpose.
    #[target_feature(enable = "avx512f,avx512bw,avx512bf16")]
    pub(super) unsafe fn transpose_pairs(
        src: &[f32],
        ld: usize,
        k: usize,
        cols: usize,
        width: usize,
        dst: &mut [u32],
    ) {
        let kp = k.div_ceil(2);
        let mut c0 = 0;
        while c0 < cols {
            let cn = (cols - c0).min(16);
            let mut p0 = 0;
            while p0 < kp {
                let pn = (kp - p0).min(16);
                let left = k - 2 * p0;
                let m0 = mask16(left);
                let l1 = left.saturating_sub(16);
                let m1 = mask16(l1);
                let mut v = [_mm512_setzero_si512(); 16];
                for (r, v) in v.iter_mut().enumerate().take(cn) {
                    let row = src.as_ptr().add((c0 + r) * ld + 2 * p0);
                    let lo = _mm512_maskz_loadu_ps(m0, row);
                    let hi = _mm512_maskz_loadu_ps(m1, row.add(16));
                    *v = std::mem::transmute::<__m512bh, __m512i>(_mm512_cvtne2ps_pbh(hi, lo));
                }
                let t = transpose16(v);
                let mask = mask16(cn);
                for (q, t) in t.iter().enumerate().take(pn) {
                    let out = dst.as_mut_ptr().add((p0 + q) * width + c0);
                    _mm512_mask_storeu_epi32(out as *mut i32, mask, *t);
                }
                p0 += 16;
            }
            c0 += 16;
        }
    }

    /// The transpose of a 16 x 16 matrix of 32-bit lanes (`out[j]` lane `i` = `v[i]` lane `j`).
    #[inline]
    #[target_feature(enable = "avx512f")]
    pub(crate) unsafe fn transpose16(v: [__m512i; 16]) -> [__m512i; 16] {
        // Stage 1: 32-bit interleave of row pairs; stage 2: 64-bit interleave; stages 3-4: 128-bit lanes.
        let mut a = [_mm512_setzero_si512(); 16];
        for i in 0..8 {
            a[2 * i] = _mm512_unpacklo_epi32(v[2 * i], v[2 * i + 1]);
            a[2 * i + 1] = _mm512_unpackhi_epi32(v[2 * i], v[2 * i + 1]);
        }
        let mut b = [_mm512_setzero_si512(); 16];
        for i in 0..4 {
            b[4 * i] = _mm512_unpacklo_epi64(a[4 * i], a[4 * i + 2]);
            b[4 * i + 1] = _mm512_unpackhi_epi64(a[4 * i], a[4 * i + 2]);
            b[4 * i + 2] = _mm512_unpacklo_epi64(a[4 * i + 1], a[4 * i + 3]);
            b[4 * i + 3] = _mm512_unpackhi_epi64(a[4 * i + 1], a[4 * i + 3]);
        }
        // b[4i + r] holds, in each 128-bit lane L, elements (4L + r) of rows 4i..4i+4.
        let mut c = [_mm512_setzero_si512(); 16];
        for r in 0..4 {
            // Rows 0-3 and 4-7 (lanes 0,1 of each), rows 8-11 and 12-15.
            c[r] = _mm512_shuffle_i32x4::<0x44>(b[r], b[4 + r]);
            c[4 + r] = _mm512_shuffle_i32x4::<0xee>(b[r], b[4 + r]);
            c[8 + r] = _mm512_shuffle_i32x4::<0x44>(b[8 + r], b[12 + r]);
            c[12 + r] = _mm512_shuffle_i32x4::<0xee>(b[8 + r], b[12 + r]);
        }
        let mut out = [_mm512_setzero_si512(); 16];
        for r in 0..4 {
            // Column 4L + r: lane L of rows 0-15.
            out[r] = _mm512_shuffle_i32x4::<0x88>(c[r], c[8 + r]);
            out[4 + r] = _mm512_shuffle_i32x4::<0xdd>(c[r], c[8 + r]);
            out[8 + r] = _mm512_shuffle_i32x4::<0x88>(c[4 + r], c[12 + r]);
            out[12 + r] = _mm512_shuffle_i32x4::<0xdd>(c[4 + r], c[12 + r]);
        }
        out
    }

    /// `out[c] = (r0[c], r1[c])` as a bf16 pair (`r1` absent: 0), for up to 16 columns per step.
    #[target_feature(enable = "avx512f,avx512bw,avx512bf16")]
    #[inline]
    pub(super) unsafe fn interleave_rows(r0: &[f32], r1: Option<&[f32]>, out: &mut [u32]) {
        let idx = _mm512_set_epi16(
            31, 15, 30, 14, 29, 13, 28, 12, 27, 11, 26, 10, 25, 9, 24, 8, 23, 7, 22, 6, 21, 5, 20,
            4, 19, 3, 18, 2, 17, 1, 16, 0,
        );
        let n = r0.len();
        let mut c = 0;
        while c < n {
            let left = n - c;
            let m = mask16(left);
            let a = _mm512_maskz_loadu_ps(m, r0.as_ptr().add(c));
            let b = match r1 {
                Some(r1) => _mm512_maskz_loadu_ps(m, r1.as_ptr().add(c)),
                None => _mm512_setzero_ps(),
            };
            let v: __m512i = std::mem::transmute(_mm512_cvtne2ps_pbh(b, a));
            let v = _mm512_permutexvar_epi16(idx, v);
            _mm512_mask_storeu_epi32(out.as_mut_ptr().add(c) as *mut i32, m, v);
            c += 16;
        }
    }

    /// Rows `i0..i0+rows` of the `(m, k)` matrix `a[i][kk] = src[kk * ld + i]` as one block of AMX tiles at
    /// `dst` (see [`super::pack_tiles`]; zeros past `rows` and past `k`), 16 pairs at a time: each pair row
    /// interleaved from two source rows, then a register transpose.
    #[target_feature(enable = "avx512f,avx512bw,avx512bf16")]
    pub(super) unsafe fn transpose_rows(
        src: &[f32],
        ld: usize,
        k: usize,
        i0: usize,
        rows: usize,
        kp: usize,
        dst: &mut [u32],
    ) {
        let idx = _mm512_set_epi16(
            31, 15, 30, 14, 29, 13, 28, 12, 27, 11, 26, 10, 25, 9, 24, 8, 23, 7, 22, 6, 21, 5, 20,
            4, 19, 3, 18, 2, 17, 1, 16, 0,
        );
        let m = mask16(rows);
        let mut p0 = 0;
        while p0 < kp {
            let mut v = [_mm512_setzero_si512(); 16];
            for (q, v) in v.iter_mut().enumerate() {
                let r0 = 2 * (p0 + q);
                if r0 >= k {
                    break;
                }
                let a = _mm512_maskz_loadu_ps(m, src.as_ptr().add(r0 * ld + i0));
                let b = if r0 + 1 < k {
                    _mm512_maskz_loadu_ps(m, src.as_ptr().add((r0 + 1) * ld + i0))
                } else {
                    _mm512_setzero_ps()
                };
                let pairs: __m512i = std::mem::transmute(_mm512_cvtne2ps_pbh(b, a));
                *v = _mm512_permutexvar_epi16(idx, pairs);
            }
            let t = transpose16(v);
            // Tile p0 / 16 of this block: 16 rows of 16 pairs, contiguous.
            for (r, t) in t.iter().enumerate() {
                _mm512_storeu_si512(dst.as_mut_ptr().add(p0 * 16 + r * 16) as *mut _, *t);
            }
            p0 += 16;
        }
    }

    /// Row `r` of a block of AMX tiles (see [`super::pack_tiles`]) from the f32 values of `src` (None: zeros):
    /// 16 pairs (32 values) into each of the block's `kp / 16` tiles.
    #[target_feature(enable = "avx512f,avx512bw,avx512bf16")]
    pub(super) unsafe fn tile_row(src: Option<&[f32]>, kp: usize, r: usize, dst: &mut [u32]) {
        let k = src.map_or(0, |s| s.len());
        let p = src.map_or(std::ptr::null(), |s| s.as_ptr());
        for t in 0..kp / 16 {
            let i = t * 32;
            let left = k.saturating_sub(i);
            let v: __m512i = if left == 0 {
                _mm512_setzero_si512()
            } else {
                let lo = _mm512_maskz_loadu_ps(mask16(left), p.add(i));
                let hi = _mm512_maskz_loadu_ps(mask16(left.saturating_sub(16)), p.add(i + 16));
                std::mem::transmute::<__m512bh, __m512i>(_mm512_cvtne2ps_pbh(hi, lo))
            };
            _mm512_storeu_si512(dst.as_mut_ptr().add(t * 256 + r * 16) as *mut _, v);
        }
    }

    /// [`tile_row`] from bf16 bit patterns: 16 pairs (32 values, one 64-byte load) of the row into each tile.
    #[target_feature(enable = "avx512f,avx512bw")]
    pub(super) unsafe fn tile_row_bf16(src: Option<&[u16]>, kp: usize, r: usize, dst: &mut [u32]) {
        let k = src.map_or(0, |s| s.len());
        let p = src.map_or(std::ptr::null(), |s| s.as_ptr());
        for t in 0..kp / 16 {
            let i = t * 32;
            let left = k.saturating_sub(i);
            let v = if left == 0 {
                _mm512_setzero_si512()
            } else {
                _mm512_maskz_loadu_epi16(mask32(left), p.add(i) as *const i16)
            };
            _mm512_storeu_si512(dst.as_mut_ptr().add(t * 256 + r * 16) as *mut _, v);
        }
    }

    /// Up to 32 columns of a pair of bf16 rows at `r0` and `r1` (null: zeros) as `cols` pairs at `out`:
    /// `out[c] = (r0[c], r1[c])`.
    #[target_feature(enable = "avx512f,avx512bw")]
    #[inline]
    unsafe fn interleave32_bf16(r0: *const u16, r1: *const u16, cols: usize, out: *mut u32) {
        // Lane 2c of the first half takes column c of r0, lane 2c + 1 column c of r1 (index 32 + c: the
        // second operand); the second half the same for columns 16..32.
        const LO: [i16; 32] = interleave_index(0);
        const HI: [i16; 32] = interleave_index(16);
        let m = mask32(cols);
        let a = _mm512_maskz_loadu_epi16(m, r0 as *const i16);
        let b = if r1.is_null() {
            _mm512_setzero_si512()
        } else {
            _mm512_maskz_loadu_epi16(m, r1 as *const i16)
        };
        let lo = _mm512_permutex2var_epi16(a, _mm512_loadu_si512(LO.as_ptr() as *const _), b);
        _mm512_mask_storeu_epi32(out as *mut i32, mask16(cols), lo);
        if cols > 16 {
            let hi = _mm512_permutex2var_epi16(a, _mm512_loadu_si512(HI.as_ptr() as *const _), b);
            _mm512_mask_storeu_epi32(out.add(16) as *mut i32, mask16(cols - 16), hi);
        }
    }

    /// The `vpermt2w` indices interleaving columns `first..first + 16` of two rows.
    const fn interleave_index(first: usize) -> [i16; 32] {
        let mut idx = [0i16; 32];
        let mut e = 0;
        while e < 32 {
            idx[e] = (first + e / 2 + if e % 2 == 1 { 32 } else { 0 }) as i16;
            e += 1;
        }
        idx
    }

    /// [`interleave_pairs`] of bf16 bit patterns, pairs `0..p1`: panel entry `c` of pair row `p` is
    /// `(src[2p][j], src[2p+1][j])` (zero past `k`); `width` is [`super::NR`] (32) or narrower.
    #[target_feature(enable = "avx512f,avx512bw")]
    #[allow(clippy::too_many_arguments)]
    pub(super) unsafe fn interleave_pairs_bf16(
        src: &[u16],
        ld: usize,
        k: usize,
        n: usize,
        width: usize,
        kp: usize,
        p1: usize,
        dst: *mut u32,
    ) {
        // Columns in runs of COLS, each run through every pair row before the next: the writes then go to
        // COLS / width panels at a time (all the panels of a wide row at once ran at half the rate).
        const COLS: usize = 192;
        // Four pair rows of a run (the narrow panels' scratch).
        let mut scratch = [0u32; 4 * COLS];
        for c0 in (0..n).step_by(COLS) {
            let cn = COLS.min(n - c0);
            let mut p = 0;
            // Panels of 12 (MR): four pair rows at a time, whose 4 x 12 entries of a panel are three whole
            // vectors (on a cache line when kp is a multiple of 4), where one masked 12-lane store per pair row
            // straddled lines.
            while width == 12 && p + 4 <= p1 {
                for q in 0..4 {
                    let r0 = src.as_ptr().add(2 * (p + q) * ld + c0);
                    let r1 = if 2 * (p + q) + 1 < k {
                        src.as_ptr().add((2 * (p + q) + 1) * ld + c0)
                    } else {
                        std::ptr::null()
                    };
                    let sc = scratch.as_mut_ptr().add(q * COLS);
                    for j in (0..cn).step_by(32) {
                        let r1j = if r1.is_null() { r1 } else { r1.add(j) };
                        interleave32_bf16(r0.add(j), r1j, (cn - j).min(32), sc.add(j));
                    }
                }
                let sc = scratch.as_ptr();
                for j in (0..cn).step_by(12) {
                    let out = dst.add((((c0 + j) / 12) * kp + p) * 12) as *mut i32;
                    if cn - j < 12 {
                        // A partial last panel: row by row.
                        for q in 0..4 {
                            let row = &scratch[q * COLS + j..q * COLS + cn];
                            scatter_to_panels(row, c0 + j, 12, kp, p + q, dst);
                        }
                        continue;
                    }
                    // Lanes from row q at column j + c sit at sc[q * COLS + j + c]; a merge-masked load at
                    // `row - offset` places that row's first columns in the vector's upper lanes.
                    let row = |q: usize| sc.add(q * COLS + j) as *const i32;
                    let v0 = _mm512_maskz_loadu_epi32(0x0fff, row(0));
                    let v0 = _mm512_mask_loadu_epi32(v0, 0xf000, row(1).wrapping_sub(12));
                    let v1 = _mm512_maskz_loadu_epi32(0x00ff, row(1).add(4));
                    let v1 = _mm512_mask_loadu_epi32(v1, 0xff00, row(2).wrapping_sub(8));
                    let v2 = _mm512_maskz_loadu_epi32(0x000f, row(2).add(8));
                    let v2 = _mm512_mask_loadu_epi32(v2, 0xfff0, row(3).wrapping_sub(4));
                    _mm512_storeu_si512(out as *mut _, v0);
                    _mm512_storeu_si512(out.add(16) as *mut _, v1);
                    _mm512_storeu_si512(out.add(32) as *mut _, v2);
                }
                p += 4;
            }
            for p in p..p1 {
                let r0 = src.as_ptr().add(2 * p * ld + c0);
                let r1 = if 2 * p + 1 < k {
                    src.as_ptr().add((2 * p + 1) * ld + c0)
                } else {
                    std::ptr::null()
                };
                // Column j of the run in the second row (null past k).
                let at = |j: usize| {
                    if r1.is_null() {
                        r1
                    } else {
                        r1.wrapping_add(j)
                    }
                };
                if width == 32 {
                    for j in (0..cn).step_by(32) {
                        let out = dst.add((((c0 + j) / 32) * kp + p) * 32);
                        interleave32_bf16(r0.add(j), at(j), (cn - j).min(32), out);
                    }
                    continue;
                }
                // Narrow panels: whole 32-column runs into an L1 scratch, then one masked copy per panel.
                for j in (0..cn).step_by(32) {
                    interleave32_bf16(
                        r0.add(j),
                        at(j),
                        (cn - j).min(32),
                        scratch.as_mut_ptr().add(j),
                    );
                }
                scatter_to_panels(&scratch[..cn], c0, width, kp, p, dst);
            }
        }
    }

    /// `dst[i]` = `src[i]` rounded to bf16 by `vcvtne2ps2bf16`, the instruction of every packing.
    #[target_feature(enable = "avx512f,avx512bw,avx512bf16")]
    pub(super) unsafe fn round_row(src: &[f32], dst: &mut [u16]) {
        let n = src.len().min(dst.len());
        let mut i = 0;
        while i < n {
            let left = n - i;
            let lo = _mm512_maskz_loadu_ps(mask16(left), src.as_ptr().add(i));
            let hi =
                _mm512_maskz_loadu_ps(mask16(left.saturating_sub(16)), src.as_ptr().add(i + 16));
            let v: __m512i = std::mem::transmute(_mm512_cvtne2ps_pbh(hi, lo));
            _mm512_mask_storeu_epi16(dst.as_mut_ptr().add(i) as *mut i16, mask32(left), v);
            i += 32;
        }
    }

    /// The first `n` (at most 32) of 32 lanes.
    pub(crate) fn mask32(n: usize) -> __mmask32 {
        if n >= 32 {
            u32::MAX
        } else {
            (1u32 << n) - 1
        }
    }

    /// One tile of up to `MR` rows: `c[i][0..cols] (+)= Σ_p a(i, p) · b(p)` over `pn` pairs, `a(i, p)` at
    /// `a[i * rs + p * ps]`, `b(p)` the 32 column pairs at `b[p * 32..]`.
    #[allow(clippy::too_many_arguments)]
    pub(super) unsafe fn tile(
        rows: usize,
        pn: usize,
        a: *const u32,
        rs: usize,
        ps: usize,
        b: *const u32,
        c: *mut f32,
        ldc: usize,
        cols: usize,
        start: Start,
    ) {
        macro_rules! go {
            ($($r:literal)*) => {
                match rows {
                    $($r => kernel::<$r>(pn, a, rs, ps, b, c, ldc, cols, start),)*
                    _ => unreachable!("tile rows"),
                }
            };
        }
        go!(1 2 3 4 5 6 7 8 9 10 11 12)
    }

    #[target_feature(enable = "avx512f,avx512bw,avx512bf16")]
    #[allow(clippy::too_many_arguments)]
    unsafe fn kernel<const R: usize>(
        pn: usize,
        a: *const u32,
        rs: usize,
        ps: usize,
        b: *const u32,
        c: *mut f32,
        ldc: usize,
        cols: usize,
        start: Start,
    ) {
        let mut acc = [[_mm512_setzero_ps(); 2]; R];
        for p in 0..pn {
            let b0: __m512bh = std::mem::transmute(_mm512_loadu_si512(b.add(p * 32) as *const _));
            let b1: __m512bh =
                std::mem::transmute(_mm512_loadu_si512(b.add(p * 32 + 16) as *const _));
            for (i, acc) in acc.iter_mut().enumerate() {
                let av: __m512bh =
                    std::mem::transmute(_mm512_set1_epi32(*a.add(i * rs + p * ps) as i32));
                acc[0] = _mm512_dpbf16_ps(acc[0], av, b0);
                acc[1] = _mm512_dpbf16_ps(acc[1], av, b1);
            }
        }
        let m0 = mask16(cols);
        let c1 = cols.saturating_sub(16);
        let m1 = mask16(c1);
        for (i, acc) in acc.iter().enumerate() {
            let row = c.add(i * ldc);
            let (mut v0, mut v1) = (acc[0], acc[1]);
            let base = match start {
                Start::Zero => None,
                Start::C => Some(row as *const f32),
                Start::Row(bias) => Some(bias),
            };
            if let Some(base) = base {
                v0 = _mm512_add_ps(v0, _mm512_maskz_loadu_ps(m0, base));
                v1 = _mm512_add_ps(v1, _mm512_maskz_loadu_ps(m1, base.add(16)));
            }
            _mm512_mask_storeu_ps(row, m0, v0);
            _mm512_mask_storeu_ps(row.add(16), m1, v1);
        }
    }
}

#[cfg(not(target_arch = "x86_64"))]
mod x86 {
    pub(super) use super::Start;
    pub(super) unsafe fn pairs_of_row(_: &[f32], _: &mut [u32]) {
        unreachable!("bf16 GEMM without AVX-512 BF16")
    }
    #[allow(clippy::too_many_arguments)]
    pub(super) unsafe fn interleave_pairs(
        _: &[f32],
        _: usize,
        _: usize,
        _: usize,
        _: usize,
        _: usize,
        _: usize,
        _: usize,
        _: *mut u32,
    ) {
        unreachable!("bf16 GEMM without AVX-512 BF16")
    }
    pub(super) unsafe fn transpose_pairs(
        _: &[f32],
        _: usize,
        _: usize,
        _: usize,
        _: usize,
        _: &mut [u32],
    ) {
        unreachable!("bf16 GEMM without AVX-512 BF16")
    }
    pub(super) unsafe fn tile_row(_: Option<&[f32]>, _: usize, _: usize, _: &mut [u32]) {
        unreachable!("bf16 GEMM without AVX-512 BF16")
    }
    pub(super) unsafe fn tile_row_bf16(_: Option<&[u16]>, _: usize, _: usize, _: &mut [u32]) {
        unreachable!("bf16 GEMM without AVX-512 BF16")
    }
    #[allow(clippy::too_many_arguments)]
    pub(super) unsafe fn interleave_pairs_bf16(
        _: &[u16],
        _: usize,
        _: usize,
        _: usize,
        _: usize,
        _: usize,
        _: usize,
        _: *mut u32,
    ) {
        unreachable!("bf16 GEMM without AVX-512 BF16")
    }
    #[allow(clippy::too_many_arguments)]
    pub(super) unsafe fn transpose_rows(
        _: &[f32],
        _: usize,
        _: usize,
        _: usize,
        _: usize,
        _: usize,
        _: &mut [u32],
    ) {
        unreachable!("bf16 GEMM without AVX-512 BF16")
    }
    #[allow(clippy::too_many_arguments)]
    pub(super) unsafe fn tile(
        _: usize,
        _: usize,
        _: *const u32,
        _: usize,
        _: usize,
        _: *const u32,
        _: *mut f32,
        _: usize,
        _: usize,
        _: Start,
    ) {
        unreachable!("bf16 GEMM without AVX-512 BF16")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_gemm_mode_decides_whether_bf16_requests_take_the_kernel() {
        assert_eq!("dpbf16".parse(), Ok(Bf16Gemm::Always));
        assert_eq!(" F32 ".parse(), Ok(Bf16Gemm::Never));
        assert_eq!("auto".parse(), Ok(Bf16Gemm::Auto));
        assert!("fast"
            .parse::<Bf16Gemm>()
            .unwrap_err()
            .contains("auto, amx, dpbf16 or f32"));
        assert_eq!("AMX".parse(), Ok(Bf16Gemm::Amx));
        let bf16 = MatmulPrecision::Bf16;
        with_bf16_gemm(Bf16Gemm::Never, || assert!(!use_bf16(bf16, 8)));
        with_bf16_gemm(Bf16Gemm::Always, || {
            assert_eq!(use_bf16(bf16, 8), supported());
            assert!(!use_bf16(MatmulPrecision::Highest, 8));
            // Nested scopes restore the outer mode.
            with_bf16_gemm(Bf16Gemm::Never, || assert_eq!(bf16_gemm(), Bf16Gemm::Never));
            assert_eq!(bf16_gemm(), Bf16Gemm::Always);
        });
        // Auto takes AMX where present, else follows the measured rate ratio of the two register-only loops.
        let ratio = dp_speedup();
        assert_eq!(ratio.is_some(), supported());
        let amx = crate::amx::available();
        with_bf16_gemm(Bf16Gemm::Auto, || {
            let want = if amx {
                Some(Bf16Kernel::Amx)
            } else {
                ratio
                    .is_some_and(|r| r >= MIN_SPEEDUP)
                    .then_some(Bf16Kernel::Dp)
            };
            assert_eq!(kernel(), want);
            assert_eq!(use_bf16(bf16, 8), want.is_some());
        });
        with_bf16_gemm(Bf16Gemm::Amx, || {
            assert_eq!(kernel(), amx.then_some(Bf16Kernel::Amx));
        });
        with_bf16_gemm(Bf16Gemm::Always, || {
            assert_eq!(kernel(), supported().then_some(Bf16Kernel::Dp));
        });
        eprintln!("vdpbf16ps / f32 FMA rate on this CPU: {ratio:?}; AMX: {amx}");
    }

    fn pattern(n: usize, seed: u64) -> Vec<f32> {
        (0..n)
            .map(|i| {
                let h = (i as u64 + 1).wrapping_mul(0x9E37_79B9_7F4A_7C15 ^ seed);
                ((h >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
            })
            .collect()
    }

    #[test]
    fn rounding_is_to_nearest_even() {
        // 1 + 2^-8 is halfway between bf16 1.0 and 1 + 2^-7: ties to even (1.0); just above rounds up.
        assert_eq!(round_bf16(1.0 + 2f32.powi(-8)), 1.0);
        assert_eq!(
            round_bf16(1.0 + 2f32.powi(-8) + 2f32.powi(-20)),
            1.0 + 2f32.powi(-7)
        );
        // 1 + 3·2^-8 is halfway between 1 + 2^-7 (odd) and 1 + 2^-6: ties to the even one.
        assert_eq!(round_bf16(1.0 + 3.0 * 2f32.powi(-8)), 1.0 + 2f32.powi(-6));
        assert_eq!(round_bf16(-2.5), -2.5);
        assert!(round_bf16(f32::NAN).is_nan());
        assert_eq!(round_bf16(f32::INFINITY), f32::INFINITY);
    }

    /// Every packing against a direct f64 product of the bf16-rounded operands, on sizes with partial tiles,
    /// an odd k and more than one cache block of k and of rows, for one kernel.
    fn check_kernel(mode: Bf16Gemm) {
        let amx = mode == Bf16Gemm::Amx;
        for &(m, n, k) in &[
            (1, 1, 1),
            (13, 35, 7),
            (25, 64, 64),
            (200, 33, 600),
            (7, 100, 1),
            // Tall, short, k not a multiple of 32, k past one AMX cache block (512 pairs), m past two row blocks
            // at short k (64 rows) and at long k (256 rows).
            (300, 40, 70),
            (3, 200, 33),
            (17, 16, 1100),
            (290, 96, 96),
            (270, 48, 300),
            // A transposed left operand past one 768-column scratch of the narrow panels' packing, its last
            // panel partial, odd k.
            (790, 20, 5),
        ] {
            let a = pattern(m * k, 1);
            let b = pattern(k * n, 2);
            let c0 = pattern(m * n, 3);
            let ra: Vec<f64> = a.iter().map(|&v| round_bf16(v) as f64).collect();
            let rb: Vec<f64> = b.iter().map(|&v| round_bf16(v) as f64).collect();
            let want = |i: usize, j: usize| -> (f64, f64) {
                let (mut s, mut abs) = (0.0, 0.0);
                for kk in 0..k {
                    s += ra[i * k + kk] * rb[kk * n + j];
                    abs += (ra[i * k + kk] * rb[kk * n + j]).abs();
                }
                (s, abs)
            };
            // a (m, k) row-major; its transpose (k, m) row-major for the transposed packing; b (k, n), bᵀ (n, k).
            let at: Vec<f32> = (0..k * m).map(|t| a[(t % m) * k + t / m]).collect();
            let bt: Vec<f32> = (0..n * k).map(|t| b[(t % k) * n + t / k]).collect();
            let (rows, kp) = if amx {
                pack_tiles(&a, m, k, k)
            } else {
                pack_rows(&a, m, k, k)
            };
            let lhs_t = LhsT::pack(&at, k, m, m);
            let b_kn = pack_kn(&b, k, n, n, NR);
            let b_nk = pack_nk(&bt, n, k, k, NR);
            assert_eq!((b_kn.amx, b_nk.amx), (amx, amx), "{mode:?}: packing kind");
            assert_eq!(matches!(lhs_t, LhsT::Tiles(..)), amx);
            if amx {
                assert!(kp.is_multiple_of(crate::amx::KP_STEP));
            }
            for (lhs, rhs, what) in [
                (
                    if amx {
                        Lhs::Tiles(&rows, kp)
                    } else {
                        Lhs::Rows(&rows, kp)
                    },
                    &b_kn,
                    "rows x kn",
                ),
                (lhs_t.at(0), &b_nk, "transposed x nk"),
            ] {
                for accumulate in [false, true] {
                    let mut c = c0.clone();
                    unsafe { gemm(m, n, &lhs, rhs, c.as_mut_ptr(), n, accumulate) };
                    for i in 0..m {
                        for j in 0..n {
                            let (s, abs) = want(i, j);
                            let s = s + if accumulate {
                                c0[i * n + j] as f64
                            } else {
                                0.0
                            };
                            let err = (c[i * n + j] as f64 - s).abs();
                            assert!(
                                err <= 1e-6 * (abs + 1.0),
                                "{mode:?} {what} acc={accumulate} ({m},{n},{k}) [{i},{j}]: {} vs {s}",
                                c[i * n + j]
                            );
                        }
                    }
                }
            }
            // The strided entry point, every operand layout (as the attention heads use it), with row strides
            // wider than the rows (an operand that is a column slice of a larger matrix).
            let pad = 3;
            let widen = |v: &[f32], rows: usize, cols: usize| -> Vec<f32> {
                let mut w = vec![f32::NAN; rows * (cols + pad)];
                for r in 0..rows {
                    w[r * (cols + pad)..r * (cols + pad) + cols]
                        .copy_from_slice(&v[r * cols..(r + 1) * cols]);
                }
                w
            };
            let (aw, bw) = (widen(&a, m, k), widen(&b, k, n));
            let (atw, btw) = (widen(&at, k, m), widen(&bt, n, k));
            for (lhs, rhs, what) in [
                (
                    (&aw, 1isize, (k + pad) as isize),
                    (&bw, 1isize, (n + pad) as isize),
                    "a, b",
                ),
                (
                    (&atw, (m + pad) as isize, 1),
                    (&btw, (k + pad) as isize, 1),
                    "aᵀ, bᵀ",
                ),
            ] {
                let mut c = vec![0f32; m * n];
                with_bf16_gemm(mode, || unsafe {
                    gemm_strided(
                        m,
                        n,
                        k,
                        (c.as_mut_ptr(), 1, n as isize),
                        (lhs.0.as_ptr(), lhs.1, lhs.2),
                        (rhs.0.as_ptr(), rhs.1, rhs.2),
                    )
                });
                for i in 0..m {
                    for j in 0..n {
                        let (s, abs) = want(i, j);
                        let err = (c[i * n + j] as f64 - s).abs();
                        assert!(
                            err <= 1e-6 * (abs + 1.0),
                            "{mode:?} strided {what} ({m},{n},{k}) [{i},{j}]"
                        );
                    }
                }
            }
            // A row range starting at a later granule gives the same rows as the whole product.
            let g = lhs_t.granule();
            if m > g {
                let (mut whole, mut tail) = (vec![0f32; m * n], vec![0f32; (m - g) * n]);
                unsafe {
                    gemm(m, n, &lhs_t.at(0), &b_nk, whole.as_mut_ptr(), n, false);
                    gemm(m - g, n, &lhs_t.at(g), &b_nk, tail.as_mut_ptr(), n, false);
                }
                assert_eq!(
                    &whole[g * n..],
                    &tail[..],
                    "{mode:?} rows from {g} ({m},{n},{k})"
                );
            }
        }
    }

    #[test]
    fn gemm_matches_the_product_of_rounded_operands() {
        if !supported() {
            eprintln!("skipped: no AVX-512 BF16 on this CPU");
            return;
        }
        with_bf16_gemm(Bf16Gemm::Always, || check_kernel(Bf16Gemm::Always));
    }

    /// The AMX kernel on the same cases (see [`amx_test_pass_runs`] where AMX is absent).
    #[test]
    fn amx_gemm_matches_the_product_of_rounded_operands() {
        if !amx_test_pass_runs("the AMX GEMM") {
            return;
        }
        with_bf16_gemm(Bf16Gemm::Amx, || check_kernel(Bf16Gemm::Amx));
    }

    /// `gemm_rows_src` on each bf16 source of the `(m, k)` values `a` (bit patterns, each named for the message)
    /// against the same values packed from f32, `b` packed `(k, n)`: the same bits from zeros, onto `c` and from
    /// a bias.
    fn assert_bf16_rows_give_the_f32_bits(
        (m, n, k): (usize, usize, usize),
        a: &[f32],
        b: &Packed,
        sources: &[(&[u16], &str)],
    ) {
        let bias = pattern(n, 4);
        let c0 = pattern(m * n, 3);
        for init in [
            crate::amx::Init::Zero,
            crate::amx::Init::Load,
            crate::amx::Init::Bias(&bias),
        ] {
            let mut want = c0.clone();
            // SAFETY: a is (m, k), b packed (k, n) for this thread's kernel (which the callers checked the CPU
            // has), want (m, n), the bias n values.
            unsafe { gemm_rows_src(m, n, k, Rows::F32(a), b, want.as_mut_ptr(), n, init) };
            for &(src, what) in sources {
                let mut got = c0.clone();
                // SAFETY: as above, src (m, k).
                unsafe { gemm_rows_src(m, n, k, Rows::Bf16(src), b, got.as_mut_ptr(), n, init) };
                let same = got
                    .iter()
                    .zip(&want)
                    .all(|(g, w)| g.to_bits() == w.to_bits());
                assert!(same, "{m}x{n}x{k}, {init:?}, {what}");
            }
        }
    }

    /// bf16 rows read in place by the AMX kernel (k a multiple of 32: whole 32-row blocks straight from the
    /// rows, the rest packed) against the same values packed from f32: the same bits, from zeros, onto `c` and
    /// from a bias, with no whole block, one, several past the row blocks at short and long k, a partial last
    /// one, and k past one cache block (512 pairs).
    #[test]
    fn amx_reads_bf16_rows_in_place_with_the_packed_bits() {
        if !amx_test_pass_runs("the AMX GEMM") {
            return;
        }
        with_bf16_gemm(Bf16Gemm::Amx, || {
            for &(m, n, k) in &[
                (31usize, 20usize, 64usize),
                (32, 33, 32),
                (95, 70, 64),
                (64, 64, 192),
                (257, 96, 768),
                (300, 40, 1056),
            ] {
                let a: Vec<f32> = pattern(m * k, 1).into_iter().map(round_bf16).collect();
                let a16: Vec<u16> = a.iter().map(|&v| to_bf16_bits(v)).collect();
                let b = pack_nk(&pattern(n * k, 2), n, k, k, NR);
                assert!(b.amx && b.kp == k / 2);
                assert_bf16_rows_give_the_f32_bits((m, n, k), &a, &b, &[(&a16, "in place")]);
            }
        });
    }

    /// bf16 rows read in place by the `vdpbf16ps` kernel (an even k, rows on a 4-byte boundary: no packing at
    /// all) against the same values packed from f32: the same bits, from zeros, onto `c` and from a bias; an
    /// odd k and rows off a 4-byte boundary take the packing instead, with the same bits too.
    #[test]
    fn dp_reads_bf16_rows_in_place_with_the_packed_bits() {
        if !supported() {
            eprintln!("BF16 GEMM TEST NOT RUN: this CPU has no AVX-512 BF16");
            return;
        }
        with_bf16_gemm(Bf16Gemm::Always, || {
            for &(m, n, k) in &[
                (1usize, 1usize, 2usize),
                (12, 40, 1),
                (13, 35, 7),
                (31, 20, 64),
                (200, 33, 600),
                (257, 96, 768),
            ] {
                let a: Vec<f32> = pattern(m * k, 1).into_iter().map(round_bf16).collect();
                // The bf16 values in two u32 buffers (4-byte aligned): from the first u16 of one (on the
                // boundary) and from the second u16 of the other (off it).
                let bits: Vec<u16> = a.iter().map(|&v| to_bf16_bits(v)).collect();
                let fill = |from: usize| -> Vec<u32> {
                    let mut store = vec![0u32; (from + m * k).div_ceil(2)];
                    // SAFETY: the u32 buffer viewed as its 2 * len u16s.
                    let halves = unsafe {
                        std::slice::from_raw_parts_mut(
                            store.as_mut_ptr() as *mut u16,
                            2 * store.len(),
                        )
                    };
                    halves[from..from + m * k].copy_from_slice(&bits);
                    store
                };
                let (on_store, off_store) = (fill(0), fill(1));
                // SAFETY: as in fill.
                let view = |s: &[u32], from: usize| unsafe {
                    &std::slice::from_raw_parts(s.as_ptr() as *const u16, 2 * s.len())
                        [from..from + m * k]
                };
                let (on, off) = (view(&on_store, 0), view(&off_store, 1));
                assert_eq!(
                    pairs_in_place(Rows::Bf16(on), m, k).is_some(),
                    k % 2 == 0,
                    "{m}x{k}: in place exactly for an even k"
                );
                assert!(pairs_in_place(Rows::Bf16(off), m, k).is_none());
                let b = pack_nk(&pattern(n * k, 2), n, k, k, NR);
                assert!(!b.amx);
                let sources = [(on, "in place"), (off, "off the boundary")];
                assert_bf16_rows_give_the_f32_bits((m, n, k), &a, &b, &sources);
            }
        });
    }

    /// Every packing starts on a cache line, for each kernel's layout and for sizes glibc serves from its
    /// heap (16-byte aligned) as well as large ones, with the system allocator this test binary has.
    #[test]
    fn packings_start_on_a_cache_line() {
        let line = |p: *const u32| (p as usize).is_multiple_of(64);
        on_each_bf16_kernel("packings_start_on_a_cache_line", || {
            // Several allocations of each size, so that one aligned by chance does not pass.
            for &(m, k) in &[(3usize, 5usize), (17, 40), (40, 17), (70, 130), (300, 64)] {
                for _ in 0..4 {
                    let src = pattern(m * k, 3);
                    assert!(
                        line(pack_nk(&src, m, k, k, NR).data.as_ptr()),
                        "pack_nk {m}x{k}"
                    );
                    assert!(
                        line(pack_kn(&src, k, m, m, NR).data.as_ptr()),
                        "pack_kn {m}x{k}"
                    );
                    assert!(
                        line(pack_rows(&src, m, k, k).0.as_ptr()),
                        "pack_rows {m}x{k}"
                    );
                    let lhs = LhsT::pack(&src, k, m, m);
                    let p = match &lhs {
                        LhsT::Panels(p) => p.data.as_ptr(),
                        LhsT::Tiles(t, _) => t.as_ptr(),
                    };
                    assert!(line(p), "LhsT::pack {m}x{k}");
                    assert!(
                        line(pack_tiles(&src, m, k, k).0.as_ptr()),
                        "pack_tiles {m}x{k}"
                    );
                }
            }
        });
    }

    /// Packing bf16 rows gives the panels of packing their f32 values (which round to themselves), entry for
    /// entry with the padding, for both panel widths and each kernel's layout (AMX pads k): k odd, even and
    /// past a multiple of 4 (the 12-wide panels go four pair rows at a time), n across the 192-column runs and
    /// with partial last panels, `ld` > n.
    #[test]
    fn bf16_rows_pack_as_their_f32_values() {
        on_each_bf16_kernel("bf16_rows_pack_as_their_f32_values", || {
            let mode = bf16_gemm();
            for &(k, n) in &[
                (1usize, 1usize),
                (7, 12),
                (8, 13),
                (9, 200),
                (64, 384),
                (30, 401),
                (17, 36),
            ] {
                for ld in [n, n + 5] {
                    let f: Vec<f32> = pattern(k * ld, 11).into_iter().map(round_bf16).collect();
                    let b: Vec<u16> = f.iter().map(|&v| to_bf16_bits(v)).collect();
                    for width in [NR, MR] {
                        let want = pack_kn_in(&f, k, n, ld, width, false);
                        let got = pack_kn_bf16(&b, k, n, ld, width);
                        assert_eq!(
                            (got.kp, got.width, got.amx),
                            (want.kp, want.width, want.amx)
                        );
                        assert!(
                            got.data[..] == want.data[..],
                            "{k} x {n} (ld {ld}) in panels of {width}, {mode:?}"
                        );
                    }
                }
            }
        });
    }

    /// `gemm_rows_src` from a bias (the tiles started from the bias row) against `gemm_rows` accumulating onto rows
    /// that hold the bias: the same bits, on each kernel, over whole and partial 32 x 32 blocks, several k and row
    /// blocks, and an empty k (the bias alone).
    #[test]
    fn gemm_rows_from_a_bias_equals_accumulating_onto_bias_rows() {
        on_each_bf16_kernel(
            "gemm_rows_from_a_bias_equals_accumulating_onto_bias_rows",
            || {
                let mode = bf16_gemm();
                for &(m, n, k) in &[
                    (37usize, 70usize, 0usize),
                    (37, 70, 5),
                    (300, 33, 64),
                    (64, 64, 40),
                    // Three k blocks of the vdpbf16ps loop (KC pairs each) and two row blocks (MC rows).
                    (200, 70, 1100),
                ] {
                    let a = pattern(m * k, 1);
                    let bias = pattern(n, 4);
                    let b = pack_nk(&pattern(n * k, 2), n, k, k, NR);
                    assert_eq!(
                        b.amx,
                        mode == Bf16Gemm::Amx,
                        "{mode:?} packs for its kernel"
                    );
                    let mut got = vec![f32::NAN; m * n];
                    let mut want: Vec<f32> = (0..m * n).map(|i| bias[i % n]).collect();
                    // SAFETY: a is (m, k), b packed (k, n), got and want (m, n), bias n values; the CPU has
                    // the kernel (checked above).
                    unsafe {
                        let init = crate::amx::Init::Bias(&bias);
                        gemm_rows_src(m, n, k, Rows::F32(&a), &b, got.as_mut_ptr(), n, init);
                        gemm_rows(m, n, k, &a, &b, want.as_mut_ptr(), n, true);
                    }
                    assert!(
                        got.iter()
                            .zip(&want)
                            .all(|(g, w)| g.to_bits() == w.to_bits()),
                        "{m}x{n}x{k}, {mode:?}"
                    );
                }
            },
        );
    }
}
