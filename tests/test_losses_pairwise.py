"""CLIP and SigLIP equal open_clip's losses (value and gradients), and the 2-process loss equals 1 process."""
import math

import pytest
import torch
import torch.nn.functional as F

from mmalign.losses import AlignmentOutput, build_loss, clip_loss, siglip_loss
from mmalign.errors import ConfigError


def _feats(B=12, D=32, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    a = F.normalize(torch.randn(B, D, generator=g, dtype=dtype), dim=-1).requires_grad_(True)
    b = F.normalize(torch.randn(B, D, generator=g, dtype=dtype), dim=-1).requires_grad_(True)
    return a, b


def _value_and_grads(fn, a, b):
    loss = fn(a, b)
    ga, gb = torch.autograd.grad(loss, (a, b))
    return loss.detach(), ga, gb


def test_clip_loss_equals_open_clip():
    from open_clip.loss import ClipLoss

    a, b = _feats()
    scale = torch.tensor(14.3, dtype=torch.float64)
    ours = _value_and_grads(lambda x, y: clip_loss(x, y, scale), a, b)
    ref = _value_and_grads(lambda x, y: ClipLoss()(x, y, scale), a, b)
    for o, r in zip(ours, ref):
        torch.testing.assert_close(o, r, rtol=1e-12, atol=1e-12)


def test_siglip_loss_equals_open_clip():
    from open_clip.loss import SigLipLoss

    a, b = _feats()
    scale, bias = torch.tensor(10.0, dtype=torch.float64), torch.tensor(-10.0, dtype=torch.float64)
    ours = _value_and_grads(lambda x, y: siglip_loss(x, y, scale, bias), a, b)
    ref = _value_and_grads(lambda x, y: SigLipLoss()(x, y, scale, bias), a, b)
    for o, r in zip(ours, ref):
        torch.testing.assert_close(o, r, rtol=1e-12, atol=1e-12)


def test_sanity_values():
    a, b = _feats(B=16)
    assert clip_loss(a, b, 0.0).item() == pytest.approx(math.log(16), abs=1e-12)
    assert siglip_loss(a, b, 0.0, 0.0).item() == pytest.approx(16 * math.log(2), abs=1e-10)


def test_clip_over_three_modalities_is_mean_of_pairs():
    a, b = _feats(seed=1)
    c, _ = _feats(seed=2)
    out = build_loss("clip", ["x", "y", "z"])(AlignmentOutput({"x": a, "y": b, "z": c}), logit_scale=torch.tensor(5.0))
    expected = (clip_loss(a, b, 5.0) + clip_loss(a, c, 5.0) + clip_loss(b, c, 5.0)) / 3
    torch.testing.assert_close(out["loss"], expected)


def test_unknown_loss_suggests_closest():
    with pytest.raises(ConfigError, match="did you mean 'siglip'"):
        build_loss("siglp", ["a", "b"])


@pytest.mark.distributed
@pytest.mark.parametrize("name", ["clip", "siglip"])
def test_two_processes_equal_one(torchrun, name):
    results = torchrun("dist_pairwise.py", name)
    torch.manual_seed(0)
    B, D = 8, 16
    a = F.normalize(torch.randn(B, D, dtype=torch.float64), dim=-1).requires_grad_(True)
    b = F.normalize(torch.randn(B, D, dtype=torch.float64), dim=-1).requires_grad_(True)
    out = build_loss(name, ["image", "text"])(
        AlignmentOutput({"image": a, "text": b}), logit_scale=torch.tensor(10.0, dtype=torch.float64),
        logit_bias=torch.tensor(-5.0, dtype=torch.float64),
    )
    ga, gb = torch.autograd.grad(out["loss"], (a, b))
    mean_loss = sum(r["loss"] for r in results) / len(results)
    assert mean_loss == pytest.approx(out["loss"].item(), rel=1e-12)
    # Each rank's local gradient is N x the gradient of the global mean loss (DDP averages it back).
    grad_a = torch.cat([torch.tensor(r["grad_a"], dtype=torch.float64) for r in results]) / len(results)
    grad_b = torch.cat([torch.tensor(r["grad_b"], dtype=torch.float64) for r in results]) / len(results)
    torch.testing.assert_close(grad_a, ga, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(grad_b, gb, rtol=1e-10, atol=1e-12)
