"""Memory of one training step on one device (no parallelism yet).

The step is modelled as the sequence a framework runs: forward (activations accumulate), backward
(activations are freed as gradients appear), optimizer step (temporaries beside the gradients).
``memory.total`` is the largest of the three phase peaks; each phase's peak is built from the
components below, so the breakdown and the total come from one model.
"""

from __future__ import annotations

from dataclasses import dataclass

from memcalc.config import ModelConfig, Optimizer, Recompute, TrainSettings, resolve_seq_len
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
from memcalc.estimate.params import ParamInventory, count_params
from memcalc.precision import PrecisionRecipe, recipe_for

KORTHIKANTI = "Korthikanti et al. 2022 (arXiv:2205.05198)"
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
    attention = settings.attention.value

    def layer_bytes(moe_layer: bool) -> int:
        saved = attention_saved_bytes(model, shape, attention, recompute) + mlp_saved_bytes(model, shape, moe_layer)
        if recipe.autocast:
            saved += e * linear_weight_elements_per_layer(model, moe_layer)
        return saved

    dense_layers = model.num_layers - model.num_moe_layers
    full_layers = [layer_bytes(False)] * dense_layers
    if model.num_moe_layers:
        full_layers += [layer_bytes(True)] * model.num_moe_layers
    largest_layer = max(full_layers)
    if recompute is Recompute.FULL:
        # Each checkpointed layer keeps its input; one layer's activations exist while it runs.
        layers = model.num_layers * tokens * h * shape.stream_bytes
        in_layer_extra = largest_layer
    else:
        layers = sum(full_layers)
        in_layer_extra = 0
    embedding = INDEX_BYTES * tokens * 2  # token ids and labels
    head_weight_copy = e * vocab * h if recipe.autocast else 0
    final = norm_saved_bytes(model, h, shape) + tokens * h * e + head_weight_copy
    saved = embedding + layers + final

    # Logits: the matmul output, its fp32 upcast for the loss (unless already fp32), the fp32
    # log-softmax output the cross-entropy keeps (transformers' ForCausalLMLoss upcasts first).
    logits = tokens * vocab
    upcast = 0 if e == FP32_BYTES else FP32_BYTES
    forward = saved + logits * (e + upcast + FP32_BYTES)
    if attention == "eager" and recompute is Recompute.NONE:
        scores = model.num_attention_heads * seq_len * seq_len * settings.batch_size
        # inside the last layer: the raw scores and the masked scores, both in the compute dtype
        forward = max(forward, embedding + layers + 2 * e * scores)
    forward = max(forward, embedding + layers + in_layer_extra)

    head_grad = vocab * h * grad_bytes
    # Backward opens with the loss gradients: log-softmax output + its gradient + the logits' fp32 gradient.
    backward_start = saved + logits * 3 * FP32_BYTES
    # The output layer's weight gradient before it is accumulated; a tied weight waits for the
    # embedding's gradient, so it stays until the end of backward.
    backward_head = saved + logits * e + head_grad + in_layer_extra
    backward = max(backward_start, backward_head)
    # At the end of backward a tied weight holds the head gradient, the embedding gradient and their sum.
    end_extra = 2 * head_grad if model.tie_word_embeddings else 0
    if model.tie_word_embeddings:
        backward = max(backward, 3 * head_grad)
    return ActivationPeaks(forward, backward, end_extra, "autograd saved tensors + loss", AUTOGRAD)


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
    settings: TrainSettings, recipe: PrecisionRecipe, params: ParamInventory
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
    first, last = params.groups[0].numel, params.groups[-1].numel
    # Converting gradient by gradient, in parameter order (embedding first, output head last).
    conversion = max(master * first, (master - grad) * num_params + grad * last)
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
    step_temporaries = optimizer_step_temporaries(settings, recipe, params)
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
