"""Symile and GRAM: reductions to known cases, brute-force enumerations, numerical safety, masks, 2 processes."""
import itertools
import math

import pytest
import torch
import torch.nn.functional as F

from mmalign.errors import ConfigError
from mmalign.losses import AlignmentOutput, build_loss, clip_loss, gram_loss, gram_volume, symile_loss
from mmalign.losses.multimodal import text_anchor
from tests.scripts.dist_multimodal import CASES, batch, matching_head


def _feats(m, B=5, D=7, seed=0, dtype=torch.float64, grad=False):
    g = torch.Generator().manual_seed(seed)
    out = [F.normalize(torch.randn(B, D, generator=g, dtype=dtype), dim=-1) for _ in range(m)]
    return [x.requires_grad_(grad) for x in out]


def _mip(vectors):
    return torch.stack(vectors).prod(0).sum()


def _symile_brute(feats, s):
    """Python loop over every anchor, row and tuple of other-modality rows (the definition, no vectorisation)."""
    M, B = len(feats), feats[0].shape[0]
    total = 0.0
    for a in range(M):
        others = [f for k, f in enumerate(feats) if k != a]
        for i in range(B):
            scores, pos = [], None
            for n, combo in enumerate(itertools.product(range(B), repeat=M - 1)):
                scores.append(s * _mip([feats[a][i]] + [o[j] for o, j in zip(others, combo)]))
                if all(j == i for j in combo):
                    pos = n
            total = total - torch.log_softmax(torch.stack(scores), 0)[pos]
    return total / (M * B)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_symile_with_two_modalities_is_clip(dtype):
    a, b = _feats(2, B=12, D=32, dtype=dtype, grad=True)
    scale = torch.tensor(14.3, dtype=dtype)
    ours = symile_loss([a, b], scale)
    ref = clip_loss(a, b, scale)
    assert ours.item() == ref.item()  # the same value, not just close
    for g1, g2 in zip(torch.autograd.grad(ours, (a, b)), torch.autograd.grad(ref, (a, b))):
        torch.testing.assert_close(g1, g2, rtol=0, atol=0)


@pytest.mark.parametrize("m,B", [(3, 4), (4, 3)])
def test_symile_n_squared_equals_brute_force(m, B):
    feats = _feats(m, B=B, D=5, seed=m, grad=True)
    ours = symile_loss(feats, 3.0)
    ref = _symile_brute(feats, 3.0)
    torch.testing.assert_close(ours, ref, rtol=1e-12, atol=1e-12)
    for g1, g2 in zip(torch.autograd.grad(ours, feats), torch.autograd.grad(ref, feats)):
        torch.testing.assert_close(g1, g2, rtol=1e-10, atol=1e-12)


def test_symile_n_negatives_follow_the_shuffle_definition():
    """'n': per anchor, one randperm per other modality (in order) from the generator; the positive replaces the
    diagonal; CE over B candidates. Rebuilt here with explicit loops from the same generator draws."""
    feats = _feats(3, B=6, D=4, seed=1)
    ours = symile_loss(feats, 5.0, negatives="n", generator=torch.Generator().manual_seed(7))
    g = torch.Generator().manual_seed(7)
    B, total = 6, 0.0
    for a in range(3):
        others = [f for k, f in enumerate(feats) if k != a]
        perms = [torch.randperm(B, generator=g) for _ in others]
        for i in range(B):
            scores = [
                5.0 * _mip([feats[a][i]] + [o[i if j == i else p[j]] for o, p in zip(others, perms)])
                for j in range(B)
            ]
            total = total - torch.log_softmax(torch.stack(scores), 0)[i]
    torch.testing.assert_close(ours, total / (3 * B), rtol=1e-12, atol=1e-12)


def test_symile_n_repeats_with_seed_and_differs_with_another():
    feats = _feats(3, B=16, D=8)

    def run(seed):
        return symile_loss(feats, 10.0, negatives="n", generator=torch.Generator().manual_seed(seed))

    assert run(0).item() == run(0).item()
    assert run(0).item() != run(1).item()
    with pytest.raises(ValueError, match="negatives"):
        symile_loss(feats, 10.0, negatives="all")
    with pytest.raises(ConfigError, match="negatives"):
        build_loss("symile", ["x", "y", "z"], negatives="all")


def test_gram_volume_of_two_unit_vectors_is_sine_of_angle():
    a, b = _feats(2, B=6, D=3, seed=2)
    angle = torch.arccos((a[:, None, :] * b[None, :, :]).sum(-1))
    torch.testing.assert_close(gram_volume(a, [b], eps=0.0), torch.sin(angle), rtol=1e-12, atol=1e-12)
    # default eps: sqrt(sin^2 + 1e-6) stays within 1e-6 / (2 sin) of the sine
    torch.testing.assert_close(gram_volume(a, [b]), torch.sin(angle), rtol=0, atol=1e-5)


@pytest.mark.parametrize("k", [2, 3, 4])
def test_gram_volume_equals_brute_force_det(k):
    feats = _feats(k, B=4, D=6, seed=k)
    vol = gram_volume(feats[0], feats[1:], eps=0.0)
    for i, j in itertools.product(range(4), repeat=2):
        x = torch.stack([feats[0][i]] + [f[j] for f in feats[1:]])
        torch.testing.assert_close(vol[i, j], torch.linalg.det(x @ x.T).sqrt(), rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("k", [2, 3, 4])
def test_gram_finite_for_identical_and_collinear_vectors(dtype, k):
    (v,) = _feats(1, B=3, D=5, dtype=dtype)
    for others in ([v] * (k - 1), [-v] + [v] * (k - 2)):
        a = v.clone().requires_grad_(True)
        os_ = [o.clone().requires_grad_(True) for o in others]
        vol = gram_volume(a, os_)
        assert torch.isfinite(vol).all()
        assert vol.diagonal().max().item() < 2e-3  # ~sqrt(eps): degenerate parallelotope
        loss = gram_loss([a, *os_], 10.0) + vol.sum()
        grads = torch.autograd.grad(loss, [a, *os_])
        assert torch.isfinite(loss) and all(torch.isfinite(g).all() for g in grads)


@pytest.mark.parametrize("half", [torch.bfloat16, torch.float16])
def test_gram_volume_is_float32_under_autocast(half):
    """Well-aligned tuples have small volumes from inner products near 1: in bf16/fp16 they come out wrong by
    5% (bf16) and 0.4% (fp16) here; GRAM computes them in float32 (its code: ``torch.det(G.float())``)."""
    g = torch.Generator().manual_seed(11)
    B, D = 16, 256
    anchor = F.normalize(torch.randn(B, D, generator=g), dim=-1)
    others = [F.normalize(anchor + 0.3 * torch.randn(B, D, generator=g) / D**0.5, dim=-1) for _ in range(2)]
    exact = gram_volume(anchor.double(), [o.double() for o in others])
    assert exact.diagonal().max() < 0.1  # the positives are well aligned (cosines ~0.96)
    with torch.autocast("cpu", dtype=half):
        vol = gram_volume(anchor, others)
        loss = gram_loss([anchor, *others], 10.0, label_smoothing=0.1)
    assert vol.dtype == torch.float32
    torch.testing.assert_close(vol.double(), exact, rtol=1e-4, atol=0)
    torch.testing.assert_close(loss.double(), gram_loss([anchor.double(), *(o.double() for o in others)], 10.0, 0.1),
                               rtol=1e-4, atol=0)


def test_gram_anchor_defaults_to_text():
    assert build_loss("gram", ["image", "glyph", "text"]).modalities == ["text", "image", "glyph"]
    assert build_loss("gram", ["image", "glyph", "text"], anchor="glyph").modalities == ["glyph", "image", "text"]
    assert build_loss("gram", ["image", "audio", "video"]).modalities == ["image", "audio", "video"]
    # a text modality under another name: the caller that knows the kinds picks it
    kinds = {"image": "image", "caption": "text", "audio": "audio"}
    assert text_anchor(["image", "caption", "audio"], kinds) == "caption"
    assert text_anchor(["image", "audio"], {"image": "image", "audio": "audio"}) is None
    with pytest.raises(ConfigError, match="label_smoothing"):
        build_loss("gram", ["image", "text"], label_smoothing=1.5)


def test_a_recipe_anchors_gram_on_the_modality_of_kind_text():
    from mmalign.build import build_objective
    from mmalign.config import load_config

    sections = {"image": {"tower": "small_cnn"}, "caption": {"kind": "text", "model": "x"},
                "audio": {"tower": "mel_cnn"}}
    cfg = load_config(base={"run_dir": "r", "data": {"train": "x.tar"}, "loss": {"name": "gram"},
                            "model": {"modalities": sections}})
    assert build_objective(cfg).modalities == ["caption", "image", "audio"]
    cfg = load_config(base={**dict(run_dir="r", data={"train": "x.tar"}, model={"modalities": sections}),
                            "loss": {"name": "gram", "kwargs": {"anchor": "audio"}}})
    assert build_objective(cfg).modalities == ["audio", "image", "caption"]


def test_gram_loss_label_smoothing_matches_cross_entropy():
    feats = _feats(3, B=6, D=8, seed=4, grad=True)
    s = torch.tensor(7.0, dtype=torch.float64)
    logits = -s * gram_volume(feats[0], feats[1:])
    labels = torch.arange(6)
    for ls in (0.0, 0.1):
        ref = 0.5 * (
            F.cross_entropy(logits, labels, label_smoothing=ls) + F.cross_entropy(logits.T, labels, label_smoothing=ls)
        )
        torch.testing.assert_close(gram_loss(feats, s, label_smoothing=ls), ref, rtol=1e-12, atol=1e-12)
    assert gram_loss(feats, s, 0.1).item() != gram_loss(feats, s).item()


@pytest.mark.parametrize("name,fn", [("symile", symile_loss), ("gram", gram_loss)])
def test_objective_equals_function_and_mask_keeps_complete_rows(name, fn):
    feats = _feats(3, B=8, D=6, seed=5)
    emb = dict(zip("xyz", feats))
    s = torch.tensor(6.0, dtype=torch.float64)
    obj = build_loss(name, ["x", "y", "z"], missing="drop")
    torch.testing.assert_close(obj(AlignmentOutput(emb), logit_scale=s)["loss"], fn(feats, s), rtol=1e-12, atol=1e-12)

    present = {"y": torch.tensor([1, 0, 1, 1, 1, 1, 0, 1], dtype=torch.bool),
               "z": torch.tensor([1, 1, 1, 0, 1, 1, 1, 1], dtype=torch.bool)}
    keep = present["y"] & present["z"]
    # garbage in the missing rows must not matter
    garbage = {m: torch.where(present.get(m, torch.ones(8, dtype=torch.bool))[:, None], x, torch.nan)
               for m, x in emb.items()}
    out = obj(AlignmentOutput(garbage, present), logit_scale=s)
    torch.testing.assert_close(out["loss"], fn([x[keep] for x in feats], s), rtol=1e-12, atol=1e-12)
    assert out["complete_rows"].item() == keep.sum().item()


def test_objective_with_no_complete_row_is_zero_and_differentiable():
    x, y, z = _feats(3, B=4, D=6, grad=True)
    out = build_loss("gram", ["x", "y", "z"])(
        AlignmentOutput({"x": x, "y": y, "z": z}, {"x": torch.zeros(4, dtype=torch.bool)}),
        logit_scale=torch.tensor(5.0)
    )
    assert out["loss"].item() == 0.0
    out["loss"].backward()
    assert x.grad is not None and (x.grad == 0).all()


def test_symile_sanity_value_at_zero_scale():
    """s = 0: uniform over B^(M-1) candidates (n_squared) or B candidates (n)."""
    feats = _feats(3, B=5, D=4)
    assert symile_loss(feats, 0.0).item() == pytest.approx(math.log(25), abs=1e-12)
    assert symile_loss(feats, 0.0, "n", torch.Generator()).item() == pytest.approx(math.log(5), abs=1e-12)


@pytest.mark.distributed
def test_two_processes_equal_one(torchrun):
    results = torchrun("dist_multimodal.py")
    feats, present = batch()
    for case, (name, kwargs, masked) in CASES.items():
        full = {m: f.clone().requires_grad_(True) for m, f in feats.items()}
        head = matching_head(kwargs)
        out = build_loss(name, list(feats), **kwargs)(
            AlignmentOutput(full, present if masked else None, matching=head),
            logit_scale=torch.tensor(8.0, dtype=torch.float64)
        )
        head_params = list(head.parameters()) if head is not None else []
        *grads, = torch.autograd.grad(out["loss"], list(full.values()) + head_params)
        grads, head_grads = grads[:len(full)], grads[len(full):]
        mean_loss = sum(r[case]["loss"] for r in results) / len(results)
        assert mean_loss == pytest.approx(out["loss"].item(), rel=1e-12), case
        # The matching head's gradient averaged over ranks (what DDP does) is the one-process gradient.
        for i, g in enumerate(head_grads):
            mean = sum(torch.tensor(r[case]["head_grads"][i], dtype=torch.float64) for r in results) / len(results)
            torch.testing.assert_close(mean, g, rtol=1e-10, atol=1e-12, msg=f"{case} head")
        # Each rank's local gradient is N x the gradient of the global mean loss (DDP averages it back).
        for m, g in zip(full, grads):
            local = torch.cat([torch.tensor(r[case]["grads"][m], dtype=torch.float64) for r in results])
            torch.testing.assert_close(local / len(results), g, rtol=1e-10, atol=1e-12, msg=f"{case} {m}")
