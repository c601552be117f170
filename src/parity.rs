//! `dalle parity`: do several runtimes give the same answers on one model directory?
//! Teacher-forced logits over a whole sequence, greedy tokens of a fixed prompt and the images
//! decoded from them, each runtime against the first one named.

use dalle_runtimes::{Generator, KvCache, Request, RuntimeError};
use serde::Serialize;

/// fp32 logits of two runtimes, teacher-forced over a full sequence (DESIGN.md "Parity").
pub const LOGITS_TOL: f32 = 1e-4;
/// Decoded pixels in [0, 1].
pub const IMAGE_TOL: f32 = 1e-4;

/// One runtime compared with the reference.
#[derive(Clone, Debug, Serialize)]
pub struct Row {
    pub reference: String,
    pub runtime: String,
    pub logits_max_abs_diff: f32,
    pub greedy_tokens_identical: bool,
    pub image_max_abs_diff: f32,
    pub pass: bool,
}

fn max_abs_diff(a: &[f32], b: &[f32]) -> f32 {
    if a.len() != b.len() {
        return f32::INFINITY;
    }
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

/// A fixed batch of 2 full sequences: caption ids then image ids, spread over the vocabulary.
fn probe_ids(g: &Generator) -> Vec<i64> {
    let m = g.manifest();
    let l = m.token_layout();
    let s = m.max_seq();
    (0..2 * s)
        .map(|i| {
            let p = i % s;
            if p < l.text_len {
                ((i * 37 + 11) % (l.text_vocab + l.text_len)) as i64
            } else {
                l.image(((i * 53 + 7) % l.codebook) as u32) as i64
            }
        })
        .collect()
}

struct Probe {
    logits: Vec<f32>,
    codes: Vec<i64>,
}

fn probe(g: &Generator, prompt: &str) -> Result<Probe, RuntimeError> {
    let ids = probe_ids(g);
    let mut cache = KvCache::new(g.manifest(), 2);
    let logits = g.session().forward(&ids, 2, &mut cache)?;
    let out = g.generate(&Request::new(prompt).num_images(2).temperature(0.0))?;
    let codes = out.codes.iter().flatten().map(|&c| c as i64).collect();
    Ok(Probe { logits, codes })
}

/// Compare `generators[1..]` with `generators[0]`.
pub fn compare(generators: &[Generator], prompt: &str) -> Result<Vec<Row>, RuntimeError> {
    let reference = &generators[0];
    let want = probe(reference, prompt)?;
    let want_pixels = reference.session().decode(&want.codes, 2)?;
    let mut rows = vec![];
    for g in &generators[1..] {
        let got = probe(g, prompt)?;
        let pixels = g.session().decode(&want.codes, 2)?;
        let logits = max_abs_diff(&got.logits, &want.logits);
        let image = max_abs_diff(&pixels, &want_pixels);
        let same = got.codes == want.codes;
        rows.push(Row {
            reference: reference.session().name().into(),
            runtime: g.session().name().into(),
            logits_max_abs_diff: logits,
            greedy_tokens_identical: same,
            image_max_abs_diff: image,
            pass: logits <= LOGITS_TOL && image <= IMAGE_TOL && same,
        });
    }
    Ok(rows)
}
