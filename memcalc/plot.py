"""Pictures of estimates (``--plot FILE.png|svg``): stacked bars of the components per scenario
with the GPU's capacity as a line, and memory against a swept variable. matplotlib is optional
(``pip install 'memcalc[plot]'``) and imported only here; the figures plot the same numbers the
tables print (GiB, from the estimates' components)."""

from __future__ import annotations

from pathlib import Path

from memcalc.errors import InputError

GIB = 2**30
# the components stacked, bottom to top; whatever a scenario lacks is zero
STACKED = ("weights", "weights_quantised", "weights_unquantised", "master_weights", "optimizer_states",
           "gradients", "gradient_accumulation", "optimizer_grad_copy", "sharding_working_set", "kv_cache",
           "activations", "logits", "optimizer_step_temporaries", "overhead")
FIGURE_SIZE = (8.0, 4.5)  # inches
DPI = 100


def _pyplot():
    try:
        import matplotlib
    except ImportError:
        raise InputError("--plot needs matplotlib: pip install 'memcalc[plot]'") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _check_path(path: str) -> Path:
    file = Path(path)
    if file.suffix.lower() not in (".png", ".svg"):
        raise InputError(f"--plot {path}: the file must end in .png or .svg")
    if not file.parent.exists():
        raise InputError(f"--plot {path}: the folder {file.parent} does not exist")
    return file


def component_bars(path: str, labels: list[str], estimates: list, capacity: int | None = None,
                   title: str = "") -> dict[str, list[float]]:
    """Stacked bars saved to ``path``; returns the plotted series (GiB) by component key."""
    file = _check_path(path)
    figure, series = component_figure(labels, estimates, capacity, title)
    _save(figure, file)
    return series


def sweep_lines(path: str, key: str, values: list[int], estimates: list, capacity: int | None = None,
                title: str = "") -> dict[str, list[float]]:
    """Lines against the swept variable saved to ``path``; returns the plotted series (GiB)."""
    file = _check_path(path)
    figure, series = sweep_figure(key, values, estimates, capacity, title)
    _save(figure, file)
    return series


def _save(figure, file: Path) -> None:
    plt = _pyplot()
    figure.savefig(file, dpi=DPI)
    plt.close(figure)


def component_figure(labels: list[str], estimates: list, capacity: int | None = None, title: str = ""):
    """Stacked bars: one per estimate, one segment per component in GiB (each bar's gid is the
    component key), the peak as a marker, the GPU's memory as a horizontal line."""
    plt = _pyplot()
    keys = [key for key in STACKED if any(key in {c.key for c in e.components} for e in estimates)]
    series = {key: [next((c.bytes for c in e.components if c.key == key), 0) / GIB for e in estimates]
              for key in keys}
    labels_by_key = {c.key: c.label for e in estimates for c in e.components}
    figure, axes = plt.subplots(figsize=FIGURE_SIZE, dpi=DPI)
    bottom = [0.0] * len(estimates)
    for key in keys:
        axes.bar(labels, series[key], bottom=bottom, label=labels_by_key[key], gid=key)
        bottom = [low + value for low, value in zip(bottom, series[key])]
    totals = [estimate.total / GIB for estimate in estimates]
    axes.plot(labels, totals, linestyle="none", marker="_", markersize=30, color="black", label="peak (total)",
              gid="total")
    if capacity is not None:
        axes.axhline(capacity / GIB, color="red", linestyle="--", label="GPU memory", gid="capacity")
    axes.set_ylabel("GiB per GPU")
    axes.set_title(title)
    axes.legend(fontsize="small", loc="upper left", bbox_to_anchor=(1.0, 1.0))
    figure.tight_layout()
    return figure, series | {"total": totals}


def sweep_figure(key: str, values: list[int], estimates: list, capacity: int | None = None, title: str = ""):
    """Memory per component and the peak against the swept variable (GiB; each line's gid is its
    component key); the GPU's memory as a line. Points that are not valid layouts are left out."""
    plt = _pyplot()
    points = [(value, estimate) for value, estimate in zip(values, estimates) if estimate is not None]
    xs = [value for value, _ in points]
    keys = [k for k in STACKED if any(k in {c.key for c in e.components} for _, e in points)]
    series = {k: [next((c.bytes for c in e.components if c.key == k), 0) / GIB for _, e in points] for k in keys}
    series["total"] = [estimate.total / GIB for _, estimate in points]
    figure, axes = plt.subplots(figsize=FIGURE_SIZE, dpi=DPI)
    for k in keys:
        axes.plot(xs, series[k], marker="o", label=k.replace("_", " "), gid=k)
    axes.plot(xs, series["total"], marker="o", color="black", linewidth=2, label="peak (total)", gid="total")
    if capacity is not None:
        axes.axhline(capacity / GIB, color="red", linestyle="--", label="GPU memory", gid="capacity")
    if len(xs) > 1 and xs[-1] / xs[0] >= 8:
        axes.set_xscale("log", base=2)
    axes.set_xlabel(key)
    axes.set_ylabel("GiB per GPU")
    axes.set_title(title)
    axes.legend(fontsize="small", loc="upper left", bbox_to_anchor=(1.0, 1.0))
    figure.tight_layout()
    return figure, series
