//! ResNet architecture: torchvision parameter names, shapes and counts (ResNet-50 against the golden
//! manifest's key list), initialisation statistics, stage shapes of both stems, and input errors.

use std::collections::BTreeMap;

use candle_core::{DType, Device, Tensor};
use candle_nn::{VarBuilder, VarMap};
use dino_models::resnet::{is_batch_norm_buffer, ResNet, ResNetConfig, Stem};
use dino_models::Backbone;

const MANIFEST: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/../../../shared/golden-aug/manifest.json"
);

fn build(cfg: ResNetConfig) -> (ResNet, VarMap) {
    let varmap = VarMap::new();
    let vb = VarBuilder::from_varmap(&varmap, DType::F32, &Device::Cpu);
    (ResNet::new(cfg, vb).unwrap(), varmap)
}

/// name -> (shape, dtype as torch spells it)
fn our_keys(varmap: &VarMap) -> BTreeMap<String, (Vec<usize>, String)> {
    let vars = varmap.data().lock().unwrap();
    vars.iter()
        .map(|(k, v)| {
            let dt = match v.dtype() {
                DType::F32 => "float32",
                DType::I64 => "int64",
                other => panic!("unexpected dtype {other:?} for {k}"),
            };
            (k.clone(), (v.dims().to_vec(), dt.to_string()))
        })
        .collect()
}

fn manifest_keys(arch: &str) -> BTreeMap<String, (Vec<usize>, String)> {
    let text =
        std::fs::read_to_string(MANIFEST).unwrap_or_else(|e| panic!("cannot read {MANIFEST}: {e}"));
    let m: serde_json::Value = serde_json::from_str(&text).unwrap();
    let case = m["sections"]["resnet"]["cases"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["arch"] == arch)
        .unwrap_or_else(|| panic!("no {arch} case in the manifest"));
    case["state_dict_keys"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| {
            let name = e[0].as_str().unwrap().to_string();
            let shape = e[1]
                .as_array()
                .unwrap()
                .iter()
                .map(|d| d.as_u64().unwrap() as usize)
                .collect();
            (name, (shape, e[2].as_str().unwrap().to_string()))
        })
        .collect()
}

fn trainable_count(varmap: &VarMap) -> usize {
    let vars = varmap.data().lock().unwrap();
    vars.iter()
        .filter(|(k, _)| !is_batch_norm_buffer(k))
        .map(|(_, v)| v.elem_count())
        .sum()
}

#[test]
fn resnet50_names_shapes_and_count_match_torchvision() {
    let (model, varmap) = build(ResNetConfig::resnet50());
    let ours = our_keys(&varmap);
    let theirs = manifest_keys("resnet50");
    assert_eq!(theirs.len(), 318);
    for (k, v) in &theirs {
        assert_eq!(ours.get(k), Some(v), "resnet50 key {k}");
    }
    assert_eq!(
        ours.len(),
        theirs.len(),
        "extra keys: {:?}",
        ours.keys()
            .filter(|k| !theirs.contains_key(*k))
            .collect::<Vec<_>>()
    );
    // torchvision resnet50: 25,557,032 parameters, of which fc holds 2048 * 1000 + 1000.
    assert_eq!(trainable_count(&varmap), 23_508_032);
    assert_eq!(model.embed_dim(), 2048);
}

#[test]
fn resnet18_names_shapes_and_count_match_torchvision() {
    let (model, varmap) = build(ResNetConfig::resnet18());
    assert_eq!(our_keys(&varmap), manifest_keys("resnet18"));
    // torchvision resnet18: 11,689,512 parameters, minus fc (512 * 1000 + 1000).
    assert_eq!(trainable_count(&varmap), 11_176_512);
    assert_eq!(model.embed_dim(), 512);
}

#[test]
fn other_presets_have_torchvision_parameter_counts() {
    // torchvision totals minus fc: resnet34 21,797,672 - 513,000; resnet101 44,549,160 - 2,049,000.
    let (_, vm) = build(ResNetConfig::resnet34());
    assert_eq!(trainable_count(&vm), 21_284_672);
    let (_, vm) = build(ResNetConfig::resnet101());
    assert_eq!(trainable_count(&vm), 42_500_160);
    assert_eq!(
        ResNetConfig::by_name("resnet50_cifar"),
        Some(ResNetConfig::resnet50().cifar())
    );
    assert_eq!(
        ResNetConfig::by_name("resnet18"),
        Some(ResNetConfig::resnet18())
    );
    assert_eq!(ResNetConfig::by_name("vit_small"), None);
}

#[test]
fn cifar_stem_names_and_shapes() {
    let (model, varmap) = build(ResNetConfig::resnet18_cifar());
    assert_eq!(model.config().stem, Stem::Cifar);
    let ours = our_keys(&varmap);
    let mut theirs = manifest_keys("resnet18");
    theirs.insert("conv1.weight".into(), (vec![64, 3, 3, 3], "float32".into()));
    assert_eq!(ours, theirs);
    assert_eq!(trainable_count(&varmap), 11_176_512 - 64 * 3 * (49 - 9));

    let x = Tensor::randn(0f32, 1., (2, 3, 32, 32), &Device::Cpu).unwrap();
    let st = model.forward_stages(&x, false).unwrap();
    assert_eq!(st.maxpool.dims(), &[2, 64, 32, 32]);
    assert_eq!(st.layers[0].dims(), &[2, 64, 32, 32]);
    assert_eq!(st.layers[1].dims(), &[2, 128, 16, 16]);
    assert_eq!(st.layers[2].dims(), &[2, 256, 8, 8]);
    assert_eq!(st.layers[3].dims(), &[2, 512, 4, 4]);
    assert_eq!(st.avgpool.dims(), &[2, 512, 1, 1]);
    assert_eq!(st.out.dims(), &[2, 512]);
}

#[test]
fn imagenet_stem_stage_shapes_on_odd_sizes() {
    let (model, _) = build(ResNetConfig::resnet18());
    // 33 x 45: conv1 -> 17 x 23, maxpool -> 9 x 12, then 9x12, 5x6, 3x3, 2x2 (torch's floor arithmetic).
    let x = Tensor::randn(0f32, 1., (1, 3, 33, 45), &Device::Cpu).unwrap();
    let st = model.forward_stages(&x, false).unwrap();
    assert_eq!(st.maxpool.dims(), &[1, 64, 9, 12]);
    assert_eq!(st.layers[1].dims(), &[1, 128, 5, 6]);
    assert_eq!(st.layers[2].dims(), &[1, 256, 3, 3]);
    assert_eq!(st.layers[3].dims(), &[1, 512, 2, 2]);
    assert_eq!(model.forward_features(&x, false).unwrap().dims(), &[1, 512]);
}

#[test]
fn initialisation_follows_torchvision() {
    let (_, varmap) = build(ResNetConfig::resnet18());
    let vars = varmap.data().lock().unwrap();
    let stats = |name: &str| {
        let t = vars[name]
            .as_tensor()
            .flatten_all()
            .unwrap()
            .to_dtype(DType::F64)
            .unwrap();
        let v = t.to_vec1::<f64>().unwrap();
        let n = v.len() as f64;
        let mean = v.iter().sum::<f64>() / n;
        let std = (v.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / n).sqrt();
        (mean, std, v.len())
    };
    // kaiming_normal_(fan_out, relu): std = sqrt(2 / (c_out * k * k)).
    for (name, fan_out) in [
        ("layer4.1.conv2.weight", 512 * 9),
        ("layer3.0.downsample.0.weight", 256),
        ("conv1.weight", 64 * 49),
    ] {
        let (mean, std, n) = stats(name);
        let want = (2.0 / fan_out as f64).sqrt();
        let se = want / (n as f64).sqrt();
        assert!(mean.abs() < 5.0 * se, "{name}: mean {mean}");
        assert!(
            (std / want - 1.0).abs() < 5.0 / (2.0 * n as f64).sqrt() + 1e-3,
            "{name}: std {std} vs {want}"
        );
    }
    for (name, want) in [
        ("bn1.weight", 1.0),
        ("bn1.bias", 0.0),
        ("layer2.0.bn2.running_mean", 0.0),
        ("layer2.0.bn2.running_var", 1.0),
    ] {
        let (mean, std, _) = stats(name);
        assert_eq!((mean, std), (want, 0.0), "{name}");
    }
    assert_eq!(
        vars["layer1.0.bn1.num_batches_tracked"]
            .as_tensor()
            .to_scalar::<i64>()
            .unwrap(),
        0
    );
}

#[test]
fn zero_init_residual_zeroes_the_last_bn_of_each_block() {
    let cfg = ResNetConfig {
        zero_init_residual: true,
        ..ResNetConfig::resnet50()
    };
    let (_, varmap) = build(cfg);
    let vars = varmap.data().lock().unwrap();
    let sum = |n: &str| {
        vars[n]
            .as_tensor()
            .abs()
            .unwrap()
            .sum_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap()
    };
    assert_eq!(sum("layer1.0.bn3.weight"), 0.0);
    assert_eq!(sum("layer1.0.bn2.weight"), 64.0);
    assert_eq!(sum("layer1.0.downsample.1.weight"), 256.0);
}

#[test]
fn bad_inputs_are_errors_naming_the_shape() {
    let (model, _) = build(ResNetConfig::resnet18_cifar());
    let x = Tensor::zeros((2, 1, 32, 32), DType::F32, &Device::Cpu).unwrap();
    let e = model.forward_features(&x, false).unwrap_err().to_string();
    assert!(
        e.contains("3 input channels") && e.contains("[2, 1, 32, 32]"),
        "{e}"
    );
    let x = Tensor::zeros((3, 32, 32), DType::F32, &Device::Cpu).unwrap();
    let e = model.forward_features(&x, false).unwrap_err().to_string();
    assert!(
        e.contains("(B, 3, H, W)") && e.contains("[3, 32, 32]"),
        "{e}"
    );
    // A single value per channel cannot give batch statistics (torch raises the same).
    let (model, _) = build(ResNetConfig::resnet18());
    let x = Tensor::zeros((1, 3, 32, 32), DType::F32, &Device::Cpu).unwrap();
    let e = model.forward_features(&x, true).unwrap_err().to_string();
    assert!(
        e.contains("layer4") && e.contains("more than 1 value per channel"),
        "{e}"
    );
    let bad = ResNetConfig {
        layers: [2, 0, 2, 2],
        ..ResNetConfig::resnet18()
    };
    let vm = VarMap::new();
    let e = ResNet::new(bad, VarBuilder::from_varmap(&vm, DType::F32, &Device::Cpu))
        .unwrap_err()
        .to_string();
    assert!(e.contains("layers"), "{e}");
}

#[test]
fn seeded_init_is_reproducible_and_keeps_buffer_dtypes() {
    use dino_models::init::seeded_var_builder;
    let build_seeded = |seed: u64| {
        let varmap = VarMap::new();
        let vb = seeded_var_builder(&varmap, seed, DType::F32, &Device::Cpu);
        ResNet::new(ResNetConfig::resnet18_cifar(), vb).unwrap();
        varmap
    };
    let (a, b, c) = (build_seeded(3), build_seeded(3), build_seeded(4));
    let (a, b, c) = (
        a.data().lock().unwrap(),
        b.data().lock().unwrap(),
        c.data().lock().unwrap(),
    );
    assert_eq!(a.len(), 120);
    let diff = |x: &candle_core::Var, y: &candle_core::Var| {
        let d = (x.as_tensor().to_dtype(DType::F64).unwrap()
            - y.as_tensor().to_dtype(DType::F64).unwrap())
        .unwrap();
        d.abs()
            .unwrap()
            .sum_all()
            .unwrap()
            .to_scalar::<f64>()
            .unwrap()
    };
    for (name, var) in a.iter() {
        assert_eq!(
            diff(var, &b[name]),
            0.0,
            "{name}: same seed, different values"
        );
    }
    assert!(diff(&a["layer3.0.conv1.weight"], &c["layer3.0.conv1.weight"]) > 0.0);
    assert_eq!(a["layer3.0.bn1.num_batches_tracked"].dtype(), DType::I64);
    assert_eq!(
        a["layer3.0.bn1.num_batches_tracked"].dims(),
        &[] as &[usize]
    );
    // kaiming-normal fan_out through the seeded backend too.
    let w = a["layer4.0.conv2.weight"]
        .as_tensor()
        .flatten_all()
        .unwrap();
    let std = w
        .sqr()
        .unwrap()
        .mean_all()
        .unwrap()
        .to_scalar::<f32>()
        .unwrap()
        .sqrt() as f64;
    let want = (2.0f64 / (512.0 * 9.0)).sqrt();
    assert!((std / want - 1.0).abs() < 0.01, "std {std} vs {want}");
}
