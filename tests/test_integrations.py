"""KProdigy inside the tools trainers use: swa_utils, LR schedulers, schedule-free, HF / Lightning loops.

Light packages are tested always; ``transformers`` and ``lightning`` are heavy and are tested only
when installed (marker ``integration``; skipped otherwise).
"""

from __future__ import annotations

import math

import pytest
import torch

from kprodigy import KProdigy


def mlp(seed: int = 0) -> torch.nn.Sequential:
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(5, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1))


def data(seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    X = torch.randn(32, 5, generator=gen)
    return X, X.sum(1, keepdim=True).sin()


def loss_of(model: torch.nn.Module, X: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return ((model(X) - y) ** 2).mean()


def test_averaged_model_ema_of_kprodigy_weights() -> None:
    X, y = data()
    model = mlp()
    opt = KProdigy(model.parameters())
    ema = torch.optim.swa_utils.AveragedModel(model, multi_avg_fn=torch.optim.swa_utils.get_ema_multi_avg_fn(0.9))
    expected: list[torch.Tensor] = []
    for step in range(10):
        opt.zero_grad()
        loss_of(model, X, y).backward()
        opt.step()
        ema.update_parameters(model)
        if step == 0:  # the first update copies the weights
            expected = [p.detach().clone() for p in model.parameters()]
        else:
            expected = [0.9 * e + 0.1 * p.detach() for e, p in zip(expected, model.parameters())]
    got = torch.cat([a.detach().flatten() for a in ema.module.parameters()])
    want = torch.cat([e.flatten() for e in expected])
    assert float((got - want).norm() / want.norm()) < 1e-6
    assert loss_of(ema.module, X, y) < loss_of(mlp(), X, y)


def test_swa_lr_scheduler_and_warmup_scale_the_effective_lr() -> None:
    X, y = data()
    model = mlp()
    opt = KProdigy(model.parameters(), use_bias_correction=False)  # step_size = d * lr
    warmup = torch.optim.lr_scheduler.LinearLR(opt, start_factor=0.1, total_iters=5)
    for _ in range(8):
        opt.zero_grad()
        loss_of(model, X, y).backward()
        d, lr = opt.param_groups[0]["d"], opt.param_groups[0]["lr"]
        opt.step()
        assert opt.get_learning_rates()[0] == pytest.approx(d * lr, rel=1e-12)
        assert opt.param_groups[0]["effective_lr"] == lr
        warmup.step()
    swa = torch.optim.swa_utils.SWALR(opt, swa_lr=0.5, anneal_epochs=2)
    for _ in range(3):
        opt.zero_grad()
        loss_of(model, X, y).backward()
        opt.step()
        swa.step()
    assert opt.param_groups[0]["lr"] == pytest.approx(0.5)


def hf_style_loop(model, opt, sched, X, y, steps: int, accumulation: int = 2) -> list[float]:  # type: ignore[no-untyped-def]
    """The inner loop of transformers.Trainer(optimizers=(opt, sched)): clip, step, schedule, zero, log."""
    logs = []
    for step in range(steps):
        for micro in range(accumulation):
            loss = loss_of(model, X[micro::accumulation], y[micro::accumulation]) / accumulation
            loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        model.zero_grad(set_to_none=True)
        logs.append({"loss": loss.item(), "learning_rate": sched.get_last_lr()[0], "step": step})
    return logs


def test_hugging_face_trainer_loop_pattern_and_checkpoint_resume() -> None:
    X, y = data()
    model = mlp()
    opt = KProdigy(model.parameters(), weight_decay=0.01, use_bias_correction=True, safeguard_warmup=True)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / 4) * max(0.0, 1 - s / 20))
    logs = hf_style_loop(model, opt, sched, X, y, 6)
    assert all(isinstance(row["learning_rate"], float) for row in logs)
    # Trainer's _save_checkpoint / _load_optimizer_and_scheduler: optimizer.pt and scheduler.pt
    saved = {"opt": opt.state_dict(), "sched": sched.state_dict(), "model": model.state_dict()}
    import io

    buf = io.BytesIO()
    torch.save(saved, buf)
    tail = hf_style_loop(model, opt, sched, X, y, 4)
    buf.seek(0)
    saved = torch.load(buf, weights_only=True)
    model2 = mlp(seed=5)
    model2.load_state_dict(saved["model"])
    opt2 = KProdigy(model2.parameters(), weight_decay=0.01, use_bias_correction=True, safeguard_warmup=True)
    sched2 = torch.optim.lr_scheduler.LambdaLR(opt2, lambda s: min(1.0, (s + 1) / 4) * max(0.0, 1 - s / 20))
    opt2.load_state_dict(saved["opt"])
    sched2.load_state_dict(saved["sched"])
    tail2 = hf_style_loop(model2, opt2, sched2, X, y, 4)
    assert [r["loss"] for r in tail2] == [r["loss"] for r in tail]
    for p, q in zip(model.parameters(), model2.parameters()):
        torch.testing.assert_close(p, q, rtol=0, atol=0)


def test_schedule_free_wrapper() -> None:
    """schedulefree's wrapper around KProdigy trains exactly as around prodigyopt."""
    schedulefree = pytest.importorskip("schedulefree")
    prodigyopt = pytest.importorskip("prodigyopt")
    X, y = (t.double() for t in data())  # float64: the two agree to round-off, not float32 noise

    def train(make):  # type: ignore[no-untyped-def]
        model = mlp().double()
        base = make(model.parameters())  # betas[0] = 0: the wrapper supplies the momentum
        opt = schedulefree.ScheduleFreeWrapper(base, momentum=0.9)
        for _ in range(30):
            opt.train()
            opt.zero_grad()
            loss_of(model, X, y).backward()
            opt.step()
        opt.eval()
        return model, base

    first = loss_of(mlp().double(), X, y).item()
    model, base = train(lambda ps: KProdigy(ps, betas=(0.0, 0.999)))
    ref_model, ref_base = train(lambda ps: prodigyopt.Prodigy(ps, betas=(0.0, 0.999)))
    assert base.param_groups[0]["d"] > 1000 * 1e-6  # the wrapper weights its average by lr * d
    assert math.isclose(base.param_groups[0]["d"], ref_base.param_groups[0]["d"], rel_tol=1e-9)
    # (the wrapper reads the base's state every step: each read normalizes the scaled moments,
    # and the chaotic betas[0] == 0 steps amplify that rounding to ~5e-11 of the params)
    for p, q in zip(model.parameters(), ref_model.parameters()):
        assert float((p - q).norm()) <= 1e-9 * float(q.norm())
    # the wrapper also writes group["k"] += 1 after our step (schedulefree 1.4.1): k advances twice
    # per step, which the README documents (no bias correction, d_update_freq and d_steps doubled)
    assert base.param_groups[0]["k"] == 60
    assert loss_of(model, X, y).item() < 0.7 * first


@pytest.mark.integration
def test_transformers_trainer_with_kprodigy(tmp_path) -> None:  # type: ignore[no-untyped-def]
    transformers = pytest.importorskip("transformers")

    class Tiny(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.net = mlp()

        def forward(self, x: torch.Tensor, labels: torch.Tensor) -> dict[str, torch.Tensor]:
            return {"loss": loss_of(self.net, x, labels)}

    X, y = data()
    rows = [{"x": a, "labels": b} for a, b in zip(X, y)]
    model = Tiny()
    opt = KProdigy(model.parameters())
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda _: 1.0)
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path),
        max_steps=5,
        per_device_train_batch_size=8,
        report_to=[],
        use_cpu=True,
        logging_steps=1,
        save_strategy="no",
    )
    trainer = transformers.Trainer(model=model, args=args, train_dataset=rows, optimizers=(opt, sched))
    trainer.train()
    assert opt.param_groups[0]["k"] == 5


@pytest.mark.integration
def test_lightning_configure_optimizers(tmp_path) -> None:  # type: ignore[no-untyped-def]
    L = pytest.importorskip("lightning.pytorch")

    class Module(L.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.net = mlp()

        def training_step(self, batch, batch_idx):  # type: ignore[no-untyped-def]
            x, y = batch
            loss = loss_of(self.net, x, y)
            self.log("d", self.optimizers().param_groups[0]["d"])
            return loss

        def configure_optimizers(self):  # type: ignore[no-untyped-def]
            opt = KProdigy(self.parameters())
            sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=5)
            return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    X, y = data()
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(X, y), batch_size=8)
    module = Module()
    trainer = L.Trainer(
        max_steps=5,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        default_root_dir=str(tmp_path),
    )
    trainer.fit(module, loader)
    assert trainer.optimizers[0].param_groups[0]["k"] == 5
