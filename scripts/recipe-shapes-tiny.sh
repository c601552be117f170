#!/usr/bin/env bash
# The bundled model's recipe: generate the shapes set, train the dVAE and the transformer of the
# `tiny` preset with fixed seeds, export, evaluate, and write curves, eval table and README next to
# the model. Budget: ≤ 60 min on a 2-core CPU.
#
#   scripts/recipe-shapes-tiny.sh [OUT_MODEL_DIR] [WORK_DIR]
#
# Defaults: models/shapes-tiny and target/recipe-shapes-tiny. Step counts can be scaled with
# VAE_STEPS / TF_STEPS (e.g. a quick smoke run); the bundled model used the defaults below.
set -euo pipefail
cd "$(dirname "$0")/.."

OUT=${1:-models/shapes-tiny}
WORK=${2:-target/recipe-shapes-tiny}
SEED=${SEED:-0}
TRAIN_IMAGES=${TRAIN_IMAGES:-20000}
HELDOUT_IMAGES=${HELDOUT_IMAGES:-256}
VAE_STEPS=${VAE_STEPS:-1200}
TF_STEPS=${TF_STEPS:-3000}
EVAL_SAMPLES=${EVAL_SAMPLES:-100}

cargo build --release --bin dalle
DALLE=target/release/dalle
mkdir -p "$WORK"
start=$(date +%s)
stamp() { echo "[recipe $(( $(date +%s) - start ))s] $*"; }

stamp "data: $TRAIN_IMAGES training and $HELDOUT_IMAGES held-out scenes"
[ -f "$WORK/shapes-train/captions.jsonl" ] && [ -f "$WORK/shapes-train/.count-$TRAIN_IMAGES" ] || {
  rm -rf "$WORK/shapes-train"
  $DALLE data shapes --out "$WORK/shapes-train" --count "$TRAIN_IMAGES" --seed "$SEED" --split train
  touch "$WORK/shapes-train/.count-$TRAIN_IMAGES"
}
rm -rf "$WORK/shapes-heldout"
$DALLE data shapes --out "$WORK/shapes-heldout" --count "$HELDOUT_IMAGES" --seed "$SEED" --split heldout

stamp "stage 1: dVAE, $VAE_STEPS steps"
rm -rf "$WORK/vae"
$DALLE train-vae --data "$WORK/shapes-train" --out "$WORK/vae" --steps "$VAE_STEPS" --seed "$SEED" \
  --batch-size 16 --lr 1e-3 --beta-steps 1 --straight-through --gumbel-scale 0 --tau-steps 1000000000 \
  --checkpoint-every 400 --sample-every 400 --log-every 50
$DALLE vae psnr --vae "$WORK/vae" --data "$WORK/shapes-heldout" --count "$HELDOUT_IMAGES" | tee "$WORK/vae-psnr.txt"

stamp "stage 2: transformer, $TF_STEPS steps"
rm -rf "$WORK/transformer"
$DALLE train --data "$WORK/shapes-train" --vae "$WORK/vae" --out "$WORK/transformer" --steps "$TF_STEPS" \
  --seed "$SEED" --batch-size 32 --lr 1e-3 --caption-dropout 0.1 --bpe-dropout 0 \
  --checkpoint-every 1000 --sample-every 1000 --log-every 50

stamp "export to $OUT"
$DALLE export --transformer "$WORK/transformer" --out "$OUT" --force --guidance-scale 3

stamp "eval: $EVAL_SAMPLES scenes per split"
$DALLE eval --model "$OUT" --samples "$EVAL_SAMPLES" --guidance 1,3 --json > "$WORK/eval.json"
$DALLE eval --model "$OUT" --samples "$EVAL_SAMPLES" --guidance 1,3 --grid "$OUT/grid.png" | tee "$OUT/eval.txt"

cp "$WORK/vae/loss.png" "$OUT/curves-dvae.png"
cp "$WORK/transformer/loss.png" "$OUT/curves-transformer.png"
cp "$WORK/eval.json" "$OUT/eval.json"
stamp "done"
