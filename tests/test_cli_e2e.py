"""What a new user does: their own image files + captions in a CSV -> shards -> train -> resume -> evaluate."""
import json

import pytest
import torch
from safetensors.torch import load_file

from conftest import last_json, metrics_rows, run_cli, tiny_recipe
from mmalign.eval.embed import eval_workers

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def shards(shapes_dataset, tmp_path_factory):
    out = tmp_path_factory.mktemp("shards")
    proc = run_cli("data", "shards", "--from", str(shapes_dataset["csv"]), "--out", str(out), "--shard-size", "20")
    summary = last_json(proc)
    assert summary["samples"] == 48  # 96 CSV rows, two captions per image merged into one sample
    assert summary["n_shards"] == 3
    return summary["shards"]


def test_train_resume_and_evaluate(tmp_path, shards, shapes_dataset, tiny_text_model):
    run_dir = tmp_path / "run"
    recipe = tiny_recipe(tmp_path / "recipe.yaml", run_dir, shards, tiny_text_model,
                         shapes_dataset["classes"], shapes_dataset["templates"])
    first = last_json(run_cli("train", str(recipe)))
    assert first["steps"] == 6 and first["run_dir"] == str(run_dir)
    assert 0.0 <= first["zeroshot_top1"] <= 1.0 and "retrieval_i2t_R@1" in first
    assert json.loads((run_dir / "results.json").read_text())["steps"] == 6
    for name in ("metrics.jsonl", "config.json", "loss_curve.png", "similarity_matrix.png", "report.md",
                 "retrieval_recall.png", "per_class_accuracy.png", "model/model.safetensors"):
        assert (run_dir / name).is_file(), name
    assert list((run_dir / "tensorboard").iterdir())

    # The same command with more steps resumes from the step-6 checkpoint instead of starting over.
    proc = run_cli("train", str(recipe), "--set", "train.steps=9")
    assert "resuming from" in proc.stderr and "step 6" in proc.stderr
    assert last_json(proc)["steps"] == 9
    steps = [row["step"] for row in metrics_rows(run_dir)]
    assert steps == list(range(1, 10))
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == ["step_00000006", "step_00000009"]

    zs = last_json(run_cli("eval", "zeroshot", "--model", str(run_dir), "--data", shards,
                           "--classes", str(shapes_dataset["classes"]), "--templates", str(shapes_dataset["templates"])))
    assert zs["zeroshot_n"] == 48 and 0.0 <= zs["zeroshot_top1"] <= 1.0
    proc = run_cli("eval", "retrieval", "--model", str(run_dir), "--data", shards, "--query", "image",
                   "--gallery", "text")
    rt = last_json(proc)
    assert rt["retrieval_n"] == 48
    assert {"retrieval_i2t_R@1", "retrieval_i2t_R@5", "retrieval_t2i_R@10", "retrieval_i2t_mAP"} <= set(rt)
    assert zs["zeroshot_samples_per_s"] > 0 and rt["retrieval_samples_per_s"] > 0
    # by default DataLoader workers decode the 3 shards, as many as the CPUs allow (tests/test_retrieval_zeroshot.py:
    # the same embeddings as without workers)
    assert f"3 shard(s) decoded by {eval_workers(3)} DataLoader worker(s)" in proc.stderr


def test_resume_gives_the_weights_of_an_uninterrupted_run(tmp_path, shards, tiny_text_model):
    """Losing everything after the step-3 checkpoint and re-running ends with bit-identical weights."""
    runs = {}
    for name in ("straight", "resumed"):
        recipe = tiny_recipe(tmp_path / f"{name}.yaml", tmp_path / name, shards, tiny_text_model)
        run_cli("train", str(recipe))
        runs[name] = tmp_path / name
    resumed = runs["resumed"]
    import shutil

    shutil.rmtree(resumed / "checkpoints" / "step_00000006")  # as if killed between steps 3 and 6
    shutil.rmtree(resumed / "model")
    proc = run_cli("train", str(tmp_path / "resumed.yaml"))
    assert "step 3" in proc.stderr
    a = load_file(runs["straight"] / "model" / "model.safetensors")
    b = load_file(resumed / "model" / "model.safetensors")
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


@pytest.mark.parametrize("case", ["missing_key", "unknown_modality", "misspelt_loss_option", "missing_image",
                                  "empty_shards"])
def test_bad_input_is_one_clear_line(tmp_path, case, shards, tiny_text_model):
    if case == "missing_key":
        recipe = tmp_path / "r.yaml"
        recipe.write_text("run_dir: x\nmodel:\n  modalities:\n    image: {}\n")
        proc = run_cli("train", str(recipe), check=False)
        expected = "missing required key 'data.train'"
    elif case == "unknown_modality":
        recipe = tiny_recipe(tmp_path / "r.yaml", tmp_path / "run", "x.tar", tiny_text_model)
        proc = run_cli("train", str(recipe), "--set", "model.modalities.imagee={tower: small_cnn}", check=False)
        expected = "unknown modality kind 'imagee' (did you mean 'image'?)"
    elif case == "misspelt_loss_option":
        recipe = tiny_recipe(tmp_path / "r.yaml", tmp_path / "run", shards, tiny_text_model)
        proc = run_cli("train", str(recipe), "--set", "loss={name: cwcl, kwargs: {weight_from: text}}", check=False)
        expected = "loss 'cwcl' takes no option 'weight_from' (did you mean 'weights_from'?)"
        assert not (tmp_path / "run" / "checkpoints").exists()  # stopped before training
    elif case == "missing_image":
        csv = tmp_path / "pairs.csv"
        csv.write_text("image,text\nnot_there.png,a red square\n")
        proc = run_cli("data", "shards", "--from", str(csv), "--out", str(tmp_path / "s"), check=False)
        expected = (f"{csv}: no usable samples to write (skipped: {{'file not found': 1}}; e.g. {csv} line 2: "
                    f"image file not found: {tmp_path / 'not_there.png'})")
    else:
        recipe = tiny_recipe(tmp_path / "r.yaml", tmp_path / "run", str(tmp_path / "none-{000..003}.tar"),
                             tiny_text_model)
        proc = run_cli("train", str(recipe), check=False)
        expected = "shard not found"
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    error_lines = [line for line in proc.stderr.splitlines() if line.startswith("mmalign: error:")]
    assert len(error_lines) == 1 and expected in error_lines[0], proc.stderr[-2000:]
