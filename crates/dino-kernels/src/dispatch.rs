//! The one switch between the two implementations every op in this crate has: the CPU fast path (custom
//! ops with hand-written kernels and analytic backward passes, f32/f64 tensors on `Device::Cpu`) and the
//! portable path (composed candle ops whose gradients candle derives, on any device: the path that runs on
//! CUDA). Each op asks [`cpu_fast_path`] once, at its entry; models, the loss and the optimiser never test
//! a device themselves.
//!
//! The portable path can be forced on the CPU (`DINO_KERNELS=portable`, [`set_kernel_path`], or
//! [`with_kernel_path`] for one thread), which is how the golden and gradient tests check, without a GPU,
//! the exact composition that runs on CUDA minus candle's own device kernels.

use std::cell::Cell;
use std::sync::atomic::{AtomicU8, Ordering};

use candle_core::Tensor;

/// Which implementation the ops take.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum KernelPath {
    /// The CPU fast path where the tensors are on the CPU (with a dtype the op's kernel serves), the portable
    /// path elsewhere. The default.
    #[default]
    Auto,
    /// The portable path everywhere, the CPU included.
    Portable,
}

impl std::str::FromStr for KernelPath {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s.trim().to_ascii_lowercase().as_str() {
            "auto" | "fast" => Ok(Self::Auto),
            "portable" => Ok(Self::Portable),
            other => Err(format!(
                "unknown kernel path `{other}` (expected `auto` or `portable`)"
            )),
        }
    }
}

impl std::fmt::Display for KernelPath {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::Auto => "auto",
            Self::Portable => "portable",
        })
    }
}

/// The environment variable read on first use: `auto` or `portable`.
pub const ENV_VAR: &str = "DINO_KERNELS";

// 0: not yet decided (read the environment), 1: Auto, 2: Portable.
static PROCESS: AtomicU8 = AtomicU8::new(0);

thread_local! {
    static THREAD: Cell<Option<KernelPath>> = const { Cell::new(None) };
}

fn encode(p: KernelPath) -> u8 {
    match p {
        KernelPath::Auto => 1,
        KernelPath::Portable => 2,
    }
}

/// The kernel path named by `DINO_KERNELS`: `Ok(None)` when unset, an error naming the variable when its
/// value is neither `auto` nor `portable` (the `dino` binary reports it; the library then keeps `Auto`).
pub fn kernel_path_from_env() -> Result<Option<KernelPath>, String> {
    match std::env::var(ENV_VAR) {
        Ok(v) => v
            .parse()
            .map(Some)
            .map_err(|e| format!("{ENV_VAR}={v:?}: {e}")),
        Err(_) => Ok(None),
    }
}

/// Sets the process-wide kernel path (overrides `DINO_KERNELS`).
pub fn set_kernel_path(path: KernelPath) {
    PROCESS.store(encode(path), Ordering::Relaxed);
}

/// The kernel path in force on the calling thread: a [`with_kernel_path`] scope, else the process-wide one
/// ([`set_kernel_path`], else `DINO_KERNELS`, else `Auto`).
pub fn kernel_path() -> KernelPath {
    if let Some(p) = THREAD.with(|t| t.get()) {
        return p;
    }
    match PROCESS.load(Ordering::Relaxed) {
        1 => KernelPath::Auto,
        2 => KernelPath::Portable,
        _ => {
            let p = kernel_path_from_env().ok().flatten().unwrap_or_default();
            PROCESS.store(encode(p), Ordering::Relaxed);
            p
        }
    }
}

/// Runs `f` with `path` in force on the calling thread (the ops decide at their entry, on the thread that
/// builds the graph; backward passes follow the ops the forward pass chose).
pub fn with_kernel_path<R>(path: KernelPath, f: impl FnOnce() -> R) -> R {
    with_thread_value(&THREAD, Some(path), f)
}

/// Test harness: a `mod portable` holding, for each named test function of the enclosing module, a test of
/// the same name that runs it with [`KernelPath::Portable`] in force, so every check also covers the
/// composed candle ops that run on CUDA (see the module comment). The functions take no argument and return
/// what a test may return (`()` or a `Result`).
///
/// ```text
/// dino_kernels::portable_path_tests!(golden_head_matches_official, every_trainable_parameter_gets_a_gradient);
/// ```
#[macro_export]
macro_rules! portable_path_tests {
    ($($name:ident),+ $(,)?) => {
        /// The same checks through the portable path, forced on the CPU.
        mod portable {
            $(
                #[test]
                fn $name() -> impl ::std::process::Termination {
                    $crate::with_kernel_path($crate::KernelPath::Portable, super::$name)
                }
            )+
        }
    };
}

/// Test harness: a `mod bf16_products` holding, for each named test function of the enclosing module, a test
/// of the same name that runs it under [`crate::MatmulPrecision::Bf16`] once per bf16 kernel of this CPU
/// ([`crate::bf16::on_each_bf16_kernel`]: `vdpbf16ps`, and AMX tiles where present; on a CPU without them it
/// says, loudly, that nothing ran). The functions take no argument and return `()` or a `Result`.
///
/// ```text
/// dino_kernels::bf16_path_tests!(one_backward_pass_reaches_every_parameter);
/// ```
#[macro_export]
macro_rules! bf16_path_tests {
    ($($name:ident),+ $(,)?) => {
        /// The same checks with bf16 products, on each bf16 kernel of this CPU.
        mod bf16_products {
            $(
                #[test]
                fn $name() {
                    $crate::bf16::on_each_bf16_kernel(stringify!($name), || {
                        $crate::dispatch::TestOutcome::check(super::$name(), stringify!($name))
                    })
                }
            )+
        }
    };
}

/// What a test function of [`bf16_path_tests`] returns: `()`, or a `Result` whose error fails the test.
pub trait TestOutcome {
    /// Panics, naming the test, if this outcome is a failure.
    fn check(self, name: &str);
}

impl TestOutcome for () {
    fn check(self, _: &str) {}
}

impl<E: std::fmt::Debug> TestOutcome for Result<(), E> {
    fn check(self, name: &str) {
        if let Err(e) = self {
            panic!("{name} with bf16 products: {e:?}")
        }
    }
}

/// Runs `f` with the thread-local `key` set to `value` on the calling thread, then puts the previous value
/// back (also when `f` panics): the scope of this crate's per-thread switches.
pub(crate) fn with_thread_value<T: Copy + 'static, R>(
    key: &'static std::thread::LocalKey<Cell<T>>,
    value: T,
    f: impl FnOnce() -> R,
) -> R {
    struct Restore<T: Copy + 'static>(&'static std::thread::LocalKey<Cell<T>>, T);
    impl<T: Copy + 'static> Drop for Restore<T> {
        fn drop(&mut self) {
            self.0.with(|c| c.set(self.1));
        }
    }
    let _restore = Restore(key, key.with(|c| c.replace(value)));
    f()
}

/// This crate's per-thread switches as one thread has them: the kernel path, the matmul precision, `no_grad`
/// and the bf16 GEMM mode.
#[derive(Clone, Copy)]
struct Switches {
    path: Option<KernelPath>,
    precision: crate::fused::MatmulPrecision,
    no_grad: bool,
    bf16: Option<crate::bf16::Bf16Gemm>,
}

impl Switches {
    /// The calling thread's switches.
    fn here() -> Self {
        Self {
            path: THREAD.with(|c| c.get()),
            precision: crate::fused::PRECISION.with(|c| c.get()),
            no_grad: crate::fused::NO_GRAD.with(|c| c.get()),
            bf16: crate::bf16::THREAD_MODE.with(|c| c.get()),
        }
    }

    /// Puts these switches in force on the calling thread.
    fn apply(self) {
        THREAD.with(|c| c.set(self.path));
        crate::fused::PRECISION.with(|c| c.set(self.precision));
        crate::fused::NO_GRAD.with(|c| c.set(self.no_grad));
        crate::bf16::THREAD_MODE.with(|c| c.set(self.bf16));
    }
}

/// Runs `f` on a pool of fresh threads, as many as the calling thread's pool has, each of them with the
/// calling thread's switches in force ([`Switches`]): rayon's threads do not inherit thread-locals, so an op
/// called inside `f` and its pool jobs all see the switches of the scope that called this. Where no pool can
/// be started, `f` runs on the calling thread (it says so; its pool jobs then follow the process-wide
/// settings).
pub(crate) fn on_pool_with_switches<R: Send>(f: impl FnOnce() -> R + Send) -> R {
    let switches = Switches::here();
    match rayon::ThreadPoolBuilder::new()
        .num_threads(rayon::current_num_threads())
        .thread_name(|i| format!("dino-scope-{i}"))
        .start_handler(move |_| switches.apply())
        .build()
    {
        Ok(pool) => pool.install(f),
        Err(e) => {
            eprintln!("dino-kernels: no pool for a switch scope ({e}); its pool jobs take the process-wide switches");
            f()
        }
    }
}

/// Whether an op on `tensors` takes the CPU fast path: every tensor on the CPU and the path not forced to
/// portable. The op checks dtypes and layouts its kernel needs on top of this.
pub fn cpu_fast_path(tensors: &[&Tensor]) -> bool {
    kernel_path() == KernelPath::Auto && tensors.iter().all(|t| t.device().is_cpu())
}

/// [`cpu_fast_path`] for kernels that serve f32 only.
pub fn cpu_f32_fast_path(tensors: &[&Tensor]) -> bool {
    cpu_fast_path(tensors) && tensors.iter().all(|t| t.dtype() == candle_core::DType::F32)
}

/// The environment variable naming the device the golden and gradient tests run on: `cpu` (default) or `cuda`
/// (GPU 0, in a build with the `cuda` feature; `cargo xtask gpu-check` runs them so).
pub const TEST_DEVICE_VAR: &str = "DINO_TEST_DEVICE";

/// The device of the test suites: `DINO_TEST_DEVICE=cuda` gives GPU 0 (one device shared by every test of the
/// process, as candle refuses to mix tensors of two `Device::new_cuda` calls), anything else the CPU. A CUDA
/// device that cannot be opened panics with the reason: tests asked for it explicitly.
pub fn test_device() -> candle_core::Device {
    static DEVICE: std::sync::OnceLock<candle_core::Device> = std::sync::OnceLock::new();
    DEVICE
        .get_or_init(|| match std::env::var(TEST_DEVICE_VAR).as_deref() {
            Ok("cuda") => candle_core::Device::new_cuda(0)
                .unwrap_or_else(|e| panic!("{TEST_DEVICE_VAR}=cuda: no CUDA device: {e}")),
            _ => candle_core::Device::Cpu,
        })
        .clone()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parse_and_scope() {
        assert_eq!("Portable".parse::<KernelPath>(), Ok(KernelPath::Portable));
        assert_eq!(" auto ".parse::<KernelPath>(), Ok(KernelPath::Auto));
        assert!("gpu".parse::<KernelPath>().unwrap_err().contains("`gpu`"));
        let t = Tensor::zeros(3, candle_core::DType::F32, &candle_core::Device::Cpu).unwrap();
        let outer = cpu_f32_fast_path(&[&t]);
        with_kernel_path(KernelPath::Portable, || {
            assert!(!cpu_fast_path(&[&t]));
            with_kernel_path(KernelPath::Auto, || assert!(cpu_f32_fast_path(&[&t])));
            assert!(!cpu_fast_path(&[&t]));
        });
        assert_eq!(cpu_f32_fast_path(&[&t]), outer);
        let i = Tensor::zeros(3, candle_core::DType::U32, &candle_core::Device::Cpu).unwrap();
        with_kernel_path(KernelPath::Auto, || assert!(!cpu_f32_fast_path(&[&i])));
    }

    /// A bf16 mode scope reaches every thread its ops' pool jobs can run on, with the calling thread's other
    /// switches, and leaves the calling thread as it was.
    #[test]
    fn pool_jobs_take_the_switches_of_the_bf16_mode_scope() {
        use crate::bf16::{bf16_gemm, with_bf16_gemm, Bf16Gemm};
        use crate::fused::{matmul_precision, with_matmul_precision, MatmulPrecision};
        let outer = bf16_gemm();
        for mode in [
            Bf16Gemm::Never,
            Bf16Gemm::Always,
            Bf16Gemm::Amx,
            Bf16Gemm::Auto,
        ] {
            let seen = with_kernel_path(KernelPath::Portable, || {
                with_matmul_precision(MatmulPrecision::Bf16, || {
                    with_bf16_gemm(mode, || {
                        let here = (bf16_gemm(), kernel_path(), matmul_precision());
                        // Every thread of the pool the ops' jobs go to.
                        let jobs =
                            rayon::broadcast(|_| (bf16_gemm(), kernel_path(), matmul_precision()));
                        assert_eq!(jobs.len(), rayon::current_num_threads());
                        (here, jobs)
                    })
                })
            });
            let want = (mode, KernelPath::Portable, MatmulPrecision::Bf16);
            assert_eq!(seen.0, want, "the scope's own thread");
            assert!(
                seen.1.iter().all(|&j| j == want),
                "{mode:?}: pool threads saw {:?}",
                seen.1
            );
            assert_eq!(bf16_gemm(), outer);
        }
    }
}
