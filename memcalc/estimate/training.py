"""Memory of one training step on one device (no parallelism yet).

The step is modelled as the sequence a framework runs: forward (activations accumulate), backward
(activations are freed as gradients appear), optimizer step (temporaries beside the gradients).
``memory.total`` is the largest of the three phase peaks; each phase's peak is built from the
components below, so the breakdown and the total come from one model.
"""

from __future__ import annotations

from dataclasses import dataclass

from memcalc.config import Loss, ModelConfig, Optimizer, Recompute, TrainSettings, resolve_seq_len
from memcalc.dtypes import BITS_PER_ELEMENT, storage_bytes
from memcalc.estimate.activations import (
    FP32_BYTES,
    INDEX_BYTES,
    ActivationShape,
    attention_saved_bytes,
    linear_weight_elements_per_layer,
    megatron_layer_activation_bytes,
    mlp_saved_bytes,
    norm_saved_bytes,
    output_layer_activation_bytes,
)
from memcalc.estimate.breakdown import Component, Estimate, Kind
from memcalc.estimate.optimizer import MOMENTS_PER_PARAM, optimizer_state_bytes
from memcalc.estimate.params import ParamInventory, count_params, parameter_sizes_in_order
from memcalc.precision import PrecisionRecipe, recipe_for

KORTHIKANTI = "Korthikanti et al. 2022 (arXiv:2205.05198)"
# Tokens per slice of the chunked loss (memcalc.validate.model.LOSS_CHUNK_TOKENS runs the same).
LOSS_CHUNK_TOKENS = 1024
AUTOGRAD = "PyTorch autograd saved tensors of the Hugging Face block (docs/formulas.md sec. 3.4)"


def _bytes(dtype) -> int:
    return BITS_PER_ELEMENT[dtype] // 8


@dataclass(frozen=True)
class ActivationPeaks:
    """Activation bytes (live bytes other than parameters, optimizer states and accumulated
    gradients) at the peak of forward and of backward, and the extra live bytes at the end of
    backward when every gradient exists."""

    forward: int
    backward: int
    end_of_backward_extra: int
    formula: str
    source: str


def _arch_peaks(model: ModelConfig, settings: TrainSettings, recipe: PrecisionRecipe, seq_len: int) -> ActivationPeaks:
    e = _bytes(recipe.activation_dtype)
    grad_bytes = _bytes(recipe.grad_dtype)
    shape = ActivationShape(
        tokens=seq_len * settings.batch_size, seq_len=seq_len, batch_size=settings.batch_size,
        element_bytes=e, stream_bytes=_bytes(recipe.weight_dtype) if recipe.autocast else e, autocast=recipe.autocast,
    )
    tokens, h, vocab = shape.tokens, model.hidden_size, model.vocab_size
    recompute = settings.recompute
    eager = settings.attention.value == "eager"
    attention = "eager" if eager else "sdpa"
    scores = model.num_attention_heads * seq_len * seq_len * settings.batch_size if eager else 0
    # bytes of the fp32 copy a 16-bit tensor gets before a softmax or the loss (none when already fp32)
    upcast = 0 if e == FP32_BYTES else FP32_BYTES
    # eager softmax in fp32: the raw and masked scores in the compute dtype, the fp32 copy of the
    # masked scores and the fp32 softmax output; plus the causal mask: the filled square and its
    # upper triangle, both in the compute dtype
    scores_forward = scores * (2 * e + upcast + FP32_BYTES) + (2 * e * seq_len * seq_len if eager else 0)
    stream = tokens * h * shape.stream_bytes
    full = recompute is Recompute.FULL

    def layer(moe_layer: bool) -> tuple[int, int, int, int]:
        """(saved by the layer, saved before its attention scores, its MLP part, its backward transient)."""
        # a fully recomputed layer saves, while it runs backward, what it would save without recompute
        attention_part = attention_saved_bytes(model, shape, attention, Recompute.NONE if full else recompute)
        mlp_part = mlp_saved_bytes(model, shape, moe_layer)
        saved = attention_part + mlp_part
        if recipe.autocast:
            saved += e * linear_weight_elements_per_layer(model, moe_layer)
        q_width = model.num_attention_heads * model.attention_head_dim
        before_scores = attention_part - tokens * q_width * e - (0 if eager else FP32_BYTES * tokens * model.num_attention_heads)
        if eager and (recompute is Recompute.NONE or full):
            before_scores -= scores * (FP32_BYTES + (e if e != FP32_BYTES else 0))
        transient = _mlp_backward_transient(model, shape, moe_layer, grad_bytes)
        return saved, before_scores, mlp_part, transient

    # dense layers come first (MoE's first_dense_layers), then MoE layers
    is_moe = [False] * (model.num_layers - model.num_moe_layers) + [True] * model.num_moe_layers
    by_kind = {kind: layer(kind) for kind in set(is_moe)}
    last_saved, last_before_scores, last_mlp, _last_transient = by_kind[is_moe[-1]]
    # Checkpointed layers keep only their input; the layer being recomputed holds all of its own.
    layers = model.num_layers * stream if full else sum(by_kind[kind][0] for kind in is_moe)
    others = layers - (stream if full else last_saved)

    embedding = INDEX_BYTES * tokens * 2  # token ids and labels
    head_weight_copy = e * vocab * h if recipe.autocast else 0
    final = norm_saved_bytes(model, h, shape) + tokens * h * e + head_weight_copy
    saved = embedding + layers + final

    # Logits: the matmul output, its fp32 upcast for the loss (unless already fp32), the fp32
    # log-softmax output the cross-entropy keeps (transformers' ForCausalLMLoss upcasts first).
    logits = tokens * vocab
    head_grad = vocab * h * grad_bytes
    if settings.loss is Loss.CHUNKED:
        # One slice at a time, run without saving: its logits in fp32 and their log-softmax.
        chunk = min(LOSS_CHUNK_TOKENS, tokens)
        forward = saved + chunk * vocab * 2 * FP32_BYTES
        # Backward recomputes each slice: its loss gradients, the full-size gradient of the hidden
        # states, and the head-weight gradients of earlier slices waiting to be summed.
        gradient_of_hidden = tokens * h * e
        several = tokens > chunk
        waiting = head_grad if several else 0
        # summing a slice's head-weight gradient into the earlier ones': both and their sum
        summing = (3 if several else 1) * head_grad
        backward_output = max(chunk * vocab * 3 * FP32_BYTES + waiting + gradient_of_hidden,
                              summing + gradient_of_hidden + chunk * h * e)
    else:
        forward = saved + logits * (e + upcast + FP32_BYTES)
        # Backward opens with the loss gradients: log-softmax output + its gradient + the logits'
        # fp32 gradient; then the output layer's weight gradient exists before it is accumulated.
        backward_output = max(logits * 3 * FP32_BYTES, logits * e + head_grad)
    if eager and recompute is not Recompute.FULL:
        forward = max(forward, embedding + others + last_before_scores + scores_forward)
    if full:
        # a layer run without saving: its MLP intermediates (activation, up, product) at once
        forward = max(forward, embedding + layers + 3 * e * tokens * _mlp_width(model) + scores_forward)

    backward = saved + backward_output
    # A tied weight waits for the embedding's gradient: its head gradient stays until the end of backward.
    held = head_grad if model.tie_word_embeddings else 0
    # Inside each layer backward reaches (recomputed first under full recompute): its MLP's
    # gradients, then its attention's (eager: gradients of the scores, fp32 softmax gradients).
    # Layers of one kind peak at the last of them, which backward reaches with the most still saved.
    incoming = tokens * h * e
    # a Gemma-2 style norm after the MLP has run its backward (and freed its inputs) by then
    after_mlp_norm = norm_saved_bytes(model, h, shape) if model.norms_per_layer >= 4 else 0
    below = 0  # saved by the layers before this one
    for index, kind in enumerate(is_moe):
        layer_saved, _before_scores, _mlp, layer_transient = by_kind[kind]
        if index + 1 == len(is_moe) or is_moe[index + 1] != kind:
            base = embedding + below + held + incoming
            backward = max(backward, base + layer_saved - after_mlp_norm + layer_transient)
        below += stream if full else layer_saved
    in_layer = embedding + others + held + incoming
    if eager:
        recomputed_scores = scores * (FP32_BYTES + e) if recompute is Recompute.SELECTIVE else 0
        score_gradients = scores * (e + FP32_BYTES)
        backward = max(backward, in_layer + last_saved - last_mlp + max(recomputed_scores + score_gradients,
                                                                          scores_forward if recomputed_scores else 0))
    # At the end of backward a tied weight holds the head gradient, the embedding gradient and their sum.
    end_extra = 2 * head_grad if model.tie_word_embeddings else 0
    if model.tie_word_embeddings:
        backward = max(backward, 3 * head_grad)
    return ActivationPeaks(forward, backward, end_extra, "autograd saved tensors + loss", AUTOGRAD)


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
    return grad_bytes * h * model.intermediate_size + e * tokens * model.intermediate_size


def _megatron_peaks(model: ModelConfig, settings: TrainSettings, recipe: PrecisionRecipe, seq_len: int) -> ActivationPeaks:
    e = _bytes(recipe.activation_dtype)
    per_layer = megatron_layer_activation_bytes(
        seq_len, settings.batch_size, model.hidden_size, model.num_attention_heads, e, settings.recompute
    )
    total = per_layer * model.num_layers + output_layer_activation_bytes(
        seq_len, settings.batch_size, model.hidden_size, model.vocab_size, e
    )
    return ActivationPeaks(total, total, 0, _megatron_formula(settings.recompute, e), f"{KORTHIKANTI} sec. 4.1, 4.3, 5")


def optimizer_step_temporaries(
    model: ModelConfig, settings: TrainSettings, recipe: PrecisionRecipe, params: ParamInventory
) -> int:
    """Bytes the optimizer step allocates beyond the gradients it reads (torch.optim, PyTorch 2.x).

    foreach Adam/AdamW: one state-sized list (``_foreach_sqrt`` of the second moment); the
    for-loop version: two temporaries the size of the largest tensor; fused kernels and SGD:
    none. A master-weight recipe first turns each 16-bit gradient into an fp32 one."""
    num_params = params.total
    largest = max(group.numel for group in params.groups)
    state_bytes = _bytes(recipe.optimizer_state_dtype)
    temporaries = 0
    if settings.optimizer in (Optimizer.ADAMW, Optimizer.ADAM):
        temporaries = {"foreach": num_params * state_bytes, "for-loop": 2 * largest * state_bytes, "fused": 0}[
            settings.optimizer_impl.value
        ]
    if recipe.master_dtype is None:
        return temporaries
    master, grad = _bytes(recipe.master_dtype), _bytes(recipe.grad_dtype)
    # Converting gradient by gradient in parameter order: after tensor k, the fp32 gradients of
    # tensors 1..k and the 16-bit gradients of tensors k..N exist (tensor k's in both).
    conversion, converted = 0, 0
    for size in parameter_sizes_in_order(model):
        conversion = max(conversion, master * (converted + size) - grad * converted)
        converted += size
    return max(conversion, (master - grad) * num_params + temporaries)


def estimate_training(model: ModelConfig, settings: TrainSettings) -> Estimate:
    params = count_params(model)
    recipe = recipe_for(settings.dtype, settings.master_weights, settings.precision)
    seq_len = resolve_seq_len(model, settings.seq_len)
    num_params = params.total

    weights = storage_bytes(num_params, recipe.weight_dtype)
    gradients = storage_bytes(num_params, recipe.grad_dtype)
    master = storage_bytes(num_params, recipe.master_dtype) if recipe.master_dtype else 0
    moments = optimizer_state_bytes(settings.optimizer, params, recipe.optimizer_state_dtype)
    peaks = (_megatron_peaks if settings.activation_model.value == "megatron" else _arch_peaks)(
        model, settings, recipe, seq_len
    )
    step_temporaries = optimizer_step_temporaries(model, settings, recipe, params)
    static = weights + master + moments
    phases = {
        "forward": static + peaks.forward,
        "backward": static + max(peaks.backward, gradients + peaks.end_of_backward_extra),
        "optimizer_step": static + gradients + step_temporaries,
    }
    activations = max(peaks.forward, peaks.backward)

    moment_text = _moment_formula(settings.optimizer.value, MOMENTS_PER_PARAM[settings.optimizer], recipe.optimizer_state_dtype.value)
    components = (
        Component("weights", "Weights", weights, Kind.STATIC, f"P x {recipe.weight_dtype.value}", recipe.source),
        Component("master_weights", "Master weights (fp32)", master, Kind.STATIC,
                  "P x fp32" if master else f"none ({recipe.name})", recipe.source),
        Component("optimizer_states", "Optimizer states", moments, Kind.STATIC, moment_text,
                  "torch.optim / bitsandbytes state layout"),
        Component("gradients", "Gradients", gradients, Kind.DYNAMIC, f"P x {recipe.grad_dtype.value}", recipe.source),
        Component("activations", "Activations (peak)", activations, Kind.DYNAMIC, peaks.formula, peaks.source),
        Component("optimizer_step_temporaries", "Optimizer step temporaries", step_temporaries, Kind.DYNAMIC,
                  f"{settings.optimizer.value} ({settings.optimizer_impl.value})", "torch.optim implementations"),
    )
    checkpoint = (
        Component("weights_only", "Weights only", weights, Kind.STATIC, f"P x {recipe.weight_dtype.value}", recipe.source),
        Component("training", "Resumable (weights + master + optimizer)", weights + master + moments, Kind.STATIC,
                  "weights + master weights + optimizer states", "DeepSpeed / Megatron-LM checkpoint layout"),
    )
    resolved = {
        "dtype": settings.dtype.value,
        "precision": recipe.name,
        "master_weights": recipe.master_dtype is not None,
        "optimizer": settings.optimizer.value,
        "optimizer_impl": settings.optimizer_impl.value,
        "optimizer_state_dtype": recipe.optimizer_state_dtype.value,
        "batch_size": settings.batch_size,
        "seq_len": seq_len,
        "recompute": settings.recompute.value,
        "attention": settings.attention.value,
        "activation_model": settings.activation_model.value,
        "loss": settings.loss.value,
        "activation_dtype": recipe.activation_dtype.value,
    }
    return Estimate(model, params, resolved, components, checkpoint=checkpoint, phases=phases)


def _moment_formula(optimizer: str, moments: int, state_dtype: str) -> str:
    if moments == 0:
        return f"none ({optimizer})"
    if optimizer == "adam8bit":
        return "P x 2 x (1 B + 4 B/256), fp32 below 4096 el."
    return f"P x {moments} x {state_dtype}"


def _megatron_formula(recompute: Recompute, element_bytes: int) -> str:
    output = f" + {2 * element_bytes}sbh + 4sbV"
    if recompute is Recompute.FULL:
        return f"L x {element_bytes}sbh{output}"
    mask_and_tensors = 16 * element_bytes + 2
    if recompute is Recompute.SELECTIVE:
        return f"L x {mask_and_tensors}sbh{output}"
    return f"L x sbh({mask_and_tensors} + {2 * element_bytes + 1}as/h){output}"
