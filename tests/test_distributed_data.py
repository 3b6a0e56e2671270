"""Two CPU processes (torchrun, gloo) on the real pipeline and training loop: one shard for two processes,
uneven shards (epochs end at different steps per process), resume with per-process data positions."""
import json
from pathlib import Path

import pytest
import yaml

from conftest import shape_png, shape_sample, tiny_recipe, write_shard
from mmalign.config import load_config, to_dict

pytestmark = [pytest.mark.distributed, pytest.mark.slow]



def _recipe(work: Path, name: str, shards: str, text_model: str, *overrides: str) -> None:
    """A tiny recipe with 2 DataLoader workers, resolved and written back as YAML for the torchrun script."""
    path = tiny_recipe(work / f"{name}.yaml", work / name, shards, text_model)
    cfg = load_config(path, ["data.num_workers=2", "model.modalities.image.tower_kwargs={width: 4, depth: 2}",
                             *overrides])
    path.write_text(yaml.safe_dump(to_dict(cfg)))


def test_two_processes_one_shard_and_uneven_shards(tmp_path, torchrun, tiny_text_model):
    one = [shape_sample(i) for i in range(36)]
    one.insert(5, {"__key__": "cut", "image.png": shape_png(0)[:50], "text.txt": "a cut image"})
    write_shard(tmp_path / "one.tar", one)
    for k, size in enumerate((8, 8, 32)):
        write_shard(tmp_path / f"uneven-{k}.tar", [shape_sample(100 * k + i) for i in range(size)])
    _recipe(tmp_path, "one", str(tmp_path / "one.tar"), tiny_text_model)
    _recipe(tmp_path, "uneven", str(tmp_path / "uneven-{0..2}.tar"), tiny_text_model, "train.steps=8",
            "train.checkpoint_every=4", "train.keep_last=3")

    ranks = torchrun("dist_data.py", str(tmp_path), timeout=240)
    run = ranks[0]

    # One shard: each process keeps every other sample, so the two halves are disjoint (18 each, 16 in batches).
    keys = [set(r["keys"]) for r in ranks]
    assert len(keys[0]) == len(keys[1]) == 16 and not keys[0] & keys[1]
    assert run["one"]["steps"] == 6 and run["one"]["skipped"] == {"bad image": 3}  # 3 epochs x 1, from one rank
    # Uneven shards: one process reads 1 or 2 shards of 8 while the other reads 32 samples: no hang at epoch ends.
    assert run["straight"]["steps"] == run["resumed"]["steps"] == 8
    state = json.loads((tmp_path / "uneven" / "checkpoints" / "step_00000008" / "trainer_state.json").read_text())
    epochs = [r["state"]["epoch"] for r in state["ranks"]]
    assert state["world_size"] == 2 and epochs[0] != epochs[1], epochs
    assert run["same_weights"] is True  # resumed from step 4 with each process's own data position and RNG
