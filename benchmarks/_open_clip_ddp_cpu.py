"""``open_clip_train.main`` under torchrun on CPU processes: ``python -m benchmarks._open_clip_ddp_cpu ARGS`` is
``python -m open_clip_train.main ARGS`` with one change. open_clip_train wraps the model in
``DistributedDataParallel(model, device_ids=[device])``, which torch rejects for a CPU module ("device_ids ... only
work with ... GPU modules"); here ``device_ids`` is dropped for CPU devices, as DDP on CPU requires."""
import sys

import torch
from open_clip_train.main import main

_DDP = torch.nn.parallel.DistributedDataParallel


class CpuDistributedDataParallel(_DDP):
    def __init__(self, module, device_ids=None, **kwargs):
        on_cpu = device_ids is not None and all(torch.device(d).type == "cpu" for d in device_ids)
        super().__init__(module, device_ids=None if on_cpu else device_ids, **kwargs)


torch.nn.parallel.DistributedDataParallel = CpuDistributedDataParallel

if __name__ == "__main__":
    main(sys.argv[1:])
