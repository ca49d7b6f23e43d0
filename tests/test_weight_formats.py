"""Weight formats (memcalc.estimate.weights) against the layouts of the libraries that store them."""

from __future__ import annotations

from dataclasses import replace
from fractions import Fraction

import pytest
from hypothesis import given
from hypothesis import strategies as st

from memcalc.config import MoEConfig, ModelConfig
from memcalc.mixers import MLAConfig
from memcalc.errors import InputError
from memcalc.estimate.params import ParamCategory, count_params
from memcalc.estimate.weights import (
    FORMATS,
    GGUF_FORMATS,
    WeightFormat,
    linear_weights,
    nominal_bits_per_weight,
    parse_weight_format,
    tensor_bytes,
    weight_bytes,
)
from memcalc.library import bundled_models, resolve_model

LLAMA3_8B_PARAMS = 8_030_261_248  # Meta-Llama-3(.1)-8B, sum(p.numel()) of the HF model
LLAMA3_8B_NORM_PARAMS = 4096 * (2 * 32 + 1)  # two RMSNorm weights per layer and the final norm

# --- Bits per weight of each format, from its source ------------------------------------------------

NOMINAL_BITS = [
    # bitsandbytes quantize_4bit, blocksize 64: 4 bits + an fp32 absmax per 64 values
    ("bnb-nf4", {"double_quant": False}, Fraction(9, 2)),
    ("bnb-fp4", {"double_quant": False}, Fraction(9, 2)),
    # QLoRA (arXiv 2305.14314) sec. 3 "Double Quantization": 32/64 = 0.5 bits of constants become
    # 8/64 + 32/(64*256) = 0.127 bits
    ("bnb-nf4", {"double_quant": True}, 4 + Fraction(8, 64) + Fraction(32, 64 * 256)),
    ("bnb-fp4", {"double_quant": True}, 4 + Fraction(8, 64) + Fraction(32, 64 * 256)),
    # vLLM gptq.py: int4 qweight, fp16 scales and int4 (int32-packed) zeros per group of g inputs
    ("gptq", {"group_size": 128}, 4 + Fraction(16, 128) + Fraction(4, 128)),
    ("gptq", {"group_size": 32}, 4 + Fraction(16, 32) + Fraction(4, 32)),
    ("awq", {"group_size": 128}, 4 + Fraction(20, 128)),
    # ggml-common.h static_asserts: bytes per block / weights per block
    ("q4_0", {}, Fraction(18 * 8, 32)),  # 4.5
    ("q4_1", {}, Fraction(20 * 8, 32)),  # 5.0
    ("q5_0", {}, Fraction(22 * 8, 32)),  # 5.5
    ("q5_1", {}, Fraction(24 * 8, 32)),  # 6.0
    ("q8_0", {}, Fraction(34 * 8, 32)),  # 8.5
    ("q2_k", {}, Fraction(84 * 8, 256)),  # 2.625
    ("q3_k", {}, Fraction(110 * 8, 256)),  # 3.4375
    ("q4_k", {}, Fraction(144 * 8, 256)),  # 4.5
    ("q5_k", {}, Fraction(176 * 8, 256)),  # 5.5
    ("q6_k", {}, Fraction(210 * 8, 256)),  # 6.5625
    ("q8_k", {}, Fraction(292 * 8, 256)),  # 4 + 256 + 16*2 bytes
    # DeepSeek-V3 sec. 3.3: one fp32 scale per 128x128 block -> 1 + 4/16384 bytes
    ("fp8-block", {}, 8 + Fraction(32, 128 * 128)),
    # OCP MX spec v1.0: an 8-bit E8M0 scale per 32 elements
    ("mxfp8", {}, 8 + Fraction(8, 32)),  # 1.03125 B
    ("mxfp4", {}, 4 + Fraction(8, 32)),  # 0.53125 B
    # NVIDIA TE NVFP4: an E4M3 scale per 16 elements (plus one fp32 per tensor, shape-dependent)
    ("nvfp4", {}, 4 + Fraction(8, 16)),  # 0.5625 B
    # per-tensor / per-row scales depend on the shape and are not in the nominal rate
    ("fp8", {}, Fraction(8)),
    ("int8", {}, Fraction(8)),
    ("gptq", {"group_size": -1}, Fraction(4)),
    ("bf16", {}, Fraction(16)),
    ("fp32", {}, Fraction(32)),
]


@pytest.mark.parametrize(("fmt", "kwargs", "bits"), NOMINAL_BITS, ids=[f"{f}-{k}" for f, k, _ in NOMINAL_BITS])
def test_nominal_bits_per_weight(fmt, kwargs, bits):
    assert nominal_bits_per_weight(fmt, **kwargs) == bits


def test_qlora_double_quant_rounds_to_4_127():
    # QLoRA sec. 3: "reduces the memory footprint per parameter from 0.5 bits to 0.127 bits"
    assert round(float(nominal_bits_per_weight("bnb-nf4") - 4), 3) == 0.127
    assert nominal_bits_per_weight("bnb-nf4", double_quant=False) - 4 == Fraction(1, 2)


# --- Bytes of single matrices -------------------------------------------------------------------

MATRICES = [
    # LLM.int8 (bitsandbytes Linear8bitLt): Llama-2-7B q_proj, int8 CB [4096, 4096] + fp32 SCB [4096]
    ("int8", 4096, 4096, {}, {"CB": 4096 * 4096, "SCB": 4 * 4096}),
    # DeepSeek-V3 expert gate_proj [2048, 7168]: fp32 weight_scale_inv [16, 56] = 896 blocks
    ("fp8-block", 7168, 2048, {}, {"weight": 7168 * 2048, "weight_scale_inv": 4 * 56 * 16}),
    # DeepSeek-V3 kv_a_proj_with_mqa [576, 7168]: weight_scale_inv [ceil(576/128) = 5, 56]
    ("fp8-block", 7168, 576, {}, {"weight": 7168 * 576, "weight_scale_inv": 4 * 5 * 56}),
    # vLLM gptq.py: qweight int32 [in/8, out], scales fp16 [in/g, out], qzeros int32 [in/g, out/8], g_idx int32 [in]
    ("gptq", 4096, 4096, {"group_size": 128},
     {"qweight": 4 * 512 * 4096, "scales": 2 * 32 * 4096, "qzeros": 4 * 32 * 512, "g_idx": 4 * 4096}),
    # group_size -1: scale_and_zero_size = input_size // input_size = 1
    ("gptq", 11008, 4096, {"group_size": -1},
     {"qweight": 4 * 1376 * 4096, "scales": 2 * 4096, "qzeros": 4 * 512, "g_idx": 4 * 11008}),
    # vLLM awq.py: qweight int32 [in, out/8], qzeros int32 [in/g, out/8], scales fp16 [in/g, out]
    ("awq", 4096, 14336, {"group_size": 128},
     {"qweight": 4 * 4096 * 1792, "scales": 2 * 32 * 14336, "qzeros": 4 * 32 * 1792}),
    # vLLM fp8.py per-tensor: fp8 weight + one fp32 weight_scale
    ("fp8", 4096, 1024, {}, {"weight": 4096 * 1024, "weight_scale": 4}),
    # OCP MX: E8M0 per 32 along the reduction dimension
    ("mxfp8", 4096, 1024, {}, {"weight": 4096 * 1024, "weight_scale": 1024 * 128}),
    ("mxfp4", 4096, 1024, {}, {"weight": 4096 * 1024 // 2, "weight_scale": 1024 * 128}),
    # NVFP4: E4M3 per 16 + fp32 per tensor
    ("nvfp4", 4096, 1024, {}, {"weight": 4096 * 1024 // 2, "weight_scale": 1024 * 256, "weight_scale_2": 4}),
    # bitsandbytes quantize_4bit, n = 4096*4096 = 2^24: packed (n+1)//2, fp32 absmax [n/64], 16 x fp32 code
    ("bnb-nf4", 4096, 4096, {"double_quant": False},
     {"weight": 2**23, "absmax": 4 * 2**18, "quant_map": 64}),
    # double quant: uint8 absmax [n/64], fp32 nested absmax [n/64/256], fp32 offset, 256 x fp32 nested map
    ("bnb-nf4", 4096, 4096, {"double_quant": True},
     {"weight": 2**23, "absmax": 2**18, "nested_absmax": 4 * 2**10, "nested_offset": 4,
      "quant_map": 64, "nested_quant_map": 1024}),
    # ggml: d_out rows of d_in / 32 blocks of 18 bytes (Q4_0) / 256-value blocks of 210 bytes (Q6_K)
    ("q4_0", 4096, 1024, {}, {"quants": 4096 * 1024 // 2, "block_scales": 1024 * 128 * 2}),
    ("q6_k", 14336, 4096, {}, {"quants": 14336 * 4096 * 6 // 8, "block_scales": 4096 * 56 * 18}),
]


@pytest.mark.parametrize(("fmt", "d_in", "d_out", "kwargs", "expected"), MATRICES,
                         ids=[f"{m[0]}-{m[1]}x{m[2]}" for m in MATRICES])
def test_tensor_bytes(fmt, d_in, d_out, kwargs, expected):
    assert tensor_bytes(fmt, d_in, d_out, **kwargs) == expected


GGUF_BLOCK_BYTES = [
    # (type, weights per block, bytes per block): ggml-common.h static_asserts
    ("q4_0", 32, 18), ("q4_1", 32, 20), ("q5_0", 32, 22), ("q5_1", 32, 24), ("q8_0", 32, 34),
    ("q2_k", 256, 84), ("q3_k", 256, 110), ("q4_k", 256, 144), ("q5_k", 256, 176), ("q6_k", 256, 210),
    ("q8_k", 256, 292),
]


@pytest.mark.parametrize(("fmt", "weights", "nbytes"), GGUF_BLOCK_BYTES)
def test_gguf_one_block_per_row(fmt, weights, nbytes):
    assert sum(tensor_bytes(fmt, weights, 1).values()) == nbytes
    assert sum(tensor_bytes(fmt, 3 * weights, 5).values()) == 15 * nbytes


def test_gguf_row_must_be_whole_blocks():
    # Qwen2.5-0.5B: hidden 896 is not a multiple of QK_K = 256: a single q4_k tensor of that row
    # length is an error; a whole model falls back per tensor (next test), as llama-quantize does
    with pytest.raises(InputError, match=r"q4_k: layers\.attn\.q_proj\.weight .* 896"):
        tensor_bytes("q4_k", 896, 896, name="layers.attn.q_proj.weight")
    assert weight_bytes(resolve_model("qwen2.5-0.5b"), "q4_0").total_bytes > 0  # 896 = 28 blocks of 32


def test_gptq_group_must_divide_input():
    with pytest.raises(InputError, match="group_size"):
        tensor_bytes("gptq", 4096 + 64, 4096, group_size=128, name="x")
    with pytest.raises(InputError, match="output size"):
        tensor_bytes("awq", 4096, 4100, name="x")


# --- Whole models -----------------------------------------------------------------------------------


def test_llama3_8b_bf16_total():
    breakdown = weight_bytes(resolve_model("llama-3-8b"), "bf16")
    assert breakdown.total_bytes == LLAMA3_8B_PARAMS * 2


def test_llama3_8b_q4_k_everywhere():
    # every matrix including token_embd and output in Q4_K (144 B / 256); norms kept in bf16
    breakdown = weight_bytes(resolve_model("llama-3-8b"), "q4_k")
    quantised = LLAMA3_8B_PARAMS - LLAMA3_8B_NORM_PARAMS
    assert breakdown.quantised_params == quantised
    assert breakdown.total_bytes == quantised * 144 // 256 + LLAMA3_8B_NORM_PARAMS * 2


def test_llama3_8b_keep_embeddings_16bit():
    model = resolve_model("llama-3-8b")
    embed = 128256 * 4096
    breakdown = weight_bytes(model, "q4_k", keep_16bit=("embedding", "output_head"))
    assert breakdown.quantised_params == LLAMA3_8B_PARAMS - LLAMA3_8B_NORM_PARAMS - 2 * embed
    assert breakdown.rest_bytes == (2 * embed + LLAMA3_8B_NORM_PARAMS) * 2


# llama.cpp tools/quantize/README.md, meta-llama/Llama-3.1-8B: (bits/weight, size GiB). Q8_0 and Q6_K
# files hold one type for every matrix (llama_tensor_get_type keeps output.weight at Q8_0 / Q6_K);
# ggml keeps 1-D tensors (norms) in F32, and Llama 3.1 adds rope_freqs (64 fp32), which memcalc's
# Llama-3-8B (same geometry) does not have. Q4_0 and Q4_K_M mix types (output Q6_K) and are skipped.
LLAMA31_8B_GGUF = [("q8_0", 8.5008, 7.95), ("q6_k", 6.5633, 6.14)]


@pytest.mark.parametrize(("fmt", "bpw", "gib"), LLAMA31_8B_GGUF)
def test_llama31_8b_gguf_sizes(fmt, bpw, gib):
    breakdown = weight_bytes(resolve_model("llama-3-8b"), fmt, compute_dtype="fp32")
    size, params = breakdown.total_bytes + 64 * 4, breakdown.total_params + 64
    assert round(size / 2**30, 2) == gib
    assert abs(8 * size / params - bpw) < 5e-5


def test_llama2_7b_gptq_g_idx():
    # 4 + 20/128 bits per weight plus 4 x d_in bytes of g_idx per matrix (vLLM gptq.py)
    model = resolve_model("llama-2-7b")
    breakdown = weight_bytes(model, "gptq", group_size=128)
    linear = sum(shape.numel for shape in linear_weights(model))
    per_layer_inputs = 6 * 4096 + 11008  # q, k, v, o, gate, up read 4096 inputs; down reads 11008
    assert breakdown.data_bytes + breakdown.scale_bytes + breakdown.zero_bytes == linear * (4 * 128 + 20) // (8 * 128)
    assert breakdown.index_bytes == 4 * 32 * per_layer_inputs


def test_bnb_whole_model_close_to_qlora_rate():
    breakdown = weight_bytes(resolve_model("llama-2-7b"), "bnb-nf4")
    assert abs(breakdown.bits_per_quantised_weight - 4.127) < 1e-3
    breakdown = weight_bytes(resolve_model("llama-2-7b"), "bnb-nf4", double_quant=False)
    assert abs(breakdown.bits_per_quantised_weight - 4.5) < 1e-4


FLOAT_BYTES = {"fp32": 4, "fp16": 2, "bf16": 2}


@pytest.mark.parametrize("fmt", sorted(FLOAT_BYTES))
@pytest.mark.parametrize("model", bundled_models().values(), ids=lambda m: m.name)
def test_float_formats_are_params_times_bytes(model, fmt):
    breakdown = weight_bytes(model, fmt)
    assert breakdown.total_bytes == count_params(model).total * FLOAT_BYTES[fmt]


@pytest.mark.parametrize("fmt", list(WeightFormat))
def test_total_is_data_plus_overhead_plus_rest(fmt):
    breakdown = weight_bytes(resolve_model("mixtral-8x7b"), fmt)
    assert breakdown.total_bytes == breakdown.data_bytes + breakdown.overhead_bytes + breakdown.rest_bytes
    assert breakdown.quantised_bytes == sum(t.data_bytes + t.overhead_bytes for t in breakdown.tensors)
    assert breakdown.quantised_bytes == sum(nbytes for _, nbytes in breakdown.parts)
    assert breakdown.total_params == count_params(resolve_model("mixtral-8x7b")).total


def test_routers_norms_and_embeddings_stay_unquantised():
    breakdown = weight_bytes(resolve_model("mixtral-8x7b"), "gptq")
    assert {t.category for t in breakdown.tensors} == {ParamCategory.ATTENTION, ParamCategory.EXPERTS}
    assert dict(breakdown.rest_by_category).keys() == {
        ParamCategory.EMBEDDING, ParamCategory.OUTPUT_HEAD, ParamCategory.NORMS, ParamCategory.ROUTER}


def test_parse_weight_format():
    assert parse_weight_format("Q4_K") is WeightFormat.Q4_K
    assert parse_weight_format("bnb-nf4") is WeightFormat.BNB_NF4
    with pytest.raises(InputError, match="unknown weight format"):
        parse_weight_format("q4_k_m")
    with pytest.raises(InputError, match="keep_16bit"):
        weight_bytes(resolve_model("gpt2"), "q8_0", keep_16bit=("norms",))


# --- Multi-head latent attention ----------------------------------------------------------------------

DEEPSEEK_V3 = ModelConfig(
    name="deepseek-v3-shape", hidden_size=7168, num_layers=61, num_attention_heads=128,
    intermediate_size=18432, vocab_size=129280, max_position_embeddings=163840, tie_word_embeddings=False,
    moe=MoEConfig(num_experts=256, experts_per_token=8, expert_intermediate_size=2048, num_shared_experts=1,
                  first_dense_layers=3),
    mla=MLAConfig(kv_lora_rank=512, qk_rope_head_dim=64, qk_nope_head_dim=128, v_head_dim=128, q_lora_rank=1536),
)


def test_mla_projection_shapes():
    # deepseek-ai/DeepSeek-V3 safetensors: q_a_proj [1536, 7168], q_b_proj [24576, 1536],
    # kv_a_proj_with_mqa [576, 7168], kv_b_proj [32768, 512], o_proj [7168, 16384] ([out, in])
    shapes = {s.name: (s.d_out, s.d_in) for s in linear_weights(DEEPSEEK_V3) if s.category is ParamCategory.ATTENTION}
    assert shapes == {
        "layers.attn.q_a_proj.weight": (1536, 7168),
        "layers.attn.q_b_proj.weight": (24576, 1536),
        "layers.attn.kv_a_proj_with_mqa.weight": (576, 7168),
        "layers.attn.kv_b_proj.weight": (32768, 512),
        "layers.attn.o_proj.weight": (7168, 16384),
    }


def test_mla_whole_model():
    names = {group.name for group in count_params(DEEPSEEK_V3).groups}
    if "layers.attn.kv_b_proj.weight" not in names:
        pytest.skip("memcalc.estimate.params does not count MLA projections yet")
    breakdown = weight_bytes(DEEPSEEK_V3, "fp8-block")
    assert breakdown.total_params == count_params(DEEPSEEK_V3).total


# --- Properties -------------------------------------------------------------------------------------

ALL_FORMATS = list(WeightFormat)
KEEP_ALL = ("embedding", "output_head")


@st.composite
def small_models(draw):
    """Decoders whose matrix inputs (hidden, heads x 128, MLP widths) are multiples of 256 and outputs
    multiples of 8, so that every format applies."""
    heads = 2 * draw(st.integers(1, 4))
    layers = draw(st.integers(1, 4))
    moe = None
    if draw(st.booleans()):
        experts = draw(st.integers(2, 8))
        moe = MoEConfig(num_experts=experts, experts_per_token=draw(st.integers(1, experts)),
                        expert_intermediate_size=256 * draw(st.integers(1, 4)),
                        num_shared_experts=draw(st.integers(0, 2)), first_dense_layers=draw(st.integers(0, layers)))
    return ModelConfig(
        name="generated", hidden_size=256 * draw(st.integers(1, 6)), num_layers=layers, num_attention_heads=heads,
        num_kv_heads=draw(st.sampled_from([d for d in range(1, heads + 1) if heads % d == 0])), head_dim=128,
        intermediate_size=256 * draw(st.integers(1, 8)), vocab_size=draw(st.integers(1, 5000)),
        max_position_embeddings=2048, tie_word_embeddings=draw(st.booleans()), qkv_bias=draw(st.booleans()),
        mlp_bias=draw(st.booleans()), moe=moe,
    )


def _grow(model: ModelConfig, what: str) -> ModelConfig:
    if what == "num_layers":
        return replace(model, num_layers=model.num_layers + 1)
    if what == "vocab_size":
        return replace(model, vocab_size=model.vocab_size + 1)
    if model.num_moe_layers == model.num_layers:  # no dense MLP: widen the experts
        return replace(model, moe=replace(model.moe, expert_intermediate_size=model.moe.expert_intermediate_size + 256))
    return replace(model, intermediate_size=model.intermediate_size + 256)


@given(model=small_models(), growth=st.sampled_from(["num_layers", "vocab_size", "mlp_width"]))
def test_bytes_grow_with_parameter_count(model, growth):
    bigger = _grow(model, growth)
    assert count_params(bigger).total > count_params(model).total
    for fmt in ALL_FORMATS:
        assert weight_bytes(bigger, fmt).total_bytes > weight_bytes(model, fmt).total_bytes, fmt


@given(model=small_models(), dtype=st.sampled_from(["bf16", "fp16", "fp32"]))
def test_rest_is_independent_of_format(model, dtype):
    linear = sum(shape.numel for shape in linear_weights(model))
    expected = (count_params(model).total - linear) * FLOAT_BYTES[dtype]
    for fmt in ALL_FORMATS:
        breakdown = weight_bytes(model, fmt, compute_dtype=dtype, keep_16bit=KEEP_ALL)
        assert breakdown.rest_bytes == expected, fmt
        assert breakdown.quantised_params == linear
        if fmt not in GGUF_FORMATS:  # only GGUF quantises the embedding and head by default
            assert weight_bytes(model, fmt, compute_dtype=dtype).rest_bytes == expected


def test_every_format_has_a_source_and_layout():
    assert set(FORMATS) == set(WeightFormat)
    for spec in FORMATS.values():
        assert spec.source and spec.layout


def test_gguf_k_quant_falls_back_for_rows_that_are_not_whole_blocks():
    """llama-quantize (llama-quant.cpp) stores a tensor whose rows are not whole 256-value k-quant
    blocks in q5_0 when q4_K was asked for. Qwen2.5-0.5B's hidden size 896 = 3.5 x 256 = 28 x 32:
    its q_proj (896 x 896) becomes q5_0, 22 bytes per 32 weights."""
    from memcalc.estimate.weights import weight_bytes
    from memcalc.library import resolve_model

    breakdown = weight_bytes(resolve_model("qwen2.5-0.5b"), "q4_k")
    q_proj = next(tensor for tensor in breakdown.tensors if tensor.name == "layers.attn.q_proj.weight")
    assert q_proj.data_bytes + q_proj.overhead_bytes == 896 * 896 // 32 * 22 * q_proj.count
