//! The subcommands other than `info`: train, eval-knn, eval-linear, extract, attention, export. Each one parses
//! its flags, then calls the libraries: dino-train (training, data, evaluation), dino-models (networks, strict
//! weight loading, export) and dino-data (images).

use crate::source::{self, ModelArgs, Net};
use crate::train_args::TrainArgs;
use anyhow::{bail, Context, Result};
use candle_core::Tensor;
use clap::{ArgAction, Args, ValueEnum};
use dino_data::dataset::Dataset;
use dino_train::attention::{self, HeadMaps};
use dino_train::eval::{self, Features};
use dino_train::{DatasetKind, TrainConfig};
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

fn parse_dataset(s: &str) -> Result<DatasetKind, String> {
    s.parse::<DatasetKind>().map_err(|e| e.to_string())
}

fn parse_bool(s: &str) -> Result<bool, String> {
    match s.to_ascii_lowercase().as_str() {
        "on" | "true" | "1" | "yes" => Ok(true),
        "off" | "false" | "0" | "no" => Ok(false),
        _ => Err(format!("expected true or false, got `{s}`")),
    }
}

// ------------------------------------------------------------------------------------------------ train

/// How `dino train` treats the output directory (the flags beside the training options).
pub struct TrainFlags {
    /// `--resume` (or `--extend`): a checkpoint must be there.
    pub resume: bool,
    /// `--no-resume`: start afresh.
    pub no_resume: bool,
    /// `--extend`: lengthen the run to `--epochs`.
    pub extend: bool,
    /// Not `--no-tensorboard`.
    pub tensorboard: bool,
    /// `--stop-after` (hidden, for tests).
    pub stop_after: Option<usize>,
}

/// `dino train`: resolve the configuration, train (resuming from the output dir), print the summary. Returns
/// the process's exit status: 0, or 128 + the signal when a stop signal ([`dino_train::signals`]) stopped the
/// run (after a checkpoint; the same command resumes it).
pub fn train(args: &TrainArgs, flags: TrainFlags) -> Result<i32> {
    let TrainFlags {
        resume,
        no_resume,
        extend,
        tensorboard,
        stop_after,
    } = flags;
    let cfg = args.resolve()?;
    let main_rank = main_rank();
    if args.print_config {
        if !main_rank {
            return Ok(0);
        }
        print!("{}", cfg.to_toml_string());
        return Ok(0);
    }
    if resume && dino_train::checkpoint::find_latest(&cfg.output_dir).is_none() {
        bail!(
            "{}: there is no {}.safetensors in {} to continue",
            if extend { "--extend" } else { "--resume" },
            dino_train::checkpoint::LATEST,
            cfg.output_dir.display()
        );
    }
    let opts = dino_train::TrainOptions {
        resume: !no_resume,
        stop_after_iterations: stop_after,
        extend,
        tensorboard,
        // The result line below says it on stdout.
        report_knn_final: false,
        ..dino_train::TrainOptions::default()
    };
    // Ctrl-C, SIGTERM, SIGHUP, SIGUSR1/2: a checkpoint after the current step, then exit (a second signal
    // exits at once).
    dino_train::signals::install(main_rank).context("cannot install the stop-signal handlers")?;
    let s = dino_train::train(&cfg, &opts)?;
    let status = s.stopped_by.map_or(0, |sig| 128 + sig);
    if !main_rank {
        return Ok(status);
    }
    if let Some(sig) = s.stopped_by {
        let (g, n) = (s.global_iteration, s.niter_per_ep.max(1));
        if g == 0 {
            eprintln!(
                "stopped by {} before the first iteration (during the initial k-NN evaluations); nothing was \
                 trained, so no checkpoint was written; the same command starts the run",
                dino_train::signals::name(sig)
            );
            return Ok(status);
        }
        if g >= cfg.epochs * n {
            eprintln!(
                "stopped by {} at the end of training: all {g} iterations are trained and saved ({}); the final \
                 evaluations were skipped, the same command runs them",
                dino_train::signals::name(sig),
                s.checkpoint.display()
            );
            return Ok(status);
        }
        let epoch = g.saturating_sub(1) / n;
        eprintln!(
            "stopped by {} after {g} iterations (epoch {epoch}: {} of {n}); checkpoint: {}; the same command \
             resumes it",
            dino_train::signals::name(sig),
            g - epoch * n,
            s.checkpoint.display()
        );
        return Ok(status);
    }
    if let Some(g) = s.resumed_from {
        println!("resumed from global iteration {g}");
    }
    if s.global_iteration <= s.resumed_from.unwrap_or(0) {
        // No step ran in this process: the checkpoint it resumed from had finished the schedule.
        println!(
            "trained {} iterations ({} per epoch); the run had already finished, no epoch left to train",
            s.global_iteration, s.niter_per_ep
        );
    } else {
        let (peak, advice) = peak_memory(&cfg, s.memory_estimate);
        let losses = if s.first_epoch_loss.is_nan() {
            // Stopped inside its first epoch (the hidden --stop-after).
            format!("; last loss {:.4}, no epoch completed", s.last_loss)
        } else {
            format!(
                "; mean loss first epoch {:.4}, last epoch {:.4}",
                s.first_epoch_loss, s.last_epoch_loss
            )
        };
        println!(
            "trained {} iterations ({} per epoch) in {:.1} s{peak}{losses}",
            s.global_iteration, s.niter_per_ep, s.seconds
        );
        // Once: the run may have said it after its first step already.
        if let (Some(a), false) = (advice, s.memory_noted) {
            eprintln!("{a}");
        }
    }
    println!("checkpoint: {}", s.checkpoint.display());
    if let Some(dir) = s.plots.first().and_then(|p| p.parent()) {
        let sheet = s.plots.iter().any(|p| p.ends_with("attention.png"));
        println!(
            "plots: {} (open summary.png first{})",
            dir.display(),
            if sheet {
                "; attention.png: where the teacher looks"
            } else {
                ""
            }
        );
    }
    if let Some(f) = &s.knn_final {
        let k = cfg.knn_k;
        match &s.knn_init {
            Some(i) => println!(
                "k-NN (k={k}, T={}) of the teacher: trained top-1 {:.2}% top-5 {:.2}% | random init top-1 {:.2}% \
                 top-5 {:.2}%{}",
                cfg.knn_temperature,
                f.top1,
                f.top5,
                i.top1,
                i.top5,
                s.knn_pixels
                    .map(|p| format!(" | raw pixels top-1 {:.2}% top-5 {:.2}%", p.top1, p.top5))
                    .unwrap_or_default()
            ),
            None => println!(
                "k-NN (k={k}, T={}) of the teacher: top-1 {:.2}% top-5 {:.2}%",
                cfg.knn_temperature, f.top1, f.top5
            ),
        }
    }
    Ok(0)
}

/// The peak memory of a finished run for its result line (`", peak memory 12.2 GiB (12.9 estimated)"`; rank
/// 0's process under mpirun; the estimate made before the first step, where one was), and
/// `runtime::memory_advice` for it.
fn peak_memory(cfg: &TrainConfig, estimate: Option<u64>) -> (String, Option<String>) {
    let Some(peak) = dino_train::runtime::peak_rss_bytes() else {
        return (String::new(), None);
    };
    let who = if dino_core::collective::world_size() > 1 {
        " (rank 0)"
    } else {
        ""
    };
    let line = format!(
        ", peak memory {:.1} GiB{}{who}",
        dino_train::runtime::gib(peak),
        estimate
            .map(|e| format!(" ({:.1} estimated)", dino_train::runtime::gib(e)))
            .unwrap_or_default()
    );
    let advice = dino_train::runtime::total_memory_bytes()
        .and_then(|total| dino_train::runtime::memory_advice(peak, total, cfg));
    (line, advice)
}

/// Whether this process is rank 0 (always, outside mpirun): the one that prints results and writes files.
fn main_rank() -> bool {
    dino_core::collective::rank() == 0
}

// ------------------------------------------------------------------------------------------------ data

/// Flags naming the labelled data of an evaluation. Without `--data-path`, a dino checkpoint's own training
/// data is used.
#[derive(Args, Debug, Clone, Default)]
pub struct DataArgs {
    /// Training split (k-NN bank / probe training set): an image folder or the folder of CIFAR / IDX files.
    #[arg(long)]
    pub data_path: Option<PathBuf>,
    /// What --data-path holds: folder, cifar10, cifar100, fashion-mnist, mnist, embedded. [folder]
    #[arg(long, value_parser = parse_dataset)]
    pub dataset: Option<DatasetKind>,
    /// Validation image folder (folder datasets; the CIFAR / IDX kinds use their test files).
    #[arg(long)]
    pub val_data_path: Option<PathBuf>,
    /// Images per forward pass. [128]
    #[arg(long)]
    pub batch_size: Option<usize>,
    /// Decoding threads. [2]
    #[arg(long)]
    pub num_workers: Option<usize>,
    /// Evaluation transform: resize of the shorter side. [256, or the checkpoint's]
    #[arg(long)]
    pub resize: Option<usize>,
    /// Evaluation transform: centre crop. [224, or the checkpoint's]
    #[arg(long)]
    pub crop: Option<usize>,
    /// Use at most this many training images (0: all).
    #[arg(long)]
    pub max_train: Option<usize>,
    /// Use at most this many validation images (0: all).
    #[arg(long)]
    pub max_val: Option<usize>,
}

impl DataArgs {
    /// The data configuration: the network's configuration with these flags on top.
    pub fn apply(&self, base: &TrainConfig) -> Result<TrainConfig> {
        let mut c = base.clone();
        if let Some(p) = &self.data_path {
            c.data_path = p.clone();
            c.dataset = self.dataset.unwrap_or(DatasetKind::Folder);
            c.val_data_path = None;
        } else if let Some(k) = self.dataset {
            c.dataset = k;
        }
        if let Some(v) = &self.val_data_path {
            c.val_data_path = Some(v.clone());
        }
        if let Some(b) = self.batch_size {
            c.eval_batch_size = b;
        }
        c.num_workers = self.num_workers.unwrap_or(2).max(1);
        if let Some(r) = self.resize {
            c.eval_resize = r;
        }
        if let Some(r) = self.crop {
            c.eval_crop = r;
        }
        for (flag, v) in [("--resize", c.eval_resize), ("--crop", c.eval_crop)] {
            if v == 0 {
                bail!("{flag} 0: must be positive");
            }
        }
        // A ViT needs one whole patch in the evaluated image; say so before any image is read.
        if c.arch_kind()?.is_vit() && c.eval_crop < c.patch_size {
            bail!(
                "--crop {}: smaller than the network's patch size {}",
                c.eval_crop,
                c.patch_size
            );
        }
        if let Some(n) = self.max_train {
            c.eval_max_train = n;
            c.max_train_images = n;
        }
        if let Some(n) = self.max_val {
            c.eval_max_val = n;
        }
        if c.dataset != DatasetKind::Embedded && !c.data_path.exists() {
            // `embedded` names a dataset kind, not a path (training's default `data_path`).
            let hint = if c.data_path == std::path::Path::new("embedded") {
                " (the embedded Fashion-MNIST subset: --dataset embedded)"
            } else {
                ""
            };
            bail!(
                "--data-path {}: no such file or directory{hint}",
                c.data_path.display()
            );
        }
        Ok(c)
    }
}

fn labelled_splits(cfg: &TrainConfig) -> Result<(Arc<dyn Dataset>, Arc<dyn Dataset>)> {
    let bank = dino_train::data::open_bank(cfg)?.with_context(|| {
        format!(
            "{}: the training split has no labels (k-NN and the linear probe need a labelled folder: one \
             sub-folder per class)",
            cfg.data_path.display()
        )
    })?;
    let val = dino_train::data::open_val(cfg)?.with_context(|| {
        format!(
            "{}: no validation split: pass --val-data-path (an image folder with one sub-folder per class)",
            cfg.data_path.display()
        )
    })?;
    if val.is_empty() || val.label(0).is_none() {
        bail!("the validation split ({}) has no labels", val.describe());
    }
    Ok((bank, val))
}

// ------------------------------------------------------------------------------------------------ features

fn features_to_tensors(f: &Features) -> Result<HashMap<String, Tensor>> {
    let mut m = HashMap::new();
    m.insert("features".to_string(), f.features.contiguous()?);
    // The dataset index of each row: unreadable images have no row.
    let at: Vec<i64> = f.indices.iter().map(|&i| i as i64).collect();
    m.insert(
        "indices".to_string(),
        Tensor::from_vec(at, f.indices.len(), f.features.device())?,
    );
    if let Some(l) = &f.labels {
        let v: Vec<i64> = l.iter().map(|&x| x as i64).collect();
        m.insert(
            "labels".to_string(),
            Tensor::from_vec(v, l.len(), f.features.device())?,
        );
    }
    Ok(m)
}

fn tensors_to_features(mut m: HashMap<String, Tensor>, path: &Path) -> Result<Features> {
    let features = m
        .remove("features")
        .with_context(|| format!("{}: no `features` tensor", path.display()))?;
    let as_usize = |t: Tensor| -> Result<Vec<usize>> {
        Ok(t.to_dtype(candle_core::DType::I64)?
            .to_vec1::<i64>()?
            .into_iter()
            .map(|x| x as usize)
            .collect())
    };
    let labels = m.remove("labels").map(as_usize).transpose()?;
    // Files written before the indices were stored have a row per sample.
    let indices = match m.remove("indices") {
        Some(t) => as_usize(t)?,
        None => (0..features.dim(0)?).collect(),
    };
    Ok(Features {
        features,
        labels,
        indices,
    })
}

/// The identity of a feature computation, stored beside cached features: same network file, same data, same
/// transform means the same features.
fn cache_key(
    loaded: &source::Loaded,
    file: &Path,
    cfg: &TrainConfig,
    ds: &dyn Dataset,
) -> Result<String> {
    let md = std::fs::metadata(file).with_context(|| format!("cannot stat {}", file.display()))?;
    let mtime = md
        .modified()
        .ok()
        .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
        .map(|d| d.as_nanos())
        .unwrap_or(0);
    let fp = dino_train::data::fingerprint(ds, &ds.describe())?;
    // v2: unreadable images are left out (v1 caches hold a stand-in row for each).
    Ok(format!(
        "v2 | {} | {} bytes | mtime {mtime} | data {} {} {} | resize {} crop {} | mean {:?} std {:?}",
        loaded.origin,
        md.len(),
        fp.description,
        fp.len,
        fp.hash,
        cfg.eval_resize,
        cfg.eval_crop,
        cfg.norm_mean,
        cfg.norm_std
    ))
}

/// Features of `ds` through `f`, read from `<dir>/<name>_features.safetensors` when its key matches, else
/// computed (and written there when a cache dir is given). Returns the features and whether they were cached.
fn cached_features(
    dir: Option<&Path>,
    name: &str,
    key: &str,
    compute: impl FnOnce() -> Result<Features>,
) -> Result<(Features, bool)> {
    let Some(dir) = dir else {
        return Ok((compute()?, false));
    };
    let feats = dir.join(format!("{name}_features.safetensors"));
    let keyf = dir.join(format!("{name}_features.key"));
    if feats.is_file() && std::fs::read_to_string(&keyf).is_ok_and(|k| k == key) {
        let m = candle_core::safetensors::load(&feats, &candle_core::Device::Cpu)
            .with_context(|| format!("cannot read cached features {}", feats.display()))?;
        return Ok((tensors_to_features(m, &feats)?, true));
    }
    let f = compute()?;
    if !main_rank() {
        // Every rank holds the gathered features; one writes them.
        return Ok((f, false));
    }
    std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    candle_core::safetensors::save(&features_to_tensors(&f)?, &feats)
        .with_context(|| format!("cannot write {}", feats.display()))?;
    std::fs::write(&keyf, key).with_context(|| format!("cannot write {}", keyf.display()))?;
    Ok((f, false))
}

// ------------------------------------------------------------------------------------------------ eval-knn

/// `dino eval-knn` flags.
#[derive(Args, Debug, Clone)]
pub struct EvalKnnArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    #[command(flatten)]
    pub data: DataArgs,
    /// Numbers of nearest neighbours. [10 20 100 200]
    #[arg(long, num_args = 1.., default_values_t = [10usize, 20, 100, 200])]
    pub nb_knn: Vec<usize>,
    /// Temperature of the votes exp(sim / T).
    #[arg(long, default_value_t = 0.07)]
    pub temperature: f64,
    /// Cache the features here (`{train,test}_features.safetensors`); a later run with the same network, data
    /// and transform reads them instead of recomputing.
    #[arg(long, visible_alias = "dump-features")]
    pub features_dir: Option<PathBuf>,
}

/// `dino eval-knn`: weighted k-NN of eval_knn.py on the teacher's (or student's) backbone features.
pub fn eval_knn(a: &EvalKnnArgs) -> Result<()> {
    if a.nb_knn.contains(&0) {
        bail!("--nb-knn: every k must be positive");
    }
    if !(a.temperature.is_finite() && a.temperature > 0.0) {
        bail!("--temperature {}: must be a positive number", a.temperature);
    }
    let loaded = source::load(&a.model, false)?;
    let file = source::resolve_file(&a.model.checkpoint, a.model.offline)?;
    let cfg = a.data.apply(&loaded.cfg)?;
    let (bank, val) = labelled_splits(&cfg)?;
    let transform = dino_train::data::eval_transform(&cfg)?;
    let backbone = loaded.net.backbone();
    let w = cfg.num_workers;
    let dir = a.features_dir.as_deref();
    let (train, c1) = cached_features(
        dir,
        "train",
        &cache_key(&loaded, &file, &cfg, bank.as_ref())?,
        || {
            Ok(eval::extract_over_ranks(bank.clone(), |part| {
                eval::extract_features(backbone, part, transform.clone(), cfg.eval_batch_size, w)
            })?)
        },
    )?;
    let (test, c2) = cached_features(
        dir,
        "test",
        &cache_key(&loaded, &file, &cfg, val.as_ref())?,
        || {
            Ok(eval::extract_over_ranks(val.clone(), |part| {
                eval::extract_features(backbone, part, transform.clone(), cfg.eval_batch_size, w)
            })?)
        },
    )?;
    if !main_rank() {
        // Under mpirun the ranks shared the extraction; rank 0 votes and reports.
        return Ok(());
    }
    println!(
        "features of {}: train {} x {}, test {} x {}{}",
        loaded.origin,
        train.len(),
        train.features.dim(1)?,
        test.len(),
        test.features.dim(1)?,
        if c1 && c2 { " (cached)" } else { "" }
    );
    for &k in &a.nb_knn {
        let r = eval::knn_eval(&train, &test, k, a.temperature)?;
        // knn_eval caps k at the bank's size: say so rather than print a k that did not run.
        let used = k.min(train.len());
        let capped = if used < k {
            format!(" (k = {k} capped at the bank's {used} images)")
        } else {
            String::new()
        };
        println!(
            "{used}-NN classifier result{capped}: top1 {:.2}%, top5 {:.2}%",
            r.top1, r.top5
        );
    }
    Ok(())
}

// ------------------------------------------------------------------------------------------------ eval-linear

/// `dino eval-linear` flags (eval_linear.py's protocol on features extracted once).
#[derive(Args, Debug, Clone)]
pub struct EvalLinearArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    #[command(flatten)]
    pub data: DataArgs,
    /// Concatenate the CLS tokens of the last n blocks (ViT). [4]
    #[arg(long, default_value_t = 4)]
    pub n_last_blocks: usize,
    /// Interleave the CLS token with the average-pooled patch tokens (official: with --n-last-blocks 1).
    #[arg(long, default_value = "false", value_parser = parse_bool, action = ArgAction::Set)]
    pub avgpool_patchtokens: bool,
    /// Epochs of the linear classifier. [100]
    #[arg(long, default_value_t = 100)]
    pub epochs: usize,
    /// Learning rate for a batch of 256 (scaled linearly). [0.001]
    #[arg(long, default_value_t = 0.001)]
    pub lr: f64,
    /// Batch size of the classifier's SGD. [128]
    #[arg(long, default_value_t = 128)]
    pub probe_batch_size: usize,
    /// Seed of the classifier's initialisation and shuffling. [0]
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
}

/// `dino eval-linear`: a linear classifier on frozen features, best top-1 over the epochs.
pub fn eval_linear(a: &EvalLinearArgs) -> Result<()> {
    let pc = eval::LinearProbeConfig {
        epochs: a.epochs,
        lr: a.lr,
        batch_size: a.probe_batch_size,
        n_last_blocks: a.n_last_blocks,
        avgpool_patchtokens: a.avgpool_patchtokens,
        seed: a.seed,
    };
    // Before any feature is extracted; the error names the flag.
    match pc.validate() {
        Ok(()) => {}
        Err(dino_train::Error::Config { key, value, reason }) => {
            let flag = match key.as_str() {
                "batch_size" => "probe-batch-size".to_string(),
                k => k.replace('_', "-"),
            };
            bail!("--{flag} {value}: {reason}");
        }
        Err(e) => return Err(e.into()),
    }
    let loaded = source::load(&a.model, false)?;
    let cfg = a.data.apply(&loaded.cfg)?;
    let (bank, val) = labelled_splits(&cfg)?;
    let transform = dino_train::data::eval_transform(&cfg)?;
    let (bs, w) = (cfg.eval_batch_size, cfg.num_workers);
    let (train, test) = match &loaded.net {
        Net::Vit(vit) => {
            let depth = vit.config().depth;
            if a.n_last_blocks > depth {
                bail!(
                    "--n-last-blocks {}: the network has {depth} blocks",
                    a.n_last_blocks
                );
            }
            let features = |ds| {
                eval::extract_over_ranks(ds, |part| {
                    let (n, avg) = (a.n_last_blocks, a.avgpool_patchtokens);
                    eval::extract_linear_features(vit, part, transform.clone(), bs, w, n, avg)
                })
            };
            (features(bank)?, features(val)?)
        }
        Net::Other(b) => {
            let features = |ds| {
                eval::extract_over_ranks(ds, |part| {
                    eval::extract_features(b.as_ref(), part, transform.clone(), bs, w)
                })
            };
            (features(bank)?, features(val)?)
        }
    };
    if !main_rank() {
        // The ranks shared the extraction; the probe trains on rank 0.
        return Ok(());
    }
    let r = eval::linear_probe(&train, &test, &pc)?;
    println!(
        "linear probe on {} features of {} (train {}, val {}), {} epochs",
        train.features.dim(1)?,
        loaded.origin,
        train.len(),
        test.len(),
        a.epochs
    );
    println!(
        "best top1 {:.2}%, top5 {:.2}% (epoch {}); last epoch top1 {:.2}%",
        r.best_top1,
        r.best_top5,
        r.best_epoch + 1,
        r.top1_per_epoch.last().copied().unwrap_or(f64::NAN)
    );
    Ok(())
}

// ------------------------------------------------------------------------------------------------ extract

/// Which split `extract` reads.
#[derive(ValueEnum, Debug, Clone, Copy, PartialEq, Eq)]
pub enum Split {
    /// The training data (--data-path).
    Train,
    /// The validation / test split.
    Test,
}

/// `dino extract` flags.
#[derive(Args, Debug, Clone)]
pub struct ExtractArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    #[command(flatten)]
    pub data: DataArgs,
    /// Which split.
    #[arg(long, value_enum, default_value = "train")]
    pub split: Split,
    /// Output safetensors file: `features` (N, D) f32 and, for labelled data, `labels` (N) i64, in dataset order.
    #[arg(long, short)]
    pub output: PathBuf,
    /// l2-normalise each feature (as eval_knn.py's dumped features).
    #[arg(long)]
    pub l2_normalize: bool,
}

/// `dino extract`: backbone features of a dataset to safetensors.
pub fn extract(a: &ExtractArgs) -> Result<()> {
    let loaded = source::load(&a.model, false)?;
    let cfg = a.data.apply(&loaded.cfg)?;
    let ds = match a.split {
        Split::Train => dino_train::data::open_train(&cfg)?,
        Split::Test => dino_train::data::open_val(&cfg)?.with_context(|| {
            format!(
                "{}: no test split: pass --val-data-path for an image folder",
                cfg.data_path.display()
            )
        })?,
    };
    let transform = dino_train::data::eval_transform(&cfg)?;
    let mut f = eval::extract_over_ranks(ds.clone(), |part| {
        eval::extract_features(
            loaded.net.backbone(),
            part,
            transform,
            cfg.eval_batch_size,
            cfg.num_workers,
        )
    })?;
    if !main_rank() {
        // The ranks shared the extraction; rank 0 writes the file.
        return Ok(());
    }
    if a.l2_normalize {
        f.features = dino_core::l2_normalize(&f.features)?;
    }
    if let Some(parent) = a.output.parent().filter(|p| !p.as_os_str().is_empty()) {
        std::fs::create_dir_all(parent)
            .with_context(|| format!("cannot create {}", parent.display()))?;
    }
    candle_core::safetensors::save(&features_to_tensors(&f)?, &a.output)
        .with_context(|| format!("cannot write {}", a.output.display()))?;
    println!(
        "wrote {} features of dimension {} ({}) to {}{}",
        f.len(),
        f.features.dim(1)?,
        ds.describe(),
        a.output.display(),
        match ds.len() - f.len() {
            0 => String::new(),
            k => format!(
                " ({k} unreadable image{} left out; `indices` gives each row's image)",
                if k == 1 { "" } else { "s" }
            ),
        }
    );
    Ok(())
}

// ------------------------------------------------------------------------------------------------ attention

/// `dino attention` flags (visualize_attention.py).
#[derive(Args, Debug, Clone)]
pub struct AttentionArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    /// An image file, or a folder: every image in it (each gets its own sub-folder of the output).
    #[arg(long, visible_alias = "image-path")]
    pub image: PathBuf,
    /// Resize the image to H W before the network (official: 480 480). The result is cropped to a multiple of
    /// the patch size.
    #[arg(long, num_args = 2, value_names = ["H", "W"], default_values_t = [480usize, 480])]
    pub image_size: Vec<usize>,
    /// Keep the smallest set of patches holding this fraction of each head's attention mass (paper: 0.6) and
    /// write mask overlays.
    #[arg(long)]
    pub threshold: Option<f32>,
    /// Where the PNGs go.
    #[arg(long, default_value = ".")]
    pub output_dir: PathBuf,
    /// Also draw every image and its heads' maps on one PNG at this path (at most the first 32 images of a
    /// folder), as `dino train` does with 8 of its own images.
    #[arg(long)]
    pub sheet: Option<PathBuf>,
}

/// Images on a `dino attention --sheet`.
const SHEET_MAX_IMAGES: usize = 32;

fn image_files(p: &Path) -> Result<Vec<PathBuf>> {
    if !p.exists() {
        bail!("--image {}: no such file or directory", p.display());
    }
    if p.is_file() {
        return Ok(vec![p.to_path_buf()]);
    }
    let mut v: Vec<PathBuf> = std::fs::read_dir(p)
        .with_context(|| format!("cannot read {}", p.display()))?
        .flatten()
        .map(|e| e.path())
        .filter(|f| f.is_file() && dino_data::folder::has_image_extension(f))
        .collect();
    v.sort();
    if v.is_empty() {
        bail!("--image {}: the folder holds no image files", p.display());
    }
    Ok(v)
}

/// `dino attention`: per-head CLS attention maps of the last block, and threshold overlays.
pub fn attention(a: &AttentionArgs) -> Result<()> {
    if let Some(t) = a.threshold {
        if !(t > 0.0 && t <= 1.0) {
            bail!("--threshold {t}: must lie in (0, 1]");
        }
    }
    let (h0, w0) = (a.image_size[0], a.image_size[1]);
    let loaded = source::load(&a.model, false)?;
    let Net::Vit(vit) = &loaded.net else {
        bail!(
            "attention maps need a ViT; {} is a {}",
            loaded.origin,
            loaded.cfg.arch
        );
    };
    let p = vit.config().patch_size;
    if h0 < p || w0 < p {
        bail!("--image-size {h0} {w0}: smaller than the patch size {p}");
    }
    let files = image_files(&a.image)?;
    let normalize = dino_data::pil::Normalize::new(loaded.cfg.norm_mean, loaded.cfg.norm_std)?;
    // Under mpirun each rank draws every `world`-th image (each has its own output folder); rank 0 also
    // computes the sheet's images.
    let (rank, world) = (
        dino_core::collective::rank(),
        dino_core::collective::world_size(),
    );
    if let Some(dir) = a.sheet.as_deref().and_then(Path::parent) {
        if rank == 0 && !dir.as_os_str().is_empty() {
            std::fs::create_dir_all(dir)
                .with_context(|| format!("--sheet: cannot create {}", dir.display()))?;
        }
    }
    let sheet_n = match &a.sheet {
        Some(_) if rank == 0 => files.len().min(SHEET_MAX_IMAGES),
        _ => 0,
    };
    let mut rows = Vec::new();
    let mut skipped = 0usize;
    for (i, file) in files.iter().enumerate() {
        let mine = i % world == rank;
        if !mine && i >= sheet_n {
            continue;
        }
        let out = if files.len() == 1 {
            a.output_dir.clone()
        } else {
            a.output_dir.join(
                file.file_stem()
                    .map(|s| s.to_string_lossy().into_owned())
                    .unwrap_or_default(),
            )
        };
        // A folder's unreadable image is skipped and counted (a single --image file is an error).
        let img = match dino_data::folder::load_rgb(file) {
            Ok(img) => img,
            Err(e) if files.len() > 1 => {
                if mine {
                    eprintln!(
                        "warning: skipped: {}",
                        dino_train::error::one_line_report(&e)
                    );
                    skipped += 1;
                }
                continue;
            }
            Err(e) => return Err(e.into()),
        };
        let resized = dino_data::pil::resize(&img, w0, h0)?;
        // Crop to a multiple of the patch size (top-left, as the official script).
        let (w, h) = (w0 - w0 % p, h0 - h0 % p);
        let img = image::imageops::crop_imm(&resized, 0, 0, w as u32, h as u32).to_image();
        let x = Tensor::from_vec(normalize.apply(img.as_raw()), (1, 3, h, w), vit.device())?;
        // The CLS query's attention over the patches (registers left out): (1, heads, h / p, w / p).
        let cls = dino_models::Backbone::cls_attention(vit.as_ref(), &x)?
            .context("the ViT gave no attention maps")?;
        let (_, heads, gh, gw) = cls.dims4()?;
        let data: Vec<f32> = cls.flatten_all()?.to_vec1()?;
        let maps = HeadMaps {
            heads,
            h: gh,
            w: gw,
            data,
        };
        if i < sheet_n {
            rows.push(attention::SheetRow {
                image: img.clone(),
                maps: maps.clone(),
                label: file
                    .file_name()
                    .map(|f| f.to_string_lossy().into_owned())
                    .unwrap_or_default(),
            });
        }
        if !mine {
            continue;
        }
        std::fs::create_dir_all(&out)
            .with_context(|| format!("cannot create {}", out.display()))?;
        img.save(out.join("img.png"))
            .with_context(|| format!("cannot write {}", out.join("img.png").display()))?;
        for j in 0..heads {
            let up = attention::upsample_nearest(maps.head(j), gh, gw, p);
            let f = out.join(format!("attn-head{j}.png"));
            attention::colormap_image(&up, h, w)
                .save(&f)
                .with_context(|| format!("cannot write {}", f.display()))?;
        }
        if let Some(t) = a.threshold {
            let masks = attention::threshold_masks(&maps, t);
            for j in 0..heads {
                let m = &masks[j * gh * gw..(j + 1) * gh * gw];
                let up = attention::upsample_nearest(m, gh, gw, p);
                let f = out.join(format!("mask_th{t}_head{j}.png"));
                attention::overlay_mask(&img, &up, attention::head_color(j))
                    .save(&f)
                    .with_context(|| format!("cannot write {}", f.display()))?;
            }
        }
        println!(
            "{}: {heads} heads on a {gh}x{gw} grid -> {}",
            file.display(),
            out.display()
        );
    }
    let skipped = dino_core::collective::all_reduce_count(skipped)?;
    if skipped == files.len() {
        bail!(
            "--image {}: none of its {} images could be read",
            a.image.display(),
            files.len()
        );
    }
    if skipped > 0 && rank == 0 {
        eprintln!("{skipped} of {} images unreadable, skipped", files.len());
    }
    if let (Some(path), false) = (&a.sheet, rows.is_empty()) {
        let title = format!("Last-block attention: {}", loaded.origin);
        let mut subtitle = vec![format!(
            "{} image{} of {}{}, at {h0} x {w0} px (cropped to a multiple of the patch size {p})",
            rows.len(),
            if rows.len() == 1 { "" } else { "s" },
            a.image.display(),
            if files.len() > sheet_n {
                format!(" (from its first {sheet_n} of {})", files.len())
            } else {
                String::new()
            }
        )];
        subtitle.push(
            "the CLS query's attention over the patches, per head; each map min-max normalised (viridis: \
             dark = least, yellow = most)"
                .into(),
        );
        attention::save_sheet(path, &title, &subtitle, &rows)?;
        println!(
            "sheet of {} image{} -> {}",
            rows.len(),
            if rows.len() == 1 { "" } else { "s" },
            path.display()
        );
    }
    Ok(())
}

// ------------------------------------------------------------------------------------------------ export

/// What `export` writes.
#[derive(ValueEnum, Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExportPart {
    /// The backbone with the `*_pretrain.pth` names (`cls_token`, `blocks.0.attn.qkv.weight`, ...).
    Backbone,
    /// The DINO head (`mlp.0.weight`, `last_layer.weight_g`, ...).
    Head,
    /// Backbone and head (`backbone.*`, `head.*`), the official teacher layout.
    Full,
}

/// `dino export` flags.
#[derive(Args, Debug, Clone)]
pub struct ExportArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    /// Output safetensors file.
    #[arg(long, short)]
    pub output: PathBuf,
    /// What to write.
    #[arg(long, value_enum, default_value = "backbone")]
    pub part: ExportPart,
}

/// `dino plot`: the PNG plots of a training output dir, drawn from its log.
pub fn plot(dir: &Path) -> Result<()> {
    let log = dir.join(dino_train::log::LOG_FILE);
    if !log.is_file() {
        bail!(
            "{}: no {} there; give the --output-dir of a training run",
            dir.display(),
            dino_train::log::LOG_FILE
        );
    }
    let paths = dino_train::plot::write_plots(dir)?;
    println!(
        "{} plots in {} (open summary.png first)",
        paths.len(),
        dir.join("plots").display()
    );
    // The attention sheet too, from the latest checkpoint: for a run still going, where the teacher looks now.
    match redraw_attention(dir) {
        Ok(Some(p)) => println!("attention sheet: {}", p.display()),
        Ok(None) => {}
        Err(e) => eprintln!(
            "warning: {} not redrawn: {e:#}",
            dir.join("plots").join("attention.png").display()
        ),
    }
    Ok(())
}

/// `dino plot`'s `plots/attention.png`: the teacher of `dir`'s latest checkpoint on the images `dino train`
/// draws its sheet from. `Ok(None)` without a checkpoint or for a ResNet.
fn redraw_attention(dir: &Path) -> Result<Option<PathBuf>> {
    if dino_train::checkpoint::find_latest(dir).is_none() {
        return Ok(None);
    }
    let args = ModelArgs {
        checkpoint: dir.to_string_lossy().into_owned(),
        checkpoint_key: "teacher".into(),
        arch: None,
        patch_size: None,
        offline: true,
        device: dino_train::DeviceSpec::Cpu,
    };
    let loaded = source::load(&args, false)?;
    if !matches!(loaded.net, Net::Vit(_)) {
        return Ok(None);
    }
    let cfg = &loaded.cfg;
    let sheet = dino_train::attention::write_sheet(
        cfg,
        loaded.net.backbone(),
        dino_train::attention::sheet_dataset(cfg)?,
        &dir.join("plots").join("attention.png"),
        &dino_train::attention::sheet_title(cfg, loaded.global_iteration.unwrap_or(0)),
    )?;
    Ok(sheet.map(|s| s.path))
}

/// `dino export`: official-named safetensors, loadable strictly by PyTorch.
pub fn export(a: &ExportArgs) -> Result<()> {
    let with_head = a.part != ExportPart::Backbone;
    let loaded = source::load(&a.model, with_head)?;
    let prefix = match a.part {
        ExportPart::Backbone => "backbone.",
        ExportPart::Head => "head.",
        ExportPart::Full => "",
    };
    if let Some(parent) = a.output.parent().filter(|p| !p.as_os_str().is_empty()) {
        std::fs::create_dir_all(parent)
            .with_context(|| format!("cannot create {}", parent.display()))?;
    }
    let n = dino_models::weights::export_varmap(&loaded.varmap, &a.output, prefix)?;
    println!(
        "wrote {n} tensors of {} ({}) with the official names to {}",
        loaded.origin,
        match a.part {
            ExportPart::Backbone => "backbone",
            ExportPart::Head => "head",
            ExportPart::Full => "backbone + head",
        },
        a.output.display()
    );
    Ok(())
}
