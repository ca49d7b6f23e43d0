"""Memory of one training step on one device (no parallelism yet): model states plus activations."""

from __future__ import annotations

from memcalc.config import ModelConfig, TrainSettings, resolve_seq_len
from memcalc.dtypes import BITS_PER_ELEMENT, storage_bytes
from memcalc.estimate.activations import megatron_layer_activation_bytes, output_layer_activation_bytes
from memcalc.estimate.breakdown import Component, Estimate, Kind
from memcalc.estimate.optimizer import MOMENTS_PER_PARAM, optimizer_state_bytes
from memcalc.estimate.params import count_params
from memcalc.precision import recipe_for

KORTHIKANTI = "Korthikanti et al. 2022 (arXiv:2205.05198)"


def estimate_training(model: ModelConfig, settings: TrainSettings) -> Estimate:
    params = count_params(model)
    recipe = recipe_for(settings.dtype, settings.master_weights)
    seq_len = resolve_seq_len(model, settings.seq_len)
    batch = settings.batch_size
    element_bytes = BITS_PER_ELEMENT[recipe.activation_dtype] // 8
    num_params = params.total

    weights = storage_bytes(num_params, recipe.weight_dtype)
    gradients = storage_bytes(num_params, recipe.grad_dtype)
    master = storage_bytes(num_params, recipe.master_dtype) if recipe.master_dtype else 0
    moments = optimizer_state_bytes(settings.optimizer, params, recipe.optimizer_state_dtype)
    per_layer = megatron_layer_activation_bytes(
        seq_len, batch, model.hidden_size, model.num_attention_heads, element_bytes, settings.recompute
    )
    output_layer = output_layer_activation_bytes(seq_len, batch, model.hidden_size, model.vocab_size, element_bytes)

    moment_text = _moment_formula(settings.optimizer.value, MOMENTS_PER_PARAM[settings.optimizer], recipe.optimizer_state_dtype.value)
    components = (
        Component("weights", "Weights", weights, Kind.STATIC,
                  f"P x {recipe.weight_dtype.value}", recipe.source),
        Component("master_weights", "Master weights (fp32)", master, Kind.STATIC,
                  "P x fp32" if master else f"none ({recipe.name})", recipe.source),
        Component("optimizer_states", "Optimizer states", moments, Kind.STATIC, moment_text,
                  "torch.optim / bitsandbytes state layout"),
        Component("gradients", "Gradients", gradients, Kind.DYNAMIC,
                  f"P x {recipe.grad_dtype.value}", recipe.source),
        Component("activations", "Activations", per_layer * model.num_layers, Kind.DYNAMIC,
                  _activation_formula(settings.recompute.value, element_bytes), f"{KORTHIKANTI} sec. 4.1, 5"),
        Component("logits", "Output layer + loss", output_layer, Kind.DYNAMIC,
                  f"{2 * element_bytes}sbh + 4sbV (fp32 logits)", f"{KORTHIKANTI} sec. 4.3"),
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
        "optimizer_state_dtype": recipe.optimizer_state_dtype.value,
        "batch_size": batch,
        "seq_len": seq_len,
        "recompute": settings.recompute.value,
        "activation_model": "megatron",
        "activation_dtype": recipe.activation_dtype.value,
    }
    return Estimate(model, params, resolved, components, checkpoint=checkpoint)


def _moment_formula(optimizer: str, moments: int, state_dtype: str) -> str:
    if moments == 0:
        return f"none ({optimizer})"
    if optimizer == "adam8bit":
        return "P x 2 x (1 B + 4 B/256), fp32 below 4096 el."
    return f"P x {moments} x {state_dtype}"


def _activation_formula(recompute: str, element_bytes: int) -> str:
    if recompute == "full":
        return f"L x {element_bytes}sbh (layer inputs)"
    mask_and_tensors = 16 * element_bytes + 2
    if recompute == "selective":
        return f"L x {mask_and_tensors}sbh"
    return f"L x sbh({mask_and_tensors} + {2 * element_bytes + 1}as/h)"
