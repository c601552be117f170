//! Measuring zero-shot compositional generation on the shapes benchmark: generate an image for
//! each caption of seen (train-distribution) and held-out scenes, read the image back with
//! [`judge`], and count what came out right, with and without classifier-free guidance.

pub mod judge;

use crate::data::shapes::{generate_one, Split};
use dalle_runtimes::{
    Batcher, BatcherOptions, Generator, Output, Request, RuntimeError, SubmitError,
};
use serde::Serialize;
use std::sync::Arc;

/// Scenes of the evaluation come from this seed, not the training sets' (seed 0 by default).
pub const EVAL_SEED: u64 = 9_001;

/// Accuracy of one (split, guidance) cell.
#[derive(Clone, Debug, Default, Serialize)]
pub struct Score {
    pub split: String,
    pub guidance_scale: f32,
    pub samples: usize,
    /// attribute → (correct, asked).
    pub attributes: std::collections::BTreeMap<String, (usize, usize)>,
    pub fully_correct: usize,
    /// Scene kind (single, count, relation) → (fully correct, scenes).
    pub kinds: std::collections::BTreeMap<String, (usize, usize)>,
    /// The first [`EXAMPLES`] captions and generated images, for a grid.
    #[serde(skip)]
    pub examples: Vec<(String, image::RgbImage)>,
}

/// Examples kept per score.
pub const EXAMPLES: usize = 8;

impl Score {
    pub fn accuracy(&self) -> f64 {
        self.fully_correct as f64 / self.samples.max(1) as f64
    }

    /// Count one judged image of a scene of `kind`.
    pub fn add(&mut self, kind: &str, v: &judge::Verdict) {
        self.samples += 1;
        self.fully_correct += v.correct as usize;
        let k = self.kinds.entry(kind.into()).or_default();
        k.0 += v.correct as usize;
        k.1 += 1;
        for (name, x) in [
            ("colour", v.colour),
            ("shape", v.shape),
            ("size", v.size),
            ("position", v.position),
            ("count", v.count),
            ("relation", v.relation),
        ] {
            if let Some(ok) = x {
                let e = self.attributes.entry(name.into()).or_default();
                e.0 += ok as usize;
                e.1 += 1;
            }
        }
    }
}

/// Rows (images, twice with guidance) the evaluation samples at once through a [`Batcher`]:
/// each request still gets the image it gets alone (the batcher's contract, tested on every
/// runtime), in a fraction of the time of one image at a time.
pub const BATCH_ROWS: usize = 32;

/// How [`shapes`] samples: every guidance scale with the same token sampling and reranking.
#[derive(Clone, Debug)]
pub struct Sampling {
    pub params: dalle_runtimes::SamplingParams,
    pub rerank: usize,
    pub guidance: Vec<f32>,
}

/// Generate and judge `samples` scenes of each split at each guidance scale.
pub fn shapes(
    gen: &Arc<Generator>,
    samples: usize,
    sampling: &Sampling,
    progress: &mut dyn FnMut(&str),
) -> Result<Vec<Score>, RuntimeError> {
    let size = gen.manifest().geometry.image_size as u32;
    let mut batcher = Batcher::new(gen.clone(), BatcherOptions::new(BATCH_ROWS, samples.max(1)));
    let mut scores = vec![];
    for split in [Split::Train, Split::Heldout] {
        let name = split_name(split);
        let scenes: Vec<_> = (0..samples)
            .map(|i| generate_one(EVAL_SEED, split, i as u64, size))
            .collect();
        for &g in &sampling.guidance {
            let requests = scenes.iter().enumerate().map(|(i, s)| Request {
                params: sampling.params,
                ..Request::new(s.caption.clone())
                    .seed(i as u64)
                    .guidance_scale(g)
                    .rerank(sampling.rerank)
            });
            let outputs = generate_all(&batcher, requests)?;
            let mut score = Score {
                split: name.into(),
                guidance_scale: g,
                ..Default::default()
            };
            for (s, out) in scenes.iter().zip(outputs) {
                let img = &out.images[0];
                let img = image::RgbImage::from_raw(img.width, img.height, img.rgb.clone())
                    .expect("3 bytes a pixel");
                score.add(&s.scene.kind, &judge::judge(&s.scene, &judge::detect(&img)));
                if score.examples.len() < EXAMPLES {
                    score.examples.push((s.caption.clone(), img));
                }
            }
            progress(&format!(
                "{name}, guidance {g}: {}/{} fully correct",
                score.fully_correct, score.samples
            ));
            scores.push(score);
        }
    }
    batcher.shutdown();
    Ok(scores)
}

/// Every request's output, in request order: all queued at once, sampled together.
fn generate_all(
    batcher: &Batcher,
    requests: impl Iterator<Item = Request>,
) -> Result<Vec<Output>, RuntimeError> {
    let (tx, rx) = std::sync::mpsc::channel();
    let mut tickets = vec![];
    for (i, req) in requests.enumerate() {
        let tx = tx.clone();
        let ticket = batcher
            .submit(&req, move |out| {
                // The receiver lives until every reply has come or an error ended the wait.
                let _ = tx.send((i, out));
            })
            .map_err(|e| match e {
                SubmitError::Request(e) => e,
                e => RuntimeError::Request(e.to_string()),
            })?;
        tickets.push(ticket);
    }
    // Each reply closure holds a sender: once every request has replied or been dropped by the
    // batcher, the channel ends instead of waiting forever.
    drop(tx);
    let mut outputs: Vec<Option<Output>> = (0..tickets.len()).map(|_| None).collect();
    for (i, out) in rx {
        outputs[i] = Some(out?);
    }
    outputs
        .into_iter()
        .enumerate()
        .map(|(i, o)| {
            o.ok_or_else(|| {
                RuntimeError::Request(format!("request {i} of the evaluation got no images"))
            })
        })
        .collect()
}

/// The judge on ground-truth renders of the same scenes: the ceiling of [`shapes`].
pub fn ground_truth(samples: usize, size: u32) -> Vec<Score> {
    [Split::Train, Split::Heldout]
        .iter()
        .map(|&split| {
            let mut score = Score {
                split: if split == Split::Train {
                    "seen"
                } else {
                    "held-out"
                }
                .into(),
                guidance_scale: f32::NAN,
                ..Default::default()
            };
            for i in 0..samples {
                let s = generate_one(EVAL_SEED, split, i as u64, size);
                score.add(
                    &s.scene.kind,
                    &judge::judge(&s.scene, &judge::detect(&s.image)),
                );
            }
            score
        })
        .collect()
}

/// The model's dVAE round trip (encode → argmax tokens → decode) on the ground-truth renders of
/// both splits: the mean PSNR (dB) over the held-out renders, and the judge's scores of the
/// decoded images, the ceiling stage 1 puts on [`shapes`].
pub fn dvae_round_trip(gen: &Generator, samples: usize) -> Result<(f64, Vec<Score>), RuntimeError> {
    let size = gen.manifest().geometry.image_size;
    let mut total = 0.0;
    let mut scores = vec![];
    for split in [Split::Train, Split::Heldout] {
        let mut score = Score {
            split: split_name(split).into(),
            guidance_scale: f32::NAN,
            ..Default::default()
        };
        for i in 0..samples {
            let s = generate_one(EVAL_SEED, split, i as u64, size as u32);
            let pixels = planar(&s.image);
            let codes = gen.session().encode(&pixels, 1)?;
            let back = gen.session().decode(&codes, 1)?;
            if split == Split::Heldout {
                let mse = pixels
                    .iter()
                    .zip(&back)
                    .map(|(a, b)| ((a - b) as f64).powi(2))
                    .sum::<f64>()
                    / pixels.len() as f64;
                total += crate::util::psnr_db(mse);
            }
            let img = &dalle_runtimes::generator::to_images(&back, 1, size)[0];
            let img = image::RgbImage::from_raw(img.width, img.height, img.rgb.clone())
                .expect("3 bytes a pixel");
            score.add(&s.scene.kind, &judge::judge(&s.scene, &judge::detect(&img)));
        }
        scores.push(score);
    }
    Ok((total / samples.max(1) as f64, scores))
}

/// Binding by likelihood on one split: over its relation scenes, how often the transformer
/// gives the true render's codes a higher log-likelihood under the caption than the render with
/// the two objects' colours (or shapes) swapped, and by how much on average. Teacher-forced, no
/// sampling: a model that has not bound the attributes to their objects scores about half.
#[derive(Clone, Debug, Default, serde::Serialize)]
pub struct Binding {
    pub split: String,
    /// Relation scenes among the split's first `samples`.
    pub scenes: usize,
    /// Of those, how many the true render wins.
    pub preferred: usize,
    /// Mean of log p(true codes | caption) − log p(swapped codes | caption), nats.
    pub mean_margin: f64,
}

/// Σ log p(codes | caption) over the image positions, teacher-forced (image logits only);
/// `text` is the caption's `text_len` unified ids ([`Generator::caption`]).
fn image_log_likelihood(gen: &Generator, text: &[u32], codes: &[i64]) -> Result<f64, RuntimeError> {
    let m = gen.manifest();
    let layout = m.token_layout();
    let mut ids: Vec<i64> = text.iter().map(|&t| t as i64).collect();
    ids.extend(codes.iter().map(|&c| c + layout.image_offset() as i64));
    let inputs = &ids[..ids.len() - 1];
    let mut cache = dalle_runtimes::KvCache::new(m, 1);
    let logits = gen.session().forward(inputs, 1, &mut cache)?;
    let vocab = layout.vocab_size();
    let image = layout.image_offset()..layout.image_offset() + layout.codebook;
    let text_len = text.len();
    Ok(codes
        .iter()
        .enumerate()
        .map(|(j, &c)| {
            let row = &logits[(text_len - 1 + j) * vocab..][..vocab];
            dalle_runtimes::generator::log_prob(&row[image.clone()], c as usize)
        })
        .sum())
}

/// [`Binding`] on both splits' first `samples` eval scenes (their relation scenes).
pub fn binding(gen: &Generator, samples: usize) -> Result<Vec<Binding>, RuntimeError> {
    let size = gen.manifest().geometry.image_size;
    let codes = |img: &image::RgbImage| gen.session().encode(&planar(img), 1);
    let mut out = vec![];
    for split in [Split::Train, Split::Heldout] {
        let mut b = Binding {
            split: split_name(split).into(),
            ..Default::default()
        };
        let mut total = 0.0;
        for i in 0..samples {
            let (s, swapped) =
                crate::data::shapes::generate_swapped(EVAL_SEED, split, i as u64, size as u32);
            let Some(swapped) = swapped else { continue };
            let (text, _) = gen.caption(&s.caption)?;
            let margin = image_log_likelihood(gen, &text, &codes(&s.image)?)?
                - image_log_likelihood(gen, &text, &codes(&swapped)?)?;
            b.scenes += 1;
            b.preferred += (margin > 0.0) as usize;
            total += margin;
        }
        b.mean_margin = total / b.scenes.max(1) as f64;
        out.push(b);
    }
    Ok(out)
}

/// An RGB image as the runtimes' planar `[3, h, w]` pixels in [0, 1].
fn planar(img: &image::RgbImage) -> Vec<f32> {
    let plane = (img.width() * img.height()) as usize;
    let mut pixels = vec![0f32; 3 * plane];
    for (p, px) in img.pixels().enumerate() {
        for c in 0..3 {
            pixels[c * plane + p] = px[c] as f32 / 255.0;
        }
    }
    pixels
}

fn split_name(split: Split) -> &'static str {
    if split == Split::Train {
        "seen"
    } else {
        "held-out"
    }
}

/// One row per score of its examples; rows of held-out scenes framed in red.
pub fn example_grid(scores: &[&Score]) -> image::RgbImage {
    let mut tiles = vec![];
    let cols = scores.iter().map(|s| s.examples.len()).max().unwrap_or(0);
    for s in scores {
        for i in 0..cols {
            let mut img = match s.examples.get(i) {
                Some((_, img)) => img.clone(),
                None => match s.examples.first() {
                    Some((_, first)) => image::RgbImage::from_pixel(
                        first.width(),
                        first.height(),
                        image::Rgb([255; 3]),
                    ),
                    None => continue,
                },
            };
            if s.split == "held-out" && i < s.examples.len() {
                let (w, h) = img.dimensions();
                for (x, y, px) in img.enumerate_pixels_mut() {
                    if x < 2 || y < 2 || x + 2 >= w || y + 2 >= h {
                        *px = image::Rgb([230, 0, 0]);
                    }
                }
            }
            tiles.push(img);
        }
    }
    crate::plot::grid(&tiles, cols.max(1))
}
