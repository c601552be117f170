//! PNG outputs of training: image grids, and loss curves through `plotters`.

use crate::{Error, Result};
use candle_core::Tensor;
use image::{Rgb, RgbImage};
use std::path::Path;

/// The one font of the curves (DejaVu Sans Mono, `assets/fonts/`, Bitstream Vera licence),
/// compiled in: the plots look the same on every machine and need no system fonts.
const FONT: &[u8] = include_bytes!("../assets/fonts/DejaVuSansMono.ttf");
const FAMILY: &str = "sans-serif";

fn register_font() -> Result<()> {
    static ONCE: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    let ok = *ONCE.get_or_init(|| {
        plotters::style::register_font(FAMILY, plotters::style::FontStyle::Normal, FONT).is_ok()
    });
    if ok {
        Ok(())
    } else {
        Err(Error::Usage("the bundled plot font does not parse".into()))
    }
}

/// Which curve of a panel a metric is: held-out (`heldout_…`) and argmax round-trip (`rt_…`)
/// figures share the panel of the training metric of the same name.
fn panel_of(name: &str) -> (&str, &'static str) {
    if let Some(base) = name.strip_prefix("heldout_") {
        (base, "held-out")
    } else if let Some(base) = name.strip_prefix("rt_") {
        (base, "round trip (argmax, held-out)")
    } else {
        (name, "train")
    }
}

/// A number as a tick or caption shows it: 3 significant digits, scientific when small or large.
fn fmt_value(v: f64) -> String {
    let a = v.abs();
    if v == 0.0 {
        "0".into()
    } else if !(1e-2..1e4).contains(&a) {
        format!("{v:.2e}")
    } else if a >= 100.0 {
        format!("{v:.0}")
    } else if a >= 10.0 {
        format!("{v:.1}")
    } else {
        format!("{v:.3}")
    }
}

/// One labelled curve of a panel: (legend label, (step, value) points).
type Curve<'a> = (&'a str, Vec<(f64, f64)>);

/// Training curves against the step, one panel per metric in two columns, with axes, ticks,
/// labels and a legend; a metric's held-out and round-trip versions share its panel. Missing
/// values (NaN: a metric measured only at sample steps) are skipped, not breaks.
pub fn loss_plot(path: &Path, steps: &[usize], series: &[(&str, Vec<f64>)]) -> Result<()> {
    use plotters::prelude::*;
    register_font()?;
    let mut panels: Vec<(&str, Vec<Curve>)> = vec![];
    for (name, ys) in series {
        let (base, label) = panel_of(name);
        let points: Vec<(f64, f64)> = steps
            .iter()
            .zip(ys)
            .filter(|(_, v)| v.is_finite())
            .map(|(&s, &v)| (s as f64, v))
            .collect();
        match panels.iter_mut().find(|(b, _)| *b == base) {
            Some((_, curves)) => curves.push((label, points)),
            None => panels.push((base, vec![(label, points)])),
        }
    }
    let (cols, pw, ph) = (2usize, 520u32, 260u32);
    let rows = panels.len().div_ceil(cols).max(1);
    let (w, h) = (pw * cols as u32, ph * rows as u32);
    let mut buf = vec![255u8; (w * h * 3) as usize];
    let err =
        |e: &dyn std::fmt::Display| Error::Usage(format!("cannot draw {}: {e}", path.display()));
    {
        let root = BitMapBackend::with_buffer(&mut buf, (w, h)).into_drawing_area();
        let (x0, x1) = match (steps.first(), steps.last()) {
            (Some(&a), Some(&b)) if b > a => (a as f64, b as f64),
            (Some(&a), _) => (a as f64 - 0.5, a as f64 + 0.5),
            _ => (0.0, 1.0),
        };
        for (area, (base, curves)) in root.split_evenly((rows, cols)).iter().zip(&panels) {
            let all = curves.iter().flat_map(|(_, p)| p.iter().map(|&(_, v)| v));
            let (lo, hi) = all.fold((f64::INFINITY, f64::NEG_INFINITY), |(a, b), v| {
                (a.min(v), b.max(v))
            });
            let (lo, hi) = if !lo.is_finite() {
                (0.0, 1.0)
            } else if hi - lo < 1e-12 * lo.abs().max(1.0) {
                let pad = 0.05 * lo.abs().max(1e-3);
                (lo - pad, hi + pad)
            } else {
                let pad = 0.05 * (hi - lo);
                (lo - pad, hi + pad)
            };
            let last = |label: &str| {
                curves
                    .iter()
                    .find(|(l, _)| *l == label)
                    .and_then(|(_, p)| p.last())
                    .map(|&(_, v)| fmt_value(v))
            };
            let caption = match last("train").or_else(|| curves.first().and_then(|c| last(c.0))) {
                Some(v) => format!("{base} (last {v})"),
                None => format!("{base} (no finite value)"),
            };
            let mut chart = ChartBuilder::on(area)
                .caption(caption, (FAMILY, 15))
                .margin(6)
                .x_label_area_size(30)
                .y_label_area_size(64)
                .build_cartesian_2d(x0..x1, lo..hi)
                .map_err(|e| err(&e))?;
            chart
                .configure_mesh()
                .x_desc("step")
                .x_labels(6)
                .y_labels(5)
                .x_label_formatter(&|v| format!("{v:.0}"))
                .y_label_formatter(&|v| fmt_value(*v))
                .label_style((FAMILY, 11))
                .axis_desc_style((FAMILY, 12))
                .light_line_style(WHITE)
                .draw()
                .map_err(|e| err(&e))?;
            for (k, (label, points)) in curves.iter().enumerate() {
                let colour = [
                    RGBColor(200, 40, 40),
                    RGBColor(30, 90, 200),
                    RGBColor(20, 140, 60),
                ][k % 3];
                let style = colour.stroke_width(if k == 0 { 1 } else { 2 });
                chart
                    .draw_series(LineSeries::new(points.iter().copied(), style))
                    .map_err(|e| err(&e))?
                    .label(*label)
                    .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 18, y)], style));
                if 2 * points.len() < steps.len() || points.len() < 2 {
                    // Sparse series (measured at sample steps) get a dot at each measurement.
                    chart
                        .draw_series(points.iter().map(|&p| Circle::new(p, 2, colour.filled())))
                        .map_err(|e| err(&e))?;
                }
            }
            if curves.len() < 2 {
                continue; // the caption names the one curve
            }
            // The legend goes in the corner the curves have left: the top right for a falling
            // loss, the bottom right for a rising score.
            let end = curves[0].1.last().map_or(lo, |&(_, v)| v);
            let corner = if end > (lo + hi) / 2.0 {
                SeriesLabelPosition::LowerRight
            } else {
                SeriesLabelPosition::UpperRight
            };
            chart
                .configure_series_labels()
                .position(corner)
                .label_font((FAMILY, 11))
                .background_style(WHITE.mix(0.85))
                .border_style(BLACK.mix(0.4))
                .draw()
                .map_err(|e| err(&e))?;
        }
        root.present().map_err(|e| err(&e))?;
    }
    let img = RgbImage::from_raw(w, h, buf).expect("3 bytes a pixel");
    save_png(&img, path)
}

/// (n, 3, H, W) f32 images in [0, 1] → one RGB image per batch entry.
pub fn tensor_to_images(images: &Tensor) -> Result<Vec<RgbImage>> {
    let (n, c, h, w) = images.dims4()?;
    if c != 3 {
        return Err(Error::Usage(format!("expected 3-channel images, got {c}")));
    }
    let data = images
        .clamp(0f32, 1f32)?
        .to_dtype(candle_core::DType::F32)?
        .flatten_all()?
        .to_vec1::<f32>()?;
    let plane = h * w;
    Ok((0..n)
        .map(|i| {
            let base = i * 3 * plane;
            RgbImage::from_fn(w as u32, h as u32, |x, y| {
                let p = y as usize * w + x as usize;
                let px = |ch: usize| (data[base + ch * plane + p] * 255.0).round() as u8;
                Rgb([px(0), px(1), px(2)])
            })
        })
        .collect())
}

/// Tile equally sized images into rows of `cols` with a 2-pixel gap.
pub fn grid(images: &[RgbImage], cols: usize) -> RgbImage {
    let cols = cols.max(1);
    let (w, h) = images.first().map(|i| i.dimensions()).unwrap_or((1, 1));
    let rows = images.len().div_ceil(cols).max(1);
    let gap = 2;
    let mut out = RgbImage::from_pixel(
        cols as u32 * (w + gap) + gap,
        rows as u32 * (h + gap) + gap,
        Rgb([255, 255, 255]),
    );
    for (i, img) in images.iter().enumerate() {
        let (r, c) = ((i / cols) as u32, (i % cols) as u32);
        image::imageops::replace(
            &mut out,
            img,
            (gap + c * (w + gap)) as i64,
            (gap + r * (h + gap)) as i64,
        );
    }
    out
}

/// Write a PNG through a temporary file and a rename, so a reader never sees half a file.
/// The image format `path`'s extension names: .png, .jpg/.jpeg or .webp; anything else is an
/// error that says which names work (check it before a long computation whose result goes there).
pub fn image_format(path: &Path) -> Result<image::ImageFormat> {
    let ext = path
        .extension()
        .and_then(|e| e.to_str())
        .map(str::to_ascii_lowercase);
    match ext.as_deref() {
        Some("png") => Ok(image::ImageFormat::Png),
        Some("jpg" | "jpeg") => Ok(image::ImageFormat::Jpeg),
        Some("webp") => Ok(image::ImageFormat::WebP),
        other => {
            let what = other.map_or("no extension".to_string(), |e| {
                format!("the extension .{e}")
            });
            Err(Error::input(
                path,
                format!(
                    "cannot tell the image format from {what}: name the file .png, .jpg or .webp"
                ),
            ))
        }
    }
}

/// Save `img` at `path` in the format its extension names (see [`image_format`]; WebP is
/// lossless), through [`crate::fsutil::write_atomic`].
pub fn save_image(img: &RgbImage, path: &Path) -> Result<()> {
    let format = image_format(path)?;
    crate::fsutil::write_atomic(path, |tmp| {
        img.save_with_format(tmp, format).map_err(|e| {
            let name = format.extensions_str()[0].to_ascii_uppercase();
            Error::input(path, format!("cannot write {name}: {e}"))
        })
    })
}

pub fn save_png(img: &RgbImage, path: &Path) -> Result<()> {
    crate::fsutil::write_atomic(path, |tmp| {
        img.save_with_format(tmp, image::ImageFormat::Png)
            .map_err(|e| Error::input(path, format!("cannot write PNG: {e}")))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A held-out metric joins its training metric's panel (two panels here, one row), both
    /// curves are drawn in their colours, and NaN gaps are skipped.
    #[test]
    fn loss_plot_pairs_held_out_curves_with_their_training_metric() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("loss.png");
        let steps: Vec<usize> = (0..20).map(|i| i * 10).collect();
        let loss: Vec<f64> = (0..20).map(|i| 2.0 / (1.0 + i as f64)).collect();
        let held: Vec<f64> = (0..20)
            .map(|i| {
                if i % 5 == 4 {
                    2.2 / (1.0 + i as f64)
                } else {
                    f64::NAN
                }
            })
            .collect();
        let lr: Vec<f64> = (0..20).map(|i| 1e-3 * (1.0 - i as f64 / 20.0)).collect();
        let series = [("loss", loss), ("heldout_loss", held), ("lr", lr)];
        loss_plot(&path, &steps, &series).unwrap();
        let img = image::open(&path).unwrap().to_rgb8();
        assert_eq!(img.dimensions(), (1040, 260));
        let has = |rgb: [u8; 3]| img.pixels().any(|p| p.0 == rgb);
        assert!(has([200, 40, 40]), "no training curve");
        assert!(has([30, 90, 200]), "no held-out curve");
    }
}
