"""Loss variants: each defining property (CWCL, label smoothing, DCL, hard negatives, align/uniform, temperature),
float64 gradchecks, the registered objectives, and 2 processes equal 1 process."""
import json
import math

import pytest
import torch
import torch.nn.functional as F

from mmalign.errors import ConfigError
from mmalign.losses import (
    AlignmentOutput, TemperatureSchedule, alignment_loss, build_loss, clip_loss, cwcl_loss, cwcl_rows_loss,
    cwcl_weights, dcl_loss, dcl_rows_loss, hard_negative_clip_loss, infonce_rows, label_smoothed_clip_loss,
    label_smoothed_clip_rows_loss, scheduled_logit_scale, scheduled_temperature, uniformity_loss,
)
from mmalign.losses.regularisers import uniformity_rows_lse
from mmalign.losses.variants import hard_negative_log_weights

F64 = torch.float64


def _feats(B=12, D=32, seed=0, dtype=F64):
    g = torch.Generator().manual_seed(seed)
    a = F.normalize(torch.randn(B, D, generator=g, dtype=dtype), dim=-1).requires_grad_(True)
    b = F.normalize(torch.randn(B, D, generator=g, dtype=dtype), dim=-1).requires_grad_(True)
    return a, b


def _value_and_grads(fn, *inputs):
    loss = fn(*inputs)
    return (loss.detach(), *torch.autograd.grad(loss, inputs))


def _assert_same(ours, ref, **tol):
    for o, r in zip(ours, ref):
        torch.testing.assert_close(o, r, **(tol or {"rtol": 1e-12, "atol": 1e-12}))


# ------------------------------------------------------------------------------------------------------------ CWCL


def test_cwcl_weights_properties():
    q = torch.randn(10, 6, dtype=F64, generator=torch.Generator().manual_seed(3)).requires_grad_(True)
    w = cwcl_weights(q)
    assert w.shape == (10, 10) and not w.requires_grad
    assert w.min() >= 0 and w.max() <= 1
    torch.testing.assert_close(w.diagonal(), torch.ones(10, dtype=F64))
    torch.testing.assert_close(w, w.T)
    qn = F.normalize(q.detach(), dim=-1)
    torch.testing.assert_close(w, 0.5 * qn @ qn.T + 0.5)
    # Rows against all columns give the same rows; identical features give all-ones targets, opposite ones zero.
    torch.testing.assert_close(cwcl_weights(q[3:7], columns=q), w[3:7])
    assert cwcl_weights(torch.tensor([[1.0, 0.0], [-2.0, 0.0]]))[0, 1].item() == 0.0


def test_cwcl_weights_carry_no_gradient():
    a, b = _feats()
    q = torch.randn(12, 5, dtype=F64).requires_grad_(True)
    w = cwcl_weights(q)
    assert not w.requires_grad and w.grad_fn is None
    loss = cwcl_loss(a, b, 10.0, w)
    ga, gq = torch.autograd.grad(loss, (a, q), allow_unused=True)
    assert gq is None and ga is not None and ga.abs().sum() > 0


def test_cwcl_conditioned_weights_follow_their_formula():
    q = torch.randn(10, 6, dtype=F64, generator=torch.Generator().manual_seed(5)).requires_grad_(True)
    qc = F.normalize(q.detach() - q.detach().mean(0), dim=-1)
    for center, gamma in ((True, 1.0), (False, 3.0), (True, 6.5)):
        w = cwcl_weights(q, center=center, sharpness=gamma)
        qn = qc if center else F.normalize(q.detach(), dim=-1)
        torch.testing.assert_close(w, ((1 + qn @ qn.T) / 2) ** gamma, rtol=1e-12, atol=1e-12)
        assert not w.requires_grad and w.grad_fn is None
        torch.testing.assert_close(w.diagonal(), torch.ones(10, dtype=F64))
        torch.testing.assert_close(w, w.T)
        # The mean comes from the columns: a block of rows is the same rows of the full matrix.
        torch.testing.assert_close(cwcl_weights(q[2:5], columns=q, center=center, sharpness=gamma), w[2:5])
    # Centring removes a direction every feature shares (what makes MiniLM's unrelated captions look alike) ...
    shared = 5 * torch.randn(1, 6, dtype=F64)
    assert cwcl_weights(q + shared).mean() > cwcl_weights(q).mean() + 0.1
    torch.testing.assert_close(cwcl_weights(q + shared, center=True), cwcl_weights(q, center=True))
    # ... and sharpening keeps similar pairs' weight while dissimilar ones vanish: w^gamma, w < 1 shrinks faster.
    w1, w8 = cwcl_weights(q), cwcl_weights(q, sharpness=8.0)
    off = ~torch.eye(10, dtype=torch.bool)
    assert (w8[off] < w1[off]).all() and (w8 / w8.sum(1, keepdim=True)).diagonal().min() > \
        (w1 / w1.sum(1, keepdim=True)).diagonal().max()
    with pytest.raises(ValueError, match="sharpness"):
        cwcl_weights(q, sharpness=0.0)


def test_cwcl_sharpened_weights_tend_to_clip():
    a, b = _feats()
    q = torch.randn(12, 7, dtype=F64, generator=torch.Generator().manual_seed(6))
    scale = torch.tensor(14.3, dtype=F64, requires_grad=True)
    w = cwcl_weights(q, center=True, sharpness=5000.0)
    assert (w - torch.eye(12, dtype=F64)).abs().max() < 1e-9
    _assert_same(
        _value_and_grads(lambda x, y, s: cwcl_loss(x, y, s, w), a, b, scale),
        _value_and_grads(clip_loss, a, b, scale),
        rtol=1e-9, atol=1e-9,
    )


def test_cwcl_identity_equals_clip():
    a, b = _feats()
    scale = torch.tensor(14.3, dtype=F64, requires_grad=True)
    eye = torch.eye(12, dtype=F64)
    _assert_same(
        _value_and_grads(lambda x, y, s: cwcl_loss(x, y, s, eye), a, b, scale),
        _value_and_grads(clip_loss, a, b, scale),
    )


def test_cwcl_matches_definition_with_asymmetric_weights():
    a, b = _feats(B=7, D=5, seed=1)
    g = torch.Generator().manual_seed(4)
    w = torch.rand(7, 7, generator=g, dtype=F64).fill_diagonal_(1.0)
    s = 9.0
    log_p_ab = torch.log_softmax(s * a @ b.T, dim=1)
    log_p_ba = torch.log_softmax(s * b @ a.T, dim=1)
    l_ab = -((w * log_p_ab).sum(1) / w.sum(1)).mean()
    l_ba = -((w.T * log_p_ba).sum(1) / w.T.sum(1)).mean()
    torch.testing.assert_close(cwcl_loss(a, b, s, w), 0.5 * (l_ab + l_ba), rtol=1e-12, atol=1e-12)


def test_cwcl_rows_blocks_average_to_full():
    a, b = _feats(B=8, D=6, seed=2)
    w = cwcl_weights(torch.randn(8, 3, dtype=F64))
    parts = [cwcl_rows_loss(a[r], b[r], a, b, 7.0, w[r], w.T[r]) for r in (slice(0, 4), slice(4, 8))]
    torch.testing.assert_close(sum(parts) / 2, cwcl_loss(a, b, 7.0, w), rtol=1e-12, atol=1e-12)


def test_soft_targets_are_the_optimum():
    # Soft-target CE: d loss / d z_ij = (softmax(z)_ij - w_ij / sum_j w_ij) / rows, zero where softmax matches the
    # normalised targets: CWCL pulls each row's distribution towards the frozen tower's similarity structure.
    w = cwcl_weights(torch.randn(6, 4, dtype=F64, generator=torch.Generator().manual_seed(9)))
    t = w / w.sum(1, keepdim=True)
    z = torch.randn(6, 6, dtype=F64, requires_grad=True)
    g, = torch.autograd.grad(infonce_rows(z, targets=w), z)
    torch.testing.assert_close(g, (torch.softmax(z, 1) - t).detach() / 6)
    z_opt = (t.log() + 3.0).requires_grad_(True)
    g_opt, = torch.autograd.grad(loss := infonce_rows(z_opt, targets=w), z_opt)
    torch.testing.assert_close(g_opt, torch.zeros_like(g_opt), atol=1e-15, rtol=0)
    torch.testing.assert_close(loss, -(t * t.log()).sum(1).mean())  # the minimum is the targets' entropy


# -------------------------------------------------------------------------------------------------- label smoothing


@pytest.mark.parametrize("eps", [0.0, 0.1, 0.3])
def test_label_smoothing_equals_cross_entropy(eps):
    a, b = _feats()
    scale = torch.tensor(12.0, dtype=F64, requires_grad=True)
    y = torch.arange(12)

    def ref(x, z, s):
        return 0.5 * (F.cross_entropy(s * x @ z.T, y, label_smoothing=eps)
                      + F.cross_entropy(s * z @ x.T, y, label_smoothing=eps))

    _assert_same(_value_and_grads(lambda x, z, s: label_smoothed_clip_loss(x, z, s, eps), a, b, scale),
                 _value_and_grads(ref, a, b, scale))
    # Local rows at an offset against all columns: the same per-row terms.
    part = label_smoothed_clip_rows_loss(a[4:8], b[4:8], a, b, 12.0, eps, row_offset=4)
    full_rows = 0.5 * (F.cross_entropy(12.0 * a[4:8] @ b.T, y[4:8], label_smoothing=eps)
                       + F.cross_entropy(12.0 * b[4:8] @ a.T, y[4:8], label_smoothing=eps))
    torch.testing.assert_close(part, full_rows, rtol=1e-12, atol=1e-12)


def test_label_smoothing_zero_is_clip():
    a, b = _feats()
    _assert_same(_value_and_grads(lambda x, y: label_smoothed_clip_loss(x, y, 10.0, 0.0), a, b),
                 _value_and_grads(lambda x, y: clip_loss(x, y, 10.0), a, b))


# ------------------------------------------------------------------------------------------------------------- DCL


def test_dcl_excludes_the_positive():
    a, b = _feats(B=6, D=5, seed=3)
    s = 8.0
    terms = []
    for x, y in ((a, b), (b, a)):
        z = s * x @ y.T
        per_row = [-z[i, i] + torch.logsumexp(torch.cat([z[i, :i], z[i, i + 1:]]), 0) for i in range(6)]
        terms.append(torch.stack(per_row).mean())
    torch.testing.assert_close(dcl_loss(a, b, s), 0.5 * (terms[0] + terms[1]), rtol=1e-12, atol=1e-12)


def test_dcl_is_clip_minus_the_coupling_term():
    a, b = _feats()
    s = 10.0
    coupling = sum(torch.log1p(-torch.softmax(s * x @ y.T, 1).diagonal()).mean() for x, y in ((a, b), (b, a))) / 2
    torch.testing.assert_close(dcl_loss(a, b, s), clip_loss(a, b, s) + coupling, rtol=1e-10, atol=1e-12)
    assert dcl_loss(a, b, s) < clip_loss(a, b, s)
    # Perfectly aligned, well separated pairs: DCL keeps decreasing below 0 (no ln(1) floor), but stays finite.
    eye = torch.eye(4, dtype=F64)
    assert torch.isfinite(dcl_loss(eye, eye, 100.0)) and dcl_loss(eye, eye, 100.0) < -90


def test_dcl_rows_blocks_average_to_full():
    a, b = _feats(B=8, D=6, seed=4)
    parts = [dcl_rows_loss(a[r], b[r], a, b, 5.0, row_offset=r.start) for r in (slice(0, 4), slice(4, 8))]
    torch.testing.assert_close(sum(parts) / 2, dcl_loss(a, b, 5.0), rtol=1e-12, atol=1e-12)


# ------------------------------------------------------------------------------------------------- hard negatives


def test_hard_negatives_beta_zero_is_clip():
    a, b = _feats()
    scale = torch.tensor(11.0, dtype=F64, requires_grad=True)
    _assert_same(_value_and_grads(lambda x, y, s: hard_negative_clip_loss(x, y, s, 0.0), a, b, scale),
                 _value_and_grads(clip_loss, a, b, scale), rtol=1e-12, atol=1e-13)


def test_hard_negatives_upweight_the_hardest_negative():
    a, b = _feats(B=10, D=8, seed=6)
    z = 10.0 * a.detach() @ b.detach().T
    w = hard_negative_log_weights(z, beta=0.5).exp()
    torch.testing.assert_close(w.diagonal(), torch.ones(10, dtype=F64))
    negatives = ~torch.eye(10, dtype=torch.bool)
    torch.testing.assert_close((w * negatives).sum(1), torch.full((10,), 9.0, dtype=F64))
    hardest = z.masked_fill(~negatives, float("-inf")).argmax(1)
    heaviest = w.masked_fill(~negatives, float("-inf")).argmax(1)
    assert torch.equal(hardest, heaviest)
    assert (w[torch.arange(10), hardest] > 1).all()
    # The hardest negative's logit gets a larger gradient than under CLIP; the loss grows with beta.
    z0 = z.clone().requires_grad_(True)
    g_hcl, = torch.autograd.grad(infonce_rows(z0, log_weights=hard_negative_log_weights(z0, 0.5)), z0)
    g_clip, = torch.autograd.grad(infonce_rows(z0), z0)
    idx = torch.arange(10)
    assert (g_hcl[idx, hardest] > g_clip[idx, hardest]).all()
    values = [hard_negative_clip_loss(a, b, 10.0, beta).item() for beta in (0.0, 0.25, 0.5, 1.0)]
    assert values == sorted(values) and values[0] < values[-1]


# ------------------------------------------------------------------------------------------ alignment / uniformity


def test_alignment_is_mean_squared_distance():
    a, b = _feats()
    torch.testing.assert_close(alignment_loss(a, b), (2 - 2 * (a * b).sum(1)).mean())
    assert alignment_loss(a, a).item() == 0.0
    torch.testing.assert_close(alignment_loss(a, b, alpha=1.0), (a - b).norm(dim=1).mean())


def test_uniformity_equals_wang_isola_reference():
    a, _ = _feats(B=10, D=6)

    def ref(x):  # the paper's code: pdist over i < j pairs, same mean as over i != j
        return torch.pdist(x, p=2).pow(2).mul(-2).exp().mean().log()

    _assert_same(_value_and_grads(uniformity_loss, a), _value_and_grads(ref, a), rtol=1e-10, atol=1e-12)
    # The local parts (rows against all columns) combine exactly into the global value.
    parts = torch.stack([uniformity_rows_lse(a[r], a, 2.0, r.start) for r in (slice(0, 5), slice(5, 10))])
    torch.testing.assert_close(torch.logsumexp(parts, 0) - math.log(90), uniformity_loss(a))


def test_uniformity_gradient_finite_for_duplicate_points():
    x = F.normalize(torch.randn(4, 3, dtype=F64), dim=-1)
    x = torch.cat([x, x[:1]]).requires_grad_(True)
    g, = torch.autograd.grad(uniformity_loss(x), x)
    assert torch.isfinite(g).all()
    # Collapsed features give the maximum, log 1 = 0.
    assert uniformity_loss(torch.ones(5, 3, dtype=F64)).item() == pytest.approx(0.0, abs=1e-12)


# -------------------------------------------------------------------------------------------------------- gradcheck


@pytest.mark.parametrize("name", ["cwcl", "dcl", "hard_negatives", "label_smoothing", "uniformity"])
def test_gradcheck(name):
    a, b = _feats(B=5, D=4, seed=7)
    s = torch.tensor(3.0, dtype=F64, requires_grad=True)
    w = cwcl_weights(torch.randn(5, 3, dtype=F64, generator=torch.Generator().manual_seed(8)))
    fns = {
        "cwcl": (lambda x, y, t: cwcl_loss(x, y, t, w), (a, b, s)),
        "dcl": (dcl_loss, (a, b, s)),
        "hard_negatives": (lambda x, y, t: hard_negative_clip_loss(x, y, t, 0.7), (a, b, s)),
        "label_smoothing": (lambda x, y, t: label_smoothed_clip_loss(x, y, t, 0.1), (a, b, s)),
        "uniformity": (uniformity_loss, (a,)),
    }
    fn, inputs = fns[name]
    assert torch.autograd.gradcheck(fn, inputs)


# ------------------------------------------------------------------------------------------------------ temperature


@pytest.mark.parametrize("kind", ["cosine", "linear", "exponential"])
def test_temperature_schedule_endpoints(kind):
    assert scheduled_temperature(0, 100, 0.07, 0.01, kind) == pytest.approx(0.07)
    assert scheduled_temperature(100, 100, 0.07, 0.01, kind) == pytest.approx(0.01)
    assert scheduled_temperature(500, 100, 0.07, 0.01, kind) == pytest.approx(0.01)  # held after the end
    assert scheduled_temperature(-5, 100, 0.07, 0.01, kind) == pytest.approx(0.07)
    assert scheduled_logit_scale(0, 100, 0.07, 0.01, kind) == pytest.approx(1 / 0.07)
    assert scheduled_logit_scale(100, 100, 0.07, 0.01, kind) == pytest.approx(100.0)
    taus = [scheduled_temperature(t, 100, 0.07, 0.01, kind) for t in range(101)]
    assert all(x >= y for x, y in zip(taus, taus[1:]))  # monotone


def test_temperature_schedule_midpoints_and_errors():
    assert scheduled_temperature(50, 100, 0.07, 0.01, "cosine") == pytest.approx(0.04)
    assert scheduled_temperature(50, 100, 0.04, 0.01, "exponential") == pytest.approx(0.02)
    assert scheduled_temperature(50, 100, 0.07, 0.01, "constant") == pytest.approx(0.07)
    with pytest.raises(ConfigError, match="unknown temperature schedule"):
        scheduled_temperature(0, 10, 0.07, 0.01, "cosin")
    with pytest.raises(ConfigError):
        scheduled_temperature(0, 0, 0.07, 0.01)


def test_temperature_schedule_modes():
    learned = torch.tensor(14.3, requires_grad=True)
    sched = TemperatureSchedule("learnable")
    assert sched.learnable and sched.logit_scale(5, learned) is learned
    fixed = TemperatureSchedule("fixed", tau_start=0.05)
    assert not fixed.learnable and fixed.logit_scale(7) == pytest.approx(20.0)
    s = TemperatureSchedule("scheduled", tau_start=0.1, tau_end=0.02, total_steps=10).logit_scale(10, learned)
    assert isinstance(s, torch.Tensor) and not s.requires_grad and s.item() == pytest.approx(50.0)
    with pytest.raises(ConfigError):
        TemperatureSchedule("annealed")


# ------------------------------------------------------------------------------------------------------- objectives


def test_clip_plus_defaults_equal_clip():
    a, b = _feats(seed=1)
    c, _ = _feats(seed=2)
    emb = {"x": a, "y": b, "z": c}
    scale = torch.tensor(10.0, dtype=F64)
    ours = build_loss("clip_plus", ["x", "y", "z"])(AlignmentOutput(emb), logit_scale=scale)
    ref = build_loss("clip", ["x", "y", "z"])(AlignmentOutput(emb), logit_scale=scale)
    assert set(ours) == set(ref)
    _assert_same(torch.autograd.grad(ours["loss"], (a, b, c)), torch.autograd.grad(ref["loss"], (a, b, c)))
    torch.testing.assert_close(ours["loss"], ref["loss"], rtol=1e-12, atol=1e-12)


def test_clip_plus_options_add_up():
    a, b = _feats()
    out = build_loss("clip_plus", ["image", "text"], label_smoothing=0.1, align_weight=0.5, uniform_weight=0.2)(
        AlignmentOutput({"image": a, "text": b}), logit_scale=torch.tensor(10.0, dtype=F64)
    )
    expected = (label_smoothed_clip_loss(a, b, 10.0, 0.1) + 0.5 * alignment_loss(a, b)
                + 0.2 * (uniformity_loss(a) + uniformity_loss(b)) / 2)
    torch.testing.assert_close(out["loss"], expected, rtol=1e-12, atol=1e-12)
    assert {"loss", "loss_image_text", "align", "uniform"} == set(out)


def test_variant_objectives_equal_their_functions():
    a, b = _feats()
    q = torch.randn(12, 7, dtype=F64, requires_grad=True)
    emb, s = {"image": a, "text": b}, torch.tensor(10.0, dtype=F64)
    cases = {
        "dcl": ("dcl", {}, dcl_loss(a, b, s)),
        "dcl_w": ("dcl", {"weight_sigma": 0.5}, dcl_loss(a, b, s, weight_sigma=0.5)),
        "hcl": ("clip_hard_negatives", {"beta": 0.3, "tau_plus": 0.05}, hard_negative_clip_loss(a, b, s, 0.3, 0.05)),
        "hcl_defaults": ("clip_hard_negatives", {}, hard_negative_clip_loss(a, b, s, beta=1.0, tau_plus=0.1)),
        "cwcl": ("cwcl", {"weights_from": "text"}, cwcl_loss(a, b, s, cwcl_weights(q))),
        "cwcl_conditioned": ("cwcl", {"weights_from": "text", "center": True, "sharpness": 4.0},
                             cwcl_loss(a, b, s, cwcl_weights(q, center=True, sharpness=4.0))),
    }
    for label, (name, kwargs, expected) in cases.items():
        output = AlignmentOutput(emb, frozen_features={"text": q})
        out = build_loss(name, ["image", "text"], **kwargs)(output, logit_scale=s)
        torch.testing.assert_close(out["loss"], expected, rtol=1e-12, atol=1e-12, msg=label)
    out = build_loss("cwcl", ["image", "text"])(AlignmentOutput(emb, frozen_features={"image": q}), logit_scale=s)
    assert torch.autograd.grad(out["loss"], (a, q), allow_unused=True)[1] is None


def test_cwcl_objective_logs_the_positive_target_mass():
    a, b = _feats(B=6)
    q = torch.randn(6, 5, dtype=F64)
    out = build_loss("cwcl", ["image", "text"], weights_from="text")(
        AlignmentOutput({"image": a, "text": b}, frozen_features={"text": q}),
        logit_scale=torch.tensor(10.0, dtype=F64))
    w = cwcl_weights(q)
    torch.testing.assert_close(out["cwcl_positive_mass"], (w.diag() / w.sum(1)).mean())
    assert not out["cwcl_positive_mass"].requires_grad
    # Orthogonal frozen features: every other pair weighs 1/2, so the own pair holds 1 / (1 + (B - 1) / 2).
    out = build_loss("cwcl", ["image", "text"], weights_from="text")(
        AlignmentOutput({"image": a, "text": b}, frozen_features={"text": torch.eye(6, dtype=F64)}), logit_scale=10.0)
    assert out["cwcl_positive_mass"].item() == pytest.approx(1 / 3.5)
    assert out["loss"].item() == pytest.approx(out["loss_image_text"].item())  # logged, not optimised


def test_cwcl_objective_errors():
    a, b = _feats()
    loss_fn = build_loss("cwcl", ["image", "text"], weights_from="image")
    with pytest.raises(ConfigError, match="frozen_features"):
        loss_fn(AlignmentOutput({"image": a, "text": b}), logit_scale=torch.tensor(10.0))
    with pytest.raises(ConfigError, match="frozen_features"):
        loss_fn(AlignmentOutput({"image": a, "text": b}, frozen_features={"text": a}), logit_scale=torch.tensor(10.0))
    with pytest.raises(ConfigError, match="weights_from"):
        build_loss("cwcl", ["image", "text"], weights_from="audio")
    with pytest.raises(ConfigError, match="sharpness"):
        build_loss("cwcl", ["image", "text"], sharpness=-1)
    with pytest.raises(ConfigError, match="weight_sigma"):
        build_loss("dcl", ["image", "text"], weight_sigma=0)
    with pytest.raises(ConfigError, match="tau_plus"):
        build_loss("clip_hard_negatives", ["image", "text"], tau_plus=1.0)
    with pytest.raises(ConfigError, match="label_smoothing"):
        build_loss("clip_plus", ["image", "text"], label_smoothing=1.0)


# ------------------------------------------------------------------------------------------ 2 processes = 1 process

DIST_CONFIGS = [
    ["cwcl", "cwcl", {"weights_from": "image"}],
    ["dcl", "dcl", {}],
    ["clip_hard_negatives", "clip_hard_negatives", {"beta": 0.3}],
    ["clip_plus", "clip_plus", {"label_smoothing": 0.1, "align_weight": 0.5, "uniform_weight": 0.2}],
    ["cwcl_regularised", "cwcl", {"align_weight": 0.3, "uniform_weight": 0.1}],
    ["dcl_w", "dcl", {"weight_sigma": 0.5}],
    ["cwcl_conditioned", "cwcl", {"weights_from": "image", "center": True, "sharpness": 4.0}],
]


@pytest.mark.distributed
def test_two_processes_equal_one(torchrun):
    results = torchrun("dist_variants.py", json.dumps(DIST_CONFIGS))
    torch.manual_seed(0)  # the batch of tests/scripts/dist_variants.py
    B, D, DQ = 8, 16, 12
    a0 = F.normalize(torch.randn(B, D, dtype=F64), dim=-1)
    b0 = F.normalize(torch.randn(B, D, dtype=F64), dim=-1)
    q = torch.randn(B, DQ, dtype=F64)
    for label, name, kwargs in DIST_CONFIGS:
        a, b = a0.clone().requires_grad_(True), b0.clone().requires_grad_(True)
        out = build_loss(name, ["image", "text"], **kwargs)(
            AlignmentOutput({"image": a, "text": b}, frozen_features={"image": q}),
            logit_scale=torch.tensor(10.0, dtype=F64),
        )
        ga, gb = torch.autograd.grad(out["loss"], (a, b))
        per_rank = [r[label] for r in results]
        assert all(r["q_grad_is_none"] for r in per_rank), label
        mean_loss = sum(r["loss"] for r in per_rank) / len(per_rank)
        assert mean_loss == pytest.approx(out["loss"].item(), rel=1e-12), label
        if "cwcl_positive_mass" in out:  # a mean over local rows: ranks average to the whole batch's value
            mass = sum(r["components"]["cwcl_positive_mass"] for r in per_rank) / len(per_rank)
            assert mass == pytest.approx(out["cwcl_positive_mass"].item(), rel=1e-12), label
        # Each rank's local gradient is N x the gradient of the global mean loss (DDP averages it back).
        grad_a = torch.cat([torch.tensor(r["grad_a"], dtype=F64) for r in per_rank]) / len(per_rank)
        grad_b = torch.cat([torch.tensor(r["grad_b"], dtype=F64) for r in per_rank]) / len(per_rank)
        torch.testing.assert_close(grad_a, ga, rtol=1e-10, atol=1e-12, msg=label)
        torch.testing.assert_close(grad_b, gb, rtol=1e-10, atol=1e-12, msg=label)
