"""Linear probe: multinomial logistic regression on frozen embeddings, the representation test of the CLIP paper
(Radford et al. 2021, scikit-learn's L-BFGS logistic regression, its L2 strength chosen on a validation split) and of
CLIP_benchmark's ``linear_probe`` task.

Written in torch rather than with scikit-learn: torch is already a core dependency (scikit-learn sits only in the
``demo`` extra), and the problem is small and convex, so full-batch L-BFGS on the embeddings minimises the same
objective as scikit-learn's ``lbfgs`` solver: mean cross-entropy + ``weight_decay / 2 * ||W||^2`` (bias not decayed).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

WEIGHT_DECAYS = (1.0, 1e-1, 1e-2, 1e-3, 1e-4, 1e-5, 1e-6)  # strongest first: ties go to the more regularised


def fit_logistic_regression(x: torch.Tensor, y: torch.Tensor, n_classes: int, weight_decay: float,
                            max_iter: int = 500) -> tuple[torch.Tensor, torch.Tensor]:
    """(W: D x C, b: C) minimising ``CE(x W + b, y) + weight_decay / 2 * ||W||^2`` by full-batch L-BFGS."""
    x = x.double()
    weight = torch.zeros(x.shape[1], n_classes, dtype=torch.float64, requires_grad=True)
    bias = torch.zeros(n_classes, dtype=torch.float64, requires_grad=True)
    optimizer = torch.optim.LBFGS([weight, bias], lr=1.0, max_iter=max_iter, history_size=20,
                                  tolerance_grad=1e-9, tolerance_change=1e-12, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        loss = F.cross_entropy(x @ weight + bias, y) + weight_decay / 2 * weight.pow(2).sum()
        loss.backward()
        return loss

    optimizer.step(closure)
    return weight.detach(), bias.detach()


def linear_probe(train_x: torch.Tensor, train_y: torch.Tensor, test_x: torch.Tensor, n_classes: int,
                 weight_decays: tuple[float, ...] = WEIGHT_DECAYS, val_fraction: float = 0.2,
                 seed: int = 0) -> tuple[torch.Tensor, float]:
    """Test logits (N_test x C) of a logistic regression fit on the training embeddings, and its weight decay: the
    one of ``weight_decays`` with the best top-1 accuracy on a seeded ``val_fraction`` of the training set (fit on
    the rest), then refit on the whole training set."""
    order = torch.randperm(train_x.shape[0], generator=torch.Generator().manual_seed(seed))
    n_val = int(round(val_fraction * train_x.shape[0]))
    best, best_acc = weight_decays[0], -1.0
    if n_val and n_val < train_x.shape[0]:
        val, fit = order[:n_val], order[n_val:]
        for wd in weight_decays:
            w, b = fit_logistic_regression(train_x[fit], train_y[fit], n_classes, wd)
            acc = ((train_x[val].double() @ w + b).argmax(dim=1) == train_y[val]).double().mean().item()
            if acc > best_acc:
                best, best_acc = wd, acc
    w, b = fit_logistic_regression(train_x, train_y, n_classes, best)
    return (test_x.double() @ w + b).float(), best
