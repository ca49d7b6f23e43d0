"""Per-rank accuracy under pipeline parallelism, even and uneven stages: the estimator's figure for
each pipeline rank (memcalc.estimate.training.estimate_pipeline_rank) against that rank measured
under Megatron's 1F1B schedule on fake tensors (memcalc.validate.pipeline). docs/parallelism.md
summarises the CSV.

    python benchmarks/pipeline_accuracy.py     # writes benchmarks/results/pipeline_fake.csv

Full-size Llama-3-8B and Llama-3.2-1B layers (few of them) and a small DeepSeek-V2-style MoE
(multi-head latent attention, a dense first layer, shared experts); pure bf16, AdamW (foreach),
SDPA, batch 1. Every rank of every layout is measured; the error is (estimate - measured) in
percent of measured. The last columns say which rank the estimate reports as the most loaded
and which one the measurement finds.
"""

from __future__ import annotations

import argparse
import csv
import statistics
import sys
import time
from dataclasses import replace
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from memcalc.config import TrainSettings  # noqa: E402
from memcalc.estimate.training import estimate_pipeline_rank, estimate_training  # noqa: E402
from memcalc.library import resolve_model  # noqa: E402
from memcalc.parallel import ParallelConfig, stage_layer_counts  # noqa: E402
from memcalc.validate.pipeline import measure_pipeline_rank  # noqa: E402

BATCH = 1
COMPONENTS = ("weights", "gradients", "optimizer_states", "activations", "forward", "backward", "optimizer_step",
              "total")


def _tiny_deepseek():
    base = resolve_model("deepseek-v2-lite")
    return replace(base, name="deepseek-v2-lite-small", num_layers=6, hidden_size=512, num_attention_heads=4,
                   num_kv_heads=4, intermediate_size=1024, vocab_size=4096,
                   moe=replace(base.moe, num_experts=8, experts_per_token=2, expert_intermediate_size=256,
                               shared_expert_intermediate_size=512))


def layouts():
    """(model, seq, ParallelConfig): even and uneven stages, first/last/middle ranks busiest."""
    llama8 = replace(resolve_model("llama-3-8b"), num_layers=8)
    llama1 = replace(resolve_model("llama-3.2-1b"), num_layers=6)  # tied embedding
    deepseek = _tiny_deepseek()
    return [
        (llama8, 2048, ParallelConfig(pp=4, microbatches=4)),
        (llama8, 2048, ParallelConfig(pp=4, microbatches=8)),
        (llama8, 2048, ParallelConfig(pp=4, pp_layers=(1, 3, 3, 1), microbatches=4)),
        (llama8, 2048, ParallelConfig(pp=4, pp_first_layers=3, pp_last_layers=1, microbatches=4)),
        (llama8, 4096, ParallelConfig(pp=4, pp_layers=(3, 2, 2, 1), microbatches=2)),
        (llama1, 2048, ParallelConfig(pp=2, pp_layers=(4, 2), microbatches=4)),
        (llama1, 2048, ParallelConfig(pp=4, pp_first_layers=1, pp_last_layers=1, microbatches=4)),
        (deepseek, 1024, ParallelConfig(pp=3, microbatches=3)),
        (deepseek, 1024, ParallelConfig(pp=3, pp_layers=(1, 3, 2), microbatches=3)),
    ]


def _error(estimated: int, measured: int) -> float:
    return 100.0 * (estimated - measured) / measured if measured else 0.0


def run_layout(model, seq_len: int, parallel: ParallelConfig) -> list[dict]:
    settings = TrainSettings(precision="pure-bf16", batch_size=BATCH, seq_len=seq_len, attention="sdpa")
    reported = estimate_training(model, settings, parallel)
    reported_busiest = max(reported.ranks, key=lambda view: view.total).pipeline_rank
    counts = "/".join(map(str, stage_layer_counts(model.num_layers, parallel)))
    per_rank, measured_totals = [], []
    for rank in range(parallel.pp):
        view = estimate_pipeline_rank(model, settings, parallel, rank)
        measurement = measure_pipeline_rank(model, parallel, rank, batch_size=BATCH, seq_len=seq_len)
        memory = {component.key: component.bytes for component in view.components}
        estimated = {name: memory[name] for name in COMPONENTS[:4]} | dict(view.phases) | {"total": view.total}
        forward, backward, step = measurement.phase_peaks
        observed = {"weights": measurement.weights, "gradients": measurement.gradients,
                    "optimizer_states": measurement.optimizer_states, "activations": measurement.activations,
                    "forward": forward, "backward": backward, "optimizer_step": step, "total": measurement.total}
        per_rank.append((rank, measurement.inflight, estimated, observed))
        measured_totals.append(measurement.total)
    measured_busiest = measured_totals.index(max(measured_totals))
    rows = []
    for rank, inflight, estimated, observed in per_rank:
        for name in COMPONENTS:
            rows.append({
                "model": model.name, "layers_per_rank": counts, "pp": parallel.pp,
                "microbatches": parallel.microbatches, "batch": BATCH, "seq": seq_len, "rank": rank,
                "inflight": inflight, "component": name, "estimated_bytes": estimated[name],
                "measured_bytes": observed[name], "error_percent": f"{_error(estimated[name], observed[name]):.4f}",
                "estimate_busiest_rank": reported_busiest, "measured_busiest_rank": measured_busiest,
            })
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--csv", type=Path, default=REPO / "benchmarks" / "results" / "pipeline_fake.csv")
    args = parser.parse_args()
    rows: list[dict] = []
    for model, seq_len, parallel in layouts():
        start = time.perf_counter()
        case = run_layout(model, seq_len, parallel)
        rows += case
        totals = [row for row in case if row["component"] == "total"]
        errors = " ".join(f"{float(row['error_percent']):+.3f}%" for row in totals)
        print(f"{model.name:22s} s{seq_len:<5d} m{parallel.microbatches} stages {case[0]['layers_per_rank']:9s} "
              f"total per rank {errors}  busiest: estimate {case[0]['estimate_busiest_rank']}, measured "
              f"{case[0]['measured_busiest_rank']}  {time.perf_counter() - start:4.1f}s", flush=True)
    args.csv.parent.mkdir(parents=True, exist_ok=True)
    with args.csv.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    ranks = {(row["model"], row["layers_per_rank"], row["microbatches"], row["seq"], row["rank"]) for row in rows}
    print(f"\n{len(ranks)} ranks -> {args.csv.relative_to(REPO)}")
    for component in COMPONENTS:
        errors = [float(row["error_percent"]) for row in rows if row["component"] == component]
        print(f"{component:17s} median {statistics.median(errors):+8.4f}%  min {min(errors):+8.4f}%  "
              f"max {max(errors):+8.4f}%")
    agree = {(row["model"], row["layers_per_rank"], row["microbatches"], row["seq"]):
             row["estimate_busiest_rank"] == row["measured_busiest_rank"] for row in rows}
    print(f"busiest rank agrees in {sum(agree.values())} of {len(agree)} layouts")


if __name__ == "__main__":
    main()
