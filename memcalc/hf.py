"""Hugging Face ``config.json`` import: key aliases and per-``model_type`` defaults.

Imported only when a config.json is read, so pydantic's model machinery stays off the hot path.
"""

from __future__ import annotations

from typing import Any

from pydantic import AliasChoices, BaseModel, ConfigDict, Field

from memcalc.config import (
    DEFAULT_SEQ_LEN,
    MLPKind,
    ModelConfig,
    NonNegativeInt,
    NormKind,
    PositionKind,
    PositiveInt,
    parse,
)

# What each model_type implies when config.json is silent. ``tie_word_embeddings`` follows each
# transformers configuration class's own default (PretrainedConfig defaults to True; Llama,
# Mistral, Mixtral, Qwen2 and Phi-3 override it to False).
_LLAMA_STYLE: dict[str, Any] = dict(
    mlp=MLPKind.GATED, norm=NormKind.RMSNORM, position_embedding=PositionKind.ROTARY, tie_word_embeddings=False
)
HF_MODEL_TYPE_DEFAULTS: dict[str, dict[str, Any]] = {
    "llama": _LLAMA_STYLE,
    "mistral": _LLAMA_STYLE,
    "mixtral": _LLAMA_STYLE,
    "phi3": _LLAMA_STYLE,
    "qwen2": {**_LLAMA_STYLE, "qkv_bias": True},
    "qwen2_moe": {**_LLAMA_STYLE, "qkv_bias": True},
    "qwen3": {**_LLAMA_STYLE, "qk_norm": True},
    "qwen3_moe": {**_LLAMA_STYLE, "qk_norm": True},
    "gemma": {**_LLAMA_STYLE, "tie_word_embeddings": True, "hidden_act": "gelu_tanh"},
    "gemma2": {**_LLAMA_STYLE, "tie_word_embeddings": True, "hidden_act": "gelu_tanh", "norms_per_layer": 4},
    "gpt2": dict(
        mlp=MLPKind.PLAIN,
        hidden_act="gelu_tanh",
        norm=NormKind.LAYERNORM,
        norm_bias=True,
        qkv_bias=True,
        attn_output_bias=True,
        mlp_bias=True,
        position_embedding=PositionKind.LEARNED,
        tie_word_embeddings=True,
    ),
}


# transformers' ACT2FN names for the same function.
_ACTIVATION_NAMES = {
    "gelu_new": "gelu_tanh",
    "gelu_pytorch_tanh": "gelu_tanh",
    "gelu_fast": "gelu_tanh",
    "swish": "silu",
}


class HFConfig(BaseModel):
    """The subset of a Hugging Face ``config.json`` memcalc reads; other keys are ignored."""

    model_config = ConfigDict(extra="ignore", frozen=True)

    model_type: str = ""
    hidden_size: PositiveInt = Field(validation_alias=AliasChoices("hidden_size", "n_embd", "d_model"))
    num_layers: PositiveInt = Field(validation_alias=AliasChoices("num_hidden_layers", "n_layer", "num_layers"))
    num_attention_heads: PositiveInt = Field(validation_alias=AliasChoices("num_attention_heads", "n_head"))
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
    sliding_window: PositiveInt | None = None
    use_sliding_window: bool | None = None
    num_experts: PositiveInt | None = Field(
        None, validation_alias=AliasChoices("num_local_experts", "n_routed_experts", "num_experts")
    )
    experts_per_token: PositiveInt | None = Field(None, validation_alias="num_experts_per_tok")
    moe_intermediate_size: PositiveInt | None = None
    num_shared_experts: NonNegativeInt | None = Field(None, validation_alias="n_shared_experts")
    shared_expert_intermediate_size: PositiveInt | None = None
    first_dense_layers: NonNegativeInt | None = Field(None, validation_alias="first_k_dense_replace")

    def to_model_config(self, name: str, source: str) -> ModelConfig:
        defaults = HF_MODEL_TYPE_DEFAULTS.get(self.model_type)
        notes: list[str] = []
        if defaults is None:
            defaults = _LLAMA_STYLE
            notes.append(f"model_type {self.model_type or '(missing)'!r} is not known: assuming a Llama-style block")
        fields: dict[str, Any] = {**defaults}
        fields.update(
            name=name,
            source=source,
            hidden_size=self.hidden_size,
            num_layers=self.num_layers,
            num_attention_heads=self.num_attention_heads,
            num_kv_heads=self.num_kv_heads,
            head_dim=self.head_dim,
            vocab_size=self.vocab_size,
        )
        # GPT-2's n_inner is null, meaning four times the hidden size.
        fields["intermediate_size"] = self.intermediate_size or 4 * self.hidden_size
        if self.intermediate_size is None:
            notes.append("intermediate_size absent: assuming 4 x hidden_size")
        if self.max_position_embeddings is None:
            notes.append(f"max_position_embeddings absent: assuming {DEFAULT_SEQ_LEN}")
        fields["max_position_embeddings"] = self.max_position_embeddings or DEFAULT_SEQ_LEN
        if self.tie_word_embeddings is None:
            notes.append(
                f"tie_word_embeddings absent: {self.model_type or 'this model type'} defaults to "
                f"{fields['tie_word_embeddings']}"
            )
        else:
            fields["tie_word_embeddings"] = self.tie_word_embeddings
        # Gemma's legacy ``hidden_act: gelu`` runs the tanh approximation (modeling_gemma.py).
        if self.hidden_act and not (self.model_type.startswith("gemma") and self.hidden_act == "gelu"):
            fields["hidden_act"] = _ACTIVATION_NAMES.get(self.hidden_act, self.hidden_act)
        if self.layer_norm_epsilon is not None and self.rms_norm_eps is None and fields["norm"] is NormKind.RMSNORM:
            fields.update(norm=NormKind.LAYERNORM, norm_bias=True)
        if self.attention_bias is not None:
            fields.update(qkv_bias=self.attention_bias, attn_output_bias=self.attention_bias)
        if self.mlp_bias is not None:
            fields["mlp_bias"] = self.mlp_bias
        if self.sliding_window is not None and self.use_sliding_window is not False:
            fields["sliding_window"] = self.sliding_window
        if self.num_experts:
            fields["moe"] = dict(
                num_experts=self.num_experts,
                experts_per_token=self.experts_per_token or 1,
                expert_intermediate_size=self.moe_intermediate_size or fields["intermediate_size"],
                num_shared_experts=self.num_shared_experts or (1 if self.shared_expert_intermediate_size else 0),
                shared_expert_intermediate_size=self.shared_expert_intermediate_size,
                first_dense_layers=self.first_dense_layers or 0,
                shared_expert_gate=self.model_type == "qwen2_moe",
            )
        fields["notes"] = tuple(notes)
        return parse(ModelConfig, fields, source)
