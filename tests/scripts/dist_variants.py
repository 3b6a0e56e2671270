"""Each rank computes the loss variants (cwcl, dcl, ...) on its half of a fixed batch and reports, per config, its
loss and the gradients of its local features; the test compares them with one process on the whole batch.

argv[1]: JSON list of [label, loss name, kwargs]. The batch is built as in ``test_losses_variants._dist_batch``.
"""
import json
import sys

import torch
import torch.distributed as dist

from _report import report
from mmalign.losses import AlignmentOutput, build_loss

dist.init_process_group("gloo")
rank, world = dist.get_rank(), dist.get_world_size()
configs = json.loads(sys.argv[1])
torch.manual_seed(0)
B, D, DQ = 8, 16, 12
a = torch.nn.functional.normalize(torch.randn(B, D, dtype=torch.float64), dim=-1)
b = torch.nn.functional.normalize(torch.randn(B, D, dtype=torch.float64), dim=-1)
q = torch.randn(B, DQ, dtype=torch.float64)
rows = slice(rank * B // world, (rank + 1) * B // world)
result = {}
for label, name, kwargs in configs:
    a_local = a[rows].clone().requires_grad_(True)
    b_local = b[rows].clone().requires_grad_(True)
    q_local = q[rows].clone().requires_grad_(True)
    out = build_loss(name, ["image", "text"], **kwargs)(
        AlignmentOutput({"image": a_local, "text": b_local}, frozen_features={"image": q_local}),
        logit_scale=torch.tensor(10.0, dtype=torch.float64),
    )
    out["loss"].backward()
    result[label] = {
        "loss": out["loss"].item(), "components": {k: v.item() for k, v in out.items()},
        "grad_a": a_local.grad.tolist(), "grad_b": b_local.grad.tolist(), "q_grad_is_none": q_local.grad is None,
    }
report(result)
