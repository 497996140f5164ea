//! The 4 official training iterations of `../shared/golden/train_steps.safetensors` (manifest entry
//! `train_steps`): ViT-tiny/16 + DINOHead(192, 1024) from the saved weights, 2 global + 2 local crops, AdamW,
//! clip 3.0, freeze_last_layer 1, EMA; the same images every iteration. Each step's loss, lr, wd, momentum,
//! teacher temperature, per-parameter clip norms, number of parameters reaching AdamW, and per-parameter
//! sums of the student (sum and sum of squares) and teacher must match; then the centres, the final tensors
//! and the Adam moments; also with the student's crops in passes (per resolution, per crop).

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;

use candle_core::{DType, Tensor, Var};
use candle_nn::VarMap;
use dino_train::model::DinoNetwork;
use dino_train::{MatmulPrecision, StudentPasses, TrainConfig, Trainer};
use serde_json::Value;

/// The device these checks run on: the CPU, or GPU 0 under `DINO_TEST_DEVICE=cuda` (`cargo xtask gpu-check`).
fn tdev() -> candle_core::Device {
    dino_models::dispatch::test_device()
}

fn golden(name: &str) -> PathBuf {
    PathBuf::from(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../../../shared/golden/"
    ))
    .join(name)
}

fn load(name: &str) -> HashMap<String, Tensor> {
    candle_core::safetensors::load(golden(name), &tdev()).unwrap()
}

/// Gradients pass through 12 blocks of fp32 arithmetic summed in another order than torch's: the per-parameter
/// gradient norms agree to a few 1e-4 relative (the loss and parameter sums to 1e-4, the manifest's tolerance).
const CLIP_NORM_RTOL: f64 = 1e-3;

fn close(got: f64, want: f64, rtol: f64, atol: f64) -> bool {
    (got - want).abs() <= atol + rtol * want.abs()
}

fn sum_f64(t: &Tensor) -> (f64, f64) {
    let v = t
        .flatten_all()
        .unwrap()
        .to_dtype(DType::F64)
        .unwrap()
        .to_vec1::<f64>()
        .unwrap();
    (v.iter().sum(), v.iter().map(|x| x * x).sum())
}

fn max_abs_diff(a: &Tensor, b: &Tensor) -> f64 {
    (a.to_dtype(DType::F64).unwrap() - b.to_dtype(DType::F64).unwrap())
        .unwrap()
        .abs()
        .unwrap()
        .flatten_all()
        .unwrap()
        .max(0)
        .unwrap()
        .to_scalar::<f64>()
        .unwrap()
}

/// The trainer of the golden run (student and teacher from the saved official weights) and its 4 crops.
fn golden_trainer(matmul_precision: MatmulPrecision) -> (Trainer, Vec<Tensor>) {
    golden_trainer_with(matmul_precision, false, StudentPasses::All)
}

/// [`golden_trainer`] with `head_last_layer_bf16` and `student_passes` set as given.
fn golden_trainer_with(
    matmul_precision: MatmulPrecision,
    head_last_layer_bf16: bool,
    student_passes: StudentPasses,
) -> (Trainer, Vec<Tensor>) {
    // The run of the golden file: lr 0.0005 * 512 / 256 = 1e-3, 100 epochs x 2 it, 2 warm-up epochs,
    // teacher temp 0.04 -> 0.07 over 30 epochs, drop path 0, 2 local crops.
    let cfg = TrainConfig {
        arch: "vit_tiny".into(),
        patch_size: 16,
        img_size: 224,
        out_dim: 1024,
        drop_path_rate: 0.0,
        batch_size: 512,
        epochs: 100,
        warmup_epochs: 2,
        lr: 0.0005,
        min_lr: 1e-6,
        warmup_teacher_temp: 0.04,
        teacher_temp: 0.07,
        warmup_teacher_temp_epochs: 30,
        local_crops_number: 2,
        clip_grad: 3.0,
        freeze_last_layer: 1,
        matmul_precision,
        head_last_layer_bf16,
        student_passes,
        ..TrainConfig::default()
    };

    // Student variables from the saved official weights (backbone.*, head.*).
    let varmap = VarMap::new();
    {
        let mut data = varmap.data().lock().unwrap();
        for (file, prefix) in [
            ("vit_tiny16_weights.safetensors", "backbone"),
            ("dino_head_weights.safetensors", "head"),
        ] {
            for (k, t) in load(file) {
                data.insert(format!("{prefix}.{k}"), Var::from_tensor(&t).unwrap());
            }
        }
    }
    let n_vars = varmap.all_vars().len();
    let student = DinoNetwork::build_on(&cfg, varmap, 0, 0.0, &tdev()).unwrap();
    assert_eq!(
        student.vars().len(),
        n_vars,
        "building the network must not create variables"
    );
    let trainer = Trainer::from_student(&cfg, student, 2, &tdev()).unwrap();

    let io = load("vit_tiny16_io.safetensors");
    let (x224, x96) = (&io["x224"], &io["x96"]);
    let crops = vec![
        x224.narrow(0, 0, 1).unwrap(),
        x224.narrow(0, 1, 1).unwrap(),
        x96.narrow(0, 0, 1).unwrap(),
        x96.narrow(0, 1, 1).unwrap(),
    ];
    (trainer, crops)
}

#[test]
fn reproduces_the_four_official_training_iterations() {
    official_iterations(StudentPasses::All);
}

/// The student's crops in two passes (the 2 global crops, then the 2 local ones), each freed by its
/// backward before the next: the same 4 official iterations, to the same tolerances.
#[test]
fn reproduces_the_official_iterations_in_one_pass_per_resolution() {
    official_iterations(StudentPasses::Resolution);
}

/// One pass per crop (4 passes): the same 4 official iterations.
#[test]
fn reproduces_the_official_iterations_in_one_pass_per_crop() {
    official_iterations(StudentPasses::Crop);
}

/// The 4 iterations of the official run, step by step (loss, schedules, clip norms, per-parameter sums,
/// centre) and at the end (every parameter, the teacher and Adam's moments), with the student's crops in
/// the given passes.
fn official_iterations(passes: StudentPasses) {
    let manifest: Value =
        serde_json::from_str(&std::fs::read_to_string(golden("manifest.json")).unwrap()).unwrap();
    let entry = &manifest["train_steps"];

    let (mut trainer, crops) = golden_trainer_with(MatmulPrecision::Highest, false, passes);
    let gold = load("train_steps.safetensors");

    let mut lr_sum = 0.0;
    for (i, want) in entry["steps"].as_array().unwrap().iter().enumerate() {
        let (epoch, it) = (want["epoch"].as_u64().unwrap() as usize, i % 2);
        assert_eq!(want["it"].as_u64().unwrap() as usize, i);
        let s = trainer.step(&crops, epoch, it).unwrap();
        lr_sum += s.lr;
        let f = |k: &str| want[k].as_f64().unwrap();
        assert!(
            close(s.loss, f("loss"), 1e-4, 0.0),
            "step {i}: loss {} vs {}",
            s.loss,
            f("loss")
        );
        for (name, got) in [
            ("lr", s.lr),
            ("wd", s.wd),
            ("momentum", s.momentum),
            ("teacher_temp", s.teacher_temp),
        ] {
            assert!(
                close(got, f(name), 1e-12, 1e-15),
                "step {i}: {name} {got} vs {}",
                f(name)
            );
        }
        assert_eq!(
            s.params_with_grad as u64,
            want["params_with_grad_after_cancel"].as_u64().unwrap(),
            "step {i}"
        );
        let norms = want["clip_norms"].as_object().unwrap();
        assert_eq!(
            s.clip_norms.len(),
            norms.len(),
            "step {i}: number of clipped parameters"
        );
        let mut worst = (0.0f64, String::new());
        for (name, got) in &s.clip_norms {
            let w = norms[name.as_str()].as_f64().unwrap();
            let rel = (got - w).abs() / w.abs().max(1e-12);
            if rel > worst.0 {
                worst = (rel, name.clone());
            }
        }
        eprintln!(
            "step {i}: loss {} vs {}; worst clip-norm rel err {:e} ({})",
            s.loss,
            f("loss"),
            worst.0,
            worst.1
        );
        assert!(
            worst.0 < CLIP_NORM_RTOL,
            "step {i}: clip norm of {} off by {:e} relative",
            worst.1,
            worst.0
        );
        // Per-parameter sums: rtol 1e-4 with an absolute floor for sums that nearly cancel.
        let by_name = |net: &DinoNetwork| -> BTreeMap<String, Tensor> {
            net.vars()
                .into_iter()
                .map(|(n, v)| (n, v.as_tensor().clone()))
                .collect()
        };
        let (sv, tv) = (by_name(&trainer.student), by_name(&trainer.teacher));
        let mut bad = Vec::new();
        for (key, vars, sq) in [
            ("student_sum", &sv, false),
            ("student_sqsum", &sv, true),
            ("teacher_sum", &tv, false),
        ] {
            let sums = want[key].as_object().unwrap();
            assert_eq!(
                sums.len(),
                vars.len(),
                "step {i}: {key} covers every parameter"
            );
            for (name, w) in sums {
                let t = &vars[name.as_str()];
                let (s1, s2) = sum_f64(t);
                let got = if sq { s2 } else { s1 };
                // Floor: 1e-5 of the tensor's l1 scale (sqrt(n * sqsum)), for sums of values of both signs.
                let mut atol = 1e-5 * ((t.elem_count() as f64) * s2).sqrt();
                if name.ends_with("attn.qkv.bias") {
                    // The key third of the qkv bias has an analytically zero gradient (softmax ignores a
                    // per-row constant), so its fp32 gradient is rounding noise that AdamW normalises into
                    // steps of up to ~lr: allow D * (sum of lr so far) on the sum. The q and v thirds are
                    // checked element-wise at the end (`final_*blocks.11.attn.qkv.bias`).
                    atol += 192.0 * lr_sum;
                }
                if !close(got, w.as_f64().unwrap(), 1e-4, atol) {
                    bad.push(format!(
                        "step {i}: {key} of {name}: {got} vs {w} (atol {atol:e})"
                    ));
                }
            }
        }
        assert!(
            bad.is_empty(),
            "{} sums differ:\n{}",
            bad.len(),
            bad.join("\n")
        );
        let c = &gold[&format!("step{i}_center")];
        let d = max_abs_diff(trainer.loss.center(), c);
        let scale = c
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap() as f64;
        assert!(
            d <= 1e-4 * scale + 1e-6,
            "step {i}: centre differs by {d} (scale {scale})"
        );
    }

    // Final tensors and Adam moments.
    let sv: HashMap<String, Tensor> = trainer
        .student
        .vars()
        .into_iter()
        .map(|(n, v)| (n, v.as_tensor().clone()))
        .collect();
    let tv: HashMap<String, Tensor> = trainer
        .teacher
        .vars()
        .into_iter()
        .map(|(n, v)| (n, v.as_tensor().clone()))
        .collect();
    let adam = match &trainer.optimizer {
        dino_train::trainer::RunOptimizer::AdamW(o) => o.state_tensors().unwrap(),
        _ => unreachable!(),
    };
    let mut checked = 0;
    for (key, want) in &gold {
        let (got, what) = if let Some(n) = key.strip_prefix("final_student.") {
            (sv[n].clone(), "student")
        } else if let Some(n) = key.strip_prefix("final_teacher.") {
            (tv[n].clone(), "teacher")
        } else if let Some(n) = key.strip_prefix("final_adam_exp_avg_sq.") {
            (adam[&format!("exp_avg_sq.{n}")].clone(), "exp_avg_sq")
        } else if let Some(n) = key.strip_prefix("final_adam_exp_avg.") {
            (adam[&format!("exp_avg.{n}")].clone(), "exp_avg")
        } else {
            continue;
        };
        let scale = want
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap() as f64;
        if key.ends_with("attn.qkv.bias") {
            // q and v thirds element-wise; the k third (zero true gradient, see above) within sum(lr).
            let d = 192;
            let dk = max_abs_diff(
                &got.narrow(0, d, d).unwrap(),
                &want.narrow(0, d, d).unwrap(),
            );
            assert!(
                dk <= lr_sum,
                "{what} {key}: key bias differs by {dk} > sum of lr {lr_sum}"
            );
            let (got, want) = (
                Tensor::cat(
                    &[
                        got.narrow(0, 0, d).unwrap(),
                        got.narrow(0, 2 * d, d).unwrap(),
                    ],
                    0,
                )
                .unwrap(),
                Tensor::cat(
                    &[
                        want.narrow(0, 0, d).unwrap(),
                        want.narrow(0, 2 * d, d).unwrap(),
                    ],
                    0,
                )
                .unwrap(),
            );
            let diff = max_abs_diff(&got, &want);
            assert!(
                diff <= 1e-4 * scale + 1e-7,
                "{what} {key} (q, v): max |diff| {diff} (scale {scale})"
            );
            checked += 1;
            continue;
        }
        let d = max_abs_diff(&got, want);
        assert!(
            d <= 1e-4 * scale + 1e-7,
            "{what} {key}: max |diff| {d} (scale {scale})"
        );
        checked += 1;
    }
    assert_eq!(checked, 22);
    // Per-parameter step counts: the last layer skipped the 2 frozen iterations.
    let steps = |n: &str| {
        adam[&format!("step.{n}")]
            .to_dtype(DType::F64)
            .unwrap()
            .to_vec1::<f64>()
            .unwrap()[0]
    };
    assert_eq!(steps("backbone.cls_token"), 4.0);
    assert_eq!(steps("head.last_layer.weight_v"), 2.0);
}

/// The same 4 official iterations with the linear layers' products in bf16: every loss and clip norm stays
/// within mixed-precision distance of the official f32 run (bf16 keeps 8 significant bits, 2^-8 = 0.4%
/// relative per operand; the sums of products average most of it out), and the bf16 products really ran
/// (the losses are not the f32 ones). Without AVX-512 BF16 the setting falls back to f32.
#[test]
fn bf16_matmuls_stay_within_mixed_precision_distance_of_the_official_iterations() {
    use dino_kernels::bf16::Bf16Gemm;
    // The vdpbf16ps kernel wherever the CPU has it, even where `Auto` would not take it (Intel Xeons run it at
    // half their f32 rate), then the AMX kernel where the CPU offers it: this test is the kernels'.
    bf16_steps(Bf16Gemm::Always, false);
    if dino_kernels::bf16::amx_test_pass_runs("the golden bf16 steps") {
        bf16_steps(Bf16Gemm::Amx, false);
    }
}

/// The same with `head_last_layer_bf16` (the head's last layer in bf16 too, as PyTorch's autocast runs it),
/// on the AMX kernel where the CPU offers it, else `vdpbf16ps`.
#[test]
fn bf16_head_last_layer_stays_within_mixed_precision_distance_of_the_official_iterations() {
    use dino_kernels::bf16::Bf16Gemm;
    let mode = if dino_kernels::bf16::amx_test_pass_runs("the golden bf16 steps, head in bf16") {
        Bf16Gemm::Amx
    } else {
        Bf16Gemm::Always
    };
    bf16_steps(mode, true);
}

fn bf16_steps(mode: dino_kernels::bf16::Bf16Gemm, head_last_layer_bf16: bool) {
    eprintln!("bf16 kernel mode {mode:?}, head_last_layer_bf16 {head_last_layer_bf16}");
    dino_kernels::bf16::with_bf16_gemm(mode, || {
        let manifest: Value =
            serde_json::from_str(&std::fs::read_to_string(golden("manifest.json")).unwrap())
                .unwrap();
        let (mut trainer, crops) = golden_trainer_with(
            MatmulPrecision::Bf16,
            head_last_layer_bf16,
            StudentPasses::All,
        );
        let (mut f32_trainer, _) = golden_trainer(MatmulPrecision::Highest);
        for (i, want) in manifest["train_steps"]["steps"]
            .as_array()
            .unwrap()
            .iter()
            .enumerate()
        {
            let epoch = want["epoch"].as_u64().unwrap() as usize;
            let s = trainer.step(&crops, epoch, i % 2).unwrap();
            let f = f32_trainer.step(&crops, epoch, i % 2).unwrap();
            let loss = want["loss"].as_f64().unwrap();
            assert!(
                close(s.loss, loss, 5e-3, 0.0),
                "step {i}: bf16 loss {} vs {loss}",
                s.loss
            );
            if MatmulPrecision::bf16_supported() {
                assert_ne!(s.loss, f.loss, "step {i}: bf16 gave the f32 loss");
            }
            let norms = want["clip_norms"].as_object().unwrap();
            let worst = s
                .clip_norms
                .iter()
                .map(|(n, g)| (g - norms[n.as_str()].as_f64().unwrap()).abs() / g.abs().max(1e-4))
                .fold(0.0, f64::max);
            eprintln!(
                "step {i}: bf16 loss rel err {:e}, worst clip-norm rel err {worst:e}",
                (s.loss - loss).abs() / loss
            );
            for (name, got) in &s.clip_norms {
                let w = norms[name.as_str()].as_f64().unwrap();
                assert!(
                    close(*got, w, 3e-2, 1e-4),
                    "step {i}: clip norm of {name} {got} vs {w}"
                );
            }
        }
        assert_eq!(
            dino_models::matmul_precision(),
            MatmulPrecision::Highest,
            "the step restores the thread's precision"
        );
    })
}

dino_kernels::portable_path_tests!(
    reproduces_the_four_official_training_iterations,
    reproduces_the_official_iterations_in_one_pass_per_crop,
    bf16_matmuls_stay_within_mixed_precision_distance_of_the_official_iterations,
);
