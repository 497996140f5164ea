//! Checkpoints: one safetensors file (student, teacher, optimiser moments and per-parameter steps, centre)
//! whose header also embeds the JSON metadata (epoch, iteration, full config, RNG state, dataset fingerprint,
//! versions, what computed the steps, the k-NN baselines), plus a human-readable copy of that metadata as
//! `<name>.json`. Both are written atomically (temporary file, fsync, rename, fsync of the directory). The
//! weights file is the source of truth: its embedded metadata is always consistent with its tensors, even if
//! a crash hits between the two renames.
//!
//! Tensor names inside the file: `student.<param>`, `teacher.<param>` (official parameter paths such as
//! `backbone.blocks.0.attn.qkv.weight`, `head.last_layer.weight_v`), `optimizer.<state>.<param>` and
//! `dino_loss.center` (1, K).

use std::collections::HashMap;
use std::io::Write;
use std::path::{Path, PathBuf};

use candle_core::{Device, Tensor};
use serde::{Deserialize, Serialize};

use crate::config::TrainConfig;
use crate::error::{Error, Result};

/// Version of the checkpoint layout written by this library.
pub const CHECKPOINT_FORMAT: u32 = 1;
/// The metadata key inside the safetensors header.
const META_KEY: &str = "dino_train";
/// File stem of the rolling checkpoint.
pub const LATEST: &str = "checkpoint";

/// Where the random streams stand. Every random draw of a run is a pure function of the seed and a position
/// (augmentation of sample `i` in epoch `e` from `(seed, e, i)`, shuffling of epoch `e` from `(seed, e)`,
/// drop-path masks of global iteration `g` from `(seed, g)`), so the position is the whole state.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RngState {
    /// The run's seed.
    pub seed: u64,
    /// The next global iteration (drop-path stream position).
    pub next_global_iteration: usize,
    /// The next epoch and iteration within it (shuffle and augmentation stream position).
    pub next_epoch: usize,
    /// Iteration within `next_epoch`.
    pub next_iteration: usize,
    /// How the streams are derived, for humans.
    pub scheme: String,
}

/// A cheap identity of the training data, checked on resume.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DatasetFingerprint {
    /// Dataset kind and location, for humans.
    pub description: String,
    /// Number of images.
    pub len: usize,
    /// FNV-1a 64 hash of the length and the pixels and labels of up to 16 evenly spaced images, hex.
    pub hash: String,
}

/// Versions of the software that wrote a checkpoint.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Versions {
    /// dino-train version.
    pub dino_train: String,
    /// candle version the workspace pins.
    pub candle: String,
    /// Checkpoint layout version.
    pub format: u32,
}

impl Default for Versions {
    fn default() -> Self {
        Self {
            dino_train: env!("CARGO_PKG_VERSION").to_string(),
            candle: "0.11.1".into(),
            format: CHECKPOINT_FORMAT,
        }
    }
}

/// What computed a run's steps: the device, the CPU's kernel flags, the path of the products, the kernel
/// path, threads and ranks. A run resumed on other compute continues the same training from the same state,
/// but its steps round differently from the uninterrupted run's (bit-exact resume needs the same compute).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Compute {
    /// The device the steps ran on (`cpu`, `cuda:0`).
    pub device: String,
    /// The CPU, as `/proc/cpuinfo` names it (`AMD EPYC (family 26 model 2)`); empty where it gives no name.
    pub cpu: String,
    /// The CPU flags that pick a kernel (of `dino_kernels::cpu::FLAGS`).
    pub cpu_flags: Vec<String>,
    /// The linear layers' products: `dino_kernels::cpu::gemm_kernel` on the CPU (`f32: gemm 0.19 AVX-512
    /// kernels`, `bf16: dino-kernels AMX tdpbf16ps tiles, f32 accumulation`), `f32: candle matmul
    /// (portable path)` on the portable path, `<dtype>: candle matmul on cuda:N` on a GPU.
    pub products: String,
    /// The kernel path in force (`auto`: the CPU fast path; `portable`: composed candle ops).
    pub kernels: String,
    /// Compute threads of each rank.
    pub threads: usize,
    /// Ranks of the run.
    pub ranks: usize,
}

impl Compute {
    /// What differs between `self` (a checkpoint's) and `now` in a way that changes the steps' rounding, each
    /// as `key: old -> new`. The CPU's kernel flags, the kernel path and the threads count only where both
    /// computed on the CPU (a GPU's steps do not depend on them), the CPU by its flags alone (the same flags
    /// take the same kernels, whatever the name).
    pub fn changes_to(&self, now: &Compute) -> Vec<String> {
        let mut out = Vec::new();
        let mut cmp = |key: &str, a: String, b: String| {
            if a != b {
                out.push(format!("{key}: {a} -> {b}"));
            }
        };
        cmp("device", self.device.clone(), now.device.clone());
        let on_cpu = self.device == "cpu" && now.device == "cpu";
        if on_cpu && self.cpu_flags != now.cpu_flags {
            let flags = |c: &Compute| {
                let f = if c.cpu_flags.is_empty() {
                    "no kernel flags".to_string()
                } else {
                    c.cpu_flags.join(" ")
                };
                format!("{} ({f})", if c.cpu.is_empty() { "?" } else { &c.cpu })
            };
            cmp("cpu", flags(self), flags(now));
        }
        cmp("products", self.products.clone(), now.products.clone());
        if on_cpu {
            cmp("kernels", self.kernels.clone(), now.kernels.clone());
            cmp("threads", self.threads.to_string(), now.threads.to_string());
        }
        cmp("ranks", self.ranks.to_string(), now.ranks.to_string());
        out
    }
}

/// Top-1 and top-5 k-NN accuracy, percent.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Accuracy {
    /// Top-1, percent.
    pub top1: f64,
    /// Top-5, percent.
    pub top5: f64,
}

impl From<dino_core::KnnResult> for Accuracy {
    fn from(r: dino_core::KnnResult) -> Self {
        Self {
            top1: r.top1,
            top5: r.top5,
        }
    }
}

impl From<Accuracy> for dino_core::KnnResult {
    fn from(a: Accuracy) -> Self {
        Self {
            top1: a.top1,
            top5: a.top5,
        }
    }
}

/// The k-NN baselines a run measures before its first step (the seeded network at random initialisation,
/// the raw pixels), kept so that a resumed run need not measure them again.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct KnnBaselines {
    /// What the figures depend on beyond the checked configuration: the bank's and the validation split's
    /// identity and the evaluation keys a resume may change (`knn_k`, `knn_temperature`, `eval_resize`, ...).
    pub eval: String,
    /// The network at random initialisation, when measured.
    pub init: Option<Accuracy>,
    /// The raw pixels, when measured.
    pub pixels: Option<Accuracy>,
}

/// The metadata of a checkpoint (also written as `<name>.json`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CheckpointMeta {
    /// Number of completed epochs (the official `epoch` key).
    pub epoch: usize,
    /// Number of completed iterations since the start of training; training resumes at this global iteration.
    pub global_iteration: usize,
    /// Iterations per epoch of the run (schedules depend on it).
    pub niter_per_ep: usize,
    /// The loss of the last completed iteration (NaN if none).
    pub last_loss: f64,
    /// The full configuration of the run.
    pub config: TrainConfig,
    /// The random streams' position.
    pub rng: RngState,
    /// The training data's identity.
    pub dataset: DatasetFingerprint,
    /// Software versions.
    pub versions: Versions,
    /// Every time the run was extended to more epochs (`--extend`), oldest first.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub extensions: Vec<Extension>,
    /// The running sums of the epoch in progress (a checkpoint inside an epoch), so that a resumed run's
    /// epoch record averages over the whole epoch as the uninterrupted run's does.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub epoch_sums: Option<EpochSums>,
    /// What computed the steps of the process that wrote it (absent from checkpoints before it was recorded).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub compute: Option<Compute>,
    /// The k-NN baselines measured before the first step, when they were.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub knn_baselines: Option<KnnBaselines>,
}

/// Sums over the iterations of an epoch so far (loss every iteration, teacher entropy every logged one).
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
pub struct EpochSums {
    /// Sum of the losses.
    pub loss_sum: f64,
    /// Iterations in `loss_sum`.
    pub loss_count: usize,
    /// Sum of the logged teacher entropies.
    pub entropy_sum: f64,
    /// Entries in `entropy_sum`.
    pub entropy_count: usize,
    /// Unreadable images met in the epoch's batches so far, over all ranks (absent from older checkpoints).
    #[serde(default)]
    pub skipped_images: usize,
}

/// One extension of a finished or running run to more epochs: from then on the lr, weight-decay and
/// teacher-momentum cosine schedules follow the new length (the official code's behaviour on resume with a
/// larger `--epochs`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Extension {
    /// Global iteration at which the longer schedules took over.
    pub at_global_iteration: usize,
    /// Epochs before.
    pub from_epochs: usize,
    /// Epochs after.
    pub to_epochs: usize,
}

impl CheckpointMeta {
    /// Epoch index and iteration within it at which training resumes.
    pub fn resume_position(&self) -> (usize, usize) {
        if self.niter_per_ep == 0 {
            return (self.epoch, 0);
        }
        (
            self.global_iteration / self.niter_per_ep,
            self.global_iteration % self.niter_per_ep,
        )
    }
}

/// The weights file of checkpoint `stem` in `dir`.
pub fn weights_path(dir: &Path, stem: &str) -> PathBuf {
    dir.join(format!("{stem}.safetensors"))
}

/// The metadata file of checkpoint `stem` in `dir`.
pub fn meta_path(dir: &Path, stem: &str) -> PathBuf {
    dir.join(format!("{stem}.json"))
}

/// Write `bytes` to `path` atomically: `<path>.tmp`, fsync, rename over `path`, fsync of the directory.
/// A crash at any point leaves either the old file or the new one, never a torn file; a failed write (a
/// full disk) removes its temporary file, so that it does not keep the space.
pub fn atomic_write(path: &Path, bytes: &[u8]) -> Result<()> {
    let tmp = tmp_path(path);
    let written = (|| {
        let mut f = std::fs::File::create(&tmp).map_err(|e| Error::io(&tmp, e))?;
        f.write_all(bytes).map_err(|e| Error::io(&tmp, e))?;
        f.sync_all().map_err(|e| Error::io(&tmp, e))?;
        drop(f);
        std::fs::rename(&tmp, path).map_err(|e| Error::io(path, e))
    })();
    if let Err(e) = written {
        let _ = std::fs::remove_file(&tmp);
        return Err(e);
    }
    if let Some(dir) = path.parent() {
        let dir = if dir.as_os_str().is_empty() {
            Path::new(".")
        } else {
            dir
        };
        // Persist the rename itself; not every platform lets a directory be opened, so this is best-effort.
        if let Ok(d) = std::fs::File::open(dir) {
            let _ = d.sync_all();
        }
    }
    Ok(())
}

/// The temporary file [`atomic_write`] uses for `path`.
pub fn tmp_path(path: &Path) -> PathBuf {
    let mut s = path.as_os_str().to_owned();
    s.push(".tmp");
    PathBuf::from(s)
}

/// Save a checkpoint `stem` (`<stem>.safetensors` + `<stem>.json`) into `dir`, atomically.
pub fn save(
    dir: &Path,
    stem: &str,
    tensors: &[(String, Tensor)],
    meta: &CheckpointMeta,
) -> Result<()> {
    std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
    let wpath = weights_path(dir, stem);
    let json = serde_json::to_string_pretty(meta).map_err(|source| Error::Json {
        path: wpath.clone(),
        source,
    })?;
    let mut info = HashMap::new();
    info.insert(META_KEY.to_string(), json.clone());
    let mut sorted: Vec<(&str, &Tensor)> = tensors.iter().map(|(n, t)| (n.as_str(), t)).collect();
    sorted.sort_by(|a, b| a.0.cmp(b.0));
    let contiguous: Vec<(&str, Tensor)> = sorted
        .into_iter()
        // Host copies: the file does not depend on the device that trained (a CUDA run resumes on the CPU).
        .map(|(n, t)| Ok((n, t.to_device(&candle_core::Device::Cpu)?.contiguous()?)))
        .collect::<Result<_>>()?;
    let bytes = safetensors::tensor::serialize(contiguous.iter().map(|(n, t)| (*n, t)), Some(info))
        .map_err(|e| Error::Checkpoint {
            path: wpath.clone(),
            reason: format!("cannot serialise: {e}"),
        })?;
    atomic_write(&wpath, &bytes)?;
    atomic_write(&meta_path(dir, stem), json.as_bytes())?;
    Ok(())
}

/// Load a checkpoint's weights file: its tensors (on `device`) and its embedded metadata.
pub fn load(path: &Path, device: &Device) -> Result<(HashMap<String, Tensor>, CheckpointMeta)> {
    let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
    let bad = |reason: String| Error::Checkpoint {
        path: path.to_path_buf(),
        reason,
    };
    let (_, header) = safetensors::SafeTensors::read_metadata(&bytes)
        .map_err(|e| bad(format!("not a safetensors file ({e})")))?;
    let json = header
        .metadata()
        .as_ref()
        .and_then(|m| m.get(META_KEY))
        .ok_or_else(|| {
            bad(format!(
                "no `{META_KEY}` metadata in the header: not a dino-train checkpoint"
            ))
        })?;
    let meta: CheckpointMeta =
        serde_json::from_str(json).map_err(|e| bad(format!("unreadable metadata ({e})")))?;
    if meta.versions.format != CHECKPOINT_FORMAT {
        return Err(bad(format!(
            "checkpoint format {} is not the supported format {CHECKPOINT_FORMAT}",
            meta.versions.format
        )));
    }
    let tensors = candle_core::safetensors::load_buffer(&bytes, device).map_err(|e| {
        bad(format!(
            "cannot read tensors ({})",
            dino_core::error::candle_text(&e)
        ))
    })?;
    Ok((tensors, meta))
}

/// Read only the metadata of a checkpoint's weights file.
pub fn load_meta(path: &Path) -> Result<CheckpointMeta> {
    Ok(load(path, &Device::Cpu)?.1)
}

/// The rolling checkpoint to resume from in `output_dir`, if there is one (a stray `.tmp` left by a crash
/// during a write is ignored: the rename never happened, so the previous complete file is used).
pub fn find_latest(output_dir: &Path) -> Option<PathBuf> {
    let p = weights_path(output_dir, LATEST);
    p.is_file().then_some(p)
}

/// Take the tensors named `<prefix>.<name>` out of `tensors`, with the prefix stripped.
pub fn take_prefixed(tensors: &HashMap<String, Tensor>, prefix: &str) -> HashMap<String, Tensor> {
    let p = format!("{prefix}.");
    tensors
        .iter()
        .filter_map(|(k, v)| k.strip_prefix(&p).map(|n| (n.to_string(), v.clone())))
        .collect()
}

/// FNV-1a 64-bit hasher for fingerprints.
#[derive(Debug, Clone)]
pub struct Fnv64(u64);

impl Default for Fnv64 {
    fn default() -> Self {
        Self(0xcbf2_9ce4_8422_2325)
    }
}

impl Fnv64 {
    /// Feed bytes.
    pub fn update(&mut self, bytes: &[u8]) {
        for b in bytes {
            self.0 ^= *b as u64;
            self.0 = self.0.wrapping_mul(0x0100_0000_01b3);
        }
    }
    /// The hash as 16 hex digits.
    pub fn hex(&self) -> String {
        format!("{:016x}", self.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn meta() -> CheckpointMeta {
        CheckpointMeta {
            epoch: 1,
            global_iteration: 7,
            niter_per_ep: 5,
            last_loss: 3.5,
            config: TrainConfig::default(),
            rng: RngState {
                seed: 0,
                next_global_iteration: 7,
                next_epoch: 1,
                next_iteration: 2,
                scheme: "test".into(),
            },
            dataset: DatasetFingerprint {
                description: "d".into(),
                len: 10,
                hash: "00".into(),
            },
            versions: Versions::default(),
            extensions: Vec::new(),
            epoch_sums: None,
            compute: None,
            knn_baselines: None,
        }
    }

    #[test]
    fn compute_changes_name_what_changes_the_rounding() {
        let cpu = Compute {
            device: "cpu".into(),
            cpu: "A (family 26 model 2)".into(),
            cpu_flags: vec!["avx2".into(), "fma".into(), "avx512f".into()],
            products: "f32: gemm 0.19 AVX-512 kernels".into(),
            kernels: "auto".into(),
            threads: 2,
            ranks: 1,
        };
        assert!(cpu.changes_to(&cpu).is_empty());
        let renamed = Compute {
            cpu: "B".into(),
            ..cpu.clone()
        };
        assert!(cpu.changes_to(&renamed).is_empty(), "the name alone");
        let other = Compute {
            cpu: "C".into(),
            cpu_flags: vec!["avx2".into(), "fma".into()],
            products: "f32: gemm 0.19 AVX2+FMA kernels".into(),
            kernels: "portable".into(),
            threads: 4,
            ranks: 2,
            ..cpu.clone()
        };
        assert_eq!(
            cpu.changes_to(&other),
            vec![
                "cpu: A (family 26 model 2) (avx2 fma avx512f) -> C (avx2 fma)",
                "products: f32: gemm 0.19 AVX-512 kernels -> f32: gemm 0.19 AVX2+FMA kernels",
                "kernels: auto -> portable",
                "threads: 2 -> 4",
                "ranks: 1 -> 2",
            ]
        );
        // On a GPU the host's flags, kernel path and threads do not enter the steps.
        let gpu = Compute {
            device: "cuda:0".into(),
            products: "f32: candle matmul on cuda:0".into(),
            ..cpu.clone()
        };
        let gpu_elsewhere = Compute {
            cpu_flags: Vec::new(),
            threads: 16,
            kernels: "portable".into(),
            ..gpu.clone()
        };
        assert!(gpu.changes_to(&gpu_elsewhere).is_empty());
        assert_eq!(
            cpu.changes_to(&gpu),
            vec![
                "device: cpu -> cuda:0",
                "products: f32: gemm 0.19 AVX-512 kernels -> f32: candle matmul on cuda:0",
            ]
        );
        // Checkpoints written before the record parse without it.
        let mut json: serde_json::Value = serde_json::to_value(meta()).unwrap();
        assert!(json.get("compute").is_none(), "None is not written");
        json["compute"] = serde_json::to_value(&cpu).unwrap();
        let back: CheckpointMeta = serde_json::from_value(json).unwrap();
        assert_eq!(back.compute, Some(cpu));
    }

    #[test]
    fn save_load_round_trip_with_embedded_metadata() {
        let dir = tempfile::tempdir().unwrap();
        let t = Tensor::arange(0f32, 6., &Device::Cpu)
            .unwrap()
            .reshape((2, 3))
            .unwrap();
        let m = meta();
        save(
            dir.path(),
            LATEST,
            &[
                ("student.a".into(), t.clone()),
                ("teacher.a".into(), t.t().unwrap()),
            ],
            &m,
        )
        .unwrap();
        let (tensors, back) = load(&weights_path(dir.path(), LATEST), &Device::Cpu).unwrap();
        assert_eq!(back, m);
        assert_eq!(back.resume_position(), (1, 2));
        let s = take_prefixed(&tensors, "teacher");
        assert_eq!(
            s["a"].to_vec2::<f32>().unwrap(),
            vec![vec![0., 3.], vec![1., 4.], vec![2., 5.]]
        );
        let json: CheckpointMeta =
            serde_json::from_str(&std::fs::read_to_string(meta_path(dir.path(), LATEST)).unwrap())
                .unwrap();
        assert_eq!(json, m);
        assert!(!tmp_path(&weights_path(dir.path(), LATEST)).exists());
    }

    #[test]
    fn torn_or_foreign_files_are_errors_naming_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("x.safetensors");
        std::fs::write(&p, b"\x10\x00\x00\x00\x00\x00\x00\x00{\"a\":").unwrap();
        let e = load(&p, &Device::Cpu).unwrap_err().to_string();
        assert!(e.contains("x.safetensors"), "{e}");
        let t = Tensor::zeros(3, candle_core::DType::F32, &Device::Cpu).unwrap();
        candle_core::safetensors::save(&HashMap::from([("a".to_string(), t)]), &p).unwrap();
        let e = load(&p, &Device::Cpu).unwrap_err().to_string();
        assert!(e.contains("not a dino-train checkpoint"), "{e}");
    }

    #[test]
    fn atomic_write_replaces_and_ignores_stale_tmp() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("f.bin");
        std::fs::write(tmp_path(&p), b"partial garbage").unwrap();
        atomic_write(&p, b"one").unwrap();
        atomic_write(&p, b"two").unwrap();
        assert_eq!(std::fs::read(&p).unwrap(), b"two");
        assert!(!tmp_path(&p).exists());
    }

    #[test]
    fn a_failed_atomic_write_leaves_no_temporary_file() {
        // The rename fails (the target is a non-empty directory), as a write fails on a full disk: the error
        // names the path and the written temporary file is gone.
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("taken");
        std::fs::create_dir(&p).unwrap();
        std::fs::write(p.join("inside"), b"x").unwrap();
        let e = atomic_write(&p, &[7u8; 4096]).unwrap_err().to_string();
        assert!(e.contains("taken"), "{e}");
        assert!(!tmp_path(&p).exists(), "the temporary file was left behind");
        assert!(p.join("inside").is_file());
    }
}
