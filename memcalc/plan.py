"""The layout planner: every valid training layout for N GPUs, the ones that fit, ranked by an
estimated step time (docs/plan.md states every formula and its source).

Three pieces:

- :func:`enumerate_layouts` yields every valid layout: ``dp x tp x pp x cp = gpus`` (EP carved
  out of ``dp x cp`` for MoE models), a sharding option (ZeRO stage 0-3 or Megatron's
  distributed optimizer, optionally with ZeRO-Offload), a recompute mode, a micro-batch size and,
  under pipelining, a number of virtual stages. Validity is :func:`memcalc.parallel.check_layout`
  plus the batch arithmetic ``global_batch = dp x micro_batch x microbatches``.
- :class:`StepTimeModel` estimates the time of one optimizer step of a layout: model FLOPs
  (6 N + 12 L H Q s per token, PaLM appendix B) x the recompute factor over the GPU's peak dense
  throughput at an assumed efficiency, the pipeline bubble (Narayanan et al. 2021), and the
  communication of each parallel dimension over intra- or inter-node bandwidth.
- :func:`plan` keeps the layouts whose most loaded rank fits in ``(1 - headroom)`` of the GPU,
  ranks them by step time and explains, per ``(tp, pp)`` family, why the others do not fit.

There is one memory estimator: every memory figure the planner reports comes from
:func:`memcalc.estimate.training.estimate_training`. The search only decides *which* layouts to
estimate: it walks the layouts fastest first and skips the ones that monotone bounds already rule
out (docs/plan.md sec. 4).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from typing import NamedTuple

from memcalc.config import ModelConfig, Recompute, TrainSettings
from memcalc.dtypes import BITS_PER_ELEMENT
from memcalc.errors import Field, InputError, SettingsError
from memcalc.estimate.breakdown import Estimate
from memcalc.estimate.params import count_params
from memcalc.gpus import GPUSpec
from memcalc.parallel import DEFAULT_GPUS_PER_NODE, Offload, ParallelConfig, TPImpl, check_layout

GIB = 2**30

# --- Assumptions of the step-time model (docs/plan.md sec. 2) -----------------------------------

# Fraction of the GPU's peak dense BF16 throughput that the compute kernels sustain on the FLOPs a
# step executes (recomputation included), before pipeline bubbles and exposed communication: the
# hardware FLOPs utilisation of the compute alone. Large dense runs report 52-69 % of peak counted
# this way end to end: Narayanan et al. 2021 (163 TFLOP/s of 312 on A100 for the 1T model, with
# recompute), PaLM (Chowdhery et al. 2022, Table 3: 57.8 % HFU), MosaicML's MPT-70B on 64 H100
# (56.8 % HFU), torchtitan's Llama 3 70B on 64 A100 (51.7 % MFU with full recompute: 69 % HFU).
# docs/plan.md sec. 3 shows the error on the published runs for 0.4 ... 0.6.
DEFAULT_MFU = 0.6
# Inter-node bandwidth per GPU and direction when the catalogue has none: one 400 Gb/s
# InfiniBand NDR (ConnectX-7) adapter per GPU, as in DGX H100 / HGX rail-optimised clusters.
DEFAULT_INTER_NODE_GBPS = 50.0
# Host link per GPU and direction for ZeRO-Offload traffic: PCIe 4.0 x16 (32 GB/s nominal).
DEFAULT_HOST_GBPS = 32.0
# Fraction of the data-parallel communication (gradient reduction, ZeRO parameter gathers) that
# runs beside compute: DDP buckets, ZeRO/FSDP prefetching and Megatron's --overlap-grad-reduce
# overlap it with backward (and forward) by default; what exceeds the compute time stays exposed.
# Tensor-, context-, expert- and pipeline-parallel communication is always exposed.
DEFAULT_OVERLAP = 1.0
# Host memory one GPU's offloaded state may take: 2 TiB per 8-GPU node (DGX H100's 2 TB).
DEFAULT_HOST_MEMORY_PER_GPU = 256 * 2**30
DEFAULT_HEADROOM = 0.10
DEFAULT_TOP_K = 10


# --- Layouts -----------------------------------------------------------------------------------


class Sharding(NamedTuple):
    """How optimizer state, gradients and parameters are sharded over the data-parallel ranks."""

    zero: int
    distributed_optimizer: bool
    offload: str  # an Offload value

    @property
    def label(self) -> str:
        base = "dist-opt" if self.distributed_optimizer else ("ddp" if self.zero == 0 else f"zero{self.zero}")
        if self.offload == Offload.OPTIMIZER:
            return f"{base}+offload-opt"
        if self.offload == Offload.BOTH:
            return f"{base}+offload-all"
        if self.offload == Offload.PARAMS:
            return f"{base}+offload-params"
        return base


DDP = Sharding(0, False, Offload.NONE.value)
_RECOMPUTE_LEVEL = {Recompute.FULL: 0, Recompute.SELECTIVE: 1, Recompute.NONE: 2}  # memory order
# the modes the planner searches (per-op checkpointing has no FLOP model here yet)
PLANNED_RECOMPUTE = (Recompute.NONE, Recompute.SELECTIVE, Recompute.FULL)


# The ParallelConfig fields a planned layout chooses, under ParallelConfig's names: a Layout is a
# view of ParallelConfig (plus the recompute and micro-batch the search also varies), kept a
# NamedTuple because the search hashes and copies hundreds of thousands of them.
PLANNED_FIELDS = ("dp", "tp", "pp", "cp", "ep", "vpp", "sp", "zero", "distributed_optimizer", "offload", "microbatches")


class Layout(NamedTuple):
    """One training layout: degrees, sharding, recompute, micro-batching."""

    dp: int
    tp: int
    pp: int
    cp: int
    ep: int
    vpp: int
    sp: bool
    zero: int
    distributed_optimizer: bool
    offload: str  # an Offload value
    recompute: Recompute
    micro_batch: int  # sequences per micro-batch per data-parallel rank
    microbatches: int  # micro-batches per step per data-parallel rank (global_batch / (dp x micro_batch))

    @property
    def gpus(self) -> int:
        return self.dp * self.tp * self.pp * self.cp

    @property
    def sharding(self) -> Sharding:
        return Sharding(self.zero, self.distributed_optimizer, self.offload)

    @property
    def group(self) -> tuple[int, int]:
        """The group rejections are reported by: ``(tp, pp)``."""
        return self.tp, self.pp

    def parallel_config(self, *, fsdp: bool = False, tp_impl: TPImpl | str = TPImpl.MEGATRON) -> ParallelConfig:
        """The :class:`ParallelConfig` ``estimate_training`` takes. ``fsdp`` marks ZeRO-3 as PyTorch
        FSDP2 (its own working-set rule) rather than DeepSpeed."""
        return ParallelConfig(**{name: getattr(self, name) for name in PLANNED_FIELDS},
                              fsdp=fsdp and self.zero >= 2, tp_impl=TPImpl(tp_impl))

    def train_settings(self, base: TrainSettings, seq_len: int) -> TrainSettings:
        return replace(base, batch_size=self.micro_batch, seq_len=seq_len, recompute=self.recompute)

    def describe(self) -> str:
        parts = [f"dp={self.dp}", f"tp={self.tp}", f"pp={self.pp}"]
        parts += [f"{name}={getattr(self, name)}" for name in ("cp", "ep", "vpp") if getattr(self, name) > 1]
        if self.sp:
            parts.append("sp")
        parts += [self.sharding.label, f"recompute={self.recompute.value}",
                  f"mbs={self.micro_batch}", f"m={self.microbatches}"]
        return " ".join(parts)


def _divisors(n: int) -> list[int]:
    small = [d for d in range(1, math.isqrt(n) + 1) if n % d == 0]
    return sorted(set(small + [n // d for d in small]))


def sharding_options(pp: int, data_ranks: int, *, offload: bool = True) -> list[Sharding]:
    """ZeRO stages 0-3 and Megatron's distributed optimizer (ZeRO-2/3 only without pipelining,
    as DeepSpeed allows), with optimizer offload (ZeRO-1/2/3) and parameter + optimizer offload
    (ZeRO-3). Over a single data-parallel rank sharding changes nothing, so only the offloading
    options are kept beside plain DDP."""
    options = [DDP]
    stages = (1, 2, 3) if pp == 1 else (1,)
    if data_ranks > 1:
        options += [Sharding(stage, False, Offload.NONE.value) for stage in stages]
        options.append(Sharding(0, True, Offload.NONE.value))
    if offload:
        options += [Sharding(stage, False, Offload.OPTIMIZER.value) for stage in (stages if data_ranks > 1 else (1,))]
        if pp == 1:
            options.append(Sharding(3, False, Offload.BOTH.value))
    return options


@dataclass(frozen=True)
class Family:
    """Layouts sharing their degrees: ``(tp, pp, cp, ep)`` and so ``dp``."""

    dp: int
    tp: int
    pp: int
    cp: int
    ep: int
    sp: bool


@dataclass
class _Enumeration:
    families: list[Family]
    layouts: dict[Family, list[Layout]]
    options: dict[Family, list[Sharding]]  # the sharding options each family's layouts use
    considered: int  # degree combinations tried, valid or not
    invalid: dict[tuple[int, int], str]  # (tp, pp) whose every degree combination is invalid: why


def _enumerate(model: ModelConfig, gpus: int, *, seq_len: int, global_batch: int, settings: TrainSettings,
               gpus_per_node: int, recompute: Sequence[Recompute], offload: bool, try_no_sp: bool,
               tp: Iterable[int] | None, pp: Iterable[int] | None, cp: Iterable[int] | None,
               micro_batch: Iterable[int] | None, max_vpp: int | None,
               sharding: Iterable[Sharding] | None) -> _Enumeration:
    if gpus <= 0 or global_batch <= 0 or seq_len <= 0:
        raise InputError(f"gpus ({gpus}), global batch ({global_batch}) and sequence length ({seq_len}) must be positive")
    attention = settings.attention
    divisors = _divisors(gpus)
    tp_values = [t for t in divisors if t <= gpus_per_node] if tp is None else sorted(set(tp))
    pp_values = divisors if pp is None else sorted(set(pp))
    cp_values = divisors if cp is None else sorted(set(cp))
    mbs_filter = None if micro_batch is None else set(micro_batch)
    sharding_filter = None if sharding is None else set(sharding)
    recompute = [Recompute(value) for value in recompute]
    # a model whose activations were measured in fewer settings (the recurrent stacks: no or full
    # recompute, data-parallel layouts) is searched over those only
    allowed = [r for r in recompute if _model_refusal(model, replace(settings, recompute=r), ParallelConfig()) is None]
    if recompute and not allowed:
        raise InputError(_model_refusal(model, replace(settings, recompute=recompute[0]), ParallelConfig()))
    recompute = allowed
    moe = model.moe
    families: list[Family] = []
    layouts: dict[Family, list[Layout]] = {}
    family_options: dict[Family, list[Sharding]] = {}
    considered = 0
    reasons: dict[tuple[int, int], str] = {}
    valid_pairs: set[tuple[int, int]] = set()
    checked_sharding: dict[tuple[bool, Sharding], bool] = {}

    pipeline_probe = next((d for d in _divisors(model.num_layers) if d > 1), 1)

    def sharding_ok(option: Sharding, pipelined: bool) -> bool:
        """The sharding rules of check_layout (they depend on pp > 1 only), checked once per option."""
        key = (pipelined, option)
        if key not in checked_sharding:
            probe = ParallelConfig(dp=2, pp=pipeline_probe if pipelined else 1, zero=option.zero,
                                   distributed_optimizer=option.distributed_optimizer, offload=Offload(option.offload))
            try:
                check_layout(model, probe, seq_len, attention)
                checked_sharding[key] = True
            except InputError:
                checked_sharding[key] = False
        return checked_sharding[key]

    for t in tp_values:
        for p in pp_values:
            for c in cp_values:
                if gpus % (t * p * c):
                    continue
                d = gpus // (t * p * c)
                sp_values = [True, False] if (t > 1 and try_no_sp) else [t > 1]
                ep_values = [1]
                if moe is not None:
                    ep_values = [e for e in _divisors(d * c) if moe.num_experts % e == 0]
                for e in ep_values:
                    for s in sp_values:
                        considered += 1
                        probe = ParallelConfig(dp=d, tp=t, pp=p, cp=c, ep=e, sp=s)
                        try:
                            check_layout(model, probe, seq_len, attention, gpus)
                            if t > gpus_per_node:
                                raise InputError(f"tp={t} spans more than the {gpus_per_node} GPUs of a node")
                            if global_batch % d:
                                raise InputError(f"the global batch {global_batch} is not divisible by dp={d}")
                        except InputError as error:
                            reasons.setdefault((t, p), str(error))
                            continue
                        refusal = _model_refusal(model, replace(settings, recompute=recompute[0]), probe)
                        if refusal is not None:
                            reasons.setdefault((t, p), refusal)
                            continue
                        family = Family(d, t, p, c, e, s)
                        members, options = _family_layouts(
                            family, model, global_batch=global_batch, recompute=recompute, offload=offload,
                            mbs_filter=mbs_filter, max_vpp=max_vpp, sharding_filter=sharding_filter,
                            sharding_ok=sharding_ok)
                        if not members:
                            reasons.setdefault((t, p), f"tp={t} pp={p} cp={c}: no micro-batch/sharding option allowed")
                            continue
                        valid_pairs.add((t, p))
                        families.append(family)
                        layouts[family] = members
                        family_options[family] = options
    invalid = {pair: reason for pair, reason in reasons.items() if pair not in valid_pairs}
    return _Enumeration(families, layouts, family_options, considered, invalid)


def _model_refusal(model: ModelConfig, settings: TrainSettings, parallel: ParallelConfig) -> str | None:
    """Why ``estimate_training`` refuses the model's activations under ``settings`` and ``parallel``
    (memcalc.estimate.training.check_mamba_training), or None."""
    from memcalc.estimate.training import check_mamba_training, resolve_recipe

    try:
        check_mamba_training(model, settings, parallel, resolve_recipe(settings, parallel))
    except InputError as error:
        return str(error)
    return None


def _family_layouts(family: Family, model: ModelConfig, *, global_batch: int, recompute: Sequence[Recompute],
                    offload: bool, mbs_filter: set[int] | None, max_vpp: int | None,
                    sharding_filter: set[Sharding] | None, sharding_ok) -> tuple[list[Layout], list[Sharding]]:
    d, t, p, c, e, s = family.dp, family.tp, family.pp, family.cp, family.ep, family.sp
    local_batch = global_batch // d
    options = [option for option in sharding_options(p, d * c, offload=offload) if sharding_ok(option, p > 1)]
    if sharding_filter is not None:
        options = [option for option in options if option in sharding_filter]
    vpp_all = [v for v in _divisors(model.num_layers // p) if v > 1 and (max_vpp is None or v <= max_vpp)] if p > 1 else []
    out: list[Layout] = []
    for b in _divisors(local_batch):
        if mbs_filter is not None and b not in mbs_filter:
            continue
        m = local_batch // b
        vpps = [1] + (vpp_all if m % p == 0 else [])
        for v in vpps:
            for option in options:
                for r in recompute:
                    out.append(Layout(d, t, p, c, e, v, s, option.zero, option.distributed_optimizer, option.offload,
                                      r, b, m))
    return out, options


def enumerate_layouts(model: ModelConfig, gpus: int, *, seq_len: int, global_batch: int,
                      gpus_per_node: int = DEFAULT_GPUS_PER_NODE, settings: TrainSettings | None = None,
                      recompute: Sequence[Recompute | str] = PLANNED_RECOMPUTE, offload: bool = True,
                      try_no_sp: bool = False, tp: Iterable[int] | None = None, pp: Iterable[int] | None = None,
                      cp: Iterable[int] | None = None, micro_batch: Iterable[int] | None = None,
                      max_vpp: int | None = None, sharding: Iterable[Sharding] | None = None) -> Iterator[Layout]:
    """Every valid layout of ``gpus`` GPUs for ``global_batch`` sequences of ``seq_len`` tokens.

    Degrees: ``dp x tp x pp x cp = gpus``; ``tp <= gpus_per_node`` and dividing the heads, key/value
    heads and MLP widths; ``pp x vpp`` dividing the layers; ``cp`` dividing the sequence; EP (MoE
    models) dividing ``dp x cp`` and the experts. SP is on whenever ``tp > 1`` (it saves memory at
    the same communication volume); ``try_no_sp`` adds the variants without it. Per family: every
    sharding option of :func:`sharding_options`, every recompute mode, every micro-batch size
    dividing ``global_batch / dp`` (``microbatches = global_batch / (dp x micro_batch)``), and
    ``vpp > 1`` when ``pp > 1`` and the micro-batches are a multiple of ``pp``. The keyword filters
    (``tp``, ``pp``, ``cp``, ``micro_batch``, ``max_vpp``, ``sharding``) narrow the search."""
    enumeration = _enumerate(model, gpus, seq_len=seq_len, global_batch=global_batch,
                             settings=settings or TrainSettings(), gpus_per_node=gpus_per_node,
                             recompute=[Recompute(value) for value in recompute], offload=offload,
                             try_no_sp=try_no_sp, tp=tp, pp=pp, cp=cp, micro_batch=micro_batch, max_vpp=max_vpp,
                             sharding=sharding)
    for family in enumeration.families:
        yield from enumeration.layouts[family]


# --- Step time -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class StepTime:
    """Seconds of one optimizer step on the busiest rank, by cause."""

    compute: float  # FLOPs executed (recompute included) at the assumed efficiency
    bubble: float  # pipeline idle time: (p - 1) / v micro-batch slots
    tensor_parallel: float  # TP all-reduces (or SP all-gathers + reduce-scatters), exposed
    context_parallel: float  # ring exchange of keys and values, exposed
    expert_parallel: float  # token all-to-alls of the MoE layers, exposed
    pipeline_send: float  # activations and their gradients between stages, exposed
    data_parallel: float  # gradient reduction and ZeRO gathers, before overlap
    data_parallel_exposed: float  # the part not hidden behind compute
    offload: float  # host <-> GPU copies of ZeRO-Offload, exposed
    total: float
    tokens_per_s: float
    mfu: float  # achieved: model FLOPs (no recompute) / (total x GPUs x peak)

    @property
    def communication(self) -> float:
        """Communication time before any overlap."""
        return (self.tensor_parallel + self.context_parallel + self.expert_parallel + self.pipeline_send
                + self.data_parallel + self.offload)


def _element_bytes(dtype) -> int:
    return BITS_PER_ELEMENT[dtype] // 8


class _FamilyTerms(NamedTuple):
    """Seconds per sequence of a micro-batch on one rank (everything per micro-batch is linear in
    the micro-batch size), by recompute mode, for one (dp, tp, pp, cp, ep, sp) and precision."""

    compute: dict  # Recompute -> seconds of compute per sequence
    exposed: dict  # Recompute -> compute + TP + CP + EP seconds per sequence
    tensor_parallel: dict
    context_parallel: dict
    expert_parallel: dict
    pipeline_send: float  # per sequence and virtual chunk


class _ShardingTerms(NamedTuple):
    """Data-parallel and offload seconds: a part per micro-batch and a part per step."""

    dp_per_microbatch: float
    dp_per_step: float
    offload_per_microbatch: float
    offload_per_step: float


class StepTimeModel:
    """The step time of a layout of ``model`` on ``gpu`` (docs/plan.md sec. 2).

    Compute: ``F_hw x tokens / (gpus x peak x mfu)`` with per-token FLOPs ``F = 6 N + 12 L H Q s``
    (PaLM, Chowdhery et al. 2022 appendix B: N the matmul parameters a token passes through, H Q
    the attention width, s the attended span); full recompute adds one forward of the layers
    (``2 N_layers + 4 L H Q s``, the 4/3 factor of Narayanan et al. 2021 on the layers), selective
    recompute the attention-score forward (``4 L H Q s``, Korthikanti et al. 2022).
    Pipeline: ``(m + (p - 1) / v)`` micro-batch slots of one rank's per-micro-batch time (Narayanan
    et al. 2021 sec. 2.2: bubble fraction ``(p - 1) / (v m)`` of the ideal time).
    Communication per rank, ring algorithms (``2 (n-1)/n`` bytes per all-reduce, ``(n-1)/n`` per
    all-gather or reduce-scatter), ranks placed tp innermost, then cp, dp, pp: a group whose
    ranks share a node uses the catalogue's NVLink bandwidth (half the bidirectional figure), else
    ``inter_node_gbps``."""

    def __init__(self, model: ModelConfig, gpu: GPUSpec, *, seq_len: int, global_batch: int,
                 settings: TrainSettings | None = None, mfu: float = DEFAULT_MFU,
                 overlap: float = DEFAULT_OVERLAP, gpus_per_node: int = DEFAULT_GPUS_PER_NODE,
                 inter_node_gbps: float | None = None, intra_node_gbps: float | None = None,
                 host_gbps: float = DEFAULT_HOST_GBPS) -> None:
        if not 0 < mfu <= 1:
            raise SettingsError(Field("mfu"), f" must be in (0, 1], got {mfu}")
        if not 0 <= overlap <= 1:
            raise SettingsError(Field("overlap"), f" must be in [0, 1], got {overlap}")
        self.model, self.gpu, self.seq_len, self.global_batch = model, gpu, seq_len, global_batch
        self.settings = settings or TrainSettings()
        self.mfu, self.overlap, self.gpus_per_node = mfu, overlap, gpus_per_node
        self.peak = gpu.bf16_dense_tflops * 1e12
        # the catalogue gives NVLink as a bidirectional total per GPU; a ring sends one way per link
        self.intra_bw = (intra_node_gbps if intra_node_gbps is not None else gpu.intra_node_gbps / 2) * 1e9
        self.inter_bw = (inter_node_gbps if inter_node_gbps is not None else DEFAULT_INTER_NODE_GBPS) * 1e9
        self.host_bw = host_gbps * 1e9

        params = count_params(model)
        h = model.hidden_size
        embed = sum(g.active for g in params.groups if g.name in ("embed_tokens.weight", "embed_positions.weight"))
        head = model.vocab_size * h
        # matmul parameters per token: a tied embedding still multiplies as the output layer
        self.matmul_params = params.active - embed + (head if model.tie_word_embeddings else 0)
        self.layer_params = self.matmul_params - head
        self.expert_params = sum(g.total for g in params.groups if g.name.startswith("layers.moe.experts."))
        self.dense_params = params.total - self.expert_params
        if model.mla is not None:
            width = model.num_attention_heads * (model.mla.qk_head_dim + model.mla.v_head_dim) / 2
        else:
            width = model.num_attention_heads * model.attention_head_dim
        sliding = model.num_sliding_layers
        span = (model.num_layers - sliding) * seq_len + sliding * min(seq_len, model.sliding_window or seq_len)
        self.attention_forward = 4 * width * span  # per token, all layers: QK^T and AV, 2 FLOPs per MAC
        self.model_flops_per_token = 6 * self.matmul_params + 3 * self.attention_forward
        self.recompute_flops = {
            Recompute.NONE: 0.0,
            Recompute.SELECTIVE: float(self.attention_forward),
            Recompute.FULL: 2.0 * self.layer_params + self.attention_forward,
        }
        self.kv_width = model.kv_heads * model.attention_head_dim
        if model.mla is not None:  # a context-parallel ring passes the expanded keys and values
            self.kv_width = model.num_attention_heads * (model.mla.qk_head_dim + model.mla.v_head_dim) / 2
        self._bytes: dict[tuple[int, bool], tuple[int, int, int]] = {}
        self._family: dict[tuple, _FamilyTerms] = {}
        self._sharding: dict[tuple, _ShardingTerms] = {}

    def _bandwidth(self, stride: int, size: int) -> float:
        """Bytes/s of a group of ``size`` ranks ``stride`` apart in the rank order."""
        return self.intra_bw if stride * size <= self.gpus_per_node else self.inter_bw

    def _dtype_bytes(self, zero: int, distributed_optimizer: bool) -> tuple[int, int, int]:
        """(weight, gradient, activation) bytes per element of the precision recipe."""
        key = (zero, distributed_optimizer)
        if key not in self._bytes:
            from memcalc.estimate.training import resolve_recipe

            probe = ParallelConfig(dp=2, zero=zero, distributed_optimizer=distributed_optimizer)
            recipe = resolve_recipe(self.settings, probe)
            self._bytes[key] = (_element_bytes(recipe.weight_dtype), _element_bytes(recipe.grad_dtype),
                                _element_bytes(recipe.activation_dtype))
        return self._bytes[key]

    def _family_terms(self, layout: Layout) -> _FamilyTerms:
        d, t, p, c, ep, sp = layout.dp, layout.tp, layout.pp, layout.cp, layout.ep, layout.sp
        e_bytes = self._dtype_bytes(layout.zero, layout.distributed_optimizer)[2]
        key = (d, t, p, c, ep, sp, e_bytes)
        terms = self._family.get(key)
        if terms is not None:
            return terms
        model = self.model
        layers = model.num_layers / p
        tokens = self.seq_len / c  # tokens of one sequence a CP rank holds
        stream = tokens * model.hidden_size * e_bytes  # one s x h activation of one sequence
        compute, exposed, tp_time, cp_time, ep_time = {}, {}, {}, {}, {}
        for recompute, extra in self.recompute_flops.items():
            full = recompute is Recompute.FULL
            flops = (self.model_flops_per_token + extra) * self.seq_len / (t * c * p)
            compute[recompute] = flops / (self.peak * self.mfu)
            # TP: 2 all-reduces forward, 2 backward per layer (Megatron's f and g); SP swaps each
            # for an all-gather + reduce-scatter of the same volume; full recompute repeats the forward's
            tp_time[recompute] = 0.0
            if t > 1:
                tp_time[recompute] = (6 if full else 4) * layers * 2 * (t - 1) / t * stream / self._bandwidth(1, t)
            # CP ring: forward passes K and V c - 1 times; backward passes K, V and dK, dV
            cp_time[recompute] = 0.0
            if c > 1:
                kv = 2 * tokens * self.kv_width / min(t, model.kv_heads) * e_bytes
                cp_time[recompute] = (4 if full else 3) * (c - 1) * layers * kv / self._bandwidth(t, c)
            # EP: dispatch and combine all-to-alls forward and backward, of the routed token copies
            ep_time[recompute] = 0.0
            if ep > 1 and model.moe is not None:
                routed = tokens * model.moe.experts_per_token * model.hidden_size * e_bytes
                ep_time[recompute] = ((6 if full else 4) * model.num_moe_layers / p * (ep - 1) / ep * routed
                                      / self._bandwidth(t, ep))
            exposed[recompute] = compute[recompute] + tp_time[recompute] + cp_time[recompute] + ep_time[recompute]
        # PP: a rank receives an activation forward and a gradient backward per chunk; SP sends 1/t
        pipeline_send = 2 * stream / (t if sp else 1) / self._bandwidth(t * c * d, p) if p > 1 else 0.0
        terms = _FamilyTerms(compute, exposed, tp_time, cp_time, ep_time, pipeline_send)
        self._family[key] = terms
        return terms

    def _sharding_terms(self, layout: Layout) -> _ShardingTerms:
        d, t, p, c, ep = layout.dp, layout.tp, layout.pp, layout.cp, layout.ep
        key = (d, t, p, c, ep, layout.zero, layout.distributed_optimizer, layout.offload)
        terms = self._sharding.get(key)
        if terms is not None:
            return terms
        w_bytes, g_bytes, _ = self._dtype_bytes(layout.zero, layout.distributed_optimizer)
        data_ranks = d * c
        dense = self.dense_params / (t * p)
        experts = self.expert_params / (t * p * ep)
        # elements each rank sends per reduce-scatter or all-gather over the dp x cp ranks (experts:
        # the dp x cp / ep ranks holding the same experts)
        shards = (data_ranks - 1) / data_ranks * dense
        if experts:
            expert_ranks = max(1, data_ranks // ep)
            shards += (expert_ranks - 1) / expert_ranks * experts
        if layout.zero == 3:  # ZeRO paper sec. 7: gather for forward and backward, reduce-scatter grads
            per_microbatch, per_step = shards * (2 * w_bytes + g_bytes), 0.0
        elif layout.zero == 2:  # gradients reduce-scattered as each micro-batch's backward frees them
            per_microbatch, per_step = shards * g_bytes, shards * w_bytes
        elif layout.zero == 1 or layout.distributed_optimizer:  # reduce-scatter grads, gather params
            per_microbatch, per_step = 0.0, shards * (g_bytes + w_bytes)
        else:  # DDP all-reduce
            per_microbatch, per_step = 0.0, 2 * shards * g_bytes
        bandwidth = self._bandwidth(t, data_ranks)
        dp_mb, dp_step = (per_microbatch / bandwidth, per_step / bandwidth) if data_ranks > 1 else (0.0, 0.0)
        off_mb = off_step = 0.0
        if layout.offload != Offload.NONE.value:
            # ZeRO-Offload: gradient shards down (each micro-batch under ZeRO-2/3), updated
            # parameters up, and the CPU Adam step's memory traffic (read fp32 param, grad, two
            # moments; write param and moments: 28 B per parameter) charged at the same host rate
            shard = (dense + experts) / data_ranks
            off_step = shard * (w_bytes + 28) / self.host_bw
            grads = shard * g_bytes / self.host_bw
            if layout.zero >= 2:
                off_mb += grads
            else:
                off_step += grads
            if layout.offload in (Offload.PARAMS.value, Offload.BOTH.value):
                off_mb += 2 * shard * w_bytes / self.host_bw  # parameter shards for forward and backward
        terms = _ShardingTerms(dp_mb, dp_step, off_mb, off_step)
        self._sharding[key] = terms
        return terms

    def total(self, layout: Layout) -> tuple[float, float]:
        """(step seconds, communication seconds before overlap): what the ranking needs."""
        f = self._family_terms(layout)
        g = self._sharding_terms(layout)
        b, m, v = layout.micro_batch, layout.microbatches, layout.vpp
        r = layout.recompute
        slot = b * (f.exposed[r] + v * f.pipeline_send)
        dp = g.dp_per_microbatch * m + g.dp_per_step
        offload = g.offload_per_microbatch * m + g.offload_per_step
        compute = b * m * f.compute[r]
        total = slot * (m + (layout.pp - 1) / v) + dp - min(self.overlap * dp, compute) + offload
        communication = slot * m - compute + dp + offload
        return total, communication

    def step_time(self, layout: Layout) -> StepTime:
        f = self._family_terms(layout)
        g = self._sharding_terms(layout)
        b, m, v = layout.micro_batch, layout.microbatches, layout.vpp
        r = layout.recompute
        slot = b * (f.exposed[r] + v * f.pipeline_send)
        bubble_slots = (layout.pp - 1) / v
        compute = b * m * f.compute[r]
        dp = g.dp_per_microbatch * m + g.dp_per_step
        dp_exposed = dp - min(self.overlap * dp, compute)
        offload = g.offload_per_microbatch * m + g.offload_per_step
        total = slot * (m + bubble_slots) + dp_exposed + offload
        tokens = self.global_batch * self.seq_len
        return StepTime(
            compute=compute, bubble=slot * bubble_slots, tensor_parallel=b * m * f.tensor_parallel[r],
            context_parallel=b * m * f.context_parallel[r], expert_parallel=b * m * f.expert_parallel[r],
            pipeline_send=b * m * v * f.pipeline_send, data_parallel=dp, data_parallel_exposed=dp_exposed,
            offload=offload, total=total, tokens_per_s=tokens / total,
            mfu=self.model_flops_per_token * tokens / (total * layout.gpus * self.peak),
        )


# --- The plan ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class RankedLayout:
    """A layout with its memory (from ``estimate_training``) and its estimated step time."""

    layout: Layout
    parallel: ParallelConfig
    settings: TrainSettings
    estimate: Estimate
    step: StepTime
    fits: bool

    @property
    def memory_bytes(self) -> int:
        """GPU memory of the most loaded rank."""
        return self.estimate.total

    @property
    def host_bytes(self) -> int:
        """Host memory of one rank's offloaded state."""
        return self.estimate.cpu_total

    @property
    def step_time_s(self) -> float:
        return self.step.total

    @property
    def tokens_per_s(self) -> float:
        return self.step.tokens_per_s

    @property
    def mfu(self) -> float:
        return self.step.mfu


@dataclass(frozen=True)
class Rejection:
    """A ``(tp, pp)`` family none of whose layouts fits, or none of whose degrees is valid."""

    tp: int
    pp: int
    reason: str  # one line, e.g. "tp=1 pp=1: needs 143.2 GiB/GPU at best (...) > 72.0 GiB usable"
    best_bytes: int | None = None  # GPU memory of the leanest layout on the GPU, when one was estimated
    best_layout: Layout | None = None


@dataclass(frozen=True)
class PlanCounts:
    considered: int  # degree combinations tried (tp, pp, cp, ep, sp), valid or not
    valid: int  # valid layouts enumerated: each got a step time
    estimated: int  # estimate_training calls
    fitting: int  # layouts confirmed to fit by estimate_training
    not_fitting: int  # layouts that do not fit: estimated, or ruled out by a monotone bound
    unresolved: int  # slower than the top-k (or a slower variant of a listed layout): never estimated


@dataclass(frozen=True)
class PlanResult:
    model: ModelConfig
    gpu: GPUSpec
    gpus: int
    seq_len: int
    global_batch: int
    headroom: float
    limit_bytes: int  # (1 - headroom) x GPU memory: the most a rank may hold
    host_limit_bytes: int  # host memory one rank's offloaded state may take
    top: tuple[RankedLayout, ...]  # fastest first
    rejected: tuple[Rejection, ...]  # (tp, pp) families with valid layouts, none of which fits
    invalid: tuple[Rejection, ...]  # (tp, pp) pairs with no valid layout at all (check_layout's reason)
    counts: PlanCounts
    assumptions: dict = field(default_factory=dict)

    @property
    def best(self) -> RankedLayout | None:
        return self.top[0] if self.top else None

    @property
    def fits(self) -> bool:
        return bool(self.top)


# Memory order of the sharding options of one family, leanest first (on the GPU).
_PRIORITY_FLAT = [Sharding(3, False, "both"), Sharding(3, False, "optimizer"), Sharding(3, False, "none"),
                  Sharding(2, False, "optimizer"), Sharding(2, False, "none"), Sharding(1, False, "optimizer"),
                  Sharding(1, False, "none"), Sharding(0, True, "none"), DDP]
_PRIORITY_PIPELINE = [Sharding(1, False, "optimizer"), Sharding(1, False, "none"), Sharding(0, True, "none"), DDP]
_ALL, _ON_GPU = "all", "on-gpu"  # failure records that apply to every sharding / every one without offload


def _lean(options: Iterable[Sharding], pp: int, on_gpu: bool) -> Sharding | None:
    """The leanest of ``options`` (without offload when ``on_gpu``)."""
    available = set(options)
    for option in _PRIORITY_FLAT if pp == 1 else _PRIORITY_PIPELINE:
        if option in available and (not on_gpu or option.offload == Offload.NONE.value):
            return option
    return None


def _leans(options: Iterable[Sharding], pp: int, on_gpu: bool, fsdp: bool) -> list[Sharding]:
    """The leanest options of each chain whose memory order holds. DeepSpeed's ZeRO-3 (zero 3
    without FSDP) keeps buffers of fixed size (the reduce bucket, the prefetch bucket, the
    persistent parameters: memcalc.estimate.zero3) that can outweigh what it shards beyond ZeRO-2 on
    a small model or few ranks, so it heads a chain of its own; FSDP's ZeRO-3 stays the leanest."""
    options = list(options)
    if fsdp or pp != 1:
        lean = _lean(options, pp, on_gpu)
        return [] if lean is None else [lean]
    chains = ([o for o in options if o.zero == 3], [o for o in options if o.zero != 3])
    return [lean for lean in (_lean(chain, pp, on_gpu) for chain in chains) if lean is not None]


class _Search:
    """Memory checks, with monotone pruning, one family at a time (docs/plan.md sec. 4)."""

    def __init__(self, model: ModelConfig, base: TrainSettings, seq_len: int, limit: int, host_limit: int, *,
                 fsdp: bool, tp_impl: TPImpl) -> None:
        self.model, self.base, self.seq_len = model, base, seq_len
        self.limit, self.host_limit = limit, host_limit
        self.fsdp, self.tp_impl = fsdp, tp_impl
        self.memo: dict[Layout, tuple[ParallelConfig, TrainSettings, Estimate]] = {}
        # per family: (scope: _ALL, _ON_GPU or a Sharding; vpp or None for every vpp; recompute
        # level; micro-batch; whether that micro-batch was the whole local batch)
        self.failures: dict[Family, list[tuple[object, int | None, int, int, bool]]] = {}
        self.host_failures: set[tuple[Family, Sharding]] = set()
        self.calls = 0

    def estimate(self, layout: Layout) -> tuple[ParallelConfig, TrainSettings, Estimate]:
        if layout not in self.memo:
            from memcalc.estimate.training import estimate_training

            parallel = layout.parallel_config(fsdp=self.fsdp, tp_impl=self.tp_impl)
            settings = layout.train_settings(self.base, self.seq_len)
            self.calls += 1
            self.memo[layout] = (parallel, settings, estimate_training(self.model, settings, parallel))
        return self.memo[layout]

    def gpu_fits(self, layout: Layout) -> bool:
        return self.estimate(layout)[2].total <= self.limit

    def host_fits(self, layout: Layout) -> bool:
        return self.estimate(layout)[2].cpu_total <= self.host_limit

    def record(self, family: Family, layout: Layout, scope: object) -> None:
        self.failures.setdefault(family, []).append((
            scope, None if layout.vpp == 1 else layout.vpp, _RECOMPUTE_LEVEL[layout.recompute],
            layout.micro_batch, layout.microbatches == 1,
        ))

    def known_failure(self, family: Family, layout: Layout) -> bool:
        """Memory grows with the micro-batch (among layouts that accumulate, m > 1), with less
        recompute, with interleaving (v > 1 holds at least the v = 1 activations) and with less
        sharding than the leanest option: a failure at a smaller or equal point rules these out."""
        if (family, layout.sharding) in self.host_failures:
            return True
        level = _RECOMPUTE_LEVEL[layout.recompute]
        for scope, vpp, f_level, f_mbs, f_single in self.failures.get(family, ()):
            if scope == _ON_GPU:
                if layout.offload != Offload.NONE.value:
                    continue
            elif scope != _ALL and scope != layout.sharding:
                continue
            if vpp is not None and vpp != layout.vpp:
                continue
            if level < f_level or layout.micro_batch < f_mbs:
                continue
            if layout.microbatches == 1 and not f_single:
                continue  # without accumulation gradients are not persistent: not comparable
            return True
        return False

    def _scope(self, family: Family, layout: Layout, options: list[Sharding]) -> object:
        """What a GPU failure of ``layout`` rules out beyond itself: every sharding (every one without
        offload) when it is the one leanest option of its family; else its own."""
        for on_gpu, scope in ((False, _ALL), (True, _ON_GPU)):
            if _leans(options, family.pp, on_gpu, self.fsdp) == [layout.sharding]:
                return scope
        return layout.sharding

    def check(self, family: Family, layout: Layout, options: list[Sharding]) -> bool:
        """Whether ``layout`` fits, by estimate_training; failures feed the pruning."""
        if not self.gpu_fits(layout):
            self.record(family, layout, self._scope(family, layout, options))
            # do the leaner shardings fail at the same point too? then they rule out more: where
            # two chains have no common order, only when the leanest of each fails
            for on_gpu in (True, False):
                leans = _leans(options, family.pp, on_gpu, self.fsdp)
                if not leans or (on_gpu and layout.offload != Offload.NONE.value):
                    continue
                failed = 0
                for lean in leans:
                    probe = layout._replace(zero=lean.zero, distributed_optimizer=lean.distributed_optimizer,
                                            offload=lean.offload, vpp=1)
                    if probe == layout or self.known_failure(family, probe) or not self.gpu_fits(probe):
                        failed += 1
                        if probe != layout:
                            self.record(family, probe, probe.sharding)
                if failed < len(leans):
                    break
                self.record(family, layout._replace(vpp=1), _ALL if not on_gpu else _ON_GPU)
            return False
        if not self.host_fits(layout):
            self.host_failures.add((family, layout.sharding))  # host memory does not depend on the batch
            return False
        return True

    def floors(self, family: Family, members: list[Layout], options: list[Sharding]) -> list[Layout]:
        """The family's leanest layouts: full recompute (or the most allowed), no interleaving, the
        smallest micro-batch and, where it differs, the whole local batch in one micro-batch (no
        accumulation: gradients need not persist), each with the leanest sharding without offload,
        with optimizer offload and with every offload allowed."""
        def key(x: Layout) -> tuple:
            return x.vpp, _RECOMPUTE_LEVEL[x.recompute], x.micro_batch

        bases = [min(members, key=key)]
        single = [x for x in members if x.microbatches == 1]
        if single and bases[0].microbatches != 1:
            bases.append(min(single, key=key))
        candidates: list[Sharding | None] = list(_leans(options, family.pp, True, self.fsdp))
        if family.pp == 1:
            candidates += [Sharding(3, False, "optimizer"), Sharding(2, False, "optimizer"), Sharding(1, False, "optimizer")]
        else:
            candidates += [Sharding(1, False, "optimizer")]
        candidates += _leans(options, family.pp, False, self.fsdp)
        chosen: list[Sharding] = []
        for option in candidates:
            if option is None or option not in options or option in chosen:
                continue
            if option.offload == "optimizer" and any(o.offload == "optimizer" for o in chosen):
                continue  # one optimizer-offload floor: the most sharded one
            chosen.append(option)
        return [base._replace(zero=option.zero, distributed_optimizer=option.distributed_optimizer,
                              offload=option.offload) for base in bases for option in chosen]

    def verdict(self, family: Family, members: list[Layout], options: list[Sharding]) -> tuple[bool, list[Layout]]:
        """Whether some floor of the family fits (GPU and host), and the floors estimated."""
        tried = []
        for floor in self.floors(family, members, options):
            tried.append(floor)
            if self.check(family, floor, options):
                return True, tried
        return False, tried


def plan(model: ModelConfig, gpu: GPUSpec, gpus: int, *, seq_len: int, global_batch: int,
         headroom: float = DEFAULT_HEADROOM, top_k: int = DEFAULT_TOP_K, settings: TrainSettings | None = None,
         gpus_per_node: int = DEFAULT_GPUS_PER_NODE, mfu: float = DEFAULT_MFU, overlap: float = DEFAULT_OVERLAP,
         inter_node_gbps: float | None = None, intra_node_gbps: float | None = None,
         host_gbps: float = DEFAULT_HOST_GBPS, host_memory_bytes: int | None = None, fsdp: bool = False,
         tp_impl: TPImpl | str = TPImpl.MEGATRON, recompute: Sequence[Recompute | str] = PLANNED_RECOMPUTE,
         offload: bool = True, try_no_sp: bool = False, tp: Iterable[int] | None = None,
         pp: Iterable[int] | None = None, cp: Iterable[int] | None = None, micro_batch: Iterable[int] | None = None,
         max_vpp: int | None = None, sharding: Iterable[Sharding] | None = None, distinct: bool = True) -> PlanResult:
    """The ``top_k`` fastest layouts of ``gpus`` GPUs whose most loaded rank fits in
    ``(1 - headroom) x gpu.usable_memory_bytes`` (the capacity CUDA reports) (and whose offloaded state fits in ``host_memory_bytes``
    per GPU), and why each ``(tp, pp)`` family that has none fails.

    ``settings`` carries everything but the batch, sequence and recompute (precision, optimizer,
    attention kernel, loss, activation model). ``fsdp`` models ZeRO-2/3 as PyTorch FSDP2 rather
    than DeepSpeed. ``distinct`` lists one layout (the fastest; ties: the least communication, then
    the fewest micro-batches) among those differing only in micro-batch size, virtual stages or
    recompute mode (the slower variants hold no more memory but are slower: dominated).
    The other keywords are the step-time model's (:class:`StepTimeModel`) and the enumeration's
    filters (:func:`enumerate_layouts`)."""
    if not 0 <= headroom < 1:
        raise SettingsError(Field("headroom"), f" must be in [0, 1), got {headroom}")
    if top_k <= 0:
        raise SettingsError(Field("top_k"), f" must be positive, got {top_k}")
    base = settings or TrainSettings()
    tp_impl = TPImpl(tp_impl)
    recompute = [Recompute(value) for value in recompute]
    enumeration = _enumerate(model, gpus, seq_len=seq_len, global_batch=global_batch, settings=base,
                             gpus_per_node=gpus_per_node, recompute=recompute, offload=offload, try_no_sp=try_no_sp,
                             tp=tp, pp=pp, cp=cp, micro_batch=micro_batch, max_vpp=max_vpp, sharding=sharding)
    timer = StepTimeModel(model, gpu, seq_len=seq_len, global_batch=global_batch, settings=base, mfu=mfu,
                          overlap=overlap, gpus_per_node=gpus_per_node, inter_node_gbps=inter_node_gbps,
                          intra_node_gbps=intra_node_gbps, host_gbps=host_gbps)
    limit = int((1 - headroom) * gpu.usable_memory_bytes)
    host_limit = host_memory_bytes if host_memory_bytes is not None else DEFAULT_HOST_MEMORY_PER_GPU
    search = _Search(model, base, seq_len, limit, host_limit, fsdp=fsdp, tp_impl=tp_impl)
    options = enumeration.options

    # 1. every layout's step time; order: fastest, then least communication, then fewest micro-batches
    rows: list[tuple[float, float, int, int]] = []
    index: list[tuple[Layout, Family]] = []
    total = timer.total
    for family in enumeration.families:
        for layout in enumeration.layouts[family]:
            seconds, communication = total(layout)
            rows.append((seconds, communication, layout.microbatches, len(index)))
            index.append((layout, family))
    rows.sort()

    # 2. walk fastest first until top_k distinct layouts fit; a family's floors are estimated at
    #    its first failure (if its leanest layouts do not fit, none does)
    top: list[RankedLayout] = []
    seen_shapes: set[Layout] = set()
    judged: dict[Family, bool] = {}
    fitting = not_fitting = repeats = visited = 0
    for row in rows:
        if len(top) >= top_k:
            break
        visited += 1
        layout, family = index[row[3]]
        shape = layout._replace(micro_batch=0, microbatches=0, vpp=0, recompute=Recompute.NONE)
        if distinct and shape in seen_shapes:
            repeats += 1  # a faster variant of this layout is already listed
            continue
        if search.known_failure(family, layout):
            not_fitting += 1
            continue
        if not search.check(family, layout, options[family]):
            not_fitting += 1
            if family not in judged:
                judged[family] = search.verdict(family, enumeration.layouts[family], options[family])[0]
            continue
        fitting += 1
        judged.setdefault(family, True)
        seen_shapes.add(shape)
        parallel, train, estimate = search.estimate(layout)
        top.append(RankedLayout(layout, parallel, train, estimate, timer.step_time(layout), True))

    # 3. (tp, pp) families none of whose layouts fits: the floors of every family in the group,
    #    the family with the largest cp x ep (the least memory) first
    rejected: list[Rejection] = []
    by_pair: dict[tuple[int, int], list[Family]] = {}
    for family in enumeration.families:
        by_pair.setdefault((family.tp, family.pp), []).append(family)
    for (t, p), families in sorted(by_pair.items()):
        families = sorted(families, key=lambda f: (-f.cp * f.ep, -f.cp, f.sp is False))
        if any(judged.get(family) for family in families):
            continue
        floors: list[Layout] = []
        feasible = False
        for family in families:
            if family not in judged:
                judged[family], tried = search.verdict(family, enumeration.layouts[family], options[family])
            else:
                tried = search.floors(family, enumeration.layouts[family], options[family])
            floors += tried
            if judged[family]:
                feasible = True
                break
        if feasible:
            continue
        rejected.append(_rejection(t, p, floors, search, limit, host_limit))
    invalid = tuple(Rejection(t, p, f"tp={t} pp={p}: {reason}") for (t, p), reason in sorted(enumeration.invalid.items()))

    unreached = [index[row[3]][1] for row in rows[visited:]]
    hopeless = sum(1 for family in unreached if judged.get(family) is False)
    counts = PlanCounts(considered=enumeration.considered, valid=len(rows), estimated=search.calls, fitting=fitting,
                        not_fitting=not_fitting + hopeless, unresolved=len(unreached) - hopeless + repeats)
    assumptions = {
        "mfu": mfu, "overlap": overlap, "gpus_per_node": gpus_per_node,
        "intra_node_gbps": timer.intra_bw / 1e9, "inter_node_gbps": timer.inter_bw / 1e9,
        "host_gbps": host_gbps, "host_memory_bytes": host_limit, "peak_tflops": gpu.bf16_dense_tflops,
        "fsdp": fsdp, "tp_impl": tp_impl.value, "model_flops_per_token": timer.model_flops_per_token,
    }
    return PlanResult(model, gpu, gpus, seq_len, global_batch, headroom, limit, host_limit, tuple(top),
                      tuple(rejected), invalid, counts, assumptions)


def _rejection(tp: int, pp: int, floors: list[Layout], search: _Search, limit: int, host_limit: int) -> Rejection:
    """Why nothing in a (tp, pp) family fits, with the numbers of its leanest layouts."""
    estimates = [(layout, search.estimate(layout)[2]) for layout in floors]
    within_host = [(layout, e) for layout, e in estimates if e.cpu_total <= host_limit]
    pool = within_host or estimates
    layout, estimate = min(pool, key=lambda item: item[1].total)
    reason = (f"tp={tp} pp={pp}: needs {estimate.total / GIB:.1f} GiB/GPU at best ({layout.describe()}) "
              f"> {limit / GIB:.1f} GiB usable")
    if estimate.total <= limit:  # fits the GPU only by offloading more than the host holds
        reason = (f"tp={tp} pp={pp}: fits the GPU only by offloading {estimate.cpu_total / GIB:.1f} GiB/GPU to the "
                  f"host ({layout.describe()}) > {host_limit / GIB:.1f} GiB host memory per GPU")
    elif not within_host:
        reason += f"; offloading needs more than {host_limit / GIB:.1f} GiB host memory per GPU"
    else:
        offloaded = [(l, e) for l, e in estimates if e.cpu_total > host_limit]
        if offloaded:
            lean_layout, lean = min(offloaded, key=lambda item: item[1].total)
            reason += (f"; offloading ({lean_layout.sharding.label}) would need {lean.total / GIB:.1f} GiB/GPU and "
                       f"{lean.cpu_total / GIB:.1f} GiB host/GPU > {host_limit / GIB:.1f}")
    return Rejection(tp, pp, reason, estimate.total, layout)


def evaluate(model: ModelConfig, gpu: GPUSpec, layout: Layout, *, seq_len: int, global_batch: int,
             headroom: float = DEFAULT_HEADROOM, settings: TrainSettings | None = None,
             host_memory_bytes: int | None = None, fsdp: bool = False, tp_impl: TPImpl | str = TPImpl.MEGATRON,
             **timing) -> RankedLayout:
    """One layout's memory (``estimate_training``) and step time, as the planner ranks it.
    ``timing``: the :class:`StepTimeModel` keywords (mfu, overlap, gpus_per_node, bandwidths)."""
    base = settings or TrainSettings()
    if layout.dp * layout.micro_batch * layout.microbatches != global_batch:
        raise InputError(f"dp x micro-batch x micro-batches = {layout.dp} x {layout.micro_batch} x "
                         f"{layout.microbatches} is not the global batch {global_batch}")
    from memcalc.estimate.training import estimate_training

    parallel = layout.parallel_config(fsdp=fsdp, tp_impl=tp_impl)
    train = layout.train_settings(base, seq_len)
    estimate = estimate_training(model, train, parallel)
    step = StepTimeModel(model, gpu, seq_len=seq_len, global_batch=global_batch, settings=base, **timing).step_time(layout)
    host_limit = host_memory_bytes if host_memory_bytes is not None else DEFAULT_HOST_MEMORY_PER_GPU
    fits = estimate.total <= int((1 - headroom) * gpu.usable_memory_bytes) and estimate.cpu_total <= host_limit
    return RankedLayout(layout, parallel, train, estimate, step, fits)
