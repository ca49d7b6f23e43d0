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

from memcalc.config import PositionKind
from memcalc.errors import InputError
from memcalc.estimate.params import count_params
from memcalc.hf import model_from_hf

CORPUS = Path(__file__).parent / "data" / "hf_configs"
MANIFEST = yaml.safe_load((CORPUS / "manifest.yaml").read_text())
BY_FILE = {entry["file"]: entry for entry in MANIFEST}

# Every file in the corpus is counted (Qwen2.5-VL and Qwen3-VL were the last refused); copies
# changed to hold what memcalc does not model are refused in test_changed_files_are_refused.
COUNTED = sorted(BY_FILE)
MULTIMODAL = sorted(name for name in COUNTED if "meta_params_vision" in BY_FILE[name])

# Files whose head transformers 5 ties though the checkpoint keeps its own: Mistral-Small-3.1's has no
# tie_word_embeddings key at any level, and transformers 5's Mistral3Config defaults it to True, where
# the release's transformers (4.50) read text_config's MistralConfig default, False. The checkpoint is
# Mistral-Small-3's 23.57B language model (its own lm_head) with the Pixtral tower: memcalc counts it
# untied, the class on the meta device vocab x hidden fewer.
UNTIED_AGAINST_TRANSFORMERS = {"mistralai--Mistral-Small-3.1-24B-Instruct-2503.json": 131072 * 5120}

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
    assert count_params(_model(file_name)).total == BY_FILE[file_name]["meta_params"] + UNTIED_AGAINST_TRANSFORMERS.get(
        file_name, 0)


def _split(file_name: str) -> tuple[int, int]:
    """memcalc's (language model, vision tower + projector) parameters."""
    by_category = {category.value: count for category, count in count_params(_model(file_name)).by_category().items()}
    vision = by_category.get("vision_tower", 0) + by_category.get("projector", 0)
    return sum(by_category.values()) - vision, vision


@pytest.mark.parametrize("file_name", MULTIMODAL)
def test_multimodal_split_equals_transformers_on_the_meta_device(file_name):
    """The language model and the vision tower with its projector, each equal to the transformers
    class's split (manifest.yaml: the parameters whose names mention the vision modules)."""
    entry = BY_FILE[file_name]
    untied = UNTIED_AGAINST_TRANSFORMERS.get(file_name, 0)
    assert _split(file_name) == (entry["meta_params_text"] + untied, entry["meta_params_vision"])


def _within(count: int, entry: dict, key: str) -> None:
    precision = entry.get(f"{key}_precision", entry["published_params_precision"])
    tolerance = 2 * precision * 1e9 + (PUBLISHED_EXCEPTIONS.get(entry["file"], 0) if key == "published_params" else 0)
    assert abs(count - entry[key]) <= tolerance, (key, count, entry[key])


@pytest.mark.parametrize("file_name", COUNTED)
def test_count_agrees_with_the_published_figure(file_name):
    """``published_params_precision`` is half a unit of the figure's last digit (in billions): model
    cards round (within half a unit: "8.2B") or truncate (within one: Qwen2.5-7B's 7.61B for
    7.6156B), so the count must lie within one unit. A figure of the language model alone
    (``published_params_part: text``) is compared with the language model's count, and a
    multimodal model's published split with memcalc's."""
    entry = BY_FILE[file_name]
    total = count_params(_model(file_name)).total
    text, vision = _split(file_name)
    _within(text if entry.get("published_params_part") == "text" else total, entry, "published_params")
    for key, count in (("published_params_text", text), ("published_params_vision", vision)):
        if key in entry:
            _within(count, entry, key)


def test_published_split_is_where_the_corpus_has_it():
    assert {name for name in COUNTED if "published_params_vision" in BY_FILE[name]} == {
        "Qwen--Qwen2.5-VL-7B-Instruct.json", "Qwen--Qwen3-VL-8B-Instruct.json"}
    assert {name for name in COUNTED if BY_FILE[name].get("published_params_part") == "text"} == {
        "Qwen--Qwen3-VL-30B-A3B-Instruct.json"}


def _changed(file_name: str, change) -> dict:
    data = json.loads((CORPUS / file_name).read_text())
    change(data)
    return data


QWEN2_VL = "Qwen--Qwen2-VL-7B-Instruct.json"
QWEN25_VL, QWEN3_VL, QWEN3_VL_MOE = ("Qwen--Qwen2.5-VL-7B-Instruct.json", "Qwen--Qwen3-VL-8B-Instruct.json",
                                     "Qwen--Qwen3-VL-30B-A3B-Instruct.json")

# Real files with a key memcalc does not read added (or the text model taken away): refused with
# the key named, never counted as if it were not there.
CHANGED_REFUSED = {
    "qwen2-vl-experts": (QWEN2_VL, lambda d: d.update(num_experts=8, num_experts_per_tok=2),
                         "num_experts change the structure of a qwen2_vl_text model"),
    "qwen2-vl-vision-key": (QWEN2_VL, lambda d: d["vision_config"].update(intermediate_size=3420),
                            "vision_config: vision_config keys memcalc does not know for qwen2_vl"),
    "qwen2-vl-vision-type": (QWEN2_VL, lambda d: d["vision_config"].update(model_type="qwen2_5_vl_vision"),
                             "vision_config: qwen2_vl vision_config.model_type 'qwen2_5_vl_vision'"),
    "qwen2-vl-mlp-ratio": (QWEN2_VL, lambda d: d["vision_config"].update(mlp_ratio=4.5),
                           "vision_config: vision config mlp_ratio must be an integer"),
    "qwen2-vl-chunked": (QWEN2_VL, lambda d: d.update(layer_types=["chunked_attention"] * 28),
                         "layer_types: layer type 'chunked_attention' is not modelled"),
    "qwen2-vl-text-type": (QWEN2_VL, lambda d: d.update(text_config={"model_type": "qwen2_5_vl_text"}),
                           "text_config.model_type: 'qwen2_5_vl_text' is not the text model of qwen2_vl"),
    "qwen2.5-vl-experts": (QWEN25_VL, lambda d: d.update(num_experts=8, num_experts_per_tok=2),
                           "num_experts change the structure of a qwen2_5_vl_text model"),
    "qwen2.5-vl-vision-key": (QWEN25_VL, lambda d: d["vision_config"].update(use_registers=True),
                              "vision_config: vision_config keys memcalc does not know for qwen2_5_vl"),
    "qwen2.5-vl-vision-type": (QWEN25_VL, lambda d: d["vision_config"].update(model_type="siglip_vision_model"),
                               "vision_config: qwen2_5_vl vision_config.model_type 'siglip_vision_model'"),
    "qwen2.5-vl-chunked": (QWEN25_VL, lambda d: d.update(layer_types=["chunked_attention"] * 28),
                           "layer_types: layer type 'chunked_attention' is not modelled"),
    "qwen3-vl-deepstack": (QWEN3_VL, lambda d: d["vision_config"].update(deepstack_visual_indexes=8),
                           "vision_config: vision config deepstack_visual_indexes must be a list"),
    "qwen3-vl-no-text-config": (QWEN3_VL, lambda d: d.pop("text_config"), "text_config: a qwen3_vl config.json needs it"),
    "qwen3-vl-text-type": (QWEN3_VL, lambda d: d["text_config"].update(model_type="llama"),
                           "text_config.model_type: 'llama' is not the text model of qwen3_vl"),
    "qwen3-vl-sliding-layers": (QWEN3_VL, lambda d: d["text_config"].update(
        layer_types=["sliding_attention"] * 36), "layer_types change the structure of a qwen3_vl_text model"),
    "qwen3-vl-moe-shared-expert": (QWEN3_VL_MOE, lambda d: d["text_config"].update(
        shared_expert_intermediate_size=512), "shared_expert_intermediate_size change the structure"),
    "qwen3-vl-moe-vision-key": (QWEN3_VL_MOE, lambda d: d["vision_config"].update(num_registers=4),
                                "vision_config: vision_config keys memcalc does not know for qwen3_vl_moe"),
}


@pytest.mark.parametrize("key", sorted(CHANGED_REFUSED))
def test_changed_files_are_refused(key):
    file_name, change, reason = CHANGED_REFUSED[key]
    with pytest.raises(InputError, match=reason) as info:
        model_from_hf(_changed(file_name, change), name=key, source=key)
    assert "\n" not in str(info.value)


def _meta_model(config, multimodal: bool = False):
    import torch
    import transformers

    transformers.logging.set_verbosity_error()
    auto = transformers.AutoModelForImageTextToText if multimodal else transformers.AutoModelForCausalLM
    with warnings.catch_warnings(), torch.device("meta"):
        warnings.simplefilter("ignore")
        return auto.from_config(config)


def _meta_count(config, multimodal: bool = False) -> int:
    return sum(parameter.numel() for parameter in _meta_model(config, multimodal).parameters())


def _text_rotary(model) -> bool:
    """Whether the class's language model builds a rotary embedding (a vision tower's does not count)."""
    return any(type(module).__name__.endswith("RotaryEmbedding") for name, module in model.named_modules()
               if "visual" not in name and "vision" not in name)


@pytest.mark.parametrize("file_name", COUNTED)
def test_live_meta_device_build(file_name):
    transformers = pytest.importorskip("transformers")
    data = json.loads((CORPUS / file_name).read_text())
    model_type = "deepseek_v3" if data["model_type"] == "kimi_k2" else data["model_type"]
    multimodal = "vision_config" in data
    data = {key: value for key, value in data.items() if key not in ("quantization_config", "model_type")}
    config = transformers.AutoConfig.for_model(model_type, **data)
    built = _meta_model(config, multimodal=multimodal)
    model = _model(file_name)
    assert count_params(model).total == sum(parameter.numel() for parameter in built.parameters()) + \
        UNTIED_AGAINST_TRANSFORMERS.get(file_name, 0)
    # NoPE families (Nemotron-H, Jamba, Mamba) build no rotary embedding: no rotary tables in memcalc either
    assert (model.position_embedding is PositionKind.ROTARY) == _text_rotary(built)


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
    "granitemoehybrid#rope": {"layer_types": ["mamba", "attention"], "num_hidden_layers": 2,
                              "position_embedding_type": "rope"},
    "glm4_moe": {"head_dim": 128, "num_hidden_layers": 4, "use_qk_norm": True, "attention_bias": True},
    "llama4_text#interleaved": {"num_hidden_layers": 4, "interleave_moe_layer_step": 2, "hidden_size": 512,
                                "intermediate_size": 256, "intermediate_size_mlp": 1024, "num_local_experts": 4},
    "qwen3_moe#sparse": {"num_hidden_layers": 6, "decoder_sparse_step": 2, "mlp_only_layers": [3],
                         "hidden_size": 256, "moe_intermediate_size": 64, "num_experts": 8},
    "jamba#periods": {"num_hidden_layers": 6, "attn_layer_period": 3, "attn_layer_offset": 1,
                      "expert_layer_period": 3, "expert_layer_offset": 2, "hidden_size": 256,
                      "intermediate_size": 512, "num_experts": 4, "mamba_dt_rank": "auto"},
    # Qwen2_5_VLConfig's defaults: a 72B-sized text model under a 3584-wide tower
    "qwen2_vl": {}, "qwen2_5_vl": {}, "qwen3_vl": {}, "qwen3_vl_moe": {},
    "qwen2_vl#tied": {"tie_word_embeddings": True, "text_config": {"num_hidden_layers": 2},
                      "vision_config": {"depth": 2, "embed_dim": 64, "mlp_ratio": 3, "num_heads": 4}},
    "qwen2_5_vl#tied": {"tie_word_embeddings": True, "text_config": {"num_hidden_layers": 2}},
    "qwen3_vl#no-deepstack": {"vision_config": {"deepstack_visual_indexes": [], "depth": 3},
                              "text_config": {"num_hidden_layers": 2, "head_dim": 64, "attention_bias": True}},
    "qwen3_vl_moe#sparse": {"text_config": {"num_hidden_layers": 6, "decoder_sparse_step": 2, "mlp_only_layers": [3],
                                            "num_experts": 8, "head_dim": 96}},
}
MULTIMODAL_TYPES = ("gemma3", "llama4", "mistral3", "qwen2_vl", "qwen2_5_vl", "qwen3_vl", "qwen3_vl_moe")


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
    built = _meta_model(config, multimodal=model_type in MULTIMODAL_TYPES)
    assert count_params(model).total == sum(parameter.numel() for parameter in built.parameters())
    assert (model.position_embedding is PositionKind.ROTARY) == _text_rotary(built)


# Qwen-VL config.json shapes as the transformers classes read them: absent sub-configs and keys
# (the classes' defaults), the flat Qwen2.5-VL file of transformers 4.4x and its nested one of
# 4.5x, the tie flag in text_config (Qwen2_5_VLConfig honours it, Qwen3VLConfig does not), the old
# vision model types, the vision config's attribute_map names and sliding windows.
_TINY_TEXT = {"hidden_size": 64, "num_attention_heads": 4, "num_key_value_heads": 2, "intermediate_size": 96,
              "num_hidden_layers": 2, "vocab_size": 128}
_TINY_QWEN3_VISION = {"depth": 2, "hidden_size": 32, "intermediate_size": 48, "num_heads": 2, "out_hidden_size": 64,
                      "num_position_embeddings": 16, "deepstack_visual_indexes": [0]}
_TINY_QWEN2_VISION = {"depth": 2, "embed_dim": 32, "mlp_ratio": 2, "num_heads": 2, "hidden_size": 64}
QWEN_VL_SHAPES = {
    "qwen2_vl-empty": ("qwen2_vl", {}),
    "qwen2_vl-flat": ("qwen2_vl", {**_TINY_TEXT, "vision_config": {**_TINY_QWEN2_VISION, "in_chans": 1,
                                                                   "spatial_patch_size": 14}}),
    "qwen2_vl-nested": ("qwen2_vl", {"text_config": {**_TINY_TEXT, "model_type": "qwen2_vl_text"},
                                     "vision_config": {**_TINY_QWEN2_VISION, "model_type": "qwen2_vl"}}),
    "qwen2_vl-text-tied": ("qwen2_vl", {"text_config": {**_TINY_TEXT, "tie_word_embeddings": True},
                                        "vision_config": _TINY_QWEN2_VISION}),
    "qwen2_vl-head-dim-ignored": ("qwen2_vl", {**_TINY_TEXT, "head_dim": 32, "attention_bias": False,
                                               "vision_config": _TINY_QWEN2_VISION}),
    "qwen2_vl-sliding": ("qwen2_vl", {**_TINY_TEXT, "use_sliding_window": True, "sliding_window": 16,
                                      "max_window_layers": 1, "vision_config": _TINY_QWEN2_VISION}),
    "qwen2_5_vl-empty": ("qwen2_5_vl", {}),
    "qwen2_5_vl-flat": ("qwen2_5_vl", {**_TINY_TEXT, "vision_config": {"depth": 2, "hidden_size": 32, "num_heads": 2,
                                                                       "out_hidden_size": 64, "in_chans": 1}}),
    "qwen2_5_vl-nested": ("qwen2_5_vl", {"text_config": {**_TINY_TEXT, "model_type": "qwen2_5_vl_text"},
                                         "vision_config": {"model_type": "qwen2_5_vl", "depth": 1}}),
    "qwen2_5_vl-text-tied": ("qwen2_5_vl", {"text_config": {**_TINY_TEXT, "tie_word_embeddings": True}}),
    "qwen2_5_vl-head-dim-ignored": ("qwen2_5_vl", {**_TINY_TEXT, "head_dim": 32, "attention_bias": False}),
    "qwen2_5_vl-sliding": ("qwen2_5_vl", {**_TINY_TEXT, "use_sliding_window": True, "sliding_window": 16,
                                          "max_window_layers": 1}),
    "qwen3_vl-empty-text": ("qwen3_vl", {"text_config": {}}),
    "qwen3_vl-text-tied-ignored": ("qwen3_vl", {"text_config": {**_TINY_TEXT, "tie_word_embeddings": True},
                                                "vision_config": _TINY_QWEN3_VISION}),
    "qwen3_vl-aliases": ("qwen3_vl", {"text_config": _TINY_TEXT, "vision_config": {
        "model_type": "qwen3_vl", "num_hidden_layers": 2, "num_attention_heads": 4, "hidden_size": 32,
        "patch_size": 14, "temporal_patch_size": 1, "in_channels": 4, "spatial_merge_size": 3}}),
    "qwen3_vl-tied": ("qwen3_vl", {"tie_word_embeddings": True, "text_config": _TINY_TEXT,
                                   "vision_config": _TINY_QWEN3_VISION}),
    "qwen3_vl_moe-empty-text": ("qwen3_vl_moe", {"text_config": {}, "vision_config": _TINY_QWEN3_VISION}),
    "qwen3_vl_moe-dense": ("qwen3_vl_moe", {"text_config": {**_TINY_TEXT, "num_experts": 0}}),
}


@pytest.mark.parametrize("key", sorted(QWEN_VL_SHAPES))
def test_qwen_vl_shapes_equal_transformers(key):
    transformers = pytest.importorskip("transformers")
    model_type, data = QWEN_VL_SHAPES[key]
    config = transformers.AutoConfig.for_model(model_type, **json.loads(json.dumps(data)))
    model = model_from_hf({"model_type": model_type, **data}, name=key, source=key)
    assert count_params(model).total == _meta_count(config, multimodal=True)
    assert model.tie_word_embeddings == config.tie_word_embeddings


def test_qwen2_5_vl_sliding_layers_follow_max_window_layers():
    """Qwen2_5_VLTextConfig: with use_sliding_window, layers from max_window_layers on slide;
    without it, sliding_window is dropped and every layer attends fully."""
    from memcalc.config import LayerType

    model_type, data = QWEN_VL_SHAPES["qwen2_5_vl-sliding"]
    model = model_from_hf({"model_type": model_type, **data}, name="s", source="s")
    assert (model.layer_types, model.sliding_window) == ((LayerType.FULL_ATTENTION, LayerType.SLIDING_ATTENTION), 16)
    real = _model(QWEN25_VL)
    assert (real.layer_types, real.sliding_window) == ((), None)  # use_sliding_window false in the file


@pytest.mark.parametrize("file_name", MULTIMODAL)
def test_multimodal_tied_embeddings_follow_transformers(file_name):
    transformers = pytest.importorskip("transformers")
    data = json.loads((CORPUS / file_name).read_text())
    model_type = data.pop("model_type")
    tied = transformers.AutoConfig.for_model(model_type, **data).tie_word_embeddings
    assert _model(file_name).tie_word_embeddings is (tied and file_name not in UNTIED_AGAINST_TRANSFORMERS)


# Bundled models written from these files by scripts/yaml_from_hf.py
BUNDLED_FROM_CORPUS = {
    "qwen3-0.6b": "Qwen--Qwen3-0.6B.json", "qwen3-8b": "Qwen--Qwen3-8B.json", "qwen3-32b": "Qwen--Qwen3-32B.json",
    "qwen3-30b-a3b": "Qwen--Qwen3-30B-A3B.json", "qwen3-235b-a22b": "Qwen--Qwen3-235B-A22B.json",
    "llama-3.1-8b": "meta-llama--Llama-3.1-8B.json", "gpt-oss-20b": "openai--gpt-oss-20b.json",
    "gpt-oss-120b": "openai--gpt-oss-120b.json", "phi-4": "microsoft--phi-4.json",
    "kimi-k2": "moonshotai--Kimi-K2-Instruct.json", "jamba-1.5-mini": "ai21labs--AI21-Jamba-1.5-Mini.json",
    "nemotron-3-nano": "nvidia--NVIDIA-Nemotron-3-Nano-30B-A3B-BF16.json",
    "nemotron-h-56b": "nvidia--Nemotron-H-56B-Base-8K.json",
    "qwen3-next-80b-a3b": "Qwen--Qwen3-Next-80B-A3B-Instruct.json",
    "llama-4-scout": "meta-llama--Llama-4-Scout-17B-16E-Instruct.json",
    "llama-4-maverick": "meta-llama--Llama-4-Maverick-17B-128E-Instruct.json",
    "gemma-3-1b": "google--gemma-3-1b-it.json", "mistral-small-3.1": "mistralai--Mistral-Small-3.1-24B-Instruct-2503.json",
    "glm-4.5-air": "zai-org--GLM-4.5-Air.json", "llama-3.3-70b": "meta-llama--Llama-3.3-70B-Instruct.json",
}


@pytest.mark.parametrize(("name", "file_name"), sorted(BUNDLED_FROM_CORPUS.items()))
def test_bundled_yaml_is_the_checkpoints_config(name, file_name):
    from dataclasses import replace

    from memcalc.library import resolve_model

    bundled, from_file = resolve_model(name), _model(file_name)
    assert replace(bundled, name="", aliases=(), source="", notes=()) == replace(
        from_file, name="", aliases=(), source="", notes=())
    assert BY_FILE[file_name]["repo"] in bundled.aliases
