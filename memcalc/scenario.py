"""A scenario: a parallel layout plus the training settings it changes, as ``memcalc train`` flags
and ``memcalc compare --scenario "tp=2,pp=2,zero=1"`` strings or YAML entries give it."""

from __future__ import annotations

from dataclasses import dataclass, fields, replace
from typing import Any

from memcalc.config import (
    ActivationModel,
    Attention,
    Loss,
    NonNegativeInt,
    Optimizer,
    PositiveInt,
    Recompute,
    TrainDType,
    TrainSettings,
    _coerce_enums,
    _FORBID_EXTRA,
)
from memcalc.errors import Field, InputError, SettingsError
from memcalc.parallel import (
    DEFAULT_GPUS_PER_NODE,
    DEFAULT_PREFETCH_UNITS,
    DEFAULT_REDUCE_BUCKET_SIZE,
    FSDP_ZERO_STAGE,
    FSDPMode,
    FSDPWrap,
    Offload,
    ParallelConfig,
    TPImpl,
    Zero3Knobs,
    ZeroStage,
    parse_stage_layers,
)


@dataclass(frozen=True, kw_only=True)
class Scenario:
    """Every field is optional: unset fields keep the command line's value."""

    __pydantic_config__ = _FORBID_EXTRA

    name: str | None = None
    gpus: PositiveInt | None = None
    dp: PositiveInt | None = None  # default: gpus / (tp x pp x cp), or 1
    tp: PositiveInt | None = None
    pp: PositiveInt | None = None
    cp: PositiveInt | None = None
    ep: PositiveInt | None = None
    sp: bool | None = None
    zero: ZeroStage | None = None
    fsdp: FSDPMode | None = None
    fsdp_wrap: FSDPWrap | None = None
    distributed_optimizer: bool | None = None
    microbatches: PositiveInt | None = None
    vpp: PositiveInt | None = None
    # uneven pipeline stages: every rank's layers (a list, or "15,16,16,15" / "15/16/16/15" as text)
    pp_layers: tuple[int, ...] | str | None = None
    pp_first_layers: int | None = None
    pp_last_layers: int | None = None
    offload: Offload | None = None
    pad_vocab: bool | None = None
    prefetch: NonNegativeInt | None = None
    gpus_per_node: PositiveInt | None = None
    tp_impl: TPImpl | None = None
    ddp_bucket_view: bool | None = None
    reduce_bucket_size: PositiveInt | None = None  # DeepSpeed ZeRO-1/2/3, elements
    overlap_comm: bool | None = None
    # DeepSpeed ZeRO-3's stage3_* keys (memcalc.parallel.Zero3Knobs), elements
    zero3_prefetch: PositiveInt | None = None
    zero3_max_live: PositiveInt | None = None
    zero3_reuse_distance: PositiveInt | None = None
    zero3_persistence: PositiveInt | None = None
    # training settings
    batch: PositiveInt | None = None
    seq: PositiveInt | None = None
    dtype: TrainDType | None = None
    precision: str | None = None
    optimizer: Optimizer | None = None
    recompute: Recompute | None = None
    recompute_layers: PositiveInt | None = None
    sac_save: str | None = None  # comma-separated, as --sac-save
    offload_activations: bool | None = None  # as --offload-activations
    attention: Attention | None = None
    loss: Loss | None = None
    activation_model: ActivationModel | None = None

    def __post_init__(self) -> None:
        _coerce_enums(self, fsdp=FSDPMode, fsdp_wrap=FSDPWrap, offload=Offload, tp_impl=TPImpl, dtype=TrainDType,
                      optimizer=Optimizer, recompute=Recompute, attention=Attention, loss=Loss,
                      activation_model=ActivationModel)

    def over(self, base: Scenario) -> Scenario:
        """This scenario's fields where set, ``base``'s elsewhere."""
        return replace(base, **{item.name: getattr(self, item.name) for item in fields(self)
                                if getattr(self, item.name) is not None})

    def label(self) -> str:
        if self.name:
            return self.name
        parts = [f"{item.name}={_text(getattr(self, item.name))}" for item in fields(self)
                 if item.name != "name" and getattr(self, item.name) is not None]
        return ",".join(parts) or "single GPU"


def _text(value: Any) -> str:
    if isinstance(value, bool):
        return str(value).lower()
    return str(getattr(value, "value", value))


# scenario key (and train flag) -> the Zero3Knobs field it sets
ZERO3_KEYS = {"zero3_prefetch": "prefetch_bucket_size", "zero3_max_live": "max_live_parameters",
              "zero3_reuse_distance": "max_reuse_distance", "zero3_persistence": "param_persistence_threshold"}


def parallel_config(scenario: Scenario) -> ParallelConfig:
    """The layout a scenario describes; ``dp`` follows from ``gpus`` when only the GPUs are given."""
    tp, pp, cp = scenario.tp or 1, scenario.pp or 1, scenario.cp or 1
    dp = scenario.dp
    if dp is None:
        if scenario.gpus is None:
            dp = 1
        elif scenario.gpus % (tp * pp * cp):
            raise SettingsError(Field("gpus"), f" {scenario.gpus} is not divisible by tp x pp x cp = {tp} x {pp} x {cp}")
        else:
            dp = scenario.gpus // (tp * pp * cp)
    elif scenario.gpus is not None and scenario.gpus != dp * tp * pp * cp:
        raise SettingsError(Field("gpus"), f" {scenario.gpus} is not dp x tp x pp x cp = {dp} x {tp} x {pp} x {cp} = "
                            f"{dp * tp * pp * cp}")
    zero, shard_group = scenario.zero or 0, None
    if scenario.fsdp is not None:
        implied = FSDP_ZERO_STAGE[scenario.fsdp]
        if scenario.zero is not None and scenario.zero != implied:
            raise SettingsError(Field("fsdp"), f" {scenario.fsdp.value} is ZeRO stage {implied}; it contradicts ",
                                Field("zero"), f" {scenario.zero}")
        zero = implied
        if scenario.fsdp is FSDPMode.HYBRID:
            # HYBRID_SHARD shards inside a node (its data-parallel ranks) and replicates across nodes
            per_node = max(1, (scenario.gpus_per_node or DEFAULT_GPUS_PER_NODE) // (tp * cp))
            shard_group = min(per_node, dp * cp)
    layout = ParallelConfig(
        dp=dp, tp=tp, pp=pp, cp=cp, ep=scenario.ep or 1, sp=bool(scenario.sp), zero=zero, shard_group=shard_group,
        distributed_optimizer=bool(scenario.distributed_optimizer), microbatches=scenario.microbatches,
        vpp=scenario.vpp or 1, offload=scenario.offload or Offload.NONE, pad_vocab=scenario.pad_vocab,
        prefetch=DEFAULT_PREFETCH_UNITS if scenario.prefetch is None else scenario.prefetch,
        fsdp=scenario.fsdp is not None, fsdp_wrap=scenario.fsdp_wrap or FSDPWrap.LAYER,
        tp_impl=scenario.tp_impl or TPImpl.MEGATRON,
        pp_layers=parse_stage_layers(scenario.pp_layers), pp_first_layers=scenario.pp_first_layers,
        pp_last_layers=scenario.pp_last_layers, ddp_bucket_view=bool(scenario.ddp_bucket_view),
        reduce_bucket_size=(DEFAULT_REDUCE_BUCKET_SIZE if scenario.reduce_bucket_size is None
                            else scenario.reduce_bucket_size),
        overlap_comm=bool(scenario.overlap_comm),
        zero3=Zero3Knobs(**{knob: getattr(scenario, name) for name, knob in ZERO3_KEYS.items()
                            if getattr(scenario, name) is not None}),
    )
    for name in ZERO3_KEYS:
        if getattr(scenario, name) is not None and not layout.deepspeed_zero3:
            raise SettingsError(Field(name), " sets a DeepSpeed ZeRO-3 stage3_* key: give ", Field("zero"),
                                " 3 over more than one rank without ", Field("fsdp"),
                                ", the distributed optimizer or offload")
    if scenario.reduce_bucket_size is not None and not (layout.deepspeed_buckets or layout.deepspeed_zero3):
        raise SettingsError(Field("reduce_bucket_size"), " sizes DeepSpeed ZeRO's gradient reduction buffer: give ",
                            Field("zero"), " 1, 2 or 3 without ", Field("fsdp"),
                            ", the distributed optimizer or offload")
    for name, given in (("overlap_comm", bool(scenario.overlap_comm)),):
        if given and not layout.deepspeed_buckets:
            raise SettingsError(Field(name), " sizes DeepSpeed ZeRO-1/2's reduction buffers: give ", Field("zero"),
                                " 1 or 2 without ", Field("fsdp"), ", the distributed optimizer or optimizer offload")
    return layout


def train_settings(scenario: Scenario, base: TrainSettings) -> TrainSettings:
    """``base`` with the scenario's training settings applied."""
    changes = {
        "batch_size": scenario.batch, "seq_len": scenario.seq, "dtype": scenario.dtype,
        "precision": scenario.precision, "optimizer": scenario.optimizer, "recompute": scenario.recompute,
        "recompute_layers": scenario.recompute_layers, "sac_save": scenario.sac_save,
        "offload_activations": scenario.offload_activations,
        "attention": scenario.attention, "loss": scenario.loss, "activation_model": scenario.activation_model,
    }
    return replace(base, **{key: value for key, value in changes.items() if value is not None})


SCENARIO_KEYS = tuple(item.name for item in fields(Scenario))


def parse_scenario(text: str, source: str = "--scenario") -> Scenario:
    """``"tp=2,pp=2,zero=1"`` (or ``;`` between pairs); values are validated by pydantic."""
    from memcalc.config import parse

    pairs: dict[str, str] = {}
    for item in text.replace(";", ",").split(","):
        if not item.strip():
            continue
        key, sep, value = item.partition("=")
        key = key.strip().replace("-", "_")
        if not sep or not value:
            raise InputError(f"{source} {text!r}: {item!r} is not key=value")
        if key not in SCENARIO_KEYS:
            import difflib

            close = difflib.get_close_matches(key, SCENARIO_KEYS, n=1)
            hint = f" (did you mean {close[0]}?)" if close else ""
            raise InputError(f"{source} {text!r}: unknown key {key!r}{hint}; keys: {', '.join(SCENARIO_KEYS)}")
        pairs[key] = value.strip()
    return parse(Scenario, pairs, f"{source} {text!r}")


def read_scenarios(path: str) -> list[Scenario]:
    """A YAML file: a list of mappings with Scenario keys (or ``{scenarios: [...]}``)."""
    from pathlib import Path

    from memcalc.config import parse
    from memcalc.library import read_yaml

    file = Path(path)
    if not file.is_file():
        raise InputError(f"--file: {path} does not exist")
    data = read_yaml(file)
    if isinstance(data, dict) and "scenarios" in data:
        data = data["scenarios"]
    if not isinstance(data, list) or not data:
        raise InputError(f"{path}: expected a non-empty list of scenarios (mappings such as {{tp: 2, zero: 1}})")
    scenarios = []
    for index, entry in enumerate(data):
        if not isinstance(entry, dict):
            raise InputError(f"{path}: scenario {index + 1} is not a mapping")
        entry = {str(key).replace("-", "_"): value for key, value in entry.items()}
        scenarios.append(parse(Scenario, entry, f"{path}: scenario {index + 1}"))
    return scenarios
