"""Each rank computes the registered CLIP/SigLIP objective on its half of a fixed batch and reports its loss and
the gradients of its local features; the test compares them with one process on the whole batch."""
import sys

import torch
import torch.distributed as dist

from _report import report
from mmalign.losses import AlignmentOutput, build_loss

dist.init_process_group("gloo")
rank, world = dist.get_rank(), dist.get_world_size()
name = sys.argv[1]
torch.manual_seed(0)
B, D = 8, 16
a = torch.nn.functional.normalize(torch.randn(B, D, dtype=torch.float64), dim=-1)
b = torch.nn.functional.normalize(torch.randn(B, D, dtype=torch.float64), dim=-1)
rows = slice(rank * B // world, (rank + 1) * B // world)
a_local = a[rows].clone().requires_grad_(True)
b_local = b[rows].clone().requires_grad_(True)
loss_fn = build_loss(name, ["image", "text"])
out = loss_fn(AlignmentOutput({"image": a_local, "text": b_local}), logit_scale=torch.tensor(10.0, dtype=torch.float64),
              logit_bias=torch.tensor(-5.0, dtype=torch.float64))
out["loss"].backward()
report({"rank": rank, "loss": out["loss"].item(), "grad_a": a_local.grad.tolist(), "grad_b": b_local.grad.tolist()})
