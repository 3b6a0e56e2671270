"""Reference tests: mmalign's losses against independent re-implementations of the published methods.

Each reference below is written from the paper's formula and from how the authors' published code behaves (read, not
copied): Symile (Saporta et al. 2024, rajesh-lab/symile), GRAM (Cicchetti et al. 2025, ispamm/GRAM), HCL (Robinson
et al. 2021, joshr17/HCL) and DCL / DCL-W (Yeh et al. 2022). The references are deliberately naive (explicit
enumerations, exp-domain sums, per-pair determinants) and run in float64 on random inputs; values and gradients
must agree to ~1e-10.
"""
import math

import pytest
import torch
import torch.nn.functional as F

from mmalign.losses import AlignmentOutput, build_loss, dcl_loss, gram_loss, gram_volume, hard_negative_clip_loss, symile_loss

F64 = torch.float64


def _unit(n, B, D, seed, grad=True):
    g = torch.Generator().manual_seed(seed)
    return [F.normalize(torch.randn(B, D, generator=g, dtype=F64), dim=-1).requires_grad_(grad) for _ in range(n)]


def _assert_value_and_grads(ours, ref, inputs):
    torch.testing.assert_close(ours, ref, rtol=1e-10, atol=1e-12)
    for g_ours, g_ref in zip(torch.autograd.grad(ours, inputs, retain_graph=True),
                             torch.autograd.grad(ref, inputs, retain_graph=True)):
        torch.testing.assert_close(g_ours, g_ref, rtol=1e-10, atol=1e-12)


# ----------------------------------------------------------------------------------------------------------- Symile


def symile_reference_n_squared(feats, s):
    """Every modality in turn is the anchor; its candidates are all B^(M-1) tuples of the other modalities' rows,
    scored by the multilinear inner product; the positive is the tuple (i, ..., i); the loss is the mean over
    anchors of the cross-entropy (paper, eq. for L_Symile; authors' code: mean of the M anchor losses)."""
    M, B = len(feats), feats[0].shape[0]
    letters = "jklmn"[: M - 1]
    losses = []
    for a in range(M):
        others = [f for k, f in enumerate(feats) if k != a]
        scores = torch.einsum(f"id,{','.join(c + 'd' for c in letters)}->i{letters}", feats[a], *others)
        positive = torch.tensor([sum(i * B**p for p in range(M - 1)) for i in range(B)])  # (i, ..., i), row-major
        losses.append(F.cross_entropy(s * scores.reshape(B, -1), positive))
    return sum(losses) / M


def symile_reference_n(feats, s, generator):
    """O(n) negatives as the authors' code draws them: for each anchor (in modality order), one random permutation of
    the rows of each other modality (in modality order); candidate j is the elementwise product of the permuted
    rows j, scored against every anchor row; the positive MIP replaces the diagonal."""
    M, B = len(feats), feats[0].shape[0]
    losses = []
    for a in range(M):
        others = [f for k, f in enumerate(feats) if k != a]
        shuffled = torch.ones_like(feats[a])
        for f in others:
            shuffled = shuffled * f[torch.randperm(B, generator=generator)]
        positive = feats[a]
        for f in others:
            positive = positive * f
        logits = torch.where(torch.eye(B, dtype=torch.bool), positive.sum(-1), feats[a] @ shuffled.T)
        losses.append(F.cross_entropy(s * logits, torch.arange(B)))
    return sum(losses) / M


@pytest.mark.parametrize("M", [3, 4])
def test_symile_n_squared_equals_reference(M):
    feats = _unit(M, B=5, D=6, seed=M)
    s = torch.tensor(4.0, dtype=F64, requires_grad=True)
    _assert_value_and_grads(symile_loss(feats, s), symile_reference_n_squared(feats, s), [*feats, s])


@pytest.mark.parametrize("M", [3, 4])
def test_symile_n_equals_reference_with_the_same_draws(M):
    feats = _unit(M, B=7, D=5, seed=10 + M)
    s = torch.tensor(6.0, dtype=F64, requires_grad=True)
    ours = symile_loss(feats, s, "n", torch.Generator().manual_seed(3))
    ref = symile_reference_n(feats, s, torch.Generator().manual_seed(3))
    _assert_value_and_grads(ours, ref, [*feats, s])


# ------------------------------------------------------------------------------------------------------------- GRAM


def gram_reference_volume(anchor, others):
    """V_ij = sqrt(|det(X X^T)|) with X the k x D matrix of (anchor_i, others_j...), pair by pair (GRAM's code:
    ``torch.sqrt(torch.abs(torch.det(G)))``)."""
    B = anchor.shape[0]
    rows = []
    for i in range(B):
        row = []
        for j in range(B):
            x = torch.stack([anchor[i]] + [o[j] for o in others])
            row.append(torch.linalg.det(x @ x.T).abs().sqrt())
        rows.append(torch.stack(row))
    return torch.stack(rows)


def gram_reference_loss(feats, tau, label_smoothing):
    """GRAM's contrastive term: volumes of (text_i, tuple_j) over tau, both directions, label smoothing."""
    volume = gram_reference_volume(feats[0], feats[1:]) / tau
    targets = torch.arange(feats[0].shape[0])
    return (F.cross_entropy(-volume, targets, label_smoothing=label_smoothing)
            + F.cross_entropy(-volume.T, targets, label_smoothing=label_smoothing)) / 2


@pytest.mark.parametrize("M", [3, 4])
def test_gram_volume_and_loss_equal_reference(M):
    feats = _unit(M, B=5, D=8, seed=20 + M)
    torch.testing.assert_close(gram_volume(feats[0], feats[1:], eps=0.0),
                               gram_reference_volume(feats[0], feats[1:]), rtol=1e-10, atol=1e-12)
    tau = torch.tensor(0.07, dtype=F64, requires_grad=True)  # GRAM's learnable temperature and its init
    for label_smoothing in (0.0, 0.1):
        _assert_value_and_grads(gram_loss(feats, 1 / tau, label_smoothing, eps=0.0),
                                gram_reference_loss(feats, tau, label_smoothing), [*feats, tau])
    # the default eps = 1e-6 inside the square root moves the loss by O(eps / V) only
    assert gram_loss(feats, 1 / tau, 0.1).item() == pytest.approx(gram_reference_loss(feats, tau, 0.1).item(),
                                                                    rel=1e-4)


# -------------------------------------------------------------------------------------------------------------- HCL


def hcl_reference(a, b, s, beta, tau_plus):
    """HCL in the exp domain as the paper's code computes it, for the two-modality case (a row's negatives are the
    other modality's other items), averaged over both directions:
    imp = neg^beta; reweighted = sum(imp * neg) / mean(imp); Ng = (reweighted - tau_plus N pos) / (1 - tau_plus),
    clamped below at N e^{-s}; loss = -log(pos / (pos + Ng))."""
    B = a.shape[0]
    off = ~torch.eye(B, dtype=torch.bool)
    losses = []
    for x, y in ((a, b), (b, a)):
        sim = torch.exp(s * x @ y.T)
        pos = sim.diagonal()
        neg = sim[off].reshape(B, B - 1)
        N = B - 1
        imp = neg**beta
        reweighted = (imp * neg).sum(-1) / imp.mean(-1)
        ng = ((-tau_plus * N * pos + reweighted) / (1 - tau_plus)).clamp(min=N * math.exp(-s))
        losses.append(-torch.log(pos / (pos + ng)).mean())
    return sum(losses) / 2


@pytest.mark.parametrize("beta,tau_plus", [(0.0, 0.0), (0.5, 0.0), (1.0, 0.1), (2.0, 0.3)])
def test_hcl_equals_reference(beta, tau_plus):
    a, b = _unit(2, B=9, D=6, seed=30)
    s = 3.0
    _assert_value_and_grads(hard_negative_clip_loss(a, b, s, beta, tau_plus), hcl_reference(a, b, s, beta, tau_plus),
                            [a, b])


def test_hcl_reference_where_the_debiased_estimate_is_clamped():
    """Aligned positives and a large tau_plus make the debiased estimate negative for some rows: the clamp at
    N e^{-s} (the least value the negatives' mass can take) then decides the loss, as in the paper's code."""
    g = torch.Generator().manual_seed(31)
    a = F.normalize(torch.randn(8, 5, generator=g, dtype=F64), dim=-1)
    b = F.normalize(a + 0.2 * torch.randn(8, 5, generator=g, dtype=F64), dim=-1)
    a.requires_grad_(True), b.requires_grad_(True)
    s, beta, tau_plus = 5.0, 1.0, 0.5
    sim = torch.exp(s * a @ b.T).detach()
    off = ~torch.eye(8, dtype=torch.bool)
    imp = sim[off].reshape(8, 7) ** beta
    debiased = (imp * sim[off].reshape(8, 7)).sum(-1) / imp.mean(-1) - tau_plus * 7 * sim.diagonal()
    clamped = debiased < 7 * math.exp(-s) * (1 - tau_plus)
    assert clamped.any() and not clamped.all()  # both cases occur
    _assert_value_and_grads(hard_negative_clip_loss(a, b, s, beta, tau_plus), hcl_reference(a, b, s, beta, tau_plus),
                            [a, b])


def test_hcl_objective_defaults_are_the_papers():
    a, b = _unit(2, B=6, D=4, seed=32)
    objective = build_loss("clip_hard_negatives", ["image", "text"])
    assert (objective.beta, objective.tau_plus) == (1.0, 0.1)  # HCL's code: --beta 1.0 --tau_plus 0.1
    out = objective(AlignmentOutput({"image": a, "text": b}), logit_scale=2.0)  # HCL's temperature 0.5
    _assert_value_and_grads(out["loss"], hcl_reference(a, b, 2.0, 1.0, 0.1), [a, b])


# -------------------------------------------------------------------------------------------------------------- DCL


def dcl_reference(a, b, s, sigma=None):
    """DCL: the positive pair is removed from the denominator (paper eq. 6); DCL-W weights the positive term by
    w_i = 2 - exp(a_i . b_i / sigma) / mean_k exp(a_k . b_k / sigma) (paper eq. 11; the authors' code: 2 - N
    softmax, with gradient). Two modalities: a row's negatives are the other modality's other items; the mean of
    the two directions (the authors' code sums them)."""
    B = a.shape[0]
    w = torch.ones(B, dtype=F64) if sigma is None else 2 - B * torch.softmax((a * b).sum(-1) / sigma, dim=0)
    off = ~torch.eye(B, dtype=torch.bool)
    losses = []
    for x, y in ((a, b), (b, a)):
        logits = s * x @ y.T
        positive = -w * logits.diagonal()
        negative = torch.stack([torch.logsumexp(logits[i][off[i]], dim=0) for i in range(B)])
        losses.append((positive + negative).mean())
    return sum(losses) / 2


@pytest.mark.parametrize("sigma", [None, 0.5, 0.2])
def test_dcl_and_dcl_w_equal_reference(sigma):
    a, b = _unit(2, B=8, D=5, seed=40)
    s = torch.tensor(10.0, dtype=F64, requires_grad=True)
    _assert_value_and_grads(dcl_loss(a, b, s, weight_sigma=sigma), dcl_reference(a, b, s, sigma), [a, b, s])
    out = build_loss("dcl", ["image", "text"], weight_sigma=sigma)(AlignmentOutput({"image": a, "text": b}), logit_scale=s)
    _assert_value_and_grads(out["loss"], dcl_reference(a, b, s, sigma), [a, b, s])


def test_dcl_w_weights_average_one_and_favour_hard_positives():
    a, b = _unit(2, B=6, D=4, seed=41, grad=False)
    w = 2 - 6 * torch.softmax((a * b).sum(-1) / 0.5, dim=0)
    assert w.mean().item() == pytest.approx(1.0, abs=1e-12)
    cos = (a * b).sum(-1)
    assert w[cos.argmin()] == w.max() and w[cos.argmax()] == w.min()
    # equal positives give w = 1: DCL-W is DCL
    same = F.normalize(torch.ones(6, 4, dtype=F64), dim=-1)
    torch.testing.assert_close(dcl_loss(same, same, 5.0, weight_sigma=0.5), dcl_loss(same, same, 5.0))


def test_reference_enumeration_is_exhaustive():
    """The n^2 reference really enumerates B^(M-1) candidates with one positive per row (guards the reference)."""
    B, M = 3, 4
    feats = _unit(M, B=B, D=2, seed=50, grad=False)
    logits_rows = torch.einsum("id,jd,kd,ld->ijkl", *feats).reshape(B, -1)
    assert logits_rows.shape == (B, B ** (M - 1))
    for i in range(B):
        j = sum(i * B**p for p in range(M - 1))
        torch.testing.assert_close(logits_rows[i, j], (feats[0][i] * feats[1][i] * feats[2][i] * feats[3][i]).sum())
