//! The tract runtime (pure Rust, CPU): each graph is loaded once into an optimised plan with
//! symbolic batch / sequence / past dimensions and reused for every call.

use crate::session::{
    check_decode, check_encode, check_forward, host_to_capacity, regroup_buffers, take_for_regroup,
    write_rows, KvCache, RuntimeError, Session,
};
use crate::{names, Manifest};
use std::path::Path;
use std::sync::Arc;
use tract_onnx::prelude::multithread::{multithread_tract_scope, Executor};
use tract_onnx::prelude::{
    tvec, Framework, InferenceModelExt, IntoRunnable, IntoTValue, TValue, TVec, Tensor,
    TypedRunnableModel,
};

const NAME: &str = "tract";

fn err(message: impl std::fmt::Display) -> RuntimeError {
    RuntimeError::Run {
        runtime: NAME,
        message: message.to_string(),
    }
}

/// Load and optimise one graph. `widen`: the graph computes in f16 (`--fp16` export); tract's
/// f16 kernels on x86 are generic loops (a `small` dVAE decode took 197 s instead of 0.15 s), so
/// its f16 values and operations become f32 before optimising: the f16 weights, widened, in f32
/// arithmetic — what the candle runtime does with an f16 export on the CPU.
fn load(dir: &Path, file: &str, widen: bool) -> Result<Arc<TypedRunnableModel>, RuntimeError> {
    let fail = |e: tract_onnx::prelude::TractError| RuntimeError::Load {
        runtime: NAME,
        file: dir.join(file).display().to_string(),
        message: format!("{e:#}"),
    };
    let mut model = tract_onnx::onnx()
        .model_for_path(dir.join(file))
        .and_then(|m| m.into_typed())
        .map_err(fail)?;
    if widen {
        widen_f16(&mut model).map_err(fail)?;
    }
    rows::replace_gathers(&mut model);
    model
        .into_optimized()
        .and_then(|m| m.into_runnable())
        .map_err(fail)
}

/// The transformer's per-row reads of its KV cache, `GatherND` with two batch dimensions and
/// single positions (`out[b, h, s] = cache[b, h, index[b, h, s, 0]]`, one head-width row each):
/// tract's own `GatherND` walks `ndarray` views per index, 15% of a batch-16 step of `small`
/// (session 19 profile); this op copies the rows with slice copies.
mod rows {
    use tract_onnx::tract_core::internal::*;
    use tract_onnx::tract_core::ops::array::GatherNd;
    use tract_onnx::tract_core::{as_op, op_as_typed_op, op_out_of_plan};

    #[derive(Debug, Clone, Hash, PartialEq, Eq)]
    pub struct GatherRows;

    impl Op for GatherRows {
        fn name(&self) -> StaticName {
            "DalleGatherRows".into()
        }

        op_as_typed_op!();
    }

    impl EvalOp for GatherRows {
        op_out_of_plan!();

        fn eval(&self, _ctx: &EvalContext, inputs: TVec<TValue>) -> TractResult<TVec<TValue>> {
            let (data, index) = args_2!(inputs);
            let &[b, h, cap, hd] = data.shape() else {
                bail!("DalleGatherRows: data of rank {}, not 4", data.rank());
            };
            let index = index.cast_to::<i64>()?;
            let index = index.try_as_plain_ram()?;
            let index = index.as_slice::<i64>()?;
            let data = data.try_as_plain_ram()?;
            let data = data.as_slice::<f32>()?;
            let per = index.len() / (b * h).max(1);
            ensure!(
                index.len() == b * h * per,
                "DalleGatherRows: {} positions for {b} × {h} heads",
                index.len()
            );
            if let Some(p) = index.iter().find(|p| !(0..cap as i64).contains(p)) {
                bail!("DalleGatherRows: position {p} outside 0..{cap}");
            }
            // SAFETY: f32 has no invalid bit patterns, and the loop below writes every element
            // (b·h·per rows of hd, the positions checked above) before the tensor is read.
            // Written in place: a zeroed Vec copied into a tensor cost a memset and a second
            // copy of every row, 7% of a 96-px cold start.
            let mut out = unsafe { Tensor::uninitialized::<f32>(&[b, h, per, hd])? };
            {
                let mut view = out.try_as_plain_ram_mut()?;
                let out = view.as_slice_mut::<f32>()?;
                for (bh, (rows, out)) in index
                    .chunks(per.max(1))
                    .zip(out.chunks_mut((per * hd).max(1)))
                    .enumerate()
                {
                    for (&p, o) in rows.iter().zip(out.chunks_mut(hd)) {
                        o.copy_from_slice(&data[(bh * cap + p as usize) * hd..][..hd]);
                    }
                }
            }
            Ok(tvec!(out.into_tvalue()))
        }
    }

    impl TypedOp for GatherRows {
        fn output_facts(&self, inputs: &[&TypedFact]) -> TractResult<TVec<TypedFact>> {
            let (d, i) = (inputs[0].shape.to_tvec(), inputs[1].shape.to_tvec());
            ensure!(d.len() == 4 && i.len() == 4);
            let shape = [d[0].clone(), d[1].clone(), i[2].clone(), d[3].clone()];
            Ok(tvec!(f32::fact(shape)))
        }

        as_op!();
    }

    /// Every f32 `GatherND` of that form in `model` becomes a [`GatherRows`].
    pub fn replace_gathers(model: &mut TypedModel) {
        for id in 0..model.nodes.len() {
            let node = &model.nodes[id];
            let fits = node.op_as::<GatherNd>().is_some_and(|g| g.batch_dims == 2)
                && node.inputs.len() == 2
                && model.outlet_fact(node.inputs[0]).is_ok_and(|f| {
                    f.datum_type == f32::datum_type() && f.rank() == 4 && f.is_plain()
                })
                && model
                    .outlet_fact(node.inputs[1])
                    .is_ok_and(|f| f.rank() == 4 && f.shape[3] == TDim::from(1));
            if fits {
                model.nodes[id].op = Box::new(GatherRows);
            }
        }
    }
}

/// An f16 graph as an f32 one: the constants widened in place first (left to the translator,
/// each would be a `Cast` node, and tract does not fold those of large shared weights: the
/// `small` preset's step then widened its 44M weights every step, 17 ms instead of 9–10), then
/// every f16 operation and value made f32.
fn widen_f16(model: &mut tract_onnx::prelude::TypedModel) -> tract_onnx::prelude::TractResult<()> {
    use tract_onnx::prelude::{f16, Datum, IntoArcTensor, TypedFact};
    use tract_onnx::tract_core::ops::konst::Const;
    use tract_onnx::tract_core::{floats::FloatPrecisionTranslator, transform::ModelTransform};
    for node in &mut model.nodes {
        let Some(k) = node.op_as::<Const>() else {
            continue;
        };
        if k.val().datum_type() != f16::datum_type() {
            continue;
        }
        let wide = k.val().cast_to::<f32>()?.into_owned().into_arc_tensor();
        node.outputs[0].fact = TypedFact::try_from(wide.clone())?;
        node.op = Box::new(Const::new(wide)?);
    }
    FloatPrecisionTranslator::new(f16::datum_type(), f32::datum_type()).transform(model)
}

/// Keys and values, layer after layer, in the graph's fixed-capacity layout `[batch, heads,
/// max_seq, head_dim]`: lent to tract (shared, not copied) every step, then each step's
/// `present` (only the new positions) written into them in place.
struct TractKv(Vec<Arc<Tensor>>);

pub struct TractSession {
    manifest: Manifest,
    /// A rayon pool of one thread per core for tract's matmuls (tract runs them on the calling
    /// thread unless told otherwise); scoped to this session's calls, not set process-wide.
    executor: Executor,
    encoder: Arc<TypedRunnableModel>,
    decoder: Arc<TypedRunnableModel>,
    transformer: Arc<TypedRunnableModel>,
}

impl TractSession {
    /// Open a model directory whose manifest has been loaded (and verified) already.
    pub fn open(dir: &Path, manifest: Manifest) -> Result<Self, RuntimeError> {
        let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
        let widen = manifest.dtype == crate::Dtype::F16;
        Ok(TractSession {
            executor: Executor::multithread_with_name(threads, "dalle-tract"),
            encoder: load(dir, names::DVAE_ENCODER, widen)?,
            decoder: load(dir, names::DVAE_DECODER, widen)?,
            transformer: load(dir, names::TRANSFORMER, widen)?,
            manifest,
        })
    }
}

fn tensor<T: tract_onnx::prelude::Datum + Copy>(
    dims: &[usize],
    data: &[T],
) -> Result<TValue, RuntimeError> {
    Ok(Tensor::from_shape(dims, data).map_err(err)?.into_tvalue())
}

fn values<T: tract_onnx::prelude::Datum + Copy>(v: &TValue) -> Result<Vec<T>, RuntimeError> {
    // Outputs are plain and contiguous: one memcpy, not an element-wise walk of a view.
    let view = v.to_plain_array_view::<T>().map_err(err)?;
    Ok(match view.as_slice() {
        Some(s) => s.to_vec(),
        None => view.iter().copied().collect(),
    })
}

/// Host buffers in the capacity layout as tract tensors `[b, h, cap, hd]`.
fn buffers(
    data: Vec<Vec<f32>>,
    b: usize,
    h: usize,
    cap: usize,
    hd: usize,
) -> Result<Vec<Arc<Tensor>>, RuntimeError> {
    data.into_iter()
        .map(|d| {
            let t = tract_onnx::prelude::tract_ndarray::Array4::from_shape_vec((b, h, cap, hd), d)
                .map_err(err)?;
            Ok(Arc::new(Tensor::from(t)))
        })
        .collect()
}

impl TractSession {
    fn run(
        &self,
        plan: &Arc<TypedRunnableModel>,
        inputs: TVec<TValue>,
    ) -> Result<TVec<TValue>, RuntimeError> {
        multithread_tract_scope(self.executor.clone(), || plan.run(inputs)).map_err(err)
    }
}

impl Session for TractSession {
    fn name(&self) -> &'static str {
        NAME
    }

    fn manifest(&self) -> &Manifest {
        &self.manifest
    }

    fn forward(
        &self,
        ids: &[i64],
        batch: usize,
        cache: &mut KvCache,
    ) -> Result<Vec<f32>, RuntimeError> {
        let t = check_forward(&self.manifest, ids, batch, cache)?;
        let cap = self.manifest.max_seq();
        let (h, hd) = (cache.heads, cache.head_dim);
        // A cloned cache shares the tensors; `Arc::make_mut` below copies them on write.
        let mut kv = match cache.take_native_as(NAME, |kv: &TractKv| Ok(TractKv(kv.0.clone())))? {
            Some(kv) => kv,
            None => TractKv(buffers(host_to_capacity(cache, cap)?, batch, h, cap, hd)?),
        };
        let past: Vec<i64> = cache.lens.iter().map(|&l| l as i64).collect();
        let mut inputs: TVec<TValue> = tvec![tensor(&[batch, t], ids)?, tensor(&[batch], &past)?];
        inputs.extend(kv.0.iter().map(|k| TValue::from_const(k.clone())));
        let out = self.run(&self.transformer, inputs)?;
        let logits = values(&out[0])?;
        // tract dropped its references with the run's state: the writes below are in place.
        for (buffer, present) in kv.0.iter_mut().zip(out.iter().skip(1)) {
            let new = present.to_plain_array_view::<f32>().map_err(err)?;
            let new = new
                .as_slice()
                .ok_or_else(|| err("a `present` output is not contiguous"))?;
            let mut buffer = Arc::make_mut(buffer)
                .to_plain_array_view_mut::<f32>()
                .map_err(err)?;
            let buffer = buffer
                .as_slice_mut()
                .ok_or_else(|| err("a KV buffer is not contiguous"))?;
            write_rows(buffer, new, batch * h, cap, hd, &cache.lens, t);
        }
        drop(out);
        cache.set_native(NAME, Arc::new(kv));
        cache.advance(t);
        Ok(logits)
    }

    fn regroup(
        &self,
        mut parts: Vec<KvCache>,
        picks: &[(usize, usize)],
    ) -> Result<KvCache, RuntimeError> {
        let (lens, held) = take_for_regroup(NAME, &mut parts, picks, |kv: &TractKv| {
            Ok(TractKv(kv.0.clone()))
        })?;
        let cap = self.manifest.max_seq();
        let mut out = KvCache::new(&self.manifest, picks.len());
        let (h, hd) = (out.heads, out.head_dim);
        let plain: Vec<Vec<_>> = held
            .iter()
            .map(|kv| {
                kv.iter()
                    .flat_map(|kv| kv.0.iter())
                    .map(|t| t.to_plain_array_view::<f32>().map_err(err))
                    .collect::<Result<_, _>>()
            })
            .collect::<Result<_, _>>()?;
        let views: Vec<Vec<&[f32]>> = plain
            .iter()
            .map(|part| {
                part.iter()
                    .map(|v| {
                        v.as_slice()
                            .ok_or_else(|| err("a KV buffer is not contiguous"))
                    })
                    .collect::<Result<_, _>>()
            })
            .collect::<Result<_, _>>()?;
        let n = 2 * self.manifest.transformer.n_layers;
        let data = regroup_buffers(&views, n, h * cap * hd, picks);
        out.set_native(
            NAME,
            Arc::new(TractKv(buffers(data, picks.len(), h, cap, hd)?)),
        );
        out.lens = lens;
        Ok(out)
    }

    fn decode(&self, tokens: &[i64], batch: usize) -> Result<Vec<f32>, RuntimeError> {
        let n = check_decode(&self.manifest, tokens, batch)?;
        let out = self.run(&self.decoder, tvec![tensor(&[batch, n], tokens)?])?;
        values(&out[0])
    }

    fn encode(&self, pixels: &[f32], batch: usize) -> Result<Vec<i64>, RuntimeError> {
        check_encode(&self.manifest, pixels, batch)?;
        let s = self.manifest.geometry.image_size;
        let out = self.run(&self.encoder, tvec![tensor(&[batch, 3, s, s], pixels)?])?;
        values(&out[0])
    }
}
