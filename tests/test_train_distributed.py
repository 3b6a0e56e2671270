"""Two processes (torchrun, gloo) train to the same losses and weights as one process on the whole batch,
with the plain loss and with GradCache."""
import csv
import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from conftest import REPO, _free_port, last_json, run_cli, tiny_recipe, write_pairs_csv

pytestmark = [pytest.mark.slow, pytest.mark.distributed]


@pytest.fixture(scope="module")
def two_shards(shapes_dataset, tmp_path_factory):
    root = tmp_path_factory.mktemp("two-shards")
    with open(shapes_dataset["csv"]) as f:
        rows = [r for r in csv.DictReader(f)][:16]  # 8 images x 2 captions
    for r in rows:
        r["image"] = str(shapes_dataset["root"] / r["image"])
    write_pairs_csv(root / "pairs.csv", rows)
    summary = last_json(run_cli("data", "shards", "--from", str(root / "pairs.csv"), "--out", str(root / "s"),
                                "--shard-size", "4"))
    assert summary["n_shards"] == 2
    return summary["shards"]


def _recipe(tmp_path, name, shards, text_model, batch_size, gradcache=None):
    # GroupNorm and a locked (eval-mode, dropout-free) text tower: nothing depends on how rows are split. Adam's
    # first step moves a weight by lr * g / (|g| + eps): near g = 0 that multiplies the gradient's roundoff (which
    # differs between 1 and 2 processes) by lr / eps, 1e4 with the default eps; eps 1e-3 makes it 10.
    extra = "\ntrain: {steps: 3, lr: 0.01, eps: 1.0e-3, warmup_steps: 0, checkpoint_every: 3, log_every: 1" + (
        f", gradcache_chunk: {gradcache}}}" if gradcache else "}")
    recipe = tiny_recipe(tmp_path / f"{name}.yaml", tmp_path / name, shards, text_model)
    text = recipe.read_text().replace("depth: 2}", "depth: 2, norm: group}").replace(
        "unlocked_layers: 0}", "lock: true}").replace("batch_size: 8", f"batch_size: {batch_size}")
    text = text.replace("shuffle_buffer: 16", "shuffle_buffer: 0")
    text = "\n".join(line for line in text.splitlines() if not line.startswith("train:")) + extra + "\n"
    recipe.write_text(text)
    return recipe


def _torchrun(recipe):
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": "",
           "HF_HUB_OFFLINE": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
           "--master_port", str(_free_port()), "-m", "mmalign", "train", str(recipe), "--set", "train.device=cpu"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def _losses(run_dir):
    return [json.loads(line)["loss"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def one_process_run(two_shards, tiny_text_model, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("one-process")
    run_cli("train", str(_recipe(tmp, "one", two_shards, tiny_text_model, batch_size=8)), "--set", "train.device=cpu")
    return tmp / "one"


@pytest.mark.parametrize("gradcache", [None, 2])
def test_two_processes_train_like_one(tmp_path, two_shards, tiny_text_model, one_process_run, gradcache):
    two = _recipe(tmp_path, "two", two_shards, tiny_text_model, batch_size=4, gradcache=gradcache)
    proc = _torchrun(two)
    assert "x 2 process(es)" in proc.stderr
    assert _losses(tmp_path / "two") == pytest.approx(_losses(one_process_run), rel=1e-5)
    a = load_file(one_process_run / "model" / "model.safetensors")
    b = load_file(tmp_path / "two" / "model" / "model.safetensors")
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=1e-4, atol=1e-5, msg=k)
