"""Precision recipes as a table (issue 6): bytes per linear-layer weight with Adam, against the
published per-parameter tables."""

from __future__ import annotations

from fractions import Fraction

import pytest

from memcalc.precision import RECIPES


@pytest.mark.parametrize(
    ("recipe", "bytes_per_param"),
    [
        # MS-AMP docs (user-tutorial/optimization-level.md) / FP8-LM (arXiv:2310.18313), Linear weights
        # with Adam: FP16 AMP 16, O1 11, O2 6, O3 7
        ("amp-fp16", 16),
        ("msamp-o1", 11),
        ("msamp-o2", 6),
        ("msamp-o3", 7),
        # Megatron-LM dist_optimizer.md: bf16 params with fp32 main grads, non-distributed: 18
        ("megatron-bf16", 18),
        # ... and fp16 params with fp16 grads: 20 (fp32 gradient copy, master and moments: 16)
        ("megatron-fp16", 20),
        # ZeRO paper sec. 3.1: mixed-precision Adam 2 + 2 + 12 = 16
        ("mixed-bf16", 16),
        ("mixed-fp16", 16),
        # torchtune-style pure bf16: 2 + 2 + 2 x 2
        ("pure-bf16", 8),
        # DeepSeek-V3 sec. 3.3: fp32 master 4 + fp32 grad 4 + bf16 m 2 + bf16 v 2 = 12, plus the FP8
        # GEMM copy with one fp32 scale per 128 x 128 block: 1 + 4/16384
        ("deepseek-fp8", Fraction(12) + 1 + Fraction(4, 16384)),
        # Transformer Engine on Hopper: the bf16 recipe's 16 + an FP8 copy + its FP8 transpose
        ("te-fp8", 18),
        # MXFP8 on Blackwell: 16 + row- and column-wise copies of 1 + 1/32 (TE#1880: "2 bytes/param")
        ("mxfp8", 16 + 2 * (1 + Fraction(1, 32))),
    ],
)
def test_linear_weight_bytes_per_parameter(recipe, bytes_per_param):
    assert RECIPES[recipe].linear_bytes_per_param() == bytes_per_param


def test_blackwell_needs_no_fp8_transpose():
    """TE#1880 (maintainer): on Blackwell FP8 needs 1 byte/param of working copy, Hopper 2."""
    te = RECIPES["te-fp8"]
    assert te.linear_bytes_per_param() - te.linear_bytes_per_param(transpose=False) == 1


def test_fp8_does_not_save_memory_with_high_precision_weights():
    """Transformer Engine docs: "Contrary to intuition, FP8 training does not always reduce memory":
    weights stay bf16 and FP8 copies come on top, so te-fp8 holds more per weight than mixed-bf16."""
    assert RECIPES["te-fp8"].linear_bytes_per_param() > RECIPES["mixed-bf16"].linear_bytes_per_param()


@pytest.mark.parametrize(("recipe", "cached"), [("deepseek-fp8", 1 + Fraction(4, 128)), ("mxfp8", 1 + Fraction(1, 32)),
                                                ("te-fp8", 1)])
def test_cached_gemm_input_bytes_per_element(recipe, cached):
    """FP8-cached activations: DeepSeek-V3's 1 x 128 tiles with an fp32 scale, MXFP8's E8M0 per 32."""
    assert RECIPES[recipe].gemm_input_bytes == cached


def test_every_fp8_recipe_names_its_gpu_requirement_and_source():
    for recipe in RECIPES.values():
        assert recipe.source
        if recipe.gemm is not None or recipe.gemm_input_bytes is not None:
            assert recipe.requires in ("fp8", "mxfp8")


# --- The recipes in a training estimate ------------------------------------------------------------

LLAMA_3_8B = 8_030_261_248
LINEAR = LLAMA_3_8B - 2 * 128_256 * 4096 - 65 * 4096  # every layer projection: 6,979,321,856
REST = LLAMA_3_8B - LINEAR  # embedding, head, norms


def _components(precision: str, **settings) -> dict[str, int]:
    from memcalc.config import TrainSettings
    from memcalc.estimate.training import estimate_training
    from memcalc.library import resolve_model

    estimate = estimate_training(resolve_model("llama-3-8b"), TrainSettings(precision=precision, **settings))
    return {component.key: component.bytes for component in estimate.components}


@pytest.mark.parametrize(
    ("precision", "weights", "gradients", "master", "moments"),
    [
        # TE on Hopper: bf16 weights + FP8 copy + FP8 transpose for the projections
        ("te-fp8", 2 * REST + 4 * LINEAR, 2 * LLAMA_3_8B, 4 * LLAMA_3_8B, 8 * LLAMA_3_8B),
        # DeepSeek-V3: the projections exist as FP8 with 128x128 block scales only; fp32 master and
        # gradients, bf16 moments
        ("deepseek-fp8", 2 * REST + LINEAR + LINEAR * 4 // 16384, 4 * LLAMA_3_8B, 4 * LLAMA_3_8B, 4 * LLAMA_3_8B),
        # MS-AMP O2: fp16 projections, FP8 gradients, FP8 m + fp16 v, no master for them
        ("msamp-o2", 2 * LLAMA_3_8B, 2 * REST + LINEAR, 4 * REST, 8 * REST + 3 * LINEAR),
    ],
)
def test_recipe_states_split_projections_from_the_rest(precision, weights, gradients, master, moments):
    memory = _components(precision)
    assert (memory["weights"], memory["gradients"], memory["master_weights"], memory["optimizer_states"]) == (
        weights, gradients, master, moments)


def test_blackwell_drops_the_transpose_copy():
    hopper, blackwell = _components("te-fp8"), _components("te-fp8", fp8_transpose=False)
    assert hopper["weights"] - blackwell["weights"] == LINEAR


def test_fp8_caches_the_gemm_inputs_in_one_byte():
    """Transformer Engine's documented 1024 x 1024 Linear over 1024 tokens: BF16 keeps the 2 MB
    weight, a 2 MB saved input and a 2 MB output (6 MB); FP8 with BF16 weights keeps the 2 MB
    weight, a 1 MB FP8 weight, a 1 MB FP8 saved input and the 2 MB output: still 6 MB."""
    mib = 2**20
    bf16 = 2 * mib + 2 * mib + 2 * mib
    te = RECIPES["te-fp8"]
    fp8 = (te.gemm.weight + te.gemm.copies) * mib + te.gemm_input_bytes * mib + 2 * mib
    assert bf16 == fp8 == 6 * mib
    # FP8 inference with FP8 weights (te-fp8-params' primary FP8 weight): 1 MB weight + 2 MB output, no
    # saved input
    params = RECIPES["te-fp8-params"]
    assert params.gemm.weight * mib + 2 * mib == 3 * mib
    # and in a model: the FP8 recipe saves less activation memory than bf16 with the same block
    assert _components("te-fp8", seq_len=2048)["activations"] < _components("mixed-bf16", seq_len=2048)["activations"]


@pytest.mark.parametrize("dp", [1, 2, 8, 64])
def test_megatron_distributed_optimizer_fp16_row(dp):
    """Megatron dist_optimizer.md: fp16 params and grads: 4 + 16/d bytes/param with the distributed
    optimizer (the fp32 gradient copy, master and moments sharded over d)."""
    from memcalc.config import TrainSettings
    from memcalc.estimate.training import estimate_training
    from memcalc.library import resolve_model
    from memcalc.parallel import ParallelConfig

    estimate = estimate_training(resolve_model("llama-2-7b"), TrainSettings(precision="megatron-fp16"),
                                 ParallelConfig(dp=dp, distributed_optimizer=True))
    memory = {component.key: component.bytes for component in estimate.components}
    states = sum(memory[key] for key in ("weights", "gradients", "master_weights", "optimizer_states",
                                         "optimizer_grad_copy"))
    params = 6_738_415_616
    assert states == pytest.approx((4 + Fraction(16, dp)) * params, abs=4 * dp)
