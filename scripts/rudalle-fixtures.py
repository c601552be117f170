"""Random-weight ruDALL-E checkpoints and their outputs, made with the real package, for the
import tests (tests/rudalle.rs). Writes into tests/fixtures/rudalle/:

  transformer.pt        DalleModel's state_dict (torch.save, zip format) at a small geometry
  input_ids.npy         (2, text + grid²) int64: captions as rudalle takes them (BOS … EOS, 0 pads)
                        then raw image codes
  logits.npy            (2, text + grid², vocab) f32: the teacher-forced forward
  cached_logits.npy     (2, grid² + 1, vocab) f32: the last position's logits of the prefill of
                        the caption and then of each cached step, as rudalle's sampler calls it

Needs torch, rudalle==1.1.3 (--no-deps) and einops; the modules rudalle imports but this path
never runs are stubbed. Usage (see tests/fixtures/rudalle/README.md):
  python scripts/rudalle-fixtures.py [OUT_DIR]
"""
import os
import sys
import types

import numpy as np
import torch

# rudalle/__init__ imports its pipelines, VQGAN, tokenizer and super-resolution code; none of
# them runs here.
for name in ["huggingface_hub", "transformers", "torchvision", "matplotlib", "matplotlib.pyplot",
             "more_itertools", "pywt", "tqdm", "tqdm.auto", "requests", "PIL", "PIL.Image",
             "taming", "taming.modules", "taming.modules.diffusionmodules",
             "taming.modules.diffusionmodules.model", "omegaconf", "youtokentome"]:
    try:
        __import__(name)
    except Exception:
        m = types.ModuleType(name)
        m.__getattr__ = lambda attr, _n=name: type(attr, (), {})
        sys.modules[name] = m

from rudalle.dalle.model import DalleModel  # noqa: E402

OUT = sys.argv[1] if len(sys.argv) > 1 else os.path.join(
    os.path.dirname(__file__), "..", "tests", "fixtures", "rudalle")
# Malevich's structure (sandwich norms, PB-relax, v3) at a small geometry: 4 layers (rudalle's
# pattern equals ours there), text 16 positions of BPE ids 0..319, an 8×8 grid of 32 codes.
TEXT_VOCAB, TEXT_LEN, GRID, CODES, D, HEADS, LAYERS = 320, 16, 8, 32, 64, 4, 4

torch.manual_seed(0)
model = DalleModel(
    device="cpu", num_layers=LAYERS, vocab_size=TEXT_VOCAB + TEXT_LEN, hidden_size=D,
    num_attention_heads=HEADS, embedding_dropout_prob=0.0, attention_dropout_prob=0.0,
    output_dropout_prob=0.0, text_seq_length=TEXT_LEN, image_tokens_per_dim=GRID,
    image_vocab_size=CODES, cogview_sandwich_layernorm=True, cogview_pb_relax=True,
    hf_version="v3")
# Every parameter random, layer-norm gains and biases included, so a misplaced norm shows.
with torch.no_grad():
    for name, p in model.named_parameters():
        p.copy_(torch.randn_like(p) * (0.3 if p.dim() > 1 else 0.5) + (1.0 if name.endswith("layernorm.weight") or ".0.weight" in name else 0.0))
model.eval()
os.makedirs(OUT, exist_ok=True)
torch.save(model.state_dict(), os.path.join(OUT, "transformer.pt"))

# Two captions as rudalle's tokenizer writes them: BOS (2), BPE ids, EOS (3), then 0 pads.
g = torch.Generator().manual_seed(1)
text = torch.zeros(2, TEXT_LEN, dtype=torch.long)
for row, n in enumerate([5, 11]):
    text[row, 0] = 2
    text[row, 1:n + 1] = torch.randint(4, TEXT_VOCAB, (n,), generator=g)
    text[row, n + 1] = 3
image = torch.randint(0, CODES, (2, GRID * GRID), generator=g)
ids = torch.cat([text, image], dim=1)
total = TEXT_LEN + GRID * GRID
mask = torch.tril(torch.ones(2, 1, total, total))

with torch.no_grad():
    logits, _ = model(ids, mask)
    # The sampler's cached path (rudalle/pipelines.py generate_images): the caption, then one
    # more image token a call, each call given everything so far and the cache.
    cached, cache = [], None
    for n in range(TEXT_LEN, total + 1):
        out, cache = model(ids[:, :n], mask, cache=cache, use_cache=True)
        cached.append(out[:, -1])
cached = torch.stack(cached, dim=1)
np.save(os.path.join(OUT, "input_ids.npy"), ids.numpy().astype(np.int64))
np.save(os.path.join(OUT, "logits.npy"), logits.numpy().astype(np.float32))
np.save(os.path.join(OUT, "cached_logits.npy"), cached.numpy().astype(np.float32))
print(f"wrote {OUT}: logits {tuple(logits.shape)}, cached {tuple(cached.shape)}, "
      f"max |teacher-forced − cached| {(logits[:, TEXT_LEN - 1:] - cached).abs().max():.2e}")
