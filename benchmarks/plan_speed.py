"""Speed of the layout search (memcalc/plan.py): Llama-3-70B on H100-80GB, s = 8192, global batch
1024 sequences, every layout of 64, 256 and 1,024 GPUs. Issue 7 asks for under 2 s at 1,024 GPUs
on one core; the process is pinned to one CPU where the OS allows it.

Prints, per GPU count: the valid layouts enumerated (each gets a step time), the estimate_training
calls the pruned search made, the wall time of the first search in the process and the best of
three, and layouts evaluated per second (valid layouts / wall time).

    python benchmarks/plan_speed.py > benchmarks/results/plan_speed.txt
"""

from __future__ import annotations

import os
import platform
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from memcalc.gpus import resolve_gpu  # noqa: E402
from memcalc.library import resolve_model  # noqa: E402
from memcalc.plan import plan  # noqa: E402

MODEL, GPU, SEQ_LEN, GLOBAL_BATCH = "llama-3-70b", "h100-80gb", 8192, 1024
GPU_COUNTS = (64, 256, 1024)
REPEATS = 3
LIMIT_S = 2.0


def main() -> int:
    pinned = "no"
    if hasattr(os, "sched_setaffinity"):
        cpu = min(os.sched_getaffinity(0))
        os.sched_setaffinity(0, {cpu})
        pinned = f"cpu {cpu}"
    model, gpu = resolve_model(MODEL), resolve_gpu(GPU)
    print(f"memcalc plan speed: {MODEL} on {GPU}, seq {SEQ_LEN}, global batch {GLOBAL_BATCH}")
    print(f"python {platform.python_version()}, {platform.machine()}, pinned to one core: {pinned}")
    print()
    header = f"{'GPUs':>6} {'layouts':>8} {'estimates':>9} {'first (s)':>9} {'best (s)':>9} {'layouts/s':>10}  top layout"
    print(header)
    print("-" * len(header))
    worst = 0.0
    for gpus in GPU_COUNTS:
        times = []
        for _ in range(REPEATS):
            started = time.perf_counter()
            result = plan(model, gpu, gpus, seq_len=SEQ_LEN, global_batch=GLOBAL_BATCH)
            times.append(time.perf_counter() - started)
        counts = result.counts
        best = result.best
        top = f"{best.layout.describe()}: {best.step_time_s:.2f} s/step, MFU {best.mfu:.2f}" if best else "none fits"
        print(f"{gpus:>6} {counts.valid:>8} {counts.estimated:>9} {times[0]:>9.2f} {min(times):>9.2f} "
              f"{counts.valid / min(times):>10,.0f}  {top}")
        worst = max(worst, times[0])
    print()
    verdict = "within" if worst < LIMIT_S else "OVER"
    print(f"slowest search {worst:.2f} s: {verdict} the {LIMIT_S:.0f} s budget of issue 7")
    return 0 if worst < LIMIT_S else 1


if __name__ == "__main__":
    raise SystemExit(main())
