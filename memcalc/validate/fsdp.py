"""Per-rank memory under FSDP2 (``fully_shard``, ZeRO-3 semantics) on fake tensors and a fake
process group: one process plays rank 0 of ``world_size``, with no GPUs and no communication.

Each decoder layer is its own FSDP unit and the root holds the embedding, final norm and head,
as torchtitan and torchtune wrap Llama models.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from memcalc.config import ModelConfig
from memcalc.validate.model import Decoder, causal_lm_loss
from memcalc.validate.run import TORCH_DTYPES, _default_dtype
from memcalc.validate.tracker import LiveBytesTracker


@dataclass(frozen=True)
class ShardedMeasurement:
    world_size: int
    weights: int  # this rank's parameter shards
    gradients: int  # this rank's gradient shards after backward
    optimizer_states: int
    peak: int  # the most live bytes on this rank over forward, backward and the optimizer step
    phase_peaks: tuple[int, int, int] = (0, 0, 0)  # forward, backward, optimizer step


def _fake_process_group(world_size: int):
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.testing._internal.distributed.fake_pg import FakeStore

    if dist.is_initialized():
        dist.destroy_process_group()
    dist.init_process_group("fake", store=FakeStore(), rank=0, world_size=world_size)
    return init_device_mesh("cpu", (world_size,))


def measure_fsdp(model_config: ModelConfig, world_size: int, dtype: str = "bf16", batch_size: int = 1,
                 seq_len: int = 256) -> ShardedMeasurement:
    """Pure ``dtype`` training (parameters, gradients and AdamW states in ``dtype``), two iterations."""
    import torch.distributed as dist
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.distributed.fsdp import fully_shard

    mesh = _fake_process_group(world_size)
    tracker = LiveBytesTracker()
    try:
        with FakeTensorMode(), tracker:
            with _default_dtype(TORCH_DTYPES[dtype]):
                model = Decoder(model_config)
            for layer in model.layers:
                fully_shard(layer, mesh=mesh)
            fully_shard(model, mesh=mesh)
            local = [param.to_local() for param in model.parameters()]
            weights = tracker.storage_bytes(local)
            optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, foreach=True)
            input_ids = torch.randint(0, model_config.vocab_size, (batch_size, seq_len))
            labels = torch.randint(0, model_config.vocab_size, (batch_size, seq_len))
            for _iteration in range(2):
                tracker.reset_peaks()
                loss = causal_lm_loss(model(input_ids), labels)
                forward = tracker.peak_bytes
                tracker.reset_peaks()
                loss.backward()
                del loss
                backward = tracker.peak_bytes
                gradients = tracker.storage_bytes([param.grad.to_local() for param in model.parameters()])
                tracker.reset_peaks()
                optimizer.step()
                step = tracker.peak_bytes
                optimizer.zero_grad(set_to_none=True)
            states = [value.to_local() if hasattr(value, "to_local") else value
                      for state in optimizer.state.values() for value in state.values() if isinstance(value, torch.Tensor)]
            return ShardedMeasurement(world_size, weights, gradients, tracker.storage_bytes(states),
                                      max(forward, backward, step), (forward, backward, step))
    finally:
        dist.destroy_process_group()
