//! How many captions does the `shapes` transformer need to learn attribute binding, with the
//! image reduced to the four decisions binding is about?
//!
//! The "image" is a 2 × 2 grid: the colour and the shape of the object that comes first in
//! raster order, then the other object's colour and shape. Scenes are the benchmark's relation
//! scenes, drawn fresh for every update (no scene is seen twice). Reports teacher-forced argmax
//! accuracy of each of the four on 512 other scenes, every `log` updates.
//!
//! With `grid` 6 instead of 2, the objects sit in their cells of the 3 × 3 layout, 2 × 2 tokens
//! each (colour at the top left, shape in the other three) on a background code: where the first
//! object starts is then uncertain too, and most of the loss is background, as in an image.
//!
//! cargo run --release --example binding_probe -- <tokenizer.json> <updates> [lr] [init.safetensors|-] [grid]

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
fn codes(s: &Scene, grid: usize) -> (Vec<u32>, [usize; 4]) {
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
    for (i, ob) in o.iter().enumerate() {
        let p = 2 * ob.row * grid + 2 * ob.col;
        v[p] = c(&ob.colour);
        for q in [p + 1, p + grid, p + grid + 1] {
            v[q] = h(&ob.shape);
        }
        at[2 * i] = p;
        at[2 * i + 1] = p + 1;
    }
    (v, at)
}

fn batch(
    scenes: &[Scene],
    rng: &mut Rng,
    tok: &tokenizers::Tokenizer,
    layout: &TokenLayout,
    grid: usize,
) -> anyhow::Result<Vec<u32>> {
    let mut ids = vec![];
    for s in scenes {
        let bpe = dalle::text::encode(tok, &caption(s, rng))?;
        let (caption, _) = layout.caption(&bpe).map_err(|id| {
            anyhow::anyhow!("the tokenizer gave id {id}, outside the text vocabulary")
        })?;
        ids.extend(caption);
        ids.extend(codes(s, grid).0.iter().map(|&c| layout.image(c)));
    }
    Ok(ids)
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
    if grid != 2 && grid != 6 {
        anyhow::bail!("grid {grid}: the probe lays its decisions out on a grid of 2 or 6");
    }
    cfg.geometry.grid = grid;
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
    let eval: Vec<Scene> = (0..512).map(|_| relation_scene(&mut eval_rng)).collect();
    let eval_ids = batch(&eval, &mut eval_rng, &tok, &layout, grid)?;
    let eval_ids = Tensor::from_vec(eval_ids, (eval.len(), s), &dev)?;
    let mut rng = Rng::new(7);
    let b = 16;
    let start = std::time::Instant::now();
    for step in 1..=updates {
        let scenes: Vec<Scene> = (0..b).map(|_| relation_scene(&mut rng)).collect();
        let ids = Tensor::from_vec(batch(&scenes, &mut rng, &tok, &layout, grid)?, (b, s), &dev)?;
        let (loss, _, image) = model.losses(&ids, true)?;
        let warm = (step as f64 / 100.0).min(1.0);
        let lr = lr_peak * warm;
        opt.step(&loss.backward()?, lr, step)?;
        if step % 200 == 0 || step == updates {
            let h = model.forward(&eval_ids, None)?; // (n, s, vocab)
            let off = layout.image_offset() as u32;
            let pred = h
                .narrow(1, layout.text_len - 1, grid * grid)?
                .narrow(2, off as usize, layout.codebook)?
                .argmax(2)?
                .to_vec2::<u32>()?;
            let mut right = [0usize; 4];
            let mut all = 0;
            for (p, scene) in pred.iter().zip(&eval) {
                let (t, at) = codes(scene, grid);
                let ok: Vec<bool> = at.iter().map(|&i| p[i] == t[i]).collect();
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
