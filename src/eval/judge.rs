//! A programmatic judge for the shapes benchmark: what objects an image shows (colour, shape,
//! size, 3×3 cell) and whether that is what a scene asked for.
//!
//! Pixels are labelled with the nearest palette colour (or the grey field), same-colour pixels are
//! joined into 4-connected components, and each component is read off its geometry: a ring has its
//! centroid in a hole; otherwise the fill of its bounding box separates square (1.0), circle
//! (π/4) and diamond (½), a triangle has its centroid well below its box centre, and a star fills
//! little of its convex hull. Size comes from the area relative to the shape's area at each
//! radius, position from the centroid, count from the number of components.

use crate::data::shapes::{radius_fraction, Object, Scene, BACKGROUND, COLOURS};
use image::RgbImage;
use serde::Serialize;

/// One object found in an image.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Detected {
    pub colour: &'static str,
    pub shape: &'static str,
    pub size: &'static str,
    pub row: usize,
    pub col: usize,
    /// Centroid in pixels.
    pub cx: f64,
    pub cy: f64,
    pub area: usize,
}

/// Area of each shape in units of its radius² (see `shapes::inside`).
fn unit_area(shape: &str) -> f64 {
    let pi = std::f64::consts::PI;
    match shape {
        "circle" => pi,
        "square" => 2.56,
        "diamond" => 2.0,
        "triangle" => 3.0 * 3f64.sqrt() / 4.0,
        "star" => 5.0 * 0.45 * (pi / 5.0).sin(),
        _ => pi * (1.0 - 0.55 * 0.55),
    }
}

/// Palette index of a pixel (`None`: the grey field or an ambiguous blend).
fn label(p: &[u8; 3]) -> Option<usize> {
    let d = |c: &[u8; 3]| -> i32 {
        (0..3)
            .map(|k| (p[k] as i32 - c[k] as i32).pow(2))
            .sum::<i32>()
    };
    let bg = d(&BACKGROUND);
    let (best, dist) = COLOURS
        .iter()
        .enumerate()
        .map(|(i, (_, c))| (i, d(c)))
        .min_by_key(|&(_, dd)| dd)?;
    // A pixel belongs to a colour when it is clearly nearer to it than to the field.
    (dist * 4 < bg).then_some(best)
}

/// Area of the convex hull of a set of unit pixels (their corners; monotone chain).
fn hull_area(pixels: &[usize], w: usize) -> f64 {
    let mut pts: Vec<(i64, i64)> = pixels
        .iter()
        .flat_map(|&i| {
            let (x, y) = ((i % w) as i64, (i / w) as i64);
            [(x, y), (x + 1, y), (x, y + 1), (x + 1, y + 1)]
        })
        .collect();
    pts.sort_unstable();
    pts.dedup();
    let cross = |o: (i64, i64), a: (i64, i64), b: (i64, i64)| {
        (a.0 - o.0) * (b.1 - o.1) - (a.1 - o.1) * (b.0 - o.0)
    };
    let mut hull: Vec<(i64, i64)> = Vec::with_capacity(2 * pts.len());
    for pass in 0..2 {
        let start = hull.len();
        let iter: Box<dyn Iterator<Item = &(i64, i64)>> = if pass == 0 {
            Box::new(pts.iter())
        } else {
            Box::new(pts.iter().rev())
        };
        for &p in iter {
            while hull.len() >= start + 2
                && cross(hull[hull.len() - 2], hull[hull.len() - 1], p) <= 0
            {
                hull.pop();
            }
            hull.push(p);
        }
        hull.pop();
    }
    let twice: i64 = (0..hull.len())
        .map(|i| {
            let (a, b) = (hull[i], hull[(i + 1) % hull.len()]);
            a.0 * b.1 - b.0 * a.1
        })
        .sum();
    (twice.abs() as f64 / 2.0).max(1.0)
}

/// Every object of `img` (components smaller than a third of the smallest shape are edge noise).
pub fn detect(img: &RgbImage) -> Vec<Detected> {
    let (w, h) = (img.width() as usize, img.height() as usize);
    let labels: Vec<Option<usize>> = img.pixels().map(|p| label(&p.0)).collect();
    let side = w.min(h) as f64;
    let small_r = radius_fraction("small") * side;
    let large_r = radius_fraction("large") * side;
    let min_area = (unit_area("star") * small_r * small_r / 3.0).max(3.0) as usize;
    let mut seen = vec![false; w * h];
    let mut out = vec![];
    for start in 0..w * h {
        let Some(colour) = labels[start] else {
            continue;
        };
        if seen[start] {
            continue;
        }
        // Flood fill this component.
        let mut stack = vec![start];
        seen[start] = true;
        let mut pixels = vec![];
        while let Some(i) = stack.pop() {
            pixels.push(i);
            let (x, y) = (i % w, i / w);
            let mut push = |j: usize| {
                if !seen[j] && labels[j] == Some(colour) {
                    seen[j] = true;
                    stack.push(j);
                }
            };
            if x > 0 {
                push(i - 1);
            }
            if x + 1 < w {
                push(i + 1);
            }
            if y > 0 {
                push(i - w);
            }
            if y + 1 < h {
                push(i + w);
            }
        }
        if pixels.len() < min_area {
            continue;
        }
        let n = pixels.len() as f64;
        let (mut sx, mut sy) = (0.0, 0.0);
        let (mut x0, mut x1, mut y0, mut y1) = (w, 0, h, 0);
        for &i in &pixels {
            let (x, y) = (i % w, i / w);
            sx += x as f64 + 0.5;
            sy += y as f64 + 0.5;
            x0 = x0.min(x);
            x1 = x1.max(x);
            y0 = y0.min(y);
            y1 = y1.max(y);
        }
        let (cx, cy) = (sx / n, sy / n);
        let (bw, bh) = ((x1 - x0 + 1) as f64, (y1 - y0 + 1) as f64);
        let fill = n / (bw * bh);
        let centre = (cy as usize).min(h - 1) * w + (cx as usize).min(w - 1);
        let hole = labels[centre] != Some(colour);
        let solidity = n / hull_area(&pixels, w);
        let shape = if hole {
            "ring"
        } else if solidity < 0.8 {
            "star"
        } else if fill > 0.88 {
            "square"
        } else if (cy - (y0 as f64 + bh / 2.0)) / bh > 0.09 {
            // Apex up: a triangle's centroid lies a sixth of its height below its box centre.
            "triangle"
        } else if fill > 0.66 {
            "circle"
        } else {
            "diamond"
        };
        let r = (n / unit_area(shape)).sqrt();
        let size = if r < (small_r * large_r).sqrt() {
            "small"
        } else {
            "large"
        };
        out.push(Detected {
            colour: COLOURS[colour].0,
            shape,
            size,
            row: ((cy / h as f64 * 3.0) as usize).min(2),
            col: ((cx / w as f64 * 3.0) as usize).min(2),
            cx,
            cy,
            area: pixels.len(),
        });
    }
    out
}

/// Which parts of a scene an image got right.
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct Verdict {
    /// Per attribute: `None` when the scene does not ask for it.
    pub colour: Option<bool>,
    pub shape: Option<bool>,
    pub size: Option<bool>,
    pub position: Option<bool>,
    pub count: Option<bool>,
    pub relation: Option<bool>,
    /// Everything asked for, and nothing else in the image.
    pub correct: bool,
}

fn same_kind(d: &Detected, o: &Object) -> bool {
    d.colour == o.colour && d.shape == o.shape
}

/// Judge `detected` against the scene it was generated for.
pub fn judge(scene: &Scene, detected: &[Detected]) -> Verdict {
    let o = &scene.objects[0];
    match scene.kind.as_str() {
        "single" => {
            let best = detected
                .iter()
                .max_by_key(|d| (d.colour == o.colour) as u8 * 2 + (d.shape == o.shape) as u8);
            let v = |f: &dyn Fn(&Detected) -> bool| Some(best.is_some_and(f));
            let mut out = Verdict {
                colour: v(&|d| d.colour == o.colour),
                shape: v(&|d| d.shape == o.shape),
                size: v(&|d| d.size == o.size),
                position: v(&|d| d.row == o.row && d.col == o.col),
                count: Some(detected.len() == 1),
                ..Default::default()
            };
            out.correct = [out.colour, out.shape, out.size, out.position, out.count]
                .iter()
                .all(|x| *x == Some(true));
            out
        }
        "count" => {
            let all = |f: &dyn Fn(&Detected) -> bool| {
                Some(!detected.is_empty() && detected.iter().all(f))
            };
            let mut out = Verdict {
                colour: all(&|d| d.colour == o.colour),
                shape: all(&|d| d.shape == o.shape),
                size: all(&|d| d.size == o.size),
                count: Some(detected.len() == scene.objects.len()),
                ..Default::default()
            };
            out.correct = [out.colour, out.shape, out.count, out.size]
                .iter()
                .all(|x| *x == Some(true));
            out
        }
        _ => {
            let b = &scene.objects[1];
            let da = detected.iter().find(|d| same_kind(d, o));
            let db = detected.iter().find(|d| same_kind(d, b));
            let colours = detected.iter().any(|d| d.colour == o.colour)
                && detected.iter().any(|d| d.colour == b.colour);
            let shapes = detected.iter().any(|d| d.shape == o.shape)
                && detected.iter().any(|d| d.shape == b.shape);
            let relation = match (da, db) {
                (Some(a), Some(bb)) => match scene.relation.as_deref() {
                    Some("left of") => a.cx < bb.cx,
                    Some("right of") => a.cx > bb.cx,
                    Some("above") => a.cy < bb.cy,
                    _ => a.cy > bb.cy,
                },
                _ => false,
            };
            let mut out = Verdict {
                colour: Some(colours),
                shape: Some(shapes),
                count: Some(detected.len() == 2),
                relation: Some(relation),
                ..Default::default()
            };
            out.correct = da.is_some() && db.is_some() && relation && detected.len() == 2;
            out
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::data::shapes::{generate_one, Split};

    /// The judge reads ground-truth renders (both splits, every scene kind) almost perfectly.
    #[test]
    fn ground_truth_renders_are_judged_correct() {
        let n = 600;
        let mut wrong = vec![];
        for split in [Split::Train, Split::Heldout] {
            for i in 0..n {
                let s = generate_one(7, split, i, 64);
                let d = detect(&s.image);
                let v = judge(&s.scene, &d);
                if !v.correct {
                    wrong.push(format!("{:?} {i}: {:?} → {:?}", split, s.scene, d));
                }
            }
        }
        let acc = 1.0 - wrong.len() as f64 / (2 * n) as f64;
        eprintln!("judge on ground truth: {acc:.4} fully correct");
        assert!(
            acc >= 0.99,
            "{acc:.4} fully correct; e.g. {:#?}",
            &wrong[..wrong.len().min(20)]
        );
    }

    #[test]
    fn an_empty_field_is_judged_wrong() {
        let s = generate_one(7, Split::Train, 0, 64);
        let blank = RgbImage::from_pixel(64, 64, image::Rgb(BACKGROUND));
        let v = judge(&s.scene, &detect(&blank));
        assert!(!v.correct);
        assert_eq!(v.count, Some(false));
    }

    /// The swapped render of a relation scene draws the same objects in the same places with
    /// the two colours (or, of one colour, the two shapes) exchanged; other scenes have none.
    #[test]
    fn a_swapped_render_exchanges_the_two_objects_attributes() {
        let (mut relations, mut others) = (0, 0);
        for i in 0..40 {
            let (s, swapped) = crate::data::shapes::generate_swapped(3, Split::Train, i, 96);
            assert_eq!(s.image, generate_one(3, Split::Train, i, 96).image);
            let Some(swapped) = swapped else {
                others += 1;
                continue;
            };
            relations += 1;
            assert_ne!(swapped, s.image, "scene {i}: {:?}", s.scene);
            let detected = detect(&swapped);
            let (a, b) = (&s.scene.objects[0], &s.scene.objects[1]);
            let (at_a, at_b) = if a.colour != b.colour {
                (
                    (b.colour.as_str(), a.shape.as_str()),
                    (a.colour.as_str(), b.shape.as_str()),
                )
            } else {
                (
                    (a.colour.as_str(), b.shape.as_str()),
                    (b.colour.as_str(), a.shape.as_str()),
                )
            };
            for (colour, shape) in [at_a, at_b] {
                assert!(
                    detected
                        .iter()
                        .any(|d| d.colour == colour && d.shape == shape),
                    "scene {i}: no {colour} {shape} in {detected:?}"
                );
            }
        }
        assert!(
            relations > 5 && others > 5,
            "{relations} relation scenes of 40"
        );
    }
}
