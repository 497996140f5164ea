//! Seeded initialisation: a `VarBuilder` backend that creates every missing variable of a `VarMap` from a
//! seeded ChaCha8 RNG, in construction order, so that `--seed` fixes the initial weights (candle's own CPU
//! RNG cannot be seeded).
//!
//! The official initialisers map onto [`candle_nn::Init`] as follows:
//! - `trunc_normal_(std=.02)` (absolute bounds ±2, i.e. ±100σ): `Init::Randn { mean: 0, stdev: 0.02 }`;
//! - PyTorch's default Conv2d/Linear init (kaiming-uniform with a = √5), weight AND bias:
//!   `Init::Uniform { lo: -b, up: b }` with `b = 1/sqrt(fan_in)`, see [`default_uniform_bound`];
//! - LayerNorm weight 1 / bias 0, linear bias 0: `Init::Const`.
//!
//! Values are drawn in f32 (uniform: `lo + (up - lo) * U[0,1)`, normal: `rand_distr::Normal`), element by
//! element in row-major order, then cast to the requested dtype. A variable that already exists in the
//! `VarMap` is returned unchanged (after a shape check) and consumes no random numbers.

use std::sync::Mutex;

use candle_core::{DType, Device, Result, Shape, Tensor, Var};
use candle_nn::init::{FanInOut, NormalOrUniform};
use candle_nn::var_builder::SimpleBackend;
use candle_nn::{Init, VarBuilder, VarMap};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use rand_distr::{Distribution, Normal};

/// The official `trunc_normal_(std=.02)` init of ViT linears, `cls_token` and `pos_embed` (bounds ±2 are
/// ±100σ, so this is a plain normal).
pub const TRUNC_NORMAL_02: Init = Init::Randn {
    mean: 0.0,
    stdev: 0.02,
};

/// Bound `1/sqrt(fan_in)` of PyTorch's default Conv/Linear init (kaiming-uniform, a = √5) for weight and bias.
pub fn default_uniform_bound(fan_in: usize) -> f64 {
    1.0 / (fan_in.max(1) as f64).sqrt()
}

/// PyTorch's default init `U(±1/sqrt(fan_in))` as a candle [`Init`].
pub fn default_uniform(fan_in: usize) -> Init {
    let b = default_uniform_bound(fan_in);
    Init::Uniform { lo: -b, up: b }
}

/// How a ViT's block linears (`attn.qkv`, `attn.proj`, `mlp.fc1`, `mlp.fc2`) start.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum LinearInit {
    /// The official `_init_weights`: weight `trunc_normal_(std=.02)`, bias 0 (default).
    #[default]
    TruncNormal,
    /// PyTorch's own `nn.Linear` init (what a ViT gets without the official `_init_weights`): weight and
    /// bias `U(±1/sqrt(fan_in))`, i.e. weight std `1/sqrt(3 fan_in)` (0.059 for D = 96, 3x the official).
    DefaultUniform,
}

impl LinearInit {
    /// The weight initialiser of a linear layer with `fan_in` inputs.
    pub fn weight(self, fan_in: usize) -> Init {
        match self {
            Self::TruncNormal => TRUNC_NORMAL_02,
            Self::DefaultUniform => default_uniform(fan_in),
        }
    }

    /// The bias initialiser of a linear layer with `fan_in` inputs.
    pub fn bias(self, fan_in: usize) -> Init {
        match self {
            Self::TruncNormal => Init::Const(0.0),
            Self::DefaultUniform => default_uniform(fan_in),
        }
    }
}

/// A `VarBuilder` backend filling a `VarMap` from a seeded ChaCha8 RNG.
pub struct SeededInit {
    varmap: VarMap,
    rng: Mutex<ChaCha8Rng>,
}

impl SeededInit {
    /// A backend that adds missing variables to `varmap`, drawing from `ChaCha8Rng::seed_from_u64(seed)`.
    pub fn new(varmap: &VarMap, seed: u64) -> Self {
        Self {
            varmap: varmap.clone(),
            rng: Mutex::new(ChaCha8Rng::seed_from_u64(seed)),
        }
    }

    /// The `VarMap` this backend fills.
    pub fn varmap(&self) -> &VarMap {
        &self.varmap
    }

    /// Draw a fresh tensor of `shape` for `init` from the RNG (f32, then cast to `dtype`).
    fn draw(&self, shape: &Shape, init: Init, dtype: DType, dev: &Device) -> Result<Tensor> {
        let n = shape.elem_count();
        let mut rng = self
            .rng
            .lock()
            .map_err(|_| candle_core::Error::Msg("SeededInit: RNG mutex poisoned".into()))?;
        let data: Vec<f32> = match init {
            Init::Const(c) => vec![c as f32; n],
            Init::Uniform { lo, up } => uniform(&mut rng, n, lo, up),
            Init::Randn { mean, stdev } => normal(&mut rng, n, mean, stdev)?,
            Init::Kaiming {
                dist,
                fan,
                non_linearity,
            } => {
                let fan = fan_for(fan, shape);
                let std = non_linearity.gain() / (fan.max(1) as f64).sqrt();
                match dist {
                    NormalOrUniform::Uniform => {
                        let b = 3f64.sqrt() * std;
                        uniform(&mut rng, n, -b, b)
                    }
                    NormalOrUniform::Normal => normal(&mut rng, n, 0.0, std)?,
                }
            }
        };
        Tensor::from_vec(data, shape.clone(), dev)?.to_dtype(dtype)
    }
}

fn fan_for(fan: FanInOut, shape: &Shape) -> usize {
    fan.for_shape(shape)
}

fn uniform(rng: &mut ChaCha8Rng, n: usize, lo: f64, up: f64) -> Vec<f32> {
    let (lo, up) = (lo as f32, up as f32);
    (0..n)
        .map(|_| lo + (up - lo) * rng.random::<f32>())
        .collect()
}

fn normal(rng: &mut ChaCha8Rng, n: usize, mean: f64, stdev: f64) -> Result<Vec<f32>> {
    let d = Normal::new(mean as f32, stdev as f32).map_err(|e| {
        candle_core::Error::Msg(format!(
            "SeededInit: invalid normal(mean {mean}, stdev {stdev}): {e}"
        ))
    })?;
    Ok((0..n).map(|_| d.sample(rng)).collect())
}

impl SimpleBackend for SeededInit {
    fn get(&self, s: Shape, name: &str, h: Init, dtype: DType, dev: &Device) -> Result<Tensor> {
        {
            let data =
                self.varmap.data().lock().map_err(|_| {
                    candle_core::Error::Msg("SeededInit: VarMap mutex poisoned".into())
                })?;
            if let Some(var) = data.get(name) {
                if var.shape() != &s {
                    candle_core::bail!(
                        "SeededInit: shape mismatch on {name}: requested {s:?}, VarMap holds {:?}",
                        var.shape()
                    );
                }
                return Ok(var.as_tensor().clone());
            }
        }
        let t = self.draw(&s, h, dtype, dev)?;
        let var = Var::from_tensor(&t)?;
        let out = var.as_tensor().clone();
        self.varmap
            .data()
            .lock()
            .map_err(|_| candle_core::Error::Msg("SeededInit: VarMap mutex poisoned".into()))?
            .insert(name.to_string(), var);
        Ok(out)
    }

    fn get_unchecked(&self, name: &str, _dtype: DType, _dev: &Device) -> Result<Tensor> {
        let data = self
            .varmap
            .data()
            .lock()
            .map_err(|_| candle_core::Error::Msg("SeededInit: VarMap mutex poisoned".into()))?;
        match data.get(name) {
            Some(v) => Ok(v.as_tensor().clone()),
            None => candle_core::bail!(
                "SeededInit: {name} is not in the VarMap and get_unchecked has no shape to create it"
            ),
        }
    }

    fn contains_tensor(&self, name: &str) -> bool {
        self.varmap
            .data()
            .lock()
            .map(|d| d.contains_key(name))
            .unwrap_or(false)
    }
}

/// A `VarBuilder` that creates every missing variable in `varmap` from `ChaCha8Rng::seed_from_u64(seed)`,
/// in construction order; existing variables (e.g. loaded weights) are reused unchanged.
pub fn seeded_var_builder(
    varmap: &VarMap,
    seed: u64,
    dtype: DType,
    device: &Device,
) -> VarBuilder<'static> {
    VarBuilder::from_backend(
        Box::new(SeededInit::new(varmap, seed)),
        dtype,
        device.clone(),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn same_seed_same_values_other_seed_differs() -> Result<()> {
        let build = |seed: u64| -> Result<(VarMap, Tensor, Tensor)> {
            let vm = VarMap::new();
            let vb = seeded_var_builder(&vm, seed, DType::F32, &Device::Cpu);
            let a = vb.get_with_hints((64, 32), "a", TRUNC_NORMAL_02)?;
            let b = vb.pp("x").get_with_hints(100, "b", default_uniform(12))?;
            Ok((vm, a, b))
        };
        let (vm, a0, b0) = build(7)?;
        let (_, a1, b1) = build(7)?;
        let (_, a2, _) = build(8)?;
        let d = |x: &Tensor, y: &Tensor| -> Result<f32> {
            (x - y)?.abs()?.max_all()?.to_scalar::<f32>()
        };
        assert_eq!(d(&a0, &a1)?, 0.0);
        assert_eq!(d(&b0, &b1)?, 0.0);
        assert!(d(&a0, &a2)? > 0.0);
        assert!(vm.data().lock().unwrap().contains_key("x.b"));
        // Statistics: std ≈ 0.02, uniform within ±1/sqrt(12).
        let std = a0.sqr()?.mean_all()?.sqrt()?.to_scalar::<f32>()?;
        assert!((std - 0.02).abs() < 0.002, "std {std}");
        let bmax = b0.abs()?.max_all()?.to_scalar::<f32>()?;
        assert!(bmax <= (1.0 / 12f32.sqrt()) && bmax > 0.2, "max {bmax}");
        Ok(())
    }

    #[test]
    fn existing_var_is_reused_and_shape_checked() -> Result<()> {
        let vm = VarMap::new();
        let vb = seeded_var_builder(&vm, 0, DType::F32, &Device::Cpu);
        let a = vb.get_with_hints(4, "w", Init::Const(3.0))?;
        let again = vb.get_with_hints(4, "w", Init::Const(0.0))?;
        assert_eq!(again.to_vec1::<f32>()?, a.to_vec1::<f32>()?);
        assert_eq!(a.to_vec1::<f32>()?, vec![3.0; 4]);
        let err = vb.get_with_hints(5, "w", Init::Const(0.0)).unwrap_err();
        assert!(err.to_string().contains("w"), "{err}");
        Ok(())
    }
}
