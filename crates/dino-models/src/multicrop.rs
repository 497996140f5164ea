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

    /// The iBOT forward (dinov2's `forward_backward` up to the heads, with a head shared by CLS and patch
    /// tokens): the 2 global crops `crops[..2]` through the backbone with `masks` `(2B, N)` (crop-major, u8 or
    /// u32, nonzero = masked; `None` for the teacher), the other crops as in [`forward`](Self::forward), then
    /// the head once on `[features of every crop; the global crops' patch tokens at mask_indices]` (flat
    /// indices `c·N + i` into the `(2B, N)` patch grid, `(m)` u32). Returns `(features (n·B, D), head output
    /// (n·B, K), patch head output (m, K))`.
    pub fn forward_ibot(
        &self,
        crops: &[Tensor],
        masks: Option<&Tensor>,
        mask_indices: &Tensor,
        train: bool,
    ) -> Result<(Tensor, Tensor, Tensor)> {
        if crops.len() < 2 {
            candle_core::bail!(
                "multi-crop: iBOT needs the 2 global crops, got {}",
                crops.len()
            );
        }
        let global = Tensor::cat(&crops[..2], 0)?;
        let (g_feats, patches) = self.backbone.forward_tokens(&global, masks, train)?;
        let (bn, n, d) = patches.dims3()?;
        let masked = patches
            .reshape((bn * n, d))?
            .index_select(mask_indices, 0)?;
        let feats = if crops.len() > 2 {
            Tensor::cat(&[g_feats, self.forward_features(&crops[2..], train)?], 0)?
        } else {
            g_feats
        };
        let rows = feats.dim(0)?;
        let m = masked.dim(0)?;
        let out = self
            .head
            .forward(&Tensor::cat(&[&feats, &masked], 0)?, train)?;
        let cls_out = out.narrow(0, 0, rows)?;
        let patch_out = out.narrow(0, rows, m)?;
        Ok((feats, cls_out, patch_out))
    }

    /// `crops`: n tensors `(B, 3, h_i, w_i)` -> `(n·B, K)`, crop-major rows (rows `[0, B)` are crop 0).
    pub fn forward(&self, crops: &[Tensor], train: bool) -> Result<Tensor> {
        Ok(self.forward_with_features(crops, train)?.1)
    }
}
