//! `dino info`: what a checkpoint or weights file holds: its tensors (grouped, with shapes and parameter
//! counts), and for a dino-train checkpoint the epoch, iteration, configuration, dataset and versions.
//!
//! Only the safetensors header is read (8-byte length + JSON), so a multi-GB checkpoint is described instantly;
//! PyTorch files are listed through dino-models' reader.

use anyhow::{bail, Context, Result};
use std::collections::BTreeMap;
use std::io::Read;
use std::path::{Path, PathBuf};

/// One tensor of a file.
#[derive(Debug, Clone, PartialEq)]
pub struct TensorInfo {
    /// Full name.
    pub name: String,
    /// dtype as written (F32, F16, I64, ...).
    pub dtype: String,
    /// Shape.
    pub shape: Vec<usize>,
}

impl TensorInfo {
    fn numel(&self) -> usize {
        self.shape.iter().product()
    }
}

/// The header of a safetensors file: its tensors (sorted by name) and the `__metadata__` strings.
pub fn read_safetensors_header(path: &Path) -> Result<(Vec<TensorInfo>, BTreeMap<String, String>)> {
    let mut f =
        std::fs::File::open(path).with_context(|| format!("cannot open {}", path.display()))?;
    let file_len = f.metadata().map(|m| m.len()).unwrap_or(0);
    let mut len8 = [0u8; 8];
    f.read_exact(&mut len8).with_context(|| {
        format!(
            "{}: not a safetensors file (shorter than 8 bytes)",
            path.display()
        )
    })?;
    let n = u64::from_le_bytes(len8);
    if n == 0 || n > 100 << 20 || 8 + n > file_len {
        bail!(
            "{}: not a safetensors file (header length {n} does not fit a {file_len}-byte file)",
            path.display()
        );
    }
    let mut buf = vec![0u8; n as usize];
    f.read_exact(&mut buf)
        .with_context(|| format!("{}: truncated safetensors header", path.display()))?;
    let v: serde_json::Value = serde_json::from_slice(&buf).with_context(|| {
        format!(
            "{}: not a safetensors file (header is not JSON)",
            path.display()
        )
    })?;
    let obj = v.as_object().with_context(|| {
        format!(
            "{}: not a safetensors file (header is not an object)",
            path.display()
        )
    })?;
    let mut tensors = Vec::new();
    let mut meta = BTreeMap::new();
    for (k, t) in obj {
        if k == "__metadata__" {
            if let Some(m) = t.as_object() {
                for (mk, mv) in m {
                    meta.insert(mk.clone(), mv.as_str().unwrap_or_default().to_string());
                }
            }
            continue;
        }
        let dtype = t["dtype"].as_str().unwrap_or("?").to_string();
        let shape = t["shape"]
            .as_array()
            .with_context(|| format!("{}: tensor `{k}` has no shape", path.display()))?
            .iter()
            .map(|d| d.as_u64().map(|d| d as usize))
            .collect::<Option<Vec<_>>>()
            .with_context(|| format!("{}: tensor `{k}` has a bad shape", path.display()))?;
        tensors.push(TensorInfo {
            name: k.clone(),
            dtype,
            shape,
        });
    }
    tensors.sort_by(|a, b| a.name.cmp(&b.name));
    Ok((tensors, meta))
}

/// The file `dino info` (and the other checkpoint commands) read for `path`: a directory means its rolling
/// checkpoint (`checkpoint.safetensors`), `x.json` means the weights beside it.
pub fn checkpoint_file(path: &Path) -> Result<PathBuf> {
    if !path.exists() {
        bail!("{}: no such file or directory", path.display());
    }
    if path.is_dir() {
        return dino_train::checkpoint::find_latest(path).with_context(|| {
            format!(
                "{}: no {}.safetensors in this directory (is it a training output dir?)",
                path.display(),
                dino_train::checkpoint::LATEST
            )
        });
    }
    if path.extension().is_some_and(|e| e == "json") {
        let w = path.with_extension("safetensors");
        if w.is_file() {
            return Ok(w);
        }
    }
    Ok(path.to_path_buf())
}

/// Groups tensors by their first one or two name components (`student.backbone`, `optimizer.exp_avg`, ...).
fn group_of(name: &str) -> String {
    let parts: Vec<&str> = name.splitn(3, '.').collect();
    match parts.as_slice() {
        [a, b, _] if ["student", "teacher", "optimizer"].contains(a) => format!("{a}.{b}"),
        [a, ..] if parts.len() > 1 => a.to_string(),
        _ => "(top level)".to_string(),
    }
}

/// Prints the description of `path` to stdout. `all` lists every tensor, not only the groups.
pub fn run(path: &Path, all: bool) -> Result<()> {
    let file = checkpoint_file(path)?;
    let format = dino_models::weights::detect_format(&file)?;
    let tensors: Vec<TensorInfo> = match format {
        dino_models::weights::FileFormat::Safetensors => {
            let (tensors, meta) = read_safetensors_header(&file)?;
            println!(
                "file: {} (safetensors, {} tensors)",
                file.display(),
                tensors.len()
            );
            if meta.contains_key("dino_train") {
                let m = dino_train::checkpoint::load_meta(&file)?;
                describe_meta(&m);
            } else if !meta.is_empty() {
                for (k, v) in &meta {
                    let v: String = v.chars().take(200).collect();
                    println!("metadata {k}: {v}");
                }
            }
            tensors
        }
        dino_models::weights::FileFormat::TorchZip => {
            let (sd, _, origin) = dino_models::weights::read_state_dict(
                &file,
                dino_models::weights::DEFAULT_CHECKPOINT_KEY,
            )?;
            let mut t: Vec<TensorInfo> = sd
                .iter()
                .map(|(n, t)| TensorInfo {
                    name: n.clone(),
                    dtype: format!("{:?}", t.dtype()),
                    shape: t.dims().to_vec(),
                })
                .collect();
            t.sort_by(|a, b| a.name.cmp(&b.name));
            println!("file: {origin} (PyTorch zip, {} tensors)", t.len());
            t
        }
    };
    let mut groups: BTreeMap<String, (usize, usize)> = BTreeMap::new();
    for t in &tensors {
        let g = groups.entry(group_of(&t.name)).or_default();
        g.0 += 1;
        g.1 += t.numel();
    }
    println!("groups:");
    for (g, (n, p)) in &groups {
        println!("  {g:<28} {n:>5} tensors {p:>14} values");
    }
    if all || tensors.len() <= 64 {
        println!("tensors:");
        for t in &tensors {
            println!("  {:<60} {:<5} {:?}", t.name, t.dtype, t.shape);
        }
    } else {
        println!("({} tensors; pass --all to list them)", tensors.len());
    }
    Ok(())
}

fn describe_meta(m: &dino_train::checkpoint::CheckpointMeta) {
    let c = &m.config;
    println!(
        "dino-train checkpoint: epoch {} (completed), global iteration {} ({} per epoch), last loss {:.4}",
        m.epoch, m.global_iteration, m.niter_per_ep, m.last_loss
    );
    println!(
        "model: arch {} patch {} img {} out_dim {} norm_last_layer {} use_bn_in_head {}",
        c.arch, c.patch_size, c.img_size, c.out_dim, c.norm_last_layer, c.use_bn_in_head
    );
    if c.arch == "vit_custom" {
        println!(
            "  vit_custom: embed_dim {} depth {} heads {}",
            c.vit_embed_dim, c.vit_depth, c.vit_num_heads
        );
    }
    println!(
        "data: {} ({} images, fingerprint {}), crops 2x{} + {}x{}",
        m.dataset.description,
        m.dataset.len,
        m.dataset.hash,
        c.global_crops_size,
        c.local_crops_number,
        c.local_crops_size
    );
    println!(
        "versions: dino-train {} candle {} format {}; seed {}",
        m.versions.dino_train, m.versions.candle, m.versions.format, m.rng.seed
    );
    if let Some(k) = &m.compute {
        println!(
            "compute (the process that wrote it): {}, {} rank{} x {} thread{}, {} ({}); products {}; kernels {}",
            k.device,
            k.ranks,
            if k.ranks == 1 { "" } else { "s" },
            k.threads,
            if k.threads == 1 { "" } else { "s" },
            if k.cpu.is_empty() { "?" } else { &k.cpu },
            k.cpu_flags.join(" "),
            k.products,
            k.kernels
        );
    }
    if let Some(b) = &m.knn_baselines {
        let acc = |a: Option<dino_train::checkpoint::Accuracy>| {
            a.map_or("not measured".to_string(), |a| {
                format!("top-1 {:.2}% top-5 {:.2}%", a.top1, a.top5)
            })
        };
        println!(
            "k-NN baselines (before the first step): random init {}, raw pixels {} ({})",
            acc(b.init),
            acc(b.pixels),
            b.eval
        );
    }
    println!("config (TOML):");
    for line in c.to_toml_string().lines() {
        println!("  {line}");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_of_a_real_safetensors_file() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("w.safetensors");
        let a =
            candle_core::Tensor::zeros((2, 3), candle_core::DType::F32, &candle_core::Device::Cpu)
                .unwrap();
        let b = candle_core::Tensor::zeros(5, candle_core::DType::F32, &candle_core::Device::Cpu)
            .unwrap();
        candle_core::safetensors::save(
            &std::collections::HashMap::from([("x.w".to_string(), a), ("b".to_string(), b)]),
            &p,
        )
        .unwrap();
        let (t, _) = read_safetensors_header(&p).unwrap();
        assert_eq!(t.len(), 2);
        assert_eq!(t[0].name, "b");
        assert_eq!(t[1].shape, vec![2, 3]);
        assert_eq!(t[1].dtype, "F32");
    }

    #[test]
    fn corrupt_files_are_refused_naming_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("bad.safetensors");
        std::fs::write(&p, b"\xff\xff\xff\xff\xff\xff\xff\x7fgarbage").unwrap();
        let e = format!("{:#}", read_safetensors_header(&p).unwrap_err());
        assert!(
            e.contains("bad.safetensors") && e.contains("not a safetensors file"),
            "{e}"
        );
        std::fs::write(&p, b"abc").unwrap();
        let e = format!("{:#}", read_safetensors_header(&p).unwrap_err());
        assert!(e.contains("shorter than 8 bytes"), "{e}");
    }

    #[test]
    fn groups_follow_the_checkpoint_prefixes() {
        assert_eq!(
            group_of("student.backbone.blocks.0.attn.qkv.weight"),
            "student.backbone"
        );
        assert_eq!(
            group_of("optimizer.exp_avg.backbone.cls_token"),
            "optimizer.exp_avg"
        );
        assert_eq!(group_of("dino_loss.center"), "dino_loss");
        assert_eq!(group_of("cls_token"), "(top level)");
        assert_eq!(group_of("blocks.0.norm1.weight"), "blocks");
    }
}
