//! Weights in and out: strict loading from safetensors, PyTorch zip-pickle `.pth` (backbone-only and full
//! training checkpoints) and the Hugging Face layout; errors naming tensors and shapes; export round trips.
//!
//! There is no torch here, so the `.pth` files are written by a small writer below that produces the same
//! structure `torch.save` does (a zip archive `archive/data.pkl` + `archive/data/<key>` storages, protocol-2
//! pickle with `torch._utils._rebuild_tensor_v2` and `('storage', torch.FloatStorage, key, 'cpu', numel)`
//! persistent ids, `collections.OrderedDict` state dicts, an `argparse.Namespace` for `args`).

use std::collections::{BTreeMap, HashMap};
use std::path::Path;

use candle_core::{DType, Device, Tensor};
use candle_nn::{VarBuilder, VarMap};
use dino_models::error::Error;
use dino_models::head::{DinoHead, DinoHeadConfig};
use dino_models::params::sorted_vars;
use dino_models::weights::{
    export_varmap, load_backbone, load_head, load_model, save_tensors_atomic, FileFormat,
    LoadOptions, SourceLayout,
};

const GOLDEN: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../../../shared/golden/");

fn golden_vit() -> BTreeMap<String, Tensor> {
    candle_core::safetensors::load(
        format!("{GOLDEN}vit_tiny16_weights.safetensors"),
        &Device::Cpu,
    )
    .unwrap()
    .into_iter()
    .collect()
}

/// A VarMap with zero-filled variables of the given names and shapes (under `prefix`).
fn zero_varmap(shapes: &BTreeMap<String, Tensor>, prefix: &str) -> VarMap {
    let varmap = VarMap::new();
    let vb = VarBuilder::from_varmap(&varmap, DType::F32, &Device::Cpu);
    for (n, t) in shapes {
        vb.get_with_hints(
            t.dims(),
            &format!("{prefix}{n}"),
            candle_nn::Init::Const(0.),
        )
        .unwrap();
    }
    varmap
}

fn values(varmap: &VarMap, prefix: &str) -> BTreeMap<String, Tensor> {
    sorted_vars(varmap)
        .into_iter()
        .filter_map(|(n, v)| {
            n.strip_prefix(prefix)
                .map(|s| (s.to_string(), v.as_tensor().copy().unwrap()))
        })
        .collect()
}

fn assert_same(a: &BTreeMap<String, Tensor>, b: &BTreeMap<String, Tensor>) {
    assert_eq!(a.keys().collect::<Vec<_>>(), b.keys().collect::<Vec<_>>());
    for (k, x) in a {
        let y = &b[k];
        assert_eq!(x.dims(), y.dims(), "{k}");
        let d = (x - y)
            .unwrap()
            .abs()
            .unwrap()
            .flatten_all()
            .unwrap()
            .max(0)
            .unwrap();
        assert_eq!(d.to_scalar::<f32>().unwrap(), 0.0, "{k} differs");
    }
}

// ---------------------------------------------------------------------------------------------------------
// A minimal torch.save writer (zip "stored" entries + protocol-2 pickle).

enum Py {
    Dict(Vec<(String, Py)>),
    OrderedDict(Vec<(String, Py)>),
    Namespace(Vec<(String, Py)>),
    Int(i32),
    Float(f64),
    Str(String),
    Tensor(Tensor),
}

struct PickleWriter {
    out: Vec<u8>,
    storages: Vec<(String, Vec<u8>)>,
}

impl PickleWriter {
    fn global(&mut self, module: &str, name: &str) {
        self.out.push(b'c');
        self.out
            .extend_from_slice(format!("{module}\n{name}\n").as_bytes());
    }
    fn str(&mut self, s: &str) {
        self.out.push(b'X');
        self.out.extend_from_slice(&(s.len() as u32).to_le_bytes());
        self.out.extend_from_slice(s.as_bytes());
    }
    fn int(&mut self, v: i32) {
        self.out.push(b'J');
        self.out.extend_from_slice(&v.to_le_bytes());
    }
    fn tuple_of_ints(&mut self, v: &[usize]) {
        if v.is_empty() {
            self.out.push(b')');
            return;
        }
        self.out.push(b'(');
        for &x in v {
            self.int(x as i32);
        }
        self.out.push(b't');
    }
    fn items(&mut self, items: &[(String, Py)]) {
        self.out.push(b'(');
        for (k, v) in items {
            self.str(k);
            self.obj(v);
        }
        self.out.push(b'u'); // SETITEMS
    }
    fn obj(&mut self, o: &Py) {
        match o {
            Py::Dict(items) => {
                self.out.push(b'}');
                self.items(items);
            }
            Py::OrderedDict(items) => {
                self.global("collections", "OrderedDict");
                self.out.push(b')');
                self.out.push(b'R');
                self.items(items);
            }
            Py::Namespace(items) => {
                self.global("argparse", "Namespace");
                self.out.push(b')');
                self.out.push(0x81); // NEWOBJ
                self.out.push(b'}');
                self.items(items);
                self.out.push(b'b'); // BUILD
            }
            Py::Int(v) => self.int(*v),
            Py::Float(v) => {
                self.out.push(b'G');
                self.out.extend_from_slice(&v.to_be_bytes());
            }
            Py::Str(s) => self.str(s),
            Py::Tensor(t) => {
                let (storage, bytes): (&str, Vec<u8>) = match t.dtype() {
                    DType::F32 => (
                        "FloatStorage",
                        t.flatten_all()
                            .unwrap()
                            .to_vec1::<f32>()
                            .unwrap()
                            .iter()
                            .flat_map(|x| x.to_le_bytes())
                            .collect(),
                    ),
                    DType::I64 => (
                        "LongStorage",
                        t.flatten_all()
                            .unwrap()
                            .to_vec1::<i64>()
                            .unwrap()
                            .iter()
                            .flat_map(|x| x.to_le_bytes())
                            .collect(),
                    ),
                    d => panic!("unsupported dtype {d:?}"),
                };
                let key = self.storages.len().to_string();
                self.global("torch._utils", "_rebuild_tensor_v2");
                self.out.push(b'(');
                // persistent id ('storage', torch.FloatStorage, key, 'cpu', numel)
                self.out.push(b'(');
                self.str("storage");
                self.global("torch", storage);
                self.str(&key);
                self.str("cpu");
                self.int(t.elem_count() as i32);
                self.out.push(b't');
                self.out.push(b'Q'); // BINPERSID
                self.int(0); // storage offset
                self.tuple_of_ints(t.dims());
                let dims = t.dims();
                let mut stride = vec![1usize; dims.len()];
                for i in (0..dims.len().saturating_sub(1)).rev() {
                    stride[i] = stride[i + 1] * dims[i + 1];
                }
                self.tuple_of_ints(&stride);
                self.out.push(0x89); // NEWFALSE: requires_grad
                self.global("collections", "OrderedDict");
                self.out.push(b')');
                self.out.push(b'R');
                self.out.push(b't');
                self.out.push(b'R');
                self.storages.push((key, bytes));
            }
        }
    }
}

/// CRC-32 (IEEE, as zip), table-driven.
fn crc32(data: &[u8]) -> u32 {
    let mut table = [0u32; 256];
    for (i, t) in table.iter_mut().enumerate() {
        let mut c = i as u32;
        for _ in 0..8 {
            c = if c & 1 != 0 {
                (c >> 1) ^ 0xEDB8_8320
            } else {
                c >> 1
            };
        }
        *t = c;
    }
    let mut crc = 0xFFFF_FFFFu32;
    for &b in data {
        crc = table[((crc ^ b as u32) & 0xFF) as usize] ^ (crc >> 8);
    }
    !crc
}

#[test]
fn crc32_known_answer() {
    assert_eq!(crc32(b"123456789"), 0xCBF4_3926);
}

fn write_zip(path: &Path, entries: &[(String, Vec<u8>)]) {
    let mut out = Vec::new();
    let mut central = Vec::new();
    for (name, data) in entries {
        let offset = out.len() as u32;
        let crc = crc32(data);
        let header = |sig: u32, central_entry: bool| {
            let mut h = Vec::new();
            h.extend_from_slice(&sig.to_le_bytes());
            if central_entry {
                h.extend_from_slice(&20u16.to_le_bytes()); // version made by
            }
            h.extend_from_slice(&20u16.to_le_bytes()); // version needed
            h.extend_from_slice(&0u16.to_le_bytes()); // flags
            h.extend_from_slice(&0u16.to_le_bytes()); // stored
            h.extend_from_slice(&0u16.to_le_bytes()); // time
            h.extend_from_slice(&0x21u16.to_le_bytes()); // date
            h.extend_from_slice(&crc.to_le_bytes());
            h.extend_from_slice(&(data.len() as u32).to_le_bytes());
            h.extend_from_slice(&(data.len() as u32).to_le_bytes());
            h.extend_from_slice(&(name.len() as u16).to_le_bytes());
            h.extend_from_slice(&0u16.to_le_bytes()); // extra
            if central_entry {
                h.extend_from_slice(&0u16.to_le_bytes()); // comment
                h.extend_from_slice(&0u16.to_le_bytes()); // disk
                h.extend_from_slice(&0u16.to_le_bytes()); // internal attrs
                h.extend_from_slice(&0u32.to_le_bytes()); // external attrs
                h.extend_from_slice(&offset.to_le_bytes());
            }
            h.extend_from_slice(name.as_bytes());
            h
        };
        out.extend(header(0x0403_4b50, false));
        out.extend_from_slice(data);
        central.extend(header(0x0201_4b50, true));
    }
    let cd_offset = out.len() as u32;
    out.extend_from_slice(&central);
    out.extend_from_slice(&0x0605_4b50u32.to_le_bytes());
    out.extend_from_slice(&[0, 0, 0, 0]);
    out.extend_from_slice(&(entries.len() as u16).to_le_bytes());
    out.extend_from_slice(&(entries.len() as u16).to_le_bytes());
    out.extend_from_slice(&(central.len() as u32).to_le_bytes());
    out.extend_from_slice(&cd_offset.to_le_bytes());
    out.extend_from_slice(&0u16.to_le_bytes());
    std::fs::write(path, out).unwrap();
}

/// Write `obj` as `torch.save(obj, path)` would (zip format).
fn torch_save(path: &Path, obj: &Py) {
    let mut w = PickleWriter {
        out: vec![0x80, 2],
        storages: Vec::new(),
    };
    w.obj(obj);
    w.out.push(b'.');
    let mut entries = vec![("archive/data.pkl".to_string(), w.out)];
    for (k, bytes) in w.storages {
        entries.push((format!("archive/data/{k}"), bytes));
    }
    entries.push(("archive/version".into(), b"3\n".to_vec()));
    entries.push(("archive/byteorder".into(), b"little".to_vec()));
    write_zip(path, &entries);
}

fn state_dict(t: &BTreeMap<String, Tensor>, prefix: &str) -> Vec<(String, Py)> {
    t.iter()
        .map(|(k, v)| (format!("{prefix}{k}"), Py::Tensor(v.clone())))
        .collect()
}

// ---------------------------------------------------------------------------------------------------------

#[test]
fn safetensors_official_names_load_strictly() {
    let g = golden_vit();
    let varmap = zero_varmap(&g, "backbone.");
    let rep = load_backbone(
        &varmap,
        format!("{GOLDEN}vit_tiny16_weights.safetensors"),
        &LoadOptions::with_prefix("backbone."),
    )
    .unwrap();
    assert_eq!(rep.format, FileFormat::Safetensors);
    assert_eq!(rep.layout, SourceLayout::Official);
    assert_eq!(rep.loaded.len(), g.len());
    assert_same(&values(&varmap, "backbone."), &g);
}

#[test]
fn pth_backbone_only_file() {
    let g = golden_vit();
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("dino_deitsmall16_pretrain.pth");
    torch_save(&p, &Py::OrderedDict(state_dict(&g, "")));
    let varmap = zero_varmap(&g, "");
    // checkpoint_key is ignored for a file whose tensors sit at the top level.
    let rep = load_backbone(&varmap, &p, &LoadOptions::default()).unwrap();
    assert_eq!(rep.format, FileFormat::TorchZip);
    assert_eq!(rep.loaded.len(), g.len());
    assert_same(&values(&varmap, ""), &g);
}

fn perturbed(g: &BTreeMap<String, Tensor>, by: f64) -> BTreeMap<String, Tensor> {
    g.iter()
        .map(|(k, v)| (k.clone(), (v + by).unwrap()))
        .collect()
}

#[test]
fn pth_full_training_checkpoint_teacher_and_student() {
    let g = golden_vit();
    let student_bb = perturbed(&g, 1.0);
    let head_w: BTreeMap<String, Tensor> = [
        (
            "mlp.0.weight".to_string(),
            Tensor::ones((4, 192), DType::F32, &Device::Cpu).unwrap(),
        ),
        (
            "last_layer.weight_g".to_string(),
            Tensor::ones((8, 1), DType::F32, &Device::Cpu).unwrap(),
        ),
    ]
    .into_iter()
    .collect();
    let mut teacher = state_dict(&g, "backbone.");
    teacher.extend(state_dict(&head_w, "head."));
    let mut student = state_dict(&student_bb, "module.backbone.");
    student.extend(state_dict(&head_w, "module.head."));
    let center = Tensor::zeros((1, 8), DType::F32, &Device::Cpu).unwrap();
    let ckpt = Py::Dict(vec![
        ("student".into(), Py::OrderedDict(student)),
        ("teacher".into(), Py::OrderedDict(teacher)),
        ("epoch".into(), Py::Int(100)),
        (
            "args".into(),
            Py::Namespace(vec![
                ("arch".into(), Py::Str("vit_tiny".into())),
                ("lr".into(), Py::Float(0.0005)),
                ("out_dim".into(), Py::Int(8)),
            ]),
        ),
        (
            "dino_loss".into(),
            Py::OrderedDict(vec![("center".into(), Py::Tensor(center))]),
        ),
    ]);
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("checkpoint.pth");
    torch_save(&p, &ckpt);

    // Default key: teacher; `backbone.` stripped, head set aside.
    let varmap = zero_varmap(&g, "");
    let rep = load_backbone(&varmap, &p, &LoadOptions::default()).unwrap();
    assert!(rep.origin.contains("teacher"), "{}", rep.origin);
    assert_eq!(
        rep.ignored,
        vec!["head.last_layer.weight_g", "head.mlp.0.weight"]
    );
    assert_same(&values(&varmap, ""), &g);

    // Student: `module.` then `backbone.` stripped.
    let opts = LoadOptions {
        checkpoint_key: "student".into(),
        ..LoadOptions::default()
    };
    let rep = load_backbone(&varmap, &p, &opts).unwrap();
    assert_eq!(rep.loaded.len(), g.len());
    assert_same(&values(&varmap, ""), &student_bb);

    // A key that does not exist names the file and the key.
    let opts = LoadOptions {
        checkpoint_key: "ema".into(),
        ..LoadOptions::default()
    };
    let err = load_backbone(&varmap, &p, &opts).unwrap_err();
    assert!(matches!(err, Error::CheckpointKey { .. }), "{err}");
    let msg = err.to_string();
    assert!(
        msg.contains("`ema`") && msg.contains("checkpoint.pth"),
        "{msg}"
    );
}

/// Rewrites official ViT names into the Hugging Face transformers layout (query/key/value split).
fn to_hf(g: &BTreeMap<String, Tensor>) -> BTreeMap<String, Tensor> {
    let mut out = BTreeMap::new();
    for (k, v) in g {
        let name = match k.as_str() {
            "cls_token" => "embeddings.cls_token".to_string(),
            "pos_embed" => "embeddings.position_embeddings".to_string(),
            "norm.weight" => "layernorm.weight".to_string(),
            "norm.bias" => "layernorm.bias".to_string(),
            _ if k.starts_with("patch_embed.proj.") => k.replace(
                "patch_embed.proj.",
                "embeddings.patch_embeddings.projection.",
            ),
            _ => {
                let rest = k.strip_prefix("blocks.").unwrap();
                let (i, rest) = rest.split_once('.').unwrap();
                let p = format!("encoder.layer.{i}.");
                if let Some(wb) = rest.strip_prefix("attn.qkv.") {
                    let d = v.dim(0).unwrap() / 3;
                    for (j, part) in ["query", "key", "value"].iter().enumerate() {
                        out.insert(
                            format!("{p}attention.attention.{part}.{wb}"),
                            v.narrow(0, j * d, d).unwrap().contiguous().unwrap(),
                        );
                    }
                    continue;
                }
                let rest = rest
                    .replace("attn.proj.", "attention.output.dense.")
                    .replace("norm1.", "layernorm_before.")
                    .replace("norm2.", "layernorm_after.")
                    .replace("mlp.fc1.", "intermediate.dense.")
                    .replace("mlp.fc2.", "output.dense.");
                format!("{p}{rest}")
            }
        };
        out.insert(name, v.clone());
    }
    out
}

#[test]
fn hugging_face_layout_maps_onto_official_names() {
    let g = golden_vit();
    let mut hf = to_hf(&g);
    assert!(hf.contains_key("encoder.layer.11.attention.attention.value.bias"));
    assert!(!hf.keys().any(|k| k.contains("qkv")));
    hf.insert(
        "pooler.dense.weight".into(),
        Tensor::zeros((192, 192), DType::F32, &Device::Cpu).unwrap(),
    );
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("model.safetensors");
    save_tensors_atomic(&p, &hf).unwrap();
    let varmap = zero_varmap(&g, "");
    let rep = load_backbone(&varmap, &p, &LoadOptions::default()).unwrap();
    assert_eq!(rep.layout, SourceLayout::HuggingFace);
    assert_eq!(rep.ignored, vec!["pooler.dense.weight"]);
    assert_same(&values(&varmap, ""), &g);

    // The same as a pytorch_model.bin (zip pickle).
    let p = dir.path().join("pytorch_model.bin");
    let hf = to_hf(&g);
    torch_save(&p, &Py::OrderedDict(state_dict(&hf, "")));
    let varmap = zero_varmap(&g, "");
    load_backbone(&varmap, &p, &LoadOptions::default()).unwrap();
    assert_same(&values(&varmap, ""), &g);

    // A layer without its `value` projection cannot build qkv: the error says which.
    let mut broken = to_hf(&g);
    broken.remove("encoder.layer.3.attention.attention.value.weight");
    let p = dir.path().join("broken.safetensors");
    save_tensors_atomic(&p, &broken).unwrap();
    let msg = load_backbone(&zero_varmap(&g, ""), &p, &LoadOptions::default())
        .unwrap_err()
        .to_string();
    assert!(
        msg.contains("encoder.layer.3") && msg.contains("value"),
        "{msg}"
    );
}

#[test]
fn renamed_reshaped_or_extra_tensors_fail_naming_them() {
    let g = golden_vit();
    let dir = tempfile::tempdir().unwrap();

    // Renamed.
    let mut renamed = g.clone();
    let t = renamed.remove("blocks.4.mlp.fc1.weight").unwrap();
    renamed.insert("blocks.4.mlp.fc_1.weight".into(), t);
    let p = dir.path().join("renamed.safetensors");
    save_tensors_atomic(&p, &renamed).unwrap();
    let varmap = zero_varmap(&g, "");
    let err = load_backbone(&varmap, &p, &LoadOptions::default()).unwrap_err();
    assert!(matches!(err, Error::MissingKey { .. }), "{err}");
    let msg = err.to_string();
    assert!(msg.contains("`blocks.4.mlp.fc1.weight`"), "{msg}");
    assert!(msg.contains("[768, 192]"), "{msg}");
    assert!(msg.contains("blocks.4.mlp.fc_1.weight"), "{msg}");
    assert!(msg.contains("renamed.safetensors"), "{msg}");
    // Nothing was written.
    let zero = values(&varmap, "");
    assert!(zero.values().all(|t| t
        .abs()
        .unwrap()
        .flatten_all()
        .unwrap()
        .max(0)
        .unwrap()
        .to_scalar::<f32>()
        .unwrap()
        == 0.0));

    // Reshaped: names both shapes.
    let mut reshaped = g.clone();
    reshaped.insert(
        "blocks.7.attn.proj.weight".into(),
        Tensor::zeros((192, 191), DType::F32, &Device::Cpu).unwrap(),
    );
    let p = dir.path().join("reshaped.safetensors");
    save_tensors_atomic(&p, &reshaped).unwrap();
    let err = load_backbone(&varmap, &p, &LoadOptions::default()).unwrap_err();
    assert!(matches!(err, Error::ShapeMismatch { .. }), "{err}");
    let msg = err.to_string();
    assert!(
        msg.contains("`blocks.7.attn.proj.weight`")
            && msg.contains("[192, 192]")
            && msg.contains("[192, 191]"),
        "{msg}"
    );

    // Extra tensor (for example an un-removed classifier).
    let mut extra = g.clone();
    extra.insert(
        "head.weight".into(),
        Tensor::zeros((10, 192), DType::F32, &Device::Cpu).unwrap(),
    );
    let p = dir.path().join("extra.safetensors");
    save_tensors_atomic(&p, &extra).unwrap();
    let err = load_backbone(&varmap, &p, &LoadOptions::default()).unwrap_err();
    assert!(matches!(err, Error::UnexpectedKey { .. }), "{err}");
    assert!(err.to_string().contains("`head.weight`"), "{err}");

    // Unreadable file names the file.
    let p = dir.path().join("garbage.pth");
    std::fs::write(&p, b"not a checkpoint at all").unwrap();
    let err = load_backbone(&varmap, &p, &LoadOptions::default()).unwrap_err();
    assert!(
        matches!(err, Error::Unreadable { .. }) && err.to_string().contains("garbage.pth"),
        "{err}"
    );
    let err = load_backbone(
        &varmap,
        dir.path().join("absent.pth"),
        &LoadOptions::default(),
    )
    .unwrap_err();
    assert!(err.to_string().contains("absent.pth"), "{err}");
}

fn head_model(cfg: DinoHeadConfig) -> (VarMap, DinoHead) {
    let varmap = VarMap::new();
    let vb = VarBuilder::from_varmap(&varmap, DType::F32, &Device::Cpu);
    let head = DinoHead::new(cfg, vb.pp("head")).unwrap();
    (varmap, head)
}

#[test]
fn head_export_load_round_trip_gives_identical_outputs() {
    let cfg = DinoHeadConfig {
        use_bn: true,
        hidden_dim: 64,
        bottleneck_dim: 16,
        ..DinoHeadConfig::new(24, 40)
    };
    let (vm_a, head_a) = head_model(cfg);
    let x = Tensor::randn(0f32, 1., (8, 24), &Device::Cpu).unwrap();
    head_a.forward(&x, true).unwrap(); // moves the BN running statistics away from 0/1
    let dir = tempfile::tempdir().unwrap();

    // Full layout (head.* names) and head-only layout (official DINOHead names).
    let full = dir.path().join("full.safetensors");
    assert_eq!(
        export_varmap(&vm_a, &full, "").unwrap(),
        2 + 4 + 2 + 4 + 2 + 2
    );
    let only = dir.path().join("head.safetensors");
    export_varmap(&vm_a, &only, "head.").unwrap();
    let names: Vec<String> = candle_core::safetensors::load(&only, &Device::Cpu)
        .unwrap()
        .into_keys()
        .collect();
    assert!(
        names.contains(&"mlp.1.running_var".to_string())
            && names.contains(&"last_layer.weight_v".to_string())
    );
    // No temporary file is left behind.
    let leftovers: Vec<_> = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.contains(".tmp"))
        .collect();
    assert!(leftovers.is_empty(), "{leftovers:?}");

    let check = |vm_b: &VarMap, head_b: &DinoHead, what: &str| {
        assert_same(&values(&vm_a, "head."), &values(vm_b, "head."));
        // Eval mode (running statistics): a train-mode call would move head_a's statistics.
        let a = head_a.forward(&x, false).unwrap();
        let b = head_b.forward(&x, false).unwrap();
        let d = (a - b)
            .unwrap()
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        assert_eq!(d, 0.0, "{what}");
    };
    let (vm_b, head_b) = head_model(cfg);
    load_model(&vm_b, &full, &LoadOptions::default()).unwrap();
    check(&vm_b, &head_b, "full");
    let (vm_c, head_c) = head_model(cfg);
    let rep = load_head(&vm_c, &only, &LoadOptions::with_prefix("head.")).unwrap();
    assert_eq!(rep.loaded.len(), 16);
    check(&vm_c, &head_c, "head-only");
    // The head part of a full file loads into a head too (backbone.* would be set aside).
    let (vm_d, head_d) = head_model(cfg);
    load_head(&vm_d, &full, &LoadOptions::with_prefix("head.")).unwrap();
    check(&vm_d, &head_d, "head part of full");
}

#[test]
fn pytorch_bn_counters_are_set_aside() {
    let cfg = DinoHeadConfig {
        use_bn: true,
        hidden_dim: 32,
        bottleneck_dim: 8,
        ..DinoHeadConfig::new(16, 10)
    };
    let (vm_a, _) = head_model(cfg);
    let mut sd: BTreeMap<String, Tensor> = values(&vm_a, "head.");
    // PyTorch state dicts carry an int64 num_batches_tracked per BatchNorm.
    for bn in ["mlp.1", "mlp.4"] {
        sd.insert(
            format!("{bn}.num_batches_tracked"),
            Tensor::new(7i64, &Device::Cpu).unwrap(),
        );
    }
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("head_bn.pth");
    torch_save(&p, &Py::OrderedDict(state_dict(&sd, "")));
    let (vm_b, _) = head_model(cfg);
    let rep = load_head(&vm_b, &p, &LoadOptions::with_prefix("head.")).unwrap();
    assert_eq!(
        rep.ignored,
        vec!["mlp.1.num_batches_tracked", "mlp.4.num_batches_tracked"]
    );
    let expect: HashMap<_, _> = values(&vm_a, "head.").into_iter().collect();
    let got: HashMap<_, _> = values(&vm_b, "head.").into_iter().collect();
    assert_same(&expect.into_iter().collect(), &got.into_iter().collect());
}

mod with_vit {
    use super::*;
    use dino_models::params::NamedVar;
    use dino_models::vit::{ViTConfig, VisionTransformer};
    use dino_models::weights::export_safetensors;
    use dino_models::Backbone;

    fn golden_io() -> HashMap<String, Tensor> {
        candle_core::safetensors::load(format!("{GOLDEN}vit_tiny16_io.safetensors"), &Device::Cpu)
            .unwrap()
    }

    fn max_diff(a: &Tensor, b: &Tensor) -> f32 {
        (a - b)
            .unwrap()
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap()
    }

    /// A freshly initialised ViT-tiny/16 + head (random weights) in one VarMap with `backbone.`/`head.`.
    fn model(out_dim: usize) -> (VarMap, VisionTransformer, DinoHead) {
        let varmap = VarMap::new();
        let vb = VarBuilder::from_varmap(&varmap, DType::F32, &Device::Cpu);
        let vit = VisionTransformer::new(ViTConfig::vit_tiny(16), vb.pp("backbone")).unwrap();
        let head = DinoHead::new(
            DinoHeadConfig {
                hidden_dim: 64,
                bottleneck_dim: 32,
                ..DinoHeadConfig::new(192, out_dim)
            },
            vb.pp("head"),
        )
        .unwrap();
        (varmap, vit, head)
    }

    #[test]
    fn hugging_face_layout_into_a_real_vit_matches_official_outputs() {
        let io = golden_io();
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("model.safetensors");
        save_tensors_atomic(&p, &to_hf(&golden_vit())).unwrap();
        let varmap = VarMap::new();
        let vb = VarBuilder::from_varmap(&varmap, DType::F32, &Device::Cpu);
        let vit = VisionTransformer::new(ViTConfig::vit_tiny(16), vb).unwrap();
        load_backbone(&varmap, &p, &LoadOptions::default()).unwrap();
        let cls = vit.forward_features(&io["x224"], false).unwrap();
        assert!(
            max_diff(&cls, &io["cls224"]) < 2e-4,
            "{}",
            max_diff(&cls, &io["cls224"])
        );
    }

    #[test]
    fn export_load_round_trip_full_and_backbone_only() {
        let io = golden_io();
        let x = &io["x96"];
        let (vm_a, vit_a, head_a) = model(48);
        let feats_a = vit_a.forward_features(x, false).unwrap();
        let out_a = head_a.forward(&feats_a, false).unwrap();
        let dir = tempfile::tempdir().unwrap();

        // Full: official teacher layout (backbone.*, head.*).
        let full = dir.path().join("teacher.safetensors");
        export_varmap(&vm_a, &full, "").unwrap();
        let (vm_b, vit_b, head_b) = model(48);
        assert!(max_diff(&vit_b.forward_features(x, false).unwrap(), &feats_a) > 1e-3);
        let rep = load_model(&vm_b, &full, &LoadOptions::default()).unwrap();
        assert_eq!(rep.loaded.len(), sorted_vars(&vm_a).len());
        let feats_b = vit_b.forward_features(x, false).unwrap();
        assert_eq!(max_diff(&feats_b, &feats_a), 0.0);
        assert_eq!(
            max_diff(&head_b.forward(&feats_b, false).unwrap(), &out_a),
            0.0
        );

        // Backbone-only (the *_pretrain.pth names) into a bare ViT, and the backbone part of the full file.
        let bb = dir.path().join("backbone.safetensors");
        let n = export_varmap(&vm_a, &bb, "backbone.").unwrap();
        let names: std::collections::BTreeSet<String> =
            candle_core::safetensors::load(&bb, &Device::Cpu)
                .unwrap()
                .into_keys()
                .collect();
        // Exactly the official vit_tiny state_dict names, so PyTorch's strict load_state_dict accepts it.
        let official: std::collections::BTreeSet<String> = golden_vit().into_keys().collect();
        assert_eq!(names, official);
        assert_eq!(n, official.len());
        for file in [&bb, &full] {
            let varmap = VarMap::new();
            let vb = VarBuilder::from_varmap(&varmap, DType::F32, &Device::Cpu);
            let vit_c = VisionTransformer::new(ViTConfig::vit_tiny(16), vb).unwrap();
            let rep = load_backbone(&varmap, file, &LoadOptions::default()).unwrap();
            assert_eq!(rep.loaded.len(), official.len());
            assert_eq!(
                max_diff(&vit_c.forward_features(x, false).unwrap(), &feats_a),
                0.0
            );
        }

        // Head-only export has exactly the official DINOHead names (as dino_head_weights.safetensors).
        let hd = dir.path().join("head.safetensors");
        export_varmap(&vm_a, &hd, "head.").unwrap();
        let names: std::collections::BTreeSet<String> =
            candle_core::safetensors::load(&hd, &Device::Cpu)
                .unwrap()
                .into_keys()
                .collect();
        let official: std::collections::BTreeSet<String> = candle_core::safetensors::load(
            format!("{GOLDEN}dino_head_weights.safetensors"),
            &Device::Cpu,
        )
        .unwrap()
        .into_keys()
        .collect();
        assert_eq!(names, official);

        // Round trip through a full training checkpoint written as torch.save would.
        let vars: Vec<NamedVar> = sorted_vars(&vm_a);
        let sd: BTreeMap<String, Tensor> = vars
            .iter()
            .map(|(n, v)| (n.clone(), v.as_tensor().copy().unwrap()))
            .collect();
        let p = dir.path().join("checkpoint.pth");
        torch_save(
            &p,
            &Py::Dict(vec![
                ("teacher".into(), Py::OrderedDict(state_dict(&sd, ""))),
                (
                    "student".into(),
                    Py::OrderedDict(state_dict(&sd, "module.")),
                ),
                ("epoch".into(), Py::Int(1)),
            ]),
        );
        let (vm_d, vit_d, head_d) = model(48);
        load_model(&vm_d, &p, &LoadOptions::default()).unwrap();
        let feats_d = vit_d.forward_features(x, false).unwrap();
        assert_eq!(max_diff(&feats_d, &feats_a), 0.0);
        assert_eq!(
            max_diff(&head_d.forward(&feats_d, false).unwrap(), &out_a),
            0.0
        );
        let _ = export_safetensors(&vars, dir.path().join("unused.safetensors"), "nothing.")
            .unwrap_err();
    }
}

/// A full training checkpoint written by Python's own `pickle` + `zipfile` exactly as `torch.save` lays it out
/// (protocol 2, persistent ids, memoised globals, an OrderedDict with `_metadata`, an `argparse.Namespace`,
/// two tensors sharing one storage at different offsets, the archive folder named after the file). No torch
/// is available to produce a genuine one; the generator is reproduced below so the bytes can be regenerated:
///
/// ```text
/// # Mimics torch.save (zip format, pickle protocol 2, persistent ids) with the Python stdlib only.
/// import sys, types, io, pickle, zipfile, struct, argparse
/// from collections import OrderedDict
/// torch = types.ModuleType("torch"); utils = types.ModuleType("torch._utils")
/// torch._utils = utils; sys.modules["torch"] = torch; sys.modules["torch._utils"] = utils
/// def _rebuild_tensor_v2(*a): raise RuntimeError
/// _rebuild_tensor_v2.__module__ = "torch._utils"; utils._rebuild_tensor_v2 = _rebuild_tensor_v2
/// class FloatStorage: pass
/// FloatStorage.__module__ = "torch"; torch.FloatStorage = FloatStorage
/// class Storage:
///     def __init__(self, key, values): self.key, self.values = key, values
/// class Tensor:
///     def __init__(self, storage, offset, size):
///         self.storage, self.offset, self.size = storage, offset, size
///     def __reduce_ex__(self, proto):
///         stride = []; s = 1
///         for d in reversed(self.size): stride.insert(0, s); s *= d
///         return (_rebuild_tensor_v2, (self.storage, self.offset, tuple(self.size), tuple(stride), False, OrderedDict()))
/// storages = []
/// def storage(values):
///     s = Storage(str(len(storages)), values); storages.append(s); return s
/// def tensor(values, size):
///     return Tensor(storage(values), 0, size)
/// # backbone: cls_token (1,1,4), pos_embed (1,2,4); qkv weight (6,2) stored as one storage viewed twice with offsets
/// cls = [0.5, -1.0, 2.0, 3.25]
/// pos = [float(i) / 8 for i in range(8)]
/// shared = storage([float(i) for i in range(12)])
/// teacher = OrderedDict()
/// teacher["backbone.cls_token"] = tensor(cls, [1, 1, 4])
/// teacher["backbone.pos_embed"] = tensor(pos, [1, 2, 4])
/// teacher["backbone.a.weight"] = Tensor(shared, 0, [3, 2])   # elements 0..6 of the shared storage
/// teacher["backbone.b.weight"] = Tensor(shared, 6, [3, 2])   # elements 6..12
/// teacher["head.last_layer.weight_g"] = tensor([1.0, 1.0], [2, 1])
/// teacher._metadata = OrderedDict({"": {"version": 1}})
/// student = OrderedDict((("module." + k), Tensor(storage([x * 2 for x in v.storage.values[v.offset:v.offset + (v.size[0] * (v.size[1] if len(v.size) > 1 else 1) * (v.size[2] if len(v.size) > 2 else 1))]]), 0, v.size)) for k, v in teacher.items())
/// args = argparse.Namespace(arch="vit_tiny", lr=0.0005, local_crops_scale=(0.05, 0.4), out_dim=2, use_fp16=False, dist_url="env://")
/// ckpt = {"student": student, "teacher": teacher, "epoch": 3, "args": args, "dino_loss": OrderedDict(center=tensor([0.0, 0.0], [1, 2])), "fp16_scaler": None}
/// buf = io.BytesIO()
/// p = pickle.Pickler(buf, protocol=2)
/// p.persistent_id = lambda o: ("storage", FloatStorage, o.key, "cpu", len(o.values)) if isinstance(o, Storage) else None
/// p.dump(ckpt)
/// with zipfile.ZipFile(sys.argv[1], "w", zipfile.ZIP_STORED) as z:
///     z.writestr("checkpoint/data.pkl", buf.getvalue())
///     z.writestr("checkpoint/.format_version", "1")
///     z.writestr("checkpoint/byteorder", "little")
///     for s in storages:
///         z.writestr("checkpoint/data/" + s.key, struct.pack("<%df" % len(s.values), *s.values))
///     z.writestr("checkpoint/version", "3\n")
///
/// ```
/// The file that script wrote (committed as is).
const PY_CHECKPOINT: &[u8] = include_bytes!("fixtures/python_pickler_checkpoint.pth");

#[test]
fn pth_written_by_the_python_pickler() {
    let bytes = PY_CHECKPOINT;
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("checkpoint.pth");
    std::fs::write(&p, bytes).unwrap();
    let shapes: BTreeMap<String, Tensor> = [("cls_token", (1, 1, 4)), ("pos_embed", (1, 2, 4))]
        .into_iter()
        .map(|(n, s)| {
            (
                n.to_string(),
                Tensor::zeros(s, DType::F32, &Device::Cpu).unwrap(),
            )
        })
        .chain(["a.weight", "b.weight"].into_iter().map(|n| {
            (
                n.to_string(),
                Tensor::zeros((3, 2), DType::F32, &Device::Cpu).unwrap(),
            )
        }))
        .collect();
    let varmap = zero_varmap(&shapes, "");
    let rep = load_backbone(&varmap, &p, &LoadOptions::default()).unwrap();
    assert_eq!(rep.format, FileFormat::TorchZip);
    assert_eq!(rep.ignored, vec!["head.last_layer.weight_g"]);
    let got = values(&varmap, "");
    let v = |n: &str| got[n].flatten_all().unwrap().to_vec1::<f32>().unwrap();
    assert_eq!(v("cls_token"), [0.5, -1.0, 2.0, 3.25]);
    assert_eq!(
        v("pos_embed"),
        (0..8).map(|i| i as f32 / 8.0).collect::<Vec<_>>()
    );
    assert_eq!(v("a.weight"), [0., 1., 2., 3., 4., 5.]);
    assert_eq!(v("b.weight"), [6., 7., 8., 9., 10., 11.]);
    let opts = LoadOptions {
        checkpoint_key: "student".into(),
        ..LoadOptions::default()
    };
    load_backbone(&varmap, &p, &opts).unwrap();
    let got = values(&varmap, "");
    let v = |n: &str| got[n].flatten_all().unwrap().to_vec1::<f32>().unwrap();
    assert_eq!(v("cls_token"), [1.0, -2.0, 4.0, 6.5]);
    assert_eq!(v("b.weight"), [12., 14., 16., 18., 20., 22.]);
}
