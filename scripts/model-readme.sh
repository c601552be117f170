#!/usr/bin/env bash
# Write the README of a model made by scripts/recipe-shapes-f4.sh from what the recipe left in its work directory: how it was
# made (commit, seeds, machine, timeline), stage 1's recipe and round-trip diagnostics, stage 2's
# held-out loss, the guidance sweep, the eval table and the stage-1 ablation (ablation.md beside
# the model, written by scripts/ablation-dvae.sh, when present).
#
#   scripts/model-readme.sh OUT_MODEL_DIR WORK_DIR
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=$1
WORK=$2
commit=$(git rev-parse --short HEAD 2>/dev/null || echo unknown)
dirty=$(git status --porcelain 2>/dev/null | grep -qv '^??' && echo " (with uncommitted changes)" || true)
cpu=$(lscpu 2>/dev/null | sed -n 's/^Model name: *//p' | head -1)
train=$(python3 -c "import json; print(json.load(open('$WORK/transformer/train.json'))['loop']['steps'])")
vae_steps=$(python3 -c "import json; print(json.load(open('$WORK/vae/train.json'))['loop']['steps'])")

# Key numbers from the run directories.
numbers=$(python3 - "$WORK" "$OUT" <<'EOF'
import csv, json, sys, os
work, out = sys.argv[1], sys.argv[2]
def rows(path):
    return list(csv.DictReader(open(path)))
def last_with(rs, key):
    rs = [r for r in rs if r.get(key) not in (None, "", "NaN", "nan")]
    return rs[-1] if rs else None
vae = rows(os.path.join(work, "vae", "metrics.csv"))
r = last_with(vae, "rt_correct")
cfg = json.load(open(os.path.join(work, "vae", "train.json")))["schedule"]
print("### Stage 1 at its last step (EMA weights, 64 seen + 64 held-out diagnostic scenes)\n")
print(f"Judge on the argmax round trip: fully correct {100*float(r['rt_correct']):.0f}%, shape "
      f"{100*float(r['rt_shape']):.0f}%; held-out PSNR {float(r['rt_psnr']):.1f} dB; "
      f"{float(r['rt_codes']):.0f} codes in use (perplexity {float(r['rt_perplexity']):.1f}).\n")
print("Schedule (`train.json`): " + ", ".join(f"`{k}` {v}" for k, v in cfg.items()) + "\n")
print("| step | fully correct | shape | held-out PSNR | codes in use | perplexity |")
print("|---|---|---|---|---|---|")
for r in vae:
    if r.get("rt_correct") not in (None, "", "NaN", "nan"):
        print(f"| {r['step']} | {100*float(r['rt_correct']):.0f}% | {100*float(r['rt_shape']):.0f}% | "
              f"{float(r['rt_psnr']):.1f} | {float(r['rt_codes']):.0f} | {float(r['rt_perplexity']):.1f} |")
tf = rows(os.path.join(work, "transformer", "metrics.csv"))
print("\n### Stage 2: held-out loss (EMA weights, 256 held-out scenes, teacher-forced)\n")
print("| step | held-out loss | text | image | training loss |")
print("|---|---|---|---|---|")
for r in tf:
    if r.get("heldout_loss") not in (None, "", "NaN", "nan"):
        print(f"| {r['step']} | {float(r['heldout_loss']):.4f} | {float(r['heldout_text']):.4f} | "
              f"{float(r['heldout_image']):.4f} | {float(r['loss']):.4f} |")
sweep = os.path.join(work, "sweep.json")
if os.path.exists(sweep):
    s = json.load(open(sweep))
    print(f"\n### Guidance sweep ({s['samples']} scenes per split, top-k as exported)\n")
    print("| guidance | seen fully correct | held-out fully correct | seen shape | held-out shape |")
    print("|---|---|---|---|---|")
    by = {}
    for sc in s["scores"]:
        by.setdefault(sc["guidance_scale"], {})[sc["split"]] = sc
    for g in sorted(by):
        seen, held = by[g].get("seen"), by[g].get("held-out")
        pct = lambda sc: f"{100*sc['fully_correct']/max(sc['samples'],1):.0f}%"
        shp = lambda sc: f"{100*sc['attributes']['shape'][0]/max(sc['attributes']['shape'][1],1):.0f}%"
        print(f"| {g:g} | {pct(seen)} | {pct(held)} | {shp(seen)} | {shp(held)} |")
EOF
)
guidance=$(python3 -c "import json; print(json.load(open('$OUT/manifest.json'))['sampling']['guidance_scale'])")
top_k=$(python3 -c "import json; print(json.load(open('$OUT/manifest.json'))['sampling'].get('top_k'))")

{
cat <<EOF
# shapes (f4)

A model of preset \`shapes\` — 64-px images, an f4 dVAE (three groups, n_hid 64, one
block per group) whose 16×16 tokens come from 512 codes, and a transformer of d=128, 4 layers, 4
heads over 32 caption tokens and 256 image tokens — trained on the procedural shapes set from
scratch on a CPU, exported to ONNX.

Made by \`scripts/recipe-shapes-f4.sh\` (seed 0, 20000 training scenes, dVAE $vae_steps steps,
transformer $train steps) at commit $commit$dirty on $(nproc) CPU cores ($cpu), $(date -u +%Y-%m-%d).
Default sampling recorded in the manifest: top-k $top_k, classifier-free guidance $guidance (chosen
by the sweep below).

## Timeline

| time (UTC) | stage |
|---|---|
$(cat "$WORK/timeline.md")

## Eval (\`dalle eval --samples N --guidance $guidance,1 --top-k $top_k\`, tract)

\`\`\`
$(cat "$OUT/eval.txt")
\`\`\`

\`grid.png\`: first row seen captions, second row held-out captions (framed in red), guidance
$guidance, top-k $top_k; the captions are listed under the table above.

## Training

Curves: \`curves-dvae.png\` (loss, codebook use, the round-trip judge), \`curves-transformer.png\`
(training and held-out loss).

$numbers
EOF
if [ -f "$OUT/ablation.md" ]; then
  echo
  echo "## Stage 1 ablation (\`scripts/ablation-dvae.sh\`)"
  echo
  cat "$OUT/ablation.md"
fi
} > "$OUT/README.md"
echo "wrote $OUT/README.md"
