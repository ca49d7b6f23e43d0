"""Memory of one training step on one device (no parallelism yet).

The step is modelled as the sequence a framework runs: forward (activations accumulate), backward
(activations are freed as gradients appear), optimizer step (temporaries beside the gradients).
``memory.total`` is the largest of the three phase peaks; each phase's peak is built from the
components below, so the breakdown and the total come from one model.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import NamedTuple

from memcalc.config import (
    ActivationModel,
    LayerType,
    MLPKind,
    Loss,
    ModelConfig,
    NormPlacement,
    Optimizer,
    OptimizerImpl,
    QKNormScope,
    Recompute,
    TrainSettings,
    resolve_seq_len,
)
from memcalc.dtypes import BITS_PER_ELEMENT, DType, storage_bytes
from memcalc.estimate.activations import (
    autocast_weight_cache_bytes,
    embedding_dropout_bytes,
    gated_attention_extra_bytes,
    gated_delta_net_backward_transient,
    gated_delta_net_forward_transient,
    gated_delta_net_saved_bytes,
    mamba2_backward_transient,
    mamba2_forward_transient,
    hf_grouped_moe_saved_bytes,
    mamba2_hybrid_attention_transient,
    mamba2_hybrid_norm_extra,
    mamba2_residual_in_fp32,
    mamba2_saved_bytes,
    mamba2_weight_copy_elements,
    l2_qk_norm_saved_bytes,
    post_norms,
    probability_dropout_bytes,
    softmax_bytes,
    attention_output_width,
    FP32_BYTES,
    INDEX_BYTES,
    MASK_BYTES,
    ActivationShape,
    attention_saved_bytes,
    linear_weight_elements_per_layer,
    megatron_layer_activation_bytes,
    mlp_saved_bytes,
    norm_saved_bytes,
    op_checkpoint_bytes,
    output_layer_activation_bytes,
    qwen3_next_experts_backward_late,
    qwen3_next_moe_backward_transient,
    qwen3_next_moe_forward_transient,
    qwen3_next_moe_saved_bytes,
    torchtitan_sac_outputs,
)
from memcalc.estimate.assumptions import LayoutSummary, TrainAssumptions
from memcalc.estimate.breakdown import MANAGED, Component, Estimate, Kind, RankView
from memcalc.estimate.optimizer import MOMENTS_PER_PARAM, optimizer_state_bytes
from memcalc.errors import Field, InputError, SettingsError
from memcalc.estimate.inventory import MLPRole, ParamCategory, build_inventory, layer_roles
from memcalc.estimate.params import ParamInventory, count_params, parameter_sizes_in_order
from memcalc.parallel import (
    FSDPWrap,
    Offload,
    ParallelConfig,
    RankParams,
    StageLayers,
    TPImpl,
    check_layout,
    inflight_chunks,
    ShardingUnits,
    sharding_units,
    padded_vocab,
    pipeline_ranks,
    rank_params,
    stage_layers,
    tensor_parallel_model,
)
from memcalc.precision import RECIPES, PrecisionRecipe, recipe_for

KORTHIKANTI = "Korthikanti et al. 2022 (arXiv:2205.05198)"
# Tokens per slice of the chunked loss (memcalc.validate.model.LOSS_CHUNK_TOKENS runs the same).
LOSS_CHUNK_TOKENS = 1024
AUTOGRAD = "PyTorch autograd saved tensors of the Hugging Face block (docs/formulas.md sec. 3.4)"
GATED_DELTA = ("transformers' Qwen3-Next and Qwen3.5 classes with flash-linear-attention's chunked gated delta rule and "
               "causal-conv1d, measured on fake tensors (docs/formulas.md sec. 3.12)")


def _bytes(dtype) -> int:
    return BITS_PER_ELEMENT[dtype] // 8


def _zero3():
    """memcalc.estimate.zero3 on first use: only a DeepSpeed ZeRO-3 estimate needs it."""
    from memcalc.estimate import zero3

    return zero3


def _zero3_simulates(model: ModelConfig, parallel: ParallelConfig, recipe: PrecisionRecipe) -> bool:
    """``zero3.simulates``, importing that module only for a DeepSpeed ZeRO-3 layout."""
    return parallel.deepspeed_zero3 and _zero3().simulates(model, parallel, recipe)


def _lora():
    """memcalc.estimate.lora on first use: only a LoRA estimate needs it, and a bundled model's
    plain estimate keeps its start-up time (benchmarks/cli_latency.py)."""
    from memcalc.estimate import lora

    return lora


# The estimator's stage records below: nothing compares, prints or changes them, so no generated
# __eq__, __repr__ or frozen __setattr__/__delattr__; they are read-only by convention, as the assumptions are
# (each generated method costs every start-up: frozen alone is a third of a record's, see
# benchmarks/cli_latency.py).
@dataclass(eq=False, repr=False)
class ActivationPeaks:
    """Activation bytes (live bytes other than parameters, optimizer states and accumulated
    gradients) at the peak of forward and of backward, and the extra live bytes at the end of
    backward when every gradient exists."""

    forward: int
    backward: int
    end_of_backward_extra: int
    formula: str
    source: str
    layer: int = 0  # what the largest layer saves, with the stream into it: beside a gathered ZeRO-3 layer
    # inside the layers' backward: the most that activations exceed the gradients not yet made
    # (the phases add all the gradients); None where not modelled
    beside_gradients: int | None = None
    # Around the output layer, beside FSDP2's head-side buffers: what forward keeps when the head
    # starts (every layer's saved tensors and the final norm's), with the head's logits, and in
    # backward with the logits' gradient and the head's weight gradient (after the loss's own
    # backward). None: the forward and backward peaks stand in.
    before_head: int | None = None
    head_forward: int | None = None
    head_backward: int | None = None
    # forward: what the layers before the last keep (beside its all-gather); backward: each
    # layer's own peak and what is left at its end (None, (): the layer figure stands in)
    below_last: int | None = None
    layer_backward: tuple[tuple[int, int], ...] = ()
    before_first: int | None = None  # forward, at the first layer's all-gather: the embeddings' output
    offloaded: int = 0  # activation offloading: pinned host bytes at the end of forward
    # beside DeepSpeed ZeRO-3's gathered parameters (memcalc.estimate.zero3): what forward holds at
    # the end of each layer, and backward's opening (the loss's backward, before the head's)
    layer_forward: tuple[int, ...] = ()
    opening: int | None = None
    layer_parts: tuple[tuple[int, int], ...] = ()  # per layer: (what it saves, its MLP's part of that)


@dataclass(eq=False, repr=False)
class StagePlan:
    """What one rank computes: a TP-local view of its pipeline stage's layers (heads, MLP width
    and vocabulary divided by TP), the sequence it holds under context parallelism, the stream
    tokens it keeps under sequence parallelism, and the ends of the model it owns."""

    model: ModelConfig  # the TP-local stage: its layers, local heads, widths and vocabulary
    seq_len: int  # tokens per sequence on this rank (divided by CP)
    stream_divisor: int  # TP under sequence parallelism, else 1
    first: bool
    last: bool
    extra_layers: int  # layers of other micro-batches (or chunks) in flight beyond one pass of the stage
    # PyTorch DTensor TP: SP inputs saved gathered; loss_parallel keeps one more fp32 logits tensor
    gathered_linear_inputs: bool = False
    loss_parallel: bool = False
    # Pipelining: in-flight micro-batches (chunks) whose token ids this rank keeps (the embedding
    # saves them) and whose received input it keeps for that input's gradient (Megatron's
    # schedules.py input_tensors; the first norm saves an fp32 copy, not the received tensor)
    token_ids: int = 1
    received_inputs: int = 0
    # DeepSpeed ZeRO-3's memory-efficient linear keeps every projection's input (a frozen one's
    # too: memcalc.estimate.lora.deepspeed_linear_inputs)
    linear_inputs_saved: bool = False


@dataclass(eq=False, repr=False)
class ActivationContext:
    """Stage 1 of the activation model: the sizes every term reads, for one rank's stage."""

    plan: StagePlan
    settings: TrainSettings
    recipe: PrecisionRecipe
    shape: ActivationShape
    e: int  # bytes of a saved activation
    grad_bytes: int
    tokens: int
    stream_tokens: int  # tokens of the hidden-size stream on this rank (divided by TP under SP)
    stream: int  # bytes of one hidden-size stream tensor
    eager: bool
    attention: str  # "eager" or "sdpa"
    scores: int  # elements of one layer's eager attention scores (0 with a fused kernel)
    upcast: int  # bytes of the fp32 copy a 16-bit tensor gets before a softmax or the loss
    scores_forward: int  # an eager softmax's live bytes while it runs
    full: bool  # full recompute
    lora: bool
    adapter_bytes: int
    # per layer of the stage: whether it runs under torch.utils.checkpoint (full or op recompute,
    # every ``recompute_layers``-th layer counted on this rank, as torchtitan wraps a stage's blocks)
    checkpointed: tuple[bool, ...]
    sac_outputs: tuple[str, ...]  # op recompute: what each checkpointed layer keeps

    @property
    def model(self) -> ModelConfig:
        return self.plan.model


class LayerKind(NamedTuple):
    """What sets a layer's saved tensors in the activation model; layers of one kind share a figure."""

    moe: bool
    lora_first: bool = False  # LoRA's first layer: its input (the frozen embedding's output) needs no gradient
    l2_qk_norm: bool = False  # Llama 4's weightless q/k norm (its chunked-attention layers)
    mamba: bool = False  # a block of a norm and a Mamba-2 mixer
    # a hybrid Mamba-2 stack's layer (mamba2_hybrid): "mixer" (a norm and a Mamba-2 mixer or attention:
    # Nemotron-H's M and *), "mlp" (a norm and an MLP or experts: Nemotron-H's - and E), "mixer+mlp" (a
    # norm and a mixer, a norm and an MLP: Granite-4.0-H's and Qwen3-Next's layers); "" elsewhere
    block: str = ""
    delta: bool = False  # a gated delta net mixer (gated_delta_hybrid: Qwen3-Next's linear_attention layers)


@dataclass(eq=False, repr=False)
class LayerStack:
    """Stage 2: what the stage's layers save, by kind of layer (MoE or dense MLP, LoRA's first
    layer, Llama 4's L2-normed rotary layers), in order."""

    kinds: tuple[LayerKind, ...]  # per layer
    by_kind: dict  # kind -> (saved, saved before its attention scores, its MLP part, its backward transient)
    lora_live: dict  # LoRA: bytes alive, not saved, while a layer's forward computes its scores
    layers: int  # bytes the layers keep at the end of forward (micro-batches in flight included)
    average_layer: int
    others: int  # the layers but the last one
    held: tuple[int, ...]  # per layer: what it keeps until its backward (its saved set, or a checkpoint's)
    last_checkpointed: bool  # the last layer runs under checkpoint (its forward saves nothing for autograd)

    @property
    def last(self) -> tuple[int, int, int, int]:
        return self.by_kind[self.kinds[-1]]


def _activation_context(plan: StagePlan, settings: TrainSettings, recipe: PrecisionRecipe) -> ActivationContext:
    model, seq_len = plan.model, plan.seq_len
    e = _bytes(recipe.activation_dtype)
    tokens = seq_len * settings.batch_size
    if model.mamba is not None and not recipe.autocast and mamba2_residual_in_fp32(model):
        e_stream = FP32_BYTES  # Mamba2Block's residual_in_fp32: the stream between blocks is fp32
    else:
        e_stream = _bytes(recipe.weight_dtype) if recipe.autocast else e
    shape = ActivationShape(
        tokens=tokens, seq_len=seq_len, batch_size=settings.batch_size,
        element_bytes=e, stream_bytes=e_stream, autocast=recipe.autocast,
        stream_tokens=tokens // plan.stream_divisor, gathered_linear_inputs=plan.gathered_linear_inputs,
        gemm_input_bytes=recipe.gemm_input_bytes,
    )
    eager = settings.attention.value == "eager"
    scores = model.num_attention_heads * seq_len * seq_len * settings.batch_size if eager else 0
    upcast = 0 if e == FP32_BYTES else FP32_BYTES
    # eager softmax in fp32: the raw and masked scores in the compute dtype, the fp32 copy of the
    # masked scores and the fp32 softmax output; plus the causal mask: the filled square and its
    # upper triangle, both in the compute dtype
    # (GPT-2's softmax in pure 16-bit: the raw and masked scores and the 16-bit softmax output)
    softmax_output, _cast = softmax_bytes(model, e, recipe.autocast)
    copy = upcast if softmax_output == FP32_BYTES else 0
    scores_forward = scores * (2 * e + copy + softmax_output) + (2 * e * seq_len * seq_len if eager else 0)
    lora = settings.lora_rank is not None
    every = settings.recompute_layers
    checkpointed = tuple(settings.recompute.checkpoints_layers and (position + 1) % every == 0
                         for position in range(model.num_layers))
    return ActivationContext(
        plan, settings, recipe, shape, e, _bytes(recipe.grad_dtype), tokens, shape.stream.tokens,
        shape.stream.tokens * model.hidden_size * shape.stream_bytes, eager, "eager" if eager else "sdpa", scores,
        upcast, scores_forward, settings.recompute is Recompute.FULL, lora,
        _bytes(DType(settings.lora_dtype.value)) if lora else 0, checkpointed, sac_outputs(model, settings))


def _layer_stack(ctx: ActivationContext) -> LayerStack:
    model, shape, e, settings, recipe = ctx.model, ctx.shape, ctx.e, ctx.settings, ctx.recipe
    recompute, eager, tokens = settings.recompute, ctx.eager, ctx.tokens
    # a checkpointed layer, recomputed in backward, holds what it would save without recompute
    layer_recompute = Recompute.NONE if recompute.checkpoints_layers else recompute
    lora_live = {False: 0, True: 0}

    def layer(moe_layer: bool, first: bool = False, l2_qk_norm: bool = False,
              mamba: bool = False, block: str = "", delta: bool = False) -> tuple[int, int, int, int]:
        """(saved by the layer, saved before its attention scores, its MLP part, its backward transient)."""
        if block and model.linear_attention is not None:  # Qwen3-Next's (gated_delta_hybrid)
            return _gated_delta_layer(ctx, moe_layer, delta)
        if block:  # a layer of a hybrid Mamba-2 stack (Nemotron-H, Granite-4.0-H)
            return _hybrid_layer(ctx, moe_layer, mamba, block)
        if mamba:  # a block of a norm and a Mamba-2 mixer (check_mamba_training: nothing beside it)
            saved = mamba2_saved_bytes(model, shape)
            if recipe.autocast:
                saved += e * mamba2_weight_copy_elements(model)
            return saved, saved, 0, mamba2_backward_transient(model, shape)
        if ctx.lora:  # a frozen base with adapters; the first layer's input needs no gradient
            part = _lora().lora_layer(model, shape, ctx.attention, layer_recompute, settings,
                                          ctx.adapter_bytes, moe_layer, input_grad=not first,
                                          linear_inputs=ctx.plan.linear_inputs_saved)
            lora_live[first] = part.forward_live
            return part.saved, part.before_scores, part.mlp, part.transient
        attention_part = attention_saved_bytes(model, shape, ctx.attention, layer_recompute)
        if l2_qk_norm:  # Llama 4's rotary layers: the weightless L2 norm of q and k
            attention_part += l2_qk_norm_saved_bytes(model, shape)
        mlp_part = mlp_saved_bytes(model, shape, moe_layer)
        saved = attention_part + mlp_part
        if recipe.autocast:
            saved += e * linear_weight_elements_per_layer(model, moe_layer)
        q_width = attention_output_width(model)
        before_scores = attention_part - tokens * q_width * e - (0 if eager else FP32_BYTES * tokens * model.num_attention_heads)
        if eager and layer_recompute is Recompute.NONE:
            before_scores -= ctx.scores * (sum(softmax_bytes(model, e, recipe.autocast))
                                           + probability_dropout_bytes(model, e, recipe.autocast))
        transient = _mlp_backward_transient(model, shape, moe_layer, ctx.grad_bytes)
        return saved, before_scores, mlp_part, transient

    # dense layers come first (MoE's first_dense_layers), then MoE layers; under LoRA the first
    # layer is a kind of its own (its input, the frozen embedding's output, needs no gradient)
    l2 = model.qk_norm and model.qk_norm_scope is QKNormScope.L2
    kinds = [LayerKind(role is MLPRole.MOE, False, l2 and kind is LayerType.CHUNKED_ATTENTION, kind is LayerType.MAMBA)
             for role, kind in zip(layer_roles(model), model.resolved_layer_types, strict=True)]
    if ctx.lora:
        kinds[0] = kinds[0]._replace(lora_first=True)
    if mamba2_hybrid(model):
        kinds = [kind._replace(block=("mlp" if layer_type is LayerType.NONE else "mixer") if model.separate_blocks
                               else "mixer+mlp")
                 for kind, layer_type in zip(kinds, model.resolved_layer_types, strict=True)]
    elif gated_delta_hybrid(model):
        kinds = [kind._replace(block="mixer+mlp", delta=layer_type is LayerType.LINEAR_ATTENTION)
                 for kind, layer_type in zip(kinds, model.resolved_layer_types, strict=True)]
    by_kind = {kind: layer(*kind) for kind in set(kinds)}
    # Checkpointed layers keep their input (and, under op recompute, the outputs the policy saves);
    # the layer being recomputed holds all of its own.
    checkpoint_bytes = ctx.stream + (op_checkpoint_bytes(model, shape, ctx.attention, ctx.sac_outputs)
                                     if recompute is Recompute.OP else 0)
    held = tuple(checkpoint_bytes if checkpointed else by_kind[kind][0]
                 for kind, checkpointed in zip(kinds, ctx.checkpointed, strict=True))
    if ctx.checkpointed[0] and ctx.plan.first and kinds[0].mamba and shape.stream_bytes != e and not recipe.autocast:
        # an fp32-residual Mamba-2 model's first block reads the 16-bit embedding output
        held = (held[0] - ctx.stream_tokens * model.hidden_size * (shape.stream_bytes - e), *held[1:])
    layers = sum(held)
    # Pipeline ranks also hold the saved tensors of micro-batches (chunks) still in flight.
    average_layer = layers // len(kinds)
    layers += ctx.plan.extra_layers * average_layer
    others = layers - held[-1]
    return LayerStack(tuple(kinds), by_kind, lora_live, layers, average_layer, others, held,
                      ctx.checkpointed[-1])


def _output_terms(ctx: ActivationContext, saved: int) -> tuple[int, int, int]:
    """Stage 3: the loss side. (forward peak at the loss, backward's opening bytes, the head's
    weight gradient)."""
    model, plan, e, tokens, settings = ctx.model, ctx.plan, ctx.e, ctx.tokens, ctx.settings
    h, vocab = model.hidden_size, model.vocab_size
    # Logits: the matmul output, its fp32 upcast for the loss (unless already fp32), the fp32
    # log-softmax output the cross-entropy keeps (transformers' ForCausalLMLoss upcasts first).
    logits = tokens * vocab
    head_grad = 0 if ctx.lora else vocab * h * ctx.grad_bytes  # a frozen head has no weight gradient
    if not plan.last:
        # A middle or first stage has no loss: backward starts from the gradient it receives.
        return saved, 0, head_grad
    if settings.loss is Loss.CHUNKED:
        # One slice at a time, run without saving: its logits in fp32 and their log-softmax.
        chunk = min(LOSS_CHUNK_TOKENS, tokens)
        forward = saved + chunk * vocab * 2 * FP32_BYTES
        if ctx.lora:  # the final hidden states, which the frozen head does not save, held by the loss loop
            forward += tokens * h * e
        # Backward recomputes each slice: its loss gradients, the full-size gradient of the hidden
        # states, and the head-weight gradients of earlier slices waiting to be summed.
        gradient_of_hidden = tokens * h * e
        several = tokens > chunk
        waiting = head_grad if several else 0
        # summing a slice's head-weight gradient into the earlier ones': both and their sum
        summing = (3 if several else 1) * head_grad
        backward_output = max(chunk * vocab * 3 * FP32_BYTES + waiting + gradient_of_hidden,
                              summing + gradient_of_hidden + chunk * h * e)
        return forward, backward_output, head_grad
    # loss_parallel's log-softmax keeps the shifted logits beside its output, and its backward
    # holds four fp32 logits-size tensors where aten's holds three (torch.distributed.tensor.
    # parallel.loss, measured in memcalc/validate/tensor_parallel.py)
    parallel_loss = FP32_BYTES if plan.loss_parallel else 0
    forward = saved + logits * (e + ctx.upcast + FP32_BYTES + parallel_loss)
    if mamba2_blocks_only(model):
        # Mamba2ForCausalLM: ``self.lm_head(...).float()`` frees the 16-bit logits at once, and the
        # final norm's fp32 output stays referenced (the backbone's output) through the loss
        forward += tokens * h * FP32_BYTES - logits * e
    elif mamba2_hybrid(model):
        if model.separate_blocks:
            # NemotronHForCausalLM: ``self.lm_head(hidden_states).float()`` frees the 16-bit logits at once
            forward -= logits * e
        if ctx.recipe.autocast:
            # the final norm's fp32 output (the model output's ``last_hidden_state``) stays referenced
            # through the loss beside lm_head's 16-bit cast of it
            forward += ctx.stream_tokens * h * FP32_BYTES
    # Backward opens with the loss gradients: log-softmax output + its gradient + the logits'
    # fp32 gradient; then the output layer's weight gradient exists before it is accumulated.
    backward_output = max(logits * 3 * FP32_BYTES + logits * parallel_loss, logits * e + head_grad)
    return forward, backward_output, head_grad


def _forward_peak(ctx: ActivationContext, stack: LayerStack, embedding: int, at_loss: int) -> int:
    """Stage 4: the forward peak: at the loss, inside the last layer's eager scores, or inside a
    layer run without saving under full recompute."""
    model, shape, settings, e, tokens, full = ctx.model, ctx.shape, ctx.settings, ctx.e, ctx.tokens, ctx.full
    last_moe, last_first = stack.kinds[-1][0], stack.kinds[-1][1]
    forward = at_loss
    if ctx.eager and not stack.last_checkpointed:
        forward = max(forward, embedding + stack.others + stack.last[1] + stack.lora_live[last_first]
                      + ctx.scores_forward)
    if full and ctx.lora and not last_moe:
        forward = max(forward, embedding + stack.layers + ctx.scores_forward
                      + _lora().recompute_forward_bytes(model, shape, settings, ctx.adapter_bytes))
    elif stack.last_checkpointed:
        # a layer run without saving: its eager softmax beside the attention's inputs, then its MLP
        # intermediates (activation, up, product) at once
        in_attention = stack.last[1] + ctx.scores_forward if ctx.eager else 0
        in_layer = (mamba2_forward_transient(model, shape) if stack.kinds[-1].mamba
                    else 3 * e * tokens * _mlp_width(model))
        forward = max(forward, embedding + stack.layers + max(in_layer, in_attention))
    if stack.kinds[-1].block:
        forward = max(forward, _hybrid_forward_peak(ctx, stack, embedding))
    elif stack.kinds[-1].mamba and not stack.last_checkpointed:
        # inside the last Mamba-2 block's fused forward: its input and what it has saved by then (the
        # norm's tensors; mamba2_forward_transient holds in_proj's input and output itself)
        norm_part = stack.last[0] - mamba2_saved_bytes(model, shape) + norm_saved_bytes(
            model, model.hidden_size, replace(shape, stream_bytes=shape.stream_bytes if shape.autocast else e,
                                              stream_tokens=None))
        forward = max(forward, embedding + stack.others + ctx.stream + norm_part
                      + mamba2_forward_transient(model, shape))
    if ctx.lora and not full and not last_moe:
        # the last layer's down projection: with a small vocabulary (or a dequantised NF4 weight)
        # this, not the loss, is the forward peak
        forward = max(forward, embedding + stack.layers + _lora().mlp_forward_transient(
            model, shape, settings, ctx.adapter_bytes))
    if ctx.recipe.autocast and any(ctx.checkpointed) and stack.kinds[-1].block:
        forward += ctx.e * _hybrid_cached_weights(ctx, stack)
    elif ctx.recipe.autocast and not ctx.lora and any(ctx.checkpointed):
        # autocast's cast cache keeps every layer's 16-bit weight copies to the end of the forward,
        # though the checkpointed layers save none of them (measured with transformers' classes)
        forward += autocast_weight_cache_bytes(model, e, (kind[0] for kind, checkpointed in zip(
            stack.kinds, ctx.checkpointed, strict=True) if checkpointed and not kind.mamba))
        # a checkpointed Mamba-2 block's in_proj copy stays in the cache (its out_proj copy is the
        # kernel's own, freed with the forward it was made in)
        mamba_checkpoints = sum(1 for kind, checkpointed in zip(stack.kinds, ctx.checkpointed, strict=True)
                                if checkpointed and kind.mamba)
        if mamba_checkpoints:
            forward += e * mamba2_weight_copy_elements(model, checkpointed=True) * mamba_checkpoints
    return forward


@dataclass(eq=False, repr=False)
class StageGradients:
    """Gradient bytes of a stage's parameters in the order backward makes them: per layer (and its
    MLP's share, made before its attention's), and the embedding's, made last."""

    layers: tuple[int, ...]
    mlp: tuple[int, ...]
    embedding: int


def _stage_gradients(ctx: ActivationContext) -> StageGradients | None:
    if ctx.lora:  # LoRA's few adapter gradients are left out
        return None
    inventory = build_inventory(ctx.model)

    def size(tensors) -> int:
        return ctx.grad_bytes * sum(tensor.numel * tensor.count for tensor in tensors)

    mlp_categories = (ParamCategory.MLP, ParamCategory.EXPERTS, ParamCategory.ROUTER)
    # layers of one structure share one LayerTensors: size each structure once
    by_structure = {id(layer): (size(layer.tensors), size(t for t in layer.tensors if t.category in mlp_categories))
                    for layer in inventory.layers}
    sizes = [by_structure[id(layer)] for layer in inventory.layers]
    return StageGradients(tuple(total for total, _mlp in sizes), tuple(mlp for _total, mlp in sizes),
                          size(inventory.embeddings) if ctx.plan.first else 0)


def _backward_peak(ctx: ActivationContext, stack: LayerStack, embedding: int, saved: int, backward_output: int,
                   head_grad: int, gradients: StageGradients | None
                   ) -> tuple[int, int, int | None, tuple[tuple[int, int], ...]]:
    """Stage 5: the backward peak, layer by layer, the extra bytes at its end (a tied head),
    given the stage's gradients the most that activations exceed the gradients not yet made at
    some layer's backward (the phases add every gradient), and each layer's own backward peak with
    what is left when its backward ends (the layers below and the gradient of its input)."""
    model, shape, settings, e, tokens, full = ctx.model, ctx.shape, ctx.settings, ctx.e, ctx.tokens, ctx.full
    h, recompute, scores = model.hidden_size, settings.recompute, ctx.scores
    backward = saved + backward_output
    # A tied weight waits for the embedding's gradient: its head gradient stays until the end of backward.
    held = head_grad if model.tie_word_embeddings else 0
    # Inside each layer backward reaches (recomputed first under full recompute): its MLP's
    # gradients, then its attention's (eager: gradients of the scores, fp32 softmax gradients).
    incoming = ctx.stream_tokens * h * e
    # a Gemma-2 style norm after the MLP has run its backward (and freed its inputs) by then
    after_mlp_norm = norm_saved_bytes(model, h, shape) if post_norms(model) else 0
    below = 0  # saved by the layers before this one
    kinds = stack.kinds
    checkpointed = ctx.checkpointed
    # a checkpointed layer's input, kept by its checkpoint while the layer runs its backward
    # (LoRA's branch below adds it itself)
    kept_input = 0 if ctx.lora else ctx.stream
    # the MLP output's dropout has run its backward before the MLP's: its gradient replaces its mask
    mlp_dropout_backward = (e - MASK_BYTES) * ctx.stream_tokens * h if model.residual_dropout else 0
    not_made = gradients.embedding if gradients else 0  # the embedding's, made last
    beside_gradients = None
    per_layer: list[tuple[int, int]] = []

    def in_scores_backward(layer_saved: int, layer_mlp: int) -> int:
        """An eager layer inside its scores' backward, its MLP's backward done: what it saved but its
        MLP part (and, the dropout's backward run, its mask), with the score gradients."""
        softmax_output, _cast = softmax_bytes(model, e, ctx.recipe.autocast)
        recomputed_scores = scores * (softmax_output + e) if recompute is Recompute.SELECTIVE else 0
        score_gradients = scores * (e + softmax_output)
        dropout_freed = (0 if recompute is Recompute.SELECTIVE else
                         scores * probability_dropout_bytes(model, e, ctx.recipe.autocast))
        return layer_saved - layer_mlp - dropout_freed + max(recomputed_scores + score_gradients,
                                                             ctx.scores_forward if recomputed_scores else 0)

    for index, kind in enumerate(kinds):
        layer_saved, _before_scores, _mlp, layer_transient = stack.by_kind[kind]
        base = embedding + below + held + incoming + ctx.plan.extra_layers * stack.average_layer
        base += kept_input if checkpointed[index] else 0
        if ctx.lora and full:
            base += ctx.stream  # the recomputed layer's input, kept by its checkpoint
            if not kind[0]:  # recomputing its forward (saving this time) holds the MLP's forward transients
                backward = max(backward, base - ctx.stream + layer_saved + _lora().mlp_forward_transient(
                    model, shape, settings, ctx.adapter_bytes))
        in_layer_backward = base + layer_saved - after_mlp_norm + layer_transient + mlp_dropout_backward
        backward = max(backward, in_layer_backward)
        per_layer.append((in_layer_backward, base))
        if gradients:
            # this layer's gradients and those of the layers below it are not made yet
            not_made += gradients.layers[index]
            beside = in_layer_backward - not_made
            if ctx.eager:  # later in the layer, its MLP's gradients made
                in_scores = base + in_scores_backward(layer_saved, _mlp)
                backward = max(backward, in_scores)
                beside = max(beside, in_scores - not_made + gradients.mlp[index])
            if kind.delta:  # inside its gated delta net's backward: its MLP's and out_proj's gradients made
                in_mixer, made = _delta_mixer_backward(ctx)
                beside = max(beside, base + layer_saved - _mlp + in_mixer - not_made + gradients.mlp[index] + made)
            if kind.block and kind.moe and model.linear_attention is not None:  # Qwen3-Next's experts, their
                # weight gradients made
                experts = ctx.grad_bytes * model.moe.num_experts * 3 * model.moe.expert_intermediate_size * h
                beside = max(beside, base + layer_saved + qwen3_next_experts_backward_late(model, shape)
                             - not_made + experts)
            beside_gradients = beside if beside_gradients is None else max(beside_gradients, beside)
        below += stack.held[index]
    last_saved, last_before_scores, last_mlp, _ = stack.last
    in_layer = embedding + stack.others + held + incoming
    if ctx.lora and ctx.eager and recompute is Recompute.SELECTIVE:
        # recomputing the last layer's scores: what its forward had saved by then, beside the
        # gradients of the layer's output and of the attention output
        backward = max(backward, embedding + stack.others + incoming + tokens * attention_output_width(model) * e
                       + last_before_scores + ctx.scores_forward)
    if ctx.eager:
        backward = max(backward, in_layer + in_scores_backward(last_saved, last_mlp))
    if ctx.lora and ctx.plan.last:
        # the frozen final norm's backward, once the loss and the head have run theirs
        backward = max(backward, saved + _lora().final_norm_backward_bytes(model, ctx.stream_tokens, e,
                                                                               shape.stream_bytes))
    # At the end of backward a tied weight holds the head gradient, the embedding gradient and their sum.
    end_extra = 2 * head_grad if model.tie_word_embeddings else 0
    if model.tie_word_embeddings:
        backward = max(backward, 3 * head_grad)
    return backward, end_extra, beside_gradients, tuple(per_layer)


def _arch_peaks(plan: StagePlan, settings: TrainSettings, recipe: PrecisionRecipe) -> ActivationPeaks:
    """The architecture-aware activation model in stages: the sizes, what the layers save, the
    loss side, then the forward and backward peaks."""
    ctx = _activation_context(plan, settings, recipe)
    model, shape, e, h = ctx.model, ctx.shape, ctx.e, ctx.model.hidden_size
    stack = _layer_stack(ctx)
    # token ids (first stage, each micro-batch in flight) and labels (last), received stage inputs
    embedding = INDEX_BYTES * ctx.tokens * (plan.token_ids * plan.first + plan.last) + plan.received_inputs * ctx.stream
    if plan.first:  # the embeddings' dropout mask
        embedding += embedding_dropout_bytes(model, shape.stream)
    head_weight_copy = e * model.vocab_size * h if recipe.autocast else 0
    head_input = shape.linear_input.tokens * h * e
    final = (norm_saved_bytes(model, h, shape.stream) + head_input + head_weight_copy
             + mamba2_hybrid_norm_extra(model, shape.stream)) if plan.last else 0  # Nemotron-H's norm_f: more
    if ctx.lora:  # a frozen final norm; the frozen head keeps no input (but under DeepSpeed ZeRO-3)
        final = _lora().frozen_norm_bytes(model, h, ctx.stream_tokens, shape.stream_bytes)
        final += head_input if plan.linear_inputs_saved else 0
    if settings.offload_activations:  # the layers' saved tensors on the host (memcalc.estimate.offload)
        from memcalc.estimate.offload import offloaded_peaks

        return offloaded_peaks(ctx, stack, embedding, final)
    saved = embedding + stack.layers + final
    at_loss, backward_output, head_grad = _output_terms(ctx, saved)
    forward = _forward_peak(ctx, stack, embedding, at_loss)
    if not plan.last:  # a pipeline stage that sends its output
        forward = max(forward, saved + _stage_end_bytes(ctx, stack))
    backward, end_extra, beside_gradients, layer_backward = _backward_peak(
        ctx, stack, embedding, saved, backward_output, head_grad, _stage_gradients(ctx))
    if plan.first and not plan.last and not settings.optimizer_in_backward:  # pipelining accumulates gradients
        end_extra = max(end_extra, _first_stage_backward_end(ctx, stack))
    if plan.first and (mamba2_hybrid(model) or mamba2_blocks_only(model)):
        # the embedding's backward, every other gradient made: the token ids and the gradient of the
        # embedding output (the weights' dtype: fp32 under autocast, else e even beside an fp32
        # residual stream) beside its weight gradient
        output_bytes = shape.stream_bytes if recipe.autocast else e
        end_extra = max(end_extra, embedding + ctx.stream_tokens * h * output_bytes)
    incoming = ctx.stream_tokens * h * e
    largest_layer = max(stack.held)
    head_side = {}
    if plan.last and settings.loss is not Loss.CHUNKED:
        logits = ctx.tokens * model.vocab_size * e
        head_side = {"before_head": saved - (0 if ctx.lora else head_weight_copy), "head_forward": saved + logits,
                     "head_backward": saved + logits + head_grad}
    layer_forward, kept = [], embedding + incoming
    for held in stack.held:
        kept += held
        layer_forward.append(kept)
    formula, source = "autograd saved tensors + loss", AUTOGRAD
    if gated_delta_hybrid(model):
        formula, source = "autograd saved tensors + loss (fla, causal-conv1d)", GATED_DELTA
    return ActivationPeaks(forward, backward, end_extra, formula, source,
                           largest_layer + incoming, beside_gradients, below_last=embedding + stack.others + incoming,
                           layer_backward=layer_backward, before_first=embedding + incoming, **head_side,
                           layer_forward=tuple(layer_forward), opening=saved + backward_output,
                           layer_parts=tuple((stack.by_kind[kind][0], stack.by_kind[kind][2]) for kind in stack.kinds))


def _mlp_width(model: ModelConfig) -> int:
    if model.moe is not None and model.num_moe_layers == model.num_layers:
        return model.moe.expert_intermediate_size * model.moe.experts_per_token // model.moe.num_experts
    return model.intermediate_size


def _mlp_backward_transient(model: ModelConfig, shape: ActivationShape, moe_layer: bool, grad_bytes: int) -> int:
    """What the MLP's backward adds while its saved tensors still exist: the down projection's
    weight gradient before the engine accumulates it, beside the gradient of that projection's
    input (measured: the weight gradient is computed first, then the input gradient)."""
    e, tokens, h = shape.element_bytes, shape.tokens, model.hidden_size
    if moe_layer:
        moe = model.moe
        per_expert = tokens * moe.experts_per_token // moe.num_experts
        width = moe.expert_intermediate_size
        # one expert at a time, plus the full-size gradient of the gathered tokens being summed
        return grad_bytes * h * width + e * per_expert * width + e * tokens * h
    width = model.intermediate_size
    down = grad_bytes * h * width + e * tokens * width
    if model.mlp is MLPKind.GATED:
        # then the product's backward: the gradients of the product, the activation and the up
        # projection at once, where the product itself is freed
        return max(down, 2 * e * tokens * width)
    return down


def _megatron_peaks(plan: StagePlan, settings: TrainSettings, recipe: PrecisionRecipe,
                    parallel: ParallelConfig) -> ActivationPeaks:
    """Korthikanti et al. 2022 Table 2 per layer, times the layers in flight on this rank (sec.
    4.2.3), plus the output layer and loss on the last stage (sec. 4.3)."""
    model = plan.model
    e = _bytes(recipe.activation_dtype)
    tp, sp, cp = parallel.tp, parallel.sp, parallel.cp
    seq_len = plan.seq_len * cp
    per_layer = megatron_layer_activation_bytes(
        seq_len, settings.batch_size, model.hidden_size, model.num_attention_heads * tp, e, settings.recompute,
        tp=tp, sp=sp, cp=cp,
    )
    total = per_layer * (model.num_layers + plan.extra_layers)
    if plan.last:
        total += output_layer_activation_bytes(seq_len, settings.batch_size, model.hidden_size,
                                               model.vocab_size * tp, e, tp=tp, sp=sp, cp=cp)
    return ActivationPeaks(total, total, 0, _megatron_formula(settings.recompute, e, parallel),
                           f"{KORTHIKANTI} sec. 4.1, 4.2 (Table 2), 4.3, 5", per_layer)


def optimizer_step_temporaries(settings: TrainSettings, recipe: PrecisionRecipe, sizes: list[int]) -> int:
    """Bytes the optimizer step allocates beyond the gradients it reads (torch.optim, PyTorch 2.x),
    for the tensors ``sizes`` (element counts in the order the optimizer visits them).

    foreach Adam/AdamW: one state-sized list (``_foreach_sqrt`` of the second moment); the
    for-loop version: two temporaries the size of the largest tensor; fused kernels and SGD:
    none. A master-weight recipe first turns each 16-bit gradient into an fp32 one."""
    num_params = sum(sizes)
    largest = max(sizes, default=0)
    state_bytes = _bytes(recipe.optimizer_state_dtype)
    temporaries = 0
    if settings.optimizer in (Optimizer.ADAMW, Optimizer.ADAM):
        temporaries = {"foreach": num_params * state_bytes, "for-loop": 2 * largest * state_bytes, "fused": 0}[
            settings.optimizer_impl.value
        ]
    if recipe.master_dtype is None or recipe.master_dtype == recipe.grad_dtype:
        return temporaries  # no conversion: the optimizer reads the gradients as they are
    master, grad = _bytes(recipe.master_dtype), _bytes(recipe.grad_dtype)
    # Converting gradient by gradient in parameter order: after tensor k, the fp32 gradients of
    # tensors 1..k and the 16-bit gradients of tensors k..N exist (tensor k's in both).
    conversion, converted = 0, 0
    for size in sizes:
        conversion = max(conversion, master * (converted + size) - grad * converted)
        converted += size
    return max(conversion, (master - grad) * num_params + temporaries)


def resolve_recipe(settings: TrainSettings, parallel: ParallelConfig) -> PrecisionRecipe:
    """``--precision``, else ``--dtype``; Megatron's distributed optimizer implies Megatron's
    gradient handling (megatron-bf16: fp32 main gradients; megatron-fp16: an fp32 copy) for mixed
    precision."""
    if settings.precision is None and parallel.distributed_optimizer and settings.dtype.value in ("bf16", "fp16") \
            and settings.master_weights:
        recipe = RECIPES[f"megatron-{settings.dtype.value}"]
    else:
        recipe = recipe_for(settings.dtype, settings.master_weights, settings.precision)
    if settings.optimizer_dtype is not None:  # --optimizer-dtype: the moments' dtype, e.g. bf16 moments
        recipe = replace(recipe, optimizer_state_dtype=DType(settings.optimizer_dtype.value))
    return recipe


def _stage_plan(model: ModelConfig, parallel: ParallelConfig, stage: StageLayers, seq_len: int) -> StagePlan:
    tp, pp = parallel.tp, parallel.pp
    # in flight: chunks of this rank's own size (uneven stages: n_r / vpp layers each)
    extra = max(0, inflight_chunks(parallel, stage.rank) * stage.layers // parallel.vpp - stage.layers)
    if tp == 1 and pp == 1 and parallel.cp == 1 and not parallel.vocab_padded:
        return StagePlan(model, seq_len, 1, True, True, extra, linear_inputs_saved=parallel.deepspeed_zero3)
    local = _stage_layers_model(tensor_parallel_model(model, tp, padded_vocab(model, parallel)), stage)
    # under pipelining a tied embedding is two copies, each with its own gradient
    local = replace(local, tie_word_embeddings=model.tie_word_embeddings and pp == 1)
    dtensor = parallel.tp_impl is TPImpl.DTENSOR and tp > 1
    received = _received_inputs(parallel, stage.rank)
    return StagePlan(local, seq_len // parallel.cp, tp if parallel.sp else 1, stage.first, stage.last, extra,
                     gathered_linear_inputs=dtensor and parallel.sp, loss_parallel=dtensor,
                     token_ids=inflight_chunks(parallel, stage.rank) - received, received_inputs=received,
                     linear_inputs_saved=parallel.deepspeed_zero3)


def _stage_end_bytes(ctx: ActivationContext, stack: LayerStack) -> int:
    """A stage that sends its output has no loss: its forward peaks at the end of its last layer,
    where hidden-size tensors beyond the saved ones are alive: the residual after attention, the
    attention output, the MLP output and the block output (the reference decoder's ``Block``,
    measured in ``memcalc.validate.pipeline``; Hugging Face's and torchtitan's blocks drop the
    attention output one tensor earlier), one more in an MoE block with shared experts (routed
    output, shared output and their sum), and the layer's input, which the caller holds, unless it
    is the received input (counted already) or a checkpoint keeps it."""
    moe = ctx.model.moe
    streams = 4 + (stack.kinds[-1][0] and moe is not None and moe.num_shared_experts > 0)
    if (len(stack.kinds) > 1 or ctx.plan.first) and not stack.last_checkpointed:
        streams += 1
    return streams * ctx.stream


def _first_stage_backward_end(ctx: ActivationContext, stack: LayerStack) -> int:
    """The first pipeline stage at the end of one micro-batch's backward: the embedding's new
    gradient (V x h, before it is added into the accumulated one: Megatron adds ``param.grad``
    into its grad buffer) and the gradient of the embedding output, while the other micro-batches
    in flight keep their saved tensors and token ids (measured in ``memcalc.validate.pipeline``)."""
    plan, model = ctx.plan, ctx.model
    others = plan.extra_layers * stack.average_layer + INDEX_BYTES * ctx.tokens * (plan.token_ids - 1)
    return others + model.vocab_size * model.hidden_size * ctx.grad_bytes + ctx.stream


def _received_inputs(parallel: ParallelConfig, rank: int) -> int:
    """In-flight chunks whose input came from the previous rank: all of them but, on the first
    rank, those of chunk 0 (they start from the embedding). Megatron's interleaved schedule runs
    forward ``k`` on chunk ``(k // pp) % vpp`` (``schedules.py``, ``get_model_chunk_id``)."""
    pp = parallel.pp
    if pp == 1:
        return 0
    inflight = inflight_chunks(parallel, rank)
    if rank > 0:
        return inflight
    return sum(1 for k in range(inflight) if (k // pp) % parallel.vpp)


def _stage_layers_model(model: ModelConfig, stage: StageLayers) -> ModelConfig:
    """``model`` cut to the layers of ``stage``, in order: their layer types, and their MoE layers
    (leading dense layers stay leading; an explicit MoE layer list is renumbered)."""
    moe = model.moe
    if moe is not None and moe.layers:
        on_stage = set(moe.layers)
        kept = tuple(position for position, index in enumerate(stage.indices) if index in on_stage)
        moe = replace(moe, layers=kept) if kept else None
    elif moe is not None:
        moe = replace(moe, first_dense_layers=stage.dense_layers)
    types = tuple(model.layer_types[index] for index in stage.indices) if model.layer_types else ()
    return replace(model, num_layers=stage.layers, moe=moe, layer_types=types)


def sac_outputs(model: ModelConfig, settings: TrainSettings) -> tuple[str, ...]:
    """What each layer checkpointed by --recompute op keeps: --sac-save's outputs, or torchtitan's
    policy resolved for this architecture; () for the other modes."""
    if settings.recompute is not Recompute.OP:
        return ()
    return settings.sac_save if settings.sac_save is not None else torchtitan_sac_outputs(model)


def check_recompute(model: ModelConfig, settings: TrainSettings, parallel: ParallelConfig,
                    recipe: PrecisionRecipe) -> None:
    """Per-op and every-Nth-layer checkpointing were measured on dense attention layers on one
    tensor-parallel rank; elsewhere the estimate is refused rather than guessed."""
    op, every = settings.recompute is Recompute.OP, settings.recompute_layers > 1
    if not (op or every):
        return
    what = "--recompute op" if op else "--recompute-layers"
    if settings.activation_model is not ActivationModel.ARCH:
        raise InputError(f"{what} has no Megatron formula (Korthikanti et al. 2022 cover none, selective and full): "
                         "use --activation-model arch")
    if op:
        reasons = [reason for reason, applies in (
            ("MoE layers", model.moe is not None), ("multi-head latent attention", model.mla is not None),
            ("FP8 GEMM inputs", recipe.gemm_input_bytes is not None), ("tensor parallelism", parallel.tp > 1),
        ) if applies]
        if reasons:
            raise InputError(f"{what} is modelled for dense attention layers on one tensor-parallel rank, not with "
                             f"{' and '.join(reasons)}: use --recompute full or selective")


def with_dropout(model: ModelConfig, settings: TrainSettings) -> ModelConfig:
    """``model`` with ``settings.dropout`` on every dropout its architecture has (None: as the
    config says). Dropout is modelled for the reference blocks without LoRA; elsewhere refused."""
    if settings.dropout is None and model.unmodelled_dropout:
        raise InputError(f"{model.name}: its config trains with dropout memcalc does not model "
                         f"({', '.join(model.unmodelled_dropout)}): give --dropout (0 for none) to estimate with "
                         "the dropout memcalc knows")
    if settings.dropout is not None:
        model = replace(model, attention_dropout=settings.dropout,
                        embedding_dropout=None if model.embedding_dropout is None else settings.dropout,
                        residual_dropout=None if model.residual_dropout is None else settings.dropout)
    active = [f"{site} {rate:g}" for site, rate in _dropout_sites(model).items() if rate]
    if active and (settings.lora_rank is not None or model.mla is not None):
        what = "LoRA" if settings.lora_rank is not None else "multi-head latent attention"
        raise InputError(f"{model.name} trains with dropout ({', '.join(active)}): not modelled with {what}; "
                         "--dropout 0 estimates without it")
    return model


def _dropout_sites(model: ModelConfig) -> dict[str, float]:
    sites = {"attention": model.attention_dropout, "embedding": model.embedding_dropout,
             "residual": model.residual_dropout}
    return {site: rate for site, rate in sites.items() if rate is not None}


def _check_lora_layout(model: ModelConfig, settings: TrainSettings, parallel: ParallelConfig,
                       recipe: PrecisionRecipe) -> None:
    """LoRA is modelled on one device and under FSDP2 over data-parallel ranks (torchtune's
    lora_finetune_distributed: every parameter sharded, the adapters in the model's dtype)."""
    if parallel.is_single_device:
        return
    data_only = parallel.tp == parallel.pp == parallel.cp == parallel.ep == 1 and parallel.offload is Offload.NONE
    fsdp2 = parallel.fsdp and parallel.shards_params
    ddp = parallel.replicates_gradients  # PyTorch DDP: buckets for the adapters' gradients only
    deepspeed = parallel.deepspeed_zero3  # PEFT + DeepSpeed ZeRO-3: every parameter partitioned
    if not (data_only and (fsdp2 or ddp or deepspeed)):
        raise InputError("LoRA is modelled on one device, under DDP or under FSDP2 or DeepSpeed ZeRO-3 over "
                         "data-parallel ranks (--gpus N, --fsdp full or --zero 3): drop the other parallel degrees")
    if ddp:
        return
    if deepspeed:
        if settings.qlora:
            raise InputError("--qlora under DeepSpeed ZeRO-3 is not modelled (bitsandbytes' packed weights in a "
                             "quant_storage that stage 3 partitions are not measured): use --fsdp full")
        if not _zero3().models_recipe(recipe):
            raise InputError(f"LoRA under DeepSpeed ZeRO-3 is modelled with --precision mixed-bf16 or mixed-fp16 "
                             f"(16-bit parameters, fp32 master partitions), not {recipe.name}")
        if settings.lora_dtype.value != recipe.weight_dtype.value:
            raise InputError(f"LoRA under DeepSpeed ZeRO-3 is modelled with the adapters in the weights' dtype "
                             f"(its bf16/fp16 mode casts every parameter): --lora-dtype {recipe.weight_dtype.value}")
        if not _zero3_simulates(model, parallel, recipe):  # LoRA under ZeRO-3 is the simulation's or refused
            raise InputError(f"{model.name}: LoRA on a mixture of experts under DeepSpeed ZeRO-3 (--zero 3) is not "
                             "modelled; use --fsdp full")
        return
    if parallel.fsdp_wrap is not FSDPWrap.LAYER:
        raise InputError(f"LoRA under FSDP2 is modelled with the layers as units and the root holding the ends: "
                         f"--fsdp-wrap layer, not {parallel.fsdp_wrap.value}")
    if settings.lora_dtype.value != recipe.weight_dtype.value:
        raise InputError(f"LoRA under FSDP2 is modelled with the adapters in the weights' dtype (torchtune keeps "
                         f"them so): --lora-dtype {recipe.weight_dtype.value}")


def mamba2_blocks_only(model: ModelConfig) -> bool:
    """A model of Mamba-2 blocks alone (a norm and a mixer each: Mamba-Codestral, transformers'
    Mamba2ForCausalLM): the structure whose training activations were measured with mamba_ssm's
    fused kernel (memcalc.validate.mamba)."""
    from memcalc.config import MambaVersion

    return (model.mamba is not None and model.mamba.version is MambaVersion.MAMBA2 and model.moe is None
            and model.mlp is MLPKind.NONE and not model.separate_blocks and model.linear_attention is None
            and all(kind is LayerType.MAMBA for kind in model.resolved_layer_types))


def mamba2_hybrid(model: ModelConfig) -> bool:
    """A hybrid stack of Mamba-2 layers and attention/MLP layers as transformers runs it, the
    structures measured with mamba_ssm's fused kernel (memcalc.validate.mamba,
    benchmarks/mamba_accuracy.py): Nemotron-H (modeling_nemotron_h.py ``NemotronHBlock``: one norm and
    one of a Mamba-2 mixer, attention, an MLP, experts with a shared expert; ``separate_blocks``) and
    Granite-4.0-H (modeling_granitemoehybrid.py ``GraniteMoeHybridDecoderLayer``: a norm and a
    Mamba-2 mixer or attention, a norm and the shared MLP, with experts beside it or not). Experts
    run transformers 5's grouped_mm (``hf_grouped_moe_saved_bytes``); dense first layers, shared-expert
    gates and biased routers or experts are other structures."""
    from memcalc.config import MambaVersion

    types = model.resolved_layer_types
    if (model.mamba is None or model.mamba.version is not MambaVersion.MAMBA2 or model.linear_attention is not None
            or model.mla is not None or LayerType.MAMBA not in types or mamba2_blocks_only(model)):
        return False
    if any(kind not in (LayerType.MAMBA, LayerType.FULL_ATTENTION, LayerType.NONE) for kind in types):
        return False
    if model.moe is not None and (model.moe.first_dense_layers or model.moe.shared_expert_gate or model.moe.router_bias
                                  or model.moe.expert_bias):
        return False
    if model.separate_blocks:  # Nemotron-H: its plain relu2 MLP blocks and its experts
        return model.mlp is MLPKind.PLAIN
    return model.mlp is MLPKind.GATED and LayerType.NONE not in types


def _hybrid_layer(ctx: ActivationContext, moe_layer: bool, mamba: bool, block: str) -> tuple[int, int, int, int]:
    """A layer of a hybrid Mamba-2 stack (``mamba2_hybrid``): (saved, saved before its scores, its MLP
    part, its backward transient), from its parts as the transformers blocks run them:

    * a Mamba-2 mixer with its input norm: ``mamba2_saved_bytes`` (the mixer calls
      MambaSplitConv1dScanCombinedFn as Mamba2Mixer does), its backward ``mamba2_backward_transient``;
    * attention with its input norm: ``attention_saved_bytes`` (SDPA; Nemotron-H's has no rotary
      embedding, Granite-4.0-H's rotary or none: q and k are the same size either way); without an MLP
      beside it, ``mamba2_hybrid_attention_transient`` in its backward;
    * an MLP (or experts) with its input norm: ``mlp_saved_bytes`` (Nemotron-H's NemotronHMLP:
      ``down_proj(relu2(up_proj(x)))``, relu's output and its square, as a plain MLP; Granite-4.0-H's
      GraniteMoeHybridMLP: ``input_linear``'s output, chunked into gate and up views, silu's output and
      the product, as a gated MLP); its backward ``_mlp_backward_transient``;
    * Nemotron-H's norms save more (``mamba2_hybrid_norm_extra``); under autocast each part keeps the
      16-bit copies of its matmul weights.

    A layer of a mixer and an MLP runs the MLP's backward first, beside all of the layer's saved
    tensors; the mixer's then runs with the MLP's freed."""
    model, shape, e, recipe = ctx.model, ctx.shape, ctx.e, ctx.recipe
    h = model.hidden_size
    mixer_saved = mixer_transient = mlp_saved = mlp_transient = 0
    if block in ("mixer", "mixer+mlp"):
        if mamba:
            norm_shape = replace(shape, stream_bytes=shape.stream_bytes if shape.autocast else e, stream_tokens=None)
            mixer_saved = mamba2_saved_bytes(model, shape) + mamba2_hybrid_norm_extra(model, norm_shape)
            if recipe.autocast:
                mixer_saved += e * mamba2_weight_copy_elements(model)
            mixer_transient = mamba2_backward_transient(model, shape)
        else:
            mixer_saved = attention_saved_bytes(model, shape, ctx.attention, Recompute.NONE) \
                + mamba2_hybrid_norm_extra(model, shape.stream)
            q_width, kv_width = attention_output_width(model), model.kv_heads * model.attention_head_dim
            if recipe.autocast:
                mixer_saved += e * h * (2 * q_width + 2 * kv_width)
            if block == "mixer":
                mixer_transient = mamba2_hybrid_attention_transient(model, shape, ctx.grad_bytes)
    if block in ("mlp", "mixer+mlp"):
        if moe_layer:  # experts and their shared MLP, transformers' grouped_mm
            mlp_saved = norm_saved_bytes(model, h, shape.stream) + hf_grouped_moe_saved_bytes(model, shape)
        else:
            mlp_saved = mlp_saved_bytes(model, shape, moe_layer)
            if recipe.autocast:  # up and down (Nemotron-H), input_linear's two halves and output_linear (Granite)
                mlp_saved += e * (3 if model.mlp is MLPKind.GATED else 2) * h * model.intermediate_size
                if model.mlp is MLPKind.GATED:  # Granite's one input_linear casts its input once, not twice
                    mlp_saved -= ctx.tokens * h * e
        mlp_saved += mamba2_hybrid_norm_extra(model, shape.stream)
        mlp_transient = _mlp_backward_transient(model, shape, moe_layer, ctx.grad_bytes)
    saved = mixer_saved + mlp_saved
    if block == "mixer+mlp":
        # Granite scales each sublayer's output (``hidden_states * self.residual_multiplier``): its
        # backward makes the scaled copy of the gradient beside the gradient itself, for either part
        mlp_transient += ctx.stream_tokens * h * e
        mixer_transient += ctx.stream_tokens * h * e
    transient = max(mlp_transient, mixer_transient - mlp_saved)
    if ctx.full and recipe.autocast and model.separate_blocks:
        # a Nemotron-H block recomputed under autocast: its norm keeps its fp32 input itself
        # (``.to(float32)`` is a no-op), the tensor its checkpoint holds already, counted there
        # (measured; Granite-4.0-H's layers, whose backward peaks in the MLP part, show no such overlap)
        transient -= ctx.stream
    return saved, saved, mlp_saved, transient


def gated_delta_hybrid(model: ModelConfig) -> bool:
    """Qwen3-Next and Qwen3.5 as transformers runs them (modeling_qwen3_next.py ``Qwen3NextDecoderLayer``,
    modeling_qwen3_5.py and modeling_qwen3_5_moe.py): each layer a norm and a gated delta net (Qwen3.5's
    with its projections split) or gated full attention (``attn_output_gate``, per-head q/k norms), a
    norm and experts with a sigmoid-gated shared expert (or a dense gated MLP), its RMSNorms
    ``1 + weight``; the structure measured with fla's chunked kernel (memcalc.validate.gated_delta)."""
    if model.linear_attention is None or model.mamba is not None or model.mla is not None:
        return False
    if any(kind not in (LayerType.LINEAR_ATTENTION, LayerType.FULL_ATTENTION) for kind in model.resolved_layer_types):
        return False
    if not (model.attn_output_gate and model.norm_weight_offset and model.qk_norm and model.mlp is MLPKind.GATED
            and model.qk_norm_scope in (None, QKNormScope.HEAD) and model.norm_placement in (None, NormPlacement.PRE)):
        return False
    moe = model.moe
    return moe is None or not (moe.first_dense_layers or moe.router_bias or moe.expert_bias or moe.clamped_swiglu
                               or moe.num_shared_experts > 1)


def _embedding_output(ctx: ActivationContext, index: int) -> int:
    """Qwen3NextModel.forward keeps ``inputs_embeds`` referenced to its end: inside a layer past the
    first, the first stage holds the embedding output beside that layer's own input."""
    return ctx.stream if ctx.plan.first and index > 0 else 0


def _delta_norm_part(ctx: ActivationContext) -> int:
    """What a Qwen3-Next mixer's input norm keeps: ``norm_saved_bytes`` and its 16-bit output."""
    return norm_saved_bytes(ctx.model, ctx.model.hidden_size, ctx.shape.stream) \
        + ctx.tokens * ctx.model.hidden_size * ctx.e


def _delta_mixer_backward(ctx: ActivationContext) -> tuple[int, int]:
    """A gated delta net's backward: (the most it holds beyond the mixer's saved tensors and the
    layer's output gradient, ``gated_delta_net_backward_transient``; the gradient bytes made by then:
    ``out_proj``'s weight gradient, computed before the gated norm's backward)."""
    la = ctx.model.linear_attention
    return (gated_delta_net_backward_transient(ctx.model, ctx.shape),
            ctx.grad_bytes * la.value_width * ctx.model.hidden_size)


def _gated_delta_layer(ctx: ActivationContext, moe_layer: bool, delta: bool) -> tuple[int, int, int, int]:
    """A layer of Qwen3-Next (``gated_delta_hybrid``): (saved, saved before its scores, its MLP part,
    its backward transient), from its parts as Qwen3NextDecoderLayer runs them:

    * a gated delta net with its input norm: ``gated_delta_net_saved_bytes``, its backward
      ``gated_delta_net_backward_transient``; or gated attention with its input norm:
      ``attention_saved_bytes`` (SDPA, per-head q/k norms) and ``gated_attention_extra_bytes``;
    * experts and the gated shared expert with their input norm (``qwen3_next_moe_saved_bytes``), or
      a dense gated MLP (``mlp_saved_bytes``); their backward ``qwen3_next_moe_backward_transient``
      and ``_mlp_backward_transient``.

    The MLP's backward runs first, beside every saved tensor of the layer; the mixer's then runs with
    the MLP's freed. Under full recompute the layer first reruns its forward, saving: inside the mixer
    (``gated_delta_net_forward_transient``) nothing of its MLP is saved yet."""
    model, shape = ctx.model, ctx.shape
    h = model.hidden_size
    recompute_forward = 0
    if delta:
        mixer_saved = gated_delta_net_saved_bytes(model, shape)
        mixer_transient = gated_delta_net_backward_transient(model, shape)
        recompute_forward = _delta_norm_part(ctx) + gated_delta_net_forward_transient(model, shape)
    else:
        mixer_saved = (attention_saved_bytes(model, shape, "sdpa", Recompute.NONE)
                       + gated_attention_extra_bytes(model, shape))
        mixer_transient = 0
    if moe_layer:
        mlp_saved = norm_saved_bytes(model, h, shape.stream) + qwen3_next_moe_saved_bytes(model, shape)
    else:
        mlp_saved = mlp_saved_bytes(model, shape, False)
    if moe_layer:
        mlp_transient = qwen3_next_moe_backward_transient(model, shape)
    else:
        mlp_transient = _mlp_backward_transient(model, shape, False, ctx.grad_bytes)
    saved = mixer_saved + mlp_saved
    transient = max(mlp_transient, mixer_transient - mlp_saved)
    if ctx.full:
        transient = max(transient, recompute_forward - saved)
    return saved, saved, mlp_saved, transient


def _hybrid_forward_peak(ctx: ActivationContext, stack: LayerStack, embedding: int) -> int:
    """The forward of a hybrid Mamba-2 stack (``mamba2_hybrid``) inside its last Mamba-2 mixer that
    saves (mamba_ssm's fused forward, ``mamba2_forward_transient``): the layers before it, its input,
    its norm's saved tensors; and, where the last layer is checkpointed and has Granite-4.0-H's MLP,
    inside that MLP run without saving: ``input_linear``'s 2I-wide output (its gate and up halves are
    views), silu's output and the product at once (GraniteMoeHybridMLP.forward)."""
    model, shape, e = ctx.model, ctx.shape, ctx.e
    peak = 0
    saving = [index for index, kind in enumerate(stack.kinds) if kind.mamba and not ctx.checkpointed[index]]
    if saving:
        index = saving[-1]
        norm_shape = replace(shape, stream_bytes=shape.stream_bytes if shape.autocast else e, stream_tokens=None)
        norm_part = norm_saved_bytes(model, model.hidden_size, norm_shape) + mamba2_hybrid_norm_extra(model, norm_shape)
        peak = (embedding + sum(stack.held[:index]) + ctx.plan.extra_layers * stack.average_layer + ctx.stream
                + norm_part + mamba2_forward_transient(model, shape))
    delta = [index for index, kind in enumerate(stack.kinds) if kind.delta and not ctx.checkpointed[index]]
    if delta:  # inside the last gated delta net mixer that saves (Qwen3-Next)
        index = delta[-1]
        peak = max(peak, embedding + sum(stack.held[:index]) + ctx.plan.extra_layers * stack.average_layer
                   + ctx.stream + _embedding_output(ctx, index) + _delta_norm_part(ctx)
                   + gated_delta_net_forward_transient(model, shape))
    delta = [index for index, kind in enumerate(stack.kinds) if kind.delta and ctx.checkpointed[index]]
    if delta:  # the last checkpointed gated delta net's first forward, run without saving: the
        # checkpoints' inputs, its input norm's 16-bit output and the mixer's locals
        index = delta[-1]
        peak = max(peak, embedding + sum(stack.held[:index + 1]) + ctx.plan.extra_layers * stack.average_layer
                   + ctx.tokens * model.hidden_size * e + gated_delta_net_forward_transient(model, shape, saving=False))
    if model.linear_attention is not None and model.moe is not None:  # Qwen3-Next's last experts block
        index = max(index for index, kind in enumerate(stack.kinds) if kind.moe)
        mixer = stack.by_kind[stack.kinds[index]][0] - stack.by_kind[stack.kinds[index]][2]
        # its input norm's output, beside the layer's input and the residual after its mixer
        before = (embedding + sum(stack.held[:index + 1]) + ctx.plan.extra_layers * stack.average_layer
                  + ctx.tokens * model.hidden_size * e)
        if ctx.checkpointed[index]:
            peak = max(peak, before + ctx.stream + qwen3_next_moe_forward_transient(model, shape, saving=False))
        else:  # the layer's input beside the residual after its mixer
            norm = norm_saved_bytes(model, model.hidden_size, shape.stream)
            peak = max(peak, before - stack.held[index] + 2 * ctx.stream + _embedding_output(ctx, index) + mixer
                       + norm + qwen3_next_moe_forward_transient(model, shape))
    checkpointed = [index for index, kind in enumerate(stack.kinds) if kind.mamba and ctx.checkpointed[index]]
    if checkpointed:  # the last checkpointed Mamba-2 layer's first forward, run without saving
        index = checkpointed[-1]
        peak = max(peak, embedding + sum(stack.held[:index + 1]) + ctx.plan.extra_layers * stack.average_layer
                   + mamba2_forward_transient(model, shape))
    if stack.last_checkpointed and stack.kinds[-1].block == "mixer+mlp" and model.mamba is not None:
        # the layer's input (its checkpoint's), the residual after its mixer and the MLP's normed input
        peak = max(peak, embedding + stack.layers + 2 * ctx.stream + 4 * e * ctx.tokens * model.intermediate_size)
    return peak


def _hybrid_cached_weights(ctx: ActivationContext, stack: LayerStack) -> int:
    """Elements of the 16-bit weight copies autocast's cast cache holds to the end of the forward for
    a hybrid stack's checkpointed layers, which save none of them: every matmul weight of the layer
    (``at::autocast`` caches casts of leaf tensors that need gradients, grad mode or not) but a Mamba-2
    mixer's ``out_proj``, which MambaSplitConv1dScanCombinedFn casts itself (``outproj_weight.to(dtype)``)."""
    model = ctx.model
    layers = build_inventory(model).layers
    out_proj = model.mamba.intermediate_size * model.hidden_size
    return sum(layer.matmul_elements() - (out_proj if kind.mamba else 0)
               for layer, kind, checkpointed in zip(layers, stack.kinds, ctx.checkpointed, strict=True) if checkpointed)


def check_mamba_training(model: ModelConfig, settings: TrainSettings, parallel: ParallelConfig,
                         recipe: PrecisionRecipe) -> None:
    """Mamba-2 blocks (and Qwen3-Next's layers) were measured with 16-bit activations (bf16, amp-bf16;
    Qwen3-Next bf16 only), SDPA-or-none attention, no or full recompute, no LoRA, on one device: anything
    else is refused in one line. Data-parallel layouts (DDP, ZeRO 0-3, FSDP, offload) keep one device's
    activations on each rank, the states sharded by the tensor inventory as for every family."""
    delta = gated_delta_hybrid(model)
    if model.mamba is None and not delta:
        return
    family = ("Qwen3.5" if model.linear_attention.split_projections else "Qwen3-Next") if delta else "Mamba-2"
    reasons = [reason for reason, applies in (
        # Qwen3-Next was measured in 16-bit training only (its norms' and gates' casts differ under autocast)
        (f"{recipe.name} (bf16 only: --dtype bf16 or --precision mixed-bf16)", delta and recipe.autocast),
        (f"--recompute {settings.recompute.value}", settings.recompute not in (Recompute.NONE, Recompute.FULL)),
        ("--recompute-layers", settings.recompute_layers > 1),
        (f"{recipe.name} (bf16 activations only: --dtype bf16 or --precision amp-bf16)",
         recipe.activation_dtype is not DType.BF16 or recipe.gemm_input_bytes is not None),
        ("--attention eager", settings.attention.value == "eager"),
        ("LoRA", settings.lora_rank is not None),
        # data parallelism splits the batch, not the layers: each rank's activations are one device's
        ("tensor, pipeline, context or expert parallelism",
         parallel.tp > 1 or parallel.pp > 1 or parallel.cp > 1 or parallel.ep > 1 or parallel.sp),
        ("--offload-activations", settings.offload_activations),
        ("--activation-model megatron/both", settings.activation_model is not ActivationModel.ARCH),
        # transformers' grouped_mm experts take bf16 weights only; fp32 ones loop over each expert's tokens
        (f"{recipe.name}'s fp32 weights beside experts (bf16 weights only: --precision mixed-bf16 or pure-bf16)",
         model.moe is not None and recipe.weight_dtype is not DType.BF16),
    ) if applies]
    if reasons:
        precisions = "bf16" if delta else "bf16 or amp-bf16"
        raise InputError(f"{model.name}: {family} training activations are modelled for {precisions}, no or full "
                         f"recompute, on one device or data-parallel ranks (DDP, ZeRO, FSDP); not with "
                         f"{', '.join(reasons)}")


def check_trainable(model: ModelConfig) -> None:
    """The activation model was built and measured on attention blocks, on models of Mamba-2
    blocks and on the hybrid stacks of ``mamba2_hybrid`` (Nemotron-H's blocks, Granite-4.0-H, with
    or without experts; mamba_ssm's fused kernel, transformers' grouped_mm experts); other Mamba
    layers (Mamba-1's C++ selective scan, Jamba, Falcon-H1's parallel block) and gated-delta-net
    layers save other tensors, so a training estimate of such a model is refused, not guessed."""
    if mamba2_blocks_only(model) or mamba2_hybrid(model) or gated_delta_hybrid(model):
        return
    recurrent = [kind.value for kind in dict.fromkeys(model.resolved_layer_types)
                 if kind in (LayerType.MAMBA, LayerType.ATTENTION_MAMBA, LayerType.LINEAR_ATTENTION)]
    if recurrent:
        from memcalc.config import MambaVersion

        detail = ""
        if model.mamba is not None and model.mamba.version is MambaVersion.MAMBA1:
            detail = " (Mamba-1 mixers)"
        elif model.mamba is not None and model.moe is not None:
            detail = " (Mamba-2 layers beside experts of this kind)"
        raise InputError(f"{model.name}: training activations of {' and '.join(recurrent)} layers are not modelled "
                         f"yet{detail}; `memcalc infer` and `memcalc show` cover this model (weights, KV cache and "
                         "state)")


def _ceil_div(numerator: int, denominator: int) -> int:
    return -(-numerator // denominator)


@dataclass(eq=False, repr=False)
class StaticStates:
    """Stage 1 of a rank's step: the persistent bytes of the parameters it holds, per rank."""

    held: RankParams  # the trained tensors (LoRA: the adapters) before ZeRO sharding
    recipe: PrecisionRecipe  # the trained tensors' recipe (LoRA: the adapters')
    base_recipe: PrecisionRecipe  # the model's recipe (LoRA: the frozen base's)
    weights: int
    base_weights: int  # LoRA: the frozen base
    grad_dtype: DType
    gradients: int
    master: int
    grad_copy: int  # an optimizer's own gradient copy (Megatron fp16)
    moments: int
    dtensor_embedding: bool  # DTensor TP keeps the whole embedding gradient on every rank
    ddp_buckets: int = 0  # PyTorch DDP's flat gradient buckets, allocated when DDP wraps the model
    qlora_layer: int | None = None  # QLoRA under FSDP2: a layer's frozen base as gathered (packed NF4)


@dataclass(eq=False, repr=False)
class StepCosts:
    """Stage 2: the optimizer step and how gradients live (in backward, accumulated)."""

    sizes: tuple[int, ...]  # element counts in the order the optimizer visits them
    temporaries: int
    gradients: int  # the gradient bytes held (one tensor's when stepped in backward)
    in_backward: bool
    accumulating_fp32: bool
    accumulation_buffer: int


@dataclass(eq=False, repr=False)
class WorkingSet:
    """Stage 4: what ZeRO-3/FSDP gathers and what ZeRO-2/offload reduces, per rank."""

    units: ShardingUnits
    fsdp2: bool
    unit: int  # parameters of the gathered unit
    gathered: int  # bytes of gathered parameters
    unit_gradients: int  # bytes of a unit's unsharded gradients
    # FSDP2: the gathered and reduce-scattered bytes where they peak in forward and in backward,
    # each with what lives beside them (a key of _phases' table: "before_first", "forward", ...)
    forward_points: tuple[tuple[int, str], ...] = ()
    backward_points: tuple[tuple[int, str], ...] = ()

    @property
    def total(self) -> int:
        return self.gathered + self.unit_gradients


def _held_bytes(parallel: ParallelConfig, held: RankParams, dtype, sharded: bool) -> int:
    """A rank's tensors ``held`` in ``dtype``, dense and expert parts sharded or not."""
    return _per_rank(parallel, storage_bytes(held.dense.total, dtype), storage_bytes(held.experts.total, dtype),
                     sharded)


def _per_rank(parallel: ParallelConfig, dense_bytes: int, expert_bytes: int, sharded: bool) -> int:
    """Bytes on one rank of a state split into dense and expert parts, sharded or not."""
    if not sharded:
        return dense_bytes + expert_bytes
    return _ceil_div(dense_bytes, parallel.dense_shards) + _ceil_div(expert_bytes, parallel.expert_shards)


def _static_states(model: ModelConfig, settings: TrainSettings, parallel: ParallelConfig, recipe: PrecisionRecipe,
                   stage: StageLayers, plan: StagePlan) -> StaticStates:
    lora = settings.lora_rank is not None
    base_recipe = recipe
    if lora:
        # LoRA (memcalc.estimate.lora): only the adapters train; the frozen base is weights alone
        _check_lora_layout(model, settings, parallel, recipe)
        held = RankParams(_lora().adapter_inventory(model, settings), ParamInventory(()))
        recipe = _lora().adapter_recipe(settings, recipe)
    else:
        held = rank_params(model, parallel, stage)
        if (parallel.fsdp and parallel.shards_params and parallel.offload is Offload.NONE
                and recipe.master_dtype is not None and recipe.gemm is None):
            # FSDP2's MixedPrecisionPolicy: the sharded parameters are the fp32 master copy (no
            # 16-bit shard beside them) and their gradients fp32 shards; the 16-bit weights exist
            # only gathered (torchtitan's mixed_precision_param bf16, mixed_precision_reduce fp32)
            recipe = replace(recipe, name=f"{recipe.name} (FSDP2 mixed precision)", weight_dtype=recipe.master_dtype,
                             grad_dtype=recipe.master_dtype, master_dtype=None)

    def per_rank(dense_bytes: int, expert_bytes: int, sharded: bool) -> int:
        return _per_rank(parallel, dense_bytes, expert_bytes, sharded)

    def state(dtype, sharded: bool) -> int:
        return _held_bytes(parallel, held, dtype, sharded)

    offload_optimizer = parallel.offloads_optimizer
    weights = state(recipe.weight_dtype, parallel.shards_params)
    base_weights = _lora().base_weight_bytes(model, settings, base_recipe.weight_dtype) if lora else 0
    if lora and parallel.shards_params:  # FSDP2 shards the frozen base too
        # QLoRA: the packed 4-bit weights are parameters and sharded; bitsandbytes' quantisation
        # state (absmax codes and tables) is kept on the module, whole on every rank
        replicated = _lora().qlora_state_bytes(model, base_recipe.weight_dtype) if settings.qlora else 0
        base_weights = _ceil_div(base_weights - replicated, parallel.dense_shards) + replicated
    weights += base_weights
    # ZeRO-Offload keeps the reduced gradients on the CPU in the master dtype, beside the optimizer.
    grad_dtype = recipe.master_dtype if offload_optimizer and recipe.master_dtype else recipe.grad_dtype
    gradients = state(grad_dtype, parallel.shards_gradients or offload_optimizer)
    # PyTorch DTensor has no vocabulary-sharded embedding backward: every TP rank computes (and
    # keeps) the whole V x h embedding gradient (measured in memcalc/validate/tensor_parallel.py).
    dtensor_embedding = parallel.tp_impl is TPImpl.DTENSOR and parallel.tp > 1 and stage.first
    if dtensor_embedding:
        vocab = padded_vocab(model, parallel)
        replicated = storage_bytes((vocab - vocab // parallel.tp) * model.hidden_size, grad_dtype)
        gradients += per_rank(replicated, 0, parallel.shards_gradients or offload_optimizer)
    master = state(recipe.master_dtype, parallel.shards_optimizer) if recipe.master_dtype else 0
    grad_copy = state(recipe.optimizer_grad_copy, parallel.shards_optimizer) if recipe.optimizer_grad_copy else 0
    fp8 = recipe.gemm is not None and not lora
    gemm_moments = None
    if fp8:
        weights, gradients, master, gemm_moments = _gemm_states(model, recipe, settings, held, per_rank, parallel)
    if settings.optimizer is Optimizer.ADAFACTOR:
        matrices = _lora().adapter_matrices(model, settings) if lora else _matrices(plan.model, held, parallel.ep)
        moments = per_rank(optimizer_state_bytes(settings.optimizer, held.dense, recipe.optimizer_state_dtype,
                                                 matrices),
                           optimizer_state_bytes(settings.optimizer, held.experts, recipe.optimizer_state_dtype),
                           parallel.shards_optimizer)
    else:
        moments = per_rank(optimizer_state_bytes(settings.optimizer, held.dense, recipe.optimizer_state_dtype),
                           optimizer_state_bytes(settings.optimizer, held.experts, recipe.optimizer_state_dtype),
                           parallel.shards_optimizer)
    if gemm_moments is not None:
        moments = gemm_moments
    # PyTorch DDP (torch/csrc/distributed/c10d/reducer.cpp, initialize_buckets): one flat buffer per
    # bucket of the gradients' dtype, together the size of every gradient; Megatron's recipes run
    # their own grad buffer instead (counted in their gradients)
    ddp = (parallel.replicates_gradients and not recipe.name.startswith("megatron-")
           and not settings.optimizer_in_backward)
    ddp_buckets = gradients if ddp else 0
    qlora_layer = None
    if settings.qlora and parallel.shards_params:
        layer_elements = sharding_units(model, parallel, stage).largest_layer
        qlora_layer = _lora().qlora_layer_bytes(model, layer_elements, base_recipe.weight_dtype)
    return StaticStates(held, recipe, base_recipe, weights, base_weights, grad_dtype, gradients, master, grad_copy,
                        moments, dtensor_embedding, ddp_buckets, qlora_layer)


def _step_costs(model: ModelConfig, settings: TrainSettings, parallel: ParallelConfig,
                states: StaticStates) -> StepCosts:
    recipe, held = states.recipe, states.held
    if settings.lora_rank is not None:
        sizes = _lora().adapter_sizes_in_order(model, settings)
    elif parallel.is_single_device:
        sizes = parameter_sizes_in_order(model)
    else:
        sizes = []
        for inventory, shards in ((held.dense, parallel.dense_shards), (held.experts, parallel.expert_shards)):
            divisor = shards if parallel.shards_optimizer else 1
            for group in inventory.groups:
                sizes += [_ceil_div(group.numel, divisor)] * group.count
    offload_optimizer = parallel.offloads_optimizer
    # DeepSpeedCPUAdam updates the offloaded fp32 partition in place, in one C++ loop. An optimizer
    # gradient copy is the conversion, made persistent: the step reads it as it is.
    step_recipe = replace(recipe, grad_dtype=recipe.optimizer_grad_copy) if states.grad_copy else recipe
    temporaries = 0 if offload_optimizer else optimizer_step_temporaries(settings, step_recipe, sizes)
    gradients = states.gradients
    in_backward = settings.optimizer_in_backward
    if in_backward:
        # torchtune's optimizer-in-backward: a hook steps each parameter as its gradient appears and
        # frees it, so one tensor's gradient (and that tensor's step) exists at a time.
        largest = max(sizes, default=0)
        gradients = storage_bytes(largest, states.grad_dtype)
        temporaries = optimizer_step_temporaries(replace(settings, optimizer_impl=OptimizerImpl.FOR_LOOP), recipe,
                                                 [largest])
    # Gradient accumulation: micro-batches add into the gradients, so they live through the step;
    # a 16-bit recipe with fp32 master weights accumulates into an fp32 buffer (DeepSpeed's
    # BF16_Optimizer fp32 gradient accumulation; nanotron's fp32 grad accumulation: +4 B/param).
    accumulating_fp32 = (settings.grad_accum > 1 and recipe.master_dtype is not None
                         and _bytes(recipe.grad_dtype) < _bytes(recipe.master_dtype))
    accumulation_buffer = 0
    if accumulating_fp32:
        accumulation_buffer = _per_rank(parallel, storage_bytes(held.dense.total, recipe.master_dtype),
                                        storage_bytes(held.experts.total, recipe.master_dtype),
                                        parallel.shards_gradients)
    if accumulating_fp32 and not offload_optimizer:
        # the step reads the fp32 buffer: nothing to convert, and the 16-bit gradients are gone
        temporaries = optimizer_step_temporaries(settings, replace(recipe, grad_dtype=recipe.master_dtype), sizes)
    return StepCosts(tuple(sizes), temporaries, gradients, in_backward, accumulating_fp32, accumulation_buffer)


def _activation_peaks(model: ModelConfig, settings: TrainSettings, parallel: ParallelConfig, plan: StagePlan,
                      states: StaticStates, seq_len: int) -> tuple[ActivationPeaks, ActivationPeaks | None]:
    """Stage 3: the activation model's peaks (and the Megatron formula beside them with ``both``)."""
    base_recipe = states.base_recipe
    if settings.activation_model.value == "megatron":
        peaks = _megatron_peaks(plan, settings, base_recipe, parallel)
    else:
        peaks = _arch_peaks(plan, settings, base_recipe)
    megatron = (_megatron_peaks(plan, settings, base_recipe, parallel)
                if settings.activation_model.value == "both" else None)
    if states.dtensor_embedding:
        # the embedding gradient is computed last, beside the gradient of the embedding output;
        # inside the layers' backward its replicated part (beyond the rank's vocabulary slice) is
        # not made yet either
        replicated = storage_bytes((padded_vocab(model, parallel) - plan.model.vocab_size) * model.hidden_size,
                                   states.recipe.grad_dtype)
        peaks = replace(peaks, end_of_backward_extra=peaks.end_of_backward_extra
                        + seq_len // parallel.cp * settings.batch_size * model.hidden_size
                        * _bytes(states.recipe.activation_dtype),
                        beside_gradients=None if peaks.beside_gradients is None
                        else peaks.beside_gradients - replicated)
    return peaks, megatron


def _working_set(model: ModelConfig, parallel: ParallelConfig, stage: StageLayers, states: StaticStates,
                 lora: bool = False) -> WorkingSet:
    """ZeRO-3 gathers a unit's parameters (and prefetches the next); ZeRO-2 and offload reduce a
    unit's full gradients before keeping (or sending away) their shard. Sharding over one rank is
    no sharding: nothing is gathered or reduce-scattered."""
    held = states.held
    sharding = parallel.dense_shards > 1 or (held.experts.total > 0 and parallel.expert_shards > 1)
    units = sharding_units(model, parallel, stage)
    weight_bytes = _bytes(states.recipe.weight_dtype)
    if parallel.fsdp and parallel.shards_params and sharding:
        return _fsdp2_working_set(model, parallel, states, units, len(stage.indices), lora)
    unit = units.largest
    gathered = unit * weight_bytes * (1 + parallel.prefetch) if parallel.shards_params and sharding else 0
    # DeepSpeed ZeRO-2 copies each gradient into its reduction buffer as it is made: the buffer
    # (deepspeed_buffer_bytes) stands for the unit's unsharded gradients
    streams_gradients = ((parallel.shards_gradients and sharding and not parallel.deepspeed_buckets)
                         or parallel.offloads_optimizer)
    # never more than every gradient of the rank unsharded
    unit_gradients = min(unit, held.total) * weight_bytes if streams_gradients else 0
    return WorkingSet(units, False, unit, gathered, unit_gradients)


def deepspeed_buffer_bytes(parallel: ParallelConfig, states: StaticStates) -> int:
    """DeepSpeed ZeRO-1/2's gradient reduction buffers (DeepSpeed 0.19.8, deepspeed/runtime/zero/
    stage_1_and_2.py, ``DeepSpeedZeroOptimizer.setup_buckets``): ``reduce_bucket_size`` elements in
    the parameters' dtype (contiguous_gradients, the default), a second one with ``overlap_comm``;
    allocated at a backward's first gradient hook and dropped by ``_release_ipg_buffers`` when its
    reduction ends. Measured in memcalc/validate/deepspeed.py."""
    if not parallel.deepspeed_buckets:
        return 0
    return storage_bytes(parallel.reduce_bucket_size, states.recipe.grad_dtype) * (1 + parallel.overlap_comm)


def _root_wrap_forward(root: int, layer: int, stage_layers: int) -> tuple[tuple[int, str], ...]:
    """FSDP2's forward moments with the ends in the root (``--fsdp-wrap layer``): the first layer's
    copy-out beside the root's deferred buffer, the last layer's beside the one before's, the
    head's forward with the last layer's buffer (freed at the root's post-forward), the loss."""
    forward = ((2 * root + 2 * layer, "before_first"), (root + layer, "head_forward"), (root, "forward"))
    if stage_layers > 1:
        forward += ((root + 3 * layer, "below_last"),)
    return forward


def _fsdp2_working_set(model: ModelConfig, parallel: ParallelConfig, states: StaticStates, units: ShardingUnits,
                       stage_layers: int, lora: bool) -> WorkingSet:
    """FSDP2's gathered and reduce-scattered buffers at each point where they peak, as (bytes,
    the activations beside them) pairs (docs/parallelism.md sec. 3; measured with
    memcalc.validate.fsdp for each ``--fsdp-wrap``, PyTorch 2.13 ``_fully_shard``).

    A unit's all-gather writes a flat buffer that is copied out into its unsharded parameters; in
    forward the previous unit's buffer is freed only after the next copy-out, in backward at once;
    backward prefetches the next unit's buffer. A unit's reduce-scatter input is a new buffer of
    the unit in the gradient dtype, filled from the unsharded gradients, and kept until the next
    reduce-scatter is issued. The root (``fully_shard(model)``) is never resharded after forward
    and reduces in the final backward callback, as does a unit whose input needs no gradient (the
    embedding). ``reshard_after_forward=False`` (torchtitan's norm-and-head unit) keeps a unit's
    parameters from its forward to its backward."""
    # gathered parameters and unsharded gradients in the compute recipe's dtypes; reduce-scatter
    # inputs and gradient shards in the sharded state's (FSDP2 mixed precision: fp32, as torchtitan's
    # mixed_precision_reduce; else the same)
    weight, grad = _bytes(states.base_recipe.weight_dtype), _bytes(states.base_recipe.grad_dtype)
    reduce = _bytes(states.recipe.grad_dtype)
    layer, layer_grad, layer_reduce = (units.largest_layer * size for size in (weight, grad, reduce))

    def shard(elements: int) -> int:
        return _ceil_div(elements * reduce, parallel.dense_shards)

    if lora:
        # a frozen root has no gradient, and a layer's reduce-scatter input holds only its
        # adapters' gradients; the frozen head's backward ends before the last layer's
        # pre-backward prefetch (measured with memcalc.validate.fsdp, lora_rank)
        root = units.ends * weight
        trained = states.held.total // model.num_layers
        if states.qlora_layer is not None:  # the layer's linear weights gathered packed, 4 bits each
            layer = states.qlora_layer
        layer += trained * weight
        adapters = trained * grad
        forward = _root_wrap_forward(root, layer, stage_layers)
        # a layer's backward: its parameters and the next layer's buffer (QLoRA: with a weight
        # dequantised for the input gradient, in the layer's own figure), then its adapters'
        # gradients and, from the next layer on, the last reduce-scatter input and a shard
        last = root + (2 if stage_layers > 1 else 1) * layer
        following = root + (2 if stage_layers > 2 else 1) * layer + adapters + shard(trained)
        backward = ((last, "last_layer_backward"), (last + adapters, "last_layer_end"),
                    (following, "next_layer_backward"), (following + adapters, "next_layer_end"),
                    (root, "backward"))
        return WorkingSet(units, True, units.largest_layer, max(b for b, _ in forward), 0, forward_points=forward,
                          backward_points=backward)
    if parallel.fsdp_wrap is FSDPWrap.LAYER:
        # the root holds the embedding, final norm and head from its pre-forward to the final
        # callback, beside each layer's buffers; the head's gradient waits there unsharded
        root, root_grad, root_reduce = (units.ends * size for size in (weight, grad, reduce))
        forward = _root_wrap_forward(root, layer, stage_layers)
        # the loss's backward runs before the root's pre-backward prefetches the last layer. The
        # last layer's backward: its parameters and gradients and the next layer's buffer (if
        # any); from the next layer on, the last reduce-scatter input and one more gradient shard
        head_grad = units.largest_end * grad
        last = root + head_grad + (2 if stage_layers > 1 else 1) * layer
        following = (root + head_grad + (2 if stage_layers > 2 else 1) * layer + layer_reduce
                     + shard(units.largest_layer))
        backward = ((last, "last_layer_backward"), (last + layer_grad, "last_layer_end"),
                    (following, "next_layer_backward"), (following + layer_grad, "next_layer_end"),
                    (root, "backward"), (root + layer, "head_backward"),
                    # the final callback: the root's parameters and gradients, the first layer's
                    # reduce-scatter input, every layer's gradient shard; then, resharded, the
                    # root's gradients beside its own reduce-scatter input, then its output beside
                    # the embedding's gradient, which outlives the copy-in (measured)
                    (root + root_grad + layer_reduce - shard(units.ends), "gradients"),
                    (root_grad + root_reduce - shard(units.ends), "gradients"),
                    (root_reduce + units.embedding * grad, "gradients"))
    else:
        # the embedding and the head are units of their own; the root keeps the rest (final norm)
        embedding, head = units.embedding * weight, units.head * weight
        kept_head = parallel.fsdp_wrap is FSDPWrap.TORCHTITAN  # [final norm, head], not resharded
        root = (units.ends - units.embedding - units.head) * weight
        head_grad, head_reduce = units.head * grad, units.head * reduce
        # the last layer and the next unit's buffer: a layer's, or the embedding's below the first
        gathered_last = layer + (layer if stage_layers > 1 else embedding)
        following = (root + layer + (layer if stage_layers > 2 else embedding) + layer_reduce + shard(units.head)
                     + shard(units.largest_layer))
        forward = ((root + 2 * embedding, "none"),  # the embedding's copy-out
                   (root + embedding + 2 * layer, "before_first"),  # the first layer's, the embedding's deferred
                   (root + (3 if stage_layers > 1 else 2) * layer, "below_last"),  # the last layer's
                   (root + layer + 2 * head, "before_head"),  # the head's, after every layer
                   (root + 2 * head, "head_forward"),  # its buffer deferred
                   # the root's post-forward frees the last buffer; the head resharded or kept
                   (root + head * kept_head, "forward"))
        backward = (
            (root + head * kept_head, "backward"),  # the loss's backward
            # the head gathered (or kept) and the last layer prefetched
            (root + head + layer, "head_backward"),
            # the head's reduce-scatter: its gradient and input beside the last layer's buffer
            (root + head_grad + head_reduce + layer + shard(units.head), "before_head"),
            # a layer's parameters, gradients and the next layer's buffer beside the last
            # reduce-scatter input (the head's, then a layer's) and the shards made
            (root + gathered_last + head_reduce + shard(units.head), "last_layer_backward"),
            (root + gathered_last + layer_grad + head_reduce + shard(units.head), "last_layer_end"),
            (following, "next_layer_backward"), (following + layer_grad, "next_layer_end"),
            # the first layer's end, the embedding prefetched, every layer's gradient shard made
            (root + layer + embedding + layer_grad + layer_reduce + shard(units.head)
             + (stage_layers - 1) * shard(units.largest_layer), "before_first"),
            # the embedding reduces in the final callback: its gradient and reduce-scatter input
            # beside every gradient shard
            (root + units.embedding * (grad + reduce), "gradients"))
    return WorkingSet(units, True, units.largest_layer, max(b for b, _ in forward),
                      max(b for b, _ in backward) - max(b for b, _ in forward), forward_points=forward,
                      backward_points=backward)


def _on_cpu(parallel: ParallelConfig) -> dict[str, bool]:
    """Components an offloading layout keeps in host memory."""
    offload = parallel.offloads_optimizer
    return {"master_weights": offload, "optimizer_states": offload, "gradients": offload,
            "optimizer_step_temporaries": offload, "gradient_accumulation": offload, "optimizer_grad_copy": offload,
            "weights": parallel.offloads_params}


def _phases(settings: TrainSettings, parallel: ParallelConfig, states: StaticStates, step: StepCosts,
            peaks: ActivationPeaks, working: WorkingSet) -> tuple[dict[str, int], bool]:
    """Stage 5: the live GPU bytes at the peak of forward, backward and the optimizer step, and
    whether gradients persist through the whole step."""
    on_cpu = _on_cpu(parallel)

    def gpu(key: str, value: int) -> int:
        return 0 if on_cpu.get(key) else value

    recipe, in_backward = states.recipe, step.in_backward
    # bitsandbytes' paged states are CUDA managed memory, outside PyTorch's allocator: the device
    # model counts them (memcalc.estimate.device), the allocated peaks do not
    moments = 0 if settings.paged_optimizer else gpu("optimizer_states", states.moments)
    static = (gpu("weights", states.weights) + gpu("master_weights", states.master)
              + moments + gpu("gradient_accumulation", step.accumulation_buffer)
              + gpu("optimizer_grad_copy", states.grad_copy) + states.ddp_buckets)
    # with gradient_as_bucket_view the gradients are the buckets' memory
    gpu_gradients = 0 if states.ddp_buckets and parallel.ddp_bucket_view else gpu("gradients", step.gradients)
    gathered = working.gathered
    # Gradients live through the whole step when micro-batches accumulate into them (pipelines,
    # gradient accumulation) or when the framework keeps persistent buffers (Megatron's grad buffer).
    persistent = not in_backward and (
        parallel.pp > 1 or (parallel.microbatches or 1) > 1 or parallel.distributed_optimizer
        or recipe.name.startswith("megatron-") or (settings.grad_accum > 1 and not step.accumulating_fp32))
    if in_backward:
        forward = static + gathered + peaks.forward
        backward = (static + gathered + max(peaks.backward, peaks.end_of_backward_extra) + gpu_gradients
                    + step.temporaries)
    elif persistent:
        forward = static + gpu_gradients + gathered + peaks.forward
        backward = static + gpu_gradients + working.total + max(peaks.backward, peaks.end_of_backward_extra)
    elif working.fsdp2:
        # Each gathered set beside what lives then: the embeddings' output at the first layer's
        # copy-out, every layer's saved tensors but the last's at the last one's, every layer's
        # before the head's, the activation peaks at the end of forward and the start of backward
        # (which holds the output layer's gradient), each layer's own backward figures, and every
        # gradient shard at the final callback.
        beside = {"none": 0, "forward": peaks.forward, "backward": peaks.backward,
                  "before_head": peaks.forward if peaks.before_head is None else peaks.before_head,
                  "head_forward": peaks.forward if peaks.head_forward is None else peaks.head_forward,
                  "head_backward": peaks.backward if peaks.head_backward is None else peaks.head_backward,
                  "below_last": peaks.layer if peaks.below_last is None else peaks.below_last,
                  "before_first": peaks.layer if peaks.before_first is None else peaks.before_first,
                  "gradients": gpu_gradients}
        # the last layer's backward and the next one's (the first with a reduce-scatter before it)
        layers = peaks.layer_backward or ((peaks.layer, 0),)
        for name, (inside, end) in zip(("last_layer", "next_layer"), reversed(layers[-2:])):
            beside[f"{name}_backward"], beside[f"{name}_end"] = inside, end
        forward = static + max(gathered + beside[kind] for gathered, kind in working.forward_points)
        backward = static + max(gathered + beside[kind] for gathered, kind in working.backward_points if kind in beside)
    else:
        # Gradients (with a unit's unsharded ones before their reduce-scatter) accumulate while
        # activations are freed; the unsharded unit never makes them exceed the unsharded total.
        unsharded = storage_bytes(states.held.total, recipe.grad_dtype)
        accumulating = max(gpu_gradients, min(gpu_gradients + working.unit_gradients, unsharded))
        forward = static + gathered + peaks.forward
        backward = static + gathered + max(peaks.backward, accumulating + peaks.end_of_backward_extra)
        if peaks.beside_gradients is not None and not parallel.shards_gradients and not on_cpu.get("gradients"):
            # a layer's backward beside the gradients made by then (checkpointed layers and small
            # batches put the backward peak here, not at the loss)
            backward = max(backward, static + gathered + gpu_gradients + peaks.beside_gradients)
        buffers = deepspeed_buffer_bytes(parallel, states)
        if buffers:
            backward = max(backward, static + gathered + buffers + _deepspeed_backward(parallel, states, peaks,
                                                                                    gpu_gradients))
    # with master weights the 16-bit gradients become fp32 ones for the step (freed one by one, or
    # kept as DDP bucket views): the step holds what the accounting of step_gradients says either way
    kept = gpu("gradients", step.gradients) if recipe.master_dtype else gpu_gradients
    if parallel.deepspeed_buckets and not step.in_backward:
        # DeepSpeed ZeRO-1 keeps only its partition's gradients (grads_in_partition) for the step,
        # as ZeRO-2 does (stage_1_and_2.py, copy_grads_in_partition; measured)
        kept = _partition_gradients(parallel, states)
    step_gradients = 0 if in_backward or step.accumulating_fp32 else kept
    phases = {"forward": forward, "backward": backward,
              "optimizer_step": static + step_gradients
              + (0 if in_backward else gpu("optimizer_step_temporaries", step.temporaries))}
    return phases, persistent


def _partition_gradients(parallel: ParallelConfig, states: StaticStates) -> int:
    """Bytes of the gradients of a rank's ZeRO partition (DeepSpeed's grads_in_partition)."""
    return _held_bytes(parallel, states.held, states.grad_dtype, True)


def _deepspeed_backward(parallel: ParallelConfig, states: StaticStates, peaks: ActivationPeaks,
                        gpu_gradients: int) -> int:
    """What lives beside DeepSpeed ZeRO-1/2's reduction buffers in backward, past the first
    gradient hook (stage_1_and_2.py: ``process_gradients`` calls ``setup_buckets``; measured in
    memcalc/validate/deepspeed.py): the head's backward with its weight gradient (the largest
    tensor's, made before its hook copies it into the buffer), then each layer beside the
    gradients made by then. ZeRO-2 reduces each full bucket at once, keeping its partition's
    gradients (``grads_in_partition``, allocated at the first reduction); ZeRO-1 reduces after the
    whole backward, when every gradient but those already copied into the bucket still exists
    beside the buffer and its partition's copy."""
    largest = max((group.numel for group in states.held.groups), default=0)
    first_gradient = storage_bytes(largest, states.grad_dtype)
    head = peaks.backward if peaks.head_backward is None else peaks.head_backward
    if parallel.zero == 1:
        points = [head + first_gradient, peaks.end_of_backward_extra + _partition_gradients(parallel, states)
                  + storage_bytes(max(0, states.held.total - parallel.reduce_bucket_size), states.grad_dtype)]
        if peaks.beside_gradients is not None:
            points.append(gpu_gradients + peaks.beside_gradients)
        return max(points)
    return max(head + first_gradient, gpu_gradients + first_gradient + peaks.end_of_backward_extra)


def _components(settings: TrainSettings, parallel: ParallelConfig, states: StaticStates, step: StepCosts,
                peaks: ActivationPeaks, working: WorkingSet, persistent: bool) -> list[Component]:
    """Stage 6: the breakdown rows, each with its formula and source."""
    recipe, held, lora = states.recipe, states.held, settings.lora_rank is not None
    offload_optimizer = parallel.offloads_optimizer
    sharding_text = _sharding_text(parallel, held.experts.total > 0)
    moment_text = _moment_formula(settings.optimizer.value, MOMENTS_PER_PARAM[settings.optimizer],
                                  recipe.optimizer_state_dtype.value)

    def text(formula: str, sharded: bool) -> str:
        return f"{formula}{sharding_text}" if sharded and sharding_text else formula

    if lora:
        base_text = "NF4 linear weights (double quant) + rest" if settings.qlora else "P"
        weights_component = Component(
            "weights", "Weights (frozen base + adapters)", states.weights, Kind.STATIC,
            text(f"{base_text} x {states.base_recipe.weight_dtype.value} + {held.total:,} adapter params x "
                 f"{recipe.weight_dtype.value}", parallel.shards_params)
            if parallel.shards_params else
            f"{base_text} x {states.base_recipe.weight_dtype.value} = {states.base_weights:,} B + {held.total:,} "
            f"adapter params x {recipe.weight_dtype.value}",
            _lora().QLORA if settings.qlora else _lora().PEFT)
    else:
        weights_component = Component(
            "weights", "Weights", states.weights, Kind.STATIC,
            text(f"P x {recipe.weight_dtype.value}", parallel.shards_params), recipe.source,
            "cpu" if _on_cpu(parallel)["weights"] else "gpu")
    adapters_only = " (adapters only)" if lora else ""
    where = "cpu" if offload_optimizer else "gpu"
    in_buckets = bool(states.ddp_buckets) and parallel.ddp_bucket_view
    components = [
        weights_component,
        Component("master_weights", "Master weights (fp32)", states.master, Kind.STATIC,
                  text("P x fp32", parallel.shards_optimizer) if states.master else f"none ({recipe.name})",
                  recipe.source, where),
        Component("optimizer_states", "Optimizer states" + (" (paged)" if settings.paged_optimizer else ""),
                  states.moments, Kind.STATIC,
                  text(moment_text, parallel.shards_optimizer) + adapters_only
                  + (", CUDA managed memory outside the allocator" if settings.paged_optimizer else ""),
                  "torch.optim / bitsandbytes state layout (paged: bitsandbytes GlobalPageManager, "
                  "cudaMallocManaged)", MANAGED if settings.paged_optimizer and where == "gpu" else where),
        Component("gradients", "Gradients", 0 if in_buckets else step.gradients,
                  Kind.STATIC if persistent else Kind.DYNAMIC,
                  "views into the DDP buckets" if in_buckets else
                  f"largest tensor x {states.grad_dtype.value} (stepped in backward)" if step.in_backward else
                  text(f"P x {states.grad_dtype.value}", parallel.shards_gradients or offload_optimizer)
                  + adapters_only, recipe.source, where),
        Component("activations", "Activations (peak)", max(peaks.forward, peaks.backward), Kind.DYNAMIC,
                  peaks.formula, peaks.source),
        Component("optimizer_step_temporaries", "Optimizer step temporaries", step.temporaries, Kind.DYNAMIC,
                  "none: DeepSpeedCPUAdam updates in place" if offload_optimizer else
                  f"{settings.optimizer.value} ({settings.optimizer_impl.value})",
                  "DeepSpeed csrc/adam/cpu_adam.cpp" if offload_optimizer else "torch.optim implementations"),
    ]
    if states.ddp_buckets:
        view = parallel.ddp_bucket_view
        components.insert(4, Component(
            "ddp_buckets", "DDP gradient buckets", states.ddp_buckets, Kind.STATIC,
            f"P x {states.grad_dtype.value}: " + ("the gradients are views into them" if view else
                                                  "a second copy of the gradients (gradient_as_bucket_view=False)"),
            "PyTorch DistributedDataParallel (reducer.cpp initialize_buckets; docs: gradient_as_bucket_view "
            "saves the total gradients size); measured in memcalc/validate/ddp.py"))
    buffers = deepspeed_buffer_bytes(parallel, states)
    if buffers:
        count = "2 x " if parallel.overlap_comm else ""
        components.append(Component(
            "deepspeed_buckets", "DeepSpeed reduce buckets", buffers, Kind.DYNAMIC,
            f"{count}reduce_bucket_size {parallel.reduce_bucket_size:,} x {states.grad_dtype.value}, in backward",
            "DeepSpeed 0.19.8 stage_1_and_2.py (setup_buckets: the ipg buffer; overlap_comm doubles it); "
            "measured in memcalc/validate/deepspeed.py"))
    if states.grad_copy:
        components.insert(3, Component(
            "optimizer_grad_copy", f"Optimizer gradient copy ({recipe.optimizer_grad_copy.value})", states.grad_copy,
            Kind.STATIC, text(f"P x {recipe.optimizer_grad_copy.value}", parallel.shards_optimizer), recipe.source,
            where))
    if step.accumulation_buffer:
        components.insert(4, Component(
            "gradient_accumulation", "Gradient accumulation buffer (fp32)", step.accumulation_buffer, Kind.STATIC,
            text("P x fp32", parallel.shards_gradients), "DeepSpeed BF16_Optimizer (fp32 gradient accumulation); "
            "nanotron", where))
    if working.total:
        units, gathered = working.units, working.gathered
        if working.fsdp2:
            ends = (f"root {units.ends / 1e6:,.0f}M" if parallel.fsdp_wrap is FSDPWrap.LAYER else
                    f"embedding {units.embedding / 1e6:,.0f}M, head {units.head / 1e6:,.0f}M")
            formula = (f"FSDP2 units ({ends}, layer {units.largest_layer / 1e6:,.0f}M params) gathered x "
                       f"{states.base_recipe.weight_dtype.value}, reduce-scattered x {recipe.grad_dtype.value}: "
                       "the largest of their moments (docs/parallelism.md sec. 3)")
        else:
            prefetch = f"(1 + {parallel.prefetch} prefetched) x " if gathered else ""
            parts = ([f"{prefetch}{working.unit / 1e6:,.0f}M-param largest unit x {recipe.weight_dtype.value}"]
                     if gathered else [])
            if working.unit_gradients:
                parts.append(f"its unsharded grads x {recipe.weight_dtype.value}")
            formula = " + ".join(parts)
            if parallel.deepspeed_zero3:  # here DeepSpeed's coordinator is not simulated (memcalc.estimate.zero3)
                why = "MoE experts" if held.experts.total > 0 else f"{recipe.name}"
                formula += (f" (rule of thumb for {why}: DeepSpeed's stage-3 coordinator is simulated and measured "
                            "for dense models in bf16/fp16 with fp32 master weights only)")
        components.append(Component(
            "sharding_working_set", "Sharding working set", max(working.total, gathered), Kind.DYNAMIC, formula,
            "DeepSpeed ZeRO-3 (estimate_zero3_model_states_mem_needs: 4 B x largest layer); FSDP2 "
            "(torch.distributed.fsdp.fully_shard), measured in memcalc/validate/fsdp.py",
        ))
    if peaks.offloaded:  # activation offloading's pinned copies: host memory, beside the GPU's activations
        from memcalc.estimate.offload import offloaded_component

        at = next(index for index, component in enumerate(components) if component.key == "activations") + 1
        components.insert(at, offloaded_component(peaks.offloaded, settings))
    return components


def _rank_view(model: ModelConfig, settings: TrainSettings, parallel: ParallelConfig, recipe: PrecisionRecipe,
               seq_len: int, stage: StageLayers) -> RankView:
    """One rank's step in named stages: static states, the optimizer step, activation peaks, the
    sharding working set, the phases, then the breakdown rows."""
    plan = _stage_plan(model, parallel, stage, seq_len)
    states = _static_states(model, settings, parallel, recipe, stage, plan)
    step = _step_costs(model, settings, parallel, states)
    peaks, megatron = _activation_peaks(model, settings, parallel, plan, states, seq_len)
    if _zero3_simulates(model, parallel, states.base_recipe):
        # DeepSpeed's stage-3 optimizer and parameter coordinator, as measured (memcalc.estimate.zero3)
        phases, components = _zero3().rank_parts(model, settings, parallel, states, step, peaks)
    else:
        working = _working_set(model, parallel, stage, states, settings.lora_rank is not None)
        phases, persistent = _phases(settings, parallel, states, step, peaks, working)
        components = _components(settings, parallel, states, step, peaks, working, persistent)
    references = ()
    if megatron is not None:
        references = (Component("activations_megatron", "Activations, Megatron formula (reference)", megatron.forward,
                                Kind.DYNAMIC, megatron.formula, megatron.source),)
    name = ("all ranks" if parallel.pp == 1 else "first stage" if stage.first else "last stage" if stage.last
            else f"middle stage {stage.rank}")
    parameters = states.held.total + (count_params(model).total if settings.lora_rank is not None else 0)
    return RankView(name, stage.rank, parameters, tuple(components), phases, references)


def _linear_weight_names(model: ModelConfig) -> frozenset[str]:
    """Names of the linear layers' weights inside the decoder layers (attention, MLP and expert
    projections), which FP8 recipes store their own way."""
    from memcalc.estimate.weights import linear_weights

    return frozenset(shape.name for shape in linear_weights(model))


def _gemm_states(model: ModelConfig, recipe: PrecisionRecipe, settings: TrainSettings, held, per_rank,
                 parallel: ParallelConfig):
    """Weights, gradients, master weights and (Adam) moments of a recipe that keeps linear-layer
    weights its own way (memcalc.precision.GemmWeights); every other parameter follows the
    recipe's dtypes. ``settings.fp8_transpose`` (Hopper and Ada; not Blackwell) adds the FP8
    transpose copy."""
    from fractions import Fraction
    from math import ceil

    gemm = recipe.gemm
    linear_names = _linear_weight_names(model)

    def split(inventory) -> tuple[int, int]:
        linear = sum(group.total for group in inventory.groups if group.name in linear_names)
        return linear, inventory.total - linear

    dense, experts = split(held.dense), split(held.experts)

    def mixed(rest_bytes: Fraction, linear_bytes: Fraction, sharded: bool) -> int:
        def total(linear_rest):
            linear, rest = linear_rest
            return ceil(rest * rest_bytes + linear * linear_bytes)
        return per_rank(total(dense), total(experts), sharded)

    def size(dtype) -> Fraction:
        return Fraction(BITS_PER_ELEMENT[dtype], 8) if dtype is not None else Fraction(0)

    copies = gemm.weight + gemm.copies + (gemm.transpose if settings.fp8_transpose else 0)
    weights = mixed(size(recipe.weight_dtype), copies, parallel.shards_params)
    gradients = mixed(size(recipe.grad_dtype), gemm.gradient, parallel.shards_gradients)
    master = mixed(size(recipe.master_dtype), gemm.master, parallel.shards_optimizer)
    moments = None
    if settings.optimizer in (Optimizer.ADAMW, Optimizer.ADAM):
        moments = mixed(2 * size(recipe.optimizer_state_dtype), gemm.first_moment + gemm.second_moment,
                        parallel.shards_optimizer)
    return weights, gradients, master, moments


def _matrices(local: ModelConfig, held, ep: int) -> list[tuple[int, int, int]]:
    """The dense matrices (``(d_in, d_out, count)``) of a rank's TP-local stage, for Adafactor's
    factored moments; experts are sharded by EP and counted with their own inventory."""
    from memcalc.estimate.weights import embedding_weights, linear_weights

    names = {group.name for group in held.dense.groups}
    return [(shape.d_in, shape.d_out, shape.count) for shape in (*linear_weights(local), *embedding_weights(local))
            if shape.name in names and not shape.name.startswith("layers.moe.experts.")]


def _sharding_text(parallel: ParallelConfig, has_experts: bool) -> str:
    """How a sharded state is divided, e.g. `` / 8 ranks`` (experts over the expert-DP group)."""
    text = f" / {parallel.dense_shards}" if parallel.dense_shards > 1 else ""
    if has_experts and parallel.expert_shards != parallel.dense_shards:
        text += f" (experts / {parallel.expert_shards})"
    return text


# A micro-batch beyond this many tokens holds petabytes on any model: refused rather than printed
MAX_STEP_TOKENS = 2**32


def _checked_step(model: ModelConfig, settings: TrainSettings,
                  parallel: ParallelConfig) -> tuple[ModelConfig, PrecisionRecipe, int]:
    """What every training estimate starts from: the model with the step's dropout rates, the
    recipe and sequence length, and the refusals of what is not modelled."""
    model = with_dropout(model, settings)
    check_trainable(model)
    recipe = resolve_recipe(settings, parallel)
    check_mamba_training(model, settings, parallel, recipe)
    check_recompute(model, settings, parallel, recipe)
    if settings.offload_activations:
        from memcalc.estimate.offload import check_offload

        check_offload(model, parallel)
    seq_len = resolve_seq_len(model, settings.seq_len)
    if settings.batch_size * seq_len > MAX_STEP_TOKENS:
        raise SettingsError(Field("batch_size"), " x ", Field("seq_len"), f" = {settings.batch_size * seq_len:,} "
                            f"tokens a micro-batch: more than 2^32, orders of magnitude beyond any device's memory")
    check_layout(model, parallel, seq_len, settings.attention)
    return model, recipe, seq_len


def estimate_training(model: ModelConfig, settings: TrainSettings, parallel: ParallelConfig | None = None) -> Estimate:
    """Memory of one training step on the most loaded rank of ``parallel`` (one device by default)."""
    parallel = parallel or ParallelConfig()
    model, recipe, seq_len = _checked_step(model, settings, parallel)
    params = count_params(model)
    candidates = tuple(_rank_view(model, settings, parallel, recipe, seq_len, stage_layers(model, parallel, rank))
                       for rank in pipeline_ranks(parallel, model))
    busiest = max(candidates, key=lambda view: view.total)
    # the ends are always reported; a middle rank (uneven stages, or stages of other layer kinds)
    # when it is the busiest
    views = tuple(view for view in candidates if view.pipeline_rank in (0, parallel.pp - 1) or view is busiest)

    num_params = params.total
    weights = storage_bytes(num_params, recipe.weight_dtype)
    master = storage_bytes(num_params, recipe.master_dtype) if recipe.master_dtype else 0
    moments = optimizer_state_bytes(settings.optimizer, params, recipe.optimizer_state_dtype)
    checkpoint = (
        Component("weights_only", "Weights only", weights, Kind.STATIC, f"P x {recipe.weight_dtype.value}", recipe.source),
        Component("training", "Resumable (weights + master + optimizer)", weights + master + moments, Kind.STATIC,
                  "weights + master weights + optimizer states", "DeepSpeed / Megatron-LM checkpoint layout"),
    )
    lora = None
    if settings.lora_rank is not None:
        lora = _lora().summary(model, settings, recipe)
        checkpoint = (
            Component("weights_only", "Adapters only (adapter_model.safetensors)", lora.adapter_bytes, Kind.STATIC,
                      f"{lora.trainable_params:,} adapter params x {settings.lora_dtype.value}", _lora().PEFT),
            Component("training", "Resumable (adapters + master + optimizer)",
                      lora.adapter_bytes + sum(c.bytes for c in busiest.components
                                                  if c.key in ("master_weights", "optimizer_states")), Kind.STATIC,
                      "adapters + their master copy + optimizer states (the frozen base is not saved)",
                      "PEFT save_pretrained; transformers Trainer checkpoints"),
        )
    resolved = TrainAssumptions(
        dtype=settings.dtype, precision=recipe.name, master_weights=recipe.master_dtype is not None,
        optimizer=settings.optimizer, optimizer_impl=settings.optimizer_impl,
        optimizer_state_dtype=recipe.optimizer_state_dtype, batch_size=settings.batch_size, seq_len=seq_len,
        recompute=settings.recompute, attention=settings.attention, activation_model=settings.activation_model,
        loss=settings.loss, activation_dtype=recipe.activation_dtype,
        optimizer_in_backward=settings.optimizer_in_backward, grad_accum=settings.grad_accum,
        paged_optimizer=settings.paged_optimizer, expandable_segments=settings.expandable_segments, lora=lora,
        parallel=None if parallel.is_single_device else _layout_summary(model, parallel, busiest, recipe),
        recompute_layers=settings.recompute_layers, offload_activations=settings.offload_activations,
        sac_outputs=sac_outputs(model, settings),
        dropout=_dropout_sites(model), reserve_percent=settings.reserve_percent, reserve_source=settings.reserve_source,
    )
    return Estimate(model, params, resolved, busiest.components, references=busiest.references,
                    checkpoint=checkpoint, phases=busiest.phases, ranks=views if not parallel.is_single_device else ())


def estimate_pipeline_rank(model: ModelConfig, settings: TrainSettings, parallel: ParallelConfig,
                           rank: int) -> RankView:
    """One pipeline rank's step, whichever rank (``estimate_training`` reports the ends and the
    busiest); what ``memcalc.validate.pipeline`` measures."""
    model, recipe, seq_len = _checked_step(model, settings, parallel)
    if not 0 <= rank < parallel.pp:
        raise InputError(f"pipeline rank {rank} is not one of the {parallel.pp} ranks")
    return _rank_view(model, settings, parallel, recipe, seq_len, stage_layers(model, parallel, rank))


def _layout_summary(model: ModelConfig, parallel: ParallelConfig, busiest: RankView,
                    recipe: PrecisionRecipe) -> LayoutSummary:
    simulated = _zero3_simulates(model, parallel, recipe)
    return LayoutSummary(
        gpus=parallel.gpus, dp=parallel.dp, tp=parallel.tp, pp=parallel.pp, cp=parallel.cp, ep=parallel.ep,
        sp=parallel.sp, zero=parallel.zero, distributed_optimizer=parallel.distributed_optimizer, vpp=parallel.vpp,
        microbatches=parallel.microbatches, offload=parallel.offload, tp_impl=parallel.tp_impl, fsdp=parallel.fsdp,
        fsdp_wrap=parallel.fsdp_wrap, dense_shards=parallel.dense_shards if parallel.shards_optimizer else 1,
        expert_shards=parallel.expert_shards if parallel.shards_optimizer and model.moe else 1,
        vocab_size_padded=padded_vocab(model, parallel),
        prefetch_units=parallel.prefetch if parallel.shards_params else 0,
        inflight_chunks={stage: inflight_chunks(parallel, stage) for stage in pipeline_ranks(parallel)},
        most_loaded_rank=busiest.name,
        reduce_bucket_size=parallel.reduce_bucket_size if parallel.deepspeed_buckets or simulated else None,
        zero3=_zero3().knobs_of(parallel) if simulated else None,
    )


def _moment_formula(optimizer: str, moments: int, state_dtype: str) -> str:
    if optimizer == "adafactor":
        return f"(rows + cols) per matrix + vectors, x {state_dtype}"
    if moments == 0:
        return f"none ({optimizer})"
    if optimizer == "adam8bit":
        return "P x 2 x (1 B + 4 B/256), fp32 below 4096 el."
    return f"P x {moments} x {state_dtype}"


def _megatron_formula(recompute: Recompute, element_bytes: int, parallel: ParallelConfig | None = None) -> str:
    tp = parallel.tp if parallel else 1
    sp = parallel is not None and parallel.sp
    t = f"/{tp}" if tp > 1 else ""
    stream = t if sp else ""
    output = f" + {2 * element_bytes}sbh{stream} + 4sbV{t}"
    if recompute is Recompute.FULL:
        return f"L x {element_bytes}sbh{stream}{output}"
    replicated, split = 4 * element_bytes + 2, 12 * element_bytes
    if tp == 1:
        layer = f"{replicated + split}"
    elif sp:
        layer = f"{replicated + split}/{tp}"
    else:
        layer = f"{replicated} + {split}/{tp}"
    if recompute is Recompute.SELECTIVE:
        return f"L x {layer}sbh{output}" if tp == 1 else f"L x sbh({layer}){output}"
    scores = f"{2 * element_bytes + 1}as/h" if tp == 1 else f"{2 * element_bytes + 1}as/({tp}h)"
    return f"L x sbh({layer} + {scores}){output}"
