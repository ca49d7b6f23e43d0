"""``memcalc sweep``: one training estimate per value of a swept variable (sequence length, batch,
GPUs), through the same estimator as ``memcalc train``."""

from __future__ import annotations

import re
from dataclasses import dataclass, replace

from memcalc.config import ModelConfig, TrainSettings
from memcalc.errors import InputError
from memcalc.estimate.breakdown import Estimate
from memcalc.scenario import Scenario, parallel_config, train_settings

SWEEPABLE = {"seq": "tokens per sequence", "batch": "micro-batch", "gpus": "GPUs (data parallelism grows)",
             "grad_accum": "micro-batches accumulated", "lora_rank": "LoRA rank (the base frozen)"}
MAX_POINTS = 64
MAX_VALUE = 1024**3  # beyond a billion tokens, sequences or GPUs a value is a typo


def _number(text: str, key: str) -> int:
    match = re.fullmatch(r"\s*(\d+)\s*([kKmM]?)\s*", text)
    if not match:
        raise InputError(f"--over {key}: {text!r} is not a whole number (suffixes k = 1024, m = 1024^2)")
    scale = {"": 1, "k": 1024, "m": 1024**2}[match.group(2).lower()]
    value = int(match.group(1)) * scale
    if value <= 0:
        raise InputError(f"--over {key}: values must be positive, got {text!r}")
    if value > MAX_VALUE:
        raise InputError(f"--over {key}: {text!r} exceeds {MAX_VALUE:,} (1024^3)")
    return value


def parse_over(text: str) -> tuple[str, list[int]]:
    """``seq=1k..128k`` (powers of two from the first to the last), ``batch=1..64``, or a list
    ``seq=1024,4096,8192``."""
    key, sep, spec = text.partition("=")
    key = key.strip().replace("-", "_")
    if not sep or key not in SWEEPABLE:
        raise InputError(f"--over {text!r}: expected KEY=RANGE with KEY one of {', '.join(SWEEPABLE)} "
                         "(e.g. seq=1k..128k or batch=1,2,4)")
    if ".." in spec:
        start_text, _, stop_text = spec.partition("..")
        start, stop = _number(start_text, key), _number(stop_text, key)
        if stop < start:
            raise InputError(f"--over {key}: the range {spec!r} runs backwards")
        values = []
        value = start
        while value <= stop:
            values.append(value)
            value *= 2
        if values[-1] != stop:
            values.append(stop)
    else:
        values = sorted({_number(item, key) for item in spec.split(",") if item.strip()})
    if not values:
        raise InputError(f"--over {key}: no values in {spec!r}")
    if len(values) > MAX_POINTS:
        raise InputError(f"--over {key}: {len(values)} values; at most {MAX_POINTS}")
    return key, values


@dataclass(frozen=True)
class SweepPoint:
    value: int
    estimate: Estimate | None
    error: str | None = None  # why this value is not a valid layout (e.g. GPUs not divisible)


def run_sweep(model: ModelConfig, base: TrainSettings, scenario: Scenario, key: str, values: list[int]) -> list[SweepPoint]:
    from memcalc.estimate.training import estimate_training

    points = []
    for value in values:
        if key == "seq":
            settings, layout = replace(base, seq_len=value), scenario
        elif key == "batch":
            settings, layout = replace(base, batch_size=value), scenario
        elif key == "grad_accum":
            settings, layout = replace(base, grad_accum=value), scenario
        elif key == "lora_rank":
            settings, layout = replace(base, lora_rank=value), scenario
        else:  # gpus: the layout's other degrees stay, data parallelism absorbs the rest
            settings, layout = base, replace(scenario, gpus=value, dp=None)
        try:
            estimate = estimate_training(model, train_settings(layout, settings), parallel_config(layout))
        except InputError as exc:
            points.append(SweepPoint(value, None, str(exc)))
            continue
        points.append(SweepPoint(value, estimate))
    return points


def first_over(points: list[SweepPoint], capacity: int) -> SweepPoint | None:
    """The first point (in sweep order) whose most loaded GPU's device total
    (memcalc.estimate.device) exceeds ``capacity`` bytes."""
    from memcalc.estimate.device import device_memory

    return next((point for point in points
                 if point.estimate is not None and device_memory(point.estimate).device_total > capacity), None)
