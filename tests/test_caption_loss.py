"""caption_loss ignores the tokenizer's actual pad id; the "coca" objective is 1 x CLIP + 2 x caption CE."""
import pytest
import torch
import torch.nn.functional as F

from mmalign.losses import AlignmentOutput, CaptionTargets, build_loss, caption_loss, clip_loss
from mmalign.losses.caption import next_token_targets


def _batch(B=4, T=7, V=13, pad_id=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(B, T, V, generator=g, dtype=torch.float64, requires_grad=True)
    labels = torch.randint(0, V, (B, T), generator=g)
    labels[labels == pad_id] = (pad_id + 1) % V  # no accidental pads ...
    labels[1, 4:] = pad_id  # ... only real padding
    labels[3, 2:] = pad_id
    labels[0, 0] = 0  # token 0 is a real token here
    return logits, labels


def test_equals_cross_entropy_with_nonzero_pad_id():
    logits, labels = _batch(pad_id=5)
    ours = caption_loss(logits, labels, pad_id=5)
    ref = F.cross_entropy(logits.flatten(0, 1), labels.flatten(), ignore_index=5)
    torch.testing.assert_close(ours, ref, rtol=1e-12, atol=1e-12)
    g_ours, = torch.autograd.grad(ours, logits)
    g_ref, = torch.autograd.grad(ref, logits)
    torch.testing.assert_close(g_ours, g_ref, rtol=1e-12, atol=1e-12)


def test_differs_from_hard_coded_zero():
    logits, labels = _batch(pad_id=5)
    wrong = F.cross_entropy(logits.flatten(0, 1), labels.flatten(), ignore_index=0)
    assert not torch.isclose(caption_loss(logits, labels, pad_id=5), wrong)


def test_pad_positions_get_no_gradient_and_label_smoothing():
    logits, labels = _batch(pad_id=5)
    loss = caption_loss(logits, labels, pad_id=5, label_smoothing=0.1)
    ref = F.cross_entropy(logits.flatten(0, 1), labels.flatten(), ignore_index=5, label_smoothing=0.1)
    torch.testing.assert_close(loss, ref, rtol=1e-12, atol=1e-12)
    grad, = torch.autograd.grad(loss, logits)
    assert grad[labels == 5].abs().max() == 0
    assert grad[labels != 5].abs().max() > 0


def test_all_pad_batch_is_zero_not_nan():
    logits = torch.randn(2, 3, 4, requires_grad=True)
    loss = caption_loss(logits, torch.full((2, 3), 2), pad_id=2)
    assert loss.item() == 0.0
    loss.backward()  # still attached to the graph


def test_next_token_targets_and_bad_inputs():
    logits, tokens = torch.randn(2, 5, 9), torch.randint(0, 9, (2, 5))
    lg, lb = next_token_targets(logits, tokens)
    assert lg.shape == (2, 4, 9) and torch.equal(lb, tokens[:, 1:]) and torch.equal(lg, logits[:, :4])
    with pytest.raises(ValueError):
        caption_loss(logits, tokens[:, 1:], pad_id=0)  # not aligned
    with pytest.raises(TypeError):
        caption_loss(lg, lb, pad_id=None)


def test_coca_objective_combines_clip_and_caption():
    g = torch.Generator().manual_seed(1)
    a = F.normalize(torch.randn(6, 8, generator=g, dtype=torch.float64), dim=-1)
    b = F.normalize(torch.randn(6, 8, generator=g, dtype=torch.float64), dim=-1)
    logits, labels = _batch(B=6, pad_id=3)
    obj = build_loss("coca", ["image", "text"])
    output = AlignmentOutput({"image": a, "text": b}, caption=CaptionTargets(logits, labels, 3))
    out = obj(output, torch.tensor(7.0, dtype=torch.float64))
    con, cap = clip_loss(a, b, 7.0), caption_loss(logits, labels, 3)
    torch.testing.assert_close(out["loss_contrastive"], con)
    torch.testing.assert_close(out["loss_caption"], cap)
    torch.testing.assert_close(out["loss"], con + 2 * cap)
    out2 = build_loss("coca", ["image", "text"], lambda_con=0.5, lambda_cap=1.0)(
        output, torch.tensor(7.0, dtype=torch.float64))
    torch.testing.assert_close(out2["loss"], 0.5 * con + cap)


@pytest.mark.distributed
def test_coca_two_processes_equal_one(torchrun):
    results = torchrun("dist_coca.py")
    torch.manual_seed(0)
    B, D, T, V, PAD = 8, 16, 6, 11, 7
    a = F.normalize(torch.randn(B, D, dtype=torch.float64), dim=-1)
    b = F.normalize(torch.randn(B, D, dtype=torch.float64), dim=-1)
    logits = torch.randn(B, T, V, dtype=torch.float64, requires_grad=True)
    labels = torch.randint(0, V, (B, T))
    labels[: B // 2, 2:] = PAD
    out = build_loss("coca", ["image", "text"])(
        AlignmentOutput({"image": a, "text": b}, caption=CaptionTargets(logits, labels, PAD)),
        logit_scale=torch.tensor(10.0, dtype=torch.float64))
    grad, = torch.autograd.grad(out["loss"], logits)
    assert sum(r["loss"] for r in results) / len(results) == pytest.approx(out["loss"].item(), rel=1e-12)
    # DDP averages gradients over ranks: each rank's local gradient / world must equal the full-batch gradient rows
    local = torch.cat([torch.tensor(r["grad_logits"], dtype=torch.float64) for r in results]) / len(results)
    torch.testing.assert_close(local, grad, rtol=1e-10, atol=1e-12)
