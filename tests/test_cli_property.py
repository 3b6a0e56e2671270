"""Property test over the command line (hypothesis): random recipes and flag combinations built from the valid keys,
with at most one value broken at a time, give either a JSON result (exit 0) or one ``mmalign: error:`` line
(exit 2), never a traceback.

Runs ``mmalign.cli.main`` in this process (a subprocess per example would cost seconds of imports each);
derandomised and bounded: a fixed number of examples, every broken value failing in validation, before any work.
"""
from __future__ import annotations

import itertools
import json

import pytest
import yaml
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from mmalign.config import Config
from mmalign.modality_config import MODALITY_CONFIGS
from conftest import bounded_fields, run_main, tiny_recipe

pytestmark = pytest.mark.slow

EXAMPLES = 40


def check(argv: list[str]) -> tuple[int, str, str]:
    code, out, err = run_main(*argv)
    assert "Traceback" not in err, f"mmalign {' '.join(argv)}:\n{err}"
    if code == 0:
        json.loads(out.strip().splitlines()[-1])
    else:
        errors = [line for line in err.splitlines() if line.startswith("mmalign: error: ")]
        assert code == 2 and len(errors) == 1, f"mmalign {' '.join(argv)} -> {code}:\n{err[-2000:]}"
    return code, out, err


# ------------------------------------------------------------------------------------------- the valid keys

VALID = {  # recipe key -> values that train cheaply (one of them is drawn per key, for a few keys per example)
    "seed": st.integers(0, 5),
    "train.steps": st.integers(1, 3),
    "train.lr": st.sampled_from([1e-4, 1e-3, "3e-3"]),
    "train.warmup_steps": st.integers(0, 2),
    "train.grad_accum": st.integers(1, 2),
    "train.grad_clip": st.sampled_from([None, 0.5, 2.0]),
    "train.log_every": st.integers(1, 3),
    "train.checkpoint_every": st.integers(1, 3),
    "train.keep_last": st.integers(1, 2),
    "train.precision": st.sampled_from(["no", "bf16"]),
    "train.gradcache_chunk": st.sampled_from([None, 2]),
    "data.batch_size": st.integers(2, 8),
    "data.shuffle_buffer": st.integers(0, 16),
    "data.max_bad_fraction": st.sampled_from([0.0, 0.5, 1.0]),
    "model.embed_dim": st.integers(4, 16),
    "model.logit_scale.learnable": st.booleans(),
    "model.logit_scale.max": st.sampled_from([50.0, 100.0]),
    "model.modalities.image.image_size": st.integers(8, 20),
    "model.modalities.image.proj": st.sampled_from(["linear", "mlp"]),
    "model.modalities.image.tower_kwargs": st.fixed_dictionaries(
        {"width": st.integers(2, 8), "depth": st.integers(1, 3), "norm": st.sampled_from(["batch", "group"])}),
    "model.modalities.text.max_length": st.integers(4, 16),
    "model.modalities.text.pooling": st.sampled_from(["mean", "cls"]),
    "model.modalities.text.lock": st.booleans(),
    "loss.name": st.sampled_from(["clip", "siglip", "dcl", "clip_plus", "chunked_clip"]),
    "eval.batch_size": st.integers(1, 16),
    "eval.report_examples": st.integers(0, 3),
    "eval.retrieval.query": st.sampled_from(["image", "text"]),
    "eval.retrieval.gallery": st.sampled_from(["image", "text"]),
    "eval.retrieval.positives": st.sampled_from(["sample", "label"]),
    "eval.diagnostics.max_samples": st.integers(2, 40),
}


def outside(bounds) -> list:
    """Values just outside ``bounds``, and values of the wrong kind (or length)."""
    values = [float("nan"), "many"] + ([[1.0] * (bounds.length + 1)] if bounds.length else [])
    values += [bounds.gt] if bounds.gt is not None else []
    values += [bounds.ge - 1] if bounds.ge is not None else []
    values += [bounds.lt] if bounds.lt is not None else []
    values += [bounds.le + 0.5] if bounds.le is not None else []
    return [[v] * bounds.length if bounds.length and not isinstance(v, (str, list)) else v for v in values]


IMAGE, TEXT = "model.modalities.image", "model.modalities.text"
BROKEN = list(itertools.chain(  # (key, broken value): every bounded key out of its bounds, and the other kinds of slip
    ((key, value) for key, bounds in bounded_fields(Config) for value in outside(bounds)),
    ((f"{section}.{key}", value) for section, kind in ((IMAGE, "image"), (TEXT, "text"))
     for key, bounds in bounded_fields(MODALITY_CONFIGS[kind]) for value in outside(bounds)),
    [(f"{IMAGE}.tower_kwargs", {"width": 16, "detph": 4}), (f"{IMAGE}.tower_kwargs", {"width": "wide"}),
     (f"{IMAGE}.tower", "small_cnm"), (f"{IMAGE}.kind", "imagee"), (f"{IMAGE}.proj", "quadratic"),
     (f"{IMAGE}.mean", [0.5, "x", 0.5]), (f"{IMAGE}.std", [0, 1, 1]), (f"{TEXT}.model", "/no/such/model"),
     (f"{TEXT}.pooling", "max"), (f"{TEXT}.tower_kwargs", {"hiddn_size": 8}), ("train.lrr", 0.1),
     ("train.precision", "fp8"), ("train.device", "tpu"), ("train.betas", [0.9]), ("loss.name", "clipp"),
     ("loss.kwargs", {"weight_from": "text"}), ("loss", "clip"), ("model", []),
     ("data.train", "/no/such/shard-{000..002}.tar"), ("data.train", "pipe:cat x.tar"),
     ("eval.zeroshot.classes", "/no/such/classes.txt"), ("eval.retrieval.query", "audio"),
     ("eval.retrieval.positives", "labels"), ("eval.zeroshot.data", "/no/such.tar"), ("run_dir", "")],
))


def overrides(values: dict) -> list[str]:
    return list(itertools.chain.from_iterable(("--set", f"{k}={yaml.safe_dump(v, default_flow_style=True).strip()}")
                                              for k, v in values.items()))


@st.composite
def train_args(draw, setup: dict) -> list[str]:
    keys = draw(st.lists(st.sampled_from(sorted(VALID)), max_size=4, unique=True))
    values = {k: draw(VALID[k]) for k in keys}
    if draw(st.booleans()):
        key, value = draw(st.sampled_from(BROKEN))
        values[key] = value
    setup["runs"] += 1
    return ["train", str(setup["recipe"]), "--set", f"run_dir={setup['root'] / 'runs' / str(setup['runs'])}",
            *overrides(values)]


@st.composite
def eval_args(draw, setup: dict) -> list[str]:
    what = draw(st.sampled_from(["zeroshot", "retrieval", "linear-probe"]))
    args = {"--model": str(setup["model"]), "--data": setup["shards"]}
    if what == "zeroshot":
        args["--classes"] = draw(st.sampled_from([setup["classes"], setup["prompts"]]))
        args["--templates"] = setup["templates"]
    elif what == "retrieval":
        args["--query"], args["--gallery"] = draw(st.permutations(["image", "text"]))
        args["--positives"] = draw(st.sampled_from(["sample", "label"]))
    else:
        args["--train-data"] = setup["shards"]
        args["--query"] = draw(st.sampled_from(["image", "text"]))
    args["--batch-size"] = str(draw(st.integers(1, 64)))
    if draw(st.booleans()):
        flag = draw(st.sampled_from(sorted(args)))
        args[flag] = draw(st.sampled_from(["0", "-1", "x", "", "/no/such", "audio", setup["typo_classes"]]))
    return ["eval", what, *itertools.chain.from_iterable(args.items())]


@st.composite
def data_args(draw, setup: dict) -> list[str]:
    setup["runs"] += 1
    args = ["data", "shards", "--from", draw(st.sampled_from([str(setup["csv"]), str(setup["folder"])])),
            "--out", str(setup["root"] / "shards" / str(setup["runs"])),
            "--shard-size", str(draw(st.integers(1, 50)))]
    for flag in draw(st.lists(st.sampled_from(["--no-shuffle", "--strict", "--overwrite"]), unique=True)):
        args.append(flag)
    if draw(st.booleans()):
        args += ["--split", draw(st.sampled_from(["test=0.25", "val=0.1"]))]
    if draw(st.booleans()):
        broken = draw(st.sampled_from([["--shard-size", "0"], ["--split", "test=1.5"], ["--split", "train=0.2"],
                                       ["--split", "junk"], ["--from", "/no/such.csv"], ["--seed", "-2"],
                                       ["--out", str(setup["shards_dir"])], ["--from", str(setup["bad_csv"])]]))
        args += broken
    return args


@pytest.fixture(scope="module")
def setup(shapes_dataset, tiny_text_model, tmp_path_factory):
    from mmalign.data.shards import write_shards

    root = tmp_path_factory.mktemp("cli-property")
    summary = write_shards(shapes_dataset["csv"], root / "data", shard_size=16)
    shards = summary["shards"]
    recipe = tiny_recipe(root / "recipe.yaml", root / "model", shards, tiny_text_model, shapes_dataset["classes"],
                         shapes_dataset["templates"])
    recipe.write_text(recipe.read_text().replace("steps: 6", "steps: 2"))
    code, _, err = run_main("train", str(recipe))
    assert code == 0, err
    (root / "prompts.txt").write_text("square: a square\nsquare: a box\ncircle\ntriangle: a triangle\ncross\n")
    (root / "typo.txt").write_text("square\ncircle\ntriangel\ncross\n")
    folder = root / "folder"
    for i, name in enumerate(["square", "circle", "empty"]):
        (folder / name).mkdir(parents=True)
        if name != "empty":
            (folder / name / "a.png").write_bytes(shapes_dataset["root"].joinpath("images/img000.png").read_bytes())
    (folder / "circle" / "broken.png").write_bytes(b"\x89PNG not really")
    (root / "bad.csv").write_text("image,text\n,\nnothing.png,x\n")
    return {"root": root, "recipe": recipe, "model": root / "model", "shards": shards, "runs": 0,
            "classes": str(shapes_dataset["classes"]), "templates": str(shapes_dataset["templates"]),
            "prompts": str(root / "prompts.txt"), "typo_classes": str(root / "typo.txt"), "csv": shapes_dataset["csv"],
            "folder": folder, "bad_csv": root / "bad.csv", "shards_dir": root / "data"}


@settings(max_examples=EXAMPLES, deadline=None, derandomize=True, database=None, print_blob=True,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture,
                                 HealthCheck.data_too_large])
@given(data=st.data())
def test_cli_gives_a_result_or_one_error_line(setup, data):
    command = data.draw(st.sampled_from(["train", "train", "eval", "data"]))
    strategy = {"train": train_args, "eval": eval_args, "data": data_args}[command]
    code, _, _ = check(data.draw(strategy(setup)))
    event(f"{command}: exit {code}")  # pytest --hypothesis-show-statistics shows how many ran and how many failed


@pytest.mark.parametrize("key, value", BROKEN, ids=lambda x: str(x)[:40])
def test_each_broken_value_is_one_error_line_before_any_work(setup, key, value):
    run_dir = setup["root"] / "broken" / key
    code, _, err = check(["train", str(setup["recipe"]), "--set", f"run_dir={run_dir}", *overrides({key: value})])
    assert code == 2 and not (run_dir / "checkpoints").exists(), err[-2000:]
