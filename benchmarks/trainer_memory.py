"""Memory options of KProdigy for trainers, measured: state words per parameter and gradient bytes held.

Run: ``PYTHONPATH=. nice python benchmarks/trainer_memory.py`` (CPU, about 20 s). Prints three
markdown tables:

1. optimizer state per parameter (bytes of state / bytes of params) for each memory option, on a
   stand-in of a LoRA training (frozen base excluded: only the trained LoRA A/B factors) and of a
   full fine-tune (dense layers). Counted from the state tensors' sizes, so exact and machine-free;
2. the ``slice_p`` trade-off: the D estimate and the loss after a fixed number of steps, relative
   to ``slice_p=1``, on a seeded regression task;
3. per-parameter stepping (``step_parameter`` from ``register_post_accumulate_grad_hook``): the
   largest number of gradient bytes alive at once during backward + step, against the usual
   ``backward(); step()``. Counted from the live ``.grad`` tensors at every hook (what the saving
   is made of), not an allocator peak: this machine has no GPU, where ``max_memory_allocated``
   would be the measure.
"""

from __future__ import annotations

import platform

import torch

from kprodigy import KProdigy

torch.set_num_threads(1)


def state_ratio(params: list[torch.nn.Parameter], opt: KProdigy) -> float:
    """Bytes of optimizer state (per-param tensors) / bytes of the params."""
    state = sum(t.numel() * t.element_size() for p in params for t in opt.state[p].values() if torch.is_tensor(t))
    return state / sum(p.numel() * p.element_size() for p in params)


def lora_params(width: int = 512, rank: int = 16, layers: int = 8) -> list[torch.nn.Parameter]:
    gen = torch.Generator().manual_seed(0)
    out = []
    for _ in range(layers):
        out.append(torch.nn.Parameter(torch.randn(rank, width, generator=gen) / width**0.5))  # down (A)
        out.append(torch.nn.Parameter(torch.zeros(width, rank)))  # up (B), zero-initialised
    return out


def dense_params(width: int = 512, layers: int = 8) -> list[torch.nn.Parameter]:
    gen = torch.Generator().manual_seed(0)
    return [torch.nn.Parameter(torch.randn(width, width, generator=gen) / width**0.5) for _ in range(layers)]


def measure_state(make, **kwargs) -> float:  # type: ignore[no-untyped-def]
    params = make()
    opt = KProdigy(params, **kwargs)
    gen = torch.Generator().manual_seed(1)
    for _ in range(3):
        for p in params:
            p.grad = torch.randn(p.shape, generator=gen)
        opt.step()
    return state_ratio(params, opt)


def table_state() -> None:
    configs = [
        ("default", {}),
        ("slice_p=11", {"slice_p": 11}),
        ("betas=(0, 0.999)", {"betas": (0.0, 0.999)}),
        ("d_steps=2 (D frozen)", {"d_steps": 2}),
        ("betas=(0, 0.999), d_steps=2", {"betas": (0.0, 0.999), "d_steps": 2}),
        ("factored=True", {"factored": True}),
        ("factored=True, d_steps=2", {"factored": True, "d_steps": 2}),
    ]
    print("| option | LoRA (B zero-initialised) | full fine-tune |")
    print("| --- | --- | --- |")
    for name, kw in configs:
        print(f"| {name} | {measure_state(lora_params, **kw):.2f} | {measure_state(dense_params, **kw):.2f} |")


def table_slice_p(steps: int = 200) -> None:
    gen = torch.Generator().manual_seed(0)
    X = torch.randn(256, 64, generator=gen)
    y = torch.tanh(X @ torch.randn(64, 1, generator=gen))
    results = {}
    for slice_p in (1, 3, 11, 101):
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(64, 256), torch.nn.Tanh(), torch.nn.Linear(256, 1))
        opt = KProdigy(model.parameters(), slice_p=slice_p)
        for _ in range(steps):
            opt.zero_grad()
            loss = ((model(X) - y) ** 2).mean()
            loss.backward()
            opt.step()
        params = list(model.parameters())
        results[slice_p] = (opt.param_groups[0]["d"], loss.item(), state_ratio(params, opt))
    d1, l1, _ = results[1]
    print(f"| slice_p | state / params | D after {steps} steps / D(slice_p=1) | loss / loss(slice_p=1) |")
    print("| --- | --- | --- | --- |")
    for slice_p, (d, loss, ratio) in results.items():
        print(f"| {slice_p} | {ratio:.2f} | {d / d1:.3f} | {loss / l1:.3f} |")


def table_per_parameter(layers: int = 24, width: int = 256, steps: int = 3) -> None:
    def run(per_param: bool) -> tuple[int, int, list[float]]:
        torch.manual_seed(0)
        mods: list[torch.nn.Module] = []
        for _ in range(layers):
            mods += [torch.nn.Linear(width, width), torch.nn.Tanh()]
        model = torch.nn.Sequential(*mods)
        params = list(model.parameters())
        opt = KProdigy(params)
        peak = [0]

        def live() -> int:
            return sum(p.grad.numel() * p.grad.element_size() for p in params if p.grad is not None)

        def hook(p: torch.Tensor) -> None:
            peak[0] = max(peak[0], live())
            if per_param:
                opt.step_parameter(p)
                p.grad = None

        for p in params:
            p.register_post_accumulate_grad_hook(hook)
        gen = torch.Generator().manual_seed(1)
        X = torch.randn(32, width, generator=gen)
        for _ in range(steps):
            model(X).square().mean().backward()
            peak[0] = max(peak[0], live())
            if per_param:
                opt.finalize_step()
            else:
                opt.step()
                opt.zero_grad()
        return peak[0], sum(p.numel() * p.element_size() for p in params), [g["d"] for g in opt.param_groups]

    full_peak, total, d_full = run(False)
    hook_peak, _, d_hook = run(True)
    print(f"| stepping ({layers} layers of {width}x{width}) | gradient bytes held at once | / param bytes |")
    print("| --- | --- | --- |")
    print(f"| backward(); step() | {full_peak} | {full_peak / total:.3f} |")
    print(f"| step_parameter in post-accumulate-grad hooks | {hook_peak} | {hook_peak / total:.3f} |")
    print(f"\nD after {steps} steps: step() {d_full[0]:.6g}, step_parameter {d_hook[0]:.6g}")


if __name__ == "__main__":
    print(f"machine: {platform.machine()} CPU, {torch.get_num_threads()} thread, torch {torch.__version__}\n")
    table_state()
    print()
    table_slice_p()
    print()
    table_per_parameter()
