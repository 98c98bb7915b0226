"""Framework helpers of issue 14: the timm registration, ``log_dict`` through trainers' optimizer
wrappers, HF Trainer's ``optimizer_cls_and_kwargs``.

The real frameworks are tested where installed (marker ``integration``; skipped when absent).
timm's registration is also checked against a stand-in of ``timm.optim`` that mirrors timm
1.0.31's ``OptimInfo`` and the part of ``OptimizerRegistry.create_optimizer`` that builds the
optimizer, so that it is exercised where timm cannot be imported.
"""

from __future__ import annotations

import sys
import types
from dataclasses import dataclass
from typing import Any

import pytest
import torch

from kprodigy import KProdigy, log_dict


def small_model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(6, 12), torch.nn.LayerNorm(12), torch.nn.Linear(12, 2))


def _import_timm_optim() -> Any:
    try:
        import timm.optim
    except Exception as e:  # noqa: BLE001 - e.g. a torchvision that does not load beside this torch
        pytest.skip(f"timm.optim does not import here: {type(e).__name__}: {e}")
    return timm.optim


# --------------------------------------------------------------------------- timm (stand-in)
@dataclass(frozen=True)
class _OptimInfo:  # timm 1.0.31 timm/optim/_optim_factory.py OptimInfo, field for field
    name: str
    opt_class: Any
    description: str = ""
    has_eps: bool = True
    has_momentum: bool = False
    has_betas: bool = False
    num_betas: int = 2
    second_order: bool = False
    defaults: dict[str, Any] | None = None


class _Registry:
    """The construction part of timm 1.0.31's ``OptimizerRegistry.create_optimizer``."""

    def __init__(self) -> None:
        self.infos: dict[str, _OptimInfo] = {}

    def register(self, info: _OptimInfo) -> None:
        self.infos[info.name.lower()] = info

    def create(
        self,
        params: Any,
        opt: str,
        lr: float | None = None,
        weight_decay: float = 0.0,
        momentum: float = 0.9,
        **kwargs: Any,
    ) -> Any:
        info = self.infos[opt.lower().split("_")[-1]]
        args: dict[str, Any] = {"weight_decay": weight_decay, **kwargs}
        if lr is not None:
            args["lr"] = lr
        for k, v in (info.defaults or {}).items():
            args.setdefault(k, v)
        if info.has_momentum:
            args.setdefault("momentum", momentum)
        if not info.has_eps:
            args.pop("eps", None)
        if not info.has_betas:
            args.pop("betas", None)
        return info.opt_class(params, **args)


def test_timm_registration_against_a_stand_in_of_timm_optim(monkeypatch) -> None:  # type: ignore[no-untyped-def]
    fake_timm = types.ModuleType("timm")
    fake_optim = types.ModuleType("timm.optim")
    fake_optim.OptimInfo = _OptimInfo  # type: ignore[attr-defined]
    fake_timm.optim = fake_optim  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "timm", fake_timm)
    monkeypatch.setitem(sys.modules, "timm.optim", fake_optim)
    from kprodigy.integrations.timm import register

    registry = _Registry()
    info = register(registry)
    assert registry.infos["kprodigy"] is info and info.opt_class is KProdigy
    assert info.has_betas and info.num_betas == 2 and info.has_eps and not info.has_momentum
    model = small_model()
    opt = registry.create(model.parameters(), "kprodigy", betas=(0.9, 0.99), eps=1e-8, momentum=0.5)
    assert isinstance(opt, KProdigy) and opt.param_groups[0]["lr"] == 1.0
    assert opt.param_groups[0]["betas"] == (0.9, 0.99)
    with pytest.raises(ValueError, match="without '_'"):
        register(registry, name="k_prodigy")


def test_timm_registration_without_timm_says_what_is_needed(monkeypatch) -> None:  # type: ignore[no-untyped-def]
    monkeypatch.setitem(sys.modules, "timm", None)  # import timm raises ImportError
    monkeypatch.setitem(sys.modules, "timm.optim", None)
    from kprodigy.integrations.timm import register

    with pytest.raises(ImportError, match="timm >= 1.0.12"):
        register()


# --------------------------------------------------------------------------- timm (real)
@pytest.mark.integration
def test_timm_create_optimizer_v2_builds_kprodigy() -> None:
    timm_optim = _import_timm_optim()
    import timm

    from kprodigy.integrations.timm import register

    register()
    assert "kprodigy" in timm_optim.list_optimizers()
    model = timm.create_model("test_vit", pretrained=False, num_classes=3)  # random weights, small config
    opt = timm_optim.create_optimizer_v2(
        model, "kprodigy", weight_decay=0.05, independent_d=False
    )  # kwargs pass through
    assert isinstance(opt, KProdigy)
    assert [g["weight_decay"] for g in opt.param_groups] == [0.0, 0.05]  # timm's no-decay / decay split
    assert all(g["lr"] == 1.0 for g in opt.param_groups) and len(opt.d_groups()) == 1
    x = torch.randn(2, 3, 160, 160, generator=torch.Generator().manual_seed(0))
    for _ in range(2):
        opt.zero_grad()
        model(x).square().mean().backward()
        opt.step()
    assert opt.param_groups[0]["k"] == 2 and opt.param_groups[0]["d_denom"] > 0  # the D statistics flow
    ahead = timm_optim.create_optimizer_v2(small_model(), "lookahead_kprodigy", lr=1.0)
    assert isinstance(ahead._base_optimizer, KProdigy) and "kprodigy/dgroup0/d" in log_dict(ahead)
    assert set(log_dict(opt)) >= {"kprodigy/dgroup0/d", "kprodigy/group1/effective_lr"}


# --------------------------------------------------------------------------- HF / Lightning / accelerate
@pytest.mark.integration
def test_transformers_trainer_optimizer_cls_and_kwargs_and_log_dict(tmp_path) -> None:  # type: ignore[no-untyped-def]
    transformers = pytest.importorskip("transformers")

    class Tiny(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.net = small_model()

        def forward(self, x: torch.Tensor, labels: torch.Tensor) -> dict[str, torch.Tensor]:
            return {"loss": torch.nn.functional.cross_entropy(self.net(x), labels)}

    gen = torch.Generator().manual_seed(0)
    rows = [{"x": torch.randn(6, generator=gen), "labels": torch.tensor(i % 2)} for i in range(32)]
    logged: list[dict[str, float]] = []

    class DLogger(transformers.TrainerCallback):
        def on_step_end(self, args, state, control, optimizer=None, **kwargs):  # type: ignore[no-untyped-def]
            logged.append(log_dict(optimizer))  # the Trainer's optimizer is accelerate's wrapper

    args = transformers.TrainingArguments(
        output_dir=str(tmp_path),
        max_steps=4,
        per_device_train_batch_size=8,
        report_to=[],
        use_cpu=True,
        save_strategy="no",
    )
    trainer = transformers.Trainer(
        model=Tiny(),
        args=args,
        train_dataset=rows,
        optimizer_cls_and_kwargs=(KProdigy, {"lr": 1.0, "use_bias_correction": False}),
        callbacks=[DLogger()],
    )
    trainer.train()
    inner = trainer.optimizer.optimizer if hasattr(trainer.optimizer, "optimizer") else trainer.optimizer
    assert isinstance(inner, KProdigy) and inner.param_groups[0]["k"] == 4
    assert len(logged) == 4 and logged[-1]["kprodigy/dgroup0/k"] == 4.0


@pytest.mark.integration
def test_transformers_trainer_with_only_weights_trainable_builds_an_empty_group(tmp_path) -> None:  # type: ignore[no-untyped-def]
    """Issue 12's repro without peft: with only Linear weights trainable (LoRA-like), HF Trainer's
    no-decay group is empty; ``optimizer_cls_and_kwargs=(KProdigy, {})`` trains, one D for both
    groups, as prodigyopt."""
    transformers = pytest.importorskip("transformers")

    class Tiny(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.net = small_model()
            for name, p in self.net.named_parameters():
                p.requires_grad_(name in ("0.weight", "2.weight"))  # the Linear weights, not LayerNorm

        def forward(self, x: torch.Tensor, labels: torch.Tensor) -> dict[str, torch.Tensor]:
            return {"loss": torch.nn.functional.cross_entropy(self.net(x), labels)}

    gen = torch.Generator().manual_seed(0)
    rows = [{"x": torch.randn(6, generator=gen), "labels": torch.tensor(i % 2)} for i in range(32)]
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path), max_steps=8, per_device_train_batch_size=8, report_to=[], use_cpu=True,
        save_strategy="no", weight_decay=0.01, lr_scheduler_type="constant",
    )
    trainer = transformers.Trainer(model=Tiny(), args=args, train_dataset=rows, optimizer_cls_and_kwargs=(KProdigy, {}))
    trainer.train()
    inner = trainer.optimizer.optimizer if hasattr(trainer.optimizer, "optimizer") else trainer.optimizer
    assert isinstance(inner, KProdigy)
    assert [len(g["params"]) for g in inner.param_groups] == [2, 0]  # decay (weights) and the empty no-decay group
    assert inner.d_groups() == [[0, 1]] and inner.param_groups[0]["k"] == 8
    assert inner.param_groups[0]["d"] > 10 * inner.param_groups[0]["d0"]


@pytest.mark.integration
def test_lightning_log_dict_through_lightning_optimizer(tmp_path) -> None:  # type: ignore[no-untyped-def]
    L = pytest.importorskip("lightning.pytorch")
    seen: list[dict[str, float]] = []

    class Module(L.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.net = small_model()

        def training_step(self, batch, batch_idx):  # type: ignore[no-untyped-def]
            x, y = batch
            logs = log_dict(self.optimizers())  # a LightningOptimizer around the KProdigy
            seen.append(logs)
            self.log_dict(logs)
            return torch.nn.functional.cross_entropy(self.net(x), y)

        def configure_optimizers(self):  # type: ignore[no-untyped-def]
            return KProdigy(self.parameters(), use_bias_correction=False)

    gen = torch.Generator().manual_seed(0)
    X, y = torch.randn(32, 6, generator=gen), torch.randint(0, 2, (32,), generator=gen)
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(X, y), batch_size=8)
    trainer = L.Trainer(
        max_steps=3,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        default_root_dir=str(tmp_path),
    )
    trainer.fit(Module(), loader)
    assert [s["kprodigy/dgroup0/k"] for s in seen] == [0.0, 1.0, 2.0]
