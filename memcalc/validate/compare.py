"""Estimate against measurement, component by component. Pure data: no torch, no rich."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from memcalc.estimate.device import CUBLAS_WORKSPACE_BYTES, TRAINING_WORKSPACES, device_memory
from memcalc.estimate.breakdown import Estimate

# Rows compared for a training step: (key, label); phases and the total follow.
TRAIN_ROWS = (
    ("weights", "Weights"),
    ("master_weights", "Master weights (fp32)"),
    ("optimizer_states", "Optimizer states"),
    ("gradients", "Gradients"),
    ("activations", "Activations (peak)"),
    ("optimizer_step_temporaries", "Optimizer step temporaries"),
)
PHASE_ROWS = (("forward", "Peak during forward"), ("backward", "Peak during backward"),
              ("optimizer_step", "Peak during optimizer step"))


@dataclass(frozen=True)
class Row:
    key: str
    label: str
    estimated: int | None
    measured: int | None

    @property
    def difference(self) -> int | None:
        if self.estimated is None or self.measured is None:
            return None
        return self.estimated - self.measured

    @property
    def error_percent(self) -> float | None:
        if self.difference is None or not self.measured:
            return None if self.difference else 0.0
        return 100.0 * self.difference / self.measured


@dataclass(frozen=True)
class Comparison:
    rows: tuple[Row, ...]
    total: Row
    device: str
    notes: tuple[str, ...] = ()
    allocator_stats: dict[str, int] | None = None  # CUDA: torch.cuda.memory_stats, as measured

    def within(self, tolerance_percent: float) -> bool:
        error = self.total.error_percent
        return error is not None and abs(error) <= tolerance_percent

    def document(self) -> dict[str, Any]:
        def row(item: Row) -> dict[str, Any]:
            return {"key": item.key, "label": item.label, "estimated": item.estimated, "measured": item.measured,
                    "difference": item.difference, "error_percent": item.error_percent}

        document = {"device": self.device, "rows": [row(item) for item in self.rows], "total": row(self.total),
                    "notes": list(self.notes)}
        if self.allocator_stats:
            document["allocator_stats"] = self.allocator_stats
        return document


def _allocator_stats(measurement) -> dict[str, int] | None:
    stats = {key.removeprefix("stats."): value for key, value in getattr(measurement, "cuda", {}).items()
             if key.startswith("stats.")}
    return stats or None


def _reserved_rows(estimate: Estimate, measurement, workspaces: int) -> list[Row]:
    """The allocator's reserve: the estimate's term against the measured trace replayed through
    the caching-allocator model (memcalc.allocator), with the cuBLAS workspace it allocates first;
    on CUDA, against what the allocator really reserved."""
    events = getattr(measurement, "events", None)
    if not events:
        return []
    from dataclasses import replace

    from memcalc.allocator import AllocatorConfig, Event, simulate

    trace = [Event.alloc(0, workspaces)] if workspaces else []
    trace += [Event.alloc(block, size) if kind == "alloc" else Event.free(block) for kind, block, size in events]
    rows = []
    for expandable, key, label in ((False, "reserved_simulated", "Peak reserved (allocator model on the trace)"),
                                   (True, "reserved_simulated_expandable", "Peak reserved, expandable segments")):
        simulated = simulate(trace, AllocatorConfig(expandable_segments=expandable))
        mode = replace(estimate, settings=replace(estimate.settings, expandable_segments=expandable))
        rows.append(Row(key, label, device_memory(mode).peak_reserved + workspaces, simulated.peak_reserved))
    return rows


def compare_training(estimate: Estimate, measurement) -> Comparison:
    """``measurement`` is a ``memcalc.validate.run.Measurement`` (duck-typed to keep torch out)."""
    rows = [Row(key, label, estimate.component(key).bytes, measurement.components.get(key)) for key, label in TRAIN_ROWS]
    if "activations_offloaded" in measurement.components:  # host memory: not in the phases below
        host = next((item.bytes for item in estimate.components if item.key == "activations_offloaded"), None)
        rows.append(Row("activations_offloaded", "Activations offloaded (host)", host,
                        measurement.components["activations_offloaded"]))
    rows += [
        Row(f"phase:{key}", label, estimate.phases[key], measurement.phases[key].peak_bytes) for key, label in PHASE_ROWS
    ]
    static = sum(component.bytes for component in estimate.components
                 if component.key in ("weights", "master_weights", "optimizer_states", "gradient_accumulation"))
    rows.append(Row("steady_state", "Steady state (after zero_grad)", static, measurement.components.get("steady_state")))
    notes = []
    rows += _reserved_rows(estimate, measurement, CUBLAS_WORKSPACE_BYTES * TRAINING_WORKSPACES)
    if measurement.device == "cuda":
        cuda = measurement.cuda
        workspaces = CUBLAS_WORKSPACE_BYTES * TRAINING_WORKSPACES
        rows.append(Row("cublas_workspaces", "cuBLAS workspaces (2 x 32 MiB default)", workspaces, None))
        rows.append(Row("cuda_peak_allocated", "CUDA max_memory_allocated (peak + workspaces)",
                        estimate.total + workspaces, cuda.get("peak_allocated")))
        device = device_memory(estimate)
        rows.append(Row("cuda_peak_reserved", "CUDA max_memory_reserved (est. reserve + workspaces)",
                        device.peak_reserved + workspaces, cuda.get("peak_reserved")))
        rows.append(Row("cuda_reserved", "CUDA memory_reserved (at the end)", None, cuda.get("reserved")))
        rows.append(Row("cuda_process_overhead", "CUDA context + libraries (not allocated by torch)",
                        device.cuda_context, cuda.get("process_overhead")))
        rows.append(Row("cuda_device_used", "Device used (mem_get_info; segments kept cached)",
                        device.device_total, cuda.get("device_used")))  # its workspaces included
        notes.append("measured bytes are rounded to the CUDA allocator's 512-byte blocks")
    total = Row("total", "Total (peak)", estimate.total, measurement.total)
    return Comparison(tuple(rows), total, measurement.device, tuple(notes), _allocator_stats(measurement))


def compare_inference(estimate: Estimate, measurement) -> Comparison:
    settings = estimate.settings
    per_token = settings.kv_cache_bytes_per_token
    sequences = settings.sequences
    # the measured cache is everything the model's cache holds: a hybrid's conv and SSM states too
    state = sum(component.bytes for component in estimate.components if component.key == "state_cache")
    cache = "KV cache and recurrent states" if state else "KV cache"
    rows = [
        Row("weights", "Weights", estimate.component("weights").bytes, measurement.components["weights"]),
        Row("kv_cache_after_prefill", f"{cache} after prefill", per_token * settings.prompt_len * sequences + state,
            measurement.components["kv_cache_after_prefill"]),
        Row("kv_cache", f"{cache} after the last token", estimate.component("kv_cache").bytes + state,
            measurement.components["kv_cache"]),
    ]
    rows += _reserved_rows(estimate, measurement, CUBLAS_WORKSPACE_BYTES)
    notes = []
    if measurement.device == "cuda":
        workspaces = CUBLAS_WORKSPACE_BYTES
        rows.append(Row("cublas_workspaces", "cuBLAS workspace (32 MiB default)", workspaces, None))
        rows.append(Row("cuda_peak_allocated", "CUDA max_memory_allocated (peak + workspace)",
                        estimate.peak_allocated + workspaces, measurement.cuda.get("peak_allocated")))
        device = device_memory(estimate)
        rows.append(Row("cuda_peak_reserved", "CUDA max_memory_reserved (est. reserve + workspace)",
                        device.peak_reserved + workspaces, measurement.cuda.get("peak_reserved")))
        rows.append(Row("cuda_process_overhead", "CUDA context + libraries (not allocated by torch)",
                        device.cuda_context - workspaces, measurement.cuda.get("process_overhead")))
        rows.append(Row("cuda_device_used", "Device used (mem_get_info; segments kept cached)",
                        device.device_total, measurement.cuda.get("device_used")))
        notes.append("measured bytes are rounded to the CUDA allocator's 512-byte blocks")
    total = Row("total", f"Allocated peak ({estimate.peak_phase})", estimate.peak_allocated, measurement.total)
    return Comparison(tuple(rows), total, measurement.device, tuple(notes), _allocator_stats(measurement))
