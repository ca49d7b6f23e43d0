"""The tensor inventory: every parameter tensor of a model, layer by layer, built once from its config.

Each decoder layer is described by the tensors of its token mixer (attention), its MLP or
mixture of experts and its norms, each with its role: its shape, how tensor parallelism splits it,
whether a matmul reads it (autocast keeps a 16-bit copy) and whether weight formats and FP8
recipes store it their own way (a linear layer's weight). The parameter count
(``memcalc.estimate.params``), weight formats (``memcalc.estimate.weights``), TP/EP/pipeline
sharding (``memcalc.parallel``) and the activation model's per-layer weights all read this one
inventory instead of enumerating the architecture again.

Layers of one structure share one ``LayerTensors`` object, so a 61-layer model with 256 experts
per layer costs a handful of objects. Shapes follow PyTorch (``nn.Linear.weight`` is
``(out_features, in_features)``) and the tensors of the reference implementations (Hugging Face
``modeling_*.py``), so the total equals ``sum(p.numel() for p in model.parameters())``.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum
from functools import lru_cache
from math import prod

from memcalc.config import (
    LayerType,
    MambaVersion,
    MLPKind,
    ModelConfig,
    NormKind,
    NormPlacement,
    PositionKind,
    QKNormScope,
)


class ParamCategory(StrEnum):
    EMBEDDING = "embedding"
    ATTENTION = "attention"
    MIXER = "mixer"  # Mamba and gated-delta-net mixers: the token mixers that are not attention
    MLP = "mlp"
    EXPERTS = "experts"
    ROUTER = "router"
    NORMS = "norms"
    OUTPUT_HEAD = "output_head"
    VISION_TOWER = "vision_tower"  # a multimodal checkpoint's image encoder
    PROJECTOR = "projector"  # its image-to-text projector


class Split(StrEnum):
    """How tensor parallelism divides a tensor (Megatron-LM's column- and row-parallel linears)."""

    NONE = "none"  # replicated on every TP rank (norms, routers, latent down-projections)
    COLUMN = "column"  # the output dimension: weight and bias
    ROW = "row"  # the input dimension: the weight (its bias is added after the all-reduce, whole)
    VOCAB = "vocab"  # the vocabulary rows of the embedding and the output head


class MLPRole(StrEnum):
    """What a decoder layer's feed-forward part is."""

    DENSE = "dense"
    MOE = "moe"
    NONE = "none"  # no feed-forward part (Mamba-2 blocks)


@dataclass(frozen=True)
class Tensor:
    """``count`` parameter tensors of one name and ``shape`` (routed experts: one per expert), of
    which ``active`` serve one token."""

    name: str  # the aggregate name shared by every layer's copy, e.g. "layers.attn.q_proj.weight"
    category: ParamCategory
    shape: tuple[int, ...]
    count: int = 1
    active: int | None = None  # default: all ``count``
    split: Split = Split.NONE
    matmul: bool = False  # a matmul reads it as its weight (autocast casts it once per forward)
    linear: bool = False  # a linear layer's weight: quantised by weight formats, FP8 recipes' own bytes
    expert: bool = False  # a routed expert's: divided by expert parallelism

    @property
    def numel(self) -> int:
        return prod(self.shape)

    @property
    def active_count(self) -> int:
        return self.count if self.active is None else self.active

    @property
    def d_in(self) -> int:
        return self.shape[-1]

    @property
    def d_out(self) -> int:
        return self.shape[0]


@dataclass(frozen=True)
class LayerTensors:
    """One decoder layer's parameters in the order ``parameters()`` visits them."""

    mlp: MLPRole
    tensors: tuple[Tensor, ...]
    mixer: LayerType = LayerType.FULL_ATTENTION

    def matmul_elements(self) -> int:
        """Elements of the weights the layer's matmuls read (one copy of each expert)."""
        return sum(tensor.numel * tensor.count for tensor in self.tensors if tensor.matmul)


@dataclass(frozen=True)
class Inventory:
    """Every parameter of a model: the embeddings, each decoder layer, the final norm and head."""

    embeddings: tuple[Tensor, ...]
    layers: tuple[LayerTensors, ...]
    final: tuple[Tensor, ...]
    vision: tuple[Tensor, ...] = ()  # a multimodal checkpoint's vision tower and projector

    def tensors_in_order(self, layer_indices=None, *, first: bool = True, last: bool = True):
        """Each tensor as ``parameters()`` visits it: a vision tower and projector (multimodal
        checkpoints) and the embeddings (``first``), the layers (``layer_indices`` only, when
        given), then the final norm and head (``last``): a pipeline stage's share."""
        if first:
            yield from self.vision
            yield from self.embeddings
        layers = self.layers if layer_indices is None else (self.layers[index] for index in layer_indices)
        for layer in layers:
            yield from layer.tensors
        if last:
            yield from self.final


# --- Building blocks ------------------------------------------------------------------------------


def _linear(name: str, category: ParamCategory, d_in: int, d_out: int, bias: bool, split: Split = Split.NONE,
            *, linear: bool = True, count: int = 1, active: int | None = None, expert: bool = False):
    """``nn.Linear(d_in, d_out)``: its weight and, with ``bias``, its bias (split with the output
    under column parallelism, whole under row parallelism)."""
    yield Tensor(f"{name}.weight", category, (d_out, d_in), count, active, split, True, linear, expert)
    if bias:
        bias_split = Split.COLUMN if split is Split.COLUMN else Split.NONE
        yield Tensor(f"{name}.bias", category, (d_out,), count, active, bias_split, expert=expert)


def _norm(name: str, model: ModelConfig, width: int, count: int = 1):
    yield Tensor(f"{name}.weight", ParamCategory.NORMS, (width,), count)
    if model.norm is NormKind.LAYERNORM and model.norm_bias:
        yield Tensor(f"{name}.bias", ParamCategory.NORMS, (width,), count)


def _mlp(prefix: str, category: ParamCategory, model: ModelConfig, width: int, count: int = 1,
         active: int | None = None, expert: bool = False, bias: bool | None = None):
    h = model.hidden_size
    bias = model.mlp_bias if bias is None else bias
    if model.mlp is MLPKind.GATED:
        yield from _linear(f"{prefix}.gate_proj", category, h, width, bias, Split.COLUMN, count=count, active=active,
                           expert=expert)
    yield from _linear(f"{prefix}.up_proj", category, h, width, bias, Split.COLUMN, count=count, active=active,
                       expert=expert)
    yield from _linear(f"{prefix}.down_proj", category, width, h, bias, Split.ROW, count=count, active=active,
                       expert=expert)


def _attention(model: ModelConfig):
    """q, k, v and o projections (Llama, GPT-2's fused ``c_attn`` holds the same elements)."""
    h, attention = model.hidden_size, ParamCategory.ATTENTION
    q_width = model.num_attention_heads * model.attention_head_dim
    kv_width = model.kv_heads * model.attention_head_dim
    # a gated attention's q_proj gives each head's queries and its output gate (Qwen3NextAttention)
    q_out = 2 * q_width if model.attn_output_gate else q_width
    yield from _linear("layers.attn.q_proj", attention, h, q_out, model.qkv_bias, Split.COLUMN)
    yield from _linear("layers.attn.k_proj", attention, h, kv_width, model.qkv_bias, Split.COLUMN)
    yield from _linear("layers.attn.v_proj", attention, h, kv_width, model.qkv_bias, Split.COLUMN)
    yield from _linear("layers.attn.o_proj", attention, q_width, h, model.attn_output_bias, Split.ROW)


def _mla_attention(model: ModelConfig):
    """Multi-head latent attention as transformers' ``DeepseekV2Attention``/``DeepseekV3Attention``:
    queries straight from the hidden state (``q_proj``) or through a normalised low-rank bottleneck
    (``q_a_proj``, ``q_a_layernorm``, ``q_b_proj``); keys and values from one latent of
    ``kv_lora_rank`` values plus the shared rotary key (``kv_a_proj_with_mqa``), normalised
    (``kv_a_layernorm``) and expanded to every head (``kv_b_proj``). ``attention_bias`` puts biases
    on the two down projections and ``o_proj`` only (``qkv_bias``/``attn_output_bias`` here). The
    down projections and their norms are replicated under TP; the up projections split by head."""
    mla, h, heads = model.mla, model.hidden_size, model.num_attention_heads
    attention = ParamCategory.ATTENTION
    if mla.q_lora_rank is None:
        yield from _linear("layers.attn.q_proj", attention, h, heads * mla.qk_head_dim, False, Split.COLUMN)
    else:
        yield from _linear("layers.attn.q_a_proj", attention, h, mla.q_lora_rank, model.qkv_bias)
        yield from _norm("layers.attn.q_a_layernorm", model, mla.q_lora_rank)
        yield from _linear("layers.attn.q_b_proj", attention, mla.q_lora_rank, heads * mla.qk_head_dim, False,
                           Split.COLUMN)
    yield from _linear("layers.attn.kv_a_proj_with_mqa", attention, h, mla.latent_width, model.qkv_bias)
    yield from _norm("layers.attn.kv_a_layernorm", model, mla.kv_lora_rank)
    yield from _linear("layers.attn.kv_b_proj", attention, mla.kv_lora_rank,
                       heads * (mla.qk_nope_head_dim + mla.v_head_dim), False, Split.COLUMN)
    yield from _linear("layers.attn.o_proj", attention, heads * mla.v_head_dim, h, model.attn_output_bias, Split.ROW)


def _moe(model: ModelConfig):
    """A mixture-of-experts MLP: the router, the routed experts (``experts_per_token`` of them
    active), the shared experts and the shared experts' sigmoid gate (Qwen2-MoE). gpt-oss puts
    biases on the router and on every expert projection (``GptOssExperts.gate_up_proj_bias``)."""
    moe, h = model.moe, model.hidden_size
    yield from _linear("layers.moe.router", ParamCategory.ROUTER, h, moe.num_experts, moe.router_bias, linear=False)
    yield from _mlp("layers.moe.experts", ParamCategory.EXPERTS, model, moe.expert_intermediate_size,
                    moe.num_experts, moe.experts_per_token, expert=True, bias=moe.expert_bias or model.mlp_bias)
    if moe.num_shared_experts:
        width = moe.shared_expert_intermediate_size or moe.expert_intermediate_size
        yield from _mlp("layers.moe.shared_experts", ParamCategory.EXPERTS, model, width, moe.num_shared_experts)
    if moe.shared_expert_gate:
        yield from _linear("layers.moe.shared_expert_gate", ParamCategory.ROUTER, h, 1, False, linear=False)


def _qk_norms(model: ModelConfig):
    """Query and key norms: per head (Qwen3, Gemma 3: two head_dim vectors) or over all query heads
    and all key heads at once (OLMo 2's q_norm and k_norm of the projection widths)."""
    if not model.qk_norm or model.qk_norm_scope is QKNormScope.L2:  # Llama 4's L2 norm has no weight
        return
    if model.qk_norm_scope is QKNormScope.FULL:
        head_dim = model.attention_head_dim
        yield from _norm("layers.attn.q_norm", model, model.num_attention_heads * head_dim)
        yield from _norm("layers.attn.k_norm", model, model.kv_heads * head_dim)
    else:
        yield from _norm("layers.attn.qk_norm", model, model.attention_head_dim, 2)


def _attention_mixer(model: ModelConfig):
    yield from _attention(model) if model.mla is None else _mla_attention(model)
    yield from _qk_norms(model)
    if model.attention_sinks:  # one learned logit per head (GptOssAttention.sinks)
        yield Tensor("layers.attn.sinks", ParamCategory.ATTENTION, (model.num_attention_heads,), split=Split.COLUMN)


def _gated_delta_net(model: ModelConfig):
    """Qwen3-Next's linear attention (transformers' ``Qwen3NextGatedDeltaNet``; Qwen3.5's splits the two
    input projections in four, ``split_projections``): ``in_proj_qkvz``
    (queries, keys, values and the output gate z), ``in_proj_ba`` (beta and the decay input a, one
    per value head), a depthwise causal ``conv1d`` over q, k and v without bias, per-head
    ``dt_bias`` and ``A_log``, the gated RMSNorm of a value head, and ``out_proj``."""
    la, h, mixer = model.linear_attention, model.hidden_size, ParamCategory.MIXER
    if la.split_projections:  # Qwen3.5's Qwen3_5GatedDeltaNet
        yield from _linear("layers.linear_attn.in_proj_qkv", mixer, h, 2 * la.key_width + la.value_width, False,
                           Split.COLUMN)
        yield from _linear("layers.linear_attn.in_proj_z", mixer, h, la.value_width, False, Split.COLUMN)
        yield from _linear("layers.linear_attn.in_proj_b", mixer, h, la.num_value_heads, False, Split.COLUMN)
        yield from _linear("layers.linear_attn.in_proj_a", mixer, h, la.num_value_heads, False, Split.COLUMN)
    else:
        yield from _linear("layers.linear_attn.in_proj_qkvz", mixer, h, 2 * la.key_width + 2 * la.value_width,
                           False, Split.COLUMN)
        yield from _linear("layers.linear_attn.in_proj_ba", mixer, h, 2 * la.num_value_heads, False, Split.COLUMN)
    yield Tensor("layers.linear_attn.conv1d.weight", mixer, (la.conv_channels, 1, la.conv_kernel), split=Split.COLUMN)
    yield Tensor("layers.linear_attn.dt_bias", mixer, (la.num_value_heads,), split=Split.COLUMN)
    yield Tensor("layers.linear_attn.A_log", mixer, (la.num_value_heads,), split=Split.COLUMN)
    yield Tensor("layers.linear_attn.norm.weight", ParamCategory.NORMS, (la.value_head_dim,))
    yield from _linear("layers.linear_attn.out_proj", mixer, la.value_width, h, False, Split.ROW)


def _mamba(model: ModelConfig):
    """A Mamba mixer. Mamba-1 (``MambaMixer``, ``JambaMambaMixer``): ``in_proj`` to x and the gate
    z, a depthwise ``conv1d``, ``x_proj`` to dt (low rank) and B, C, ``dt_proj``, ``A_log`` of
    channels x d_state, ``D``, ``out_proj``; Jamba adds RMSNorms of dt, B and C. Mamba-2
    (``Mamba2Mixer``, ``GraniteMoeHybridMambaLayer``): one ``in_proj`` to z, x, B, C and dt, a
    ``conv1d`` over x, B and C, per-head ``dt_bias``, ``A_log`` and ``D``, the gated RMSNorm of the
    channels, ``out_proj``."""
    m, h, mixer = model.mamba, model.hidden_size, ParamCategory.MIXER
    inner = m.intermediate_size
    if m.version is MambaVersion.MAMBA1:
        yield from _linear("layers.mamba.in_proj", mixer, h, 2 * inner, m.proj_bias, Split.COLUMN)
        yield Tensor("layers.mamba.conv1d.weight", mixer, (inner, 1, m.conv_kernel), split=Split.COLUMN)
        if m.conv_bias:
            yield Tensor("layers.mamba.conv1d.bias", mixer, (inner,), split=Split.COLUMN)
        yield from _linear("layers.mamba.x_proj", mixer, inner, m.dt_rank + 2 * m.state_size, False, Split.ROW)
        yield from _linear("layers.mamba.dt_proj", mixer, m.dt_rank, inner, True, Split.COLUMN)
        yield Tensor("layers.mamba.A_log", mixer, (inner, m.state_size), split=Split.COLUMN)
        yield Tensor("layers.mamba.D", mixer, (inner,), split=Split.COLUMN)
        yield from _linear("layers.mamba.out_proj", mixer, inner, h, m.proj_bias, Split.ROW)
        if m.inner_norms:
            yield from _norm("layers.mamba.dt_layernorm", model, m.dt_rank)
            yield from _norm("layers.mamba.bc_layernorm", model, m.state_size, 2)
        return
    heads = m.num_heads
    yield from _linear("layers.mamba.in_proj", mixer, h, inner + m.conv_channels + heads, m.proj_bias, Split.COLUMN)
    yield Tensor("layers.mamba.conv1d.weight", mixer, (m.conv_channels, 1, m.conv_kernel), split=Split.COLUMN)
    if m.conv_bias:
        yield Tensor("layers.mamba.conv1d.bias", mixer, (m.conv_channels,), split=Split.COLUMN)
    yield Tensor("layers.mamba.dt_bias", mixer, (heads,), split=Split.COLUMN)
    yield Tensor("layers.mamba.A_log", mixer, (heads,), split=Split.COLUMN)
    yield Tensor("layers.mamba.D", mixer, (heads,), split=Split.COLUMN)
    if m.gated_norm:
        yield Tensor("layers.mamba.norm.weight", ParamCategory.NORMS, (inner,), split=Split.COLUMN)
    out_bias = m.proj_bias if m.out_proj_bias is None else m.out_proj_bias
    yield from _linear("layers.mamba.out_proj", mixer, inner, h, out_bias, Split.ROW)


def _mixer(model: ModelConfig, kind: LayerType):
    if kind is LayerType.NONE:
        return iter(())
    if kind is LayerType.LINEAR_ATTENTION:
        return _gated_delta_net(model)
    if kind is LayerType.MAMBA:
        return _mamba(model)
    if kind is LayerType.ATTENTION_MAMBA:  # both mixers read the same normed input (FalconH1DecoderLayer)
        return (*_attention_mixer(model), *_mamba(model))
    return _attention_mixer(model)


def _layer(model: ModelConfig, role: MLPRole, kind: LayerType = LayerType.FULL_ATTENTION) -> LayerTensors:
    """A decoder layer in the reference decoder's order. Pre-norm: the input norm, the mixer (with
    its query and key norms), the remaining norms (post-attention; Gemma-2/3's four), then the MLP
    or the experts. Post-norm (OLMo 2): the mixer and its output norm, the MLP and its output
    norm. A layer without an MLP (Mamba-2 blocks) or without a mixer (Nemotron-H's MLP blocks):
    its norm and the one part it has."""
    h = model.hidden_size
    mixer = list(_mixer(model, kind))
    if role is MLPRole.NONE:
        return LayerTensors(role, (*_norm("layers.norm", model, h), *mixer), kind)
    feed_forward = list(_moe(model) if role is MLPRole.MOE else
                        _mlp("layers.mlp", ParamCategory.MLP, model, model.intermediate_size))
    if model.separate_blocks:  # an MLP block: its norm and its MLP or experts
        return LayerTensors(role, (*_norm("layers.norm", model, h), *feed_forward), kind)
    if model.norm_placement is NormPlacement.POST:
        tensors = [*mixer, *_norm("layers.norm", model, h), *feed_forward, *_norm("layers.norm", model, h)]
        return LayerTensors(role, tuple(tensors), kind)
    tensors = [*_norm("layers.norm", model, h), *mixer]
    if model.norms_per_layer > 1:
        tensors += _norm("layers.norm", model, h, model.norms_per_layer - 1)
    return LayerTensors(role, tuple(tensors + feed_forward), kind)


def layer_roles(model: ModelConfig) -> tuple[MLPRole, ...]:
    """Each layer's feed-forward role: experts on ``model.moe_layer_indices``, no MLP in a model
    of Mamba-2 blocks, else a dense MLP."""
    if model.mlp is MLPKind.NONE and model.moe is None:
        return (MLPRole.NONE,) * model.num_layers
    moe = set(model.moe_layer_indices)
    roles = tuple(MLPRole.MOE if index in moe else MLPRole.DENSE for index in range(model.num_layers))
    if model.separate_blocks:  # a mixer block has no MLP
        roles = tuple(role if kind is LayerType.NONE else MLPRole.NONE
                      for role, kind in zip(roles, model.resolved_layer_types, strict=True))
    return roles


@lru_cache(maxsize=256)
def build_inventory(model: ModelConfig) -> Inventory:
    """Every parameter tensor of ``model``, layer by layer.

    Buffers are not parameters: DeepSeek-V3's router ``e_score_correction_bias`` (one value per
    routed expert and MoE layer) is a buffer in transformers (``register_buffer`` in
    ``DeepseekV3TopkRouter``) and is not counted, nor are the rotary ``inv_freq`` tables."""
    h = model.hidden_size
    embeddings = [Tensor("embed_tokens.weight", ParamCategory.EMBEDDING, (model.vocab_size, h), split=Split.VOCAB)]
    if model.position_embedding is PositionKind.LEARNED:
        # Megatron keeps the position table whole on every TP rank
        embeddings.append(Tensor("embed_positions.weight", ParamCategory.EMBEDDING, (model.max_position_embeddings, h)))
    keys = tuple(zip(layer_roles(model), model.resolved_layer_types, strict=True))
    kinds = {key: _layer(model, key[0], key[1]) for key in set(keys)}
    layers = tuple(kinds[key] for key in keys)
    final = list(_norm("final_norm", model, h))
    if not model.tie_word_embeddings:
        final.append(Tensor("lm_head.weight", ParamCategory.OUTPUT_HEAD, (model.vocab_size, h), split=Split.VOCAB,
                            matmul=True))
    return Inventory(tuple(embeddings), layers, tuple(final), _vision_tensors(model))


def _vision_tensors(model: ModelConfig) -> tuple[Tensor, ...]:
    """The vision tower and projector (``memcalc.vision``) as tensors of their own parts."""
    if model.vision is None:
        return ()
    from memcalc.vision import vision_tower_groups, projector_groups

    groups = (*vision_tower_groups(model.vision), *projector_groups(model.vision))
    return tuple(Tensor(group.name, ParamCategory(group.part), (group.numel,), group.count) for group in groups)
