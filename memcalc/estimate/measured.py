"""Estimates whose weights are a measured figure: the exact tensor bytes a checkpoint stores (a GGUF
file's tensor infos, safetensors headers) instead of parameter count x bytes per element.

Inference holds the weights in every phase, so the difference between the measured and the computed
weights moves every phase, the total and the 1.2x reference by the same amount; nothing else changes.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

from memcalc.estimate.assumptions import WeightOrigin
from memcalc.estimate.breakdown import Component, Estimate, Kind

# memcalc.estimate.inference: the 1.2x rule of thumb, rounded up.
_RULE_NUMERATOR, _RULE_DENOMINATOR = 6, 5


def weight_total(estimate: Estimate) -> int:
    """Bytes of the weight lines (``weights``, ``weights_quantised``, ``weights_unquantised``)."""
    return sum(component.bytes for component in estimate.components if component.key.startswith("weights"))


def with_weight_bytes(estimate: Estimate, nbytes: int, formula: str, source: str, *,
                      extra: tuple[Component, ...] = (), whole_model_bytes: int | None = None,
                      settings: dict[str, Any] | None = None) -> Estimate:
    """``estimate`` with its weight lines replaced by one ``weights`` line of ``nbytes``, followed by
    ``extra`` static lines (e.g. a vision tower the estimate has no line for); phases, the rule of
    thumb and the on-disk size (``whole_model_bytes``, default ``nbytes``) follow. ``settings``
    entries are merged into the resolved settings."""
    if nbytes < 0 or any(component.bytes < 0 for component in extra):
        raise ValueError("measured bytes must be non-negative")
    added = nbytes + sum(component.bytes for component in extra)
    delta = added - weight_total(estimate)
    weights = Component("weights", "Weights", nbytes, Kind.STATIC, formula, source)
    components: list[Component] = []
    inserted = False
    for component in estimate.components:
        if not component.key.startswith("weights"):
            components.append(component)
        elif not inserted:  # the measured line takes the place of the first weight line
            components += [weights, *extra]
            inserted = True
    if not inserted:
        components[:0] = [weights, *extra]
    phases = {phase: live + delta for phase, live in estimate.phases.items()}
    references = tuple(
        replace(reference, bytes=-(-added * _RULE_NUMERATOR // _RULE_DENOMINATOR))
        if reference.key == "rule_of_thumb_total" else reference
        for reference in estimate.references
    )
    on_disk = nbytes if whole_model_bytes is None else whole_model_bytes
    checkpoint = tuple(
        replace(component, bytes=on_disk + sum(item.bytes for item in extra), formula=formula)
        if component.key == "weights_only" else component
        for component in estimate.checkpoint
    )
    return replace(estimate, components=tuple(components), phases=phases, references=references,
                   checkpoint=checkpoint, settings=replace(estimate.settings, **(settings or {})))


def describe_counts(prefix: str, counts: dict[str, int]) -> str:
    """``"GGUF tensors: Q4_K x 3.50B, Q6_K x 0.55B, F32 x 0.27M"``: elements by type, largest first."""
    ordered = sorted(counts.items(), key=lambda item: -item[1])
    return f"{prefix}: " + ", ".join(f"{name} x {_count(count)}" for name, count in ordered)


def _count(count: int) -> str:
    if count >= 10**9:
        return f"{count / 1e9:,.2f}B"
    if count >= 10**6:
        return f"{count / 1e6:,.2f}M"
    return f"{count:,}"


def with_stored_weights(estimate: Estimate, stored: Any) -> Estimate:
    """``estimate`` with the weights a checkpoint stores (``memcalc.library.StoredWeights``): a GGUF
    file's tensor bytes, or the language-model part of safetensors headers plus a line for a vision
    tower and projector when they are present and the estimate has none. Under tensor parallelism
    each GPU holds an even share (``ceil(bytes / tp)``; replicated norms are not separated)."""
    tp = estimate.settings.tp
    share = f" / tp {tp} (even split)" if tp > 1 else ""
    extra: tuple[Component, ...] = ()
    if stored.gguf is not None:
        gguf = stored.gguf
        whole = gguf.total_bytes
        formula = describe_counts("GGUF tensors", gguf.params_by_type()) + share
        source = "the file's tensor infos"
        label = f"as stored (GGUF {gguf.file_type_name})" if gguf.file_type_name else "as stored (GGUF)"
    else:
        from memcalc.checkpoint import ModelPart

        parts = stored.checkpoint.split_by_part(estimate.model.num_layers)
        language = parts.get(ModelPart.LANGUAGE_MODEL)
        whole = language.total_bytes if language is not None else 0
        formula = (describe_counts("safetensors tensors", _numel_by_dtype(language)) if language is not None
                   else "no language-model tensors") + share
        source = "the checkpoint's safetensors headers"
        schemes = stored.checkpoint.quantization_schemes()
        label = f"as stored ({', '.join(schemes)})" if schemes else "as stored (safetensors)"
        vision = sum(parts[part].total_bytes for part in (ModelPart.VISION, ModelPart.PROJECTOR) if part in parts)
        has_line = any("vision" in component.key for component in estimate.components)
        if vision and not has_line:
            extra = (Component("vision_checkpoint", "Vision tower + projector (checkpoint)", -(-vision // tp),
                               Kind.STATIC, "vision and projector tensors as stored" + share, source),)
    return with_weight_bytes(estimate, -(-whole // tp), formula, source, extra=extra, whole_model_bytes=whole,
                             settings={"weights": label, "weights_from": WeightOrigin.STORED,
                                       "weights_detail": str(stored.location)})


def _numel_by_dtype(checkpoint: Any) -> dict[str, int]:
    counts: dict[str, int] = {}
    for tensor in checkpoint.tensors:
        counts[tensor.dtype] = counts.get(tensor.dtype, 0) + tensor.numel
    return counts


def measured_fit_report(model, settings, stored: Any, gpu_name: str, gpu_memory: int, utilization: float):
    """``memcalc.estimate.inference.fit_report`` with the stored weights in every estimate it makes."""
    from dataclasses import replace as replace_settings

    from memcalc.estimate.inference import estimate_inference, fit_report

    def estimate_with(changes: dict[str, Any]) -> Estimate:
        return with_stored_weights(estimate_inference(model, replace_settings(settings, **changes)), stored)

    return fit_report(model, settings, gpu_name, gpu_memory, utilization, estimate_with)
