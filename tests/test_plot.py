"""--plot: a valid image of the expected size whose plotted values (read back from the figure's
artists) are the numbers the JSON document gives."""

from __future__ import annotations

import json

import pytest

pytest.importorskip("matplotlib")

GIB = 2**30


def test_compare_plot_bars_are_the_compared_components(run_cli, tmp_path):
    from memcalc.config import TrainSettings
    from memcalc.estimate.training import estimate_training
    from memcalc.library import resolve_model
    from memcalc.parallel import ParallelConfig
    from memcalc.plot import component_figure

    path = tmp_path / "compare.png"
    result = run_cli("compare", "llama-3-8b", "--scenario", "gpus=8,zero=3", "--scenario", "tp=2", "--gpu", "h100",
                     "--plot", str(path), "--json")
    assert result.exit_code == 0, result.stderr
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    width, height = int.from_bytes(path.read_bytes()[16:20], "big"), int.from_bytes(path.read_bytes()[20:24], "big")
    assert (width, height) == (800, 450)  # 8 x 4.5 inches at 100 dpi
    document = json.loads(result.stdout)

    model = resolve_model("llama-3-8b")
    estimates = [estimate_training(model, TrainSettings(), ParallelConfig(dp=8, zero=3)),
                 estimate_training(model, TrainSettings(), ParallelConfig(tp=2))]
    figure, _series = component_figure(["a", "b"], estimates, 80 * GIB)
    axes = figure.axes[0]
    for container in axes.containers:
        key = container.patches[0].get_gid()
        plotted = [bar.get_height() for bar in container]
        expected = [item["memory"].get(key, 0) / GIB for item in document["scenarios"]]
        assert plotted == pytest.approx(expected), key
    capacity = next(line for line in axes.lines if line.get_gid() == "capacity")
    assert capacity.get_ydata()[0] == pytest.approx(80)
    totals = next(line for line in axes.lines if line.get_gid() == "total")
    assert list(totals.get_ydata()) == pytest.approx([item["memory"]["total"] / GIB for item in document["scenarios"]])


def test_sweep_plot_lines_are_the_swept_totals(run_cli, tmp_path):
    from memcalc.plot import sweep_figure
    from memcalc.sweep import run_sweep
    from memcalc.config import TrainSettings
    from memcalc.library import resolve_model
    from memcalc.scenario import Scenario

    path = tmp_path / "sweep.svg"
    result = run_cli("sweep", "llama-3-8b", "--over", "seq=1024,4096", "--plot", str(path), "--json")
    assert result.exit_code == 0, result.stderr
    assert path.read_text().lstrip().startswith("<?xml") and "<svg" in path.read_text()
    document = json.loads(result.stdout)
    points = run_sweep(resolve_model("llama-3-8b"), TrainSettings(), Scenario(), "seq", [1024, 4096])
    figure, _ = sweep_figure("seq", [p.value for p in points], [p.estimate for p in points])
    totals = next(line for line in figure.axes[0].lines if line.get_gid() == "total")
    assert list(totals.get_xdata()) == [1024, 4096]
    assert list(totals.get_ydata()) == pytest.approx([p["memory"]["total"] / GIB for p in document["points"]])


def test_plot_path_must_be_png_or_svg(run_cli, tmp_path):
    result = run_cli("train", "gpt2", "--plot", str(tmp_path / "out.jpg"))
    assert result.exit_code == 2 and "must end in .png or .svg" in result.stderr
