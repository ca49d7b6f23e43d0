"""Advice when a step does not fit (issue 7): every suggestion is priced by the train estimator
with that one change, lowers the peak, and comes in the seed's order."""

from __future__ import annotations

import json

GROUP_ORDER = ["parallelism", "precision", "recompute", "offload", "kernels"]


def test_advice_is_the_train_estimate_of_each_change(run_cli):
    result = run_cli("train", "llama-2-7b", "--seq", "4096", "--batch", "4", "--gpu", "h100", "--json")
    document = json.loads(result.stdout)
    assert not document["fits"]["fits"]
    advice = document["advice"]
    current = document["memory"]["total"]
    groups = [item["group"] for item in advice]
    assert groups == sorted(groups, key=GROUP_ORDER.index)
    assert {"--recompute full", "--no-master-weights (pure 16-bit)", "--optimizer adam8bit"} <= {
        item["change"] for item in advice}
    flags = {"--recompute full": ["--recompute", "full"], "--no-master-weights (pure 16-bit)": ["--no-master-weights"],
             "--optimizer adam8bit": ["--optimizer", "adam8bit"], "--loss chunked": ["--loss", "chunked"]}
    for item in advice:
        assert item["saved"] == current - item["total"] > 0
        assert item["fits"] == (item["total"] <= 80 * 2**30)
        if item["change"] in flags:
            again = json.loads(run_cli("train", "llama-2-7b", "--seq", "4096", "--batch", "4",
                                       *flags[item["change"]], "--json").stdout)
            assert again["memory"]["total"] == item["total"]


def test_no_advice_when_it_fits(run_cli):
    document = json.loads(run_cli("train", "llama-3.2-1b", "--gpu", "h100", "--json").stdout)
    assert document["fits"]["fits"] and "advice" not in document
