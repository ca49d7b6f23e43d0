"""Serving engines' own start-up budgets: how much of the card an engine gives its KV cache.

Each engine sizes its cache once, at start-up, by its own rule; memcalc computes each rule as the
engine's source does, with memcalc's estimate standing in for what the engine measures (the
weights it loads, the peak of its profile forward) and each term naming where it came from.
docs/serving.md has every rule with its source, and what is not modelled.

vLLM (V1 engine: vllm/v1/worker/gpu_worker.py ``determine_available_memory``, vllm/utils
``memory_profiling``, vllm/v1/core/kv_cache_utils.py; ../shared/reference, sec. 3a):

- it asks for ``gpu_memory_utilization`` x the device's total memory (what CUDA reports);
- it loads the weights ("model weights take A GiB": the parameters plus each rotary embedding's
  ``cos_sin_cache`` of max_position x rotary_dim in the model dtype);
- it profiles one forward of ``max_num_batched_tokens`` tokens in up to ``max_num_seqs`` dummy
  requests, then its sampler on one logit per request: the torch activation peak, whichever of the
  two is larger, by each release's rule (``vllm_profile``: V0's sort-based sampler, V1's torch.sort,
  Triton or FlashInfer top-k/top-p, Model Runner V2's parameter-free dummy batch);
- it counts the non-torch increase (NCCL, cuBLAS and other allocations outside PyTorch);
- what is left is the KV cache: ``num_blocks = kv_bytes // page_size // layers`` with a page of
  ``block_size`` tokens of one layer; tokens = blocks x block_size.

- CUDA graphs (vllm/config/vllm.py ``_set_cudagraph_sizes``, v1/cudagraph_dispatcher.py,
  v1/worker/gpu_model_runner.py ``capture_model``): one capture per size of a ladder set by
  ``max_num_seqs`` and ``max_num_batched_tokens`` (``vllm_capture_sizes``, per release), PIECEWISE
  for every size and FULL for the decode sizes up to ``max_num_seqs`` (FULL_AND_PIECEWISE, the
  default from 0.11; PIECEWISE in 0.10), largest first into one shared pool. Before 0.20 they are
  captured after the KV cache, out of ``1 - utilization`` of the card less the CUDA context; from
  0.20 (VLLM_MEMORY_PROFILER_ESTIMATE_CUDAGRAPHS=1 by default, gpu_worker.py) vLLM estimates them
  while profiling and takes them from the KV cache. memcalc's figure is the pool (its activation
  estimate for one forward of the largest size) plus a per-layer cost per captured size, a formula
  calibrated on published "Graph capturing finished ..., took X GiB" lines (within 25% of each,
  tests/test_serving.py), not vLLM's own rule; ``--enforce-eager`` captures none.

The weights are the estimator's (exact against vLLM's own figure for the
published logs in tests/test_serving.py); the activation peak is vLLM's profile rule for the version
(within 3% of the published logs in tests/test_serving.py, the unquantized fused-MoE layer's workspace
included, ``vllm_fused_moe``;
a calibration from a real start-up log, ``memcalc calibrate``, replaces it); the non-torch increase
defaults to the 0.12 GiB a Llama-3.1-8B start-up on an H100 at TP 1 logged, plus NCCL's buffers
(memcalc.estimate.device) under tensor parallelism.

SGLang (0.5.12, python/sglang/srt/server_args.py ``ServerArgs._handle_gpu_memory_settings``,
``_handle_piecewise_cuda_graph``, ``_generate_piecewise_cuda_graph_tokens``;
model_executor/model_runner_kv_cache_mixin.py ``_profile_available_bytes``;
model_executor/pool_configurator.py ``DefaultPoolConfigurator``): ``mem_fraction_static`` is
(weights + KV pool) / GPU memory, chosen from the GPU's memory and TP unless given; after loading,
the pool is ``free_after_load - free_before_load x (1 - fraction)`` = ``free_before_load x
fraction - weights``, in tokens of ``kv_heads/TP x (head_dim + v_head_dim) x layers x bytes``.

TensorRT-LLM (PyTorch backend, tensorrt_llm/_torch/pyexecutor/_util.py
``KvCacheCreator.configure_kv_cache_capacity`` and ``_cal_max_memory``; KvCacheConfig in
tensorrt_llm/llmapi/llm_args.py): after a profiling run of ``max_num_tokens`` tokens, the cache
gets ``free_gpu_memory_fraction`` (0.9) of what the peak (weights, activations, memory outside
torch) leaves of the device's total.

llama.cpp (src/llama-context.cpp, src/llama-kv-cache.cpp, src/llama-model.cpp ``load_tensors``):
``n_ctx`` cells (padded to 256) x each layer's ``n_embd_k_gqa`` and ``n_embd_v_gqa`` in the
``--cache-type-k/v`` types, on the device that holds the layer; layers go to devices by the
cumulative ``--tensor-split``; the input embedding stays on the CPU; compute buffers are sized by
reserving the worst-case graph, which memcalc does not replay (it shows the largest tensor it
knows, a floor, or the figure a log printed).
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass, replace
from enum import StrEnum

from memcalc.config import Engine, InferSettings, LayerType, MLPKind, ModelConfig, PositionKind
from memcalc.dtypes import DType, storage_bytes
from memcalc.errors import Field, SettingsError

GiB = 2**30
MiB = 2**20
# vLLM start-up log of Llama-3.1-8B on an H100 80GB at TP 1 ("non_torch_memory takes 0.12GiB";
# ../shared/reference/inference-and-precision.md sec. 6).
DEFAULT_NON_TORCH_BYTES = round(0.12 * GiB)
# EngineArgs.get_batch_defaults for the API server (vllm serve): 8192 tokens per step on GPUs of
# at least 70 GiB other than the A100, else 2048 (the LLM class uses 16384 / 8192).
LARGE_GPU_BATCHED_TOKENS, SMALL_GPU_BATCHED_TOKENS = 8192, 2048


def default_batched_tokens(gpu_memory: int, gpu_name: str, version: tuple[int, ...] | None = None) -> int:
    """From vLLM 0.28 (``version``) cards of 160 GiB or more (B200, B300) get 16384."""
    if version is not None and version >= (0, 28) and gpu_memory >= 160 * GiB:
        return 16384
    large = gpu_memory >= 70 * GiB and "a100" not in gpu_name.lower()
    return LARGE_GPU_BATCHED_TOKENS if large else SMALL_GPU_BATCHED_TOKENS


# --- vLLM's CUDA graphs ----------------------------------------------------------------------------

VLLM_DEFAULT_VERSION = "0.30"  # the newest release whose capture rules memcalc read (the 0.30.0 wheel)
VLLM_GRAPH_SOURCE = ("vllm/config/vllm.py (VllmConfig._set_cudagraph_sizes), vllm/v1/cudagraph_dispatcher.py, "
                     "vllm/v1/worker/gpu_model_runner.py (capture_model, profile_cudagraph_memory), "
                     "vllm/v1/worker/gpu_worker.py (determine_available_memory), vllm/envs.py "
                     "(VLLM_MEMORY_PROFILER_ESTIMATE_CUDAGRAPHS)")
# memcalc's model of one captured size, calibrated on published start-up logs (tests/test_serving.py,
# docs/serving.md): per layer, a piecewise capture (one graph per piece between attention ops) and a
# full capture (one graph of the whole forward)
PIECEWISE_BYTES_PER_LAYER = round(0.22 * MiB)
FULL_BYTES_PER_LAYER = round(0.10 * MiB)


class VLLMGraphMode(StrEnum):
    """vLLM's CompilationConfig.cudagraph_mode (vllm/config/compilation.py CUDAGraphMode)."""

    NONE = "none"
    PIECEWISE = "piecewise"
    FULL = "full"
    FULL_DECODE_ONLY = "full_decode_only"
    FULL_AND_PIECEWISE = "full_and_piecewise"


def parse_vllm_version(text: str) -> tuple[int, ...]:
    """"0.11", "v0.11.1", "0.10.1.1" as a tuple of ints; refused unless it is 0.10 or later (the V1
    engine with cudagraph_mode)."""
    parts = text.strip().lstrip("v").split(".")
    try:
        version = tuple(int(part) for part in parts)
    except ValueError:
        raise SettingsError(Field("vllm_version"), f": {text!r} is not a version such as 0.11 or 0.10.1") from None
    if len(version) < 2 or version < (0, 10):
        raise SettingsError(Field("vllm_version"), f": {text!r}: memcalc models vLLM 0.10 and later (the V1 engine "
                            "with cudagraph_mode); earlier releases captured graphs differently")
    return version


def vllm_default_max_num_seqs(total_memory: int, gpu_name: str, max_num_batched_tokens: int) -> int:
    """EngineArgs.get_batch_defaults for vllm serve: 1024 on GPUs of at least 70 GiB other than the
    A100, else 256; then at most max_num_batched_tokens (EngineArgs._set_default_args)."""
    large = total_memory >= 70 * GiB and "a100" not in gpu_name.lower()
    return min(1024 if large else 256, max_num_batched_tokens)


def vllm_capture_sizes(version: tuple[int, ...], max_num_seqs: int, max_num_batched_tokens: int,
                       sm100: bool = False) -> list[int]:
    """The token counts vLLM captures graphs for by default (VllmConfig._set_cudagraph_sizes), ascending.

    0.10 to 0.11.0: [1, 2, 4] + range(8, C + 1, 8) with C = min(2 x max_num_seqs, 512), those not
    above max_num_batched_tokens (67 sizes at C = 512). From 0.11.1: C = min(2 x max_num_seqs, 512,
    max_num_batched_tokens), then 1, 2, 4, steps of 8 below 256 and of 16 from 256 (51 sizes at
    512); from 0.21 max_num_batched_tokens is added when C is it; from 0.28 C's cap is 1024 on
    compute capability 10.x (B200, GB200, B300)."""
    cap = 2 * max_num_seqs
    if version < (0, 11, 1):
        sizes = [1, 2, 4, *range(8, min(cap, 512) + 1, 8)]
        return [size for size in sizes if size <= max_num_batched_tokens]
    cap = min(cap, 1024 if sm100 and version >= (0, 28) else 512, max_num_batched_tokens)
    sizes = [size for size in (1, 2, 4) if size <= cap]
    if cap >= 8:
        sizes += range(8, min(cap + 1, 256), 8)
    if cap >= 256:
        sizes += range(256, cap + 1, 16)
    if version >= (0, 21) and max_num_batched_tokens <= cap:
        sizes.append(max_num_batched_tokens)
    return sorted(set(sizes))


def vllm_default_graph_mode(version: tuple[int, ...]) -> VLLMGraphMode:
    """PIECEWISE in 0.10 (VllmConfig.__post_init__ under -O3's piecewise compilation), FULL_AND_PIECEWISE
    from 0.11 (pooling and encoder-decoder models excepted, which memcalc does not serve)."""
    return VLLMGraphMode.PIECEWISE if version < (0, 11) else VLLMGraphMode.FULL_AND_PIECEWISE


@dataclass(frozen=True)
class VLLMGraphOptions:
    """What decides vLLM's CUDA graphs: its version, --enforce-eager, -cc.cudagraph_mode,
    --max-num-seqs, VLLM_MEMORY_PROFILER_ESTIMATE_CUDAGRAPHS (None: the version's default) and the card."""

    version: str = VLLM_DEFAULT_VERSION
    enforce_eager: bool = False
    mode: VLLMGraphMode | None = None
    max_num_seqs: int | None = None
    profiled: bool | None = None
    gpu_name: str = ""
    architecture: str = ""


@dataclass(frozen=True, eq=False)
class VLLMGraphs:
    version: str
    mode: VLLMGraphMode
    max_num_seqs: int
    piecewise_sizes: tuple[int, ...]  # token counts captured piecewise (mixed prefill-decode batches)
    full_sizes: tuple[int, ...]  # token counts captured as one full graph
    pool: int  # the largest capture's intermediates: memcalc's activation estimate for that many tokens
    per_size: int  # the captures' own memory, over all sizes
    profiled: bool  # estimated during profiling and taken from the KV cache (vLLM >= 0.20 by default)
    profiled_from: str
    source: str = VLLM_GRAPH_SOURCE
    notes: tuple[str, ...] = ()

    @property
    def bytes(self) -> int:
        return self.pool + self.per_size

    @property
    def count(self) -> int:
        return len(self.piecewise_sizes) + len(self.full_sizes)

    @property
    def largest(self) -> int:
        return max((*self.piecewise_sizes, *self.full_sizes), default=0)


def _forward_activations(model: ModelConfig, settings: InferSettings, tokens: int) -> int:
    """memcalc's activation estimate for one forward of ``tokens`` tokens on one TP rank (no logits:
    vLLM computes them outside the captured forward)."""
    from memcalc.estimate.inference import estimate_inference

    if tokens <= 0:
        return 0
    forward = estimate_inference(model, replace(settings, engine=Engine.VLLM, batch_size=1, context_len=None,
                                                prompt_len=min(tokens, model.max_position_embeddings),
                                                max_new_tokens=0, prefill_chunk=None, num_beams=1, decoding=None,
                                                num_return_sequences=1, top_k=None, top_p=None, temperature=1.0))
    return forward.component("activations").bytes


def vllm_cuda_graphs(model: ModelConfig, settings: InferSettings, total_memory: int, max_num_batched_tokens: int,
                     options: VLLMGraphOptions) -> VLLMGraphs:
    """vLLM's CUDA graph capture: which sizes, in which modes, and memcalc's estimate of its memory.

    The sizes and modes follow vLLM's source (vllm_capture_sizes, vllm_default_graph_mode; FULL decode
    graphs for the sizes up to max_num_seqs, cudagraph_dispatcher.py). vLLM captures largest first so
    the smaller sizes reuse one shared pool (gpu_model_runner.py capture_model); memcalc counts that
    pool as its activation estimate for one forward of the largest size, plus
    PIECEWISE_BYTES_PER_LAYER or FULL_BYTES_PER_LAYER per layer for every captured size: a formula
    calibrated on published "Graph capturing finished ..., took X GiB" lines, not vLLM's rule."""
    version = parse_vllm_version(options.version)
    profiled_default = version >= (0, 20)
    if options.profiled and version < (0, 18):
        raise SettingsError(Field("profile_cudagraphs"), f": vLLM {options.version} has no CUDA graph memory "
                            "profiling (VLLM_MEMORY_PROFILER_ESTIMATE_CUDAGRAPHS arrived in 0.18)")
    mode = VLLMGraphMode.NONE if options.enforce_eager else options.mode or vllm_default_graph_mode(version)
    seqs = options.max_num_seqs or vllm_default_max_num_seqs(total_memory, options.gpu_name, max_num_batched_tokens)
    notes: list[str] = []
    if mode is VLLMGraphMode.NONE:
        return VLLMGraphs(options.version, mode, seqs, (), (), 0, 0, False,
                          "--enforce-eager: no graphs" if options.enforce_eager else "cudagraph_mode none: no graphs")
    sm100 = "sm10" in options.architecture.lower().replace(" ", "")
    sizes = tuple(vllm_capture_sizes(version, seqs, max_num_batched_tokens, sm100))
    decode = tuple(size for size in sizes if size <= seqs)  # uniform decode batches of up to max_num_seqs requests
    piecewise: tuple[int, ...] = ()
    full: tuple[int, ...] = ()
    if mode in (VLLMGraphMode.PIECEWISE, VLLMGraphMode.FULL_AND_PIECEWISE):
        piecewise = sizes
    if mode is VLLMGraphMode.FULL:
        full = sizes
    elif mode in (VLLMGraphMode.FULL_DECODE_ONLY, VLLMGraphMode.FULL_AND_PIECEWISE):
        full = decode
    if model.mla is not None and full:
        notes.append("MLA: vLLM drops FULL graphs to PIECEWISE where the attention backend cannot be captured whole "
                     "(AttentionCGSupport); counted as the mode says")
    if sm100 and version >= (0, 34):
        notes.append("vLLM 0.34 widens the default grids on compute capability 10.x (prefill and decode sizes "
                     "apart); memcalc uses the 0.30 rule")
    if version > (0, 30):
        notes.append(f"vLLM {options.version}: capture rules as read in 0.30.0")
    layers = model.num_layers
    pool = _forward_activations(model, settings, max((*piecewise, *full), default=0))
    per_size = layers * (len(piecewise) * PIECEWISE_BYTES_PER_LAYER + len(full) * FULL_BYTES_PER_LAYER)
    profiled = profiled_default if options.profiled is None else options.profiled
    if profiled:
        profiled_from = ("profiled before the KV cache and taken from it (VLLM_MEMORY_PROFILER_ESTIMATE_CUDAGRAPHS="
                         f"1{', the default from 0.20' if options.profiled is None else ''})")
    else:
        profiled_from = ("captured after the KV cache, out of the headroom"
                         + (" (VLLM_MEMORY_PROFILER_ESTIMATE_CUDAGRAPHS=0)" if version >= (0, 18) else ""))
    return VLLMGraphs(options.version, mode, seqs, piecewise, full, pool, per_size, profiled, profiled_from,
                      notes=tuple(notes))


# --- vLLM's profile run: the activation peak -------------------------------------------------------
# Read in the vLLM wheels 0.6.6, 0.7.0, 0.7.2, 0.7.3, 0.8.0, 0.8.5, 0.9.2, 0.10.1.1, 0.10.2, 0.11.0, 0.11.2,
# 0.12.0 to 0.19.0, 0.22.0 to 0.31.0, 0.33.0 and 0.34.0 (PyPI; 0.20 and 0.21 are not on the index), in PyTorch's
# aten/src/ATen/native/cuda/SortStable.cu (the sort's temporaries) and in flashinfer-python 0.6.6
# (flashinfer/sampling.py). docs/serving.md has the table and the published logs it is checked against.

VLLM_PROFILE_SOURCE = {
    "v0": ("vllm/worker/model_runner.py (GPUModelRunnerBase.profile_run, _dummy_run), "
           "vllm/model_executor/layers/sampler.py (Sampler.forward, _apply_top_k_top_p), vllm/worker/worker.py "
           "(determine_num_available_blocks)"),
    "v1": ("vllm/v1/worker/gpu_model_runner.py (profile_run, _dummy_run, _dummy_sampler_run), "
           "vllm/v1/sample/sampler.py (Sampler.forward), vllm/v1/sample/ops/topk_topp_sampler.py, "
           "vllm/v1/worker/gpu_worker.py (determine_available_memory)"),
    "v2": ("vllm/v1/worker/gpu/model_runner.py (profile_run, _dummy_run, _dummy_sampler_run), "
           "vllm/v1/worker/gpu/sample/sampler.py (Sampler.apply_sampling_params), vllm/config/vllm.py "
           "(use_v2_model_runner), vllm/v1/worker/gpu_worker.py (determine_available_memory)"),
}
# Streaming multiprocessors of the catalogued cards (the vendors' datasheets and whitepapers; CUs on the
# MI300X): vLLM's Triton top-k/top-p kernel keeps one vocabulary row per program, min(next_power_of_2(min(SMs,
# rows)), SMs) rows (vllm/v1/sample/ops/topk_topp_triton.py apply_top_k_top_p_triton, 0.17 and later)
GPU_SM_COUNT = {"a100-40gb": 108, "a100-80gb": 108, "h100-80gb": 132, "h200-141gb": 132, "b200-180gb": 148,
                "l40s-48gb": 142, "rtx-4090-24gb": 128, "mi300x-192gb": 304}
DEFAULT_SM_COUNT = 132  # the H100 SXM5's, for a card not in GPU_SM_COUNT
V0_MAX_NUM_SEQS = 256  # EngineArgs.max_num_seqs for the V0 engine (0.6, 0.7)


class VLLMSampler(StrEnum):
    """How vLLM's profile run applies the dummy top-k/top-p."""

    SORT = "sort"  # torch.sort of the fp32 logits (V0; V1 to 0.16)
    TRITON = "triton"  # apply_top_k_top_p_triton, in place (V1, 0.17 to 0.21; ROCm later)
    FLASHINFER = "flashinfer"  # top_k_top_p_sampling_from_logits (V1 on CUDA from 0.22)
    NONE = "none"  # Model Runner V2: the dummy batch registers no sampling parameters


def _triton_buffer(gpu_name: str, requests: int, vocab: int, notes: list[str]) -> int:
    """apply_top_k_top_p_triton's per-program fp32 vocabulary rows, min(next_power_of_2(min(SMs, rows)), SMs)."""
    sms = GPU_SM_COUNT.get(gpu_name, DEFAULT_SM_COUNT)
    programs = min(sms, requests)
    if gpu_name not in GPU_SM_COUNT:
        notes.append(f"the Triton top-k/top-p buffer counts {DEFAULT_SM_COUNT} SMs (an H100's)")
    return min(1 << (programs - 1).bit_length(), sms) * vocab * 4


def _version_tuple(text: str) -> tuple[int, ...]:
    """Any "0.x[.y]" (parse_vllm_version refuses what the CUDA-graph rules do not cover; the profile
    rules go back to the V0 engine of 0.6)."""
    try:
        return tuple(int(part) for part in text.strip().lstrip("v").split("."))
    except ValueError:
        raise SettingsError(Field("vllm_version"), f": {text!r} is not a version such as 0.11 or 0.10.1") from None


def torch_sort_bytes_per_element(rows: int) -> int:
    """What ``torch.sort`` of a [rows, V] fp32 tensor along V allocates per element while it runs
    (aten/src/ATen/native/cuda/SortStable.cu launch_stable_sort_kernel): its outputs, values (4) and
    int64 indices (8), plus, from 128 rows, the int64 reverse indices (8) and cub's segmented radix
    sort's alternate keys and values (4 + 8); from 2 to 127 rows (segmented_sort_pairs_by_full_sort)
    two int2 index-and-segment buffers (16), the keys' output (4) and cub's alternate keys and int2
    values (12); one row: the outputs (a vocabulary's worth of indices aside)."""
    if rows >= 128:
        return 12 + 8 + 12
    if rows >= 2:
        return 12 + 16 + 4 + 12
    return 12


@dataclass(frozen=True, eq=False)
class VLLMProfile:
    """vLLM's profile run as its source runs it: one forward of ``tokens`` tokens split over
    ``requests`` dummy requests, then the sampler on one position of each request. The activation
    peak is the larger of the forward's (memcalc's estimate, one TP rank) and the sampler's: what
    stays alive of the forward (``held``) plus ``bytes_per_logit`` for each of ``requests`` x
    ``vocab`` logits plus a fixed ``buffer``, plus, for a MoE model from 0.14, the fused-MoE workspace the
    forward left allocated (``moe``, VLLMFusedMoE)."""

    version: str
    runner: str  # "V0", "V1" (gpu_model_runner.py) or "V2" (Model Runner V2)
    sampler: VLLMSampler
    tokens: int
    requests: int
    vocab: int  # the full vocabulary: the logits are gathered on every TP rank
    forward: int
    held: int  # the forward's hidden states kept while sampling, the sampled rows (and a random copy)
    bytes_per_logit: int
    buffer: int  # the Triton kernel's per-program vocabulary rows
    per_logit: str  # what the bytes per logit are
    source: str
    notes: tuple[str, ...] = ()
    moe: VLLMFusedMoE | None = None  # the fused-MoE layer, where modelled (vllm_fused_moe)

    @property
    def logits(self) -> int:
        return self.requests

    @property
    def moe_workspace(self) -> int:
        """The fused-MoE workspace still allocated while the sampler runs (0.14 and later), else 0."""
        return self.moe.held if self.moe is not None else 0

    @property
    def sampler_peak(self) -> int:
        return self.held + self.requests * self.vocab * self.bytes_per_logit + self.buffer + self.moe_workspace

    @property
    def peak(self) -> int:
        return max(self.forward, self.sampler_peak)

    @property
    def sampler_wins(self) -> bool:
        return self.sampler_peak > self.forward

    @property
    def buffer_rows(self) -> int:
        return self.buffer // (self.vocab * 4) if self.buffer else 0

    def describe(self) -> str:
        """The rule applied, for the budget's "From" column."""
        buffer = f" + {self.buffer_rows} vocabulary rows" if self.buffer else ""
        moe = ""
        if self.moe is not None:
            kept = ", kept" if self.moe.persistent else ""
            moe = f" with the fused-MoE {self.moe.kernel} workspace ({self.moe.workspace / MiB:.0f} MiB{kept})"
        return (f"vLLM {self.version} profile ({self.runner} runner): forward of {self.tokens} tokens in "
                f"{self.requests} requests{moe} + sampler of {self.logits} logits ({self.bytes_per_logit} B each{buffer}); "
                f"the {'sampler' if self.sampler_wins else 'forward'} is the peak")


def _profile_forward(model: ModelConfig, settings: InferSettings, tokens: int) -> int:
    """memcalc's activation estimate for one forward of ``tokens`` tokens on one TP rank, the tokens
    spread over many short requests (so not capped at max_position_embeddings) and without attention
    scores: vLLM's V1 profile runs without attention metadata (the backends return zeros), V0's with
    FlashAttention, which keeps no scores."""
    from memcalc.estimate.inference import _compute_bytes, prefill_activation_bytes, tensor_parallel_view

    local = tensor_parallel_view(model, settings.tp)
    element = _compute_bytes(DType(settings.dtype))
    return max(prefill_activation_bytes(local, tokens, element), element * tokens * local.hidden_size)


def _profile_forward_beside_moe(model: ModelConfig, settings: InferSettings, tokens: int) -> int:
    """_profile_forward without memcalc's MoE-layer estimate (a per-expert loop's), for a model whose
    fused-MoE layer vllm_fused_moe sizes: the dense MLP layers, recurrent mixers and the stream."""
    from memcalc.estimate.inference import _compute_bytes, recurrent_mixer_elements, tensor_parallel_view
    from memcalc.estimate.inventory import MLPRole, layer_roles

    local = tensor_parallel_view(model, settings.tp)
    element = _compute_bytes(DType(settings.dtype))
    h = local.hidden_size
    peaks = [element * tokens * h, element * tokens * recurrent_mixer_elements(local)]
    if MLPRole.DENSE in set(layer_roles(local)):
        width = 3 if local.mlp is MLPKind.GATED else 2
        peaks.append(element * tokens * (4 * h + width * local.intermediate_size))
    return max(peaks)


def _is_quantized(model: ModelConfig, settings: InferSettings) -> bool:
    from memcalc.estimate.inference import checkpoint_weights

    weight_format = checkpoint_weights(model, settings)[0]
    return weight_format is not None and weight_format.lower() not in {"bf16", "fp16", "fp32", "float16", "bfloat16"}


def vllm_uses_model_runner_v2(version: tuple[int, ...], model: ModelConfig, settings: InferSettings) -> bool:
    """Whether vLLM ``version`` runs ``model`` on Model Runner V2 by default (vllm/config/vllm.py
    VllmConfig.use_v2_model_runner and _is_default_v2_model_runner_model, VLLM_USE_V2_MODEL_RUNNER unset):
    0.22 Qwen3ForCausalLM, 0.23 also Llama and Mistral, dense and unquantized; 0.24 those quantized too and
    the DeepSeek-V2, Qwen2-MoE and Granite-MoE architectures; 0.25 to 0.28 every dense model that is not
    hybrid or attention-free, and those MoE architectures; from 0.29 every model (its unsupported features
    aside). memcalc keeps no Hugging Face architecture name: 0.22 to 0.24 read the family from the model's
    name and aliases."""
    from memcalc.estimate.inference import recurrent_layers

    if version < (0, 22):
        return False
    if version >= (0, 29):
        return True
    names = " ".join((model.name, *model.aliases)).lower()
    moe, hybrid = model.moe is not None, recurrent_layers(model) > 0
    listed_moe = moe and any(key in names for key in ("deepseek-v2", "qwen2-moe", "qwen1.5-moe", "granite"))
    if version >= (0, 25):
        return not hybrid and (not moe or listed_moe)
    dense_families = ("qwen3",) if version < (0, 23) else ("qwen3", "llama", "mistral")
    dense = not moe and not hybrid and model.vision is None and any(key in names for key in dense_families)
    if version < (0, 24):
        return dense and not _is_quantized(model, settings)
    return dense or listed_moe


# --- vLLM's fused-MoE layer in the profile forward -----------------------------------------------------
VLLM_MOE_SOURCE = {
    "impl": ("vllm/model_executor/layers/fused_moe/fused_moe.py (fused_experts_impl: intermediate caches per "
             "chunk of VLLM_FUSED_MOE_CHUNK_SIZE tokens, freed with the layer), "
             "fused_moe/layer.py (UnquantizedFusedMoEMethod.forward_cuda -> fused_experts)"),
    "modular": ("vllm/model_executor/layers/fused_moe/modular_kernel.py (FusedMoEModularKernel._allocate_buffers), "
                "fused_moe/fused_moe.py (TritonExperts.workspace_shapes, apply), "
                "vllm/v1/worker/workspace.py (WorkspaceManager.get_simultaneous: one buffer, grown, never freed), "
                "fused_moe/unquantized_fused_moe_method.py"),
}
# VLLM_FUSED_MOE_CHUNK_SIZE (vllm/envs.py): 64 x 1024 to 0.11, 16 x 1024 in 0.12 to 0.17; gone from 0.18
# (the modular kernel no longer chunks)
_MOE_CHUNK = ((0, 12), 64 * 1024), ((0, 18), 16 * 1024)
# MLACommonMetadataBuilder.determine_chunked_prefill_workspace_size (0.14 to 0.19): at most 64K tokens
MLA_CHUNKED_PREFILL_CAP = 64 * 1024


VLLM_MOE_ORACLE_SOURCE = ("vllm/model_executor/layers/fused_moe/oracle/unquantized.py (_get_priority_backends, "
                          "select_unquantized_moe_backend), fused_moe/experts/trtllm_bf16_moe.py and "
                          "experts/flashinfer_cutlass_moe.py (_supports_current_device)")


def _rocm(gpu_name: str, architecture: str) -> bool:
    """An AMD card: a CDNA architecture or an MI name."""
    return "cdna" in architecture.lower() or gpu_name.lower().startswith("mi")


def _compute_capability(gpu_name: str, architecture: str) -> int | None:
    """CUDA compute capability, major x 10 + minor: the "(smNN)" of the card's architecture, given or
    the catalogue's (configs/gpus.yaml); None where neither names one."""
    import re

    if not architecture and gpu_name:
        from memcalc.gpus import gpu_catalogue

        spec = gpu_catalogue().get(gpu_name)
        architecture = spec.architecture if spec is not None else ""
    found = re.search(r"sm_?(\d+)", architecture.lower())
    return int(found.group(1)) if found else None


def vllm_unquantized_moe_backend(numbers: tuple[int, ...], gpu_name: str = "", architecture: str = "") -> str:
    """The experts' kernel vLLM ``numbers`` picks for unquantized (bf16/fp16) experts on one GPU without EP, DP or
    LoRA, VLLM_USE_FLASHINFER_MOE_FP16 and --moe-backend unset, flashinfer installed (a requirement of the vllm
    wheel from 0.12, so in the docker image): "TRITON" before 0.22 and on ROCm (AITER off, its default); from
    0.22 the oracle (oracle/unquantized.py _get_priority_backends) tries FlashInfer TRT-LLM (compute capability
    10.x only, TrtLlmBf16Experts._supports_current_device), then FlashInfer CUTLASS (9.0, 10.x, 12.x,
    FlashInferExperts._supports_current_device), then Triton; from 0.23 it moves both FlashInfer kernels behind
    Triton on 9.x (Hopper: "slower than Triton"). So: 8.x cards (A100, L40S, RTX 4090) Triton throughout; H100 and
    H200 FlashInfer CUTLASS in 0.22, Triton from 0.23; 10.x (B200) FlashInfer TRT-LLM or CUTLASS;
    "unknown" for a card whose compute capability memcalc does not know."""
    if numbers < (0, 22) or _rocm(gpu_name, architecture):
        return "TRITON"
    capability = _compute_capability(gpu_name, architecture)
    if capability is None:
        return "unknown"
    if 100 <= capability < 110:
        return "FlashInfer TRTLLM"
    if capability == 90 and numbers < (0, 23) or 120 <= capability < 130:
        return "FlashInfer CUTLASS"
    if capability >= 90 and capability // 10 != 9:
        return "unknown"
    return "TRITON"


def _round_up(value: int, multiple: int) -> int:
    return -(-value // multiple) * multiple


@dataclass(frozen=True, eq=False)
class VLLMFusedMoE:
    """The unquantized fused-MoE layer of vLLM's profile forward (the Triton kernels, one TP rank).

    ``workspace``: what the experts' kernel allocates for the ``tokens`` x top_k rows: before 0.14
    fused_experts_impl's intermediate caches (freed with each layer); from 0.14 the modular kernel's
    workspace13 and workspace2, taken from the WorkspaceManager, a buffer that grows to the largest
    request and is never freed, so it is still allocated while the sampler runs (``persistent``).
    ``layer``: what the MoE layer holds beside it at the expert GEMMs (the residual, the layer's input,
    its output, the shared experts' output, the router logits, top-k weights, ids and sorted ids).
    ``attention``: MLA models from 0.14: the profile's dummy ``torch.empty`` of the up-projected prefill
    context (MLAAttention.forward_impl with no attention metadata) beside the stream and the workspace."""

    kernel: str
    tokens: int  # rows the caches are sized for: the forward's tokens, or one chunk of them
    workspace: int
    persistent: bool
    layer: int
    attention: int  # 0 unless MLA
    detail: str
    source: str

    @property
    def peak(self) -> int:
        return max(self.workspace + self.layer, self.attention)

    @property
    def held(self) -> int:
        """What stays allocated after the forward (the WorkspaceManager's buffer)."""
        return self.workspace if self.persistent else 0


def vllm_fused_moe(model: ModelConfig, settings: InferSettings, numbers: tuple[int, ...], tokens: int,
                   max_num_seqs: int, gpu_name: str = "", architecture: str = "") -> VLLMFusedMoE | None:
    """The fused-MoE layer of vLLM's profile forward of ``tokens`` tokens on one TP rank, by release, for
    an unquantized MoE on CUDA without expert parallelism (the default Triton path: ``Using TRITON backend
    for Unquantized MoE`` in 0.19's log); None where not modelled (no MoE, quantized experts, and from 0.22
    a card on which the oracle picks a FlashInfer kernel, vllm_unquantized_moe_backend: not read; where it
    picks Triton, the 0.18-0.21 layout below, not re-read). The experts'
    shapes as vLLM takes them (modular_kernel.py moe_problem_size): M = tokens, N = w13's rows on the rank
    (2 x expert_intermediate_size / TP for a gated MLP), K = hidden; top_k rows a token. Read in the wheels
    0.6.6, 0.7.3, 0.8.0, 0.8.5, 0.9.2, 0.10.2, 0.11.0, 0.11.2, 0.12.0, 0.13.0 (fused_experts_impl), 0.14.0 to
    0.19.0 (the modular kernel):

    - 0.6, 0.7: fused_experts_impl's intermediate_cache1 (M, top_k, N), intermediate_cache2 (M x top_k, N/2)
      and intermediate_cache3 (M, top_k, K), M one chunk of VLLM_FUSED_MOE_CHUNK_SIZE (64K);
    - 0.8 to 0.13: cache13 of M x top_k x max(N, K) shared by caches 1 and 3, and cache2; the chunk 16K
      from 0.12;
    - 0.14 to 0.17: FusedMoEModularKernel with TritonExperts: workspace13 (M, top_k, max(N/2, K)) and
      workspace2 (M, top_k, max(N, K)) for a chunk of 16K tokens, the output (M, K) in workspace13 when it
      fits and there is one chunk, else a third buffer; each rounded to 256 B, from the WorkspaceManager;
    - 0.18 to 0.21 (0.19 read): no chunking; one common buffer of max(M x top_k x max(N/2, K), M x K)
      (workspace13 and the output) and workspace2.

    The dummy forward's routing does not matter: the caches are sized by M x top_k whatever the experts
    chosen (the profile's input ids are the zeros of the persistent input buffer, randomised only with
    VLLM_RANDOMIZE_DP_DUMMY_INPUTS under data parallelism, so every token goes to the same experts), and
    moe_align_block_size pads to top_k x M + E x (BLOCK_SIZE_M - 1) rows whatever the counts."""
    from memcalc.estimate.inference import _compute_bytes

    moe = model.moe
    if moe is None or _is_quantized(model, settings):
        return None
    if vllm_unquantized_moe_backend(numbers, gpu_name, architecture) != "TRITON":
        return None
    element = _compute_bytes(DType(settings.dtype))
    tp, hidden, topk = settings.tp, model.hidden_size, moe.experts_per_token
    gated = model.mlp is MLPKind.GATED
    local = moe.expert_intermediate_size // tp
    n = 2 * local if gated else local  # w13's rows on the rank
    act = n // 2 if gated else n  # adjust_N_for_activation
    chunk = next((size for before, size in _MOE_CHUNK if numbers < before), None)
    rows = min(tokens, chunk) if chunk else tokens
    if numbers < (0, 8):
        kernel, persistent, source = "fused_experts_impl (3 caches)", False, VLLM_MOE_SOURCE["impl"]
        workspace = element * rows * topk * (n + act + hidden)
        detail = f"caches {rows} x {topk} x ({n} + {act} + {hidden})"
    elif numbers < (0, 14):
        kernel, persistent, source = "fused_experts_impl (cache13)", False, VLLM_MOE_SOURCE["impl"]
        workspace = element * rows * topk * (max(n, hidden) + act)
        detail = f"cache13 {rows} x {topk} x {max(n, hidden)} + cache2 {rows} x {topk} x {act}"
    else:
        kernel, persistent, source = "modular TritonExperts", True, VLLM_MOE_SOURCE["modular"]
        ws13, ws2, out = rows * topk * max(act, hidden), rows * topk * max(n, hidden), tokens * hidden
        if numbers >= (0, 18):
            buffers = [max(ws13, out), ws2]
        elif rows == tokens and ws13 >= out:
            buffers = [ws13, ws2]
        else:
            buffers = [ws13, ws2, out]
        workspace = sum(_round_up(element * size, 256) for size in buffers)
        detail = (f"workspace13 {rows} x {topk} x {max(act, hidden)} + workspace2 {rows} x {topk} x {max(n, hidden)}"
                  + ("" if len(buffers) == 2 else f" + output {tokens} x {hidden}"))
    shared = moe.num_shared_experts > 0
    # residual, input, output (and the shared experts' output) + router logits + top-k weights, ids,
    # token_expert_indices, sorted_token_ids (4 B each a row)
    layer = element * tokens * ((3 + shared) * hidden + moe.num_experts) + 16 * tokens * topk
    attention = 0
    if model.mla is not None and numbers >= (0, 14):
        mla = model.mla
        length = _max_model_len(model, settings)
        block = settings.block_size
        rows_mla = max(min(max(8 * length, 4 * max_num_seqs * block), MLA_CHUNKED_PREFILL_CAP), max_num_seqs * block)
        heads = model.num_attention_heads // tp
        dummy = element * rows_mla * heads * (mla.qk_nope_head_dim + mla.v_head_dim)
        query = heads * (mla.qk_nope_head_dim + mla.qk_rope_head_dim)
        stream = element * tokens * (2 * hidden + query + mla.kv_lora_rank + mla.qk_rope_head_dim + heads * mla.v_head_dim)
        attention = dummy + stream + (workspace if persistent else 0)
        detail += f"; MLA profile dummy {rows_mla} x {heads} x {mla.qk_nope_head_dim + mla.v_head_dim}"
    return VLLMFusedMoE(kernel, rows, workspace, persistent, layer, attention, detail, source)


def vllm_profile(model: ModelConfig, settings: InferSettings, version: str, tokens: int,
                 max_num_seqs: int | None = None, gpu_name: str = "", architecture: str = "") -> VLLMProfile:
    """vLLM's profile run for ``version`` (any release from 0.6; the V0 engine before 0.8), as each
    release's source runs it:

    - V0 (0.6, 0.7; worker/model_runner.py profile_run): ``max_num_seqs`` (256) prompts sharing the
      tokens, SamplingParams(top_p=0.99, top_k=vocab - 1), the last position of each sampled; the
      hidden states stay alive; Sampler.forward upcasts the logits to fp32 and _apply_top_k_top_p
      sorts them: e + 4 + the sort's bytes (torch_sort_bytes_per_element), 38 a logit in bf16.
    - V1 (0.8 to 0.28; v1/worker/gpu_model_runner.py profile_run -> _dummy_run(max_num_tokens,
      is_profile=True), _dummy_sampler_run): min(tokens, max_num_seqs) requests, no attention
      metadata (the attention backends return zeros), one logit per request; from 0.9 profile_run
      keeps the hidden states and _dummy_sampler_run draws torch.rand_like of the sampled rows;
      dummy SamplingMetadata temperature 0.5, top_p 0.9, top_k vocab - 1, not all greedy. The sampler
      holds the model-dtype logits and their fp32 copy (Sampler.forward), then: to 0.16 torch.sort
      (38 B a logit in bf16); 0.17 to 0.21 the Triton kernel in place, then softmax probabilities and
      the exponential draw (random_sample), 14 B a logit, plus its per-program buffer; from 0.22 on
      CUDA FlashInfer's top_k_top_p_sampling_from_logits (VLLM_USE_FLASHINFER_SAMPLER on by default):
      masked logits and probabilities, 14 B a logit.
    - Model Runner V2 (vllm_uses_model_runner_v2; v1/worker/gpu/model_runner.py): min(tokens,
      max_num_seqs) requests, skip_attn; InputBatch.make_dummy registers no sampling parameters, so
      the sampler samples the model-dtype logits (gumbel_sample), with an fp32 copy to 0.25
      (apply_sampling_params), none from 0.26.

    The peak is the larger of the forward's (memcalc's prefill estimate for ``tokens`` tokens on one
    TP rank, _profile_forward) and the sampler's, on the full vocabulary on every rank (the logits are
    gathered). The profile forward runs without CUDA graphs (CUDAGraphMode.NONE, force_eager) but
    through torch.compile, whose fusions leave the largest tensors (the gate/up output and the
    activation) in place. vLLM measures it as torch's allocated peak during profile_run less what was
    allocated before (determine_available_memory; from 0.27 the peak less what is allocated after,
    the rest counted with the weights); from 0.27 its log line "X GiB for peak activation" adds the
    CUDA graph estimate, which memcalc keeps apart (VLLMGraphs). A MoE forward is vLLM's fused-MoE layer
    where vllm_fused_moe models it (unquantized, Triton, 0.6 to 0.21): the largest of the dense layers',
    the MoE layer's and MLA's profile attention; from 0.14 its workspace stays allocated in the
    WorkspaceManager and adds to the sampler's phase. Not modelled (notes): the fused-MoE layer of quantized
    experts, of FlashInfer's kernels (0.22 and later, by card: vllm_unquantized_moe_backend) and under EP/DP,
    a multimodal encoder's profile, speculative decoding's rejection sampler, LoRA. From 0.33 the V2 sampler's
    peak is _dummy_sampler_run's warm-up-parameter pass (an fp32 copy, then FlashInfer's top-k/top-p on CUDA,
    the Triton kernel on ROCm).
    """
    from memcalc.estimate.inference import _compute_bytes

    numbers = _version_tuple(version)
    element = _compute_bytes(DType(settings.dtype))
    upcast = 0 if element == 4 else 4  # Tensor.to(float32) of fp32 logits is the same tensor
    hidden, vocab = model.hidden_size, model.vocab_size
    notes: list[str] = []
    seqs = max_num_seqs or (V0_MAX_NUM_SEQS if numbers < (0, 8) else tokens)
    moe = vllm_fused_moe(model, settings, numbers, tokens, seqs, gpu_name, architecture)
    if moe is None:
        forward = _profile_forward(model, settings, tokens)
    else:
        forward = max(_profile_forward_beside_moe(model, settings, tokens), moe.peak)
    buffer = 0
    parts = [(element, "logits"), (upcast, "fp32 copy")]  # bytes per logit at the sampler's peak
    if numbers < (0, 8):
        runner, sampler, source = "V0", VLLMSampler.SORT, VLLM_PROFILE_SOURCE["v0"]
        requests = max_num_seqs or V0_MAX_NUM_SEQS
        held = element * (tokens + requests) * hidden  # execute_model's hidden states, the selected rows
        # the sort's peak, or _apply_top_k_top_p's scatter after it: sorted values and indices, the
        # top-k mask, the softmax (cumsum), the top-p mask and the re-sorted output (26 B)
        parts.append((max(torch_sort_bytes_per_element(requests), 4 + 8 + 1 + 4 + 4 + 1 + 4), "torch.sort"))
    else:
        requests = min(tokens, max_num_seqs or tokens)
        v2 = vllm_uses_model_runner_v2(numbers, model, settings)
        runner = "V2" if v2 else "V1"
        source = VLLM_PROFILE_SOURCE["v2" if v2 else "v1"]
        rocm = _rocm(gpu_name, architecture)
        if v2:
            sampler = VLLMSampler.NONE
            held = element * (tokens + requests) * hidden  # hidden_states and sample_hidden_states
            if numbers >= (0, 33):  # the warm-up-parameter pass: always a new fp32 copy, then top-k/top-p
                parts = [(element, "logits"), (4, "fp32 copy (warm-up parameters)")]
                if rocm:
                    sampler = VLLMSampler.TRITON
                    parts.append((0, "Triton top-k/top-p in place"))
                    buffer = _triton_buffer(gpu_name, requests, vocab, notes)
                else:
                    sampler = VLLMSampler.FLASHINFER
                    parts += [(4, "FlashInfer's masked logits"), (4, "probabilities")]
            elif numbers >= (0, 26):  # no sampling parameters: no logits processing, no copy
                parts = [(element, "logits, no sampling parameters")]
        else:
            # 0.8 returns only the sampled rows; from 0.9 the hidden states too, and a rand_like of the rows
            held = element * requests * hidden if numbers < (0, 9) else element * (tokens + 2 * requests) * hidden
            if numbers < (0, 17) or requests < 8:
                sampler = VLLMSampler.SORT
                parts.append((torch_sort_bytes_per_element(requests), "torch.sort"))
                if (0, 9) <= numbers < (0, 12):
                    notes.append(f"vLLM {version} samples with FlashInfer when flashinfer is installed (the docker "
                                 "image, vllm[flashinfer]): 14 B a logit instead of the sort's")
            elif numbers < (0, 22) or rocm:
                sampler = VLLMSampler.TRITON
                parts += [(0, "Triton top-k/top-p in place"), (4, "probabilities"), (4, "exponential draw")]
                buffer = _triton_buffer(gpu_name, requests, vocab, notes)
            else:
                sampler = VLLMSampler.FLASHINFER
                parts += [(4, "FlashInfer's masked logits"), (4, "probabilities")]
    per_logit = sum(size for size, _ in parts)
    detail = " + ".join(f"{size} {what}" if size else what for size, what in parts if size or "place" in what)
    if (0, 20) <= numbers < (0, 22):
        notes.append(f"vLLM {version}: profile rule as read in 0.19 (0.20 and 0.21 were not read)")
    if numbers >= (0, 33) and runner == "V2":
        how = ("the Triton top-k/top-p kernel in place (no FlashInfer on ROCm)" if rocm else
               "FlashInfer's top_k_top_p_sampling_from_logits, vLLM's default on CUDA (VLLM_USE_FLASHINFER_SAMPLER "
               "unset; flashinfer-python is a requirement of the vllm wheel, so in the docker image); with "
               "VLLM_USE_FLASHINFER_SAMPLER=0 the Triton kernel instead (4 B a logit + its per-program rows)")
        notes.append(f"vLLM {version}: the sampler's peak is _dummy_sampler_run's second, warm-up-parameter pass "
                     f"(SamplingParams.for_sampler_warmup): an fp32 copy of the logits, then {how}")
    if model.moe is not None and moe is None:
        backend = vllm_unquantized_moe_backend(numbers, gpu_name, architecture)
        if _is_quantized(model, settings):
            why = "quantized experts (their kernels' workspaces were not read)"
        elif backend == "unknown":
            why = (f"vLLM {version}'s oracle picks the kernel by compute capability, which memcalc does not know for "
                   f"{gpu_name or 'this card'}")
        else:
            why = (f"vLLM {version} picks {backend} on this card (oracle/unquantized.py; flashinfer installed, as "
                   "in the docker image); that kernel's workspace is allocated inside flashinfer's C++ op (not read)")
        notes.append(f"MoE: the fused-MoE layer's caches and workspaces in the profile forward are not modelled ({why}); "
                     "the forward is memcalc's per-expert estimate (vLLM 0.19 logs of unquantized MoE models are "
                     "20-57% above that rule)")
    elif moe is not None:
        oracle = (" (vLLM's oracle from 0.22 puts Triton first on this card with flashinfer installed, as in the "
                  "docker image; VLLM_USE_FLASHINFER_MOE_FP16 and --moe-backend unset; its workspace as read in 0.19, "
                  f"not re-read for {version})" if numbers >= (0, 22) else "")
        notes.append(f"MoE: unquantized Triton fused-MoE path without expert parallelism (the default on CUDA){oracle}; "
                     "EP, DP and ROCm's AITER kernels are not modelled")
    if model.vision is not None:
        notes.append("multimodal: the encoder's profile run (the dummy images and the encoder cache) is not modelled")
    return VLLMProfile(version, runner, sampler, tokens, requests, vocab, forward, held, per_logit, buffer, detail,
                       source, tuple(notes), moe)


@dataclass(frozen=True, eq=False)
class Calibration:
    """A real start-up's measured terms (memcalc.calibration reads them from a log)."""

    source: str
    activation_peak_bytes: int | None = None
    non_torch_bytes: int | None = None


@dataclass(frozen=True, eq=False)
class VLLMBudget:
    total_memory: int
    utilization: float
    weights: int
    rotary_cache: int  # part of ``weights``
    activation_peak: int
    activation_from: str  # "estimate" or a calibration's source
    non_torch: int
    non_torch_from: str
    max_num_batched_tokens: int
    block_size: int
    page_bytes: int  # one block of block_size tokens, over all the layers
    max_model_len: int
    cudagraphs: VLLMGraphs
    profile: VLLMProfile | None = None  # vLLM's profile run by its version's rule (also under a calibration)

    @property
    def requested(self) -> int:
        return int(self.total_memory * self.utilization)

    @property
    def kv_cache(self) -> int:
        """requested - weights - activation peak - non-torch memory, less the CUDA graphs' estimate
        where vLLM profiles it first (VLLM_MEMORY_PROFILER_ESTIMATE_CUDAGRAPHS, on from 0.20)."""
        graphs = self.cudagraphs.bytes if self.cudagraphs.profiled else 0
        return self.requested - self.weights - self.activation_peak - self.non_torch - graphs

    @property
    def graph_headroom(self) -> int:
        """What is left for CUDA graphs captured after the KV cache: the card's total less the
        requested share and the CUDA context (memcalc's 400 MiB), which vLLM's budget does not count
        (its snapshot is taken after the context exists). The activation peak is freed before the
        capture (empty_cache) but is taken again by the first large prefill, so it is no slack."""
        from memcalc.estimate.device import CUDA_CONTEXT_BYTES

        return self.total_memory - self.requested - CUDA_CONTEXT_BYTES

    @property
    def device_total(self) -> int:
        """The card once serving: CUDA context + weights + activation peak + non-torch memory + KV
        cache + CUDA graphs."""
        from memcalc.estimate.device import CUDA_CONTEXT_BYTES

        return (CUDA_CONTEXT_BYTES + self.weights + self.activation_peak + self.non_torch + max(self.kv_cache, 0)
                + self.cudagraphs.bytes)

    @property
    def graphs_fit(self) -> bool:
        """Whether the capture fits: inside the budget when profiled first (a KV cache left), else in
        the headroom."""
        if self.cudagraphs.profiled:
            return self.kv_cache > 0
        return self.cudagraphs.bytes <= self.graph_headroom

    @property
    def blocks(self) -> int:
        return max(self.kv_cache, 0) // self.page_bytes

    @property
    def tokens(self) -> int:
        return self.blocks * self.block_size

    @property
    def max_concurrency(self) -> float:
        """Requests of ``max_model_len`` tokens the cache holds at once (each rounded up to blocks)."""
        per_request = -(-self.max_model_len // self.block_size)
        return self.blocks / per_request


def rotary_cache_bytes(model: ModelConfig, dtype: DType) -> int:
    """vLLM's RotaryEmbedding keeps ``cos_sin_cache`` of max_position x rotary_dim per distinct
    embedding (one for a model with one rope configuration)."""
    if model.position_embedding is not PositionKind.ROTARY:
        return 0
    rotary_dim = model.mla.qk_rope_head_dim if model.mla is not None else model.attention_head_dim
    return storage_bytes(model.max_position_embeddings * rotary_dim, dtype)


def _static_weights(model: ModelConfig, settings: InferSettings, engine: Engine) -> int:
    """The estimate's weight lines on one TP rank (parameters in their format, with scales)."""
    from memcalc.estimate.breakdown import Kind
    from memcalc.estimate.inference import estimate_inference

    estimate = estimate_inference(model, replace(settings, engine=engine))
    return sum(component.bytes for component in estimate.components if component.kind is Kind.STATIC)


def _profile_peak(model: ModelConfig, settings: InferSettings, engine: Engine, tokens: int) -> tuple[int, str]:
    """memcalc's estimate of one profile forward of ``tokens`` tokens: its activations and logits
    (TensorRT-LLM's dummy run; vLLM's profile run is ``vllm_profile``)."""
    from memcalc.estimate.inference import estimate_inference

    tokens = min(tokens, model.max_position_embeddings)
    profile = estimate_inference(model, replace(settings, engine=engine, batch_size=1, context_len=None,
                                                prompt_len=tokens, max_new_tokens=0, prefill_chunk=None,
                                                num_beams=1, decoding=None, num_return_sequences=1, top_k=None,
                                                top_p=None, temperature=1.0))
    return (profile.component("activations").bytes + profile.component("logits").bytes,
            f"estimate: one forward of {tokens} tokens")


def _max_model_len(model: ModelConfig, settings: InferSettings) -> int:
    length = settings.context_len or settings.prompt_len or model.max_position_embeddings
    return length + (settings.max_new_tokens if settings.prompt_len else 0)


def vllm_budget(model: ModelConfig, settings: InferSettings, total_memory: int, utilization: float,
                max_num_batched_tokens: int, calibration: Calibration | None = None,
                graph_options: VLLMGraphOptions | None = None) -> VLLMBudget:
    from memcalc.estimate.device import nccl_bytes
    from memcalc.estimate.inference import kv_cache_bytes_per_token, kv_dtype_for

    dtype = DType(settings.dtype)
    rotary = rotary_cache_bytes(model, dtype)
    weights = _static_weights(model, settings, Engine.VLLM) + rotary
    graph_options = graph_options or VLLMGraphOptions()
    seqs = graph_options.max_num_seqs or vllm_default_max_num_seqs(total_memory, graph_options.gpu_name,
                                                                   max_num_batched_tokens)
    profile = vllm_profile(model, settings, graph_options.version, max_num_batched_tokens, seqs,
                           graph_options.gpu_name, graph_options.architecture)
    if calibration is not None and calibration.activation_peak_bytes is not None:
        activation, activation_from = calibration.activation_peak_bytes, calibration.source
    else:
        activation, activation_from = profile.peak, profile.describe()
    if calibration is not None and calibration.non_torch_bytes is not None:
        non_torch, non_torch_from = calibration.non_torch_bytes, calibration.source
    else:
        nccl = nccl_bytes((settings.tp,) if settings.tp > 1 else ())
        non_torch = DEFAULT_NON_TORCH_BYTES + nccl
        non_torch_from = "default: 0.12 GiB (vLLM log, H100, TP 1)" + (" + NCCL" if nccl else "")
    per_token = kv_cache_bytes_per_token(model, kv_dtype_for(settings), settings.tp, Engine.VLLM)
    block = settings.block_size
    cudagraphs = vllm_cuda_graphs(model, settings, total_memory, max_num_batched_tokens, graph_options)
    return VLLMBudget(total_memory, utilization, weights, rotary, activation, activation_from, non_torch,
                      non_torch_from, max_num_batched_tokens, block, per_token * block, _max_model_len(model, settings),
                      cudagraphs, profile)


# --- What the engines below share ----------------------------------------------------------------------


def _check_modelled(model: ModelConfig, engine: Engine) -> None:
    """Mamba and linear-attention layers keep a recurrent state pool that none of the three
    engines' budgets below models (SGLang's handle_max_mamba_cache, TensorRT-LLM's Mamba cache
    managers, llama.cpp's recurrent memory): refuse rather than size a pool without it."""
    from memcalc.estimate.inference import recurrent_layers

    if recurrent_layers(model):
        raise SettingsError(Field("engine"), f" {engine.value}: {model.name} has Mamba or linear-attention layers, "
                            "whose state pool this engine's budget does not model yet (docs/serving.md)")


def _sliding_note(model: ModelConfig, engine_name: str, pool: str) -> tuple[str, ...]:
    if not model.num_sliding_layers:
        return ()
    return (f"{model.num_sliding_layers} sliding-window layers: {engine_name} keeps them in {pool}, not modelled; "
            "the pool is sized as if every layer held every token",)


def _is_gguf_format(weights: str | None) -> bool:
    """A GGUF block type (q4_0, q4_k, ...: memcalc.estimate.weights.WeightFormat)."""
    from memcalc.estimate.weights import WeightFormat

    return weights is not None and weights.lower() in {fmt.value for fmt in WeightFormat if fmt.value.startswith("q")}


def _runtime_before_load(settings: InferSettings) -> tuple[int, str]:
    """What a process holds before it loads weights: the CUDA context (memcalc's 400 MiB) and,
    under TP, NCCL's buffers; or ``--overhead``."""
    from memcalc.estimate.device import CUDA_CONTEXT_BYTES, nccl_bytes

    if settings.overhead_bytes is not None:
        return settings.overhead_bytes, "as given (--overhead)"
    nccl = nccl_bytes((settings.tp,) if settings.tp > 1 else ())
    return CUDA_CONTEXT_BYTES + nccl, "default: CUDA context 400 MiB" + (" + NCCL" if nccl else "")


# --- SGLang --------------------------------------------------------------------------------------------

SGLANG_VERSION = "0.5.12"
SGLANG_SOURCE = ("python/sglang/srt/server_args.py (ServerArgs._handle_gpu_memory_settings), "
                 "srt/model_executor/model_runner_kv_cache_mixin.py (_profile_available_bytes), "
                 "srt/model_executor/pool_configurator.py")
# SGLang reads the card's memory from nvidia-smi's memory.total, in MiB (srt/utils/common.py
# get_nvgpu_memory_capacity), a few hundred MiB above what CUDA reports. Where a log printed it:
NVIDIA_SMI_TOTAL_MIB = {
    "h100-80gb": 81559,  # configs/gpus.yaml: nvidia-smi on the deviceQuery machine of the H100's usable_bytes
    "a100-80gb": 81920,  # configs/gpus.yaml: "nvidia-smi shows an A100 80GB as 81920 MiB"
    "l40s-48gb": 46068,  # configs/gpus.yaml: "nvidia-smi shows 46068 MiB"
}


def sglang_gpu_defaults(gpu_mem_mib: float, tp: int) -> tuple[int, int]:
    """(chunked_prefill_size, cuda_graph_max_bs) by GPU memory in MiB and TP, as
    _handle_gpu_memory_settings sets them on CUDA (the NPU branches aside)."""
    if gpu_mem_mib < 20 * 1024:
        return 2048, 8  # T4, 4080
    if gpu_mem_mib < 35 * 1024:
        return 2048, 24 if tp < 4 else 80  # A10, 4090, 5090
    if gpu_mem_mib < 60 * 1024:
        return 4096, 32 if tp < 4 else 160  # A100 40GB, L40
    if gpu_mem_mib < 160 * 1024:
        return 8192, 256 if tp < 4 else 512  # H100, A100 80GB; H20, H200
    return 16384, 512  # B200, MI300


def sglang_piecewise_tokens(max_tokens: int) -> list[int]:
    """The token counts SGLang captures a piecewise CUDA graph for (_generate_piecewise_cuda_graph_tokens)."""
    sizes = [*range(4, 33, 4), *range(48, 257, 16), *range(288, 513, 32), *range(576, 1025, 64),
             *range(1280, 4097, 256), *range(4608, max_tokens + 1, 512)]
    return [size for size in sizes if size <= max_tokens]


def sglang_mem_fraction_static(gpu_mem_mib: float, tp: int, chunked_prefill_size: int, cuda_graph_max_bs: int,
                               mla: bool = False, piecewise_tokens: int | None = None) -> tuple[float, float]:
    """(mem_fraction_static, reserved MiB): 512 MiB of metadata, 1.5 MiB per prefill token
    (at least 2048), 2 MiB per CUDA-graph batch, 1 GiB per 8 TP ranks, the piecewise CUDA graphs'
    non-torch memory (8 MiB per captured size; 1.5 GiB with MLA) unless they are off
    (``piecewise_tokens`` None), at least 10 GiB on cards above 60 GiB; rounded to 3 decimals."""
    reserved = 512 + max(chunked_prefill_size, 2048) * 1.5 + cuda_graph_max_bs * 2 + tp / 8 * 1024
    if piecewise_tokens is not None:
        reserved += 1.5 * 1024 if mla else len(sglang_piecewise_tokens(piecewise_tokens)) * 8
    if gpu_mem_mib > 60 * 1024:
        reserved = max(reserved, 10 * 1024)
    return round((gpu_mem_mib - reserved) / gpu_mem_mib, 3), reserved


@dataclass(frozen=True, eq=False)
class SGLangBudget:
    version: str
    source: str
    total_memory: int  # what CUDA reports
    gpu_mem_mib: float  # what the fraction rule reads (nvidia-smi's total)
    gpu_mem_from: str
    tp: int
    chunked_prefill_size: int
    cuda_graph_max_bs: int
    piecewise_tokens: int | None  # the largest piecewise CUDA graph; None: piecewise graphs off
    reserved_mib: float | None  # the rule's reserve; None when the fraction is given
    mem_fraction_static: float
    fraction_from: str
    before_load: int  # CUDA context and NCCL, held before the weights load
    before_load_from: str
    weights: int
    rotary_cache: int  # part of ``weights``: fp32 cos_sin_cache on CUDA
    cell_bytes: int  # K and V of one token over the layers, on one rank
    page_size: int
    max_model_len: int
    notes: tuple[str, ...] = ()

    @property
    def free_before_load(self) -> int:
        return self.total_memory - self.before_load

    @property
    def static(self) -> int:
        """Weights and KV pool together: mem_fraction_static of the memory free before loading."""
        return int(self.free_before_load * self.mem_fraction_static)

    @property
    def kv_cache(self) -> int:
        return self.static - self.weights

    @property
    def tokens(self) -> int:
        """max_total_num_tokens: whole cells, in whole pages."""
        return max(self.kv_cache, 0) // self.cell_bytes // self.page_size * self.page_size

    @property
    def k_size(self) -> int:
        """The K buffers (the V buffers are as large): what "K size: ... GB" prints, in bytes."""
        return self.tokens * self.cell_bytes // 2

    @property
    def headroom(self) -> int:
        """Left for activations and CUDA graphs: (1 - fraction) of the memory free before loading."""
        return self.free_before_load - self.static

    @property
    def max_concurrency(self) -> float:
        return self.tokens / self.max_model_len


def sglang_budget(model: ModelConfig, settings: InferSettings, total_memory: int, gpu_name: str = "",
                  vendor: str = "nvidia", mem_fraction_static: float | None = None,
                  chunked_prefill_size: int | None = None, gguf: bool = False) -> SGLangBudget:
    from memcalc.estimate.inference import kv_cache_bytes_per_token, kv_dtype_for

    _check_modelled(model, Engine.SGLANG)
    if mem_fraction_static is not None and not 0 < mem_fraction_static <= 1:
        raise SettingsError(Field("memory_fraction"), f" must be in (0, 1], got {mem_fraction_static}")
    smi = NVIDIA_SMI_TOTAL_MIB.get(gpu_name)
    gpu_mem = smi if smi is not None else total_memory / MiB
    gpu_mem_from = ("nvidia-smi's total (configs/gpus.yaml)" if smi is not None
                    else "CUDA's total: nvidia-smi's, which SGLang reads, is not recorded for this card")
    chunk, max_bs = sglang_gpu_defaults(gpu_mem, settings.tp)
    chunk = chunked_prefill_size or chunk
    notes = list(_sliding_note(model, "SGLang", "a hybrid SWA pool (HybridSWAPoolConfigurator)"))
    # _handle_piecewise_cuda_graph: off on AMD (HIP), for multimodal models and GGUF checkpoints
    piecewise_off = vendor != "nvidia" or model.vision is not None or gguf or _is_gguf_format(settings.weights)
    piecewise = None
    if not piecewise_off:
        piecewise = 2048 if model.mla is not None else chunk
        if any("llama-2" in name.lower() for name in (model.name, *model.aliases)):
            piecewise = min(piecewise, 4096)  # the rule's own cap for Llama-2 model paths
    if mem_fraction_static is None:
        fraction, reserved = sglang_mem_fraction_static(gpu_mem, settings.tp, chunk, max_bs, model.mla is not None,
                                                        piecewise)
        fraction_from = f"sglang {SGLANG_VERSION} rule: (GPU memory - reserve) / GPU memory"
        if model.vision is not None:
            notes.append("multimodal: SGLang lowers the fraction further for the vision tower "
                         "(adjust_mem_fraction_for_vlm), not modelled")
    else:
        fraction, reserved, fraction_from = mem_fraction_static, None, "as given (--memory-fraction)"
    before_load, before_load_from = _runtime_before_load(settings)
    rotary = 0
    if model.position_embedding is PositionKind.ROTARY and vendor == "nvidia":
        rotary_dim = model.mla.qk_rope_head_dim if model.mla is not None else model.attention_head_dim
        rotary = storage_bytes(model.max_position_embeddings * rotary_dim, DType.FP32)  # kept in fp32 on CUDA
    weights = _static_weights(model, settings, Engine.SGLANG) + rotary
    cell = kv_cache_bytes_per_token(model, kv_dtype_for(settings), settings.tp, Engine.SGLANG)
    return SGLangBudget(f"sglang {SGLANG_VERSION}, the PyPI wheel", SGLANG_SOURCE, total_memory, gpu_mem,
                        gpu_mem_from, settings.tp, chunk, max_bs, piecewise, reserved, fraction, fraction_from,
                        before_load, before_load_from, weights, rotary, cell, 1, _max_model_len(model, settings),
                        tuple(notes))


# --- TensorRT-LLM --------------------------------------------------------------------------------------

TRTLLM_SOURCE = ("tensorrt_llm/_torch/pyexecutor/_util.py (KvCacheCreator.configure_kv_cache_capacity, "
                 "_cal_max_memory), tensorrt_llm/llmapi/llm_args.py (KvCacheConfig)")
TRTLLM_VERSION = "TensorRT-LLM PyTorch backend, NVIDIA/TensorRT-LLM main at 0004396"
DEFAULT_FREE_GPU_MEMORY_FRACTION = 0.9  # KvCacheConfig.free_gpu_memory_fraction
DEFAULT_MAX_NUM_TOKENS = 8192  # max_num_tokens: the profiling run's tokens
TRTLLM_TOKENS_PER_BLOCK = 32  # KvCacheConfig.tokens_per_block


@dataclass(frozen=True, eq=False)
class TRTLLMBudget:
    version: str
    source: str
    total_memory: int
    fraction: float
    weights: int
    activation_peak: int
    activation_from: str
    non_torch: int  # outside torch: CUDA context, cuBLAS, NCCL (and CUDA graphs)
    non_torch_from: str
    max_num_tokens: int
    tokens_per_block: int
    token_bytes: int  # KV of one token over the layers, on one rank
    max_model_len: int
    notes: tuple[str, ...] = ()

    @property
    def peak(self) -> int:
        return self.weights + self.activation_peak + self.non_torch

    @property
    def free(self) -> int:
        return self.total_memory - self.peak

    @property
    def kv_cache(self) -> int:
        """(total - peak) x free_gpu_memory_fraction."""
        return int(self.free * self.fraction)

    @property
    def blocks(self) -> int:
        return max(self.kv_cache, 0) // self.token_bytes // self.tokens_per_block

    @property
    def tokens(self) -> int:
        return self.blocks * self.tokens_per_block

    @property
    def max_concurrency(self) -> float:
        return self.blocks / -(-self.max_model_len // self.tokens_per_block)


def trtllm_budget(model: ModelConfig, settings: InferSettings, total_memory: int,
                  free_gpu_memory_fraction: float | None = None, max_num_tokens: int | None = None) -> TRTLLMBudget:
    from memcalc.estimate.device import CUBLAS_WORKSPACE_BYTES
    from memcalc.estimate.inference import kv_cache_bytes_per_token, kv_dtype_for

    _check_modelled(model, Engine.TRTLLM)
    fraction = DEFAULT_FREE_GPU_MEMORY_FRACTION if free_gpu_memory_fraction is None else free_gpu_memory_fraction
    if not 0 < fraction <= 1:
        raise SettingsError(Field("memory_fraction"), f" must be in (0, 1], got {fraction}")
    tokens = max_num_tokens or DEFAULT_MAX_NUM_TOKENS
    activation, activation_from = _profile_peak(model, settings, Engine.TRTLLM, tokens)
    before_load, before_from = _runtime_before_load(settings)
    non_torch = before_load + (CUBLAS_WORKSPACE_BYTES if settings.overhead_bytes is None else 0)
    non_torch_from = before_from + (" + cuBLAS 32 MiB" if settings.overhead_bytes is None else "")
    per_token = kv_cache_bytes_per_token(model, kv_dtype_for(settings), settings.tp, Engine.TRTLLM)
    notes = ("CUDA graphs captured before the profile count outside torch; memcalc adds none for them",
             *_sliding_note(model, "TensorRT-LLM", "per-window pools (VSWA)"))
    return TRTLLMBudget(TRTLLM_VERSION, TRTLLM_SOURCE, total_memory, fraction,
                        _static_weights(model, settings, Engine.TRTLLM), activation, activation_from, non_torch,
                        non_torch_from, tokens, TRTLLM_TOKENS_PER_BLOCK, per_token, _max_model_len(model, settings),
                        notes)


# --- llama.cpp -----------------------------------------------------------------------------------------

LLAMACPP_SOURCE = ("src/llama-context.cpp (n_ctx padded to 256), src/llama-kv-cache.cpp, "
                   "src/llama-model.cpp (load_tensors: the layer split)")
LLAMACPP_VERSION = "llama.cpp master after ggml-org/llama.cpp#17046"
LLAMACPP_CTX_PAD = 256
# ggml's block layouts of the cache types llama.cpp accepts for --cache-type-k/v: (elements, bytes)
GGML_CACHE_TYPES = {"f32": (1, 4), "f16": (1, 2), "bf16": (1, 2), "q8_0": (32, 34), "q4_0": (32, 18),
                    "q4_1": (32, 20), "iq4_nl": (32, 18), "q5_0": (32, 22), "q5_1": (32, 24)}
DEFAULT_UBATCH = 512


def ggml_row_bytes(type_name: str, elements: int) -> int:
    """ggml_row_size: ``elements`` values of a ggml type, whole blocks."""
    block, size = GGML_CACHE_TYPES[type_name]
    if elements % block:
        raise SettingsError(Field("cache_type_k"), f": {type_name} packs {block} values a block; a row of {elements} "
                            "does not divide")
    return elements // block * size


@dataclass(frozen=True)
class LlamaCppWeights:
    """Bytes of the input embedding (kept on the CPU), each repeating layer, and the output layer
    (norm and head; a tied head is a copy of the embedding on the output device)."""

    embedding: int
    layers: tuple[int, ...]
    output: int
    source: str

    @classmethod
    def from_gguf(cls, tensors, source: str) -> LlamaCppWeights:
        """Per-tensor bytes of a .gguf file (memcalc.gguf_file.GGUFTensor: name, nbytes)."""
        layers: dict[int, int] = {}
        embedding = output = 0
        has_head = False
        for tensor in tensors:
            if tensor.name.startswith("blk."):
                index = int(tensor.name.split(".")[1])
                layers[index] = layers.get(index, 0) + tensor.nbytes
            elif tensor.name == "token_embd.weight":
                embedding = tensor.nbytes
            elif tensor.name.startswith("output"):
                output += tensor.nbytes
                has_head = has_head or tensor.name == "output.weight"
            else:
                embedding += tensor.nbytes  # rope factors and the like: with the input, on the CPU
        if not has_head:
            output += embedding  # tied: llama.cpp duplicates token_embd as the output tensor
        count = max(layers) + 1 if layers else 0
        return cls(embedding, tuple(layers.get(index, 0) for index in range(count)), output, source)

    @classmethod
    def from_estimate(cls, model: ModelConfig, total: int, source: str) -> LlamaCppWeights:
        """``total`` bytes split by parameter count: the embedding, equal layers, and the head
        (a tied head counted again), each at the checkpoint's mean bytes per parameter."""
        from memcalc.estimate.params import ParamCategory, count_params

        counts = count_params(model).by_category()
        parameters = sum(counts.values())
        embedding_params = counts.get(ParamCategory.EMBEDDING, 0)
        head_params = counts.get(ParamCategory.OUTPUT_HEAD, 0)
        # a multimodal checkpoint's vision tower and projector: llama.cpp loads them from a separate
        # mmproj file, outside this budget
        vision = counts.get(ParamCategory.VISION_TOWER, 0) + counts.get(ParamCategory.PROJECTOR, 0)
        norm = model.hidden_size  # the final norm, with the output
        layer_params = parameters - embedding_params - head_params - norm - vision
        per_param = total / parameters
        head = head_params if head_params else embedding_params
        if vision:
            source += "; the vision tower left out (llama.cpp loads it from an mmproj file)"
        return cls(round(embedding_params * per_param), (round(layer_params * per_param / model.num_layers),)
                   * model.num_layers, round((head + norm) * per_param), source)


@dataclass(frozen=True)
class LlamaCppDevice:
    name: str  # "CUDA0", ..., "CPU"
    layers: tuple[int, ...]  # repeating layers held here
    output: bool  # the output layer
    weights: int
    kv_cache: int
    compute: int  # the compute buffer: a floor, or as given
    context: int  # the CUDA context (memcalc's 400 MiB; 0 on the CPU)

    @property
    def total(self) -> int:
        return self.weights + self.kv_cache + self.compute + self.context


@dataclass(frozen=True, eq=False)
class LlamaCppBudget:
    version: str
    source: str
    n_ctx_requested: int
    n_ctx: int
    n_ubatch: int
    type_k: str
    type_v: str
    flash_attn: bool
    n_gpu_layers: int
    tensor_split: tuple[float, ...]
    weights_from: str
    compute_from: str
    kv_k: int  # K of all layers, all cells (llama.cpp's "K (f16): ... MiB")
    kv_v: int
    host_compute: int  # the CPU-side compute buffer: the graph inputs (embeddings, mask)
    devices: tuple[LlamaCppDevice, ...]  # the GPUs, then the CPU
    device_memory: int  # each GPU's usable memory
    notes: tuple[str, ...] = ()

    @property
    def kv_cache(self) -> int:
        return self.kv_k + self.kv_v

    @property
    def gpus(self) -> tuple[LlamaCppDevice, ...]:
        return tuple(device for device in self.devices if device.name != "CPU")

    @property
    def fits(self) -> bool:
        return all(device.total <= self.device_memory for device in self.gpus)


def llamacpp_layer_devices(n_layer: int, splits: tuple[float, ...], n_gpu_layers: int) -> list[int | None]:
    """The device of each repeating layer and, last, of the output layer (None: the CPU), as
    llama_model::load_tensors assigns them: the last ``n_gpu_layers`` of the ``n_layer + 1`` slots
    go to the GPUs, slot ``il`` to the first device whose cumulative split exceeds
    ``(il - i_gpu_start) / act_gpu_layers``."""
    total = sum(splits)
    cumulative, running = [], 0.0
    for split in splits:
        running += split
        cumulative.append(running / total)
    start = max(n_layer + 1 - n_gpu_layers, 0)
    active = min(n_gpu_layers, n_layer + 1)
    devices: list[int | None] = []
    for slot in range(n_layer + 1):
        if slot < start or slot - start >= active:
            devices.append(None)
        else:
            devices.append(min(bisect.bisect_right(cumulative, (slot - start) / active), len(splits) - 1))
    return devices


def llamacpp_budget(model: ModelConfig, settings: InferSettings, weights: LlamaCppWeights, device_memory: int,
                    n_ctx: int, type_k: str = "f16", type_v: str = "f16", tensor_split: tuple[float, ...] = (1.0,),
                    n_gpu_layers: int | None = None, n_ubatch: int = DEFAULT_UBATCH, flash_attn: bool = True,
                    compute_buffer: int | None = None) -> LlamaCppBudget:
    """llama.cpp's allocation on each device for ``n_ctx`` cells (every sequence's tokens together,
    as ``-c`` counts them)."""
    from memcalc.estimate.device import CUDA_CONTEXT_BYTES

    _check_modelled(model, Engine.LLAMACPP)
    if model.mla is not None:
        raise SettingsError(Field("engine"), f" llamacpp: {model.name} uses multi-head latent attention, whose cache "
                            "layout llama.cpp has changed between versions; not modelled (docs/serving.md)")
    for field, name in (("cache_type_k", type_k), ("cache_type_v", type_v)):
        if name not in GGML_CACHE_TYPES:
            raise SettingsError(Field(field), f": {name!r} is not one of {', '.join(GGML_CACHE_TYPES)}")
    if GGML_CACHE_TYPES[type_v][0] > 1 and not flash_attn:
        raise SettingsError(Field("cache_type_v"), f" {type_v}: llama.cpp quantizes the V cache only with flash "
                            "attention")
    if not tensor_split or any(split < 0 for split in tensor_split) or not sum(tensor_split):
        raise SettingsError(Field("tensor_split"), ": give non-negative proportions, not all zero, e.g. 3,1")
    if len(weights.layers) != model.num_layers:
        raise SettingsError(Field("engine"), f" llamacpp: the weights hold {len(weights.layers)} layers; "
                            f"{model.name} has {model.num_layers}")
    n_layer = model.num_layers
    gpu_layers = n_layer + 1 if n_gpu_layers is None else n_gpu_layers
    padded = -(-n_ctx // LLAMACPP_CTX_PAD) * LLAMACPP_CTX_PAD
    notes: list[str] = []
    # interleaved sliding-window layers (a pattern or layer_types) get llama.cpp's iSWA cache of
    # min(n_ctx, pad(n_swa x (unified ? n_seq_max : 1) + n_ubatch, 256)) cells (llama-kv-cache-iswa.cpp),
    # here with one sequence; a model where every layer slides without a pattern (Mistral v0.1) runs
    # as the llama architecture, which has no window
    kinds = model.resolved_layer_types
    interleaved = LayerType.FULL_ATTENTION in kinds and LayerType.SLIDING_ATTENTION in kinds
    swa_cells = padded
    if interleaved:
        swa_cells = min(padded, -(-(model.sliding_window + n_ubatch) // LLAMACPP_CTX_PAD) * LLAMACPP_CTX_PAD)
    elif model.num_sliding_layers:
        notes.append("every layer slides without a pattern: llama.cpp's llama architecture has no sliding window; "
                     "the cache holds all n_ctx cells")
    if LayerType.CHUNKED_ATTENTION in kinds:
        notes.append("chunked-attention layers counted at full n_ctx (llama.cpp's chunked cache not modelled)")
    n_embd_gqa = model.kv_heads * model.attention_head_dim
    k_row, v_row = ggml_row_bytes(type_k, n_embd_gqa), ggml_row_bytes(type_v, n_embd_gqa)

    def cells(layer: int) -> int:
        return swa_cells if interleaved and kinds[layer] is LayerType.SLIDING_ATTENTION else padded

    placement = llamacpp_layer_devices(n_layer, tensor_split, gpu_layers)
    kv_k = sum(cells(layer) * k_row for layer in range(n_layer))
    kv_v = sum(cells(layer) * v_row for layer in range(n_layer))
    # compute buffers: the f32 attention scores and mask of one ubatch without flash attention,
    # the f32 logits of n_ubatch outputs on the output device; the rest of the worst-case graph
    # (llama.cpp's ggml_gallocr reserve) is not replayed
    scores = (model.num_attention_heads * padded * n_ubatch + padded * n_ubatch) * 4 if not flash_attn else 0
    logits = model.vocab_size * n_ubatch * 4
    if compute_buffer is not None:
        compute_from = "as given (--compute-buffer)"
    else:
        compute_from = ("floor: the f32 attention scores and mask of one ubatch (no flash attention), or the f32 "
                        "logits of n_ubatch outputs; the rest of the graph is not computed" if not flash_attn else
                        "floor: the f32 logits of n_ubatch outputs; with flash attention the rest of the graph is "
                        "not computed")
    devices = []
    for index in range(len(tensor_split)):
        held = tuple(layer for layer in range(n_layer) if placement[layer] == index)
        output = placement[n_layer] == index
        if not held and not output:
            continue
        weight_bytes = sum(weights.layers[layer] for layer in held) + (weights.output if output else 0)
        kv = sum(cells(layer) * (k_row + v_row) for layer in held)
        floor = max(scores if held else 0, logits if output else 0)
        devices.append(LlamaCppDevice(f"CUDA{index}", held, output, weight_bytes, kv,
                                      compute_buffer if compute_buffer is not None else floor, CUDA_CONTEXT_BYTES))
    cpu_layers = tuple(layer for layer in range(n_layer) if placement[layer] is None)
    cpu_output = placement[n_layer] is None
    host_compute = (model.hidden_size * n_ubatch + padded * n_ubatch) * 4  # input embeddings and the f32 mask
    devices.append(LlamaCppDevice(
        "CPU", cpu_layers, cpu_output,
        weights.embedding + sum(weights.layers[layer] for layer in cpu_layers) + (weights.output if cpu_output else 0),
        sum(cells(layer) * (k_row + v_row) for layer in cpu_layers), host_compute, 0))
    if settings.tp > 1:
        notes.append("--tp is ignored: llama.cpp splits layers over the devices of --tensor-split")
    return LlamaCppBudget(LLAMACPP_VERSION, LLAMACPP_SOURCE, n_ctx, padded, n_ubatch, type_k, type_v, flash_attn,
                          gpu_layers, tuple(tensor_split), weights.source, compute_from, kv_k, kv_v, host_compute,
                          tuple(devices), device_memory, tuple(notes))
