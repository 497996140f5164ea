//! What this CPU offers the kernels: its model and the flags that pick a kernel, the GEMM path each matmul
//! precision takes on it, and its arithmetic ceilings measured with register-only loops (the yardstick for
//! "what fraction of this CPU does the step use").

use crate::fused::MatmulPrecision;

/// The flags that decide a kernel path here, in the order they are reported.
pub const FLAGS: [&str; 7] = [
    "avx2",
    "fma",
    "avx512f",
    "avx512bw",
    "avx512_bf16",
    "amx_tile",
    "amx_bf16",
];

/// The CPU as `/proc/cpuinfo` names it.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct CpuInfo {
    /// `model name`, e.g. "Intel(R) Xeon(R) Processor".
    pub model_name: String,
    /// x86 `cpu family` (25 Zen 4, 26 Zen 5, 6 Intel).
    pub family: Option<u32>,
    /// x86 `model`.
    pub model: Option<u32>,
    /// Which of [`FLAGS`] the kernel reports for this CPU.
    pub flags: Vec<&'static str>,
}

impl CpuInfo {
    /// Read `/proc/cpuinfo` (Linux); empty fields elsewhere.
    pub fn detect() -> Self {
        Self::parse(&std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default())
    }

    /// Parse the first processor of a `/proc/cpuinfo` text.
    pub fn parse(text: &str) -> Self {
        let field = |key: &str| {
            text.lines()
                .filter_map(|l| l.split_once(':'))
                .find(|(k, _)| k.trim() == key)
                .map(|(_, v)| v.trim().to_string())
        };
        let flags: Vec<String> = field("flags")
            .unwrap_or_default()
            .split_whitespace()
            .map(str::to_string)
            .collect();
        Self {
            model_name: field("model name").unwrap_or_default(),
            family: field("cpu family").and_then(|v| v.parse().ok()),
            model: field("model").and_then(|v| v.parse().ok()),
            flags: FLAGS
                .iter()
                .copied()
                .filter(|f| flags.iter().any(|g| g == f))
                .collect(),
        }
    }

    /// Whether the CPU reports `flag` (one of [`FLAGS`]).
    pub fn has(&self, flag: &str) -> bool {
        self.flags.contains(&flag)
    }

    /// The model name with its x86 family and model, e.g. `AMD EPYC (family 26 model 2)`; None when
    /// `/proc/cpuinfo` gave no model name.
    pub fn name(&self) -> Option<String> {
        if self.model_name.is_empty() {
            return None;
        }
        Some(match (self.family, self.model) {
            (Some(f), Some(m)) => format!("{} (family {f} model {m})", self.model_name),
            _ => self.model_name.clone(),
        })
    }

    /// One line: `Intel(R) Xeon(R) Processor (family 6 model 207; avx2 fma avx512f ...)`.
    pub fn describe(&self) -> String {
        let fm = match (self.family, self.model) {
            (Some(f), Some(m)) => format!("family {f} model {m}; "),
            _ => String::new(),
        };
        let flags = if self.flags.is_empty() {
            "none of the kernel flags".to_string()
        } else {
            self.flags.join(" ")
        };
        format!("{} ({fm}{flags})", self.model_name)
    }
}

/// The GEMM the linear layers' products take on this CPU at `precision` (on the calling thread, see
/// [`crate::bf16::Bf16Gemm`]), with why bf16 requests run in f32 where they do (the measured `vdpbf16ps`
/// rate, which varies a little between processes: [`gemm_kernel`] is the same text without it).
pub fn gemm_path(precision: MatmulPrecision) -> String {
    let kernel = gemm_kernel(precision);
    if precision != MatmulPrecision::Bf16 || kernel.starts_with("bf16") {
        return kernel;
    }
    match crate::bf16::dp_speedup() {
        Some(r) => {
            format!("{kernel} (bf16 requested; vdpbf16ps runs at {r:.2}x the f32 FMA rate here)")
        }
        None => format!("{kernel} (bf16 requested; no AVX-512 BF16)"),
    }
}

/// Which GEMM kernel the linear layers' products take on this CPU at `precision` (on the calling thread),
/// e.g. `f32: gemm 0.19 AVX-512 kernels` or `bf16: dino-kernels vdpbf16ps (AVX-512 BF16), f32 accumulation`:
/// the same text in every process on this CPU.
pub fn gemm_kernel(precision: MatmulPrecision) -> String {
    match (precision, crate::bf16::kernel()) {
        (MatmulPrecision::Bf16, Some(crate::bf16::Bf16Kernel::Amx)) => {
            return "bf16: dino-kernels AMX tdpbf16ps tiles, f32 accumulation".into()
        }
        (MatmulPrecision::Bf16, Some(crate::bf16::Bf16Kernel::Dp)) => {
            return "bf16: dino-kernels vdpbf16ps (AVX-512 BF16), f32 accumulation".into()
        }
        _ => {}
    }
    #[cfg(target_arch = "x86_64")]
    {
        if std::arch::is_x86_feature_detected!("avx512f") {
            return "f32: gemm 0.19 AVX-512 kernels".into();
        }
        if std::arch::is_x86_feature_detected!("fma") {
            return "f32: gemm 0.19 AVX2+FMA kernels".into();
        }
    }
    "f32: gemm 0.19 portable kernels".into()
}

/// A register-only arithmetic loop whose rate bounds what a kernel can reach.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ceiling {
    /// f32 FMA on 512-bit vectors (`vfmadd` zmm), 32 FLOP per instruction.
    F32Avx512,
    /// f32 FMA on 256-bit vectors (`vfmadd` ymm), 16 FLOP per instruction.
    F32Avx2,
    /// bf16 pair dot products into f32 (`vdpbf16ps` zmm), 64 FLOP per instruction.
    Bf16Avx512,
    /// AMX bf16 tile products into f32 (`tdpbf16ps`, 16 x 16 x 32), 16,384 FLOP per instruction.
    Bf16Amx,
}

impl Ceiling {
    /// Every ceiling, in report order.
    pub const ALL: [Ceiling; 4] = [
        Ceiling::F32Avx512,
        Ceiling::F32Avx2,
        Ceiling::Bf16Avx512,
        Ceiling::Bf16Amx,
    ];

    /// Short name, e.g. `f32_avx512`.
    pub fn name(self) -> &'static str {
        match self {
            Ceiling::F32Avx512 => "f32_avx512",
            Ceiling::F32Avx2 => "f32_avx2",
            Ceiling::Bf16Avx512 => "bf16_avx512",
            Ceiling::Bf16Amx => "bf16_amx",
        }
    }

    /// Whether this CPU runs the loop's instructions.
    pub fn supported(self) -> bool {
        #[cfg(target_arch = "x86_64")]
        {
            match self {
                Ceiling::F32Avx512 => std::arch::is_x86_feature_detected!("avx512f"),
                Ceiling::F32Avx2 => {
                    std::arch::is_x86_feature_detected!("avx2")
                        && std::arch::is_x86_feature_detected!("fma")
                }
                Ceiling::Bf16Avx512 => crate::bf16::supported(),
                Ceiling::Bf16Amx => crate::amx::available(),
            }
        }
        #[cfg(not(target_arch = "x86_64"))]
        {
            false
        }
    }

    /// Independent accumulators of the loop, one instruction each per iteration: [`F32_ACCUMULATORS`] for the
    /// f32 FMA loops, [`BF16_ACCUMULATORS`] for `vdpbf16ps`, 4 tiles for AMX.
    pub fn accumulators(self) -> usize {
        match self {
            Ceiling::F32Avx512 | Ceiling::F32Avx2 => F32_ACCUMULATORS,
            Ceiling::Bf16Avx512 => BF16_ACCUMULATORS,
            Ceiling::Bf16Amx => 4,
        }
    }

    /// FLOP of one loop iteration: [`Ceiling::accumulators`] instructions.
    pub fn flop_per_iteration(self) -> f64 {
        let per_instruction = match self {
            Ceiling::F32Avx512 => 32.0,
            Ceiling::F32Avx2 => 16.0,
            Ceiling::Bf16Avx512 => 64.0,
            Ceiling::Bf16Amx => 16.0 * 16.0 * 32.0 * 2.0,
        };
        self.accumulators() as f64 * per_instruction
    }

    /// Run `iterations` of the loop on the calling thread; returns the sum of the accumulators' lanes (so the
    /// loop cannot be optimised away, and a test can check it ran). None where unsupported.
    pub fn run(self, iterations: u64) -> Option<f64> {
        if !self.supported() {
            return None;
        }
        #[cfg(target_arch = "x86_64")]
        // SAFETY: the instructions were detected above.
        unsafe {
            Some(match self {
                Ceiling::F32Avx512 => loops::f32_zmm(iterations),
                Ceiling::F32Avx2 => loops::f32_ymm(iterations),
                Ceiling::Bf16Avx512 => loops::bf16_zmm(iterations),
                Ceiling::Bf16Amx => crate::amx::ceiling_loop(iterations),
            })
        }
        #[cfg(not(target_arch = "x86_64"))]
        {
            let _ = iterations;
            None
        }
    }

    /// GFLOP/s of the loop on `threads` threads at once (each runs `iterations`), timed by the threads
    /// themselves from the first start to the last end; one thread runs on the calling thread. None where
    /// unsupported.
    ///
    /// The threads take their own clocks because a clock read by another thread after the release can start
    /// late: with the calling thread timing a spawned one through a barrier, 14 of 400 f32 runs of 200,000
    /// iterations read faster than 1.5x the median (up to 480,000 GFLOP/s: the caller woke as the loop ended).
    pub fn measure(self, threads: usize, iterations: u64) -> Option<f64> {
        if !self.supported() {
            return None;
        }
        let threads = threads.max(1);
        let timed = || {
            let start = std::time::Instant::now();
            std::hint::black_box(self.run(iterations));
            (start, std::time::Instant::now())
        };
        let spans: Vec<_> = if threads == 1 {
            vec![timed()]
        } else {
            let barrier = std::sync::Barrier::new(threads);
            std::thread::scope(|s| {
                let handles: Vec<_> = (0..threads)
                    .map(|_| {
                        s.spawn(|| {
                            barrier.wait();
                            timed()
                        })
                    })
                    .collect();
                handles.into_iter().filter_map(|h| h.join().ok()).collect()
            })
        };
        let first = spans.iter().map(|s| s.0).min()?;
        let last = spans.iter().map(|s| s.1).max()?;
        let secs = last.duration_since(first).as_secs_f64();
        Some(threads as f64 * iterations as f64 * self.flop_per_iteration() / secs / 1e9)
    }
}

/// Independent accumulators of the `vdpbf16ps` ceiling loop: 24, the `vdpbf16ps` kernel's register tile (12 x 2
/// zmm). On one core of AMD Zen 5 (family 26 model 2) the loop ran at 445-453 GFLOP/s with 12, no more than the
/// GEMM kernel's 440-455 on the ViT's shapes, and at 476-481 with 24 (12 in flight do not hide the
/// instruction's latency there); the f32 FMA loop ran at 236-241 with either count (39th session).
pub const BF16_ACCUMULATORS: usize = 24;

/// Independent accumulators of the f32 FMA ceiling loops (12: enough on every CPU measured, and within the 16
/// ymm registers of AVX2).
pub const F32_ACCUMULATORS: usize = 12;

#[cfg(target_arch = "x86_64")]
mod loops {
    use std::arch::x86_64::*;

    /// Multiplier and addend of the f32 loops: the accumulators grow slowly and stay normal.
    pub const A: f32 = 0.999_999;
    pub const B: f32 = 1.0e-3;

    #[target_feature(enable = "avx512f")]
    pub unsafe fn f32_zmm(n: u64) -> f64 {
        let a = _mm512_set1_ps(A);
        let b = _mm512_set1_ps(B);
        let mut acc = [_mm512_setzero_ps(); super::F32_ACCUMULATORS];
        for _ in 0..n {
            for r in acc.iter_mut() {
                *r = _mm512_fmadd_ps(*r, a, b);
            }
        }
        acc.iter().map(|r| _mm512_reduce_add_ps(*r) as f64).sum()
    }

    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn f32_ymm(n: u64) -> f64 {
        let a = _mm256_set1_ps(A);
        let b = _mm256_set1_ps(B);
        let mut acc = [_mm256_setzero_ps(); super::F32_ACCUMULATORS];
        for _ in 0..n {
            for r in acc.iter_mut() {
                *r = _mm256_fmadd_ps(*r, a, b);
            }
        }
        let mut out = [0f32; 8];
        let mut s = 0f64;
        for r in acc {
            _mm256_storeu_ps(out.as_mut_ptr(), r);
            s += out.iter().map(|v| *v as f64).sum::<f64>();
        }
        s
    }

    #[target_feature(enable = "avx512f,avx512bw,avx512bf16")]
    pub unsafe fn bf16_zmm(n: u64) -> f64 {
        let one = _mm512_cvtne2ps_pbh(_mm512_set1_ps(1.0), _mm512_set1_ps(1.0));
        let mut acc = [_mm512_setzero_ps(); super::BF16_ACCUMULATORS];
        for _ in 0..n {
            for r in acc.iter_mut() {
                *r = _mm512_dpbf16_ps(*r, one, one);
            }
        }
        acc.iter().map(|r| _mm512_reduce_add_ps(*r) as f64).sum()
    }
}

#[cfg(not(target_arch = "x86_64"))]
mod loops {
    pub const A: f32 = 0.999_999;
    pub const B: f32 = 1.0e-3;
}

#[cfg(test)]
mod tests {
    use super::*;

    /// What [`Ceiling::run`] returns after `n` iterations: `n` steps of `acc = acc * a + b` from 0 (or of the
    /// bf16 dot product), summed over the lanes and the accumulators, in f64.
    fn expected_sum(ceiling: Ceiling, n: u64) -> f64 {
        match ceiling {
            Ceiling::F32Avx512 | Ceiling::F32Avx2 => {
                let lanes = if ceiling == Ceiling::F32Avx512 {
                    16.0
                } else {
                    8.0
                };
                let (a, b) = (loops::A as f64, loops::B as f64);
                F32_ACCUMULATORS as f64 * lanes * b * (a.powf(n as f64) - 1.0) / (a - 1.0)
            }
            // Each step adds the pair products 2 * (x * y) with x = y = 1 (exact in bf16) to every lane.
            Ceiling::Bf16Avx512 => BF16_ACCUMULATORS as f64 * 16.0 * 2.0 * n as f64,
            // Each step adds 32 products of ones to each of the 16 x 16 entries of the tile returned.
            Ceiling::Bf16Amx => 16.0 * 16.0 * 32.0 * n as f64,
        }
    }

    #[test]
    fn cpuinfo_flags_and_description() {
        let text = "processor\t: 0\nvendor_id\t: GenuineIntel\ncpu family\t: 6\nmodel\t\t: 143\n\
                    model name\t: Intel(R) Xeon(R) Platinum 8480+\nflags\t\t: fpu avx2 fma avx512f avx512bw \
                    avx512_bf16 amx_bf16 amx_tile avx512_fp16\n\nprocessor\t: 1\nmodel\t\t: 1\n";
        let c = CpuInfo::parse(text);
        assert_eq!((c.family, c.model), (Some(6), Some(143)));
        assert!(c.has("amx_bf16") && c.has("amx_tile") && c.has("avx512_bf16"));
        assert_eq!(
            c.describe(),
            "Intel(R) Xeon(R) Platinum 8480+ (family 6 model 143; avx2 fma avx512f avx512bw avx512_bf16 \
             amx_tile amx_bf16)"
        );
        let none = CpuInfo::parse("model name : Some CPU\nflags : fpu sse2\n");
        assert_eq!(none.describe(), "Some CPU (none of the kernel flags)");
        assert_eq!(
            c.name().as_deref(),
            Some("Intel(R) Xeon(R) Platinum 8480+ (family 6 model 143)")
        );
        assert_eq!(none.name().as_deref(), Some("Some CPU"));
        assert_eq!(CpuInfo::parse("").name(), None);
    }

    /// `gemm_kernel` names the kernel alone (the same text in every process); `gemm_path` adds why a bf16
    /// request runs in f32 (the measured `vdpbf16ps` rate) and otherwise says the same.
    #[test]
    fn gemm_kernel_is_the_path_without_the_measured_rate() {
        use crate::bf16::{with_bf16_gemm, Bf16Gemm};
        let f32_kernel = gemm_kernel(MatmulPrecision::Highest);
        assert!(f32_kernel.starts_with("f32: gemm 0.19 "), "{f32_kernel}");
        assert_eq!(gemm_path(MatmulPrecision::Highest), f32_kernel);
        // bf16 requested, run in f32.
        with_bf16_gemm(Bf16Gemm::Never, || {
            assert_eq!(gemm_kernel(MatmulPrecision::Bf16), f32_kernel);
            let path = gemm_path(MatmulPrecision::Bf16);
            assert!(
                path.starts_with(&format!("{f32_kernel} (bf16 requested; ")),
                "{path}"
            );
        });
        // bf16 products where the CPU has a bf16 kernel: both say which.
        if crate::bf16::supported() {
            with_bf16_gemm(Bf16Gemm::Always, || {
                let k = gemm_kernel(MatmulPrecision::Bf16);
                assert!(k.starts_with("bf16: dino-kernels vdpbf16ps"), "{k}");
                assert_eq!(gemm_path(MatmulPrecision::Bf16), k);
            });
        } else {
            eprintln!("NOT RUN: the bf16 kernel's names (no AVX-512 BF16 on this CPU)");
        }
    }

    /// No measurement reads faster than the hardware can run: two vector instructions per cycle (AMX: two
    /// `tdpbf16ps` per 16 cycles) at 6 GHz, each bound above every x86 core's. Short runs (~0.3 ms), many of
    /// them: with the clock read by another thread than the loop's, 14 of 400 such f32 runs read faster than
    /// 1.5x their median (up to 2000x), so 200 runs would fail this almost surely.
    #[test]
    fn short_ceiling_measurements_never_read_faster_than_the_hardware() {
        for c in Ceiling::ALL {
            let per_cycle = match c {
                Ceiling::Bf16Amx => 2.0 * 16.0 * 16.0 * 32.0 * 2.0 / 16.0,
                _ => 2.0 * c.flop_per_iteration() / c.accumulators() as f64,
            };
            let bound = per_cycle * 6.0;
            if !c.supported() {
                eprintln!("{}: NOT RUN, this CPU lacks its instructions", c.name());
                continue;
            }
            let worst = (0..200)
                .filter_map(|_| c.measure(1, 200_000))
                .fold(0.0f64, f64::max);
            eprintln!(
                "{}: fastest of 200 short runs {worst:.1} GFLOP/s (bound {bound})",
                c.name()
            );
            assert!(worst <= bound, "{}: {worst} GFLOP/s > {bound}", c.name());
        }
    }

    #[test]
    fn the_ceiling_loops_run_every_iteration() {
        let mut ran = 0;
        for c in Ceiling::ALL {
            let n = 20_000;
            match c.run(n) {
                Some(sum) => {
                    let want = expected_sum(c, n);
                    assert!(
                        ((sum - want) / want).abs() < 1e-3,
                        "{}: {sum} vs {want}",
                        c.name()
                    );
                    let g = c.measure(1, 100_000).unwrap();
                    assert!(g.is_finite() && g > 0.1, "{}: {g} GFLOP/s", c.name());
                    for threads in [1, 2] {
                        let g = c.measure(threads, 20_000).unwrap();
                        assert!(
                            g.is_finite() && g > 0.1,
                            "{} on {threads} threads: {g} GFLOP/s",
                            c.name()
                        );
                    }
                    ran += 1;
                }
                None => eprintln!("{}: NOT RUN, this CPU lacks its instructions", c.name()),
            }
        }
        eprintln!(
            "{ran} of {} ceiling loops ran on this CPU",
            Ceiling::ALL.len()
        );
    }
}
