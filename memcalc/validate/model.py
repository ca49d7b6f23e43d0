"""A compact reference decoder in plain PyTorch, built from any ``ModelConfig``.

The blocks follow the Hugging Face implementations people train (``modeling_llama.py``,
``modeling_gpt2.py``, ``modeling_mixtral.py``): pre-norm residual blocks, RMSNorm computed in
fp32, rotary embeddings applied to queries and keys, key/value heads repeated for grouped-query
attention, gated (SwiGLU/GeGLU) or plain GELU MLPs, top-k routed experts, and a causal-LM loss
on fp32 logits. Parameter names and shapes match ``memcalc.estimate.params.count_params``
tensor for tensor, so ``sum(p.numel())`` equals the estimator's count.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from memcalc.config import MLPKind, ModelConfig, NormKind, PositionKind

ROPE_THETA = 10_000.0


def activation_function(name: str):
    if name == "silu":
        return F.silu
    if name == "gelu_tanh":
        return lambda x: F.gelu(x, approximate="tanh")
    if name == "gelu":
        return F.gelu
    if name == "relu":
        return F.relu
    raise ValueError(f"unsupported hidden_act {name!r}")


class RMSNorm(nn.Module):
    """As ``LlamaRMSNorm``: normalise in fp32, cast back, scale."""

    def __init__(self, width: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(width))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        input_dtype = x.dtype
        x = x.to(torch.float32)
        variance = x.pow(2).mean(-1, keepdim=True)
        x = x * torch.rsqrt(variance + self.eps)
        return self.weight * x.to(input_dtype)


def make_norm(model: ModelConfig, width: int) -> nn.Module:
    if model.norm is NormKind.LAYERNORM:
        return nn.LayerNorm(width, eps=1e-5, bias=model.norm_bias)
    return RMSNorm(width)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    first, second = x.chunk(2, dim=-1)
    return torch.cat((-second, first), dim=-1)


def eager_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Causal attention with materialised scores, as Hugging Face's ``eager_attention_forward``
    (grouped K/V heads repeated to the query heads first, ``repeat_kv``)."""
    groups = q.shape[1] // k.shape[1]
    if groups > 1:
        k = k.repeat_interleave(groups, dim=1)
        v = v.repeat_interleave(groups, dim=1)
    seq = q.shape[-2]
    scores = torch.matmul(q, k.transpose(2, 3)) / math.sqrt(q.shape[-1])
    mask = torch.full((seq, seq), float("-inf"), device=q.device, dtype=scores.dtype).triu(1)
    probs = F.softmax(scores + mask, dim=-1, dtype=torch.float32).to(q.dtype)
    return torch.matmul(probs, v)


class Attention(nn.Module):
    def __init__(self, model: ModelConfig, attention: str, recompute: str = "none"):
        super().__init__()
        h, d = model.hidden_size, model.attention_head_dim
        self.num_heads, self.num_kv_heads, self.head_dim = model.num_attention_heads, model.kv_heads, d
        self.q_proj = nn.Linear(h, self.num_heads * d, bias=model.qkv_bias)
        self.k_proj = nn.Linear(h, self.num_kv_heads * d, bias=model.qkv_bias)
        self.v_proj = nn.Linear(h, self.num_kv_heads * d, bias=model.qkv_bias)
        self.o_proj = nn.Linear(self.num_heads * d, h, bias=model.attn_output_bias)
        if model.qk_norm:
            self.q_norm = make_norm(model, d)
            self.k_norm = make_norm(model, d)
        self.qk_norm = model.qk_norm
        self.rotary = model.position_embedding is PositionKind.ROTARY
        self.attention = attention
        # Selective recompute (Korthikanti et al. 2022 sec. 5): the score computation is redone in
        # backward; only eager attention stores scores, so only it has anything to drop.
        self.recompute_scores = recompute == "selective" and attention == "eager"

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor] | None, cache=None,
                layer_index: int = 0) -> torch.Tensor:
        """``cache`` is a list of per-layer (keys, values) grown by concatenation (Hugging Face's
        DynamicCache) when given; keys are cached after the rotary embedding, before repeat_kv."""
        batch, seq, _ = x.shape
        q = self.q_proj(x).view(batch, seq, self.num_heads, self.head_dim)
        k = self.k_proj(x).view(batch, seq, self.num_kv_heads, self.head_dim)
        v = self.v_proj(x).view(batch, seq, self.num_kv_heads, self.head_dim)
        if self.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        if self.rotary and rope is not None:
            cos, sin = rope
            q = q * cos + rotate_half(q) * sin
            k = k * cos + rotate_half(k) * sin
        if cache is not None:
            if cache[layer_index] is not None:
                past_k, past_v = cache[layer_index]
                k, v = torch.cat((past_k, k), dim=-2), torch.cat((past_v, v), dim=-2)
            cache[layer_index] = (k, v)
        groups = self.num_heads // self.num_kv_heads
        if self.attention != "eager":
            # SDPA reads grouped K/V heads directly (enable_gqa, as transformers' sdpa_attention_forward
            # on PyTorch >= 2.5); a single new token attends to the whole cache without a mask.
            out = F.scaled_dot_product_attention(q, k, v, is_causal=seq > 1, enable_gqa=groups > 1)
        elif self.recompute_scores and torch.is_grad_enabled():
            out = checkpoint(eager_attention, q, k, v, use_reentrant=False)
        else:
            out = eager_attention(q, k, v)
        out = out.transpose(1, 2).reshape(batch, seq, self.num_heads * self.head_dim)
        return self.o_proj(out)


class MLP(nn.Module):
    def __init__(self, model: ModelConfig, width: int):
        super().__init__()
        h = model.hidden_size
        self.gated = model.mlp is MLPKind.GATED
        if self.gated:
            self.gate_proj = nn.Linear(h, width, bias=model.mlp_bias)
        self.up_proj = nn.Linear(h, width, bias=model.mlp_bias)
        self.down_proj = nn.Linear(width, h, bias=model.mlp_bias)
        self.act = activation_function(model.hidden_act)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.gated:
            return self.down_proj(self.act(self.gate_proj(x)) * self.up_proj(x))
        return self.down_proj(self.act(self.up_proj(x)))


class MoE(nn.Module):
    """Top-k routing as ``MixtralSparseMoeBlock``: softmax router, top-k, renormalised weights,
    each expert run on the tokens routed to it."""

    def __init__(self, model: ModelConfig):
        super().__init__()
        moe = model.moe
        self.top_k = moe.experts_per_token
        self.router = nn.Linear(model.hidden_size, moe.num_experts, bias=False)
        self.experts = nn.ModuleList(MLP(model, moe.expert_intermediate_size) for _ in range(moe.num_experts))
        width = moe.shared_expert_intermediate_size or moe.expert_intermediate_size
        self.shared_experts = nn.ModuleList(MLP(model, width) for _ in range(moe.num_shared_experts))
        self.shared_expert_gate = nn.Linear(model.hidden_size, 1, bias=False) if moe.shared_expert_gate else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, seq, hidden = x.shape
        tokens = x.reshape(-1, hidden)
        router_logits = self.router(tokens)
        weights = F.softmax(router_logits, dim=-1, dtype=torch.float32)
        weights, _ = torch.topk(weights, self.top_k, dim=-1)
        weights = (weights / weights.sum(dim=-1, keepdim=True)).to(x.dtype)
        out = torch.zeros_like(tokens)
        # Routing is balanced by construction (assignment i goes to expert i mod E): the real
        # choice depends on the data, the estimator assumes k/E of the tokens per expert, and
        # index sets derived from ``arange`` keep static shapes under fake tensors.
        num_experts, num_assignments = len(self.experts), tokens.shape[0] * self.top_k
        for expert_index, expert in enumerate(self.experts):
            if expert_index >= num_assignments:  # fewer routed tokens than experts (decoding)
                break
            assignment = torch.arange(expert_index, num_assignments, num_experts, device=x.device)
            token_index, slot = assignment // self.top_k, assignment % self.top_k
            expert_out = expert(tokens[token_index]) * weights[token_index, slot, None]
            out.index_add_(0, token_index, expert_out)
        for shared in self.shared_experts:
            shared_out = shared(tokens)
            if self.shared_expert_gate is not None:
                shared_out = torch.sigmoid(self.shared_expert_gate(tokens)) * shared_out
            out = out + shared_out
        return out.view(batch, seq, hidden)


class Block(nn.Module):
    def __init__(self, model: ModelConfig, layer_index: int, attention: str, recompute: str = "none"):
        super().__init__()
        self.input_norm = make_norm(model, model.hidden_size)
        self.attn = Attention(model, attention, recompute)
        self.post_attention_norm = make_norm(model, model.hidden_size)
        self.extra_norms = nn.ModuleList(make_norm(model, model.hidden_size) for _ in range(model.norms_per_layer - 2))
        uses_experts = model.moe is not None and layer_index >= model.moe.first_dense_layers
        self.mlp = MoE(model) if uses_experts else MLP(model, model.intermediate_size)

    def forward(self, x: torch.Tensor, rope, cache=None, layer_index: int = 0) -> torch.Tensor:
        attn_out = self.attn(self.input_norm(x), rope, cache, layer_index)
        if len(self.extra_norms) == 2:  # Gemma-2 sandwich norms
            attn_out = self.extra_norms[0](attn_out)
        x = x + attn_out
        mlp_out = self.mlp(self.post_attention_norm(x))
        if len(self.extra_norms) == 2:
            mlp_out = self.extra_norms[1](mlp_out)
        return x + mlp_out


class Decoder(nn.Module):
    """Decoder-only LM. ``recompute="full"`` checkpoints every block (non-reentrant)."""

    def __init__(self, model: ModelConfig, attention: str = "sdpa", recompute: str = "none"):
        super().__init__()
        self.config = model
        self.embed_tokens = nn.Embedding(model.vocab_size, model.hidden_size)
        if model.position_embedding is PositionKind.LEARNED:
            self.embed_positions = nn.Embedding(model.max_position_embeddings, model.hidden_size)
        self.layers = nn.ModuleList(Block(model, index, attention, recompute) for index in range(model.num_layers))
        self.final_norm = make_norm(model, model.hidden_size)
        self.lm_head = None if model.tie_word_embeddings else nn.Linear(model.hidden_size, model.vocab_size, bias=False)
        self.recompute = recompute
        head_dim = model.attention_head_dim
        self.register_buffer(
            "inv_freq", 1.0 / ROPE_THETA ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim),
            persistent=False,
        )

    def rope(self, seq: int, dtype: torch.dtype, device) -> tuple[torch.Tensor, torch.Tensor] | None:
        if self.config.position_embedding is not PositionKind.ROTARY:
            return None
        positions = torch.arange(seq, device=device, dtype=torch.float32)
        freqs = torch.outer(positions, self.inv_freq)
        angles = torch.cat((freqs, freqs), dim=-1)
        return angles.cos().to(dtype), angles.sin().to(dtype)

    def output_weight(self) -> torch.Tensor:
        return self.embed_tokens.weight if self.lm_head is None else self.lm_head.weight

    def hidden_states(self, input_ids: torch.Tensor) -> torch.Tensor:
        seq = input_ids.shape[1]
        x = self.embed_tokens(input_ids)
        if self.config.position_embedding is PositionKind.LEARNED:
            x = x + self.embed_positions(torch.arange(seq, device=input_ids.device))
        rope = self.rope(seq, x.dtype, x.device)
        for layer in self.layers:
            if self.recompute == "full" and torch.is_grad_enabled():
                x = checkpoint(layer, x, rope, use_reentrant=False)
            else:
                x = layer(x, rope)
        return self.final_norm(x)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Logits in the model's dtype."""
        return F.linear(self.hidden_states(input_ids), self.output_weight())

    def forward_with_cache(self, input_ids: torch.Tensor, cache: list, position: int) -> torch.Tensor:
        """One generation step: ``input_ids`` are the new tokens at ``position``; logits for the last
        position only (transformers' generate passes ``logits_to_keep=1``)."""
        seq = input_ids.shape[1]
        x = self.embed_tokens(input_ids)
        if self.config.position_embedding is PositionKind.LEARNED:
            x = x + self.embed_positions(torch.arange(position, position + seq, device=input_ids.device))
        rope = self.rope(position + seq, x.dtype, x.device)
        if rope is not None:
            rope = (rope[0][position:], rope[1][position:])
        for index, layer in enumerate(self.layers):
            x = layer(x, rope, cache, index)
        return F.linear(self.final_norm(x[:, -1:, :]), self.output_weight())


def causal_lm_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """As transformers' ``ForCausalLMLoss``: upcast the logits to fp32, then cross-entropy."""
    return F.cross_entropy(logits.float().view(-1, logits.shape[-1]), labels.view(-1))


# Tokens per chunk of the chunked loss (Liger-Kernel's fused linear cross-entropy and torchtune's
# chunked loss work on slices of the tokens; 1024 keeps one slice's logits small).
from memcalc.estimate.training import LOSS_CHUNK_TOKENS  # noqa: E402  (one source for both)


def _chunk_loss_sum(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    logits = F.linear(hidden, weight).float()
    return F.cross_entropy(logits, labels, reduction="sum")


def chunked_causal_lm_loss(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """The same loss without materialising all logits: each slice of tokens computes its logits and
    loss under activation checkpointing, so only one slice's logits exist at a time."""
    hidden = hidden.reshape(-1, hidden.shape[-1])
    labels = labels.reshape(-1)
    total = hidden.new_zeros((), dtype=torch.float32)
    for start in range(0, hidden.shape[0], LOSS_CHUNK_TOKENS):
        stop = start + LOSS_CHUNK_TOKENS
        total = total + checkpoint(_chunk_loss_sum, hidden[start:stop], weight, labels[start:stop], use_reentrant=False)
    return total / labels.numel()
