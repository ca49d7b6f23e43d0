"""Per-rank memory under tensor (and sequence) parallelism, measured with PyTorch's DTensor TP
(torchtitan's Llama plan) on fake tensors and a fake process group, against the estimator with
``tp_impl="dtensor"``.

Weights and optimizer states match to the byte (plus AdamW's fp32 step counters), gradients too;
activations and phase peaks match within ``unmodelled_bytes``: the rotary tables and a few
per-token index tensors, under 1% of the activations here. The tolerance is that budget, not a
percentage, so any new difference larger than a per-token index tensor fails. The Megatron-style
estimate (the default) differs from DTensor's by three terms, derived by hand below.
"""

from __future__ import annotations

from dataclasses import replace

import pytest

pytest.importorskip("torch")

from memcalc.config import TrainSettings  # noqa: E402
from memcalc.estimate.training import estimate_training  # noqa: E402
from memcalc.library import resolve_model  # noqa: E402
from memcalc.parallel import ParallelConfig  # noqa: E402
from memcalc.validate.tensor_parallel import measure_tensor_parallel, unmodelled_bytes  # noqa: E402

BATCH, SEQ = 2, 128
LAYOUTS = [(1, False), (2, False), (2, True), (4, False), (4, True)]
# a Llama-3-shaped model, small: GQA (8 query heads, 4 key/value heads), SwiGLU, untied head
MODEL = replace(resolve_model("llama-3-8b"), name="tiny-llama", hidden_size=256, num_layers=2,
                num_attention_heads=8, num_kv_heads=4, head_dim=32, intermediate_size=512, vocab_size=2048)


def _estimate(tp: int, sp: bool, tp_impl: str = "dtensor"):
    settings = TrainSettings(precision="pure-bf16", batch_size=BATCH, seq_len=SEQ, attention="sdpa")
    return estimate_training(MODEL, settings, ParallelConfig(tp=tp, sp=sp, pad_vocab=False, tp_impl=tp_impl))


@pytest.fixture(scope="module")
def measured():
    return {layout: measure_tensor_parallel(MODEL, *layout, batch_size=BATCH, seq_len=SEQ) for layout in LAYOUTS}


def _observed(measurement) -> dict[str, int]:
    forward, backward, step = measurement.phase_peaks
    return {"weights": measurement.weights, "gradients": measurement.gradients,
            "optimizer_states": measurement.optimizer_states, "activations": measurement.activations,
            "forward": forward, "backward": backward, "optimizer_step": step, "total": measurement.total}


@pytest.mark.parametrize("tp,sp", LAYOUTS)
def test_weights_and_optimizer_states_per_rank(measured, tp, sp):
    """Heads, MLP width and vocabulary divided by TP, norms whole: the estimator's rank_params.
    AdamW (pure bf16) keeps two bf16 moments per parameter and one fp32 step per tensor."""
    estimate = _estimate(tp, sp)
    measurement = measured[(tp, sp)]
    assert measurement.weights == estimate.component("weights").bytes
    num_tensors = 3 + 9 * MODEL.num_layers  # embedding, final norm, head; 9 per layer
    assert measurement.optimizer_states == estimate.component("optimizer_states").bytes + 4 * num_tensors


def test_weights_divide_by_tp_except_norms(measured):
    norms = 2 * (2 * MODEL.num_layers + 1) * MODEL.hidden_size  # bf16 norm weights, replicated
    whole = measured[(1, False)].weights
    for tp in (2, 4):
        assert measured[(tp, False)].weights == (whole - norms) // tp + norms
        assert measured[(tp, True)].weights == measured[(tp, False)].weights


@pytest.mark.parametrize("tp,sp", LAYOUTS)
def test_gradients_per_rank(measured, tp, sp):
    """Every gradient is a shard but the embedding's: DTensor's embedding_dense_backward has no
    vocab-sharded strategy, so each rank computes the whole V x h gradient."""
    assert measured[(tp, sp)].gradients == _estimate(tp, sp).component("gradients").bytes
    replicated = 0 if tp == 1 else (MODEL.vocab_size - MODEL.vocab_size // tp) * MODEL.hidden_size * 2
    megatron = _estimate(tp, sp, "megatron").component("gradients").bytes
    assert measured[(tp, sp)].gradients == megatron + replicated


@pytest.mark.parametrize("tp,sp", LAYOUTS)
def test_activations_and_phases_match_the_dtensor_estimate(measured, tp, sp):
    estimate = _estimate(tp, sp)
    measurement = measured[(tp, sp)]
    slack = unmodelled_bytes(MODEL, BATCH, SEQ)
    assert slack < 0.01 * measurement.activations
    forward, backward, step = measurement.phase_peaks
    for name, observed in (("forward", forward), ("backward", backward), ("optimizer_step", step)):
        # the estimator never overestimates here, and misses nothing beyond the unmodelled tensors
        assert 0 <= observed - estimate.phases[name] <= slack, name
    assert 0 <= measurement.total - estimate.total <= slack


def test_dtensor_differs_from_megatron_by_three_terms():
    """By hand, per rank: loss_parallel keeps one more fp32 logits tensor (4 B x tokens x V/T) in
    forward and holds four fp32 logits-size tensors in backward where aten holds three; with SP the
    gathered inputs of the q/k/v, gate/up and output layers are saved whole
    ((2L + 1) x tokens x h x 2 B x (1 - 1/T)); the embedding gradient is whole (above)."""
    tokens = BATCH * SEQ
    for tp, sp in LAYOUTS:
        dtensor, megatron = _estimate(tp, sp), _estimate(tp, sp, "megatron")
        loss = 4 * tokens * MODEL.vocab_size // tp if tp > 1 else 0
        gathered = (2 * MODEL.num_layers + 1) * (tokens - tokens // tp) * MODEL.hidden_size * 2 if sp else 0
        assert dtensor.phases["forward"] - megatron.phases["forward"] == loss + gathered


def test_sequence_parallel_and_tp_shrink_activations(measured):
    for tp in (2, 4):
        assert measured[(tp, True)].activations < measured[(tp, False)].activations
    assert measured[(4, False)].activations < measured[(2, False)].activations < measured[(1, False)].activations


def test_local_ops_of_dtensor_operators_are_counted():
    """loss_parallel's log-softmax runs inside the DTensor handler, where LiveBytesTracker alone
    sees only its result: counting the fake mode's operators adds the shifted logits and exp."""
    with_local = measure_tensor_parallel(MODEL, 2, False, batch_size=BATCH, seq_len=SEQ, count_local_ops=True)
    without = measure_tensor_parallel(MODEL, 2, False, batch_size=BATCH, seq_len=SEQ, count_local_ops=False)
    local_logits = 4 * BATCH * SEQ * MODEL.vocab_size // 2
    assert with_local.forward_activations - without.forward_activations >= local_logits
    assert with_local.weights == without.weights and with_local.gradients == without.gradients
