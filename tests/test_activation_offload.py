"""Activation offloading (``--offload-activations``, torchtune's ``enable_activation_offloading``).

The estimate (memcalc.estimate.offload) is checked against a measurement: the fake-tensor harness
runs torchtune's ``OffloadActivations`` rules (memcalc.validate.offload: what is offloaded, the
five-tensor forward stash, the backward stash held until the next node, ``NoOpManager`` on the
output head), so the tracker sees what the GPU would hold; the host bytes are the copies the
hooks make. Then bad inputs through the CLI, and the property that offloading never raises the
allocated peak."""

from __future__ import annotations

from dataclasses import replace

import pytest
from hypothesis import given
from hypothesis import strategies as st

from memcalc.config import ModelConfig, TrainSettings
from memcalc.estimate.training import estimate_training
from memcalc.library import resolve_model

# (model, layers, precision, batch, seq, recompute, loss): each row exercises other terms
ROWS = [
    ("llama-2-7b", 1, "pure-bf16", 1, 512, "none", "full"),  # small vocabulary: the layers' backward peaks show
    ("llama-2-7b", 2, "amp-bf16", 1, 512, "full", "full"),  # autocast's cast cache, recomputed layers
    ("mistral-7b", 1, "pure-bf16", 1, 1024, "none", "chunked"),  # GQA, one slice of the chunked loss
    ("llama-3.2-1b", 2, "fp32", 1, 256, "full", "full"),  # tied head, an fp32 stream (the first norm aliases)
    ("gpt2", 2, "mixed-bf16", 2, 256, "none", "full"),  # LayerNorm, plain MLP, learned positions, dropout 0.1
    ("qwen3-0.6b", 2, "pure-bf16", 1, 256, "none", "full"),  # q/k norms (their saves copied twice)
]
PHASES = ("phase:forward", "phase:backward", "phase:optimizer_step")


def _settings(precision, batch, seq, recompute, loss, offload=True, optimizer="adamw") -> TrainSettings:
    return TrainSettings(precision=precision, batch_size=batch, seq_len=seq, recompute=recompute, loss=loss,
                         offload_activations=offload, optimizer=optimizer)


def _model(name: str, layers: int) -> ModelConfig:
    from memcalc.validate.cli_support import with_layers

    return with_layers(resolve_model(name), layers)


@pytest.mark.parametrize("name,layers,precision,batch,seq,recompute,loss", ROWS,
                         ids=["-".join(map(str, row)) for row in ROWS])
def test_estimate_matches_the_offloading_harness(name, layers, precision, batch, seq, recompute, loss):
    """Activations, every phase, the total and the host copies within 0.5% of the measurement
    (each row is exact to a few kB but for GPT-2's dropout masks)."""
    pytest.importorskip("torch")
    from memcalc.validate.cli_support import run_training_validation

    model, settings = _model(name, layers), _settings(precision, batch, seq, recompute, loss)
    estimate = estimate_training(model, settings)
    comparison = run_training_validation(model, settings, estimate, "fake", force=False)
    rows = {row.key: row for row in comparison.rows}
    for key in ("activations", "activations_offloaded", *PHASES):
        assert abs(rows[key].error_percent) < 0.5, (key, rows[key])
    assert abs(comparison.total.error_percent) < 0.5


def test_offloading_frees_the_layers_and_copies_them_to_the_host():
    """Measured, not estimated: with offloading the forward keeps less on the GPU than without,
    the host holds at least what left the GPU, and with full recompute only the checkpoints'
    inputs and the final norm go."""
    pytest.importorskip("torch")
    from memcalc.validate.run import TrainWorkload, measure_training

    model = _model("llama-2-7b", 2)
    runs = {(offload, recompute): measure_training(model, TrainWorkload(
        precision="pure-bf16", seq_len=512, recompute=recompute, offload_activations=offload, iterations=1))
        for offload in (False, True) for recompute in ("none", "full")}
    for recompute in ("none", "full"):
        plain, offloaded = runs[False, recompute], runs[True, recompute]
        freed = plain.phases["forward"].peak_bytes - offloaded.phases["forward"].peak_bytes
        assert freed > 0
        assert offloaded.total <= plain.total
        assert offloaded.components["activations_offloaded"] >= freed
    # by hand, T = 512, h = 4096: each checkpoint copies its layer's input (2 x T*h*2); the final
    # norm's pow and product copy its fp32 input twice (2 x T*h*4), rsqrt and the product its root
    # twice (2 x 4T), the weight's product the bf16 normalised tensor (T*h*2); the embedding its
    # int64 token ids (8T)
    tokens, h = 512, 4096
    by_hand = 2 * tokens * h * 2 + 2 * tokens * h * 4 + 2 * 4 * tokens + tokens * h * 2 + 8 * tokens
    assert runs[True, "full"].components["activations_offloaded"] == by_hand == 29_368_320


@pytest.mark.parametrize("args,starts_with", [
    (("llama-2-7b", "--offload-activations", "--lora-rank", "8"),
     "error: --offload-activations is modelled for full training, not with --lora-rank"),
    (("llama-2-7b", "--offload-activations", "--attention", "eager"),
     "error: --offload-activations is modelled with sdpa or flash --attention, not eager"),
    (("llama-2-7b", "--offload-activations", "--recompute", "op"),
     "error: --offload-activations is modelled with --recompute none or full on every layer"),
    (("llama-2-7b", "--offload-activations", "--activation-model", "megatron"),
     "error: --offload-activations has no Megatron formula"),
    (("mixtral-8x7b", "--offload-activations"),
     "error: --offload-activations is modelled for dense attention layers on one GPU, not with MoE layers"),
    (("llama-2-7b", "--offload-activations", "--gpus", "8"),
     "error: --offload-activations is modelled for dense attention layers on one GPU, not with a parallel layout"),
])
def test_unmodelled_combinations_exit_2_with_one_line(run_cli, args, starts_with):
    result = run_cli("train", *args)
    assert result.exit_code == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(starts_with), lines
    assert "Traceback" not in result.stderr


def test_the_host_row_and_the_assumption_are_shown_only_when_asked(run_cli):
    on = run_cli("train", "llama-2-7b", "--offload-activations")
    off = run_cli("train", "llama-2-7b")
    assert on.exit_code == off.exit_code == 0
    assert "Activations offloaded (pinned)" in on.stdout and "OffloadActivations" in on.stdout
    assert "offload" not in off.stdout.lower()


def test_one_checkpointed_layer_is_the_exception_measured_and_estimated():
    """The backward stash keeps the final norm's brought-back fp32 input until the next node that
    brings a tensor back, the last layer's first: beside that layer's backward it outweighs what
    offloading freed when there is no checkpoint below to free (one layer, full recompute). The
    harness and the estimate both show the peak rising, by the same bytes."""
    pytest.importorskip("torch")
    from memcalc.validate.run import TrainWorkload, measure_training

    model = _model("llama-2-7b", 1)
    measured, estimated = {}, {}
    for offload in (False, True):
        workload = TrainWorkload(precision="pure-bf16", optimizer="sgd", seq_len=2048, recompute="full",
                                 loss="chunked", offload_activations=offload)
        measured[offload] = measure_training(model, workload).total
        settings = _settings("pure-bf16", 1, 2048, "full", "chunked", offload, optimizer="sgd")
        estimated[offload] = estimate_training(model, settings).total
    assert measured[True] > measured[False]
    assert abs(estimated[True] - measured[True]) < 1e-4 * measured[True]


@st.composite
def dense_models(draw) -> ModelConfig:
    """Transformer shapes as they are trained: h = heads x head_dim >= 512, an MLP 2 to 4 times
    wider, a vocabulary beyond the width."""
    kv_heads = draw(st.sampled_from([1, 2, 4, 8]))
    heads = kv_heads * draw(st.integers(1, 4))
    head_dim = draw(st.sampled_from([64, 128]))
    hidden = heads * head_dim
    if hidden < 512:
        heads, kv_heads = heads * (512 // hidden), kv_heads * (512 // hidden)
        hidden = heads * head_dim
    return ModelConfig(
        name="random", hidden_size=hidden, num_layers=draw(st.integers(4, 40)),
        num_attention_heads=heads, num_kv_heads=kv_heads, intermediate_size=hidden * draw(st.integers(2, 4)),
        vocab_size=draw(st.integers(hidden, 200_000)), max_position_embeddings=131072,
        tie_word_embeddings=draw(st.booleans()), mlp=draw(st.sampled_from(["gated", "plain"])),
        norm=draw(st.sampled_from(["rmsnorm", "layernorm"])), qkv_bias=draw(st.booleans()),
        position_embedding=draw(st.sampled_from(["rotary", "learned"])),
    )


@given(dense_models(), st.sampled_from(["mixed-bf16", "pure-bf16", "fp32", "amp-bf16"]),
       st.sampled_from(["adamw", "sgd"]), st.integers(1, 16), st.integers(1, 8),
       st.sampled_from(["none", "full"]), st.sampled_from(["full", "chunked"]))
def test_offloading_never_raises_the_allocated_peak_beyond_a_few_stream_tensors(model, precision, optimizer, batch,
                                                                              widths, recompute, loss):
    """With a micro-batch of at least as many tokens as the MLP is wide (a layer's activations
    then outweigh any of its weights), offloading never raises the activations row or the
    allocated peak by more than eight fp32 hidden-size tensors and the token and position ids:
    what the backward stash lags behind (a norm's brought-back input, the ids brought back) and
    the small terms the estimate without offloading leaves out but the offloaded one counts as
    measured (the first norm's backward, a checkpointed layer's streams, the gradient into the
    embedding). Mostly it lowers both by the layers' saved tensors. (Fewer layers or tokens can
    raise it more: torchtune copies each ``weight.t()`` back too; the test above measures one
    such step.)"""
    seq = -(-widths * model.intermediate_size // batch)
    settings = TrainSettings(precision=precision, optimizer=optimizer, batch_size=batch, seq_len=seq,
                             recompute=recompute, loss=loss)
    plain = estimate_training(model, settings)
    offloaded = estimate_training(model, replace(settings, offload_activations=True))
    tokens = batch * seq
    slack = 8 * tokens * model.hidden_size * 4 + 16 * (tokens + seq)
    assert offloaded.total <= plain.total + slack
    assert offloaded.component("activations").bytes <= plain.component("activations").bytes + slack
    assert offloaded.component("activations_offloaded").bytes > 0
