"""Two processes on the real pipeline and loop (see ``test_distributed_data.py``).

argv: a work folder holding ``one.yaml`` (one shard), ``uneven.yaml`` (shards of unequal size) and ``uneven.tar``
spec. Each rank reports the sample keys it reads from the one shard, and the results of training runs on both
shard sets, including one resumed from a checkpoint copied out of the uninterrupted run.
"""
import shutil
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from safetensors.torch import load_file

from _report import report
from mmalign.config import load_config
from mmalign.data import expand_urls, pass_items
from mmalign.model import AlignmentModel
from mmalign.train import train

torch.set_num_threads(1)
work = Path(sys.argv[1])

one = load_config(work / "one.yaml")
one_results = train(one)  # 1 shard for 2 processes: must neither hang nor read a sample twice
rank = dist.get_rank()
modalities = AlignmentModel(one.model).modalities
keys = [k for b in pass_items(expand_urls(one.data.train), modalities, 8, train=True, shuffle_buffer=0, num_workers=2)
        if "__key__" in b for k in b["__key__"]]

straight = load_config(work / "uneven.yaml")  # processes read different numbers of batches per epoch
straight_results = train(straight)
resumed = load_config(work / "uneven.yaml", [f"run_dir={work / 'resumed'}"])
if rank == 0:
    shutil.copytree(Path(straight.run_dir) / "checkpoints" / "step_00000004",
                    Path(resumed.run_dir) / "checkpoints" / "step_00000004")
dist.barrier()
resumed_results = train(resumed)
same = None
if rank == 0:
    a = load_file(Path(straight.run_dir) / "model" / "model.safetensors")
    b = load_file(Path(resumed.run_dir) / "model" / "model.safetensors")
    same = a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
report({"keys": keys, "one": one_results, "straight": straight_results, "resumed": resumed_results,
        "same_weights": same})
