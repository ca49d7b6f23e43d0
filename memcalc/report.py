"""Estimates as plain data (the ``--json`` document). Integers are bytes."""

from __future__ import annotations

from typing import Any

from memcalc.config import ModelConfig, config_as_dict
from memcalc.estimate.breakdown import Component, Estimate
from memcalc.estimate.params import count_params


def model_summary(model: ModelConfig) -> dict[str, Any]:
    params = count_params(model)
    return {
        "name": model.name,
        "aliases": list(model.aliases),
        "source": model.source,
        "parameters": params.total,
        "active_parameters": params.active,
        "layers": model.num_layers,
        "hidden_size": model.hidden_size,
        "attention_heads": model.num_attention_heads,
        "kv_heads": model.kv_heads,
        "head_dim": model.attention_head_dim,
        "intermediate_size": model.intermediate_size,
        "vocab_size": model.vocab_size,
        "max_position_embeddings": model.max_position_embeddings,
        "experts": model.moe.num_experts if model.moe else 0,
        "notes": list(model.notes),
    }


def _component_dict(component: Component) -> dict[str, Any]:
    return {
        "key": component.key,
        "label": component.label,
        "bytes": component.bytes,
        "kind": component.kind.value,
        "formula": component.formula,
        "source": component.source,
        "location": component.location,
    }


def fit_document(memory, gpu) -> dict[str, Any]:
    """Whether the device total (memcalc.estimate.device) fits in ``gpu``'s usable capacity."""
    usable = gpu.usable_memory_bytes
    return {"gpu": gpu.name, "gpu_memory": usable, "memory_as_sold": gpu.memory_bytes,
            "required": memory.device_total, "fits": memory.device_total <= usable,
            "free": usable - memory.device_total}


def device_document(memory) -> dict[str, Any]:
    """The terms between the three totals: the allocator's reserve (a percentage of the allocated
    peak, for the kind of workload) and the runtime overhead beyond the peak, in bytes."""
    return {"workload": memory.workload, "fragmentation_percent": memory.fragmentation_percent,
            "expandable_segments": memory.expandable_segments, "allocator_reserve": memory.allocator_reserve,
            "cuda_context": memory.cuda_context, "workspaces": memory.workspaces, "nccl": memory.nccl,
            "nccl_communicators": list(memory.communicators), "managed": memory.managed,
            "reserve_source": memory.reserve_source}


def _rank_dict(view) -> dict[str, Any]:
    return {
        "name": view.name,
        "pipeline_rank": view.pipeline_rank,
        "parameters": view.parameters,
        "memory": {component.key: component.bytes for component in view.components}
        | {"total": view.total, "phases": dict(view.phases), "cpu_total": view.cpu_total},
    }


# How the JSON names where the weights' format came from (settings.weights_from).
_WEIGHT_ORIGIN_TEXT = {"requested": "--weights", "dtype": "--dtype"}


def settings_document(assumptions) -> dict[str, Any]:
    """An estimate's resolved assumptions (memcalc.estimate.assumptions) as JSON values: enums as
    their values, nested summaries as objects, pipeline ranks as string keys. Training under one
    device has ``parallel: null`` left out, as does ``lora`` without adapters."""
    from dataclasses import fields

    document = {item.name: _json_value(getattr(assumptions, item.name)) for item in fields(assumptions)}
    if "weights_from" in document:
        detail = document.pop("weights_detail")
        document["weights_from"] = _WEIGHT_ORIGIN_TEXT.get(document["weights_from"], detail)
    for optional in ("lora", "parallel"):
        if optional in document and document[optional] is None:
            del document[optional]
    return document


def _json_value(value: Any) -> Any:
    from dataclasses import fields, is_dataclass
    from enum import Enum

    if isinstance(value, Enum):
        return value.value
    if is_dataclass(value):
        return {item.name: _json_value(getattr(value, item.name)) for item in fields(value)}
    if isinstance(value, dict):
        return {str(key): _json_value(item) for key, item in value.items()}
    if isinstance(value, tuple | list):
        return [_json_value(item) for item in value]
    return value


def estimate_document(command: str, estimate: Estimate, gpu=None) -> dict[str, Any]:
    """``memory`` holds each component's bytes and three totals, one meaning each in every command:
    ``peak_allocated`` (= ``total``: live tensors at the largest of ``memory.phases``, whose name
    is ``peak_phase``), ``peak_reserved`` (what the caching allocator holds then) and
    ``device_total`` (reserved + CUDA context + workspaces + NCCL buffers: what must fit), with
    their terms in ``device``. Reference figures such as ``rule_of_thumb_total`` sit beside
    them. Under a parallel layout ``memory`` is the most loaded GPU's and ``ranks`` lists every
    distinct rank (the first and last pipeline stage); ``memory.cpu_total`` is host memory per GPU's
    process when state is offloaded. ``fits`` appears when a GPU is given."""
    from memcalc.estimate.device import device_memory

    device = device_memory(estimate)
    memory: dict[str, Any] = {component.key: component.bytes for component in estimate.components}
    memory["total"] = estimate.total
    memory |= {"peak_allocated": device.peak_allocated, "peak_reserved": device.peak_reserved,
               "device_total": device.device_total}
    memory.update({reference.key: reference.bytes for reference in estimate.references})
    if estimate.phases:
        memory["phases"] = dict(estimate.phases)
        memory["peak_phase"] = estimate.peak_phase
    if estimate.cpu_total:
        memory["cpu_total"] = estimate.cpu_total
    document = {
        "command": command,
        "units": "bytes",
        "model": model_summary(estimate.model),
        "settings": settings_document(estimate.settings),
        "memory": memory,
        "device": device_document(device),
        "components": [_component_dict(component) for component in estimate.components],
        "references": [_component_dict(reference) for reference in estimate.references],
        "checkpoint": {component.key: component.bytes for component in estimate.checkpoint},
    }
    if estimate.ranks:
        document["ranks"] = [_rank_dict(view) for view in estimate.ranks]
    if gpu is not None:
        document["fits"] = fit_document(device, gpu)
    return document


def vllm_document(budget) -> dict[str, Any]:
    """vLLM's start-up budget (memcalc.serving), in bytes, with what each term came from."""
    return {
        "total_memory": budget.total_memory, "utilization": budget.utilization, "requested": budget.requested,
        "weights": budget.weights, "rotary_cache": budget.rotary_cache, "activation_peak": budget.activation_peak,
        "activation_from": budget.activation_from, "non_torch": budget.non_torch,
        "non_torch_from": budget.non_torch_from, "kv_cache": budget.kv_cache, "blocks": budget.blocks,
        "tokens": budget.tokens, "block_size": budget.block_size, "max_num_batched_tokens": budget.max_num_batched_tokens,
        "max_model_len": budget.max_model_len, "max_concurrency": round(budget.max_concurrency, 4),
        "cuda_graphs": vllm_graphs_document(budget.cudagraphs), "graph_headroom": budget.graph_headroom,
        "graphs_fit": budget.graphs_fit, "device_total": budget.device_total,
        "profile": vllm_profile_document(budget.profile) if budget.profile is not None else None,
    }


def vllm_profile_document(profile) -> dict[str, Any]:
    """vLLM's profile run by its version's rule (memcalc.serving.VLLMProfile), in bytes."""
    return {
        "version": profile.version, "runner": profile.runner, "sampler": profile.sampler.value,
        "max_num_batched_tokens": profile.tokens, "requests": profile.requests, "logits": profile.logits,
        "vocab": profile.vocab, "forward": profile.forward, "held": profile.held,
        "bytes_per_logit": profile.bytes_per_logit, "buffer": profile.buffer, "moe_workspace": profile.moe_workspace,
        "sampler_peak": profile.sampler_peak,
        "peak": profile.peak, "peak_phase": "sampler" if profile.sampler_wins else "forward",
        "rule": profile.describe(), "source": profile.source, "notes": list(profile.notes),
    }


def vllm_graphs_document(graphs) -> dict[str, Any]:
    """vLLM's CUDA graphs (memcalc.serving.VLLMGraphs), in bytes, with the sizes captured."""
    return {
        "bytes": graphs.bytes, "pool": graphs.pool, "per_size": graphs.per_size, "version": graphs.version,
        "mode": graphs.mode.value, "max_num_seqs": graphs.max_num_seqs,
        "piecewise_sizes": list(graphs.piecewise_sizes), "full_sizes": list(graphs.full_sizes),
        "profiled": graphs.profiled, "profiled_from": graphs.profiled_from, "source": graphs.source,
        "notes": list(graphs.notes),
    }


def sglang_document(budget) -> dict[str, Any]:
    """SGLang's start-up budget (memcalc.serving.SGLangBudget), in bytes."""
    return {
        "version": budget.version, "source": budget.source, "total_memory": budget.total_memory,
        "gpu_mem_mib": budget.gpu_mem_mib, "gpu_mem_from": budget.gpu_mem_from, "tp": budget.tp,
        "chunked_prefill_size": budget.chunked_prefill_size, "cuda_graph_max_bs": budget.cuda_graph_max_bs,
        "piecewise_cuda_graph_max_tokens": budget.piecewise_tokens, "reserved_mib": budget.reserved_mib,
        "mem_fraction_static": budget.mem_fraction_static, "fraction_from": budget.fraction_from,
        "before_load": budget.before_load, "before_load_from": budget.before_load_from,
        "free_before_load": budget.free_before_load, "static": budget.static, "weights": budget.weights,
        "rotary_cache": budget.rotary_cache, "kv_cache": budget.kv_cache, "headroom": budget.headroom,
        "cell_bytes": budget.cell_bytes, "page_size": budget.page_size, "max_total_num_tokens": budget.tokens,
        "k_size": budget.k_size, "v_size": budget.k_size, "max_model_len": budget.max_model_len,
        "max_concurrency": round(budget.max_concurrency, 4), "notes": list(budget.notes),
    }


def trtllm_document(budget) -> dict[str, Any]:
    """TensorRT-LLM's start-up budget (memcalc.serving.TRTLLMBudget), in bytes."""
    return {
        "version": budget.version, "source": budget.source, "total_memory": budget.total_memory,
        "free_gpu_memory_fraction": budget.fraction, "weights": budget.weights,
        "activation_peak": budget.activation_peak, "activation_from": budget.activation_from,
        "non_torch": budget.non_torch, "non_torch_from": budget.non_torch_from, "peak": budget.peak,
        "free": budget.free, "kv_cache": budget.kv_cache, "token_bytes": budget.token_bytes,
        "tokens_per_block": budget.tokens_per_block, "blocks": budget.blocks, "tokens": budget.tokens,
        "max_num_tokens": budget.max_num_tokens, "max_model_len": budget.max_model_len,
        "max_concurrency": round(budget.max_concurrency, 4), "notes": list(budget.notes),
    }


def llamacpp_document(budget) -> dict[str, Any]:
    """llama.cpp's allocation per device (memcalc.serving.LlamaCppBudget), in bytes."""
    devices = [{"name": device.name, "layers": list(device.layers), "output": device.output,
                "weights": device.weights, "kv_cache": device.kv_cache, "compute": device.compute,
                "cuda_context": device.context, "total": device.total} for device in budget.devices]
    return {
        "version": budget.version, "source": budget.source, "n_ctx_requested": budget.n_ctx_requested,
        "n_ctx": budget.n_ctx, "n_ubatch": budget.n_ubatch, "type_k": budget.type_k, "type_v": budget.type_v,
        "flash_attn": budget.flash_attn, "n_gpu_layers": budget.n_gpu_layers,
        "tensor_split": list(budget.tensor_split), "kv_k": budget.kv_k, "kv_v": budget.kv_v,
        "kv_cache": budget.kv_cache, "host_compute": budget.host_compute, "weights_from": budget.weights_from,
        "compute_from": budget.compute_from, "device_memory": budget.device_memory, "fits": budget.fits,
        "devices": devices, "notes": list(budget.notes),
    }


def engine_document(budget) -> tuple[str, dict[str, Any]]:
    """(key, document) of an engine's start-up budget: ``vllm``, ``sglang``, ``trtllm`` or ``llamacpp``."""
    from memcalc.serving import LlamaCppBudget, SGLangBudget, TRTLLMBudget

    if isinstance(budget, SGLangBudget):
        return "sglang", sglang_document(budget)
    if isinstance(budget, TRTLLMBudget):
        return "trtllm", trtllm_document(budget)
    if isinstance(budget, LlamaCppBudget):
        return "llamacpp", llamacpp_document(budget)
    return "vllm", vllm_document(budget)


def allocator_calibration_document(stats, written: str | None = None) -> dict[str, Any]:
    """``memcalc calibrate --json`` of a torch.cuda.memory_stats()/memory_summary() dump."""
    from dataclasses import asdict

    from memcalc.estimate.device import FRAGMENTATION_PERCENT

    document: dict[str, Any] = {"command": "calibrate", "units": "bytes",
                                "measured": asdict(stats) | {"reserve_percent": stats.reserve_percent},
                                "median_reserve_percent": dict(FRAGMENTATION_PERCENT)}
    if written is not None:
        document["written"] = written
    return document


def calibration_document(startup, estimate=None, written: str | None = None) -> dict[str, Any]:
    """``memcalc calibrate --json``: the log's figures, and with a model memcalc's budget on the
    log's GPU twice: with the log's activation peak and non-torch memory, and with its own."""
    from dataclasses import asdict

    document: dict[str, Any] = {"command": "calibrate", "units": "bytes", "measured": asdict(startup)}
    if estimate is not None:
        calibrated, default = estimate
        document["estimate_calibrated"] = vllm_document(calibrated)
        document["estimate"] = vllm_document(default)
    if written is not None:
        document["written"] = written
    return document


def inference_document(estimate: Estimate, fit=None, capacity=None, startup=None) -> dict[str, Any]:
    """``memcalc infer --json``: ``memory.weights`` is the total of the weight lines; ``fits`` when a
    GPU is given (with the largest batch and context and a paged server's KV capacity);
    ``kv_budget`` when ``--kv-budget`` is given; the engine's start-up budget under its name with
    ``--engine vllm|sglang|trtllm|llamacpp``."""
    from dataclasses import asdict

    document = estimate_document("infer", estimate)
    memory = document["memory"]
    memory["weights"] = sum(component.bytes for component in estimate.components if component.key.startswith("weights"))
    if fit is not None:
        document["fits"] = asdict(fit)
    if capacity is not None:
        document["kv_budget"] = asdict(capacity)
    if startup is not None:
        key, engine = engine_document(startup)
        document[key] = engine
    return document


def precisions_document(recipes) -> list[dict[str, Any]]:
    """Each recipe's dtypes and its bytes per linear-layer weight with Adam (Hopper: with the FP8
    transpose; Blackwell: without), as numbers."""
    rows = []
    for recipe in recipes:
        gemm = recipe.gemm
        rows.append({
            "name": recipe.name, "description": recipe.description, "weights": recipe.weight_dtype.value,
            "gradients": recipe.grad_dtype.value, "master": recipe.master_dtype.value if recipe.master_dtype else None,
            "moments": recipe.optimizer_state_dtype.value, "activations": recipe.activation_dtype.value,
            "linear_bytes_per_param_adam": float(recipe.linear_bytes_per_param()),
            "linear_bytes_per_param_adam_blackwell": float(recipe.linear_bytes_per_param(transpose=False)),
            "linear_breakdown": None if gemm is None else {
                key: float(getattr(gemm, key)) for key in
                ("weight", "copies", "transpose", "gradient", "master", "first_moment", "second_moment")},
            "cached_gemm_input_bytes": float(recipe.gemm_input_bytes) if recipe.gemm_input_bytes else None,
            "requires": recipe.requires, "source": recipe.source,
        })
    return rows


def plan_document(result, elapsed_s: float) -> dict[str, Any]:
    """``memcalc plan --json``: the fitting layouts fastest first (memory from the train
    estimator), the families that do not fit with their reasons, and the search counts."""
    from dataclasses import asdict

    def layout(item) -> dict[str, Any]:
        return {"layout": item.layout.describe(), "parallel": settings_document(item.estimate.settings).get("parallel"),
                "recompute": item.layout.recompute.value, "micro_batch": item.layout.micro_batch,
                "microbatches": item.layout.microbatches, "memory": estimate_document("train", item.estimate)["memory"],
                "host_bytes": item.host_bytes, "step_time_s": item.step_time_s, "tokens_per_s": item.tokens_per_s,
                "mfu": item.mfu, "step": asdict(item.step)}

    def rejection(item) -> dict[str, Any]:
        return {"tp": item.tp, "pp": item.pp, "reason": item.reason, "best_bytes": item.best_bytes}

    return {"command": "plan", "units": "bytes", "model": model_summary(result.model), "gpu": result.gpu.name,
            "gpus": result.gpus, "seq_len": result.seq_len, "global_batch": result.global_batch,
            "headroom": result.headroom, "limit_bytes": result.limit_bytes, "fits": result.fits,
            "top": [layout(item) for item in result.top], "rejected": [rejection(item) for item in result.rejected],
            "invalid": [rejection(item) for item in result.invalid], "counts": asdict(result.counts),
            "assumptions": result.assumptions, "elapsed_s": elapsed_s}


def sweep_document(model, key: str, points, gpu=None, over_point=None) -> dict[str, Any]:
    """``memcalc sweep --json``: the swept key, each point's ``memory`` (as in ``train``) or its
    ``error``, and with a GPU the first value that does not fit."""
    rows = []
    for point in points:
        if point.estimate is None:
            rows.append({"value": point.value, "error": point.error})
            continue
        memory = estimate_document("train", point.estimate)["memory"]
        rows.append({"value": point.value, "memory": memory}
                    | ({"fits": memory["device_total"] <= gpu.usable_memory_bytes} if gpu else {}))
    return {"command": "sweep", "units": "bytes", "model": model_summary(model), "over": key, "points": rows,
            "gpu": None if gpu is None else gpu.name,
            "first_not_fitting": None if over_point is None else over_point.value}


def compare_document(results: list[tuple[str, Estimate]], gpu=None) -> dict[str, Any]:
    """``memcalc compare --json``: one ``train`` document per scenario, in order."""
    scenarios = []
    for label, estimate in results:
        document = estimate_document("train", estimate, gpu)
        scenarios.append({"scenario": label} | {key: document[key] for key in
                                                 ("settings", "memory", "components", "ranks", "fits") if key in document})
    return {"command": "compare", "units": "bytes", "model": model_summary(results[0][1].model),
            "gpu": None if gpu is None else gpu.name, "scenarios": scenarios}


def show_document(model: ModelConfig) -> dict[str, Any]:
    params = count_params(model)
    return {
        "model": model_summary(model),
        "config": config_as_dict(model),
        "parameters": {category.value: count for category, count in params.by_category().items()}
        | {"total": params.total, "active": params.active},
        "tensors": [
            {"name": group.name, "category": group.category.value, "numel": group.numel, "count": group.count}
            for group in params.groups
        ],
    }


def checkpoint_document(model: ModelConfig, stored) -> dict[str, Any]:
    """``memcalc show --json``'s ``checkpoint``: what a model's files store (``StoredWeights``), read
    from their headers. For safetensors, by dtype, quantisation scheme and part (language model,
    vision, projector, MTP), with ``matches``: the language model's parameters equal the config's
    count. For GGUF, by ggml type."""
    document: dict[str, Any] = {"format": stored.format, "location": stored.location}
    if stored.gguf is not None:
        gguf = stored.gguf
        params, nbytes = gguf.params_by_type(), gguf.bytes_by_type()
        return document | {
            "architecture": gguf.architecture, "file_type": gguf.file_type_name,
            "stored_bytes": gguf.total_bytes, "stored_params": gguf.total_params,
            "by_type": {name: {"params": params[name], "bytes": nbytes[name]} for name in nbytes},
        }
    checkpoint = stored.checkpoint
    nbytes, params = checkpoint.bytes_by_dtype(), _params_by_dtype(checkpoint)
    parts = checkpoint.split_by_part(model.num_layers)
    language = next((tensors for part, tensors in parts.items() if part.value == "language_model"), None)
    language_params = language.logical_params if language is not None else 0
    config_params = count_params(model).total
    return document | {
        "files": list(checkpoint.files),
        "stored_bytes": checkpoint.total_bytes,
        "stored_params": checkpoint.total_params,
        "logical_params": checkpoint.logical_params,
        "by_dtype": {name: {"params": params[name], "bytes": nbytes[name]} for name in nbytes},
        "quantization": list(checkpoint.quantization_schemes()),
        "parts": {part.value: {"bytes": tensors.total_bytes, "stored_params": tensors.total_params,
                               "logical_params": tensors.logical_params} for part, tensors in parts.items()},
        "language_model_params": language_params,
        "config_params": config_params,
        "matches": language_params == config_params,
    }


def _params_by_dtype(checkpoint) -> dict[str, int]:
    counts: dict[str, int] = {}
    for tensor in checkpoint.tensors:
        counts[tensor.dtype] = counts.get(tensor.dtype, 0) + tensor.numel
    return counts
