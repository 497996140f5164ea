//! Weighted k-NN classification as `eval_knn.knn_classifier`: cosine similarity of l2-normalised
//! features, the k nearest training samples vote for their label with weight `exp(sim / T)`, top-1 and
//! top-5 accuracy in percent. The test set is processed in chunks whose similarity block stays under
//! a fixed memory budget, and any test-set size works (the official code fails below 100 images).

use candle_core::{DType, Tensor, D};

use crate::{Error, Result};

/// Top-1 and top-5 accuracy in percent (`top5` uses the `min(5, k)` best classes, as eval_knn).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct KnnResult {
    /// Top-1 accuracy, percent.
    pub top1: f64,
    /// Top-5 accuracy, percent.
    pub top5: f64,
}

/// Default number of neighbours (README/paper numbers use k = 20).
pub const DEFAULT_K: usize = 20;
/// Default temperature of the vote weights `exp(sim / T)`.
pub const DEFAULT_T: f64 = 0.07;

/// Largest similarity block (test rows x train rows) computed at once, in elements (64 MiB of f32).
const SIM_BUDGET: usize = 1 << 24;

/// Rows of `x` (N, D) divided by their l2 norm (`F.normalize(x, dim=1, p=2)`, eps 1e-12). Differentiable.
pub fn l2_normalize(x: &Tensor) -> Result<Tensor> {
    let norm = x.sqr()?.sum_keepdim(D::Minus1)?.sqrt()?;
    let norm = norm.clamp(1e-12, f64::INFINITY)?;
    Ok(x.broadcast_div(&norm)?)
}

fn labels_vec(t: &Tensor, name: &str, num_classes: usize) -> Result<Vec<usize>> {
    if t.rank() != 1 {
        return Err(Error::shape(name, "(N,) labels", t.dims()));
    }
    let v: Vec<i64> = match t.dtype() {
        DType::I64 => t.to_vec1::<i64>()?,
        DType::U32 => t.to_vec1::<u32>()?.into_iter().map(i64::from).collect(),
        DType::U8 => t.to_vec1::<u8>()?.into_iter().map(i64::from).collect(),
        d => {
            return Err(Error::arg(
                name,
                format!("labels must be i64, u32 or u8, got {d:?}"),
            ))
        }
    };
    v.into_iter()
        .enumerate()
        .map(|(i, l)| {
            if l < 0 || l as usize >= num_classes {
                Err(Error::arg(
                    name,
                    format!("label {l} at index {i} is outside 0..{num_classes}"),
                ))
            } else {
                Ok(l as usize)
            }
        })
        .collect()
}

/// `eval_knn.knn_classifier(train_features, train_labels, test_features, test_labels, k, T,
/// num_classes)`.
///
/// - `train_features` (N_train, D) and `test_features` (N_test, D): l2-normalised rows (call
///   [`l2_normalize`] first), any float dtype, same device.
/// - `train_labels` (N_train,), `test_labels` (N_test,): `i64`, `u32` or `u8` tensors with values in
///   `0..num_classes`.
/// - `k`: neighbours (default [`DEFAULT_K`]); `t`: temperature (default [`DEFAULT_T`]).
///
/// Ties between classes of equal score are broken towards the lower class index (torch's order for ties
/// is unspecified). `k` larger than N_train is an error, like torch's `topk`.
pub fn knn_classifier(
    train_features: &Tensor,
    train_labels: &Tensor,
    test_features: &Tensor,
    test_labels: &Tensor,
    k: usize,
    t: f64,
    num_classes: usize,
) -> Result<KnnResult> {
    let (n_train, d) = match train_features.dims() {
        [n, d] => (*n, *d),
        s => return Err(Error::shape("train_features", "(N_train, D)", s)),
    };
    let n_test = match test_features.dims() {
        [n, dd] if *dd == d => *n,
        s => return Err(Error::shape("test_features", format!("(N_test, {d})"), s)),
    };
    if num_classes == 0 {
        return Err(Error::arg("num_classes", "must be positive"));
    }
    if k == 0 || k > n_train {
        return Err(Error::arg(
            "k",
            format!("must lie in 1..={n_train} (training samples), got {k}"),
        ));
    }
    if t.is_nan() || t <= 0.0 {
        return Err(Error::arg(
            "t",
            format!("temperature must be positive, got {t}"),
        ));
    }
    let train_y = labels_vec(train_labels, "train_labels", num_classes)?;
    let test_y = labels_vec(test_labels, "test_labels", num_classes)?;
    if train_y.len() != n_train {
        return Err(Error::shape(
            "train_labels",
            format!("({n_train},)"),
            train_labels.dims(),
        ));
    }
    if test_y.len() != n_test {
        return Err(Error::shape(
            "test_labels",
            format!("({n_test},)"),
            test_labels.dims(),
        ));
    }
    if n_test == 0 {
        return Err(Error::arg("test_features", "empty test set"));
    }
    let train_t = train_features.to_dtype(DType::F32)?.t()?.contiguous()?;
    let test_f = test_features.to_dtype(DType::F32)?;
    let chunk = (SIM_BUDGET / n_train.max(1)).clamp(1, n_test);
    let top_n = k.min(5);
    let (mut top1, mut top5) = (0usize, 0usize);
    let mut order: Vec<usize> = Vec::with_capacity(n_train);
    let mut scores = vec![0f64; num_classes];
    let mut classes: Vec<usize> = (0..num_classes).collect();
    let mut start = 0;
    while start < n_test {
        let rows = chunk.min(n_test - start);
        let sim = test_f.narrow(0, start, rows)?.matmul(&train_t)?;
        let sim = sim
            .to_device(&candle_core::Device::Cpu)?
            .flatten_all()?
            .to_vec1::<f32>()?;
        for r in 0..rows {
            let row = &sim[r * n_train..(r + 1) * n_train];
            // top-k by similarity (descending; ties by lower train index)
            order.clear();
            order.extend(0..n_train);
            let cmp = |a: &usize, b: &usize| row[*b].total_cmp(&row[*a]).then(a.cmp(b));
            if k < n_train {
                order.select_nth_unstable_by(k - 1, cmp);
            }
            order.truncate(k);
            scores.iter_mut().for_each(|s| *s = 0.0);
            for &j in &order {
                // torch: distances.div_(T).exp_() in f32, summed per class in f32
                let w = ((row[j] / t as f32) as f64).exp() as f32;
                scores[train_y[j]] = (scores[train_y[j]] as f32 + w) as f64;
            }
            classes.sort_by(|a, b| scores[*b].total_cmp(&scores[*a]).then(a.cmp(b)));
            let y = test_y[start + r];
            top1 += usize::from(classes[0] == y);
            top5 += usize::from(classes[..top_n.min(num_classes)].contains(&y));
            classes.iter_mut().enumerate().for_each(|(i, c)| *c = i);
        }
        start += rows;
    }
    Ok(KnnResult {
        top1: top1 as f64 * 100.0 / n_test as f64,
        top5: top5 as f64 * 100.0 / n_test as f64,
    })
}
