//! The flags of `dino train`: the official `main_dino.py` arguments in kebab-case, each optional, applied on top of
//! a base configuration (a `--config` TOML file, a `--preset`, or the defaults) so that flags override the file.

use clap::{ArgAction, Args};
use dino_train::{
    Arch, Centering, DatasetKind, MatmulPrecision, OptimizerKind, StudentPasses, TrainConfig,
    VitLinearInit,
};
use std::path::PathBuf;

fn parse_arch(s: &str) -> Result<String, String> {
    s.parse::<Arch>()
        .map(|_| s.to_string())
        .map_err(|e| e.to_string())
}

fn parse_optimizer(s: &str) -> Result<OptimizerKind, String> {
    s.parse::<OptimizerKind>().map_err(|e| e.to_string())
}

fn parse_precision(s: &str) -> Result<MatmulPrecision, String> {
    s.parse::<MatmulPrecision>()
}

fn parse_kernels(s: &str) -> Result<dino_train::KernelPath, String> {
    s.parse()
}

fn parse_student_passes(s: &str) -> Result<StudentPasses, String> {
    s.parse::<StudentPasses>().map_err(|e| e.to_string())
}

fn parse_centering(s: &str) -> Result<Centering, String> {
    s.parse::<Centering>().map_err(|e| e.to_string())
}

fn parse_linear_init(s: &str) -> Result<VitLinearInit, String> {
    s.parse::<VitLinearInit>().map_err(|e| e.to_string())
}

fn parse_dataset(s: &str) -> Result<DatasetKind, String> {
    s.parse::<DatasetKind>().map_err(|e| e.to_string())
}

/// Booleans as the official `utils.bool_flag`: on/off, true/false, 1/0, yes/no.
fn parse_bool(s: &str) -> Result<bool, String> {
    match s.to_ascii_lowercase().as_str() {
        "on" | "true" | "1" | "yes" => Ok(true),
        "off" | "false" | "0" | "no" => Ok(false),
        _ => Err(format!(
            "expected true or false (or on/off, 1/0, yes/no), got `{s}`"
        )),
    }
}

/// `dino train` flags. Every value is optional; those given override the base configuration.
#[derive(Args, Debug, Default, Clone)]
pub struct TrainArgs {
    /// TOML configuration file (keys as in TrainConfig / main_dino.py); the flags below override it.
    #[arg(long, value_name = "FILE.toml")]
    pub config: Option<PathBuf>,
    /// Start from a named preset: official, default (the no-argument run), small (the same recipe fitted to
    /// any set of small images: sizes and normalisation measured on the data), fmnist-small, cifar.
    #[arg(long)]
    pub preset: Option<String>,
    /// Print the resolved configuration as TOML and exit without training.
    #[arg(long)]
    pub print_config: bool,

    // ----- model -----
    /// Backbone: vit_tiny, vit_small, vit_base, vit_custom (sized by --vit-*), resnet18, resnet50. [vit_small]
    #[arg(long, value_parser = parse_arch)]
    pub arch: Option<String>,
    /// ViT patch size in pixels. [16]
    #[arg(long)]
    pub patch_size: Option<usize>,
    /// ViT positional-embedding grid size in pixels. [224]
    #[arg(long)]
    pub img_size: Option<usize>,
    /// vit_custom: embedding dimension. [192]
    #[arg(long)]
    pub vit_embed_dim: Option<usize>,
    /// vit_custom: number of blocks. [12]
    #[arg(long)]
    pub vit_depth: Option<usize>,
    /// vit_custom: number of attention heads. [3]
    #[arg(long)]
    pub vit_num_heads: Option<usize>,
    /// ResNet: CIFAR stem (3x3 conv, no max-pool) for 32 px images. [false]
    #[arg(long, value_parser = parse_bool, action = ArgAction::Set)]
    pub resnet_cifar_stem: Option<bool>,
    /// ViT: the image feature is the mean of the patch tokens instead of the CLS token. [false]
    #[arg(long, value_parser = parse_bool, action = ArgAction::Set)]
    pub vit_pool_avg: Option<bool>,
    /// ViT: DINOv2 register tokens after the CLS token (dinov2 *_reg models: 4). [0]
    #[arg(long)]
    pub vit_num_register_tokens: Option<usize>,
    /// ViT: DINOv2 LayerScale initial value (dinov2 training: 1e-5); 0 disables. [0]
    #[arg(long)]
    pub vit_layer_scale_init: Option<f64>,
    /// ViT: shifted patch tokenization (each patch also sees the image moved by half a patch diagonally). [false]
    #[arg(long, value_parser = parse_bool, action = ArgAction::Set)]
    pub vit_shifted_patches: Option<bool>,
    /// ViT block linears' init: trunc_normal (official, std 0.02) or default_uniform (PyTorch's nn.Linear,
    /// U(±1/sqrt(fan_in))). [trunc_normal]
    #[arg(long, value_parser = parse_linear_init)]
    pub vit_linear_init: Option<VitLinearInit>,
    /// ResNet: channels of the stem and first stage (then 2x, 4x, 8x). [64]
    #[arg(long)]
    pub resnet_width: Option<usize>,
    /// Dimensionality K of the DINO head output. [65536]
    #[arg(long)]
    pub out_dim: Option<usize>,
    /// Fix the weight-norm gain of the head's last layer (false is better but can be unstable). [true]
    #[arg(long, value_parser = parse_bool, action = ArgAction::Set)]
    pub norm_last_layer: Option<bool>,
    /// Use BatchNorm in the projection head. [false]
    #[arg(long, value_parser = parse_bool, action = ArgAction::Set)]
    pub use_bn_in_head: Option<bool>,
    /// Stochastic depth rate of the student. [0.1]
    #[arg(long)]
    pub drop_path_rate: Option<f64>,

    // ----- teacher and loss -----
    /// Base EMA momentum of the teacher, cosine-scheduled to 1 (use 0.9995 with batch 256). [0.996]
    #[arg(long)]
    pub momentum_teacher: Option<f64>,
    /// Initial teacher temperature (lower it if the loss does not decrease). [0.04]
    #[arg(long)]
    pub warmup_teacher_temp: Option<f64>,
    /// Final teacher temperature (above 0.07 is unstable). [0.04]
    #[arg(long)]
    pub teacher_temp: Option<f64>,
    /// Epochs of linear teacher-temperature warm-up. [0]
    #[arg(long)]
    pub warmup_teacher_temp_epochs: Option<usize>,
    /// Teacher targets: centering (DINO v1 EMA centre) or sinkhorn_knopp (DINOv2, 3 iterations). [centering]
    #[arg(long, value_parser = parse_centering)]
    pub centering: Option<Centering>,
    /// Weight of DINOv2's KoLeo regulariser on the student's CLS features (dinov2: 0.1); 0 disables. [0]
    #[arg(long)]
    pub koleo_loss_weight: Option<f64>,
    /// Under mpirun, KoLeo's neighbours over the global batch (the same run as one process), or within each rank's batch (false: as dinov2). [true]
    #[arg(long, value_parser = parse_bool, action = ArgAction::Set)]
    pub koleo_global_batch: Option<bool>,
    /// Weight of DINOv2's iBOT masked-patch loss (dinov2: 1.0; ViT only); 0 disables. [0]
    #[arg(long)]
    pub ibot_loss_weight: Option<f64>,
    /// iBOT: range of the fraction of patches masked in a masked crop (two numbers). [0.1 0.5]
    #[arg(long, num_args = 2, value_names = ["MIN", "MAX"])]
    pub ibot_mask_ratio_min_max: Option<Vec<f64>>,
    /// iBOT: fraction of the global crops that get a mask. [0.5]
    #[arg(long)]
    pub ibot_mask_sample_probability: Option<f64>,

    // ----- optimisation -----
    /// Initial weight decay. [0.04]
    #[arg(long)]
    pub weight_decay: Option<f64>,
    /// Final weight decay (cosine schedule). [0.4]
    #[arg(long)]
    pub weight_decay_end: Option<f64>,
    /// Per-parameter gradient-norm clipping; 0 disables. [3.0]
    #[arg(long)]
    pub clip_grad: Option<f64>,
    /// Images per step over all ranks (the global batch; lr is scaled by it). [64]
    #[arg(long, conflicts_with = "batch_size_per_gpu")]
    pub batch_size: Option<usize>,
    /// Images per step on each rank (the official --batch_size_per_gpu): the global batch is this times the
    /// number of ranks.
    #[arg(long)]
    pub batch_size_per_gpu: Option<usize>,
    /// Number of epochs. [100]
    #[arg(long)]
    pub epochs: Option<usize>,
    /// Epochs during which the head's last layer is frozen. [1]
    #[arg(long)]
    pub freeze_last_layer: Option<usize>,
    /// Peak learning rate for a batch of 256, scaled linearly with the batch size. [0.0005]
    #[arg(long)]
    pub lr: Option<f64>,
    /// Epochs of linear learning-rate warm-up. [10]
    #[arg(long)]
    pub warmup_epochs: Option<usize>,
    /// Final learning rate of the cosine schedule. [1e-6]
    #[arg(long)]
    pub min_lr: Option<f64>,
    /// Optimiser: adamw, sgd or lars. [adamw]
    #[arg(long, value_parser = parse_optimizer)]
    pub optimizer: Option<OptimizerKind>,
    /// Products of the training step's linear layers and attention heads (over 128+ keys): highest (f32) or
    /// bf16 (bf16 operands, f32 sums, on AMX tiles or where the CPU's AVX-512 BF16 beats its f32 FMA, e.g.
    /// AMD Zen 4/5; f32 elsewhere, with a warning; DINO_BF16_GEMM=amx|dpbf16|f32 forces one). [highest]
    #[arg(long, value_parser = parse_precision)]
    pub matmul_precision: Option<MatmulPrecision>,
    /// With --matmul-precision bf16, the head's last layer takes bf16 products too, as PyTorch's autocast
    /// does (its logits are divided by the teacher temperature, so its rounding weighs 25x). [false]
    #[arg(long, value_parser = parse_bool, action = ArgAction::Set)]
    pub head_last_layer_bf16: Option<bool>,
    /// Where the run computes: cpu, cuda (GPU 0), cuda:N, or auto (CUDA when this build has it and a GPU
    /// answers, else the CPU). A checkpoint resumes on any device. [cpu]
    #[arg(long, value_parser = crate::source::parse_device)]
    pub device: Option<dino_train::DeviceSpec>,
    /// Op implementations: auto (the CPU kernels on the CPU, the portable candle composition elsewhere) or
    /// portable (the composition everywhere, as on CUDA; slower on the CPU). Also DINO_KERNELS. [auto]
    #[arg(long, value_parser = parse_kernels)]
    pub kernels: Option<dino_train::KernelPath>,
    /// How the student's crops go through the network in a step, each pass's activations freed before the
    /// next: all (one pass, as the official code), resolution (the global crops, then the local crops), crop
    /// (one pass per crop, ViT only) or auto (resolution; all with --use-bn-in-head). Less memory with more
    /// passes, the same gradient. [auto]
    #[arg(long, value_parser = parse_student_passes)]
    pub student_passes: Option<StudentPasses>,

    // ----- multi-crop -----
    /// Scale range of the global crops (two numbers). [0.4 1.0]
    #[arg(long, num_args = 2, value_names = ["MIN", "MAX"])]
    pub global_crops_scale: Option<Vec<f64>>,
    /// Number of local crops; 0 disables multi-crop. [8]
    #[arg(long)]
    pub local_crops_number: Option<usize>,
    /// Scale range of the local crops (two numbers). [0.05 0.4]
    #[arg(long, num_args = 2, value_names = ["MIN", "MAX"])]
    pub local_crops_scale: Option<Vec<f64>>,
    /// Range of the Gaussian blur's sigma in pixels (two numbers; meant for 224 px crops). [0.1 2.0]
    #[arg(long, num_args = 2, value_names = ["MIN", "MAX"])]
    pub blur_sigma: Option<Vec<f64>>,
    /// Aspect-ratio range (width / height) of the crops (two numbers; 1 1: no distortion). [0.75 1.3333]
    #[arg(long, num_args = 2, value_names = ["MIN", "MAX"])]
    pub crops_ratio: Option<Vec<f64>>,
    /// Probability of the colour jitter on each crop (0 disables it). [0.8]
    #[arg(long)]
    pub color_jitter_p: Option<f64>,
    /// Blur probabilities of global crop 1, global crop 2 and each local crop (three numbers). [1.0 0.1 0.5]
    #[arg(long, num_args = 3, value_names = ["GLOBAL1", "GLOBAL2", "LOCAL"])]
    pub blur_p: Option<Vec<f64>>,
    /// Probability of solarising global crop 2 (0 disables it). [0.2]
    #[arg(long)]
    pub solarize_p: Option<f64>,
    /// Side of the global crops in pixels. [224]
    #[arg(long)]
    pub global_crops_size: Option<usize>,
    /// Side of the local crops in pixels. [96]
    #[arg(long)]
    pub local_crops_size: Option<usize>,
    /// Per-channel normalisation mean (three numbers). [ImageNet]
    #[arg(long, num_args = 3, value_names = ["R", "G", "B"])]
    pub norm_mean: Option<Vec<f32>>,
    /// Per-channel normalisation std (three numbers). [ImageNet]
    #[arg(long, num_args = 3, value_names = ["R", "G", "B"])]
    pub norm_std: Option<Vec<f32>>,

    // ----- data and output -----
    /// Training data: an image folder, or the folder of the CIFAR / IDX files.
    #[arg(long)]
    pub data_path: Option<PathBuf>,
    /// What --data-path holds: folder, cifar10, cifar100, fashion-mnist, mnist, embedded. [folder]
    #[arg(long, value_parser = parse_dataset)]
    pub dataset: Option<DatasetKind>,
    /// Labelled validation image folder for k-NN (the CIFAR / IDX kinds use their test files).
    #[arg(long)]
    pub val_data_path: Option<PathBuf>,
    /// Where checkpoints, logs and plots go. [.]
    #[arg(long)]
    pub output_dir: Option<PathBuf>,
    /// Also keep checkpoint{epoch:04} every this many epochs. [20]
    #[arg(long)]
    pub saveckp_freq: Option<usize>,
    /// Random seed. [0]
    #[arg(long)]
    pub seed: Option<u64>,
    /// Data-loading threads. [10]
    #[arg(long)]
    pub num_workers: Option<usize>,
    /// k-NN evaluation on the validation split every this many epochs (0: never). [0]
    #[arg(long)]
    pub eval_every: Option<usize>,
}

macro_rules! set {
    ($cfg:ident, $self:ident, $($f:ident),* $(,)?) => {
        $( if let Some(v) = &$self.$f { $cfg.$f = v.clone(); } )*
    };
}

impl TrainArgs {
    /// Overrides the fields of `cfg` given on the command line.
    pub fn apply(&self, cfg: &mut TrainConfig) {
        set!(
            cfg,
            self,
            arch,
            patch_size,
            img_size,
            vit_embed_dim,
            vit_depth,
            vit_num_heads,
            resnet_cifar_stem,
            vit_pool_avg,
            vit_num_register_tokens,
            vit_shifted_patches,
            vit_linear_init,
            vit_layer_scale_init,
            resnet_width,
            out_dim,
            norm_last_layer,
            use_bn_in_head,
            drop_path_rate,
            momentum_teacher,
            warmup_teacher_temp,
            teacher_temp,
            warmup_teacher_temp_epochs,
            centering,
            koleo_loss_weight,
            koleo_global_batch,
            ibot_loss_weight,
            ibot_mask_sample_probability,
            weight_decay,
            weight_decay_end,
            clip_grad,
            batch_size,
            epochs,
            freeze_last_layer,
            lr,
            warmup_epochs,
            min_lr,
            optimizer,
            matmul_precision,
            head_last_layer_bf16,
            device,
            kernels,
            student_passes,
            local_crops_number,
            color_jitter_p,
            solarize_p,
            global_crops_size,
            local_crops_size,
            data_path,
            dataset,
            output_dir,
            saveckp_freq,
            seed,
            num_workers,
            eval_every,
        );
        if let Some(v) = &self.val_data_path {
            cfg.val_data_path = Some(v.clone());
        }
        if let Some(v) = &self.global_crops_scale {
            cfg.global_crops_scale = [v[0], v[1]];
        }
        if let Some(v) = &self.local_crops_scale {
            cfg.local_crops_scale = [v[0], v[1]];
        }
        if let Some(v) = &self.ibot_mask_ratio_min_max {
            cfg.ibot_mask_ratio_min_max = [v[0], v[1]];
        }
        if let Some(v) = &self.blur_sigma {
            cfg.blur_sigma = [v[0], v[1]];
        }
        if let Some(v) = &self.crops_ratio {
            cfg.crops_ratio = [v[0], v[1]];
        }
        if let Some(v) = &self.blur_p {
            cfg.blur_p = [v[0], v[1], v[2]];
        }
        if let Some(v) = &self.norm_mean {
            cfg.norm_mean = [v[0], v[1], v[2]];
        }
        if let Some(v) = &self.norm_std {
            cfg.norm_std = [v[0], v[1], v[2]];
        }
    }

    /// The configuration to train with: the `--config` file, else the `--preset`, else the official defaults
    /// when a data path is given, else the no-argument `default` preset (embedded Fashion-MNIST); then the
    /// flags on top. Validated.
    pub fn resolve(&self) -> anyhow::Result<TrainConfig> {
        let mut cfg = if let Some(path) = &self.config {
            if self.preset.is_some() {
                anyhow::bail!(
                    "--config and --preset cannot be combined: pick one base configuration"
                );
            }
            TrainConfig::from_toml_file(path)?
        } else if let Some(p) = &self.preset {
            TrainConfig::preset(p)?
        } else if self.data_path.is_some()
            || self.dataset.is_some_and(|d| d != DatasetKind::Embedded)
        {
            TrainConfig::official()
        } else {
            TrainConfig::default_preset()
        };
        self.apply(&mut cfg);
        let main = dino_core::collective::current().rank() == 0;
        if self.config.is_none() && self.preset.as_deref() == Some("small") {
            // Sizes and normalisation follow the data; flags given explicitly still win.
            let st = dino_train::data::fit_to_data(&mut cfg)?;
            if main {
                eprintln!(
                    "small preset fitted to {} images of {}: median side {} px -> crops {} / {} px, patch {}, \
                     mean {:.4?}, std {:.4?}",
                    st.images,
                    cfg.data_path.display(),
                    st.side,
                    cfg.global_crops_size,
                    cfg.local_crops_size,
                    cfg.patch_size,
                    cfg.norm_mean,
                    cfg.norm_std
                );
            }
            self.apply(&mut cfg);
        }
        if let Some(b) = self.batch_size_per_gpu {
            cfg.batch_size = b * dino_core::collective::world_size();
        }
        for w in cfg.clamp_to_epochs() {
            if main {
                eprintln!("{w}");
            }
        }
        cfg.validate()?;
        Ok(cfg)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct T {
        #[command(flatten)]
        a: TrainArgs,
    }

    fn parse(args: &[&str]) -> Result<TrainArgs, clap::Error> {
        let mut v = vec!["t"];
        v.extend_from_slice(args);
        T::try_parse_from(v).map(|t| t.a)
    }

    #[test]
    fn no_flags_give_the_default_preset() {
        let a = parse(&[]).unwrap();
        assert_eq!(a.resolve().unwrap(), TrainConfig::default_preset());
    }

    #[test]
    fn a_data_path_starts_from_the_official_defaults() {
        let a = parse(&["--data-path", "/some/images"]).unwrap();
        let c = a.resolve().unwrap();
        let want = TrainConfig {
            data_path: "/some/images".into(),
            ..TrainConfig::official()
        };
        assert_eq!(c, want);
    }

    #[test]
    fn every_official_flag_reaches_its_field() {
        let a = parse(&[
            "--arch",
            "vit_tiny",
            "--patch-size",
            "8",
            "--out-dim",
            "4096",
            "--norm-last-layer",
            "false",
            "--momentum-teacher",
            "0.9995",
            "--use-bn-in-head",
            "true",
            "--warmup-teacher-temp",
            "0.03",
            "--teacher-temp",
            "0.07",
            "--warmup-teacher-temp-epochs",
            "3",
            "--weight-decay",
            "0.05",
            "--weight-decay-end",
            "0.3",
            "--clip-grad",
            "0.5",
            "--batch-size",
            "32",
            "--epochs",
            "10",
            "--freeze-last-layer",
            "2",
            "--lr",
            "0.001",
            "--warmup-epochs",
            "2",
            "--min-lr",
            "1e-5",
            "--optimizer",
            "sgd",
            "--matmul-precision",
            "bf16",
            "--head-last-layer-bf16",
            "true",
            "--drop-path-rate",
            "0.2",
            "--global-crops-scale",
            "0.14",
            "1.0",
            "--local-crops-number",
            "4",
            "--local-crops-scale",
            "0.1",
            "0.3",
            "--global-crops-size",
            "192",
            "--local-crops-size",
            "64",
            "--data-path",
            "imgs",
            "--dataset",
            "cifar10",
            "--output-dir",
            "out",
            "--saveckp-freq",
            "5",
            "--seed",
            "7",
            "--num-workers",
            "2",
        ])
        .unwrap();
        let c = a.resolve().unwrap();
        assert_eq!(c.arch, "vit_tiny");
        assert_eq!((c.patch_size, c.out_dim), (8, 4096));
        assert!(!c.norm_last_layer && c.use_bn_in_head);
        assert_eq!(c.momentum_teacher, 0.9995);
        assert_eq!(
            (
                c.warmup_teacher_temp,
                c.teacher_temp,
                c.warmup_teacher_temp_epochs
            ),
            (0.03, 0.07, 3)
        );
        assert_eq!(
            (c.weight_decay, c.weight_decay_end, c.clip_grad),
            (0.05, 0.3, 0.5)
        );
        assert_eq!((c.batch_size, c.epochs, c.freeze_last_layer), (32, 10, 2));
        assert_eq!((c.lr, c.warmup_epochs, c.min_lr), (0.001, 2, 1e-5));
        assert_eq!(c.optimizer, OptimizerKind::Sgd);
        assert_eq!(c.matmul_precision, MatmulPrecision::Bf16);
        assert!(c.head_last_layer_bf16);
        assert_eq!(c.drop_path_rate, 0.2);
        assert_eq!(c.global_crops_scale, [0.14, 1.0]);
        assert_eq!((c.local_crops_number, c.local_crops_scale), (4, [0.1, 0.3]));
        assert_eq!((c.global_crops_size, c.local_crops_size), (192, 64));
        assert_eq!(c.data_path, PathBuf::from("imgs"));
        assert_eq!(c.dataset, DatasetKind::Cifar10);
        assert_eq!(c.output_dir, PathBuf::from("out"));
        assert_eq!((c.saveckp_freq, c.seed, c.num_workers), (5, 7, 2));
    }

    #[test]
    fn the_dinov2_and_small_data_flags_reach_their_fields() {
        let c = parse(&[
            "--data-path",
            "imgs",
            "--centering",
            "sinkhorn-knopp",
            "--koleo-loss-weight",
            "0.1",
            "--vit-pool-avg",
            "true",
            "--vit-num-register-tokens",
            "4",
            "--vit-shifted-patches",
            "true",
            "--vit-linear-init",
            "default-uniform",
            "--vit-layer-scale-init",
            "1e-5",
            "--resnet-width",
            "32",
            "--blur-sigma",
            "0.05",
            "0.5",
            "--crops-ratio",
            "1",
            "1",
            "--color-jitter-p",
            "0.5",
            "--blur-p",
            "0.5",
            "0",
            "0.25",
            "--solarize-p",
            "0",
            "--ibot-loss-weight",
            "0.5",
            "--ibot-mask-ratio-min-max",
            "0.2",
            "0.4",
            "--ibot-mask-sample-probability",
            "0.25",
            "--student-passes",
            "crop",
        ])
        .unwrap()
        .resolve()
        .unwrap();
        assert_eq!(c.centering, Centering::SinkhornKnopp);
        assert_eq!(c.student_passes, StudentPasses::Crop);
        assert_eq!(
            (
                c.ibot_loss_weight,
                c.ibot_mask_ratio_min_max,
                c.ibot_mask_sample_probability
            ),
            (0.5, [0.2, 0.4], 0.25)
        );
        assert_eq!(c.koleo_loss_weight, 0.1);
        assert!(c.vit_pool_avg);
        assert!(c.vit_shifted_patches);
        assert_eq!(c.vit_linear_init, VitLinearInit::DefaultUniform);
        assert_eq!(
            (c.vit_num_register_tokens, c.vit_layer_scale_init),
            (4, 1e-5)
        );
        assert_eq!(c.resnet_width, 32);
        assert_eq!(c.blur_sigma, [0.05, 0.5]);
        assert_eq!(c.crops_ratio, [1.0, 1.0]);
        assert_eq!(
            (c.color_jitter_p, c.blur_p, c.solarize_p),
            (0.5, [0.5, 0.0, 0.25], 0.0)
        );
        // The official warm-up of 10 epochs on a 1-epoch run is shortened with a warning, not refused.
        let c = parse(&["--data-path", "imgs", "--epochs", "1"])
            .unwrap()
            .resolve()
            .unwrap();
        assert_eq!((c.epochs, c.warmup_epochs), (1, 1));
        assert!(parse(&["--centering", "median"]).is_err());
        let e = parse(&["--student-passes", "half"])
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("--student-passes") && e.contains("auto, all, resolution or crop"),
            "{e}"
        );
        let e = parse(&["--vit-linear-init", "xavier"])
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("--vit-linear-init") && e.contains("default_uniform"),
            "{e}"
        );
    }

    #[test]
    fn flags_override_the_config_file() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("c.toml");
        std::fs::write(
            &f,
            "arch = \"vit_tiny\"\nlr = 0.002\nepochs = 3\nwarmup_epochs = 1\ndata_path = \"x\"\n",
        )
        .unwrap();
        let a = parse(&["--config", f.to_str().unwrap(), "--lr", "0.004"]).unwrap();
        let c = a.resolve().unwrap();
        assert_eq!((c.arch.as_str(), c.lr, c.epochs), ("vit_tiny", 0.004, 3));
        assert_eq!(
            c.out_dim, 65536,
            "keys absent from the file keep the official default"
        );
    }

    #[test]
    fn bad_values_are_refused_naming_the_flag() {
        let e = parse(&["--arch", "vit_huge"]).unwrap_err().to_string();
        assert!(e.contains("--arch") && e.contains("vit_huge"), "{e}");
        let e = parse(&["--lr", "fast"]).unwrap_err().to_string();
        assert!(e.contains("--lr") && e.contains("fast"), "{e}");
        let e = parse(&["--optimizer", "adam"]).unwrap_err().to_string();
        assert!(e.contains("--optimizer") && e.contains("adam"), "{e}");
        let e = parse(&["--matmul-precision", "fp8"])
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("--matmul-precision") && e.contains("fp8") && e.contains("bf16"),
            "{e}"
        );
        let e = parse(&["--norm-last-layer", "maybe"])
            .unwrap_err()
            .to_string();
        assert!(e.contains("--norm-last-layer"), "{e}");
        // Values that parse but are invalid are refused by the configuration's validation, naming the key.
        let e = parse(&["--batch-size", "0"])
            .unwrap()
            .resolve()
            .unwrap_err()
            .to_string();
        assert!(e.contains("batch_size"), "{e}");
        let e = parse(&["--local-crops-scale", "0.5", "0.2"])
            .unwrap()
            .resolve()
            .unwrap_err()
            .to_string();
        assert!(e.contains("local_crops_scale"), "{e}");
    }
}
