"""Number formats computed from their bit layouts (memcalc/formats.py), checked against published values.

Every expected number below is typed in from its source (named in a comment), never computed by
memcalc; the module computes the same numbers from sign/exponent/mantissa layouts.
"""

from __future__ import annotations

import json
import math
import struct
from fractions import Fraction
from pathlib import Path
from statistics import NormalDist

import pytest
from hypothesis import given
from hypothesis import strategies as st

from memcalc.errors import InputError
from memcalc.formats import (
    FORMATS,
    FloatFormat,
    FormatInfo,
    Specials,
    describe,
    exact_str,
    format_table,
    get_format,
    json_document,
    main,
    markdown_table,
)

P = Fraction(2)  # P**k is an exact power of two


# --- published values -------------------------------------------------------------------------

# (format, field, expected, source)
PUBLISHED = [
    # OCP OFP8 spec rev 1.0, Table 1; Micikevicius et al. 2022, arXiv:2209.05433, Table 1 (E4M3):
    # max normal 1.75 * 2^8 = 448, min normal 2^-6, min subnormal 2^-9, bias 7.
    ("fp8-e4m3", "max", 448, "OFP8 / arXiv:2209.05433 Table 1"),
    ("fp8-e4m3", "min_normal", P**-6, "OFP8 / arXiv:2209.05433 Table 1"),
    ("fp8-e4m3", "min_subnormal", P**-9, "OFP8 / arXiv:2209.05433 Table 1"),
    ("fp8-e4m3", "bias", 7, "OFP8 / arXiv:2209.05433 Table 1"),
    # Same tables (E5M2): max normal 1.75 * 2^15 = 57344, min normal 2^-14, min subnormal 2^-16, bias 15.
    ("fp8-e5m2", "max", 57344, "OFP8 / arXiv:2209.05433 Table 1"),
    ("fp8-e5m2", "min_normal", P**-14, "OFP8 / arXiv:2209.05433 Table 1"),
    ("fp8-e5m2", "min_subnormal", P**-16, "OFP8 / arXiv:2209.05433 Table 1"),
    ("fp8-e5m2", "bias", 15, "OFP8 / arXiv:2209.05433 Table 1"),
    # IEEE 754-2008 binary16: max 65504, min normal 2^-14 (6.10e-5), min subnormal 2^-24 (5.96e-8), eps 2^-10.
    ("fp16", "max", 65504, "IEEE 754-2008 binary16"),
    ("fp16", "min_normal", P**-14, "IEEE 754-2008 binary16"),
    ("fp16", "min_subnormal", P**-24, "IEEE 754-2008 binary16"),
    ("fp16", "epsilon", P**-10, "IEEE 754-2008 binary16"),
    # bfloat16 (Kalamkar et al. 2019, arXiv:1905.12322; torch.finfo(torch.bfloat16).max prints
    # 3.3895313892515355e+38): min normal 2^-126 (~1.18e-38), eps 2^-7.
    ("bf16", "min_normal", P**-126, "bfloat16: fp32 exponent range"),
    ("bf16", "epsilon", P**-7, "bfloat16: 7 mantissa bits"),
    # IEEE 754-2008 binary32: eps 2^-23 (FLT_EPSILON 1.1920929e-07), min normal 2^-126 (FLT_MIN).
    ("fp32", "epsilon", P**-23, "IEEE 754-2008 binary32 / C FLT_EPSILON"),
    ("fp32", "min_normal", P**-126, "IEEE 754-2008 binary32 / C FLT_MIN"),
    ("fp32", "min_subnormal", P**-149, "IEEE 754-2008 binary32 / C FLT_TRUE_MIN"),
    # OCP Microscaling Formats (MX) Specification v1.0: FP4 E2M1 max 6.0, min normal 1.0, min subnormal 0.5;
    # FP6 E3M2 max 28.0, min normal 2^-2, min subnormal 2^-4 (0.0625); FP6 E2M3 max 7.5, min normal 1.0,
    # min subnormal 2^-3 (0.125).
    ("fp4-e2m1", "max", 6, "OCP MX v1.0, FP4 element type"),
    ("fp4-e2m1", "min_normal", 1, "OCP MX v1.0, FP4 element type"),
    ("fp4-e2m1", "min_subnormal", Fraction(1, 2), "OCP MX v1.0, FP4 element type"),
    ("fp6-e3m2", "max", 28, "OCP MX v1.0, FP6 element types"),
    ("fp6-e3m2", "min_normal", Fraction(1, 4), "OCP MX v1.0, FP6 element types"),
    ("fp6-e3m2", "min_subnormal", Fraction(1, 16), "OCP MX v1.0, FP6 element types"),
    ("fp6-e2m3", "max", Fraction(15, 2), "OCP MX v1.0, FP6 element types"),
    ("fp6-e2m3", "min_normal", 1, "OCP MX v1.0, FP6 element types"),
    ("fp6-e2m3", "min_subnormal", Fraction(1, 8), "OCP MX v1.0, FP6 element types"),
    # OCP MX v1.0, E8M0 scale: exponent bias 127, range 2^-127 .. 2^127, no zero, NaN = 0xFF.
    ("e8m0", "max", P**127, "OCP MX v1.0, E8M0 scale type"),
    ("e8m0", "min", P**-127, "OCP MX v1.0, E8M0 scale type"),
    ("e8m0", "bias", 127, "OCP MX v1.0, E8M0 scale type"),
    # Two's complement: n bits hold -2^(n-1) .. 2^(n-1)-1.
    ("int8", "min", -128, "two's complement int8"),
    ("int8", "max", 127, "two's complement int8"),
    ("int4", "min", -8, "two's complement int4"),
    ("int4", "max", 7, "two's complement int4"),
    ("uint8", "min", 0, "unsigned 8-bit"),
    ("uint8", "max", 255, "unsigned 8-bit"),
]


@pytest.mark.parametrize(("name", "field", "expected", "source"), PUBLISHED, ids=lambda v: str(v)[:24])
def test_published_values(name, field, expected, source):
    assert getattr(describe(name), field) == expected, source


def test_fp16_and_bf16_and_fp32_printed_decimals():
    # IEEE 754 binary16 min normal 6.10e-5 and min subnormal 5.96e-8, as printed in most references
    # (and in the seed "6.10x10^-5 ~ 65504").
    fp16 = describe("fp16")
    assert f"{float(fp16.min_normal):.3g}" == "6.1e-05"
    assert f"{float(fp16.min_subnormal):.3g}" == "5.96e-08"
    # bfloat16 max 3.3895313892515355e38 and min normal ~1.18e-38 (torch.finfo(torch.bfloat16) docs).
    bf16 = describe("bf16")
    assert float(bf16.max) == 3.3895313892515355e38
    assert f"{float(bf16.min_normal):.3g}" == "1.18e-38"
    # binary32 max 3.4028234663852886e38 (C FLT_MAX = 3.40282347e+38F).
    assert float(describe("fp32").max) == 3.4028234663852886e38


def test_fp4_e2m1_values():
    # OCP MX v1.0, FP4 E2M1: the positive values are 0.5, 1, 1.5, 2, 3, 4, 6 (plus zero).
    fp4 = get_format("fp4-e2m1")
    assert list(fp4.finite_nonnegative()) == [0, Fraction(1, 2), 1, Fraction(3, 2), 2, 3, 4, 6]
    assert describe("fp4").finite_values == 15  # 16 codes, +0 and -0 are one value


def test_e4m3_codes():
    # OFP8 rev 1.0: E4M3 has no infinities; S.1111.111 is NaN (two codes); S.1111.110 = 448.
    e4m3 = get_format("fp8-e4m3")
    assert math.isnan(e4m3.decode(0x7F)) and math.isnan(e4m3.decode(0xFF))
    assert e4m3.decode(0x7E) == 448 and e4m3.decode(0xFE) == -448
    assert e4m3.decode(0x78) == 256  # S.1111.000 is a normal number, unlike IEEE
    info = describe("e4m3")
    assert not info.has_inf and info.has_nan
    assert info.finite_values == 253  # 256 codes - 2 NaN - (-0)


def test_e5m2_codes():
    # OFP8 rev 1.0: E5M2 follows IEEE: S.11111.00 = inf, S.11111.{01,10,11} = NaN.
    e5m2 = get_format("fp8-e5m2")
    assert e5m2.decode(0x7C) == math.inf and e5m2.decode(0xFC) == -math.inf
    assert all(math.isnan(e5m2.decode(code)) for code in (0x7D, 0x7E, 0x7F, 0xFD, 0xFE, 0xFF))
    assert e5m2.decode(0x7B) == 57344
    assert describe("e5m2").finite_values == 256 - 2 - 6 - 1


def test_e8m0_codes():
    # OCP MX v1.0: E8M0 encodes 2^(code - 127) for codes 0..254, and NaN for 0xFF; there is no zero.
    e8m0 = get_format("e8m0")
    assert e8m0.decode(0) == P**-127
    assert e8m0.decode(127) == 1
    assert e8m0.decode(254) == P**127
    assert math.isnan(e8m0.decode(255))
    info = describe("e8m0")
    assert info.finite_values == 255 and info.min_subnormal is None and info.epsilon == 1
    assert 0 not in set(e8m0.finite_nonnegative())


def test_int_formats():
    int8 = describe("int8")
    assert int8.symmetric_min == -127  # symmetric quantisation uses -127..127 (e.g. LLM.int8, TensorRT)
    assert int8.step == 1 and int8.codes == 256 and int8.finite_values == 256
    assert describe("int4").symmetric_min == -7
    assert describe("uint8").symmetric_min is None


def test_nf4_levels_follow_the_qlora_construction():
    # QLoRA (arXiv:2305.14314) sec. 3 / bitsandbytes create_normal_map(offset=0.9677083): 8 positive
    # quantiles of N(0,1) over linspace(offset, 0.5, 9)[:-1], 7 negative ones over linspace(offset, 0.5, 8)[:-1],
    # and zero, divided by the largest. Recomputed here with the standard library's normal quantile.
    normal, offset = NormalDist(), 0.9677083

    def linspace(a, b, n):
        return [a + (b - a) * i / (n - 1) for i in range(n)]

    positive = [normal.inv_cdf(p) for p in linspace(offset, 0.5, 9)[:-1]]
    negative = [-normal.inv_cdf(p) for p in linspace(offset, 0.5, 8)[:-1]]
    values = sorted(positive + [0.0] + negative)
    values = [v / max(values) for v in values]
    nf4 = describe("nf4")
    assert len(nf4.levels) == 16 and nf4.codes == 16
    assert nf4.min == -1 and nf4.max == 1 and 0 in nf4.levels
    # bitsandbytes builds the table in float32, hence the tolerance.
    assert max(abs(float(a) - b) for a, b in zip(nf4.levels, values)) < 1e-6
    assert "2305.14314" in nf4.source


# --- consistency of the closed forms with decoding every code --------------------------------


@pytest.mark.parametrize("fmt", [f for f in FORMATS if isinstance(f, FloatFormat) and f.bits <= 8], ids=str)
def test_closed_forms_match_enumeration(fmt):
    values = [fmt.decode(code) for code in range(2**fmt.bits)]
    finite = [v for v in values if isinstance(v, Fraction)]
    positive = sorted(v for v in finite if v > 0)
    assert len(finite) == fmt.finite_codes
    assert len(set(finite)) == fmt.finite_values
    assert max(finite) == fmt.max_finite
    assert positive[0] == (fmt.min_subnormal if fmt.min_subnormal is not None else fmt.min_normal)
    assert sum(math.isnan(v) for v in values if isinstance(v, float)) == fmt.nan_codes
    assert sum(math.isinf(v) for v in values if isinstance(v, float)) == fmt.inf_codes
    # machine epsilon: the gap between 1 and the next larger value
    assert positive[positive.index(1) + 1] - 1 == fmt.epsilon


def _structured_codes(fmt: FloatFormat) -> list[int]:
    """Every exponent code with the mantissas 0, 1, 2, max-1 and max, both signs."""
    top = 2**fmt.mantissa_bits - 1
    mantissas = sorted({m for m in (0, 1, 2, top - 1, top) if 0 <= m <= top})
    return [
        (sign << (fmt.exponent_bits + fmt.mantissa_bits)) | (exponent << fmt.mantissa_bits) | mantissa
        for sign in range(2**fmt.sign_bits)
        for exponent in range(2**fmt.exponent_bits)
        for mantissa in mantissas
    ]


def _same(value, reference: float) -> bool:
    if isinstance(value, float) and math.isnan(value):
        return math.isnan(reference)
    return float(value) == reference


def test_fp16_fp32_bf16_decode_like_the_hardware_formats():
    # Python's struct module decodes IEEE binary16 ('e') and binary32 ('f'); bf16 is the top half of a binary32.
    fp16, fp32, bf16 = get_format("fp16"), get_format("fp32"), get_format("bf16")
    for code in _structured_codes(fp16):
        assert _same(fp16.decode(code), struct.unpack("<e", code.to_bytes(2, "little"))[0]), hex(code)
    for code in _structured_codes(bf16):
        assert _same(bf16.decode(code), struct.unpack("<f", (code << 16).to_bytes(4, "little"))[0]), hex(code)
    for code in _structured_codes(fp32):
        assert _same(fp32.decode(code), struct.unpack("<f", code.to_bytes(4, "little"))[0]), hex(code)


@given(st.integers(min_value=0, max_value=2**32 - 1))
def test_fp32_decode_matches_struct(code):
    assert _same(get_format("fp32").decode(code), struct.unpack("<f", code.to_bytes(4, "little"))[0])


# --- IEEE relations, for any layout ------------------------------------------------------------


@given(exponent_bits=st.integers(2, 11), mantissa_bits=st.integers(1, 52))
def test_ieee_relations(exponent_bits, mantissa_bits):
    fmt = FloatFormat("x", exponent_bits, mantissa_bits, Specials.IEEE, "", "")
    emax = 2 ** (exponent_bits - 1) - 1  # IEEE 754: emax = bias, emin = 1 - emax
    assert fmt.bias == emax and fmt.emax == emax and fmt.emin == 1 - emax
    assert fmt.epsilon == P**-mantissa_bits
    assert fmt.max_finite == (2 - fmt.epsilon) * P**emax
    assert fmt.min_normal == P ** (1 - emax)
    assert fmt.min_subnormal == fmt.min_normal * fmt.epsilon
    assert fmt.max_subnormal == fmt.min_normal - fmt.min_subnormal
    assert fmt.finite_codes == 2 * (2**exponent_bits - 1) * 2**mantissa_bits
    ratio = fmt.max_finite / fmt.min_subnormal  # too large for a float when E = 11
    assert math.isclose(fmt.binades, math.log2(ratio.numerator) - math.log2(ratio.denominator))


@given(exponent_bits=st.integers(2, 6), mantissa_bits=st.integers(1, 4), specials=st.sampled_from(list(Specials)))
def test_small_layouts_enumerate_consistently(exponent_bits, mantissa_bits, specials):
    fmt = FloatFormat("x", exponent_bits, mantissa_bits, specials, "", "")
    nonneg = list(fmt.finite_nonnegative())
    assert nonneg == sorted(nonneg) and len(set(nonneg)) == len(nonneg)  # codes are monotone in value
    assert nonneg[-1] == fmt.max_finite
    assert nonneg[1] == fmt.min_subnormal
    # the fn rule gives the all-ones exponent back except one code: max = (2 - 2^(1-M)) * 2^(2^E - 1 - bias)
    if specials is Specials.NAN_ONLY:
        assert fmt.max_finite == (2 - 2 * fmt.epsilon) * P ** (2**exponent_bits - 1 - fmt.bias)
    if specials is Specials.NONE:
        assert fmt.max_finite == (2 - fmt.epsilon) * P ** (2**exponent_bits - 1 - fmt.bias)


# --- torch, where it has the dtype -------------------------------------------------------------

TORCH_DTYPES = {
    "fp32": "float32",
    "fp16": "float16",
    "bf16": "bfloat16",
    "fp8-e4m3": "float8_e4m3fn",
    "fp8-e5m2": "float8_e5m2",
    "e8m0": "float8_e8m0fnu",
    "fp4-e2m1": "float4_e2m1fn_x2",
}


def _torch_dtype(name: str):
    torch = pytest.importorskip("torch")
    dtype = getattr(torch, TORCH_DTYPES[name], None)
    if dtype is None:
        pytest.skip(f"this torch has no torch.{TORCH_DTYPES[name]}")
    return torch, dtype


@pytest.mark.parametrize("name", list(TORCH_DTYPES))
def test_matches_torch_finfo(name):
    torch, dtype = _torch_dtype(name)
    finfo = torch.finfo(dtype)
    try:
        finfo.max
    except (TypeError, RuntimeError, NotImplementedError) as error:  # torch 2.13: float4_e2m1fn_x2 has bits only
        pytest.skip(f"torch.finfo({dtype}) has no max: {error}")
    info = describe(name)
    packed = 2 if TORCH_DTYPES[name].endswith("_x2") else 1  # *_x2 dtypes hold two elements per byte
    assert finfo.bits == info.bits * packed
    assert finfo.max == float(info.max)
    assert finfo.min == float(info.min)  # -max for signed formats; 2^-127 for unsigned e8m0
    assert finfo.smallest_normal == float(info.min_normal)
    assert finfo.eps == float(info.epsilon)


@pytest.mark.parametrize("name", ["fp8-e4m3", "fp8-e5m2", "e8m0"])
def test_every_code_matches_torch(name):
    torch, dtype = _torch_dtype(name)
    reference = torch.arange(256, dtype=torch.uint8).view(dtype).float().tolist()
    fmt = get_format(name)
    for code, expected in enumerate(reference):
        assert _same(fmt.decode(code), expected), hex(code)


# --- API and output ------------------------------------------------------------------------------


def test_table_and_lookup():
    rows = format_table()
    assert [row.name for row in rows] == [f.name for f in FORMATS]
    assert all(isinstance(row, FormatInfo) for row in rows)
    assert {"fp32", "fp16", "bf16", "fp8-e4m3", "fp8-e5m2", "int8", "int4", "nf4"} <= {row.name for row in rows}
    assert describe("float8_e4m3fn") == describe("E4M3") == describe("fp8_e4m3")
    assert describe("bfloat16").name == "bf16"
    with pytest.raises(InputError, match="unknown number format"):
        describe("fp7")


def test_exact_strings():
    assert exact_str(Fraction(448)) == "448"
    assert exact_str(P**-9) == "2^-9"
    assert exact_str(describe("bf16").max) == "255*2^120"
    assert exact_str(describe("fp32").max) == "16777215*2^104"
    assert exact_str(-P**127) == "-2^127"


def test_json_document_round_trips():
    document = json.loads(json.dumps(json_document()))
    e4m3 = next(row for row in document["formats"] if row["name"] == "fp8-e4m3")
    assert e4m3["max"] == 448.0 and e4m3["exact"]["min_subnormal"] == "2^-9"
    assert e4m3["has_inf"] is False and e4m3["has_nan"] is True


def test_module_entry_point(capsys):
    assert main(["--markdown", "fp16"]) == 0
    assert "| fp16 | 16 | 1/5/10 | 15 | 65504 |" in capsys.readouterr().out
    assert main(["fp9"]) == 2


def test_docs_table_is_current():
    # docs/precision.md embeds `python -m memcalc.formats --markdown`; regenerate it when this fails.
    doc = Path(__file__).resolve().parents[1] / "docs" / "precision.md"
    assert markdown_table() in doc.read_text()
