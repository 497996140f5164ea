//! Pixel operations that reproduce Pillow 13 / torchvision's PIL path bit for bit, on RGB u8 HWC buffers:
//! bicubic resize and resized crop ([`resize`]), horizontal flip, colour ops ([`color`]: brightness, contrast,
//! saturation, hue through Pillow's u8 HSV, grayscale), Gaussian blur ([`blur`]: Pillow's 3-pass extended box),
//! solarize, and ToTensor + Normalize to f32 CHW.
//!
//! The exact arithmetic is documented in `shared/golden-aug/README.md`; every op is tested against the
//! Pillow outputs stored there (`tests/pil_ops.rs`).

pub mod blur;
pub mod color;
pub mod kernels;
pub mod resize;

pub use blur::gaussian_blur;
pub use color::{
    adjust_brightness, adjust_contrast, adjust_hue, adjust_saturation, grayscale3, hsv_to_rgb,
    rgb_to_hsv, rgb_to_hsv_image,
};
pub use resize::{pass_order, resized_crop_raw, Coeffs, PassOrder};

use crate::error::{Error, Result};
use image::RgbImage;

/// `Image.crop((left, top, left + width, top + height)).resize((out_w, out_h), BICUBIC)` (what torchvision's
/// `F.resized_crop` does on a PIL image). The box must lie inside the image and be non-empty.
pub fn resized_crop(
    img: &RgbImage,
    top: usize,
    left: usize,
    height: usize,
    width: usize,
    out_w: usize,
    out_h: usize,
) -> Result<RgbImage> {
    let (iw, ih) = (img.width() as usize, img.height() as usize);
    if width == 0
        || height == 0
        || out_w == 0
        || out_h == 0
        || left + width > iw
        || top + height > ih
    {
        return Err(Error::InvalidArgument(format!(
            "resized_crop: box (top {top}, left {left}, height {height}, width {width}) to {out_w}x{out_h} \
             does not fit a {iw}x{ih} image or is empty"
        )));
    }
    let out = resized_crop_raw(img.as_raw(), iw, top, left, height, width, out_w, out_h);
    Ok(RgbImage::from_raw(out_w as u32, out_h as u32, out)
        .expect("buffer has out_w * out_h * 3 bytes"))
}

/// `Image.resize((out_w, out_h), BICUBIC)` of the whole image.
pub fn resize(img: &RgbImage, out_w: usize, out_h: usize) -> Result<RgbImage> {
    resized_crop(
        img,
        0,
        0,
        img.height() as usize,
        img.width() as usize,
        out_w,
        out_h,
    )
}

/// `TF.hflip` = `Image.transpose(FLIP_LEFT_RIGHT)`, in place on an RGB HWC buffer of `width` pixels per row.
pub fn hflip(data: &mut [u8], width: usize) {
    if width == 0 {
        return;
    }
    for row in data.chunks_exact_mut(width * 3) {
        let (mut i, mut j) = (0, width - 1);
        while i < j {
            for c in 0..3 {
                row.swap(i * 3 + c, j * 3 + c);
            }
            i += 1;
            j -= 1;
        }
    }
}

/// `ImageOps.solarize(img, threshold)`: values `>= threshold` become `255 - v`. DINO uses 128.
pub fn solarize(data: &mut [u8], threshold: u8) {
    for v in data.iter_mut() {
        if *v >= threshold {
            *v = 255 - *v;
        }
    }
}

/// `ToTensor()` followed by `Normalize(mean, std)`, precomputed as a per-channel table of the exact f32
/// results `((v / 255) - mean) / std` (true float32 divisions, bitwise equal to torchvision).
#[derive(Debug, Clone)]
pub struct Normalize {
    mean: [f32; 3],
    std: [f32; 3],
    lut: Box<[[f32; 256]; 3]>,
}

impl Normalize {
    /// The table for `mean` and `std` (every std must be non-zero and finite).
    pub fn new(mean: [f32; 3], std: [f32; 3]) -> Result<Self> {
        if std.iter().any(|s| !s.is_finite() || *s == 0.0) || mean.iter().any(|m| !m.is_finite()) {
            return Err(Error::InvalidArgument(format!(
                "Normalize: mean {mean:?} and std {std:?} must be finite with std != 0"
            )));
        }
        let mut lut = Box::new([[0f32; 256]; 3]);
        for c in 0..3 {
            for v in 0..256 {
                lut[c][v] = ((v as f32) / 255.0 - mean[c]) / std[c];
            }
        }
        Ok(Normalize { mean, std, lut })
    }

    /// The ImageNet statistics DINO uses.
    pub fn imagenet() -> Self {
        Self::new([0.485, 0.456, 0.406], [0.229, 0.224, 0.225]).expect("valid constants")
    }

    /// Per-channel mean (ImageNet: 0.485, 0.456, 0.406).
    pub fn mean(&self) -> [f32; 3] {
        self.mean
    }

    /// Per-channel standard deviation (ImageNet: 0.229, 0.224, 0.225).
    pub fn std(&self) -> [f32; 3] {
        self.std
    }

    /// RGB u8 HWC (`data.len() / 3` pixels) to normalised f32 CHW.
    pub fn apply(&self, data: &[u8]) -> Vec<f32> {
        let mut out = vec![0f32; data.len() / 3 * 3];
        kernels::to_chw_lut(data, &self.lut, &mut out);
        out
    }
}
