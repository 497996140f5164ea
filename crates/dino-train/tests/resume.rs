//! Exact resume, interruption, non-finite loss and changed-config refusal, on a tiny ViT and 40 images of
//! the embedded Fashion-MNIST subset (a few seconds each).
//!
//! - A run stopped mid-epoch (as if killed right after an iteration: nothing more written) and resumed ends
//!   with every tensor (student, teacher, AdamW moments and steps, centre) bit-identical to an uninterrupted
//!   run's, also with a torn `checkpoint.safetensors.tmp` left behind by a crash during a write; with SGD and
//!   LARS too (their momentum buffers).
//! - A child process killed with SIGKILL in the middle of training, resumed, ends equal too.
//! - A NaN loss stops with the epoch and iteration named and leaves the last checkpoint in place.
//! - Resuming with a changed config is refused with the differing keys named; `extend` lengthens a finished
//!   run (schedules rebuilt for the new length, recorded in the metadata and the log) and refuses the rest.
//! - A second run on a directory in use refuses at once naming the holder; after kill -9 of the holder the
//!   next run takes the stale lock over.
//! - A stop signal (SIGUSR1 here; with the binary's handlers installed) stops the run after its current step
//!   with a checkpoint there, gives the lock back, and the resumed run ends bit-identical; during the
//!   initial k-NN evaluations it stops there, before the first step, writing no checkpoint.
//! - A write failing for lack of space (RLIMIT_FSIZE in a child) is one line, leaves the last checkpoint
//!   intact, and the resumed run ends bit-identical.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use candle_core::{DType, Device, Tensor};
use dino_train::checkpoint::{self, weights_path, LATEST};
use dino_train::{train, DatasetKind, Error, OptimizerKind, TrainConfig, TrainOptions, Trainer};

fn tiny(out: &Path) -> TrainConfig {
    TrainConfig {
        arch: "vit_custom".into(),
        patch_size: 7,
        img_size: 28,
        vit_embed_dim: 32,
        vit_depth: 2,
        vit_num_heads: 2,
        out_dim: 64,
        head_hidden_dim: 64,
        head_bottleneck_dim: 32,
        drop_path_rate: 0.2,
        batch_size: 8,
        epochs: 2,
        warmup_epochs: 1,
        lr: 0.01,
        min_lr: 1e-5,
        freeze_last_layer: 1,
        local_crops_number: 2,
        global_crops_size: 28,
        local_crops_size: 14,
        global_crops_scale: [0.4, 1.0],
        local_crops_scale: [0.1, 0.4],
        norm_mean: [0.286; 3],
        norm_std: [0.353; 3],
        dataset: DatasetKind::Embedded,
        max_train_images: 40,
        output_dir: out.to_path_buf(),
        saveckp_freq: 1,
        ckpt_every_iters: 2,
        num_workers: 1,
        log_every: 1,
        eval_every: 0,
        eval_final: false,
        ..TrainConfig::default()
    }
}

fn quiet() -> TrainOptions {
    TrainOptions {
        progress: false,
        plots: false,
        ..TrainOptions::default()
    }
}

/// [`quiet`], returning as if killed once `g` global iterations are complete.
fn stop_after(g: usize) -> TrainOptions {
    TrainOptions {
        stop_after_iterations: Some(g),
        ..quiet()
    }
}

fn final_state(dir: &Path) -> (HashMap<String, Tensor>, checkpoint::CheckpointMeta) {
    checkpoint::load(&weights_path(dir, LATEST), &Device::Cpu).unwrap()
}

fn assert_same_state(a: &Path, b: &Path) {
    assert_same_state_with(a, b, "optimizer.exp_avg_sq.")
}

/// Every tensor of the two runs' last checkpoints is bit-identical; some key starts with `optimizer_key`.
fn assert_same_state_with(a: &Path, b: &Path, optimizer_key: &str) {
    let (ta, ma) = final_state(a);
    let (tb, mb) = final_state(b);
    assert_eq!(ma.global_iteration, mb.global_iteration);
    assert_eq!(ma.global_iteration, 10);
    let mut keys: Vec<&String> = ta.keys().collect();
    keys.sort();
    assert_eq!(keys.len(), tb.len());
    assert!(
        keys.iter().any(|k| k.starts_with(optimizer_key)),
        "no {optimizer_key}*"
    );
    for k in keys {
        let (x, y) = (&ta[k], &tb[k]);
        assert_eq!(x.dims(), y.dims(), "{k}");
        let (x, y) = (
            x.to_dtype(DType::F64).unwrap(),
            y.to_dtype(DType::F64).unwrap(),
        );
        let d = (x - y)
            .unwrap()
            .abs()
            .unwrap()
            .flatten_all()
            .unwrap()
            .max(0)
            .unwrap()
            .to_scalar::<f64>()
            .unwrap();
        assert_eq!(
            d, 0.0,
            "tensor {k} differs by {d} between the uninterrupted and the resumed run"
        );
    }
}

fn reference_run(root: &Path) -> PathBuf {
    let dir = root.join("reference");
    let s = train(&tiny(&dir), &quiet()).unwrap();
    assert_eq!(
        (s.global_iteration, s.niter_per_ep, s.interrupted),
        (10, 5, false)
    );
    assert!(s.last_loss.is_finite());
    dir
}

/// The run of `cfg` uninterrupted (in `root/reference`) and interrupted after iteration 7, then resumed from its
/// checkpoint at 6 to the end (in `root/interrupted`); returns the two directories.
fn reference_and_resumed(root: &Path, cfg: impl Fn(&Path) -> TrainConfig) -> (PathBuf, PathBuf) {
    let reference = root.join("reference");
    train(&cfg(&reference), &quiet()).unwrap();
    let dir = root.join("interrupted");
    let opts = stop_after(7);
    assert!(train(&cfg(&dir), &opts).unwrap().interrupted);
    let s = train(&cfg(&dir), &quiet()).unwrap();
    assert_eq!((s.resumed_from, s.global_iteration), (Some(6), 10));
    (reference, dir)
}

#[test]
fn interrupted_mid_epoch_then_resumed_equals_uninterrupted() {
    let root = tempfile::tempdir().unwrap();
    let reference = reference_run(root.path());

    let dir = root.path().join("interrupted");
    let cfg = tiny(&dir);
    // "Killed" right after global iteration 7 (epoch 1, iteration 2): the last checkpoint is at iteration 6.
    let s = train(&cfg, &stop_after(7)).unwrap();
    assert!(s.interrupted);
    assert_eq!(final_state(&dir).1.global_iteration, 6);
    // A crash while writing the next checkpoint leaves a torn temporary file; it must be ignored.
    let full = std::fs::read(weights_path(&dir, LATEST)).unwrap();
    std::fs::write(
        checkpoint::tmp_path(&weights_path(&dir, LATEST)),
        &full[..full.len() / 3],
    )
    .unwrap();
    let s = train(&cfg, &quiet()).unwrap();
    assert_eq!(s.resumed_from, Some(6));
    assert_eq!(s.global_iteration, 10);
    assert_same_state(&reference, &dir);
    // The same compute: nothing noted, and the checkpoints record it.
    assert!(
        s.resumed_on_other_compute.is_empty(),
        "{:?}",
        s.resumed_on_other_compute
    );
    assert_eq!(final_state(&dir).1.compute.as_ref(), Some(&s.compute));
    // The per-epoch checkpoints exist under their own names.
    assert!(
        weights_path(&dir, "checkpoint0000").is_file()
            && weights_path(&dir, "checkpoint0001").is_file()
    );
    // Re-running a finished run changes nothing.
    let s = train(&cfg, &quiet()).unwrap();
    assert_eq!((s.resumed_from, s.global_iteration), (Some(10), 10));
    assert_same_state(&reference, &dir);
}

/// A checkpoint records what computed its steps; a resume on other compute (another products path or thread
/// count, other kernel flags, another `student_passes`) continues and names each difference, old -> new; the
/// CPU's name alone and a checkpoint written before the record existed note nothing.
#[test]
fn resume_on_other_compute_names_the_differences() {
    let root = tempfile::tempdir().unwrap();
    let dir = root.path().join("run");
    let opts = stop_after(3);
    let first = train(&tiny(&dir), &opts).unwrap();
    assert!(first.interrupted);
    let now = first.compute.clone();
    assert_eq!((now.device.as_str(), now.ranks), ("cpu", 1));
    assert!(now.threads >= 1 && !now.products.is_empty(), "{now:?}");
    // The checkpoint (iteration 2) rewritten with its metadata edited, as if another machine had written it.
    let (tensors, original) = final_state(&dir);
    assert_eq!(original.global_iteration, 2);
    let tensors: Vec<(String, Tensor)> = tensors.into_iter().collect();
    let rewrite = |edit: &dyn Fn(&mut checkpoint::CheckpointMeta)| {
        let mut meta = original.clone();
        edit(&mut meta);
        checkpoint::save(&dir, LATEST, &tensors, &meta).unwrap();
    };
    let resume = |cfg: &TrainConfig| {
        let s = train(cfg, &opts).unwrap();
        assert_eq!(s.resumed_from, Some(2));
        s
    };
    let amx = "bf16: dino-kernels AMX tdpbf16ps tiles, f32 accumulation";
    rewrite(&|m| {
        let c = m
            .compute
            .as_mut()
            .expect("the checkpoint records its compute");
        c.cpu = "Another CPU (family 6 model 143)".into();
        c.products = amx.into();
        c.threads = now.threads + 7;
    });
    let s = resume(&tiny(&dir));
    assert_eq!(
        s.resumed_on_other_compute,
        vec![
            format!("products: {amx} -> {}", now.products),
            format!("threads: {} -> {}", now.threads + 7, now.threads),
        ]
    );
    // Other kernel flags, and student_passes (a key a resume may change).
    rewrite(&|m| {
        m.compute.as_mut().unwrap().cpu_flags = vec!["avx2".into(), "fma".into()];
    });
    let mut cfg = tiny(&dir);
    cfg.student_passes = dino_train::StudentPasses::Crop;
    let s = resume(&cfg);
    assert_eq!(
        s.resumed_on_other_compute.len(),
        2,
        "{:?}",
        s.resumed_on_other_compute
    );
    assert!(
        s.resumed_on_other_compute[0].starts_with("cpu: ")
            && s.resumed_on_other_compute[0].contains("(avx2 fma) -> ")
            && s.resumed_on_other_compute[1].starts_with("student_passes: "),
        "{:?}",
        s.resumed_on_other_compute
    );
    // Only the CPU's name differs, or the checkpoint predates the record: nothing to note.
    for edit in [
        &(|m: &mut checkpoint::CheckpointMeta| m.compute.as_mut().unwrap().cpu = "Renamed".into())
            as &dyn Fn(&mut checkpoint::CheckpointMeta),
        &|m: &mut checkpoint::CheckpointMeta| m.compute = None,
    ] {
        rewrite(edit);
        let s = resume(&tiny(&dir));
        assert!(
            s.resumed_on_other_compute.is_empty(),
            "{:?}",
            s.resumed_on_other_compute
        );
    }
    // The next checkpoint records this process's compute.
    train(&tiny(&dir), &stop_after(5)).unwrap();
    let meta = final_state(&dir).1;
    assert!(meta.global_iteration > 2, "{}", meta.global_iteration);
    assert_eq!(meta.compute.as_ref(), Some(&now));
}

/// The k-NN baselines measured before the first step (the seeded network at random initialisation, the raw
/// pixels) are recorded in the checkpoints: a resumed run takes them from there instead of measuring them
/// again (the figures of the uninterrupted run), and measures them again when the evaluation changed
/// (`knn_k`, which a resume may change).
#[test]
fn a_resumed_run_takes_the_knn_baselines_from_its_checkpoint() {
    let root = tempfile::tempdir().unwrap();
    let with_eval = |dir: &Path| TrainConfig {
        eval_final: true,
        eval_max_train: 80,
        eval_max_val: 40,
        eval_resize: 28,
        eval_crop: 28,
        ..tiny(dir)
    };
    let reference = train(&with_eval(&root.path().join("reference")), &quiet()).unwrap();
    let (init, pixels) = (reference.knn_init.unwrap(), reference.knn_pixels.unwrap());
    assert_eq!(reference.knn_baselines_recorded, 0);

    let dir = root.path().join("run");
    let stop_at_3 = stop_after(3);
    let first = train(&with_eval(&dir), &stop_at_3).unwrap();
    assert!(first.interrupted);
    assert_eq!(first.knn_baselines_recorded, 0);
    let b = final_state(&dir)
        .1
        .knn_baselines
        .expect("the checkpoint records them");
    let rec = |a: Option<checkpoint::Accuracy>| a.map(|a| (a.top1, a.top5));
    assert_eq!(rec(b.init), Some((init.top1, init.top5)));
    assert_eq!(rec(b.pixels), Some((pixels.top1, pixels.top5)));
    assert!(b.eval.contains("knn_k 20"), "{}", b.eval);

    // Another k: measured again (this stop writes no checkpoint, so the recorded figures stay).
    let mut other_k = with_eval(&dir);
    other_k.knn_k = 5;
    let s = train(&other_k, &stop_at_3).unwrap();
    assert_eq!((s.resumed_from, s.knn_baselines_recorded), (Some(2), 0));

    // The same evaluation, to the end: both from the checkpoint, and the run's figures are the uninterrupted
    // run's.
    let s = train(&with_eval(&dir), &quiet()).unwrap();
    assert_eq!((s.resumed_from, s.knn_baselines_recorded), (Some(2), 2));
    assert_eq!((s.knn_init, s.knn_pixels), (Some(init), Some(pixels)));
    assert_eq!(s.knn_final, reference.knn_final);
}

/// The per-epoch count of unreadable images (`skipped_images` in the log) survives a resume inside the epoch:
/// the checkpoint carries the count so far, so the resumed epoch reports what the uninterrupted one does.
#[test]
fn unreadable_images_are_counted_across_a_resume_inside_the_epoch() {
    let root = tempfile::tempdir().unwrap();
    let data = root.path().join("photos");
    std::fs::create_dir(&data).unwrap();
    let shared = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../../shared/data/photos");
    for e in std::fs::read_dir(&shared).unwrap() {
        let p = e.unwrap().path();
        if matches!(p.extension().and_then(|x| x.to_str()), Some("jpg" | "png")) {
            std::fs::copy(&p, data.join(p.file_name().unwrap())).unwrap();
        }
    }
    for i in 0..5 {
        std::fs::write(data.join(format!("broken{i}.png")), b"not a png").unwrap();
    }
    let cfg = |out: &Path| TrainConfig {
        dataset: DatasetKind::Folder,
        data_path: data.clone(),
        max_train_images: 0,
        batch_size: 4,
        epochs: 1,
        warmup_epochs: 0,
        ckpt_every_iters: 1,
        ..tiny(out)
    };
    let epoch_skipped = |dir: &Path| -> u64 {
        let log = std::fs::read_to_string(dir.join("log.jsonl")).unwrap();
        let rec = log
            .lines()
            .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
            .rfind(|v| v["kind"] == "epoch")
            .expect("an epoch record");
        rec["skipped_images"].as_u64().unwrap()
    };
    let reference = root.path().join("reference");
    train(&cfg(&reference), &quiet()).unwrap();
    let dir = root.path().join("resumed");
    let opts = stop_after(3);
    assert!(train(&cfg(&dir), &opts).unwrap().interrupted);
    let before = final_state(&dir).1.epoch_sums.unwrap().skipped_images as u64;
    let s = train(&cfg(&dir), &quiet()).unwrap();
    assert_eq!(s.resumed_from, Some(3));
    let want = epoch_skipped(&reference);
    assert!(
        before > 0 && want > before,
        "skipped {before} before the resume, {want} in all"
    );
    assert_eq!(epoch_skipped(&dir), want);
}

/// SGD's and LARS's momentum buffers are checkpointed and restored: an interrupted run resumed ends with every
/// tensor equal to the uninterrupted run's.
#[test]
fn sgd_and_lars_resume_exactly() {
    for (kind, key) in [
        (OptimizerKind::Sgd, "optimizer.momentum_buffer."),
        (OptimizerKind::Lars, "optimizer.mu."),
    ] {
        let root = tempfile::tempdir().unwrap();
        let cfg = |dir: &Path| TrainConfig {
            optimizer: kind,
            ..tiny(dir)
        };
        let (reference, dir) = reference_and_resumed(root.path(), cfg);
        assert_same_state_with(&reference, &dir, key);
    }
}

/// iBOT (both centering modes): the patch centre is checkpointed (`ibot_patch_loss.center`, absent without
/// iBOT) and the masks are drawn from `(seed, iteration)`, so an interrupted run resumed ends with every tensor
/// equal to the uninterrupted run's; every trainable parameter, the mask token included, gets a gradient; and
/// the centre moved when it is used.
#[test]
fn ibot_resumes_exactly_in_both_centering_modes() {
    use dino_train::config::Centering;
    for centering in [Centering::Centering, Centering::SinkhornKnopp] {
        let root = tempfile::tempdir().unwrap();
        let cfg = |dir: &Path| TrainConfig {
            ibot_loss_weight: 1.0,
            centering,
            ..tiny(dir)
        };
        let (reference, dir) = reference_and_resumed(root.path(), cfg);
        assert_same_state(&reference, &dir);
        let (t, _) = final_state(&reference);
        let c = t["ibot_patch_loss.center"]
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        assert_eq!(
            c > 0.0,
            centering == Centering::Centering,
            "{centering:?}: {c}"
        );
        assert!(t.contains_key("student.backbone.mask_token"));
        let log = std::fs::read_to_string(reference.join("log.jsonl")).unwrap();
        assert!(log.contains("\"ibot_loss\""));
    }
    // One step: every trainable parameter has a gradient (after the last-layer freeze: epoch 1).
    let root = tempfile::tempdir().unwrap();
    let cfg = TrainConfig {
        ibot_loss_weight: 1.0,
        ..tiny(root.path())
    };
    let mut trainer = Trainer::new(&cfg, 5, &Device::Cpu).unwrap();
    let crops: Vec<Tensor> = [28, 28, 14, 14]
        .iter()
        .map(|&s| Tensor::randn(0f32, 1.0, (8, 3, s, s), &Device::Cpu).unwrap())
        .collect();
    let st = trainer.step(&crops, 1, 0).unwrap();
    assert_eq!(st.params_with_grad, trainer.params.len());
    assert!(trainer
        .params
        .iter()
        .any(|(n, _)| n == "backbone.mask_token"));
    assert!(st.ibot_loss.is_some_and(|l| l.is_finite() && l > 0.0));
    // Without iBOT there is no mask token and no patch centre.
    let plain = Trainer::new(&tiny(root.path()), 5, &Device::Cpu).unwrap();
    assert!(!plain.params.iter().any(|(n, _)| n == "backbone.mask_token"));
    assert!(!plain
        .state_tensors()
        .unwrap()
        .iter()
        .any(|(n, _)| n.starts_with("ibot")));
}

/// This test binary, run as a child process on the one test `name` (an entry point that does nothing unless
/// its environment variable is set).
fn child_test(name: &str) -> std::process::Command {
    let mut c = std::process::Command::new(std::env::current_exe().unwrap());
    c.args(["--exact", name, "--nocapture", "--test-threads", "1"]);
    c
}

/// Entry point of the child process of `sigkill_mid_training_then_resume_equals_uninterrupted` (does nothing
/// unless `DINO_TRAIN_CHILD_OUT` is set).
#[test]
fn child_process_entry() {
    let Ok(out) = std::env::var("DINO_TRAIN_CHILD_OUT") else {
        return;
    };
    let mut cfg = tiny(Path::new(&out));
    cfg.ckpt_every_iters = 1;
    train(&cfg, &quiet()).unwrap();
}

#[test]
fn sigkill_mid_training_then_resume_equals_uninterrupted() {
    let root = tempfile::tempdir().unwrap();
    let reference = root.path().join("reference");
    let mut cfg = tiny(&reference);
    cfg.ckpt_every_iters = 1;
    train(&cfg, &quiet()).unwrap();

    let dir = root.path().join("killed");
    let mut child = child_test("child_process_entry")
        .env("DINO_TRAIN_CHILD_OUT", &dir)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    // Kill it (SIGKILL) as soon as a mid-run checkpoint is on disk.
    let t0 = Instant::now();
    let mut killed_at = None;
    while t0.elapsed() < Duration::from_secs(60) {
        if let Ok(meta) = checkpoint::load_meta(&weights_path(&dir, LATEST)) {
            if meta.global_iteration >= 2 {
                child.kill().unwrap();
                killed_at = Some(meta.global_iteration);
                break;
            }
        }
        if child.try_wait().unwrap().is_some() {
            break;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    let _ = child.wait();
    assert!(killed_at.is_some(), "the child never wrote a checkpoint");
    let s = train(&cfg.clone_with_output(&dir), &quiet()).unwrap();
    assert!(s.resumed_from.unwrap() >= 2);
    assert_same_state(&reference, &dir);
}

/// Entry point of the child process of `sigterm_stops_after_the_step_with_a_checkpoint` (does nothing unless
/// `DINO_TRAIN_STOP_CHILD_OUT` is set): installs the stop handlers, sends itself SIGUSR1, then trains; the
/// run must stop after its first step, with a checkpoint there (or in its first evaluation, see the body).
#[test]
fn stop_child_process_entry() {
    let Ok(out) = std::env::var("DINO_TRAIN_STOP_CHILD_OUT") else {
        return;
    };
    let mut cfg = tiny(Path::new(&out));
    cfg.ckpt_every_iters = 0; // a mid-epoch checkpoint can only come from the stop
                              // With DINO_TRAIN_STOP_CHILD_EVAL, the run starts with the k-NN baselines, which the signal cuts short.
    let eval = std::env::var_os("DINO_TRAIN_STOP_CHILD_EVAL").is_some();
    if eval {
        (
            cfg.eval_final,
            cfg.eval_every,
            cfg.eval_max_train,
            cfg.eval_max_val,
        ) = (true, 1, 40, 40);
    }
    dino_train::signals::install(true).unwrap();
    // SAFETY: raising a signal this process handles.
    assert_eq!(unsafe { libc::raise(libc::SIGUSR1) }, 0);
    assert_eq!(dino_train::signals::stop_requested(), Some(libc::SIGUSR1));
    let s = train(&cfg, &quiet()).unwrap();
    assert!(s.interrupted);
    let steps = if eval { 0 } else { 1 };
    assert_eq!(
        (s.stopped_by, s.global_iteration),
        (Some(libc::SIGUSR1), steps)
    );
    assert!(s.knn_init.is_none() && s.knn_pixels.is_none() && s.knn_final.is_none());
}

/// Run `stop_child_process_entry` in a child process on `dir` (with the k-NN baselines when `eval`); its
/// assertions must hold.
fn run_stop_child(dir: &Path, eval: bool) {
    let mut c = child_test("stop_child_process_entry");
    c.env("DINO_TRAIN_STOP_CHILD_OUT", dir);
    if eval {
        c.env("DINO_TRAIN_STOP_CHILD_EVAL", "1");
    }
    let out = c.output().unwrap();
    assert!(
        out.status.success(),
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn stop_signal_stops_after_the_step_with_a_checkpoint() {
    let root = tempfile::tempdir().unwrap();
    let reference = reference_run(root.path());
    let dir = root.path().join("stopped");
    run_stop_child(&dir, false);
    // The checkpoint of the step the signal arrived in (inside epoch 0), the lock given back.
    let meta = checkpoint::load_meta(&weights_path(&dir, LATEST)).unwrap();
    assert_eq!(meta.global_iteration, 1);
    assert!(!dir.join("dino.lock").exists());
    // The same configuration resumes it to the uninterrupted run's end, bit for bit.
    let s = train(&tiny(&dir), &quiet()).unwrap();
    assert_eq!((s.resumed_from, s.stopped_by), (Some(1), None));
    assert_same_state(&reference, &dir);
}

#[test]
fn stop_signal_cuts_the_initial_evaluation_short() {
    // The signal arrives before the k-NN of the network at random initialisation: the run stops there,
    // before its first step, with nothing to write (it used to finish both baselines and one step first).
    let root = tempfile::tempdir().unwrap();
    let dir = root.path().join("stopped");
    run_stop_child(&dir, true);
    assert!(!weights_path(&dir, LATEST).exists());
    assert!(!dir.join("dino.lock").exists());
}

trait WithOutput {
    fn clone_with_output(&self, dir: &Path) -> TrainConfig;
}
impl WithOutput for TrainConfig {
    fn clone_with_output(&self, dir: &Path) -> TrainConfig {
        TrainConfig {
            output_dir: dir.to_path_buf(),
            ..self.clone()
        }
    }
}

#[test]
fn changed_config_on_resume_is_refused_naming_the_keys() {
    let root = tempfile::tempdir().unwrap();
    let dir = root.path().join("run");
    let cfg = tiny(&dir);
    train(&cfg, &stop_after(5)).unwrap();
    let changed = TrainConfig {
        lr: 0.02,
        teacher_temp: 0.05,
        ..cfg.clone()
    };
    let err = train(&changed, &quiet()).unwrap_err();
    let msg = err.to_string();
    assert!(matches!(err, Error::ConfigMismatch { .. }), "{msg}");
    assert!(
        msg.contains("lr: 0.01 -> 0.02") && msg.contains("teacher_temp: 0.04 -> 0.05"),
        "{msg}"
    );
    assert!(msg.contains("checkpoint.safetensors"), "{msg}");
    // Keys that do not change the result may differ.
    let cosmetic = TrainConfig {
        log_every: 3,
        num_workers: 2,
        ..cfg.clone()
    };
    let s = train(&cosmetic, &quiet()).unwrap();
    assert_eq!(s.resumed_from, Some(5));
    // Other data is refused too.
    let other_data = TrainConfig {
        max_train_images: 48,
        ..cfg
    };
    let err = train(&other_data, &quiet()).unwrap_err().to_string();
    assert!(err.contains("max_train_images"), "{err}");
}

#[test]
fn non_finite_loss_stops_naming_epoch_and_iteration() {
    // Step level: a NaN input image gives a NaN loss; nothing is updated.
    let cfg = tiny(Path::new("unused"));
    let mut t = Trainer::new(&cfg, 5, &Device::Cpu).unwrap();
    let before = t.student.vars()[0].1.as_tensor().copy().unwrap();
    let mut crops: Vec<Tensor> = (0..2)
        .map(|_| Tensor::zeros((2, 3, 28, 28), DType::F32, &Device::Cpu).unwrap())
        .collect();
    crops.extend((0..2).map(|_| Tensor::zeros((2, 3, 14, 14), DType::F32, &Device::Cpu).unwrap()));
    crops[0] = (crops[0].clone() * f64::NAN).unwrap();
    let err = t.step(&crops, 1, 3).unwrap_err();
    assert!(
        matches!(
            err,
            Error::NonFiniteLoss {
                epoch: 1,
                iteration: 3,
                global_iteration: 8,
                ..
            }
        ),
        "{err}"
    );
    let msg = err.to_string();
    assert!(
        msg.contains("epoch 1") && msg.contains("iteration 3"),
        "{msg}"
    );
    let after = t.student.vars()[0].1.as_tensor().copy().unwrap();
    assert_eq!(
        before.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
        after.flatten_all().unwrap().to_vec1::<f32>().unwrap()
    );

    // Run level: an absurd learning rate blows the weights up; the run stops with the position named and the
    // checkpoint of the last good iteration stays.
    let root = tempfile::tempdir().unwrap();
    let dir = root.path().join("nan");
    let cfg = TrainConfig {
        lr: 1e37,
        warmup_epochs: 0,
        clip_grad: 0.0,
        ckpt_every_iters: 1,
        ..tiny(&dir)
    };
    let err = train(&cfg, &quiet()).unwrap_err();
    let Error::NonFiniteLoss {
        epoch,
        iteration,
        global_iteration,
        ..
    } = err
    else {
        panic!("{err}")
    };
    assert_eq!(epoch * 5 + iteration, global_iteration);
    assert!(global_iteration >= 1);
    let meta = checkpoint::load_meta(&weights_path(&dir, LATEST)).unwrap();
    assert_eq!(
        meta.global_iteration, global_iteration,
        "the last checkpoint is the one before the bad iteration"
    );
    assert!(meta.last_loss.is_finite());
}

/// Entry point of the child process of `second_run_on_a_directory_in_use_refuses_then_takes_over` (does
/// nothing unless `DINO_TRAIN_LOCK_CHILD_OUT` is set): a long run that the parent kills.
#[test]
fn lock_child_process_entry() {
    let Ok(out) = std::env::var("DINO_TRAIN_LOCK_CHILD_OUT") else {
        return;
    };
    let mut cfg = tiny(Path::new(&out));
    cfg.epochs = 1000;
    train(&cfg, &quiet()).unwrap();
}

#[test]
fn second_run_on_a_directory_in_use_refuses_then_takes_over() {
    use dino_train::lock::{host_name, LOCK_FILE};
    let root = tempfile::tempdir().unwrap();
    let dir = root.path().join("busy");
    let mut child = child_test("lock_child_process_entry")
        .env("DINO_TRAIN_LOCK_CHILD_OUT", &dir)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let pid = child.id();
    // Wait until the child holds the lock and has written a checkpoint.
    let t0 = Instant::now();
    while t0.elapsed() < Duration::from_secs(60)
        && checkpoint::load_meta(&weights_path(&dir, LATEST)).is_err()
    {
        assert!(child.try_wait().unwrap().is_none(), "the child ended early");
        std::thread::sleep(Duration::from_millis(10));
    }
    // A second run (same config, or a fresh start) refuses at once, naming the holder.
    let mut cfg = tiny(&dir);
    cfg.epochs = 1000;
    for resume in [true, false] {
        let t = Instant::now();
        let err = train(&cfg, &TrainOptions { resume, ..quiet() }).unwrap_err();
        let msg = err.to_string();
        assert!(matches!(err, Error::Locked { .. }), "{msg}");
        assert!(
            msg.contains(&format!("pid {pid} on host {}", host_name())),
            "{msg}"
        );
        assert!(msg.contains("busy") && !msg.contains('\n'), "{msg}");
        assert!(
            t.elapsed() < Duration::from_secs(5),
            "took {:?}",
            t.elapsed()
        );
    }
    // Readers keep working while the run holds the directory.
    let (tensors, meta) = checkpoint::load(&weights_path(&dir, LATEST), &Device::Cpu).unwrap();
    assert!(!tensors.is_empty() && meta.global_iteration >= 1);
    // kill -9: the lock file stays behind, naming a process that is gone; the next run takes it over.
    child.kill().unwrap();
    child.wait().unwrap();
    assert!(dir.join(LOCK_FILE).exists());
    // The child may have checkpointed again before it died: stop one iteration after wherever it got to
    // (an iteration inside an epoch: the stop is only checked there).
    let at = checkpoint::load_meta(&weights_path(&dir, LATEST))
        .unwrap()
        .global_iteration;
    let stop = (at + 1..).find(|g| g % 5 != 0).unwrap();
    let s = train(&cfg, &stop_after(stop)).unwrap();
    let holder = s.took_over_lock.expect("a stale lock was taken over");
    assert_eq!((holder.pid, holder.host), (pid, host_name()));
    assert!(s.resumed_from.is_some());
    assert!(
        !dir.join(LOCK_FILE).exists(),
        "the lock is removed at the end"
    );
}

/// The lr the official `cosine_scheduler` gives at iteration `g` (after warm-up), written out directly.
fn cosine_lr_at(cfg: &TrainConfig, niter: usize, g: usize) -> f64 {
    let base = cfg.lr * cfg.batch_size as f64 / 256.0;
    let warm = cfg.warmup_epochs * niter;
    assert!(g >= warm);
    let m = (cfg.epochs * niter - warm) as f64;
    cfg.min_lr
        + 0.5 * (base - cfg.min_lr) * (1.0 + (std::f64::consts::PI * (g - warm) as f64 / m).cos())
}

#[test]
fn finished_run_extended_to_more_epochs_rebuilds_the_schedules() {
    let root = tempfile::tempdir().unwrap();
    let dir = root.path().join("run");
    let cfg = tiny(&dir);
    let s = train(&cfg, &quiet()).unwrap();
    assert_eq!(s.global_iteration, 10);
    let longer = TrainConfig {
        epochs: 3,
        ..cfg.clone()
    };
    // Without --extend the new length is refused, naming the key.
    let err = train(&longer, &quiet()).unwrap_err().to_string();
    assert!(err.contains("epochs: 2 -> 3"), "{err}");
    let extend = TrainOptions {
        extend: true,
        ..quiet()
    };
    // With it, any other changed key is still refused (naming only that key), and so is a shorter run.
    let err = train(
        &TrainConfig {
            lr: 0.02,
            ..longer.clone()
        },
        &extend,
    )
    .unwrap_err()
    .to_string();
    assert!(
        err.contains("lr: 0.01 -> 0.02") && !err.contains("epochs"),
        "{err}"
    );
    let err = train(
        &TrainConfig {
            epochs: 1,
            ..cfg.clone()
        },
        &extend,
    )
    .unwrap_err()
    .to_string();
    assert!(
        err.contains("epochs: 2 -> 1") && err.contains("not shortened"),
        "{err}"
    );
    // Extend, interrupted after one more iteration, then resumed plainly (the checkpoint now says 3 epochs).
    let s = train(
        &longer,
        &TrainOptions {
            stop_after_iterations: Some(12),
            ..extend.clone()
        },
    )
    .unwrap();
    assert_eq!(
        (s.resumed_from, s.extended_from_epochs),
        (Some(10), Some(2))
    );
    let s = train(&longer, &quiet()).unwrap();
    assert_eq!((s.resumed_from, s.global_iteration), (Some(12), 15));
    assert_eq!(s.extended_from_epochs, None);
    let (_, meta) = final_state(&dir);
    assert_eq!(meta.config.epochs, 3);
    assert_eq!(
        meta.extensions,
        vec![checkpoint::Extension {
            at_global_iteration: 10,
            from_epochs: 2,
            to_epochs: 3
        }]
    );
    // The log says so, and the third epoch ran on the 3-epoch cosine schedule (the first two on the
    // 2-epoch one, which ended at min_lr).
    let text = std::fs::read_to_string(dir.join("log.jsonl")).unwrap();
    assert_eq!(text.matches("\"kind\":\"extend\"").count(), 1, "{text}");
    let log = dino_train::log::read_log(&dir.join("log.jsonl")).unwrap();
    assert_eq!(log.steps.len(), 15);
    for st in &log.steps {
        let (plan, g) = if st.global_iteration < 10 {
            (&cfg, st.global_iteration)
        } else {
            (&longer, st.global_iteration)
        };
        if g >= 5 {
            let want = cosine_lr_at(plan, 5, g);
            assert!(
                (st.lr - want).abs() <= 1e-12 * want.max(1e-12) + 1e-15,
                "lr at {g}: {} vs {want}",
                st.lr
            );
        }
    }
    assert!(log.steps[10].lr > 3.0 * log.steps[9].lr);
}

/// Entry point of the child process of `a_full_disk_while_checkpointing_keeps_the_last_checkpoint` (does nothing
/// unless `DINO_TRAIN_FSIZE_CHILD_OUT` is set): resumes the run under a file-size limit (RLIMIT_FSIZE, which
/// fails writes with EFBIG as a full disk fails them with ENOSPC) and prints how it ended.
#[test]
fn fsize_child_process_entry() {
    let Ok(out) = std::env::var("DINO_TRAIN_FSIZE_CHILD_OUT") else {
        return;
    };
    let limit: u64 = std::env::var("DINO_TRAIN_FSIZE_LIMIT")
        .unwrap()
        .parse()
        .unwrap();
    // SAFETY: plain libc calls on this process (the default SIGXFSZ action would kill it instead of failing
    // the write).
    unsafe {
        libc::signal(libc::SIGXFSZ, libc::SIG_IGN);
        let r = libc::rlimit {
            rlim_cur: limit,
            rlim_max: limit,
        };
        assert_eq!(libc::setrlimit(libc::RLIMIT_FSIZE, &r), 0);
    }
    match train(&tiny(Path::new(&out)), &quiet()) {
        Ok(_) => println!("RESULT ok"),
        Err(e) => println!("RESULT {}", dino_train::error::one_line_report(&e)),
    }
}

#[test]
fn a_full_disk_while_checkpointing_keeps_the_last_checkpoint() {
    let root = tempfile::tempdir().unwrap();
    let reference = reference_run(root.path());
    let dir = root.path().join("full");
    let cfg = tiny(&dir);
    train(&cfg, &stop_after(4)).unwrap();
    let ck = weights_path(&dir, LATEST);
    let size = std::fs::metadata(&ck).unwrap().len();
    let out = child_test("fsize_child_process_entry")
        .env("DINO_TRAIN_FSIZE_CHILD_OUT", &dir)
        .env("DINO_TRAIN_FSIZE_LIMIT", (size / 2).to_string())
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let line = stdout
        .lines()
        .find_map(|l| l.split_once("RESULT ").map(|x| x.1))
        .unwrap_or_else(|| panic!("no result from the child: {stdout}"));
    // One line naming the file, saying the cause once.
    assert!(line.contains("checkpoint.safetensors"), "{line}");
    assert_eq!(line.matches("(os error 27)").count(), 1, "{line}");
    // The previous checkpoint is intact.
    let (_, meta) = final_state(&dir);
    assert_eq!(meta.global_iteration, 4);
    // With space again, the resumed run ends bit-identical to the uninterrupted one.
    let s = train(&cfg, &quiet()).unwrap();
    assert_eq!(s.resumed_from, Some(4));
    assert_same_state(&reference, &dir);
}

/// The TensorBoard scalars of a run's event file (exactly one), without the wall-clock ones.
fn tensorboard_curves(dir: &Path) -> Vec<(String, i64, f32)> {
    let files = dino_train::tensorboard::event_files(dir);
    assert_eq!(files.len(), 1, "{files:?}");
    let mut v: Vec<(String, i64, f32)> = dino_train::tensorboard::read_scalars(&files[0])
        .unwrap()
        .into_iter()
        .filter(|s| !s.tag.ends_with("_s"))
        .map(|s| (s.tag, s.step, s.value))
        .collect();
    v.sort_by(|a, b| (&a.0, a.1).cmp(&(&b.0, b.1)));
    v
}

#[test]
fn tensorboard_curves_of_a_resumed_run_equal_the_uninterrupted_ones() {
    let root = tempfile::tempdir().unwrap();
    let reference = reference_run(root.path());
    let want = tensorboard_curves(&reference);
    let tags: std::collections::BTreeSet<&str> = want.iter().map(|x| x.0.as_str()).collect();
    for t in [
        "step/loss",
        "step/lr",
        "step/momentum",
        "step/teacher_entropy",
        "epoch/train_loss",
    ] {
        assert!(tags.contains(t), "{t} missing from {tags:?}");
    }
    assert_eq!(want.iter().filter(|x| x.0 == "step/loss").count(), 10);
    // Interrupted after iteration 7 (the last checkpoint at 6), resumed: iteration 6 is logged twice in the
    // log, once in the event file, and every value equals the uninterrupted run's.
    let dir = root.path().join("resumed");
    let cfg = tiny(&dir);
    train(&cfg, &stop_after(7)).unwrap();
    let s = train(&cfg, &quiet()).unwrap();
    assert_eq!(s.resumed_from, Some(6));
    let got = tensorboard_curves(&dir);
    assert_eq!(got, want);
    // TensorBoard itself reads the file, where it is installed (.ci/run installs it into a venv and points
    // DINO_TENSORBOARD_PYTHON at its python).
    let Ok(python) = std::env::var("DINO_TENSORBOARD_PYTHON") else {
        eprintln!("DINO_TENSORBOARD_PYTHON not set: TensorBoard's own reader not run");
        return;
    };
    let script = "import sys\n\
        from tensorboard.backend.event_processing.event_accumulator import EventAccumulator\n\
        a = EventAccumulator(sys.argv[1]); a.Reload()\n\
        for e in a.Scalars('step/loss'): print(e.step, repr(e.value))\n";
    let out = std::process::Command::new(python)
        .args(["-c", script, dir.join("tensorboard").to_str().unwrap()])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let read: Vec<(i64, f32)> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| {
            let (a, b) = l.split_once(' ').unwrap();
            (a.parse().unwrap(), b.parse().unwrap())
        })
        .collect();
    let ours: Vec<(i64, f32)> = want
        .iter()
        .filter(|x| x.0 == "step/loss")
        .map(|x| (x.1, x.2))
        .collect();
    assert_eq!(read, ours);
}
