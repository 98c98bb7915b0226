"""KProdigy under DistributedDataParallel: nothing to set.

    torchrun --nproc_per_node=2 examples/distributed/ddp.py

DDP replicates the params and averages the gradients, so every rank computes the same D on its
own; KProdigy detects no sharding and adds no collective.
"""

import torch.distributed as dist
from _common import batch, model, report, setup
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

from kprodigy import KProdigy

rank, world, device = setup()
net = DDP(model(device))
opt = KProdigy(net.parameters(), weight_decay=0.01)
for step in range(50):
    x, y = batch(step, rank, device)
    opt.zero_grad()
    loss = nn.functional.mse_loss(net(x), y)
    loss.backward()
    opt.step()
    if step % 10 == 9:
        report(rank, [g["d"] for g in opt.param_groups], loss.item(), label=f"step {step + 1}")
dist.destroy_process_group()
