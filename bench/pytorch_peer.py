#!/usr/bin/env python3
"""The PyTorch peer of `dalle bench`: lucidrains' dalle-pytorch 1.6.6 with random weights, in the
geometry `dalle bench` passes, timed on the CPU with the same thread count.

Install (once): bash bench/install-peer.sh   (a venv in target/peer: torch 2.15.0, DALL-E 0.1, dalle-pytorch
1.6.6 without its unused dependencies). Run by `dalle bench --peer pytorch`, or alone:

    target/peer/bin/python bench/pytorch_peer.py --dim 512 --depth 12 --heads 8 \
        --text-len 64 --text-vocab 4096 --image-size 128 --grid 16 --codebook 2048

Prints one JSON object on stdout. Fairness, measured on this package:
- `generate_images(use_cache=True)` does not pass the cache on at cond_scale = 1, so decoding
  here drives `DALLE.forward(text, image, cache=cache)` itself, one token per call, as
  `generate_images` would with a working cache; sampling (top-k 0.5 + gumbel) is its own.
- its cache gives wrong logits for sparse attention layers (every sparse layer shares one cache
  key), so the peer uses its dense attention ('full'), which it caches correctly; dense
  attention over ≤ 320 positions is cheaper than the masked kernels, so this favours the peer.
- rotary embeddings and token shift are off: our model has learnt position embeddings and no
  shift, and both add per-step work to the peer.
- dalle-pytorch's DiscreteVAE is a different, much smaller network than the paper's dVAE, so the
  dVAE training step is also timed on OpenAI's own PyTorch dVAE (`dall_e` 0.1, the network ours
  mirrors layer for layer) in our geometry (`--vae-groups/--vae-hid/--vae-blocks/--vae-init`)
  with our loss: logit-Laplace NLL + beta * KL(q || uniform) through a gumbel-softmax at tau = 1.
"""

import argparse
import importlib.abc
import importlib.machinery
import json
import math
import sys
import time
import types


class _Stub(types.ModuleType):
    """Any attribute is another stub: enough for `from x import Y` of modules never called."""

    def __getattr__(self, name):
        if name.startswith("__"):
            raise AttributeError(name)
        return _Stub(f"{self.__name__}.{name}")

    def __call__(self, *args, **kwargs):
        return _Stub("call")


class _StubFinder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """dalle_pytorch imports VQGAN (taming, omegaconf), tokenizers, torchvision and
    pkg_resources at the top of its package; none is used by DALLE or DiscreteVAE."""

    ROOTS = {
        "pkg_resources", "taming", "omegaconf", "yaml", "requests", "tqdm", "youtokentome",
        "transformers", "ftfy", "tokenizers", "torchvision", "PIL", "webdataset", "regex",
        "deepspeed", "horovod", "packaging",
    }

    def find_spec(self, name, path, target=None):
        if name.split(".")[0] in self.ROOTS:
            return importlib.machinery.ModuleSpec(name, self, is_package=True)
        return None

    def create_module(self, spec):
        m = _Stub(spec.name)
        m.__path__ = []
        return m

    def exec_module(self, module):
        pass


sys.meta_path.insert(0, _StubFinder())

import torch  # noqa: E402
from dalle_pytorch import DALLE, DiscreteVAE  # noqa: E402


def build(a):
    torch.manual_seed(0)
    layers = (a.image_size // a.grid).bit_length() - 1
    vae = DiscreteVAE(
        image_size=a.image_size,
        num_tokens=a.codebook,
        codebook_dim=a.vae_dim,
        num_layers=layers,
        num_resnet_blocks=a.vae_resblocks,
        hidden_dim=a.vae_dim,
    )
    dalle = DALLE(
        dim=a.dim,
        vae=vae,
        num_text_tokens=a.text_vocab,
        text_seq_len=a.text_len,
        depth=a.depth,
        heads=a.heads,
        dim_head=a.dim // a.heads,
        attn_types=("full",),
        rotary_emb=False,
        shift_tokens=False,
    )
    return vae, dalle


def params(m):
    return sum(p.numel() for p in m.parameters())


@torch.no_grad()
def generate(dalle, batch, text_len, passes=1):
    """The fastest of `passes` generations (as ours: `dalle bench --passes`)."""
    text = torch.randint(1, dalle.num_text_tokens - text_len, (batch, text_len))
    # Warm-up, as ours: first calls (allocator, thread pool, kernels) are not timed.
    warm = {}
    dalle(text, torch.empty((batch, 0), dtype=torch.long), cache=warm)
    dalle(text, torch.zeros((batch, 1), dtype=torch.long), cache=warm)
    runs = [generate_once(dalle, batch, text) for _ in range(max(passes, 1))]
    return min(runs, key=lambda r: r["transformer_s"])


def generate_once(dalle, batch, text):
    """Caption prefill, then one cached forward + sample per image token; returns seconds."""
    image = torch.empty((batch, 0), dtype=torch.long)
    cache = {}
    steps = []
    t0 = time.perf_counter()
    logits = dalle(text, image, cache=cache)[:, -1]
    prefill = time.perf_counter() - t0
    for _ in range(dalle.image_seq_len):
        t = time.perf_counter()
        sample = torch.multinomial(torch.softmax(logits, -1), 1)[:, 0] - dalle.num_text_tokens
        image = torch.cat((image, sample.clamp(min=0)[:, None]), dim=-1)
        if image.shape[1] == dalle.image_seq_len:
            steps.append(time.perf_counter() - t)
            break
        logits = dalle(text, image, cache=cache)[:, -1]
        steps.append(time.perf_counter() - t)
    total = time.perf_counter() - t0
    t = time.perf_counter()
    dalle.vae.decode(image)
    decode = time.perf_counter() - t
    return {
        "batch": batch,
        "prefill_s": prefill,
        "first_step_s": sorted(steps[:5])[2] if len(steps) >= 5 else steps[0],
        "last_step_s": sorted(steps[-6:-1])[2] if len(steps) >= 6 else steps[-1],
        "transformer_s": total,
        "dvae_decode_s": decode,
        "image_tokens_per_s": batch * dalle.image_seq_len / total,
    }


def median(step, reps):
    """Median seconds of `reps` calls of `step` after one untimed warm-up call."""
    step()
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        step()
        times.append(time.perf_counter() - t)
    return sorted(times)[len(times) // 2]


def train_step_fns(vae, dalle, a):
    """One Adam update of each stage at batch a.train_batch, by name; and the OpenAI dVAE's
    parameter count (None without --vae-hid)."""
    b = a.train_batch
    dalle_params = [p for n, p in dalle.named_parameters() if not n.startswith("vae.")]
    opt = torch.optim.AdamW(dalle_params, lr=1e-4, betas=(0.9, 0.96), weight_decay=4.5e-2)

    def transformer_step():
        text = torch.randint(1, dalle.num_text_tokens - a.text_len, (b, a.text_len))
        codes = torch.randint(0, a.codebook, (b, a.grid * a.grid))
        loss = dalle(text, codes, return_loss=True)
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(dalle_params, 4.0)
        opt.step()

    for p in vae.parameters():
        p.requires_grad_(True)
    vopt = torch.optim.AdamW(vae.parameters(), lr=1e-4, weight_decay=1e-4)

    def vae_step():
        x = torch.rand(b, 3, a.image_size, a.image_size)
        loss = vae(x, return_loss=True)
        vopt.zero_grad()
        loss.backward()
        vopt.step()

    fns = {"transformer": transformer_step, "dvae": vae_step}
    openai_params = None
    if a.vae_hid > 0:
        fns["openai_dvae"], openai_params = openai_dvae_step(a)
    return fns, openai_params


def train_steps(vae, dalle, a):
    """Median seconds of an Adam update of each stage at batch a.train_batch."""
    fns, openai_params = train_step_fns(vae, dalle, a)
    out = {
        "batch": a.train_batch,
        "transformer_step_s": median(fns["transformer"], a.train_reps),
        "dvae_step_s": median(fns["dvae"], a.train_reps),
    }
    if "openai_dvae" in fns:
        out["openai_dvae_step_s"] = median(fns["openai_dvae"], a.train_reps)
        out["openai_dvae_params"] = openai_params
    return out


def serve_train(vae, dalle, a):
    """Training steps on request, so that a caller can alternate them with its own: after a
    `{"ready": ...}` line, each stdin line names a step (transformer, dvae, openai_dvae), which
    runs once and answers `{"s": seconds}`; `quit` or end of input stops."""
    fns, openai_params = train_step_fns(vae, dalle, a)
    ready = {"ready": True, "steps": sorted(fns), "threads": torch.get_num_threads(),
             "openai_dvae_params": openai_params}
    print(json.dumps(ready), flush=True)
    for line in sys.stdin:
        name = line.strip()
        if name == "quit":
            break
        if name not in fns:
            print(json.dumps({"error": f"unknown step {name!r}; known: {sorted(fns)}"}), flush=True)
            continue
        t = time.perf_counter()
        fns[name]()
        print(json.dumps({"s": time.perf_counter() - t}), flush=True)


def openai_dvae_step(a):
    """OpenAI's dVAE (dall_e 0.1) in our geometry, trained on our loss: (one step, params)."""
    from dall_e import Decoder, Encoder
    from dall_e.utils import map_pixels

    if a.vae_groups != 4:
        raise SystemExit(f"dall_e's networks have 4 groups; got --vae-groups {a.vae_groups}")
    torch.manual_seed(0)
    # Built without gradients (its init writes weights in place), then made trainable.
    common = dict(n_blk_per_group=a.vae_blocks, vocab_size=a.codebook, use_mixed_precision=False)
    enc = Encoder(n_hid=a.vae_hid, **common)
    dec = Decoder(n_init=a.vae_init, n_hid=a.vae_hid, **common)
    ps = list(enc.parameters()) + list(dec.parameters())
    for p in ps:
        p.requires_grad_(True)
    opt = torch.optim.AdamW(ps, lr=1e-4, weight_decay=1e-4)
    eps = 1e-10

    def step():
        x = torch.rand(a.train_batch, 3, a.image_size, a.image_size)
        logits = enc(x)
        g = -torch.log(-torch.log(torch.rand_like(logits) + eps) + eps)
        z = torch.softmax(logits + g, dim=1)
        stats = dec(z)
        mu, log_b = stats[:, :3], stats[:, 3:6]
        xm = map_pixels(x)
        ln_x, ln_1mx = torch.log(xm), torch.log1p(-xm)
        nll = (log_b + 0.6931471805599453 + ln_x + ln_1mx
               + (ln_x - ln_1mx - mu).abs() * torch.exp(-log_b)).sum()
        logq = torch.log_softmax(logits, dim=1)
        kl = (logq.exp() * logq).sum() + logq[:, 0].numel() * math.log(a.codebook)
        loss = (nll + 6.6 * kl) / x.numel()
        opt.zero_grad()
        loss.backward()
        opt.step()

    return step, sum(p.numel() for p in ps)


def matmul_rates(n=2048, reps=5):
    """torch's best 2048³ product on this CPU, GFLOP/s: f32, and bf16 (AMX / AVX512-BF16 where
    the CPU has them, else whatever oneDNN falls back to) — the ceilings `dalle bench` sets its
    own kernels against."""
    out = {}
    for name, dtype in [("f32", torch.float32), ("bf16", torch.bfloat16)]:
        a = torch.randn(n, n).to(dtype)
        b = torch.randn(n, n).to(dtype)
        with torch.no_grad():
            torch.mm(a, b)
            best = float("inf")
            for _ in range(reps):
                t = time.perf_counter()
                torch.mm(a, b)
                best = min(best, time.perf_counter() - t)
        out[name] = 2 * n ** 3 / best / 1e9
    return out


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    for name, default in [
        ("dim", 512), ("depth", 12), ("heads", 8), ("text-len", 64), ("text-vocab", 4096),
        ("image-size", 128), ("grid", 16), ("codebook", 2048), ("vae-dim", 64),
        ("vae-resblocks", 0), ("vae-groups", 4), ("vae-hid", 0), ("vae-blocks", 2),
        ("vae-init", 128), ("train-batch", 8), ("train-reps", 3), ("threads", 0), ("passes", 1),
    ]:
        p.add_argument(f"--{name}", type=int, default=default)
    p.add_argument("--batch", default="1,16", help="comma-separated generation batch sizes")
    p.add_argument("--serve-train", action="store_true",
                   help="run training steps on request from stdin (see serve_train)")
    a = p.parse_args()
    if a.threads > 0:
        torch.set_num_threads(a.threads)
    vae, dalle = build(a)
    if a.serve_train:
        dalle.train()
        serve_train(vae, dalle, a)
        return
    dalle.eval()
    out = {
        "peer": "dalle-pytorch",
        "version": __import__("dalle_pytorch").__version__,
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "transformer_params": params(dalle) - params(vae),
        "dvae_params": params(vae),
        "generate": [generate(dalle, int(b), a.text_len, a.passes)
                     for b in a.batch.split(",") if b],
        "matmul_gflop_per_s": matmul_rates(),
    }
    if a.train_batch > 0:
        dalle.train()
        out["train"] = train_steps(vae, dalle, a)
    json.dump(out, sys.stdout)
    print()


if __name__ == "__main__":
    main()
