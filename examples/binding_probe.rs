//! How many captions does the `shapes` transformer need to learn attribute binding, with the
//! image reduced to the four decisions binding is about?
//!
//! The "image" is a 2 × 2 grid: the colour and the shape of the object that comes first in
//! raster order, then the other object's colour and shape. Scenes are the benchmark's relation
//! scenes, drawn fresh for every update (no scene is seen twice). Reports teacher-forced argmax
//! accuracy of each of the four on 512 other scenes (256 at grid 24), every `log` updates.
//!
//! With `grid` 6 instead of 2, the objects sit in their cells of the 3 × 3 layout, 2 × 2 tokens
//! each (colour at the top left, shape in the other three) on a background code: where the first
//! object starts is then uncertain too, and most of the loss is background, as in an image.
//!
//! With `grid` 24 (the 96-px preset's own grid), each object is 3 × 3 tokens at a random offset
//! inside its 8 × 8 layout cell (colour at the top left, shape in the other eight); with 12 (an
//! f8 token grid of a 96-px image), 2 × 2 tokens inside a 4 × 4 cell. Accuracies are then the
//! argmax *among the colour (shape) codes* at each decision: which object, given where — the
//! binding question — while the whole grid, masks and all, is the real one.
//! `conv` sets the last layer's window (49 covers the whole grid: dense causal attention).
//! `object_weight` multiplies the loss of every target that is not the background code (1: the
//! paper's mean over positions), to ask whether binding is slow for want of gradient: a 3 × 3
//! object is 9 of 576 targets.
//!
//! cargo run --release --example binding_probe -- <tokenizer.json> <updates> [lr] [init.safetensors|-] [grid] [conv] [object_weight]

use candle_core::{DType, Device, Tensor};
use candle_nn::{VarBuilder, VarMap};
use dalle::data::shapes::{caption, sample_scene, Scene, Split, COLOURS, SHAPES};
use dalle::rng::Rng;
use dalle::train::optim::AdamW;
use dalle::transformer::model::init_value;
use dalle::transformer::Transformer;
use dalle::Config;
use dalle_runtimes::TokenLayout;

fn relation_scene(rng: &mut Rng) -> Scene {
    loop {
        let s = sample_scene(rng, Split::Train);
        if s.kind == "relation" {
            return s;
        }
    }
}

/// Codes: colours 0‥8, shapes 8‥14, background 20; the first object in raster order (cell
/// row, then column). Returns the grid's codes and the four decisions' positions (colour and
/// first shape token of each object, in raster order).
fn codes(s: &Scene, grid: usize, jitter: &[usize]) -> (Vec<u32>, [usize; 4]) {
    let mut o: Vec<_> = s.objects.iter().collect();
    o.sort_by_key(|o| (o.row, o.col));
    let c = |x: &str| COLOURS.iter().position(|c| c.0 == x).unwrap() as u32;
    let h = |x: &str| 8 + SHAPES.iter().position(|s| *s == x).unwrap() as u32;
    if grid == 2 {
        let v = vec![
            c(&o[0].colour),
            h(&o[0].shape),
            c(&o[1].colour),
            h(&o[1].shape),
        ];
        return (v, [0, 1, 2, 3]);
    }
    let mut v = vec![20; grid * grid];
    let mut at = [0; 4];
    // Grid 6: 2 × 2 tokens filling the object's cell; 12 and 24: 2 × 2 or 3 × 3 tokens at an
    // offset inside a 4 × 4 or 8 × 8 cell.
    let side = side(grid);
    for (i, ob) in o.iter().enumerate() {
        let cell = grid / 3;
        let (r, q) = (
            cell * ob.row + jitter[2 * i],
            cell * ob.col + jitter[2 * i + 1],
        );
        let p = r * grid + q;
        for dr in 0..side {
            for dc in 0..side {
                v[p + dr * grid + dc] = h(&ob.shape);
            }
        }
        v[p] = c(&ob.colour);
        at[2 * i] = p;
        at[2 * i + 1] = p + 1;
    }
    (v, at)
}

/// One scene's codes and the positions of its four decisions.
type Targets = (Vec<u32>, [usize; 4]);

/// Side of an object in tokens: 3 × 3 at grid 24, else 2 × 2.
fn side(grid: usize) -> usize {
    if grid == 24 {
        3
    } else {
        2
    }
}

/// Each object's offset (rows, columns) inside its layout cell: 0 at grid 6, 0‥2 at 12, 0‥5 at 24.
fn jitters(rng: &mut Rng, grid: usize) -> Vec<usize> {
    (0..4)
        .map(|_| rng.below(grid / 3 - side(grid) + 1))
        .collect()
}

fn batch(
    scenes: &[Scene],
    rng: &mut Rng,
    tok: &tokenizers::Tokenizer,
    layout: &TokenLayout,
    grid: usize,
) -> anyhow::Result<(Vec<u32>, Vec<Targets>)> {
    let mut ids = vec![];
    let mut targets = vec![];
    for s in scenes {
        let bpe = dalle::text::encode(tok, &caption(s, rng))?;
        let (caption, _) = layout.caption(&bpe).map_err(|id| {
            anyhow::anyhow!("the tokenizer gave id {id}, outside the text vocabulary")
        })?;
        ids.extend(caption);
        let jitter = if grid == 2 {
            vec![]
        } else {
            jitters(rng, grid)
        };
        let (v, at) = codes(s, grid, &jitter);
        ids.extend(v.iter().map(|&c| layout.image(c)));
        targets.push((v, at));
    }
    Ok((ids, targets))
}

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    if args.len() < 3 {
        anyhow::bail!(
            "usage: binding_probe <tokenizer.json> <updates> [lr] [init.safetensors|-] [grid 2|6]"
        );
    }
    let tok = dalle::text::load(std::path::Path::new(&args[1]))?;
    let updates: usize = args[2].parse()?;
    let lr_peak: f64 = args.get(3).map_or(Ok(1e-3), |s| s.parse())?;
    let mut cfg = Config::preset("shapes")?;
    let grid: usize = args.get(5).map_or(Ok(2), |s| s.parse())?;
    if ![2, 6, 12, 24].contains(&grid) {
        anyhow::bail!("grid {grid}: the probe lays its decisions out on a grid of 2, 6, 12 or 24");
    }
    cfg.geometry.grid = grid;
    if let Some(k) = args.get(6) {
        cfg.transformer.conv_kernel = k.parse()?;
    }
    let object_weight: f64 = args.get(7).map_or(Ok(1.0), |s| s.parse())?;
    let layout = TokenLayout::from(&cfg.geometry);
    let dev = Device::Cpu;
    let varmap = VarMap::new();
    let model = Transformer::new(&cfg, VarBuilder::from_varmap(&varmap, DType::F32, &dev))?;
    dalle::train::init_vars(&varmap, 0, init_value)?;
    if let Some(init) = args.get(4).filter(|a| *a != "-") {
        // Every tensor of the same shape from a trained run; the image position tables' first rows.
        let w = candle_core::safetensors::load(init, &dev)?;
        let mut n = 0;
        for (name, var) in dalle::train::named_vars(&varmap) {
            if let Some(t) = w.get(&name) {
                let t = t.to_dtype(DType::F32)?;
                let t = if t.dims() == var.dims() {
                    t
                } else {
                    t.narrow(0, 0, var.dims()[0])?
                };
                if t.dims() == var.dims() {
                    var.set(&t)?;
                    n += 1;
                }
            }
        }
        eprintln!("loaded {n} tensors from {init}");
    }
    let vars = dalle::train::named_vars(&varmap);
    // The paper's optimiser, as `dalle train` sets it up.
    let paper = dalle::transformer::train::TransformerTrainOptions::new(updates, 16, 0);
    let mut opt = AdamW::new(vars, paper.lp.adamw)?;
    let s = layout.text_len + grid * grid;
    let mut eval_rng = Rng::new(12345);
    let n_eval = if grid == 24 { 256 } else { 512 };
    let eval: Vec<Scene> = (0..n_eval).map(|_| relation_scene(&mut eval_rng)).collect();
    let (eval_ids, eval_targets) = batch(&eval, &mut eval_rng, &tok, &layout, grid)?;
    let eval_ids = Tensor::from_vec(eval_ids, (eval.len(), s), &dev)?;
    let mut rng = Rng::new(7);
    let b = 16;
    let start = std::time::Instant::now();
    for step in 1..=updates {
        let scenes: Vec<Scene> = (0..b).map(|_| relation_scene(&mut rng)).collect();
        let ids = Tensor::from_vec(
            batch(&scenes, &mut rng, &tok, &layout, grid)?.0,
            (b, s),
            &dev,
        )?;
        let (loss, image) = if object_weight == 1.0 {
            let (loss, _, image) = model.losses(&ids, true)?;
            (loss, image)
        } else {
            let (text, image) = model.position_nll(&ids, true)?;
            let codes = ids.narrow(1, layout.text_len, grid * grid)?;
            let background = Tensor::full(layout.image(20), codes.dims(), &dev)?;
            let w = codes
                .ne(&background)?
                .to_dtype(DType::F32)?
                .affine(object_weight - 1.0, 1.0)?;
            let weighted = (image.mul(&w)?.sum_all()? / w.sum_all()?.to_scalar::<f32>()? as f64)?;
            let loss = dalle::transformer::model::paper_total(&text.mean_all()?, &weighted)?;
            (loss, image.mean_all()?)
        };
        let warm = (step as f64 / 100.0).min(1.0);
        let lr = lr_peak * warm;
        opt.step(&loss.backward()?, lr, step)?;
        if step % 100 == 0 || step == updates {
            let off = layout.image_offset();
            // In chunks of 32 scenes: the dense last layer's scores of 256 at once take GBs.
            let mut chunks = vec![];
            for i in (0..eval.len()).step_by(32) {
                let ids = eval_ids.narrow(0, i, 32.min(eval.len() - i))?;
                let h = model.forward(&ids, None)?; // (n, s, vocab)
                                                    // Detached, so that the chunk's graph (every activation) is freed.
                chunks.push(
                    h.narrow(1, layout.text_len - 1, grid * grid)?
                        .narrow(2, off, layout.codebook)?
                        .detach()
                        .contiguous()?,
                );
            }
            let logits = Tensor::cat(&chunks, 0)?;
            // At grids 12 and 24: the argmax among the colour codes (0‥8) at a colour decision, among
            // the shape codes (8‥14) at a shape one.
            let among = |x: &[f32], lo: usize, hi: usize| {
                (lo..hi)
                    .max_by(|&a, &b| x[a].total_cmp(&x[b]))
                    .unwrap_or(lo) as u32
            };
            let logits = logits.to_vec3::<f32>()?;
            let mut right = [0usize; 4];
            let mut all = 0;
            for (l, (t, at)) in logits.iter().zip(&eval_targets) {
                let ok: Vec<bool> = at
                    .iter()
                    .enumerate()
                    .map(|(k, &i)| {
                        let p = match (grid, k % 2) {
                            (12 | 24, 0) => among(&l[i], 0, 8),
                            (12 | 24, _) => among(&l[i], 8, 8 + SHAPES.len()),
                            _ => among(&l[i], 0, l[i].len()),
                        };
                        p == t[i]
                    })
                    .collect();
                for i in 0..4 {
                    right[i] += ok[i] as usize;
                }
                all += ok.iter().all(|&x| x) as usize;
            }
            let pc = |n: usize| 100.0 * n as f64 / eval.len() as f64;
            println!(
                "{step:6} {:6.1}s image loss {:.3}  colour1 {:5.1}% shape1 {:5.1}% colour2 {:5.1}% shape2 {:5.1}%  all {:5.1}%",
                start.elapsed().as_secs_f64(),
                image.to_scalar::<f32>()?,
                pc(right[0]),
                pc(right[1]),
                pc(right[2]),
                pc(right[3]),
                pc(all)
            );
        }
    }
    Ok(())
}
