"""Validated inputs: the decoder architecture schema, Hugging Face ``config.json`` import,
and the settings of each estimate. Everything that enters memcalc passes through here."""

from __future__ import annotations

from enum import StrEnum
from typing import Annotated, Any, Literal

from pydantic import AliasChoices, BaseModel, ConfigDict, Field, model_validator

from memcalc.dtypes import DType

# Sequence length used when none is given; capped by the model's maximum positions.
DEFAULT_SEQ_LEN = 2048
DEFAULT_BATCH_SIZE = 1

# Plain Field constraints rather than pydantic.types.PositiveInt: same validation and messages,
# without importing pydantic.types and annotated_types on every start-up.
PositiveInt = Annotated[int, Field(gt=0)]
NonNegativeInt = Annotated[int, Field(ge=0)]


class MLPKind(StrEnum):
    GATED = "gated"  # SwiGLU / GeGLU: gate, up and down projections
    PLAIN = "plain"  # up projection, activation, down projection (GPT-2, GPT-3)


class NormKind(StrEnum):
    RMSNORM = "rmsnorm"
    LAYERNORM = "layernorm"


class PositionKind(StrEnum):
    ROTARY = "rotary"  # no parameters
    LEARNED = "learned"  # a max_positions x hidden table (GPT-2, GPT-3)


class MoEConfig(BaseModel):
    """Mixture-of-experts MLP. Expert MLPs share ``ModelConfig.mlp`` (gated or plain)."""

    model_config = ConfigDict(extra="forbid", frozen=True, defer_build=True)

    num_experts: PositiveInt = Field(description="routed experts per MoE layer")
    experts_per_token: PositiveInt = Field(description="routed experts each token visits (top-k)")
    expert_intermediate_size: PositiveInt = Field(description="hidden width of one routed expert")
    num_shared_experts: NonNegativeInt = Field(0, description="experts every token visits")
    shared_expert_intermediate_size: PositiveInt | None = Field(
        None, description="width of one shared expert; defaults to the routed expert width"
    )
    first_dense_layers: NonNegativeInt = Field(
        0, description="leading layers with a dense MLP (intermediate_size) instead of experts"
    )
    shared_expert_gate: bool = Field(False, description="a hidden_size -> 1 sigmoid gate on the shared experts (Qwen2-MoE)")

    @model_validator(mode="after")
    def _top_k_within_experts(self) -> MoEConfig:
        if self.experts_per_token > self.num_experts:
            raise ValueError(
                f"experts_per_token ({self.experts_per_token}) exceeds num_experts ({self.num_experts})"
            )
        return self


class ModelConfig(BaseModel):
    """A decoder-only transformer, described by the sizes that determine its memory.

    Field names follow Hugging Face where one exists; all sizes are element counts.
    """

    model_config = ConfigDict(extra="forbid", frozen=True, defer_build=True)

    name: str
    aliases: tuple[str, ...] = ()
    source: str = Field("", description="where the numbers come from (config.json URL, paper)")
    notes: tuple[str, ...] = Field((), description="assumptions made while reading the config")

    hidden_size: PositiveInt
    num_layers: PositiveInt
    num_attention_heads: PositiveInt
    num_kv_heads: PositiveInt | None = Field(None, description="key/value heads (GQA/MQA); default: attention heads")
    head_dim: PositiveInt | None = Field(None, description="default: hidden_size / num_attention_heads")
    intermediate_size: PositiveInt = Field(description="MLP hidden width of a dense layer")
    vocab_size: PositiveInt
    max_position_embeddings: PositiveInt
    tie_word_embeddings: bool

    mlp: MLPKind = MLPKind.GATED
    hidden_act: str = "silu"
    norm: NormKind = NormKind.RMSNORM
    norm_bias: bool = Field(False, description="LayerNorm with a bias vector")
    norms_per_layer: PositiveInt = Field(2, description="2 for pre-norm blocks, 4 for Gemma-2 sandwich norms")
    qk_norm: bool = Field(False, description="RMSNorm of head_dim on each query and key head (Qwen3)")
    qkv_bias: bool = False
    attn_output_bias: bool = False
    mlp_bias: bool = False
    position_embedding: PositionKind = PositionKind.ROTARY
    sliding_window: PositiveInt | None = None
    moe: MoEConfig | None = None

    @model_validator(mode="after")
    def _consistent_heads(self) -> ModelConfig:
        if self.num_attention_heads % self.kv_heads:
            raise ValueError(
                f"num_kv_heads ({self.kv_heads}) must divide num_attention_heads ({self.num_attention_heads})"
            )
        if self.head_dim is None and self.hidden_size % self.num_attention_heads:
            raise ValueError(
                f"num_attention_heads ({self.num_attention_heads}) must divide hidden_size "
                f"({self.hidden_size}) unless head_dim is given"
            )
        if self.moe is not None and self.moe.first_dense_layers > self.num_layers:
            raise ValueError(
                f"moe.first_dense_layers ({self.moe.first_dense_layers}) exceeds num_layers ({self.num_layers})"
            )
        return self

    @property
    def kv_heads(self) -> int:
        return self.num_kv_heads or self.num_attention_heads

    @property
    def attention_head_dim(self) -> int:
        return self.head_dim or self.hidden_size // self.num_attention_heads

    @property
    def num_moe_layers(self) -> int:
        return 0 if self.moe is None else self.num_layers - self.moe.first_dense_layers


# --- Hugging Face config.json ------------------------------------------------------------------

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

    model_config = ConfigDict(extra="ignore", frozen=True, defer_build=True)

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
            fields["moe"] = MoEConfig(
                num_experts=self.num_experts,
                experts_per_token=self.experts_per_token or 1,
                expert_intermediate_size=self.moe_intermediate_size or fields["intermediate_size"],
                num_shared_experts=self.num_shared_experts or (1 if self.shared_expert_intermediate_size else 0),
                shared_expert_intermediate_size=self.shared_expert_intermediate_size,
                first_dense_layers=self.first_dense_layers or 0,
                shared_expert_gate=self.model_type == "qwen2_moe",
            )
        fields["notes"] = tuple(notes)
        return ModelConfig(**fields)


# --- Settings of an estimate ---------------------------------------------------------------------


class Optimizer(StrEnum):
    ADAMW = "adamw"
    ADAM = "adam"
    ADAM8BIT = "adam8bit"
    SGD = "sgd"
    SGD_MOMENTUM = "sgd-momentum"


class Recompute(StrEnum):
    NONE = "none"
    SELECTIVE = "selective"
    FULL = "full"


class _Settings(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, defer_build=True)


class TrainSettings(_Settings):
    """What one training step holds. ``seq_len=None`` means the default, capped by the model."""

    dtype: Literal["fp32", "fp16", "bf16"] = "bf16"
    master_weights: bool = Field(True, description="16-bit only: keep an fp32 master copy (mixed precision)")
    optimizer: Optimizer = Optimizer.ADAMW
    batch_size: PositiveInt = DEFAULT_BATCH_SIZE
    seq_len: PositiveInt | None = None
    recompute: Recompute = Recompute.NONE


class InferSettings(_Settings):
    """What inference holds for ``batch_size`` sequences of ``context_len`` tokens each."""

    dtype: Literal["fp32", "fp16", "bf16", "fp8", "int8", "int4"] = "bf16"
    kv_dtype: Literal["fp32", "fp16", "bf16", "fp8", "int8"] | None = Field(
        None, description="default: the weight dtype when it is a float type, else bf16"
    )
    batch_size: PositiveInt = DEFAULT_BATCH_SIZE
    context_len: PositiveInt | None = None


def resolve_seq_len(model: ModelConfig, seq_len: int | None) -> int:
    return seq_len if seq_len is not None else min(DEFAULT_SEQ_LEN, model.max_position_embeddings)


def weight_dtype(settings: InferSettings | TrainSettings) -> DType:
    return DType(settings.dtype)
