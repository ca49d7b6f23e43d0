"""Exact parameter counts from the architecture, tensor by tensor.

The inventory mirrors the tensors of the reference implementations (Hugging Face
``modeling_*.py``; fused projections such as Phi-3's ``qkv_proj`` hold the same elements as
separate ones), so ``total`` equals ``sum(p.numel() for p in model.parameters())``.
Per-tensor sizes matter beyond the total: 8-bit optimizers keep small tensors in fp32.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum

from memcalc.config import MLPKind, ModelConfig, NormKind, PositionKind


class ParamCategory(StrEnum):
    EMBEDDING = "embedding"
    ATTENTION = "attention"
    MLP = "mlp"
    EXPERTS = "experts"
    ROUTER = "router"
    NORMS = "norms"
    OUTPUT_HEAD = "output_head"


@dataclass(frozen=True)
class TensorGroup:
    """``count`` tensors of ``numel`` elements each, of which ``active_count`` serve one token."""

    name: str
    category: ParamCategory
    numel: int
    count: int
    active_count: int

    @property
    def total(self) -> int:
        return self.numel * self.count

    @property
    def active(self) -> int:
        return self.numel * self.active_count


@dataclass(frozen=True)
class ParamInventory:
    groups: tuple[TensorGroup, ...]

    @property
    def total(self) -> int:
        return sum(group.total for group in self.groups)

    @property
    def active(self) -> int:
        """Parameters one token passes through (MoE: only its top-k experts)."""
        return sum(group.active for group in self.groups)

    def by_category(self) -> dict[ParamCategory, int]:
        totals: dict[ParamCategory, int] = {}
        for group in self.groups:
            totals[group.category] = totals.get(group.category, 0) + group.total
        return totals


def _linear(name: str, category: ParamCategory, d_in: int, d_out: int, bias: bool, count: int, active: int | None = None):
    active = count if active is None else active
    yield TensorGroup(f"{name}.weight", category, d_in * d_out, count, active)
    if bias:
        yield TensorGroup(f"{name}.bias", category, d_out, count, active)


def _norm(name: str, model: ModelConfig, width: int, count: int):
    yield TensorGroup(f"{name}.weight", ParamCategory.NORMS, width, count, count)
    if model.norm is NormKind.LAYERNORM and model.norm_bias:
        yield TensorGroup(f"{name}.bias", ParamCategory.NORMS, width, count, count)


def _mlp(prefix: str, category: ParamCategory, model: ModelConfig, width: int, count: int, active: int):
    h, bias = model.hidden_size, model.mlp_bias
    if model.mlp is MLPKind.GATED:
        yield from _linear(f"{prefix}.gate_proj", category, h, width, bias, count, active)
    yield from _linear(f"{prefix}.up_proj", category, h, width, bias, count, active)
    yield from _linear(f"{prefix}.down_proj", category, width, h, bias, count, active)


def _mla_attention(model: ModelConfig, num_layers: int):
    """Multi-head latent attention as transformers' ``DeepseekV2Attention``/``DeepseekV3Attention``:
    queries straight from the hidden state (``q_proj``) or through a normalised low-rank bottleneck
    (``q_a_proj``, ``q_a_layernorm``, ``q_b_proj``); keys and values from one latent of
    ``kv_lora_rank`` values plus the shared rotary key (``kv_a_proj_with_mqa``), normalised
    (``kv_a_layernorm``) and expanded to every head (``kv_b_proj``). ``attention_bias`` puts biases
    on the two down projections and ``o_proj`` only (``qkv_bias``/``attn_output_bias`` here)."""
    mla, h, heads = model.mla, model.hidden_size, model.num_attention_heads
    attention = ParamCategory.ATTENTION
    if mla.q_lora_rank is None:
        yield from _linear("layers.attn.q_proj", attention, h, heads * mla.qk_head_dim, False, num_layers)
    else:
        yield from _linear("layers.attn.q_a_proj", attention, h, mla.q_lora_rank, model.qkv_bias, num_layers)
        yield from _norm("layers.attn.q_a_layernorm", model, mla.q_lora_rank, num_layers)
        yield from _linear("layers.attn.q_b_proj", attention, mla.q_lora_rank, heads * mla.qk_head_dim, False,
                           num_layers)
    yield from _linear("layers.attn.kv_a_proj_with_mqa", attention, h, mla.latent_width, model.qkv_bias, num_layers)
    yield from _norm("layers.attn.kv_a_layernorm", model, mla.kv_lora_rank, num_layers)
    yield from _linear("layers.attn.kv_b_proj", attention, mla.kv_lora_rank,
                       heads * (mla.qk_nope_head_dim + mla.v_head_dim), False, num_layers)
    yield from _linear("layers.attn.o_proj", attention, heads * mla.v_head_dim, h, model.attn_output_bias, num_layers)


def count_params(model: ModelConfig) -> ParamInventory:
    """Every parameter tensor of ``model``, grouped by shape and role.

    Buffers are not parameters: DeepSeek-V3's router ``e_score_correction_bias`` (one value per
    routed expert and MoE layer) is a buffer in transformers (``register_buffer`` in
    ``DeepseekV3TopkRouter``) and is not counted, nor are the rotary ``inv_freq`` tables."""
    h, num_layers = model.hidden_size, model.num_layers
    q_width = model.num_attention_heads * model.attention_head_dim
    kv_width = model.kv_heads * model.attention_head_dim
    attention = ParamCategory.ATTENTION
    groups: list[TensorGroup] = [TensorGroup("embed_tokens.weight", ParamCategory.EMBEDDING, model.vocab_size * h, 1, 1)]
    if model.position_embedding is PositionKind.LEARNED:
        groups.append(TensorGroup("embed_positions.weight", ParamCategory.EMBEDDING, model.max_position_embeddings * h, 1, 1))

    groups += _norm("layers.norm", model, h, model.norms_per_layer * num_layers)
    if model.mla is not None:
        groups += _mla_attention(model, num_layers)
    else:
        groups += _linear("layers.attn.q_proj", attention, h, q_width, model.qkv_bias, num_layers)
        groups += _linear("layers.attn.k_proj", attention, h, kv_width, model.qkv_bias, num_layers)
        groups += _linear("layers.attn.v_proj", attention, h, kv_width, model.qkv_bias, num_layers)
        groups += _linear("layers.attn.o_proj", attention, q_width, h, model.attn_output_bias, num_layers)
    if model.qk_norm:
        groups += _norm("layers.attn.qk_norm", model, model.attention_head_dim, 2 * num_layers)

    moe = model.moe
    dense_layers = num_layers - model.num_moe_layers
    if dense_layers:
        groups += _mlp("layers.mlp", ParamCategory.MLP, model, model.intermediate_size, dense_layers, dense_layers)
    if moe is not None and model.num_moe_layers:
        moe_layers = model.num_moe_layers
        groups += _linear("layers.moe.router", ParamCategory.ROUTER, h, moe.num_experts, False, moe_layers)
        groups += _mlp(
            "layers.moe.experts",
            ParamCategory.EXPERTS,
            model,
            moe.expert_intermediate_size,
            moe.num_experts * moe_layers,
            moe.experts_per_token * moe_layers,
        )
        if moe.num_shared_experts:
            shared = moe.num_shared_experts * moe_layers
            width = moe.shared_expert_intermediate_size or moe.expert_intermediate_size
            groups += _mlp("layers.moe.shared_experts", ParamCategory.EXPERTS, model, width, shared, shared)
        if moe.shared_expert_gate:
            groups += _linear("layers.moe.shared_expert_gate", ParamCategory.ROUTER, h, 1, False, moe_layers)

    groups += _norm("final_norm", model, h, 1)
    if not model.tie_word_embeddings:
        groups.append(TensorGroup("lm_head.weight", ParamCategory.OUTPUT_HEAD, model.vocab_size * h, 1, 1))
    return ParamInventory(tuple(groups))


def parameter_sizes_in_order(model: ModelConfig) -> list[int]:
    """Element counts of the parameters in the reference decoder's ``parameters()`` order
    (embedding first, then each layer's norm, attention, norm, MLP, then the final norm and the
    output head; multi-head latent attention in transformers' order: q_proj or q_a_proj,
    q_a_layernorm, q_b_proj, then kv_a_proj_with_mqa, kv_a_layernorm, kv_b_proj, o_proj).
    Per-tensor loops (a master-weight gradient conversion, a for-loop optimizer) visit tensors in
    this order; Hugging Face's Llama registers a layer's norms after its MLP,
    which moves the peak by a few hidden-size vectors at most."""
    h, norm_bias = model.hidden_size, model.norm is NormKind.LAYERNORM and model.norm_bias
    q_width = model.num_attention_heads * model.attention_head_dim
    kv_width = model.kv_heads * model.attention_head_dim

    def linear(d_in: int, d_out: int, bias: bool) -> list[int]:
        return [d_in * d_out] + ([d_out] if bias else [])

    def norm(width: int) -> list[int]:
        return [width] + ([width] if norm_bias else [])

    def mlp(width: int) -> list[int]:
        gate = linear(h, width, model.mlp_bias) if model.mlp is MLPKind.GATED else []
        return gate + linear(h, width, model.mlp_bias) + linear(width, h, model.mlp_bias)

    def attention() -> list[int]:
        mla, heads = model.mla, model.num_attention_heads
        if mla is None:
            return (linear(h, q_width, model.qkv_bias) + linear(h, kv_width, model.qkv_bias) * 2
                    + linear(q_width, h, model.attn_output_bias))
        if mla.q_lora_rank is None:
            query = linear(h, heads * mla.qk_head_dim, False)
        else:
            query = (linear(h, mla.q_lora_rank, model.qkv_bias) + norm(mla.q_lora_rank)
                     + linear(mla.q_lora_rank, heads * mla.qk_head_dim, False))
        return (query + linear(h, mla.latent_width, model.qkv_bias) + norm(mla.kv_lora_rank)
                + linear(mla.kv_lora_rank, heads * (mla.qk_nope_head_dim + mla.v_head_dim), False)
                + linear(heads * mla.v_head_dim, h, model.attn_output_bias))

    sizes = [model.vocab_size * h]
    if model.position_embedding is PositionKind.LEARNED:
        sizes.append(model.max_position_embeddings * h)
    for index in range(model.num_layers):
        sizes += norm(h)
        sizes += attention()
        if model.qk_norm:
            sizes += norm(model.attention_head_dim) * 2
        sizes += norm(h) * (model.norms_per_layer - 1)
        moe = model.moe
        if moe is None or index < moe.first_dense_layers:
            sizes += mlp(model.intermediate_size)
            continue
        sizes += linear(h, moe.num_experts, False)
        sizes += mlp(moe.expert_intermediate_size) * moe.num_experts
        sizes += mlp(moe.shared_expert_intermediate_size or moe.expert_intermediate_size) * moe.num_shared_experts
        if moe.shared_expert_gate:
            sizes += linear(h, 1, False)
    sizes += norm(h)
    if not model.tie_word_embeddings:
        sizes.append(model.vocab_size * h)
    return sizes
