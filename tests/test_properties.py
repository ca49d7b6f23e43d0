"""Invariants over random architectures and settings (hypothesis)."""

from __future__ import annotations

from dataclasses import replace

from hypothesis import given
from hypothesis import strategies as st

from memcalc.config import InferSettings, ModelConfig, MoEConfig, TrainSettings
from memcalc.estimate.inference import estimate_inference
from memcalc.estimate.params import count_params
from memcalc.estimate.training import estimate_training


@st.composite
def models(draw, num_layers=None):
    kv_heads = draw(st.integers(1, 8))
    heads = kv_heads * draw(st.integers(1, 8))
    head_dim = draw(st.sampled_from([16, 32, 64, 128]))
    moe = None
    layers = num_layers if num_layers is not None else draw(st.integers(1, 48))
    if draw(st.booleans()):
        experts = draw(st.integers(1, 16))
        moe = MoEConfig(
            num_experts=experts,
            experts_per_token=draw(st.integers(1, experts)),
            expert_intermediate_size=draw(st.integers(1, 8192)),
            num_shared_experts=draw(st.integers(0, 2)),
            first_dense_layers=draw(st.integers(0, layers)),
        )
    return ModelConfig(
        name="random",
        hidden_size=heads * head_dim,
        num_layers=layers,
        num_attention_heads=heads,
        num_kv_heads=kv_heads,
        intermediate_size=draw(st.integers(1, 16384)),
        vocab_size=draw(st.integers(1, 200_000)),
        max_position_embeddings=draw(st.integers(1, 8192)),
        tie_word_embeddings=draw(st.booleans()),
        mlp=draw(st.sampled_from(["gated", "plain"])),
        norm=draw(st.sampled_from(["rmsnorm", "layernorm"])),
        norm_bias=draw(st.booleans()),
        qkv_bias=draw(st.booleans()),
        position_embedding=draw(st.sampled_from(["rotary", "learned"])),
        moe=moe,
    )


train_settings = st.builds(
    TrainSettings,
    attention=st.sampled_from(["sdpa", "eager"]),
    optimizer_impl=st.sampled_from(["foreach", "fused", "for-loop"]),
    activation_model=st.sampled_from(["arch", "megatron"]),
    precision=st.sampled_from([None, "amp-bf16", "pure-fp16"]),
    dtype=st.sampled_from(["fp32", "fp16", "bf16"]),
    master_weights=st.booleans(),
    optimizer=st.sampled_from(["adamw", "adam", "adam8bit", "sgd", "sgd-momentum"]),
    batch_size=st.integers(1, 64),
    seq_len=st.integers(1, 32768),
    recompute=st.sampled_from(["none", "selective", "full"]),
)
infer_settings = st.builds(
    InferSettings,
    dtype=st.sampled_from(["fp32", "fp16", "bf16", "fp8", "int8", "int4"]),
    kv_dtype=st.sampled_from([None, "fp32", "fp16", "bf16", "fp8", "int8"]),
    batch_size=st.integers(1, 256),
    context_len=st.integers(1, 131072),
)


def _with(settings, **changes):
    return replace(settings, **changes)


@given(models(), train_settings)
def test_training_components_are_non_negative_and_phases_compose(model, settings):
    estimate = estimate_training(model, settings)
    memory = {component.key: component.bytes for component in estimate.components}
    for component in (*estimate.components, *estimate.checkpoint):
        assert isinstance(component.bytes, int) and component.bytes >= 0
    static = memory["weights"] + memory["master_weights"] + memory["optimizer_states"]
    assert estimate.phases["forward"] <= static + memory["activations"]
    assert estimate.phases["optimizer_step"] == static + memory["gradients"] + memory["optimizer_step_temporaries"]
    assert estimate.total == max(estimate.phases.values())
    assert estimate.total <= sum(memory.values()) + memory["gradients"]


@given(models(), infer_settings)
def test_inference_components_are_non_negative_ints_and_the_three_totals_are_ordered(model, settings):
    from memcalc.estimate.device import device_memory

    estimate = estimate_inference(model, settings)
    for component in (*estimate.components, *estimate.references):
        assert isinstance(component.bytes, int) and component.bytes >= 0
    memory = device_memory(estimate)
    assert estimate.total == memory.peak_allocated == max(estimate.phases.values())
    assert memory.peak_allocated <= memory.peak_reserved
    assert memory.device_total == memory.peak_reserved + estimate.component("overhead").bytes + memory.nccl
    weights = sum(c.bytes for c in estimate.components if c.key.startswith("weights"))
    assert max(estimate.phases.values()) >= weights + estimate.component("activations").bytes


@given(models(), train_settings, st.integers(1, 16))
def test_training_memory_grows_with_batch(model, settings, extra):
    smaller = estimate_training(model, settings)
    larger = estimate_training(model, _with(settings, batch_size=settings.batch_size + extra))
    assert larger.total >= smaller.total


@given(models(), train_settings, st.integers(1, 4096))
def test_training_memory_grows_with_sequence(model, settings, extra):
    smaller = estimate_training(model, settings)
    larger = estimate_training(model, _with(settings, seq_len=settings.seq_len + extra))
    assert larger.total >= smaller.total


@given(st.integers(1, 40), st.integers(1, 8), st.data())
def test_memory_grows_with_layers(num_layers, extra, data):
    model = data.draw(models(num_layers=num_layers))
    deeper = replace(model, num_layers=num_layers + extra)
    settings = data.draw(train_settings)
    assert count_params(deeper).total > count_params(model).total
    assert estimate_training(deeper, settings).total > estimate_training(model, settings).total
    infer = data.draw(infer_settings)
    assert estimate_inference(deeper, infer).total > estimate_inference(model, infer).total


@given(models(), infer_settings, st.integers(1, 64))
def test_kv_cache_linear_in_batch(model, settings, factor):
    base = estimate_inference(model, settings).component("kv_cache").bytes
    scaled = estimate_inference(model, _with(settings, batch_size=settings.batch_size * factor))
    assert scaled.component("kv_cache").bytes == factor * base


@given(models(), train_settings)
def test_recompute_never_increases_activations(model, settings):
    """Selective and full recompute never cost more than none once there are two layers or more;
    with one layer the recomputation's own transients can exceed what it saves."""
    by_level = {
        level: estimate_training(model, _with(settings, recompute=level)).component("activations").bytes
        for level in ("none", "selective", "full")
    }
    if model.num_layers >= 2:  # one layer: recomputing it re-creates the causal mask that none never needs again
        assert by_level["none"] >= by_level["selective"]
    if model.num_layers >= 2 and settings.activation_model == "megatron":
        assert by_level["selective"] >= by_level["full"]


@given(models())
def test_active_parameters_never_exceed_total(model):
    inventory = count_params(model)
    assert 0 < inventory.active <= inventory.total
