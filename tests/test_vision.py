"""Vision towers and projectors (memcalc.vision) against transformers built on the meta device.

Every check compares the analytic tensor list with ``named_parameters()`` of the transformers
modules: names (layer index dropped), per-tensor sizes, copies and order, not only the total.
"""

from __future__ import annotations

import json
import random
import re
import subprocess
import sys
from pathlib import Path

import pytest

from memcalc.vision import (PROJECTOR, VISION_TOWER, VisionFamily, VisionTower, projector_groups,
                            vision_tower_from_hf, vision_tower_groups)

HF_CONFIGS = Path(__file__).parent / "data" / "hf_configs"


def _total(tensors) -> int:
    return sum(t.total for t in tensors)


# --- real checkpoint sizes ----------------------------------------------------------------------

SIGLIP_400M = dict(family="siglip", hidden_size=1152, num_layers=27, intermediate_size=4304,
                   num_attention_heads=16, patch_size=14, image_size=896, vision_use_head=False)
PIXTRAL_MS31 = dict(family="pixtral", hidden_size=1024, num_layers=24, intermediate_size=4096,
                    num_attention_heads=16, patch_size=14, image_size=1540, spatial_merge_size=2)
LLAMA4_VISION = dict(family="llama4", hidden_size=1408, num_layers=34, intermediate_size=5632,
                     num_attention_heads=16, patch_size=14, image_size=336, vision_output_dim=4096,
                     projector_input_dim=4096, projector_output_dim=4096, pixel_shuffle_ratio=0.5)
QWEN2_VL_VISION = dict(family="qwen2_vl", hidden_size=1280, num_layers=32, intermediate_size=5120,
                       num_attention_heads=16, patch_size=14, spatial_merge_size=2, temporal_patch_size=2)
QWEN2_5_VL_VISION = dict(family="qwen2_5_vl", hidden_size=1280, num_layers=32, intermediate_size=3420,
                         num_attention_heads=16, patch_size=14, spatial_merge_size=2, temporal_patch_size=2)
QWEN3_VL_VISION = dict(family="qwen3_vl", hidden_size=1152, num_layers=27, intermediate_size=4304,
                       num_attention_heads=16, patch_size=16, spatial_merge_size=2, temporal_patch_size=2,
                       num_position_embeddings=2304, num_deepstack_mergers=3)

# (tower, tower parameters, projector parameters), worked out by hand from the modeling files and
# checked against transformers below.
REAL = {
    "gemma-3-4b": (VisionTower(**SIGLIP_400M, text_hidden_size=2560), 416_866_032, 2_950_272),
    "gemma-3-12b": (VisionTower(**SIGLIP_400M, text_hidden_size=3840), 416_866_032, 4_424_832),
    "gemma-3-27b": (VisionTower(**SIGLIP_400M, text_hidden_size=5376), 416_866_032, 6_194_304),
    "mistral-small-3.1-24b": (VisionTower(**PIXTRAL_MS31, text_hidden_size=5120), 403_305_472, 35_652_608),
    "llama-4-scout/maverick": (VisionTower(**LLAMA4_VISION, text_hidden_size=5120), 850_960_896, 20_971_520),
    # patch embed 1280*3*2*14*14; 32 blocks of 19,677,440 (two LayerNorms, qkv, proj, fc1 to 4 x 1280
    # and fc2, all biased); merger: LayerNorm ln_q, 5120 x 5120 and 5120 x 3584 with biases
    "qwen2-vl-7b": (VisionTower(**QWEN2_VL_VISION, text_hidden_size=3584), 631_183_360, 44_575_744),
    # patch embed 1280*3*2*14*14; 32 blocks of 19,702,200 (two RMSNorms, qkv, proj, biased gated MLP);
    # merger: ln_q, 5120 x 5120 and 5120 x 3584 with biases
    "qwen2.5-vl-7b": (VisionTower(**QWEN2_5_VL_VISION, text_hidden_size=3584), 631_975_680, 44_574_464),
    # patch embed with bias, 2304 x 1152 positions, 27 blocks of 15,302,448; merger and 3 deepstack
    # mergers of 4608 x 4608 and 4608 x out with LayerNorms (1152 wide, then 4608 wide)
    "qwen3-vl-8b": (VisionTower(**QWEN3_VL_VISION, text_hidden_size=4096), 415_891_440, 160_496_896),
    "qwen3-vl-30b-a3b": (VisionTower(**QWEN3_VL_VISION, text_hidden_size=2048), 415_891_440, 122_739_968),
}


@pytest.mark.parametrize("name", REAL)
def test_real_checkpoint_counts(name):
    tower, tower_params, projector_params = REAL[name]
    assert _total(vision_tower_groups(tower)) == tower_params
    assert _total(projector_groups(tower)) == projector_params


def test_gemma3_report_vision_encoder_417m():
    """Gemma 3 Technical Report (arXiv:2503.19786), Table 1: the vision encoder has 417M
    parameters in the 4B, 12B and 27B models. The report rounds to 1M, so the tolerance is 0.5M."""
    tower, _, _ = REAL["gemma-3-27b"]
    assert abs(_total(vision_tower_groups(tower)) - 417_000_000) <= 500_000


def test_pixtral_announcement_400m_encoder():
    """Mistral's Pixtral 12B announcement (mistral.ai/news/pixtral-12b, 2024-09-17): "a new 400M
    parameter vision encoder", the tower Mistral Small 3.1 reuses with 14-pixel patches. Stated
    to one significant figure; the tolerance is 1%."""
    tower, _, _ = REAL["mistral-small-3.1-24b"]
    assert _total(vision_tower_groups(tower)) == pytest.approx(400_000_000, rel=0.01)


def test_parts_and_counts_are_ints():
    for tower, _, _ in REAL.values():
        for t in vision_tower_groups(tower):
            assert t.part == VISION_TOWER and isinstance(t.numel, int) and t.numel > 0 and t.count > 0
        for t in projector_groups(tower):
            assert t.part == PROJECTOR and isinstance(t.numel, int) and t.numel > 0 and t.count > 0


# --- against transformers on the meta device ----------------------------------------------------

def _collapse(named) -> list[tuple[str, int, int]]:
    """(name with the layer, block or merger index dropped, numel, copies), in first-appearance order."""
    groups: dict[str, list[int]] = {}
    for name, param in named:
        key = re.sub(r"\.(layers|blocks|deepstack_merger_list)\.\d+\.", r".\1.", name)
        entry = groups.setdefault(key, [param.numel(), 0])
        assert entry[0] == param.numel(), key
        entry[1] += 1
    return [(name, numel, count) for name, (numel, count) in groups.items()]


def _ours(tensors) -> list[tuple[str, int, int]]:
    return [(t.name, t.numel, t.count) for t in tensors]


QWEN_WRAPPERS = {VisionFamily.QWEN2_VL: ("qwen2_vl",), VisionFamily.QWEN2_5_VL: ("qwen2_5_vl",),
                 VisionFamily.QWEN3_VL: ("qwen3_vl", "qwen3_vl_moe"), VisionFamily.QWEN3_5: ("qwen3_5", "qwen3_5_moe")}


def _qwen_hf_config(tower: VisionTower, model_type: str) -> tuple[str, dict]:
    if tower.family is VisionFamily.QWEN2_VL:  # embed_dim, mlp_ratio and the merger's hidden_size
        assert tower.intermediate_size % tower.hidden_size == 0
        vision = dict(depth=tower.num_layers, embed_dim=tower.hidden_size, hidden_size=tower.text_hidden_size,
                      mlp_ratio=tower.intermediate_size // tower.hidden_size, num_heads=tower.num_attention_heads,
                      patch_size=tower.patch_size, in_channels=tower.num_channels,
                      spatial_merge_size=tower.spatial_merge_size, temporal_patch_size=tower.temporal_patch_size)
        text = {"hidden_size": tower.text_hidden_size, "num_attention_heads": 1, "num_key_value_heads": 1}
        return model_type, dict(vision_config=vision, text_config=text)
    vision = dict(depth=tower.num_layers, hidden_size=tower.hidden_size, intermediate_size=tower.intermediate_size,
                  num_heads=tower.num_attention_heads, patch_size=tower.patch_size, in_channels=tower.num_channels,
                  spatial_merge_size=tower.spatial_merge_size, temporal_patch_size=tower.temporal_patch_size,
                  out_hidden_size=tower.text_hidden_size)
    if tower.family is VisionFamily.QWEN3_VL:
        vision.update(num_position_embeddings=tower.num_position_embeddings,
                      deepstack_visual_indexes=list(range(tower.num_deepstack_mergers)))
    if tower.family is VisionFamily.QWEN3_5:
        vision.update(num_position_embeddings=tower.num_position_embeddings)
    text = {"hidden_size": tower.text_hidden_size, "num_attention_heads": 1, "num_key_value_heads": 1,
            "head_dim": 8}
    return model_type, dict(vision_config=vision, text_config=text)


def _hf_config(tower: VisionTower, qwen_wrapper: int = 0) -> tuple[str, dict]:
    """A config.json dict for ``tower`` (vision sizes plus the text hidden size); ``qwen_wrapper``
    picks Qwen3-VL or Qwen3-VL-MoE for the qwen3_vl family."""
    if tower.family in QWEN_WRAPPERS:
        wrappers = QWEN_WRAPPERS[tower.family]
        return _qwen_hf_config(tower, wrappers[qwen_wrapper % len(wrappers)])
    vision = dict(hidden_size=tower.hidden_size, num_hidden_layers=tower.num_layers,
                  intermediate_size=tower.intermediate_size, num_attention_heads=tower.num_attention_heads,
                  patch_size=tower.patch_size, image_size=tower.image_size, num_channels=tower.num_channels)
    # one text head of even width: the text configurations check heads and rotary widths
    text: dict = {"hidden_size": tower.text_hidden_size, "num_attention_heads": 1, "num_key_value_heads": 1,
                  "head_dim": 8}
    if tower.family is VisionFamily.SIGLIP:
        vision.update(model_type="siglip_vision_model", vision_use_head=tower.vision_use_head)
        side = tower.image_size // tower.patch_size  # one token per patch: a valid pooling kernel
        return "gemma3", dict(vision_config=vision, text_config=text, mm_tokens_per_image=side * side)
    if tower.family is VisionFamily.PIXTRAL:
        vision.update(model_type="pixtral")
        text.update(model_type="mistral")
        n = tower.num_vision_feature_layers
        return "mistral3", dict(vision_config=vision, text_config=text,
                                spatial_merge_size=tower.spatial_merge_size,
                                multimodal_projector_bias=tower.multimodal_projector_bias,
                                projector_hidden_act=tower.projector_hidden_act,
                                vision_feature_layer=-1 if n == 1 else list(range(-n, 0)))
    vision.update(model_type="llama4_vision_model", vision_output_dim=tower.vision_output_dim,
                  projector_input_dim=tower.projector_input_dim,
                  projector_output_dim=tower.projector_output_dim,
                  pixel_shuffle_ratio=tower.pixel_shuffle_ratio)
    return "llama4", dict(vision_config=vision, text_config=text)


def _transformers_parts(model_type: str, config_dict: dict):
    """(tower, projector) parameter lists of the transformers modules, built from sub-configs on
    the meta device, named as under the base model."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    kwargs = {key: value for key, value in json.loads(json.dumps(config_dict)).items() if key != "model_type"}
    config = transformers.AutoConfig.for_model(model_type, **kwargs)
    if model_type.startswith("qwen"):
        return _qwen_transformers_parts(model_type, config)
    with torch.device("meta"):
        if model_type == "gemma3":
            from transformers.models.gemma3.modeling_gemma3 import Gemma3MultiModalProjector
            tower = transformers.AutoModel.from_config(config.vision_config)  # as Gemma3Model does
            projector = Gemma3MultiModalProjector(config)
            prefix = "vision_tower"
        elif model_type == "mistral3":
            from transformers.models.mistral3.modeling_mistral3 import Mistral3MultiModalProjector
            tower = transformers.AutoModel.from_config(config.vision_config)  # as Mistral3Model does
            projector = Mistral3MultiModalProjector(config)
            prefix = "vision_tower"
        else:
            from transformers.models.llama4.modeling_llama4 import (Llama4MultiModalProjector,
                                                                    Llama4VisionModel)
            tower = Llama4VisionModel(config.vision_config)
            projector = Llama4MultiModalProjector(config)
            prefix = "vision_model"
    tower_params = _collapse((f"{prefix}.{n}", p) for n, p in tower.named_parameters())
    projector_params = _collapse((f"multi_modal_projector.{n}", p) for n, p in projector.named_parameters())
    return tower_params, projector_params


def _qwen_transformers_parts(model_type: str, config):
    """The Qwen towers hold their patch mergers (the projector here) inside ``visual``."""
    import torch
    from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import Qwen2_5_VisionTransformerPretrainedModel
    from transformers.models.qwen2_vl.modeling_qwen2_vl import Qwen2VisionTransformerPretrainedModel
    from transformers.models.qwen3_5.modeling_qwen3_5 import Qwen3_5VisionModel
    from transformers.models.qwen3_5_moe.modeling_qwen3_5_moe import Qwen3_5MoeVisionModel
    from transformers.models.qwen3_vl.modeling_qwen3_vl import Qwen3VLVisionModel
    from transformers.models.qwen3_vl_moe.modeling_qwen3_vl_moe import Qwen3VLMoeVisionModel

    classes = {"qwen2_vl": Qwen2VisionTransformerPretrainedModel, "qwen2_5_vl": Qwen2_5_VisionTransformerPretrainedModel, "qwen3_vl": Qwen3VLVisionModel,
               "qwen3_vl_moe": Qwen3VLMoeVisionModel, "qwen3_5": Qwen3_5VisionModel, "qwen3_5_moe": Qwen3_5MoeVisionModel}
    with torch.device("meta"):
        visual = classes[model_type]._from_config(config.vision_config)  # as the *VLModel classes build it
    named = [(f"visual.{name}", param) for name, param in visual.named_parameters()]
    merger = [(name, param) for name, param in named if name.startswith(("visual.merger.", "visual.deepstack_merger"))]
    tower = [(name, param) for name, param in named if (name, param) not in merger]
    assert [name for name, _ in named] == [name for name, _ in tower + merger]  # the mergers come last
    return _collapse(tower), _collapse(merger)


def _check_against_transformers(tower: VisionTower, qwen_wrapper: int = 0) -> None:
    model_type, config_dict = _hf_config(tower, qwen_wrapper)
    assert vision_tower_from_hf(model_type, config_dict) == tower
    hf_tower, hf_projector = _transformers_parts(model_type, config_dict)
    assert _ours(vision_tower_groups(tower)) == hf_tower
    assert _ours(projector_groups(tower)) == hf_projector


@pytest.mark.parametrize("name", REAL)
def test_real_sizes_match_transformers(name):
    _check_against_transformers(REAL[name][0])


def _random_tower(seed: int) -> VisionTower:
    rng = random.Random(seed)
    family = list(VisionFamily)[seed % len(VisionFamily)]
    heads = rng.choice([1, 2, 4])
    common = dict(family=family, hidden_size=heads * rng.choice([4, 8, 12]), num_layers=rng.randint(1, 3),
                  intermediate_size=rng.randint(3, 40), num_attention_heads=heads,
                  patch_size=rng.choice([2, 3, 4]), image_size=rng.randint(8, 20),
                  num_channels=rng.choice([1, 3, 4]), text_hidden_size=rng.randint(5, 48))
    if family in QWEN_WRAPPERS:  # no image_size: any image size, positions interpolated or rotary
        del common["image_size"]
        if family is VisionFamily.QWEN2_VL:  # the MLP is embed_dim * mlp_ratio wide
            common["intermediate_size"] = common["hidden_size"] * rng.randint(1, 4)
        qwen = dict(spatial_merge_size=rng.choice([1, 2, 3]), temporal_patch_size=rng.choice([1, 2, 3]))
        if family is VisionFamily.QWEN3_VL:
            qwen.update(num_position_embeddings=rng.choice([4, 9, 16]), num_deepstack_mergers=rng.randint(0, 3))
        if family is VisionFamily.QWEN3_5:
            qwen.update(num_position_embeddings=rng.choice([4, 9, 16]))
        return VisionTower(**common, **qwen)
    if family is VisionFamily.SIGLIP:
        return VisionTower(**common, vision_use_head=rng.random() < 0.5)
    if family is VisionFamily.PIXTRAL:
        return VisionTower(**common, spatial_merge_size=rng.choice([1, 2, 3]),
                           multimodal_projector_bias=rng.random() < 0.5,
                           projector_hidden_act=rng.choice(["gelu", "silu"]),
                           num_vision_feature_layers=rng.choice([1, 1, 2, 3]))
    # Llama4VisionModel's fc1 reads intermediate_size; the forward pass needs it to equal
    # hidden / ratio**2, but the parameters exist for any sizes
    return VisionTower(**common, vision_output_dim=rng.randint(3, 40), projector_input_dim=rng.randint(3, 40),
                       projector_output_dim=rng.randint(3, 40), pixel_shuffle_ratio=0.5)


@pytest.mark.parametrize("seed", range(15))
def test_random_small_configs_match_transformers(seed):
    _check_against_transformers(_random_tower(seed), qwen_wrapper=seed // len(VisionFamily))


@pytest.mark.parametrize("tower", [
    VisionTower(family="siglip", hidden_size=8, num_layers=2, intermediate_size=12, num_attention_heads=2,
                patch_size=2, image_size=9, text_hidden_size=6, vision_use_head=True),
    VisionTower(family="pixtral", hidden_size=8, num_layers=2, intermediate_size=12, num_attention_heads=2,
                patch_size=2, image_size=8, text_hidden_size=6, spatial_merge_size=2,
                multimodal_projector_bias=True, num_vision_feature_layers=2),
    VisionTower(family="pixtral", hidden_size=8, num_layers=1, intermediate_size=12, num_attention_heads=4,
                patch_size=3, image_size=12, text_hidden_size=6, spatial_merge_size=1),
], ids=["siglip-head", "pixtral-bias-2layers", "pixtral-merge1"])
def test_flags_match_transformers(tower):
    _check_against_transformers(tower)


@pytest.mark.parametrize("family", list(VisionFamily))
def test_full_model_names(family):
    """The names are the module paths under the base model: build the whole
    ForConditionalGeneration (tiny text model) and compare every non-text parameter."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    tower = _random_tower(list(VisionFamily).index(family))
    model_type, config_dict = _hf_config(tower)
    text = dict(config_dict["text_config"], num_hidden_layers=1, intermediate_size=16, head_dim=8, vocab_size=64)
    if model_type == "llama4":
        text.update(intermediate_size_mlp=16, num_local_experts=2, moe_layers=[0])
    config = transformers.AutoConfig.for_model(model_type, **dict(config_dict, text_config=text))
    classes = {"gemma3": "Gemma3ForConditionalGeneration", "mistral3": "Mistral3ForConditionalGeneration",
               "llama4": "Llama4ForConditionalGeneration", "qwen2_vl": "Qwen2VLForConditionalGeneration",
               "qwen2_5_vl": "Qwen2_5_VLForConditionalGeneration",
               "qwen3_vl": "Qwen3VLForConditionalGeneration", "qwen3_5": "Qwen3_5ForConditionalGeneration"}
    with torch.device("meta"):
        model = getattr(transformers, classes[model_type])(config)
    named = [(n.removeprefix("model."), p) for n, p in model.named_parameters()
             if not n.removeprefix("model.").startswith(("language_model.", "lm_head."))]
    assert _ours(vision_tower_groups(tower)) + _ours(projector_groups(tower)) == _collapse(named)


# --- vision_tower_from_hf -----------------------------------------------------------------------

# The vision parts of the released config.json files (transformers 4.50-era serializations).
GEMMA3_4B = {
    "architectures": ["Gemma3ForConditionalGeneration"], "boi_token_index": 255999,
    "eoi_token_index": 256000, "eos_token_id": [1, 106], "image_token_index": 262144,
    "initializer_range": 0.02, "mm_tokens_per_image": 256, "model_type": "gemma3",
    "text_config": {"hidden_size": 2560, "intermediate_size": 10240, "model_type": "gemma3_text",
                    "num_hidden_layers": 34, "sliding_window": 1024},
    "torch_dtype": "bfloat16", "transformers_version": "4.50.0.dev0",
    "vision_config": {"hidden_size": 1152, "image_size": 896, "intermediate_size": 4304,
                      "model_type": "siglip_vision_model", "num_attention_heads": 16,
                      "num_hidden_layers": 27, "patch_size": 14, "vision_use_head": False},
}
MISTRAL_SMALL_31 = {
    "architectures": ["Mistral3ForConditionalGeneration"], "image_token_index": 10,
    "model_type": "mistral3", "multimodal_projector_bias": False, "projector_hidden_act": "gelu",
    "spatial_merge_size": 2,
    "text_config": {"head_dim": 128, "hidden_size": 5120, "intermediate_size": 32768,
                    "model_type": "mistral", "num_attention_heads": 32, "num_hidden_layers": 40,
                    "num_key_value_heads": 8, "vocab_size": 131072},
    "torch_dtype": "bfloat16", "transformers_version": "4.50.0.dev0",
    "vision_config": {"attention_dropout": 0.0, "head_dim": 64, "hidden_act": "silu", "hidden_size": 1024,
                      "image_size": 1540, "initializer_range": 0.02, "intermediate_size": 4096,
                      "model_type": "pixtral", "num_attention_heads": 16, "num_channels": 3,
                      "num_hidden_layers": 24, "patch_size": 14, "rope_theta": 10000.0},
    "vision_feature_layer": -1,
}
LLAMA4_SCOUT = {
    "architectures": ["Llama4ForConditionalGeneration"], "boi_token_index": 200080,
    "eoi_token_index": 200081, "image_token_index": 200092, "model_type": "llama4",
    "text_config": {"hidden_size": 5120, "intermediate_size": 8192, "intermediate_size_mlp": 16384,
                    "model_type": "llama4_text", "num_local_experts": 16, "num_hidden_layers": 48},
    "tie_word_embeddings": False, "torch_dtype": "bfloat16", "transformers_version": "4.51.0.dev0",
    "vision_config": {"_attn_implementation_autoset": True, "attention_dropout": 0.0, "hidden_act": "gelu",
                      "hidden_size": 1408, "image_size": 336, "initializer_range": 0.02,
                      "intermediate_size": 5632, "model_type": "llama4_vision_model",
                      "multi_modal_projector_bias": False, "norm_eps": 1e-05, "num_attention_heads": 16,
                      "num_channels": 3, "num_hidden_layers": 34, "patch_size": 14,
                      "pixel_shuffle_ratio": 0.5, "projector_dropout": 0.0, "projector_input_dim": 4096,
                      "projector_output_dim": 4096, "rope_theta": 10000, "vision_feature_layer": -1,
                      "vision_feature_select_strategy": "default", "vision_output_dim": 4096},
}


def _corpus(name: str) -> dict:
    return json.loads((HF_CONFIGS / name).read_text())


@pytest.mark.parametrize("config, expected", [
    (GEMMA3_4B, REAL["gemma-3-4b"][0]),
    (MISTRAL_SMALL_31, REAL["mistral-small-3.1-24b"][0]),
    (LLAMA4_SCOUT, REAL["llama-4-scout/maverick"][0]),
    (_corpus("Qwen--Qwen2-VL-7B-Instruct.json"), REAL["qwen2-vl-7b"][0]),
    (_corpus("Qwen--Qwen2.5-VL-7B-Instruct.json"), REAL["qwen2.5-vl-7b"][0]),
    (_corpus("Qwen--Qwen3-VL-8B-Instruct.json"), REAL["qwen3-vl-8b"][0]),
    (_corpus("Qwen--Qwen3-VL-30B-A3B-Instruct.json"), REAL["qwen3-vl-30b-a3b"][0]),
], ids=["gemma3-4b", "mistral-small-3.1", "llama4-scout", "qwen2-vl-7b", "qwen2.5-vl-7b", "qwen3-vl-8b", "qwen3-vl-30b-a3b"])
def test_from_hf_released_configs(config, expected):
    assert vision_tower_from_hf(config["model_type"], config) == expected


@pytest.mark.parametrize("model_type", ["gemma3_text", "llama", "mistral", "llama4_text", "llava", "qwen2_vl_text"])
def test_from_hf_unknown_family_is_none(model_type):
    assert vision_tower_from_hf(model_type, {"vision_config": {"hidden_size": 8}}) is None


# Partial and absent configurations: memcalc must fill in what the transformers classes do
# (an absent vision_config and a partial one get different defaults in Mistral3Config).
PARTIAL = [
    ("gemma3", {}),
    ("gemma3", {"vision_config": {"hidden_size": 64, "num_attention_heads": 4}}),
    ("gemma3", {"vision_config": {"vision_use_head": False}, "text_config": {"num_hidden_layers": 2}}),
    ("mistral3", {}),
    ("mistral3", {"vision_config": {}}),
    ("mistral3", {"vision_config": {"model_type": "pixtral", "head_dim": 128}, "text_config": {"model_type": "mistral"}}),
    ("mistral3", {"vision_feature_layer": [-1, -2], "multimodal_projector_bias": True}),
    ("llama4", {}),
    ("llama4", {"vision_config": {"model_type": "something_else", "hidden_size": 1408}}),
    ("llama4", {"vision_config": {"multi_modal_projector_bias": True}}),
    ("qwen2_vl", {}),
    ("qwen2_vl", {"vision_config": {"model_type": "qwen2_vl", "embed_dim": 64, "num_heads": 4, "mlp_ratio": 2,
                                    "in_chans": 1, "spatial_patch_size": 7, "hidden_act": "quick_gelu"}}),
    ("qwen2_vl", {"vision_config": {"num_hidden_layers": 2, "num_attention_heads": 2, "hidden_size": 96,
                                    "in_channels": 1, "temporal_patch_size": 1, "spatial_merge_size": 3}}),
    ("qwen2_5_vl", {}),
    ("qwen2_5_vl", {"vision_config": {"model_type": "qwen2_5_vl_vision", "hidden_size": 64, "num_heads": 4,
                                      "in_chans": 1, "spatial_patch_size": 7, "window_size": 56}}),
    ("qwen3_vl", {"vision_config": {}}),
    ("qwen3_vl", {"vision_config": {"deepstack_visual_indexes": [], "num_hidden_layers": 3}}),
    ("qwen3_vl_moe", {"vision_config": {"model_type": "qwen3_vl_moe", "out_hidden_size": 2048}}),
]


@pytest.mark.parametrize("model_type, config", PARTIAL, ids=[f"{t}-{i}" for i, (t, _) in enumerate(PARTIAL)])
def test_from_hf_defaults_match_transformers(model_type, config):
    tower = vision_tower_from_hf(model_type, config)
    hf_tower, hf_projector = _transformers_parts(model_type, config)
    assert _ours(vision_tower_groups(tower)) == hf_tower
    assert _ours(projector_groups(tower)) == hf_projector


def test_from_hf_defaults_spot_values():
    qwen2 = vision_tower_from_hf("qwen2_vl", {})  # Qwen2VLVisionConfig: embed_dim 1280, mlp_ratio 4, hidden 3584
    assert (qwen2.hidden_size, qwen2.intermediate_size, qwen2.text_hidden_size) == (1280, 5120, 3584)
    assert vision_tower_from_hf("qwen2_5_vl", {}).hidden_size == 3584  # Qwen2_5_VLVisionConfig's default
    assert vision_tower_from_hf("qwen3_vl", {}).num_deepstack_mergers == 3  # deepstack_visual_indexes (8, 16, 24)
    assert vision_tower_from_hf("qwen3_vl_moe", {}).text_hidden_size == 3584  # out_hidden_size
    assert vision_tower_from_hf("gemma3", {}).vision_use_head is True  # SiglipVisionConfig default
    assert vision_tower_from_hf("mistral3", {}).image_size == 1540  # Mistral3Config init_kwargs
    assert vision_tower_from_hf("mistral3", {"vision_config": {}}).image_size == 1024  # PixtralVisionConfig
    assert vision_tower_from_hf("mistral3", {}).text_hidden_size == 5120
    assert vision_tower_from_hf("mistral3", {"text_config": {}}).text_hidden_size == 4096  # MistralConfig
    assert vision_tower_from_hf("llama4", {}).vision_output_dim == 7680


def test_from_hf_unknown_vision_key_raises():
    config = dict(GEMMA3_4B, vision_config=dict(GEMMA3_4B["vision_config"], use_qk_norm=True, num_registers=4))
    with pytest.raises(ValueError, match="num_registers, use_qk_norm"):
        vision_tower_from_hf("gemma3", config)


@pytest.mark.parametrize("model_type, vision_config, match", [
    ("gemma3", {"model_type": "clip_vision_model"}, "clip_vision_model"),
    ("mistral3", {"model_type": "siglip_vision_model"}, "siglip_vision_model"),
    ("gemma3", {"image_size": [896, 896]}, "image_size"),
    ("gemma3", {"vision_use_head": "no"}, "vision_use_head"),
    ("llama4", {"hidden_size": 1408, "num_attention_heads": 13}, "must divide"),
    ("qwen2_5_vl", {"model_type": "qwen2_vl"}, "qwen2_vl"),
    ("qwen2_vl", {"model_type": "qwen2_5_vl_vision"}, "qwen2_5_vl_vision"),
    ("qwen2_vl", {"mlp_ratio": 4.0}, "mlp_ratio"),
    ("qwen2_vl", {"embed_dim": 1280, "num_heads": 12}, "must divide"),
    ("qwen2_vl", {"intermediate_size": 5120}, "intermediate_size"),
    ("qwen2_vl", {"out_hidden_size": 3584}, "out_hidden_size"),
    ("qwen2_vl", {"depth": 4, "num_hidden_layers": 5}, "disagree"),
    ("qwen3_vl", {"patch_size": [16, 16]}, "patch_size"),
    ("qwen3_vl", {"depth": 4, "num_hidden_layers": 5}, "disagree"),
    ("qwen3_vl", {"deepstack_visual_indexes": [8, True]}, "deepstack_visual_indexes"),
    ("qwen3_vl_moe", {"fullatt_block_indexes": [3]}, "fullatt_block_indexes"),
])
def test_from_hf_bad_values_raise(model_type, vision_config, match):
    with pytest.raises(ValueError, match=match):
        vision_tower_from_hf(model_type, {"vision_config": vision_config})


def _collected_configs():
    return sorted(HF_CONFIGS.glob("*.json")) if HF_CONFIGS.is_dir() else []


@pytest.mark.parametrize("path", _collected_configs(), ids=lambda p: p.stem)
def test_from_hf_collected_configs(path):
    """Real config.json files in tests/data/hf_configs (when present): memcalc's count equals
    transformers' for the ones with a known vision family."""
    config = json.loads(path.read_text())
    model_type = config.get("model_type", "")
    tower = vision_tower_from_hf(model_type, config)
    if tower is None:
        assert model_type not in ("gemma3", "mistral3", "llama4", "qwen2_vl", "qwen2_5_vl", "qwen3_vl", "qwen3_vl_moe")
        return
    hf_tower, hf_projector = _transformers_parts(model_type, config)
    assert _ours(vision_tower_groups(tower)) == hf_tower
    assert _ours(projector_groups(tower)) == hf_projector


# --- the schema -------------------------------------------------------------------------------

def test_family_fields_checked():
    with pytest.raises(ValueError, match="image_size do not apply to the qwen3_vl"):
        VisionTower(**QWEN3_VL_VISION, text_hidden_size=4096, image_size=448)
    with pytest.raises(ValueError, match="needs image_size"):
        VisionTower(**{**SIGLIP_400M, "image_size": None}, text_hidden_size=2560)
    qwen = VisionTower(family="qwen3_vl", hidden_size=1152, num_layers=27, intermediate_size=4304,
                       num_attention_heads=16, patch_size=16, text_hidden_size=4096)
    assert qwen == VisionTower(**QWEN3_VL_VISION, text_hidden_size=4096)  # Qwen3VLVisionConfig's defaults
    with pytest.raises(ValueError, match="needs vision_use_head"):
        VisionTower(**{**SIGLIP_400M, "vision_use_head": None}, text_hidden_size=2560)
    with pytest.raises(ValueError, match="spatial_merge_size do not apply"):
        VisionTower(**SIGLIP_400M, text_hidden_size=2560, spatial_merge_size=2)
    pixtral = VisionTower(**PIXTRAL_MS31, text_hidden_size=5120)
    assert (pixtral.multimodal_projector_bias, pixtral.projector_hidden_act, pixtral.num_vision_feature_layers) \
        == (False, "gelu", 1)
    assert VisionTower(**{**PIXTRAL_MS31, "family": "pixtral"}, text_hidden_size=5120).family is VisionFamily.PIXTRAL


def test_pydantic_validates_and_forbids_extra():
    pydantic = pytest.importorskip("pydantic")
    adapter = pydantic.TypeAdapter(VisionTower)
    tower = adapter.validate_python({**LLAMA4_VISION, "text_hidden_size": 5120})
    assert tower == REAL["llama-4-scout/maverick"][0]
    with pytest.raises(pydantic.ValidationError, match="hiden_size"):
        adapter.validate_python({**LLAMA4_VISION, "text_hidden_size": 5120, "hiden_size": 3})
    with pytest.raises(pydantic.ValidationError, match="greater than 0"):
        adapter.validate_python({**LLAMA4_VISION, "text_hidden_size": 0})


@pytest.mark.parametrize("name, part", [
    ("visual.merger.ln_q.weight", "projector"),
    ("model.visual.merger.linear_fc1.weight", "projector"),
    ("model.visual.deepstack_merger_list.0.norm.weight", "projector"),
    ("visual.blocks.0.attn.qkv.weight", "vision"),
    ("model.visual.pos_embed.weight", "vision"),
])
def test_checkpoint_parts_follow_the_tower_and_projector_split(name, part):
    """A Qwen-VL checkpoint's table (``memcalc show`` on safetensors) puts the patch mergers with
    the projector, as the parameter table does."""
    from memcalc.checkpoint import part_of

    assert part_of(name).value == part


def test_import_is_light():
    code = ("import sys, memcalc.vision; "
            "print(sorted(m for m in ('torch', 'transformers', 'pydantic', 'numpy', 'yaml') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
