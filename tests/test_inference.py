"""Inference memory: GQA-aware KV cache bytes and the 1.2x rule of thumb."""

from __future__ import annotations

import pytest

from memcalc.config import InferSettings
from memcalc.dtypes import DType
from memcalc.estimate.inference import estimate_inference, kv_cache_bytes_per_token
from memcalc.library import resolve_model


# 2 (K and V) x layers x KV heads x head dim x 2 bytes (fp16), by hand:
@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("llama-2-7b", 524_288),  # 2 * 32 * 32 * 128 * 2 (MHA)
        ("llama-3-8b", 131_072),  # 2 * 32 * 8 * 128 * 2 (GQA, 8 KV heads)
        ("llama-2-70b", 327_680),  # 2 * 80 * 8 * 128 * 2 (GQA)
        ("mistral-7b", 131_072),  # 2 * 32 * 8 * 128 * 2
        ("gemma-2b", 18_432),  # 2 * 18 * 1 * 256 * 2 (MQA, head_dim 256)
        ("gpt2", 36_864),  # 2 * 12 * 12 * 64 * 2
    ],
)
def test_kv_bytes_per_token_fp16(name, expected):
    assert kv_cache_bytes_per_token(resolve_model(name), DType.FP16) == expected


def test_kv_cache_scales_with_tokens_batch_and_dtype():
    model = resolve_model("llama-3-8b")
    estimate = estimate_inference(model, InferSettings(dtype="bf16", batch_size=8, context_len=4096))
    assert estimate.component("kv_cache").bytes == 131_072 * 4096 * 8  # exactly 4 GiB
    fp8 = estimate_inference(model, InferSettings(dtype="bf16", kv_dtype="fp8", batch_size=8, context_len=4096))
    assert fp8.component("kv_cache").bytes == 131_072 * 4096 * 8 // 2


@pytest.mark.parametrize(
    ("dtype", "bytes_per_param"), [("fp32", 4), ("fp16", 2), ("bf16", 2), ("fp8", 1), ("int8", 1), ("int4", 0.5)]
)
def test_weights_per_dtype(dtype, bytes_per_param):
    estimate = estimate_inference(resolve_model("llama-2-7b"), InferSettings(dtype=dtype))
    assert estimate.component("weights").bytes == int(6_738_415_616 * bytes_per_param)


def test_rule_of_thumb_is_one_point_two_times_weights():
    """EleutherAI, Transformer Math 101: inference needs about 1.2x the weights."""
    estimate = estimate_inference(resolve_model("llama-2-7b"), InferSettings(dtype="fp16"))
    # 1.2 * 13,476,831,232 = 16,172,197,478.4, rounded up to whole bytes
    assert estimate.component("rule_of_thumb_total").bytes == 16_172_197_479


def test_default_kv_dtype_follows_float_weights_else_bf16():
    model = resolve_model("llama-2-7b")
    assert estimate_inference(model, InferSettings(dtype="fp32")).settings.kv_dtype == "fp32"
    assert estimate_inference(model, InferSettings(dtype="int4")).settings.kv_dtype == "bf16"


def test_context_only_total_is_prefill_peak_by_hand():
    """Prefill of 8 x 4096 tokens: weights + the prompt's cache + one layer's no-grad forward,
    e*T*(4h + 3f) = 2 * 32768 * (4*8192 + 3*28672) bytes, + the rotary cos and sin tables the model
    keeps for all its layers, (1, 4096, 128) each in fp16, and generate()'s int64 token ids and
    attention mask, (8, 4096) each (measured with transformers' classes in tests/test_inference_hf.py)."""
    estimate = estimate_inference(resolve_model("llama-2-70b"), InferSettings(dtype="fp16", batch_size=8, context_len=4096))
    assert estimate.phases == {"prefill": 68_976_648_192 * 2 + 327_680 * 4096 * 8 + 2 * 32768 * (4 * 8192 + 3 * 28672)
                               + 2 * 4096 * 128 * 2 + 2 * 8 * 8 * 4096}
    assert estimate.total == estimate.phases["prefill"]  # the allocated peak, as in training
    # on the device: the allocator's reserve (+5.66%, inference) and, outside it, the CUDA context
    # 400 MiB + cuBLAS workspace 32 MiB
    from memcalc.estimate.device import device_memory

    memory = device_memory(estimate)
    assert memory.device_total == estimate.total + round(estimate.total * 0.0566) + (400 + 32) * 2**20


def test_beams_multiply_the_cache_including_the_prompt():
    """HF generate() repeats the prompt for every beam; the last new token is not cached."""
    model = resolve_model("llama-3-8b")
    greedy = estimate_inference(model, InferSettings(batch_size=2, prompt_len=1000, max_new_tokens=25))
    beams = estimate_inference(model, InferSettings(batch_size=2, prompt_len=1000, max_new_tokens=25, num_beams=4))
    assert greedy.component("kv_cache").bytes == 131_072 * (1000 + 24) * 2
    assert beams.component("kv_cache").bytes == 4 * greedy.component("kv_cache").bytes


def test_decode_phase_by_hand():
    """Decoding: weights + full cache + the copy of one layer's keys (or values: DynamicLayer.update
    concatenates one, then the other) + fp32 logits, log-softmax and scores for beams."""
    model = resolve_model("gpt2")
    estimate = estimate_inference(model, InferSettings(dtype="fp32", batch_size=1, prompt_len=16, max_new_tokens=65,
                                                       num_beams=8))
    kv = 2 * 12 * 12 * 64 * 4 * (16 + 64) * 8  # fp32 cache, 8 sequences
    # at the last layer's copy: its values still hold 79 tokens (its old keys beside the new 80)
    one_layer_token = kv // 12 // 80
    # the step's own token: its embedding, layer input, normed input, query, key and value (6 x 768 fp32)
    step_token = 8 * 6 * 768 * 4
    ids_and_mask = 2 * 8 * 8 * 81  # generate()'s int64 (8, 81) token ids and attention mask
    assert estimate.phases["decode"] == (124_439_808 * 4 + kv - one_layer_token + kv // 24 + step_token
                                         + 8 * 50257 * 4 * 3 + ids_and_mask)


# transformers 5's generate() runs experts through grouped_mm_experts_forward (its default experts
# implementation): the prefill of an experts layer holds the gathered input and the expert outputs
# of every assignment at once. Measured here: a no-grad forward with a cache of transformers' class
# on fake tensors (2 layers of each checkpoint's own config.json, the prompt's logits kept for one
# position), its peak above the weights against memcalc's prefill phase above the weights.
GROUPED_EXPERTS = [("Qwen--Qwen3-30B-A3B.json", 2048), ("mistralai--Mixtral-8x22B-v0.1.json", 1024),
                   ("zai-org--GLM-4.5-Air.json", 1024)]  # GLM: a dense first layer, fp32 routing weights


@pytest.mark.parametrize(("file_name", "prompt"), GROUPED_EXPERTS)
def test_hf_prefill_of_grouped_experts_is_measured(file_name, prompt):
    pytest.importorskip("torch")
    pytest.importorskip("transformers")

    from pathlib import Path

    from memcalc.hf import model_from_hf
    from memcalc.validate.hf_forward import hf_config_data, measure_hf_forward

    data = hf_config_data(Path(__file__).parent / "data" / "hf_configs" / file_name, 2)
    model = model_from_hf(dict(data), name=file_name, source=file_name)
    forward = measure_hf_forward(data, 1, prompt)
    assert forward.experts_implementation == "grouped_mm"
    measured = forward.prefill
    estimate = estimate_inference(model, InferSettings(prompt_len=prompt, max_new_tokens=1))
    estimated = estimate.phases["prefill"] - estimate.component("weights").bytes
    assert abs(estimated - measured) <= 0.002 * measured
