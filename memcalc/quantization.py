"""A checkpoint's storage format from its ``config.json``: ``torch_dtype``/``dtype`` and
``quantization_config`` (transformers' quantizers: mxfp4, fp8, gptq, awq, bitsandbytes,
compressed-tensors), as the default weight format of ``memcalc infer``.

Sources: transformers ``utils/quantization_config.py`` (the keys of each method); gpt-oss's
``modules_to_not_convert`` (attention, router, embedding and head stay bf16); DeepSeek-V3's
``weight_block_size`` [128, 128]; compressed-tensors ``config_groups`` (``num_bits``, ``type``,
``strategy``, ``group_size``).
"""

from __future__ import annotations

from typing import Any

from memcalc.errors import InputError

_DTYPES = {"float32": "fp32", "float16": "fp16", "bfloat16": "bf16", "fp32": "fp32", "fp16": "fp16", "bf16": "bf16"}


def _unquantized_categories(modules: list[str]) -> tuple[str, ...]:
    """memcalc parameter categories whose linear weights a ``modules_to_not_convert`` list keeps
    (routers, embeddings and heads are never quantised by these methods anyway)."""
    keep = []
    if any("attn" in module or "attention" in module for module in modules):
        keep.append("attention")
    if any(module.rstrip(".*").endswith(".mlp") for module in modules):
        keep.append("mlp")
    return tuple(keep)


def _compressed_tensors(config: dict[str, Any]) -> tuple[str | None, int | None, str]:
    groups = config.get("config_groups") or {}
    schemes = [group.get("weights") or {} for group in groups.values() if isinstance(group, dict)]
    if len(schemes) != 1:
        return None, None, f"{len(schemes)} weight schemes"
    weights = schemes[0]
    bits, kind, strategy = weights.get("num_bits"), weights.get("type"), weights.get("strategy")
    group = weights.get("group_size")
    if bits == 8 and kind == "float":
        return ("fp8-block" if strategy == "block" else "fp8"), None, f"fp8 ({strategy})"
    if bits == 4 and kind == "float" and group == 16:
        return "nvfp4", None, "nvfp4 (float 4-bit, groups of 16)"
    if bits == 8 and kind == "int" and strategy == "channel":
        return "int8", None, "int8 per channel"
    return None, None, f"{bits}-bit {kind} ({strategy})"


def checkpoint_format(data: dict[str, Any], notes: list[str]) -> dict[str, Any] | None:
    """``memcalc.config.CheckpointFormat`` fields, or None when the file says nothing. A method
    memcalc does not model is a note, never a silent default."""
    dtype = _DTYPES.get(str(data.get("torch_dtype") or data.get("dtype") or ""))
    config = data.get("quantization_config")
    fields: dict[str, Any] = {"dtype": dtype} if dtype else {}
    if not isinstance(config, dict):
        return fields or None
    method = str(config.get("quant_method", "")).lower()
    weights = group_size = None
    what = f"quantization_config.quant_method {method}"
    modules = config.get("modules_to_not_convert") or config.get("ignore") or []
    if not isinstance(modules, list):
        raise InputError(f"quantization_config.modules_to_not_convert: expected a list of module names, got "
                         f"{modules!r}")
    modules = [str(module) for module in modules]
    if method == "mxfp4":
        weights = "mxfp4"
    elif method == "fp8":
        weights = "fp8-block" if config.get("weight_block_size") else "fp8"
    elif method in ("gptq", "awq"):
        if config.get("bits", 4) == 4:
            weights, group_size = method, config.get("group_size", 128)
        else:
            what += f" with {config.get('bits')} bits"
    elif method == "bitsandbytes":
        if config.get("load_in_4bit"):
            weights = "bnb-fp4" if config.get("bnb_4bit_quant_type") == "fp4" else "bnb-nf4"
        elif config.get("load_in_8bit"):
            weights = "int8"
    elif method == "compressed-tensors":
        weights, group_size, scheme = _compressed_tensors(config)
        what += f" ({scheme})"
    if weights is None:
        notes.append(f"{what} is not modelled: weights follow --dtype/--weights, not the checkpoint")
        return fields or None
    fields.update(weights=weights, source=what, unquantized=_unquantized_categories(modules))
    if group_size is not None:
        fields["group_size"] = group_size
    return fields
