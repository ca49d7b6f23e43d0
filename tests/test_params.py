"""Parameter counts against published figures (layer 1: exact tables)."""

from __future__ import annotations

import pytest

from memcalc.estimate.params import ParamCategory, count_params
from memcalc.library import bundled_model_names, bundled_models, resolve_model

# sum(p.numel() for p in model.parameters()) of the Hugging Face implementation, as printed by
# transformers / listed on the model cards and in the safetensors metadata of each repository.
PUBLISHED_PARAMS = {
    "gpt2": 124_439_808,
    "gpt2-medium": 354_823_168,
    "gpt2-large": 774_030_080,
    "gpt2-xl": 1_557_611_200,
    "llama-7b": 6_738_415_616,
    "llama-13b": 13_015_864_320,
    "llama-30b": 32_528_943_616,
    "llama-65b": 65_285_660_672,
    "llama-2-7b": 6_738_415_616,
    "llama-2-13b": 13_015_864_320,
    "llama-2-70b": 68_976_648_192,
    "llama-3-8b": 8_030_261_248,
    "llama-3-70b": 70_553_706_496,
    "llama-3.1-405b": 405_853_388_800,
    "llama-3.2-1b": 1_235_814_400,
    "llama-3.2-3b": 3_212_749_824,
    "mistral-7b": 7_241_732_096,
    "mixtral-8x7b": 46_702_792_704,
    "mixtral-8x22b": 140_620_634_112,
    "qwen2.5-0.5b": 494_032_768,
    "qwen2.5-7b": 7_615_616_512,
    "qwen2.5-72b": 72_706_203_648,
    "gemma-2b": 2_506_172_416,
    "gemma-7b": 8_537_680_896,
    "phi-3-mini": 3_821_079_552,
    # DeepSeek: derived tensor by tensor in tests/test_mla.py; V2-Lite's is the safetensors index's
    # 31,412,968,448 bytes of bf16, V3's the "671B" main model (its MTP module is not loaded)
    "deepseek-v2-lite": 15_706_484_224,
    "deepseek-v3": 671_026_404_352,
    # 2025 checkpoints written from their own config.json: sum(p.numel()) of the transformers class
    # on the meta device (tests/data/hf_configs/manifest.yaml, rebuilt live and checked against the
    # model cards in tests/test_hf_corpus.py); gpt-oss: the model card's 20.91B and 116.83B
    "qwen3-0.6b": 596_049_920,
    "qwen3-8b": 8_190_735_360,
    "qwen3-32b": 32_762_123_264,
    "qwen3-30b-a3b": 30_532_122_624,
    "qwen3-235b-a22b": 235_093_634_560,
    "llama-3.1-8b": 8_030_261_248,
    "gpt-oss-20b": 20_914_757_184,
    "gpt-oss-120b": 116_829_156_672,
    "phi-4": 14_659_507_200,
    "kimi-k2": 1_026_408_209_408,
    "jamba-1.5-mini": 51_570_323_328,
    # no exact published totals ("56B", "30B-A3B"): transformers' NemotronHForCausalLM built on the meta
    # device from each config.json (tests/data/hf_configs/manifest.yaml, meta_params)
    "nemotron-h-56b": 56_324_350_464,
    "nemotron-3-nano": 31_577_937_344,
    # "80B in total" on the model card: Qwen3NextForCausalLM on the meta device from its config.json
    "qwen3-next-80b-a3b": 79_674_391_296,
    # "109B" and "400B (Total)" on the model cards, vision tower and projector included:
    # Llama4ForConditionalGeneration on the meta device from each config.json
    "llama-4-scout": 108_641_793_536,
    "llama-4-maverick": 401_583_781_376,
    # the model cards' 1B (Gemma 3 report), 70B, 106B (GLM-4.5-Air: its MTP layer not built) and 24B
    # (Mistral-Small-3.1 with its own head, which transformers 5 ties: tests/test_hf_corpus.py): the
    # transformers classes on the meta device from each config.json
    "gemma-3-1b": 999_885_952,
    "llama-3.3-70b": 70_553_706_496,
    "glm-4.5-air": 106_852_245_504,
    "mistral-small-3.1": 24_011_361_280,
}

# Mistral AI's announcements: Mixtral 8x7B "12.9B active", Mixtral 8x22B "39B active" parameters;
# DeepSeek-V3's model card "37B activated" (the inventory's 37.55B counts the whole embedding table).
PUBLISHED_ACTIVE = {"mixtral-8x7b": (12.9e9, 0.005), "mixtral-8x22b": (39e9, 0.01), "deepseek-v3": (37e9, 0.02)}


def test_every_bundled_model_has_a_published_count():
    assert set(bundled_model_names()) == set(PUBLISHED_PARAMS) | {"gpt3-175b"}


@pytest.mark.parametrize(("name", "expected"), sorted(PUBLISHED_PARAMS.items()))
def test_total_matches_reference_implementation(name, expected):
    assert count_params(resolve_model(name)).total == expected


def test_gpt3_matches_paper_within_rounding():
    """Brown et al. 2020, Table 2.1 lists GPT-3 175B as 175.0B parameters (rounded)."""
    total = count_params(resolve_model("gpt3-175b")).total
    assert total == pytest.approx(175.0e9, rel=0.005)


@pytest.mark.parametrize(("name", "expected"), sorted(PUBLISHED_ACTIVE.items()))
def test_moe_active_parameters(name, expected):
    value, tolerance = expected
    assert count_params(resolve_model(name)).active == pytest.approx(value, rel=tolerance)


def test_dense_models_activate_everything():
    for name, model in bundled_models().items():
        inventory = count_params(model)
        if model.moe is None:
            assert inventory.active == inventory.total, name
        else:
            assert inventory.active < inventory.total, name


def test_llama_2_7b_breakdown_by_hand():
    """Embedding 32000*4096; per layer 4*4096^2 attention, 3*4096*11008 MLP, 2*4096 norms."""
    parts = count_params(resolve_model("llama-2-7b")).by_category()
    assert parts[ParamCategory.EMBEDDING] == 131_072_000
    assert parts[ParamCategory.OUTPUT_HEAD] == 131_072_000
    assert parts[ParamCategory.ATTENTION] == 32 * 67_108_864
    assert parts[ParamCategory.MLP] == 32 * 135_266_304
    assert parts[ParamCategory.NORMS] == 32 * 8192 + 4096


def test_gpt2_ties_embeddings_and_counts_positions():
    parts = count_params(resolve_model("gpt2")).by_category()
    assert ParamCategory.OUTPUT_HEAD not in parts
    assert parts[ParamCategory.EMBEDDING] == 50257 * 768 + 1024 * 768


def test_categories_sum_to_total():
    for model in bundled_models().values():
        inventory = count_params(model)
        assert sum(inventory.by_category().values()) == inventory.total
