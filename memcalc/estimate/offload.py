"""Activation offloading to pinned host memory, as torchtune runs it (``enable_activation_offloading``).

Source: torchtune ``torchtune/training/_activation_offloading.py``: ``OffloadActivations`` (a
``torch.autograd.graph.saved_tensors_hooks`` context around the model's forward, ``use_streams=True``,
``min_offload_size=1024`` bytes, ``max_fwd_stash_size=5``) and ``get_act_offloading_ctx_manager``,
which runs the output projection under ``NoOpManager`` so that the head keeps its input on the
device; the recipes compute the loss outside the context. What the device then holds (measured on
fake tensors by ``memcalc.validate.offload``, which keeps torchtune's references; docs/formulas.md
sec. 3.10):

- forward: every saved tensor of at least 1 KiB but the parameters leaves the device once five
  later tensors are saved (the copy stream's lag), so the layers' saved sets are gone by the loss;
  the final norm's saved tensors are still in the stash there, the head keeps its input, the loss
  keeps what it keeps without offloading, and under autocast the cast cache holds every layer's
  16-bit weight copies until the autocast region ends. Inside a layer: its streams and its MLP's
  intermediates (and, with full recompute, the stashed inputs of the four layers before it).
- backward: each autograd node brings its saved tensors back and they stay until the next node
  that brings tensors back has run, so a layer's backward holds two nodes' tensors at a time, the
  copies of the linear weights among them (a linear layer saves ``weight.t()``, a view, which
  torchtune's ``isinstance(..., nn.Parameter)`` does not exclude). With full recompute a layer's
  input is brought back and the layer recomputed on the device, as without offloading, but
  without the checkpoints of the layers below it.
- host: one pinned copy per save (a tensor saved by three ops is copied three times), the linear
  weights' copies included: the ``activations_offloaded`` row.
"""

from __future__ import annotations

from dataclasses import replace
from typing import TYPE_CHECKING

from memcalc.config import Loss, MLPKind, ModelConfig, NormKind, PositionKind, QKNormScope
from memcalc.errors import Field, SettingsError
from memcalc.estimate.breakdown import Component, Kind
from memcalc.estimate.activations import (
    FP32_BYTES,
    INDEX_BYTES,
    attention_output_width,
    autocast_weight_cache_bytes,
    embedding_dropout_bytes,
    linear_weight_elements_per_layer,
    norm_saved_bytes,
    post_norms,
)

if TYPE_CHECKING:
    from memcalc.estimate.training import ActivationContext, ActivationPeaks, LayerStack
    from memcalc.parallel import ParallelConfig

TORCHTUNE = ("torchtune training/_activation_offloading.py (OffloadActivations, use_streams=True; NoOpManager on "
             "the output head); measured in memcalc/validate/offload.py")
# OffloadActivations' max_fwd_stash_size: an offloaded tensor's device copy is dropped once the
# tensor saved this many ids later is packed
FWD_STASH_TENSORS = 5


def check_offload(model: ModelConfig, parallel: ParallelConfig) -> None:
    """What the settings alone cannot refuse (``TrainSettings`` refuses LoRA, eager attention,
    selective or per-op recompute): the model's blocks and the layout."""
    reasons = [reason for reason, applies in (
        ("MoE layers (torchtune turns offloading off for them)", model.moe is not None),
        ("multi-head latent attention", model.mla is not None),
        ("a parallel layout", not parallel.is_single_device),
    ) if applies]
    if reasons:
        raise SettingsError(Field("offload_activations"), " is modelled for dense attention layers on one GPU, not "
                            f"with {' and '.join(reasons)}")


def _mlp_intermediates(model: ModelConfig) -> int:
    """Intermediate-width tensors an MLP's saved operations keep (gate output, activation, up
    output and product; plain: up output and activation)."""
    return 4 if model.mlp is MLPKind.GATED else 2


def _norm_bring_back(ctx: ActivationContext) -> int:
    """The largest tensor a norm's backward brings back: RMSNorm's fp32 input (``pow``'s), a
    LayerNorm's input with its fp32 mean and rstd."""
    model, tokens = ctx.model, ctx.stream_tokens
    h = model.hidden_size
    if model.norm is NormKind.LAYERNORM:
        return tokens * h * ctx.shape.stream_bytes + 2 * FP32_BYTES * tokens
    return FP32_BYTES * tokens * h


def _first_norm_backward(ctx: ActivationContext) -> int:
    """The first layer's input norm running its backward, the last before the embedding's: RMSNorm's
    ``pow`` backward holds six fp32 tensors of the stream's size (the gradient arriving through the
    product, the mean's expanded gradient, ``pow``'s brought-back input, ``x ** 1``, ``2 * x`` and
    their product); a LayerNorm its input back, the gradient arriving and the input's gradient."""
    model, tokens = ctx.model, ctx.stream_tokens
    if model.norm is NormKind.LAYERNORM:
        return 3 * tokens * model.hidden_size * ctx.shape.stream_bytes
    return 6 * FP32_BYTES * tokens * model.hidden_size


def _repeated_saves(ctx: ActivationContext) -> int:
    """Bytes a dense layer's saved operations copy to the host beyond its distinct saved tensors:
    torchtune copies each save, so a tensor saved by two operations goes twice. RMSNorm's fp32
    input and reciprocal root (``pow`` and the product; ``rsqrt`` and the product), the attention
    input of q, k and v and the MLP input of gate and up (one tensor without autocast), the
    attention output (SDPA's and ``o_proj``'s), and the rotary cos and sin (each multiplied with
    q and k)."""
    model, shape, e, tokens = ctx.model, ctx.shape, ctx.e, ctx.tokens
    h, d = model.hidden_size, model.attention_head_dim
    repeated = 0
    if model.norm is NormKind.RMSNORM:
        norm_rows = model.norms_per_layer * ctx.stream_tokens * h
        norm_tokens = model.norms_per_layer * ctx.stream_tokens
        if model.qk_norm and model.qk_norm_scope is not QKNormScope.L2:  # the q and k norms (per head or whole)
            heads = model.num_attention_heads + model.kv_heads
            norm_rows += tokens * heads * d
            norm_tokens += 2 * tokens if model.qk_norm_scope is QKNormScope.FULL else tokens * heads
        repeated += FP32_BYTES * (norm_rows + norm_tokens)
    if not shape.autocast:  # one tensor read by several linear layers, saved by each
        repeated += (2 + (model.mlp is MLPKind.GATED)) * tokens * h * e
    repeated += tokens * attention_output_width(model) * e
    if model.position_embedding is PositionKind.ROTARY:
        repeated += 4 * ctx.plan.seq_len * d * shape.stream_bytes
    return repeated


def host_bytes(ctx: ActivationContext, stack: LayerStack) -> int:
    """Pinned host bytes at the end of forward: one copy per offloaded save of the layers, the
    final norm and the embedding (the head keeps its input on the device)."""
    model, shape, e, tokens = ctx.model, ctx.shape, ctx.e, ctx.tokens
    h = model.hidden_size
    embedding = INDEX_BYTES * tokens + embedding_dropout_bytes(model, shape.stream)
    if model.position_embedding is PositionKind.LEARNED:
        embedding += INDEX_BYTES * ctx.plan.seq_len  # the positions' indices
    final = norm_saved_bytes(model, h, shape.stream)
    if model.norm is NormKind.RMSNORM:
        final += FP32_BYTES * ctx.stream_tokens * (h + 1)
    if ctx.full:  # a checkpoint saves its layer's input, nothing else
        return embedding + model.num_layers * ctx.stream + final
    weights = 0 if shape.autocast else e  # under autocast the saved 16-bit copies are in the layer terms
    layers = sum(stack.by_kind[kind][0] + _repeated_saves(ctx) + weights * linear_weight_elements_per_layer(model, kind[0])
                 for kind in stack.kinds)
    return embedding + layers + final


def _loss_backward(ctx: ActivationContext, backward_output: int, head_grad: int) -> int:
    """The loss side's backward (``_output_terms``), but for the chunked loss without autocast the
    summing of the head's weight gradients comes once every slice has run its backward, the
    hidden states freed (measured: their bytes are not there), and a single slice has no gradient
    of its own beside the hidden states'. (Under autocast the loss side is ``_output_terms``'s,
    with its gaps.)"""
    from memcalc.estimate.training import LOSS_CHUNK_TOKENS

    if ctx.settings.loss is not Loss.CHUNKED or ctx.shape.autocast or not ctx.plan.last:
        return backward_output
    model, e, tokens = ctx.model, ctx.e, ctx.tokens
    h, chunk = model.hidden_size, min(LOSS_CHUNK_TOKENS, tokens)
    several = tokens > chunk
    head_input = ctx.shape.linear_input.tokens * h * e
    # a later slice's loss backward beside the earlier slices' head-weight gradient and the
    # hidden states' gradient they began (the only slice: neither exists yet)
    in_slice = chunk * model.vocab_size * 3 * FP32_BYTES + ((head_grad + tokens * h * e) if several else 0)
    # one slice: its input's gradient is the hidden states' (no separate slice gradient)
    summing = (3 if several else 1) * head_grad + tokens * h * e + (chunk * h * e if several else 0) - head_input
    return max(in_slice, summing)


def offloaded_peaks(ctx: ActivationContext, stack: LayerStack, embedding: int, final: int) -> ActivationPeaks:
    """The activation peaks with the layers' saved tensors on the host: see the module's text.
    Every candidate was matched op by op against ``memcalc.validate.offload`` on fake tensors."""
    from memcalc.estimate.training import (
        AUTOGRAD,
        ActivationPeaks,
        _backward_peak,
        _mlp_width,
        _output_terms,
        _stage_gradients,
    )

    model, shape, e, tokens = ctx.model, ctx.shape, ctx.e, ctx.tokens
    h, f = model.hidden_size, _mlp_width(model)
    g, stream = ctx.grad_bytes, ctx.stream
    incoming = ctx.stream_tokens * h * e  # a hidden-size tensor in the compute dtype (gradients, o_proj's output)
    # token ids, the final norm (still stashed) and the head's input; the rotary cos and sin (which
    # the checkpoints hold with full recompute) are left out, as everywhere (docs/formulas.md sec. 6)
    kept = embedding + final
    cache = (autocast_weight_cache_bytes(model, e, (kind[0] for kind in stack.kinds)) if shape.autocast else 0)
    at_loss, backward_output, head_grad = _output_terms(ctx, kept + cache)
    backward_output = _loss_backward(ctx, backward_output, head_grad)
    # Forward, inside the last layer at its MLP's product: its input, the sum after attention and
    # the MLP's input (hidden-size streams), o_proj's output (and under autocast the MLP input's
    # 16-bit cast) and the MLP's intermediates: four for a gated MLP (three
    # in a checkpointed layer, which saves none), with full recompute the stashed inputs of the
    # layers before it too.
    stashed_inputs = min(FWD_STASH_TENSORS, model.num_layers) - 1 if ctx.full else 0
    intermediates = 3 if ctx.full else _mlp_intermediates(model)
    in_layer = (embedding + cache + (3 + stashed_inputs) * stream + incoming * (1 + shape.autocast)
                + intermediates * e * tokens * f)
    forward = max(at_loss, in_layer)
    held = head_grad if model.tie_word_embeddings else 0
    stream_gradient = ctx.stream_tokens * h * shape.stream_bytes  # into the embedding (fp32 under autocast)
    gradients = _stage_gradients(ctx)
    # the last layer's down projection runs its backward beside the final norm's last brought-back
    # tensor (it stays until the next node that brings one back has run): its weight and input
    # back (a checkpointed layer: its recomputed saved set), its weight and input gradients
    final_norm_back = _norm_bring_back(ctx)
    if ctx.full:
        # the layers recompute on the device as without offloading, the checkpoints below them gone
        bare = replace(stack, layers=0, others=0, held=tuple(0 for _ in stack.held))
        backward, end_extra, beside = _backward_peak(ctx, bare, embedding, kept, backward_output, head_grad,
                                                     gradients)[:3]
        last_saved = stack.last[0]
        after_mlp_norm = norm_saved_bytes(model, h, shape) if post_norms(model) else 0
        down = (embedding + held + incoming + stream + last_saved - after_mlp_norm + final_norm_back
                + h * f * g + e * tokens * f)
        backward = max(backward, down)
        layer = max(layer_saved for layer_saved, *_ in stack.by_kind.values()) + incoming + stream
        # the embedding's backward: the gradient of its output, the first layer's input still back
        # (with an fp32 stream the first norm's upcast is the input itself, released with the
        # norm's backward), the token ids brought back
        aliased = shape.stream_bytes == FP32_BYTES
        first_input = 0 if aliased else stream
        beside = max(beside, embedding + held + stream_gradient + first_input + INDEX_BYTES * tokens)
        if gradients is not None:
            # the first layer's product backward (gated MLP), its down projection's gradient made:
            # the recomputed saved set, the gradients of the product, activation and up output
            first_saved = stack.by_kind[stack.kinds[0]][0]
            if model.mlp is MLPKind.GATED:
                beside = max(beside, embedding + held + incoming + first_input + first_saved - after_mlp_norm
                             + 2 * e * tokens * f - (gradients.layers[0] - h * f * g + gradients.embedding))
            # the first norm's backward, the embedding's gradient not made yet
            beside = max(beside, embedding + held + stream_gradient + first_input + _first_norm_backward(ctx)
                         - gradients.embedding)
    else:
        inter, weight_back, weight_gradient = e * tokens * f, h * f * e, h * f * g
        gated = model.mlp is MLPKind.GATED
        down = embedding + held + incoming + final_norm_back + weight_back + weight_gradient + 2 * inter
        # the product's (gated) or activation's backward: the down projection's weight and input
        # still back, the gradient of its input, the node's operands back and their gradients
        activation = incoming + weight_back + (6 if gated else 4) * inter
        # the up projection's: the product's operands still back and their gradients (gated) or
        # the activation's input and its gradient, its own input and weight back, the gradients
        # of its input and weight
        up = 3 * incoming + _mlp_intermediates(model) * inter + weight_back + weight_gradient
        # SDPA's: o_proj's input and weight still back, SDPA's q, k, v, output and log-sum-exp
        # back, the output's gradient and those of q, k and v
        q_width, kv_width = attention_output_width(model), model.kv_heads * model.attention_head_dim
        attention = (incoming + 2 * tokens * q_width * e + q_width * h * e
                     + tokens * (2 * q_width + 2 * kv_width) * e + FP32_BYTES * tokens * model.num_attention_heads
                     + tokens * (q_width + 2 * kv_width) * e)
        layer = max(activation, up, attention)
        # the loss's backward opens beside what the forward kept (autocast's cache gone with its region)
        backward = max(kept + backward_output, embedding + held + layer, down)
        end_extra = 2 * head_grad if model.tie_word_embeddings else 0
        if model.tie_word_embeddings:
            backward = max(backward, 3 * head_grad)
        # the embedding's backward, every other gradient made: the gradient of its output, the
        # first norm's input still back, the token ids brought back
        beside = embedding + held + stream_gradient + final_norm_back + INDEX_BYTES * tokens
        if gradients is not None:
            # the first layer's MLP and attention, the gradients of that layer (but the down
            # projection's, or the MLP's and o_proj's) and the embedding's not made yet
            first, first_mlp = gradients.layers[0], gradients.mlp[0]
            not_made = first + gradients.embedding
            beside = max(beside, embedding + held + max(activation, up) - (not_made - weight_gradient),
                         embedding + held + attention - (not_made - first_mlp - q_width * h * g),
                         embedding + held + stream_gradient + _first_norm_backward(ctx) - gradients.embedding)
    if ctx.plan.last and ctx.settings.loss is Loss.FULL:
        # the head's backward: the logits' gradient, the head's weight gradient and its input's
        backward = max(backward, kept + tokens * model.vocab_size * e + head_grad + incoming)
    return ActivationPeaks(forward, backward, end_extra, "saved tensors offloaded to the host + loss",
                           f"{TORCHTUNE}; {AUTOGRAD}", layer, beside, offloaded=host_bytes(ctx, stack))


def offloaded_component(offloaded: int, settings) -> Component:
    """The host row: what the offloaded copies hold at the end of forward (pinned memory)."""
    what = "each checkpointed layer's input" if settings.recompute.value == "full" else (
        "every save >= 1 KiB but parameters, one copy per save, linear weights' copies included")
    return Component("activations_offloaded", "Activations offloaded (pinned)", offloaded, Kind.DYNAMIC,
                     f"{what}; the head's input stays", TORCHTUNE, "cpu")
