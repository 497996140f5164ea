//! clip_gradients against the official golden, last-layer freezing, and AdamW against an independent
//! f64 implementation of torch's formula (several steps, a parameter that skips a step, two groups
//! with their own lr/wd), state export/import, SGD and LARS against direct formulas.
// The reference implementations index several arrays in step, as the formulas are written.
#![allow(clippy::needless_range_loop)]

mod common;

use std::collections::HashMap;

use candle_core::backprop::GradStore;
use candle_core::{DType, Tensor, Var};
use common::{assert_close, get, golden, vec_f64};
use dino_core::optim::{AdamWParamState, Optimizer};
use dino_core::{
    cancel_gradients_last_layer, clip_gradients, AdamW, Lars, NamedVar, ParamGroup, Sgd,
};

/// A GradStore holding the given gradients (built through a real backward pass, then overwritten).
fn grad_store(pairs: &[(&Var, Tensor)]) -> GradStore {
    let mut sum: Option<Tensor> = None;
    for (v, _) in pairs {
        let s = v.as_tensor().sum_all().unwrap();
        sum = Some(match sum {
            Some(t) => (t + s).unwrap(),
            None => s,
        });
    }
    let mut grads = sum.unwrap().backward().unwrap();
    for (v, g) in pairs {
        grads.insert(v.as_tensor(), g.clone());
    }
    grads
}

#[test]
fn clip_gradients_matches_official() {
    let g = golden("clip_gradients.safetensors");
    let names = ["0.weight", "0.bias", "2.weight", "2.bias"];
    let params: Vec<NamedVar> = names
        .iter()
        .map(|n| {
            let before = get(&g, &format!("grad_before.{n}"));
            (
                n.to_string(),
                Var::zeros(before.shape(), DType::F32, &common::tdev()).unwrap(),
            )
        })
        .collect();
    let pairs: Vec<(&Var, Tensor)> = params
        .iter()
        .map(|(n, v)| (v, get(&g, &format!("grad_before.{n}"))))
        .collect();
    let mut grads = grad_store(&pairs);
    let norms = clip_gradients(&mut grads, &params, 3.0).unwrap();
    let want = vec_f64(&get(&g, "norms"));
    for (a, b) in norms.iter().zip(&want) {
        assert!((a - b).abs() <= 1e-6 * b, "norm {a} vs {b}");
    }
    for (n, v) in &params {
        assert_close(
            n,
            grads.get(v.as_tensor()).unwrap(),
            &get(&g, &format!("grad_after.{n}")),
            1e-7,
            1e-6,
        );
    }
    // a parameter without a gradient is skipped: no norm reported for it
    let extra = (
        "extra".to_string(),
        Var::zeros(3, DType::F32, &common::tdev()).unwrap(),
    );
    let mut with_extra = params.clone();
    with_extra.insert(1, extra);
    let mut grads = grad_store(&pairs);
    assert_eq!(
        clip_gradients(&mut grads, &with_extra, 3.0).unwrap().len(),
        4
    );
}

#[test]
fn last_layer_gradients_are_removed_only_while_frozen() {
    let dev = common::tdev();
    let params: Vec<NamedVar> = [
        "backbone.x",
        "head.last_layer.weight_v",
        "head.last_layer.weight_g",
        "head.mlp.0.weight",
    ]
    .iter()
    .map(|n| (n.to_string(), Var::ones(2, DType::F32, &dev).unwrap()))
    .collect();
    let pairs: Vec<(&Var, Tensor)> = params
        .iter()
        .map(|(_, v)| (v, Tensor::ones(2, DType::F32, &dev).unwrap()))
        .collect();
    let mut grads = grad_store(&pairs);
    assert_eq!(cancel_gradients_last_layer(1, &mut grads, &params, 1), 0);
    assert_eq!(cancel_gradients_last_layer(0, &mut grads, &params, 1), 2);
    let has: Vec<bool> = params
        .iter()
        .map(|(_, v)| grads.get(v.as_tensor()).is_some())
        .collect();
    assert_eq!(has, vec![true, false, false, true]);
}

/// torch.optim.AdamW for one parameter, in f64, written directly from the documented algorithm.
struct RefAdam {
    p: Vec<f64>,
    m: Vec<f64>,
    v: Vec<f64>,
    t: i32,
}

impl RefAdam {
    fn step(&mut self, g: &[f64], lr: f64, wd: f64) {
        self.t += 1;
        let (b1, b2, eps) = (0.9f64, 0.999f64, 1e-8f64);
        for i in 0..self.p.len() {
            self.p[i] *= 1.0 - lr * wd;
            self.m[i] = b1 * self.m[i] + (1.0 - b1) * g[i];
            self.v[i] = b2 * self.v[i] + (1.0 - b2) * g[i] * g[i];
            let mhat = self.m[i] / (1.0 - b1.powi(self.t));
            let vhat = self.v[i] / (1.0 - b2.powi(self.t));
            self.p[i] -= lr * mhat / (vhat.sqrt() + eps);
        }
    }
}

#[test]
fn adamw_reproduces_torch_with_per_parameter_steps() {
    let dev = common::tdev();
    // a large tensor (parallel kernel), a small decayed one, a bias, and a "last_layer" skipped at step 0
    let shapes: [(&str, usize); 4] = [
        ("w_big", 200_003),
        ("w_small", 7),
        ("b.bias", 5),
        ("head.last_layer.weight_v", 11),
    ];
    let init: Vec<Tensor> = shapes
        .iter()
        .map(|(_, n)| Tensor::randn(0f32, 1.0, *n, &dev).unwrap())
        .collect();
    let vars: Vec<NamedVar> = shapes
        .iter()
        .zip(&init)
        .map(|((n, _), t)| (n.to_string(), Var::from_tensor(&t.copy().unwrap()).unwrap()))
        .collect();
    let decay: Vec<NamedVar> = vec![vars[0].clone(), vars[1].clone(), vars[3].clone()];
    let no_decay: Vec<NamedVar> = vec![vars[2].clone()];
    let mut opt = AdamW::new(vec![ParamGroup::new(decay), ParamGroup::new(no_decay)]).unwrap();
    let mut refs: Vec<RefAdam> = init
        .iter()
        .map(|t| {
            let p = vec_f64(t);
            let n = p.len();
            RefAdam {
                p,
                m: vec![0.0; n],
                v: vec![0.0; n],
                t: 0,
            }
        })
        .collect();
    let lrs = [0.0, 1e-3, 2e-3, 1.5e-3, 1e-3];
    let wds = [0.04, 0.1, 0.2, 0.3, 0.4];
    for step in 0..5 {
        opt.set_lr(0, lrs[step]).unwrap();
        opt.set_lr(1, lrs[step]).unwrap();
        opt.set_weight_decay(0, wds[step]).unwrap();
        let gs: Vec<Tensor> = shapes
            .iter()
            .map(|(_, n)| (Tensor::randn(0f32, 1.0, *n, &dev).unwrap() * 0.5).unwrap())
            .collect();
        let mut pairs: Vec<(&Var, Tensor)> = vars
            .iter()
            .zip(&gs)
            .map(|((_, v), g)| (v, g.clone()))
            .collect();
        if step == 0 {
            pairs.pop(); // the last layer has no gradient in the first step (frozen)
        }
        let mut grads = grad_store(&pairs);
        if step == 0 {
            assert!(grads.remove(vars[3].1.as_tensor()).is_none());
        }
        opt.step(&grads).unwrap();
        for (i, r) in refs.iter_mut().enumerate() {
            if step == 0 && i == 3 {
                continue;
            }
            let wd = if i == 2 { 0.0 } else { wds[step] };
            r.step(&vec_f64(&gs[i]), lrs[step], wd);
        }
        for (i, ((name, v), r)) in vars.iter().zip(&refs).enumerate() {
            let want = Tensor::from_slice(&r.p, r.p.len(), &dev).unwrap();
            assert_close(
                &format!("step {step} {name}"),
                v.as_tensor(),
                &want,
                1e-6,
                1e-5,
            );
            let _ = i;
        }
    }
    assert_eq!(opt.step_count("w_big"), 5);
    assert_eq!(opt.step_count("head.last_layer.weight_v"), 4);
    // the skipped parameter kept its initial value through step 0 (no decay either): its reference
    // started one step later and still matches, which the loop above checked.

    // export / import by name round-trips and continues identically
    let state = opt.export_state().unwrap();
    assert_eq!(state.len(), 4);
    let (name, st) = &state[1];
    assert_eq!(name, "head.last_layer.weight_v");
    assert_eq!(st.step, 4);
    assert_close(
        "exp_avg",
        &st.exp_avg,
        &Tensor::from_slice(&refs[3].m, 11, &dev).unwrap(),
        1e-6,
        1e-4,
    );
    assert_close(
        "exp_avg_sq",
        &st.exp_avg_sq,
        &Tensor::from_slice(&refs[3].v, 11, &dev).unwrap(),
        1e-9,
        1e-4,
    );
    let tensors: HashMap<String, Tensor> = opt.state_tensors().unwrap().into_iter().collect();
    assert_eq!(tensors.len(), 12);
    let mut opt2 = AdamW::new(opt.groups().to_vec()).unwrap();
    opt2.load_state_tensors(&tensors).unwrap();
    assert_eq!(opt2.step_count("head.last_layer.weight_v"), 4);
    let before: Vec<Tensor> = vars
        .iter()
        .map(|(_, v)| v.as_tensor().copy().unwrap())
        .collect();
    let gs: Vec<Tensor> = shapes
        .iter()
        .map(|(_, n)| Tensor::randn(0f32, 1.0, *n, &dev).unwrap())
        .collect();
    let pairs: Vec<(&Var, Tensor)> = vars
        .iter()
        .zip(&gs)
        .map(|((_, v), g)| (v, g.clone()))
        .collect();
    let grads = grad_store(&pairs);
    opt.set_lr(0, 1e-3).unwrap();
    opt.step(&grads).unwrap();
    let after1: Vec<Tensor> = vars
        .iter()
        .map(|(_, v)| v.as_tensor().copy().unwrap())
        .collect();
    for ((_, v), b) in vars.iter().zip(&before) {
        v.set(b).unwrap();
    }
    opt2.set_lr(0, 1e-3).unwrap();
    opt2.set_weight_decay(0, 0.4).unwrap();
    opt2.step(&grads).unwrap();
    for (((n, v), a), _) in vars.iter().zip(&after1).zip(&before) {
        assert_close(&format!("resumed {n}"), v.as_tensor(), a, 0.0, 0.0);
    }
}

#[test]
fn adamw_state_import_is_checked_by_name_and_shape() {
    let dev = common::tdev();
    let v = Var::zeros((2, 3), DType::F32, &dev).unwrap();
    let mut opt = AdamW::new(vec![ParamGroup::new(vec![("w".into(), v)])]).unwrap();
    let st = |shape: (usize, usize)| AdamWParamState {
        step: 3,
        exp_avg: Tensor::zeros(shape, DType::F32, &dev).unwrap(),
        exp_avg_sq: Tensor::zeros(shape, DType::F32, &dev).unwrap(),
    };
    let e = opt
        .import_state(&[("w".into(), st((3, 2)))])
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("\"w\"") && e.contains("[2, 3]") && e.contains("[3, 2]"),
        "{e}"
    );
    let e = opt
        .import_state(&[("nope".into(), st((2, 3)))])
        .unwrap_err()
        .to_string();
    assert!(e.contains("nope"), "{e}");
    opt.import_state(&[("w".into(), st((2, 3)))]).unwrap();
    assert_eq!(opt.step_count("w"), 3);
    let mut bad = HashMap::new();
    bad.insert(
        "exp_avg.w".to_string(),
        Tensor::zeros((2, 3), DType::F32, &dev).unwrap(),
    );
    assert!(opt
        .load_state_tensors(&bad)
        .unwrap_err()
        .to_string()
        .contains("step.w"));
    assert!(opt.set_lr(1, 0.1).is_err());
    let dup = Var::zeros(2, DType::F32, &dev).unwrap();
    assert!(AdamW::new(vec![
        ParamGroup::new(vec![("a".into(), dup.clone())]),
        ParamGroup::new(vec![("a".into(), dup)])
    ])
    .is_err());
}

#[test]
fn sgd_and_lars_follow_the_official_formulas() {
    let dev = common::tdev();
    let p0 = vec![0.5f64, -1.0, 2.0, 0.25];
    let mk = || {
        Var::from_tensor(&Tensor::from_slice(&[0.5f32, -1.0, 2.0, 0.25], (2, 2), &dev).unwrap())
            .unwrap()
    };
    let grads_seq = [[0.1f64, 0.2, -0.3, 0.4], [-0.2, 0.1, 0.05, 0.3]];
    let (lr, wd, mom) = (0.1f64, 0.01f64, 0.9f64);

    let v = mk();
    let mut sgd = Sgd::new(
        vec![ParamGroup {
            params: vec![("w".into(), v.clone())],
            lr,
            weight_decay: wd,
        }],
        mom,
    )
    .unwrap();
    let (mut p, mut buf) = (p0.clone(), vec![0f64; 4]);
    for (s, g) in grads_seq.iter().enumerate() {
        let grads = grad_store(&[(
            &v,
            Tensor::from_slice(&g.map(|x| x as f32), (2, 2), &dev).unwrap(),
        )]);
        sgd.step(&grads).unwrap();
        for i in 0..4 {
            let d = g[i] + wd * p[i];
            buf[i] = if s == 0 { d } else { mom * buf[i] + d };
            p[i] -= lr * buf[i];
        }
        assert_close(
            "sgd",
            v.as_tensor(),
            &Tensor::from_slice(&p, (2, 2), &dev).unwrap(),
            1e-6,
            1e-6,
        );
    }

    let v = mk();
    let b = Var::from_tensor(&Tensor::from_slice(&[1.0f32, 2.0], 2, &dev).unwrap()).unwrap();
    let mut lars = Lars::new(vec![ParamGroup {
        params: vec![("w".into(), v.clone()), ("b".into(), b.clone())],
        lr,
        weight_decay: wd,
    }])
    .unwrap();
    let (mut p, mut mu) = (p0.clone(), vec![0f64; 4]);
    let (mut pb, mut mub) = (vec![1.0f64, 2.0], vec![0f64; 2]);
    for g in grads_seq.iter() {
        let gb = [g[0], g[1]];
        let grads = grad_store(&[
            (
                &v,
                Tensor::from_slice(&g.map(|x| x as f32), (2, 2), &dev).unwrap(),
            ),
            (
                &b,
                Tensor::from_slice(&gb.map(|x| x as f32), 2, &dev).unwrap(),
            ),
        ]);
        lars.step(&grads).unwrap();
        let dp: Vec<f64> = (0..4).map(|i| g[i] + wd * p[i]).collect();
        let pn = p.iter().map(|x| x * x).sum::<f64>().sqrt();
        let un = dp.iter().map(|x| x * x).sum::<f64>().sqrt();
        let q = 0.001 * pn / un;
        for i in 0..4 {
            mu[i] = 0.9 * mu[i] + dp[i] * q;
            p[i] -= lr * mu[i];
        }
        for i in 0..2 {
            // 1-D: no weight decay, no adaptation
            mub[i] = 0.9 * mub[i] + gb[i];
            pb[i] -= lr * mub[i];
        }
        assert_close(
            "lars 2-d",
            v.as_tensor(),
            &Tensor::from_slice(&p, (2, 2), &dev).unwrap(),
            1e-6,
            1e-6,
        );
        assert_close(
            "lars 1-d",
            b.as_tensor(),
            &Tensor::from_slice(&pb, 2, &dev).unwrap(),
            1e-6,
            1e-6,
        );
    }
}

/// SGD's and LARS's momentum buffers survive a round trip through their state tensors: a restored optimiser
/// takes the next step exactly as the original; bad state is refused naming the key or parameter and shapes.
#[test]
fn sgd_and_lars_state_round_trips() {
    let dev = common::tdev();
    let group = |v: &Var| {
        vec![ParamGroup {
            params: vec![("w".into(), v.clone())],
            lr: 0.1,
            weight_decay: 0.01,
        }]
    };
    let grads =
        |v: &Var, g: [f32; 4]| grad_store(&[(v, Tensor::from_slice(&g, (2, 2), &dev).unwrap())]);
    let (g1, g2) = ([0.1f32, 0.2, -0.3, 0.4], [-0.2f32, 0.1, 0.05, 0.3]);
    let diff = |x: &Var, y: &Var| {
        let (p, q) = (vec_f64(x.as_tensor()), vec_f64(y.as_tensor()));
        p.iter()
            .zip(&q)
            .map(|(a, b)| (a - b).abs())
            .fold(0.0, f64::max)
    };
    for (lars, key) in [(false, "momentum_buffer.w"), (true, "mu.w")] {
        let new = |v: &Var| -> Box<dyn Optimizer> {
            if lars {
                Box::new(Lars::new(group(v)).unwrap())
            } else {
                Box::new(Sgd::new(group(v), 0.9).unwrap())
            }
        };
        let a = Var::from_tensor(
            &Tensor::from_slice(&[0.5f32, -1.0, 2.0, 0.25], (2, 2), &dev).unwrap(),
        )
        .unwrap();
        let mut oa = new(&a);
        oa.step(&grads(&a, g1)).unwrap();
        let state: HashMap<String, Tensor> = oa.state_tensors().unwrap().into_iter().collect();
        assert_eq!(state.keys().collect::<Vec<_>>(), [key]);
        // b restores the state, c does not.
        let b = Var::from_tensor(&a.as_tensor().copy().unwrap()).unwrap();
        let c = Var::from_tensor(&a.as_tensor().copy().unwrap()).unwrap();
        let (mut ob, mut oc) = (new(&b), new(&c));
        let mut bad = |k: &str, t: Tensor| -> String {
            let m = HashMap::from([(k.to_string(), t)]);
            ob.load_state_tensors(&m).unwrap_err().to_string()
        };
        let e = bad(key, Tensor::zeros(3, DType::F32, &dev).unwrap());
        assert!(
            e.contains("\"w\"") && e.contains("[2, 2]") && e.contains("[3]"),
            "{e}"
        );
        let e = bad(&format!("{key}x"), state[key].clone());
        assert!(e.contains("wx"), "{e}");
        let e = bad("exp_avg.w", state[key].clone());
        assert!(e.contains("exp_avg.w"), "{e}");
        ob.load_state_tensors(&state).unwrap();
        for (o, v) in [(&mut oa, &a), (&mut ob, &b), (&mut oc, &c)] {
            o.step(&grads(v, g2)).unwrap();
        }
        assert_eq!(
            diff(&a, &b),
            0.0,
            "{key}: the restored optimiser stepped differently"
        );
        assert!(diff(&a, &c) > 1e-4, "{key}: the state made no difference");
    }
}

dino_kernels::portable_path_tests!(
    clip_gradients_matches_official,
    adamw_reproduces_torch_with_per_parameter_steps,
    sgd_and_lars_follow_the_official_formulas,
);
