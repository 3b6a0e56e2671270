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
