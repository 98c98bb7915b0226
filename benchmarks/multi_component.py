"""Multi-component study (issue 16): one D, lr multipliers, one D per component, couplings.

    python benchmarks/multi_component.py                   # all three studies, 3 seeds (~28 min, 2-core CPU)
    python benchmarks/multi_component.py --quick           # smoke test: seconds, numbers are not results
    python benchmarks/multi_component.py --studies two-component --seeds 5
    python benchmarks/multi_component.py --update-results  # refresh benchmarks/results/multi_component/<study>.md

Studies (every optimizer config sees the same initialisation, minibatches and noise per seed):

- ``sdxl-scratch``: an SDXL-like pair trained from random weights: a small conditional denoising
  UNet (conv down/up blocks, time embedding, cross-attention on the text encoder's tokens, the
  pooled text embedding added to the time embedding as SDXL does) and a small transformer text
  encoder over captions ("a drawing of a sneaker"), on Fashion-MNIST images (pooled to 14x14).
  Quality: held-out noise-prediction MSE, and the text gain (MSE with shuffled captions minus MSE
  with the right ones: how much the UNet uses the text encoder).
- ``sdxl-finetune``: the text encoder is first pretrained CLIP-style (contrastive against a small
  image encoder, caption templates set A) and then fine-tuned with a fresh UNet on the denoising
  task with captions of templates set B. Retained task: zero-shot classification of held-out
  images by the frozen image encoder and the fine-tuned text encoder on templates A. Drift:
  ``||theta - theta_pretrained|| / ||theta_pretrained||`` of the text encoder.
- ``two-component``: the convergence suite's task (``convergence.py``: pretrained encoder plus a
  new head on MNIST-1D), through ``convergence.train_run``, for the same configs.

Configs: K-Prodigy with one D; one D with 0.3 / 0.1 lr multipliers on the text-encoder (encoder)
group; ``independent_d=True`` alone, with ``d_ratio_cap=10`` and with a 0.1 multiplier; a
weight-decay split as Hugging Face's Trainer builds it (decay / no-decay groups over the whole
model, weight decay 0.01) with one D and with ``independent_d``; and prototype couplings of the
per-group D values (``CoupledKProdigy`` below: not part of kprodigy). All use lr=1 and a cosine
schedule of the lr multiplier, as ``convergence.py``.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import random
import statistics
import sys
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _output  # noqa: E402
import convergence as C  # noqa: E402
import convergence_tasks as T  # noqa: E402

from kprodigy import KProdigy  # noqa: E402

RESULTS_SUBDIR = "multi_component"
STUDIES = ("sdxl-scratch", "sdxl-finetune", "two-component")

# ------------------------------------------------------------------ captions
CLASS_NAMES = ["t-shirt", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag", "ankle boot"]
TEMPLATES_A = ["a photo of a {}", "a picture of the {}", "an image of a {}"]  # text-encoder pretraining
TEMPLATES_B = ["a drawing of a {}", "a sketch of the {}", "a grey {} on black"]  # fine-tuning (shifted)
MAX_LEN = 8


def _vocab() -> dict[str, int]:
    words = sorted({w for t in TEMPLATES_A + TEMPLATES_B for w in t.split() if w != "{}"}
                   | {w for c in CLASS_NAMES for w in c.split()})
    return {w: i + 1 for i, w in enumerate(words)}  # 0 is padding


VOCAB = _vocab()


def tokenize(captions: list[str]) -> torch.Tensor:
    out = torch.zeros(len(captions), MAX_LEN, dtype=torch.int64)
    for i, c in enumerate(captions):
        ids = [VOCAB[w] for w in c.split()]
        out[i, : len(ids)] = torch.tensor(ids)
    return out


def caption_tokens(templates: list[str]) -> torch.Tensor:
    """(n_templates, 10, MAX_LEN): the caption of every class under every template."""
    return torch.stack([tokenize([t.format(c) for c in CLASS_NAMES]) for t in templates])


def captions_for(labels: torch.Tensor, table: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Tokens of one caption per label, each with a random template of ``table``."""
    which = torch.randint(len(table), (len(labels),), generator=gen)
    return table[which, labels]


# -------------------------------------------------------------------- models
class Attention(nn.Module):
    """Multi-head attention written out (torch's CPU flash kernel costs ~5 ms a call at these
    tiny sizes); ``pad`` (batch, keys) is True at padding keys."""

    def __init__(self, dim: int, ctx_dim: int, heads: int = 4) -> None:
        super().__init__()
        self.heads = heads
        self.q, self.kv, self.o = nn.Linear(dim, dim), nn.Linear(ctx_dim, 2 * dim), nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, ctx: torch.Tensor, pad: torch.Tensor) -> torch.Tensor:
        b, n, dim = x.shape
        q = self.q(x).view(b, n, self.heads, -1).transpose(1, 2)
        k, v = self.kv(ctx).view(b, ctx.shape[1], 2, self.heads, -1).permute(2, 0, 3, 1, 4)
        scores = (q @ k.transpose(-1, -2)) / math.sqrt(q.shape[-1])
        attn = scores.masked_fill(pad[:, None, None, :], -math.inf).softmax(-1)
        return self.o((attn @ v).transpose(1, 2).reshape(b, n, dim))


class TextBlock(nn.Module):
    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.n1, self.attn = nn.LayerNorm(dim), Attention(dim, dim, heads)
        self.n2, self.mlp = nn.LayerNorm(dim), nn.Sequential(nn.Linear(dim, 2 * dim), nn.GELU(), nn.Linear(2 * dim, dim))

    def forward(self, h: torch.Tensor, pad: torch.Tensor) -> torch.Tensor:
        x = self.n1(h)
        h = h + self.attn(x, x, pad)
        return h + self.mlp(self.n2(h))


class TextEncoder(nn.Module):
    """A small CLIP-like text transformer: token + position embedding, pre-norm blocks. Returns
    per-token states (for cross-attention) and a pooled, projected embedding."""

    def __init__(self, dim: int = 64, layers: int = 2, heads: int = 4) -> None:
        super().__init__()
        self.tok = nn.Embedding(len(VOCAB) + 1, dim, padding_idx=0)
        self.pos = nn.Parameter(0.02 * torch.randn(MAX_LEN, dim))
        self.blocks = nn.ModuleList(TextBlock(dim, heads) for _ in range(layers))
        self.norm = nn.LayerNorm(dim)
        self.proj = nn.Linear(dim, dim, bias=False)

    def forward(self, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        pad = tokens == 0
        h = self.tok(tokens) + self.pos
        for block in self.blocks:
            h = block(h, pad)
        h = self.norm(h)
        keep = (~pad).unsqueeze(-1).float()
        pooled = (h * keep).sum(1) / keep.sum(1)
        return h, self.proj(pooled)


class ImageEncoder(nn.Module):
    """The CLIP image tower of the pretraining (frozen afterwards)."""

    def __init__(self, dim: int = 64) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Conv2d(1, 16, 3, 2, 1), nn.SiLU(), nn.Conv2d(16, 32, 3, 2, 1), nn.SiLU(),
                                 nn.Flatten(), nn.Linear(32 * 4 * 4, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class ResBlock(nn.Module):
    def __init__(self, c_in: int, c_out: int, t_dim: int) -> None:
        super().__init__()
        self.n1, self.c1 = nn.GroupNorm(8, c_in), nn.Conv2d(c_in, c_out, 3, padding=1)
        self.t = nn.Linear(t_dim, c_out)
        self.n2, self.c2 = nn.GroupNorm(8, c_out), nn.Conv2d(c_out, c_out, 3, padding=1)
        self.skip = nn.Conv2d(c_in, c_out, 1) if c_in != c_out else nn.Identity()

    def forward(self, x: torch.Tensor, temb: torch.Tensor) -> torch.Tensor:
        h = self.c1(F.silu(self.n1(x))) + self.t(temb)[:, :, None, None]
        return self.skip(x) + self.c2(F.silu(self.n2(h)))


class CrossAttention(nn.Module):
    """Image positions attend to the text encoder's tokens (padding masked), residual."""

    def __init__(self, c: int, ctx_dim: int, heads: int = 4) -> None:
        super().__init__()
        self.norm, self.attn = nn.GroupNorm(8, c), Attention(c, ctx_dim, heads)

    def forward(self, x: torch.Tensor, ctx: torch.Tensor, pad: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        out = self.attn(self.norm(x).flatten(2).transpose(1, 2), ctx, pad)
        return x + out.transpose(1, 2).reshape(b, c, h, w)


def timestep_embedding(t: torch.Tensor, dim: int) -> torch.Tensor:
    freqs = torch.exp(-math.log(1000.0) * torch.arange(dim // 2, dtype=torch.float32) / (dim // 2))
    args = 1000.0 * t[:, None] * freqs[None]
    return torch.cat([args.sin(), args.cos()], 1)


class SmallUNet(nn.Module):
    """Conditional denoiser on 14x14: two levels (16, 32 channels), cross-attention on the text
    tokens at the 7x7 level only (SDXL has none at its highest resolution either), the pooled
    text embedding added to the time embedding (SDXL's ``add_embeds``)."""

    def __init__(self, ctx_dim: int = 64, ch: tuple[int, int] = (16, 32), t_dim: int = 64) -> None:
        super().__init__()
        c1, c2 = ch
        self.t_dim = t_dim
        self.time = nn.Sequential(nn.Linear(64, t_dim), nn.SiLU(), nn.Linear(t_dim, t_dim))
        self.add = nn.Linear(ctx_dim, t_dim)
        self.inp = nn.Conv2d(1, c1, 3, padding=1)
        self.down1 = ResBlock(c1, c1, t_dim)
        self.pool = nn.Conv2d(c1, c2, 3, stride=2, padding=1)
        self.mid, self.attn2 = ResBlock(c2, c2, t_dim), CrossAttention(c2, ctx_dim)
        self.upc = nn.Conv2d(c2, c1, 3, padding=1)
        self.up1 = ResBlock(2 * c1, c1, t_dim)
        self.out = nn.Sequential(nn.GroupNorm(8, c1), nn.SiLU(), nn.Conv2d(c1, 1, 3, padding=1))

    def forward(self, x, t, ctx, pooled, pad):  # noqa: ANN001, ANN201 - tensors
        temb = self.time(timestep_embedding(t, 64)) + self.add(pooled)
        h1 = self.down1(self.inp(x), temb)
        h2 = self.attn2(self.mid(self.pool(h1), temb), ctx, pad)
        up = self.upc(F.interpolate(h2, size=h1.shape[-2:], mode="nearest"))
        h = self.up1(torch.cat([up, h1], 1), temb)
        return self.out(h)


def alpha_bar(t: torch.Tensor) -> torch.Tensor:
    """Cosine noise schedule (Nichol & Dhariwal), t in [0, 1]."""
    return torch.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2


def denoise_loss(unet: SmallUNet, te: TextEncoder, x0, tokens, t, noise) -> torch.Tensor:  # noqa: ANN001
    ab = alpha_bar(t)[:, None, None, None]
    xt = ab.sqrt() * x0 + (1 - ab).sqrt() * noise
    ctx, pooled = te(tokens)
    return F.mse_loss(unet(xt, t, ctx, pooled, tokens == 0), noise)


# ---------------------------------------------------------------------- data
@dataclass
class ImageData:
    x: torch.Tensor  # (n, 1, 14, 14) in [-1, 1]
    y: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor
    note: str


def image_data(n_train: int, n_test: int) -> ImageData:
    """Fashion-MNIST (Debian ``dataset-fashion-mnist``), average-pooled to 14x14, scaled to [-1, 1]."""
    d = T.fashion_data(n_train, n_test)
    if "fell back" in d.note:
        raise SystemExit(f"this study needs Fashion-MNIST: {d.note}")
    scale = lambda a: F.avg_pool2d(a * 90.02 + 72.94, 2) / 127.5 - 1.0  # noqa: E731 - back to 0..255, then [-1, 1]
    return ImageData(scale(d.x), d.y, scale(d.x_test), d.y_test, d.note + ", pooled to 14x14")


# ---------------------------------------------------------------- optimizers
class CoupledKProdigy(KProdigy):
    """PROTOTYPE, not part of kprodigy: one D per param group (``independent_d=True``) whose values
    are coupled across the groups after every step by rewriting ``group["d"]``.

    Each group's own D is its ``d_max`` (``growth_rate=inf``: the D that KProdigy just computed
    from that group's statistics alone; the next step recomputes it from ``d_max``, so the
    rewrite changes the step size used, not the group's own estimate). ``pool`` is the running
    maximum of ``d_coef * sum_g d_numerator_g / sum_g d_denom_g``, the estimate pooled over groups.

    - ``"floor"``: ``d_g = max(own_g, ratio * pool)`` (a floor relative to the pooled D)
    - ``"mean"``: every group ``d = mean(own)``; ``"hmean"``: the harmonic mean of ``own``
    - ``"shared-denom"``: ``d_g`` = running max of ``d_coef * d_numerator_g / sum_h d_denom_h``
      (each group's numerator over the pooled denominator; the values sum to ``pool``)

    ``coupling=None`` is KProdigy unchanged. ``wd_split`` regroups the given params as Hugging
    Face's Trainer does (all tensors of >= 2 dims with that weight decay, the rest without).
    """

    def __init__(self, params: Any, coupling: str | None = None, ratio: float = 0.1,
                 wd_split: float | None = None, **kwargs: Any) -> None:
        if wd_split is not None:
            params = hf_weight_decay_split(params, wd_split)
        if coupling is not None:
            if coupling not in ("floor", "mean", "hmean", "shared-denom"):
                raise ValueError(f"unknown coupling {coupling!r}")
            if kwargs.get("growth_rate", math.inf) != math.inf:
                raise ValueError("the prototype reads the own D from d_max: growth_rate must be inf")
            kwargs["independent_d"] = True
        super().__init__(params, **kwargs)
        self.coupling, self.ratio = coupling, ratio
        self._pool, self._shares = 0.0, {}

    def step(self, closure: Any = None) -> Any:
        loss = super().step(closure)
        if self.coupling is not None:
            self._couple()
        return loss

    def _couple(self) -> None:
        groups = [g for g in self.param_groups if g["lr"] > 0 and g["k"] > 0]
        if len(groups) < 2:
            return
        own = [g["d_max"] for g in groups]
        num, den = sum(g["d_numerator"] for g in groups), sum(g["d_denom"] for g in groups)
        if den > 0:
            self._pool = max(self._pool, groups[0]["d_coef"] * num / den)
        if self.coupling == "floor":
            new = [max(d, self.ratio * self._pool) for d in own]
        elif self.coupling == "mean":
            new = [sum(own) / len(own)] * len(own)
        elif self.coupling == "hmean":
            new = [len(own) / sum(1.0 / d for d in own)] * len(own)
        else:  # shared-denom
            new = []
            for i, (g, _own_d) in enumerate(zip(groups, own)):
                share = g["d_coef"] * g["d_numerator"] / den if den > 0 else 0.0
                self._shares[i] = max(self._shares.get(i, g["d0"]), share)
                new.append(self._shares[i])
        for g, d in zip(groups, new):
            g["d"] = d


def hf_weight_decay_split(params: Any, weight_decay: float) -> list[dict[str, Any]]:
    """Hugging Face Trainer's two param groups over the whole model: weights (>= 2 dims) decay,
    biases and norm weights (1 dim) do not; per-component lr multipliers are not kept."""
    tensors = [p for g in params for p in g["params"]] if isinstance(params[0], dict) else list(params)
    return [{"params": [p for p in tensors if p.dim() >= 2], "weight_decay": weight_decay},
            {"params": [p for p in tensors if p.dim() < 2], "weight_decay": 0.0}]


@dataclass
class Config:
    """One optimizer setting; ``te_lr`` multiplies the lr of the text-encoder (encoder) group."""

    name: str
    te_lr: float = 1.0
    kwargs: dict = field(default_factory=dict)
    kind: str = "kprodigy"  # or "adamw" (lr: ``adamw_lr``)
    adamw_lr: float = 1e-3
    note: str = ""


CONFIGS = [
    Config("one D", note="KProdigy defaults"),
    Config("one D, te lr 0.3", te_lr=0.3),
    Config("one D, te lr 0.1", te_lr=0.1),
    Config("independent_d", kwargs={"independent_d": True}),
    Config("independent_d, cap 10", kwargs={"independent_d": True, "d_ratio_cap": 10.0}),
    Config("independent_d, te lr 0.1", te_lr=0.1, kwargs={"independent_d": True}),
    Config("HF wd split, one D", kwargs={"wd_split": 0.01}),
    Config("HF wd split, independent_d", kwargs={"wd_split": 0.01, "independent_d": True}),
    Config("proto: floor 0.1 x pooled", kwargs={"coupling": "floor", "ratio": 0.1}),
    Config("proto: mean of Ds", kwargs={"coupling": "mean"}),
    Config("proto: harmonic mean of Ds", kwargs={"coupling": "hmean"}),
    Config("proto: shared denominator", kwargs={"coupling": "shared-denom"}),
    *(Config(f"AdamW {lr:g}, te {lr / 10:g}", kind="adamw", adamw_lr=lr, te_lr=0.1,
             note="reference: a 3-point grid of lr, not tuned on a validation split") for lr in (1e-3, 3e-3, 1e-2)),
]
NO_MULTIPLIER_STUDY = {"sdxl-scratch"}  # both components new: rows with a te multiplier (AdamW too) left out


def build_optimizer(cfg: Config, groups: list[dict[str, Any]]) -> torch.optim.Optimizer:
    """``groups``: [text encoder (encoder), UNet (head)] as dicts with ``params`` and ``lr``."""
    if cfg.kind == "adamw":  # the groups' lr are multipliers here: scale them by AdamW's lr
        return torch.optim.AdamW([{**g, "lr": g["lr"] * cfg.adamw_lr} for g in groups], weight_decay=0.0)
    return CoupledKProdigy(groups, lr=1.0, **cfg.kwargs)


class _ConfigClass:
    """``convergence.make_optimizer`` builds ``_kprodigy_class()(groups, lr=..., **kwargs)``: this
    hands it ``CoupledKProdigy`` so that the two-component task runs through ``train_run`` as is."""

    def __enter__(self) -> None:
        self._saved = C._kprodigy_class
        C._kprodigy_class = lambda: CoupledKProdigy

    def __exit__(self, *exc: Any) -> None:
        C._kprodigy_class = self._saved


def group_ds(opt: torch.optim.Optimizer, te_params: set[int], names: tuple[str, str] = ("te", "unet")) -> dict[str, float]:
    """D used by the last step, per group, named by the component it holds (``mixed`` for a
    weight-decay split over the whole model, with ``:decay`` / ``:no-decay``)."""
    out = {}
    for g in opt.param_groups:
        if "d" not in g:
            continue
        ids = {id(p) for p in g["params"]}
        name = names[0] if ids <= te_params else names[1] if not ids & te_params else "mixed"
        if name == "mixed":
            name += ":decay" if g["weight_decay"] else ":no-decay"
        out[name] = float(g["d"])
    return out


# ------------------------------------------------------------- the SDXL task
@dataclass
class SDXLSetup:
    steps: int = 300
    batch: int = 32
    pretrain_steps: int = 600
    n_train: int = 12000
    n_eval: int = 512


@torch.no_grad()
def eval_denoise(unet: SmallUNet, te: TextEncoder, data: ImageData, n: int, table: torch.Tensor) -> tuple[float, float]:
    """(held-out noise-prediction MSE, text gain) on the first ``n`` test images, fixed t and noise."""
    gen = torch.Generator().manual_seed(12345)
    x0, y = data.x_test[:n], data.y_test[:n]
    t = torch.rand(n, generator=gen) * 0.98 + 0.01
    noise = torch.randn(x0.shape, generator=gen)
    tokens = captions_for(y, table, gen)
    wrong = captions_for((y + 1 + torch.randint(9, (n,), generator=gen)) % 10, table, gen)
    right = denoise_loss(unet, te, x0, tokens, t, noise).item()
    return right, denoise_loss(unet, te, x0, wrong, t, noise).item() - right


@torch.no_grad()
def zero_shot(te: TextEncoder, img: ImageEncoder, data: ImageData, n: int = 2000) -> tuple[float, float]:
    """(accuracy, CLIP loss) of classifying held-out images by their nearest class caption (templates A)."""
    cls = class_embeddings(te)
    feats = F.normalize(img(data.x_test[-n:]), dim=-1)
    logits = feats @ cls.T / 0.07
    y = data.y_test[-n:]
    return (logits.argmax(1) == y).float().mean().item(), F.cross_entropy(logits, y).item()


def class_embeddings(te: TextEncoder) -> torch.Tensor:
    table = caption_tokens(TEMPLATES_A)
    emb = F.normalize(te(table.flatten(0, 1))[1], dim=-1).view(len(TEMPLATES_A), 10, -1).mean(0)
    return F.normalize(emb, dim=-1)


_CLIP_CACHE: dict[tuple[int, int], tuple[TextEncoder, ImageEncoder, float, float]] = {}


def pretrain_clip(data: ImageData, seed: int, steps: int, batch: int = 128) -> tuple[TextEncoder, ImageEncoder, float, float]:
    """Text and image encoder trained contrastively (captions of templates A), AdamW 1e-3; cached per seed."""
    key = (seed, steps)
    if key not in _CLIP_CACHE:
        torch.manual_seed(20_000 + seed)
        te, img = TextEncoder(), ImageEncoder()
        opt = torch.optim.AdamW(list(te.parameters()) + list(img.parameters()), lr=1e-3, weight_decay=0.0)
        gen = torch.Generator().manual_seed(20_000 + seed)
        for _ in range(steps):
            idx = torch.randint(len(data.y), (batch,), generator=gen)
            feats = F.normalize(img(data.x[idx]), dim=-1)
            cls = F.normalize(te(captions_for(torch.arange(10), caption_tokens(TEMPLATES_A), gen))[1], dim=-1)
            loss = F.cross_entropy(feats @ cls.T / 0.07, data.y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
        img.requires_grad_(False)
        acc, clip_loss = zero_shot(te, img, data)
        _CLIP_CACHE[key] = (te, img, acc, clip_loss)
    return _CLIP_CACHE[key]


def sdxl_run(cfg: Config, data: ImageData, seed: int, setup: SDXLSetup, pretrained: bool) -> dict[str, Any]:
    """Train text encoder + UNet jointly on the denoising task; per-group D, quality, drift."""
    pre = pretrain_clip(data, seed, setup.pretrain_steps) if pretrained else None
    torch.manual_seed(seed)
    te = copy.deepcopy(pre[0]) if pre else TextEncoder()
    unet = SmallUNet()
    te0 = [p.detach().clone() for p in te.parameters()]
    groups = [{"params": list(te.parameters()), "lr": cfg.te_lr}, {"params": list(unet.parameters()), "lr": 1.0}]
    opt = build_optimizer(cfg, groups)
    base = [g["lr"] for g in opt.param_groups]
    table = caption_tokens(TEMPLATES_B)
    gen = torch.Generator().manual_seed(1_000 + seed)
    losses, t0 = [], time.perf_counter()
    for step in range(setup.steps):
        mult = 0.5 * (1.0 + math.cos(math.pi * step / setup.steps))
        for g, lr in zip(opt.param_groups, base):
            g["lr"] = lr * mult
        idx = torch.randint(len(data.y), (setup.batch,), generator=gen)
        x0 = data.x[idx]
        t = torch.rand(setup.batch, generator=gen) * 0.98 + 0.01
        noise = torch.randn(x0.shape, generator=gen)
        loss = denoise_loss(unet, te, x0, captions_for(data.y[idx], table, gen), t, noise)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(loss.item())
        if not math.isfinite(losses[-1]):
            break
    mse, gain = eval_denoise(unet, te, data, setup.n_eval, table)
    out = {"seed": seed, "config": cfg.name, "seconds": time.perf_counter() - t0, "new_task_mse": mse,
           "text_gain": gain, "final_train_loss": float(np.mean(losses[-20:])),
           "d": group_ds(opt, {id(p) for p in te.parameters()})}
    with torch.no_grad():
        num = sum(((p - p0) ** 2).sum() for p, p0 in zip(te.parameters(), te0))
        out["te_drift"] = math.sqrt(num / sum((p0**2).sum() for p0 in te0))
    if pre:
        out["retained_acc"], out["retained_clip_loss"] = zero_shot(te, pre[1], data)
        out["pretrained_acc"], out["pretrained_clip_loss"] = pre[2], pre[3]
    return out


# ------------------------------------------------------ the two-component task
def two_component_run(cfg: Config, task: T.Task, data: T.Data, seed: int, scale: float) -> dict[str, Any]:
    if cfg.kind == "adamw":
        occ = C.OptConfig(cfg.name, "adamw", lr=cfg.adamw_lr, enc_lr=cfg.te_lr)
    else:
        occ = C.OptConfig(cfg.name, "kprodigy", enc_lr=cfg.te_lr, kwargs=dict(cfg.kwargs))
    with _ConfigClass():
        r = C.train_run(task, data, occ, seed, task.steps, scale)
    d = {}
    if r["d_curve"]:  # the last point of each group's curve: the mean D of the last steps (600 / 200 = 3)
        names = ["mixed:decay", "mixed:no-decay"] if "wd_split" in cfg.kwargs else ["enc", "head"]
        d = {n: c[-1] for n, c in zip(names, r["d_curve"])}
    return {"seed": seed, "config": cfg.name, "seconds": r["seconds"], "new_task_acc": r["test_acc"],
            "retained_acc": r["retention_acc"], "pretrained_acc": r["pretrained_old_acc"],
            "te_drift": r["encoder_drift"], "final_train_loss": r["train_loss"], "d": d}


# ---------------------------------------------------------------- reporting
def mean_se(xs: list[float]) -> tuple[float, float]:
    xs = [x for x in xs if x is not None and math.isfinite(x)]
    if not xs:
        return math.nan, math.nan
    return statistics.fmean(xs), (statistics.stdev(xs) / math.sqrt(len(xs)) if len(xs) > 1 else math.nan)


def _fmt(m: float, s: float, digits: int, pct: bool = False) -> str:
    if not math.isfinite(m):
        return "-"
    k = 100.0 if pct else 1.0
    return f"{m * k:.{digits}f} ± {s * k:.{digits}f}" if math.isfinite(s) else f"{m * k:.{digits}f}"


def _fmt_g(m: float, s: float) -> str:
    """Three significant digits (drift spans 1e-4 to 1)."""
    if not math.isfinite(m):
        return "-"
    return f"{m:.3g} ± {s:.2g}" if math.isfinite(s) else f"{m:.3g}"


def _fmt_d(runs: list[dict]) -> str:
    keys = list(runs[0]["d"]) if runs and runs[0].get("d") else []
    if not keys:
        return "-"
    parts = []
    for k in keys:
        vals = [r["d"][k] for r in runs if k in r.get("d", {})]
        parts.append(f"{k} {math.exp(statistics.fmean(math.log(v) for v in vals)):.2e}")
    for a, b in (("te", "unet"), ("enc", "head"), ("mixed:no-decay", "mixed:decay")):
        if a in keys and b in keys:
            ratio = [r["d"][b] / r["d"][a] for r in runs]
            parts.append(f"({b}/{a} {math.exp(statistics.fmean(math.log(v) for v in ratio)):.3g}x)")
    return ", ".join(parts)


def study_table(study: str, runs: list[dict]) -> str:
    by_cfg: dict[str, list[dict]] = {}
    for r in runs:
        by_cfg.setdefault(r["config"], []).append(r)
    if study == "two-component":
        head = ["config", "new-task test acc %", "retained (old-task) acc %", "encoder drift", "D at the end"]
        rows = [[c, _fmt(*mean_se([r["new_task_acc"] for r in rs]), 2, True),
                 _fmt(*mean_se([r["retained_acc"] for r in rs]), 2, True),
                 _fmt_g(*mean_se([r["te_drift"] for r in rs])), _fmt_d(rs)] for c, rs in by_cfg.items()]
        pre = mean_se(list({r["seed"]: r["pretrained_acc"] for r in runs}.values()))  # one value per seed
        foot = f"Old-task accuracy right after pretraining: {_fmt(*pre, 2, True)} %."
    else:
        head = ["config", "held-out denoise MSE (new task)", "text gain"]
        if study == "sdxl-finetune":
            head += ["retained zero-shot acc %", "text-encoder drift"]
        else:
            head += ["text-encoder change from its random init"]
        head += ["D at the end (geometric mean over seeds)"]
        rows = []
        for c, rs in by_cfg.items():
            row = [c, _fmt(*mean_se([r["new_task_mse"] for r in rs]), 4), _fmt(*mean_se([r["text_gain"] for r in rs]), 4)]
            if study == "sdxl-finetune":
                row += [_fmt(*mean_se([r["retained_acc"] for r in rs]), 1, True)]
            row += [_fmt_g(*mean_se([r["te_drift"] for r in rs]))]
            rows.append(row + [_fmt_d(rs)])
        foot = ""
        if study == "sdxl-finetune":
            pre = mean_se(list({r["seed"]: r["pretrained_acc"] for r in runs}.values()))  # one value per seed
            foot = f"Zero-shot accuracy of the pretrained text encoder before fine-tuning: {_fmt(*pre, 1, True)} %."
        else:
            foot = "Text gain: MSE with shuffled captions minus MSE with the right ones (higher: the text is used)."
    n = max(len(rs) for rs in by_cfg.values())
    drift = "; drift, change = ||theta - theta_0|| / ||theta_0|| of the text encoder (encoder)"
    lines = [f"### {study}", "", f"mean ± s.e. over {n} seed(s){drift}", "",
             "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines + ["", foot, ""])


# --------------------------------------------------------------- entry point
def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--studies", default=",".join(STUDIES), help=f"comma-separated, from {', '.join(STUDIES)}")
    p.add_argument("--seeds", type=int, default=3, help="number of seeds (0..N-1), default 3")
    p.add_argument("--configs", default="", help="semicolon-separated config names (default: all)")
    p.add_argument("--quick", action="store_true", help="smoke test: a few steps, 1 seed; not results")
    p.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    _output.add_arguments(p)
    p.add_argument("--from-json", default="", help="re-render the tables from saved <study>.json files (comma-separated); no training")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    if args.quick and args.update_results:
        raise SystemExit("--quick is a smoke test: its numbers must not replace the committed results")
    if args.from_json:
        for path in args.from_json.split(","):
            with open(path) as f:
                saved = json.load(f)
            res = {k: saved.pop(k) for k in ("configs", "runs")}
            study = saved.pop("study")
            out_dir = _output.RESULTS_DIR / RESULTS_SUBDIR if args.update_results else _output.output_dir(args.out, False)
            print(study_table(study, res["runs"]))
            if out_dir is not None:
                write({**saved, "studies": {study: res}}, out_dir)
        return {}
    torch.set_num_threads(args.threads)
    studies = [s for s in args.studies.split(",") if s]
    if unknown := [s for s in studies if s not in STUDIES]:
        raise SystemExit(f"unknown studies {unknown}; choose from {', '.join(STUDIES)}")
    wanted = [c.strip() for c in args.configs.split(";") if c.strip()]
    configs = [c for c in CONFIGS if not wanted or c.name in wanted]
    seeds = list(range(1 if args.quick else args.seeds))
    setup = SDXLSetup(steps=6, batch=8, pretrain_steps=5, n_train=2000, n_eval=64) if args.quick else SDXLSetup()
    scale = 0.02 if args.quick else 1.0
    out_dir = _output.output_dir(args.out, False)
    if args.update_results:
        out_dir = _output.RESULTS_DIR / RESULTS_SUBDIR
        out_dir.mkdir(parents=True, exist_ok=True)
    results: dict[str, Any] = {
        "machine": C.machine_description(), "code": C.code_version(), "quick": bool(args.quick), "seeds": seeds,
        "command": "python benchmarks/multi_component.py " + " ".join(sys.argv[1:] if argv is None else argv),
        "sdxl_setup": vars(setup), "studies": {}}
    print(("SMOKE TEST (--quick): numbers are not results\n" if args.quick else "")
          + f"multi-component study: {', '.join(studies)}; {len(configs)} configs x {len(seeds)} seed(s); "
          f"{results['machine']}; {results['code']}; writes to {out_dir}", flush=True)
    t_start = time.time()
    images = image_data(setup.n_train, 2000 if args.quick else 10000) if any(s.startswith("sdxl") for s in studies) else None
    for study in studies:
        runs = []
        cfgs = [c for c in configs if not (study in NO_MULTIPLIER_STUDY and c.te_lr != 1.0)]
        if study == "two-component":
            task = C.build_tasks(scale)["two-component"]
            data = task.build_data(scale)
        for cfg in cfgs:
            for seed in seeds:
                random.seed(seed)
                if study == "two-component":
                    runs.append(two_component_run(cfg, task, data, seed, scale))
                else:
                    runs.append(sdxl_run(cfg, images, seed, setup, pretrained=study == "sdxl-finetune"))
                print(f"  [{time.time() - t_start:6.0f} s] {study} | {cfg.name} | seed {seed} | "
                      + ", ".join(f"{k} {v:.4g}" for k, v in runs[-1].items() if isinstance(v, float) and k != "seconds"),
                      file=sys.stderr, flush=True)
        results["studies"][study] = {"configs": [vars(c) for c in cfgs], "runs": runs}
        print(study_table(study, runs), flush=True)
    results["wall_seconds"] = time.time() - t_start
    if out_dir is not None:
        write(results, out_dir)
        print(f"written under {out_dir}" + (" (a smoke test: not results)" if args.quick else ""))
    return results


def write(results: dict[str, Any], out_dir: os.PathLike) -> None:
    """One markdown table and one json per study (``<study>.md``, ``<study>.json``), each naming the
    machine, the code and the command, so that studies run separately stay self-describing."""
    out_dir = os.fspath(out_dir)
    os.makedirs(out_dir, exist_ok=True)
    meta = {k: v for k, v in results.items() if k != "studies"}
    for study, res in results["studies"].items():
        with open(os.path.join(out_dir, f"{study}.json"), "w") as f:
            json.dump({**meta, "study": study, **res}, f, indent=1)
        lines = [f"# Multi-component study `{study}` (`benchmarks/multi_component.py`)", ""]
        if results["quick"]:
            lines += ["**SMOKE TEST (--quick): these numbers are not results.**", ""]
        lines += [f"- machine: {results['machine']}", f"- code: {results['code']}",
                  f"- command: `{results['command']}`", f"- wall time of the command: {results['wall_seconds'] / 60:.1f} min"]
        if study.startswith("sdxl"):
            lines.append(f"- setup: {results['sdxl_setup']}")
        lines += ["", study_table(study, res["runs"])]
        with open(os.path.join(out_dir, f"{study}.md"), "w") as f:
            f.write("\n".join(lines))


if __name__ == "__main__":
    main()
