"""KProdigy with FSDP2 (fully_shard): nothing to set; a distributed checkpoint at the end.

    torchrun --nproc_per_node=2 examples/distributed/fsdp2.py

fully_shard turns the params into DTensors sharded over the ranks; KProdigy steps each rank's
shard and sums its D statistics over the sharding mesh (one all_reduce per step).
"""

import tempfile

import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from _common import batch, model, report, setup
from torch import nn
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict
from torch.distributed.fsdp import fully_shard

from kprodigy import KProdigy

rank, world, device = setup()
net = model(device)
for layer in (net[0], net[2]):
    fully_shard(layer)
fully_shard(net)
opt = KProdigy(net.parameters(), weight_decay=0.01)
for step in range(50):
    x, y = batch(step, rank, device)
    opt.zero_grad()
    loss = nn.functional.mse_loss(net(x), y)
    loss.backward()
    opt.step()
    if step % 10 == 9:
        report(rank, [g["d"] for g in opt.param_groups], loss.item(), label=f"step {step + 1}")

# save and restore model and optimizer (D lives in the param groups, the rest in DTensors), in a
# temporary folder that rank 0 creates and removes once every rank is done with it
tmp = tempfile.TemporaryDirectory(prefix="kprodigy-fsdp2-") if rank == 0 else None
directory = [tmp.name if tmp is not None else None]
dist.broadcast_object_list(directory)
model_sd, optim_sd = get_state_dict(net, opt)
dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=directory[0])
dcp.load({"model": model_sd, "optim": optim_sd}, checkpoint_id=directory[0])
set_state_dict(net, opt, model_state_dict=model_sd, optim_state_dict=optim_sd)
report(rank, [g["d"] for g in opt.param_groups], loss.item(), label="after dcp.save + dcp.load (same D expected)")
dist.barrier()  # every rank has finished reading the checkpoint
if tmp is not None:
    tmp.cleanup()
dist.destroy_process_group()
