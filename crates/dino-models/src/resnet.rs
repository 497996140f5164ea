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

use candle_core::backend::BackendStorage;
use candle_core::{
    CpuStorage, CustomOp1, CustomOp3, DType, Device, Layout, Module, Result, Shape, Tensor, Var,
    WithDType,
};
use candle_nn::{Init, VarBuilder};

use crate::backbone::Backbone;

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
// Max-pool with a correct backward
// ---------------------------------------------------------------------------------------------------------

/// PyTorch's output size for a pooling window (`ceil_mode=False`, dilation 1).
fn pool_out(size: usize, kernel: usize, stride: usize, padding: usize) -> Result<usize> {
    if size + 2 * padding < kernel {
        candle_core::bail!(
            "max_pool2d: input size {size} with padding {padding} is smaller than the kernel {kernel}"
        )
    }
    Ok((size + 2 * padding - kernel) / stride + 1)
}

fn check_pool_args(
    x: &Tensor,
    kernel: usize,
    stride: usize,
    padding: usize,
) -> Result<(usize, usize)> {
    if kernel == 0 || stride == 0 {
        candle_core::bail!("max_pool2d: kernel ({kernel}) and stride ({stride}) must be >= 1")
    }
    if 2 * padding > kernel {
        candle_core::bail!(
            "max_pool2d: padding ({padding}) must be at most half the kernel ({kernel})"
        )
    }
    let (_, _, h, w) = x.dims4().map_err(|_| {
        candle_core::Error::Msg(format!(
            "max_pool2d expects a (B, C, H, W) input, got {:?}",
            x.dims()
        ))
    })?;
    Ok((
        pool_out(h, kernel, stride, padding)?,
        pool_out(w, kernel, stride, padding)?,
    ))
}

/// CPU max-pool with an analytic backward (first maximum of each window wins, as in PyTorch).
struct MaxPool2dOp {
    kernel: usize,
    stride: usize,
    padding: usize,
}

impl MaxPool2dOp {
    /// For each output position, the flat input index of the window's first maximum (`usize::MAX` when
    /// the whole window is padding, which cannot happen with `padding <= kernel / 2`).
    fn argmax<T: WithDType>(
        &self,
        x: &[T],
        (b, c, h, w): (usize, usize, usize, usize),
    ) -> Result<Vec<usize>> {
        let (ho, wo) = (
            pool_out(h, self.kernel, self.stride, self.padding)?,
            pool_out(w, self.kernel, self.stride, self.padding)?,
        );
        let mut idx = vec![usize::MAX; b * c * ho * wo];
        par_chunks(&mut idx, ho * wo, |plane, out| {
            let base = plane * h * w;
            for oy in 0..ho {
                for ox in 0..wo {
                    let mut best = usize::MAX;
                    let mut best_v = T::zero();
                    for ky in 0..self.kernel {
                        let iy = (oy * self.stride + ky) as isize - self.padding as isize;
                        if iy < 0 || iy >= h as isize {
                            continue;
                        }
                        for kx in 0..self.kernel {
                            let ix = (ox * self.stride + kx) as isize - self.padding as isize;
                            if ix < 0 || ix >= w as isize {
                                continue;
                            }
                            let i = base + iy as usize * w + ix as usize;
                            let v = x[i];
                            // PyTorch: `(val > maxval) || isnan(val)`; NaN compares unequal to itself.
                            #[allow(clippy::eq_op)]
                            let is_nan = v != v;
                            if best == usize::MAX || v > best_v || is_nan {
                                best = i;
                                best_v = v;
                            }
                        }
                    }
                    out[oy * wo + ox] = best;
                }
            }
        });
        Ok(idx)
    }

    /// `gx[argmax[o]] += g[o]`, one image plane per task.
    fn scatter<T: WithDType>(
        &self,
        gx: &mut [T],
        idx: &[usize],
        g: &[T],
        (b, c, h, w): (usize, usize, usize, usize),
    ) {
        let per_out = idx.len() / (b * c).max(1);
        par_chunks(gx, h * w, |plane, gplane| {
            let base = plane * h * w;
            let r = plane * per_out..(plane + 1) * per_out;
            for (&i, &gv) in idx[r.clone()].iter().zip(&g[r]) {
                if i != usize::MAX {
                    gplane[i - base] += gv;
                }
            }
        });
    }

    fn fwd<T: WithDType>(&self, x: &[T], dims: (usize, usize, usize, usize)) -> Result<Vec<T>> {
        let idx = self.argmax(x, dims)?;
        Ok(idx
            .iter()
            .map(|&i| if i == usize::MAX { T::zero() } else { x[i] })
            .collect())
    }
}

impl CustomOp1 for MaxPool2dOp {
    fn name(&self) -> &'static str {
        "dino-max-pool2d"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> Result<(CpuStorage, Shape)> {
        let dims = layout.shape().dims4()?;
        let (b, c, h, w) = dims;
        let (ho, wo) = (
            pool_out(h, self.kernel, self.stride, self.padding)?,
            pool_out(w, self.kernel, self.stride, self.padding)?,
        );
        let (start, end) = layout.contiguous_offsets().ok_or_else(|| {
            candle_core::Error::Msg("dino-max-pool2d: input must be contiguous".into())
        })?;
        let out = match storage {
            CpuStorage::F32(v) => CpuStorage::F32(self.fwd(&v[start..end], dims)?),
            CpuStorage::F64(v) => CpuStorage::F64(self.fwd(&v[start..end], dims)?),
            s => candle_core::bail!("dino-max-pool2d: unsupported dtype {:?}", s.dtype()),
        };
        Ok((out, Shape::from((b, c, ho, wo))))
    }

    fn bwd(&self, arg: &Tensor, _res: &Tensor, grad_res: &Tensor) -> Result<Option<Tensor>> {
        let dims = arg.dims4()?;
        let n = arg.elem_count();
        let grad = match arg.dtype() {
            DType::F32 => {
                let x = arg.flatten_all()?.to_vec1::<f32>()?;
                let g = grad_res.flatten_all()?.to_vec1::<f32>()?;
                let mut gx = vec![0f32; n];
                self.scatter(&mut gx, &self.argmax(&x, dims)?, &g, dims);
                Tensor::from_vec(gx, arg.shape(), arg.device())?
            }
            DType::F64 => {
                let x = arg.flatten_all()?.to_vec1::<f64>()?;
                let g = grad_res.flatten_all()?.to_vec1::<f64>()?;
                let mut gx = vec![0f64; n];
                self.scatter(&mut gx, &self.argmax(&x, dims)?, &g, dims);
                Tensor::from_vec(gx, arg.shape(), arg.device())?
            }
            dt => candle_core::bail!("dino-max-pool2d backward: unsupported dtype {dt:?}"),
        };
        Ok(Some(grad))
    }
}

/// Max-pool composed from `-inf` padding, `kernel * kernel` strided views and `maximum`: works on every
/// device and dtype, and its gradient is correct (ties between equal values split the gradient, which
/// only differs from PyTorch on exact ties).
pub fn max_pool2d_composed(
    x: &Tensor,
    kernel: usize,
    stride: usize,
    padding: usize,
) -> Result<Tensor> {
    let (ho, wo) = check_pool_args(x, kernel, stride, padding)?;
    let (b, c, h, w) = x.dims4()?;
    // Pad to exactly the extent the strided views need: `(k - 1) + stride * out` per side.
    let need_h = kernel - 1 + stride * ho;
    let need_w = kernel - 1 + stride * wo;
    let neg = |rows: usize, cols: usize| {
        Tensor::full(f64::NEG_INFINITY, (b, c, rows, cols), x.device())?.to_dtype(x.dtype())
    };
    let mut p = x.clone();
    let (top, bottom) = (padding, need_h.saturating_sub(h + padding));
    if top > 0 || bottom > 0 {
        let mut parts = vec![];
        if top > 0 {
            parts.push(neg(top, w)?);
        }
        parts.push(p.clone());
        if bottom > 0 {
            parts.push(neg(bottom, w)?);
        }
        p = Tensor::cat(&parts, 2)?;
    }
    let hp = p.dim(2)?;
    let (left, right) = (padding, need_w.saturating_sub(w + padding));
    if left > 0 || right > 0 {
        let mut parts = vec![];
        if left > 0 {
            parts.push(neg(hp, left)?);
        }
        parts.push(p.clone());
        if right > 0 {
            parts.push(neg(hp, right)?);
        }
        p = Tensor::cat(&parts, 3)?;
    }
    let mut out: Option<Tensor> = None;
    for ky in 0..kernel {
        // rows ky, ky + stride, ..., ky + stride * (ho - 1)
        let rows = p
            .narrow(2, ky, stride * ho)?
            .reshape((b, c, ho, stride, p.dim(3)?))?
            .narrow(3, 0, 1)?
            .squeeze(3)?;
        for kx in 0..kernel {
            let v = rows
                .narrow(3, kx, stride * wo)?
                .reshape((b, c, ho, wo, stride))?
                .narrow(4, 0, 1)?
                .squeeze(4)?;
            out = Some(match out {
                None => v,
                Some(o) => o.maximum(&v)?,
            });
        }
    }
    out.ok_or_else(|| candle_core::Error::Msg("max_pool2d: empty kernel".into()))
}

/// `(B, C, H, W) -> (B, C, Ho, Wo)` max-pool with PyTorch's semantics (`ceil_mode=False`, implicit `-inf`
/// padding) and a correct backward. CPU f32/f64 use a custom op (gradient to the first maximum, as
/// PyTorch); other devices and dtypes use [`max_pool2d_composed`].
pub fn max_pool2d(x: &Tensor, kernel: usize, stride: usize, padding: usize) -> Result<Tensor> {
    check_pool_args(x, kernel, stride, padding)?;
    let fast = matches!(x.device(), Device::Cpu) && matches!(x.dtype(), DType::F32 | DType::F64);
    if fast {
        x.contiguous()?
            .apply_op1_arc(std::sync::Arc::new(Box::new(MaxPool2dOp {
                kernel,
                stride,
                padding,
            })))
    } else {
        max_pool2d_composed(x, kernel, stride, padding)
    }
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
            let fused = matches!(x.device(), Device::Cpu)
                && matches!(x.dtype(), DType::F32 | DType::F64)
                && self.weight.dtype() == x.dtype()
                && self.bias.dtype() == x.dtype();
            // SyncBatchNorm across the ranks of a data-parallel run (the official code converts every
            // BatchNorm when `has_batchnorms`): statistics over the global batch.
            let world = dino_core::collective::world_size();
            let n_all = if world > 1 {
                dino_core::collective::all_reduce_count(n).map_err(to_candle)?
            } else {
                n
            };
            if fused {
                let x = x.contiguous()?;
                let stats = match x.dtype() {
                    DType::F32 => {
                        channel_stats(&x.flatten_all()?.to_vec1::<f32>()?, b, c, h * w, n_all)?
                    }
                    _ => channel_stats(&x.flatten_all()?.to_vec1::<f64>()?, b, c, h * w, n_all)?,
                };
                let mean: Vec<f64> = stats.iter().map(|s| s.0).collect();
                let var: Vec<f64> = stats.iter().map(|s| s.1).collect();
                let inv_std = var.iter().map(|v| 1.0 / (v + self.eps).sqrt()).collect();
                let op = BatchNormTrainOp {
                    mean: mean.clone(),
                    inv_std,
                    n_all,
                };
                let y =
                    x.apply_op3_arc(&self.weight, &self.bias, std::sync::Arc::new(Box::new(op)))?;
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

/// Per-channel `(mean, biased variance)` of a contiguous `(B, C, HW)` buffer, two-pass in f64, channels
/// spread over all cores. `n_all` is the number of values per channel over every rank: when it exceeds this
/// buffer's `B * HW`, each pass's per-channel sums are all-reduced (SyncBatchNorm).
fn channel_stats<T: WithDType>(
    x: &[T],
    b: usize,
    c: usize,
    hw: usize,
    n_all: usize,
) -> Result<Vec<(f64, f64)>> {
    let sync = n_all != b * hw;
    let n = n_all as f64;
    let planes = |ci: usize| (0..b).map(move |bi| &x[(bi * c + ci) * hw..(bi * c + ci + 1) * hw]);
    let mut sums = vec![0.0f64; c];
    par_chunks(&mut sums, 1, |ci, slot| {
        slot[0] = planes(ci)
            .map(|p| p.iter().map(|v| v.to_f64()).sum::<f64>())
            .sum::<f64>();
    });
    if sync {
        dino_core::collective::current()
            .all_reduce_sum_f64(&mut sums)
            .map_err(to_candle)?;
    }
    let mean: Vec<f64> = sums.iter().map(|s| s / n).collect();
    let mut sq = vec![0.0f64; c];
    par_chunks(&mut sq, 1, |ci, slot| {
        let m = mean[ci];
        slot[0] = planes(ci)
            .map(|p| p.iter().map(|v| (v.to_f64() - m).powi(2)).sum::<f64>())
            .sum::<f64>();
    });
    if sync {
        dino_core::collective::current()
            .all_reduce_sum_f64(&mut sq)
            .map_err(to_candle)?;
    }
    Ok(mean.into_iter().zip(sq).map(|(m, q)| (m, q / n)).collect())
}

fn to_candle(e: dino_core::Error) -> candle_core::Error {
    candle_core::Error::Msg(e.to_string())
}

/// Train-mode BatchNorm `y = (x - mean) * inv_std * weight + bias` on CPU with an analytic backward; the
/// batch statistics are computed beforehand (they also feed the running statistics).
struct BatchNormTrainOp {
    mean: Vec<f64>,
    inv_std: Vec<f64>,
    /// Values per channel over every rank (the local `B * HW` outside data parallelism).
    n_all: usize,
}

impl BatchNormTrainOp {
    fn fwd<T: WithDType>(&self, x: &[T], w: &[T], bias: &[T], c: usize, hw: usize) -> Vec<T> {
        let mut y = x.to_vec();
        let scale: Vec<f64> = (0..c).map(|ci| self.inv_std[ci] * w[ci].to_f64()).collect();
        let shift: Vec<f64> = (0..c)
            .map(|ci| bias[ci].to_f64() - self.mean[ci] * scale[ci])
            .collect();
        par_chunks(&mut y, c * hw, |_, img| {
            for (ci, plane) in img.chunks_mut(hw).enumerate() {
                let (sc, sh) = (scale[ci], shift[ci]);
                for v in plane.iter_mut() {
                    *v = T::from_f64(v.to_f64() * sc + sh);
                }
            }
        });
        y
    }

    /// `(dx, dweight, dbias)` for upstream gradient `g`.
    fn bwd_impl<T: WithDType>(
        &self,
        x: &[T],
        w: &[T],
        g: &[T],
        b: usize,
        c: usize,
        hw: usize,
    ) -> Result<(Vec<T>, Vec<T>, Vec<T>)> {
        // Per channel: sum(g) and sum(g * xhat).
        let mut sums = vec![(0.0f64, 0.0f64); c];
        par_chunks(&mut sums, 1, |ci, slot| {
            let (m, is) = (self.mean[ci], self.inv_std[ci]);
            let (mut sg, mut sgx) = (0.0, 0.0);
            for bi in 0..b {
                let r = (bi * c + ci) * hw..(bi * c + ci + 1) * hw;
                for (xv, gv) in x[r.clone()].iter().zip(&g[r]) {
                    let gv = gv.to_f64();
                    sg += gv;
                    sgx += gv * (xv.to_f64() - m) * is;
                }
            }
            slot[0] = (sg, sgx);
        });
        // The weight and bias gradients are this rank's (the trainer averages them); dx needs the sums
        // over the global batch (SyncBatchNorm's all-reduce of sum_dy and sum_dy_xmu).
        let dw = sums.iter().map(|s| T::from_f64(s.1)).collect();
        let db = sums.iter().map(|s| T::from_f64(s.0)).collect();
        if self.n_all != b * hw {
            let mut flat: Vec<f64> = sums.iter().flat_map(|s| [s.0, s.1]).collect();
            dino_core::collective::current()
                .all_reduce_sum_f64(&mut flat)
                .map_err(to_candle)?;
            for (ci, s) in sums.iter_mut().enumerate() {
                *s = (flat[2 * ci], flat[2 * ci + 1]);
            }
        }
        let n = self.n_all as f64;
        let mut dx = vec![T::zero(); x.len()];
        par_chunks(&mut dx, c * hw, |bi, img| {
            for (ci, plane) in img.chunks_mut(hw).enumerate() {
                let (m, is) = (self.mean[ci], self.inv_std[ci]);
                let (sg, sgx) = sums[ci];
                let k = w[ci].to_f64() * is / n;
                let off = (bi * c + ci) * hw;
                for (i, d) in plane.iter_mut().enumerate() {
                    let xhat = (x[off + i].to_f64() - m) * is;
                    *d = T::from_f64(k * (n * g[off + i].to_f64() - sg - xhat * sgx));
                }
            }
        });
        Ok((dx, dw, db))
    }
}

impl CustomOp3 for BatchNormTrainOp {
    fn name(&self) -> &'static str {
        "dino-batch-norm-train"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (_, c, h, w) = l1.shape().dims4()?;
        let range = |l: &Layout| {
            l.contiguous_offsets().ok_or_else(|| {
                candle_core::Error::Msg("dino-batch-norm-train: inputs must be contiguous".into())
            })
        };
        let ((a1, e1), (a2, e2), (a3, e3)) = (range(l1)?, range(l2)?, range(l3)?);
        let out = match (s1, s2, s3) {
            (CpuStorage::F32(x), CpuStorage::F32(wt), CpuStorage::F32(bs)) => {
                CpuStorage::F32(self.fwd(&x[a1..e1], &wt[a2..e2], &bs[a3..e3], c, h * w))
            }
            (CpuStorage::F64(x), CpuStorage::F64(wt), CpuStorage::F64(bs)) => {
                CpuStorage::F64(self.fwd(&x[a1..e1], &wt[a2..e2], &bs[a3..e3], c, h * w))
            }
            _ => candle_core::bail!(
                "dino-batch-norm-train: x, weight and bias must all be f32 or all f64"
            ),
        };
        Ok((out, l1.shape().clone()))
    }

    fn bwd(
        &self,
        x: &Tensor,
        weight: &Tensor,
        _bias: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let (b, c, h, w) = x.dims4()?;
        let dev = x.device();
        let (dx, dw, db) = match x.dtype() {
            DType::F32 => {
                let (dx, dw, db) = self.bwd_impl(
                    &x.flatten_all()?.to_vec1::<f32>()?,
                    &weight.to_vec1::<f32>()?,
                    &grad.flatten_all()?.to_vec1::<f32>()?,
                    b,
                    c,
                    h * w,
                )?;
                (
                    Tensor::from_vec(dx, x.shape(), dev)?,
                    Tensor::new(dw, dev)?,
                    Tensor::new(db, dev)?,
                )
            }
            DType::F64 => {
                let (dx, dw, db) = self.bwd_impl(
                    &x.flatten_all()?.to_vec1::<f64>()?,
                    &weight.to_vec1::<f64>()?,
                    &grad.flatten_all()?.to_vec1::<f64>()?,
                    b,
                    c,
                    h * w,
                )?;
                (
                    Tensor::from_vec(dx, x.shape(), dev)?,
                    Tensor::new(dw, dev)?,
                    Tensor::new(db, dev)?,
                )
            }
            dt => candle_core::bail!("dino-batch-norm-train backward: unsupported dtype {dt:?}"),
        };
        Ok((Some(dx), Some(dw), Some(db)))
    }
}

// ---------------------------------------------------------------------------------------------------------
// Convolution
// ---------------------------------------------------------------------------------------------------------

/// Geometry of one convolution call.
#[derive(Debug, Clone, Copy)]
struct ConvGeom {
    b: usize,
    c: usize,
    h: usize,
    w: usize,
    k: usize,
    stride: usize,
    padding: usize,
    ho: usize,
    wo: usize,
}

impl ConvGeom {
    fn new(x: &Tensor, weight: &Tensor, stride: usize, padding: usize) -> Result<Self> {
        let (b, c, h, w) = x.dims4()?;
        let (_, c_w, k, k2) = weight.dims4()?;
        if c_w != c || k != k2 {
            candle_core::bail!(
                "conv2d: input {:?} does not fit kernel {:?}",
                x.dims(),
                weight.dims()
            )
        }
        if h + 2 * padding < k || w + 2 * padding < k {
            candle_core::bail!(
                "conv2d: input {:?} (padding {padding}) is smaller than the kernel {k}x{k}",
                x.dims()
            )
        }
        let ho = (h + 2 * padding - k) / stride + 1;
        let wo = (w + 2 * padding - k) / stride + 1;
        Ok(Self {
            b,
            c,
            h,
            w,
            k,
            stride,
            padding,
            ho,
            wo,
        })
    }

    /// Columns per output position: `c * k * k`.
    fn ckk(&self) -> usize {
        self.c * self.k * self.k
    }

    /// `true` when im2col is a plain transpose (1x1 kernel, stride 1, no padding).
    fn is_pointwise(&self) -> bool {
        self.k == 1 && self.stride == 1 && self.padding == 0
    }
}

/// Runs `f(i, chunk)` over the `per`-sized chunks of `out` on all cores (scoped threads).
fn par_chunks<T: Send>(out: &mut [T], per: usize, f: impl Fn(usize, &mut [T]) + Sync) {
    let n = out.len() / per.max(1);
    let threads = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1)
        .min(n.max(1));
    if threads <= 1 {
        for (i, chunk) in out.chunks_mut(per).enumerate() {
            f(i, chunk);
        }
        return;
    }
    let per_thread = n.div_ceil(threads);
    std::thread::scope(|scope| {
        for (t, group) in out.chunks_mut(per * per_thread).enumerate() {
            let f = &f;
            scope.spawn(move || {
                for (j, chunk) in group.chunks_mut(per).enumerate() {
                    f(t * per_thread + j, chunk);
                }
            });
        }
    });
}

/// For kernel column `kx`: the output columns `ox` in `[lo, hi)` whose input column `ox*s + kx - p` is
/// inside the image.
fn ox_range(g: &ConvGeom, kx: usize) -> (usize, usize) {
    let lo = g.padding.saturating_sub(kx).div_ceil(g.stride);
    let hi = if g.w + g.padding > kx {
        ((g.w + g.padding - kx - 1) / g.stride + 1).min(g.wo)
    } else {
        0
    };
    (lo, hi)
}

/// The input row of output row `oy` and kernel row `ky`, if inside the image.
fn input_row(g: &ConvGeom, oy: usize, ky: usize) -> Option<usize> {
    let iy = (oy * g.stride + ky).checked_sub(g.padding)?;
    (iy < g.h).then_some(iy)
}

/// `x (B, C, H, W)` -> columns `(C*k*k, B*Ho*Wo)`: row `(c, ky, kx)`, column `(b, oy, ox)`, zero padding.
fn im2col<T: WithDType>(x: &[T], g: &ConvGeom) -> Vec<T> {
    let (kk, p, hw) = (g.k * g.k, g.ho * g.wo, g.h * g.w);
    let bp = g.b * p;
    let mut cols = vec![T::zero(); g.ckk() * bp];
    par_chunks(&mut cols, kk * bp, |ci, out| {
        for ky in 0..g.k {
            for kx in 0..g.k {
                let (lo, hi) = ox_range(g, kx);
                let row = &mut out[(ky * g.k + kx) * bp..(ky * g.k + kx + 1) * bp];
                for bi in 0..g.b {
                    let plane = &x[(bi * g.c + ci) * hw..(bi * g.c + ci + 1) * hw];
                    for oy in 0..g.ho {
                        let Some(iy) = input_row(g, oy, ky) else {
                            continue;
                        };
                        let src = &plane[iy * g.w..(iy + 1) * g.w];
                        let dst = &mut row[bi * p + oy * g.wo..bi * p + (oy + 1) * g.wo];
                        if g.stride == 1 {
                            dst[lo..hi]
                                .copy_from_slice(&src[lo + kx - g.padding..hi + kx - g.padding]);
                        } else {
                            for ox in lo..hi {
                                dst[ox] = src[ox * g.stride + kx - g.padding];
                            }
                        }
                    }
                }
            }
        }
    });
    cols
}

/// Adjoint of [`im2col`]: columns `(C*k*k, B*Ho*Wo)` -> `dx` laid out `(C, B, H, W)`, summing overlaps.
fn col2im<T: WithDType>(cols: &[T], g: &ConvGeom) -> Vec<T> {
    let (kk, p, hw) = (g.k * g.k, g.ho * g.wo, g.h * g.w);
    let bp = g.b * p;
    let mut dx = vec![T::zero(); g.c * g.b * hw];
    par_chunks(&mut dx, g.b * hw, |ci, out| {
        let rows = &cols[ci * kk * bp..(ci + 1) * kk * bp];
        for ky in 0..g.k {
            for kx in 0..g.k {
                let (lo, hi) = ox_range(g, kx);
                let row = &rows[(ky * g.k + kx) * bp..(ky * g.k + kx + 1) * bp];
                for bi in 0..g.b {
                    let plane = &mut out[bi * hw..(bi + 1) * hw];
                    for oy in 0..g.ho {
                        let Some(iy) = input_row(g, oy, ky) else {
                            continue;
                        };
                        let dst = &mut plane[iy * g.w..(iy + 1) * g.w];
                        let src = &row[bi * p + oy * g.wo..bi * p + (oy + 1) * g.wo];
                        for ox in lo..hi {
                            dst[ox * g.stride + kx - g.padding] += src[ox];
                        }
                    }
                }
            }
        }
    });
    dx
}

/// `(B, C, H, W)` -> columns `(C*k*k, B*Ho*Wo)` as a tensor.
fn columns(x: &Tensor, g: &ConvGeom) -> Result<Tensor> {
    if g.is_pointwise() {
        return x
            .transpose(0, 1)?
            .contiguous()?
            .reshape((g.c, g.b * g.h * g.w));
    }
    let x = x.contiguous()?;
    let shape = (g.ckk(), g.b * g.ho * g.wo);
    match x.dtype() {
        DType::F32 => Tensor::from_vec(
            im2col(&x.flatten_all()?.to_vec1::<f32>()?, g),
            shape,
            x.device(),
        ),
        DType::F64 => Tensor::from_vec(
            im2col(&x.flatten_all()?.to_vec1::<f64>()?, g),
            shape,
            x.device(),
        ),
        dt => candle_core::bail!("conv2d (im2col): unsupported dtype {dt:?}"),
    }
}

/// Columns `(C*k*k, B*Ho*Wo)` -> `(B, C, H, W)`, the adjoint of [`columns`].
fn uncolumns(cols: &Tensor, g: &ConvGeom) -> Result<Tensor> {
    let cbhw = if g.is_pointwise() {
        cols.reshape((g.c, g.b, g.h, g.w))?
    } else {
        let cols = cols.contiguous()?;
        let shape = (g.c, g.b, g.h, g.w);
        match cols.dtype() {
            DType::F32 => Tensor::from_vec(
                col2im(&cols.flatten_all()?.to_vec1::<f32>()?, g),
                shape,
                cols.device(),
            )?,
            DType::F64 => Tensor::from_vec(
                col2im(&cols.flatten_all()?.to_vec1::<f64>()?, g),
                shape,
                cols.device(),
            )?,
            dt => candle_core::bail!("conv2d (col2im): unsupported dtype {dt:?}"),
        }
    };
    cbhw.transpose(0, 1)?.contiguous()
}

/// Forward by im2col + one GEMM: `(B, C, H, W) x (O, C, k, k) -> (B, O, Ho, Wo)` (contiguous).
fn conv2d_gemm(x: &Tensor, weight: &Tensor, g: &ConvGeom) -> Result<Tensor> {
    let o = weight.dim(0)?;
    // (O, CKK) x (CKK, B*HoWo) -> (O, B*HoWo) -> (B, O, Ho, Wo)
    let y = weight.reshape((o, g.ckk()))?.matmul(&columns(x, g)?)?;
    y.reshape((o, g.b, g.ho, g.wo))?
        .transpose(0, 1)?
        .contiguous()
}

/// Backward of a convolution whose forward result was computed outside the graph: the op's output is
/// `arg3` (copied), its gradients are GEMMs against im2col / col2im of `arg1` (input) and `arg2` (weight).
struct ConvBackward {
    stride: usize,
    padding: usize,
}

impl CustomOp3 for ConvBackward {
    fn name(&self) -> &'static str {
        "dino-conv2d"
    }

    fn cpu_fwd(
        &self,
        _s1: &CpuStorage,
        _l1: &Layout,
        _s2: &CpuStorage,
        _l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (start, end) = l3.contiguous_offsets().ok_or_else(|| {
            candle_core::Error::Msg("dino-conv2d: forward result must be contiguous".into())
        })?;
        let out = match s3 {
            CpuStorage::F32(v) => CpuStorage::F32(v[start..end].to_vec()),
            CpuStorage::F64(v) => CpuStorage::F64(v[start..end].to_vec()),
            s => candle_core::bail!("dino-conv2d: unsupported dtype {:?}", s.dtype()),
        };
        Ok((out, l3.shape().clone()))
    }

    fn bwd(
        &self,
        x: &Tensor,
        weight: &Tensor,
        _y: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let (x_tracked, weight_tracked) = (x.track_op(), weight.track_op());
        let (x, weight) = (x.detach(), weight.detach());
        let g = ConvGeom::new(&x, &weight, self.stride, self.padding)?;
        let o = weight.dim(0)?;
        // G: (B, O, Ho, Wo) -> (O, B*HoWo)
        let grad = grad
            .detach()
            .transpose(0, 1)?
            .contiguous()?
            .reshape((o, g.b * g.ho * g.wo))?;
        let w2 = weight.reshape((o, g.ckk()))?;
        // dW = G (O, B*HoWo) @ cols^T (B*HoWo, CKK)
        let dw = if weight_tracked {
            Some(
                grad.matmul(&columns(&x, &g)?.t()?)?
                    .reshape(weight.shape())?,
            )
        } else {
            None
        };
        // dcols = W^T (CKK, O) @ G (O, B*HoWo); dx = col2im(dcols). Skipped for inputs without gradient
        // (the images entering conv1).
        let dx = if x_tracked {
            Some(uncolumns(&w2.t()?.matmul(&grad)?, &g)?)
        } else {
            None
        };
        Ok((dx, dw, None))
    }
}

/// `(B, C, H, W) x (O, C, k, k) -> (B, O, Ho, Wo)` convolution (no bias, dilation 1, groups 1) whose
/// backward is two GEMMs plus im2col / col2im on CPU f32/f64, instead of candle's direct
/// `conv_transpose2d` loop. Other devices and dtypes call candle's `conv2d`.
pub fn conv2d(x: &Tensor, weight: &Tensor, stride: usize, padding: usize) -> Result<Tensor> {
    let fast = matches!(x.device(), Device::Cpu)
        && matches!(x.dtype(), DType::F32 | DType::F64)
        && x.dtype() == weight.dtype();
    if !fast {
        return x.conv2d(weight, padding, stride, 1, 1);
    }
    let g = ConvGeom::new(x, weight, stride, padding)?;
    let y = conv2d_gemm(&x.detach(), &weight.detach(), &g)?;
    if !x.track_op() && !weight.track_op() {
        return Ok(y);
    }
    x.apply_op3_arc(
        weight,
        &y,
        std::sync::Arc::new(Box::new(ConvBackward { stride, padding })),
    )
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
}
