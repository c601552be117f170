#!/usr/bin/env bash
# Every check and test of the workspace. Installs what the tests need, then runs them.
# Usage: bash scripts/test.sh
set -euo pipefail
cd "$(dirname "$0")/.."

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
