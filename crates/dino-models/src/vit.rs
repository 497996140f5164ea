//! Vision Transformer as in the official DINO `vision_transformer.py` (adapted from timm): patch embedding,
//! CLS token, (interpolated) positional embedding, pre-norm blocks with multi-head self-attention and an
//! exact-GELU MLP, stochastic depth, final LayerNorm; the CLS token after the final norm is the feature.
//!
//! Parameter paths are the official ones (`cls_token`, `pos_embed`, `patch_embed.proj.weight`,
//! `blocks.{i}.norm1.weight`, `blocks.{i}.attn.qkv.weight`, ..., `norm.bias`), so official state dicts load
//! unchanged through a `VarBuilder`.
//!
//! Speed choices (numerically equivalent to the official code within float rounding):
//! - the patch embedding is a patchify (reshape + permute) followed by one matmul instead of a strided conv;
//! - every linear runs on a 2-D `(B*T, D)` view; tokens stay 2-D between blocks;
//! - the MLP's fc1 + GELU is one fused op, and the attention projection and fc2 each fuse with their residual
//!   sum and drop-path scale (`x + s_i · (h Wᵀ + b)`, [`crate::fused::linear_residual`]);
//! - attention is the fused op of [`crate::attention`] on the packed `(B*T, 3D)` qkv activations (one GEMM per
//!   batch and head, no split or permute copies); LayerNorm and GELU are the fused ops of [`crate::ops`] (analytic backward);
//! - `forward` runs the last block for the CLS rows only (K and V still from every token) and applies the final
//!   LayerNorm to them: the other tokens' last-block outputs are never used, which saves ~7% of the FLOPs;
//! - a branch (attention or MLP) runs on the samples that stochastic depth keeps only, where the official
//!   `drop_path` computes it on every sample and multiplies the dropped ones by 0: ~5% of the student blocks'
//!   training FLOPs at drop path 0.1 (rates `linspace(0, 0.1, depth)`).

use std::collections::HashMap;
use std::sync::Mutex;

use candle_core::{DType, Device, Result, Tensor};
use candle_nn::{Init, VarBuilder};

use crate::backbone::Backbone;
use crate::init::{default_uniform, LinearInit, TRUNC_NORMAL_02};
use crate::ops;

/// Configuration of a [`VisionTransformer`] (defaults: the official `vit_small(patch_size=16)`).
#[derive(Debug, Clone, PartialEq)]
pub struct ViTConfig {
    /// Training image size: the positional embedding covers `(img_size / patch_size)^2` patches. Default 224.
    pub img_size: usize,
    /// Patch size (kernel = stride of the patch embedding). Default 16.
    pub patch_size: usize,
    /// Input channels. Default 3.
    pub in_chans: usize,
    /// Token dimension D. Default 384.
    pub embed_dim: usize,
    /// Number of transformer blocks. Default 12.
    pub depth: usize,
    /// Attention heads (D must be divisible by it). Default 6.
    pub num_heads: usize,
    /// MLP hidden size = mlp_ratio * D. Default 4.0.
    pub mlp_ratio: f64,
    /// Whether the qkv linear has a bias. Default true.
    pub qkv_bias: bool,
    /// Stochastic-depth rate of the last block (linspace(0, rate, depth) per block). Default 0.0 (0.1 for the
    /// DINO student).
    pub drop_path_rate: f64,
    /// LayerNorm epsilon. Default 1e-6.
    pub layer_norm_eps: f64,
    /// The image feature of [`VisionTransformer::forward_t`]: the CLS token (official) or the mean of the
    /// patch tokens, each after the final norm. Default [`Pool::Cls`].
    pub pool: Pool,
    /// DINOv2's register tokens (`register_tokens`, (1, R, D)): extra learnt tokens inserted after the CLS
    /// token, with no positional embedding, dropped from every output. Default 0 (DINO v1).
    pub num_register_tokens: usize,
    /// DINOv2's LayerScale: each branch's output multiplied by a learnt per-channel `ls1.gamma` /
    /// `ls2.gamma` initialised to this value (dinov2 training: 1e-5; hub models: 1.0). Default `None` (v1).
    pub layer_scale_init: Option<f64>,
    /// DINOv2's `mask_token` ((1, D), zeros at start): the learnt embedding that replaces masked patches
    /// for iBOT ([`VisionTransformer::forward_tokens`] with masks). Default false (no such parameter).
    pub mask_token: bool,
    /// Shifted patch tokenization (Lee et al. 2021, "Vision Transformer for Small-Size Datasets"): each
    /// patch embedding also sees the image translated by half a patch in the four diagonal directions (zero
    /// fill), its `5 C p²` values LayerNormed (`patch_embed.norm`, eps 1e-5) before the projection
    /// (`patch_embed.proj.weight` `(D, 5C, p, p)`). Default false (the official patch embedding).
    pub shifted_patches: bool,
    /// Initialisation of the block linears (qkv, proj, fc1, fc2). Default [`LinearInit::TruncNormal`]
    /// (official).
    pub linear_init: LinearInit,
}

/// Which tokens make the image feature of a [`VisionTransformer`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Pool {
    /// The CLS token after the final norm (official DINO).
    #[default]
    Cls,
    /// The mean of the patch tokens after the final norm (timm's `global_pool='avg'`, DINOv2's
    /// `x_norm_patchtokens.mean(1)`); the CLS token still takes part in attention.
    Avg,
}

impl Default for ViTConfig {
    fn default() -> Self {
        Self::vit_small(16)
    }
}

impl ViTConfig {
    fn preset(patch_size: usize, embed_dim: usize, num_heads: usize) -> Self {
        Self {
            img_size: 224,
            patch_size,
            in_chans: 3,
            embed_dim,
            depth: 12,
            num_heads,
            mlp_ratio: 4.0,
            qkv_bias: true,
            drop_path_rate: 0.0,
            layer_norm_eps: 1e-6,
            pool: Pool::Cls,
            num_register_tokens: 0,
            layer_scale_init: None,
            mask_token: false,
            shifted_patches: false,
            linear_init: LinearInit::TruncNormal,
        }
    }

    /// Official `vit_tiny(patch_size)`: D 192, depth 12, 3 heads, 224 px.
    pub fn vit_tiny(patch_size: usize) -> Self {
        Self::preset(patch_size, 192, 3)
    }

    /// Official `vit_small(patch_size)`: D 384, depth 12, 6 heads, 224 px.
    pub fn vit_small(patch_size: usize) -> Self {
        Self::preset(patch_size, 384, 6)
    }

    /// Official `vit_base(patch_size)`: D 768, depth 12, 12 heads, 224 px.
    pub fn vit_base(patch_size: usize) -> Self {
        Self::preset(patch_size, 768, 12)
    }

    /// Any size, e.g. `custom(32, 4, 192, 12, 3)` for CIFAR or `custom(28, 4, 192, 6, 3)` for Fashion-MNIST
    /// (mlp_ratio 4, qkv bias, eps 1e-6, no drop path).
    pub fn custom(
        img_size: usize,
        patch_size: usize,
        embed_dim: usize,
        depth: usize,
        num_heads: usize,
    ) -> Self {
        Self {
            img_size,
            patch_size,
            embed_dim,
            depth,
            num_heads,
            ..Self::preset(patch_size, embed_dim, num_heads)
        }
    }

    /// The same configuration with another stochastic-depth rate.
    pub fn with_drop_path(mut self, drop_path_rate: f64) -> Self {
        self.drop_path_rate = drop_path_rate;
        self
    }

    /// Patches per side of the training image (`img_size / patch_size`).
    pub fn grid(&self) -> usize {
        self.img_size / self.patch_size
    }

    /// Patches of the training image (pos_embed length minus one).
    pub fn num_patches(&self) -> usize {
        self.grid() * self.grid()
    }

    /// Tokens before the patch tokens: the CLS token and the register tokens (timm's `num_prefix_tokens`).
    pub fn num_prefix_tokens(&self) -> usize {
        1 + self.num_register_tokens
    }

    /// MLP hidden size `int(D * mlp_ratio)`.
    pub fn mlp_hidden(&self) -> usize {
        (self.embed_dim as f64 * self.mlp_ratio) as usize
    }

    /// Channels the patch projection sees: `in_chans`, or `5 * in_chans` with shifted patches.
    pub fn patch_in_chans(&self) -> usize {
        if self.shifted_patches {
            5 * self.in_chans
        } else {
            self.in_chans
        }
    }

    /// Number of parameters of the network built from this configuration.
    pub fn num_params(&self) -> usize {
        let d = self.embed_dim;
        let p = self.patch_size;
        let h = self.mlp_hidden();
        let qkv = 3 * d * d + if self.qkv_bias { 3 * d } else { 0 };
        let block = 2 * d + qkv + (d * d + d) + 2 * d + (h * d + h) + (d * h + d);
        let ls = if self.layer_scale_init.is_some() {
            2 * d
        } else {
            0
        };
        let spt_norm = if self.shifted_patches {
            2 * self.patch_in_chans() * p * p
        } else {
            0
        };
        d * self.patch_in_chans() * p * p
            + spt_norm
            + d
            + d
            + (self.num_patches() + 1) * d
            + self.num_register_tokens * d
            + if self.mask_token { d } else { 0 }
            + self.depth * (block + ls)
            + 2 * d
    }

    fn validate(&self) -> Result<()> {
        let bad = |m: String| Err(candle_core::Error::Msg(format!("ViTConfig: {m}")));
        if self.patch_size == 0 || self.img_size < self.patch_size {
            return bad(format!(
                "patch_size {} must be >= 1 and <= img_size {}",
                self.patch_size, self.img_size
            ));
        }
        if self.num_heads == 0 || !self.embed_dim.is_multiple_of(self.num_heads) {
            return bad(format!(
                "embed_dim {} must be divisible by num_heads {}",
                self.embed_dim, self.num_heads
            ));
        }
        if self.depth == 0 || self.in_chans == 0 || self.mlp_hidden() == 0 {
            return bad(format!(
                "depth {}, in_chans {} and mlp hidden {} must be positive",
                self.depth,
                self.in_chans,
                self.mlp_hidden()
            ));
        }
        if !(0.0..1.0).contains(&self.drop_path_rate) {
            return bad(format!(
                "drop_path_rate {} must be in [0, 1)",
                self.drop_path_rate
            ));
        }
        if let Some(v) = self.layer_scale_init {
            if !v.is_finite() {
                return bad(format!("layer_scale_init {v} must be finite"));
            }
        }
        Ok(())
    }
}

/// A linear layer `y = x W^T + b` on 2-D inputs, `W`: `(out, in)`.
#[derive(Debug, Clone)]
struct Linear {
    weight: Tensor,
    bias: Option<Tensor>,
}

impl Linear {
    fn new(
        in_dim: usize,
        out_dim: usize,
        bias: bool,
        init: LinearInit,
        vb: VarBuilder,
    ) -> Result<Self> {
        let weight = vb.get_with_hints((out_dim, in_dim), "weight", init.weight(in_dim))?;
        let bias = if bias {
            Some(vb.get_with_hints(out_dim, "bias", init.bias(in_dim))?)
        } else {
            None
        };
        Ok(Self { weight, bias })
    }

    /// `(R, in)` -> `(R, out)`.
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        ops::linear(x, &self.weight, self.bias.as_ref())
    }
}

/// LayerNorm parameters, applied with the fused [`ops::layer_norm`].
#[derive(Debug, Clone)]
struct LayerNorm {
    weight: Tensor,
    bias: Tensor,
    eps: f64,
}

impl LayerNorm {
    fn new(dim: usize, eps: f64, vb: VarBuilder) -> Result<Self> {
        Ok(Self {
            weight: vb.get_with_hints(dim, "weight", Init::Const(1.0))?,
            bias: vb.get_with_hints(dim, "bias", Init::Const(0.0))?,
            eps,
        })
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        ops::layer_norm(x, &self.weight, &self.bias, self.eps)
    }

    /// LayerNorm of the rows of the samples `kept` of `x` `(B*R, D)`, or of every row with `kept` None: `(K*R,
    /// D)`, read in place ([`ops::layer_norm_kept`]). With `bf16_out` the output is for bf16 products only
    /// ([`ops::layer_norm_bf16_out`]: stored in bf16 where the products run in bf16).
    fn forward_for(
        &self,
        x: &Tensor,
        kept: Option<(usize, &[usize])>,
        bf16_out: bool,
    ) -> Result<Tensor> {
        let (w, b, eps) = (&self.weight, &self.bias, self.eps);
        match (kept, bf16_out) {
            (kept, true) => ops::layer_norm_bf16_out(x, w, b, eps, kept),
            (None, false) => self.forward(x),
            (Some((samples, kept)), false) => ops::layer_norm_kept(x, w, b, eps, samples, kept),
        }
    }
}

/// The drop-path scales of a block's attention and MLP branches (`None`: no drop path).
type BranchScales = (Option<Vec<f32>>, Option<Vec<f32>>);

/// One pre-norm transformer block.
#[derive(Debug, Clone)]
struct Block {
    norm1: LayerNorm,
    qkv: Linear,
    proj: Linear,
    norm2: LayerNorm,
    fc1: Linear,
    fc2: Linear,
    /// LayerScale gammas of the attention and MLP branches, `(D)` each, when enabled.
    ls: Option<(Tensor, Tensor)>,
    num_heads: usize,
    drop_path: f64,
}

impl Block {
    fn new(cfg: &ViTConfig, drop_path: f64, vb: VarBuilder) -> Result<Self> {
        let d = cfg.embed_dim;
        let eps = cfg.layer_norm_eps;
        let norm1 = LayerNorm::new(d, eps, vb.pp("norm1"))?;
        let li = cfg.linear_init;
        let qkv = Linear::new(d, 3 * d, cfg.qkv_bias, li, vb.pp("attn").pp("qkv"))?;
        let proj = Linear::new(d, d, true, li, vb.pp("attn").pp("proj"))?;
        let norm2 = LayerNorm::new(d, eps, vb.pp("norm2"))?;
        let fc1 = Linear::new(d, cfg.mlp_hidden(), true, li, vb.pp("mlp").pp("fc1"))?;
        let fc2 = Linear::new(cfg.mlp_hidden(), d, true, li, vb.pp("mlp").pp("fc2"))?;
        let ls = match cfg.layer_scale_init {
            Some(v) => Some((
                vb.pp("ls1").get_with_hints(d, "gamma", Init::Const(v))?,
                vb.pp("ls2").get_with_hints(d, "gamma", Init::Const(v))?,
            )),
            None => None,
        };
        Ok(Self {
            norm1,
            qkv,
            proj,
            norm2,
            fc1,
            fc2,
            ls,
            num_heads: cfg.num_heads,
            drop_path,
        })
    }

    /// The attention probabilities of every head on LN1(x) (composed ops, for the attention maps): `x`
    /// `(B*T, D)` -> `(B, H, T, T)`.
    fn attention_probs(&self, x: &Tensor, b: usize, t: usize) -> Result<Tensor> {
        let d = x.dim(1)?;
        let h = self.num_heads;
        let hd = d / h;
        let xn = self.norm1.forward(x)?;
        // q and k from row slices of the qkv weight (rows [q; k; v]). Each (B*T, D) -> (B*H, T, hd).
        let head = |i: usize| -> Result<Tensor> {
            let w = self.qkv.weight.narrow(0, i * d, d)?;
            let bias = match &self.qkv.bias {
                Some(bb) => Some(bb.narrow(0, i * d, d)?),
                None => None,
            };
            ops::linear(&xn, &w, bias.as_ref())?
                .reshape((b, t, h, hd))?
                .permute((0, 2, 1, 3))?
                .contiguous()?
                .reshape((b * h, t, hd))
        };
        let (q, k) = (head(0)?, head(1)?);
        let logits = q.matmul(&k.t()?)?; // (B*H, T, T)
        ops::softmax_last_dim_scaled(&logits, (hd as f64).powf(-0.5))?.reshape((b, h, t, t))
    }

    /// The attention heads' merged output before the projection: `x` `(B*T, D)` -> `(B*T, D)`.
    #[cfg(test)]
    fn attention_heads(&self, x: &Tensor, b: usize, t: usize) -> Result<Tensor> {
        self.attention_normed(&self.norm1.forward(x)?, b, t, false)
    }

    /// [`Block::attention_heads`] of `LN1(x)` given: `xn` `(B*T, D)` -> `(B*T, D)`; with `bf16_out` for the
    /// projection's bf16 products only ([`crate::attention::attention_bf16_out`]).
    fn attention_normed(&self, xn: &Tensor, b: usize, t: usize, bf16_out: bool) -> Result<Tensor> {
        let hd = xn.dim(1)? / self.num_heads;
        let qkv = self.qkv.forward(xn)?; // (B*T, 3D)
        let scale = (hd as f64).powf(-0.5);
        if bf16_out {
            crate::attention::attention_bf16_out(&qkv, b, t, self.num_heads, scale)
        } else {
            crate::attention::attention(&qkv, b, t, self.num_heads, scale)
        }
    }

    /// The MLP's hidden activations GELU(fc1(LN2(x))), before fc2: `(R, D)` -> `(R, 4D)`.
    #[cfg(test)]
    fn mlp_hidden(&self, x: &Tensor) -> Result<Tensor> {
        let xn = self.norm2.forward(x)?;
        crate::fused::linear_gelu(&xn, &self.fc1.weight, self.fc1.bias.as_ref())
    }

    /// `x + s_i · lin(branch(input_i))` over `b` samples (`x`: `(B*R, D)`; `input`: `(B*R', D)`, the branch's
    /// input, `x` itself but for the CLS-only last block), the branch computed on the samples that stochastic
    /// depth keeps only: `branch` gets `norm.0` of their rows of `input` `(K*R', D)` (LayerNorm reading them in
    /// place, [`LayerNorm::forward_for`]; with `norm.1` stored for bf16 products, for a branch that reads
    /// it through linear layers only) and `K`, and returns its hidden
    /// activations `(K*R, in)` for `lin`, a projection fused with the residual sum. The official code computes
    /// the branch on every sample and multiplies the dropped ones by 0; the output and every gradient are the
    /// same. Where the fused projection does not apply (other devices and dtypes), the branch runs on every
    /// sample, as there.
    fn branch(
        x: &Tensor,
        input: &Tensor,
        b: usize,
        scales: Option<Vec<f32>>,
        lin: &Linear,
        (norm, bf16_out): (&LayerNorm, bool),
        branch: impl FnOnce(&Tensor, usize) -> Result<Tensor>,
    ) -> Result<Tensor> {
        let kept = scales.as_deref().map(crate::fused::kept_samples);
        let skip = crate::fused::skips_dropped_samples(input);
        let h = match &kept {
            // Every sample dropped still runs the branch (zero scales), as rarely as that happens: its
            // parameters then get zero gradients, as in the official code, not none (which AdamW would read as
            // "no step": no weight decay, no moment update).
            Some(k) if !k.is_empty() && k.len() < b && skip => {
                branch(&norm.forward_for(input, Some((b, k)), bf16_out)?, k.len())?
            }
            _ => branch(&norm.forward_for(input, None, bf16_out)?, b)?,
        };
        crate::fused::linear_residual(x, &h, &lin.weight, lin.bias.as_ref(), scales)
    }

    /// `x + s_i · fc2(GELU(fc1(LN2(x))))_i` over `b` samples (see [`Block::branch`]): `(B*T, D)` -> `(B*T, D)`.
    /// Under bf16 products the hidden activations, read by fc2's products only, are stored in bf16 (see
    /// [`crate::fused::linear_gelu_bf16_out`]: the same bits, half the bytes).
    fn mlp_branch(&self, x: &Tensor, b: usize, scales: Option<Vec<f32>>) -> Result<Tensor> {
        Self::branch(
            x,
            x,
            b,
            scales,
            &self.out_proj(1)?,
            (&self.norm2, true),
            |xn, _| {
                crate::fused::linear_gelu_bf16_out(xn, &self.fc1.weight, self.fc1.bias.as_ref())
            },
        )
    }

    /// The attention (`i` = 0) or MLP (`i` = 1) output projection with LayerScale folded in:
    /// `γ ⊙ (W h + b) = (diag(γ) W) h + γ ⊙ b`, differentiable in γ, W and b.
    fn out_proj(&self, i: usize) -> Result<Linear> {
        let lin = if i == 0 { &self.proj } else { &self.fc2 };
        let Some(ls) = &self.ls else {
            return Ok(lin.clone());
        };
        let g = if i == 0 { &ls.0 } else { &ls.1 };
        Ok(Linear {
            weight: lin.weight.broadcast_mul(&g.unsqueeze(1)?)?,
            bias: match &lin.bias {
                Some(b) => Some((b * g)?),
                None => None,
            },
        })
    }

    /// The drop-path scales of the attention (branch 0) and MLP (branch 1) branches of block `index` (see
    /// [`Block::drop_path_scales`]). `keys` is `Some` when drop path is active (training).
    fn branch_scales(&self, index: usize, keys: Option<&DropPathKeys>) -> BranchScales {
        (
            self.drop_path_scales(index, 0, keys),
            self.drop_path_scales(index, 1, keys),
        )
    }

    /// `x`: `(B*T, D)` -> `(B*T, D)`, with the branches' drop-path scales (see [`Block::branch_scales`]).
    fn forward(
        &self,
        x: &Tensor,
        b: usize,
        t: usize,
        (s_attn, s_mlp): BranchScales,
    ) -> Result<Tensor> {
        let x = Self::branch(
            x,
            x,
            b,
            s_attn,
            &self.out_proj(0)?,
            (&self.norm1, true),
            |xn, k| self.attention_normed(xn, k, t, true),
        )?;
        self.mlp_branch(&x, b, s_mlp)
    }

    /// The block when only its CLS rows are used (the last block of `forward`): K and V for every token, Q,
    /// the projection and the MLP for the CLS rows only. `x`: `(B*T, D)` -> `(B, D)`, equal to the CLS rows of
    /// [`Block::forward`] (same drop-path scales) at about a sixth of its cost.
    fn forward_cls(
        &self,
        x: &Tensor,
        b: usize,
        t: usize,
        (s_attn, s_mlp): BranchScales,
    ) -> Result<Tensor> {
        let d = x.dim(1)?;
        let h = self.num_heads;
        let hd = d / h;
        let cls_rows = |y: &Tensor, n: usize| -> Result<Tensor> {
            y.reshape((n, t, d))?.narrow(1, 0, 1)?.reshape((n, d))
        };
        let part = |lin: &Linear, i: usize, n: usize| -> Result<(Tensor, Option<Tensor>)> {
            let w = lin.weight.narrow(0, i * d, n * d)?;
            let bias = match &lin.bias {
                Some(bb) => Some(bb.narrow(0, i * d, n * d)?),
                None => None,
            };
            Ok((w, bias))
        };
        // The attention branch reads every token of a sample and feeds the projection its CLS row only.
        let x = Self::branch(
            &cls_rows(x, b)?,
            x,
            b,
            s_attn,
            &self.out_proj(0)?,
            // Its output is sliced for the CLS queries: kept in f32.
            (&self.norm1, false),
            |xn, k| {
                let (wq, bq) = part(&self.qkv, 0, 1)?;
                let (wkv, bkv) = part(&self.qkv, 1, 2)?;
                let q = ops::linear(&cls_rows(xn, k)?, &wq, bq.as_ref())?; // (K, D)
                let kv = ops::linear(xn, &wkv, bkv.as_ref())?; // (K*T, 2D)
                crate::attention::attention_query(&q, &kv, k, 1, t, h, (hd as f64).powf(-0.5))
            },
        )?;
        self.mlp_branch(&x, b, s_mlp)
    }

    /// Stochastic depth's per-sample scales: keep with probability `1 - rate` and scale by `1 / (1 - rate)`;
    /// the mask is `floor(keep + U[0,1))` as in the official `drop_path`, with `U` a hash of (iteration seed,
    /// block, branch, crop, sample) ([`DropPathKeys`]), so a row's draw does not depend on which rows share
    /// its batch (or its rank). `None` when inactive.
    fn drop_path_scales(
        &self,
        index: usize,
        branch: u64,
        keys: Option<&DropPathKeys>,
    ) -> Option<Vec<f32>> {
        let keys = match keys {
            Some(k) if self.drop_path > 0.0 => k,
            _ => return None,
        };
        let keep = 1.0 - self.drop_path;
        Some(
            keys.rows
                .iter()
                .map(|&(crop, sample)| {
                    let u = unit_f64(key_hash(&[keys.seed, index as u64, branch, crop, sample]));
                    ((keep + u).floor() / keep) as f32
                })
                .collect(),
        )
    }
}

/// SplitMix64 finaliser.
fn mix64(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// A 64-bit hash of a key tuple (chained SplitMix64).
fn key_hash(vals: &[u64]) -> u64 {
    let mut h = mix64(0x4452_4f50_5041_5448); // "DROPPATH"
    for (k, &v) in vals.iter().enumerate() {
        h = mix64(h ^ mix64(v.wrapping_add(k as u64)));
    }
    h
}

/// The top 53 bits of `h` as a uniform draw in `[0, 1)`.
fn unit_f64(h: u64) -> f64 {
    (h >> 11) as f64 * (1.0 / (1u64 << 53) as f64)
}

/// Where the drop-path draws of an iteration come from: the iteration's seed and the sample id of each row
/// of one crop (its position in the global batch). Forward calls consume crops in order: a call on `m`
/// crops' rows (`m * samples` rows, crop-major) takes the next `m` crop indices.
#[derive(Debug, Clone, Default)]
struct DropPathState {
    seed: u64,
    /// The sample id of each row of one crop; `None`: the rows of each call are samples `0..B`, one crop.
    samples: Option<Vec<u64>>,
    next_crop: u64,
}

/// The (crop, sample) of every row of one forward call, and the iteration's seed.
struct DropPathKeys {
    seed: u64,
    rows: Vec<(u64, u64)>,
}

impl DropPathState {
    /// The keys of the next call on `b` rows, advancing the crop counter.
    fn take(&mut self, b: usize) -> Result<DropPathKeys> {
        let rows = match &self.samples {
            Some(ids) if !ids.is_empty() => {
                if !b.is_multiple_of(ids.len()) {
                    candle_core::bail!(
                        "drop path: {b} rows are not a whole number of crops of {} samples",
                        ids.len()
                    )
                }
                let base = self.next_crop;
                self.next_crop += (b / ids.len()) as u64;
                (0..b)
                    .map(|r| (base + (r / ids.len()) as u64, ids[r % ids.len()]))
                    .collect()
            }
            _ => {
                let crop = self.next_crop;
                self.next_crop += 1;
                (0..b as u64).map(|r| (crop, r)).collect()
            }
        };
        Ok(DropPathKeys {
            seed: self.seed,
            rows,
        })
    }
}

/// The 1-D PyTorch bicubic (A = -0.75, align_corners False, border clamp) resampling matrix `(out, in)` for
/// `F.interpolate(scale_factor = scale)`: the source coordinate is `(dst + 0.5) / scale - 0.5`, computed in
/// f32 as PyTorch's CPU kernel does.
pub fn bicubic_matrix(in_size: usize, out_size: usize, scale: f64) -> Vec<f32> {
    const A: f32 = -0.75;
    let cc1 = |x: f32| ((A + 2.0) * x - (A + 3.0)) * x * x + 1.0;
    let cc2 = |x: f32| ((A * x - 5.0 * A) * x + 8.0 * A) * x - 4.0 * A;
    let inv = (1.0 / scale) as f32;
    let mut m = vec![0f32; out_size * in_size];
    for o in 0..out_size {
        let src = inv * (o as f32 + 0.5) - 0.5;
        let i0 = src.floor();
        let t = src - i0;
        let w = [cc2(t + 1.0), cc1(t), cc1(1.0 - t), cc2(2.0 - t)];
        for (j, wj) in w.iter().enumerate() {
            let idx = (i0 as i64 - 1 + j as i64).clamp(0, in_size as i64 - 1) as usize;
            m[o * in_size + idx] += wj;
        }
    }
    m
}

/// The Vision Transformer backbone (the official `VisionTransformer` with `num_classes = 0`).
pub struct VisionTransformer {
    cfg: ViTConfig,
    patch_weight: Tensor,
    patch_bias: Tensor,
    /// The LayerNorm of the shifted patches (`patch_embed.norm`), when configured.
    patch_norm: Option<LayerNorm>,
    cls_token: Tensor,
    pos_embed: Tensor,
    /// DINOv2 register tokens `(1, R, D)`, when configured.
    register_tokens: Option<Tensor>,
    /// DINOv2's mask token `(1, D)`, when configured.
    mask_token: Option<Tensor>,
    blocks: Vec<Block>,
    norm: LayerNorm,
    drop_keys: Mutex<DropPathState>,
    /// (rows, cols) of the patch grid -> (Wr (rows, g), Wc (cols, g)).
    interp_cache: Mutex<HashMap<(usize, usize), (Tensor, Tensor)>>,
}

impl std::fmt::Debug for VisionTransformer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VisionTransformer")
            .field("cfg", &self.cfg)
            .finish()
    }
}

/// Intermediate state after `prepare_tokens`: 2-D tokens `(B*T, D)` with the batch and token counts.
struct Tokens {
    x: Tensor,
    b: usize,
    t: usize,
}

impl VisionTransformer {
    /// Builds (or loads, when `vb` holds the tensors) the network with the official parameter paths.
    /// Initialisation through [`crate::init::seeded_var_builder`] follows the official code: trunc-normal
    /// 0.02 for `cls_token`, `pos_embed` and linear weights, zero linear biases, LayerNorm 1/0, and the
    /// patch-embed conv's PyTorch default `U(±1/sqrt(C p²))` for weight and bias; the block linears follow
    /// [`ViTConfig::linear_init`].
    pub fn new(cfg: ViTConfig, vb: VarBuilder) -> Result<Self> {
        cfg.validate()?;
        let d = cfg.embed_dim;
        let p = cfg.patch_size;
        let pc = cfg.patch_in_chans();
        let fan_in = pc * p * p;
        let pe = vb.pp("patch_embed").pp("proj");
        let patch_weight = pe.get_with_hints((d, pc, p, p), "weight", default_uniform(fan_in))?;
        let patch_bias = pe.get_with_hints(d, "bias", default_uniform(fan_in))?;
        // The SPT code's nn.LayerNorm(patch_dim): eps 1e-5, weight 1, bias 0.
        let patch_norm = if cfg.shifted_patches {
            Some(LayerNorm::new(
                fan_in,
                1e-5,
                vb.pp("patch_embed").pp("norm"),
            )?)
        } else {
            None
        };
        let cls_token = vb.get_with_hints((1, 1, d), "cls_token", TRUNC_NORMAL_02)?;
        let pos_embed =
            vb.get_with_hints((1, cfg.num_patches() + 1, d), "pos_embed", TRUNC_NORMAL_02)?;
        // dinov2: nn.init.normal_(register_tokens, std=1e-6).
        let register_tokens = match cfg.num_register_tokens {
            0 => None,
            r => Some(vb.get_with_hints(
                (1, r, d),
                "register_tokens",
                Init::Randn {
                    mean: 0.0,
                    stdev: 1e-6,
                },
            )?),
        };
        // dinov2: self.mask_token = nn.Parameter(torch.zeros(1, embed_dim)).
        let mask_token = if cfg.mask_token {
            Some(vb.get_with_hints((1, d), "mask_token", Init::Const(0.0))?)
        } else {
            None
        };
        let blocks = (0..cfg.depth)
            .map(|i| {
                let rate = if cfg.depth > 1 {
                    cfg.drop_path_rate * i as f64 / (cfg.depth - 1) as f64
                } else {
                    0.0
                };
                Block::new(&cfg, rate, vb.pp("blocks").pp(i))
            })
            .collect::<Result<Vec<_>>>()?;
        let norm = LayerNorm::new(d, cfg.layer_norm_eps, vb.pp("norm"))?;
        Ok(Self {
            cfg,
            patch_weight,
            patch_bias,
            patch_norm,
            cls_token,
            pos_embed,
            register_tokens,
            mask_token,
            blocks,
            norm,
            drop_keys: Mutex::new(DropPathState::default()),
            interp_cache: Mutex::new(HashMap::new()),
        })
    }

    /// The configuration.
    pub fn config(&self) -> &ViTConfig {
        &self.cfg
    }

    /// Drop-path rate of each block (`linspace(0, drop_path_rate, depth)`).
    pub fn drop_path_rates(&self) -> Vec<f64> {
        self.blocks.iter().map(|b| b.drop_path).collect()
    }

    fn check_input(&self, x: &Tensor) -> Result<(usize, usize, usize, usize)> {
        let (b, c, h, w) = x.dims4().map_err(|_| {
            candle_core::Error::Msg(format!(
                "VisionTransformer: input must be (B, {}, H, W), got {:?}",
                self.cfg.in_chans,
                x.dims()
            ))
        })?;
        let p = self.cfg.patch_size;
        if c != self.cfg.in_chans || h < p || w < p || b == 0 {
            candle_core::bail!(
                "VisionTransformer: input must be (B>0, {}, H>={p}, W>={p}), got {:?}",
                self.cfg.in_chans,
                x.dims()
            );
        }
        Ok((b, c, h, w))
    }

    /// Patch embedding as patchify + matmul: `(B, C, H, W)` -> `(B*gh*gw, D)` with `gh = H / p`,
    /// `gw = W / p` (a trailing remainder is dropped, as a stride-p conv does).
    pub fn patch_embed(&self, x: &Tensor) -> Result<Tensor> {
        self.check_input(x)?;
        let p = self.cfg.patch_size;
        let shift = self.patch_norm.is_some().then_some(p / 2);
        let mut patches = crate::patch::patchify(x, p, shift)?;
        if let Some(norm) = &self.patch_norm {
            patches = norm.forward(&patches)?;
        }
        let w2 = self
            .patch_weight
            .reshape((self.cfg.embed_dim, patches.dim(1)?))?;
        ops::linear(&patches, &w2, Some(&self.patch_bias))
    }

    /// The official `interpolate_pos_encoding` for an input of `h` rows and `w` columns (pixels):
    /// `pos_embed` unchanged when the patch count equals the training one and the input is square, otherwise
    /// the patch part resampled bicubically (A = -0.75, align_corners False) with scale factor
    /// `((h // p + 0.1) / sqrt(N), (w // p + 0.1) / sqrt(N))`, computed as `Wr @ P @ Wc^T` (differentiable).
    /// Returns `(1, 1 + (h // p) * (w // p), D)`.
    pub fn interpolate_pos_encoding(&self, h: usize, w: usize) -> Result<Tensor> {
        let p = self.cfg.patch_size;
        let (gh, gw) = (h / p, w / p);
        let n = self.cfg.num_patches();
        if gh * gw == n && h == w {
            return Ok(self.pos_embed.clone());
        }
        let g = self.cfg.grid();
        let d = self.cfg.embed_dim;
        let (wr, wc) = self.interp_matrices(gh, gw)?;
        let class_pos = self.pos_embed.narrow(1, 0, 1)?;
        let patch_pos = self.pos_embed.narrow(1, 1, n)?.reshape((g, g * d))?;
        let rows = wr.matmul(&patch_pos)?.reshape((gh, g, d))?; // (gh, g, D)
        let both = wc.broadcast_matmul(&rows)?; // (gh, gw, D)
        let both = both.reshape((1, gh * gw, d))?;
        Tensor::cat(&[&class_pos, &both], 1)
    }

    fn interp_matrices(&self, gh: usize, gw: usize) -> Result<(Tensor, Tensor)> {
        let mut cache = self.interp_cache.lock().map_err(|_| {
            candle_core::Error::Msg("ViT interpolation cache mutex poisoned".into())
        })?;
        if let Some(m) = cache.get(&(gh, gw)) {
            return Ok(m.clone());
        }
        let g = self.cfg.grid();
        let dev = self.pos_embed.device();
        let dt = self.pos_embed.dtype();
        let sr = (gh as f64 + 0.1) / g as f64;
        let sc = (gw as f64 + 0.1) / g as f64;
        let wr = Tensor::from_vec(bicubic_matrix(g, gh, sr), (gh, g), dev)?.to_dtype(dt)?;
        let wc = Tensor::from_vec(bicubic_matrix(g, gw, sc), (gw, g), dev)?.to_dtype(dt)?;
        cache.insert((gh, gw), (wr.clone(), wc.clone()));
        Ok((wr, wc))
    }

    fn prepare(&self, x: &Tensor) -> Result<Tokens> {
        self.prepare_masked(x, None)
    }

    /// [`prepare`](Self::prepare) with the patches where `masks` `(B, N)` (u8 or u32, nonzero = masked) is set
    /// replaced by the mask token (dinov2: after the patch embedding, before the positional embedding).
    fn prepare_masked(&self, x: &Tensor, masks: Option<&Tensor>) -> Result<Tokens> {
        let (b, _, h, w) = self.check_input(x)?;
        let p = self.cfg.patch_size;
        let n = (h / p) * (w / p);
        let d = self.cfg.embed_dim;
        let mut patches = self.patch_embed(x)?.reshape((b, n, d))?;
        if let Some(m) = masks {
            let Some(token) = &self.mask_token else {
                candle_core::bail!(
                    "VisionTransformer: patch masks given, but the network has no mask token \
                     (ViTConfig::mask_token)"
                );
            };
            if m.dims() != [b, n] {
                candle_core::bail!(
                    "VisionTransformer: patch masks must be (B, N) = ({b}, {n}), got {:?}",
                    m.dims()
                );
            }
            let m = m.unsqueeze(2)?.broadcast_as((b, n, d))?;
            let t = token.reshape((1, 1, d))?.broadcast_as((b, n, d))?;
            patches = m.where_cond(&t, &patches)?;
        }
        let cls = self.cls_token.broadcast_as((b, 1, d))?;
        let tokens = Tensor::cat(&[&cls, &patches], 1)?;
        let pos = self.interpolate_pos_encoding(h, w)?;
        let mut tokens = tokens.broadcast_add(&pos)?;
        // dinov2: the registers go after the CLS token, after the positional embedding (they get none).
        if let Some(reg) = &self.register_tokens {
            let r = reg.dim(1)?;
            tokens = Tensor::cat(
                &[
                    tokens.narrow(1, 0, 1)?,
                    reg.broadcast_as((b, r, d))?.contiguous()?,
                    tokens.narrow(1, 1, n)?,
                ],
                1,
            )?;
        }
        let t = tokens.dim(1)?;
        Ok(Tokens {
            x: tokens.reshape((b * t, d))?,
            b,
            t,
        })
    }

    /// The official `prepare_tokens`: patch embedding, CLS token, (interpolated) positional embedding.
    /// `(B, C, H, W)` -> `(B, 1 + R + (H/p)(W/p), D)` (R register tokens after the CLS token, dinov2).
    pub fn prepare_tokens(&self, x: &Tensor) -> Result<Tensor> {
        let t = self.prepare(x)?;
        t.x.reshape((t.b, t.t, self.cfg.embed_dim))
    }

    /// The drop-path keys of a training forward on `b` rows (None outside training or without drop path).
    fn drop_path_keys(&self, b: usize, train: bool) -> Result<Option<DropPathKeys>> {
        if !train || self.blocks.iter().all(|blk| blk.drop_path <= 0.0) {
            return Ok(None);
        }
        let mut st = self
            .drop_keys
            .lock()
            .map_err(|_| candle_core::Error::Msg("ViT drop-path state mutex poisoned".into()))?;
        Ok(Some(st.take(b)?))
    }

    fn run_blocks(&self, tok: &Tokens, upto: usize, keys: Option<&DropPathKeys>) -> Result<Tensor> {
        let mut x = tok.x.clone();
        for (i, blk) in self.blocks[..upto].iter().enumerate() {
            x = blk.forward(&x, tok.b, tok.t, blk.branch_scales(i, keys))?;
        }
        Ok(x)
    }

    /// `(B, C, H, W)` -> `(B, D)`: the CLS token after the final norm. `train` enables drop path (masks keyed
    /// by the iteration seed and each row's crop and sample, see [`Backbone::reseed`] and
    /// [`Backbone::set_drop_path_samples`]).
    pub fn forward_t(&self, x: &Tensor, train: bool) -> Result<Tensor> {
        let tok = self.prepare(x)?;
        let keys = self.drop_path_keys(tok.b, train)?;
        if self.cfg.pool == Pool::Avg {
            let y = self.run_blocks(&tok, self.blocks.len(), keys.as_ref())?;
            let y = self
                .norm
                .forward(&y)?
                .reshape((tok.b, tok.t, self.cfg.embed_dim))?;
            let first = self.cfg.num_prefix_tokens();
            return y.narrow(1, first, tok.t - first)?.mean(1);
        }
        let last = self.blocks.len() - 1;
        let y = self.run_blocks(&tok, last, keys.as_ref())?;
        let blk = &self.blocks[last];
        let cls = blk.forward_cls(&y, tok.b, tok.t, blk.branch_scales(last, keys.as_ref()))?;
        self.norm.forward(&cls)
    }

    /// DINOv2's `forward_features` for iBOT: `(B, C, H, W)` and optional patch masks `(B, N)` (u8 or u32,
    /// nonzero = replaced by the mask token) -> `(x_norm_clstoken (B, D), x_norm_patchtokens (B, N, D))`,
    /// both after the final norm (register tokens dropped). Every block runs on every token. `train` as in
    /// [`forward_t`](Self::forward_t).
    pub fn forward_tokens(
        &self,
        x: &Tensor,
        masks: Option<&Tensor>,
        train: bool,
    ) -> Result<(Tensor, Tensor)> {
        let tok = self.prepare_masked(x, masks)?;
        let keys = self.drop_path_keys(tok.b, train)?;
        let y = self.run_blocks(&tok, self.blocks.len(), keys.as_ref())?;
        let d = self.cfg.embed_dim;
        let y = self.norm.forward(&y)?.reshape((tok.b, tok.t, d))?;
        let first = self.cfg.num_prefix_tokens();
        let cls = y.narrow(1, 0, 1)?.reshape((tok.b, d))?;
        let patches = y.narrow(1, first, tok.t - first)?;
        Ok((cls, patches))
    }

    /// Evaluation forward (no drop path): `(B, C, H, W)` -> `(B, D)`.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        self.forward_t(x, false)
    }

    /// Attention probabilities of the last block, `(B, heads, T, T)` with `T = 1 + patches` (evaluation mode).
    pub fn get_last_selfattention(&self, x: &Tensor) -> Result<Tensor> {
        let tok = self.prepare(x)?;
        let last = self.blocks.len() - 1;
        let y = self.run_blocks(&tok, last, None)?;
        self.blocks[last].attention_probs(&y, tok.b, tok.t)
    }

    /// The outputs of the last `n` blocks, each normed by the final LayerNorm: `n` tensors `(B, T, D)`
    /// (evaluation mode).
    pub fn get_intermediate_layers(&self, x: &Tensor, n: usize) -> Result<Vec<Tensor>> {
        let tok = self.prepare(x)?;
        let depth = self.blocks.len();
        let d = self.cfg.embed_dim;
        let mut out = Vec::with_capacity(n.min(depth));
        let mut y = tok.x.clone();
        for (i, blk) in self.blocks.iter().enumerate() {
            y = blk.forward(&y, tok.b, tok.t, (None, None))?;
            if depth - i <= n {
                out.push(self.norm.forward(&y)?.reshape((tok.b, tok.t, d))?);
            }
        }
        Ok(out)
    }

    /// Start an iteration's drop-path draws from `seed`, the rows of each forward call being samples
    /// `0..B` of one crop.
    pub fn reseed(&self, seed: u64) {
        if let Ok(mut r) = self.drop_keys.lock() {
            *r = DropPathState {
                seed,
                samples: None,
                next_crop: 0,
            };
        }
    }

    /// Start an iteration's drop-path draws from `seed`, the rows of one crop being the samples `samples`
    /// (their positions in the global batch): a forward call on `m` crops' rows (crop-major) takes the next
    /// `m` crops. The masks then do not depend on how the batch is split over ranks.
    pub fn set_drop_path_samples(&self, seed: u64, samples: &[u64]) {
        if let Ok(mut r) = self.drop_keys.lock() {
            *r = DropPathState {
                seed,
                samples: Some(samples.to_vec()),
                next_crop: 0,
            };
        }
    }

    /// The device of the parameters.
    pub fn device(&self) -> &Device {
        self.pos_embed.device()
    }

    /// The dtype of the parameters.
    pub fn dtype(&self) -> DType {
        self.pos_embed.dtype()
    }
}

impl Backbone for VisionTransformer {
    fn forward_features(&self, x: &Tensor, train: bool) -> Result<Tensor> {
        self.forward_t(x, train)
    }

    fn forward_tokens(
        &self,
        x: &Tensor,
        masks: Option<&Tensor>,
        train: bool,
    ) -> Result<(Tensor, Tensor)> {
        VisionTransformer::forward_tokens(self, x, masks, train)
    }

    fn embed_dim(&self) -> usize {
        self.cfg.embed_dim
    }

    fn cls_attention(&self, x: &Tensor) -> Result<Option<Tensor>> {
        let (b, _, h, w) = self.check_input(x)?;
        let p = self.cfg.patch_size;
        let (gh, gw) = (h / p, w / p);
        let attn = self.get_last_selfattention(x)?; // (B, heads, T, T)
        let heads = attn.dim(1)?;
        let cls = attn
            .narrow(2, 0, 1)?
            .narrow(3, self.cfg.num_prefix_tokens(), gh * gw)?;
        Ok(Some(cls.reshape((b, heads, gh, gw))?))
    }

    fn device(&self) -> Device {
        VisionTransformer::device(self).clone()
    }

    fn reseed(&self, seed: u64) {
        VisionTransformer::reseed(self, seed)
    }

    fn set_drop_path_samples(&self, seed: u64, samples: &[u64]) {
        VisionTransformer::set_drop_path_samples(self, seed, samples)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fused::MatmulPrecision;
    use candle_core::Var;
    use candle_nn::VarMap;

    fn pattern(n: usize, seed: u64) -> Vec<f32> {
        (0..n)
            .map(|i| ((i as u64 * 2654435761 + seed * 40503) % 10007) as f32 / 10007.0 - 0.5)
            .collect()
    }

    fn max_diff(a: &Tensor, b: &Tensor) -> Result<f32> {
        (a - b)?.abs()?.flatten_all()?.max(0)?.to_scalar::<f32>()
    }

    /// A block whose branches skip the dropped samples against the official computation: every branch on every
    /// sample, scaled by `s_i` (0 for a dropped sample) and added. Outputs and the gradients of the input and of
    /// every parameter (present in both or in neither), for the full block and its CLS-only form, with some
    /// samples dropped, every sample dropped, scales without drops, and no drop path.
    #[test]
    fn dropped_samples_skip_their_branches_with_official_results() -> Result<()> {
        let dev = Device::Cpu;
        let (b, t, d) = (6usize, 5usize, 8usize);
        let cfg = ViTConfig::custom(16, 4, d, 1, 2);
        let vm = VarMap::new();
        let blk = Block::new(&cfg, 0.5, VarBuilder::from_varmap(&vm, DType::F32, &dev))?;
        let mut vars = vm.all_vars();
        for (i, v) in vars.iter().enumerate() {
            v.set(&Tensor::from_vec(
                pattern(v.elem_count(), i as u64 + 1),
                v.dims(),
                &dev,
            )?)?;
        }
        let x = Var::from_vec(pattern(b * t * d, 99), (b * t, d), &dev)?;
        vars.push(x.clone());
        let reference = |s_attn: &Option<Vec<f32>>, s_mlp: &Option<Vec<f32>>| -> Result<Tensor> {
            let x = x.as_tensor();
            let a = blk.attention_heads(x, b, t)?;
            let proj = ops::linear(&a, &blk.proj.weight, blk.proj.bias.as_ref())?;
            let x = crate::fused::residual(x, &proj, s_attn.clone())?;
            let m = blk.mlp_hidden(&x)?;
            let fc2 = ops::linear(&m, &blk.fc2.weight, blk.fc2.bias.as_ref())?;
            crate::fused::residual(&x, &fc2, s_mlp.clone())
        };
        let some = Some(vec![1.5, 0.0, 2.0, 0.0, 0.0, 1.25]);
        let cases = [
            (some.clone(), Some(vec![0.0, 1.5, 0.5, 2.0, 1.25, 0.0])),
            (Some(vec![0.0; b]), some.clone()),
            (some.clone(), Some(vec![0.0; b])),
            (Some(vec![1.5; b]), None),
            (None, None),
        ];
        let up = Tensor::from_vec(pattern(b * t * d, 7), (b * t, d), &dev)?;
        // Under both precisions the fused ops skip the dropped samples' branches (`skips_dropped_samples`).
        let precisions = [MatmulPrecision::Highest, MatmulPrecision::Bf16];
        for ((s_attn, s_mlp), precision) in cases
            .into_iter()
            .flat_map(|c| precisions.map(|p| (c.clone(), p)))
        {
            crate::fused::with_matmul_precision(precision, || -> Result<()> {
                let what = format!("attention {s_attn:?}, mlp {s_mlp:?}, {precision:?}");
                let yr = reference(&s_attn, &s_mlp)?;
                let scales = (s_attn.clone(), s_mlp.clone());
                let y = blk.forward(x.as_tensor(), b, t, scales.clone())?;
                assert!(max_diff(&y, &yr)? < 1e-5, "block output: {what}");
                let yc = blk.forward_cls(x.as_tensor(), b, t, scales)?;
                let ycr = yr.reshape((b, t, d))?.narrow(1, 0, 1)?.reshape((b, d))?;
                assert!(max_diff(&yc, &ycr)? < 1e-5, "CLS output: {what}");
                for (out, refr, rows) in [(&y, &yr, b * t), (&yc, &ycr, b)] {
                    let u = up.narrow(0, 0, rows)?;
                    let g = (out * &u)?.sum_all()?.backward()?;
                    let gr = (refr * &u)?.sum_all()?.backward()?;
                    for (i, v) in vars.iter().enumerate() {
                        // A zero gradient and none differ for AdamW: both or neither.
                        let (a, r) = match (g.get(v), gr.get(v)) {
                            (Some(a), Some(r)) => (a, r),
                            (None, None) => continue,
                            (a, r) => panic!(
                                "gradient {i} ({rows} rows) present {} vs {}: {what}",
                                a.is_some(),
                                r.is_some()
                            ),
                        };
                        let diff = max_diff(a, r)?;
                        assert!(
                            diff < 1e-5,
                            "gradient {i} ({rows} rows) differs by {diff}: {what}"
                        );
                    }
                }
                Ok(())
            })?;
        }
        Ok(())
    }
}
