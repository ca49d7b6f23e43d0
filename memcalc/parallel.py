"""The parallel layout of a training job and what one rank of it holds.

A layout is ``dp x tp x pp x cp`` GPUs. Expert parallelism (EP) does not add GPUs: as in
Megatron-LM (``megatron/core/parallel_state.py``), the EP group is carved out of the data- and
context-parallel ranks, so expert weights are replicated over ``dp * cp / ep`` ranks (the expert
data-parallel group) instead of ``dp * cp``. Expert weights are also split by TP (Megatron's
default expert tensor-parallel size equals TP).

Sources, per rule (docs/parallelism.md explains each):
- Tensor parallelism: Shoeybi et al. 2019, "Megatron-LM" (arXiv:1909.08053): column-parallel
  Q/K/V and MLP up/gate projections, row-parallel output and down projections (their biases are
  added after the all-reduce and stay whole), norms replicated, the embedding and output layer
  split by vocabulary with the vocabulary padded to a multiple of 128 x TP
  (``megatron/training/tokenizer``: ``make_vocab_size_divisible_by``).
- Pipeline parallelism: Narayanan et al. 2021 (arXiv:2104.04473), 1F1B and interleaved schedules;
  in-flight micro-batches per rank from ``megatron/core/pipeline_parallel/schedules.py``; uneven
  stages as Megatron-LM's ``--decoder-first/last-pipeline-num-layers``
  (``megatron/core/transformer/transformer_block.py``: ``get_num_layers_to_build``;
  ``transformer_layer.py``: ``get_transformer_layer_offset``).
- ZeRO stages: Rajbhandari et al. 2020 (arXiv:1910.02054), sec. 5; FSDP's sharding strategies map
  onto them (FULL_SHARD = 3, SHARD_GRAD_OP = 2, HYBRID_SHARD = 3 within a node).
- Distributed optimizer: Megatron-LM ``docs/user-guide/features/dist_optimizer.md``: the fp32
  master weights and moments are sharded over DP (x CP); parameters and gradients are not.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from enum import StrEnum
from typing import Annotated

from memcalc.config import (
    Attention,
    ModelConfig,
    NonNegativeInt,
    PositiveInt,
    _coerce_enums,
    _FORBID_EXTRA,
)
from memcalc.bounds import _Bound
from memcalc.errors import Field, SettingsError
from memcalc.estimate.inventory import MLPRole, Split, Tensor, build_inventory, layer_roles
from memcalc.estimate.params import ParamCategory, ParamInventory, TensorGroup, group_tensors

# Megatron-LM pads the vocabulary to a multiple of this times TP (--make-vocab-size-divisible-by).
VOCAB_PAD_MULTIPLE = 128
# Layers (FSDP units) whose parameters are gathered ahead of use: FSDP2's default prefetches the
# next unit in forward and backward; DeepSpeed's estimator (estimate_zero3_model_states_mem_needs)
# counts none.
DEFAULT_PREFETCH_UNITS = 1
DEFAULT_GPUS_PER_NODE = 8
# DeepSpeed's reduce_bucket_size default, in elements (deepspeed/runtime/zero/config.py: pp_int(5e8))
DEFAULT_REDUCE_BUCKET_SIZE = 500_000_000

ZeroStage = Annotated[int, _Bound(ge=0, le=3)]


class Offload(StrEnum):
    """ZeRO-Offload / ZeRO-Infinity (Ren et al. 2021, arXiv:2101.06840; Rajbhandari et al. 2021,
    arXiv:2104.07857): optimizer offload moves fp32 gradients, master weights and moments, and the
    optimizer step, to the CPU; parameter offload (ZeRO-3 only) moves the parameter shards too."""

    NONE = "none"
    OPTIMIZER = "optimizer"
    PARAMS = "params"
    BOTH = "both"


class TPImpl(StrEnum):
    """Whose tensor parallelism: they keep different tensors per rank (docs/parallelism.md sec. 5)."""

    MEGATRON = "megatron"  # Megatron-LM / Transformer Engine: Korthikanti et al. 2022 Table 2
    DTENSOR = "dtensor"  # PyTorch DTensor TP with torchtitan's plan (parallelize_module, loss_parallel)


class FSDPMode(StrEnum):
    """PyTorch FSDP sharding strategies, as ZeRO stages."""

    FULL = "full"  # FULL_SHARD: parameters, gradients and optimizer states (ZeRO-3)
    GRAD_OP = "grad-op"  # SHARD_GRAD_OP: gradients and optimizer states (ZeRO-2)
    HYBRID = "hybrid"  # HYBRID_SHARD: ZeRO-3 inside a node, replicated across nodes


class FSDPWrap(StrEnum):
    """Which modules are FSDP2 units (``fully_shard`` calls) beside the root (docs/parallelism.md)."""

    LAYER = "layer"  # each decoder layer; the root holds the embedding, final norm and head
    ENDS = "layer+embedding+head"  # torchtune's custom_sharded_layers: the embedding and head their own
    TORCHTITAN = "torchtitan"  # the embedding; the layers; [final norm, head] kept gathered after forward


FSDP_ZERO_STAGE = {FSDPMode.FULL: 3, FSDPMode.GRAD_OP: 2, FSDPMode.HYBRID: 3}


@dataclass(frozen=True, kw_only=True)
class Zero3Knobs:
    """DeepSpeed ZeRO-3's ``stage3_*`` keys that decide what is gathered (memcalc.estimate.zero3),
    in elements, with DeepSpeed's defaults (``deepspeed/runtime/zero/config.py``,
    ``DeepSpeedZeroConfig``: ``stage3_prefetch_bucket_size`` pp_int(5e7),
    ``stage3_param_persistence_threshold`` pp_int(1e5), ``stage3_max_live_parameters``
    pp_int(1e9), ``stage3_max_reuse_distance`` pp_int(1e9)): the elements prefetched per fetch,
    parameters of at most this many elements kept whole, the elements gathered at most before
    prefetching stops, and how far ahead (in elements of the module trace) a parameter used again
    stays gathered. The one declaration: the layout, the simulation and the DeepSpeed harness
    (memcalc.validate.deepspeed) carry this type."""

    __pydantic_config__ = _FORBID_EXTRA

    prefetch_bucket_size: NonNegativeInt = 50_000_000
    param_persistence_threshold: NonNegativeInt = 100_000
    max_live_parameters: NonNegativeInt = 1_000_000_000
    max_reuse_distance: NonNegativeInt = 1_000_000_000


@dataclass(frozen=True, kw_only=True)
class ParallelConfig:
    """A training layout. ``microbatches=None`` means enough to fill the pipeline (m >= pp)."""

    __pydantic_config__ = _FORBID_EXTRA

    dp: PositiveInt = 1
    tp: PositiveInt = 1
    pp: PositiveInt = 1
    cp: PositiveInt = 1
    ep: PositiveInt = 1
    sp: bool = False  # sequence parallelism (with TP): norms, dropout and block inputs split by TP
    zero: ZeroStage = 0
    shard_group: PositiveInt | None = None  # ranks a ZeRO stage shards over (hybrid: a node); default all
    distributed_optimizer: bool = False
    microbatches: PositiveInt | None = None
    vpp: PositiveInt = 1  # virtual pipeline stages (model chunks) per rank
    offload: Offload = Offload.NONE
    pad_vocab: bool | None = None  # Megatron's vocabulary padding; default: Megatron-style TP > 1
    prefetch: NonNegativeInt = DEFAULT_PREFETCH_UNITS  # ZeRO-3 units gathered ahead
    fsdp: bool = False  # sharded by PyTorch FSDP2 (fully_shard per layer and root) rather than DeepSpeed
    fsdp_wrap: FSDPWrap = FSDPWrap.LAYER  # FSDP2: which modules are units of their own
    tp_impl: TPImpl = TPImpl.MEGATRON
    # PyTorch DDP's gradient_as_bucket_view: the gradients are views into its buckets (default
    # False: the buckets are a second copy of the gradients)
    ddp_bucket_view: bool = False
    # DeepSpeed ZeRO-1/2 (deepspeed/runtime/zero/config.py, DeepSpeedZeroConfig): elements of each
    # gradient reduction buffer (reduce_bucket_size, default 5e8) and a second one with overlap_comm
    # (default False for stages 1 and 2)
    reduce_bucket_size: PositiveInt = DEFAULT_REDUCE_BUCKET_SIZE
    overlap_comm: bool = False
    # DeepSpeed ZeRO-3's stage3_* keys (memcalc.estimate.zero3)
    zero3: Zero3Knobs = Zero3Knobs()
    # Uneven pipeline stages (default: L / pp layers on every rank). Either every rank's layers,
    # in rank order, or Megatron's first/last counts with the rest split evenly over the others.
    pp_layers: tuple[int, ...] | None = None
    pp_first_layers: int | None = None  # Megatron --decoder-first-pipeline-num-layers
    pp_last_layers: int | None = None  # Megatron --decoder-last-pipeline-num-layers

    def __post_init__(self) -> None:
        _coerce_enums(self, offload=Offload, tp_impl=TPImpl, fsdp_wrap=FSDPWrap)
        for name in ("dp", "tp", "pp", "cp", "ep", "vpp"):
            if getattr(self, name) <= 0:
                raise SettingsError(Field(name), f" must be positive, got {getattr(self, name)}")
        if not 0 <= self.zero <= 3:
            raise SettingsError(Field("zero"), f": {self.zero} is not one of 0, 1, 2, 3")
        if self.fsdp_wrap is not FSDPWrap.LAYER and not (self.fsdp and self.zero == 3):
            raise SettingsError(Field("fsdp_wrap"), " chooses FSDP2's units: give ", Field("fsdp"), " full or hybrid")
        self._check_stage_counts()

    def _check_stage_counts(self) -> None:
        """What the uneven-stage fields can be checked for without the model (check_layout checks
        their sums against its layers)."""
        PPL, FIRST, LAST = Field("pp_layers"), Field("pp_first_layers"), Field("pp_last_layers")
        if self.pp_layers is not None:
            object.__setattr__(self, "pp_layers", tuple(self.pp_layers))  # a list from a file
            if self.pp_first_layers is not None or self.pp_last_layers is not None:
                raise SettingsError(PPL, " gives every rank's layers; drop ", FIRST, " and ", LAST)
            if len(self.pp_layers) != self.pp:
                raise SettingsError(PPL, f" lists {len(self.pp_layers)} pipeline ranks; ", Field("pp"),
                                    f" is {self.pp}")
            for rank, count in enumerate(self.pp_layers):
                if count <= 0:
                    raise SettingsError(PPL, f": pipeline rank {rank} gets {count} layers; every rank needs at least "
                                        "one")
            if self.vpp > 1:
                # Megatron has no per-rank list for interleaved chunks: an uneven interleaved layout is
                # its --pipeline-model-parallel-layout, which memcalc does not model
                raise SettingsError(PPL, " with ", Field("vpp"), f" {self.vpp}: uneven interleaved chunks are not "
                                    "modelled; give ", FIRST, " / ", LAST, " (Megatron's rule) instead")
        for field in (FIRST, LAST):
            count = getattr(self, field.name)
            if count is None:
                continue
            if count <= 0:
                raise SettingsError(field, f" must be positive, got {count}")
            if self.pp == 1:
                raise SettingsError(field, " needs ", Field("pp"), " > 1")
            if count % self.vpp:
                # TransformerConfig.__post_init__: each rank's layers split into vpp equal chunks
                raise SettingsError(field, f" {count} is not divisible by ", Field("vpp"), f" {self.vpp} (every "
                                    "rank's layers split into equal chunks)")

    @property
    def uneven_stages(self) -> bool:
        return self.pp_layers is not None or self.pp_first_layers is not None or self.pp_last_layers is not None

    @property
    def gpus(self) -> int:
        return self.dp * self.tp * self.pp * self.cp

    @property
    def data_ranks(self) -> int:
        """Ranks holding the same dense weights: data and context parallel (both reduce gradients)."""
        return self.dp * self.cp

    @property
    def dense_shards(self) -> int:
        """Ranks a ZeRO stage or the distributed optimizer shards dense state over."""
        return min(self.shard_group or self.data_ranks, self.data_ranks)

    @property
    def expert_shards(self) -> int:
        """Ranks sharing each expert's state: the expert data-parallel group."""
        return max(1, min(self.shard_group or self.data_ranks, self.data_ranks) // self.ep)

    @property
    def replicates_gradients(self) -> bool:
        """Plain data parallelism (ZeRO 0 without Megatron's distributed optimizer): every data
        rank all-reduces whole gradients, through PyTorch DDP's buckets."""
        return self.data_ranks > 1 and self.zero == 0 and not self.distributed_optimizer and not self.fsdp

    @property
    def deepspeed_buckets(self) -> bool:
        """DeepSpeed's ZeRO-1/2 optimizer (stage_1_and_2.py, DeepSpeedZeroOptimizer) reduces the
        gradients through its own buffers: ``--zero 1|2`` without FSDP, Megatron's distributed
        optimizer or optimizer offload (not modelled)."""
        return self.zero in (1, 2) and not self.fsdp and not self.distributed_optimizer and not self.offloads_optimizer

    @property
    def deepspeed_zero3(self) -> bool:
        """DeepSpeed's stage-3 optimizer (stage3.py, DeepSpeedZeroOptimizer_Stage3) over more than
        one rank, as measured (memcalc.estimate.zero3): ``--zero 3`` without FSDP, Megatron's
        distributed optimizer or offload (ZeRO-Offload/Infinity keep the estimator's rule)."""
        return (self.zero == 3 and not self.fsdp and not self.distributed_optimizer and self.offload is Offload.NONE
                and self.dense_shards > 1)

    @property
    def shards_optimizer(self) -> bool:
        return self.zero >= 1 or self.distributed_optimizer

    @property
    def shards_gradients(self) -> bool:
        return self.zero >= 2

    @property
    def shards_params(self) -> bool:
        return self.zero >= 3

    @property
    def offloads_optimizer(self) -> bool:
        return self.offload in (Offload.OPTIMIZER, Offload.BOTH)

    @property
    def offloads_params(self) -> bool:
        return self.offload in (Offload.PARAMS, Offload.BOTH)

    @property
    def vocab_padded(self) -> bool:
        if self.pad_vocab is None:  # Megatron pads; PyTorch's DTensor TP shards the vocabulary as it is
            return self.tp > 1 and self.tp_impl is TPImpl.MEGATRON
        return self.pad_vocab

    @property
    def is_single_device(self) -> bool:
        return self.gpus == 1 and self.offload is Offload.NONE and not self.vocab_padded

    def describe(self) -> str:
        parts = [f"dp={self.dp}", f"tp={self.tp}", f"pp={self.pp}"]
        parts += [f"{name}={getattr(self, name)}" for name in ("cp", "ep", "vpp") if getattr(self, name) > 1]
        if self.pp_layers is not None:
            parts.append("layers per stage " + ",".join(map(str, self.pp_layers)))
        for name, label in (("pp_first_layers", "first"), ("pp_last_layers", "last")):
            if getattr(self, name) is not None:
                parts.append(f"{label} stage {getattr(self, name)} layers")
        if self.sp:
            parts.append("sp")
        if self.zero:
            parts.append(f"zero={self.zero}")
        if self.distributed_optimizer:
            parts.append("distributed optimizer")
        if self.offload is not Offload.NONE:
            parts.append(f"offload={self.offload.value}")
        return ", ".join(parts)


def parse_stage_layers(value: str | tuple[int, ...] | list[int] | None) -> tuple[int, ...] | None:
    """``--pp-layers 15,16,16,15`` (or ``15/16/16/15``, for a ``--scenario`` string whose pairs
    commas separate) as a tuple; a tuple or list (a scenario file) as it is."""
    if value is None or not isinstance(value, str):
        return None if value is None else tuple(value)
    parts = value.replace("/", ",").replace(" ", ",").split(",")
    try:
        return tuple(int(part) for part in parts if part)
    except ValueError:
        raise SettingsError(Field("pp_layers"), f" {value!r} is not a list of layer counts, such as 15,16,16,15") \
            from None


def check_layout(model: ModelConfig, parallel: ParallelConfig, seq_len: int, attention: Attention,
                 gpus: int | None = None) -> None:
    """One ``SettingsError`` for the first degree that does not divide what it splits."""
    tp, pp, vpp = parallel.tp, parallel.pp, parallel.vpp

    def need(condition: bool, *message: str | Field) -> None:
        if not condition:
            raise SettingsError(*message)

    TP, PP, VPP, EP, CP = Field("tp"), Field("pp"), Field("vpp"), Field("ep"), Field("cp")
    if gpus is not None:
        need(gpus == parallel.gpus, Field("gpus"), f" {gpus} is not dp x tp x pp x cp = {parallel.dp} x {tp} x {pp} x "
             f"{parallel.cp} = {parallel.gpus}")
    need(model.num_attention_heads % tp == 0,
         TP, f" {tp} does not divide the {model.num_attention_heads} attention heads of {model.name}")
    need(model.kv_heads % tp == 0, TP, f" {tp} does not divide the {model.kv_heads} key/value heads of {model.name}")
    need(model.intermediate_size is None or model.intermediate_size % tp == 0,
         TP, f" {tp} does not divide the MLP width {model.intermediate_size} of {model.name}")
    if model.moe is not None:
        need(model.moe.expert_intermediate_size % tp == 0,
             TP, f" {tp} does not divide the expert width {model.moe.expert_intermediate_size} of {model.name}")
        shared = model.moe.shared_expert_intermediate_size
        need(not model.moe.num_shared_experts or shared is None or shared % tp == 0,
             TP, f" {tp} does not divide the shared-expert width {shared} of {model.name}")
    need(vpp == 1 or pp > 1, VPP, " needs ", PP, " > 1 (virtual stages interleave pipeline stages)")
    _check_stages(model, parallel)
    need(parallel.fsdp_wrap is FSDPWrap.LAYER or not model.tie_word_embeddings, Field("fsdp_wrap"),
         f" {parallel.fsdp_wrap.value} makes the embedding and the head units of their own, but {model.name} ties "
         "them: use layer")
    if parallel.ep > 1:
        need(model.moe is not None, EP, f" {parallel.ep} needs a mixture-of-experts model; {model.name} is dense")
        need(model.moe.num_experts % parallel.ep == 0,
             EP, f" {parallel.ep} does not divide the {model.moe.num_experts} experts of {model.name}")
        need(parallel.data_ranks % parallel.ep == 0,
             EP, f" {parallel.ep} does not divide dp x cp = {parallel.data_ranks} (expert parallelism splits the "
             "data-parallel ranks)")
    need(seq_len % parallel.cp == 0, CP, f" {parallel.cp} does not divide the sequence length {seq_len}")
    need(parallel.cp == 1 or attention is not Attention.EAGER,
         CP, " needs a fused attention kernel (", Field("attention"), " sdpa or flash): context parallelism is ring "
         "attention")
    if parallel.sp:
        need(tp > 1, Field("sp"), " needs ", TP, " > 1 (sequence parallelism splits along the tensor-parallel group)")
        need((seq_len // parallel.cp) % tp == 0, Field("sp"), ": ", TP, f" {tp} does not divide the sequence length "
             f"{seq_len // parallel.cp} each context-parallel rank holds")
    need(not (parallel.zero and parallel.distributed_optimizer),
         Field("distributed_optimizer"), " is Megatron's ZeRO-1; do not combine it with ", Field("zero"))
    need(not (parallel.zero > 1 and pp > 1),
         Field("zero"), f" {parallel.zero} with ", PP, f" {pp}: gradient and parameter sharding conflict with pipeline "
         "gradient accumulation (DeepSpeed allows ZeRO-1 with pipelines)")
    if parallel.offloads_optimizer:
        need(parallel.shards_optimizer and not parallel.distributed_optimizer,
             Field("offload"), " optimizer needs ", Field("zero"), " 1, 2 or 3 (ZeRO-Offload)")
    if parallel.offloads_params:
        need(parallel.zero == 3, Field("offload"), " params needs ", Field("zero"),
             " 3 (ZeRO-Infinity offloads parameter shards)")
    if parallel.microbatches is not None and vpp > 1:
        need(parallel.microbatches % pp == 0, Field("microbatches"), f" {parallel.microbatches} must be a multiple of ",
             PP, f" {pp} with ", VPP, " (interleaved schedule)")
    if parallel.shard_group is not None:
        need(parallel.data_ranks % parallel.shard_group == 0,
             f"the sharding group ({parallel.shard_group} ranks) does not divide dp x cp = {parallel.data_ranks}")


def _check_stages(model: ModelConfig, parallel: ParallelConfig) -> None:
    """The layers per pipeline rank must add up to the model's (Megatron-LM's checks in
    ``TransformerConfig.__post_init__`` for uneven stages)."""
    pp, vpp, layers = parallel.pp, parallel.vpp, model.num_layers
    PP, VPP, PPL = Field("pp"), Field("vpp"), Field("pp_layers")
    FIRST, LAST = Field("pp_first_layers"), Field("pp_last_layers")
    if parallel.pp_layers is not None:
        total = sum(parallel.pp_layers)
        if total != layers:
            raise SettingsError(PPL, f" {','.join(map(str, parallel.pp_layers))} adds up to {total} layers; "
                                f"{model.name} has {layers}")
        return
    ends = [(field, getattr(parallel, field.name)) for field in (FIRST, LAST)
            if getattr(parallel, field.name) is not None]
    if not ends:
        if layers % (pp * vpp):
            hint = ("; for uneven stages give ", PPL, f" (e.g. {','.join(map(str, balanced_stages(layers, pp)))}) or ",
                    FIRST, " / ", LAST) if vpp == 1 else ("; for uneven stages give ", FIRST, " / ", LAST)
            raise SettingsError(PP, f" {pp} x ", VPP, f" {vpp} = {pp * vpp} does not divide the {layers} layers of "
                                f"{model.name}", *hint)
        return
    given = sum(count for _field, count in ends)
    named = [part for field, count in ends for part in (field, f" {count}", " + ")][:-1]
    named.append(f" = {given} layers" if len(ends) == 2 else " layers")
    rest, middle = layers - given, pp - len(ends)
    if middle == 0:
        if rest:
            raise SettingsError(*named, f"; {model.name} has {layers} and no other rank takes the difference")
        return
    if rest <= 0:
        raise SettingsError(*named, f" leaves none of the {layers} of {model.name} for the other {middle} ranks")
    if rest % middle:
        raise SettingsError(*named, f" leaves {rest} for {middle} ranks, which Megatron splits only evenly; give "
                            "every rank's layers with ", PPL)
    if (rest // middle) % vpp:
        raise SettingsError(*named, f" leaves {rest // middle} per other rank, not divisible by ", VPP, f" {vpp}")


def balanced_stages(num_layers: int, pp: int) -> tuple[int, ...]:
    """``num_layers`` over ``pp`` ranks as evenly as possible, the extra layers on the middle ranks
    first (the ends also hold the embedding and the output layer)."""
    base, extra = divmod(num_layers, pp)
    order = list(range(1, pp - 1)) + [pp - 1, 0] if pp > 2 else list(range(pp))
    counts = [base] * pp
    for rank in order[:extra]:
        counts[rank] += 1
    return tuple(counts)


# --- What one pipeline rank holds ---------------------------------------------------------------


@dataclass(frozen=True)
class StageLayers:
    """Layers on one pipeline rank (all its virtual chunks) and the ends it owns."""

    rank: int
    dense_layers: int
    moe_layers: int
    first: bool  # holds the embedding
    last: bool  # holds the final norm, the output layer and the loss
    indices: tuple[int, ...] = ()  # the model's layer indices on this rank, in order

    @property
    def layers(self) -> int:
        return self.dense_layers + self.moe_layers


def stage_layer_counts(num_layers: int, parallel: ParallelConfig) -> tuple[int, ...]:
    """Layers on each pipeline rank, all its virtual chunks together.

    Megatron-LM ``get_num_layers_to_build`` (``megatron/core/transformer/transformer_block.py``):
    with ``--decoder-first-pipeline-num-layers`` and/or ``--decoder-last-pipeline-num-layers`` the
    first and/or last rank get those counts and the remaining layers are split evenly over the
    other ranks (``layers_to_distribute // pipeline_stages_left``); otherwise ``L / pp`` each."""
    pp = parallel.pp
    if parallel.pp_layers is not None:
        return parallel.pp_layers
    first, last = parallel.pp_first_layers, parallel.pp_last_layers
    if first is None and last is None:
        return (num_layers // pp,) * pp
    others = pp - (first is not None) - (last is not None)
    middle = (num_layers - (first or 0) - (last or 0)) // others if others else 0
    counts = [middle] * pp
    if first is not None:
        counts[0] = first
    if last is not None:
        counts[-1] = last
    return tuple(counts)


def _stage_indices(num_layers: int, parallel: ParallelConfig, rank: int) -> tuple[int, ...]:
    vpp = parallel.vpp
    chunks = [count // vpp for count in stage_layer_counts(num_layers, parallel)]
    per_round, start = sum(chunks), sum(chunks[:rank])
    return tuple(chunk * per_round + start + offset for chunk in range(vpp) for offset in range(chunks[rank]))


def stage_layers(model: ModelConfig, parallel: ParallelConfig, rank: int) -> StageLayers:
    """Rank ``r`` holds ``vpp`` chunks of ``n_r / vpp`` layers (``n_r`` its layers). Chunk ``c`` of
    rank ``r`` starts after chunk ``c`` of the ranks before it and every chunk ``c' < c``: Megatron's
    ``get_transformer_layer_offset`` (``transformer_layer.py``), ``vp_stage * total_virtual_chunks
    + first-rank chunk + middle_rank * middle chunk``. Evenly: chunks ``r, r + pp, ...`` of
    ``L / (pp vpp)`` layers."""
    indices = _stage_indices(model.num_layers, parallel, rank)
    roles = layer_roles(model)
    dense = sum(1 for index in indices if roles[index] is MLPRole.DENSE)
    return StageLayers(rank, dense, len(indices) - dense, first=rank == 0, last=rank == parallel.pp - 1,
                       indices=indices)


def pipeline_ranks(parallel: ParallelConfig, model: ModelConfig | None = None) -> list[int]:
    """The ranks whose memory is worked out: the first and the last stage and, given the model,
    the lowest middle rank of each kind of stage (its layers' kinds, in order) other than the
    first rank's. Among ranks with the same layers the lowest holds the most: under 1F1B rank
    ``r`` holds ``min(pp - r, m)`` micro-batches (fewer for later ranks, interleaved too), and
    the first rank also the embedding, against one received input per micro-batch on the
    others. With uneven stages (or MoE layers after dense ones) a middle rank can be the busiest."""
    pp = parallel.pp
    if pp == 1:
        return [0]
    if model is None or pp == 2:
        return [0, pp - 1]
    kinds_of_layers = tuple(zip(layer_roles(model), model.resolved_layer_types, strict=True))
    uniform = len(set(kinds_of_layers)) == 1
    if uniform and not parallel.uneven_stages:
        return [0, pp - 1]  # every stage alike

    def kinds(rank: int) -> tuple:
        indices = _stage_indices(model.num_layers, parallel, rank)
        return (len(indices),) if uniform else tuple(kinds_of_layers[index] for index in indices)

    seen = {kinds(0)}
    middles = []
    for rank in range(1, pp - 1):
        stage = kinds(rank)
        if stage not in seen:
            seen.add(stage)
            middles.append(rank)
    return [0, *middles, pp - 1]


def inflight_chunks(parallel: ParallelConfig, rank: int) -> int:
    """Model chunks whose activations rank ``rank`` holds at its peak, in units of one chunk of one
    micro-batch (Megatron-LM ``schedules.py``: warm-up micro-batches plus the one in 1F1B).

    1F1B: ``min(pp - rank, m)`` micro-batches of the whole stage; interleaved with ``v`` chunks:
    ``min(2 (pp - rank - 1) + (v - 1) pp + 1, m v)`` chunks. For rank 0 the interleaved count times
    ``L / (pp v)`` layers is ``L (1 + (pp - 1) / (pp v))``, Korthikanti et al. 2022 sec. 4.2.3."""
    pp, vpp = parallel.pp, parallel.vpp
    if pp == 1:
        return 1
    microbatches = parallel.microbatches if parallel.microbatches is not None else pp * vpp * pp
    if vpp == 1:
        return min(pp - rank, microbatches)
    return min(2 * (pp - rank - 1) + (vpp - 1) * pp + 1, microbatches * vpp)


def tensor_parallel_model(model: ModelConfig, tp: int, vocab_size: int | None = None) -> ModelConfig:
    """What one TP rank computes, as a model: query heads, MLP and expert widths and the vocabulary
    divided by ``tp``; key/value heads too, replicated when ``tp`` exceeds them (vLLM's
    ``get_num_kv_heads``: at least one per rank); the hidden size and norms whole."""
    if tp == 1 and vocab_size in (None, model.vocab_size):
        return model
    from dataclasses import replace

    moe = model.moe
    if moe is not None:
        shared = moe.shared_expert_intermediate_size or moe.expert_intermediate_size
        moe = replace(moe, expert_intermediate_size=moe.expert_intermediate_size // tp,
                      shared_expert_intermediate_size=max(1, shared // tp))
    return replace(
        model, num_attention_heads=model.num_attention_heads // tp, num_kv_heads=max(1, model.kv_heads // tp),
        head_dim=model.attention_head_dim, intermediate_size=model.intermediate_size and model.intermediate_size // tp,
        vocab_size=(vocab_size or model.vocab_size) // tp, moe=moe,
    )


def padded_vocab(model: ModelConfig, parallel: ParallelConfig) -> int:
    if not parallel.vocab_padded:
        return model.vocab_size
    multiple = VOCAB_PAD_MULTIPLE * parallel.tp
    return -(-model.vocab_size // multiple) * multiple


@dataclass(frozen=True)
class RankParams:
    """The parameter tensors one rank holds before any ZeRO sharding, as local tensor groups."""

    dense: ParamInventory  # replicated over the data-parallel (x CP) ranks
    experts: ParamInventory  # replicated over the expert data-parallel ranks

    @property
    def total(self) -> int:
        return self.dense.total + self.experts.total

    @property
    def groups(self) -> tuple[TensorGroup, ...]:
        return self.dense.groups + self.experts.groups


def _local_numel(tensor: Tensor, tp: int, vocab: int) -> int:
    """Elements of ``tensor`` on one TP rank: column- and row-parallel tensors split, the
    vocabulary rows of the embedding and head split after padding, the rest whole."""
    if tensor.split is Split.VOCAB:
        return vocab * tensor.numel // tensor.shape[0] // tp
    if tensor.split in (Split.COLUMN, Split.ROW):
        return tensor.numel // tp
    return tensor.numel


def _local_count(tensor: Tensor, ep: int) -> int:
    """Copies of ``tensor`` on one rank: a routed expert's divided by expert parallelism."""
    return tensor.count // ep if tensor.expert else tensor.count


def rank_params(model: ModelConfig, parallel: ParallelConfig, stage: StageLayers) -> RankParams:
    """Local tensors of one rank of pipeline stage ``stage`` (any TP, DP or CP rank holds the same):
    its layers' tensors from the inventory, TP-split by their role, routed experts divided by EP."""
    return _rank_params(model, parallel.tp, parallel.ep, padded_vocab(model, parallel), stage)


@lru_cache(maxsize=1024)  # the planner asks for the same rank's tensors for every sharding and batch
def _rank_params(model: ModelConfig, tp: int, ep: int, vocab: int, stage: StageLayers) -> RankParams:
    # a multimodal checkpoint's vision tower and projector run before the first layer, replicated
    tensors = list(build_inventory(model).tensors_in_order(stage.indices, first=stage.first, last=stage.last))

    def numel(tensor: Tensor) -> int:
        return _local_numel(tensor, tp, vocab)

    dense = group_tensors((t for t in tensors if not t.expert), numel)
    experts = group_tensors((t for t in tensors if t.expert), numel, lambda tensor: _local_count(tensor, ep))
    if model.tie_word_embeddings and stage.last and not stage.first:
        # Megatron keeps a copy of the tied embedding on the last stage for the output layer and
        # all-reduces the two copies' gradients (LanguageModule.setup_embeddings_and_output_layer).
        copy = TensorGroup("lm_head.weight (tied copy)", ParamCategory.OUTPUT_HEAD, vocab * model.hidden_size // tp, 1, 1)
        dense = ParamInventory(dense.groups + (copy,))
    return RankParams(dense, experts)


@dataclass(frozen=True)
class ShardingUnits:
    """The parameter groups ZeRO-3 gathers on one rank, in elements."""

    largest_layer: int  # one decoder layer (a unit in torchtitan's and torchtune's FSDP wrapping)
    ends: int  # everything outside the layers: embedding, position table, final norm, output layer
    largest_end: int  # the largest single tensor outside the layers (DeepSpeed's largest module)
    embedding: int = 0  # the embeddings (token and position tables) among the ends
    head: int = 0  # the output layer (an untied head) among the ends

    @property
    def largest(self) -> int:
        """DeepSpeed's largest module: a layer's or the embedding's own parameters."""
        return max(self.largest_layer, self.largest_end)


def sharding_units(model: ModelConfig, parallel: ParallelConfig, stage: StageLayers) -> ShardingUnits:
    tp, ep = parallel.tp, parallel.ep
    vocab = padded_vocab(model, parallel)
    inventory = build_inventory(model)

    def local(tensors) -> int:
        return sum(_local_numel(t, tp, vocab) * _local_count(t, ep) for t in tensors)

    largest_layer = max((local(inventory.layers[index].tensors) for index in stage.indices), default=0)
    params = rank_params(model, parallel, stage)
    ends = [group for group in params.groups if not group.name.startswith("layers.")]

    def total(category: ParamCategory) -> int:
        return sum(group.total for group in ends if group.category is category)

    return ShardingUnits(largest_layer, sum(group.total for group in ends), max((group.total for group in ends), default=0),
                         total(ParamCategory.EMBEDDING), total(ParamCategory.OUTPUT_HEAD))


def largest_unit_params(model: ModelConfig, parallel: ParallelConfig, stage: StageLayers) -> int:
    """Parameters of the largest unit DeepSpeed's ZeRO-3 gathers at once on this rank: one decoder
    layer, the embedding, or the output layer (``largest_layer_params``)."""
    return sharding_units(model, parallel, stage).largest
