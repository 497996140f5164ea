//! ResNet-18/34/50/101/152 with torchvision's architecture and parameter names, trainable in candle.
//!
//! This module owns the ResNet backbone used by DINO's `--arch resnet50` (and the smaller ResNet-18, with
//! an optional CIFAR stem for 32 px images), plus the two pieces candle gets wrong or lacks:
//!
//! - [`BatchNorm2d`]: PyTorch semantics. Train mode normalises with the batch statistics (biased variance),
//!   and updates `running_mean` / `running_var` in place with momentum 0.1 and the **unbiased** variance,
//!   and increments `num_batches_tracked`. Eval mode uses the running statistics. The three buffers live in
//!   the `VarMap` under torchvision's names (`bn1.running_mean`, ...); `num_batches_tracked` is an `i64`
//!   scalar of shape `[]`, exactly as in a PyTorch state dict. candle-nn's `BatchNorm` stores the biased
//!   variance and has no `num_batches_tracked`, so it is not used.
//! - [`max_pool2d`]: a max-pool with a correct backward (candle 0.11.1's `max_pool2d` backward is wrong).
//!   On CPU it is a custom op with an analytic backward that routes the gradient to the first maximum of
//!   each window, as PyTorch does; elsewhere it is composed from padded strided views and `maximum`.
//! - [`conv2d`]: on CPU the forward is im2col + one GEMM and the backward two GEMMs + col2im. candle's own
//!   conv2d backward runs a direct `conv_transpose2d` loop (about 3x slower here) and fails on non-square
//!   inputs whose height and width differ in parity under stride 2.
//! - The train-mode BatchNorm runs as one fused CPU op with an analytic backward (composed candle ops on
//!   other devices).
//!
//! Parameter names follow torchvision (`conv1.weight`, `bn1.*`, `layer1.0.conv1.weight`,
//! `layer2.0.downsample.0.weight`, `layer2.0.downsample.1.*`, ...). `fc` is removed, as DINO's
//! `MultiCropWrapper` does: the output is the global-average-pooled feature (512 for ResNet-18/34,
//! 2048 for ResNet-50/101/152). Initialisation follows torchvision: convolutions kaiming-normal with
//! `mode="fan_out", nonlinearity="relu"` (std = sqrt(2 / (c_out * k * k))), BatchNorm weight 1 and bias 0.

use candle_core::{DType, Device, Module, Result, Tensor, Var};
use candle_nn::{Init, VarBuilder};

use crate::backbone::Backbone;

pub use dino_kernels::conv::conv2d;
pub use dino_kernels::pool::{max_pool2d, max_pool2d_composed};

fn to_candle(e: dino_core::Error) -> candle_core::Error {
    candle_core::Error::Msg(e.to_string())
}

/// Which residual block a ResNet is built from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BlockKind {
    /// torchvision `BasicBlock`: two 3x3 convolutions, expansion 1 (ResNet-18/34).
    Basic,
    /// torchvision `Bottleneck` (v1.5: the stride sits on the 3x3 conv): 1x1, 3x3, 1x1, expansion 4
    /// (ResNet-50/101/152).
    Bottleneck,
}

impl BlockKind {
    /// Output channels per `planes`: 1 for `Basic`, 4 for `Bottleneck`.
    pub fn expansion(self) -> usize {
        match self {
            BlockKind::Basic => 1,
            BlockKind::Bottleneck => 4,
        }
    }
}

/// The network's stem (what runs before `layer1`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stem {
    /// torchvision: 7x7 conv stride 2 padding 3, BN, ReLU, 3x3 max-pool stride 2 padding 1.
    ImageNet,
    /// CIFAR variant for 32 px images: 3x3 conv stride 1 padding 1, BN, ReLU, no max-pool.
    /// The parameter names are unchanged (`conv1.weight` is then `[64, 3, 3, 3]`).
    Cifar,
}

/// ResNet hyper-parameters. `Default` is ResNet-18 with the ImageNet stem.
#[derive(Debug, Clone, PartialEq)]
pub struct ResNetConfig {
    /// Residual block type. Default: `BlockKind::Basic` (ResNet-18).
    pub block: BlockKind,
    /// Number of blocks in `layer1..layer4`. Default: `[2, 2, 2, 2]` (ResNet-18).
    pub layers: [usize; 4],
    /// Stem variant. Default: `Stem::ImageNet`.
    pub stem: Stem,
    /// BatchNorm epsilon. Default: 1e-5 (PyTorch).
    pub bn_eps: f64,
    /// BatchNorm running-statistics momentum. Default: 0.1 (PyTorch).
    pub bn_momentum: f64,
    /// torchvision `zero_init_residual`: initialise the last BN weight of each block to 0. Default: false.
    pub zero_init_residual: bool,
    /// Channels of the stem and `layer1`; `layer2..4` have 2, 4, 8 times as many (torchvision: 64). A
    /// narrower network for small images and CPU budgets. Default: 64.
    pub width: usize,
}

impl Default for ResNetConfig {
    fn default() -> Self {
        Self::resnet18()
    }
}

impl ResNetConfig {
    fn with(block: BlockKind, layers: [usize; 4]) -> Self {
        Self {
            block,
            layers,
            stem: Stem::ImageNet,
            bn_eps: 1e-5,
            bn_momentum: 0.1,
            zero_init_residual: false,
            width: 64,
        }
    }

    /// torchvision `resnet18`: BasicBlock, [2, 2, 2, 2], feature dim 512.
    pub fn resnet18() -> Self {
        Self::with(BlockKind::Basic, [2, 2, 2, 2])
    }

    /// torchvision `resnet34`: BasicBlock, [3, 4, 6, 3], feature dim 512.
    pub fn resnet34() -> Self {
        Self::with(BlockKind::Basic, [3, 4, 6, 3])
    }

    /// torchvision `resnet50`: Bottleneck, [3, 4, 6, 3], feature dim 2048.
    pub fn resnet50() -> Self {
        Self::with(BlockKind::Bottleneck, [3, 4, 6, 3])
    }

    /// torchvision `resnet101`: Bottleneck, [3, 4, 23, 3], feature dim 2048.
    pub fn resnet101() -> Self {
        Self::with(BlockKind::Bottleneck, [3, 4, 23, 3])
    }

    /// torchvision `resnet152`: Bottleneck, [3, 8, 36, 3], feature dim 2048.
    pub fn resnet152() -> Self {
        Self::with(BlockKind::Bottleneck, [3, 8, 36, 3])
    }

    /// ResNet-18 with the CIFAR stem (3x3 conv stride 1, no max-pool), for 32 px images.
    pub fn resnet18_cifar() -> Self {
        Self::resnet18().cifar()
    }

    /// The same configuration with the CIFAR stem.
    pub fn cifar(mut self) -> Self {
        self.stem = Stem::Cifar;
        self
    }

    /// A preset by name: `resnet18|34|50|101|152`, optionally with a `_cifar` suffix.
    pub fn by_name(arch: &str) -> Option<Self> {
        let (base, cifar) = match arch.strip_suffix("_cifar") {
            Some(b) => (b, true),
            None => (arch, false),
        };
        let cfg = match base {
            "resnet18" => Self::resnet18(),
            "resnet34" => Self::resnet34(),
            "resnet50" => Self::resnet50(),
            "resnet101" => Self::resnet101(),
            "resnet152" => Self::resnet152(),
            _ => return None,
        };
        Some(if cifar { cfg.cifar() } else { cfg })
    }

    /// The pooled feature dimension: `8 * width * expansion` (512 for ResNet-18, 2048 for ResNet-50).
    pub fn embed_dim(&self) -> usize {
        8 * self.width * self.block.expansion()
    }

    /// The same configuration with `width` channels in the stem and `layer1` (see [`ResNetConfig::width`]).
    pub fn with_width(mut self, width: usize) -> Self {
        self.width = width;
        self
    }
}

/// `true` for the names of BatchNorm buffers (`running_mean`, `running_var`, `num_batches_tracked`),
/// which are stored in the `VarMap` but are not trainable parameters.
pub fn is_batch_norm_buffer(name: &str) -> bool {
    name.ends_with("running_mean")
        || name.ends_with("running_var")
        || name.ends_with("num_batches_tracked")
}

fn check_config(cfg: &ResNetConfig) -> Result<()> {
    if cfg.layers.contains(&0) {
        candle_core::bail!("ResNetConfig.layers must all be >= 1, got {:?}", cfg.layers)
    }
    if cfg.width == 0 {
        candle_core::bail!("ResNetConfig.width must be >= 1")
    }
    if cfg.bn_eps.is_nan() || cfg.bn_eps <= 0.0 {
        candle_core::bail!("ResNetConfig.bn_eps must be > 0, got {}", cfg.bn_eps)
    }
    if !(0.0..=1.0).contains(&cfg.bn_momentum) {
        candle_core::bail!(
            "ResNetConfig.bn_momentum must be in [0, 1], got {}",
            cfg.bn_momentum
        )
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------------------
// BatchNorm2d
// ---------------------------------------------------------------------------------------------------------

/// PyTorch `BatchNorm2d` (affine, track_running_stats) with its buffers held in the `VarMap`.
#[derive(Debug, Clone)]
pub struct BatchNorm2d {
    weight: Tensor,
    bias: Tensor,
    running_mean: Var,
    running_var: Var,
    num_batches_tracked: Var,
    num_features: usize,
    eps: f64,
    momentum: f64,
    name: String,
}

impl BatchNorm2d {
    /// Creates (or loads) `weight` (init 1), `bias` (0), `running_mean` (0), `running_var` (1) and
    /// `num_batches_tracked` (i64 scalar `[]`, 0) under `vb`.
    pub fn new(num_features: usize, eps: f64, momentum: f64, vb: VarBuilder) -> Result<Self> {
        Self::new_with_weight_init(num_features, eps, momentum, 1.0, vb)
    }

    fn new_with_weight_init(
        num_features: usize,
        eps: f64,
        momentum: f64,
        weight_init: f64,
        vb: VarBuilder,
    ) -> Result<Self> {
        let weight = vb.get_with_hints(num_features, "weight", Init::Const(weight_init))?;
        let bias = vb.get_with_hints(num_features, "bias", Init::Const(0.))?;
        let running_mean = vb.get_with_hints(num_features, "running_mean", Init::Const(0.))?;
        let running_var = vb.get_with_hints(num_features, "running_var", Init::Const(1.))?;
        let nbt =
            vb.get_with_hints_dtype((), "num_batches_tracked", Init::Const(0.), DType::I64)?;
        Ok(Self {
            weight,
            bias,
            running_mean: Var::from_tensor(&running_mean)?,
            running_var: Var::from_tensor(&running_var)?,
            num_batches_tracked: Var::from_tensor(&nbt)?,
            num_features,
            eps,
            momentum,
            name: vb.prefix(),
        })
    }

    /// The running mean buffer `(C,)`.
    pub fn running_mean(&self) -> &Tensor {
        self.running_mean.as_tensor()
    }

    /// The running (unbiased) variance buffer `(C,)`.
    pub fn running_var(&self) -> &Tensor {
        self.running_var.as_tensor()
    }

    /// How many train-mode forwards updated the running statistics.
    pub fn num_batches_tracked(&self) -> Result<i64> {
        self.num_batches_tracked
            .as_tensor()
            .to_dtype(DType::I64)?
            .to_scalar::<i64>()
    }

    /// `(B, C, H, W) -> (B, C, H, W)`. `train`: normalise with the batch statistics (biased variance) and
    /// update the running statistics (unbiased variance, momentum) and `num_batches_tracked`;
    /// otherwise normalise with the running statistics.
    pub fn forward(&self, x: &Tensor, train: bool) -> Result<Tensor> {
        let (b, c, h, w) = x.dims4().map_err(|_| {
            candle_core::Error::Msg(format!(
                "BatchNorm2d `{}` expects (B, C, H, W), got {:?}",
                self.name,
                x.dims()
            ))
        })?;
        if c != self.num_features {
            candle_core::bail!(
                "BatchNorm2d `{}` expects {} channels, got input {:?}",
                self.name,
                self.num_features,
                x.dims()
            )
        }
        let shape = (1, c, 1, 1);
        if train {
            let n = b * h * w;
            if n < 2 {
                candle_core::bail!(
                    "BatchNorm2d `{}`: expected more than 1 value per channel when training, got input {:?}",
                    self.name,
                    x.dims()
                )
            }
            let fused =
                dino_kernels::batch_norm::batch_norm_train_applies(x, &self.weight, &self.bias);
            // SyncBatchNorm across the ranks of a data-parallel run (the official code converts every
            // BatchNorm when `has_batchnorms`): statistics over the global batch.
            let world = dino_core::collective::world_size();
            let n_all = if world > 1 {
                dino_core::collective::all_reduce_count(n).map_err(to_candle)?
            } else {
                n
            };
            if fused {
                let reduce: Option<dino_kernels::batch_norm::SumReducer> = (world > 1).then(|| {
                    std::sync::Arc::new(|sums: &mut [f64]| {
                        dino_core::collective::current()
                            .all_reduce_sum_f64(sums)
                            .map_err(to_candle)
                    }) as dino_kernels::batch_norm::SumReducer
                });
                let (y, mean, var) = dino_kernels::batch_norm::batch_norm_train(
                    x,
                    &self.weight,
                    &self.bias,
                    self.eps,
                    n_all,
                    reduce,
                )?;
                let dev = x.device();
                self.update_running_stats(
                    &Tensor::new(mean, dev)?,
                    &Tensor::new(var, dev)?,
                    n_all,
                )?;
                return Ok(y);
            }
            let (y, mean, var) = self.train_composed(x)?;
            self.update_running_stats(&mean.detach(), &var.detach(), n_all)?;
            Ok(y)
        } else {
            let dt = x.dtype();
            let rm = self.running_mean.as_tensor().detach().to_dtype(dt)?;
            let rv = self.running_var.as_tensor().detach().to_dtype(dt)?;
            let scale = (rv + self.eps)?.sqrt()?.recip()?.mul(&self.weight)?;
            let shift = self.bias.sub(&rm.mul(&scale)?)?;
            x.broadcast_mul(&scale.reshape(shape)?)?
                .broadcast_add(&shift.reshape(shape)?)
        }
    }

    /// Train-mode normalisation composed from candle ops (any device and dtype): `(y, mean, biased var)`.
    /// [`BatchNorm2d::forward`] uses it off CPU; on CPU f32/f64 it runs a fused op with an analytic
    /// backward instead. Does not touch the running statistics.
    pub fn forward_train_composed(&self, x: &Tensor) -> Result<Tensor> {
        Ok(self.train_composed(x)?.0)
    }

    fn train_composed(&self, x: &Tensor) -> Result<(Tensor, Tensor, Tensor)> {
        let shape = (1, self.num_features, 1, 1);
        if dino_core::collective::world_size() > 1 {
            // SyncBatchNorm: sums over the ranks, differentiable.
            use dino_core::collective::{all_reduce_count, all_reduce_sum};
            let (b, _, h, w) = x.dims4()?;
            let n = all_reduce_count(b * h * w).map_err(to_candle)? as f64;
            let mean = (all_reduce_sum(&x.sum_keepdim((0, 2, 3))?)? / n)?;
            let xc = x.broadcast_sub(&mean)?;
            let var = (all_reduce_sum(&xc.sqr()?.sum_keepdim((0, 2, 3))?)? / n)?;
            let inv_std = (&var + self.eps)?.sqrt()?.recip()?;
            let scale = inv_std.broadcast_mul(&self.weight.reshape(shape)?)?;
            let y = xc
                .broadcast_mul(&scale)?
                .broadcast_add(&self.bias.reshape(shape)?)?;
            return Ok((y, mean, var));
        }
        let mean = x.mean_keepdim((0, 2, 3))?;
        let xc = x.broadcast_sub(&mean)?;
        let var = xc.sqr()?.mean_keepdim((0, 2, 3))?;
        let inv_std = (&var + self.eps)?.sqrt()?.recip()?;
        let scale = inv_std.broadcast_mul(&self.weight.reshape(shape)?)?;
        let y = xc
            .broadcast_mul(&scale)?
            .broadcast_add(&self.bias.reshape(shape)?)?;
        Ok((y, mean, var))
    }

    fn update_running_stats(&self, mean: &Tensor, biased_var: &Tensor, n: usize) -> Result<()> {
        let m = self.momentum;
        let dt = self.running_mean.dtype();
        let mean = mean.flatten_all()?.to_dtype(dt)?;
        let unbiased = (biased_var.flatten_all()?.to_dtype(dt)? * (n as f64 / (n as f64 - 1.0)))?;
        let rm = ((self.running_mean.as_tensor() * (1.0 - m))? + (mean * m)?)?;
        let rv = ((self.running_var.as_tensor() * (1.0 - m))? + (unbiased * m)?)?;
        self.running_mean.set(&rm)?;
        self.running_var.set(&rv)?;
        let nbt = self.num_batches_tracked.as_tensor();
        let next =
            Tensor::new(self.num_batches_tracked()? + 1, nbt.device())?.to_dtype(nbt.dtype())?;
        self.num_batches_tracked.set(&next)
    }
}

/// A bias-free 2-D convolution (`nn.Conv2d(..., bias=False)`) with torchvision's ResNet init.
#[derive(Debug, Clone)]
struct Conv2d {
    weight: Tensor,
    stride: usize,
    padding: usize,
}

impl Conv2d {
    fn new(
        c_in: usize,
        c_out: usize,
        k: usize,
        stride: usize,
        padding: usize,
        vb: VarBuilder,
    ) -> Result<Self> {
        // kaiming_normal_(mode="fan_out", nonlinearity="relu"): std = gain / sqrt(fan_out), gain = sqrt(2).
        let stdev = (2.0 / (c_out * k * k) as f64).sqrt();
        let weight = vb.get_with_hints(
            (c_out, c_in, k, k),
            "weight",
            Init::Randn { mean: 0., stdev },
        )?;
        Ok(Self {
            weight,
            stride,
            padding,
        })
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        conv2d(x, &self.weight, self.stride, self.padding)
    }
}

// ---------------------------------------------------------------------------------------------------------
// Blocks
// ---------------------------------------------------------------------------------------------------------

#[derive(Debug, Clone)]
struct Downsample {
    conv: Conv2d,
    bn: BatchNorm2d,
}

impl Downsample {
    fn maybe(
        c_in: usize,
        c_out: usize,
        stride: usize,
        cfg: &ResNetConfig,
        vb: &VarBuilder,
    ) -> Result<Option<Self>> {
        if stride == 1 && c_in == c_out {
            return Ok(None);
        }
        let vb = vb.pp("downsample");
        Ok(Some(Self {
            conv: Conv2d::new(c_in, c_out, 1, stride, 0, vb.pp("0"))?,
            bn: BatchNorm2d::new(c_out, cfg.bn_eps, cfg.bn_momentum, vb.pp("1"))?,
        }))
    }

    fn forward(&self, x: &Tensor, train: bool) -> Result<Tensor> {
        self.bn.forward(&self.conv.forward(x)?, train)
    }
}

/// torchvision `BasicBlock` or `Bottleneck`.
#[derive(Debug, Clone)]
struct Block {
    convs: Vec<Conv2d>,
    bns: Vec<BatchNorm2d>,
    downsample: Option<Downsample>,
}

impl Block {
    fn new(
        kind: BlockKind,
        c_in: usize,
        planes: usize,
        stride: usize,
        cfg: &ResNetConfig,
        vb: VarBuilder,
    ) -> Result<Self> {
        let c_out = planes * kind.expansion();
        // (c_in, c_out, kernel, stride, padding) of conv1, conv2[, conv3]
        let specs: Vec<(usize, usize, usize, usize, usize)> = match kind {
            BlockKind::Basic => vec![(c_in, planes, 3, stride, 1), (planes, planes, 3, 1, 1)],
            BlockKind::Bottleneck => {
                vec![
                    (c_in, planes, 1, 1, 0),
                    (planes, planes, 3, stride, 1),
                    (planes, c_out, 1, 1, 0),
                ]
            }
        };
        let last = specs.len() - 1;
        let mut convs = Vec::with_capacity(specs.len());
        let mut bns = Vec::with_capacity(specs.len());
        for (i, &(ci, co, k, s, p)) in specs.iter().enumerate() {
            convs.push(Conv2d::new(
                ci,
                co,
                k,
                s,
                p,
                vb.pp(format!("conv{}", i + 1)),
            )?);
            let w0 = if cfg.zero_init_residual && i == last {
                0.0
            } else {
                1.0
            };
            bns.push(BatchNorm2d::new_with_weight_init(
                co,
                cfg.bn_eps,
                cfg.bn_momentum,
                w0,
                vb.pp(format!("bn{}", i + 1)),
            )?);
        }
        let downsample = Downsample::maybe(c_in, c_out, stride, cfg, &vb)?;
        Ok(Self {
            convs,
            bns,
            downsample,
        })
    }

    fn forward(&self, x: &Tensor, train: bool) -> Result<Tensor> {
        let last = self.convs.len() - 1;
        let mut h = x.clone();
        for (i, (conv, bn)) in self.convs.iter().zip(&self.bns).enumerate() {
            h = bn.forward(&conv.forward(&h)?, train)?;
            if i != last {
                h = h.relu()?;
            }
        }
        let identity = match &self.downsample {
            Some(d) => d.forward(x, train)?,
            None => x.clone(),
        };
        (h + identity)?.relu()
    }
}

// ---------------------------------------------------------------------------------------------------------
// ResNet
// ---------------------------------------------------------------------------------------------------------

/// Intermediate outputs of one forward pass, as torchvision names them.
#[derive(Debug, Clone)]
pub struct ResNetStages {
    /// Stem output `(B, 64, H/4, W/4)` (ImageNet stem, after the max-pool) or `(B, 64, H, W)` (CIFAR stem).
    pub maxpool: Tensor,
    /// `layer1..layer4` outputs; channels `64, 128, 256, 512` times the block expansion, strides 1, 2, 4, 8
    /// relative to the stem output.
    pub layers: [Tensor; 4],
    /// Global average pool `(B, D, 1, 1)`.
    pub avgpool: Tensor,
    /// The feature `(B, D)` (`avgpool` flattened; `fc` is removed).
    pub out: Tensor,
}

/// A torchvision ResNet without `fc`: images `(B, 3, H, W)` to pooled features `(B, D)`.
#[derive(Debug, Clone)]
pub struct ResNet {
    cfg: ResNetConfig,
    conv1: Conv2d,
    bn1: BatchNorm2d,
    layers: Vec<Vec<Block>>,
}

impl ResNet {
    /// Builds the network under `vb` with torchvision's parameter names and initialisation hints.
    pub fn new(cfg: ResNetConfig, vb: VarBuilder) -> Result<Self> {
        check_config(&cfg)?;
        let w = cfg.width;
        let conv1 = match cfg.stem {
            Stem::ImageNet => Conv2d::new(3, w, 7, 2, 3, vb.pp("conv1"))?,
            Stem::Cifar => Conv2d::new(3, w, 3, 1, 1, vb.pp("conv1"))?,
        };
        let bn1 = BatchNorm2d::new(w, cfg.bn_eps, cfg.bn_momentum, vb.pp("bn1"))?;
        let mut c_in = w;
        let mut layers = Vec::with_capacity(4);
        for (li, (&n_blocks, planes)) in cfg.layers.iter().zip([w, 2 * w, 4 * w, 8 * w]).enumerate()
        {
            let stride = if li == 0 { 1 } else { 2 };
            let vb_l = vb.pp(format!("layer{}", li + 1));
            let mut blocks = Vec::with_capacity(n_blocks);
            for bi in 0..n_blocks {
                let s = if bi == 0 { stride } else { 1 };
                blocks.push(Block::new(
                    cfg.block,
                    c_in,
                    planes,
                    s,
                    &cfg,
                    vb_l.pp(bi.to_string()),
                )?);
                c_in = planes * cfg.block.expansion();
            }
            layers.push(blocks);
        }
        Ok(Self {
            cfg,
            conv1,
            bn1,
            layers,
        })
    }

    /// The configuration this network was built from.
    pub fn config(&self) -> &ResNetConfig {
        &self.cfg
    }

    /// `(B, 3, H, W) -> ResNetStages`: every torchvision stage output of one forward pass.
    /// `train` uses batch statistics in every BatchNorm and updates their running statistics.
    pub fn forward_stages(&self, x: &Tensor, train: bool) -> Result<ResNetStages> {
        let (_, c, _, _) = x.dims4().map_err(|_| {
            candle_core::Error::Msg(format!(
                "ResNet expects images (B, 3, H, W), got {:?}",
                x.dims()
            ))
        })?;
        if c != 3 {
            candle_core::bail!("ResNet expects 3 input channels, got input {:?}", x.dims())
        }
        let h = self.bn1.forward(&self.conv1.forward(x)?, train)?.relu()?;
        let stem = match self.cfg.stem {
            Stem::ImageNet => max_pool2d(&h, 3, 2, 1)?,
            Stem::Cifar => h,
        };
        let mut h = stem.clone();
        let mut outs = Vec::with_capacity(4);
        for blocks in &self.layers {
            for block in blocks {
                h = block.forward(&h, train)?;
            }
            outs.push(h.clone());
        }
        let avgpool = h.mean_keepdim((2, 3))?;
        let out = avgpool.flatten_from(1)?;
        let layers: [Tensor; 4] = outs
            .try_into()
            .map_err(|_| candle_core::Error::Msg("ResNet: expected 4 stages".into()))?;
        Ok(ResNetStages {
            maxpool: stem,
            layers,
            avgpool,
            out,
        })
    }

    /// `(B, 3, H, W) -> (B, D)`: the global-average-pooled feature.
    pub fn forward_t(&self, x: &Tensor, train: bool) -> Result<Tensor> {
        Ok(self.forward_stages(x, train)?.out)
    }
}

impl Module for ResNet {
    /// Eval-mode forward `(B, 3, H, W) -> (B, D)`.
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        self.forward_t(x, false)
    }
}

impl Backbone for ResNet {
    fn forward_features(&self, x: &Tensor, train: bool) -> Result<Tensor> {
        self.forward_t(x, train)
    }

    fn embed_dim(&self) -> usize {
        self.cfg.embed_dim()
    }

    fn device(&self) -> Device {
        self.conv1.weight.device().clone()
    }
}
