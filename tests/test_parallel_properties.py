"""Invariants of the parallel training estimator over random dense and MoE models and layouts
(hypothesis). Every drawn layout passes memcalc.parallel.check_layout by construction: the degrees
are drawn from the divisors of what they split."""

from __future__ import annotations

from dataclasses import replace

from hypothesis import given, settings
from hypothesis import strategies as st

from memcalc.config import ModelConfig, MoEConfig, TrainSettings
from memcalc.estimate.training import estimate_training
from memcalc.library import resolve_model
from memcalc.parallel import ParallelConfig

# A modest, reproducible run: these tests call the estimator twice or more per example.
fast = settings(max_examples=40, derandomize=True, deadline=None)

SHARDED = ("weights", "gradients", "master_weights", "optimizer_states")
DEGREES = (1, 2, 3, 4, 6, 8)


@st.composite
def models(draw, moe: bool | None = None) -> ModelConfig:
    """A smaller cousin of tests/test_properties.py's strategy, with widths that often split by TP
    (multiples of 4 or 8) and layer counts with several divisors."""
    kv_heads = draw(st.sampled_from([1, 2, 4, 8]))
    heads = kv_heads * draw(st.integers(1, 4))
    head_dim = draw(st.sampled_from([8, 16, 32, 64]))
    layers = draw(st.sampled_from([1, 2, 3, 4, 6, 8, 12, 16]))
    moe_config = None
    if moe if moe is not None else draw(st.booleans()):
        experts = draw(st.sampled_from([1, 2, 4, 6, 8, 16]))
        moe_config = MoEConfig(
            num_experts=experts,
            experts_per_token=draw(st.integers(1, experts)),
            expert_intermediate_size=draw(st.integers(1, 512)) * draw(st.sampled_from([1, 4, 8])),
            num_shared_experts=draw(st.integers(0, 2)),
            first_dense_layers=draw(st.integers(0, layers)),
        )
    return ModelConfig(
        name="random",
        hidden_size=heads * head_dim,
        num_layers=layers,
        num_attention_heads=heads,
        num_kv_heads=kv_heads,
        intermediate_size=draw(st.integers(1, 1024)) * draw(st.sampled_from([1, 4, 8])),
        vocab_size=draw(st.integers(1, 100_000)),
        max_position_embeddings=draw(st.integers(1, 4096)),
        tie_word_embeddings=draw(st.booleans()),
        mlp=draw(st.sampled_from(["gated", "plain"])),
        norm=draw(st.sampled_from(["rmsnorm", "layernorm"])),
        norm_bias=draw(st.booleans()),
        qkv_bias=draw(st.booleans()),
        attn_output_bias=draw(st.booleans()),
        mlp_bias=draw(st.booleans()),
        position_embedding=draw(st.sampled_from(["rotary", "learned"])),
        moe=moe_config,
    )


train_settings = st.builds(
    TrainSettings,
    attention=st.sampled_from(["sdpa", "flash"]),
    activation_model=st.sampled_from(["arch", "megatron"]),
    precision=st.sampled_from([None, "megatron-bf16", "mixed-fp16", "fp32", "pure-bf16"]),
    optimizer=st.sampled_from(["adamw", "adam8bit", "sgd-momentum"]),
    optimizer_impl=st.sampled_from(["foreach", "fused"]),
    batch_size=st.integers(1, 4),
    seq_len=st.sampled_from([8, 64, 128, 256]),
    recompute=st.sampled_from(["none", "selective", "full"]),
)


def tp_degrees(model: ModelConfig) -> list[int]:
    widths = [model.num_attention_heads, model.kv_heads, model.intermediate_size]
    if model.moe is not None:
        widths.append(model.moe.expert_intermediate_size)
        # shared experts are split by TP too (column/row parallel like the dense MLP)
        widths.append(model.moe.shared_expert_intermediate_size or model.moe.expert_intermediate_size)
    return [t for t in DEGREES if all(width % t == 0 for width in widths)]


def pp_degrees(model: ModelConfig) -> list[int]:
    return [p for p in DEGREES if model.num_layers % p == 0]


def ep_degrees(model: ModelConfig, data_ranks: int) -> list[int]:
    if model.moe is None:
        return [1]
    return [e for e in DEGREES if model.moe.num_experts % e == 0 and data_ranks % e == 0]


def views(estimate) -> tuple:
    """Every reported rank (the estimate itself on a single device)."""
    return estimate.ranks or (estimate,)


def memory(view) -> dict[str, int]:
    return {component.key: component.bytes for component in view.components}


def model_states(view) -> int:
    held = memory(view)
    return sum(held[key] for key in SHARDED)


# (a) -------------------------------------------------------------------------------------------


@fast
@given(models(), train_settings, st.data())
def test_more_data_parallelism_never_raises_a_sharded_component(model, train, data):
    zero = data.draw(st.integers(1, 3), label="zero")
    pp = data.draw(st.sampled_from(pp_degrees(model) if zero == 1 else [1]), label="pp")
    tp = data.draw(st.sampled_from(tp_degrees(model)), label="tp")
    dp = data.draw(st.sampled_from([1, 2, 4]), label="dp")
    more = dp * data.draw(st.sampled_from([2, 3, 4]), label="factor")
    ep = data.draw(st.sampled_from(ep_degrees(model, dp)), label="ep")
    smaller = estimate_training(model, train, ParallelConfig(dp=dp, tp=tp, pp=pp, ep=ep, zero=zero))
    larger = estimate_training(model, train, ParallelConfig(dp=more, tp=tp, pp=pp, ep=ep, zero=zero))
    for few, many in zip(views(smaller), views(larger), strict=True):
        for key in SHARDED:
            assert memory(many)[key] <= memory(few)[key], key


# (b) -------------------------------------------------------------------------------------------


@fast
@given(models(), train_settings, st.data())
def test_higher_zero_stage_never_raises_model_states(model, train, data):
    dp = data.draw(st.sampled_from([1, 2, 4, 8]), label="dp")
    tp = data.draw(st.sampled_from(tp_degrees(model)), label="tp")
    ep = data.draw(st.sampled_from(ep_degrees(model, dp)), label="ep")
    by_stage = [
        [model_states(view) for view in views(estimate_training(model, train,
                                                                ParallelConfig(dp=dp, tp=tp, ep=ep, zero=zero)))]
        for zero in range(4)
    ]
    for lower, higher in zip(by_stage, by_stage[1:]):
        assert higher <= lower


# (c) -------------------------------------------------------------------------------------------


@fast
@given(models(), train_settings, st.data())
def test_more_tensor_parallelism_never_raises_weights(model, train, data):
    """With the same vocabulary padding rule on both sides (``pad_vocab`` fixed): the default pads
    only when TP > 1, which can add up to 128 x TP - 1 rows to a tiny vocabulary."""
    degrees = tp_degrees(model)
    tp = data.draw(st.sampled_from(degrees), label="tp")
    more = data.draw(st.sampled_from([t for t in degrees if t > tp and t % tp == 0] or [tp]), label="more")
    pad = data.draw(st.booleans(), label="pad_vocab")
    dp = data.draw(st.sampled_from([1, 2]), label="dp")
    zero = data.draw(st.sampled_from([0, 1, 3]), label="zero")
    weights = [
        [memory(view)["weights"] for view in views(estimate_training(
            model, train, ParallelConfig(dp=dp, tp=t, zero=zero, pad_vocab=pad)))]
        for t in (tp, more)
    ]
    assert weights[1] <= weights[0]


# (d) -------------------------------------------------------------------------------------------


@fast
@given(models(), train_settings, st.data())
def test_more_pipeline_stages_never_raise_the_most_loaded_weights(model, train, data):
    degrees = pp_degrees(model)
    pp = data.draw(st.sampled_from(degrees), label="pp")
    more = data.draw(st.sampled_from([p for p in degrees if p > pp] or [pp]), label="more")
    tp = data.draw(st.sampled_from(tp_degrees(model)), label="tp")
    dp = data.draw(st.sampled_from([1, 2]), label="dp")
    zero = data.draw(st.sampled_from([0, 1]), label="zero")
    largest = [
        max(memory(view)["weights"] for view in views(estimate_training(
            model, train, ParallelConfig(dp=dp, tp=tp, pp=p, zero=zero, pad_vocab=True))))
        for p in (pp, more)
    ]
    assert largest[1] <= largest[0]


# (e) -------------------------------------------------------------------------------------------


@fast
@given(models(), train_settings, st.data())
def test_shards_add_up_to_the_unsharded_state(model, train, data):
    """Over the d ranks of a sharding group the shards of the master weights and optimizer states
    add up to the unsharded state, up to the rounding up of each shard: one ceiling per inventory
    (dense tensors, and expert tensors when the model has any), so less than d bytes each."""
    dp = data.draw(st.sampled_from([2, 3, 4, 8]), label="dp")
    group = data.draw(st.sampled_from([None] + [g for g in (2, 4) if dp % g == 0]), label="shard_group")
    distributed = data.draw(st.booleans(), label="distributed_optimizer")
    zero = 0 if distributed else data.draw(st.integers(1, 3), label="zero")
    tp = data.draw(st.sampled_from(tp_degrees(model)), label="tp")
    base = ParallelConfig(dp=dp, tp=tp, shard_group=group)
    sharded = replace(base, zero=zero, distributed_optimizer=distributed)
    shards = group or dp
    inventories = 1 if model.moe is None or model.num_moe_layers == 0 else 2
    whole = memory(estimate_training(model, train, base))
    parts = memory(estimate_training(model, train, sharded))
    for key in ("master_weights", "optimizer_states"):
        assert 0 <= parts[key] * shards - whole[key] <= inventories * (shards - 1), key


# (f) -------------------------------------------------------------------------------------------


@fast
@given(models(), train_settings, st.data())
def test_offload_never_raises_gpu_memory(model, train, data):
    offload = data.draw(st.sampled_from(["optimizer", "params", "both"]), label="offload")
    zero = 3 if offload != "optimizer" else data.draw(st.integers(1, 3), label="zero")
    dp = data.draw(st.sampled_from([1, 2, 4, 8]), label="dp")
    tp = data.draw(st.sampled_from(tp_degrees(model)), label="tp")
    on_gpu = ParallelConfig(dp=dp, tp=tp, zero=zero)
    offloaded = estimate_training(model, train, replace(on_gpu, offload=offload))
    assert offloaded.total <= estimate_training(model, train, on_gpu).total


def test_offload_never_raises_gpu_memory_llama_2_7b_zero1_dp256():
    """A case property (f) once found: Llama-2-7B, s 4096, b 4, ZeRO-1 over 256 ranks, where the
    offloaded unit's unsharded gradients were added on top of the backward activation peak."""
    model, train = resolve_model("llama-2-7b"), TrainSettings(seq_len=4096, batch_size=4)
    on_gpu = ParallelConfig(dp=256, zero=1)
    offloaded = estimate_training(model, train, replace(on_gpu, offload="optimizer"))
    assert offloaded.total <= estimate_training(model, train, on_gpu).total
