//! The DINO multi-crop augmentation (`DataAugmentationDINO` of main_dino.py) and the evaluation transform,
//! faithful to torchvision's PIL path: `RandomResizedCrop` sampling (10 attempts, log-uniform aspect ratio,
//! centre-crop fallback) with Pillow bicubic, flip, `ColorJitter` in random order, grayscale, Pillow's
//! Gaussian blur, solarisation, ToTensor + Normalize.
//!
//! Every random decision of one view is a [`ViewParams`], sampled by
//! [`DataAugmentationDINO::sample_params`] in the official draw order and rendered deterministically by
//! [`DataAugmentationDINO::render_u8`] / [`DataAugmentationDINO::render`]; the pixels come from
//! [`crate::pil`]. Randomness comes only from the `ChaCha8Rng` passed in; [`sample_rng`] derives it from
//! `(seed, epoch, index)`. The draws follow torchvision's distributions and order, but not torch's or
//! CPython's RNG streams (which cannot be reproduced outside them), so a given seed gives other crops than
//! PyTorch does; parity with the official pipeline is statistical (`tests/aug_stats.rs`), and exact for the
//! pixels once the decisions are fixed (`tests/augment.rs`).

use image::RgbImage;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use crate::error::{Error, Result};
use crate::pil::{self, Normalize};
use crate::view::{Transform, View};

/// The RNG of sample `index` in `epoch` for a run seeded with `seed`. The ChaCha key is a SplitMix64 hash of
/// `seed`, the stream is `epoch` and the sample's draws start at word `index << 32`, so distinct triples
/// never share random words, and the result depends on nothing else (thread count, batch order).
pub fn sample_rng(seed: u64, epoch: u64, index: u64) -> ChaCha8Rng {
    let mut state = seed ^ 0x6a09_e667_f3bc_c908;
    let mut key = [0u8; 32];
    for chunk in key.chunks_exact_mut(8) {
        chunk.copy_from_slice(&splitmix64(&mut state).to_le_bytes());
    }
    let mut rng = ChaCha8Rng::from_seed(key);
    rng.set_stream(epoch);
    rng.set_word_pos((index as u128) << 32);
    rng
}

/// SplitMix64 (Steele et al. 2014): advances `state` and returns a well-mixed 64-bit value.
fn splitmix64(state: &mut u64) -> u64 {
    *state = state.wrapping_add(0x9e37_79b9_7f4a_7c15);
    let mut z = *state;
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// `torch.empty(1).uniform_(a, b)`: a float32 uniform in `[a, b)`.
fn uniform_f32(rng: &mut ChaCha8Rng, a: f32, b: f32) -> f32 {
    let u: f32 = rng.random();
    a + (b - a) * u
}

/// Python's `random.random()`: a double in `[0, 1)`.
fn random_f64(rng: &mut ChaCha8Rng) -> f64 {
    rng.random::<f64>()
}

/// A crop box in pixels: rows `top .. top + height`, columns `left .. left + width`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CropBox {
    /// First row (torchvision's `i`).
    pub top: usize,
    /// First column (`j`).
    pub left: usize,
    /// Number of rows (`h`).
    pub height: usize,
    /// Number of columns (`w`).
    pub width: usize,
}

/// `RandomResizedCrop.get_params(img, scale, ratio)` for a `width x height` image: up to 10 attempts with
/// area fraction `U(scale)` and aspect ratio `exp(U(ln ratio))`, then the centre-crop fallback.
pub fn random_resized_crop_params(
    width: usize,
    height: usize,
    scale: (f64, f64),
    ratio: (f64, f64),
    rng: &mut ChaCha8Rng,
) -> CropBox {
    let area = (width * height) as f64;
    let log_ratio = ((ratio.0 as f32).ln(), (ratio.1 as f32).ln());
    for _ in 0..10 {
        let target_area = area * uniform_f32(rng, scale.0 as f32, scale.1 as f32) as f64;
        let aspect = uniform_f32(rng, log_ratio.0, log_ratio.1).exp() as f64;
        // Python's round() is half to even.
        let w = (target_area * aspect).sqrt().round_ties_even() as usize;
        let h = (target_area / aspect).sqrt().round_ties_even() as usize;
        if 0 < w && w <= width && 0 < h && h <= height {
            let top = rng.random_range(0..=height - h);
            let left = rng.random_range(0..=width - w);
            return CropBox {
                top,
                left,
                height: h,
                width: w,
            };
        }
    }
    let in_ratio = width as f64 / height as f64;
    let (rmin, rmax) = (ratio.0.min(ratio.1), ratio.0.max(ratio.1));
    let (w, h) = if in_ratio < rmin {
        (
            width,
            ((width as f64 / rmin).round_ties_even() as usize).min(height),
        )
    } else if in_ratio > rmax {
        (
            ((height as f64 * rmax).round_ties_even() as usize).min(width),
            height,
        )
    } else {
        (width, height)
    };
    CropBox {
        top: (height - h) / 2,
        left: (width - w) / 2,
        height: h,
        width: w,
    }
}

/// The colour-jitter decisions of one view: the op order (`torch.randperm(4)`: 0 brightness, 1 contrast,
/// 2 saturation, 3 hue, applied left to right) and the factors (`None` when that jitter is disabled).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct JitterParams {
    /// Op ids in application order.
    pub order: [u8; 4],
    /// Brightness factor, in `[max(0, 1 - b), 1 + b]`.
    pub brightness: Option<f64>,
    /// Contrast factor, in `[max(0, 1 - c), 1 + c]`.
    pub contrast: Option<f64>,
    /// Saturation factor, in `[max(0, 1 - s), 1 + s]`.
    pub saturation: Option<f64>,
    /// Hue shift, in `[-h, h]`.
    pub hue: Option<f64>,
}

impl JitterParams {
    /// Apply the four ops in `order` (`ColorJitter.forward` after `get_params`) to an RGB u8 HWC buffer.
    pub fn apply(&self, data: &mut [u8]) {
        for &op in &self.order {
            match op {
                0 => {
                    if let Some(f) = self.brightness {
                        pil::adjust_brightness(data, f)
                    }
                }
                1 => {
                    if let Some(f) = self.contrast {
                        pil::adjust_contrast(data, f)
                    }
                }
                2 => {
                    if let Some(f) = self.saturation {
                        pil::adjust_saturation(data, f)
                    }
                }
                _ => {
                    if let Some(f) = self.hue {
                        pil::adjust_hue(data, f)
                    }
                }
            }
        }
    }
}

/// Every random decision of one view. Rendering a `ViewParams` is deterministic, so recorded decisions
/// (the golden chains) can be replayed exactly.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ViewParams {
    /// The crop box in the source image.
    pub crop: CropBox,
    /// Output side (square), 224 for global crops and 96 for local ones by default.
    pub size: usize,
    /// Horizontal flip.
    pub flip: bool,
    /// Colour jitter, when `RandomApply` fired.
    pub jitter: Option<JitterParams>,
    /// Convert to 3-channel grayscale.
    pub grayscale: bool,
    /// Gaussian blur sigma (Pillow's radius), when the blur fired.
    pub blur_sigma: Option<f64>,
    /// Solarise (global crop 2 only).
    pub solarize: bool,
}

/// The kind of a view in the multi-crop list.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ViewKind {
    /// Global crop 1 (blur p 1.0, no solarisation).
    Global1,
    /// Global crop 2 (blur p 0.1, solarisation p 0.2).
    Global2,
    /// A local crop (blur p 0.5).
    Local,
}

/// The parameters of `DataAugmentationDINO`; the defaults are the official ones (main_dino.py).
#[derive(Debug, Clone, PartialEq)]
pub struct DinoAugConfig {
    /// Scale range of the global crops' area fraction. Default (0.4, 1.0).
    pub global_crops_scale: (f64, f64),
    /// Scale range of the local crops' area fraction. Default (0.05, 0.4).
    pub local_crops_scale: (f64, f64),
    /// Number of local crops. Default 8.
    pub local_crops_number: usize,
    /// Output side of the global crops. Default 224.
    pub global_crop_size: usize,
    /// Output side of the local crops. Default 96.
    pub local_crop_size: usize,
    /// Aspect-ratio range of RandomResizedCrop. Default (3/4, 4/3).
    pub ratio: (f64, f64),
    /// Horizontal flip probability. Default 0.5.
    pub flip_p: f64,
    /// Probability of applying the colour jitter. Default 0.8.
    pub color_jitter_p: f64,
    /// ColorJitter brightness strength (factor in `[1 - b, 1 + b]`, 0 disables). Default 0.4.
    pub brightness: f64,
    /// ColorJitter contrast strength. Default 0.4.
    pub contrast: f64,
    /// ColorJitter saturation strength. Default 0.2.
    pub saturation: f64,
    /// ColorJitter hue strength (shift in `[-h, h]`, at most 0.5). Default 0.1.
    pub hue: f64,
    /// Random grayscale probability. Default 0.2.
    pub grayscale_p: f64,
    /// Blur probability of global crop 1. Default 1.0.
    pub global1_blur_p: f64,
    /// Blur probability of global crop 2. Default 0.1.
    pub global2_blur_p: f64,
    /// Blur probability of the local crops. Default 0.5.
    pub local_blur_p: f64,
    /// Range of the blur sigma (Pillow radius). Default (0.1, 2.0).
    pub blur_sigma: (f64, f64),
    /// Solarisation probability of global crop 2. Default 0.2.
    pub global2_solarize_p: f64,
    /// Solarisation threshold. Default 128.
    pub solarize_threshold: u8,
    /// Normalisation mean per channel. Default ImageNet (0.485, 0.456, 0.406).
    pub mean: [f32; 3],
    /// Normalisation std per channel. Default ImageNet (0.229, 0.224, 0.225).
    pub std: [f32; 3],
}

impl Default for DinoAugConfig {
    fn default() -> Self {
        DinoAugConfig {
            global_crops_scale: (0.4, 1.0),
            local_crops_scale: (0.05, 0.4),
            local_crops_number: 8,
            global_crop_size: 224,
            local_crop_size: 96,
            ratio: (3.0 / 4.0, 4.0 / 3.0),
            flip_p: 0.5,
            color_jitter_p: 0.8,
            brightness: 0.4,
            contrast: 0.4,
            saturation: 0.2,
            hue: 0.1,
            grayscale_p: 0.2,
            global1_blur_p: 1.0,
            global2_blur_p: 0.1,
            local_blur_p: 0.5,
            blur_sigma: (0.1, 2.0),
            global2_solarize_p: 0.2,
            solarize_threshold: 128,
            mean: [0.485, 0.456, 0.406],
            std: [0.229, 0.224, 0.225],
        }
    }
}

impl DinoAugConfig {
    /// Sets the same normalisation mean/std on the three channels (greyscale data replicated to RGB, e.g.
    /// Fashion-MNIST 0.2860 / 0.3530).
    pub fn with_grey_normalization(mut self, mean: f32, std: f32) -> Self {
        self.mean = [mean; 3];
        self.std = [std; 3];
        self
    }

    /// Checks every field; the error names the offending one.
    pub fn validate(&self) -> Result<()> {
        let bad = |what: String| Err(Error::InvalidArgument(format!("DinoAugConfig: {what}")));
        for (name, (a, b)) in [
            ("global_crops_scale", self.global_crops_scale),
            ("local_crops_scale", self.local_crops_scale),
        ] {
            if !(a > 0.0 && a <= b && b.is_finite()) {
                return bad(format!("{name} = ({a}, {b}) must satisfy 0 < min <= max"));
            }
        }
        let (r0, r1) = self.ratio;
        if !(r0 > 0.0 && r0 <= r1 && r1.is_finite()) {
            return bad(format!("ratio = ({r0}, {r1}) must satisfy 0 < min <= max"));
        }
        if self.global_crop_size == 0 || self.local_crop_size == 0 {
            return bad(format!(
                "crop sizes must be > 0 (global_crop_size {}, local_crop_size {})",
                self.global_crop_size, self.local_crop_size
            ));
        }
        for (name, p) in [
            ("flip_p", self.flip_p),
            ("color_jitter_p", self.color_jitter_p),
            ("grayscale_p", self.grayscale_p),
            ("global1_blur_p", self.global1_blur_p),
            ("global2_blur_p", self.global2_blur_p),
            ("local_blur_p", self.local_blur_p),
            ("global2_solarize_p", self.global2_solarize_p),
        ] {
            if !(0.0..=1.0).contains(&p) {
                return bad(format!("{name} = {p} is not a probability"));
            }
        }
        for (name, v) in [
            ("brightness", self.brightness),
            ("contrast", self.contrast),
            ("saturation", self.saturation),
        ] {
            if !(v >= 0.0 && v.is_finite()) {
                return bad(format!("{name} = {v} must be >= 0"));
            }
        }
        if !(0.0..=0.5).contains(&self.hue) {
            return bad(format!("hue = {} must be in [0, 0.5]", self.hue));
        }
        let (s0, s1) = self.blur_sigma;
        if !(s0 > 0.0 && s0 <= s1 && s1.is_finite()) {
            return bad(format!(
                "blur_sigma = ({s0}, {s1}) must satisfy 0 < min <= max"
            ));
        }
        Normalize::new(self.mean, self.std)?;
        Ok(())
    }
}

/// The DINO multi-crop augmentation: `2 + local_crops_number` views (global 1, global 2, locals).
#[derive(Debug, Clone)]
pub struct DataAugmentationDINO {
    cfg: DinoAugConfig,
    normalize: Normalize,
}

impl DataAugmentationDINO {
    /// Validates `cfg` and precomputes the normalisation table.
    pub fn new(cfg: DinoAugConfig) -> Result<Self> {
        cfg.validate()?;
        let normalize = Normalize::new(cfg.mean, cfg.std)?;
        Ok(DataAugmentationDINO { cfg, normalize })
    }

    /// The configuration.
    pub fn config(&self) -> &DinoAugConfig {
        &self.cfg
    }

    /// The kind of view `v` (0 and 1 global, then locals).
    pub fn view_kind(v: usize) -> ViewKind {
        match v {
            0 => ViewKind::Global1,
            1 => ViewKind::Global2,
            _ => ViewKind::Local,
        }
    }

    /// Draws the decisions of one view of a `width x height` image, in torchvision's order: crop, flip,
    /// RandomApply(jitter) [randperm + 4 factors], grayscale, blur (1 draw, + sigma when applied),
    /// solarisation (global 2 only).
    pub fn sample_view(
        &self,
        kind: ViewKind,
        width: usize,
        height: usize,
        rng: &mut ChaCha8Rng,
    ) -> ViewParams {
        let c = &self.cfg;
        let (scale, size, blur_p) = match kind {
            ViewKind::Global1 => (c.global_crops_scale, c.global_crop_size, c.global1_blur_p),
            ViewKind::Global2 => (c.global_crops_scale, c.global_crop_size, c.global2_blur_p),
            ViewKind::Local => (c.local_crops_scale, c.local_crop_size, c.local_blur_p),
        };
        let crop = random_resized_crop_params(width, height, scale, c.ratio, rng);
        let flip = rng.random::<f32>() < c.flip_p as f32;
        // RandomApply: skipped if p < rand.
        let jitter = if (c.color_jitter_p as f32) < rng.random::<f32>() {
            None
        } else {
            Some(self.sample_jitter(rng))
        };
        let grayscale = rng.random::<f32>() < c.grayscale_p as f32;
        let blur_sigma = if random_f64(rng) <= blur_p {
            let (a, b) = c.blur_sigma;
            Some(a + (b - a) * random_f64(rng))
        } else {
            None
        };
        let solarize = kind == ViewKind::Global2 && random_f64(rng) < c.global2_solarize_p;
        ViewParams {
            crop,
            size,
            flip,
            jitter,
            grayscale,
            blur_sigma,
            solarize,
        }
    }

    /// `ColorJitter.get_params`: a uniform permutation, then all four factors (each drawn when enabled).
    fn sample_jitter(&self, rng: &mut ChaCha8Rng) -> JitterParams {
        let c = &self.cfg;
        let mut order = [0u8, 1, 2, 3];
        for i in (1..4).rev() {
            let j = rng.random_range(0..=i);
            order.swap(i, j);
        }
        let mut factor = |x: f64| -> Option<f64> {
            (x > 0.0).then(|| uniform_f32(rng, (1.0 - x).max(0.0) as f32, (1.0 + x) as f32) as f64)
        };
        let brightness = factor(c.brightness);
        let contrast = factor(c.contrast);
        let saturation = factor(c.saturation);
        let hue = (c.hue > 0.0).then(|| uniform_f32(rng, -c.hue as f32, c.hue as f32) as f64);
        JitterParams {
            order,
            brightness,
            contrast,
            saturation,
            hue,
        }
    }

    /// The decisions of all `2 + local_crops_number` views of a `width x height` image, in view order.
    pub fn sample_params(
        &self,
        width: usize,
        height: usize,
        rng: &mut ChaCha8Rng,
    ) -> Vec<ViewParams> {
        (0..self.num_views())
            .map(|v| self.sample_view(Self::view_kind(v), width, height, rng))
            .collect()
    }

    /// Renders one view to u8 RGB HWC (`size x size`), before ToTensor: crop + bicubic resize, flip, jitter,
    /// grayscale, blur, solarisation. The crop box must lie inside `img` (as sampled boxes do).
    pub fn render_u8(&self, img: &RgbImage, p: &ViewParams) -> Result<RgbImage> {
        let CropBox {
            top,
            left,
            height,
            width,
        } = p.crop;
        let mut out = pil::resized_crop(img, top, left, height, width, p.size, p.size)?;
        let size = p.size;
        let d: &mut [u8] = &mut out;
        if p.flip {
            pil::hflip(d, size);
        }
        if let Some(j) = &p.jitter {
            j.apply(d);
        }
        if p.grayscale {
            pil::grayscale3(d);
        }
        if let Some(s) = p.blur_sigma {
            pil::gaussian_blur(d, size, size, s as f32);
        }
        if p.solarize {
            pil::solarize(d, self.cfg.solarize_threshold);
        }
        Ok(out)
    }

    /// Renders one view to a normalised f32 CHW [`View`].
    pub fn render(&self, img: &RgbImage, p: &ViewParams) -> Result<View> {
        let u8img = self.render_u8(img, p)?;
        Ok(View {
            data: self.normalize.apply(u8img.as_raw()),
            channels: 3,
            height: p.size,
            width: p.size,
        })
    }
}

impl Transform for DataAugmentationDINO {
    /// The `2 + local_crops_number` views of `img`. An empty image is treated as one black pixel.
    fn views(&self, img: &RgbImage, rng: &mut ChaCha8Rng) -> Vec<View> {
        let fallback;
        let img = if img.width() == 0 || img.height() == 0 {
            fallback = RgbImage::new(1, 1);
            &fallback
        } else {
            img
        };
        let params = self.sample_params(img.width() as usize, img.height() as usize, rng);
        params
            .iter()
            .map(|p| {
                self.render(img, p)
                    .expect("sampled crop boxes always lie inside the image")
            })
            .collect()
    }

    fn num_views(&self) -> usize {
        2 + self.cfg.local_crops_number
    }
}

/// The evaluation transform of eval_knn.py / eval_linear.py: `Resize(resize_size, BICUBIC)` of the shorter side,
/// `CenterCrop(crop_size)`, ToTensor, Normalize.
#[derive(Debug, Clone)]
pub struct EvalTransform {
    /// Target of the shorter side. Default 256.
    pub resize_size: usize,
    /// Side of the centre crop. Default 224.
    pub crop_size: usize,
    normalize: Normalize,
}

impl EvalTransform {
    /// A transform with the given sizes and normalisation.
    pub fn new(
        resize_size: usize,
        crop_size: usize,
        mean: [f32; 3],
        std: [f32; 3],
    ) -> Result<Self> {
        if resize_size == 0 || crop_size == 0 {
            return Err(Error::InvalidArgument(format!(
                "EvalTransform: resize_size {resize_size} and crop_size {crop_size} must be > 0"
            )));
        }
        Ok(EvalTransform {
            resize_size,
            crop_size,
            normalize: Normalize::new(mean, std)?,
        })
    }

    /// The official ImageNet evaluation transform (256, 224, ImageNet mean/std).
    pub fn imagenet() -> Self {
        EvalTransform {
            resize_size: 256,
            crop_size: 224,
            normalize: Normalize::imagenet(),
        }
    }

    /// torchvision's `Resize(int)` output size: the shorter side becomes `resize_size`, the longer one
    /// `int(resize_size * long / short)`. Returns `(width, height)`.
    pub fn resized_size(&self, width: usize, height: usize) -> (usize, usize) {
        let s = self.resize_size;
        if width <= height {
            (
                s,
                ((s as f64 * height as f64 / width as f64) as usize).max(1),
            )
        } else {
            (
                ((s as f64 * width as f64 / height as f64) as usize).max(1),
                s,
            )
        }
    }

    /// Resize + centre crop to u8 RGB HWC (`crop_size x crop_size`; zero padding when the resized image is
    /// smaller, as torchvision's CenterCrop pads).
    pub fn render_u8(&self, img: &RgbImage) -> Result<RgbImage> {
        if img.width() == 0 || img.height() == 0 {
            return Err(Error::InvalidArgument("EvalTransform: empty image".into()));
        }
        let (rw, rh) = self.resized_size(img.width() as usize, img.height() as usize);
        let resized = pil::resize(img, rw, rh)?;
        let c = self.crop_size;
        // Pad (left/top get the floor half) when smaller than the crop.
        let pad_l = c.saturating_sub(rw) / 2;
        let pad_t = c.saturating_sub(rh) / 2;
        let (pw, ph) = (
            rw + pad_l + c.saturating_sub(rw).div_ceil(2),
            rh + pad_t + c.saturating_sub(rh).div_ceil(2),
        );
        // int(round((h - c) / 2.0)), Python rounding (half to even).
        let top = ((ph - c) as f64 / 2.0).round_ties_even() as usize;
        let left = ((pw - c) as f64 / 2.0).round_ties_even() as usize;
        let mut out = RgbImage::new(c as u32, c as u32);
        for y in 0..c {
            let py = y + top;
            if py < pad_t || py >= pad_t + rh {
                continue;
            }
            for x in 0..c {
                let px = x + left;
                if px < pad_l || px >= pad_l + rw {
                    continue;
                }
                out.put_pixel(
                    x as u32,
                    y as u32,
                    *resized.get_pixel((px - pad_l) as u32, (py - pad_t) as u32),
                );
            }
        }
        Ok(out)
    }
}

impl Transform for EvalTransform {
    /// One view; `rng` is not used. An empty image gives a black view.
    fn views(&self, img: &RgbImage, _rng: &mut ChaCha8Rng) -> Vec<View> {
        let c = self.crop_size;
        let u8img = self
            .render_u8(img)
            .unwrap_or_else(|_| RgbImage::new(c as u32, c as u32));
        vec![View {
            data: self.normalize.apply(u8img.as_raw()),
            channels: 3,
            height: c,
            width: c,
        }]
    }

    fn num_views(&self) -> usize {
        1
    }
}
