//! PyTorch checkpoints (`torch.save`'s zip format) read as named f32 tensors, without running
//! them. A checkpoint's `data.pkl` is a pickle: a program for Python's unpickler, which calls
//! whatever functions it names. Here it is only parsed (candle's pickle reader builds a tree of
//! objects and calls nothing), and every function or class it names must be one of those a
//! tensor state dict needs ([`ALLOWED`]); any other — `os.system` in a crafted file — refuses the
//! whole file, so a checkpoint this accepts would also be harmless to unpickle.

use crate::{Error, Result};
use candle_core::pickle::{Object, Stack};
use candle_core::{DType, Device, Tensor};
use std::collections::BTreeMap;
use std::io::{BufReader, Read};
use std::path::Path;

/// What a state dict of tensors names: (module, name). A name `*X` is any name ending in X;
/// a module `M.*` is M's submodules.
pub const ALLOWED: [(&str, &str); 4] = [
    ("collections", "OrderedDict"),
    ("torch._utils", "_rebuild_tensor_v2"),
    ("torch._utils", "_rebuild_parameter"),
    ("torch", "*Storage"),
];

/// What a PyTorch Lightning checkpoint (taming's VQGAN is one) names besides its state dict:
/// its training metadata's containers and plain types — classes whose construction from data
/// runs nothing else. Accepted only where a caller reads one entry (`state_dict`) of such a file.
pub const ALLOWED_IN_LIGHTNING: [(&str, &str); 17] = [
    ("collections", "defaultdict"),
    ("torch", "Size"),
    ("torch", "device"),
    ("numpy.core.multiarray", "scalar"),
    ("numpy._core.multiarray", "scalar"),
    ("numpy", "dtype"),
    ("pytorch_lightning.callbacks.*", "*Checkpoint"),
    ("pytorch_lightning.callbacks.*", "*Monitor"),
    ("omegaconf.*", "*Config"),
    ("omegaconf.*", "*Metadata"),
    ("omegaconf.*", "*Node"),
    ("builtins", "dict"),
    ("builtins", "list"),
    ("builtins", "str"),
    ("builtins", "int"),
    ("builtins", "float"),
    ("typing", "Any"),
];

fn listed(list: &[(&str, &str)], module: &str, name: &str) -> bool {
    list.iter().any(|&(m, n)| {
        let module_ok = match m.strip_suffix(".*") {
            Some(parent) => module
                .strip_prefix(parent)
                .is_some_and(|rest| rest.starts_with('.')),
            None => m == module,
        };
        module_ok
            && match n.strip_prefix('*') {
                Some(suffix) => name.ends_with(suffix) && name.len() > suffix.len(),
                None => n == name,
            }
    })
}

fn bad(path: &Path, message: impl Into<String>) -> Error {
    Error::Checkpoint {
        path: path.to_path_buf(),
        message: message.into(),
    }
}

/// A checkpoint's state dict: its floating-point tensors as f32 on the CPU, and what else it
/// holds (buffers of other types, such as ruDALL-E's boolean attention masks), with why each was
/// not read.
#[derive(Debug, Default)]
pub struct StateDict {
    pub tensors: BTreeMap<String, Tensor>,
    pub other: BTreeMap<String, String>,
}

/// The state dict in the checkpoint at `path`: the whole pickled dict, or with `key` its entry
/// of that name (a PyTorch Lightning checkpoint's `state_dict`).
pub fn read(path: &Path, key: Option<&str>) -> Result<StateDict> {
    let mut file = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
    let mut magic = [0u8; 4];
    let got = file.read(&mut magic).map_err(|e| Error::io(path, e))?;
    if got < 4 || &magic != b"PK\x03\x04" {
        return Err(bad(
            path,
            if got >= 2 && magic[0] == 0x80 {
                "is a PyTorch checkpoint in the legacy (before torch 1.6) format, which this \
                 reader does not take; re-save it in Python with `torch.save(torch.load(path), \
                 new_path)`"
            } else {
                "is not a PyTorch checkpoint (`torch.save`'s zip format: it does not start \
                 with a zip header)"
            },
        ));
    }
    let damaged = |e: &dyn std::fmt::Display| {
        bad(
            path,
            format!("is damaged or truncated ({e}); download or copy it again"),
        )
    };
    std::io::Seek::rewind(&mut file).map_err(|e| Error::io(path, e))?;
    let mut zip = zip::ZipArchive::new(BufReader::new(file)).map_err(|e| damaged(&e))?;
    let pickles: Vec<String> = zip
        .file_names()
        .filter_map(|n| n.ok())
        .filter(|n| n.ends_with("data.pkl"))
        .map(|n| n.to_string())
        .collect();
    let [pickle] = &pickles[..] else {
        return Err(bad(
            path,
            format!(
                "holds {} `data.pkl` records, a `torch.save` file one",
                pickles.len()
            ),
        ));
    };
    let dir = Path::new(pickle.strip_suffix(".pkl").unwrap_or(pickle)).to_path_buf();
    let object = {
        let entry = zip.by_name(pickle).map_err(|e| damaged(&e))?;
        let mut reader = BufReader::new(entry);
        let mut stack = Stack::empty();
        loop {
            let done = stack.read(&mut reader).map_err(|e| {
                bad(
                    path,
                    format!("its pickle `{pickle}` cannot be read as a state dict ({e})"),
                )
            })?;
            // Each GLOBAL opcode pushes the function or class it names: checked before the next.
            if let Some(Object::Class {
                module_name,
                class_name,
            }) = stack.stack().last()
            {
                let ok = listed(&ALLOWED, module_name, class_name)
                    || (key.is_some() && listed(&ALLOWED_IN_LIGHTNING, module_name, class_name));
                if !ok {
                    return Err(bad(
                        path,
                        format!(
                            "its pickle names `{module_name}.{class_name}`, which a state dict \
                             of tensors never does: the file may run code when loaded in Python, \
                             and is refused (nothing of it was run). Load only checkpoints from \
                             their publishers; if you trust this one, save its tensors alone \
                             (`torch.save(model.state_dict(), path)`) and import that; convert \
                             once and ship the exported model directory"
                        ),
                    ));
                }
            }
            if done {
                break;
            }
        }
        stack
            .finalize()
            .map_err(|e| bad(path, format!("its pickle is incomplete ({e})")))?
    };
    let object = match (key, object) {
        (Some(key), Object::Dict(entries)) => entries
            .into_iter()
            .find(|(k, _)| *k == Object::Unicode(key.to_string()))
            .map(|(_, v)| v)
            .ok_or_else(|| {
                bad(
                    path,
                    format!("holds no `{key}` entry (a PyTorch Lightning checkpoint has one)"),
                )
            })?,
        (_, object) => object,
    };
    let Object::Dict(entries) = object else {
        return Err(bad(
            path,
            "holds no state dict (its pickle is not a dict of tensors); save the model's \
             `state_dict()`",
        ));
    };
    let mut out = StateDict::default();
    for (key, value) in entries {
        let Object::Unicode(name) = &key else {
            continue;
        };
        let info = match value.into_tensor_info(key.clone(), &dir) {
            Ok(Some(info)) if info.dtype.is_float() => info,
            Ok(Some(info)) => {
                out.other
                    .insert(name.clone(), format!("a {:?} tensor", info.dtype));
                continue;
            }
            Ok(None) => {
                out.other.insert(name.clone(), "not a tensor".into());
                continue;
            }
            Err(e) => {
                out.other.insert(name.clone(), format!("not read: {e}"));
                continue;
            }
        };
        let bytes = {
            let mut entry = zip.by_name(&info.path).map_err(|e| damaged(&e))?;
            let mut v = Vec::new();
            entry.read_to_end(&mut v).map_err(|e| damaged(&e))?;
            v
        };
        out.tensors
            .insert(name.clone(), tensor(path, name, &info, &bytes)?);
    }
    Ok(out)
}

/// One tensor from its storage's bytes, laid out as `info` says, widened to f32.
fn tensor(
    path: &Path,
    name: &str,
    info: &candle_core::pickle::TensorInfo,
    bytes: &[u8],
) -> Result<Tensor> {
    let size = info.dtype.size_in_bytes();
    let storage: Vec<f32> = match info.dtype {
        DType::F32 => bytes
            .chunks_exact(4)
            .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
            .collect(),
        DType::F16 => bytes
            .chunks_exact(2)
            .map(|b| half::f16::from_le_bytes([b[0], b[1]]).to_f32())
            .collect(),
        DType::BF16 => bytes
            .chunks_exact(2)
            .map(|b| half::bf16::from_le_bytes([b[0], b[1]]).to_f32())
            .collect(),
        DType::F64 => bytes
            .chunks_exact(8)
            .map(|b| f64::from_le_bytes(b.try_into().expect("8 bytes")) as f32)
            .collect(),
        other => {
            return Err(bad(
                path,
                format!("tensor `{name}` is {other:?}; only f32, f16 and bf16 weights are read"),
            ))
        }
    };
    if bytes.len() != info.storage_size * size {
        return Err(bad(
            path,
            format!(
                "tensor `{name}`'s storage holds {} bytes, its header says {}: the file is \
                 damaged or truncated; download or copy it again",
                bytes.len(),
                info.storage_size * size
            ),
        ));
    }
    let layout = &info.layout;
    let dims = layout.dims().to_vec();
    let strides = layout.stride().to_vec();
    let n: usize = dims.iter().product();
    let mut values = Vec::with_capacity(n);
    let mut index = vec![0usize; dims.len()];
    for _ in 0..n {
        let at = layout.start_offset()
            + index
                .iter()
                .zip(&strides)
                .map(|(i, s)| i * s)
                .sum::<usize>();
        let Some(&v) = storage.get(at) else {
            return Err(bad(
                path,
                format!("tensor `{name}` reaches past its storage: the file is damaged"),
            ));
        };
        values.push(v);
        for k in (0..dims.len()).rev() {
            index[k] += 1;
            if index[k] < dims[k] {
                break;
            }
            index[k] = 0;
        }
    }
    Ok(Tensor::from_vec(values, dims, &Device::Cpu)?)
}
