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


def read_log_file(path: str) -> VLLMStartup:
    file = Path(path)
    try:
        text = file.read_text(errors="replace")
    except OSError as exc:
        raise InputError(f"{path}: cannot read: {exc.strerror or exc}") from None
    return read_vllm_log(text, str(file))


def write_calibration(startup: VLLMStartup, path: str) -> None:
    Path(path).write_text(json.dumps({"engine": "vllm"} | asdict(startup), indent=2) + "\n")


def read_calibration(path: str):
    """A file ``memcalc calibrate --out`` wrote, as a memcalc.serving.Calibration."""
    try:
        data = json.loads(Path(path).read_text())
    except OSError as exc:
        raise InputError(f"--calibration: {path}: cannot read: {exc.strerror or exc}") from None
    except json.JSONDecodeError as exc:
        raise InputError(f"--calibration: {path}:{exc.lineno}:{exc.colno}: invalid JSON: {exc.msg}") from None
    if not isinstance(data, dict) or data.get("engine") != "vllm":
        raise InputError(f"--calibration: {path}: not a memcalc calibration (written by `memcalc calibrate --out`)")
    fields = {key: data.get(key) for key in VLLMStartup.__dataclass_fields__}
    for key in ("activation_peak", "non_torch"):
        if fields[key] is not None and (not isinstance(fields[key], int) or fields[key] < 0):
            raise InputError(f"--calibration: {path}: {key} must be a non-negative number of bytes")
    return VLLMStartup(**(fields | {"source": data.get("source") or path})).calibration()
