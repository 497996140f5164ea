//! The AMX bf16 GEMM behind [`crate::fused::MatmulPrecision::Bf16`] on CPUs with Intel AMX (Sapphire Rapids
//! and later): the operands packed by [`crate::bf16`] (k padded to [`KP_STEP`] pairs, left rows to [`TILE`]),
//! multiplied by `tdpbf16ps` into 16 x 16 f32 tiles. One tile instruction does 16 x 16 x 32 multiply-adds;
//! on this project's Intel Xeon (family 6 model 207) a register-only loop of them reaches ~2.2 TFLOP/s per
//! core, 13x the f32 AVX-512 FMA loop.
//!
//! The micro-kernel keeps a 32 x 32 block of the output in four tile registers (tmm0-3), the two 16-row
//! slices of the left operand in tmm4-5 and the two 16-column halves of a right panel ([`crate::bf16::NR`]
//! = 32 columns) in tmm6-7, and walks k 16 pairs at a time. Stable Rust reaches the tile instructions through
//! `asm!`; Linux hands out the tile state only after `arch_prctl(ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA)`,
//! which [`available`] asks for once per process.

use crate::bf16::{Packed, NR};

/// k-pairs per tile step (one 64-byte tile row of bf16 pairs): the packings pad k to a multiple of it.
pub(crate) const KP_STEP: usize = 16;
/// Rows of a left-operand tile: the row packings pad the rows to a multiple of it.
pub(crate) const TILE: usize = 16;
/// Rows per cache block of the left operand when k is short (at most [`SHORT_K`] pairs): its slice, at most
/// 32 KiB, stays in L1 beside a right panel's.
const MC_SHORT: usize = 64;
/// Rows per cache block of the left operand otherwise (its `MC x KC` pairs, 512 KiB, stay in L2).
const MC_LONG: usize = 256;
/// The k (in pairs) up to which [`MC_SHORT`] applies.
const SHORT_K: usize = 128;
/// k-pairs per cache block (a right panel's slice, `KC x NR` pairs = 64 KiB, stays in L2 across a row block).
const KC: usize = 512;

/// Whether this CPU and OS run the AMX kernel: CPUID reports AMX-TILE and AMX-BF16 (leaf 7, EDX bits 24 and
/// 22), the packings' AVX-512 BF16 is there, and Linux granted this process the tile data state. Asked once
/// per process.
pub fn available() -> bool {
    static OK: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *OK.get_or_init(|| {
        #[cfg(all(target_arch = "x86_64", target_os = "linux"))]
        {
            // CPUID leaf 7 exists on every x86_64 CPU that reports AVX-512 (checked first).
            let cpuid_ok = crate::bf16::supported() && {
                let l = std::arch::x86_64::__cpuid_count(7, 0);
                (l.edx >> 24) & 1 == 1 && (l.edx >> 22) & 1 == 1
            };
            // ARCH_REQ_XCOMP_PERM = 0x1023, XFEATURE_XTILEDATA = 18 (arch/x86/include/uapi/asm/prctl.h).
            // SAFETY: a plain syscall with integer arguments; it fails cleanly where unsupported.
            cpuid_ok && unsafe { libc::syscall(libc::SYS_arch_prctl, 0x1023, 18) } == 0
        }
        #[cfg(not(all(target_arch = "x86_64", target_os = "linux")))]
        {
            false
        }
    })
}

/// What the tiles of `c` start from before the first k block.
#[derive(Clone, Copy, Debug)]
pub(crate) enum Init<'a> {
    /// Zeros: `c = a · b`.
    Zero,
    /// `c`'s contents: `c += a · b`.
    Load,
    /// A bias row of `n` values on every row: `c = a · b + bias`, without writing the bias into `c` first
    /// (the tiles load the bias row with a zero stride).
    Bias(&'a [f32]),
}

impl Init<'_> {
    /// [`Init::Load`] when accumulating onto `c`, else [`Init::Zero`].
    pub(crate) fn accumulating(accumulate: bool) -> Self {
        if accumulate {
            Init::Load
        } else {
            Init::Zero
        }
    }
}

/// The left operand of [`gemm`]: where row `i`'s pair `p` lies.
#[derive(Clone, Copy, Debug)]
pub(crate) enum Lhs {
    /// AMX tiles from [`crate::bf16::pack_tiles`] (or [`crate::bf16::LhsT`]), `b.kp` pairs per row: 16-row
    /// blocks of 1 KiB tiles along k, each tile load one contiguous KiB.
    Tiles(*const u32),
    /// Row-major bf16 rows as they are (row `i` at `ptr + i * row_bytes`, `b.kp` pairs each, not padded):
    /// each tile load reads 64 bytes of 16 rows. `m` must be a multiple of 32 (no partial tiles).
    Rows(*const u32, usize),
}

/// `c (m, n) [+]= a (m, k) · b (k, n)`: `a` packed in AMX tiles by [`crate::bf16::pack_tiles`] (or
/// [`crate::bf16::LhsT`]) with `b.kp` pairs per row, or bf16 rows as they are ([`Lhs`]), `b` packed in [`NR`]-column panels with `b.kp` a
/// multiple of [`KP_STEP`]. The tiles of `c` start from `init`: zeros, `c`'s contents (the product is added
/// to `c`) or a bias row.
///
/// Whole 32 x 32 blocks of `c` are loaded into and stored from the tiles directly; the edges go through a
/// buffer, with the same arithmetic (the partial sums of earlier k blocks are accumulated in the tiles), so
/// every output row has the same bits wherever its block starts. While a block computes, the next block's rows
/// of `c` are prefetched for writing: `c` is usually a fresh output, out of cache, and the tile stores would
/// otherwise wait for its lines (the bf16 imagenet/4096 student forward took 11% less time).
///
/// # Safety
/// [`available`] must be true and `b.kp` non-zero (an empty k is [`crate::bf16::gemm`]'s); `c` valid for `m`
/// rows of `n` values at stride `ldc`, not aliasing the operands; `a` valid for `m.next_multiple_of(TILE) *
/// b.kp` values (tiles) or for `m` rows of `b.kp` pairs (rows, `m` a multiple of 32); a bias holds at least `n`
/// values.
pub(crate) unsafe fn gemm(
    m: usize,
    n: usize,
    a: Lhs,
    b: &Packed,
    c: *mut f32,
    ldc: usize,
    init: Init,
) {
    let accumulate = matches!(init, Init::Load);
    if let Init::Bias(bias) = init {
        assert!(
            bias.len() >= n,
            "AMX GEMM: a bias of {} values for {n} columns",
            bias.len()
        );
    }
    let kp = b.kp;
    debug_assert!(kp > 0 && kp.is_multiple_of(KP_STEP) && b.width == NR);
    if let Lhs::Rows(..) = a {
        assert!(
            m.is_multiple_of(32),
            "AMX GEMM: {m} rows of a row-major left operand (whole 32-row blocks only)"
        );
    }
    if m == 0 || n == 0 {
        return;
    }
    // Where the tile of rows `ib..` at pair `p0` starts, the byte stride of its rows, the bytes from one tile
    // step to the next along k, and from its first 16 rows to the next 16.
    let a_at = |ib: usize, p0: usize| match a {
        Lhs::Tiles(p) => (p.add(ib * kp + p0 * TILE), 64, 1024, kp * TILE * 4),
        Lhs::Rows(p, row_bytes) => (
            p.byte_add(ib * row_bytes + p0 * 4),
            row_bytes,
            64,
            TILE * row_bytes,
        ),
    };
    x86::load_config();
    let mut buf = x86::Block([0.0; 32 * 32]);
    let mut bias_row = x86::Row([0.0; NR]);
    let panels = n.div_ceil(NR);
    let ldc_bytes = ldc * 4;
    let mc = if kp <= SHORT_K { MC_SHORT } else { MC_LONG };
    for i0 in (0..m).step_by(mc) {
        let i1 = (i0 + mc).min(m);
        for p0 in (0..kp).step_by(KC) {
            let pn = KC.min(kp - p0);
            let overwrite = p0 == 0 && !accumulate;
            for jp in 0..panels {
                let cols = NR.min(n - jp * NR);
                let bp = b.data.as_ptr().add(jp * kp * NR + p0 * NR);
                if let (true, Init::Bias(bias)) = (overwrite, init) {
                    bias_row.0 = [0.0; NR];
                    bias_row.0[..cols].copy_from_slice(&bias[jp * NR..jp * NR + cols]);
                }
                for ib in (i0..i1).step_by(32) {
                    let rows = 32.min(i1 - ib);
                    let two = rows > TILE;
                    // Row block ib / 16, tile p0 / 16 (see pack_tiles).
                    let (ap, lda, a_step, a_next) = a_at(ib, p0);
                    let cp = c.add(ib * ldc + jp * NR);
                    let whole = rows == 32 && cols == NR;
                    if overwrite {
                        match init {
                            // Row stride 0: every tile row is the bias row of this panel (its aligned
                            // copy: a tile row that straddles two cache lines loads ~6x slower).
                            Init::Bias(_) => x86::init_load(two, bias_row.0.as_ptr(), 0),
                            _ => x86::init_zero(two),
                        }
                    } else if whole {
                        x86::init_load(two, cp, ldc_bytes);
                    } else {
                        x86::read_in(buf.0.as_mut_ptr(), rows, cols, cp, ldc);
                        x86::init_load(two, buf.0.as_ptr(), 128);
                    }
                    // The next block's rows of c, fetched for writing while this block computes: c is
                    // usually a fresh output, out of cache (its lines would otherwise arrive one tile
                    // store at a time).
                    let (nib, njp) = if ib + 32 < i1 {
                        (ib + 32, jp)
                    } else {
                        (i0, jp + 1)
                    };
                    if njp < panels {
                        x86::prefetch_block(
                            c.add(nib * ldc + njp * NR),
                            32.min(i1 - nib),
                            ldc_bytes,
                        );
                    }
                    x86::run(two, (ap, lda, a_step, a_next), bp, pn / KP_STEP);
                    if whole {
                        x86::store(true, cp, ldc_bytes);
                    } else {
                        x86::store(two, buf.0.as_mut_ptr(), 128);
                        x86::write_out(buf.0.as_ptr(), rows, cols, cp, ldc);
                    }
                }
            }
        }
    }
    x86::release();
}

/// Register-only `tdpbf16ps` loop for [`crate::cpu::Ceiling::Bf16Amx`]: `n` iterations of four tile
/// products (16 x 16 x 32 multiply-adds each) on tiles of ones; returns the sum of one output tile.
///
/// # Safety
/// [`available`] must be true.
pub(crate) unsafe fn ceiling_loop(n: u64) -> f64 {
    x86::ceiling_loop(n)
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use crate::bf16::x86::mask16;
    use std::arch::asm;
    use std::arch::x86_64::*;

    /// A 32 x 32 f32 block, 64-byte aligned (tile stores).
    #[repr(C, align(64))]
    pub(super) struct Block(pub [f32; 32 * 32]);

    /// One row of a panel (a bias row), 64-byte aligned (tile loads with stride 0).
    #[repr(C, align(64))]
    pub(super) struct Row(pub [f32; super::NR]);

    /// The 64-byte tile configuration of `ldtilecfg` (palette 1).
    #[repr(C, align(64))]
    struct TileConfig {
        palette: u8,
        start_row: u8,
        reserved: [u8; 14],
        colsb: [u16; 16],
        rows: [u8; 16],
    }

    /// Every one of the 8 tiles 16 rows of 64 bytes.
    pub(super) unsafe fn load_config() {
        let mut cfg = TileConfig {
            palette: 1,
            start_row: 0,
            reserved: [0; 14],
            colsb: [0; 16],
            rows: [0; 16],
        };
        for t in 0..8 {
            cfg.colsb[t] = 64;
            cfg.rows[t] = 16;
        }
        asm!("ldtilecfg [{}]", in(reg) &cfg as *const TileConfig, options(nostack, readonly));
    }

    /// Hand the tile state back (a thread in the tile state costs more to switch and save).
    pub(super) unsafe fn release() {
        asm!("tilerelease", options(nostack, nomem));
    }

    /// Prefetch for writing the two cache lines (32 f32) of each of `rows` rows of `c` (`ldc` bytes apart).
    /// A prefetch never faults: the second line of an edge row may lie past `c`'s end (the addresses are
    /// formed with wrapping arithmetic, never dereferenced).
    #[inline]
    pub(super) unsafe fn prefetch_block(c: *const f32, rows: usize, ldc: usize) {
        let c = c as *const i8;
        for r in 0..rows {
            let row = c.wrapping_byte_add(r * ldc);
            _mm_prefetch::<_MM_HINT_ET0>(row);
            _mm_prefetch::<_MM_HINT_ET0>(row.wrapping_byte_add(64));
        }
    }

    /// Zero the accumulator tiles (tmm0-1, and tmm2-3 with `two`).
    #[inline]
    pub(super) unsafe fn init_zero(two: bool) {
        asm!("tilezero tmm0", "tilezero tmm1", options(nostack, nomem));
        if two {
            asm!("tilezero tmm2", "tilezero tmm3", options(nostack, nomem));
        }
    }

    /// Load the accumulator tiles (rows 0-15, and 16-31 with `two`) from f32 at `c` (row stride `ldc` bytes).
    #[inline]
    pub(super) unsafe fn init_load(two: bool, c: *const f32, ldc: usize) {
        asm!(
            "tileloadd tmm0, [{c} + {ldc}*1]",
            "tileloadd tmm1, [{c} + {ldc}*1 + 64]",
            c = in(reg) c,
            ldc = in(reg) ldc,
            options(nostack, readonly),
        );
        if two {
            asm!(
                "tileloadd tmm2, [{c} + {ldc}*1]",
                "tileloadd tmm3, [{c} + {ldc}*1 + 64]",
                c = in(reg) c.byte_add(16 * ldc),
                ldc = in(reg) ldc,
                options(nostack, readonly),
            );
        }
    }

    /// Store the accumulator tiles (rows 0-15, and 16-31 with `two`) to `c` (row stride `ldc` bytes).
    #[inline]
    pub(super) unsafe fn store(two: bool, c: *mut f32, ldc: usize) {
        asm!(
            "tilestored [{c} + {ldc}*1], tmm0",
            "tilestored [{c} + {ldc}*1 + 64], tmm1",
            c = in(reg) c,
            ldc = in(reg) ldc,
            options(nostack),
        );
        if two {
            asm!(
                "tilestored [{c} + {ldc}*1], tmm2",
                "tilestored [{c} + {ldc}*1 + 64], tmm3",
                c = in(reg) c.byte_add(16 * ldc),
                ldc = in(reg) ldc,
                options(nostack),
            );
        }
    }

    /// Accumulate `steps` tile steps: `a = (first, lda, step, next)`: the first tile of 16 rows (rows `lda`
    /// bytes apart; with `two`, the next 16 rows' tile at `first + next`), tiles `step` bytes apart along k
    /// (packed tiles: 64, 1 KiB, the block's bytes; rows as they are: the row's bytes, 64, 16 rows' bytes);
    /// `b` a panel of 32 columns (128 bytes per pair row, 2 KiB per step).
    #[inline]
    pub(super) unsafe fn run(
        two: bool,
        a: (*const u32, usize, usize, usize),
        b: *const u32,
        steps: usize,
    ) {
        let (a, lda, a_step, a_next) = a;
        if two {
            asm!(
                "2:",
                "tileloadd tmm4, [{a} + {lda}*1]",
                "tileloadd tmm6, [{b} + {ldb}*1]",
                "tdpbf16ps tmm0, tmm4, tmm6",
                "tileloadd tmm7, [{b} + {ldb}*1 + 64]",
                "tdpbf16ps tmm1, tmm4, tmm7",
                "tileloadd tmm5, [{a2} + {lda}*1]",
                "tdpbf16ps tmm2, tmm5, tmm6",
                "tdpbf16ps tmm3, tmm5, tmm7",
                "add {a}, {step}",
                "add {a2}, {step}",
                "add {b}, 2048",
                "dec {n}",
                "jnz 2b",
                a = inout(reg) a => _,
                a2 = inout(reg) a.byte_add(a_next) => _,
                b = inout(reg) b => _,
                n = inout(reg) steps => _,
                step = in(reg) a_step,
                lda = in(reg) lda,
                ldb = in(reg) 128usize,
                options(nostack, readonly),
            );
        } else {
            asm!(
                "2:",
                "tileloadd tmm4, [{a} + {lda}*1]",
                "tileloadd tmm6, [{b} + {ldb}*1]",
                "tileloadd tmm7, [{b} + {ldb}*1 + 64]",
                "tdpbf16ps tmm0, tmm4, tmm6",
                "tdpbf16ps tmm1, tmm4, tmm7",
                "add {a}, {step}",
                "add {b}, 2048",
                "dec {n}",
                "jnz 2b",
                a = inout(reg) a => _,
                b = inout(reg) b => _,
                n = inout(reg) steps => _,
                step = in(reg) a_step,
                lda = in(reg) lda,
                ldb = in(reg) 128usize,
                options(nostack, readonly),
            );
        }
    }

    /// `buf[i][j] = c[i][j]` for the `rows x cols` edge block of `c`, zeros elsewhere in the 32 x 32 block.
    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn read_in(
        buf: *mut f32,
        rows: usize,
        cols: usize,
        c: *const f32,
        ldc: usize,
    ) {
        let m0 = mask16(cols);
        let m1 = mask16(cols.saturating_sub(16));
        for i in 0..32 {
            let (v0, v1) = if i < rows {
                let row = c.add(i * ldc);
                (
                    _mm512_maskz_loadu_ps(m0, row),
                    _mm512_maskz_loadu_ps(m1, row.add(16)),
                )
            } else {
                (_mm512_setzero_ps(), _mm512_setzero_ps())
            };
            _mm512_store_ps(buf.add(i * 32), v0);
            _mm512_store_ps(buf.add(i * 32 + 16), v1);
        }
    }

    /// `c[i][0..cols] = buf[i][0..cols]` for the first `rows` rows of the 32 x 32 block.
    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn write_out(
        buf: *const f32,
        rows: usize,
        cols: usize,
        c: *mut f32,
        ldc: usize,
    ) {
        let m0 = mask16(cols);
        let m1 = mask16(cols.saturating_sub(16));
        for i in 0..rows {
            let row = c.add(i * ldc);
            _mm512_mask_storeu_ps(row, m0, _mm512_load_ps(buf.add(i * 32)));
            if m1 != 0 {
                _mm512_mask_storeu_ps(row.add(16), m1, _mm512_load_ps(buf.add(i * 32 + 16)));
            }
        }
    }

    pub(super) unsafe fn ceiling_loop(n: u64) -> f64 {
        // bf16 1.0 is 0x3f80: 16 rows of 32 ones.
        let ones = [0x3f80_3f80u32; 16 * 16];
        let mut out = Block([0.0; 32 * 32]);
        load_config();
        asm!(
            "tilezero tmm0",
            "tilezero tmm1",
            "tilezero tmm2",
            "tilezero tmm3",
            "tileloadd tmm4, [{a} + {ld}*1]",
            "tileloadd tmm5, [{a} + {ld}*1]",
            "tileloadd tmm6, [{a} + {ld}*1]",
            "tileloadd tmm7, [{a} + {ld}*1]",
            "2:",
            "tdpbf16ps tmm0, tmm4, tmm6",
            "tdpbf16ps tmm1, tmm4, tmm7",
            "tdpbf16ps tmm2, tmm5, tmm6",
            "tdpbf16ps tmm3, tmm5, tmm7",
            "dec {n}",
            "jnz 2b",
            "tilestored [{c} + {ldc}*1], tmm0",
            a = in(reg) ones.as_ptr(),
            ld = in(reg) 64usize,
            n = inout(reg) n.max(1) => _,
            c = in(reg) out.0.as_mut_ptr(),
            ldc = in(reg) 128usize,
            options(nostack),
        );
        release();
        (0..16)
            .flat_map(|i| out.0[i * 32..i * 32 + 16].iter())
            .map(|&v| v as f64)
            .sum()
    }
}

#[cfg(not(target_arch = "x86_64"))]
mod x86 {
    pub(super) struct Block(pub [f32; 32 * 32]);
    pub(super) struct Row(pub [f32; super::NR]);
    pub(super) unsafe fn load_config() {
        unreachable!("AMX GEMM off x86_64")
    }
    pub(super) unsafe fn release() {}
    pub(super) unsafe fn prefetch_block(_: *const f32, _: usize, _: usize) {}
    pub(super) unsafe fn init_zero(_: bool) {}
    pub(super) unsafe fn init_load(_: bool, _: *const f32, _: usize) {}
    pub(super) unsafe fn read_in(_: *mut f32, _: usize, _: usize, _: *const f32, _: usize) {}
    pub(super) unsafe fn store(_: bool, _: *mut f32, _: usize) {}
    pub(super) unsafe fn run(
        _: bool,
        _: (*const u32, usize, usize, usize),
        _: *const u32,
        _: usize,
    ) {
    }
    pub(super) unsafe fn write_out(_: *const f32, _: usize, _: usize, _: *mut f32, _: usize) {}
    pub(super) unsafe fn ceiling_loop(_: u64) -> f64 {
        0.0
    }
}
