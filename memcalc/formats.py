"""Number formats described by their bit layout, with every property computed from the layout.

A float format is a sign bit, E exponent bits, M mantissa bits, an exponent bias and a rule for
which codes are special (infinities, NaN). From that layout alone this module derives the largest
finite value, the smallest normal and subnormal values, machine epsilon (2^-M), how many codes are
finite and the dynamic range in binades, in exact arithmetic (``fractions.Fraction``); floats are
only for display. Integer formats are a bit width and a signedness; NF4 is a lookup table, kept as
data with its source.

Layouts and special-value rules:

- FP32, FP16, BF16, FP8 E5M2: IEEE 754 style; the all-ones exponent holds +-inf (mantissa 0) and
  NaN (any other mantissa). IEEE 754-2008; OCP 8-bit Floating Point Specification (OFP8) rev 1.0.
- FP8 E4M3 (``float8_e4m3fn``): no infinities; the only NaN is S.1111.111, so the all-ones exponent
  still holds 7 finite values per sign (max 1.75 * 2^8 = 448). OFP8 rev 1.0; Micikevicius et al.
  2022, "FP8 Formats for Deep Learning", arXiv:2209.05433, Table 1.
- FP6 E3M2 / E2M3 and FP4 E2M1: every code is a finite number (no inf, no NaN). OCP Microscaling
  Formats (MX) Specification v1.0 (element data types).
- E8M0: the MX shared scale. No sign, no mantissa, bias 127, no zero and no subnormals (code 0 is
  2^-127); 0xFF is NaN. OCP MX v1.0 (scale data type).

Nothing here imports torch, numpy or rich. ``python -m memcalc.formats --markdown`` prints the
table used in docs/precision.md; ``--json`` prints the same rows as JSON.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from enum import StrEnum
from fractions import Fraction

from memcalc.errors import InputError


class Specials(StrEnum):
    """Which codes of a float format are not finite numbers."""

    IEEE = "ieee"  # all-ones exponent: inf (mantissa 0) and NaN (mantissa != 0)
    NAN_ONLY = "nan-only"  # no inf; only the all-ones exponent-and-mantissa code is NaN ("fn")
    NONE = "none"  # every code is finite (OCP MX FP6/FP4)


@dataclass(frozen=True)
class FormatInfo:
    """One row of ``memcalc formats``: exact values as ``Fraction`` (``None`` where not applicable)."""

    name: str
    kind: str  # "float", "int" or "lookup"
    bits: int
    sign_bits: int | None
    exponent_bits: int | None
    mantissa_bits: int | None
    bias: int | None
    max: Fraction  # largest finite value
    min: Fraction  # most negative finite value (0 or the smallest value for unsigned formats)
    min_normal: Fraction | None  # smallest positive normal (floats)
    min_subnormal: Fraction | None  # smallest positive subnormal (floats that have subnormals)
    min_positive: Fraction | None  # smallest positive representable value
    epsilon: Fraction | None  # machine epsilon 2^-M: the gap between 1 and the next value (floats)
    step: Fraction | None  # spacing of the grid (integers: 1)
    codes: int  # 2^bits bit patterns
    finite_values: int  # distinct finite values (-0 and +0 count once)
    has_inf: bool
    has_nan: bool
    binades: float | None  # log2(max / min_positive) for floats
    description: str
    source: str
    aliases: tuple[str, ...] = ()
    symmetric_min: Fraction | None = None  # integers: the range symmetric quantisation uses (-127 for int8)
    levels: tuple[Fraction, ...] | None = None  # lookup formats: every value, ascending

    def as_dict(self) -> dict:
        """A JSON-ready dict: numbers as floats, plus ``exact`` strings (``448``, ``2^-9``, ``255*2^120``)."""
        numeric = ("max", "min", "min_normal", "min_subnormal", "min_positive", "epsilon", "step", "symmetric_min")
        out: dict = {
            "name": self.name,
            "kind": self.kind,
            "bits": self.bits,
            "sign_bits": self.sign_bits,
            "exponent_bits": self.exponent_bits,
            "mantissa_bits": self.mantissa_bits,
            "bias": self.bias,
        }
        for key in numeric:
            value = getattr(self, key)
            out[key] = None if value is None else float(value)
        out.update(
            codes=self.codes,
            finite_values=self.finite_values,
            has_inf=self.has_inf,
            has_nan=self.has_nan,
            binades=self.binades,
            exact={key: exact_str(getattr(self, key)) for key in numeric if getattr(self, key) is not None},
            levels=None if self.levels is None else [float(v) for v in self.levels],
            aliases=list(self.aliases),
            description=self.description,
            source=self.source,
        )
        return out


@dataclass(frozen=True)
class FloatFormat:
    """A binary floating-point layout: ``sign_bits`` + ``exponent_bits`` + ``mantissa_bits``."""

    name: str
    exponent_bits: int
    mantissa_bits: int
    specials: Specials
    description: str
    source: str
    sign_bits: int = 1
    bias: int | None = None  # None: the IEEE bias 2^(E-1) - 1
    subnormals: bool = True  # exponent code 0 encodes zero and subnormals (False for E8M0)
    aliases: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if self.sign_bits not in (0, 1) or self.exponent_bits < 1 or self.mantissa_bits < 0:
            raise ValueError(f"{self.name}: invalid layout")
        if self.bias is None:
            object.__setattr__(self, "bias", 2 ** (self.exponent_bits - 1) - 1)

    @property
    def bits(self) -> int:
        return self.sign_bits + self.exponent_bits + self.mantissa_bits

    # --- decoding one code -------------------------------------------------------------------

    def _special(self, exponent: int, mantissa: int) -> str | None:
        """'inf', 'nan' or None for the magnitude fields of a code."""
        all_ones_exp = exponent == 2**self.exponent_bits - 1
        if self.specials is Specials.IEEE and all_ones_exp:
            return "inf" if mantissa == 0 else "nan"
        if self.specials is Specials.NAN_ONLY and all_ones_exp and mantissa == 2**self.mantissa_bits - 1:
            return "nan"
        return None

    def _magnitude(self, exponent: int, mantissa: int) -> Fraction:
        """The value of the (finite) magnitude fields: (1.m) * 2^(e - bias), or 0.m * 2^(1 - bias)."""
        if self.subnormals and exponent == 0:
            significand, shift = mantissa, 1 - self.bias - self.mantissa_bits
        else:
            significand, shift = 2**self.mantissa_bits + mantissa, exponent - self.bias - self.mantissa_bits
        return Fraction(significand << shift) if shift >= 0 else Fraction(significand, 1 << -shift)

    def decode(self, code: int) -> Fraction | float:
        """The value of bit pattern ``code``: a ``Fraction``, or ``float`` inf/-inf/nan."""
        if not 0 <= code < 2**self.bits:
            raise ValueError(f"{self.name}: code {code} out of range")
        mantissa = code & (2**self.mantissa_bits - 1)
        exponent = (code >> self.mantissa_bits) & (2**self.exponent_bits - 1)
        negative = self.sign_bits == 1 and (code >> (self.exponent_bits + self.mantissa_bits)) & 1 == 1
        special = self._special(exponent, mantissa)
        if special == "nan":
            return math.nan
        if special == "inf":
            return -math.inf if negative else math.inf
        value = self._magnitude(exponent, mantissa)
        return -value if negative else value

    def finite_nonnegative(self) -> Iterator[Fraction]:
        """Every finite non-negative value in ascending order (enumerates 2^(E+M) codes: small formats only)."""
        for code in range(2 ** (self.exponent_bits + self.mantissa_bits)):
            value = self.decode(code)
            if isinstance(value, Fraction):
                yield value

    # --- closed-form properties --------------------------------------------------------------

    @property
    def _max_fields(self) -> tuple[int, int]:
        """(exponent code, mantissa) of the largest finite value."""
        top_exp, top_man = 2**self.exponent_bits - 1, 2**self.mantissa_bits - 1
        if self.specials is Specials.IEEE:
            return top_exp - 1, top_man
        if self.specials is Specials.NAN_ONLY:
            # The all-ones code is NaN; with no mantissa bits the whole top exponent is gone.
            return (top_exp, top_man - 1) if self.mantissa_bits > 0 else (top_exp - 1, 0)
        return top_exp, top_man

    @property
    def max_finite(self) -> Fraction:
        return self._magnitude(*self._max_fields)

    @property
    def emax(self) -> int:
        """Unbiased exponent of the largest finite value."""
        return self._max_fields[0] - self.bias

    @property
    def emin(self) -> int:
        """Unbiased exponent of the smallest normal value."""
        return (1 if self.subnormals else 0) - self.bias

    @property
    def min_normal(self) -> Fraction:
        return _pow2(self.emin)

    @property
    def min_subnormal(self) -> Fraction | None:
        if not self.subnormals or self.mantissa_bits == 0:
            return None
        return _pow2(self.emin - self.mantissa_bits)

    @property
    def max_subnormal(self) -> Fraction | None:
        if self.min_subnormal is None:
            return None
        return (2**self.mantissa_bits - 1) * self.min_subnormal

    @property
    def epsilon(self) -> Fraction:
        return _pow2(-self.mantissa_bits)

    @property
    def nan_codes(self) -> int:
        per_sign = {Specials.IEEE: 2**self.mantissa_bits - 1, Specials.NAN_ONLY: 1, Specials.NONE: 0}[self.specials]
        return per_sign * 2**self.sign_bits

    @property
    def inf_codes(self) -> int:
        return 2**self.sign_bits if self.specials is Specials.IEEE else 0

    @property
    def finite_codes(self) -> int:
        return 2**self.bits - self.nan_codes - self.inf_codes

    @property
    def finite_values(self) -> int:
        """Distinct finite values: +0 and -0 are one value."""
        signed_zero = self.sign_bits == 1 and self.subnormals
        return self.finite_codes - (1 if signed_zero else 0)

    @property
    def binades(self) -> float:
        """Dynamic range: log2(max finite / smallest positive value)."""
        smallest = self.min_subnormal if self.min_subnormal is not None else self.min_normal
        return _log2(self.max_finite / smallest)

    def info(self) -> FormatInfo:
        smallest = self.min_subnormal if self.min_subnormal is not None else self.min_normal
        return FormatInfo(
            name=self.name,
            kind="float",
            bits=self.bits,
            sign_bits=self.sign_bits,
            exponent_bits=self.exponent_bits,
            mantissa_bits=self.mantissa_bits,
            bias=self.bias,
            max=self.max_finite,
            min=-self.max_finite if self.sign_bits else smallest,
            min_normal=self.min_normal,
            min_subnormal=self.min_subnormal,
            min_positive=smallest,
            epsilon=self.epsilon,
            step=None,
            codes=2**self.bits,
            finite_values=self.finite_values,
            has_inf=self.inf_codes > 0,
            has_nan=self.nan_codes > 0,
            binades=self.binades,
            description=self.description,
            source=self.source,
            aliases=self.aliases,
        )


@dataclass(frozen=True)
class IntFormat:
    """A two's-complement (signed) or plain binary (unsigned) integer of ``bits`` bits."""

    name: str
    bits: int
    signed: bool
    description: str
    source: str
    aliases: tuple[str, ...] = ()

    @property
    def min_value(self) -> int:
        return -(2 ** (self.bits - 1)) if self.signed else 0

    @property
    def max_value(self) -> int:
        return 2 ** (self.bits - 1) - 1 if self.signed else 2**self.bits - 1

    @property
    def symmetric_min(self) -> int | None:
        """The lowest value symmetric (zero-point-free) quantisation uses: -max, e.g. -127 for int8."""
        return -self.max_value if self.signed else None

    def info(self) -> FormatInfo:
        return FormatInfo(
            name=self.name,
            kind="int",
            bits=self.bits,
            sign_bits=1 if self.signed else 0,
            exponent_bits=None,
            mantissa_bits=None,
            bias=None,
            max=Fraction(self.max_value),
            min=Fraction(self.min_value),
            min_normal=None,
            min_subnormal=None,
            min_positive=Fraction(1),
            epsilon=None,
            step=Fraction(1),
            codes=2**self.bits,
            finite_values=2**self.bits,
            has_inf=False,
            has_nan=False,
            binades=None,
            description=self.description,
            source=self.source,
            aliases=self.aliases,
            symmetric_min=None if self.symmetric_min is None else Fraction(self.symmetric_min),
        )


@dataclass(frozen=True)
class LookupFormat:
    """A format whose codes index a table of values (scaled by a per-block absmax when used)."""

    name: str
    bits: int
    table: tuple[float, ...]
    description: str
    source: str
    aliases: tuple[str, ...] = ()
    levels: tuple[Fraction, ...] = field(init=False)

    def __post_init__(self) -> None:
        if len(self.table) != 2**self.bits:
            raise ValueError(f"{self.name}: {len(self.table)} levels for {self.bits} bits")
        object.__setattr__(self, "levels", tuple(sorted(Fraction(v) for v in self.table)))

    def info(self) -> FormatInfo:
        positive = [v for v in self.levels if v > 0]
        return FormatInfo(
            name=self.name,
            kind="lookup",
            bits=self.bits,
            sign_bits=None,
            exponent_bits=None,
            mantissa_bits=None,
            bias=None,
            max=self.levels[-1],
            min=self.levels[0],
            min_normal=None,
            min_subnormal=None,
            min_positive=min(positive) if positive else None,
            epsilon=None,
            step=None,  # not a uniform grid
            codes=2**self.bits,
            finite_values=len(set(self.levels)),
            has_inf=False,
            has_nan=False,
            binades=None,
            description=self.description,
            source=self.source,
            aliases=self.aliases,
            levels=self.levels,
        )


# The 16 NF4 levels exactly as bitsandbytes stores them (float32 values printed as float64):
# bitsandbytes/functional.py get_4bit_type("nf4") and csrc/kernels.cu; built by create_normal_map
# (offset 0.9677083): 8 positive and 7 negative quantiles of N(0, 1) plus zero, normalised to [-1, 1].
# QLoRA: Dettmers et al. 2023, arXiv:2305.14314, section 3 and Appendix E.
NF4_LEVELS: tuple[float, ...] = (
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
    -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
    0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
    0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0,
)  # fmt: skip

_OFP8 = "OCP 8-bit Floating Point Specification (OFP8) rev 1.0; Micikevicius et al. 2022, arXiv:2209.05433, Table 1"
_MX = "OCP Microscaling Formats (MX) Specification v1.0 (2023)"

FORMATS: tuple[FloatFormat | IntFormat | LookupFormat, ...] = (
    FloatFormat("fp32", 8, 23, Specials.IEEE, "IEEE single precision", "IEEE 754-2008 binary32",
                aliases=("float32", "float")),
    FloatFormat("fp16", 5, 10, Specials.IEEE, "IEEE half precision", "IEEE 754-2008 binary16",
                aliases=("float16", "half")),
    FloatFormat("bf16", 8, 7, Specials.IEEE, "bfloat16: fp32's exponent, 7 mantissa bits",
                "Google bfloat16; Kalamkar et al. 2019, arXiv:1905.12322", aliases=("bfloat16",)),
    FloatFormat("fp8-e4m3", 4, 3, Specials.NAN_ONLY, "FP8 E4M3 (fn): no inf, NaN only S.1111.111",
                _OFP8, aliases=("e4m3", "float8_e4m3fn", "fp8_e4m3", "fp8")),
    FloatFormat("fp8-e5m2", 5, 2, Specials.IEEE, "FP8 E5M2: IEEE-like with inf and NaN",
                _OFP8, aliases=("e5m2", "float8_e5m2", "fp8_e5m2")),
    FloatFormat("fp6-e3m2", 3, 2, Specials.NONE, "MX FP6 E3M2: no inf/NaN", _MX,
                aliases=("e3m2", "fp6_e3m2", "float6_e3m2fn")),
    FloatFormat("fp6-e2m3", 2, 3, Specials.NONE, "MX FP6 E2M3: no inf/NaN", _MX,
                aliases=("e2m3", "fp6_e2m3", "float6_e2m3fn")),
    FloatFormat("fp4-e2m1", 2, 1, Specials.NONE, "MX FP4 E2M1: no inf/NaN", _MX,
                aliases=("e2m1", "fp4", "fp4_e2m1", "float4_e2m1fn")),
    FloatFormat("e8m0", 8, 0, Specials.NAN_ONLY, "MX shared scale: powers of two 2^-127..2^127, NaN 0xFF",
                _MX, sign_bits=0, bias=127, subnormals=False, aliases=("float8_e8m0fnu", "e8m0fnu")),
    IntFormat("int8", 8, True, "two's complement; symmetric quantisation uses -127..127",
              "two's complement 8-bit integer", aliases=("i8",)),
    IntFormat("int4", 4, True, "two's complement; symmetric quantisation uses -7..7",
              "two's complement 4-bit integer", aliases=("i4",)),
    IntFormat("uint8", 8, False, "unsigned 8-bit integer (asymmetric quantisation with a zero point)",
              "unsigned binary integer", aliases=("u8",)),
    LookupFormat("nf4", 4, NF4_LEVELS, "NormalFloat4: quantiles of N(0,1) scaled to [-1, 1], per-block absmax",
                 "Dettmers et al. 2023 (QLoRA), arXiv:2305.14314; bitsandbytes functional.get_4bit_type('nf4')",
                 aliases=("normalfloat4",)),
)  # fmt: skip


def _index() -> dict[str, FloatFormat | IntFormat | LookupFormat]:
    index: dict[str, FloatFormat | IntFormat | LookupFormat] = {}
    for fmt in FORMATS:
        for key in (fmt.name, *fmt.aliases):
            index[_key(key)] = fmt
    return index


def _key(name: str) -> str:
    return str(name).strip().lower().replace("_", "-")


def get_format(name: str) -> FloatFormat | IntFormat | LookupFormat:
    """The layout object for ``name`` (canonical name or alias, case-insensitive, '_' = '-')."""
    fmt = _index().get(_key(name))
    if fmt is None:
        known = ", ".join(f.name for f in FORMATS)
        raise InputError(f"unknown number format {name!r}; known formats: {known}")
    return fmt


def describe(name: str) -> FormatInfo:
    """The computed properties of one format (see ``get_format`` for accepted names)."""
    return get_format(name).info()


def format_table() -> list[FormatInfo]:
    """One row per format, in the order of ``FORMATS``."""
    return [fmt.info() for fmt in FORMATS]


# --- display -----------------------------------------------------------------------------------


def _pow2(exponent: int) -> Fraction:
    return Fraction(1 << exponent) if exponent >= 0 else Fraction(1, 1 << -exponent)


def _log2(value: Fraction) -> float:
    # log2 of numerator and denominator separately: exact for powers of two, no float overflow.
    return math.log2(value.numerator) - math.log2(value.denominator)


def _power_of_two(value: Fraction) -> int | None:
    """k when |value| == 2^k, else None."""
    num, den = abs(value.numerator), value.denominator
    if num & (num - 1) == 0 and den & (den - 1) == 0:
        return num.bit_length() - den.bit_length()
    return None


def exact_str(value: Fraction | None) -> str:
    """Exact, short: '448', '2^-9', '-2^-127', '255*2^120', '1/3' (never rounded)."""
    if value is None:
        return "-"
    sign = "-" if value < 0 else ""
    magnitude = abs(value)
    if magnitude.denominator == 1 and magnitude < 2**20:
        return f"{sign}{magnitude.numerator}"
    k = _power_of_two(magnitude)
    if k is not None:
        return f"{sign}2^{k}"
    den = magnitude.denominator
    if den & (den - 1) == 0:  # dyadic: odd * 2^k
        num, shift = magnitude.numerator, -(den.bit_length() - 1)
        while num % 2 == 0:
            num //= 2
            shift += 1
        return f"{sign}{num}*2^{shift}"
    return f"{sign}{magnitude.numerator}/{magnitude.denominator}"


def display(value: Fraction | None) -> str:
    """For tables: integers below 10^6 as they are, else 4 significant digits."""
    if value is None:
        return "-"
    if value.denominator == 1 and abs(value) < 10**6:
        return str(value.numerator)
    return f"{float(value):.4g}"


def _cell(value: Fraction | None) -> str:
    """A table cell: the display value, plus the power of two when it is one ('6.104e-05 (2^-14)')."""
    shown = display(value)
    if value is None or (value.denominator == 1 and abs(value) < 10**6):
        return shown
    k = _power_of_two(value)
    return shown if k is None else f"{shown} (2^{k})"


COLUMNS = ("format", "bits", "S/E/M", "bias", "max / range", "min normal", "min subnormal", "epsilon / step",
           "finite values", "inf/NaN", "binades")  # fmt: skip


def _row_cells(row: FormatInfo) -> tuple[str, ...]:
    """One table row as strings, in ``COLUMNS`` order."""
    if row.kind == "float":
        layout = f"{row.sign_bits}/{row.exponent_bits}/{row.mantissa_bits}"
        value_range = _cell(row.max)
        smallest = _cell(row.min_subnormal)
        spacing = _cell(row.epsilon)
        specials = f"{'inf' if row.has_inf else 'no inf'}, {'NaN' if row.has_nan else 'no NaN'}"
    elif row.kind == "int":
        layout = "int" if row.sign_bits else "uint"
        symmetric = f", sym. {exact_str(row.symmetric_min)}" if row.symmetric_min is not None else ""
        value_range = f"{exact_str(row.min)}..{exact_str(row.max)}{symmetric}"
        smallest, spacing, specials = "-", exact_str(row.step), "-"
    else:
        layout = "table"
        value_range = f"{display(row.min)}..{display(row.max)} (x absmax)"
        smallest, spacing, specials = f"{display(row.min_positive)} (smallest > 0)", "non-uniform", "-"
    return (
        row.name,
        str(row.bits),
        layout,
        "-" if row.bias is None else str(row.bias),
        value_range,
        _cell(row.min_normal),
        smallest,
        spacing,
        str(row.finite_values),
        specials,
        "-" if row.binades is None else f"{row.binades:.1f}",
    )


def table_rows(rows: list[FormatInfo] | None = None) -> list[tuple[str, ...]]:
    """The rows of the formats table as strings, in ``COLUMNS`` order (all formats by default)."""
    return [_row_cells(row) for row in (rows if rows is not None else format_table())]


def markdown_table(rows: list[FormatInfo] | None = None) -> str:
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    lines += ["| " + " | ".join(cells) + " |" for cells in table_rows(rows)]
    return "\n".join(lines)


def json_document(rows: list[FormatInfo] | None = None) -> dict:
    return {"formats": [row.as_dict() for row in (rows if rows is not None else format_table())]}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m memcalc.formats", description=__doc__.splitlines()[0])
    group = parser.add_mutually_exclusive_group()
    group.add_argument("--markdown", action="store_true", help="print the table as Markdown (docs/precision.md)")
    group.add_argument("--json", action="store_true", help="print every row as JSON")
    parser.add_argument("names", nargs="*", help="formats to show (default: all)")
    args = parser.parse_args(argv)
    try:
        rows = [describe(name) for name in args.names] if args.names else format_table()
    except InputError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(json_document(rows), indent=2))
    elif args.markdown:
        print(markdown_table(rows))
    else:
        cells = [COLUMNS, *table_rows(rows)]
        widths = [max(len(r[i]) for r in cells) for i in range(len(COLUMNS))]
        for r in cells:
            print("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip())
    return 0


if __name__ == "__main__":
    sys.exit(main())
