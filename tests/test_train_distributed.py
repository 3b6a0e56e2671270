"""Two processes (torchrun, gloo) train to the same losses and weights as one process on the whole batch,
with the plain loss, with GradCache, and with an optional modality (presence masks in a pairwise variant)."""
import csv
import json
import subprocess

import pytest
import torch
from safetensors.torch import load_file

from conftest import (
    REPO, cli_env, last_json, run_in_process, shape_png, shape_sample, tiny_recipe, torchrun_cli, write_pairs_csv,
    write_shard,
)

pytestmark = [pytest.mark.slow, pytest.mark.distributed]


@pytest.fixture(scope="module")
def two_shards(shapes_dataset, tmp_path_factory):
    root = tmp_path_factory.mktemp("two-shards")
    with open(shapes_dataset["csv"]) as f:
        rows = [r for r in csv.DictReader(f)][:16]  # 8 images x 2 captions
    for r in rows:
        r["image"] = str(shapes_dataset["root"] / r["image"])
    write_pairs_csv(root / "pairs.csv", rows)
    summary = last_json(run_in_process("data", "shards", "--from", str(root / "pairs.csv"), "--out", str(root / "s"),
                                       "--shard-size", "4"))
    assert summary["n_shards"] == 2
    return summary["shards"]


def _recipe(tmp_path, name, shards, text_model, batch_size, *overrides):
    """The tiny recipe and the overrides that make 2 processes train like 1: ``(recipe, --set arguments)``.

    GroupNorm and a locked (eval-mode, dropout-free) text tower: nothing depends on how rows are split. Adam's
    first step moves a weight by lr * g / (|g| + eps): near g = 0 that multiplies the gradient's roundoff (which
    differs between 1 and 2 processes) by lr / eps, 1e4 with the default eps; eps 1e-3 makes it 10. One stage of
    ``small_cnn`` (``depth: 1``), so no max-pooling: the shapes' flat colour regions give exact ties in a pooling
    window, and the conv's roundoff (which differs with the batch split) decides which position takes the gradient
    (seen: 1-2% of the tower's gradient at step 3, on some tiny text models).
    """
    recipe = tiny_recipe(tmp_path / f"{name}.yaml", tmp_path / name, shards, text_model)
    sets = ["model.modalities.image.tower_kwargs={width: 8, depth: 1, norm: group}", "model.modalities.text.lock=true",
            f"data.batch_size={batch_size}", "data.shuffle_buffer=0", "train.device=cpu",
            "train={steps: 3, lr: 0.01, eps: 1.0e-3, warmup_steps: 0, checkpoint_every: 3, log_every: 1}", *overrides]
    return recipe, [arg for s in sets for arg in ("--set", s)]


def _torchrun(recipe, sets, gpus: bool = False):
    env = cli_env() if gpus else cli_env(CUDA_VISIBLE_DEVICES="")
    proc = subprocess.run(torchrun_cli("train", str(recipe), *sets), capture_output=True, text=True, timeout=300,
                          env=env, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def _losses(run_dir):
    return [json.loads(line)["loss"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def one_process_run(two_shards, tiny_text_model, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("one-process")
    recipe, sets = _recipe(tmp, "one", two_shards, tiny_text_model, 8)
    run_in_process("train", str(recipe), *sets)
    return tmp / "one"


@pytest.mark.parametrize("gradcache", [None, 2])
def test_two_processes_train_like_one(tmp_path, two_shards, tiny_text_model, one_process_run, gradcache):
    two, sets = _recipe(tmp_path, "two", two_shards, tiny_text_model, 4,
                        *([f"train.gradcache_chunk={gradcache}"] if gradcache else []))
    proc = _torchrun(two, sets)
    assert "x 2 process(es)" in proc.stderr
    _assert_same_training(tmp_path / "two", one_process_run)


def _assert_same_training(run, reference):
    assert _losses(run) == pytest.approx(_losses(reference), rel=1e-5)
    a = load_file(reference / "model" / "model.safetensors")
    b = load_file(run / "model" / "model.safetensors")
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=1e-4, atol=1e-5, msg=k)


@pytest.fixture(scope="module")
def shards_with_gaps(tmp_path_factory):
    """Two shards of 4 samples (one per process, the whole data set in one batch); some lack the sketch."""
    root = tmp_path_factory.mktemp("gaps")
    samples = [shape_sample(i) for i in range(8)]
    for i, sample in enumerate(samples):
        if i not in (1, 5, 6):
            sample["sketch.png"] = shape_png(i + 5)
    return "::".join(write_shard(root / f"s{k}.tar", samples[4 * k: 4 * k + 4]) for k in range(2))


def test_pairwise_variant_with_an_optional_modality_trains_like_one_process(tmp_path, shards_with_gaps,
                                                                            tiny_text_model):
    """CWCL over image, an optional sketch and text (its soft targets from the locked text tower): each pair uses
    its complete rows and the matching block of the weights; 2 processes (1 and 2 sketches missing) train like 1."""
    sketch = ("model.modalities.sketch={kind: image, optional: true, tower: small_cnn, image_size: 16, "
              "tower_kwargs: {width: 8, depth: 1, norm: group}, mean: [0.5, 0.5, 0.5], std: [0.5, 0.5, 0.5]}")
    loss = "loss={name: cwcl, kwargs: {weights_from: text, missing: drop}}"
    one, sets = _recipe(tmp_path, "one", shards_with_gaps, tiny_text_model, 8, sketch, loss)
    result = last_json(run_in_process("train", str(one), *sets))
    assert result["final_loss_image_sketch"] > 0 and 0 < result["final_cwcl_positive_mass"] <= 1
    two, sets = _recipe(tmp_path, "two", shards_with_gaps, tiny_text_model, 4, sketch, loss)
    _torchrun(two, sets)
    _assert_same_training(tmp_path / "two", tmp_path / "one")


# a trainable transformer tower without dropout (a dropout mask depends on the process's random stream)
TRAINABLE_TEXT = ["model.modalities.text.lock=false",
                  "model.modalities.text.tower_kwargs={hidden_dropout_prob: 0.0, attention_probs_dropout_prob: 0.0}"]


def test_fsdp_on_cpu_is_a_one_line_error(tmp_path, two_shards, tiny_text_model):
    """Accelerate runs CPU processes with DDP whatever its FSDP plugin says: a recipe asking for FSDP there stops."""
    recipe, sets = _recipe(tmp_path, "fsdp", two_shards, tiny_text_model, 8, "train.fsdp={}")
    proc = run_in_process("train", str(recipe), *sets, check=False)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1] == (
        "mmalign: error: train.fsdp shards the model over GPUs (or other accelerators), and this run is on CPU, "
        "where Accelerate would run DistributedDataParallel instead; remove train.fsdp")
    assert not (tmp_path / "fsdp" / "checkpoints").exists()


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="FSDP runs on GPUs: Accelerate runs CPU processes with DDP")
def test_fsdp_on_two_gpus_trains_like_one_process(tmp_path, two_shards, tiny_text_model):
    """``train.fsdp`` (Accelerate's FSDP2 plugin): 2 GPUs, each holding half of every tower block's parameters, train a
    transformer tower to the losses and weights of 1 GPU holding the whole model."""
    on_gpu = ["train.device=auto", *TRAINABLE_TEXT]
    one, sets = _recipe(tmp_path, "one", two_shards, tiny_text_model, 8, *on_gpu)
    run_in_process("train", str(one), *sets)
    two, sets = _recipe(tmp_path, "two", two_shards, tiny_text_model, 4, *on_gpu, "train.fsdp={}")
    proc = _torchrun(two, sets, gpus=True)
    assert "cuda:0 x 2 process(es)" in proc.stderr
    _assert_same_training(tmp_path / "two", tmp_path / "one")
