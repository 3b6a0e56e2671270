"""Train the tower matrix's cases (``tests/tower_matrix.py``) one after another in this process group, as
``mmalign.train.train`` does for a user: ``dist_tower_matrix.py ROOT SHARDS OUT CASE [CASE ...]``. Each case's run
goes to ``OUT/<case>``; with ``--resume`` (one process), each run is then resumed from its halfway checkpoint into
``OUT/<case>-resumed``. A case that fails is reported with its error, and the next one runs."""
import os
import shutil
import sys
import time
import traceback
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/: tower_matrix, conftest

from _report import report  # noqa: E402
from tower_matrix import BY_NAME, STEPS, recipe  # noqa: E402

from mmalign.config import load_config  # noqa: E402
from mmalign.train import train  # noqa: E402


def run(name: str, root: Path, shards: str, run_dir: Path) -> dict:
    started = time.time()
    try:
        processes = int(os.environ.get("WORLD_SIZE", "1"))  # the process group starts with the first run
        train(load_config(base=recipe(BY_NAME[name], root, run_dir, shards, processes)))
    except Exception as e:  # reported to the test, which shows it with the case's name
        return {"error": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc()[-3000:]}
    return {"seconds": round(time.time() - started, 2)}


def resume(name: str, root: Path, shards: str, run_dir: Path) -> dict:
    """The run as killed after its halfway checkpoint: that checkpoint only, then the same command again."""
    resumed = run_dir.with_name(f"{run_dir.name}-resumed")
    shutil.rmtree(resumed, ignore_errors=True)
    resumed.mkdir()
    halfway = f"step_{STEPS // 2:08d}"
    shutil.copytree(run_dir / "checkpoints" / halfway, resumed / "checkpoints" / halfway)
    if (run_dir / "checkpoints" / "frozen").exists():  # locked towers' weights, stored once per run
        shutil.copytree(run_dir / "checkpoints" / "frozen", resumed / "checkpoints" / "frozen")
    return run(name, root, shards, resumed)


def main() -> None:
    args = [a for a in sys.argv[1:] if a != "--resume"]
    root, shards, out, names = Path(args[0]), args[1], Path(args[2]), args[3:]
    import torch

    torch.set_num_threads(1)
    results = {}
    for name in names:
        results[name] = run(name, root, shards, out / name)
        if "--resume" in sys.argv and "error" not in results[name]:
            results[f"{name}-resumed"] = resume(name, root, shards, out / name)
    report({"cases": results})


if __name__ == "__main__":
    main()
