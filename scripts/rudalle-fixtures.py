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

# The text tokenizer: a YouTokenToMe BPE model trained on Russian and English captions, and the
# ids rudalle's tokenizer gives captions (lowercased, as rudalle's pipeline does; BOS and EOS
# are added by rudalle's wrapper, not by YouTokenToMe).
import json  # noqa: E402
import random  # noqa: E402

import youtokentome as yttm  # noqa: E402

rng = random.Random(2)
ru_colours = ["красный", "синий", "зелёный", "жёлтый", "белый", "чёрный", "фиолетовый", "оранжевый"]
ru_things = ["круг", "квадрат", "треугольник", "ромб", "звезда", "кольцо", "кот", "дом", "дерево",
             "машина", "собака", "цветок", "горы", "море", "город", "портрет"]
ru_places = ["в центре", "слева", "справа", "сверху", "снизу", "на фоне неба", "в лесу", "ночью"]
en_colours = ["red", "blue", "green", "yellow", "white", "black", "purple", "orange"]
en_things = ["circle", "square", "triangle", "diamond", "star", "ring", "cat", "house", "tree",
             "car", "dog", "flower", "mountains", "sea", "city", "portrait"]
en_places = ["in the center", "on the left", "on the right", "at the top", "at the bottom",
             "against the sky", "in a forest", "at night"]


def caption():
    if rng.random() < 0.5:
        words = [rng.choice(ru_colours), rng.choice(ru_things), rng.choice(ru_places)]
        if rng.random() < 0.3:
            words += ["и", rng.choice(ru_colours), rng.choice(ru_things)]
    else:
        words = ["a", rng.choice(en_colours), rng.choice(en_things), rng.choice(en_places)]
        if rng.random() < 0.3:
            words += ["and", "a", rng.choice(en_colours), rng.choice(en_things)]
    text = " ".join(words)
    if rng.random() < 0.2:
        text = text.capitalize() + rng.choice([".", "!", ",", " 2021", " ..."])
    return text


train = [caption() for _ in range(3000)]
corpus = os.path.join(OUT, "corpus.tmp")
with open(corpus, "w") as f:
    f.write("\n".join(train))
bpe_path = os.path.join(OUT, "bpe.model")
yttm.BPE.train(data=corpus, model=bpe_path, vocab_size=TEXT_VOCAB, coverage=0.9995, n_threads=1)
os.remove(corpus)
bpe = yttm.BPE(model=bpe_path)
# Seen and unseen captions, and what a user may type: capitals, runs of spaces, tabs and
# newlines, rudalle's own word-start mark, characters the model never saw (one, and runs).
tests = [caption() for _ in range(1200)] + [
    "", " ", "   ", "\t\n", "КРАСНЫЙ   круг\tв\nцентре  ", "a ▁red circle", "▁", "звезда▁и кольцо",
    "кот 🐈 на крыше", "猫猫 и dog", "ёжик в тумане", "Ü ü ß", "x" * 40, "2021 год, 1/2 + 3 = 4?",
    "  leading and trailing  ", "émigré café naïve", "a\u00a0non-breaking space",
]
ids = [bpe.encode([t.lower()], output_type=yttm.OutputType.ID)[0] for t in tests]
with open(os.path.join(OUT, "tokenizer_cases.json"), "w") as f:
    json.dump({"captions": tests, "ids": ids}, f, ensure_ascii=False)
print(f"wrote {bpe_path} (vocab {bpe.vocab_size()}) and {len(tests)} tokenized captions")

# The image tokenizer: Sber's VQGAN (rudalle.vae.model.GumbelVQ over taming's Encoder/Decoder)
# at a small geometry — f8 (four levels), GroupNorm(32) widths, attention at the lowest
# resolution as in vqgan.gumbelf8-sber.config.yml — saved as its Lightning checkpoint is
# ({"state_dict": …}, here in f16), with rudalle's codes and decoded pixels for two random images.
from rudalle.vae.model import GumbelVQ  # noqa: E402

torch.manual_seed(3)
ddconfig = dict(double_z=False, z_channels=16, resolution=64, in_channels=3, out_ch=3, ch=32,
                ch_mult=[1, 1, 1, 2], num_res_blocks=1, attn_resolutions=[8], dropout=0.0)
vq = GumbelVQ(ddconfig=ddconfig, n_embed=CODES, embed_dim=16, kl_weight=1e-8)
with torch.no_grad():
    for name, p in vq.named_parameters():
        if p.dim() == 1 and "norm" in name and name.endswith("weight"):
            p.copy_(1.0 + 0.3 * torch.randn_like(p))
        elif p.dim() == 1:
            p.copy_(0.1 * torch.randn_like(p))
    # Stored in f16 (half the fixture's bytes; the reader widens it); the outputs below come from
    # the same rounded weights.
    for p in vq.parameters():
        p.copy_(p.half().float())
vq.eval()
state = {k: (v.half() if v.is_floating_point() else v) for k, v in vq.state_dict().items()}
torch.save({"state_dict": state, "global_step": 0}, os.path.join(OUT, "vqgan.ckpt"))
images = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(4))
with torch.no_grad():
    # rudalle's VQGanGumbelVAE.get_codebook_indices (argmax codes) and .decode.
    _, _, (_, _, codes) = vq.encode(2 * images - 1, disable_gumbel_softmax=True)
    codes = codes.reshape(2, -1)
    z = torch.nn.functional.one_hot(codes, num_classes=CODES).float() @ vq.quantize.embed.weight
    z = z.reshape(2, 8, 8, 16).permute(0, 3, 1, 2)
    pixels = (vq.decode(z).clamp(-1.0, 1.0) + 1) * 0.5
np.save(os.path.join(OUT, "vqgan_images.npy"), images.numpy().astype(np.float32))
np.save(os.path.join(OUT, "vqgan_codes.npy"), codes.numpy().astype(np.int64))
np.save(os.path.join(OUT, "vqgan_pixels.npy"), pixels.numpy().astype(np.float32))
print(f"wrote vqgan.ckpt: codes {tuple(codes.shape)} ({len(set(codes.flatten().tolist()))} distinct), "
      f"pixels {tuple(pixels.shape)}")
