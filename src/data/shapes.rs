//! The procedural shapes benchmark: coloured shapes on a grey field with compositional captions,
//! and a fixed list of attribute combinations held out of training to measure zero-shot
//! generalisation (Ramesh et al. 2021 §3.2 on combining unusual concepts).

use crate::data::folder::FolderWriter;
use crate::rng::Rng;
use crate::Result;
use image::{Rgb, RgbImage};
use serde::{Deserialize, Serialize};
use std::path::Path;

pub const SHAPES: [&str; 6] = ["circle", "square", "triangle", "diamond", "star", "ring"];

pub const COLOURS: [(&str, [u8; 3]); 8] = [
    ("red", [220, 40, 40]),
    ("green", [40, 170, 60]),
    ("blue", [40, 80, 220]),
    ("yellow", [240, 210, 40]),
    ("purple", [140, 60, 180]),
    ("orange", [240, 130, 30]),
    ("white", [245, 245, 245]),
    ("black", [20, 20, 20]),
];

pub const BACKGROUND: [u8; 3] = [128, 128, 128];

pub const SIZES: [&str; 2] = ["small", "large"];

pub const RELATIONS: [&str; 4] = ["left of", "right of", "above", "below"];

/// One object on the 3×3 layout.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Object {
    pub shape: String,
    pub colour: String,
    pub size: String,
    pub row: usize,
    pub col: usize,
}

/// What an image shows: one object, `n` identical objects, or two objects in a relation
/// (`objects[0]` is `relation` of `objects[1]`).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Scene {
    pub kind: String,
    pub objects: Vec<Object>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub relation: Option<String>,
}

/// An attribute combination that never appears in the `train` split.
#[derive(Clone, Copy, Debug)]
pub enum HeldOut {
    ColourShape(&'static str, &'static str),
    ShapeAt(&'static str, usize, usize),
    CountOf(usize, &'static str),
}

/// The held-out combinations: `heldout` draws only scenes containing one, `train` none.
pub const HELD_OUT: [HeldOut; 5] = [
    HeldOut::ColourShape("red", "triangle"),
    HeldOut::ColourShape("blue", "circle"),
    HeldOut::ColourShape("yellow", "ring"),
    HeldOut::ShapeAt("star", 2, 2),
    HeldOut::CountOf(3, "diamond"),
];

impl HeldOut {
    pub fn matches(&self, scene: &Scene) -> bool {
        match *self {
            HeldOut::ColourShape(c, s) => {
                scene.objects.iter().any(|o| o.colour == c && o.shape == s)
            }
            HeldOut::ShapeAt(s, r, c) => scene
                .objects
                .iter()
                .any(|o| o.shape == s && o.row == r && o.col == c),
            HeldOut::CountOf(n, s) => {
                scene.kind == "count" && scene.objects.len() == n && scene.objects[0].shape == s
            }
        }
    }
}

/// Whether `scene` contains any held-out combination.
pub fn is_held_out(scene: &Scene) -> bool {
    HELD_OUT.iter().any(|h| h.matches(scene))
}

/// Which split a generated set belongs to.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Split {
    Train,
    Heldout,
}

fn random_object(rng: &mut Rng, row: usize, col: usize) -> Object {
    Object {
        shape: rng.pick(&SHAPES).to_string(),
        colour: rng.pick(&COLOURS).0.to_string(),
        size: rng.pick(&SIZES).to_string(),
        row,
        col,
    }
}

fn random_scene(rng: &mut Rng) -> Scene {
    let u = rng.uniform();
    if u < 0.4 {
        let (row, col) = (rng.below(3), rng.below(3));
        let o = random_object(rng, row, col);
        Scene {
            kind: "single".into(),
            objects: vec![o],
            relation: None,
        }
    } else if u < 0.65 {
        let n = 2 + rng.below(2);
        let mut cells: Vec<usize> = (0..9).collect();
        rng.shuffle(&mut cells);
        let proto = random_object(rng, 0, 0);
        let objects = cells[..n]
            .iter()
            .map(|&c| Object {
                row: c / 3,
                col: c % 3,
                ..proto.clone()
            })
            .collect();
        Scene {
            kind: "count".into(),
            objects,
            relation: None,
        }
    } else {
        let relation = rng.pick(&RELATIONS);
        let (line, a, b) = (rng.below(3), rng.below(3), rng.below(3));
        let (lo, hi) = if a == b {
            (a.min(1), a.min(1) + 1)
        } else {
            (a.min(b), a.max(b))
        };
        // (row, col) of the first and second object such that the relation holds.
        let (first, second) = match relation {
            "left of" => ((line, lo), (line, hi)),
            "right of" => ((line, hi), (line, lo)),
            "above" => ((lo, line), (hi, line)),
            _ => ((hi, line), (lo, line)),
        };
        let a = random_object(rng, first.0, first.1);
        let mut b = random_object(rng, second.0, second.1);
        while b.shape == a.shape && b.colour == a.colour {
            b.colour = rng.pick(&COLOURS).0.to_string();
        }
        Scene {
            kind: "relation".into(),
            objects: vec![a, b],
            relation: Some(relation.into()),
        }
    }
}

/// Draw a scene of `split` (rejection sampling against the held-out list).
pub fn sample_scene(rng: &mut Rng, split: Split) -> Scene {
    loop {
        let s = random_scene(rng);
        if is_held_out(&s) == (split == Split::Heldout) {
            return s;
        }
    }
}

fn size_word(rng: &mut Rng, size: &str) -> &'static str {
    if size == "small" {
        rng.pick(&["small", "little", "tiny"])
    } else {
        rng.pick(&["large", "big"])
    }
}

fn shape_word(rng: &mut Rng, shape: &str, plural: bool) -> String {
    let w = match shape {
        "circle" => rng.pick(&["circle", "disk"]),
        "ring" => rng.pick(&["ring", "donut"]),
        "diamond" => rng.pick(&["diamond", "rhombus"]),
        s => SHAPES.iter().find(|x| **x == s).copied().unwrap_or("shape"),
    };
    match (plural, w) {
        (false, w) => w.to_string(),
        (true, "rhombus") => "rhombuses".into(),
        (true, w) => format!("{w}s"),
    }
}

fn position_phrase(rng: &mut Rng, row: usize, col: usize) -> &'static str {
    const P: [[[&str; 2]; 3]; 3] = [
        [
            ["in the top left corner", "at the top left"],
            ["at the top", "at the top center"],
            ["in the top right corner", "at the top right"],
        ],
        [
            ["on the left", "at the middle left"],
            ["in the center", "in the middle"],
            ["on the right", "at the middle right"],
        ],
        [
            ["in the bottom left corner", "at the bottom left"],
            ["at the bottom", "at the bottom center"],
            ["in the bottom right corner", "at the bottom right"],
        ],
    ];
    rng.pick(&P[row.min(2)][col.min(2)])
}

/// "a" or "an" for the word that follows.
fn a(next: &str) -> &'static str {
    if next.starts_with(['a', 'e', 'i', 'o', 'u']) {
        "an"
    } else {
        "a"
    }
}

fn inverse(relation: &str) -> &'static str {
    match relation {
        "left of" => "right of",
        "right of" => "left of",
        "above" => "below",
        _ => "above",
    }
}

fn relation_phrase(rng: &mut Rng, relation: &str) -> &'static str {
    match relation {
        "left of" => rng.pick(&["to the left of", "left of"]),
        "right of" => rng.pick(&["to the right of", "right of"]),
        "above" => rng.pick(&["above", "over"]),
        _ => rng.pick(&["below", "under"]),
    }
}

/// A caption for `scene`, drawn from several templates, synonyms and word orders.
pub fn caption(scene: &Scene, rng: &mut Rng) -> String {
    let o = &scene.objects[0];
    match scene.kind.as_str() {
        "single" => {
            let (size, shape, pos) = (
                size_word(rng, &o.size),
                shape_word(rng, &o.shape, false),
                position_phrase(rng, o.row, o.col),
            );
            let c = &o.colour;
            match rng.below(4) {
                0 => format!("{} {size} {c} {shape} {pos}", a(size)),
                1 => format!("{pos} there is {} {size} {c} {shape}", a(size)),
                2 => format!("{} {c} {shape}, {size}, {pos}", a(c)),
                _ => format!("there is {} {size} {c} {shape} {pos}", a(size)),
            }
        }
        "count" => {
            let num = ["zero", "one", "two", "three"][scene.objects.len().min(3)];
            let (size, shapes, c) = (
                size_word(rng, &o.size),
                shape_word(rng, &o.shape, true),
                &o.colour,
            );
            match rng.below(3) {
                0 => format!("{num} {size} {c} {shapes}"),
                1 => format!("there are {num} {size} {c} {shapes}"),
                _ => format!("{num} {c} {shapes}, all {size}"),
            }
        }
        _ => {
            let b = &scene.objects[1];
            let rel = scene.relation.as_deref().unwrap_or("left of");
            let (sa, sb) = (
                shape_word(rng, &o.shape, false),
                shape_word(rng, &b.shape, false),
            );
            match rng.below(3) {
                0 => format!(
                    "{} {} {sa} {} {} {} {sb}",
                    a(&o.colour),
                    o.colour,
                    relation_phrase(rng, rel),
                    a(&b.colour),
                    b.colour
                ),
                1 => format!(
                    "{} {} {sb} {} {} {} {sa}",
                    a(&b.colour),
                    b.colour,
                    relation_phrase(rng, inverse(rel)),
                    a(&o.colour),
                    o.colour
                ),
                _ => format!(
                    "there is {} {} {sa} {} {} {} {sb}",
                    a(&o.colour),
                    o.colour,
                    relation_phrase(rng, rel),
                    a(&b.colour),
                    b.colour
                ),
            }
        }
    }
}

/// Radius of an object as a fraction of the image side (a cell is 1/3 wide).
pub fn radius_fraction(size: &str) -> f64 {
    if size == "small" {
        0.09
    } else {
        0.15
    }
}

/// Whether the point (dx, dy), relative to the centre in units of the radius, is inside `shape`
/// (y grows downwards).
pub fn inside(shape: &str, dx: f64, dy: f64) -> bool {
    let d2 = dx * dx + dy * dy;
    match shape {
        "circle" => d2 <= 1.0,
        "ring" => (0.55 * 0.55..=1.0).contains(&d2),
        "square" => dx.abs().max(dy.abs()) <= 0.8,
        "diamond" => dx.abs() + dy.abs() <= 1.0,
        "triangle" => {
            // Equilateral, inscribed in the unit circle, apex up: vertices (0,−1), (±√3/2, ½).
            dy <= 0.5 && 3f64.sqrt() * dx.abs() - dy <= 1.0
        }
        "star" => {
            // Five points, inner radius 0.45, first point straight up; even–odd rule.
            let pts: Vec<(f64, f64)> = (0..10)
                .map(|i| {
                    let r = if i % 2 == 0 { 1.0 } else { 0.45 };
                    let a = -std::f64::consts::FRAC_PI_2 + i as f64 * std::f64::consts::PI / 5.0;
                    (r * a.cos(), r * a.sin())
                })
                .collect();
            let mut inside = false;
            let mut j = pts.len() - 1;
            for i in 0..pts.len() {
                let ((xi, yi), (xj, yj)) = (pts[i], pts[j]);
                if (yi > dy) != (yj > dy) && dx < (xj - xi) * (dy - yi) / (yj - yi) + xi {
                    inside = !inside;
                }
                j = i;
            }
            inside
        }
        _ => false,
    }
}

fn colour_rgb(name: &str) -> [u8; 3] {
    COLOURS
        .iter()
        .find(|(n, _)| *n == name)
        .map(|(_, c)| *c)
        .unwrap_or(BACKGROUND)
}

/// Render `scene` at `size`×`size` pixels with 4×4 supersampling; `rng` jitters the centres.
pub fn render(scene: &Scene, size: u32, rng: &mut Rng) -> RgbImage {
    let s = size as f64;
    let placed: Vec<(f64, f64, f64, &str, [u8; 3])> = scene
        .objects
        .iter()
        .map(|o| {
            let cx = (o.col as f64 + 0.5) / 3.0 * s + rng.range(-0.02, 0.02) * s;
            let cy = (o.row as f64 + 0.5) / 3.0 * s + rng.range(-0.02, 0.02) * s;
            (
                cx,
                cy,
                radius_fraction(&o.size) * s,
                o.shape.as_str(),
                colour_rgb(&o.colour),
            )
        })
        .collect();
    const SS: usize = 4;
    RgbImage::from_fn(size, size, |x, y| {
        let mut acc = [0u32; 3];
        for sy in 0..SS {
            for sx in 0..SS {
                let px = x as f64 + (sx as f64 + 0.5) / SS as f64;
                let py = y as f64 + (sy as f64 + 0.5) / SS as f64;
                let mut c = BACKGROUND;
                for &(cx, cy, r, shape, rgb) in &placed {
                    if inside(shape, (px - cx) / r, (py - cy) / r) {
                        c = rgb;
                    }
                }
                for k in 0..3 {
                    acc[k] += c[k] as u32;
                }
            }
        }
        let n = (SS * SS) as u32;
        Rgb([
            ((acc[0] + n / 2) / n) as u8,
            ((acc[1] + n / 2) / n) as u8,
            ((acc[2] + n / 2) / n) as u8,
        ])
    })
}

/// One generated sample.
#[derive(Clone, Debug)]
pub struct ShapesSample {
    pub scene: Scene,
    pub caption: String,
    pub image: RgbImage,
}

/// The scene kinds [`random_scene`] draws, in the order of its thresholds.
pub const SCENE_KINDS: [&str; 3] = ["single", "count", "relation"];

/// Scene and caption of sample `i` of `(seed, split)`, and the generator positioned to render it.
fn draw(seed: u64, split: Split, i: u64) -> (Scene, String, Rng) {
    let purpose = match split {
        Split::Train => "shapes-train",
        Split::Heldout => "shapes-heldout",
    };
    let mut rng = Rng::stream(seed, purpose, i);
    let scene = sample_scene(&mut rng, split);
    let caption = caption(&scene, &mut rng);
    (scene, caption, rng)
}

/// Sample `i` of the set `(seed, split)`: a pure function of its arguments.
pub fn generate_one(seed: u64, split: Split, i: u64, size: u32) -> ShapesSample {
    let (scene, caption, mut rng) = draw(seed, split, i);
    let image = render(&scene, size, &mut rng);
    ShapesSample {
        scene,
        caption,
        image,
    }
}

/// `scene` with its two objects' colours exchanged, or their shapes where they share a colour:
/// every attribute a relation caption names is still drawn, bound to the other object.
fn swap_attributes(scene: &Scene) -> Scene {
    exchange(scene, |a, b| {
        if a.colour != b.colour {
            std::mem::swap(&mut a.colour, &mut b.colour);
        } else {
            std::mem::swap(&mut a.shape, &mut b.shape);
        }
    })
}

/// `scene` with `swap` applied to its first two objects.
fn exchange(scene: &Scene, swap: impl Fn(&mut Object, &mut Object)) -> Scene {
    let mut other = scene.clone();
    if let [a, b, ..] = other.objects.as_mut_slice() {
        swap(a, b);
    }
    other
}

/// What a scene draws, whatever the order of its objects: two scenes with the same key render
/// the same objects in the same cells.
fn drawn(scene: &Scene) -> Vec<(String, String, String, usize, usize)> {
    let mut key: Vec<_> = scene
        .objects
        .iter()
        .map(|o| {
            (
                o.shape.clone(),
                o.colour.clone(),
                o.size.clone(),
                o.row,
                o.col,
            )
        })
        .collect();
    key.sort();
    key
}

/// Hard negatives of `scene`: edits its caption no longer describes though they draw every
/// object it names, at the same cost in codes — for two objects in a relation, their attributes
/// exchanged ([`swap_attributes`]: bound wrongly), their cells exchanged (the relation
/// reversed) and their shapes exchanged (each colour where the caption puts it, on the other's
/// shape: where the two first differ, an object has begun in the right colour and the model
/// must draw the shape the caption binds to that colour). Edits that draw what the scene
/// draws, repeat another, or, in the training split, draw a held-out combination are left out. Singles and counts have none: a count off by one
/// draws an object more or fewer, which changes an image's likelihood by far more than how
/// well it fits its caption, so a likelihood margin cannot compare the two.
pub fn negatives(scene: &Scene, split: Split) -> Vec<Scene> {
    if scene.kind != "relation" || scene.objects.len() != 2 {
        return vec![];
    }
    let moved = exchange(scene, |a, b| {
        std::mem::swap(&mut a.row, &mut b.row);
        std::mem::swap(&mut a.col, &mut b.col);
    });
    let reshaped = exchange(scene, |a, b| std::mem::swap(&mut a.shape, &mut b.shape));
    let mut out: Vec<Scene> = vec![];
    for c in [swap_attributes(scene), moved, reshaped] {
        let same = |s: &Scene| drawn(s) == drawn(&c);
        let leaks = split == Split::Train && is_held_out(&c);
        if same(scene) || out.iter().any(same) || leaks {
            continue;
        }
        out.push(c);
    }
    out
}

/// Sample `i` of `(seed, split)` and, for a relation scene, the same render with the two
/// objects' colours swapped (their shapes where the colours are the same): the caption no
/// longer describes it, though every attribute it names is still drawn — the pair that tells
/// a model that binds attributes to objects from one that only matches them.
pub fn generate_swapped(
    seed: u64,
    split: Split,
    i: u64,
    size: u32,
) -> (ShapesSample, Option<RgbImage>) {
    let (scene, caption, mut rng) = draw(seed, split, i);
    let swapped = (scene.kind == "relation")
        .then(|| render(&swap_attributes(&scene), size, &mut rng.clone()));
    let image = render(&scene, size, &mut rng);
    let sample = ShapesSample {
        scene,
        caption,
        image,
    };
    (sample, swapped)
}

/// At most `at_most` scenes of `kind` in a written set (`dalle data shapes --cap KIND=N`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct KindCap {
    pub kind: String,
    pub at_most: usize,
}

impl std::str::FromStr for KindCap {
    type Err = String;

    fn from_str(s: &str) -> std::result::Result<Self, String> {
        let usage = || {
            format!(
                "expected KIND=N with KIND one of {} and N a count of scenes (got '{s}')",
                SCENE_KINDS.join(", ")
            )
        };
        let (kind, n) = s.split_once('=').ok_or_else(usage)?;
        if !SCENE_KINDS.contains(&kind) {
            return Err(usage());
        }
        let at_most = n.parse().map_err(|_| usage())?;
        Ok(KindCap {
            kind: kind.to_string(),
            at_most,
        })
    }
}

/// Write `count` scenes to `out` in the image-folder format (`metadata.jsonl` + PNGs); a
/// non-empty `out` is refused unless `replace` (see [`FolderWriter::create`]).
pub fn write_set(
    out: &Path,
    count: usize,
    seed: u64,
    split: Split,
    size: u32,
    replace: bool,
) -> Result<()> {
    let spec = SetSpec::new(count, seed, split, size);
    write_set_capped(out, &spec, replace, &[]).map(|_| ())
}

/// Which shapes set to write: `count` scenes of `(seed, split)` at `size` pixels and, with
/// `negatives`, each scene's [`negatives`] rendered beside it.
#[derive(Clone, Copy, Debug)]
pub struct SetSpec {
    pub count: usize,
    pub seed: u64,
    pub split: Split,
    pub size: u32,
    pub negatives: bool,
}

impl SetSpec {
    pub fn new(count: usize, seed: u64, split: Split, size: u32) -> Self {
        SetSpec {
            count,
            seed,
            split,
            size,
            negatives: false,
        }
    }
}

/// Write the set `spec` describes, keeping at most `caps[k].at_most` scenes of each capped kind:
/// of the `count` scenes drawn, those past their kind's cap are skipped, not redrawn, so the
/// written set is the uncapped one less those scenes, every sample under its uncapped name.
/// With `spec.negatives`, scene `NNNNNN.png`'s negatives are `NNNNNN.neg0.png`, … (rendered
/// with the scene's own jitter), listed in its metadata line as `negatives`. Returns how many
/// scenes were written. A kind capped twice, or caps that leave no scene (nothing is then
/// written), are refused.
pub fn write_set_capped(
    out: &Path,
    spec: &SetSpec,
    replace: bool,
    caps: &[KindCap],
) -> Result<usize> {
    let SetSpec {
        count,
        seed,
        split,
        size,
        negatives: with_negatives,
    } = *spec;
    for (i, c) in caps.iter().enumerate() {
        if caps[..i].iter().any(|d| d.kind == c.kind) {
            return Err(crate::Error::Usage(format!(
                "--cap {} is given twice: cap each scene kind once",
                c.kind
            )));
        }
    }
    let mut left: Vec<(&str, usize)> = caps.iter().map(|c| (c.kind.as_str(), c.at_most)).collect();
    // Which scenes to write, decided before anything is created (drawing one costs no render).
    let keep: Vec<usize> = (0..count)
        .filter(|&i| {
            let kind = draw(seed, split, i as u64).0.kind;
            match left.iter_mut().find(|(k, _)| *k == kind) {
                Some((_, 0)) => false,
                Some((_, n)) => {
                    *n -= 1;
                    true
                }
                None => true,
            }
        })
        .collect();
    if keep.is_empty() {
        return Err(crate::Error::Usage(format!(
            "--cap left none of the {count} scenes drawn, so nothing was written to {}: raise a \
             cap or --count",
            out.display()
        )));
    }
    let mut w = FolderWriter::create(out, replace)?;
    for &i in &keep {
        let (scene, caption, mut rng) = draw(seed, split, i as u64);
        let mut extra = serde_json::json!({ "scene": scene, "split": split });
        if with_negatives {
            let mut names = vec![];
            for (k, neg) in negatives(&scene, split).iter().enumerate() {
                let name = format!("{i:06}.neg{k}.png");
                w.add_image(&name, &render(neg, size, &mut rng.clone()))?;
                names.push(name);
            }
            if !names.is_empty() {
                extra["negatives"] = names.into();
            }
        }
        let image = render(&scene, size, &mut rng);
        w.add(&format!("{i:06}.png"), &image, &caption, extra)?;
    }
    w.finish()?;
    Ok(keep.len())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shapes_have_the_intended_area() {
        // Fraction of the bounding square [-1, 1]² each shape covers, on a 400×400 lattice.
        let area = |s: &str| {
            let n = 400;
            let mut hit = 0;
            for i in 0..n {
                for j in 0..n {
                    let (x, y) = (
                        -1.0 + (i as f64 + 0.5) * 2.0 / n as f64,
                        -1.0 + (j as f64 + 0.5) * 2.0 / n as f64,
                    );
                    hit += inside(s, x, y) as usize;
                }
            }
            hit as f64 / (n * n) as f64
        };
        let pi4 = std::f64::consts::PI / 4.0;
        assert!((area("circle") - pi4).abs() < 0.01);
        assert!((area("square") - 0.64).abs() < 0.01);
        assert!((area("diamond") - 0.5).abs() < 0.01);
        assert!((area("ring") - pi4 * (1.0 - 0.3025)).abs() < 0.01);
        // Equilateral triangle inscribed in the unit circle: 3√3/4 of the radius².
        assert!((area("triangle") - 3.0 * 3f64.sqrt() / 16.0).abs() < 0.01);
        // Ten triangles centre–outer–inner: 10 · ½ · 1 · 0.45 · sin 36°.
        assert!(
            (area("star") - 5.0 * 0.45 * (std::f64::consts::PI / 5.0).sin() / 4.0).abs() < 0.01
        );
    }

    /// Each relation scene's negatives are its attributes swapped and its places swapped (the
    /// relation reversed), none the scene itself, none repeated, none held out in the training
    /// split; other scenes have none; a written set lists them, rendered with the scene's own
    /// jitter.
    #[test]
    fn negatives_are_small_edits_the_caption_does_not_describe() {
        let cells = |s: &Scene| -> Vec<(usize, usize)> {
            let mut c: Vec<_> = s.objects.iter().map(|o| (o.row, o.col)).collect();
            c.sort();
            c
        };
        let (mut relations, mut reshapes) = (0, 0);
        for split in [Split::Train, Split::Heldout] {
            for i in 0..200 {
                let (scene, _, _) = draw(4, split, i);
                let negs = negatives(&scene, split);
                for (k, n) in negs.iter().enumerate() {
                    assert_ne!(drawn(n), drawn(&scene), "{scene:?}");
                    assert!(negs[..k].iter().all(|m| drawn(m) != drawn(n)));
                    assert!(split == Split::Heldout || !is_held_out(n), "{n:?}");
                }
                match scene.kind.as_str() {
                    "single" | "count" => assert!(negs.is_empty()),
                    _ => {
                        relations += 1;
                        let (a, b) = (&scene.objects[0], &scene.objects[1]);
                        let swapped = swap_attributes(&scene);
                        let mut moved = scene.clone();
                        (moved.objects[0].row, moved.objects[0].col) = (b.row, b.col);
                        (moved.objects[1].row, moved.objects[1].col) = (a.row, a.col);
                        let mut reshaped = scene.clone();
                        reshaped.objects[0].shape = b.shape.clone();
                        reshaped.objects[1].shape = a.shape.clone();
                        assert!(!negs.is_empty() || split == Split::Train, "{scene:?}");
                        for m in &negs {
                            assert_eq!(cells(m), cells(&scene));
                            assert!([&swapped, &moved, &reshaped]
                                .iter()
                                .any(|e| drawn(m) == drawn(e)));
                            reshapes += (drawn(m) == drawn(&reshaped)
                                && drawn(m) != drawn(&swapped))
                                as usize;
                        }
                    }
                }
            }
        }
        assert!(relations > 80, "{relations}");
        assert!(
            reshapes > relations / 2,
            "{reshapes} shape swaps of {relations}"
        );

        let dir = tempfile::tempdir().unwrap();
        let spec = SetSpec {
            negatives: true,
            ..SetSpec::new(30, 4, Split::Train, 32)
        };
        write_set_capped(dir.path(), &spec, false, &[]).unwrap();
        let mut listed = 0;
        for line in std::fs::read_to_string(dir.path().join("metadata.jsonl"))
            .unwrap()
            .lines()
        {
            let v: serde_json::Value = serde_json::from_str(line).unwrap();
            let i: u64 = v["file_name"].as_str().unwrap()[..6].parse().unwrap();
            let (scene, _, rng) = draw(4, Split::Train, i);
            let negs = negatives(&scene, Split::Train);
            let names: Vec<String> = v
                .get("negatives")
                .map(|n| serde_json::from_value(n.clone()).unwrap())
                .unwrap_or_default();
            assert_eq!(names.len(), negs.len(), "{line}");
            for (name, neg) in names.iter().zip(&negs) {
                let read = image::open(dir.path().join(name)).unwrap().to_rgb8();
                assert_eq!(read, render(neg, 32, &mut rng.clone()), "{name}");
                listed += 1;
            }
        }
        assert!(listed > 10, "{listed}");
    }

    /// A capped set is the uncapped one less the scenes past their kind's cap: the same lines,
    /// in order, under the same names; a kind's cap is exact; bad caps are refused.
    #[test]
    fn a_capped_set_is_a_subset_of_the_uncapped_one() {
        let dir = tempfile::tempdir().unwrap();
        let (all, capped) = (dir.path().join("all"), dir.path().join("capped"));
        write_set(&all, 60, 5, Split::Train, 16, false).unwrap();
        let caps: Vec<KindCap> = ["single=3", "count=0"]
            .iter()
            .map(|c| c.parse().unwrap())
            .collect();
        let spec = SetSpec::new(60, 5, Split::Train, 16);
        let n = write_set_capped(&capped, &spec, false, &caps).unwrap();
        let lines = |d: &Path| -> Vec<serde_json::Value> {
            std::fs::read_to_string(d.join("metadata.jsonl"))
                .unwrap()
                .lines()
                .map(|l| serde_json::from_str(l).unwrap())
                .collect()
        };
        let kind = |v: &serde_json::Value| v["scene"]["kind"].as_str().unwrap().to_string();
        let mut seen = std::collections::HashMap::<String, usize>::new();
        let expected: Vec<_> = lines(&all)
            .into_iter()
            .filter(|v| {
                let k = seen.entry(kind(v)).or_default();
                *k += 1;
                match kind(v).as_str() {
                    "single" => *k <= 3,
                    "count" => false,
                    _ => true,
                }
            })
            .collect();
        assert_eq!(lines(&capped), expected);
        assert_eq!(n, expected.len());
        assert_eq!(expected.iter().filter(|v| kind(v) == "single").count(), 3);
        assert!(expected.iter().any(|v| kind(v) == "relation"));
        for v in &expected {
            let name = v["file_name"].as_str().unwrap();
            let read = |d: &Path| std::fs::read(d.join(name)).unwrap();
            assert_eq!(read(&capped), read(&all), "{name}");
        }

        for bad in ["relation", "shape=3", "count=-1", "count=x"] {
            let e = bad.parse::<KindCap>().unwrap_err();
            assert!(
                e.contains("KIND=N with KIND one of single, count, relation"),
                "{e}"
            );
        }
        let twice = ["count=1", "count=2"].map(|c| c.parse::<KindCap>().unwrap());
        let spec = SetSpec::new(4, 5, Split::Train, 16);
        let e = write_set_capped(&dir.path().join("t"), &spec, false, &twice);
        assert!(e.unwrap_err().to_string().contains("given twice"));
        let none = SCENE_KINDS.map(|k| format!("{k}=0").parse::<KindCap>().unwrap());
        let empty = dir.path().join("none");
        let e = write_set_capped(&empty, &spec, false, &none);
        assert!(e.unwrap_err().to_string().contains("nothing was written"));
        assert!(!empty.exists());
    }
}
