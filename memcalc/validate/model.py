"""A compact reference decoder in plain PyTorch, built from any ``ModelConfig``.

The blocks follow the Hugging Face implementations people train (``modeling_llama.py``,
``modeling_gpt2.py``, ``modeling_mixtral.py``, ``modeling_deepseek_v3.py``): pre-norm residual
blocks, RMSNorm computed in fp32, rotary embeddings applied to queries and keys, key/value heads
repeated for grouped-query attention, or multi-head latent attention (keys and values expanded per
head from a normalised latent, the rotary key shared by all heads), gated (SwiGLU/GeGLU) or plain
GELU MLPs, top-k routed experts with optional shared experts, and a causal-LM loss on fp32 logits.
Parameter names and shapes match ``memcalc.estimate.params.count_params`` tensor for tensor, so
``sum(p.numel())`` equals the estimator's count.
"""

from __future__ import annotations

import contextlib
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


class GemmaRMSNorm(nn.Module):
    """As ``GemmaRMSNorm`` (modeling_gemma.py, gemma2, gemma3): normalise in fp32, scale by
    ``1 + weight`` in fp32, cast back."""

    def __init__(self, width: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(width))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        output = x.float()
        output = output * torch.rsqrt(output.pow(2).mean(-1, keepdim=True) + self.eps)
        return (output * (1.0 + self.weight.float())).type_as(x)


def make_norm(model: ModelConfig, width: int) -> nn.Module:
    from memcalc.estimate.activations import gemma_norm

    if model.norm is NormKind.LAYERNORM:
        return nn.LayerNorm(width, eps=1e-5, bias=model.norm_bias)
    return GemmaRMSNorm(width) if gemma_norm(model) else RMSNorm(width)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    first, second = x.chunk(2, dim=-1)
    return torch.cat((-second, first), dim=-1)


def dropout(x: torch.Tensor, p: float) -> torch.Tensor:
    """``nn.Dropout`` in training as CUDA runs it: the fused ``native_dropout``, which keeps a
    1-byte mask (on the CPU ``F.dropout`` multiplies by a noise tensor in the input's dtype
    instead; ``at::native::dropout``, ``is_fused_kernel_acceptable``)."""
    if not p or not torch.is_grad_enabled():
        return x
    return torch.native_dropout(x, p, True)[0]


def sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool, dropout_p: float = 0.0,
         scale: float | None = None) -> torch.Tensor:
    """``F.scaled_dot_product_attention``; with dropout on fake tensors, CUDA's flash kernel
    (it keeps its RNG state, not a mask: the CPU would run the math path and materialise the
    scores), whose meta function gives CUDA's shapes."""
    if dropout_p and torch.is_grad_enabled() and _is_fake(q):
        device = q.device.type
        if torch.is_autocast_enabled(device):
            dtype = torch.get_autocast_dtype(device)
            q, k, v = (t.to(dtype) for t in (q, k, v))
        return torch.ops.aten._scaled_dot_product_flash_attention(q, k, v, dropout_p, causal, False, scale=scale)[0]
    groups = q.shape[1] // k.shape[1]
    return F.scaled_dot_product_attention(q, k, v, is_causal=causal, enable_gqa=groups > 1, scale=scale,
                                          dropout_p=dropout_p if torch.is_grad_enabled() else 0.0)


@contextlib.contextmanager
def cuda_dropout_rules():
    """Inside, ``F.dropout`` and ``F.scaled_dot_product_attention`` with dropout follow CUDA's
    kernels as ``dropout`` and ``sdpa`` above do, for classes that call them (transformers')."""
    plain_dropout, plain_sdpa = F.dropout, F.scaled_dot_product_attention

    def patched_dropout(input, p=0.5, training=True, inplace=False):
        return dropout(input, p) if training else input

    def patched_sdpa(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None,
                     enable_gqa=False):
        if dropout_p and torch.is_grad_enabled() and _is_fake(query) and attn_mask is None:
            return sdpa(query, key, value, is_causal, dropout_p, scale)
        return plain_sdpa(query, key, value, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal,
                          scale=scale, enable_gqa=enable_gqa)

    F.dropout, F.scaled_dot_product_attention = patched_dropout, patched_sdpa
    try:
        yield
    finally:
        F.dropout, F.scaled_dot_product_attention = plain_dropout, plain_sdpa


def eager_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, dropout_p: float = 0.0,
                    softmax_in_fp32: bool = True) -> torch.Tensor:
    """Causal attention with materialised scores, as Hugging Face's ``eager_attention_forward``
    (grouped K/V heads repeated to the query heads first, ``repeat_kv``; dropout of the
    probabilities after their cast)."""
    groups = q.shape[1] // k.shape[1]
    if groups > 1:
        k = k.repeat_interleave(groups, dim=1)
        v = v.repeat_interleave(groups, dim=1)
    seq = q.shape[-2]
    scores = torch.matmul(q, k.transpose(2, 3)) / math.sqrt(q.shape[-1])
    mask = torch.full((seq, seq), float("-inf"), device=q.device, dtype=scores.dtype).triu(1)
    # GPT-2's eager attention takes its softmax in the scores' dtype; CUDA's autocast runs any
    # softmax in fp32 (the CPU's would not), so an autocast run upcasts as CUDA would
    if softmax_in_fp32 or torch.is_autocast_enabled(q.device.type):
        probs = F.softmax(scores + mask, dim=-1, dtype=torch.float32).to(q.dtype)
    else:
        probs = F.softmax(scores + mask, dim=-1).to(q.dtype)
    return torch.matmul(dropout(probs, dropout_p), v)


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
        self.dropout_p = model.attention_dropout
        self.softmax_in_fp32 = model.softmax_in_fp32
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
                # transformers' DynamicLayer.update: the keys, then the values, so one of them is
                # copied at a time
                past_k, past_v = cache[layer_index]
                cache[layer_index] = None
                k = torch.cat((past_k, k), dim=-2)
                del past_k
                v = torch.cat((past_v, v), dim=-2)
                del past_v
            cache[layer_index] = (k, v)
        if self.attention != "eager":
            # SDPA reads grouped K/V heads directly (enable_gqa, as transformers' sdpa_attention_forward
            # on PyTorch >= 2.5); a single new token attends to the whole cache without a mask.
            out = sdpa(q, k, v, seq > 1, self.dropout_p)
        elif self.recompute_scores and torch.is_grad_enabled():
            out = checkpoint(eager_attention, q, k, v, self.dropout_p, self.softmax_in_fp32, use_reentrant=False)
        else:
            out = eager_attention(q, k, v, self.dropout_p, self.softmax_in_fp32)
        out = out.transpose(1, 2).reshape(batch, seq, self.num_heads * self.head_dim)
        return self.o_proj(out)


def _is_fake(tensor: torch.Tensor) -> bool:
    from torch._subclasses.fake_tensor import FakeTensor

    return isinstance(tensor, FakeTensor)


def unequal_head_sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool) -> torch.Tensor:
    """SDPA where the value heads are narrower than the query/key heads (MLA: 192 vs 128).

    On CUDA PyTorch's flash kernel refuses unequal head sizes and ``F.scaled_dot_product_attention``
    runs the memory-efficient kernel (transformers' sdpa path does no padding); it saves its
    inputs, output and a log-sum-exp padded to 32 positions. A CPU run falls back to the math
    path, which materialises the scores: on fake tensors the memory-efficient kernel is called
    directly (its meta function gives CUDA's shapes), so the measurement is the GPU's."""
    if not _is_fake(q):
        return F.scaled_dot_product_attention(q, k, v, is_causal=causal)
    device = q.device.type
    if torch.is_autocast_enabled(device):  # autocast runs scaled_dot_product_attention in its low precision
        dtype = torch.get_autocast_dtype(device)
        q, k, v = (t.to(dtype) for t in (q, k, v))
    need_lse = torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v))
    out, _lse, _seed, _offset = torch.ops.aten._scaled_dot_product_efficient_attention(
        q, k, v, None, need_lse, 0.0, causal)
    return out


class MLAttention(nn.Module):
    """Multi-head latent attention as transformers' ``DeepseekV3Attention`` (eager and sdpa paths,
    ``rope_interleave=False``; DeepSeek-V2's complex-number rotary gives the same shapes).

    Queries come from ``q_proj``, or from ``q_b_proj(q_a_layernorm(q_a_proj(x)))`` with a query
    LoRA rank; ``kv_a_proj_with_mqa`` gives the latent (``kv_lora_rank``) and one rotary key
    (``qk_rope_head_dim``) per token; ``kv_b_proj`` expands the normalised latent to every head's
    non-rotary key and value. The rotary key is broadcast to all heads and concatenated, so the
    attention kernel reads ordinary per-head queries, keys and values; the cache keeps those
    expanded keys and values (transformers' DynamicCache), not the latent."""

    def __init__(self, model: ModelConfig, attention: str, recompute: str = "none"):
        super().__init__()
        mla, h = model.mla, model.hidden_size
        self.num_heads = model.num_attention_heads
        self.nope, self.rope_dim, self.v_dim = mla.qk_nope_head_dim, mla.qk_rope_head_dim, mla.v_head_dim
        self.kv_lora_rank, self.q_lora_rank = mla.kv_lora_rank, mla.q_lora_rank
        qk = mla.qk_head_dim
        if mla.q_lora_rank is None:
            self.q_proj = nn.Linear(h, self.num_heads * qk, bias=False)
        else:
            self.q_a_proj = nn.Linear(h, mla.q_lora_rank, bias=model.qkv_bias)
            self.q_a_layernorm = make_norm(model, mla.q_lora_rank)
            self.q_b_proj = nn.Linear(mla.q_lora_rank, self.num_heads * qk, bias=False)
        self.kv_a_proj_with_mqa = nn.Linear(h, mla.latent_width, bias=model.qkv_bias)
        self.kv_a_layernorm = make_norm(model, mla.kv_lora_rank)
        self.kv_b_proj = nn.Linear(mla.kv_lora_rank, self.num_heads * (self.nope + self.v_dim), bias=False)
        self.o_proj = nn.Linear(self.num_heads * self.v_dim, h, bias=model.attn_output_bias)
        self.attention = attention
        self.recompute_scores = recompute == "selective" and attention == "eager"

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor] | None, cache=None,
                layer_index: int = 0) -> torch.Tensor:
        batch, seq, _ = x.shape
        heads = self.num_heads
        if self.q_lora_rank is None:
            q = self.q_proj(x)
        else:
            q = self.q_b_proj(self.q_a_layernorm(self.q_a_proj(x)))
        q = q.view(batch, seq, heads, self.nope + self.rope_dim).transpose(1, 2)
        q_pass, q_rot = torch.split(q, [self.nope, self.rope_dim], dim=-1)
        compressed = self.kv_a_proj_with_mqa(x)
        k_pass, k_rot = torch.split(compressed, [self.kv_lora_rank, self.rope_dim], dim=-1)
        k_pass = self.kv_b_proj(self.kv_a_layernorm(k_pass)).view(batch, seq, heads, self.nope + self.v_dim)
        k_pass, v = torch.split(k_pass.transpose(1, 2), [self.nope, self.v_dim], dim=-1)
        k_rot = k_rot.view(batch, 1, seq, self.rope_dim)
        if rope is not None:
            cos, sin = rope
            q_rot = q_rot * cos + rotate_half(q_rot) * sin
            k_rot = k_rot * cos + rotate_half(k_rot) * sin
        k_rot = k_rot.expand(*k_pass.shape[:-1], -1)
        q = torch.cat((q_pass, q_rot), dim=-1)
        k = torch.cat((k_pass, k_rot), dim=-1)
        if cache is not None:
            if cache[layer_index] is not None:
                past_k, past_v = cache[layer_index]
                k, v = torch.cat((past_k, k), dim=-2), torch.cat((past_v, v), dim=-2)
            else:
                # v is a view of kv_b_proj's output (keys and values of every head): transformers'
                # DynamicLayer concatenates onto an empty tensor, so its cache holds a copy of
                # the values alone, not that whole output
                v = v.contiguous()
            cache[layer_index] = (k, v)
        if self.attention != "eager":
            if q.shape[-1] == v.shape[-1]:
                out = F.scaled_dot_product_attention(q, k, v, is_causal=seq > 1)
            else:
                out = unequal_head_sdpa(q, k, v, causal=seq > 1)
        elif self.recompute_scores and torch.is_grad_enabled():
            out = checkpoint(eager_attention, q, k, v, use_reentrant=False)
        else:
            out = eager_attention(q, k, v)
        out = out.transpose(1, 2).reshape(batch, seq, heads * self.v_dim)
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
        self.attn = (MLAttention if model.mla is not None else Attention)(model, attention, recompute)
        self.post_attention_norm = make_norm(model, model.hidden_size)
        self.extra_norms = nn.ModuleList(make_norm(model, model.hidden_size) for _ in range(model.norms_per_layer - 2))
        uses_experts = model.moe is not None and layer_index >= model.moe.first_dense_layers
        self.mlp = MoE(model) if uses_experts else MLP(model, model.intermediate_size)
        self.residual_dropout = model.residual_dropout or 0.0  # GPT-2's resid_dropout and MLP dropout

    def forward(self, x: torch.Tensor, rope, cache=None, layer_index: int = 0) -> torch.Tensor:
        attn_out = dropout(self.attn(self.input_norm(x), rope, cache, layer_index), self.residual_dropout)
        if len(self.extra_norms) == 2:  # Gemma-2 sandwich norms
            attn_out = self.extra_norms[0](attn_out)
        x = x + attn_out
        mlp_out = dropout(self.mlp(self.post_attention_norm(x)), self.residual_dropout)
        if len(self.extra_norms) == 2:
            mlp_out = self.extra_norms[1](mlp_out)
        return x + mlp_out


class Decoder(nn.Module):
    """Decoder-only LM. ``recompute="full"`` checkpoints every block (non-reentrant)."""

    def __init__(self, model: ModelConfig, attention: str = "sdpa", recompute: str = "none",
                 recompute_layers: int = 1, sac_save: tuple[str, ...] | None = None):
        """``recompute="op"`` checkpoints every block with a per-op policy (``op_checkpoint_policy``);
        ``recompute_layers=N`` checkpoints only every Nth block (torchtitan's layer option)."""
        super().__init__()
        self.config = model
        self.embed_tokens = nn.Embedding(model.vocab_size, model.hidden_size)
        if model.position_embedding is PositionKind.LEARNED:
            self.embed_positions = nn.Embedding(model.max_position_embeddings, model.hidden_size)
        self.layers = nn.ModuleList(Block(model, index, attention, recompute) for index in range(model.num_layers))
        self.final_norm = make_norm(model, model.hidden_size)
        self.lm_head = None if model.tie_word_embeddings else nn.Linear(model.hidden_size, model.vocab_size, bias=False)
        self.recompute = recompute
        self.checkpointed = tuple(recompute in ("full", "op") and (index + 1) % recompute_layers == 0
                                  for index in range(model.num_layers))
        self.sac_context = None
        if recompute == "op":
            self.sac_context = op_checkpoint_context(self, sac_save)
        # multi-head latent attention rotates only the qk_rope_head_dim part of queries and keys
        head_dim = model.mla.qk_rope_head_dim if model.mla is not None else model.attention_head_dim
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
        x = dropout(x, self.config.embedding_dropout or 0.0)
        rope = self.rope(seq, x.dtype, x.device)
        for layer, checkpointed in zip(self.layers, self.checkpointed, strict=True):
            if checkpointed and torch.is_grad_enabled():
                if self.sac_context is not None:
                    x = checkpoint(layer, x, rope, use_reentrant=False, context_fn=self.sac_context)
                else:
                    x = checkpoint(layer, x, rope, use_reentrant=False)
            else:
                x = layer(x, rope)
        return self.final_norm(x)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Logits in the model's dtype."""
        return self.head(self.hidden_states(input_ids))

    def head(self, hidden: torch.Tensor) -> torch.Tensor:
        """The output projection: logits in the model's dtype."""
        # through its module when it has one, so its hooks run (an FSDP unit of its own)
        return self.lm_head(hidden) if self.lm_head is not None else F.linear(hidden, self.output_weight())

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


# --- Per-op selective activation checkpointing -----------------------------------------------------
#
# torchtitan's op policy (torchtitan/models/llama3/parallelize_llama.py, Dec 2024, the policy of its
# published Llama 3 benchmarks): inside each checkpointed block, save the outputs of the SDPA kernels
# and of every other ``aten.mm`` (the 1st, 3rd, ... of the block's forward; a linear with a bias runs
# ``addmm`` and is neither counted nor saved), recompute everything else. The CPU's flash kernel
# stands in for CUDA's (same outputs: the attention output and an fp32 log-sum-exp per head and
# token). An explicit list saves the named projections' outputs (mm or addmm) and, with
# "attention", the SDPA kernel's.

SDPA_OPS = ("_scaled_dot_product_flash_attention", "_scaled_dot_product_efficient_attention",
            "_scaled_dot_product_cudnn_attention", "_scaled_dot_product_flash_attention_for_cpu")
PROJECTION_MODULES = {"q_proj": "q", "k_proj": "k", "v_proj": "v", "o_proj": "o",
                      "gate_proj": "gate", "up_proj": "up", "down_proj": "down"}


class _CurrentProjection:
    """The projection whose forward is running (set by module hooks, in forward and recompute)."""

    name: str | None = None


def op_checkpoint_context(decoder: nn.Module, sac_save: tuple[str, ...] | None):
    """A ``context_fn`` for ``torch.utils.checkpoint`` applying the per-op policy."""
    from collections import defaultdict

    from torch.utils.checkpoint import CheckpointPolicy, create_selective_checkpoint_contexts

    sdpa = {getattr(torch.ops.aten, name).default for name in SDPA_OPS if hasattr(torch.ops.aten, name)}
    matmuls = {torch.ops.aten.mm.default, torch.ops.aten.addmm.default}
    current = _CurrentProjection()
    if sac_save is not None:
        for layer in decoder.layers:
            for name, module in layer.named_modules():
                role = PROJECTION_MODULES.get(name.rsplit(".", 1)[-1])
                if role is not None:
                    module.register_forward_pre_hook(lambda _m, _a, role=role: setattr(current, "name", role))
                    module.register_forward_hook(lambda _m, _a, _o: setattr(current, "name", None))

    def context():
        counts: dict[str, int] = defaultdict(int)

        def policy(ctx, func, *args, **kwargs):
            if sac_save is None:
                key = "recompute" if ctx.is_recompute else "forward"
                if func == torch.ops.aten.mm.default:
                    counts[key] += 1
                save = func in sdpa or (func == torch.ops.aten.mm.default and counts[key] % 2 == 1)
            else:
                save = ((func in sdpa and "attention" in sac_save)
                        or (func in matmuls and current.name in sac_save))
            return CheckpointPolicy.MUST_SAVE if save else CheckpointPolicy.PREFER_RECOMPUTE

        return create_selective_checkpoint_contexts(policy)

    return context


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


# --- LoRA and QLoRA ------------------------------------------------------------------------------
#
# PEFT's LoRA (peft/tuners/lora/layer.py, class Linear) wraps a frozen base linear layer:
# ``result = base(x) + lora_B(lora_A(dropout(x))) * scaling`` with ``scaling = lora_alpha / r``,
# ``lora_A: d_in -> r`` and ``lora_B: r -> d_out`` (no bias; lora_dropout=0 makes dropout an
# nn.Identity). ``get_peft_model(..., autocast_adapter_dtype=True)`` (the default) upcasts fp16/bf16
# adapters to fp32 (peft/tuners/tuners_utils.py, cast_adapter_dtype); the forward then casts the
# input to the adapter dtype (``_cast_input_dtype``) and the sum back to the base output's dtype.
# QLoRA's base is bitsandbytes' Linear4bit (NF4, blocks of 64, double quantisation), wrapped by
# peft/tuners/lora/bnb.py's Linear4bit, whose forward clones the base output and casts the adapter
# output back before adding it.

LORA_MODULES = {"q": "q_proj", "k": "k_proj", "v": "v_proj", "o": "o_proj",
                "gate": "gate_proj", "up": "up_proj", "down": "down_proj"}
NF4_BLOCK = 64  # bitsandbytes Params4bit blocksize
NESTED_BLOCK = 256  # double quantisation of the absmax: quantize_blockwise(blocksize=256)
# The 16 NF4 levels (QLoRA, arXiv:2305.14314, appendix E; bitsandbytes get_4bit_type("nf4")).
NF4_LEVELS = (-1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
              -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
              0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
              0.7229568362236023, 1.0)


@torch.library.custom_op("memcalc::dequantize_blockwise", mutates_args=())
def dequantize_blockwise(codes: torch.Tensor, absmax: torch.Tensor, code: torch.Tensor, blocksize: int) -> torch.Tensor:
    """bitsandbytes ``dequantize_blockwise``: one fp32 value per uint8 code. A custom op, so its
    inner work is invisible to the tracker, as a CUDA kernel's would be."""
    scale = absmax.repeat_interleave(blocksize)[: codes.numel()]
    return code[codes.long()] * scale


@dequantize_blockwise.register_fake
def _(codes, absmax, code, blocksize):
    return torch.empty(codes.shape, dtype=torch.float32, device=codes.device)


@torch.library.custom_op("memcalc::dequantize_4bit", mutates_args=())
def dequantize_4bit(packed: torch.Tensor, absmax: torch.Tensor, code: torch.Tensor, blocksize: int,
                    shape: list[int], dtype: torch.dtype) -> torch.Tensor:
    """bitsandbytes ``dequantize_4bit``: the whole [d_out, d_in] weight in ``dtype``."""
    numel = shape[0] * shape[1]
    packed = packed.reshape(-1)
    indices = torch.stack(((packed >> 4) & 15, packed & 15), dim=-1).reshape(-1)[:numel].long()
    scale = absmax.repeat_interleave(blocksize)[:numel]
    return (code[indices] * scale).to(dtype).reshape(shape)


@dequantize_4bit.register_fake
def _(packed, absmax, code, blocksize, shape, dtype):
    return torch.empty(shape, dtype=dtype, device=packed.device)


class NF4Linear(nn.Module):
    """A bitsandbytes ``Linear4bit`` (NF4, ``compress_statistics=True``) simulated in plain
    PyTorch, so that it runs on fake tensors and the CPU. It stores what bitsandbytes stores: the
    packed weight (uint8, two 4-bit codes a byte, shape [(n + 1) // 2, 1]) as a frozen parameter,
    and the quantisation state as buffers: the absmax of each 64 weights as uint8 codes, one fp32
    absmax per 256 codes, the fp32 offset (their mean), the 16-entry NF4 table and the 256-entry
    table of the nested quantisation. The byte counts are ``weights.FORMATS["bnb-nf4"]``'s."""

    def __init__(self, linear: nn.Linear, compute_dtype: torch.dtype):
        super().__init__()
        self.bias = linear.bias  # bitsandbytes keeps a bias in the compute dtype
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.compute_dtype = compute_dtype
        device = linear.weight.device
        flat = linear.weight.detach().reshape(-1).float()
        numel = flat.numel()
        blocks = -(-numel // NF4_BLOCK)
        padded = torch.cat((flat, flat.new_zeros(blocks * NF4_BLOCK - numel))).view(blocks, NF4_BLOCK)
        absmax = padded.abs().amax(dim=1).clamp_min(1e-12)
        levels = torch.tensor(NF4_LEVELS, dtype=torch.float32, device=device)
        indices = (padded / absmax[:, None]).unsqueeze(-1).sub(levels).abs().argmin(-1).reshape(-1)[:numel]
        if numel % 2:
            indices = torch.cat((indices, indices.new_zeros(1)))
        pairs = indices.view(-1, 2).to(torch.uint8)
        packed = (pairs[:, 0] << 4) | pairs[:, 1]
        self.weight = nn.Parameter(packed.view(-1, 1), requires_grad=False)
        # double quantisation: absmax - mean, quantised to 8 bits in blocks of 256
        offset = absmax.mean()
        centred = absmax - offset
        nested_blocks = -(-blocks // NESTED_BLOCK)
        padded_absmax = torch.cat((centred, centred.new_zeros(nested_blocks * NESTED_BLOCK - blocks)))
        nested_absmax = padded_absmax.view(nested_blocks, NESTED_BLOCK).abs().amax(dim=1).clamp_min(1e-12)
        nested_code = torch.linspace(-1.0, 1.0, 256, dtype=torch.float32, device=device)
        normalised = centred / nested_absmax.repeat_interleave(NESTED_BLOCK)[:blocks]
        codes = ((normalised + 1) * 127.5).round().clamp(0, 255).to(torch.uint8)
        self.register_buffer("absmax", codes)
        self.register_buffer("nested_absmax", nested_absmax)
        self.register_buffer("offset", offset.reshape(()))
        self.register_buffer("code", levels)
        self.register_buffer("nested_code", nested_code)

    def linear_fallback(self, x: torch.Tensor) -> torch.Tensor:
        """The forward path of bitsandbytes' ``gemm_4bit`` for many tokens
        (``backends/cuda/ops.py: _dequant_linear_fallback``): the absmax codes to fp32, plus the
        offset (a new tensor), the weight in the compute dtype, then ``F.linear``; all three
        temporaries live until the matmul returns."""
        absmax_dq = torch.ops.memcalc.dequantize_blockwise(self.absmax, self.nested_absmax, self.nested_code,
                                                           NESTED_BLOCK)
        absmax = absmax_dq + self.offset
        weight = torch.ops.memcalc.dequantize_4bit(self.weight, absmax, self.code, NF4_BLOCK,
                                                   [self.out_features, self.in_features], self.compute_dtype)
        return F.linear(x, weight, self.bias)

    def dequantize(self) -> torch.Tensor:
        """``bitsandbytes.functional.dequantize_4bit`` (the backward's path): absmax codes to fp32,
        the offset added in place, then the weight."""
        absmax = torch.ops.memcalc.dequantize_blockwise(self.absmax, self.nested_absmax, self.nested_code,
                                                        NESTED_BLOCK)
        absmax += self.offset
        return torch.ops.memcalc.dequantize_4bit(self.weight, absmax, self.code, NF4_BLOCK,
                                                 [self.out_features, self.in_features], self.compute_dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        input_dtype = x.dtype
        x = x.to(self.compute_dtype)
        if torch.is_grad_enabled() and x.requires_grad:
            return _MatMul4Bit.apply(x, self.weight, self).to(input_dtype)
        return self.linear_fallback(x).to(input_dtype)


class _MatMul4Bit(torch.autograd.Function):
    """bitsandbytes ``MatMul4Bit``: the forward dequantises the weight for one matmul; nothing
    but the packed weight is kept (``ctx.tensors = (None, B)``: the input is not saved, no weight
    gradient exists); the backward dequantises again for the input gradient."""

    @staticmethod
    def forward(ctx, x, packed, module):
        ctx.module = module
        return module.linear_fallback(x)

    @staticmethod
    def backward(ctx, grad_output):
        weight = ctx.module.dequantize()
        return torch.matmul(grad_output, weight.to(grad_output.dtype)), None, None


class LoRALinear(nn.Module):
    """PEFT's ``lora.Linear`` (or, over an ``NF4Linear``, ``lora.bnb.Linear4bit``) with one adapter."""

    def __init__(self, base_layer: nn.Module, rank: int, alpha: float, dtype: torch.dtype, dropout_p: float = 0.0):
        super().__init__()
        self.base_layer = base_layer
        self.dropout_p = dropout_p  # PEFT's lora_dropout, on the (cast) input of lora_A
        device = next(base_layer.parameters()).device
        self.lora_A = nn.Linear(base_layer.in_features, rank, bias=False, dtype=dtype, device=device)
        self.lora_B = nn.Linear(rank, base_layer.out_features, bias=False, dtype=dtype, device=device)
        nn.init.zeros_(self.lora_B.weight)  # PEFT's init_lora_weights=True: B = 0, A kaiming-uniform
        self.scaling = alpha / rank
        self.quantized = isinstance(base_layer, NF4Linear)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        result = self.base_layer(x)
        if self.quantized:  # peft/tuners/lora/bnb.py, Linear4bit.forward (no autocast)
            result = result.clone()
            expected_dtype = result.dtype
            x = x.to(self.lora_A.weight.dtype)
            output = self.lora_B(self.lora_A(dropout(x, self.dropout_p))) * self.scaling
            output = output.to(expected_dtype)
            return result + output
        result_dtype = result.dtype  # peft/tuners/lora/layer.py, Linear.forward
        x = x.to(self.lora_A.weight.dtype)
        result = result + self.lora_B(self.lora_A(dropout(x, self.dropout_p))) * self.scaling
        return result.to(result_dtype)


def apply_lora(decoder: Decoder, targets: tuple[str, ...], rank: int, alpha: float | None = None,
               dtype: torch.dtype = torch.float32, qlora: bool = False, dropout_p: float = 0.0) -> Decoder:
    """Freeze every parameter of ``decoder`` and give the ``targets`` projections (see
    ``LORA_MODULES``; routed and shared experts included) rank-``rank`` adapters in ``dtype``.
    ``qlora``: every linear weight of the layers (``estimate.weights.linear_weights``: attention,
    MLP, experts; not the routers, embeddings or head) becomes an ``NF4Linear`` first, computing in
    the decoder's dtype."""
    if decoder.config.mla is not None:
        raise ValueError("LoRA on multi-head latent attention is not modelled")
    for param in decoder.parameters():
        param.requires_grad_(False)
    names = {LORA_MODULES[target] for target in targets}
    quantised = set(LORA_MODULES.values())
    compute_dtype = decoder.embed_tokens.weight.dtype
    for layer in decoder.layers:
        for parent in list(layer.modules()):
            for child_name, child in list(parent.named_children()):
                if not isinstance(child, nn.Linear) or child_name not in quantised:
                    continue
                base = NF4Linear(child, compute_dtype) if qlora else child
                if child_name in names:
                    base = LoRALinear(base, rank, float(alpha if alpha is not None else rank), dtype, dropout_p)
                setattr(parent, child_name, base)
    return decoder
