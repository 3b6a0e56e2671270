"""Each rank computes the registered Symile/GRAM/CLIP objectives on its half of a fixed 3-modality batch and reports,
per case, its loss and the gradients of its local features; the test compares them with one process on the
whole batch. ``CASES`` and ``batch`` are imported by ``tests/test_losses_multimodal.py`` too."""
import torch
import torch.nn.functional as F

B, D = 8, 6
# case -> (registered name, constructor kwargs, use the presence mask)
CASES = {
    "symile_n_squared": ("symile", {"negatives": "n_squared"}, False),
    "symile_n": ("symile", {"negatives": "n", "seed": 3}, False),
    "gram": ("gram", {"label_smoothing": 0.1}, False),
    "symile_masked": ("symile", {"missing": "drop"}, True),
    "gram_masked": ("gram", {}, True),
    "clip_masked": ("clip", {}, True),
    "dcl_masked": ("dcl", {}, True),
    "clip_plus_masked": ("clip_plus", {"label_smoothing": 0.1, "align_weight": 0.5, "uniform_weight": 0.2}, True),
    "symile_learned": ("symile", {"missing": "learned"}, True),
    "gram_dam": ("gram", {"label_smoothing": 0.1, "itm_ratio": 0.5, "seed": 2}, False),
    "gram_dam_masked": ("gram", {"itm_ratio": 1.0, "seed": 5}, True),
}


def matching_head(kwargs: dict):
    """The same matching head on every rank (float64), for the cases with a DAM term; else None."""
    from mmalign.heads import MatchingHead

    if not kwargs.get("itm_ratio"):
        return None
    torch.manual_seed(0)
    return MatchingHead(D, 3).double()


def batch() -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Fixed float64 features for modalities x, y, z and a presence mask (rank 0 keeps 3 rows, rank 1 keeps 2)."""
    g = torch.Generator().manual_seed(0)
    feats = {m: F.normalize(torch.randn(B, D, generator=g, dtype=torch.float64), dim=-1) for m in "xyz"}
    present = {
        "x": torch.tensor([1, 1, 0, 1, 1, 1, 1, 0], dtype=torch.bool),
        "z": torch.tensor([1, 1, 1, 1, 0, 1, 1, 1], dtype=torch.bool),
    }
    return feats, present


def main() -> None:
    import torch.distributed as dist

    from _report import report
    from mmalign.losses import AlignmentOutput, build_loss

    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    feats, present = batch()
    rows = slice(rank * B // world, (rank + 1) * B // world)
    result = {}
    for case, (name, kwargs, masked) in CASES.items():
        local = {m: f[rows].clone().requires_grad_(True) for m, f in feats.items()}
        mask = {m: p[rows] for m, p in present.items()} if masked else None
        head = matching_head(kwargs)
        out = build_loss(name, list(feats), **kwargs)(
            AlignmentOutput(local, mask, matching=head), logit_scale=torch.tensor(8.0, dtype=torch.float64)
        )
        out["loss"].backward()
        result[case] = {"loss": out["loss"].item(), "grads": {m: t.grad.tolist() for m, t in local.items()},
                        "head_grads": [p.grad.tolist() for p in head.parameters()] if head is not None else []}
    report(result)


if __name__ == "__main__":
    main()
