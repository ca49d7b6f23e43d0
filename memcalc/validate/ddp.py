"""A training step under PyTorch DistributedDataParallel, measured with real tensors on the CPU.

DDP's reducer (torch/csrc/distributed/c10d/reducer.cpp) touches the data of the parameters and
of its buckets, which fake tensors do not have, so this harness runs a small model for real: one
process, a gloo group of one rank (DDP builds the same buckets for one rank as for many; the
all-reduce of one rank copies nothing). The tracker sees the buckets the reducer allocates when
it wraps the model (``initialize_buckets``: one flat buffer per bucket in the gradients' dtype,
``bucket_cap_mb`` 25, the first 1 MiB) and, with ``gradient_as_bucket_view``, the gradients
becoming views into them.
"""

from __future__ import annotations

from memcalc.config import ModelConfig
from memcalc.validate.run import Measurement, TrainWorkload, measure_training


def measure_ddp(model_config: ModelConfig, workload: TrainWorkload, bucket_view: bool = False) -> Measurement:
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    if dist.is_initialized():
        dist.destroy_process_group()
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        return measure_training(model_config, workload, device="cpu",
                                wrap=lambda model: DistributedDataParallel(model, gradient_as_bucket_view=bucket_view))
    finally:
        dist.destroy_process_group()
