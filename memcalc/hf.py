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
    "deepseek_v2": _LLAMA_STYLE,
    "deepseek_v3": _LLAMA_STYLE,
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


# The MLA and MoE defaults of transformers' DeepseekV2Config / DeepseekV3Config, used for keys a
# config.json leaves out (configuration_deepseek_v2.py, configuration_deepseek_v3.py). A null
# ``q_lora_rank`` in the file means a direct q_proj (DeepSeek-V2-Lite); an absent one, the default.
_DEEPSEEK_DEFAULTS: dict[str, dict[str, Any]] = {
    "deepseek_v2": dict(kv_lora_rank=512, q_lora_rank=1536, qk_rope_head_dim=64, qk_nope_head_dim=128,
                        v_head_dim=128, num_experts=64, num_shared_experts=2, moe_intermediate_size=1407,
                        first_dense_layers=0),
    "deepseek_v3": dict(kv_lora_rank=512, q_lora_rank=1536, qk_rope_head_dim=64, qk_nope_head_dim=128,
                        v_head_dim=128, num_experts=256, num_shared_experts=1, moe_intermediate_size=2048,
                        first_dense_layers=3, experts_per_token=8),
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
    moe_layer_freq: PositiveInt | None = None
    # multi-head latent attention (DeepSeek-V2/V3)
    kv_lora_rank: PositiveInt | None = None
    q_lora_rank: PositiveInt | None = None
    qk_rope_head_dim: PositiveInt | None = None
    qk_nope_head_dim: PositiveInt | None = None
    v_head_dim: PositiveInt | None = None

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
        if self.model_type in _DEEPSEEK_DEFAULTS:
            self._deepseek_fields(fields, notes)
        elif self.num_experts:
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

    def _deepseek_fields(self, fields: dict[str, Any], notes: list[str]) -> None:
        """DeepSeek-V2/V3 as transformers builds them: MLA attention; every layer from
        ``first_k_dense_replace`` on is MoE, with ``n_shared_experts`` shared experts run as one MLP
        of ``n_shared_experts x moe_intermediate_size`` (``DeepseekV3MoE.shared_experts``)."""
        defaults = _DEEPSEEK_DEFAULTS[self.model_type]
        given = self.model_fields_set
        keys = {"num_experts": "n_routed_experts", "num_shared_experts": "n_shared_experts",
                "first_dense_layers": "first_k_dense_replace"}

        def value(name: str) -> Any:
            if name in given:
                return getattr(self, name)
            notes.append(f"{keys.get(name, name)} absent: {self.model_type} defaults to {defaults[name]}")
            return defaults[name]

        mla = {name: value(name) for name in ("kv_lora_rank", "q_lora_rank", "qk_rope_head_dim", "qk_nope_head_dim",
                                               "v_head_dim")}
        fields["mla"] = mla
        # transformers sets head_dim to the rotary width (used only by its rotary embedding);
        # memcalc's head_dim is the per-head value width, the output projection's input per head.
        fields["head_dim"] = mla["v_head_dim"]
        experts = value("num_experts")
        if experts is None:
            return
        experts_per_token = self.experts_per_token
        if experts_per_token is None:
            experts_per_token = defaults.get("experts_per_token", 1)
            known = "experts_per_token" in defaults
            notes.append(f"num_experts_per_tok absent: {self.model_type} "
                         + (f"defaults to {experts_per_token}" if known else "has no default; assuming 1"))
        width = value("moe_intermediate_size")
        shared = value("num_shared_experts") or 0
        if (self.moe_layer_freq or 1) != 1:
            notes.append(f"moe_layer_freq {self.moe_layer_freq} is ignored, as transformers does: every layer from "
                         "first_k_dense_replace on is MoE")
        fields["moe"] = dict(
            num_experts=experts,
            experts_per_token=experts_per_token,
            expert_intermediate_size=width,
            num_shared_experts=1 if shared else 0,
            shared_expert_intermediate_size=shared * width if shared else None,
            first_dense_layers=min(value("first_dense_layers") or 0, self.num_layers),
        )
