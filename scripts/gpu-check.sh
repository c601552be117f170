#!/usr/bin/env bash
# The GPU paths, run once on a machine with an NVIDIA GPU (under 10 minutes on one GPU):
#   1. the CUDA build (target/cuda/release/dalle, from scripts/check-cuda.sh; DALLE_BIN=PATH uses
#      another binary built with --features cuda, e.g. one copied from a machine with nvcc);
#   2. a few training steps of each stage on --device cuda: the loss falls, and the loss at step 1
#      equals the CPU's within STEP1_RTOL (same seed: same initial weights, batch and noise);
#   3. `dalle setup ort --gpu` (ONNX Runtime with the CUDA and TensorRT providers; skipped when
#      ORT_DYLIB_PATH already names a libonnxruntime.so);
#   4. `dalle parity --runtimes candle,cuda,trt` on the bundled model and on its f16 export;
#   5. `generate --runtime trt` timed with the engine cache cold, then warm;
#   6. `dalle bench --runtimes cuda,trt --batch 1,16`.
# Every figure goes into one JSON file: target/gpu-check/gpu-check.json (GPU_CHECK_OUT=DIR moves it).
# Without a GPU it stops at the first step that needs one, with one line, exit status 3.
#
#   bash scripts/gpu-check.sh
set -euo pipefail
cd "$(dirname "$0")/.."

OUT=${GPU_CHECK_OUT:-target/gpu-check}
STEP1_RTOL=${STEP1_RTOL:-1e-3}
MODEL=models/shapes-tiny
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
JSON="$OUT/gpu-check.json"
FIGS="$OUT/figures.jsonl"
: > "$FIGS"
start=$(date +%s.%N)

# fig NAME JSON_VALUE: one figure of the report (the report is rewritten after each).
fig() {
  printf '{"name": "%s", "value": %s}\n' "$1" "$2" >> "$FIGS"
  python3 - "$FIGS" "$JSON" <<'EOF'
import json, sys
figs = {}
for line in open(sys.argv[1]):
    f = json.loads(line)
    figs[f["name"]] = f["value"]
json.dump(figs, open(sys.argv[2], "w"), indent=2)
EOF
}
now() { date +%s.%N; }
secs() { python3 -c "import sys; print(round(float(sys.argv[2]) - float(sys.argv[1]), 3))" "$1" "$2"; }
fail() {
  fig failed_at "\"$1\""
  echo "gpu-check: $1: $2 (figures so far: $JSON)" >&2
  exit "${3:-1}"
}

fig started "\"$(date -u +%Y-%m-%dT%H:%M:%SZ)\""
fig commit "\"$(git rev-parse --short HEAD 2>/dev/null || echo unknown)\""
fig cpu "\"$(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2- | sed 's/^ //')\""

echo "== 1. the CUDA build"
if [ -n "${DALLE_BIN:-}" ]; then
  D=$DALLE_BIN
else
  command -v nvcc >/dev/null 2>&1 || [ -x /usr/local/cuda/bin/nvcc ] || [ -x target/cuda/release/dalle ] ||
    fail build "nvcc not found: run scripts/check-cuda.sh first (it installs the toolkit), or set DALLE_BIN to a dalle built with --features cuda"
  [ -x /usr/local/cuda/bin/nvcc ] && export PATH="/usr/local/cuda/bin:$PATH"
  # Without nvidia-smi, candle's kernel build cannot ask the GPU for its compute capability.
  if ! command -v nvidia-smi >/dev/null 2>&1; then export CUDA_COMPUTE_CAP=${CUDA_COMPUTE_CAP:-80}; fi
  t0=$(now)
  if command -v nvcc >/dev/null 2>&1; then
    CARGO_TARGET_DIR=target/cuda cargo build --release --features cuda --bin dalle
  fi
  fig build_s "$(secs "$t0" "$(now)")"
  D=target/cuda/release/dalle
fi
[ -x "$D" ] || fail build "$D is not an executable"
D=$(cd "$(dirname "$D")" && pwd)/$(basename "$D")

echo "== the GPU"
if ! command -v nvidia-smi >/dev/null 2>&1 || ! GPU=$(nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null) || [ -z "$GPU" ]; then
  fail gpu "no GPU: nvidia-smi finds no NVIDIA device on this machine; every step from here on needs one" 3
fi
fig gpu "\"$(echo "$GPU" | head -1)\""
echo "$GPU"

W="$OUT/work"
rm -rf "$W" && mkdir -p "$W"
"$D" data shapes --out "$W/data" --count 512 --seed 0 >/dev/null

# loss_at RUN STEP: the loss column of metrics.csv at STEP.
loss_at() {
  python3 - "$1/metrics.csv" "$2" <<'EOF'
import csv, sys
for row in csv.DictReader(open(sys.argv[1])):
    if int(row["step"]) == int(sys.argv[2]):
        print(row["loss"]); break
else:
    sys.exit(f"no step {sys.argv[2]} in {sys.argv[1]}")
EOF
}
# check_stage NAME CPU_RUN CUDA_RUN STEPS: step-1 agreement and a falling loss on cuda.
check_stage() {
  local name=$1 cpu=$2 cuda=$3 steps=$4
  local lc lg first last
  lc=$(loss_at "$cpu" 1)
  lg=$(loss_at "$cuda" 1)
  first=$(python3 -c "import csv,sys; r=list(csv.DictReader(open(sys.argv[1]))); print(sum(float(x['loss']) for x in r[:3])/3)" "$cuda/metrics.csv")
  last=$(python3 -c "import csv,sys; r=list(csv.DictReader(open(sys.argv[1]))); print(sum(float(x['loss']) for x in r[-3:])/3)" "$cuda/metrics.csv")
  fig "${name}_step1_loss_cpu" "$lc"
  fig "${name}_step1_loss_cuda" "$lg"
  fig "${name}_loss_first3_cuda" "$first"
  fig "${name}_loss_last3_cuda" "$last"
  python3 - "$lc" "$lg" "$STEP1_RTOL" <<'EOF' || fail "$name" "step-1 loss on cuda ($lg) differs from the cpu's ($lc) by more than STEP1_RTOL=$STEP1_RTOL"
import sys
c, g, tol = map(float, sys.argv[1:])
sys.exit(abs(c - g) > tol * abs(c))
EOF
  python3 -c "import sys; sys.exit(not float(sys.argv[2]) < float(sys.argv[1]))" "$first" "$last" ||
    fail "$name" "the loss did not fall on cuda over $steps steps ($first → $last)"
}

echo "== 2. training on --device cuda (stage 1, then stage 2), step 1 against the cpu"
VAE_ARGS=(--preset shapes --data "$W/data" --batch-size 16 --lr 1e-3 --likelihood gaussian \
  --tau-end 0.5 --beta-max 0 --log-every 1)
t0=$(now)
"$D" train-vae "${VAE_ARGS[@]}" --device cuda --out "$W/vae-cuda" --steps 30 --checkpoint-every 30 --sample-every 30 \
  > "$W/vae-cuda.log" 2>&1 || fail train-vae "train-vae --device cuda failed (see $W/vae-cuda.log)"
fig train_vae_cuda_30_steps_s "$(secs "$t0" "$(now)")"
"$D" train-vae "${VAE_ARGS[@]}" --device cpu --out "$W/vae-cpu" --steps 1 > "$W/vae-cpu.log" 2>&1
check_stage train_vae "$W/vae-cpu" "$W/vae-cuda" 30

TF_ARGS=(--preset shapes --data "$W/data" --vae "$W/vae-cuda" --batch-size 16 --lr 1e-3 --log-every 1)
t0=$(now)
"$D" train "${TF_ARGS[@]}" --device cuda --out "$W/tf-cuda" --steps 30 --checkpoint-every 30 --sample-every 30 \
  > "$W/tf-cuda.log" 2>&1 || fail train "train --device cuda failed (see $W/tf-cuda.log)"
fig train_cuda_30_steps_s "$(secs "$t0" "$(now)")"
"$D" train "${TF_ARGS[@]}" --device cpu --out "$W/tf-cpu" --steps 1 > "$W/tf-cpu.log" 2>&1
check_stage train "$W/tf-cpu" "$W/tf-cuda" 30

echo "== 3. ONNX Runtime with the CUDA and TensorRT providers"
if [ -z "${ORT_DYLIB_PATH:-}" ]; then
  t0=$(now)
  "$D" setup ort --gpu --dir "$OUT/ort-gpu" ||
    fail setup-ort "dalle setup ort --gpu failed (it needs PyPI): put the onnxruntime-gpu 1.31.1 libraries in a directory and set ORT_DYLIB_PATH to its libonnxruntime.so"
  fig setup_ort_gpu_s "$(secs "$t0" "$(now)")"
  ORT_DYLIB_PATH=$(ls "$OUT"/ort-gpu/libonnxruntime.so.* | head -1)
fi
export ORT_DYLIB_PATH
fig ort_dylib "\"$ORT_DYLIB_PATH\""

echo "== 4. parity: candle, cuda, trt on the bundled model and its f16 export"
"$D" parity --model "$MODEL" --runtimes candle,cuda,trt --trt-cache "$OUT/trt-cache" --json > "$OUT/parity.json" ||
  fail parity "dalle parity --runtimes candle,cuda,trt failed on $MODEL (see $OUT/parity.json)"
fig parity "$(cat "$OUT/parity.json")"
"$D" export --from-model "$MODEL" --out "$W/model-f16" --fp16 >/dev/null
"$D" parity --model "$W/model-f16" --runtimes candle,cuda,trt --trt-cache "$OUT/trt-cache-f16" --json > "$OUT/parity-f16.json" ||
  fail parity-f16 "dalle parity --runtimes candle,cuda,trt failed on the f16 export (see $OUT/parity-f16.json)"
fig parity_f16 "$(cat "$OUT/parity-f16.json")"

echo "== 5. generate --runtime trt, engine cache cold then warm"
rm -rf "$OUT/trt-gen-cache"
for pass in cold warm; do
  t0=$(now)
  "$D" generate "a red circle above a blue square" --model "$MODEL" --runtime trt \
    --trt-cache "$OUT/trt-gen-cache" --out "$OUT/generate-trt-$pass.png" >/dev/null ||
    fail generate "generate --runtime trt failed ($pass engine cache)"
  fig "generate_trt_${pass}_s" "$(secs "$t0" "$(now)")"
done

echo "== 6. bench: cuda and trt at batch 1 and 16"
"$D" bench --runtimes cuda,trt --batch 1,16 --train-batch 0 --json > "$OUT/bench.json" ||
  fail bench "dalle bench --runtimes cuda,trt failed"
fig bench "$(cat "$OUT/bench.json")"

fig total_s "$(secs "$start" "$(now)")"
fig failed_at null
echo "gpu-check: passed; every figure in $JSON"
