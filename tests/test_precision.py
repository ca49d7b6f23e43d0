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
