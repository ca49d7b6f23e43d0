"""What the GPU holds beyond live tensors: the recorded allocation trace, the allocator's reserve
terms and their source, and the three totals (peak allocated, peak reserved, on the device)."""

from __future__ import annotations

import csv
import statistics
from pathlib import Path

import pytest

from memcalc.config import InferSettings, TrainSettings
from memcalc.estimate import device
from memcalc.estimate.inference import estimate_inference
from memcalc.estimate.training import estimate_training
from memcalc.library import resolve_model
from memcalc.parallel import ParallelConfig

ACCURACY_CSV = Path(__file__).resolve().parents[1] / "benchmarks" / "results" / "accuracy_fake.csv"


def test_the_recorded_trace_is_the_trackers_accounting():
    """Replaying the fake-tensor trace's allocations and frees gives back the tracker's live-bytes
    peak, and the allocator model on it reserves at least what it allocates."""
    pytest.importorskip("torch")
    from memcalc.allocator import Event, simulate
    from memcalc.validate.cli_support import with_layers
    from memcalc.validate.run import TrainWorkload, measure_training

    model = with_layers(resolve_model("llama-3.2-1b"), 2)
    measured = measure_training(model, TrainWorkload(batch_size=1, seq_len=128), "fake", record=True)
    live, peak, sizes = 0, 0, {}
    for kind, block, size in measured.events:
        if kind == "alloc":
            sizes[block] = size
            live += size
            peak = max(peak, live)
        else:
            live -= sizes.pop(block)
    assert peak == measured.total
    stats = simulate(Event.alloc(block, size) if kind == "alloc" else Event.free(block)
                     for kind, block, size in measured.events)
    assert stats.peak_reserved >= stats.peak_allocated >= peak


WORKSPACE = {"train": 64 * 2**20, "infer": 32 * 2**20}  # the cuBLAS workspaces each trace starts with


def reserve_medians(path: Path = ACCURACY_CSV) -> dict[str, dict[str, float]]:
    """Per kind of workload, the median of (simulated reserved - workspaces) / allocated - 1 over
    the accuracy suite's runs: each run's own trace replayed through memcalc.allocator."""
    rows: dict[str, dict[str, float]] = {}
    for row in csv.DictReader(path.open()):
        rows.setdefault(row["case"], {})[row["component"]] = float(row["measured_bytes"] or 0)
        rows[row["case"]]["recompute"] = row["recompute"] == "full"
    medians: dict[str, dict[str, float]] = {"default": {}, "expandable": {}}
    for mode, key in (("default", "reserved_simulated"), ("expandable", "reserved_simulated_expandable")):
        groups: dict[str, list[float]] = {}
        for case, values in rows.items():
            if key not in values:
                continue
            infer = " infer " in case
            kind = ("infer" if infer else "train-offload" if " offload-act" in case
                    else "train-full-recompute" if values["recompute"] else "train")
            workspace = WORKSPACE["infer" if infer else "train"]
            groups.setdefault(kind, []).append(100 * ((values[key] - workspace) / values["total"] - 1))
        medians[mode] = {kind: round(statistics.median(values), 2) for kind, values in groups.items()}
    return medians


def test_fragmentation_terms_are_the_medians_of_the_accuracy_suites_traces():
    """The estimator's terms are the medians over benchmarks/accuracy.py's runs: one source."""
    medians = reserve_medians()
    assert device.FRAGMENTATION_PERCENT == medians["default"]
    assert device.EXPANDABLE_FRAGMENTATION_PERCENT == medians["expandable"]


def test_three_totals_by_hand():
    """llama-3-8b, mixed bf16 AdamW: allocated = the phase peak; reserved = +5.33%; the device
    adds the 400 MiB context and the 32 MiB cuBLAS workspace."""
    estimate = estimate_training(resolve_model("llama-3-8b"), TrainSettings())
    memory = device.device_memory(estimate)
    assert memory.peak_allocated == estimate.total == max(estimate.phases.values())
    assert memory.peak_reserved == estimate.total + round(estimate.total * 0.0533)
    assert memory.device_total == memory.peak_reserved + (400 + 2 * 32) * 2**20  # forward and autograd threads
    expandable = device.device_memory(estimate_training(resolve_model("llama-3-8b"),
                                                        TrainSettings(expandable_segments=True)))
    assert expandable.peak_reserved == estimate.total + round(estimate.total * 0.0216)


def test_full_recompute_and_inference_use_their_own_terms():
    model = resolve_model("llama-3.2-1b")
    full = device.device_memory(estimate_training(model, TrainSettings(recompute="full")))
    assert full.workload == "train-full-recompute" and full.fragmentation_percent == 9.16
    offload = device.device_memory(estimate_training(model, TrainSettings(recompute="full", offload_activations=True)))
    assert offload.workload == "train-offload" and offload.fragmentation_percent == 12.96
    infer = estimate_inference(model, InferSettings(context_len=1024))
    memory = device.device_memory(infer)
    assert memory.fragmentation_percent == 5.66
    assert memory.cuda_context == infer.component("overhead").bytes and memory.nccl == 0


@pytest.mark.parametrize(("layout", "communicators"), [
    ({}, ()),
    ({"dp": 8}, (8,)),
    ({"dp": 2, "tp": 2}, (2, 2)),
    ({"dp": 2, "tp": 4, "pp": 2}, (2, 4, 2)),
    ({"dp": 4, "cp": 2}, (8, 2)),
])
def test_nccl_buffers_per_communicator(layout, communicators):
    """544 MB for each 2-rank communicator, 688 MB for larger ones (NVIDIA/nccl#964)."""
    estimate = estimate_training(resolve_model("llama-3.2-1b"), TrainSettings(seq_len=1024), ParallelConfig(**layout))
    memory = device.device_memory(estimate)
    assert memory.communicators == communicators
    assert memory.nccl == sum(544 * 10**6 if size == 2 else 688 * 10**6 for size in communicators)


def test_cuda_validation_compares_reserved_overhead_and_device_and_keeps_the_allocator_stats():
    """On CUDA the comparison predicts max_memory_reserved, the process overhead and the device's
    used bytes, and carries torch.cuda.memory_stats' segment counts into the JSON (a duck-typed
    measurement: these rows need no GPU to build)."""
    from types import SimpleNamespace

    from memcalc.validate.compare import compare_training

    estimate = estimate_training(resolve_model("llama-3.2-1b"), TrainSettings(seq_len=256))
    phases = {key: SimpleNamespace(peak_bytes=value) for key, value in estimate.phases.items()}
    cuda = {"peak_allocated": estimate.total, "peak_reserved": 2 * estimate.total, "reserved": estimate.total,
            "process_overhead": 500 * 2**20, "device_used": 3 * estimate.total, "stats.segment.all.peak": 42}
    measured = SimpleNamespace(device="cuda", components={}, phases=phases, total=estimate.total, cuda=cuda)
    comparison = compare_training(estimate, measured)
    rows = {row.key: row for row in comparison.rows}
    memory = device.device_memory(estimate)
    workspaces = 2 * 32 * 2**20
    assert rows["cuda_peak_reserved"].estimated == memory.peak_reserved + workspaces
    assert rows["cuda_process_overhead"].estimated == 400 * 2**20
    assert rows["cuda_device_used"].estimated == memory.device_total  # its two workspaces already in it
    assert comparison.document()["allocator_stats"] == {"segment.all.peak": 42}
