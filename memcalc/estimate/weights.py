"""Bytes of a model's weights in a storage format: float, scaled FP8/FP4, integer and GGUF blocks.

A format quantises the linear weights inside the decoder layers (attention q/k/v/o or the MLA
projections, MLP gate/up/down, routed and shared experts). Everything else -- embeddings, the output
head, norms, biases, MoE routers -- stays in the compute dtype (bf16 unless told otherwise), as
bitsandbytes, GPTQ/AWQ, vLLM's FP8/FP4 methods and DeepSeek-V3's FP8 checkpoint do. GGUF files
quantise the token embedding and the output head too (``llama-quantize``); ``keep_16bit`` keeps them.

Every format is one row of ``FORMATS``: the stored tensors of one quantised matrix (``Part``), each
with its bits per stored value and how many weights share one value along the input and output
dimensions. One function (``part_bytes``) turns any row into bytes; there is no per-format code.
Shapes follow ``nn.Linear``: a matrix maps ``d_in`` inputs to ``d_out`` outputs and stores ``d_out``
rows of ``d_in`` values (ggml's ``ne[0]`` is ``d_in``). Pure functions over dataclasses.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from enum import StrEnum
from fractions import Fraction
from typing import NamedTuple

from memcalc.config import ModelConfig
from memcalc.dtypes import BITS_PER_ELEMENT, DType, storage_bytes
from memcalc.errors import InputError
from memcalc.estimate.inventory import Split, build_inventory
from memcalc.estimate.params import ParamCategory, count_params


class WeightFormat(StrEnum):
    """``memcalc infer --weights FORMAT``; GGUF block types in lower case (``q4_k``)."""

    FP32 = "fp32"
    FP16 = "fp16"
    BF16 = "bf16"
    FP8 = "fp8"
    FP8_BLOCK = "fp8-block"
    MXFP8 = "mxfp8"
    MXFP4 = "mxfp4"
    NVFP4 = "nvfp4"
    INT8 = "int8"
    GPTQ = "gptq"
    AWQ = "awq"
    BNB_NF4 = "bnb-nf4"
    BNB_FP4 = "bnb-fp4"
    Q4_0 = "q4_0"
    Q4_1 = "q4_1"
    Q5_0 = "q5_0"
    Q5_1 = "q5_1"
    Q8_0 = "q8_0"
    Q2_K = "q2_k"
    Q3_K = "q3_k"
    Q4_K = "q4_k"
    Q5_K = "q5_k"
    Q6_K = "q6_k"
    Q8_K = "q8_k"


class PartKind(StrEnum):
    DATA = "data"  # the quantised values themselves
    SCALES = "scales"  # scales, absmax, GGUF block headers (scales and mins), per-tensor constants
    ZEROS = "zeros"  # zero points (GPTQ/AWQ qzeros)
    INDICES = "indices"  # GPTQ's g_idx (group of each input channel)


# Block sizes with a meaning rather than a number.
WHOLE = 0  # the whole dimension shares one value (per row, per column, per tensor)
GROUP = -2  # the caller's group_size (GPTQ/AWQ); group_size -1 means WHOLE

_FP32 = BITS_PER_ELEMENT[DType.FP32]
_FP16 = BITS_PER_ELEMENT[DType.FP16]
_FP8 = BITS_PER_ELEMENT[DType.FP8]  # also E8M0 (MX scales) and UE4M3 (NVFP4 scales): 8 bits
_INT8 = BITS_PER_ELEMENT[DType.INT8]
_INT4 = BITS_PER_ELEMENT[DType.INT4]
_INT32 = 32  # GPTQ g_idx; packed int32 words hold 32 / 4 = 8 four-bit values


@dataclass(frozen=True)
class Part:
    """One stored tensor of a quantised matrix: ``bits`` per stored value, one value per
    ``block_in`` x ``block_out`` weights (``WHOLE``: the whole dimension; ``GROUP``: group_size).
    ``flat``: blocks of ``block_in`` run over the flattened tensor (bitsandbytes), not a 2-D tiling.
    ``double_quant``: the part exists only with (True) or only without (False) double quantisation."""

    name: str
    kind: PartKind
    bits: int
    block_in: int = 1
    block_out: int = 1
    flat: bool = False
    double_quant: bool | None = None


@dataclass(frozen=True)
class FormatSpec:
    """A row of the format table. ``multiple_in``/``multiple_out``: what ``d_in``/``d_out`` must
    divide into (``GROUP`` = group_size); ``quantises_embeddings``: the token embedding and output head
    are quantised too (GGUF); ``float_dtype``: a plain float format, the default dtype of the rest."""

    format: WeightFormat
    parts: tuple[Part, ...]
    layout: str
    source: str
    multiple_in: tuple[int, ...] = ()
    multiple_out: tuple[int, ...] = ()
    quantises_embeddings: bool = False
    float_dtype: DType | None = None
    note: str = ""


def _float(fmt: WeightFormat, dtype: DType) -> FormatSpec:
    return FormatSpec(fmt, (Part("weight", PartKind.DATA, BITS_PER_ELEMENT[dtype]),),
                      f"{dtype.value} [out, in]", "memcalc.dtypes", float_dtype=dtype)


def _bnb4(fmt: WeightFormat, quant_type: str) -> FormatSpec:
    """bitsandbytes ``functional.quantize_4bit`` (blocksize 64, the ``Params4bit`` default): packed
    uint8 of ``(n + 1) // 2`` bytes, an fp32 absmax per 64 values of the flattened tensor and the
    16-entry fp32 code table (``get_4bit_type``). With ``compress_statistics`` (double quantisation)
    the absmax minus its mean (an fp32 ``offset``) goes through ``quantize_blockwise(blocksize=256)``:
    uint8 codes, an fp32 absmax per 256 codes and that call's 256-entry fp32 map. QLoRA (arXiv
    2305.14314) sec. 3: 32/64 = 0.5 bits of constants become 8/64 + 32/(64*256) = 0.127 bits."""
    block = 64
    return FormatSpec(
        fmt,
        (
            Part("weight", PartKind.DATA, _INT4, flat=True),
            Part("absmax", PartKind.SCALES, _FP32, block, flat=True, double_quant=False),
            Part("absmax", PartKind.SCALES, _INT8, block, flat=True, double_quant=True),
            Part("nested_absmax", PartKind.SCALES, _FP32, block * 256, flat=True, double_quant=True),
            Part("nested_offset", PartKind.SCALES, _FP32, WHOLE, WHOLE, double_quant=True),
            Part("quant_map", PartKind.SCALES, 16 * _FP32, WHOLE, WHOLE),
            Part("nested_quant_map", PartKind.SCALES, 256 * _FP32, WHOLE, WHOLE, double_quant=True),
        ),
        f"{quant_type} packed uint8 [ceil(n/2)] + absmax fp32 [ceil(n/64)] (double quant: uint8 "
        "[ceil(n/64)] + fp32 [ceil(n/16384)] + fp32 offset) + code tables",
        "bitsandbytes functional.py quantize_4bit / quantize_blockwise; QLoRA sec. 3",
    )


# GGUF block types: (weights per block, bytes per block, bits of each quantised value). Bytes are the
# static_asserts on the block structs in ggml/src/ggml-common.h (ggml_half = 2 bytes, QK_K = 256,
# K_SCALE_SIZE = 12); what the struct holds beyond the quants is counted as scales.
GGUF_BLOCKS: dict[WeightFormat, tuple[int, int, int]] = {
    WeightFormat.Q4_0: (32, 18, 4),  # d (half) + qs[16]
    WeightFormat.Q4_1: (32, 20, 4),  # d, m (half) + qs[16]
    WeightFormat.Q5_0: (32, 22, 5),  # d + qh[4] + qs[16]
    WeightFormat.Q5_1: (32, 24, 5),  # d, m + qh[4] + qs[16]
    WeightFormat.Q8_0: (32, 34, 8),  # d + qs[32]
    WeightFormat.Q2_K: (256, 84, 2),  # scales[16] + qs[64] + d, dmin
    WeightFormat.Q3_K: (256, 110, 3),  # hmask[32] + qs[64] + scales[12] + d
    WeightFormat.Q4_K: (256, 144, 4),  # d, dmin + scales[12] + qs[128]
    WeightFormat.Q5_K: (256, 176, 5),  # d, dmin + scales[12] + qh[32] + qs[128]
    WeightFormat.Q6_K: (256, 210, 6),  # ql[128] + qh[64] + scales[16] + d
    WeightFormat.Q8_K: (256, 292, 8),  # d (float) + qs[256] + bsums[16] (int16); for dot products only
}


def _gguf(fmt: WeightFormat, block: tuple[int, int, int]) -> FormatSpec:
    """ggml stores each row (``d_in`` values) as ``d_in / QK`` blocks; ``ggml_row_size`` requires the
    row to be a whole number of blocks."""
    weights, nbytes, qbits = block
    return FormatSpec(
        fmt,
        (
            Part("quants", PartKind.DATA, qbits),
            Part("block_scales", PartKind.SCALES, 8 * nbytes - weights * qbits, weights),
        ),
        f"{nbytes} B per block of {weights} along each row",
        "ggml-common.h block_" + fmt.value + " static_assert",
        multiple_in=(weights,),
        quantises_embeddings=True,
        note="ggml's intermediate type for dot products; llama-quantize writes no Q8_K files"
        if fmt is WeightFormat.Q8_K else "",
    )


FORMATS: dict[WeightFormat, FormatSpec] = {
    spec.format: spec
    for spec in (
        _float(WeightFormat.FP32, DType.FP32),
        _float(WeightFormat.FP16, DType.FP16),
        _float(WeightFormat.BF16, DType.BF16),
        # vLLM Fp8LinearMethod / compressed-tensors per-tensor: fp8 E4M3 weight + one fp32 weight_scale
        FormatSpec(WeightFormat.FP8,
                   (Part("weight", PartKind.DATA, _FP8), Part("weight_scale", PartKind.SCALES, _FP32, WHOLE, WHOLE)),
                   "fp8 E4M3 [out, in] + fp32 scale per tensor", "vLLM fp8.py (per-tensor weight_scale)"),
        # DeepSeek-V3 (arXiv 2412.19437 sec. 3.3.2): 128x128 weight blocks; checkpoint weight_scale_inv
        # fp32 [ceil(out/128), ceil(in/128)]
        FormatSpec(WeightFormat.FP8_BLOCK,
                   (Part("weight", PartKind.DATA, _FP8),
                    Part("weight_scale_inv", PartKind.SCALES, _FP32, 128, 128)),
                   "fp8 E4M3 [out, in] + fp32 [ceil(out/128), ceil(in/128)]",
                   "DeepSeek-V3 tech. report sec. 3.3; TE Float8BlockScaling"),
        # OCP Microscaling Formats (MX) v1.0: k = 32 elements share an E8M0 (8-bit) scale
        FormatSpec(WeightFormat.MXFP8,
                   (Part("weight", PartKind.DATA, _FP8), Part("weight_scale", PartKind.SCALES, _FP8, 32)),
                   "fp8 E4M3 [out, in] + E8M0 [out, ceil(in/32)]", "OCP MX spec v1.0 (MXFP8)"),
        FormatSpec(WeightFormat.MXFP4,
                   (Part("weight", PartKind.DATA, _INT4), Part("weight_scale", PartKind.SCALES, _FP8, 32)),
                   "fp4 E2M1 packed [out, in/2] + E8M0 [out, ceil(in/32)]", "OCP MX spec v1.0 (MXFP4)"),
        # NVIDIA Transformer Engine NVFP4 recipe / ModelOpt: E2M1 values, an E4M3 scale per 16 values,
        # one fp32 global scale per tensor (weight_scale_2)
        FormatSpec(WeightFormat.NVFP4,
                   (Part("weight", PartKind.DATA, _INT4), Part("weight_scale", PartKind.SCALES, _FP8, 16),
                    Part("weight_scale_2", PartKind.SCALES, _FP32, WHOLE, WHOLE)),
                   "fp4 E2M1 packed [out, in/2] + E4M3 [out, ceil(in/16)] + fp32 per tensor",
                   "NVIDIA Transformer Engine NVFP4BlockScaling"),
        # bitsandbytes nn.Linear8bitLt / Int8Params: CB int8 [out, in] + SCB fp32 [out] (row absmax)
        FormatSpec(WeightFormat.INT8,
                   (Part("CB", PartKind.DATA, _INT8), Part("SCB", PartKind.SCALES, _FP32, WHOLE, 1)),
                   "int8 [out, in] + fp32 [out]", "bitsandbytes nn.Linear8bitLt (LLM.int8, arXiv 2208.07339)"),
        # vLLM gptq.py GPTQLinearMethod.create_weights: qweight int32 [in/8, out], g_idx int32 [in],
        # qzeros int32 [in/g, out/8], scales [in/g, out] (fp16); g = -1: one group over the whole input
        FormatSpec(WeightFormat.GPTQ,
                   (Part("qweight", PartKind.DATA, _INT4),
                    Part("scales", PartKind.SCALES, _FP16, GROUP),
                    Part("qzeros", PartKind.ZEROS, _INT4, GROUP),
                    Part("g_idx", PartKind.INDICES, _INT32, 1, WHOLE)),
                   "int32 qweight [in/8, out] + fp16 scales [in/g, out] + int32 qzeros [in/g, out/8] "
                   "+ int32 g_idx [in]", "vLLM quantization/gptq.py; AutoGPTQ",
                   multiple_in=(GROUP, 8), multiple_out=(8,)),
        # vLLM awq.py AWQLinearMethod / AutoAWQ WQLinear_GEMM: qweight int32 [in, out/8],
        # qzeros int32 [in/g, out/8], scales fp16 [in/g, out]; no g_idx
        FormatSpec(WeightFormat.AWQ,
                   (Part("qweight", PartKind.DATA, _INT4),
                    Part("scales", PartKind.SCALES, _FP16, GROUP),
                    Part("qzeros", PartKind.ZEROS, _INT4, GROUP)),
                   "int32 qweight [in, out/8] + fp16 scales [in/g, out] + int32 qzeros [in/g, out/8]",
                   "vLLM quantization/awq.py; AutoAWQ", multiple_in=(GROUP,), multiple_out=(8,)),
        _bnb4(WeightFormat.BNB_NF4, "nf4"),
        _bnb4(WeightFormat.BNB_FP4, "fp4"),
        *(_gguf(fmt, block) for fmt, block in GGUF_BLOCKS.items()),
    )
}

GGUF_FORMATS = frozenset(GGUF_BLOCKS)
GGUF_FALLBACK = {WeightFormat.Q2_K: WeightFormat.Q4_0, WeightFormat.Q3_K: WeightFormat.Q4_0,
                 WeightFormat.Q4_K: WeightFormat.Q5_0, WeightFormat.Q5_K: WeightFormat.Q5_1,
                 WeightFormat.Q6_K: WeightFormat.Q8_0}
# Tensors outside the layers that a format may quantise, and so the names keep_16bit accepts.
# Parts a checkpoint may keep unquantised: the embedding and head (GGUF), or the attention or
# dense-MLP projections (gpt-oss's mxfp4 checkpoint quantises only its experts)
KEEPABLE = (ParamCategory.EMBEDDING.value, ParamCategory.OUTPUT_HEAD.value, ParamCategory.ATTENTION.value,
            ParamCategory.MLP.value)
_REST_DTYPES = (DType.FP32, DType.FP16, DType.BF16)


def parse_weight_format(text: str | WeightFormat) -> WeightFormat:
    """A format from its CLI string, case-insensitive (``Q4_K`` and ``q4_k`` both work)."""
    try:
        return WeightFormat(str(text).strip().lower())
    except ValueError:
        raise InputError(
            f"unknown weight format {text!r}; choose one of {', '.join(f.value for f in WeightFormat)}"
        ) from None


# --- Tensor shapes ---------------------------------------------------------------------------------


class LinearShape(NamedTuple):
    """``count`` matrices named ``name`` mapping ``d_in`` inputs to ``d_out`` outputs."""

    name: str
    category: ParamCategory
    d_in: int
    d_out: int
    count: int

    @property
    def numel(self) -> int:
        return self.d_in * self.d_out * self.count


def linear_weights(model: ModelConfig) -> Iterator[LinearShape]:
    """Every linear weight inside the decoder layers (attention, MLP and expert projections; not
    routers), with the names and counts of ``memcalc.estimate.params.count_params``, read from the
    tensor inventory. Multi-head latent attention follows Hugging Face's ``DeepseekV3Attention``
    (q_a/q_b or q, kv_a_proj_with_mqa, kv_b, o projections)."""
    from memcalc.estimate.params import group_tensors

    linear = [tensor for layer in build_inventory(model).layers for tensor in layer.tensors if tensor.linear]
    by_name = {tensor.name: tensor for tensor in linear}
    for group in group_tensors(linear).groups:
        tensor = by_name[group.name]
        yield LinearShape(group.name, group.category, tensor.d_in, tensor.d_out, group.count)


def embedding_weights(model: ModelConfig) -> Iterator[LinearShape]:
    """The token embedding and the untied output head as matrices of rows of ``hidden_size``
    (ggml's token_embd and output are ``[hidden, vocab]`` with ``ne[0] = hidden``). Learned position
    embeddings are not listed: llama-quantize leaves ``position_embd`` unquantised."""
    inventory = build_inventory(model)
    for tensor in (*inventory.embeddings, *inventory.final):
        if tensor.split is Split.VOCAB:
            yield LinearShape(tensor.name, tensor.category, tensor.d_in, tensor.d_out, tensor.count)


# --- Bytes -----------------------------------------------------------------------------------------


def _resolve_block(block: int, dim: int, group_size: int) -> int:
    if block == GROUP:
        block = WHOLE if group_size == -1 else group_size
    return dim if block == WHOLE else block


def _active_parts(spec: FormatSpec, double_quant: bool) -> tuple[Part, ...]:
    return tuple(p for p in spec.parts if p.double_quant is None or p.double_quant == double_quant)


def part_bytes(part: Part, d_in: int, d_out: int, group_size: int = 128) -> int:
    """Bytes of one stored tensor of one ``d_in x d_out`` matrix: ``ceil(values x bits / 8)`` with
    ``values = ceil(d_in / block_in) x ceil(d_out / block_out)`` (a partial block at the edge keeps its
    own scale), or ``ceil(d_in x d_out / block_in)`` over the flattened tensor when ``flat``."""
    if part.flat:
        numel = d_in * d_out
        values = -(-numel // _resolve_block(part.block_in, numel, group_size))
    else:
        values = (-(-d_in // _resolve_block(part.block_in, d_in, group_size))
                  * -(-d_out // _resolve_block(part.block_out, d_out, group_size)))
    return -(-values * part.bits // 8)


def check_shape(fmt: WeightFormat | str, name: str, d_in: int, d_out: int, group_size: int = 128) -> None:
    """Raise ``InputError`` naming the tensor when its shape does not fit the format: a GGUF row
    (``d_in``) must be whole blocks (ggml_row_size; llama-quantize would pick another type for that
    tensor); GPTQ/AWQ need ``d_in`` a multiple of the group and ``d_out`` of 8 (vLLM create_weights)."""
    spec = FORMATS[parse_weight_format(fmt)]
    for dim_name, dim, multiples in (("input size (row length)", d_in, spec.multiple_in),
                                     ("output size", d_out, spec.multiple_out)):
        for multiple in multiples:
            size = _resolve_block(multiple, dim, group_size)
            if dim % size:
                what = "group_size" if multiple == GROUP else "block" if spec.format in GGUF_FORMATS else "packing"
                raise InputError(
                    f"{spec.format.value}: {name} has {dim_name} {dim}, not a multiple of the {size}-value {what}"
                )


def tensor_bytes(fmt: WeightFormat | str, d_in: int, d_out: int, *, group_size: int = 128,
                 double_quant: bool = True, name: str = "tensor") -> dict[str, int]:
    """Bytes of each stored tensor of one ``d_in x d_out`` matrix in ``fmt``, by part name
    (e.g. gptq: qweight, scales, qzeros, g_idx)."""
    spec = FORMATS[parse_weight_format(fmt)]
    _check_group_size(group_size)
    check_shape(spec.format, name, d_in, d_out, group_size)
    out: dict[str, int] = {}
    for part in _active_parts(spec, double_quant):
        out[part.name] = out.get(part.name, 0) + part_bytes(part, d_in, d_out, group_size)
    return out


def nominal_bits_per_weight(fmt: WeightFormat | str, *, group_size: int = 128, double_quant: bool = True) -> Fraction:
    """Bits per weight of the parts that scale with the weight count (blocks of fixed size), exactly:
    bnb-nf4 4.5 or 4 + 8/64 + 32/(64*256) = 4.127 with double quantisation; gptq 4 + 16/g + 4/g.
    Per-row, per-column and per-tensor parts (int8's row scale, GPTQ's g_idx, FP8's tensor scale,
    the bitsandbytes code tables) depend on the shape and are left out: ``tensor_bytes`` has them."""
    spec = FORMATS[parse_weight_format(fmt)]
    _check_group_size(group_size)
    total = Fraction(0)
    for part in _active_parts(spec, double_quant):
        blocks = [WHOLE if block == GROUP and group_size == -1 else group_size if block == GROUP else block
                  for block in ((part.block_in,) if part.flat else (part.block_in, part.block_out))]
        if WHOLE not in blocks:
            total += Fraction(part.bits, blocks[0] * (blocks[1] if len(blocks) > 1 else 1))
    return total


def _check_group_size(group_size: int) -> None:
    if group_size != -1 and group_size <= 0:
        raise InputError(f"group_size must be positive or -1 (one group over the whole input), got {group_size}")


@dataclass(frozen=True)
class QuantisedTensor:
    """Bytes of ``count`` matrices of one name, every copy included."""

    name: str
    category: ParamCategory
    d_in: int
    d_out: int
    count: int
    data_bytes: int
    overhead_bytes: int


@dataclass(frozen=True)
class WeightBreakdown:
    """Weights of a model in one format. ``total_bytes = data + scales + zeros + indices + rest``."""

    format: WeightFormat
    compute_dtype: DType  # dtype of the tensors kept unquantised
    group_size: int | None  # GPTQ/AWQ only
    double_quant: bool | None  # bitsandbytes 4-bit only
    quantised_params: int
    data_bytes: int
    scale_bytes: int
    zero_bytes: int
    index_bytes: int
    rest_params: int
    rest_bytes: int
    parts: tuple[tuple[str, int], ...]  # bytes by stored-tensor name (qweight, scales, absmax, ...)
    rest_by_category: tuple[tuple[ParamCategory, int], ...]  # bytes of the unquantised tensors
    tensors: tuple[QuantisedTensor, ...]

    @property
    def overhead_bytes(self) -> int:
        return self.scale_bytes + self.zero_bytes + self.index_bytes

    @property
    def quantised_bytes(self) -> int:
        return self.data_bytes + self.overhead_bytes

    @property
    def total_bytes(self) -> int:
        return self.quantised_bytes + self.rest_bytes

    @property
    def total_params(self) -> int:
        return self.quantised_params + self.rest_params

    @property
    def bits_per_quantised_weight(self) -> float:
        return 8 * self.quantised_bytes / self.quantised_params if self.quantised_params else 0.0

    @property
    def bits_per_weight(self) -> float:
        """Over every parameter, as llama-bench and the llama.cpp quantize README report it."""
        return 8 * self.total_bytes / self.total_params


def _keep_set(keep_16bit: Iterable[str]) -> frozenset[str]:
    keep = frozenset(str(item.value if isinstance(item, ParamCategory) else item) for item in keep_16bit)
    unknown = keep - set(KEEPABLE)
    if unknown:
        raise InputError(f"keep_16bit accepts {', '.join(KEEPABLE)}; got {', '.join(sorted(unknown))}")
    return keep


def weight_bytes(
    model: ModelConfig,
    fmt: WeightFormat | str,
    *,
    group_size: int = 128,
    compute_dtype: DType | str | None = None,
    double_quant: bool = True,
    keep_16bit: Iterable[str] = (),
) -> WeightBreakdown:
    """Bytes of ``model``'s weights stored in ``fmt``.

    The linear weights of the layers (``linear_weights``) are stored in the format; GGUF types also
    store the token embedding and the output head in the same type unless ``keep_16bit`` names
    ``embedding``/``output_head``. Every other parameter of ``count_params`` (norms, biases, routers,
    embeddings, head, learned positions) is stored in ``compute_dtype``: by default the format's own
    dtype for fp32/fp16/bf16 (so the total is ``count_params(model).total x bytes``), else bf16.
    ``group_size`` applies to gptq/awq (-1: one group over the whole input), ``double_quant`` to
    bnb-nf4/bnb-fp4 (bitsandbytes ``compress_statistics``).
    """
    spec = FORMATS[parse_weight_format(fmt)]
    _check_group_size(group_size)
    if compute_dtype is None:
        rest_dtype = spec.float_dtype or DType.BF16
    else:
        rest_dtype = DType(compute_dtype)
        if rest_dtype not in _REST_DTYPES:
            raise InputError(f"compute_dtype must be one of fp32, fp16, bf16; got {rest_dtype.value}")
    keep = _keep_set(keep_16bit)

    shapes = [shape for shape in linear_weights(model) if shape.category.value not in keep]
    if spec.quantises_embeddings:
        shapes += [s for s in embedding_weights(model) if s.category.value not in keep]

    inventory = {group.name: group for group in count_params(model).groups}
    for shape in shapes:
        group = inventory.get(shape.name)
        if group is None or group.total != shape.numel:
            hint = " (multi-head latent attention is not counted by memcalc.estimate.params yet)" if model.mla else ""
            raise InputError(f"{model.name}: count_params lists no tensor {shape.name} of "
                             f"{shape.count} x {shape.d_in} x {shape.d_out}{hint}")

    parts = _active_parts(spec, double_quant)
    totals = {kind: 0 for kind in PartKind}
    by_part: dict[str, int] = {}
    tensors = []
    for shape in shapes:
        tensor_parts = parts
        try:
            check_shape(spec.format, shape.name, shape.d_in, shape.d_out, group_size)
        except InputError:
            fallback = GGUF_FALLBACK.get(spec.format)
            if fallback is None:
                raise
            # llama-quantize stores a tensor whose rows are not whole k-quant blocks in a fallback
            # type (llama-quant.cpp: q4_K -> q5_0, q5_K -> q5_1, q6_K -> q8_0, q2_K/q3_K -> iq4_nl,
            # whose 18-byte block of 32 is q4_0's size), or in f16 when that does not fit either
            try:
                check_shape(fallback, shape.name, shape.d_in, shape.d_out, group_size)
                tensor_parts = _active_parts(FORMATS[fallback], double_quant)
            except InputError:
                tensor_parts = (Part("f16", PartKind.DATA, 16),)
        data = overhead = 0
        for part in tensor_parts:
            nbytes = part_bytes(part, shape.d_in, shape.d_out, group_size) * shape.count
            totals[part.kind] += nbytes
            by_part[part.name] = by_part.get(part.name, 0) + nbytes
            if part.kind is PartKind.DATA:
                data += nbytes
            else:
                overhead += nbytes
        tensors.append(QuantisedTensor(shape.name, shape.category, shape.d_in, shape.d_out, shape.count, data, overhead))

    quantised_names = {shape.name for shape in shapes}
    rest_params = 0
    rest_by_category: dict[ParamCategory, int] = {}
    for name, group in inventory.items():
        if name in quantised_names:
            continue
        rest_params += group.total
        nbytes = storage_bytes(group.numel, rest_dtype) * group.count
        rest_by_category[group.category] = rest_by_category.get(group.category, 0) + nbytes

    uses_group = any(GROUP in (p.block_in, p.block_out) for p in spec.parts)
    uses_double_quant = any(p.double_quant is not None for p in spec.parts)
    return WeightBreakdown(
        format=spec.format,
        compute_dtype=rest_dtype,
        group_size=group_size if uses_group else None,
        double_quant=double_quant if uses_double_quant else None,
        quantised_params=sum(shape.numel for shape in shapes),
        data_bytes=totals[PartKind.DATA],
        scale_bytes=totals[PartKind.SCALES],
        zero_bytes=totals[PartKind.ZEROS],
        index_bytes=totals[PartKind.INDICES],
        rest_params=rest_params,
        rest_bytes=sum(rest_by_category.values()),
        parts=tuple(by_part.items()),
        rest_by_category=tuple(rest_by_category.items()),
        tensors=tuple(tensors),
    )
