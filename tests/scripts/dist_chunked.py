"""Each rank computes the registered chunked objectives (CLIP, then SigLIP) on its rows of a fixed batch (B not
divisible by the chunk) and reports its loss and the gradients of its local features, logit scale and bias; the
test compares them with the plain loss on one process over the whole batch."""
import sys

import torch
import torch.distributed as dist

from _report import report
from mmalign.losses import AlignmentOutput, build_loss

dist.init_process_group("gloo")
rank, world = dist.get_rank(), dist.get_world_size()
chunk = int(sys.argv[1])
torch.manual_seed(0)
B, D = 14, 16
a = torch.nn.functional.normalize(torch.randn(B, D, dtype=torch.float64), dim=-1)
b = torch.nn.functional.normalize(torch.randn(B, D, dtype=torch.float64), dim=-1)
rows = slice(rank * B // world, (rank + 1) * B // world)
result = {}
for name in ("chunked_clip", "chunked_siglip"):
    a_local = a[rows].clone().requires_grad_(True)
    b_local = b[rows].clone().requires_grad_(True)
    scale = torch.tensor(10.0, dtype=torch.float64, requires_grad=True)
    bias = torch.tensor(-5.0, dtype=torch.float64, requires_grad=True)
    loss_fn = build_loss(name, ["image", "text"], chunk_size=chunk)
    out = loss_fn(AlignmentOutput({"image": a_local, "text": b_local}), logit_scale=scale, logit_bias=bias)
    out["loss"].backward()
    result[name] = {
        "loss": out["loss"].item(), "grad_a": a_local.grad.tolist(), "grad_b": b_local.grad.tolist(),
        "grad_scale": scale.grad.item(), "grad_bias": None if bias.grad is None else bias.grad.item(),
    }
report(result)
