"""Per-op selective checkpointing (``--recompute op``) and checkpointing every Nth layer
(``--recompute-layers``): torchtitan's policy resolved by hand, the bytes a checkpointed layer keeps
derived by hand, the estimate against the reference decoder measured under torch.utils.checkpoint's
selective policy on fake tensors, and torchtitan's published Llama 3.1 8B runs."""

from __future__ import annotations

import pytest
from hypothesis import given, settings as hypothesis_settings, strategies as st

from memcalc.config import SAC_OUTPUTS, ModelConfig, TrainSettings
from memcalc.estimate.activations import ActivationShape, op_checkpoint_bytes, torchtitan_sac_outputs
from memcalc.estimate.training import estimate_training
from memcalc.library import resolve_model
from memcalc.parallel import ParallelConfig

GiB = 2**30


def tiny(**changes) -> ModelConfig:
    base = dict(name="tiny", hidden_size=256, num_layers=4, num_attention_heads=8, num_kv_heads=2,
                intermediate_size=704, vocab_size=1024, max_position_embeddings=2048, tie_word_embeddings=False)
    return ModelConfig(**(base | changes))


@pytest.mark.parametrize(("model", "saved"), [
    # q k v o gate up down are the 1st..7th mm of a Llama layer: the odd ones are kept
    ("llama-3-8b", ("q", "v", "gate", "down", "attention")),
    # Qwen2's q/k/v have biases (addmm, not counted): o gate up down are the 1st..4th mm
    ("qwen2.5-0.5b", ("o", "up", "attention")),
    # every GPT-2 projection has a bias: only the attention kernel's outputs are kept
    ("gpt2", ("attention",)),
])
def test_torchtitan_policy_by_hand(model, saved):
    assert torchtitan_sac_outputs(resolve_model(model)) == saved


def test_llama_3_8b_checkpointed_layer_bytes_by_hand():
    """Per token, bf16: q 4096 x 2, v 1024 x 2, the SDPA output 4096 x 2 and its fp32 log-sum-exp
    over 32 heads, gate 14336 x 2, down 4096 x 2 = 55,424 bytes; 8192 tokens."""
    model = resolve_model("llama-3-8b")
    shape = ActivationShape(tokens=8192, seq_len=8192, batch_size=1, element_bytes=2, stream_bytes=2, autocast=False)
    assert op_checkpoint_bytes(model, shape, "sdpa", torchtitan_sac_outputs(model)) == 8192 * 55_424
    # an eager attention runs no kernel the policy names
    assert op_checkpoint_bytes(model, shape, "eager", ("attention",)) == 0


torch = pytest.importorskip("torch")

MEASURED = [
    ("pure-bf16", {}, "op", 1, None),
    ("pure-bf16", {}, "op", 1, "attention"),
    ("pure-bf16", {"qkv_bias": True}, "op", 1, None),
    ("amp-bf16", {}, "op", 1, None),
    ("pure-bf16", {}, "full", 2, None),
    ("pure-bf16", {}, "op", 2, None),
    ("amp-bf16", {}, "full", 1, None),
    ("pure-bf16", {}, "full", 1, None),
]


@pytest.mark.parametrize(("precision", "changes", "recompute", "every", "save"), MEASURED)
def test_estimate_matches_the_checkpointed_reference_decoder(precision, changes, recompute, every, save):
    """The reference decoder under torch.utils.checkpoint with torchtitan's counting policy (or the
    named outputs), measured on fake tensors: the total within 1.5%, activations within 1%."""
    from memcalc.validate.compare import compare_training
    from memcalc.validate.run import TrainWorkload, measure_training

    model = tiny(**changes)
    settings = TrainSettings(precision=precision, batch_size=2, seq_len=512, recompute=recompute,
                             recompute_layers=every, sac_save=save)
    workload = TrainWorkload(precision=precision, batch_size=2, seq_len=512, recompute=recompute,
                             recompute_layers=every, sac_save=settings.sac_save)
    comparison = compare_training(estimate_training(model, settings), measure_training(model, workload))
    rows = {row.key: row for row in comparison.rows}
    assert abs(comparison.total.error_percent) < 1.5
    assert abs(rows["activations"].error_percent) < 1.0


def test_torchtitan_counting_equals_the_named_outputs():
    """Two mechanisms in the reference decoder: torchtitan's mm counter and module hooks naming the
    projections by hand give the same measured step, byte for byte."""
    from memcalc.validate.run import TrainWorkload, measure_training

    model = tiny()
    counted = measure_training(model, TrainWorkload(precision="pure-bf16", batch_size=2, seq_len=256, recompute="op"))
    named = measure_training(model, TrainWorkload(precision="pure-bf16", batch_size=2, seq_len=256, recompute="op",
                                                  sac_save=("q", "v", "gate", "down", "attention")))
    assert {key: phase.peak_bytes for key, phase in counted.phases.items()} == {
        key: phase.peak_bytes for key, phase in named.phases.items()}


@hypothesis_settings(max_examples=25, deadline=None)
@given(st.sets(st.sampled_from(SAC_OUTPUTS)), st.sampled_from(SAC_OUTPUTS), st.integers(1, 4),
       st.sampled_from([256, 1024, 4096]))
def test_keeping_more_outputs_never_lowers_the_peak(saved, extra, batch, seq):
    model = resolve_model("llama-3.2-1b")

    def total(outputs) -> int:
        return estimate_training(model, TrainSettings(batch_size=batch, seq_len=seq, recompute="op",
                                                      sac_save=tuple(outputs) or ("attention",))).total

    smaller = saved or {"attention"}
    full = estimate_training(model, TrainSettings(batch_size=batch, seq_len=seq, recompute="full")).total
    none = estimate_training(model, TrainSettings(batch_size=batch, seq_len=seq)).total
    assert full <= total(smaller) <= total(smaller | {extra}) <= none


# torchtitan benchmarks/llama3_h100_202412_torchtitan.md (../shared/reference/training.md sec. 6,
# rows 8 and 9): Llama 3.1 8B, local batch 2, seq 8192, AdamW, selective op AC, FSDP2 bf16 params,
# no compile, H100: max reserved 82.4 GiB on 8 GPUs, 67.0 GiB on 128. memcalc's peak reserved is
# -12.8% and -9.3% (allocated + the suite's +5.33% reserve; the allocated part is FSDP2's as measured
# on fake tensors, mixed precision and the wrapping included, tests/test_fsdp.py: the gap is the
# reserve these runs hold beyond the suite's median, which torchtitan does not publish apart);
# before per-op checkpointing memcalc could only say 146.6 (selective) or 46.6 (full).
TORCHTITAN = [(8, 82.4), (128, 67.0)]


@pytest.mark.parametrize(("gpus", "reserved_gib"), TORCHTITAN)
def test_torchtitan_llama_3_1_8b_op_checkpointing(gpus, reserved_gib):
    estimate = estimate_training(resolve_model("llama-3.1-8b"),
                                 TrainSettings(batch_size=2, seq_len=8192, recompute="op"),
                                 ParallelConfig(dp=gpus, zero=3, fsdp=True))
    from memcalc.estimate.device import device_memory

    reserved = device_memory(estimate).peak_reserved / GiB
    assert abs(reserved - reserved_gib) / reserved_gib < 0.15
