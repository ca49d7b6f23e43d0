"""Serving memory (issue 5): KV geometry under TP and MLA, paged blocks and budgets, decoding
strategies and their buffers, weight formats in `infer`, runtime overhead and what fits. Expected
values are hand derivations or published figures, each named."""

from __future__ import annotations

import pytest

from memcalc.errors import SettingsError

from memcalc.config import InferSettings
from memcalc.dtypes import DType
from memcalc.estimate.inference import (
    estimate_inference,
    fit_report,
    kv_cache_bytes_per_token,
    kv_capacity,
    sampling_bytes_per_logit,
)
from memcalc.library import resolve_model

GIB, MIB = 2**30, 2**20


@pytest.mark.parametrize(
    ("name", "tp", "engine", "expected"),
    [
        ("llama-2-7b", 1, "hf", 524_288),  # 2 x 32 layers x 32 heads x 128 x 2 B (MHA)
        ("llama-3-8b", 1, "hf", 131_072),  # 2 x 32 x 8 KV heads x 128 x 2 B (GQA)
        ("llama-2-70b", 1, "hf", 327_680),  # 2 x 80 x 8 x 128 x 2 B
        ("llama-3-8b", 2, "hf", 65_536),  # TP 2 splits the 8 KV heads: 4 per rank
        ("llama-3-8b", 8, "hf", 16_384),  # 1 per rank
        ("llama-3-70b", 16, "paged", 2 * 80 * 1 * 128 * 2),  # TP 16 > 8 KV heads: one replicated head per rank (vLLM)
        # DeepSeek-V3 MLA: (kv_lora_rank 512 + qk_rope_head_dim 64) x 61 layers x 2 B = 70,272, and
        # not split by TP (vLLM's MLAAttentionSpec caches one latent "head")
        ("deepseek-v3", 1, "paged", 70_272),
        ("deepseek-v3", 8, "paged", 70_272),
        # so do transformers 5's DeepSeek classes (measured in tests/test_inference_hf.py)
        ("deepseek-v3", 1, "hf", 70_272),
    ],
)
def test_kv_bytes_per_token(name, tp, engine, expected):
    from memcalc.config import Engine

    assert kv_cache_bytes_per_token(resolve_model(name), DType.BF16, tp, Engine(engine)) == expected


def test_paged_budget_of_a_published_server_log():
    """A paged server's log for Llama-3.1-8B bf16: 2,356 blocks of 16 tokens = 37,696 tokens for a
    KV budget it prints as 4.60 GiB. A block is 16 x 131,072 B = 2 MiB, so exactly 2,356 x 2 MiB
    holds those blocks, and one byte less holds one block fewer."""
    per_token = kv_cache_bytes_per_token(resolve_model("llama-3-8b"), DType.BF16)
    budget = 2356 * 2 * MIB
    assert round(budget / GIB, 2) == 4.60
    capacity = kv_capacity(budget, per_token, 16)
    assert (capacity.blocks, capacity.tokens) == (2356, 37_696)
    fewer = kv_capacity(budget - 1, per_token, 16)
    assert (fewer.blocks, fewer.tokens) == (2355, 37_680)


def test_paged_engine_rounds_tokens_up_to_blocks():
    model = resolve_model("llama-3-8b")
    hf = estimate_inference(model, InferSettings(batch_size=3, context_len=1000))
    paged = estimate_inference(model, InferSettings(batch_size=3, context_len=1000, engine="paged", block_size=16))
    assert hf.component("kv_cache").bytes == 131_072 * 1000 * 3
    assert paged.component("kv_cache").bytes == 131_072 * 1008 * 3  # 63 blocks of 16


def test_sliding_window_layers_cap_their_cache():
    """Mistral-7B v0.1: sliding_window 4096 on every layer, so 8192 tokens hold 4096 per layer in
    transformers (DynamicSlidingWindowLayer keeps a view of window - 1 tokens into the window it
    concatenated at the last decoding step; measured in tests/test_cache_hf.py) and 4096 on a paged
    engine (256 blocks of 16)."""
    model = resolve_model("mistral-7b")
    long = estimate_inference(model, InferSettings(context_len=8192))
    assert long.component("kv_cache").bytes == 131_072 * 4096
    paged = estimate_inference(model, InferSettings(context_len=8192, engine="paged"))
    assert paged.component("kv_cache").bytes == 131_072 * 4096
    short = estimate_inference(model, InferSettings(context_len=1000))
    assert short.component("kv_cache").bytes == 131_072 * 1000


def test_beam_search_with_four_beams_holds_four_times_the_cache():
    model = resolve_model("llama-3-8b")
    greedy = estimate_inference(model, InferSettings(batch_size=2, prompt_len=1000, max_new_tokens=25))
    beams = estimate_inference(model, InferSettings(batch_size=2, prompt_len=1000, max_new_tokens=25,
                                                    decoding="beam", num_beams=4))
    assert beams.component("kv_cache").bytes == 4 * greedy.component("kv_cache").bytes


def test_greedy_is_beam_search_with_one_beam():
    model = resolve_model("llama-3-8b")
    greedy = estimate_inference(model, InferSettings(prompt_len=512, max_new_tokens=32))
    one_beam = estimate_inference(model, InferSettings(prompt_len=512, max_new_tokens=32, decoding="beam", num_beams=1))
    assert greedy.phases == one_beam.phases
    assert greedy.settings.decoding == one_beam.settings.decoding == "greedy"


def test_sampling_returns_several_sequences_each_cached():
    """transformers expands the prompt num_return_sequences times for sampling."""
    model = resolve_model("llama-3-8b")
    one = estimate_inference(model, InferSettings(prompt_len=100, max_new_tokens=11, decoding="sample"))
    three = estimate_inference(model, InferSettings(prompt_len=100, max_new_tokens=11, decoding="sample",
                                                    num_return_sequences=3))
    assert one.component("kv_cache").bytes == 131_072 * 110
    assert three.component("kv_cache").bytes == 3 * one.component("kv_cache").bytes


@pytest.mark.parametrize(
    ("options", "bytes_per_logit"),
    [
        ({}, 4),  # greedy: the fp32 scores
        ({"decoding": "beam", "num_beams": 2}, 12),  # + fp32 log-softmax + its sum with the beam scores
        ({"decoding": "sample"}, 8),  # scores + softmax probabilities
        ({"decoding": "sample", "temperature": 0.7}, 12),  # + the scaled copy, then softmax beside it
        # top-k: a bool mask and the filled copy (9 with the scores), then softmax beside the copy: 12
        ({"decoding": "sample", "top_k": 50}, 12),
        # top-p: sorted fp32 values, int64 indices, cumulative softmax, two bool masks, filled copy
        ({"decoding": "sample", "top_p": 0.9}, 4 + 4 + 8 + 4 + 1 + 1 + 4),
        # temperature then top-p: top-p's input is the scaled copy (4 more)
        ({"decoding": "sample", "temperature": 0.7, "top_p": 0.9}, 4 + 4 + 22),
    ],
)
def test_token_choice_bytes_per_logit(options, bytes_per_logit):
    assert sampling_bytes_per_logit(InferSettings(prompt_len=8, max_new_tokens=2, **options)) == bytes_per_logit


def test_top_p_buffers_scale_with_vocab_and_sequences():
    """llama-3-8b vocab 128,256; 4 prompts x 2 returned samples = 8 sequences at 26 B per logit."""
    model = resolve_model("llama-3-8b")
    settings = dict(prompt_len=16, max_new_tokens=4, decoding="sample", top_p=0.9)
    one = estimate_inference(model, InferSettings(batch_size=1, **settings))
    eight = estimate_inference(model, InferSettings(batch_size=4, num_return_sequences=2, **settings))
    assert one.component("logits").bytes == max(128_256 * (2 + 4), 128_256 * 2 + 128_256 * 26)
    assert eight.component("logits").bytes == 8 * one.component("logits").bytes


def test_prefill_logits_for_every_position():
    """Without logits_to_keep a forward keeps tokens x V logits in bf16 and their fp32 upcast."""
    model = resolve_model("llama-3-8b")
    every = estimate_inference(model, InferSettings(batch_size=2, context_len=1024, prefill_logits="all"))
    assert every.component("logits").bytes == 2 * 1024 * 128_256 * (2 + 4)
    # beside the final hidden states (2 x 1024 x 4096 x 2 B), weights and the prompt's cache
    # and the rotary cos and sin tables, (1, 1024, 128) in bf16 each, and generate()'s int64 token
    # ids and attention mask, (2, 1024) each
    assert every.phases["prefill"] == (2 * 8_030_261_248 + 131_072 * 1024 * 2 + 2 * 1024 * 4096 * 2
                                       + 2 * 1024 * 128_256 * 6 + 2 * 1024 * 128 * 2 + 2 * 8 * 2 * 1024)


def test_chunked_prefill_holds_one_chunk_of_activations():
    """The layer transient e x T x (4h + 3f) (test_inference) for a 512-token chunk of an 8192-token
    prompt, beside the chunk's rotary cos and sin tables ((1, 512, 128) in bf16 each) and generate()'s
    int64 token ids and attention mask of the whole prompt."""
    model = resolve_model("llama-3-8b")
    chunked = estimate_inference(model, InferSettings(context_len=8192, prefill_chunk=512))
    assert chunked.component("activations").bytes == (2 * 512 * (4 * 4096 + 3 * 14336) + 2 * 512 * 128 * 2
                                                      + 2 * 8 * 8192)


def test_eager_prefill_materialises_the_scores():
    """transformers' eager attention: scores, masked scores and the cast back in bf16, the fp32
    softmax: a x s x s x (3 x 2 + 4) bytes per sequence, for one layer at a time; and the model's
    additive causal mask, (1, 1, s, s) in bf16, which SDPA's is_causal makes unnecessary."""
    model = resolve_model("llama-3-8b")
    sdpa = estimate_inference(model, InferSettings(context_len=2048))
    eager = estimate_inference(model, InferSettings(context_len=2048, attention="eager"))
    difference = eager.component("activations").bytes - sdpa.component("activations").bytes
    assert difference == 32 * 2048 * 2048 * 10 + 2048 * 2048 * 2


def test_runtime_overhead_is_a_configurable_line():
    model = resolve_model("llama-3-8b")
    default = estimate_inference(model, InferSettings(context_len=1024))
    from memcalc.estimate.device import device_memory

    assert default.component("overhead").bytes == (400 + 32) * MIB
    assert default.total == default.peak_allocated  # the overhead is outside the allocator
    assert device_memory(default).runtime_overhead == (400 + 32) * MIB
    none = estimate_inference(model, InferSettings(context_len=1024, overhead_bytes=0))
    assert none.total == default.total and device_memory(none).runtime_overhead == 0
    assert device_memory(default).device_total - device_memory(none).device_total == (400 + 32) * MIB


def test_tensor_parallel_weights_per_rank():
    """Llama-2-70B at TP 8: projections and the vocabulary split, norms whole: the rank holds
    (P - norms) / 8 + norms parameters (norms: 2 per layer x 80 + final = 161 x 8192)."""
    params, norms = 68_976_648_192, 161 * 8192
    estimate = estimate_inference(resolve_model("llama-2-70b"), InferSettings(dtype="fp16", tp=8))
    assert estimate.component("weights").bytes == 2 * ((params - norms) // 8 + norms)


def test_tensor_parallel_must_split_heads():
    with pytest.raises(SettingsError, match="tp 3 does not divide the 32 attention heads") as error:
        estimate_inference(resolve_model("llama-3-8b"), InferSettings(tp=3))
    assert error.value.fields == ("tp",)


def test_quantised_weights_keep_embedding_head_and_norms_in_16_bits():
    """bitsandbytes NF4 with double quantisation (4.127 bits/weight, QLoRA) on the linear layers;
    the embedding, head (2 x 128,256 x 4096) and norms (65 x 4096) stay bf16."""
    estimate = estimate_inference(resolve_model("llama-3-8b"), InferSettings(weights="bnb-nf4"))
    rest = estimate.component("weights_unquantised").bytes
    assert rest == 2 * (2 * 128_256 * 4096 + 65 * 4096)
    linear = 8_030_261_248 - 2 * 128_256 * 4096 - 65 * 4096
    quantised = estimate.component("weights_quantised").bytes
    assert quantised * 8 / linear == pytest.approx(4.127, abs=0.001)


def test_nf4_without_double_quantisation_is_4_5_bits():
    """bitsandbytes quantize_4bit, blocksize 64: 4 bits + one fp32 absmax per 64 = 4.5 bits."""
    estimate = estimate_inference(resolve_model("llama-3-8b"), InferSettings(weights="bnb-nf4", double_quant=False))
    linear = 8_030_261_248 - 2 * 128_256 * 4096 - 65 * 4096
    assert estimate.component("weights_quantised").bytes * 8 / linear == pytest.approx(4.5, abs=0.001)


def test_fit_report_by_hand():
    """On a GPU of exactly 24 GiB at 90 %: the paged KV budget is what is left after weights,
    activations, logits and overhead, in whole 2 MiB blocks; the largest batch keeps the total
    under the limit and one more does not, by the device total (reserved + overhead)."""
    from dataclasses import replace

    model = resolve_model("llama-3-8b")
    settings = InferSettings(context_len=4096, weights="q4_k")
    report = fit_report(model, settings, "test-gpu", 24 * GIB, 0.9)
    estimate = estimate_inference(model, settings)
    parts = {component.key: component.bytes for component in estimate.components}
    weights = parts["weights_quantised"] + parts["weights_unquantised"]  # q4_k: the norms stay bf16
    assert parts["weights_unquantised"] == 65 * 4096 * 2
    budget = int(24 * GIB * 0.9) - weights - parts["activations"] - parts["logits"] - parts["overhead"]
    assert report.kv_budget == budget
    assert report.kv_blocks == budget // (2 * MIB) and report.kv_tokens == 16 * report.kv_blocks
    from memcalc.estimate.device import device_memory

    limit = int(24 * GIB * 0.9)

    def on_device(batch: int) -> int:
        return device_memory(estimate_inference(model, replace(settings, batch_size=batch))).device_total

    assert on_device(report.max_batch) <= limit < on_device(report.max_batch + 1)
    assert report.fits and report.required == on_device(1)


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"decoding": "greedy", "num_beams": 2}, "greedy decoding keeps one sequence"),
        ({"top_p": 0.9}, "apply to sampling"),
        ({"decoding": "sample", "top_p": 1.5}, "top_p must be in (0, 1]"),
        ({"num_return_sequences": 2}, "greedy decoding returns one sequence"),
        ({"decoding": "beam", "num_beams": 2, "num_return_sequences": 3}, "exceeds num_beams"),
    ],
)
def test_inconsistent_decoding_settings_are_errors(options, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)").replace("]", r"\]")):
        InferSettings(prompt_len=8, max_new_tokens=2, **options)
