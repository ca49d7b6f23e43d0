"""Parameter counts of real checkpoints, read from their own config.json, against two independent
values: the transformers model class built on the meta device, and the published figure.

The corpus (tests/data/hf_configs/, manifest.yaml) holds unmodified copies of official
config.json files with where each came from. A model memcalc cannot describe exactly must be
refused with a reason, never counted wrong.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import pytest
import yaml

from memcalc.errors import InputError
from memcalc.estimate.params import count_params
from memcalc.hf import model_from_hf

CORPUS = Path(__file__).parent / "data" / "hf_configs"
MANIFEST = yaml.safe_load((CORPUS / "manifest.yaml").read_text())
BY_FILE = {entry["file"]: entry for entry in MANIFEST}

# Checkpoints memcalc refuses, with the start of the reason it gives.
REFUSED = {
    "Qwen--Qwen2.5-VL-7B-Instruct.json": "model_type 'qwen2_5_vl' is not modelled",
    "Qwen--Qwen3-VL-8B-Instruct.json": "the vision tower of model_type 'qwen3_vl' is not modelled",
    "Qwen--Qwen3-VL-30B-A3B-Instruct.json": "the vision tower of model_type 'qwen3_vl_moe' is not modelled",
}
COUNTED = sorted(set(BY_FILE) - set(REFUSED))

# Published figures that are not the parameter count of the model transformers builds, with why
# and the difference that explains it.
PUBLISHED_EXCEPTIONS = {
    # DeepSeek-V3's 685B include the 14B multi-token-prediction module (the model card: "671B of the
    # main model weights and 14B of the MTP module"), which transformers does not build.
    "deepseek-ai--DeepSeek-V3.json": 14_000_000_000,
    # Kimi K2's card says "1T total parameters" and the Hub lists 1.04T; config.json has no MTP layer
    # and transformers' DeepseekV3 class gives 1.026T: 14B of the Hub figure are not in the model.
    "moonshotai--Kimi-K2-Instruct.json": 14_000_000_000,
}


def _model(file_name: str):
    data = json.loads((CORPUS / file_name).read_text())
    return model_from_hf(data, name=BY_FILE[file_name]["repo"], source=file_name)


def test_corpus_holds_thirty_real_configs():
    assert len(MANIFEST) >= 30
    for entry in MANIFEST:
        assert (CORPUS / entry["file"]).is_file()
        assert entry["source"], entry["file"]


@pytest.mark.parametrize("file_name", COUNTED)
def test_count_equals_transformers_on_the_meta_device(file_name):
    """memcalc's count equals sum(p.numel()) of the transformers class (recorded in manifest.yaml
    by scripts/hf_meta_counts.py; rebuilt live in test_live_meta_device_build)."""
    assert count_params(_model(file_name)).total == BY_FILE[file_name]["meta_params"]


@pytest.mark.parametrize("file_name", COUNTED)
def test_count_agrees_with_the_published_figure(file_name):
    """``published_params_precision`` is half a unit of the figure's last digit (in billions): model
    cards round (within half a unit: "8.2B") or truncate (within one: Qwen2.5-7B's 7.61B for
    7.6156B), so the count must lie within one unit."""
    entry = BY_FILE[file_name]
    total = count_params(_model(file_name)).total
    tolerance = 2 * entry["published_params_precision"] * 1e9 + PUBLISHED_EXCEPTIONS.get(file_name, 0)
    assert abs(total - entry["published_params"]) <= tolerance, (total, entry["published_params"])


@pytest.mark.parametrize(("file_name", "reason"), sorted(REFUSED.items()))
def test_models_memcalc_cannot_describe_are_refused(file_name, reason):
    with pytest.raises(InputError, match=reason) as info:
        _model(file_name)
    assert "\n" not in str(info.value)


def _meta_count(config, multimodal: bool = False) -> int:
    import torch
    import transformers

    transformers.logging.set_verbosity_error()
    auto = transformers.AutoModelForImageTextToText if multimodal else transformers.AutoModelForCausalLM
    with warnings.catch_warnings(), torch.device("meta"):
        warnings.simplefilter("ignore")
        model = auto.from_config(config)
    return sum(parameter.numel() for parameter in model.parameters())


@pytest.mark.parametrize("file_name", COUNTED)
def test_live_meta_device_build(file_name):
    transformers = pytest.importorskip("transformers")
    data = json.loads((CORPUS / file_name).read_text())
    model_type = "deepseek_v3" if data["model_type"] == "kimi_k2" else data["model_type"]
    data = {key: value for key, value in data.items() if key not in ("quantization_config", "model_type")}
    config = transformers.AutoConfig.for_model(model_type, **data)
    assert count_params(_model(file_name)).total == _meta_count(config)


# Families with no official config.json in the corpus: transformers' own configuration classes
# at their defaults (most are a real checkpoint's sizes: Qwen3-Next-80B-A3B, Llama 4 Scout,
# gpt-oss-120b, Jamba, Granite-4.0-H) and small variants that switch on each structural option.
FAMILIES = {
    "qwen3_next": {}, "olmo2": {}, "olmo3": {}, "gemma3_text": {}, "gemma3": {}, "llama4_text": {}, "llama4": {},
    "mamba2": {}, "mamba": {}, "smollm3": {}, "mistral3": {}, "gpt_oss": {}, "jamba": {}, "qwen3_moe": {},
    "qwen2_moe": {"num_hidden_layers": 4}, "gemma2": {}, "nemotron_h": {}, "falcon_h1": {},
    "falcon_h1#biases": {"num_hidden_layers": 2, "mamba_rms_norm": True, "projectors_bias": True,
                         "mamba_proj_bias": True, "attention_bias": True},
    "falcon_h1#expand": {"num_hidden_layers": 2, "mamba_d_ssm": None, "mamba_d_head": 64},
    "granitemoehybrid": {"layer_types": ["mamba", "mamba", "attention", "mamba"], "num_hidden_layers": 4},
    "granitemoehybrid#dense": {"layer_types": ["mamba", "attention"], "num_hidden_layers": 2, "num_local_experts": 0},
    "glm4_moe": {"head_dim": 128, "num_hidden_layers": 4, "use_qk_norm": True, "attention_bias": True},
    "llama4_text#interleaved": {"num_hidden_layers": 4, "interleave_moe_layer_step": 2, "hidden_size": 512,
                                "intermediate_size": 256, "intermediate_size_mlp": 1024, "num_local_experts": 4},
    "qwen3_moe#sparse": {"num_hidden_layers": 6, "decoder_sparse_step": 2, "mlp_only_layers": [3],
                         "hidden_size": 256, "moe_intermediate_size": 64, "num_experts": 8},
    "jamba#periods": {"num_hidden_layers": 6, "attn_layer_period": 3, "attn_layer_offset": 1,
                      "expert_layer_period": 3, "expert_layer_offset": 2, "hidden_size": 256,
                      "intermediate_size": 512, "num_experts": 4, "mamba_dt_rank": "auto"},
}


@pytest.mark.parametrize("key", sorted(FAMILIES))
def test_family_counts_equal_transformers(key):
    transformers = pytest.importorskip("transformers")
    model_type = key.split("#")[0]
    overrides = FAMILIES[key]
    config = transformers.CONFIG_MAPPING[model_type](**overrides)
    data = json.loads(config.to_json_string())
    if "layer_types" in overrides:  # the Hub's spelling, which transformers 5 renames
        data["layer_types"] = overrides["layer_types"]
    model = model_from_hf(data, name=key, source=key)
    assert count_params(model).total == _meta_count(config, multimodal=model_type in ("gemma3", "llama4", "mistral3"))


# Bundled models written from these files by scripts/yaml_from_hf.py
BUNDLED_FROM_CORPUS = {
    "qwen3-0.6b": "Qwen--Qwen3-0.6B.json", "qwen3-8b": "Qwen--Qwen3-8B.json", "qwen3-32b": "Qwen--Qwen3-32B.json",
    "qwen3-30b-a3b": "Qwen--Qwen3-30B-A3B.json", "qwen3-235b-a22b": "Qwen--Qwen3-235B-A22B.json",
    "llama-3.1-8b": "meta-llama--Llama-3.1-8B.json", "gpt-oss-20b": "openai--gpt-oss-20b.json",
    "gpt-oss-120b": "openai--gpt-oss-120b.json", "phi-4": "microsoft--phi-4.json",
    "kimi-k2": "moonshotai--Kimi-K2-Instruct.json", "jamba-1.5-mini": "ai21labs--AI21-Jamba-1.5-Mini.json",
}


@pytest.mark.parametrize(("name", "file_name"), sorted(BUNDLED_FROM_CORPUS.items()))
def test_bundled_yaml_is_the_checkpoints_config(name, file_name):
    from dataclasses import replace

    from memcalc.library import resolve_model

    bundled, from_file = resolve_model(name), _model(file_name)
    assert replace(bundled, name="", aliases=(), source="", notes=()) == replace(
        from_file, name="", aliases=(), source="", notes=())
    assert BY_FILE[file_name]["repo"] in bundled.aliases
