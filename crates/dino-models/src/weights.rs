//! Weights in and out (dino-spec §1.12, §1.13): strict loading of official checkpoints into a `VarMap`, and
//! export of our networks to safetensors with the official names.
//!
//! Readable inputs, detected from the file's content (not its extension):
//! - safetensors with the official key names (`cls_token`, `blocks.0.attn.qkv.weight`, ...), or with
//!   `backbone.*` / `head.*` prefixes as written by [`export_safetensors`];
//! - PyTorch zip-pickle files (`.pth`, `.pt`, `.bin`) read directly by candle: backbone-only
//!   `*_pretrain.pth` files (tensors at the top level) and full training checkpoints (`teacher` / `student`
//!   entries, chosen with `checkpoint_key`, default `teacher`);
//! - the Hugging Face transformers layout of `facebook/dino-vits16` and friends (`embeddings.*`,
//!   `encoder.layer.N.*`), mapped onto the official names, with `query`/`key`/`value` concatenated into `qkv`.
//!
//! Loading is strict: every variable must be present with its exact shape, and every tensor must be used
//! (a missing key, an unexpected key or a wrong shape is an error naming the tensor and both shapes). The
//! only names deliberately set aside are reported in [`LoadReport::ignored`]: the `head.*` part when loading
//! a backbone from a full checkpoint (and the `backbone.*` part when loading a head), the Hugging Face
//! `pooler.*` (not part of DINO), and BatchNorm `num_batches_tracked` counters the network does not keep.
//! Nothing is written into the `VarMap` unless the whole check passes.
//!
//! Writes are atomic: a temporary file in the destination directory, fsync, rename.

use std::collections::{BTreeMap, HashMap};
use std::io::{Read, Write};
use std::path::{Path, PathBuf};

use candle_core::{Device, Tensor};
use candle_nn::VarMap;

use crate::error::{Error, Result};
use crate::params::{sorted_vars, NamedVar};

/// The default `checkpoint_key`, as in the official evaluation scripts: the teacher.
pub const DEFAULT_CHECKPOINT_KEY: &str = "teacher";

/// How a checkpoint file is encoded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FileFormat {
    /// safetensors.
    Safetensors,
    /// PyTorch >= 1.6 `torch.save` zip archive with a pickle (`.pth`, `.pt`, `.bin`).
    TorchZip,
}

/// The naming scheme a checkpoint used before mapping.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SourceLayout {
    /// The official DINO names (`cls_token`, `blocks.N.attn.qkv`, ...).
    Official,
    /// Hugging Face transformers `ViTModel` names (`embeddings.*`, `encoder.layer.N.*`).
    HuggingFace,
}

/// Which part of a model a load targets.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Part {
    /// The backbone: `module.` then `backbone.` prefixes are stripped; `head.*` tensors are set aside.
    Backbone,
    /// The DINO head: `module.` then `head.` prefixes are stripped; `backbone.*` tensors are set aside.
    Head,
    /// Everything: only `module.` is stripped; names must match the variables exactly (`backbone.*`, `head.*`).
    Full,
}

/// Options of the load functions.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LoadOptions {
    /// Entry of a full training checkpoint to read (`teacher` or `student`). Default: `teacher`. Ignored for
    /// files whose tensors sit at the top level.
    pub checkpoint_key: String,
    /// Only the variables whose name starts with this prefix are loaded, with the prefix removed before
    /// matching (for example `backbone.` when the `VarMap` holds `backbone.*` and `head.*`). Default: empty
    /// (all variables).
    pub var_prefix: String,
}

impl Default for LoadOptions {
    fn default() -> Self {
        Self {
            checkpoint_key: DEFAULT_CHECKPOINT_KEY.to_string(),
            var_prefix: String::new(),
        }
    }
}

impl LoadOptions {
    /// Default options with the given variable prefix.
    pub fn with_prefix(prefix: &str) -> Self {
        Self {
            var_prefix: prefix.to_string(),
            ..Self::default()
        }
    }
}

/// What a successful load did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LoadReport {
    /// The file (and checkpoint key) that was read.
    pub origin: String,
    /// How the file was encoded.
    pub format: FileFormat,
    /// The naming scheme of the file.
    pub layout: SourceLayout,
    /// Names (ours, without `var_prefix`) of the variables that were set, sorted.
    pub loaded: Vec<String>,
    /// Names in the file that were deliberately set aside (see the module documentation), sorted.
    pub ignored: Vec<String>,
}

/// Detect the encoding of `path` from its first bytes.
pub fn detect_format(path: &Path) -> Result<FileFormat> {
    let unreadable = |reason: String| Error::Unreadable {
        path: path.to_path_buf(),
        reason,
    };
    let mut f = std::fs::File::open(path).map_err(|e| unreadable(e.to_string()))?;
    let mut head = [0u8; 9];
    let mut n = 0;
    while n < head.len() {
        match f.read(&mut head[n..]) {
            Ok(0) => break,
            Ok(k) => n += k,
            Err(e) => return Err(unreadable(e.to_string())),
        }
    }
    if n >= 4 && head[..4] == *b"PK\x03\x04" {
        return Ok(FileFormat::TorchZip);
    }
    if n >= 2 && head[0] == 0x80 && head[1] <= 5 {
        return Err(unreadable(
            "legacy (pre-1.6, non-zip) torch.save format is not supported; re-save it with a recent torch \
             (torch.save(obj, path)) or convert it to safetensors"
                .into(),
        ));
    }
    if n == 9 && head[8] == b'{' {
        return Ok(FileFormat::Safetensors);
    }
    Err(unreadable(
        "neither a safetensors file nor a PyTorch zip checkpoint".into(),
    ))
}

fn origin_of(path: &Path, format: FileFormat, key: Option<&str>) -> String {
    match (format, key) {
        (FileFormat::TorchZip, Some(k)) => format!("{} (checkpoint key `{k}`)", path.display()),
        _ => path.display().to_string(),
    }
}

/// Read every tensor of a checkpoint (on the CPU), selecting `checkpoint_key` in a full training checkpoint.
/// Returns the tensors sorted by name, the format and an origin string for messages.
pub fn read_state_dict(
    path: &Path,
    checkpoint_key: &str,
) -> Result<(BTreeMap<String, Tensor>, FileFormat, String)> {
    let format = detect_format(path)?;
    let unreadable = |e: candle_core::Error| Error::Unreadable {
        path: path.to_path_buf(),
        reason: dino_core::error::candle_text(&e),
    };
    match format {
        FileFormat::Safetensors => {
            let map = candle_core::safetensors::load(path, &Device::Cpu).map_err(unreadable)?;
            Ok((
                map.into_iter().collect(),
                format,
                origin_of(path, format, None),
            ))
        }
        FileFormat::TorchZip => {
            // A flat state dict has its tensors at the top level; a full checkpoint nests them.
            let top =
                candle_core::pickle::read_pth_tensor_info(path, false, None).map_err(unreadable)?;
            let (key, tensors) = if !top.is_empty() {
                (
                    None,
                    candle_core::pickle::read_all_with_key(path, None).map_err(unreadable)?,
                )
            } else {
                match candle_core::pickle::read_all_with_key(path, Some(checkpoint_key)) {
                    Ok(t) => (Some(checkpoint_key), t),
                    Err(e) if e.to_string().contains("not found") => {
                        return Err(Error::CheckpointKey {
                            path: path.to_path_buf(),
                            key: checkpoint_key.to_string(),
                        })
                    }
                    Err(e) => return Err(unreadable(e)),
                }
            };
            if tensors.is_empty() {
                return Err(Error::Unreadable {
                    path: path.to_path_buf(),
                    reason: format!(
                        "no tensors found{}",
                        key.map(|k| format!(" under `{k}`")).unwrap_or_default()
                    ),
                });
            }
            Ok((
                tensors.into_iter().collect(),
                format,
                origin_of(path, format, key),
            ))
        }
    }
}

fn strip(name: &str, prefix: &str) -> Option<String> {
    name.strip_prefix(prefix).map(str::to_string)
}

/// True if the names follow the Hugging Face transformers ViT layout.
pub fn is_hf_layout<'a>(names: impl IntoIterator<Item = &'a String>) -> bool {
    names.into_iter().any(|n| {
        let n = n.strip_prefix("vit.").unwrap_or(n);
        n.starts_with("embeddings.") || n.starts_with("encoder.layer.")
    })
}

/// Map a Hugging Face transformers ViT state dict (`facebook/dino-vits16` and friends) onto the official
/// DINO names: `embeddings.cls_token` -> `cls_token`, `embeddings.position_embeddings` -> `pos_embed`,
/// `embeddings.patch_embeddings.projection` -> `patch_embed.proj`, per layer `query`/`key`/`value` ->
/// concatenated `blocks.N.attn.qkv`, `attention.output.dense` -> `attn.proj`, `layernorm_before/after` ->
/// `norm1/norm2`, `intermediate.dense` -> `mlp.fc1`, `output.dense` -> `mlp.fc2`, `layernorm` -> `norm`.
/// A leading `vit.` is stripped; `pooler.*` is returned in the ignored list; other names are kept unchanged
/// (so a strict load reports them as unexpected).
pub fn map_hf_vit(
    tensors: BTreeMap<String, Tensor>,
    origin: &str,
) -> Result<(BTreeMap<String, Tensor>, Vec<String>)> {
    let mut out = BTreeMap::new();
    let mut ignored = Vec::new();
    // (layer, "weight"|"bias") -> [q, k, v]
    let mut qkv: BTreeMap<(usize, String), [Option<Tensor>; 3]> = BTreeMap::new();
    for (orig, t) in tensors {
        let n = orig.strip_prefix("vit.").unwrap_or(&orig);
        let mapped = if let Some(rest) = n.strip_prefix("embeddings.") {
            match rest {
                "cls_token" => Some("cls_token".to_string()),
                "position_embeddings" => Some("pos_embed".to_string()),
                _ => rest
                    .strip_prefix("patch_embeddings.projection.")
                    .map(|p| format!("patch_embed.proj.{p}")),
            }
        } else if let Some(p) = n.strip_prefix("layernorm.") {
            Some(format!("norm.{p}"))
        } else if n.starts_with("pooler.") {
            ignored.push(orig.clone());
            continue;
        } else if let Some(rest) = n.strip_prefix("encoder.layer.") {
            let (idx, rest) = rest.split_once('.').unwrap_or((rest, ""));
            match idx.parse::<usize>() {
                Err(_) => None,
                Ok(i) => {
                    let part = |p: &str| rest.strip_prefix(p).map(str::to_string);
                    if let Some(wb) = part("attention.attention.query.") {
                        qkv.entry((i, wb)).or_default()[0] = Some(t.clone());
                        continue;
                    } else if let Some(wb) = part("attention.attention.key.") {
                        qkv.entry((i, wb)).or_default()[1] = Some(t.clone());
                        continue;
                    } else if let Some(wb) = part("attention.attention.value.") {
                        qkv.entry((i, wb)).or_default()[2] = Some(t.clone());
                        continue;
                    } else if let Some(p) = part("attention.output.dense.") {
                        Some(format!("blocks.{i}.attn.proj.{p}"))
                    } else if let Some(p) = part("intermediate.dense.") {
                        Some(format!("blocks.{i}.mlp.fc1.{p}"))
                    } else if let Some(p) = part("output.dense.") {
                        Some(format!("blocks.{i}.mlp.fc2.{p}"))
                    } else if let Some(p) = part("layernorm_before.") {
                        Some(format!("blocks.{i}.norm1.{p}"))
                    } else {
                        part("layernorm_after.").map(|p| format!("blocks.{i}.norm2.{p}"))
                    }
                }
            }
        } else {
            None
        };
        out.insert(mapped.unwrap_or(orig), t);
    }
    for ((i, wb), parts) in qkv {
        let [q, k, v] = parts;
        let (q, k, v) = match (q, k, v) {
            (Some(q), Some(k), Some(v)) => (q, k, v),
            (q, k, v) => {
                let absent: Vec<&str> = [
                    ("query", q.is_none()),
                    ("key", k.is_none()),
                    ("value", v.is_none()),
                ]
                .iter()
                .filter(|(_, a)| *a)
                .map(|(n, _)| *n)
                .collect();
                return Err(Error::Layout {
                    origin: origin.to_string(),
                    reason: format!(
                        "encoder.layer.{i}.attention.attention.{{query,key,value}}.{wb}: {} missing, cannot \
                         build blocks.{i}.attn.qkv.{wb}",
                        absent.join(", ")
                    ),
                });
            }
        };
        out.insert(
            format!("blocks.{i}.attn.qkv.{wb}"),
            Tensor::cat(&[q, k, v], 0)?,
        );
    }
    ignored.sort();
    Ok((out, ignored))
}

/// Select the tensors of `part` (prefix stripping and set-aside names as described in the module docs) and
/// map a Hugging Face layout. Returns `(tensors, ignored, layout)`.
pub fn select_part(
    tensors: BTreeMap<String, Tensor>,
    part: Part,
    origin: &str,
) -> Result<(BTreeMap<String, Tensor>, Vec<String>, SourceLayout)> {
    // `module.` (DistributedDataParallel) first, as the official load_pretrained_weights.
    let tensors: BTreeMap<String, Tensor> = tensors
        .into_iter()
        .map(|(k, v)| (strip(&k, "module.").unwrap_or(k), v))
        .collect();
    let mut ignored = Vec::new();
    let tensors = match part {
        Part::Full => tensors,
        Part::Backbone | Part::Head => {
            let (keep, drop) = match part {
                Part::Backbone => ("backbone.", "head."),
                _ => ("head.", "backbone."),
            };
            if tensors.keys().any(|k| k.starts_with(keep)) {
                let mut kept = BTreeMap::new();
                for (k, v) in tensors {
                    if let Some(s) = strip(&k, keep) {
                        kept.insert(s, v);
                    } else if k.starts_with(drop) {
                        ignored.push(k);
                    } else {
                        kept.insert(k, v);
                    }
                }
                kept
            } else {
                tensors
            }
        }
    };
    let (tensors, layout) = if part == Part::Backbone && is_hf_layout(tensors.keys()) {
        let (mapped, mut ign) = map_hf_vit(tensors, origin)?;
        ignored.append(&mut ign);
        (mapped, SourceLayout::HuggingFace)
    } else {
        (tensors, SourceLayout::Official)
    };
    ignored.sort();
    Ok((tensors, ignored, layout))
}

/// Strictly copy `tensors` into `vars` (names already relative): every variable must be present with its
/// exact shape and every tensor must be used. Nothing is written unless the whole check passes. A
/// `num_batches_tracked` tensor without a matching variable is set aside (returned), and such a variable
/// without a tensor is left unchanged, as PyTorch does for old BatchNorm state dicts. Returns
/// `(loaded, set_aside)` names.
pub fn load_strict(
    vars: &[NamedVar],
    tensors: &BTreeMap<String, Tensor>,
    origin: &str,
) -> Result<(Vec<String>, Vec<String>)> {
    let is_counter = |n: &str| n == "num_batches_tracked" || n.ends_with(".num_batches_tracked");
    let var_names: HashMap<&str, &candle_core::Var> =
        vars.iter().map(|(n, v)| (n.as_str(), v)).collect();
    let mut set_aside = Vec::new();
    let mut unexpected = Vec::new();
    for (name, t) in tensors {
        if !var_names.contains_key(name.as_str()) {
            if is_counter(name) {
                set_aside.push(name.clone());
            } else {
                unexpected.push((name.clone(), t.dims().to_vec()));
            }
        }
    }
    let missing: Vec<&NamedVar> = vars
        .iter()
        .filter(|(n, _)| !tensors.contains_key(n) && !is_counter(n))
        .collect();
    if let Some((name, var)) = missing.first() {
        let hint = if unexpected.is_empty() {
            String::new()
        } else {
            let names: Vec<String> = unexpected
                .iter()
                .take(5)
                .map(|(n, s)| format!("`{n}` {s:?}"))
                .collect();
            format!(
                "; the file has names the network lacks: {}{}",
                names.join(", "),
                if unexpected.len() > 5 { ", ..." } else { "" }
            )
        };
        return Err(Error::MissingKey {
            name: name.clone(),
            expected: var.dims().to_vec(),
            origin: format!("{origin}{hint}"),
            others: missing.len() - 1,
        });
    }
    if let Some((name, shape)) = unexpected.first() {
        return Err(Error::UnexpectedKey {
            name: name.clone(),
            shape: shape.clone(),
            origin: origin.to_string(),
            others: unexpected.len() - 1,
        });
    }
    for (name, var) in vars {
        if let Some(t) = tensors.get(name) {
            if t.dims() != var.dims() {
                return Err(Error::ShapeMismatch {
                    name: name.clone(),
                    expected: var.dims().to_vec(),
                    found: t.dims().to_vec(),
                    origin: origin.to_string(),
                });
            }
        }
    }
    let mut loaded = Vec::new();
    for (name, var) in vars {
        if let Some(t) = tensors.get(name) {
            let t = t.to_dtype(var.dtype())?.to_device(var.device())?;
            var.set(&t)?;
            loaded.push(name.clone());
        }
    }
    loaded.sort();
    set_aside.sort();
    Ok((loaded, set_aside))
}

/// The variables of `varmap` whose name starts with `prefix`, with the prefix removed, sorted.
pub fn vars_with_prefix(varmap: &VarMap, prefix: &str) -> Vec<NamedVar> {
    sorted_vars(varmap)
        .into_iter()
        .filter_map(|(n, v)| strip(&n, prefix).map(|s| (s, v)))
        .collect()
}

/// Strictly load one part of a model from `path` into the variables of `varmap` selected by
/// `opts.var_prefix`.
pub fn load_part(
    varmap: &VarMap,
    path: impl AsRef<Path>,
    part: Part,
    opts: &LoadOptions,
) -> Result<LoadReport> {
    let path = path.as_ref();
    let vars = vars_with_prefix(varmap, &opts.var_prefix);
    if vars.is_empty() {
        return Err(Error::Config(format!(
            "no variables named `{}*` to load {} into",
            opts.var_prefix,
            path.display()
        )));
    }
    let (raw, format, origin) = read_state_dict(path, &opts.checkpoint_key)?;
    let (tensors, mut ignored, layout) = select_part(raw, part, &origin)?;
    let (loaded, mut set_aside) = load_strict(&vars, &tensors, &origin)?;
    ignored.append(&mut set_aside);
    ignored.sort();
    Ok(LoadReport {
        origin,
        format,
        layout,
        loaded,
        ignored,
    })
}

/// Strictly load official backbone weights (safetensors, `*_pretrain.pth`, full checkpoint under
/// `opts.checkpoint_key`, or the Hugging Face layout) into `varmap`.
pub fn load_backbone(
    varmap: &VarMap,
    path: impl AsRef<Path>,
    opts: &LoadOptions,
) -> Result<LoadReport> {
    load_part(varmap, path, Part::Backbone, opts)
}

/// Strictly load DINO head weights (a head-only file or the `head.*` part of a full checkpoint).
pub fn load_head(
    varmap: &VarMap,
    path: impl AsRef<Path>,
    opts: &LoadOptions,
) -> Result<LoadReport> {
    load_part(varmap, path, Part::Head, opts)
}

/// Strictly load a whole model (`backbone.*` and `head.*`) from a full checkpoint or a full export.
pub fn load_model(
    varmap: &VarMap,
    path: impl AsRef<Path>,
    opts: &LoadOptions,
) -> Result<LoadReport> {
    load_part(varmap, path, Part::Full, opts)
}

/// Write `tensors` to a safetensors file atomically (temporary file in the same directory, fsync, rename).
pub fn save_tensors_atomic(path: &Path, tensors: &BTreeMap<String, Tensor>) -> Result<()> {
    let werr = |reason: String| Error::Write {
        path: path.to_path_buf(),
        reason,
    };
    let contiguous: Vec<(String, Tensor)> = tensors
        .iter()
        .map(|(k, t)| Ok((k.clone(), t.to_device(&Device::Cpu)?.contiguous()?)))
        .collect::<candle_core::Result<_>>()?;
    let bytes = safetensors::tensor::serialize(contiguous.iter().map(|(k, t)| (k, t)), None)
        .map_err(|e| werr(e.to_string()))?;
    write_atomic(path, &bytes)
}

/// Write `bytes` to `path` atomically: a temporary file next to it, fsync, rename, fsync of the directory.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    let werr = |reason: String| Error::Write {
        path: path.to_path_buf(),
        reason,
    };
    let file_name = path
        .file_name()
        .ok_or_else(|| werr("not a file path".into()))?
        .to_string_lossy()
        .into_owned();
    let dir: PathBuf = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    };
    let tmp = dir.join(format!(".{file_name}.tmp.{}", std::process::id()));
    let result = (|| -> std::io::Result<()> {
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
        drop(f);
        std::fs::rename(&tmp, path)?;
        // Persist the rename; not every platform can fsync a directory, so this is best effort.
        if let Ok(d) = std::fs::File::open(&dir) {
            let _ = d.sync_all();
        }
        Ok(())
    })();
    if let Err(e) = result {
        let _ = std::fs::remove_file(&tmp);
        return Err(werr(e.to_string()));
    }
    Ok(())
}

/// Export the variables of `vars` whose name starts with `select_prefix` to safetensors, with that prefix
/// removed: `""` writes everything as named (`backbone.*`, `head.*`: the official teacher layout),
/// `"backbone."` writes a backbone-only file with the `*_pretrain.pth` names, `"head."` a head-only file.
/// BatchNorm running statistics are included (they are in PyTorch's state dict); the file loads with
/// `model.load_state_dict(safetensors.torch.load_file(path), strict=True)`. Returns the number of tensors.
pub fn export_safetensors(
    vars: &[NamedVar],
    path: impl AsRef<Path>,
    select_prefix: &str,
) -> Result<usize> {
    let tensors: BTreeMap<String, Tensor> = vars
        .iter()
        .filter_map(|(n, v)| strip(n, select_prefix).map(|s| (s, v.as_tensor().detach())))
        .collect();
    if tensors.is_empty() {
        return Err(Error::Config(format!(
            "nothing to export to {}: no variable named `{select_prefix}*`",
            path.as_ref().display()
        )));
    }
    save_tensors_atomic(path.as_ref(), &tensors)?;
    Ok(tensors.len())
}

/// [`export_safetensors`] over every variable of `varmap`.
pub fn export_varmap(
    varmap: &VarMap,
    path: impl AsRef<Path>,
    select_prefix: &str,
) -> Result<usize> {
    export_safetensors(&sorted_vars(varmap), path, select_prefix)
}
