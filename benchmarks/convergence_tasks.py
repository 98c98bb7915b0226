"""Data sets, models and metrics for the convergence benchmark (``convergence.py``).

Everything here runs offline: scikit-learn's bundled data sets, the Debian
``dataset-fashion-mnist`` files (with a scikit-learn digits fallback) and
MNIST-1D produced by its ``make_dataset`` generator (never downloaded).
"""

from __future__ import annotations

import gzip
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import lru_cache

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

FASHION_DIR = "/usr/share/datasets/fashion-mnist"
LOGREG_L2 = 1e-3  # strength of the L2 term in the convex objective


@dataclass
class Data:
    """Tensors of one classification problem (train part, held-out part)."""

    x: torch.Tensor
    y: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor
    note: str = ""


@dataclass
class Task:
    """A benchmark task: how to build its data and model, and its step budget."""

    name: str
    group: str  # task/model pair used for the targets ("logreg", "fmnist-mlp", ...)
    steps: int
    batch_size: int | None  # None: full batch
    build_data: Callable[[int], Data]  # scale -> Data (scale < 1 shrinks it for smoke runs)
    build_model: Callable[[Data], nn.Module]
    convex: bool = False
    two_component: bool = False
    extra: dict = field(default_factory=dict)


# --------------------------------------------------------------------- helpers
def split_validation(data: Data, frac: float = 0.2) -> Data:
    """Hold out the last ``frac`` of the (already shuffled) training part as validation."""
    n_val = max(1, int(len(data.y) * frac))
    return Data(data.x[:-n_val], data.y[:-n_val], data.x[-n_val:], data.y[-n_val:], data.note)


def _shuffled_split(x: np.ndarray, y: np.ndarray, test_frac: float, seed: int = 0) -> Data:
    """Fixed stratification-free shuffled train/test split, features standardised on train."""
    rng = np.random.default_rng(seed)
    perm = rng.permutation(len(y))
    n_test = int(round(len(y) * test_frac))
    te, tr = perm[:n_test], perm[n_test:]
    mean, std = x[tr].mean(0), x[tr].std(0) + 1e-8
    x = (x - mean) / std
    t = lambda a: torch.tensor(a, dtype=torch.float32)  # noqa: E731
    return Data(t(x[tr]), torch.tensor(y[tr]), t(x[te]), torch.tensor(y[te]))


# ------------------------------------------------------------------ data sets
def sklearn_data(name: str) -> Data:
    """One of scikit-learn's bundled data sets, 25% held out for test."""
    from sklearn import datasets

    loader = {
        "iris": datasets.load_iris,
        "wine": datasets.load_wine,
        "breast_cancer": datasets.load_breast_cancer,
        "digits": datasets.load_digits,
    }[name]
    x, y = loader(return_X_y=True)
    return _shuffled_split(x.astype(np.float64), y.astype(np.int64), 0.25)


def _read_idx(path: str) -> np.ndarray:
    with gzip.open(path, "rb") as f:
        raw = f.read()
    ndim = raw[3]
    dims = [int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim)]
    return np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim).reshape(dims)


def _fashion_files() -> list[str]:
    return [os.path.join(FASHION_DIR, f) for f in (
        "train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz",
        "t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz")]


def fashion_available() -> bool:
    """Whether Debian's Fashion-MNIST files are there (else the fmnist tasks use digits)."""
    return all(os.path.exists(f) for f in _fashion_files())


@lru_cache(maxsize=2)
def fashion_data(n_train: int = 12000, n_test: int = 10000) -> Data:
    """Fashion-MNIST from the Debian package (a fixed random subset of the training set).

    Falls back to scikit-learn digits (8x8 images) when the package is absent.
    """
    files = _fashion_files()
    if not fashion_available():
        from sklearn.datasets import load_digits

        x, y = load_digits(return_X_y=True)
        d = _shuffled_split(x.astype(np.float64) / 16.0, y.astype(np.int64), 0.25)
        d.x, d.x_test = d.x.view(-1, 1, 8, 8), d.x_test.view(-1, 1, 8, 8)
        d.note = f"Fashion-MNIST not found under {FASHION_DIR}: fell back to scikit-learn digits"
        return d
    xtr, ytr, xte, yte = (_read_idx(f) for f in files)
    idx = np.random.default_rng(0).permutation(len(ytr))[:n_train]
    mean, std = 72.94, 90.02  # Fashion-MNIST pixel statistics (0..255 scale)
    img = lambda a: torch.tensor((a.astype(np.float32) - mean) / std).unsqueeze(1)  # noqa: E731
    return Data(img(xtr[idx]), torch.tensor(ytr[idx].astype(np.int64)),
                img(xte[:n_test]), torch.tensor(yte[:n_test].astype(np.int64)),
                note="Fashion-MNIST (random fixed training subset)")


@lru_cache(maxsize=2)
def mnist1d_data(num_samples: int = 10000) -> Data:
    """MNIST-1D generated locally with ``mnist1d.data.make_dataset`` (80/20 split)."""
    from mnist1d.data import get_dataset_args, make_dataset

    args = get_dataset_args()
    args.num_samples = num_samples
    state = np.random.get_state()  # make_dataset reseeds numpy's global generator
    d = make_dataset(args)
    np.random.set_state(state)
    t = lambda a: torch.tensor(a, dtype=torch.float32).unsqueeze(1)  # noqa: E731
    return Data(t(d["x"]), torch.tensor(d["y"], dtype=torch.int64),
                t(d["x_test"]), torch.tensor(d["y_test"], dtype=torch.int64),
                note="MNIST-1D from make_dataset")


def label_subset(data: Data, labels: list[int]) -> Data:
    """Keep only samples whose label is in ``labels``, relabelled 0..len(labels)-1."""
    remap = torch.full((int(max(data.y.max(), data.y_test.max())) + 1,), -1, dtype=torch.int64)
    remap[torch.tensor(labels)] = torch.arange(len(labels))
    mtr, mte = remap[data.y] >= 0, remap[data.y_test] >= 0
    return Data(data.x[mtr], remap[data.y[mtr]], data.x_test[mte], remap[data.y_test[mte]], data.note)


# --------------------------------------------------------------------- models
def n_classes(data: Data) -> int:
    return int(max(data.y.max(), data.y_test.max())) + 1


def logreg_model(data: Data) -> nn.Module:
    return nn.Linear(data.x.shape[1], n_classes(data))


def mlp_model(data: Data, hidden: int = 256) -> nn.Module:
    d_in = int(np.prod(data.x.shape[1:]))
    return nn.Sequential(nn.Flatten(), nn.Linear(d_in, hidden), nn.ReLU(),
                         nn.Linear(hidden, hidden // 2), nn.ReLU(), nn.Linear(hidden // 2, n_classes(data)))


class SmallCNN(nn.Module):
    """Two stride-2 convolutions and a linear classifier; 1-D or 2-D inputs.

    Strided convolutions instead of max-pooling keep it fast on one CPU thread.
    """

    def __init__(self, data: Data, channels: tuple[int, int] = (16, 32)) -> None:
        super().__init__()
        conv = nn.Conv2d if data.x.dim() == 4 else nn.Conv1d
        c1, c2 = channels
        self.features = nn.Sequential(
            conv(data.x.shape[1], c1, 3, stride=2, padding=1), nn.ReLU(),
            conv(c1, c2, 3, stride=2, padding=1), nn.ReLU(), nn.Flatten())
        with torch.no_grad():
            n_feat = self.features(data.x[:1]).shape[1]
        self.head = nn.Linear(n_feat, n_classes(data))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


class TwoComponent(nn.Module):
    """A small pretrained encoder plus a large freshly initialised head."""

    def __init__(self, encoder: nn.Module, enc_dim: int, n_out: int, width: int = 512) -> None:
        super().__init__()
        self.encoder = encoder
        self.head = nn.Sequential(nn.Linear(enc_dim, width), nn.ReLU(),
                                  nn.Linear(width, width), nn.ReLU(), nn.Linear(width, n_out))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.encoder(x))


def make_encoder(d_in: int, enc_dim: int = 64) -> nn.Module:
    return nn.Sequential(nn.Flatten(), nn.Linear(d_in, enc_dim), nn.ReLU(),
                         nn.Linear(enc_dim, enc_dim), nn.ReLU())


# -------------------------------------------------------------------- metrics
def objective(model: nn.Module, x: torch.Tensor, y: torch.Tensor, l2: float = 0.0) -> torch.Tensor:
    """Mean cross-entropy, plus ``l2/2 * ||W||^2`` on weight matrices when ``l2 > 0``."""
    loss = F.cross_entropy(model(x), y)
    if l2 > 0:
        loss = loss + 0.5 * l2 * sum((p * p).sum() for n, p in model.named_parameters() if "weight" in n)
    return loss


@torch.no_grad()
def evaluate(model: nn.Module, x: torch.Tensor, y: torch.Tensor, l2: float = 0.0,
             chunk: int = 4096) -> tuple[float, float]:
    """(objective, accuracy) over a whole split, computed in chunks."""
    total, correct = 0.0, 0
    for i in range(0, len(y), chunk):
        out = model(x[i : i + chunk])
        total += F.cross_entropy(out, y[i : i + chunk], reduction="sum").item()
        correct += (out.argmax(1) == y[i : i + chunk]).sum().item()
    loss = total / len(y)
    if l2 > 0:
        loss += 0.5 * l2 * sum((p * p).sum().item() for n, p in model.named_parameters() if "weight" in n)
    return loss, correct / len(y)


def lbfgs_optimum(data: Data, l2: float = LOGREG_L2) -> float:
    """Minimum of the convex training objective, by float64 L-BFGS to high precision."""
    x, y = data.x.double(), data.y
    model = nn.Linear(x.shape[1], n_classes(data)).double()
    nn.init.zeros_(model.weight)
    nn.init.zeros_(model.bias)
    opt = torch.optim.LBFGS(model.parameters(), lr=1.0, max_iter=5000, history_size=50,
                            tolerance_grad=1e-12, tolerance_change=1e-15, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = objective(model, x, y, l2)
        loss.backward()
        return loss

    for _ in range(5):
        opt.step(closure)
    with torch.no_grad():
        return objective(model, x, y, l2).item()
