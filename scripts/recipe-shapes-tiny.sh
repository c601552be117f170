#!/usr/bin/env bash
# The bundled model's recipe: generate the shapes set, train the dVAE and the transformer of the
# `tiny` preset with fixed seeds, export, evaluate, and write curves, eval table and README next to
# the model. Budget: ≤ 60 min on a 2-core CPU.
#
#   scripts/recipe-shapes-tiny.sh [OUT_MODEL_DIR] [WORK_DIR]
#
# Defaults: models/shapes-tiny and target/recipe-shapes-tiny. Step counts can be scaled with
# VAE_STEPS / TF_STEPS (e.g. a quick smoke run); the bundled model used the defaults below.
# RESUME=1 continues interrupted stages from their last checkpoints instead of starting over.
set -euo pipefail
cd "$(dirname "$0")/.."

OUT=${1:-models/shapes-tiny}
WORK=${2:-target/recipe-shapes-tiny}
SEED=${SEED:-0}
TRAIN_IMAGES=${TRAIN_IMAGES:-20000}
HELDOUT_IMAGES=${HELDOUT_IMAGES:-256}
VAE_STEPS=${VAE_STEPS:-2400}
TF_STEPS=${TF_STEPS:-2000}
EVAL_SAMPLES=${EVAL_SAMPLES:-100}

cargo build --release --bin dalle
DALLE=target/release/dalle
mkdir -p "$WORK"
start=$(date +%s)
stamp() { echo "[recipe $(( $(date +%s) - start ))s] $*"; echo "| $(( $(date +%s) - start )) s | $* |" >> "$WORK/timeline.md"; }
: > "$WORK/timeline.md"

stamp "data: $TRAIN_IMAGES training and $HELDOUT_IMAGES held-out scenes"
[ -f "$WORK/shapes-train/metadata.jsonl" ] && [ -f "$WORK/shapes-train/.count-$TRAIN_IMAGES" ] || {
  rm -rf "$WORK/shapes-train"
  $DALLE data shapes --out "$WORK/shapes-train" --count "$TRAIN_IMAGES" --seed "$SEED" --split train
  touch "$WORK/shapes-train/.count-$TRAIN_IMAGES"
}
rm -rf "$WORK/shapes-heldout"
$DALLE data shapes --out "$WORK/shapes-heldout" --count "$HELDOUT_IMAGES" --seed "$SEED" --split heldout

stamp "stage 1: dVAE, $VAE_STEPS steps"
fresh() { if [ "${RESUME:-0}" = 1 ] && [ -f "$1/train.json" ]; then echo --resume; else rm -rf "$1"; fi; }
$DALLE train-vae $(fresh "$WORK/vae") --data "$WORK/shapes-train" --out "$WORK/vae" --steps "$VAE_STEPS" --seed "$SEED" \
  --batch-size 16 --lr 1e-3 --likelihood gaussian --beta-max 0 --gumbel-scale 0 --tau-steps 1000000000 \
  --straight-through --kmeans-init --freeze-encoder \
  --checkpoint-every 400 --sample-every 400 --log-every 50
$DALLE vae psnr --vae "$WORK/vae" --data "$WORK/shapes-heldout" --count "$HELDOUT_IMAGES" | tee "$WORK/vae-psnr.txt"

stamp "stage 2: transformer, $TF_STEPS steps"
$DALLE train $(fresh "$WORK/transformer") --data "$WORK/shapes-train" --vae "$WORK/vae" --out "$WORK/transformer" --steps "$TF_STEPS" \
  --seed "$SEED" --batch-size 32 --lr 1e-3 --caption-dropout 0.1 --bpe-dropout 0 \
  --checkpoint-every 1000 --sample-every 1000 --log-every 50

stamp "export to $OUT"
$DALLE export --transformer "$WORK/transformer" --out "$OUT" --force --guidance-scale 1 --top-k 8

stamp "eval: $EVAL_SAMPLES scenes per split"
$DALLE eval --model "$OUT" --samples "$EVAL_SAMPLES" --guidance 1,3 --top-k 8 --json > "$WORK/eval.json"
$DALLE eval --model "$OUT" --samples "$EVAL_SAMPLES" --guidance 1,3 --top-k 8 --grid "$OUT/grid.png" | tee "$OUT/eval.txt"

cp "$WORK/vae/loss.png" "$OUT/curves-dvae.png"
cp "$WORK/transformer/loss.png" "$OUT/curves-transformer.png"
cp "$WORK/eval.json" "$OUT/eval.json"
stamp "done"

commit=$(git rev-parse --short HEAD 2>/dev/null || echo unknown)
dirty=$(git status --porcelain 2>/dev/null | grep -qv '^??' && echo " (with uncommitted changes)" || true)
cat > "$OUT/README.md" <<EOF
# shapes-tiny

The bundled model: preset \`tiny\` (64 px images, 8×8 tokens, 512 codes; transformer d=128,
4 layers, 4 heads) trained on the procedural shapes set from scratch on a CPU, exported to ONNX.
\`dalle generate\` and \`dalle eval\` use it when no \`--model\` is given.

Made by \`scripts/recipe-shapes-tiny.sh\` (seed $SEED, $TRAIN_IMAGES training scenes,
dVAE $VAE_STEPS steps, transformer $TF_STEPS steps) at commit $commit$dirty on $(nproc) CPU cores
($(date -u +%Y-%m-%d)). Default sampling recorded in the manifest: top-k 8, no guidance.

## Timeline

| elapsed | stage |
|---|---|
$(cat "$WORK/timeline.md")

## dVAE

$(cat "$WORK/vae-psnr.txt") (held-out renders: encode → argmax tokens → decode).
Curves: \`curves-dvae.png\`, \`curves-transformer.png\`.

## Eval (\`dalle eval --samples $EVAL_SAMPLES --guidance 1,3 --top-k 8\`, tract)

\`\`\`
$(cat "$OUT/eval.txt")
\`\`\`

\`grid.png\`: first row seen captions, second row held-out captions (framed in red), no guidance, top-k 8;
the captions are listed under the table above.
EOF
