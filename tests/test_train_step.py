"""The training step's speed switches: the fused AdamW kernel, ``train.compile``; both train the same weights."""
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import shape_sample, tiny_recipe, write_shard
from mmalign.build import build_optimizer
from mmalign.config import load_config
from mmalign.train import train


def test_adamw_uses_the_fused_kernel_where_torch_has_one(tmp_path, tiny_text_model):
    cfg = load_config(tiny_recipe(tmp_path / "r.yaml", tmp_path / "run", "unused.tar", tiny_text_model))
    model = torch.nn.Linear(3, 2)
    optimizer, _ = build_optimizer(cfg, model)
    assert optimizer.defaults["fused"] and not optimizer.defaults["foreach"]  # torch has a CPU kernel
    model.weight.data = model.weight.data.to(torch.float64)
    model.bias = torch.nn.Parameter(torch.zeros(2, dtype=torch.complex64))  # no fused kernel for complex numbers
    optimizer, _ = build_optimizer(cfg, model)
    assert optimizer.defaults["foreach"] and not optimizer.defaults["fused"]


@pytest.mark.slow
def test_compiled_training_reaches_the_weights_of_eager_training(tmp_path, tiny_text_model):
    shards = write_shard(tmp_path / "train-0.tar", [shape_sample(i) for i in range(24)])
    from torch._dynamo.utils import counters

    weights = {}
    for compiled in (False, True):
        counters.clear()
        recipe = tiny_recipe(tmp_path / f"{compiled}.yaml", tmp_path / f"run-{compiled}", shards, tiny_text_model)
        cfg = load_config(recipe, ["train.steps=3", "train.checkpoint_every=3", f"train.compile={compiled}",
                                   "model.modalities.text.lock=true"])  # a locked tower: no dropout
        assert train(cfg)["nonfinite_steps"] == 0
        assert bool(counters["stats"]["unique_graphs"]) == compiled  # dynamo traced the model only when asked
        weights[compiled] = load_file(Path(cfg.run_dir) / "model" / "model.safetensors")
    assert weights[True].keys() == weights[False].keys()
    for key, value in weights[False].items():  # the same computation, up to the compiled kernels' rounding
        torch.testing.assert_close(weights[True][key], value, rtol=1e-4, atol=1e-5, msg=key)
