"""Per-rank memory under FSDP2 (``fully_shard``, ZeRO-3 semantics) on fake tensors and a fake
process group: one process plays rank 0 of ``world_size``, with no GPUs and no communication.

Each decoder layer is its own FSDP unit; the root holds the embedding, final norm and head, or
(``wrap``) torchtune's and torchtitan's wrappings make the ends units of their own. Every
``fully_shard`` call uses FSDP2's defaults but for torchtitan's ``reshard_after_forward=False`` on
its norm-and-head unit and, with ``mixed_precision``, torchtitan's MixedPrecisionPolicy.

FSDP2 keeps parameters, gradients and optimizer states as ``DTensor``s whose memory is the local
shard: the tracker counts a ``DTensor`` by its local tensor, never by the wrapper, whose storage
reports the global size (counting wrappers once made every parameter, AdamW moment and foreach
temporary look unsharded). The all-gather and reduce-scatter buffers are the ones FSDP2 allocates
itself, at the sizes a real rank allocates; the fake process group only skips the communication.

What the measured phase peaks contain besides the sharded state is FSDP2's own behaviour (PyTorch
2.13, ``torch/distributed/fsdp/_fully_shard``), not an artefact of the measurement:

* The root stays unsharded from its pre-forward to the end of backward: its parameters are in use
  for the whole forward (the embedding first, the head last), ``reshard_after_forward=None`` means
  False for the root, and it reshards and reduce-scatters in the final backward callback. For a
  Llama model that is the whole embedding and head (2 x vocab x hidden) on every rank.
* Forward gathers one layer at a time (no forward prefetch by default; a layer reshards after its
  forward), but an all-gather writes a flat buffer of the whole unit that is copied out into the
  unsharded parameters, and the previous unit's flat buffer is freed only after the next unit's
  copy-out (``FSDPParamGroup.wait_for_unshard`` defers it for overlap): at a layer's copy-out the
  rank holds the previous unit's buffer, this unit's buffer and this unit's parameters.
* Backward prefetches one unit: the next layer's all-gather buffer is allocated in the current
  layer's pre-backward, beside the current layer's unsharded parameters and gradients.
* A unit's reduce-scatter input is a new buffer of the full (padded) unit size in the gradient
  dtype, filled from the unsharded gradients (both exist while it is filled) and kept until the
  next reduce-scatter is issued (``reduce_scatter_states``); the sharded gradient is a view of the
  reduce-scatter output.
* At ``world_size == 1`` nothing is all-gathered: the unsharded parameters are copies of the shards.

``ShardedMeasurement.above_static`` gives each phase's peak minus the sharded static state
(parameter shards and optimizer-state shards): what forward, backward and the optimizer step add
on top of it, to compare with an estimator's working set, activations and gradients.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from memcalc.config import ModelConfig
from memcalc.parallel import FSDPWrap
from memcalc.validate.model import Decoder, apply_lora, causal_lm_loss
from memcalc.validate.run import TORCH_DTYPES, _default_dtype
from memcalc.validate.tracker import LiveBytesTracker, optimizer_state_tensors


@dataclass(frozen=True)
class ShardedMeasurement:
    world_size: int
    weights: int  # this rank's parameter shards
    gradients: int  # this rank's gradient shards after backward
    optimizer_states: int
    peak: int  # the most live bytes on this rank over forward, backward and the optimizer step
    phase_peaks: tuple[int, int, int] = (0, 0, 0)  # forward, backward, optimizer step

    # Each phase's peak minus the sharded state held across iterations (parameter and optimizer-
    # state shards; gradients are freed by ``zero_grad(set_to_none=True)`` and made again in
    # backward). Forward: gathered parameters, all-gather buffers, activations. Backward: the same
    # plus unsharded gradients, reduce-scatter buffers and the gradient shards made so far. Step:
    # the gradient shards and the optimizer's temporaries.
    static: int = field(init=False)
    above_static: tuple[int, int, int] = field(init=False)

    def __post_init__(self) -> None:
        static = self.weights + self.optimizer_states
        object.__setattr__(self, "static", static)
        object.__setattr__(self, "above_static", tuple(peak - static for peak in self.phase_peaks))


def _fake_process_group(world_size: int, replicas: int = 1):
    """A fake group of ``world_size`` ranks; with ``replicas`` > 1 a 2-D mesh (replicas x
    shards), FSDP2's HSDP: shards inside a group, all-reduced across the replicas."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.testing._internal.distributed.fake_pg import FakeStore

    if dist.is_initialized():
        dist.destroy_process_group()
    dist.init_process_group("fake", store=FakeStore(), rank=0, world_size=world_size)
    if replicas > 1:
        return init_device_mesh("cpu", (replicas, world_size // replicas), mesh_dim_names=("replicate", "shard"))
    return init_device_mesh("cpu", (world_size,))


def measure_fsdp(model_config: ModelConfig, world_size: int, dtype: str = "bf16", batch_size: int = 1,
                 seq_len: int = 256, lora_rank: int | None = None,
                 lora_targets: tuple[str, ...] = ("q", "v"), wrap: str = FSDPWrap.LAYER,
                 replicas: int = 1, qlora: bool = False, mixed_precision: bool = False) -> ShardedMeasurement:
    """Pure ``dtype`` training (parameters, gradients and AdamW states in ``dtype``), two iterations.
    With ``lora_rank``: the base frozen and adapters in ``dtype`` on ``lora_targets`` (as torchtune's
    distributed LoRA recipe keeps them), every parameter sharded, only the adapters trained.
    ``wrap`` (``--fsdp-wrap``): ``layer``, each decoder layer a unit and the root holding the
    embedding, final norm and head; ``layer+embedding+head``, the embedding and the head units of
    their own too, resharded after forward (torchtune's ``custom_sharded_layers: ['tok_embeddings',
    'output']`` in ``shard_model``); ``torchtitan``, the embedding a unit, the final norm and the
    head one unit kept unsharded after forward (``apply_fsdp``, torchtitan/models/llama3/infra/
    parallelize.py: "do not reshard_after_forward the last layers ... FSDP would prefetch them
    immediately"). ``replicas`` > 1: hybrid sharding (HSDP, ``--fsdp hybrid``), each parameter
    sharded over ``world_size / replicas`` ranks and replicated across ``replicas`` groups.
    ``qlora`` (with ``lora_rank``): the layers' linear weights as memcalc's bitsandbytes NF4
    simulation (memcalc.validate.model.NF4Linear): the packed weight a frozen uint8 parameter,
    sharded like any other, the quantisation state module buffers, whole on every rank (as
    Answer.AI's fsdp_qlora keeps bitsandbytes' quant_state beside a sharded quant_storage).
    ``mixed_precision``: fp32 parameters under ``MixedPrecisionPolicy(param_dtype=bf16,
    reduce_dtype=fp32)`` on every unit, torchtitan's default (``mixed_precision_param`` bf16,
    ``mixed_precision_reduce`` float32); ``dtype`` is then the parameters' (fp32)."""
    import torch.distributed as dist
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.distributed.fsdp import MixedPrecisionPolicy
    from torch.distributed.fsdp import fully_shard as shard_module

    policy = {"mp_policy": MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
              } if mixed_precision else {}

    def fully_shard(module, **kwargs):
        return shard_module(module, **policy, **kwargs)

    if world_size % replicas:
        raise ValueError(f"{replicas} replicas do not divide {world_size} ranks")
    mesh = _fake_process_group(world_size, replicas)
    tracker = LiveBytesTracker()
    try:
        with FakeTensorMode(), tracker:
            with _default_dtype(TORCH_DTYPES[dtype]):
                model = Decoder(model_config)
                if lora_rank is not None:
                    apply_lora(model, lora_targets, lora_rank, dtype=TORCH_DTYPES[dtype], qlora=qlora)
            wrap = FSDPWrap(wrap)
            if wrap is not FSDPWrap.LAYER:
                if model.lm_head is None:
                    raise ValueError("a tied embedding and head cannot be FSDP units of their own")
                fully_shard(model.embed_tokens, mesh=mesh)
            for layer in model.layers:
                fully_shard(layer, mesh=mesh)
            if wrap is FSDPWrap.ENDS:
                fully_shard(model.lm_head, mesh=mesh)
            elif wrap is FSDPWrap.TORCHTITAN:
                fully_shard([model.final_norm, model.lm_head], mesh=mesh, reshard_after_forward=False)
            fully_shard(model, mesh=mesh)
            weights = tracker.storage_bytes(model.parameters())  # a DTensor counts as its local shard
            trained = [param for param in model.parameters() if param.requires_grad]
            optimizer = torch.optim.AdamW(trained, lr=1e-4, foreach=True)
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
                gradients = tracker.storage_bytes(param.grad for param in trained)
                tracker.reset_peaks()
                optimizer.step()
                step = tracker.peak_bytes
                optimizer.zero_grad(set_to_none=True)
            states = optimizer_state_tensors(optimizer)
            return ShardedMeasurement(world_size, weights, gradients, tracker.storage_bytes(states),
                                      max(forward, backward, step), (forward, backward, step))
    finally:
        dist.destroy_process_group()
