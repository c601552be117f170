#!/usr/bin/env bash
# Install the PyTorch peer of `dalle bench --peer pytorch` into target/peer (a venv):
# torch 2.15.0 from PyPI (its CUDA wheel, ≈ 5 GB with the nvidia-* libraries it imports even on
# a CPU) and dalle-pytorch 1.6.6 with only the dependencies DALLE and DiscreteVAE use; the rest
# of its imports (VQGAN, tokenizers, torchvision, …) are stubbed by bench/pytorch_peer.py. Also
# OpenAI's DALL-E 0.1 (`dall_e`: the dVAE ours mirrors, timed as the like-for-like dVAE peer).
# Usage: bash bench/install-peer.sh [VENV_DIR]
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${1:-target/peer}
if "$VENV/bin/python" bench/pytorch_peer.py --help >/dev/null 2>&1 &&
  "$VENV/bin/python" -m pip show --quiet DALL-E >/dev/null 2>&1; then
  echo "PyTorch peer already installed in $VENV"
  exit 0
fi
[ -x "$VENV/bin/python" ] || python3 -m venv "$VENV"
PIP=("$VENV/bin/python" -m pip install --quiet --disable-pip-version-check)
"${PIP[@]}" "torch==2.15.0" "einops==0.8.2" "numpy==2.4.6"
"${PIP[@]}" --no-deps "dalle-pytorch==1.6.6" "DALL-E==0.1" "attrs==25.4.0" "axial-positional-embedding==0.3.12" "rotary-embedding-torch==0.9.1"
"$VENV/bin/python" bench/pytorch_peer.py --help >/dev/null
echo "PyTorch peer installed in $VENV; run: dalle bench --peer pytorch"
