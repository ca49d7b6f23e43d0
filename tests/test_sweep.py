"""memcalc sweep: ranges, one estimate per value through the train estimator, where it stops fitting."""

from __future__ import annotations

import json

import pytest

from memcalc.errors import InputError
from memcalc.sweep import parse_over


@pytest.mark.parametrize(
    ("text", "key", "values"),
    [
        ("seq=1k..8k", "seq", [1024, 2048, 4096, 8192]),
        ("batch=1..6", "batch", [1, 2, 4, 6]),  # powers of two, then the end point
        ("gpus=8,64,16", "gpus", [8, 16, 64]),
        ("grad-accum=2..2", "grad_accum", [2]),
    ],
)
def test_parse_over(text, key, values):
    assert parse_over(text) == (key, values)


@pytest.mark.parametrize(("text", "message"), [
    ("heads=1..4", "KEY one of seq, batch, gpus, grad_accum, lora_rank"),
    ("seq=8k..1k", "runs backwards"),
    ("seq=1x", "is not a whole number"),
    ("seq=" + ",".join(str(n) for n in range(1, 70)), "at most 64"),
])
def test_parse_over_errors(text, message):
    with pytest.raises(InputError, match=message):
        parse_over(text)


def test_sweep_points_are_train_estimates(run_cli):
    result = run_cli("sweep", "llama-3-8b", "--over", "seq=1024,4096", "--recompute", "full", "--gpu", "h100", "--json")
    assert result.exit_code == 0, result.stderr
    document = json.loads(result.stdout)
    for point in document["points"]:
        train = json.loads(run_cli("train", "llama-3-8b", "--seq", str(point["value"]), "--recompute", "full",
                                   "--json").stdout)
        assert point["memory"] == train["memory"]
        assert point["fits"] == (train["memory"]["total"] <= 80 * 2**30)


def test_sweep_reports_the_first_value_that_does_not_fit(run_cli):
    """Llama-2-70B with TP 8 and FSDP at s 4096: more GPUs shard more state, so the smallest
    counts do not fit on an 80 GB GPU and the largest do; invalid GPU counts say why."""
    result = run_cli("sweep", "llama-2-70b", "--over", "gpus=8,12,64,128", "--scenario", "tp=8,fsdp=full",
                     "--seq", "4096", "--recompute", "full", "--gpu", "h100", "--json")
    document = json.loads(result.stdout)
    by_value = {point["value"]: point for point in document["points"]}
    assert "not divisible by tp x pp x cp" in by_value[12]["error"]
    totals = [by_value[n]["memory"]["total"] for n in (8, 64, 128)]
    assert totals == sorted(totals, reverse=True)
    assert document["first_not_fitting"] == next(n for n in (8, 64, 128)
                                                  if by_value[n]["memory"]["total"] > 80 * 2**30)


def test_sweep_lora_rank_grows_only_the_adapters(run_cli):
    """Adapters on q and v of Llama-2-7B: 32 layers x 2 x r x (4096 + 4096) trainable parameters,
    their fp32 gradients (4 B each) growing linearly with r."""
    document = json.loads(run_cli("sweep", "llama-2-7b", "--over", "lora_rank=8,64", "--json").stdout)
    gradients = {point["value"]: point["memory"]["gradients"] for point in document["points"]}
    assert gradients == {r: 4 * 32 * 2 * r * 8192 for r in (8, 64)}
