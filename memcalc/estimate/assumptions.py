"""The resolved assumptions behind an estimate, as typed objects: what the settings became once
the model, the precision recipe and the layout were applied (the sequence length the model
allows, the recipe's dtypes, the padded vocabulary, ...). Renderers read them as attributes;
only the JSON writer (memcalc.report) turns them into strings and numbers. They are read-only by
convention, not frozen, and have no ``__eq__``: nothing compares or changes them, and each method
a dataclass generates costs every start-up (``dataclasses.replace`` makes a changed copy). The
inference estimate's own, ``InferAssumptions``, lives in memcalc.estimate.inference for the same
reason: a training run never builds it."""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum
from typing import TYPE_CHECKING

from memcalc.config import (
    ActivationModel,
    Attention,
    Loss,
    Optimizer,
    OptimizerImpl,
    Recompute,
    TrainDType,
)
from memcalc.dtypes import DType
from memcalc.parallel import FSDPWrap, Offload, TPImpl, Zero3Knobs

if TYPE_CHECKING:  # built by memcalc.estimate.lora, which only a LoRA estimate imports
    from memcalc.estimate.lora import LoraSummary


@dataclass(eq=False, repr=False)
class LayoutSummary:
    """A parallel layout as resolved for the most loaded rank."""

    gpus: int
    dp: int
    tp: int
    pp: int
    cp: int
    ep: int
    sp: bool
    zero: int
    distributed_optimizer: bool
    vpp: int
    microbatches: int | None
    offload: Offload
    tp_impl: TPImpl
    fsdp: bool
    fsdp_wrap: FSDPWrap
    dense_shards: int  # ranks a dense parameter's optimizer state is sharded over (1: not sharded)
    expert_shards: int
    vocab_size_padded: int
    prefetch_units: int
    inflight_chunks: dict[int, int]  # pipeline rank: micro-batches (or chunks) in flight
    most_loaded_rank: str
    reduce_bucket_size: int | None = None  # DeepSpeed ZeRO's gradient reduction buffer, elements
    zero3: Zero3Knobs | None = None  # DeepSpeed ZeRO-3's stage3_* keys, where memcalc.estimate.zero3 applies


@dataclass(eq=False, repr=False)
class TrainAssumptions:
    dtype: TrainDType
    precision: str  # the memcalc.precision.RECIPES name the settings resolved to
    master_weights: bool
    optimizer: Optimizer
    optimizer_impl: OptimizerImpl
    optimizer_state_dtype: DType
    batch_size: int
    seq_len: int
    recompute: Recompute
    attention: Attention
    activation_model: ActivationModel
    loss: Loss
    activation_dtype: DType
    optimizer_in_backward: bool
    grad_accum: int
    paged_optimizer: bool
    expandable_segments: bool = False
    lora: LoraSummary | None = None
    parallel: LayoutSummary | None = None
    recompute_layers: int = 1  # full or op recompute on every Nth layer
    sac_outputs: tuple[str, ...] = ()  # op recompute: what each checkpointed layer keeps
    offload_activations: bool = False  # torchtune's activation offloading to pinned host memory
    dropout: dict[str, float] | None = None  # site -> training dropout rate, the sites the model has
    reserve_percent: float | None = None  # a measured allocator reserve (memcalc calibrate), else None
    reserve_source: str | None = None


class WeightOrigin(StrEnum):
    """Where the weights' format came from."""

    REQUESTED = "requested"  # a weight format asked for (infer --weights)
    DTYPE = "dtype"  # every tensor in the compute dtype
    CONFIG = "config"  # the checkpoint's quantization_config
    STORED = "stored"  # the bytes a checkpoint's headers or a GGUF file hold
