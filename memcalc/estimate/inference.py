"""Inference memory, first form: weights, the KV cache, and the 1.2x rule of thumb."""

from __future__ import annotations

from memcalc.config import InferSettings, ModelConfig, resolve_seq_len
from memcalc.dtypes import DType, storage_bytes
from memcalc.estimate.breakdown import Component, Estimate, Kind
from memcalc.estimate.params import count_params

_FLOAT_DTYPES = {DType.FP32, DType.FP16, DType.BF16}

# EleutherAI, "Transformer Math 101" (2023): inference needs about 20% over the weights;
# repeated in the Hugging Face accelerate docs (usage_guides/model_size_estimator).
RULE_OF_THUMB_FACTOR_NUMERATOR, RULE_OF_THUMB_FACTOR_DENOMINATOR = 6, 5


def kv_dtype_for(settings: InferSettings) -> DType:
    if settings.kv_dtype is not None:
        return DType(settings.kv_dtype)
    weights = DType(settings.dtype)
    return weights if weights in _FLOAT_DTYPES else DType.BF16


def kv_cache_bytes_per_token(model: ModelConfig, kv_dtype: DType) -> int:
    """Keys and values of every layer for one token: ``2 x L x kv_heads x head_dim x bytes``
    (GQA/MQA store ``kv_heads`` heads, not ``num_attention_heads``)."""
    return storage_bytes(2 * model.num_layers * model.kv_heads * model.attention_head_dim, kv_dtype)


def estimate_inference(model: ModelConfig, settings: InferSettings) -> Estimate:
    params = count_params(model)
    weight_dtype = DType(settings.dtype)
    kv_dtype = kv_dtype_for(settings)
    context_len = resolve_seq_len(model, settings.context_len)
    weights = storage_bytes(params.total, weight_dtype)
    per_token = kv_cache_bytes_per_token(model, kv_dtype)
    kv_cache = per_token * context_len * settings.batch_size
    rule_of_thumb = -(-weights * RULE_OF_THUMB_FACTOR_NUMERATOR // RULE_OF_THUMB_FACTOR_DENOMINATOR)

    weight_note = (
        f"P x {weight_dtype.value}"
        if weight_dtype in _FLOAT_DTYPES
        else f"P x {weight_dtype.value}, every tensor, no quantisation scales"
    )
    components = (
        Component("weights", "Weights", weights, Kind.STATIC, weight_note, "parameter count x bytes per element"),
        Component("kv_cache", "KV cache", kv_cache, Kind.DYNAMIC,
                  f"2 x L x kv_heads x head_dim x {kv_dtype.value} x tokens x batch",
                  "one key and one value vector per layer, KV head and token"),
    )
    references = (
        Component("rule_of_thumb_total", "Rule of thumb (1.2 x weights)", rule_of_thumb, Kind.STATIC,
                  "1.2 x weights", "EleutherAI, Transformer Math 101 (2023)"),
    )
    checkpoint = (
        Component("weights_only", "Weights only", weights, Kind.STATIC, weight_note, "parameter count x bytes per element"),
    )
    resolved = {
        "dtype": weight_dtype.value,
        "kv_dtype": kv_dtype.value,
        "batch_size": settings.batch_size,
        "context_len": context_len,
        "kv_cache_bytes_per_token": per_token,
        "kv_cache_bytes_per_sequence": per_token * context_len,
        "sliding_window": "not applied: every token is cached",
    }
    return Estimate(model, params, resolved, components, references=references, checkpoint=checkpoint)
