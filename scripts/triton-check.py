"""Check a `dalle export --triton` repository without a Triton server.

Every config.pbtxt must parse as Triton's ModelConfig (tritonclient's model_config_pb2), and
every graph must pass ONNX's checker (full_check). The
transformer's state variant is then driven through ONNX Runtime as Triton's implicit state
drives it: each state input starts at zero and is replaced whole by its output after every call.
Decoding is greedy from the caption ids given, and the dVAE decoder turns the codes into an
image. Prints {"codes": [...], "image_shape": [...]} as JSON.

Usage: python3 scripts/triton-check.py REPO CAPTION_IDS_JSON
"""

import json
import sys

import numpy as np
import onnx
import onnxruntime as ort
from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2

repo, caption = sys.argv[1], json.loads(sys.argv[2])
configs = {}
for model in ["dvae_encoder", "dvae_decoder", "transformer"]:
    with open(f"{repo}/{model}/config.pbtxt") as f:
        cfg = text_format.Parse(f.read(), model_config_pb2.ModelConfig())
    assert cfg.name == model, (cfg.name, model)
    assert cfg.backend == "onnxruntime", cfg.backend
    configs[model] = cfg
    onnx.checker.check_model(f"{repo}/{model}/1/model.onnx", full_check=True)

with open(f"{repo}/manifest.json") as f:
    geometry = json.load(f)["geometry"]
image_offset = geometry["text_vocab"] + geometry["text_len"]
n = geometry["grid"] ** 2

cfg = configs["transformer"]
states = cfg.sequence_batching.state
assert len(states) > 0, "no implicit state"
dtypes = {model_config_pb2.TYPE_INT64: np.int64, model_config_pb2.TYPE_FP32: np.float32}
state = {s.input_name: np.zeros(list(s.dims), dtype=dtypes[s.data_type]) for s in states}
pairs = [(s.input_name, s.output_name) for s in states]
session = ort.InferenceSession(f"{repo}/transformer/1/model.onnx", providers=["CPUExecutionProvider"])
outputs = [cfg.output[0].name] + [o for _, o in pairs]
ids = np.array([caption], dtype=np.int64)
codes = []
for _ in range(n):
    result = session.run(outputs, {cfg.input[0].name: ids, **state})
    logits = result[0][0, -1]
    code = int(np.argmax(logits[image_offset:]))
    codes.append(code)
    for (name, _), value in zip(pairs, result[1:]):
        assert value.shape == state[name].shape, (name, value.shape, state[name].shape)
        assert value.dtype == state[name].dtype, (name, value.dtype)
        state[name] = value
    ids = np.array([[image_offset + code]], dtype=np.int64)
assert int(state["past_sequence_length"][0]) == len(caption) + n - 1, state["past_sequence_length"]

decoder = ort.InferenceSession(f"{repo}/dvae_decoder/1/model.onnx", providers=["CPUExecutionProvider"])
image = decoder.run(None, {"image_tokens": np.array([codes], dtype=np.int64)})[0]
print(json.dumps({"codes": codes, "image_shape": list(image.shape)}))
