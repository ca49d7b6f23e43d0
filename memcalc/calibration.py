"""Measured terms from a real run, for later estimates on that machine.

``read_vllm_log`` reads a vLLM start-up log. The lines it knows, across versions:

- 0.6: ``Memory profiling results: total_gpu_memory=79.19GiB ... peak_torch_memory=...
  non_torch_memory=0.12GiB kv_cache_size=54.93GiB gpu_memory_utilization=0.90``
- 0.7 and V0: ``total_gpu_memory (79.19GiB) x gpu_memory_utilization (0.90) = 71.27GiB`` and
  ``model weights take 14.99GiB; non_torch_memory takes 0.12GiB; PyTorch activation peak memory
  takes 1.19GiB; the rest of the memory reserved for KV Cache is 54.93GiB.``
- V1: ``Model loading took 14.9888 GiB``, ``Available KV cache memory: 54.93 GiB``,
  ``GPU KV cache size: 450,320 tokens``, ``# GPU blocks: 2356``, ``Maximum concurrency for 8,192
  tokens per request: 54.97x``; ``Loading model weights took 12.5523 GB`` (GiB in fact, a units
  bug vLLM logs with).

Every figure is optional; what a log lacks stays None. vLLM prints GiB with two decimals, so a
figure read back is good to 0.005 GiB.
"""

from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass
from pathlib import Path

from memcalc.errors import InputError

GiB = 2**30
_NUMBER = r"([0-9][0-9,]*(?:\.[0-9]+)?)"


def _gib(text: str) -> int:
    return round(float(text.replace(",", "")) * GiB)


def _count(text: str) -> int:
    return int(float(text.replace(",", "")))


# (field, pattern, converter): the first match of each wins
_PATTERNS = [
    ("total_memory", rf"total_gpu_memory[ =(]+{_NUMBER} ?GiB", _gib),
    ("utilization", rf"gpu_memory_utilization[ =(]+{_NUMBER}", float),
    ("weights", rf"(?:Model loading|Loading model weights) took {_NUMBER} ?Gi?B", _gib),  # four decimals
    ("weights", rf"model weights take {_NUMBER} ?GiB", _gib),
    ("non_torch", rf"non_torch_memory(?: takes|=) ?{_NUMBER} ?GiB", _gib),
    ("activation_peak", rf"(?:PyTorch activation peak memory takes|torch_peak_increase=|peak_torch_memory=) ?"
                        rf"{_NUMBER} ?GiB", _gib),
    ("kv_cache", rf"(?:reserved for KV Cache is|kv_cache_size=|Available KV cache memory:) ?{_NUMBER} ?GiB", _gib),
    ("kv_tokens", rf"GPU KV cache size: {_NUMBER} tokens", _count),
    ("gpu_blocks", rf"# (?:GPU|CUDA) blocks: {_NUMBER}", _count),
    ("model", r"model='([^']+)'", str),
]


@dataclass(frozen=True)
class VLLMStartup:
    source: str
    model: str | None = None
    total_memory: int | None = None
    utilization: float | None = None
    weights: int | None = None
    non_torch: int | None = None
    activation_peak: int | None = None
    kv_cache: int | None = None
    kv_tokens: int | None = None
    gpu_blocks: int | None = None

    def calibration(self):
        from memcalc.serving import Calibration

        return Calibration(self.source, self.activation_peak, self.non_torch)


def read_vllm_log(text: str, source: str) -> VLLMStartup:
    found: dict[str, object] = {}
    for field, pattern, convert in _PATTERNS:
        if field in found:
            continue
        match = re.search(pattern, text)
        if match:
            found[field] = convert(match.group(1))
    if not any(key in found for key in ("weights", "kv_cache", "non_torch", "activation_peak")):
        raise InputError(f"{source}: no vLLM memory lines found (expected e.g. 'model weights take ... GiB' or "
                         "'Available KV cache memory: ... GiB')")
    return VLLMStartup(source=source, **found)


# --- The caching allocator's own counters -------------------------------------------------------
#
# ``torch.cuda.memory_stats()`` (a dict: printed, or dumped with json.dumps) has the peaks as
# ``allocated_bytes.all.peak`` and ``reserved_bytes.all.peak``; ``torch.cuda.memory_summary()``
# prints them as the Peak Usage of "Allocated memory" and "GPU reserved memory", rounded to the
# unit it shows (torch/cuda/memory.py, _format_size: B, KiB, MiB, GiB, ...).

_UNITS = {"": 1, "K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40, "P": 2**50}
_STAT = r"""["']?{key}["']?\s*[:,]\s*([0-9]+)"""
_SUMMARY_ROW = r"\|\s*{label}\s*\|[^|]*\|\s*([0-9.]+)\s*([KMGTP]?)i?B\s*\|"


@dataclass(frozen=True)
class AllocatorStats:
    """A run's peaks from PyTorch's caching allocator, and the reserve between them."""

    source: str
    peak_allocated: int
    peak_reserved: int
    alloc_retries: int | None = None  # cudaMalloc retries: the allocator freed its cache to satisfy a request
    exact: bool = True  # False: read from memory_summary()'s rounded units

    @property
    def reserve_percent(self) -> float:
        return round(100 * (self.peak_reserved / self.peak_allocated - 1), 2)


def read_allocator_stats(text: str, source: str) -> AllocatorStats | None:
    """The peaks of a memory_stats() dump (JSON or printed) or a memory_summary() table; None when
    the text has neither."""
    stats = {key: re.search(_STAT.format(key=re.escape(key)), text)
             for key in ("allocated_bytes.all.peak", "reserved_bytes.all.peak", "num_alloc_retries")}
    if stats["allocated_bytes.all.peak"] and stats["reserved_bytes.all.peak"]:
        allocated, reserved = (int(stats[key].group(1)) for key in ("allocated_bytes.all.peak", "reserved_bytes.all.peak"))
        retries = int(stats["num_alloc_retries"].group(1)) if stats["num_alloc_retries"] else None
        return _checked(AllocatorStats(source, allocated, reserved, retries))
    rows = {label: re.search(_SUMMARY_ROW.format(label=label), text)
            for label in ("Allocated memory", "GPU reserved memory")}
    if all(rows.values()):
        allocated, reserved = (round(float(match.group(1)) * _UNITS[match.group(2)]) for match in rows.values())
        retries = re.search(r"cudaMalloc retries:\s*([0-9]+)", text)
        return _checked(AllocatorStats(source, allocated, reserved, int(retries.group(1)) if retries else None,
                                       exact=False))
    return None


def _checked(stats: AllocatorStats) -> AllocatorStats:
    if stats.peak_allocated <= 0 or stats.peak_reserved < stats.peak_allocated:
        raise InputError(f"{stats.source}: peak reserved ({stats.peak_reserved:,} B) must be at least the peak "
                         f"allocated ({stats.peak_allocated:,} B), which must be positive")
    return stats


def read_log_file(path: str) -> VLLMStartup | AllocatorStats:
    """A vLLM start-up log, or a torch.cuda.memory_stats()/memory_summary() dump."""
    file = Path(path)
    try:
        text = file.read_text(errors="replace")
    except OSError as exc:
        raise InputError(f"{path}: cannot read: {exc.strerror or exc}") from None
    stats = read_allocator_stats(text, str(file))
    if stats is not None:
        return stats
    try:
        return read_vllm_log(text, str(file))
    except InputError:
        raise InputError(f"{file}: neither vLLM memory lines ('model weights take ... GiB', 'Available KV cache "
                         "memory: ... GiB') nor torch.cuda.memory_stats()/memory_summary() peaks") from None


def write_calibration(measured: VLLMStartup | AllocatorStats, path: str) -> None:
    if isinstance(measured, AllocatorStats):
        document = {"engine": "torch-allocator", "reserve_percent": measured.reserve_percent} | asdict(measured)
    else:
        document = {"engine": "vllm"} | asdict(measured)
    Path(path).write_text(json.dumps(document, indent=2) + "\n")


def read_reserve_calibration(path: str) -> tuple[float, str]:
    """(reserve percent, source) from a file ``memcalc calibrate --out`` wrote of an allocator dump."""
    data = _load(path)
    if data.get("engine") != "torch-allocator":
        raise InputError(f"--calibration: {path}: not an allocator calibration (memcalc calibrate --out of a "
                         "torch.cuda.memory_stats() or memory_summary() dump; a vLLM start-up's is for infer)")
    reserve = data.get("reserve_percent")
    if not isinstance(reserve, int | float) or isinstance(reserve, bool) or reserve < 0:
        raise InputError(f"--calibration: {path}: reserve_percent must be a non-negative number")
    return float(reserve), str(data.get("source") or path)


def _load(path: str) -> dict:
    try:
        data = json.loads(Path(path).read_text())
    except OSError as exc:
        raise InputError(f"--calibration: {path}: cannot read: {exc.strerror or exc}") from None
    except json.JSONDecodeError as exc:
        raise InputError(f"--calibration: {path}:{exc.lineno}:{exc.colno}: invalid JSON: {exc.msg}") from None
    if not isinstance(data, dict):
        raise InputError(f"--calibration: {path}: not a memcalc calibration (written by `memcalc calibrate --out`)")
    return data


def read_calibration(path: str):
    """A file ``memcalc calibrate --out`` wrote, as a memcalc.serving.Calibration."""
    data = _load(path)
    if data.get("engine") == "torch-allocator":
        raise InputError(f"--calibration: {path}: an allocator reserve, which `train --calibration` takes; infer "
                         "takes a vLLM start-up's (memcalc calibrate LOG --out)")
    if data.get("engine") != "vllm":
        raise InputError(f"--calibration: {path}: not a memcalc calibration (written by `memcalc calibrate --out`)")
    fields = {key: data.get(key) for key in VLLMStartup.__dataclass_fields__}
    for key in ("activation_peak", "non_torch"):
        if fields[key] is not None and (not isinstance(fields[key], int) or fields[key] < 0):
            raise InputError(f"--calibration: {path}: {key} must be a non-negative number of bytes")
    return VLLMStartup(**(fields | {"source": data.get("source") or path})).calibration()
