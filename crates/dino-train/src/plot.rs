//! PNG plots of the training curves (loss, lr, wd, momentum, teacher temperature, collapse monitors, k-NN),
//! drawn with plotters' bitmap backend into a buffer and saved with the `image` crate. plotters is built
//! without font support, so axis values are drawn with a tiny built-in 3x5 pixel digit font: the y range
//! (max at the top left, min at the bottom left) and the x range (first and last x at the bottom).

use std::path::{Path, PathBuf};

use plotters::prelude::*;

use crate::error::{Error, Result};

/// Plot width in pixels.
pub const WIDTH: u32 = 640;
/// Plot height in pixels.
pub const HEIGHT: u32 = 360;
const MARGIN: u32 = 24;

/// One curve: `(x, y)` points (non-finite ones are skipped).
#[derive(Debug, Clone, Default)]
pub struct Curve {
    /// File stem of the PNG (`loss` writes `loss.png`).
    pub name: String,
    /// The points, in x order.
    pub points: Vec<(f64, f64)>,
    /// Horizontal reference lines `(y, rgb)` drawn across the plot (e.g. the random-init and raw-pixel k-NN
    /// levels); the y range includes them.
    pub hlines: Vec<(f64, [u8; 3])>,
}

/// 3x5 bitmaps (rows top to bottom, 3 bits each, MSB left) for `0-9 . - e +`.
fn glyph(c: char) -> Option<[u8; 5]> {
    Some(match c {
        '0' => [0b111, 0b101, 0b101, 0b101, 0b111],
        '1' => [0b010, 0b110, 0b010, 0b010, 0b111],
        '2' => [0b111, 0b001, 0b111, 0b100, 0b111],
        '3' => [0b111, 0b001, 0b111, 0b001, 0b111],
        '4' => [0b101, 0b101, 0b111, 0b001, 0b001],
        '5' => [0b111, 0b100, 0b111, 0b001, 0b111],
        '6' => [0b111, 0b100, 0b111, 0b101, 0b111],
        '7' => [0b111, 0b001, 0b010, 0b010, 0b010],
        '8' => [0b111, 0b101, 0b111, 0b101, 0b111],
        '9' => [0b111, 0b101, 0b111, 0b001, 0b111],
        '.' => [0b000, 0b000, 0b000, 0b000, 0b010],
        '-' => [0b000, 0b000, 0b111, 0b000, 0b000],
        '+' => [0b000, 0b010, 0b111, 0b010, 0b000],
        'e' => [0b111, 0b101, 0b111, 0b100, 0b111],
        _ => return None,
    })
}

/// Short numeric label (at most ~8 characters).
fn label(v: f64) -> String {
    let a = v.abs();
    if a != 0.0 && !(1e-3..1e5).contains(&a) {
        format!("{v:.2e}")
    } else if a >= 100.0 {
        format!("{v:.0}")
    } else {
        format!("{v:.4}")
    }
}

/// Draw `text` with the built-in font at pixel `(x, y)`, each font pixel `scale` pixels wide.
fn draw_text<DB: DrawingBackend>(
    area: &DrawingArea<DB, plotters::coord::Shift>,
    text: &str,
    (x, y): (i32, i32),
    scale: i32,
) -> std::result::Result<(), DrawingAreaErrorKind<DB::ErrorType>> {
    let mut cx = x;
    for c in text.chars() {
        if let Some(rows) = glyph(c) {
            for (r, bits) in rows.iter().enumerate() {
                for col in 0..3 {
                    if bits & (0b100 >> col) != 0 {
                        let px = cx + col * scale;
                        let py = y + r as i32 * scale;
                        area.draw(&Rectangle::new(
                            [(px, py), (px + scale, py + scale)],
                            BLACK.filled(),
                        ))?;
                    }
                }
            }
        }
        cx += 4 * scale;
    }
    Ok(())
}

/// Render one curve into an RGB buffer of `WIDTH x HEIGHT`.
pub fn render(curve: &Curve) -> Result<Vec<u8>> {
    let pts: Vec<(f64, f64)> = curve
        .points
        .iter()
        .copied()
        .filter(|(x, y)| x.is_finite() && y.is_finite())
        .collect();
    let mut buf = vec![0u8; (WIDTH * HEIGHT * 3) as usize];
    let err = |e: String| Error::Msg(format!("plot {}: {e}", curve.name));
    {
        let root = BitMapBackend::with_buffer(&mut buf, (WIDTH, HEIGHT)).into_drawing_area();
        root.fill(&WHITE).map_err(|e| err(e.to_string()))?;
        if !pts.is_empty() {
            let (mut x0, mut x1) = (pts[0].0, pts[pts.len() - 1].0);
            let refs = curve.hlines.iter().map(|h| h.0).filter(|y| y.is_finite());
            let ys = || pts.iter().map(|p| p.1).chain(refs.clone());
            let mut y0 = ys().fold(f64::INFINITY, f64::min);
            let mut y1 = ys().fold(f64::NEG_INFINITY, f64::max);
            if x1 <= x0 {
                x1 = x0 + 1.0;
                x0 -= 0.0;
            }
            if y1 <= y0 {
                let pad = if y0 == 0.0 { 1.0 } else { y0.abs() * 0.05 };
                y0 -= pad;
                y1 += pad;
            }
            let (lo, hi) = (y0, y1);
            let pad = (y1 - y0) * 0.05;
            y0 -= pad;
            y1 += pad;
            let plot_area = root.margin(MARGIN, MARGIN, MARGIN, MARGIN);
            let mut chart = ChartBuilder::on(&plot_area)
                .build_cartesian_2d(x0..x1, y0..y1)
                .map_err(|e| err(e.to_string()))?;
            // Grid: 5 horizontal and 5 vertical light lines, plus the frame.
            for i in 0..=4 {
                let y = y0 + (y1 - y0) * i as f64 / 4.0;
                let x = x0 + (x1 - x0) * i as f64 / 4.0;
                let grey = RGBColor(220, 220, 220);
                chart
                    .draw_series(LineSeries::new([(x0, y), (x1, y)], grey))
                    .map_err(|e| err(e.to_string()))?;
                chart
                    .draw_series(LineSeries::new([(x, y0), (x, y1)], grey))
                    .map_err(|e| err(e.to_string()))?;
            }
            chart
                .draw_series(LineSeries::new(
                    [(x0, y0), (x1, y0), (x1, y1), (x0, y1), (x0, y0)],
                    BLACK,
                ))
                .map_err(|e| err(e.to_string()))?;
            for &(y, [r, g, b]) in curve.hlines.iter().filter(|h| h.0.is_finite()) {
                // Dashed: 40 segments across the plot.
                let seg = (x1 - x0) / 80.0;
                chart
                    .draw_series((0..40).map(|i| {
                        let a = x0 + seg * (2 * i) as f64;
                        PathElement::new([(a, y), (a + seg, y)], RGBColor(r, g, b).stroke_width(2))
                    }))
                    .map_err(|e| err(e.to_string()))?;
            }
            chart
                .draw_series(LineSeries::new(
                    pts.iter().copied(),
                    RGBColor(31, 119, 180).stroke_width(2),
                ))
                .map_err(|e| err(e.to_string()))?;
            if pts.len() <= 40 {
                chart
                    .draw_series(
                        pts.iter()
                            .map(|p| Circle::new(*p, 3, RGBColor(31, 119, 180).filled())),
                    )
                    .map_err(|e| err(e.to_string()))?;
            }
            // Axis values with the built-in font: y max / min on the left, x first / last at the bottom.
            let m = MARGIN as i32;
            draw_text(&root, &label(hi), (2, 4), 2).map_err(|e| err(e.to_string()))?;
            draw_text(&root, &label(lo), (2, HEIGHT as i32 - m + 6), 2)
                .map_err(|e| err(e.to_string()))?;
            let last = label(x1);
            let w = last.len() as i32 * 8;
            draw_text(&root, &label(x0), (m + 90, HEIGHT as i32 - m + 6), 2)
                .map_err(|e| err(e.to_string()))?;
            draw_text(
                &root,
                &last,
                (WIDTH as i32 - m - w, HEIGHT as i32 - m + 6),
                2,
            )
            .map_err(|e| err(e.to_string()))?;
        }
        root.present().map_err(|e| err(e.to_string()))?;
    }
    Ok(buf)
}

/// Render `curve` and save it as `<dir>/<name>.png`; returns the path.
pub fn save_png(dir: &Path, curve: &Curve) -> Result<PathBuf> {
    let buf = render(curve)?;
    let path = dir.join(format!("{}.png", curve.name));
    let img = image::RgbImage::from_raw(WIDTH, HEIGHT, buf)
        .ok_or_else(|| Error::Msg(format!("plot {}: buffer size mismatch", curve.name)))?;
    img.save(&path)
        .map_err(|e| Error::Msg(format!("{}: cannot write PNG: {e}", path.display())))?;
    Ok(path)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_a_curve_to_png_and_skips_non_finite_points() {
        let dir = tempfile::tempdir().unwrap();
        let c = Curve {
            name: "loss".into(),
            points: (0..50)
                .map(|i| (i as f64, 8.0 - (i as f64).sqrt()))
                .chain([(50.0, f64::NAN)])
                .collect(),
            hlines: vec![(9.5, [214, 39, 40])],
        };
        let p = save_png(dir.path(), &c).unwrap();
        let img = image::open(&p).unwrap().to_rgb8();
        assert_eq!(img.dimensions(), (WIDTH, HEIGHT));
        // The curve colour appears, and so do black label pixels in the top-left corner.
        assert!(img.pixels().any(|p| p.0 == [31, 119, 180]));
        // The reference line, above every point, is drawn (the y range was widened to show it).
        assert!(img.pixels().any(|p| p.0 == [214, 39, 40]));
        assert!((0..20).any(|y| (0..60).any(|x| img.get_pixel(x, y).0 == [0, 0, 0])));
        // A constant or empty curve still renders.
        save_png(
            dir.path(),
            &Curve {
                name: "flat".into(),
                points: vec![(0.0, 1.0), (1.0, 1.0)],
                ..Curve::default()
            },
        )
        .unwrap();
        save_png(
            dir.path(),
            &Curve {
                name: "empty".into(),
                points: vec![],
                ..Curve::default()
            },
        )
        .unwrap();
    }
}
