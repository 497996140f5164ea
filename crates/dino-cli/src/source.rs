//! Where a command's network comes from: a dino-train checkpoint (a training output dir, `checkpoint*.safetensors`
//! or its `.json`; architecture from its stored configuration), or official weights (`*_pretrain.pth`, a full
//! official checkpoint, an exported safetensors, or an `hf:owner/name` reference; architecture from the flags).
//! Weights are always loaded strictly through dino-models (a missing, unexpected or mis-shaped tensor is an error
//! naming it).

use anyhow::{bail, Context, Result};
use candle_core::{DType, Device, Tensor};
use candle_nn::VarMap;
use clap::Args;
use dino_models::head::DinoHead;
use dino_models::hub::{resolve_weights_arg, HubOptions, HubRef};
use dino_models::init::seeded_var_builder;
use dino_models::vit::VisionTransformer;
use dino_models::weights::{self, LoadOptions};
use dino_models::Backbone;
use dino_train::checkpoint;
use dino_train::{Arch, TrainConfig};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

fn parse_arch(s: &str) -> Result<String, String> {
    s.parse::<Arch>()
        .map(|_| s.to_string())
        .map_err(|e| e.to_string())
}

/// Flags naming the network a command reads.
#[derive(Args, Debug, Clone)]
pub struct ModelArgs {
    /// A dino checkpoint (training output dir, .safetensors or .json) or official weights (.pth, .safetensors,
    /// hf:owner/name[/file]).
    #[arg(long, visible_alias = "pretrained-weights")]
    pub checkpoint: String,
    /// Which network of a training checkpoint: teacher (as the official evaluations) or student.
    #[arg(long, default_value = "teacher")]
    pub checkpoint_key: String,
    /// Architecture of official weights (ignored for dino checkpoints, which store it). [vit_small]
    #[arg(long, value_parser = parse_arch)]
    pub arch: Option<String>,
    /// Patch size of official weights. [16]
    #[arg(long)]
    pub patch_size: Option<usize>,
    /// Use only the local hub cache for hf: references (also HF_HUB_OFFLINE=1).
    #[arg(long)]
    pub offline: bool,
    /// Where the network runs: cpu, cuda, cuda:N or auto (CUDA when this build has it and a GPU answers). [cpu]
    #[arg(long, default_value = "cpu", value_parser = parse_device)]
    pub device: dino_train::DeviceSpec,
}

/// Parses `--device`.
pub fn parse_device(s: &str) -> std::result::Result<dino_train::DeviceSpec, String> {
    s.parse()
}

/// The backbone of a loaded network: the concrete ViT (attention maps, intermediate layers) or any backbone.
pub enum Net {
    /// A Vision Transformer.
    Vit(Box<VisionTransformer>),
    /// A ResNet (or another backbone).
    Other(Box<dyn Backbone>),
}

impl Net {
    /// The backbone as the trait object the evaluations take.
    pub fn backbone(&self) -> &dyn Backbone {
        match self {
            Net::Vit(v) => v.as_ref(),
            Net::Other(b) => b.as_ref(),
        }
    }
}

/// A network read from a checkpoint or weights file.
pub struct Loaded {
    /// The architecture (and, for dino checkpoints, the whole training configuration).
    pub cfg: TrainConfig,
    /// Every variable (`backbone.*`, plus `head.*` when loaded), official names.
    pub varmap: VarMap,
    /// The backbone.
    pub net: Net,
    /// The file read (and key), for messages.
    pub origin: String,
    /// For a dino checkpoint, the global iterations it had trained.
    pub global_iteration: Option<usize>,
}

/// Whether `file` is a dino-train checkpoint (a safetensors file whose header carries our metadata).
fn is_dino_checkpoint(file: &Path) -> bool {
    crate::info::read_safetensors_header(file)
        .map(|(_, meta)| meta.contains_key("dino_train"))
        .unwrap_or(false)
}

/// Resolves `arg` to a local file: `hf:` through the hub, a directory to its rolling checkpoint, a `.json` to the
/// weights beside it. A missing path is an error naming it.
pub fn resolve_file(arg: &str, offline: bool) -> Result<PathBuf> {
    if HubRef::parse(arg)?.is_some() {
        let opts = HubOptions {
            offline: offline || HubOptions::offline_from_env(),
            ..HubOptions::default()
        };
        return Ok(resolve_weights_arg(arg, &opts)?);
    }
    crate::info::checkpoint_file(Path::new(arg))
}

fn build(
    cfg: &TrainConfig,
    varmap: &VarMap,
    with_head: bool,
    device: &Device,
) -> Result<(Net, Option<DinoHead>)> {
    let vb = seeded_var_builder(varmap, 0, DType::F32, device);
    let net = match dino_train::model::vit_config(cfg, 0.0)? {
        Some(v) => Net::Vit(Box::new(VisionTransformer::new(v, vb.pp("backbone"))?)),
        None => Net::Other(dino_train::model::build_backbone(
            cfg,
            vb.pp("backbone"),
            0.0,
        )?),
    };
    let head = if with_head {
        let hc = dino_train::model::head_config(cfg, net.backbone().embed_dim());
        Some(DinoHead::new(hc, vb.pp("head"))?)
    } else {
        None
    };
    Ok((net, head))
}

/// Loads the network `args` names. `with_head` also builds and loads the DINO head (dino checkpoints only).
pub fn load(args: &ModelArgs, with_head: bool) -> Result<Loaded> {
    let device = args.device.resolve("--device")?;
    let file = resolve_file(&args.checkpoint, args.offline)?;
    if is_dino_checkpoint(&file) {
        if args.checkpoint_key != "teacher" && args.checkpoint_key != "student" {
            bail!(
                "--checkpoint-key {}: a dino checkpoint holds `teacher` and `student`",
                args.checkpoint_key
            );
        }
        let (tensors, meta) = checkpoint::load(&file, &device)?;
        let cfg = meta.config.clone();
        let varmap = VarMap::new();
        // The head (when built) lives in `varmap`, which is what export reads.
        let (net, _head) = build(&cfg, &varmap, with_head, &device)?;
        let part = checkpoint::take_prefixed(&tensors, &args.checkpoint_key);
        let wanted: BTreeMap<String, Tensor> = part
            .into_iter()
            .filter(|(k, _)| k.starts_with("backbone.") || (with_head && k.starts_with("head.")))
            .collect();
        let origin = format!("{} ({})", file.display(), args.checkpoint_key);
        weights::load_strict(&dino_core::sorted_vars(&varmap), &wanted, &origin)?;
        return Ok(Loaded {
            cfg,
            varmap,
            net,
            origin,
            global_iteration: Some(meta.global_iteration),
        });
    }
    if with_head {
        bail!(
            "{}: not a dino checkpoint; only a training checkpoint holds a head to load (use --part backbone)",
            file.display()
        );
    }
    // Official weights: the architecture comes from the flags, official defaults otherwise.
    let mut cfg = TrainConfig::official();
    if let Some(a) = &args.arch {
        cfg.arch = a.clone();
    }
    if let Some(p) = args.patch_size {
        cfg.patch_size = p;
    }
    cfg.validate()?;
    let varmap = VarMap::new();
    let (net, _) = build(&cfg, &varmap, false, &device)?;
    let opts = LoadOptions {
        checkpoint_key: args.checkpoint_key.clone(),
        var_prefix: "backbone.".to_string(),
    };
    let report = weights::load_backbone(&varmap, &file, &opts).with_context(|| {
        format!(
            "loading {} as {} (patch {})",
            file.display(),
            cfg.arch,
            cfg.patch_size
        )
    })?;
    Ok(Loaded {
        cfg,
        varmap,
        net,
        origin: report.origin,
        global_iteration: None,
    })
}
