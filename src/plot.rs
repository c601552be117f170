//! PNG outputs of training: image grids and loss curves, drawn without a plotting dependency.

use crate::{Error, Result};
use candle_core::Tensor;
use image::{Rgb, RgbImage};
use std::path::Path;

/// 3×5 pixel glyphs, one row of three bits per nibble, top row first.
fn glyph(c: char) -> [u8; 5] {
    match c.to_ascii_lowercase() {
        '0' => [7, 5, 5, 5, 7],
        '1' => [2, 6, 2, 2, 7],
        '2' => [7, 1, 7, 4, 7],
        '3' => [7, 1, 3, 1, 7],
        '4' => [5, 5, 7, 1, 1],
        '5' => [7, 4, 7, 1, 7],
        '6' => [7, 4, 7, 5, 7],
        '7' => [7, 1, 1, 2, 2],
        '8' => [7, 5, 7, 5, 7],
        '9' => [7, 5, 7, 1, 7],
        'a' => [2, 5, 7, 5, 5],
        'b' => [6, 5, 6, 5, 6],
        'c' => [3, 4, 4, 4, 3],
        'd' => [6, 5, 5, 5, 6],
        'e' => [7, 4, 6, 4, 7],
        'f' => [7, 4, 6, 4, 4],
        'g' => [3, 4, 5, 5, 3],
        'h' => [5, 5, 7, 5, 5],
        'i' => [7, 2, 2, 2, 7],
        'k' => [5, 5, 6, 5, 5],
        'l' => [4, 4, 4, 4, 7],
        'm' => [5, 7, 7, 5, 5],
        'n' => [6, 5, 5, 5, 5],
        'o' => [2, 5, 5, 5, 2],
        'p' => [6, 5, 6, 4, 4],
        'r' => [6, 5, 6, 5, 5],
        's' => [3, 4, 2, 1, 6],
        't' => [7, 2, 2, 2, 2],
        'u' => [5, 5, 5, 5, 7],
        'v' => [5, 5, 5, 5, 2],
        'w' => [5, 5, 7, 7, 5],
        'x' => [5, 5, 2, 5, 5],
        'y' => [5, 5, 2, 2, 2],
        'z' => [7, 1, 2, 4, 7],
        '.' => [0, 0, 0, 0, 2],
        '-' => [0, 0, 7, 0, 0],
        ':' => [0, 2, 0, 2, 0],
        '=' => [0, 7, 0, 7, 0],
        _ => [0; 5],
    }
}

/// Draw `text` with its top-left corner at (x, y), each font pixel `scale` pixels wide.
pub fn draw_text(img: &mut RgbImage, x: u32, y: u32, text: &str, scale: u32, color: Rgb<u8>) {
    for (i, c) in text.chars().enumerate() {
        let g = glyph(c);
        for (row, bits) in g.iter().enumerate() {
            for col in 0..3u32 {
                if bits & (4 >> col) == 0 {
                    continue;
                }
                for dy in 0..scale {
                    for dx in 0..scale {
                        let px = x + (i as u32 * 4 + col) * scale + dx;
                        let py = y + row as u32 * scale + dy;
                        if px < img.width() && py < img.height() {
                            img.put_pixel(px, py, color);
                        }
                    }
                }
            }
        }
    }
}

fn fmt_value(v: f64) -> String {
    if v != 0.0 && (v.abs() >= 1e4 || v.abs() < 1e-2) {
        format!("{v:.2e}")
    } else {
        format!("{v:.3}")
    }
}

/// One panel per named series, stacked vertically; each labelled with its name, its last finite
/// value and the y range. x is the training step.
pub fn loss_plot(path: &Path, steps: &[usize], series: &[(&str, Vec<f64>)]) -> Result<()> {
    let (w, ph, margin) = (640u32, 160u32, 8u32);
    let mut img = RgbImage::from_pixel(w, ph * series.len().max(1) as u32, Rgb([255, 255, 255]));
    let ink = Rgb([40, 40, 40]);
    for (p, (name, ys)) in series.iter().enumerate() {
        let top = p as u32 * ph;
        let finite: Vec<f64> = ys.iter().copied().filter(|v| v.is_finite()).collect();
        let (lo, hi) = finite
            .iter()
            .fold((f64::INFINITY, f64::NEG_INFINITY), |(a, b), &v| {
                (a.min(v), b.max(v))
            });
        let last = finite.last().copied().unwrap_or(f64::NAN);
        let title = format!(
            "{name} = {}   range {} : {}",
            fmt_value(last),
            fmt_value(lo),
            fmt_value(hi)
        );
        draw_text(&mut img, margin, top + 4, &title, 2, ink);
        let (x0, x1, y0, y1) = (margin, w - margin, top + 20, top + ph - margin);
        for x in x0..=x1 {
            img.put_pixel(x, y1, ink);
        }
        for y in y0..=y1 {
            img.put_pixel(x0, y, ink);
        }
        if finite.len() < 2 || steps.len() != ys.len() {
            continue;
        }
        let (s0, s1) = (steps[0] as f64, *steps.last().unwrap_or(&0) as f64);
        let span = (hi - lo).max(1e-12);
        let to_px = |s: usize, v: f64| {
            let fx = if s1 > s0 {
                (s as f64 - s0) / (s1 - s0)
            } else {
                0.0
            };
            let fy = (v - lo) / span;
            (
                x0 as f64 + fx * (x1 - x0) as f64,
                y1 as f64 - fy * (y1 - y0) as f64,
            )
        };
        // Missing values (NaN) are skipped, not breaks: a series measured every sample step
        // (held-out metrics) is drawn through the steps that have it.
        let mut prev: Option<(f64, f64)> = None;
        for (&s, &v) in steps.iter().zip(ys) {
            if !v.is_finite() {
                continue;
            }
            let cur = to_px(s, v);
            if let Some(a) = prev {
                let n = ((cur.0 - a.0).abs().max((cur.1 - a.1).abs()).ceil() as usize).max(1);
                for k in 0..=n {
                    let t = k as f64 / n as f64;
                    let (x, y) = (a.0 + t * (cur.0 - a.0), a.1 + t * (cur.1 - a.1));
                    img.put_pixel(x as u32, y as u32, Rgb([200, 40, 40]));
                }
            }
            prev = Some(cur);
        }
    }
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
