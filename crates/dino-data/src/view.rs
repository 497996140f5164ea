//! The contract between transforms and the loader: an image in, a list of normalised f32 views out.

use image::RgbImage;
use rand_chacha::ChaCha8Rng;

/// One transformed view of an image: normalised f32 in CHW layout.
#[derive(Debug, Clone, PartialEq)]
pub struct View {
    /// `channels * height * width` values, CHW.
    pub data: Vec<f32>,
    /// Number of channels (3).
    pub channels: usize,
    /// Height in pixels.
    pub height: usize,
    /// Width in pixels.
    pub width: usize,
}

/// A (possibly random) image transform producing one or more views. The multi-crop augmentation returns
/// `2 + L` views (global 1, global 2, locals); the evaluation transform returns one.
pub trait Transform: Send + Sync {
    /// Transform `img`, drawing every random decision from `rng`.
    fn views(&self, img: &RgbImage, rng: &mut ChaCha8Rng) -> Vec<View>;

    /// The number of views each call returns.
    fn num_views(&self) -> usize;
}
