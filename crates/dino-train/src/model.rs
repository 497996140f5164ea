//! Building the student and teacher networks from a [`TrainConfig`]: backbone (ViT preset, custom ViT or
//! ResNet) + DINO head in a multi-crop wrapper, each on its own `VarMap` with the official parameter paths
//! (`backbone.*`, `head.*`), initialised from the seed.

use candle_core::{DType, Device, Tensor};
use candle_nn::{VarBuilder, VarMap};
use dino_core::NamedVar;
use dino_models::head::{DinoHead, DinoHeadConfig};
use dino_models::init::seeded_var_builder;
use dino_models::multicrop::MultiCropWrapper;
use dino_models::params::{ema_vars, sorted_vars, trainable_vars, ModelSpec};
use dino_models::resnet::{ResNet, ResNetConfig};
use dino_models::vit::{ViTConfig, VisionTransformer};
use dino_models::Backbone;

use crate::config::{Arch, TrainConfig};
use crate::error::{Error, Result};

/// The ViT configuration `cfg` asks for (None for a ResNet), with the given drop-path rate.
pub fn vit_config(cfg: &TrainConfig, drop_path_rate: f64) -> Result<Option<ViTConfig>> {
    let arch = cfg.arch_kind()?;
    let base = match arch {
        Arch::VitTiny => ViTConfig::vit_tiny(cfg.patch_size),
        Arch::VitSmall => ViTConfig::vit_small(cfg.patch_size),
        Arch::VitBase => ViTConfig::vit_base(cfg.patch_size),
        Arch::VitCustom => ViTConfig::custom(
            cfg.img_size,
            cfg.patch_size,
            cfg.vit_embed_dim,
            cfg.vit_depth,
            cfg.vit_num_heads,
        ),
        Arch::Resnet18 | Arch::Resnet50 => return Ok(None),
    };
    Ok(Some(
        ViTConfig {
            img_size: cfg.img_size,
            num_register_tokens: cfg.vit_num_register_tokens,
            shifted_patches: cfg.vit_shifted_patches,
            linear_init: cfg.vit_linear_init.to_model(),
            mask_token: cfg.ibot_loss_weight > 0.0,
            layer_scale_init: (cfg.vit_layer_scale_init > 0.0).then_some(cfg.vit_layer_scale_init),
            pool: if cfg.vit_pool_avg {
                dino_models::vit::Pool::Avg
            } else {
                dino_models::vit::Pool::Cls
            },
            ..base
        }
        .with_drop_path(drop_path_rate),
    ))
}

/// The ResNet configuration `cfg` asks for (None for a ViT).
pub fn resnet_config(cfg: &TrainConfig) -> Result<Option<ResNetConfig>> {
    let r = match cfg.arch_kind()? {
        Arch::Resnet18 => ResNetConfig::resnet18(),
        Arch::Resnet50 => ResNetConfig::resnet50(),
        _ => return Ok(None),
    };
    let r = r.with_width(cfg.resnet_width);
    Ok(Some(if cfg.resnet_cifar_stem { r.cifar() } else { r }))
}

/// Build the backbone of `cfg` on `vb` (pass `vb.pp("backbone")` for the official names).
pub fn build_backbone(
    cfg: &TrainConfig,
    vb: VarBuilder,
    drop_path_rate: f64,
) -> Result<Box<dyn Backbone>> {
    if let Some(v) = vit_config(cfg, drop_path_rate)? {
        return Ok(Box::new(VisionTransformer::new(v, vb)?));
    }
    match resnet_config(cfg)? {
        Some(r) => Ok(Box::new(ResNet::new(r, vb)?)),
        None => Err(Error::config(
            "arch",
            &cfg.arch,
            "no backbone for this architecture",
        )),
    }
}

/// The head configuration of `cfg` for a backbone of dimension `in_dim`.
pub fn head_config(cfg: &TrainConfig, in_dim: usize) -> DinoHeadConfig {
    DinoHeadConfig {
        in_dim,
        out_dim: cfg.out_dim,
        use_bn: cfg.use_bn_in_head,
        norm_last_layer: cfg.norm_last_layer,
        nlayers: cfg.head_nlayers,
        hidden_dim: cfg.head_hidden_dim,
        bottleneck_dim: cfg.head_bottleneck_dim,
        last_layer_bf16: cfg.head_last_layer_bf16,
    }
}

/// A student or teacher: its variables and the multi-crop network reading them.
pub struct DinoNetwork {
    /// The variables (`backbone.*`, `head.*`), owned by this network.
    pub varmap: VarMap,
    /// Backbone + head.
    pub model: MultiCropWrapper,
}

impl std::fmt::Debug for DinoNetwork {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DinoNetwork")
            .field("vars", &self.vars().len())
            .finish()
    }
}

impl DinoNetwork {
    /// Build the network of `cfg` on `varmap`: variables already present (loaded weights) are reused, missing
    /// ones are initialised from `seed` in construction order.
    pub fn build_on(
        cfg: &TrainConfig,
        varmap: VarMap,
        seed: u64,
        drop_path_rate: f64,
        device: &Device,
    ) -> Result<Self> {
        let vb = seeded_var_builder(&varmap, seed, DType::F32, device);
        let backbone = build_backbone(cfg, vb.pp("backbone"), drop_path_rate)?;
        let head = DinoHead::new(head_config(cfg, backbone.embed_dim()), vb.pp("head"))?;
        let model = MultiCropWrapper::new(backbone, head)?;
        Ok(Self { varmap, model })
    }

    /// A freshly initialised network (seeded).
    pub fn new(cfg: &TrainConfig, seed: u64, drop_path_rate: f64, device: &Device) -> Result<Self> {
        Self::build_on(cfg, VarMap::new(), seed, drop_path_rate, device)
    }

    /// A network with the same architecture as `other` and a COPY of its values (own storage), without drop
    /// path: the official teacher initialisation `teacher.load_state_dict(student.state_dict())`.
    pub fn copy_of(cfg: &TrainConfig, other: &DinoNetwork, device: &Device) -> Result<Self> {
        let varmap = VarMap::new();
        {
            let mut data = varmap
                .data()
                .lock()
                .map_err(|_| Error::Msg("poisoned VarMap lock".into()))?;
            for (name, var) in other.vars() {
                let copy = candle_core::Var::from_tensor(&var.as_tensor().copy()?)?;
                data.insert(name, copy);
            }
        }
        Self::build_on(cfg, varmap, 0, 0.0, device)
    }

    /// Every variable (parameters and buffers), sorted by name.
    pub fn vars(&self) -> Vec<NamedVar> {
        sorted_vars(&self.varmap)
    }

    /// The variables the optimiser updates (no BN buffers, no `weight_g` under `norm_last_layer`).
    pub fn trainable(&self, norm_last_layer: bool) -> Vec<NamedVar> {
        trainable_vars(&self.vars(), &ModelSpec { norm_last_layer })
    }

    /// The parameters the teacher EMA averages (all but buffers).
    pub fn ema_params(&self) -> Vec<NamedVar> {
        ema_vars(&self.vars())
    }

    /// Detached copies of every variable, for checkpoints.
    pub fn tensors(&self) -> Vec<(String, Tensor)> {
        self.vars()
            .into_iter()
            .map(|(n, v)| (n, v.as_tensor().detach()))
            .collect()
    }
}
