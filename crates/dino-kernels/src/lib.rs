//! dino-kernels: every device-specific op of dino-rs behind one dispatch per op.
//!
//! Each public op (LayerNorm, softmax, GELU, bias add, linear and linear + GELU, residual sums with drop
//! path, linear + residual, multi-head attention, weight norm, max-pool, conv2d, train-mode BatchNorm,
//! patchify with shifted patch tokenization) has
//! two implementations chosen at its entry by [`dispatch::cpu_fast_path`]:
//! - the CPU fast path: candle custom ops with hand-written kernels (AVX-512 where present, bf16 products
//!   on request, on AMX tiles ([`amx`]) or with AVX-512 BF16 ([`bf16`])) and analytic backward passes;
//! - the portable path: a composition of candle ops whose backward candle derives, avoiding candle's ops that
//!   drop or corrupt gradients (fused LayerNorm, `softmax_last_dim`, `max_pool2d`): the path that runs on
//!   CUDA, and on the CPU when `DINO_KERNELS=portable`.
//!
//! A new device is one more branch in each op's entry function. The crate depends on candle, `gemm`, rayon,
//! libc and serde.

pub mod amx;
pub mod attention;
pub mod batch_norm;
pub mod bf16;
pub mod conv;
pub mod cpu;
pub mod dispatch;
pub mod fused;
pub mod ops;
pub mod patch;
pub mod pool;
mod small_gemm;
pub mod weight_norm;

pub use dispatch::{kernel_path, set_kernel_path, with_kernel_path, KernelPath};
pub use fused::{
    matmul_precision, no_grad, set_matmul_precision, with_matmul_precision, MatmulPrecision,
};
