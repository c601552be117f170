#!/usr/bin/env bash
# Every check and test of the workspace. Installs what the tests need, then runs them.
# Usage: bash scripts/test.sh
set -euo pipefail
cd "$(dirname "$0")/.."

# Python tools the tests call: ONNX's reference checker (onnx.checker.check_model), and for the
# Triton repository's check (scripts/triton-check.py) ONNX Runtime's Python module and Triton's
# model-config protobuf (tritonclient). A venv under target/ keeps them out of the system Python;
# pip only runs when a pinned version is missing.
ONNX_VERSION=1.23.2
ORT_VERSION=1.31.1
TRITONCLIENT_VERSION=2.73.0
PY=target/py
if ! "$PY/bin/python" -c "
import sys, onnx, onnxruntime, tritonclient.grpc.model_config_pb2
from importlib.metadata import version
sys.exit((onnx.__version__, onnxruntime.__version__, version('tritonclient')) != ('$ONNX_VERSION', '$ORT_VERSION', '$TRITONCLIENT_VERSION'))" 2>/dev/null; then
  echo "== python tools ($PY: onnx==$ONNX_VERSION onnxruntime==$ORT_VERSION tritonclient[grpc]==$TRITONCLIENT_VERSION)"
  mkdir -p target
  python3 -m venv "$PY"
  "$PY/bin/python" -m pip install --quiet --disable-pip-version-check "onnx==$ONNX_VERSION" \
    "onnxruntime==$ORT_VERSION" "tritonclient[grpc]==$TRITONCLIENT_VERSION"
fi
export DALLE_PYTHON="$PWD/$PY/bin/python"

echo "== rustfmt"
cargo fmt --all -- --check

echo "== no import cycle among the modules"
python3 scripts/module-cycles.py

echo "== clippy"
cargo clippy --workspace --all-targets -- -D warnings

echo "== the runtimes crate builds alone: without default features, and with only the ort providers"
cargo check -p dalle-runtimes --no-default-features
cargo check -p dalle-runtimes --no-default-features --features cuda,tensorrt

echo "== ONNX Runtime library (onnxruntime wheel from PyPI) into target/ort"
cargo build --quiet --bin dalle
if [ ! -f target/ort/libonnxruntime.so.1.31.1 ]; then
  # `setup ort` writes only its own files: anything else in the directory survives it.
  mkdir -p target/ort && echo "a file of the user's" > target/ort/user-file.txt
  target/debug/dalle setup ort --dir target/ort
  grep -q "a file of the user's" target/ort/user-file.txt || { echo "setup ort destroyed target/ort/user-file.txt"; exit 1; }
fi
export ORT_DYLIB_PATH="$PWD/target/ort/libonnxruntime.so.1.31.1"

echo "== dalle parity on a freshly trained and exported tiny model (candle, tract, ort), no BLAS"
export DALLE_BLAS=off
P=target/parity
rm -rf "$P" && mkdir -p "$P"
target/debug/dalle data shapes --out "$P/data" --count 32 --seed 0 >/dev/null
target/debug/dalle train-vae --preset tiny --data "$P/data" --out "$P/vae" --steps 2 --batch-size 4 >/dev/null
target/debug/dalle train --preset tiny --vae "$P/vae" --data "$P/data" --out "$P/tf" --steps 2 --batch-size 4 >/dev/null
target/debug/dalle export --transformer "$P/tf" --out "$P/model"
target/debug/dalle parity --model "$P/model" --runtimes candle,tract,ort
echo "== OpenBLAS (scipy-openblas32 wheel from PyPI) into target/blas: the tests below use it"
# The parity run above trained and decoded on the gemm crate (no BLAS set up): the default.
if [ ! -f target/blas/libscipy_openblas.so ]; then
  target/debug/dalle setup blas --dir target/blas
fi
export DALLE_BLAS="$PWD/target/blas/libscipy_openblas.so"
target/debug/dalle parity --model "$P/model" --runtimes candle,tract,ort
echo "== the same on the kernels of a CPU without AVX-512, and of one without AVX2 (DALLE_CPU caps them)"
DALLE_CPU=avx2 target/debug/dalle parity --model "$P/model" --runtimes candle,tract
DALLE_CPU=portable target/debug/dalle parity --model "$P/model" --runtimes candle,tract
echo "== dalle parity on models/shapes-tiny exported in f16 (f16 tolerances)"
target/debug/dalle export --from-model models/shapes-tiny --out "$P/model-f16" --fp16 >/dev/null
target/debug/dalle parity --model "$P/model-f16" --runtimes candle,tract,ort

echo "== tests"
if cargo nextest --version >/dev/null 2>&1; then
  # nextest does not run doc tests; run them first so the summary of the whole suite comes last.
  cargo test --workspace --doc
  cargo nextest run --workspace --no-fail-fast
else
  cargo test --workspace --no-fail-fast
fi
