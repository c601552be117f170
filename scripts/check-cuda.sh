#!/usr/bin/env bash
# Compile the GPU paths: candle's CUDA backend (`--features cuda`: the binary, and the tests' build
# of the whole workspace), on a machine with or without a GPU. Installs the CUDA toolkit when nvcc
# is missing (Debian: `nvidia-cuda-toolkit` from the `contrib non-free` components, CUDA 11.8 on
# bookworm), then builds every target of the workspace into target/cuda (dev profile), so the CPU
# build in target/ is left as it is. scripts/gpu-check.sh builds the release binary from there.
#
#   bash scripts/check-cuda.sh
#
# Without a GPU the kernels are compiled for CUDA_COMPUTE_CAP (default 80: A100; an H100 is 90 and
# runs sm_80 code).
set -euo pipefail
cd "$(dirname "$0")/.."
start=$(date +%s)

if ! command -v nvcc >/dev/null 2>&1 && [ -x /usr/local/cuda/bin/nvcc ]; then
  export PATH="/usr/local/cuda/bin:$PATH"
fi
if ! command -v nvcc >/dev/null 2>&1; then
  if [ "$(id -u)" != 0 ] || ! command -v apt-get >/dev/null 2>&1; then
    echo "check-cuda: nvcc is not on PATH, and this script installs it only as root on Debian;" \
      "install the CUDA toolkit (nvcc) and run it again" >&2
    exit 1
  fi
  echo "== CUDA toolkit (Debian nvidia-cuda-toolkit, components contrib non-free)"
  # The non-free components go into a file of our own: the machine's own apt sources stay as they are.
  if ! apt-cache policy nvidia-cuda-toolkit 2>/dev/null | grep -q 'Candidate: [0-9]'; then
    . /etc/os-release
    cat > /etc/apt/sources.list.d/dalle-cuda-non-free.sources <<EOF
Types: deb
URIs: http://deb.debian.org/debian
Suites: $VERSION_CODENAME $VERSION_CODENAME-updates
Components: contrib non-free
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
EOF
    apt-get update -q
  fi
  DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends nvidia-cuda-toolkit
fi
nvcc --version | tail -2
installed=$(date +%s)

if ! command -v nvidia-smi >/dev/null 2>&1 || ! nvidia-smi -L >/dev/null 2>&1; then
  export CUDA_COMPUTE_CAP=${CUDA_COMPUTE_CAP:-80}
  echo "== no GPU here: kernels compiled for compute capability $CUDA_COMPUTE_CAP (CUDA_COMPUTE_CAP)"
fi

# No debug info: the build is only compiled, never debugged here (a third of the disk, faster links).
export CARGO_TARGET_DIR=target/cuda CARGO_PROFILE_DEV_DEBUG=0
echo "== cargo build --workspace --all-targets --features cuda (the binary, the tests, examples, benches)"
cargo build --workspace --all-targets --features cuda
# No clippy pass here: our code has no #[cfg(feature = "cuda")] items (the feature only switches
# candle's backend; `--device cuda` is chosen at run time), so scripts/test.sh's clippy already lints
# every line, and a check build would compile candle's kernels with nvcc a second time (~9 min).
target/cuda/debug/dalle --version

end=$(date +%s)
echo "check-cuda: passed in $((end - start)) s (toolkit $((installed - start)) s, builds $((end - installed)) s);" \
  "$(nvcc --version | grep -o 'release [0-9.]*')"
