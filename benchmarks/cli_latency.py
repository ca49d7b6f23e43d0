"""CLI start-up latency against the floor of the libraries memcalc is built on.

Prints, over 20 alternating runs, the median wall time of
``memcalc train llama-13b --dtype bf16`` (table) and of the same with ``--json``, each divided
by the median of ``python -c "import typer, rich.console, rich.table, pydantic, yaml"``.
Target (issue 2): both ratios at most 1.25.

    python benchmarks/cli_latency.py [--runs 20]
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import time

FLOOR = [sys.executable, "-c", "import typer, rich.console, rich.table, pydantic, yaml"]


def _memcalc() -> list[str]:
    script = shutil.which("memcalc")
    return [script] if script else [sys.executable, "-m", "memcalc"]


def _wall_seconds(command: list[str]) -> float:
    # An installed package has its bytecode compiled (pip does it at install); an environment that
    # forbids writing bytecode would make every run compile memcalc's sources instead.
    env = {key: value for key, value in os.environ.items() if key != "PYTHONDONTWRITEBYTECODE"}
    env |= {"COLUMNS": "100", "NO_COLOR": "1"}
    start = time.perf_counter()
    subprocess.run(command, check=True, stdout=subprocess.DEVNULL, env=env)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=20)
    runs = parser.parse_args().runs
    train = [*_memcalc(), "train", "llama-13b", "--dtype", "bf16"]
    commands = {"floor": FLOOR, "table": train, "json": [*train, "--json"]}
    for command in commands.values():  # warm the file cache and bytecode
        _wall_seconds(command)
    samples: dict[str, list[float]] = {name: [] for name in commands}
    for _ in range(runs):
        for name, command in commands.items():
            samples[name].append(_wall_seconds(command))
    medians = {name: statistics.median(values) for name, values in samples.items()}
    print(f"runs: {runs} alternating; command: {' '.join(train)}")
    for name, median in medians.items():
        print(f"median {name:5s}: {median * 1000:7.1f} ms")
    for name in ("table", "json"):
        ratio = medians[name] / medians["floor"]
        verdict = "ok" if ratio <= 1.25 else "above target"
        print(f"ratio {name:5s}/floor: {ratio:.3f} (target <= 1.25: {verdict})")


if __name__ == "__main__":
    main()
