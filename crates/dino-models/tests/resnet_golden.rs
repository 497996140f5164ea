//! ResNet-18 against torchvision (`../shared/golden-aug/resnet_io.safetensors`): eval and train stage
//! outputs, BatchNorm buffers after one train forward, and the eval output after it.

use std::collections::{BTreeMap, HashMap};

use candle_core::{DType, Tensor};
use candle_nn::{VarBuilder, VarMap};
use dino_models::resnet::{ResNet, ResNetConfig};
use dino_models::Backbone;

/// The device these checks run on: the CPU, or GPU 0 under `DINO_TEST_DEVICE=cuda` (`cargo xtask gpu-check`).
fn tdev() -> candle_core::Device {
    dino_models::dispatch::test_device()
}

const GOLDEN: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../../../shared/golden-aug/");

fn golden(file: &str) -> HashMap<String, Tensor> {
    candle_core::safetensors::load(format!("{GOLDEN}{file}"), &tdev())
        .unwrap_or_else(|e| panic!("cannot read {GOLDEN}{file}: {e}"))
}

/// Builds ResNet-18 on a fresh VarMap and copies every tensor of the golden weights into it, checking that
/// the two key sets, the shapes and the dtypes agree exactly.
fn resnet18_from_golden() -> (ResNet, VarMap) {
    let weights = golden("resnet18_weights.safetensors");
    let varmap = VarMap::new();
    let vb = VarBuilder::from_varmap(&varmap, DType::F32, &tdev());
    let model = ResNet::new(ResNetConfig::resnet18(), vb).unwrap();
    let vars = varmap.data().lock().unwrap();
    let ours: BTreeMap<_, _> = vars
        .iter()
        .map(|(k, v)| (k.clone(), (v.dims().to_vec(), v.dtype())))
        .collect();
    let theirs: BTreeMap<_, _> = weights
        .iter()
        .map(|(k, v)| (k.clone(), (v.dims().to_vec(), v.dtype())))
        .collect();
    assert_eq!(
        ours, theirs,
        "parameter names/shapes/dtypes differ from torchvision's resnet18"
    );
    for (name, var) in vars.iter() {
        var.set(&weights[name])
            .unwrap_or_else(|e| panic!("set {name}: {e}"));
    }
    drop(vars);
    (model, varmap)
}

/// max |a - b| over all elements.
fn max_abs_diff(a: &Tensor, b: &Tensor) -> f32 {
    assert_eq!(a.dims(), b.dims());
    (a - b)
        .unwrap()
        .abs()
        .unwrap()
        .flatten_all()
        .unwrap()
        .max(0)
        .unwrap()
        .to_scalar::<f32>()
        .unwrap()
}

fn max_abs(a: &Tensor) -> f32 {
    a.abs()
        .unwrap()
        .flatten_all()
        .unwrap()
        .max(0)
        .unwrap()
        .to_scalar::<f32>()
        .unwrap()
}

fn check_stages(model: &ResNet, io: &HashMap<String, Tensor>, mode: &str) {
    let x = &io["input"];
    let st = model.forward_stages(x, mode == "train").unwrap();
    let ours = [
        ("maxpool", &st.maxpool),
        ("layer1", &st.layers[0]),
        ("layer2", &st.layers[1]),
        ("layer3", &st.layers[2]),
        ("layer4", &st.layers[3]),
        ("avgpool", &st.avgpool),
        ("out", &st.out),
    ];
    for (name, t) in ours {
        let g = &io[&format!("resnet18/{mode}/{name}")];
        let d = max_abs_diff(t, g);
        // Manifest: eval rtol 1e-4 relative to the output's abs max; train atol 1e-4.
        let tol = if mode == "eval" {
            1e-4 * max_abs(g)
        } else {
            1e-4
        };
        assert!(
            d <= tol,
            "resnet18 {mode} {name}: max |diff| {d:e} > {tol:e} (shape {:?})",
            g.dims()
        );
    }
}

#[test]
fn resnet18_eval_train_and_running_stats_match_torchvision() {
    let io = golden("resnet_io.safetensors");
    let (model, varmap) = resnet18_from_golden();
    assert_eq!(model.embed_dim(), 512);

    // 1. eval forward: running stats untouched.
    check_stages(&model, &io, "eval");
    let nbt = varmap.data().lock().unwrap()["bn1.num_batches_tracked"]
        .as_tensor()
        .to_scalar::<i64>()
        .unwrap();
    assert_eq!(nbt, 0, "an eval forward must not touch num_batches_tracked");

    // 2. one train forward: batch statistics, and every BN buffer updated as torch does.
    check_stages(&model, &io, "train");
    let vars = varmap.data().lock().unwrap();
    let prefix = "resnet18/after_train_forward/";
    let mut n_buffers = 0;
    for (key, want) in io.iter().filter(|(k, _)| k.starts_with(prefix)) {
        let name = &key[prefix.len()..];
        let got = vars
            .get(name)
            .unwrap_or_else(|| panic!("no buffer {name} in the VarMap"))
            .as_tensor();
        if name.ends_with("num_batches_tracked") {
            assert_eq!(got.dtype(), DType::I64);
            assert_eq!(
                got.to_scalar::<i64>().unwrap(),
                want.to_scalar::<i64>().unwrap(),
                "{name}"
            );
        } else {
            // Manifest: running stats rtol 1e-5.
            let d = (got - want).unwrap().abs().unwrap();
            let bound = ((want.abs().unwrap() * 1e-5).unwrap() + 1e-6).unwrap();
            let bad = d
                .gt(&bound)
                .unwrap()
                .to_dtype(DType::F32)
                .unwrap()
                .sum_all()
                .unwrap()
                .to_scalar::<f32>()
                .unwrap();
            assert_eq!(
                bad,
                0.0,
                "{name}: {bad} values off by more than rtol 1e-5 (max diff {:e})",
                max_abs_diff(got, want)
            );
        }
        n_buffers += 1;
    }
    assert_eq!(
        n_buffers,
        20 * 3,
        "expected the 3 buffers of all 20 BatchNorm2d layers"
    );
    drop(vars);

    // 3. eval forward with the updated running statistics.
    let out = model.forward_features(&io["input"], false).unwrap();
    let g = &io["resnet18/eval_after_train_forward/out"];
    let d = max_abs_diff(&out, g);
    assert!(
        d <= 1e-4 * max_abs(g),
        "eval after train forward: max |diff| {d:e}"
    );
}

#[test]
fn resnet18_loads_directly_from_safetensors() {
    // The inference path: a VarBuilder over the file (no VarMap), int64 num_batches_tracked included.
    let path = format!("{GOLDEN}resnet18_weights.safetensors");
    let vb = unsafe { VarBuilder::from_mmaped_safetensors(&[path], DType::F32, &tdev()) }.unwrap();
    let model = ResNet::new(ResNetConfig::resnet18(), vb).unwrap();
    let io = golden("resnet_io.safetensors");
    check_stages(&model, &io, "eval");
}

#[test]
fn resnet18_loads_through_the_strict_backbone_loader() {
    // dino_models::weights::load_backbone on the torchvision file (int64 num_batches_tracked cast onto our
    // i64 variables), then the same eval outputs.
    let varmap = VarMap::new();
    let vb = VarBuilder::from_varmap(&varmap, DType::F32, &tdev());
    let model = ResNet::new(ResNetConfig::resnet18(), vb).unwrap();
    let path = format!("{GOLDEN}resnet18_weights.safetensors");
    let report = dino_models::weights::load_backbone(&varmap, &path, &Default::default()).unwrap();
    assert_eq!(report.loaded.len(), 120, "{:?}", report.ignored);
    check_stages(&model, &golden("resnet_io.safetensors"), "eval");
    // A CIFAR-stem network cannot take these weights: the error names conv1 and both shapes.
    let varmap = VarMap::new();
    let vb = VarBuilder::from_varmap(&varmap, DType::F32, &tdev());
    ResNet::new(ResNetConfig::resnet18_cifar(), vb).unwrap();
    let e = dino_models::weights::load_backbone(&varmap, &path, &Default::default())
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("conv1.weight") && e.contains("[64, 3, 3, 3]") && e.contains("[64, 3, 7, 7]"),
        "{e}"
    );
}

dino_kernels::portable_path_tests!(resnet18_eval_train_and_running_stats_match_torchvision,);
