"""A training step under DeepSpeed ZeRO-1/2, measured with real tensors on the CPU.

DeepSpeed's stage 1 and 2 optimizer (``deepspeed/runtime/zero/stage_1_and_2.py``,
``DeepSpeedZeroOptimizer``) allocates its communication buffers with plain ``torch.empty`` and
``torch.zeros`` calls, which the tracker sees on any device, so this harness runs DeepSpeed itself:
``DS_ACCELERATOR=cpu``, a gloo group of ``world_size`` processes on this machine, each rank
counting its own live tensors from the model's construction on (``LiveBytesTracker``). Rank 0's
phases are returned: forward, ``engine.backward`` (with the reduction it ends with) and
``engine.step`` (the optimizer step and the all-gather of the updated parameters).

What the run shows (DeepSpeed 0.19.8; the estimate's rule is
``memcalc.estimate.training.deepspeed_buffer_bytes``):

* ``setup_buckets``, on the first gradient hook of a backward, allocates the ``ipg_buffer``:
  ``reduce_bucket_size`` elements in the gradients' dtype, a second one with ``overlap_comm``
  (contiguous_gradients, the default). ``_release_ipg_buffers`` at the end of the backward's
  reduction (``independent_gradient_partition_epilogue``) drops them, and the gradients that
  were views into them.
* The gradients of the parameters in the rank's partition are copied into ``grads_in_partition``
  (one flat buffer of those parameters' elements, gradient dtype) and kept for the step; the
  others are freed (ZeRO-2: as each bucket is reduced; ZeRO-1: after the whole backward, when the
  reduction runs).
* ``step`` flattens the partition, casts it to an fp32 ``single_partition_of_fp32_groups[i].grad``,
  frees the 16-bit gradients and steps; the updated partitions are all-gathered in place into the
  flat 16-bit parameter group (``all_gather_into_tensor_dp_groups``), with no buffer of its own.
"""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass

from memcalc.config import ModelConfig
from memcalc.validate.run import Phase, TrainWorkload


@dataclass(frozen=True)
class DeepSpeedRun:
    """A DeepSpeed ZeRO-1/2 configuration (``zero_optimization`` keys, elements)."""

    stage: int = 2
    world_size: int = 2
    reduce_bucket_size: int = 500_000_000
    allgather_bucket_size: int = 500_000_000
    overlap_comm: bool = False
    contiguous_gradients: bool = True


@dataclass(frozen=True)
class DeepSpeedMeasurement:
    phases: dict[str, Phase]
    static_bytes: int  # live bytes after deepspeed.initialize (flat 16-bit groups, fp32 partitions)
    ipg_buffer_bytes: int  # what setup_buckets allocated
    version: str


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _rank(rank: int, port: int, model_config: ModelConfig, workload: TrainWorkload, run: DeepSpeedRun,
          queue) -> None:
    os.environ.update(DS_ACCELERATOR="cpu", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      LOCAL_RANK=str(rank), WORLD_SIZE=str(run.world_size), LOCAL_SIZE=str(run.world_size))
    import logging

    import torch

    import deepspeed
    from deepspeed.runtime.zero.stage_1_and_2 import DeepSpeedZeroOptimizer

    from memcalc.validate.model import Decoder, causal_lm_loss
    from memcalc.validate.run import TORCH_DTYPES, _Meter
    from memcalc.validate.tracker import LiveBytesTracker

    logging.getLogger("DeepSpeed").setLevel(logging.ERROR)
    torch.set_num_threads(1)
    deepspeed.init_distributed(dist_backend="gloo")
    from memcalc.precision import RECIPES

    recipe = RECIPES[workload.precision]
    if recipe.master_dtype is None or recipe.autocast:
        raise ValueError("DeepSpeed ZeRO-1/2 is measured with 16-bit weights and fp32 master partitions")
    dtype = TORCH_DTYPES[recipe.weight_dtype.value]
    class RealBytesTracker(LiveBytesTracker):
        # DeepSpeed keeps each parameter's shape as a meta tensor (``round_robin_bit16_meta``):
        # a storage that reports its size and holds no memory
        def track(self, tensor: torch.Tensor) -> None:
            if tensor.device.type != "meta":
                super().track(tensor)

    tracker = RealBytesTracker()
    meter = _Meter("cpu", tracker)
    ipg = [0]
    setup_buckets = DeepSpeedZeroOptimizer.setup_buckets

    def counted_setup_buckets(self):
        before = tracker.live_bytes
        setup_buckets(self)
        ipg[0] = max(ipg[0], tracker.live_bytes - before)

    DeepSpeedZeroOptimizer.setup_buckets = counted_setup_buckets
    config = {
        "train_micro_batch_size_per_gpu": workload.batch_size,
        "gradient_accumulation_steps": 1,
        "bf16" if dtype is torch.bfloat16 else "fp16": {"enabled": True},
        "zero_optimization": {"stage": run.stage, "reduce_bucket_size": run.reduce_bucket_size,
                              "allgather_bucket_size": run.allgather_bucket_size, "overlap_comm": run.overlap_comm,
                              "contiguous_gradients": run.contiguous_gradients},
    }
    torch.manual_seed(0)
    with tracker:
        previous = torch.get_default_dtype()
        torch.set_default_dtype(dtype)
        try:
            model = Decoder(model_config, attention="sdpa")
        finally:
            torch.set_default_dtype(previous)
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, foreach=True)
        engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, config=config)
        static = tracker.live_bytes
        input_ids = torch.randint(0, model_config.vocab_size, (workload.batch_size, workload.seq_len))
        labels = torch.randint(0, model_config.vocab_size, (workload.batch_size, workload.seq_len))
        phases: dict[str, Phase] = {}
        for _ in range(workload.iterations):
            meter.start()
            loss = causal_lm_loss(engine(input_ids), labels)
            phases["forward"] = meter.stop()
            meter.start()
            engine.backward(loss)
            del loss
            phases["backward"] = meter.stop()
            meter.start()
            engine.step()
            phases["optimizer_step"] = meter.stop()
    if rank == 0:
        queue.put(DeepSpeedMeasurement(phases, static, ipg[0], deepspeed.__version__))
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()


def measure_deepspeed(model_config: ModelConfig, workload: TrainWorkload, run: DeepSpeedRun) -> DeepSpeedMeasurement:
    """Rank 0's phases of the last of ``workload.iterations`` steps under DeepSpeed ZeRO ``run.stage``."""
    import torch.multiprocessing as mp

    context = mp.get_context("spawn")
    queue = context.SimpleQueue()
    mp.start_processes(_rank, args=(_free_port(), model_config, workload, run, queue), nprocs=run.world_size,
                       join=True, start_method="spawn")
    return queue.get()
