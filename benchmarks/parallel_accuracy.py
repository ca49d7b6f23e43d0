"""Per-rank accuracy under parallel layouts: the estimator against rank 0 of a TP group
(memcalc.validate.tensor_parallel) and of an FSDP2 group (memcalc.validate.fsdp), measured on fake
tensors and a fake process group. docs/accuracy.md summarises the CSV (benchmarks/accuracy.py).

    python benchmarks/parallel_accuracy.py            # writes benchmarks/results/parallel_fake.csv

Full-size Llama shapes (TP at two layers, FSDP2 at four under each ``--fsdp-wrap``, also in FSDP2's mixed
precision), pure bf16, AdamW (foreach), SDPA, batch 1. For every
component the CSV gives the estimate with ``--tp-impl dtensor`` (the framework measured), the
measurement and the error (estimate - measured, in percent of measured), and the error of the
default Megatron-style estimate, which differs by three terms (loss_parallel's extra fp32 logits,
SP's gathered linear inputs saved whole, the replicated embedding gradient; docs/parallelism.md).
"""

from __future__ import annotations

import argparse
import csv
import itertools
import statistics
import sys
import time
from dataclasses import replace
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from memcalc.config import TrainSettings  # noqa: E402
from memcalc.estimate.training import estimate_training  # noqa: E402
from memcalc.library import resolve_model  # noqa: E402
from memcalc.parallel import FSDPWrap, ParallelConfig  # noqa: E402
from memcalc.validate.fsdp import measure_fsdp  # noqa: E402
from memcalc.validate.tensor_parallel import measure_tensor_parallel  # noqa: E402

MODELS = ("llama-2-7b", "llama-3-8b")
LAYERS = 2
BATCH = 1
SEQ_LENS = (1024, 2048)
TPS = (1, 2, 4, 8)
FSDP_RANKS = (2, 4, 8)
FSDP_PRECISIONS = ("pure-bf16", "mixed-bf16")
FSDP_LAYERS = 4  # the second layer's backward is the first with a reduce-scatter before it
COMPONENTS = ("weights", "gradients", "optimizer_states", "activations", "forward", "backward",
              "optimizer_step", "total")


def _error(estimated: int, measured: int) -> float:
    return 100.0 * (estimated - measured) / measured if measured else 0.0


def _figures(estimate) -> dict[str, int]:
    figures = {name: estimate.component(name).bytes for name in
               ("weights", "gradients", "optimizer_states", "activations")}
    figures.update(estimate.phases)
    figures["total"] = estimate.total
    return figures


def run_case(model_name: str, seq_len: int, tp: int, sp: bool) -> list[dict]:
    model = replace(resolve_model(model_name), num_layers=LAYERS)
    settings = TrainSettings(precision="pure-bf16", batch_size=BATCH, seq_len=seq_len, attention="sdpa")
    estimated = _figures(estimate_training(model, settings, ParallelConfig(tp=tp, sp=sp, pad_vocab=False,
                                                                           tp_impl="dtensor")))
    megatron = _figures(estimate_training(model, settings, ParallelConfig(tp=tp, sp=sp, pad_vocab=False)))
    measured = measure_tensor_parallel(model, tp, sp, batch_size=BATCH, seq_len=seq_len)
    observed = {"weights": measured.weights, "gradients": measured.gradients,
                "optimizer_states": measured.optimizer_states, "activations": measured.activations,
                "forward": measured.phase_peaks[0], "backward": measured.phase_peaks[1],
                "optimizer_step": measured.phase_peaks[2], "total": measured.total}
    rows = []
    for name in COMPONENTS:
        rows.append({
            "model": model_name, "layers": LAYERS, "batch": BATCH, "seq": seq_len, "tp": tp, "sp": int(sp),
            "component": name, "estimated_bytes": estimated[name], "measured_bytes": observed[name],
            "error_percent": f"{_error(estimated[name], observed[name]):.4f}",
            "megatron_estimate_bytes": megatron[name],
            "megatron_error_percent": f"{_error(megatron[name], observed[name]):.4f}",
        })
    return rows


def run_fsdp_case(model_name: str, seq_len: int, ranks: int, wrap: str, precision: str = "pure-bf16") -> list[dict]:
    """FSDP2 full sharding (``--fsdp full --fsdp-wrap WRAP``), pure bf16 or mixed (fp32 parameters,
    bf16 compute, fp32 reduce: torchtitan's MixedPrecisionPolicy): the estimate's phases against
    rank 0's."""
    model = replace(resolve_model(model_name), num_layers=FSDP_LAYERS)
    settings = TrainSettings(precision=precision, batch_size=BATCH, seq_len=seq_len, attention="sdpa")
    estimate = estimate_training(model, settings, ParallelConfig(dp=ranks, zero=3, fsdp=True, fsdp_wrap=wrap))
    mixed = precision == "mixed-bf16"
    measured = measure_fsdp(model, ranks, dtype="fp32" if mixed else "bf16", batch_size=BATCH, seq_len=seq_len,
                            wrap=wrap, mixed_precision=mixed)
    estimated = {"weights": estimate.component("weights").bytes, "gradients": estimate.component("gradients").bytes,
                 "optimizer_states": estimate.component("optimizer_states").bytes, **estimate.phases,
                 "total": estimate.total}
    observed = {"weights": measured.weights, "gradients": measured.gradients,
                "optimizer_states": measured.optimizer_states, "forward": measured.phase_peaks[0],
                "backward": measured.phase_peaks[1], "optimizer_step": measured.phase_peaks[2], "total": measured.peak}
    return [{"model": model_name, "layers": FSDP_LAYERS, "batch": BATCH, "seq": seq_len, "tp": 1, "sp": 0,
             "fsdp_ranks": ranks, "fsdp_wrap": wrap, "precision": precision, "component": name, "estimated_bytes": estimated[name],
             "measured_bytes": observed[name], "error_percent": f"{_error(estimated[name], observed[name]):.4f}",
             "megatron_estimate_bytes": "", "megatron_error_percent": ""} for name in observed]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--csv", type=Path, default=REPO / "benchmarks" / "results" / "parallel_fake.csv")
    args = parser.parse_args()
    rows: list[dict] = []
    for model_name in MODELS:
        for seq_len in SEQ_LENS:
            for tp in TPS:
                for sp in ((False, True) if tp > 1 else (False,)):
                    start = time.perf_counter()
                    case = run_case(model_name, seq_len, tp, sp)
                    rows += case
                    by = {row["component"]: row for row in case}
                    print(f"{model_name:11s} L{LAYERS} b{BATCH} s{seq_len:<5d} tp{tp} sp{int(sp)}  "
                          f"act {float(by['activations']['error_percent']):+7.2f}%  "
                          f"grads {float(by['gradients']['error_percent']):+7.2f}%  "
                          f"total {float(by['total']['error_percent']):+7.2f}% "
                          f"(megatron-style {float(by['total']['megatron_error_percent']):+6.2f}%)  "
                          f"{time.perf_counter() - start:4.1f}s", flush=True)
    for row in rows:
        row["fsdp_ranks"], row["fsdp_wrap"], row["precision"] = 0, "", "pure-bf16"
    for model_name in MODELS:
        for seq_len, precision in itertools.product(SEQ_LENS, FSDP_PRECISIONS):
            for ranks, wrap in itertools.product(FSDP_RANKS, FSDPWrap):
                case = run_fsdp_case(model_name, seq_len, ranks, wrap.value, precision)
                rows += case
                by = {row["component"]: row for row in case}
                print(f"{model_name:11s} L{FSDP_LAYERS} b{BATCH} s{seq_len:<5d} fsdp{ranks} {wrap.value:20s} "
                      f"{precision:10s}  "
                      f"forward {float(by['forward']['error_percent']):+6.2f}%  "
                      f"backward {float(by['backward']['error_percent']):+6.2f}%  "
                      f"total {float(by['total']['error_percent']):+6.2f}%", flush=True)
    args.csv.parent.mkdir(parents=True, exist_ok=True)
    with args.csv.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[-1]))
        writer.writeheader()
        writer.writerows(rows)

    def summary(component: str, column: str) -> str:
        errors = [abs(float(row[column])) for row in rows if row["component"] == component and row[column] != ""]
        return f"median {statistics.median(errors):6.2f}%  max {max(errors):6.2f}%"

    print(f"\n{len({(r['model'], r['seq'], r['tp'], r['sp'], r['fsdp_ranks'], r['fsdp_wrap'], r['precision']) for r in rows})} cases -> "
          f"{args.csv.relative_to(REPO)}")
    for component in ("weights", "optimizer_states", "gradients", "activations", "total"):
        print(f"{component:17s} dtensor estimate: {summary(component, 'error_percent')}   "
              f"megatron-style: {summary(component, 'megatron_error_percent')}")


if __name__ == "__main__":
    main()
