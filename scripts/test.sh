#!/usr/bin/env bash
# Every check and test of the workspace. Installs what the tests need, then runs them.
# Usage: bash scripts/test.sh
set -euo pipefail
cd "$(dirname "$0")/.."

# Python tools the tests call: ONNX's reference checker (onnx.checker.check_model). A venv under
# target/ keeps them out of the system Python; pip only runs when the pinned version is missing.
ONNX_VERSION=1.23.2
PY=target/py
if ! "$PY/bin/python" -c "import onnx, sys; sys.exit(onnx.__version__ != '$ONNX_VERSION')" 2>/dev/null; then
  echo "== python tools ($PY: onnx==$ONNX_VERSION)"
  mkdir -p target
  python3 -m venv "$PY"
  "$PY/bin/python" -m pip install --quiet --disable-pip-version-check "onnx==$ONNX_VERSION"
fi
export DALLE_PYTHON="$PWD/$PY/bin/python"

echo "== rustfmt"
cargo fmt --all -- --check

echo "== clippy"
cargo clippy --workspace --all-targets -- -D warnings

echo "== the runtimes crate builds alone, without default features"
cargo check -p dalle-runtimes --no-default-features

echo "== tests"
if cargo nextest --version >/dev/null 2>&1; then
  # nextest does not run doc tests; run them first so the summary of the whole suite comes last.
  cargo test --workspace --doc
  cargo nextest run --workspace --no-fail-fast
else
  cargo test --workspace --no-fail-fast
fi
