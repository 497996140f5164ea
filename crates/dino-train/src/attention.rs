//! Attention maps as `visualize_attention.py` draws them: the CLS-query row of the last block's self-attention
//! per head, the optional mass threshold (sort ascending, normalise, cumulative sum > 1 - t, un-sort),
//! nearest upsampling by the patch size, the viridis colormap (matplotlib's default) and the mask overlay.
//!
//! [`save_sheet`] puts several images and their heads' maps on one PNG, the sheet `dino train` writes at the
//! end of a ViT run (`plots/attention.png`).
//!
//! Everything here works on plain `(heads, h, w)` arrays so it is tested without a network.

use std::path::{Path, PathBuf};

use image::{imageops::FilterType, Rgb, RgbImage};
use plotters::prelude::*;

use crate::error::{Error, Result};

/// Per-head maps on the patch grid: `data[head * h * w + y * w + x]`.
#[derive(Debug, Clone, PartialEq)]
pub struct HeadMaps {
    /// Number of heads.
    pub heads: usize,
    /// Grid height (H / patch).
    pub h: usize,
    /// Grid width (W / patch).
    pub w: usize,
    /// `heads * h * w` values.
    pub data: Vec<f32>,
}

impl HeadMaps {
    /// The map of one head, `h * w` values.
    pub fn head(&self, j: usize) -> &[f32] {
        &self.data[j * self.h * self.w..(j + 1) * self.h * self.w]
    }
}

/// The threshold masks of `visualize_attention.py`, per head: keep the smallest set of highest-attention patches
/// holding at least `t` of the mass. Official steps: sort ascending, divide by the sum, cumulative sum, keep
/// `cumsum > 1 - t`, un-sort. Returns `heads * h * w` booleans in the layout of `maps`.
pub fn threshold_masks(maps: &HeadMaps, t: f32) -> Vec<bool> {
    let n = maps.h * maps.w;
    let mut out = vec![false; maps.heads * n];
    for j in 0..maps.heads {
        let a = maps.head(j);
        let mut idx: Vec<usize> = (0..n).collect();
        // torch.sort is ascending; ties keep index order (stable) here.
        idx.sort_by(|&p, &q| a[p].total_cmp(&a[q]));
        let sum: f32 = a.iter().sum();
        let mut cum = 0f32;
        for &i in &idx {
            cum += a[i] / sum;
            out[j * n + i] = cum > 1.0 - t;
        }
    }
    out
}

/// Nearest-neighbour upsampling of an `h x w` map by an integer factor (`F.interpolate(mode="nearest")`).
pub fn upsample_nearest<T: Copy>(map: &[T], h: usize, w: usize, factor: usize) -> Vec<T> {
    let (oh, ow) = (h * factor, w * factor);
    let mut out = Vec::with_capacity(oh * ow);
    for y in 0..oh {
        for x in 0..ow {
            out.push(map[(y / factor) * w + x / factor]);
        }
    }
    out
}

/// matplotlib's viridis at `t` in [0, 1] (a degree-6 polynomial fit of the 256-entry table, within ~0.01).
pub fn viridis(t: f32) -> [u8; 3] {
    const C: [[f32; 3]; 7] = [
        [0.277_727_33, 0.005_407_344_5, 0.334_099_8],
        [0.105_093_04, 1.404_613_5, 1.384_590_2],
        [-0.330_861_83, 0.214_847_56, 0.095_095_16],
        [-4.634_230_5, -5.799_101, -19.332_441],
        [6.228_27, 14.179_933, 56.690_55],
        [4.776_385, -13.745_145, -65.353_035],
        [-5.435_456, 4.645_852_6, 26.312_435],
    ];
    let t = if t.is_finite() {
        t.clamp(0.0, 1.0)
    } else {
        0.0
    };
    let mut rgb = [0u8; 3];
    for (c, v) in rgb.iter_mut().enumerate() {
        let mut acc = C[6][c];
        for k in (0..6).rev() {
            acc = acc * t + C[k][c];
        }
        *v = (acc.clamp(0.0, 1.0) * 255.0).round() as u8;
    }
    rgb
}

/// A map rendered like `plt.imsave(fname, map, format="png")`: min-max normalised, viridis.
pub fn colormap_image(map: &[f32], h: usize, w: usize) -> RgbImage {
    let (lo, hi) = map
        .iter()
        .fold((f32::INFINITY, f32::NEG_INFINITY), |(lo, hi), &v| {
            (lo.min(v), hi.max(v))
        });
    let span = if hi > lo { hi - lo } else { 1.0 };
    RgbImage::from_fn(w as u32, h as u32, |x, y| {
        let v = map[y as usize * w + x as usize];
        Rgb(viridis((v - lo) / span))
    })
}

/// The colour of head `j`'s mask overlay (a fixed bright palette instead of the official random colours, so runs
/// are reproducible).
pub fn head_color(j: usize) -> [u8; 3] {
    const P: [[u8; 3]; 8] = [
        [255, 48, 48],
        [48, 220, 48],
        [64, 128, 255],
        [255, 200, 0],
        [255, 0, 255],
        [0, 230, 230],
        [255, 128, 0],
        [160, 96, 255],
    ];
    P[j % P.len()]
}

/// `display_instances` of visualize_attention.py for one mask: the image with the mask blended in `color` at
/// alpha 0.5 and the mask's contour drawn in the full colour. `mask` is `img.height() x img.width()`.
pub fn overlay_mask(img: &RgbImage, mask: &[bool], color: [u8; 3]) -> RgbImage {
    let (w, h) = (img.width() as usize, img.height() as usize);
    let inside = |x: isize, y: isize| {
        x >= 0
            && y >= 0
            && (x as usize) < w
            && (y as usize) < h
            && mask[y as usize * w + x as usize]
    };
    RgbImage::from_fn(w as u32, h as u32, |x, y| {
        let p = img.get_pixel(x, y).0;
        let (xi, yi) = (x as isize, y as isize);
        if !inside(xi, yi) {
            return Rgb(p);
        }
        let edge = !inside(xi - 1, yi)
            || !inside(xi + 1, yi)
            || !inside(xi, yi - 1)
            || !inside(xi, yi + 1);
        if edge {
            return Rgb(color);
        }
        let mut o = [0u8; 3];
        for c in 0..3 {
            o[c] = ((p[c] as f32) * 0.5 + (color[c] as f32) * 0.5).round() as u8;
        }
        Rgb(o)
    })
}

/// One row of an attention sheet: an image as the network saw it and its heads' maps.
#[derive(Debug, Clone)]
pub struct SheetRow {
    /// The image after the evaluation transform, normalisation undone.
    pub image: RgbImage,
    /// Its heads' CLS attention on the patch grid.
    pub maps: HeadMaps,
    /// Text under the row's image (its class, its file).
    pub label: String,
}

/// Side in pixels of a sheet's cells for images of side `side`: small images enlarged by a whole factor to
/// at least 112 px (Fashion-MNIST's 28 px: 4x), larger ones shown at up to 160 px.
pub fn cell_side(side: u32) -> u32 {
    if side >= 112 {
        side.min(160)
    } else {
        side.max(1) * 112u32.div_ceil(side.max(1))
    }
}

/// A sheet as written: where, its size, and the PNG bytes (for TensorBoard, without reading the file back).
#[derive(Debug, Clone)]
pub struct Sheet {
    /// The PNG file.
    pub path: PathBuf,
    /// Width in pixels.
    pub width: u32,
    /// Height in pixels.
    pub height: u32,
    /// The encoded PNG, as in the file.
    pub png: Vec<u8>,
}

/// Margin around a sheet, pixels.
const SHEET_MARGIN: u32 = 16;
/// Height of a sheet's title line and of each subtitle line, pixels.
const SHEET_LINE: u32 = 30;
/// Height of the column headings and of the label under each image, pixels.
const SHEET_TEXT: u32 = 24;
/// Gap between cells, pixels; groups (an image and its maps) are three gaps apart.
const SHEET_GAP: u32 = 6;
/// The width a sheet aims at: as many groups side by side as fit in it (at least one).
const SHEET_TARGET_WIDTH: u32 = 1100;

/// Draw `rows` on one PNG at `path`: `title` and the `subtitle` lines, then the images in groups (the image,
/// its label under it, and each head's map beside it, every map min-max normalised and coloured viridis as
/// [`colormap_image`] does, patches enlarged as blocks), as many groups side by side as fit in about 1,100
/// pixels, under column headings (`image`, `head 0`, ...). Cells have the first image's aspect ratio, its longer
/// side at [`cell_side`]; the rows must share their head count.
pub fn save_sheet(
    path: &Path,
    title: &str,
    subtitle: &[String],
    rows: &[SheetRow],
) -> Result<Sheet> {
    let Some(first) = rows.first() else {
        return Err(Error::Msg(format!(
            "{}: no images for the attention sheet",
            path.display()
        )));
    };
    let heads = first.maps.heads;
    if rows.iter().any(|r| r.maps.heads != heads) {
        return Err(Error::Msg(format!(
            "{}: rows with different head counts",
            path.display()
        )));
    }
    crate::plot::fonts()?;
    let err = |e: &dyn std::fmt::Display| Error::Msg(format!("{}: {e}", path.display()));
    let (title_size, sub_size) = (24.0, 16.0);
    let text_width = |t: &str, size: f64| {
        (crate::plot::FONT, size)
            .into_font()
            .box_size(t)
            .map(|(w, _)| w)
            .map_err(|e| err(&e))
    };
    // Cells keep the first image's aspect ratio, its longer side at `cell_side`.
    let (iw, ih) = (first.image.width().max(1), first.image.height().max(1));
    let side = iw.max(ih);
    let c = cell_side(side);
    let (cw, ch) = ((iw * c / side).max(1), (ih * c / side).max(1));
    let per_group = 1 + heads as u32;
    let group_w = per_group * cw + (per_group - 1) * SHEET_GAP;
    let group_step = group_w + 3 * SHEET_GAP;
    let across = ((SHEET_TARGET_WIDTH - 2 * SHEET_MARGIN + 3 * SHEET_GAP) / group_step)
        .clamp(1, rows.len() as u32);
    let mut width = 2 * SHEET_MARGIN + across * group_step - 3 * SHEET_GAP;
    width = width.max(2 * SHEET_MARGIN + text_width(title, title_size)?);
    for line in subtitle {
        width = width.max(2 * SHEET_MARGIN + text_width(line, sub_size)?);
    }
    let head_h = 12 + SHEET_LINE * (1 + subtitle.len() as u32);
    let row_h = ch + SHEET_TEXT + SHEET_GAP;
    let lines = (rows.len() as u32).div_ceil(across);
    let height = head_h + SHEET_TEXT + lines * row_h + SHEET_MARGIN;
    let mut sheet = RgbImage::from_pixel(width, height, Rgb([255, 255, 255]));
    // Top-left corner of cell `col` (0: the image) of image `r`.
    let corner = |r: usize, col: u32| {
        let (g, line) = (r as u32 % across, r as u32 / across);
        (
            SHEET_MARGIN + g * group_step + col * (cw + SHEET_GAP),
            head_h + SHEET_TEXT + line * row_h,
        )
    };
    let enlarge = if side < 112 {
        FilterType::Nearest
    } else {
        FilterType::Triangle
    };
    for (r, row) in rows.iter().enumerate() {
        let img = image::imageops::resize(&row.image, cw, ch, enlarge);
        let (x, y) = corner(r, 0);
        image::imageops::replace(&mut sheet, &img, x as i64, y as i64);
        for j in 0..heads {
            let map = colormap_image(row.maps.head(j), row.maps.h, row.maps.w);
            let map = image::imageops::resize(&map, cw, ch, FilterType::Nearest);
            let (x, y) = corner(r, 1 + j as u32);
            image::imageops::replace(&mut sheet, &map, x as i64, y as i64);
        }
    }
    let mut buf = sheet.into_raw();
    {
        let root = BitMapBackend::with_buffer(&mut buf, (width, height)).into_drawing_area();
        static INK: [RGBColor; 3] = [
            RGBColor(0, 0, 0),
            RGBColor(40, 40, 40),
            RGBColor(70, 70, 70),
        ];
        let font = |size: f64, ink: usize| {
            TextStyle::from((crate::plot::FONT, size).into_font()).color(&INK[ink])
        };
        let at = |x: u32, y: u32| (x as i32, y as i32);
        root.draw_text(title, &font(title_size, 0), at(SHEET_MARGIN, 10))
            .map_err(|e| err(&e))?;
        for (k, line) in subtitle.iter().enumerate() {
            let y = 12 + SHEET_LINE * (1 + k as u32);
            root.draw_text(line, &font(sub_size, 2), at(SHEET_MARGIN, y))
                .map_err(|e| err(&e))?;
        }
        for g in 0..across as usize {
            for col in 0..per_group {
                let text = if col == 0 {
                    "image".to_string()
                } else {
                    format!("head {}", col - 1)
                };
                let (x, _) = corner(g, col);
                root.draw_text(&text, &font(15.0, 1), at(x, head_h + 2))
                    .map_err(|e| err(&e))?;
            }
        }
        for (r, row) in rows.iter().enumerate() {
            // The label fits under the image: cut to the characters that fit at ~7 px each.
            let fit = (cw as usize / 7).max(4);
            let label: String = if row.label.chars().count() > fit {
                let mut t: String = row.label.chars().take(fit - 1).collect();
                t.push('…');
                t
            } else {
                row.label.clone()
            };
            let (x, y) = corner(r, 0);
            root.draw_text(&label, &font(14.0, 1), at(x, y + ch + 3))
                .map_err(|e| err(&e))?;
        }
        root.present().map_err(|e| err(&e))?;
    }
    let img = RgbImage::from_raw(width, height, buf)
        .ok_or_else(|| Error::Msg(format!("{}: sheet buffer size mismatch", path.display())))?;
    let mut png = Vec::new();
    img.write_to(&mut std::io::Cursor::new(&mut png), image::ImageFormat::Png)
        .map_err(|e| Error::Msg(format!("{}: cannot encode PNG: {e}", path.display())))?;
    std::fs::write(path, &png).map_err(|e| Error::io(path, e))?;
    Ok(Sheet {
        path: path.to_path_buf(),
        width,
        height,
        png,
    })
}

/// The TensorBoard tag of the sheet `dino train` writes (its Images tab).
pub const TENSORBOARD_TAG: &str = "attention/last_block";

/// Images on the sheet `dino train` writes at the end of a ViT run.
pub const SHEET_IMAGES: usize = 8;

/// The title of the sheet of a run of `cfg` after `iterations` global iterations.
pub fn sheet_title(cfg: &crate::config::TrainConfig, iterations: usize) -> String {
    let plural = |n: usize| if n == 1 { "" } else { "s" };
    format!(
        "Last-block attention of the teacher: {}, {iterations} iteration{} ({} epoch{})",
        cfg.arch,
        plural(iterations),
        cfg.epochs,
        plural(cfg.epochs)
    )
}

/// The images `dino train` draws its sheet from: the labelled validation split when the run evaluates k-NN
/// (`eval_every` or `eval_final`, with a labelled training split as its bank), else the training images.
pub fn sheet_dataset(
    cfg: &crate::config::TrainConfig,
) -> Result<std::sync::Arc<dyn dino_data::dataset::Dataset>> {
    use crate::data::{open_bank, open_train, open_val};
    if cfg.eval_every > 0 || cfg.eval_final {
        if let (Some(_), Some(val)) = (open_bank(cfg)?, open_val(cfg)?) {
            return Ok(val);
        }
    }
    open_train(cfg)
}

/// The attention sheet of `backbone` ([`save_sheet`] at `path`) for [`SHEET_IMAGES`] images spread evenly
/// over `ds` (indices `i * len / n`, so a class-sorted folder shows several classes), through the run's
/// evaluation transform; each row labelled with its class, or its file without labels. `Ok(None)` for
/// backbones without attention (ResNet).
pub fn write_sheet(
    cfg: &crate::config::TrainConfig,
    backbone: &dyn dino_models::Backbone,
    ds: std::sync::Arc<dyn dino_data::dataset::Dataset>,
    path: &Path,
    title: &str,
) -> Result<Option<Sheet>> {
    use candle_core::{DType, Device};
    let len = ds.len();
    let n = len.min(SHEET_IMAGES);
    if n == 0 {
        return Ok(None);
    }
    let picked: Vec<usize> = (0..n).map(|i| i * len / n).collect();
    let sub: std::sync::Arc<dyn dino_data::dataset::Dataset> =
        std::sync::Arc::new(dino_data::dataset::Subset::new(ds.clone(), picked.clone())?);
    let transform = crate::data::eval_transform(cfg)?;
    let batcher = dino_data::loader::EvalBatcher::new(sub, transform, n, 1)?;
    let (mean, std) = (cfg.norm_mean, cfg.norm_std);
    let mut rows = Vec::with_capacity(n);
    for b in batcher.iter() {
        let b = b?;
        let x = b.images.to_device(&backbone.device())?;
        let Some(att) = dino_models::no_grad(|| backbone.cls_attention(&x))? else {
            return Ok(None);
        };
        let att = att.to_dtype(DType::F32)?.to_device(&Device::Cpu)?;
        let (bn, heads, gh, gw) = att.dims4()?;
        let att: Vec<f32> = att.flatten_all()?.to_vec1()?;
        let imgs = b.images.to_dtype(DType::F32)?.to_device(&Device::Cpu)?;
        let (_, _, h, w) = imgs.dims4()?;
        let px: Vec<f32> = imgs.flatten_all()?.to_vec1()?;
        for (r, &k) in b.indices.iter().enumerate().take(bn) {
            let i = picked[k];
            let at = |c: usize, y: u32, x: u32| {
                let v = px[((r * 3 + c) * h + y as usize) * w + x as usize] * std[c] + mean[c];
                (v.clamp(0.0, 1.0) * 255.0).round() as u8
            };
            let image = RgbImage::from_fn(w as u32, h as u32, |x, y| {
                Rgb([at(0, y, x), at(1, y, x), at(2, y, x)])
            });
            let per = heads * gh * gw;
            let label = match (ds.label(i), ds.class_names()) {
                (Some(l), Some(names)) if l < names.len() => names[l].clone(),
                (Some(l), _) => format!("class {l}"),
                _ => Path::new(&ds.source(i))
                    .file_name()
                    .map(|f| f.to_string_lossy().into_owned())
                    .unwrap_or_else(|| format!("image {i}")),
            };
            rows.push(SheetRow {
                image,
                maps: HeadMaps {
                    heads,
                    h: gh,
                    w: gw,
                    data: att[r * per..(r + 1) * per].to_vec(),
                },
                label,
            });
        }
    }
    let subtitle = [
        format!(
            "{} images spread over {} ({} images), through the evaluation transform ({} px)",
            rows.len(),
            ds.name(),
            len,
            cfg.eval_crop
        ),
        "the CLS query's attention over the patches, per head; each map min-max normalised (viridis: dark = \
         least, yellow = most)"
            .to_string(),
    ];
    save_sheet(path, title, &subtitle, &rows).map(Some)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn maps(heads: usize, h: usize, w: usize, data: Vec<f32>) -> HeadMaps {
        assert_eq!(data.len(), heads * h * w);
        HeadMaps { heads, h, w, data }
    }

    /// The official procedure written out directly with explicit sorting of (value, index) pairs.
    fn reference_mask(a: &[f32], t: f32) -> Vec<bool> {
        let total: f64 = a.iter().map(|&v| v as f64).sum();
        let mut pairs: Vec<(f32, usize)> = a.iter().copied().zip(0..).collect();
        pairs.sort_by(|x, y| x.0.total_cmp(&y.0));
        let mut keep = vec![false; a.len()];
        let mut cum = 0f64;
        for (v, i) in pairs {
            cum += v as f64 / total;
            keep[i] = cum > 1.0 - t as f64;
        }
        keep
    }

    #[test]
    fn threshold_keeps_the_smallest_top_set_holding_the_mass() {
        // One head, 2x3 grid: masses 0.05 0.1 0.4 / 0.3 0.1 0.05. With t = 0.6 the top patches 0.4 + 0.3 = 0.7
        // hold >= 0.6 of the mass; adding nothing else is needed.
        let m = maps(1, 2, 3, vec![0.05, 0.1, 0.4, 0.3, 0.1, 0.05]);
        let k = threshold_masks(&m, 0.6);
        assert_eq!(k, vec![false, false, true, true, false, false]);
        // t = 0.85: sorted cumulative sums 0.05 0.1 0.2 0.3 0.6 1.0; those > 0.15 are kept: everything but the
        // two 0.05 patches.
        let k = threshold_masks(&m, 0.85);
        assert_eq!(k, vec![false, true, true, true, true, false]);
        // Unnormalised input gives the same masks (the procedure divides by the sum).
        let scaled = maps(1, 2, 3, m.data.iter().map(|v| v * 7.0).collect());
        assert_eq!(threshold_masks(&scaled, 0.6), threshold_masks(&m, 0.6));
    }

    #[test]
    fn threshold_matches_the_direct_procedure_on_many_heads() {
        // A deterministic pseudo-random attention (LCG) over 4 heads of a 7x5 grid.
        let mut s = 12345u64;
        let data: Vec<f32> = (0..4 * 35)
            .map(|_| {
                s = s
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                ((s >> 33) as f32 / (1u64 << 31) as f32).powi(3) + 1e-4
            })
            .collect();
        let m = maps(4, 7, 5, data);
        for t in [0.1f32, 0.5, 0.6, 0.9] {
            let k = threshold_masks(&m, t);
            for j in 0..4 {
                assert_eq!(
                    &k[j * 35..(j + 1) * 35],
                    reference_mask(m.head(j), t).as_slice(),
                    "t={t} head={j}"
                );
                // The kept set holds at least t of the mass, and dropping its smallest element falls below t.
                let a = m.head(j);
                let total: f32 = a.iter().sum();
                let kept: Vec<f32> = (0..35).filter(|&i| k[j * 35 + i]).map(|i| a[i]).collect();
                let mass: f32 = kept.iter().sum::<f32>() / total;
                assert!(mass >= t - 1e-5, "mass {mass} < {t}");
                let smallest = kept.iter().copied().fold(f32::INFINITY, f32::min);
                assert!(mass - smallest / total < t + 1e-5);
            }
        }
    }

    #[test]
    fn nearest_upsampling_repeats_each_patch() {
        let up = upsample_nearest(&[1, 2, 3, 4, 5, 6], 2, 3, 2);
        assert_eq!(
            up,
            vec![1, 1, 2, 2, 3, 3, 1, 1, 2, 2, 3, 3, 4, 4, 5, 5, 6, 6, 4, 4, 5, 5, 6, 6]
        );
    }

    #[test]
    fn viridis_matches_matplotlib_at_known_points() {
        // matplotlib's viridis table: entry 0 #440154, entry 128 #21918c, entry 255 #fde725.
        let close = |a: [u8; 3], b: [u8; 3]| {
            a.iter()
                .zip(b)
                .all(|(x, y)| (*x as i32 - y as i32).abs() <= 5)
        };
        assert!(
            close(viridis(0.0), [0x44, 0x01, 0x54]),
            "{:?}",
            viridis(0.0)
        );
        assert!(
            close(viridis(128.0 / 255.0), [0x21, 0x91, 0x8c]),
            "{:?}",
            viridis(0.5)
        );
        assert!(
            close(viridis(1.0), [0xfd, 0xe7, 0x25]),
            "{:?}",
            viridis(1.0)
        );
        // Monotone in luminance, as viridis is designed to be.
        let lum = |c: [u8; 3]| 0.2126 * c[0] as f32 + 0.7152 * c[1] as f32 + 0.0722 * c[2] as f32;
        for i in 0..20 {
            assert!(lum(viridis(i as f32 / 20.0)) < lum(viridis((i + 1) as f32 / 20.0)));
        }
    }

    #[test]
    fn colormap_normalises_min_to_dark_and_max_to_bright() {
        let img = colormap_image(&[2.0, 3.0, 4.0, 6.0], 2, 2);
        assert_eq!(img.get_pixel(0, 0).0, viridis(0.0));
        assert_eq!(img.get_pixel(1, 1).0, viridis(1.0));
        assert_eq!(img.get_pixel(1, 0).0, viridis(0.25));
        // A constant map does not divide by zero.
        let flat = colormap_image(&[1.0; 4], 2, 2);
        assert_eq!(flat.get_pixel(1, 1).0, viridis(0.0));
    }

    #[test]
    fn overlay_blends_inside_draws_the_contour_and_leaves_outside() {
        let img = RgbImage::from_pixel(5, 5, Rgb([100, 100, 100]));
        let mut mask = vec![false; 25];
        for y in 1..4 {
            for x in 1..4 {
                mask[y * 5 + x] = true;
            }
        }
        let o = overlay_mask(&img, &mask, [200, 0, 0]);
        assert_eq!(o.get_pixel(0, 0).0, [100, 100, 100]);
        assert_eq!(o.get_pixel(1, 1).0, [200, 0, 0], "contour");
        assert_eq!(o.get_pixel(2, 2).0, [150, 50, 50], "alpha 0.5 inside");
    }

    #[test]
    fn sheet_shows_each_image_and_each_heads_map_enlarged_by_blocks() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("attention.png");
        let (rows_n, heads, g) = (3usize, 2usize, 4usize);
        let colour = [200u8, 30, 160];
        let rows: Vec<SheetRow> = (0..rows_n)
            .map(|r| {
                let mut data = vec![0f32; heads * g * g];
                for j in 0..heads {
                    data[j * g * g + (r + 5 * j) % (g * g)] = 0.3 + r as f32;
                }
                SheetRow {
                    image: RgbImage::from_pixel(28, 28, Rgb(colour)),
                    maps: maps(heads, g, g, data),
                    label: format!("a label long enough to be cut short, row {r}"),
                }
            })
            .collect();
        let subtitle = ["one line".to_string(), "another".to_string()];
        save_sheet(&path, "a title", &subtitle, &rows).unwrap();
        let img = image::open(&path).unwrap().to_rgb8();
        let count = |c: [u8; 3]| img.pixels().filter(|p| p.0 == c).count();
        // 28 px images shown at 112 px: each patch a 28 x 28 block, each image 112 x 112.
        let c = cell_side(28) as usize;
        assert_eq!(c, 112);
        let block = (c / g) * (c / g);
        assert_eq!(count(colour), rows_n * c * c);
        assert_eq!(
            count(viridis(1.0)),
            rows_n * heads * block,
            "one hot patch per map"
        );
        assert_eq!(count(viridis(0.0)), rows_n * heads * (g * g - 1) * block);
        // Two groups side by side (each image and its two maps), two lines of them, text above.
        assert!(img.width() as usize >= 2 * 3 * c && (img.width() as usize) < 4 * 3 * c);
        assert!(img.height() as usize >= 2 * c && (img.height() as usize) < 3 * c + 200);
        let title_ink = (0..40)
            .flat_map(|y| (0..200).map(move |x| (x, y)))
            .filter(|&(x, y)| img.get_pixel(x, y).0.iter().all(|v| *v < 100))
            .count();
        assert!(title_ink > 30, "no title text ({title_ink} dark pixels)");
        // Rows must agree on their heads; no rows is an error naming the file.
        let mut odd = rows.clone();
        odd[1].maps = maps(1, g, g, vec![0.0; g * g]);
        let e = save_sheet(&path, "t", &subtitle, &odd)
            .unwrap_err()
            .to_string();
        assert!(e.contains("different head counts"), "{e}");
        let e = save_sheet(&path, "t", &subtitle, &[])
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("attention.png") && e.contains("no images"),
            "{e}"
        );
    }

    #[test]
    fn cells_enlarge_small_images_by_whole_factors() {
        assert_eq!(cell_side(28), 112);
        assert_eq!(cell_side(32), 128);
        assert_eq!(cell_side(96), 192);
        assert_eq!(cell_side(224), 160);
        assert_eq!(cell_side(120), 120);
    }
}
