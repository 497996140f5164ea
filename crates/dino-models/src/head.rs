//! The DINO projection head (official `DINOHead`, dino-spec §1.5): an MLP with GELU (and optional
//! BatchNorm1d), l2-normalisation, and a weight-normalised last layer `W = g · v / ‖v‖_row`.
//!
//! Parameter names follow the official state dict (relative to the `VarBuilder` you pass, usually
//! `vb.pp("head")`): `mlp.0`, `mlp.2`, `mlp.4` (without BN), `mlp.0`, `mlp.1` (BN), `mlp.3`, `mlp.4` (BN),
//! `mlp.6` (with BN), `mlp` alone when `nlayers == 1`, then `last_layer.weight_g` `(K, 1)` and
//! `last_layer.weight_v` `(K, bottleneck_dim)`. The effective last-layer weight is recomputed from `g` and `v`
//! in every forward pass, so `v` (and `g` when it is trainable) receive gradients.

use candle_core::{DType, ModuleT, Tensor};
use candle_nn::{BatchNorm, BatchNormConfig, Init, VarBuilder};

use crate::error::{Error, Result};
use crate::fused::{with_matmul_precision, MatmulPrecision};

/// Standard deviation of the official `trunc_normal_(std=.02)` init of the MLP weights. Its absolute
/// truncation bounds (±2) are 100 σ away, so it is exactly a normal distribution in practice.
pub const TRUNC_NORMAL_STD: f64 = 0.02;

/// `F.normalize` epsilon: the norm is clamped to at least this value before dividing.
pub const L2_NORMALIZE_EPS: f64 = 1e-12;

/// Configuration of [`DinoHead`], with the official `DINOHead` defaults.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DinoHeadConfig {
    /// Input (backbone feature) dimension `D`. No default: 384 for ViT-S, 192 for ViT-tiny, 2048 for ResNet-50.
    pub in_dim: usize,
    /// Number of prototypes `K` (`out_dim`). No default here; main_dino.py uses 65536.
    pub out_dim: usize,
    /// BatchNorm1d after each hidden Linear (`use_bn_in_head`). Default: false.
    pub use_bn: bool,
    /// Fix `last_layer.weight_g` to 1 and keep it out of the trainable set. Default: true.
    pub norm_last_layer: bool,
    /// Number of Linear layers in the MLP (0 is treated as 1, as in the official code). Default: 3.
    pub nlayers: usize,
    /// Width of the hidden layers. Default: 2048.
    pub hidden_dim: usize,
    /// Output width of the MLP, the input of the last layer. Default: 256.
    pub bottleneck_dim: usize,
    /// Let the last layer take bf16 products when the thread's [`MatmulPrecision`] is bf16, as PyTorch's
    /// autocast does (and the official fp16 autocast, in fp16). Default: false: f32 products whatever the
    /// precision, since the logits are divided by the teacher temperature (0.04), magnifying the rounding 25x.
    pub last_layer_bf16: bool,
}

impl DinoHeadConfig {
    /// The official defaults for a given `in_dim` and `out_dim`: no BN, `norm_last_layer = true`,
    /// 3 layers, hidden 2048, bottleneck 256.
    pub fn new(in_dim: usize, out_dim: usize) -> Self {
        Self {
            in_dim,
            out_dim,
            use_bn: false,
            norm_last_layer: true,
            nlayers: 3,
            hidden_dim: 2048,
            bottleneck_dim: 256,
            last_layer_bf16: false,
        }
    }

    /// Number of MLP parameters (Linear weights and biases plus BN affine parameters; no BN buffers).
    pub fn mlp_param_count(&self) -> usize {
        let nlayers = self.nlayers.max(1);
        if nlayers == 1 {
            return self.in_dim * self.bottleneck_dim + self.bottleneck_dim;
        }
        let bn = if self.use_bn { 2 * self.hidden_dim } else { 0 };
        let first = self.in_dim * self.hidden_dim + self.hidden_dim + bn;
        let middle = (nlayers - 2) * (self.hidden_dim * self.hidden_dim + self.hidden_dim + bn);
        let last = self.hidden_dim * self.bottleneck_dim + self.bottleneck_dim;
        first + middle + last
    }

    /// Number of last-layer parameters: `(K·bottleneck for weight_v, K for weight_g)`.
    pub fn last_layer_param_count(&self) -> (usize, usize) {
        (self.out_dim * self.bottleneck_dim, self.out_dim)
    }

    fn validate(&self) -> Result<()> {
        for (name, v) in [
            ("in_dim", self.in_dim),
            ("out_dim", self.out_dim),
            ("hidden_dim", self.hidden_dim),
            ("bottleneck_dim", self.bottleneck_dim),
        ] {
            if v == 0 {
                return Err(Error::Config(format!(
                    "DinoHeadConfig.{name} must be positive"
                )));
            }
        }
        Ok(())
    }
}

/// One module of the `mlp` Sequential.
#[derive(Debug, Clone)]
enum MlpLayer {
    /// `(weight (out, in), bias (out))`, applied with the fused [`crate::ops::linear`].
    Linear(Tensor, Tensor),
    BatchNorm(BatchNorm),
    Gelu,
}

/// The DINO head. Build it with [`DinoHead::new`]; run it with [`DinoHead::forward`].
#[derive(Debug, Clone)]
pub struct DinoHead {
    cfg: DinoHeadConfig,
    mlp: Vec<MlpLayer>,
    weight_g: Tensor,
    weight_v: Tensor,
}

/// `SyncBatchNorm` in train mode for `(N, C)` rows: mean and biased variance over the rows of every rank
/// (sums all-reduced with the differentiable [`dino_core::collective::all_reduce_sum`], so the backward pass
/// sums the statistics' gradients over the ranks as torch's `SyncBatchNorm` does); running statistics updated
/// with the global mean and the unbiased global variance. Same arithmetic as candle-nn's `forward_train`
/// otherwise.
fn sync_batch_norm_1d(bn: &BatchNorm, x: &Tensor) -> candle_core::Result<Tensor> {
    use dino_core::collective::{all_reduce_count, all_reduce_sum};
    if x.rank() != 2 {
        candle_core::bail!("SyncBatchNorm1d expects (N, C), got {:?}", x.dims())
    }
    let to_candle = |e: dino_core::Error| candle_core::Error::Msg(e.to_string());
    let n = all_reduce_count(x.dim(0)?).map_err(to_candle)? as f64;
    if n < 2.0 {
        candle_core::bail!("SyncBatchNorm1d: expected more than 1 value per channel when training")
    }
    let m = bn.momentum();
    let x = x.to_dtype(DType::F32)?.contiguous()?;
    let mean = (all_reduce_sum(&x.sum_keepdim(0)?)? / n)?;
    let xc = x.broadcast_sub(&mean)?;
    let var = (all_reduce_sum(&xc.sqr()?.sum_keepdim(0)?)? / n)?;
    let rm = candle_core::Var::from_tensor(bn.running_mean())?;
    let rv = candle_core::Var::from_tensor(bn.running_var())?;
    rm.set(&((rm.as_tensor() * (1.0 - m))? + (mean.detach().flatten_all()? * m)?)?)?;
    rv.set(
        &((rv.as_tensor() * (1.0 - m))? + (var.detach().flatten_all()? * (m * n / (n - 1.0)))?)?,
    )?;
    let y = xc.broadcast_div(&(var + bn.eps())?.sqrt()?)?;
    match bn.weight_and_bias() {
        None => Ok(y),
        Some((w, b)) => y
            .broadcast_mul(&w.reshape((1, ()))?)?
            .broadcast_add(&b.reshape((1, ()))?),
    }
}

/// Exact (erf) GELU, as `nn.GELU()`: the fused op with an analytic backward (f32 on CPU), candle's
/// `gelu_erf` otherwise.
fn gelu(x: &Tensor) -> candle_core::Result<Tensor> {
    crate::ops::gelu_erf(x)
}

fn linear(in_dim: usize, out_dim: usize, vb: VarBuilder) -> candle_core::Result<MlpLayer> {
    let w = vb.get_with_hints(
        (out_dim, in_dim),
        "weight",
        Init::Randn {
            mean: 0.0,
            stdev: TRUNC_NORMAL_STD,
        },
    )?;
    let b = vb.get_with_hints(out_dim, "bias", Init::Const(0.0))?;
    Ok(MlpLayer::Linear(w, b))
}

impl DinoHead {
    /// Build the head on `vb` (pass `vb.pp("head")` to get the official `head.*` names), with the official
    /// initialisation: MLP weights N(0, 0.02²), biases 0, BN weight 1 / bias 0, `weight_v` U(±1/√bottleneck),
    /// `weight_g` = 1.
    pub fn new(cfg: DinoHeadConfig, vb: VarBuilder) -> Result<Self> {
        cfg.validate()?;
        let nlayers = cfg.nlayers.max(1);
        let mut mlp = Vec::new();
        if nlayers == 1 {
            mlp.push(linear(cfg.in_dim, cfg.bottleneck_dim, vb.pp("mlp"))?);
        } else {
            let vb_mlp = vb.pp("mlp");
            let mut idx = 0usize;
            let mut push_hidden = |mlp: &mut Vec<MlpLayer>, in_dim: usize| -> Result<()> {
                mlp.push(linear(in_dim, cfg.hidden_dim, vb_mlp.pp(idx.to_string()))?);
                idx += 1;
                if cfg.use_bn {
                    let bn = candle_nn::batch_norm(
                        cfg.hidden_dim,
                        BatchNormConfig::default(),
                        vb_mlp.pp(idx.to_string()),
                    )?;
                    mlp.push(MlpLayer::BatchNorm(bn));
                    idx += 1;
                }
                mlp.push(MlpLayer::Gelu);
                idx += 1;
                Ok(())
            };
            push_hidden(&mut mlp, cfg.in_dim)?;
            for _ in 0..nlayers - 2 {
                push_hidden(&mut mlp, cfg.hidden_dim)?;
            }
            mlp.push(linear(
                cfg.hidden_dim,
                cfg.bottleneck_dim,
                vb_mlp.pp(idx.to_string()),
            )?);
        }
        let vb_last = vb.pp("last_layer");
        let bound = 1.0 / (cfg.bottleneck_dim as f64).sqrt();
        let weight_v = vb_last.get_with_hints(
            (cfg.out_dim, cfg.bottleneck_dim),
            "weight_v",
            Init::Uniform {
                lo: -bound,
                up: bound,
            },
        )?;
        let weight_g = vb_last.get_with_hints((cfg.out_dim, 1), "weight_g", Init::Const(1.0))?;
        Ok(Self {
            cfg,
            mlp,
            weight_g,
            weight_v,
        })
    }

    /// The configuration this head was built with.
    pub fn config(&self) -> &DinoHeadConfig {
        &self.cfg
    }

    /// Number of prototypes `K`.
    pub fn out_dim(&self) -> usize {
        self.cfg.out_dim
    }

    /// The MLP alone: `(N, in_dim)` -> `(N, bottleneck_dim)`, before l2-normalisation. `train` makes
    /// BatchNorm use batch statistics and update its running statistics.
    pub fn forward_mlp(&self, x: &Tensor, train: bool) -> candle_core::Result<Tensor> {
        let mut x = x.clone();
        for layer in &self.mlp {
            x = match layer {
                MlpLayer::Linear(w, b) => crate::ops::linear(&x, w, Some(b))?,
                MlpLayer::BatchNorm(bn) => {
                    if train && dino_core::collective::world_size() > 1 {
                        sync_batch_norm_1d(bn, &x)?
                    } else {
                        bn.forward_t(&x, train)?
                    }
                }
                MlpLayer::Gelu => gelu(&x)?,
            };
        }
        Ok(x)
    }

    /// The effective last-layer weight `W = g · v / ‖v‖_row`, `(K, bottleneck_dim)`, differentiable in `g`
    /// and `v` (as `torch.nn.utils.weight_norm(..., dim=0)`, no epsilon).
    /// With `norm_last_layer`, `g` is frozen at 1 (the official `weight_g.requires_grad = False`): it enters
    /// detached, so the backward pass computes no gradient for it.
    pub fn last_layer_weight(&self) -> candle_core::Result<Tensor> {
        if self.cfg.norm_last_layer {
            weight_norm(&self.weight_v, &self.weight_g.detach())
        } else {
            weight_norm(&self.weight_v, &self.weight_g)
        }
    }

    /// `(N, in_dim)` -> `(N, K)`: MLP, l2-normalise (eps 1e-12), weight-normalised last layer (no bias).
    ///
    /// The last layer is a fused linear held at f32 products whatever the thread's [`MatmulPrecision`] (its
    /// logits are divided by the teacher temperature (0.04) before the softmax, so bf16 rounding there would
    /// be magnified 25x), unless [`DinoHeadConfig::last_layer_bf16`]. Its weight gradient comes out directly
    /// as `(K, bottleneck_dim)`.
    pub fn forward(&self, x: &Tensor, train: bool) -> candle_core::Result<Tensor> {
        let x = self.forward_mlp(x, train)?;
        let x = l2_normalize(&x)?.contiguous()?;
        let w = self.last_layer_weight()?;
        if self.cfg.last_layer_bf16 {
            return crate::ops::linear(&x, &w, None);
        }
        with_matmul_precision(MatmulPrecision::Highest, || {
            crate::ops::linear(&x, &w, None)
        })
    }
}

impl ModuleT for DinoHead {
    fn forward_t(&self, xs: &Tensor, train: bool) -> candle_core::Result<Tensor> {
        self.forward(xs, train)
    }
}

/// `F.normalize(x, dim=-1, eps=1e-12)`: each row divided by `max(‖row‖₂, 1e-12)`. Differentiable.
pub fn l2_normalize(x: &Tensor) -> candle_core::Result<Tensor> {
    let norm = x.sqr()?.sum_keepdim(candle_core::D::Minus1)?.sqrt()?;
    let norm = norm.clamp(L2_NORMALIZE_EPS, f64::INFINITY)?;
    x.broadcast_div(&norm)
}

pub use dino_kernels::weight_norm::{weight_norm, weight_norm_composed};
