"""ZeRO-3 per-rank memory measured with PyTorch's FSDP2 under a fake process group (issue 3,
item 9): the measurement side of the parallel estimator, which compares against it."""

from __future__ import annotations

from dataclasses import replace

import pytest

pytest.importorskip("torch")

from memcalc.estimate.params import count_params  # noqa: E402
from memcalc.library import resolve_model  # noqa: E402
from memcalc.validate.fsdp import measure_fsdp  # noqa: E402


@pytest.fixture(scope="module")
def measurements():
    model = replace(resolve_model("llama-3.2-1b"), num_layers=2)
    return count_params(model).total, {n: measure_fsdp(model, n, seq_len=128) for n in (1, 2, 4, 8)}


@pytest.mark.parametrize("world_size", [2, 4, 8])
def test_fsdp2_shards_weights_gradients_and_adam_states(measurements, world_size):
    """ZeRO paper (Rajbhandari et al. 2020) P_os+g+p: every rank holds 1/N of parameters, gradients
    and optimizer states (pure bf16 here: 2 + 2 + 4 bytes per parameter; every dimension of this
    model divides by 8, so FSDP2 pads nothing). AdamW keeps one fp32 step counter per tensor."""
    params, by_world = measurements
    measured = by_world[world_size]
    assert measured.weights == 2 * params // world_size
    assert measured.gradients == 2 * params // world_size
    num_tensors = 2 + 2 * 9  # embedding, final norm, and 9 tensors per layer
    assert measured.optimizer_states == 4 * params // world_size + 4 * num_tensors  # fp32 step counters


def test_fsdp2_peak_falls_as_ranks_grow(measurements):
    _params, by_world = measurements
    peaks = [by_world[n].peak for n in (1, 2, 4, 8)]
    assert peaks == sorted(peaks, reverse=True)
    # the sharded state shrinks by 1/N; the activations and the gathered layers do not
    assert by_world[1].peak - by_world[8].peak < 8 * (by_world[1].weights - by_world[8].weights)
