"""Each rank computes the registered CoCa objective on its half of a fixed batch (with different numbers of pad
tokens per rank) and reports its loss and the gradient of its local caption logits."""
import torch
import torch.distributed as dist

from _report import report
from mmalign.losses import AlignmentOutput, CaptionTargets, build_loss

dist.init_process_group("gloo")
rank, world = dist.get_rank(), dist.get_world_size()
torch.manual_seed(0)
B, D, T, V, PAD = 8, 16, 6, 11, 7
a = torch.nn.functional.normalize(torch.randn(B, D, dtype=torch.float64), dim=-1)
b = torch.nn.functional.normalize(torch.randn(B, D, dtype=torch.float64), dim=-1)
logits = torch.randn(B, T, V, dtype=torch.float64)
labels = torch.randint(0, V, (B, T))
labels[: B // 2, 2:] = PAD  # rank 0 holds far fewer real tokens than rank 1
rows = slice(rank * B // world, (rank + 1) * B // world)
a_local, b_local = a[rows].clone().requires_grad_(True), b[rows].clone().requires_grad_(True)
logits_local = logits[rows].clone().requires_grad_(True)
out = build_loss("coca", ["image", "text"])(
    AlignmentOutput({"image": a_local, "text": b_local}, caption=CaptionTargets(logits_local, labels[rows], PAD)),
    logit_scale=torch.tensor(10.0, dtype=torch.float64),
)
out["loss"].backward()
report({"rank": rank, "loss": out["loss"].item(), "grad_logits": logits_local.grad.tolist()})
