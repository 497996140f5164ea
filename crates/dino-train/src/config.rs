//! `TrainConfig`: every option of the official `main_dino.py` (same names, same defaults), plus the
//! options this port adds (custom small ViTs, normalisation, evaluation, logging, mid-epoch checkpoints),
//! TOML loading, named presets and the key-by-key comparison used to refuse a changed config on resume.

use std::path::{Path, PathBuf};

use dino_models::MatmulPrecision;
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

/// Which optimiser trains the student (`--optimizer`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum OptimizerKind {
    /// torch.optim.AdamW, betas (0.9, 0.999), eps 1e-8, per-parameter steps (official default).
    #[default]
    Adamw,
    /// SGD with momentum 0.9, lr set by the schedule.
    Sgd,
    /// LARS (barlowtwins flavour): eta 0.001, momentum 0.9, no adaptation for 1-D parameters.
    Lars,
}

impl std::str::FromStr for OptimizerKind {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        match s.to_ascii_lowercase().as_str() {
            "adamw" => Ok(Self::Adamw),
            "sgd" => Ok(Self::Sgd),
            "lars" => Ok(Self::Lars),
            _ => Err(Error::config(
                "optimizer",
                s,
                "expected one of adamw, sgd, lars",
            )),
        }
    }
}

/// How teacher logits become targets (`--centering`, the dinov2 `centering` key).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum Centering {
    /// DINO v1: subtract an EMA of the batch mean, then softmax at the teacher temperature (default).
    #[default]
    Centering,
    /// DINOv2: Sinkhorn-Knopp normalisation (3 iterations) over the global batch; no centre.
    SinkhornKnopp,
}

impl Centering {
    /// Sinkhorn-Knopp iterations of the official dinov2 code.
    pub const SINKHORN_ITERATIONS: usize = 3;

    /// The loss-level choice.
    pub fn to_loss(self) -> dino_core::TeacherCentering {
        match self {
            Self::Centering => dino_core::TeacherCentering::Centering,
            Self::SinkhornKnopp => dino_core::TeacherCentering::SinkhornKnopp {
                n_iterations: Self::SINKHORN_ITERATIONS,
            },
        }
    }
}

impl std::str::FromStr for Centering {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        match s.to_ascii_lowercase().replace('-', "_").as_str() {
            "centering" => Ok(Self::Centering),
            "sinkhorn_knopp" => Ok(Self::SinkhornKnopp),
            _ => Err(Error::config(
                "centering",
                s,
                "expected centering or sinkhorn_knopp",
            )),
        }
    }
}

/// How the student's crops go through the network in a training step (`--student-passes`).
///
/// The DINO loss is a sum of terms, one per student crop, against teacher targets that get no gradient, so
/// the student's crops can go forward and backward in several passes whose gradients add up to the
/// one-pass gradient; each pass's activations are freed by its backward before the next pass starts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum StudentPasses {
    /// `resolution`, or `all` with `use_bn_in_head` (default).
    #[default]
    Auto,
    /// One forward and one backward over every crop, as the official code.
    All,
    /// One pass per run of crops with the same resolution, the groups the multi-crop wrapper runs the
    /// backbone on (the 2 global crops, then the local crops): the same BatchNorm statistics as one pass.
    Resolution,
    /// One pass per crop (with iBOT the 2 masked global crops share one): the least memory. ViT only, as a
    /// ResNet's BatchNorm statistics would come from one crop instead of its resolution group.
    Crop,
}

impl std::str::FromStr for StudentPasses {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        match s.to_ascii_lowercase().as_str() {
            "auto" => Ok(Self::Auto),
            "all" => Ok(Self::All),
            "resolution" => Ok(Self::Resolution),
            "crop" => Ok(Self::Crop),
            _ => Err(Error::config(
                "student_passes",
                s,
                "expected auto, all, resolution or crop",
            )),
        }
    }
}

impl std::fmt::Display for StudentPasses {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::Auto => "auto",
            Self::All => "all",
            Self::Resolution => "resolution",
            Self::Crop => "crop",
        })
    }
}

impl StudentPasses {
    /// The passes a configuration runs: `auto` made `resolution`, or `all` when the head has BatchNorm.
    pub fn resolve(self, use_bn_in_head: bool) -> Self {
        match self {
            Self::Auto if use_bn_in_head => Self::All,
            Self::Auto => Self::Resolution,
            p => p,
        }
    }
}

/// How the ViT's block linears start (`--vit-linear-init`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum VitLinearInit {
    /// The official `trunc_normal_(std=.02)` weights and zero biases (default).
    #[default]
    TruncNormal,
    /// PyTorch's `nn.Linear` default: weight and bias `U(±1/sqrt(fan_in))`.
    DefaultUniform,
}

impl VitLinearInit {
    /// The model-level choice.
    pub fn to_model(self) -> dino_models::init::LinearInit {
        match self {
            Self::TruncNormal => dino_models::init::LinearInit::TruncNormal,
            Self::DefaultUniform => dino_models::init::LinearInit::DefaultUniform,
        }
    }
}

impl std::str::FromStr for VitLinearInit {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        match s.to_ascii_lowercase().replace('-', "_").as_str() {
            "trunc_normal" => Ok(Self::TruncNormal),
            "default_uniform" => Ok(Self::DefaultUniform),
            _ => Err(Error::config(
                "vit_linear_init",
                s,
                "expected trunc_normal or default_uniform",
            )),
        }
    }
}

/// Where the training images come from (`--dataset`, together with `--data_path`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "kebab-case")]
pub enum DatasetKind {
    /// An image folder: class sub-folders (ImageNet layout, labels from folder names) or a flat folder of
    /// unlabelled images, searched recursively (official default).
    #[default]
    Folder,
    /// CIFAR-10 binary batches in `data_path` (`data_batch_{1..5}.bin` train, `test_batch.bin` test).
    Cifar10,
    /// CIFAR-100 binary files in `data_path` (`train.bin`, `test.bin`).
    Cifar100,
    /// Fashion-MNIST IDX files in `data_path` (`train-*` train, `t10k-*` test; gzipped or not).
    FashionMnist,
    /// MNIST IDX files in `data_path` (same layout as Fashion-MNIST).
    Mnist,
    /// The Fashion-MNIST subset embedded in this library (5,000 train / 1,000 test); `data_path` is ignored.
    Embedded,
}

impl DatasetKind {
    /// The kebab-case name used in TOML files and on the command line.
    pub fn name(&self) -> &'static str {
        match self {
            Self::Folder => "folder",
            Self::Cifar10 => "cifar10",
            Self::Cifar100 => "cifar100",
            Self::FashionMnist => "fashion-mnist",
            Self::Mnist => "mnist",
            Self::Embedded => "embedded",
        }
    }
}

impl std::str::FromStr for DatasetKind {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        match s.to_ascii_lowercase().replace('_', "-").as_str() {
            "folder" | "image-folder" | "imagefolder" => Ok(Self::Folder),
            "cifar10" | "cifar-10" => Ok(Self::Cifar10),
            "cifar100" | "cifar-100" => Ok(Self::Cifar100),
            "fashion-mnist" | "fashionmnist" | "fmnist" => Ok(Self::FashionMnist),
            "mnist" => Ok(Self::Mnist),
            "embedded" => Ok(Self::Embedded),
            _ => Err(Error::config(
                "dataset",
                s,
                "expected one of folder, cifar10, cifar100, fashion-mnist, mnist, embedded",
            )),
        }
    }
}

/// The backbone architectures `arch` accepts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Arch {
    /// ViT-Tiny: dim 192, depth 12, 3 heads.
    VitTiny,
    /// ViT-Small: dim 384, depth 12, 6 heads.
    VitSmall,
    /// ViT-Base: dim 768, depth 12, 12 heads.
    VitBase,
    /// A ViT sized by `vit_embed_dim`, `vit_depth`, `vit_num_heads` (for small images).
    VitCustom,
    /// torchvision ResNet-18 (pooled 512-d feature).
    Resnet18,
    /// torchvision ResNet-50 (pooled 2048-d feature).
    Resnet50,
}

impl Arch {
    /// The names `arch` accepts.
    pub const NAMES: &'static [&'static str] = &[
        "vit_tiny",
        "vit_small",
        "vit_base",
        "vit_custom",
        "resnet18",
        "resnet50",
    ];

    /// Whether this is a Vision Transformer.
    pub fn is_vit(&self) -> bool {
        matches!(
            self,
            Self::VitTiny | Self::VitSmall | Self::VitBase | Self::VitCustom
        )
    }
}

impl std::str::FromStr for Arch {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        // The official code renames deit_tiny / deit_small to vit_tiny / vit_small.
        match s {
            "vit_tiny" | "deit_tiny" => Ok(Self::VitTiny),
            "vit_small" | "deit_small" => Ok(Self::VitSmall),
            "vit_base" => Ok(Self::VitBase),
            "vit_custom" => Ok(Self::VitCustom),
            "resnet18" => Ok(Self::Resnet18),
            "resnet50" => Ok(Self::Resnet50),
            _ => Err(Error::config(
                "arch",
                s,
                format!("expected one of {}", Self::NAMES.join(", ")),
            )),
        }
    }
}

/// The full training configuration. Field names are the official `main_dino.py` argument names; defaults
/// are the official defaults (ImageNet-style data) unless stated. Loadable from TOML (every key optional).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TrainConfig {
    // ----- model -----
    /// Backbone architecture: vit_tiny, vit_small, vit_base, vit_custom, resnet18, resnet50. Default `vit_small`.
    pub arch: String,
    /// ViT patch size in pixels. Default 16.
    pub patch_size: usize,
    /// ViT positional-embedding grid size in pixels (the official models use 224 and interpolate). Default 224.
    pub img_size: usize,
    /// `vit_custom` embedding dimension. Default 192.
    pub vit_embed_dim: usize,
    /// `vit_custom` number of blocks. Default 12.
    pub vit_depth: usize,
    /// `vit_custom` number of attention heads. Default 3.
    pub vit_num_heads: usize,
    /// ResNet: use the CIFAR stem (3x3 conv stride 1, no max-pool) for 32 px images. Default false.
    pub resnet_cifar_stem: bool,
    /// ViT image feature (what the head and the k-NN see): the mean of the patch tokens instead of the CLS
    /// token, each after the final norm (timm's `global_pool='avg'`). Default false (CLS, official).
    pub vit_pool_avg: bool,
    /// ViT: DINOv2 register tokens after the CLS token (dinov2 `*_reg` models: 4). Default 0.
    pub vit_num_register_tokens: usize,
    /// ViT: DINOv2 LayerScale initial value (dinov2 training: 1e-5); 0 disables. Default 0.
    pub vit_layer_scale_init: f64,
    /// ViT: shifted patch tokenization (Lee et al. 2021): each patch embedding also sees the image moved by
    /// half a patch in the four diagonal directions, LayerNormed before the projection. Default false.
    pub vit_shifted_patches: bool,
    /// ViT: initialisation of the block linears: trunc_normal (official, std 0.02, zero bias) or
    /// default_uniform (PyTorch's `nn.Linear` default, weight and bias `U(±1/sqrt(fan_in))`). Default
    /// trunc_normal.
    pub vit_linear_init: VitLinearInit,
    /// ResNet: channels of the stem and the first stage (later stages 2x, 4x, 8x; the feature is 8x). Default
    /// 64 (torchvision).
    pub resnet_width: usize,
    /// Dimension K of the DINO head output. Default 65536.
    pub out_dim: usize,
    /// Fix the weight-norm gain of the head's last layer to 1 (not trained). Default true.
    pub norm_last_layer: bool,
    /// Use BatchNorm in the projection head. Default false.
    pub use_bn_in_head: bool,
    /// Head MLP hidden dimension. Default 2048.
    pub head_hidden_dim: usize,
    /// Head bottleneck dimension (before the weight-normalised last layer). Default 256.
    pub head_bottleneck_dim: usize,
    /// Under `matmul_precision = bf16`, let the head's last layer take bf16 products too, as PyTorch's
    /// autocast does (its logits are divided by the teacher temperature, so its rounding weighs 25x).
    /// Default false (f32 products there).
    pub head_last_layer_bf16: bool,
    /// Number of head MLP layers. Default 3.
    pub head_nlayers: usize,
    /// Stochastic depth rate of the student (linearly increasing per block). Default 0.1.
    pub drop_path_rate: f64,

    // ----- teacher and loss -----
    /// Base EMA momentum of the teacher, cosine-scheduled to 1. Default 0.996.
    pub momentum_teacher: f64,
    /// Initial teacher temperature of the warm-up. Default 0.04.
    pub warmup_teacher_temp: f64,
    /// Final teacher temperature. Default 0.04.
    pub teacher_temp: f64,
    /// Number of epochs of linear teacher-temperature warm-up. Default 0 (the code default, not the help text's 30).
    pub warmup_teacher_temp_epochs: usize,
    /// Student temperature. Default 0.1.
    pub student_temp: f64,
    /// Centre EMA momentum. Default 0.9.
    pub center_momentum: f64,
    /// Teacher targets: `centering` (DINO v1 EMA centre) or `sinkhorn_knopp` (DINOv2). Default centering.
    pub centering: Centering,
    /// Weight of DINOv2's KoLeo regulariser on the student backbone's CLS features of each global crop
    /// (official dinov2: 0.1); 0 disables. Default 0.
    pub koleo_loss_weight: f64,
    /// Under data parallelism, where KoLeo's nearest neighbours are searched: `true`, in the global batch
    /// (the student features gathered over the ranks, so a run on N ranks is the same run as one process
    /// with the whole batch); `false`, within each rank's own batch, as dinov2 does (then N ranks are not
    /// one process). No effect on one rank. Default true.
    pub koleo_global_batch: bool,
    /// Weight of DINOv2's iBOT masked-patch loss (dinov2: 1.0; ViT only): the student's global crops get
    /// patches replaced by a mask token and predict the teacher's distributions of those patches through the
    /// shared head, with targets made as `centering` says; 0 disables. Default 0.
    pub ibot_loss_weight: f64,
    /// iBOT: range of the fraction of patches masked in a masked crop (dinov2 `mask_ratio_min_max`).
    /// Default [0.1, 0.5].
    pub ibot_mask_ratio_min_max: [f64; 2],
    /// iBOT: fraction of the global crops that get a mask (dinov2 `mask_sample_probability`). Default 0.5.
    pub ibot_mask_sample_probability: f64,

    // ----- optimisation -----
    /// Initial weight decay, cosine-scheduled to `weight_decay_end`. Default 0.04.
    pub weight_decay: f64,
    /// Final weight decay. Default 0.4.
    pub weight_decay_end: f64,
    /// Per-parameter gradient-norm clipping threshold; 0 disables. Default 3.0.
    pub clip_grad: f64,
    /// Images per step (the official `batch_size_per_gpu` times the world size, 1 here). Default 64.
    pub batch_size: usize,
    /// Number of epochs. Default 100.
    pub epochs: usize,
    /// Epochs during which the head's last layer receives no update. Default 1.
    pub freeze_last_layer: usize,
    /// Peak learning rate for a batch of 256 (scaled linearly: lr * batch_size / 256). Default 0.0005.
    pub lr: f64,
    /// Epochs of linear learning-rate warm-up from 0. Default 10.
    pub warmup_epochs: usize,
    /// Final learning rate of the cosine schedule. Default 1e-6.
    pub min_lr: f64,
    /// Optimiser: adamw, sgd or lars. Default adamw.
    pub optimizer: OptimizerKind,
    /// Arithmetic of the matrix products of the training step's linear layers and attention heads (those over
    /// 128 or more keys; shorter ones stay f32, which ran faster): `highest` (f32) or `bf16` (operands rounded
    /// to bfloat16, sums in f32; faster steps on CPUs with AMX or AVX-512 BF16, f32 on others), the CPU
    /// counterpart of the official `--use_fp16`. Weights, activations, the head's last
    /// layer (unless `head_last_layer_bf16`), the loss, the optimiser and evaluation stay f32, except the
    /// pre-activation GELU keeps for its backward pass, kept in bf16 as under autocast. Default highest.
    pub matmul_precision: MatmulPrecision,
    /// How the student's crops go through the network in a step: `all` (one forward and backward over every
    /// crop, as the official code), `resolution` (one pass per crop resolution: the global crops, then the
    /// local crops), `crop` (one pass per crop; ViT only) or `auto` (`resolution`, or `all` with
    /// `use_bn_in_head`). The passes' gradients add up to the one-pass gradient (the same up to the order of
    /// float additions); peak memory falls with more passes (vit_small/16, batch 64, 2 x 224 + 8 x 96 px
    /// crops: 17.3, 12.2 and 8.1 GiB), the step slows where a pass is small (see the README). Not part of a
    /// run's identity: a run may resume with another value. Default auto.
    pub student_passes: StudentPasses,
    /// Where the run computes: `cpu`, `cuda` (GPU 0), `cuda:N`, or `auto` (GPU 0 when this build has CUDA and a
    /// GPU answers, else the CPU). Not part of a run's identity: a checkpoint resumes on any device. Default cpu.
    pub device: crate::device::DeviceSpec,
    /// Which implementation of each op runs: `auto` (the CPU fast path's kernels on the CPU, the portable
    /// candle composition elsewhere) or `portable` (the composition everywhere: what runs on CUDA, for
    /// checking it on a CPU; slower). `DINO_KERNELS` sets it too. Default auto.
    pub kernels: dino_models::KernelPath,

    // ----- multi-crop augmentation -----
    /// Scale range of the global crops' RandomResizedCrop. Default [0.4, 1.0].
    pub global_crops_scale: [f64; 2],
    /// Number of small local crops; 0 disables multi-crop. Default 8.
    pub local_crops_number: usize,
    /// Scale range of the local crops. Default [0.05, 0.4].
    pub local_crops_scale: [f64; 2],
    /// Side of the global crops in pixels. Default 224.
    pub global_crops_size: usize,
    /// Side of the local crops in pixels. Default 96.
    pub local_crops_size: usize,
    /// Range of the Gaussian blur's sigma (Pillow radius) in pixels. The official (0.1, 2.0) is meant for
    /// 224 px crops; on small images the same blur in pixels removes proportionally more. Default [0.1, 2.0].
    pub blur_sigma: [f64; 2],
    /// Aspect-ratio range (width / height) of every crop's RandomResizedCrop, sampled log-uniformly; [1, 1]
    /// keeps the crops' shapes undistorted. Default [0.75, 1.3333333333333333] (torchvision's 3/4, 4/3).
    pub crops_ratio: [f64; 2],
    /// Probability of the colour jitter (brightness 0.4, contrast 0.4, saturation 0.2, hue 0.1) on each crop;
    /// 0 disables it. Default 0.8.
    pub color_jitter_p: f64,
    /// Probability of the Gaussian blur on global crop 1, global crop 2 and each local crop. Default
    /// [1.0, 0.1, 0.5].
    pub blur_p: [f64; 3],
    /// Probability of solarising global crop 2 (pixels >= 128 inverted); 0 disables it. Default 0.2.
    pub solarize_p: f64,
    /// Per-channel normalisation mean. Default ImageNet [0.485, 0.456, 0.406].
    pub norm_mean: [f32; 3],
    /// Per-channel normalisation std. Default ImageNet [0.229, 0.224, 0.225].
    pub norm_std: [f32; 3],

    // ----- data and output -----
    /// Training data: an image folder, or the directory of the standard CIFAR / IDX files. Default
    /// `/path/to/imagenet/train/` (the official placeholder).
    pub data_path: PathBuf,
    /// What `data_path` holds. Default `folder`.
    pub dataset: DatasetKind,
    /// Train on the first this many images only (0: all). Default 0.
    pub max_train_images: usize,
    /// Labelled validation split for k-NN (image folder only; the CIFAR / IDX kinds use their test files).
    /// Default none.
    pub val_data_path: Option<PathBuf>,
    /// Where logs, checkpoints and plots go. Default `.`.
    pub output_dir: PathBuf,
    /// Also keep `checkpoint{epoch:04}.safetensors` every this many epochs. Default 20.
    pub saveckp_freq: usize,
    /// Also checkpoint every this many iterations inside an epoch (0: only at epoch ends). Default 0.
    pub ckpt_every_iters: usize,
    /// Random seed: initial weights, shuffling, augmentation and drop path. Default 0.
    pub seed: u64,
    /// Data-loading threads (the loader's own pool). Default 10.
    pub num_workers: usize,
    /// Images prefetched ahead of the training step, in batches. Default 2.
    pub prefetch_batches: usize,
    /// Write a JSON log line and refresh the progress bar every this many iterations. Default 10.
    pub log_every: usize,

    // ----- evaluation -----
    /// Run k-NN on the validation split every this many epochs (0: never during training). Default 0.
    pub eval_every: usize,
    /// Run k-NN after the last epoch (and report the same network at initialisation). Default false.
    pub eval_final: bool,
    /// Number of neighbours of the weighted k-NN. Default 20.
    pub knn_k: usize,
    /// Temperature of the weighted k-NN votes. Default 0.07.
    pub knn_temperature: f64,
    /// Evaluation transform: resize of the shorter side (bicubic). Default 256.
    pub eval_resize: usize,
    /// Evaluation transform: centre crop. Default 224.
    pub eval_crop: usize,
    /// Use at most this many training images as the k-NN bank (0: all). Default 0.
    pub eval_max_train: usize,
    /// Use at most this many validation images as k-NN queries (0: all). Default 0.
    pub eval_max_val: usize,
    /// Batch size of feature extraction. Default 128.
    pub eval_batch_size: usize,
}

impl Default for TrainConfig {
    fn default() -> Self {
        Self {
            arch: "vit_small".into(),
            patch_size: 16,
            img_size: 224,
            vit_embed_dim: 192,
            vit_depth: 12,
            vit_num_heads: 3,
            resnet_cifar_stem: false,
            vit_pool_avg: false,
            vit_num_register_tokens: 0,
            vit_shifted_patches: false,
            vit_linear_init: VitLinearInit::TruncNormal,
            vit_layer_scale_init: 0.0,
            resnet_width: 64,
            out_dim: 65536,
            norm_last_layer: true,
            use_bn_in_head: false,
            head_hidden_dim: 2048,
            head_bottleneck_dim: 256,
            head_last_layer_bf16: false,
            head_nlayers: 3,
            drop_path_rate: 0.1,
            momentum_teacher: 0.996,
            warmup_teacher_temp: 0.04,
            teacher_temp: 0.04,
            warmup_teacher_temp_epochs: 0,
            student_temp: 0.1,
            center_momentum: 0.9,
            centering: Centering::Centering,
            koleo_loss_weight: 0.0,
            koleo_global_batch: true,
            ibot_loss_weight: 0.0,
            ibot_mask_ratio_min_max: [0.1, 0.5],
            ibot_mask_sample_probability: 0.5,
            weight_decay: 0.04,
            weight_decay_end: 0.4,
            clip_grad: 3.0,
            batch_size: 64,
            epochs: 100,
            freeze_last_layer: 1,
            lr: 0.0005,
            warmup_epochs: 10,
            min_lr: 1e-6,
            optimizer: OptimizerKind::Adamw,
            matmul_precision: MatmulPrecision::Highest,
            student_passes: StudentPasses::Auto,
            device: crate::device::DeviceSpec::Cpu,
            kernels: dino_models::KernelPath::Auto,
            global_crops_scale: [0.4, 1.0],
            local_crops_number: 8,
            local_crops_scale: [0.05, 0.4],
            global_crops_size: 224,
            local_crops_size: 96,
            blur_sigma: [0.1, 2.0],
            crops_ratio: [3.0 / 4.0, 4.0 / 3.0],
            color_jitter_p: 0.8,
            blur_p: [1.0, 0.1, 0.5],
            solarize_p: 0.2,
            norm_mean: [0.485, 0.456, 0.406],
            norm_std: [0.229, 0.224, 0.225],
            data_path: PathBuf::from("/path/to/imagenet/train/"),
            dataset: DatasetKind::Folder,
            max_train_images: 0,
            val_data_path: None,
            output_dir: PathBuf::from("."),
            saveckp_freq: 20,
            ckpt_every_iters: 0,
            seed: 0,
            num_workers: 10,
            prefetch_batches: 2,
            log_every: 10,
            eval_every: 0,
            eval_final: false,
            knn_k: 20,
            knn_temperature: 0.07,
            eval_resize: 256,
            eval_crop: 224,
            eval_max_train: 0,
            eval_max_val: 0,
            eval_batch_size: 128,
        }
    }
}

/// Keys that may change between a checkpoint and its resumption without changing the result.
pub const RESUME_IGNORED_KEYS: &[&str] = &[
    "device",
    "kernels",
    "student_passes",
    "data_path",
    "val_data_path",
    "output_dir",
    "saveckp_freq",
    "ckpt_every_iters",
    "num_workers",
    "prefetch_batches",
    "log_every",
    "eval_every",
    "eval_final",
    "knn_k",
    "knn_temperature",
    "eval_resize",
    "eval_crop",
    "eval_max_train",
    "eval_max_val",
    "eval_batch_size",
];

/// The names [`TrainConfig::preset`] accepts.
pub const PRESETS: &[&str] = &["official", "default", "small", "fmnist-small", "cifar"];

impl TrainConfig {
    /// The official `main_dino.py` defaults (same as `Default`).
    pub fn official() -> Self {
        Self::default()
    }

    /// A named preset: `official` (main_dino.py defaults), `default` (the no-argument run: a small ViT on the
    /// embedded Fashion-MNIST subset, tuned to learn in a few minutes on 2 CPU cores), `fmnist-small` (the
    /// learning reference of `baseline.md`, official recipe on 28 px Fashion-MNIST), `cifar` (patch-4 ViT-Tiny
    /// on 32 px CIFAR with 2x32 + 6x16 crops).
    pub fn preset(name: &str) -> Result<Self> {
        match name {
            "official" | "imagenet" => Ok(Self::official()),
            "default" => Ok(Self::default_preset()),
            "small" => Ok(Self::small_data()),
            "fmnist-small" => Ok(Self::fmnist_small()),
            "cifar" => Ok(Self::cifar()),
            _ => Err(Error::config(
                "preset",
                name,
                format!("expected one of {}", PRESETS.join(", ")),
            )),
        }
    }

    /// The no-argument preset: a small ViT on the embedded Fashion-MNIST subset (28 px), sized for 2 CPU cores
    /// (2.5-4.5 minutes depending on the CPU and its load; README has the latest figure), with the final k-NN
    /// evaluation against the same network at initialisation and the raw pixels. Chosen by the search of
    /// docs/RECIPES.md on hold-out splits of Fashion-MNIST's training set.
    pub fn default_preset() -> Self {
        Self {
            arch: "vit_custom".into(),
            patch_size: 7,
            img_size: 28,
            vit_embed_dim: 96,
            vit_depth: 4,
            vit_num_heads: 3,
            // Shifted patch tokenization: +1.0 point on average over two hold-out splits x two seeds (+0.5,
            // +1.7, -0.4, +2.1) for ~15% more time per step, see docs/RECIPES.md.
            vit_shifted_patches: true,
            // PyTorch's nn.Linear init for the block linears instead of the official trunc-normal 0.02:
            // +2.2 points on average over two hold-out splits x two seeds (+1.4, +2.2, +3.3, +1.7), at no cost,
            // see docs/RECIPES.md.
            vit_linear_init: VitLinearInit::DefaultUniform,
            out_dim: 1024,
            norm_last_layer: true,
            // BatchNorm in the head is what makes this small run learn (69.1% vs 63.8% k-NN in the search of
            // the previous preset).
            use_bn_in_head: true,
            head_hidden_dim: 512,
            head_bottleneck_dim: 128,
            drop_path_rate: 0.0,
            momentum_teacher: 0.99,
            // Sharper teacher targets than the official 0.04 (Sinkhorn-Knopp keeps them balanced over the
            // prototypes): 0.04 / 0.03 / 0.025 / 0.02 end at 78.9 / 79.8 / 80.8 / 80.3% on average over three
            // hold-out splits (seed 0); 0.025 against 0.04 over three splits x two seeds: +1.2 points on
            // average (+0.7, +1.6, +3.3, -0.4, 0.0, +1.9), see docs/RECIPES.md ("Thirtieth session").
            warmup_teacher_temp: 0.025,
            teacher_temp: 0.025,
            warmup_teacher_temp_epochs: 0,
            // DINOv2's KoLeo (+2.4 points at 6 epochs) and Sinkhorn-Knopp targets (on par at 6 epochs, ahead
            // later in the 14-epoch runs), see docs/RECIPES.md.
            centering: Centering::SinkhornKnopp,
            koleo_loss_weight: 0.1,
            weight_decay: 0.04,
            weight_decay_end: 0.1,
            batch_size: 32,
            epochs: 14,
            lr: 0.004,
            warmup_epochs: 2,
            min_lr: 1e-5,
            freeze_last_layer: 1,
            global_crops_scale: [0.25, 1.0],
            local_crops_number: 4,
            local_crops_scale: [0.05, 0.25],
            global_crops_size: 28,
            local_crops_size: 14,
            norm_mean: [0.2860; 3],
            norm_std: [0.3530; 3],
            data_path: PathBuf::from("embedded"),
            dataset: DatasetKind::Embedded,
            output_dir: PathBuf::from("dino-output"),
            saveckp_freq: 0,
            ckpt_every_iters: 20,
            num_workers: 1,
            log_every: 5,
            eval_every: 1,
            eval_final: true,
            eval_resize: 28,
            eval_crop: 28,
            eval_batch_size: 256,
            ..Self::default()
        }
    }

    /// The small-data recipe of the no-argument run for any folder or standard set of small images (the
    /// `small` preset): the default preset's model, optimisation and crops, with `dataset = folder`; the
    /// image sizes and the normalisation are fitted to the data by [`crate::data::fit_to_data`] when the
    /// CLI resolves it.
    pub fn small_data() -> Self {
        Self {
            dataset: DatasetKind::Folder,
            data_path: PathBuf::from("/path/to/images/"),
            ..Self::default_preset()
        }
    }

    /// The "fmnist-small" learning reference of `baseline.md`: the official recipe on 28 px Fashion-MNIST.
    pub fn fmnist_small() -> Self {
        Self {
            arch: "vit_custom".into(),
            patch_size: 4,
            img_size: 28,
            vit_embed_dim: 192,
            vit_depth: 6,
            vit_num_heads: 3,
            out_dim: 4096,
            drop_path_rate: 0.1,
            batch_size: 64,
            epochs: 5,
            lr: 0.0005,
            warmup_epochs: 1,
            min_lr: 1e-6,
            warmup_teacher_temp: 0.04,
            teacher_temp: 0.07,
            warmup_teacher_temp_epochs: 2,
            local_crops_number: 6,
            global_crops_size: 28,
            local_crops_size: 16,
            norm_mean: [0.2860; 3],
            norm_std: [0.3530; 3],
            dataset: DatasetKind::FashionMnist,
            data_path: PathBuf::from("../shared/data/fashion-mnist"),
            saveckp_freq: 1,
            eval_final: true,
            eval_resize: 28,
            eval_crop: 28,
            num_workers: 2,
            ..Self::default()
        }
    }

    /// Patch-4 ViT-Tiny on 32 px CIFAR-10 with 2 x 32 + 6 x 16 crops (the baseline's "cifar" step config).
    pub fn cifar() -> Self {
        Self {
            arch: "vit_tiny".into(),
            patch_size: 4,
            img_size: 32,
            out_dim: 4096,
            batch_size: 64,
            local_crops_number: 6,
            global_crops_size: 32,
            local_crops_size: 16,
            norm_mean: [0.4914, 0.4822, 0.4465],
            norm_std: [0.2470, 0.2435, 0.2616],
            dataset: DatasetKind::Cifar10,
            data_path: PathBuf::from("data/cifar10"),
            eval_resize: 32,
            eval_crop: 32,
            ..Self::default()
        }
    }

    /// Parse a TOML document; keys not given keep their default (official) values.
    pub fn from_toml_str(s: &str) -> std::result::Result<Self, String> {
        // toml's Display draws the offending line and a caret over several lines: keep the position and the
        // message, on one line.
        toml::from_str(s).map_err(|e: toml::de::Error| {
            let at = e
                .span()
                .and_then(|r| s.get(..r.start))
                .map(|before| {
                    let line = before.matches('\n').count() + 1;
                    let col = before.len() - before.rfind('\n').map_or(0, |i| i + 1) + 1;
                    format!("line {line}, column {col}: ")
                })
                .unwrap_or_default();
            let message = e.message().split_whitespace().collect::<Vec<_>>().join(" ");
            format!("{at}{}", unknown_key_hint(&message).unwrap_or(message))
        })
    }

    /// Load a TOML file (see [`TrainConfig::from_toml_str`]).
    pub fn from_toml_file(path: &Path) -> Result<Self> {
        let s = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
        Self::from_toml_str(&s).map_err(|message| Error::ConfigParse {
            path: path.to_path_buf(),
            message,
        })
    }

    /// The configuration as a TOML document (every key).
    pub fn to_toml_string(&self) -> String {
        toml::to_string(self).unwrap_or_else(|e| format!("# cannot serialise configuration: {e}"))
    }

    /// The parsed architecture.
    pub fn arch_kind(&self) -> Result<Arch> {
        self.arch.parse()
    }

    /// The student-pass modes smaller than this run's (resolved) that its model allows, largest first: none
    /// with the head's BatchNorm (one pass only), per resolution at most for a ResNet (per crop would change
    /// its BatchNorm statistics); what the memory note and warning offer.
    pub fn smaller_student_passes(&self) -> &'static [StudentPasses] {
        let vit = self.arch_kind().map(|a| a.is_vit()).unwrap_or(false);
        match self.student_passes.resolve(self.use_bn_in_head) {
            _ if self.use_bn_in_head => &[],
            StudentPasses::All if vit => &[StudentPasses::Resolution, StudentPasses::Crop],
            StudentPasses::All => &[StudentPasses::Resolution],
            StudentPasses::Resolution if vit => &[StudentPasses::Crop],
            _ => &[],
        }
    }

    /// Number of crops per image: 2 global + `local_crops_number`.
    pub fn ncrops(&self) -> usize {
        2 + self.local_crops_number
    }

    /// The linearly scaled peak learning rate `lr * batch_size / 256`.
    pub fn scaled_lr(&self) -> f64 {
        self.lr * self.batch_size as f64 / 256.0
    }

    /// Check every value; the error names the first bad key.
    pub fn validate(&self) -> Result<()> {
        let arch = self.arch_kind()?;
        let pos = |k: &str, v: usize| {
            if v == 0 {
                Err(Error::config(k, v, "must be positive"))
            } else {
                Ok(())
            }
        };
        pos("batch_size", self.batch_size)?;
        pos("epochs", self.epochs)?;
        pos("out_dim", self.out_dim)?;
        pos("global_crops_size", self.global_crops_size)?;
        pos("head_hidden_dim", self.head_hidden_dim)?;
        pos("head_bottleneck_dim", self.head_bottleneck_dim)?;
        pos("head_nlayers", self.head_nlayers)?;
        pos("resnet_width", self.resnet_width)?;
        pos("eval_batch_size", self.eval_batch_size)?;
        if self.local_crops_number > 0 {
            pos("local_crops_size", self.local_crops_size)?;
        }
        if arch.is_vit() {
            pos("patch_size", self.patch_size)?;
            pos("img_size", self.img_size)?;
            if !self.img_size.is_multiple_of(self.patch_size) {
                return Err(Error::config(
                    "img_size",
                    self.img_size,
                    format!("must be a multiple of patch_size = {}", self.patch_size),
                ));
            }
            // A crop smaller than one patch has no patch token: refuse it here, naming the key, rather than
            // at the first forward pass.
            let mut crops = vec![("global_crops_size", self.global_crops_size)];
            if self.local_crops_number > 0 {
                crops.push(("local_crops_size", self.local_crops_size));
            }
            for (k, v) in crops {
                if v < self.patch_size {
                    return Err(Error::config(
                        k,
                        v,
                        format!(
                            "must be at least patch_size = {} (a ViT crop needs one patch)",
                            self.patch_size
                        ),
                    ));
                }
            }
            if arch == Arch::VitCustom {
                pos("vit_embed_dim", self.vit_embed_dim)?;
                pos("vit_depth", self.vit_depth)?;
                pos("vit_num_heads", self.vit_num_heads)?;
                if !self.vit_embed_dim.is_multiple_of(self.vit_num_heads) {
                    return Err(Error::config(
                        "vit_embed_dim",
                        self.vit_embed_dim,
                        format!(
                            "must be a multiple of vit_num_heads = {}",
                            self.vit_num_heads
                        ),
                    ));
                }
            }
        }
        let finite_nonneg = |k: &str, v: f64| {
            if !v.is_finite() || v < 0.0 {
                Err(Error::config(k, v, "must be a finite number >= 0"))
            } else {
                Ok(())
            }
        };
        finite_nonneg("lr", self.lr)?;
        finite_nonneg("min_lr", self.min_lr)?;
        finite_nonneg("weight_decay", self.weight_decay)?;
        finite_nonneg("weight_decay_end", self.weight_decay_end)?;
        finite_nonneg("clip_grad", self.clip_grad)?;
        finite_nonneg("knn_temperature", self.knn_temperature)?;
        finite_nonneg("koleo_loss_weight", self.koleo_loss_weight)?;
        finite_nonneg("ibot_loss_weight", self.ibot_loss_weight)?;
        if self.student_passes == StudentPasses::Crop && !arch.is_vit() {
            return Err(Error::config(
                "student_passes",
                "crop",
                format!(
                    "{}'s BatchNorm would take its statistics from one crop instead of the crop's resolution \
                     group; use resolution (the same statistics as one pass)",
                    self.arch
                ),
            ));
        }
        if matches!(
            self.student_passes,
            StudentPasses::Resolution | StudentPasses::Crop
        ) && self.use_bn_in_head
        {
            return Err(Error::config(
                "student_passes",
                self.student_passes,
                "use_bn_in_head = true: the head's BatchNorm takes its statistics over every crop at once, \
                 which only one pass (all) gives",
            ));
        }
        if self.ibot_loss_weight > 0.0 && !arch.is_vit() {
            return Err(Error::config(
                "ibot_loss_weight",
                self.ibot_loss_weight,
                format!("iBOT masks patch tokens: it needs a ViT, not {}", self.arch),
            ));
        }
        let r = self.ibot_mask_ratio_min_max;
        if !(r[0] >= 0.0 && r[0] <= r[1] && r[1] <= 1.0) {
            return Err(Error::config(
                "ibot_mask_ratio_min_max",
                format!("{r:?}"),
                "expected 0 <= min <= max <= 1",
            ));
        }
        if !(0.0..=1.0).contains(&self.ibot_mask_sample_probability) {
            return Err(Error::config(
                "ibot_mask_sample_probability",
                self.ibot_mask_sample_probability,
                "must lie in [0, 1]",
            ));
        }
        finite_nonneg("vit_layer_scale_init", self.vit_layer_scale_init)?;
        for (k, v) in [
            ("teacher_temp", self.teacher_temp),
            ("warmup_teacher_temp", self.warmup_teacher_temp),
            ("student_temp", self.student_temp),
        ] {
            if !v.is_finite() || v <= 0.0 {
                return Err(Error::config(k, v, "must be a finite number > 0"));
            }
        }
        for (k, v) in [
            ("momentum_teacher", self.momentum_teacher),
            ("center_momentum", self.center_momentum),
            ("color_jitter_p", self.color_jitter_p),
            ("solarize_p", self.solarize_p),
            ("blur_p", self.blur_p[0]),
            ("blur_p", self.blur_p[1]),
            ("blur_p", self.blur_p[2]),
        ] {
            if !(0.0..=1.0).contains(&v) {
                return Err(Error::config(k, v, "must lie in [0, 1]"));
            }
        }
        if !(0.0..1.0).contains(&self.drop_path_rate) {
            return Err(Error::config(
                "drop_path_rate",
                self.drop_path_rate,
                "must lie in [0, 1)",
            ));
        }
        for (k, s) in [
            ("global_crops_scale", self.global_crops_scale),
            ("local_crops_scale", self.local_crops_scale),
        ] {
            if !(s[0] > 0.0 && s[0] <= s[1] && s[1] <= 1.0) {
                return Err(Error::config(
                    k,
                    format!("{s:?}"),
                    "expected 0 < min <= max <= 1",
                ));
            }
        }
        for (k, r) in [
            ("blur_sigma", self.blur_sigma),
            ("crops_ratio", self.crops_ratio),
        ] {
            if !(r[0] > 0.0 && r[0] <= r[1] && r[1].is_finite()) {
                return Err(Error::config(
                    k,
                    format!("{r:?}"),
                    "expected 0 < min <= max",
                ));
            }
        }
        if self.norm_std.iter().any(|s| s.is_nan() || *s <= 0.0) {
            return Err(Error::config(
                "norm_std",
                format!("{:?}", self.norm_std),
                "must be > 0",
            ));
        }
        if self.warmup_epochs > self.epochs {
            return Err(Error::config(
                "warmup_epochs",
                self.warmup_epochs,
                format!("must not exceed epochs = {}", self.epochs),
            ));
        }
        if self.warmup_teacher_temp_epochs > self.epochs {
            return Err(Error::config(
                "warmup_teacher_temp_epochs",
                self.warmup_teacher_temp_epochs,
                format!("must not exceed epochs = {}", self.epochs),
            ));
        }
        if self.knn_k == 0 {
            return Err(Error::config("knn_k", 0, "must be positive"));
        }
        Ok(())
    }

    /// Shorten the schedule lengths that exceed the run (`warmup_epochs`, `warmup_teacher_temp_epochs` >
    /// `epochs`, which [`TrainConfig::validate`] refuses) to `epochs`, returning one warning line per key
    /// changed, naming the key and the value used. A short first try (`--epochs 1`) then runs as asked.
    pub fn clamp_to_epochs(&mut self) -> Vec<String> {
        let epochs = self.epochs;
        let mut warnings = Vec::new();
        if epochs == 0 {
            // `validate` refuses the run; a clamp to zero epochs would only add a misleading warning first.
            return warnings;
        }
        for (key, v) in [
            ("warmup_epochs", &mut self.warmup_epochs),
            (
                "warmup_teacher_temp_epochs",
                &mut self.warmup_teacher_temp_epochs,
            ),
        ] {
            if *v > epochs {
                warnings.push(format!(
                    "warning: {key} = {v} exceeds epochs = {epochs}: using {key} = {epochs}"
                ));
                *v = epochs;
            }
        }
        warnings
    }

    /// Whether `other` (requested) only lengthens the run of `self` (the checkpoint's): `Ok(true)` if `epochs`
    /// grows and nothing else that changes the result differs, apart from a warm-up that was clamped to the
    /// old length (see [`TrainConfig::clamp_to_epochs`]) and grows with it; `Ok(false)` if both are the same
    /// run; an [`Error::ConfigMismatch`]-style list of the refused keys otherwise.
    pub fn extension_of(&self, other: &TrainConfig) -> std::result::Result<bool, Vec<String>> {
        if other.epochs < self.epochs {
            return Err(vec![format!(
                "epochs: {} -> {} (a run can be extended, not shortened)",
                self.epochs, other.epochs
            )]);
        }
        let mut refused = Vec::new();
        for d in self.diff_for_resume(other) {
            let key = d.split(':').next().unwrap_or("");
            let clamped_warmup = |old: usize, new: usize| old == self.epochs && new > old;
            let allowed = match key {
                "epochs" => true,
                "warmup_epochs" => clamped_warmup(self.warmup_epochs, other.warmup_epochs),
                "warmup_teacher_temp_epochs" => clamped_warmup(
                    self.warmup_teacher_temp_epochs,
                    other.warmup_teacher_temp_epochs,
                ),
                _ => false,
            };
            if !allowed {
                refused.push(d);
            }
        }
        if refused.is_empty() {
            Ok(other.epochs > self.epochs)
        } else {
            Err(refused)
        }
    }

    /// The keys whose values differ between `self` (the checkpoint's) and `other` (the requested one),
    /// ignoring [`RESUME_IGNORED_KEYS`], each as `key: old -> new`.
    pub fn diff_for_resume(&self, other: &TrainConfig) -> Vec<String> {
        let a = serde_json::to_value(self).unwrap_or_default();
        let b = serde_json::to_value(other).unwrap_or_default();
        let (Some(a), Some(b)) = (a.as_object(), b.as_object()) else {
            return vec!["<unserialisable configuration>".into()];
        };
        let mut keys: Vec<&String> = a.keys().chain(b.keys()).collect();
        keys.sort();
        keys.dedup();
        keys.into_iter()
            .filter(|k| !RESUME_IGNORED_KEYS.contains(&k.as_str()))
            .filter_map(|k| {
                let va = a.get(k).cloned().unwrap_or(serde_json::Value::Null);
                let vb = b.get(k).cloned().unwrap_or(serde_json::Value::Null);
                (va != vb).then(|| format!("{k}: {va} -> {vb}"))
            })
            .collect()
    }
}

/// serde's "unknown field `x`, expected one of `a`, `b`, ..." (every key of the configuration on one line)
/// as a short hint: the unknown key and the nearest known one, if one is near (a typo).
fn unknown_key_hint(message: &str) -> Option<String> {
    let rest = message.strip_prefix("unknown field `")?;
    let (key, rest) = rest.split_once('`')?;
    let known: Vec<&str> = rest
        .split('`')
        .skip(1)
        .step_by(2)
        .filter(|k| !k.is_empty())
        .collect();
    let nearest = known
        .iter()
        .map(|k| (edit_distance(key, k), *k))
        .min()
        .filter(|&(d, _)| d <= (key.len() / 3).max(2));
    Some(match nearest {
        Some((_, k)) => format!(
            "unknown key `{key}` (did you mean `{k}`? `dino train --print-config` shows every key)"
        ),
        None => format!("unknown key `{key}` (`dino train --print-config` shows every key)"),
    })
}

/// Levenshtein distance between two keys (insertions, deletions and substitutions of characters).
fn edit_distance(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut prev: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut cur = vec![i + 1; b.len() + 1];
        for (j, &cb) in b.iter().enumerate() {
            cur[j + 1] = (prev[j] + usize::from(ca != cb))
                .min(prev[j + 1] + 1)
                .min(cur[j] + 1);
        }
        prev = cur;
    }
    prev[b.len()]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_unknown_key_is_named_with_the_nearest_known_one() {
        let e = TrainConfig::from_toml_str("epochs = 3\nteacher_tmp = 0.04\n").unwrap_err();
        assert_eq!(
            e,
            "line 2, column 1: unknown key `teacher_tmp` (did you mean `teacher_temp`? `dino train \
             --print-config` shows every key)"
        );
        let e = TrainConfig::from_toml_str("wibble = 1\n").unwrap_err();
        assert!(
            e.ends_with("unknown key `wibble` (`dino train --print-config` shows every key)"),
            "{e}"
        );
        assert!(!e.contains("expected one of"), "{e}");
        assert_eq!(edit_distance("epochz", "epochs"), 1);
        assert_eq!(edit_distance("lr", "min_lr"), 4);
        assert_eq!(edit_distance("", "abc"), 3);
    }

    #[test]
    fn official_defaults_match_main_dino() {
        let c = TrainConfig::default();
        assert_eq!(c.arch, "vit_small");
        assert_eq!(
            (c.patch_size, c.out_dim, c.batch_size, c.epochs),
            (16, 65536, 64, 100)
        );
        assert_eq!(
            (c.momentum_teacher, c.teacher_temp, c.warmup_teacher_temp),
            (0.996, 0.04, 0.04)
        );
        assert_eq!(c.warmup_teacher_temp_epochs, 0);
        assert_eq!(
            (c.weight_decay, c.weight_decay_end, c.clip_grad),
            (0.04, 0.4, 3.0)
        );
        assert_eq!(
            (c.lr, c.warmup_epochs, c.min_lr, c.freeze_last_layer),
            (0.0005, 10, 1e-6, 1)
        );
        assert_eq!(
            (
                c.drop_path_rate,
                c.local_crops_number,
                c.saveckp_freq,
                c.seed
            ),
            (0.1, 8, 20, 0)
        );
        assert_eq!(
            (c.global_crops_scale, c.local_crops_scale),
            ([0.4, 1.0], [0.05, 0.4])
        );
        assert_eq!(c.num_workers, 10);
        assert!(c.norm_last_layer && !c.use_bn_in_head);
        assert_eq!(c.optimizer, OptimizerKind::Adamw);
        c.validate().unwrap();
    }

    #[test]
    fn toml_overrides_only_given_keys_and_round_trips() {
        let c = TrainConfig::from_toml_str(
            "arch = \"vit_tiny\"\nlr = 0.001\nglobal_crops_scale = [0.14, 1.0]\n",
        )
        .unwrap();
        assert_eq!(c.arch, "vit_tiny");
        assert_eq!(c.lr, 0.001);
        assert_eq!(c.global_crops_scale, [0.14, 1.0]);
        assert_eq!(c.out_dim, 65536);
        let back = TrainConfig::from_toml_str(&c.to_toml_string()).unwrap();
        assert_eq!(back, c);
        let err = TrainConfig::from_toml_str("learning_rate = 1.0").unwrap_err();
        assert!(err.contains("learning_rate"), "{err}");
    }

    #[test]
    fn schedules_longer_than_the_run_are_clamped_with_a_warning() {
        let mut c = TrainConfig {
            epochs: 1,
            warmup_epochs: 10,
            warmup_teacher_temp_epochs: 30,
            ..TrainConfig::official()
        };
        assert!(c.validate().is_err());
        let w = c.clamp_to_epochs();
        assert_eq!(w.len(), 2, "{w:?}");
        assert!(w[0].contains("warmup_epochs = 10") && w[0].contains("using warmup_epochs = 1"));
        assert!(w[1].contains("warmup_teacher_temp_epochs = 30"));
        assert_eq!((c.warmup_epochs, c.warmup_teacher_temp_epochs), (1, 1));
        c.validate().unwrap();
        assert!(c.clamp_to_epochs().is_empty());
    }

    #[test]
    fn vit_crops_smaller_than_a_patch_are_refused_naming_the_key() {
        let base = TrainConfig {
            arch: "vit_tiny".into(),
            patch_size: 16,
            global_crops_size: 32,
            local_crops_size: 16,
            ..TrainConfig::official()
        };
        base.validate().unwrap();
        for (c, key) in [
            (
                TrainConfig {
                    global_crops_size: 15,
                    ..base.clone()
                },
                "global_crops_size = 15",
            ),
            (
                TrainConfig {
                    local_crops_size: 8,
                    ..base.clone()
                },
                "local_crops_size = 8",
            ),
        ] {
            let err = c.validate().unwrap_err().to_string();
            assert!(
                err.contains(key) && err.contains("patch_size = 16"),
                "{err}"
            );
        }
        // Without local crops their size is unused; a ResNet takes any crop size.
        TrainConfig {
            local_crops_number: 0,
            local_crops_size: 8,
            ..base.clone()
        }
        .validate()
        .unwrap();
        TrainConfig {
            arch: "resnet18".into(),
            global_crops_size: 8,
            local_crops_size: 4,
            ..base
        }
        .validate()
        .unwrap();
    }

    #[test]
    fn no_clamp_warning_for_zero_epochs() {
        let mut c = TrainConfig {
            epochs: 0,
            ..TrainConfig::official()
        };
        assert!(c.clamp_to_epochs().is_empty());
        assert!(c.validate().unwrap_err().to_string().contains("epochs = 0"));
    }

    #[test]
    fn crops_ratio_is_validated_and_defaults_to_torchvisions() {
        assert_eq!(TrainConfig::official().crops_ratio, [0.75, 4.0 / 3.0]);
        for bad in [
            [0.0, 1.0],
            [1.5, 1.0],
            [1.0, f64::INFINITY],
            [f64::NAN, 1.0],
        ] {
            let c = TrainConfig {
                crops_ratio: bad,
                ..TrainConfig::official()
            };
            let err = c.validate().unwrap_err().to_string();
            assert!(err.contains("crops_ratio"), "{err}");
        }
        let c = TrainConfig::from_toml_str("crops_ratio = [1.0, 1.0]\n").unwrap();
        assert_eq!(c.crops_ratio, [1.0, 1.0]);
        c.validate().unwrap();
    }

    #[test]
    fn augmentation_probabilities_are_validated_and_default_to_the_official_ones() {
        let o = TrainConfig::official();
        assert_eq!(
            (o.color_jitter_p, o.blur_p, o.solarize_p),
            (0.8, [1.0, 0.1, 0.5], 0.2)
        );
        for (c, key) in [
            (
                TrainConfig {
                    color_jitter_p: -0.1,
                    ..TrainConfig::official()
                },
                "color_jitter_p",
            ),
            (
                TrainConfig {
                    solarize_p: f64::NAN,
                    ..TrainConfig::official()
                },
                "solarize_p",
            ),
            (
                TrainConfig {
                    blur_p: [1.0, 0.1, 2.0],
                    ..TrainConfig::official()
                },
                "blur_p",
            ),
        ] {
            let err = c.validate().unwrap_err().to_string();
            assert!(err.contains(key), "{err}");
        }
        let c = TrainConfig::from_toml_str(
            "color_jitter_p = 0.0\nblur_p = [0.5, 0.5, 0.0]\nsolarize_p = 0.0\n",
        )
        .unwrap();
        assert_eq!(
            (c.color_jitter_p, c.blur_p, c.solarize_p),
            (0.0, [0.5, 0.5, 0.0], 0.0)
        );
        c.validate().unwrap();
    }

    #[test]
    fn every_preset_validates() {
        for p in PRESETS {
            TrainConfig::preset(p).unwrap().validate().unwrap();
        }
        assert!(TrainConfig::preset("nope").is_err());
    }

    #[test]
    fn validation_names_the_key() {
        let c = TrainConfig {
            arch: "vit_huge".into(),
            ..Default::default()
        };
        assert!(c.validate().unwrap_err().to_string().contains("arch"));
        let c = TrainConfig {
            batch_size: 0,
            ..Default::default()
        };
        assert!(c.validate().unwrap_err().to_string().contains("batch_size"));
        let c = TrainConfig {
            local_crops_scale: [0.5, 0.4],
            ..Default::default()
        };
        assert!(c
            .validate()
            .unwrap_err()
            .to_string()
            .contains("local_crops_scale"));
        for (c, key) in [
            (
                TrainConfig {
                    arch: "resnet18".into(),
                    ibot_loss_weight: 1.0,
                    ..Default::default()
                },
                "needs a ViT",
            ),
            (
                TrainConfig {
                    ibot_loss_weight: f64::NAN,
                    ..Default::default()
                },
                "ibot_loss_weight",
            ),
            (
                TrainConfig {
                    ibot_mask_ratio_min_max: [0.5, 0.1],
                    ..Default::default()
                },
                "ibot_mask_ratio_min_max",
            ),
            (
                TrainConfig {
                    ibot_mask_sample_probability: 1.5,
                    ..Default::default()
                },
                "ibot_mask_sample_probability",
            ),
        ] {
            let e = c.validate().unwrap_err().to_string();
            assert!(e.contains(key), "{e}");
        }
    }

    #[test]
    fn resume_diff_names_keys_and_ignores_cosmetic_ones() {
        let a = TrainConfig::default();
        let b = TrainConfig {
            lr: 0.001,
            epochs: 7,
            output_dir: "elsewhere".into(),
            log_every: 3,
            ..a.clone()
        };
        let d = a.diff_for_resume(&b);
        assert_eq!(d.len(), 2, "{d:?}");
        assert!(d[0].starts_with("epochs: 100 -> 7"), "{d:?}");
        assert!(d[1].starts_with("lr: 0.0005 -> 0.001"), "{d:?}");
    }
}
