"""Every registered tower trains on one process and on two, resumes, reloads and exports: the matrix of
``tower_matrix.py`` (its docstring says which combinations run and why).

One ``torchrun`` launch trains every case on 2 processes and one launch on 1 process (then resumes each run from
its halfway checkpoint); each case is then checked on its own. The towers of the matrix are the towers of the
registries: a tower registered without a case fails ``test_the_matrix_covers_every_registered_tower``.
"""
import json
from collections.abc import Iterator
import math
import shutil
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from conftest import REPO, exported_embedding, run_torchrun
from tower_matrix import ARCHITECTURES, CASES, STEPS, build_assets, recipe

pytestmark = [pytest.mark.slow, pytest.mark.distributed]

BF16 = {"loss_rel": 2e-2, "rtol": 2e-2, "atol": 2e-2}  # bf16 rounds to 8 mantissa bits; fp32 runs agree to roundoff
FP32 = {"loss_rel": 1e-5, "rtol": 1e-4, "atol": 1e-5}


@pytest.fixture(scope="module")
def matrix(tmp_path_factory, request) -> Iterator[dict]:
    """Assets and shards, then every case on 1 process (plus its resumed run) and on 2 processes. Its ~2 GB of runs
    are removed after the module unless one of its tests failed (the rest of the suite shares the disk)."""
    failed_before = request.session.testsfailed
    root = tmp_path_factory.mktemp("tower-matrix")
    shards = build_assets(root)
    names = [case.name for case in CASES]
    script = "dist_tower_matrix.py"
    one = run_torchrun(script, str(root), shards, str(root / "one"), *names, "--resume", nproc=1, timeout=600)[0]
    two = run_torchrun(script, str(root), shards, str(root / "two"), *names, nproc=2, timeout=600)
    yield {"root": root, "shards": shards, "one": one["cases"], "two": [r["cases"] for r in two]}
    if request.session.testsfailed == failed_before:
        shutil.rmtree(root)


def test_the_matrix_covers_every_registered_tower():
    """The registries as the package fills them (a fresh process: test modules register towers of their own)."""
    code = ("import json, mmalign.modalities as m; "
            "print(json.dumps(sorted([k, t] for k, towers in m.TOWERS.items() for t in towers)))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=REPO)
    registered = {tuple(pair) for pair in json.loads(out.stdout.splitlines()[-1])}
    covered = set().union(*(case.towers for case in CASES))
    assert covered == registered
    for what, (case, modality) in ARCHITECTURES.items():  # each named architecture trains in its case
        section = next(c for c in CASES if c.name == case).modalities[modality]
        assert not section.get("lock") or any(section.get(k) for k in ("unlocked_layers", "unlock_norms")), what


def _losses(run_dir) -> list[float]:
    return [json.loads(line)["loss"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def _weights(run_dir) -> dict[str, torch.Tensor]:
    return load_file(run_dir / "model" / "model.safetensors")


def _ok(result: dict, what: str) -> None:
    assert "error" not in result, f"{what}: {result.get('error')}\n{result.get('traceback', '')}"


@pytest.mark.parametrize("case", CASES, ids=[case.name for case in CASES])
def test_case_trains_on_one_and_two_processes_and_resumes(matrix, case):
    one_dir, two_dir = matrix["root"] / "one" / case.name, matrix["root"] / "two" / case.name
    _ok(matrix["one"][case.name], "1 process")
    losses = _losses(one_dir)
    assert len(losses) == STEPS and all(math.isfinite(v) for v in losses)

    _ok(matrix["one"][f"{case.name}-resumed"], "resumed")
    resumed = _weights(one_dir.with_name(f"{case.name}-resumed"))
    reference = _weights(one_dir)
    assert resumed.keys() == reference.keys()
    for k in reference:
        assert torch.equal(resumed[k], reference[k]), f"resumed run differs at {k}"

    for rank, results in enumerate(matrix["two"]):
        _ok(results[case.name], f"2 processes, rank {rank}")
    two_losses = _losses(two_dir)
    assert len(two_losses) == STEPS and all(math.isfinite(v) for v in two_losses)
    if case.two_process == "equal":
        tol = BF16 if case.bf16 else FP32
        assert two_losses == pytest.approx(losses, rel=tol["loss_rel"])
        two = _weights(two_dir)
        assert two.keys() == reference.keys()
        for k in reference:
            torch.testing.assert_close(two[k], reference[k], rtol=tol["rtol"], atol=tol["atol"], msg=k)


@pytest.mark.parametrize("case", CASES, ids=[case.name for case in CASES])
def test_case_saves_reloads_and_exports(matrix, case, tmp_path):
    """The saved model folder gives the embeddings of the recipe's model with the last checkpoint's weights, and so
    does its export (where the format applies), loaded with plain transformers / open_clip."""
    from mmalign.build import build_model
    from mmalign.config import load_config
    from mmalign.eval.embed import embed_shards
    from mmalign.export import export_model
    from mmalign.model import AlignmentModel
    from mmalign.rundir import checkpoint_dirs, frozen_tower_files

    _ok(matrix["one"][case.name], "1 process")
    run_dir = matrix["root"] / "one" / case.name
    cfg = load_config(base=recipe(case, matrix["root"], run_dir, matrix["shards"], 1))
    trained = build_model(cfg)
    last = checkpoint_dirs(run_dir)[-1]
    trained.load_weights(last / "model" / "model.safetensors", frozen_tower_files(last))
    saved = AlignmentModel.from_pretrained(run_dir / "model")
    expected = embed_shards(trained, matrix["shards"], trained.names, batch_size=8)["embeddings"]
    reloaded = embed_shards(saved, matrix["shards"], saved.names, batch_size=8)["embeddings"]
    for name in trained.names:
        torch.testing.assert_close(reloaded[name], expected[name], rtol=0, atol=1e-5, msg=name)
    if case.export is None:
        return
    batch = _eval_batch(saved, matrix["shards"])
    with torch.no_grad():
        expected = {name: saved.encode(name, batch[name]) for name in saved.names}
    info = export_model(saved, tmp_path / "export", case.export)
    for name in saved.names:
        got = _exported(tmp_path / "export", info["layout"], saved, name, batch[name])
        torch.testing.assert_close(got, expected[name], rtol=0, atol=1e-5, msg=f"{info['layout']} export: {name}")


def _eval_batch(model, shards: str) -> dict:
    from mmalign.data import expand_urls, iterate_batches

    procs = {name: model.modalities[name] for name in model.names}
    return next(iter(iterate_batches(expand_urls(shards), procs, 8, train=False, num_workers=0, skips={})))


def _exported(out, layout: str, model, name: str, inputs) -> torch.Tensor:
    """The embedding of ``inputs`` (mmalign's collated inputs of modality ``name``) by the exported folder, with no
    mmalign code: open_clip's encode_*, the dual encoder's get_*_features, or a towers-layout folder."""
    import torch.nn.functional as F

    kind = model.modalities[name].kind
    if kind == "text":
        inputs = {k: inputs[k] for k in ("input_ids", "attention_mask")}
    with torch.no_grad():
        if layout == "open_clip":
            import open_clip

            net = open_clip.create_model(f"local-dir:{out}").eval()
            h = net.encode_image(inputs) if kind == "image" else net.encode_text(inputs["input_ids"])
            return F.normalize(h, dim=-1)
        hf_inputs = _hf_inputs(kind, inputs, model.adapters[name].tower)
        if layout == "dual":
            import transformers

            info = json.loads((out / "mmalign_export.json").read_text())
            net = getattr(transformers, info["class"]).from_pretrained(out).eval()
            h = getattr(net, f"get_{kind}_features")(**hf_inputs)
            return F.normalize(h if torch.is_tensor(h) else h.pooler_output, dim=-1)
    return exported_embedding(out, name, hf_inputs)


def _hf_inputs(kind: str, inputs, tower) -> dict:
    """mmalign's collated inputs as the keyword arguments of the exported transformers model."""
    if kind == "image":
        return {"pixel_values": inputs}
    if kind == "text":
        return inputs
    x = inputs["input"]
    family = getattr(tower, "family", "clap")  # hf towers name their family; hf_clip's audio part is CLAP's
    if family == "clap":
        return {"input_features": x, "is_longer": torch.zeros(x.shape[0], 1, dtype=torch.bool)}
    return {"input_features": x} if family == "whisper" else {"input_values": x}
