//! The `Backbone` trait: what the multi-crop wrapper, the trainer and the evaluations need of a network.

use candle_core::{Device, Result, Tensor};

/// A feature extractor: images in, one feature vector per image out.
pub trait Backbone: Send + Sync {
    /// `(B, 3, H, W)` -> `(B, D)`: the CLS token after the final norm (ViT) or the pooled feature (ResNet).
    /// `train` enables drop path (ViT) and batch statistics with running-stat updates (BatchNorm).
    fn forward_features(&self, x: &Tensor, train: bool) -> Result<Tensor>;

    /// `(B, 3, H, W)` and optional patch masks `(B, N)` (nonzero = masked) -> `(feature (B, D), patch tokens
    /// (B, N, D))`, for iBOT. Only backbones with patch tokens (the ViT) have it; the others answer an error.
    fn forward_tokens(
        &self,
        _x: &Tensor,
        _masks: Option<&Tensor>,
        _train: bool,
    ) -> Result<(Tensor, Tensor)> {
        candle_core::bail!("this backbone has no patch tokens (iBOT needs a ViT)")
    }

    /// The feature dimension `D`.
    fn embed_dim(&self) -> usize;

    /// `(B, 3, H, W)` -> `(B, heads, H / p, W / p)`: each head's attention of the CLS query over the patch
    /// tokens in the last block (evaluation mode; registers left out), as `visualize_attention.py` draws it.
    /// `None` for backbones without attention (ResNet).
    fn cls_attention(&self, _x: &Tensor) -> Result<Option<Tensor>> {
        Ok(None)
    }

    /// The device the parameters live on (inputs must be moved there).
    fn device(&self) -> Device {
        Device::Cpu
    }

    /// Reseed the network's own RNG (drop-path masks), so a given iteration draws the same masks on resume.
    fn reseed(&self, _seed: u64) {}

    /// Reseed as [`Backbone::reseed`], with the rows of one crop being the global-batch positions `samples`,
    /// so that per-sample draws do not depend on the data-parallel split (ViT drop path).
    fn set_drop_path_samples(&self, seed: u64, _samples: &[u64]) {
        self.reseed(seed)
    }
}
