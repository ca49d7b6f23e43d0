"""Training estimates of Qwen3-Next (memcalc/estimate/activations.py ``gated_delta_net_saved_bytes``,
``qwen3_next_moe_saved_bytes`` and their transients; memcalc/estimate/training.py
``gated_delta_hybrid``): byte counts by hand that need nothing installed, recorded fake-tensor
measurements of the transients, the refusals, and, where fla (``pip install fla-core``) and triton
are importable, the measurement itself: transformers' Qwen3NextForCausalLM with fla's chunked
Function on fake tensors (memcalc.validate.gated_delta)."""

from __future__ import annotations

import pytest

from config_json import model_from_config
from memcalc.config import TrainSettings
from memcalc.errors import InputError
from memcalc.estimate.activations import (
    ActivationShape,
    gated_attention_extra_bytes,
    gated_delta_net_backward_transient,
    gated_delta_net_forward_transient,
    gated_delta_net_saved_bytes,
    qwen3_next_moe_backward_transient,
    qwen3_next_moe_saved_bytes,
)
from memcalc.estimate.training import estimate_training, gated_delta_hybrid

# A tiny Qwen3-Next (Qwen3NextConfig field names): h 64, layers linear/linear/full/linear; gated delta
# net of 2 key heads x 16 and 4 value heads x 16 (Kd 32, Vd 64, conv 4); gated attention of 4 heads
# / 2 KV heads of 16; 4 experts of 32, top-2, a gated shared expert of 32; vocabulary 512
TINY = {"model_type": "qwen3_next", "hidden_size": 64, "num_hidden_layers": 4,
        "layer_types": ["linear_attention", "linear_attention", "full_attention", "linear_attention"],
        "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16, "linear_num_key_heads": 2,
        "linear_key_head_dim": 16, "linear_num_value_heads": 4, "linear_value_head_dim": 16,
        "linear_conv_kernel_dim": 4, "num_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 32,
        "shared_expert_intermediate_size": 32, "intermediate_size": 128, "vocab_size": 512,
        "tie_word_embeddings": False, "use_cache": False}
# Qwen3-Next-80B-A3B's layer sizes (the model card's: h 2048, 16 QK / 32 V linear heads of 128, 16 / 2
# attention heads of 256, 512 experts of 512, top-10, one shared expert of 512)
FULL_SIZE = {**TINY, "hidden_size": 2048, "head_dim": 256, "num_attention_heads": 16, "linear_num_key_heads": 16,
             "linear_key_head_dim": 128, "linear_num_value_heads": 32, "linear_value_head_dim": 128,
             "num_experts": 512, "num_experts_per_tok": 10, "moe_intermediate_size": 512,
             "shared_expert_intermediate_size": 512, "vocab_size": 151936}


def _from(base, tmp_path=None, **overrides):
    return model_from_config(base, tmp_path, "tiny-qwen3-next", **overrides)


def _shape(tokens: int, batch: int = 1) -> ActivationShape:
    return ActivationShape(tokens=tokens, seq_len=tokens // batch, batch_size=batch, element_bytes=2,
                           stream_bytes=2, autocast=False)


def test_config_json_is_the_measured_structure():
    model = _from(TINY)
    assert gated_delta_hybrid(model)
    assert model.moe.norm_topk_prob is True and model.moe.shared_expert_gate
    assert _from(TINY, norm_topk_prob=False).moe.norm_topk_prob is False


def test_tiny_gated_delta_net_by_hand():
    """A linear_attention layer's mixer at b1 s128 in bf16 (T = 128), tensor by tensor from the code
    that saves it (Qwen3NextGatedDeltaNet.forward, fla's ChunkGatedDeltaRuleFunction)."""
    T, h, Kd, Vd, nk, nv = 128, 64, 32, 64, 2, 4
    C = 2 * Kd + Vd  # the causal conv's channels: q, k, v
    expected = (
        T * h * 4 + T * 4 + h * 4 + T * h * 4  # input norm: fp32 copy, rsqrt, 1 + weight, fp32 normed (x (1 + w))
        + T * h * 2  # its bf16 cast, in_proj_qkvz's and in_proj_ba's input
        + T * C * 2  # torch.cat(q, k, v): causal_conv1d's saved input
        + T * nv * 2  # beta = sigmoid(b)
        + 2 * T * nv * 4 + 2 * nv * 4  # softplus's fp32 input and output; exp(A_log) and its negation
        + 2 * T * Kd * 2 + 2 * T * nk * 4  # fla: q and k after its L2 norm, their fp32 rstd
        + T * Vd * 2  # fla: input_guard's contiguous copy of v
        + T * nv * 4  # fla: the chunk-local cumsum of g (fp32)
        + T * nv * 64 * 2  # fla: A, T x HV x 64 (bf16)
        + T * Vd * 4 + T * nv * 4 + T * Vd * 2 + T * Vd * 2  # gated norm: fp32 input, rsqrt, cast, x weight
        + T * Vd * 4 + T * Vd * 4  # the gate's fp32 copy, silu's fp32 output
        + T * Vd * 2  # out_proj's input
    )
    assert expected == 372_512
    assert gated_delta_net_saved_bytes(_from(TINY), _shape(T)) == expected


def test_tiny_experts_block_and_gated_attention_by_hand():
    """The experts block (Qwen3NextSparseMoeBlock through grouped_mm) at T = 128, S = 256 assignments,
    and what the gated attention keeps beyond the plain attention's tensors."""
    T, h, E, k, I, Is = 128, 64, 4, 2, 32, 32
    S = T * k
    expected = (
        T * h * 2  # the block's input (router, shared expert and its gate read it)
        + T * E * 4 + S * 8 + T * 4 + S * 4  # router: fp32 softmax, top-k index, sum, normalised (fp32)
        + 3 * S * 8 + S * h * 2 + S * 2 * I * 2 + 2 * S * I * 2  # perm, perm // k, inverse; gathered; gate_up, silu, product
        + S * h * 2 + S * 2 + E * 4  # down output, the routing weights' bf16 cast gathered by perm, int32 offsets
        + 4 * T * Is * 2 + T * 2 + T * h * 2  # shared expert's gated MLP, sigmoid of its gate, its output
    )
    assert expected == 209_168
    model = _from(TINY)
    assert qwen3_next_moe_saved_bytes(model, _shape(T)) == expected
    assert gated_attention_extra_bytes(model, _shape(T)) == 3 * T * 4 * 16 * 2  # copy, sigmoid, product


# Fake-tensor measurements (the harness of memcalc.validate.gated_delta, one module run alone, the
# weights frozen so that only activations are counted): the most a module holds beyond its saved
# tensors and its output's gradient (backward) or its input (forward). Layer sizes: FULL_SIZE's, with
# the experts overridden where given.
MEASURED_TRANSIENTS = [
    # (function, overrides, tokens, measured bytes)
    (gated_delta_net_backward_transient, {}, 2048, 100_663_296),  # in the gated norm's backward
    (gated_delta_net_backward_transient, {"linear_num_key_heads": 8, "linear_key_head_dim": 64}, 2048,
     100_663_296),
    (gated_delta_net_forward_transient, {}, 2048, 396_755_200),  # in the gated norm's last cast
    (gated_delta_net_forward_transient, {"linear_num_key_heads": 8, "linear_key_head_dim": 64}, 2048,
     346_292_480),
    # the experts' output gather's backward (3 S x h) with 32 experts, top-10, of 512
    (qwen3_next_moe_backward_transient, {"num_experts": 32}, 2048, 260_042_752),
    (qwen3_next_moe_backward_transient, {"num_experts": 64, "num_experts_per_tok": 4, "moe_intermediate_size": 1024,
                                         "shared_expert_intermediate_size": 4096}, 2048, 109_047_808),
    # wide experts: the gated activation's backward (3 S x I)
    (qwen3_next_moe_backward_transient, {"num_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 8192,
                                         "shared_expert_intermediate_size": 256}, 1024, 96_450_560),
]


@pytest.mark.parametrize(("function", "overrides", "tokens", "measured"), MEASURED_TRANSIENTS)
def test_transients_equal_the_recorded_measurements(function, overrides, tokens, measured):
    assert function(_from(FULL_SIZE, **overrides), _shape(tokens)) == measured


def test_train_estimates_qwen3_next_and_scales_with_the_batch():
    model = _from(TINY)
    one = estimate_training(model, TrainSettings(seq_len=256, batch_size=1)).component("activations").bytes
    two = estimate_training(model, TrainSettings(seq_len=256, batch_size=2)).component("activations").bytes
    assert 1.9 * one < two < 2.1 * one
    full = estimate_training(model, TrainSettings(seq_len=256, recompute="full")).component("activations").bytes
    assert full < one


@pytest.mark.parametrize("settings", [
    dict(precision="amp-bf16"), dict(precision="fp32"), dict(recompute="selective"), dict(attention="eager"),
    dict(lora_rank=8), dict(recompute="op"),
])
def test_unmeasured_qwen3_next_options_are_refused(settings):
    with pytest.raises(InputError, match="Qwen3-Next training activations are modelled for bf16"):
        estimate_training(_from(TINY), TrainSettings(seq_len=256, **settings))


@pytest.mark.parametrize("layout", [dict(dp=4), dict(dp=4, zero=2), dict(dp=4, zero=3, fsdp=True),
                                    dict(dp=4, zero=3)])
def test_data_parallel_ranks_hold_one_devices_activations(layout):
    """Data parallelism splits the batch, not the layers: each rank's activations are the single device's,
    and ZeRO/FSDP shard the optimizer states four ways."""
    from memcalc.parallel import ParallelConfig

    model, settings = _from(TINY), TrainSettings(seq_len=256)
    single = estimate_training(model, settings)
    ranks = estimate_training(model, settings, ParallelConfig(**layout))
    assert ranks.component("activations").bytes == single.component("activations").bytes
    if layout.get("zero"):
        assert ranks.component("optimizer_states").bytes * 4 == pytest.approx(
            single.component("optimizer_states").bytes, rel=0.01)


@pytest.mark.parametrize("layout", [dict(tp=2), dict(dp=2, pp=2), dict(dp=2, cp=2)])
def test_model_parallel_layouts_are_refused(layout):
    from memcalc.parallel import ParallelConfig

    with pytest.raises(InputError, match="not with tensor, pipeline, context or expert parallelism"):
        estimate_training(_from(TINY), TrainSettings(seq_len=256), ParallelConfig(**layout))


def test_other_structures_beside_gated_delta_nets_stay_refused():
    # a gated delta net beside an attention without Qwen3-Next's output gate is not the measured layer
    model = _from(TINY)
    from dataclasses import replace

    other = replace(model, attn_output_gate=False)
    assert not gated_delta_hybrid(other)
    with pytest.raises(InputError, match="training activations of linear_attention layers are not modelled"):
        estimate_training(other, TrainSettings(seq_len=256))


# --- measured on fake tensors ----------------------------------------------------------------------

gated_delta = pytest.importorskip("memcalc.validate.gated_delta")
needs_fla = pytest.mark.skipif(not gated_delta.available(), reason="fla (pip install fla-core) or triton is not "
                                                                    "importable")

# the measured rows run a wider tiny model (h 128) whose vocabulary (2048) puts the backward's opening
# at the loss as real vocabularies do (h 64 and a vocabulary of 512 put it in the final norm's fp32
# backward, which the estimator does not model: docs/formulas.md sec. 3.12)
MEASURED = {**TINY, "hidden_size": 128, "num_attention_heads": 4, "head_dim": 32, "linear_key_head_dim": 32,
            "linear_value_head_dim": 32, "num_experts": 8, "moe_intermediate_size": 64,
            "shared_expert_intermediate_size": 64, "vocab_size": 2048}


def _torch_conv_extra(model, batch: int, seq: int) -> int:
    """Without causal-conv1d, transformers' torch path convolves with ``F.conv1d`` (padding kernel - 1)
    and silu keeps that padded output: b x (s + kernel - 1) x C bytes more per gated delta net layer."""
    from memcalc.config import LayerType

    la = model.linear_attention
    layers = sum(kind is LayerType.LINEAR_ATTENTION for kind in model.resolved_layer_types)
    return layers * batch * (seq + la.conv_kernel - 1) * la.conv_channels * 2


@needs_fla
@pytest.mark.parametrize(("precision", "recompute", "batch", "seq"), [
    ("mixed-bf16", "none", 1, 256), ("mixed-bf16", "full", 1, 256), ("pure-bf16", "none", 2, 200)])
def test_measured_tiny_qwen3_next(tmp_path, precision, recompute, batch, seq):
    """transformers' Qwen3NextForCausalLM with fla's Function: each layer past the second saves what
    the estimator's layer says, to the byte, and every phase is within 0.1%."""
    pytest.importorskip("transformers")
    from memcalc.estimate.training import StagePlan, _activation_context, _layer_stack, resolve_recipe
    from memcalc.parallel import ParallelConfig
    from memcalc.validate.mamba import LayerProbe
    from memcalc.validate.run import TrainWorkload

    model = _from(MEASURED, tmp_path)
    probe = LayerProbe()
    workload = TrainWorkload(precision=precision, batch_size=batch, seq_len=seq, impl="hf", recompute=recompute)
    measured = gated_delta.measure_training(model, workload, probe=probe)
    settings = TrainSettings(precision=precision, batch_size=batch, seq_len=seq, recompute=recompute)
    estimate = estimate_training(model, settings)
    extra = 0 if gated_delta.conv_kernel_available() else _torch_conv_extra(model, batch, seq)
    if recompute == "none":
        plan = StagePlan(model, seq, 1, True, True, 0, linear_inputs_saved=False)
        stack = _layer_stack(_activation_context(plan, settings, resolve_recipe(settings, ParallelConfig())))
        per_layer = extra // 3 if model.resolved_layer_types[3].value == "linear_attention" else 0
        for index in (2, 3):  # the probe's first two readings hold an extra stream tensor
            conv = per_layer if model.resolved_layer_types[index].value == "linear_attention" else 0
            assert probe.forward[index] - probe.forward[index - 1] == stack.by_kind[stack.kinds[index]][0] + conv
    else:
        extra = 0  # checkpointed layers keep their inputs alone; the recomputed layer's conv is a transient
    for phase in ("forward", "backward", "optimizer_step"):
        expected = estimate.phases[phase] + (extra if phase != "optimizer_step" else 0)
        assert abs(expected - measured.phases[phase].peak_bytes) <= 0.001 * measured.phases[phase].peak_bytes, phase


# Qwen3.5 (Qwen3_5ForCausalLM): the same layers with the gated delta net's projections split and a
# dense gated MLP (Qwen3_5TextConfig field names), at MEASURED's sizes
QWEN3_5 = {**{key: value for key, value in MEASURED.items() if not key.startswith(("num_experts", "moe_", "shared_"))},
           "model_type": "qwen3_5_text", "intermediate_size": 256}


@needs_fla
@pytest.mark.parametrize(("precision", "recompute"), [("mixed-bf16", "none"), ("mixed-bf16", "full")])
def test_measured_tiny_qwen3_5(tmp_path, precision, recompute):
    """Qwen3.5's split projections save what Qwen3-Next's do (in_proj_qkv's output is the conv's
    input); every phase within 0.1% (benchmarks/results/gated_delta_fake.csv: the full sizes)."""
    pytest.importorskip("transformers")
    from memcalc.validate.run import TrainWorkload

    model = model_from_config(QWEN3_5, tmp_path, "tiny-qwen3.5")
    assert model.linear_attention.split_projections and gated_delta_hybrid(model)
    workload = TrainWorkload(precision=precision, batch_size=1, seq_len=256, impl="hf", recompute=recompute)
    measured = gated_delta.measure_training(model, workload)
    estimate = estimate_training(model, TrainSettings(precision=precision, seq_len=256, recompute=recompute))
    extra = 0 if gated_delta.conv_kernel_available() or recompute == "full" else _torch_conv_extra(model, 1, 256)
    for phase in ("forward", "backward", "optimizer_step"):
        expected = estimate.phases[phase] + (extra if phase != "optimizer_step" else 0)
        assert abs(expected - measured.phases[phase].peak_bytes) <= 0.001 * measured.phases[phase].peak_bytes, phase
