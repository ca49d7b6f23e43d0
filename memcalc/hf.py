"""Hugging Face ``config.json`` import: key aliases, per-``model_type`` structure and defaults.

Each known ``model_type`` has a reader that turns its keys into memcalc's architecture (layer
types, MoE layout, Mamba and linear-attention mixers, norm placement, multimodal parts), with
the defaults of the transformers configuration class for keys the file leaves out. A
``model_type`` memcalc does not know, or a key that changes the structure and that the reader
for that type does not read, is refused with the keys named: a guessed structure gives a wrong
number with exit 0, the worst thing memcalc can print. ``--assume-llama`` keeps the old guess.

Imported only when a config.json is read, so pydantic's model machinery stays off the hot path.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

from pydantic import AliasChoices, BaseModel, ConfigDict, Field

from memcalc.config import (
    DEFAULT_SEQ_LEN,
    LayerType,
    MambaVersion,
    MLPKind,
    ModelConfig,
    NonNegativeInt,
    NormKind,
    NormPlacement,
    PositionKind,
    PositiveInt,
    QKNormScope,
    parse,
)
from memcalc.errors import InputError

# What each model_type implies when config.json is silent. ``tie_word_embeddings`` follows each
# transformers configuration class's own default (PretrainedConfig defaults to True; Llama,
# Mistral, Mixtral, Qwen2 and Phi-3 override it to False).
_LLAMA_STYLE: dict[str, Any] = dict(
    mlp=MLPKind.GATED, norm=NormKind.RMSNORM, position_embedding=PositionKind.ROTARY, tie_word_embeddings=False
)
_GPT2_STYLE: dict[str, Any] = dict(
    mlp=MLPKind.PLAIN, hidden_act="gelu_tanh", norm=NormKind.LAYERNORM, norm_bias=True, qkv_bias=True,
    attn_output_bias=True, mlp_bias=True, position_embedding=PositionKind.LEARNED, tie_word_embeddings=True,
)
HF_MODEL_TYPE_DEFAULTS: dict[str, dict[str, Any]] = {
    "llama": _LLAMA_STYLE,
    "mistral": _LLAMA_STYLE,
    "mixtral": _LLAMA_STYLE,
    "phi3": {**_LLAMA_STYLE, "fused_gate_up": True},
    "qwen2": {**_LLAMA_STYLE, "qkv_bias": True},
    "qwen2_moe": {**_LLAMA_STYLE, "qkv_bias": True},
    "qwen3": {**_LLAMA_STYLE, "qk_norm": True},
    "qwen3_moe": {**_LLAMA_STYLE, "qk_norm": True},
    "qwen3_next": {**_LLAMA_STYLE, "qk_norm": True, "attn_output_gate": True, "norm_weight_offset": True},
    "qwen3_5_text": {**_LLAMA_STYLE, "qk_norm": True, "attn_output_gate": True, "norm_weight_offset": True},
    "qwen3_5_moe_text": {**_LLAMA_STYLE, "qk_norm": True, "attn_output_gate": True, "norm_weight_offset": True},
    "deepseek_v2": _LLAMA_STYLE,
    "deepseek_v3": _LLAMA_STYLE,
    "kimi_k2": _LLAMA_STYLE,  # DeepseekV3ForCausalLM under another name (Kimi K2)
    "glm4_moe": {**_LLAMA_STYLE},
    "gemma": {**_LLAMA_STYLE, "tie_word_embeddings": True, "hidden_act": "gelu_tanh", "norm_weight_offset": True},
    "gemma2": {**_LLAMA_STYLE, "tie_word_embeddings": True, "hidden_act": "gelu_tanh", "norms_per_layer": 4,
               "norm_weight_offset": True},
    "gemma3_text": {**_LLAMA_STYLE, "tie_word_embeddings": True, "hidden_act": "gelu_tanh", "norms_per_layer": 4,
                    "qk_norm": True, "norm_weight_offset": True},
    # eager_attention_forward: the softmax in the logits' dtype (bf16 without autocast; with it, the
    # fp32 sinks promote the concatenated logits to fp32)
    "gpt_oss": {**_LLAMA_STYLE, "attention_sinks": True, "softmax_in_fp32": False},
    "olmo2": {**_LLAMA_STYLE, "qk_norm": True, "qk_norm_scope": QKNormScope.FULL,
              "norm_placement": NormPlacement.POST},
    "olmo3": {**_LLAMA_STYLE, "qk_norm": True, "qk_norm_scope": QKNormScope.FULL,
              "norm_placement": NormPlacement.POST},
    "smollm3": {**_LLAMA_STYLE, "tie_word_embeddings": True},
    "llama4_text": {**_LLAMA_STYLE},
    # transformers' Jamba, Nemotron-H and Mamba classes build no rotary embedding (NoPE attention)
    "jamba": {**_LLAMA_STYLE, "position_embedding": PositionKind.NONE},
    "granitemoehybrid": {**_LLAMA_STYLE},  # rotary only with position_embedding_type "rope"
    "mamba": {**_LLAMA_STYLE, "tie_word_embeddings": True, "mlp": MLPKind.NONE, "position_embedding": PositionKind.NONE},
    "falcon_mamba": {**_LLAMA_STYLE, "tie_word_embeddings": True, "mlp": MLPKind.NONE,
                     "position_embedding": PositionKind.NONE},
    "mamba2": {**_LLAMA_STYLE, "mlp": MLPKind.NONE, "position_embedding": PositionKind.NONE},
    "nemotron_h": {**_LLAMA_STYLE, "position_embedding": PositionKind.NONE},
    "falcon_h1": {**_LLAMA_STYLE},
    "gpt2": _GPT2_STYLE | {"softmax_in_fp32": False},  # eager_attention_forward: softmax in the scores' dtype
    "qwen2_vl_text": {**_LLAMA_STYLE, "qkv_bias": True},
    "qwen2_5_vl_text": {**_LLAMA_STYLE, "qkv_bias": True},
    "qwen3_vl_text": {**_LLAMA_STYLE, "qk_norm": True},
    "qwen3_vl_moe_text": {**_LLAMA_STYLE, "qk_norm": True},
}

# Types whose norms are RMSNorms though their files name the epsilon layer_norm_epsilon.
_RMS_ONLY = frozenset({"mamba", "falcon_mamba", "mamba2", "nemotron_h"})

# Multimodal wrappers: the language model is ``text_config``; the vision tower is read by
# memcalc.vision. The text model_type transformers uses when text_config names none.
_MULTIMODAL_TEXT_TYPES = {"gemma3": "gemma3_text", "llama4": "llama4_text", "mistral3": "mistral",
                          "qwen2_vl": "qwen2_vl_text", "qwen2_5_vl": "qwen2_5_vl_text", "qwen3_vl": "qwen3_vl_text",
                          "qwen3_vl_moe": "qwen3_vl_moe_text", "qwen3_5": "qwen3_5_text",
                          "qwen3_5_moe": "qwen3_5_moe_text"}
# The Qwen-VL wrappers always build their own text configuration class (Qwen2VLTextConfig, Qwen2_5_VLTextConfig,
# Qwen3VLTextConfig, Qwen3VLMoeTextConfig), whatever text_config.model_type says; a file naming
# another type than that one or the wrapper's own is refused. Qwen2-VL and Qwen2.5-VL files written
# before transformers 4.5x keep the text model's keys at the top level (Qwen2VLConfig and
# Qwen2_5_VLConfig read them there when text_config is absent); Qwen3VLConfig ignores top-level text keys, so a Qwen3-VL file
# without text_config is refused.
_QWEN_VL_TYPES = frozenset({"qwen2_vl", "qwen2_5_vl", "qwen3_vl", "qwen3_vl_moe", "qwen3_5", "qwen3_5_moe"})
# The wrappers that read flat text keys and honour text_config's tie flag (Qwen2VLConfig, Qwen2_5_VLConfig)
_QWEN2_VL_WRAPPERS = frozenset({"qwen2_vl", "qwen2_5_vl"})
# Their text configuration classes' defaults for the keys that size parameters, used for keys
# the file leaves out (configuration_qwen2_vl.py, configuration_qwen2_5_vl.py, configuration_qwen3_vl.py,
# configuration_qwen3_vl_moe.py). Qwen3VLMoeTextConfig's head_dim defaults to hidden / heads;
# Qwen2VLTextConfig's defaults are Qwen2_5_VLTextConfig's.
_QWEN_VL_TEXT_DEFAULTS: dict[str, dict[str, Any]] = {
    "qwen2_vl_text": dict(vocab_size=152064, hidden_size=8192, intermediate_size=29568, num_hidden_layers=80,
                          num_attention_heads=64, num_key_value_heads=8, max_position_embeddings=32768,
                          use_sliding_window=False, sliding_window=4096, max_window_layers=80),
    "qwen2_5_vl_text": dict(vocab_size=152064, hidden_size=8192, intermediate_size=29568, num_hidden_layers=80,
                            num_attention_heads=64, num_key_value_heads=8, max_position_embeddings=32768,
                            use_sliding_window=False, sliding_window=4096, max_window_layers=80),
    "qwen3_vl_text": dict(vocab_size=151936, hidden_size=4096, intermediate_size=22016, num_hidden_layers=32,
                          num_attention_heads=32, num_key_value_heads=32, head_dim=128,
                          max_position_embeddings=128000, attention_bias=False),
    "qwen3_vl_moe_text": dict(vocab_size=151936, hidden_size=2048, intermediate_size=5632, num_hidden_layers=24,
                              num_attention_heads=16, num_key_value_heads=16, max_position_embeddings=128000,
                              attention_bias=False, decoder_sparse_step=1, moe_intermediate_size=1408,
                              num_experts_per_tok=4, num_experts=60, mlp_only_layers=[]),
    # Qwen3_5TextConfig and Qwen3_5MoeTextConfig (configuration_qwen3_5.py, configuration_qwen3_5_moe.py)
    "qwen3_5_text": dict(vocab_size=248320, hidden_size=4096, intermediate_size=12288, num_hidden_layers=32,
                         num_attention_heads=16, num_key_value_heads=4, head_dim=256, max_position_embeddings=32768,
                         attention_bias=False),
    "qwen3_5_moe_text": dict(vocab_size=248320, hidden_size=2048, num_hidden_layers=40, num_attention_heads=16,
                             num_key_value_heads=2, head_dim=256, max_position_embeddings=32768, attention_bias=False,
                             moe_intermediate_size=512, shared_expert_intermediate_size=512, num_experts_per_tok=8,
                             num_experts=256),
}


# The MLA and MoE defaults of transformers' DeepseekV2Config / DeepseekV3Config, used for keys a
# config.json leaves out (configuration_deepseek_v2.py, configuration_deepseek_v3.py). A null
# ``q_lora_rank`` in the file means a direct q_proj (DeepSeek-V2-Lite); an absent one, the default.
_DEEPSEEK_V3 = dict(kv_lora_rank=512, q_lora_rank=1536, qk_rope_head_dim=64, qk_nope_head_dim=128,
                    v_head_dim=128, num_experts=256, num_shared_experts=1, moe_intermediate_size=2048,
                    first_dense_layers=3, experts_per_token=8)
_DEEPSEEK_DEFAULTS: dict[str, dict[str, Any]] = {
    "deepseek_v2": dict(kv_lora_rank=512, q_lora_rank=1536, qk_rope_head_dim=64, qk_nope_head_dim=128,
                        v_head_dim=128, num_experts=64, num_shared_experts=2, moe_intermediate_size=1407,
                        first_dense_layers=0),
    "deepseek_v3": _DEEPSEEK_V3,
    "kimi_k2": _DEEPSEEK_V3,
}


# transformers' ACT2FN names for the same function.
_ACTIVATION_NAMES = {
    "gelu_new": "gelu_tanh",
    "gelu_pytorch_tanh": "gelu_tanh",
    "gelu_fast": "gelu_tanh",
    "swish": "silu",
}


# Keys that change a model's structure. A reader that does not consume a key present with a
# non-trivial value refuses the file: the key would otherwise be ignored and the count be wrong.
STRUCTURAL_KEYS = frozenset({
    "layer_types", "layers_block_type", "layer_block_type", "hybrid_override_pattern", "block_types",
    "num_local_experts", "num_experts", "n_routed_experts", "moe_intermediate_size", "n_shared_experts",
    "shared_expert_intermediate_size", "shared_intermediate_size", "decoder_sparse_step", "mlp_only_layers",
    "moe_layer_freq", "first_k_dense_replace", "interleave_moe_layer_step", "moe_layers", "expert_layer_period",
    "expert_layer_offset", "moe_every_k_layers", "num_expert_group",
    "attn_layer_period", "attn_layer_offset", "attn_layer_indices", "mamba_d_state", "mamba_d_conv",
    "mamba_expand", "mamba_n_heads", "mamba_d_ssm", "ssm_state_size", "state_size", "linear_num_value_heads",
    "linear_key_head_dim", "full_attention_interval", "kv_lora_rank", "q_lora_rank",
    "sliding_window_pattern", "_sliding_window_pattern", "attention_chunk_size", "use_qk_norm", "qk_layernorm",
    "parallel_attn", "parallel_residual", "new_decoder_architecture", "multi_query", "alibi",
    "intermediate_size_mlp", "num_nextn_predict_layers", "cross_attention_layers", "vision_config",
    "audio_config", "use_parallel_residual", "shared_attention_norm",
})


def _trivial(value: Any) -> bool:
    """A value that leaves the structure as a plain decoder has it."""
    return value is None or value is False or value == 0 or value == [] or value == {}


class HFConfig(BaseModel):
    """The subset of a Hugging Face ``config.json`` memcalc reads; other keys are ignored."""

    model_config = ConfigDict(extra="ignore", frozen=True)

    model_type: str = ""
    hidden_size: PositiveInt = Field(validation_alias=AliasChoices("hidden_size", "n_embd", "d_model"))
    num_layers: PositiveInt = Field(validation_alias=AliasChoices("num_hidden_layers", "n_layer", "num_layers"))
    num_attention_heads: PositiveInt | None = Field(None, validation_alias=AliasChoices("num_attention_heads", "n_head"))
    num_kv_heads: PositiveInt | None = Field(None, validation_alias=AliasChoices("num_key_value_heads", "num_kv_heads"))
    head_dim: PositiveInt | None = None
    intermediate_size: PositiveInt | None = Field(
        None, validation_alias=AliasChoices("intermediate_size", "n_inner", "ffn_dim")
    )
    vocab_size: PositiveInt
    max_position_embeddings: PositiveInt | None = Field(
        None, validation_alias=AliasChoices("max_position_embeddings", "n_positions", "n_ctx")
    )
    tie_word_embeddings: bool | None = None
    hidden_act: str | None = Field(
        None, validation_alias=AliasChoices("hidden_activation", "hidden_act", "activation_function")
    )
    rms_norm_eps: float | None = None
    layer_norm_epsilon: float | None = Field(None, validation_alias=AliasChoices("layer_norm_epsilon", "layer_norm_eps"))
    attention_bias: bool | None = None
    mlp_bias: bool | None = None
    partial_rotary_factor: float | None = Field(None, gt=0, le=1)
    sliding_window: NonNegativeInt | None = None  # 0: none (Qwen2-MoE's default)
    use_sliding_window: bool | None = None
    num_experts: NonNegativeInt | None = Field(
        None, validation_alias=AliasChoices("num_local_experts", "n_routed_experts", "num_experts")
    )
    experts_per_token: PositiveInt | None = Field(None, validation_alias="num_experts_per_tok")
    moe_intermediate_size: PositiveInt | None = None
    num_shared_experts: NonNegativeInt | None = Field(None, validation_alias="n_shared_experts")
    shared_expert_intermediate_size: NonNegativeInt | None = None
    first_dense_layers: NonNegativeInt | None = Field(None, validation_alias="first_k_dense_replace")
    moe_layer_freq: PositiveInt | None = None
    # multi-head latent attention (DeepSeek-V2/V3)
    kv_lora_rank: PositiveInt | None = None
    q_lora_rank: PositiveInt | None = None
    qk_rope_head_dim: PositiveInt | None = None
    qk_nope_head_dim: PositiveInt | None = None
    v_head_dim: PositiveInt | None = None


class _Reader:
    """Reads one config.json mapping into ModelConfig fields, recording what it consumed."""

    def __init__(self, data: dict[str, Any], hf: HFConfig, source: str) -> None:
        self.data, self.hf, self.source = data, hf, source
        self.notes: list[str] = []
        self.consumed: set[str] = set()

    def get(self, key: str, default: Any = None, kind: type | tuple[type, ...] | None = None) -> Any:
        """A key's value (``default`` when absent or null), type-checked; the key counts as read."""
        self.consumed.add(key)
        value = self.data.get(key)
        if value is None:
            return default
        kinds = () if kind is None else kind if isinstance(kind, tuple) else (kind,)
        # a JSON true is an int to Python: accept it only where a bool is expected
        if kinds and (not isinstance(value, kinds) or isinstance(value, bool) and bool not in kinds):
            raise InputError(f"{self.source}: {key}: expected {' or '.join(k.__name__ for k in kinds)}, got {value!r}")
        return value

    def positive(self, key: str, default: int | None = None) -> int | None:
        value = self.get(key, default, int)
        if value is not None and value <= 0:
            raise InputError(f"{self.source}: {key}: must be positive, got {value}")
        return value

    def index_list(self, key: str, num_layers: int) -> list[int]:
        values = self.get(key, [], list)
        if not all(isinstance(v, int) and not isinstance(v, bool) and 0 <= v < num_layers for v in values):
            raise InputError(f"{self.source}: {key}: expected layer indices below num_hidden_layers ({num_layers})")
        return values

    def layer_types(self, mapping: dict[str, LayerType], num_layers: int, key: str = "layer_types") -> list[LayerType] | None:
        values = self.get(key, None, list)
        if values is None:
            return None
        if len(values) != num_layers:
            raise InputError(f"{self.source}: {key}: lists {len(values)} layers; num_hidden_layers is {num_layers}")
        unknown = sorted({str(v) for v in values} - set(mapping))
        if unknown:
            raise InputError(f"{self.source}: {key}: layer type {', '.join(map(repr, unknown))} is not modelled "
                             f"(memcalc reads {', '.join(sorted(mapping))})")
        return [mapping[v] for v in values]


_ATTENTION_TYPES = {"full_attention": LayerType.FULL_ATTENTION, "sliding_attention": LayerType.SLIDING_ATTENTION,
                    "chunked_attention": LayerType.CHUNKED_ATTENTION}


def _sliding_layer_types(reader: _Reader, fields: dict[str, Any]) -> None:
    """``layer_types`` of full, sliding and chunked attention (Gemma 2/3, gpt-oss, OLMo 3, Qwen3,
    SmolLM3), or Gemma's ``sliding_window_pattern``: the last of each group of n layers attends
    globally."""
    num_layers = fields["num_layers"]
    types = reader.layer_types(_ATTENTION_TYPES, num_layers)
    pattern = reader.get("sliding_window_pattern", None, int) or reader.get("_sliding_window_pattern", None, int)
    window = reader.hf.sliding_window or None
    reader.consumed.update({"sliding_window", "use_sliding_window"})
    if types is None and pattern and window:
        types = [LayerType.FULL_ATTENTION if (i + 1) % pattern == 0 else LayerType.SLIDING_ATTENTION
                 for i in range(num_layers)]
    if types is None:
        if window is not None and reader.hf.use_sliding_window is not False:
            fields["sliding_window"] = window
        return
    if LayerType.SLIDING_ATTENTION in types:
        if window is None:
            raise InputError(f"{reader.source}: layer_types has sliding_attention layers but sliding_window is null")
        fields["sliding_window"] = window
    if any(kind is not LayerType.FULL_ATTENTION for kind in types):
        fields["layer_types"] = types


def _sparse_moe_layers(reader: _Reader, num_layers: int) -> list[int]:
    """Qwen-MoE's rule (modeling_qwen2_moe.py / qwen3_moe / qwen3_next): layer i has experts unless
    it is in ``mlp_only_layers``, when ``(i + 1) % decoder_sparse_step == 0``."""
    step = reader.positive("decoder_sparse_step", 1)
    dense = set(reader.index_list("mlp_only_layers", num_layers))
    return [i for i in range(num_layers) if i not in dense and (i + 1) % step == 0]


def _moe_fields(reader: _Reader, fields: dict[str, Any], *, layers: list[int] | None = None,
                width: int | None = None, shared_width: int | None = None, **extra: Any) -> None:
    hf = reader.hf
    reader.consumed.update({"num_local_experts", "n_routed_experts", "num_experts", "num_experts_per_tok",
                            "moe_intermediate_size"})
    if not hf.num_experts:
        return
    moe: dict[str, Any] = dict(
        num_experts=hf.num_experts,
        experts_per_token=hf.experts_per_token or 1,
        expert_intermediate_size=width or hf.moe_intermediate_size or fields["intermediate_size"],
        **extra,
    )
    if hf.experts_per_token is None:
        reader.notes.append("num_experts_per_tok absent: assuming 1")
    if shared_width:
        moe.update(num_shared_experts=1, shared_expert_intermediate_size=shared_width)
    if layers is not None and layers != list(range(fields["num_layers"])):
        if not layers:
            return
        moe["layers"] = layers
    fields["moe"] = moe


# --- Per-family readers -------------------------------------------------------------------------


def _read_decoder(reader: _Reader, fields: dict[str, Any]) -> None:
    """Llama, Mistral, Phi-3, Qwen2/3, Gemma, GPT-2, SmolLM3, OLMo 2/3: attention layers, a
    dense MLP or Mixtral-style experts on every layer."""
    _sliding_layer_types(reader, fields)
    if fields["model_type"].startswith("qwen3"):
        reader.get("use_qk_norm")  # Qwen3 attention always normalises q and k per head
    if fields["model_type"] == "smollm3":
        reader.get("no_rope_layers")  # NoPE layers hold no parameters of their own
        reader.get("no_rope_layer_interval")
    if fields["model_type"] == "mixtral":  # the other types' classes build no experts, whatever the keys say
        _moe_fields(reader, fields)


def _read_qwen_moe(reader: _Reader, fields: dict[str, Any]) -> None:
    """Qwen2-MoE, Qwen3-MoE: experts on the layers of ``decoder_sparse_step``/``mlp_only_layers``;
    Qwen2-MoE adds a shared expert with a sigmoid gate."""
    _sliding_layer_types(reader, fields)
    reader.get("use_qk_norm")  # Qwen3-MoE normalises q and k per head whatever the key says
    layers = _sparse_moe_layers(reader, fields["num_layers"])
    shared = reader.positive("shared_expert_intermediate_size") if fields["model_type"] == "qwen2_moe" else None
    _moe_fields(reader, fields, layers=layers, shared_width=shared, shared_expert_gate=bool(shared))


def _gated_delta_layers(reader: _Reader, fields: dict[str, Any], *, split_projections: bool) -> None:
    """Qwen3-Next's and Qwen3.5's layer kinds (``layer_types``, else gated full attention every
    ``full_attention_interval`` layers, default 4) and their gated delta net's sizes (the configuration
    classes' defaults where the file leaves them out)."""
    num_layers = fields["num_layers"]
    types = reader.layer_types({"full_attention": LayerType.FULL_ATTENTION,
                                "linear_attention": LayerType.LINEAR_ATTENTION}, num_layers)
    if types is None:
        interval = reader.positive("full_attention_interval", 4)
        types = [LayerType.FULL_ATTENTION if (i + 1) % interval == 0 else LayerType.LINEAR_ATTENTION
                 for i in range(num_layers)]
    reader.consumed.add("full_attention_interval")
    fields["layer_types"] = types
    fields["linear_attention"] = dict(
        num_key_heads=reader.positive("linear_num_key_heads", 16), num_value_heads=reader.positive(
            "linear_num_value_heads", 32), key_head_dim=reader.positive("linear_key_head_dim", 128),
        value_head_dim=reader.positive("linear_value_head_dim", 128),
        conv_kernel=reader.positive("linear_conv_kernel_dim", 4), split_projections=split_projections)


def _read_qwen3_next(reader: _Reader, fields: dict[str, Any]) -> None:
    """Qwen3-Next (modeling_qwen3_next.py): gated delta net layers with gated full attention every
    ``full_attention_interval`` layers (default 4); MoE with a gated shared expert."""
    _gated_delta_layers(reader, fields, split_projections=False)
    layers = _sparse_moe_layers(reader, fields["num_layers"])
    shared = reader.positive("shared_expert_intermediate_size")
    # the router renormalises its top-k weights (Qwen3NextConfig default True): training activations only
    _moe_fields(reader, fields, layers=layers, shared_width=shared, shared_expert_gate=bool(shared),
                norm_topk_prob=reader.get("norm_topk_prob", True, bool))


def _read_qwen3_5(reader: _Reader, fields: dict[str, Any]) -> None:
    """Qwen3.5 and Qwen3.5-MoE (modeling_qwen3_5.py ``Qwen3_5TextModel``, modeling_qwen3_5_moe.py):
    Qwen3-Next's layers, the gated delta net's projections split (``in_proj_qkv``, ``in_proj_z``,
    ``in_proj_b``, ``in_proj_a``); a dense gated MLP on every layer, or experts with a gated shared
    expert on every layer (Qwen3_5MoeSparseMoeBlock; its router always renormalises the top k). The
    attention always gates its output (``attn_output_gate`` is not read by the class). The
    checkpoints' multi-token-prediction layers (``mtp.*``) are not built by transformers
    (``_keys_to_ignore_on_load_unexpected``) and are not counted."""
    _gated_delta_layers(reader, fields, split_projections=True)
    reader.consumed.update({"attn_output_gate", "mtp_use_dedicated_embeddings"})
    state_dtype = reader.get("mamba_ssm_dtype")
    if state_dtype is not None:  # vLLM keeps the recurrent state in it (its Qwen3.5 config hook)
        from memcalc.quantization import _DTYPES

        if state_dtype not in _DTYPES:
            raise InputError(f"{reader.source}: mamba_ssm_dtype: {state_dtype!r} is not one of "
                             f"{', '.join(sorted(_DTYPES))}")
        fields["linear_attention"]["state_dtype"] = _DTYPES[state_dtype]
    mtp = reader.get("mtp_num_hidden_layers", 0, int)
    if mtp:
        reader.notes.append(f"the checkpoint's {mtp} multi-token-prediction layer(s) (mtp.*) are not counted: "
                            "transformers does not build them")
    if fields["model_type"] == "qwen3_5_moe_text":
        # Qwen3_5MoeTextConfig has no dense MLP width: every layer's MLP is its experts
        reader.notes[:] = [note for note in reader.notes if not note.startswith("intermediate_size absent")]
        shared = reader.positive("shared_expert_intermediate_size", 512)
        _moe_fields(reader, fields, shared_width=shared, shared_expert_gate=True, norm_topk_prob=True)
        reader.consumed.update({"mlp_only_layers", "decoder_sparse_step"})  # the class puts experts on every layer


def _read_gpt_oss(reader: _Reader, fields: dict[str, Any]) -> None:
    """gpt-oss (modeling_gpt_oss.py): alternating sliding and full attention with biases and a
    learned sink per head; experts on every layer with biased router and projections."""
    _sliding_layer_types(reader, fields)
    fields["intermediate_size"] = None
    fields["mlp"] = MLPKind.GATED
    width = reader.hf.intermediate_size or 2880
    _moe_fields(reader, fields, width=width, router_bias=True, expert_bias=True, clamped_swiglu=True)
    reader.consumed.update({"swiglu_limit"})  # the clamp's bound: no parameters, no sizes


def _read_gemma3(reader: _Reader, fields: dict[str, Any]) -> None:
    """Gemma 3 text (modeling_gemma3.py): four norms a layer, per-head q/k norms, five sliding
    layers to one global (``layer_types`` or ``sliding_window_pattern`` 6)."""
    if "layer_types" not in reader.data and not reader.data.get("sliding_window_pattern"):
        reader.data = {**reader.data, "sliding_window_pattern": 6}
        reader.data.setdefault("sliding_window", 4096)
        reader.hf = reader.hf.model_copy(update={"sliding_window": reader.data["sliding_window"]})
    _sliding_layer_types(reader, fields)


def _read_llama4(reader: _Reader, fields: dict[str, Any]) -> None:
    """Llama 4 text (modeling_llama4.py): experts with one shared expert on ``moe_layers`` (or
    every ``interleave_moe_layer_step``-th layer), dense layers of ``intermediate_size_mlp``;
    rotary layers attend in chunks of ``attention_chunk_size``, every ``no_rope_layer_interval``-th
    layer (NoPE) globally. Its q/k norm is a weightless L2 norm."""
    num_layers = fields["num_layers"]
    step = reader.positive("interleave_moe_layer_step", 1)
    given = reader.data.get("moe_layers")
    layers = reader.index_list("moe_layers", num_layers) if given is not None else list(range(step - 1, num_layers,
                                                                                               step))
    width = reader.hf.intermediate_size or 8192
    fields["intermediate_size"] = reader.positive("intermediate_size_mlp", 16384)
    _moe_fields(reader, fields, layers=layers, width=width, shared_width=width)
    chunk = reader.positive("attention_chunk_size", 8192)
    types = reader.layer_types(_ATTENTION_TYPES, num_layers)
    if types is None:
        interval = reader.positive("no_rope_layer_interval", 4)
        rope = reader.get("no_rope_layers") or [int((i + 1) % interval != 0) for i in range(num_layers)]
        types = [LayerType.CHUNKED_ATTENTION if uses_rope else LayerType.FULL_ATTENTION for uses_rope in rope]
    reader.consumed.update({"no_rope_layers", "no_rope_layer_interval"})
    if reader.get("use_qk_norm", True, bool):  # Llama4TextL2Norm on the rotary layers, no weight
        fields.update(qk_norm=True, qk_norm_scope=QKNormScope.L2)
    if LayerType.CHUNKED_ATTENTION in types:
        fields["attention_chunk_size"] = chunk
    fields["layer_types"] = types


def _read_qwen_vl_text(reader: _Reader, fields: dict[str, Any]) -> None:
    """The language models of Qwen2-VL (modeling_qwen2_vl.py, Qwen2VLTextModel), Qwen2.5-VL
    (modeling_qwen2_5_vl.py, Qwen2_5_VLTextModel), Qwen3-VL
    (modeling_qwen3_vl.py, Qwen3VLTextModel) and Qwen3-VL-MoE (modeling_qwen3_vl_moe.py,
    Qwen3VLMoeTextModel). Their multimodal rotary embedding (mrope) has no parameters.

    Qwen2-VL and Qwen2.5-VL are Qwen2's block: head_dim is hidden_size // num_attention_heads, q/k/v have biases
    and o_proj none, the MLP none, whatever head_dim, attention_bias or mlp_bias say (the modules
    read none of them); with ``use_sliding_window`` the layers from ``max_window_layers`` on slide.
    Qwen3-VL is Qwen3's block (per-head q/k norms, biases as ``attention_bias``) with no sliding
    windows; Qwen3-VL-MoE adds Qwen3-MoE's experts (no shared expert) on the layers of
    ``decoder_sparse_step``/``mlp_only_layers``."""
    model_type, num_layers = fields["model_type"], fields["num_layers"]
    if model_type in ("qwen2_vl_text", "qwen2_5_vl_text"):
        fields.update(head_dim=None, qkv_bias=True, attn_output_bias=False, mlp_bias=False)
        types = reader.layer_types({"full_attention": LayerType.FULL_ATTENTION,
                                    "sliding_attention": LayerType.SLIDING_ATTENTION}, num_layers)
        start = reader.get("max_window_layers", 80, int)
        window = reader.hf.sliding_window or None
        reader.consumed.update({"sliding_window", "use_sliding_window"})
        if not reader.hf.use_sliding_window or window is None:
            return  # Qwen2_5_VLTextConfig drops sliding_window: every layer attends to all tokens
        if types is None:
            types = [LayerType.SLIDING_ATTENTION if i >= start else LayerType.FULL_ATTENTION for i in range(num_layers)]
        if LayerType.SLIDING_ATTENTION in types:
            fields.update(sliding_window=window, layer_types=types)
        return
    reader.get("use_qk_norm")  # Qwen3-VL attention always normalises q and k per head
    reader.consumed.update({"sliding_window", "use_sliding_window"})  # its attention takes no window
    if model_type == "qwen3_vl_moe_text":
        _moe_fields(reader, fields, layers=_sparse_moe_layers(reader, num_layers))


def _read_deepseek(reader: _Reader, fields: dict[str, Any]) -> None:
    """DeepSeek-V2/V3 and Kimi K2 as transformers builds them: MLA attention; every layer from
    ``first_k_dense_replace`` on is MoE, with ``n_shared_experts`` shared experts run as one MLP
    of ``n_shared_experts x moe_intermediate_size`` (``DeepseekV3MoE.shared_experts``)."""
    hf, notes = reader.hf, reader.notes
    model_type = fields["model_type"]
    defaults = _DEEPSEEK_DEFAULTS[model_type]
    given = hf.model_fields_set
    keys = {"num_experts": "n_routed_experts", "num_shared_experts": "n_shared_experts",
            "first_dense_layers": "first_k_dense_replace"}
    reader.consumed.update({"kv_lora_rank", "q_lora_rank", "n_routed_experts", "n_shared_experts",
                            "first_k_dense_replace", "moe_intermediate_size", "moe_layer_freq", "num_experts_per_tok",
                            "num_nextn_predict_layers"})

    def value(name: str) -> Any:
        if name in given:
            return getattr(hf, name)
        notes.append(f"{keys.get(name, name)} absent: {model_type} defaults to {defaults[name]}")
        return defaults[name]

    if reader.data.get("num_nextn_predict_layers"):
        notes.append(f"num_nextn_predict_layers {reader.data['num_nextn_predict_layers']}: the multi-token "
                     "prediction layers are not counted, as transformers does not build them")
    mla = {name: value(name) for name in ("kv_lora_rank", "q_lora_rank", "qk_rope_head_dim", "qk_nope_head_dim",
                                           "v_head_dim")}
    fields["mla"] = mla
    # transformers sets head_dim to the rotary width (used only by its rotary embedding);
    # memcalc's head_dim is the per-head value width, the output projection's input per head.
    fields["head_dim"] = mla["v_head_dim"]
    experts = value("num_experts")
    if experts is None:
        return
    experts_per_token = hf.experts_per_token
    if experts_per_token is None:
        experts_per_token = defaults.get("experts_per_token", 1)
        known = "experts_per_token" in defaults
        notes.append(f"num_experts_per_tok absent: {model_type} "
                     + (f"defaults to {experts_per_token}" if known else "has no default; assuming 1"))
    width = value("moe_intermediate_size")
    shared = value("num_shared_experts") or 0
    if (hf.moe_layer_freq or 1) != 1:
        notes.append(f"moe_layer_freq {hf.moe_layer_freq} is ignored, as transformers does: every layer from "
                     "first_k_dense_replace on is MoE")
    fields["moe"] = dict(
        num_experts=experts,
        experts_per_token=experts_per_token,
        expert_intermediate_size=width,
        num_shared_experts=1 if shared else 0,
        shared_expert_intermediate_size=shared * width if shared else None,
        first_dense_layers=min(value("first_dense_layers") or 0, fields["num_layers"]),
        routing_fp32=True,  # DeepseekV2Moe's and DeepseekV3TopkRouter's fp32 weights, never cast back
    )


def _read_glm4_moe(reader: _Reader, fields: dict[str, Any]) -> None:
    """GLM-4.5 (modeling_glm4_moe.py): biases on q, k and v but not o; optional per-head q/k norms;
    dense layers before ``first_k_dense_replace``, then experts with ``n_shared_experts`` shared
    ones as one MLP. The multi-token-prediction layer is not built by transformers."""
    fields["attn_output_bias"] = False
    fields["qk_norm"] = bool(reader.get("use_qk_norm", False, bool))
    shared = reader.get("n_shared_experts", 1, int)
    width = reader.hf.moe_intermediate_size or 1408
    first = reader.get("first_k_dense_replace", 1, int)
    if reader.data.get("num_nextn_predict_layers"):
        reader.notes.append(f"num_nextn_predict_layers {reader.data['num_nextn_predict_layers']}: the multi-token "
                            "prediction layer is not counted, as transformers does not build it")
    reader.consumed.add("num_nextn_predict_layers")
    _moe_fields(reader, fields, width=width, shared_width=shared * width if shared else None, routing_fp32=True)
    if "moe" in fields:
        fields["moe"]["first_dense_layers"] = min(first, fields["num_layers"])


def _read_jamba(reader: _Reader, fields: dict[str, Any]) -> None:
    """Jamba (modeling_jamba.py): attention on layers ``i % attn_layer_period == attn_layer_offset``,
    Mamba-1 mixers elsewhere (with RMSNorms of dt, B and C); experts on layers ``i %
    expert_layer_period == expert_layer_offset``."""
    num_layers, h = fields["num_layers"], fields["hidden_size"]
    attn_period, attn_offset = reader.positive("attn_layer_period", 8), reader.get("attn_layer_offset", 4, int)
    moe_period, moe_offset = reader.positive("expert_layer_period", 2), reader.get("expert_layer_offset", 1, int)
    fields["layer_types"] = [LayerType.FULL_ATTENTION if i % attn_period == attn_offset else LayerType.MAMBA
                             for i in range(num_layers)]
    expand = reader.positive("mamba_expand", 2)
    dt_rank = reader.get("mamba_dt_rank", "auto", (int, str))
    fields["mamba"] = dict(
        version=MambaVersion.MAMBA1, intermediate_size=expand * h, state_size=reader.positive("mamba_d_state", 16),
        conv_kernel=reader.positive("mamba_d_conv", 4), conv_bias=reader.get("mamba_conv_bias", True, bool),
        proj_bias=reader.get("mamba_proj_bias", False, bool),
        dt_rank=math.ceil(h / 16) if dt_rank == "auto" else dt_rank, inner_norms=True)
    layers = [i for i in range(num_layers) if i % moe_period == moe_offset]
    _moe_fields(reader, fields, layers=layers, width=fields["intermediate_size"])


def _mamba2_fields(reader: _Reader, h: int, *, heads: str, head_dim: str, groups: str, state: str, conv: str,
                   expand: str, conv_bias: str, proj_bias: str, defaults: dict[str, Any]) -> dict[str, Any]:
    return dict(
        version=MambaVersion.MAMBA2, intermediate_size=int(reader.positive(expand, defaults["expand"]) * h),
        state_size=reader.positive(state, defaults["state"]), conv_kernel=reader.positive(conv, defaults["conv"]),
        conv_bias=reader.get(conv_bias, True, bool), proj_bias=reader.get(proj_bias, False, bool),
        num_heads=reader.positive(heads, defaults["heads"]), head_dim=reader.positive(head_dim, defaults["head_dim"]),
        n_groups=reader.positive(groups, defaults["groups"]))


def _read_granite_hybrid(reader: _Reader, fields: dict[str, Any]) -> None:
    """Granite-4.0-H (modeling_granitemoehybrid.py): ``layer_types`` of mamba (Mamba-2) and
    attention layers; every layer has a shared MLP of ``shared_intermediate_size`` and, with
    ``num_local_experts > 0``, experts of ``intermediate_size`` beside it."""
    num_layers, h = fields["num_layers"], fields["hidden_size"]
    # the Hub files say mamba/attention; transformers 5 writes linear_attention/full_attention
    types = reader.layer_types({"mamba": LayerType.MAMBA, "linear_attention": LayerType.MAMBA,
                                "attention": LayerType.FULL_ATTENTION, "full_attention": LayerType.FULL_ATTENTION},
                               num_layers)
    fields["layer_types"] = types or [LayerType.MAMBA] * num_layers
    if LayerType.MAMBA in fields["layer_types"]:
        fields["mamba"] = _mamba2_fields(
            reader, h, heads="mamba_n_heads", head_dim="mamba_d_head", groups="mamba_n_groups", state="mamba_d_state",
            conv="mamba_d_conv", expand="mamba_expand", conv_bias="mamba_conv_bias", proj_bias="mamba_proj_bias",
            defaults=dict(heads=128, head_dim=64, groups=1, state=256, conv=4, expand=2))
        # the SSD chunk, which sizes the training activations (GraniteMoeHybridConfig: 256)
        fields["mamba"]["chunk_size"] = reader.positive("mamba_chunk_size", 256)
    # rope or nope, no parameters either way; GraniteMoeHybridModel builds its rotary embedding only for "rope"
    if reader.get("position_embedding_type", None, str) != "rope":
        fields["position_embedding"] = PositionKind.NONE
    shared = reader.positive("shared_intermediate_size", 1024)
    if reader.hf.num_experts:
        _moe_fields(reader, fields, width=fields["intermediate_size"], shared_width=shared)
    else:
        reader.consumed.update({"num_local_experts", "num_experts_per_tok"})
        fields["intermediate_size"] = shared


def _read_mamba(reader: _Reader, fields: dict[str, Any]) -> None:
    """Mamba and Falcon-Mamba (modeling_mamba.py, modeling_falcon_mamba.py): blocks of a norm and a
    Mamba-1 mixer, no attention and no MLP. Falcon-Mamba's RMSNorms of B, C and dt have no weights."""
    h, num_layers = fields["hidden_size"], fields["num_layers"]
    expand = reader.positive("expand", 2)
    inner = reader.positive("intermediate_size", expand * h)
    dt_rank = reader.get("time_step_rank", "auto", (int, str))
    fields.update(intermediate_size=None, num_attention_heads=1, layer_types=[LayerType.MAMBA] * num_layers)
    fields["mamba"] = dict(
        version=MambaVersion.MAMBA1, intermediate_size=inner, state_size=reader.positive("state_size", 16),
        conv_kernel=reader.positive("conv_kernel", 4), conv_bias=reader.get("use_conv_bias", True, bool),
        proj_bias=reader.get("use_bias", False, bool), dt_rank=math.ceil(h / 16) if dt_rank == "auto" else dt_rank,
        unweighted_inner_norms=fields["model_type"] == "falcon_mamba",
        # the blocks keep their residual stream in fp32 (MambaConfig and FalconMambaConfig: True)
        residual_in_fp32=reader.get("residual_in_fp32", True, bool))


def _read_mamba2(reader: _Reader, fields: dict[str, Any]) -> None:
    """Mamba-2 (modeling_mamba2.py, Mamba-Codestral): blocks of a norm and a Mamba-2 mixer."""
    h, num_layers = fields["hidden_size"], fields["num_layers"]
    fields.update(intermediate_size=None, layer_types=[LayerType.MAMBA] * num_layers)
    fields["mamba"] = _mamba2_fields(
        reader, h, heads="num_heads", head_dim="head_dim", groups="n_groups", state="state_size", conv="conv_kernel",
        expand="expand", conv_bias="use_conv_bias", proj_bias="use_bias",
        defaults=dict(heads=128, head_dim=64, groups=8, state=128, conv=4, expand=2))
    # what sizes the training activations (Mamba2Config: chunk_size 256, residual_in_fp32 True)
    fields["mamba"].update(chunk_size=reader.positive("chunk_size", 256),
                           residual_in_fp32=reader.get("residual_in_fp32", True, bool))
    fields["head_dim"] = None
    fields["num_attention_heads"] = fields["mamba"]["num_heads"]


_NEMOTRON_BLOCKS = {"M": LayerType.MAMBA, "*": LayerType.FULL_ATTENTION, "-": LayerType.NONE, "E": LayerType.NONE}
_NEMOTRON_NAMES = {"mamba": "M", "linear_attention": "M", "attention": "*", "full_attention": "*", "mlp": "-",
                   "moe": "E"}


def _read_nemotron_h(reader: _Reader, fields: dict[str, Any]) -> None:
    """Nemotron-H (modeling_nemotron_h.py): every block is one norm and one of a Mamba-2 mixer (M),
    attention (*), a plain relu2 MLP (-) or experts with a shared expert (E), in the order of
    ``hybrid_override_pattern`` (or ``layers_block_type``)."""
    num_layers = fields["num_layers"]
    pattern = reader.get("hybrid_override_pattern", None, str)
    names = reader.get("layers_block_type", None, list)
    reader.consumed.add("layer_types")
    if pattern is None and names is not None:
        unknown = sorted({str(name) for name in names} - set(_NEMOTRON_NAMES))
        if unknown:
            raise InputError(f"{reader.source}: layers_block_type: block {', '.join(map(repr, unknown))} is not modelled")
        pattern = "".join(_NEMOTRON_NAMES[name] for name in names)
    if pattern is None or len(pattern) != num_layers or set(pattern) - set(_NEMOTRON_BLOCKS):
        raise InputError(f"{reader.source}: hybrid_override_pattern: expected {num_layers} blocks of "
                         f"{''.join(_NEMOTRON_BLOCKS)}, got {pattern!r}")
    fields.update(layer_types=[_NEMOTRON_BLOCKS[block] for block in pattern], separate_blocks=True, mlp=MLPKind.PLAIN,
                  hidden_act=reader.get("mlp_hidden_act", "relu2", str))
    fields["head_dim"] = reader.positive("attention_head_dim") or reader.hf.head_dim
    if "M" in pattern:
        heads, head_dim = reader.positive("mamba_num_heads", 128), reader.positive("mamba_head_dim", 64)
        fields["mamba"] = dict(
            version=MambaVersion.MAMBA2, intermediate_size=heads * head_dim,
            state_size=reader.positive("ssm_state_size", 128), conv_kernel=reader.positive("conv_kernel", 4),
            conv_bias=reader.get("use_conv_bias", True, bool), proj_bias=reader.get("use_bias", False, bool),
            num_heads=heads, head_dim=head_dim, n_groups=reader.positive("n_groups", 8),
            chunk_size=reader.positive("chunk_size", 128))  # the SSD chunk (NemotronHConfig: 128): training only
    reader.consumed.update({"expand", "mamba_proj_bias", "n_shared_experts", "moe_shared_expert_intermediate_size"})
    if "E" in pattern:
        shared = reader.positive("moe_shared_expert_intermediate_size") if reader.get("n_shared_experts", 1, int) else None
        layers = [index for index, block in enumerate(pattern) if block == "E"]
        _moe_fields(reader, fields, layers=layers, shared_width=shared,
                    norm_topk_prob=reader.get("norm_topk_prob", True, bool), routing_fp32=True)
    if reader.get("moe_latent_size"):
        raise InputError(f"{reader.source}: moe_latent_size: latent expert projections are not modelled")


def _read_falcon_h1(reader: _Reader, fields: dict[str, Any]) -> None:
    """Falcon-H1 (modeling_falcon_h1.py): every layer runs attention and a Mamba-2 mixer side by
    side on the normed input, then a gated MLP. The mixer's width is ``mamba_d_ssm`` (else
    ``mamba_expand x hidden``); its gated norm exists only with ``mamba_rms_norm``; ``out_proj``'s
    bias follows ``projectors_bias``. The multipliers scale activations and hold no parameters."""
    num_layers, h = fields["num_layers"], fields["hidden_size"]
    fields["layer_types"] = [LayerType.ATTENTION_MAMBA] * num_layers
    reader.consumed.add("layer_types")
    inner = reader.positive("mamba_d_ssm") or int(reader.positive("mamba_expand", 2) * h)
    heads = reader.positive("mamba_n_heads", 128)
    fields["mamba"] = dict(
        version=MambaVersion.MAMBA2, intermediate_size=inner, state_size=reader.positive("mamba_d_state", 256),
        conv_kernel=reader.positive("mamba_d_conv", 4), conv_bias=reader.get("mamba_conv_bias", True, bool),
        proj_bias=reader.get("mamba_proj_bias", False, bool), num_heads=heads,
        head_dim=reader.positive("mamba_d_head") or inner // heads, n_groups=reader.positive("mamba_n_groups", 1),
        gated_norm=reader.get("mamba_rms_norm", False, bool),
        out_proj_bias=reader.get("projectors_bias", False, bool))
    reader.consumed.add("mamba_expand")


_READERS: dict[str, Callable[[_Reader, dict[str, Any]], None]] = {
    "falcon_h1": _read_falcon_h1,
    "nemotron_h": _read_nemotron_h,
    **{model_type: _read_decoder for model_type in ("llama", "mistral", "mixtral", "phi3", "qwen2", "qwen3", "gemma",
                                                    "gemma2", "gpt2", "olmo2", "olmo3", "smollm3")},
    "qwen2_moe": _read_qwen_moe,
    "qwen3_moe": _read_qwen_moe,
    "qwen3_next": _read_qwen3_next,
    "qwen3_5_text": _read_qwen3_5,
    "qwen3_5_moe_text": _read_qwen3_5,
    "gpt_oss": _read_gpt_oss,
    "gemma3_text": _read_gemma3,
    "llama4_text": _read_llama4,
    "deepseek_v2": _read_deepseek,
    "deepseek_v3": _read_deepseek,
    "kimi_k2": _read_deepseek,
    "glm4_moe": _read_glm4_moe,
    "jamba": _read_jamba,
    "granitemoehybrid": _read_granite_hybrid,
    "mamba": _read_mamba,
    "falcon_mamba": _read_mamba,
    "mamba2": _read_mamba2,
    "qwen2_vl_text": _read_qwen_vl_text,
    "qwen2_5_vl_text": _read_qwen_vl_text,
    "qwen3_vl_text": _read_qwen_vl_text,
    "qwen3_vl_moe_text": _read_qwen_vl_text,
}
KNOWN_MODEL_TYPES = tuple(sorted(set(_READERS) | set(_MULTIMODAL_TEXT_TYPES)))


def _common_fields(reader: _Reader, model_type: str, name: str, source: str) -> dict[str, Any]:
    hf, notes = reader.hf, reader.notes
    fields: dict[str, Any] = {**HF_MODEL_TYPE_DEFAULTS.get(model_type, _LLAMA_STYLE)}
    fields.update(
        name=name, source=source, model_type=model_type, hidden_size=hf.hidden_size, num_layers=hf.num_layers,
        num_attention_heads=hf.num_attention_heads, num_kv_heads=hf.num_kv_heads, head_dim=hf.head_dim,
        vocab_size=hf.vocab_size,
    )
    # GPT-2's n_inner is null, meaning four times the hidden size.
    fields["intermediate_size"] = hf.intermediate_size or 4 * hf.hidden_size
    if hf.intermediate_size is None and fields["mlp"] is not MLPKind.NONE:
        notes.append("intermediate_size absent: assuming 4 x hidden_size")
    if hf.max_position_embeddings is None:
        notes.append(f"max_position_embeddings absent: assuming {DEFAULT_SEQ_LEN}")
    fields["max_position_embeddings"] = hf.max_position_embeddings or DEFAULT_SEQ_LEN
    if hf.tie_word_embeddings is None:
        notes.append(f"tie_word_embeddings absent: {model_type or 'this model type'} defaults to "
                     f"{fields['tie_word_embeddings']}")
    else:
        fields["tie_word_embeddings"] = hf.tie_word_embeddings
    # Gemma's legacy ``hidden_act: gelu`` runs the tanh approximation (modeling_gemma.py).
    if hf.hidden_act and not (model_type.startswith("gemma") and hf.hidden_act == "gelu"):
        fields["hidden_act"] = _ACTIVATION_NAMES.get(hf.hidden_act, hf.hidden_act)
    if hf.layer_norm_epsilon is not None and hf.rms_norm_eps is None and fields["norm"] is NormKind.RMSNORM \
            and model_type not in _RMS_ONLY:
        fields.update(norm=NormKind.LAYERNORM, norm_bias=True)
    if hf.attention_bias is not None:
        fields.update(qkv_bias=hf.attention_bias, attn_output_bias=hf.attention_bias)
    if hf.mlp_bias is not None:
        fields["mlp_bias"] = hf.mlp_bias
    # transformers 5 may nest it in rope_parameters
    rope = reader.data.get("rope_parameters") if isinstance(reader.data.get("rope_parameters"), dict) else {}
    factor = hf.partial_rotary_factor or rope.get("partial_rotary_factor")
    if factor is not None:
        fields["partial_rotary_factor"] = float(factor)
    return fields


def _refuse_unread_keys(reader: _Reader, model_type: str) -> None:
    unread = sorted(key for key in STRUCTURAL_KEYS - reader.consumed
                    if key in reader.data and not _trivial(reader.data[key])
                    and not (key == "decoder_sparse_step" and reader.data[key] == 1))
    if unread:
        raise InputError(f"{reader.source}: {', '.join(unread)} change the structure of a {model_type} model in a way "
                         "memcalc does not model; refusing rather than guessing (--assume-llama ignores them)")


def _qwen_vl_text_type(outer_type: str, text_config: dict[str, Any], source: str) -> str:
    """The text model type a Qwen-VL wrapper builds; a text_config naming another is refused."""
    text_type = _MULTIMODAL_TEXT_TYPES[outer_type]
    given = text_config.get("model_type", text_type)
    if given not in (text_type, outer_type):
        raise InputError(f"{source}: text_config.model_type: {given!r} is not the text model of {outer_type} "
                         f"(its configuration class builds {text_type!r})")
    return text_type


def _qwen_vl_tied(outer_type: str, outer: dict[str, Any], text_config: dict[str, Any]) -> bool:
    """Whether the Qwen-VL head is tied to the embeddings: the wrapper's ``tie_word_embeddings``
    (default False); Qwen2VLConfig and Qwen2_5_VLConfig also tie when text_config says so (their pre-v5 files)."""
    tied = outer.get("tie_word_embeddings")
    if tied is None:
        tied = False
    if outer_type in _QWEN2_VL_WRAPPERS and not tied and text_config.get("tie_word_embeddings") is True:
        tied = True
    return tied


def model_from_hf(data: dict[str, Any], *, name: str, source: str, assume_llama: bool = False) -> ModelConfig:
    """A ``config.json`` mapping as a memcalc model; errors name ``source`` and the key."""
    from pydantic import ValidationError

    from memcalc.errors import describe_validation_error

    outer_type = str(data.get("model_type", ""))
    vision = None
    text_config = data.get("text_config")
    if outer_type in _QWEN_VL_TYPES and text_config is None:
        if outer_type not in _QWEN2_VL_WRAPPERS:
            raise InputError(f"{source}: text_config: a {outer_type} config.json needs it ({outer_type}'s "
                             "configuration class ignores text keys at the top level)")
        text_config = {key: value for key, value in data.items() if key not in ("vision_config", "model_type")}
    if isinstance(text_config, dict):
        # Multimodal configs nest the language model; the vision tower is a part of its own.
        from memcalc.vision import VISION_MODEL_TYPES, vision_tower_from_hf

        try:
            vision = vision_tower_from_hf(outer_type, data)
        except ValueError as exc:
            raise InputError(f"{source}: vision_config: {exc}") from None
        if vision is None and data.get("vision_config") and not assume_llama:
            raise InputError(f"{source}: the vision tower of model_type {outer_type!r} is not modelled "
                             f"(memcalc reads the towers of {', '.join(VISION_MODEL_TYPES)}); --assume-llama "
                             "counts the text model alone")
        text_type = text_config.get("model_type") or _MULTIMODAL_TEXT_TYPES.get(outer_type, outer_type)
        if outer_type in _QWEN_VL_TYPES:
            text_type = _qwen_vl_text_type(outer_type, text_config, source)
        outer, data = data, {**text_config, "model_type": text_type}
        # the wrapper's own tie_word_embeddings decides whether its lm_head is tied (transformers 5
        # ties the ForConditionalGeneration head by the top-level config; measured on the meta device)
        if outer.get("tie_word_embeddings") is not None:
            data["tie_word_embeddings"] = outer["tie_word_embeddings"]
        if outer_type in _QWEN_VL_TYPES:
            data = {**_QWEN_VL_TEXT_DEFAULTS[text_type], **data}
            data["tie_word_embeddings"] = _qwen_vl_tied(outer_type, outer, text_config)
    if data.get("model_type") is not None and not isinstance(data["model_type"], str):
        raise InputError(f"{source}: model_type: expected a string, got {data['model_type']!r}")
    if data.get("model_type") not in _READERS and not assume_llama:  # before its fields: the type is the problem
        raise InputError(f"{source}: model_type {data.get('model_type') or '(missing)'!r} is not modelled by memcalc "
                         f"(known: {', '.join(KNOWN_MODEL_TYPES)}); --assume-llama reads it as a Llama block")
    if data.get("model_type") == "nemotron_h" and "num_hidden_layers" not in data:
        # transformers 5 writes the blocks and derives the layer count from them
        blocks = data.get("hybrid_override_pattern") or data.get("layers_block_type")
        if isinstance(blocks, (str, list)):
            data = {**data, "num_hidden_layers": len(blocks)}
    try:
        hf_config = HFConfig.model_validate(data)
    except ValidationError as exc:
        raise InputError(describe_validation_error(exc, source)) from None
    model_type = hf_config.model_type
    reader = _Reader(data, hf_config, source)
    read = _READERS.get(model_type)
    if read is None:  # only with --assume-llama: the unknown type was refused above otherwise
        reader.notes.append(f"model_type {model_type or '(missing)'!r} is not known: assuming a Llama-style block "
                            "(--assume-llama)")
        read = _read_decoder
    fields = _common_fields(reader, model_type, name, source)
    if fields["num_attention_heads"] is None and model_type not in ("mamba", "falcon_mamba", "mamba2"):
        raise InputError(f"{source}: num_attention_heads: field required")
    read(reader, fields)
    _read_dropout(reader, fields, model_type)
    if not assume_llama:
        _refuse_unread_keys(reader, model_type)
    fields.pop("model_type")
    if vision is not None:
        fields["vision"] = vision
        reader.notes.append("the vision tower and projector are counted in weights, gradients and optimizer states; "
                            "training activations assume text-only batches")
    _checkpoint_format(data, fields, reader.notes, source)
    fields["notes"] = tuple(reader.notes)
    return parse(ModelConfig, fields, source)


# config.json keys of dropout rates (GPT-2, BERT-style, Llama-style, Phi, Falcon, Qwen names)
DROPOUT_KEYS = ("embd_pdrop", "attn_pdrop", "resid_pdrop", "attention_dropout", "hidden_dropout",
                "hidden_dropout_prob", "attention_probs_dropout_prob", "activation_dropout", "ffn_dropout",
                "mlp_dropout", "residual_dropout", "dropout")


# The dropout rates memcalc models, by config.json key: GPT-2's three (GPT2Config defaults each to
# 0.1), and the attention dropout every Llama-style class passes to its attention function.
GPT2_DROPOUT = {"attn_pdrop": "attention_dropout", "embd_pdrop": "embedding_dropout", "resid_pdrop": "residual_dropout"}
GPT2_DEFAULT_DROPOUT = 0.1


def _read_dropout(reader: _Reader, fields: dict[str, Any], model_type: str) -> None:
    """The training dropout rates the class applies; other dropout keys with a rate above 0 are not
    modelled, and a note says so (training activations leave out their masks)."""
    mapped = GPT2_DROPOUT if model_type == "gpt2" else {"attention_dropout": "attention_dropout"}
    for key, field in mapped.items():
        default = GPT2_DEFAULT_DROPOUT if model_type == "gpt2" else 0.0
        rate = reader.get(key, default, (int, float))
        if not 0 <= rate < 1:
            raise InputError(f"{reader.source}: {key}: a dropout rate from 0 up to 1, got {rate!r}")
        fields[field] = float(rate)
        if model_type == "gpt2" and key not in reader.data:
            reader.notes.append(f"{key} absent: GPT2Config's default {GPT2_DEFAULT_DROPOUT}")
    data = reader.data
    rates = {key: value for key in DROPOUT_KEYS if key not in mapped
             if isinstance(value := data.get(key), int | float) and not isinstance(value, bool) and value > 0}
    if rates:
        # train refuses such a model unless --dropout says the rates (memcalc.estimate.training.with_dropout)
        fields["unmodelled_dropout"] = tuple(rates)
        reader.notes.append(f"{', '.join(f'{key} {value:g}' for key, value in rates.items())}: this dropout is not "
                            "modelled: training estimates are refused unless --dropout gives the rates; inference "
                            "is unaffected")


def _checkpoint_format(data: dict[str, Any], fields: dict[str, Any], notes: list[str], source: str) -> None:
    """The checkpoint's dtype (``torch_dtype``/``dtype``) and quantisation (``quantization_config``)."""
    from memcalc.quantization import checkpoint_format

    try:
        checkpoint = checkpoint_format(data, notes)
    except InputError as exc:
        raise InputError(f"{source}: {exc}") from None
    if checkpoint is not None:
        fields["checkpoint"] = checkpoint
