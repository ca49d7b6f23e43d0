"""Schemas of the token mixers beside multi-head attention: multi-head latent attention, Mamba
and the gated delta net. Most models have none, so ``memcalc.config`` imports this module only
when a model names one (``model_from_trusted``, ``parse``): each dataclass costs start-up time.
"""

from __future__ import annotations

from dataclasses import dataclass

from memcalc.bounds import PositiveInt
from memcalc.config import _FORBID_EXTRA, MambaVersion, _coerce_enums
from memcalc.dtypes import DType


@dataclass(frozen=True, kw_only=True)
class MLAConfig:
    """Multi-head latent attention (DeepSeek-V2, arXiv:2405.04434, sec. 2.1): keys and values are
    projected from one compressed latent of ``kv_lora_rank`` values per token plus a shared
    rotary key of ``qk_rope_head_dim``; that latent is what a serving engine caches."""

    __pydantic_config__ = _FORBID_EXTRA

    kv_lora_rank: PositiveInt  # compressed KV latent per token (512)
    qk_rope_head_dim: PositiveInt  # rotary part of each query/key head, shared key (64)
    qk_nope_head_dim: PositiveInt  # non-rotary part of each query/key head (128)
    v_head_dim: PositiveInt  # value head width (128)
    q_lora_rank: PositiveInt | None = None  # compressed query (DeepSeek-V3: 1536); None: direct q_proj

    @property
    def qk_head_dim(self) -> int:
        return self.qk_nope_head_dim + self.qk_rope_head_dim

    @property
    def latent_width(self) -> int:
        """Values cached per token and layer by an engine that stores the latent (vLLM)."""
        return self.kv_lora_rank + self.qk_rope_head_dim


@dataclass(frozen=True, kw_only=True)
class MambaConfig:
    """A Mamba mixer (transformers' ``MambaMixer``/``JambaMambaMixer`` or ``Mamba2Mixer``/
    ``GraniteMoeHybridMambaLayer``). Its inference state is a causal-conv window and an SSM state
    per sequence, whatever the sequence length."""

    __pydantic_config__ = _FORBID_EXTRA

    version: MambaVersion
    intermediate_size: PositiveInt  # channels of the mixer (expand x hidden_size)
    state_size: PositiveInt  # SSM state per channel (mamba1) or per head dimension (mamba2): d_state
    conv_kernel: PositiveInt  # causal depthwise convolution width (d_conv)
    conv_bias: bool = True
    proj_bias: bool = False  # in_proj and out_proj biases
    dt_rank: PositiveInt | None = None  # mamba1: the low-rank dt projection's width
    inner_norms: bool = False  # mamba1: Jamba's RMSNorms of dt, B and C
    # mamba1: Falcon-Mamba's RMSNorms of dt, B and C without weights (no parameters; their outputs
    # replace x_proj's in the forward)
    unweighted_inner_norms: bool = False
    num_heads: PositiveInt | None = None  # mamba2: SSD heads
    head_dim: PositiveInt | None = None  # mamba2: channels per head (intermediate_size / num_heads)
    n_groups: PositiveInt = 1  # mamba2: groups sharing B and C
    gated_norm: bool = True  # mamba2: the gated RMSNorm of the channels (Falcon-H1's mamba_rms_norm can drop it)
    out_proj_bias: bool | None = None  # out_proj's bias when it differs from in_proj's (Falcon-H1's projectors_bias)
    # mamba2, training activations: the SSD kernel's chunk length (config ``chunk_size`` /
    # ``mamba_chunk_size``; None: the family's default, Nemotron-H's 128 with separate_blocks, else
    # 256) and whether the block keeps its residual stream in fp32 (transformers' Mamba2Block with
    # ``residual_in_fp32``; None: the class's behaviour, True for a model of Mamba-2 blocks alone,
    # False for the hybrids, whose blocks have no such option; the hf engine's Mamba-1 stacks read it too)
    chunk_size: PositiveInt | None = None
    residual_in_fp32: bool | None = None

    def __post_init__(self) -> None:
        _coerce_enums(self, version=MambaVersion)
        if self.version is MambaVersion.MAMBA1 and self.dt_rank is None:
            raise ValueError("mamba1 needs dt_rank")
        if self.version is MambaVersion.MAMBA2:
            if self.num_heads is None:
                raise ValueError("mamba2 needs num_heads")
            if self.intermediate_size % self.num_heads:
                raise ValueError(f"mamba num_heads ({self.num_heads}) must divide intermediate_size "
                                 f"({self.intermediate_size})")

    @property
    def conv_channels(self) -> int:
        """Channels of the causal convolution: x (mamba1); x, B and C (mamba2)."""
        if self.version is MambaVersion.MAMBA1:
            return self.intermediate_size
        return self.intermediate_size + 2 * self.n_groups * self.state_size

    @property
    def ssm_state_values(self) -> int:
        """Values of the SSM state per sequence and layer: channels x d_state."""
        return self.intermediate_size * self.state_size


@dataclass(frozen=True, kw_only=True)
class LinearAttentionConfig:
    """Gated delta net (Yang et al. 2024, arXiv:2412.06464) as Qwen3-Next runs it
    (transformers' ``Qwen3NextGatedDeltaNet``): q/k/v/z and b/a projections, a causal conv over
    q, k and v, and a recurrent state of key_head_dim x value_head_dim per value head."""

    __pydantic_config__ = _FORBID_EXTRA

    num_key_heads: PositiveInt
    num_value_heads: PositiveInt
    key_head_dim: PositiveInt
    value_head_dim: PositiveInt
    conv_kernel: PositiveInt
    # Qwen3.5 (Qwen3_5GatedDeltaNet): in_proj_qkv, in_proj_z, in_proj_b and in_proj_a in place of
    # Qwen3-Next's in_proj_qkvz and in_proj_ba (the same parameters, other tensors and activations)
    split_projections: bool = False
    # the checkpoint's mamba_ssm_dtype (Qwen3.5: float32), which vLLM takes as the recurrent state's
    # dtype (its Qwen3.5 model config sets mamba_ssm_cache_dtype from it); None: the cache dtype
    state_dtype: DType | None = None

    def __post_init__(self) -> None:
        _coerce_enums(self, state_dtype=DType)
        if self.num_value_heads % self.num_key_heads:
            raise ValueError(f"linear_attention num_key_heads ({self.num_key_heads}) must divide num_value_heads "
                             f"({self.num_value_heads})")

    @property
    def key_width(self) -> int:
        return self.num_key_heads * self.key_head_dim

    @property
    def value_width(self) -> int:
        return self.num_value_heads * self.value_head_dim

    @property
    def conv_channels(self) -> int:
        return 2 * self.key_width + self.value_width

    @property
    def recurrent_state_values(self) -> int:
        return self.num_value_heads * self.key_head_dim * self.value_head_dim
