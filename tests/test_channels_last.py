"""``train.channels_last``: convolution weights in channels-last memory format train like contiguous ones, resume to
the weights of an uninterrupted run, and are saved as ordinary (contiguous) safetensors, a locked tower's own file
included. Two processes: the tower matrix's ``coca_decoder`` case (tests/tower_matrix.py)."""
from __future__ import annotations

import shutil

import pytest
import torch
from safetensors.torch import load_file

from conftest import metrics_rows, run_main, shape_sample, tiny_recipe, write_shard
from mmalign.model import AlignmentModel

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> str:
    root = tmp_path_factory.mktemp("cl-shards")
    return "::".join(write_shard(root / f"train-{i}.tar", [shape_sample(j) for j in range(16 * i, 16 * i + 16)])
                     for i in range(2))


def train(tmp_path, name: str, shards: str, text_model: str, *sets: str) -> dict:
    recipe = tiny_recipe(tmp_path / f"{name}.yaml", tmp_path / name, shards, text_model)
    code, _, err = run_main("train", str(recipe), *(a for s in sets for a in ("--set", s)))
    assert code == 0, err
    return {"dir": tmp_path / name, "recipe": recipe}


def losses(run_dir) -> list[float]:
    return [row["loss"] for row in metrics_rows(run_dir) if "loss" in row]


def test_channels_last_trains_like_contiguous_resumes_and_saves_plain_weights(tmp_path, shards, tiny_text_model):
    plain = train(tmp_path, "plain", shards, tiny_text_model)
    fast = train(tmp_path, "fast", shards, tiny_text_model, "train.channels_last=true")
    assert losses(fast["dir"]) == pytest.approx(losses(plain["dir"]), rel=1e-4)
    for run, layout in ((plain, torch.contiguous_format), (fast, torch.channels_last)):
        # the optimiser's moments take their parameters' layout: the convolutions trained in it
        state = torch.load(run["dir"] / "checkpoints" / "step_00000006" / "optimizer.pt", weights_only=True)
        moments = [s["exp_avg"] for s in state["state"].values() if s["exp_avg"].dim() == 4]
        assert moments and all(m.is_contiguous(memory_format=layout) and (m.is_contiguous() == (layout ==
                               torch.contiguous_format)) for m in moments)
    weights = load_file(fast["dir"] / "model" / "model.safetensors")
    assert all(t.is_contiguous() for t in weights.values())
    reloaded = AlignmentModel.from_pretrained(fast["dir"] / "model")
    conv = reloaded.adapters["image"].tower.state_dict()
    assert any(t.dim() == 4 for t in conv.values())

    # killed after the step-3 checkpoint: the resumed run ends with the uninterrupted run's weights
    shutil.rmtree(fast["dir"] / "checkpoints" / "step_00000006")
    shutil.rmtree(fast["dir"] / "model")
    code, _, err = run_main("train", str(fast["recipe"]), "--set", "train.channels_last=true")
    assert code == 0, err
    resumed = load_file(fast["dir"] / "model" / "model.safetensors")
    assert resumed.keys() == weights.keys()
    for key in weights:
        assert torch.equal(resumed[key], weights[key]), key


def test_a_locked_channels_last_tower_is_stored_once_as_plain_safetensors(tmp_path, shards, tiny_text_model):
    run = train(tmp_path, "locked", shards, tiny_text_model, "train.channels_last=true",
                "model.modalities.image.lock=true")
    towers = sorted((run["dir"] / "checkpoints").glob("**/*image*.safetensors"))
    assert towers, sorted(p.name for p in (run["dir"] / "checkpoints").rglob("*"))
    for path in towers:
        assert all(t.is_contiguous() for t in load_file(path).values())
    model = AlignmentModel.from_pretrained(run["dir"] / "model")
    assert model.adapters["image"].tower.state_dict().keys()
