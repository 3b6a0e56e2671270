"""Safe loading: checkpoints need no unpickling, remote code and shell commands never run unasked, and config
values are validated with errors that name the key."""
import json
import random
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import get_cosine_schedule_with_warmup

from conftest import tiny_recipe
from mmalign.config import ModelConfig, load_config
from mmalign.data import expand_urls
from mmalign.errors import ConfigError, DataError
from mmalign.model import AlignmentModel
from mmalign.modalities.image import ImageConfig
from mmalign.modalities.text import TextConfig, hf_text
from mmalign.rundir import (
    TrainState, checkpoint_dirs, load_checkpoint, process_record, resume_record, save_checkpoint,
)
from mmalign.train import train

REPO = Path(__file__).resolve().parents[1]
RECIPE = REPO / "recipes" / "lit_image_text.yaml"


def _tiny_model() -> AlignmentModel:
    image = ImageConfig(kind="image", tower="small_cnn", tower_kwargs={"width": 4, "depth": 1}, image_size=8)
    return AlignmentModel(ModelConfig(modalities={"image": image}, embed_dim=4))


def test_checkpoints_hold_no_pickles_and_restore_weights_rng_and_position(tmp_path):
    model = _tiny_model()
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.1)
    scheduler = get_cosine_schedule_with_warmup(optimizer, 1, 10)
    model({"image": torch.randn(2, 3, 8, 8)}).embeddings["image"].sum().backward()
    optimizer.step()
    scheduler.step()
    for step in (1, 2, 3):
        state = TrainState(step=step, epoch=1, batches_in_epoch=4, samples=40,
                           skipped={"counts": {"bad image": 2}, "examples": {"bad image": ["a.tar:k1"]}})
        save_checkpoint(tmp_path, model, optimizer, scheduler, [process_record(state)], keep=2, recipe={}, frozen={})
    expected = (random.random(), np.random.rand(), torch.rand(3))
    assert [p.name for p in checkpoint_dirs(tmp_path)] == ["step_00000002", "step_00000003"]
    path = checkpoint_dirs(tmp_path)[-1]
    assert sorted(p.name for p in path.iterdir()) == ["manifest.json", "model", "optimizer.pt", "recipe.json",
                                                      "scheduler.pt", "trainer_state.json"]
    for pt in path.glob("*.pt"):
        torch.load(pt, weights_only=True)  # tensors, numbers and containers only

    fresh = _tiny_model()
    fresh_opt = torch.optim.AdamW(fresh.parameters(), lr=0.1)
    fresh_sched = get_cosine_schedule_with_warmup(fresh_opt, 1, 10)
    random.seed(99), np.random.seed(99), torch.manual_seed(99)
    restored = load_checkpoint(path, fresh, fresh_opt, fresh_sched)
    assert restored == state
    assert (random.random(), np.random.rand()) == expected[:2] and torch.equal(torch.rand(3), expected[2])
    for a, b in zip(model.state_dict().values(), fresh.state_dict().values()):
        assert torch.equal(a, b)
    moments = fresh_opt.state_dict()["state"]
    assert fresh_sched.last_epoch == 1 and moments and all(m["step"] == 1 for m in moments.values())


def test_resuming_with_another_number_of_processes_keeps_totals():
    records = [process_record(TrainState(step=6, epoch=e, batches_in_epoch=b, samples=n, skipped=s))
               for e, b, n, s in ((2, 3, 48, {"counts": {"bad image": 1}, "examples": {"bad image": ["x"]}}),
                                  (1, 5, 40, {"counts": {"bad image": 2}, "examples": {"bad image": ["y"]}}))]
    assert resume_record(records, 1, 2) is records[1]
    first = resume_record(records, 0, 1)["state"]
    assert (first["step"], first["epoch"], first["batches_in_epoch"], first["samples"]) == (6, 3, 0, 88)
    assert first["skipped"]["counts"] == {"bad image": 3}


def test_source_never_unpickles_runs_shells_or_trusts_remote_code():
    for path in REPO.glob("mmalign/**/*.py"):  # the demo data builders included (mmalign/demo_data)
        source = path.read_text()
        for call in re.findall(r"torch\.load\([^)]*\)", source):
            assert "weights_only=True" in call, f"{path}: {call}"
        for banned in (r"pickle\.loads?\(", r"shell=True", r"os\.system\(", r"trust_remote_code=True",
                       r"(?<![\w.])eval\(", r"(?<![\w.])exec\("):
            assert not re.search(banned, source), f"{path} matches {banned}"


def test_pipe_urls_are_refused():
    with pytest.raises(DataError, match="pipe: urls run shell commands and are not allowed"):
        expand_urls("pipe:curl -s http://example.com/a.tar")


def test_remote_code_in_a_model_folder_is_not_run(tmp_path):
    marker = tmp_path / "ran"
    (tmp_path / "evil.py").write_text(f"open({str(marker)!r}, 'w').write('pwned')\n")
    (tmp_path / "config.json").write_text(json.dumps({
        "model_type": "evil-net", "auto_map": {"AutoConfig": "evil.Config", "AutoModel": "evil.Model"}}))
    with pytest.raises(ConfigError, match="contains custom code"):
        hf_text(TextConfig(kind="text", tower="hf", model=str(tmp_path), init="scratch"))
    assert not marker.exists()


@pytest.mark.parametrize("override, message", [
    ("seed=-1", "seed must be a number >= 0"),
    ("run_dir=' '", "run_dir must not be empty"),
    ("data.shuffle_buffer=-5", "data.shuffle_buffer must be a number >= 0"),
    ("data.max_bad_fraction=1.5", r"data.max_bad_fraction must be a number in \[0, 1\]"),
    ("train.betas=[0.9, 1.2]", r"train.betas must be 2 numbers in \[0, 1\), got \[0.9, 1.2\]"),
    ("train.eps=0", "train.eps must be a number > 0"),
    ("train.grad_clip=0", "train.grad_clip must be a number > 0"),
    ("train.weight_decay=-0.1", "train.weight_decay must be a number >= 0"),
    ("train.max_nonfinite_in_row=0", "train.max_nonfinite_in_row must be a number >= 1"),
    ("model.logit_scale.init=500", r"model.logit_scale.init must be in \(0, model.logit_scale.max\]"),
    ("model.logit_scale.max=.inf", "model.logit_scale.max must be a number > 0, got inf"),
])
def test_config_values_are_validated(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config(RECIPE, [override])


def test_missing_eval_files_fail_before_training(tmp_path, tiny_text_model):
    shard = tmp_path / "train.tar"
    shard.write_bytes(b"")
    recipe = tiny_recipe(tmp_path / "r.yaml", tmp_path / "run", str(shard), tiny_text_model,
                         classes=tmp_path / "no-classes.txt", templates=tmp_path / "no-templates.txt")
    with pytest.raises(ConfigError, match=f"eval.zeroshot.classes: file not found: {tmp_path}/no-classes.txt"):
        train(load_config(recipe))
    assert not (tmp_path / "run").exists()  # nothing was built or written
