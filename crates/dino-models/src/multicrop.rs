//! The multi-crop wrapper (official `utils.MultiCropWrapper`, dino-spec §1.3): runs the backbone once per
//! run of consecutive crops with the same resolution, concatenates the features in crop order and runs the
//! head once on all of them.
//!
//! Row order is crop-major: with crops `[c0, c1, ..., c_{n-1}]`, each `(B, 3, h, w)`, rows `[0, B)` of the
//! output come from `c0`, rows `[B, 2B)` from `c1`, and so on.

use std::ops::Range;

use candle_core::{Result, Tensor};

use crate::backbone::Backbone;
use crate::head::DinoHead;

/// Backbone + DINO head, applied to a list of crops.
pub struct MultiCropWrapper {
    /// The feature extractor (ViT CLS token or ResNet pooled feature).
    pub backbone: Box<dyn Backbone>,
    /// The DINO head.
    pub head: DinoHead,
}

/// Ranges of consecutive crops with the same spatial size `(h, w)`.
///
/// The official code groups by width only (`unique_consecutive` on `shape[-1]`); on every input where the
/// official concatenation succeeds this gives the same groups, and it also accepts equal widths with
/// different heights instead of failing in the concatenation.
pub fn resolution_groups(crops: &[Tensor]) -> Result<Vec<Range<usize>>> {
    let mut groups: Vec<Range<usize>> = Vec::new();
    let mut prev: Option<(usize, usize)> = None;
    for (i, c) in crops.iter().enumerate() {
        let dims = c.dims();
        if dims.len() != 4 {
            candle_core::bail!("multi-crop: crop {i} has shape {dims:?}, expected (B, C, H, W)");
        }
        let hw = (dims[2], dims[3]);
        match (prev, groups.last_mut()) {
            (Some(p), Some(g)) if p == hw => g.end = i + 1,
            _ => groups.push(i..i + 1),
        }
        prev = Some(hw);
    }
    Ok(groups)
}

impl MultiCropWrapper {
    /// Wrap a backbone and a head. The head's `in_dim` must equal the backbone's `embed_dim()`.
    pub fn new(backbone: Box<dyn Backbone>, head: DinoHead) -> crate::error::Result<Self> {
        let (d, h) = (backbone.embed_dim(), head.config().in_dim);
        if d != h {
            return Err(crate::error::Error::Config(format!(
                "MultiCropWrapper: backbone embed_dim {d} differs from head in_dim {h}"
            )));
        }
        Ok(Self { backbone, head })
    }

    /// Backbone features of all crops, `(sum of B_i, D)` in crop-major order: one backbone call per group of
    /// consecutive equal-resolution crops, on their batch concatenation.
    pub fn forward_features(&self, crops: &[Tensor], train: bool) -> Result<Tensor> {
        if crops.is_empty() {
            candle_core::bail!("multi-crop: no crops given");
        }
        let groups = resolution_groups(crops)?;
        let mut feats = Vec::with_capacity(groups.len());
        for g in groups {
            let x = if g.len() == 1 {
                crops[g.start].clone()
            } else {
                Tensor::cat(&crops[g], 0)?
            };
            feats.push(self.backbone.forward_features(&x, train)?);
        }
        if feats.len() == 1 {
            Ok(feats.pop().expect("one group"))
        } else {
            Tensor::cat(&feats, 0)
        }
    }

    /// `crops`: n tensors `(B, 3, h_i, w_i)` -> `(features (n·B, D), head output (n·B, K))`, crop-major rows.
    pub fn forward_with_features(&self, crops: &[Tensor], train: bool) -> Result<(Tensor, Tensor)> {
        let feats = self.forward_features(crops, train)?;
        let out = self.head.forward(&feats, train)?;
        Ok((feats, out))
    }

    /// `crops`: n tensors `(B, 3, h_i, w_i)` -> `(n·B, K)`, crop-major rows (rows `[0, B)` are crop 0).
    pub fn forward(&self, crops: &[Tensor], train: bool) -> Result<Tensor> {
        Ok(self.forward_with_features(crops, train)?.1)
    }
}
