//! A small ONNX graph builder over the prost types of `tract_onnx::pb`.
//!
//! Node names read like a module path (`/model/layers.0/attn/qkv/MatMul`), outputs are the node
//! name plus `_output_0` (the HF optimum convention), initialisers keep the checkpoint's tensor
//! names, and constants created by the builder are stored once however often they are asked for.

use crate::{ExportError, Weight, Weights};
use dalle_runtimes::Dtype;
use prost::Message;
use std::collections::{BTreeSet, HashMap};
use std::path::Path;
use tract_onnx::pb::{
    self, attribute_proto::AttributeType, tensor_proto::DataLocation, tensor_proto::DataType,
    tensor_shape_proto::dimension, type_proto, AttributeProto, GraphProto, ModelProto, NodeProto,
    OperatorSetIdProto, StringStringEntryProto, TensorProto, TensorShapeProto, TypeProto,
    ValueInfoProto,
};

/// Opsets the exporter writes (every op it uses has the same semantics across them).
pub const OPSETS: std::ops::RangeInclusive<i64> = 17..=21;

/// The ONNX IR version that goes with an opset (onnx/helper.py's VERSION_TABLE).
fn ir_version(opset: i64) -> i64 {
    match opset {
        ..=18 => 8,
        19..=20 => 9,
        _ => 10,
    }
}

/// Tensors at least this large move to the external data file when a graph goes external.
const EXTERNAL_MIN_BYTES: usize = 1024;

/// One dimension of a graph input or output.
#[derive(Clone, Debug)]
pub enum Dim {
    Fixed(usize),
    Named(&'static str),
}

/// Element types crossing the graph boundary or used inside.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Elem {
    F32,
    F16,
    I64,
}

impl Elem {
    fn proto(self) -> i32 {
        match self {
            Elem::F32 => DataType::Float as i32,
            Elem::F16 => DataType::Float16 as i32,
            Elem::I64 => DataType::Int64 as i32,
        }
    }
}

impl From<Dtype> for Elem {
    fn from(d: Dtype) -> Self {
        match d {
            Dtype::F32 => Elem::F32,
            Dtype::F16 => Elem::F16,
        }
    }
}

/// An attribute value for [`Graph::op`].
pub enum Attr {
    Int(i64),
    Ints(Vec<i64>),
    Float(f32),
}

fn attribute(name: &str, value: Attr) -> AttributeProto {
    let mut a = AttributeProto {
        name: name.into(),
        ..Default::default()
    };
    match value {
        Attr::Int(i) => {
            a.r#type = AttributeType::Int as i32;
            a.i = i;
        }
        Attr::Ints(v) => {
            a.r#type = AttributeType::Ints as i32;
            a.ints = v;
        }
        Attr::Float(f) => {
            a.r#type = AttributeType::Float as i32;
            a.f = f;
        }
    }
    a
}

fn value_info(name: &str, elem: Elem, dims: &[Dim]) -> ValueInfoProto {
    let dim = dims
        .iter()
        .map(|d| pb::tensor_shape_proto::Dimension {
            denotation: String::new(),
            value: Some(match d {
                Dim::Fixed(n) => dimension::Value::DimValue(*n as i64),
                Dim::Named(s) => dimension::Value::DimParam((*s).into()),
            }),
        })
        .collect();
    ValueInfoProto {
        name: name.into(),
        r#type: Some(TypeProto {
            denotation: String::new(),
            value: Some(type_proto::Value::TensorType(type_proto::Tensor {
                elem_type: elem.proto(),
                shape: Some(TensorShapeProto { dim }),
            })),
        }),
        doc_string: String::new(),
    }
}

/// Builds one graph. Weights are taken from one checkpoint by name; asking for a name the
/// checkpoint lacks, with another shape, or leaving one of its tensors unused is an error that
/// names the tensor.
pub struct Graph<'w> {
    /// Element type of weights and computation.
    pub dtype: Elem,
    source: String,
    weights: &'w Weights,
    used: BTreeSet<String>,
    nodes: Vec<NodeProto>,
    initializers: Vec<TensorProto>,
    inputs: Vec<ValueInfoProto>,
    outputs: Vec<ValueInfoProto>,
    value_info: Vec<ValueInfoProto>,
    constants: HashMap<(i32, Vec<i64>, Vec<u8>), String>,
    scope: Vec<String>,
    node_names: HashMap<String, usize>,
}

impl<'w> Graph<'w> {
    /// `source` names the checkpoint in error messages.
    pub fn new(dtype: Dtype, source: &str, weights: &'w Weights) -> Self {
        Graph {
            dtype: dtype.into(),
            source: source.into(),
            weights,
            used: BTreeSet::new(),
            nodes: vec![],
            initializers: vec![],
            inputs: vec![],
            outputs: vec![],
            value_info: vec![],
            constants: HashMap::new(),
            scope: vec![],
            node_names: HashMap::new(),
        }
    }

    pub fn input(&mut self, name: &str, elem: Elem, dims: &[Dim]) -> String {
        self.inputs.push(value_info(name, elem, dims));
        name.into()
    }

    /// Declare `name` (already produced by a node) a graph output.
    pub fn output(&mut self, name: &str, elem: Elem, dims: &[Dim]) {
        self.outputs.push(value_info(name, elem, dims));
    }

    /// Record the type and symbolic shape of an intermediate value.
    pub fn annotate(&mut self, name: &str, elem: Elem, dims: &[Dim]) {
        self.value_info.push(value_info(name, elem, dims));
    }

    /// Run `f` with `name` appended to the node-name scope.
    pub fn scoped<T>(&mut self, name: &str, f: impl FnOnce(&mut Self) -> T) -> T {
        self.scope.push(name.into());
        let r = f(self);
        self.scope.pop();
        r
    }

    fn node_name(&mut self, op: &str) -> String {
        let base = format!("{}/{op}", self.scope.join("/"));
        let n = self.node_names.entry(base.clone()).or_insert(0);
        *n += 1;
        if *n == 1 {
            base
        } else {
            format!("{base}_{}", *n - 1)
        }
    }

    /// Add a node; returns its (single) output's name.
    pub fn op(&mut self, op: &str, inputs: &[&str], attrs: Vec<(&str, Attr)>) -> String {
        let name = self.node_name(op);
        let out = format!("{name}_output_0");
        self.push_node(name, op, inputs, attrs, &out);
        out
    }

    /// Add a node whose output has a given name (a graph output).
    pub fn op_to(&mut self, op: &str, inputs: &[&str], attrs: Vec<(&str, Attr)>, out: &str) {
        let name = self.node_name(op);
        self.push_node(name, op, inputs, attrs, out);
    }

    fn push_node(
        &mut self,
        name: String,
        op: &str,
        inputs: &[&str],
        attrs: Vec<(&str, Attr)>,
        out: &str,
    ) {
        self.nodes.push(NodeProto {
            input: inputs.iter().map(|s| s.to_string()).collect(),
            output: vec![out.into()],
            name,
            op_type: op.into(),
            attribute: attrs.into_iter().map(|(n, v)| attribute(n, v)).collect(),
            ..Default::default()
        });
    }

    /// The checkpoint tensor `name`, which must have shape `dims`, as an initialiser.
    pub fn weight(&mut self, name: &str, dims: &[usize]) -> Result<String, ExportError> {
        let w = self.weights.get(name).ok_or_else(|| ExportError::Tensor {
            source_name: self.source.clone(),
            message: format!("lacks tensor `{name}` (shape {dims:?}) that the config requires"),
        })?;
        if w.dims != dims {
            return Err(ExportError::Tensor {
                source_name: self.source.clone(),
                message: format!(
                    "tensor `{name}` has shape {:?} but the config requires {dims:?}",
                    w.dims
                ),
            });
        }
        if self.used.insert(name.into()) {
            let t = self.tensor(name, w);
            self.initializers.push(t);
        }
        Ok(name.into())
    }

    fn tensor(&self, name: &str, w: &Weight) -> TensorProto {
        TensorProto {
            dims: w.dims.iter().map(|&d| d as i64).collect(),
            data_type: self.dtype.proto(),
            name: name.into(),
            raw_data: float_bytes(&w.data, self.dtype),
            ..Default::default()
        }
    }

    fn constant(&mut self, elem: Elem, dims: Vec<i64>, raw: Vec<u8>) -> String {
        let key = (elem.proto(), dims, raw);
        if let Some(n) = self.constants.get(&key) {
            return n.clone();
        }
        let name = format!("/const/{}", self.constants.len());
        self.initializers.push(TensorProto {
            dims: key.1.clone(),
            data_type: key.0,
            name: name.clone(),
            raw_data: key.2.clone(),
            ..Default::default()
        });
        self.constants.insert(key, name.clone());
        name
    }

    /// A 1-D i64 constant (shapes, axes, indices).
    pub fn ints(&mut self, v: &[i64]) -> String {
        let raw = v.iter().flat_map(|x| x.to_le_bytes()).collect();
        self.constant(Elem::I64, vec![v.len() as i64], raw)
    }

    /// An i64 constant of any shape (index tables).
    pub fn int_table(&mut self, values: &[i64], dims: &[usize]) -> String {
        let raw = values.iter().flat_map(|x| x.to_le_bytes()).collect();
        self.constant(Elem::I64, dims.iter().map(|&d| d as i64).collect(), raw)
    }

    /// A rank-0 i64 constant (a Gather index that drops the axis).
    pub fn int_scalar(&mut self, v: i64) -> String {
        self.constant(Elem::I64, vec![], v.to_le_bytes().to_vec())
    }

    /// A rank-0 constant in the compute type.
    pub fn scalar(&mut self, v: f32) -> String {
        let raw = float_bytes(&[v], self.dtype);
        self.constant(self.dtype, vec![], raw)
    }

    /// A constant table in the compute type (e.g. an attention mask).
    pub fn table(&mut self, values: &[f32], dims: &[usize]) -> String {
        let raw = float_bytes(values, self.dtype);
        self.constant(self.dtype, dims.iter().map(|&d| d as i64).collect(), raw)
    }

    /// Cast `x` from f32 to the compute type (no node when they agree).
    pub fn from_f32(&mut self, x: &str) -> String {
        match self.dtype {
            Elem::F32 => x.into(),
            t => self.op("Cast", &[x], vec![("to", Attr::Int(t.proto() as i64))]),
        }
    }

    /// Write the computation's result `x` to graph output `out` as f32.
    pub fn to_f32_output(&mut self, x: &str, out: &str) {
        match self.dtype {
            Elem::F32 => self.op_to("Identity", &[x], vec![], out),
            _ => self.op_to(
                "Cast",
                &[x],
                vec![("to", Attr::Int(Elem::F32.proto() as i64))],
                out,
            ),
        }
    }

    /// Finish: every checkpoint tensor must have been used.
    pub fn finish(self, name: &str, opset: i64, doc: &str) -> Result<ModelProto, ExportError> {
        if let Some(extra) = self.weights.keys().find(|k| !self.used.contains(*k)) {
            return Err(ExportError::Tensor {
                source_name: self.source,
                message: format!("has tensor `{extra}` that the config does not define"),
            });
        }
        Ok(ModelProto {
            ir_version: ir_version(opset),
            opset_import: vec![OperatorSetIdProto {
                domain: String::new(),
                version: opset,
            }],
            producer_name: "dalle".into(),
            producer_version: env!("CARGO_PKG_VERSION").into(),
            doc_string: doc.into(),
            graph: Some(GraphProto {
                node: self.nodes,
                name: name.into(),
                initializer: self.initializers,
                input: self.inputs,
                output: self.outputs,
                value_info: self.value_info,
                ..Default::default()
            }),
            ..Default::default()
        })
    }
}

/// Little-endian bytes of `v` as f32 or f16.
fn float_bytes(v: &[f32], elem: Elem) -> Vec<u8> {
    match elem {
        Elem::F16 => v
            .iter()
            .flat_map(|&x| half::f16::from_f32(x).to_le_bytes())
            .collect(),
        _ => v.iter().flat_map(|x| x.to_le_bytes()).collect(),
    }
}

/// Write `model` to `path`. When its initialisers hold more than `threshold` bytes, every
/// initialiser of at least 1 KiB moves to `<file name>.data` next to it (ONNX external data,
/// for graphs over protobuf's 2 GB limit). Returns the names of the files written.
pub fn save(
    mut model: ModelProto,
    path: &Path,
    threshold: u64,
) -> Result<Vec<String>, ExportError> {
    let file_name = path
        .file_name()
        .and_then(|n| n.to_str())
        .ok_or_else(|| ExportError::Invalid(format!("bad output file {}", path.display())))?
        .to_string();
    let graph = model
        .graph
        .as_mut()
        .expect("finish() always sets the graph");
    let total: u64 = graph
        .initializer
        .iter()
        .map(|t| t.raw_data.len() as u64)
        .sum();
    let mut written = vec![file_name.clone()];
    if total > threshold {
        let data_name = format!("{file_name}.data");
        let mut data: Vec<u8> = vec![];
        for t in graph.initializer.iter_mut() {
            if t.raw_data.len() < EXTERNAL_MIN_BYTES {
                continue;
            }
            // 64-byte alignment lets runtimes map tensors in place.
            data.resize(data.len().next_multiple_of(64), 0);
            let offset = data.len();
            data.extend_from_slice(&t.raw_data);
            let entry = |k: &str, v: String| StringStringEntryProto {
                key: k.into(),
                value: v,
            };
            t.external_data = vec![
                entry("location", data_name.clone()),
                entry("offset", offset.to_string()),
                entry("length", t.raw_data.len().to_string()),
            ];
            t.data_location = Some(DataLocation::External as i32);
            t.raw_data = vec![];
        }
        let data_path = path.with_file_name(&data_name);
        std::fs::write(&data_path, &data).map_err(|error| ExportError::Io {
            path: data_path,
            error,
        })?;
        written.push(data_name);
    }
    let bytes = model.encode_to_vec();
    std::fs::write(path, bytes).map_err(|error| ExportError::Io {
        path: path.to_path_buf(),
        error,
    })?;
    Ok(written)
}
