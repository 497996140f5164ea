//! PNG plots of a run: one chart per logged quantity and a `summary.png` dashboard, drawn with plotters'
//! bitmap backend and the embedded DejaVu Sans face (matplotlib's default font) through plotters' pure-Rust
//! `ab_glyph` text. Every chart has a title, named axes, ticks at round values, a grid, a legend, and the
//! reference lines that say whether training is healthy (ln K and 0 on the teacher entropy, random-init and
//! raw-pixel levels on the k-NN curve, epoch starts on per-iteration curves). One colour keeps one meaning
//! in every chart ([`colour`]).

use std::path::{Path, PathBuf};

use plotters::coord::ranged1d::{DefaultFormatting, KeyPointHint, Ranged};
use plotters::coord::Shift;
use plotters::prelude::*;
use plotters::style::text_anchor::{HPos, Pos, VPos};

use crate::config::TrainConfig;
use crate::error::{Error, Result};
use crate::log::{read_log, LogRecords, StepRecord};

/// Width of one chart's PNG in pixels.
pub const WIDTH: u32 = 960;
/// Height of one chart's PNG in pixels.
pub const HEIGHT: u32 = 560;
/// Width of `summary.png` in pixels.
pub const SUMMARY_WIDTH: u32 = 2400;
/// Height of `summary.png` in pixels.
pub const SUMMARY_HEIGHT: u32 = 1240;
/// Font family name the embedded face is registered under.
pub(crate) const FONT: &str = "sans-serif";

/// Colours (matplotlib's tab10), one meaning each in every chart.
pub mod colour {
    /// The run's own quantity (solid blue).
    pub const RUN: [u8; 3] = [31, 119, 180];
    /// A per-epoch mean drawn over a per-iteration curve (orange).
    pub const EPOCH_MEAN: [u8; 3] = [255, 127, 14];
    /// A second quantity sharing the axes (green).
    pub const SECOND: [u8; 3] = [44, 160, 44];
    /// The raw-pixel baseline (dashed red).
    pub const PIXELS: [u8; 3] = [214, 39, 40];
    /// The random-initialisation baseline (dashed grey).
    pub const INIT: [u8; 3] = [110, 110, 110];
    /// A theoretical level such as ln K or the student temperature (dashed purple).
    pub const LIMIT: [u8; 3] = [148, 103, 189];
    /// Zero, where a quantity reaching it means collapse (dashed black).
    pub const ZERO: [u8; 3] = [0, 0, 0];
    /// Epoch starts on per-iteration curves (thin light grey).
    pub const EPOCH: [u8; 3] = [190, 190, 190];
}

/// One line of a chart: `(x, y)` points in x order (non-finite ones are skipped).
#[derive(Debug, Clone, Default)]
pub struct Series {
    /// Legend text.
    pub label: String,
    /// The points.
    pub points: Vec<(f64, f64)>,
    /// Line colour.
    pub rgb: [u8; 3],
}

/// A dashed horizontal reference line across the chart (the y range includes it).
#[derive(Debug, Clone)]
pub struct RefLine {
    /// Its level.
    pub y: f64,
    /// Legend text.
    pub label: String,
    /// Line colour.
    pub rgb: [u8; 3],
}

/// One chart: title, axis names, lines, reference lines and vertical markers.
#[derive(Debug, Clone, Default)]
pub struct Chart {
    /// File stem of the PNG (`loss` writes `loss.png`).
    pub name: String,
    /// Title above the chart.
    pub title: String,
    /// x-axis name with its unit.
    pub x_label: String,
    /// y-axis name with its unit.
    pub y_label: String,
    /// The curves, drawn in order.
    pub series: Vec<Series>,
    /// Dashed horizontal reference lines.
    pub hlines: Vec<RefLine>,
    /// x positions of thin vertical lines (epoch starts), with their legend text.
    pub vlines: (Vec<f64>, String),
    /// The x axis counts whole units (iterations, epochs): ticks at integers.
    pub integer_x: bool,
}

/// Registers the embedded font once per process.
pub(crate) fn fonts() -> Result<()> {
    static ONCE: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    let ok = *ONCE.get_or_init(|| {
        plotters::style::register_font(FONT, FontStyle::Normal, dejavu::sans::regular()).is_ok()
    });
    if ok {
        Ok(())
    } else {
        Err(Error::Msg(
            "plots: the embedded DejaVu Sans font did not load".into(),
        ))
    }
}

/// Round tick positions covering `[lo, hi]`: about `target` of them at a step of 1, 2, 2.5 or 5 x 10^k (at
/// least 1 when `integer`); returns the ticks and the step.
pub fn nice_ticks(lo: f64, hi: f64, target: usize, integer: bool) -> (Vec<f64>, f64) {
    let span = (hi - lo).abs().max(f64::MIN_POSITIVE);
    let raw = span / target.max(1) as f64;
    let mag = 10f64.powf(raw.log10().floor());
    let mut step = [1.0, 2.0, 2.5, 5.0, 10.0]
        .iter()
        .map(|m| m * mag)
        .find(|s| *s >= raw * 0.999)
        .unwrap_or(10.0 * mag);
    if integer {
        step = step.max(1.0).round();
        if step == 3.0 || step == 4.0 {
            step = 5.0;
        } else if step > 5.0 && step < 10.0 {
            step = 10.0;
        }
    }
    let first = (lo / step).ceil() as i64;
    let last = (hi / step).floor() as i64;
    let ticks = (first..=last.max(first))
        .map(|k| k as f64 * step)
        .filter(|t| *t >= lo - step * 1e-9 && *t <= hi + step * 1e-9)
        .collect();
    (ticks, step)
}

/// How tick values print: a power of ten moved into the axis name (`x1e-4`) when the values are tiny or huge,
/// and the decimals the step needs.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct TickFormat {
    /// Ticks print as `value / 10^exponent`.
    pub exponent: i32,
    /// Digits after the point.
    pub decimals: usize,
}

impl TickFormat {
    /// The format for ticks `ticks` spaced `step` apart.
    pub fn new(ticks: &[f64], step: f64) -> Self {
        let max = ticks.iter().fold(0f64, |m, t| m.max(t.abs()));
        let exponent = if max > 0.0 && !(1e-2..1e7).contains(&max) {
            max.log10().floor() as i32
        } else {
            0
        };
        let scaled = step / 10f64.powi(exponent);
        // Digits to show the step exactly: 2.5e-3 needs 4, 5e-3 needs 3, 20 needs 0.
        let mut decimals = 0usize;
        while decimals < 9 {
            let s = scaled * 10f64.powi(decimals as i32);
            if (s - s.round()).abs() < 1e-6 * s.abs().max(1.0) {
                break;
            }
            decimals += 1;
        }
        Self { exponent, decimals }
    }

    /// The tick label of `v`.
    pub fn label(&self, v: f64) -> String {
        let s = v / 10f64.powi(self.exponent);
        let s = if s.abs() < 0.5 * 10f64.powi(-(self.decimals as i32)) {
            0.0
        } else {
            s
        };
        format!("{s:.*}", self.decimals)
    }

    /// The axis name with the moved power of ten, e.g. `learning rate (×1e-4)`.
    pub fn axis_name(&self, name: &str) -> String {
        if self.exponent == 0 {
            name.to_string()
        } else {
            format!("{name} (×1e{})", self.exponent)
        }
    }
}

/// A linear f64 axis whose ticks are given (plotters' `WithKeyPoints` drops the f64 label formatter).
#[derive(Debug, Clone)]
struct TickedAxis {
    lo: f64,
    hi: f64,
    ticks: Vec<f64>,
}

impl Ranged for TickedAxis {
    type FormatOption = DefaultFormatting;
    type ValueType = f64;

    fn map(&self, v: &f64, limit: (i32, i32)) -> i32 {
        let t = (v - self.lo) / (self.hi - self.lo);
        let t = if t.is_finite() {
            t.clamp(-1.0, 2.0)
        } else {
            0.5
        };
        limit.0 + ((limit.1 - limit.0) as f64 * t).round() as i32
    }

    fn key_points<H: KeyPointHint>(&self, hint: H) -> Vec<f64> {
        if hint.weight().allow_light_points() {
            Vec::new()
        } else {
            self.ticks.clone()
        }
    }

    fn range(&self) -> std::ops::Range<f64> {
        self.lo..self.hi
    }
}

fn finite(points: &[(f64, f64)]) -> Vec<(f64, f64)> {
    points
        .iter()
        .copied()
        .filter(|(x, y)| x.is_finite() && y.is_finite())
        .collect()
}

/// Sizes that scale with the drawing area: (title, axis name, tick label) font pixels, line width.
struct Sizes {
    title: f64,
    axis: f64,
    tick: f64,
    legend: f64,
    line: u32,
}

impl Sizes {
    fn for_area(w: u32, h: u32) -> Self {
        // Square root: a panel half as wide keeps its fonts at 0.7x, still readable.
        let s = (w.min(h * 16 / 9) as f64 / WIDTH as f64)
            .sqrt()
            .clamp(0.7, 1.6);
        Self {
            title: 26.0 * s,
            axis: 20.0 * s,
            tick: 17.0 * s,
            legend: 16.0 * s,
            line: if s < 0.8 { 2 } else { 3 },
        }
    }
}

/// The legend position whose box covers the fewest plotted points (matplotlib's `loc="best"`, roughly):
/// `plot` is the plot area in pixels, `box_px` the legend's estimated size.
fn legend_position(
    chart: &Chart,
    x: (f64, f64),
    y: (f64, f64),
    plot: (f64, f64),
    box_px: (f64, f64),
    margin: f64,
) -> SeriesLabelPosition {
    use SeriesLabelPosition::*;
    let fx = |v: f64| (v - x.0) / (x.1 - x.0);
    let fy = |v: f64| (v - y.0) / (y.1 - y.0);
    // Points in plot fractions, with the segments between sparse points sampled too.
    let mut pts: Vec<(f64, f64)> = Vec::new();
    for s in &chart.series {
        let p = finite(&s.points);
        for w in p.windows(2) {
            for i in 0..8 {
                let t = i as f64 / 8.0;
                pts.push((
                    fx(w[0].0 + t * (w[1].0 - w[0].0)),
                    fy(w[0].1 + t * (w[1].1 - w[0].1)),
                ));
            }
        }
        pts.extend(p.last().map(|q| (fx(q.0), fy(q.1))));
    }
    for h in chart.hlines.iter().filter(|h| h.y.is_finite()) {
        pts.extend((0..=80).map(|i| (i as f64 / 80.0, fy(h.y))));
    }
    let (bw, bh) = (box_px.0 / plot.0, box_px.1 / plot.1);
    let (mx, my) = (margin / plot.0, margin / plot.1);
    let candidates = [
        (UpperRight, 1.0 - mx - bw, 1.0 - my - bh),
        (UpperLeft, mx, 1.0 - my - bh),
        (LowerRight, 1.0 - mx - bw, my),
        (LowerLeft, mx, my),
        (MiddleRight, 1.0 - mx - bw, 0.5 - bh / 2.0),
        (MiddleLeft, mx, 0.5 - bh / 2.0),
        (UpperMiddle, 0.5 - bw / 2.0, 1.0 - my - bh),
        (LowerMiddle, 0.5 - bw / 2.0, my),
    ];
    candidates
        .into_iter()
        .min_by_key(|&(_, bx, by)| {
            pts.iter()
                .filter(|&&(a, b)| a >= bx && a <= bx + bw && b >= by && b <= by + bh)
                .count()
        })
        .map(|c| c.0)
        .unwrap_or(UpperRight)
}

/// Draw `chart` into `area` (any size; fonts scale with it).
pub fn draw_chart<DB: DrawingBackend>(area: &DrawingArea<DB, Shift>, chart: &Chart) -> Result<()> {
    fonts()?;
    let err = |e: &dyn std::fmt::Display| Error::Msg(format!("plot {}: {e}", chart.name));
    let (w, h) = area.dim_in_pixel();
    let sz = Sizes::for_area(w, h);
    let rgb = |c: [u8; 3]| RGBColor(c[0], c[1], c[2]);
    let series: Vec<(Vec<(f64, f64)>, &Series)> = chart
        .series
        .iter()
        .map(|s| (finite(&s.points), s))
        .collect();
    let all: Vec<(f64, f64)> = series.iter().flat_map(|(p, _)| p.iter().copied()).collect();
    let title_style = TextStyle::from((FONT, sz.title).into_font());
    if all.is_empty() {
        let centre = Pos::new(HPos::Center, VPos::Center);
        area.draw_text(
            &chart.title,
            &title_style.pos(Pos::new(HPos::Center, VPos::Top)),
            ((w / 2) as i32, (sz.tick * 0.6) as i32),
        )
        .map_err(|e| err(&e))?;
        area.draw_text(
            "no values were logged for this chart",
            &TextStyle::from((FONT, sz.axis).into_font())
                .color(&rgb(colour::INIT))
                .pos(centre),
            ((w / 2) as i32, (h / 2) as i32),
        )
        .map_err(|e| err(&e))?;
        return Ok(());
    }
    let (mut x0, mut x1) = all
        .iter()
        .fold((f64::INFINITY, f64::NEG_INFINITY), |(a, b), p| {
            (a.min(p.0), b.max(p.0))
        });
    if x1 <= x0 {
        x0 -= 0.5;
        x1 += 0.5;
    }
    let refs = chart.hlines.iter().map(|r| r.y).filter(|v| v.is_finite());
    let (mut y0, mut y1) = all
        .iter()
        .map(|p| p.1)
        .chain(refs)
        .fold((f64::INFINITY, f64::NEG_INFINITY), |(a, b), v| {
            (a.min(v), b.max(v))
        });
    if y1 <= y0 {
        let pad = if y0 == 0.0 { 1.0 } else { y0.abs() * 0.05 };
        y0 -= pad;
        y1 += pad;
    }
    let pad = (y1 - y0) * 0.06;
    y0 -= pad;
    y1 += pad;
    if chart.integer_x && (x1 - x0) > 4.0 {
        // Whole-unit axes end at whole units, and start at 0 when the data nearly does.
        x0 = if x0 > 0.0 && x0 < 0.05 * (x1 - x0) {
            0.0
        } else {
            x0.floor()
        };
        x1 = x1.ceil();
    } else {
        let pad = (x1 - x0) * 0.02;
        x0 -= pad;
        x1 += pad;
    }
    let n_ticks = if w < 700 { 5 } else { 7 };
    let (xt, xs) = nice_ticks(x0, x1, n_ticks, chart.integer_x);
    let (yt, ys) = nice_ticks(y0, y1, 6, false);
    let (xf, yf) = (TickFormat::new(&xt, xs), TickFormat::new(&yt, ys));

    let tick_font = (FONT, sz.tick).into_font();
    let y_label_w = yt
        .iter()
        .map(|t| yf.label(*t).chars().count())
        .max()
        .unwrap_or(1) as f64
        * sz.tick
        * 0.62;
    let mut cc = ChartBuilder::on(area)
        .caption(&chart.title, title_style)
        .margin_top((sz.tick * 0.6) as u32)
        .margin_right((sz.tick * 1.6) as u32)
        .margin_left((sz.tick * 0.5) as u32)
        .margin_bottom((sz.tick * 0.3) as u32)
        .x_label_area_size((sz.tick * 1.4 + sz.axis * 1.6) as u32)
        .y_label_area_size((y_label_w + sz.axis * 1.9) as u32)
        .build_cartesian_2d(
            TickedAxis {
                lo: x0,
                hi: x1,
                ticks: xt,
            },
            TickedAxis {
                lo: y0,
                hi: y1,
                ticks: yt,
            },
        )
        .map_err(|e| err(&e))?;
    let (xfl, yfl) = (move |v: &f64| xf.label(*v), move |v: &f64| yf.label(*v));
    cc.configure_mesh()
        .x_desc(xf.axis_name(&chart.x_label))
        .y_desc(yf.axis_name(&chart.y_label))
        .axis_desc_style((FONT, sz.axis))
        .label_style(tick_font)
        .bold_line_style(RGBColor(228, 228, 228))
        .light_line_style(TRANSPARENT)
        .axis_style(RGBColor(60, 60, 60))
        .x_label_formatter(&xfl)
        .y_label_formatter(&yfl)
        .draw()
        .map_err(|e| err(&e))?;

    // Epoch starts: at most ~40 drawn (every k-th when there are more), one legend entry.
    let (vx, vlabel) = &chart.vlines;
    let every = vx.len().div_ceil(40).max(1);
    let vlines: Vec<f64> = vx
        .iter()
        .copied()
        .filter(|v| v.is_finite() && *v > x0 && *v < x1)
        .step_by(every)
        .collect();
    if !vlines.is_empty() {
        let style = rgb(colour::EPOCH).stroke_width(1);
        let anno = cc
            .draw_series(
                vlines
                    .iter()
                    .map(|&v| PathElement::new(vec![(v, y0), (v, y1)], style)),
            )
            .map_err(|e| err(&e))?;
        if !vlabel.is_empty() {
            let text = if every > 1 {
                format!("{vlabel} (every {every} epochs)")
            } else {
                vlabel.clone()
            };
            anno.label(text).legend(move |(x, y)| {
                PathElement::new(vec![(x + 9, y - 8), (x + 9, y + 8)], style)
            });
        }
    }
    let dash = (sz.tick * 0.6) as i32;
    for r in chart.hlines.iter().filter(|r| r.y.is_finite()) {
        let style = rgb(r.rgb).stroke_width(sz.line.max(2));
        cc.draw_series(DashedLineSeries::new(
            vec![(x0, r.y), (x1, r.y)],
            dash,
            dash * 2 / 3,
            style,
        ))
        .map_err(|e| err(&e))?
        .label(&r.label)
        .legend(move |(x, y)| {
            EmptyElement::at((x, y))
                + PathElement::new(vec![(0, 0), (7, 0)], style)
                + PathElement::new(vec![(11, 0), (18, 0)], style)
        });
    }
    for (pts, s) in &series {
        let style = rgb(s.rgb).stroke_width(sz.line);
        // One path per segment: plotters joins a wide polyline with unlimited miters, which shoot far past a
        // sharp spike (a throughput dip drew a line through the x axis).
        let anno = cc
            .draw_series(
                pts.windows(2)
                    .map(|w| PathElement::new(vec![w[0], w[1]], style)),
            )
            .map_err(|e| err(&e))?;
        anno.label(&s.label)
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 18, y)], style));
        if pts.len() <= 60 {
            let r = sz.line as i32 + 1;
            cc.draw_series(pts.iter().map(|p| Circle::new(*p, r, rgb(s.rgb).filled())))
                .map_err(|e| err(&e))?;
        }
    }
    let entries = chart.hlines.len()
        + chart.series.len()
        + usize::from(!vlines.is_empty() && !vlabel.is_empty());
    let longest = chart
        .series
        .iter()
        .map(|s| s.label.chars().count())
        .chain(chart.hlines.iter().map(|r| r.label.chars().count()))
        .chain([vlabel.chars().count() + 12])
        .max()
        .unwrap_or(0) as f64;
    let (pw, ph) = cc.plotting_area().dim_in_pixel();
    let legend_margin = sz.tick * 0.6;
    let position = legend_position(
        chart,
        (x0, x1),
        (y0, y1),
        (pw as f64, ph as f64),
        (
            longest * sz.legend * 0.56 + 40.0,
            entries as f64 * sz.legend * 1.4 + 10.0,
        ),
        legend_margin,
    );
    cc.configure_series_labels()
        .position(position)
        .label_font((FONT, sz.legend))
        .background_style(WHITE.mix(0.85))
        .border_style(RGBColor(200, 200, 200))
        .margin(legend_margin as u32)
        .draw()
        .map_err(|e| err(&e))?;
    Ok(())
}

fn rgb_buffer(w: u32, h: u32) -> Vec<u8> {
    vec![255u8; (w * h * 3) as usize]
}

fn save_rgb(path: &Path, w: u32, h: u32, buf: Vec<u8>) -> Result<PathBuf> {
    let img = image::RgbImage::from_raw(w, h, buf)
        .ok_or_else(|| Error::Msg(format!("{}: plot buffer size mismatch", path.display())))?;
    img.save(path)
        .map_err(|e| Error::Msg(format!("{}: cannot write PNG: {e}", path.display())))?;
    Ok(path.to_path_buf())
}

/// Render `chart` into an RGB buffer of `WIDTH x HEIGHT`.
pub fn render(chart: &Chart) -> Result<Vec<u8>> {
    let mut buf = rgb_buffer(WIDTH, HEIGHT);
    {
        let root = BitMapBackend::with_buffer(&mut buf, (WIDTH, HEIGHT)).into_drawing_area();
        root.fill(&WHITE)
            .map_err(|e| Error::Msg(format!("plot {}: {e}", chart.name)))?;
        draw_chart(&root, chart)?;
        root.present()
            .map_err(|e| Error::Msg(format!("plot {}: {e}", chart.name)))?;
    }
    Ok(buf)
}

/// Render `chart` and save it as `<dir>/<name>.png`; returns the path.
pub fn save_png(dir: &Path, chart: &Chart) -> Result<PathBuf> {
    let buf = render(chart)?;
    save_rgb(&dir.join(format!("{}.png", chart.name)), WIDTH, HEIGHT, buf)
}

/// Render a dashboard: a heading (two lines) over `panels` in a grid of `cols` columns, saved as
/// `<dir>/<name>.png` at `SUMMARY_WIDTH x SUMMARY_HEIGHT`.
pub fn save_dashboard(
    dir: &Path,
    name: &str,
    heading: &str,
    subheading: &str,
    panels: &[&Chart],
    cols: usize,
) -> Result<PathBuf> {
    fonts()?;
    let (w, h) = (SUMMARY_WIDTH, SUMMARY_HEIGHT);
    let mut buf = rgb_buffer(w, h);
    let err = |e: &dyn std::fmt::Display| Error::Msg(format!("plot {name}: {e}"));
    {
        let root = BitMapBackend::with_buffer(&mut buf, (w, h)).into_drawing_area();
        root.fill(&WHITE).map_err(|e| err(&e))?;
        let head = 92;
        let (top, body) = root.split_vertically(head);
        top.draw_text(
            heading,
            &TextStyle::from((FONT, 34.0).into_font()),
            (24, 12),
        )
        .map_err(|e| err(&e))?;
        top.draw_text(
            subheading,
            &TextStyle::from((FONT, 23.0).into_font()).color(&RGBColor(60, 60, 60)),
            (24, 56),
        )
        .map_err(|e| err(&e))?;
        let rows = panels.len().div_ceil(cols.max(1)).max(1);
        let cells = body.split_evenly((rows, cols.max(1)));
        for (cell, chart) in cells.iter().zip(panels) {
            draw_chart(&cell.margin(6, 6, 6, 6), chart)?;
        }
        root.present().map_err(|e| err(&e))?;
    }
    save_rgb(&dir.join(format!("{name}.png")), w, h, buf)
}

/// The charts of one run's log: per-iteration curves with epoch starts, per-epoch curves, and the reference
/// levels the configuration implies (ln K from `out_dim`, the student temperature).
pub fn run_charts(log: &LogRecords, cfg: Option<&TrainConfig>) -> Vec<Chart> {
    let steps = &log.steps;
    let iter_series = |label: &str, f: &dyn Fn(&StepRecord) -> f64, rgb: [u8; 3]| Series {
        label: label.into(),
        points: steps
            .iter()
            .map(|s| (s.global_iteration as f64, f(s)))
            .collect(),
        rgb,
    };
    // The first logged step of each epoch after the first marks where that epoch began.
    let mut starts = Vec::new();
    let mut last_epoch = None;
    for s in steps {
        if last_epoch != Some(s.epoch) {
            if last_epoch.is_some() {
                starts.push(s.global_iteration.saturating_sub(s.iteration) as f64);
            }
            last_epoch = Some(s.epoch);
        }
    }
    let epoch_lines = (starts, "epoch start".to_string());
    let per_iter =
        |name: &str, title: &str, y: &str, series: Vec<Series>, hlines: Vec<RefLine>| Chart {
            name: name.into(),
            title: title.into(),
            x_label: "iteration".into(),
            y_label: y.into(),
            series,
            hlines,
            vlines: epoch_lines.clone(),
            integer_x: true,
        };
    let ln_k = cfg.map(|c| (c.out_dim as f64).ln());
    let k_text = cfg.map(|c| c.out_dim).unwrap_or(0);
    // Per-epoch values are plotted at "epochs trained" (epoch index + 1), so random init sits at 0.
    let epoch_means: Vec<(f64, f64)> = log
        .epochs
        .iter()
        .map(|e| {
            let end = steps
                .iter()
                .filter(|s| s.epoch == e.epoch)
                .map(|s| s.global_iteration)
                .max();
            (end.map(|g| g as f64).unwrap_or(f64::NAN), e.train_loss)
        })
        .collect();

    let mut loss = vec![iter_series(
        "loss of the iteration",
        &|s| s.loss,
        colour::RUN,
    )];
    if epoch_means.iter().any(|p| p.0.is_finite()) {
        loss.push(Series {
            label: "epoch mean (at the epoch's end)".into(),
            points: epoch_means,
            rgb: colour::EPOCH_MEAN,
        });
    }
    let mut entropy_refs = Vec::new();
    if let Some(l) = ln_k {
        entropy_refs.push(RefLine {
            y: l,
            label: format!("ln K = {l:.2} (K = {k_text}): uniform collapse"),
            rgb: colour::LIMIT,
        });
    }
    entropy_refs.push(RefLine {
        y: 0.0,
        label: "0: one-hot collapse".into(),
        rgb: colour::ZERO,
    });
    let mut temp_refs = Vec::new();
    if let Some(c) = cfg {
        temp_refs.push(RefLine {
            y: c.student_temp,
            label: format!("student temperature {}", c.student_temp),
            rgb: colour::LIMIT,
        });
    }
    let mut std_refs = vec![RefLine {
        y: 0.0,
        label: "0: every image the same output".into(),
        rgb: colour::ZERO,
    }];
    if let Some(c) = cfg {
        std_refs.push(RefLine {
            y: 1.0 / (c.out_dim as f64).sqrt(),
            label: format!(
                "1/√K = {:.4}: outputs spread evenly",
                1.0 / (c.out_dim as f64).sqrt()
            ),
            rgb: colour::LIMIT,
        });
    }
    let mut charts = vec![
        per_iter(
            "loss",
            "DINO loss (cross-entropy teacher → student)",
            "loss (nats)",
            loss,
            Vec::new(),
        ),
        per_iter(
            "lr",
            "Learning rate (linear warm-up, then cosine)",
            "learning rate",
            vec![iter_series("learning rate", &|s| s.lr, colour::RUN)],
            Vec::new(),
        ),
        per_iter(
            "wd",
            "Weight decay (cosine schedule)",
            "weight decay",
            vec![iter_series("weight decay", &|s| s.wd, colour::RUN)],
            Vec::new(),
        ),
        per_iter(
            "momentum",
            "Teacher EMA momentum (cosine → 1)",
            "momentum",
            vec![iter_series(
                "teacher momentum",
                &|s| s.momentum,
                colour::RUN,
            )],
            Vec::new(),
        ),
        per_iter(
            "teacher_temp",
            "Teacher temperature (set per epoch)",
            "temperature",
            vec![iter_series(
                "teacher temperature",
                &|s| s.teacher_temp,
                colour::RUN,
            )],
            temp_refs,
        ),
        per_iter(
            "teacher_entropy",
            "Teacher entropy: between the two collapses is healthy",
            "entropy per sample (nats)",
            vec![iter_series(
                "teacher entropy H(P_t)",
                &|s| s.teacher_entropy,
                colour::RUN,
            )],
            entropy_refs.clone(),
        ),
        per_iter(
            "kl_teacher_student",
            "KL(teacher ‖ student): 0 means nothing left to learn",
            "KL divergence (nats)",
            vec![iter_series(
                "KL(P_t ‖ P_s)",
                &|s| s.kl_teacher_student,
                colour::SECOND,
            )],
            vec![RefLine {
                y: 0.0,
                label: "0: collapse".into(),
                rgb: colour::ZERO,
            }],
        ),
        per_iter(
            "teacher_std",
            "Spread of the teacher's outputs",
            "per-dimension std of l2-normalised output",
            vec![iter_series(
                "teacher output std",
                &|s| s.teacher_std,
                colour::RUN,
            )],
            std_refs,
        ),
        per_iter(
            "images_per_s",
            "Training throughput",
            "images per second",
            vec![iter_series("images/s", &|s| s.images_per_s, colour::RUN)],
            Vec::new(),
        ),
        Chart {
            name: "epoch_loss".into(),
            title: "Mean DINO loss per epoch".into(),
            x_label: "epochs trained".into(),
            y_label: "mean loss (nats)".into(),
            series: vec![Series {
                label: "epoch mean loss".into(),
                points: log
                    .epochs
                    .iter()
                    .map(|e| ((e.epoch + 1) as f64, e.train_loss))
                    .collect(),
                rgb: colour::EPOCH_MEAN,
            }],
            integer_x: true,
            ..Chart::default()
        },
    ];
    // k-NN: the trained teacher per evaluated epoch, with the random-init and raw-pixel levels of the split.
    let mut knn: Vec<(f64, f64)> = log
        .epochs
        .iter()
        .filter_map(|e| e.knn_top1.map(|k| ((e.epoch + 1) as f64, k)))
        .collect();
    let mut hlines = Vec::new();
    if let Some(k) = &log.knn_final {
        hlines.push(RefLine {
            y: k.init_top1,
            label: format!("random init {:.1}%", k.init_top1),
            rgb: colour::INIT,
        });
        if let Some(p) = k.pixels_top1 {
            hlines.push(RefLine {
                y: p,
                label: format!("raw pixels {p:.1}%"),
                rgb: colour::PIXELS,
            });
        }
        let x = (k.epoch + 1) as f64;
        if !knn.iter().any(|p| p.0 == x) {
            knn.push((x, k.trained_top1));
        }
        // Before training the teacher is the randomly initialised network: its k-NN starts the curve.
        knn.insert(0, (0.0, k.init_top1));
    }
    if !knn.is_empty() || !hlines.is_empty() {
        let label = match knn.last() {
            Some(&(_, v)) => format!("trained teacher (last {v:.1}%)"),
            None => "trained teacher".into(),
        };
        charts.push(Chart {
            name: "knn_top1".into(),
            title: "k-NN top-1 accuracy of the teacher's features".into(),
            x_label: "epochs trained".into(),
            y_label: "top-1 accuracy (%)".into(),
            series: vec![Series {
                label,
                points: knn,
                rgb: colour::RUN,
            }],
            hlines,
            integer_x: true,
            ..Chart::default()
        });
    }
    charts
}

/// Plot every curve of `<dir>/log.jsonl` into `<dir>/plots/*.png`, plus `summary.png` (loss, k-NN, entropy,
/// KL, lr, wd, momentum, teacher temperature). Reads `<dir>/config.toml` for the reference levels when present.
pub fn write_plots(dir: &Path) -> Result<Vec<PathBuf>> {
    let log = read_log(&dir.join(crate::log::LOG_FILE))?;
    let cfg = TrainConfig::from_toml_file(&dir.join("config.toml")).ok();
    let pdir = dir.join("plots");
    std::fs::create_dir_all(&pdir).map_err(|e| Error::io(&pdir, e))?;
    let charts = run_charts(&log, cfg.as_ref());
    let mut paths = charts
        .iter()
        .map(|c| save_png(&pdir, c))
        .collect::<Result<Vec<_>>>()?;
    let pick = |n: &str| charts.iter().find(|c| c.name == n);
    let panels: Vec<&Chart> = [
        "loss",
        "knn_top1",
        "teacher_entropy",
        "kl_teacher_student",
        "lr",
        "wd",
        "momentum",
        "teacher_temp",
    ]
    .iter()
    .filter_map(|n| pick(n))
    .collect();
    let run_name = dir
        .canonicalize()
        .ok()
        .and_then(|p| p.file_name().map(|n| n.to_string_lossy().into_owned()))
        .unwrap_or_else(|| dir.display().to_string());
    let heading = format!("DINO run summary: {run_name}");
    let mut sub = Vec::new();
    if let Some(c) = &cfg {
        sub.push(format!(
            "{} (patch {}), K = {}, {} epoch{}, batch {}, {} local crops",
            c.arch,
            c.patch_size,
            c.out_dim,
            c.epochs,
            if c.epochs == 1 { "" } else { "s" },
            c.batch_size,
            c.local_crops_number
        ));
    }
    if let Some(last) = log.steps.last() {
        // The epochs' own durations: a step's `elapsed_s` restarts with each resumed process.
        let secs: f64 = log.epochs.iter().map(|e| e.epoch_s).sum();
        let n = log.epochs.len();
        sub.push(if n > 0 {
            format!(
                "{} iterations, {secs:.0} s over {n} epoch{}",
                last.global_iteration + 1,
                if n == 1 { "" } else { "s" }
            )
        } else {
            format!("{} iterations logged", last.global_iteration + 1)
        });
    }
    if let Some(k) = &log.knn_final {
        let px = k
            .pixels_top1
            .map(|p| format!(", raw pixels {p:.1}%"))
            .unwrap_or_default();
        sub.push(format!(
            "k-NN top-1: trained {:.1}% vs random init {:.1}%{px}",
            k.trained_top1, k.init_top1
        ));
    }
    paths.push(save_dashboard(
        &pdir,
        "summary",
        &heading,
        &sub.join("  ·  "),
        &panels,
        4,
    )?);
    Ok(paths)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ticks_are_round_and_cover_the_range() {
        let (t, s) = nice_ticks(0.0, 5.3e-4, 6, false);
        assert_eq!(s, 1e-4);
        assert_eq!(t.len(), 6);
        let f = TickFormat::new(&t, s);
        assert_eq!(f.exponent, -4);
        assert_eq!(f.label(t[5]), "5");
        assert_eq!(f.axis_name("learning rate"), "learning rate (×1e-4)");
        let (t, s) = nice_ticks(0.9958, 1.0002, 6, false);
        let f = TickFormat::new(&t, s);
        let labels: Vec<String> = t.iter().map(|v| f.label(*v)).collect();
        assert_eq!(labels.first().map(String::as_str), Some("0.996"));
        assert_eq!(labels.last().map(String::as_str), Some("1.000"));
        // Integer axes: whole steps (1, 2, 5, 10, ...), never 2.5.
        let (t, s) = nice_ticks(0.0, 14.0, 7, true);
        assert_eq!((s, t.len()), (2.0, 8));
        assert_eq!(TickFormat::new(&t, s).label(14.0), "14");
        let (_, s) = nice_ticks(0.0, 2184.0, 7, true);
        assert_eq!(s, 500.0);
        let (_, s) = nice_ticks(0.0, 4.0, 7, true);
        assert_eq!(s, 1.0);
        // A 2.5 step keeps the digit it needs; negative zero prints as 0.
        let f = TickFormat::new(&[0.0, 0.025, 0.05], 0.025);
        assert_eq!((f.exponent, f.decimals), (0, 3));
        assert_eq!(f.label(-1e-12), "0.000");
    }

    fn pixels(path: &Path) -> image::RgbImage {
        image::open(path).unwrap().to_rgb8()
    }

    #[test]
    fn a_chart_has_its_curve_reference_lines_and_text() {
        let dir = tempfile::tempdir().unwrap();
        let c = Chart {
            name: "loss".into(),
            title: "DINO loss".into(),
            x_label: "iteration".into(),
            y_label: "loss (nats)".into(),
            series: vec![Series {
                label: "loss".into(),
                points: (0..50)
                    .map(|i| (i as f64, 8.0 - (i as f64).sqrt()))
                    .chain([(50.0, f64::NAN)])
                    .collect(),
                rgb: colour::RUN,
            }],
            hlines: vec![RefLine {
                y: 9.5,
                label: "above every point".into(),
                rgb: colour::PIXELS,
            }],
            vlines: (vec![10.0, 20.0], "epoch start".into()),
            integer_x: true,
        };
        let p = save_png(dir.path(), &c).unwrap();
        let img = pixels(&p);
        assert_eq!(img.dimensions(), (WIDTH, HEIGHT));
        let has = |c: [u8; 3]| img.pixels().filter(|p| p.0 == c).count();
        assert!(has(colour::RUN) > 200, "the curve is drawn");
        // The reference line above every point is drawn: the y range was widened to show it.
        assert!(has(colour::PIXELS) > 200, "the reference line is drawn");
        assert!(has(colour::EPOCH) > 100, "epoch lines are drawn");
        // Text: dark pixels in the title band, left of the plot (the rotated y name) and under it.
        let dark = |x0: u32, x1: u32, y0: u32, y1: u32| {
            (y0..y1)
                .flat_map(|y| (x0..x1).map(move |x| (x, y)))
                .filter(|&(x, y)| img.get_pixel(x, y).0.iter().all(|v| *v < 100))
                .count()
        };
        assert!(dark(WIDTH / 3, 2 * WIDTH / 3, 0, 40) > 100, "title");
        assert!(dark(0, 30, HEIGHT / 4, 3 * HEIGHT / 4) > 50, "y-axis name");
        assert!(
            dark(WIDTH / 3, 2 * WIDTH / 3, HEIGHT - 30, HEIGHT) > 50,
            "x-axis name"
        );
    }

    #[test]
    fn a_sharp_dip_stays_inside_the_plot() {
        // A wide polyline's miter at a sharp V once drew far below the x axis.
        let dir = tempfile::tempdir().unwrap();
        // The throughput of a real run (the no-argument run sharing 2 cores with a compile): at iteration
        // 1094 a dip right after a spike, which plotters' polyline drew as a line through the x axis.
        let points: Vec<(f64, f64)> = include_str!("plot_fixtures/throughput.txt")
            .lines()
            .filter_map(|l| l.split_once(' '))
            .map(|(x, y)| (x.parse().unwrap(), y.parse().unwrap()))
            .collect();
        assert_eq!(points.len(), 448);
        let c = Chart {
            name: "images_per_s".into(),
            title: "Training throughput".into(),
            x_label: "iteration".into(),
            y_label: "images per second".into(),
            series: vec![Series {
                label: "images/s".into(),
                points,
                rgb: colour::RUN,
            }],
            vlines: (
                (1..14).map(|e| e as f64 * 156.0).collect(),
                "epoch start".into(),
            ),
            integer_x: true,
            ..Chart::default()
        };
        let img = pixels(&save_png(dir.path(), &c).unwrap());
        let lowest = img
            .enumerate_pixels()
            // The curve's colour, also blended with the white background (anti-aliased edges).
            .filter(|(_, _, p)| p.0[2] as i32 - p.0[0] as i32 > 60)
            .map(|(_, y, _)| y)
            .max()
            .unwrap();
        assert!(
            lowest < HEIGHT - 45,
            "the curve reaches row {lowest} of {HEIGHT}"
        );
    }

    #[test]
    fn flat_single_point_and_empty_charts_render() {
        let dir = tempfile::tempdir().unwrap();
        for (name, points) in [
            ("flat", vec![(0.0, 1.0), (1.0, 1.0)]),
            ("one", vec![(3.0, 0.5)]),
            ("empty", vec![]),
            ("nan", vec![(0.0, f64::NAN)]),
        ] {
            let c = Chart {
                name: name.into(),
                title: name.into(),
                series: vec![Series {
                    label: name.into(),
                    points,
                    rgb: colour::RUN,
                }],
                ..Chart::default()
            };
            let img = pixels(&save_png(dir.path(), &c).unwrap());
            let inked = img.pixels().filter(|p| p.0 != [255, 255, 255]).count();
            assert!(inked > 500, "{name}: {inked} non-white pixels");
        }
    }

    fn step(epoch: usize, iteration: usize, global: usize) -> StepRecord {
        StepRecord {
            kind: "step".into(),
            epoch,
            iteration,
            global_iteration: global,
            loss: 7.0 - global as f64 * 0.01,
            ibot_loss: None,
            lr: 1e-4,
            wd: 0.04,
            momentum: 0.996,
            teacher_temp: 0.04,
            teacher_entropy: 4.0,
            kl_teacher_student: 0.5,
            teacher_std: 0.05,
            images_per_s: 100.0,
            elapsed_s: global as f64,
            all_reduce_s: 0.0,
            rank_wait_s: 0.0,
            all_reduce_bytes: 0,
        }
    }

    fn epoch(e: usize, knn: Option<f64>) -> crate::log::EpochRecord {
        crate::log::EpochRecord {
            kind: "epoch".into(),
            epoch: e,
            train_loss: 6.5 - e as f64,
            train_lr: 1e-4,
            train_wd: 0.04,
            teacher_entropy: 4.0,
            knn_top1: knn,
            knn_top5: knn,
            skipped_images: 0,
            epoch_s: 1.0,
        }
    }

    #[test]
    fn run_charts_carry_epoch_starts_reference_levels_and_the_init_point() {
        // Two epochs of 5 iterations, logged every other iteration (the first logged step of epoch 1 is its 2nd).
        let steps = [(0, 0, 0), (0, 2, 2), (0, 4, 4), (1, 1, 6), (1, 3, 8)]
            .map(|(e, i, g)| step(e, i, g))
            .to_vec();
        let mut log = LogRecords {
            steps,
            epochs: vec![epoch(0, Some(50.0)), epoch(1, None)],
            knn_final: Some(crate::log::KnnFinalRecord {
                kind: "knn_final".into(),
                epoch: 1,
                trained_top1: 70.0,
                trained_top5: 90.0,
                init_top1: 30.0,
                init_top5: 60.0,
                pixels_top1: Some(80.0),
                pixels_top5: Some(95.0),
            }),
        };
        let mut cfg = TrainConfig::default_preset();
        cfg.out_dim = 128;
        let charts = run_charts(&log, Some(&cfg));
        let get = |cs: &[Chart], n: &str| cs.iter().find(|c| c.name == n).cloned();
        let loss = get(&charts, "loss").unwrap();
        assert_eq!(
            loss.vlines.0,
            vec![5.0],
            "epoch 1 starts at global iteration 5"
        );
        // The epoch means sit at each epoch's last logged iteration.
        assert_eq!(loss.series[1].points, vec![(4.0, 6.5), (8.0, 5.5)]);
        let ent = get(&charts, "teacher_entropy").unwrap();
        let levels: Vec<f64> = ent.hlines.iter().map(|h| h.y).collect();
        assert_eq!(levels, vec![(128f64).ln(), 0.0]);
        let std = get(&charts, "teacher_std").unwrap();
        assert!(std
            .hlines
            .iter()
            .any(|h| (h.y - 1.0 / 128f64.sqrt()).abs() < 1e-12));
        let temp = get(&charts, "teacher_temp").unwrap();
        assert_eq!(temp.hlines[0].y, cfg.student_temp);
        let knn = get(&charts, "knn_top1").unwrap();
        assert_eq!(
            knn.series[0].points,
            vec![(0.0, 30.0), (1.0, 50.0), (2.0, 70.0)]
        );
        let levels: Vec<f64> = knn.hlines.iter().map(|h| h.y).collect();
        assert_eq!(levels, vec![30.0, 80.0]);
        assert_eq!(
            get(&charts, "epoch_loss").unwrap().series[0].points,
            vec![(1.0, 6.5), (2.0, 5.5)]
        );
        // No configuration: no ln K; no labels: no k-NN chart.
        log.knn_final = None;
        log.epochs = vec![epoch(0, None), epoch(1, None)];
        let charts = run_charts(&log, None);
        assert!(get(&charts, "knn_top1").is_none());
        let ent = get(&charts, "teacher_entropy").unwrap();
        assert_eq!(ent.hlines.len(), 1);
        // Saved, with the dashboard, into a run dir holding only the log.
        let dir = tempfile::tempdir().unwrap();
        let mut f = crate::log::JsonLog::open(dir.path()).unwrap();
        for s in &log.steps {
            f.write(s).unwrap();
        }
        drop(f);
        let paths = write_plots(dir.path()).unwrap();
        assert_eq!(paths.len(), charts.len() + 1);
        let summary = image::open(dir.path().join("plots/summary.png")).unwrap();
        assert_eq!(
            (summary.width(), summary.height()),
            (SUMMARY_WIDTH, SUMMARY_HEIGHT)
        );
    }
}
