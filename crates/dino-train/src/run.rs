//! A whole training run: data, loader, [`Trainer`], checkpoints (every epoch, every `saveckp_freq` epochs
//! under their own name, and every `ckpt_every_iters` iterations inside an epoch), exact resume from the
//! output directory, JSON-lines log, progress display, periodic and final k-NN, and PNG plots at the end.
//!
//! Exact resume: the checkpoint holds every tensor of the state (student, teacher, AdamW moments and
//! per-parameter steps, centre) and the global iteration; the schedules are recomputed from the config and
//! every random draw depends only on `(seed, epoch, sample)` (shuffle, augmentation) or `(seed, global
//! iteration)` (drop path), so a resumed run computes exactly what the uninterrupted run computes.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Instant;

use dino_core::KnnResult;
use dino_data::dataset::Dataset;
use dino_data::loader::{LoaderConfig, MultiCropLoader};
use dino_data::Transform;
use dino_models::Backbone;

use crate::checkpoint::{
    self, Accuracy, CheckpointMeta, Compute, EpochSums, Extension, KnnBaselines, RngState,
    Versions, LATEST,
};
use crate::config::TrainConfig;
use crate::data;
use crate::error::{Error, Result};
use crate::eval::{extract_features, knn_eval, Features};
use crate::lock::{LockHolder, RunLock, LOCK_FILE};
use crate::log::{
    read_log, EpochRecord, ExtendRecord, JsonLog, KnnFinalRecord, Progress, StepRecord,
};
use crate::model::DinoNetwork;
pub use crate::plot::write_plots;
use crate::tensorboard::EventWriter;
use crate::trainer::Trainer;
use dino_models::MatmulPrecision;

/// How to run (things that do not change the result, so they are not part of the config).
#[derive(Debug, Clone, PartialEq)]
pub struct TrainOptions {
    /// Continue from `<output_dir>/checkpoint.safetensors` when it exists. Default true.
    pub resume: bool,
    /// Show progress on stderr (a bar on a terminal, plain lines otherwise). Default true.
    pub progress: bool,
    /// Write PNG plots of the curves at the end. Default true.
    pub plots: bool,
    /// Return (as if killed, without writing anything more) once this many global iterations are complete.
    /// For tests of interruption and resume. Default none.
    pub stop_after_iterations: Option<usize>,
    /// Allow the checkpoint's run to be lengthened to `epochs` (see [`TrainConfig::extension_of`]). Default
    /// false: any changed key is refused.
    pub extend: bool,
    /// Write the log's numbers as TensorBoard scalars under `<output_dir>/tensorboard`. Default true.
    pub tensorboard: bool,
    /// Show the final k-NN comparison (trained teacher, random initialisation, raw pixels) with the progress
    /// lines. Default true; the `dino` binary turns it off and prints the same figures on stdout.
    pub report_knn_final: bool,
}

impl Default for TrainOptions {
    fn default() -> Self {
        Self {
            resume: true,
            progress: true,
            plots: true,
            stop_after_iterations: None,
            extend: false,
            tensorboard: true,
            report_knn_final: true,
        }
    }
}

/// What a run did.
#[derive(Debug, Clone)]
pub struct TrainSummary {
    /// The output directory.
    pub output_dir: PathBuf,
    /// Global iterations complete at the end of this call.
    pub global_iteration: usize,
    /// Iterations per epoch.
    pub niter_per_ep: usize,
    /// Global iteration this call resumed from (None for a fresh start).
    pub resumed_from: Option<usize>,
    /// Whether the run stopped early (`stop_after_iterations`, or a stop request: see `stopped_by`).
    pub interrupted: bool,
    /// The signal whose stop request ended the run early ([`crate::signals`]), after writing a checkpoint
    /// at `global_iteration`.
    pub stopped_by: Option<i32>,
    /// Loss of the last iteration run by this call (NaN if none).
    pub last_loss: f64,
    /// Mean loss of the first epoch this call ran and of the last one (NaN if none).
    pub first_epoch_loss: f64,
    /// Mean loss of the last epoch this call ran.
    pub last_epoch_loss: f64,
    /// k-NN of the teacher backbone after training (when evaluated).
    pub knn_final: Option<KnnResult>,
    /// k-NN of the same network at random initialisation (when `eval_final`).
    pub knn_init: Option<KnnResult>,
    /// k-NN of the evaluation transform's raw pixels (when `eval_final`; see [`crate::eval::extract_pixels`]).
    pub knn_pixels: Option<KnnResult>,
    /// Seconds spent in this call.
    pub seconds: f64,
    /// The rolling checkpoint.
    pub checkpoint: PathBuf,
    /// PNG plots written.
    pub plots: Vec<PathBuf>,
    /// The holder of a stale output-directory lock this run took over (see [`crate::lock`]).
    pub took_over_lock: Option<LockHolder>,
    /// The run was lengthened by this call (`TrainOptions::extend`): from how many epochs.
    pub extended_from_epochs: Option<usize>,
    /// What this process computes with ([`Compute`], recorded in its checkpoints).
    pub compute: Compute,
    /// Resumed from a checkpoint written on other compute: the differences (`key: old -> new`, see
    /// [`Compute::changes_to`]), also said on the console; the steps from here may round differently from
    /// the uninterrupted run's.
    pub resumed_on_other_compute: Vec<String>,
    /// How many of the two k-NN baselines (random initialisation, raw pixels) this process took from the
    /// checkpoint it resumed instead of measuring them again.
    pub knn_baselines_recorded: usize,
    /// After this process's first step, its peak memory was near the machine's and the note saying so
    /// ([`crate::runtime::memory_advice`]) was printed.
    pub memory_noted: bool,
    /// This process's peak resident memory as estimated before its first step ([`crate::memory`]; rank 0,
    /// on the CPU with [`TensorAlloc`](crate::runtime::TensorAlloc) as the global allocator).
    pub memory_estimate: Option<u64>,
}

/// This process's peak resident memory in the coming steps, estimated by probing the student
/// ([`crate::memory::StepMemory`]), with a warning on `progress` when `ranks_here` such processes will not
/// fit in the memory this machine has available. `None` where the probe does not run (another device,
/// another global allocator) or fails (the step then says why).
fn memory_estimate(
    trainer: &Trainer,
    local_batch: usize,
    ranks_here: usize,
    progress: &mut Progress,
) -> Option<u64> {
    let mem = crate::memory::StepMemory::probe(trainer).ok()??;
    let cfg = &trainer.cfg;
    let passes = cfg.student_passes.resolve(cfg.use_bn_in_head);
    if let Some(available) = crate::runtime::available_memory_bytes() {
        let smaller = cfg.smaller_student_passes();
        if let Some(w) = crate::memory::shortage_warning(
            &mem,
            passes,
            smaller,
            local_batch,
            ranks_here,
            available,
        ) {
            progress.warn(&w);
        }
    }
    Some(crate::runtime::rss_bytes()? + mem.resident_growth(passes, local_batch))
}

/// Everything the k-NN evaluation needs, opened once.
struct KnnSetup {
    bank: Arc<dyn Dataset>,
    val: Arc<dyn Dataset>,
    transform: Arc<dyn Transform>,
}

impl KnnSetup {
    fn open(cfg: &TrainConfig) -> Result<Option<Self>> {
        let (Some(bank), Some(val)) = (data::open_bank(cfg)?, data::open_val(cfg)?) else {
            return Ok(None);
        };
        if val.is_empty() || val.label(0).is_none() {
            return Ok(None);
        }
        Ok(Some(Self {
            bank,
            val,
            transform: data::eval_transform(cfg)?,
        }))
    }

    /// What the baselines depend on beyond the configuration a resume checks: the bank's and the validation
    /// split's identity ([`data::fingerprint`]) and the evaluation keys a resume may change.
    fn baseline_key(&self, cfg: &TrainConfig) -> Result<String> {
        let id = |ds: &Arc<dyn Dataset>| -> Result<String> {
            let f = data::fingerprint(ds.as_ref(), &ds.describe())?;
            Ok(format!("{} ({} images, {})", f.description, f.len, f.hash))
        };
        Ok(format!(
            "bank {}; val {}; knn_k {}, knn_temperature {}, eval_resize {}, eval_crop {}",
            id(&self.bank)?,
            id(&self.val)?,
            cfg.knn_k,
            cfg.knn_temperature,
            cfg.eval_resize,
            cfg.eval_crop
        ))
    }

    /// The raw-pixel baseline ([`crate::eval::extract_pixels`] of the bank and the queries, then the same
    /// k-NN as the features). Every rank computes it whole (no model, no gather).
    fn pixels(&self, cfg: &TrainConfig) -> Result<KnnResult> {
        let w = cfg.num_workers.max(1);
        let px = |ds: &Arc<dyn Dataset>| {
            crate::eval::extract_pixels(
                ds.clone(),
                self.transform.clone(),
                cfg.norm_mean,
                cfg.norm_std,
                cfg.eval_batch_size,
                w,
            )
        };
        knn_eval(
            &px(&self.bank)?,
            &px(&self.val)?,
            cfg.knn_k,
            cfg.knn_temperature,
        )
    }

    fn run(&self, cfg: &TrainConfig, backbone: &dyn Backbone) -> Result<KnnResult> {
        let train = self.features(cfg, backbone, &self.bank)?;
        let test = self.features(cfg, backbone, &self.val)?;
        knn_eval(&train, &test, cfg.knn_k, cfg.knn_temperature)
    }

    /// The baseline of the same network at random initialisation (the seeded init is deterministic).
    fn run_init(&self, cfg: &TrainConfig, device: &candle_core::Device) -> Result<KnnResult> {
        let net = DinoNetwork::new(cfg, cfg.seed, 0.0, device)?;
        self.run(cfg, net.model.backbone.as_ref())
    }

    /// The features of `ds`; under data parallelism each rank extracts every `world`-th image and the
    /// features are gathered over the ranks (as the official `eval_knn` does), in dataset order on every rank.
    fn features(
        &self,
        cfg: &TrainConfig,
        backbone: &dyn Backbone,
        ds: &Arc<dyn Dataset>,
    ) -> Result<Features> {
        crate::eval::extract_over_ranks(ds.clone(), |part| {
            extract_features(
                backbone,
                part,
                self.transform.clone(),
                cfg.eval_batch_size,
                cfg.num_workers.max(1),
            )
        })
    }
}

/// What every checkpoint of a run records besides its state: the data's identity and the run's extensions.
struct RunIdentity {
    fingerprint: checkpoint::DatasetFingerprint,
    extensions: Vec<Extension>,
    compute: Compute,
    baselines: Option<KnnBaselines>,
}

/// What this process computes `cfg`'s steps with on `device`, as one of `ranks` ranks (call it after the
/// kernel path is set).
fn compute_of(cfg: &TrainConfig, device: &candle_core::Device, ranks: usize) -> Compute {
    let cpu = dino_kernels::cpu::CpuInfo::detect();
    let kernels = dino_models::kernel_path();
    let dtype = match cfg.matmul_precision {
        MatmulPrecision::Highest => "f32",
        MatmulPrecision::Bf16 => "bf16",
    };
    let products = if !device.is_cpu() {
        format!(
            "{dtype}: candle matmul on {}",
            crate::device::describe(device)
        )
    } else if kernels == dino_models::KernelPath::Portable {
        format!("{dtype}: candle matmul (portable path)")
    } else {
        // Not `gemm_path`: its measured rates differ between processes on one CPU.
        dino_kernels::cpu::gemm_kernel(cfg.matmul_precision)
    };
    Compute {
        device: crate::device::describe(device),
        cpu: cpu.name().unwrap_or_default(),
        cpu_flags: cpu.flags.iter().map(|f| f.to_string()).collect(),
        products,
        kernels: kernels.to_string(),
        threads: rayon::current_num_threads(),
        ranks,
    }
}

fn save_checkpoint(
    trainer: &Trainer,
    cfg: &TrainConfig,
    stems: &[String],
    global_iteration: usize,
    last_loss: f64,
    ident: &RunIdentity,
    epoch_sums: Option<EpochSums>,
) -> Result<()> {
    let niter = trainer.niter_per_ep;
    let meta = CheckpointMeta {
        epoch: global_iteration / niter,
        global_iteration,
        niter_per_ep: niter,
        last_loss,
        config: cfg.clone(),
        rng: RngState {
            seed: cfg.seed,
            next_global_iteration: global_iteration,
            next_epoch: global_iteration / niter,
            next_iteration: global_iteration % niter,
            scheme: "shuffle: epoch_permutation(seed, epoch); augmentation: sample_rng(seed, epoch, sample); drop \
                     path: ChaCha8(drop_path_seed(seed, global_iteration))"
                .into(),
        },
        dataset: ident.fingerprint.clone(),
        versions: Versions::default(),
        extensions: ident.extensions.clone(),
        epoch_sums,
        compute: Some(ident.compute.clone()),
        knn_baselines: ident.baselines.clone(),
    };
    let tensors = trainer.state_tensors()?;
    for stem in stems {
        checkpoint::save(&cfg.output_dir, stem, &tensors, &meta)?;
    }
    Ok(())
}

/// The records of the log at `path` that the run resuming at global iteration `start_g` keeps (the last line
/// per step and per epoch, before the resume point; the final k-NN only when the run is complete), as JSON.
fn log_history(
    path: &std::path::Path,
    start_g: usize,
    niter: usize,
    total: usize,
) -> Result<Vec<serde_json::Value>> {
    if start_g == 0 || !path.is_file() {
        return Ok(Vec::new());
    }
    let r = read_log(path)?;
    let json = |v: serde_json::Result<serde_json::Value>| {
        v.map_err(|source| Error::Json {
            path: path.to_path_buf(),
            source,
        })
    };
    let mut out = Vec::new();
    for s in r.steps.iter().filter(|s| s.global_iteration < start_g) {
        out.push(json(serde_json::to_value(s))?);
    }
    for e in r.epochs.iter().filter(|e| (e.epoch + 1) * niter <= start_g) {
        out.push(json(serde_json::to_value(e))?);
    }
    if let Some(k) = r.knn_final.as_ref().filter(|_| start_g >= total) {
        out.push(json(serde_json::to_value(k))?);
    }
    Ok(out)
}

/// Train as `cfg` says, resuming from the output directory when a checkpoint is there (`opts.resume`).
pub fn train(cfg: &TrainConfig, opts: &TrainOptions) -> Result<TrainSummary> {
    let t0 = Instant::now();
    cfg.validate()?;
    if cfg.matmul_precision == MatmulPrecision::Bf16 && !MatmulPrecision::bf16_supported() {
        match dino_kernels::bf16::dp_speedup() {
            Some(r) if dino_kernels::bf16::bf16_gemm() == dino_kernels::bf16::Bf16Gemm::Auto => {
                tracing::warn!(
                    "matmul_precision = bf16: this CPU runs bf16 products (vdpbf16ps) at {r:.2}x its f32 rate, so \
                     they run in f32 (same results as highest, faster here); DINO_BF16_GEMM=dpbf16 forces bf16"
                )
            }
            Some(_) if dino_kernels::bf16::bf16_gemm() == dino_kernels::bf16::Bf16Gemm::Amx => tracing::warn!(
                "matmul_precision = bf16: DINO_BF16_GEMM=amx, but this CPU (or its OS) offers no AMX tiles, so the \
                 products run in f32 (same results as highest)"
            ),
            Some(_) => tracing::warn!(
                "matmul_precision = bf16: DINO_BF16_GEMM=f32, so the products run in f32 (same results as highest)"
            ),
            None => tracing::warn!(
                "matmul_precision = bf16: this CPU has no AVX-512 BF16, so the products run in f32 (same results \
                 as highest)"
            ),
        }
    }
    let out = cfg.output_dir.clone();
    let coll = dino_core::collective::current();
    let (rank, world) = (coll.rank(), coll.world_size());
    let main = rank == 0;
    if world > 1 {
        check_same_config(coll.as_ref(), cfg)?;
    }
    if !cfg.batch_size.is_multiple_of(world) {
        return Err(Error::config(
            "batch_size",
            cfg.batch_size,
            format!(
                "the global batch must split evenly over {world} ranks (use --batch-size-per-gpu, or a multiple \
                 of {world})"
            ),
        ));
    }
    let local_batch = cfg.batch_size / world;
    // The device first: a run that cannot have it leaves nothing behind. Several ranks on a node each take
    // their own GPU, and the ranks agree on where they compute before NCCL (if built) joins their GPUs.
    let device = cfg
        .device
        .resolve_for_rank("--device", coll.local_rank(), coll.local_size())?;
    if world > 1 {
        let mut on_gpu = [f64::from(u8::from(!device.is_cpu()))];
        coll.all_reduce_sum_f64(&mut on_gpu)?;
        if on_gpu[0] != 0.0 && on_gpu[0] != world as f64 {
            return Err(Error::Msg(format!(
                "--device {}: {} of {world} ranks found a GPU, the others compute on the CPU; give every \
                 rank a GPU or use --device cpu",
                cfg.device, on_gpu[0]
            )));
        }
    }
    let engine = crate::dist::use_device(&device)?;
    // One run per output directory: rank 0 writes it, so rank 0 holds its lock (a refusal there ends the job).
    let run_lock = if main {
        std::fs::create_dir_all(&out).map_err(|e| Error::io(&out, e))?;
        Some(RunLock::acquire(&out)?)
    } else {
        None
    };
    if cfg.kernels == dino_models::KernelPath::Portable {
        dino_models::set_kernel_path(dino_models::KernelPath::Portable);
    }
    let compute = compute_of(cfg, &device, world);
    let ranks_computing_otherwise = if world > 1 {
        compare_compute(coll.as_ref(), &compute)?
    } else {
        0
    };

    let train_ds = data::open_train(cfg)?;
    let description = data::describe(cfg, train_ds.as_ref());
    let niter = train_ds.len() / cfg.batch_size;
    if niter == 0 {
        return Err(Error::DatasetTooSmall {
            what: description,
            len: train_ds.len(),
            batch_size: cfg.batch_size,
        });
    }
    let fingerprint = data::fingerprint(train_ds.as_ref(), &description)?;
    let mut trainer = Trainer::new(cfg, niter, &device)?;
    let total = trainer.total_iterations();

    // Resume.
    let mut start_g = 0usize;
    let mut resumed_from = None;
    let mut extensions = Vec::new();
    let mut extended = None;
    let mut resumed_sums: Option<EpochSums> = None;
    let mut compute_changes = Vec::new();
    let mut recorded_baselines = None;
    if opts.resume {
        let latest = checkpoint::find_latest(&out);
        if latest.is_none() && opts.extend {
            return Err(Error::Msg(format!(
                "{}: no checkpoint to extend (--extend continues a run in this directory)",
                out.display()
            )));
        }
        if let Some(path) = latest {
            let (tensors, meta) = checkpoint::load(&path, &device)?;
            extensions = meta.extensions.clone();
            resumed_sums = meta.epoch_sums;
            if opts.extend {
                match meta.config.extension_of(cfg) {
                    Ok(true) => {
                        let e = Extension {
                            at_global_iteration: meta.global_iteration,
                            from_epochs: meta.config.epochs,
                            to_epochs: cfg.epochs,
                        };
                        extensions.push(e.clone());
                        extended = Some(e);
                    }
                    Ok(false) => {}
                    Err(keys) => return Err(Error::ConfigMismatch { path, keys }),
                }
            } else {
                let diff = meta.config.diff_for_resume(cfg);
                if !diff.is_empty() {
                    return Err(Error::ConfigMismatch { path, keys: diff });
                }
            }
            if meta.dataset.len != fingerprint.len || meta.dataset.hash != fingerprint.hash {
                return Err(Error::Checkpoint {
                    path,
                    reason: format!(
                        "it was trained on other data ({}, {} images, fingerprint {}) than now ({}, {} images, \
                         fingerprint {})",
                        meta.dataset.description,
                        meta.dataset.len,
                        meta.dataset.hash,
                        fingerprint.description,
                        fingerprint.len,
                        fingerprint.hash
                    ),
                });
            }
            if meta.niter_per_ep != niter {
                return Err(Error::Checkpoint {
                    path,
                    reason: format!("{} iterations per epoch, now {niter}", meta.niter_per_ep),
                });
            }
            trainer.load_state(&tensors, &path.display().to_string())?;
            if let Some(old) = &meta.compute {
                compute_changes = old.changes_to(&compute);
            }
            recorded_baselines = meta.knn_baselines.clone();
            if meta.config.student_passes != cfg.student_passes {
                compute_changes.push(format!(
                    "student_passes: {} -> {}",
                    meta.config.student_passes, cfg.student_passes
                ));
            }
            start_g = meta.global_iteration.min(total);
            resumed_from = Some(start_g);
        }
    }
    let mut ident = RunIdentity {
        fingerprint,
        extensions,
        compute: compute.clone(),
        // Until this process measures them (or finds them in the checkpoint, below): what it resumed.
        baselines: recorded_baselines.clone(),
    };
    let mut log = if main {
        checkpoint::atomic_write(&out.join("config.toml"), cfg.to_toml_string().as_bytes())?;
        let mut log = JsonLog::open(&out)?;
        if opts.tensorboard {
            log.attach_tensorboard(EventWriter::rebuild(
                &out,
                &log_history(log.path(), start_g, niter, total)?,
            )?);
        }
        Some(log)
    } else {
        None
    };
    let mut progress = Progress::new(total, start_g, opts.progress && main);
    if let Some(h) = run_lock.as_ref().and_then(|l| l.took_over.as_ref()) {
        progress.warn(&format!(
            "warning: taking over the stale lock of {} (pid {} on host {}, which no longer holds it)",
            out.join(LOCK_FILE).display(),
            h.pid,
            h.host
        ));
    }
    progress.println(&format!(
        "dino-train: {description}; {} {}; {niter} it/epoch x {} epochs{}{}; output {}{}",
        cfg.arch,
        if cfg.arch_kind()?.is_vit() {
            format!("patch {}", cfg.patch_size)
        } else {
            String::new()
        },
        cfg.epochs,
        if world > 1 {
            format!(
                "; {world} ranks ({engine}) x {local_batch} images = batch {}",
                cfg.batch_size
            )
        } else {
            String::new()
        },
        match (device.is_cpu(), dino_models::kernel_path()) {
            (true, dino_models::KernelPath::Auto) => String::new(),
            (true, dino_models::KernelPath::Portable) => "; portable kernels".to_string(),
            (false, _) => format!("; on {}", crate::device::describe(&device)),
        },
        out.display(),
        match resumed_from {
            Some(g) => format!("; resuming at global iteration {g}"),
            None => String::new(),
        }
    ));
    progress.println(&format!(
        "compute: {}; products {}",
        if device.is_cpu() {
            format!(
                "{} thread{}{} on {}",
                compute.threads,
                if compute.threads == 1 { "" } else { "s" },
                if world > 1 { " per rank" } else { "" },
                if compute.cpu.is_empty() {
                    "the CPU"
                } else {
                    &compute.cpu
                }
            )
        } else if world > 1 {
            format!("{} (rank 0)", compute.device)
        } else {
            compute.device.clone()
        },
        compute.products
    ));
    if ranks_computing_otherwise > 0 {
        progress.println(&format!(
            "note: {ranks_computing_otherwise} of {world} ranks {} their steps otherwise than rank 0 (their own \
             notes say how): the averaged steps keep every replica the same, but the run rounds as a mix of \
             kernels",
            if ranks_computing_otherwise == 1 { "computes" } else { "compute" }
        ));
    }
    if !compute_changes.is_empty() {
        progress.println(&format!(
            "note: resumed on other compute than the checkpoint was written with ({}): training continues from \
             the saved state, but its steps may round differently from the uninterrupted run's (resume is bit \
             for bit on the same compute)",
            compute_changes.join("; ")
        ));
    }
    if let Some(ext) = &extended {
        let g = ext.at_global_iteration;
        let at = |v: &[f64]| v.get(g).copied().unwrap_or(f64::NAN);
        let line = format!(
            "extending the run from {} to {} epochs at global iteration {g}: the lr, weight-decay and \
             teacher-momentum schedules are rebuilt for {} epochs (now lr {:.3e}, wd {:.4}, momentum {:.6})",
            ext.from_epochs,
            ext.to_epochs,
            ext.to_epochs,
            at(&trainer.lr_schedule),
            at(&trainer.wd_schedule),
            at(&trainer.momentum_schedule)
        );
        progress.warn(&line);
        if let Some(l) = log.as_mut() {
            l.write(&ExtendRecord {
                kind: "extend".into(),
                extension: ext.clone(),
            })?;
        }
    }
    if world > 1 && cfg.koleo_loss_weight > 0.0 && !cfg.koleo_global_batch {
        progress.println(&format!(
            "note: KoLeo's nearest neighbours are searched within each rank's {local_batch} images (as dinov2 \
             does, koleo_global_batch = false), so this run is not the same as one process with batch {}",
            cfg.batch_size
        ));
    }
    let mut summary = TrainSummary {
        output_dir: out.clone(),
        global_iteration: start_g,
        niter_per_ep: niter,
        resumed_from,
        interrupted: false,
        stopped_by: None,
        last_loss: f64::NAN,
        first_epoch_loss: f64::NAN,
        last_epoch_loss: f64::NAN,
        knn_final: None,
        knn_init: None,
        knn_pixels: None,
        seconds: 0.0,
        checkpoint: checkpoint::weights_path(&out, LATEST),
        plots: Vec::new(),
        took_over_lock: run_lock.as_ref().and_then(|l| l.took_over.clone()),
        extended_from_epochs: extended.map(|e| e.from_epochs),
        memory_noted: false,
        memory_estimate: None,
        knn_baselines_recorded: 0,
        compute,
        resumed_on_other_compute: compute_changes,
    };
    let knn = if cfg.eval_every > 0 || cfg.eval_final {
        KnnSetup::open(cfg)?
    } else {
        None
    };
    if (cfg.eval_every > 0 || cfg.eval_final) && knn.is_none() {
        progress
            .println("k-NN evaluation skipped: no labelled validation split (set val_data_path)");
    }

    // The same network at random initialisation (the seeded init is deterministic), measured first so the
    // baseline is on screen before training starts; a resumed run takes the figures its checkpoint recorded
    // for the same evaluation. A stop request cuts these short: nothing was trained in this process, so there
    // is nothing to write (a resumed run's checkpoint stays as it was).
    let mut knn_init = None;
    let mut knn_pixels = None;
    let mut stop: Option<i32> = None;
    if let (true, Some(k)) = (cfg.eval_final && start_g < total, &knn) {
        let key = k.baseline_key(cfg)?;
        let mut recorded = recorded_baselines.filter(|b| b.eval == key);
        if world > 1 {
            // Every rank takes part in measuring them: all take the recorded figures or none does.
            let mut agree = [f64::from(u8::from(recorded.is_some()))];
            coll.all_reduce_sum_f64(&mut agree)?;
            if agree[0] != world as f64 {
                recorded = None;
            }
        }
        knn_init = recorded.as_ref().and_then(|b| b.init.map(KnnResult::from));
        knn_pixels = recorded
            .as_ref()
            .and_then(|b| b.pixels.map(KnnResult::from));
        summary.knn_baselines_recorded =
            usize::from(knn_init.is_some()) + usize::from(knn_pixels.is_some());
        let init = || k.run_init(cfg, &device);
        let pixels = || k.pixels(cfg);
        let baselines: [(&str, KnnEval, &mut Option<KnnResult>); 2] = [
            ("the network at random initialisation", &init, &mut knn_init),
            ("the raw pixels", &pixels, &mut knn_pixels),
        ];
        for (what, eval, slot) in baselines {
            if let Some(r) = slot {
                progress.println(&format!(
                    "k-NN of {what}: top-1 {:.2}% top-5 {:.2}% (recorded in the checkpoint)",
                    r.top1, r.top5
                ));
                continue;
            }
            let (r, s) = unless_stopped(coll.as_ref(), world, eval)?;
            if let Some(r) = r {
                progress.println(&format!(
                    "k-NN of {what}: top-1 {:.2}% top-5 {:.2}%",
                    r.top1, r.top5
                ));
                *slot = Some(r);
            }
            stop = s;
            if stop.is_some() {
                break;
            }
        }
        ident.baselines = Some(KnnBaselines {
            eval: key,
            init: knn_init.map(Accuracy::from),
            pixels: knn_pixels.map(Accuracy::from),
        });
    }
    if stop.is_some() {
        // What finished before the request stays in the summary.
        (summary.knn_init, summary.knn_pixels) = (knn_init, knn_pixels);
        summary.interrupted = true;
        summary.stopped_by = stop;
        summary.seconds = t0.elapsed().as_secs_f64();
        progress.finish();
        return Ok(summary);
    }

    // Before the first step and before the loader's threads allocate: will the steps fit? (A process the
    // kernel kills for memory says nothing.)
    if main && start_g < total {
        summary.memory_estimate =
            memory_estimate(&trainer, local_batch, coll.local_size(), &mut progress);
    }
    let loader = MultiCropLoader::with_device(
        train_ds.clone(),
        data::augmentation(cfg)?,
        LoaderConfig {
            batch_size: local_batch,
            rank,
            world_size: world,
            num_workers: cfg.num_workers.max(1),
            prefetch: cfg.prefetch_batches,
            seed: cfg.seed,
            shuffle: true,
            drop_last: true,
        },
        // Batches are built on the run's device by the loader's producer thread, ahead of the step.
        device.clone(),
    )?;

    let mut window_start = Instant::now();
    let mut window_images = 0usize;
    let (start_epoch, start_it) = (start_g / niter, start_g % niter);
    for epoch in start_epoch..cfg.epochs {
        let t_epoch = Instant::now();
        let first_it = if epoch == start_epoch { start_it } else { 0 };
        let mut batches = loader.epoch_from(epoch as u64, first_it);
        // A run resumed inside an epoch continues that epoch's sums (from the checkpoint).
        let sums = if epoch == start_epoch && start_it > 0 {
            resumed_sums.unwrap_or_default()
        } else {
            EpochSums::default()
        };
        let (mut loss_sum, mut ent_sum, mut n_loss, mut n_ent) = (
            sums.loss_sum,
            sums.entropy_sum,
            sums.loss_count,
            sums.entropy_count,
        );
        // Unreadable images: the run's count up to the checkpoint this epoch resumed from, then this rank's
        // in the batches it consumes (summed over the ranks where it is reported).
        let (skipped_before, mut skipped_here) = (sums.skipped_images, 0usize);
        let mut last_lr_wd = (f64::NAN, f64::NAN);
        for it in first_it..niter {
            let batch = batches.next().ok_or_else(|| {
                Error::Msg(format!(
                    "the loader ended early at epoch {epoch}, iteration {it}"
                ))
            })??;
            skipped_here += batch.skipped;
            let stats = trainer.step(&batch.crops, epoch, it)?;
            let g = stats.global_iteration + 1;
            summary.global_iteration = g;
            if g == start_g + 1 && main {
                // The first step sets most of the peak: say it now if it is near the machine's memory.
                if let Some(note) = crate::runtime::memory_advice_now(cfg) {
                    progress.warn(&format!("after the first step: {note}"));
                    summary.memory_noted = true;
                }
            }
            summary.last_loss = stats.loss;
            loss_sum += stats.loss;
            n_loss += 1;
            last_lr_wd = (stats.lr, stats.wd);
            window_images += cfg.batch_size;
            let log_now = cfg.log_every > 0 && (g.is_multiple_of(cfg.log_every) || it + 1 == niter);
            if log_now {
                let m = global_metrics(coll.as_ref(), trainer.last_metrics()?)?;
                let el = window_start.elapsed().as_secs_f64();
                let rec = StepRecord {
                    kind: "step".into(),
                    epoch,
                    iteration: it,
                    global_iteration: stats.global_iteration,
                    loss: stats.loss,
                    ibot_loss: stats.ibot_loss,
                    lr: stats.lr,
                    wd: stats.wd,
                    momentum: stats.momentum,
                    teacher_temp: stats.teacher_temp,
                    teacher_entropy: m.map(|m| m.teacher_entropy).unwrap_or(f64::NAN),
                    kl_teacher_student: m.map(|m| m.kl_teacher_student).unwrap_or(f64::NAN),
                    teacher_std: m.map(|m| m.teacher_std).unwrap_or(f64::NAN),
                    images_per_s: if el > 0.0 {
                        window_images as f64 / el
                    } else {
                        0.0
                    },
                    elapsed_s: t0.elapsed().as_secs_f64(),
                    all_reduce_s: stats.timings.all_reduce,
                    rank_wait_s: stats.timings.rank_wait,
                    all_reduce_bytes: stats.all_reduce_bytes,
                };
                if rec.teacher_entropy.is_finite() {
                    ent_sum += rec.teacher_entropy;
                    n_ent += 1;
                }
                if let Some(l) = log.as_mut() {
                    l.write(&rec)?;
                }
                progress.update(
                    g,
                    &format!(
                        "ep {epoch} loss {:.4} lr {:.2e} H(t) {:.2} {:.1} img/s",
                        rec.loss, rec.lr, rec.teacher_entropy, rec.images_per_s
                    ),
                );
                window_start = Instant::now();
                window_images = 0;
            }
            let end_of_epoch = it + 1 == niter;
            // A stop request (a signal, see crate::signals) on any rank stops every rank here; inside
            // an epoch the checkpoint is written now, at the epoch's end by the code below.
            stop = agreed_stop(coll.as_ref(), world)?;
            let periodic = cfg.ckpt_every_iters > 0 && g.is_multiple_of(cfg.ckpt_every_iters);
            if !end_of_epoch && (periodic || stop.is_some()) {
                let skipped_images =
                    skipped_before + dino_core::collective::all_reduce_count(skipped_here)?;
                if main {
                    save_checkpoint(
                        &trainer,
                        cfg,
                        &[LATEST.to_string()],
                        g,
                        stats.loss,
                        &ident,
                        Some(EpochSums {
                            loss_sum,
                            loss_count: n_loss,
                            entropy_sum: ent_sum,
                            entropy_count: n_ent,
                            skipped_images,
                        }),
                    )?;
                }
            }
            if !end_of_epoch && (opts.stop_after_iterations == Some(g) || stop.is_some()) {
                summary.interrupted = true;
                summary.stopped_by = stop;
                summary.seconds = t0.elapsed().as_secs_f64();
                progress.finish();
                return Ok(summary);
            }
        }
        // Each rank counts the unreadable images of its own share of the batches; the log and the epoch line
        // report the run's total for the epoch (also across a resume inside it).
        let skipped = skipped_before + dino_core::collective::all_reduce_count(skipped_here)?;
        drop(batches);
        let g = (epoch + 1) * niter;
        let mut stems = vec![LATEST.to_string()];
        if cfg.saveckp_freq > 0 && epoch.is_multiple_of(cfg.saveckp_freq) {
            stems.push(format!("checkpoint{epoch:04}"));
        }
        if world > 1 {
            check_replicas(coll.as_ref(), &trainer, g)?;
        }
        if main {
            save_checkpoint(&trainer, cfg, &stems, g, summary.last_loss, &ident, None)?;
        }
        let last_epoch = epoch + 1 == cfg.epochs;
        // A stop request skips the evaluation, or cuts it short: the checkpoint above is what the run must
        // keep.
        let eval_now = knn.is_some()
            && stop.is_none()
            && ((cfg.eval_every > 0 && (epoch + 1).is_multiple_of(cfg.eval_every))
                || (last_epoch && cfg.eval_final));
        let knn_res = match (&knn, eval_now) {
            (Some(k), true) => {
                let (r, s) = unless_stopped(coll.as_ref(), world, || {
                    k.run(cfg, trainer.teacher.model.backbone.as_ref())
                })?;
                stop = s;
                r
            }
            _ => None,
        };
        if last_epoch {
            summary.knn_final = knn_res;
        }
        let mean_loss = loss_sum / n_loss.max(1) as f64;
        if summary.first_epoch_loss.is_nan() {
            summary.first_epoch_loss = mean_loss;
        }
        summary.last_epoch_loss = mean_loss;
        let rec = EpochRecord {
            kind: "epoch".into(),
            epoch,
            train_loss: mean_loss,
            train_lr: last_lr_wd.0,
            train_wd: last_lr_wd.1,
            teacher_entropy: if n_ent > 0 {
                ent_sum / n_ent as f64
            } else {
                f64::NAN
            },
            knn_top1: knn_res.map(|k| k.top1),
            knn_top5: knn_res.map(|k| k.top5),
            skipped_images: skipped,
            epoch_s: t_epoch.elapsed().as_secs_f64(),
        };
        if let Some(l) = log.as_mut() {
            l.write(&rec)?;
        }
        progress.println(&format!(
            "epoch {epoch}: loss {mean_loss:.4}{} ({:.1} s){}",
            match knn_res {
                Some(k) => format!(", k-NN top-1 {:.2}% top-5 {:.2}%", k.top1, k.top5),
                None => String::new(),
            },
            rec.epoch_s,
            if skipped > 0 {
                format!(", {skipped} unreadable images skipped")
            } else {
                String::new()
            }
        ));
        if (opts.stop_after_iterations == Some(g) || stop.is_some()) && !last_epoch {
            summary.interrupted = true;
            summary.stopped_by = stop;
            summary.seconds = t0.elapsed().as_secs_f64();
            progress.finish();
            return Ok(summary);
        }
    }
    progress.finish();
    // A stop request in the last step or during the final evaluations: the run is complete and saved; the
    // evaluations not done yet are skipped (the same command, run again, does them).
    if cfg.eval_final && stop.is_none() {
        if let Some(k) = &knn {
            if summary.knn_final.is_none() {
                (summary.knn_final, stop) = unless_stopped(coll.as_ref(), world, || {
                    k.run(cfg, trainer.teacher.model.backbone.as_ref())
                })?;
            }
            if knn_init.is_none() && stop.is_none() {
                (knn_init, stop) =
                    unless_stopped(coll.as_ref(), world, || k.run_init(cfg, &device))?;
            }
            if knn_pixels.is_none() && stop.is_none() {
                (knn_pixels, stop) = unless_stopped(coll.as_ref(), world, || k.pixels(cfg))?;
            }
            summary.knn_init = knn_init;
            summary.knn_pixels = knn_pixels;
        }
    }
    summary.stopped_by = stop;
    if let (Some(a), Some(b)) = (summary.knn_final, summary.knn_init) {
        let pixels = summary
            .knn_pixels
            .map(|p| format!(" vs raw pixels {:.2}%", p.top1))
            .unwrap_or_default();
        let pixels5 = summary
            .knn_pixels
            .map(|p| format!(" vs {:.2}%", p.top5))
            .unwrap_or_default();
        let line = format!(
            "k-NN (k = {}, T = {}) top-1 on the validation split: trained teacher {:.2}% vs same network at random \
             initialisation {:.2}%{pixels} (top-5 {:.2}% vs {:.2}%{pixels5})",
            cfg.knn_k, cfg.knn_temperature, a.top1, b.top1, a.top5, b.top5
        );
        if opts.report_knn_final {
            progress.println(&line);
            if !opts.progress && main {
                tracing::info!("{line}");
            }
        }
        if let Some(l) = log.as_mut() {
            l.write(&KnnFinalRecord {
                kind: "knn_final".into(),
                epoch: cfg.epochs.saturating_sub(1),
                trained_top1: a.top1,
                trained_top5: a.top5,
                init_top1: b.top1,
                init_top5: b.top5,
                pixels_top1: summary.knn_pixels.map(|k| k.top1),
                pixels_top5: summary.knn_pixels.map(|k| k.top5),
            })?;
        }
    }
    if opts.plots && main {
        summary.plots = write_plots(&out)?;
        // What the trained ViT looks at; a sheet that cannot be made is a warning, not a failed run.
        if stop.is_none() {
            // The datasets already open here, picked as `attention::sheet_dataset` picks them.
            let ds = knn
                .as_ref()
                .map_or_else(|| train_ds.clone(), |k| k.val.clone());
            let title = crate::attention::sheet_title(cfg, summary.global_iteration);
            let path = out.join("plots").join("attention.png");
            let teacher = trainer.teacher.model.backbone.as_ref();
            let sheet =
                crate::attention::write_sheet(cfg, teacher, ds, &path, &title).and_then(|sheet| {
                    // The same PNG in TensorBoard's Images tab, at the run's last iteration.
                    if let (Some(sh), Some(tb)) =
                        (&sheet, log.as_mut().and_then(|l| l.tensorboard()))
                    {
                        let step = summary.global_iteration as i64;
                        tb.write_image(
                            crate::attention::TENSORBOARD_TAG,
                            step,
                            &sh.png,
                            sh.width,
                            sh.height,
                        )?;
                    }
                    Ok(sheet)
                });
            match sheet {
                Ok(Some(sh)) => summary.plots.push(sh.path),
                Ok(None) => {}
                Err(e) => progress.warn(&format!(
                    "warning: {} not written: {}",
                    path.display(),
                    crate::error::one_line_report(&e)
                )),
            }
        }
    }
    summary.seconds = t0.elapsed().as_secs_f64();
    Ok(summary)
}

/// A k-NN evaluation to run later (the baselines of [`train`]).
type KnnEval<'a> = &'a dyn Fn() -> Result<KnnResult>;

/// `eval`'s result unless a stop request cut it short ([`Error::Interrupted`]), and the stop agreed over the
/// ranks afterwards ([`agreed_stop`]; every rank calls this at the same point).
fn unless_stopped<T>(
    coll: &dyn dino_core::Collective,
    world: usize,
    eval: impl FnOnce() -> Result<T>,
) -> Result<(Option<T>, Option<i32>)> {
    let r = match eval() {
        Ok(v) => Some(v),
        Err(Error::Interrupted { .. }) => None,
        Err(e) => return Err(e),
    };
    Ok((r, agreed_stop(coll, world)?))
}

/// A stop request ([`crate::signals::stop_requested`]) agreed over the ranks, so that every rank stops after
/// the same step: any rank's request stops all (a rank without one reports the others' signal).
fn agreed_stop(coll: &dyn dino_core::Collective, world: usize) -> Result<Option<i32>> {
    let mine = crate::signals::stop_requested();
    if world == 1 {
        return Ok(mine);
    }
    let mut v = [
        f64::from(u8::from(mine.is_some())),
        mine.unwrap_or(0) as f64,
    ];
    coll.all_reduce_sum_f64(&mut v)?;
    Ok((v[0] > 0.0).then(|| mine.unwrap_or((v[1] / v[0]).round() as i32)))
}

/// How many ranks compute their steps otherwise than rank 0 (another products kernel, kernel path or CPU kernel
/// flags: a heterogeneous job); each such rank says how on its stderr.
fn compare_compute(coll: &dyn dino_core::Collective, mine: &Compute) -> Result<usize> {
    let text = serde_json::to_string(mine).unwrap_or_default();
    let (changes, ranks) = differences_from_rank0(coll, text, |root| {
        match root.and_then(|t| serde_json::from_str::<Compute>(&t).ok()) {
            // The threads are each rank's own; what rounds differently is the rest.
            Some(r) => Compute {
                threads: mine.threads,
                ..r
            }
            .changes_to(mine),
            None => vec!["<rank 0's compute record does not parse>".into()],
        }
    })?;
    if !changes.is_empty() {
        eprintln!(
            "note (rank {} of {}): computes otherwise than rank 0 ({})",
            coll.rank(),
            coll.world_size(),
            changes.join("; ")
        );
    }
    Ok(ranks)
}

/// This rank's differences from rank 0 (`diff` of rank 0's text of what `mine` is this rank's text of; None
/// when it is not UTF-8), and how many ranks found any: the shared step of the checks that every rank runs
/// what rank 0 does.
fn differences_from_rank0(
    coll: &dyn dino_core::Collective,
    mine: String,
    diff: impl FnOnce(Option<String>) -> Vec<String>,
) -> Result<(Vec<String>, usize)> {
    let mut root = mine.into_bytes();
    coll.broadcast_bytes(&mut root, 0)?;
    let d = diff(String::from_utf8(root).ok());
    let mut n = [f64::from(u8::from(!d.is_empty()))];
    coll.all_reduce_sum_f64(&mut n)?;
    Ok((d, n[0] as usize))
}

/// Every rank must run the same configuration: rank 0's TOML is broadcast and compared; a difference on any
/// rank is an error on every rank (naming the first differing key).
fn check_same_config(coll: &dyn dino_core::Collective, cfg: &TrainConfig) -> Result<()> {
    let mine = cfg.to_toml_string();
    let (diff, bad) = differences_from_rank0(coll, mine.clone(), |root| {
        match root.and_then(|t| toml::from_str::<TrainConfig>(&t).ok()) {
            Some(r) if r.to_toml_string() == mine => Vec::new(),
            Some(r) => {
                let d = r.diff_for_resume(cfg);
                if d.is_empty() {
                    vec!["(keys ignored on resume)".to_string()]
                } else {
                    d
                }
            }
            None => vec!["<rank 0's configuration does not parse>".to_string()],
        }
    })?;
    if !diff.is_empty() {
        return Err(Error::Msg(format!(
            "rank {} runs another configuration than rank 0: {}",
            coll.rank(),
            diff.join(", ")
        )));
    }
    if bad > 0 {
        return Err(Error::Msg(format!(
            "{bad} rank(s) run another configuration than rank 0 (their error names the keys)"
        )));
    }
    Ok(())
}

/// Under data parallelism every rank holds the same state (the same averaged gradients, optimiser steps and
/// EMA): checked at each epoch end with a hash of every state tensor (student, teacher, optimiser, centre)
/// compared with rank 0's; a difference is an error on every rank.
fn check_replicas(coll: &dyn dino_core::Collective, trainer: &Trainer, g: usize) -> Result<()> {
    let mut h = checkpoint::Fnv64::default();
    for (name, t) in trainer.state_tensors()? {
        h.update(name.as_bytes());
        for v in t
            .flatten_all()?
            .to_dtype(candle_core::DType::F32)?
            .to_vec1::<f32>()?
        {
            h.update(&v.to_le_bytes());
        }
    }
    let mine = h.hex().into_bytes();
    let mut root = mine.clone();
    coll.broadcast_bytes(&mut root, 0)?;
    let mut bad = [f64::from(u8::from(root != mine))];
    coll.all_reduce_sum_f64(&mut bad)?;
    if bad[0] > 0.0 {
        return Err(Error::Msg(format!(
            "after global iteration {g} the state of {} rank(s) differs from rank 0's{}",
            bad[0],
            if root != mine {
                " (this one among them)"
            } else {
                ""
            }
        )));
    }
    Ok(())
}

/// The collapse monitors averaged over the ranks (each rank's are means over its equal-sized batch).
fn global_metrics(
    coll: &dyn dino_core::Collective,
    m: Option<dino_core::CollapseMetrics>,
) -> Result<Option<dino_core::CollapseMetrics>> {
    let world = coll.world_size();
    let Some(mut m) = m else { return Ok(None) };
    if world > 1 {
        let mut v = [m.teacher_entropy, m.kl_teacher_student, m.teacher_std];
        coll.all_reduce_sum_f64(&mut v)?;
        m.teacher_entropy = v[0] / world as f64;
        m.kl_teacher_student = v[1] / world as f64;
        m.teacher_std = v[2] / world as f64;
    }
    Ok(Some(m))
}

/// The no-argument run: [`TrainConfig::default_preset`] (a small ViT on the embedded Fashion-MNIST subset),
/// writing into `output_dir`, reporting the trained teacher's k-NN accuracy next to the random-init one.
pub fn train_default(output_dir: Option<PathBuf>) -> Result<TrainSummary> {
    let mut cfg = TrainConfig::default_preset();
    if let Some(d) = output_dir {
        cfg.output_dir = d;
    }
    train(&cfg, &TrainOptions::default())
}
