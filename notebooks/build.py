"""Write the notebooks from the cell sources below and execute them in place (outputs kept).

The one command that (re)builds the committed notebooks with fresh outputs, from the repository
root (needs the test extra: ``pip install -e ".[test]"``; no Jupyter server, no nbconvert)::

    python notebooks/build.py                      # all three
    python notebooks/build.py functional.ipynb     # one

The kernel imports ``kprodigy`` from this checkout and runs on one thread. Edit the cells here,
never the .ipynb files. The test suite (tests/test_notebooks.py) re-executes the committed
notebooks top to bottom and checks that their conclusions match their numbers.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import nbformat
from nbclient import NotebookClient

HERE = Path(__file__).resolve().parent


class Md(str):
    """A markdown cell (plain strings are code cells)."""


SETUP = """\
import torch
import matplotlib.pyplot as plt

torch.set_num_threads(1)
plt.rcParams["figure.dpi"] = 72"""

QUICKSTART = [
    Md(
        "# K-Prodigy quickstart\n\n"
        "`KProdigy` is a drop-in `torch.optim.Optimizer`: leave `lr=1.0` and it estimates the step size D "
        "while training. Here: a small MLP on scikit-learn's bundled 8x8 digits (1797 images, no download)."
    ),
    SETUP,
    """\
from sklearn.datasets import load_digits
from torch import nn

from kprodigy import KProdigy

digits = load_digits()
x = torch.tensor(digits.data, dtype=torch.float32) / 16
y = torch.tensor(digits.target)
perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(0))
train, test = perm[:1400], perm[1400:]
torch.manual_seed(0)
model = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 10))
opt = KProdigy(model.parameters(), weight_decay=1e-3)  # lr=1.0: D is estimated""",
    """\
losses, ds = [], []
gen = torch.Generator().manual_seed(1)
for step in range(200):
    batch = train[torch.randint(len(train), (128,), generator=gen)]
    loss = nn.functional.cross_entropy(model(x[batch]), y[batch])
    opt.zero_grad()
    loss.backward()
    opt.step()
    losses.append(loss.item())
    ds.append(opt.param_groups[0]["d"])  # the D estimate, a Python float in the param group
with torch.no_grad():
    accuracy = (model(x[test]).argmax(1) == y[test]).float().mean().item()
print(f"test accuracy {accuracy:.3f}, final D {ds[-1]:.3g}")""",
    """\
fig, (a, b) = plt.subplots(1, 2, figsize=(10, 3.5))
a.plot(losses)
a.set(xlabel="step", ylabel="training loss", yscale="log", title="loss")
b.plot(ds)
b.set(xlabel="step", ylabel="D", yscale="log", title="D estimate (starts at d0 = 1e-6)")
plt.tight_layout()""",
    Md(
        "The estimate climbs from `d0` within a few dozen steps and then stays flat: D never decreases. "
        "`opt.state_dict()` saves it with the rest of the state."
    ),
]

FUNCTIONAL = [
    Md(
        "# The functional core: `torch.func` loops and vmapped ensembles\n\n"
        "`kprodigy.functional.step(params, grads, state, hparams)` is pure: it returns new params and "
        "state and writes to nothing, so it composes with `torch.func.grad`, `vmap` and `torch.compile`. "
        "Params may be any pytree of tensors (here a dict, as `functional_call` takes it)."
    ),
    SETUP,
    """\
from torch import nn
from torch.func import functional_call, grad, grad_and_value, stack_module_state, vmap

import kprodigy.functional as F


def make_model(seed):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(1, 32), nn.Tanh(), nn.Linear(32, 1))


def make_data(seed, n=64):
    gen = torch.Generator().manual_seed(100 + seed)
    x = torch.linspace(-3, 3, n).unsqueeze(1)
    return x, torch.sin(2 * x) + 0.1 * torch.randn(n, 1, generator=gen)""",
    Md("## A functional training loop"),
    """\
model = make_model(0)
x, y = make_data(0)
hp = F.Hyperparams(weight_decay=1e-3)
params = {k: v.detach() for k, v in model.named_parameters()}
state = F.init_state(params, hp)  # state.exp_avg etc. are dicts keyed like params


def loss_fn(p, x, y):
    return ((functional_call(model, p, (x,)) - y) ** 2).mean()


losses, ds = [], []
for step in range(150):
    grads, loss = grad_and_value(loss_fn)(params, x, y)
    params, state = F.step(params, grads, state, hp)
    losses.append(loss.item())
    ds.append(state.d.d.item())  # D is a 0-dim tensor in the state
print(f"loss {losses[0]:.3f} -> {losses[-1]:.4f}, D = {ds[-1]:.3g}")""",
    Md(
        "## An ensemble of 8 models in one vmapped step, each with its own D\n\n"
        "`init_ensemble_state` builds the state of stacked parameters (leading dimension 8); under "
        "`vmap` each member runs the per-tensor path and keeps its own D (shape `(8,)` in the state). "
        "Each member has its own seed and its own noisy data."
    ),
    """\
n = 8
models = [make_model(i) for i in range(n)]
ens_params, _ = stack_module_state(models)
ens_params = {k: v.detach() for k, v in ens_params.items()}
base = make_model(0).to("meta")
xs, ys = map(torch.stack, zip(*[make_data(i) for i in range(n)]))
ens_state = F.init_ensemble_state(ens_params, hp)


def member_step(p, s, x, y):
    g = grad(lambda q: ((functional_call(base, q, (x,)) - y) ** 2).mean())(p)
    return F.step(p, g, s, hp)


ensemble_step = vmap(member_step)
d_traj = []
for step in range(150):
    ens_params, ens_state = ensemble_step(ens_params, ens_state, xs, ys)
    d_traj.append(ens_state.d.d.clone())
d_traj = torch.stack(d_traj)  # (steps, 8)
print("final D per member:", [f"{v:.3g}" for v in d_traj[-1].tolist()])""",
    """\
fig, (a, b) = plt.subplots(1, 2, figsize=(10, 3.5))
a.plot(losses)
a.set(xlabel="step", ylabel="loss", yscale="log", title="functional loop: loss")
b.plot(d_traj)
b.set(xlabel="step", ylabel="D", yscale="log", title="vmapped ensemble: D of each of 8 members")
plt.tight_layout()""",
    Md(
        "## Checkpointing the functional state\n\n"
        "`state_to_dict` gives plain containers that `torch.load(weights_only=True)` accepts; "
        "`to_optimizer_state_dict` converts to the `KProdigy.state_dict()` format, so a run can "
        "continue with the class."
    ),
    """\
import io

from kprodigy import KProdigy

buf = io.BytesIO()
torch.save(F.state_to_dict(state), buf)
buf.seek(0)
restored = F.state_from_dict(torch.load(buf, weights_only=True))
opt = KProdigy(list(params.values()))  # params in the same (leaf) order
opt.load_state_dict(F.to_optimizer_state_dict(restored, hp))
print("class resumes at step", opt.param_groups[0]["k"], "with D", opt.param_groups[0]["d"])""",
]

MULTI = [
    Md(
        "# Two components, one D or two\n\n"
        "An SDXL-style fine-tune in miniature: a pretrained *text encoder* (close to its optimum, small "
        "gradients) and a *UNet* trained from scratch on large latents (gradients ~100x larger). "
        "Both are trained on the UNet's loss against a fixed teacher. With one shared D, the UNet's "
        "statistics set the step size of the text encoder too; with `independent_d=True` each param group "
        "gets its own D. The text encoder's drift from its pretrained function is measured, not trained."
    ),
    SETUP,
    """\
import copy

from torch import nn

from kprodigy import KProdigy


def mlp(i, o, h=32):
    return nn.Sequential(nn.Linear(i, h), nn.SiLU(), nn.Linear(h, o))


torch.manual_seed(0)
te_star, unet_star = mlp(8, 8), mlp(16 + 8, 16)  # the teacher
tokens, latents = torch.randn(256, 8), 10 * torch.randn(256, 16)
with torch.no_grad():
    target = unet_star(torch.cat([latents, te_star(tokens)], 1))
    te_target = te_star(tokens)


def run(independent_d, steps=200):
    torch.manual_seed(1)
    te = copy.deepcopy(te_star).requires_grad_(True)  # "pretrained": the teacher plus a little noise
    with torch.no_grad():
        for p in te.parameters():
            p.add_(1e-2 * torch.randn_like(p))
    unet = mlp(16 + 8, 16)  # from scratch
    opt = KProdigy([{"params": unet.parameters()}, {"params": te.parameters()}], independent_d=independent_d)
    h = {"loss": [], "te_drift": [], "d_unet": [], "d_te": [], "g_unet": [], "g_te": []}
    for step in range(steps):
        opt.zero_grad()
        loss = ((unet(torch.cat([latents, te(tokens)], 1)) - target) ** 2).mean()
        loss.backward()
        h["g_unet"].append(torch.cat([p.grad.flatten() for p in unet.parameters()]).norm().item())
        h["g_te"].append(torch.cat([p.grad.flatten() for p in te.parameters()]).norm().item())
        opt.step()
        with torch.no_grad():
            h["te_drift"].append(((te(tokens) - te_target) ** 2).mean().item())
        h["loss"].append(loss.item())
        h["d_unet"].append(opt.param_groups[0]["d"])
        h["d_te"].append(opt.param_groups[1]["d"])
    return h


shared, independent = run(False), run(True)
for name, h in (("shared D", shared), ("independent D", independent)):
    print(
        f"{name:14s} UNet loss {h['loss'][-1]:.4f}  text-encoder drift {h['te_drift'][-1]:.3f}  "
        f"D unet {h['d_unet'][-1]:.3g}  D te {h['d_te'][-1]:.3g}  "
        f"grad-norm ratio at step 0: {shared['g_unet'][0] / shared['g_te'][0]:.0f}x"
    )""",
    """\
fig, axes = plt.subplots(1, 3, figsize=(14, 3.5))
for name, h, style in (("shared D", shared, "--"), ("independent D", independent, "-")):
    axes[0].plot(h["loss"], style, label=name)
    axes[1].plot(h["te_drift"], style, label=name)
    axes[2].plot(h["d_unet"], style, label=f"UNet, {name}")
    axes[2].plot(h["d_te"], style, label=f"text encoder, {name}")
axes[0].set(xlabel="step", ylabel="loss", yscale="log", title="UNet (training) loss")
axes[1].set(xlabel="step", ylabel="MSE to pretrained", yscale="log", title="text encoder drift")
axes[2].set(xlabel="step", ylabel="D", yscale="log", title="D of each component")
for a in axes:
    a.legend(fontsize=8)
plt.tight_layout()""",
    Md(
        'With one shared D both components take the same step size. `independent_d=True` gives the text '
        'encoder a D estimated from its own statistics (compare `D te` in the two printed lines). In this '
        'miniature it comes out smaller than the shared one, and the text encoder drifts less from its '
        'pretrained function (compare `text-encoder drift`). That is not so by construction: its own D may '
        'as well come out larger. To protect a pretrained component for sure, give its param group a '
        'smaller `lr` multiplier (e.g. `{"params": te.parameters(), "lr": 0.1}`; see docs/multi-component.md). '
        'The numbers printed above are from this run; they are a miniature, not a measurement of SDXL.'
    ),
]

NOTEBOOKS = {"quickstart.ipynb": QUICKSTART, "functional.ipynb": FUNCTIONAL, "multi_component.ipynb": MULTI}


def build(name: str, cells: list[str]) -> nbformat.NotebookNode:
    nb = nbformat.v4.new_notebook()
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    for src in cells:
        nb.cells.append(nbformat.v4.new_markdown_cell(src) if isinstance(src, Md) else nbformat.v4.new_code_cell(src))
    return nb


def main() -> None:
    root = str(HERE.parent)  # the kernel (a child process) imports kprodigy from this checkout
    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")]))
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    os.environ.setdefault("MPLBACKEND", "module://matplotlib_inline.backend_inline")
    unknown = [a for a in sys.argv[1:] if a not in NOTEBOOKS]
    if unknown:
        raise SystemExit(f"unknown notebook(s) {unknown}; choose from {', '.join(NOTEBOOKS)}")
    for name, cells in NOTEBOOKS.items():
        if len(sys.argv) > 1 and name not in sys.argv[1:]:
            continue
        nb = build(name, cells)
        NotebookClient(nb, timeout=300, kernel_name="python3", resources={"metadata": {"path": str(HERE)}}).execute()
        nbformat.write(nb, HERE / name)
        print("wrote", HERE / name)


if __name__ == "__main__":
    main()
