"""Crash safety: a run killed at any moment (mid-training, mid-checkpoint-write) resumes from its last complete
checkpoint and ends with the weights and skip counts of an uninterrupted run; numerical faults skip steps."""
import json
import os
import signal
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import metrics_rows, shape_png, shape_sample, tiny_recipe, write_shard
from mmalign.config import load_config
from mmalign.errors import MMAlignError
from mmalign.io import remove_stale_temps
from mmalign.losses.objectives import ClipObjective
from mmalign.losses.registry import LOSSES
from mmalign.metrics_logger import truncate_metrics
from mmalign.rundir import checkpoint_dirs
from mmalign.train import train

PER_EPOCH_SKIPS = {"bad image": 1, "missing text": 1, "bad text": 1}


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> str:
    """Two shards of 20 good samples (one DataLoader worker each: 2 batches of 8 per worker and epoch) + 3 bad."""
    root = tmp_path_factory.mktemp("crash-shards")
    first = [shape_sample(i) for i in range(20)]
    first += [{"__key__": "bad-image", "image.png": shape_png(0)[:40], "text.txt": "a cut image"},
              {"__key__": "no-text", "image.png": shape_png(1)}]
    second = [shape_sample(i) for i in range(20, 40)] + [{"__key__": "bad-text", "image.png": shape_png(2),
                                                          "text.txt": b"\xff\xfe not utf-8"}]
    write_shard(root / "train-0.tar", first)
    write_shard(root / "train-1.tar", second)
    return str(root / "train-{0..1}.tar")


def config(tmp_path: Path, name: str, shards: str, text_model: str, *overrides: str):
    recipe = tiny_recipe(tmp_path / f"{name}.yaml", tmp_path / name, shards, text_model)
    return load_config(recipe, ["train.steps=8", "data.num_workers=2",
                                "model.modalities.image.tower_kwargs={width: 4, depth: 2}", *overrides])


def train_killed_at(cfg, point: str, monkeypatch) -> None:
    """Train in a forked copy of this process that SIGKILLs itself at ``point`` (``mmalign.io.crash_point``)."""
    monkeypatch.setenv("MMALIGN_KILL_AT", point)
    pid = os.fork()
    if pid == 0:  # the child: never returns into pytest
        try:
            train(cfg)
        finally:
            os._exit(1)
    _, status = os.waitpid(pid, 0)  # the child only (its orphaned DataLoader workers exit on their own)
    monkeypatch.delenv("MMALIGN_KILL_AT")
    assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL, f"no kill at {point}: status {status}"


def names(run_dir: Path) -> list[str]:
    return [p.name for p in checkpoint_dirs(run_dir)]


@pytest.mark.slow
def test_killed_runs_resume_to_the_weights_of_an_uninterrupted_run(tmp_path, shards, tiny_text_model, monkeypatch):
    monkeypatch.setenv("TOKENIZERS_PARALLELISM", "false")
    straight = train(config(tmp_path, "straight", shards, tiny_text_model))
    assert straight["skipped"] == {reason: 2 * n for reason, n in PER_EPOCH_SKIPS.items()}  # 2 whole epochs

    cfg = config(tmp_path, "killed", shards, tiny_text_model)
    run = Path(cfg.run_dir)
    train_killed_at(cfg, "checkpoint:6", monkeypatch)  # steps 4-5 are lost with the checkpoint 6 being written
    assert names(run) == ["step_00000003"]
    (partial,) = (run / "checkpoints").glob(".step_00000006.tmp-*")
    assert (partial / "model" / "model.safetensors").is_file() and not (partial / "trainer_state.json").exists()
    train_killed_at(cfg, "step:7", monkeypatch)  # resumed from 3 (mid first epoch), wrote 6, killed after step 7
    assert names(run) == ["step_00000003", "step_00000006"]
    assert not list((run / "checkpoints").glob(".*"))  # the partial checkpoint was removed on resume

    resumed = train(cfg)  # from 6: replays the first 2 batches of the second epoch
    assert names(run) == ["step_00000006", "step_00000008"]  # keep_last: 2
    a = load_file(tmp_path / "straight" / "model" / "model.safetensors")
    b = load_file(run / "model" / "model.safetensors")
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key
    assert resumed["skipped"] == straight["skipped"] and resumed["final_loss"] == straight["final_loss"]
    rows = metrics_rows(run)
    assert [r["step"] for r in rows] == list(range(1, 9))
    saved = json.loads((run / "checkpoints" / "step_00000008" / "trainer_state.json").read_text())
    assert saved["world_size"] == 1 and saved["ranks"][0]["state"]["epoch"] == 1


def test_stale_temporaries_and_cut_metrics_lines_are_cleaned(tmp_path):
    (tmp_path / ".model.tmp-abc").mkdir()
    (tmp_path / ".results.json.tmp-x").write_text("{")
    (tmp_path / ".step_00000003.old-12").mkdir()
    (tmp_path / "model").mkdir()
    assert len(remove_stale_temps(tmp_path)) == 3
    assert [p.name for p in tmp_path.iterdir()] == ["model"]
    metrics = tmp_path / "metrics.jsonl"
    metrics.write_text('{"step": 1}\n{"step": 2}\n{"step": 3}\n{"st')  # killed while writing a line
    truncate_metrics(metrics, 2)
    assert metrics.read_text() == '{"step": 1}\n{"step": 2}\n'


class NonFiniteAt(ClipObjective):
    """CLIP whose loss (or only its gradient) is non-finite at chosen calls: a fault injected through the registry."""

    def __init__(self, modalities, bad_calls=(), grad_only=False):
        super().__init__(modalities)
        self.bad_calls, self.grad_only, self.calls = set(bad_calls), grad_only, 0

    def forward(self, output, logit_scale, logit_bias=None):
        out = super().forward(output, logit_scale, logit_bias)
        self.calls += 1
        if self.calls in self.bad_calls:
            x = output.embeddings["image"]
            # d/dx sqrt(0 * x) is inf * 0 = nan, while the value stays finite
            out["loss"] = out["loss"] + 0 * torch.sqrt(0 * x.sum()) if self.grad_only else out["loss"] * float("nan")
        return out


@pytest.fixture
def nonfinite_loss():
    LOSSES["test_nonfinite"] = NonFiniteAt
    yield "test_nonfinite"
    del LOSSES["test_nonfinite"]


@pytest.mark.slow
def test_nonfinite_steps_are_skipped_counted_and_stop_only_in_a_row(tmp_path, shards, tiny_text_model,
                                                                    nonfinite_loss, recwarn):
    cfg = config(tmp_path, "some", shards, tiny_text_model, "train.steps=5", "data.num_workers=0",
                 f"loss={{name: {nonfinite_loss}, kwargs: {{bad_calls: [1, 3, 4], grad_only: true}}}}",
                 "train.max_nonfinite_in_row=3", "train.grad_clip=null")
    results = train(cfg)
    assert results["nonfinite_steps"] == 3  # 3 in all, at most 2 in a row: the run completes
    # the skipped first step advanced the schedule without torch's warning about the order of the two steps
    assert not [w for w in recwarn if "lr_scheduler.step()" in str(w.message)]
    assert json.loads((Path(cfg.run_dir) / "results.json").read_text())["nonfinite_steps"] == 3
    assert all(torch.isfinite(t).all() for t in load_file(Path(cfg.run_dir) / "model" / "model.safetensors").values())

    cfg = config(tmp_path, "streak", shards, tiny_text_model, "data.num_workers=0", "train.checkpoint_every=2",
                 f"loss={{name: {nonfinite_loss}, kwargs: {{bad_calls: [3, 4, 5]}}}}", "train.max_nonfinite_in_row=3")
    with pytest.raises(MMAlignError, match=r"3 steps in a row \(to step 5\) had a non-finite .*step_00000004"):
        train(cfg)
    run = Path(cfg.run_dir)
    assert names(run) == ["step_00000002", "step_00000004"]
    good, during = (load_file(run / "checkpoints" / n / "model" / "model.safetensors") for n in names(run))
    for key in good:  # skipped steps left weights and BatchNorm statistics exactly as after the last good step
        assert torch.equal(good[key], during[key]) and torch.isfinite(good[key]).all(), key


def test_logit_scale_is_clamped_after_each_update():
    from mmalign.config import ModelConfig
    from mmalign.model import AlignmentModel
    from mmalign.modalities.image import ImageConfig

    image = ImageConfig(kind="image", tower="small_cnn", tower_kwargs={"width": 4, "depth": 1}, image_size=8)
    model = AlignmentModel(ModelConfig(modalities={"image": image}, embed_dim=4))
    model.config.logit_scale.max = 20.0
    with torch.no_grad():
        model.log_logit_scale.fill_(10.0)  # as if a large update pushed it to e^10
    model.clamp_logit_scale_()
    assert model.logit_scale().item() == pytest.approx(20.0)
