//! Helpers shared by the golden tests: load the official-code goldens in place.
#![allow(dead_code)]

use std::collections::HashMap;

use candle_core::{DType, Tensor};

/// The device these checks run on: the CPU, or GPU 0 under `DINO_TEST_DEVICE=cuda` (`cargo xtask gpu-check`).
pub fn tdev() -> candle_core::Device {
    dino_kernels::dispatch::test_device()
}

pub fn golden(file: &str) -> HashMap<String, Tensor> {
    let path = format!(
        "{}/../../../shared/golden/{file}",
        env!("CARGO_MANIFEST_DIR")
    );
    candle_core::safetensors::load(&path, &tdev()).unwrap_or_else(|e| panic!("loading {path}: {e}"))
}

/// A file of `../shared/golden-dinov2` (values from the official dinov2 code).
pub fn golden_v2(file: &str) -> HashMap<String, Tensor> {
    let path = format!(
        "{}/../../../shared/golden-dinov2/{file}",
        env!("CARGO_MANIFEST_DIR")
    );
    candle_core::safetensors::load(&path, &tdev()).unwrap_or_else(|e| panic!("loading {path}: {e}"))
}

pub fn get(g: &HashMap<String, Tensor>, key: &str) -> Tensor {
    g.get(key)
        .unwrap_or_else(|| panic!("golden tensor {key} missing"))
        .clone()
}

pub fn vec_f64(t: &Tensor) -> Vec<f64> {
    t.to_dtype(DType::F64)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1::<f64>()
        .unwrap()
}

pub fn scalar(t: &Tensor) -> f64 {
    vec_f64(t)[0]
}

/// Asserts |a - b| <= atol + rtol |b| elementwise, reporting the worst element.
pub fn assert_close(what: &str, got: &Tensor, want: &Tensor, atol: f64, rtol: f64) {
    assert_eq!(
        got.elem_count(),
        want.elem_count(),
        "{what}: element counts differ"
    );
    let (g, w) = (vec_f64(got), vec_f64(want));
    let mut worst = (0usize, 0f64);
    for (i, (a, b)) in g.iter().zip(&w).enumerate() {
        let excess = (a - b).abs() - (atol + rtol * b.abs());
        if excess > worst.1 {
            worst = (i, excess);
        }
    }
    assert!(
        worst.1 <= 0.0,
        "{what}: element {} got {} want {} (atol {atol}, rtol {rtol})",
        worst.0,
        g[worst.0],
        w[worst.0]
    );
}
