"""The resolved assumptions behind an estimate, as typed objects: what the settings became once
the model, the precision recipe and the layout were applied (the sequence length the model
allows, the recipe's dtypes, the padded vocabulary, ...). Renderers read them as attributes;
only the JSON writer (memcalc.report) turns them into strings and numbers. They are read-only by
convention, not frozen, and have no ``__eq__``: nothing compares or changes them, and each method
a dataclass generates costs every start-up (``dataclasses.replace`` makes a changed copy)."""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum

from memcalc.config import (
    ActivationModel,
    Attention,
    Decoding,
    Engine,
    KVDType,
    Loss,
    Optimizer,
    OptimizerImpl,
    PrefillLogits,
    Recompute,
    TrainDType,
)
from memcalc.dtypes import DType
from memcalc.parallel import FSDPWrap, Offload, TPImpl


@dataclass(eq=False)
class LoraSummary:
    """LoRA as resolved: the adapters' rank, targets and dtype, and what they count."""

    rank: int
    targets: tuple[str, ...]
    adapter_dtype: DType
    qlora: bool
    base_format: str  # the frozen base's storage, e.g. "bnb-nf4 (double quant)" or "bf16"
    trainable_params: int
    adapter_bytes: int
    base_weight_bytes: int
    adapter_recipe: str  # a memcalc.precision.RECIPES name
    dropout: float = 0.0  # PEFT's lora_dropout


@dataclass(eq=False)
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


@dataclass(eq=False)
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


@dataclass(eq=False)
class InferAssumptions:
    dtype: DType  # compute dtype
    weights: str  # the weight format or storage, as shown
    weights_from: WeightOrigin
    weights_detail: str | None  # CONFIG: the quantization_config's source; STORED: the file or directory
    kv_dtype: KVDType | DType
    batch_size: int
    decoding: Decoding
    num_beams: int
    num_return_sequences: int
    sequences: int  # per prompt: beams or returned samples
    top_k: int | None
    top_p: float | None
    temperature: float
    prompt_len: int
    max_new_tokens: int
    context_len: int  # tokens cached per sequence
    prefill_logits: PrefillLogits
    prefill_chunk: int
    attention: Attention
    engine: Engine
    block_size: int | None  # paged engine only
    tp: int
    kv_cache_bytes_per_token: int
    kv_cache_bytes_per_sequence: int
    sliding_window: int | None
    sliding_layers: int
    attention_layers: int
    state_bytes_per_sequence: int
    overhead_bytes: int
    expandable_segments: bool = False
