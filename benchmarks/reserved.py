"""Reserved memory: each workload's allocation trace replayed through the caching-allocator model.

    python benchmarks/reserved.py                      # writes benchmarks/results/reserved_fake.csv

Every row runs the workload with the reference decoder (or a transformers class) on fake tensors,
recording each storage's allocation and free in program order (memcalc.validate.tracker), and
replays that trace through memcalc.allocator with PyTorch's default allocator settings and with
``expandable_segments:True``. A cuBLAS workspace (32 MiB, Hopper; PyTorch allocates it through
the caching allocator on the first matrix multiply) is allocated first, as on a GPU.

The medians per workload kind are the fragmentation terms memcalc.estimate.device uses; this
script is their source. Fake tensors give the same sizes and order as a GPU run of the same code
on one stream; what they miss (NCCL, side streams, graphs) is stated in docs/allocator.md.
"""

from __future__ import annotations

import argparse
import csv
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from memcalc.allocator import AllocatorConfig, Event, simulate  # noqa: E402
from memcalc.library import resolve_model  # noqa: E402
from memcalc.validate.cli_support import with_layers  # noqa: E402

CUBLAS_WORKSPACE = 32 * 2**20  # getChosenWorkspaceSize on sm90 (docs/formulas.md)

# (kind, model, layers or None, workload keyword arguments)
TRAIN_ROWS = [
    ("train", "llama-3.2-1b", None, dict(batch_size=1, seq_len=2048)),
    ("train", "llama-3.2-1b", None, dict(batch_size=4, seq_len=2048, recompute="full")),
    ("train", "llama-3.2-1b", None, dict(batch_size=2, seq_len=1024, precision="pure-bf16")),
    ("train", "qwen3-0.6b", None, dict(batch_size=2, seq_len=2048)),
    ("train", "qwen2.5-0.5b", None, dict(batch_size=4, seq_len=1024, optimizer_impl="fused")),
    ("train", "gpt2", None, dict(batch_size=4, seq_len=1024, precision="fp32", attention="eager")),
    ("train", "llama-3-8b", 4, dict(batch_size=1, seq_len=4096)),
    ("train", "llama-3-8b", 4, dict(batch_size=2, seq_len=4096, recompute="full")),
    ("train", "mistral-7b", 4, dict(batch_size=2, seq_len=2048, precision="amp-bf16")),
    ("train", "llama-3.2-1b", None, dict(batch_size=1, seq_len=2048, lora_rank=16)),
]
INFER_ROWS = [
    ("infer", "llama-3.2-1b", None, dict(prompt_len=1024, new_tokens=64)),
    ("infer", "llama-3.2-1b", None, dict(batch_size=4, prompt_len=512, new_tokens=32, num_beams=4)),
    ("infer", "qwen3-0.6b", None, dict(batch_size=8, prompt_len=1024, new_tokens=32)),
    ("infer", "llama-3-8b", 4, dict(batch_size=2, prompt_len=2048, new_tokens=64)),
]


def trace(kind: str, model_name: str, layers: int | None, workload: dict):
    from memcalc.validate.run import InferWorkload, TrainWorkload, measure_inference, measure_training

    model = with_layers(resolve_model(model_name), layers)
    if kind == "train":
        measured = measure_training(model, TrainWorkload(**workload), "fake", record=True)
    else:
        measured = measure_inference(model, InferWorkload(**workload), "fake", record=True)
    return measured


def replay(events, config: AllocatorConfig):
    workspace = [Event.alloc(0, CUBLAS_WORKSPACE)]
    return simulate(workspace + [Event.alloc(block, size) if kind == "alloc" else Event.free(block)
                                 for kind, block, size in events], config)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--csv", default=str(REPO / "benchmarks" / "results" / "reserved_fake.csv"))
    args = parser.parse_args()
    rows = []
    for kind, model, layers, workload in TRAIN_ROWS + INFER_ROWS:
        started = time.perf_counter()
        measured = trace(kind, model, layers, workload)
        default = replay(measured.events, AllocatorConfig())
        expandable = replay(measured.events, AllocatorConfig(expandable_segments=True))
        allocated = default.peak_allocated - CUBLAS_WORKSPACE
        row = {
            "kind": kind, "model": model + (f" L{layers}" if layers else ""),
            "workload": " ".join(f"{key}={value}" for key, value in workload.items()),
            "events": len(measured.events),
            "tracked_peak": measured.total,  # the tracker's live-bytes peak (no 512-byte rounding)
            "peak_allocated": allocated,  # the allocator's, without the workspace
            "peak_reserved": default.peak_reserved - CUBLAS_WORKSPACE,
            "fragmentation_percent": round(100 * (default.peak_reserved - default.peak_allocated) / allocated, 3),
            "segments": default.num_segments,
            "expandable_reserved": expandable.peak_reserved - CUBLAS_WORKSPACE,
            "expandable_fragmentation_percent": round(
                100 * (expandable.peak_reserved - expandable.peak_allocated) / allocated, 3),
        }
        rows.append(row)
        print(f"{row['model']:<18} {kind:<5} {row['workload']:<48} allocated {allocated / 2**30:7.3f} GiB  "
              f"reserved +{row['fragmentation_percent']:6.2f}%  expandable +{row['expandable_fragmentation_percent']:5.2f}%"
              f"  ({time.perf_counter() - started:4.1f} s)", flush=True)
    path = Path(args.csv)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    for kind in ("train", "infer"):
        values = [row["fragmentation_percent"] for row in rows if row["kind"] == kind]
        expandable = [row["expandable_fragmentation_percent"] for row in rows if row["kind"] == kind]
        print(f"{kind}: fragmentation median {statistics.median(values):.2f}% (max {max(values):.2f}%), "
              f"expandable segments median {statistics.median(expandable):.2f}%")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
