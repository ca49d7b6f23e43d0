"""Serving engines' own start-up budgets: how much of the card an engine gives its KV cache.

vLLM (V1 engine: vllm/v1/worker/gpu_worker.py ``determine_available_memory``, vllm/utils
``memory_profiling``, vllm/v1/core/kv_cache_utils.py; ../shared/reference, sec. 3a):

- it asks for ``gpu_memory_utilization`` x the device's total memory (what CUDA reports);
- it loads the weights ("model weights take A GiB": the parameters plus each rotary embedding's
  ``cos_sin_cache`` of max_position x rotary_dim in the model dtype);
- it profiles one forward of ``max_num_batched_tokens`` tokens: the torch activation peak;
- it counts the non-torch increase (NCCL, cuBLAS and other allocations outside PyTorch);
- what is left is the KV cache: ``num_blocks = kv_bytes // page_size // layers`` with a page of
  ``block_size`` tokens of one layer; tokens = blocks x block_size.

CUDA graphs are captured after the KV cache is allocated, out of the ``1 - utilization`` headroom,
so they do not shrink it. The weights are the estimator's (exact against vLLM's own figure for the
published logs in tests/test_serving.py); the activation peak is memcalc's prefill estimate of one
forward of that many tokens and is approximate (vLLM's profile has changed between versions: a
calibration from a real start-up log, ``memcalc calibrate``, replaces it); the non-torch increase
defaults to the 0.12 GiB a Llama-3.1-8B start-up on an H100 at TP 1 logged, plus NCCL's buffers
(memcalc.estimate.device) under tensor parallelism.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from memcalc.config import Engine, InferSettings, ModelConfig, PositionKind
from memcalc.dtypes import DType, storage_bytes

GiB = 2**30
# vLLM start-up log of Llama-3.1-8B on an H100 80GB at TP 1 ("non_torch_memory takes 0.12GiB";
# ../shared/reference/inference-and-precision.md sec. 6).
DEFAULT_NON_TORCH_BYTES = round(0.12 * GiB)
# EngineArgs.get_batch_defaults for the API server (vllm serve): 8192 tokens per step on GPUs of
# at least 70 GiB other than the A100, else 2048 (the LLM class uses 16384 / 8192).
LARGE_GPU_BATCHED_TOKENS, SMALL_GPU_BATCHED_TOKENS = 8192, 2048


def default_batched_tokens(gpu_memory: int, gpu_name: str) -> int:
    large = gpu_memory >= 70 * GiB and "a100" not in gpu_name.lower()
    return LARGE_GPU_BATCHED_TOKENS if large else SMALL_GPU_BATCHED_TOKENS


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

    @property
    def requested(self) -> int:
        return int(self.total_memory * self.utilization)

    @property
    def kv_cache(self) -> int:
        return self.requested - self.weights - self.activation_peak - self.non_torch

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


def vllm_budget(model: ModelConfig, settings: InferSettings, total_memory: int, utilization: float,
                max_num_batched_tokens: int, calibration: Calibration | None = None) -> VLLMBudget:
    from memcalc.estimate.device import nccl_bytes
    from memcalc.estimate.inference import estimate_inference, kv_cache_bytes_per_token, kv_dtype_for
    from memcalc.estimate.breakdown import Kind

    paged = replace(settings, engine=Engine.VLLM)
    estimate = estimate_inference(model, paged)
    dtype = DType(settings.dtype)
    rotary = rotary_cache_bytes(model, dtype)
    weights = sum(component.bytes for component in estimate.components if component.kind is Kind.STATIC) + rotary
    if calibration is not None and calibration.activation_peak_bytes is not None:
        activation, activation_from = calibration.activation_peak_bytes, calibration.source
    else:
        tokens = min(max_num_batched_tokens, model.max_position_embeddings)
        profile = estimate_inference(model, replace(paged, batch_size=1, context_len=None, prompt_len=tokens,
                                                    max_new_tokens=0, prefill_chunk=None, num_beams=1,
                                                    decoding=None, num_return_sequences=1, top_k=None, top_p=None,
                                                    temperature=1.0))
        activation = profile.component("activations").bytes + profile.component("logits").bytes
        activation_from = f"estimate: one forward of {tokens} tokens"
    if calibration is not None and calibration.non_torch_bytes is not None:
        non_torch, non_torch_from = calibration.non_torch_bytes, calibration.source
    else:
        nccl = nccl_bytes((settings.tp,) if settings.tp > 1 else ())
        non_torch = DEFAULT_NON_TORCH_BYTES + nccl
        non_torch_from = "default: 0.12 GiB (vLLM log, H100, TP 1)" + (" + NCCL" if nccl else "")
    per_token = kv_cache_bytes_per_token(model, kv_dtype_for(settings), settings.tp, Engine.VLLM)
    block = settings.block_size
    max_model_len = settings.context_len or settings.prompt_len or model.max_position_embeddings
    return VLLMBudget(total_memory, utilization, weights, rotary, activation, activation_from, non_torch,
                      non_torch_from, max_num_batched_tokens, block, per_token * block,
                      max_model_len + (settings.max_new_tokens if settings.prompt_len else 0))
