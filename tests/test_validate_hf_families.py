"""2024-2025 families measured through their own transformers classes (``--impl hf``) on fake
tensors, layer-reduced, against the activation model (docs/accuracy.md has the full rows)."""

from __future__ import annotations

from pathlib import Path

import pytest

pytest.importorskip("torch")
pytest.importorskip("transformers")

from memcalc.config import TrainSettings  # noqa: E402
from memcalc.estimate.training import estimate_training  # noqa: E402
from memcalc.library import resolve_model  # noqa: E402
from memcalc.validate.cli_support import run_training_validation, with_layers  # noqa: E402

CONFIGS = Path(__file__).parent / "data" / "hf_configs"


@pytest.mark.parametrize(("path", "layers", "precision"), [
    # OLMo 2: post-norms and whole-width q/k norms that scale in fp32 (Olmo2RMSNorm)
    ("synthetic/olmo2-defaults.json", 2, "pure-bf16"),
    # Gemma 3: sandwich norms with (1 + weight) in fp32, per-head q/k norms; 6 layers keep a global one
    ("synthetic/gemma3_text-defaults.json", 6, "pure-bf16"),
])
def test_hf_family_matches_the_estimate(path, layers, precision):
    model = with_layers(resolve_model(str(CONFIGS / path)), layers)
    settings = TrainSettings(precision=precision, batch_size=1, seq_len=512)
    comparison = run_training_validation(model, settings, estimate_training(model, settings), "fake", False, impl="hf")
    activations = next(row for row in comparison.rows if row.key == "activations")
    assert abs(activations.error_percent) < 1.0  # per layer exact; the loss side is off by ~0.6% at 2 layers
    assert comparison.within(0.1)


@pytest.mark.parametrize("recompute", ["none", "full"])
def test_gpt_oss_matches_the_estimate(recompute):
    """gpt-oss-20b at 2 layers (one sliding, one full) through GptOssForCausalLM on fake tensors, eager
    attention (transformers has no SDPA path for its sinks), pure bf16: the softmax in bf16 over the sink
    column too, GptOssRMSNorm's fp32 product, the clamped-SwiGLU experts through grouped_mm
    (gpt_oss_experts_saved_bytes). Before these terms the activations read +20% (+47% a layer)."""
    model = with_layers(resolve_model(str(CONFIGS / "openai--gpt-oss-20b.json")), 2)
    settings = TrainSettings(precision="pure-bf16", batch_size=1, seq_len=512, attention="eager", recompute=recompute)
    comparison = run_training_validation(model, settings, estimate_training(model, settings), "fake", False, impl="hf")
    activations = next(row for row in comparison.rows if row.key == "activations")
    assert abs(activations.error_percent) < 1.0
    assert comparison.within(0.2)


def test_hf_config_keeps_the_file_structure():
    """The transformers config comes from the file: Gemma 3's layer types cut to the layers run."""
    from memcalc.validate.hf import hf_config_for

    model = with_layers(resolve_model(str(CONFIGS / "synthetic/gemma3_text-defaults.json")), 6)
    config = hf_config_for(model)
    assert type(config).__name__ == "Gemma3TextConfig"
    assert config.num_hidden_layers == 6 and len(config.layer_types) == 6
    assert config.layer_types[-1] == "full_attention"
