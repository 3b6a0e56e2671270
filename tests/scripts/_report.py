"""How a torchrun test script hands its per-rank results back to the test (see ``conftest.run_torchrun``)."""
import json
import os

import torch.distributed as dist

from mmalign.distributed import leave_process_group


def report(result: dict) -> None:
    """Write this rank's ``result``, then leave the process group together: a barrier first, so no rank tears gloo
    down while the other still has a collective in flight (that can abort with "terminate called without an
    active exception")."""
    rank = dist.get_rank() if dist.is_initialized() else 0
    path = os.path.join(os.environ["MMALIGN_TEST_RESULTS"], f"rank{rank:03d}.json")
    with open(path + ".tmp", "w") as f:
        json.dump({"rank": rank, **result}, f)
    os.replace(path + ".tmp", path)
    if dist.is_initialized():
        dist.barrier()
        leave_process_group()
