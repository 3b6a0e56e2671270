"""Embedding diagnostics: modality gap, alignment, uniformity (shared with the regularisers), PCA plot."""
import math

import pytest
import torch
import torch.nn.functional as F

from mmalign.eval.diagnostics import alignment, embedding_pca_plot, modality_gap, pca_2d, uniformity
from mmalign.losses import alignment_loss, uniformity_loss


def _x(B=20, D=8, seed=0):
    return torch.randn(B, D, generator=torch.Generator().manual_seed(seed))


def test_gap_zero_for_identical_sets_and_permutation_invariant():
    x = _x()
    assert modality_gap(x, x) == pytest.approx(0.0, abs=1e-7)
    assert modality_gap(x, x[torch.randperm(20)]) == pytest.approx(0.0, abs=1e-6)
    assert modality_gap(x, 3.0 * x) == pytest.approx(0.0, abs=1e-6)  # normalised inside


def test_gap_is_centroid_distance():
    # Two clusters around +e1 and -e1: centroids near +-e1, gap close to 2.
    base = torch.zeros(50, 4)
    base[:, 0] = 1.0
    noise = 0.01 * _x(50, 4)
    assert modality_gap(base + noise, -base + noise) == pytest.approx(2.0, abs=1e-3)
    a, b = _x(seed=1), _x(seed=2)
    expected = (F.normalize(a, dim=-1).mean(0) - F.normalize(b, dim=-1).mean(0)).norm().item()
    assert modality_gap(a, b) == pytest.approx(expected, rel=1e-6)


def test_alignment_and_uniformity_reuse_the_regularisers():
    a, b = F.normalize(_x(seed=1), dim=-1), F.normalize(_x(seed=2), dim=-1)
    assert alignment(a, b) == pytest.approx(alignment_loss(a, b).item(), rel=1e-6)
    assert alignment(a, a) == pytest.approx(0.0, abs=1e-10)
    assert uniformity(a) == pytest.approx(uniformity_loss(a).item(), rel=1e-6)
    # Collapsed features are as non-uniform as possible: log mean exp(0) = 0.
    assert uniformity(torch.ones(10, 4)) == pytest.approx(0.0, abs=1e-6)
    assert isinstance(uniformity(a), float) and math.isfinite(uniformity(a))


def test_pca_2d_recovers_the_principal_plane():
    g = torch.Generator().manual_seed(0)
    coeffs = torch.randn(100, 2, generator=g) * torch.tensor([5.0, 2.0])
    basis = torch.linalg.qr(torch.randn(10, 2, generator=g, dtype=torch.float64))[0].float()
    proj = pca_2d(coeffs @ basis.T)
    assert proj.shape == (100, 2)
    x = coeffs @ basis.T
    # The data lie in a plane, so the two components keep all the variance, PC1 the most, uncorrelated.
    var = proj.var(0)
    assert var.sum().item() == pytest.approx(x.var(0).sum().item(), rel=1e-4)
    assert var[0] >= var[1] > 0
    assert torch.cov(proj.T)[0, 1].abs().item() < 1e-3 * var[0].item()
    assert pca_2d(torch.randn(5, 1)).shape == (5, 2)


def test_pca_plot_writes_png(tmp_path):
    emb = {"image": _x(30, 16, 1), "text": _x(30, 16, 2), "audio": _x(30, 16, 3)}
    out = embedding_pca_plot(emb, tmp_path / "sub" / "pca.png")
    assert out.exists() and out.stat().st_size > 1000
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # Unpaired sets (different sizes) are plotted without lines.
    out2 = embedding_pca_plot({"a": _x(10, 16), "b": _x(7, 16)}, tmp_path / "pca2.png")
    assert out2.stat().st_size > 1000


def test_pca_plot_rejects_mixed_widths(tmp_path):
    with pytest.raises(ValueError, match="one embedding width"):
        embedding_pca_plot({"a": _x(5, 4), "b": _x(5, 6)}, tmp_path / "x.png")
