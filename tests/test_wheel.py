"""The built wheel, installed the way a user installs it, and used outside the checkout (part of `make test`).

One fresh virtual environment in a temporary folder stands for the user's project. It already has the user's own
torch: the running environment's torch and torchvision (with what they need) are made visible to it through a
``.pth`` file, as a system-wide torch is, so no 5 GB CUDA build is installed a second time.

1. ``python -m build`` gives the wheel; ``pip install mmalign-*.whl`` (core only) must keep that torch; from an empty
   folder ``mmalign --version``, ``mmalign recipes`` and ``recipes show`` work, and a recipe with an audio modality
   fails with one line naming ``mmalign[audio]``.
2. The user adds torchaudio and ``pip install 'mmalign-*.whl[demo]'``: torch is kept again, and ``mmalign demo lit``
   with a few steps prints its JSON result line.

Needs the package index that ``make install`` uses (PyPI) for mmalign's other dependencies.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import zipfile
from importlib.metadata import distribution
from pathlib import Path

import pytest
import torch
from packaging.requirements import Requirement

from mmalign import __version__

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[1]
DEMO_STEPS = 20


def requirement_closure(names: list[str]) -> dict:
    """The installed distributions ``names`` and every one they require (markers evaluated here), by name."""
    found, todo = {}, list(names)
    while todo:
        dist = distribution(todo.pop())
        key = dist.metadata["Name"].lower().replace("_", "-")
        if key not in found:
            found[key] = dist
            todo += [r.name for r in map(Requirement, dist.requires or [])
                     if r.marker is None or r.marker.evaluate({"extra": ""})]
    return found


def expose(names: list[str], folder: Path) -> None:
    """Make the running environment's ``names`` (and what they require) importable from ``folder`` by linking
    their top-level files and folders there."""
    folder.mkdir(exist_ok=True)
    for dist in requirement_closure(names).values():
        site = Path(dist.locate_file(""))
        for top in {f.parts[0] for f in dist.files or [] if f.parts[0] not in ("..", "__pycache__")}:
            if not (folder / top).exists() and (site / top).exists():
                (folder / top).symlink_to(site / top)


def run(*cmd, cwd: Path, env: dict, timeout: int = 600) -> subprocess.CompletedProcess:
    proc = subprocess.run([str(c) for c in cmd], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"{' '.join(map(str, cmd))} failed ({proc.returncode}):\n{proc.stderr[-4000:]}"
    return proc


def test_wheel_keeps_the_users_torch_and_runs_outside_the_checkout(tmp_path):
    dist_dir, user_torch, work = tmp_path / "dist", tmp_path / "user-torch", tmp_path / "empty"
    work.mkdir()
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV")}
    env.update(OMP_NUM_THREADS="1", PIP_NO_INPUT="1")  # offline: conftest's HF_HUB_OFFLINE

    # sdist, then the wheel from the unpacked sdist: what a release builds, and no stale build/ folder gets in
    run(sys.executable, "-m", "build", "--outdir", dist_dir, REPO, cwd=tmp_path, env=env)
    wheel = next(dist_dir.glob(f"mmalign-{__version__}-*.whl"))
    with zipfile.ZipFile(wheel) as z:
        names = z.namelist()
        metadata = z.read(f"mmalign-{__version__}.dist-info/METADATA").decode()
    assert {n.split("/")[0] for n in names} == {"mmalign", f"mmalign-{__version__}.dist-info"}  # no data_tools
    assert {"mmalign/recipes/lit_image_text.yaml", "mmalign/recipes/cwcl.findings.md",
            "mmalign/demo_data/digits.py"} <= set(names)
    requires = [Requirement(line.split(": ", 1)[1]) for line in metadata.splitlines()
                if line.startswith("Requires-Dist: ")]
    assert {r.name for r in requires} >= {"torch", "torchvision", "torchaudio"}
    assert not [str(r) for r in requires if any(s.operator == "==" for s in r.specifier)]  # ranges, no pins

    venv = tmp_path / "venv"
    run(sys.executable, "-m", "venv", "--without-pip", venv, cwd=tmp_path, env=env)
    python, mmalign = venv / "bin" / "python", venv / "bin" / "mmalign"
    site = Path(run(python, "-c", "import sysconfig; print(sysconfig.get_path('purelib'))", cwd=work,
                    env=env).stdout.strip())
    expose(["torch", "torchvision"], user_torch)
    (site / "users_torch.pth").write_text(f"{user_torch}\n")

    def pip_install(target: str) -> None:
        run(sys.executable, "-m", "pip", "--python", python, "install", "-q", "--no-compile", target, cwd=work,
            env=env)
        torch_now = json.loads(run(python, "-c", "import json, torch; print(json.dumps([torch.__version__, "
                                   "torch.__file__]))", cwd=work, env=env).stdout)
        assert torch_now == [torch.__version__, str(user_torch / "torch" / "__init__.py")]  # pip kept it
        assert not (site / "torch").exists()

    # 1. Core only.
    pip_install(str(wheel))
    assert run(mmalign, "--version", cwd=work, env=env).stdout == f"mmalign {__version__}\n"
    assert run(python, "-m", "mmalign", "--version", cwd=work, env=env).stdout == f"mmalign {__version__}\n"
    listed = run(mmalign, "recipes", cwd=work, env=env).stdout
    assert "lit_image_text" in listed and "clap_audio_text" in listed
    shown = run(mmalign, "recipes", "show", "clap_audio_text", cwd=work, env=env).stdout
    assert shown == (REPO / "mmalign" / "recipes" / "clap_audio_text.yaml").read_text()
    (work / "empty.tar").touch()
    (work / "classes.txt").write_text("one\ntwo\n")
    (work / "templates.txt").write_text("a sound of {}.\n")  # read before training, like the classes
    sets = [f"{key}={value}" for key, value in (
        ("run_dir", "runs/clap"), ("data.train", "empty.tar"), ("eval.zeroshot.data", "empty.tar"),
        ("eval.retrieval.data", "empty.tar"), ("eval.zeroshot.classes", "classes.txt"),
        ("eval.zeroshot.templates", "templates.txt"))]
    proc = subprocess.run([mmalign, "train", "clap_audio_text", *(a for s in sets for a in ("--set", s))],
                          cwd=work, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert proc.stderr.splitlines()[-1] == ("mmalign: error: audio modality 'audio' needs soundfile, which is not "
                                            "installed: pip install 'mmalign[audio]'")
    assert "Traceback" not in proc.stderr

    # 2. The user's torchaudio, then the demo extra.
    expose(["torchaudio"], user_torch)
    pip_install(f"{wheel}[demo]")
    proc = run(mmalign, "demo", "lit", "--set", f"train.steps={DEMO_STEPS}", cwd=work, env=env)
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["steps"] == DEMO_STEPS and 0.0 <= result["zeroshot_top1"] <= 1.0
    assert Path(result["run_dir"]) == Path("runs/demo-lit") and (work / "runs" / "demo-lit" / "report.md").is_file()
    for folder in (venv, work):  # ~0.8 GB; kept when the test fails
        shutil.rmtree(folder)
