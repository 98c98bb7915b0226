"""KProdigy inside ZeroRedundancyOptimizer (ZeRO stage 1): nothing to set.

    torchrun --nproc_per_node=2 examples/distributed/zero.py

ZeRO builds one KProdigy per rank over a part of the params; KProdigy notices it is built by
ZeroRedundancyOptimizer and sums its D statistics over ZeRO's process group (one all_reduce per
step), so every rank keeps the D of the whole model. Two param groups here, each with its own D
(``independent_d=True``; by default all groups share one D), so each line prints two D values per
rank: group 0 (the first layer) and group 1 (the last layer, lr multiplier 0.5).
"""

import torch.distributed as dist
from _common import batch, model, report, setup
from torch import nn
from torch.distributed.optim import ZeroRedundancyOptimizer
from torch.nn.parallel import DistributedDataParallel as DDP

from kprodigy import KProdigy

rank, world, device = setup()
base = model(device)
net = DDP(base)
# lists, not generators: ZeroRedundancyOptimizer reads the groups twice
groups = [{"params": list(base[0].parameters())}, {"params": list(base[2].parameters()), "lr": 0.5}]
opt = ZeroRedundancyOptimizer(groups, optimizer_class=KProdigy, weight_decay=0.01, independent_d=True)
for step in range(50):
    x, y = batch(step, rank, device)
    opt.zero_grad()
    loss = nn.functional.mse_loss(net(x), y)
    loss.backward()
    opt.step()
    if step % 10 == 9:
        report(rank, [g["d"] for g in opt.param_groups], loss.item(), label=f"step {step + 1}",
               names="D of group 0 (first layer), D of group 1 (last layer)")
dist.destroy_process_group()
