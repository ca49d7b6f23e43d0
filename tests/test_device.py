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

RESERVED_CSV = Path(__file__).resolve().parents[1] / "benchmarks" / "results" / "reserved_fake.csv"


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


def _medians(column: str) -> dict[str, float]:
    rows = list(csv.DictReader(RESERVED_CSV.open()))

    def kind(row) -> str:
        if row["kind"] == "infer":
            return "infer"
        return "train-full-recompute" if "recompute=full" in row["workload"] else "train"

    return {key: round(statistics.median(float(row[column]) for row in rows if kind(row) == key), 2)
            for key in ("train", "train-full-recompute", "infer")}


def test_fragmentation_terms_are_the_simulated_medians():
    """The estimator's terms are the medians benchmarks/reserved.py wrote: one source."""
    assert device.FRAGMENTATION_PERCENT == _medians("fragmentation_percent")
    assert device.EXPANDABLE_FRAGMENTATION_PERCENT == _medians("expandable_fragmentation_percent")


def test_three_totals_by_hand():
    """llama-3-8b, mixed bf16 AdamW: allocated = the phase peak; reserved = +9.24%; the device
    adds the 400 MiB context and the 32 MiB cuBLAS workspace."""
    estimate = estimate_training(resolve_model("llama-3-8b"), TrainSettings())
    memory = device.device_memory(estimate)
    assert memory.peak_allocated == estimate.total == max(estimate.phases.values())
    assert memory.peak_reserved == estimate.total + round(estimate.total * 0.0924)
    assert memory.device_total == memory.peak_reserved + (400 + 32) * 2**20
    expandable = device.device_memory(estimate_training(resolve_model("llama-3-8b"),
                                                        TrainSettings(expandable_segments=True)))
    assert expandable.peak_reserved == estimate.total + round(estimate.total * 0.0517)


def test_full_recompute_and_inference_use_their_own_terms():
    model = resolve_model("llama-3.2-1b")
    full = device.device_memory(estimate_training(model, TrainSettings(recompute="full")))
    assert full.workload == "train-full-recompute" and full.fragmentation_percent == 33.51
    infer = estimate_inference(model, InferSettings(context_len=1024))
    memory = device.device_memory(infer)
    assert memory.fragmentation_percent == 5.74
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
