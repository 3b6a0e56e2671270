"""Shared test helpers: small real data, and running a script under ``torchrun`` with 2 CPU processes (gloo)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SCRIPTS = Path(__file__).resolve().parent / "scripts"

# Tests never use the network (tiny models are made locally): a hub name that is not a local folder fails at once
# instead of after the hub client's retries (about 23 s without a network), in this process and every process it
# starts (they inherit this environment).
os.environ["HF_HUB_OFFLINE"] = "1"


@pytest.fixture(autouse=True)
def one_thread():
    """Every test runs torch on one thread (and gets back the count it found, as training may change it): tiny
    models are fastest so on a busy 2-core machine, and bit-identical float results need the same count each run."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def run_torchrun(script: str, *args: str, nproc: int = 2, timeout: int = 300) -> list[dict]:
    """Run ``tests/scripts/<script>`` with ``torchrun --nproc_per_node nproc`` on CPU.

    Each rank writes its results with ``scripts/_report.report(dict)``; the list (ordered by rank) is returned.
    """
    import tempfile

    out_dir = tempfile.mkdtemp(prefix="torchrun-")
    env = {**os.environ, "PYTHONPATH": f"{REPO}{os.pathsep}{SCRIPTS}", "OMP_NUM_THREADS": "1",
           "CUDA_VISIBLE_DEVICES": "", "MMALIGN_TEST_RESULTS": out_dir}
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
        "--master_addr", "127.0.0.1", "--master_port", str(_free_port()), str(SCRIPTS / script), *args,
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env, cwd=REPO)
    if proc.returncode != 0:
        raise AssertionError(f"torchrun failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    results = [json.loads(p.read_text()) for p in sorted(Path(out_dir).glob("rank*.json"))]
    assert len(results) == nproc, proc.stdout + proc.stderr
    return sorted(results, key=lambda r: r["rank"])


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def torchrun():
    return run_torchrun


# ------------------------------------------------------------------------------------------- small real data

SHAPES = ("square", "circle", "triangle", "cross")
COLOURS = {"red": (220, 30, 30), "green": (30, 180, 30), "blue": (30, 60, 220)}


def draw_shape(shape: str, colour: tuple, size: int, offset: tuple[int, int], canvas: int = 24):
    """A real little PNG-able image: one coloured shape on a grey background."""
    from PIL import Image, ImageDraw

    img = Image.new("RGB", (canvas, canvas), (128, 128, 128))
    d = ImageDraw.Draw(img)
    x, y = offset
    box = (x, y, x + size, y + size)
    if shape == "square":
        d.rectangle(box, fill=colour)
    elif shape == "circle":
        d.ellipse(box, fill=colour)
    elif shape == "triangle":
        d.polygon([(x, y + size), (x + size, y + size), (x + size // 2, y)], fill=colour)
    else:
        d.rectangle((x + size // 3, y, x + 2 * size // 3, y + size), fill=colour)
        d.rectangle((x, y + size // 3, x + size, y + 2 * size // 3), fill=colour)
    return img


@pytest.fixture(scope="session")
def shapes_dataset(tmp_path_factory) -> dict:
    """A user's own image files + a CSV of captions and labels (several captions per image)."""
    import random

    root = tmp_path_factory.mktemp("shapes")
    (root / "images").mkdir()
    rng = random.Random(0)
    rows = []
    for i in range(48):
        shape = SHAPES[i % len(SHAPES)]
        colour = list(COLOURS)[(i // len(SHAPES)) % len(COLOURS)]
        size = rng.randint(8, 14)
        path = root / "images" / f"img{i:03d}.png"
        draw_shape(shape, COLOURS[colour], size, (rng.randint(0, 24 - size), rng.randint(0, 24 - size))).save(path)
        for caption in (f"a {colour} {shape}", f"a picture of a {shape} in {colour}"):
            rows.append({"image": f"images/{path.name}", "text": caption, "label": shape})
    write_pairs_csv(root / "pairs.csv", rows)
    (root / "classes.txt").write_text("\n".join(SHAPES) + "\n")
    (root / "templates.txt").write_text("a {}\na picture of a {}\n")
    return {"root": root, "csv": root / "pairs.csv", "classes": root / "classes.txt",
            "templates": root / "templates.txt"}


@pytest.fixture(scope="session")
def tiny_text_model(tmp_path_factory) -> str:
    """A tiny randomly initialised BERT saved to a local folder, with the real MiniLM tokenizer. Its weights come from
    seed 0 (on a forked RNG), not from whichever test first asked for it: the suite gets the same model each run."""
    import torch
    from transformers import AutoTokenizer, BertConfig, BertModel

    from mmalign.modalities.text import resolve_pretrained

    path = tmp_path_factory.mktemp("tiny-bert")
    tok = AutoTokenizer.from_pretrained(resolve_pretrained("sentence-transformers/all-MiniLM-L6-v2"))
    config = BertConfig(vocab_size=tok.vocab_size, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=64, max_position_embeddings=64)
    with torch.random.fork_rng():
        torch.manual_seed(0)
        BertModel(config).save_pretrained(path)
    tok.save_pretrained(path)
    return str(path)


def tiny_recipe(path: Path, run_dir: Path, shards: str, text_model: str, classes=None, templates=None,
                extra: str = "") -> Path:
    """Write a small recipe: small CNN from scratch against a tiny local text tower."""
    evals = ""
    if classes:
        evals = (f"eval:\n  batch_size: 16\n  zeroshot: {{data: '{shards}', classes: '{classes}', "
                 f"templates: '{templates}'}}\n  retrieval: {{data: '{shards}', query: image, gallery: text}}\n")
    path.write_text(f"""run_dir: {run_dir}
seed: 0
model:
  embed_dim: 16
  modalities:
    image: {{tower: small_cnn, tower_kwargs: {{width: 8, depth: 2}}, image_size: 16, mean: [0.5, 0.5, 0.5], std: [0.5, 0.5, 0.5]}}
    text: {{tower: hf, model: '{text_model}', max_length: 16, unlocked_layers: 0}}
data: {{train: '{shards}', batch_size: 8, shuffle_buffer: 16, num_workers: 0}}
train: {{steps: 6, lr: 0.001, warmup_steps: 2, checkpoint_every: 3, log_every: 1, keep_last: 2}}
{evals}{extra}""")
    return path


def write_pairs_csv(path: Path, rows: list[dict]) -> Path:
    """A pairs CSV as users write it for ``mmalign data shards``: one row per (file, caption), the first row's
    keys as the header."""
    import csv

    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return path


def cli_env(**extra: str) -> dict[str, str]:
    """The environment of ``mmalign`` run by a test: this checkout, one thread (offline: inherited); plus ``extra``."""
    return {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", **extra}


def run_cli(*args: str, cwd=None, check: bool = True, timeout: int = 300, env: dict | None = None,
            threads: int | None = 1) -> subprocess.CompletedProcess:
    """Run ``python -m mmalign ...`` as a user would (on one thread, like every test, unless ``threads`` is None: then
    as many as mmalign chooses); returns the finished process (stdout, stderr, code)."""
    env = env or cli_env()
    if threads is None:
        env = {k: v for k, v in env.items() if k != "OMP_NUM_THREADS"}
    proc = subprocess.run([sys.executable, "-m", "mmalign", *args], capture_output=True, text=True,
                          timeout=timeout, env=env, cwd=cwd or REPO)
    return _checked(proc, args, check)


def _checked(proc: subprocess.CompletedProcess, args: tuple[str, ...], check: bool) -> subprocess.CompletedProcess:
    if check and proc.returncode != 0:
        raise AssertionError(f"mmalign {' '.join(args)} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    return proc


def run_in_process(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    """``run_cli`` through ``mmalign.cli.main`` in this process (``run_main``), for tests that are not about the
    process itself: the same finished process (exit status, stdout, stderr with mmalign's INFO logs as the CLI
    writes them), without a new interpreter and its seconds of imports per call."""
    import io
    import logging

    logs, logger = io.StringIO(), logging.getLogger("mmalign")
    handler, level = logging.StreamHandler(logs), logger.level
    handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
        code, out, err = run_main(*args)
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)
    return _checked(subprocess.CompletedProcess(["mmalign", *args], code, out, logs.getvalue() + err), args, check)


def torchrun_cli(*args: str) -> list[str]:
    """The command that runs ``mmalign ARGS`` in 2 CPU processes under ``torchrun`` (environment:
    ``cli_env(CUDA_VISIBLE_DEVICES="")``)."""
    return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
            "--master_port", str(_free_port()), "-m", "mmalign", *args]


def start_cli(*args: str, log: Path) -> subprocess.Popen:
    """Start ``python -m mmalign ...`` in the background, its stdout and stderr written to ``log``."""
    with open(log, "w") as out:
        return subprocess.Popen([sys.executable, "-m", "mmalign", *args], stdout=out, stderr=subprocess.STDOUT,
                                env=cli_env(), cwd=REPO)


def run_main(*args: str) -> tuple[int, str, str]:
    """``mmalign ARGS`` through ``mmalign.cli.main`` in this process (no seconds of imports per call): (exit status,
    stdout, stderr). Logs go to the test's log capture (``caplog``), not to the returned stderr."""
    import contextlib
    import io

    from mmalign.cli import main

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = main(list(args))
        except SystemExit as e:  # argparse's usage errors
            code = e.code
    return code, out.getvalue(), err.getvalue()


def bounded_fields(cls: type, where: str = "") -> list:
    """(dotted key, ``Bounds``) of every bounded field of a config class and its nested sections, optional ones
    included."""
    import dataclasses
    import typing

    from mmalign.bounds import BOUNDS

    out = []
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        key = f"{where}.{f.name}" if where else f.name
        if BOUNDS in f.metadata:
            out.append((key, f.metadata[BOUNDS]))
        hint = hints[f.name]
        optional = typing.get_args(hint) if typing.get_origin(hint) is typing.Union else ()
        section = next((t for t in (hint, *optional) if dataclasses.is_dataclass(t)), None)  # a section, or optional
        if section is not None:
            out += bounded_fields(section, key)
    return out


def metrics_rows(run_dir: Path) -> list[dict]:
    """The rows of a run's ``metrics.jsonl``, in order."""
    return [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]


def last_json(proc: subprocess.CompletedProcess) -> dict:
    return json.loads(proc.stdout.strip().splitlines()[-1])


# ------------------------------------------------------------------------------------------- shards in tests


def shape_png(i: int, canvas: int = 16) -> bytes:
    """PNG bytes of the ``i``-th shape/colour combination: a real little image for shards written by tests."""
    import io

    shape, colour = SHAPES[i % len(SHAPES)], list(COLOURS)[(i // len(SHAPES)) % len(COLOURS)]
    buf = io.BytesIO()
    draw_shape(shape, COLOURS[colour], 8, (i % 5, (i // 5) % 5), canvas).save(buf, format="PNG")
    return buf.getvalue()


def shape_sample(i: int) -> dict:
    shape, colour = SHAPES[i % len(SHAPES)], list(COLOURS)[(i // len(SHAPES)) % len(COLOURS)]
    return {"__key__": f"s{i:05d}", "image.png": shape_png(i), "text.txt": f"a {colour} {shape}", "label.txt": shape}


def write_shard(path, samples: list[dict]) -> str:
    """Write ``samples`` (``__key__`` plus member name -> bytes or str) as one WebDataset tar; returns its path."""
    import webdataset as wds

    with wds.TarWriter(str(path)) as sink:
        for sample in samples:
            sink.write({k: v.encode() if isinstance(v, str) and k != "__key__" else v for k, v in sample.items()})
    return str(path)


def save_clip_tokenizer(path: Path) -> None:
    """The real CLIP BPE tokenizer (vocabulary shipped by open_clip) as an HF ``CLIPTokenizer`` folder, offline."""
    import gzip

    from open_clip.tokenizer import bytes_to_unicode, default_bpe
    from transformers import CLIPTokenizer

    merges = gzip.open(default_bpe()).read().decode("utf-8").split("\n")[1:49152 - 256 - 2 + 1]
    vocab = list(bytes_to_unicode().values())
    vocab += [v + "</w>" for v in vocab] + ["".join(m.split()) for m in merges]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    path.mkdir(parents=True, exist_ok=True)
    (path / "vocab.json").write_text(json.dumps({w: i for i, w in enumerate(vocab)}))
    (path / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
    CLIPTokenizer(str(path / "vocab.json"), str(path / "merges.txt")).save_pretrained(path)


TINY_TOWER = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2)


@pytest.fixture(scope="session")
def tiny_hf_clip(tmp_path_factory) -> str:
    """A tiny randomly initialised ``CLIPModel`` saved like a hub checkpoint: weights, CLIP tokenizer, image
    processor (32 px, centre crop, non-default mean/std so the test sees they come from the checkpoint)."""
    import torch
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel

    path = tmp_path_factory.mktemp("tiny-hf-clip")
    torch.manual_seed(0)
    config = CLIPConfig(text_config=dict(vocab_size=49408, max_position_embeddings=77, **TINY_TOWER),
                        vision_config=dict(image_size=32, patch_size=8, **TINY_TOWER), projection_dim=16)
    CLIPModel(config).save_pretrained(path)
    CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32},
                       image_mean=[0.5, 0.4, 0.3], image_std=[0.2, 0.25, 0.3]).save_pretrained(path)
    save_clip_tokenizer(path)
    return str(path)


def exported_embedding(out: Path, name: str, inputs: dict):
    """An embedding computed from a towers-layout export (``mmalign export --format hf``) as its documentation says,
    with no mmalign code."""
    import importlib

    import torch
    import torch.nn.functional as F
    from safetensors.torch import load_file

    info = json.loads((out / "mmalign_export.json").read_text())
    heads, spec = load_file(out / info["heads"]), info["modalities"][name]
    net = getattr(importlib.import_module(spec["module"]), spec["class"]).from_pretrained(out / spec["folder"])
    with torch.no_grad():
        hidden = net.eval()(**inputs)
        if spec["pooling"] in ("pooler_output", "audio_embeds"):
            h = getattr(hidden, spec["pooling"])
        else:
            mask = inputs.get("attention_mask", torch.ones(hidden.last_hidden_state.shape[:2]))
            mask = mask.unsqueeze(-1).float()
            h = (hidden.last_hidden_state * mask).sum(1) / mask.sum(1)
        for layer in spec["head"]:
            if layer["type"] == "linear":
                h = F.linear(h, heads[layer["weight"]], heads[layer["bias"]] if layer["bias"] else None)
            else:
                h = getattr(F, layer["type"])(h)
    return F.normalize(h, dim=-1)
