"""Blockwise CLIP/SigLIP equal the plain losses (value and every gradient), for any chunk, at every block size the
chooser picks, and on 2 processes."""
import pytest
import torch
import torch.nn.functional as F

from mmalign.errors import ConfigError
from mmalign.losses import AlignmentOutput, build_loss, chunked_clip_loss, chunked_siglip_loss, clip_loss, siglip_loss
from mmalign.losses.chunked import MIN_BLOCK, block_size, chunked_clip_rows_loss, chunked_siglip_rows_loss
from mmalign.losses.pairwise import clip_rows_loss, siglip_rows_loss

TOL = {torch.float64: 1e-10, torch.float32: 1e-5}
SHAPES = [(16, 4), (37, 8), (5, 64), (33, 1)]  # (B, chunk): divisible, ragged, chunk > B, chunk 1


def _feats(B, D=24, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    a = F.normalize(torch.randn(B, D, generator=g, dtype=torch.float64), dim=-1)
    b = F.normalize(torch.randn(B, D, generator=g, dtype=torch.float64), dim=-1)
    return a.to(dtype).requires_grad_(True), b.to(dtype).requires_grad_(True)


def _params(dtype, scale=14.3, bias=-5.0):
    return (torch.tensor(scale, dtype=dtype, requires_grad=True), torch.tensor(bias, dtype=dtype, requires_grad=True))


def _assert_same(fn_ref, fn, inputs, tol):
    ref = fn_ref(*inputs)
    out = fn(*inputs)
    ref_grads = torch.autograd.grad(ref, inputs)
    grads = torch.autograd.grad(out, inputs)
    torch.testing.assert_close(out, ref, rtol=tol, atol=tol)
    for g, r in zip(grads, ref_grads):
        torch.testing.assert_close(g, r, rtol=tol, atol=tol * r.abs().max().item())


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("B,chunk", SHAPES)
def test_chunked_clip_equals_clip(B, chunk, dtype):
    a, b = _feats(B, dtype=dtype)
    scale, _ = _params(dtype)
    _assert_same(clip_loss, lambda x, y, s: chunked_clip_loss(x, y, s, chunk_size=chunk), (a, b, scale), TOL[dtype])


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("B,chunk", SHAPES)
def test_chunked_siglip_equals_siglip(B, chunk, dtype):
    a, b = _feats(B, seed=1, dtype=dtype)
    scale, bias = _params(dtype, scale=10.0, bias=-10.0)
    _assert_same(
        siglip_loss, lambda x, y, s, c: chunked_siglip_loss(x, y, s, c, chunk_size=chunk), (a, b, scale, bias),
        TOL[dtype],
    )


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_rows_forms_equal_plain_rows(dtype):
    a, b = _feats(23, seed=2, dtype=dtype)
    scale, bias = _params(dtype)
    rows = slice(7, 18)

    def ref(x, y, s):
        return clip_rows_loss(x[rows], y[rows], x, y, s, rows.start)

    def ours(x, y, s):
        return chunked_clip_rows_loss(x[rows], y[rows], x, y, s, rows.start, chunk_size=5)

    def ours_one_block(x, y, s):
        return chunked_clip_rows_loss(x[rows], y[rows], x, y, s, rows.start)

    _assert_same(ref, ours, (a, b, scale), TOL[dtype])
    _assert_same(ref, ours_one_block, (a, b, scale), TOL[dtype])
    for chunk in (4, None):
        _assert_same(
            lambda x, y, s, c: siglip_rows_loss(x[rows], y, s, c, rows.start),
            lambda x, y, s, c: chunked_siglip_rows_loss(x[rows], y, s, c, rows.start, chunk_size=chunk),
            (a, b, scale, bias), TOL[dtype],
        )


def test_block_size_chooser():
    mib = 2**20
    # the whole matrix when two B x B buffers and the scaled rows fit
    assert block_size(2048, 2048, 512, torch.float32, 48) == 2048
    assert block_size(2048, 2048, 512, torch.float32, (2 * 2048**2 + 2048 * 512) * 4 / mib) == 2048
    # else balanced blocks: 8,192 in 4 blocks of 2,048, not 3 of 2,380 and a sliver
    assert block_size(8192, 8192, 512, torch.float32, 48) == 2048
    assert block_size(8192, 8192, 512, torch.float32, 1024) == 8192
    # D and the element size count: float64 or wide features need smaller blocks for the same memory
    assert block_size(2048, 2048, 512, torch.float64, 48) == 1024
    assert block_size(2048, 2048, 8192, torch.float32, 48) == 1024
    # local rows against gathered columns: rows fewer than a block side
    side = block_size(1024, 8192, 512, torch.float32, 48)
    assert (2 * 1024 * side + 1024 * 512) * 4 <= 48 * mib < (2 * 1024 * 8192 + 1024 * 512) * 4
    # never below MIN_BLOCK (or B itself when smaller)
    assert block_size(100_000, 100_000, 512, torch.float32, 0.001) == MIN_BLOCK
    assert block_size(40, 40, 8, torch.float64, 0.001) == 40


# (B, block_memory_mb in float64, side): the chooser's three kinds of answer at D = 24: one block, balanced
# blocks, the floor
CHOICES = [(600, 8.0, 600), (600, 3.0, 300), (600, 0.5, MIN_BLOCK)]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("B,memory_mb,side", CHOICES)
def test_every_chooser_choice_equals_the_plain_losses(B, memory_mb, side, dtype):
    memory_mb *= torch.finfo(dtype).bits / 64  # float32: the same choice in half the memory
    assert block_size(B, B, 24, dtype, memory_mb) == side
    a, b = _feats(B, seed=9, dtype=dtype)
    scale, bias = _params(dtype, scale=10.0, bias=-10.0)
    _assert_same(clip_loss, lambda x, y, s: chunked_clip_loss(x, y, s, block_memory_mb=memory_mb), (a, b, scale),
                 TOL[dtype])
    _assert_same(siglip_loss, lambda x, y, s, c: chunked_siglip_loss(x, y, s, c, block_memory_mb=memory_mb),
                 (a, b, scale, bias), TOL[dtype])


def _matmuls(fn) -> int:
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        fn()
    return sum(e.count for e in prof.key_averages() if e.key in ("aten::mm", "aten::addmm", "aten::addmm_"))


def test_one_block_makes_gradients_in_forward_with_three_matmuls():
    """One block: 3 matrix products for loss and gradients (the plain loss's count); several: 4 per block."""
    a, b = _feats(64, seed=10, dtype=torch.float32)
    scale, _ = _params(torch.float32)
    assert _matmuls(lambda: chunked_clip_loss(a, b, scale).backward()) == 3
    assert _matmuls(lambda: chunked_clip_loss(a, b, scale, chunk_size=32).backward()) == 4 * 4
    with torch.no_grad():  # no gradients wanted: statistics only
        assert _matmuls(lambda: chunked_clip_loss(a, b, scale)) == 1


def test_one_block_gradients_survive_a_retained_graph():
    a, b = _feats(30, seed=11)
    scale, bias = _params(torch.float64)
    for loss in (chunked_clip_loss(a, b, scale), chunked_siglip_loss(a, b, scale, bias)):
        first = torch.autograd.grad(loss, (a, b), retain_graph=True)
        second = torch.autograd.grad(loss, (a, b))
        for g1, g2 in zip(first, second):
            torch.testing.assert_close(g1, g2, rtol=0, atol=0)


@pytest.mark.parametrize("kwargs", [{"chunk_size": 0}, {"block_memory_mb": 0}, {"block_memory_mb": -1}])
def test_bad_block_options_are_config_errors(kwargs):
    with pytest.raises(ConfigError, match="chunk_size|block_memory_mb"):
        build_loss("chunked_clip", ["image", "text"], **kwargs)
    a, b = _feats(8)
    with pytest.raises(ConfigError):
        chunked_siglip_loss(a, b, 10.0, -10.0, **kwargs)


def test_large_scale_and_unnormalised_features():
    """Logits up to ~200 (s = 100, norms 1.4) in float64; plain python float scale (no scale gradient)."""
    a, b = _feats(40, seed=3)
    with torch.no_grad():
        a.mul_(1.4)
    ref = clip_loss(a, b, 100.0)
    out = chunked_clip_loss(a, b, 100.0, chunk_size=9)
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-10)
    for g, r in zip(torch.autograd.grad(out, (a, b)), torch.autograd.grad(ref, (a, b))):
        torch.testing.assert_close(g, r, rtol=1e-10, atol=1e-10 * r.abs().max().item())


def test_float32_rows_far_below_the_block_max_are_exact():
    """Rows whose every logit is ~200 below the block max underflow exp(z - max) in float32; the blockwise loss
    must recompute them exactly (compared with the float64 plain loss)."""
    g = torch.Generator().manual_seed(0)
    v = F.normalize(torch.randn(8, generator=g, dtype=torch.float64), dim=0)
    a = F.normalize(v + 0.05 * torch.randn(40, 8, generator=g, dtype=torch.float64), dim=-1)
    b = F.normalize(v + 0.05 * torch.randn(40, 8, generator=g, dtype=torch.float64), dim=-1)
    a[::3] = -a[::3]  # these rows score ~ -100 against every column; the others ~ +100
    a64, b64 = a.clone().requires_grad_(True), b.clone().requires_grad_(True)
    ref = clip_loss(a64, b64, 100.0)
    ref_grads = torch.autograd.grad(ref, (a64, b64))
    a32, b32 = a.float().requires_grad_(True), b.float().requires_grad_(True)
    out = chunked_clip_loss(a32, b32, 100.0, chunk_size=7)
    assert torch.isfinite(out)
    torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=1e-5)
    for g, r in zip(torch.autograd.grad(out, (a32, b32)), ref_grads):
        torch.testing.assert_close(g.double(), r, rtol=1e-4, atol=1e-5 * r.abs().max().item())


def test_low_precision_inputs_and_no_grad():
    a, b = _feats(20, seed=4, dtype=torch.float32)
    ref = clip_loss(a, b, 10.0)
    out = chunked_clip_loss(a.bfloat16(), b.bfloat16(), 10.0, chunk_size=6)
    assert out.dtype == torch.bfloat16 and abs(out.float().item() - ref.item()) < 0.05
    with torch.no_grad():
        torch.testing.assert_close(chunked_siglip_loss(a, b, 10.0, -10.0, 6), siglip_loss(a, b, 10.0, -10.0))


def test_memory_is_linear_in_batch():
    """No B x B tensor is ever allocated: each block is chunk x chunk (checked with the profiler's allocations)."""
    B, chunk = 128, 32
    a, b = _feats(B, D=8, seed=5, dtype=torch.float32)
    scale, _ = _params(torch.float32)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True) as prof:
        chunked_clip_loss(a, b, scale, chunk_size=chunk).backward()
    biggest = max(e.cpu_memory_usage for e in prof.events())  # per call; clip_loss has B * B * 4 here
    assert 0 < biggest < B * B * 4 / 4  # block buffers (2 x chunk^2 floats) and B x D tensors, never B x B


@pytest.mark.parametrize("name,plain", [("chunked_clip", "clip"), ("chunked_siglip", "siglip")])
def test_objectives_equal_plain_objectives(name, plain):
    a, b = _feats(19, seed=6)
    scale, bias = _params(torch.float64)
    inputs = (a, b, scale, bias)

    def run(loss_name, **kw):
        return lambda x, y, s, c: build_loss(loss_name, ["image", "text"], **kw)(
            AlignmentOutput({"image": x, "text": y}), logit_scale=s, logit_bias=c
        )["loss"]

    ref = run(plain)(*inputs)
    out = run(name, chunk_size=6)(*inputs)
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-10)
    used = [t for t in inputs if torch.autograd.grad(ref, t, retain_graph=True, allow_unused=True)[0] is not None]
    for g, r in zip(torch.autograd.grad(out, used), torch.autograd.grad(ref, used)):
        torch.testing.assert_close(g, r, rtol=1e-10, atol=1e-12)


def test_three_modalities_mean_of_pairs():
    a, b = _feats(12, seed=7)
    c, _ = _feats(12, seed=8)
    feats = {"x": a, "y": b, "z": c}
    out = build_loss("chunked_clip", ["x", "y", "z"], chunk_size=5)(AlignmentOutput(feats),
                                                                   logit_scale=torch.tensor(5.0))
    ref = build_loss("clip", ["x", "y", "z"])(AlignmentOutput(feats), logit_scale=torch.tensor(5.0))
    torch.testing.assert_close(out["loss"], ref["loss"], rtol=1e-10, atol=1e-10)


@pytest.mark.distributed
def test_two_processes_equal_one(torchrun):
    results = torchrun("dist_chunked.py", "3")  # 7 rows per rank, chunk 3: ragged blocks on every rank
    torch.manual_seed(0)
    B, D = 14, 16
    a0 = F.normalize(torch.randn(B, D, dtype=torch.float64), dim=-1)
    b0 = F.normalize(torch.randn(B, D, dtype=torch.float64), dim=-1)
    for name, plain in [("chunked_clip", "clip"), ("chunked_siglip", "siglip")]:
        a, b = a0.clone().requires_grad_(True), b0.clone().requires_grad_(True)
        scale = torch.tensor(10.0, dtype=torch.float64, requires_grad=True)
        bias = torch.tensor(-5.0, dtype=torch.float64, requires_grad=True)
        out = build_loss(plain, ["image", "text"])(AlignmentOutput({"image": a, "text": b}), logit_scale=scale,
                                                   logit_bias=bias)
        wrt = (a, b, scale, bias) if plain == "siglip" else (a, b, scale)
        grads = torch.autograd.grad(out["loss"], wrt)
        per_rank = [r[name] for r in results]
        n = len(per_rank)
        assert sum(r["loss"] for r in per_rank) / n == pytest.approx(out["loss"].item(), rel=1e-12)
        # each rank's local gradient is N x the gradient of the global mean loss (DDP averages it back)
        for key, ref in (("grad_a", grads[0]), ("grad_b", grads[1])):
            got = torch.cat([torch.tensor(r[key], dtype=torch.float64) for r in per_rank]) / n
            torch.testing.assert_close(got, ref, rtol=1e-10, atol=1e-12)
        # scalar parameters are replicated: DDP averages their per-rank gradients
        assert sum(r["grad_scale"] for r in per_rank) / n == pytest.approx(grads[2].item(), rel=1e-10, abs=1e-12)
        if plain == "siglip":
            assert sum(r["grad_bias"] for r in per_rank) / n == pytest.approx(grads[3].item(), rel=1e-10, abs=1e-12)
