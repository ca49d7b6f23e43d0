"""The serving-engine options of ``memcalc infer`` and the start-up budget each engine computes
from them (memcalc.serving). Only ``infer`` imports this module, so the other commands do not
pay for its options at start-up."""

from __future__ import annotations

import sys
from dataclasses import dataclass

from memcalc.config import Engine
from memcalc.errors import InputError
from memcalc.flags import parse_size


@dataclass(frozen=True)
class EngineOptions:
    """The serving-engine options of ``infer``, each for its engine's budget (memcalc.serving)."""

    max_num_batched_tokens: int | None = None
    calibration: str | None = None
    memory_fraction: float | None = None
    cache_type_k: str = "f16"
    cache_type_v: str = "f16"
    tensor_split: str | None = None
    n_gpu_layers: int | None = None
    ubatch_size: int = 512
    flash_attn: bool = True
    compute_buffer: str | None = None
    vllm_version: str | None = None
    enforce_eager: bool = False
    cudagraph_mode: str | None = None
    max_num_seqs: int | None = None
    profile_cudagraphs: str | None = None

    def given(self) -> dict[str, tuple[str, ...]]:
        """The options set away from their defaults, by flag, with the engines they apply to."""
        defaults = EngineOptions()
        flags = {"max_num_batched_tokens": ("--max-num-batched-tokens", ("vllm", "sglang", "trtllm")),
                 "calibration": ("--calibration", ("vllm",)),
                 "memory_fraction": ("--memory-fraction", ("sglang", "trtllm")),
                 "cache_type_k": ("--cache-type-k", ("llamacpp",)), "cache_type_v": ("--cache-type-v", ("llamacpp",)),
                 "tensor_split": ("--tensor-split", ("llamacpp",)), "n_gpu_layers": ("--n-gpu-layers", ("llamacpp",)),
                 "ubatch_size": ("--ubatch-size", ("llamacpp",)), "flash_attn": ("--no-flash-attn", ("llamacpp",)),
                 "compute_buffer": ("--compute-buffer", ("llamacpp",)),
                 "vllm_version": ("--vllm-version", ("vllm",)), "enforce_eager": ("--enforce-eager", ("vllm",)),
                 "cudagraph_mode": ("--cudagraph-mode", ("vllm",)), "max_num_seqs": ("--max-num-seqs", ("vllm",)),
                 "profile_cudagraphs": ("--profile-cudagraphs", ("vllm",))}
        return {flag: engines for name, (flag, engines) in flags.items()
                if getattr(self, name) != getattr(defaults, name)}


ENGINE_NAMES = {Engine.VLLM: "vLLM", Engine.SGLANG: "SGLang", Engine.TRTLLM: "TensorRT-LLM",
                Engine.LLAMACPP: "llama.cpp"}


def parse_tensor_split(text: str | None) -> tuple[float, ...]:
    if text is None:
        return (1.0,)
    try:
        return tuple(float(part) for part in text.split(","))
    except ValueError:
        raise InputError(f"--tensor-split: {text!r} is not a list of proportions such as 3,1") from None


def engine_budget(engine: Engine, config, settings, estimate, stored, gpu_spec, gpu_util: float,
                  options: EngineOptions):
    """The start-up budget of ``engine`` on ``gpu_spec`` (memcalc.serving), or None for hf and
    paged; an option of another engine is refused."""
    for flag, engines in options.given().items():
        if engine.value not in engines:
            names = ", ".join(engines[:-1]) + " or " + engines[-1] if len(engines) > 1 else engines[0]
            raise InputError(f"{flag} applies to --engine {names}")
    if engine not in ENGINE_NAMES:
        return None
    if gpu_spec is None:
        raise InputError(f"--engine {engine.value} computes {ENGINE_NAMES[engine]}'s start-up budget for a GPU: "
                         "give --gpu")
    total = gpu_spec.usable_memory_bytes
    if engine is Engine.VLLM:
        from memcalc.serving import (VLLM_DEFAULT_VERSION, VLLMGraphMode, VLLMGraphOptions, default_batched_tokens,
                                     parse_vllm_version, vllm_budget)

        version = options.vllm_version or VLLM_DEFAULT_VERSION
        tokens = options.max_num_batched_tokens or default_batched_tokens(total, gpu_spec.name,
                                                                          parse_vllm_version(version))
        measured = None
        if options.calibration is not None:
            from memcalc.calibration import read_calibration

            measured = read_calibration(options.calibration)
        mode = None
        if options.cudagraph_mode is not None:
            try:
                mode = VLLMGraphMode(options.cudagraph_mode.lower())
            except ValueError:
                raise InputError(f"--cudagraph-mode: {options.cudagraph_mode!r} is not one of "
                                 f"{', '.join(m.value for m in VLLMGraphMode)}") from None
        profiled = None
        if options.profile_cudagraphs is not None:
            if options.profile_cudagraphs not in ("0", "1"):
                raise InputError(f"--profile-cudagraphs: {options.profile_cudagraphs!r} is not 1 or 0 (vLLM's "
                                 "VLLM_MEMORY_PROFILER_ESTIMATE_CUDAGRAPHS)")
            profiled = options.profile_cudagraphs == "1"
        graphs = VLLMGraphOptions(version, options.enforce_eager, mode, options.max_num_seqs, profiled,
                                  gpu_spec.name, gpu_spec.architecture)
        budget = vllm_budget(config, settings, total, gpu_util, tokens, measured, graphs)
        if not budget.graphs_fit:
            print(f"warning: vLLM's CUDA graphs ({budget.cudagraphs.bytes / 2**30:.2f} GiB) do not fit on {gpu_spec.name} at "
                  f"--gpu-util {gpu_util:g}: start-up would run out of memory (docs/serving.md)", file=sys.stderr)
        return budget
    if engine is Engine.SGLANG:
        from memcalc.serving import sglang_budget

        return sglang_budget(config, settings, total, gpu_spec.name, gpu_spec.vendor, options.memory_fraction,
                             options.max_num_batched_tokens, gguf=stored is not None and stored.format == "gguf")
    if engine is Engine.TRTLLM:
        from memcalc.serving import trtllm_budget

        return trtllm_budget(config, settings, total, options.memory_fraction, options.max_num_batched_tokens)
    from memcalc.estimate.breakdown import Kind
    from memcalc.serving import LlamaCppWeights, llamacpp_budget

    if stored is not None and stored.gguf is not None:
        weights = LlamaCppWeights.from_gguf(stored.gguf.tensors, f"{stored.location}: its tensors as stored")
    else:
        static = sum(component.bytes for component in estimate.components if component.kind is Kind.STATIC)
        weights = LlamaCppWeights.from_estimate(config, static, f"the estimate ({estimate.settings.weights}) split "
                                                "by parameter count")
    shape = estimate.settings
    n_ctx = shape.sequences * shape.context_len  # every sequence's cells (the batch's, with its beams or samples)
    return llamacpp_budget(config, settings, weights, total, n_ctx, options.cache_type_k.lower(),
                           options.cache_type_v.lower(), parse_tensor_split(options.tensor_split), options.n_gpu_layers,
                           options.ubatch_size, options.flash_attn,
                           parse_size("--compute-buffer", options.compute_buffer))
