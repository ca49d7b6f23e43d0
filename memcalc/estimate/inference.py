"""Inference memory: weights, the KV cache, and the activations of prefill and decoding.

The workload is a Hugging Face ``generate()``: the prompt is repeated for every beam and run in
one forward (prefill), then each new token runs one step that appends to the cache by
concatenation. The total is the larger of the prefill and decode peaks; the 1.2x rule of thumb
is shown beside it for reference.
"""

from __future__ import annotations

from memcalc.config import InferSettings, MLPKind, ModelConfig, resolve_seq_len
from memcalc.dtypes import BITS_PER_ELEMENT, DType, storage_bytes
from memcalc.estimate.breakdown import Component, Estimate, Kind
from memcalc.estimate.params import count_params

_FLOAT_DTYPES = {DType.FP32, DType.FP16, DType.BF16}
FP32_BYTES = 4

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


def _compute_bytes(weight_dtype: DType) -> int:
    """Activations run in the weight dtype when it is a float type; quantised weights compute in bf16."""
    return BITS_PER_ELEMENT[weight_dtype] // 8 if weight_dtype in _FLOAT_DTYPES else 2


def prefill_activation_bytes(model: ModelConfig, tokens: int, element_bytes: int) -> int:
    """The most a no-grad forward holds inside one layer, beyond the cache: at the MLP's product
    the residual stream, the MLP input, the down projection's output and the new residual (4 x h)
    beside the activation, up projection and product (3 x f; a plain MLP 2 x f); the largest over
    dense and MoE layers. Checked against fake-tensor runs of the reference decoder (tests/test_validate.py)."""
    h = model.hidden_size
    width_factor = 3 if model.mlp is MLPKind.GATED else 2
    peaks = []
    if model.num_layers > model.num_moe_layers:
        peaks.append(element_bytes * tokens * (4 * h + width_factor * model.intermediate_size))
    if model.num_moe_layers:
        moe = model.moe
        per_expert = tokens * moe.experts_per_token // moe.num_experts
        routed = element_bytes * (4 * tokens * h + per_expert * (3 * h + width_factor * moe.expert_intermediate_size))
        peaks.append(routed + FP32_BYTES * tokens * moe.num_experts)
    return max(peaks)


def estimate_inference(model: ModelConfig, settings: InferSettings) -> Estimate:
    params = count_params(model)
    weight_dtype = DType(settings.dtype)
    kv_dtype = kv_dtype_for(settings)
    e = _compute_bytes(weight_dtype)
    beams = settings.num_beams
    sequences = settings.batch_size * beams
    if settings.prompt_len is not None:
        prompt = settings.prompt_len
        # every fed token is cached; the last new token is chosen, not fed
        cached = prompt + max(settings.max_new_tokens - 1, 0)
    else:
        prompt = cached = resolve_seq_len(model, settings.context_len)
    generating = settings.max_new_tokens > 1

    weights = storage_bytes(params.total, weight_dtype)
    per_token = kv_cache_bytes_per_token(model, kv_dtype)
    kv_cache = per_token * cached * sequences
    kv_prompt = per_token * prompt * sequences
    vocab = model.vocab_size
    # logits of the last position, and their fp32 copy (generate's next_token_logits)
    step_logits = sequences * vocab * (e + FP32_BYTES)
    # the layers' transients are gone by the time the last position's logits are computed
    prefill = max(prefill_activation_bytes(model, sequences * prompt, e),
                  e * sequences * prompt * model.hidden_size + step_logits)
    # decoding: one layer's cache concatenated (old and new) or reordered for beams, the fp32
    # logits, and for beam search their log-softmax and its sum with the beam scores
    one_layer_cache = kv_cache // model.num_layers
    decode = one_layer_cache + sequences * vocab * FP32_BYTES * (3 if beams > 1 else 1) if generating else 0
    phases = {"prefill": weights + kv_prompt + prefill}
    if generating:
        phases["decode"] = weights + kv_cache + decode
    rule_of_thumb = -(-weights * RULE_OF_THUMB_FACTOR_NUMERATOR // RULE_OF_THUMB_FACTOR_DENOMINATOR)

    weight_note = (
        f"P x {weight_dtype.value}"
        if weight_dtype in _FLOAT_DTYPES
        else f"P x {weight_dtype.value}, every tensor, no quantisation scales"
    )
    tokens_note = "(prompt+new-1)" if settings.prompt_len is not None else "context"
    components = (
        Component("weights", "Weights", weights, Kind.STATIC, weight_note, "parameter count x bytes per element"),
        Component("kv_cache", "KV cache", kv_cache, Kind.DYNAMIC,
                  f"2L x kv_heads x head_dim x {kv_dtype.value} x {tokens_note} x seqs",
                  "one key and one value vector per layer, KV head and token"),
        Component("prefill_activations", "Prefill activations", prefill, Kind.DYNAMIC,
                  "one layer's forward, last logits", "reference decoder, fake-tensor measurement"),
        Component("decode_buffers", "Decode buffers", decode, Kind.DYNAMIC,
                  "layer cache copy, fp32 logits" + (", beam scores" if beams > 1 else ""),
                  "transformers generate(), DynamicCache"),
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
        "num_beams": beams,
        "prompt_len": prompt,
        "max_new_tokens": settings.max_new_tokens,
        "context_len": cached,
        "kv_cache_bytes_per_token": per_token,
        "kv_cache_bytes_per_sequence": per_token * cached,
        "sliding_window": "not applied: every token is cached",
    }
    return Estimate(model, params, resolved, components, references=references, checkpoint=checkpoint, phases=phases)
